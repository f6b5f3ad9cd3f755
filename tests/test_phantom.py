"""The synthetic BraTS-like phantom."""
import nibabel as nib
import numpy as np
import pytest

from configs import demo
from data_prep import layouts
from data_prep import phantom

SMALL = (32, 32, 24)


@pytest.fixture(scope='module')
def subject():
  return phantom.make_subject(np.random.default_rng(3), (72, 72, 48))


def _files(folder):
  return sorted(p for p in folder.rglob('*.nii.gz'))


def test_deterministic_bytes(tmp_path):
  a = phantom.write_phantom_dataset(tmp_path / 'a', 2, seed=5, shape=SMALL)
  b = phantom.write_phantom_dataset(tmp_path / 'b', 2, seed=5, shape=SMALL)
  phantom.write_phantom_dataset(tmp_path / 'c', 2, seed=6, shape=SMALL)
  for fa, fb, fc in zip(_files(tmp_path / 'a'), _files(tmp_path / 'b'),
                        _files(tmp_path / 'c')):
    assert fa.read_bytes() == fb.read_bytes(), fa
    if 'seg' not in fa.name:
      assert fa.read_bytes() != fc.read_bytes(), fa
  assert [p.name for p in a] == [p.name for p in b]


def test_contrast_follows_mri_physics(subject):
  tissue, volumes = subject['tissue'], subject['volumes']
  def mean(modality, tissue_index):
    return volumes[modality][tissue == tissue_index].mean()
  csf, gm, wm, edema = phantom.CSF, phantom.GM, phantom.WM, phantom.EDEMA
  assert mean('t1', wm) > mean('t1', gm) > mean('t1', csf)
  assert mean('t2', csf) > mean('t2', gm) > mean('t2', wm)
  assert mean('flair', csf) < mean('flair', wm)
  assert mean('flair', edema) > mean('flair', gm)
  assert mean('t2', edema) > mean('t2', wm)
  enhancing = phantom.ENHANCING
  assert (mean('t1ce', enhancing) / mean('t1ce', wm) >
          mean('t1', enhancing) / mean('t1', wm) * 1.5)


def test_background_is_exactly_zero(subject):
  brain = subject['brain']
  for volume in subject['volumes'].values():
    assert (volume[~brain] == 0).all()
    assert (volume[brain] > 0).all()
  assert 0.1 < brain.mean() < 0.5  # BraTS: ~16% of the volume
  assert (subject['tumour'][~brain] == 0).all()


def test_most_subjects_have_tumours():
  rng = np.random.default_rng(0)
  with_tumour = sum(
      (phantom.make_subject(rng, SMALL)['tumour'] > 0).any() for _ in range(12))
  assert with_tumour >= 7


@pytest.mark.parametrize('layout,label', [('brats2020', 4), ('brats2023', 3)])
def test_written_layout_is_detected(tmp_path, layout, label):
  phantom.write_phantom_dataset(tmp_path, 3, seed=0, shape=SMALL, layout=layout)
  cases = layouts.find_cases(tmp_path)
  assert [c.layout for c in cases] == [layout] * 3
  case = cases[0]
  assert set(case.files) == {'t1', 't1ce', 't2', 'flair'}
  image = nib.load(case.files['t1'])
  assert image.shape == SMALL and image.get_data_dtype() == np.int16
  assert np.allclose(np.abs(np.diag(image.affine))[:3], 1)
  labels = set(np.unique(np.asarray(nib.load(case.seg).dataobj)).tolist())
  assert labels <= {0, 1, 2, label}
  assert phantom.subject_id(layout, 0) == case.subject_id


# --------------------------------------------------------------------------
# Real anatomy: the ICBM 2009 template (nilearn's copy).


@pytest.fixture(scope='module')
def anatomical():
  from data_prep import icbm152  # pylint: disable=g-import-not-at-top
  return icbm152.make_subject(np.random.default_rng([0, 1]), (120, 120, 78))


