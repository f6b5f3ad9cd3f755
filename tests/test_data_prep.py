"""Discovery, validation, preprocessing and the data_prep CLI."""
import gzip
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from data_prep import files
from data_prep import layouts
from data_prep import manifest as manifest_lib
from data_prep import nifti
from data_prep import phantom
from data_prep import prepare
from data_prep import preprocess
from data_prep import tfds_writer
from data_prep.errors import DataError
from tests_helpers import unwritable_folder

SHAPE = (16, 16, 8)
OLD = ('t1', 't1ce', 't2', 'flair', 'seg')
NEW = ('t1n', 't1c', 't2w', 't2f', 'seg')
FAST = dict(slices='range:2:6', image_size=16, progress=False)


def _volume(seed, shape=SHAPE, dtype=np.int16):
  rng = np.random.default_rng(seed)
  vol = np.zeros(shape, np.float32)
  vol[3:-3, 3:-3, 1:-1] = rng.uniform(50, 1000, (shape[0] - 6, shape[1] - 6,
                                                  shape[2] - 2))
  return vol.astype(dtype)


def _write(path, data=None, affine=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  data = _volume(hash(path.name) % 1000) if data is None else data
  nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine),
           path)
  return path


def _subject(folder, name, sep, tokens, ext='.nii.gz'):
  for token in tokens:
    _write(folder / name / f'{name}{sep}{token}{ext}')


def _brats2020(root, count=3):
  for i in range(count):
    _subject(root, f'BraTS20_Training_{i + 1:03d}', '_', OLD)
  return root


def _tree(kind, root):
  """Builds a tiny raw tree; returns (expected layout, subjects, with seg)."""
  if kind == 'brats2018':
    _subject(root / 'HGG', 'Brats18_2013_2_1', '_', OLD)
    _subject(root / 'LGG', 'Brats18_TCIA09_1', '_', OLD)
    return 'brats2018', 2
  if kind == 'brats2019':
    _subject(root / 'HGG', 'BraTS19_2013_2_1', '_', OLD)
    _subject(root / 'LGG', 'BraTS19_TCIA09_1', '_', OLD, ext='.nii')
    return 'brats2019', 2
  if kind == 'brats2020':
    _brats2020(root, 3)
    return 'brats2020', 3
  if kind == 'brats2021':
    for i in range(2):
      _subject(root, f'BraTS2021_{i:05d}', '_', OLD)
    return 'brats2021', 2
  if kind == 'brats2023':
    _subject(root, 'BraTS-GLI-00000-000', '-', NEW)
    _subject(root, 'BraTS-MET-00001-000', '-', NEW[:4])  # validation: no seg
    _subject(root, 'BraTS-PED-00002-000', '-', NEW, ext='.nii')
    return 'brats2023', 3
  if kind == 'modality_first':
    for modality in ('flair', 't1', 't1ce', 't2'):
      for subject in ('case_a', 'case_b'):
        _write(root / modality / f'{subject}.nii.gz')
    return 'modality_first', 2
  if kind == 'isles2015':
    for subject, base in (('1', 70600), ('2', 70700)):
      for j, token in enumerate(('MR_T1', 'MR_T2', 'MR_Flair', 'MR_DWI', 'OT')):
        name = f'VSD.Brain.XX.O.{token}.{base + j}'
        _write(root / 'Training' / subject / name / f'{name}.nii')
    return 'isles2015', 2
  raise ValueError(kind)


LAYOUTS = ('brats2018', 'brats2019', 'brats2020', 'brats2021', 'brats2023',
           'modality_first', 'isles2015')


@pytest.mark.parametrize('kind', LAYOUTS)
def test_layout_detected(tmp_path, kind):
  layout, count = _tree(kind, tmp_path)
  cases = layouts.find_cases(tmp_path)
  assert [c.layout for c in cases] == [layout] * count
  for case in cases:
    assert set(case.files) == set(case.modalities), case
    for modality, path in case.files.items():
      assert case.path_for(modality) == path
  if kind == 'isles2015':
    assert cases[0].modalities == ('t1', 't2', 'flair', 'dwi')
    assert cases[0].seg is not None
  else:
    assert cases[0].modalities == ('t1', 't1ce', 't2', 'flair')


