"""Shapes, parameter counts and layer semantics of the two networks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aegan_jax import layers
from aegan_jax import models


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def abstract_variables(module, shape):
  return jax.eval_shape(lambda: module.init({'params': jax.random.PRNGKey(0)},
                                            jnp.zeros(shape), train=False))


def test_parameter_counts_match_official_at_ngf64_256px():
  g = abstract_variables(models.SynthesisGenerator(ngf=64), (1, 256, 256, 15))
  ae = abstract_variables(models.AutoEncoder(ngf=64), (1, 256, 256, 1))
  assert count(g['params']) == 8_811_265
  assert count(ae['params']) == 12_093_317
  assert count(ae['params']['head']['classes']) == 4_194_308  # official cls_branch


@pytest.mark.parametrize('size', [64, 128, 256])
def test_output_shapes(size):
  g = models.SynthesisGenerator(ngf=8)
  ae = models.AutoEncoder(ngf=8)
  x = jnp.zeros((2, size, size, 15))
  y = jnp.zeros((2, size, size, 1))
  g_vars = abstract_variables(g, x.shape)
  ae_vars = abstract_variables(ae, y.shape)
  image, (f0, f1) = jax.eval_shape(
      lambda v: g.apply(v, x, train=False, return_features=True), g_vars)
  assert image.shape == (2, size, size, 1)
  assert f0.shape == (2, size // 2, size // 2, 16) and f1.shape == (2, size, size, 8)
  out = jax.eval_shape(lambda v: ae.apply(v, y, train=False), ae_vars)
  assert out.reconstruction.shape == (2, size, size, 1)
  assert out.patch_logits.shape == (2, size // 8 - 1, size // 8 - 1, 1)
  assert out.class_logits.shape == (2, 4)
  assert [f.shape for f in out.features] == [f0.shape, f1.shape]


@pytest.mark.parametrize('size', [30, 66, 6])
def test_size_not_divisible_by_four_is_a_clear_error(size):
  g = models.SynthesisGenerator(ngf=8)
  with pytest.raises(ValueError, match=f'image size {size}x{size} is not supported'):
    abstract_variables(g, (1, size, size, 15))
  with pytest.raises(ValueError, match='multiples of 4'):
    abstract_variables(models.AutoEncoder(ngf=8), (1, size, size, 1))


def test_wrong_channel_count_is_a_clear_error():
  with pytest.raises(ValueError, match='expected 15'):
    abstract_variables(models.SynthesisGenerator(ngf=8), (1, 32, 32, 12))


def test_zero_width_attention_computes_one_and_a_half_x():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 8))
  attention = layers.ChannelAttention()
  variables = attention.init(jax.random.PRNGKey(0), x)
  assert count(variables) == 0
  np.testing.assert_allclose(attention.apply(variables, x), 1.5 * x, rtol=1e-6)


def test_upconv_matches_a_direct_transposed_convolution():
  """out[o, 2i - 1 + k] += x[i] w[i, o, k]: the PyTorch definition, written out in numpy."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 3, 3, 2)).astype(np.float32)
  up = layers.UpConv(features=2)
  variables = up.init(jax.random.PRNGKey(0), x)
  w = np.asarray(variables['params']['kernel'])  # [kh, kw, in, out]
  expected = np.zeros((1, 8, 8, 2), np.float32)  # 2 rows of padding-1 overhang on each side
  for i in range(3):
    for j in range(3):
      for kh in range(3):
        for kw in range(3):
          expected[0, 2 * i + kh, 2 * j + kw] += x[0, i, j] @ w[kh, kw]
  np.testing.assert_allclose(up.apply(variables, x)[0], expected[0, 1:7, 1:7], atol=1e-5)


