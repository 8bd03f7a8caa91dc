"""The kernel dispatcher (eiw_flow_jax.model.kernels): the XLA:CPU forms in programs compiled for
the CPU, the portable forms in programs compiled for anything else or with kernels="portable", the
same function and derivatives either way."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_config, perturb, random_uint8

from eiw_flow_jax.config import checks
from eiw_flow_jax.model import bijectors, kernels
from eiw_flow_jax.model.flow import build_flow
from eiw_flow_jax.training import run_config

# Glow's coupling network at the width where the CPU forms differ most from the portable one:
# (size 4) NHWC with both 3x3 convolutions as matmuls, (size 16) channels-first.
WIDE = 256


def _convolutions(text: str) -> int:
  return text.count("stablehlo.convolution")


def _net_and_params(size: int, hidden: int = WIDE, kernels_choice: str = "auto"):
  net = bijectors.CouplingNet(hidden=hidden, out_channels=4, kernels=kernels_choice)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 3))
  params = perturb(net.init(jax.random.PRNGKey(1), x), jax.random.PRNGKey(2))["params"]
  return net, params, x


def _loss(net):
  return lambda p, x: jnp.sum(jnp.sin(net.apply({"params": p}, x)))


@pytest.mark.parametrize("size", [4, 16])
def test_auto_and_portable_agree_in_value_and_gradient(size):
  auto, params, x = _net_and_params(size)
  portable = auto.clone(kernels="portable")
  np.testing.assert_allclose(auto.apply({"params": params}, x),
                             portable.apply({"params": params}, x), rtol=1e-4, atol=1e-4)
  got = jax.jit(jax.grad(_loss(auto), argnums=(0, 1)))(params, x)
  want = jax.jit(jax.grad(_loss(portable), argnums=(0, 1)))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * float(jnp.max(jnp.abs(b))))
  # Forward mode and vmap go through the platform choice too.
  tangent = jnp.ones_like(x)
  np.testing.assert_allclose(
      jax.jvp(lambda x: auto.apply({"params": params}, x), (x,), (tangent,))[1],
      jax.jvp(lambda x: portable.apply({"params": params}, x), (x,), (tangent,))[1],
      rtol=2e-3, atol=2e-3)
  batched = jax.vmap(lambda x: auto.apply({"params": params}, x[None])[0])(x)
  np.testing.assert_allclose(batched, portable.apply({"params": params}, x), rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize("size", [4, 16])
def test_portable_program_convolves_and_the_cpu_program_multiplies(size):
  """Lowered on CPU, kernels="portable" keeps the two 3x3 convolutions (forward) as
  convolutions, and their gradients too; kernels="auto" computes them as matmuls there."""
  if jax.default_backend() != "cpu":
    pytest.skip("the CPU forms are taken only in programs compiled for the CPU")
  auto, params, x = _net_and_params(size)
  portable = auto.clone(kernels="portable")

  def lowered(net, grad=False):
    fn = jax.grad(_loss(net), argnums=(0, 1)) if grad else (
        lambda p, x: net.apply({"params": p}, x))
    return jax.jit(fn).lower(params, x).as_text()

  assert _convolutions(lowered(portable)) == 2
  assert _convolutions(lowered(portable, grad=True)) == 2 + 4  # input and kernel gradients
  assert _convolutions(lowered(auto)) == _convolutions(lowered(auto, grad=True)) == 0
  assert "optimization_barrier" in lowered(auto, grad=True)  # the CPU forms' rules
  assert "optimization_barrier" not in lowered(portable, grad=True)


@pytest.mark.compiler_output
@pytest.mark.parametrize("size", [4, 16])
def test_compiled_cpu_program_has_no_platform_conditional(size):
  """One platform: one branch kept (the lowered text still selects it by a trivial case on the
  platform's index), and no conditional left once XLA has compiled it."""
  auto, params, x = _net_and_params(size)
  compiled = jax.jit(jax.grad(_loss(auto))).lower(params, x).compile().as_text()
  assert " conditional(" not in compiled


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_program_exported_for_another_platform_holds_only_the_portable_forms(platform):
  """What jax.default_backend() got wrong: a program lowered for another platform than the
  host's takes that platform's forms. Exported (jax.export) for `platform` from this CPU host,
  kernels="auto" lowers to the same convolutions as kernels="portable", with none of the CPU
  forms' barriers; exported for both the CPU and `platform`, it holds both forms behind the
  platform's index."""
  auto, params, x = _net_and_params(16)
  loss = jax.jit(jax.grad(_loss(auto), argnums=(0, 1)))
  portable = jax.jit(jax.grad(_loss(auto.clone(kernels="portable")), argnums=(0, 1)))

  def exported(fn, platforms):
    return jax.export.export(fn, platforms=platforms)(params, x).mlir_module()

  there = exported(loss, [platform])
  assert _convolutions(there) == _convolutions(exported(portable, [platform])) >= 6
  assert "optimization_barrier" not in there
  both = exported(loss, ["cpu", platform])
  assert "optimization_barrier" in both and _convolutions(both) >= 6


def test_eager_calls_take_the_default_devices_form():
  """Outside jit the choice is made at once, for the platform the arrays live on."""
  x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
  seen = []
  out = kernels.platform_dependent(
      x, w, cpu=lambda x, w: seen.append("cpu") or x @ w,
      portable=lambda x, w: seen.append("portable") or x @ w)
  np.testing.assert_array_equal(out, x @ w)
  assert seen == ["cpu" if jax.default_backend() == "cpu" else "portable"]
  seen.clear()
  kernels.platform_dependent(x, w, cpu=lambda x, w: seen.append("cpu") or x @ w,
                             portable=lambda x, w: seen.append("portable") or x @ w,
                             kernels="portable")
  assert seen == ["portable"]


def test_bad_kernels_choice_is_one_clear_error():
  with pytest.raises(ValueError, match=r"kernels must be one of \('auto', 'portable'\), got 'x'"):
    kernels.platform_dependent(jnp.ones(2), cpu=jnp.sin, portable=jnp.sin, kernels="x")


def test_model_kernels_config_reaches_every_coupling_network():
  """config.model.kernels="portable": the whole Glow's loss-and-gradient, lowered on CPU, holds
  a convolution for each of its 3x3 convolutions; "auto" computes the wide ones as matmuls."""
  config = make_config(image_shape=(8, 8, 1), num_levels=2, steps=1, hidden=WIDE)
  assert config.model.kernels == "auto"
  texts = {}
  y = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1))
  for choice in ("auto", "portable"):
    config.model.kernels = choice
    flow = build_flow(config)
    variables = flow.init(jax.random.PRNGKey(1), random_uint8((2, 8, 8, 1)))

    def loss(params, flow=flow, variables=variables):
      return jnp.sum(flow.forward({**variables, "params": params}, y)[1])

    texts[choice] = jax.jit(jax.grad(loss)).lower(variables["params"]).as_text()
  assert _convolutions(texts["portable"]) > _convolutions(texts["auto"])
  if jax.default_backend() == "cpu":
    assert "optimization_barrier" in texts["auto"]


