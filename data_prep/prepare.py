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

import collections
import concurrent.futures
import contextlib
import errno
import functools
import hashlib
import io
import itertools
import json
import os
import pathlib
import re
import shutil
import socket
import sys
import tempfile
import time

import numpy as np

from data_prep import files
from data_prep import layouts
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


def _file_stat(path) -> list[int]:
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
      if _file_stat(path) != recorded:
        return f'{path} has changed since the preparation (size or modification time)'
    except OSError as e:
      return f'{path}: {e.strerror or e}'
  return ''


def tfds_dir(prepared_dir) -> pathlib.Path:
  return pathlib.Path(prepared_dir) / BUILDER_NAME / BUILDER_VERSION


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
      for v in normalised], axis=-1).astype(IMAGE_DTYPE)
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


# ------------------------------------------------------------------ storage


@functools.cache
def _builder_class():
  """The TFDS builder, defined lazily so importing this module stays light."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class AeganSlices(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One record per 2D slice; shapes come from the preparation plan."""
    VERSION = tfds.core.Version(BUILDER_VERSION)

    def __init__(self, *, plan, **kwargs):
      self._plan = plan
      super().__init__(**kwargs)

    def _info(self):
      size, count = self._plan.image_size, len(self._plan.modalities)
      tensor = tfds.features.Tensor
      # BYTES encoding: raw buffers, ~8x faster to write than the default.
      return tfds.core.DatasetInfo(
          builder=self,
          description='AE-GAN 2D slices; see manifest.json.',
          features=tfds.features.FeaturesDict({
              'images': tensor(shape=(size, size, count), dtype=IMAGE_DTYPE,
                               encoding=tfds.features.Encoding.BYTES),
              'seg': tensor(shape=(size, size), dtype=np.uint8,
                            encoding=tfds.features.Encoding.BYTES),
              'has_seg': tensor(shape=(), dtype=np.bool_),
              'subject_id': tfds.features.Text(),
              'slice_index': tensor(shape=(), dtype=np.int32),
              'example_id': tensor(shape=(), dtype=np.int64),
          }),
          disable_shuffling=True)  # keep subject/slice order; Grain shuffles

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split)
              for split in self._plan.nonempty_splits()}

    def _generate_examples(self, split):
      yield from self._plan.examples(split)

  return AeganSlices


class _Plan:
  """What to write; the builder pulls examples from it split by split."""

  def __init__(self, cases, headers, splits, options, modalities, workers,
               skip_bad, progress):
    self.cases, self.headers, self.splits = cases, headers, splits
    self.options, self.modalities = options, modalities
    self.image_size = options['image_size']
    self.workers, self.skip_bad = workers, skip_bad
    self.subjects: dict[str, dict] = {}
    self.skipped: list[dict] = []
    self.slice_counts = collections.Counter()
    self.error: DataError | None = None
    self._streams = None
    self._progress = _progress_bar(len(cases), progress)

  def nonempty_splits(self):
    """Splits left with at least one readable subject.

    TFDS cannot write an empty split, and subjects may only turn out bad when
    their voxels are read, so each split is read up to its first good subject
    here; that subject is kept and written first.
    """
    if self._streams is None:
      self._streams = {}
      for split in SPLITS:
        stream = self._good_subjects(split)
        first = next(stream, None)
        if first is not None:
          self._streams[split] = itertools.chain([first], stream)
      if not self._streams:
        self.error = DataError('every subject was skipped')
        raise self.error
    return list(self._streams)

  def _load(self, case):
    try:
      return case, load_subject(case, self.headers[case.subject_id],
                                self.options)
    except DataError as exc:
      return case, exc

  def _good_subjects(self, split):
    cases = [c for c in self.cases if self.splits[c.subject_id] == split]
    for case, result in _ordered_map(self._load, cases, self.workers):
      self._progress.update(1)
      if isinstance(result, DataError):
        if not self.skip_bad:
          self.error = result  # TFDS may wrap it; prepare_dataset re-raises
          raise result
        self.skipped.append({'subject_id': case.subject_id,
                             'reason': str(result)})
        continue
      yield case, result

  def examples(self, split):
    example_id = 0
    for case, result in self._streams[split]:
      self.subjects[case.subject_id] = self._manifest_entry(case, result)
      for i, index in enumerate(result['slices']):
        yield f'{example_id:09d}', {
            'images': result['images'][i], 'seg': result['seg'][i],
            'has_seg': case.seg is not None, 'subject_id': case.subject_id,
            'slice_index': index, 'example_id': example_id}
        example_id += 1
      self.slice_counts[split] += len(result['slices'])

  def _manifest_entry(self, case, result):
    header = self.headers[case.subject_id]
    return {
        'split': self.splits[case.subject_id],
        'layout': case.layout,
        'source_dir': str(case.directory),
        'files': {m: str(p) for m, p in case.files.items()},
        'seg': str(case.seg) if case.seg is not None else None,
        'file_names': {m: case.filename_for(m)
                       for m in list(case.modalities) + ['seg']},
        # Evaluation reads the source files only while they are still these.
        'file_stats': {str(p): _file_stat(p) for p in
                       list(case.files.values()) + [case.seg] if p is not None},
        'shape': header['shape'],
        'affine': header['affine'],
        'normalisation': result['normalisation'],
        'slices': result['slices'],
    }

  def close(self):
    self._progress.close()


def _progress_bar(total, enabled):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, unit='subject', file=sys.stderr,
              disable=not enabled, desc='preparing')


