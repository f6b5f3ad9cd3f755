"""Small builders shared by tests."""
import numpy as np

from configs import brats

SIZE = 32


def tiny_train_config():
  config = brats.get_config()
  config.model.ngf = 8
  config.model.num_blocks = 2
  return config


def phantom_image_batch(size=SIZE, n=4, seed=0):
  """Realistic continuous slices: n axial phantom slices at size x size, all modalities.

  Each slice comes from its own phantom subject, normalised like prepared data
  (official max normalisation, background -1); targets cycle over modalities.
  """
  from data_prep import phantom, preprocess
  rng = np.random.default_rng(seed)
  slices = []
  for _ in range(n):
    subject = phantom.make_subject(rng, shape=(size, size, 16))
    slices.append(np.stack(
        [preprocess.volume_to_slices(preprocess.normalise_volume(subject['volumes'][m])[0], [8],
                                     image_size=size)[0] for m in phantom.MODALITIES], -1))
  return {'images': np.stack(slices).astype(np.float32),
          'target_index': (np.arange(n) + seed) % 4}
