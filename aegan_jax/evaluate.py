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
The generator runs through `inference.Synthesizer`; source NIfTI files are
read with `data_prep.nifti`.

Writes `<workdir>/eval/<step>/` (with `reports`): metrics.json (summary and per-subject
values), metrics.csv (one row per method, protocol, target and subject),
metrics.md (mean +- std over subjects) and grid_<target>.png (best, median
and worst subject).  See docs/evaluation.md.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from aegan_jax import data
from aegan_jax import inference
from aegan_jax import metrics
from aegan_jax import models
from aegan_jax import reports
from data_prep import nifti
from data_prep import prepare
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


def copy_scores(prepared_dir, split, num_modalities) -> np.ndarray:
  """[M, M] mean over subjects of the aegan-PSNR of input j copied as target t ([t, j])."""
  total, count = np.zeros((num_modalities, num_modalities)), 0
  for subject in iterate_subjects(prepared_dir, split):
    total += copy_psnr(subject.images)
    count += 1
  scores = total / max(count, 1)
  np.fill_diagonal(scores, -np.inf)
  return scores


def best_input(scores, target: int, available) -> int:
  """The available input whose copy scores best for `target`."""
  available = list(available)
  return available[int(np.argmax(scores[target, available]))]


def scenario_cells(num_modalities: int, any_set: bool) -> list[tuple[tuple[int, ...], int]]:
  """(available inputs, target) pairs to evaluate, from the training scenarios
  (`data.scenario_pairs`): every other modality in (the paper's scenario), by target, or
  with an any-set generator every non-empty set of them, largest first."""
  fewest = 1 if any_set else num_modalities - 1
  cells = [(tuple(int(i) for i in np.flatnonzero(available)), target) for target, available
           in data.scenario_pairs(range(num_modalities), num_modalities, fewest)]
  return sorted(cells, key=lambda cell: (-len(cell[0]), cell)) if any_set else cells


def available_label(modalities, available) -> str:
  """An any-set cell's inputs as one row field, e.g. 't1+flair'."""
  return '+'.join(modalities[i] for i in available)


def is_paper_scenario(row, num_modalities) -> bool:
  """A row of the official generator, or of an any-set cell with every other modality in."""
  return 'available' not in row or len(row['available'].split('+')) == num_modalities - 1


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
  problem = prepare.source_file_problem(entry)
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


def subject_volumes(subject: Subject, entry, manifest) -> SubjectVolumes:
  """Real volumes from the source NIfTI files named in the manifest, else inverted slices."""
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


# --------------------------------------------------------------------------
# One subject.


def evaluate_subject(synthesizer, subject, entry, manifest, scores, cells):
  """Rows (method, protocol, target, subject, metrics) of every (available, target) cell
  and grid material of one subject."""
  modalities = manifest['modalities']
  volumes = subject_volumes(subject, entry, manifest)
  any_set = synthesizer.generator.any_set
  synthesised = synthesise_cells(synthesizer, subject.images, cells)
  sources = [best_input(scores, t, available) for available, t in cells]
  copied = sorted(set(zip(sources, (t for _, t in cells))))  # a copy depends on these only
  score = lambda slices, targets: _protocol_results(slices, targets, subject, entry, manifest,
                                                    volumes, synthesizer.batch_size)
  models_by_cell = score(synthesised, [t for _, t in cells])
  copies = dict(zip(copied, score([subject.images[..., j] for j, _ in copied],
                                  [t for _, t in copied])))
  rows = []
  for (available, t), source, model in zip(cells, sources, models_by_cell):
    cell = {'available': available_label(modalities, available)} if any_set else {}
    for method, results in (('model', model), ('baseline', copies[source, t])):
      for protocol in PROTOCOLS:
        rows.append({'method': method, 'protocol': protocol, 'target': modalities[t],
                     'subject': subject.subject_id, 'num_slices': len(subject.slices),
                     'source': modalities[source] if method == 'baseline' else '',
                     **cell, **results[protocol]})
  return rows, _grid_material(subject, cells, synthesised, manifest), volumes


def synthesise_cells(synthesizer, images, cells) -> list[np.ndarray]:
  """Each (available, target) cell's [S, H, W] synthesis of a subject's slices, from one
  generator call over all cells (fewer, fuller batches than a call per cell)."""
  s, m = len(images), images.shape[-1]
  targets = np.repeat([t for _, t in cells], s)
  available = np.repeat([np.isin(np.arange(m), a) for a, _ in cells], s, axis=0)
  out = synthesizer(np.tile(images, (len(cells), 1, 1, 1)), targets,
                    positions=np.tile(np.arange(s), len(cells)), available=available)
  return list(out.reshape(len(cells), s, *out.shape[1:]))


