"""Keeps the host memory a CPU computation frees for the next one.

XLA:CPU allocates each execution's temporaries afresh: about 0.1, 0.4 and 1 GB per
training iteration at 64, 128 and 256 px.  glibc maps blocks that large on allocation
and unmaps them on free, so the kernel faults in and zeroes the same memory every
iteration (29k-250k page faults, 7-10% of the CPU time on an Intel Xeon).  Executed on
the calling thread, the blocks come from glibc's main heap, which can be told never to
map and never to shrink; the iteration was then 4-11% faster (2-core Intel Xeon,
processes alternating).  The process keeps its peak heap until it exits.

glibc before 2.38 cannot serve an aligned request from a freed block of exactly its size
while a small neighbour sits in the thread cache; the heap then grows by a block, faulted
in afresh, until enough freed blocks have merged (docs/speed.md has the measured growth).
"""
from __future__ import annotations

import ctypes
import sys

import jax

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
  """Runs single-device CPU computations on the calling thread (call before jax's first
  computation) and keeps glibc's freed heap.  Returns False where the C library has no
  `mallopt` (not Linux, or not glibc); GPUs are unaffected either way."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
    return False
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  return True
