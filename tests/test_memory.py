"""config.model.memory ("store" / "remat" / "invert" / "remat_wide") and config.model.dtype (mixed
precision)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ON_PINNED_COMPILER, VARIANTS, make_config, perturb, random_uint8
from jax.extend.core import jaxprs_in_params

import eiw_flow_jax
from eiw_flow_jax.model import kernels, memory


def _loss_and_grads(config, mode, variables=None, x=None, dtype="float32", scan=True):
  config.model.memory = mode
  config.model.dtype = dtype
  config.model.scan_steps = scan
  flow = eiw_flow_jax.build_flow(config)
  if x is None:
    x = random_uint8((2, *config.model.image_shape), seed=0)
  if variables is None:
    # Data-dependent ActNorm init works under every memory mode (it runs the modules).
    variables = perturb(flow.init(jax.random.PRNGKey(0), x), jax.random.PRNGKey(1), 0.05)

  def loss(params):
    return flow.loss({**variables, "params": params}, x, jax.random.PRNGKey(2))[0]

  value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  return value, grads, variables, x


_CASES = [(*v, "affine") for v in VARIANTS] + [
    ("vanilla", "global", "additive"),
    pytest.param("eiw", "global", "additive", marks=pytest.mark.slow),
    pytest.param("eiw", "per_example", "additive", marks=pytest.mark.slow),
]


def _config(split="vanilla", mode="global", coupling="affine"):
  config = make_config((8, 8, 1), num_levels=2, steps=2, hidden=4, split=split, mode=mode)
  config.model.coupling = coupling
  return config


@functools.cache
def _store(split, mode, coupling):
  """The reference: plain autodiff of the unrolled steps."""
  return _loss_and_grads(_config(split, mode, coupling), "store", scan=False)


@pytest.mark.parametrize("split,mode,coupling", _CASES)
def test_every_memory_mode_scanned_or_unrolled_gives_the_unrolled_gradients(
    split, mode, coupling):
  # Every split variant with the affine coupling; the additive coupling with the vanilla split
  # (the coupling and the split are independent code; all six pairs run with -m slow).
  config = _config(split, mode, coupling)
  loss, grads, variables, x = _store(split, mode, coupling)
  others = [("store", True), ("remat", True), ("invert", True), ("remat_wide", True),
            ("remat", False), ("invert", False), ("remat_wide", False)]
  for other, scan in others:
    other_loss, other_grads, _, _ = _loss_and_grads(config, other, variables, x, scan=scan)
    np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    other_flat = jax.tree.leaves(other_grads)
    assert len(flat) == len(other_flat)
    for (path, g), h in zip(flat, other_flat):
      scale = max(1.0, float(jnp.max(jnp.abs(g))))
      np.testing.assert_allclose(
          h, g, atol=2e-5 * scale, rtol=1e-4,
          err_msg=f"{other}, scan={scan}: {jax.tree_util.keystr(path)}"
      )


@pytest.mark.parametrize("kernels", ["portable", "auto"])
def test_remat_wide_keeps_the_coupling_nets_wide_activation_and_output(kernels, capsys):
  """memory="remat_wide" (memory.KEEP_WIDE): of a step's internals the backward pass gets the
  coupling network's 1x1-layer output (hidden width) and its output from the forward; all else
  (ActNorm, the 1x1 flow convolution, the first layer, the coupling) it recomputes."""
  step = eiw_flow_jax.model.bijectors.FlowStep(16, "affine", None, kernels)
  x = jnp.ones((2, 8, 8, 4))
  variables = step.init(jax.random.PRNGKey(0), x)
  constants = variables["constants"]

  def loss(params, x):
    return step.apply({"params": params, "constants": constants}, x)[0].sum()

  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(
      jax.checkpoint(loss, policy=memory.KEEP_WIDE), variables["params"], x)
  kept = capsys.readouterr().out.splitlines()
  activations = sorted(line.split()[0] for line in kept if line.startswith("f32[2,"))
  # The step's input; the output (2 x 2 channels); the wide activation (16 channels).
  assert activations == ["f32[2,8,8,16]", "f32[2,8,8,4]", "f32[2,8,8,4]"], kept
  if kernels == "portable":  # (under "auto", the outputs of the platform dispatch)
    assert any("named 'coupling_net_wide'" in line for line in kept), kept


def _products(jaxpr) -> int:
  """Matmuls and convolutions in a jaxpr, its sub-jaxprs included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name in ("dot_general", "conv_general_dilated")
    for sub in jaxprs_in_params(eqn.params):
      count += _products(sub)
  return count


