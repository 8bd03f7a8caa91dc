"""The jitted data-parallel train step, and the Shuffle diagnostics' step.

The step runs over the mesh of `sharding` (batch sharded on "data", state replicated); the
state is `train_state.TrainState`, the optimizer `optimizer.make_optimizer`.

Determinism: the dequantization noise of step s is drawn inside the step from
`fold_in(train_key, s)`, so a run resumed from any checkpoint ends with the same parameters as
an uninterrupted one (skipped steps still advance the step counter).

Non-finite loss or gradients: the step's update is dropped inside the jitted step (params, EMA
and optimizer state keep their values) and counted on the device (`nonfinite_consecutive`);
the loop (`train_loop`) reads the streak and stops the run.

EMA: decay min(config.ema_decay, (1 + n) / (10 + n)) after n applied updates, so short runs
are not dominated by the initial parameters; eval and sampling use the EMA parameters. With
`ema_decay` 0 the state holds no EMA (`train_state.keeps_ema`) and they use the raw ones.
"""


from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from eiw_flow_jax.model.flow import Flow
from eiw_flow_jax.training.compiler_options import compiler_options, jit_options
from eiw_flow_jax.training.optimizer import make_schedule
from eiw_flow_jax.training.sharding import (
  batch_sharding,
  mesh_platform,
  replicated,
  state_shardings,
)
from eiw_flow_jax.training.train_state import (
  TrainState,
  abstract_state,
  keeps_ema,
  rng_keys,
)

T = TypeVar("T")

# ----------------------------------------------------------------------------------------------
# The train step.

# The name scope of the optimizer and EMA update (XLA fuses the two per parameter), in the op
# names of the compiled step (eiw_flow_jax.aot.traffic).
UPDATE_SCOPE = "optimizer_and_ema_update"


def guarded_update(finite: jax.Array, update: Callable[[T], T], state: T, *, branch: bool) -> T:
  """`update(state)` if `finite`, else `state` unchanged: in a branch (`lax.cond`) or as a
  select per leaf between the updated and the old values. The same result either way.

  The train step takes the branch on XLA:CPU and GPUs, so that a non-finite step runs no
  update and the donated params, EMA and optimizer state are updated in place (a select there
  forced a copy of every leaf), and the select on TPU, where it fuses into each leaf's update
  and the branch's results cost copies of the state (fewer bytes by the TPU compiler:
  docs/tpu.md).
  """
  if branch:
    return jax.lax.cond(finite, update, lambda unchanged: unchanged, state)
  return jax.tree.map(lambda new, old: jnp.where(finite, new, old), update(state), state)


def _ema_decay(config: ml_collections.ConfigDict, applied: jax.Array) -> jax.Array:
  # Ramped like TF's ExponentialMovingAverage(num_updates): short runs are not dominated by
  # the initial parameters.
  applied = applied.astype(jnp.float32)
  return jnp.minimum(config.ema_decay, (1.0 + applied) / (10.0 + applied))


def make_train_step(
    config: ml_collections.ConfigDict,
    flow: Flow,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    inject_nonfinite: bool = False,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted step (state, global uint8 batch) -> (state, metrics), compiled with
  `config.compiler`'s options.

  A step whose loss or gradient is not finite leaves params, EMA and optimizer state unchanged
  and is counted. `inject_nonfinite` (tests only) makes every step's loss NaN.

  The step is traced for the mesh's platform alone (`Flow.for_platform`, and the update's form
  in `guarded_update`): nothing is staged out for other platforms.
  """
  platform = mesh_platform(mesh)
  flow = flow.for_platform(platform)
  schedule = make_schedule(config)
  train_key = rng_keys(config)["train"]
  use_ema = keeps_ema(config)

  def step_fn(state: TrainState, images: jax.Array):
    rng = jax.random.fold_in(train_key, state.step)

    def loss_fn(params):
      loss, aux = flow.loss({"params": params, "constants": state.constants}, images, rng)
      if inject_nonfinite:
        loss = loss * jnp.nan
      return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    applied = state.step - state.nonfinite_total  # updates applied before this one

    def apply_update(operands):
      params, ema, opt_state = operands
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      if use_ema:
        decay = _ema_decay(config, applied)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
      return params, ema, opt_state

    def keep_if_finite(new, old):
      return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    with jax.named_scope(UPDATE_SCOPE):
      params, ema, opt_state = guarded_update(
          finite, apply_update, (state.params, state.ema_params, state.opt_state),
          branch=platform != "tpu")

    skipped = (~finite).astype(jnp.int32)
    # DenseFlow's BatchNorm running statistics come back from the loss (not trained).
    constants = keep_if_finite(aux["constants"], state.constants) if "constants" in aux else (
        state.constants)
    new_state = state.replace(
        constants=constants,
        step=state.step + 1,
        params=params,
        ema_params=ema,
        opt_state=opt_state,
        nonfinite_total=state.nonfinite_total + skipped,
        nonfinite_consecutive=jnp.where(finite, 0, state.nonfinite_consecutive + 1),
    )
    metrics = {
        "loss": loss,
        "bpd": aux["bpd"],
        "regularizer": aux["regularizer"],
        "weight_entropy": aux["weight_entropy"],
        "grad_norm": grad_norm,
        "learning_rate": schedule(applied),
        "finite": finite,
        "nonfinite_total": new_state.nonfinite_total,
        "nonfinite_consecutive": new_state.nonfinite_consecutive,
    }
    # Whether each split's shared channel order (Glow's `global` splits, DenseFlow's EIW
    # transitions) changed in this step.
    before = flow.split_permutations({"params": state.params, "constants": state.constants})
    after = flow.split_permutations({"params": params, "constants": constants})
    for index, order in after.items():
      metrics[f"perm_changed/level{index}"] = jnp.any(before[index] != order).astype(jnp.int32)
    return new_state, metrics

  shardings = state_shardings(mesh, abstract_state(flow, tx, mesh, ema=use_ema))
  return jax.jit(
      step_fn,
      in_shardings=(shardings, batch_sharding(mesh)),
      out_shardings=(shardings, replicated(mesh)),
      donate_argnums=(0,),
      compiler_options=jit_options(compiler_options(config)),
  )


def make_stats_fn(flow: Flow, mesh: Mesh) -> Callable[..., list[dict[str, jax.Array]]]:
  """Jitted (variables, uint8 batch, rng) -> per-level Shuffle diagnostics."""
  flow = flow.for_platform(mesh_platform(mesh))
  return jax.jit(
      lambda v, x, rng: flow.shuffle_stats(v, flow.dequantize(x, rng, variables=v)),
      out_shardings=replicated(mesh),
  )
