"""Parity with the official PyTorch code through its exported weights and outputs."""
import pickle
import sys
import types

import numpy as np
import pytest

from aegan_jax import official
from aegan_jax import parity
from aegan_jax import weight_conversion


@pytest.mark.slow
def test_fixture_parity_every_key_within_tolerance(parity_fixture_path):
  rows = parity.check(parity_fixture_path)
  failed = [(key, rel) for key, _, rel, ok in rows if not ok]
  assert not failed, failed
  keys = {row[0] for row in rows}
  # The check must cover outputs, features, losses, train-mode BN and gradients.
  for key in ('G_out', 'AE_out', 'AE_patch_logits', 'AE_cls_logits', 'G_decoder_feat_0_crop16',
              'AE_feat_1_sum', 'loss_G_SR', 'loss_D', 'trainbn_loss_G', 'trainbn_AE_cls_logits',
              'gradnorm_lossG/G/decoder_final.1.weight'):
    assert key in keys
  assert len(rows) > 200


@pytest.mark.slow
def test_check_fails_on_a_perturbed_fixture(parity_fixture_path, tmp_path):
  data = dict(np.load(parity_fixture_path))
  data['G_out'] = data['G_out'] + 1e-3
  data['loss_G_SR'] = data['loss_G_SR'] * 1.01
  bad = tmp_path / 'bad.npz'
  np.savez(bad, **data)
  rows = {row[0]: row for row in parity.check(bad)}
  assert not rows['G_out'][3] and not rows['loss_G_SR'][3]
  assert rows['AE_out'][3]


@pytest.mark.slow
def test_cli_exit_codes(parity_fixture_path, tmp_path, capsys):
  assert official.main(['check', str(parity_fixture_path)]) == 0
  assert 'keys within tolerance' in capsys.readouterr().out
  missing = tmp_path / 'nope.npz'
  assert official.main(['check', str(missing)]) == 2
  assert 'nope.npz: no such file' in capsys.readouterr().err


def test_weight_import_reads_architecture_and_layouts(parity_fixture_path):
  tensors = weight_conversion.read_state_dict(parity_fixture_path, 'G/')
  generator, variables = weight_conversion.load_generator(tensors)
  assert (generator.num_modalities, generator.ngf, generator.num_blocks) == (4, 8, 6)
  kernel = variables['params']['encoder_0']['conv_in']['kernel']
  np.testing.assert_array_equal(kernel[1, 2, 3, 4], tensors['encoder_0_0.1.weight'][4, 3, 1, 2])
  up = variables['params']['decoder_0']['up']['kernel']
  np.testing.assert_array_equal(up[0, 2, 5, 1], tensors['decoder_0.0.weight'][5, 1, 0, 2])
  assert 'attention' not in variables['params']['decoder_1']  # zero-width at 8 channels


def test_unexpected_state_dict_is_a_clear_error(parity_fixture_path):
  tensors = weight_conversion.read_state_dict(parity_fixture_path, 'G/')
  tensors['extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(weight_conversion.WeightImportError, match='unexpected tensors'):
    weight_conversion.load_generator(tensors)
  with pytest.raises(weight_conversion.WeightImportError,
                     match='not an official AE-GAN autoencoder'):
    weight_conversion.load_autoencoder(tensors)


def test_pth_state_dict_is_read_without_unpickling_objects(parity_fixture_path, tmp_path):
  torch = pytest.importorskip('torch')
  tensors = weight_conversion.read_state_dict(parity_fixture_path, 'G/')
  state = {f'module.{k}': torch.from_numpy(v) for k, v in tensors.items()}  # DataParallel form
  torch.save(state, tmp_path / 'latest_net_G.pth')
  loaded = weight_conversion.read_state_dict(tmp_path / 'latest_net_G.pth')
  assert loaded.keys() == tensors.keys()
  np.testing.assert_array_equal(loaded['decoder_0.0.weight'], tensors['decoder_0.0.weight'])
  torch.save({'weights': object()}, tmp_path / 'pickled.pth')  # Arbitrary objects are refused.
  with pytest.raises(weight_conversion.WeightImportError, match='not a plain PyTorch state dict'):
    weight_conversion.read_state_dict(tmp_path / 'pickled.pth')


def test_check_on_an_empty_or_mis_shaped_file_is_one_line(tmp_path, capsys):
  np.savez(tmp_path / 'empty.npz')
  np.savez(tmp_path / 'mis.npz', **{'G/encoder_0_0.1.weight': np.zeros((3, 3), np.float32)})
  for name, message in (('empty.npz', 'not a weights file'),
                        ('mis.npz', 'tensor encoder_0_0.1.weight has shape (3, 3)')):
    assert official.main(['check', str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1, err


def test_check_on_a_fixture_without_inputs_is_one_line(parity_fixture_path, tmp_path, capsys):
  fixture = np.load(parity_fixture_path)
  weights_only = tmp_path / 'weights_only.npz'
  np.savez(weights_only, **{k: fixture[k] for k in fixture.files if k.startswith(('G/', 'AE/'))})
  assert official.main(['check', str(weights_only)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {weights_only}: ') and 'input_A' in err, err
  assert err.count('\n') == 1, err


def _fake_torch(monkeypatch, version, load):
  torch = types.ModuleType('torch')
  torch.__version__ = version
  torch.load = load
  monkeypatch.setitem(sys.modules, 'torch', torch)


def test_pth_refused_with_a_torch_whose_weights_only_can_be_bypassed(tmp_path, monkeypatch):
  loaded = []
  _fake_torch(monkeypatch, '2.5.1+cu121', lambda *a, **k: loaded.append(a))
  (tmp_path / 'G.pth').write_bytes(b'PK\x03\x04')
  with pytest.raises(weight_conversion.WeightImportError,
                     match=r'G.pth: torch 2.5.1\+cu121 is installed, .*CVE-2025-32434') as info:
    weight_conversion.read_state_dict(tmp_path / 'G.pth')
  assert not loaded and '\n' not in str(info.value)


def test_pth_refusal_never_advises_loading_without_weights_only(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise pickle.UnpicklingError(
        'Weights only load failed. This file can still be loaded, to do so you have two '
        'options, do those steps only if you trust the source of the checkpoint.\n\t(1) In '
        'PyTorch 2.6, we changed the default value of the `weights_only` argument in '
        '`torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set '
        'to `False` will likely succeed, but it can result in arbitrary code execution.')
  _fake_torch(monkeypatch, '2.6.0', refuse)
  (tmp_path / 'G.pth').write_bytes(b'PK\x03\x04')
  with pytest.raises(weight_conversion.WeightImportError,
                     match='not a plain PyTorch state dict') as info:
    weight_conversion.read_state_dict(tmp_path / 'G.pth')
  message = str(info.value)
  assert 'False' not in message and 'trust' not in message and '\n' not in message