def test_remat_wide_recomputes_no_wide_layer(monkeypatch):
  """kernels.relu's derivative reads its output, which remat_wide keeps: the backward pass
  recomputes the first layer only, where `nn.relu`'s rule, on its input, would have it
  recompute the 1x1 layer too."""
  step = eiw_flow_jax.model.bijectors.FlowStep(16, "affine", None, "portable")
  x = jnp.ones((2, 8, 8, 4))
  variables = step.init(jax.random.PRNGKey(0), x)

  def products() -> int:
    def loss(params, x):
      return step.apply({"params": params, "constants": variables["constants"]}, x)[0].sum()
    grad = jax.grad(jax.checkpoint(loss, policy=memory.KEEP_WIDE))
    return _products(jax.make_jaxpr(grad)(variables["params"], x).jaxpr)

  kept = products()
  monkeypatch.setattr(kernels, "relu", lambda x, name=None: jax.nn.relu(x))
  assert kept == products() - 1


def test_invert_init_matches_store_init():
  # Data-dependent ActNorm init runs the modules whatever the memory mode.
  config = _config()
  x = random_uint8((4, 8, 8, 1))
  store = eiw_flow_jax.build_flow(config).init(jax.random.PRNGKey(0), x)
  config.model.memory = "invert"
  invert = eiw_flow_jax.build_flow(config).init(jax.random.PRNGKey(0), x)
  jax.tree.map(np.testing.assert_array_equal, store, invert)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("memory", "checkpoint", r"model.memory must be one of \('store', 'remat', 'invert', "
         r"'remat_wide'\), got 'checkpoint'"),
        ("dtype", "float64",
         r"model.dtype must be one of \('auto', 'float32', 'bfloat16', 'float16'\)"),
        ("invert_tolerance", 0.0, "model.invert_tolerance must be a number > 0, got 0.0"),
    ],
)
def test_bad_memory_and_dtype_values(field, value, match):
  config = make_config()
  config.model[field] = value
  with pytest.raises(ValueError, match=match):
    eiw_flow_jax.build_flow(config)


@pytest.mark.parametrize("scan", [True, False])
def test_invert_falls_back_and_warns_when_the_inverse_drifts(scan):
  """A tolerance below float32 round-off forces the fallback: gradients stay exact."""
  config = _config()
  _, grads, variables, x = _store("vanilla", "global", "affine")
  config.model.invert_tolerance = 1e-12
  before = len(memory.drift_warnings)
  _, fallback_grads, _, _ = _loss_and_grads(config, "invert", variables, x, scan=scan)
  jax.effects_barrier()
  assert len(memory.drift_warnings) > before
  name, drift = memory.drift_warnings[-1]
  assert name.startswith("level ") and drift > 1e-12
  for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(fallback_grads)):
    np.testing.assert_allclose(h, g, atol=2e-5 * max(1.0, float(jnp.max(jnp.abs(g)))), rtol=1e-4)


@pytest.mark.parametrize("coupling,dtype", [("affine", "float32"), ("additive", "float32"),
                                             ("affine", "bfloat16")])
