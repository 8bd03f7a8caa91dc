"""The DenseFlow backbone against the authors' PyTorch model, number for number (no torch).

The fixtures (tests/fixtures/denseflow_*.npz) were written by
`tools/make_denseflow_fixtures.py` from the authors' code: random weights, uint8 images, the
dequantization and augmentation noise, and their model's outputs. Here the weights go through
`eiw_flow_jax.commands.convert` and the same inputs and noise must give the same ELBO terms: per
example to 2e-3 nats + 1e-5 relative (values are ~1,000-5,000 nats; a wrong channel order at
a transition costs tenths of a nat to nats).

The `saturated` fixtures keep the weight generators at torch's default scale, where their
float32 softmax underflows to subnormals and zeros: the channel order must be torch's wherever
torch's weights differ, and the ties of torch's weights must be found.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eiw_flow_jax.config import schema
from eiw_flow_jax.model.backbones import denseflow, denseflow_torch
from eiw_flow_jax.model.flow import build_flow

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CASES = [
    "denseflow_eiw_3scale",  # three scales like DF-74-10, one channel
    "denseflow_vanilla_tiny",  # DenseFlow's own transitions, RGB
    "denseflow_eiw_saturated_factored",  # torch's zeros (tied) and subnormals all factored
    "denseflow_eiw_saturated_kept",  # subnormal weights among the kept channels
]
SATURATED = [name for name in CASES if "saturated" in name]
ELBO_TOL = dict(rtol=1e-5, atol=2e-3)


def config_from_fixture(cfg: dict):
  config = schema.base_config()
  c, h, w = cfg["data_shape"]
  m = config.model
  m.backbone = "denseflow"
  m.image_shape = (h, w, c)
  m.split = "eiw" if cfg["kind"] == "eiw" else "vanilla"
  m.eiw.regularizer = "literal"
  for key in ("block_conf", "layers_conf", "layer_mid_chnls"):
    m.denseflow[key] = tuple(cfg[key])
  for key, value in cfg.items():
    if key in m.denseflow and key not in ("block_conf", "layers_conf", "layer_mid_chnls"):
      m.denseflow[key] = value
  return config


def load_case(name: str):
  data = np.load(os.path.join(FIXTURES, f"{name}.npz"))
  cfg = json.loads(str(data["config_json"]))
  weights = {k[len("weights/"):]: data[k] for k in data.files if k.startswith("weights/")}
  return data, cfg, weights


def nhwc(a: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


@pytest.mark.parametrize("name", CASES)
def test_elbo_terms_match_the_authors_model(name):
  data, cfg, weights = load_case(name)
  flow = build_flow(config_from_fixture(cfg))
  variables = denseflow_torch.convert_state_dict(weights, flow)
  x = nhwc(data["inputs/x"])
  etas = sorted((k for k in data.files if k.startswith("inputs/eta_")),
                key=lambda k: int(k.rsplit("_", 1)[1]))
  noise = {"dequant": nhwc(data["inputs/eps"]), "augment": [nhwc(data[k]) for k in etas]}
  fn = jax.jit(lambda v, x, n: flow.module.apply(v, x, n, method="forward_x"))
  latents, terms = jax.device_get(fn(variables, x, noise))
  terms["bpd"] = -terms["elbo"] / (flow.num_dims * math.log(2.0))
  dequant = terms["dequant_log_det"] - terms["dequant_log_q"]
  np.testing.assert_allclose(dequant, data["expected/ldj_0"], **ELBO_TOL)
  np.testing.assert_allclose(terms["elbo"], data["expected/elbo"], **ELBO_TOL)
  scale_loss = sum(float(np.mean(r)) for r in terms["regularizer"])
  # torch's order of tied (zero) weights is arbitrary and the regulariser's Solver sees it: with
  # ties, the reference is their model with the logit order (the ELBO must not change).
  expected_scale_loss = float(data["expected/scale_loss"])
  if "expected/scale_loss_logit_order" in data.files:
    expected_scale_loss = float(data["expected/scale_loss_logit_order"])
    np.testing.assert_allclose(terms["elbo"], data["expected/elbo_logit_order"], **ELBO_TOL)
  np.testing.assert_allclose(scale_loss, expected_scale_loss, rtol=1e-4, atol=1e-5)
  bpd = float(np.mean(terms["bpd"]))
  np.testing.assert_allclose(bpd, float(data["expected/bpd"]), rtol=1e-5)
  # The top latent itself.
  np.testing.assert_allclose(latents[-1], np.transpose(data["expected/z_top"], (0, 2, 3, 1)),
                             rtol=1e-4, atol=1e-4)
  assert math.isfinite(bpd)


def test_conversion_reports_a_wrong_config():
  _, cfg, weights = load_case("denseflow_eiw_3scale")
  cfg = dict(cfg, growth_rate=cfg["growth_rate"] + 2)
  flow = build_flow(config_from_fixture(cfg))
  with pytest.raises(denseflow_torch.ConversionError, match="does not fit the configured model"):
    denseflow_torch.convert_state_dict(weights, flow)


def count_params(flow) -> int:
  shapes = jax.eval_shape(
      lambda: flow.init(jax.random.PRNGKey(0), jnp.zeros((1, *flow.image_shape), jnp.uint8)))
  return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes["params"]))


def test_parameter_count_matches_the_authors_df_74_10():
  """130,922,462 trainable parameters, as the authors' PyTorch model at 3x32x32 (counted by
  the fixture script with torch), from shapes only (jax.eval_shape, nothing materialised)."""
  with open(os.path.join(FIXTURES, "denseflow_param_counts_eiw.json")) as f:
    expected = json.load(f)["DF-74-10 3x32x32"]["trainable"]
  assert expected == 130_922_462
  config = schema.base_config()
  config.model.backbone = "denseflow"
  config.model.image_shape = (32, 32, 3)
  assert count_params(build_flow(config)) == expected


@pytest.mark.slow
def test_parameter_counts_match_for_every_counted_config():
  for kind, split in (("eiw", "eiw"), ("denseflow", "vanilla")):
    with open(os.path.join(FIXTURES, f"denseflow_param_counts_{kind}.json")) as f:
      counts = json.load(f)
    for entry in counts.values():
      config = schema.base_config()
      c, h, w = entry["data_shape"]
      config.model.backbone = "denseflow"
      config.model.image_shape = (h, w, c)
      config.model.split = split
      total = count_params(build_flow(config))
      assert total == entry["trainable"], (kind, entry["data_shape"], total)


@pytest.mark.parametrize("name", SATURATED)
def test_channel_order_is_torchs_and_its_ties_are_found(name):
  """Where torch's float32 weights differ our order is theirs (their weights never increase
  along it), and the ties of their weights are what `shuffle_stats` and `convert` report."""
  data, cfg, weights = load_case(name)
  flow = build_flow(config_from_fixture(cfg))
  variables = denseflow_torch.convert_state_dict(weights, flow)
  y = (nhwc(data["inputs/x"]).astype(jnp.float32) + 0.5) / 2.0**flow.n_bits
  stats = jax.device_get(jax.jit(flow.shuffle_stats)(variables, y))
  ties = denseflow_torch.authors_weight_ties(variables)
  num = len([k for k in data.files if k.startswith("expected/wg_weights_")])
  assert num == len(ties) >= 1
  for t in range(num):
    w = data[f"expected/wg_weights_{t}"]
    channels, kept = len(w), len(w) // 2
    perm = np.asarray(stats[t]["permutation"])
    np.testing.assert_array_equal(np.sort(perm), np.arange(channels))
    assert np.all(np.diff(w[perm].astype(np.float64)) <= 0), w[perm]
    np.testing.assert_array_equal(w[perm], w[data[f"expected/wg_indices_{t}"]])
    # The fixture is what its name says: subnormals (which XLA flushes) and tied zeros.
    subnormal = (w[perm] > 0) & (w[perm] < 2.0**-126)
    assert np.sum(w == 0) >= 2 and subnormal.any()
    assert subnormal[:kept].any() == (name == "denseflow_eiw_saturated_kept")
    # torch's ties, against the emulated float32 weights, the diagnostics and the conversion.
    same = w[:, None] == w[None, :]
    logits = denseflow.weight_generator_logits(
        variables["params"][f"transition{t}"]["wg_fc0"],
        variables["params"][f"transition{t}"]["wg_fc2"], channels)
    bits = np.asarray(denseflow.authors_weight_bits(logits))
    np.testing.assert_array_equal(bits[:, None] == bits[None, :], same)
    tied = same.sum(axis=1) > 1
    kept_mask = np.isin(np.arange(channels), perm[:kept])
    expected = {
        "authors_tied_channels": int(tied.sum()),
        "authors_tied_kept_channels": int((tied & kept_mask).sum()),
        "authors_ties_cross_split": int((same & kept_mask[:, None] & ~kept_mask[None, :]).any()),
    }
    assert expected["authors_tied_channels"] and not expected["authors_ties_cross_split"]
    for key, value in expected.items():
      assert int(stats[t][key]) == value, key
      assert ties[f"transition{t}"][key] == value, key
  assert "(all factored)" in denseflow_torch.describe_weight_ties(ties)
