"""Preprocessing of catalog datasets whose stored images are not the training size.

Each published CelebA and LSUN result was measured on its authors' own preprocessing; the
functions here reproduce them by name (docs/datasets.md says where each comes from):

* `center_crop_resize`: this project's own (a centred square, Lanczos).
* `realnvp_celeba`: RealNVP's CelebA crop and resize.
* `squash_resize_bilinear`: DenseFlow's CelebA (the whole image, PIL's bilinear filter).
* `realnvp_lsun_downscale`: RealNVP's LSUN (smallest side 96), then `crop` takes 64x64 windows.
"""

from __future__ import annotations

import math

import numpy as np

# RealNVP's CelebA crop (real_nvp_multiscale_dataset.py: `image[40:188, 15:163, :]`): a 148x148
# square at row 40, column 15 of the 218x178 aligned image (centred would be row 35).
REALNVP_CELEBA_CROP = (40, 15, 148)  # top, left, side
REALNVP_LSUN_SIDE = 96  # lsun_formatting.py: downscale = min(rows / 96., cols / 96.)


def _pil(image: np.ndarray):
  from PIL import Image  # Pillow only matters for the catalog datasets that need resizing

  gray = image.ndim == 3 and image.shape[2] == 1
  return Image.fromarray(image[..., 0] if gray else image), gray


def center_crop_resize(
    image: np.ndarray, image_shape: tuple[int, int, int], *, crop: int | None = None
) -> np.ndarray:
  """Crops a centred `crop`x`crop` square (None: the largest one) and resizes it to (H, W)."""
  from PIL import Image

  height, width = image.shape[:2]
  size = min(height, width) if crop is None else min(crop, height, width)
  top, left = (height - size) // 2, (width - size) // 2
  image = image[top : top + size, left : left + size]
  target_h, target_w = image_shape[:2]
  if (size, size) == (target_h, target_w):
    return image
  pil, gray = _pil(image)
  # LANCZOS antialiases, which matters when downsampling by 2-4x as here.
  out = np.asarray(pil.resize((target_w, target_h), Image.Resampling.LANCZOS), dtype=np.uint8)
  return out[..., None] if gray else out


