"""Offline TFDS builders: datasets that ship with a package or come from local files.

skip_registration keeps them out of TFDS's global catalog: they are created directly, and their
names must not clash with catalog datasets. `digits` and `mnist_idx` are prepared on first use
(`ON_FIRST_USE`); `lsun_realnvp` only by `python -m eiw_flow_jax.prepare` (3 million images for
bedroom take hours).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from eiw_flow_jax.data.idx import MNIST_FILES, MNIST_T10K_TRAIN, find_idx, mnist_present, read_mnist
from eiw_flow_jax.data.preprocess import realnvp_lsun_downscale

# The file format this project reads (random access, no TensorFlow); every builder writes it.
ARRAY_RECORD = "array_record"


def no_checksums_lookup(cls: type) -> type:
  """Skips TFDS's lookup of a checksums file next to a builder's code, which imports the
  undeclared `importlib_resources` package (tfds 4.9.10): for builders that download nothing."""
  cls.code_path = tfds.core.utils.classproperty(classmethod(lambda _: None))
  return cls


@no_checksums_lookup
class _OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared parts of our builders: uint8 image + int label examples from in-memory arrays."""

  IMAGE_SHAPE: ClassVar[tuple[int, int, int]]
  DESCRIPTION: ClassVar[str]
  HOMEPAGE: ClassVar[str]
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
  ON_FIRST_USE: ClassVar[bool] = True  # prepared by the data layer when first opened

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
            "label": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # keep source order, so "first n" means the same as the source
        homepage=self.HOMEPAGE,
    )

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray) -> Iterator[Any]:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield i, {"image": image, "label": label}

  # TFDS's announcement of a download ("Downloading and preparing dataset Unknown size ... to
  # ~/tensorflow_datasets/..."), printed on stdout, would be wrong for builders that download
  # nothing: one log line instead says what happens, where, and how to choose the folder.
  def _log_download_bytes(self) -> None:
    logging.info(
        "Preparing dataset %s (%s; offline, once) in %s; later runs read it from there. "
        "config.dataset.data_dir chooses the folder (empty: TFDS's default, $TFDS_DATA_DIR or "
        "~/tensorflow_datasets).", self.name, self.DESCRIPTION.rstrip("."), self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("Prepared dataset %s in %s.", self.name, self.data_dir)


class DigitsBuilder(_OfflineBuilder, skip_registration=True):
  """scikit-learn's 8x8 digits; raw values 0..16; first 1500 -> train, last 297 -> test."""

  name = "digits"
  VERSION = tfds.core.Version("1.0.0")
  IMAGE_SHAPE = (8, 8, 1)
  DESCRIPTION = "scikit-learn's bundled 8x8 digits with raw pixel values 0..16."
  HOMEPAGE = "https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset"
  NUM_TRAIN = 1500

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager  # the data ships with scikit-learn
    from sklearn.datasets import load_digits  # slow import, only needed to prepare

    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., None]  # float 0..16 -> exact uint8
    labels = digits.target.astype(np.int64)
    n = self.NUM_TRAIN
    return {
        "train": self._generate_examples(images[:n], labels[:n]),
        "test": self._generate_examples(images[n:], labels[n:]),
    }


class MnistIdxBuilder(_OfflineBuilder, skip_registration=True):
  """MNIST from idx files in the manual dir (`config.dataset.source_dir`)."""

  name = "mnist_idx"
  VERSION = tfds.core.Version("1.0.0")
  IMAGE_SHAPE = (28, 28, 1)
  DESCRIPTION = "MNIST read from the original idx files."
  HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"
  BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
      tfds.core.BuilderConfig(
          name="full", description="Real MNIST: 60000 train (train-*) and 10000 test (t10k-*)."
      ),
      tfds.core.BuilderConfig(
          name="t10k",
          description=f"Only the 10k test files: first {MNIST_T10K_TRAIN} -> train, rest -> test.",
      ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the MNIST idx files (" + ", ".join(MNIST_FILES["t10k"] + MNIST_FILES["train"]) + ")"
      " in a directory and pass it as --config.dataset.source_dir=DIR; the train-* files are"
      " optional."
  )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    source_dir = Path(dl_manager.manual_dir)
    test_images, test_labels = read_mnist(source_dir, "t10k")
    if self.builder_config.name == "full":
      train_images, train_labels = read_mnist(source_dir, "train")
    else:
      n = MNIST_T10K_TRAIN
      train_images, train_labels = test_images[:n], test_labels[:n]
      test_images, test_labels = test_images[n:], test_labels[n:]
    return {
        "train": self._generate_examples(train_images, train_labels),
        "test": self._generate_examples(test_images, test_labels),
    }



