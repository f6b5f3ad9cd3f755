"""Shared test setup: 4 simulated CPU devices, so multi-device tests run here.

The flag must be set before jax is imported anywhere.
"""
import os
import pathlib

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

FIXTURE = (pathlib.Path(__file__).resolve().parents[1].parent / 'shared' /
           'fixtures' / 'aegan_parity_ngf8.npz')


@pytest.fixture(scope='session')
def parity_fixture_path():
  if not FIXTURE.exists():
    pytest.skip(f'official fixture not found at {FIXTURE}')
  return FIXTURE
