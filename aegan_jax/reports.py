"""Evaluation reports: metrics.json, metrics.csv, metrics.md and grid_<target>.png.

Everything is formatted from the report `evaluate.evaluate` builds (its
`protocols` entry names each protocol's metrics and definition), so this module
needs nothing from `evaluate`; pictures come from `pictures`.  `ensure_writable` is the output
folder probe, also used for the training job's workdir (`job.make_workdir`).
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import pathlib
import tempfile

import numpy as np

from aegan_jax import pictures
from aegan_jax import protocols

METRIC_HEADERS = {'psnr': 'PSNR (dB) ↑', 'ssim': 'SSIM ↑', 'fsim': 'FSIM ↑', 'mae': 'MAE ↓',
                  'ssim_tumour': 'SSIM tumour ↑', 'ssim_non_tumour': 'SSIM non-tumour ↑'}
CSV_FIELDS = ('method', 'protocol', 'target', 'subject', 'num_slices', 'source', 'psnr', 'ssim',
              'fsim', 'mae', 'ssim_tumour', 'ssim_non_tumour')
GRID_MIN_TILE = 128  # px


def ensure_writable(folder) -> None:
  """Creates `folder` and writes a probe file in it; OSError when either fails.

  Callers probe before long work, so that a bad output folder fails at once.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryFile(dir=folder):  # A unique name: every host probes at once.
    pass


def write_outputs(report, rows, paper_rows, grids, out_dir: pathlib.Path, cells=()) -> None:
  """The files of `<workdir>/eval/<step>/` (see docs/evaluation.md); the grids show
  `paper_rows`, the paper's scenario, and with any-set `cells` (available, target) each
  target from every set of inputs (inputs_<target>.png)."""
  out_dir.mkdir(parents=True, exist_ok=True)
  modalities = report['modalities']
  with open(out_dir / 'metrics.json', 'w') as f:
    json.dump(json_safe({**report, 'subjects': rows}), f, indent=1, allow_nan=False)
  write_csv(rows, out_dir / 'metrics.csv')
  (out_dir / 'metrics.md').write_text(markdown(report))
  for t, target in enumerate(modalities):
    picks = pick_subjects(paper_rows, grids, target)
    write_grid(t, picks, modalities, out_dir / f'grid_{target}.png')
    if 'cells' in picks[1][1]:
      write_input_sets_grid(t, picks[1], cells, modalities, out_dir / f'inputs_{target}.png')


def json_safe(tree):
  """NaN (no tumour, empty mask) -> null: strict JSON."""
  if isinstance(tree, dict):
    return {k: json_safe(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [json_safe(v) for v in tree]
  if isinstance(tree, float) and not math.isfinite(tree):
    return None
  return tree


def csv_cell(value):
  """A float as 6 significant digits; text that a spreadsheet would run as a formula
  (a subject named '=1+1') behind a quote, as OWASP advises for CSV files."""
  if isinstance(value, float):
    return f'{value:.6g}'
  if isinstance(value, str) and value.startswith(('=', '+', '-', '@', '\t', '\r')):
    return "'" + value
  return value


def write_csv(rows, path) -> None:
  """One line per row; an any-set evaluation adds the `available` column first."""
  fields = (('available',) if rows and 'available' in rows[0] else ()) + CSV_FIELDS
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fields, restval='')
    writer.writeheader()
    for row in rows:
      writer.writerow({k: csv_cell(v) for k, v in row.items()})


# --------------------------------------------------------------------------
# Aggregation: per-subject rows -> means and spreads.


def available_label(modalities, available) -> str:
  """An any-set cell's inputs as one row field, e.g. 't1+flair'."""
  return '+'.join(modalities[i] for i in available)


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
                                  for protocol in protocols.PROTOCOLS}
                       for method in protocols.METHODS}})
  return scenarios


def summarise(rows, modalities) -> dict:
  """{method: {protocol: {target: {metric: {mean, std, n}}}}}; NaNs (e.g. no tumour) skipped."""
  summary = {}
  for method, protocol, target in itertools.product(protocols.METHODS, protocols.PROTOCOLS,
                                                    modalities):
    selected = [r for r in rows if (r['method'], r['protocol'], r['target']) ==
                (method, protocol, target)]
    stats = {}
    for metric in protocols.METRICS[protocol]:
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
  for method, protocol in itertools.product(protocols.METHODS, protocols.PROTOCOLS):
    prefix = '' if method == 'model' else 'baseline/'
    for metric in protocols.METRICS[protocol]:
      means = [summary[method][protocol][t][metric]['mean'] for t in modalities]
      for target, mean in zip(modalities, means):
        out[f'{prefix}{protocol}/{target}/{metric}'] = mean
      finite = [m for m in means if np.isfinite(m)]
      out[f'{prefix}{protocol}/all/{metric}'] = float(np.mean(finite)) if finite else math.nan
  return out


# --------------------------------------------------------------------------
# metrics.md


