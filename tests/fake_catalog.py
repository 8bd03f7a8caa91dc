"""Small synthetic stand-ins for prepared TFDS catalog datasets, written offline without TF.

`write_cifar10` and `write_celeb_a` write `<data_dir>/<name>/<version>/` through TFDS's own
writer: a subclass of the catalog builder (so name, version, features, dataset_info.json and
features.json are TFDS's) whose examples are random images instead of the downloaded ones. The
source-file writers produce, in the published formats, what `eiw_flow_jax.data.catalog
--source_dir` reads for ImageNet (both downsampled versions) and LSUN.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from google.protobuf import json_format
from PIL import Image

from eiw_flow_jax.config.schema import base_config
from eiw_flow_jax.data.builders import no_checksums_lookup


def catalog_config(name: str, data_dir, image_shape) -> object:
  """The base config reading dataset `name` prepared in `data_dir`, its usual splits."""
  config = base_config()
  config.dataset.name = name
  config.dataset.data_dir = str(data_dir)
  config.dataset.train_split = config.dataset.eval_split = ""  # the dataset's usual splits
  config.model.image_shape = image_shape
  return config


def _png(image: np.ndarray, fmt: str = "png") -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=fmt)
  return buffer.getvalue()


def _random_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, 256, (n, *shape)).astype(np.uint8)


def write_cifar10(data_dir: str | Path, num_train: int = 24, num_test: int = 10) -> Path:
  """A prepared array_record `cifar10` with random images; returns its version folder."""
  base = tfds.builder_cls("cifar10")

  @no_checksums_lookup
  class SyntheticCifar10(base, skip_registration=True):
    name = "cifar10"

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
    source_dir: str | Path, category: str = "bedroom", num_train: int = 6, num_val: int = 3,
    shape: tuple[int, int, int] = (72, 96, 3),
) -> Path:
  """`<category>_train_lmdb/` and `_val_lmdb/` holding webp images, as LSUN's export."""
  import lmdb

  source_dir = Path(source_dir)
  source_dir.mkdir(parents=True, exist_ok=True)
  for split, n, seed in (("train", num_train, 4), ("val", num_val, 5)):
    env = lmdb.open(str(source_dir / f"{category}_{split}_lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
      for i, image in enumerate(_random_images(n, shape, seed)):
        txn.put(f"{split}{i:036x}".encode(), _png(image, "webp"))
    env.close()
  return source_dir


def _smooth_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
  """Random images with some spatial structure (low-frequency noise), closer to photographs
  than white noise: JPEG keeps them recognisable and resizing filters differ visibly."""
  rng = np.random.RandomState(seed)
  coarse = rng.randint(0, 256, (n, shape[0] // 8 + 2, shape[1] // 8 + 2, shape[2]))
  images = [np.asarray(Image.fromarray(c.astype(np.uint8)).resize(
      (shape[1], shape[0]), Image.Resampling.BICUBIC)) for c in coarse]
  noise = rng.randint(-12, 13, (n, *shape))
  return np.clip(np.stack(images).astype(np.int64) + noise, 0, 255).astype(np.uint8)


def write_celeb_a(data_dir: str | Path, num_train: int = 6, num_validation: int = 2,
                  num_test: int = 4) -> Path:
  """A prepared array_record `celeb_a` of random 218x178 JPEG faces; returns its version folder.

  The JPEG bytes are stored unchanged, as TFDS stores the downloaded files; `celeb_a_jpegs`
  gives the same files again, for references computed from them."""
  base = tfds.builder_cls("celeb_a")
  info = tfds.builder("celeb_a", data_dir=str(data_dir)).info
  landmarks = list(info.features["landmarks"].keys())
  attributes = list(info.features["attributes"].keys())

  @no_checksums_lookup
  class SyntheticCelebA(base, skip_registration=True):
    name = "celeb_a"

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._faces("train", num_train),
              "validation": self._faces("validation", num_validation),
              "test": self._faces("test", num_test)}

    def _faces(self, split, n):
      for i, (key, blob) in enumerate(celeb_a_jpegs(split, n).items()):
        yield key, {"image": blob, "landmarks": dict.fromkeys(landmarks, i),
                    "attributes": dict.fromkeys(attributes, False),
                    "identity": {"Identity_No": i}}

  builder = SyntheticCelebA(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return Path(builder.data_dir)


def celeb_a_jpegs(split: str, n: int) -> dict[str, bytes]:
  """The JPEG files `write_celeb_a` stores for a split, by file name (deterministic)."""
  faces = _smooth_images(n, (218, 178, 3), {"train": 6, "validation": 7, "test": 8}[split])
  return {f"{split}_{i:06d}.jpg": _png(face, "jpeg") for i, face in enumerate(faces)}


# ----------------------------------------------------------------------------------------------
# Chrabaszcz et al.'s box-resized ImageNet, as image-net.org/data/downsample publishes it.


class _Python2Pickler(pickle._Pickler):
  """Writes protocol 2 as Python 2's cPickle did: every `str` (and the bytes of a numpy array,
  a Python 2 `str`) as a BINSTRING of raw bytes, and numpy under its Python 2 module names.
  Python 3 reads such a file only with an 8-bit `encoding` (latin1 keeps the bytes)."""

  dispatch = dict(pickle._Pickler.dispatch)

  def _save_py2_str(self, obj: str | bytes) -> None:
    data = obj.encode("latin1") if isinstance(obj, str) else obj
    if len(data) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
    self.memoize(obj)

  dispatch[str] = _save_py2_str
  dispatch[bytes] = _save_py2_str


def python2_pickle(obj: object) -> bytes:
  buffer = io.BytesIO()
  _Python2Pickler(buffer, protocol=2).dump(obj)
  # numpy 2 names its reconstructor numpy._core.multiarray; Python 2's numpy said numpy.core.
  return buffer.getvalue().replace(b"cnumpy._core.", b"cnumpy.core.")


def _resized_batches(size: int, per_batch: int, num_val: int, seed: int) -> dict[str, dict]:
  """The published batch dicts: data (N, 3*S*S) uint8 as R, G, B planes, 1-based labels, and
  the train batches' mean."""
  rng = np.random.RandomState(seed)
  batches = {}
  for name, n in [(f"train_data_batch_{i}", per_batch + i % 2) for i in range(1, 11)] + [
      ("val_data", num_val)]:
    batch = {"data": rng.randint(0, 256, (n, 3 * size * size)).astype(np.uint8),
             "labels": [int(v) for v in rng.randint(1, 1001, n)]}
    if name.startswith("train"):
      batch["mean"] = rng.rand(3 * size * size)
    batches[name] = batch
  return batches


def _zip_stem(size: int, name: str) -> str:
  if name == "val_data":
    return f"Imagenet{size}_val"
  if size == 64:
    return f"Imagenet64_train_part{1 if int(name.rsplit('_', 1)[1]) <= 5 else 2}"
  return f"Imagenet{size}_train"


def write_resized_imagenet_sources(
    source_dir: str | Path, size: int = 32, *, kind: str = "pickled", layout: str = "zip",
    python2: bool = False, per_batch: int = 2, num_val: int = 5, seed: int = 9,
) -> dict[str, list[tuple[np.ndarray, int]]]:
  """Chrabaszcz et al.'s files for one resolution, small: 10 train batches and val_data.

  kind "pickled" (`Imagenet32_train.zip`: train_data_batch_1 ...) or "npz"
  (`Imagenet32_train_npz.zip`: Imagenet32_train_npz/train_data_batch_1.npz ...); layout "zip"
  or "folders" (the zips extracted). Pickles are Python 3's, or with `python2` Python 2's
  protocol 2 with raw 8-bit strings. Returns, per TFDS split, the (HWC image, 0-based label)
  pairs written, in batch order.
  """
  source_dir = Path(source_dir)
  source_dir.mkdir(parents=True, exist_ok=True)
  batches = _resized_batches(size, per_batch, num_val, seed)
  files: dict[str, dict[str, bytes]] = {}  # zip stem -> {member: bytes}
  for name, batch in batches.items():
    stem = _zip_stem(size, name)
    if kind == "npz":
      buffer = io.BytesIO()
      np.savez(buffer, **{k: np.asarray(v) for k, v in batch.items()})
      files.setdefault(f"{stem}_npz", {})[f"{stem}_npz/{name}.npz"] = buffer.getvalue()
    else:
      blob = python2_pickle(batch) if python2 else pickle.dumps(batch)
      # The val zip holds its file at the top, the train zips in a folder: both are read.
      member = name if name == "val_data" else f"{stem}/{name}"
      files.setdefault(stem, {})[member] = blob
  for stem, members in files.items():
    if layout == "zip":
      with zipfile.ZipFile(source_dir / f"{stem}.zip", "w") as archive:
        for member, blob in members.items():
          archive.writestr(member, blob)
    else:
      for member, blob in members.items():
        path = source_dir / stem / member.split("/")[-1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
  expected: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "validation": []}
  for name, batch in batches.items():
    images = batch["data"].reshape(-1, 3, size, size).transpose(0, 2, 3, 1)
    split = "validation" if name == "val_data" else "train"
    expected[split] += [(image, label - 1) for image, label in zip(images, batch["labels"])]
  return expected


def assert_tfds_layout(version_dir: Path, tfds_name: str, splits: dict[str, int],
                       builder: tfds.core.DatasetBuilder | None = None,
                       extra: tuple[str, ...] = ()) -> None:
  """The folder is what TFDS 4.9.10 writes for the builder `tfds_name` (or `builder`), with
  the `extra` files its features write (a ClassLabel's `<name>.labels.txt`)."""
  catalog = builder or tfds.builder(tfds_name, data_dir=str(version_dir.parents[2]) + "/nowhere")
  name = tfds_name.split("/")[0]
  assert version_dir.name == str(catalog.info.version)
  files = sorted(p.name for p in version_dir.iterdir())
  expected = ["dataset_info.json", "features.json", *extra] + [
      f"{name}-{split}.array_record-00000-of-00001" for split in splits
  ]
  assert files == sorted(expected)
  info = json.loads((version_dir / "dataset_info.json").read_text())
  assert info["name"] == name and info["version"] == str(catalog.info.version)
  assert info["fileFormat"] == "array_record"
  assert {s["name"]: int(s["shardLengths"][0]) for s in info["splits"]} == splits
  # The feature spec is the builder's, byte for byte.
  features = json.loads((version_dir / "features.json").read_text())
  assert features == json_format.MessageToDict(catalog.info.features.to_proto())


def set_file_format(version_dir: str | Path, file_format: str, alternatives=()) -> None:
  """Rewrites dataset_info.json as if TFDS had built the data in `file_format`."""
  path = Path(version_dir) / "dataset_info.json"
  info = json.loads(path.read_text())
  info["fileFormat"] = file_format
  info["alternativeFileFormats"] = list(alternatives)
  path.write_text(json.dumps(info))
