"""Importing official weights into an Orbax checkpoint, then restoring them."""
import os

import jax
import numpy as np
import pytest

from aegan_jax import checkpoints
from aegan_jax import official
from aegan_jax import inference

CONFIG = 'configs/brats.py'


def nhwc(x):
  return np.asarray(x, np.float32).transpose(0, 2, 3, 1)


def images_from_generator_input(generator_input, targets, num_modalities=4):
  """Inverts `assemble_generator_input`: branch i holds modality (t + 1 + i) % M."""
  n, h, w, _ = generator_input.shape
  images = np.zeros((n, h, w, num_modalities), np.float32)
  for k, t in enumerate(targets):
    for i in range(num_modalities - 1):
      images[k, ..., (t + 1 + i) % num_modalities] = generator_input[k, ..., i * (num_modalities + 1)]
  return images


@pytest.fixture(scope='module')
def imported(parity_fixture_path, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('imported')
  assert official.main(['import', '--generator', str(parity_fixture_path), '--autoencoder',
                        str(parity_fixture_path), '--config', CONFIG,
                        '--workdir', str(workdir)]) == 0
  return workdir


def test_imported_generator_reproduces_the_official_output(parity_fixture_path, imported):
  fixture = np.load(parity_fixture_path)
  step, config = checkpoints.read_checkpoint_config(imported)
  assert step == 0 and config.model.ngf == 8 and config.model.num_blocks == 6
  assert config.model.use_dropout and config.model.norm == 'batch'
  synthesizer = inference.Synthesizer.restore(imported, batch_size=2)
  targets = np.asarray(fixture['target_index']).reshape(-1)
  images = images_from_generator_input(nhwc(fixture['input_A']), targets)
  out = synthesizer(images, targets)
  expected = nhwc(fixture['G_out'])[..., 0]
  rel = np.abs(out - expected).max() / np.abs(expected).max()
  print(f"relative error {rel:.2e}")
  assert rel < 1e-4, rel


def test_imported_autoencoder_is_stored(imported):
  items = {p.name for p in (checkpoints.checkpoint_dir(imported) / '0').iterdir()}
  assert {'generator', 'autoencoder', 'meta'} <= items


def test_generator_only_npz_without_prefix(parity_fixture_path, tmp_path, capsys):
  fixture = np.load(parity_fixture_path)
  plain = tmp_path / 'G.npz'
  np.savez(plain, **{k[2:]: fixture[k] for k in fixture.files if k.startswith('G/')})
  assert official.main(['import', '--generator', str(plain), '--config', CONFIG,
                        '--workdir', str(tmp_path / 'work')]) == 0
  assert 'imported generator (ngf 8' in capsys.readouterr().out
  # A second import into the same workdir is refused.
  assert official.main(['import', '--generator', str(plain), '--config', CONFIG,
                        '--workdir', str(tmp_path / 'work')]) == 2
  assert 'already holds checkpoints' in capsys.readouterr().err


def test_bad_files_are_one_line_errors(parity_fixture_path, tmp_path, capsys):
  corrupt = tmp_path / 'bad.npz'
  corrupt.write_bytes(b'PK\x03\x04 truncated')
  cases = [
      (['--generator', str(tmp_path / 'missing.npz')], 'no such file'),
      (['--generator', str(corrupt)], 'not a readable state dict'),
      (['--generator', str(tmp_path / 'weights.txt')], 'expected a .npz or .pth'),
      # AE tensors given as the generator.
      (['--generator', str(_ae_only(parity_fixture_path, tmp_path))],
       'not an official AE-GAN generator state dict'),
  ]
  (tmp_path / 'weights.txt').write_text('x')
  for extra, message in cases:
    code = official.main(['import', *extra, '--config', CONFIG,
                          '--workdir', str(tmp_path / 'w')])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count('\n') == 1, err
  assert not (tmp_path / 'w').exists()


def test_image_size_conflict_with_the_autoencoder(parity_fixture_path, tmp_path, capsys):
  config = tmp_path / 'small.py'
  config.write_text('from configs import brats\n\ndef get_config():\n'
                    '  c = brats.get_config()\n  c.data.image_size = 128\n  return c\n')
  assert official.main(['import', '--generator', str(parity_fixture_path), '--autoencoder',
                        str(parity_fixture_path), '--config', str(config),
                        '--workdir', str(tmp_path / 'w')]) == 2
  assert 'built for 256 px images' in capsys.readouterr().err


def _ae_only(parity_fixture_path, tmp_path):
  fixture = np.load(parity_fixture_path)
  path = tmp_path / 'AE.npz'
  np.savez(path, **{k[3:]: fixture[k] for k in fixture.files if k.startswith('AE/')})
  return path


def _generator_npz(parity_fixture_path, tmp_path, change):
  """The fixture's generator tensors with one of them changed by `change(name, tensors)`."""
  fixture = np.load(parity_fixture_path)
  tensors = {k[2:]: fixture[k] for k in fixture.files if k.startswith('G/')}
  change(tensors)
  path = tmp_path / 'G.npz'
  np.savez(path, **tensors)
  return path


@pytest.mark.parametrize('change,message', [
    (lambda t: t.update({'res_blocks.0.conv_block.1.weight':
                         t['res_blocks.0.conv_block.1.weight'][:, :, :2, :2]}),
     "tensor ['params']['blocks_0']['conv_0']['kernel'] has shape (2, 2, 32, 32), the "
     'architecture needs (3, 3, 32, 32)'),
    (lambda t: t.update({'encoder_0_0.2.running_var': t['encoder_0_0.2.running_var'][:3]}),
     "tensor ['batch_stats']['encoder_0']['norm_in']['var'] has shape (3,)"),
    (lambda t: t['decoder_0.0.weight'].__setitem__((0, 0, 0, 0), np.nan),
     "tensor ['params']['decoder_0']['up']['kernel'] holds NaN or Inf"),
])
def test_malformed_weights_are_refused_before_anything_is_written(
    parity_fixture_path, tmp_path, capsys, change, message):
  path = _generator_npz(parity_fixture_path, tmp_path, change)
  assert official.main(['import', '--generator', str(path), '--config', CONFIG,
                        '--workdir', str(tmp_path / 'w')]) == 2
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1, err
  assert not (tmp_path / 'w').exists()


def test_random_bytes_are_not_a_weights_file(tmp_path, capsys):
  path = tmp_path / 'G.npz'
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  assert official.main(['import', '--generator', str(path), '--config', CONFIG,
                        '--workdir', str(tmp_path / 'w')]) == 2
  assert 'not a weights file' in capsys.readouterr().err


def test_non_finite_weights_in_a_checkpoint_stop_synthesis(imported, tmp_path):
  _, config = checkpoints.read_checkpoint_config(imported)
  variables = inference.Synthesizer.restore(imported, batch_size=1).variables
  variables = jax.tree.map(np.array, jax.device_get(variables))
  variables['params']['output']['conv']['bias'][0] = np.inf
  checkpoints.save_networks(tmp_path / 'nan', 0, config, variables)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"\['output'\]\['conv'\]\['bias'\] holds NaN or Inf"):
    inference.Synthesizer.restore(tmp_path / 'nan', batch_size=1)