def _grid_material(subject, cells, synthesised, manifest):
  """The slice with the most brain: all modalities, each target's paper-scenario
  synthesis and, with more cells than targets (any-set), every cell's synthesis."""
  m = len(manifest['modalities'])
  full = {t: synth for (available, t), synth in zip(cells, synthesised)
          if len(available) == m - 1}
  k = int(np.argmax((subject.images > manifest['background_value'] + 1e-3).any(-1).sum((1, 2))))
  grid = {'images': subject.images[k].astype(np.float16),
          'synthesised': np.stack([full[t][k] for t in range(m)]).astype(np.float16)}
  if len(cells) > m:
    grid['cells'] = np.stack([synth[k] for synth in synthesised]).astype(np.float16)
  return grid


def _protocol_results(slices, targets, subject, entry, manifest, volumes, batch_size):
  """[{protocol: {metric: value}}] of each [S, H, W] synthesised (or copied) slices against
  its target; the 2D metrics of all of them in one pass."""
  s = len(subject.slices)
  aegan = slice_metrics(np.concatenate(slices),
                        np.concatenate([subject.images[..., t] for t in targets]), batch_size)
  results = []
  for i, (cell_slices, t) in enumerate(zip(slices, targets)):
    volume = synthesised_volume(cell_slices, entry, manifest, manifest['modalities'][t],
                                volumes.brain)
    results.append({
        'aegan': {m: float(np.mean(v[i * s:(i + 1) * s])) for m, v in aegan.items()},
        'volume': volume_metrics(volume, volumes.real[t], volumes.brain),
        'brasyn': brasyn_metrics(volume, volumes.real[t], volumes.brain, volumes.seg)})
  return results


# --------------------------------------------------------------------------
# Aggregation.


def summarise_scenarios(rows, modalities, cells) -> list[dict]:
  """One entry per (available set, target) cell: {available, target, model, baseline},
  each method {protocol: {metric: {mean, std, n}}}."""
  by_cell = {}
  for row in rows:
    by_cell.setdefault((row['available'], row['target']), []).append(row)
  scenarios = []
  for available, t in cells:
    cell_rows = by_cell[(available_label(modalities, available), modalities[t])]
    stats = summarise(cell_rows, [modalities[t]])
    scenarios.append({'available': [modalities[i] for i in available], 'target': modalities[t],
                      **{method: {protocol: stats[method][protocol][modalities[t]]
                                  for protocol in PROTOCOLS} for method in METHODS}})
  return scenarios


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
  config, prepared_dir, manifest, evaluated_split = _prepared_split(config, workdir, split, log)
  modalities = list(manifest['modalities'])
  synthesizer = _synthesizer(config, workdir, step, batch_size, variables, len(modalities))
  step = synthesizer.step
  scores = copy_scores(prepared_dir, evaluated_split, len(modalities))
  everything = range(len(modalities))
  baselines = [best_input(scores, t, [j for j in everything if j != t]) for t in everything]
  any_set = synthesizer.generator.any_set
  cells = scenario_cells(len(modalities), any_set)
  _log_start(synthesizer, prepared_dir, evaluated_split, manifest, baselines, log)
  # Official-mode results sit beside the eval-mode ones instead of replacing them.
  folder = f'{step}-official' if synthesizer.official_test_mode else str(step)
  out_dir = pathlib.Path(output_dir or pathlib.Path(workdir) / 'eval' / folder)
  if main_process:
    _check_writable(out_dir)  # Before the work, not after it.
  extra = _downstream(config, synthesizer, prepared_dir, evaluated_split, manifest, scores,
                      cells, log)
  rows, grids, sources, num_slices = _evaluate_subjects(
      synthesizer, prepared_dir, evaluated_split, manifest, scores, cells, log)
  # The paper's scenario (every other modality in) is the summary for either generator.
  paper_rows = [r for r in rows if is_paper_scenario(r, len(modalities))]
  summary = summarise(paper_rows, modalities)
  _log_targets(summary, modalities, baselines, log)
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
      **({'scenarios': summarise_scenarios(rows, modalities, cells)} if any_set else {}),
      **extra,
      'seconds': time.perf_counter() - start,
      'paths': _output_paths(out_dir, modalities, any_set),
  }
  if main_process:
    try:
      reports.write_outputs(report, rows, paper_rows, grids, out_dir, cells)
    except OSError as e:
      raise EvaluationError(f'{e.filename or out_dir}: cannot write ({e.strerror or e})') from None
  log(f'evaluate: wrote {out_dir} in {report["seconds"]:.1f} s')
  return report


