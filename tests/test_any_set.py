"""The any-set generator (config.model.generator='any') and its training scenarios."""
import functools
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aegan_jax import checkpoints
from aegan_jax import data
from aegan_jax import layers
from aegan_jax import models
from aegan_jax import train
from tests_helpers import phantom_image_batch, tiny_config

SIZE = 32


def any_config(**fields):
  return tiny_config(**{'model.generator': 'any', 'data.scenarios': 'any', **fields})


def init(generator, seed=0):
  return generator.init({'params': jax.random.PRNGKey(seed)},
                        *models.example_inputs(generator, SIZE), train=False)


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_parameters_grow_only_by_the_embeddings():
  four, five = (models.build_networks(any_config().model, m)[0] for m in (4, 5))
  p4 = jax.eval_shape(lambda: init(four))['params']
  p5 = jax.eval_shape(lambda: init(five))['params']
  ngf = 8
  # The encoder's three modulations read a one-hot (slot, target) code of 2M entries, and
  # give a scale and a shift per channel (ngf, 2 ngf, 4 ngf): a modality adds two rows each.
  modulations = 2 * 2 * (ngf + 2 * ngf + 4 * ngf)
  target = 2 * 4 * ngf  # the fused features' target scale and shift: one row more each
  assert count(p5) - count(p4) == modulations + target
  assert set(p4) == set(p5)


@pytest.mark.parametrize('norm,train_mode', [('batch', True), ('batch', False),
                                             ('instance', True)])
def test_absent_inputs_cannot_influence_the_output(norm, train_mode):
  generator = models.build_networks(any_config(**{'model.norm': norm}).model, 4)[0]
  variables = init(generator)
  batch = phantom_image_batch(SIZE, 4, 0)
  available = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1]], bool)
  target = np.array([3, 0, 3, 1])
  noise = np.random.default_rng(1).normal(size=batch['images'].shape).astype(np.float32)
  scrambled = np.where(available[:, None, None, :], batch['images'], 5 * noise)

  @jax.jit
  def run(images):
    out, _ = generator.apply(variables, images, available, target, train=train_mode,
                             rngs={'dropout': jax.random.PRNGKey(2)}, mutable=['batch_stats'])
    return out

  np.testing.assert_array_equal(run(batch['images']), run(scrambled))
  # ... while an available input does change it.
  changed = np.where(available[:, None, None, :], 5 * noise, batch['images'])
  reference = run(batch['images'])
  assert np.abs(reference - run(changed)).max() > 0.1 * np.abs(reference).max()


def test_one_program_serves_every_subset():
  generator = models.build_networks(any_config().model, 4)[0]
  variables = init(generator)
  # The embeddings start at zero; as training would, give them values.
  def embedding(path, value):
    names = [getattr(key, 'key', '') for key in path]
    if any(n.startswith('modulation') or n.startswith('target_') for n in names):
      seed = zlib.crc32('/'.join(names).encode())
      return 0.5 * jax.random.normal(jax.random.PRNGKey(seed), value.shape)
    return value
  variables = jax.tree_util.tree_map_with_path(embedding, variables)
  images = phantom_image_batch(SIZE, 1, 0)['images']
  apply = jax.jit(functools.partial(generator.apply, train=False))
  outputs = set()
  for target in range(4):
    others = [m for m in range(4) if m != target]
    for k in (1, 2, 3):
      for subset in itertools.combinations(others, k):
        available = np.isin(np.arange(4), subset)[None]
        out = apply(variables, images, available, np.array([target]))
        outputs.add(np.asarray(out).tobytes())
  assert apply._cache_size() == 1
  assert len(outputs) == 28  # every (set, target) cell gives its own synthesis


def test_configs_stored_before_the_generator_field_still_restore():
  config = any_config()
  del config.model['generator']  # as a checkpoint written by an earlier version stores it
  meta = {'architecture': checkpoints.config_fields(config)}
  assert 'model.generator' not in meta['architecture']
  checkpoints.check_compatible(meta, config, 'old')
  assert isinstance(models.build_networks(config.model, 4)[0], models.SynthesisGenerator)


def test_the_pipeline_samples_every_pair_uniformly(prepared):
  loader = data.make_train_loader(prepared, global_batch_size=8, seed=0, scenarios='any',
                                  process_index=0, process_count=1)
  counts = {}
  for _, batch in zip(range(60), loader):
    for available, target in zip(batch['available'], batch['target_index']):
      assert available.any() and not available[target]
      key = (tuple(np.flatnonzero(available)), int(target))
      counts[key] = counts.get(key, 0) + 1
  assert len(counts) == 28
  assert min(counts.values()) > 0.4 * 480 / 28


