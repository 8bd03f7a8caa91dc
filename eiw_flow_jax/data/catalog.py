"""Preparing a dataset as TFDS array_record shards, the format `eiw_flow_jax.data` reads.

  pip install -e '.[prepare]'        # TensorFlow, Apache Beam, ... : needed for this step only
  python -m eiw_flow_jax.prepare --dataset=cifar10 --data_dir=~/tensorflow_datasets

`--dataset` takes this project's names (`config.dataset.name`, see `eiw_flow_jax.data`):

* `mnist`, `cifar10`, `celeba` (and `celeba_realnvp`, `celeba_denseflow`: the same TFDS
  `celeb_a`, preprocessed when read): TFDS downloads the source files and builds the catalog
  dataset with `file_format=array_record` (the builder API that `tfds build ...
  --file_format=array_record` calls, minus the CLI's extra imports).
* `imagenet32_resized`, `imagenet64_resized` (TFDS `imagenet_resized/32x32`, `/64x64`,
  Chrabaszcz et al.'s box-resized ImageNet, the data of DenseFlow's ImageNet results): with
  `--source_dir=DIR` holding `Imagenet32_train.zip` and `Imagenet32_val.zip` (64:
  `Imagenet64_train_part1.zip`, `_part2.zip`, `Imagenet64_val.zip`), their `_npz` zips, or the
  extracted batch files, this project's subclass of TFDS's builder writes TFDS's layout offline
  (the val set as "validation"), the examples keyed as TFDS keys them so the prepared split is
  TFDS's, in TFDS's order (`eiw_flow_jax.data.resized_imagenet`). Without `--source_dir` TFDS
  downloads the `_npz` zips.
* `imagenet32`, `imagenet64` (TFDS `downsampled_imagenet/32x32`, `/64x64`, the van den Oord
  et al. data of the density papers): with `--source_dir=DIR` holding `train_32x32.tar` and
  `valid_32x32.tar` (or `_64x64`; extracted folders of the same names work too), this project's
  subclass of TFDS's builder writes the very layout TFDS would, offline and without TensorFlow.
  Without `--source_dir` TFDS downloads from image-net.org/small, which may no longer serve
  these files; the error then says to use `--source_dir`.
* `lsun_bedroom`, `lsun_church` (TFDS `lsun/bedroom`, `lsun/church_outdoor`): only from the
  LSUN lmdb export with `--source_dir=DIR` holding the extracted `bedroom_train_lmdb/` and
  `bedroom_val_lmdb/` (`church_outdoor_...` for church), read with the `lmdb` package by this
  project's subclass of TFDS's LSUN builder (TFDS's own needs tensorflow-io, whose current
  wheel does not load next to current TensorFlow). Same layout and feature spec as TFDS's.
* `lsun_bedroom_realnvp`, `lsun_church_realnvp`: from the same lmdb export, RealNVP's
  downscaling to a smallest side of 96 (`builders.LsunRealnvpBuilder`, `lsun_realnvp/...`).
* `digits`, `mnist_idx`: the offline builders, prepared exactly as training would.

A dataset already built in another format (`tfds build`'s default is tfrecord) is reported with
the fix: `--convert` adds array_record shards next to the tfrecord ones (TFDS's
`convert_format`, which needs TensorFlow to read tfrecord), or delete it and prepare again.
Re-running on a prepared array_record dataset does nothing.
"""

from __future__ import annotations

import importlib.util
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

from eiw_flow_jax.config import schema
from eiw_flow_jax.data import pipeline, registry, resized_imagenet, sources
from eiw_flow_jax.data.builders import (
  ARRAY_RECORD,
  lsun_lmdb_dir,
  lsun_records,
  no_checksums_lookup,
)

# Module -> pip requirement that a TFDS download-and-build needs with TFDS 4.9.10 (the
# [prepare] extra of setup.cfg installs them). TFDS imports each lazily, so a missing one
# surfaces only deep inside a build; we check up front.
PREPARE_MODULES = {
    "tensorflow": "tensorflow",
    "apache_beam": "apache-beam",
    "mlcroissant": "mlcroissant",
    "importlib_resources": "importlib_resources",
}
INSTALL_HINT = "pip install -e '.[prepare]'  (from the repository root)"

# Datasets that cannot be downloaded by TFDS today and need --source_dir.
_LSUN_CATEGORIES = {"lsun_bedroom": "bedroom", "lsun_church": "church_outdoor"}
_LSUN_REALNVP = {"lsun_bedroom_realnvp": "bedroom", "lsun_church_realnvp": "church_outdoor"}
_DOWNSAMPLED = {"imagenet32": "32x32", "imagenet64": "64x64"}
# Datasets that TFDS can download, or this project writes from local files with --source_dir.
_RESIZED = {"imagenet32_resized": 32, "imagenet64_resized": 64}


