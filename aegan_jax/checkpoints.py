"""Orbax checkpoints of AE-GAN training, in `<workdir>/checkpoints`.

Each step is saved as separate items, so evaluation and synthesis restore the
generator alone, and the official-weights import can write one without any
training state:

  generator         {'params', 'batch_stats'} of the synthesis network
  autoencoder       {'params', 'batch_stats'} of the AE/discriminator
  optimizer         {'generator', 'autoencoder'} Adam states
  progress          {'step', 'sr_weight', 'rng'}
  data              the Grain iterator state (one file per process)
  meta              JSON: the resolved config and the architecture it fixes

A segmenter run (`config.task='segmenter'`, `segmenter_job`) saves `segmenter`
{'params', 'batch_stats'}, its Adam state as `optimizer`, `progress` {'step'}, `data`
and `meta`.  The stored config's `task` tells the two kinds apart.

Every restore uses an abstract target (shapes, dtypes and shardings), so a
checkpoint restores onto any device count.
"""
from __future__ import annotations

import errno
import json
import logging
import pathlib
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp


if TYPE_CHECKING:  # the state's type only: restoring it needs no training code
  from aegan_jax.train import TrainState

# Config fields a checkpoint cannot change: they fix the parameter shapes or the data.
# (The segmenter's: model.features, model.levels; a field absent from a config is skipped.)
ARCHITECTURE_FIELDS = ('model.generator', 'model.ngf', 'model.num_blocks', 'model.norm',
                       'model.use_dropout', 'model.features', 'model.levels',
                       'data.image_size', 'data.modalities')
# What the generator's inputs mean: evaluation and synthesis must preprocess as training did.
INPUT_FIELDS = ARCHITECTURE_FIELDS + ('data.normalise', 'data.geometry')
# A resumed run must also go on with the same training data.
RESUME_FIELDS = INPUT_FIELDS + ('data.slices', 'data.split_ratios', 'data.split_seed')


class CheckpointError(ValueError):
  """A checkpoint that is missing or does not fit the config (one-line message)."""


def checkpoint_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir).resolve() / 'checkpoints'


class _NoOrbaxTracebacks(logging.Filter):
  """Orbax logs every failure of a background save with its traceback (hundreds of lines
  on a full disk), then raises it where the save is awaited; `save` and `finish` report
  it there in one line."""

  def filter(self, record):
    return not (record.exc_info and '/orbax/' in record.pathname.replace('\\', '/'))


def make_manager(workdir, *, max_to_keep: int | None = None, create: bool = True):
  import grain  # pylint: disable=g-import-not-at-top
  absl_logger = logging.getLogger('absl')
  if not any(isinstance(f, _NoOrbaxTracebacks) for f in absl_logger.filters):
    absl_logger.addFilter(_NoOrbaxTracebacks())
  # For reading, create=False rather than orbax's read-only mode, which logs warnings on
  # every use.
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
  handlers = {'generator': ocp.StandardCheckpointHandler(),
              'segmenter': ocp.StandardCheckpointHandler(),
              'autoencoder': ocp.StandardCheckpointHandler(),
              'optimizer': ocp.StandardCheckpointHandler(),
              'progress': ocp.StandardCheckpointHandler(),
              'data': grain.checkpoint.CheckpointHandler(),
              'meta': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers=handlers, options=options)


def config_fields(config, fields=ARCHITECTURE_FIELDS) -> dict[str, Any]:
  """The fields' values; a field that a config stored by an older version lacks is left out."""
  values = {}
  for field in fields:
    group, name = field.split('.')
    if group not in config or name not in config[group]:
      continue
    value = config[group][name]
    values[field] = list(value) if isinstance(value, tuple) else value
  return values


def meta_for(config) -> dict:
  return {'architecture': config_fields(config, RESUME_FIELDS),
          'config': json.loads(config.to_json_best_effort())}


def save(manager, state: TrainState, config, data_iterator=None, *, force=False) -> bool:
  """Saves asynchronously; call `manager.wait_until_finished()` before exiting."""
  return save_items(manager, int(jax.device_get(state.step)), config, {
      'generator': state.generator.variables(),
      'autoencoder': state.autoencoder.variables(),
      'optimizer': {'generator': state.generator.opt_state,
                    'autoencoder': state.autoencoder.opt_state},
      'progress': {'step': state.step, 'sr_weight': state.sr_weight, 'rng': state.rng},
  }, data_iterator, force=force)


