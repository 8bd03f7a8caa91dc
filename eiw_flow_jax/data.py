"""Datasets and the grain input pipeline.

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
  `eiw_flow_jax/prepare.py`); reading them needs neither TensorFlow nor internet:

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
    the LSUN lmdb export by `eiw_flow_jax.prepare` (TFDS's own LSUN builder needs
    tensorflow-io); largest centre square resized to the configured size.

  Their pixels are 8-bit (0..255).

`config.dataset.train_split` / `eval_split` are TFDS split names; an empty string picks the
dataset's usual split (e.g. "validation" for ImageNet and LSUN, which have no "test" split).

Pipeline (`create_train_iterator`): the train split is shuffled globally with a seed derived
from `config.seed`, repeated forever with a fresh shuffle per epoch, and cut into global
batches of `config.batch_size` consecutive examples of that stream. Process `p` of `P` takes
block `p` (of `P` equal, contiguous blocks) of every global batch, so the per-process batches
of step `k`, stacked in process order, are global batch `k` row for row, whatever `P` is.
Because the stream is infinite, no example is ever dropped; a batch can straddle an epoch
boundary.

The returned iterator is a `grain.DatasetIterator`: `get_state()` returns a small
JSON-serialisable dict and `set_state()` restores it, so a resumed run sees exactly the batches
an uninterrupted run would. With Orbax::

  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(train_state), data=data.iterator_save_args(train_iter)))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=data.iterator_restore_args(train_iter)))
  train_iter = restored.data  # the same object, moved to the saved position

`config.dataset.worker_count` (default 0; `--config.dataset.worker_count=N`) runs the pipeline
in that many grain worker processes (`mp_prefetch`). The batches are the same for any value, but
the saved iterator state is not: a checkpoint restores only with the worker_count it was saved
with (the training loop refuses a changed one before restoring, `resume.check_resume_config`).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

_ARRAY_RECORD = "array_record"
# Threads reading records for one process. Batches are assembled in these threads, so a deep
# buffer only costs memory; 16 batches is plenty to hide read latency.
_READ_OPTIONS = grain.ReadOptions(num_threads=8, prefetch_buffer_size=16)

CATALOG_HELP = (
    "Prepare it once (as array_record; TensorFlow is needed only for this step, and internet "
    "unless the source files are given with --source_dir):\n"
    "  pip install -e '.[prepare]'\n"
    "  python -m eiw_flow_jax.prepare --dataset={name} --data_dir={data_dir}\n"
    "then set config.dataset.data_dir to that directory (or copy it there)."
)
# Datasets that `eiw_flow_jax.prepare` builds from local source files (--source_dir).
SOURCE_HINTS = {
    "imagenet32": "train_32x32.tar and valid_32x32.tar (van den Oord et al.'s downsampled "
                  "ImageNet; image-net.org may no longer serve them to TFDS)",
    "imagenet64": "train_64x64.tar and valid_64x64.tar (van den Oord et al.'s downsampled "
                  "ImageNet; image-net.org may no longer serve them to TFDS)",
    "lsun_bedroom": "the unzipped LSUN lmdb export bedroom_train_lmdb/ and bedroom_val_lmdb/",
    "lsun_church": "the unzipped LSUN lmdb export church_outdoor_train_lmdb/ and "
                   "church_outdoor_val_lmdb/",
}
# The fix for a dataset that TFDS built in another file format (tfrecord, `tfds build`'s default).
CONVERT_HELP = (
    "Convert it in place (adds array_record shards next to the existing ones; needs the "
    "[prepare] extra, since reading tfrecord needs TensorFlow):\n"
    "  pip install -e '.[prepare]'\n"
    "  python -m eiw_flow_jax.prepare --dataset={name} --data_dir={data_dir} --convert\n"
    "or delete {version_dir} and prepare it again with the command above without --convert."
)


# ----------------------------------------------------------------------------------------------
# Preprocessing for catalog datasets whose stored images are not the training size.


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


# ----------------------------------------------------------------------------------------------
# MNIST idx files.

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


def _find_idx(source_dir: Path, name: str) -> Path | None:
  for candidate in (source_dir / name, source_dir / name.removesuffix(".gz")):
    if candidate.is_file():
      return candidate
  return None


def _mnist_present(source_dir: Path, part: str) -> bool:
  return all(_find_idx(source_dir, name) is not None for name in MNIST_FILES[part])


def _read_mnist(source_dir: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
  image_name, label_name = MNIST_FILES[part]
  image_path, label_path = _find_idx(source_dir, image_name), _find_idx(source_dir, label_name)
  images, labels = read_idx(image_path, ndim=3), read_idx(label_path, ndim=1)
  if len(images) != len(labels):
    raise ValueError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)}.")
  return images[..., None], labels


# ----------------------------------------------------------------------------------------------
# Offline TFDS builders. skip_registration keeps them out of TFDS's global catalog: we create
# them directly, and their names must not clash with catalog datasets.


class _OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared parts of our builders: uint8 image + int label examples from in-memory arrays."""

  IMAGE_SHAPE: ClassVar[tuple[int, int, int]]
  DESCRIPTION: ClassVar[str]
  HOMEPAGE: ClassVar[str]
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # TFDS looks for a checksums file next to a builder's code, and that lookup imports the
    # undeclared `importlib_resources` package (tfds 4.9.10). Ours download nothing, so say
    # there is no code directory and the lookup is skipped.
    return None

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
      " in a directory and set config.dataset.source_dir to it; the train-* files are optional."
  )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    source_dir = Path(dl_manager.manual_dir)
    test_images, test_labels = _read_mnist(source_dir, "t10k")
    if self.builder_config.name == "full":
      train_images, train_labels = _read_mnist(source_dir, "train")
    else:
      n = MNIST_T10K_TRAIN
      train_images, train_labels = test_images[:n], test_labels[:n]
      test_images, test_labels = test_images[n:], test_labels[n:]
    return {
        "train": self._generate_examples(train_images, train_labels),
        "test": self._generate_examples(test_images, test_labels),
    }


