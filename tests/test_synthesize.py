"""Synthesis CLI on tiny phantom cases with a random-init checkpoint."""
import shutil

import jax
import nibabel as nib
import numpy as np
import pytest

from aegan_jax import checkpoints
from aegan_jax import inference
from aegan_jax import models
from aegan_jax import synthesize
from data_prep import files
from data_prep import phantom
from aegan_jax import job
from tests_helpers import (launch_config, prepared_phantom, random_variables, tiny_config,
                           unwritable_folder)

SHAPE = (40, 36, 24)


def synthesis_config(geometry='resize', image_size=32):
  return tiny_config(num_blocks=1, **{'data.image_size': image_size, 'data.geometry': geometry,
                                      'data.slices': 'range:8:16'})


def write_checkpoint(workdir, config, step=1):
  generator, _ = models.build_networks(config.model, len(config.data.modalities))
  checkpoints.save_networks(workdir, step, config,
                            random_variables(generator, config.data.image_size))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp('work')
  write_checkpoint(path, synthesis_config())
  return path


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  path = tmp_path_factory.mktemp('raw')
  phantom.write_phantom_dataset(path, 2, seed=0, shape=SHAPE, layout='brats2020')
  return path


def copy_cases(raw, dst, drop=None):
  """Copies the phantom cases, removing the files of `drop` {case index: [modality tokens]}."""
  shutil.copytree(raw, dst)
  for index, tokens in (drop or {}).items():
    case = sorted(p for p in dst.iterdir() if p.is_dir())[index]
    for token in tokens:
      (case / f'{case.name}_{token}.nii.gz').unlink()
  return dst


def run(*args):
  return synthesize.main([str(a) for a in args])


def test_missing_modality_is_written_on_the_input_grid(workdir, raw, tmp_path, capsys):
  cases = copy_cases(raw, tmp_path / 'in', drop={0: ['t1ce'], 1: ['t1ce']})
  assert run('--workdir', workdir, '--input', cases, '--output', tmp_path / 'out',
             '--batch-size', 6) == 0
  stdout = capsys.readouterr().out
  assert 's/volume' in stdout and '[2/2]' in stdout
  for case in sorted(p for p in cases.iterdir()):
    written = tmp_path / 'out' / case.name / f'{case.name}_t1ce.nii.gz'
    reference = nib.load(case / f'{case.name}_t1.nii.gz')
    image = nib.load(written)
    volume = np.asarray(image.dataobj)
    assert volume.shape == SHAPE and volume.dtype == np.float32
    np.testing.assert_allclose(image.affine, reference.affine)
    brain = np.asarray(reference.dataobj) != 0
    assert np.isfinite(volume).all()
    assert (volume[~brain] == 0).all()
    assert 0 <= volume.min() and volume.max() <= synthesize.INTENSITY_SCALE
    assert volume[brain].std() > 0
  # Only the outputs: no temporary files left behind.
  assert sorted(p.name for p in (tmp_path / 'out').rglob('*') if p.is_file()) == [
      'BraTS20_Training_001_t1ce.nii.gz', 'BraTS20_Training_002_t1ce.nii.gz']


def test_an_any_set_model_fills_every_missing_modality_from_the_present_ones(raw, tmp_path):
  workdir = tmp_path / 'work'
  config = synthesis_config()
  config.model.generator = 'any'
  write_checkpoint(workdir, config)
  cases = copy_cases(raw, tmp_path / 'in', drop={0: ['t1ce', 'flair'], 1: ['t1', 't2', 'flair']})
  assert run('--workdir', workdir, '--input', cases, '--output', tmp_path / 'out') == 0
  written = sorted(p.relative_to(tmp_path / 'out').as_posix()
                   for p in (tmp_path / 'out').rglob('*.nii.gz'))
  assert written == ['BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz',
                     'BraTS20_Training_001/BraTS20_Training_001_t1ce.nii.gz',
                     'BraTS20_Training_002/BraTS20_Training_002_flair.nii.gz',
                     'BraTS20_Training_002/BraTS20_Training_002_t1.nii.gz',
                     'BraTS20_Training_002/BraTS20_Training_002_t2.nii.gz']
  for path in (tmp_path / 'out').rglob('*.nii.gz'):
    volume = np.asarray(nib.load(path).dataobj)
    assert volume.shape == SHAPE and np.isfinite(volume).all() and volume.std() > 0
  # Conditioned on the real inputs only: the same case with a synthetic FLAIR added
  # as if acquired gives a different T1ce.
  case = cases / 'BraTS20_Training_001'
  shutil.copy(tmp_path / 'out' / case.name / f'{case.name}_flair.nii.gz', case)
  assert run('--workdir', workdir, '--input', case, '--output', tmp_path / 'again') == 0
  first, second = (np.asarray(nib.load(folder / case.name / f'{case.name}_t1ce.nii.gz').dataobj)
                   for folder in (tmp_path / 'out', tmp_path / 'again'))
  assert not np.array_equal(first, second)


