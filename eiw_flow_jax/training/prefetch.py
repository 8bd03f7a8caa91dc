"""Input prefetching: global batches put on the devices ahead of the train step.

`Prefetcher` puts config.prefetch_batches global batches on the devices ahead of the step;
checkpoints record the input position of the next batch the step takes, not of the
prefetched ones, so resuming stays exact.
"""

from __future__ import annotations

import collections
import json
import math
from typing import Any

import jax
from jax.sharding import NamedSharding

from eiw_flow_jax.training.sharding import global_batch


class _Position:
  """The input pipeline's position as it was before a prefetched batch (for checkpoints).

  grain's checkpoint handler calls `get_state()` on a non-DatasetIterator item and expects the
  JSON bytes; restoring goes into the real iterator as usual.
  """

  def __init__(self, state: Any):
    self._state = state

  def get_state(self) -> bytes:
    return json.dumps(self._state, indent=4).encode()


class Prefetcher:
  """Global batches put on the devices `depth` steps ahead of the train step.

  `jax.make_array_from_process_local_data` starts the host-to-device copy and returns at once,
  so batch s+depth is in flight while step s runs. The iterator runs ahead of the step by
  `depth` batches; `position()` is the position of the next batch the step will take (what a
  checkpoint must hold for an exact resume), recorded before each batch was drawn. Runs in the
  calling thread, so the iterator is never touched concurrently. At most `limit` batches are
  drawn in all (the steps left), so the iterator ends where the last step's batch ended.
  """

  def __init__(
      self, iterator: Any, sharding: NamedSharding, depth: int, limit: int | None = None
  ):
    self.iterator, self.sharding, self.depth = iterator, sharding, depth
    self._left = math.inf if limit is None else limit
    self._queue: collections.deque[tuple[Any, jax.Array]] = collections.deque()

  def _fill(self, size: int) -> None:
    while len(self._queue) < size and self._left > 0:
      self._left -= 1
      before = self.iterator.get_state()
      batch = global_batch(next(self.iterator)["image"], self.sharding)
      self._queue.append((before, batch))

  def next(self) -> jax.Array:
    self._fill(1)
    _, batch = self._queue.popleft()
    self._fill(self.depth)
    return batch

  def position(self) -> Any:
    """For `checkpointing.save`: the iterator itself, or its state before the queued batches."""
    return _Position(self._queue[0][0]) if self._queue else self.iterator
