r"""AE-GAN on ISLES2015 SISS (T1, T2, FLAIR, DWI), official hyperparameters otherwise.

  python launch.py --config=configs/isles2015.py --workdir=runs/isles2015 \
      --config.data.raw_dir=/data/ISLES2015/SISS2015_Training

The official ISLES setup uses the same networks, losses and optimizer as BraTS;
only the modalities and the data differ.
"""
from configs import brats


def get_config(arg=None):
  config = brats.get_config(arg)
  config.data.dataset = 'isles2015'
  config.data.modalities = ('t1', 't2', 'flair', 'dwi')
  config.data.slices = 'nonempty:0.1'  # ISLES volumes are small (153 slices, 230x230): use
                                       # every slice with brain, not one fixed index
  return config
