"""Official AE-GAN (PyTorch) state dicts -> our networks' variables, and their import.

`read_state_dict` reads `.npz` files holding the official tensor names (optionally
prefixed `G/` or `AE/`, as in the shared parity fixture) or PyTorch `.pth` files, read
with `torch.load(weights_only=True)` when torch >= 2.6 is installed.  `load_generator` and
`load_autoencoder` read the architecture off the tensors and convert names and layouts.
`import_weights` writes the weights as step 0 of an Orbax checkpoint (config.model set
from the weights), which `aegan_jax.evaluate` and `aegan_jax.synthesize` restore.
"""
from __future__ import annotations

import pathlib
import re
import runpy
from typing import Iterator

import ml_collections
import numpy as np

from aegan_jax import workdir_lock
from data_prep import files

# --------------------------------------------------------------------------
# Reading state dicts.


class WeightImportError(ValueError):
  """A state dict that does not fit the official architecture (one-line message)."""


def read_state_dict(path, prefix: str = '') -> dict[str, np.ndarray]:
  """Name -> float32 array.  With `prefix` ('G/' or 'AE/'), keeps only those keys, stripped.

  A file without any `prefix` key is taken as that network's own state dict.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise WeightImportError(f'{path}: no such file')
  if path.suffix == '.npz':
    with open(path, 'rb') as f:
      if f.read(4) != b'PK\x03\x04':  # every .npz is a zip archive
        raise WeightImportError(f'{path}: not a weights file (not an .npz archive)')
    with np.load(path, allow_pickle=False) as data:
      tensors = {k: data[k] for k in data.files}
  elif path.suffix in ('.pth', '.pt'):
    tensors = _read_torch(path)
  else:
    raise WeightImportError(f'{path}: expected a .npz or .pth state dict')
  if prefix and any(k.startswith(prefix) for k in tensors):
    tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  # DataParallel checkpoints prefix every name with 'module.'.
  tensors = {k.removeprefix('module.'): v for k, v in tensors.items()}
  return tensors


# torch.load(weights_only=True) can be made to run code before 2.6 (CVE-2025-32434).
SAFE_TORCH = (2, 6)


def _torch_version(torch) -> tuple[int, ...]:
  return tuple(int(part) for part in re.findall(r'\d+', torch.__version__)[:2])


def _read_torch(path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top  # torch is optional and slow to import
  except ModuleNotFoundError as e:
    raise WeightImportError(f'{path}: reading .pth needs torch (pip install torch), '
                            'or convert it to .npz') from e
  if _torch_version(torch) < SAFE_TORCH:
    raise WeightImportError(f'{path}: torch {torch.__version__} is installed, whose weights_only '
                            'loading can be bypassed to run code (CVE-2025-32434); install torch '
                            '>= 2.6 or convert the file to .npz')
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # Corrupt files, pickled objects.
    # torch's message advises loading without weights_only, which runs the file's code:
    # it is not passed on.
    raise WeightImportError(f'{path}: not a plain PyTorch state dict ({e.__class__.__name__}; '
                            'only tensors are read, never pickled objects)') from None
  if not isinstance(state, dict):
    raise WeightImportError(f'{path}: holds a {type(state).__name__}, not a state dict')
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


# --------------------------------------------------------------------------
# Name and layout mapping.  Each entry: (torch module prefix, our path, kind).


def _branch_encoder_entries(torch_convs, torch_norms, ours):
  names = (('conv_in', 'norm_in'), ('down_0', 'norm_down_0'), ('down_1', 'norm_down_1'))
  for (conv_t, norm_t), (conv_o, norm_o) in zip(zip(torch_convs, torch_norms), names):
    yield conv_t, ours + (conv_o,), 'conv'
    yield norm_t, ours + (norm_o,), 'norm'


def _resnet_block_entries(torch_prefix, ours, dropout: bool):
  second = 6 if dropout else 5  # nn.Dropout shifts the second conv's index.
  yield f'{torch_prefix}.conv_block.1', ours + ('conv_0',), 'conv'
  yield f'{torch_prefix}.conv_block.2', ours + ('norm_0',), 'norm'
  yield f'{torch_prefix}.conv_block.{second}', ours + ('conv_1',), 'conv'
  yield f'{torch_prefix}.conv_block.{second + 1}', ours + ('norm_1',), 'norm'


def generator_entries(num_branches, num_blocks, dropout) -> Iterator[tuple]:
  for i in range(num_branches):
    yield from _branch_encoder_entries(
        (f'encoder_{i}_0.1', f'encoder_{i}_1.0', f'encoder_{i}_2.0'),
        (f'encoder_{i}_0.2', f'encoder_{i}_1.1', f'encoder_{i}_2.1'), (f'encoder_{i}',))
  yield 'dim_reduce_conv', ('fuse',), 'conv'
  for j in range(num_blocks):
    yield from _resnet_block_entries(f'res_blocks.{j}', (f'blocks_{j}',), dropout)
  for s in range(2):
    yield f'decoder_{s}.0', (f'decoder_{s}', 'up'), 'upconv'
    yield f'decoder_{s}.1', (f'decoder_{s}', 'norm'), 'norm'
    yield f'decoder_{s}.3.fc.0', (f'decoder_{s}', 'attention', 'squeeze'), 'dense'
    yield f'decoder_{s}.3.fc.2', (f'decoder_{s}', 'attention', 'excite'), 'dense'
  yield 'decoder_final.1', ('output', 'conv'), 'conv'


def autoencoder_entries(num_blocks, dropout) -> Iterator[tuple]:
  yield from _branch_encoder_entries(('encoder.1', 'encoder.4', 'encoder.7'),
                                     ('encoder.2', 'encoder.5', 'encoder.8'), ('encoder',))
  for j in range(num_blocks):
    yield from _resnet_block_entries(f'encoder.{10 + j}', (f'blocks_{j}',), dropout)
  yield 'Dis.0', ('head', 'conv'), 'conv'
  yield 'Dis.1', ('head', 'norm'), 'norm'
  yield 'patch_branch', ('head', 'patch'), 'conv'
  yield 'cls_branch', ('head', 'classes'), 'conv'
  for s in range(2):
    yield f'decoder_{s}.0', (f'decoder_{s}', 'up'), 'upconv'
    yield f'decoder_{s}.1', (f'decoder_{s}', 'norm'), 'norm'
  yield 'decoder_final.1', ('output', 'conv'), 'conv'


def _convert(kind, tensors, prefix):
  """Our leaves (params, batch_stats) for one torch module, layouts converted."""
  get = lambda name: tensors.get(f'{prefix}.{name}')
  weight, bias = get('weight'), get('bias')
  params, stats = {}, {}
  if kind == 'conv':      # OIHW -> HWIO
    params['kernel'] = weight.transpose(2, 3, 1, 0)
  elif kind == 'upconv':  # ConvTranspose IOHW -> [kh, kw, in, out]
    params['kernel'] = weight.transpose(2, 3, 0, 1)
  elif kind == 'dense':   # Linear [out, in] -> [in, out]
    params['kernel'] = weight.T
  elif kind == 'norm':
    params['scale'] = weight
    stats = {'mean': get('running_mean'), 'var': get('running_var')}
  if bias is not None:
    params['bias'] = bias
  return params, stats


def _set(tree, path, leaves):
  node = tree
  for key in path:
    node = node.setdefault(key, {})
  node.update({k: np.asarray(v, np.float32) for k, v in leaves.items()})


def convert_state_dict(tensors, entries):
  """Official state dict -> (params, batch_stats) nested dicts."""
  params, stats = {}, {}
  used = set()
  for prefix, path, kind in entries:
    if f'{prefix}.weight' not in tensors:
      if kind == 'dense':  # Zero-width attention layers have no parameters here.
        continue
      raise WeightImportError(f'missing tensor {prefix}.weight: not an official AE-GAN state dict '
                              'for this architecture')
    if kind == 'dense' and tensors[f'{prefix}.weight'].size == 0:
      used.add(f'{prefix}.weight')
      continue
    try:
      p, s = _convert(kind, tensors, prefix)
    except ValueError:
      shape = tensors[f'{prefix}.weight'].shape
      raise WeightImportError(f'tensor {prefix}.weight has shape {shape}, which does not fit a '
                              f'{kind} layer of the official architecture') from None
    _set(params, path, p)
    if s:
      _set(stats, path, s)
    used.update(k for k in tensors if k.startswith(prefix + '.') and
                k[len(prefix) + 1:] in ('weight', 'bias', 'running_mean', 'running_var',
                                        'num_batches_tracked'))
  unused = sorted(set(tensors) - used)
  if unused:
    raise WeightImportError(f'unexpected tensors {unused[:3]}...: not an official AE-GAN state '
                            'dict for this architecture')
  return params, stats


def generator_hparams(tensors):
  """Architecture read off a generator state dict."""
  num_branches = len({k.split('_')[1] for k in tensors if k.startswith('encoder_')})
  if num_branches == 0 or 'encoder_0_0.1.weight' not in tensors:
    raise WeightImportError('not an official AE-GAN generator state dict (no encoder_0_0.1.weight)')
  first = tensors['encoder_0_0.1.weight']
  num_modalities = first.shape[1] - 1
  if num_modalities != num_branches + 1:
    raise WeightImportError(f'generator has {num_branches} branches of {first.shape[1]} channels: '
                            'expected one branch per input modality')
  blocks = {k.split('.')[1] for k in tensors if k.startswith('res_blocks.')}
  return dict(num_modalities=num_modalities, ngf=int(first.shape[0]), num_blocks=len(blocks),
              use_dropout='res_blocks.0.conv_block.7.weight' in tensors)


def autoencoder_hparams(tensors):
  if 'encoder.1.weight' not in tensors or 'cls_branch.weight' not in tensors:
    raise WeightImportError('not an official AE-GAN autoencoder state dict (no encoder.1.weight '
                            'or cls_branch.weight)')
  blocks = {k.split('.')[1] for k in tensors
            if k.startswith('encoder.') and '.conv_block.' in k}
  return dict(num_classes=int(tensors['cls_branch.weight'].shape[0]),
              ngf=int(tensors['encoder.1.weight'].shape[0]), num_blocks=len(blocks),
              use_dropout='encoder.10.conv_block.7.weight' in tensors)


def load_generator(tensors):
  """(SynthesisGenerator, variables) from an official generator state dict."""
  from aegan_jax import models  # pylint: disable=g-import-not-at-top
  hp = generator_hparams(tensors)
  params, stats = convert_state_dict(
      tensors, generator_entries(hp['num_modalities'] - 1, hp['num_blocks'], hp['use_dropout']))
  return models.SynthesisGenerator(**hp), {'params': params, 'batch_stats': stats}


def load_autoencoder(tensors):
  from aegan_jax import models  # pylint: disable=g-import-not-at-top
  hp = autoencoder_hparams(tensors)
  params, stats = convert_state_dict(tensors, autoencoder_entries(hp['num_blocks'],
                                                                  hp['use_dropout']))
  return models.AutoEncoder(**hp), {'params': params, 'batch_stats': stats}


# --------------------------------------------------------------------------
# Import into an Orbax checkpoint that evaluation and synthesis restore.


def load_config_file(path):
  """`get_config()` of a config file such as configs/brats.py; one-line errors when the
  file does not run or returns no config."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightImportError(f'{path}: no such config file')
  try:
    namespace = runpy.run_path(str(path))
    if 'get_config' not in namespace:
      raise WeightImportError(f'{path}: defines no get_config()')
    config = namespace['get_config']()
  except SyntaxError as e:
    raise WeightImportError(f'{path}:{e.lineno}: syntax error ({e.msg})') from None
  except WeightImportError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # Any error in the user's file.
    raise WeightImportError(f'{path}: get_config() failed ({type(e).__name__}: {e})') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise WeightImportError(f'{path}: get_config() returned {type(config).__name__}, not a '
                            'ConfigDict (a missing return statement?)')
  return config


