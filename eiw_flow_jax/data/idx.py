"""MNIST's idx files: reading and finding them."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np

_IDX_UBYTE = 0x08
MNIST_FILES = {
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
}
MNIST_T10K_TRAIN = 9000  # t10k-only split: first 9000 -> "train", last 1000 -> "test"


def read_idx(path: str | os.PathLike[str], *, ndim: int | None = None) -> np.ndarray:
  """Parses an idx file of unsigned bytes (gzipped if the name ends in .gz).

  Raises ValueError naming the file when it is corrupt, truncated or not a ubyte idx file.
  """
  path = Path(path)
  try:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
    raise ValueError(f"Cannot read idx file {path}: {e}") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE:
    raise ValueError(
        f"{path} is not an idx file of unsigned bytes: magic number {raw[:4].hex()!r}, "
        f"expected 0000 08 followed by the number of dimensions."
    )
  dims = raw[3]
  if ndim is not None and dims != ndim:
    raise ValueError(f"{path}: expected an idx file with {ndim} dimensions, found {dims}.")
  header = 4 + 4 * dims
  if len(raw) < header:
    raise ValueError(f"{path} is truncated: {len(raw)} bytes, shorter than its header.")
  shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
  expected = header + math.prod(shape)
  if len(raw) != expected:
    raise ValueError(
        f"{path} is corrupt: header announces shape {shape} ({expected} bytes with the header) "
        f"but the file holds {len(raw)} bytes."
    )
  return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_idx(source_dir: Path, name: str) -> Path | None:
  for candidate in (source_dir / name, source_dir / name.removesuffix(".gz")):
    if candidate.is_file():
      return candidate
  return None


def mnist_present(source_dir: Path, part: str) -> bool:
  return all(find_idx(source_dir, name) is not None for name in MNIST_FILES[part])


def read_mnist(source_dir: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
  image_name, label_name = MNIST_FILES[part]
  image_path, label_path = find_idx(source_dir, image_name), find_idx(source_dir, label_name)
  images, labels = read_idx(image_path, ndim=3), read_idx(label_path, ndim=1)
  if len(images) != len(labels):
    raise ValueError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)}.")
  return images[..., None], labels
