"""PNG sample grids written during training (`<workdir>/samples/step_<N>.png`).

One row per (slice, target modality): the generator's inputs in branch order,
the synthesized image, the real target and the absolute error.
"""
from __future__ import annotations

import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from aegan_jax import data
from aegan_jax import modalities as modalities_lib
from aegan_jax import pictures


def pick_slices(prepared_dir, count: int):
  """The first `count` slices of the validation split (train if it is empty), as [S, H, W, M]."""
  split = 'val' if data.num_examples(prepared_dir, 'val') else 'train'
  examples = list(itertools.islice(data.iterate_split(prepared_dir, split), count))
  return np.stack([e['images'] for e in examples]), [
      f"{e['subject_id']}:{e['slice_index']}" for e in examples]


class SampleWriter:
  """Runs the generator (eval mode) on a few fixed slices for every target."""

  def __init__(self, generator, prepared_dir, out_dir, modality_names, count: int = 2):
    self.out_dir = pathlib.Path(out_dir)
    self.names = tuple(modality_names)
    images, self.slice_names = pick_slices(prepared_dir, count)
    num_modalities = len(self.names)
    targets = np.repeat(np.arange(num_modalities), len(images))
    self.images = np.tile(images, (num_modalities, 1, 1, 1))
    self.targets = targets
    # Every other modality as input: the paper's scenario, for either generator.
    available = modalities_lib.all_but_target(targets, num_modalities)
    self.inputs = generator.batch_inputs(jnp.asarray(self.images), jnp.asarray(available),
                                         jnp.asarray(targets))
    self._apply = jax.jit(lambda v, inputs: generator.apply(v, *inputs, train=False))

  def write(self, step: int, variables) -> pathlib.Path:
    synthesized = np.asarray(self._apply(variables, self.inputs))[..., 0]
    rows, row_labels = [], []
    for i, target in enumerate(self.targets):
      sources = modalities_lib.branch_modalities(int(target), len(self.names))
      real = self.images[i, ..., target]
      rows.append([pictures.to_uint8(self.images[i, ..., s]) for s in sources] +
                  [pictures.to_uint8(synthesized[i]), pictures.to_uint8(real),
                   pictures.to_uint8(np.abs(synthesized[i] - real), 0.0, 1.0)])
      row_labels.append(self.names[target])
    labels = [f'in {k + 1}' for k in range(len(self.names) - 1)] + ['synth', 'target', '|err|']
    self.out_dir.mkdir(parents=True, exist_ok=True)
    path = self.out_dir / f'step_{step:07d}.png'
    pictures.grid_image(rows, labels, row_labels).save(path)
    return path
