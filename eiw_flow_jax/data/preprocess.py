"""Preprocessing of catalog datasets whose stored images are not the training size."""

from __future__ import annotations

import numpy as np


def center_crop_resize(
    image: np.ndarray, image_shape: tuple[int, int, int], *, crop: int | None = None
) -> np.ndarray:
  """Crops a centred `crop`x`crop` square (None: the largest one) and resizes it to (H, W)."""
  # Pillow only matters for the catalog datasets that need resizing.
  from PIL import Image

  height, width = image.shape[:2]
  size = min(height, width) if crop is None else min(crop, height, width)
  top, left = (height - size) // 2, (width - size) // 2
  image = image[top : top + size, left : left + size]
  target_h, target_w = image_shape[:2]
  if (size, size) == (target_h, target_w):
    return image
  gray = image.ndim == 3 and image.shape[2] == 1
  pil = Image.fromarray(image[..., 0] if gray else image)
  # LANCZOS antialiases, which matters when downsampling by 2-4x as here.
  out = np.asarray(pil.resize((target_w, target_h), Image.Resampling.LANCZOS), dtype=np.uint8)
  return out[..., None] if gray else out
