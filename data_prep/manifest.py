"""The prepared dataset's manifest and layout: what training, evaluation and synthesis
read of a `python -m data_prep` output, and the manifest's format."""
from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from data_prep import nifti
from data_prep import preprocess
from data_prep.errors import DataError

MANIFEST = 'manifest.json'
FORMAT_VERSION = 1
BUILDER_NAME = 'aegan_slices'
BUILDER_VERSION = '1.0.0'
SPLITS = ('train', 'val', 'test')
IMAGE_DTYPE = np.float16


# Top-level manifest entries every reader relies on, and their types.
_MANIFEST_ENTRIES = {'modalities': list, 'image_size': int, 'options': dict, 'splits': dict,
                     'subjects': dict, 'background_value': (int, float)}


def load_manifest(prepared_dir) -> dict:
  """Reads ``prepared_dir/manifest.json``; one-line DataError when it is missing or damaged."""
  path = pathlib.Path(prepared_dir) / MANIFEST
  if not path.is_file():
    raise DataError(f'{path}: not found; run python -m data_prep first')
  try:
    manifest = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f'{path}: damaged ({nifti.one_line(e)}); prepare again with '
                    '--overwrite') from None
  if not isinstance(manifest, dict):
    raise DataError(f'{path}: damaged (not a JSON object); prepare again with --overwrite')
  for key, kind in _MANIFEST_ENTRIES.items():
    if not isinstance(manifest.get(key), kind):
      raise DataError(f'{path}: damaged (no valid {key!r} entry); prepare again with '
                      '--overwrite')
  return manifest


def file_stat(path) -> list[int]:
  stat = pathlib.Path(path).stat()
  return [stat.st_size, stat.st_mtime_ns]


def source_file_problem(entry: dict) -> str:
  """'' when every source file of a manifest subject entry is still the one prepared
  (same size and modification time, as in the content hash); else what differs."""
  stats = entry.get('file_stats')
  if not stats:
    return 'the manifest records no fingerprint of them (prepared by an earlier version)'
  for path, recorded in stats.items():
    try:
      if file_stat(path) != recorded:
        return f'{path} has changed since the preparation (size or modification time)'
    except OSError as e:
      return f'{path}: {e.strerror or e}'
  return ''


def tfds_dir(prepared_dir) -> pathlib.Path:
  return pathlib.Path(prepared_dir) / BUILDER_NAME / BUILDER_VERSION


def build(plan, content_hash) -> dict:
  """The manifest of a written `tfds_writer.Plan`."""
  size, count = plan.image_size, len(plan.modalities)
  image_bytes = size * size * count * np.dtype(IMAGE_DTYPE).itemsize
  per_split = {s: {'subjects': sum(1 for v in plan.subjects.values()
                                   if v['split'] == s),
                   'slices': plan.slice_counts[s]} for s in SPLITS}
  return {
      'format': 'aegan-jax prepared slices',
      'version': FORMAT_VERSION,
      'content_hash': content_hash,
      'created': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
      'dataset': plan.options['dataset'],
      'modalities': plan.modalities,
      'image_size': size,
      'options': plan.options,
      'background_value': preprocess.background_value(
          plan.options['normalise']),
      'slice_axis': 2,
      'slice_orientation': 'vol[:, :, z] stored as [H, W] = [X, Y], unrotated',
      'storage': {
          'tfds_name': BUILDER_NAME, 'tfds_version': BUILDER_VERSION,
          'tfds_path': f'{BUILDER_NAME}/{BUILDER_VERSION}',
          'file_format': 'array_record', 'images_dtype': 'float16',
          'seg_dtype': 'uint8',
          'bytes_per_slice': {'images': image_bytes, 'seg': size * size},
      },
      'splits': per_split,
      'skipped': plan.skipped,
      'subjects': plan.subjects,
  }
