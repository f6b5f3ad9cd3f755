"""Downstream evaluation: does a synthesized sequence still serve a tumour segmenter?

A segmenter trained on all four real sequences (`segmenter_job`) is run on the test
subjects with one channel, the target, replaced by:

  real         the acquired sequence (upper bound)
  synthesized  the generator's output from the scenario's inputs
  copy         the input the evaluation's copy baseline copies for that target
               (`evaluate.best_input`: the best available input by mean aegan-PSNR)
  zeros        an all-zero scan: the prepared background value everywhere (lower bound)

Every other channel stays real.  The region probabilities of each slice are put back
on the original grid (bilinear, like the synthesized slices), thresholded at 0.5, and
scored per subject over the volume of the prepared slices against the subject's labels:
Dice of WT, TC and ET (`segmenter.REGIONS`), 1 when neither holds any voxel (the BraTS
convention).  `recovered` is the fraction of the real-to-zeros gap that synthesis
closes, (synthesized - zeros) / (real - zeros), from the mean Dice; undefined (null)
where the gap is below `MIN_GAP`.

`evaluate.evaluate` adds the result as `downstream` to metrics.json when
`config.eval.segmenter_workdir` names a segmenter run (`reports` writes its table).
"""
from __future__ import annotations

import math

import numpy as np

from aegan_jax import data
from aegan_jax import evaluate
from aegan_jax import protocols
from aegan_jax import reports
from aegan_jax import segmenter
from data_prep import preprocess

INPUTS = ('real', 'synthesized', 'copy', 'zeros')
MIN_GAP = 0.01  # Dice; below it the target barely matters to the segmenter
THRESHOLD = 0.5


def dice(prediction, reference) -> float:
  """2 |P & R| / (|P| + |R|) of boolean arrays; 1.0 when both are empty (BraTS)."""
  prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
  total = int(prediction.sum()) + int(reference.sum())
  if total == 0:
    return 1.0
  return 2.0 * int(np.logical_and(prediction, reference).sum()) / total


def region_definitions() -> dict:
  return {r: list(segmenter.REGION_LABELS[r]) for r in segmenter.REGIONS}


def predicted_regions(probabilities, entry, geometry) -> np.ndarray:
  """[S, H, W, R] probabilities of prepared slices -> bool [X, Y, S, R] on the original
  grid, the S prepared slices only."""
  x, y, _ = entry['shape']
  depth = len(probabilities)
  return np.stack([preprocess.slices_to_volume(probabilities[..., r], (x, y, depth),
                                               range(depth), geometry, fill=0.0) > THRESHOLD
                   for r in range(probabilities.shape[-1])], axis=-1)


def region_dice(probabilities, seg, entry, geometry) -> dict[str, float]:
  """{region: Dice} of a subject's predicted slices against its labels [X, Y, S]."""
  predicted = predicted_regions(probabilities, entry, geometry)
  reference = segmenter.region_masks(seg)
  return {r: dice(predicted[..., i], reference[..., i])
          for i, r in enumerate(segmenter.REGIONS)}


def with_channel(images, target: int, channel) -> np.ndarray:
  """images [S, H, W, M] with channel `target` replaced (an array or a constant)."""
  replaced = np.array(images, np.float32, copy=True)
  replaced[..., target] = channel
  return replaced


def check_segmenter_data(model, manifest: dict, what: str) -> None:
  """The segmenter must see slices prepared as it was trained on; one line otherwise."""
  stored = model.config.data
  given = {'modalities': list(manifest['modalities']), 'image_size': manifest['image_size'],
           'normalise': manifest['options']['normalise'],
           'geometry': manifest['options']['geometry']}
  for field, value in given.items():
    trained = list(stored[field]) if field == 'modalities' else stored[field]
    if trained != value:
      raise evaluate.EvaluationError(
          f'{what}: the segmenter was trained with data.{field}={trained!r}, but the '
          f'evaluated data has {value!r}; train a segmenter on data prepared the same way')


# --------------------------------------------------------------------------
# Per subject.


def real_input_rows(model, prepared_dir, split, manifest) -> list[dict]:
  """{subject, wt, tc, et} with every modality real, per labelled subject of `split`."""
  rows = []
  for subject in evaluate.iterate_subjects(prepared_dir, split):
    entry = manifest['subjects'][subject.subject_id]
    seg = protocols.subject_volumes(subject, entry, manifest).seg
    if seg is not None:
      rows.append({'subject': subject.subject_id, **region_dice(
          model(subject.images), seg, entry, manifest['options']['geometry'])})
  return rows


def subject_rows(model, synthesizer, subject, entry, manifest, scores, cells) -> list[dict]:
  """Rows {subject, available, target, input, source, wt, tc, et}: per scenario cell the
  synthesized and copied target, per target real and zeros (shared by its cells)."""
  seg = protocols.subject_volumes(subject, entry, manifest).seg
  if seg is None:
    return []
  modalities, images = manifest['modalities'], subject.images
  score = lambda x: region_dice(model(x), seg, entry, manifest['options']['geometry'])
  real, zeros, copies, rows = score(images), {}, {}, []
  for available, t in cells:
    mask = np.isin(np.arange(len(modalities)), available)
    source = evaluate.best_input(scores, t, available)
    if t not in zeros:
      zeros[t] = score(with_channel(images, t, manifest['background_value']))
    if (source, t) not in copies:
      copies[source, t] = score(with_channel(images, t, images[..., source]))
    synthesized = score(with_channel(images, t, synthesizer(images, t, available=mask)))
    base = {'subject': subject.subject_id,
            'available': reports.available_label(modalities, available),
            'target': modalities[t]}
    for name, values, copied in (('real', real, ''), ('synthesized', synthesized, ''),
                                 ('copy', copies[source, t], modalities[source]),
                                 ('zeros', zeros[t], '')):
      rows.append({**base, 'input': name, 'source': copied, **values})
  return rows


