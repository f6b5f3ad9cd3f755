"""Shapes, parameter counts and layer semantics of the two networks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aegan_jax import layers
from aegan_jax.kernels import convolution
from tests_helpers import random_variables
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


@pytest.mark.slow
def test_instance_norm_option_builds_and_runs():
  generator = models.SynthesisGenerator(ngf=8, norm='instance', num_blocks=1)
  x = jnp.ones((1, 16, 16, 15))
  variables = random_variables(generator, 16)
  assert 'batch_stats' not in variables
  assert 'bias' in variables['params']['encoder_0']['conv_in']  # biases without BatchNorm
  assert generator.apply(variables, x, train=False).shape == (1, 16, 16, 1)


def test_downconv_layer_is_the_strided_convolution():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 16, 12, 5)).astype(np.float32)
  kernel = rng.standard_normal((3, 3, 5, 7)).astype(np.float32)
  down = layers.DownConv(7)
  np.testing.assert_allclose(down.apply({'params': {'kernel': jnp.asarray(kernel)}}, x),
                             convolution.strided_conv(x, kernel), atol=1e-5)
