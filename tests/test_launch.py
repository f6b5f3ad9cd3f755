"""The training job end to end: checkpoints, exact resume, devices, signals, bad configs."""
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import pytest

from aegan_jax import checkpoints
from aegan_jax import cli
from aegan_jax import data
from aegan_jax import job
from aegan_jax import models
from aegan_jax import samples
from configs import demo
from data_prep import prepare
from tests_helpers import ROOT, assert_states_equal, launch_config, restored_state



@pytest.mark.slow
def test_train_checkpoint_restore_and_evaluate(prepared, tmp_path, capsys):
  config = launch_config(prepared, num_steps=3)
  config.train.evaluate_at_end = True
  state = job.train_and_evaluate(config, tmp_path)
  assert int(state.step) == 3
  manager = checkpoints.make_manager(tmp_path)
  assert manager.all_steps() == [2, 3]  # every 2 steps, and at the end
  assert sorted(p.name for p in (tmp_path / 'samples').iterdir()) == [
      'step_0000002.png', 'step_0000003.png']
  assert list((tmp_path / 'tensorboard').iterdir())
  assert (tmp_path / 'config.json').exists() and (tmp_path / 'run_info.json').exists()
  assert_states_equal(restored_state(tmp_path, config), state)
  for name in ('metrics.json', 'metrics.csv', 'metrics.md'):
    assert (tmp_path / 'eval' / '3' / name).exists()
  # --mode=evaluate restores an earlier step by itself.
  assert cli.run(config, tmp_path, mode='evaluate', step=2) == 0
  assert (tmp_path / 'eval' / '2' / 'metrics.json').exists()
  # An output folder that cannot be made fails before any subject is evaluated (a file in
  # its place: unlike chmod, this fails as root too).
  shutil.rmtree(tmp_path / 'eval' / '2')
  (tmp_path / 'eval' / '2').write_text('x')
  capsys.readouterr()
  assert cli.run(config, tmp_path, mode='evaluate', step=2) == 2
  captured = capsys.readouterr()
  assert captured.err.startswith(f'error: {tmp_path / "eval" / "2"}: cannot write')
  assert captured.err.count('\n') == 1 and '[1/' not in captured.out
  assert (tmp_path / 'eval' / '2').read_text() == 'x'



@pytest.mark.slow
@pytest.mark.parametrize('norm', ['batch', 'instance'])
def test_resume_equals_continuous(prepared, tmp_path, norm):
  def config(num_steps):
    c = launch_config(prepared, num_steps=num_steps)
    c.model.norm = norm  # instance norm: no running statistics at all (the demo's choice)
    return c
  straight = job.train_and_evaluate(config(4), tmp_path / 'a')
  job.train_and_evaluate(config(2), tmp_path / 'b')
  resumed = job.train_and_evaluate(config(4), tmp_path / 'b')
  assert_states_equal(straight, resumed)
  assert cli.run(config(4), tmp_path / 'b', mode='evaluate') == 0  # generator alone
  assert (tmp_path / 'b' / 'eval' / '4' / 'metrics.json').exists()


def test_bad_config_values_give_one_line_errors(prepared, tmp_path, capsys):
  config = launch_config(prepared, num_steps=1)
  config.train.global_batch_size = 6  # 4 simulated devices
  assert cli.run(config, tmp_path / 'a') == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: config.train.global_batch_size=6') and '\n' not in err
  assert not (tmp_path / 'a').exists()  # a refused run leaves no empty workdir behind
  config = launch_config(prepared, num_steps=1)
  config.model.norm = 'group'
  assert cli.run(config, tmp_path / 'b') == 2
  assert "config.model.norm='group'" in capsys.readouterr().err
  config = launch_config(prepared, num_steps=1)
  config.optim.weight_decay = 0.1  # no such optimizer option
  assert cli.run(config, tmp_path / 'c') == 2
  err = capsys.readouterr().err
  assert err.startswith('error: config.optim:') and 'weight_decay' in err and err.count('\n') == 1


