"""A small 2D U-Net tumour segmenter, for judging syntheses by what they are used for.

The network reads all modalities of a prepared slice ([N, H, W, M], as the loader gives
them) and returns one logit per BraTS region (a sigmoid each: the regions nest, so they
are not exclusive classes):

  wt  whole tumour        labels 1, 2, 3, 4
  tc  tumour core         labels 1, 3, 4
  et  enhancing tumour    labels 3, 4

BraTS 2018-2021 (and the phantom in its default layout) write enhancing tumour as 4 and
never use 3; BraTS 2023+ write it as 3.  Counting both as enhancing serves both.

The layers come from the project's `layers.layer_factory` (norm, dtype, convolution bias
rule), so the segmenter is built like the AE-GAN networks.  `train_step` is a pure,
jit-compiled step; the job around it is `segmenter_job`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from aegan_jax import checkpoints
from aegan_jax import kernels
from aegan_jax import inference
from aegan_jax import layers
from aegan_jax import parallel
from aegan_jax import train

REGIONS = ('wt', 'tc', 'et')
REGION_LABELS = {'wt': (1, 2, 3, 4), 'tc': (1, 3, 4), 'et': (3, 4)}
CHECKPOINT_ITEM = 'segmenter'
TASK = 'segmenter'


def region_masks(seg, xp=np):
  """Labels [...] -> bool [..., 3]: whole tumour, tumour core, enhancing tumour."""
  seg = xp.asarray(seg)
  return xp.stack([xp.isin(seg, xp.asarray(REGION_LABELS[r])) for r in REGIONS], axis=-1)


class ConvBlock(nn.Module):
  """Two [3x3 conv (zero padding), norm, ReLU] layers."""
  make: layers.LayerFactory
  features: int

  @nn.compact
  def __call__(self, x, *, train: bool):
    for i in range(2):
      # Zero padding: cheaper than the AE-GAN blocks' reflection on the CPU, and the
      # background around the brain is constant anyway.
      x = self.make.conv(self.features, 3, name=f'conv_{i}', padding='SAME')(x)
      x = nn.relu(self.make.norm(name=f'norm_{i}')(x, train=train))
    return x


class UNet(nn.Module):
  """U-Net: `levels` stride-2 downsamplings (features doubling from `features`), a
  bottleneck, transposed-convolution upsamplings with skip connections, 1x1 logits.

  The fields are `config.model`'s (a segmenter config's).  H and W must be multiples of
  2 ** levels.
  """
  features: int = 16
  levels: int = 3
  norm: str = 'instance'
  dtype: Any = 'float32'
  param_dtype: Any = 'float32'

  @nn.compact
  def __call__(self, images, *, train: bool):
    make = layers.layer_factory(self.norm, self.dtype, self.param_dtype)
    h, skips = images.astype(make.dtype), []
    for level in range(self.levels):
      h = ConvBlock(make, self.features * 2 ** level, name=f'encoder_{level}')(h, train=train)
      skips.append(h)
      h = make.down(self.features * 2 ** (level + 1), name=f'down_{level}')(h)
      h = nn.relu(make.norm(name=f'down_norm_{level}')(h, train=train))
    h = ConvBlock(make, self.features * 2 ** self.levels, name='bottleneck')(h, train=train)
    for level in reversed(range(self.levels)):
      h = make.up(self.features * 2 ** level, name=f'up_{level}')(h)
      h = nn.relu(make.norm(name=f'up_norm_{level}')(h, train=train))
      h = jnp.concatenate([h, skips[level]], axis=-1)
      h = ConvBlock(make, self.features * 2 ** level, name=f'decoder_{level}')(h, train=train)
    logits = make.conv(len(REGIONS), 1, use_bias=True, name='logits')(h)
    return logits.astype(kernels.accumulation_dtype(make.dtype))


def build(model_config) -> UNet:
  """The U-Net of a segmenter config's `model` group, whose fields are its keywords."""
  try:
    network = UNet(**model_config)
  except TypeError as e:  # a field the U-Net does not have
    raise ValueError(f'config.model: {e}') from None
  layers.layer_factory(network.norm, network.dtype, network.param_dtype)  # checks them
  for field in ('features', 'levels'):
    value = getattr(network, field)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'config.model.{field}={value!r} must be an integer >= 1')
  return network


def check_image_size(image_size: int, levels: int) -> None:
  if image_size % 2 ** levels:
    raise ValueError(f'config.data.image_size={image_size} must be a multiple of '
                     f'2 ** config.model.levels = {2 ** levels}')


# --------------------------------------------------------------------------
# Training.


@flax.struct.dataclass
class SegmenterState:
  step: jax.Array               # int32 scalar: iterations done
  network: train.NetworkState   # params, batch_stats (batch norm only), Adam state


@dataclasses.dataclass(frozen=True)
class SegmenterTrainer:
  network: UNet
  tx: optax.GradientTransformation
  learning_rate: Any            # optax schedule, for logging
  bce_weight: float             # config.loss.bce_weight: the loss is soft Dice + this x BCE


def make_trainer(config, num_modalities: int) -> SegmenterTrainer:
  """The U-Net of `config.model` and Adam of `config.optim`; ValueError names a bad field."""
  del num_modalities  # the U-Net takes its input channels from the data
  network = build(config.model)
  try:
    adam, schedule = train.make_optimizer(**config.optim)
  except TypeError as e:
    raise ValueError(f'config.optim: {e}') from None
  bce_weight = config.loss.bce_weight
  if not bce_weight >= 0:
    raise ValueError(f'config.loss.bce_weight={bce_weight!r} must be >= 0')
  return SegmenterTrainer(network, adam, schedule, float(bce_weight))


