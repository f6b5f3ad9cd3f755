"""One run per workdir: `<workdir>/run.lock` names the process that trains there.

A second launch on a locked workdir stops with one line naming the running
process; a lock left by a process that has died on this host is taken over
with a warning.  Several hosts share one lock, held by process 0.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import sys
import time

LOCK_NAME = 'run.lock'


class WorkdirLocked(ValueError):
  """Another run holds the workdir (one-line message)."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process: alive.
    return True
  return True


def _create(path: pathlib.Path) -> bool:
  """Writes the lock if no file is there (atomic); False when one exists."""
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    json.dump({'pid': os.getpid(), 'host': socket.gethostname(),
               'started': time.strftime('%Y-%m-%d %H:%M:%S')}, f)
  return True


def _owner(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}


def acquire(workdir) -> pathlib.Path:
  path = pathlib.Path(workdir) / LOCK_NAME
  if _create(path):
    return path
  owner = _owner(path)
  pid, host = owner.get('pid'), owner.get('host')
  if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
    print(f'warning: taking over {path} from PID {pid}, which is no longer running',
          file=sys.stderr)
    path.unlink(missing_ok=True)
    if _create(path):
      return path
    owner = _owner(path)
  raise WorkdirLocked(
      f'{workdir} is in use by PID {owner.get("pid")} on {owner.get("host")} (since '
      f'{owner.get("started")}); wait for that run or choose another --workdir')
