"""N devices compute what one device computes (4 simulated CPU devices, see conftest.py).

Phantom slices, dropout on, global batch 4 on 1, 2 and 4 devices.

In float64 rounding cannot hide anything: one iteration must give the 1-device gradients
(read from Adam's first moment, (1 - b1) * g) and losses, and three iterations the same
generator.  In float32 the forward pass is bitwise the same on every device count
(`layers.batch_sum`); the gradients of the generator can still differ by ~1e-3 where an
activation of the autoencoder, updated with gradients summed across devices, lies within
rounding of a ReLU kink (README, "Several GPUs, several hosts"), so float32 checks the
forward and the autoencoder's gradient.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aegan_jax import models
from aegan_jax import parallel
from aegan_jax import train
from tests_helpers import phantom_image_batch, tiny_config

DEVICE_COUNTS = (1, 2, 4)


def run_iterations(config, size, num_devices, steps):
  """(first-step gradient moments, first-step metrics, final state) on `num_devices`."""
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  trainer = train.make_trainer(config, 4)
  state = parallel.replicate(train.init_state(trainer, jax.random.PRNGKey(0), size), mesh)
  step = parallel.sharded_train_step(trainer, mesh)
  for i in range(steps):
    state, metrics = step(state, parallel.global_batch(phantom_image_batch(size, 4, i), mesh))
    if i == 0:
      first = jax.device_get((state.generator.opt_state[0].mu, state.autoencoder.opt_state[0].mu,
                              metrics))
  return first[:2], first[2], state


def assert_gradients_close(one, other, rtol, names=('generator', 'autoencoder')):
  """Every array whose gradient norm is at least 1e-3 of its network's largest."""
  for network, (a, b) in zip(names, zip(one, other)):
    leaves = jax.tree_util.tree_leaves_with_path(a)
    largest = max(np.linalg.norm(x) for _, x in leaves)
    for (path, x), y in zip(leaves, jax.tree.leaves(b)):
      if np.linalg.norm(x) >= 1e-3 * largest:
        rel = np.linalg.norm(x - y) / np.linalg.norm(x)
        assert rel < rtol, f'{network}{jax.tree_util.keystr(path)}: {rel:.1e}'


def assert_losses_close(one, other, rtol):
  for name in one:
    np.testing.assert_allclose(other[name], one[name], rtol=rtol, err_msg=name)


def eval_output(config, state, size):
  trainer = train.make_trainer(config, 4)
  batch = jax.tree.map(jnp.asarray, phantom_image_batch(size, 4, 7))
  inputs, _ = models.generator_batch(trainer.generator, batch)
  variables = jax.device_get(state.generator.variables())
  return np.asarray(trainer.generator.apply(variables, *inputs, train=False))


@pytest.mark.parametrize('norm,size', [('batch', 32), ('instance', 64)])
def test_float64_iterations_equal_across_device_counts(norm, size):
  config = tiny_config(**{'model.norm': norm})
  config.model.dtype = config.model.param_dtype = 'float64'
  with jax.enable_x64(True):
    runs = {n: run_iterations(config, size, n, steps=3) for n in DEVICE_COUNTS}
    outputs = {n: eval_output(config, runs[n][2], size) for n in DEVICE_COUNTS}
  assert outputs[1].dtype == np.float64
  for n in DEVICE_COUNTS[1:]:
    assert_gradients_close(runs[1][0], runs[n][0], rtol=1e-9)
    assert_losses_close(runs[1][1], runs[n][1], rtol=1e-9)
    np.testing.assert_allclose(outputs[n], outputs[1], atol=1e-8)


def test_float32_forward_is_bitwise_and_autoencoder_gradient_agrees():
  config = tiny_config()
  size = 64
  trainer = train.make_trainer(config, 4)
  state = train.init_state(trainer, jax.random.PRNGKey(0), size)
  forwards, runs = {}, {}
  for n in (1, 4):
    mesh = parallel.make_mesh(jax.devices()[:n])
    forward = jax.jit(
        lambda v, b: trainer.generator.apply(
            v, *models.generator_batch(trainer.generator, b)[0], train=True,
            return_features=True,
            rngs={'dropout': jax.random.PRNGKey(1)}, mutable=['batch_stats']),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)))
    forwards[n] = jax.device_get(forward(state.generator.variables(),
                                         parallel.global_batch(phantom_image_batch(size), mesh)))
    runs[n] = run_iterations(config, size, n, steps=1)
  for n in (4,):
    # Synthesis, both decoder feature maps and the BatchNorm batch statistics.
    for a, b in zip(jax.tree.leaves(forwards[1]), jax.tree.leaves(forwards[n])):
      np.testing.assert_array_equal(a, b)
    assert_gradients_close(runs[1][0][1:], runs[n][0][1:], rtol=1e-4, names=('autoencoder',))
    assert_losses_close(runs[1][1], runs[n][1], rtol=1e-5)