def test_file_names_follow_layout(tmp_path):
  _tree('brats2023', tmp_path / 'a')
  _tree('brats2020', tmp_path / 'b')
  new = layouts.find_cases(tmp_path / 'a')[0]
  old = layouts.find_cases(tmp_path / 'b')[0]
  assert new.filename_for('flair') == 'BraTS-GLI-00000-000-t2f.nii.gz'
  assert old.filename_for('t1ce') == 'BraTS20_Training_001_t1ce.nii.gz'
  assert layouts.find_cases(tmp_path / 'a')[1].seg is None
  _tree('modality_first', tmp_path / 'c')
  assert layouts.find_cases(tmp_path / 'c')[0].filename_for('t2') == 'case_a.nii.gz'


def test_modality_first_with_modality_in_file_names(tmp_path):
  for modality in ('flair', 't1', 't1ce', 't2', 'seg'):
    for subject in ('BraTS20_Training_001', 'BraTS20_Training_002'):
      _write(tmp_path / modality / f'{subject}_{modality}.nii.gz')
  cases = layouts.find_cases(tmp_path)
  assert [c.subject_id for c in cases] == ['BraTS20_Training_001',
                                           'BraTS20_Training_002']
  assert all(len(c.files) == 4 and c.seg is not None for c in cases)
  assert cases[0].filename_for('t1ce') == 'BraTS20_Training_001_t1ce.nii.gz'


def _leftovers(dst):
  return [p.name for p in dst.parent.iterdir() if p.name.startswith(f'.{dst.name}')]


def _expect_error(src, dst, match, **kwargs):
  with pytest.raises(DataError, match=match) as info:
    prepare.prepare_dataset(src, dst, **{**FAST, **kwargs})
  assert '\n' not in str(info.value)
  assert not dst.exists() and not _leftovers(dst)
  return str(info.value)


def _corrupt(path):
  path.write_bytes(b'this is not a nifti file' * 10)


