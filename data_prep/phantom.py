"""Synthetic skull-stripped multi-contrast brain MRI in real BraTS layouts.

Each subject: an ellipsoidal brain whose outline, cortical ribbon, sulci,
deep grey matter and ventricles are bent by smooth random fields; most
subjects carry a tumour (necrotic core, enhancing rim, edema).  Tissues get
MRI-like contrasts per modality (T1: WM > GM > CSF; T1ce: T1 plus a bright
enhancing rim and a stronger grey/white contrast; T2: CSF and edema bright;
FLAIR: CSF dark, edema bright), then smooth texture, a multiplicative bias
field (mostly the coil's, shared by all sequences of a subject) and Rician
noise.
Background is exactly zero.  Everything is a function of (seed, subject index,
shape), so files are reproducible byte for byte.

  python -m data_prep.phantom --out DIR --subjects N --seed S \
      [--shape 240,240,155] [--layout brats2020|brats2023] [--anatomy ellipsoids|icbm152]

`--anatomy icbm152` puts the same tumour model and sequences on real brain anatomy
instead of ellipsoids (`data_prep.icbm152`, the ICBM 2009 template shipped by nilearn).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import pathlib
import sys
import time

import nibabel as nib
import numpy as np
from scipy import ndimage

from data_prep import layouts
from data_prep.errors import DataError

MODALITIES = layouts.BRATS_MODALITIES  # A BraTS phantom: one CONTRAST row each.
LAYOUTS = ('brats2020', 'brats2023')  # File names: layouts.brats_file_name.
ANATOMIES = ('ellipsoids', 'icbm152')  # icbm152: real cortex (data_prep.icbm152)
ENHANCING_LABEL = {'brats2020': 4, 'brats2023': 3}

# Tissue classes (index into the fraction stack) and their labels.
TISSUES = ('csf', 'gm', 'wm', 'necrosis', 'enhancing', 'edema')
CSF, GM, WM, NECROSIS, ENHANCING, EDEMA = range(len(TISSUES))
TUMOUR_PROBABILITY = 0.85

# Mean signal per tissue and modality (arbitrary scanner units).  T1 is
# spin-echo-like (weak grey/white contrast), T1ce gradient-echo-like (strong),
# so neither is a near copy of the other; each subject jitters them by +-4%.
#                    csf    gm    wm  necrosis enhancing edema
CONTRAST = {
    't1':    np.array([420., 640., 800., 450., 600., 560.]),
    't1ce':  np.array([200., 560., 900., 260., 1500., 500.]),
    't2':    np.array([1800., 650., 420., 1400., 900., 1250.]),
    'flair': np.array([150., 600., 430., 500., 750., 1150.]),
}
BRATS_AFFINE = np.array([[-1., 0., 0., 0.],
                         [0., -1., 0., 239.],
                         [0., 0., 1., 0.],
                         [0., 0., 0., 1.]])


@functools.lru_cache(maxsize=64)
def _axis_weights(size: int, controls: int) -> np.ndarray:
  """[size, controls] Gaussian interpolation weights (rows sum to 1)."""
  position = (np.arange(size) + 0.5) / size * (controls - 1)
  spacing = 0.6
  w = np.exp(-0.5 * ((position[:, None] - np.arange(controls)) / spacing) ** 2)
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def upsample(coarse, shape) -> np.ndarray:
  """Smoothly interpolates a coarse [a, b, c] grid to ``shape``.

  Three small matrix products instead of a 3D zoom: cheap at full size.
  """
  wx, wy, wz = (_axis_weights(s, c) for s, c in zip(shape, coarse.shape))
  field = np.tensordot(coarse.astype(np.float32), wz, axes=([2], [1]))
  field = np.einsum('abz,yb->ayz', field, wy)
  return np.tensordot(wx, field, axes=1)


def coarse_noise(rng, controls) -> np.ndarray:
  """Low-res noise, scaled so that ``upsample`` gives ~unit variance."""
  coarse = rng.standard_normal(controls).astype(np.float32)
  # Interpolation averages ~2 neighbours per axis; undo the variance loss.
  return coarse * np.float32(_AXIS_GAIN ** 3)


_AXIS_GAIN = 1 / np.sqrt(np.mean(np.sum(_axis_weights(200, 20) ** 2, axis=1)))


def smooth_field(rng, shape, controls) -> np.ndarray:
  """Smooth random field with roughly unit variance."""
  return upsample(coarse_noise(rng, controls), shape)


def _coords(shape, box):
  """Voxel grids (1 mm, float32) of ``box`` relative to the volume centre."""
  return [(np.arange(lo, hi, dtype=np.float32) - np.float32((s - 1) / 2)
           ).reshape([-1 if i == axis else 1 for i in range(3)])
          for axis, (s, (lo, hi)) in enumerate(zip(shape, box))]


def _scaled(shape, controls):
  """Fewer control points for small test volumes."""
  return tuple(max(3, min(c, s // 4)) for c, s in zip(controls, shape))


def _ellipsoid(grid, centre, axes):
  """Ellipsoidal radius (1 on the surface) over ``grid``."""
  x, y, z = grid
  c = [np.float32(v) for v in centre]
  a = [np.float32(1 / v) for v in axes]
  return np.sqrt(np.square((x - c[0]) * a[0]) + np.square((y - c[1]) * a[1]) +
                 np.square((z - c[2]) * a[2]))


def _local(grid, centre, extent):
  """Index box (within ``grid``) around ``centre`` +- ``extent`` voxels."""
  window = []
  for axis, (c, e) in enumerate(zip(centre, extent)):
    line = grid[axis].ravel()
    lo = int(np.searchsorted(line, c - e))
    hi = int(np.searchsorted(line, c + e, side='right'))
    window.append(slice(lo, max(lo, hi)))
  window = tuple(window)
  sub = [g[tuple(w if i == axis else slice(None) for i, w in enumerate(window))]
         for axis, g in enumerate(grid)]
  return window, sub


def _paint_deep_structures(rng, grid, half, tissue) -> None:
  """Deep grey nuclei and bent lateral ventricles, painted into `tissue` in place."""
  for side in (-1, 1):  # deep grey nuclei
    centre = np.array([side * 0.22, rng.uniform(-0.1, 0.05), 0.0]) * half
    axes = np.array([0.12, 0.18, 0.14]) * half * rng.uniform(0.85, 1.15, 3)
    window, sub = _local(grid, centre, axes)
    tissue[window][_ellipsoid(sub, centre, axes) < 1] = GM
  ventricle_size = rng.uniform(0.7, 1.4)
  for side in (-1, 1):  # lateral ventricles, bent
    centre = np.array([side * 0.09, 0.05, 0.06]) * half
    axes = np.array([0.055, 0.33, 0.15]) * half * ventricle_size
    window, sub = _local(grid, centre, 1.3 * axes)
    bend = upsample(coarse_noise(rng, (3, 4, 3)) * np.float32(0.15),
                    tuple(w.stop - w.start for w in window))
    tissue[window][_ellipsoid(sub, centre, axes) + bend < 1] = CSF


def make_subject(rng, shape=(240, 240, 155)):
  """Draws one subject.

  Tissue labels are painted hard, turned into per-modality signal, then
  blurred slightly (partial volume).  Work happens inside the brain's bounding
  box, small structures inside their own boxes, which keeps a 240x240x155
  subject around a second.

  Returns:
    dict with 'volumes' {modality: float32 [X,Y,Z]}, 'tissue' (uint8 index
    into TISSUES, 255 = background), 'brain' (bool) and 'tumour' (int8:
    0 none, 1 necrosis, 2 edema, 3 enhancing).
  """
  shape = tuple(int(s) for s in shape)
  # Brain half-axes as a fraction of the field of view, like BraTS crops.
  half = np.array([0.30, 0.37, 0.40]) * shape * rng.uniform(0.9, 1.08, 3)
  box = [(max(0, int((s - 1) / 2 - 1.2 * h)),
          min(s, int(np.ceil((s - 1) / 2 + 1.2 * h)) + 1))
         for h, s in zip(half, shape)]
  box_shape = tuple(hi - lo for lo, hi in box)
  grid = _coords(shape, box)

  def field(controls, amplitude):
    return np.float32(amplitude) * smooth_field(
        rng, box_shape, _scaled(box_shape, controls))

  radius = _ellipsoid(grid, (0, 0, 0), half)
  radius += field((5, 5, 4), 0.05)
  brain = radius < 1.0
  tissue = np.full(box_shape, CSF, np.uint8)
  cortex_depth = rng.uniform(0.07, 0.11)
  tissue[radius < 0.97] = GM
  gyri = field((14, 14, 10), 0.05)
  gyri += np.float32(0.92 - cortex_depth)
  tissue[radius < gyri] = WM
  # Sulci: thin CSF sheets along the zero set of a smooth field, cutting
  # through the cortex from the surface.
  sulci = np.abs(field((16, 16, 12), 1.0))
  tissue[(sulci < 0.1) & (radius > 0.84)] = CSF
  del gyri, sulci
  _paint_deep_structures(rng, grid, half, tissue)
  tumour = np.zeros(box_shape, np.int8)
  if rng.random() < TUMOUR_PROBABILITY:
    paint_tumour(rng, grid, half, radius, tissue, tumour)
  tumour[~brain] = 0  # BraTS convention: labels only inside the brain

  volumes = {m: _uncrop(v, shape, box, 0.0) for m, v in acquire(
      rng, lambda contrast: contrast.astype(np.float32)[tissue], brain).items()}
  tissue[~brain] = 255
  return {'volumes': volumes, 'tissue': _uncrop(tissue, shape, box, 255),
          'brain': _uncrop(brain, shape, box, False),
          'tumour': _uncrop(tumour, shape, box, 0)}


def acquire(rng, signal_of, brain) -> dict:
  """Every sequence of one subject from its anatomy, inside `brain`'s box (0 outside).

  `signal_of(contrast)` gives the noise-free signal [X, Y, Z] of a per-tissue contrast
  row (a CONTRAST row jittered by +-4% per tissue).  Then partial-volume blur, smooth
  texture (shared anatomy and each sequence's own), a multiplicative bias field (mostly
  the receive coil's, shared by all sequences of a session), a global gain and Rician
  noise.  The draws from `rng` come in a fixed order: subjects replay byte for byte.
  """
  box_shape = brain.shape
  texture_controls = _scaled(box_shape, (20, 20, 14))
  shared_texture = coarse_noise(rng, texture_controls)
  # The receive coil's sensitivity is common to all sequences of a session.
  shared_bias = upsample(coarse_noise(rng, (3, 3, 3)), texture_controls)
  volumes = {}
  for modality in MODALITIES:
    contrast = CONTRAST[modality] * rng.uniform(0.96, 1.04, len(TISSUES))
    signal = signal_of(contrast)
    signal = ndimage.gaussian_filter(signal, 0.6, truncate=2.5)
    # Texture (shared anatomy + own) and bias field, summed while coarse.
    bias = upsample(coarse_noise(rng, (3, 3, 3)), texture_controls)
    log_gain = (0.04 * rng.choice([-1, 1]) * shared_texture
                + 0.03 * coarse_noise(rng, texture_controls)
                + rng.uniform(0.06, 0.15) * shared_bias + 0.02 * bias
                + np.log(rng.uniform(0.6, 1.6)))
    modulation = np.exp(upsample(log_gain.astype(np.float32), box_shape))
    signal *= modulation
    sigma = np.float32(0.025 * np.exp(log_gain.mean()) * CONTRAST[modality].mean())
    # Rician magnitude sqrt((s + n0)^2 + n1^2), computed in place.
    noise = rng.standard_normal((2,) + box_shape, dtype=np.float32)
    noise *= sigma
    noise[0] += signal
    np.square(noise, out=noise)
    magnitude = np.add(noise[0], noise[1], out=noise[0])
    np.sqrt(magnitude, out=magnitude)
    np.maximum(magnitude, 1.0, out=magnitude)
    magnitude *= brain
    volumes[modality] = magnitude
  return volumes


def _uncrop(array, shape, box, fill):
  full = np.full(shape, fill, array.dtype)
  full[tuple(slice(lo, hi) for lo, hi in box)] = array
  return full


def paint_tumour(rng, grid, half, radius, tissue, tumour):
  """Necrotic core inside an enhancing rim inside edema, bent by noise."""
  while True:  # centre well inside the white matter
    centre = rng.uniform(-0.55, 0.55, 3)
    if np.linalg.norm(centre) < 0.6:
      break
  centre = centre * half
  size = rng.uniform(0.12, 0.28) * min(half)
  necrosis_radius = rng.uniform(0.0, 0.55)  # small: solid enhancing tumour
  edema_radius = rng.uniform(1.5, 2.4)
  window, sub = _local(grid, centre, [size * (edema_radius + 0.5)] * 3)
  local_shape = tuple(w.stop - w.start for w in window)
  distance = _ellipsoid(sub, centre, (size, size, size))
  distance += upsample(coarse_noise(rng, (4, 4, 4)) * np.float32(0.12),
                       local_shape)
  inside = radius[window] < 0.95
  tissue, tumour = tissue[window], tumour[window]
  # Edema follows white matter, and spares the cortex and CSF.
  edema = (distance < edema_radius) & inside & (tissue == WM)
  tissue[edema] = EDEMA
  tumour[edema] = 2
  solid = (distance < 1.0) & inside
  tissue[solid] = ENHANCING
  tumour[solid] = 3
  if necrosis_radius > 0.15:
    core = (distance < necrosis_radius) & inside
    tissue[core] = NECROSIS
    tumour[core] = 1


def subject_id(layout: str, index: int) -> str:
  if layout == 'brats2020':
    return f'BraTS20_Training_{index + 1:03d}'
  return f'BraTS-GLI-{index:05d}-000'


def _save(array, path, dtype, affine=BRATS_AFFINE):
  image = nib.Nifti1Image(array.astype(dtype), affine)
  image.header.set_xyzt_units('mm', 'sec')
  nib.save(image, path)


def _anatomy(anatomy: str):
  """(make_subject, affine of a shape) of an anatomy."""
  if anatomy == 'ellipsoids':
    return make_subject, lambda shape: BRATS_AFFINE
  if anatomy == 'icbm152':
    # Imported here: icbm152 builds on this module (tumour model, sequences).
    from data_prep import icbm152  # pylint: disable=g-import-not-at-top
    return icbm152.make_subject, icbm152.affine
  raise ValueError(f'anatomy must be one of {ANATOMIES}, got {anatomy!r}')


def write_subject(out_dir, index: int, seed: int, shape=(240, 240, 155),
                  layout: str = 'brats2020', anatomy: str = 'ellipsoids') -> pathlib.Path:
  """Writes subject ``index`` of the dataset drawn with ``seed``."""
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')
  draw, affine_of = _anatomy(anatomy)
  # Independent stream per subject: subsets and re-runs give the same subject.
  rng = np.random.default_rng([seed, index])
  subject = draw(rng, shape)
  name = subject_id(layout, index)
  folder = pathlib.Path(out_dir) / name
  folder.mkdir(parents=True, exist_ok=True)
  seg = np.select([subject['tumour'] == 1, subject['tumour'] == 2,
                   subject['tumour'] == 3],
                  [1, 2, ENHANCING_LABEL[layout]], 0)
  affine = affine_of(tuple(shape))
  jobs = [(np.round(subject['volumes'][m]),
           folder / layouts.brats_file_name(layout, name, m), np.int16, affine)
          for m in MODALITIES]
  jobs.append((seg, folder / layouts.brats_file_name(layout, name, 'seg'), np.uint8, affine))
  # gzip releases the GIL: compress the five files side by side.
  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    list(pool.map(lambda job: _save(*job), jobs))
  return folder


def write_phantom_dataset(out_dir, subjects: int, seed: int = 0,
                          shape=(240, 240, 155),
                          layout: str = 'brats2020',
                          progress: bool = False,
                          anatomy: str = 'ellipsoids') -> list[pathlib.Path]:
  """Writes ``subjects`` phantom subjects; returns their folders."""
  indices = range(subjects)
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    indices = tqdm(indices, desc='phantom', unit='subject', file=sys.stderr)
  return [write_subject(out_dir, i, seed, shape, layout, anatomy) for i in indices]


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m data_prep.phantom', description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, type=pathlib.Path)
  parser.add_argument('--subjects', type=int, default=10)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--shape', default='240,240,155',
                      help='X,Y,Z voxels (1 mm; icbm152: the 240x240x155 mm field of view)')
  parser.add_argument('--layout', choices=LAYOUTS, default='brats2020')
  parser.add_argument('--anatomy', choices=ANATOMIES, default='ellipsoids',
                      help='ellipsoids (built-in) or icbm152 (the ICBM 2009 template '
                           'shipped with nilearn: real gyri and sulci)')
  args = parser.parse_args(argv)
  try:
    shape = tuple(int(s) for s in args.shape.split(','))
    if len(shape) != 3 or min(shape) < 8:
      raise ValueError
  except ValueError:
    parser.error(f'--shape {args.shape!r}: expected three integers >= 8')
  start = time.perf_counter()
  try:
    for i in range(args.subjects):
      write_subject(args.out, i, args.seed, shape, args.layout, args.anatomy)
  except DataError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  seconds = time.perf_counter() - start
  print(f'wrote {args.subjects} subjects ({args.anatomy}, {args.layout}, {shape}) to '
        f'{args.out} in {seconds:.1f} s', file=sys.stderr)


if __name__ == '__main__':
  main()
