"""The train state: what it holds, its random keys, and how a fresh one is made."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from eiw_flow_jax.data import registry
from eiw_flow_jax.model.flow import Flow
from eiw_flow_jax.training.sharding import host_replicated, state_shardings

# Fixed offsets folded into the seed, one per use of randomness.
_INIT_STREAM, _TRAIN_STREAM, _STATS_STREAM, _EVAL_STREAM, _SAMPLE_STREAM = 0, 1, 2, 3, 4
# Eval batch i draws its noise from fold_in(eval key, i); the importance-weighted bound's batches
# from fold_in(eval key, IWBO_BATCH_OFFSET + i), so the two bounds are independent draws.
IWBO_BATCH_OFFSET = 1_000_003


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the input pipeline's position."""

  step: jax.Array  # batches consumed so far, including skipped (non-finite) steps
  params: Any
  constants: Any  # fixed 1x1-conv permutations and signs; never trained
  ema_params: Any  # None without an EMA (`keeps_ema`): no copy of the parameters is held
  opt_state: Any
  nonfinite_total: jax.Array
  nonfinite_consecutive: jax.Array

  def variables(self, ema: bool = True) -> dict[str, Any]:
    """Variables for the Flow API: EMA (default; the raw parameters without an EMA) or raw
    parameters."""
    use_ema = ema and self.ema_params is not None
    return {"params": self.ema_params if use_ema else self.params, "constants": self.constants}


@dataclasses.dataclass
class TrainResult:
  flow: Flow
  state: TrainState
  mesh: Mesh
  info: registry.DatasetInfo
  step: int


def rng_keys(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """One key per use of randomness, all derived from config.seed."""
  base = jax.random.PRNGKey(config.seed)
  return {
      "init": jax.random.fold_in(base, _INIT_STREAM),
      "train": jax.random.fold_in(base, _TRAIN_STREAM),
      "stats": jax.random.fold_in(base, _STATS_STREAM),
      "eval": jax.random.fold_in(base, _EVAL_STREAM),
      "sample": jax.random.fold_in(base, _SAMPLE_STREAM),
  }


def keeps_ema(config: ml_collections.ConfigDict) -> bool:
  """Whether a run keeps an EMA of its parameters: `ema_decay` > 0. Without one, the state
  holds no copy (`ema_params` None) and eval and sampling use the raw parameters."""
  return config.ema_decay > 0


def state_from_variables(
    tx: optax.GradientTransformation, variables: Any, *, ema: bool = True
) -> TrainState:
  """A state at step 0 holding `variables`: the EMA (`ema`) starts at the parameters."""
  params = variables["params"]
  zero = jnp.zeros((), jnp.int32)
  return TrainState(
      step=zero,
      params=params,
      constants=variables["constants"],
      ema_params=params if ema else None,
      opt_state=tx.init(params),
      nonfinite_total=zero,
      nonfinite_consecutive=zero,
  )


@functools.lru_cache(maxsize=8)
def abstract_state(
    flow: Flow, tx: optax.GradientTransformation, mesh: Mesh, *, ema: bool = True
) -> Any:
  """The train state's structure as ShapeDtypeStructs with shardings (traced, not computed);
  `ema`: whether it holds an EMA of the parameters (`keeps_ema`)."""
  x = jax.ShapeDtypeStruct((1, *flow.image_shape), jnp.uint8)
  shapes = jax.eval_shape(
      lambda r, x: state_from_variables(tx, flow.init(r, x), ema=ema), jax.random.PRNGKey(0), x
  )
  shardings = state_shardings(mesh, shapes)
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )


def create_state(
    config: ml_collections.ConfigDict,
    flow: Flow,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    init_images: np.ndarray,
) -> TrainState:
  """Fresh state with data-dependent init on `init_images` (the same on every process)."""
  # flow.init runs on this process's default device, outside the sharded jit (which would
  # compile the whole data-dependent init as one graph); every process computes the same
  # variables from the same examples, then they are placed with the state's shardings.
  variables = jax.device_get(flow.init(rng_keys(config)["init"], init_images))
  variables = jax.tree.map(lambda v: host_replicated(v, mesh), variables)
  ema = keeps_ema(config)
  shardings = state_shardings(mesh, abstract_state(flow, tx, mesh, ema=ema))
  return jax.jit(lambda v: state_from_variables(tx, v, ema=ema), out_shardings=shardings)(
      variables)