# ----------------------------------------------------------------------------------------------
# Registry.

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


def _spec(config: ml_collections.ConfigDict) -> DatasetSpec:
  name = config.dataset.name
  if name not in DATASETS:
    raise ValueError(f"Unknown config.dataset.name {name!r}; registered: {sorted(DATASETS)}.")
  return DATASETS[name]


def _data_dir(config: ml_collections.ConfigDict) -> str:
  data_dir = config.dataset.data_dir
  return os.path.expanduser(data_dir) if data_dir else tfds.core.constants.DATA_DIR


def resolve_split(config: ml_collections.ConfigDict, which: str) -> str:
  """The TFDS split for `which` in ("train", "eval"): the config's, else the dataset's usual."""
  spec = _spec(config)
  if which == "train":
    return config.dataset.train_split or spec.train_split
  if which == "eval":
    return config.dataset.eval_split or spec.eval_split
  raise ValueError(f"`which` must be 'train' or 'eval', got {which!r}.")


def _mnist_idx_builder(data_dir: str, source_dir: str) -> tfds.core.DatasetBuilder:
  """The mnist_idx builder: the files in source_dir pick its config; else a prepared copy."""
  source = Path(os.path.expanduser(source_dir)) if source_dir else None
  if source is not None and _mnist_present(source, "t10k"):
    builder = MnistIdxBuilder(
        config="full" if _mnist_present(source, "train") else "t10k",
        data_dir=data_dir,
        file_format=_ARRAY_RECORD,
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(source))
    )
    return builder
  for builder_config in ("full", "t10k"):
    builder = MnistIdxBuilder(config=builder_config, data_dir=data_dir, file_format=_ARRAY_RECORD)
    if builder.is_prepared():
      return builder
  required = MNIST_FILES["t10k"]
  if source is None:
    found = "config.dataset.source_dir is unset"
  elif not source.is_dir():
    found = f"looked in {source}, which does not exist"
  else:
    missing = [name for name in required if _find_idx(source, name) is None]
    found = f"looked in {source}, which lacks {missing}"
  raise FileNotFoundError(
      f"Dataset 'mnist_idx' needs the MNIST idx files {list(required)} (optionally also "
      f"{list(MNIST_FILES['train'])} for the full train set; uncompressed copies without .gz "
      f"work too) in config.dataset.source_dir, but {found}; nor is a prepared copy under "
      f"{data_dir}/mnist_idx. Download the files from an MNIST mirror (e.g. "
      f"https://ossci-datasets.s3.amazonaws.com/mnist/) into a directory and set "
      f"config.dataset.source_dir to it."
  )


