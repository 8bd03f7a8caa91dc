"""The dataset registry: the names `config.dataset.name` accepts and how each is opened.

Each name is one data version (`DATA_VERSIONS`): the same images prepared another way give
other bits/dim, so published numbers are compared only with runs on their own version
(`eiw_flow_jax.commands.table`).

Every example leaving this module is a uint8 image of `config.model.image_shape` holding the
dataset's stored pixel values, on the model's grid: when `config.model.n_bits` is below the
dataset's `pixel_bits`, the low bits are dropped (x >> (pixel_bits - n_bits), as Glow does for
5-bit CelebA). No dequantisation or scaling happens here.

Registered names (`config.dataset.name`):

* Offline builders, prepared automatically on first use into `config.dataset.data_dir`
  (TFDS's default, ~/tensorflow_datasets, when empty); they need neither TensorFlow nor internet:

  - `digits`: scikit-learn's bundled 8x8 handwritten digits (1797 images), shape (8, 8, 1).
    Pixels keep their raw values 0..16, so `DatasetInfo.pixel_bits` is 5: the model uses
    `n_bits=5`, a 32-level grid of which only the 17 values 0..16 occur. Split rule: the
    first 1500 images (in scikit-learn's order) are "train", the last 297 are "test".
  - `mnist_idx`: MNIST read from the original idx files in `config.dataset.source_dir`, shape
    (28, 28, 1), values 0..255. If the directory holds only the 10k test set
    (`t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`), those 10000 images are split
    in file order: the first 9000 are "train", the last 1000 are "test" (TFDS config
    `mnist_idx/t10k`). If `train-images-idx3-ubyte.gz` and `train-labels-idx1-ubyte.gz` are
    there as well, the real 60000/10000 train/test sets are used (config `mnist_idx/full`).
    Uncompressed files (same names without `.gz`) work too. Once prepared, the source
    directory is no longer needed; delete `<data_dir>/mnist_idx` to re-prepare.

* TFDS catalog datasets, which must have been prepared beforehand in the array_record format
  with `python -m eiw_flow_jax.prepare --dataset=NAME --data_dir=DIR` (see `CATALOG_HELP` and
  `eiw_flow_jax/data/catalog.py`); reading them needs neither TensorFlow nor internet:

  - `mnist`, `cifar10`: TFDS `mnist`, `cifar10`.
  - `imagenet32`, `imagenet64`: TFDS `downsampled_imagenet/32x32` and `/64x64`, the
    van den Oord et al. (2016) downsampled ImageNet that RealNVP, Glow and Flow++ report on;
    eval split "validation".
  - `imagenet32_resized`, `imagenet64_resized`: TFDS `imagenet_resized/32x32` and `/64x64`,
    Chrabaszcz et al.'s (2017) box-resized ImageNet, the data of DenseFlow's and EIW-Flow's
    ImageNet results (their loaders read its zips); eval split "validation" (its val set).
  - `celeba_realnvp`, `celeba_denseflow`, `celeba`: TFDS `celeb_a` (178x218 aligned faces) read
    three ways: RealNVP's 148x148 crop at row 40, column 15 resized with TF1's bilinear kernel;
    the whole image squashed to 64x64 with Pillow's bilinear filter, as DenseFlow's loader does;
    and this project's own centred 148x148 crop resized with Lanczos. 8-bit, not CelebA-HQ.
  - `lsun_bedroom_realnvp` / `lsun_church_realnvp`: LSUN as RealNVP and Glow report on it,
    images downscaled so the smallest side is 96 (`builders.LsunRealnvpBuilder`, prepared
    from the LSUN lmdb export), then a 64x64 window: random in training, at a fixed random
    position per image for evaluation (both papers' code crops at random in evaluation too).
  - `lsun_bedroom` / `lsun_church`: TFDS `lsun/bedroom` / `lsun/church_outdoor`, prepared from
    the LSUN lmdb export by `eiw_flow_jax.data.catalog` (TFDS's own LSUN builder needs
    tensorflow-io); this project's own largest centre square resized to the configured size.

  Their pixels are 8-bit (0..255).

`config.dataset.train_split` / `eval_split` are TFDS split names; an empty string picks the
dataset's usual split (e.g. "validation" for ImageNet and LSUN, which have no "test" split).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from eiw_flow_jax.data.builders import DigitsBuilder, LsunRealnvpBuilder, MnistIdxBuilder
from eiw_flow_jax.data.preprocess import (
  center_crop_resize,
  realnvp_celeba,
  squash_resize_bilinear,
)

Preprocess = Callable[[np.ndarray, tuple[int, int, int]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataVersion:
  """One preparation of a dataset's images: the same faces or rooms prepared another way give
  other bits/dim, so a published number is compared only with runs on its version."""

  title: str  # short, for tables
  description: str  # what the images are and who reports on them (docs/datasets.md cites code)


def _lsun_versions(category: str, title: str) -> dict[str, DataVersion]:
  return {
      f"lsun_{category}:realnvp": DataVersion(
          f"LSUN {title}, RealNVP's 96 and 64x64 crops",
          f"LSUN {title} downscaled so that the smallest side is 96 (RealNVP's "
          "lsun_formatting.py, skimage pyramid_reduce), 64x64 windows at random positions: "
          "RealNVP's and Glow's LSUN data (Glow's `lsun_realnvp`).",
      ),
      f"lsun_{category}:centre_square": DataVersion(
          f"LSUN {title}, centre square (this project)",
          f"LSUN {title}, the largest centre square resized to 64x64 with Lanczos: this "
          "project's own; no published number uses it.",
      ),
  }


DATA_VERSIONS: dict[str, DataVersion] = {
    "digits": DataVersion("scikit-learn digits", "scikit-learn's bundled 8x8 digits, 0..16."),
    "mnist": DataVersion("MNIST", "MNIST's idx files (LeCun et al.)."),
    "cifar10": DataVersion("CIFAR-10", "CIFAR-10 as published (Krizhevsky 2009)."),
    "imagenet:van_den_oord": DataVersion(
        "ImageNet, van den Oord et al.",
        "van den Oord et al. (2016) downsampled ImageNet (image-net.org/small: "
        "train_32x32.tar, valid_32x32.tar, _64x64): RealNVP's, Glow's and Flow++'s ImageNet.",
    ),
    "imagenet:chrabaszcz": DataVersion(
        "ImageNet, Chrabaszcz et al. (box-resized)",
        "Chrabaszcz, Loshchilov & Hutter (2017) box-resized ImageNet (image-net.org/data/"
        "downsample: Imagenet32_train.zip, ...; TFDS imagenet_resized): DenseFlow's and "
        "EIW-Flow's ImageNet (their loaders read these zips). Smoother, so lower bits/dim.",
    ),
    "celeba:realnvp_crop": DataVersion(
        "CelebA, RealNVP's crop",
        "CelebA aligned 178x218, the 148x148 crop at row 40, column 15, TF1 bilinear to 64x64 "
        "(RealNVP's code; rounded to 8 bits here): RealNVP's CelebA.",
    ),
    "celeba:whole_squashed": DataVersion(
        "CelebA, whole image squashed (DenseFlow's loader)",
        "CelebA aligned 178x218, the whole image resized to 64x64 with Pillow's bilinear "
        "filter: what DenseFlow's (and EIW-Flow's) CelebA loader does.",
    ),
    "celeba:centre_crop": DataVersion(
        "CelebA, centred crop (this project)",
        "CelebA aligned 178x218, a centred 148x148 crop (row 35) resized with Lanczos: this "
        "project's own; no published number uses it.",
    ),
    **_lsun_versions("bedroom", "bedroom"),
    **_lsun_versions("church", "church outdoor"),
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to open one of our dataset names."""

  tfds_name: str  # TFDS catalog name, or the name (and config) of our own builder
  train_split: str
  eval_split: str
  data_version: str  # a key of DATA_VERSIONS
  image_key: str = "image"
  preprocess: Preprocess | None = None  # (image, config image_shape) -> image
  # Stored images are larger than the configured shape: a window of that shape is cut at a
  # random position, fresh for every training example drawn and fixed per example elsewhere.
  random_crop: bool = False
  pixel_bits: int = 8  # stored values are < 2**pixel_bits
  builder: type[tfds.core.GeneratorBasedBuilder] | None = None  # None: TFDS catalog dataset