def test_anatomical_contrasts_follow_mri_physics(anatomical):
  tissue, volumes = anatomical['tissue'], anatomical['volumes']
  def mean(modality, tissue_index):
    return volumes[modality][tissue == tissue_index].mean()
  csf, gm, wm = phantom.CSF, phantom.GM, phantom.WM
  assert mean('t1', wm) > mean('t1', gm) > mean('t1', csf)
  assert mean('t2', csf) > mean('t2', gm) > mean('t2', wm)
  assert mean('flair', csf) < mean('flair', wm)
  brain = anatomical['brain']
  for volume in volumes.values():
    assert (volume[~brain] == 0).all() and (volume[brain] > 0).all()
  assert 0.1 < brain.mean() < 0.4
  assert set(np.unique(anatomical['tumour']).tolist()) <= {0, 1, 2, 3}


def test_anatomical_slices_have_folded_cortex(anatomical):
  # Sulci: in a slice through the upper brain, CSF fills many separate clefts between the
  # gyri, and the white matter reaches into each gyrus: its boundary is long for its area.
  # A disk scores 2 sqrt(pi) = 3.5; the ellipsoid phantom's wavy boundary scored 3.4,
  # this template 13.
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  tissue = anatomical['tissue'][:, :, 55]
  csf = (tissue == phantom.CSF) & ndimage.binary_erosion(tissue != 255, iterations=2)
  _, clefts = ndimage.label(csf)
  assert clefts >= 10, clefts
  white = tissue == phantom.WM
  boundary = white & ~ndimage.binary_erosion(white)
  assert boundary.sum() / np.sqrt(white.sum()) > 8
  grey_ribbon = (tissue == phantom.GM).sum() / (tissue != 255).sum()
  assert 0.25 < grey_ribbon < 0.8, grey_ribbon


def test_anatomical_subjects_differ_and_replay(tmp_path):
  from data_prep import icbm152  # pylint: disable=g-import-not-at-top
  a = icbm152.make_subject(np.random.default_rng([3, 0]), SMALL)
  b = icbm152.make_subject(np.random.default_rng([3, 1]), SMALL)
  again = icbm152.make_subject(np.random.default_rng([3, 0]), SMALL)
  np.testing.assert_array_equal(a['volumes']['t1'], again['volumes']['t1'])
  assert (a['brain'] != b['brain']).mean() > 0.01  # each subject deformed its own way


def test_anatomy_command_writes_a_detected_brats_layout(tmp_path):
  phantom.main(['--anatomy', 'icbm152', '--out', str(tmp_path), '--subjects', '2',
                '--shape', '60,60,40', '--seed', '1'])
  cases = layouts.find_cases(tmp_path)
  assert [c.layout for c in cases] == ['brats2020'] * 2
  image = nib.load(cases[0].files['flair'])
  assert image.shape == (60, 60, 40)
  np.testing.assert_allclose(np.abs(np.diag(image.affine))[:3], [4, 4, 155 / 40])
  seg = nib.load(cases[0].seg)
  np.testing.assert_allclose(seg.affine, image.affine)


def test_the_training_job_makes_the_configured_anatomy(tmp_path):
  from aegan_jax import job  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  config.data.raw_dir = str(tmp_path / 'raw')
  config.data.phantom_subjects, config.data.phantom_shape = 1, (40, 40, 24)
  config.data.phantom_anatomy = 'icbm152'
  job.raw_dir(config, tmp_path)
  image = nib.load(next((tmp_path / 'raw').rglob('*_t1.nii.gz')))
  np.testing.assert_allclose(np.abs(np.diag(image.affine))[:3], [6, 6, 155 / 24])
  config.data.raw_dir = str(tmp_path / 'other')
  config.data.phantom_anatomy = 'spheres'
  with pytest.raises(job.ConfigError, match="config.data.phantom_anatomy='spheres'"):
    job.raw_dir(config, tmp_path)
  assert not (tmp_path / 'other').exists() and not (tmp_path / 'other.partial').exists()
