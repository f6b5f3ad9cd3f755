"""`host_memory.keep_freed_memory`: a repeated CPU computation stops faulting its
temporaries in afresh."""
import os
import subprocess
import sys

import pytest

from tests_helpers import ROOT


# An execution with ~128 MB of temporaries (two 64 MB operands of a product), run twice to
# warm up (the heap grows to its peak), then twice more while counting minor page faults.
_SCRIPT = """
import resource, sys
from aegan_jax import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == 'keep' else None
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x)).sum())
x = jnp.linspace(0, 1, 4096 * 4096).reshape(4096, 4096)
for _ in range(2):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
value = float(f(x)) + float(f(x))
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, value)
"""


def _faults(mode):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  done = subprocess.run([sys.executable, '-c', _SCRIPT, mode], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=300, check=True)
  kept, faults, value = done.stdout.split()
  return kept, int(faults), float(value)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
def test_kept_memory_is_not_faulted_in_again():
  _, default_faults, default_value = _faults('default')
  kept, kept_faults, kept_value = _faults('keep')
  assert kept == 'True'
  assert default_faults > 40_000  # 2 x 128 MB of 4 KiB pages, mapped afresh
  assert kept_faults * 5 < default_faults
  assert kept_value == default_value
