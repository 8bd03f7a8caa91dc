"""Chrabaszcz et al.'s box-resized ImageNet, read from the archives image-net.org publishes.

Chrabaszcz, Loshchilov & Hutter (2017, arXiv:1707.08819) serve each resolution S at
image-net.org/data/downsample in two kinds of zip:

* pickled: `ImagenetS_train.zip` (S = 64: `Imagenet64_train_part1.zip` with batches 1-5 and
  `_part2.zip` with 6-10) and `ImagenetS_val.zip`, holding the pickled batches
  `train_data_batch_1` ... `train_data_batch_10` and `val_data`;
* `_npz`: the same names with `_npz` (`Imagenet32_train_npz.zip`, ...), holding the same arrays
  as `train_data_batch_1.npz` ... and `val_data.npz` (what TFDS's `imagenet_resized` downloads).

Each batch is a dict with `data`, a uint8 array (N, 3*S*S) laid out as the R, G and B planes of
each image, `labels`, 1-based class indices (1..1000), and in train batches `mean`. Pickles are
read with encoding="latin1", so that those written by Python 2 (whose numpy arrays hold their
bytes in `str`) load as well as Python 3's.

The batches may come from either zip kind or from their extracted files anywhere below the
source folder. TFDS's builder keys each example by the member path in the `_npz` zip plus its
index in the batch, and orders the prepared split by a hash of that key; the same keys are used
here whichever kind a batch is read from, so every source gives the split TFDS would, in TFDS's
order (`npz_member`).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

NUM_CLASSES = 1000
# Example counts of the published sets: a truncated or foreign batch changes them.
SPLIT_COUNTS = {"train": 1_281_167, "validation": 50_000}
NUM_TRAIN_BATCHES = 10
# The batch file names (without `.npz`) of each TFDS split; the "val" files are TFDS's validation.
SPLIT_BATCHES = {
    "train": tuple(f"train_data_batch_{i}" for i in range(1, NUM_TRAIN_BATCHES + 1)),
    "validation": ("val_data",),
}
PICKLED, NPZ = "pickled", "npz"
_BATCH_NAME = re.compile(r"^(train_data_batch_\d+|val_data)(\.npz)?$")


def _zip_stem(size: int, batch: str) -> str:
  """The pickled zip a batch is published in (add `_npz` for the other kind)."""
  if batch == "val_data":
    return f"Imagenet{size}_val"
  if size == 64:  # the 64x64 train set is split in two zips
    part = 1 if int(batch.rsplit("_", 1)[1]) <= NUM_TRAIN_BATCHES // 2 else 2
    return f"Imagenet64_train_part{part}"
  return f"Imagenet{size}_train"


def npz_member(size: int, batch: str) -> str:
  """The path of `batch` inside its `_npz` zip, e.g. Imagenet32_train_npz/train_data_batch_1.npz."""
  return f"{_zip_stem(size, batch)}_npz/{batch}.npz"


def zip_names(size: int, split: str) -> list[str]:
  """The zip files that hold `split`'s batches: the pickled kind, then the `_npz` kind."""
  stems = sorted({_zip_stem(size, batch) for batch in SPLIT_BATCHES[split]})
  return [f"{stem}.zip" for stem in stems] + [f"{stem}_npz.zip" for stem in stems]


@dataclasses.dataclass(frozen=True)
class BatchFile:
  """Where one batch is read from: a file, or a member of a zip archive."""

  name: str  # train_data_batch_<i> or val_data
  kind: str  # PICKLED or NPZ
  path: Path  # the file, or the zip archive holding it
  member: str | None = None  # the path inside the zip archive
  key: str = ""  # TFDS's key prefix for its examples (see the module docstring)

  def describe(self) -> str:
    return f"{self.path}:{self.member}" if self.member else str(self.path)


def _zip_members(path: Path) -> Iterator[tuple[str, str, str]]:
  """(batch name, kind, member) of every batch file in a zip archive."""
  with zipfile.ZipFile(path) as archive:
    for member in archive.namelist():
      match = _BATCH_NAME.match(member.rsplit("/", 1)[-1])
      if match:
        yield match.group(1), NPZ if match.group(2) else PICKLED, member


def _extracted_files(source_dir: Path) -> Iterator[tuple[str, str, Path]]:
  """(batch name, kind, path) of every extracted batch file below source_dir."""
  for root, _, files in os.walk(source_dir):
    for file in files:
      match = _BATCH_NAME.match(file)
      if match:
        yield match.group(1), NPZ if match.group(2) else PICKLED, Path(root) / file


