"""AE-GAN training state and the pure, jit-compiled training iteration.

One iteration follows the official `optimize_parameters`:
  1. the generator G synthesises y_hat from the other modalities (train mode);
  2. the autoencoder/discriminator (AE) takes one Adam step on the AE loss;
  3. G takes one Adam step on the G loss, judged by the *updated* AE.

The one intended difference from the official code: it runs the AE on the
real image twice in step 2 (once for the reconstruction y', once for the
real logits).  Here one pass serves both, so only the dropout mask of that
second pass differs; its BatchNorm running-statistics update is replayed
from the shared pass, keeping the official update order.  G runs forward
once and its backward pass is pulled back through a saved VJP.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from aegan_jax import losses
from aegan_jax import models
from aegan_jax import parallel
from aegan_jax.kernels import normalization

PyTree = Any


@flax.struct.dataclass
class NetworkState:
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree

  def variables(self):
    """Flax variables; instance norm keeps no statistics, so then only 'params'
    (the same tree `init` gives, which checkpoint restore targets are built from)."""
    if not self.batch_stats:
      return {'params': self.params}
    return {'params': self.params, 'batch_stats': self.batch_stats}


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; optimizers and modules live in `Trainer`."""
  step: jax.Array          # int32 scalar: iterations done
  generator: NetworkState
  autoencoder: NetworkState
  sr_weight: jax.Array     # current self-representation weight (decays, official)
  rng: jax.Array           # base PRNG key; iteration k draws from fold_in(rng, k)


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """`config.loss`, field for field (the defaults live in the config files)."""
  gan_mode: str            # vanilla (official BCE) | lsgan
  lambda_l1: float         # generator L1 weight
  ae_lambda_l1: float      # AE reconstruction L1 weight
  sr_weight: float         # initial self-representation weight; the state carries its decay
  sr_decay_factor: float   # sr_weight *= sr_decay_factor ...
  sr_decay_every: int      # ... every this many iterations; 0 disables the decay

  def __post_init__(self):
    if self.gan_mode not in ('vanilla', 'lsgan'):
      raise ValueError(f"config.loss.gan_mode={self.gan_mode!r} must be 'vanilla' or 'lsgan'")
    if self.sr_decay_every < 0:
      raise ValueError(f'config.loss.sr_decay_every={self.sr_decay_every} must be >= 0')


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Static parts of training: the two networks, their optimizers, loss weights."""
  generator: models.SynthesisGenerator
  autoencoder: models.AutoEncoder
  generator_tx: optax.GradientTransformation
  autoencoder_tx: optax.GradientTransformation
  weights: LossWeights
  learning_rate: Any  # float or optax schedule, for logging


def learning_rate_schedule(base_lr, constant_steps, decay_steps):
  """Official 'linear' policy: constant, then linear decay to 0 over `decay_steps`."""
  if decay_steps <= 0:
    return optax.constant_schedule(base_lr)
  return optax.join_schedules(
      [optax.constant_schedule(base_lr),
       optax.linear_schedule(base_lr, 0.0, decay_steps)], [constant_steps])


def make_optimizer(*, learning_rate, b1, b2, eps, lr_constant_steps, lr_decay_steps):
  """`config.optim` -> (Adam, its learning-rate schedule); each network keeps its own state."""
  checks = [('learning_rate', learning_rate, learning_rate > 0, 'must be positive'),
            # Adam divides by 1 - b^t: b >= 1 gives NaN or a sign flip.
            ('b1', b1, 0 <= b1 < 1, 'must be in [0, 1)'),
            ('b2', b2, 0 <= b2 < 1, 'must be in [0, 1)'),
            ('eps', eps, eps > 0, 'must be positive'),
            ('lr_constant_steps', lr_constant_steps, lr_constant_steps >= 0, 'must be >= 0'),
            ('lr_decay_steps', lr_decay_steps, lr_decay_steps >= 0, 'must be >= 0')]
  for name, value, ok, requirement in checks:
    if not ok:  # NaN fails every comparison, so it is refused too.
      raise ValueError(f'config.optim.{name}={value!r} {requirement}')
  schedule = learning_rate_schedule(learning_rate, lr_constant_steps, lr_decay_steps)
  return optax.adam(schedule, b1=b1, b2=b2, eps=eps), schedule


def make_trainer(config, num_modalities: int) -> Trainer:
  """The networks, optimizers and loss weights of `config`'s model, optim and loss groups.

  Each group's fields are its constructor's keywords; a bad value raises ValueError
  naming the field.
  """
  generator, autoencoder = models.build_networks(config.model, num_modalities)
  try:
    adam, schedule = make_optimizer(**config.optim)
  except TypeError as e:
    raise ValueError(f'config.optim: {e}') from None
  try:
    weights = LossWeights(**config.loss)
  except TypeError as e:
    raise ValueError(f'config.loss: {e}') from None
  return Trainer(generator, autoencoder, adam, adam, weights, schedule)


def init_state(trainer: Trainer, rng, image_size: int) -> TrainState:
  """Fresh state (official init: N(0, 0.02) weights, BN gamma ~ N(1, 0.02))."""
  g_rng, ae_rng, train_rng = jax.random.split(rng, 3)
  ae_input = jnp.zeros((1, image_size, image_size, 1))
  g_vars = trainer.generator.init({'params': g_rng},
                                  *models.example_inputs(trainer.generator, image_size),
                                  train=False)
  ae_vars = trainer.autoencoder.init({'params': ae_rng}, ae_input, train=False)

  def network_state(variables, tx):
    return NetworkState(variables['params'], variables.get('batch_stats', {}),
                        tx.init(variables['params']))

  return TrainState(step=jnp.zeros((), jnp.int32),
                    generator=network_state(g_vars, trainer.generator_tx),
                    autoencoder=network_state(ae_vars, trainer.autoencoder_tx),
                    sr_weight=jnp.asarray(trainer.weights.sr_weight, jnp.float32),
                    rng=train_rng)


def _stats(collections, name='batch_stats'):
  """A mutable collection of an apply; absent (empty) with instance norm."""
  return collections.get(name, {})


def _replay_batch_stats(batch_stats, moments):
  """Applies a pass's recorded BatchNorm moments as a running-statistics update.

  Lets a pass whose outputs were computed earlier update the running
  statistics in the official order.  Layers the pass skipped keep their value.
  """
  def replay(path, running):
    node = moments
    for key in path:
      if key.key not in node:
        return running
      node = node[key.key]
    return normalization.ema_update(running, node, 0.1)
  return jax.tree_util.tree_map_with_path(replay, batch_stats)


def _autoencoder_update(trainer, ae: NetworkState, target, synthesized, rng):
  """One Adam step on the AE loss; returns (new AE state, loss terms)."""
  real_rng, synth_rng, recon_rng = jax.random.split(rng, 3)
  apply = trainer.autoencoder.apply

  def loss_fn(params):
    out, state = apply({'params': params, 'batch_stats': ae.batch_stats}, target, train=True,
                       rngs={'dropout': real_rng}, mutable=['batch_stats', 'batch_moments'])
    reconstruction = jax.lax.stop_gradient(out.reconstruction)
    synth_logits, synth_pass = apply({'params': params, 'batch_stats': _stats(state)},
                             synthesized, train=True, method='patch_logits',
                             rngs={'dropout': synth_rng}, mutable=['batch_stats'])
    recon_logits, recon_pass = apply({'params': params, 'batch_stats': _stats(synth_pass)},
                             reconstruction, train=True, method='patch_logits',
                             rngs={'dropout': recon_rng}, mutable=['batch_stats'])
    batch_stats = _replay_batch_stats(_stats(recon_pass), _stats(state, 'batch_moments'))
    loss, terms = losses.autoencoder_loss(out.patch_logits, synth_logits, recon_logits,
                                          out.reconstruction, target,
                                          l1_weight=trainer.weights.ae_lambda_l1,
                                          gan_mode=trainer.weights.gan_mode)
    return loss, (terms, batch_stats)

  grads, (terms, batch_stats) = jax.grad(loss_fn, has_aux=True)(ae.params)
  updates, opt_state = trainer.autoencoder_tx.update(grads, ae.opt_state, ae.params)
  return NetworkState(optax.apply_updates(ae.params, updates), batch_stats, opt_state), terms


def _generator_loss_grads(trainer, ae: NetworkState, synthesized, features, target,
                          sr_weight, rng):
  """d loss_G / d (y_hat, features) through the frozen, updated AE (train mode)."""
  synth_rng, feature_rng = jax.random.split(rng)
  apply = trainer.autoencoder.apply
  # Train-mode BN normalises with batch statistics, so the features do not depend on the
  # running statistics; only their update must come after the patch pass (official order).
  ae_features, feature_pass = apply(ae.variables(), target, train=True, method='features',
                                    rngs={'dropout': feature_rng},
                                    mutable=['batch_stats', 'batch_moments'])

  def loss_fn(synth, feats):
    # Official order: AE(y_hat) first, then get_features(y); BN updates follow it.
    logits, patch_pass = apply(ae.variables(), synth, train=True, method='patch_logits',
                       rngs={'dropout': synth_rng}, mutable=['batch_stats'])
    loss, terms = losses.generator_loss(logits, synth, target, feats, ae_features,
                                        sr_weight=sr_weight,
                                        l1_weight=trainer.weights.lambda_l1,
                                        gan_mode=trainer.weights.gan_mode)
    return loss, (terms, _stats(patch_pass))

  grads, (terms, patch_pass_stats) = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(
      synthesized, features)
  batch_stats = _replay_batch_stats(patch_pass_stats, _stats(feature_pass, 'batch_moments'))
  return grads, terms, batch_stats


def train_step(state: TrainState, batch, *, trainer: Trainer):
  """One AE-GAN iteration on the loader's batch: images [N, H, W, M], available [N, M],
  target_index [N]."""
  rng = jax.random.fold_in(state.rng, state.step)
  g_rng, ae_rng, g_loss_rng = jax.random.split(rng, 3)
  generator_inputs, target = models.generator_batch(trainer.generator, batch)
  g = state.generator

  def generator_forward(params):
    (synth, feats), new_state = trainer.generator.apply(
        {'params': params, 'batch_stats': g.batch_stats}, *generator_inputs, train=True,
        return_features=True, rngs={'dropout': g_rng}, mutable=['batch_stats'])
    return (synth, feats), _stats(new_state)

  (synth, feats), generator_pullback, g_batch_stats = jax.vjp(
      generator_forward, g.params, has_aux=True)

  autoencoder, d_terms = _autoencoder_update(trainer, state.autoencoder, target,
                                             jax.lax.stop_gradient(synth), ae_rng)
  output_grads, g_terms, ae_batch_stats = _generator_loss_grads(
      trainer, autoencoder, synth, feats, target, state.sr_weight, g_loss_rng)
  (g_grads,) = generator_pullback(output_grads)
  updates, g_opt_state = trainer.generator_tx.update(g_grads, g.opt_state, g.params)
  generator = NetworkState(optax.apply_updates(g.params, updates), g_batch_stats, g_opt_state)

  step = state.step + 1
  metrics = {**d_terms, **g_terms, 'sr_weight': state.sr_weight,
             'learning_rate': _learning_rate(trainer, state.step)}
  return TrainState(step=step, generator=generator,
                    autoencoder=autoencoder.replace(batch_stats=ae_batch_stats),
                    sr_weight=_decayed_sr_weight(trainer.weights, state.sr_weight, step),
                    rng=state.rng), metrics


def _decayed_sr_weight(weights: LossWeights, sr_weight, step):
  if weights.sr_decay_every <= 0:
    return sr_weight
  decay = (step % weights.sr_decay_every) == 0
  return jnp.where(decay, sr_weight * weights.sr_decay_factor, sr_weight)


def _learning_rate(trainer, step):
  lr = trainer.learning_rate
  return jnp.asarray(lr(step) if callable(lr) else lr, jnp.float32)


def sharded_train_step(trainer: Trainer, mesh):
  """jit-compiled iteration: state replicated (and donated), batch sharded on 'data'."""
  return jax.jit(functools.partial(train_step, trainer=trainer),
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                 out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
                 donate_argnums=0)
