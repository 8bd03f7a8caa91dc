"""The Glow backbone: a multi-scale flow of ActNorm -> 1x1 conv -> coupling steps with splits.

`MultiScaleFlow` (a linen module) maps centred data through L levels of
Squeeze -> K x [ActNorm -> 1x1 conv -> coupling] -> split (vanilla or EIW), with a learned top
prior at the last level. `eiw_flow_jax.model.flow.Flow` wraps it (or any sibling backbone with the
same methods: forward, inverse, generate, prior_means, diagnostics) in pure functions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from eiw_flow_jax.model import memory, shapes
from eiw_flow_jax.model.bijectors import FlowStep, Shift, Squeeze
from eiw_flow_jax.model.splits import EIWGlobalSplit, EIWPerExampleSplit, TopPrior, VanillaSplit

Array = jax.Array


def steps_name(level: int) -> str:
  """The module (and variables) name of level `level`'s K stacked flow steps."""
  return f"level{level}_steps"


def step_name(level: int, k: int) -> str:
  """The name of step k of level `level` in op names (profiles) and diagnostics."""
  return f"level{level}_step{k}"


class _FlowStepCell(FlowStep):
  """FlowStep as a scan body over the carry (h, log_det): what nn.scan stacks at init."""

  def __call__(self, carry: tuple[Array, Array], _: Any) -> tuple[tuple[Array, Array], None]:
    h, log_det = carry
    out, step_log_det = FlowStep.__call__(self, h)
    # The carry keeps its dtype (float32 data under jax_enable_x64 meets float64 parameters).
    return (out.astype(h.dtype), (log_det + step_log_det).astype(log_det.dtype)), None


