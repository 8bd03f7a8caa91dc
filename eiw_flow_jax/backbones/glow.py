"""The Glow backbone: a multi-scale flow of ActNorm -> 1x1 conv -> coupling steps with splits.

`MultiScaleFlow` (a linen module) maps centred data through L levels of
Squeeze -> K x [ActNorm -> 1x1 conv -> coupling] -> split (vanilla or EIW), with a learned top
prior at the last level. `eiw_flow_jax.model.Flow` wraps it (or any sibling backbone with the
same methods: forward, inverse, generate, prior_means, diagnostics) in pure functions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from eiw_flow_jax import config_lib, memory
from eiw_flow_jax.bijectors import FlowStep, Shift, Squeeze
from eiw_flow_jax.splits import (
  EIWGlobalSplit,
  EIWPerExampleSplit,
  TopPrior,
  VanillaSplit,
)

Array = jax.Array


class MultiScaleFlow(nn.Module):
  """Glow-style multi-scale flow on centred inputs; all methods take/return batched arrays."""

  model: ml_collections.FrozenConfigDict  # the validated `config.model`

  def setup(self) -> None:
    m = self.model
    h, w, _ = m.image_shape
    channels = config_lib.level_channels(tuple(m.image_shape), m.num_levels)
    self.centre = Shift(-0.5)
    self.squeeze = Squeeze()
    dtype = config_lib.compute_dtype(m)
    self.steps = [
        [FlowStep(m.hidden_channels, m.coupling, dtype, m.get("kernels", "auto"),
                  name=f"level{lv}_step{k}")
         for k in range(m.steps_per_level)]
        for lv in range(m.num_levels)
    ]
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
        anchor_width=config_lib.resolve_anchor_width(m.eiw.anchor_width, channels),
        beta=m.eiw.beta,
        volume_preserving=m.eiw.volume_preserving,
        solver_width=m.eiw.solver_hidden,
        use_weights=m.eiw.use_weights,
        use_permutation=m.eiw.use_permutation,
        name=name,
    )

  def _level_forward(self, level: int, h: Array) -> tuple[Array, Array]:
    h, log_det = self.squeeze(h)
    mode = self.model.get("memory", "store")
    if mode == "store" or self.is_initializing():
      # Initialisation (data-dependent ActNorm) always runs the modules themselves.
      for step in self.steps[level]:
        h, step_log_det = step(h)
        log_det = log_det + step_log_det
      return h, log_det
    h, steps_log_det = self._run_steps(level, h, mode)
    return h, log_det + steps_log_det

  def _run_steps(self, level: int, h: Array, mode: str) -> tuple[Array, Array]:
    """The level's K steps as pure functions of their variables, under memory `mode`."""
    m = self.model
    # A parentless twin of every step: applied to each step's variables explicitly, so that
    # the custom VJPs of memory.run_chain ("remat", "invert") see pure functions.
    twin = FlowStep(m.hidden_channels, m.coupling, config_lib.compute_dtype(m),
                    m.get("kernels", "auto"), parent=None)
    names = [f"level{level}_step{k}" for k in range(m.steps_per_level)]
    step_variables = [
        {"params": self.variables["params"][n], "constants": self.variables["constants"][n]}
        for n in names
    ]
    return memory.run_chain(
        mode,
        lambda v, x: twin.apply(v, x),
        lambda v, y: twin.apply(v, y, reverse=True)[0],
        step_variables,
        h,
        name=f"level {level}",
        tolerance=m.get("invert_tolerance", 1e-3),
        inverse_vjp=functools.partial(memory.flow_step_inverse_vjp, twin),
    )

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
    for step in reversed(self.steps[level]):
      h, _ = step(h, reverse=True)
    return self.squeeze(h, reverse=True)[0]

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
    quantity memory="invert" checks against model.invert_tolerance (see eiw_flow_jax.memory).
    """
    h, _ = self.centre(y)
    drifts = []
    for level in range(self.model.num_levels):
      x, _ = self.squeeze(h)
      out = x
      for step in self.steps[level]:
        out, _ = step(out)
      rebuilt = out
      for step in reversed(self.steps[level]):
        rebuilt, _ = step(rebuilt, reverse=True)
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
