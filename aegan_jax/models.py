"""The AE-GAN networks: the synthesis generator and the autoencoder.

The autoencoder's encoder plus a small head is the discriminator.  The generator
is the official one (`SynthesisGenerator`, one missing modality) or, with
`config.model.generator='any'`, `AnySetGenerator` (any set of inputs).  All are
pure Flax Linen modules over NHWC tensors; `train` switches BatchNorm between
batch and running statistics and turns dropout on (rng stream 'dropout').
"""
from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from aegan_jax import kernels
from aegan_jax import layers
from aegan_jax import modalities

Dtype = Any


def check_image_size(height: int, width: int, what: str = 'image size') -> None:
  """The one image-size rule, for `config.data.image_size` and for every call."""
  if height % 4 or width % 4 or height < 16 or width < 16:
    raise ValueError(
        f'{what} {height}x{width} is not supported: height and width must be '
        'multiples of 4 (the encoders downsample twice by 2) and at least 16 (below, '
        "the discriminator's patch-logit map is empty)")


def check_options(network) -> None:
  """The one check of `config.model`'s values, run when a network is constructed."""
  layers.layer_factory(network.norm, network.dtype, network.param_dtype)
  for field, least in (('ngf', 1), ('num_blocks', 0)):
    value = getattr(network, field)
    if not isinstance(value, int) or value < least:
      raise ValueError(f'config.model.{field}={value!r} must be an integer >= {least}')


class Network(nn.Module):
  """`config.model`'s fields, shared by the networks and checked when one is built."""
  ngf: int = 64
  num_blocks: int = 6
  norm: str = 'batch'
  use_dropout: bool = True
  dtype: Dtype = 'float32'
  param_dtype: Dtype = 'float32'

  def __post_init__(self):
    check_options(self)
    super().__post_init__()


class SynthesisGenerator(Network):
  """Multi-branch ResNet generator (official `MultiHeadResnetGenerator`).

  Input `[N, H, W, B * (1 + M)]`: B = M - 1 branches, each the image of one
  input modality followed by the M one-hot target planes
  (`modalities.assemble_generator_input`; the planes must be constant over H and W,
  as there, since the first conv reads them at one pixel).  One encoder per branch, a 1x1
  fusion conv, ResNet blocks, then two upsampling stages with channel
  attention.  The fields are `config.model`'s (see `build_networks`).
  """
  num_modalities: int = 4
  any_set: ClassVar[bool] = False  # takes every other modality as input, none fewer

  def batch_inputs(self, images, available, target_index):
    """The call's inputs from a batch: the branches are fixed by the target alone."""
    del available  # every modality but the target, by construction
    return (modalities.assemble_generator_input(images, target_index, xp=jnp),)

  @nn.compact
  def __call__(self, x, *, train: bool, return_features: bool = False):
    num_branches = self.num_modalities - 1
    expected = num_branches * (1 + self.num_modalities)
    if x.shape[-1] != expected:
      raise ValueError(f'generator input has {x.shape[-1]} channels, expected {expected} '
                       f'({num_branches} branches x (image + {self.num_modalities} mask planes))')
    check_image_size(x.shape[1], x.shape[2])
    make = layers.layer_factory(self.norm, self.dtype, self.param_dtype)
    branches = jnp.split(x.astype(make.dtype), num_branches, axis=-1)
    encoded = [layers.BranchEncoder(make, self.ngf, constant_planes=True,
                                    name=f'encoder_{i}')(b, train=train)
               for i, b in enumerate(branches)]
    h = nn.relu(make.conv(4 * self.ngf, 1, use_bias=True, name='fuse')(
        jnp.concatenate(encoded, axis=-1)))
    return _blocks_and_decoder(self, make, h, train, return_features)


