"""Faults the user did not cause: a full disk, locks left by crashes."""
import json
import os
import socket

import pytest

from aegan_jax import checkpoints
from aegan_jax import cli
from aegan_jax import workdir_lock
from data_prep import files
from tests_helpers import disk_full, launch_config


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_save_is_one_line_and_resume_works_after(
    prepared, tmp_path, capfd, monkeypatch):
  assert cli.run(launch_config(prepared, num_steps=2), tmp_path) == 0
  capfd.readouterr()
  with monkeypatch.context() as patch:
    disk_full(patch, tmp_path / 'checkpoints')
    assert cli.run(launch_config(prepared, num_steps=4), tmp_path) == 2
  err = capfd.readouterr().err
  assert 'Traceback' not in err, err
  error_lines = [line for line in err.splitlines() if line.startswith('error: ')]
  assert error_lines == [err.strip().splitlines()[-1]], err
  assert error_lines[0].startswith(f'error: {tmp_path / "checkpoints"}: a checkpoint could not '
                                   'be written (no space left on device); the checkpoints '
                                   'written before it are intact (latest: step 2)')
  assert checkpoints.complete_steps(tmp_path / 'checkpoints') == [2]
  assert not (tmp_path / workdir_lock.LOCK_NAME).exists()
  # Space freed: the same command resumes from the intact checkpoint.
  assert cli.run(launch_config(prepared, num_steps=4), tmp_path) == 0
  assert 'resuming from step 2' in capfd.readouterr().out
  assert checkpoints.complete_steps(tmp_path / 'checkpoints') == [2, 4]


@pytest.mark.slow
def test_disk_full_at_the_start_leaves_no_lock_and_no_half_written_file(
    prepared, tmp_path, capsys, monkeypatch):
  with monkeypatch.context() as patch:
    disk_full(patch, tmp_path)
    assert cli.run(launch_config(prepared, num_steps=1), tmp_path) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'No space left on device' in err, err
  assert err.count('\n') == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == []  # no empty run.lock, no config.json
  assert cli.run(launch_config(prepared, num_steps=1), tmp_path) == 0


@pytest.mark.slow
def test_an_empty_or_unreadable_lock_is_taken_over_with_a_warning(prepared, tmp_path, capsys):
  lock = tmp_path / workdir_lock.LOCK_NAME
  for content in ('', '{"pid": '):  # a crash between creating the lock and writing it
    lock.write_text(content)
    assert cli.run(launch_config(prepared, num_steps=1), tmp_path) == 0
    err = capsys.readouterr().err
    assert f'warning: taking over {lock}, which is empty or unreadable' in err, err
    assert 'PID None' not in err and not lock.exists()


def test_a_lock_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
  lock = tmp_path / 'x.lock'
  with monkeypatch.context() as patch:
    disk_full(patch, tmp_path)
    with pytest.raises(OSError, match='No space left'):
      files.acquire_lock(lock)
  assert list(tmp_path.iterdir()) == []
  assert files.acquire_lock(lock) == lock
  owner = json.loads(lock.read_text())
  assert owner['pid'] == os.getpid() and owner['host'] == socket.gethostname()
  with pytest.raises(files.LockBusy):  # held by a live process (this one)
    files.acquire_lock(lock)
  files.release_lock(lock)
  assert not lock.exists()
