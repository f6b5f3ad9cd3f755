r"""The offline demo: phantom BraTS-like data, a small AE-GAN, CPU-sized.

  python launch.py --config=configs/demo.py --workdir=runs/demo

It generates phantom subjects in <workdir>/raw, prepares them, trains, evaluates,
and writes sample grids and metric tables, in about 8 minutes on 2 CPU cores
(docs/demo.md gives the measured times and how the settings were chosen).
It differs from configs/brats.py in sizes, the optimisation budget and settings, and the norm.
"""
from configs import brats


def get_config(arg=None):
  config = brats.get_config(arg)
  config.data.phantom_subjects = 60         # made in <workdir>/raw when it is empty (~15 s)
  config.data.phantom_shape = (120, 120, 78)
  config.data.phantom_seed = 0
  config.data.image_size = 64
  config.data.slices = 'range:30:48'        # central axial slices
  config.data.split_ratios = (0.8, 0.05, 0.15)  # 48 / 3 / 9 subjects

  config.model.ngf = 16
  # Instance norm, an official option: with batch 4 it learns the anatomy much sooner
  # than batch norm does (docs/demo.md).
  config.model.norm = 'instance'

  config.optim.learning_rate = 1e-3         # 10x the official rate: few steps to spend
  config.optim.lr_constant_steps = 750      # then linear decay to 0 (official 'linear' policy)
  config.optim.lr_decay_steps = 450
  # Adam's second-moment decay 0.8 (official 0.999): the highest mean PSNR of the values
  # tried, 0.8 to 0.999 (docs/demo.md).
  config.optim.b2 = 0.8
  config.loss.sr_decay_every = 0

  config.train.global_batch_size = 4
  config.train.num_steps = 1200             # under 8 minutes in all in the slow hours of the 2-core CPUs
  config.train.num_epochs = 0
  config.train.log_every = 100
  config.train.checkpoint_every = 1000
  config.train.sample_every = 1000
  return config
