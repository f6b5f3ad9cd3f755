"""The evaluation protocols' maths: slice metrics, volumes put back on the original grid,
and volume and BraSyn metrics.

  aegan   the official data path: each 2D slice as prepared, mapped from
          [-1, 1] to [0, 1] (clipped), data range 1; PSNR, SSIM, FSIM, MAE
          per slice, averaged per subject.
  volume  3D per subject at the original intensities: synthesised slices put
          back on the original grid (`slices_to_volume`) and denormalised with
          the real target's parameters; only the prepared (selected) slices
          exist, so both volumes are restricted to them.  Inside the brain
          mask (non-zero in any original modality), data range = the real
          volume's max - min there; PSNR, SSIM (3D with >= 11 slices, else
          the mean 2D SSIM of the slices), MAE.
  brasyn  the volumes above, each clipped at its own 0.5 / 99.5 brain
          percentiles and scaled to [0, 1]; PSNR and SSIM in the brain, and
          SSIM in the tumour (seg > 0) and the rest of the brain when a
          segmentation exists.

A subject's real volumes come from the source NIfTI files named in the manifest (while
they are the files prepared), else from its prepared slices put back.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from aegan_jax import metrics
from data_prep import manifest as manifest_lib
from data_prep import nifti
from data_prep import preprocess

PROTOCOLS = ('aegan', 'volume', 'brasyn')
METRICS = {'aegan': ('psnr', 'ssim', 'fsim', 'mae'),
           'volume': ('psnr', 'ssim', 'mae'),
           'brasyn': ('psnr', 'ssim', 'ssim_tumour', 'ssim_non_tumour')}
METHODS = ('model', 'baseline')
PSNR_CAP = 100.0  # dB; identical images (e.g. empty slices copied) would give inf.
BRASYN_PERCENTILES = (0.5, 99.5)
MIN_SSIM3D_SLICES = 11  # The 3D window is 11 voxels deep.
PROTOCOL_TITLES = {
    'aegan': 'aegan: 2D slices as prepared, [-1, 1] -> [0, 1], data range 1',
    'volume': 'volume: 3D at original intensities, brain mask, data range = real max - min',
    'brasyn': 'brasyn: 3D, each volume clipped at its 0.5 / 99.5 brain percentiles -> [0, 1]',
}


def description() -> dict:
  """The protocols as a report names them: each one's metrics and definition."""
  return {'protocols': {p: {'metrics': list(METRICS[p]), 'definition': PROTOCOL_TITLES[p]}
                        for p in PROTOCOLS},
          'psnr_cap_db': PSNR_CAP}


def to_unit(x):
  """Prepared [-1, 1] values -> [0, 1] (the official evaluation scale)."""
  return np.clip((np.asarray(x, np.float32) + 1) / 2, 0, 1)


# --------------------------------------------------------------------------
# Metrics.


@jax.jit
def _slice_metrics(x, y):
  return {'psnr': jnp.minimum(metrics.psnr(x, y, data_range=1.0), PSNR_CAP),
          'ssim': metrics.ssim(x, y, data_range=1.0),
          'fsim': metrics.fsim(x, y, data_range=1.0),
          'mae': metrics.mae(x, y, data_range=1.0)}


def slice_metrics(synthesised, real, batch_size) -> dict[str, np.ndarray]:
  """aegan protocol per slice: [S, H, W] in [-1, 1] -> {metric: [S]}; fixed-size jit batches."""
  x, y = to_unit(synthesised), to_unit(real)
  out = {m: [] for m in METRICS['aegan']}
  for start in range(0, len(x), batch_size):
    xs, ys = x[start:start + batch_size], y[start:start + batch_size]
    pad = batch_size - len(xs)
    if pad:
      zeros = np.zeros((pad,) + xs.shape[1:], np.float32)
      xs, ys = np.concatenate([xs, zeros]), np.concatenate([ys, zeros + 0.5])
    for name, values in _slice_metrics(xs, ys).items():
      out[name].append(np.asarray(values)[:len(values) - pad])
  return {name: np.concatenate(values) for name, values in out.items()}


@jax.jit
def _ssim3d(x, y, data_range, mask):
  return metrics.ssim3d(x, y, data_range=data_range, mask=mask)


def _ssim_volume(x, y, mask, data_range) -> float:
  """SSIM of [X, Y, Z] volumes: 3D with >= 11 slices, else the mean masked 2D SSIM."""
  if not mask.any():
    return math.nan
  x, y, mask = (np.moveaxis(v, -1, 0) for v in (x, y, mask))  # [Z, X, Y]
  if x.shape[0] >= MIN_SSIM3D_SLICES:
    return float(_ssim3d(x, y, data_range, mask))
  keep = mask.any(axis=(1, 2))
  values = metrics.ssim(x[keep], y[keep], data_range=data_range, mask=mask[keep])
  return float(np.nanmean(np.asarray(values)))


