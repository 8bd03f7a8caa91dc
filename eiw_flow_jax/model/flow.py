"""The functional API over a backbone: `Flow` and `build_flow`.

The backbones (`eiw_flow_jax.model.backbones`: Glow's `MultiScaleFlow`, ...) are linen modules
with one interface (`eiw_flow_jax.model.backbones.base.Backbone`). `Flow` wraps one in pure
functions of a variables pytree, checking inputs at the edge, and is how the rest of the
package reaches the backbone: its levels, split permutations, parameter layout and migrations
included. `build_flow(config)` builds it from a validated ConfigDict.

The variables pytree returned by `Flow.init` has two collections: "params" (trained) and
"constants" (the 1x1 convolutions' fixed permutations and signs; never trained).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from eiw_flow_jax.model import explore
from eiw_flow_jax.model import kernels as model_kernels
from eiw_flow_jax.model import validation as model_validation
from eiw_flow_jax.model.backbones.base import Backbone, Level
from eiw_flow_jax.model.backbones.denseflow import DenseFlowBackbone, denseflow_shapes
from eiw_flow_jax.model.backbones.glow import MultiScaleFlow
from eiw_flow_jax.model.bijectors import UniformDequantize

Array = jax.Array
Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Flow:
  """Pure-function API over a variables pytree; see the README for a tour.

  Every method is a pure function of its arguments and can be wrapped in `jax.jit`.
  """

  model_config: ml_collections.ConfigDict
  module: Backbone  # MultiScaleFlow (glow) or DenseFlowBackbone (denseflow)

  # Configs are mutable, so identity hashing keeps `jax.jit(flow.loss)` valid.
  __hash__ = object.__hash__
  __eq__ = object.__eq__

  @property
  def backbone(self) -> str:
    return self.model_config.backbone

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.model_config.image_shape)

  @property
  def num_dims(self) -> int:
    return math.prod(self.image_shape)

  @property
  def n_bits(self) -> int:
    return self.model_config.n_bits

  @property
  def levels(self) -> tuple[Level, ...]:
    """The backbone's levels in `encode`'s order: per level the latent's per-example shape, the
    channels entering its split and the split's kind ("vanilla", "global", "per_example"; None
    at the last level)."""
    return self.module.levels()

  @property
  def latent_shapes(self) -> list[tuple[int, int, int]]:
    """Per-example shape of each level's latent, in `encode`'s order."""
    return [level.latent_shape for level in self.levels]

  def for_platform(self, platform: str) -> Flow:
    """This flow for programs lowered for `platform` alone (a mesh's
    `devices.flat[0].platform`): the same parameters and functions, with `model.kernels`'s
    "auto" resolved to that platform's forms (`eiw_flow_jax.model.kernels.resolve`), so that
    tracing stages out one form instead of both. The flow itself where nothing changes."""
    kernels = model_kernels.resolve(self.model_config.kernels, platform)
    if kernels == self.model_config.kernels:
      return self
    model = self.model_config.as_configdict()
    model.kernels = kernels
    model = ml_collections.FrozenConfigDict(model)
    return dataclasses.replace(self, model_config=model, module=self.module.clone(model=model))

  # ---- the parameter layout ------------------------------------------------------------------
  def migrate_layout(self, tree: Any) -> Any:
    """`tree` in the current parameter layout: any pytree holding params-like mappings (the
    params, or a raw-restored train state {params, ema_params, opt_state, constants, ...}) of
    an older layout of this backbone is converted (e.g. Glow's unrolled `level{l}_step{k}` into
    the stacked `level{l}_steps`); a tree already current comes back as the same object.
    Raises `eiw_flow_jax.model.backbones.layouts.LayoutError` where it cannot convert."""
    return self.module.migrate_layout(tree)

  def stacked_axis(self, path: Any) -> str | None:
    """What the leading axis of the leaf at `path` stacks ("steps" of a Glow level, "layers"
    of a DenseFlow unit), or None where the leaf is not part of a stacked module. `path`: a
    jax key path (`jax.tree_util.tree_flatten_with_path`) or a sequence of keys, from any root
    holding params-like mappings."""
    return self.module.stacked_axis(path)

  def backbone_inputs(self, y: Array, rng: Array | None = None,
                      noise: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """What the backbone's data-side maps take after the variables: (y,) (`rng` and `noise`
    unused by Glow)."""
    return (y,)

  # ---- input checks ---------------------------------------------------------------------
  COLLECTIONS = ("params", "constants")  # what `init` returns and every method needs

  def check_variables(self, variables: Variables) -> None:
    """`variables` must hold the collections `init` returned (Flax would otherwise fail deep
    inside the model with ScopeCollectionNotFound)."""
    if not isinstance(variables, Mapping):
      raise TypeError(
          f"variables: expected a dict with the collections {list(self.COLLECTIONS)} (as "
          f"Flow.init returns it), got {type(variables).__name__}."
      )
    missing = [name for name in self.COLLECTIONS if name not in variables]
    if missing:
      raise ValueError(
          f"variables: expected the collections {list(self.COLLECTIONS)} (as Flow.init returns "
          f"them); missing {', '.join(repr(m) for m in missing)} (got {sorted(variables)})."
      )

  @staticmethod
  def _check_array(x: Any, name: str, what: str) -> None:
    if not (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "ndim")):
      raise TypeError(
          f"{name}: expected an array (jax.Array or numpy.ndarray) {what}, got "
          f"{type(x).__name__}; convert it first (e.g. jnp.asarray).")

  def _check_images(self, x: Array, name: str) -> None:
    self._check_array(
        x, name, f"of shape (B, {', '.join(map(str, self.image_shape))})")
    if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
      raise ValueError(
          f"{name}: expected shape (B, {', '.join(map(str, self.image_shape))}) (NHWC), "
          f"got {tuple(x.shape)}."
      )
    if x.shape[0] == 0:
      raise ValueError(f"{name}: expected a batch of at least one image, got shape "
                       f"{tuple(x.shape)} (B=0).")

  def check_uint8(self, x: Array) -> None:
    self._check_images(x, "uint8 images")
    if x.dtype != jnp.uint8:
      raise ValueError(f"uint8 images: expected dtype uint8, got {x.dtype}.")
    if isinstance(x, jax.core.Tracer):
      return
    largest = int(np.max(np.asarray(x), initial=0))
    if largest >= 2**self.n_bits:
      raise ValueError(
          f"uint8 images: expected values < 2**n_bits = {2**self.n_bits}, got max {largest}."
      )

  def check_continuous(self, y: Array) -> None:
    self._check_images(y, "dequantized images")
    if not jnp.issubdtype(y.dtype, jnp.floating):
      raise ValueError(f"dequantized images: expected a float dtype, got {y.dtype}.")
    if not isinstance(y, jax.core.Tracer) and not bool(np.all(np.isfinite(np.asarray(y)))):
      raise ValueError("dequantized images: input contains NaN or infinite values.")

  def check_unit_cube(self, y: Array) -> None:
    """The density lives on [0, 1]^D: outside it, log_prob would be a meaningless number.

    Only `log_prob` (and what uses it) checks this; `encode`/`forward` accept any finite y, so
    samples of an untrained flow, which may leave [0, 1], still round-trip.
    """
    self.check_continuous(y)
    if isinstance(y, jax.core.Tracer):
      return
    values = np.asarray(y)
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
      raise ValueError(
          f"dequantized images: expected values in [0, 1] (y = (x + u) / 2**n_bits, see "
          f"`dequantize`), got min {low:.4g} and max {high:.4g}."
      )

  @staticmethod
  def check_temperature(temperature: float | Array) -> None:
    if isinstance(temperature, jax.core.Tracer):
      return
    value = np.asarray(temperature)
    if value.shape != () or not np.isfinite(value) or value < 0:
      raise ValueError(
          f"temperature: expected a finite number >= 0 (0 draws the mode), got {temperature!r}."
      )

  def check_latents(self, latents: Sequence[Array]) -> None:
    expected = self.latent_shapes
    if not isinstance(latents, (list, tuple)):
      raise TypeError(
          f"latents: expected a list of {len(expected)} per-level arrays (as `encode` returns "
          f"them), got {type(latents).__name__}.")
    for level, z in enumerate(latents):
      self._check_array(z, f"latents[{level}]", "of shape (B, h, w, c)")
    got = [tuple(z.shape[1:]) for z in latents]
    if len(latents) != len(expected) or got != expected:
      raise ValueError(f"latents: expected per-example shapes {expected}, got {got}.")
    for level, z in enumerate(latents):
      if not jnp.issubdtype(z.dtype, jnp.floating):
        raise ValueError(f"latents[{level}]: expected a float dtype, got {z.dtype}.")
      if not isinstance(z, jax.core.Tracer) and not bool(np.all(np.isfinite(np.asarray(z)))):
        raise ValueError(f"latents[{level}]: contains NaN or infinite values.")

  # ---- the API --------------------------------------------------------------------------
  def dequantize(self, x: Array, rng: Array, variables: Variables | None = None) -> Array:
    """uint8 images -> y = (x + u) / 2^n_bits, u ~ U[0,1) (`variables` unused by Glow)."""
    self.check_uint8(x)
    return UniformDequantize(self.n_bits).dequantize(x, rng)

  def init(self, rng: Array, x: Array) -> Variables:
    """Variables with data-dependent ActNorm initialisation on the uint8 batch `x`."""
    self.check_uint8(x)
    return jax.jit(self._init)(rng, x)

  def _init(self, rng: Array, x: Array) -> Variables:
    noise_rng, params_rng = jax.random.split(rng)
    y = self.dequantize(x, noise_rng)
    # One compiled graph: op by op, every distinct op shape would be compiled separately
    # (docs/performance.md).
    return self.module.init({"params": params_rng}, y, method="forward")


  def forward(self, variables: Variables, y: Array):
    """(latents, log_det, log_prior, aux) of dequantized y in [0,1]; see `Backbone.forward`."""
    self.check_variables(variables)
    self.check_continuous(y)
    return self.module.apply(variables, *self.backbone_inputs(y), method="forward")

  def log_prob(self, variables: Variables, y: Array) -> Array:
    """Per-example log density of dequantized y, a density on [0,1]^D."""
    self.check_unit_cube(y)
    _, log_det, log_prior, _ = self.forward(variables, y)
    return log_prior + log_det

  def bpd_from_log_prob(self, log_prob: Array) -> Array:
    """bits/dim = -(log p(y) - D n ln 2) / (D ln 2) (docs/formulation.md)."""
    d = self.num_dims
    return -(log_prob - d * self.n_bits * math.log(2.0)) / (d * math.log(2.0))

  def bpd(self, variables: Variables, x: Array, rng: Array) -> Array:
    """Per-example bits/dim of uint8 images with one draw of dequantization noise."""
    return self.bpd_from_log_prob(self.log_prob(variables, self.dequantize(x, rng)))

  def loss(self, variables: Variables, x: Array, rng: Array) -> tuple[Array, dict[str, Array]]:
    """Training loss = mean bpd + EIW terms; aux holds the pure-NLL `bpd` and each term."""
    y = self.dequantize(x, rng)
    _, log_det, log_prior, aux = self.forward(variables, y)
    bpd = jnp.mean(self.bpd_from_log_prob(log_prior + log_det))
    eiw = self.model_config.eiw
    regularizer = sum((jnp.mean(r) for r in aux.get("regularizer", [])), jnp.zeros(()))
    entropy = sum((jnp.mean(e) for e in aux.get("weight_entropy", [])), jnp.zeros(()))
    loss = bpd + eiw.sigma * regularizer + eiw.entropy_weight * entropy
    return loss, {"loss": loss, "bpd": bpd, "regularizer": regularizer, "weight_entropy": entropy}

  def encode(self, variables: Variables, y: Array) -> list[Array]:
    """Dequantized y -> list of per-level latents (the exact bijection's output)."""
    return self.forward(variables, y)[0]

  def decode(self, variables: Variables, latents: Sequence[Array]) -> Array:
    """Exact inverse of `encode`."""
    self.check_variables(variables)
    self.check_latents(latents)
    return self.module.apply(variables, list(latents), method="inverse")

  def sample_continuous(
      self, variables: Variables, rng: Array, num: int, temperature: float = 1.0
  ) -> tuple[Array, list[Array]]:
    """(y in data space, latents) drawn with prior std scaled by `temperature` (0: the mode)."""
    self.check_variables(variables)
    self.check_temperature(temperature)
    if not isinstance(num, (int, np.integer)) or num < 1:
      raise ValueError(f"num: expected an int >= 1 samples, got {num!r}.")
    return self.module.apply(variables, rng, num, temperature, method="generate")

  def sample(
      self, variables: Variables, rng: Array, num: int, temperature: float = 1.0
  ) -> Array:
    """uint8 images sampled at `temperature`.

    Decoded values that are not finite (a diverged model) have no pixel value (XLA casts NaN
    to 0, black): `sample_continuous` returns the decoded `y` to check them (the command
    line's sample grids count, report and mark them).
    """
    y, _ = self.sample_continuous(variables, rng, num, temperature)
    return self.quantize(y)

  def quantize(self, y: Array) -> Array:
    levels = 2**self.n_bits
    return jnp.clip(jnp.floor(y * levels), 0, levels - 1).astype(jnp.uint8)

  def prior_means(self, variables: Variables, latents: Sequence[Array]) -> list[Array]:
    """Per-level prior means given the latents' kept channels (what temperature 0 draws)."""
    self.check_variables(variables)
    self.check_latents(latents)
    return self.module.apply(variables, list(latents), method="prior_means")

  def shuffle_stats(self, variables: Variables, y: Array) -> list[dict[str, Array]]:
    """Per split level, the diagnostics of docs/formulation.md for this split variant."""
    self.check_variables(variables)
    self.check_continuous(y)
    return self.module.apply(variables, *self.backbone_inputs(y), method="diagnostics")

  def split_permutations(self, variables: Variables) -> dict[int, Array]:
    """Split index (as in `shuffle_stats`) -> the channel order of each EIW split whose order
    is the same for every example (Glow's `global` splits, DenseFlow's EIW transitions), a
    function of the parameters alone; vanilla and `per_example` splits are absent."""
    self.check_variables(variables)
    return self.module.apply(variables, method="split_permutations")

  # ---- exploring a trained flow: the logic and the full docs are in eiw_flow_jax.model.explore
  def interpolate(self, variables: Variables, x_a: Array, x_b: Array, num: int = 8) -> Array:
    """(B, num, H, W, C) images decoded along straight lines between x_a's and x_b's latents."""
    return explore.interpolate(self, variables, x_a, x_b, num)

  def bits_per_dim_map(
      self, variables: Variables, x: Array, rng: Array | None = None
  ) -> Array:
    """(B, H, W) bits per pixel position; .sum((1, 2)) / D is the bpd (glow backbone only)."""
    return explore.bits_per_dim_map(self, variables, x, rng)

  def shuffle_assignment(self, variables: Variables, x: Array) -> list[dict[str, Array]]:
    """Per split level: "kept" (B, C) mask, the Shuffle's "order" (B, C), "log_weights"."""
    return explore.shuffle_assignment(self, variables, x)


@dataclasses.dataclass(frozen=True, eq=False)
class DenseFlow(Flow):
  """`Flow` over the DenseFlow backbone (`config.model.backbone = "denseflow"`).

  Same API as `Flow`; the differences come from the model being a variational bound:
  dequantization is variational (so `dequantize` needs the variables) and every unit appends
  noise (augmentation). All noise is one pytree, `{"dequant": (B, H/2, W/2, 4C) array,
  "augment": [one (B, h, w, growth_rate) array per unit after a block's first]}` of standard
  normal draws (`noise_shapes`); methods take it as `noise=` (tests compare to the authors'
  PyTorch model this way) or draw it from `rng`. Without both, a fixed key (0) is used, so
  `encode`/`log_prob` stay deterministic functions of their inputs.

  Objective per example, in nats (`elbo_terms`): elbo = -D n ln 2 - log q(u|x) + log-dets
  (incl. augmentation terms) + log N(factored halves) + log base(top); bpd = -elbo / (D ln 2).
  `iwbo_bpd` gives the importance-weighted bound with k samples.
  """

  __hash__ = object.__hash__

  def noise_shapes(self, batch: int) -> dict[str, Any]:
    shapes = denseflow_shapes(self.model_config)
    return {
        "dequant": (batch, *shapes["dequant"]),
        "augment": [(batch, *s) for s in shapes["augment"]],
    }

  def draw_noise(self, rng: Array, batch: int) -> dict[str, Any]:
    """Standard-normal draws for one pass over `batch` examples."""
    shapes = self.noise_shapes(batch)
    keys = jax.random.split(rng, 1 + len(shapes["augment"]))
    return {
        "dequant": jax.random.normal(keys[0], shapes["dequant"]),
        "augment": [jax.random.normal(k, s) for k, s in zip(keys[1:], shapes["augment"])],
    }

  def _noise(self, rng: Array | None, noise: dict[str, Any] | None, batch: int):
    if noise is not None:
      expected = self.noise_shapes(batch)
      got = {"dequant": tuple(noise["dequant"].shape),
             "augment": [tuple(a.shape) for a in noise["augment"]]}
      if got != expected:
        raise ValueError(f"noise: expected shapes {expected}, got {got}.")
      return noise
    return self.draw_noise(jax.random.PRNGKey(0) if rng is None else rng, batch)

  def backbone_inputs(self, y: Array, rng: Array | None = None,
                      noise: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """(y, augmentation noise): from `noise`, or drawn from `rng`, or from the fixed key."""
    return (y, self._noise(rng, noise, y.shape[0])["augment"])

  def init(self, rng: Array, x: Array) -> Variables:
    """Variables with data-dependent ActNorm initialisation on the uint8 batch `x`."""
    self.check_uint8(x)
    noise_rng, params_rng = jax.random.split(rng)
    noise = self.draw_noise(noise_rng, x.shape[0])
    # Jitted (eagerly, its thousands of small ops take minutes on CPU), with an "rbg" key for
    # the parameter draws: XLA compiles hundreds of threefry draws several times slower.
    data = params_rng if not jnp.issubdtype(params_rng.dtype, jax.dtypes.prng_key) else (
        jax.random.key_data(params_rng))
    data = jnp.asarray(data, jnp.uint32).reshape(-1)[:2]
    data = jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)])
    key = jax.random.wrap_key_data(data, impl="rbg")
    variables = jax.jit(
        lambda r, x, n: self.module.init({"params": r}, x, n, method="forward_x")
    )(key, x, noise)
    return {"params": variables["params"], "constants": variables.get("constants", {})}

  def dequantize(self, x: Array, rng: Array, variables: Variables | None = None) -> Array:
    """uint8 x -> y = (x + u) / 2^n, u ~ q(u | x) (the variational dequantizer)."""
    self.check_uint8(x)
    if variables is None:
      raise ValueError("DenseFlow.dequantize needs `variables`: its dequantization is learned.")
    self.check_variables(variables)
    eps = self.draw_noise(rng, x.shape[0])["dequant"]
    u, _ = self.module.apply(variables, x, eps, method="dequantization")
    return (x.astype(u.dtype) + u) / 2.0**self.n_bits

  def elbo_terms(
      self, variables: Variables, x: Array, rng: Array | None = None,
      noise: dict[str, Any] | None = None, *, train: bool = False,
  ) -> dict[str, Any]:
    """Per-example ELBO terms in nats (see DenseFlowBackbone.forward_x) plus `bpd`.

    `train=True` uses BatchNorm batch statistics (as the authors' `model.train()`) and
    returns the updated running statistics under "constants".
    """
    self.check_variables(variables)
    self.check_uint8(x)
    noise = self._noise(rng, noise, x.shape[0])
    if train:
      (_, terms), updated = self.module.clone(train=True).apply(
          variables, x, noise, method="forward_x", mutable=["constants"])
      terms = dict(terms, constants=updated["constants"])
    else:
      _, terms = self.module.apply(variables, x, noise, method="forward_x")
    terms["bpd"] = -terms["elbo"] / (self.num_dims * math.log(2.0))
    return terms

  def forward(self, variables: Variables, y: Array, rng: Array | None = None,
              noise: dict[str, Any] | None = None):
    """(latents, log_det, log_prior, aux) of dequantized y, augmentation drawn from rng."""
    self.check_variables(variables)
    self.check_continuous(y)
    return self.module.apply(variables, *self.backbone_inputs(y, rng, noise), method="forward")

  def log_prob(self, variables: Variables, y: Array, rng: Array | None = None) -> Array:
    """A one-draw lower bound on log p(y) (the augmentation makes it a bound)."""
    _, log_det, log_prior, _ = self.forward(variables, y, rng)
    return log_prior + log_det

  def bpd(self, variables: Variables, x: Array, rng: Array) -> Array:
    """Per-example ELBO bits/dim of uint8 images (one draw of all noise)."""
    return self.elbo_terms(variables, x, rng)["bpd"]

  def iwbo_bpd(
      self, variables: Variables, x: Array, rng: Array, k: int, chunk: int = 0
  ) -> Array:
    """Per-example importance-weighted bound with k samples, in bits/dim.

    -(logsumexp_j elbo_j - log k) / (D ln 2); the k draws run `chunk` at a time (0: all at
    once) under a `lax.scan` with a running logsumexp, so memory is that of B * chunk examples.
    """
    chunk = k if chunk <= 0 else chunk
    if k < 1 or k % chunk:
      raise ValueError(f"iwbo: k={k} must be >= 1 and a multiple of chunk={chunk}.")
    b = x.shape[0]
    xs = jnp.tile(x, (chunk, 1, 1, 1))

    def body(carry, key):
      elbo = self.elbo_terms(variables, xs, key)["elbo"].reshape(chunk, b)
      return jnp.logaddexp(carry, jax.nn.logsumexp(elbo, axis=0)), None

    init = jnp.full((b,), -jnp.inf, jnp.float32)
    total, _ = jax.lax.scan(body, init, jax.random.split(rng, k // chunk))
    return -(total - math.log(k)) / (self.num_dims * math.log(2.0))

  def loss(self, variables: Variables, x: Array, rng: Array) -> tuple[Array, dict[str, Array]]:
    """ELBO bpd + sigma * sum over transitions of the batch-mean regulariser (the authors').

    aux["constants"] holds the BatchNorm running statistics after this batch.
    """
    terms = self.elbo_terms(variables, x, rng, train=True)
    bpd = jnp.mean(terms["bpd"])
    regularizer = sum((jnp.mean(r) for r in terms["regularizer"]), jnp.zeros(()))
    loss = bpd + self.model_config.eiw.sigma * regularizer
    return loss, {"loss": loss, "bpd": bpd, "regularizer": regularizer,
                  "weight_entropy": jnp.zeros(()), "constants": terms["constants"]}

  def encode(self, variables: Variables, y: Array, rng: Array | None = None) -> list[Array]:
    """Dequantized y -> latents (augmentation drawn from rng; decode drops it again)."""
    return self.forward(variables, y, rng)[0]

  def shuffle_stats(
      self, variables: Variables, y: Array, rng: Array | None = None
  ) -> list[dict[str, Array]]:
    """Per EIW transition: the order, the weights' entropies and regulariser, and where the
    authors' float32 weights tie (`authors_tied_channels`, `authors_tied_kept_channels`,
    `authors_ties_cross_split`: their torch model's order is undefined there)."""
    self.check_variables(variables)
    self.check_continuous(y)
    return self.module.apply(variables, *self.backbone_inputs(y, rng), method="diagnostics")


def build_flow(config: ml_collections.ConfigDict) -> Flow:
  """Builds a `Flow` from the whole config (uses `config.model`), validated first.

  `config.model.backbone` picks the backbone: "glow" (default) or "denseflow" (a `DenseFlow`,
  a subclass of `Flow` with the same API).
  """
  model = config.model if "model" in config else config
  model_validation.validate_model_config(model)
  model = ml_collections.FrozenConfigDict(model)
  if model.backbone == "denseflow":
    return DenseFlow(model, DenseFlowBackbone(model))
  return Flow(model, MultiScaleFlow(model))

