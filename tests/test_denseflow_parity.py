"""The DenseFlow backbone against the authors' PyTorch model, number for number (no torch).

The fixtures (tests/fixtures/denseflow_*.npz) were written by
`tools/make_denseflow_fixtures.py` from the authors' code: random weights, uint8 images, the
dequantization and augmentation noise, and their model's outputs. Here the weights go through
`eiw_flow_jax.convert` and the same inputs and noise must give the same ELBO terms.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eiw_flow_jax import config_lib, convert
from eiw_flow_jax.model import build_flow

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CASES = [
    "denseflow_eiw_3scale",  # three scales like DF-74-10, one channel
    "denseflow_vanilla_tiny",  # DenseFlow's own transitions, RGB
]


def config_from_fixture(cfg: dict):
  config = config_lib.base_config()
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
  variables = convert.convert_state_dict(weights, flow)
  x = nhwc(data["inputs/x"])
  etas = sorted((k for k in data.files if k.startswith("inputs/eta_")),
                key=lambda k: int(k.rsplit("_", 1)[1]))
  noise = {"dequant": nhwc(data["inputs/eps"]), "augment": [nhwc(data[k]) for k in etas]}
  fn = jax.jit(lambda v, x, n: flow.module.apply(v, x, n, method="forward_x"))
  latents, terms = jax.device_get(fn(variables, x, noise))
  terms["bpd"] = -terms["elbo"] / (flow.num_dims * math.log(2.0))
  tol = dict(rtol=1e-4, atol=2e-3)
  dequant = terms["dequant_log_det"] - terms["dequant_log_q"]
  np.testing.assert_allclose(dequant, data["expected/ldj_0"], **tol)
  np.testing.assert_allclose(terms["elbo"], data["expected/elbo"], **tol)
  scale_loss = sum(float(np.mean(r)) for r in terms["regularizer"])
  np.testing.assert_allclose(scale_loss, float(data["expected/scale_loss"]), rtol=1e-4, atol=1e-5)
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
  with pytest.raises(convert.ConversionError, match="does not fit the configured model"):
    convert.convert_state_dict(weights, flow)


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
  config = config_lib.base_config()
  config.model.backbone = "denseflow"
  config.model.image_shape = (32, 32, 3)
  assert count_params(build_flow(config)) == expected


@pytest.mark.slow
def test_parameter_counts_match_for_every_counted_config():
  for kind, split in (("eiw", "eiw"), ("denseflow", "vanilla")):
    with open(os.path.join(FIXTURES, f"denseflow_param_counts_{kind}.json")) as f:
      counts = json.load(f)
    for entry in counts.values():
      config = config_lib.base_config()
      c, h, w = entry["data_shape"]
      config.model.backbone = "denseflow"
      config.model.image_shape = (h, w, c)
      config.model.split = split
      total = count_params(build_flow(config))
      assert total == entry["trainable"], (kind, entry["data_shape"], total)
