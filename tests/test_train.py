"""The training iteration: official semantics, learning, determinism."""
import functools

import jax
import numpy as np
import optax
import pytest

from aegan_jax import losses
from aegan_jax import modalities
from aegan_jax import models
from aegan_jax import train
from tests_helpers import SIZE, tiny_config



def tiny_batch(seed=0, n=2):
  rng = np.random.default_rng(seed)
  images = np.tanh(rng.normal(size=(n, SIZE, SIZE, 4))).astype(np.float32)
  targets = np.array([3, 1, 0, 2][:n])
  return {'images': images, 'target_index': targets,
          'available': modalities.all_but_target(targets, 4)}


def smooth_batch(n=2):
  """Modalities as different contrasts of one smooth anatomy: a learnable mapping."""
  yy, xx = np.mgrid[-1:1:SIZE * 1j, -1:1:SIZE * 1j]
  images = []
  for i in range(n):
    base = np.exp(-((xx - 0.2 * i) ** 2 + yy ** 2) * 3) + 0.3 * np.sin(3 * xx + i)
    images.append(np.stack([np.tanh(base), np.tanh(-base), np.tanh(2 * base - 0.5),
                            np.tanh(base ** 2 - 0.3)], axis=-1))
  images = np.asarray(images, np.float32)
  targets = np.array([3, 1, 0, 2][:n])
  return {'images': images, 'target_index': targets,
          'available': modalities.all_but_target(targets, 4)}


def make(config, seed=0):
  trainer = train.make_trainer(config, 4)
  state = train.init_state(trainer, jax.random.PRNGKey(seed), SIZE)
  step = jax.jit(functools.partial(train.train_step, trainer=trainer))
  return trainer, state, step


def official_order_step(trainer, state, batch):
  """The official iteration written out naively: four AE passes in the D step, G run again
  for its loss.  Valid as a reference with dropout off (no masks to match)."""
  ae_apply, g_apply = trainer.autoencoder.apply, trainer.generator.apply
  (x,), target = models.generator_batch(trainer.generator, batch)
  g, ae = state.generator, state.autoencoder
  (synth, feats), g_state = g_apply(g.variables(), x, train=True, return_features=True,
                                    mutable=['batch_stats'])

  def d_loss(params):
    stats = ae.batch_stats
    run = lambda img, stats, **kw: ae_apply({'params': params, 'batch_stats': stats}, img,
                                            train=True, mutable=['batch_stats'], **kw)
    first, s = run(target, stats)                                   # sr.forward()
    fake_g, s = run(jax.lax.stop_gradient(synth), s['batch_stats'])
    fake_r, s = run(jax.lax.stop_gradient(first.reconstruction), s['batch_stats'])
    real, s = run(target, s['batch_stats'])
    loss, _ = losses.autoencoder_loss(real.patch_logits, fake_g.patch_logits,
                                      fake_r.patch_logits, first.reconstruction, target)
    return loss, s['batch_stats']

  grads, ae_stats = jax.grad(d_loss, has_aux=True)(ae.params)
  updates, ae_opt = trainer.autoencoder_tx.update(grads, ae.opt_state, ae.params)
  ae_params = optax.apply_updates(ae.params, updates)

  def g_loss(params):
    (synth, feats), _ = g_apply({'params': params, 'batch_stats': g.batch_stats}, x,
                                train=True, return_features=True, mutable=['batch_stats'])
    out, s = ae_apply({'params': ae_params, 'batch_stats': ae_stats}, synth, train=True,
                      mutable=['batch_stats'])
    ae_feats, s = ae_apply({'params': ae_params, 'batch_stats': s['batch_stats']}, target,
                           train=True, method='features', mutable=['batch_stats'])
    loss, _ = losses.generator_loss(out.patch_logits, synth, target, feats, ae_feats,
                                    sr_weight=state.sr_weight)
    return loss, s['batch_stats']

  g_grads, ae_stats = jax.grad(g_loss, has_aux=True)(g.params)
  updates, g_opt = trainer.generator_tx.update(g_grads, g.opt_state, g.params)
  return (optax.apply_updates(g.params, updates), g_state['batch_stats'], ae_params, ae_stats)


@pytest.mark.slow
def test_iteration_equals_the_official_order_without_dropout():
  trainer, state, step = make(tiny_config(**{'model.use_dropout': False}))
  batch = tiny_batch()
  expected = list(jax.jit(functools.partial(official_order_step, trainer))(state, batch))
  new_state, _ = step(state, batch)
  actual = [new_state.generator.params, new_state.generator.batch_stats,
            new_state.autoencoder.params, dict(new_state.autoencoder.batch_stats)]
  expected[3] = dict(expected[3])
  # The AE decoder's running statistics are the one exception: the official code also runs
  # the decoder in passes that only need patch logits, updating statistics nothing reads.
  expected[3].pop('decoder_0'), expected[3].pop('decoder_1')
  actual[3].pop('decoder_0'), actual[3].pop('decoder_1')
  for name, a, b in zip(('G params', 'G stats', 'AE params', 'AE stats'), actual, expected):
    assert jax.tree.structure(a) == jax.tree.structure(b), name
    for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(leaf_a, leaf_b, atol=2e-6, rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_metrics_are_a_flat_dict_of_every_loss_term():
  _, state, step = make(tiny_config())
  _, metrics = step(state, tiny_batch())
  assert set(metrics) == {'loss_D_fake', 'loss_D_real', 'loss_AE_L1', 'loss_D', 'loss_G_GAN',
                          'loss_G_L1', 'loss_G_SR', 'loss_G', 'sr_weight', 'learning_rate'}
  assert all(np.shape(v) == () and np.isfinite(v) for v in metrics.values())


@pytest.mark.slow
def test_thirty_iterations_halve_the_l1_term():
  _, state, step = make(tiny_config(**{'optim.learning_rate': 2e-3}))
  batch = smooth_batch(n=2)
  first = None
  for _ in range(30):
    state, metrics = step(state, batch)
    first = first if first is not None else float(metrics['loss_G_L1'])
  assert float(metrics['loss_G_L1']) < 0.5 * first


@pytest.mark.slow
def test_same_seed_gives_bitwise_identical_params():
  def run():
    _, state, step = make(tiny_config(), seed=3)
    for i in range(3):
      state, _ = step(state, tiny_batch(seed=i))
    return jax.device_get(state)
  a, b = run(), run()
  for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(leaf_a, leaf_b)


@pytest.mark.slow
def test_sr_weight_decays_every_n_iterations():
  config = tiny_config(**{'loss.sr_decay_every': 2})
  _, state, step = make(config)
  weights = []
  for _ in range(5):
    state, metrics = step(state, tiny_batch())
    weights.append(float(metrics['sr_weight']))
  np.testing.assert_allclose(weights, [0.1, 0.1, 0.005, 0.005, 0.00025], rtol=1e-6)


def test_learning_rate_schedule_constant_then_linear():
  schedule = train.learning_rate_schedule(1e-4, 10, 5)
  assert float(schedule(0)) == pytest.approx(1e-4)
  assert float(schedule(10)) == pytest.approx(1e-4)
  assert float(schedule(12)) == pytest.approx(0.6e-4)
  assert float(schedule(15)) == pytest.approx(0.0)