def mnist_idx_builder(data_dir: str, source_dir: str) -> tfds.core.DatasetBuilder:
  """The mnist_idx builder: the files in source_dir pick its config; else a prepared copy."""
  source = Path(os.path.expanduser(source_dir)) if source_dir else None
  if source is not None and mnist_present(source, "t10k"):
    builder = MnistIdxBuilder(
        config="full" if mnist_present(source, "train") else "t10k",
        data_dir=data_dir,
        file_format=ARRAY_RECORD,
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(source))
    )
    return builder
  for builder_config in ("full", "t10k"):
    builder = MnistIdxBuilder(config=builder_config, data_dir=data_dir, file_format=ARRAY_RECORD)
    if builder.is_prepared():
      return builder
  required = MNIST_FILES["t10k"]
  if source is None:
    found = "config.dataset.source_dir is empty"
  elif not source.is_dir():
    found = f"looked in {source}, which does not exist"
  else:
    missing = [name for name in required if find_idx(source, name) is None]
    found = f"looked in {source}, which lacks {missing}"
  raise FileNotFoundError(
      f"Dataset 'mnist_idx' reads the MNIST idx files {list(required)} (optionally also "
      f"{list(MNIST_FILES['train'])} for the full train set; copies without .gz work too) from "
      f"the directory given by --config.dataset.source_dir=DIR, but {found}, and "
      f"{data_dir}/mnist_idx holds no prepared copy. The files are MNIST's own distribution: "
      f"download them from an MNIST mirror (e.g. https://ossci-datasets.s3.amazonaws.com/mnist/)."
  )


# ----------------------------------------------------------------------------------------------
# LSUN, from the lmdb export of LSUN's download.py (`<category>_train_lmdb/`, `_val_lmdb/`).

LSUN_SPLIT_FOLDERS = {"train": "train", "validation": "val"}  # TFDS split -> export suffix


def lsun_lmdb_dir(root: Path, category: str, split: str) -> Path:
  """The extracted lmdb export of one split; FileNotFoundError naming what is missing."""
  stem = f"{category}_{LSUN_SPLIT_FOLDERS[split]}_lmdb"
  path = root / stem
  if not (path / "data.mdb").is_file():
    raise FileNotFoundError(
        f"Expected the LSUN lmdb export {path}/data.mdb (unzip {stem}.zip into {root}); "
        f"found {'the folder without data.mdb' if path.is_dir() else 'no such folder'}."
    )
  return path


def lsun_records(path: Path) -> Iterator[tuple[str, bytes]]:
  """(key, stored image bytes) of every record of an LSUN lmdb export, in key order."""
  import lmdb  # only LSUN needs it

  env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, max_readers=1)
  try:
    with env.begin(write=False) as txn:
      for key, value in txn.cursor():
        yield key.decode("utf-8"), bytes(value)
  finally:
    env.close()


@no_checksums_lookup
class LsunRealnvpBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """LSUN as RealNVP prepared it: each image downscaled so that its smallest side is 96.

  RealNVP's lsun_formatting.py (and openai/glow's generate_tfr/lsun.py with --realnvp, whose
  data Glow's LSUN results use) store `skimage.transform.pyramid_reduce(image, downscale)` with
  downscale = min(rows, cols) / 96, times 255 and truncated to uint8; `preprocess.
  realnvp_lsun_downscale` does the same. The 64x64 crops are taken when the data is read
  (`registry.DatasetSpec.random_crop`). Source: the lmdb export in the manual dir.
  """

  name = "lsun_realnvp"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
      tfds.core.BuilderConfig(name=category, description=f"LSUN {category}, smallest side 96.")
      for category in ("bedroom", "church_outdoor")
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download <category>_train_lmdb.zip and <category>_val_lmdb.zip with LSUN's download.py "
      "(`python download.py -c <category>`) and unzip both into the manual dir."
  )
  ON_FIRST_USE: ClassVar[bool] = False  # prepared by `python -m eiw_flow_jax.prepare` only

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="LSUN downscaled so that the smallest side is 96 pixels (RealNVP, Glow).",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(None, None, 3)),  # PNG: lossless
        }),
        homepage="https://www.yf.io/p/lsun",
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    root = Path(dl_manager.manual_dir)
    category = self.builder_config.name
    paths = {split: lsun_lmdb_dir(root, category, split) for split in LSUN_SPLIT_FOLDERS}
    return {split: self._generate_examples(path) for split, path in paths.items()}

  def _generate_examples(self, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    from PIL import Image  # only preparing needs it

    for key, blob in lsun_records(path):
      with Image.open(io.BytesIO(blob)) as stored:
        image = np.asarray(stored.convert("RGB"))
      buffer = io.BytesIO()
      Image.fromarray(realnvp_lsun_downscale(image, key)).save(buffer, format="png")
      yield key, {"id": key, "image": buffer.getvalue()}
