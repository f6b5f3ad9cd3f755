"""Regenerates fsim_piq_reference.npz: test images and piq's FSIM values.

Needs torch (CPU) and piq, which are not project requirements:
  pip install torch==2.13.0   # the CPU wheel
  pip install --no-deps piq
  python tests/data/make_fsim_reference.py

piq 0.8's package __init__ imports torchvision; `load_piq_fsim` imports
piq.fsim without it when torchvision is missing.
"""
import importlib
import importlib.util
import pathlib
import sys
import types

import numpy as np

OUTPUT = pathlib.Path(__file__).with_name('fsim_piq_reference.npz')
SIZES = (64, 96, 128)


def load_piq_fsim():
  """Returns piq's `fsim`, or raises ImportError if torch/piq are missing."""
  importlib.import_module('torch')
  try:
    return importlib.import_module('piq').fsim
  except ImportError:
    pass
  spec = importlib.util.find_spec('piq')
  if spec is None:
    raise ImportError('piq is not installed')
  # A bare package object skips piq/__init__.py (and its torchvision import);
  # piq.fsim itself needs only torch.
  package = types.ModuleType('piq')
  package.__path__ = list(spec.submodule_search_locations)
  sys.modules['piq'] = package
  return importlib.import_module('piq.fsim').fsim


def _box_blur(image, radius=1):
  padded = np.pad(image, radius, mode='edge')
  size = 2 * radius + 1
  h, w = image.shape
  return sum(padded[i:i + h, j:j + w] for i in range(size)
             for j in range(size)) / size ** 2


def make_images(size, seed):
  """Smooth structure plus noise, and two distorted versions; uint8."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  blob = np.exp(-((xx - 0.4) ** 2 + (yy - 0.55) ** 2) / 0.05)
  waves = 0.25 * np.sin(2 * np.pi * (3 * xx + 1.5 * yy)) * np.cos(7 * yy)
  edge = 0.2 * (xx + 0.3 * yy > 0.7)
  image = 0.2 + 0.5 * blob + waves + edge + 0.03 * rng.standard_normal(
      (size, size))
  noisy = image + 0.08 * rng.standard_normal((size, size))
  blurred = 0.9 * _box_blur(image) + 0.05
  to_u8 = lambda a: np.clip(np.round(a * 255), 0, 255).astype(np.uint8)
  return to_u8(image), to_u8(noisy), to_u8(blurred)


def main():
  import torch  # pylint: disable=g-import-not-at-top
  piq_fsim = load_piq_fsim()
  arrays = {}
  for seed, size in enumerate(SIZES):
    reference, *distorted = make_images(size, seed)
    scores = []
    for image in [reference] + distorted:
      as_tensor = lambda a: torch.tensor(a[None, None] / 255., dtype=torch.float32)
      scores.append(piq_fsim(as_tensor(image), as_tensor(reference),
                             data_range=1.0, chromatic=False).item())
    arrays[f'reference_{size}'] = reference
    arrays[f'distorted_{size}'] = np.stack(distorted)
    arrays[f'fsim_{size}'] = np.asarray(scores[1:], np.float64)
    print(size, scores)
  np.savez_compressed(OUTPUT, **arrays)
  print('wrote', OUTPUT, OUTPUT.stat().st_size, 'bytes')


if __name__ == '__main__':
  main()
