"""File-system helpers for every command that writes: owner locks, a write probe, atomic writes.

  * ``acquire_lock(path)``: one owner per lock file (the training workdir's ``run.lock``,
    a preparation's ``.DST.lock``).  The lock is written whole or not at all, so an
    empty or unreadable lock was never written by a live owner and is taken over with a
    warning, as is a lock whose owner has died on this host.
  * ``check_writable(folder)``: fails before long work when ``folder`` cannot be made or
    written; creates nothing that stays.
  * ``write_text_atomically(path, text)``: a file is either the old one or the whole new one.

Imports nothing from ``aegan_jax`` (which uses these helpers too).
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import socket
import sys
import tempfile
import time


class LockBusy(Exception):
  """A live owner (or one that cannot be checked from here) holds the lock."""

  def __init__(self, path, owner: dict):
    super().__init__(f'{path} is held by PID {owner.get("pid")} on {owner.get("host")}')
    self.owner = owner


def pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process: alive.
    return True
  return True


def current_umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def owner_tag() -> str:
  """`<host>-<pid>`: names this process's temporary files, so that leftovers of a process
  that died can be told from those of a live one."""
  return f'{socket.gethostname()}-{os.getpid()}'


def write_text_atomically(path, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it into place; on any
  failure (a full disk) the temporary file is removed and `path` is untouched."""
  path = pathlib.Path(path)
  tmp = path.with_name(f'.{path.name}.{owner_tag()}.tmp')
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def check_writable(folder) -> None:
  """Raises OSError unless `folder` takes a new file, or, when it does not exist yet, its
  nearest existing parent does (so that it can be made).  Leaves nothing behind."""
  existing = pathlib.Path(folder).absolute()
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise NotADirectoryError(errno.ENOTDIR, 'a file is in the way', str(existing))
  with tempfile.TemporaryFile(dir=existing):  # A unique name: several hosts may probe at once.
    pass


# --------------------------------------------------------------------------
# Owner locks.


def _lock_text() -> str:
  return json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                     'started': time.strftime('%Y-%m-%d %H:%M:%S')})


def _create(path: pathlib.Path) -> bool:
  """Writes the lock if no file is there; False when one exists.

  The text goes to a temporary file first, which is then hard-linked to `path` (atomic,
  and it fails if `path` exists): a lock is never seen empty or half written.
  """
  tmp = path.with_name(f'.{path.name}.{owner_tag()}.tmp')
  try:
    tmp.write_text(_lock_text())
    os.link(tmp, path)
  except FileExistsError:
    return False
  except OSError as e:
    if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP) or not tmp.exists():
      raise
    return _create_exclusive(path)  # A file system without hard links.
  finally:
    tmp.unlink(missing_ok=True)
  return True


def _create_exclusive(path: pathlib.Path) -> bool:
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(_lock_text())
  except BaseException:
    path.unlink(missing_ok=True)  # Ours: an empty lock would block every later run.
    raise
  return True


def read_owner(path) -> dict | None:
  """The lock's {pid, host, started}; {} when it is empty or unreadable, None when gone."""
  try:
    owner = json.loads(pathlib.Path(path).read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}
  return owner if isinstance(owner, dict) and isinstance(owner.get('pid'), int) else {}


def _stale(owner: dict) -> str:
  """Why the owner cannot be running, to end the warning ('' when it may be running)."""
  if not owner:
    return ', which is empty or unreadable (left by a process that stopped while writing it)'
  if owner.get('host') == socket.gethostname() and not pid_alive(owner['pid']):
    return f' from PID {owner["pid"]}, which is no longer running'
  return ''


def _take_over(path: pathlib.Path, judged: os.stat_result) -> bool:
  """Removes the stale lock judged from `judged`; if another process replaced it in the
  meantime, that lock is put back and False returned."""
  aside = path.with_name(f'.{path.name}.stale-{owner_tag()}')
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return False
  moved = os.stat(aside)
  if (moved.st_ino, moved.st_dev) != (judged.st_ino, judged.st_dev):
    try:
      os.link(aside, path)
    except FileExistsError:
      pass
    os.unlink(aside)
    return False
  os.unlink(aside)
  return True


def acquire_lock(path) -> pathlib.Path:
  """Creates lock file `path` for this process.

  Raises LockBusy when a live owner holds it, or one on another host (which cannot be
  checked from here); OSError when it cannot be written (e.g. a full disk).
  """
  path = pathlib.Path(path)
  for _ in range(3):
    if _create(path):
      return path
    try:
      judged = os.stat(path)
    except FileNotFoundError:
      continue
    owner = read_owner(path)
    if owner is None:
      continue
    reason = _stale(owner)
    if not reason:
      raise LockBusy(path, owner)
    if _take_over(path, judged):
      print(f'warning: taking over {path}{reason}', file=sys.stderr, flush=True)
  raise LockBusy(path, read_owner(path) or {})


def release_lock(path) -> None:
  """Removes `path` if this process holds it."""
  owner = read_owner(path)
  if owner and owner.get('pid') == os.getpid() and owner.get('host') == socket.gethostname():
    pathlib.Path(path).unlink(missing_ok=True)
