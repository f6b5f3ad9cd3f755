"""python -m data_prep --src RAW --dst PREPARED [options]; see docs/data.md."""
from __future__ import annotations

import argparse
import pathlib
import sys

from data_prep import layouts
from data_prep import preprocess
from data_prep.errors import DataError


def _ratios(text):
  try:
    values = tuple(float(v) for v in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r}: expected e.g. 0.8,0.1,0.1')
  if len(values) != 3:
    raise argparse.ArgumentTypeError(f'{text!r}: expected three numbers')
  return values


def build_parser():
  parser = argparse.ArgumentParser(
      prog='python -m data_prep',
      description='Prepare raw BraTS / ISLES2015 / generic NIfTI into 2D slices.')
  parser.add_argument('--src', type=pathlib.Path,
                      help='raw dataset root (split by --split-ratios)')
  parser.add_argument('--dst', type=pathlib.Path, required=True)
  parser.add_argument('--train-src', type=pathlib.Path)
  parser.add_argument('--val-src', type=pathlib.Path)
  parser.add_argument('--test-src', type=pathlib.Path)
  parser.add_argument('--dataset', default='auto', choices=layouts.DATASETS)
  parser.add_argument('--modalities', type=lambda text: tuple(text.split(',')),
                      help='generic: the modality names, comma-separated, in channel '
                      'order; files are <case>/<case>_<name>.nii[.gz]')
  parser.add_argument('--normalise', default='max',
                      choices=preprocess.NORMALISATIONS)
  parser.add_argument('--slices', default='official',
                      help='official | range:A:B (A<=z<B) | nonempty:F')
  parser.add_argument('--geometry', default='resize',
                      choices=preprocess.GEOMETRIES)
  parser.add_argument('--image-size', type=int, default=256)
  parser.add_argument('--split-ratios', type=_ratios, default=(0.8, 0.1, 0.1))
  parser.add_argument('--split-seed', type=int, default=0)
  parser.add_argument('--skip-bad', action='store_true',
                      help='skip invalid subjects instead of failing')
  parser.add_argument('--workers', type=int, default=4,
                      help='threads reading NIfTI')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace a DST prepared with other inputs/options')
  parser.add_argument('--quiet', action='store_true', help='no progress bar')
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  split_sources = {name: path for name, path in (
      ('train', args.train_src), ('val', args.val_src),
      ('test', args.test_src)) if path is not None}
  if bool(split_sources) == (args.src is not None):
    print('error: give either --src or --train-src/--val-src/--test-src',
          file=sys.stderr)
    return 2
  if (args.modalities is not None) != (args.dataset == 'generic'):
    print('error: --modalities goes with --dataset generic (and only with it)', file=sys.stderr)
    return 2
  from data_prep import prepare  # pylint: disable=g-import-not-at-top
  try:
    report = prepare.prepare_dataset(
        args.src, args.dst, dataset=args.dataset, modalities=args.modalities,
        normalise=args.normalise,
        slices=args.slices, geometry=args.geometry, image_size=args.image_size,
        split_ratios=args.split_ratios, split_seed=args.split_seed,
        split_sources=split_sources or None, skip_bad=args.skip_bad,
        workers=args.workers, overwrite=args.overwrite,
        progress=not args.quiet)
  except DataError as exc:
    print(f'error: {exc}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('interrupted; nothing was written', file=sys.stderr)
    return 130
  if report['up_to_date']:
    print(f'up to date: {report["dst"]}')
    return 0
  splits = ', '.join(f'{name} {s["subjects"]} subjects/{s["slices"]} slices'
                     for name, s in report['splits'].items())
  print(f'prepared {report["subjects"]} subjects, {report["slices"]} slices '
        f'({splits}) in {report["seconds"]:.1f} s '
        f'({report["slices_per_second"]:.1f} slices/s) -> {report["dst"]}')
  for skipped in report['skipped']:
    print(f'skipped {skipped["subject_id"]}: {skipped["reason"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
