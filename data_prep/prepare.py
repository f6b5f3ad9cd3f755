"""Raw NIfTI subjects -> normalised 2D slices in a TFDS ArrayRecord dataset.

``prepare_dataset`` is the single entry point (the CLI ``python -m data_prep``
and the training job both call it).  Output, written into a temporary folder beside
``dst`` and renamed into place only when complete:

  dst/manifest.json                     every choice and per-subject geometry
  dst/aegan_slices/1.0.0/*.array_record TFDS dataset, one record per slice

Records: ``images`` [S, S, M] float16, ``seg`` [S, S] uint8 (zeros when the
subject has no segmentation; see ``has_seg``), ``subject_id``, ``slice_index``,
``example_id`` (position in its split).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import tempfile
import time

import numpy as np

from data_prep import files
from data_prep import layouts
from data_prep import manifest
from data_prep import nifti
from data_prep import preprocess
from data_prep import tfds_writer
from data_prep.errors import DataError

# ---------------------------------------------------------------- validation


def _named_paths(case: layouts.Case):
  """(name, path) of every file of the subject, lazily: a missing modality is
  reported when its turn comes, after any earlier file's problem."""
  for name in list(case.modalities) + (['seg'] if case.seg is not None else []):
    path = case.path_for(name)
    if name != 'seg' and name not in case.files:
      raise DataError(f'{path}: missing {name} for subject '
                      f'{case.subject_id}')
    yield name, path


def validate_headers(case: layouts.Case) -> dict:
  """Checks presence, readability, shapes and affines; reads no voxels.

  Returns ``{'shape', 'affine'}`` of the subject.
  """
  image, shape = nifti.read_headers(_named_paths(case))
  return {'shape': list(shape),
          'affine': np.asarray(image.affine).round(6).tolist()}


def load_subject(case: layouts.Case, header: dict, options: dict) -> dict:
  """Reads, checks and slices one subject (thread-safe)."""
  shape = tuple(header['shape'])
  method = options['normalise']
  fill = preprocess.background_value(method)
  normalised, params, brain = [], {}, np.zeros(shape, bool)
  for modality in case.modalities:
    volume = nifti.read_voxels(case.files[modality], shape)
    if not volume.any():
      raise DataError(f'{case.files[modality]}: every voxel is 0 (no {modality} image of '
                      f'subject {case.subject_id})')
    brain |= volume != 0
    normed, params[modality] = preprocess.normalise_volume(volume, method)
    normalised.append(normed)
  try:
    indices = preprocess.select_slices(brain, options['slices'])
  except DataError as exc:
    raise DataError(f'{case.files[case.modalities[0]]}: {exc}') from None
  if not indices:
    raise DataError(f'{case.directory}: no slice matches --slices '
                    f'{options["slices"]}')
  images = np.stack([
      preprocess.volume_to_slices(v, indices, options['geometry'],
                                  options['image_size'], fill)
      for v in normalised], axis=-1).astype(manifest.IMAGE_DTYPE)
  size = options['image_size']
  seg = np.zeros((len(indices), size, size), np.uint8)
  if case.seg is not None:
    labels = nifti.read_labels(case.seg, shape)
    seg = preprocess.volume_to_slices(labels, indices, options['geometry'],
                                      size, labels=True).astype(np.uint8)
  return {'images': images, 'seg': seg, 'slices': indices,
          'normalisation': params}


# ----------------------------------------------------------------- splitting


def check_split(ratios, seed) -> None:
  ratios = np.asarray(ratios, np.float64)
  if ratios.shape != (3,) or not np.isfinite(ratios).all() or (ratios < 0).any() or \
      ratios.sum() <= 0:
    raise DataError(f'--split-ratios {",".join(str(r) for r in ratios.ravel())}: expected '
                    'three non-negative finite numbers with a positive sum')
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise DataError(f'--split-seed {seed}: must be a non-negative integer')


def assign_splits(subject_ids, ratios, seed) -> dict[str, str]:
  """Seeded subject-level split: subject id -> 'train' | 'val' | 'test'."""
  check_split(ratios, seed)
  ratios = np.asarray(ratios, np.float64)
  ratios = ratios / ratios.sum()
  ids = sorted(subject_ids)
  count = len(ids)
  # At least one subject in every requested split once there are enough.
  val, test = (max(int(round(r * count)), int(r > 0 and count >= 3))
               for r in ratios[1:])
  test = min(test, count - val)
  order = np.random.default_rng(seed).permutation(count)
  names = ['train'] * (count - val - test) + ['val'] * val + ['test'] * test
  return {ids[i]: names[rank] for rank, i in enumerate(order)}


