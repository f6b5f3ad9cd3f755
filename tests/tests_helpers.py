"""Small builders shared by tests."""
import builtins
import errno
import io
import os
import pathlib

import jax
import numpy as np
import pytest

from aegan_jax import checkpoints
from aegan_jax import modalities
from aegan_jax import models
from aegan_jax import train
from configs import brats
from configs import demo
from data_prep import phantom
from data_prep import prepare

SIZE = 32
ROOT = pathlib.Path(__file__).resolve().parents[1]  # the project


def random_variables(generator, size=SIZE, seed=0):
  """Freshly initialised variables of a generator (either kind) at `size` px."""
  return generator.init({'params': jax.random.PRNGKey(seed)},
                        *models.example_inputs(generator, size), train=False)


def prepared_phantom(root, subjects=4, *, seed=1, shape=(40, 40, 24), **options):
  """Phantom subjects written to <root>/raw and prepared into <root>/prepared (returned);
  `options` are `prepare_dataset`'s (defaults: 32 px, slices 8:16, split 0.5/0.25/0.25)."""
  root = pathlib.Path(root)
  phantom.write_phantom_dataset(root / 'raw', subjects, seed=seed, shape=shape)
  options = {'image_size': 32, 'slices': 'range:8:16', 'split_ratios': (0.5, 0.25, 0.25),
             'progress': False, **options}
  prepare.prepare_dataset(root / 'raw', root / 'prepared', **options)
  return root / 'prepared'


def tiny_config(num_blocks=2, **fields):
  """The official config with a small network; `fields` as {'group.name': value}."""
  config = brats.get_config()
  config.model.ngf = 8
  config.model.num_blocks = num_blocks
  for key, value in fields.items():
    group, name = key.split('.')
    config[group][name] = value
  return config


def phantom_image_batch(size=SIZE, n=4, seed=0):
  """Realistic continuous slices: n axial phantom slices at size x size, all modalities.

  Each slice comes from its own phantom subject, normalised like prepared data
  (official max normalisation, background -1); targets cycle over modalities.
  """
  from data_prep import preprocess  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  slices = []
  for _ in range(n):
    subject = phantom.make_subject(rng, shape=(size, size, 16))
    slices.append(np.stack(
        [preprocess.volume_to_slices(preprocess.normalise_volume(subject['volumes'][m])[0], [8],
                                     image_size=size)[0] for m in phantom.MODALITIES], -1))
  targets = (np.arange(n) + seed) % 4
  return {'images': np.stack(slices).astype(np.float32), 'target_index': targets,
          'available': modalities.all_but_target(targets, 4)}


def launch_config(prepared_dir, **train_fields):
  """The demo config shrunk for the training-job tests (32 px, ngf 8, one block, batch norm),
  with the `prepared` fixture's preprocessing."""
  config = demo.get_config()
  config.data.prepared_dir = str(prepared_dir)
  config.data.image_size = 32
  config.data.slices = 'range:8:16'             # as the `prepared` fixture was made
  config.data.split_ratios = (0.5, 0.25, 0.25)
  config.model.ngf = 8
  config.model.num_blocks = 1
  config.model.norm = 'batch'  # official; the running statistics go through checkpoints
  config.train.global_batch_size = 4
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.train.sample_every = 2
  config.train.evaluate_at_end = False
  for key, value in train_fields.items():
    config.train[key] = value
  return config


def restored_state(workdir, config, step=None):
  t = train.make_trainer(config, 4)
  template = train.init_state(t, jax.random.PRNGKey(99), config.data.image_size)
  manager = checkpoints.make_manager(workdir)
  state = checkpoints.restore_train_state(manager, step or manager.latest_step(), template)
  manager.close()
  return state


def assert_states_equal(a, b):
  for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(leaf_a), np.asarray(leaf_b))


class _FullFile:
  """A file object on a full disk: every write fails with ENOSPC."""

  def __init__(self, handle):
    self._handle = handle

  def write(self, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._handle.name)

  def __getattr__(self, name):
    return getattr(self._handle, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._handle.close()

  def __iter__(self):
    return iter(self._handle)


def disk_full(monkeypatch, folder):
  """Simulates a full file system under `folder`: writes to files there, through open(),
  pathlib or os.write, fail with OSError(ENOSPC).  Creating files and folders still works,
  as it often does on a full disk."""
  folder = os.path.realpath(folder)

  def inside(target):
    if isinstance(target, int):
      try:
        target = os.readlink(f'/proc/self/fd/{target}')
      except OSError:
        return False
    return os.path.realpath(os.fspath(target)).startswith(folder + os.sep)

  real_open, real_write = io.open, os.write

  def full_open(file, mode='r', *args, **kwargs):
    handle = real_open(file, mode, *args, **kwargs)
    return _FullFile(handle) if any(c in mode for c in 'wax+') and inside(file) else handle

  def full_write(fd, data):
    if inside(fd):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_write(fd, data)

  monkeypatch.setattr(builtins, 'open', full_open)
  monkeypatch.setattr(io, 'open', full_open)
  monkeypatch.setattr(os, 'write', full_write)


def unwritable_folder(tmp_path, blocked: str, name: str):
  """`tmp_path/<name>/out` that cannot be created: below a file ('file', unwritable even
  for root) or inside a read-only folder ('readonly'; skipped as root, who writes there)."""
  if blocked == 'file':
    (tmp_path / name).write_text('x')
    return tmp_path / name / 'out'
  if os.geteuid() == 0:
    pytest.skip('root writes into read-only folders')
  (tmp_path / 'ro').mkdir()
  (tmp_path / 'ro').chmod(0o555)
  return tmp_path / 'ro' / 'out'