class MultiScaleFlow(nn.Module):
  """Glow-style multi-scale flow on centred inputs; all methods take/return batched arrays.

  The K flow steps of level l are one module, `level{l}_steps`, whose variables are those of K
  `FlowStep`s stacked along a leading axis (params["level0_steps"]["layers_0"]["bias"] has
  shape (K, C)). `model.scan_steps` chooses how they run: a `lax.scan` over the stack (True:
  the step is compiled once, so compile time does not grow with K) or a Python loop over its
  slices (False: K unrolled copies). Same parameters and checkpoints either way.
  """

  model: ml_collections.FrozenConfigDict  # the validated `config.model`

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
    self.steps = [scanned(m.hidden_channels, m.coupling, dtype, m.get("kernels", "auto"),
                          name=steps_name(lv))
                  for lv in range(m.num_levels)]
    self.splits = [self._make_split(c, name=f"level{lv}_split")
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

  def _level_forward(self, level: int, h: Array) -> tuple[Array, Array]:
    h, log_det = self.squeeze(h)
    if self.is_initializing():
      # Initialisation (data-dependent ActNorm) runs the scanned modules themselves.
      (h, steps_log_det), _ = self.steps[level]((h, jnp.zeros_like(log_det)), None)
    else:
      h, steps_log_det = self._run_steps(level, h, self.model.get("memory", "store"))
    return h, log_det + steps_log_det

  def _twin(self) -> FlowStep:
    """A parentless FlowStep, applied to one step's slice of the stacked variables: the scans
    and the custom VJPs of eiw_flow_jax.model.memory need pure functions."""
    m = self.model
    return FlowStep(m.hidden_channels, m.coupling, shapes.compute_dtype(m),
                    m.get("kernels", "auto"), parent=None)

  def _stacked_variables(self, level: int) -> dict[str, Any]:
    name = steps_name(level)
    return {"params": self.variables["params"][name],
            "constants": self.variables["constants"][name]}

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
        scan=m.get("scan_steps", True),
        name=f"level {level}",
        step_names=lambda k: step_name(level, k),
        tolerance=m.get("invert_tolerance", 1e-3),
        inverse_vjp=functools.partial(memory.flow_step_inverse_vjp, twin),
      )

  def _invert_steps(self, level: int, h: Array) -> Array:
    """The inverse of the level's K steps (last step first)."""
    twin = self._twin()
    return memory.invert_stacked_chain(
        lambda v, y: twin.apply(v, y, reverse=True)[0], self._stacked_variables(level), h,
        scan=self.model.get("scan_steps", True))

  def forward(self, y: Array) -> tuple[list[Array], Array, Array, dict[str, list[Array]]]:
    """y in [0,1]^D -> (latents per level, log|det J|, log prior of latents, aux per split)."""
    h, log_det = self.centre(y)
    log_prior = jnp.zeros_like(log_det)
    latents: list[Array] = []
    aux: dict[str, list[Array]] = {}
    for level in range(self.model.num_levels):
      h, level_log_det = self._level_forward(level, h)
      log_det = log_det + level_log_det
      if level < len(self.splits):
        out = self.splits[level].split(h)
        latents.append(out.factored)
        log_det, log_prior = log_det + out.log_det, log_prior + out.log_prior
        for key, value in out.aux.items():
          aux.setdefault(key, []).append(value)
        h = out.kept
    latents.append(h)
    return latents, log_det, log_prior + self.top_prior.log_prob(h), aux

  def _level_inverse(self, level: int, h: Array) -> Array:
    return self.squeeze(self._invert_steps(level, h), reverse=True)[0]

  def inverse(self, latents: Sequence[Array]) -> Array:
    """Exact inverse of `forward`'s map: latents per level -> y."""
    h = latents[-1]
    for level in reversed(range(self.model.num_levels)):
      if level < len(self.splits):
        h, _ = self.splits[level].merge(h, latents[level])
      h = self._level_inverse(level, h)
    return self.centre(h, reverse=True)[0]

  def generate(self, rng: Array, num: int, temperature: float) -> tuple[Array, list[Array]]:
    """Samples latents from the priors (std scaled by `temperature`) and decodes them."""
    rngs = jax.random.split(rng, self.model.num_levels)
    mean, log_std = self.top_prior.params_for(num)
    h = mean + temperature * jnp.exp(log_std) * jax.random.normal(rngs[-1], mean.shape)
    latents = [h]
    for level in reversed(range(self.model.num_levels)):
      if level < len(self.splits):
        mean, log_std = self.splits[level].prior(h)
        noise = jax.random.normal(rngs[level], mean.shape)
        factored = mean + temperature * jnp.exp(log_std) * noise
        latents.insert(0, factored)
        h, _ = self.splits[level].merge(h, factored)
      h = self._level_inverse(level, h)
    return self.centre(h, reverse=True)[0], latents

  def prior_means(self, latents: Sequence[Array]) -> list[Array]:
    """Means of each latent's prior given the kept channels (the mode at temperature 0)."""
    h, _ = self.centre(self.inverse(latents))
    means = []
    for level in range(len(self.splits)):
      h, _ = self._level_forward(level, h)
      h = self.splits[level].split(h).kept
      means.append(self.splits[level].prior(h)[0])
    return means + [self.top_prior.params_for(h.shape[0])[0]]

  def inverse_drift(self, y: Array) -> list[Array]:
    """Per level: relative drift of the level's input rebuilt through its K steps' inverses.

    max|x_rebuilt - x| / max(1, max|x|) after the level's K steps forward and K inverses, the
    quantity memory="invert" checks against model.invert_tolerance (see eiw_flow_jax.model.memory).
    """
    h, _ = self.centre(y)
    drifts = []
    for level in range(self.model.num_levels):
      x, _ = self.squeeze(h)
      out, _ = self._run_steps(level, x, "store")
      rebuilt = self._invert_steps(level, out)
      drifts.append(memory.relative_drift(rebuilt, x))
      h = self.splits[level].split(out).kept if level < len(self.splits) else out
    return drifts

  def diagnostics(self, y: Array) -> list[dict[str, Array]]:
    """Per split level: the Shuffle diagnostics listed in the design note."""
    h, _ = self.centre(y)
    stats = []
    for level in range(len(self.splits)):
      h, _ = self._level_forward(level, h)
      stats.append(self.splits[level].diagnostics(h))
      h = self.splits[level].split(h).kept
    return stats