def test_batchnorm_running_stats_follow_pytorch():
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 3, 3, 2)) * 3 + 1
  norm = layers.BatchNorm()
  variables = norm.init(jax.random.PRNGKey(0), x, train=False)
  _, state = norm.apply(variables, x, train=True, mutable=['batch_stats'])
  flat = np.asarray(x).reshape(-1, 2)
  np.testing.assert_allclose(state['batch_stats']['mean'], 0.1 * flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(state['batch_stats']['var'], 0.9 + 0.1 * flat.var(0, ddof=1),
                             rtol=1e-5)


def test_instance_norm_option_builds_and_runs():
  generator = models.SynthesisGenerator(ngf=8, norm='instance', num_blocks=1)
  x = jnp.ones((1, 16, 16, 15))
  variables = generator.init(jax.random.PRNGKey(0), x, train=False)
  assert 'batch_stats' not in variables
  assert 'bias' in variables['params']['encoder_0']['conv_in']  # biases without BatchNorm
  assert generator.apply(variables, x, train=False).shape == (1, 16, 16, 1)


def test_norm_moments_are_accurate_over_a_constant_background():
  """Prepared slices hold an exactly constant background; summing its equal terms in
  sequence repeats one rounding error (1e-4 relative at 256 px), and gradients that
  cancel against it moved by 1e-2.  The sums must match float64 within 1e-5 (an
  unfolded product with ones: 1e-4)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 256, 256, 8)).astype(np.float32)
  x[:, :160] = -0.73  # background rows
  exact = x.astype(np.float64).sum((1, 2))
  sums = np.asarray(layers.channel_sums(jnp.asarray(x)), np.float64)
  np.testing.assert_allclose(sums, exact, rtol=1e-5)
  exact_all = x.astype(np.float64).sum((0, 1, 2))
  np.testing.assert_allclose(np.asarray(layers.batch_sum(layers.channel_sums(jnp.asarray(x)))),
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
  for form in (layers._sums_side_by_side, layers._sums_separately):
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
    want = jax.vjp(layers._strided_conv, *_float64(x, kernel))[1](*_float64(dy))
    for form in (layers._phase_gradients, layers._xla_gradients, layers._cpu_gradients):
      got = form(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(dy))
      for g, w in zip(got, want):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(w)).max())
  down = layers.DownConv(7)
  variables = {'params': {'kernel': jnp.asarray(kernel)}}
  np.testing.assert_allclose(down.apply(variables, x), layers._strided_conv(x, kernel),
                             atol=1e-5)


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
  _assert_vjp_equals_float64(layers._tap_conv, layers._valid_conv, x, kernel, dy)


@pytest.mark.parametrize('shape', [(2, 5, 6, 4), (1, 3, 3, 2)])
def test_upsampling_by_phase_and_its_gradients_equal_the_subpixel_form(shape):
  """The CPU transposed convolution (one convolution per output phase; input gradient as a
  stride-2 convolution) against float64 autodiff of the sub-pixel form; the other
  backends' form too."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal(shape).astype(np.float32)
  kernel = rng.standard_normal((3, 3, shape[-1], 3)).astype(np.float32)
  dy = rng.standard_normal((shape[0], 2 * shape[1], 2 * shape[2], 3)).astype(np.float32)
  for form in (layers._upsample_by_phase, layers._subpixel_upsample):
    _assert_vjp_equals_float64(form, layers._subpixel_upsample, x, kernel, dy)


@pytest.mark.parametrize('channels', [1, 5])
def test_convolution_from_few_channels_and_its_gradient_equal_the_convolution(channels):
  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, 13, 10, channels)).astype(np.float32)
  kernel = rng.standard_normal((7, 7, channels, 6)).astype(np.float32)
  dy = rng.standard_normal((2, 7, 4, 6)).astype(np.float32)
  _assert_vjp_equals_float64(layers._conv_from_few_channels, layers._valid_conv, x, kernel, dy)


def test_convolution_with_constant_planes_folded_equals_the_convolution():
  """The generator's first convolution: the constant one-hot planes folded into a bias give
  the convolution's output, kernel gradient and image-channel input gradient."""
  rng = np.random.default_rng(7)
  image = rng.standard_normal((3, 13, 10, 1))
  planes = np.broadcast_to(np.eye(4)[[2, 0, 3], None, None, :], (3, 13, 10, 4))
  x = np.concatenate([image, planes], -1).astype(np.float32)
  kernel = rng.standard_normal((7, 7, 5, 6)).astype(np.float32)
  dy = rng.standard_normal((3, 7, 4, 6)).astype(np.float32)
  y, pullback = jax.vjp(layers._conv_from_constant_planes, jnp.asarray(x), jnp.asarray(kernel))
  dx, d_kernel = pullback(jnp.asarray(dy))
  with jax.enable_x64(True):
    want_y, want_pullback = jax.vjp(layers._valid_conv, *_float64(x, kernel))
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
  got = jax.value_and_grad(loss(layers._patch_conv_by_phase), (0, 1))(x, kernel)
  with jax.enable_x64(True):
    want = jax.value_and_grad(loss(layers._patch_conv_strided), (0, 1))(*_float64(x, kernel))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(w)).max())
