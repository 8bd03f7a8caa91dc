"""Small synthetic stand-ins for prepared TFDS catalog datasets, written offline without TF.

`write_cifar10` writes `<data_dir>/cifar10/<version>/` through TFDS's own writer: a subclass of
the catalog `cifar10` builder (so name, version, features, dataset_info.json and features.json
are TFDS's) whose examples are random PNGs instead of the downloaded ones. The source-file
writers produce what `eiw_flow_jax.data.catalog --source_dir` reads for ImageNet and LSUN.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def _png(image: np.ndarray, fmt: str = "png") -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=fmt)
  return buffer.getvalue()


def _random_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, 256, (n, *shape)).astype(np.uint8)


def write_cifar10(data_dir: str | Path, num_train: int = 24, num_test: int = 10) -> Path:
  """A prepared array_record `cifar10` with random images; returns its version folder."""
  base = tfds.builder_cls("cifar10")

  class SyntheticCifar10(base, skip_registration=True):
    name = "cifar10"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:  # no checksums lookup (it imports importlib_resources)
      return None

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._examples("train", num_train, 0),
              "test": self._examples("test", num_test, 1)}

    def _examples(self, split, n, seed):
      for i, image in enumerate(_random_images(n, (32, 32, 3), seed)):
        yield f"{split}_{i:05d}", {"id": f"{split}_{i:05d}", "image": _png(image), "label": i % 10}

  builder = SyntheticCifar10(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return Path(builder.data_dir)


def write_downsampled_imagenet_sources(
    source_dir: str | Path, resolution: int = 32, num_train: int = 24, num_valid: int = 10
) -> Path:
  """train_RxR.tar and valid_RxR.tar of random PNGs, laid out as the van den Oord archives."""
  source_dir = Path(source_dir)
  source_dir.mkdir(parents=True, exist_ok=True)
  tag = f"{resolution}x{resolution}"
  for split, n, seed in (("train", num_train, 2), ("valid", num_valid, 3)):
    with tarfile.open(source_dir / f"{split}_{tag}.tar", "w") as archive:
      for i, image in enumerate(_random_images(n, (resolution, resolution, 3), seed)):
        blob = _png(image)
        member = tarfile.TarInfo(f"{split}_{tag}/{i:08d}.png")
        member.size = len(blob)
        archive.addfile(member, io.BytesIO(blob))
  return source_dir


def write_lsun_lmdb(
    source_dir: str | Path, category: str = "bedroom", num_train: int = 6, num_val: int = 3
) -> Path:
  """`<category>_train_lmdb/` and `_val_lmdb/` holding webp images, as LSUN's export."""
  import lmdb

  source_dir = Path(source_dir)
  source_dir.mkdir(parents=True, exist_ok=True)
  for split, n, seed in (("train", num_train, 4), ("val", num_val, 5)):
    env = lmdb.open(str(source_dir / f"{category}_{split}_lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
      for i, image in enumerate(_random_images(n, (72, 96, 3), seed)):
        txn.put(f"{split}{i:036x}".encode(), _png(image, "webp"))
    env.close()
  return source_dir


def set_file_format(version_dir: str | Path, file_format: str, alternatives=()) -> None:
  """Rewrites dataset_info.json as if TFDS had built the data in `file_format`."""
  path = Path(version_dir) / "dataset_info.json"
  info = json.loads(path.read_text())
  info["fileFormat"] = file_format
  info["alternativeFileFormats"] = list(alternatives)
  path.write_text(json.dumps(info))
