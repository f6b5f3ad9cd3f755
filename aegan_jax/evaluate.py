"""Evaluates a checkpoint's generator on a prepared split, in three protocols.

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

Every single-missing scenario (each modality as the target) is run, and the
same metrics for a trivial baseline: the input modality that, copied as it is
prepared, gives the highest mean aegan-PSNR for that target on this split.

Writes `<workdir>/eval/<step>/`: metrics.json (summary and per-subject
values), metrics.csv (one row per method, protocol, target and subject),
metrics.md (mean +- std over subjects) and grid_<target>.png (best, median
and worst subject).  See docs/evaluation.md.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
from PIL import Image
from PIL import ImageDraw

from aegan_jax import data
from aegan_jax import metrics
from aegan_jax import models
from aegan_jax import synthesize
from data_prep import preprocess

PROTOCOLS = ('aegan', 'volume', 'brasyn')
METRICS = {'aegan': ('psnr', 'ssim', 'fsim', 'mae'),
           'volume': ('psnr', 'ssim', 'mae'),
           'brasyn': ('psnr', 'ssim', 'ssim_tumour', 'ssim_non_tumour')}
METHODS = ('model', 'baseline')
PSNR_CAP = 100.0  # dB; identical images (e.g. empty slices copied) would give inf.
BRASYN_PERCENTILES = (0.5, 99.5)
MIN_SSIM3D_SLICES = 11  # The 3D window is 11 voxels deep.


class EvaluationError(ValueError):
  """Nothing to evaluate (one-line message)."""


@dataclasses.dataclass
class Subject:
  subject_id: str
  slices: list[int]          # axial indices in the original volume
  images: np.ndarray         # [S, H, W, M] prepared (normalised) slices
  seg: np.ndarray | None     # [S, H, W] labels


def iterate_subjects(prepared_dir, split):
  examples = data.iterate_split(prepared_dir, split)
  for subject_id, group in itertools.groupby(examples, key=lambda e: e['subject_id']):
    group = list(group)
    seg = np.stack([e['seg'] for e in group]) if 'seg' in group[0] else None
    yield Subject(subject_id, [e['slice_index'] for e in group],
                  np.stack([e['images'] for e in group]), seg)


def resolve_split(prepared_dir, split, log=print) -> str:
  """`split`, or 'val' then 'train' when it holds no slices (tiny demo datasets)."""
  for candidate in dict.fromkeys((split, 'val', 'train')):
    if data.num_examples(prepared_dir, candidate) > 0:
      if candidate != split:
        log(f'warning: split {split!r} of {prepared_dir} holds no slices; evaluating '
            f'{candidate!r} instead')
      return candidate
  raise EvaluationError(f'{prepared_dir}: no split holds any slice')


def to_unit(x):
  """Prepared [-1, 1] values -> [0, 1] (the official evaluation scale)."""
  return np.clip((np.asarray(x, np.float32) + 1) / 2, 0, 1)


# --------------------------------------------------------------------------
# Baseline: the best input modality copied as the synthesis.


def copy_psnr(images) -> np.ndarray:
  """[M, M] mean over slices of the aegan-PSNR of modality j copied as modality t ([t, j])."""
  x = to_unit(images)
  mse = np.mean(np.square(x[..., :, None] - x[..., None, :]), axis=(1, 2))  # [S, M, M]
  with np.errstate(divide='ignore'):
    return np.minimum(10 * np.log10(1 / mse), PSNR_CAP).mean(axis=0)


def choose_baselines(prepared_dir, split, num_modalities) -> list[int]:
  """Per target, the input with the highest mean (over subjects) aegan-PSNR."""
  total, count = np.zeros((num_modalities, num_modalities)), 0
  for subject in iterate_subjects(prepared_dir, split):
    total += copy_psnr(subject.images)
    count += 1
  scores = total / max(count, 1)
  np.fill_diagonal(scores, -np.inf)
  return [int(i) for i in np.argmax(scores, axis=1)]


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


def _ssim_volume(x, y, mask, data_range) -> float:
  """SSIM of [X, Y, Z] volumes: 3D with >= 11 slices, else the mean masked 2D SSIM."""
  if not mask.any():
    return math.nan
  x, y, mask = (np.moveaxis(v, -1, 0) for v in (x, y, mask))  # [Z, X, Y]
  if x.shape[0] >= MIN_SSIM3D_SLICES:
    return float(metrics.ssim3d(x, y, data_range=data_range, mask=mask))
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


def _read_source(entry, modalities):
  """The original volumes at the selected slices, or None when a file is unavailable."""
  paths = [entry.get('files', {}).get(m) for m in modalities]
  if not all(p and pathlib.Path(p).is_file() for p in paths):
    return None
  try:
    real = np.stack([np.asarray(nib.load(p).dataobj, np.float32).reshape(entry['shape'])
                     [:, :, entry['slices']] for p in paths])
    seg = None
    if entry.get('seg') and pathlib.Path(entry['seg']).is_file():
      seg = np.rint(np.asarray(nib.load(entry['seg']).dataobj, np.float32).reshape(
          entry['shape'])[:, :, entry['slices']]).astype(np.uint8)
  except Exception:  # pylint: disable=broad-except  # Fall back to the prepared slices.
    return None
  return real, seg


def _invert(slices, entry, options, fill, labels=False):
  """[S, H, W] prepared slices -> [X, Y, S] on the original grid."""
  x, y, _ = entry['shape']
  return preprocess.slices_to_volume(slices, (x, y, len(slices)), range(len(slices)),
                                     options['geometry'], fill=fill, labels=labels)


def subject_volumes(subject: Subject, entry, manifest) -> SubjectVolumes:
  """Real volumes from the source NIfTI files named in the manifest, else inverted slices."""
  modalities, options = manifest['modalities'], manifest['options']
  fill = manifest['background_value']
  source = _read_source(entry, modalities)
  if source is not None:
    real, seg = source
    brain = (real != 0).any(axis=0)
    return SubjectVolumes(real, brain, seg, 'source files')
  normed = [_invert(subject.images[..., i], entry, options, fill) for i in range(len(modalities))]
  brain = np.any([np.abs(v - fill) > 1e-3 for v in normed], axis=0)
  real = np.stack([preprocess.denormalise(v, entry['normalisation'][m], brain_mask=brain)
                   for v, m in zip(normed, modalities)])
  seg = None if subject.seg is None else _invert(subject.seg, entry, options, 0, labels=True)
  return SubjectVolumes(real, brain, seg, 'prepared slices')


def synthesised_volume(slices, entry, manifest, target, brain) -> np.ndarray:
  """[S, H, W] synthesised prepared slices -> [X, Y, S] at the target's original intensities."""
  volume = _invert(slices, entry, manifest['options'], manifest['background_value'])
  return preprocess.denormalise(volume, entry['normalisation'][target], brain_mask=brain)


