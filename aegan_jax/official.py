"""Official AE-GAN (PyTorch) weights: import and a parity check.

    python -m aegan_jax.official check FIXTURE.npz
    python -m aegan_jax.official import --generator G.pth [--autoencoder AE.pth] \\
        --config configs/brats.py --workdir DIR

`check` runs our networks on an exported fixture's inputs (eval mode, and BatchNorm in
training mode for the `trainbn_*` keys) and compares every stored output,
feature summary, loss and gradient norm; it exits 1 above tolerance.  `import`
writes the weights as step 0 of an Orbax checkpoint (config.model set from the
weights), which `aegan_jax.evaluate` and `aegan_jax.synthesize` restore.

State dicts come as `.npz` files holding the official tensor names (optionally
prefixed `G/` or `AE/`, as in the shared fixture) or as PyTorch `.pth` files,
read with `torch.load(weights_only=True)` when torch is installed.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Iterator

import numpy as np

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


def _read_torch(path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    raise WeightImportError(f'{path}: reading .pth needs torch (pip install torch), '
                       'or convert it to .npz') from e
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # Corrupt files and pickled objects both end here.
    raise WeightImportError(f'{path}: not a plain PyTorch state dict ({e.__class__.__name__}: {e})') from e
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
      raise WeightImportError(f'tensor {prefix}.weight has shape {tensors[f"{prefix}.weight"].shape}, '
                         f'which does not fit a {kind} layer of the official architecture') from None
    _set(params, path, p)
    if s:
      _set(stats, path, s)
    used.update(k for k in tensors if k.startswith(prefix + '.') and
                k[len(prefix) + 1:] in ('weight', 'bias', 'running_mean', 'running_var',
                                        'num_batches_tracked'))
  unused = sorted(set(tensors) - used)
  if unused:
    raise WeightImportError(f'unexpected tensors {unused[:3]}...: not an official AE-GAN state dict '
                       'for this architecture')
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
# Parity check against an exported fixture.

TOLERANCE = 1e-4  # Max abs error relative to each reference tensor's largest magnitude.
# Gradient norms get a looser bound: d|x - y|/dx = sign(x - y) jumps at near-ties, so a 1e-6
# change in the forward pass flips a few pixels' signs.  Even a float64 evaluation of the
# same weights differs from the float32 reference by up to 5e-4 in the first layers.
GRADIENT_TOLERANCE = 2e-3


def _nchw(x):
  return np.asarray(x, np.float32).transpose(0, 3, 1, 2)


def _summaries(name, tensor):
  """The fixture's per-tensor summaries (float64 statistics of the float32 map)."""
  t = np.asarray(tensor, np.float64)
  yield f'{name}_mean_nc', t.mean(axis=(2, 3))
  yield f'{name}_std_nc', t.std(axis=(2, 3))
  yield f'{name}_min_nc', t.min(axis=(2, 3))
  yield f'{name}_max_nc', t.max(axis=(2, 3))
  yield f'{name}_sum', t.sum()
  yield f'{name}_sumsq', np.square(t).sum()


def _feature_views(name, feature, fixture):
  """Full-map summaries plus the stored strided grid and corner crops."""
  yield f'{name}_shape', np.array(feature.shape)
  stride_keys = [k for k in fixture.files if k.startswith(f'{name}_stride')]
  for key in stride_keys:
    s = int(key[len(f'{name}_stride'):])
    yield key, feature[:, :, ::s, ::s]
  yield f'{name}_crop16', feature[:, :, :16, :16]
  yield f'{name}_crop8_br', feature[:, :, -8:, -8:]
  yield from _summaries(name, feature)