def test_fused_step_inverse_vjp_matches_vjp_at_the_true_input(coupling, dtype):
  """FlowStep.inverse_vjp (the coupling network once per step) == inverse, then jax.vjp.

  In bfloat16 XLA:CPU may round the coupling network's intermediates differently in the two
  compiled graphs, so the rebuilt input is exact only to bfloat16 precision there.
  """
  from eiw_flow_jax.model.bijectors import FlowStep

  step = FlowStep(8, coupling, jnp.dtype(dtype), parent=None)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 6))
  variables = perturb(step.init(jax.random.PRNGKey(1), x), jax.random.PRNGKey(2), 0.1)
  y, log_det = step.apply(variables, x)
  g_y = jax.random.normal(jax.random.PRNGKey(3), y.shape)
  g_log_det = jax.random.normal(jax.random.PRNGKey(4), log_det.shape)
  rebuilt, g_params, g_x = jax.jit(step.inverse_vjp)(
      variables, y, g_y, g_log_det
  )
  tol = 1e-4 if dtype == "float32" else 3e-2
  np.testing.assert_allclose(rebuilt, x, atol=tol)
  _, vjp = jax.vjp(lambda p, h: step.apply({**variables, "params": p}, h), variables["params"], x)
  want_params, want_x = vjp((g_y, g_log_det))
  np.testing.assert_allclose(g_x, want_x, atol=tol, rtol=tol)
  assert jax.tree.structure(g_params) == jax.tree.structure(want_params)
  for got, want in zip(jax.tree.leaves(g_params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, want, atol=tol * max(1.0, float(jnp.max(jnp.abs(want)))),
                               rtol=10 * tol)


@pytest.mark.parametrize("channels", [1, 3, 12, 48, 100])
def test_lower_triangular_inverse_matches_triangular_solve(channels):
  from eiw_flow_jax.model.bijectors import lower_triangular_inverse

  rng = np.random.RandomState(channels)
  lower = np.tril(rng.randn(channels, channels) * 0.1, -1) + np.diag(
      np.exp(rng.randn(channels) * 0.3) * rng.choice([-1.0, 1.0], channels))
  lower = jnp.asarray(lower, jnp.float32)
  got = jax.jit(lower_triangular_inverse)(lower)
  want = jax.scipy.linalg.solve_triangular(lower, jnp.eye(channels), lower=True)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
  assert np.all(np.triu(np.asarray(got), 1) == 0)


@pytest.mark.compiler_output
@pytest.mark.parametrize("scan", [True, False])
def test_remat_and_invert_keep_temporary_memory_flat(scan):
  """The backward's recomputations are ordered one step at a time (XLA:CPU schedules freely).

  Compiled only, never run: XLA's memory analysis of loss-and-gradient at K=8. Without the
  data dependencies of memory._after the unrolled loops measured as much as "store"; a scan
  orders its steps by itself.
  """
  temps = {}
  for mode in memory.MEMORY_MODES:
    config = make_config((16, 16, 3), num_levels=2, steps=8, hidden=32)
    config.model.memory = mode
    config.model.scan_steps = scan
    flow = eiw_flow_jax.build_flow(config)
    x = jax.ShapeDtypeStruct((16, 16, 16, 3), jnp.uint8)
    v = jax.eval_shape(flow.init, jax.random.PRNGKey(0), x)

    def loss(p, c, x, flow=flow):
      return flow.loss({"params": p, "constants": c}, x, jax.random.PRNGKey(0))[0]

    compiled = jax.jit(jax.value_and_grad(loss)).lower(v["params"], v["constants"], x).compile()
    temps[mode] = compiled.memory_analysis().temp_size_in_bytes
  # Measured (store / remat / invert): 11.2 / 1.7 / 2.2 MiB unrolled over separate per-step
  # variables; 9.2 / 2.3 / 3.1 MiB unrolled over slices of the stacked variables (the slices,
  # and the per-step gradients concatenated into the stack's, are extra buffers at this tiny
  # width); scanned 6.9 / 1.3 / 1.4 MiB.
  bound = 0.3 if scan else 0.4
  assert temps["remat"] < bound * temps["store"], temps
  assert temps["invert"] < bound * temps["store"], temps


def test_remat_call_chain_matches_autodiff_and_recomputes_one_call_at_a_time():
  """memory.remat_call: a chain of calls threading the token gives autodiff's gradients and
  returns the updated constants; its temporaries stay near one call's while plain autodiff's
  (and an unrolled loop of jax.checkpoint's, on XLA:CPU) grow with the chain."""
  width, calls = 512, 8

  def apply(variables, x):
    hidden = jnp.tanh(x @ variables["params"]["w1"])
    for _ in range(3):
      hidden = jnp.tanh(hidden * 1.01 + variables["constants"]["shift"])
    out = x + hidden @ variables["params"]["w2"]
    return out, {"shift": variables["constants"]["shift"] + jnp.mean(hidden)}

  keys = jax.random.split(jax.random.PRNGKey(0), 2 * calls + 1)
  params = [{"w1": 0.1 * jax.random.normal(keys[2 * i], (32, width)),
             "w2": 0.1 * jax.random.normal(keys[2 * i + 1], (width, 32))} for i in range(calls)]
  constants = [{"shift": jnp.full((width,), 0.01 * i)} for i in range(calls)]
  x = jax.random.normal(keys[-1], (256, 32))

  def loss(params, x, remat):
    token, updated = jnp.zeros(()), []
    for p, c in zip(params, constants):
      if remat:
        x, new, token = memory.remat_call(apply, {"params": p, "constants": c}, x, token)
      else:
        x, new = apply({"params": p, "constants": c}, x)
      updated.append(new)
    return jnp.sum(x**2), updated

  temp, results = {}, {}
  for remat in (False, True):
    grad = jax.jit(jax.grad(functools.partial(loss, remat=remat), argnums=(0, 1),
                            has_aux=True))
    compiled = grad.lower(params, x).compile()
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    results[remat] = compiled(params, x)
  # Float32 round-off relative to each leaf's scale (the gradients here reach ~1e3).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(a).max()))), results[False], results[True])
  if ON_PINNED_COMPILER:  # XLA's buffer sizes: checked on the pinned jaxlib only
    one_call_hidden = x.shape[0] * width * 4
    assert temp[False] > calls * one_call_hidden, temp  # autodiff keeps every call's hidden
    assert temp[True] < 0.5 * temp[False], temp


def test_run_chain_rejects_unknown_mode():
  with pytest.raises(ValueError, match="memory mode must be one of"):
    memory.run_chain("swap", lambda v, x: (x, x[:, 0]), lambda v, y: y, [], jnp.zeros((1, 2)))


# ---- mixed precision -----------------------------------------------------------------------


def _digits(n: int) -> jax.Array:
  from sklearn.datasets import load_digits

  images = load_digits().images[:n].astype(np.uint8)  # values 0..16: the 5-bit grid
  return jnp.asarray(images[..., None])


def _digits_config(dtype: str):
  config = make_config((8, 8, 1), num_levels=2, steps=2, hidden=16, n_bits=5)
  config.model.dtype = dtype
  return config


def _train(dtype: str, steps: int, variables=None):
  """Adam on the first 512 digits, batch 64; returns (flow, variables, bpd per step)."""
  import optax

  flow = eiw_flow_jax.build_flow(_digits_config(dtype))
  x = _digits(512)
  if variables is None:
    variables = flow.init(jax.random.PRNGKey(0), x[:256])
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, batch, key):
    def loss(p):
      return flow.loss({**variables, "params": p}, batch, key)[0]

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  params, opt_state, losses = variables["params"], tx.init(variables["params"]), []
  for i in range(steps):
    batch = x[(i % 8) * 64 : (i % 8 + 1) * 64]
    params, opt_state, value = step(params, opt_state, batch, jax.random.PRNGKey(i))
    losses.append(float(value))
  return flow, {**variables, "params": params}, losses


