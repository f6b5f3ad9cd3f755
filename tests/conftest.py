"""Shared test setup: 4 simulated CPU devices, so multi-device tests run here.

The flag must be set before jax is imported anywhere.
"""
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for this session and the launches it spawns: many
# tests build the same small jitted programs anew, and compiling dominates their time.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='aegan-jax-xla-')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import pytest  # noqa: E402

FIXTURE = (pathlib.Path(__file__).resolve().parents[1].parent / 'shared' /
           'fixtures' / 'aegan_parity_ngf8.npz')


@pytest.fixture(scope='session')
def parity_fixture_path():
  if not FIXTURE.exists():
    pytest.skip(f'official fixture not found at {FIXTURE}')
  return FIXTURE


@pytest.fixture(scope='session')
def prepared(tmp_path_factory):
  """A prepared phantom dataset: 4 subjects, 32 px, 8 slices each (training-job tests)."""
  from tests_helpers import prepared_phantom  # after the XLA flags above
  return prepared_phantom(tmp_path_factory.mktemp('data'))


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: longer end-to-end runs; `-m "not slow"` is the '
                          'fast tier for working in a loop (CI runs everything)')


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if '_CACHE' in globals():
    shutil.rmtree(_CACHE, ignore_errors=True)