def init_state(trainer: SegmenterTrainer, rng, image_size: int, num_modalities: int):
  variables = trainer.network.init(
      {'params': rng}, jnp.zeros((1, image_size, image_size, num_modalities)), train=False)
  return SegmenterState(
      step=jnp.zeros((), jnp.int32),
      network=train.NetworkState(variables['params'], variables.get('batch_stats', {}),
                                 trainer.tx.init(variables['params'])))


def losses(logits, targets):
  """Binary cross-entropy and soft Dice loss (1 - Dice, averaged over the regions); the
  Dice sums run over the whole batch, so slices without tumour add no 0/0.

  A tumour covers a few percent of a slice: BCE alone, a mean over every pixel, first
  learns the background, and at equal weight it held Dice back for hundreds of steps.
  """
  probabilities = jax.nn.sigmoid(logits)
  bce = optax.sigmoid_binary_cross_entropy(logits, targets).mean()
  overlap = (probabilities * targets).sum(axis=(0, 1, 2))
  total = probabilities.sum(axis=(0, 1, 2)) + targets.sum(axis=(0, 1, 2))
  dice = (2 * overlap + 1) / (total + 1)
  return {'loss_bce': bce, 'loss_dice': 1 - dice.mean()}


def train_step(state: SegmenterState, batch, *, trainer: SegmenterTrainer):
  """One Adam step on BCE + soft Dice; batch: images [N, H, W, M], seg [N, H, W]."""
  targets = region_masks(batch['seg'], jnp).astype(jnp.float32)
  net = state.network

  def loss_fn(params):
    logits, updates = trainer.network.apply(
        {'params': params, 'batch_stats': net.batch_stats}, batch['images'], train=True,
        mutable=['batch_stats'])
    terms = losses(logits, targets)
    total = terms['loss_dice'] + trainer.bce_weight * terms['loss_bce']
    return total, (terms, updates.get('batch_stats', {}))

  grads, (terms, batch_stats) = jax.grad(loss_fn, has_aux=True)(net.params)
  updates, opt_state = trainer.tx.update(grads, net.opt_state, net.params)
  network = train.NetworkState(optax.apply_updates(net.params, updates), batch_stats, opt_state)
  metrics = {**terms, 'learning_rate': jnp.asarray(trainer.learning_rate(state.step),
                                                   jnp.float32)}
  return SegmenterState(step=state.step + 1, network=network), metrics


def sharded_train_step(trainer: SegmenterTrainer, mesh):
  """jit-compiled step: state replicated (and donated), batch sharded on 'data'."""
  return jax.jit(functools.partial(train_step, trainer=trainer),
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                 out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
                 donate_argnums=0)


# --------------------------------------------------------------------------
# Inference.


class Segmenter:
  """A trained U-Net, jit-compiled, replicated, batch sharded on 'data' (like
  `inference.Synthesizer`); returns region probabilities."""

  def __init__(self, network: UNet, variables, config, *, step=None,
               batch_size=inference.DEFAULT_BATCH_SIZE, mesh=None):
    self.network, self.config, self.step = network, config, step
    self.mesh = mesh or parallel.make_mesh()
    self.batch_size = inference.device_multiple(batch_size, self.mesh)
    self.variables = parallel.replicate(variables, self.mesh)
    self._apply = jax.jit(
        lambda v, x: jax.nn.sigmoid(network.apply(v, x, train=False)),
        in_shardings=(parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh)),
        out_shardings=parallel.batch_sharded(self.mesh))

  @classmethod
  def restore(cls, workdir, *, step=None, batch_size=inference.DEFAULT_BATCH_SIZE,
              what='--config.eval.segmenter_workdir'):
    """The segmenter of `workdir`'s checkpoint (latest unless `step`), with its stored
    config; a checkpoint of another task is a one-line error naming `what`."""
    step, config = checkpoints.read_checkpoint_config(workdir, step)
    if config.get('task', 'synthesis') != TASK:
      raise checkpoints.CheckpointError(
          f'{what} {workdir}: holds a {config.get("task", "synthesis")} checkpoint, not a '
          f'segmenter (train one with python launch.py --config=configs/segmenter_demo.py)')
    network = build(config.model)
    mesh = parallel.make_mesh()
    shape = (1, config.data.image_size, config.data.image_size, len(config.data.modalities))
    abstract = jax.eval_shape(lambda: network.init({'params': jax.random.PRNGKey(0)},
                                                   jnp.zeros(shape), train=False))
    step, variables, _ = checkpoints.restore_network(
        workdir, CHECKPOINT_ITEM, abstract, step, sharding=parallel.replicated(mesh))
    return cls(network, variables, config, step=step, batch_size=batch_size, mesh=mesh)

  def __call__(self, images) -> np.ndarray:
    """images [N, H, W, M] prepared slices -> probabilities [N, H, W, 3] (wt, tc, et)."""
    images = np.asarray(images, np.float32)
    return inference.run_in_batches(
        lambda chunk: self._apply(self.variables, inference.put_sharded(
            chunk['images'], parallel.batch_sharded(self.mesh))),
        {'images': images}, self.batch_size, (0,) + images.shape[1:3] + (len(REGIONS),))