def _ordered_map(fn, items, workers):
  """``map`` on a thread pool, in order, with a bounded read-ahead.

  NIfTI decompression (zlib) and numpy release the GIL, so threads overlap
  reading; the bound keeps memory at ~2*workers subjects.
  """
  if workers <= 1:
    yield from map(fn, items)
    return
  pool = concurrent.futures.ThreadPoolExecutor(workers)
  try:
    items = iter(items)
    pending = collections.deque(
        pool.submit(fn, item) for item in itertools.islice(items, 2 * workers))
    while pending:
      result = pending.popleft().result()
      for item in itertools.islice(items, 1):
        pending.append(pool.submit(fn, item))
      yield result
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def _write_tfds(plan, out_dir: pathlib.Path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  builder = _builder_class()(plan=plan, data_dir=str(out_dir),
                             file_format='array_record')
  download_dir = out_dir / '.downloads'
  bars_were_on = tqdm_utils._active  # pylint: disable=protected-access
  tfds.display_progress_bar(False)  # ours is per subject
  try:
    # TFDS prints banners on stdout; keep stdout for our report.
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(download_dir=str(download_dir))
  except BaseException:
    if plan.error is not None:
      raise plan.error from None
    raise
  finally:
    tfds.display_progress_bar(bars_were_on)
    shutil.rmtree(download_dir, ignore_errors=True)


# ------------------------------------------------------------------- driver


def _fingerprint(cases, options) -> str:
  """Hash of the inputs (path, size, mtime of every file) and the options.

  File stats rather than contents: hashing tens of GB of NIfTI would cost more
  than preparing them.
  """
  digest = hashlib.sha256(json.dumps(
      {'version': FORMAT_VERSION, 'options': options}, sort_keys=True).encode())
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
      if split not in SPLITS:
        raise DataError(f'unknown split {split!r}; expected {SPLITS}')
      for case in layouts.find_cases(root, dataset, modalities):
        if case.subject_id in fixed:
          raise DataError(f'{case.directory}: subject {case.subject_id} '
                          f'also appears in the {fixed[case.subject_id]} '
                          'source')
        fixed[case.subject_id] = split
        cases.append(case)
    return cases, fixed
  if src is None:
    raise DataError('give --src, or --train-src/--val-src/--test-src')
  return layouts.find_cases(src, dataset, modalities), None


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
  if not (dst / MANIFEST).is_file():
    return None
  try:
    previous = load_manifest(dst)
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
    if not (dst / MANIFEST).is_file():
      raise DataError(f'{dst} is not empty and holds no prepared dataset ({MANIFEST}); '
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
    _write_tfds(plan, staging)
    plan.close()
    manifest = _manifest(plan, content_hash)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
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
  return manifest


def prepare_dataset(src, dst, *, dataset='auto', modalities=None, normalise='max',
                    slices='official', geometry='resize', image_size=256,
                    split_ratios=(0.8, 0.1, 0.1), split_seed=0,
                    split_sources=None, skip_bad=False, workers=1,
                    overwrite=False, progress=True) -> dict:
  """Prepares ``dst`` from the raw subjects under ``src``.

  Args:
    src: raw dataset root (any supported layout), or None with
      ``split_sources``.
    dst: output folder; must not exist, hold the same preparation (then
      nothing is done), or ``overwrite`` must be set.
    dataset: 'auto', 'brats', 'isles2015' or 'generic'.
    modalities: a generic dataset's modality names, in channel order (the
      other datasets have theirs).
    normalise: 'max' (official), 'percentile' or 'zscore'.
    slices: 'official' (axial 78), 'range:A:B' or 'nonempty:F'.
    geometry: 'resize' (bilinear, official) or 'pad' (exactly invertible).
    image_size: output slice side.
    split_ratios: train/val/test fractions of subjects.
    split_seed: seed of the subject-level split.
    split_sources: optional {'train'|'val'|'test': raw root}; the split then
      follows the folders and ``src``/``split_ratios`` are unused.
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
  if len({c.modalities for c in cases}) > 1:
    raise DataError('sources mix BraTS and ISLES2015 subjects')
  options = _options(cases, fixed_splits, src, split_sources, {
      'normalise': normalise, 'slices': slices, 'geometry': geometry, 'image_size': image_size,
      'split_ratios': split_ratios, 'split_seed': split_seed, 'skip_bad': bool(skip_bad)})
  content_hash = _fingerprint(cases, options)
  up_to_date = _up_to_date_report(dst, content_hash, start)
  if up_to_date:
    return up_to_date
  _check_replaceable(dst, overwrite)
  headers, good, skipped = _validate_cases(cases, skip_bad)
  if not good:
    raise DataError(f'{src}: no valid subject left to prepare')
  splits = fixed_splits or assign_splits(
      [c.subject_id for c in good], split_ratios, split_seed)
  plan = _Plan(good, headers, splits, options, list(good[0].modalities),
               workers, skip_bad, progress)
  plan.skipped.extend(skipped)
  with _destination_lock(dst):
    # Another preparation may have finished while this one validated.
    up_to_date = _up_to_date_report(dst, content_hash, start)
    if up_to_date:
      plan.close()
      return up_to_date
    _remove_dead_leftovers(dst)
    manifest = _write(plan, dst, content_hash, overwrite)
  seconds = time.perf_counter() - start
  total = sum(plan.slice_counts.values())
  return {'dst': str(dst), 'up_to_date': False,
          'subjects': len(plan.subjects), 'slices': total,
          'splits': manifest['splits'], 'skipped': plan.skipped,
          'seconds': seconds, 'slices_per_second': total / max(seconds, 1e-9)}


def _manifest(plan, content_hash) -> dict:
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
