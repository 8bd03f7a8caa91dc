"""Checks the papers' preprocessings against the libraries their code called (needs them).

  pip install tensorflow-cpu scikit-image   # in a separate environment, not the project's
  python tools/check_preprocessing.py [--images=20]

RealNVP's CelebA resize is TF1's `tf.image.resize_images(method=0, align_corners=False)`, and
its LSUN downscaling `skimage.transform.pyramid_reduce`; `eiw_flow_jax.data.preprocess` writes
both out in numpy and scipy, so that neither library is a dependency. This script compares them
on random and smooth images and prints the largest difference (0 means equal pixel for pixel):
`tf1_resize_bilinear` against TensorFlow's legacy kernel, `realnvp_lsun_downscale` against
scikit-image's `pyramid_reduce(..., channel_axis=-1)` times 255, truncated to uint8 as RealNVP's
lsun_formatting.py does. It loads `preprocess.py` by path, so the project need not be
installed in that environment. Results: docs/datasets.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import numpy as np


def _preprocess_module():
  path = os.path.join(os.path.dirname(__file__), "..", "eiw_flow_jax", "data", "preprocess.py")
  spec = importlib.util.spec_from_file_location("preprocess", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _smooth(rng: np.random.RandomState, shape: tuple[int, int, int]) -> np.ndarray:
  from PIL import Image

  coarse = rng.randint(0, 256, (shape[0] // 8, shape[1] // 8, 3)).astype(np.uint8)
  return np.asarray(Image.fromarray(coarse).resize((shape[1], shape[0]), Image.BICUBIC))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=20, help="random images per check")
  args = parser.parse_args()
  import skimage
  import skimage.transform
  import tensorflow as tf

  preprocess = _preprocess_module()
  rng = np.random.RandomState(0)
  worst = 0.0
  for i in range(args.images):
    face = rng.randint(0, 256, (218, 178, 3)).astype(np.uint8) if i % 2 else _smooth(
        rng, (218, 178, 3))
    crop = face[40:188, 15:163].astype(np.float32)
    theirs = tf.compat.v1.image.resize_images(crop[None], [64, 64], method=0,
                                              align_corners=False).numpy()[0]
    worst = max(worst, float(np.abs(preprocess.tf1_resize_bilinear(crop, (64, 64)) - theirs).max()))
  print(f"tf1_resize_bilinear vs TensorFlow {tf.__version__} resize_images(method=0, "
        f"align_corners=False), {args.images} CelebA crops: max |difference| {worst}")

  differing = total = 0
  for i in range(args.images):
    shape = (256, 341 + i % 3 * 43, 3)
    room = rng.randint(0, 256, shape).astype(np.uint8) if i % 2 else _smooth(rng, shape)
    downscale = min(shape[0] / 96.0, shape[1] / 96.0)
    theirs = (skimage.transform.pyramid_reduce(room, downscale, channel_axis=-1) * 255.0).astype(
        np.uint8)
    ours = preprocess.realnvp_lsun_downscale(room)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    differing += int((ours != theirs).sum())
    total += ours.size
  print(f"realnvp_lsun_downscale vs scikit-image {skimage.__version__} pyramid_reduce, "
        f"{args.images} LSUN-sized images: {differing} of {total} values differ")


if __name__ == "__main__":
  main()
