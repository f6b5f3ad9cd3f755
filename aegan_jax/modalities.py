"""Generator branch order, shared by the data pipeline, the model and synthesis.

AE-GAN (official code) feeds the generator one branch per *input* modality.
For target modality ``k`` out of ``M``, branch ``i`` (``i = 0 .. M-2``) receives
modality ``(k + 1 + i) mod M``.  Every branch carries ``1 + M`` channels: the
image, then ``M`` constant planes holding the one-hot code of the target
(the "modality mask vector").  Layout here is NHWC, so a generator input has
``(M - 1) * (M + 1)`` channels, branch-major.

Modality names and their file names are defined in ``data_prep.layouts``.
"""
from __future__ import annotations

import numpy as np


def branch_modalities(target_index, num_modalities: int) -> list:
  """Modality index fed to each generator branch: ints for an int target, arrays
  of the target's shape for an index array (numpy or jax)."""
  return [(target_index + 1 + i) % num_modalities
          for i in range(num_modalities - 1)]


def generator_input_channels(num_modalities: int) -> int:
  return (num_modalities - 1) * (num_modalities + 1)


def assemble_generator_input(images, target_index, xp=np):
  """Builds the generator input from all modalities of a slice.

  Args:
    images: ``[..., H, W, M]`` array, one channel per modality in canonical
      order.  The target channel is ignored (it may hold anything, e.g. zeros).
    target_index: int or integer array of shape ``[...]`` (the leading dims).
    xp: ``numpy`` or ``jax.numpy``.

  Returns:
    ``[..., H, W, (M-1)*(M+1)]``: per branch, the image then the one-hot mask.
  """
  num_modalities = images.shape[-1]
  target_index = xp.asarray(target_index)
  onehot = (xp.arange(num_modalities) == target_index[..., None]).astype(images.dtype)
  planes = xp.broadcast_to(onehot[..., None, None, :],
                           images.shape[:-1] + (num_modalities,))
  branches = []
  for source in branch_modalities(target_index, num_modalities):
    image = xp.take_along_axis(
        images, xp.broadcast_to(source[..., None, None, None],
                                images.shape[:-1] + (1,)), axis=-1)
    branches += [image, planes]
  return xp.concatenate(branches, axis=-1)


def all_but_target(target_index, num_modalities: int, xp=np):
  """Availability [..., M] (bool) of the official scenario: every modality but the target."""
  return xp.arange(num_modalities) != xp.asarray(target_index)[..., None]
