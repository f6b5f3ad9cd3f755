"""Volume <-> normalised 2D slices, and back.

Conventions (the manifest records every choice):
  * Slices are axial: ``vol[:, :, z]`` (last voxel axis), stored un-rotated as
    ``[H, W] = [X, Y]`` so that inversion is plain indexing.
  * Brain mask = voxels that are non-zero (BraTS/ISLES are skull-stripped with
    an exact-zero background).
  * Each normalisation maps the background to a fixed value
    (``background_value(method)``): -1 for 'max' and 'percentile', 0 for
    'zscore'.  ``pad`` geometry pads with that value.
"""
from __future__ import annotations

import functools
import re

import numpy as np

from data_prep.errors import DataError

NORMALISATIONS = ('max', 'percentile', 'zscore')
GEOMETRIES = ('resize', 'pad')
OFFICIAL_SLICE = 78
# Largest slice side (prepared data and training); 100000 px would ask for 40 GB a slice.
MAX_IMAGE_SIZE = 4096
PERCENTILES = (0.5, 99.5)


def background_value(method: str) -> float:
  return 0.0 if method == 'zscore' else -1.0


def normalise_volume(vol, method: str = 'max'):
  """Normalises one modality volume.

  Methods:
    max:        ``vol / max(vol) * 2 - 1`` (official AE-GAN); background -1.  Negative
                voxels (e.g. interpolation ringing) count as 0, so every value stays
                in the generator's tanh range [-1, 1].
    percentile: clip brain voxels to their [0.5, 99.5] percentiles, map that
                range linearly to [-1, 1]; background -1.
    zscore:     ``(vol - mean) / std`` over brain voxels; background 0.

  Returns:
    ``(normed float32, params dict)``; ``params`` is JSON-serialisable and is
    what ``denormalise`` needs.
  """
  vol = np.asarray(vol, np.float32)
  brain = vol != 0
  if method == 'max':
    peak = float(vol.max())
    scale = peak if peak > 0 else 1.0
    return np.maximum(vol / scale * 2 - 1, -1.0), {'method': method, 'max': peak}
  if not brain.any():
    return (np.full(vol.shape, background_value(method), np.float32),
            {'method': method, 'offset': 0.0, 'scale': 1.0})
  values = vol[brain]
  if method == 'percentile':
    low, high = (float(p) for p in np.percentile(values, PERCENTILES))
    span = high - low if high > low else 1.0
    mapped = (np.clip(vol, low, high) - low) / span * 2 - 1
    normed = np.where(brain, mapped, -1.0).astype(np.float32)
    return normed, {'method': method, 'low': low, 'high': high}
  if method == 'zscore':
    mean, std = float(values.mean()), float(values.std())
    std = std if std > 0 else 1.0
    normed = np.where(brain, (vol - mean) / std, 0.0).astype(np.float32)
    return normed, {'method': method, 'mean': mean, 'std': std}
  raise DataError(f'unknown normalisation {method!r}; expected {NORMALISATIONS}')


def denormalise(normed, params, brain_mask=None):
  """Inverse of ``normalise_volume`` (up to the percentile clipping).

  Voxels outside ``brain_mask`` (default: voxels at the background value for
  'percentile'/'zscore') become 0 so synthesised volumes keep a zero
  background.
  """
  x = np.asarray(normed, np.float32)
  method = params['method']
  if method == 'max':
    out = (x + 1) / 2 * (params['max'] if params['max'] > 0 else 1.0)
    return out if brain_mask is None else np.where(brain_mask, out, 0.0)
  if method == 'percentile':
    low, high = params['low'], params['high']
    out = (x + 1) / 2 * ((high - low) if high > low else 1.0) + low
  elif method == 'zscore':
    out = x * params['std'] + params['mean']
  else:
    raise DataError(f'unknown normalisation {method!r}')
  if brain_mask is None:
    brain_mask = x != background_value(method)
  return np.where(brain_mask, out, 0.0).astype(np.float32)


# ------------------------------------------------------------------ slices


def parse_slices(spec: str):
  """Parses ``official`` | ``range:A:B`` | ``nonempty:F`` into a tuple."""
  if spec == 'official':
    return ('official',)
  if m := re.fullmatch(r'range:(\d+):(\d+)', spec):
    start, stop = int(m[1]), int(m[2])
    if stop <= start:
      raise DataError(f'--slices {spec}: empty range (B must exceed A)')
    return ('range', start, stop)
  if m := re.fullmatch(r'nonempty:([0-9]*\.?[0-9]+)', spec):
    fraction = float(m[1])
    if not 0 <= fraction <= 1:
      raise DataError(f'--slices {spec}: fraction must be in [0, 1]')
    return ('nonempty', fraction)
  raise DataError(f'--slices {spec!r}: expected official, range:A:B '
                  '(A inclusive, B exclusive) or nonempty:F')


