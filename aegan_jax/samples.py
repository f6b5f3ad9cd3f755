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
from PIL import Image, ImageDraw

from aegan_jax import data
from aegan_jax import modalities as modalities_lib


def to_uint8(image, low=-1.0, high=1.0):
  scaled = (np.asarray(image, np.float32) - low) / (high - low)
  return (np.clip(scaled, 0.0, 1.0) * 255).round().astype(np.uint8)


def grid_image(rows, labels, row_labels=None, tile_gap=2, row_labels_above=False):
  """Tiles `rows` (lists of equally sized uint8 [H, W] images) with column labels on top.

  Row labels go in a 60 px margin on the left, or with `row_labels_above` in a
  band above each row (room for long labels).
  """
  height, width = rows[0][0].shape
  label_h = 14
  left = 60 if row_labels and not row_labels_above else 0
  band = label_h if row_labels and row_labels_above else 0
  canvas = Image.new('L', (left + len(rows[0]) * (width + tile_gap),
                           label_h + len(rows) * (band + height + tile_gap)), 0)
  draw = ImageDraw.Draw(canvas)
  for c, label in enumerate(labels):
    draw.text((left + c * (width + tile_gap) + 2, 1), label, fill=255)
  for r, row in enumerate(rows):
    top = label_h + r * (band + height + tile_gap)
    if row_labels:
      draw.text((2, top + 1 if band else top + height // 2 - 6), row_labels[r], fill=255)
    for c, tile in enumerate(row):
      canvas.paste(Image.fromarray(tile), (left + c * (width + tile_gap), top + band))
  return canvas


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
      rows.append([to_uint8(self.images[i, ..., s]) for s in sources] +
                  [to_uint8(synthesized[i]), to_uint8(real),
                   to_uint8(np.abs(synthesized[i] - real), 0.0, 1.0)])
      row_labels.append(self.names[target])
    labels = [f'in {k + 1}' for k in range(len(self.names) - 1)] + ['synth', 'target', '|err|']
    self.out_dir.mkdir(parents=True, exist_ok=True)
    path = self.out_dir / f'step_{step:07d}.png'
    grid_image(rows, labels, row_labels).save(path)
    return path
