"""The DenseFlow backbone: bijectors invert and their log-dets are the Jacobian's, a tiny model
round-trips through the Flow API, and bad configs fail with clear errors."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ON_PINNED_COMPILER
from test_configs import load_config

from eiw_flow_jax.config import checks, schema
from eiw_flow_jax.model.backbones import dense_bijectors as db
from eiw_flow_jax.model.backbones import denseflow_torch
from eiw_flow_jax.model.backbones.dense_dequantizer import VariationalDequantizer
from eiw_flow_jax.model.backbones.denseflow import (
  DenseUnit,
  Transition,
  authors_weight_bits,
  authors_weight_ties,
)
from eiw_flow_jax.model.flow import DenseFlow, build_flow
from eiw_flow_jax.training import run_config

DENSEFLOW_CONFIGS = ["cifar10_denseflow", "imagenet32_denseflow", "imagenet64_denseflow",
                     "celeba_denseflow"]


def log_det_by_jacobian(fn, x):
  """log |det d fn(x) / dx| per example: the diagonal blocks of the batch's dense Jacobian
  (examples do not interact), computed in one jitted jacfwd."""
  b, d = x.shape[0], x[0].size

  @jax.jit
  def blocks(x):
    jac = jax.jacfwd(lambda v: fn(v.reshape(x.shape)).reshape(-1))(x.reshape(-1))
    jac = jac.reshape(b, d, b, d)
    return jnp.stack([jnp.linalg.slogdet(jac[i, :, i, :])[1] for i in range(b)])

  return blocks(x)


def randomise(params, seed=0, scale=0.3):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(
      tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.mark.parametrize("make", [
    lambda: db.ActNorm(),
    lambda: db.Conv1x1(),
    lambda: db.AffineCoupling(4, 1, 4, multihead=True),
    lambda: DenseUnit(2, 4, 1, 4),
], ids=["actnorm", "conv1x1", "coupling", "unit"])
def test_bijector_inverts_and_log_det_matches_jacobian(make):
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 2, 5))
  module = make()
  variables = module.init(jax.random.PRNGKey(2), x)
  # Move off the (data-dependent / zero) initial values so every path counts.
  variables = dict(variables, params=randomise(variables["params"]))
  y, log_det = jax.jit(module.apply)(variables, x)
  if isinstance(module, DenseUnit):
    back = jax.jit(lambda v, y: module.apply(v, y, method="inverse"))(variables, y)
  else:
    back, inv_log_det = jax.jit(lambda v, y: module.apply(v, y, reverse=True))(variables, y)
    np.testing.assert_allclose(inv_log_det, -log_det, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(back, x, atol=2e-4)
  expected = log_det_by_jacobian(lambda v: module.apply(variables, v)[0], x)
  np.testing.assert_allclose(log_det, expected, rtol=1e-4, atol=2e-3)


def test_squeeze_switch_and_transition_invert():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  np.testing.assert_array_equal(db.unsqueeze2d(db.squeeze2d(x)), x)
  # The authors' channel order: out channel 4 c + 2 i + j holds x[2h + i, 2w + j, c].
  z = db.squeeze2d(x)
  np.testing.assert_array_equal(z[:, 0, 0, 4 * 2 + 2 * 1 + 0], x[:, 1, 0, 2])
  for c in (4, 5):
    v = jnp.arange(c, dtype=jnp.float32)[None, None, None]
    np.testing.assert_array_equal(db.switch_channels(db.switch_channels(v), reverse=True), v)
  module = Transition(12, reduction=4)
  variables = module.init(jax.random.PRNGKey(1), x)
  kept, factored, log_prior, reg = jax.jit(module.apply)(variables, x)
  assert kept.shape == factored.shape == (2, 2, 2, 6)
  np.testing.assert_allclose(log_prior, db.std_normal_log_prob(factored), rtol=1e-6)
  assert reg.shape == (2,)
  np.testing.assert_allclose(module.apply(variables, kept, factored, method="inverse"), x)


def test_authors_weight_bits_are_float32_softmax_with_subnormals():
  """Against numpy's float32 softmax as torch computes it (exp(l - max) * (1 / sum)), which
  keeps subnormals: the same exact ties, values within a few ulps (exp and sum differ)."""
  assert np.float32(2.0**-149) > 0 and np.exp(np.float32(-100.0)) > 0  # no flushing here
  rng = np.random.RandomState(0)
  bits_fn = jax.jit(authors_weight_bits)
  subnormals = zeros = 0
  for trial in range(48):
    spread = [1.0, 30.0, 100.0, 300.0][trial % 4]
    logits = (spread * rng.randn(96)).astype(np.float32)
    if trial % 3 == 0:  # exact logit ties
      logits[:24] = logits[24:48]
    e = np.exp(logits - logits.max())
    expected = (e * (np.float32(1.0) / e.sum(dtype=np.float32))).view(np.int32)
    got = np.asarray(bits_fn(jnp.asarray(logits)))
    np.testing.assert_array_equal(got[:, None] == got[None, :],
                                  expected[:, None] == expected[None, :])
    assert np.abs(got.astype(np.int64) - expected).max() <= 8
    subnormals += int(np.sum((expected > 0) & (expected < 2**23)))
    zeros += int(np.sum(expected == 0))
  assert subnormals > 50 and zeros > 500  # the ranges that matter were exercised


def saturated_transition(logits):
  """A Transition whose weight generator has the given logits (relu(C w1) = e_0)."""
  channels = len(logits)
  module = Transition(channels, reduction=4)
  x = jnp.zeros((1, 2, 2, channels // 4))
  params = dict(module.init(jax.random.PRNGKey(0), x)["params"])
  params["wg_fc0"] = jnp.zeros((1, channels // 2)).at[0, 0].set(1.0 / channels)
  params["wg_fc2"] = jnp.zeros((channels // 2, channels)).at[0].set(jnp.asarray(logits))
  return module, {"params": params}, x


def test_channel_order_is_the_logits_not_the_flushed_weights():
  # Weights e^-90 .. e^-120 are float32 subnormals or zeros; the logits still order them.
  logits = [0.0, -120.0, -110.0, -100.0, -95.0, -90.0, -1.0, -2.0]
  module, variables, _ = saturated_transition(logits)
  perm = module.apply(variables, method="permutation")
  np.testing.assert_array_equal(perm, [0, 6, 7, 5, 4, 3, 2, 1])
  g = module.apply(variables, method="weights")
  np.testing.assert_allclose(float(jnp.sum(g)), 1.0, rtol=1e-6)  # the regulariser's weights
  # In torch's float32: e^-90, e^-95, e^-100 distinct subnormals, e^-110 and e^-120 both 0.
  ties = jax.device_get(authors_weight_ties(jnp.asarray(logits)))
  assert ties == {"authors_tied_channels": 2, "authors_tied_kept_channels": 0,
                  "authors_ties_cross_split": 0}


@pytest.mark.parametrize("logits,expected", [
    # Five zeros, one of them kept: which one is torch's choice.
    ([0.0, -200.0, -200.0, -300.0, -250.0, -400.0, -1.0, -2.0], (5, 1, 1)),
    # Six zeros: two kept, tied with each other and with four factored.
    ([0.0, -200.0, -200.0, -300.0, -250.0, -400.0, -220.0, -2.0], (6, 2, 1)),
    # No underflow at all.
    ([0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0], (0, 0, 0)),
    # Exact logit ties among normal weights, all kept.
    ([0.0, 0.0, -2.0, -2.0, -40.0, -50.0, -60.0, -70.0], (4, 4, 0)),
], ids=["cross", "kept", "none", "logit_ties"])
def test_authors_weight_ties_say_where_the_authors_order_is_undefined(logits, expected):
  module, variables, x = saturated_transition(logits)
  stats = jax.device_get(module.apply(variables, x, method="diagnostics"))
  got = (stats["authors_tied_channels"], stats["authors_tied_kept_channels"],
         stats["authors_ties_cross_split"])
  assert tuple(int(v) for v in got) == expected


def test_variational_dequantizer_log_q_is_a_change_of_variables():
  """log q(u | x) = log N(eps) - log |det du / deps| for the map eps -> u (a bijection)."""
  module = VariationalDequantizer(n_bits=5, num_steps=1, context_channels=4, mid_channels=4,
                                  depth=1, growth=4, context_growth=4, context_depth=1)
  x = jax.random.randint(jax.random.PRNGKey(0), (2, 4, 4, 1), 0, 32).astype(jnp.uint8)
  eps = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 2, 4))
  variables = module.init(jax.random.PRNGKey(2), x, eps)
  variables = {"params": randomise(variables["params"], scale=0.2)}
  u, log_q = jax.jit(module.apply)(variables, x, eps)
  assert bool(jnp.all((u > 0) & (u < 1)))
  log_det = log_det_by_jacobian(lambda e: module.apply(variables, x, e)[0], eps)
  np.testing.assert_allclose(log_q, db.std_normal_log_prob(eps) - log_det, rtol=1e-4, atol=2e-3)


def test_dense_block_scanned_layers_are_its_layers_one_by_one():
  """`DenseBlock(scan_layers=True)` (the dequantizer's context networks): its layers padded to
  the widest and scanned give the values and gradients of the layers at their own widths."""
  from eiw_flow_jax.model.backbones.dense_nets import DenseBlock

  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  unscanned = DenseBlock(5, 3, 4)
  params = randomise(unscanned.init(jax.random.PRNGKey(1), x)["params"], scale=0.3)

  def loss(module):
    return jax.jit(jax.value_and_grad(
        lambda p, x: jnp.sum(jnp.sin(module.apply({"params": p}, x))), argnums=(0, 1)))

  value, grads = loss(unscanned)(params, x)
  scanned_value, scanned_grads = loss(DenseBlock(5, 3, 4, scan_layers=True))(params, x)
  np.testing.assert_allclose(scanned_value, value, rtol=1e-5)
  # float32 sums in another order: absolute differences of ~1e-6 against gradients of ~1-10.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
               scanned_grads, grads)


@pytest.fixture(scope="module")
def tiny():
  """The 3-scale parity model with the authors' (random) weights: no init to compile."""
  from test_denseflow_parity import config_from_fixture, load_case


  data, cfg, weights = load_case("denseflow_eiw_3scale")
  config = config_from_fixture(cfg)
  flow = build_flow(config)
  variables = jax.tree.map(jnp.asarray, denseflow_torch.convert_state_dict(weights, flow))
  x = jnp.asarray(np.transpose(data["inputs/x"], (0, 2, 3, 1)))
  return flow, variables, x, config


def test_tiny_denseflow_round_trips_through_the_flow_api(tiny):
  flow, variables, x, _ = tiny
  assert isinstance(flow, DenseFlow) and flow.backbone == "denseflow"

  @jax.jit
  def round_trip(v, x, rng):
    y = flow.dequantize(x, rng, variables=v)
    latents = flow.encode(v, y, rng)
    return y, latents, flow.decode(v, latents), flow.shuffle_stats(v, y)

  y, latents, back, stats = round_trip(variables, x, jax.random.PRNGKey(2))
  assert bool(jnp.all(flow.quantize(y) == x))
  assert [tuple(z.shape[1:]) for z in latents] == flow.latent_shapes
  np.testing.assert_allclose(back, y, atol=1e-5)
  assert len(stats) == 2
  assert set(stats[0]) >= {"g_entropy", "mean_s_entropy", "regularizer", "kept_channels"}
  samples = jax.jit(lambda v, r: flow.sample(v, r, 3, temperature=0.7))(
      variables, jax.random.PRNGKey(4))
  assert samples.shape == (3, *flow.image_shape) and samples.dtype == jnp.uint8


def test_tiny_denseflow_elbo_iwbo_and_injected_noise(tiny):
  flow, variables, x, _ = tiny
  noise = flow.draw_noise(jax.random.PRNGKey(5), x.shape[0])

  @jax.jit
  def fn(v, x, n, rng):
    return flow.elbo_terms(v, x, noise=n), flow.iwbo_bpd(v, x, rng, 4, 2)

  a, iwbo = fn(variables, x, noise, jax.random.PRNGKey(6))
  total = a["dequant_log_det"] - a["dequant_log_q"] + a["log_det"] + a["log_prior"]
  np.testing.assert_allclose(a["elbo"], total, rtol=1e-6)
  np.testing.assert_allclose(a["bpd"], -a["elbo"] / (flow.num_dims * math.log(2.0)), rtol=1e-6)
  assert iwbo.shape == (x.shape[0],) and bool(jnp.all(jnp.isfinite(iwbo)))
  with pytest.raises(ValueError, match="noise: expected shapes"):
    flow.elbo_terms(variables, x, noise={"dequant": noise["dequant"], "augment": []})
  with pytest.raises(ValueError, match="multiple of chunk"):
    flow.iwbo_bpd(variables, x, jax.random.PRNGKey(0), 5, 2)


def test_tiny_denseflow_for_each_platform_computes_the_same_loss_and_gradient(tiny):
  """`Flow.for_platform`: the XLA:CPU forms ("cpu", what the flow that chooses when lowered
  takes here) and the portable ones (any other platform, run here on the CPU) of every 1x1
  convolution of the networks give the same training loss and gradient; neither traces a
  platform conditional, where the flow that chooses when lowered traces both forms."""
  flow, variables, x, _ = tiny
  rng = jax.random.PRNGKey(3)

  def loss_and_grad(one):
    return jax.value_and_grad(lambda p: one.loss({**variables, "params": p}, x, rng)[0])

  def conditional(one):
    return "platform_index[platforms=(('cpu'" in str(
        jax.make_jaxpr(loss_and_grad(one))(variables["params"]))

  on_cpu, on_tpu = flow.for_platform("cpu"), flow.for_platform("tpu")
  assert (on_cpu.model_config.kernels, on_tpu.model_config.kernels) == ("auto:cpu",
                                                                        "auto:portable")
  assert conditional(flow) and not conditional(on_cpu) and not conditional(on_tpu)
  want = jax.jit(loss_and_grad(on_cpu))(variables["params"])
  got = jax.jit(loss_and_grad(on_tpu))(variables["params"])
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("name", DENSEFLOW_CONFIGS)
def test_denseflow_configs_are_df_74_10_with_the_recipe(name):
  config = load_config(name)
  assert set(config.keys()) == set(schema.base_config().keys())
  run_config.validate_config(config, num_devices=8, num_processes=1)
  m = config.model
  assert m.backbone == "denseflow" and m.split == "eiw" and m.eiw.regularizer == "literal"
  assert tuple(m.denseflow.block_conf) == (6, 4, 1)
  assert tuple(m.denseflow.layers_conf) == (5, 6, 20)
  assert tuple(m.denseflow.layer_mid_chnls) == (48, 48, 48)
  assert m.denseflow.growth_rate == 10
  assert config.optimizer.name == "adamax" and config.optimizer.learning_rate == 1e-3
  # The authors' runs kept lr constant after warmup (decay_rate 1.0: their --gamma never
  # reached the scheduler); --config.optimizer.decay_rate=<gamma> gives the README's intent.
  assert config.optimizer.warmup_steps == 5000 and config.optimizer.decay_rate == 1.0
  assert (config.optimizer.b1, config.optimizer.b2) == (0.9, 0.999)
  assert config.eval.iwbo_samples == (1000 if name.startswith("cifar10") else 200)


@pytest.mark.parametrize("field,value,match", [
    ("backbone", "resnet", "model.backbone must be one of"),
    ("denseflow__layers_conf", (5, 6), "one entry per dense block"),
    ("denseflow__block_conf", (0, 4, 1), "block_conf must be a non-empty list of ints >= 1"),
    ("denseflow__growth_rate", 0, "growth_rate must be an int >= 1"),
    ("denseflow__layer_mid_chnls", (1, 48, 48), "layer_mid_chnls must be >= 2"),
    ("image_shape", (8, 8, 3), "needs a multiple of its 4 landmarks"),
    ("denseflow__attention_landmarks", 3, "block 0 works at 16x16 = 256 pixels"),
    ("denseflow__attention_landmarks", 0, "attention_landmarks must be an int >= 1"),
    ("image_shape", (12, 12, 3), "divisible by 2\\*\\*len\\(block_conf\\) = 8"),
    ("eiw__mode", "per_example", "eiw.mode must be 'global' with the denseflow backbone"),
    ("memory", "invert", "supported for the glow backbone only"),
    ("dtype", "bfloat16", "model.dtype='bfloat16' is not supported by the denseflow backbone"),
    ("kernels", "portable", "model.kernels='portable' is not supported by the denseflow backbone"),
])
def test_bad_denseflow_configs_fail_clearly(field, value, match):
  config = load_config("cifar10_denseflow")
  node = config.model
  *parents, leaf = field.split("__")
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  with pytest.raises(checks.ConfigError, match=match):
    run_config.validate_config(config)


def test_iwbo_needs_denseflow_and_optimizer_fields_are_checked():
  config = load_config("digits")
  config.eval.iwbo_samples = 10
  with pytest.raises(checks.ConfigError, match="iwbo_samples > 0 needs"):
    run_config.validate_config(config)
  config = load_config("cifar10_denseflow")
  config.optimizer.name = "sgd"
  with pytest.raises(checks.ConfigError, match="optimizer.name must be one of"):
    run_config.validate_config(config)
  config = load_config("cifar10_denseflow")
  config.optimizer.decay_rate = 1.5
  with pytest.raises(checks.ConfigError, match="decay_rate must be in"):
    run_config.validate_config(config)


@pytest.mark.parametrize("name", ["digits_denseflow", "mnist_idx_denseflow"])
def test_small_denseflow_configs_validate_and_build(name):
  """The CPU configs of docs/results.md: MNIST's 7x7 last scale needs 7 landmarks, not 4."""
  config = load_config(name)
  assert config.model.backbone == "denseflow" and config.eval.iwbo_samples > 0
  run_config.validate_config(config)
  shapes = build_flow(config).latent_shapes
  if name == "mnist_idx_denseflow":
    assert config.model.denseflow.attention_landmarks == 7
    assert [s[:2] for s in shapes] == [(7, 7), (7, 7)]
    config.model.denseflow.attention_landmarks = 4
    with pytest.raises(checks.ConfigError, match="block 1 works at 7x7 = 49 pixels"):
      run_config.validate_config(config)


def test_attention_landmarks_reach_the_coupling_nets():
  """A unit at 7x7 runs with 7 landmarks (a multiple of H*W), and fails clearly with 4."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 7, 5))
  unit = DenseUnit(1, 4, 1, 4, num_landmarks=7)
  variables = unit.init(jax.random.PRNGKey(1), x)
  variables = dict(variables, params=randomise(variables["params"]))
  y, log_det = unit.apply(variables, x)
  assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(log_det)))
  np.testing.assert_allclose(unit.apply(variables, y, method="inverse"), x, atol=1e-4)
  with pytest.raises(ValueError, match="H\\*W=49 must be divisible by 4 landmarks"):
    DenseUnit(1, 4, 1, 4).init(jax.random.PRNGKey(1), x)


def _random_block_variables(block, x, etas, seed=0):
  """Random variables of `block`'s shapes, drawn on the host (compiling init and a jitted
  randomisation would take longer than the tests): BatchNorm running means and variances
  away from their initial values."""
  shapes = jax.eval_shape(block.init, jax.random.PRNGKey(1), x, etas)
  rs = np.random.RandomState(seed)
  return {
      "params": jax.tree.map(
          lambda s: 0.1 * rs.standard_normal(s.shape).astype(np.float32), shapes["params"]),
      "constants": jax.tree_util.tree_map_with_path(
          lambda path, s: np.full(s.shape, 1.0 if path[-1].key == "var" else 0.1, np.float32),
          shapes["constants"]),
  }


@pytest.mark.parametrize("memory,scan", [("store", True), ("remat", True), ("store", False)])
def test_the_scan_over_padded_units_is_the_block_unit_by_unit(memory, scan):
  """A dense block runs as one scan over its units padded to the widest (`dense_scan`): the
  same outputs, log-dets, augmentation terms, BatchNorm running statistics and gradients (of
  every parameter and of the input) as its units one by one at their own widths
  (`per_unit`). Unit widths 5, 8, 11: odd and even halves at the coupling and the switch."""
  from eiw_flow_jax.model.backbones.denseflow import InvertibleDenseBlock

  block = InvertibleDenseBlock(3, 2, 8, 3, 1, 8, memory=memory, train=True, scan=scan)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(keys[0], (4, 4, 4, 5))
  etas = [jax.random.normal(k, (4, 4, 4, 3)) for k in keys[1:3]]
  probe = jax.random.normal(keys[3], (4, 4, 4, 11))  # weights every output channel
  variables = _random_block_variables(block, x, etas)

  def loss(params, x, method):
    (h, log_det, augment), updated = block.apply(
        {**variables, "params": params}, x, etas, mutable=["constants"], method=method)
    value = jnp.sum(h * probe) + jnp.sum(log_det) + 0.5 * jnp.sum(augment)
    return value, (h, log_det, augment, updated["constants"])

  def run(method):
    fn = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, method), argnums=(0, 1),
                                    has_aux=True))
    return jax.device_get(fn(variables["params"], x))

  (_, scanned), scanned_grads = run("__call__")
  (_, reference), reference_grads = run("per_unit")
  for got, expected in zip(scanned[:3], reference[:3]):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               scanned[3], reference[3])
  assert jax.tree.structure(scanned_grads) == jax.tree.structure(reference_grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               scanned_grads, reference_grads)
  assert float(np.max(np.abs(reference[2]))) > 1  # the augmentation terms are there


def test_remat_units_give_the_same_gradients_with_less_memory():
  """memory="remat" (each unit of the block's scan recomputed): the same gradients, the same
  BatchNorm running statistics (training mode updates them inside the recomputed units), and a
  compiled gradient whose temporaries are well below "store"'s: the recomputation really is
  deferred."""
  from eiw_flow_jax.model.backbones.denseflow import InvertibleDenseBlock

  def block(memory):
    return InvertibleDenseBlock(3, 1, 8, 4, 1, 8, memory=memory, train=True)

  x = jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 4))
  etas = [jax.random.normal(jax.random.PRNGKey(i + 1), (16, 8, 8, 4)) for i in range(2)]
  variables = _random_block_variables(block("store"), x, etas)
  results, temp = {}, {}
  for memory in ("store", "remat"):
    module = block(memory)

    def loss(params, x, module=module):
      (h, log_det, augment), updated = module.apply(
          {**variables, "params": params}, x, etas, mutable=["constants"])
      return jnp.mean(h**2) - jnp.mean(log_det + augment), updated["constants"]

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    compiled = grad.lower(variables["params"], x).compile()
    temp[memory] = compiled.memory_analysis().temp_size_in_bytes
    results[memory] = compiled(variables["params"], x)
  (store_grads, store_stats), (remat_grads, remat_stats) = results["store"], results["remat"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               store_grads, remat_grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               store_stats, remat_stats)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(variables["constants"]),
                                                 jax.tree.leaves(remat_stats))]
  assert any(moved), "training-mode BatchNorm did not update its running statistics"
  if ON_PINNED_COMPILER:  # XLA's buffer sizes: checked on the pinned jaxlib only
    assert temp["remat"] < 0.7 * temp["store"], temp


@pytest.mark.slow
def test_remat_per_unit_gives_the_training_objective_and_gradients_of_store(tiny):
  """The whole model: memory="remat" has the same parameters, ELBO, gradients and updated
  BatchNorm running statistics as "store"."""
  flow, variables, x, config = tiny
  config = config.copy_and_resolve_references()
  config.model.memory = "remat"
  remat_flow = build_flow(config)
  noise = flow.draw_noise(jax.random.PRNGKey(7), x.shape[0])

  def value_and_grad(f):
    def loss(params):
      terms = f.elbo_terms({**variables, "params": params}, x, noise=noise, train=True)
      return -jnp.mean(terms["elbo"]), terms["constants"]

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

  (a, a_stats), a_grads = value_and_grad(flow)
  (b, b_stats), b_grads = value_and_grad(remat_flow)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-6),
               a_grads, b_grads)
  jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6),
               a_stats, b_stats)
  # The running statistics moved: training-mode BatchNorm updated them.
  before = jax.tree.leaves(variables["constants"])
  assert any(not np.allclose(p, q) for p, q in zip(before, jax.tree.leaves(a_stats)))


def test_adamax_with_warmup_and_per_epoch_decay():
  from eiw_flow_jax.training import optimizer

  config = load_config("cifar10_denseflow")
  epoch = config.optimizer.steps_per_epoch
  assert epoch == 782  # int(50000 / 64) + 1, as the authors count an epoch's iterations
  # The published runs: constant after warmup.
  constant = optimizer.make_schedule(config)
  np.testing.assert_allclose(constant(4999), 1e-3, rtol=1e-5)
  np.testing.assert_allclose(constant(10 * epoch + 3), 1e-3, rtol=1e-5)
  # With the README's gamma: lr *= gamma after every epoch, warmup included.
  config.optimizer.decay_rate = 0.9975
  schedule = optimizer.make_schedule(config)
  np.testing.assert_allclose(schedule(4999), 1e-3 * 0.9975**6, rtol=1e-5)  # warmup done
  np.testing.assert_allclose(schedule(10 * epoch + 3), 1e-3 * 0.9975**10, rtol=1e-5)
  np.testing.assert_allclose(schedule(0), 1e-3 / 5000, rtol=1e-5)
  tx = optimizer.make_optimizer(config)
  params = {"w": jnp.ones(3)}
  updates, _ = tx.update({"w": jnp.array([1.0, -2.0, 0.0])}, tx.init(params), params)
  # Adamax's first step is -lr * sign(g) (infinity norm), whatever the gradient's size.
  np.testing.assert_allclose(updates["w"], [-1e-3 / 5000, 1e-3 / 5000, 0.0], rtol=1e-4)


@pytest.mark.parametrize("use_bias, zero_init", [(True, False), (False, False), (True, True)])
def test_matmul_conv1x1_is_nn_conv_in_parameters_values_and_gradients(use_bias, zero_init):
  """The nets' 1x1 convolutions (`dense_nets.conv(..., 1, ...)`, a matmul) have nn.Conv's
  parameter names, shapes and initial values, so converted state_dicts load unchanged, and
  compute its function and gradients."""
  from eiw_flow_jax.model.backbones import dense_nets
  from eiw_flow_jax.model.bijectors import Conv1x1

  layer = dense_nets.conv(96, 1, "c", use_bias=use_bias, zero_init=zero_init)
  assert isinstance(layer, Conv1x1)
  reference = nn.Conv(96, (1, 1), padding="VALID", use_bias=use_bias,
                      kernel_init=(nn.initializers.zeros if zero_init
                                   else nn.initializers.lecun_normal()),
                      bias_init=nn.initializers.zeros)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 40))
  params = layer.init(jax.random.PRNGKey(0), x)
  reference_params = reference.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params)):
    np.testing.assert_array_equal(a, b)
  params = randomise(params)

  def loss(module, params, x):
    return jnp.sum(jnp.sin(module.apply(params, x)))

  np.testing.assert_allclose(layer.apply(params, x), reference.apply(params, x),
                             rtol=1e-5, atol=1e-5)
  got = jax.grad(loss, argnums=(1, 2))(layer, params, x)
  want = jax.grad(loss, argnums=(1, 2))(reference, params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert isinstance(dense_nets.conv(8, 3, "c"), nn.Conv)  # 3x3 and strided ones stay convs
  assert isinstance(dense_nets.conv(8, 2, "c", stride=2), nn.Conv)
