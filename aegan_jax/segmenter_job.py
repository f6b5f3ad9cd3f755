"""The segmenter's job: `launch.py` with a config whose `task` is 'segmenter'.

  python launch.py --config=configs/segmenter_demo.py --workdir=runs/seg
  python launch.py --config=configs/segmenter_demo.py --workdir=runs/seg --mode=evaluate

Trains `segmenter.UNet` on the real modalities and labels of the prepared train split
(made from `data.raw_dir`, or a phantom, like the synthesis job), with the synthesis
job's set-up, loop, Orbax checkpoints, exact resume, stops and one-line errors
(`job`), then scores it on the test split with every modality real: Dice of WT, TC
and ET over each subject's volume (`downstream`).  Writes
`<workdir>/eval/<step>/segmentation.json` and `segmentation.md`.
"""
from __future__ import annotations

import json
import pathlib

import jax

from aegan_jax import checkpoints
from aegan_jax import data
from aegan_jax import downstream
from aegan_jax import evaluate as evaluation
from aegan_jax import job
from aegan_jax import parallel
from aegan_jax import reports
from aegan_jax import segmenter
from data_prep.errors import DataError


def validate_config(config) -> None:
  """Fails fast, naming the field, on values that would break deep inside training."""
  job.check_fields(config, job.train_checks(config))
  try:  # the model and optim groups check their own fields
    trainer = segmenter.make_trainer(config, len(config.data.modalities))
    segmenter.check_image_size(config.data.image_size, trainer.network.levels)
  except ValueError as e:
    raise job.ConfigError(str(e)) from None


def check_labels(manifest: dict, prepared) -> None:
  """Every training subject must carry a segmentation; else one line saying so."""
  train = [s for s, entry in manifest['subjects'].items() if entry['split'] == 'train']
  unlabelled = [s for s in train if not manifest['subjects'][s].get('seg')]
  if unlabelled:
    what = ('no training subject has' if len(unlabelled) == len(train) else
            f'{len(unlabelled)} of {len(train)} training subjects (e.g. {unlabelled[0]}) have')
    raise DataError(f'{prepared}: {what} a segmentation (<case>_seg file); the segmenter '
                    'trains on labelled subjects only')


def train_and_evaluate(config, workdir, step: int | None = None):
  """Trains to `train.num_steps` (resuming as the synthesis job does), then evaluates."""
  return job.run_job(config, workdir, step, validate_config, _train)


def _train(config, workdir: pathlib.Path, mesh):
  prepared, manifest, num_steps = job.prepare_run(config, workdir)
  check_labels(manifest, prepared)
  trainer = segmenter.make_trainer(config, len(config.data.modalities))
  fresh = parallel.replicate(segmenter.init_state(
      trainer, jax.random.PRNGKey(config.train.seed), config.data.image_size,
      len(config.data.modalities)), mesh)
  iterator = job.train_iterator(config, prepared, with_seg=True)
  manager = job.make_manager(workdir, config)
  state = job.maybe_resume(manager, config, workdir, fresh,
                           lambda latest: restore_state(manager, latest, fresh, iterator))
  state, stopped_by = job.run_loop(
      config, workdir, state, segmenter.sharded_train_step(trainer, mesh), iterator, mesh,
      manager, num_steps, save=save_state, batch_keys=('images', 'seg'))
  if not stopped_by and config.train.evaluate_at_end:
    evaluate(config, workdir, step=int(jax.device_get(state.step)))
  return state


def save_state(manager, state, config, data_iterator=None, *, force=False) -> bool:
  return checkpoints.save_items(manager, int(jax.device_get(state.step)), config, {
      segmenter.CHECKPOINT_ITEM: state.network.variables(),
      'optimizer': state.network.opt_state, 'progress': {'step': state.step},
  }, data_iterator, force=force)


def restore_state(manager, step, template, data_iterator=None):
  restored = checkpoints.restore_items(manager, step, {
      segmenter.CHECKPOINT_ITEM: template.network.variables(),
      'optimizer': template.network.opt_state, 'progress': {'step': template.step},
  }, data_iterator)
  variables = restored[segmenter.CHECKPOINT_ITEM]
  return segmenter.SegmenterState(
      step=restored['progress']['step'],
      network=template.network.replace(params=variables['params'],
                                       batch_stats=variables.get('batch_stats', {}),
                                       opt_state=restored['optimizer']))


def evaluate(config, workdir, *, step=None, split='test', log=job.log) -> dict:
  """Dice of WT, TC and ET with every modality real, on the run's prepared `split`."""
  workdir = pathlib.Path(workdir)
  prepared = data.prepared_dir_for(config, workdir)
  manifest = data.load_manifest(prepared)
  split = evaluation.resolve_split(prepared, split, log)
  model = segmenter.Segmenter.restore(workdir, step=step, what='--workdir')
  downstream.check_segmenter_data(model, manifest, '--workdir')
  rows = downstream.real_input_rows(model, prepared, split, manifest)
  result = {'step': model.step, 'split': split, 'prepared_dir': str(prepared),
            'num_subjects': len(rows), 'regions': downstream.region_definitions(),
            'dice': downstream.stats(rows), 'subjects': rows}
  dice = result['dice']
  log(f'segmenter: step {model.step}, {split} split, {len(rows)} subjects, every modality '
      'real: Dice ' + ', '.join(f'{r.upper()} {dice[r]["mean"]:.3f}' for r in segmenter.REGIONS))
  if jax.process_index() == 0:
    out = workdir / 'eval' / str(model.step)
    try:
      reports.ensure_writable(out)
      (out / 'segmentation.json').write_text(
          json.dumps(reports.json_safe(result), indent=1, allow_nan=False) + '\n')
      (out / 'segmentation.md').write_text(reports.segmentation_markdown(result))
    except OSError as e:
      raise evaluation.EvaluationError(f'{e.filename or out}: cannot write '
                                       f'({e.strerror or e})') from None
    log(f'segmenter: wrote {out}')
  return result
