"""Tests for the data layer: offline TFDS builders, the grain pipeline and its errors."""

from __future__ import annotations

import collections
import gzip
import itertools
import json
import os
from pathlib import Path

import grain
import ml_collections
import numpy as np
import pytest

from eiw_flow_jax.config.schema import base_config
from eiw_flow_jax.data import idx, pipeline, preprocess

# Real MNIST idx files, where the machine has them; otherwise the tests write their own.
MNIST_DIR_VARIABLE = "EIW_FLOW_JAX_MNIST_DIR"


def _config(data_dir: Path, **overrides: object) -> ml_collections.ConfigDict:
  config = base_config()
  config.dataset.name = "digits"
  config.dataset.data_dir = str(data_dir)
  config.model.image_shape = (8, 8, 1)
  config.model.n_bits = 5
  config.batch_size = 30  # 1500 train digits = exactly 50 batches per epoch
  config.eval_batch_size = 64
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
  """One TFDS data dir per module, so each builder is prepared only once."""
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def digits_config(data_dir: Path) -> ml_collections.ConfigDict:
  return _config(data_dir)


def mnist_source(directory: Path) -> Path:
  """A directory of MNIST's 10k test-set idx files: $EIW_FLOW_JAX_MNIST_DIR where set, else
  `directory`, filled with 10000 random 28x28 images and labels under MNIST's file names."""
  if os.environ.get(MNIST_DIR_VARIABLE):
    source = Path(os.environ[MNIST_DIR_VARIABLE])
    assert idx.mnist_present(source, "t10k"), (
        f"{MNIST_DIR_VARIABLE}={source} lacks the idx files {idx.MNIST_FILES['t10k']}")
    return source
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  image_name, label_name = idx.MNIST_FILES["t10k"]
  _write_idx(directory / image_name, rng.integers(0, 256, (10_000, 28, 28)))
  _write_idx(directory / label_name, rng.integers(0, 10, (10_000,)))
  return directory


def t10k_images(source: Path) -> np.ndarray:
  return idx.read_idx(idx.find_idx(source, idx.MNIST_FILES["t10k"][0]))


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
  return mnist_source(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="module")
def mnist_config(data_dir: Path, mnist_dir: Path) -> ml_collections.ConfigDict:
  return _config(
      data_dir,
      **{"dataset.name": "mnist_idx", "dataset.source_dir": str(mnist_dir)},
      **{"model.image_shape": (28, 28, 1), "model.n_bits": 8},
  )


def _take(iterator, n: int) -> list[np.ndarray]:
  return [batch["image"] for batch in itertools.islice(iterator, n)]


def _counter(images) -> collections.Counter:
  """Multiset of images (by bytes), to compare sets of examples that may contain duplicates."""
  return collections.Counter(image.tobytes() for batch in images for image in batch)


def _write_idx(path: Path, array: np.ndarray, *, magic: bytes | None = None) -> None:
  """Writes an idx file, gzipped if the name ends in .gz."""
  header = magic or bytes([0, 0, 0x08, array.ndim])
  header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  raw = header + array.astype(np.uint8).tobytes()
  path.write_bytes(gzip.compress(raw, compresslevel=1) if path.suffix == ".gz" else raw)


# ----------------------------------------------------------------------------------------------
# Builders.


def test_digits_builder(digits_config):
  info = pipeline.get_dataset_info(digits_config)
  assert (info.num_train, info.num_eval) == (1500, 297)
  assert info.image_shape == (8, 8, 1) and info.pixel_bits == 5
  train = pipeline.load_examples(digits_config, "train", 1500)
  test = pipeline.load_examples(digits_config, "test", 297)
  assert train.dtype == np.uint8 and train.shape == (1500, 8, 8, 1)
  assert test.shape == (297, 8, 8, 1)
  # Raw values kept: 0..16 with both ends present.
  assert train.min() == 0 and train.max() == 16 and test.max() <= 16
  # Documented split rule: first 1500 in scikit-learn's order -> train, last 297 -> test.
  from sklearn.datasets import load_digits

  raw = load_digits().images.astype(np.uint8)[..., None]
  np.testing.assert_array_equal(train, raw[:1500])
  np.testing.assert_array_equal(test, raw[1500:])


