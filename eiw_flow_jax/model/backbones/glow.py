"""The Glow backbone: a multi-scale flow of ActNorm -> 1x1 conv -> coupling steps with splits.

`MultiScaleFlow` (a linen module) maps centred data through L levels of
Squeeze -> K x [ActNorm -> 1x1 conv -> coupling] -> split (vanilla or EIW), with a learned top
prior at the last level. `eiw_flow_jax.model.flow.Flow` wraps it in pure functions through the
backbone interface (`eiw_flow_jax.model.backbones.base`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from eiw_flow_jax.model import memory, shapes
from eiw_flow_jax.model.backbones import layouts
from eiw_flow_jax.model.backbones.base import Backbone, ForwardPass, Level
from eiw_flow_jax.model.bijectors import CouplingNet, FlowStep, Shift, Squeeze, affine_couple
from eiw_flow_jax.model.splits import (
  EIWGlobalSplit,
  EIWPerExampleSplit,
  SplitOutput,
  TopPrior,
  VanillaSplit,
  gaussian_log_prob,
)

Array = jax.Array
# (level, the level's input after its squeeze) -> (output of its K steps, their log-det)
RunSteps = Callable[[int, Array], tuple[Array, Array]]


def steps_name(level: int) -> str:
  """The module (and variables) name of level `level`'s K stacked flow steps."""
  return f"level{level}_steps"


def step_name(level: int, k: int) -> str:
  """The name of step k of level `level` in op names (profiles) and diagnostics."""
  return f"level{level}_step{k}"


def split_name(level: int) -> str:
  """The module (and variables) name of level `level`'s split."""
  return f"level{level}_split"


# Step k of level l before the steps of a level were stacked (`level0_step3`): now slice k of
# `steps_name(l)`.
_UNROLLED_STEP = re.compile(r"^level(\d+)_step(\d+)$")


def unrolled_step(key: str) -> layouts.Slice | None:
  """Where a key of the unrolled layout (`step_name(l, k)`) goes in the stacked one."""
  match = _UNROLLED_STEP.match(key)
  return None if match is None else layouts.Slice((steps_name(int(match[1])),), int(match[2]))


def migrate_unrolled_steps(tree: Any) -> Any:
  """`tree` with the unrolled steps (`level{l}_step{k}`) stacked into `level{l}_steps`."""
  return layouts.stack_numbered(tree, unrolled_step, "steps")


class _FlowStepCell(FlowStep):
  """FlowStep as a scan body over the carry (h, log_det): what nn.scan stacks at init."""

  def __call__(self, carry: tuple[Array, Array], _: Any) -> tuple[tuple[Array, Array], None]:
    h, log_det = carry
    out, step_log_det = FlowStep.__call__(self, h)
    # The carry keeps its dtype (float32 data under jax_enable_x64 meets float64 parameters).
    return (out.astype(h.dtype), (log_det + step_log_det).astype(log_det.dtype)), None


def _per_position(values: Sequence[Array], log_density: Callable[..., Array]) -> Array:
  """A per-example sum over (H, W, C) taken per position instead: (B, H, W, ...) -> (B, H, W).

  Every position becomes an example of shape (1, 1, ...), so the per-example functions
  (gaussian_log_prob, the coupling's log-det) give the per-position terms.
  """
  b, h, w = values[0].shape[:3]
  flat = [v.reshape(b * h * w, 1, 1, v.shape[-1]) for v in values]
  return log_density(*flat).reshape(b, h, w)


