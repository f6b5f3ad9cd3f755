"""Known answers for the loss terms."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from aegan_jax import losses


def test_gan_loss_vanilla_known_values():
  zeros = jnp.zeros((2, 3, 3, 1))
  assert float(losses.gan_loss(zeros, True)) == pytest.approx(math.log(2), rel=1e-6)
  logits = jnp.array([2.0, -1.0])
  expected_real = np.mean(np.log1p(np.exp(-np.array([2.0, -1.0]))))
  expected_fake = np.mean(np.log1p(np.exp(np.array([2.0, -1.0]))))
  assert float(losses.gan_loss(logits, True)) == pytest.approx(expected_real, rel=1e-6)
  assert float(losses.gan_loss(logits, False)) == pytest.approx(expected_fake, rel=1e-6)


def test_gan_loss_lsgan_and_bad_mode():
  logits = jnp.array([0.5, 2.0])
  assert float(losses.gan_loss(logits, True, 'lsgan')) == pytest.approx((0.25 + 1.0) / 2)
  assert float(losses.gan_loss(logits, False, 'lsgan')) == pytest.approx((0.25 + 4.0) / 2)
  with pytest.raises(ValueError, match='gan_mode'):
    losses.gan_loss(logits, True, 'wgan')


def test_l1_loss():
  assert float(losses.l1_loss(jnp.array([1.0, -1.0]), jnp.array([0.5, 0.0]))) == 0.75


def test_self_representation_loss_known_value():
  # One pixel, two channels: p = softmax(ae), q = softmax(gen); mean over the 2 elements.
  ae = jnp.array([[[[0.0, math.log(3.0)]]]])       # p = (1/4, 3/4)
  gen = jnp.array([[[[0.0, 0.0]]]])                # q = (1/2, 1/2)
  p = np.array([0.25, 0.75])
  expected = np.mean(p * (np.log(p) - np.log(0.5)))
  value = losses.self_representation_loss([gen], [ae])
  assert float(value) == pytest.approx(expected, rel=1e-6)
  assert float(losses.self_representation_loss([ae, gen], [ae, gen])) == pytest.approx(0, abs=1e-7)


def test_autoencoder_and_generator_loss_composition():
  zeros = jnp.zeros((1, 3, 3, 1))
  target = jnp.full((1, 4, 4, 1), 0.5)
  recon = jnp.zeros((1, 4, 4, 1))
  total, terms = losses.autoencoder_loss(zeros, zeros, zeros, recon, target)
  ln2 = math.log(2)
  assert float(terms['loss_D_fake']) == pytest.approx(2 * ln2, rel=1e-6)
  assert float(terms['loss_AE_L1']) == pytest.approx(50.0)
  assert float(total) == pytest.approx((ln2 + ln2) * 0.5 + 50.0, rel=1e-6)
  feats = [jnp.zeros((1, 2, 2, 3))]
  total, terms = losses.generator_loss(zeros, recon, target, feats, feats, sr_weight=0.1)
  assert float(terms['loss_G_SR']) == pytest.approx(0.0, abs=1e-7)
  assert float(total) == pytest.approx(ln2 + 50.0, rel=1e-6)