def select_slices(brain_mask, spec: str) -> list[int]:
  """Axial indices to keep for one subject.

  ``brain_mask``: [X, Y, Z] bool, non-zero in any modality.
  ``official``: index 78 only; ``range:A:B``: A <= z < B (B clipped to the
  depth); ``nonempty:F``: slices whose brain fraction is >= F (F=0 keeps all).
  """
  kind, *args = parse_slices(spec)
  depth = brain_mask.shape[-1]
  if kind == 'official':
    if depth <= OFFICIAL_SLICE:
      raise DataError(f'volume depth {depth} has no slice {OFFICIAL_SLICE}')
    return [OFFICIAL_SLICE]
  if kind == 'range':
    start, stop = args[0], min(args[1], depth)
    if start >= depth:
      raise DataError(f'--slices {spec}: volume depth is only {depth}')
    return list(range(start, stop))
  fraction = brain_mask.mean(axis=(0, 1))
  return [int(z) for z in np.flatnonzero(fraction >= args[0])]


# ---------------------------------------------------------------- geometry


@functools.lru_cache(maxsize=32)
def _linear_weights(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] bilinear weights, half-pixel centres, edge clamp.

  Same sampling as ``jax.image.resize(method='linear')`` and cv2/torch with
  ``align_corners=False`` (no antialiasing when shrinking).
  """
  centres = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
  centres = np.clip(centres, 0, size_in - 1)
  low = np.floor(centres).astype(int)
  high = np.minimum(low + 1, size_in - 1)
  frac = centres - low
  weights = np.zeros((size_out, size_in), np.float64)
  weights[np.arange(size_out), low] += 1 - frac
  weights[np.arange(size_out), high] += frac
  return weights.astype(np.float32)


def resize_bilinear(images, size) -> np.ndarray:
  """Resizes ``[..., H, W]`` to ``[..., size[0], size[1]]``."""
  images = np.asarray(images, np.float32)
  rows = _linear_weights(images.shape[-2], size[0])
  cols = _linear_weights(images.shape[-1], size[1])
  return np.einsum('oh,...hw,pw->...op', rows, images, cols, optimize=True)


def resize_nearest(labels, size) -> np.ndarray:
  """Nearest-neighbour resize of ``[..., H, W]`` label maps."""
  labels = np.asarray(labels)
  h, w = labels.shape[-2:]
  rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(int), h - 1)
  cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(int), w - 1)
  return labels[..., rows[:, None], cols[None, :]]


def _pad_widths(in_size: int, out_size: int):
  if in_size > out_size:
    raise DataError(f'pad geometry: slice size {in_size} exceeds '
                    f'--image-size {out_size}; use --geometry resize')
  before = (out_size - in_size) // 2
  return before, out_size - in_size - before


def volume_to_slices(vol, slice_indices, geometry: str = 'resize',
                     image_size: int = 256, fill: float = -1.0,
                     labels: bool = False) -> np.ndarray:
  """Takes axial slices ``vol[:, :, z]`` and brings them to ``image_size``.

  Args:
    vol: [X, Y, Z] normalised volume (or label volume with ``labels=True``).
    slice_indices: axial indices.
    geometry: 'resize' (bilinear; nearest for labels) or 'pad' (centred
      padding with ``fill``; exactly invertible).
    fill: pad value, normally ``background_value(method)`` (0 for labels).

  Returns:
    [S, image_size, image_size].
  """
  slices = np.moveaxis(np.asarray(vol)[:, :, list(slice_indices)], -1, 0)
  size = (image_size, image_size)
  if geometry == 'resize':
    if slices.shape[1:] == size:
      return slices.copy()
    return resize_nearest(slices, size) if labels else resize_bilinear(slices, size)
  if geometry == 'pad':
    pads = [(0, 0), _pad_widths(slices.shape[1], image_size),
            _pad_widths(slices.shape[2], image_size)]
    return np.pad(slices, pads, constant_values=0 if labels else fill)
  raise DataError(f'unknown geometry {geometry!r}; expected {GEOMETRIES}')


def slices_to_volume(slices, original_shape, slice_indices,
                     geometry: str = 'resize', fill: float = -1.0,
                     labels: bool = False) -> np.ndarray:
  """Puts ``[S, H, W]`` slices back into an ``original_shape`` volume.

  Slices not listed in ``slice_indices`` hold ``fill``.  'pad' crops the
  padding (exact inverse of ``volume_to_slices``); 'resize' resizes back
  bilinearly (nearest for labels).
  """
  slices = np.asarray(slices)
  x, y, depth = original_shape
  if geometry == 'pad':
    (top, _), (left, _) = (_pad_widths(x, slices.shape[1]),
                           _pad_widths(y, slices.shape[2]))
    back = slices[:, top:top + x, left:left + y]
  elif geometry == 'resize':
    back = (resize_nearest(slices, (x, y)) if labels
            else resize_bilinear(slices, (x, y)))
  else:
    raise DataError(f'unknown geometry {geometry!r}; expected {GEOMETRIES}')
  vol = np.full((x, y, depth), fill, dtype=back.dtype)
  vol[:, :, list(slice_indices)] = np.moveaxis(back, 0, -1)
  return vol
