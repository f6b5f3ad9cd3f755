"""Array functions below the Flax layers, with their custom gradients.

- `convolution`: the convolution forms XLA:CPU runs slowly as written (strided,
  transposed, to or from few channels) recast as faster equivalents, and PyTorch's
  reflection pad.
- `normalization`: BatchNorm's and InstanceNorm's maths with a closed-form gradient.
- `reduction`: sums whose rounding does not depend on how a batch is split over devices.

Each function computes exactly what its plain form does (tests/test_kernels.py checks
values and gradients against float64 autodiff); `layers.py` builds the modules on them.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

Dtype = Any


def accumulation_dtype(dtype) -> Dtype:
  """Statistics, logits and losses: float32 under bfloat16 compute, float64 under float64."""
  return jnp.promote_types(dtype, jnp.float32)
