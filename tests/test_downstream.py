"""Downstream evaluation: Dice maths, the scenario rows, and the metrics.json section."""
import json
import math

import jax
import numpy as np
import pytest

from aegan_jax import checkpoints
from aegan_jax import cli
from aegan_jax import data
from aegan_jax import downstream
from aegan_jax import evaluate
from aegan_jax import segmenter
from aegan_jax import segmenter_job
from configs import segmenter_demo
from data_prep import phantom
from data_prep import prepare
from tests_helpers import tiny_config

SHAPE = (40, 36, 24)
FLAIR = 3


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp('downstream')
  phantom.write_phantom_dataset(root / 'raw', 4, seed=0, shape=SHAPE)
  prepare.prepare_dataset(root / 'raw', root / 'prepared', image_size=32, slices='range:4:20',
                          split_ratios=(0.5, 0.0, 0.5), progress=False)
  return root


def test_dice_known_answers():
  a = np.zeros((4, 4), bool)
  b = np.zeros((4, 4), bool)
  assert downstream.dice(a, b) == 1.0  # both empty: BraTS counts a perfect answer
  a[0, :] = True
  assert downstream.dice(a, b) == 0.0 and downstream.dice(b, a) == 0.0
  b[0, :2] = True
  assert downstream.dice(a, b) == pytest.approx(2 * 2 / (4 + 2))
  assert downstream.dice(a, a) == 1.0


def test_recovered_fraction_of_the_gap():
  assert downstream.recovered({'real': 0.9, 'synthesized': 0.7, 'zeros': 0.5}) == \
      pytest.approx(0.5)
  assert downstream.recovered({'real': 0.9, 'synthesized': 0.95, 'zeros': 0.5}) > 1
  assert math.isnan(downstream.recovered({'real': 0.9, 'synthesized': 0.9, 'zeros': 0.895}))


def test_predictions_go_back_to_the_original_grid():
  entry = {'shape': [20, 24, 6]}
  probabilities = np.zeros((3, 32, 32, 3), np.float32)
  probabilities[:, 10:14, 8:20, 0] = 0.9
  volume = downstream.predicted_regions(probabilities, entry, 'pad')  # pad: exact crop
  assert volume.shape == (20, 24, 3, 3)
  np.testing.assert_array_equal(volume[..., 0], np.moveaxis(probabilities[:, 6:26, 4:28, 0]
                                                            > 0.5, 0, -1))
  assert not volume[..., 1:].any()


class FlairThreshold:
  """A stand-in segmenter: every region where FLAIR is bright (edema is, on the phantom)."""
  batch_size = 4

  def __call__(self, images):
    bright = (images[..., FLAIR] > 0.3).astype(np.float32)
    return np.repeat(bright[..., None], 3, axis=-1)


def test_scenario_rows_known_answers(dataset):
  prepared = dataset / 'prepared'
  manifest = data.load_manifest(prepared)
  subject = next(s for s in evaluate.iterate_subjects(prepared, 'test')
                 if s.seg is not None and (s.seg > 0).any())
  cells = evaluate.scenario_cells(4, any_set=False)
  scores = evaluate.copy_scores(prepared, 'test', 4)
  perfect = lambda images, t, available=None: images[..., t]
  rows = downstream.subject_rows(FlairThreshold(), perfect, subject,
                                 manifest['subjects'][subject.subject_id], manifest, scores, cells)
  assert len(rows) == 4 * 4  # 4 targets x (real, synthesized, copy, zeros)
  by = {(r['target'], r['input']): r for r in rows}
  for target in ('t1', 't1ce', 't2', 'flair'):
    assert {k: by[target, 'synthesized'][k] for k in ('wt', 'tc', 'et')} == \
        {k: by[target, 'real'][k] for k in ('wt', 'tc', 'et')}
  assert by['flair', 'real']['wt'] > 0.5
  assert by['flair', 'zeros']['wt'] == 0.0  # no FLAIR, nothing found, a tumour missed
  assert by['t1', 'zeros']['wt'] == by['t1', 'real']['wt']  # this stand-in ignores T1
  assert by['flair', 'copy']['source'] == manifest['modalities'][
      evaluate.best_input(scores, FLAIR, (0, 1, 2))]
  summary = downstream.summarise(rows, manifest['modalities'], cells)
  assert summary['targets']['flair']['recovered']['wt'] == pytest.approx(1.0)
  assert math.isnan(summary['targets']['t1']['recovered']['wt'])  # no gap to recover