@pytest.mark.parametrize('body,message', [
    ('def get_config(:\n  pass\n', 'cfg.py:1: syntax error'),
    ('def get_config():\n  config = 1\n', 'cfg.py: get_config() returned NoneType, not a '
                                          'ConfigDict'),
])
def test_a_broken_config_file_is_one_line(tmp_path, capsys, body, message):
  (tmp_path / 'cfg.py').write_text(body)
  assert official.main(['import', '--generator', str(tmp_path / 'G.npz'), '--config',
                        str(tmp_path / 'cfg.py'), '--workdir', str(tmp_path / 'w')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and message in err and err.count('\n') == 1, err
  assert not (tmp_path / 'w').exists()


def test_a_negative_step_is_refused(parity_fixture_path, tmp_path, capsys):
  assert official.main(['import', '--generator', str(parity_fixture_path), '--config', CONFIG,
                        '--workdir', str(tmp_path / 'w'), '--step', '-1']) == 2
  assert capsys.readouterr().err == ('error: --step -1: must be >= 0 (checkpoints are numbered '
                                     'from 0)\n')
  assert not (tmp_path / 'w').exists()


def test_import_respects_the_run_lock_and_an_unwritable_workdir(parity_fixture_path, tmp_path,
                                                                capsys):
  from aegan_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'w'
  workdir.mkdir()
  lock = workdir_lock.acquire(workdir)  # a training run (this process) holds the workdir
  args = ['import', '--generator', str(parity_fixture_path), '--config', CONFIG]
  assert official.main([*args, '--workdir', str(workdir)]) == 2
  err = capsys.readouterr().err
  assert f'is in use by PID {os.getpid()}' in err and err.count('\n') == 1, err
  assert not (workdir / 'checkpoints').exists()
  workdir_lock.release(lock)
  (tmp_path / 'file').write_text('x')  # no folder can be made below a file, even by root
  assert official.main([*args, '--workdir', str(tmp_path / 'file' / 'w')]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: --workdir {tmp_path / "file" / "w"}: cannot write there'), err
  assert official.main([*args, '--workdir', str(workdir)]) == 0
  assert not (workdir / workdir_lock.LOCK_NAME).exists()