def _eval_outputs(generator, g_vars, autoencoder, ae_vars, fixture):
  """Everything the fixture stores for eval mode, keyed as in the fixture."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from aegan_jax import losses  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(fixture['input_A'].transpose(0, 2, 3, 1))
  y = jnp.asarray(fixture['input_B'].transpose(0, 2, 3, 1))
  synth, g_feats = generator.apply(g_vars, x, train=False, return_features=True)
  ae = autoencoder.apply(ae_vars, y, train=False)
  patch = lambda img: autoencoder.apply(ae_vars, img, train=False, method='patch_logits')
  out = {'G_out': _nchw(synth), 'AE_out': _nchw(ae.reconstruction),
         'AE_patch_logits': _nchw(ae.patch_logits), 'AE_cls_logits': np.asarray(ae.class_logits)}
  for name, feats in (('G_decoder_feat', g_feats), ('AE_feat', ae.features)):
    for i, f in enumerate(feats):
      out.update(_feature_views(f'{name}_{i}', _nchw(f), fixture))
  out.update(_summaries('G_out', out['G_out']))
  out.update(_summaries('AE_out', out['AE_out']))
  _, d_terms = losses.autoencoder_loss(ae.patch_logits, patch(synth), patch(ae.reconstruction),
                                       ae.reconstruction, y,
                                       l1_weight=float(fixture['ae_lambda_L1']))
  synth_logits = patch(synth)
  _, g_terms = losses.generator_loss(synth_logits, synth, y, g_feats, ae.features,
                                     sr_weight=float(fixture['sr_weight']),
                                     l1_weight=float(fixture['lambda_L1']))
  out.update({k: np.asarray(v) for k, v in {**d_terms, **g_terms}.items()})
  return out


def _train_bn_outputs(generator, g_vars, autoencoder, ae_vars, fixture):
  """`trainbn_*` keys: BatchNorm on batch statistics, dropout off, no update."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from aegan_jax import losses  # pylint: disable=g-import-not-at-top
  generator = generator.clone(use_dropout=False)
  autoencoder = autoencoder.clone(use_dropout=False)
  x = jnp.asarray(fixture['input_A'].transpose(0, 2, 3, 1))
  y = jnp.asarray(fixture['input_B'].transpose(0, 2, 3, 1))
  (synth, g_feats), _ = generator.apply(g_vars, x, train=True, return_features=True,
                                        mutable=['batch_stats'])
  ae_apply = lambda img: autoencoder.apply(ae_vars, img, train=True, mutable=['batch_stats'])[0]
  ae = ae_apply(y)
  synth_logits = ae_apply(synth).patch_logits
  out = {'G_out_stride8': _nchw(synth)[:, :, ::8, ::8],
         'AE_patch_logits': _nchw(ae.patch_logits), 'AE_cls_logits': np.asarray(ae.class_logits)}
  out.update(_summaries('G_out', _nchw(synth)))
  out.update(_summaries('AE_out', _nchw(ae.reconstruction)))
  _, d_terms = losses.autoencoder_loss(ae.patch_logits, synth_logits,
                                       ae_apply(ae.reconstruction).patch_logits,
                                       ae.reconstruction, y,
                                       l1_weight=float(fixture['ae_lambda_L1']))
  _, g_terms = losses.generator_loss(synth_logits, synth, y, g_feats, ae.features,
                                     sr_weight=float(fixture['sr_weight']),
                                     l1_weight=float(fixture['lambda_L1']))
  out.update({k: np.asarray(v) for k, v in {**d_terms, **g_terms}.items()})
  return {f'trainbn_{k}': v for k, v in out.items()}


