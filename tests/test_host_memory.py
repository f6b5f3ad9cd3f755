"""`host_memory.keep_freed_memory`: a repeated training-like CPU computation stops faulting
its temporaries in afresh.

The workload is a gradient step of a small convolution stack (about 80 MB of temporaries,
above glibc's largest mmap threshold, so by default each execution maps and zeroes them
anew).  Faults are counted over the last 12 of 20 executions, after the heap has grown to
its working size.  glibc before 2.38 does not always reuse a freed block for an aligned
request of the same size (docs/speed.md), so a kept execution may still, rarely, fault one
block afresh; a default execution maps all of them every time.
"""
import os
import subprocess
import sys

import pytest

from tests_helpers import ROOT


_SCRIPT = """
import resource, sys
from aegan_jax import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == 'keep' else None
import jax, jax.numpy as jnp

def loss(kernels, x):
  for k in kernels:
    x = jnp.tanh(jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                              dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  return jnp.mean(x ** 2)

@jax.jit
def step(kernels, x):
  grads = jax.grad(loss)(kernels, x)
  return [k - 0.01 * g for k, g in zip(kernels, grads)]

keys = jax.random.split(jax.random.PRNGKey(0), 5)
kernels = [0.1 * jax.random.normal(k, (3, 3, 16, 16)) for k in keys[:4]]
x = jax.random.normal(keys[4], (8, 128, 128, 16))
faults = []
for _ in range(20):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  kernels = jax.block_until_ready(step(kernels, x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sum(faults[8:]), float(sum(jnp.sum(k) for k in kernels)))
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
  assert default_faults > 12 * 15_000  # 12 executions, each mapping ~80 MB of 4 KiB pages
  assert kept_faults * 4 < default_faults
  assert kept_value == default_value
