"""Image quality metrics for synthesis evaluation: PSNR, MAE, SSIM, FSIM.

All functions are jit-able jax.numpy code with the same calling convention:

* ``x``, ``y``: a single image ``[H, W]`` or a batch ``[..., H, W]``
  (``ssim3d``: a volume ``[D, H, W]`` or a batch ``[..., D, H, W]``).
* ``data_range`` (keyword, required): the dynamic range of the data, e.g. 1.0
  for images in [0, 1].  It is never guessed from the data.
* ``mask`` (optional): boolean array of the same shape as ``x``; the metric is
  averaged over the ``True`` pixels only.  An empty mask gives NaN.
* Result: one value per image, i.e. shape ``x.shape[:-2]`` (``[:-3]`` for
  volumes); a scalar for a single image.

Computation runs in float32 unless the inputs are float64 and jax x64 mode is
enabled.  The SSIM maths is arranged (centred moments, luminance written as
``1 - d^2 / (...)``) so that float32 matches float64 references to ~1e-5.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# Wang et al. 2004 constants; the 11-wide window is skimage's/scipy's
# Gaussian truncated at int(3.5 * sigma + 0.5) = 5 pixels each side.
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# Zhang et al. 2011 (FSIM) constants.
FSIM_T1 = 0.85
FSIM_T2 = 160.0


def _as_float(x, y):
  dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
  return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def _masked_mean(values, mask, ndim):
  """Mean over the last `ndim` axes, restricted to `mask` when given."""
  axes = tuple(range(-ndim, 0))
  if mask is None:
    return jnp.mean(values, axis=axes)
  mask = jnp.broadcast_to(jnp.asarray(mask, bool), values.shape)
  total = jnp.sum(jnp.where(mask, values, 0), axis=axes)
  return total / jnp.sum(mask, axis=axes).astype(values.dtype)


# ----------------------------------------------------------------- PSNR / MAE


def mae(x, y, *, data_range, mask=None):
  """Mean absolute error, ``mean(|x - y|)`` over each image (or mask).

  ``data_range`` is accepted for a uniform signature and not used: MAE is in
  the units of the data.
  """
  del data_range
  x, y = _as_float(x, y)
  return _masked_mean(jnp.abs(x - y), mask, 2)


def psnr(x, y, *, data_range, mask=None):
  """Peak signal-to-noise ratio in dB.

  ``PSNR = 10 log10(data_range^2 / MSE)`` with ``MSE = mean((x - y)^2)`` over
  each image (or over the mask pixels).  Identical images give ``inf``.
  """
  x, y = _as_float(x, y)
  mse = _masked_mean(jnp.square(x - y), mask, 2)
  return 10 * jnp.log10(jnp.asarray(data_range, x.dtype) ** 2 / mse)


# ----------------------------------------------------------------------- SSIM


def _gaussian_taps():
  offsets = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1)
  taps = np.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
  return taps / taps.sum()


def _filter_valid(image, ndim):
  """Separable Gaussian filter over the last `ndim` axes, 'valid' region only.

  Only the valid region is needed because skimage crops a border of
  ``SSIM_RADIUS`` pixels before averaging, exactly the pixels whose window
  leaves the image; so the boundary mode never matters.  Sums of shifted
  slices (rather than a conv) keep full float32 precision on any backend.
  """
  taps = _gaussian_taps()
  width = len(taps)
  for axis in range(image.ndim - ndim, image.ndim):
    size = image.shape[axis] - width + 1
    image = sum(float(t) * jax.lax.slice_in_dim(image, i, i + size, axis=axis)
                for i, t in enumerate(taps))
  return image


def _ssim_map(x, y, data_range, ndim):
  """SSIM map over the last `ndim` axes, cropped by the window radius."""
  x, y = _as_float(x, y)
  if min(x.shape[-ndim:]) < 2 * SSIM_RADIUS + 1:
    raise ValueError(f'SSIM needs every spatial dim >= {2 * SSIM_RADIUS + 1}, '
                     f'got {x.shape}')
  # Moments are shift invariant: centring on the pair's mean avoids the
  # float32 cancellation in E[x^2] - E[x]^2 for data far from zero.
  axes = tuple(range(-ndim, 0))
  centre = 0.5 * (jnp.mean(x, axes, keepdims=True) +
                  jnp.mean(y, axes, keepdims=True))
  x, y = x - centre, y - centre
  mu_x, mu_y = _filter_valid(x, ndim), _filter_valid(y, ndim)
  var_x = _filter_valid(x * x, ndim) - mu_x * mu_x
  var_y = _filter_valid(y * y, ndim) - mu_y * mu_y
  cov = _filter_valid(x * y, ndim) - mu_x * mu_y
  c1 = (SSIM_K1 * data_range) ** 2
  c2 = (SSIM_K2 * data_range) ** 2
  # (2 mx my + C1) / (mx^2 + my^2 + C1) == 1 - (mx - my)^2 / (mx^2 + my^2 + C1),
  # with the means in original (uncentred) units.
  mean_x, mean_y = mu_x + centre, mu_y + centre
  luminance = 1 - jnp.square(mu_x - mu_y) / (mean_x ** 2 + mean_y ** 2 + c1)
  structure = (2 * cov + c2) / (var_x + var_y + c2)
  return luminance * structure


def _crop_mask(mask, ndim):
  r = SSIM_RADIUS
  index = (Ellipsis,) + (slice(r, -r),) * ndim
  return None if mask is None else jnp.asarray(mask, bool)[index]


def ssim(x, y, *, data_range, mask=None):
  """Structural similarity (Wang et al., IEEE TIP 13(4), 2004) of 2D images.

  ``SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) /
           ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))``,
  with local (population) moments from an 11x11 Gaussian window, sigma 1.5,
  ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` and ``L = data_range``.  The map is
  averaged over the image after cropping a 5-pixel border, as
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`` does.  With ``mask``: mean of the cropped
  map over the mask pixels inside the crop.  Images must be >= 11 px a side.
  """
  return _masked_mean(_ssim_map(x, y, data_range, 2), _crop_mask(mask, 2), 2)


def ssim3d(x, y, *, data_range, mask=None):
  """3D SSIM of volumes ``[..., D, H, W]``: as `ssim` with an 11x11x11 window.

  Matches skimage's n-dimensional ``structural_similarity`` on 3D arrays (same
  constants, separable 3D Gaussian, 5-voxel border cropped on every axis).
  """
  return _masked_mean(_ssim_map(x, y, data_range, 3), _crop_mask(mask, 3), 3)


# ----------------------------------------------------------------------- FSIM


def _frequency_grid(size):
  """Normalised frequencies along one axis, zero in the middle (piq/Kovesi)."""
  if size % 2:
    return np.arange(-(size - 1) / 2, size / 2) / (size - 1)
  return np.arange(-size / 2, size / 2) / size


def _log_gabor_filters(height, width, scales=4, orientations=4,
                       min_wavelength=6, mult=2, sigma_on_f=0.55,
                       d_theta_on_sigma=1.2):
  """Kovesi's log-Gabor bank in the (unshifted) frequency domain.

  Returns ``[orientations, scales, H, W]`` float64.  Conventions follow piq,
  the FSIM reference here: the first grid axis (rows) is the "x" frequency and
  the angle is ``atan2(-v, u)``; every filter is multiplied by a Butterworth
  low-pass (cutoff 0.45, order 15) and has its DC term zeroed.
  """
  u, v = np.meshgrid(_frequency_grid(height), _frequency_grid(width),
                     indexing='ij')
  radius = np.fft.ifftshift(np.sqrt(u ** 2 + v ** 2))
  theta = np.fft.ifftshift(np.arctan2(-v, u))
  lowpass = 1.0 / (1.0 + (radius / 0.45) ** 30)
  radius[0, 0] = 1.0  # Avoids log(0); the DC term is zeroed below.
  radial = []
  for s in range(scales):
    centre = 1.0 / (min_wavelength * mult ** s)
    gabor = np.exp(-np.log(radius / centre) ** 2 /
                   (2 * math.log(sigma_on_f) ** 2)) * lowpass
    gabor[0, 0] = 0.0
    radial.append(gabor)
  theta_sigma = math.pi / (orientations * d_theta_on_sigma)
  angular = []
  for o in range(orientations):
    angle = o * math.pi / orientations
    # Angular distance via atan2 of sine/cosine differences (no wrap-around).
    d_sin = np.sin(theta) * math.cos(angle) - np.cos(theta) * math.sin(angle)
    d_cos = np.cos(theta) * math.cos(angle) + np.sin(theta) * math.sin(angle)
    d_theta = np.abs(np.arctan2(d_sin, d_cos))
    angular.append(np.exp(-d_theta ** 2 / (2 * theta_sigma ** 2)))
  return np.stack(angular)[:, None] * np.stack(radial)[None]


def _noise_constants(filters):
  """Per-orientation filter energies used by Kovesi's noise model.

  Returns (mean squared filter at the smallest scale, sum_s A_s^2,
  sum_{s<t} A_s A_t), each ``[orientations]``, with ``A_s`` the spatial
  (real) filter scaled by sqrt(H W) as in the reference code.
  """
  height, width = filters.shape[-2:]
  spatial = np.fft.ifft2(filters).real * math.sqrt(height * width)
  em_n = np.sum(filters[:, 0] ** 2, axis=(-2, -1))
  sum_an2 = np.sum(spatial ** 2, axis=(1, 2, 3))
  cumulative = np.cumsum(spatial[:, ::-1], axis=1)[:, ::-1]  # sum_{t>=s}
  sum_ai_aj = sum(np.sum(spatial[:, s] * cumulative[:, s + 1], axis=(-2, -1))
                  for s in range(spatial.shape[1] - 1))
  return em_n, sum_an2, sum_ai_aj


def _lower_median(values):
  """Median over the last axis, lower middle element (torch.median rule)."""
  n = values.shape[-1]
  return jnp.sort(values, axis=-1)[..., (n - 1) // 2]


def phase_congruency(image, k=2.0):
  """Kovesi's phase congruency (PC_2 measure, 4 scales x 4 orientations).

  Args:
    image: ``[..., H, W]`` grayscale images (FSIM uses the 0..255 scale).
    k: noise threshold in standard deviations of the noise energy.

  Returns:
    ``[..., H, W]`` phase congruency, summed over orientations as in FSIM.
  """
  height, width = image.shape[-2:]
  eps = jnp.finfo(image.dtype).eps
  filters = _log_gabor_filters(height, width)
  em_n, sum_an2, sum_ai_aj = _noise_constants(filters)
  spectrum = jnp.fft.fft2(image)[..., None, None, :, :]
  response = jnp.fft.ifft2(spectrum * filters.astype(image.dtype))
  even, odd = response.real, response.imag  # [..., O, S, H, W]
  amplitude = jnp.abs(response)
  sum_even = jnp.sum(even, axis=-3, keepdims=True)
  sum_odd = jnp.sum(odd, axis=-3, keepdims=True)
  norm = jnp.sqrt(sum_even ** 2 + sum_odd ** 2) + eps
  mean_even, mean_odd = sum_even / norm, sum_odd / norm
  # Energy: sum_s A_s (cos(dphi) - |sin(dphi)|) against the mean phase.
  energy = jnp.sum(even * mean_even + odd * mean_odd -
                   jnp.abs(even * mean_odd - odd * mean_even), axis=-3)
  # Noise from the smallest scale: |E|^2 is chi-squared with 2 dof, so its
  # median gives the mean via -median / log(0.5).
  smallest = jnp.square(amplitude[..., 0, :, :])
  median = _lower_median(smallest.reshape(smallest.shape[:-2] + (-1,)))
  noise_power = -median / math.log(0.5) / em_n
  tau = jnp.sqrt((2 * noise_power * sum_an2 + 4 * noise_power * sum_ai_aj) / 2)
  threshold = tau * math.sqrt(math.pi / 2) + k * tau * math.sqrt(2 - math.pi / 2)
  # Kovesi's empirical correction of the threshold for the PC_2 measure.
  threshold = threshold / 1.7
  energy = jnp.maximum(energy - threshold[..., None, None], 0)
  total_energy = jnp.sum(energy, axis=-3) + eps
  total_amplitude = jnp.sum(amplitude, axis=(-4, -3)) + eps
  return total_energy / total_amplitude


def scharr_gradient(image):
  """Gradient magnitude with the Scharr kernels /16, zero padding (FSIM)."""
  padded = jnp.pad(image, [(0, 0)] * (image.ndim - 2) + [(1, 1), (1, 1)])
  height, width = image.shape[-2:]

  def window(di, dj):
    return padded[..., di:di + height, dj:dj + width]

  taps = (3, 10, 3)  # Scharr smoothing across the derivative direction.
  grad_x = sum(w * (window(i, 2) - window(i, 0)) for i, w in enumerate(taps))
  grad_y = sum(w * (window(2, j) - window(0, j)) for j, w in enumerate(taps))
  return jnp.sqrt(grad_x ** 2 + grad_y ** 2) / 16


def _average_pool(image, factor):
  """Non-overlapping ``factor`` x ``factor`` means; remainder rows dropped."""
  if factor == 1:
    return image
  height, width = (s // factor for s in image.shape[-2:])
  image = image[..., :height * factor, :width * factor]
  image = image.reshape(image.shape[:-2] + (height, factor, width, factor))
  return image.mean(axis=(-3, -1))


def _similarity(a, b, constant):
  return (2 * a * b + constant) / (a ** 2 + b ** 2 + constant)


def fsim(x, y, *, data_range, mask=None):
  """Feature similarity index, grayscale FSIM (Zhang et al., IEEE TIP 2011).

  Images are scaled to [0, 255] (``x / data_range * 255``; the constants are
  for that scale) and block-averaged by ``F = max(1, round(min(H, W) / 256))``.
  Then, with phase congruency ``PC`` (Kovesi's log-Gabor model, 4 scales, 4
  orientations, min wavelength 6, mult 2, sigma_on_f 0.55, d_theta_on_sigma
  1.2, k 2) and Scharr gradient magnitude ``G``:

  ``S_PC = (2 PC_x PC_y + T1) / (PC_x^2 + PC_y^2 + T1)``, T1 = 0.85,
  ``S_G = (2 G_x G_y + T2) / (G_x^2 + G_y^2 + T2)``, T2 = 160,
  ``FSIM = sum(S_PC S_G PC_m) / sum(PC_m)``, ``PC_m = max(PC_x, PC_y)``.

  Details (filter grid, low-pass, noise model, lower median, padding) follow
  ``piq.fsim(..., chromatic=False)``, which it matches to ~1e-5.  With
  ``mask``: the mask is block-averaged with the images and multiplies the
  ``PC_m`` weights.
  """
  x, y = _as_float(x, y)
  factor = max(1, round(min(x.shape[-2:]) / 256))
  x = _average_pool(x / data_range * 255, factor)
  y = _average_pool(y / data_range * 255, factor)
  pc_x, pc_y = phase_congruency(x), phase_congruency(y)
  similarity = (_similarity(pc_x, pc_y, FSIM_T1) *
                _similarity(scharr_gradient(x), scharr_gradient(y), FSIM_T2))
  weight = jnp.maximum(pc_x, pc_y)
  if mask is not None:
    weight = weight * _average_pool(jnp.asarray(mask, x.dtype), factor)
  return (jnp.sum(similarity * weight, axis=(-2, -1)) /
          jnp.sum(weight, axis=(-2, -1)))
