r"""Draws docs/anatomy_icbm152.png: axial slices of anatomical phantom subjects.

  python -m data_prep.phantom --anatomy icbm152 --out /tmp/anat --subjects 2 --seed 1
  python docs/make_anatomy_grid.py /tmp/anat docs/anatomy_icbm152.png

Rows: a few axial slices of each subject; columns: T1, T1ce, T2, FLAIR (each scaled to
its own 99.5th brain percentile) and the labels (necrosis dark grey, edema light grey,
enhancing white).  Slices are rotated for a radiology view, as the evaluation grids are.
"""
import pathlib
import sys

import nibabel as nib
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from aegan_jax import samples  # noqa: E402  pylint: disable=wrong-import-position
from data_prep import layouts  # noqa: E402  pylint: disable=wrong-import-position

LABEL_GREY = {1: 90, 2: 170, 3: 255, 4: 255}
HEIGHTS = (0.6, 0.75)  # fractions of the volume's depth


def subject_rows(case):
  volumes = [np.asarray(nib.load(case.files[m]).dataobj, np.float32)
             for m in layouts.BRATS_MODALITIES]
  seg = np.asarray(nib.load(case.seg).dataobj)
  rows, labels = [], []
  for height in HEIGHTS:
    z = int(height * seg.shape[2])
    tiles = []
    for volume in volumes:
      peak = np.percentile(volume[volume > 0], 99.5)
      tiles.append(samples.to_uint8(volume[:, :, z] / peak, 0.0, 1.0))
    grey = np.zeros(seg.shape[:2], np.uint8)
    for label, value in LABEL_GREY.items():
      grey[seg[:, :, z] == label] = value
    rows.append([np.ascontiguousarray(np.rot90(t)) for t in tiles + [grey]])
    labels.append(f'{case.subject_id} z={z}')
  return rows, labels


def main(src, out):
  rows, labels = [], []
  for case in layouts.find_cases(src):
    case_rows, case_labels = subject_rows(case)
    rows += case_rows
    labels += case_labels
  titles = list(layouts.BRATS_MODALITIES) + ['labels']
  samples.grid_image(rows, titles, labels, row_labels_above=True).save(out)
  print(f'wrote {out}')


if __name__ == '__main__':
  main(*sys.argv[1:3])