def _brain_correlation(synthesised, real, slices):
  """Pearson correlation inside the brain, over the axial slices the model trained on."""
  synthesised, real = synthesised[..., slices], real[..., slices]
  brain = real != 0
  return float(np.corrcoef(synthesised[brain], real[brain])[0, 1])


@pytest.mark.slow
def test_a_trained_any_set_model_fills_two_and_three_missing_modalities(raw, tmp_path):
  """A trained checkpoint (not random weights): the volumes it writes follow the real
  ones, where the same network untrained does not."""
  prepared = prepared_phantom(tmp_path / 'train', 8, seed=5, shape=SHAPE,
                              split_ratios=(0.75, 0.125, 0.125))
  config = launch_config(prepared, num_steps=600, checkpoint_every=600,
                         sample_every=600, log_every=100)
  config.model.generator, config.data.scenarios = 'any', 'any'
  config.model.norm, config.optim.learning_rate = 'instance', 1e-3
  job.train_and_evaluate(config, tmp_path / 'trained')
  write_checkpoint(tmp_path / 'untrained', config)
  missing = {0: ['t1ce', 'flair'], 1: ['t1', 't1ce', 'flair']}
  cases = copy_cases(raw, tmp_path / 'in', drop=missing)
  scores = {}
  for name in ('trained', 'untrained'):
    assert run('--workdir', tmp_path / name, '--input', cases, '--output',
               tmp_path / f'out_{name}') == 0
    for index, tokens in missing.items():
      case = sorted(p.name for p in cases.iterdir())[index]
      reference = nib.load(raw / case / f'{case}_t2.nii.gz')
      for token in tokens:
        image = nib.load(tmp_path / f'out_{name}' / case / f'{case}_{token}.nii.gz')
        assert image.shape == reference.shape
        np.testing.assert_allclose(image.affine, reference.affine)
        real = np.asarray(nib.load(raw / case / f'{case}_{token}.nii.gz').dataobj, np.float32)
        scores[name, case, token] = _brain_correlation(np.asarray(image.dataobj), real,
                                                       slice(8, 16))
  gains = [scores['trained', case, token] - scores['untrained', case, token]
           for (name, case, token) in scores if name == 'trained']
  trained = [v for (name, *_), v in scores.items() if name == 'trained']
  # FLAIR, the hardest target from these inputs, reaches ~0.2-0.3 in this small budget.
  assert len(gains) == 5 and min(gains) > 0.1 and np.mean(trained) > 0.5, scores


def test_a_case_without_any_input_is_a_clear_error(raw, tmp_path, capsys):
  workdir = tmp_path / 'work'
  config = synthesis_config()
  config.model.generator = 'any'
  write_checkpoint(workdir, config)
  cases = copy_cases(raw, tmp_path / 'in', drop={0: ['t1', 't1ce', 't2', 'flair'],
                                                  1: ['t1', 't1ce', 't2']})
  assert run('--workdir', workdir, '--input', cases / 'BraTS20_Training_001',
             '--output', tmp_path / 'out') == 2
  assert 'at least one input is needed' in capsys.readouterr().err
  assert run('--workdir', workdir, '--input', cases / 'BraTS20_Training_002',
             '--output', tmp_path / 'out', '--target', 'flair') == 2
  assert 'at least one input is needed' in capsys.readouterr().err


@pytest.mark.slow
def test_one_case_folder_with_pad_geometry_and_brasyn_names(raw, tmp_path):
  workdir = tmp_path / 'work'
  write_checkpoint(workdir, synthesis_config(geometry='pad', image_size=48), step=3)
  cases = copy_cases(raw, tmp_path / 'in', drop={0: ['flair']})
  case = cases / 'BraTS20_Training_001'
  assert run('--workdir', workdir, '--input', case, '--output', tmp_path / 'out',
             '--naming', 'brasyn') == 0
  written = tmp_path / 'out' / 'BraTS20_Training_001-t2f.nii.gz'
  assert np.asarray(nib.load(written).dataobj).shape == SHAPE
  assert [p.name for p in (tmp_path / 'out').iterdir()] == [written.name]


