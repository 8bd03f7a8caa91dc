"""float64 honoured: under jax_enable_x64 the model computes in its inputs' dtype (model.dtype
"auto", Flax's dtype=None), so log-determinants match an independent float64 Jacobian far below
float32 round-off; float32 inputs still compute in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import log_abs_det_jacobian, make_config, perturb, random_uint8

from eiw_flow_jax.model import shapes
from eiw_flow_jax.model.flow import build_flow

SHAPE = (4, 4, 2)  # two levels of a tiny Glow: a 32x32 Jacobian


def _flow(kernels="auto", dtype="auto", hidden=8, split="eiw"):
  config = make_config(image_shape=SHAPE, num_levels=2, steps=1, hidden=hidden, split=split)
  config.model.kernels = kernels
  config.model.dtype = dtype
  flow = build_flow(config)
  variables = flow.init(jax.random.PRNGKey(0), random_uint8((4, *SHAPE)))
  return flow, perturb(variables, jax.random.PRNGKey(1), 0.1)


@pytest.mark.parametrize("kernels,split", [("auto", "eiw"), ("portable", "vanilla")])
def test_glow_log_det_is_the_float64_jacobians_under_x64(kernels, split):
  with jax.enable_x64(True):
    flow, variables = _flow(kernels, split=split)
    y = jax.random.uniform(jax.random.PRNGKey(2), (2, *SHAPE), jnp.float64)
    latents, log_det, log_prior, _ = flow.forward(variables, y)
    assert log_det.dtype == log_prior.dtype == jnp.float64
    assert {z.dtype for z in latents} == {jnp.dtype(jnp.float64)}

    def flat_latents(y_single):
      out = flow.module.apply(variables, y_single[None], method="forward")[0]
      return jnp.concatenate([z.reshape(-1) for z in out])

    for i in range(2):
      expected = log_abs_det_jacobian(flat_latents, y[i])
      assert expected.dtype == jnp.float64
      np.testing.assert_allclose(log_det[i], expected, rtol=1e-10)


def test_explicit_dtype_casts_the_coupling_networks_under_x64():
  """model.dtype="float32" under x64: the coupling networks compute in float32 (log-dets agree
  with the float64 Jacobian only to float32 round-off), the rest stays float64."""
  with jax.enable_x64(True):
    flow, variables = _flow(dtype="float32")
    y = jax.random.uniform(jax.random.PRNGKey(2), (2, *SHAPE), jnp.float64)
    _, log_det, _, _ = flow.forward(variables, y)
    assert log_det.dtype == jnp.float64
    text = jax.jit(lambda y: flow.forward(variables, y)).lower(y).as_text()
    assert "tensor<2x2x2x8xf32>" in text  # a coupling network's hidden activations


def test_float32_inputs_compute_in_float32_by_default():
  config = make_config()
  assert config.model.dtype == "auto" and shapes.compute_dtype(config.model) is None
  flow, variables = _flow()
  y = jax.random.uniform(jax.random.PRNGKey(2), (2, *SHAPE))
  latents, log_det, log_prior, _ = flow.forward(variables, y)
  assert log_det.dtype == log_prior.dtype == jnp.float32
  assert {z.dtype for z in latents} == {jnp.dtype(jnp.float32)}
  text = jax.jit(lambda y: flow.forward(variables, y)).lower(y).as_text()
  assert "f64" not in text and "bf16" not in text


@pytest.mark.parametrize("scan", [True, False])
def test_remat_wide_gradients_are_stores_under_x64(scan):
  """memory="remat_wide" (a step recomputed but for its coupling network's kept values, and
  kernels.relu's derivative on its output) differentiates the same function as "store": the
  float64 gradients of the log-likelihood agree to 1e-10."""
  with jax.enable_x64(True):
    y = jax.random.uniform(jax.random.PRNGKey(2), (2, *SHAPE), jnp.float64)
    grads = {}
    for memory in ("store", "remat_wide"):
      config = make_config(image_shape=SHAPE, num_levels=2, steps=2, hidden=8, split="vanilla")
      config.model.memory, config.model.scan_steps = memory, scan
      flow = build_flow(config)
      variables = perturb(flow.init(jax.random.PRNGKey(0), random_uint8((4, *SHAPE))),
                          jax.random.PRNGKey(1), 0.1)
      variables = jax.tree.map(  # float64 parameters: float64 gradients
          lambda v: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v,
          variables)

      def log_likelihood(params, flow=flow, variables=variables):
        _, log_det, log_prior, _ = flow.forward({**variables, "params": params}, y)
        return jnp.sum(log_det + log_prior)

      grads[memory] = jax.grad(log_likelihood)(variables["params"])
    leaves = jax.tree.leaves(grads["store"])
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float64)}
    for got, want in zip(jax.tree.leaves(grads["remat_wide"]), leaves):
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