@functools.cache
def _trained_float32():
  return _train("float32", 60)


@pytest.mark.parametrize("dtype,tolerance", [("bfloat16", 0.02), ("float16", 0.005)])
def test_mixed_precision_log_likelihood_matches_float32(dtype, tolerance):
  """Same trained float32 weights, coupling networks in `dtype`: mean bpd within `tolerance`."""
  flow32, variables, losses = _trained_float32()
  assert losses[-1] < losses[0] - 0.5  # the model did train
  flow = eiw_flow_jax.build_flow(_digits_config(dtype))
  x, key = _digits(512)[256:], jax.random.PRNGKey(7)
  bpd32 = jax.jit(flow32.bpd)(variables, x, key)
  bpd = jax.jit(flow.bpd)(variables, x, key)
  # Parameters, log-determinants and the loss stay float32.
  assert bpd.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  assert abs(float(jnp.mean(bpd)) - float(jnp.mean(bpd32))) < tolerance
  assert not np.allclose(bpd, bpd32, rtol=0, atol=1e-7)  # the low precision did take effect


@pytest.mark.slow
def test_bfloat16_training_converges_like_float32():
  _, _, losses32 = _trained_float32()
  flow = eiw_flow_jax.build_flow(_digits_config("float32"))
  variables = flow.init(jax.random.PRNGKey(0), _digits(256))
  _, trained, losses = _train("bfloat16", 60, variables)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(trained["params"]))
  start, end32, end16 = losses[0], np.mean(losses32[-8:]), np.mean(losses[-8:])
  assert end16 < start - 0.5, (start, end16)
  assert abs(end16 - end32) < 0.1, (end32, end16)