def test_mnist_idx_t10k_split(mnist_config, mnist_dir):
  info = pipeline.get_dataset_info(mnist_config)
  assert (info.num_train, info.num_eval) == (9000, 1000)
  assert info.image_shape == (28, 28, 1)
  raw = t10k_images(mnist_dir)
  test = pipeline.load_examples(mnist_config, "test", 1000)
  assert test.dtype == np.uint8 and test.shape == (1000, 28, 28, 1)
  np.testing.assert_array_equal(test[..., 0], raw[9000:])  # last 1000 -> test
  np.testing.assert_array_equal(pipeline.load_examples(mnist_config, "train", 5)[..., 0], raw[:5])
  batch = next(pipeline.create_train_iterator(mnist_config))
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (30, 28, 28, 1)


def test_mnist_idx_reuses_prepared_copy_without_source(mnist_config):
  pipeline.get_dataset_info(mnist_config)  # prepared (by this or an earlier test)
  config = _config(
      Path(mnist_config.dataset.data_dir),
      **{"dataset.name": "mnist_idx", "dataset.source_dir": ""},
      **{"model.image_shape": (28, 28, 1)},
  )
  assert pipeline.get_dataset_info(config).num_train == 9000


def test_mnist_idx_full_when_train_files_present(tmp_path):
  source = tmp_path / "src"
  source.mkdir()
  rng = np.random.default_rng(0)
  for part, n in (("train", 12), ("t10k", 5)):
    image_name, label_name = idx.MNIST_FILES[part]
    if part == "train":  # uncompressed copies (names without .gz) are accepted too
      image_name, label_name = image_name.removesuffix(".gz"), label_name.removesuffix(".gz")
    _write_idx(source / image_name, rng.integers(0, 256, (n, 28, 28)))
    _write_idx(source / label_name, rng.integers(0, 10, (n,)))
  config = _config(
      tmp_path / "tfds",
      **{"dataset.name": "mnist_idx", "dataset.source_dir": str(source)},
      **{"model.image_shape": (28, 28, 1), "batch_size": 4, "eval_batch_size": 4},
  )
  info = pipeline.get_dataset_info(config)
  assert (info.num_train, info.num_eval) == (12, 5)


# ----------------------------------------------------------------------------------------------
# Training iterator.


def test_train_batches_deterministic_by_seed(digits_config):
  first = _take(pipeline.create_train_iterator(digits_config), 5)
  again = _take(pipeline.create_train_iterator(digits_config), 5)
  for a, b in zip(first, again, strict=True):
    assert a.shape == (30, 8, 8, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
  other_seed = digits_config.copy_and_resolve_references()
  other_seed.seed = 1
  other = _take(pipeline.create_train_iterator(other_seed), 5)
  assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_train_epochs_cover_split_and_reshuffle(digits_config):
  train = pipeline.load_examples(digits_config, "train", 1500)
  batches = _take(pipeline.create_train_iterator(digits_config), 100)  # two epochs of 50 batches
  epoch0, epoch1 = batches[:50], batches[50:]
  assert _counter(epoch0) == _counter([train]) == _counter(epoch1)
  assert not np.array_equal(np.concatenate(epoch0), np.concatenate(epoch1))  # new order
  assert not np.array_equal(np.concatenate(epoch0), train)  # actually shuffled


def test_process_sharding(digits_config):
  train = pipeline.load_examples(digits_config, "train", 1500)
  single = _take(
      pipeline.create_train_iterator(digits_config, process_index=0, process_count=1), 50)
  shards = [
      _take(pipeline.create_train_iterator(digits_config, process_index=p, process_count=2), 50)
      for p in range(2)
  ]
  assert all(batch.shape == (15, 8, 8, 1) for shard in shards for batch in shard)
  # Within an epoch the processes see disjoint examples which together make up the split ...
  assert _counter(shards[0]) + _counter(shards[1]) == _counter([train])
  # ... and at every step, stacked in process order, they are the single-process batch.
  for step in range(50):
    np.testing.assert_array_equal(np.concatenate([shards[0][step], shards[1][step]]), single[step])
  with pytest.raises(ValueError, match="batch_size=30 must be a positive multiple"):
    pipeline.create_train_iterator(digits_config, process_index=0, process_count=4)


def test_iterator_state_resumes_exactly(digits_config):
  iterator = pipeline.create_train_iterator(digits_config)
  _take(iterator, 45)
  state = json.loads(json.dumps(iterator.get_state()))  # state is plain JSON
  expected = _take(iterator, 10)  # crosses the epoch boundary at batch 50
  resumed = pipeline.create_train_iterator(digits_config)
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 10), strict=True):
    np.testing.assert_array_equal(a, b)


