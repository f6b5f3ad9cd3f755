"""Picture helpers: slices to 8-bit tiles, and tiles to a labelled grid (PNG)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(image, low=-1.0, high=1.0):
  scaled = (np.asarray(image, np.float32) - low) / (high - low)
  return (np.clip(scaled, 0.0, 1.0) * 255).round().astype(np.uint8)


def grid_image(rows, labels, row_labels=None, tile_gap=2, row_labels_above=False):
  """Tiles `rows` (lists of equally sized uint8 [H, W] images) with column labels on top.

  Row labels go in a 60 px margin on the left, or with `row_labels_above` in a
  band above each row (room for long labels).
  """
  height, width = rows[0][0].shape
  label_h = 14
  left = 60 if row_labels and not row_labels_above else 0
  band = label_h if row_labels and row_labels_above else 0
  canvas = Image.new('L', (left + len(rows[0]) * (width + tile_gap),
                           label_h + len(rows) * (band + height + tile_gap)), 0)
  draw = ImageDraw.Draw(canvas)
  for c, label in enumerate(labels):
    draw.text((left + c * (width + tile_gap) + 2, 1), label, fill=255)
  for r, row in enumerate(rows):
    top = label_h + r * (band + height + tile_gap)
    if row_labels:
      draw.text((2, top + 1 if band else top + height // 2 - 6), row_labels[r], fill=255)
    for c, tile in enumerate(row):
      canvas.paste(Image.fromarray(tile), (left + c * (width + tile_gap), top + band))
  return canvas
