"""`python -m eiw_flow_jax.prepare --dataset=NAME --data_dir=DIR`: a dataset as TFDS array_record
shards (what `eiw_flow_jax.data.catalog` does, from the command line)."""


from __future__ import annotations

import os
import sys

from absl import app, flags

from eiw_flow_jax.commands import command_line
from eiw_flow_jax.data import registry
from eiw_flow_jax.data.catalog import PrepareError, prepare, summary

_DATASET = flags.DEFINE_string(
    "dataset", None,
    f"Dataset to prepare, one of {sorted(registry.DATASETS)} (config.dataset.name).",
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data dir to write into; use it as config.dataset.data_dir."
)
_SOURCE_DIR = flags.DEFINE_string(
    "source_dir", "",
    "Local source files: train_/valid_32x32.tar (imagenet32/64), Imagenet32_train.zip and "
    "Imagenet32_val.zip or their _npz zips or extracted batches (imagenet32/64_resized), the "
    "extracted LSUN lmdb folders (lsun_*), the MNIST idx files (mnist_idx). Empty: TFDS "
    "downloads.",
)
_DOWNLOAD_DIR = flags.DEFINE_string(
    "download_dir", "", "Where TFDS keeps downloads; empty means <data_dir>/downloads."
)
_CONVERT = flags.DEFINE_bool(
    "convert", False,
    "Add array_record shards to a dataset already prepared as tfrecord (needs TensorFlow).",
)
flags.mark_flags_as_required(["dataset", "data_dir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    prepare(
        _DATASET.value, _DATA_DIR.value, source_dir=_SOURCE_DIR.value,
        download_dir=_DOWNLOAD_DIR.value, convert=_CONVERT.value,
    )
    print(summary(_DATASET.value, os.path.abspath(os.path.expanduser(_DATA_DIR.value))),
          flush=True)
  except (PrepareError, FileNotFoundError, ValueError) as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def cli() -> None:
  """Parses the command line and runs `main` (what `python -m eiw_flow_jax.prepare` does)."""
  command_line.run(main)


if __name__ == "__main__":
  cli()
