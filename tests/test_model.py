"""The whole multi-scale flow: exact inverse, exact log-det, EIW behaviour, API and input checks."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import VARIANTS, log_abs_det_jacobian, make_config, perturb, random_uint8

import eiw_flow_jax
from eiw_flow_jax.config import schema
from eiw_flow_jax.model.backbones.base import Level
from eiw_flow_jax.model.flow import Flow


@functools.cache
def _flow_and_vars(
    image_shape, num_levels, split, mode, scale=0.1, batch=4, seed=0
) -> tuple[Flow, dict, jax.Array]:
  """A small flow, its perturbed variables, and a dequantized batch (cached across tests)."""
  config = make_config(image_shape, num_levels, split=split, mode=mode)
  flow = eiw_flow_jax.build_flow(config)
  x = random_uint8((batch, *image_shape), seed=seed)
  variables = flow.init(jax.random.PRNGKey(seed), x)
  if scale:
    variables = perturb(variables, jax.random.PRNGKey(seed + 1), scale)
  return flow, variables, flow.dequantize(x, jax.random.PRNGKey(seed + 2))


@pytest.mark.parametrize("image_shape,num_levels", [((32, 32, 3), 3), ((8, 8, 1), 2)])
def test_decode_inverts_encode(variant, image_shape, num_levels):
  # Milder noise at 48 channels: random unit-lower L factors grow ill-conditioned with width.
  scale = 0.05 if image_shape[-1] == 3 else 0.1
  flow, variables, y = _flow_and_vars(image_shape, num_levels, *variant, scale=scale)
  latents = flow.encode(variables, y)
  assert [z.shape[1:] for z in latents] == flow.latent_shapes
  assert sum(math.prod(s) for s in flow.latent_shapes) == flow.num_dims
  y_back = flow.decode(variables, latents)
  np.testing.assert_allclose(y_back, y, atol=1e-4)


def test_model_log_det_matches_jacfwd(variant):
  flow, variables, y = _flow_and_vars((8, 8, 1), 2, *variant)
  _, log_det, _, _ = flow.forward(variables, y)

  def flat_latents(y_single):
    latents = flow.module.apply(variables, y_single[None], method="forward")[0]
    return jnp.concatenate([z.reshape(-1) for z in latents])

  for i in range(2):
    expected = log_abs_det_jacobian(flat_latents, y[i])
    np.testing.assert_allclose(log_det[i], expected, rtol=1e-4, atol=1e-3)


def _level0_permutations(flow, variables, y):
  def fn(module, y):
    h = module.split_inputs(y)[0]
    split = module.splits[0]
    return split.weights_and_permutation(h[..., : split.anchor_width])[1]

  return flow.module.apply(variables, y, method=fn)


def _with_random_solver(variables, level="level0_split", scale=1.0):
  params = dict(variables["params"])
  split = dict(params[level])
  kernel = split["solver_out"]["kernel"]
  split["solver_out"] = {
      **split["solver_out"],
      "kernel": scale * jax.random.normal(jax.random.PRNGKey(7), kernel.shape),
  }
  params[level] = split
  return {**variables, "params": params}


def test_per_example_random_solver_gives_distinct_exact_permutations():
  # Rest of the flow at its initialisation: saturated weights (|log w| ~ beta) then stay in the
  # range where the float32 inverse of the upper level is well conditioned.
  flow, variables, y = _flow_and_vars((8, 8, 1), 2, "eiw", "per_example", scale=0.0, batch=16)
  variables = _with_random_solver(variables, scale=3.0)
  perms = np.asarray(_level0_permutations(flow, variables, y))
  assert len({tuple(p) for p in perms}) >= 2, perms
  latents = flow.encode(variables, y)
  np.testing.assert_allclose(flow.decode(variables, latents), y, atol=1e-4)
  _, log_det, _, _ = flow.forward(variables, y)
  for i in range(2):
    expected = log_abs_det_jacobian(
        lambda v: jnp.concatenate(
            [z.reshape(-1) for z in flow.module.apply(variables, v[None], method="forward")[0]]
        ),
        y[i],
    )
    np.testing.assert_allclose(log_det[i], expected, rtol=1e-4, atol=1e-3)


def _nll(flow, y):
  def fn(params, constants):
    variables = {"params": params, "constants": constants}
    return jnp.mean(flow.log_prob(variables, y))

  return fn


def test_per_example_nll_gradient_reaches_the_solver():
  flow, variables, y = _flow_and_vars((8, 8, 1), 2, "eiw", "per_example", batch=16)
  variables = _with_random_solver(variables)
  grads = jax.grad(_nll(flow, y))(variables["params"], variables["constants"])
  solver = grads["level0_split"]
  assert float(jnp.abs(solver["solver_out"]["kernel"]).max()) > 0
  assert float(jnp.abs(solver["solver_conv"]["kernel"]).max()) > 0


def test_global_random_theta_permutes_exactly_and_regulariser_trains_the_shuffle():
  flow, variables, y = _flow_and_vars((8, 8, 1), 2, "eiw", "global")
  theta = variables["params"]["level0_split"]["theta"]
  perm = np.argsort(-np.asarray(theta), kind="stable")
  assert not np.array_equal(perm, np.arange(theta.shape[0]))
  stats = flow.shuffle_stats(variables, y)
  np.testing.assert_array_equal(stats[0]["permutation"], perm)
  latents = flow.encode(variables, y)
  np.testing.assert_allclose(flow.decode(variables, latents), y, atol=1e-4)

  def regulariser(params):
    _, _, _, aux = flow.forward({**variables, "params": params}, y)
    return sum(jnp.mean(r) for r in aux["regularizer"])

  grads = jax.grad(regulariser)(variables["params"])
  split = grads["level0_split"]
  assert float(jnp.abs(split["theta"]).max()) > 0
  assert float(jnp.abs(split["solver_hidden"]["kernel"]).max()) > 0
  assert float(jnp.abs(split["solver_out"]["kernel"]).max()) > 0
  earlier = grads["level0_steps"]["layers_2"]["net"]["Conv_0"]["kernel"][0]
  assert float(jnp.abs(earlier).max()) > 0

  nll_grads = jax.grad(_nll(flow, y))(variables["params"], variables["constants"])
  for name in ("theta", "solver_hidden", "solver_out"):
    for leaf in jax.tree_util.tree_leaves(nll_grads["level0_split"][name]):
      assert float(jnp.abs(leaf).max()) == 0.0


@pytest.mark.parametrize("mode", ["global", "per_example"])
def test_eiw_at_zero_init_equals_vanilla(mode):
  shape = (8, 8, 1)
  vanilla, v_vars, y = _flow_and_vars(shape, 2, "vanilla", "global")
  eiw, e_vars, _ = _flow_and_vars(shape, 2, "eiw", mode, scale=0.0)
  # Same trained flow everywhere; the EIW-only parameters stay at their zero initialisation.
  params = jax.tree_util.tree_map(lambda a: a, e_vars["params"])
  for name, value in v_vars["params"].items():
    if name.endswith("_split"):
      params[name] = {**params[name], "prior": value["prior"]}
    else:
      params[name] = value
  e_vars = {"params": params, "constants": v_vars["constants"]}
  np.testing.assert_allclose(eiw.log_prob(e_vars, y), vanilla.log_prob(v_vars, y), rtol=1e-6)
  for a, b in zip(eiw.encode(e_vars, y), vanilla.encode(v_vars, y)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  rng = jax.random.PRNGKey(5)
  np.testing.assert_array_equal(eiw.sample(e_vars, rng, 3), vanilla.sample(v_vars, rng, 3))


def test_sample_encode_decode_round_trip_and_temperature_zero_is_the_mode(variant):
  flow, variables, _ = _flow_and_vars((8, 8, 1), 2, *variant)
  y, latents = flow.sample_continuous(variables, jax.random.PRNGKey(3), 4, temperature=0.7)
  encoded = flow.encode(variables, y)
  for a, b in zip(encoded, latents):
    np.testing.assert_allclose(a, b, atol=1e-3)
  np.testing.assert_allclose(flow.decode(variables, encoded), y, atol=1e-4)

  y0, latents0 = flow.sample_continuous(variables, jax.random.PRNGKey(4), 4, temperature=0.0)
  y1, _ = flow.sample_continuous(variables, jax.random.PRNGKey(9), 4, temperature=0.0)
  np.testing.assert_allclose(y0, y1, atol=1e-6)
  for mean, z in zip(flow.prior_means(variables, latents0), latents0):
    np.testing.assert_allclose(mean, z, atol=1e-4)
  images = flow.sample(variables, jax.random.PRNGKey(3), 4, temperature=0.7)
  assert images.dtype == jnp.uint8 and images.shape == (4, 8, 8, 1)


def test_bpd_and_loss_follow_the_design_formulas():
  flow, variables, _ = _flow_and_vars((8, 8, 1), 2, "eiw", "global", scale=0.5)
  x = random_uint8((4, 8, 8, 1), seed=11)
  rng = jax.random.PRNGKey(0)
  y = flow.dequantize(x, rng)
  d = 64
  expected = -(flow.log_prob(variables, y) - d * 8 * math.log(2)) / (d * math.log(2))
  np.testing.assert_allclose(flow.bpd(variables, x, rng), expected, rtol=1e-6)
  loss, aux = flow.loss(variables, x, rng)
  np.testing.assert_allclose(aux["bpd"], jnp.mean(expected), rtol=1e-6)
  assert float(aux["regularizer"]) > 0
  np.testing.assert_allclose(loss, aux["bpd"] + 1e-3 * aux["regularizer"], rtol=1e-6)


def test_literal_regulariser_option_differs_from_kl():
  values = {}
  for form in ("kl", "literal"):
    config = make_config(split="eiw", mode="global")
    config.model.eiw.regularizer = form
    flow = eiw_flow_jax.build_flow(config)
    x = random_uint8((4, 8, 8, 1))
    variables = perturb(flow.init(jax.random.PRNGKey(0), x), jax.random.PRNGKey(1), 0.5)
    values[form] = float(flow.loss(variables, x, jax.random.PRNGKey(2))[1]["regularizer"])
  assert values["kl"] >= 0 and values["kl"] != pytest.approx(values["literal"])


def test_shuffle_stats_report_the_design_diagnostics(variant):
  flow, variables, y = _flow_and_vars((8, 8, 1), 2, *variant)
  stats = flow.shuffle_stats(variables, y)
  assert len(stats) == 1
  expected = {
      ("vanilla", "global"): {"factored_entropy"},
      ("eiw", "global"): {
          "g_entropy", "mean_s_entropy", "regularizer", "permutation", "kept_channels",
          "factored_entropy",
      },
      ("eiw", "per_example"): {
          "weight_entropy", "non_identity_fraction", "stay_frequency", "factored_entropy",
      },
  }[variant]
  assert set(stats[0]) == expected
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in stats[0].values())


# ---- bad input --------------------------------------------------------------------------------
@functools.cache
def _small():
  return _flow_and_vars((8, 8, 1), 2, "eiw", "per_example", scale=0.0)


@pytest.mark.parametrize(
    "x,match",
    [
        (np.zeros((8, 8, 1), np.uint8), r"expected shape \(B, 8, 8, 1\).*got \(8, 8, 1\)"),
        (np.zeros((2, 8, 8, 3), np.uint8), r"expected shape \(B, 8, 8, 1\).*got \(2, 8, 8, 3\)"),
        (np.zeros((2, 8, 8, 1), np.float32), "expected dtype uint8, got float32"),
    ],
)
def test_bad_uint8_input(x, match):
  flow, variables, _ = _small()
  with pytest.raises(ValueError, match=match):
    flow.bpd(variables, jnp.asarray(x), jax.random.PRNGKey(0))


def test_values_beyond_n_bits_are_rejected():
  config = make_config(n_bits=5)
  flow = eiw_flow_jax.build_flow(config)
  with pytest.raises(ValueError, match="expected values < 2\\*\\*n_bits = 32, got max 200"):
    flow.init(jax.random.PRNGKey(0), jnp.full((2, 8, 8, 1), 200, jnp.uint8))


def test_continuous_input_checks_and_nan():
  flow, variables, y = _small()
  with pytest.raises(ValueError, match="expected a float dtype"):
    flow.log_prob(variables, y.astype(jnp.int32))
  bad = y.at[0, 0, 0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="NaN"):
    flow.log_prob(variables, bad)
  # Inside jit the check cannot raise; the NaN must show in that example's density.
  log_prob = jax.jit(flow.log_prob)(variables, bad)
  assert bool(jnp.isnan(log_prob[0])) and bool(jnp.all(jnp.isfinite(log_prob[1:])))


def test_decode_rejects_wrong_latents():
  flow, variables, y = _small()
  latents = flow.encode(variables, y)
  with pytest.raises(ValueError, match="latents: expected per-example shapes"):
    flow.decode(variables, latents[:-1])


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("image_shape", (12, 12, 1), r"divisible by 2\*\*num_levels = 8.*got H=12"),
        ("image_shape", (8, 8), "three positive ints"),
        ("split", "random", r"model.split must be one of \('vanilla', 'eiw'\), got 'random'"),
        ("coupling", "spline", "model.coupling must be one of"),
        ("n_bits", 9, r"model.n_bits must be an int in \[1, 8\]"),
        ("eiw.mode", "local", r"model.eiw.mode must be one of \('global', 'per_example'\)"),
        ("eiw.anchor_width", 4, r"A=4 at level 0 with C=4 channels; expected 1 <= A <= 1"),
        ("eiw.regularizer", "l2", "model.eiw.regularizer must be one of"),
    ],
)
def test_bad_model_config(field, value, match):
  config = make_config(
      image_shape=(16, 16, 1), num_levels=3 if field == "image_shape" else 2, mode="per_example"
  )
  target = config.model
  *path, leaf = field.split(".")
  for part in path:
    target = target[part]
  target[leaf] = value
  with pytest.raises(ValueError, match=match):
    eiw_flow_jax.build_flow(config)


def test_the_variant_fixture_covers_every_split_and_eiw_mode():
  """The `variant` fixture runs most model tests once per (split, mode): a split or EIW mode
  added to config/schema.py must be added there too, or those tests would never see it."""
  assert {split for split, _ in VARIANTS} == set(schema.SPLITS)
  assert {mode for split, mode in VARIANTS if split == "eiw"} == set(schema.EIW_MODES)


def test_python_lists_get_a_message_saying_an_array_is_expected():
  flow, variables, y = _small()
  images = np.zeros((2, 8, 8, 1), np.uint8).tolist()
  expected = r"uint8 images: expected an array .*\(B, 8, 8, 1\), got list"
  with pytest.raises(TypeError, match=expected):
    flow.bpd(variables, images, jax.random.PRNGKey(0))
  with pytest.raises(TypeError, match="dequantized images: expected an array .*, got list"):
    flow.log_prob(variables, np.asarray(y).tolist())
  latents = flow.encode(variables, y)
  with pytest.raises(TypeError, match=r"latents\[0\]: expected an array .*, got list"):
    flow.decode(variables, [np.asarray(z).tolist() for z in latents])


def test_decode_rejects_nan_latents():
  flow, variables, y = _small()
  latents = flow.encode(variables, y)
  bad = [latents[0].at[0, 0, 0, 0].set(jnp.nan), *latents[1:]]
  with pytest.raises(ValueError, match=r"latents\[0\]: contains NaN or infinite values"):
    flow.decode(variables, bad)
  jax.jit(flow.decode)(variables, bad)  # traced: like the image checks, no check inside jit


def test_variables_without_constants_name_the_missing_collection():
  flow, variables, y = _small()
  latents = flow.encode(variables, y)
  params_only = {"params": variables["params"]}
  for call in (
      lambda: flow.log_prob(params_only, y),
      lambda: flow.decode(params_only, latents),
      lambda: flow.sample(params_only, jax.random.PRNGKey(1), 2),
  ):
    with pytest.raises(ValueError, match=r"variables: expected the collections \['params', "
                       r"'constants'\].*missing 'constants' \(got \['params'\]\)"):
      call()


# ---- the stacked (scanned) flow steps ---------------------------------------------------------


def test_stacked_steps_init_each_step_on_its_own_input_with_its_own_permutation():
  """nn.scan at init: step k's ActNorm normalises step k's input (data-dependent init inside
  the scanned body), and every step drew its own 1x1-conv permutation."""
  from eiw_flow_jax.model.bijectors import ActNorm, FlowStep, squeeze2x2

  steps = 3
  config = make_config((8, 8, 1), num_levels=2, steps=steps, hidden=8)
  flow = eiw_flow_jax.build_flow(config)
  x = random_uint8((16, 8, 8, 1), seed=3)
  rng = jax.random.PRNGKey(0)
  variables = flow.init(rng, x)
  params, constants = variables["params"]["level0_steps"], variables["constants"]["level0_steps"]
  for leaf in jax.tree.leaves(params) + jax.tree.leaves(constants):
    assert leaf.shape[0] == steps
  assert not any(f"level0_step{k}" in variables["params"] for k in range(steps))
  perms = np.asarray(constants["layers_1"]["permutation"])
  assert len({p.tobytes() for p in perms}) == steps

  y = flow.dequantize(x, jax.random.split(rng)[0])  # the init's own draw (Flow._init)
  h = squeeze2x2(y - 0.5)
  step = FlowStep(8, "affine", parent=None)
  for k in range(steps):
    layer_k = {"params": jax.tree.map(lambda leaf, k=k: leaf[k], params),
               "constants": jax.tree.map(lambda leaf, k=k: leaf[k], constants)}
    normed, _ = ActNorm(parent=None).apply({"params": layer_k["params"]["layers_0"]}, h)
    np.testing.assert_allclose(jnp.mean(normed, axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.std(normed, axis=(0, 1, 2)), 1.0, atol=1e-3)
    h, _ = step.apply(layer_k, h)


def test_scanned_and_unrolled_steps_are_the_same_function_and_invert_exactly():
  config = make_config((8, 8, 1), num_levels=2, steps=3, hidden=8)
  flow = eiw_flow_jax.build_flow(config)
  x = random_uint8((4, 8, 8, 1), seed=1)
  variables = perturb(flow.init(jax.random.PRNGKey(0), x), jax.random.PRNGKey(1), 0.1)
  y = flow.dequantize(x, jax.random.PRNGKey(2))
  config.model.scan_steps = False
  unrolled = eiw_flow_jax.build_flow(config)
  latents = flow.encode(variables, y)
  for a, b in zip(latents, unrolled.encode(variables, y)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(flow.log_prob(variables, y), unrolled.log_prob(variables, y),
                             rtol=1e-6)
  np.testing.assert_allclose(flow.decode(variables, latents), y, atol=1e-5)
  np.testing.assert_allclose(unrolled.decode(variables, latents), y, atol=1e-5)


def test_scan_steps_must_be_a_bool():
  config = make_config()
  with config.model.ignore_type():  # a config file or JSON could still hold a non-bool
    config.model.scan_steps = "yes"
  with pytest.raises(ValueError, match="model.scan_steps must be True or False, got 'yes'"):
    eiw_flow_jax.build_flow(config)


def test_nonfinite_leaves_name_the_stacked_steps():
  from eiw_flow_jax.training import resume

  flow = eiw_flow_jax.build_flow(make_config())
  tree = {"params": {"level1_steps": {"layers_0": {"bias": np.zeros((4, 3), np.float32)}},
                     "top_prior": {"mean": np.array([0.0, np.inf], np.float32)}}}
  tree["params"]["level1_steps"]["layers_0"]["bias"][2, 1] = np.nan
  assert resume.nonfinite_leaves(tree, flow.stacked_axis) == [
      "['params']['level1_steps']['layers_0']['bias'] (steps 2)",
      "['params']['top_prior']['mean']"]
  assert resume.nonfinite_leaves(tree) == [
      "['params']['level1_steps']['layers_0']['bias']", "['params']['top_prior']['mean']"]


def test_nonfinite_leaves_name_the_stacked_layers_of_denseflow_units():
  from eiw_flow_jax.training import resume

  config = make_config()
  config.model.backbone = "denseflow"
  df = config.model.denseflow
  df.block_conf, df.layers_conf, df.layer_mid_chnls = (2, 2), (5, 5), (8, 8)
  flow = eiw_flow_jax.build_flow(config)
  shift = np.zeros((5, 3), np.float32)
  shift[1, 0] = shift[3, 2] = np.inf
  tree = {"ema_params": {"block0": {"unit1": {"layers": {"actnorm": {"shift": shift}}}},
                         "transition0": {"wg_fc2": np.full((2, 4), np.nan, np.float32)}}}
  assert resume.nonfinite_leaves(tree, flow.stacked_axis) == [
      "['ema_params']['block0']['unit1']['layers']['actnorm']['shift'] (layers 1, 3)",
      "['ema_params']['transition0']['wg_fc2']"]
  assert flow.stacked_axis(["block0", "layers", "actnorm"]) is None  # not a unit's layers


def test_levels_say_each_levels_latent_and_split():
  for split, mode in VARIANTS:
    flow = eiw_flow_jax.build_flow(make_config((16, 16, 1), 3, split=split, mode=mode))
    kind = "vanilla" if split == "vanilla" else mode
    assert flow.levels == (Level((8, 8, 2), 4, kind), Level((4, 4, 4), 8, kind),
                           Level((2, 2, 16), None, None))
    assert flow.latent_shapes == [(8, 8, 2), (4, 4, 4), (2, 2, 16)]
  config = make_config()
  config.model.backbone = "denseflow"
  df = config.model.denseflow
  df.block_conf, df.layers_conf, df.layer_mid_chnls = (2, 2), (5, 5), (8, 8)
  for split, kind in (("eiw", "global"), ("vanilla", "vanilla")):
    config.model.split = split
    # 4x4x4 after the first squeeze, + 10 noise channels in block 0's second unit, squeezed to
    # 2x2x56 and halved; + 10 again in block 1.
    assert eiw_flow_jax.build_flow(config).levels == (
        Level((2, 2, 28), 56, kind), Level((2, 2, 38), None, None))


def test_split_permutations_are_the_global_splits_orders():
  for split, mode in VARIANTS:
    flow, variables, y = _flow_and_vars((8, 8, 1), 2, split, mode)
    permutations = flow.split_permutations(variables)
    if (split, mode) != ("eiw", "global"):
      assert permutations == {}
      continue
    assert list(permutations) == [0]
    np.testing.assert_array_equal(permutations[0], flow.shuffle_stats(variables, y)[0][
        "permutation"])
    theta = np.asarray(variables["params"]["level0_split"]["theta"])
    np.testing.assert_array_equal(permutations[0], np.argsort(-theta, kind="stable"))


def test_a_config_not_built_on_base_config_names_the_missing_field():
  config = make_config()
  model = ml_collections.ConfigDict(config.model.to_dict())
  del model["kernels"]
  del model.eiw["beta"]
  with pytest.raises(ValueError, match=r"^model.eiw.beta, model.kernels: missing from the model "
                     r"config; build configs on eiw_flow_jax.base_config\(\)"):
    eiw_flow_jax.build_flow(model)
