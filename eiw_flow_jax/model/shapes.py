"""Static shapes of the multi-scale model derived from `config.model`."""

from __future__ import annotations

from typing import Any

import ml_collections

from eiw_flow_jax.config.checks import choice
from eiw_flow_jax.config.schema import DTYPES


def level_channels(image_shape: tuple[int, int, int], num_levels: int) -> list[int]:
  """Channels at the end of each level, where the split happens (after the 2x2 squeeze)."""
  channels, out = image_shape[2], []
  for level in range(num_levels):
    channels *= 4
    out.append(channels)
    if level < num_levels - 1:
      channels //= 2
  return out


def resolve_anchor_width(anchor_width: int, channels: int) -> int:
  """The `per_example` anchor width A at a level with `channels` channels (0 means default)."""
  return max(1, channels // 4) if anchor_width == 0 else int(anchor_width)


def compute_dtype(model: ml_collections.ConfigDict) -> Any:
  """The coupling networks' compute dtype (`model.dtype`) as a jnp dtype, or None for "auto"
  (the inputs' dtype, Flax's `dtype=None`)."""
  import jax.numpy as jnp

  name = model.dtype
  choice("model.dtype", name, DTYPES)
  return None if name == "auto" else jnp.dtype(name)
