"""Tests for aegan_jax.metrics: known answers, skimage/piq agreement, jit."""
from functools import partial
import importlib.util
import pathlib

import jax
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from aegan_jax import metrics

DATA = pathlib.Path(__file__).with_name('data')
SK_ARGS = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def _structured(shape, rng, noise=0.02):
  """Smooth waves plus noise in [0, 1]."""
  grids = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing='ij')
  phase = sum((3 + 2 * i) * g for i, g in enumerate(grids))
  image = 0.5 + 0.3 * np.sin(2 * np.pi * phase) * np.cos(5 * grids[0])
  return np.clip(image + noise * rng.standard_normal(shape), 0, 1)


def _pair(shape, kind, rng):
  x = rng.random(shape) if kind == 'random' else _structured(shape, rng)
  y = np.clip(x + 0.1 * rng.standard_normal(shape), 0, 1)
  return x, y


def _load_reference_module():
  spec = importlib.util.spec_from_file_location(
      'make_fsim_reference', DATA / 'make_fsim_reference.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def piq_fsim():
  try:
    return _load_reference_module().load_piq_fsim()
  except ImportError:
    pytest.skip('torch/piq not installed')


# ------------------------------------------------------------- known answers


@pytest.mark.slow
def test_identical_images():
  x = _structured((64, 64), np.random.default_rng(0)).astype(np.float32)
  assert float(metrics.ssim(x, x, data_range=1.0)) == pytest.approx(1, abs=1e-6)
  assert float(metrics.fsim(x, x, data_range=1.0)) == pytest.approx(1, abs=1e-6)
  assert float(metrics.psnr(x, x, data_range=1.0)) == np.inf
  assert float(metrics.mae(x, x, data_range=1.0)) == 0
  volume = np.stack([x[:16]] * 12)
  assert float(metrics.ssim3d(volume, volume, data_range=1.0)) == (
      pytest.approx(1, abs=1e-6))


def test_psnr_mae_constant_offset():
  x = np.full((2, 20, 30), 100.0, np.float32)
  y = x + 5
  # MSE = 25, so PSNR = 10 log10(1000^2 / 25) = 60 - 10 log10(25).
  np.testing.assert_allclose(metrics.psnr(x, y, data_range=1000.0),
                             [60 - 10 * np.log10(25)] * 2, rtol=1e-6)
  np.testing.assert_allclose(metrics.mae(x, y, data_range=1000.0), [5, 5])


def test_psnr_mae_mask():
  rng = np.random.default_rng(1)
  x, y = rng.random((2, 3, 24, 24))
  mask = rng.random((3, 24, 24)) > 0.4
  for i in range(3):
    diff = (x[i] - y[i])[mask[i]]
    np.testing.assert_allclose(
        metrics.mae(x, y, data_range=1.0, mask=mask)[i], np.abs(diff).mean(),
        rtol=1e-5)
    np.testing.assert_allclose(
        metrics.psnr(x, y, data_range=1.0, mask=mask)[i],
        10 * np.log10(1 / np.mean(diff ** 2)), rtol=1e-5)


def test_ssim_symmetric():
  x, y = _pair((40, 48), 'structured', np.random.default_rng(2))
  np.testing.assert_allclose(metrics.ssim(x, y, data_range=1.0),
                             metrics.ssim(y, x, data_range=1.0), atol=1e-6)


# ---------------------------------------------------------- skimage agreement


@pytest.mark.parametrize('data_range,offset', [(1.0, 0.0), (255.0, 0.0),
                                               (4000.0, 0.0), (2.0, -1.0)])
@pytest.mark.slow
def test_ssim_matches_skimage(data_range, offset):
  rng = np.random.default_rng(int(data_range))
  for shape, kind in [((32, 32), 'random'), ((64, 80), 'structured'),
                      ((96, 96), 'random')]:
    x, y = (a * data_range + offset for a in _pair(shape, kind, rng))
    expected = structural_similarity(x, y, data_range=data_range, **SK_ARGS)
    actual = metrics.ssim(x.astype(np.float32), y.astype(np.float32),
                          data_range=data_range)
    assert abs(float(actual) - expected) < 1e-4, (shape, kind)


@pytest.mark.parametrize('shape,data_range', [((11, 11, 11), 1.0),
                                              ((16, 24, 20), 1000.0)])
def test_ssim3d_matches_skimage(shape, data_range):
  rng = np.random.default_rng(3)
  for kind in ('random', 'structured'):
    x, y = (a * data_range for a in _pair(shape, kind, rng))
    expected = structural_similarity(x, y, data_range=data_range, **SK_ARGS)
    actual = metrics.ssim3d(x.astype(np.float32), y.astype(np.float32),
                            data_range=data_range)
    assert abs(float(actual) - expected) < 1e-4, kind


def test_ssim_mask_is_mean_of_cropped_map():
  rng = np.random.default_rng(4)
  x, y = _pair((48, 40), 'structured', rng)
  mask = rng.random(x.shape) > 0.5
  _, ssim_map = structural_similarity(x, y, data_range=1.0, full=True,
                                      **SK_ARGS)
  crop = (slice(5, -5),) * 2
  expected = ssim_map[crop][mask[crop]].mean()
  actual = metrics.ssim(x, y, data_range=1.0, mask=mask)
  assert abs(float(actual) - expected) < 1e-4
  full = np.ones_like(mask)
  np.testing.assert_allclose(metrics.ssim(x, y, data_range=1.0, mask=full),
                             metrics.ssim(x, y, data_range=1.0), atol=1e-6)


def test_ssim3d_mask_all_true_matches_unmasked():
  x, y = _pair((12, 14, 16), 'random', np.random.default_rng(5))
  full = np.ones(x.shape, bool)
  np.testing.assert_allclose(metrics.ssim3d(x, y, data_range=1.0, mask=full),
                             metrics.ssim3d(x, y, data_range=1.0), atol=1e-6)


# ---------------------------------------------------------------- FSIM / piq


def _reference_cases():
  with np.load(DATA / 'fsim_piq_reference.npz') as data:
    for size in (64, 96, 128):
      for distorted, expected in zip(data[f'distorted_{size}'],
                                     data[f'fsim_{size}']):
        yield data[f'reference_{size}'], distorted, expected


@pytest.mark.slow
def test_fsim_matches_stored_piq_values():
  for reference, distorted, expected in _reference_cases():
    actual = metrics.fsim(distorted / 255., reference / 255., data_range=1.0)
    assert abs(float(actual) - expected) < 1e-3, reference.shape
    # The same images on a 0..255 scale give the same score.
    actual_255 = metrics.fsim(distorted, reference, data_range=255.0)
    assert abs(float(actual_255) - expected) < 1e-3


def test_fsim_mask_all_true_matches_unmasked():
  x, y = _pair((64, 64), 'structured', np.random.default_rng(6))
  full = np.ones(x.shape, bool)
  np.testing.assert_allclose(metrics.fsim(x, y, data_range=1.0, mask=full),
                             metrics.fsim(x, y, data_range=1.0), atol=1e-6)


def test_fsim_matches_piq(piq_fsim):
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  # 65x90: odd size and non-square; 384x640: downsampled by F = 2.
  for shape, kind in [((64, 64), 'random'), ((65, 90), 'structured'),
                      ((128, 128), 'structured'), ((384, 640), 'random')]:
    x, y = (a * 255 for a in _pair(shape, kind, rng))
    expected = piq_fsim(torch.tensor(x[None, None]), torch.tensor(y[None, None]),
                        data_range=255.0, chromatic=False).item()
    actual = metrics.fsim(x.astype(np.float32), y.astype(np.float32),
                          data_range=255.0)
    assert abs(float(actual) - expected) < 1e-3, shape


# ----------------------------------------------------------- batching and jit


@pytest.mark.parametrize('name', ['psnr', 'mae', 'ssim', 'fsim'])
def test_batch_matches_single_and_jits(name):
  metric = getattr(metrics, name)
  rng = np.random.default_rng(8)
  pairs = [_pair((64, 64), kind, rng) for kind in ('random', 'structured')]
  x = np.stack([p[0] for p in pairs]).astype(np.float32)
  y = np.stack([p[1] for p in pairs]).astype(np.float32)
  batched = jax.jit(partial(metric, data_range=1.0))(x, y)
  assert batched.shape == (2,)
  for i in range(2):
    single = metric(x[i], y[i], data_range=1.0)
    assert single.shape == ()
    np.testing.assert_allclose(batched[i], single, rtol=1e-5)


def test_ssim3d_batch_matches_single():
  rng = np.random.default_rng(9)
  x, y = _pair((2, 12, 16, 16), 'random', rng)
  batched = jax.jit(partial(metrics.ssim3d, data_range=1.0))(x, y)
  assert batched.shape == (2,)
  for i in range(2):
    np.testing.assert_allclose(batched[i],
                               metrics.ssim3d(x[i], y[i], data_range=1.0),
                               rtol=1e-5)


def test_ssim_rejects_small_images():
  with pytest.raises(ValueError):
    metrics.ssim(np.zeros((8, 32)), np.zeros((8, 32)), data_range=1.0)
