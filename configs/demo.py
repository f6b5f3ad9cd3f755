r"""The offline demo: phantom BraTS-like data, a small AE-GAN, CPU-sized.

  python launch.py --config=configs/demo.py --workdir=runs/demo

It generates phantom subjects in <workdir>/raw, prepares them, trains, evaluates,
and writes sample grids and metric tables, in under 10 minutes on 2 CPU cores.
"""
from configs import brats


def get_config(arg=None):
  config = brats.get_config(arg)
  config.data.phantom_subjects = 10         # made in <workdir>/raw when it is empty
  config.data.phantom_shape = (120, 120, 78)
  config.data.phantom_seed = 0
  config.data.image_size = 64
  config.data.slices = 'range:30:48'        # central axial slices
  config.data.split_ratios = (0.7, 0.1, 0.2)

  config.model.ngf = 16

  config.optim.learning_rate = 1e-3         # 10x the official rate: few steps to spend
  config.loss.sr_decay_every = 0

  config.train.global_batch_size = 4
  config.train.num_steps = 1600
  config.train.num_epochs = 0
  config.train.log_every = 100
  config.train.checkpoint_every = 500
  config.train.sample_every = 500
  return config
