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
  from data_prep import phantom, prepare
  root = tmp_path_factory.mktemp('data')
  phantom.write_phantom_dataset(root / 'raw', 4, seed=1, shape=(40, 40, 24))
  prepare.prepare_dataset(root / 'raw', root / 'prepared', image_size=32, slices='range:8:16',
                          split_ratios=(0.5, 0.25, 0.25), progress=False)
  return root / 'prepared'


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: takes more than about 10 s (-m "not slow" skips)')


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if '_CACHE' in globals():
    shutil.rmtree(_CACHE, ignore_errors=True)
