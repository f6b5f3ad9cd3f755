"""Small builders shared by tests."""
import numpy as np

from configs import brats

SIZE = 32


def tiny_train_config():
  config = brats.get_config()
  config.model.ngf = 8
  config.model.num_blocks = 2
  return config


def tiny_image_batch(seed=0, n=4, binary=False):
  """A batch as the data pipeline yields it: all modalities plus the sampled target.

  `binary` images are -1 or 1: tanh outputs never tie with them, so the L1 gradient
  sign(y_hat - y) cannot flip on rounding noise.
  """
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, SIZE, SIZE, 4))
  images = np.sign(images) if binary else np.tanh(images)
  return {'images': images.astype(np.float32),
          'target_index': (np.arange(n) + seed) % 4}