# ------------------------------------------------------------------- driver


def _fingerprint(cases, options) -> str:
  """Hash of the inputs (path, size, mtime of every file) and the options.

  File stats rather than contents: hashing tens of GB of NIfTI would cost more
  than preparing them.
  """
  digest = hashlib.sha256(json.dumps(
      {'version': manifest.FORMAT_VERSION, 'options': options}, sort_keys=True).encode())
  for case in cases:
    paths = list(case.files.values()) + ([case.seg] if case.seg else [])
    for path in sorted(paths):
      stat = path.stat()
      digest.update(f'{case.subject_id}|{path.resolve()}|{stat.st_size}|'
                    f'{stat.st_mtime_ns}\n'.encode())
  return digest.hexdigest()


def _check_destination(dst: pathlib.Path, sources) -> None:
  """The output may neither be, lie inside, nor contain a raw source folder, and must be
  writable (checked before the long work, creating nothing)."""
  if dst.exists() and not dst.is_dir():
    raise DataError(f'--dst {dst} is a file; give a folder')
  for src in sources:
    if layouts.paths_overlap(dst, src):
      raise DataError(f'--dst {dst} overlaps the raw data {src}: choose a folder outside it')
  try:
    files.check_writable(dst.parent)
  except OSError as e:
    raise DataError(f'--dst {dst}: cannot write there ({e.strerror or e})') from None


def _check_options(normalise, slices, geometry, image_size, workers, split_ratios, split_seed):
  if normalise not in preprocess.NORMALISATIONS:
    raise DataError(f'--normalise {normalise!r}: expected one of '
                    f'{preprocess.NORMALISATIONS}')
  preprocess.parse_slices(slices)
  if geometry not in preprocess.GEOMETRIES:
    raise DataError(f'--geometry {geometry!r}: expected one of '
                    f'{preprocess.GEOMETRIES}')
  if not 1 <= image_size <= preprocess.MAX_IMAGE_SIZE:
    raise DataError(f'--image-size {image_size}: must be from 1 to {preprocess.MAX_IMAGE_SIZE}')
  if workers < 1:
    raise DataError(f'--workers {workers}: must be at least 1')
  check_split(split_ratios, split_seed)


def _discover(src, split_sources, dataset, modalities):
  """Cases, and the fixed split of each when sources are given per split."""
  if split_sources:
    cases, fixed = [], {}
    for split, root in split_sources.items():
      if split not in manifest.SPLITS:
        raise DataError(f'unknown split {split!r}; expected {manifest.SPLITS}')
      for case in layouts.find_cases(root, dataset, modalities):
        if case.subject_id in fixed:
          raise DataError(f'{case.directory}: subject {case.subject_id} '
                          f'also appears in the {fixed[case.subject_id]} '
                          'source')
        fixed[case.subject_id] = split
        cases.append(case)
  elif src is None:
    raise DataError('give --src, or --train-src/--val-src/--test-src')
  else:
    cases, fixed = layouts.find_cases(src, dataset, modalities), None
  if len({c.modalities for c in cases}) > 1:
    raise DataError('sources mix BraTS and ISLES2015 subjects')
  return cases, fixed


# The `config.data` fields that are `prepare_dataset` keywords (the training job passes them on).
CONFIG_FIELDS = ('dataset', 'modalities', 'normalise', 'slices', 'geometry', 'image_size',
                 'split_ratios', 'split_seed')


def _options(cases, fixed_splits, src, split_sources, choices) -> dict:
  """What the manifest records as the preparation's options (and the content hash covers)."""
  return {
      'dataset': cases[0].dataset, **choices,
      'image_size': int(choices['image_size']),
      'split_ratios': None if fixed_splits else [float(r) for r in choices['split_ratios']],
      'split_seed': None if fixed_splits else int(choices['split_seed']),
      'split_sources': ({k: str(pathlib.Path(v).resolve())
                         for k, v in split_sources.items()}
                        if fixed_splits else None),
      'src': None if fixed_splits else str(pathlib.Path(src).resolve()),
      # A generic dataset's names and their order are a choice of the user's.
      **({'modalities': list(cases[0].modalities)} if cases[0].dataset == 'generic' else {}),
  }


