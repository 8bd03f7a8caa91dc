"""The interface between a backbone and everything else.

A backbone is a linen module built from the validated `config.model`. `Flow`
(`eiw_flow_jax.model.flow`) and through it the rest of the package reach it only through the
methods below, never through its parameter names or private members, so a renamed layer or a
new split breaks nothing outside its backbone.

Facts of the architecture (no variables: plain methods of the unbound module, `nn.nowrap`):
  `levels()`, `migrate_layout(tree)`, `stacked_axis(path)`.
Maps (run with `module.apply(variables, ..., method=name)`; `y` is dequantized data in
[0, 1]^D; DenseFlow's data-side methods also take its augmentation noise after `y`):
  `forward`, `inverse`, `generate`, `prior_means`, `diagnostics`, `split_permutations`,
  `shuffle_assignment`, `split_inputs`, `position_log_likelihoods`.
Each backbone writes its level traversal once per direction (its `_forward_pass` and
`_inverse_pass`) and builds every map on those two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Level:
  """One scale of a multi-scale flow, in `encode`'s order.

  `split` is how the level's output is split: "vanilla" (the first half stays), "global" (one
  learned channel order for all examples, then the split), "per_example" (an order per
  example), or None at the last level, whose whole output is the top latent.
  """

  latent_shape: tuple[int, int, int]  # per example, of the latent that leaves here
  split_channels: int | None  # channels entering the split (None at the last level)
  split: str | None


class ForwardPass(NamedTuple):
  """What a backbone's forward traversal returns: `forward`'s four results plus the value its
  `at_split` hook returned at each split, in order."""

  latents: list[Array]
  log_det: Array  # (B,)
  log_prior: Array  # (B,)
  aux: dict[str, Any]
  at_splits: list[Any]


class Backbone(nn.Module):
  """Base of the backbones: the interface every backbone implements (see the module doc)."""

  model: ml_collections.FrozenConfigDict  # the validated `config.model`

  # ---- facts of the architecture ----------------------------------------------------------
  @nn.nowrap
  def levels(self) -> tuple[Level, ...]:
    """The levels, in `encode`'s order (the last holds the top latent)."""
    raise NotImplementedError

  @nn.nowrap
  def migrate_layout(self, tree: Any) -> Any:
    """`tree` (params, a train state, any pytree holding params-like mappings) in the current
    parameter layout; `tree` itself if it already is. Raises layouts.LayoutError if it cannot."""
    raise NotImplementedError

  @nn.nowrap
  def stacked_axis(self, path: Any) -> str | None:
    """What the leading axis of the leaf at `path` stacks ("steps", "layers"), or None where
    the leaf is not part of a stacked module. `path`: a jax key path or keys (see
    `layouts.path_keys`), from any root (params, a train state)."""
    raise NotImplementedError

  # ---- the maps -----------------------------------------------------------------------------
  def forward(self, y: Array, *noise: Any) -> tuple[list[Array], Array, Array, dict[str, Any]]:
    """y -> (latents per level, log|det J| per example, log prior of the latents, aux)."""
    raise NotImplementedError

  def inverse(self, latents: Sequence[Array]) -> Array:
    """The exact inverse of `forward`'s map: latents -> y."""
    raise NotImplementedError

  def generate(self, rng: Array, num: int, temperature: float) -> tuple[Array, list[Array]]:
    """(y, latents): latents drawn from the priors with std scaled by `temperature`, decoded."""
    raise NotImplementedError

  def prior_means(self, latents: Sequence[Array]) -> list[Array]:
    """Per latent, its prior's mean given the levels above (what temperature 0 draws)."""
    raise NotImplementedError

  def diagnostics(self, y: Array, *noise: Any) -> list[dict[str, Array]]:
    """Per split, the Shuffle's diagnostics (the keys depend on the split variant)."""
    raise NotImplementedError

  def split_permutations(self) -> dict[int, Array]:
    """Split index -> the channel order of each split whose order is the same for every
    example (a function of the parameters alone); splits without one are absent."""
    raise NotImplementedError

  def shuffle_assignment(self, y: Array, *noise: Any) -> list[dict[str, Array]]:
    """Per split: "kept" (B, C) bool, "order" (B, C) int, "log_weights" (B, C) float32; see
    `eiw_flow_jax.model.explore.shuffle_assignment`."""
    raise NotImplementedError

  def split_inputs(self, y: Array, *noise: Any) -> list[Array]:
    """Per split, its input: the level's output that the split divides."""
    raise NotImplementedError

  def position_log_likelihoods(self, y: Array) -> tuple[list[Array], Array]:
    """(maps, log_det): the log-likelihood of y as per-position terms, each map (B, h, w) at
    its level's resolution, plus the log-det terms that are the same at every position (B,);
    the maps' sums plus log_det give log p(y). See `explore.bits_per_dim_map`."""
    raise NotImplementedError
