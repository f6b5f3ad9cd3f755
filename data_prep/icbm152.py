"""Phantom subjects on real cortical anatomy: the ICBM 2009a template (nilearn's copy).

`python -m data_prep.phantom --anatomy icbm152` draws each subject from the MNI ICBM152
2009a symmetric template that the nilearn wheel ships (`nilearn/datasets/data/`, 1 mm,
197x233x189): the T1 average (its non-zero voxels are the brain mask) and the grey- and
white-matter probability maps.  Nothing is downloaded and nilearn itself is never
imported: the three files are read from its installed package folder.

Per subject:
  * a random affine (isotropic scale 0.88-1.0 times 0.96-1.04 per axis, rotations of a
    few degrees, a shift of a few mm) and a smooth random displacement field (about
    2 mm), so that no two subjects share their folds;
  * tissue fractions resampled from the maps: GM, WM, CSF = 1 - GM - WM inside the
    brain (ventricles and sulcal CSF);
  * the ellipsoid phantom's tumour model and labels (`phantom.paint_tumour`): necrotic
    core, enhancing rim, edema following the white matter;
  * the ellipsoid phantom's sequences (`phantom.acquire`): the same per-tissue contrasts
    (T1, T1ce, T2, FLAIR), mixed by the fractions, then texture, bias field, gain and
    Rician noise.
The field of view is BraTS's, 240x240x155 mm, whatever the array shape, in BraTS's
orientation (the first two voxel axes run right-to-left and anterior-to-posterior).
"""
from __future__ import annotations

import functools
import importlib.util
import pathlib

import nibabel as nib
import numpy as np
from scipy import ndimage

from data_prep import phantom
from data_prep.errors import DataError

FILES = {name: f'mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz'
         for name in ('t1', 'gm', 'wm')}
FIELD_OF_VIEW = (240.0, 240.0, 155.0)  # mm, BraTS
BRAIN_THRESHOLD = 0.02  # of the T1 template's range: the template is skull-stripped
INSIDE = 0.0  # `phantom.paint_tumour` paints where its radius map is below 0.95


def template_dir() -> pathlib.Path:
  """nilearn's data folder, found without importing nilearn (slow, and not needed)."""
  spec = importlib.util.find_spec('nilearn')
  if spec is None or not spec.submodule_search_locations:
    raise DataError('--anatomy icbm152 reads the ICBM 2009 template shipped in the nilearn '
                    'package: pip install -r requirements.txt (or pip install nilearn)')
  return pathlib.Path(spec.submodule_search_locations[0]) / 'datasets' / 'data'


@functools.lru_cache(maxsize=1)
def load_template():
  """{'t1', 'gm', 'wm'} float32 [197, 233, 189] in [0, 1]: the 1 mm RAS template maps."""
  folder = template_dir()
  maps = {}
  for name, file_name in FILES.items():
    path = folder / file_name
    if not path.is_file():
      raise DataError(f'{path}: missing from the nilearn package (nilearn >= 0.10 ships it)')
    maps[name] = np.asarray(nib.load(path).dataobj, np.float32) / 255.0
  return maps


def _template_coordinates(rng, shape) -> np.ndarray:
  """[3, X, Y, Z] template voxel coordinates of every output voxel for one subject."""
  template = load_template()['t1']
  brain = np.argwhere(template > BRAIN_THRESHOLD)
  centre = (brain.min(axis=0) + brain.max(axis=0)) / 2
  spacing = np.array(FIELD_OF_VIEW) / np.array(shape)
  # Output axes 0 and 1 run against the template's (BraTS arrays are LPS, the template
  # RAS); millimetres from the output centre, in the template's axes.
  axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(s * d)
          for n, s, d in zip(shape, spacing, (-1, -1, 1))]
  scale = rng.uniform(0.88, 1.0) * rng.uniform(0.96, 1.04, 3)
  angles = np.deg2rad(rng.uniform(-5, 5, 3))
  shift = rng.uniform(-4, 4, 3)
  # Output mm -> template mm: the inverse of (rotate, then scale).
  inverse = _rotation(angles).T / scale[:, None]
  grid = np.stack(np.meshgrid(*axes, indexing='ij'))
  coords = np.tensordot(inverse.astype(np.float32), grid, axes=1)
  controls = phantom._scaled(shape, (6, 6, 5))  # pylint: disable=protected-access
  for axis in range(3):
    displacement = phantom.smooth_field(rng, shape, controls) * np.float32(2.0)
    coords[axis] += displacement + np.float32(centre[axis] + shift[axis])
  return coords