def _up_to_date_report(dst, content_hash, start) -> dict | None:
  """The report of a `dst` already prepared from the same inputs and options, else None
  (also for a damaged manifest, which --overwrite may then replace)."""
  if not (dst / manifest.MANIFEST).is_file():
    return None
  try:
    previous = manifest.load_manifest(dst)
  except DataError:
    return None
  if previous.get('content_hash') != content_hash:
    return None
  return {'dst': str(dst), 'up_to_date': True, 'subjects': len(previous['subjects']),
          'slices': sum(s['slices'] for s in previous['splits'].values()),
          'splits': previous['splits'], 'skipped': previous.get('skipped', []),
          'seconds': time.perf_counter() - start, 'slices_per_second': 0.0}


def _check_replaceable(dst, overwrite: bool) -> None:
  """A non-empty `dst` is replaced only if it is a prepared dataset and --overwrite is set."""
  if not (dst.exists() or dst.is_symlink()):
    return
  if not dst.is_dir():
    raise DataError(f'--dst {dst} is a file; give a folder')
  if any(dst.iterdir()):
    if not (dst / manifest.MANIFEST).is_file():
      raise DataError(f'{dst} is not empty and holds no prepared dataset ({manifest.MANIFEST}); '
                      'choose another --dst (--overwrite replaces prepared datasets only)')
    if not overwrite:
      raise DataError(f'{dst}: was prepared from other inputs or options; pass --overwrite '
                      'or choose another --dst')


def _validate_cases(cases, skip_bad: bool):
  """(headers by subject, valid cases, skipped [{subject_id, reason}])."""
  headers, good, skipped = {}, [], []
  for case in cases:
    try:
      headers[case.subject_id] = validate_headers(case)
      good.append(case)
    except DataError as exc:
      if not skip_bad:
        raise
      skipped.append({'subject_id': case.subject_id, 'reason': str(exc)})
  return headers, good, skipped


@contextlib.contextmanager
def _destination_lock(dst: pathlib.Path):
  """One preparation per destination at a time (`.DST.lock` beside it, as for workdirs)."""
  dst.parent.mkdir(parents=True, exist_ok=True)
  path = dst.parent / f'.{dst.name}.lock'
  try:
    files.acquire_lock(path)
  except files.LockBusy as e:
    raise DataError(f'--dst {dst} is being prepared by PID {e.owner.get("pid")} on '
                    f'{e.owner.get("host")} (since {e.owner.get("started")}); wait for it to '
                    'finish or choose another --dst') from None
  except OSError as e:
    raise DataError(f'{path}: cannot write the lock ({e.strerror or e})') from None
  try:
    yield
  finally:
    files.release_lock(path)


_LEFTOVER = r'(?:partial|old)-(?P<host>.+)-(?P<pid>\d+)-[^-]+$'


def _remove_dead_leftovers(dst: pathlib.Path) -> None:
  """Removes `.DST.partial-*` and `.DST.old-*` folders of preparations that died on this
  host (kill -9 skips every clean-up); those of live processes stay."""
  pattern = re.compile(re.escape(f'.{dst.name}.') + _LEFTOVER)
  host = socket.gethostname()
  for path in dst.parent.iterdir():
    match = pattern.match(path.name)
    if (match and match['host'] == host and path.is_dir() and not path.is_symlink() and
        not files.pid_alive(int(match['pid']))):
      shutil.rmtree(path, ignore_errors=True)


def _swap_in(staging: pathlib.Path, dst: pathlib.Path, overwrite: bool) -> None:
  """Renames `staging` to `dst`.  What sits at `dst` is checked again first: something may
  have appeared there during the preparation, and only a prepared dataset is replaced."""
  _check_replaceable(dst, overwrite)
  if dst.is_dir() and not dst.is_symlink() and any(dst.iterdir()):  # --overwrite
    retired = pathlib.Path(tempfile.mkdtemp(
        prefix=f'.{dst.name}.old-{files.owner_tag()}-', dir=dst.parent))
    os.replace(dst, retired / dst.name)
    os.replace(staging, dst)
    shutil.rmtree(retired, ignore_errors=True)
    return
  try:  # Atomic: fails if a non-empty folder appears at `dst` after the check above.
    os.rename(staging, dst)
  except OSError as e:
    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
      raise
    raise DataError(f'--dst {dst}: something appeared there during the preparation; '
                    'nothing was replaced: choose another --dst') from None


