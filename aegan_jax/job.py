"""The training job behind `launch.py --mode=train`.

`train_and_evaluate(config, workdir)` prepares data when needed, trains
data-parallel over every device (and host), checkpoints with Orbax, resumes
exactly from the latest checkpoint, logs to the console and TensorBoard,
writes sample grids, and evaluates the final generator.
"""
from __future__ import annotations

import contextlib
import json
import math
import pathlib
import platform
import shutil
import signal
import time
from importlib import metadata

import jax
from jax.experimental import multihost_utils
import numpy as np

from aegan_jax import checkpoints
from aegan_jax import data
from aegan_jax import evaluate
from aegan_jax import models
from aegan_jax import parallel
from aegan_jax import reports
from aegan_jax import samples
from aegan_jax import train
from aegan_jax import workdir_lock
from data_prep import files
from data_prep import phantom
from data_prep import prepare
from data_prep import preprocess
from data_prep.errors import DataError


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


class TrainingDiverged(RuntimeError):
  """A loss became NaN or Inf."""


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


# --------------------------------------------------------------------------
# Set-up.


def validate_config(config) -> None:
  """Fails fast, naming the field, on values that would break deep inside training."""
  try:  # the loader checks its own scenario fields
    data.check_scenario_options(
        scenarios=config.data.scenarios,
        curriculum_stage_examples=config.data.curriculum_stage_examples,
        input_count_ratio=config.data.input_count_ratio)
    trainer = train.make_trainer(config, len(config.data.modalities))  # model, optim, loss
    size = config.data.image_size
    models.check_image_size(size, size, what=f'config.data.image_size={size!r}:')
  except ValueError as e:
    raise ConfigError(str(e)) from None
  check_fields(config, train_checks(config) + [
      ('train.sample_every', config.train.sample_every > 0, 'must be positive'),
      ('data.image_size', config.data.image_size <= preprocess.MAX_IMAGE_SIZE,
       f'must be at most {preprocess.MAX_IMAGE_SIZE} (the preparation cap)'),
      ('data.scenarios', config.data.scenarios == 'single' or trainer.generator.any_set,
       "needs config.model.generator='any' (the official generator takes every other "
       'modality as input)'),
      ('data.targets', all(0 <= t < len(config.data.modalities) for t in config.data.targets),
       f'must index data.modalities {tuple(config.data.modalities)}'),
  ])


def train_checks(config) -> list[tuple[str, bool, str]]:
  """(field, holds, requirement) of the `config.train` fields every training job reads."""
  return [
      ('train.global_batch_size', config.train.global_batch_size > 0, 'must be positive'),
      ('train.num_steps', config.train.num_steps >= 0, 'must be >= 0'),
      ('train.num_epochs', config.train.num_steps > 0 or config.train.num_epochs > 0,
       'must be positive when train.num_steps is 0'),
      ('train.log_every', config.train.log_every > 0, 'must be positive'),
      ('train.checkpoint_every', config.train.checkpoint_every > 0, 'must be positive'),
      ('train.keep_checkpoints', config.train.keep_checkpoints >= 0,
       'must be >= 0 (0 keeps every checkpoint)'),
      ('train.seed', 0 <= config.train.seed < 2**32, 'must be in [0, 2**32)'),
  ]


def check_fields(config, checks) -> None:
  """ConfigError naming the first (field, holds, requirement) that does not hold."""
  for field, ok, requirement in checks:
    if not ok:
      group, name = field.split('.')
      raise ConfigError(f'config.{field}={config[group][name]!r} {requirement}')


