"""Writes prepared slices as a TFDS ArrayRecord dataset (one record per 2D slice).

Records: ``images`` [S, S, M] float16, ``seg`` [S, S] uint8 (zeros when the
subject has no segmentation; see ``has_seg``), ``subject_id``, ``slice_index``,
``example_id`` (position in its split).  A `Plan` says what to write; the builder
pulls its examples split by split.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import io
import itertools
import pathlib
import shutil
import sys

import numpy as np

from data_prep import manifest
from data_prep.errors import DataError


@functools.cache
def builder_class():
  """The TFDS builder, defined lazily so importing this module stays light."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class AeganSlices(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One record per 2D slice; shapes come from the preparation plan."""
    VERSION = tfds.core.Version(manifest.BUILDER_VERSION)

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
              'images': tensor(shape=(size, size, count), dtype=manifest.IMAGE_DTYPE,
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


class Plan:
  """What to write; the builder pulls examples from it split by split."""

  def __init__(self, cases, headers, splits, options, modalities, workers,
               skip_bad, progress, load):
    """`load(case, header, options)`: a subject's slices (`prepare.load_subject`)."""
    self.cases, self.headers, self.splits, self.load = cases, headers, splits, load
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
      for split in manifest.SPLITS:
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
      return case, self.load(case, self.headers[case.subject_id], self.options)
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
        'file_stats': {str(p): manifest.file_stat(p) for p in
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


def write_tfds(plan, out_dir: pathlib.Path):
  """Writes the plan's records as a TFDS ArrayRecord dataset into `out_dir`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  builder = builder_class()(plan=plan, data_dir=str(out_dir),
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