def test_worker_processes_give_the_same_batches_and_resume(digits_config):
  """config.dataset.worker_count > 0 (grain worker processes): same stream, resumable."""
  workers = digits_config.copy_and_resolve_references()
  workers.dataset.worker_count = 1
  expected = _take(pipeline.create_train_iterator(digits_config), 6)
  iterator = pipeline.create_train_iterator(workers)
  for a, b in zip(expected[:3], _take(iterator, 3), strict=True):
    np.testing.assert_array_equal(a, b)
  state = json.loads(json.dumps(iterator.get_state()))
  resumed = pipeline.create_train_iterator(workers)
  resumed.set_state(state)
  for a, b in zip(expected[3:], _take(resumed, 3), strict=True):
    np.testing.assert_array_equal(a, b)


def test_iterator_orbax_checkpoint(digits_config, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  iterator = pipeline.create_train_iterator(digits_config)
  _take(iterator, 7)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = _take(iterator, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    fresh = pipeline.create_train_iterator(digits_config)
    restored = manager.restore(
        manager.latest_step(),
        args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)),
    )
  for a, b in zip(expected, _take(restored.data, 3), strict=True):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# Evaluation batches.


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_split_once(digits_config, process_count):
  test = pipeline.load_examples(digits_config, "test", 297)
  per_process = [
      list(pipeline.eval_batches(digits_config, process_index=p, process_count=process_count))
      for p in range(process_count)
  ]
  num_batches = pipeline.num_eval_batches(digits_config, 297)
  assert num_batches == 5  # ceil(297 / 64)
  valid = []
  for batches in per_process:
    assert len(batches) == num_batches  # every process runs the same number of steps
    for batch in batches:
      assert batch["image"].shape == (64 // process_count, 8, 8, 1)
      assert batch["image"].dtype == np.uint8 and batch["mask"].dtype == np.bool_
      assert not batch["image"][~batch["mask"]].any()  # padding is all zeros
      valid.append(batch["image"][batch["mask"]])
  assert sum(len(v) for v in valid) == 297
  assert _counter(valid) == _counter([test])
  # Stacked in process order, step by step, the batches are the split in stored order.
  stacked = [
      np.concatenate([per_process[p][k]["image"][per_process[p][k]["mask"]]
                      for p in range(process_count)])
      for k in range(num_batches)
  ]
  np.testing.assert_array_equal(np.concatenate(stacked), test)


# ----------------------------------------------------------------------------------------------
# Errors.


def test_missing_mnist_source_dir(tmp_path):
  missing = tmp_path / "no_such_dir"
  config = _config(
      tmp_path / "tfds",
      **{"dataset.name": "mnist_idx", "dataset.source_dir": str(missing)},
      **{"model.image_shape": (28, 28, 1)},
  )
  with pytest.raises(FileNotFoundError) as error:
    pipeline.get_dataset_info(config)
  message = str(error.value)
  for needle in ("mnist_idx", str(missing), "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz", "config.dataset.source_dir"):
    assert needle in message


def test_unprepared_catalog_dataset(tmp_path):
  config = _config(tmp_path, **{"dataset.name": "cifar10", "model.image_shape": (32, 32, 3)})
  with pytest.raises(FileNotFoundError) as error:
    pipeline.create_train_iterator(config)
  message = str(error.value)
  for needle in ("'cifar10'", str(tmp_path), "pip install -e '.[prepare]'",
                 f"python -m eiw_flow_jax.prepare --dataset=cifar10 --data_dir={tmp_path}"):
    assert needle in message
  assert not (tmp_path / "cifar10").exists()  # nothing was downloaded or created


def test_unknown_dataset_and_split(digits_config):
  config = digits_config.copy_and_resolve_references()
  config.dataset.name = "nope"
  with pytest.raises(ValueError, match="Unknown config.dataset.name 'nope'"):
    pipeline.get_dataset_info(config)
  with pytest.raises(ValueError, match="has no split 'validation'"):
    pipeline.load_examples(digits_config, "validation", 1)


def test_shape_mismatch(digits_config):
  config = digits_config.copy_and_resolve_references()
  config.model.image_shape = (28, 28, 1)
  with pytest.raises(ValueError, match=r"shape \(8, 8, 1\).*image_shape is \(28, 28, 1\)"):
    pipeline.create_train_iterator(config)


def test_corrupt_idx_files(tmp_path):
  good_labels = np.zeros(10, np.uint8)
  truncated = tmp_path / "truncated" / "t10k-images-idx3-ubyte.gz"
  truncated.parent.mkdir()
  images = np.zeros((10, 28, 28), np.uint8)
  header = bytes([0, 0, 0x08, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
  truncated.write_bytes(gzip.compress(header + images.tobytes()[:-100]))
  with pytest.raises(ValueError, match=f"{truncated}.*corrupt"):
    idx.read_idx(truncated)

  bad_magic = tmp_path / "bad_magic.gz"
  _write_idx(bad_magic, images, magic=bytes([0x1F, 0x8B, 0x08, 3]))
  with pytest.raises(ValueError, match=f"{bad_magic} is not an idx file"):
    idx.read_idx(bad_magic)

  not_gzip = tmp_path / "not_gzip.gz"
  not_gzip.write_bytes(b"garbage")
  with pytest.raises(ValueError, match=f"Cannot read idx file {not_gzip}"):
    idx.read_idx(not_gzip)

  # Through the builder: preparing from a directory with a truncated file names that file.
  _write_idx(truncated.parent / "t10k-labels-idx1-ubyte.gz", good_labels)
  config = _config(
      tmp_path / "tfds",
      **{"dataset.name": "mnist_idx", "dataset.source_dir": str(truncated.parent)},
      **{"model.image_shape": (28, 28, 1)},
  )
  with pytest.raises(ValueError, match=str(truncated)):
    pipeline.get_dataset_info(config)
  assert not (tmp_path / "tfds" / "mnist_idx" / "t10k" / "1.0.0").exists()


def test_center_crop_resize():
  image = np.arange(218 * 178 * 3, dtype=np.uint32).astype(np.uint8).reshape(218, 178, 3)
  out = preprocess.center_crop_resize(image, (64, 64, 3), crop=148)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  gray = preprocess.center_crop_resize(image[..., :1], (32, 48, 1))
  assert gray.shape == (32, 48, 1)


def test_low_bits_are_dropped_for_smaller_n_bits(mnist_config, mnist_dir):
  """n_bits below the stored depth keeps the top bits (x >> (8 - n_bits)), as Glow does."""
  mnist_config.model.n_bits = 5
  raw = t10k_images(mnist_dir)
  test = pipeline.load_examples(mnist_config, "test", 10)
  np.testing.assert_array_equal(test[..., 0], raw[9000:9010] >> 3)
  assert int(test.max()) < 32
