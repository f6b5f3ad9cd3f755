"""Sums whose rounding does not depend on how a batch is split over devices."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def pairwise_sum(x, axis):
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
  return pairwise_sum(per_example, 0)


def channel_sums(x, folds=3):
  """Per-example channel sums, [N, H, W, C] -> [N, C].

  Summed as a product with ones, which XLA:CPU runs far faster than a reduction
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


def per_example_dot(lhs, rhs, dimension_numbers, precision=None,
                    preferred_element_type=None, **unused):
  """`lax.dot_general` for `nn.Dense` on [N, in] x [in, out] as multiply and sum.

  A matmul kernel blocks its rows differently for each batch size, so an
  example's result would depend on how many examples its device holds.
  """
  del dimension_numbers, precision, preferred_element_type, unused
  return jnp.sum(lhs[..., :, None] * rhs, axis=-2)