def _truncate(path):
  raw = gzip.decompress(path.read_bytes())
  path.write_bytes(gzip.compress(raw[:len(raw) // 2]))


def _reshape(path):
  _write(path, _volume(1, (16, 16, 7)))


def _shift(path):
  affine = np.eye(4)
  affine[0, 3] = 2.0
  _write(path, _volume(1), affine)


def _nan(path):
  data = _volume(1).astype(np.float32)
  data[8, 8, 4] = np.nan
  _write(path, data)


def _zero(path):
  _write(path, np.zeros(SHAPE, np.int16))


def _huge_header(path):
  """A header claiming 2**31 voxels over a few bytes of data: refused before allocating."""
  image = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
  image.header.set_data_shape((2048, 2048, 512))
  data = image.header.binaryblock + b'\0' * (352 - 348) + b'\0' * 64
  path.write_bytes(gzip.compress(data))


@pytest.mark.parametrize('damage,reason', [
    (lambda p: p.unlink(), 'missing t2'),
    (_corrupt, 'not a readable NIfTI'),
    (_truncate, 'cannot read voxel data'),
    (_reshape, r'shape \(16, 16, 7\) differs from t1 \(16, 16, 8\)'),
    (_shift, 'affine differs from t1'),
    (_nan, 'NaN'),
    (_zero, 'every voxel is 0'),
    (_huge_header, r'header claims shape \(2048, 2048, 512\)'),
])
def test_bad_subject_fails_cleanly(tmp_path, damage, reason):
  src = _brats2020(tmp_path / 'raw')
  bad = src / 'BraTS20_Training_002' / 'BraTS20_Training_002_t2.nii.gz'
  damage(bad)
  message = _expect_error(src, tmp_path / 'out', reason)
  assert message.startswith(str(bad))
  report = prepare.prepare_dataset(src, tmp_path / 'out', skip_bad=True,
                                   **FAST)
  assert [s['subject_id'] for s in report['skipped']] == ['BraTS20_Training_002']
  assert report['subjects'] == 2


def test_interrupt_leaves_nothing(tmp_path, monkeypatch):
  src = _brats2020(tmp_path / 'raw', 2)
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(prepare, 'load_subject', interrupted)
  dst = tmp_path / 'out'
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare_dataset(src, dst, **FAST)
  assert not dst.exists() and not _leftovers(dst)


def test_official_slice_needs_depth(tmp_path):
  src = _brats2020(tmp_path / 'raw', 1)
  _expect_error(src, tmp_path / 'out', 'BraTS20_Training_001_t1.nii.gz: '
                'volume depth 8 has no slice 78', slices='official')


@pytest.mark.parametrize('kind', ['isles2015', 'modality_first', 'brats2023'])
def test_prepare_other_layouts(tmp_path, kind):
  from aegan_jax import data  # pylint: disable=g-import-not-at-top
  _tree(kind, tmp_path / 'raw')
  dst = tmp_path / 'out'
  report = prepare.prepare_dataset(tmp_path / 'raw', dst, split_ratios=(1, 0, 0),
                                   **FAST)
  manifest = manifest_lib.load_manifest(dst)
  expected = layouts.find_cases(tmp_path / 'raw')[0].modalities
  assert manifest['modalities'] == list(expected)
  assert report['slices'] == 4 * report['subjects']
  example = next(data.iterate_split(dst, 'train'))
  assert example['images'].shape == (16, 16, 4)
  assert ('seg' in example) == (kind != 'modality_first')


def test_empty_and_unknown_folders(tmp_path):
  (tmp_path / 'empty').mkdir()
  _expect_error(tmp_path / 'empty', tmp_path / 'out', 'empty')
  _write(tmp_path / 'odd' / 'scans' / 'brain.nii.gz')
  _expect_error(tmp_path / 'odd', tmp_path / 'out', 'no BraTS or ISLES2015')
  _expect_error(tmp_path / 'nowhere', tmp_path / 'out', 'no such directory')


@pytest.mark.parametrize('method', preprocess.NORMALISATIONS)
def test_pad_round_trip_is_exact(method):
  vol = _volume(3).astype(np.float32)
  normed, params = preprocess.normalise_volume(vol, method)
  fill = preprocess.background_value(method)
  assert (normed[vol == 0] == fill).all()
  indices = list(range(SHAPE[2]))
  slices = preprocess.volume_to_slices(normed, indices, 'pad', 21, fill)
  assert slices.shape == (SHAPE[2], 21, 21)
  rebuilt = preprocess.slices_to_volume(slices, SHAPE, indices, 'pad', fill)
  np.testing.assert_array_equal(rebuilt, normed)
  back = preprocess.denormalise(rebuilt, params)
  if method != 'percentile':  # percentile clips the tails
    np.testing.assert_allclose(back, vol, rtol=1e-5, atol=1e-2)


def test_resize_is_bilinear_and_shape_preserving():
  ramp = np.tile(np.arange(8, dtype=np.float32), (8, 1))
  up = preprocess.resize_bilinear(ramp, (16, 16))
  assert up.shape == (16, 16)
  np.testing.assert_allclose(up[0, 1:-1], (np.arange(1, 15) - 0.5) / 2)
  np.testing.assert_allclose(preprocess.resize_bilinear(ramp, (8, 8)), ramp)


def test_prepared_pad_slices_rebuild_volume(tmp_path):
  from aegan_jax import data  # pylint: disable=g-import-not-at-top
  src = _brats2020(tmp_path / 'raw', 2)
  dst = tmp_path / 'out'
  prepare.prepare_dataset(src, dst, geometry='pad', image_size=20,
                          slices='range:0:8', split_ratios=(1, 0, 0),
                          progress=False)
  manifest = manifest_lib.load_manifest(dst)
  entry = manifest['subjects']['BraTS20_Training_001']
  slices = [e['images'] for e in data.iterate_split(dst, 'train')
            if e['subject_id'] == 'BraTS20_Training_001']
  for m, modality in enumerate(manifest['modalities']):
    rebuilt = preprocess.slices_to_volume(
        np.stack(slices)[..., m], entry['shape'], entry['slices'], 'pad',
        manifest['background_value'])
    vol = nib.load(entry['files'][modality]).get_fdata(dtype=np.float32)
    expected, params = preprocess.normalise_volume(vol, 'max')
    assert params == entry['normalisation'][modality]
    # Exact up to the float16 storage.
    np.testing.assert_array_equal(rebuilt, expected.astype(np.float16))


def test_split_is_disjoint_and_complete(tmp_path):
  ids = [f's{i:03d}' for i in range(50)]
  splits = prepare.assign_splits(ids, (0.8, 0.1, 0.1), seed=0)
  assert sorted(splits) == ids
  assert [sum(v == s for v in splits.values()) for s in manifest_lib.SPLITS] == [40, 5, 5]
  assert splits == prepare.assign_splits(ids, (0.8, 0.1, 0.1), seed=0)
  assert splits != prepare.assign_splits(ids, (0.8, 0.1, 0.1), seed=1)


def test_split_sources_and_rerun(tmp_path):
  from aegan_jax import data  # pylint: disable=g-import-not-at-top
  train = _brats2020(tmp_path / 'train', 2)
  test = tmp_path / 'test'
  _subject(test, 'BraTS20_Validation_001', '_', OLD[:4])
  dst = tmp_path / 'out'
  kwargs = dict(split_sources={'train': train, 'test': test}, **FAST)
  report = prepare.prepare_dataset(None, dst, **kwargs)
  assert report['splits']['train']['subjects'] == 2
  seen = {s: {e['subject_id'] for e in data.iterate_split(dst, s)}
          for s in manifest_lib.SPLITS}
  assert seen['test'] == {'BraTS20_Validation_001'}
  assert not seen['train'] & seen['test']
  assert 'seg' not in next(data.iterate_split(dst, 'test'))
  assert prepare.prepare_dataset(None, dst, **kwargs)['up_to_date']
  with pytest.raises(DataError, match='other inputs or options'):
    prepare.prepare_dataset(None, dst, **{**kwargs, 'normalise': 'zscore'})
  report = prepare.prepare_dataset(None, dst, overwrite=True,
                                   **{**kwargs, 'normalise': 'zscore'})
  assert manifest_lib.load_manifest(dst)['options']['normalise'] == 'zscore'
  assert not _leftovers(dst)


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'data_prep', *map(str, args)],
                        capture_output=True, text=True, timeout=60,
                        cwd=pathlib.Path(__file__).resolve().parents[1])


def test_cli_smoke(tmp_path):
  phantom.write_phantom_dataset(tmp_path / 'raw', 4, seed=0, shape=(24, 24, 16),
                                layout='brats2023')
  dst = tmp_path / 'prepared'
  args = ('--src', tmp_path / 'raw', '--dst', dst, '--slices', 'nonempty:0.2',
          '--image-size', 32, '--workers', 2)
  run = _cli(*args)
  assert run.returncode == 0, run.stderr
  assert 'prepared 4 subjects' in run.stdout and 'slices/s' in run.stdout
  manifest = json.loads((dst / 'manifest.json').read_text())
  assert manifest['options']['slices'] == 'nonempty:0.2'
  assert sum(s['subjects'] for s in manifest['splits'].values()) == 4
  assert 'up to date' in _cli(*args).stdout
  (tmp_path / 'empty').mkdir()
  run = _cli('--src', tmp_path / 'empty', '--dst', tmp_path / 'x')
  assert run.returncode == 2
  assert run.stderr.strip() == f'error: {tmp_path / "empty"}: folder is empty'


@pytest.mark.parametrize('where', ['same', 'parent', 'inside'])
def test_dst_overlapping_the_raw_data_is_refused_and_nothing_is_deleted(tmp_path, where):
  src = _brats2020(tmp_path / 'p' / 'raw', 2)
  (tmp_path / 'p' / 'notes.txt').write_text('keep me')
  dst = {'same': src, 'parent': tmp_path / 'p', 'inside': src / 'prepared'}[where]
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*'))
  with pytest.raises(DataError, match='overlaps the raw data'):
    prepare.prepare_dataset(src, dst, overwrite=True, **FAST)
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*')) == before


def test_overwrite_replaces_only_a_prepared_dataset(tmp_path):
  src = _brats2020(tmp_path / 'raw', 2)
  dst = tmp_path / 'out'
  dst.mkdir()
  (dst / 'thesis.tex').write_text('keep me')
  with pytest.raises(DataError, match='holds no prepared dataset'):
    prepare.prepare_dataset(src, dst, overwrite=True, **FAST)
  assert (dst / 'thesis.tex').read_text() == 'keep me'


def test_symlinked_case_folders_are_found(tmp_path):
  src = _brats2020(tmp_path / 'store', 2)
  links = tmp_path / 'links'
  links.mkdir()
  for case in sorted(src.iterdir()):
    (links / case.name).symlink_to(case, target_is_directory=True)
  (links / 'loop').symlink_to(links, target_is_directory=True)
  assert [c.subject_id for c in layouts.find_cases(links)] == sorted(
      p.name for p in src.iterdir())


def test_nifti_reader_raises_the_callers_error_type(tmp_path):
  class CallerError(ValueError):
    pass
  path = _write(tmp_path / 'a.nii.gz')
  image, shape = nifti.load_header(path)
  assert shape == SHAPE
  np.testing.assert_array_equal(nifti.read_voxels(path, shape), _volume(hash('a.nii.gz') % 1000))
  _corrupt(path)
  with pytest.raises(CallerError, match=f'^{re.escape(str(path))}: not a readable NIfTI file'):
    nifti.load_header(path, CallerError)
  with pytest.raises(DataError, match=f'^{re.escape(str(path))}: cannot read voxel data'):
    nifti.read_voxels(path, SHAPE)


def test_data_prep_imports_nothing_from_aegan_jax():
  # aegan_jax builds on data_prep (layouts, nifti, preprocess, prepare); the reverse
  # would be an import cycle between the two packages.
  code = ('import sys, data_prep.__main__, data_prep.layouts, data_prep.nifti, '
          'data_prep.phantom, data_prep.prepare, data_prep.preprocess; '
          'print(sorted(m for m in sys.modules if m.startswith("aegan_jax")))')
  run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       timeout=60, cwd=pathlib.Path(__file__).resolve().parents[1])
  assert run.returncode == 0 and run.stdout.strip() == '[]', run.stderr


