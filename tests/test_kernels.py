"""The kernels (aegan_jax.kernels): each form's value and gradient against float64
autodiff of its plain formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aegan_jax import layers
from aegan_jax.kernels import convolution
from aegan_jax.kernels import normalization
from aegan_jax.kernels import reduction


def test_norm_moments_are_accurate_over_a_constant_background():
  """Prepared slices hold an exactly constant background; summing its equal terms in
  sequence repeats one rounding error (1e-4 relative at 256 px), and gradients that
  cancel against it moved by 1e-2.  The sums must match float64 within 1e-5 (an
  unfolded product with ones: 1e-4)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 256, 256, 8)).astype(np.float32)
  x[:, :160] = -0.73  # background rows
  exact = x.astype(np.float64).sum((1, 2))
  sums = np.asarray(reduction.channel_sums(jnp.asarray(x)), np.float64)
  np.testing.assert_allclose(sums, exact, rtol=1e-5)
  exact_all = x.astype(np.float64).sum((0, 1, 2))
  np.testing.assert_allclose(np.asarray(reduction.batch_sum(reduction.channel_sums(jnp.asarray(x)))),
                             exact_all, rtol=1e-5)


@pytest.mark.parametrize('per_example', [True, False])
def test_norm_gradient_sums_agree_in_both_backend_forms(per_example):
  """The norm's backward sums dy and dy * x_hat side by side on CPUs and one at a time
  elsewhere; both forms give the float64 sums (the CPU test run only takes the first)."""
  rng = np.random.default_rng(1)
  dy = rng.standard_normal((2, 64, 64, 8)).astype(np.float32)
  x_hat = rng.standard_normal((2, 64, 64, 8)).astype(np.float32)
  x_hat[:, :40] = -0.73  # background rows
  axes = (1, 2) if per_example else (0, 1, 2)
  exact = [v.astype(np.float64).sum(axes) for v in (dy, dy * x_hat)]
  for form in (normalization.sums_side_by_side, normalization.sums_separately):
    sums = form(jnp.asarray(dy), jnp.asarray(x_hat), per_example)
    for got, want in zip(sums, exact):
      np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-3)


def _float64(*arrays):
  return [jnp.asarray(np.asarray(a, np.float64)) for a in arrays]


@pytest.mark.parametrize('shape', [(2, 16, 12, 5), (1, 8, 8, 3), (1, 72, 66, 2)])
def test_downsampling_gradients_by_phase_equal_the_strided_convolutions(shape):
  """The CPU backward of the stride-2 convolution (sub-pixel input gradient, space-to-depth
  kernel gradient) against float64 autodiff of the strided convolution; XLA's own and the
  CPU choice between the two by size (the last shape is above its threshold) too."""
  rng = np.random.default_rng(2)
  x = rng.standard_normal(shape).astype(np.float32)
  kernel = rng.standard_normal((3, 3, shape[-1], 7)).astype(np.float32)
  dy = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, 7)).astype(np.float32)
  with jax.enable_x64(True):
    want = jax.vjp(convolution.strided_conv, *_float64(x, kernel))[1](*_float64(dy))
    for form in (convolution.phase_gradients, convolution.xla_gradients, convolution.cpu_gradients):
      got = form(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(dy))
      for g, w in zip(got, want):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(w)).max())


def _assert_vjp_equals_float64(form, reference, x, kernel, dy):
  """form(x, kernel) and its gradients for cotangent dy, against float64 autodiff of
  reference."""
  y, pullback = jax.vjp(form, jnp.asarray(x), jnp.asarray(kernel))
  got = [y, *pullback(jnp.asarray(dy))]
  with jax.enable_x64(True):
    want_y, want_pullback = jax.vjp(reference, *_float64(x, kernel))
    want = [want_y, *want_pullback(*_float64(dy))]
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(w)).max())


