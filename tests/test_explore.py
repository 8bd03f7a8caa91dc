"""eiw_flow_jax.model.explore: load a run (or a converted checkpoint), interpolate, bits per
pixel, and what the Shuffle keeps."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_config, perturb
from test_denseflow_parity import config_from_fixture, load_case

import eiw_flow_jax
from eiw_flow_jax.commands import convert
from eiw_flow_jax.model import explore
from eiw_flow_jax.model.backbones import denseflow_torch
from eiw_flow_jax.model.flow import build_flow
from eiw_flow_jax.training import optimizer, resume, sharding, train_state
from eiw_flow_jax.workdir import checkpointing

# (split, mode, coupling, memory): the three Shuffle variants, additive couplings, remat.
GLOW_CASES = {
    "vanilla": ("vanilla", "global", "affine", "store"),
    "global": ("eiw", "global", "affine", "store"),
    "per_example": ("eiw", "per_example", "affine", "store"),
    "additive_remat": ("eiw", "per_example", "additive", "remat"),
}


def glow_config(case: str):
  split, mode, coupling, memory = GLOW_CASES[case]
  config = make_config(split=split, mode=mode, n_bits=5)
  config.model.coupling = coupling
  config.model.memory = memory
  return config


def images(seed: int, n: int = 6, shape=(8, 8, 1), n_bits: int = 5) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, 2**n_bits, (n, *shape)).astype(np.uint8)


@functools.cache
def glow_case(case: str):
  """A tiny Glow with perturbed parameters (every zero-initialised part is active): (case, flow,
  variables), built once per case for the module's tests."""
  flow = build_flow(glow_config(case))
  variables = flow.init(jax.random.PRNGKey(0), jnp.asarray(images(0, 16)))
  return case, flow, perturb(variables, jax.random.PRNGKey(1), 0.1)


@pytest.fixture(scope="module", params=list(GLOW_CASES))
def glow(request):
  return glow_case(request.param)


def test_interpolation_ends_are_the_images(glow):
  _, flow, variables = glow
  x_a, x_b = images(1, 3), images(2, 3)
  path = np.asarray(flow.interpolate(variables, x_a, x_b, num=5))
  assert path.shape == (3, 5, 8, 8, 1) and path.dtype == np.uint8
  np.testing.assert_array_equal(path[:, 0], x_a)
  np.testing.assert_array_equal(path[:, -1], x_b)
  assert not np.array_equal(path[:, 2], x_a) and not np.array_equal(path[:, 2], x_b)
  y_a, y_b = (jnp.asarray(x, jnp.float32) / 32 + 0.01 for x in (x_a, x_b))
  continuous = np.asarray(flow.interpolate(variables, y_a, y_b, num=3))
  assert continuous.dtype == np.float32
  np.testing.assert_allclose(continuous[:, 0], y_a, atol=1e-4)
  np.testing.assert_allclose(continuous[:, -1], y_b, atol=1e-4)
  # The middle image is the decoded mean of the two latents, level by level.
  latents = [(a + b) / 2 for a, b in zip(flow.encode(variables, y_a), flow.encode(variables, y_b))]
  np.testing.assert_allclose(continuous[:, 1], flow.decode(variables, latents), atol=1e-4)


def test_bits_map_sums_to_the_bpd(glow):
  case, flow, variables = glow
  x = images(3)
  bits = np.asarray(flow.bits_per_dim_map(variables, x))
  assert bits.shape == (6, 8, 8)
  y = (jnp.asarray(x, jnp.float32) + 0.5) / 32  # the bins' midpoints
  bpd = flow.bpd_from_log_prob(flow.log_prob(variables, y))
  np.testing.assert_allclose(bits.sum(axis=(1, 2)) / flow.num_dims, bpd, rtol=1e-5, atol=1e-4)
  rng = jax.random.PRNGKey(4)
  drawn = np.asarray(flow.bits_per_dim_map(variables, x, rng))
  np.testing.assert_allclose(drawn.sum(axis=(1, 2)) / flow.num_dims, flow.bpd(variables, x, rng),
                             rtol=1e-5, atol=1e-4)
  # Not spread evenly: the priors (and affine couplings) are attributed position by position.
  assert np.ptp(bits, axis=(1, 2)).min() > 1e-2, case