class MultiScaleFlow(Backbone):
  """Glow-style multi-scale flow on centred inputs; all methods take/return batched arrays.

  The K flow steps of level l are one module, `steps_name(l)`, whose variables are those of K
  `FlowStep`s stacked along a leading axis (params["level0_steps"]["layers_0"]["bias"] has
  shape (K, C)). `model.scan_steps` chooses how they run: a `lax.scan` over the stack (True:
  the step is compiled once, so compile time does not grow with K) or a Python loop over its
  slices (False: K unrolled copies). Same parameters and checkpoints either way.

  Every map is built on two traversals: `_forward_pass` (centre, then per level squeeze, K
  steps, split; the top prior) with hooks for how the steps run and what to record at each
  split, and `_inverse_pass` (from the top latent down) with a hook giving each split's
  factored latent.
  """

  def setup(self) -> None:
    m = self.model
    h, w, _ = m.image_shape
    channels = shapes.level_channels(tuple(m.image_shape), m.num_levels)
    self.centre = Shift(-0.5)
    self.squeeze = Squeeze()
    dtype = shapes.compute_dtype(m)
    # Creates the stacked variables at init: nn.scan runs each step's data-dependent ActNorm
    # init on that step's own input, and splits the "params" rng so every step draws its own
    # 1x1-convolution permutation. After init the steps run through `_run_steps`.
    scanned = nn.scan(
        _FlowStepCell, variable_axes={"params": 0, "constants": 0},
        split_rngs={"params": True}, length=m.steps_per_level,
    )
    self.steps = [scanned(m.hidden_channels, m.coupling, dtype, m.kernels, name=steps_name(lv))
                  for lv in range(m.num_levels)]
    self.splits = [self._make_split(c, name=split_name(lv))
                   for lv, c in enumerate(channels[:-1])]
    top = (h >> m.num_levels, w >> m.num_levels, channels[-1])
    self.top_prior = TopPrior(top, name="top_prior")

  def _make_split(self, channels: int, name: str) -> nn.Module:
    m = self.model
    if m.split == "vanilla":
      return VanillaSplit(channels, name=name)
    if m.eiw.mode == "global":
      return EIWGlobalSplit(
          channels, m.eiw.reduction, m.eiw.regularizer,
          freeze_permutation=m.eiw.freeze_permutation, name=name,
      )
    return EIWPerExampleSplit(
        channels,
        anchor_width=shapes.resolve_anchor_width(m.eiw.anchor_width, channels),
        beta=m.eiw.beta,
        volume_preserving=m.eiw.volume_preserving,
        solver_width=m.eiw.solver_hidden,
        use_weights=m.eiw.use_weights,
        use_permutation=m.eiw.use_permutation,
        name=name,
    )

  # ---- facts of the architecture --------------------------------------------------------------
  @nn.nowrap
  def levels(self) -> tuple[Level, ...]:
    m = self.model
    h, w, _ = m.image_shape
    channels = shapes.level_channels(tuple(m.image_shape), m.num_levels)
    split = "vanilla" if m.split == "vanilla" else m.eiw.mode
    out = []
    for level, c in enumerate(channels):
      size = (h >> (level + 1), w >> (level + 1))
      if level == len(channels) - 1:
        out.append(Level((*size, c), None, None))
      else:
        out.append(Level((*size, c - c // 2), c, split))
    return tuple(out)

  @nn.nowrap
  def migrate_layout(self, tree: Any) -> Any:
    return migrate_unrolled_steps(tree)

  @nn.nowrap
  def stacked_axis(self, path: Any) -> str | None:
    stacked = {steps_name(level) for level in range(self.model.num_levels)}
    return "steps" if stacked & set(layouts.path_keys(path)) else None

  # ---- the level's K steps ------------------------------------------------------------------
  def _twin(self) -> FlowStep:
    """A parentless FlowStep, applied to one step's slice of the stacked variables: the scans
    and the custom VJPs of eiw_flow_jax.model.memory need pure functions."""
    m = self.model
    return FlowStep(m.hidden_channels, m.coupling, shapes.compute_dtype(m), m.kernels,
                    parent=None)

  def _stacked_variables(self, level: int) -> dict[str, Any]:
    name = steps_name(level)
    return {"params": self.variables["params"][name],
            "constants": self.variables["constants"][name]}

  def _level_steps(self, level: int, h: Array) -> tuple[Array, Array]:
    """The level's K steps under `model.memory` (at init: the scanned modules themselves,
    which create the variables with data-dependent ActNorm initialisation)."""
    if self.is_initializing():
      zeros = jnp.zeros((h.shape[0],), h.dtype)
      (h, log_det), _ = self.steps[level]((h, zeros), None)
      return h, log_det
    return self._run_steps(level, h, self.model.memory)

  def _run_steps(self, level: int, h: Array, mode: str) -> tuple[Array, Array]:
    """The level's K steps as pure functions of their stacked variables, under memory `mode`."""
    m = self.model
    twin = self._twin()
    # Op names (profiles) carry `level{l}_steps` (scanned) or `level{l}_step{k}` (unrolled).
    with jax.named_scope(steps_name(level)):
      return memory.run_stacked_chain(
        mode,
        lambda v, x: twin.apply(v, x),
        lambda v, y: twin.apply(v, y, reverse=True)[0],
        self._stacked_variables(level),
        h,
        scan=m.scan_steps,
        name=f"level {level}",
        step_names=lambda k: step_name(level, k),
        tolerance=m.invert_tolerance,
        inverse_vjp=twin.inverse_vjp,
      )

  def _invert_steps(self, level: int, h: Array) -> Array:
    """The inverse of the level's K steps (last step first)."""
    twin = self._twin()
    return memory.invert_stacked_chain(
        lambda v, y: twin.apply(v, y, reverse=True)[0], self._stacked_variables(level), h,
        scan=self.model.scan_steps)

  # ---- the two traversals -------------------------------------------------------------------
  def _forward_pass(
      self,
      y: Array,
      run_steps: RunSteps | None = None,
      at_split: Callable[[int, Array, SplitOutput], Any] | None = None,
  ) -> ForwardPass:
    """y -> latents, level by level: centre, then per level squeeze, K steps, split.

    `run_steps` runs a level's K steps (default `_level_steps`); `at_split(level, h, out)` is
    called with each split's input h and output, and its values are returned in order.
    """
    run_steps = run_steps or self._level_steps
    h, log_det = self.centre(y)
    log_prior = jnp.zeros_like(log_det)
    latents: list[Array] = []
    aux: dict[str, list[Array]] = {}
    visited = []
    for level in range(self.model.num_levels):
      h, squeeze_log_det = self.squeeze(h)
      h, steps_log_det = run_steps(level, h)
      log_det = log_det + (squeeze_log_det + steps_log_det)
      if level < len(self.splits):
        out = self.splits[level].split(h)
        if at_split is not None:
          visited.append(at_split(level, h, out))
        latents.append(out.factored)
        log_det, log_prior = log_det + out.log_det, log_prior + out.log_prior
        for key, value in out.aux.items():
          aux.setdefault(key, []).append(value)
        h = out.kept
    latents.append(h)
    return ForwardPass(latents, log_det, log_prior + self.top_prior.log_prob(h), aux, visited)

  def _inverse_pass(self, top: Array, factored: Callable[[int, Array], Array]) -> Array:
    """The top latent -> y, level by level from the top: each split merges the kept channels
    h with `factored(level, h)`, then the level's K steps and its squeeze are inverted."""
    h = top
    for level in reversed(range(self.model.num_levels)):
      if level < len(self.splits):
        h, _ = self.splits[level].merge(h, factored(level, h))
      h = self.squeeze(self._invert_steps(level, h), reverse=True)[0]
    return self.centre(h, reverse=True)[0]

  # ---- the maps -----------------------------------------------------------------------------
  def forward(self, y: Array) -> tuple[list[Array], Array, Array, dict[str, list[Array]]]:
    """y in [0,1]^D -> (latents per level, log|det J|, log prior of latents, aux per split)."""
    latents, log_det, log_prior, aux, _ = self._forward_pass(y)
    return latents, log_det, log_prior, aux

  def inverse(self, latents: Sequence[Array]) -> Array:
    """Exact inverse of `forward`'s map: latents per level -> y."""
    return self._inverse_pass(latents[-1], lambda level, _: latents[level])

  def generate(self, rng: Array, num: int, temperature: float) -> tuple[Array, list[Array]]:
    """Samples latents from the priors (std scaled by `temperature`) and decodes them."""
    rngs = jax.random.split(rng, self.model.num_levels)
    mean, log_std = self.top_prior.params_for(num)
    top = mean + temperature * jnp.exp(log_std) * jax.random.normal(rngs[-1], mean.shape)
    drawn: dict[int, Array] = {}

    def draw(level: int, kept: Array) -> Array:
      mean, log_std = self.splits[level].prior(kept)
      noise = jax.random.normal(rngs[level], mean.shape)
      drawn[level] = mean + temperature * jnp.exp(log_std) * noise
      return drawn[level]

    y = self._inverse_pass(top, draw)
    return y, [drawn[level] for level in range(len(self.splits))] + [top]

  def prior_means(self, latents: Sequence[Array]) -> list[Array]:
    """Means of each latent's prior given the kept channels (the mode at temperature 0)."""
    means: dict[int, Array] = {}

    def mean_then_latent(level: int, kept: Array) -> Array:
      means[level] = self.splits[level].prior(kept)[0]
      return latents[level]

    self._inverse_pass(latents[-1], mean_then_latent)
    top = self.top_prior.params_for(latents[-1].shape[0])[0]
    return [means[level] for level in range(len(self.splits))] + [top]

  def inverse_drift(self, y: Array) -> list[Array]:
    """Per level: relative drift of the level's input rebuilt through its K steps' inverses.

    max|x_rebuilt - x| / max(1, max|x|) after the level's K steps forward and K inverses, the
    quantity memory="invert" checks against model.invert_tolerance (see
    eiw_flow_jax.model.memory).
    """
    drifts = []

    def run_steps(level: int, x: Array) -> tuple[Array, Array]:
      out, log_det = self._run_steps(level, x, "store")
      drifts.append(memory.relative_drift(self._invert_steps(level, out), x))
      return out, log_det

    self._forward_pass(y, run_steps=run_steps)
    return drifts

  def diagnostics(self, y: Array) -> list[dict[str, Array]]:
    """Per split level: the Shuffle diagnostics listed in docs/formulation.md."""
    return self._forward_pass(
        y, at_split=lambda level, h, _: self.splits[level].diagnostics(h)).at_splits

  def split_permutations(self) -> dict[int, Array]:
    orders = {level: split.shared_permutation() for level, split in enumerate(self.splits)}
    return {level: order for level, order in orders.items() if order is not None}

  def shuffle_assignment(self, y: Array) -> list[dict[str, Array]]:
    return self._forward_pass(
        y, at_split=lambda level, h, _: self.splits[level].assignment(h)).at_splits

  def split_inputs(self, y: Array) -> list[Array]:
    return self._forward_pass(y, at_split=lambda level, h, _: h).at_splits

  def position_log_likelihoods(self, y: Array) -> tuple[list[Array], Array]:
    """Per-position terms of log p(y): each split's factored latent and the top latent under
    their priors, and (affine couplings) the log-scales at each position; the rest (ActNorm,
    1x1 convolutions, the per_example weights) is the same at every position of a level.

    The level's steps are applied one at a time so that their coupling networks' outputs can
    be captured.
    """
    twin = self._twin()
    net_outs: list[Array] = []

    def is_coupling_net(module: Any, method: str) -> bool:
      return isinstance(module, CouplingNet) and method == "__call__"

    def run_steps(level: int, h: Array) -> tuple[Array, Array]:
      log_det = jnp.zeros((h.shape[0],), h.dtype)
      stacked = self._stacked_variables(level)
      for step_variables in memory.unstack(stacked, memory.stack_count(stacked)):
        (h, step_log_det), state = twin.apply(
            step_variables, h, capture_intermediates=is_coupling_net, mutable=["intermediates"])
        log_det = log_det + step_log_det
        net_outs.extend(jax.tree.leaves(state["intermediates"]))
      return h, log_det

    def prior_map(level: int, _: Array, out: SplitOutput) -> Array:
      mean, log_std = self.splits[level].prior(out.kept)
      return _per_position([out.factored, mean, log_std], gaussian_log_prob)

    latents, log_det, _, _, maps = self._forward_pass(y, run_steps, prior_map)
    top = latents[-1]
    maps.append(_per_position([top, *self.top_prior.params_for(top.shape[0])],
                              gaussian_log_prob))
    if self.model.coupling == "affine":
      for net_out in net_outs:
        net_out = net_out.astype(jnp.float32)
        half = jnp.zeros((*net_out.shape[:-1], net_out.shape[-1] // 2), jnp.float32)
        coupling = _per_position(
            [net_out, half], lambda n, x_b: affine_couple(n, x_b, False)[1])
        maps.append(coupling)
        log_det = log_det - coupling.sum(axis=(1, 2))  # attributed per position instead
    return maps, log_det

