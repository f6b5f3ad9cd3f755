"""Two processes on this machine (2 simulated CPU devices each) as two hosts.

`jax.distributed.initialize` joins them over localhost (gloo collectives), so this
runs the multi-host code path for real: the global batch assembled from each
process's shard, one Orbax checkpoint written by both, Grain state per process,
resume, and evaluation at the end.
"""
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from aegan_jax import checkpoints
from test_launch import assert_states_equal, prepared, restored_state, tiny_config  # noqa: F401

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch_two_hosts(prepared_dir, workdir, num_steps, evaluate=False):
  overrides = [f'--config.data.prepared_dir={prepared_dir}', '--config.data.image_size=32',
               '--config.model.ngf=8', '--config.model.num_blocks=1',
               '--config.model.norm=batch', '--config.train.global_batch_size=4',
               f'--config.train.num_steps={num_steps}', '--config.train.log_every=1',
               '--config.train.checkpoint_every=2', '--config.train.sample_every=1000',
               f'--config.train.evaluate_at_end={evaluate}']
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
         'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}
  address = f'localhost:{free_port()}'
  processes = [subprocess.Popen(
      [sys.executable, 'launch.py', '--config=configs/demo.py', f'--workdir={workdir}',
       *overrides, f'--coordinator_address={address}', '--num_processes=2',
       f'--process_id={i}'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output
  return outputs


def test_two_hosts_train_resume_exactly_and_evaluate(prepared, tmp_path):
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  outputs = launch_two_hosts(prepared, straight, num_steps=4, evaluate=True)
  assert 'on 4 device(s)' in outputs[0]
  assert checkpoints.make_manager(straight).all_steps() == [2, 4]
  assert (straight / 'eval' / '4' / 'metrics.json').exists()
  # The same run interrupted after its step-2 checkpoint, then restarted on both hosts.
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '4')
  shutil.rmtree(resumed / 'eval')
  outputs = launch_two_hosts(prepared, resumed, num_steps=4)
  assert 'resuming from step 2' in outputs[0]

  config = tiny_config(prepared, num_steps=4)
  config.model.norm = 'batch'
  state = restored_state(straight, config)
  assert int(state.step) == 4
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(state)))
  # Each host fed its own shard of every global batch; the restart (each host's Grain
  # position restored) must land on the same parameters bitwise.
  assert_states_equal(state, restored_state(resumed, config))
