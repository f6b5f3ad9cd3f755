"""One run per workdir: `<workdir>/run.lock` names the process that trains (or imports) there.

A second launch on a locked workdir stops with one line naming the running
process.  A lock whose owner cannot be running is taken over with a warning:
one left by a process that died on this host, or an empty or unreadable one
(`data_prep.files` writes locks whole, so no live run has such a lock).  Several
hosts share one lock, held by process 0.
"""
from __future__ import annotations

import pathlib

from data_prep import files

LOCK_NAME = 'run.lock'


class WorkdirLocked(ValueError):
  """Another run holds the workdir, or the lock cannot be written (one-line message)."""


def acquire(workdir) -> pathlib.Path:
  path = pathlib.Path(workdir) / LOCK_NAME
  try:
    return files.acquire_lock(path)
  except files.LockBusy as e:
    owner = e.owner
    raise WorkdirLocked(
        f'{workdir} is in use by PID {owner.get("pid")} on {owner.get("host")} (since '
        f'{owner.get("started")}); wait for that run or choose another --workdir') from None
  except OSError as e:
    raise WorkdirLocked(f'{path}: cannot write the lock ({e.strerror or e})') from None


def release(path) -> None:
  files.release_lock(path)
