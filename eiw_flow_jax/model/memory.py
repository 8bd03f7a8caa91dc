"""Activation memory of a chain of invertible steps: "store", "remat", "invert" or "remat_wide".

A flow level is a chain x_0 -> x_1 -> ... -> x_K of K steps with identical parameter shapes,
each step `apply(vars_k, x_k) -> (x_{k+1}, log_det_k)` with an exact `inverse(vars_k, x_{k+1})`.
The log-determinant of the chain is the sum of the steps'. `run_chain` evaluates it under one
of four memory strategies for the backward pass:

- "store": plain autodiff; every intermediate of every step (the coupling networks' hidden
  activations dominate) stays alive until the backward pass: memory linear in K.
- "remat": per-step rematerialisation (what `jax.checkpoint` per step does): the forward keeps
  only the K step inputs; the backward recomputes one step's internals at a time.
- "invert": memory-saving backprop for reversible networks (Gomez et al. 2017): only the
  chain's input and output are kept; the backward pass walks the steps in reverse, rebuilding
  each step's input from its output through the exact inverse, then back-propagating through
  that one step. Memory is independent of K.
- "remat_wide": `jax.checkpoint` of each step with the policy `KEEP_WIDE`: the forward keeps
  the step inputs and what the coupling network names (its wide activation and its output,
  `kernels.COUPLING_WIDE`, `kernels.COUPLING_OUT`); the backward recomputes the rest (ActNorm,
  the 1x1 convolution, the network's first layer), the TPU's fewest bytes in bfloat16
  (docs/tpu.md). A scan orders the steps; unrolled, it is a loop of `jax.checkpoint`s, which
  XLA:CPU does not order (below).

"remat" and "invert" are each one `jax.custom_vjp` over the chain; `run_chain`'s backward pass
is an unrolled Python loop (`run_stacked_chain` also has a scanned form, below). In an unrolled
loop XLA's scheduler is free to run every step's recomputation early, which keeps every step's
internals alive at once (as much memory as "store"), and `lax.optimization_barrier` does not
prevent it on XLA:CPU. So step k's recomputation is made to depend numerically on the cotangent
and the parameter gradients of step k+1 (`_after`): one step's internals at a time.

Reconstruction drift ("invert"): floating-point inverses are not bit-exact, so the rebuilt
inputs drift from the true ones, step after step. The chain's input x_0 (one activation, small
next to one coupling network's hidden activations) is kept as well; the backward pass compares
the rebuilt x_0 with it. If max|x0_rebuilt - x0| / max(1, max|x0|) exceeds `tolerance`, the
gradient is recomputed exactly from x_0 instead (a forward scan that keeps the K step inputs,
then a reverse scan of per-step VJPs) and a warning is logged from the host (`drift_warnings`
counts them).
The fallback sits in a `lax.cond`, so it costs time only when it triggers.

`run_stacked_chain` takes the steps' variables stacked along a leading axis (one Glow level's
steps) and runs the chain either as one `lax.scan` (the step compiled once, whatever
K; "remat" is `jax.checkpoint` of the scanned step, "invert" a custom VJP whose backward pass is
a reverse scan, with the same drift guard) or unrolled over slices of the stack through
`run_chain`. Inside a scan the loop itself orders the steps' recomputations. (docs/benchmarks.md
compares the scanned and unrolled train steps.)

`remat_call` is the same ordered recomputation for one call of a module whose calls do not
form a chain of identical steps (e.g. modules whose channel counts grow, or whose BatchNorm
updates running statistics): consecutive calls are ordered by a token threaded through them.
DenseFlow's units no longer use it: each dense block is one scan over its units padded to the
widest (`backbones/dense_scan.py`), whose units `memory="remat"` recomputes with
`jax.checkpoint`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from eiw_flow_jax.config.schema import MEMORY_MODES
from eiw_flow_jax.model import kernels

Array = jax.Array
StepFn = Callable[[Any, Array], tuple[Array, Array]]
InverseFn = Callable[[Any, Array], Array]
# (variables, step output y, cotangent of y, cotangent of the log-det) -> (x, d params, d x)
InverseVjpFn = Callable[[Any, Array, Array, Array], tuple[Array, Any, Array]]

# memory="remat_wide": a step is recomputed in the backward pass except the values its coupling
# network names (`kernels.COUPLING_WIDE`, `kernels.COUPLING_OUT`), which the forward keeps.
KEEP_WIDE = jax.checkpoint_policies.save_only_these_names(kernels.COUPLING_WIDE,
                                                          kernels.COUPLING_OUT)

_lock = threading.Lock()
drift_warnings: list[tuple[str, float]] = []  # (chain name, relative drift), appended on host


def _scan_backward(
    apply: StepFn, params: list[Any], constants: list[Any], x0: Array, g: Array, g_log_det: Array
) -> tuple[list[Any], Array]:
  """Exact gradients from the true chain input, as `lax.scan`s over stacked step variables.

  The "invert" fallback: a forward scan that keeps the K step inputs, then a reverse scan of
  per-step VJPs. Rolled loops compile the step body once (an unrolled fallback would add K
  more copies of the step to the program) and run slowly on XLA:CPU, but only when the
  fallback triggers; the stacked copy of the parameters is the price in memory.
  """
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[
      {"params": p, "constants": c} for p, c in zip(params, constants)
  ])
  grads, gx = _scan_backward_stacked(apply, stacked, x0, g, g_log_det)
  return [jax.tree.map(lambda leaf, k=k: leaf[k], grads) for k in range(len(params))], gx


def _scan_backward_stacked(
    apply: StepFn, stacked: Any, x0: Array, g: Array, g_log_det: Array
) -> tuple[Any, Array]:
  """`_scan_backward` over variables already stacked along a leading axis: (d params, d x0)."""

  def forward(h, variables):
    return apply(variables, h)[0], h

  _, inputs = jax.lax.scan(forward, x0, stacked)

  def backward(g, pair):
    variables, h = pair
    _, vjp = jax.vjp(lambda p, h: apply({**variables, "params": p}, h), variables["params"], h)
    gp, gh = vjp((g, g_log_det))
    return gh, gp

  gx, grads = jax.lax.scan(backward, g, (stacked, inputs), reverse=True)
  return grads, gx


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


def _backward_loop(
    apply: StepFn,
    params: list[Any],
    constants: list[Any],
    g: Array,
    g_log_det: Array,
    stored_inputs: list[Array] | None = None,
    out: Array | None = None,
    inverse: InverseFn | None = None,
    inverse_vjp: InverseVjpFn | None = None,
) -> tuple[list[Any], Array, Array | None]:
  """Steps K-1..0 in reverse: (param gradients per step, input cotangent, rebuilt x_0).

  Step k's input is `stored_inputs[k]` ("remat") or rebuilt from its output `out` through
  `inverse` (or `inverse_vjp`, which also returns the step's VJP). Either way it is computed
  `_after` step k+1's input cotangent and parameter gradients exist, so XLA cannot hoist step
  k's recomputation, nor defer step k+1's weight gradients (which hold its internals alive).
  """
  count = len(params)
  grads: list[Any] = [None] * count
  later: Any = ()
  for k in reversed(range(count)):
    variables = {"params": params[k], "constants": constants[k]}
    if stored_inputs is None and inverse_vjp is not None:
      out, grads[k], g = inverse_vjp(variables, _after(out, g, later), g, g_log_det)
    else:
      if stored_inputs is None:
        out = jax.lax.stop_gradient(inverse(variables, _after(out, g, later)))
      else:
        out = _after(stored_inputs[k], g, later)

      def step(p, h, c=constants[k]):
        return apply({"params": p, "constants": c}, h)

      _, vjp = jax.vjp(step, params[k], out)
      grads[k], g = vjp((g, g_log_det))
    later = grads[k]
  return grads, g, (out if stored_inputs is None else None)


def _forward_keeping_inputs(
    apply: StepFn, params: list[Any], constants: list[Any], x: Array
) -> tuple[Array, Array, list[Array]]:
  inputs = []
  log_det = jnp.zeros((x.shape[0],), jnp.float32)
  for p, c in zip(params, constants):
    inputs.append(x)
    x, step_log_det = apply({"params": p, "constants": c}, x)
    log_det = log_det + step_log_det
  return x, log_det, inputs


def _chain(
    mode: str,
    apply: StepFn,
    inverse: InverseFn,
    name: str,
    tolerance: float,
    inverse_vjp: InverseVjpFn | None,
) -> Callable[[list[Any], list[Any], Array], tuple[Array, Array]]:
  """custom_vjp function (params per step, constants per step, x) -> (y, log_det)."""

  @jax.custom_vjp
  def chain(params, constants, x):
    y, log_det, _ = _forward_keeping_inputs(apply, params, constants, x)
    return y, log_det

  def chain_fwd(params, constants, x):
    y, log_det, inputs = _forward_keeping_inputs(apply, params, constants, x)
    kept = inputs if mode == "remat" else (x, y)
    return (y, log_det), (params, constants, kept)

  def chain_bwd(residuals, cotangents):
    params, constants, kept = residuals
    gy, gld = cotangents
    zeros = [jax.tree.map(jnp.zeros_like, c) for c in constants]
    if mode == "remat":
      grads, gx, _ = _backward_loop(apply, params, constants, gy, gld, stored_inputs=kept)
      return grads, zeros, gx
    x0, y = kept
    grads, gx, x0_rebuilt = _backward_loop(
        apply, params, constants, gy, gld, out=y, inverse=inverse, inverse_vjp=inverse_vjp
    )
    drift = relative_drift(x0_rebuilt, x0)

    def fallback(_):
      jax.debug.callback(_warn_drift, name, drift, tolerance)
      return _scan_backward(apply, params, constants, x0, gy, gld)

    def keep(_):
      return grads, gx

    grads, gx = jax.lax.cond(drift > tolerance, fallback, keep, None)
    return grads, zeros, gx

  chain.defvjp(chain_fwd, chain_bwd)
  return chain


# ----------------------------------------------------------------------------------------------
# Chains whose step variables are stacked along a leading axis (one compiled step body).


def unstack(stacked: Any, count: int) -> list[Any]:
  """Step k's variables, k < count, from variables stacked along a leading axis of `count`.

  Through `lax.split` (whose transpose is one concatenate), not `leaf[k]` per step (whose
  transposes are K zero-padded copies of the whole stack, summed).
  """
  if count == 1:
    return [jax.tree.map(lambda leaf: leaf[0], stacked)]
  pieces = jax.tree.map(
      lambda leaf: [p[0] for p in jax.lax.split(leaf, [1] * count, axis=0)], stacked)
  return [jax.tree.map(lambda _, parts, k=k: parts[k], stacked, pieces) for k in range(count)]


def stack_count(stacked: Any) -> int:
  """K, the leading axis of every leaf of stacked step variables (checked)."""
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
  if len(sizes) != 1:
    raise ValueError(f"stacked step variables: expected one leading size, got {sorted(sizes)}.")
  return sizes.pop()


def _scan_forward(apply: StepFn, stacked: Any, x: Array) -> tuple[Array, Array]:
  def body(carry, variables):
    h, log_det = carry
    out, step_log_det = apply(variables, h)
    # A scan's carry keeps its dtype: parameters wider than the input (float64 ones under
    # jax_enable_x64 with float32 data) would otherwise promote it; the input's dtype rules.
    return (out.astype(h.dtype), (log_det + step_log_det).astype(log_det.dtype)), None

  log_det = jnp.zeros((x.shape[0],), _log_det_dtype(x))
  return jax.lax.scan(body, (x, log_det), stacked)[0]


def _log_det_dtype(x: Array) -> Any:
  """The log-det accumulator's dtype: the input's where it is a float wider than float32."""
  return jnp.promote_types(x.dtype, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) \
      else jnp.float32


def _scanned_invert_chain(
    apply: StepFn,
    inverse: InverseFn,
    name: str,
    tolerance: float,
    inverse_vjp: InverseVjpFn | None,
) -> Callable[[Any, Any, Array], tuple[Array, Array]]:
  """custom_vjp (stacked params, stacked constants, x) -> (y, log_det) for memory="invert".

  The forward pass is one scan that keeps only x and y; the backward pass one reverse scan that
  rebuilds each step's input from its output and back-propagates through that step. Inside a
  scan the steps are ordered by the loop itself (no `_after` needed). The drift guard and its
  exact fallback are those of `run_chain`'s "invert".
  """

  def step_backward(carry, variables):
    out, g, g_log_det = carry
    if inverse_vjp is not None:
      out, g_params, g = inverse_vjp(variables, out, g, g_log_det)
    else:
      out = jax.lax.stop_gradient(inverse(variables, out))
      _, vjp = jax.vjp(lambda p, h: apply({**variables, "params": p}, h),
                       variables["params"], out)
      g_params, g = vjp((g, g_log_det))
    return (out, g, g_log_det), g_params

  @jax.custom_vjp
  def chain(params, constants, x):
    return _scan_forward(apply, {"params": params, "constants": constants}, x)

  def chain_fwd(params, constants, x):
    y, log_det = chain(params, constants, x)
    return (y, log_det), (params, constants, x, y)

  def chain_bwd(residuals, cotangents):
    params, constants, x0, y = residuals
    gy, gld = cotangents
    stacked = {"params": params, "constants": constants}
    (x0_rebuilt, gx, _), grads = jax.lax.scan(
        step_backward, (y, gy, gld), stacked, reverse=True)
    drift = relative_drift(x0_rebuilt, x0)

    def fallback(_):
      jax.debug.callback(_warn_drift, name, drift, tolerance)
      return _scan_backward_stacked(apply, stacked, x0, gy, gld)

    def keep(_):
      return grads, gx

    grads, gx = jax.lax.cond(drift > tolerance, fallback, keep, None)
    return grads, jax.tree.map(jnp.zeros_like, constants), gx

  chain.defvjp(chain_fwd, chain_bwd)
  return chain


def run_stacked_chain(
    mode: str,
    apply: StepFn,
    inverse: InverseFn,
    stacked: Any,
    x: Array,
    *,
    scan: bool,
    name: str = "chain",
    step_names: Any = None,
    tolerance: float = 1e-3,
    inverse_vjp: InverseVjpFn | None = None,
) -> tuple[Array, Array]:
  """`run_chain` on step variables stacked along a leading axis ({"params", "constants"}).

  `scan=True`: one `lax.scan` over the stack, so the step is traced and compiled once whatever
  K: "store" a plain scan; "remat" a scan of the `jax.checkpoint`ed step (the loop keeps the K
  step inputs, the backward pass recomputes one step at a time); "invert" a custom VJP whose
  backward pass is a reverse scan rebuilding each step's input through the inverse.
  `scan=False`: the same function unrolled over slices of the stack (`unstack`); "store" runs
  step k under the name scope `step_names(k)` if given (op names for profiles), the other
  modes through `run_chain`. Both forms take and differentiate the same stacked variables.
  """
  if mode not in MEMORY_MODES:
    raise ValueError(f"memory mode must be one of {MEMORY_MODES}, got {mode!r}.")
  count = stack_count(stacked)
  if not scan:
    steps = unstack(stacked, count)
    if mode not in ("store", "remat_wide"):
      return run_chain(mode, apply, inverse, steps, x, name=name, tolerance=tolerance,
                       inverse_vjp=inverse_vjp)
    if mode == "remat_wide":
      apply = jax.checkpoint(apply, policy=KEEP_WIDE)  # prevent_cse: no loop orders the steps
    log_det = jnp.zeros((x.shape[0],), jnp.float32)
    for k, variables in enumerate(steps):
      with jax.named_scope(step_names(k) if step_names else f"step{k}"):
        x, step_log_det = apply(variables, x)
      log_det = log_det + step_log_det
    return x, log_det
  if mode == "store":
    return _scan_forward(apply, stacked, x)
  if mode in ("remat", "remat_wide"):
    # "remat" saves nothing inside a step: the scan keeps its carries (the K step inputs) only.
    policy = jax.checkpoint_policies.nothing_saveable if mode == "remat" else KEEP_WIDE
    return _scan_forward(jax.checkpoint(apply, prevent_cse=False, policy=policy), stacked, x)
  chain = _scanned_invert_chain(apply, inverse, name, tolerance, inverse_vjp)
  return chain(stacked["params"], stacked["constants"], x)


def invert_stacked_chain(inverse: InverseFn, stacked: Any, y: Array, *, scan: bool) -> Array:
  """x_0 from x_K through the steps' inverses in reverse order (scanned or unrolled)."""
  if scan:
    return jax.lax.scan(lambda h, v: (inverse(v, h), None), y, stacked, reverse=True)[0]
  for variables in reversed(unstack(stacked, stack_count(stacked))):
    y = inverse(variables, y)
  return y


# (variables, x) -> (outputs, updated "constants"): a module applied as a pure function.
CallFn = Callable[[Any, Any], tuple[Any, Any]]


def remat_call(
    apply: CallFn, variables: Any, x: Any, token: Array
) -> tuple[Any, Any, Array]:
  """`apply(variables, x)` whose internals are recomputed in the backward pass, in order.

  What `jax.checkpoint` promises, made to hold on XLA:CPU: only `x` is kept; the backward pass
  re-runs `apply` and back-propagates through it. A chain of such calls threads `token` (a
  float32 scalar, numerically zero) from one call to the next: each call's backward pass
  starts `_after` its output cotangents and the token's cotangent exist, and hands back as the
  token's cotangent zero times its parameter gradients. So the recomputation of call i waits
  for every gradient of call i+1, and one call's internals are alive at a time, which an
  unrolled loop of `jax.checkpoint`s does not achieve on XLA:CPU (see the module docstring).

  `apply` returns (outputs, updated constants), e.g. BatchNorm running statistics updated in
  training mode; they are returned, not differentiated. Gradients flow to `variables["params"]`
  and to `x`. Returns (outputs, updated constants, the token for the next call).
  """

  @jax.custom_vjp
  def call(params, constants, x, token):
    outputs, updated = apply({"params": params, "constants": constants}, x)
    return outputs, updated, token

  def call_fwd(params, constants, x, token):
    return call(params, constants, x, token), (params, constants, x)

  def call_bwd(residuals, cotangents):
    params, constants, x = residuals
    g_outputs, _, g_token = cotangents
    x = _after(x, g_outputs, g_token)

    def differentiated(p, h):
      return apply({"params": p, "constants": constants}, h)[0]

    _, vjp = jax.vjp(differentiated, params, x)
    g_params, g_x = vjp(g_outputs)
    g_token = _after(jnp.zeros((), jnp.float32), g_params)
    return g_params, jax.tree.map(jnp.zeros_like, constants), g_x, g_token

  call.defvjp(call_fwd, call_bwd)
  return call(variables["params"], variables.get("constants", {}), x, token)


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
  pure functions of (variables, array). Gradients flow to every "params" leaf. `inverse_vjp`
  (optional, "invert" only) fuses a step's inverse with its VJP, so that work shared by the two
  (a coupling network evaluated on the unchanged half) runs once.
  """
  if mode not in MEMORY_MODES:
    raise ValueError(f"memory mode must be one of {MEMORY_MODES}, got {mode!r}.")
  if mode == "store":
    return _forward_loop(apply, step_variables, x)
  if mode == "remat_wide":
    return _forward_loop(jax.checkpoint(apply, policy=KEEP_WIDE), step_variables, x)
  chain = _chain(mode, apply, inverse, name, tolerance, inverse_vjp)
  return chain(
      [v["params"] for v in step_variables], [v["constants"] for v in step_variables], x
  )

