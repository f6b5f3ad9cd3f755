"""The tumour segmenter: regions, network, its training job (launch.py) and its errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aegan_jax import checkpoints
from aegan_jax import cli
from aegan_jax import data
from aegan_jax import downstream
from aegan_jax import segmenter
from aegan_jax import segmenter_job
from configs import segmenter_demo
from data_prep import phantom
from data_prep import prepare
from tests_helpers import assert_states_equal


def tiny_config(prepared_dir, **train_fields):
  """configs/segmenter_demo.py shrunk: 32 px, 8 features, two levels, batch 8."""
  config = segmenter_demo.get_config()
  config.data.prepared_dir = str(prepared_dir)
  config.data.image_size = 32
  config.model.features = 8
  config.model.levels = 2
  config.optim.learning_rate = 1e-2
  config.train.global_batch_size = 8
  config.train.log_every = 25
  config.train.checkpoint_every = 75
  config.train.evaluate_at_end = False
  config.optim.lr_constant_steps = 0
  config.optim.lr_decay_steps = 0
  for key, value in train_fields.items():
    config.train[key] = value
  return config


@pytest.fixture(scope='module')
def labelled(tmp_path_factory):
  """6 phantom subjects at 32 px, the slices through their middle (tumours are there)."""
  root = tmp_path_factory.mktemp('seg')
  phantom.write_phantom_dataset(root / 'raw', 6, seed=2, shape=(48, 48, 40))
  prepare.prepare_dataset(root / 'raw', root / 'prepared', image_size=32, slices='range:14:26',
                          split_ratios=(0.67, 0.0, 0.33), progress=False)
  return root


def test_regions_map_brats_2020_and_2023_labels():
  seg = np.array([0, 1, 2, 3, 4])
  masks = segmenter.region_masks(seg)
  np.testing.assert_array_equal(masks[:, 0], [0, 1, 1, 1, 1])  # WT
  np.testing.assert_array_equal(masks[:, 1], [0, 1, 0, 1, 1])  # TC
  np.testing.assert_array_equal(masks[:, 2], [0, 0, 0, 1, 1])  # ET
  np.testing.assert_array_equal(np.asarray(segmenter.region_masks(jnp.asarray(seg), jnp)), masks)


def test_unet_gives_one_logit_per_region_and_checks_its_fields():
  network = segmenter.build({'features': 4, 'levels': 2, 'norm': 'batch',
                             'dtype': 'float32', 'param_dtype': 'float32'})
  x = jnp.zeros((2, 16, 16, 4))
  variables = jax.eval_shape(lambda: network.init({'params': jax.random.PRNGKey(0)}, x,
                                                  train=False))
  assert jax.eval_shape(lambda v: network.apply(v, x, train=False), variables).shape == \
      (2, 16, 16, 3)
  with pytest.raises(ValueError, match='config.model.levels=0'):
    segmenter.build({'features': 4, 'levels': 0})
  with pytest.raises(ValueError, match='config.model: .*ngf'):
    segmenter.build({'features': 4, 'ngf': 8})
  with pytest.raises(ValueError, match='multiple of 2 \\*\\* config.model.levels = 8'):
    segmenter.check_image_size(36, 3)


def test_soft_dice_loss_is_zero_for_a_perfect_answer_and_high_for_none():
  targets = np.zeros((2, 8, 8, 3), np.float32)
  targets[:, 2:5, 2:5] = 1
  perfect = segmenter.losses(jnp.where(targets > 0, 20.0, -20.0), targets)
  nothing = segmenter.losses(jnp.full(targets.shape, -20.0), targets)
  assert float(perfect['loss_dice']) < 0.01 and float(nothing['loss_dice']) > 0.9


def _train_split_dice(model, prepared):
  manifest = data.load_manifest(prepared)
  rows = downstream.real_input_rows(model, prepared, 'train', manifest)
  return downstream.stats(rows)['wt']['mean']


@pytest.mark.slow
def test_training_resumes_exactly_and_learns(labelled, tmp_path, capsys):
  prepared = labelled / 'prepared'
  assert cli.run(tiny_config(prepared, num_steps=150), tmp_path / 'straight') == 0
  assert cli.run(tiny_config(prepared, num_steps=75), tmp_path / 'resumed') == 0
  assert cli.run(tiny_config(prepared, num_steps=150), tmp_path / 'resumed') == 0
  assert 'resuming from step 75' in capsys.readouterr().out
  config = tiny_config(prepared)
  trainer = segmenter.make_trainer(config, 4)
  template = segmenter.init_state(trainer, jax.random.PRNGKey(5), 32, 4)
  states = []
  for name in ('straight', 'resumed'):
    manager = checkpoints.make_manager(tmp_path / name)
    states.append(segmenter_job.restore_state(manager, 150, template))
    manager.close()
  assert_states_equal(*states)
  # Learning beats the untrained network on the slices it learned from (Dice of WT).
  trained = segmenter.Segmenter.restore(tmp_path / 'straight', batch_size=8)
  untrained = segmenter.Segmenter(trained.network, template.network.variables(), trained.config,
                                  batch_size=8)
  learned, chance = _train_split_dice(trained, prepared), _train_split_dice(untrained, prepared)
  assert learned > 0.5 and learned > chance + 0.3, (learned, chance)


@pytest.mark.slow
def test_evaluate_mode_writes_the_real_input_dice(labelled, tmp_path, capsys):
  config = tiny_config(labelled / 'prepared', num_steps=10)
  assert cli.run(config, tmp_path) == 0
  assert cli.run(config, tmp_path, mode='evaluate') == 0
  assert 'every modality real: Dice WT' in capsys.readouterr().out
  result = json.loads((tmp_path / 'eval' / '10' / 'segmentation.json').read_text())
  assert result['split'] == 'test' and result['num_subjects'] == 2
  assert set(result['dice']) == {'wt', 'tc', 'et'} and result['dice']['wt']['n'] == 2
  assert '| WT | TC | ET |' in (tmp_path / 'eval' / '10' / 'segmentation.md').read_text()


def test_a_dataset_without_labels_is_a_one_line_error(labelled, tmp_path, capsys):
  raw = tmp_path / 'raw'
  phantom.write_phantom_dataset(raw, 3, seed=0, shape=(32, 32, 16))
  for seg in raw.rglob('*_seg.nii.gz'):
    seg.unlink()
  prepare.prepare_dataset(raw, tmp_path / 'prepared', image_size=32, slices='range:4:12',
                          split_ratios=(0.67, 0.0, 0.33), progress=False)
  config = tiny_config(tmp_path / 'prepared', num_steps=2)
  assert cli.run(config, tmp_path / 'work') == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'no training subject has a segmentation' in err
  assert err.count('\n') == 1
  assert not (tmp_path / 'work' / 'checkpoints').exists()


def test_config_mistakes_are_one_line_errors(labelled, tmp_path, capsys):
  config = tiny_config(labelled / 'prepared', num_steps=2)
  config.data.image_size = 34  # not a multiple of 2 ** levels = 4
  assert cli.run(config, tmp_path / 'a') == 2
  assert 'config.data.image_size=34 must be a multiple of' in capsys.readouterr().err
  config = tiny_config(labelled / 'prepared', num_steps=2)
  config.task = 'segment'
  assert cli.run(config, tmp_path / 'b') == 2
  assert "config.task='segment' must be one of" in capsys.readouterr().err
