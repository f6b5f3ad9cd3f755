"""Two processes on this machine (2 simulated CPU devices each) as two hosts.

`jax.distributed.initialize` joins them over localhost (gloo collectives), so this
runs the multi-host code path for real: the global batch assembled from each
process's shard, one Orbax checkpoint written by both, Grain state per process,
sample grids, a stop signal that reaches one host only, a preparation that fails
on process 0, resume, and evaluation at the end.
"""
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from aegan_jax import checkpoints
from tests_helpers import ROOT, assert_states_equal, launch_config, restored_state

STEPS = 12


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def start_two_hosts(workdir, overrides):
  """Both processes, each writing its output to a file (an undrained pipe could fill and
  block one process while the other waits for it at a collective)."""
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
         'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}
  address = f'localhost:{free_port()}'
  logs = [pathlib.Path(f'{workdir}.host{i}.log') for i in range(2)]
  processes = []
  for i, log in enumerate(logs):
    with open(log, 'w') as out:
      processes.append(subprocess.Popen(
          [sys.executable, 'launch.py', '--config=configs/demo.py', f'--workdir={workdir}',
           *overrides, f'--coordinator_address={address}', '--num_processes=2',
           f'--process_id={i}'], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    processes[-1].log = log
  return processes


def wait_for_line(process, prefix, timeout=300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and process.poll() is None:
    if any(line.startswith(prefix) for line in process.log.read_text().splitlines()):
      return
    time.sleep(0.05)
  raise AssertionError(f'no line {prefix!r}: {process.log.read_text()}')


def training_overrides(prepared_dir, evaluate=False):
  return [f'--config.data.prepared_dir={prepared_dir}', '--config.data.image_size=32',
          '--config.data.slices=range:8:16', '--config.data.split_ratios=(0.5,0.25,0.25)',
          '--config.model.ngf=8', '--config.model.num_blocks=1',
          '--config.model.norm=batch', '--config.train.global_batch_size=4',
          f'--config.train.num_steps={STEPS}', '--config.train.log_every=1',
          '--config.train.checkpoint_every=1000', '--config.train.sample_every=10',
          f'--config.train.evaluate_at_end={evaluate}']


def finish(processes, timeout=300):
  for process in processes:
    process.wait(timeout=timeout)
  return [p.returncode for p in processes], [p.log.read_text() for p in processes]


@pytest.mark.slow
def test_stop_signal_on_one_host_stops_both_then_resumes_exactly(prepared, tmp_path):
  straight, stopped = tmp_path / 'straight', tmp_path / 'stopped'
  codes, outputs = finish(start_two_hosts(straight, training_overrides(prepared, evaluate=True)))
  assert codes == [0, 0], outputs
  assert 'on 4 device(s)' in outputs[0]
  assert (straight / 'eval' / str(STEPS) / 'metrics.json').exists()
  assert (straight / 'samples' / 'step_0000010.png').exists()  # process 0, host-local copy

  processes = start_two_hosts(stopped, training_overrides(prepared))
  wait_for_line(processes[0], 'step 3/')
  processes[1].send_signal(signal.SIGTERM)  # host 1 only
  signalled = time.monotonic()
  codes, outputs = finish(processes, timeout=60)
  assert codes == [0, 0], outputs
  assert time.monotonic() - signalled < 30
  saved = checkpoints.make_manager(stopped).all_steps()
  assert len(saved) == 1 and 3 <= saved[0] < STEPS, saved
  assert f'stopped by SIGTERM at step {saved[0]}; saved step {saved[0]}' in outputs[0]

  codes, outputs = finish(start_two_hosts(stopped, training_overrides(prepared)))
  assert codes == [0, 0], outputs
  assert f'resuming from step {saved[0]}' in outputs[0]
  config = launch_config(prepared, num_steps=STEPS)
  state = restored_state(straight, config)
  assert int(state.step) == STEPS
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(state)))
  # Each host fed its own shard of every global batch; the restart (each host's Grain
  # position restored) must land on the same parameters bitwise.
  assert_states_equal(state, restored_state(stopped, config))


@pytest.mark.slow
def test_failed_preparation_on_process_0_stops_every_host_then_a_relaunch_trains(tmp_path):
  from data_prep import phantom
  raw = tmp_path / 'raw'
  phantom.write_phantom_dataset(raw, 3, seed=1, shape=(40, 40, 24))
  bad = sorted(raw.glob('*/*_t2.nii*'))[0]
  good = bad.read_bytes()
  bad.write_bytes(b'not a nifti file')
  overrides = [f'--config.data.raw_dir={raw}', '--config.data.phantom_subjects=0',
               f'--config.data.prepared_dir={tmp_path / "prepared"}',
               '--config.data.image_size=32', '--config.data.slices=range:8:16',
               '--config.data.split_ratios=(0.34, 0.33, 0.33)', '--config.model.ngf=8',
               '--config.model.num_blocks=1', '--config.train.global_batch_size=4',
               '--config.train.num_steps=2', '--config.train.evaluate_at_end=False']
  started = time.monotonic()
  codes, outputs = finish(start_two_hosts(tmp_path / 'run', overrides), timeout=120)
  assert time.monotonic() - started < 120
  assert all(code != 0 for code in codes), outputs
  for output in outputs:
    assert bad.name in output, output
  assert not (tmp_path / 'prepared').exists()
  bad.write_bytes(good)  # The user fixes the file and runs the same command again.
  codes, outputs = finish(start_two_hosts(tmp_path / 'run', overrides))
  assert codes == [0, 0], outputs
  assert checkpoints.make_manager(tmp_path / 'run').all_steps() == [2]
