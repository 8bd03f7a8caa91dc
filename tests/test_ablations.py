"""Ablation switches of the EIW Shuffle: every combination stays exactly bijective and does what
its name says (`per_example`: use_weights / use_permutation; `global`: freeze_permutation)."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import log_abs_det_jacobian, make_config, perturb, random_uint8

import eiw_flow_jax

PER_EXAMPLE = list(itertools.product([True, False], [True, False]))  # (use_weights, use_perm)


@functools.cache
def _setup(mode, use_weights=True, use_permutation=True, freeze=False, solver_scale=3.0):
  """Flow, variables and a batch; the per_example Solver's last layer made strongly non-zero."""
  config = make_config(split="eiw", mode=mode)
  config.model.eiw.use_weights = use_weights
  config.model.eiw.use_permutation = use_permutation
  config.model.eiw.freeze_permutation = freeze
  flow = eiw_flow_jax.build_flow(config)
  x = random_uint8((16, 8, 8, 1))
  # Rest of the flow left at init (scale 0): saturated weights keep float32 inverses accurate.
  variables = flow.init(jax.random.PRNGKey(0), x)
  variables = perturb(variables, jax.random.PRNGKey(1), 0.1 if mode == "global" else 0.0)
  if mode == "per_example" and solver_scale:
    params = jax.tree_util.tree_map(lambda a: a, variables["params"])
    for level, name in enumerate(n for n in params if n.endswith("_split")):
      kernel = params[name]["solver_out"]["kernel"]
      params[name]["solver_out"]["kernel"] = solver_scale * jax.random.normal(
          jax.random.PRNGKey(7 + level), kernel.shape
      )
    variables = {**variables, "params": params}
  return flow, variables, flow.dequantize(x, jax.random.PRNGKey(2))


def _level0(flow, variables, y, what):
  """Applies `what(split, h)` to the level-0 split's input h."""

  def fn(module, y):
    return what(module.splits[0], module.split_inputs(y)[0])

  return flow.module.apply(variables, y, method=fn)


def _perm(split, h):
  if hasattr(split, "anchor_width"):
    return split.weights_and_permutation(h[..., : split.anchor_width])[1]
  return split.permutation()


def _check_bijective(flow, variables, y):
  latents = flow.encode(variables, y)
  np.testing.assert_allclose(flow.decode(variables, latents), y, atol=1e-4)
  _, log_det, _, _ = flow.forward(variables, y)

  def flat_latents(v):
    return jnp.concatenate(
        [z.reshape(-1) for z in flow.module.apply(variables, v[None], method="forward")[0]]
    )

  for i in range(2):
    np.testing.assert_allclose(
        log_det[i], log_abs_det_jacobian(flat_latents, y[i]), rtol=1e-4, atol=1e-3
    )


@pytest.mark.parametrize("use_weights,use_permutation", PER_EXAMPLE)
def test_per_example_combinations_are_exactly_bijective(use_weights, use_permutation):
  flow, variables, y = _setup("per_example", use_weights, use_permutation)
  _check_bijective(flow, variables, y)
  perms = np.asarray(_level0(flow, variables, y, _perm))
  identity = np.arange(perms.shape[-1])
  if use_permutation:  # the random Solver reorders some examples...
    assert any(not np.array_equal(p, identity) for p in perms), perms
  else:  # ...unless the permutation is switched off
    np.testing.assert_array_equal(perms, np.broadcast_to(identity, perms.shape))
  split_log_det = np.asarray(_level0(flow, variables, y, lambda s, h: s.split(h).log_det))
  if use_weights:
    assert np.all(np.abs(split_log_det) > 0)
  else:
    np.testing.assert_array_equal(split_log_det, 0.0)
  stats = flow.shuffle_stats(variables, y)[0]
  assert (float(stats["non_identity_fraction"]) > 0) == use_permutation
  # The Solver's scores still order pi without weights, so weight_entropy stays informative.
  assert np.isfinite(float(stats["weight_entropy"]))


def test_per_example_without_weights_gets_no_likelihood_gradient_in_the_solver():
  flow, variables, y = _setup("per_example", use_weights=False, use_permutation=True)

  def nll(params):
    return -jnp.mean(flow.log_prob({**variables, "params": params}, y))

  grads = jax.grad(nll)(variables["params"])["level0_split"]
  for leaf in jax.tree_util.tree_leaves({k: grads[k] for k in ("solver_out", "solver_conv")}):
    assert float(jnp.abs(leaf).max()) == 0.0
  full = _setup("per_example")
  full_grads = jax.grad(
      lambda p: -jnp.mean(full[0].log_prob({**full[1], "params": p}, full[2]))
  )(full[1]["params"])["level0_split"]
  assert float(jnp.abs(full_grads["solver_out"]["kernel"]).max()) > 0


def test_per_example_with_both_switches_off_is_the_vanilla_split():
  flow, variables, y = _setup("per_example", use_weights=False, use_permutation=False)
  vanilla = eiw_flow_jax.build_flow(make_config(split="vanilla"))
  v_params = {
      name: ({"prior": value["prior"]} if name.endswith("_split") else value)
      for name, value in variables["params"].items()
  }
  v_vars = {**variables, "params": v_params}
  np.testing.assert_allclose(flow.log_prob(variables, y), vanilla.log_prob(v_vars, y), rtol=1e-6)


@functools.cache
def _global_with_theta(freeze):
  flow, variables, y = _setup("global", freeze=freeze)
  theta = variables["params"]["level0_split"]["theta"]
  # A theta whose argsort is certainly not the identity.
  params = jax.tree_util.tree_map(lambda a: a, variables["params"])
  params["level0_split"]["theta"] = jnp.arange(theta.shape[0], dtype=theta.dtype)
  return flow, {**variables, "params": params}, y


@pytest.mark.parametrize("freeze", [False, True])
def test_global_freeze_permutation(freeze):
  flow, variables, y = _global_with_theta(freeze)
  perm = np.asarray(_level0(flow, variables, y, _perm))
  identity = np.arange(perm.shape[0])
  assert np.array_equal(perm, identity) == freeze
  np.testing.assert_array_equal(flow.shuffle_stats(variables, y)[0]["permutation"], perm)
  _check_bijective(flow, variables, y)

  # The regulariser still trains theta and the Solver when the permutation is frozen.
  def regulariser(params):
    _, _, _, aux = flow.forward({**variables, "params": params}, y)
    return sum(jnp.mean(r) for r in aux["regularizer"])

  grads = jax.grad(regulariser)(variables["params"])["level0_split"]
  for name in ("theta", "solver_hidden", "solver_out"):
    assert float(jnp.abs(jax.tree_util.tree_leaves(grads[name])[0]).max()) > 0


def test_frozen_global_density_ignores_theta():
  flow, variables, y = _global_with_theta(True)
  base = flow.log_prob(variables, y)
  params = jax.tree_util.tree_map(lambda a: a, variables["params"])
  params["level0_split"]["theta"] = -params["level0_split"]["theta"]
  np.testing.assert_array_equal(flow.log_prob({**variables, "params": params}, y), base)


@pytest.mark.parametrize("flag", ["use_weights", "use_permutation", "freeze_permutation"])
def test_ablation_flags_must_be_bools(flag):
  config = make_config(mode="per_example")
  eiw = config.model.eiw.to_dict()
  eiw[flag] = "yes"  # e.g. a config file that builds the ConfigDict itself
  config.model.eiw = ml_collections.ConfigDict(eiw)
  with pytest.raises(ValueError, match=rf"model.eiw.{flag} must be a bool.*got 'yes'"):
    eiw_flow_jax.build_flow(config)
