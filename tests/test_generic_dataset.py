"""Generic datasets: any modality names and count, prepared, trained and checked."""
import json

import nibabel as nib
import numpy as np
import pytest

from aegan_jax import cli
from aegan_jax import job
from data_prep import __main__ as data_prep_main
from data_prep import layouts
from data_prep import phantom
from tests_helpers import launch_config

# Three of the phantom's contrasts under other names, in another order.
NAMES = {'pd': 'flair', 't1': 't1', 't2': 't2'}
MODALITIES = ('t2', 'pd', 't1')
SHAPE = (40, 40, 24)


def write_generic(root, subjects=4, missing=None):
  for index in range(subjects):
    subject = phantom.make_subject(np.random.default_rng([0, index]), SHAPE)
    case = f'case{index:02d}'
    (root / case).mkdir(parents=True)
    for name in MODALITIES:
      if (case, name) == missing:
        continue
      image = nib.Nifti1Image(np.round(subject['volumes'][NAMES[name]]).astype(np.int16),
                              phantom.BRATS_AFFINE)
      nib.save(image, root / case / f'{case}_{name}.nii.gz')
  return root


def prepare(raw, dst, *extra):
  return data_prep_main.main(['--src', str(raw), '--dst', str(dst), '--dataset', 'generic',
                              '--image-size', '32', '--slices', 'range:8:16', '--quiet',
                              *extra])


def test_prepares_any_names_in_the_given_order(tmp_path):
  raw = write_generic(tmp_path / 'raw')
  assert prepare(raw, tmp_path / 'prepared', '--modalities', ','.join(MODALITIES)) == 0
  manifest = json.loads((tmp_path / 'prepared' / 'manifest.json').read_text())
  assert manifest['modalities'] == list(MODALITIES)
  assert manifest['dataset'] == 'generic'


@pytest.mark.parametrize('args,message', [
    ((), '--modalities goes with --dataset generic'),
    (('--modalities', 't1'), 'at least two distinct names'),
    (('--modalities', 't1,T1'), 'at least two distinct names'),
    (('--modalities', 't1,flair'), 'no <case>/<case>_<modality>'),
])
def test_bad_modalities_are_one_line_errors(tmp_path, capsys, args, message):
  raw = tmp_path / 'raw'
  (raw / 'case00').mkdir(parents=True)
  (raw / 'case00' / 'case00_t2.nii.gz').write_bytes(b'')
  assert prepare(raw, tmp_path / 'prepared', *args) == 2
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1, err
  assert not (tmp_path / 'prepared').exists()


def test_one_case_folder_and_the_order_of_names(tmp_path, capsys):
  raw = write_generic(tmp_path / 'raw', subjects=2)
  cases = layouts.find_cases(raw / 'case01', 'generic', MODALITIES)
  assert [c.subject_id for c in cases] == ['case01'] and set(cases[0].files) == set(MODALITIES)
  assert prepare(raw, tmp_path / 'prepared', '--modalities', ','.join(MODALITIES)) == 0
  # Another order is another dataset: never 'up to date'.
  assert prepare(raw, tmp_path / 'prepared', '--modalities', 't1,t2,pd') == 2
  assert 'prepared from other inputs or options' in capsys.readouterr().err


def test_a_missing_modality_file_is_named(tmp_path, capsys):
  raw = write_generic(tmp_path / 'raw', subjects=2, missing=('case01', 'pd'))
  assert prepare(raw, tmp_path / 'prepared', '--modalities', ','.join(MODALITIES)) == 2
  err = capsys.readouterr().err
  assert 'case01_pd.nii.gz' in err and 'missing pd' in err, err


@pytest.mark.slow
@pytest.mark.parametrize('generator', ['official', 'any'])
def test_trains_on_three_modalities(tmp_path, generator):
  raw = write_generic(tmp_path / 'raw')
  config = launch_config(tmp_path / 'prepared', num_steps=2)
  config.data.raw_dir = str(raw)
  config.data.dataset = 'generic'
  config.data.modalities = MODALITIES
  config.data.slices = 'range:8:16'
  config.data.split_ratios = (0.5, 0.25, 0.25)
  config.model.generator = generator
  config.data.scenarios = 'any' if generator == 'any' else 'single'
  state = job.train_and_evaluate(config, tmp_path / 'run')
  assert int(state.step) == 2
  config.data.modalities = ('t2', 'pd', 'flair')
  assert cli.run(config, tmp_path / 'run') == 2  # the prepared data holds other names
