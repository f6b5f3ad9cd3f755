"""Evaluation of a checkpoint on a tiny prepared phantom dataset."""
import csv
import json
import shutil

import jax
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from aegan_jax import checkpoints
from aegan_jax import evaluate
from aegan_jax import inference
from aegan_jax import models
from aegan_jax import protocols
from aegan_jax import reports
from data_prep import prepare
from data_prep.errors import DataError
from tests_helpers import prepared_phantom, random_variables, tiny_config

SHAPE = (40, 36, 24)


def eval_config(prepared_dir):
  return tiny_config(num_blocks=1, **{'data.prepared_dir': str(prepared_dir),
                                       'data.image_size': 32, 'data.slices': 'range:4:20'})


def config_variables(config, seed=0):
  """Random variables of the config's generator."""
  return random_variables(models.build_networks(config.model, 4)[0], seed=seed)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp('eval')
  prepared_phantom(root, seed=0, shape=SHAPE, slices='range:4:20', split_ratios=(0.5, 0.0, 0.5))
  return root


@pytest.fixture(scope='module')
def report(dataset):
  config = eval_config(dataset / 'prepared')
  checkpoints.save_networks(dataset / 'work', 7, config, config_variables(config))
  return evaluate.evaluate(config, dataset / 'work', batch_size=6, log=lambda *a: None)


def test_writes_json_csv_markdown_and_grids(dataset, report):
  out = dataset / 'work' / 'eval' / '7'
  assert sorted(p.name for p in out.iterdir()) == sorted(
      ['metrics.json', 'metrics.csv', 'metrics.md'] +
      [f'grid_{t}.png' for t in ('t1', 't1ce', 't2', 'flair')])
  stored = json.loads((out / 'metrics.json').read_text())
  assert stored['step'] == 7 and stored['split'] == 'test' and stored['num_subjects'] == 2
  assert stored['volume_reference'] == 'source files' and stored['official_test_mode'] is False
  assert set(stored['summary']) == {'model', 'baseline'}
  assert set(stored['summary']['model']) == set(protocols.PROTOCOLS)
  with open(out / 'metrics.csv') as f:
    rows = list(csv.DictReader(f))
  # 2 methods x 3 protocols x 4 targets x 2 subjects.
  assert len(rows) == 48 and len(stored['subjects']) == 48
  assert {r['protocol'] for r in rows} == set(protocols.PROTOCOLS)
  markdown = (out / 'metrics.md').read_text()
  for protocol in protocols.PROTOCOLS:
    assert f'## {protocol}:' in markdown
  for target, source in report['baselines'].items():
    assert f'| {target} | copy {source} |' in markdown
  grid = Image.open(out / 'grid_t1ce.png')
  assert grid.width == 6 * 128 and grid.height > 3 * 128