class AnySetGenerator(Network):
  """One generator for any non-empty set of inputs and any missing target.

  The M - 1 modalities other than the target fill M - 1 slots, in the official
  generator's branch order; absent ones are zeroed.  Each slot has its own encoder, as
  each branch has in the official generator, with every norm followed by a learned
  scale and shift for the slot's modality and the target (conditional normalisation);
  absent slots stay out of BatchNorm's batch statistics.  The fusion takes the mean and
  the max over the present slots only, so an absent image cannot influence the output;
  the target enters again as a learned scale and shift of the fused features.  Then the
  official ResNet blocks, decoder with channel attention and output, with the same two
  decoder features for the self-representation loss.  Shapes are fixed (availability
  [N, M], target [N]): one program serves every subset.
  """
  num_modalities: int = 4
  any_set: ClassVar[bool] = True  # takes any non-empty set of the other modalities

  def batch_inputs(self, images, available, target_index):
    return images, available, target_index

  @nn.compact
  def __call__(self, images, available, target_index, *, train: bool,
               return_features: bool = False):
    check_image_size(images.shape[1], images.shape[2])
    n, m = images.shape[0], self.num_modalities
    if images.shape[-1] != m or available.shape != (n, m):
      raise ValueError(f'any-set generator: images {images.shape} and available '
                       f'{available.shape} must hold the {m} modalities')
    make = layers.layer_factory(self.norm, self.dtype, self.param_dtype)
    slots, present, code = _input_slots(images, available, target_index, m)
    encoded = jnp.stack([
        layers.BranchEncoder(make, self.ngf, conditioned=True, name=f'encoder_{i}')(
            slots[:, i].astype(make.dtype), train=train, weights=present[:, i], code=code[:, i])
        for i in range(m - 1)], axis=1)
    fused = _masked_fusion(encoded, present)
    h = nn.relu(make.conv(4 * self.ngf, 1, use_bias=True, name='fuse')(fused))
    h = layers.Modulation(make.dtype, make.param_dtype, name='target_modulation')(
        h, jax.nn.one_hot(target_index, m))
    return _blocks_and_decoder(self, make, h, train, return_features)


def _input_slots(images, available, target_index, m):
  """The M - 1 non-target modalities, slot by slot: images [N, M - 1, H, W, 1] (absent
  ones zeroed), presence [N, M - 1] and one-hot (modality, target) codes [N, M - 1, 2M]."""
  n = images.shape[0]
  sources = jnp.stack(modalities.branch_modalities(target_index, m), axis=1)  # [N, M - 1]
  present = jnp.take_along_axis(available.astype(bool), sources, axis=1)
  slots = jnp.take_along_axis(images, sources[:, None, None, :], axis=-1)
  slots = jnp.where(present[:, None, None, :], slots, 0)
  target_code = jnp.broadcast_to(jax.nn.one_hot(target_index, m)[:, None], (n, m - 1, m))
  code = jnp.concatenate([jax.nn.one_hot(sources, m), target_code], axis=-1)
  return jnp.moveaxis(slots, -1, 1)[..., None], present, code


def _blocks_and_decoder(module, make, h, train, return_features):
  """The official generator after its fusion: ResNet blocks, two upsampling stages with
  channel attention, output; submodules of `module` (called from its compact method)."""
  for i in range(module.num_blocks):
    h = layers.ResnetBlock(make, module.use_dropout, name=f'blocks_{i}')(h, train=train)
  feature_0 = layers.DecoderStage(make, 2 * module.ngf, attention=True,
                                  name='decoder_0')(h, train=train)
  feature_1 = layers.DecoderStage(make, module.ngf, attention=True,
                                  name='decoder_1')(feature_0, train=train)
  image = layers.OutputConv(make, name='output')(feature_1)
  if return_features:
    return image, (feature_0, feature_1)
  return image


def _masked_fusion(encoded, available):
  """[N, M, h, w, C] -> [N, h, w, 2C]: mean and max over the available slots only."""
  mask = available[:, :, None, None, None]
  count = jnp.maximum(available.sum(axis=1), 1)[:, None, None, None]
  mean = jnp.where(mask, encoded, 0).sum(axis=1) / count.astype(encoded.dtype)
  lowest = jnp.finfo(encoded.dtype).min
  largest = jnp.where(mask, encoded, lowest).max(axis=1)
  largest = jnp.where(available.any(axis=1)[:, None, None, None], largest, 0)  # padding rows
  return jnp.concatenate([mean, largest], axis=-1)


class DiscriminatorHead(nn.Module):
  """1x1 conv, norm, LeakyReLU 0.2, then patch logits and modality-class logits."""
  make: layers.LayerFactory
  num_classes: int = 4

  @nn.compact
  def __call__(self, h, *, train: bool):
    d = self.make.conv(h.shape[-1], 1, name='conv')(h)
    d = nn.leaky_relu(self.make.norm(name='norm')(d, train=train), 0.2)
    patch_logits = layers.PatchConv(1, dtype=self.make.dtype, param_dtype=self.make.param_dtype,
                                    name='patch')(d)
    # A kernel spanning the whole map: the official 64x64 conv at 256 px, any size here.
    class_logits = nn.Conv(self.num_classes, d.shape[1:3], padding='VALID', use_bias=True,
                           kernel_init=layers.weight_init, dtype=self.make.dtype,
                           param_dtype=self.make.param_dtype, name='classes')(d)
    acc = kernels.accumulation_dtype(self.make.dtype)
    return (patch_logits.astype(acc),
            class_logits.reshape(d.shape[0], self.num_classes).astype(acc))