def _write(plan, dst: pathlib.Path, content_hash: str, overwrite: bool) -> dict:
  """Writes the dataset beside `dst`, then swaps it in; returns the manifest."""
  staging = pathlib.Path(tempfile.mkdtemp(
      prefix=f'.{dst.name}.partial-{files.owner_tag()}-', dir=dst.parent))
  try:
    tfds_writer.write_tfds(plan, staging)
    plan.close()
    record = manifest.build(plan, content_hash)
    (staging / manifest.MANIFEST).write_text(json.dumps(record, indent=1))
    # mkdtemp makes 0700; the dataset gets the mode of a plain mkdir (shared clusters).
    os.chmod(staging, 0o777 & ~files.current_umask())
    _swap_in(staging, dst, overwrite)
  except OSError as e:
    plan.close()
    shutil.rmtree(staging, ignore_errors=True)
    raise DataError(f'--dst {dst}: cannot write the prepared dataset ({e.strerror or e}); '
                    'nothing was replaced') from None
  except BaseException:
    plan.close()
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return record


def prepare_dataset(src, dst, *, dataset='auto', modalities=None, normalise='max',
                    slices='official', geometry='resize', image_size=256,
                    split_ratios=(0.8, 0.1, 0.1), split_seed=0,
                    split_sources=None, skip_bad=False, workers=1,
                    overwrite=False, progress=True) -> dict:
  """Prepares ``dst`` from the raw subjects under ``src``.

  Args:
    src: raw dataset root (any supported layout), or None with ``split_sources``.
    dst: output folder; must not exist, hold the same preparation (then nothing is
      done), or ``overwrite`` must be set.
    dataset: 'auto', 'brats', 'isles2015' or 'generic'.
    modalities: a generic dataset's modality names, in channel order.
    normalise: 'max' (official), 'percentile' or 'zscore'.
    slices: 'official' (axial 78), 'range:A:B' or 'nonempty:F'.
    geometry: 'resize' (bilinear, official) or 'pad' (exactly invertible).
    image_size: output slice side.
    split_ratios: train/val/test fractions of subjects.
    split_seed: seed of the subject-level split.
    split_sources: optional {'train'|'val'|'test': raw root}; the split follows them.
    skip_bad: skip invalid subjects (listed in the report) instead of failing.
    workers: threads reading NIfTI.
    overwrite: replace a ``dst`` prepared with other inputs or options.
    progress: show a tqdm bar on stderr.

  Returns:
    Report dict: dst, up_to_date, subjects, slices, splits, skipped, seconds,
    slices_per_second.

  Raises:
    DataError: any problem with the inputs or options (one-line message).
  """
  start = time.perf_counter()
  dst = pathlib.Path(dst)
  _check_destination(dst, [src] if src is not None else list((split_sources or {}).values()))
  _check_options(normalise, slices, geometry, image_size, workers, split_ratios, split_seed)
  cases, fixed_splits = _discover(src, split_sources, dataset, modalities)
  options = _options(cases, fixed_splits, src, split_sources, {
      'normalise': normalise, 'slices': slices, 'geometry': geometry, 'image_size': image_size,
      'split_ratios': split_ratios, 'split_seed': split_seed, 'skip_bad': bool(skip_bad)})
  content_hash = _fingerprint(cases, options)
  up_to_date = _up_to_date_report(dst, content_hash, start)
  if up_to_date:
    return up_to_date
  _check_replaceable(dst, overwrite)
  plan = _plan(cases, fixed_splits, options, src, workers=workers, skip_bad=skip_bad,
               progress=progress)
  with _destination_lock(dst):
    # Another preparation may have finished while this one validated.
    up_to_date = _up_to_date_report(dst, content_hash, start)
    if up_to_date:
      plan.close()
      return up_to_date
    _remove_dead_leftovers(dst)
    record = _write(plan, dst, content_hash, overwrite)
  seconds = time.perf_counter() - start
  total = sum(plan.slice_counts.values())
  return {'dst': str(dst), 'up_to_date': False, 'subjects': len(plan.subjects),
          'slices': total, 'splits': record['splits'], 'skipped': plan.skipped,
          'seconds': seconds, 'slices_per_second': total / max(seconds, 1e-9)}


def _plan(cases, fixed_splits, options, src, *, workers, skip_bad, progress):
  """Validates every subject's headers, splits the valid ones and plans the writing."""
  headers, good, skipped = _validate_cases(cases, skip_bad)
  if not good:
    raise DataError(f'{src}: no valid subject left to prepare')
  splits = fixed_splits or assign_splits(
      [c.subject_id for c in good], options['split_ratios'], options['split_seed'])
  plan = tfds_writer.Plan(good, headers, splits, options, list(good[0].modalities),
                          workers, skip_bad, progress, load_subject)
  plan.skipped.extend(skipped)
  return plan