def test_all_targets_and_explicit_target(workdir, raw, tmp_path):
  assert run('--workdir', workdir, '--input', raw / 'BraTS20_Training_002', '--output',
             tmp_path / 'all', '--all-targets', '--naming', 'brasyn') == 0
  assert sorted(p.name for p in (tmp_path / 'all').iterdir()) == [
      f'BraTS20_Training_002-{t}.nii.gz' for t in ('t1c', 't1n', 't2f', 't2w')]
  # Each target's brain mask is the union of the other three inputs.
  case = raw / 'BraTS20_Training_002'
  others = np.any([np.asarray(nib.load(case / f'BraTS20_Training_002_{m}.nii.gz').dataobj) != 0
                   for m in ('t1ce', 't2', 'flair')], axis=0)
  t1 = np.asarray(nib.load(tmp_path / 'all' / 'BraTS20_Training_002-t1n.nii.gz').dataobj)
  assert (t1[~others] == 0).all() and (t1[others] != 0).mean() > 0.9
  assert run('--workdir', workdir, '--input', raw / 'BraTS20_Training_002', '--output',
             tmp_path / 'one', '--target', 't2') == 0
  assert (tmp_path / 'one' / 'BraTS20_Training_002' / 'BraTS20_Training_002_t2.nii.gz').is_file()


def test_brats2023_names_in_the_case_convention(workdir, tmp_path):
  phantom.write_phantom_dataset(tmp_path / 'in', 1, seed=1, shape=SHAPE, layout='brats2023')
  case = tmp_path / 'in' / 'BraTS-GLI-00000-000'
  (case / 'BraTS-GLI-00000-000-t2w.nii.gz').unlink()
  assert run('--workdir', workdir, '--input', case, '--output', tmp_path / 'out') == 0
  assert (tmp_path / 'out' / 'BraTS-GLI-00000-000' / 'BraTS-GLI-00000-000-t2w.nii.gz').is_file()


@pytest.mark.parametrize('drop, extra, message', [
    ({0: ['t1', 't2']}, [], "2 modalities are missing (['t1', 't2'])"),
    ({}, [], 'nothing is missing'),
    ({0: ['t1']}, ['--all-targets'], '--all-targets needs complete cases'),
    ({0: ['t1']}, ['--target', 't2'], "missing ['t1'] besides the target t2"),
])
def test_bad_requests_are_one_line_errors(workdir, raw, tmp_path, capsys, drop, extra, message):
  cases = copy_cases(raw, tmp_path / 'in', drop=drop)
  assert run('--workdir', workdir, '--input', cases / 'BraTS20_Training_001', '--output',
             tmp_path / 'out', *extra) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and message in err and err.count('\n') == 1
  assert not (tmp_path / 'out').exists()


def test_corrupt_file_and_missing_checkpoint(workdir, raw, tmp_path, capsys):
  cases = copy_cases(raw, tmp_path / 'in', drop={0: ['t2']})
  case = cases / 'BraTS20_Training_001'
  (case / 'BraTS20_Training_001_t1.nii.gz').write_bytes(b'not a nifti file')
  assert run('--workdir', workdir, '--input', case, '--output', tmp_path / 'out') == 2
  err = capsys.readouterr().err
  assert 'BraTS20_Training_001_t1.nii.gz: not a readable NIfTI file' in err
  assert run('--workdir', tmp_path / 'empty', '--input', case, '--output', tmp_path / 'out') == 2
  assert 'no checkpoints' in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()


def test_truncated_voxels_leave_no_partial_file(workdir, raw, tmp_path, capsys):
  cases = copy_cases(raw, tmp_path / 'in', drop={0: ['t2']})
  path = cases / 'BraTS20_Training_001' / 'BraTS20_Training_001_flair.nii.gz'
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  assert run('--workdir', workdir, '--input', cases / 'BraTS20_Training_001', '--output',
             tmp_path / 'out') == 2
  assert 'flair.nii.gz: ' in capsys.readouterr().err
  assert not list((tmp_path / 'out').rglob('*.nii.gz')) if (tmp_path / 'out').exists() else True


@pytest.mark.slow
def test_synthesizer_pads_batches_and_matches_direct_apply():
  config = synthesis_config()
  generator, _ = models.build_networks(config.model, 4)
  variables = random_variables(generator, seed=1)
  synth = inference.Synthesizer(generator, variables, config, batch_size=3)
  assert synth.batch_size % jax.device_count() == 0
  images = np.random.default_rng(0).uniform(-1, 1, (5, 32, 32, 4)).astype(np.float32)
  targets = np.array([0, 1, 2, 3, 1])
  from aegan_jax import modalities  # pylint: disable=g-import-not-at-top
  expected = generator.apply(variables, modalities.assemble_generator_input(images, targets),
                             train=False)[..., 0]
  np.testing.assert_allclose(synth(images, targets), expected, atol=1e-5)


