"""Activation memory of a chain of invertible steps: "store", "remat" or "invert".

A flow level is a chain x_0 -> x_1 -> ... -> x_K of K steps with identical parameter shapes,
each step `apply(vars_k, x_k) -> (x_{k+1}, log_det_k)` with an exact `inverse(vars_k, x_{k+1})`.
The log-determinant of the chain is the sum of the steps'. `run_chain` evaluates it under one
of three memory strategies for the backward pass:

- "store": plain autodiff; every intermediate of every step (the coupling networks' hidden
  activations dominate) stays alive until the backward pass: memory linear in K.
- "remat": `jax.checkpoint` per step, the steps run by `lax.scan`; only the K step inputs are
  kept, each step's intermediates are recomputed in the backward pass (one extra forward).
- "invert": a custom VJP over the whole chain (memory-saving backprop for reversible networks,
  Gomez et al. 2017): only the chain's output is kept; the backward pass walks the steps in
  reverse with `lax.scan`, rebuilding each step's input from its output through the exact
  inverse, then back-propagating through that one step. Memory is independent of K.

Reconstruction drift ("invert"): floating-point inverses are not bit-exact, so the rebuilt
inputs drift from the true ones, step after step. The chain's input x_0 (one activation, small
next to one coupling network's hidden activations) is kept as well; the backward pass compares
the rebuilt x_0 with it. If max|x0_rebuilt - x0| / max(1, max|x0|) exceeds `tolerance`, the
gradient is recomputed exactly from x_0 instead (a forward scan that keeps the K step inputs,
as "remat" does) and a warning is logged from the host (`drift_warnings` counts them). The
fallback sits in a `lax.cond`, so it costs time only when it triggers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

Array = jax.Array
StepFn = Callable[[Any, Array], tuple[Array, Array]]
InverseFn = Callable[[Any, Array], Array]
# (variables, step output y, cotangent of y, cotangent of the log-det) -> (x, d params, d x)
InverseVjpFn = Callable[[Any, Array, Array, Array], tuple[Array, Any, Array]]

MEMORY_MODES = ("store", "remat", "invert")

LOOP = "unrolled"  # experiment switch: "unrolled" | "scan"
FUSED_INVERSE = True  # experiment switch
_lock = threading.Lock()
drift_warnings: list[tuple[str, float]] = []  # (chain name, relative drift), appended on host


def stack_trees(trees: list[Any]) -> Any:
  """K pytrees of identical structure -> one pytree with a leading axis of size K."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack_tree(tree: Any, count: int) -> list[Any]:
  return [jax.tree.map(lambda leaf, k=k: leaf[k], tree) for k in range(count)]


def relative_drift(rebuilt: Array, true: Array) -> Array:
  """max |rebuilt - true| / max(1, max |true|): the measure the "invert" fallback checks."""
  error = jnp.max(jnp.abs(rebuilt.astype(jnp.float32) - true.astype(jnp.float32)))
  return error / jnp.maximum(1.0, jnp.max(jnp.abs(true.astype(jnp.float32))))


def _warn_drift(name: str, drift: Any, tolerance: float) -> None:
  value = float(drift)
  with _lock:
    drift_warnings.append((name, value))
  logging.warning(
      "memory='invert': the inputs of %s rebuilt through the inverse drifted by %.3g (relative "
      "max error) > tolerance %.3g; this step's gradient was recomputed from the stored input "
      "instead (exact, slower). If this repeats, use config.model.memory='remat'.",
      name, value, tolerance,
  )


def _scan_forward(apply: StepFn, stacked: Any, x: Array) -> tuple[Array, Array]:
  def body(carry, variables):
    h, log_det = carry
    h, step_log_det = apply(variables, h)
    return (h, log_det + step_log_det), None

  log_det = jnp.zeros((x.shape[0],), jnp.float32)
  (y, log_det), _ = jax.lax.scan(body, (x, log_det), stacked)
  return y, log_det


