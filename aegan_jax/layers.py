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

Dtype = Any
_NHWC = ('NHWC', 'HWIO', 'NHWC')

# Official `init_weights(init_type='normal', init_gain=0.02)`.
weight_init = nn.initializers.normal(0.02)


def accumulation_dtype(dtype) -> Dtype:
  """Statistics, logits and losses: float32 under bfloat16 compute, float64 under float64."""
  return jnp.promote_types(dtype, jnp.float32)


def scale_init(key, shape, dtype=jnp.float32):
  """BatchNorm gamma ~ N(1, 0.02), as the official initialiser draws it."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _reflected(x, axis, pad):
  """[mirror of the `pad` entries after the first, x, mirror of those before the last]."""
  size = x.shape[axis]
  before = jax.lax.rev(jax.lax.slice_in_dim(x, 1, pad + 1, axis=axis), (axis,))
  after = jax.lax.rev(jax.lax.slice_in_dim(x, size - pad - 1, size - 1, axis=axis), (axis,))
  return [before, x, after]


def reflect_pad(x, pad):
  """PyTorch ReflectionPad2d (edge pixel not repeated) on an NHWC tensor.

  Each row band (top mirror, image, bottom mirror) is padded along W from slices
  of x itself, then the bands are stacked: one concatenation of single-use parts,
  which XLA fuses into one pass.  `jnp.pad(mode='reflect')` pads H, then slices
  that result for W, and ran as two kernels on a GPU (16% of the bf16 iteration).
  """
  bands = _reflected(x, 1, pad)
  return jnp.concatenate([jnp.concatenate(_reflected(band, 2, pad), axis=2)
                          for band in bands], axis=1)


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
    acc = accumulation_dtype(self.param_dtype)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), acc)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), acc)
    if not train:
      inv = jax.lax.rsqrt(running_var.value + self.epsilon) * scale.astype(acc)
      return ((x.astype(acc) - running_mean.value) * inv + bias.astype(acc)).astype(self.dtype)
    if weights is None:
      y, mean, var = normalize(x, scale.astype(acc), bias.astype(acc), False, self.epsilon)
      count = x.size // features
      unbiased_var = var * (count / max(count - 1, 1))
    else:
      weights = weights.astype(acc)
      y, mean, var = weighted_normalize(x, weights, scale.astype(acc), bias.astype(acc),
                                        self.epsilon)
      count = _moment_count(x, False, weights)
      unbiased_var = var * (count / jnp.maximum(count - 1, 1))
    if not self.is_initializing():
      running_mean.value = ema_update(running_mean.value, mean, self.momentum)
      running_var.value = ema_update(running_var.value, unbiased_var, self.momentum)
    if self.is_mutable_collection('batch_moments'):
      self.put_variable('batch_moments', 'mean', mean)
      self.put_variable('batch_moments', 'var', unbiased_var)
    return y.astype(self.dtype)


def _pairwise_sum(x, axis):
  """Sum over `axis` by adding halves until one entry is left (odd lengths get a zero);
  rounding then grows with log2 of the length, not with the length."""
  while x.shape[axis] > 1:
    if x.shape[axis] % 2:
      pad = [(0, 0)] * x.ndim
      pad[axis] = (0, 1)
      x = jnp.pad(x, pad)
    first, second = jnp.split(x, 2, axis=axis)
    x = first + second
  return jnp.squeeze(x, axis)


def batch_sum(per_example):
  """Sum over the leading (batch) axis in a fixed pairwise order: [N, ...] -> [...].

  A plain sum over a batch sharded on several devices adds per-device partial
  sums, so its rounding depends on the device count.  Pairwise adds of whole
  examples round the same wherever the examples live.
  """
  return _pairwise_sum(per_example, 0)


def channel_sums(x, folds=3):
  """Per-example channel sums, [N, H, W, C] -> [N, C].

  Summed as a product with ones, which XLA:CPU runs about 10x faster than a reduction
  over the non-minor H and W axes.  A product accumulates in sequence, and the exactly
  constant background of a prepared slice repeats one rounding error (sums 1e-4 off at
  256 px, enough for 1 and N devices' gradients to disagree by 1e-2), so the positions
  are first folded in half `folds` times.  Each example is summed on its own, so the
  sums do not depend on the device count.
  """
  flat = x.reshape(x.shape[0], -1, x.shape[-1])
  for _ in range(folds):
    if flat.shape[1] % 2:
      break
    half = flat.shape[1] // 2
    flat = flat[:, :half] + flat[:, half:]
  return jnp.einsum('nk,nkc->nc', jnp.ones(flat.shape[:2], x.dtype), flat,
                    precision=jax.lax.Precision.HIGHEST)


def _over_hw(stat):
  """A [C] or [N, C] statistic, broadcastable against [N, H, W, C]."""
  return stat[:, None, None, :] if stat.ndim == 2 else stat


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize(x, scale, bias, per_example: bool, epsilon: float):
  """((x - mean) / sqrt(var + epsilon)) * scale + bias, with biased moments over H and W
  (per example) or over N, H and W (the whole batch, in `batch_sum`'s fixed order).

  Computes in scale's dtype and returns (y, mean, var) in it; the moments carry no
  gradient.  The gradient is the usual closed form, written with `channel_sums` so
  that no H/W reduction is left to XLA.  The backward pass keeps x in its own dtype
  (bfloat16 under mixed precision) and recomputes x_hat with the forward's ops, so
  float32 results are bitwise those of keeping x_hat, at half the saved bytes in
  bfloat16.
  """
  return _normalize_fwd(x, scale, bias, per_example, epsilon)[0]


def _moment_sums(v, per_example, weights=None):
  if per_example:
    return channel_sums(v)
  sums = channel_sums(v)
  return batch_sum(sums if weights is None else sums * weights[:, None])


def _moment_count(x, per_example, weights=None):
  """Elements behind each moment: H * W per example, N * H * W, or sum(weights) * H * W
  (at least 1, so a batch of weight 0 gives finite moments)."""
  if weights is not None:
    return jnp.maximum(batch_sum(weights), 1e-12) * (x.shape[1] * x.shape[2])
  return x.size // x.shape[-1] // (x.shape[0] if per_example else 1)


def _moments_fwd(x, scale, bias, per_example, epsilon, weights):
  count = _moment_count(x, per_example, weights)
  wide = x.astype(scale.dtype)
  mean = _moment_sums(wide, per_example, weights) / count
  centered = wide - _over_hw(mean)
  var = _moment_sums(centered * centered, per_example, weights) / count
  inv = jax.lax.rsqrt(var + epsilon)
  y = centered * _over_hw(inv) * scale + bias
  moments = (jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var))
  return (y, *moments), (x, mean, inv, scale)


def _normalize_fwd(x, scale, bias, per_example, epsilon):
  return _moments_fwd(x, scale, bias, per_example, epsilon, None)


def _sums_side_by_side(dy, x_hat, per_example):
  both = _moment_sums(jnp.concatenate([dy, dy * x_hat], -1), per_example)
  return tuple(jnp.split(both, 2, axis=-1))


def _sums_separately(dy, x_hat, per_example):
  return _moment_sums(dy, per_example), _moment_sums(dy * x_hat, per_example)


def _gradient_sums(dy, x_hat, per_example):
  """(sums of dy, sums of dy * x_hat), as `_moment_sums` takes them.

  On a CPU, one product over the two arrays side by side is faster; a GPU fuses each
  sum with the product feeding it instead, where the side-by-side copy cost more than
  the norm itself (docs/speed.md).
  """
  return jax.lax.platform_dependent(
      dy, x_hat, cpu=functools.partial(_sums_side_by_side, per_example=per_example),
      default=functools.partial(_sums_separately, per_example=per_example))


def _moments_bwd(per_example, residuals, cotangents, weights):
  """The closed-form gradient.  With weights, the moments are weighted means, so
  d mean / d x_n and d var / d x_n carry the factor weights[n] / count; the sums of dy
  run over every example, whose outputs all depend on the moments."""
  x, mean, inv, scale = residuals
  x_hat = (x.astype(scale.dtype) - _over_hw(mean)) * _over_hw(inv)
  dy = cotangents[0]
  count = _moment_count(x, per_example, weights)
  d_bias, d_scale = _gradient_sums(dy, x_hat, per_example)
  d_bias_x, d_scale_x = _over_hw(d_bias), x_hat * _over_hw(d_scale)
  if weights is not None:
    d_bias_x, d_scale_x = (v * weights[:, None, None, None] for v in (d_bias_x, d_scale_x))
  dx = _over_hw(inv * scale / count) * (count * dy - d_bias_x - d_scale_x)
  if per_example:
    d_bias, d_scale = d_bias.sum(0), d_scale.sum(0)
  return dx.astype(x.dtype), d_scale, d_bias


def _normalize_bwd(per_example, epsilon, residuals, cotangents):
  del epsilon
  return _moments_bwd(per_example, residuals, cotangents, None)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def weighted_normalize(x, weights, scale, bias, epsilon: float):
  """`normalize` over the batch with example n counted `weights[n]` times (0: left out
  of the moments; its output is still normalised with them).  Returns (y, mean, var)."""
  return _moments_fwd(x, scale, bias, False, epsilon, weights)[0]


def _weighted_fwd(x, weights, scale, bias, epsilon):
  outputs, residuals = _moments_fwd(x, scale, bias, False, epsilon, weights)
  return outputs, (residuals, weights)


def _weighted_bwd(epsilon, residuals, cotangents):
  del epsilon
  residuals, weights = residuals
  dx, d_scale, d_bias = _moments_bwd(False, residuals, cotangents, weights)
  return dx, jnp.zeros_like(weights), d_scale, d_bias


weighted_normalize.defvjp(_weighted_fwd, _weighted_bwd)


def per_example_dot(lhs, rhs, dimension_numbers, precision=None,
                    preferred_element_type=None, **unused):
  """`lax.dot_general` for `nn.Dense` on [N, in] x [in, out] as multiply and sum.

  A matmul kernel blocks its rows differently for each batch size, so an
  example's result would depend on how many examples its device holds.
  """
  del dimension_numbers, precision, preferred_element_type, unused
  return jnp.sum(lhs[..., :, None] * rhs, axis=-2)


def ema_update(running, batch_value, momentum):
  """PyTorch's running-statistics rule: (1 - m) * running + m * batch."""
  return (1.0 - momentum) * running + momentum * batch_value


class InstanceNorm(nn.Module):
  """InstanceNorm2d(affine=False, track_running_stats=False), the official option."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, weights=None):
    del train, weights  # Same computation in both modes; each example has its own moments.
    acc = accumulation_dtype(self.dtype)
    ones, zeros = jnp.ones(x.shape[-1], acc), jnp.zeros(x.shape[-1], acc)
    return normalize(x, ones, zeros, True, self.epsilon)[0].astype(self.dtype)


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


# Sub-pixel form of ConvTranspose2d(k=3, s=2, p=1, output_padding=1).  Output pixel
# (2m + a) takes input rows m + dh with torch kernel row KERNEL_TAP[a][dh] (None: no tap):
# even outputs use tap 1 at row m; odd outputs tap 2 at row m and tap 0 at row m + 1.
KERNEL_TAP = ((1, None), (2, 0))


def _subpixel_kernel(kernel):
  """[3, 3, in, out] transposed-conv kernel -> [2, 2, in, 4 * out] stride-1 kernel.

  Output channels are ordered (row phase a, column phase b, out).
  """
  zeros = jnp.zeros_like(kernel[0, 0])
  tap = lambda a, b, dh, dw: (zeros if KERNEL_TAP[a][dh] is None or KERNEL_TAP[b][dw] is None
                              else kernel[KERNEL_TAP[a][dh], KERNEL_TAP[b][dw]])
  rows = []
  for dh in range(2):
    cols = []
    for dw in range(2):
      cols.append(jnp.concatenate([tap(a, b, dh, dw) for a in range(2) for b in range(2)], -1))
    rows.append(jnp.stack(cols))
  return jnp.stack(rows)


def _subpixel_upsample(x, kernel):
  """ConvTranspose2d(k=3, s=2, p=1, output_padding=1) of x [N, h, w, in] with kernel
  [3, 3, in, out]: a 2x2 stride-1 convolution giving the four output phases, then a
  depth-to-space shuffle to [N, 2h, 2w, out]."""
  n, h, w, _ = x.shape
  features = kernel.shape[-1]
  padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  phases = jax.lax.conv_general_dilated(padded, _subpixel_kernel(kernel), window_strides=(1, 1),
                                        padding='VALID', dimension_numbers=_NHWC)
  y = phases.reshape(n, h, w, 2, 2, features).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(n, 2 * h, 2 * w, features)


def _valid_conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID', dimension_numbers=_NHWC)


def _phase_upsample(x, kernel):
  """`_subpixel_upsample` with each output phase its own convolution over its own taps:
  1x1, 1x2, 2x1 and 2x2, the 9 kernel taps instead of 16 (the sub-pixel kernel's other 7
  are zeros).  XLA:CPU runs it ~35% faster at 64-128 px maps."""
  n, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  rows = []
  for a in range(2):
    cols = []
    for b in range(2):
      dh = [d for d in range(2) if KERNEL_TAP[a][d] is not None]
      dw = [d for d in range(2) if KERNEL_TAP[b][d] is not None]
      taps = jnp.stack([jnp.stack([kernel[KERNEL_TAP[a][i], KERNEL_TAP[b][j]] for j in dw])
                        for i in dh])
      cols.append(_valid_conv(padded[:, :h + len(dh) - 1, :w + len(dw) - 1], taps))
    rows.append(jnp.stack(cols, 3))
  y = jnp.stack(rows, 3)  # [N, h, w, a, b, out]
  return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, kernel.shape[-1])


@jax.custom_vjp
def _upsample_by_phase(x, kernel):
  """ConvTranspose2d(k=3, s=2, p=1, output_padding=1) for a CPU: the forward by output
  phase; the input gradient is the stride-2 convolution of dy (9 taps, where the sub-pixel
  form's gradient had 16; 2x faster); the kernel gradient is the sub-pixel form's."""
  return _phase_upsample(x, kernel)


def _upsample_by_phase_bwd(residuals, dy):
  x, kernel = residuals
  dx = _strided_conv(dy, jnp.swapaxes(kernel, 2, 3))
  (d_kernel,) = jax.vjp(lambda k: _subpixel_upsample(x, k), kernel)[1](dy)
  return dx, d_kernel


_upsample_by_phase.defvjp(lambda x, kernel: (_phase_upsample(x, kernel), (x, kernel)),
                          _upsample_by_phase_bwd)


def upsample_conv(x, kernel):
  """ConvTranspose2d(k=3, s=2, p=1, output_padding=1): [N, h, w, in] -> [N, 2h, 2w, out]."""
  # GPUs keep the sub-pixel form and its autodiff.
  return jax.lax.platform_dependent(x, kernel, cpu=_upsample_by_phase,
                                    default=_subpixel_upsample)


def _strided_conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, window_strides=(2, 2),
                                      padding=((1, 1), (1, 1)), dimension_numbers=_NHWC)


@jax.custom_vjp
def downsample_conv(x, kernel):
  """3x3 convolution, stride 2, zero padding 1: [N, H, W, in] -> [N, H/2, W/2, out], H and
  W even.  Its gradients on a CPU above 64x64 inputs are computed phase by phase
  (`_cpu_gradients`)."""
  return _strided_conv(x, kernel)


def _space_to_depth(x):
  """[N, H, W, C] -> [N, H/2, W/2, 4C], channels ordered (row phase a, column phase b, C)."""
  n, height, width, channels = x.shape
  x = x.reshape(n, height // 2, 2, width // 2, 2, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, height // 2, width // 2, 4 * channels)


def _phase_kernel(kernel):
  """[4, 4, in, out] kernel -> [2, 2, 4 * in, out]: tap (2r + a, 2s + b) at [r, s, (a, b, in)]."""
  _, _, channels, features = kernel.shape
  kernel = kernel.reshape(2, 2, 2, 2, channels, features).transpose(0, 2, 1, 3, 4, 5)
  return kernel.reshape(2, 2, 4 * channels, features)


def _unphase_kernel(kernel):
  """Inverse of `_phase_kernel`."""
  _, _, depth, features = kernel.shape
  kernel = kernel.reshape(2, 2, 2, 2, depth // 4, features).transpose(0, 2, 1, 3, 4, 5)
  return kernel.reshape(4, 4, depth // 4, features)


def _phase_gradients(x, kernel, dy):
  """(dx, dkernel) of `downsample_conv` from stride-1 convolutions only.

  XLA:CPU computes them as convolutions over a dilated input and a dilated kernel, at
  a quarter of its usual speed.  Here dx is the transposed convolution by output phase,
  and dkernel the kernel gradient of a 2x2 convolution over the space-to-depth padded
  input (a 4x4 kernel whose taps past 2 are dropped).  2.1x faster for the first
  256 px layer (fwd+bwd), and the 256 px iteration 4% faster.
  """
  dx = _phase_upsample(dy, jnp.swapaxes(kernel, 2, 3))
  depth = _space_to_depth(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
  _, pullback = jax.vjp(lambda k: _valid_conv(depth, k),
                        jnp.zeros((2, 2, depth.shape[-1], dy.shape[-1]), dy.dtype))
  (taps,) = pullback(dy)
  return dx, _unphase_kernel(taps)[:3, :3]


def _xla_gradients(x, kernel, dy):
  return jax.vjp(_strided_conv, x, kernel)[1](dy)


def _cpu_gradients(x, kernel, dy):
  """The faster of the two forms on XLA:CPU, by input size: XLA's own up to 64x64 (the
  64 px iteration 3% faster than the phase form, Intel Xeon; no change at 128 px), the
  phase form above."""
  if x.shape[1] * x.shape[2] <= 64 * 64:
    return _xla_gradients(x, kernel, dy)
  return _phase_gradients(x, kernel, dy)


def _downsample_bwd(residuals, dy):
  # GPUs keep XLA's own gradients (cuDNN runs the strided forms well).
  return jax.lax.platform_dependent(*residuals, dy, cpu=_cpu_gradients,
                                    default=_xla_gradients)


downsample_conv.defvjp(lambda x, kernel: (_strided_conv(x, kernel), (x, kernel)),
                       _downsample_bwd)


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
# as the dilated-input formulation, whose kernel gradient XLA:CPU computes about 100x slower.
UpConv = functools.partial(ResamplingConv, resample=upsample_conv)
# Conv2d(k=3, s=2, p=1) on an even-sized input.
DownConv = functools.partial(ResamplingConv, resample=downsample_conv)


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
    squeezed = channel_sums(x) / (x.shape[1] * x.shape[2])
    dense = lambda n, name: nn.Dense(n, use_bias=False, kernel_init=weight_init,
                                     dtype=self.dtype, param_dtype=self.param_dtype,
                                     dot_general=per_example_dot, name=name)
    weights = nn.sigmoid(dense(channels, 'excite')(nn.relu(dense(hidden, 'squeeze')(squeezed))))
    return x + x * weights[:, None, None, :]


class HalfDropout(nn.Module):
  """`nn.Dropout(0.5)` (the official rate) from one random bit per element.

  Keeping or dropping on a single bit of a uint32 draw is an exact Bernoulli(0.5)
  and needs 1/32 of the random numbers `nn.Dropout` draws (whose masks weighed
  heavily at small sizes on an Intel Xeon CPU; the 2-core AMD EPYC timed both the
  same).  The draw is [N, words]: an example's mask depends on its index in the
  global batch, never on the device count.
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
    h = self.make.conv(features, 3, name='conv_0')(reflect_pad(x, 1))
    h = nn.relu(self.make.norm(name='norm_0')(h, train=train))
    if self.use_dropout:
      h = HalfDropout()(h, deterministic=not train)
    h = self.make.conv(features, 3, name='conv_1')(reflect_pad(h, 1))
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
                    dtype=self.dtype, param_dtype=self.param_dtype, dot_general=per_example_dot,
                    name='film')(code.astype(self.dtype))
    scale, shift = jnp.split(both[:, None, None, :].astype(x.dtype), 2, axis=-1)
    return x * (1 + scale) + shift


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
    convolve = _conv_from_constant_planes if self.constant_planes else _conv_from_few_channels

    def norm_relu(h, name):
      h = self.make.norm(name=f'norm_{name}')(h, train=train, weights=weights)
      if self.conditioned:
        h = Modulation(self.make.dtype, self.make.param_dtype, name=f'modulation_{name}')(h, code)
      return nn.relu(h)

    h = self.make.few_channel_conv(self.ngf, 7, convolve, name='conv_in')(reflect_pad(x, 3))
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


@jax.custom_vjp
def _tap_conv(x, kernel):
  """VALID convolution to few output channels, as one product and a sum of shifts.

  The product gives every kernel tap's contribution at every position, [N, Hp, Wp,
  taps * out]; each output sums its taps' planes, shifted.  XLA:CPU runs a 7x7
  convolution to one channel at ~30 GFLOP/s; this forward is 3-8x faster.  The
  backward pass is XLA's own (autodiff of the shifted sum is far slower).
  """
  kh, kw, channels, features = kernel.shape
  n, height, width = x.shape[0], x.shape[1] - kh + 1, x.shape[2] - kw + 1
  per_tap = kernel.reshape(kh * kw, channels, features).transpose(1, 0, 2).reshape(channels, -1)
  taps = jnp.dot(x, per_tap, preferred_element_type=accumulation_dtype(x.dtype))
  taps = taps.reshape(*x.shape[:3], kh * kw, features)
  out = jnp.zeros((n, height, width, features), taps.dtype)
  for a in range(kh):
    for b in range(kw):
      out = out + taps[:, a:a + height, b:b + width, a * kw + b]
  return out.astype(x.dtype)


_tap_conv.defvjp(lambda x, kernel: (_tap_conv(x, kernel), (x, kernel)),
                 lambda residuals, dy: jax.vjp(_valid_conv, *residuals)[1](dy))


def _patch_conv_by_phase(x, kernel):
  # An odd last row or column is one no window reaches.
  x = x[:, :x.shape[1] // 2 * 2, :x.shape[2] // 2 * 2]
  return _valid_conv(_space_to_depth(x), _phase_kernel(kernel))


def _patch_conv_strided(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (2, 2), 'VALID', dimension_numbers=_NHWC)


class PatchConv(nn.Module):
  """Conv2d(k=4, s=2, no padding, no bias): the discriminator's patch logits.

  On a CPU it runs as a 2x2 convolution over the space-to-depth input: XLA:CPU
  computed the strided form's input gradient at 4 GFLOP/s (35 ms of the 256 px
  iteration, for a convolution to one channel).
  """
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', weight_init, (4, 4, x.shape[-1], self.features),
                        self.param_dtype)
    return jax.lax.platform_dependent(x.astype(self.dtype), kernel.astype(self.dtype),
                                      cpu=_patch_conv_by_phase, default=_patch_conv_strided)


@jax.custom_vjp
def _conv_from_few_channels(x, kernel):
  """VALID convolution from few input channels (XLA's); its input gradient, a convolution
  to those few channels, by `_tap_conv` (XLA:CPU took 13-17 ms for the autoencoder's first
  convolution's input gradient at 256 px)."""
  return _valid_conv(x, kernel)


def _conv_from_few_channels_bwd(residuals, dy):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  full = jnp.pad(dy, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
  dx = _tap_conv(full, jnp.swapaxes(kernel[::-1, ::-1], 2, 3))
  (d_kernel,) = jax.vjp(lambda k: _valid_conv(x, k), kernel)[1](dy)
  return dx, d_kernel


_conv_from_few_channels.defvjp(lambda x, kernel: (_valid_conv(x, kernel), (x, kernel)),
                               _conv_from_few_channels_bwd)


def _conv_from_constant_planes(x, kernel):
  """`_conv_from_few_channels` of an input whose channels after the first are constant
  over H and W: the image channel convolved, plus each plane's value times the sum of its
  kernel taps.  The generator's first convolutions then cost the autoencoder's (the 64 px
  iteration 3.5% faster, Intel Xeon)."""
  planes = x[:, 0, 0, 1:]
  y = _conv_from_few_channels(x[..., :1], kernel[:, :, :1])
  return y + jnp.dot(planes, kernel[:, :, 1:].sum((0, 1)))[:, None, None, :]


class FewChannelConv(nn.Module):
  """`nn.Conv(features, kernel, padding='VALID')` with the same parameters, for a
  convolution to or from a few channels: on a CPU `convolve` (`_tap_conv`,
  `_conv_from_few_channels` or `_conv_from_constant_planes`); GPUs run the convolution
  itself well."""
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
                                   cpu=self.convolve, default=_valid_conv)
    return _add_bias(self, y)


class OutputConv(nn.Module):
  """Reflect-pad 3, 7x7 conv with bias, tanh."""
  make: LayerFactory
  features: int = 1

  @nn.compact
  def __call__(self, x):
    h = self.make.few_channel_conv(self.features, 7, _tap_conv, use_bias=True,
                                   name='conv')(reflect_pad(x, 3))
    return jnp.tanh(h.astype(accumulation_dtype(self.make.dtype)))