def _read_network(path, prefix):
  try:
    return read_state_dict(path, prefix)
  except WeightImportError:
    raise
  except Exception as e:  # Corrupt archives: BadZipFile, OSError, ValueError, ...
    raise WeightImportError(f'{path}: not a readable state dict '
                            f'({e.__class__.__name__}: {e})') from e


def _norm_of(tensors, first_norm):
  """'batch' when the first norm layer carries running statistics (the official BraTS nets)."""
  if f'{first_norm}.running_mean' in tensors:
    return 'batch'
  raise WeightImportError(f'no {first_norm}.running_mean: only BatchNorm networks (the official '
                          'norm: batch) can be imported')


def configure_from_weights(config, g_tensors, ae_tensors=None):
  """Sets config.model from the weights' architecture; raises WeightImportError on conflicts."""
  hp = generator_hparams(g_tensors)
  modalities = list(config.data.modalities)
  if hp['num_modalities'] != len(modalities):
    raise WeightImportError(f'the generator synthesises from {hp["num_modalities"] - 1} of '
                            f'{hp["num_modalities"]} modalities, but config data.modalities is '
                            f'{modalities}')
  config.model.generator = 'official'  # the weights are the official multi-branch generator
  config.model.ngf, config.model.num_blocks = hp['ngf'], hp['num_blocks']
  config.model.use_dropout = hp['use_dropout']
  config.model.norm = _norm_of(g_tensors, 'encoder_0_0.2')
  if ae_tensors is None:
    return config
  ae_hp = autoencoder_hparams(ae_tensors)
  for name in ('ngf', 'num_blocks', 'use_dropout'):
    if ae_hp[name] != hp[name]:
      raise WeightImportError(f'autoencoder {name}={ae_hp[name]} differs from the generator\'s '
                              f'{hp[name]}; both networks share config.model')
  if ae_hp['num_classes'] != len(modalities):
    raise WeightImportError(f'autoencoder classifies {ae_hp["num_classes"]} modalities, config has '
                            f'{len(modalities)}')
  _norm_of(ae_tensors, 'encoder.2')
  # The modality classifier's kernel spans the whole H/4 x W/4 map: it fixes the image size.
  image_size = 4 * int(ae_tensors['cls_branch.weight'].shape[-1])
  if image_size != config.data.image_size:
    raise WeightImportError(f'the autoencoder was built for {image_size} px images (cls_branch '
                            f'kernel {image_size // 4}), but config data.image_size is '
                            f'{config.data.image_size}')
  return config