def _exact_backward(apply: StepFn, stacked: Any, x0: Array, gy: Array, gld: Array):
  """Gradients from the true input: forward scan keeping the K step inputs, then VJPs."""

  def forward(h, variables):
    out, _ = apply(variables, h)
    return out, h

  _, inputs = jax.lax.scan(forward, x0, stacked)

  def backward(g, pair):
    variables, h = pair
    _, vjp = jax.vjp(apply, variables, h)
    gv, gh = vjp((g, gld))
    return gh, gv

  gx, gvs = jax.lax.scan(backward, gy, (stacked, inputs), reverse=True)
  return gvs, gx


def _invert_chain(
    apply: StepFn, inverse: InverseFn, name: str, tolerance: float
) -> Callable[[Any, Any, Array], tuple[Array, Array]]:
  """custom_vjp function (stacked params, stacked constants, x) -> (y, log_det)."""

  def split_apply(params, constants, h):
    return apply({"params": params, "constants": constants}, h)

  @jax.custom_vjp
  def chain(params, constants, x):
    return _scan_forward(
        lambda v, h: split_apply(v[0], v[1], h), (params, constants), x
    )

  def chain_fwd(params, constants, x):
    y, log_det = chain(params, constants, x)
    return (y, log_det), (params, constants, x, y)

  def chain_bwd(residuals, cotangents):
    params, constants, x0, y = residuals
    gy, gld = cotangents
    step = lambda p, c, h: split_apply(p, c, h)  # noqa: E731

    def body(carry, pc):
      p, c = pc
      out, g = carry
      h = jax.lax.stop_gradient(inverse({"params": p, "constants": c}, out))
      _, vjp = jax.vjp(lambda p_, h_: step(p_, c, h_), p, h)
      gp, gh = vjp((g, gld))
      return (h, gh), gp

    (x0_rebuilt, gx), gps = jax.lax.scan(body, (y, gy), (params, constants), reverse=True)
    drift = relative_drift(x0_rebuilt, x0)

    def fallback(_):
      jax.debug.callback(_warn_drift, name, drift, tolerance)
      return _exact_backward(
          lambda p, h: step(p[0], p[1], h), (params, constants), x0, gy, gld
      )

    def keep(_):
      return (gps, constants), gx

    (gps, _), gx = jax.lax.cond(drift > tolerance, fallback, keep, None)
    return gps, jax.tree.map(jnp.zeros_like, constants), gx

  chain.defvjp(chain_fwd, chain_bwd)
  return chain


def _after(x: Array, *deps: Any) -> Array:
  """x, but as a value that XLA can only compute once every leaf of `deps` exists.

  `lax.optimization_barrier` does not order anything on XLA:CPU (its expander pass replaces
  the barrier by its operands before scheduling), so the dependency is made numerical: x plus
  zero times a sum over the dependencies. XLA does not fold a float product with zero (NaN
  semantics), so the scheduler must finish the dependencies first. Exact for finite
  dependencies; a non-finite gradient makes x non-finite too (such a step is dropped anyway).
  """
  leaves = [leaf for leaf in jax.tree.leaves(deps) if leaf is not None]
  if not leaves:
    return x
  total = sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in leaves)
  return x + (0.0 * total).astype(x.dtype)


def _forward_loop(apply: StepFn, step_variables: list[Any], x: Array) -> tuple[Array, Array]:
  log_det = jnp.zeros((x.shape[0],), jnp.float32)
  for variables in step_variables:
    x, step_log_det = apply(variables, x)
    log_det = log_det + step_log_det
  return x, log_det