def has_array_record(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether a prepared builder's shards include array_record (main or alternative format).

  `tfds convert_format` (our `prepare --convert`) adds array_record to a tfrecord dataset as an
  "alternative file format" in dataset_info.json. TFDS 4.9.10 restores that list into the
  info's proto but not into `available_file_formats()`, which `as_data_source` consults, so
  such a dataset would be refused; we register the restored alternative on the info here.
  """
  info = builder.info
  restored = list(info.as_proto.alternative_file_formats)
  known = {f.value for f in info.alternative_file_formats}
  if _ARRAY_RECORD in restored and _ARRAY_RECORD not in known:
    info._alternative_file_formats.append(tfds.core.FileFormat.ARRAY_RECORD)  # noqa: SLF001
  return any(f.value == _ARRAY_RECORD for f in info.available_file_formats())


def _catalog_builder(name: str, spec: DatasetSpec, data_dir: str) -> tfds.core.DatasetBuilder:
  """A prepared TFDS catalog builder, or an error saying how to prepare it."""
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    help_text = CATALOG_HELP.format(name=name, tfds_name=spec.tfds_name, data_dir=data_dir)
    if name in SOURCE_HINTS:
      help_text = help_text.replace(
          f"--data_dir={data_dir}\n", f"--data_dir={data_dir} --source_dir=SRC\n", 1
      ) + f" SRC holds {SOURCE_HINTS[name]}."
    raise FileNotFoundError(
        f"Dataset {name!r} (TFDS {spec.tfds_name!r}) is not prepared in data_dir {data_dir} "
        f"(looked for {builder.data_dir}). " + help_text
    )
  if not has_array_record(builder):
    formats = sorted(f.value for f in builder.info.available_file_formats()) or ["unknown"]
    raise FileNotFoundError(
        f"Dataset {name!r} (TFDS {spec.tfds_name!r}) in {builder.data_dir} is stored as "
        f"{', '.join(formats)} (the default of `tfds build`), but this project reads "
        f"array_record (random access, no TensorFlow). "
        + CONVERT_HELP.format(name=name, data_dir=data_dir, version_dir=builder.data_dir)
    )
  return builder


@functools.lru_cache(maxsize=32)
def _open(name: str, data_dir: str, source_dir: str, split: str) -> tuple[Any, DatasetSpec]:
  """Opens a split as a random-access source, preparing our offline builders on first use.

  Cached because the preparation checks touch the disk and every public function opens splits.
  """
  if name not in DATASETS:
    raise ValueError(f"Unknown config.dataset.name {name!r}; registered: {sorted(DATASETS)}.")
  spec = DATASETS[name]
  if spec.builder is DigitsBuilder:
    builder = DigitsBuilder(data_dir=data_dir, file_format=_ARRAY_RECORD)
    builder.download_and_prepare()
  elif spec.builder is MnistIdxBuilder:
    builder = _mnist_idx_builder(data_dir, source_dir)
  else:
    builder = _catalog_builder(name, spec, data_dir)
  available = sorted(builder.info.splits)
  if split.split("[")[0] not in available:
    raise ValueError(
        f"Dataset {name!r} has no split {split!r}; available: {available} (usual train/eval "
        f"splits: {spec.train_split!r}/{spec.eval_split!r}; set config.dataset.train_split / "
        f"eval_split, or leave them empty for these)."
    )
  if spec.builder is None:
    return builder.as_data_source(split, file_format=_ARRAY_RECORD), spec
  return builder.as_data_source(split), spec


@dataclasses.dataclass(frozen=True)
class _ToImage:
  """Example dict -> {"image": uint8 image of the configured shape}. Picklable for workers."""

  name: str
  image_key: str
  image_shape: tuple[int, int, int]
  preprocess: Preprocess | None
  drop_bits: int = 0  # pixel_bits - n_bits when the model uses fewer bits (Glow's CelebA, 5)

  def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    image = np.asarray(example[self.image_key])
    if self.preprocess is not None:
      image = self.preprocess(image, self.image_shape)
    if self.drop_bits:
      image = image >> np.uint8(self.drop_bits)
    if image.ndim == 2:
      image = image[..., None]
    if image.shape != self.image_shape or image.dtype != np.uint8:
      raise ValueError(
          f"Dataset {self.name!r} yields images of shape {image.shape} and dtype {image.dtype}, "
          f"but config.model.image_shape is {self.image_shape} (uint8)."
      )
    return {"image": image}


def _image_dataset(config: ml_collections.ConfigDict, split: str) -> grain.MapDataset:
  """The split as a MapDataset of {"image": uint8}; checks the first image's shape eagerly."""
  source, spec = _open(config.dataset.name, _data_dir(config), config.dataset.source_dir, split)
  to_image = _ToImage(
      config.dataset.name,
      spec.image_key,
      tuple(config.model.image_shape),
      spec.preprocess,
      drop_bits=max(0, spec.pixel_bits - config.model.n_bits),
  )
  if len(source) == 0:
    raise ValueError(f"Split {split!r} of dataset {config.dataset.name!r} is empty.")
  to_image(source[0])  # fail at construction, not inside a reader thread
  return grain.MapDataset.source(source).map(to_image)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index must be in [0, {count}), got {index}.")
  return index, count


def _per_process(batch_size: int, process_count: int, field: str) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
        f"config.{field}={batch_size} must be a positive multiple of the process count "
        f"{process_count}."
    )
  return batch_size // process_count