def _format(value, metric, protocol, signed=False):
  if not np.isfinite(value):
    return '–'
  digits = 2 if metric == 'psnr' or (metric == 'mae' and protocol == 'volume') else 4
  return f'{value:+.{digits}f}' if signed else f'{value:.{digits}f}'


def markdown(report) -> str:
  lines = [f'# Evaluation: step {report["step"]}, split {report["split"]}', '',
           f'{report["num_subjects"]} subjects, {report["num_slices"]} slices; '
           f'workdir `{report["workdir"]}`; real volumes from {report["volume_reference"]}. '
           'Mean ± std over subjects. Baseline: the named input modality copied as '
           'the synthesis (the best one per target by mean aegan-PSNR on this split); '
           '*margin* = AE-GAN − baseline. Generator run ' +
           ('as the official test.py runs it (each slice alone in train mode, dropout on).'
            if report.get('official_test_mode') else
            'in eval mode (BatchNorm running statistics, no dropout).'), '']
  for protocol, spec in report['protocols'].items():
    lines += _protocol_table(report, protocol, spec['definition'], spec['metrics'])
  if 'scenarios' in report:
    for metric in ('psnr', 'ssim'):
      lines += _scenario_table(report, metric)
  if 'downstream' in report:
    lines += downstream_tables(report['downstream'], report['modalities'])
  return '\n'.join(lines)


def _scenario_table(report, metric) -> list[str]:
  """aegan-protocol `metric` of every (available set, target) cell: AE-GAN (copy baseline)."""
  modalities = report['modalities']
  cells, sets = {}, []
  for scenario in report['scenarios']:
    key = ' + '.join(scenario['available'])
    if key not in cells:
      sets.append(key)
    model, base = (scenario[m]['aegan'][metric]['mean'] for m in ('model', 'baseline'))
    cells.setdefault(key, {})[scenario['target']] = (
        f'{_format(model, metric, "aegan")} ({_format(base, metric, "aegan")})')
  lines = [f'## Every set of inputs: {METRIC_HEADERS[metric]} (aegan protocol)', '',
           'AE-GAN, and in brackets the best available input copied. Rows: the inputs '
           'given; columns: the modality synthesised.', '',
           '| inputs | ' + ' | '.join(modalities) + ' |', '|---|' + '---:|' * len(modalities)]
  for key in sets:
    lines.append(f'| {key} | ' + ' | '.join(cells[key].get(t, '') for t in modalities) + ' |')
  lines.append('')
  return lines


def _protocol_table(report, protocol, title, names) -> list[str]:
  """One protocol's section: per target, AE-GAN, the copy baseline and the margin."""
  summary = report['summary']

  def cell(stats, name):
    if not stats[name]['n']:
      return '–'
    return (f'{_format(stats[name]["mean"], name, protocol)} ± '
            f'{_format(stats[name]["std"], name, protocol)}')

  lines = [f'## {title}', '',
           '| target | method | ' + ' | '.join(METRIC_HEADERS[m] for m in names) + ' |',
           '|---|---|' + '---:|' * len(names)]
  for target in report['modalities']:
    model = summary['model'][protocol][target]
    base = summary['baseline'][protocol][target]
    lines.append(f'| {target} | AE-GAN | ' + ' | '.join(cell(model, m) for m in names) + ' |')
    lines.append(f'| {target} | copy {report["baselines"][target]} | ' +
                 ' | '.join(cell(base, m) for m in names) + ' |')
    margins = [_format(model[m]['mean'] - base[m]['mean'], m, protocol, signed=True)
               for m in names]
    lines.append(f'| {target} | *margin* | ' + ' | '.join(margins) + ' |')
  lines.append('')
  return lines


# --------------------------------------------------------------------------
# Tumour segmentation (`downstream`, `segmenter_job`)

INPUT_LABELS = {'real': 'real', 'synthesized': 'AE-GAN', 'copy': 'copy', 'zeros': 'zeros'}


def _dice(stats) -> str:
  return f'{stats["mean"]:.3f} ± {stats["std"]:.3f}' if stats['n'] else '–'


def _percent(value) -> str:
  return f'{value:.0%}' if np.isfinite(value) else '–'