def save_items(manager, step: int, config, items: dict, data_iterator=None, *,
               force=False) -> bool:
  """Saves the array trees `items` {name: tree}, the config's meta and, when given, the
  Grain iterator's position as step `step` (asynchronously)."""
  args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
  args['meta'] = ocp.args.JsonSave(meta_for(config))
  if data_iterator is not None:
    import grain  # pylint: disable=g-import-not-at-top
    args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  try:  # Also raises the failure of the previous, asynchronous save.
    return manager.save(step, args=ocp.args.Composite(**args), force=force)
  except Exception as e:  # pylint: disable=broad-except
    raise save_failed(manager.directory, e) from None


def restore_items(manager, step: int, templates: dict, data_iterator=None) -> dict:
  """{name: tree} restored onto `templates`' shapes and shardings (abstract targets); the
  Grain iterator's position too, when given."""
  args = {name: ocp.args.StandardRestore(_abstract(tree)) for name, tree in templates.items()}
  if data_iterator is not None:
    import grain  # pylint: disable=g-import-not-at-top
    args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  return manager.restore(step, args=ocp.args.Composite(**args))


def finish(manager) -> tuple[int | None, CheckpointError | None]:
  """Waits for the save in flight and closes `manager`: (latest complete step, the
  one-line error of a save that failed, or None).  Never raises, so that an error already
  on its way (e.g. from the training loop) is the one reported."""
  error = None
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    error = save_failed(manager.directory, e)
  latest = complete_steps(manager.directory)
  try:
    manager.close()
  except Exception as e:  # pylint: disable=broad-except
    error = error or save_failed(manager.directory, e)
  return (latest[-1] if latest else None), error


def complete_steps(directory) -> list[int]:
  """Steps whose checkpoint Orbax finished (it writes to a temporary name, then renames)."""
  directory = pathlib.Path(directory)
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit()) if directory.is_dir() else []


def _disk_full(error: BaseException | None) -> bool:
  while error is not None:
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or \
        'No space left on device' in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def save_failed(directory, error: BaseException) -> CheckpointError:
  """One line for a checkpoint that could not be written; the earlier ones are untouched
  (Orbax writes each under a temporary name and deletes old ones only after a success)."""
  reason = ('no space left on device' if _disk_full(error) else
            f'{type(error).__name__}: {(str(error).strip().splitlines() or [""])[0][:200]}')
  steps = complete_steps(directory)
  intact = (f'the checkpoints written before it are intact (latest: step {steps[-1]}); '
            if steps else '')
  return CheckpointError(f'{directory}: a checkpoint could not be written ({reason}); {intact}'
                         'free space (or fix the folder) and run the same command to resume')


def read_meta(manager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def holds_weights_only(manager, step: int) -> bool:
  """True for a checkpoint of network weights alone (`save_networks`: an official import)."""
  return not (pathlib.Path(manager.directory) / str(step) / 'optimizer').exists()


def check_compatible(meta: dict, config, where, fields=INPUT_FIELDS) -> None:
  """Raises CheckpointError naming the task, or the first of `fields` whose value differs
  from the checkpoint's (read from its stored config when its meta predates the field)."""
  stored_task = (meta.get('config') or {}).get('task', 'synthesis')
  if stored_task != config.get('task', 'synthesis'):
    raise CheckpointError(f'{where} holds a {stored_task} checkpoint but the config\'s task is '
                          f'{config.get("task", "synthesis")!r}; use another --workdir')
  stored = {**config_fields(ml_collections.ConfigDict(meta.get('config') or {}), fields),
            **meta.get('architecture', {})}
  for field, value in config_fields(config, fields).items():
    if field in stored and stored[field] != value:
      raise CheckpointError(
          f'{where} was trained with {field}={stored[field]!r} but the config has {value!r}; '
          f'use a new --workdir or set --config.{field} to match')


def _abstract(tree, sharding=None):
  def leaf(x):
    kw = {'sharding': sharding} if sharding is not None else {}
    if hasattr(x, 'sharding') and sharding is None:
      kw = {'sharding': x.sharding}
    return jax.ShapeDtypeStruct(x.shape, x.dtype, **kw)
  return jax.tree.map(leaf, tree)


def restore_train_state(manager, step: int, template: TrainState,
                        data_iterator=None) -> TrainState:
  """Restores everything onto `template`'s shapes and shardings (an abstract target)."""
  restored = restore_items(manager, step, {
      'generator': template.generator.variables(),
      'autoencoder': template.autoencoder.variables(),
      'optimizer': {'generator': template.generator.opt_state,
                    'autoencoder': template.autoencoder.opt_state},
      'progress': {'step': template.step, 'sr_weight': template.sr_weight,
                   'rng': template.rng},
  }, data_iterator)
  network = lambda name: getattr(template, name).replace(
      params=restored[name]['params'], batch_stats=restored[name].get('batch_stats', {}),
      opt_state=restored['optimizer'][name])
  progress = restored['progress']
  return template.replace(step=progress['step'], generator=network('generator'),
                          autoencoder=network('autoencoder'),
                          sr_weight=progress['sr_weight'], rng=progress['rng'])


def _open_step(workdir, step: int | None):
  """(manager that creates nothing, step): the latest step unless given; one-line errors
  otherwise."""
  if not checkpoint_dir(workdir).is_dir():
    raise CheckpointError(f'{checkpoint_dir(workdir)}: no checkpoints (train first, or import '
                          'official weights with python -m aegan_jax.official import)')
  manager = make_manager(workdir, create=False)
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f'{checkpoint_dir(workdir)}: no checkpoints')
  if step is None:
    return manager, max(steps)
  if step not in steps:
    raise CheckpointError(f'{checkpoint_dir(workdir)}: no checkpoint at step {step} '
                          f'(have {sorted(steps)})')
  return manager, step


