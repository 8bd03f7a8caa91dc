"""Parameter layouts: pure pytree transforms between the per-layer names of the authors'
PyTorch DenseFlow units (and of this project's unrolled checkpoints) and the stacked layout that
the scanned units and flow steps use. Shared by `convert` (the authors' checkpoints) and
`checkpointing` (this project's checkpoints saved before the steps were stacked), which import
it, not each other.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np


class LayoutError(ValueError):
  """A tree that cannot be put in the stacked layout (missing layers, ragged shapes)."""


UNIT_LAYER = re.compile(r"^layer(\d+)_(actnorm|conv1x1|coupling)$")


def stack_unit_layers(tree: Any) -> Any:
  """The per-layer names of a unit (`layer{j}_actnorm`, `layer{j}_conv1x1`,
  `layer{j}_coupling`, as the torch model numbers them) -> the stacked layout of
  `DenseUnit` (`layers/actnorm`, ..., each leaf with a leading axis over j)."""
  if not isinstance(tree, Mapping):
    return tree
  layers: dict[str, dict[int, Any]] = {}
  out = {}
  for key, value in tree.items():
    match = UNIT_LAYER.match(key)
    if match:
      layers.setdefault(match.group(2), {})[int(match.group(1))] = value
    else:
      out[key] = stack_unit_layers(value)
  if layers:
    stacked = {}
    for part, by_index in layers.items():
      if sorted(by_index) != list(range(len(by_index))):
        raise LayoutError(f"{part}: expected layers 0..{len(by_index) - 1}, got "
                              f"{sorted(by_index)}.")
      stacked[part] = _stack([by_index[j] for j in range(len(by_index))])
    out["layers"] = stacked
  return out


def _stack(trees: list[Any]) -> Any:
  """Leaves of equal-structured nested dicts stacked along a new leading axis (ragged
  structures or shapes raise LayoutError with the first differing path)."""
  if isinstance(trees[0], Mapping):
    keys = set(trees[0])
    if any(set(t) != keys for t in trees):
      raise LayoutError(f"layers of a unit hold different weights: {sorted(keys)} vs "
                            f"{[sorted(t) for t in trees if set(t) != keys][0]}.")
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  shapes = {np.shape(t) for t in trees}
  if len(shapes) != 1:
    raise LayoutError(f"layers of a unit with different shapes: {sorted(shapes)}.")
  return np.stack(trees)