def test_config_validates_kernels():
  config = make_config()
  config.model.kernels = "fast"
  with pytest.raises(checks.ConfigError,
                     match=r"model.kernels must be one of \('auto', 'portable'\), got 'fast'"):
    run_config.validate_config(config)


@pytest.mark.parametrize("name", [None, kernels.COUPLING_WIDE])
def test_relu_is_nn_relu_in_value_and_derivatives(name):
  """kernels.relu writes its derivative on its output (for memory="remat_wide"): the same
  function and the same derivative as nn.relu everywhere, 0 at 0 included, in both modes."""
  x = jnp.array([-2.0, -1e-30, 0.0, 1e-30, 3.0, jnp.nan])
  tangent = jnp.arange(1.0, 7.0)

  def relu(v):
    return kernels.relu(v, name)

  np.testing.assert_array_equal(relu(x), jax.nn.relu(x))
  np.testing.assert_array_equal(jax.jvp(relu, (x,), (tangent,))[1],
                                jax.jvp(jax.nn.relu, (x,), (tangent,))[1])
  np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(relu(v) * tangent))(x),
                                jax.grad(lambda v: jnp.sum(jax.nn.relu(v) * tangent))(x))


def test_resolve_turns_auto_into_the_one_form_of_a_platform():
  assert kernels.resolve("auto", "cpu") == kernels.AUTO_CPU
  assert kernels.resolve("auto", "tpu") == kernels.resolve("auto", "gpu") == kernels.AUTO_PORTABLE
  assert kernels.resolve("portable", "cpu") == "portable"
  assert kernels.resolve(kernels.AUTO_CPU, "tpu") == kernels.AUTO_CPU
  with pytest.raises(ValueError, match=r"kernels must be one of \('auto', 'portable'\), got 'x'"):
    kernels.resolve("x", "cpu")
  # Each resolved choice traces its form alone (in a one-branch conditional), inside jit too.
  for choice, traced, untraced in ((kernels.AUTO_CPU, "cos", "sin"),
                                   (kernels.AUTO_PORTABLE, "sin", "cos")):
    jaxpr = str(jax.make_jaxpr(lambda x, choice=choice: kernels.platform_dependent(
        x, cpu=jnp.cos, portable=jnp.sin, kernels=choice))(jnp.ones(3)))
    assert traced in jaxpr and untraced not in jaxpr
    np.testing.assert_allclose(
        jax.jit(lambda x, choice=choice: kernels.platform_dependent(
            x, cpu=jnp.cos, portable=jnp.sin, kernels=choice))(jnp.ones(3)),
        getattr(jnp, traced)(jnp.ones(3)))