def generator_input_channels(generator) -> int:
  from aegan_jax import modalities  # pylint: disable=g-import-not-at-top
  return modalities.generator_input_channels(generator.num_modalities)


def check_weights(module, variables, input_shape, network: str) -> None:
  """Before anything is written: every tensor has the architecture's shape and finite values."""
  from aegan_jax import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    checkpoints.check_variables(module, variables, input_shape, network)
  except checkpoints.CheckpointError as e:
    raise WeightImportError(str(e)) from None


def _check_target(workdir, step) -> None:
  """Before any weights are read: a valid step and a workdir that can hold checkpoints."""
  from aegan_jax import checkpoints  # pylint: disable=g-import-not-at-top  # imports jax
  if step < 0:
    raise WeightImportError(f'--step {step}: must be >= 0 (checkpoints are numbered from 0)')
  try:
    files.check_writable(workdir)
  except OSError as e:
    raise WeightImportError(f'--workdir {workdir}: cannot write there ({e.strerror or e})') \
        from None
  existing = checkpoints.checkpoint_dir(workdir)
  if existing.is_dir() and any(p.name.isdigit() for p in existing.iterdir()):
    raise WeightImportError(f'{existing} already holds checkpoints; import into a new --workdir')


def _save_locked(workdir, step, config, g_vars, ae_vars) -> None:
  """Writes the checkpoint while holding the workdir's run.lock (no training writes there)."""
  from aegan_jax import checkpoints  # pylint: disable=g-import-not-at-top  # imports jax
  try:
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    lock = workdir_lock.acquire(workdir)
  except (OSError, workdir_lock.WorkdirLocked) as e:
    raise WeightImportError(str(e) if isinstance(e, ValueError) else
                            f'--workdir {workdir}: {e.strerror or e}') from None
  try:
    _check_target(workdir, step)  # Again, now that no run can start there.
    checkpoints.save_networks(workdir, step, config, g_vars, ae_vars)
  except checkpoints.CheckpointError as e:
    raise WeightImportError(str(e)) from None
  finally:
    workdir_lock.release(lock)


def import_weights(generator_path, config, workdir, autoencoder_path=None, step=0):
  """Official weights -> `<workdir>/checkpoints/<step>`; returns the config it stores.

  The workdir must not hold checkpoints yet (a fresh run folder).
  """
  _check_target(workdir, step)
  g_tensors = _read_network(generator_path, 'G/')
  ae_tensors = _read_network(autoencoder_path, 'AE/') if autoencoder_path else None
  config = configure_from_weights(config, g_tensors, ae_tensors)
  generator, g_vars = load_generator(g_tensors)
  size = config.data.image_size
  check_weights(generator, g_vars, (1, size, size, generator_input_channels(generator)),
                'generator')
  ae_vars = None
  if ae_tensors is not None:
    autoencoder, ae_vars = load_autoencoder(ae_tensors)
    check_weights(autoencoder, ae_vars, (1, size, size, 1), 'autoencoder')
  _save_locked(workdir, step, config, g_vars, ae_vars)
  return config
