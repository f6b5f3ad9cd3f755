"""Measures preparation and loading throughput on a generated phantom.

  python benchmarks/input_pipeline.py [--subjects 6] [--shape 240,240,155]
      [--slices nonempty:0.1] [--image-size 256] [--workers 0,2] [--prepared DIR]

Prints phantom generation s/subject, preparation slices/s (NIfTI reading
threads = each --workers value, at least 1) and loading slices/s of the
training loader (Grain worker processes = each --workers value).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from aegan_jax import data  # noqa: E402  pylint: disable=g-import-not-at-top
from data_prep import phantom  # noqa: E402
from data_prep import prepare  # noqa: E402


def _loading_rate(prepared, batch_size, batches, worker_count):
  loader = data.make_train_loader(prepared, global_batch_size=batch_size,
                                  seed=0, worker_count=worker_count,
                                  process_index=0, process_count=1)
  iterator = iter(loader)
  next(iterator)  # start-up (worker processes, file handles) not counted
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch_size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--subjects', type=int, default=6)
  parser.add_argument('--shape', default='240,240,155')
  parser.add_argument('--slices', default='nonempty:0.1')
  parser.add_argument('--image-size', type=int, default=256)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--workers', default='0,2')
  parser.add_argument('--prepared', type=pathlib.Path,
                      help='load this prepared dataset instead of generating one')
  args = parser.parse_args()
  workers = [int(w) for w in args.workers.split(',')]
  if args.prepared:
    _report_loading(args, args.prepared, workers)
    return
  shape = tuple(int(s) for s in args.shape.split(','))
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    start = time.perf_counter()
    phantom.write_phantom_dataset(tmp / 'raw', args.subjects, seed=0,
                                  shape=shape)
    seconds = time.perf_counter() - start
    print(f'phantom: {seconds / args.subjects:.2f} s/subject at {shape}')
    prepared = None
    for count in workers:
      prepared = tmp / f'prepared{count}'
      report = prepare.prepare_dataset(
          tmp / 'raw', prepared, slices=args.slices,
          image_size=args.image_size, split_ratios=(1, 0, 0),
          workers=max(count, 1), progress=False)
      print(f'prepare (reader threads={max(count, 1)}): {report["slices"]} '
            f'slices, {report["slices_per_second"]:.1f} slices/s')
    _report_loading(args, prepared, workers)


def _report_loading(args, prepared, workers):
  for count in workers:
    rate = _loading_rate(prepared, args.batch_size, args.batches, count)
    print(f'load (grain workers={count}, batch {args.batch_size}, '
          f'{args.image_size}x{args.image_size}x4): {rate:.1f} slices/s', flush=True)


if __name__ == '__main__':  # Grain worker processes re-import this module.
  main()
