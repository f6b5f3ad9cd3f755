"""The any-set generator (config.model.generator='any') and its training scenarios."""
import functools
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aegan_jax import checkpoints
from aegan_jax import data
from aegan_jax.kernels import convolution
from aegan_jax import modalities
from aegan_jax import models
from aegan_jax import train
from tests_helpers import (SIZE, assert_states_equal, phantom_image_batch, random_variables,
                           tiny_config)



def any_config(**fields):
  return tiny_config(**{'model.generator': 'any', 'data.scenarios': 'any', **fields})


def init(generator, seed=0):
  return random_variables(generator, SIZE, seed)


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_parameters_grow_by_one_slot_encoder_and_the_embeddings():
  four, five = (models.build_networks(any_config().model, m)[0] for m in (4, 5))
  p4 = jax.eval_shape(lambda: init(four))['params']
  p5 = jax.eval_shape(lambda: init(five))['params']
  assert set(p5) == set(p4) | {'encoder_3'}
  ngf = 8
  # Each encoder's three modulations read a one-hot (slot, target) code of 2M entries and
  # give a scale and a shift per channel (ngf, 2 ngf, 4 ngf): a modality adds two rows each.
  rows = 2 * (ngf + 2 * ngf + 4 * ngf)
  plain_encoder = count(p4['encoder_0']) - 2 * 4 * rows
  assert count(p5['encoder_3']) == plain_encoder + 2 * 5 * rows
  encoders = 4 * (plain_encoder + 2 * 5 * rows) - 3 * (plain_encoder + 2 * 4 * rows)
  target = 2 * 4 * ngf  # the fused features' target scale and shift: one row more each
  assert count(p5) - count(p4) == encoders + target


@pytest.mark.parametrize('norm,train_mode', [('batch', True), ('batch', False),
                                             ('instance', True)])
@pytest.mark.slow
def test_absent_inputs_cannot_influence_the_output(norm, train_mode):
  generator = models.build_networks(any_config(**{'model.norm': norm}).model, 4)[0]
  variables = init(generator)
  batch = phantom_image_batch(SIZE, 4, 0)
  available = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1]], bool)
  target = np.array([3, 0, 3, 1])
  noise = np.random.default_rng(1).normal(size=batch['images'].shape).astype(np.float32)
  scrambled = np.where(available[:, None, None, :], batch['images'], 5 * noise)

  @jax.jit
  def run(images):
    out, _ = generator.apply(variables, images, available, target, train=train_mode,
                             rngs={'dropout': jax.random.PRNGKey(2)}, mutable=['batch_stats'])
    return out

  np.testing.assert_array_equal(run(batch['images']), run(scrambled))
  # ... while an available input does change it.
  changed = np.where(available[:, None, None, :], 5 * noise, batch['images'])
  reference = run(batch['images'])
  assert np.abs(reference - run(changed)).max() > 0.1 * np.abs(reference).max()


@pytest.mark.slow
def test_one_program_serves_every_subset():
  generator = models.build_networks(any_config().model, 4)[0]
  variables = init(generator)
  # The embeddings start at zero; as training would, give them values.
  def embedding(path, value):
    names = [getattr(key, 'key', '') for key in path]
    if any(n.startswith('modulation') or n.startswith('target_') for n in names):
      seed = zlib.crc32('/'.join(names).encode())
      return 0.5 * jax.random.normal(jax.random.PRNGKey(seed), value.shape)
    return value
  variables = jax.tree_util.tree_map_with_path(embedding, variables)
  images = phantom_image_batch(SIZE, 1, 0)['images']
  apply = jax.jit(functools.partial(generator.apply, train=False))
  outputs = set()
  for target in range(4):
    others = [m for m in range(4) if m != target]
    for k in (1, 2, 3):
      for subset in itertools.combinations(others, k):
        available = np.isin(np.arange(4), subset)[None]
        out = apply(variables, images, available, np.array([target]))
        outputs.add(np.asarray(out).tobytes())
  assert apply._cache_size() == 1
  assert len(outputs) == 28  # every (set, target) cell gives its own synthesis


def test_configs_stored_before_the_generator_field_still_restore():
  config = any_config()
  del config.model['generator']  # as a checkpoint written by an earlier version stores it
  meta = {'architecture': checkpoints.config_fields(config)}
  assert 'model.generator' not in meta['architecture']
  checkpoints.check_compatible(meta, config, 'old')
  assert isinstance(models.build_networks(config.model, 4)[0], models.SynthesisGenerator)