def test_the_top_prior_is_charged_to_its_block():
  """Moving the top prior's mean at its latent position (0, 0) changes only the bits of the 4x4
  pixels that position covers (level 1 of 2), by that position's change in -log2 density."""
  _, flow, variables = glow_case("vanilla")
  x = images(11, 2)
  before = np.asarray(flow.bits_per_dim_map(variables, x))
  params = dict(variables["params"])
  params["top_prior"] = dict(params["top_prior"], mean=params["top_prior"]["mean"].at[0, 0].add(
      0.7))
  after = np.asarray(flow.bits_per_dim_map({**variables, "params": params}, x))
  change = after - before
  np.testing.assert_allclose(change[:, 4:], 0, atol=1e-5)
  np.testing.assert_allclose(change[:, :, 4:], 0, atol=1e-5)
  assert np.abs(change[:, :4, :4]).min() > 1e-3
  np.testing.assert_allclose(change[:, :4, :4], change[:, :1, :1] * np.ones((1, 4, 4)), rtol=1e-4)


def test_spread_keeps_the_sum_and_fills_each_block():
  position_map = jnp.arange(8.0).reshape(2, 2, 2)
  spread = np.asarray(explore._spread(position_map, (8, 8)))
  np.testing.assert_allclose(spread.sum(axis=(1, 2)), position_map.sum(axis=(1, 2)))
  np.testing.assert_allclose(spread[1, 4:, :4], np.full((4, 4), 6.0 / 16))