def test_brats_file_names_come_from_one_token_table():
  assert layouts.brats_file_name('brats2023', 'BraTS-GLI-00000-000', 'flair') == \
      'BraTS-GLI-00000-000-t2f.nii.gz'
  assert layouts.brats_file_name('brats2020', 'BraTS20_Training_001', 't1ce', '.nii') == \
      'BraTS20_Training_001_t1ce.nii'


# ---------------------------------------------------------------- case finding


def _modality_first(root, subjects, prefix=''):
  for modality in ('flair', 't1', 't1ce', 't2'):
    for subject in subjects:
      _write(root / modality / f'{prefix}{subject}_{modality}.nii.gz')
  return root


def test_modality_first_dotfiles_are_skipped_and_ids_must_be_plain_names(tmp_path):
  root = _modality_first(tmp_path / 'mf', ['case_a', 'case_b'])
  for modality in ('flair', 't1', 't1ce', 't2'):  # macOS resource forks: not NIfTI at all
    (root / modality / f'._case_a_{modality}.nii.gz').write_bytes(b'\0\5\x16\7 Mac OS X')
    _write(root / modality / f'.._{modality}.nii.gz')  # would be a case named '..'
  assert [c.subject_id for c in layouts.find_cases(root)] == ['case_a', 'case_b']
  # A name that strips to nothing is not a subject id either.
  _write(root / 't1' / '_t1.nii.gz')
  with pytest.raises(DataError, match=r"_t1.nii.gz: subject id '' is not a plain name"):
    layouts.find_cases(root)