def test_the_curriculum_removes_inputs_stage_by_stage_and_replays(prepared):
  loader = data.make_train_loader(prepared, global_batch_size=8, seed=0, scenarios='curriculum',
                                  curriculum_stage_examples=16, process_index=0,
                                  process_count=1)
  iterator = iter(loader)
  batches = [next(iterator) for _ in range(12)]
  inputs = [b['available'].sum(axis=1) for b in batches]
  for stage, fewest in enumerate((3, 2, 1)):
    seen = np.concatenate(inputs[2 * stage:2 * stage + 2])
    assert seen.min() >= fewest
  assert set(np.concatenate(inputs[6:])) == {1, 2, 3}
  for batch in batches:
    assert not batch['available'][np.arange(8), batch['target_index']].any()
  state = iter(loader)
  for _ in range(5):
    next(state)
  resumed = iter(loader)
  resumed.set_state(state.get_state())
  np.testing.assert_array_equal(next(resumed)['available'], batches[5]['available'])


def test_training_iterations_run_and_learn():
  config = any_config()
  trainer = train.make_trainer(config, 4)
  state = train.init_state(trainer, jax.random.PRNGKey(0), SIZE)
  step = jax.jit(functools.partial(train.train_step, trainer=trainer))
  batch = phantom_image_batch(SIZE, 4, 0)
  batch['available'] = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 0]], bool)
  batch['target_index'] = np.array([3, 0, 2, 1])
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss_G_L1']))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]


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
  y_all, mean_all, var_all = layers.weighted_normalize(garbage, present.astype(np.float32),
                                                       scale, bias, 1e-5)
  y_only, mean_only, var_only = layers.normalize(x[present], scale, bias, False, 1e-5)
  np.testing.assert_allclose(mean_all, mean_only, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var_all, var_only, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y_all)[present], y_only, rtol=1e-5, atol=1e-5)
  # ... and the unweighted moments of the same batch do differ.
  assert np.abs(np.asarray(layers.normalize(garbage, scale, bias, False, 1e-5)[1]) -
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
      lambda *a: layers.weighted_normalize(a[0], weights, a[1], a[2], 1e-5)[0], x, scale, bias)
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


def test_batch_norm_any_set_training_moments_ignore_absent_slots():
  """The encoder's first batch moments in training are those of the present slots'
  features alone (before masking, the zeroed absent slots counted too)."""
  generator = models.build_networks(any_config(**{'model.norm': 'batch'}).model, 4)[0]
  variables = init(generator)
  images = phantom_image_batch(SIZE, 4, 0)['images']
  available = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 0]], bool)
  target = np.array([3, 0, 3, 1])
  _, state = generator.apply(variables, images, available, target, train=True,
                             rngs={'dropout': jax.random.PRNGKey(2)}, mutable=['batch_stats'])
  slots = [images[i, ..., j] for i in range(4) for j in range(4) if available[i, j]]
  kernel = variables['params']['encoder']['conv_in']['kernel']  # no bias before BatchNorm
  features = jnp.concatenate([
      jax.lax.conv_general_dilated(layers.reflect_pad(jnp.asarray(s)[None, ..., None], 3),
                                   kernel, (1, 1), 'VALID',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC')) for s in slots])
  # One update of the zero-initialised running mean, momentum 0.1.
  np.testing.assert_allclose(state['batch_stats']['encoder']['norm_in']['mean'],
                             0.1 * features.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_scenario_weights_set_the_share_of_each_input_count(prepared):
  loader = data.make_train_loader(prepared, global_batch_size=8, seed=0, scenarios='any',
                                  scenario_weights=(0.2, 0.3, 0.5), process_index=0,
                                  process_count=1)
  counts = np.zeros(4)
  cells = set()
  for _, batch in zip(range(100), loader):
    counts += np.bincount(batch['available'].sum(axis=1), minlength=4)
    cells |= {(tuple(np.flatnonzero(a)), int(t))
              for a, t in zip(batch['available'], batch['target_index'])}
  share = counts[1:] / counts.sum()
  np.testing.assert_allclose(share, (0.2, 0.3, 0.5), atol=0.06)  # 800 draws
  assert len(cells) == 28


@pytest.mark.parametrize('weights,scenarios', [((1, 1), 'any'), ((1, -1, 1), 'any'),
                                               ((0, 0, 0), 'any'), ((1, 1, 1), 'single')])
def test_bad_scenario_weights_name_the_field(weights, scenarios):
  with pytest.raises(ValueError, match='config.data.scenario_weights'):
    data.check_scenario_options(scenarios=scenarios, curriculum_stage_examples=1,
                                scenario_weights=weights, num_modalities=4)