def _rotation(angles) -> np.ndarray:
  """3x3 rotation by `angles` (radians) about the three axes in turn."""
  rotation = np.eye(3)
  for axis, angle in enumerate(angles):
    i, j = [a for a in range(3) if a != axis]
    step = np.eye(3)
    step[i, i] = step[j, j] = np.cos(angle)
    step[i, j], step[j, i] = -np.sin(angle), np.sin(angle)
    rotation = step @ rotation
  return rotation


def _fractions(coords) -> tuple[np.ndarray, np.ndarray]:
  """(tissue fractions [X, Y, Z, 6] in phantom.TISSUES order, brain mask) at `coords`."""
  maps = load_template()
  sample = lambda name: ndimage.map_coordinates(maps[name], coords, order=1, cval=0.0,
                                                output=np.float32)
  brain = sample('t1') > BRAIN_THRESHOLD
  gm, wm = np.clip(sample('gm'), 0, 1), np.clip(sample('wm'), 0, 1)
  total = np.maximum(gm + wm, 1.0)  # the maps' sum may exceed 1 by rounding
  gm, wm = gm / total, wm / total
  fractions = np.zeros(brain.shape + (len(phantom.TISSUES),), np.float32)
  fractions[..., phantom.CSF] = 1 - gm - wm
  fractions[..., phantom.GM] = gm
  fractions[..., phantom.WM] = wm
  fractions[~brain] = 0
  return fractions, brain


def make_subject(rng, shape=(240, 240, 155)):
  """One subject, as `phantom.make_subject` returns it: 'volumes', 'tissue' (the largest
  fraction; 255 outside the brain), 'brain' and 'tumour' (0 none, 1 necrosis, 2 edema,
  3 enhancing)."""
  shape = tuple(int(s) for s in shape)
  fractions, brain = _fractions(_template_coordinates(rng, shape))
  tissue = np.argmax(fractions, axis=-1).astype(np.uint8)
  tumour = np.zeros(shape, np.int8)
  if rng.random() < phantom.TUMOUR_PROBABILITY:
    grid, half = _brain_frame(brain)
    radius = np.where(brain, np.float32(INSIDE), np.float32(1.0))
    phantom.paint_tumour(rng, grid, half, radius, tissue, tumour)
  tumour[~brain] = 0  # BraTS convention: labels only inside the brain
  for label, tissue_index in ((1, phantom.NECROSIS), (2, phantom.EDEMA), (3, phantom.ENHANCING)):
    inside = tumour == label
    fractions[inside] = 0
    fractions[inside, tissue_index] = 1
  volumes = phantom.acquire(rng, lambda contrast: fractions @ contrast.astype(np.float32),
                            brain)
  tissue[~brain] = 255
  return {'volumes': volumes, 'tissue': tissue, 'brain': brain, 'tumour': tumour}


def _brain_frame(brain):
  """(voxel grids centred on the brain's bounding box, its half-extents): the frame in
  which `phantom.paint_tumour` places a tumour."""
  where = np.argwhere(brain)
  low, high = where.min(axis=0), where.max(axis=0)
  centre = (low + high) / 2
  grid = [(np.arange(n, dtype=np.float32) - np.float32(c)).reshape(
      [-1 if i == axis else 1 for i in range(3)])
          for axis, (n, c) in enumerate(zip(brain.shape, centre))]
  return grid, (high - low + 1) / 2


def affine(shape) -> np.ndarray:
  """The written volumes' affine: BraTS's orientation, the voxel size of the field of view."""
  spacing = np.array(FIELD_OF_VIEW) / np.array(shape)
  out = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
  out[:3, 3] = [(shape[0] - 1) * spacing[0] / 2, (shape[1] - 1) * spacing[1] / 2,
                -(shape[2] - 1) * spacing[2] / 2]
  return out