def _segmenter_checkpoint(workdir, image_size=32):
  config = segmenter_demo.get_config()
  config.data.image_size = image_size
  config.model.features, config.model.levels = 4, 2
  trainer = segmenter.make_trainer(config, 4)
  state = segmenter.init_state(trainer, jax.random.PRNGKey(0), image_size, 4)
  manager = checkpoints.make_manager(workdir)
  segmenter_job.save_state(manager, state, config)
  manager.wait_until_finished()
  manager.close()


def _synthesis_checkpoint(workdir, prepared, generator='official'):
  config = tiny_config(num_blocks=1, **{'data.prepared_dir': str(prepared),
                                       'data.image_size': 32, 'data.slices': 'range:4:20',
                                       'model.generator': generator})
  from aegan_jax import models  # pylint: disable=g-import-not-at-top
  network, _ = models.build_networks(config.model, 4)
  variables = network.init({'params': jax.random.PRNGKey(0)},
                           *models.example_inputs(network, 32), train=False)
  checkpoints.save_networks(workdir, 5, config, variables)
  return config


@pytest.mark.slow
def test_evaluation_gains_a_downstream_section(dataset, tmp_path):
  _segmenter_checkpoint(tmp_path / 'seg')
  config = _synthesis_checkpoint(tmp_path / 'gen', dataset / 'prepared')
  config.eval.segmenter_workdir = str(tmp_path / 'seg')
  report = evaluate.evaluate(config, tmp_path / 'gen', batch_size=8, log=lambda *a: None)
  section = json.loads((tmp_path / 'gen' / 'eval' / '5' / 'metrics.json').read_text())[
      'downstream']
  assert section['num_subjects'] == 2 and set(section['targets']) == {'t1', 't1ce', 't2',
                                                                        'flair'}
  for cell in section['targets'].values():
    for name in downstream.INPUTS:
      assert set(cell[name]) == {'wt', 'tc', 'et'} and cell[name]['wt']['n'] == 2
  assert set(section['average']) == set(downstream.INPUTS) | {'recovered'}
  assert len(section['subjects']) == 2 * 4 * 4 and 'cells' not in section
  assert report['downstream']['segmenter']['step'] == 0
  markdown = (tmp_path / 'gen' / 'eval' / '5' / 'metrics.md').read_text()
  assert '## Downstream: tumour-segmentation Dice' in markdown
  assert '| flair | zeros |' in markdown and '| t1 | *recovered* |' in markdown


@pytest.mark.slow
def test_any_set_downstream_has_every_cell(dataset, tmp_path):
  _segmenter_checkpoint(tmp_path / 'seg')
  config = _synthesis_checkpoint(tmp_path / 'gen', dataset / 'prepared', generator='any')
  config.eval.segmenter_workdir = str(tmp_path / 'seg')
  report = evaluate.evaluate(config, tmp_path / 'gen', batch_size=8, log=lambda *a: None)
  cells = report['downstream']['cells']
  assert len(cells) == 28 and all('recovered' in c and 'copy_source' in c for c in cells)
  markdown = (tmp_path / 'gen' / 'eval' / '5' / 'metrics.md').read_text()
  assert '### Every set of inputs: mean Dice' in markdown and '| t1 + t2 |' in markdown


@pytest.mark.slow
def test_a_wrong_segmenter_workdir_is_one_line(dataset, tmp_path, capsys):
  config = _synthesis_checkpoint(tmp_path / 'gen', dataset / 'prepared')
  config.eval.segmenter_workdir = str(tmp_path / 'gen')  # a synthesis run, not a segmenter
  assert cli.run(config, tmp_path / 'gen', mode='evaluate') == 2
  err = capsys.readouterr().err
  assert err.startswith('error: --config.eval.segmenter_workdir') and 'not a segmenter' in err
  _segmenter_checkpoint(tmp_path / 'seg64', image_size=64)
  config.eval.segmenter_workdir = str(tmp_path / 'seg64')
  assert cli.run(config, tmp_path / 'gen', mode='evaluate') == 2
  err = capsys.readouterr().err
  assert 'trained with data.image_size=64' in err and err.count('\n') == 1
  assert not (tmp_path / 'gen' / 'eval' / '5' / 'metrics.json').exists()
