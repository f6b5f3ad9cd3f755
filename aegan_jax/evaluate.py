"""Evaluates a checkpoint's generator on a prepared split, in the three protocols of
`protocols` (aegan: 2D slices as prepared; volume: 3D at the original intensities;
brasyn: 3D, each volume clipped at its own brain percentiles).

Every single-missing scenario (each modality as the target), or with an any-set
generator every (inputs, target) cell, is run, and the same metrics for a trivial
baseline: the input modality that, copied as it is prepared, gives the highest mean
aegan-PSNR for that target on this split.  The generator runs through
`inference.Synthesizer`.

Writes `<workdir>/eval/<step>/` (with `reports`): metrics.json (summary and per-subject
values), metrics.csv (one row per method, protocol, target and subject),
metrics.md (mean +- std over subjects) and the grids.  See docs/evaluation.md."""
from __future__ import annotations

import dataclasses
import itertools
import pathlib
import time

import jax
import numpy as np

from aegan_jax import data
from aegan_jax import inference
from aegan_jax import models
from aegan_jax import protocols
from aegan_jax import reports
from data_prep import manifest as manifest_lib

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


# --------------------------------------------------------------------------
# Baseline: the best input modality copied as the synthesis.


def copy_psnr(images) -> np.ndarray:
  """[M, M] mean over slices of the aegan-PSNR of modality j copied as modality t ([t, j])."""
  x = protocols.to_unit(images)
  mse = np.mean(np.square(x[..., :, None] - x[..., None, :]), axis=(1, 2))  # [S, M, M]
  with np.errstate(divide='ignore'):
    return np.minimum(10 * np.log10(1 / mse), protocols.PSNR_CAP).mean(axis=0)


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


def is_paper_scenario(row, num_modalities) -> bool:
  """A row of the official generator, or of an any-set cell with every other modality in."""
  return 'available' not in row or len(row['available'].split('+')) == num_modalities - 1


# --------------------------------------------------------------------------
# One subject.


def evaluate_subject(synthesizer, subject, entry, manifest, scores, cells):
  """Rows (method, protocol, target, subject, metrics) of every (available, target) cell
  and grid material of one subject."""
  modalities = manifest['modalities']
  volumes = protocols.subject_volumes(subject, entry, manifest)
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
    cell = {'available': reports.available_label(modalities, available)} if any_set else {}
    for method, results in (('model', model), ('baseline', copies[source, t])):
      for protocol in protocols.PROTOCOLS:
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
  aegan = protocols.slice_metrics(np.concatenate(slices),
                        np.concatenate([subject.images[..., t] for t in targets]), batch_size)
  results = []
  for i, (cell_slices, t) in enumerate(zip(slices, targets)):
    volume = protocols.synthesised_volume(cell_slices, entry, manifest, manifest['modalities'][t],
                                volumes.brain)
    results.append({
        'aegan': {m: float(np.mean(v[i * s:(i + 1) * s])) for m, v in aegan.items()},
        'volume': protocols.volume_metrics(volume, volumes.real[t], volumes.brain),
        'brasyn': protocols.brasyn_metrics(volume, volumes.real[t], volumes.brain, volumes.seg)})
  return results


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
  out_dir = _output_dir(synthesizer, workdir, output_dir, main_process)
  extra = _downstream(config, synthesizer, prepared_dir, evaluated_split, manifest, scores,
                      cells, log)
  rows, grids, sources, num_slices = _evaluate_subjects(
      synthesizer, prepared_dir, evaluated_split, manifest, scores, cells, log)
  paper_rows, results = _summaries(rows, modalities, cells, any_set)
  _log_targets(results['summary'], modalities, baselines, log)
  report = {
      'step': step, 'split': evaluated_split, 'requested_split': split,
      'official_test_mode': synthesizer.official_test_mode,
      'workdir': str(pathlib.Path(workdir).resolve()), 'prepared_dir': str(prepared_dir),
      'modalities': modalities, 'num_subjects': len(grids), 'num_slices': num_slices,
      'volume_reference': ' and '.join(sorted(sources)),
      'baselines': {t: modalities[b] for t, b in zip(modalities, baselines)},
      **protocols.description(), **results, **extra,
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


def _output_dir(synthesizer, workdir, output_dir, main_process) -> pathlib.Path:
  """`output_dir`, or `<workdir>/eval/<step>` (`<step>-official` in official test mode: its
  results sit beside the eval-mode ones), probed before the work, not after it."""
  step = synthesizer.step
  folder = f'{step}-official' if synthesizer.official_test_mode else str(step)
  out_dir = pathlib.Path(output_dir or pathlib.Path(workdir) / 'eval' / folder)
  if main_process:
    _check_writable(out_dir)
  return out_dir


def _summaries(rows, modalities, cells, any_set):
  """(the paper scenario's rows, {summary, scalars[, scenarios]}): the paper's scenario
  (every other modality in) is the summary for either generator."""
  paper_rows = [r for r in rows if is_paper_scenario(r, len(modalities))]
  summary = reports.summarise(paper_rows, modalities)
  results = {'summary': summary, 'scalars': reports.scalars(summary, modalities)}
  if any_set:
    results['scenarios'] = reports.summarise_scenarios(rows, modalities, cells)
  return paper_rows, results


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
      raise EvaluationError(f'{pathlib.Path(prepared_dir) / manifest_lib.MANIFEST}: no entry for '
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
