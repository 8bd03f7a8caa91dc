"""The grain input pipeline: uint8 images of `config.model.image_shape` on the model's grid.

Pipeline (`create_train_iterator`): the train split is shuffled globally with a seed derived
from `config.seed`, repeated forever with a fresh shuffle per epoch, and cut into global
batches of `config.batch_size` consecutive examples of that stream. Process `p` of `P` takes
block `p` (of `P` equal, contiguous blocks) of every global batch, so the per-process batches
of step `k`, stacked in process order, are global batch `k` row for row, whatever `P` is.
Because the stream is infinite, no example is ever dropped; a batch can straddle an epoch
boundary. Datasets stored larger than the model's images (`DatasetSpec.random_crop`: RealNVP's
LSUN) are cut to shape at a random position each time an example is drawn, seeded per stream
position from `config.seed`; evaluation and `load_examples` take one fixed random window per
example (seeded by its index), the same in every run.

The returned iterator is a `grain.DatasetIterator`: `get_state()` returns a small
JSON-serialisable dict and `set_state()` restores it, so a resumed run sees exactly the batches
an uninterrupted run would. With Orbax::

  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(train_state),
      data=grain.checkpoint.CheckpointSave(train_iter)))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(train_iter)))
  train_iter = restored.data  # the same object, moved to the saved position

`config.dataset.worker_count` (default 0; `--config.dataset.worker_count=N`) runs the pipeline
in that many grain worker processes (`mp_prefetch`). The batches are the same for any value, but
the saved iterator state is not: a checkpoint restores only with the worker_count it was saved
with (the training loop refuses a changed one before restoring, `resume.check_resume_config`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from eiw_flow_jax.data import preprocess as preprocessing
from eiw_flow_jax.data.registry import (
  DatasetInfo,
  Preprocess,
  data_dir_for,
  resolve_split,
  spec_for,
)
from eiw_flow_jax.data.sources import open_split

# Threads reading records for one process. Batches are assembled in these threads, so a deep
# buffer only costs memory; 16 batches is plenty to hide read latency.
_READ_OPTIONS = grain.ReadOptions(num_threads=8, prefetch_buffer_size=16)
# Seeds the fixed crop position of each example outside training (evaluation, ActNorm's
# initialisation batch) for datasets with `random_crop`: the same windows in every run.
_FIXED_CROP_SEED = 0


@dataclasses.dataclass(frozen=True)
class _ToImage:
  """Example dict -> {"image": uint8 image of the configured shape}. Picklable for workers.

  With `cropped`, images are stored larger than the configured shape and a window of it is cut
  at a position drawn from `rng` (`_RandomCrop`, `_FixedCrop`) before the shape check.
  """

  name: str
  image_key: str
  image_shape: tuple[int, int, int]
  preprocess: Preprocess | None
  drop_bits: int = 0  # pixel_bits - n_bits when the model uses fewer bits (Glow's CelebA, 5)
  cropped: bool = False

  def __call__(
      self, example: dict[str, Any], rng: np.random.Generator | None = None
  ) -> dict[str, np.ndarray]:
    image = np.asarray(example[self.image_key])
    if self.preprocess is not None:
      image = self.preprocess(image, self.image_shape)
    if self.cropped:
      image = preprocessing.crop(image, self.image_shape[:2], rng)
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


@dataclasses.dataclass(frozen=True)
class _RandomCrop:
  """Training: a fresh window for every example drawn (grain seeds `rng` per stream position)."""

  to_image: _ToImage

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return self.to_image(example, rng)


@dataclasses.dataclass(frozen=True)
class _FixedCrop:
  """Elsewhere: the window of example `index` is drawn from a generator seeded by the index."""

  to_image: _ToImage

  def __call__(self, index: int, example: dict[str, Any]) -> dict[str, Any]:
    return self.to_image(example, np.random.default_rng((_FIXED_CROP_SEED, index)))


def _examples(
    config: ml_collections.ConfigDict, split: str
) -> tuple[grain.MapDataset, _ToImage]:
  """The split's stored examples and their `_ToImage`; checks the first image eagerly."""
  source, spec = open_split(
      config.dataset.name, data_dir_for(config), config.dataset.source_dir, split)
  to_image = _ToImage(
      config.dataset.name,
      spec.image_key,
      tuple(config.model.image_shape),
      spec.preprocess,
      drop_bits=max(0, spec.pixel_bits - config.model.n_bits),
      cropped=spec.random_crop,
  )
  if len(source) == 0:
    raise ValueError(f"Split {split!r} of dataset {config.dataset.name!r} is empty.")
  _FixedCrop(to_image)(0, source[0])  # fail at construction, not inside a reader thread
  return grain.MapDataset.source(source), to_image


def _image_dataset(config: ml_collections.ConfigDict, split: str) -> grain.MapDataset:
  """The split as a MapDataset of {"image": uint8}, crops at their fixed positions."""
  examples, to_image = _examples(config, split)
  return examples.map_with_index(_FixedCrop(to_image)) if to_image.cropped else examples.map(
      to_image)


def _crop_seed(seed: int) -> int:
  # Not the shuffle's seed: the crops of a run must not repeat its shuffle's draws.
  return int(np.random.SeedSequence((seed, 1)).generate_state(1)[0])


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
  spec = spec_for(config)
  return DatasetInfo(
      name=config.dataset.name,
      num_train=len(train),
      num_eval=len(evaluation),
      image_shape=tuple(config.model.image_shape),
      pixel_bits=spec.pixel_bits,
      data_version=spec.data_version,
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
  examples, to_image = _examples(config, resolve_split(config, "train"))
  if to_image.cropped:  # a fresh window each time an example is drawn
    ds = examples.shuffle(seed=_shuffle_seed(config.seed)).repeat(None)
    ds = ds.random_map(_RandomCrop(to_image), seed=_crop_seed(config.seed))
  else:
    ds = examples.map(to_image).shuffle(seed=_shuffle_seed(config.seed)).repeat(None)
  ds = _ProcessBlock(ds, index, count, batch).batch(batch, drop_remainder=True)
  iter_ds = ds.to_iter_dataset(_READ_OPTIONS)
  workers = config.dataset.worker_count
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