# --------------------------------------------------------------------------
# Summaries.


def stats(rows) -> dict:
  """{region: {mean, std, n}} over `rows`."""
  out = {}
  for region in segmenter.REGIONS:
    values = np.array([r[region] for r in rows], np.float64)
    out[region] = ({'mean': float(values.mean()), 'std': float(values.std()),
                    'n': int(values.size)} if values.size else
                   {'mean': math.nan, 'std': math.nan, 'n': 0})
  return out


def recovered(means: dict) -> float:
  """(synthesized - zeros) / (real - zeros) of mean Dice; NaN when the gap is tiny."""
  gap = means['real'] - means['zeros']
  return (means['synthesized'] - means['zeros']) / gap if gap >= MIN_GAP else math.nan


def summarise_cell(rows) -> dict:
  """One cell's (or target's) rows -> {input: {region: stats}, copy_source, recovered}."""
  by_input = {name: stats([r for r in rows if r['input'] == name]) for name in INPUTS}
  gaps = {region: recovered({name: by_input[name][region]['mean'] for name in INPUTS})
          for region in segmenter.REGIONS}
  means = {name: float(np.mean([by_input[name][r]['mean'] for r in segmenter.REGIONS]))
           for name in INPUTS}
  gaps['mean'] = recovered(means)
  sources = sorted({r['source'] for r in rows if r['input'] == 'copy'})
  return {**by_input, 'mean': means, 'copy_source': '/'.join(sources), 'recovered': gaps}


def summarise(rows, modalities, cells) -> dict:
  """{targets: {target: cell summary of the paper's scenario}, average: {input: mean Dice
  over targets and regions, recovered}, cells: [every (available, target) cell]}."""
  by_cell = {}
  for row in rows:
    by_cell.setdefault((row['available'], row['target']), []).append(row)
  summaries = [{'available': [modalities[i] for i in available], 'target': modalities[t],
                **summarise_cell(by_cell.get((reports.available_label(modalities, available),
                                              modalities[t]), []))}
               for available, t in cells]
  targets = {s['target']: s for s in summaries if len(s['available']) == len(modalities) - 1}
  average = {name: float(np.nanmean([targets[t]['mean'][name] for t in targets]))
             for name in INPUTS}
  average['recovered'] = recovered(average)
  return {'targets': targets, 'average': average,
          **({'cells': summaries} if len(summaries) > len(targets) else {})}


# --------------------------------------------------------------------------
# Entry point (from `evaluate.evaluate`).


def evaluate_downstream(segmenter_workdir, synthesizer, prepared_dir, split, manifest, scores,
                        cells, log) -> dict:
  """The `downstream` section of metrics.json for the evaluated `split`."""
  what = f'--config.eval.segmenter_workdir={segmenter_workdir}'
  model = segmenter.Segmenter.restore(segmenter_workdir, batch_size=synthesizer.batch_size,
                                      what=what)
  check_segmenter_data(model, manifest, what)
  rows = []
  for subject in evaluate.iterate_subjects(prepared_dir, split):
    rows += subject_rows(model, synthesizer, subject, manifest['subjects'][subject.subject_id],
                         manifest, scores, cells)
  if not rows:
    raise evaluate.EvaluationError(f'{prepared_dir}: no {split} subject has a segmentation; '
                                   'the downstream evaluation needs labels')
  modalities = list(manifest['modalities'])
  trained_on = _training_subjects(model, segmenter_workdir)
  section = {'segmenter': {'workdir': str(segmenter_workdir), 'step': model.step,
                           'training_subjects': len(trained_on)},
             'regions': region_definitions(), 'inputs': list(INPUTS),
             'num_subjects': len({r['subject'] for r in rows}),
             **summarise(rows, modalities, cells), 'subjects': rows}
  overlap = sorted({r['subject'] for r in rows} & set(trained_on))
  if overlap:
    section['warning'] = (f'{len(overlap)} evaluated subject(s) share an id with the '
                          f'segmenter\'s training subjects (e.g. {overlap[0]})')
    log(f'warning: downstream: {section["warning"]}')
  average = section['average']
  log('  downstream Dice (mean of WT, TC, ET over targets): ' +
      ', '.join(f'{name} {average[name]:.3f}' for name in INPUTS) +
      f'; synthesis recovers {average["recovered"]:.0%} of the real-to-zeros gap')
  return section


def _training_subjects(model, workdir) -> list[str]:
  """Ids of the subjects the segmenter trained on, from its prepared data if still there."""
  prepared = data.prepared_dir_for(model.config, workdir)
  try:
    manifest = data.load_manifest(prepared)
  except Exception:  # pylint: disable=broad-except  # moved or deleted: nothing to compare
    return []
  return sorted(s for s, entry in manifest['subjects'].items() if entry['split'] == 'train')