def locate(source_dir: Path, size: int) -> dict[str, list[BatchFile]]:
  """The batch files of both splits, per TFDS split in batch order.

  Looks for each batch in the published zips (pickled first, then `_npz`), then among the
  extracted files below source_dir (pickled first). Raises FileNotFoundError naming what is
  missing, or ValueError when one batch is found in two places of the same kind.
  """
  # Candidates per batch name, in order of preference: zips before extracted files, and within
  # each the pickled kind (the files DenseFlow's loaders read) before `_npz`.
  found: dict[str, list[tuple[int, BatchFile]]] = {}
  for split in SPLIT_BATCHES:
    for zip_name in zip_names(size, split):
      path = source_dir / zip_name
      if path.is_file():
        for name, kind, member in _zip_members(path):
          rank = 0 if kind == PICKLED else 1
          found.setdefault(name, []).append((rank, BatchFile(name, kind, path, member)))
  for name, kind, path in _extracted_files(source_dir):
    rank = 2 if kind == PICKLED else 3
    found.setdefault(name, []).append((rank, BatchFile(name, kind, path)))

  located, missing = {}, []
  for split, names in SPLIT_BATCHES.items():
    located[split] = []
    for name in names:
      candidates = sorted(found.get(name, []), key=lambda c: (c[0], str(c[1].path)))
      if not candidates:
        missing.append(name)
        continue
      best = [c for rank, c in candidates if rank == candidates[0][0]]
      if len(best) > 1:
        raise ValueError(
            f"{name} is in {len(best)} places of the same kind: "
            f"{', '.join(c.describe() for c in best)}; keep one."
        )
      located[split].append(dataclasses.replace(best[0], key=npz_member(size, name)))
  if missing:
    zips = sorted({z for split in SPLIT_BATCHES for z in zip_names(size, split)})
    raise FileNotFoundError(
        f"{source_dir} lacks {', '.join(missing)} of Chrabaszcz et al.'s {size}x{size} "
        f"ImageNet: expected the zips {', '.join(zips)} (either kind; "
        f"image-net.org/data/downsample), or their extracted files anywhere below it."
    )
  return located


def _load(batch: BatchFile) -> dict[str, Any]:
  if batch.member is not None:
    with zipfile.ZipFile(batch.path) as archive, archive.open(batch.member) as file:
      return _load_file(file, batch.kind)
  with open(batch.path, "rb") as file:
    return _load_file(file, batch.kind)


def _load_file(file: Any, kind: str) -> dict[str, Any]:
  if kind == NPZ:
    with np.load(io.BytesIO(file.read()), allow_pickle=False) as arrays:
      return {key: arrays[key] for key in arrays.files if key in ("data", "labels")}
  # latin1: a Python 2 pickle's `str` holding a numpy array's bytes loads byte for byte.
  loaded = pickle.load(file, encoding="latin1")  # noqa: S301 - the published data files
  if not isinstance(loaded, dict):
    raise ValueError(f"holds a pickled {type(loaded).__name__}, expected a dict")
  return {key.decode() if isinstance(key, bytes) else key: value for key, value in loaded.items()}


def read_batch(batch: BatchFile, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images (N, size, size, 3), 0-based int64 labels (N,)) of one batch, checked.

  Raises ValueError naming the file and what it holds when it is not such a batch.
  """
  try:
    loaded = _load(batch)
  except (OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
    raise ValueError(f"{batch.describe()}: unreadable as a {batch.kind} batch ({e})") from e
  missing = [key for key in ("data", "labels") if key not in loaded]
  if missing:
    raise ValueError(f"{batch.describe()}: lacks {missing}; holds {sorted(loaded)}")
  data, labels = np.asarray(loaded["data"]), np.asarray(loaded["labels"])
  row = 3 * size * size
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row:
    raise ValueError(
        f"{batch.describe()}: data is {data.dtype} {data.shape}, expected uint8 (N, {row}) "
        f"for {size}x{size} images"
    )
  if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        f"{batch.describe()}: labels are {labels.dtype} {labels.shape}, expected "
        f"{len(data)} integers (one per row of data)"
    )
  if len(labels) and not (labels.min() >= 1 and labels.max() <= NUM_CLASSES):
    raise ValueError(
        f"{batch.describe()}: labels span {labels.min()}..{labels.max()}, expected the "
        f"1-based classes 1..{NUM_CLASSES}"
    )
  # R, G and B planes per row -> (N, S, S, 3), as TFDS's builder reshapes them.
  images = data.reshape(len(data), 3, size, size).transpose(0, 2, 3, 1)
  return images, labels.astype(np.int64) - 1


def check_count(split: str, count: int) -> None:
  """Raises ValueError when a split does not hold the published number of images."""
  want = SPLIT_COUNTS[split]
  if count != want:
    raise ValueError(
        f"the {split} split holds {count} images, but Chrabaszcz et al.'s has {want}: a "
        f"truncated or foreign batch file?"
    )