def _unrolled_chain(
    mode: str,
    apply: StepFn,
    inverse: InverseFn,
    name: str,
    tolerance: float,
    inverse_vjp: InverseVjpFn | None = None,
) -> Callable[[list[Any], list[Any], Array], tuple[Array, Array]]:
  """custom_vjp function (params per step, constants per step, x) -> (y, log_det).

  The backward pass is an unrolled Python loop over the steps in reverse. Step k's input
  (stored: "remat"; or rebuilt from step k's output through the inverse: "invert") passes
  through `lax.optimization_barrier` together with the cotangent from step k+1 and step k+1's
  parameter gradients, so XLA can neither hoist step k's recomputation before step k+1's
  backward nor defer step k+1's weight gradients: one step's internals are alive at a time.
  """

  def as_vars(p, c):
    return {"params": p, "constants": c}

  @jax.custom_vjp
  def chain(params, constants, x):
    return _forward_loop(apply, [as_vars(p, c) for p, c in zip(params, constants)], x)

  def chain_fwd(params, constants, x):
    if mode == "remat":
      inputs, h = [], x
      log_det = jnp.zeros((x.shape[0],), jnp.float32)
      for p, c in zip(params, constants):
        inputs.append(h)
        h, step_log_det = apply(as_vars(p, c), h)
        log_det = log_det + step_log_det
      return (h, log_det), (params, constants, inputs)
    y, log_det = chain(params, constants, x)
    return (y, log_det), (params, constants, x, y)

  def chain_bwd(residuals, cotangents):
    gy, gld = cotangents
    params, constants = residuals[:2]
    count = len(params)
    gps: list[Any] = [None] * count
    g, out, later = gy, (residuals[3] if mode == "invert" else None), ()
    for k in reversed(range(count)):
      p, c = params[k], constants[k]
      if mode == "invert" and inverse_vjp is not None:
        h, gps[k], g = inverse_vjp(as_vars(p, c), _after(out, g, later), g, gld)
      else:
        if mode == "invert":
          h = jax.lax.stop_gradient(inverse(as_vars(p, c), _after(out, g, later)))
        else:
          h = _after(residuals[2][k], g, later)
        _, vjp = jax.vjp(lambda p_, h_, c=c: apply(as_vars(p_, c), h_), p, h)
        gps[k], g = vjp((g, gld))
      later, out = gps[k], h
    gx = g
    zeros = [jax.tree.map(jnp.zeros_like, c) for c in constants]
    if mode == "remat":
      return gps, zeros, gx
    x0 = residuals[2]
    drift = relative_drift(out, x0)

    def fallback(_):
      jax.debug.callback(_warn_drift, name, drift, tolerance)
      stacked = stack_trees([as_vars(p, c) for p, c in zip(params, constants)])
      gvs, gx_exact = _exact_backward(apply, stacked, x0, gy, gld)
      return unstack_tree(gvs["params"], count), gx_exact

    def keep(_):
      return gps, gx

    gps, gx = jax.lax.cond(drift > tolerance, fallback, keep, None)
    return gps, zeros, gx

  chain.defvjp(chain_fwd, chain_bwd)
  return chain


def run_chain(
    mode: str,
    apply: StepFn,
    inverse: InverseFn,
    step_variables: list[Any],
    x: Array,
    *,
    name: str = "chain",
    tolerance: float = 1e-3,
    inverse_vjp: InverseVjpFn | None = None,
) -> tuple[Array, Array]:
  """(x_K, total log-det) of the chain under memory `mode` (see the module docstring).

  `step_variables[k]` is step k's {"params": ..., "constants": ...}; `apply` / `inverse` are
  pure functions of (variables, array). Gradients flow to every "params" leaf.
  """
  if mode not in MEMORY_MODES:
    raise ValueError(f"memory mode must be one of {MEMORY_MODES}, got {mode!r}.")
  if mode == "store":
    return _forward_loop(apply, step_variables, x)
  if LOOP == "unrolled":
    chain = _unrolled_chain(mode, apply, inverse, name, tolerance, inverse_vjp)
    return chain([v["params"] for v in step_variables],
                 [v["constants"] for v in step_variables], x)
  stacked = stack_trees([{"params": v["params"], "constants": v["constants"]}
                         for v in step_variables])
  if mode == "remat":
    # A scan over checkpointed steps: its backward loop recomputes one step at a time. (An
    # unrolled loop of jax.checkpoint'ed steps left XLA:CPU free to schedule every
    # recomputation early, which measured the same temporary memory as "store".)
    return _scan_forward(jax.checkpoint(apply), stacked, x)
  chain = _invert_chain(apply, inverse, name, tolerance)
  return chain(stacked["params"], stacked["constants"], x)