# --------------------------------------------------------------------------
# One subject.


def evaluate_subject(synthesizer, subject, entry, manifest, baselines):
  """Rows (method, protocol, target, subject, metrics) and grid material of one subject."""
  modalities = manifest['modalities']
  volumes = subject_volumes(subject, entry, manifest)
  rows, synthesised = [], []
  for t, target in enumerate(modalities):
    synth = synthesizer(subject.images, t)
    synthesised.append(synth)
    real_slices = subject.images[..., t]
    for method, slices in (('model', synth), ('baseline', subject.images[..., baselines[t]])):
      aegan = slice_metrics(slices, real_slices, synthesizer.batch_size)
      volume = synthesised_volume(slices, entry, manifest, target, volumes.brain)
      results = {
          'aegan': {m: float(np.mean(v)) for m, v in aegan.items()},
          'volume': volume_metrics(volume, volumes.real[t], volumes.brain),
          'brasyn': brasyn_metrics(volume, volumes.real[t], volumes.brain, volumes.seg),
      }
      for protocol in PROTOCOLS:
        rows.append({'method': method, 'protocol': protocol, 'target': target,
                     'subject': subject.subject_id, 'num_slices': len(subject.slices),
                     'source': modalities[baselines[t]] if method == 'baseline' else '',
                     **results[protocol]})
  # Grid material: the slice with the most brain, all modalities and every synthesis.
  k = int(np.argmax((subject.images > manifest['background_value'] + 1e-3).any(-1).sum((1, 2))))
  grid = {'images': subject.images[k].astype(np.float16),
          'synthesised': np.stack([s[k] for s in synthesised]).astype(np.float16)}
  return rows, grid, volumes.source


# --------------------------------------------------------------------------
# Aggregation and reports.


