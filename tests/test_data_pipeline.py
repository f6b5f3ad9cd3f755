"""Grain pipeline over a prepared phantom."""
import numpy as np
import pytest

from aegan_jax import data
from aegan_jax import modalities
from aegan_jax import models
from tests_helpers import prepared_phantom, tiny_config


@pytest.fixture(scope='module')
def prepared16(tmp_path_factory):
  """16 px slices of 5 small subjects, the non-empty ones (not conftest's `prepared`)."""
  return prepared_phantom(tmp_path_factory.mktemp('pipeline'), 5, shape=(24, 24, 16),
                          image_size=16, slices='nonempty:0.2', split_ratios=(0.6, 0.2, 0.2))


def _ids(batch):
  return batch['example_id'].tolist()


def test_batches_have_the_documented_layout(prepared16):
  loader = data.make_train_loader(prepared16, global_batch_size=4, seed=0,
                                  process_index=0, process_count=1)
  batch = next(iter(loader))
  assert set(batch) == {'images', 'available', 'target_index', 'example_id'}
  assert batch['images'].shape == (4, 16, 16, 4)
  assert batch['images'].dtype == np.float32
  assert batch['target_index'].dtype == np.int32
  np.testing.assert_array_equal(batch['available'],
                                modalities.all_but_target(batch['target_index'], 4))
  # What the step builds from it, on device.
  generator = models.build_networks(tiny_config().model, 4)[0]
  (generator_input,), target = models.generator_batch(generator, batch)
  np.testing.assert_array_equal(
      generator_input,
      modalities.assemble_generator_input(batch['images'], batch['target_index']))
  for i, t in enumerate(batch['target_index']):
    np.testing.assert_array_equal(target[i, ..., 0], batch['images'][i, ..., t])


def test_restored_state_replays_batches(prepared16):
  loader = data.make_train_loader(prepared16, global_batch_size=4, seed=7,
                                  process_index=0, process_count=1, flip=True,
                                  random_crop=True)
  iterator = iter(loader)
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]
  restored = iter(loader)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_targets_subset_and_seed(prepared16):
  loader = data.make_train_loader(prepared16, global_batch_size=8, seed=0,
                                  targets=(3,), process_index=0,
                                  process_count=1)
  iterator = iter(loader)
  assert all((next(iterator)['target_index'] == 3).all() for _ in range(3))
  seen = set()
  iterator = iter(data.make_train_loader(prepared16, global_batch_size=8, seed=0,
                                         process_index=0, process_count=1))
  for _ in range(6):
    seen |= set(next(iterator)['target_index'].tolist())
  assert seen == {0, 1, 2, 3}
  other = iter(data.make_train_loader(prepared16, global_batch_size=8, seed=1,
                                      process_index=0, process_count=1))
  assert _ids(next(other)) != _ids(next(iter(loader)))


@pytest.mark.parametrize('process_count', [2, 3, 4])
def test_process_shards_are_disjoint(prepared16, process_count):
  total = data.num_examples(prepared16, 'train')
  shards = []
  for index in range(process_count):
    loader = data.make_loader(
        prepared16, global_batch_size=process_count, seed=3, num_epochs=1,
        drop_remainder=False, process_index=index,
        process_count=process_count)
    shards.append([i for batch in loader for i in _ids(batch)])
  flat = [i for shard in shards for i in shard]
  assert len(flat) == len(set(flat))
  # Grain's IndexSampler gives every process the same number of records:
  # an epoch drops the remainder (fewer than process_count records).
  assert total - process_count < len(flat) <= total
  assert len({len(shard) for shard in shards}) == 1
  if total % process_count == 0:
    assert sorted(flat) == list(range(total))


@pytest.mark.parametrize('process_count', [1, 2, 3, 4])
def test_evaluation_shards_cover_everything(prepared16, process_count):
  shards = [[(e['subject_id'], e['slice_index'])
             for e in data.iterate_split(prepared16, 'train', process_index=i,
                                         process_count=process_count)]
            for i in range(process_count)]
  flat = [key for shard in shards for key in shard]
  assert len(flat) == len(set(flat)) == data.num_examples(prepared16, 'train')


def test_augmentation_keeps_modalities_aligned(prepared16):
  plain = data.make_loader(prepared16, global_batch_size=4, seed=2, num_epochs=1,
                           shuffle=False, process_index=0, process_count=1)
  flipped = data.make_loader(prepared16, global_batch_size=4, seed=2,
                             num_epochs=1, shuffle=False, flip=True,
                             process_index=0, process_count=1)
  a, b = next(iter(plain)), next(iter(flipped))
  for i in range(4):
    same = np.array_equal(a['images'][i], b['images'][i])
    mirrored = np.array_equal(a['images'][i, :, ::-1], b['images'][i])
    assert same or mirrored


def test_iterate_split_covers_test_subjects(prepared16):
  manifest = data.load_manifest(prepared16)
  examples = list(data.iterate_split(prepared16, 'test'))
  assert len(examples) == data.num_examples(prepared16, 'test') > 0
  subjects = {s for s, e in manifest['subjects'].items() if e['split'] == 'test'}
  assert {e['subject_id'] for e in examples} == subjects
  first = examples[0]
  assert first['images'].shape == (16, 16, 4) and 'seg' in first
  assert first['slice_index'] in manifest['subjects'][first['subject_id']]['slices']
