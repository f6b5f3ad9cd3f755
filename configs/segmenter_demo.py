r"""The demo's tumour segmenter: a small 2D U-Net on the demo's phantom data, CPU-sized.

  python launch.py --config=configs/segmenter_demo.py --workdir=runs/seg
  python launch.py --config=configs/demo.py --workdir=runs/demo --mode=evaluate \
      --config.eval.segmenter_workdir=runs/seg     # adds `downstream` to the metrics

It makes the demo's phantom subjects in <workdir>/raw (the same subjects and split as
configs/demo.py), trains on the real sequences and labels of the train split, and
scores WT, TC and ET Dice on the test split, in under 5 minutes on 2 CPU cores.
For BraTS, set --config.data.raw_dir and the data fields of the synthesis run
(docs/evaluation.md, "Downstream").
"""
import ml_collections

from configs import demo


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.task = 'segmenter'                 # launch.py runs aegan_jax.segmenter_job

  # The demo's data group as it is: same phantom, preparation and subject split, so the
  # demo's test subjects are never trained on.
  config.data = demo.get_config(arg).data

  config.model = ml_collections.ConfigDict()  # aegan_jax.segmenter.UNet's fields
  config.model.features = 8                 # first level's channels, doubling per level
  config.model.levels = 3                   # stride-2 downsamplings: 64 px -> 8 px
  # Batch norm: with instance norm the Dice loss fell about half as fast in the first
  # 300 steps (docs/evaluation.md, "Downstream").
  config.model.norm = 'batch'
  config.model.dtype = 'float32'
  config.model.param_dtype = 'float32'

  config.loss = ml_collections.ConfigDict()
  config.loss.bce_weight = 0.1              # loss: soft Dice + this x binary cross-entropy

  config.optim = ml_collections.ConfigDict()  # train.make_optimizer's keywords
  config.optim.learning_rate = 5e-3
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.lr_constant_steps = 200      # then linear decay to 0
  config.optim.lr_decay_steps = 200

  config.train = ml_collections.ConfigDict()
  config.train.global_batch_size = 16
  config.train.num_steps = 400
  config.train.num_epochs = 0               # unused while num_steps > 0
  config.train.seed = 0
  config.train.log_every = 100
  config.train.checkpoint_every = 200
  config.train.keep_checkpoints = 2
  config.train.evaluate_at_end = True       # Dice on the test split, every modality real
  return config