def summarise(rows, modalities) -> dict:
  """{method: {protocol: {target: {metric: {mean, std, n}}}}}; NaNs (e.g. no tumour) skipped."""
  summary = {}
  for method, protocol, target in itertools.product(METHODS, PROTOCOLS, modalities):
    selected = [r for r in rows if (r['method'], r['protocol'], r['target']) ==
                (method, protocol, target)]
    stats = {}
    for metric in METRICS[protocol]:
      values = np.array([r[metric] for r in selected], np.float64)
      values = values[np.isfinite(values)]
      stats[metric] = ({'mean': float(values.mean()), 'std': float(values.std()),
                        'n': int(values.size)} if values.size else
                       {'mean': math.nan, 'std': math.nan, 'n': 0})
    summary.setdefault(method, {}).setdefault(protocol, {})[target] = stats
  return summary


def scalars(summary, modalities) -> dict[str, float]:
  """Flat means for logging: '<protocol>/<target>/<metric>', 'baseline/...', '.../all/...'."""
  out = {}
  for method, protocol in itertools.product(METHODS, PROTOCOLS):
    prefix = '' if method == 'model' else 'baseline/'
    for metric in METRICS[protocol]:
      means = [summary[method][protocol][t][metric]['mean'] for t in modalities]
      for target, mean in zip(modalities, means):
        out[f'{prefix}{protocol}/{target}/{metric}'] = mean
      finite = [m for m in means if np.isfinite(m)]
      out[f'{prefix}{protocol}/all/{metric}'] = float(np.mean(finite)) if finite else math.nan
  return out


PROTOCOL_TITLES = {
    'aegan': 'aegan: 2D slices as prepared, [-1, 1] -> [0, 1], data range 1',
    'volume': 'volume: 3D at original intensities, brain mask, data range = real max - min',
    'brasyn': 'brasyn: 3D, each volume clipped at its 0.5 / 99.5 brain percentiles -> [0, 1]',
}
METRIC_HEADERS = {'psnr': 'PSNR (dB) ↑', 'ssim': 'SSIM ↑', 'fsim': 'FSIM ↑', 'mae': 'MAE ↓',
                  'ssim_tumour': 'SSIM tumour ↑', 'ssim_non_tumour': 'SSIM non-tumour ↑'}


def _format(value, metric, protocol, signed=False):
  if not np.isfinite(value):
    return '–'
  digits = 2 if metric == 'psnr' or (metric == 'mae' and protocol == 'volume') else 4
  return f'{value:+.{digits}f}' if signed else f'{value:.{digits}f}'


def markdown(report) -> str:
  summary, modalities = report['summary'], report['modalities']
  lines = [f'# Evaluation: step {report["step"]}, split {report["split"]}', '',
           f'{report["num_subjects"]} subjects, {report["num_slices"]} slices; '
           f'workdir `{report["workdir"]}`; real volumes from {report["volume_reference"]}. '
           'Mean ± std over subjects. Baseline: the named input modality copied as '
           'the synthesis (the best one per target by mean aegan-PSNR on this split); '
           '*margin* = AE-GAN − baseline. Generator run ' +
           ('as the official test.py runs it (each slice alone in train mode, dropout on).'
            if report.get('official_test_mode') else
            'in eval mode (BatchNorm running statistics, no dropout).'), '']
  for protocol in PROTOCOLS:
    metrics = METRICS[protocol]
    lines += [f'## {PROTOCOL_TITLES[protocol]}', '',
              '| target | method | ' + ' | '.join(METRIC_HEADERS[m] for m in metrics) + ' |',
              '|---|---|' + '---:|' * len(metrics)]
    for target in modalities:
      model = summary['model'][protocol][target]
      base = summary['baseline'][protocol][target]
      cell = lambda s, m: (f'{_format(s[m]["mean"], m, protocol)} ± '
                           f'{_format(s[m]["std"], m, protocol)}' if s[m]['n'] else '–')
      lines.append(f'| {target} | AE-GAN | ' + ' | '.join(cell(model, m) for m in metrics) + ' |')
      lines.append(f'| {target} | copy {report["baselines"][target]} | ' +
                   ' | '.join(cell(base, m) for m in metrics) + ' |')
      margins = [_format(model[m]['mean'] - base[m]['mean'], m, protocol, signed=True)
                 for m in metrics]
      lines.append(f'| {target} | *margin* | ' + ' | '.join(margins) + ' |')
    lines.append('')
  return '\n'.join(lines)


CSV_FIELDS = ('method', 'protocol', 'target', 'subject', 'num_slices', 'source', 'psnr', 'ssim',
              'fsim', 'mae', 'ssim_tumour', 'ssim_non_tumour')


def write_csv(rows, path) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, CSV_FIELDS, restval='')
    writer.writeheader()
    for row in rows:
      writer.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in row.items()})


GRID_MIN_TILE = 128  # px