def _downstream(config, synthesizer, prepared_dir, split, manifest, scores, cells, log):
  """{'downstream': tumour-segmentation Dice per scenario} when `config.eval.segmenter_workdir`
  names a segmenter run, else {}.  Run before the metrics, so a bad segmenter fails at once."""
  segmenter_workdir = config.get('eval', {}).get('segmenter_workdir', '')
  if not segmenter_workdir:
    return {}
  # Imported here: `downstream` reads subjects through this module.
  from aegan_jax import downstream  # pylint: disable=g-import-not-at-top
  return {'downstream': downstream.evaluate_downstream(
      segmenter_workdir, synthesizer, prepared_dir, split, manifest, scores, cells, log)}


def _prepared_split(config, workdir, split, log):
  """(config with the prepared data's choices, prepared dir, manifest, split to evaluate);
  the checkpoint's restore then checks that it was trained on data prepared the same way."""
  prepared_dir = data.prepared_dir_for(config, workdir)
  manifest = data.load_manifest(prepared_dir)
  config = config.copy_and_resolve_references()
  data.adopt_preparation(config.data, manifest, prepared_dir, log)
  return config, prepared_dir, manifest, resolve_split(prepared_dir, split, log)


def _synthesizer(config, workdir, step, batch_size, variables, num_modalities):
  """The checkpoint's generator, or `variables` when given (then `step` only labels them)."""
  official_mode = inference.official_test_mode(config)
  if variables is None:
    return inference.Synthesizer.restore(workdir, step=step, config=config,
                                         batch_size=batch_size, official_test_mode=official_mode)
  generator, _ = models.build_networks(config.model, num_modalities)
  return inference.Synthesizer(generator, variables, config, step=step, batch_size=batch_size,
                               official_test_mode=official_mode)


def _output_paths(out_dir, modalities, any_set) -> dict[str, str]:
  grids = ('grid', 'inputs') if any_set else ('grid',)
  return {**{name: str(out_dir / name) for name in ('metrics.json', 'metrics.csv', 'metrics.md')},
          **{f'{g}_{t}': str(out_dir / f'{g}_{t}.png') for g in grids for t in modalities}}


def _check_writable(out_dir: pathlib.Path) -> None:
  try:
    reports.ensure_writable(out_dir)
  except OSError as e:
    raise EvaluationError(f'{out_dir}: cannot write the evaluation there '
                          f'({e.strerror or e})') from None


def _evaluate_subjects(synthesizer, prepared_dir, split, manifest, scores, cells, log):
  """Rows of every subject of `split`, its grid material by subject, the volume sources
  used and the number of slices."""
  rows, grids, sources, num_slices = [], {}, set(), 0
  num_subjects = manifest['splits'][split]['subjects']
  for i, subject in enumerate(iterate_subjects(prepared_dir, split)):
    tick = time.perf_counter()
    if subject.subject_id not in manifest['subjects']:
      raise EvaluationError(f'{pathlib.Path(prepared_dir) / prepare.MANIFEST}: no entry for '
                            f'subject {subject.subject_id}, whose slices the {split} split '
                            'holds; prepare again')
    subject_rows, grids[subject.subject_id], volumes = evaluate_subject(
        synthesizer, subject, manifest['subjects'][subject.subject_id], manifest, scores, cells)
    if volumes.why_not_source:
      log(f'warning: {subject.subject_id}: the volume and brasyn metrics use the prepared '
          f'slices, not the source files: {volumes.why_not_source}')
    rows += subject_rows
    sources.add(volumes.source)
    num_slices += len(subject.slices)
    log(f'  [{i + 1}/{num_subjects}] {subject.subject_id}: {len(subject.slices)} slices x '
        f'{len(cells)} scenarios, {time.perf_counter() - tick:.1f} s')
  return rows, grids, sources, num_slices


def _log_start(synthesizer, prepared_dir, split, manifest, baselines, log) -> None:
  modalities = manifest['modalities']
  log(f'evaluate: step {synthesizer.step}, split {split} '
      f'({manifest["splits"][split]["subjects"]} subjects, '
      f'{data.num_examples(prepared_dir, split)} slices), '
      f'{synthesizer.mesh.devices.size} device(s); baselines: ' +
      ', '.join(f'{t} <- {modalities[b]}' for t, b in zip(modalities, baselines)))


def _log_targets(summary, modalities, baselines, log) -> None:
  for target in modalities:
    model, base = summary['model']['aegan'][target], summary['baseline']['aegan'][target]
    log(f'  target {target}: aegan PSNR {model["psnr"]["mean"]:.2f} dB, '
        f'SSIM {model["ssim"]["mean"]:.4f} (copy {modalities[baselines[modalities.index(target)]]}:'
        f' {base["psnr"]["mean"]:.2f} dB, {base["ssim"]["mean"]:.4f}); volume PSNR '
        f'{summary["model"]["volume"][target]["psnr"]["mean"]:.2f} dB')