def _shuffle_seed(seed: int) -> int:
  # grain reshuffles epoch e with seed + e, so raw seeds s and s+1 would share epochs (shifted
  # by one); hashing the seed through SeedSequence (stable across NumPy versions) avoids that.
  if not isinstance(seed, int) or seed < 0:
    raise ValueError(f"config.seed must be a non-negative int, got {seed!r}.")
  return int(np.random.SeedSequence(seed).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# Public API.


def prepare_dataset(config: ml_collections.ConfigDict) -> None:
  """Prepares an offline builder / checks a catalog dataset is there, for both splits.

  Call it once before launching many processes on a shared data_dir, so they do not all try
  to prepare the same dataset at the same time.
  """
  get_dataset_info(config)


def get_dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Split sizes, image shape and pixel bit depth of the configured dataset."""
  train = _image_dataset(config, resolve_split(config, "train"))
  evaluation = _image_dataset(config, resolve_split(config, "eval"))
  return DatasetInfo(
      name=config.dataset.name,
      num_train=len(train),
      num_eval=len(evaluation),
      image_shape=tuple(config.model.image_shape),
      pixel_bits=_spec(config).pixel_bits,
  )


def create_train_iterator(
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
  """Infinite, checkpointable iterator of {"image": uint8 (batch_size // P, H, W, C)}.

  Defaults to this JAX process's index and the JAX process count. See the module docstring
  for the shuffling, sharding and checkpointing contract.
  """
  index, count = _process(process_index, process_count)
  batch = _per_process(config.batch_size, count, "batch_size")
  ds = _image_dataset(config, resolve_split(config, "train"))
  ds = ds.shuffle(seed=_shuffle_seed(config.seed)).repeat(None)
  ds = _ProcessBlock(ds, index, count, batch).batch(batch, drop_remainder=True)
  iter_ds = ds.to_iter_dataset(_READ_OPTIONS)
  workers = config.dataset.get("worker_count", 0)
  if workers:
    # grain's worker processes read absl flags; outside `absl.app.run` (tests, notebooks) they
    # are unparsed and every read raises, so fall back to the flags' defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(iter_ds)


class _ProcessBlock(grain.MapDataset):
  """Process p's share of the stream: block p of every global batch of `count * block` positions.

  Contiguous blocks (not a stride) make the per-process batches of a step, stacked in process
  order as `jax.make_array_from_process_local_data` does, row for row the one-process batch, so
  a multi-host run sees the very arrays a single-host run would.
  """

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent: grain.MapDataset, index: int, count: int, block: int):
    super().__init__(parent)
    self._index, self._count, self._block = index, count, block
    self._length = len(parent) // count

  def __len__(self) -> int:
    return self._length

  def _position(self, i: int) -> int:
    step, offset = divmod(i, self._block)
    return (step * self._count + self._index) * self._block + offset

  def __getitem__(self, index):
    if isinstance(index, slice):
      raise TypeError("_ProcessBlock does not support slicing.")
    return self._parent[self._position(index)]

  def __str__(self) -> str:
    return f"ProcessBlock(index={self._index}, count={self._count}, block={self._block})"


@dataclasses.dataclass(frozen=True)
class _Padded:
  """Position -> example of the eval split, or an all-zero image with mask False past its end."""

  images: grain.MapDataset
  image_shape: tuple[int, int, int]

  def __call__(self, position: int) -> dict[str, Any]:
    if position < len(self.images):
      return {"image": self.images[position]["image"], "mask": np.True_}
    return {"image": np.zeros(self.image_shape, np.uint8), "mask": np.False_}


def num_eval_batches(config: ml_collections.ConfigDict, num_eval: int) -> int:
  """How many batches `eval_batches` yields on every process for an eval split of `num_eval`."""
  return math.ceil(num_eval / config.eval_batch_size)


def eval_batches(
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the whole eval split: {"image": uint8 (B, H, W, C), "mask": bool (B,)}.

  B = config.eval_batch_size // P. The split, in order, is padded with all-zero, mask-False
  examples to `num_eval_batches` global batches; process p takes block p of each (as in
  training), so every process yields the same number of batches, each example is counted
  exactly once overall, and the stacked global batches do not depend on P.
  """
  index, count = _process(process_index, process_count)
  batch = _per_process(config.eval_batch_size, count, "eval_batch_size")
  images = _image_dataset(config, resolve_split(config, "eval"))
  total = num_eval_batches(config, len(images)) * config.eval_batch_size
  padded = _ProcessBlock(grain.MapDataset.range(total), index, count, batch).map(
      _Padded(images, tuple(config.model.image_shape))
  )
  return iter(padded.batch(batch).to_iter_dataset(_READ_OPTIONS))


def load_examples(config: ml_collections.ConfigDict, split: str, n: int) -> np.ndarray:
  """The first `n` images of TFDS split `split`, in stored order, as uint8 (n, H, W, C)."""
  images = _image_dataset(config, split)
  if not 0 < n <= len(images):
    raise ValueError(
        f"Asked for {n} examples of split {split!r} of {config.dataset.name!r}, which has "
        f"{len(images)}."
    )
  return images[:n].batch(n)[0]["image"]


def iterator_save_args(iterator: grain.DatasetIterator) -> Any:
  """Orbax args saving the iterator's position (one JSON file per process)."""
  return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DatasetIterator) -> Any:
  """Orbax args restoring a saved position into `iterator` (built with the same config)."""
  return grain.checkpoint.CheckpointRestore(iterator)
