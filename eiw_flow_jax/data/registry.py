"""The dataset registry: the names `config.dataset.name` accepts and how each is opened.

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
    van den Oord et al. (2016) downsampled ImageNet that the density-estimation papers
    (RealNVP, Glow, Flow++, DenseFlow) report on; eval split "validation".
  - `imagenet32_resized`, `imagenet64_resized`: TFDS `imagenet_resized` (Chrabaszcz et al.
    2017, box-resized, meant for supervised learning). A different downsampling of ImageNet:
    bits/dim on it are NOT comparable with the published density-estimation numbers.
  - `celeba`: TFDS `celeb_a` (178x218 aligned faces), 148x148 centre crop resized to the
    configured size (RealNVP's 64x64 CelebA, 8-bit). Not CelebA-HQ (Glow's 5-bit CelebA).
  - `lsun_bedroom` / `lsun_church`: TFDS `lsun/bedroom` / `lsun/church_outdoor`, prepared from
    the LSUN lmdb export by `eiw_flow_jax.data.catalog` (TFDS's own LSUN builder needs
    tensorflow-io); largest centre square resized to the configured size.

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

from eiw_flow_jax.data.builders import DigitsBuilder, MnistIdxBuilder
from eiw_flow_jax.data.preprocess import center_crop_resize

Preprocess = Callable[[np.ndarray, tuple[int, int, int]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to open one of our dataset names."""

  tfds_name: str  # TFDS catalog name, or the name of our offline builder
  train_split: str
  eval_split: str
  image_key: str = "image"
  preprocess: Preprocess | None = None  # (image, config image_shape) -> image
  pixel_bits: int = 8  # stored values are < 2**pixel_bits
  builder: type[tfds.core.GeneratorBasedBuilder] | None = None  # None: TFDS catalog dataset


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", "train", "test", pixel_bits=5, builder=DigitsBuilder),
    "mnist_idx": DatasetSpec("mnist_idx", "train", "test", builder=MnistIdxBuilder),
    "mnist": DatasetSpec("mnist", "train", "test"),
    "cifar10": DatasetSpec("cifar10", "train", "test"),
    # The van den Oord et al. data of the density-estimation papers.
    "imagenet32": DatasetSpec("downsampled_imagenet/32x32", "train", "validation"),
    "imagenet64": DatasetSpec("downsampled_imagenet/64x64", "train", "validation"),
    # Chrabaszcz et al.'s box-resized ImageNet: NOT comparable with the published bits/dim.
    "imagenet32_resized": DatasetSpec("imagenet_resized/32x32", "train", "validation"),
    "imagenet64_resized": DatasetSpec("imagenet_resized/64x64", "train", "validation"),
    # The usual CelebA 64x64 preprocessing (RealNVP): central 148x148 crop, then resize.
    "celeba": DatasetSpec(
        "celeb_a", "train", "test", preprocess=functools.partial(center_crop_resize, crop=148)
    ),
    "lsun_bedroom": DatasetSpec(
        "lsun/bedroom", "train", "validation", preprocess=center_crop_resize
    ),
    "lsun_church": DatasetSpec(
        "lsun/church_outdoor", "train", "validation", preprocess=center_crop_resize
    ),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Sizes and shape of the configured dataset."""

  name: str
  num_train: int
  num_eval: int
  image_shape: tuple[int, int, int]
  pixel_bits: int  # stored pixel values are integers in [0, 2**pixel_bits)


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
