"""Building blocks of the AE-GAN networks (Flax Linen, NHWC).

Everything mirrors a PyTorch layer of the official code closely enough that
its weights load unchanged (see `weight_conversion.py`): the same padding modes, the
same transposed-convolution geometry and BatchNorm with PyTorch's running
statistics (momentum 0.1, unbiased running variance).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aegan_jax import kernels
from aegan_jax.kernels import convolution
from aegan_jax.kernels import normalization
from aegan_jax.kernels import reduction

Dtype = Any

# Official `init_weights(init_type='normal', init_gain=0.02)`.
weight_init = nn.initializers.normal(0.02)


def scale_init(key, shape, dtype=jnp.float32):
  """BatchNorm gamma ~ N(1, 0.02), as the official initialiser draws it."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class BatchNorm(nn.Module):
  """BatchNorm2d with PyTorch semantics.

  Training normalises with the biased batch variance and folds the *unbiased*
  variance into the running estimate, like torch.  Under `jax.jit` with the
  batch sharded over devices the means are global, so statistics come from
  the whole global batch.  When the collection `batch_moments` is mutable the
  batch moments are also exposed, so a caller can replay a running-statistics
  update without running the network again (see `train.py`).
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, weights=None):
    """`weights` [N] (training only): example n counts weights[n] times in the batch
    moments, so an example of weight 0 (an absent input slot) changes no statistic."""
    features = x.shape[-1]
    scale = self.param('scale', scale_init, (features,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
    acc = kernels.accumulation_dtype(self.param_dtype)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), acc)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), acc)
    if not train:
      inv = jax.lax.rsqrt(running_var.value + self.epsilon) * scale.astype(acc)
      return ((x.astype(acc) - running_mean.value) * inv + bias.astype(acc)).astype(self.dtype)
    y, mean, unbiased_var = _batch_moments(x, weights, scale.astype(acc), bias.astype(acc),
                                           self.epsilon)
    if not self.is_initializing():
      # A batch in which every example has weight 0 (a slot absent throughout) has no
      # moments: the running statistics keep their values.
      seen = True if weights is None else reduction.batch_sum(weights) > 0
      for running, value in ((running_mean, mean), (running_var, unbiased_var)):
        running.value = jnp.where(
            seen, normalization.ema_update(running.value, value, self.momentum), running.value)
    if self.is_mutable_collection('batch_moments'):
      self.put_variable('batch_moments', 'mean', mean)
      self.put_variable('batch_moments', 'var', unbiased_var)
    return y.astype(self.dtype)


def _batch_moments(x, weights, scale, bias, epsilon):
  """(normalised x, batch mean, unbiased batch variance), the moments weighted when
  `weights` is given."""
  if weights is None:
    y, mean, var = normalization.normalize(x, scale, bias, False, epsilon)
    count = x.size // x.shape[-1]
    return y, mean, var * (count / max(count - 1, 1))
  weights = weights.astype(scale.dtype)
  y, mean, var = normalization.weighted_normalize(x, weights, scale, bias, epsilon)
  count = normalization.moment_count(x, False, weights)
  return y, mean, var * (count / jnp.maximum(count - 1, 1))


class InstanceNorm(nn.Module):
  """InstanceNorm2d(affine=False, track_running_stats=False), the official option."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, weights=None):
    del train, weights  # Same computation in both modes; each example has its own moments.
    acc = kernels.accumulation_dtype(self.dtype)
    ones, zeros = jnp.ones(x.shape[-1], acc), jnp.zeros(x.shape[-1], acc)
    return normalization.normalize(x, ones, zeros, True, self.epsilon)[0].astype(self.dtype)


def conv(features, kernel, *, name=None, stride=1, padding='VALID', use_bias=False,
         dtype=jnp.float32, param_dtype=jnp.float32):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=padding, use_bias=use_bias, kernel_init=weight_init,
                 bias_init=nn.initializers.zeros, dtype=dtype,
                 param_dtype=param_dtype, name=name)