def _generic(root, cases, names=('t1', 't2')):
  for case in cases:
    for name in names:
      _write(root / case / f'{case}_{name}.nii.gz')
  return root


def test_generic_root_file_never_hides_the_case_folders(tmp_path, capsys):
  root = _generic(tmp_path / 'raw', ['c1', 'c2'])
  backup = _write(root / 'raw_t1_backup.nii.gz')  # not a modality: not a case file
  assert [c.subject_id for c in layouts.find_cases(root, 'generic', ('t1', 't2'))] == ['c1', 'c2']
  backup.unlink()
  stray = _write(root / 'raw_t1.nii.gz')
  with pytest.raises(DataError, match=f'^{re.escape(str(stray))}: a case file directly in'):
    layouts.find_cases(root, 'generic', ('t1', 't2'))
  stray.unlink()
  # A case folder without any matching file is skipped, not silently.
  _write(root / 'c3' / 'scan.nii.gz')
  assert [c.subject_id for c in layouts.find_cases(root, 'generic', ('t1', 't2'))] == ['c1', 'c2']
  assert f'warning: {root / "c3"}: no c3_<t1|t2>.nii[.gz] file; skipped' in capsys.readouterr().err


@pytest.mark.parametrize('first,second', [('x_t1.nii', 'x_t1.nii.gz'), ('x_T1.nii.gz', 'x_t1.nii.gz')])
def test_two_files_for_one_modality_are_refused_naming_both(tmp_path, first, second):
  root = _generic(tmp_path / 'raw', ['x'], names=('t2',))
  _write(root / 'x' / first)
  _write(root / 'x' / second)
  with pytest.raises(DataError, match='two files for t1 of subject x') as info:
    layouts.find_cases(root, 'generic', ('t1', 't2'))
  assert first in str(info.value) and second in str(info.value)
  brats = _brats2020(tmp_path / 'brats', 1)
  case = brats / 'BraTS20_Training_001'
  _write(case / 'BraTS20_Training_001_T2.nii')
  with pytest.raises(DataError, match='two files for t2 of subject BraTS20_Training_001'):
    layouts.find_cases(brats)