def test_tap_convolution_and_its_gradient_equal_the_convolution():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 14, 11, 6)).astype(np.float32)
  kernel = rng.standard_normal((7, 7, 6, 1)).astype(np.float32)
  dy = rng.standard_normal((2, 8, 5, 1)).astype(np.float32)
  _assert_vjp_equals_float64(convolution.tap_conv, convolution.valid_conv, x, kernel, dy)


@pytest.mark.slow
@pytest.mark.parametrize('shape', [(2, 5, 6, 4), (1, 3, 3, 2)])
def test_upsampling_by_phase_and_its_gradients_equal_the_subpixel_form(shape):
  """The CPU transposed convolution (one convolution per output phase; input gradient as a
  stride-2 convolution) against float64 autodiff of the sub-pixel form; the other
  backends' form too."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal(shape).astype(np.float32)
  kernel = rng.standard_normal((3, 3, shape[-1], 3)).astype(np.float32)
  dy = rng.standard_normal((shape[0], 2 * shape[1], 2 * shape[2], 3)).astype(np.float32)
  for form in (convolution.upsample_by_phase, convolution.subpixel_upsample):
    _assert_vjp_equals_float64(form, convolution.subpixel_upsample, x, kernel, dy)


@pytest.mark.parametrize('channels', [1, 5])
def test_convolution_from_few_channels_and_its_gradient_equal_the_convolution(channels):
  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, 13, 10, channels)).astype(np.float32)
  kernel = rng.standard_normal((7, 7, channels, 6)).astype(np.float32)
  dy = rng.standard_normal((2, 7, 4, 6)).astype(np.float32)
  _assert_vjp_equals_float64(convolution.conv_from_few_channels, convolution.valid_conv, x, kernel, dy)


def test_convolution_with_constant_planes_folded_equals_the_convolution():
  """The generator's first convolution: the constant one-hot planes folded into a bias give
  the convolution's output, kernel gradient and image-channel input gradient."""
  rng = np.random.default_rng(7)
  image = rng.standard_normal((3, 13, 10, 1))
  planes = np.broadcast_to(np.eye(4)[[2, 0, 3], None, None, :], (3, 13, 10, 4))
  x = np.concatenate([image, planes], -1).astype(np.float32)
  kernel = rng.standard_normal((7, 7, 5, 6)).astype(np.float32)
  dy = rng.standard_normal((3, 7, 4, 6)).astype(np.float32)
  y, pullback = jax.vjp(convolution.conv_from_constant_planes, jnp.asarray(x), jnp.asarray(kernel))
  dx, d_kernel = pullback(jnp.asarray(dy))
  with jax.enable_x64(True):
    want_y, want_pullback = jax.vjp(convolution.valid_conv, *_float64(x, kernel))
    want_dx, want_kernel = want_pullback(*_float64(dy))
  for g, w in ((y, want_y), (d_kernel, want_kernel), (dx[..., :1], want_dx[..., :1])):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(w)).max())


