"""The inference engine: a restored generator run in batches sharded over all devices.

Evaluation (`evaluate`) and NIfTI synthesis (`synthesize`) both run the
generator through `Synthesizer`.  The mesh and shardings are `parallel`'s, so
inference lays out arrays the way training does: variables replicated,
batches sharded on 'data'.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aegan_jax import checkpoints
from aegan_jax import modalities as modalities_lib
from aegan_jax import models
from aegan_jax import parallel

DEFAULT_BATCH_SIZE = 16


def abstract_generator_variables(generator, image_size, sharding=None):
  """Shapes and dtypes of the generator's variables (nothing is allocated)."""
  shapes = jax.eval_shape(lambda: generator.init(
      {'params': jax.random.PRNGKey(0)}, *models.example_inputs(generator, image_size),
      train=False))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      shapes)


def official_test_mode(config) -> bool:
  """`config.eval.official_test_mode`; False for configs stored before it existed."""
  return bool(config.get('eval', {}).get('official_test_mode', False))


class Synthesizer:
  """A generator, jit-compiled, replicated, batch sharded on 'data'.

  Default: eval mode (BatchNorm running statistics, no dropout).  With
  `official_test_mode`, each slice runs like the official test.py runs it: train
  mode with a batch of one (BatchNorm statistics of that slice alone) and dropout
  active, its mask drawn from the slice's position in the call.

  Every call runs fixed-size batches (`batch_size`, a multiple of the device
  count; the last one zero padded), so it compiles once.
  """

  def __init__(self, generator, variables, config, *, step=None, batch_size=DEFAULT_BATCH_SIZE,
               mesh=None, official_test_mode=False):
    self.generator, self.config, self.step = generator, config, step
    self.official_test_mode = official_test_mode
    self.mesh = mesh or parallel.make_mesh()
    self.batch_size = device_multiple(batch_size, self.mesh)
    replicated, self._batch = parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh)
    self.variables = parallel.replicate(variables, self.mesh)
    self._apply = jax.jit(self._forward, in_shardings=(replicated,) + (self._batch,) * 4,
                          out_shardings=self._batch)

  @classmethod
  def restore(cls, workdir, *, step=None, config=None, batch_size=DEFAULT_BATCH_SIZE,
              official_test_mode=False):
    """The generator of `workdir`'s checkpoint (latest unless `step`), on all devices.

    Without `config`, the one stored in the checkpoint is used.
    """
    if config is None:
      _, config = checkpoints.read_checkpoint_config(workdir, step)
    generator, _ = models.build_networks(config.model, len(config.data.modalities))
    mesh = parallel.make_mesh()
    abstract = abstract_generator_variables(generator, config.data.image_size,
                                            parallel.replicated(mesh))
    step, variables, meta = checkpoints.restore_generator(workdir, abstract, step)
    checkpoints.check_compatible(meta, config, f'{workdir} step {step}')
    return cls(generator, variables, config, step=step, batch_size=batch_size, mesh=mesh,
               official_test_mode=official_test_mode)

  def _forward(self, variables, images, available, target_index, position):
    inputs = self.generator.batch_inputs(images, available, target_index)
    if not self.official_test_mode:
      return self.generator.apply(variables, *inputs, train=False)[..., 0].astype(jnp.float32)

    def one_slice(slice_inputs, index):
      output, _ = self.generator.apply(
          variables, *(x[None] for x in slice_inputs), train=True, mutable=['batch_stats'],
          rngs={'dropout': jax.random.fold_in(jax.random.PRNGKey(0), index)})
      return output[0, ..., 0].astype(jnp.float32)
    return jax.vmap(one_slice)(inputs, position)

  def __call__(self, images, target_index, positions=None, available=None) -> np.ndarray:
    """images [N, H, W, M] normalised (absent channels ignored), target_index int or [N].

    `available` [M] or [N, M] (default: every modality but the target) says which
    channels are inputs; the official generator takes only the default.  `positions` [N]
    (default 0..N-1) seed the official test mode's dropout masks, so a caller that skips
    slices can keep the others' masks.  Returns the synthesised target slices [N, H, W],
    float32 in [-1, 1].
    """
    images = np.asarray(images, np.float32)
    n, m = images.shape[0], images.shape[-1]
    targets = np.broadcast_to(np.asarray(target_index, np.int32), (n,))
    if available is None:
      available = modalities_lib.all_but_target(targets, m)
    available = np.broadcast_to(np.asarray(available, bool), (n, m))
    if available[np.arange(n), targets].any() or not available.any(axis=1).all():
      raise ValueError('available must leave out the target and hold at least one input')
    columns = {'images': images, 'targets': targets, 'available': available,
               'positions': np.arange(n) if positions is None else np.asarray(positions)}
    columns['positions'] = columns['positions'].astype(np.int32)
    return run_in_batches(
        lambda chunk: self._apply(self.variables, *(put_sharded(chunk[k], self._batch) for k in (
            'images', 'available', 'targets', 'positions'))),
        columns, self.batch_size, (0,) + images.shape[1:3])


def device_multiple(batch_size: int, mesh) -> int:
  """`batch_size` rounded up to a multiple of the mesh's device count (at least one)."""
  devices = mesh.devices.size
  return -(-max(batch_size, 1) // devices) * devices


def put_sharded(array, sharding):
  """A host array as a global one; works on one or many processes, as long as every
  process passes the same array."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def fetch(array) -> np.ndarray:
  """A batch-sharded result as one host array (all-gathered across processes)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(array)


def run_in_batches(apply, columns: dict, batch_size: int, empty_shape) -> np.ndarray:
  """`apply(chunk)` over fixed-size chunks of `columns` (equal-length host arrays; the last
  chunk zero padded, so one compiled program serves every call), results concatenated
  without the padding.  Every chunk is dispatched before any is fetched: transfers
  overlap the computation.  `empty_shape`: the result's shape for no rows."""
  n = len(next(iter(columns.values())))
  outputs, pads = [], []
  for start in range(0, n, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in columns.items()}
    pad = batch_size - len(next(iter(chunk.values())))
    chunk = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
             for k, v in chunk.items()}
    outputs.append(apply(chunk))
    pads.append(pad)
  if not outputs:
    return np.zeros(empty_shape, np.float32)
  return np.concatenate([fetch(out)[:batch_size - pad] for out, pad in zip(outputs, pads)])