def squash_resize_bilinear(image: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
  """The whole image resized to (H, W) by Pillow's bilinear filter, aspect ratio not kept.

  DenseFlow's CelebA loader (denseflow/data/datasets/image/celeba.py) computes RealNVP's crop
  but resizes the uncropped 178x218 image: torchvision's `resize(img, size=(64, 64),
  interpolation=Image.BILINEAR)` on a PIL image is `img.resize((64, 64), Image.BILINEAR)`, which
  widens its filter when downsampling (antialiased).
  """
  from PIL import Image

  target_h, target_w = image_shape[:2]
  pil, gray = _pil(image)
  out = np.asarray(pil.resize((target_w, target_h), Image.Resampling.BILINEAR), dtype=np.uint8)
  return out[..., None] if gray else out


def _tf1_bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source rows (lower, upper) and float32 weights of TF1's legacy bilinear resize, one axis."""
  # resize_bilinear_op.cc (align_corners=False, no half-pixel centres): in = out * (n_in /
  # n_out) in float32, lower = floor(in), upper = min(ceil(in), n_in - 1), lerp = in - lower.
  position = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
  lower = np.floor(position)
  upper = np.minimum(np.ceil(position), n_in - 1).astype(np.int64)
  return lower.astype(np.int64), upper, (position - lower).astype(np.float32)


def tf1_resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """TF1's `tf.image.resize_images(image, size, method=0, align_corners=False)`, float32 (H, W, C).

  The legacy kernel: each output pixel interpolates the 2x2 source pixels around out * scale,
  with no antialiasing (a downsample by 2.3 skips rows), in TF's float32 order of operations:
  equal to TensorFlow's (tools/check_preprocessing.py).
  """
  x = np.asarray(image, np.float32)
  top, bottom, y_lerp = _tf1_bilinear_axis(x.shape[0], size[0])
  left, right, x_lerp = _tf1_bilinear_axis(x.shape[1], size[1])
  x_lerp = x_lerp[None, :, None]
  top_row = x[top][:, left] + (x[top][:, right] - x[top][:, left]) * x_lerp
  bottom_row = x[bottom][:, left] + (x[bottom][:, right] - x[bottom][:, left]) * x_lerp
  return top_row + (bottom_row - top_row) * y_lerp[:, None, None]


def realnvp_celeba(image: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
  """RealNVP's CelebA: the 148x148 crop at row 40, column 15, then TF1's bilinear resize.

  RealNVP feeds the resized float values plus uniform noise to its model; this pipeline keeps
  8-bit pixels, so the values are rounded to the nearest integer (ties to even). The weights
  are multiples of 1/16 at 148 -> 64, so the float32 values are exact before rounding.
  """
  top, left, side = REALNVP_CELEBA_CROP
  height, width = image.shape[:2]
  if height < top + side or width < left + side:
    raise ValueError(
        f"RealNVP's CelebA crop needs images of at least {top + side}x{left + side} (rows x "
        f"columns; CelebA's aligned images are 218x178), got {height}x{width}."
    )
  crop = image[top : top + side, left : left + side]
  resized = tf1_resize_bilinear(crop, tuple(image_shape[:2]))
  return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def realnvp_lsun_downscale(image: np.ndarray, name: str = "image") -> np.ndarray:
  """RealNVP's LSUN image: downscaled so that the smallest side is 96 (97 where float division
  rounds up), as `skimage.transform.pyramid_reduce` did in their lsun_formatting.py.

  scikit-image 0.12's pyramid_reduce, written out: pixels times 1 / 255 in float64 (its
  `img_as_float`), a Gaussian blur of sigma = 2 * downscale / 6 per channel (scipy.ndimage, mode
  "reflect"), a bilinear resize to ceil(rows / downscale) x ceil(cols / downscale) sampling at
  pixel centres ((i + 0.5) * scale - 0.5), clipped to the blurred image's range; then `* 255`
  and `astype("uint8")`, which truncates (a flat 128 comes out 127, as theirs did). Equal pixel
  for pixel to scikit-image 0.26's pyramid_reduce (tools/check_preprocessing.py).
  """
  from scipy import ndimage  # only preparing LSUN needs it

  rows, cols = image.shape[:2]
  downscale = min(rows / float(REALNVP_LSUN_SIDE), cols / float(REALNVP_LSUN_SIDE))
  if downscale <= 1:
    raise ValueError(
        f"{name} is {rows}x{cols}: RealNVP's LSUN downscaling needs both sides above "
        f"{REALNVP_LSUN_SIDE} (LSUN's images have 256 on their smallest side)."
    )
  out_rows, out_cols = math.ceil(rows / float(downscale)), math.ceil(cols / float(downscale))
  pixels = image.astype(np.float64) * (1.0 / 255)
  smoothed = np.empty_like(pixels)
  for channel in range(pixels.shape[2]):
    ndimage.gaussian_filter(pixels[..., channel], 2 * downscale / 6.0,
                            output=smoothed[..., channel], mode="reflect")
  # Source coordinates of the output pixel centres; both stay within the image (scale >= 1).
  r = (np.arange(out_rows) + 0.5) * (rows / out_rows) - 0.5
  c = (np.arange(out_cols) + 0.5) * (cols / out_cols) - 0.5
  r0, c0 = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
  r1, c1 = np.ceil(r).astype(np.int64), np.ceil(c).astype(np.int64)
  dr, dc = (r - r0)[:, None, None], (c - c0)[None, :, None]
  top = (1 - dc) * smoothed[r0][:, c0] + dc * smoothed[r0][:, c1]
  bottom = (1 - dc) * smoothed[r1][:, c0] + dc * smoothed[r1][:, c1]
  out = np.clip((1 - dr) * top + dr * bottom, smoothed.min(), smoothed.max())
  return (out * 255.0).astype(np.uint8)


def crop(image: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
  """A (H, W) window at a uniformly random position, as `tf.random_crop` takes it."""
  height, width = image.shape[:2]
  if height < size[0] or width < size[1]:
    raise ValueError(f"Cannot crop {size[0]}x{size[1]} from an image of {height}x{width}.")
  top = int(rng.integers(0, height - size[0] + 1))
  left = int(rng.integers(0, width - size[1] + 1))
  return image[top : top + size[0], left : left + size[1]]