@dataclasses.dataclass(frozen=True)
class LayerFactory:
  """How every block makes its layers: chosen once per network, then passed down.

  `norm(name=...)` makes BatchNorm or InstanceNorm.  A convolution followed by a
  norm has a bias only where the norm has no shift of its own (instance norm,
  affine=False), as in the official code: `conv_bias`.  Every layer computes in
  `dtype` and keeps its parameters in `param_dtype`.
  """
  norm: Callable[..., nn.Module]
  conv_bias: bool
  dtype: Dtype
  param_dtype: Dtype

  def conv(self, features, kernel, *, name, stride=1, padding='VALID', use_bias=None):
    """use_bias None: the rule for a convolution followed by a norm."""
    return conv(features, kernel, name=name, stride=stride, padding=padding,
                use_bias=self.conv_bias if use_bias is None else use_bias,
                dtype=self.dtype, param_dtype=self.param_dtype)

  def few_channel_conv(self, features, kernel, convolve, *, name, use_bias=None):
    """A VALID convolution to or from a few channels (`FewChannelConv`)."""
    return FewChannelConv(features, kernel, convolve,
                          use_bias=self.conv_bias if use_bias is None else use_bias,
                          dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def down(self, features, *, name):
    return DownConv(features, use_bias=self.conv_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=name)

  def up(self, features, *, name):
    return UpConv(features, use_bias=self.conv_bias, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=name)

  def attention(self, *, name):
    return ChannelAttention(dtype=self.dtype, param_dtype=self.param_dtype, name=name)


def _dtype(value, field):
  try:
    return jnp.dtype(value)
  except TypeError:
    raise ValueError(f'config.model.{field}={value!r} is not a dtype '
                     "(e.g. 'float32', 'bfloat16')") from None


def layer_factory(norm: str, dtype='float32', param_dtype='float32') -> LayerFactory:
  """The factory for `config.model.norm`, `dtype` and `param_dtype`; the one place
  these are checked."""
  dtype, param_dtype = _dtype(dtype, 'dtype'), _dtype(param_dtype, 'param_dtype')
  if norm == 'batch':
    return LayerFactory(functools.partial(BatchNorm, dtype=dtype, param_dtype=param_dtype),
                        False, dtype, param_dtype)
  if norm == 'instance':
    return LayerFactory(functools.partial(InstanceNorm, dtype=dtype), True, dtype, param_dtype)
  raise ValueError(f"config.model.norm={norm!r} must be 'batch' or 'instance'")


def _add_bias(module, y):
  """y + a learned per-channel bias named 'bias', as `nn.Conv` keeps it, where the
  module's `use_bias` asks for one."""
  if not module.use_bias:
    return y
  bias = module.param('bias', nn.initializers.zeros, (y.shape[-1],), module.param_dtype)
  return y + bias.astype(y.dtype)


class ResamplingConv(nn.Module):
  """A 3x3 convolution that doubles or halves H and W: `resample(x, kernel)`.

  The kernel is stored as `[kh, kw, in, out]`; for the transposed convolution it holds
  torch's `[in, out, kh, kw]` weight unchanged in meaning.
  """
  features: int
  resample: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', weight_init, (3, 3, x.shape[-1], self.features),
                        self.param_dtype)
    y = self.resample(x.astype(self.dtype), kernel.astype(self.dtype))
    return _add_bias(self, y)


# ConvTranspose2d(k=3, s=2, p=1, output_padding=1) as stride-1 convolutions: the same result
# as the dilated-input formulation, whose kernel gradient XLA:CPU computes far slower.
UpConv = functools.partial(ResamplingConv, resample=convolution.upsample_conv)
# Conv2d(k=3, s=2, p=1) on an even-sized input.
DownConv = functools.partial(ResamplingConv, resample=convolution.downsample_conv)


class ChannelAttention(nn.Module):
  """Official `IntraModalAttention`: x + x * sigmoid(W2 relu(W1 mean_hw(x))).

  The hidden width is channels // 16.  Below 16 channels it is 0 (the official
  code then holds empty Linear layers): the excitation is sigmoid(0) = 0.5 and
  the layer computes 1.5 x, with no parameters.
  """
  reduction: int = 16
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    hidden = channels // self.reduction
    if hidden == 0:
      return x * 1.5
    squeezed = reduction.channel_sums(x) / (x.shape[1] * x.shape[2])
    dense = lambda n, name: nn.Dense(n, use_bias=False, kernel_init=weight_init,
                                     dtype=self.dtype, param_dtype=self.param_dtype,
                                     dot_general=reduction.per_example_dot, name=name)
    weights = nn.sigmoid(dense(channels, 'excite')(nn.relu(dense(hidden, 'squeeze')(squeezed))))
    return x + x * weights[:, None, None, :]