class AutoEncoderOutput(NamedTuple):
  reconstruction: jnp.ndarray  # [N, H, W, 1], tanh
  patch_logits: jnp.ndarray    # [N, H/8 - 1, W/8 - 1, 1]
  class_logits: jnp.ndarray    # [N, num_classes]
  features: tuple              # decoder stage outputs, for the self-representation loss


class AutoEncoder(Network):
  """Official `SrResnetGenerator`: single-branch encoder, ResNet blocks, decoder.

  The discriminator is the encoder plus a head: 1x1 conv, norm, LeakyReLU 0.2,
  then patch logits (4x4 stride-2 conv, no padding) and modality-class logits
  (a conv whose kernel spans the whole H/4 x W/4 map).  The decoder reads the
  encoder output, not the head.
  """
  num_classes: int = 4

  def setup(self):
    make = layers.layer_factory(self.norm, self.dtype, self.param_dtype)
    self.encoder = layers.BranchEncoder(make, self.ngf)
    self.blocks = [layers.ResnetBlock(make, self.use_dropout) for _ in range(self.num_blocks)]
    self.head = DiscriminatorHead(make, self.num_classes)
    self.decoder_0 = layers.DecoderStage(make, 2 * self.ngf)
    self.decoder_1 = layers.DecoderStage(make, self.ngf)
    self.output = layers.OutputConv(make)

  def encode(self, x, *, train: bool):
    check_image_size(x.shape[1], x.shape[2])
    h = self.encoder(x.astype(jnp.dtype(self.dtype)), train=train)
    for block in self.blocks:
      h = block(h, train=train)
    return h

  def decode(self, h, *, train: bool):
    feature_0 = self.decoder_0(h, train=train)
    feature_1 = self.decoder_1(feature_0, train=train)
    return self.output(feature_1), (feature_0, feature_1)

  def discriminate(self, h, *, train: bool):
    return self.head(h, train=train)

  def __call__(self, x, *, train: bool) -> AutoEncoderOutput:
    h = self.encode(x, train=train)
    patch_logits, class_logits = self.discriminate(h, train=train)
    reconstruction, features = self.decode(h, train=train)
    return AutoEncoderOutput(reconstruction, patch_logits, class_logits, features)

  def patch_logits(self, x, *, train: bool):
    """Discriminator only: the decoder is skipped."""
    return self.discriminate(self.encode(x, train=train), train=train)[0]

  def features(self, x, *, train: bool):
    """Decoder features only (official `get_features`): the head is skipped."""
    return self.decode(self.encode(x, train=train), train=train)[1]


def generator_batch(generator, batch):
  """(the generator's call inputs, target) from a loader batch: images [N, H, W, M],
  available [N, M] and target_index [N].

  Built inside the step, on device: M channels travel from the host, not the
  official generator's (M - 1) * (M + 1).
  """
  images, target_index = batch['images'], batch['target_index']
  target = jnp.take_along_axis(images, target_index[:, None, None, None], axis=-1)
  return generator.batch_inputs(images, batch['available'], target_index), target


def example_inputs(generator, image_size: int):
  """One all-zero example of the generator's inputs (for `init`)."""
  m = generator.num_modalities
  return generator.batch_inputs(jnp.zeros((1, image_size, image_size, m)),
                                modalities.all_but_target(jnp.zeros(1, jnp.int32), m, jnp),
                                jnp.zeros(1, jnp.int32))


def generator_class(model_config):
  """The generator class `config.model.generator` names (configs stored before the field
  existed mean the official one)."""
  kind = model_config.get('generator', 'official')
  if kind not in ('official', 'any'):
    raise ValueError(f"config.model.generator={kind!r} must be 'official' or 'any'")
  return AnySetGenerator if kind == 'any' else SynthesisGenerator


def build_networks(model_config, num_modalities: int):
  """Both networks from a `config.model` block, whose fields are their keywords."""
  options = dict(model_config.items())
  generator = generator_class(model_config)
  options.pop('generator', None)
  try:
    return (generator(num_modalities=num_modalities, **options),
            AutoEncoder(num_classes=num_modalities, **options))
  except TypeError as e:  # a field neither network has
    raise ValueError(f'config.model: {e}') from None