@pytest.mark.slow
def test_an_any_set_checkpoint_reports_every_cell(dataset, tmp_path):
  config = eval_config(dataset / 'prepared')
  config.model.generator = 'any'
  checkpoints.save_networks(tmp_path, 3, config, config_variables(config))
  report = evaluate.evaluate(config, tmp_path, batch_size=6, log=lambda *a: None)
  cells = report['scenarios']
  assert len(cells) == 28
  assert len({(tuple(c['available']), c['target']) for c in cells}) == 28
  for cell in cells:
    assert cell['target'] not in cell['available'] and cell['available']
    assert set(cell['model']) == set(cell['baseline']) == set(protocols.PROTOCOLS)
    assert np.isfinite(cell['model']['aegan']['psnr']['mean'])
    assert cell['baseline']['aegan']['psnr']['n'] == 2
  # The paper's scenario is the summary, as for the official generator.
  full = [c for c in cells if len(c['available']) == 3]
  for cell in full:
    assert (cell['model']['aegan']['psnr'] ==
            report['summary']['model']['aegan'][cell['target']]['psnr'])
  stored = json.loads((tmp_path / 'eval' / '3' / 'metrics.json').read_text())
  assert stored['scenarios'][0]['available'] == ['t1', 't1ce', 't2']
  with open(tmp_path / 'eval' / '3' / 'metrics.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 * 3 * 28 * 2 and rows[0]['available'] == 't1+t1ce+t2'
  markdown = (tmp_path / 'eval' / '3' / 'metrics.md').read_text()
  assert '| inputs | t1 | t1ce | t2 | flair |' in markdown
  assert '| t1 + t2 |' in markdown


def test_summary_values_are_sane(report):
  summary = report['summary']
  for method in protocols.METHODS:
    for target in ('t1', 't1ce', 't2', 'flair'):
      aegan = summary[method]['aegan'][target]
      assert aegan['psnr']['n'] == 2 and 0 < aegan['psnr']['mean'] < 60
      assert -1 <= aegan['ssim']['mean'] <= 1 and 0 <= aegan['fsim']['mean'] <= 1
      assert 0 <= aegan['mae']['mean'] <= 1
      volume = summary[method]['volume'][target]
      assert np.isfinite(volume['psnr']['mean']) and volume['mae']['mean'] > 0
      brasyn = summary[method]['brasyn'][target]
      assert np.isfinite(brasyn['ssim_tumour']['mean']) or brasyn['ssim_tumour']['n'] == 0
      assert np.isfinite(brasyn['ssim_non_tumour']['mean'])
  # A random generator loses to copying the best input.
  assert report['scalars']['aegan/all/psnr'] < report['scalars']['baseline/aegan/all/psnr']
  assert report['baselines']['t1'] != 't1'


def test_baseline_picks_the_most_similar_input():
  rng = np.random.default_rng(0)
  base = rng.uniform(-1, 1, (3, 16, 16))
  images = np.stack([base, base + 0.01, -base, 0.05 - base], axis=-1).clip(-1, 1)
  scores = evaluate.copy_psnr(images)
  np.fill_diagonal(scores, -np.inf)
  assert list(np.argmax(scores, axis=1)) == [1, 0, 3, 2]


def test_perfect_synthesis_scores_the_cap_and_ssim_one():
  rng = np.random.default_rng(0)
  volume = rng.uniform(0, 500, (20, 20, 12)).astype(np.float32)
  brain = np.ones(volume.shape, bool)
  scores = protocols.volume_metrics(volume, volume, brain)
  assert scores['psnr'] == protocols.PSNR_CAP and scores['mae'] == 0
  assert scores['ssim'] == pytest.approx(1.0, abs=1e-5)
  seg = np.zeros(volume.shape, np.uint8)
  seg[5:10, 5:10, 3:9] = 2
  brasyn = protocols.brasyn_metrics(volume * 2 + 7, volume, brain, seg)  # Affine: same after scaling.
  assert brasyn['ssim_tumour'] == pytest.approx(1.0, abs=1e-4)
  assert brasyn['ssim_non_tumour'] == pytest.approx(1.0, abs=1e-4)
  assert protocols.brasyn_metrics(volume, volume, brain, None)['ssim_tumour'] != \
      protocols.brasyn_metrics(volume, volume, brain, None)['ssim_tumour']  # NaN without seg.


@pytest.mark.slow
def test_without_source_files_and_with_an_empty_split(dataset, tmp_path):
  # Few slices (2D SSIM fallback), the raw files gone (volumes from the prepared slices),
  # and an empty 'val' split (falls back to 'train').
  shutil.copytree(dataset / 'raw', tmp_path / 'raw')
  prepare.prepare_dataset(tmp_path / 'raw', tmp_path / 'prepared', image_size=32,
                          slices='range:10:14', split_ratios=(1.0, 0.0, 0.0), progress=False)
  shutil.rmtree(tmp_path / 'raw')
  config = eval_config(tmp_path / 'prepared')
  config.data.slices = 'range:10:14'
  config.eval.official_test_mode = True  # --config.eval.official_test_mode=True
  messages = []
  report = evaluate.evaluate(config, tmp_path / 'work', step=3, split='val',
                             variables=config_variables(config, 1), batch_size=4,
                             log=messages.append)
  assert report['split'] == 'train' and report['volume_reference'] == 'prepared slices'
  assert report['official_test_mode'] is True
  assert any(m.startswith("warning: split 'val'") for m in messages)
  assert any('target flair: aegan PSNR' in m for m in messages)
  volume = report['summary']['model']['volume']['t2']
  assert volume['ssim']['n'] == 4 and np.isfinite(volume['ssim']['mean'])
  assert (tmp_path / 'work' / 'eval' / '3-official' / 'metrics.md').is_file()


def test_restore_on_a_different_device_count_matches(dataset, report):
  # The checkpoint was written from host arrays; restoring onto a one-device mesh
  # (instead of the 4 test devices) gives the same synthesis.
  config = eval_config(dataset / 'prepared')
  four = inference.Synthesizer.restore(dataset / 'work', config=config, batch_size=4)
  one_mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  one = inference.Synthesizer(four.generator, jax.device_get(four.variables), config,
                              batch_size=4, mesh=one_mesh)
  images = np.random.default_rng(0).uniform(-1, 1, (5, 32, 32, 4)).astype(np.float32)
  np.testing.assert_allclose(one(images, 2), four(images, 2), atol=1e-5)


def _fresh_copy(dataset, tmp_path):
  """The raw phantom cases and a preparation of their slices 10..13 (all in train)."""
  shutil.copytree(dataset / 'raw', tmp_path / 'raw')
  prepare.prepare_dataset(tmp_path / 'raw', tmp_path / 'prepared', image_size=32,
                          slices='range:10:14', split_ratios=(1.0, 0.0, 0.0), progress=False)
  config = eval_config(tmp_path / 'prepared')
  config.data.slices = 'range:10:14'
  return config


@pytest.mark.slow
def test_raw_files_changed_since_preparation_are_not_used_and_named(dataset, tmp_path):
  config = _fresh_copy(dataset, tmp_path)
  changed = sorted((tmp_path / 'raw').glob('*/*_t2.nii.gz'))[0]
  image = nib.load(changed)  # A regenerated raw tree: other voxels under the same name.
  nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * 2, image.affine, image.header), changed)
  messages = []
  report = evaluate.evaluate(config, tmp_path / 'work', step=1, split='train',
                             variables=config_variables(config), batch_size=4,
                             log=messages.append)
  warnings = [m for m in messages if m.startswith('warning: ')]
  assert len(warnings) == 1 and f'{changed} has changed since the preparation' in warnings[0]
  assert warnings[0].startswith(f'warning: {changed.parent.name}: the volume and brasyn')
  assert report['volume_reference'] == 'prepared slices and source files'


