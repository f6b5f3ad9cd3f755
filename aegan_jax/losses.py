"""AE-GAN loss terms, each a small function with its formula.

Conventions follow the official code: every reduction is a mean over all
elements, GAN targets are constant tensors of 1 (real) or 0 (fake).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from aegan_jax import kernels


def gan_loss(logits, is_real: bool, mode: str = 'vanilla'):
  """Adversarial loss against a constant label y (1 real, 0 fake).

  vanilla (official): mean BCE-with-logits,
    mean(max(l, 0) - l * y + log(1 + exp(-|l|)));
  lsgan: mean((l - y)^2).
  """
  labels = jnp.full_like(logits, 1.0 if is_real else 0.0)
  if mode == 'vanilla':
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
  if mode == 'lsgan':
    return jnp.mean(jnp.square(logits - labels))
  raise ValueError(f"loss.gan_mode must be 'vanilla' or 'lsgan', got {mode!r}")


def l1_loss(prediction, target):
  """mean |prediction - target| (torch L1Loss); the x100 weight is applied by callers."""
  return jnp.mean(jnp.abs(prediction - target))


def self_representation_loss(generator_features, autoencoder_features):
  """Sum over decoder stages of KL(p_AE || p_G), channel softmax at each pixel.

  With p = softmax_c(AE feature) and log q = log_softmax_c(G feature):
    KL_i = mean over all N*H*W*C elements of p * (log p - log q),
  torch's `KLDivLoss()` (reduction 'mean', elementwise, not 'batchmean');
  p log p is 0 where p = 0.  The AE side is a fixed target (no gradient).
  """
  total = 0.0
  for gen, ae in zip(generator_features, autoencoder_features):
    dtype = kernels.accumulation_dtype(gen.dtype)
    p = jax.nn.softmax(jax.lax.stop_gradient(ae).astype(dtype), axis=-1)
    log_q = jax.nn.log_softmax(gen.astype(dtype), axis=-1)
    total = total + jnp.mean(jax.scipy.special.xlogy(p, p) - p * log_q)
  return total


def autoencoder_loss(real_logits, synthesized_logits, reconstructed_logits,
                     reconstruction, target, *, l1_weight=100.0, gan_mode='vanilla'):
  """AE (discriminator) objective, official `backward_D`:

    D_fake = GAN(D(y_hat), 0) + GAN(D(y'), 0)
    D_real = GAN(D(y), 1)
    AE_L1  = l1_weight * |y' - y|
    total  = (0.5 * D_fake + D_real) * 0.5 + AE_L1
  with y the real target, y_hat the synthesis and y' the AE reconstruction.
  """
  terms = {
      'loss_D_fake': (gan_loss(synthesized_logits, False, gan_mode) +
                      gan_loss(reconstructed_logits, False, gan_mode)),
      'loss_D_real': gan_loss(real_logits, True, gan_mode),
      'loss_AE_L1': l1_weight * l1_loss(reconstruction, target),
  }
  terms['loss_D'] = ((terms['loss_D_fake'] * 0.5 + terms['loss_D_real']) * 0.5 +
                     terms['loss_AE_L1'])
  return terms['loss_D'], terms


def generator_loss(synthesized_logits, synthesized, target, generator_features,
                   autoencoder_features, *, sr_weight, l1_weight=100.0, gan_mode='vanilla'):
  """Generator objective, official `backward_G`:

    G_GAN = GAN(D(y_hat), 1);  G_L1 = l1_weight * |y_hat - y|
    G_SR  = sr_weight * self_representation_loss
    total = G_GAN + G_L1 + G_SR
  """
  terms = {
      'loss_G_GAN': gan_loss(synthesized_logits, True, gan_mode),
      'loss_G_L1': l1_weight * l1_loss(synthesized, target),
      'loss_G_SR': sr_weight * self_representation_loss(generator_features,
                                                        autoencoder_features),
  }
  terms['loss_G'] = terms['loss_G_GAN'] + terms['loss_G_L1'] + terms['loss_G_SR']
  return terms['loss_G'], terms