def _flow_loss(flow, variables, x):
  """The flow's training loss as a function of its parameters, differentiated."""
  return jax.value_and_grad(lambda params: flow.loss(
      {**variables, "params": params}, x, jax.random.PRNGKey(0))[0])


def test_a_flow_for_one_platform_traces_one_form_and_computes_the_same():
  """Flow.for_platform (what the train, eval and sampling steps trace, for their mesh's
  platform): no two-way platform conditional left, the CPU forms for "cpu" and the
  convolutions for the others, and the same loss and gradient as the flow that chooses when
  lowered."""
  config = make_config(image_shape=(8, 8, 1), num_levels=2, steps=1, hidden=WIDE)
  flow = build_flow(config)
  x = random_uint8((2, 8, 8, 1))
  variables = perturb(flow.init(jax.random.PRNGKey(1), x), jax.random.PRNGKey(2))
  params = variables["params"]
  on_cpu, on_tpu = flow.for_platform("cpu"), flow.for_platform("tpu")
  assert on_cpu.model_config.kernels == kernels.AUTO_CPU
  assert on_tpu.model_config.kernels == kernels.AUTO_PORTABLE
  assert on_tpu.for_platform("tpu") is on_tpu
  assert flow.model_config.kernels == "auto"  # the flow it came from is unchanged
  two_way = "platform_index[platforms=(('cpu',), None)]"
  assert two_way in str(jax.make_jaxpr(_flow_loss(flow, variables, x))(params))
  texts = {}
  for name, one in (("cpu", on_cpu), ("tpu", on_tpu)):
    assert two_way not in str(jax.make_jaxpr(_flow_loss(one, variables, x))(params))
    texts[name] = jax.jit(_flow_loss(one, variables, x)).lower(params).as_text()
  assert _convolutions(texts["tpu"]) > _convolutions(texts["cpu"])
  want = jax.jit(_flow_loss(flow, variables, x))(params)
  for one in (on_cpu, on_tpu):
    got = jax.jit(_flow_loss(one, variables, x))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * float(jnp.max(jnp.abs(b))))
