"""Parity with the official AE-GAN (PyTorch) code through an exported fixture.

`check` loads the fixture's official weights (`G/` and `AE/` keys) into our networks,
runs them on its inputs (eval mode, and BatchNorm in training mode for the `trainbn_*`
keys) and compares every stored output, feature summary, loss and gradient norm.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from aegan_jax import losses
from aegan_jax import weight_conversion

TOLERANCE = 1e-4  # Max abs error relative to each reference tensor's largest magnitude.
# Gradient norms get a looser bound: d|x - y|/dx = sign(x - y) jumps at near-ties, so a 1e-6
# change in the forward pass flips a few pixels' signs.  Even a float64 evaluation of the
# same weights differs from the float32 reference by up to 5e-4 in the first layers.
GRADIENT_TOLERANCE = 2e-3

# Fixture keys that are inputs or settings, not outputs to compare.
_INPUT_KEYS = ('input_A', 'input_B', 'target_index', 'lambda_L1', 'ae_lambda_L1', 'sr_weight')


def _nchw(x):
  return np.asarray(x, np.float32).transpose(0, 3, 1, 2)


def _inputs(fixture):
  """(generator input, real target image), NHWC, from the fixture's NCHW tensors."""
  return (jnp.asarray(fixture['input_A'].transpose(0, 2, 3, 1)),
          jnp.asarray(fixture['input_B'].transpose(0, 2, 3, 1)))


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


def _loss_terms(fixture, y, synth, g_feats, ae, synth_logits, recon_logits):
  """Every AE (D) and G loss term, keyed as in the fixture."""
  _, d_terms = losses.autoencoder_loss(ae.patch_logits, synth_logits, recon_logits,
                                       ae.reconstruction, y,
                                       l1_weight=float(fixture['ae_lambda_L1']))
  _, g_terms = losses.generator_loss(synth_logits, synth, y, g_feats, ae.features,
                                     sr_weight=float(fixture['sr_weight']),
                                     l1_weight=float(fixture['lambda_L1']))
  return {k: np.asarray(v) for k, v in {**d_terms, **g_terms}.items()}


def _eval_outputs(generator, g_vars, autoencoder, ae_vars, fixture):
  """Everything the fixture stores for eval mode, keyed as in the fixture."""
  x, y = _inputs(fixture)
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
  out.update(_loss_terms(fixture, y, synth, g_feats, ae, patch(synth), patch(ae.reconstruction)))
  return out


def _train_bn_outputs(generator, g_vars, autoencoder, ae_vars, fixture):
  """`trainbn_*` keys: BatchNorm on batch statistics, dropout off, no update."""
  generator = generator.clone(use_dropout=False)
  autoencoder = autoencoder.clone(use_dropout=False)
  x, y = _inputs(fixture)
  (synth, g_feats), _ = generator.apply(g_vars, x, train=True, return_features=True,
                                        mutable=['batch_stats'])
  ae_apply = lambda img: autoencoder.apply(ae_vars, img, train=True, mutable=['batch_stats'])[0]
  ae = ae_apply(y)
  synth_logits = ae_apply(synth).patch_logits
  out = {'G_out_stride8': _nchw(synth)[:, :, ::8, ::8],
         'AE_patch_logits': _nchw(ae.patch_logits), 'AE_cls_logits': np.asarray(ae.class_logits)}
  out.update(_summaries('G_out', _nchw(synth)))
  out.update(_summaries('AE_out', _nchw(ae.reconstruction)))
  out.update(_loss_terms(fixture, y, synth, g_feats, ae, synth_logits,
                         ae_apply(ae.reconstruction).patch_logits))
  return {f'trainbn_{k}': v for k, v in out.items()}


def _norms_by_torch_name(tag, grads, entries):
  """`gradnorm_<tag>/<torch tensor name>` -> L2 norm of our gradient for that tensor."""
  out = {}
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


def _gradient_norms(generator, g_vars, autoencoder, ae_vars, fixture, g_entries, ae_entries):
  """`gradnorm_*` keys: L2 norms of d loss_D / d AE params and d loss_G / d G params."""
  x, y = _inputs(fixture)
  stats_g, stats_ae = g_vars['batch_stats'], ae_vars['batch_stats']
  g_apply = lambda p: generator.apply({'params': p, 'batch_stats': stats_g}, x, train=False,
                                      return_features=True)
  ae_apply = lambda p, img, **kw: autoencoder.apply({'params': p, 'batch_stats': stats_ae}, img,
                                                    train=False, **kw)
  synth, _ = g_apply(g_vars['params'])

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

  return {**_norms_by_torch_name('lossD/AE', jax.grad(loss_d)(ae_vars['params']), ae_entries),
          **_norms_by_torch_name('lossG/G', jax.grad(loss_g)(g_vars['params']), g_entries)}


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


def _computed_outputs(fixture_path, fixture):
  """Every output we can reproduce from the fixture's weights and inputs, keyed as stored."""
  wc = weight_conversion
  g_tensors = wc.read_state_dict(fixture_path, 'G/')
  ae_tensors = wc.read_state_dict(fixture_path, 'AE/')
  generator, g_vars = wc.load_generator(g_tensors)
  autoencoder, ae_vars = wc.load_autoencoder(ae_tensors)
  g_hp, ae_hp = wc.generator_hparams(g_tensors), wc.autoencoder_hparams(ae_tensors)
  computed = _eval_outputs(generator, g_vars, autoencoder, ae_vars, fixture)
  computed.update(_train_bn_outputs(generator, g_vars, autoencoder, ae_vars, fixture))
  computed.update(_gradient_norms(
      generator, g_vars, autoencoder, ae_vars, fixture,
      list(wc.generator_entries(g_hp['num_modalities'] - 1, g_hp['num_blocks'],
                                g_hp['use_dropout'])),
      list(wc.autoencoder_entries(ae_hp['num_blocks'], ae_hp['use_dropout']))))
  return computed


def check(fixture_path, tolerance=TOLERANCE, gradient_tolerance=GRADIENT_TOLERANCE):
  """Rows (key, max abs error, relative error, ok) for every comparable fixture key."""
  if not pathlib.Path(fixture_path).is_file():
    raise weight_conversion.WeightImportError(f'{fixture_path}: no such file')
  fixture = np.load(fixture_path, allow_pickle=False)
  computed = _computed_outputs(fixture_path, fixture)
  rows = []
  for key in fixture.files:
    if key.startswith(('G/', 'AE/')) or key in _INPUT_KEYS:
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


def report(rows, tolerance, gradient_tolerance, verbose=False) -> int:
  """Prints the rows (the worst of each group unless `verbose`) and a summary; exit code."""
  _print_rows(rows, verbose)
  failed = [r for r in rows if not r[3]]
  worst = max(rows, key=lambda r: r[2])
  print(f'{len(rows) - len(failed)}/{len(rows)} keys within tolerance ({tolerance:g}; '
        f'gradient norms {gradient_tolerance:g}); worst {worst[0]}: {worst[2]:.2e}')
  return 1 if failed else 0
