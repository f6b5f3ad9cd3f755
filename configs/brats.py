r"""AE-GAN on BraTS with the official hyperparameters (options/brats.yaml).

  python launch.py --config=configs/brats.py --workdir=runs/brats \
      --config.data.raw_dir=/data/MICCAI_BraTS2020_TrainingData

Any field can be overridden the same way, e.g. --config.train.num_steps=1000.
"""
import ml_collections


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.task = 'synthesis'                # synthesis (AE-GAN) | segmenter (configs/segmenter_demo.py)

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'brats'            # brats | isles2015 | generic (data_prep layouts)
  config.data.raw_dir = ''                 # raw NIfTI tree; prepared on first launch if needed
  config.data.phantom_subjects = 0         # > 0: generate phantom subjects in raw_dir if empty
  config.data.phantom_shape = (240, 240, 155)
  config.data.phantom_seed = 0
  config.data.phantom_anatomy = 'ellipsoids'  # ellipsoids | icbm152 (real cortex; needs nilearn)
  config.data.prepared_dir = ''            # default: <workdir>/prepared
  config.data.modalities = ('t1', 't1ce', 't2', 'flair')  # generic: any names, any count
  config.data.image_size = 256             # official crop_size
  config.data.normalise = 'max'            # official: volume / max * 2 - 1
  config.data.slices = 'official'          # official: axial slice 78 only
  config.data.geometry = 'resize'          # official: bilinear resize to image_size
  config.data.split_ratios = (0.8, 0.1, 0.1)
  config.data.split_seed = 0
  config.data.targets = ()                 # the modalities a scenario may synthesise (): all
  config.data.scenarios = 'single'         # single: all other modalities in (the paper) |
                                           # any: every non-empty set of them, uniformly |
                                           # curriculum: all others first, then fewer (MM-GAN)
  config.data.curriculum_stage_examples = 20000  # curriculum: examples before one input fewer
  config.data.input_count_ratio = 0.0     # any: examples with k inputs get a share
                                           # proportional to ratio**k; 0: uniform over cells
  config.data.flip = False                 # augmentations off, as in the official BraTS setup
  config.data.random_crop = False
  config.data.worker_count = 0             # grain worker processes (0: in the main process)

  config.model = ml_collections.ConfigDict()
  config.model.generator = 'official'      # official: one encoder per input branch (the paper) |
                                           # any: one encoder per slot, any set of inputs
  config.model.ngf = 64
  config.model.num_blocks = 6
  config.model.norm = 'batch'              # batch (official) | instance
  config.model.use_dropout = True          # dropout 0.5 in the ResNet blocks (official)
  config.model.dtype = 'float32'           # compute dtype
  config.model.param_dtype = 'float32'

  config.loss = ml_collections.ConfigDict()
  config.loss.gan_mode = 'vanilla'         # vanilla (BCE, official) | lsgan
  config.loss.lambda_l1 = 100.0            # generator L1 weight
  config.loss.ae_lambda_l1 = 100.0         # autoencoder reconstruction L1 weight
  config.loss.sr_weight = 0.1              # self-representation KL weight
  config.loss.sr_decay_factor = 0.05       # official: sr_weight *= 0.05 ...
  config.loss.sr_decay_every = 5000        # ... every 5000 iterations (0: never)

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-4
  config.optim.b1 = 0.5
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8                  # Adam epsilon (torch default, official)
  config.optim.lr_constant_steps = 0       # official 'linear' policy: constant for this many
  config.optim.lr_decay_steps = 0          # steps, then linear decay to 0 (0: constant lr)

  config.train = ml_collections.ConfigDict()
  config.train.global_batch_size = 1       # official batch_size; split over all devices
  config.train.num_steps = 0               # total iterations; 0: use num_epochs
  config.train.num_epochs = 300            # official n_epochs, over the prepared train split
  config.train.seed = 0
  config.train.log_every = 100             # official print_freq
  config.train.checkpoint_every = 5000     # official save_latest_freq
  config.train.keep_checkpoints = 3
  config.train.sample_every = 1000         # PNG sample grids in <workdir>/samples
  config.train.evaluate_at_end = True

  config.eval = ml_collections.ConfigDict()
  # False: eval mode (BatchNorm running statistics, no dropout; deterministic).  True: each
  # test slice in train mode alone, dropout on, as the official test.py runs it.
  config.eval.official_test_mode = False
  # A segmenter run's workdir (configs/segmenter_demo.py): metrics.json and metrics.md then
  # gain `downstream`, the tumour-segmentation Dice with the target real, synthesized,
  # copied or zeroed (docs/evaluation.md).  '': none.
  config.eval.segmenter_workdir = ''
  return config