def test_a_flipped_shard_or_a_manifest_without_a_subject_is_one_error(dataset, tmp_path):
  config = _fresh_copy(dataset, tmp_path)
  manifest_path = tmp_path / 'prepared' / 'manifest.json'
  manifest = json.loads(manifest_path.read_text())
  original = manifest_path.read_text()
  del manifest['subjects'][sorted(manifest['subjects'])[0]]
  manifest_path.write_text(json.dumps(manifest))
  evaluate_it = lambda: evaluate.evaluate(config, tmp_path / 'work', step=1, split='train',
                                          variables=config_variables(config), batch_size=4,
                                          log=lambda *a: None)
  with pytest.raises(evaluate.EvaluationError, match='manifest.json: no entry for subject'):
    evaluate_it()
  manifest_path.write_text(original)
  shard = next((tmp_path / 'prepared').rglob('*-train.array_record-*'))
  flipped = bytearray(shard.read_bytes())
  flipped[len(flipped) // 3:len(flipped) // 3 + 64] = bytes(64)  # inside a record's chunk
  shard.write_bytes(bytes(flipped))
  with pytest.raises(DataError, match=r'record \d+ of the train split is damaged') as info:
    evaluate_it()
  assert '\n' not in str(info.value) and 'prepare again' in str(info.value)


def test_csv_cells_never_start_a_spreadsheet_formula(tmp_path):
  rows = [{'method': 'model', 'protocol': 'aegan', 'target': 't1', 'subject': name,
           'num_slices': 3, 'source': '', 'psnr': -1.5} for name in ('=1+1', '@SUM(A1)', 'ok')]
  reports.write_csv(rows, tmp_path / 'metrics.csv')
  with open(tmp_path / 'metrics.csv') as f:
    read = list(csv.DictReader(f))
  assert [r['subject'] for r in read] == ["'=1+1", "'@SUM(A1)", 'ok']
  assert read[0]['psnr'] == '-1.5'  # numbers stay numbers
