"""Benchmark: images/s of the input pipeline alone (`pipeline.create_train_iterator`), no model.

Datasets: `digits` and `mnist_idx` (the project's offline builders), and synthetic TFDS-format
`cifar10` (PNG-encoded 32x32 images, as TFDS stores them) and `celeba` (178x218 JPEGs, decoded
then 148x148 centre-cropped and resized to 64x64 with Lanczos, as configs/celeba.py does). The
synthetic datasets are written by this script into a temporary TFDS data_dir with the catalog
builders' exact features and versions, so the project opens them as it would the real ones;
their pixels are random noise (JPEG of noise decodes a bit slower than of faces, so CelebA
figures are conservative). `mnist_idx` reads the idx files in --mnist_dir, or without it 10000
random images the script writes in MNIST's idx format (the reader does not look at pixels).

For each dataset and each --workers value (grain worker processes, `config.dataset.worker_count`),
the iterator is built, --warmup batches are drawn, then --batches batches are timed.

  python bench/input_pipeline.py                           # all datasets, workers 0 and 2
  python bench/input_pipeline.py --datasets=celeba --workers=0,1,2,4 --batch=64
"""

from __future__ import annotations

import gzip
import io
import os
import sys
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))

from eiw_flow_jax.data import idx, pipeline  # noqa: E402

flags.DEFINE_list("datasets", ["digits", "mnist_idx", "cifar10", "celeba"], "Datasets.")
flags.DEFINE_list("workers", ["0", "2"], "grain worker processes (config.dataset.worker_count).")
flags.DEFINE_integer("batch", 64, "Global batch (one process).")
flags.DEFINE_integer("batches", 40, "Timed batches.")
flags.DEFINE_integer("warmup", 5, "Untimed batches first (worker start-up, caches).")
flags.DEFINE_integer("num_examples", 2048, "Examples per synthetic split.")
flags.DEFINE_string("mnist_dir", "", "MNIST idx files for mnist_idx (default: random images "
                    "written in MNIST's idx format).")
FLAGS = flags.FLAGS


def _dummy(feature, rng: np.random.RandomState, jpeg: bool):
  """A value for any TFDS feature: random images, zeros/False/"" elsewhere."""
  if isinstance(feature, tfds.features.FeaturesDict):
    return {k: _dummy(v, rng, jpeg) for k, v in feature.items()}
  if isinstance(feature, tfds.features.Image):
    from PIL import Image

    image = rng.randint(0, 256, feature.shape, dtype=np.uint8)
    buffer = io.BytesIO()
    # Encoded here (TFDS would need TensorFlow to encode arrays); stored as given: PNG as TFDS
    # stores CIFAR-10, JPEG as CelebA's files are.
    if jpeg:
      Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    else:
      Image.fromarray(image).save(buffer, format="PNG")
    buffer.seek(0)
    return buffer
  if isinstance(feature, tfds.features.ClassLabel):
    return 0
  if isinstance(feature, tfds.features.Text):
    return ""
  return np.zeros(feature.shape, feature.np_dtype)


def build_synthetic(tfds_name: str, data_dir: str, splits: dict[str, int], jpeg: bool) -> None:
  """Writes `tfds_name` (catalog features and version) with random images as array_record."""
  catalog = tfds.builder(tfds_name, data_dir=data_dir)
  features, version = catalog.info.features, catalog.version

  class Synthetic(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = tfds_name
    VERSION = version

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split, n) for split, n in splits.items()}

    def _generate_examples(self, split, n):
      rng = np.random.RandomState(hash(split) % 2**31)
      for i in range(n):
        yield i, _dummy(features, rng, jpeg)

  Synthetic(data_dir=data_dir, file_format="array_record").download_and_prepare()


def write_synthetic_mnist(directory: str, num_images: int = 10_000) -> str:
  """MNIST's 10k test-set idx files (names and format) holding random images and labels."""
  rng = np.random.RandomState(0)
  arrays = (rng.randint(0, 256, (num_images, 28, 28)), rng.randint(0, 10, (num_images,)))
  for name, array in zip(idx.MNIST_FILES["t10k"], arrays):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with open(os.path.join(directory, name), "wb") as f:
      f.write(gzip.compress(header + array.astype(np.uint8).tobytes(), compresslevel=1))
  return directory


def _config(name: str, data_dir: str, workers: int, mnist_dir: str):
  import importlib

  module = {"digits": "digits", "mnist_idx": "mnist_idx", "cifar10": "cifar10",
            "celeba": "celeba"}[name]
  config = importlib.import_module(module).get_config()
  config.dataset.data_dir = data_dir
  config.dataset.source_dir = mnist_dir if name == "mnist_idx" else ""
  config.dataset.worker_count = workers
  config.batch_size = FLAGS.batch
  return config


def measure(name: str, data_dir: str, workers: int, mnist_dir: str) -> float:
  config = _config(name, data_dir, workers, mnist_dir)
  iterator = pipeline.create_train_iterator(config, process_index=0, process_count=1)
  for _ in range(FLAGS.warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(FLAGS.batches):
    batch = next(iterator)["image"]
  elapsed = time.perf_counter() - start
  assert batch.shape == (FLAGS.batch, *config.model.image_shape), batch.shape
  del iterator
  return FLAGS.batches * FLAGS.batch / elapsed


def main(argv):
  del argv
  print(f"cpu cores: {os.cpu_count()}, batch {FLAGS.batch}, {FLAGS.batches} timed batches\n")
  with tempfile.TemporaryDirectory(prefix="eiw_input_bench_") as data_dir:
    n = FLAGS.num_examples
    if "cifar10" in FLAGS.datasets:
      build_synthetic("cifar10", data_dir, {"train": n, "test": 64}, jpeg=False)
    if "celeba" in FLAGS.datasets:
      build_synthetic("celeb_a", data_dir, {"train": n, "test": 64, "validation": 64}, jpeg=True)
    mnist_dir = FLAGS.mnist_dir
    if "mnist_idx" in FLAGS.datasets and not mnist_dir:
      mnist_dir = write_synthetic_mnist(tempfile.mkdtemp(dir=data_dir, prefix="mnist_idx_"))
    print("| dataset | workers | images/s |\n| --- | --- | --- |")
    for name in FLAGS.datasets:
      for workers in map(int, FLAGS.workers):
        rate = measure(name, data_dir, workers, mnist_dir)
        print(f"| {name} | {workers} | {rate:.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