def _flat_metric(fn, x, y, mask, data_range) -> float:
  # psnr / mae average over the last two axes: one [1, N] row averages over every voxel.
  return float(fn(x[mask][None, None], y[mask][None, None], data_range=data_range)[0])


def volume_metrics(synthesised, real, brain) -> dict[str, float]:
  values = real[brain]
  data_range = float(values.max() - values.min()) if values.size else 0.0
  if data_range <= 0:
    return {m: math.nan for m in METRICS['volume']}
  return {'psnr': min(_flat_metric(metrics.psnr, synthesised, real, brain, data_range), PSNR_CAP),
          'ssim': _ssim_volume(synthesised, real, brain, data_range),
          'mae': _flat_metric(metrics.mae, synthesised, real, brain, data_range)}


def brasyn_scale(volume, brain) -> np.ndarray:
  """Clip at the volume's own brain percentiles, scale to [0, 1]; 0 outside the brain."""
  if not brain.any():
    return np.zeros_like(volume)
  low, high = np.percentile(volume[brain], BRASYN_PERCENTILES)
  scaled = (np.clip(volume, low, high) - low) / (high - low if high > low else 1.0)
  return np.where(brain, scaled, 0).astype(np.float32)


def brasyn_metrics(synthesised, real, brain, seg) -> dict[str, float]:
  x, y = brasyn_scale(synthesised, brain), brasyn_scale(real, brain)
  out = {'psnr': min(_flat_metric(metrics.psnr, x, y, brain, 1.0), PSNR_CAP),
         'ssim': _ssim_volume(x, y, brain, 1.0),
         'ssim_tumour': math.nan, 'ssim_non_tumour': math.nan}
  if seg is not None:
    tumour = brain & (seg > 0)
    out['ssim_tumour'] = _ssim_volume(x, y, tumour, 1.0)
    out['ssim_non_tumour'] = _ssim_volume(x, y, brain & ~tumour, 1.0)
  return out


# --------------------------------------------------------------------------
# Original-geometry volumes of a subject.


@dataclasses.dataclass
class SubjectVolumes:
  real: np.ndarray         # [M, X, Y, S] original intensities, selected slices only
  brain: np.ndarray        # [X, Y, S] bool
  seg: np.ndarray | None   # [X, Y, S]
  source: str              # 'source files' | 'prepared slices'
  why_not_source: str = ''  # with 'prepared slices': why the source files were not used


def _read_source(entry, modalities):
  """(real, seg) at the selected slices, or (None, why) when the source files are missing,
  cannot be read, or are not the ones prepared (their size or time differs from the
  manifest's fingerprint: a regenerated raw tree would move every volume metric)."""
  paths = [entry.get('files', {}).get(m) for m in modalities]
  if not all(paths):
    return None, 'the manifest names no source file for every modality'
  problem = manifest_lib.source_file_problem(entry)
  if problem:
    return None, problem
  shape, keep = entry['shape'], entry['slices']
  try:
    real = np.stack([nifti.read_voxels(p, shape)[:, :, keep] for p in paths])
    seg = None
    if entry.get('seg') and pathlib.Path(entry['seg']).is_file():
      seg = nifti.read_labels(entry['seg'], shape)[:, :, keep]
  except Exception as e:  # pylint: disable=broad-except  # Fall back to the prepared slices.
    return None, nifti.one_line(e)
  return (real, seg), ''


def _invert(slices, entry, options, fill, labels=False):
  """[S, H, W] prepared slices -> [X, Y, S] on the original grid."""
  x, y, _ = entry['shape']
  return preprocess.slices_to_volume(slices, (x, y, len(slices)), range(len(slices)),
                                     options['geometry'], fill=fill, labels=labels)


def subject_volumes(subject, entry, manifest) -> SubjectVolumes:
  """Real volumes from the source NIfTI files named in the manifest, else inverted slices
  (`subject`: its prepared `images` [S, H, W, M] and `seg`)."""
  modalities, options = manifest['modalities'], manifest['options']
  fill = manifest['background_value']
  source, why_not = _read_source(entry, modalities)
  if source is not None:
    real, seg = source
    brain = (real != 0).any(axis=0)
    return SubjectVolumes(real, brain, seg, 'source files')
  normed = [_invert(subject.images[..., i], entry, options, fill) for i in range(len(modalities))]
  brain = np.any([np.abs(v - fill) > 1e-3 for v in normed], axis=0)
  real = np.stack([preprocess.denormalise(v, entry['normalisation'][m], brain_mask=brain)
                   for v, m in zip(normed, modalities)])
  seg = None if subject.seg is None else _invert(subject.seg, entry, options, 0, labels=True)
  return SubjectVolumes(real, brain, seg, 'prepared slices', why_not)


def synthesised_volume(slices, entry, manifest, target, brain) -> np.ndarray:
  """[S, H, W] synthesised prepared slices -> [X, Y, S] at the target's original intensities."""
  volume = _invert(slices, entry, manifest['options'], manifest['background_value'])
  return preprocess.denormalise(volume, entry['normalisation'][target], brain_mask=brain)