# ----------------------------------------------------------------- values


def test_max_normalisation_stays_in_the_tanh_range():
  vol = _volume(2).astype(np.float32)
  vol[5, 5, 3] = -200.0  # interpolation ringing below 0
  normed, _ = preprocess.normalise_volume(vol, 'max')
  assert normed.min() >= -1.0 and normed.max() <= 1.0
  assert normed[5, 5, 3] == -1.0


SMALL = ('--slices', 'range:2:6', '--image-size', '16')


@pytest.mark.parametrize('args,message', [
    (('--split-seed', '-1', *SMALL), '--split-seed -1: must be a non-negative integer'),
    (('--split-ratios', 'nan,1,1', *SMALL), '--split-ratios nan,1.0,1.0: expected three '
                                            'non-negative finite numbers'),
    (('--split-ratios', 'inf,1,1', *SMALL), '--split-ratios inf,1.0,1.0: expected three'),
    (('--image-size', '100000'), '--image-size 100000: must be from 1 to 4096'),
])
def test_bad_options_are_one_line_errors(tmp_path, args, message):
  src = _brats2020(tmp_path / 'raw', 3)
  run = _cli('--src', src, '--dst', tmp_path / 'out', '--quiet', *args)
  assert run.returncode == 2 and run.stderr.startswith(f'error: {message}'), run.stderr
  assert run.stderr.count('\n') == 1 and not (tmp_path / 'out').exists()


