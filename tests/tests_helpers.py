"""Small builders shared by tests."""
import numpy as np

from configs import brats

SIZE = 32


def tiny_train_config():
  config = brats.get_config()
  config.model.ngf = 8
  config.model.num_blocks = 2
  return config


def tiny_image_batch(seed=0, n=4):
  """A batch as the data pipeline yields it: all modalities plus the sampled target."""
  rng = np.random.default_rng(seed)
  return {'images': np.tanh(rng.normal(size=(n, SIZE, SIZE, 4))).astype(np.float32),
          'target_index': (np.arange(n) + seed) % 4}