def test_the_pipeline_samples_every_pair_uniformly(prepared):
  loader = data.make_train_loader(prepared, global_batch_size=8, seed=0, scenarios='any',
                                  process_index=0, process_count=1)
  counts = {}
  for _, batch in zip(range(60), loader):
    for available, target in zip(batch['available'], batch['target_index']):
      assert available.any() and not available[target]
      key = (tuple(np.flatnonzero(available)), int(target))
      counts[key] = counts.get(key, 0) + 1
  assert len(counts) == 28
  assert min(counts.values()) > 0.4 * 480 / 28


def test_the_curriculum_removes_inputs_stage_by_stage_and_replays(prepared):
  loader = data.make_train_loader(prepared, global_batch_size=8, seed=0, scenarios='curriculum',
                                  curriculum_stage_examples=16, process_index=0,
                                  process_count=1)
  iterator = iter(loader)
  batches = [next(iterator) for _ in range(12)]
  inputs = [b['available'].sum(axis=1) for b in batches]
  for stage, fewest in enumerate((3, 2, 1)):
    seen = np.concatenate(inputs[2 * stage:2 * stage + 2])
    assert seen.min() >= fewest
  assert set(np.concatenate(inputs[6:])) == {1, 2, 3}
  for batch in batches:
    assert not batch['available'][np.arange(8), batch['target_index']].any()
  state = iter(loader)
  for _ in range(5):
    next(state)
  resumed = iter(loader)
  resumed.set_state(state.get_state())
  np.testing.assert_array_equal(next(resumed)['available'], batches[5]['available'])


@pytest.mark.slow
def test_training_iterations_run_and_learn():
  config = any_config()
  trainer = train.make_trainer(config, 4)
  state = train.init_state(trainer, jax.random.PRNGKey(0), SIZE)
  step = jax.jit(functools.partial(train.train_step, trainer=trainer))
  batch = phantom_image_batch(SIZE, 4, 0)
  batch['available'] = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 0]], bool)
  batch['target_index'] = np.array([3, 0, 2, 1])
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss_G_L1']))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.slow
def test_batch_norm_any_set_training_moments_ignore_absent_slots():
  """Each slot encoder's first batch moments in training are those of its present
  slots' features alone, and an encoder whose slot is absent throughout the batch keeps
  its running statistics."""
  generator = models.build_networks(any_config(**{'model.norm': 'batch'}).model, 4)[0]
  variables = init(generator)
  images = phantom_image_batch(SIZE, 4, 0)['images']
  available = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]], bool)
  target = np.array([3, 0, 3, 1])  # every example's slot 2 (t2, flair, t2, t1) is absent
  _, state = generator.apply(variables, images, available, target, train=True,
                             rngs={'dropout': jax.random.PRNGKey(2)}, mutable=['batch_stats'])
  for i in range(2):
    sources = [modalities.branch_modalities(t, 4)[i] for t in target]
    slots = [images[n, ..., j] for n, j in enumerate(sources) if available[n, j]]
    kernel = variables['params'][f'encoder_{i}']['conv_in']['kernel']  # no bias before BatchNorm
    features = jnp.concatenate([
        jax.lax.conv_general_dilated(convolution.reflect_pad(jnp.asarray(s)[None, ..., None], 3),
                                     kernel, (1, 1), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC')) for s in slots])
    # One update of the zero-initialised running mean, momentum 0.1.
    np.testing.assert_allclose(state['batch_stats'][f'encoder_{i}']['norm_in']['mean'],
                               0.1 * features.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  assert_states_equal(state['batch_stats']['encoder_2'], variables['batch_stats']['encoder_2'])


def test_input_count_ratio_sets_the_share_of_each_input_count(prepared):
  loader = data.make_train_loader(prepared, global_batch_size=8, seed=0, scenarios='any',
                                  input_count_ratio=1.5, process_index=0, process_count=1)
  counts = np.zeros(4)
  cells = set()
  for _, batch in zip(range(100), loader):
    counts += np.bincount(batch['available'].sum(axis=1), minlength=4)
    cells |= {(tuple(np.flatnonzero(a)), int(t))
              for a, t in zip(batch['available'], batch['target_index'])}
  share = counts[1:] / counts.sum()
  np.testing.assert_allclose(share, np.array([1.5, 2.25, 3.375]) / 7.125, atol=0.06)  # 800 draws
  assert len(cells) == 28


@pytest.mark.parametrize('ratio,scenarios', [(-1.0, 'any'), (float('nan'), 'any'),
                                             (float('inf'), 'any'), ((1, 2), 'any'),
                                             (1.5, 'single')])
def test_bad_input_count_ratio_names_the_field(ratio, scenarios):
  with pytest.raises(ValueError, match='config.data.input_count_ratio'):
    data.check_scenario_options(scenarios=scenarios, curriculum_stage_examples=1,
                                input_count_ratio=ratio)
