"""Convolution forms for XLA:CPU, and PyTorch's reflection pad (NHWC, HWIO kernels).

Each form equals a plain `lax.conv_general_dilated` (or a transposed convolution), value
and gradient; on GPUs the layers choose XLA's own form with `lax.platform_dependent`.
Measured speeds are in docs/speed.md.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from aegan_jax import kernels

NHWC = ('NHWC', 'HWIO', 'NHWC')


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
  that result for W, which a GPU ran as two kernels.
  """
  bands = _reflected(x, 1, pad)
  return jnp.concatenate([jnp.concatenate(_reflected(band, 2, pad), axis=2)
                          for band in bands], axis=1)


# Sub-pixel form of ConvTranspose2d(k=3, s=2, p=1, output_padding=1).  Output pixel
# (2m + a) takes input rows m + dh with torch kernel row KERNEL_TAP[a][dh] (None: no tap):
# even outputs use tap 1 at row m; odd outputs tap 2 at row m and tap 0 at row m + 1.
KERNEL_TAP = ((1, None), (2, 0))


def subpixel_kernel(kernel):
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


def subpixel_upsample(x, kernel):
  """ConvTranspose2d(k=3, s=2, p=1, output_padding=1) of x [N, h, w, in] with kernel
  [3, 3, in, out]: a 2x2 stride-1 convolution giving the four output phases, then a
  depth-to-space shuffle to [N, 2h, 2w, out]."""
  n, h, w, _ = x.shape
  features = kernel.shape[-1]
  padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  phases = jax.lax.conv_general_dilated(padded, subpixel_kernel(kernel), window_strides=(1, 1),
                                        padding='VALID', dimension_numbers=NHWC)
  y = phases.reshape(n, h, w, 2, 2, features).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(n, 2 * h, 2 * w, features)


def valid_conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID', dimension_numbers=NHWC)


def phase_upsample(x, kernel):
  """`subpixel_upsample` with each output phase its own convolution over its own taps:
  1x1, 1x2, 2x1 and 2x2, the 9 kernel taps instead of 16 (the sub-pixel kernel's other 7
  are zeros)."""
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
      cols.append(valid_conv(padded[:, :h + len(dh) - 1, :w + len(dw) - 1], taps))
    rows.append(jnp.stack(cols, 3))
  y = jnp.stack(rows, 3)  # [N, h, w, a, b, out]
  return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, kernel.shape[-1])


@jax.custom_vjp
def upsample_by_phase(x, kernel):
  """ConvTranspose2d(k=3, s=2, p=1, output_padding=1) for a CPU: the forward by output
  phase; the input gradient is the stride-2 convolution of dy (9 taps, where the sub-pixel
  form's gradient has 16); the kernel gradient is the sub-pixel form's."""
  return phase_upsample(x, kernel)


def _upsample_by_phase_bwd(residuals, dy):
  x, kernel = residuals
  dx = strided_conv(dy, jnp.swapaxes(kernel, 2, 3))
  (d_kernel,) = jax.vjp(lambda k: subpixel_upsample(x, k), kernel)[1](dy)
  return dx, d_kernel


upsample_by_phase.defvjp(lambda x, kernel: (phase_upsample(x, kernel), (x, kernel)),
                          _upsample_by_phase_bwd)


def upsample_conv(x, kernel):
  """ConvTranspose2d(k=3, s=2, p=1, output_padding=1): [N, h, w, in] -> [N, 2h, 2w, out]."""
  # GPUs keep the sub-pixel form and its autodiff.
  return jax.lax.platform_dependent(x, kernel, cpu=upsample_by_phase,
                                    default=subpixel_upsample)


def strided_conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, window_strides=(2, 2),
                                      padding=((1, 1), (1, 1)), dimension_numbers=NHWC)


@jax.custom_vjp
def downsample_conv(x, kernel):
  """3x3 convolution, stride 2, zero padding 1: [N, H, W, in] -> [N, H/2, W/2, out], H and
  W even.  Its gradients on a CPU above 64x64 inputs are computed phase by phase
  (`cpu_gradients`)."""
  return strided_conv(x, kernel)


