"""Parameter layouts: pure pytree transforms from older layouts to the current one.

Each backbone owns its migrations (`MultiScaleFlow.migrate_layout`,
`DenseFlowBackbone.migrate_layout`, reached through `Flow.migrate_layout`): it says which keys
of an older layout name the slices of one of its stacked modules. This module holds what they
share: `stack_numbered`, which gathers such numbered keys into stacked leaves, and `LayoutError`.
No I/O: callers read and write the trees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np


class LayoutError(ValueError):
  """A tree that cannot be put in the current layout (missing slices, ragged shapes)."""


class Slice(NamedTuple):
  """Where an older layout's key goes: slice `index` of the stacked subtree at `path`."""

  path: tuple[str, ...]  # relative to the mapping that held the key
  index: int


# Key of an older layout -> its Slice in the current layout, or None for a key to keep.
Locate = Callable[[str], "Slice | None"]


def stack_numbered(tree: Any, locate: Locate, axis: str) -> Any:
  """`tree` with every numbered key of an older layout gathered into stacked leaves.

  In every mapping, the keys that `locate` places (say `level0_step0`, `level0_step1`) are
  replaced by one subtree at their `Slice.path` (`level0_steps`) whose leaves are theirs
  stacked along a new leading axis, in index order; other keys are kept. Recurses through
  mappings, lists, tuples and named tuples, so it converts params, EMA params, optimizer moments
  and constants alike, or a whole raw-restored train state. Returns `tree` itself (the same
  object) where nothing needs converting. `axis` names the stacked axis in errors ("steps").
  Raises LayoutError where the slices are not 0..n-1 or differ in structure or shape.
  """
  if isinstance(tree, Mapping):
    slices: dict[tuple[str, ...], dict[int, Any]] = {}
    out, changed = {}, False
    for key, value in tree.items():
      where = locate(str(key))
      converted = stack_numbered(value, locate, axis)
      changed = changed or converted is not value
      if where is None:
        out[key] = converted
      else:
        slices.setdefault(where.path, {})[where.index] = converted
    if not slices:
      return out if changed else tree
    for path, by_index in slices.items():
      name = "/".join(path)
      if sorted(by_index) != list(range(len(by_index))):
        raise LayoutError(f"{name}: expected {axis} 0..{len(by_index) - 1}, got "
                          f"{sorted(by_index)}.")
      node = out
      for part in path[:-1]:
        node = node.setdefault(part, {})
      node[path[-1]] = _stack([by_index[k] for k in range(len(by_index))], name, axis)
    return out
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    items = [stack_numbered(item, locate, axis) for item in tree]
    return tree if all(a is b for a, b in zip(items, tree)) else type(tree)(*items)
  if isinstance(tree, (list, tuple)):
    items = [stack_numbered(item, locate, axis) for item in tree]
    return tree if all(a is b for a, b in zip(items, tree)) else type(tree)(items)
  return tree


def _stack(trees: list[Any], name: str, axis: str) -> Any:
  """Leaves of equal-structured nested mappings stacked along a new leading axis."""
  if isinstance(trees[0], Mapping):
    keys = set(trees[0])
    other = next((t for t in trees if not isinstance(t, Mapping) or set(t) != keys), None)
    if other is not None:
      got = sorted(other) if isinstance(other, Mapping) else type(other).__name__
      raise LayoutError(f"{name}: the {axis} hold different weights: {sorted(keys)} vs {got}.")
    return {k: _stack([t[k] for t in trees], f"{name}/{k}", axis) for k in trees[0]}
  if all(t is None for t in trees):
    return None
  if isinstance(trees[0], (list, tuple)) and all(
      type(t) is type(trees[0]) and len(t) == len(trees[0]) for t in trees):
    items = [_stack([t[i] for t in trees], f"{name}/{i}", axis) for i in range(len(trees[0]))]
    return type(trees[0])(*items) if hasattr(trees[0], "_fields") else type(trees[0])(items)
  shapes = {np.shape(t) for t in trees}
  if len(shapes) != 1:
    raise LayoutError(f"{name}: the {axis} have different shapes: {sorted(shapes)}.")
  return np.stack(trees)


def path_keys(path: Any) -> tuple[str, ...]:
  """The keys of a pytree path as strings: a `jax.tree_util` key path (DictKey, GetAttrKey,
  SequenceKey, ...), a "/"-separated string, or a sequence of keys."""
  if isinstance(path, str):
    return tuple(part for part in path.split("/") if part)
  keys = []
  for entry in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(entry, attribute):
        entry = getattr(entry, attribute)
        break
    keys.append(str(entry))
  return tuple(keys)
