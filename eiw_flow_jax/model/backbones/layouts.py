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

import jax
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


# An unrolled Glow flow step's name before the steps of a level were stacked (`level0_step3`),
# and the stacked module's (`level0_steps`).
_UNROLLED_STEP = re.compile(r"^level(\d+)_step(\d+)$")
# DenseFlow's unit layers before they were stacked (`unit0/layer2_coupling`).
_UNROLLED_IN_PATH = re.compile(
    r"(^|/)(level\d+_step\d+|layer\d+_(actnorm|conv1x1|coupling))(/|$)")


def stack_unrolled_steps(tree: Any) -> Any:
  """A pytree of the unrolled Glow layout (`level{l}_step{k}`, k = 0..K-1) in the stacked one.

  Every mapping with keys `level{l}_step{k}` gets, instead, one key `level{l}_steps` whose
  leaves are the K steps' leaves stacked along a new leading axis (what `MultiScaleFlow`
  creates since the steps of a level run under one scan); likewise a DenseFlow unit's
  `layer{j}_actnorm` / `_conv1x1` / `_coupling` become `layers/actnorm`, ... (`DenseUnit`).
  Anything else is kept, recursively through mappings, lists and tuples, so it converts params,
  the EMA params, the optimizer's moments and the constants alike, or a whole raw-restored
  train state.
  """
  if isinstance(tree, Mapping):
    tree = stack_unit_layers(tree) if any(
        UNIT_LAYER.match(str(key)) for key in tree) else tree
    steps: dict[int, dict[int, Any]] = {}
    out = {}
    for key, value in tree.items():
      match = _UNROLLED_STEP.match(str(key))
      if match:
        steps.setdefault(int(match.group(1)), {})[int(match.group(2))] = value
      else:
        out[key] = stack_unrolled_steps(value)
    for level, by_index in sorted(steps.items()):
      if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"level{level}: expected steps 0..{len(by_index) - 1}, got "
                         f"{sorted(by_index)}.")
      parts = [stack_unrolled_steps(by_index[k]) for k in range(len(by_index))]
      out[f"level{level}_steps"] = jax.tree.map(lambda *leaves: np.stack(leaves), *parts)
    return out
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(stack_unrolled_steps(item) for item in tree))
  if isinstance(tree, (list, tuple)):
    return type(tree)(stack_unrolled_steps(item) for item in tree)
  return tree


def unrolled_layout(differences: list[str]) -> bool:
  """Whether architecture differences (`checkpointing.architecture_differences`) are those of a
  checkpoint saved before the steps were stacked."""
  return any(_UNROLLED_IN_PATH.search(d.split(" ")[0]) and "only in the checkpoint" in d
             for d in differences)