def downstream_tables(section, modalities) -> list[str]:
  """Dice per target and target channel, the average, and (any-set) every cell."""
  regions = list(section['regions'])
  segmenter = section['segmenter']
  lines = [f'## Downstream: tumour-segmentation Dice (segmenter step {segmenter["step"]}, '
           f'`{segmenter["workdir"]}`)', '',
           'The segmenter, trained on every sequence real, with the target channel real '
           '(upper bound), synthesized by AE-GAN, the copy baseline\'s input, or an all-zero '
           'scan (lower bound); every other channel real. Dice over each subject\'s volume '
           f'(1 when both are empty), mean ± std over {section["num_subjects"]} subjects; '
           '*recovered* = (AE-GAN − zeros) / (real − zeros) of the means.', '',
           '| target | target channel | ' + ' | '.join(r.upper() for r in regions) + ' | mean |',
           '|---|---|' + '---:|' * (len(regions) + 1)]
  for target in modalities:
    cell = section['targets'][target]
    for name, label in INPUT_LABELS.items():
      label += f' {cell["copy_source"]}' if name == 'copy' else ''
      lines.append(f'| {target} | {label} | ' + ' | '.join(_dice(cell[name][r]) for r in regions)
                   + f' | {cell["mean"][name]:.3f} |')
    lines.append(f'| {target} | *recovered* | ' + ' | '.join(
        _percent(cell['recovered'][r]) for r in regions + ['mean']) + ' |')
  average = section['average']
  lines += ['', 'Mean over targets and regions: ' + ', '.join(
      f'{label} {average[name]:.3f}' for name, label in INPUT_LABELS.items()) +
      f'; AE-GAN recovers {_percent(average["recovered"])} of the real-to-zeros gap.', '']
  if 'cells' in section:
    lines += ['### Every set of inputs: mean Dice (WT, TC, ET), AE-GAN (copy)', '',
              '| inputs | ' + ' | '.join(modalities) + ' |', '|---|' + '---:|' * len(modalities)]
    by_set = {}
    for cell in section['cells']:
      by_set.setdefault(' + '.join(cell['available']), {})[cell['target']] = (
          f'{cell["mean"]["synthesized"]:.3f} ({cell["mean"]["copy"]:.3f})')
    lines += [f'| {key} | ' + ' | '.join(row.get(t, '') for t in modalities) + ' |'
              for key, row in by_set.items()] + ['']
  return lines


def segmentation_markdown(result) -> str:
  """`segmenter_job.evaluate`'s result: Dice per region with every modality real."""
  regions = list(result['regions'])
  return '\n'.join([
      f'# Segmenter: step {result["step"]}, split {result["split"]}', '',
      f'{result["num_subjects"]} subjects, every modality real; Dice over each subject\'s '
      'volume of the prepared slices (1 when both are empty), mean ± std.', '',
      '| ' + ' | '.join(r.upper() for r in regions) + ' |', '|' + '---:|' * len(regions),
      '| ' + ' | '.join(_dice(result['dice'][r]) for r in regions) + ' |', ''])


# --------------------------------------------------------------------------
# grid_<target>.png


def pick_subjects(rows, grids, target):
  """(label, grid) of the best, median and worst subject by model aegan-PSNR."""
  scored = sorted(((r['psnr'], r['subject']) for r in rows if r['method'] == 'model' and
                   r['protocol'] == 'aegan' and r['target'] == target), reverse=True)
  chosen = [('best', scored[0]), ('median', scored[len(scored) // 2]), ('worst', scored[-1])]
  return [(f'{label}: {subject} ({psnr:.2f} dB)', grids[subject])
          for label, (psnr, subject) in chosen]


def _display(image, low=-1.0, high=1.0):
  """[H, W] -> uint8, rotated so that the stored [X, Y] slice looks like a radiology view."""
  return np.ascontiguousarray(np.rot90(pictures.to_uint8(image, low, high)))


def _enlarged(rows):
  """Small tiles enlarged (nearest) so that the labels fit."""
  zoom = max(1, math.ceil(GRID_MIN_TILE / rows[0][0].shape[1]))
  return [[t.repeat(zoom, 0).repeat(zoom, 1) for t in row] for row in rows]


def write_input_sets_grid(target_index, pick, cells, modalities, path) -> None:
  """One subject (the median): the target synthesised from every set of inputs, fewest
  first, then the real one; below each synthesis its |error| x2."""
  label, grid = pick
  real = grid['images'][..., target_index].astype(np.float32)
  chosen = sorted((len(a), a, i) for i, (a, t) in enumerate(cells) if t == target_index)
  titles = ['+'.join(modalities[j] for j in a) for _, a, _ in chosen] + [
      f'real {modalities[target_index]}']
  synths = [grid['cells'][i].astype(np.float32) for _, _, i in chosen]
  rows = [[_display(x) for x in synths + [real]],
          [_display(np.abs(x - real), 0, 1) for x in synths] + [np.zeros_like(_display(real))]]
  pictures.grid_image(_enlarged(rows), titles, [label, '|error| x2'], tile_gap=0,
                     row_labels_above=True).save(path)


def write_grid(target_index, picks, modalities, path) -> None:
  """Rows: (label, grid material); columns: inputs, synthesis, target, |error| x2."""
  inputs = [i for i in range(len(modalities)) if i != target_index]
  titles = [modalities[i] for i in inputs] + ['synthesis', f'real {modalities[target_index]}',
                                              '|error| x2']
  rows = []
  for _, grid in picks:
    synth = grid['synthesised'][target_index].astype(np.float32)
    real = grid['images'][..., target_index].astype(np.float32)
    # |error| on the [0, 1] scale, doubled so that small errors show.
    tiles = [grid['images'][..., i] for i in inputs] + [synth, real]
    rows.append([_display(t) for t in tiles] + [_display(np.abs(synth - real), 0, 1)])
  pictures.grid_image(_enlarged(rows), titles, [label for label, _ in picks], tile_gap=0,
                     row_labels_above=True).save(path)