def official_mode_synthesizer(norm, use_dropout):
  config = synthesis_config()
  config.model.norm, config.model.use_dropout = norm, use_dropout
  generator, _ = models.build_networks(config.model, 4)
  variables = random_variables(generator, seed=1)
  return lambda official: inference.Synthesizer(generator, variables, config, batch_size=4,
                                                official_test_mode=official)


def test_official_test_mode_normalises_each_slice_alone_with_dropout():
  make = official_mode_synthesizer('batch', use_dropout=True)
  official, eval_mode = make(True), make(False)
  images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 4)).astype(np.float32)
  targets = np.array([0, 1, 2, 3])
  out = official(images, targets)
  np.testing.assert_array_equal(out, official(images, targets))  # seeded: repeatable
  # Batch-mates do not matter (a whole-batch BatchNorm would make them matter) ...
  others = images.copy()
  others[1:] = np.random.default_rng(1).uniform(-1, 1, others[1:].shape)
  np.testing.assert_allclose(official(others, targets)[0], out[0], atol=1e-6)
  # ... but the slice's position draws its dropout mask, and eval mode differs.
  moved = official(images[[1, 0, 2, 3]], targets[[1, 0, 2, 3]])
  assert np.abs(moved[1] - out[0]).max() > 1e-3
  assert np.abs(eval_mode(images, targets) - out).max() > 1e-2


@pytest.mark.slow
def test_official_test_mode_equals_eval_mode_for_instance_norm_without_dropout():
  make = official_mode_synthesizer('instance', use_dropout=False)
  images = np.random.default_rng(0).uniform(-1, 1, (6, 32, 32, 4)).astype(np.float32)
  np.testing.assert_allclose(make(True)(images, 2), make(False)(images, 2), atol=1e-5)


@pytest.mark.parametrize('where', ['same', 'inside', 'parent'])
def test_output_never_overlaps_the_inputs(workdir, raw, tmp_path, capsys, where):
  cases = copy_cases(raw, tmp_path / 'in' / 'cases', drop={0: ['t2']})
  output = {'same': cases, 'inside': cases / 'out', 'parent': tmp_path / 'in'}[where]
  before = sorted(p.name for p in cases.rglob('*'))
  assert run('--workdir', workdir, '--input', cases, '--output', output, '--all-targets') == 2
  err = capsys.readouterr().err
  assert 'overlaps --input' in err and err.count('\n') == 1
  assert sorted(p.name for p in cases.rglob('*')) == before


def test_existing_results_are_kept_unless_overwrite_and_files_get_the_umask_mode(
    workdir, raw, tmp_path, capsys):
  cases = copy_cases(raw, tmp_path / 'in', drop={0: ['t2']})
  case = cases / 'BraTS20_Training_001'
  out = tmp_path / 'out'
  assert run('--workdir', workdir, '--input', case, '--output', out) == 0
  written = out / 'BraTS20_Training_001' / 'BraTS20_Training_001_t2.nii.gz'
  assert written.stat().st_mode & 0o777 == 0o666 & ~files.current_umask()
  written.write_bytes(b'a result of the user')
  capsys.readouterr()
  assert run('--workdir', workdir, '--input', case, '--output', out) == 2
  assert f'{written} exists; pass --overwrite' in capsys.readouterr().err
  assert written.read_bytes() == b'a result of the user'
  assert run('--workdir', workdir, '--input', case, '--output', out, '--overwrite') == 0
  assert nib.load(written).shape == SHAPE


def test_output_that_is_a_file(workdir, raw, tmp_path, capsys):
  cases = copy_cases(raw, tmp_path / 'in', drop={0: ['t2']})
  (tmp_path / 'out').write_text('x')
  assert run('--workdir', workdir, '--input', cases, '--output', tmp_path / 'out') == 2
  assert 'is a file' in capsys.readouterr().err


def test_all_zero_input_is_warned_about(workdir, raw, tmp_path, capsys):
  cases = copy_cases(raw, tmp_path / 'in', drop={0: ['t2']})
  path = cases / 'BraTS20_Training_001' / 'BraTS20_Training_001_t1.nii.gz'
  image = nib.load(path)
  nib.save(nib.Nifti1Image(np.zeros(image.shape, np.int16), image.affine, image.header), path)
  assert run('--workdir', workdir, '--input', cases / 'BraTS20_Training_001', '--output',
             tmp_path / 'out') == 0
  assert f'warning: {path}: every voxel is 0' in capsys.readouterr().err


