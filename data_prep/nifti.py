"""Reads NIfTI volumes, with the checks every reader of raw scans needs.

Preparation (``prepare``), synthesis (``aegan_jax.synthesize``) and evaluation
(``aegan_jax.evaluate``, the original volumes) all read scans here, so a bad
file fails with the same one-line message everywhere.  Callers pass the
exception type their command reports (``DataError`` by default).
"""
from __future__ import annotations

import nibabel as nib
import numpy as np

from data_prep.errors import DataError

AFFINE_TOLERANCE = 1e-3
# Larger volumes are refused before their voxels are allocated: a damaged header can claim
# any size.  2**28 voxels is 1 GiB as float32 (e.g. 1024 x 1024 x 256).
MAX_VOXELS = 2**28


def one_line(exc: BaseException) -> str:
  return ' '.join(f'{type(exc).__name__}: {exc}'.split())


def load_header(path, error=DataError):
  """(image, shape) of a readable 3D volume; reads no voxels.

  A trailing axis of length 1 ([X, Y, Z, 1]) counts as 3D.
  """
  try:
    image = nib.load(path)
    shape = tuple(int(s) for s in image.shape)
  except Exception as exc:  # nibabel raises many types for corrupt files.
    raise error(f'{path}: not a readable NIfTI file ({one_line(exc)})') from None
  if len(shape) == 4 and shape[3] == 1:
    shape = shape[:3]
  if len(shape) != 3:
    raise error(f'{path}: expected a 3D volume, got shape {shape}')
  if min(shape) < 1 or int(np.prod(shape, dtype=np.float64)) > MAX_VOXELS:
    raise error(f'{path}: its header claims shape {shape}; volumes of 1 to {MAX_VOXELS:,} voxels '
                'are read (a damaged header, or resample the scan)')
  return image, shape


def read_headers(named_paths, error=DataError):
  """(image, shape) of the first of ``(name, path)`` pairs; all must share its grid.

  ``named_paths`` may be a generator: each file is opened as it comes, so a
  problem is reported for the first file that has one.
  """
  reference = None
  for name, path in named_paths:
    image, shape = load_header(path, error)
    if reference is None:
      reference = name, image, shape
      continue
    ref_name, ref_image, ref_shape = reference
    if shape != ref_shape:
      raise error(f'{path}: shape {shape} differs from {ref_name} {ref_shape}')
    difference = float(np.abs(image.affine - ref_image.affine).max())
    if difference > AFFINE_TOLERANCE:
      raise error(f'{path}: affine differs from {ref_name} '
                  f'(max abs difference {difference:.3g})')
  return reference[1], reference[2]


def read_voxels(path, shape, error=DataError) -> np.ndarray:
  """The volume as float32 ``shape``; every voxel finite.

  ``shape`` comes from a checked header (``load_header``) or a manifest; a file whose
  header now claims another size is refused before its voxels are allocated.
  """
  try:
    image = nib.load(path)
    if int(np.prod(image.shape, dtype=np.float64)) != int(np.prod(shape, dtype=np.float64)):
      raise ValueError(f'the header claims shape {tuple(image.shape)}, not {tuple(shape)}')
    data = np.asarray(image.dataobj, np.float32).reshape(shape)
  except Exception as exc:  # Truncated or damaged voxel data.
    raise error(f'{path}: cannot read voxel data ({one_line(exc)})') from None
  if not np.isfinite(data).all():
    raise error(f'{path}: contains NaN or infinite values')
  return data


def read_labels(path, shape, error=DataError) -> np.ndarray:
  """A segmentation as uint8 labels (rounded: some files store labels as floats)."""
  return np.rint(read_voxels(path, shape, error)).astype(np.uint8)