@pytest.mark.slow
def test_incompatible_checkpoint_is_a_clear_error(prepared, tmp_path, capsys):
  job.train_and_evaluate(launch_config(prepared, num_steps=1), tmp_path)
  config = launch_config(prepared, num_steps=2)
  config.model.ngf = 16
  assert cli.run(config, tmp_path) == 2
  assert 'trained with model.ngf=8 but the config has 16' in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_saves_a_second_launch_is_refused_and_resume_matches(prepared, tmp_path):
  steps = 40
  overrides = [f'--config.data.prepared_dir={prepared}', '--config.data.image_size=32',
               '--config.data.slices=range:8:16', '--config.data.split_ratios=(0.5,0.25,0.25)',
               '--config.model.ngf=8', '--config.model.num_blocks=1', '--config.model.norm=batch',
               '--config.train.global_batch_size=4', f'--config.train.num_steps={steps}',
               '--config.train.log_every=1', '--config.train.checkpoint_every=1000',
               '--config.train.sample_every=1000', '--config.train.evaluate_at_end=False']
  env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
  process = subprocess.Popen(
      [sys.executable, 'launch.py', '--config=configs/demo.py', f'--workdir={tmp_path / "run"}',
       *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in process.stdout:  # Signal once training is under way.
    if line.startswith('step 2/'):
      # A second launch on the same workdir (another seed) while the first trains: refused.
      process.send_signal(signal.SIGSTOP)  # Holds the first run (and its lock) here.
      second = subprocess.run(
          [sys.executable, 'launch.py', '--config=configs/demo.py',
           f'--workdir={tmp_path / "run"}', *overrides, '--config.train.seed=7'],
          cwd=ROOT, capture_output=True, text=True, timeout=120)
      process.send_signal(signal.SIGCONT)
      process.send_signal(signal.SIGTERM)
      break
  output = process.stdout.read()
  assert second.returncode == 2 and second.stderr.count('\n') == 1, second.stderr
  assert f'is in use by PID {process.pid}' in second.stderr
  assert process.wait(timeout=120) == 0, output
  assert 'stopped by SIGTERM' in output
  stopped_at = checkpoints.make_manager(tmp_path / 'run').latest_step()
  assert 2 <= stopped_at < steps
  config = launch_config(prepared, num_steps=steps, checkpoint_every=1000, sample_every=1000)
  resumed = job.train_and_evaluate(config, tmp_path / 'run')
  straight = job.train_and_evaluate(config, tmp_path / 'straight')
  assert_states_equal(straight, resumed)


@pytest.mark.slow
def test_nan_loss_stops_naming_step_and_term_and_keeps_last_good_checkpoint(
    prepared, tmp_path, capsys):
  job.train_and_evaluate(launch_config(prepared, num_steps=2), tmp_path)
  config = launch_config(prepared, num_steps=5, checkpoint_every=1)
  config.optim.learning_rate = 1e38  # The next update overflows the weights.
  assert cli.run(config, tmp_path) == 1
  err = capsys.readouterr().err
  assert err.startswith('error: step 3: loss_') and ('nan' in err or 'inf' in err), err
  assert checkpoints.make_manager(tmp_path).all_steps() == [2]


def test_demo_data_is_generated_whole_then_prepared(tmp_path):
  config = demo.get_config()
  config.data.phantom_subjects = 3
  config.data.phantom_shape = (40, 40, 24)
  config.data.slices = 'range:8:16'
  config.data.image_size = 32
  config.data.split_ratios = (0.34, 0.33, 0.33)
  (tmp_path / 'raw.partial').mkdir()  # left by an interrupted run: started afresh
  (tmp_path / 'raw.partial' / 'junk').write_text('x')
  prepared = job.ensure_prepared(config, tmp_path)
  assert sorted(p.name for p in (tmp_path / 'raw').iterdir()) == [
      'BraTS20_Training_001', 'BraTS20_Training_002', 'BraTS20_Training_003']
  assert not (tmp_path / 'raw.partial').exists()
  assert data.num_examples(prepared, 'train') == 8


@pytest.mark.slow
@pytest.mark.parametrize('phase', ['log', 'samples'])
def test_a_stop_during_host_work_still_saves_that_step(prepared, tmp_path, monkeypatch, capsys,
                                                       phase):
  """A signal that lands while metrics are fetched or samples written must not skip the save."""
  target = (job, '_log_metrics') if phase == 'log' else (samples.SampleWriter, 'write')
  original = getattr(*target)

  def signalling(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  monkeypatch.setattr(*target, signalling)
  config = launch_config(prepared, num_steps=5, checkpoint_every=1000, sample_every=2)
  state = job.train_and_evaluate(config, tmp_path)
  stopped_at = 1 if phase == 'log' else 2
  assert int(state.step) == stopped_at
  assert checkpoints.make_manager(tmp_path).all_steps() == [stopped_at]
  assert f'saved step {stopped_at} in' in capsys.readouterr().out


@pytest.mark.parametrize('field,value', [('train.sample_every', 0), ('train.sample_every', -1),
                                         ('train.log_every', 0), ('data.image_size', 8),
                                         ('data.image_size', 12), ('data.image_size', 18),
                                         ('model.norm', 'group'), ('model.ngf', 0),
                                         ('model.dtype', 'float31'), ('loss.gan_mode', 'wgan'),
                                         ('optim.learning_rate', 0.0), ('data.scenarios', 'any'),
                                         ('data.scenarios', 'every'),
                                         ('data.curriculum_stage_examples', 0),
                                         ('data.image_size', 100000),
                                         ('train.keep_checkpoints', -1), ('train.seed', -1),
                                         ('train.seed', 2**32), ('optim.b1', 2.0),
                                         ('optim.b2', 1.0), ('optim.eps', 0.0)])
def test_bad_field_values_are_one_line_errors(prepared, tmp_path, capsys, field,
                                                           value):
  config = launch_config(prepared, num_steps=1)
  group, name = field.split('.')
  config[group][name] = value
  assert cli.run(config, tmp_path) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: config.{field}={value!r}') and err.count('\n') == 1, err
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.slow
def test_one_run_per_workdir(prepared, tmp_path, capsys):
  from aegan_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  lock = tmp_path / workdir_lock.LOCK_NAME
  # Held by a live process (this one): refused, naming it.
  assert workdir_lock.acquire(tmp_path) == lock
  assert cli.run(launch_config(prepared, num_steps=1), tmp_path) == 2
  err = capsys.readouterr().err
  assert f'is in use by PID {os.getpid()}' in err and err.count('\n') == 1
  assert not (tmp_path / 'checkpoints').exists()
  # Left by a process that has died: taken over with a warning, released at the end.
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  lock.write_text(f'{{"pid": {dead.pid}, "host": "{os.uname().nodename}", "started": "x"}}')
  assert cli.run(launch_config(prepared, num_steps=1), tmp_path) == 0
  assert f'taking over {lock} from PID {dead.pid}' in capsys.readouterr().err
  assert not lock.exists()


def test_workdir_that_is_a_file_is_a_one_line_error(prepared, tmp_path, capsys):
  workdir = tmp_path / 'w'
  workdir.write_text('x')
  assert cli.run(launch_config(prepared, num_steps=1), workdir) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: --workdir {workdir}') and err.count('\n') == 1, err
  assert workdir.read_text() == 'x'


def test_unknown_config_field_is_one_line(tmp_path):
  run = subprocess.run([sys.executable, 'launch.py', '--config=configs/demo.py',
                        f'--workdir={tmp_path}', '--config.train.bogus=1'],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert run.returncode == 2
  assert run.stderr.strip() == "error: --config.train.bogus: no such config field ('bogus')"


@pytest.mark.slow
def test_damaged_latest_checkpoint_names_the_step_and_step_falls_back(prepared, tmp_path, capsys):
  job.train_and_evaluate(launch_config(prepared, num_steps=4), tmp_path)
  damaged = tmp_path / 'checkpoints' / '4'
  for path in damaged.rglob('*'):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  assert cli.run(launch_config(prepared, num_steps=6), tmp_path) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {damaged}: damaged checkpoint of step 4') and err.count('\n') == 1
  assert 'add --step=2 to resume from step 2' in err
  assert cli.run(launch_config(prepared, num_steps=6), tmp_path, step=3) == 2
  assert capsys.readouterr().err == (f'error: --step 3: no checkpoint of step 3 in '
                                     f'{damaged.parent} (there: [2, 4])\n')
  assert cli.run(launch_config(prepared, num_steps=6), tmp_path, step=2) == 0
  assert 'resuming from step 2' in capsys.readouterr().out
  assert (tmp_path / 'checkpoints_set_aside' / '4').is_dir()  # Moved, not deleted.
  assert sorted(p.name for p in damaged.parent.iterdir() if p.name.isdigit()) == ['2', '4', '6']


def _flip_bytes(path):
  """Bytes flipped inside a record (the shard's header and footer index stay whole)."""
  data = bytearray(path.read_bytes())
  start = len(data) // 3
  data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
  path.write_bytes(bytes(data))


def _edit_manifest(path, change):
  manifest = json.loads(path.read_text())
  change(manifest)
  path.write_text(json.dumps(manifest))


@pytest.mark.parametrize('damage', ['truncate', 'delete', 'manifest', 'flip', 'empty_manifest',
                                    'no_modalities', 'dataset_info'])
@pytest.mark.slow
def test_damaged_prepared_dataset_names_the_file_and_the_fix(prepared, tmp_path, capsys, damage):
  copy = tmp_path / 'prepared'
  shutil.copytree(prepared, copy)
  shard = next(copy.rglob('*-train.array_record-*'))
  manifest = copy / 'manifest.json'
  named = {'truncate': shard, 'delete': shard.parent, 'flip': f'{shard.parent}: record',
           'dataset_info': shard.parent / 'dataset_info.json'}.get(damage, manifest)
  if damage == 'truncate':
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
  elif damage == 'delete':
    shard.unlink()
  elif damage == 'manifest':
    manifest.write_text(manifest.read_text()[:100])
  elif damage == 'flip':
    _flip_bytes(shard)
  elif damage == 'empty_manifest':
    manifest.write_text('{}')
  elif damage == 'no_modalities':
    _edit_manifest(manifest, lambda m: m.pop('modalities'))
  else:
    named.write_text(named.read_text()[:50])
  # 4 steps of 4 read every one of the 16 training slices.
  assert cli.run(launch_config(copy, num_steps=4), tmp_path / 'run') == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {named}') and 'prepare again' in err, err
  assert err.count('\n') == 1


@pytest.mark.slow
def test_keep_checkpoints_zero_keeps_every_checkpoint(prepared, tmp_path):
  job.train_and_evaluate(launch_config(prepared, num_steps=4), tmp_path)
  assert checkpoints.make_manager(tmp_path).all_steps() == [2, 4]
  assert cli.run(launch_config(prepared, num_steps=6, keep_checkpoints=0), tmp_path) == 0
  assert checkpoints.make_manager(tmp_path).all_steps() == [2, 4, 6]


@pytest.mark.slow
def test_a_run_takes_the_prepared_datas_choices_and_never_resumes_on_other_data(
    prepared, tmp_path, capsys):
  def other(name, **options):
    dst = tmp_path / name
    prepare.prepare_dataset(prepared.parent / 'raw', dst, image_size=32, progress=False,
                            **{'slices': 'range:8:16', 'split_ratios': (0.5, 0.25, 0.25),
                               **options})
    return dst
  zscore = other('zscore', normalise='zscore')
  # zscore data, the config's default max normalisation: the run says so and records zscore,
  # in config.json and in the checkpoint that synthesis reads.
  assert cli.run(launch_config(zscore, num_steps=1), tmp_path / 'a') == 0
  assert (f"note: {zscore} was prepared with data.normalise='zscore' (the config has 'max'); "
          'this run uses the prepared value') in capsys.readouterr().out
  assert json.loads((tmp_path / 'a' / 'config.json').read_text())['data']['normalise'] == 'zscore'
  assert checkpoints.read_checkpoint_config(tmp_path / 'a')[1].data.normalise == 'zscore'
  # A run trained on max-normalised data does not resume on data prepared otherwise.
  assert cli.run(launch_config(prepared, num_steps=2), tmp_path / 'b') == 0
  for field, other_data in (('normalise', zscore),
                            ('slices', other('slices', slices='range:9:15'))):
    assert cli.run(launch_config(other_data, num_steps=4), tmp_path / 'b') == 2
    err = capsys.readouterr().err
    trained = launch_config(prepared).data[field]
    assert f'was trained with data.{field}={trained!r} but the config has' in err, err
    assert err.count('\n') == 1
  config = launch_config(prepared, num_steps=4)
  config.data.geometry = 'pad'
  manager = checkpoints.make_manager(tmp_path / 'b')
  with pytest.raises(checkpoints.CheckpointError, match="data.geometry='resize' but the config "
                                                        "has 'pad'"):
    checkpoints.check_compatible(checkpoints.read_meta(manager, 2), config, 'b',
                                 checkpoints.RESUME_FIELDS)
  assert manager.all_steps() == [2]
  # A layout that differs is refused: the model cannot take other modalities or sizes.
  config = launch_config(prepared, num_steps=1)
  config.data.image_size = 48
  assert cli.run(config, tmp_path / 'c') == 2
  assert 'config.data.image_size=48 but' in capsys.readouterr().err


def test_a_workdir_of_imported_weights_is_not_called_damaged(prepared, tmp_path, capsys):
  config = launch_config(prepared, num_steps=2)
  generator, _ = models.build_networks(config.model, 4)
  checkpoints.save_networks(tmp_path, 0, config, generator.init(
      {'params': jax.random.PRNGKey(0)}, *models.example_inputs(generator, 32), train=False))
  assert cli.run(config, tmp_path) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {tmp_path / "checkpoints" / "0"}: holds network weights only')
  assert 'damaged' not in err and 'train in a new --workdir' in err and err.count('\n') == 1


@pytest.mark.parametrize('body,message', [
    ('def get_config(:\n  pass\n', 'cfg.py:1: syntax error'),
    ('def get_config():\n  config = 1\n', 'cfg.py: get_config() returned None'),
])
def test_a_broken_config_file_is_one_line(tmp_path, body, message):
  (tmp_path / 'cfg.py').write_text(body)
  run = subprocess.run([sys.executable, 'launch.py', f'--config={tmp_path / "cfg.py"}',
                        f'--workdir={tmp_path / "w"}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert run.returncode == 2 and run.stderr.startswith('error: ') and message in run.stderr, \
      run.stderr
  assert run.stderr.count('\n') == 1 and not (tmp_path / 'w').exists()
