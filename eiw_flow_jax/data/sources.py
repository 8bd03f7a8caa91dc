"""Opening a registered dataset's split as a random-access source (array_record, no TensorFlow),
preparing the offline builders on first use; what to do when a catalog dataset is not prepared."""

from __future__ import annotations

import functools
from typing import Any

import tensorflow_datasets as tfds

from eiw_flow_jax.data.builders import (
  ARRAY_RECORD,
  DigitsBuilder,
  MnistIdxBuilder,
  mnist_idx_builder,
)
from eiw_flow_jax.data.registry import DATASETS, DatasetSpec

CATALOG_HELP = (
    "Prepare it once (as array_record; TensorFlow is needed only for this step, and internet "
    "unless the source files are given with --source_dir):\n"
    "  pip install -e '.[prepare]'\n"
    "  python -m eiw_flow_jax.prepare --dataset={name} --data_dir={data_dir}\n"
    "then set config.dataset.data_dir to that directory (or copy it there)."
)
# Datasets that `eiw_flow_jax.data.catalog` builds from local source files (--source_dir).
SOURCE_HINTS = {
    "imagenet32": "train_32x32.tar and valid_32x32.tar (van den Oord et al.'s downsampled "
                  "ImageNet; image-net.org may no longer serve them to TFDS)",
    "imagenet64": "train_64x64.tar and valid_64x64.tar (van den Oord et al.'s downsampled "
                  "ImageNet; image-net.org may no longer serve them to TFDS)",
    "imagenet32_resized": "Imagenet32_train.zip and Imagenet32_val.zip (Chrabaszcz et al.'s "
                          "box-resized ImageNet, image-net.org/data/downsample; the _npz zips "
                          "or the extracted files work too)",
    "imagenet64_resized": "Imagenet64_train_part1.zip, Imagenet64_train_part2.zip and "
                          "Imagenet64_val.zip (Chrabaszcz et al.'s box-resized ImageNet, "
                          "image-net.org/data/downsample; the _npz zips or the extracted "
                          "files work too)",
    "lsun_bedroom": "the unzipped LSUN lmdb export bedroom_train_lmdb/ and bedroom_val_lmdb/",
    "lsun_church": "the unzipped LSUN lmdb export church_outdoor_train_lmdb/ and "
                   "church_outdoor_val_lmdb/",
}
SOURCE_HINTS["lsun_bedroom_realnvp"] = SOURCE_HINTS["lsun_bedroom"]
SOURCE_HINTS["lsun_church_realnvp"] = SOURCE_HINTS["lsun_church"]
# The fix for a dataset that TFDS built in another file format (tfrecord, `tfds build`'s default).
CONVERT_HELP = (
    "Convert it in place (adds array_record shards next to the existing ones; needs the "
    "[prepare] extra, since reading tfrecord needs TensorFlow):\n"
    "  pip install -e '.[prepare]'\n"
    "  python -m eiw_flow_jax.prepare --dataset={name} --data_dir={data_dir} --convert\n"
    "or delete {version_dir} and prepare it again with the command above without --convert."
)


# ----------------------------------------------------------------------------------------------

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
  if ARRAY_RECORD in restored and ARRAY_RECORD not in known:
    info._alternative_file_formats.append(tfds.core.FileFormat.ARRAY_RECORD)  # noqa: SLF001
  return any(f.value == ARRAY_RECORD for f in info.available_file_formats())


def dataset_builder(spec: DatasetSpec, data_dir: str, **kwargs: Any) -> tfds.core.DatasetBuilder:
  """The builder of a catalog dataset or of one of our own builders (`spec.builder`)."""
  if spec.builder is None:
    return tfds.builder(spec.tfds_name, data_dir=data_dir, **kwargs)
  _, _, config = spec.tfds_name.partition("/")
  return spec.builder(data_dir=data_dir, **({"config": config} if config else {}), **kwargs)


def _catalog_builder(name: str, spec: DatasetSpec, data_dir: str) -> tfds.core.DatasetBuilder:
  """A prepared dataset that the prepare command writes, or an error saying how to prepare it."""
  builder = dataset_builder(spec, data_dir)
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
def open_split(name: str, data_dir: str, source_dir: str, split: str) -> tuple[Any, DatasetSpec]:
  """Opens a split as a random-access source, preparing our offline builders on first use.

  Cached because the preparation checks touch the disk and every public function opens splits.
  """
  if name not in DATASETS:
    raise ValueError(f"Unknown config.dataset.name {name!r}; registered: {sorted(DATASETS)}.")
  spec = DATASETS[name]
  if spec.builder is DigitsBuilder:
    builder = DigitsBuilder(data_dir=data_dir, file_format=ARRAY_RECORD)
    builder.download_and_prepare()
  elif spec.builder is MnistIdxBuilder:
    builder = mnist_idx_builder(data_dir, source_dir)
  else:
    builder = _catalog_builder(name, spec, data_dir)
  available = sorted(builder.info.splits)
  if split.split("[")[0] not in available:
    raise ValueError(
        f"Dataset {name!r} has no split {split!r}; available: {available} (usual train/eval "
        f"splits: {spec.train_split!r}/{spec.eval_split!r}; set config.dataset.train_split / "
        f"eval_split, or leave them empty for these)."
    )
  if spec.builder is None or not spec.builder.ON_FIRST_USE:
    return builder.as_data_source(split, file_format=ARRAY_RECORD), spec
  return builder.as_data_source(split), spec