class PrepareError(Exception):
  """A problem the user can fix; main() prints it as one line and exits 1."""


def missing_modules(modules: dict[str, str] | None = None) -> list[str]:
  """The pip requirements (of `modules`, default PREPARE_MODULES) whose module is missing."""
  modules = PREPARE_MODULES if modules is None else modules
  return [req for module, req in modules.items() if importlib.util.find_spec(module) is None]


# ----------------------------------------------------------------------------------------------
# Builders that read local source files into the catalog datasets' exact layout. They subclass
# TFDS's builder (same name, config, version and features: `_info` is inherited) and replace only
# where the examples come from. skip_registration keeps TFDS's catalog entry the one registered.


def _png(image: Any) -> bytes:
  from PIL import Image  # TFDS encodes arrays with TensorFlow; Pillow's PNG is as lossless

  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="png")
  return buffer.getvalue()


def _split_path(source_dir: Path, stem: str) -> Path:
  for candidate in (source_dir / f"{stem}.tar", source_dir / stem):
    if candidate.exists():
      return candidate
  raise PrepareError(
      f"{source_dir} has neither {stem}.tar nor a folder {stem}/ (files in it: "
      f"{sorted(p.name for p in source_dir.iterdir())[:10] if source_dir.is_dir() else 'none'})."
  )


def _image_files(path: Path) -> Iterator[tuple[str, bytes]]:
  """(name, bytes) of every image in a tar archive or a folder, in sorted name order."""
  suffixes = (".png", ".jpg", ".jpeg")
  if path.is_dir():
    for file in sorted(path.rglob("*")):
      if file.suffix.lower() in suffixes:
        yield file.relative_to(path).as_posix(), file.read_bytes()
    return
  with tarfile.open(path) as archive:
    members = sorted(
        (m for m in archive.getmembers() if m.isfile() and m.name.lower().endswith(suffixes)),
        key=lambda m: m.name,
    )
    for member in members:
      yield member.name, archive.extractfile(member).read()