def test_shuffle_assignment_matches_the_splits(glow):
  case, flow, variables = glow
  x = images(5, 8)
  levels = flow.shuffle_assignment(variables, x)
  y = (jnp.asarray(x, jnp.float32) + 0.5) / 32
  stats = flow.shuffle_stats(variables, y)
  assert len(levels) == len(stats) == flow.model_config.num_levels - 1
  for level, stat in zip(levels, stats):
    kept, order = np.asarray(level["kept"]), np.asarray(level["order"])
    b, c = kept.shape
    assert b == 8 and order.shape == (b, c) and level["log_weights"].shape == (b, c)
    assert (kept.sum(axis=1) == c // 2).all()
    np.testing.assert_array_equal(np.sort(order, axis=1), np.broadcast_to(np.arange(c), (b, c)))
    np.testing.assert_array_equal(np.take_along_axis(kept, order[:, : c // 2], 1), True)
    if case == "vanilla":
      np.testing.assert_array_equal(order, np.broadcast_to(np.arange(c), (b, c)))
    elif case == "global":
      np.testing.assert_array_equal(order, np.broadcast_to(stat["permutation"], (b, c)))
    else:
      anchor = c - stat["stay_frequency"].shape[0]
      assert kept[:, :anchor].all()
      np.testing.assert_allclose(kept[:, anchor:].mean(axis=0), stat["stay_frequency"])
      log_w = np.asarray(level["log_weights"])
      assert (log_w[:, :anchor] == 0).all() and np.ptp(log_w[:, anchor:], axis=0).min() > 0
      # Per example, the candidates in the order of their weights (heaviest first).
      np.testing.assert_array_equal(order[:, anchor:] - anchor,
                                    np.argsort(-log_w[:, anchor:], axis=1, stable=True))


def test_the_kept_channels_are_what_goes_up_the_flow():
  """The factored latent of per_example level 0 is the level's output at the factored channels
  of `order`, scaled by their weights: a check that does not go through the diagnostics."""
  flow = build_flow(glow_config("per_example"))
  x = images(6, 4)
  variables = flow.init(jax.random.PRNGKey(0), jnp.asarray(images(0, 16)))
  variables = perturb(variables, jax.random.PRNGKey(1), 0.1)
  y = (jnp.asarray(x, jnp.float32) + 0.5) / 32

  z = np.asarray(flow.module.apply(variables, y, method="split_inputs")[0])
  level = jax.device_get(flow.shuffle_assignment(variables, x)[0])
  c = z.shape[-1]
  factored = np.take_along_axis(z, level["order"][:, None, None, c // 2:], axis=-1)
  weights = np.exp(np.take_along_axis(level["log_weights"], level["order"][:, c // 2:], 1))
  np.testing.assert_allclose(flow.encode(variables, y)[0], factored * weights[:, None, None],
                             rtol=1e-5, atol=1e-5)


def test_bad_inputs_fail_clearly(glow):
  _, flow, variables = glow
  x = images(7, 2)
  with pytest.raises(ValueError, match="num: expected an int >= 2"):
    flow.interpolate(variables, x, x, num=1)
  with pytest.raises(ValueError, match="same shape and dtype"):
    flow.interpolate(variables, x, images(8, 3))
  with pytest.raises(ValueError, match="expected values < 2\\*\\*n_bits"):
    flow.bits_per_dim_map(variables, x + 40)
  with pytest.raises(ValueError, match="expected uint8 images or float"):
    flow.shuffle_assignment(variables, x.astype(np.int32))
  with pytest.raises(ValueError, match="expected shape \\(B, 8, 8, 1\\)"):
    flow.shuffle_assignment(variables, x[..., 0])
  with pytest.raises(ValueError, match="expected values in \\[0, 1\\]"):
    flow.bits_per_dim_map(variables, jnp.full((1, 8, 8, 1), 1.5))


# ----------------------------------------------------------------------------------------------
# load


def write_run(workdir: str, config, variables, steps: tuple[int, ...]) -> None:
  """Checkpoints as the training loop writes them: EMA = variables + step, raw = variables."""
  flow = build_flow(config)
  tx = optimizer.make_optimizer(config)
  mesh = sharding.make_mesh()
  resume.save_config(config, workdir)
  manager = checkpointing.make_manager(workdir, keep=5)
  try:
    for step in steps:
      state = train_state.state_from_variables(tx, variables).replace(
          step=jnp.asarray(step, jnp.int32),
          ema_params=jax.tree.map(lambda p, s=step: p + s, variables["params"]))
      state = jax.device_put(state, sharding.state_shardings(mesh, train_state.abstract_state(
          flow, tx, mesh)))
      checkpointing.save(manager, step, state, force=True)
      manager.wait_until_finished()
  finally:
    manager.close()


def test_load_reads_the_newest_checkpoint(tmp_path):
  case, flow, variables = glow_case("global")
  workdir = str(tmp_path / "run")
  write_run(workdir, glow_config(case), variables, (3, 7))
  loaded = eiw_flow_jax.load(workdir)
  assert loaded.step == 7 and loaded.config.to_dict() == glow_config(case).to_dict()
  expected = jax.tree.map(lambda p: p + 7, variables["params"])
  jax.tree.map(np.testing.assert_allclose, jax.device_get(loaded.variables["params"]), expected)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.variables["constants"]),
               jax.device_get(variables["constants"]))
  raw = eiw_flow_jax.load(workdir, ema=False)
  jax.tree.map(np.testing.assert_allclose, jax.device_get(raw.variables["params"]),
               jax.device_get(variables["params"]))
  # The loaded flow works: the same bits as the original flow with those variables.
  x = images(9, 2)
  np.testing.assert_allclose(loaded.flow.bits_per_dim_map(loaded.variables, x),
                             flow.bits_per_dim_map(loaded.variables, x), rtol=1e-5, atol=1e-4)
  # A damaged newest checkpoint: the older one is loaded (and nothing is moved aside).
  step_dir = os.path.join(workdir, checkpointing.CHECKPOINT_DIR, "7", checkpointing.STATE)
  for root, _, files in os.walk(step_dir):
    for name in files:
      if name != "_METADATA" and not name.startswith("_"):
        os.remove(os.path.join(root, name))
  assert eiw_flow_jax.load(workdir).step == 3
  assert os.path.isdir(step_dir)


def test_load_errors_are_one_line(tmp_path):
  with pytest.raises(FileNotFoundError, match="No such workdir: .*missing"):
    eiw_flow_jax.load(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="No checkpoint in .*empty.*checkpoints"):
    eiw_flow_jax.load(str(tmp_path / "empty"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The authors' tiny DenseFlow (EIW transitions) state_dict converted into a workdir."""
  _, cfg, weights = load_case("denseflow_eiw_3scale")
  config = config_from_fixture(cfg)
  tmp = tmp_path_factory.mktemp("converted")
  npz = tmp / "weights.npz"
  np.savez(npz, **weights)
  workdir = str(tmp / "work")
  convert.convert_checkpoint(str(npz), config, workdir, report=None)
  return workdir, config, weights


def test_load_a_converted_authors_checkpoint(converted):
  workdir, config, weights = converted
  flow, variables, loaded_config, step = eiw_flow_jax.load(workdir)
  assert step == 0 and isinstance(flow, eiw_flow_jax.DenseFlow)
  assert loaded_config.model.denseflow.block_conf == tuple(config.model.denseflow.block_conf)
  expected = denseflow_torch.convert_state_dict(weights, build_flow(config))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), expected)
  h, w, c = flow.image_shape
  x = images(10, 2, (h, w, c), flow.n_bits)
  path = np.asarray(flow.interpolate(variables, x, x[::-1], num=3))
  np.testing.assert_array_equal(path[:, 0], x)
  np.testing.assert_array_equal(path[:, -1], x[::-1])
  levels = flow.shuffle_assignment(variables, x)
  assert len(levels) == len(flow.latent_shapes) - 1
  permutations = flow.split_permutations(variables)
  assert list(permutations) == list(range(len(levels)))
  for level, transition in enumerate(levels):
    permutation = permutations[level]
    np.testing.assert_array_equal(transition["order"], np.broadcast_to(
        permutation, transition["order"].shape))
    assert (np.asarray(transition["kept"]).sum(axis=1) == permutation.shape[0] // 2).all()
  with pytest.raises(ValueError, match="'denseflow' backbone is not supported"):
    flow.bits_per_dim_map(variables, x)