def _display(image, low=-1.0, high=1.0):
  """[H, W] -> uint8, rotated so that the stored [X, Y] slice looks like a radiology view."""
  scaled = np.clip((np.asarray(image, np.float32) - low) / (high - low), 0, 1)
  return np.rot90((scaled * 255).astype(np.uint8))


def write_grid(target_index, picks, modalities, path) -> None:
  """Rows: (label, grid material); columns: inputs, synthesis, target, |error| x2."""
  inputs = [i for i in range(len(modalities)) if i != target_index]
  titles = [modalities[i] for i in inputs] + ['synthesis', f'real {modalities[target_index]}',
                                              '|error| x2']
  tiles = []
  for _, grid in picks:
    synth = grid['synthesised'][target_index].astype(np.float32)
    real = grid['images'][..., target_index].astype(np.float32)
    # |error| on the [0, 1] scale, doubled so that small errors show.
    row = [grid['images'][..., i] for i in inputs] + [synth, real]
    tiles.append([_display(t) for t in row] + [_display(np.abs(synth - real), 0, 1)])
  # Small images are enlarged (nearest) so that the labels fit.
  zoom = max(1, math.ceil(GRID_MIN_TILE / tiles[0][0].shape[1]))
  tiles = [[t.repeat(zoom, 0).repeat(zoom, 1) for t in row] for row in tiles]
  h, w = tiles[0][0].shape
  header, label_w = 14, 0
  canvas = Image.new('L', (w * len(titles), header + (h + header) * len(picks)), 0)
  draw = ImageDraw.Draw(canvas)
  for c, title in enumerate(titles):
    draw.text((c * w + 2, 1), title, fill=255)
  for r, ((label, _), row) in enumerate(zip(picks, tiles)):
    top = header + r * (h + header)
    draw.text((label_w + 2, top + 1), label, fill=255)
    for c, tile in enumerate(row):
      canvas.paste(Image.fromarray(np.ascontiguousarray(tile)), (c * w, top + header))
  canvas.save(path)