def space_to_depth(x):
  """[N, H, W, C] -> [N, H/2, W/2, 4C], channels ordered (row phase a, column phase b, C)."""
  n, height, width, channels = x.shape
  x = x.reshape(n, height // 2, 2, width // 2, 2, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, height // 2, width // 2, 4 * channels)


def phase_kernel(kernel):
  """[4, 4, in, out] kernel -> [2, 2, 4 * in, out]: tap (2r + a, 2s + b) at [r, s, (a, b, in)]."""
  _, _, channels, features = kernel.shape
  kernel = kernel.reshape(2, 2, 2, 2, channels, features).transpose(0, 2, 1, 3, 4, 5)
  return kernel.reshape(2, 2, 4 * channels, features)


def unphase_kernel(kernel):
  """Inverse of `phase_kernel`."""
  _, _, depth, features = kernel.shape
  kernel = kernel.reshape(2, 2, 2, 2, depth // 4, features).transpose(0, 2, 1, 3, 4, 5)
  return kernel.reshape(4, 4, depth // 4, features)


def phase_gradients(x, kernel, dy):
  """(dx, dkernel) of `downsample_conv` from stride-1 convolutions only.

  XLA:CPU computes them as convolutions over a dilated input and a dilated kernel, well
  below its usual speed.  Here dx is the transposed convolution by output phase, and
  dkernel the kernel gradient of a 2x2 convolution over the space-to-depth padded input
  (a 4x4 kernel whose taps past 2 are dropped).
  """
  dx = phase_upsample(dy, jnp.swapaxes(kernel, 2, 3))
  depth = space_to_depth(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
  _, pullback = jax.vjp(lambda k: valid_conv(depth, k),
                        jnp.zeros((2, 2, depth.shape[-1], dy.shape[-1]), dy.dtype))
  (taps,) = pullback(dy)
  return dx, unphase_kernel(taps)[:3, :3]


def xla_gradients(x, kernel, dy):
  return jax.vjp(strided_conv, x, kernel)[1](dy)


def cpu_gradients(x, kernel, dy):
  """The faster of the two forms on XLA:CPU, by input size: XLA's own up to 64x64, the
  phase form above (docs/speed.md)."""
  if x.shape[1] * x.shape[2] <= 64 * 64:
    return xla_gradients(x, kernel, dy)
  return phase_gradients(x, kernel, dy)


def _downsample_bwd(residuals, dy):
  # GPUs keep XLA's own gradients (cuDNN runs the strided forms well).
  return jax.lax.platform_dependent(*residuals, dy, cpu=cpu_gradients,
                                    default=xla_gradients)


downsample_conv.defvjp(lambda x, kernel: (strided_conv(x, kernel), (x, kernel)),
                       _downsample_bwd)


@jax.custom_vjp
def tap_conv(x, kernel):
  """VALID convolution to few output channels, as one product and a sum of shifts.

  The product gives every kernel tap's contribution at every position, [N, Hp, Wp,
  taps * out]; each output sums its taps' planes, shifted: XLA:CPU runs a convolution
  to one channel far below its matrix-product speed.  The backward pass is XLA's own
  (autodiff of the shifted sum is far slower).
  """
  kh, kw, channels, features = kernel.shape
  n, height, width = x.shape[0], x.shape[1] - kh + 1, x.shape[2] - kw + 1
  per_tap = kernel.reshape(kh * kw, channels, features).transpose(1, 0, 2).reshape(channels, -1)
  taps = jnp.dot(x, per_tap, preferred_element_type=kernels.accumulation_dtype(x.dtype))
  taps = taps.reshape(*x.shape[:3], kh * kw, features)
  out = jnp.zeros((n, height, width, features), taps.dtype)
  for a in range(kh):
    for b in range(kw):
      out = out + taps[:, a:a + height, b:b + width, a * kw + b]
  return out.astype(x.dtype)


tap_conv.defvjp(lambda x, kernel: (tap_conv(x, kernel), (x, kernel)),
                 lambda residuals, dy: jax.vjp(valid_conv, *residuals)[1](dy))


def patch_conv_by_phase(x, kernel):
  # An odd last row or column is one no window reaches.
  x = x[:, :x.shape[1] // 2 * 2, :x.shape[2] // 2 * 2]
  return valid_conv(space_to_depth(x), phase_kernel(kernel))


def patch_conv_strided(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (2, 2), 'VALID', dimension_numbers=NHWC)


@jax.custom_vjp
def conv_from_few_channels(x, kernel):
  """VALID convolution from few input channels (XLA's); its input gradient, a convolution
  to those few channels, by `tap_conv`."""
  return valid_conv(x, kernel)


def _conv_from_few_channels_bwd(residuals, dy):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  full = jnp.pad(dy, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
  dx = tap_conv(full, jnp.swapaxes(kernel[::-1, ::-1], 2, 3))
  (d_kernel,) = jax.vjp(lambda k: valid_conv(x, k), kernel)[1](dy)
  return dx, d_kernel


conv_from_few_channels.defvjp(lambda x, kernel: (valid_conv(x, kernel), (x, kernel)),
                               _conv_from_few_channels_bwd)


def conv_from_constant_planes(x, kernel):
  """`conv_from_few_channels` of an input whose channels after the first are constant
  over H and W: the image channel convolved, plus each plane's value times the sum of its
  kernel taps.  The generator's first convolutions then cost the autoencoder's."""
  planes = x[:, 0, 0, 1:]
  y = conv_from_few_channels(x[..., :1], kernel[:, :, :1])
  return y + jnp.dot(planes, kernel[:, :, 1:].sum((0, 1)))[:, None, None, :]
