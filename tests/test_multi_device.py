"""N devices compute what one device computes (4 simulated CPU devices, see conftest.py).

Phantom slices (continuous, with an exactly constant background like prepared MRI),
dropout on, global batch 4 on 1, 2 and 4 devices, both norms.  In float32 (64 px)
one iteration gives the 1-device gradients (read from Adam's first moment, (1 - b1) * g)
and losses to rounding; in float64 (32 px) three iterations give the same generator to 1e-8.

Float32 outputs after several iterations are not compared: Adam's first step moves every
parameter by about +-lr whatever its gradient's size, so parameters whose true gradient is
zero (a conv bias before instance norm, the kernel taps reading the constant modality
mask) move by the sign of rounding noise, and later iterations amplify that.  Changing only
the rounding of the norm sums (fold count 2 or 4 instead of 3) took the 1-vs-4-device gap
of the 3-iteration output from about 5e-6 to 6e-5 or 3.5e-2 on some data seeds: a fixed
tolerance there tests luck.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aegan_jax import models
from aegan_jax import parallel
from aegan_jax import train
from tests_helpers import phantom_image_batch, tiny_config

def run_iterations(config, size, num_devices, steps):
  """(first-step gradient moments, first-step metrics, final state) on `num_devices`."""
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  trainer = train.make_trainer(config, 4)
  state = parallel.replicate(train.init_state(trainer, jax.random.PRNGKey(0), size), mesh)
  step = train.sharded_train_step(trainer, mesh)
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


@pytest.mark.parametrize('norm', ['batch', 'instance'])
@pytest.mark.slow
def test_float32_first_iteration_agrees_across_device_counts(norm):
  counts = (1, 2, 4)
  config = tiny_config(**{'model.norm': norm})
  runs = {n: run_iterations(config, 64, n, steps=1)[:2] for n in counts}
  for n in counts[1:]:
    assert_gradients_close(runs[1][0], runs[n][0], rtol=1e-4)
    assert_losses_close(runs[1][1], runs[n][1], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('norm', ['batch', 'instance'])
def test_float64_iterations_equal_across_device_counts(norm):
  counts = (1, 4)
  config = tiny_config(**{'model.norm': norm})
  config.model.dtype = config.model.param_dtype = 'float64'
  with jax.enable_x64(True):
    runs = {n: run_iterations(config, 32, n, steps=3) for n in counts}
    outputs = {n: eval_output(config, runs[n][2], 32) for n in counts}
  assert outputs[1].dtype == np.float64
  for n in counts[1:]:
    assert_gradients_close(runs[1][0], runs[n][0], rtol=1e-9)
    assert_losses_close(runs[1][1], runs[n][1], rtol=1e-9)
    np.testing.assert_allclose(outputs[n], outputs[1], atol=1e-8)