def restore_generator(workdir, abstract_variables, step: int | None = None):
  """(step, generator variables, meta) from `workdir`: the latest step unless given.

  Shapes that do not fit the architecture and non-finite weights are one-line errors.
  """
  return restore_network(workdir, 'generator', abstract_variables, step)


def restore_network(workdir, item: str, abstract_variables, step: int | None = None, *,
                    sharding=None):
  """(step, variables of the network saved as `item`, meta), as `restore_generator`;
  `sharding` places every array (default: the abstract variables' own)."""
  manager, step = _open_step(workdir, step)
  where = checkpoint_dir(workdir) / str(step)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{
        item: ocp.args.StandardRestore(_abstract(abstract_variables, sharding)),
        'meta': ocp.args.JsonRestore()}))
  except Exception as e:  # pylint: disable=broad-except
    first_line = (str(e).strip().splitlines() or [''])[0][:300]
    raise CheckpointError(f'{where}: the {item} cannot be restored for this architecture '
                          f'({type(e).__name__}: {first_line})') from None
  finally:
    manager.close()
  check_finite(restored[item], f'{where} {item}')
  return step, restored[item], restored['meta']


def _flat(tree) -> dict[str, Any]:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_finite(variables, network: str) -> None:
  for name, leaf in _flat(variables).items():
    if not np.isfinite(np.asarray(leaf)).all():
      raise CheckpointError(f'{network} tensor {name} holds NaN or Inf values')


def check_variables(module, variables, input_shape, network: str) -> None:
  """Every tensor of `variables` has the shape `module` needs, and finite values."""
  expected = _flat(jax.eval_shape(lambda: module.init(
      {'params': jax.random.PRNGKey(0)}, jax.numpy.zeros(input_shape), train=False)))
  given = _flat(variables)
  for name, spec in expected.items():
    if name not in given:
      raise CheckpointError(f'{network} tensor {name} is missing')
    if tuple(np.shape(given[name])) != tuple(spec.shape):
      raise CheckpointError(f'{network} tensor {name} has shape {tuple(np.shape(given[name]))}, '
                            f'the architecture needs {tuple(spec.shape)}')
  check_finite(variables, network)


def read_checkpoint_config(workdir, step: int | None = None):
  """(step, ConfigDict) stored with a checkpoint; evaluation needs no config file."""
  manager, step = _open_step(workdir, step)
  meta = read_meta(manager, step)
  manager.close()
  return step, ml_collections.ConfigDict(meta['config'])


def save_networks(workdir, step: int, config, generator_variables, autoencoder_variables=None):
  """Writes network weights alone (no optimizer or data state), e.g. imported official
  weights; evaluation and synthesis restore such a checkpoint like any other."""
  manager = make_manager(workdir)
  items = {'generator': ocp.args.StandardSave(generator_variables),
           'meta': ocp.args.JsonSave(meta_for(config))}
  if autoencoder_variables is not None:
    items['autoencoder'] = ocp.args.StandardSave(autoencoder_variables)
  error = None
  try:
    manager.save(step, args=ocp.args.Composite(**items), force=True)
  except Exception as e:  # pylint: disable=broad-except
    error = save_failed(manager.directory, e)
  _, late_error = finish(manager)
  if error or late_error:
    raise error or late_error
