"""prefetch.Prefetcher: batches ahead on the devices; checkpoints hold the next batch's position."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from eiw_flow_jax.config import checks, schema
from eiw_flow_jax.training import prefetch, run_config, sharding


class _Counter:
  """A checkpointable iterator of {"image": batch filled with its index}, like grain's."""

  def __init__(self):
    self.position = 0

  def __next__(self):
    batch = np.full((2, 2, 2, 1), self.position, np.uint8)
    self.position += 1
    return {"image": batch}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_order_position_and_limit(depth):
  on_data = sharding.batch_sharding(sharding.make_mesh(jax.devices()[:1]))
  iterator = _Counter()
  batches = prefetch.Prefetcher(iterator, on_data, depth, limit=5)
  for expected in range(5):
    batch = batches.next()
    assert isinstance(batch, jax.Array) and int(batch[0, 0, 0, 0]) == expected
    # The iterator runs ahead by `depth` (never past the limit) ...
    assert iterator.position == min(expected + 1 + depth, 5)
    # ... but a checkpoint records the position of the batch the next step takes.
    position = batches.position()
    state = position.get_state()
    saved = json.loads(state) if isinstance(state, bytes) else state
    assert saved == {"position": expected + 1}
  assert batches.position() is iterator  # nothing left in flight: the iterator itself


def test_prefetch_batches_is_validated():
  config = schema.base_config()
  config.prefetch_batches = -1
  with pytest.raises(checks.ConfigError, match="config.prefetch_batches must be an int >= 0"):
    run_config.validate_config(config)