@pytest.mark.parametrize('size', [(8, 8), (25, 24), (7, 9)])
def test_patch_convolution_by_phase_equals_the_strided_one(size):
  """Odd sizes included: their last row or column is one no window reaches."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, *size, 5)).astype(np.float32)
  kernel = rng.standard_normal((4, 4, 5, 1)).astype(np.float32)
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
  got = jax.value_and_grad(loss(convolution.patch_conv_by_phase), (0, 1))(x, kernel)
  with jax.enable_x64(True):
    want = jax.value_and_grad(loss(convolution.patch_conv_strided), (0, 1))(*_float64(x, kernel))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(w)).max())


# Masked BatchNorm statistics: absent input slots stay out of the batch moments.


def _weighted_reference(x, weights, scale, bias, epsilon=1e-5):
  """The plain formula, for autodiff: weighted mean and biased variance over N, H, W."""
  w = weights[:, None, None, None]
  count = weights.sum() * x.shape[1] * x.shape[2]
  mean = (w * x).sum((0, 1, 2)) / count
  var = (w * (x - mean) ** 2).sum((0, 1, 2)) / count
  return (x - mean) / np.sqrt(var + epsilon) * scale + bias if isinstance(x, np.ndarray) else \
      (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias


def _norm_inputs(n=6, size=8, channels=5, seed=0):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(n, size, size, channels)) * 2 + 1).astype(np.float32)
  return x, rng.uniform(0.5, 1.5, channels).astype(np.float32), \
      rng.normal(size=channels).astype(np.float32)


def test_absent_slots_change_no_batch_moment_and_no_present_output():
  x, scale, bias = _norm_inputs()
  present = np.array([1, 0, 1, 1, 0, 1], bool)
  garbage = np.where(present[:, None, None, None], x, 50 * x + 7)  # what absent rows hold
  y_all, mean_all, var_all = normalization.weighted_normalize(garbage, present.astype(np.float32),
                                                       scale, bias, 1e-5)
  y_only, mean_only, var_only = normalization.normalize(x[present], scale, bias, False, 1e-5)
  np.testing.assert_allclose(mean_all, mean_only, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var_all, var_only, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y_all)[present], y_only, rtol=1e-5, atol=1e-5)
  # ... and the unweighted moments of the same batch do differ.
  assert np.abs(np.asarray(normalization.normalize(garbage, scale, bias, False, 1e-5)[1]) -
                mean_only).max() > 1


def test_batchnorm_running_statistics_skip_absent_slots():
  x, _, _ = _norm_inputs()
  present = np.array([1, 0, 1, 1, 0, 1], bool)
  norm = layers.BatchNorm()
  variables = norm.init(jax.random.PRNGKey(0), x, train=False)

  def stats(batch, weights):
    _, state = norm.apply(variables, batch, train=True, weights=weights, mutable=['batch_stats'])
    return state['batch_stats']

  masked = stats(np.where(present[:, None, None, None], x, -3 * x), present.astype(np.float32))
  alone = stats(x[present], None)
  for name in ('mean', 'var'):
    np.testing.assert_allclose(masked[name], alone[name], rtol=1e-5, atol=1e-7)


def test_weighted_norm_gradients_equal_float64_autodiff_of_the_plain_formula():
  x, scale, bias = _norm_inputs(seed=1)
  weights = np.array([1, 0, 1, 0.5, 0, 2], np.float32)  # any non-negative weights
  dy = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
  got_y, pullback = jax.vjp(
      lambda *a: normalization.weighted_normalize(a[0], weights, a[1], a[2], 1e-5)[0], x, scale, bias)
  got = [got_y, *pullback(dy)]
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
    want_y, want_pullback = jax.vjp(
        lambda *a: _weighted_reference(a[0], f64(weights), a[1], a[2]), f64(x), f64(scale),
        f64(bias))
    want = [want_y, *want_pullback(f64(dy))]
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w), rtol=2e-4,
                               atol=2e-4 * np.abs(np.asarray(w)).max())


def test_modulation_and_its_gradients_equal_float64_autodiff_of_the_plain_formula():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((3, 12, 10, 5)).astype(np.float32)
  x[:, :6] = -0.73  # a constant background, as prepared slices have
  scale, shift = (rng.standard_normal((3, 5)).astype(np.float32) for _ in range(2))
  dy = rng.standard_normal(x.shape).astype(np.float32)
  got_y, pullback = jax.vjp(normalization.modulate, x, scale, shift)
  got = [got_y, *pullback(dy)]
  with jax.enable_x64(True):
    plain = lambda x, s, b: x * (1 + s[:, None, None, :]) + b[:, None, None, :]
    want_y, want_pullback = jax.vjp(plain, *_float64(x, scale, shift))
    want = [want_y, *want_pullback(*_float64(dy))]
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w), rtol=1e-5,
                               atol=1e-5 * np.abs(np.asarray(w)).max())
