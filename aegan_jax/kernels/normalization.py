"""Normalisation maths: moments over H and W (per example) or over the batch, with a
closed-form gradient written with `reduction.channel_sums`."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from aegan_jax.kernels import reduction


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
    return reduction.channel_sums(v)
  sums = reduction.channel_sums(v)
  return reduction.batch_sum(sums if weights is None else sums * weights[:, None])


def moment_count(x, per_example, weights=None):
  """Elements behind each moment: H * W per example, N * H * W, or sum(weights) * H * W
  (at least 1, so a batch of weight 0 gives finite moments)."""
  if weights is not None:
    return jnp.maximum(reduction.batch_sum(weights), 1e-12) * (x.shape[1] * x.shape[2])
  return x.size // x.shape[-1] // (x.shape[0] if per_example else 1)


def _moments_fwd(x, scale, bias, per_example, epsilon, weights):
  count = moment_count(x, per_example, weights)
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


def sums_side_by_side(dy, x_hat, per_example):
  both = _moment_sums(jnp.concatenate([dy, dy * x_hat], -1), per_example)
  return tuple(jnp.split(both, 2, axis=-1))


def sums_separately(dy, x_hat, per_example):
  return _moment_sums(dy, per_example), _moment_sums(dy * x_hat, per_example)


def gradient_sums(dy, x_hat, per_example):
  """(sums of dy, sums of dy * x_hat), as `_moment_sums` takes them.

  On a CPU, one product over the two arrays side by side is faster; a GPU fuses each
  sum with the product feeding it instead, where the side-by-side copy cost more than
  the norm itself (docs/speed.md).
  """
  return jax.lax.platform_dependent(
      dy, x_hat, cpu=functools.partial(sums_side_by_side, per_example=per_example),
      default=functools.partial(sums_separately, per_example=per_example))


def _moments_bwd(per_example, residuals, cotangents, weights):
  """The closed-form gradient.  With weights, the moments are weighted means, so
  d mean / d x_n and d var / d x_n carry the factor weights[n] / count; the sums of dy
  run over every example, whose outputs all depend on the moments."""
  x, mean, inv, scale = residuals
  x_hat = (x.astype(scale.dtype) - _over_hw(mean)) * _over_hw(inv)
  dy = cotangents[0]
  count = moment_count(x, per_example, weights)
  d_bias, d_scale = gradient_sums(dy, x_hat, per_example)
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


@jax.custom_vjp
def modulate(x, scale, shift):
  """x * (1 + scale) + shift with a per-example scale and shift [N, C] (conditional
  normalisation).  Their gradients are H/W sums, taken by `gradient_sums` as the norm's
  are, not by XLA:CPU's slow reductions over non-minor axes (docs/speed.md)."""
  return x * (1 + _over_hw(scale)) + _over_hw(shift)


def _modulate_fwd(x, scale, shift):
  return modulate(x, scale, shift), (x, scale)


def _modulate_bwd(residuals, dy):
  x, scale = residuals
  d_shift, d_scale = gradient_sums(dy, x, True)
  return dy * (1 + _over_hw(scale)), d_scale.astype(scale.dtype), d_shift.astype(scale.dtype)


modulate.defvjp(_modulate_fwd, _modulate_bwd)


def ema_update(running, batch_value, momentum):
  """PyTorch's running-statistics rule: (1 - m) * running + m * batch."""
  return (1.0 - momentum) * running + momentum * batch_value