def write_run_info(config, workdir: pathlib.Path) -> None:
  """The resolved config, package versions and devices, for the record."""
  if jax.process_index() != 0:
    return
  _write(workdir / 'config.json', config.to_json_best_effort(indent=2) + '\n')
  packages = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain',
               'tensorflow-datasets', 'ml-collections', 'numpy'):
    try:
      packages[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      packages[name] = None
  info = {'python': platform.python_version(), 'packages': packages,
          'process_count': jax.process_count(),
          'devices': [f'{d.platform}:{d.id} {d.device_kind}' for d in jax.devices()]}
  _write(workdir / 'run_info.json', json.dumps(info, indent=2) + '\n')


def _write(path: pathlib.Path, text: str) -> None:
  """Whole or not at all; a full disk is one line."""
  try:
    files.write_text_atomically(path, text)
  except OSError as e:
    raise ConfigError(f'{path}: cannot write ({e.strerror or e})') from None


def ensure_prepared(config, workdir: pathlib.Path) -> str:
  """The prepared dataset's folder, preparing it (process 0) from raw data if needed.

  Every process learns whether process 0 succeeded: a failure there stops all of
  them with its message, instead of leaving the others at a barrier.
  """
  prepared = pathlib.Path(data.prepared_dir_for(config, workdir))
  failure = None
  if not (prepared / 'manifest.json').exists() and jax.process_index() == 0:
    try:
      _prepare(config, workdir, prepared)
    except Exception as e:  # pylint: disable=broad-except
      failure = e
  if jax.process_count() > 1:
    message = _broadcast_text(f'{type(failure).__name__}: {failure}' if failure else '')
    if message and failure is None:
      raise DataError(f'process 0 could not prepare the data: {message}')
  if failure is not None:
    raise failure
  return str(prepared)


def _prepare(config, workdir, prepared: pathlib.Path) -> None:
  raw = raw_dir(config, workdir)
  log(f'preparing {raw} -> {prepared}')
  options = {name: config.data[name] for name in prepare.CONFIG_FIELDS}
  prepare.prepare_dataset(raw, prepared, workers=2, **options)


def _broadcast_text(text: str, size: int = 2048) -> str:
  """Process 0's `text` on every process (a collective: all processes must call it)."""
  buffer = np.zeros(size, np.uint8)
  encoded = text.encode()[:size]
  buffer[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  return bytes(received).rstrip(b'\0').decode(errors='replace')


def raw_dir(config, workdir) -> pathlib.Path:
  """`data.raw_dir`; with `data.phantom_subjects` > 0 a phantom dataset is made there first."""
  raw = pathlib.Path(config.data.raw_dir or workdir / 'raw')
  subjects = config.data.get('phantom_subjects', 0)
  if subjects > 0 and not (raw.exists() and any(raw.iterdir())):
    anatomy = config.data.get('phantom_anatomy', 'ellipsoids')
    log(f'generating {subjects} phantom subjects ({anatomy}) in {raw}')
    _write_phantom(raw, subjects, config.data.phantom_seed, tuple(config.data.phantom_shape),
                   anatomy)
  if not config.data.raw_dir and subjects <= 0:
    raise ConfigError('config.data.raw_dir is empty and no prepared data was found: set '
                      '--config.data.raw_dir to the raw NIfTI folder, or '
                      '--config.data.prepared_dir to a prepared one')
  return raw


def _write_phantom(raw: pathlib.Path, subjects: int, seed: int, shape,
                   anatomy: str = 'ellipsoids') -> None:
  """Writes next to `raw`, then renames: an interrupted run leaves no partial dataset
  that the next run would take for a complete one."""
  if anatomy not in phantom.ANATOMIES:
    raise ConfigError(f'config.data.phantom_anatomy={anatomy!r} must be one of '
                      f'{phantom.ANATOMIES}')
  partial = raw.with_name(raw.name + '.partial')
  shutil.rmtree(partial, ignore_errors=True)
  try:
    phantom.write_phantom_dataset(partial, subjects, seed=seed, shape=shape, progress=True,
                                  anatomy=anatomy)
  except BaseException:  # e.g. no template for icbm152: leave nothing behind
    shutil.rmtree(partial, ignore_errors=True)
    raise
  if raw.exists():
    raw.rmdir()  # Empty: checked by the caller.
  partial.rename(raw)


def total_steps(config, num_train_examples: int) -> int:
  if config.train.num_steps > 0:
    return config.train.num_steps
  steps_per_epoch = max(1, num_train_examples // config.train.global_batch_size)
  return config.train.num_epochs * steps_per_epoch


# --------------------------------------------------------------------------
# Logging.


class MetricWriter:
  """TensorBoard event files (tensorboardX: no TensorFlow needed) on process 0."""

  def __init__(self, workdir: pathlib.Path):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, step: int, scalars: dict) -> None:
    if self._writer:
      for name, value in scalars.items():
        self._writer.add_scalar(name, float(value), step)
      self._writer.flush()

  def close(self):
    if self._writer:
      self._writer.close()


def check_finite(step: int, metrics: dict) -> None:
  for name, value in metrics.items():
    if not math.isfinite(float(value)):
      raise TrainingDiverged(f'step {step}: {name} is {float(value)}; stopping (the last '
                             'checkpoint before it is kept)')


def format_console(step, num_steps, metrics, seconds_per_step, slices_per_s) -> str:
  eta = (num_steps - step) * seconds_per_step
  losses = ' '.join(f'{k.removeprefix("loss_")}={float(v):.4g}' for k, v in metrics.items()
                    if k.startswith('loss_'))
  return (f'step {step}/{num_steps} {losses} | {slices_per_s:.1f} slices/s, '
          f'{seconds_per_step:.3f} s/step, ETA {time.strftime("%H:%M:%S", time.gmtime(eta))}')


# --------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT.


class StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop reads once per step.

  `agreed()` combines the flags of all processes, so a signal that reaches one
  host stops every host at the same step, where they save together.
  """

  def __init__(self):
    self.signal_number = 0
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal_number:  # A second signal: stop now.
      raise KeyboardInterrupt
    self.signal_number = signum

  def agreed(self) -> int:
    """The signal any process received (0: none); a collective when there are several."""
    if jax.process_count() == 1:
      return self.signal_number
    return int(np.max(multihost_utils.process_allgather(np.int32(self.signal_number))))

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


# --------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config, workdir, step: int | None = None) -> train.TrainState:
  """Trains to `total_steps`, then evaluates.

  Resumes from the latest checkpoint in `workdir`, or from `step`: checkpoints after it are
  then moved to `<workdir>/checkpoints_set_aside/`, never deleted.
  """
  return run_job(config, workdir, step, validate_config, _train)


def run_job(config, workdir, step, validate, train_fn):
  """`train_fn(config, workdir, mesh)` after `validate(config)`, in a locked workdir, resuming
  from `step` when given (later checkpoints moved aside)."""
  validate(config)
  mesh = parallel.make_mesh()
  try:  # Before the workdir is made: a refused run leaves nothing behind.
    parallel.check_batch_divisible(config.train.global_batch_size, mesh)
  except ValueError as e:
    raise ConfigError(f'config.{e}') from e
  created = not pathlib.Path(workdir).exists()
  workdir = make_workdir(workdir)
  try:
    with run_lock(workdir):
      if step is not None:
        resume_from(workdir, step)
      return train_fn(config, workdir, mesh)
  except BaseException:
    if created and jax.process_index() == 0:  # A run refused at once leaves no empty workdir.
      with contextlib.suppress(OSError):
        workdir.rmdir()  # Only if still empty.
    raise


def make_workdir(workdir) -> pathlib.Path:
  workdir = pathlib.Path(workdir).resolve()
  try:
    reports.ensure_writable(workdir)
  except OSError as e:
    raise ConfigError(f'--workdir {workdir}: {e.strerror or e}') from None
  return workdir


@contextlib.contextmanager
def run_lock(workdir: pathlib.Path):
  """One run per workdir; process 0 holds the lock for every host."""
  path, refusal = None, ''
  if jax.process_index() == 0:
    try:
      path = workdir_lock.acquire(workdir)
    except workdir_lock.WorkdirLocked as e:
      refusal = str(e)
  if jax.process_count() > 1:
    refusal = _broadcast_text(refusal)
  if refusal:
    raise ConfigError(refusal)
  try:
    yield
  finally:
    if path is not None:
      workdir_lock.release(path)


def resume_from(workdir: pathlib.Path, step: int) -> None:
  """Makes `step` the latest checkpoint by moving later ones aside (process 0; all wait)."""
  error = _set_aside_after(workdir, step) if jax.process_index() == 0 else ''
  if jax.process_count() > 1:
    error = _broadcast_text(error)
  if error:
    raise ConfigError(error)


def _set_aside_after(workdir: pathlib.Path, step: int) -> str:
  """Moves checkpoints after `step` to checkpoints_set_aside/; returns an error or ''."""
  where = checkpoints.checkpoint_dir(workdir)
  steps = sorted(int(p.name) for p in where.glob('*') if p.name.isdigit())
  if step not in steps:
    return f'--step {step}: no checkpoint of step {step} in {where} (there: {steps or "none"})'
  aside = workdir / 'checkpoints_set_aside'
  for later in (s for s in steps if s > step):
    target = aside / str(later)
    if target.exists():  # Set aside before: keep both.
      target = aside / f'{later}.{time.strftime("%Y%m%d-%H%M%S")}'
    aside.mkdir(exist_ok=True)
    (where / str(later)).rename(target)
    log(f'--step {step}: moved checkpoint {later} to {target}')
  return ''


def prepare_run(config, workdir: pathlib.Path):
  """(prepared dir, its manifest, steps to train): the data prepared, its choices taken into
  the config, and then the run info written (it records what the run saw)."""
  prepared = ensure_prepared(config, workdir)
  manifest = data.load_manifest(prepared)
  data.adopt_preparation(config.data, manifest, prepared, log)
  write_run_info(config, workdir)
  return prepared, manifest, total_steps(config, data.num_examples(prepared, 'train'))


def make_manager(workdir, config):
  """The run's checkpoint manager, keeping the last `train.keep_checkpoints` (0: all; Orbax
  itself would delete every one with 0)."""
  return checkpoints.make_manager(workdir, max_to_keep=config.train.keep_checkpoints or None)


def train_iterator(config, prepared, **options):
  """The endless training stream of `config.train` and the loader fields of `config.data`."""
  return iter(data.make_train_loader(
      prepared, global_batch_size=config.train.global_batch_size, seed=config.train.seed,
      **{name: config.data[name] for name in data.LOADER_FIELDS}, **options))


def _train(config, workdir: pathlib.Path, mesh) -> train.TrainState:
  prepared, _, num_steps = prepare_run(config, workdir)
  trainer = train.make_trainer(config, len(config.data.modalities))
  state = parallel.replicate(
      train.init_state(trainer, jax.random.PRNGKey(config.train.seed), config.data.image_size),
      mesh)
  iterator = train_iterator(config, prepared)
  manager = make_manager(workdir, config)
  state = maybe_resume(manager, config, workdir, state, lambda latest:
                       checkpoints.restore_train_state(manager, latest, state, iterator))
  step_fn = train.sharded_train_step(trainer, mesh)
  sample_writer = samples.SampleWriter(trainer.generator, prepared, workdir / 'samples',
                                       config.data.modalities) if jax.process_index() == 0 else None
  state, stopped_by = run_loop(config, workdir, state, step_fn, iterator, mesh, manager,
                               num_steps, save=checkpoints.save, sample_writer=sample_writer)
  if stopped_by:
    return state
  if config.train.evaluate_at_end:
    evaluate.evaluate(config, workdir, step=int(state.step))
  return state


def _report_stop(signal_number, step, saved_step, workdir) -> None:
  """Says "saved" only for a checkpoint of this very step that Orbax has finished."""
  name = signal.Signals(signal_number).name
  if saved_step == step:
    log(f'stopped by {name} at step {step}; saved step {step} in '
        f'{checkpoints.checkpoint_dir(workdir)}. Run the same command to resume.')
  else:
    log(f'stopped by {name} at step {step}; no checkpoint of this step was written '
        f'(latest: {saved_step}).')


def run_loop(config, workdir, state, step_fn, iterator, mesh, manager, num_steps, *, save,
             sample_writer=None, batch_keys=('images', 'available', 'target_index')):
  """Trains to `num_steps` with console and TensorBoard logs, saves with `save(manager,
  state, config, iterator, force=True)`, stops on SIGTERM/SIGINT; closes `manager`.
  `step_fn(state, batch)` gets the loader's `batch_keys` as global arrays.

  Returns (state, number of the signal that stopped it, or 0).
  """
  writer = MetricWriter(workdir)
  try:
    with StopRequest() as stop:
      state, stopped_by = _loop(config, state, step_fn, iterator, mesh, manager, writer,
                                sample_writer, num_steps, stop, save, batch_keys)
  finally:
    writer.close()
    # An async save still in flight would be lost; one that failed is reported below
    # (unless the loop's own error is on its way).
    saved_step, save_error = checkpoints.finish(manager)
  if save_error:
    raise save_error
  if stopped_by:
    _report_stop(stopped_by, int(jax.device_get(state.step)), saved_step, workdir)
  return state, stopped_by


def maybe_resume(manager, config, workdir, fresh, restore):
  """`restore(latest step)` when `manager` holds a checkpoint whose meta fits `config`,
  else `fresh`; a damaged checkpoint is one line naming it and the way back."""
  latest = manager.latest_step()
  if latest is None:
    return fresh
  where = checkpoints.checkpoint_dir(workdir)
  try:
    meta = checkpoints.read_meta(manager, latest)
  except Exception as e:  # pylint: disable=broad-except
    raise _damaged(manager, where, latest, e) from None
  if checkpoints.holds_weights_only(manager, latest):
    raise checkpoints.CheckpointError(
        f'{where / str(latest)}: holds network weights only (an import of official weights), '
        'without the optimizer and data state that training resumes from; evaluate it '
        '(--mode=evaluate) or synthesize with it as it is, and train in a new --workdir '
        '(training starts from random weights)')
  checkpoints.check_compatible(meta, config, where, checkpoints.RESUME_FIELDS)
  log(f'resuming from step {latest} in {where}')
  try:
    return restore(latest)
  except Exception as e:  # pylint: disable=broad-except
    raise _damaged(manager, where, latest, e) from None


def _damaged(manager, where, step, error) -> checkpoints.CheckpointError:
  """One line naming the damaged step and how to fall back to the one before."""
  detail = (str(error).strip().splitlines() or [''])[0][:200]
  earlier = [s for s in manager.all_steps() if s < step]
  fallback = (f'add --step={max(earlier)} to resume from step {max(earlier)} (later steps are '
              f'moved aside)' if earlier else f'move {where / str(step)} aside to start afresh')
  return checkpoints.CheckpointError(
      f'{where / str(step)}: damaged checkpoint of step {step} ({type(error).__name__}: '
      f'{detail}); {fallback}')


def _loop(config, state, step_fn, iterator, mesh, manager, writer, sample_writer,
          num_steps, stop, save, batch_keys):
  """Trains to `num_steps`; returns (state, number of the signal that stopped it, or 0)."""
  step = int(jax.device_get(state.step))
  if step >= num_steps:
    log(f'already trained to step {step} (train.num_steps={num_steps})')
    return state, 0
  log(f'training steps {step + 1}..{num_steps}, global batch {config.train.global_batch_size} '
      f'on {mesh.size} device(s)')
  window = [time.perf_counter(), 0]  # start time, steps since
  while step < num_steps:
    batch = parallel.global_batch(next(iterator), mesh, batch_keys)
    state, metrics = step_fn(state, batch)
    step += 1
    window[1] += 1
    due = step % config.train.checkpoint_every == 0 or step == num_steps
    logged = step % config.train.log_every == 0 or due
    if logged:
      _log_metrics(config, step, num_steps, metrics, writer, window)
    if sample_writer and (step % config.train.sample_every == 0 or step == num_steps):
      sample_writer.write(step, _host_local(state.generator.variables()))
    # Read after the step's host work, so a signal that came during it is seen here
    # and the stop below always saves first.
    stopping = stop.agreed()
    if stopping and not logged:
      _log_metrics(config, step, num_steps, metrics, writer, window)
    if due or stopping:
      save(manager, state, config, iterator, force=True)
    if stopping:
      return state, stopping
  return state, 0


def _log_metrics(config, step, num_steps, metrics, writer, window) -> None:
  """Fetches, checks (before any save: a diverged state never replaces a good one), logs."""
  metrics = jax.device_get(metrics)
  check_finite(step, metrics)
  seconds_per_step = (time.perf_counter() - window[0]) / max(window[1], 1)
  slices_per_s = config.train.global_batch_size / seconds_per_step
  writer.write(step, {**metrics, 'perf/seconds_per_step': seconds_per_step,
                      'perf/slices_per_s': slices_per_s})
  log(format_console(step, num_steps, metrics, seconds_per_step, slices_per_s))
  window[:] = [time.perf_counter(), 0]


def _host_local(tree):
  """numpy copies of replicated arrays: one process can then compute on them alone
  (a jitted call on the global arrays would wait for the other hosts)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