_CELEBA_CENTRE = functools.partial(center_crop_resize, crop=148)

DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", "train", "test", "digits", pixel_bits=5,
                          builder=DigitsBuilder),
    "mnist_idx": DatasetSpec("mnist_idx", "train", "test", "mnist", builder=MnistIdxBuilder),
    "mnist": DatasetSpec("mnist", "train", "test", "mnist"),
    "cifar10": DatasetSpec("cifar10", "train", "test", "cifar10"),
    "imagenet32": DatasetSpec(
        "downsampled_imagenet/32x32", "train", "validation", "imagenet:van_den_oord"),
    "imagenet64": DatasetSpec(
        "downsampled_imagenet/64x64", "train", "validation", "imagenet:van_den_oord"),
    "imagenet32_resized": DatasetSpec(
        "imagenet_resized/32x32", "train", "validation", "imagenet:chrabaszcz"),
    "imagenet64_resized": DatasetSpec(
        "imagenet_resized/64x64", "train", "validation", "imagenet:chrabaszcz"),
    "celeba_realnvp": DatasetSpec(
        "celeb_a", "train", "test", "celeba:realnvp_crop", preprocess=realnvp_celeba),
    "celeba_denseflow": DatasetSpec(
        "celeb_a", "train", "test", "celeba:whole_squashed", preprocess=squash_resize_bilinear),
    "celeba": DatasetSpec(
        "celeb_a", "train", "test", "celeba:centre_crop", preprocess=_CELEBA_CENTRE),
    "lsun_bedroom_realnvp": DatasetSpec(
        "lsun_realnvp/bedroom", "train", "validation", "lsun_bedroom:realnvp",
        random_crop=True, builder=LsunRealnvpBuilder),
    "lsun_church_realnvp": DatasetSpec(
        "lsun_realnvp/church_outdoor", "train", "validation", "lsun_church:realnvp",
        random_crop=True, builder=LsunRealnvpBuilder),
    "lsun_bedroom": DatasetSpec(
        "lsun/bedroom", "train", "validation", "lsun_bedroom:centre_square",
        preprocess=center_crop_resize),
    "lsun_church": DatasetSpec(
        "lsun/church_outdoor", "train", "validation", "lsun_church:centre_square",
        preprocess=center_crop_resize),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Sizes and shape of the configured dataset."""

  name: str
  num_train: int
  num_eval: int
  image_shape: tuple[int, int, int]
  pixel_bits: int  # stored pixel values are integers in [0, 2**pixel_bits)
  data_version: str  # a key of DATA_VERSIONS


def spec_for(config: ml_collections.ConfigDict) -> DatasetSpec:
  name = config.dataset.name
  if name not in DATASETS:
    raise ValueError(f"Unknown config.dataset.name {name!r}; registered: {sorted(DATASETS)}.")
  return DATASETS[name]


def data_dir_for(config: ml_collections.ConfigDict) -> str:
  data_dir = config.dataset.data_dir
  return os.path.expanduser(data_dir) if data_dir else tfds.core.constants.DATA_DIR


def resolve_split(config: ml_collections.ConfigDict, which: str) -> str:
  """The TFDS split for `which` in ("train", "eval"): the config's, else the dataset's usual."""
  spec = spec_for(config)
  if which == "train":
    return config.dataset.train_split or spec.train_split
  if which == "eval":
    return config.dataset.eval_split or spec.eval_split
  raise ValueError(f"`which` must be 'train' or 'eval', got {which!r}.")