def downsampled_imagenet_builder(
    resolution: str, source_dir: str, **kwargs: Any
) -> tfds.core.DatasetBuilder:
  """TFDS `downsampled_imagenet/<resolution>` from local train_/valid_<resolution> files."""
  base = tfds.builder_cls("downsampled_imagenet")

  @no_checksums_lookup
  class LocalDownsampledImagenet(base, skip_registration=True):
    name = "downsampled_imagenet"

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
      del dl_manager
      root = Path(source_dir)
      return {
          "train": self._generate_examples(_split_path(root, f"train_{resolution}")),
          "validation": self._generate_examples(_split_path(root, f"valid_{resolution}")),
      }

    def _generate_examples(self, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
      count = 0
      for name, blob in _image_files(path):
        count += 1
        yield name, {"image": blob}  # stored bytes unchanged, as TFDS's builder does
      if not count:
        raise PrepareError(f"{path} holds no .png/.jpg images.")

  return LocalDownsampledImagenet(config=resolution, **kwargs)


def lsun_builder(category: str, source_dir: str, **kwargs: Any) -> tfds.core.DatasetBuilder:
  """TFDS `lsun/<category>` from the extracted LSUN lmdb export, read with `lmdb`."""
  base = tfds.builder_cls("lsun")

  @no_checksums_lookup
  class LocalLsun(base, skip_registration=True):
    name = "lsun"

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
      del dl_manager
      root = Path(source_dir)
      paths = {split: lsun_lmdb_dir(root, category, split) for split in ("train", "validation")}
      return {split: self._generate_examples(path) for split, path in paths.items()}

    def _generate_examples(self, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
      # Same records as TFDS's builder: the key as id, the stored (webp) bytes unchanged.
      for index, (key, blob) in enumerate(lsun_records(path)):
        yield index, {"id": key, "image": io.BytesIO(blob)}

  return LocalLsun(config=category, **kwargs)


def resized_imagenet_builder(
    size: int, source_dir: str, **kwargs: Any
) -> tfds.core.DatasetBuilder:
  """TFDS `imagenet_resized/<size>x<size>` from Chrabaszcz et al.'s zips or extracted batches."""
  base = tfds.builder_cls("imagenet_resized")

  @no_checksums_lookup
  class LocalImagenetResized(base, skip_registration=True):
    name = "imagenet_resized"

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
      del dl_manager
      try:
        located = resized_imagenet.locate(Path(source_dir), size)
      except (FileNotFoundError, ValueError) as e:
        raise PrepareError(str(e)) from e
      return {split: self._generate_examples(split, batches) for split, batches in located.items()}

    def _generate_examples(
        self, split: str, batches: list[resized_imagenet.BatchFile]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
      count = 0
      for batch in batches:
        try:
          images, labels = resized_imagenet.read_batch(batch, size)
        except ValueError as e:
          raise PrepareError(str(e)) from e
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
          # TFDS's key: the batch's path in its _npz zip plus the index (module docstring).
          yield f"{batch.key}{i}", {"image": _png(image), "label": int(label)}
        count += len(labels)
      try:
        resized_imagenet.check_count(split, count)
      except ValueError as e:
        raise PrepareError(f"{source_dir}: {e}") from e

  return LocalImagenetResized(config=f"{size}x{size}", **kwargs)


# ----------------------------------------------------------------------------------------------


def catalog_builder(
    dataset: str, data_dir: str, *, source_dir: str = "", file_format: str | None = ARRAY_RECORD
) -> tfds.core.DatasetBuilder:
  """The builder that prepares `dataset` (a name of `registry.DATASETS`) into data_dir."""
  spec = registry.DATASETS[dataset]
  kwargs: dict[str, Any] = {"data_dir": data_dir}
  if file_format is not None:
    kwargs["file_format"] = file_format
  if source_dir and dataset in _DOWNSAMPLED:
    return downsampled_imagenet_builder(_DOWNSAMPLED[dataset], source_dir, **kwargs)
  if source_dir and dataset in _RESIZED:
    return resized_imagenet_builder(_RESIZED[dataset], source_dir, **kwargs)
  if dataset in _LSUN_CATEGORIES or dataset in _LSUN_REALNVP:
    category = {**_LSUN_CATEGORIES, **_LSUN_REALNVP}[dataset]
    if not source_dir:
      raise PrepareError(
          f"Dataset {dataset!r} (TFDS {spec.tfds_name!r}) can only be prepared from the LSUN "
          f"lmdb export: download {category}_train_lmdb.zip and {category}_val_lmdb.zip (LSUN's "
          f"download.py, `python download.py -c {category}`), unzip both into a folder and pass "
          f"--source_dir=FOLDER. TFDS's own LSUN builder needs tensorflow-io, whose current "
          f"wheel does not load next to current TensorFlow, so it is not used."
      )
    if dataset in _LSUN_REALNVP:
      return sources.dataset_builder(spec, **kwargs)  # reads the manual dir: --source_dir
    return lsun_builder(category, source_dir, **kwargs)
  if source_dir:
    with_sources = sorted({**_DOWNSAMPLED, **_RESIZED, **_LSUN_CATEGORIES, **_LSUN_REALNVP})
    raise PrepareError(
        f"--source_dir is only used for {with_sources} and "
        f"mnist_idx; TFDS downloads {dataset!r} (TFDS {spec.tfds_name!r}) itself."
    )
  return tfds.builder(spec.tfds_name, **kwargs)


def convert_in_place(version_dir: str) -> None:
  """Adds array_record shards next to a tfrecord dataset (TFDS's `tfds convert_format`)."""
  from tensorflow_datasets.scripts.cli import convert_format_utils

  convert_format_utils.convert_dataset(
      out_dir=None,
      out_file_format=ARRAY_RECORD,
      dataset_version_dir=[version_dir],
      overwrite=False,
      use_beam=False,
      num_workers=1,
  )


def _offline(dataset: str, data_dir: str, source_dir: str) -> str:
  """Prepares digits / mnist_idx exactly as training would."""
  spec = registry.DATASETS[dataset]
  config = schema.base_config()
  config.dataset.name = dataset
  config.dataset.data_dir = data_dir
  config.dataset.source_dir = source_dir
  config.model.image_shape = spec.builder.IMAGE_SHAPE
  config.model.n_bits = spec.pixel_bits
  pipeline.prepare_dataset(config)
  return os.path.join(data_dir, spec.tfds_name)


def prepare(
    dataset: str,
    data_dir: str,
    *,
    source_dir: str = "",
    download_dir: str = "",
    convert: bool = False,
) -> str:
  """Prepares `dataset` as array_record in data_dir; returns the dataset's version folder.

  Raises PrepareError (what is wrong and the fix) for unknown names, missing requirements or
  source files, and a dataset already built in another format without `convert`.
  """
  if dataset not in registry.DATASETS:
    raise PrepareError(f"Unknown --dataset {dataset!r}; choose one of {sorted(registry.DATASETS)}.")
  if not data_dir:
    raise PrepareError("--data_dir is empty: give the folder to write the dataset to.")
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  source_dir = os.path.abspath(os.path.expanduser(source_dir)) if source_dir else ""
  if source_dir and not os.path.isdir(source_dir):
    raise PrepareError(f"--source_dir {source_dir} is not a folder.")
  spec = registry.DATASETS[dataset]
  if spec.builder is not None and spec.builder.ON_FIRST_USE:
    if convert:
      raise PrepareError(f"--convert is for TFDS catalog datasets; {dataset!r} is offline.")
    return _offline(dataset, data_dir, source_dir)

  existing = sources.dataset_builder(spec, data_dir)
  if existing.is_prepared():
    if sources.has_array_record(existing):
      logging.info("%s is already prepared as array_record in %s.", dataset, existing.data_dir)
      return str(existing.data_dir)
    if not convert:
      formats = sorted(f.value for f in existing.info.available_file_formats())
      raise PrepareError(
          f"Dataset {dataset!r} (TFDS {spec.tfds_name!r}) is already prepared in "
          f"{existing.data_dir} as {', '.join(formats) or 'an unknown format'}, not array_record "
          f"(TFDS refuses to add a format to a built dataset: 'File format is already set'). "
          f"Re-run with --convert to add array_record shards next to it (needs TensorFlow to "
          f"read them: {INSTALL_HINT}), or delete {existing.data_dir} and run this again."
      )
    missing = missing_modules({"tensorflow": "tensorflow"})
    if missing:
      raise PrepareError(f"--convert reads tfrecord, which needs {missing}: {INSTALL_HINT}.")
    logging.info("Converting %s to array_record in place.", existing.data_dir)
    convert_in_place(str(existing.data_dir))
    return str(existing.data_dir)
  if convert:
    raise PrepareError(
        f"--convert: nothing to convert, {dataset!r} is not prepared in {data_dir} (looked for "
        f"{existing.data_dir}). Run without --convert to prepare it."
    )

  builder = catalog_builder(dataset, data_dir, source_dir=source_dir)
  downloads = not source_dir
  if downloads:
    missing = missing_modules()
    if missing:
      raise PrepareError(
          f"Preparing {dataset!r} (TFDS {spec.tfds_name!r}) downloads and encodes it with TFDS, "
          f"which needs {missing}: {INSTALL_HINT}."
      )
  try:
    builder.download_and_prepare(
        download_dir=os.path.abspath(os.path.expanduser(download_dir)) if download_dir else None,
        # Our own builders that read local files take them as TFDS's manual dir.
        download_config=tfds.download.DownloadConfig(manual_dir=source_dir or None),
    )
  except PrepareError:
    raise
  except Exception as e:  # noqa: BLE001 - add what to do, keep the cause chained
    hint = ""
    if dataset in _DOWNSAMPLED and downloads:
      hint = (
          f" image-net.org may no longer serve the downsampled ImageNet files: get "
          f"train_{_DOWNSAMPLED[dataset]}.tar and valid_{_DOWNSAMPLED[dataset]}.tar and pass "
          f"--source_dir=FOLDER."
      )
    if dataset in _RESIZED and downloads:
      hint = f" Download {sources.SOURCE_HINTS[dataset]} yourself and pass --source_dir=FOLDER."
    raise PrepareError(
        f"Preparing {dataset!r} (TFDS {spec.tfds_name!r}) into {data_dir} failed: "
        f"{type(e).__name__}: {e}.{hint}"
    ) from e
  return str(builder.data_dir)


def summary(dataset: str, data_dir: str) -> str:
  """One line per split of the prepared dataset, read back the way training reads it."""
  spec = registry.DATASETS[dataset]
  prepared_here = spec.builder is None or not spec.builder.ON_FIRST_USE
  builder = sources.dataset_builder(spec, data_dir) if prepared_here else None
  version = registry.DATA_VERSIONS[spec.data_version].title
  lines = [f"{dataset} ready in {data_dir} (config.dataset.data_dir={data_dir}); data: {version}"]
  if builder is not None:
    formats = sorted(f.value for f in builder.info.available_file_formats())
    lines[0] += f", TFDS {spec.tfds_name} {builder.info.version}, formats {formats}"
    for name, split in sorted(builder.info.splits.items()):
      lines.append(f"  {name}: {split.num_examples} examples")
  return "\n".join(lines)