class HalfDropout(nn.Module):
  """`nn.Dropout(0.5)` (the official rate) from one random bit per element.

  Keeping or dropping on a single bit of a uint32 draw is an exact Bernoulli(0.5)
  and needs 1/32 of the random numbers `nn.Dropout` draws.  The draw is [N, words]:
  an example's mask depends on its index in the global batch, never on the device
  count.
  """

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if deterministic:
      return x
    n, per_example = x.shape[0], x[0].size
    words = jax.random.bits(self.make_rng('dropout'), (n, -(-per_example // 32)), jnp.uint32)
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    keep = bits.reshape(n, -1)[:, :per_example].reshape(x.shape).astype(bool)
    return jnp.where(keep, x * 2, jnp.zeros_like(x))


class ResnetBlock(nn.Module):
  """x + [reflect-pad 1, conv3x3, norm, ReLU, dropout 0.5, reflect-pad 1, conv3x3, norm]."""
  make: LayerFactory
  use_dropout: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool):
    features = x.shape[-1]
    h = self.make.conv(features, 3, name='conv_0')(convolution.reflect_pad(x, 1))
    h = nn.relu(self.make.norm(name='norm_0')(h, train=train))
    if self.use_dropout:
      h = HalfDropout()(h, deterministic=not train)
    h = self.make.conv(features, 3, name='conv_1')(convolution.reflect_pad(h, 1))
    return x + self.make.norm(name='norm_1')(h, train=train)


class Modulation(nn.Module):
  """x * (1 + scale) + shift per channel, both linear in a per-example code [N, K]
  (one-hot modality codes: a learned scale and shift per code entry).  Zero at
  initialisation, so the layer starts as the identity."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, code):
    channels = x.shape[-1]
    both = nn.Dense(2 * channels, use_bias=False, kernel_init=nn.initializers.zeros,
                    dtype=self.dtype, param_dtype=self.param_dtype,
                    dot_general=reduction.per_example_dot,
                    name='film')(code.astype(self.dtype))
    scale, shift = jnp.split(both.astype(x.dtype), 2, axis=-1)
    return normalization.modulate(x, scale, shift)


class BranchEncoder(nn.Module):
  """7x7 conv then two stride-2 3x3 convs, each followed by norm and ReLU.

  `constant_planes`: the input's channels after the first are constant over H and W
  (the generator's one-hot target planes), so the first conv folds them into a bias.
  `conditioned`: each norm is followed by a `Modulation` by the call's `code` (the
  any-set generator's slot and target identities).  `weights` [N] go to the norms:
  an example of weight 0 (an absent input) stays out of batch statistics.
  """
  make: LayerFactory
  ngf: int = 64
  constant_planes: bool = False
  conditioned: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool, weights=None, code=None):
    convolve = (convolution.conv_from_constant_planes if self.constant_planes else
                convolution.conv_from_few_channels)

    def norm_relu(h, name):
      h = self.make.norm(name=f'norm_{name}')(h, train=train, weights=weights)
      if self.conditioned:
        h = Modulation(self.make.dtype, self.make.param_dtype, name=f'modulation_{name}')(h, code)
      return nn.relu(h)

    h = self.make.few_channel_conv(self.ngf, 7, convolve, name='conv_in')(
        convolution.reflect_pad(x, 3))
    h = norm_relu(h, 'in')
    for i, features in enumerate((2 * self.ngf, 4 * self.ngf)):
      h = norm_relu(self.make.down(features, name=f'down_{i}')(h), f'down_{i}')
    return h


class DecoderStage(nn.Module):
  """Transposed conv (2x), norm, ReLU and, in the generator, channel attention."""
  make: LayerFactory
  features: int
  attention: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    h = self.make.up(self.features, name='up')(x)
    h = nn.relu(self.make.norm(name='norm')(h, train=train))
    if self.attention:
      h = self.make.attention(name='attention')(h)
    return h


class PatchConv(nn.Module):
  """Conv2d(k=4, s=2, no padding, no bias): the discriminator's patch logits.

  On a CPU it runs as a 2x2 convolution over the space-to-depth input, whose input
  gradient XLA:CPU computes far faster than the strided form's.
  """
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', weight_init, (4, 4, x.shape[-1], self.features),
                        self.param_dtype)
    return jax.lax.platform_dependent(x.astype(self.dtype), kernel.astype(self.dtype),
                                      cpu=convolution.patch_conv_by_phase,
                                      default=convolution.patch_conv_strided)


class FewChannelConv(nn.Module):
  """`nn.Conv(features, kernel, padding='VALID')` with the same parameters, for a
  convolution to or from a few channels: on a CPU `convolve` (`tap_conv`,
  `conv_from_few_channels` or `conv_from_constant_planes` of `kernels.convolution`);
  GPUs run the convolution itself well."""
  features: int
  kernel: int
  convolve: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', weight_init,
                        (self.kernel, self.kernel, x.shape[-1], self.features), self.param_dtype)
    y = jax.lax.platform_dependent(x.astype(self.dtype), kernel.astype(self.dtype),
                                   cpu=self.convolve, default=convolution.valid_conv)
    return _add_bias(self, y)


class OutputConv(nn.Module):
  """Reflect-pad 3, 7x7 conv with bias, tanh."""
  make: LayerFactory
  features: int = 1

  @nn.compact
  def __call__(self, x):
    h = self.make.few_channel_conv(self.features, 7, convolution.tap_conv, use_bias=True,
                                   name='conv')(convolution.reflect_pad(x, 3))
    return jnp.tanh(h.astype(kernels.accumulation_dtype(self.make.dtype)))