def _gradient_norms(generator, g_vars, autoencoder, ae_vars, fixture, g_entries, ae_entries):
  """`gradnorm_*` keys: L2 norms of d loss_D / d AE params and d loss_G / d G params."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from aegan_jax import losses  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(fixture['input_A'].transpose(0, 2, 3, 1))
  y = jnp.asarray(fixture['input_B'].transpose(0, 2, 3, 1))
  stats_g, stats_ae = g_vars['batch_stats'], ae_vars['batch_stats']
  g_apply = lambda p: generator.apply({'params': p, 'batch_stats': stats_g}, x, train=False,
                                      return_features=True)
  ae_apply = lambda p, img, **kw: autoencoder.apply({'params': p, 'batch_stats': stats_ae}, img,
                                                    train=False, **kw)
  synth, g_feats = g_apply(g_vars['params'])

  def loss_d(p):
    # The fixture differentiates through the reconstruction fed to the fake pass; training
    # (official `backward_D`, and `train.py` here) detaches it.  Only these keys see the difference.
    ae = ae_apply(p, y)
    patch = lambda img: ae_apply(p, img, method='patch_logits')
    return losses.autoencoder_loss(ae.patch_logits, patch(synth), patch(ae.reconstruction),
                                   ae.reconstruction, y,
                                   l1_weight=float(fixture['ae_lambda_L1']))[0]

  ae_features = ae_apply(ae_vars['params'], y).features

  def loss_g(p):
    synth, feats = g_apply(p)
    logits = ae_apply(ae_vars['params'], synth, method='patch_logits')
    return losses.generator_loss(logits, synth, y, feats, ae_features,
                                 sr_weight=float(fixture['sr_weight']),
                                 l1_weight=float(fixture['lambda_L1']))[0]

  out = {}
  for tag, grads, entries in (('lossD/AE', jax.grad(loss_d)(ae_vars['params']), ae_entries),
                              ('lossG/G', jax.grad(loss_g)(g_vars['params']), g_entries)):
    for prefix, path, kind in entries:
      node = grads
      try:
        for key in path:
          node = node[key]
      except KeyError:  # Zero-width attention layers: an empty gradient.
        out[f'gradnorm_{tag}/{prefix}.weight'] = 0.0
        continue
      names = {'weight': 'scale' if kind == 'norm' else 'kernel', 'bias': 'bias'}
      for torch_name, ours in names.items():
        if ours in node:
          out[f'gradnorm_{tag}/{prefix}.{torch_name}'] = np.linalg.norm(
              np.asarray(node[ours], np.float64).ravel())
  return out


def compare(reference, actual):
  """(max abs error, error relative to the reference's largest magnitude)."""
  reference = np.asarray(reference, np.float64)
  actual = np.asarray(actual, np.float64)
  if reference.shape != actual.shape:
    return np.inf, np.inf
  if reference.size == 0:
    return 0.0, 0.0
  abs_err = float(np.max(np.abs(reference - actual)))
  scale = float(np.max(np.abs(reference)))
  return abs_err, abs_err / scale if scale > 0 else abs_err


def check(fixture_path, tolerance=TOLERANCE, gradient_tolerance=GRADIENT_TOLERANCE):
  """Rows (key, max abs error, relative error, ok) for every comparable fixture key."""
  if not pathlib.Path(fixture_path).is_file():
    raise WeightImportError(f'{fixture_path}: no such file')
  fixture = np.load(fixture_path, allow_pickle=False)
  g_tensors = read_state_dict(fixture_path, 'G/')
  ae_tensors = read_state_dict(fixture_path, 'AE/')
  generator, g_vars = load_generator(g_tensors)
  autoencoder, ae_vars = load_autoencoder(ae_tensors)
  g_hp, ae_hp = generator_hparams(g_tensors), autoencoder_hparams(ae_tensors)
  computed = _eval_outputs(generator, g_vars, autoencoder, ae_vars, fixture)
  computed.update(_train_bn_outputs(generator, g_vars, autoencoder, ae_vars, fixture))
  computed.update(_gradient_norms(
      generator, g_vars, autoencoder, ae_vars, fixture,
      list(generator_entries(g_hp['num_modalities'] - 1, g_hp['num_blocks'], g_hp['use_dropout'])),
      list(autoencoder_entries(ae_hp['num_blocks'], ae_hp['use_dropout']))))
  rows = []
  for key in fixture.files:
    if key.startswith(('G/', 'AE/')) or key in ('input_A', 'input_B', 'target_index', 'lambda_L1',
                                                 'ae_lambda_L1', 'sr_weight'):
      continue
    if key not in computed:
      rows.append((key, np.inf, np.inf, False))  # A stored output we cannot reproduce fails.
      continue
    abs_err, rel_err = compare(fixture[key], computed[key])
    bound = gradient_tolerance if key.startswith('gradnorm_') else tolerance
    rows.append((key, abs_err, rel_err, rel_err <= bound))
  return rows


def _print_rows(rows, verbose):
  groups = {}
  for row in rows:
    group = row[0].split('/')[0] + '/*' if row[0].startswith('gradnorm_') else row[0]
    groups.setdefault(group, []).append(row)
  print(f'{"key":46s} {"n":>4s} {"max abs err":>12s} {"rel err":>10s}  status')
  for group, members in groups.items():
    shown = members if verbose else [max(members, key=lambda r: r[2])]
    for key, abs_err, rel_err, _ in shown:
      name = key if verbose or len(members) == 1 else f'{group} (worst: {key.split("/", 1)[1]})'
      ok = all(r[3] for r in (members if not verbose else [r for r in members if r[0] == key]))
      print(f'{name[:46]:46s} {len(members) if not verbose else 1:4d} {abs_err:12.3e} '
            f'{rel_err:10.3e}  {"ok" if ok else "FAIL"}')


# --------------------------------------------------------------------------
# Import into an Orbax checkpoint that evaluation and synthesis restore.


def load_config_file(path):
  """`get_config()` of a config file such as configs/brats.py."""
  import runpy  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightImportError(f'{path}: no such config file')
  namespace = runpy.run_path(str(path))
  if 'get_config' not in namespace:
    raise WeightImportError(f'{path}: defines no get_config()')
  return namespace['get_config']()


def _read_network(path, prefix):
  try:
    return read_state_dict(path, prefix)
  except WeightImportError:
    raise
  except Exception as e:  # Corrupt archives: BadZipFile, OSError, ValueError, ...
    raise WeightImportError(f'{path}: not a readable state dict ({e.__class__.__name__}: {e})') from e


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


def import_weights(generator_path, config, workdir, autoencoder_path=None, step=0):
  """Official weights -> `<workdir>/checkpoints/<step>`; returns the config it stores.

  The workdir must not hold checkpoints yet (a fresh run folder).
  """
  from aegan_jax import checkpoints  # pylint: disable=g-import-not-at-top
  existing = checkpoints.checkpoint_dir(workdir)
  if existing.is_dir() and any(p.name.isdigit() for p in existing.iterdir()):
    raise WeightImportError(f'{existing} already holds checkpoints; import into a new --workdir')
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
  checkpoints.save_networks(workdir, step, config, g_vars, ae_vars)
  return config


def _import_command(args):
  config = load_config_file(args.config)
  config = import_weights(args.generator, config, args.workdir, args.autoencoder, args.step)
  m = config.model
  print(f'imported {"generator and autoencoder" if args.autoencoder else "generator"} '
        f'(ngf {m.ngf}, {m.num_blocks} blocks, dropout {m.use_dropout}, norm {m.norm}, '
        f'{config.data.image_size} px, modalities {list(config.data.modalities)}) into '
        f'{pathlib.Path(args.workdir) / "checkpoints"} step {args.step}')
  return 0


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m aegan_jax.official',
                                   description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  check_parser = sub.add_parser('check', help='compare our networks with an exported fixture')
  check_parser.add_argument('fixture', type=pathlib.Path)
  check_parser.add_argument('--tolerance', type=float, default=TOLERANCE)
  check_parser.add_argument('--gradient-tolerance', type=float, default=GRADIENT_TOLERANCE,
                            help='bound for the gradnorm_* keys (see GRADIENT_TOLERANCE)')
  check_parser.add_argument('--verbose', action='store_true', help='one row per key')
  import_parser = sub.add_parser('import', help='write official weights as an Orbax checkpoint')
  import_parser.add_argument('--generator', required=True, type=pathlib.Path,
                             help='G state dict (.pth, or .npz with or without G/ prefixes)')
  import_parser.add_argument('--autoencoder', type=pathlib.Path,
                             help='AE state dict (.pth, or .npz with or without AE/ prefixes)')
  import_parser.add_argument('--config', required=True, type=pathlib.Path,
                             help='config file, e.g. configs/brats.py (model fields are set '
                                  'from the weights)')
  import_parser.add_argument('--workdir', required=True, type=pathlib.Path)
  import_parser.add_argument('--step', type=int, default=0)
  args = parser.parse_args(argv)
  if args.command == 'import':
    try:
      return _import_command(args)
    except WeightImportError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
  if args.command == 'check':
    try:
      rows = check(args.fixture, args.tolerance, args.gradient_tolerance)
    except WeightImportError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    except (OSError, KeyError, ValueError) as e:  # Unreadable or incomplete fixture.
      print(f'error: {args.fixture}: {e}', file=sys.stderr)
      return 2
    _print_rows(rows, args.verbose)
    failed = [r for r in rows if not r[3]]
    worst = max(rows, key=lambda r: r[2])
    print(f'{len(rows) - len(failed)}/{len(rows)} keys within tolerance ({args.tolerance:g}; '
          f'gradient norms {args.gradient_tolerance:g}); worst {worst[0]}: {worst[2]:.2e}')
    return 1 if failed else 0
  return 2


if __name__ == '__main__':
  sys.exit(main())