def pick_subjects(rows, grids, target):
  """(label, grid) of the best, median and worst subject by model aegan-PSNR."""
  scored = sorted(((r['psnr'], r['subject']) for r in rows if r['method'] == 'model' and
                   r['protocol'] == 'aegan' and r['target'] == target), reverse=True)
  chosen = [('best', scored[0]), ('median', scored[len(scored) // 2]), ('worst', scored[-1])]
  return [(f'{label}: {subject} ({psnr:.2f} dB)', grids[subject])
          for label, (psnr, subject) in chosen]


# --------------------------------------------------------------------------
# Entry point.


def evaluate(config, workdir, *, step=None, split='test', batch_size=16, variables=None,
             output_dir=None, log=print) -> dict:
  """Evaluates the generator of `workdir`'s checkpoint (latest unless `step`) on `split`.

  Args:
    config: the run's config (architecture and data fields must match the checkpoint).
    workdir: run folder; outputs go to `<workdir>/eval/<step>/` (`<step>-official` in
      official test mode) unless `output_dir`.
    step: checkpoint step; None for the latest.
    split: 'test' by default; an empty split falls back to 'val', then 'train'.
    batch_size: slices per device batch (rounded up to a multiple of the device count).
    variables: generator variables to use instead of restoring (then `step` labels them).
    log: progress printer (only process 0 logs and writes files).

  Returns:
    The report written to metrics.json, less the per-subject rows: step, split,
    baselines, summary {method: {protocol: {target: {metric: {mean, std, n}}}}},
    scalars {'<protocol>/<target>/<metric>': mean, 'baseline/...': ...}, paths.
  """
  main_process = jax.process_index() == 0
  log = log if main_process else (lambda *a, **k: None)
  start = time.perf_counter()
  prepared_dir = data.prepared_dir_for(config, workdir)
  manifest = data.load_manifest(prepared_dir)
  modalities = list(manifest['modalities'])
  if modalities != list(config.data.modalities):
    raise EvaluationError(f'{prepared_dir} holds {modalities} but the config has '
                          f'{list(config.data.modalities)}')
  evaluated_split = resolve_split(prepared_dir, split, log)
  official_mode = synthesize.official_test_mode(config)
  if variables is None:
    synthesizer = synthesize.Synthesizer.restore(workdir, step=step, config=config,
                                                 batch_size=batch_size,
                                                 official_test_mode=official_mode)
  else:
    generator, _ = models.build_networks(config.model, len(modalities))
    synthesizer = synthesize.Synthesizer(generator, variables, config, step=step,
                                         batch_size=batch_size, official_test_mode=official_mode)
  step = synthesizer.step
  baselines = choose_baselines(prepared_dir, evaluated_split, len(modalities))
  num_subjects = manifest['splits'][evaluated_split]['subjects']
  log(f'evaluate: step {step}, split {evaluated_split} ({num_subjects} subjects, '
      f'{data.num_examples(prepared_dir, evaluated_split)} slices), '
      f'{synthesizer.mesh.devices.size} device(s); baselines: ' +
      ', '.join(f'{t} <- {modalities[b]}' for t, b in zip(modalities, baselines)))
  # Official-mode results sit beside the eval-mode ones instead of replacing them.
  folder = f'{step}-official' if synthesizer.official_test_mode else str(step)
  out_dir = pathlib.Path(output_dir or pathlib.Path(workdir) / 'eval' / folder)
  if main_process:
    _check_writable(out_dir)  # Before the work, not after it.
  rows, grids, sources, num_slices = [], {}, set(), 0
  for i, subject in enumerate(iterate_subjects(prepared_dir, evaluated_split)):
    tick = time.perf_counter()
    subject_rows, grids[subject.subject_id], source = evaluate_subject(
        synthesizer, subject, manifest['subjects'][subject.subject_id], manifest, baselines)
    rows += subject_rows
    sources.add(source)
    num_slices += len(subject.slices)
    log(f'  [{i + 1}/{num_subjects}] {subject.subject_id}: {len(subject.slices)} slices x '
        f'{len(modalities)} targets, {time.perf_counter() - tick:.1f} s')
  summary = summarise(rows, modalities)
  for target in modalities:
    model, base = summary['model']['aegan'][target], summary['baseline']['aegan'][target]
    log(f'  target {target}: aegan PSNR {model["psnr"]["mean"]:.2f} dB, '
        f'SSIM {model["ssim"]["mean"]:.4f} (copy {modalities[baselines[modalities.index(target)]]}:'
        f' {base["psnr"]["mean"]:.2f} dB, {base["ssim"]["mean"]:.4f}); volume PSNR '
        f'{summary["model"]["volume"][target]["psnr"]["mean"]:.2f} dB')
  report = {
      'step': step, 'split': evaluated_split, 'requested_split': split,
      'official_test_mode': synthesizer.official_test_mode,
      'workdir': str(pathlib.Path(workdir).resolve()), 'prepared_dir': str(prepared_dir),
      'modalities': modalities, 'num_subjects': len(grids), 'num_slices': num_slices,
      'volume_reference': ' and '.join(sorted(sources)),
      'baselines': {t: modalities[b] for t, b in zip(modalities, baselines)},
      'protocols': {p: {'metrics': list(METRICS[p]), 'definition': PROTOCOL_TITLES[p]}
                    for p in PROTOCOLS},
      'psnr_cap_db': PSNR_CAP,
      'summary': summary, 'scalars': scalars(summary, modalities),
      'seconds': time.perf_counter() - start,
      'paths': {**{name: str(out_dir / name) for name in ('metrics.json', 'metrics.csv',
                                                         'metrics.md')},
                **{f'grid_{t}': str(out_dir / f'grid_{t}.png') for t in modalities}},
  }
  if main_process:
    try:
      _write_outputs(report, rows, grids, out_dir)
    except OSError as e:
      raise EvaluationError(f'{e.filename or out_dir}: cannot write ({e.strerror or e})') from None
  log(f'evaluate: wrote {out_dir} in {report["seconds"]:.1f} s')
  return report


def _check_writable(out_dir: pathlib.Path) -> None:
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir):
      pass
  except OSError as e:
    raise EvaluationError(f'{out_dir}: cannot write the evaluation there '
                          f'({e.strerror or e})') from None


def _json_safe(tree):
  """NaN (no tumour, empty mask) -> null: strict JSON."""
  if isinstance(tree, dict):
    return {k: _json_safe(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_json_safe(v) for v in tree]
  if isinstance(tree, float) and not math.isfinite(tree):
    return None
  return tree


def _write_outputs(report, rows, grids, out_dir) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  modalities = report['modalities']
  with open(out_dir / 'metrics.json', 'w') as f:
    json.dump(_json_safe({**report, 'subjects': rows}), f, indent=1, allow_nan=False)
  write_csv(rows, out_dir / 'metrics.csv')
  (out_dir / 'metrics.md').write_text(markdown(report))
  for t, target in enumerate(modalities):
    write_grid(t, pick_subjects(rows, grids, target), modalities, out_dir / f'grid_{target}.png')