@pytest.mark.parametrize('official_mode', [False, True])
def test_slices_without_brain_skip_the_generator_and_change_nothing(workdir, official_mode):
  synthesizer = inference.Synthesizer.restore(workdir, batch_size=4,
                                              official_test_mode=official_mode)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (6, 32, 32, 4)).astype(np.float32)
  brain = np.zeros((20, 20, 6), bool)
  brain[5:15, 5:15, [1, 2, 4]] = True  # slices 0, 3 and 5 hold no brain
  seen = []
  counting = lambda x, t, positions=None, available=None: (
      seen.append(len(x)) or synthesizer(x, t, positions, available))
  counting.config = synthesizer.config
  skipped = synthesize.synthesize_brain_slices(counting, images, 't2', brain)
  assert seen == [3]
  full = synthesizer(images, 2)
  np.testing.assert_array_equal(skipped[[1, 2, 4]], full[[1, 2, 4]])
  config = synthesizer.config.data
  np.testing.assert_array_equal(synthesize.postprocess(skipped, brain, config),
                                synthesize.postprocess(full, brain, config))


def test_a_case_named_dot_dot_never_writes_outside_the_output(workdir, raw, tmp_path, capsys):
  case = sorted(p for p in raw.iterdir() if p.is_dir())[0]
  tree = tmp_path / 'mf'
  for token in ('t1', 't1ce', 't2'):  # modality-first files that would make a case '..'
    (tree / token).mkdir(parents=True)
    shutil.copy(case / f'{case.name}_{token}.nii.gz', tree / token / f'.._{token}.nii.gz')
  out = tmp_path / 'out' / 'inner'
  assert run('--workdir', workdir, '--input', tree, '--output', out) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1, err
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('scale', ['nan', '-1000', '0', 'inf'])
def test_intensity_scale_must_be_positive_and_finite(workdir, raw, tmp_path, capsys, scale):
  cases = copy_cases(raw, tmp_path / 'in', drop={0: ['t2']})
  assert run('--workdir', workdir, '--input', cases / 'BraTS20_Training_001', '--output',
             tmp_path / 'out', '--intensity-scale', scale) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: --intensity-scale {float(scale)}: must be a positive finite')
  assert err.count('\n') == 1 and not (tmp_path / 'out').exists()


@pytest.mark.parametrize('blocked', ['file', 'readonly'])
def test_unwritable_output_is_refused_before_the_checkpoint_is_restored(
    workdir, raw, tmp_path, capsys, monkeypatch, blocked):
  cases = copy_cases(raw, tmp_path / 'in', drop={0: ['t2']})
  out = unwritable_folder(tmp_path, blocked, 'results')
  restored = []
  monkeypatch.setattr(inference.Synthesizer, 'restore', lambda *a, **k: restored.append(1))
  assert run('--workdir', workdir, '--input', cases, '--output', out) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: --output {out}: cannot write there') and err.count('\n') == 1
  assert not restored


def test_brasyn_folders_get_exactly_their_missing_file_flat(workdir, tmp_path):
  # BraSyn 2023+: one folder per case with the three acquired sequences named
  # <case>-t1n/-t1c/-t2w/-t2f (any case name); the output folder gets the missing files only.
  phantom.write_phantom_dataset(tmp_path / 'gen', 3, seed=2, shape=SHAPE, layout='brats2023')
  cases = tmp_path / 'in'
  missing = {'BraTS-GLI-00000-000': 't2f', 'BraTS-GLI-00001-000': 't1n', 'site3-case042': 't1c'}
  for folder, (case, token) in zip(sorted((tmp_path / 'gen').iterdir()), missing.items()):
    (cases / case).mkdir(parents=True)
    for path in folder.iterdir():
      if not path.name.endswith((f'-{token}.nii.gz', '-seg.nii.gz')):
        shutil.copy(path, cases / case / path.name.replace(folder.name, case))
  assert run('--workdir', workdir, '--input', cases, '--output', tmp_path / 'out',
             '--naming', 'brasyn') == 0
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == sorted(
      f'{case}-{token}.nii.gz' for case, token in missing.items())
  for case in missing:
    reference = nib.load(next((cases / case).iterdir()))
    written = nib.load(tmp_path / 'out' / f'{case}-{missing[case]}.nii.gz')
    assert written.shape == reference.shape == SHAPE
    np.testing.assert_array_equal(written.affine, reference.affine)