# ------------------------------------------------- the destination: nothing lost


def test_a_folder_made_at_dst_during_preparation_is_never_replaced(tmp_path, monkeypatch):
  src = _brats2020(tmp_path / 'raw', 2)
  dst = tmp_path / 'out'
  write = tfds_writer.write_tfds

  def user_creates_dst(plan, out_dir):
    write(plan, out_dir)
    dst.mkdir()
    (dst / 'notes.txt').write_text('keep me')

  monkeypatch.setattr(tfds_writer, 'write_tfds', user_creates_dst)
  with pytest.raises(DataError, match=f'^{re.escape(str(dst))} is not empty and holds no '
                                      'prepared dataset'):
    prepare.prepare_dataset(src, dst, overwrite=True, **FAST)
  assert [p.name for p in dst.iterdir()] == ['notes.txt']
  assert (dst / 'notes.txt').read_text() == 'keep me' and not _leftovers(dst)


def test_concurrent_preparations_of_one_dst_are_serialised(tmp_path, monkeypatch):
  src = _brats2020(tmp_path / 'raw', 2)
  dst = tmp_path / 'out'
  write, second = tfds_writer.write_tfds, []

  def another_preparation_meanwhile(plan, out_dir):
    if not second:
      second.append('started')
      with pytest.raises(DataError, match=f'--dst {re.escape(str(dst))} is being prepared by '
                                          f'PID {os.getpid()}'):
        prepare.prepare_dataset(src, dst, **{**FAST, 'normalise': 'zscore'})
    write(plan, out_dir)

  monkeypatch.setattr(tfds_writer, 'write_tfds', another_preparation_meanwhile)
  prepare.prepare_dataset(src, dst, **FAST)
  assert second and manifest_lib.load_manifest(dst)['options']['normalise'] == 'max'
  assert not _leftovers(dst)


def test_prepared_folder_gets_the_mode_of_a_plain_mkdir(tmp_path):
  src = _brats2020(tmp_path / 'raw', 2)
  prepare.prepare_dataset(src, tmp_path / 'out', **FAST)
  assert (tmp_path / 'out').stat().st_mode & 0o777 == 0o777 & ~files.current_umask()


def test_leftovers_of_a_killed_preparation_are_removed_by_the_next(tmp_path):
  src = _brats2020(tmp_path / 'raw', 2)
  dst = tmp_path / 'out'
  killed = ('import os, signal, sys; from data_prep import prepare, tfds_writer\n'
            'def die(plan, out_dir):\n'
            '  (out_dir / "half.bin").write_bytes(b"x")\n'
            '  os.kill(os.getpid(), signal.SIGKILL)\n'
            'tfds_writer.write_tfds = die\n'
            f'prepare.prepare_dataset({str(src)!r}, {str(dst)!r}, slices="range:2:6", '
            'image_size=16, progress=False)\n')
  run = subprocess.run([sys.executable, '-c', killed], capture_output=True, timeout=120,
                       cwd=pathlib.Path(__file__).resolve().parents[1])
  assert run.returncode == -signal.SIGKILL
  assert _leftovers(dst)  # kill -9 skips every clean-up
  prepare.prepare_dataset(src, dst, **FAST)
  assert not _leftovers(dst) and (dst / 'manifest.json').is_file()


@pytest.mark.parametrize('blocked', ['file', 'readonly'])
def test_unwritable_dst_is_a_one_line_error_before_any_work(tmp_path, blocked):
  src = _brats2020(tmp_path / 'raw', 2)
  dst = unwritable_folder(tmp_path, blocked, 'data')
  run = _cli('--src', src, '--dst', dst, '--quiet', *map(str, ('--slices', 'range:2:6')))
  assert run.returncode == 2 and run.stderr.startswith(f'error: --dst {dst}: cannot write'), \
      run.stderr
  assert run.stderr.count('\n') == 1
