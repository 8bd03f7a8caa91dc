"""The DenseFlow training step against the authors' PyTorch code: gradients and optimizer steps
(no torch).

The fixtures (tests/fixtures/denseflow_grads_*.npz) were written by
`tools/make_denseflow_gradient_fixtures.py` from the authors' code in training mode (BatchNorm
on batch statistics): weights, a uint8 batch and its noise, the gradient of their training
objective `-sum(log_prob) / (ln 2 * numel) + sigma * scale_loss` with respect to every
parameter (float32, and float64 stored as float32), the gradient of the scale loss alone, and,
for `denseflow_grads_eiw`, the per-step losses of 20 Adamax steps of their recipe. Here the
weights and gradients go through `denseflow_torch.convert_state_dict` (a gradient maps like
its parameter: the layout changes are transpositions and reshapes) and `jax.grad` of
`DenseFlow.loss`, fed the same noise, must give the same tensors.

Tolerance, per tensor: |ours - theirs| <= RTOL * max|theirs in the tensor| + ATOL * max|theirs
over all tensors|. Float32 relative errors are largest where a gradient is small against its
tensor or the whole: the coupling networks' attention output biases (train-mode BatchNorm
follows them, so their exact gradient is 0 and both sides return rounding, 1e-8 of the largest
entry: 100% relative), the sigmoid gates' conv biases (3e-5; torch's own float32 gradient is
2e-5 from its float64 one there), the saturated weight generator (4e-6: torch keeps the
subnormal weights XLA flushes). The worst tensor uses 2% of its allowance. In float64 (torch
in float64, JAX under jax_enable_x64) the zero gradients fall to 1e-17 of the largest entry and
every tensor agrees to the fixture's float32 storage (worst: 5% of the float64 allowance): the
float32 gaps are rounding. docs/denseflow.md, "Training step", has the rest.
"""

from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_denseflow_parity import FIXTURES, config_from_fixture

from eiw_flow_jax.config import recipes
from eiw_flow_jax.model.backbones import denseflow, denseflow_torch
from eiw_flow_jax.model.flow import build_flow
from eiw_flow_jax.training.optimizer import make_optimizer
from eiw_flow_jax.training.sharding import make_mesh, mesh_platform, state_shardings
from eiw_flow_jax.training.train_state import abstract_state, rng_keys, state_from_variables
from eiw_flow_jax.training.train_step import make_train_step

CASES = ["denseflow_grads_eiw", "denseflow_grads_eiw_saturated"]
TRAIN_CASE = "denseflow_grads_eiw"
RTOL, ATOL = 1e-4, 1e-6  # float32 (module doc)
RTOL64, ATOL64 = 1e-6, 1e-10  # float64 against a float32 copy of torch's float64 gradient


def nhwc(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, (0, 2, 3, 1))


@functools.cache
def load(name: str):
  """(data, flow with the fixture's sigma, torch state_dict, converted variables); tests set
  the flow's noise (`feed_noise`) before they trace it."""
  data = np.load(os.path.join(FIXTURES, f"{name}.npz"))
  cfg = json.loads(str(data["config_json"]))
  config = config_from_fixture(cfg)
  config.model.eiw.sigma = cfg["sigma"]
  flow = build_flow(config)
  weights = {k[len("weights/"):]: data[k] for k in data.files if k.startswith("weights/")}
  return data, flow, weights, denseflow_torch.convert_state_dict(weights, flow)


def torch_gradient(data, flow, weights, prefix: str) -> dict:
  """Their gradients `prefix/KEY` in this project's parameter layout."""
  grads = {k[len(prefix) + 1:]: data[k] for k in data.files if k.startswith(prefix + "/")}
  assert grads, prefix
  # The buffers (BatchNorm statistics) complete the state_dict; only "params" is used.
  return denseflow_torch.convert_state_dict({**weights, **grads}, flow)["params"]


def fixture_noise(data, prefix: str, dtype=np.float32) -> dict:
  etas = sorted((k for k in data.files if k.startswith(f"{prefix}/eta_")),
                key=lambda k: int(k.rsplit("_", 1)[1]))
  to = lambda a: jnp.asarray(np.moveaxis(a, -3, -1).astype(dtype))  # noqa: E731 - NCHW -> NHWC
  return {"dequant": to(data[f"{prefix}/eps"]), "augment": [to(data[k]) for k in etas]}


def feed_noise(flow, noise: dict, batch: int) -> None:
  """`flow.draw_noise` returns `noise` for batches of `batch` (what the loss draws from its rng
  there), so the real `DenseFlow.loss` sees the authors' draws."""
  draw = flow.draw_noise
  object.__setattr__(flow, "draw_noise",
                     lambda rng, b: noise if b == batch else draw(rng, b))


def compare(ours: dict, theirs: dict, rtol: float, atol: float) -> list[str]:
  """Tensors outside the module doc's tolerance, worst first."""
  flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(v, np.float64)  # noqa: E731
                       for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  ours, theirs = flat(ours), flat(theirs)
  assert ours.keys() == theirs.keys()
  assert all(np.all(np.isfinite(v)) for v in theirs.values())
  top = max(float(np.max(np.abs(v))) for v in theirs.values())
  bad = []
  for key, want in theirs.items():
    err = float(np.max(np.abs(ours[key] - want)))
    scale = float(np.max(np.abs(want)))
    if not err <= rtol * scale + atol * top:
      bad.append((err / top, f"{key}: max error {err:.3g}, tensor scale {scale:.3g}, "
                             f"largest entry {top:.3g}"))
  return [text for _, text in sorted(bad, reverse=True)]


def loss_and_regularizer_grads(flow, variables, x):
  """Gradients of DenseFlow.loss and of its regulariser term, in one compiled pass."""
  constants = variables["constants"]

  def terms(params):
    loss, aux = flow.loss({"params": params, "constants": constants}, x, jax.random.PRNGKey(0))
    return jnp.stack([loss, aux["regularizer"]]), aux

  jac, aux = jax.jit(jax.jacrev(terms, has_aux=True))(variables["params"])
  return jax.tree.map(lambda j: j[0], jac), jax.tree.map(lambda j: j[1], jac), aux


@pytest.mark.parametrize("name", CASES)
def test_gradient_of_the_training_loss_is_the_authors(name):
  data, flow, weights, variables = load(name)
  if "saturated" in name:  # the fixture is what its name says: weights underflow to 0
    params = variables["params"]["transition0"]
    g = jax.nn.softmax(denseflow.weight_generator_logits(
        params["wg_fc0"], params["wg_fc2"], params["wg_fc2"].shape[1]))
    assert int(jnp.sum(g == 0)) >= 2
  x = jnp.asarray(nhwc(data["inputs/x"]))
  feed_noise(flow, fixture_noise(data, "inputs"), x.shape[0])
  grads, reg_grads, aux = loss_and_regularizer_grads(flow, variables, x)
  np.testing.assert_allclose(aux["bpd"], data["expected/bpd"], rtol=1e-6)
  np.testing.assert_allclose(aux["regularizer"], data["expected/scale_loss"], rtol=1e-5)
  assert compare(grads, torch_gradient(data, flow, weights, "grad"), RTOL, ATOL) == []
  # sigma = 1e-3 makes the regulariser's gradient 1e-3 of the total: checked on its own too.
  assert compare(reg_grads, torch_gradient(data, flow, weights, "grad_scale"), RTOL, ATOL) == []


@pytest.mark.parametrize("name", [
    pytest.param(TRAIN_CASE, marks=pytest.mark.slow),  # ~10 s of CPU more
    "denseflow_grads_eiw_saturated",
])
def test_float64_gradient_is_the_authors_float64_gradient(name):
  data, flow, weights, variables = load(name)
  expected = torch_gradient(data, flow, weights, "grad64")
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    x = jnp.asarray(nhwc(data["inputs/x"]))
    feed_noise(flow, fixture_noise(data, "inputs", np.float64), x.shape[0])
    grads, _, aux = loss_and_regularizer_grads(flow, variables, x)
    assert aux["bpd"].dtype == jnp.float64
    # Their dequantizer's log-det constant is log(256) rounded to float32 (a float32 buffer).
    offset = (float(np.float32(math.log(256.0))) - math.log(256.0)) / math.log(2.0)
    np.testing.assert_allclose(float(aux["bpd"]) + offset, data["expected/bpd64"], rtol=1e-12)
    assert compare(grads, expected, RTOL64, ATOL64) == []


def run_train_steps(data, flow, variables, settings: dict, steps: int, per_epoch: int):
  """Our real train step (`make_train_step`, `make_optimizer`) for `steps` steps on the
  fixture's batches and noise; per-step (loss, learning rate)."""
  config = config_from_fixture(json.loads(str(data["config_json"])))
  config.model.eiw.sigma = json.loads(str(data["config_json"]))["sigma"]
  opt = config.optimizer
  opt.name = settings["optimizer"].lower()
  opt.learning_rate = settings["lr"]
  opt.b1, opt.b2 = settings["betas"]
  opt.warmup_steps = settings["warmup"] or 0
  opt.decay_rate = settings["gamma"]
  opt.steps_per_epoch = per_epoch
  opt.grad_clip_norm = settings["use_grad_norm"]
  config.num_train_steps = steps
  config.ema_decay = 0.0
  tx = make_optimizer(config)
  # Step s draws its noise from fold_in(train key, s): map that key to the fixture's step s
  # (NaN noise for any other key, so a changed key derivation cannot pass unnoticed).
  noise = fixture_noise(data, "train")
  train_key = rng_keys(config)["train"]
  keys = jnp.stack([jax.random.fold_in(train_key, s) for s in range(steps)])
  batch = data["train/x"].shape[1]
  mesh = make_mesh()
  # The flow the train step traces (its mesh's platform's), patched below: make_train_step
  # then keeps this very object.
  flow = flow.for_platform(mesh_platform(mesh))
  draw = flow.draw_noise

  def draw_noise(rng, b):
    if b != batch:
      return draw(rng, b)
    match = jnp.all(rng[None] == keys, axis=-1)
    pick = lambda a: jnp.where(jnp.any(match), a[jnp.argmax(match)], jnp.nan)  # noqa: E731
    return jax.tree.map(pick, noise)

  object.__setattr__(flow, "draw_noise", draw_noise)
  step = make_train_step(config, flow, tx, mesh)
  # As `create_state` places a fresh state (its EMA copy a buffer of its own).
  shardings = state_shardings(mesh, abstract_state(flow, tx, mesh))
  state = jax.jit(lambda v: state_from_variables(tx, v), out_shardings=shardings)(variables)
  losses, rates = [], []
  for s in range(steps):
    state, metrics = step(state, jnp.asarray(nhwc(data["train/x"][s])))
    losses.append(float(metrics["loss"]))
    rates.append(float(metrics["learning_rate"]))
  return np.asarray(losses), np.asarray(rates)


@pytest.mark.parametrize("run", ["decay", pytest.param("clipped", marks=pytest.mark.slow)])
def test_optimizer_steps_track_the_authors(run):
  """20 Adamax steps with their settings and a schedule both sides share (no warmup, lr x gamma
  per epoch; `clipped`: their --use_grad_norm 0.5, the gradient norm being ~8): the per-step
  loss, 12.4 falling to 11.2 bits/dim, stays within 2e-5 of theirs (measured: 3e-6, 3 float32
  ulps; b2 0.99 in place of their 0.999 moves it by 4e-2)."""
  data, flow, _, variables = load(TRAIN_CASE)
  train = json.loads(str(data["train_json"]))
  settings = train["runs"][run]
  losses, rates = run_train_steps(data, flow, variables, settings, train["steps"],
                                  train["steps_per_epoch"])
  np.testing.assert_allclose(rates, data[f"train/{run}/lr"], rtol=1e-6)
  np.testing.assert_allclose(losses, data[f"train/{run}/loss"], rtol=0, atol=2e-5)


def test_the_recipe_optimizer_is_the_one_their_train_py_builds():
  """Their train.py's optimiser file (`optim/expdecay_flow.py`) with the README's flags: Adamax,
  lr 1e-3, betas (0.9, 0.999) (its --momentum_sqr default; the README passes none), eps 1e-8, no
  weight decay, no clipping (--use_grad_norm 0)."""
  data, *_ = load(TRAIN_CASE)
  theirs = json.loads(str(data["train_json"]))["runs"]["readme"]
  assert (theirs["optimizer"], theirs["lr"], theirs["eps"]) == ("Adamax", 1e-3, 1e-8)
  assert theirs["weight_decay"] == 0 and theirs["use_grad_norm"] == 0
  config = recipes.denseflow_df_74_10(
      "cifar10", (32, 32, 3), batch_size=64, epochs=400, num_train=50_000, decay_rate=0.9975,
      iwbo_samples=1000, iwbo_chunk=50)
  opt = config.optimizer
  assert (opt.name, opt.learning_rate, [opt.b1, opt.b2]) == ("adamax", 1e-3, theirs["betas"])
  assert opt.grad_clip_norm == 0


def test_their_warmup_scheduler_undoes_their_per_epoch_decay():
  """With --warmup (as their README trains) their LinearWarmupScheduler sets lr = lr0 * min(1,
  t / warmup) before every update t (0 for the first) and ExponentialLR multiplies it by gamma
  after each epoch, so gamma reaches only each epoch's first update: no decay accumulates.
  This project's schedule decays (docs/denseflow.md, the differences)."""
  data, *_ = load(TRAIN_CASE)
  train = json.loads(str(data["train_json"]))
  run = train["runs"]["readme"]
  t = np.arange(train["steps"])
  epoch_start = (t % train["steps_per_epoch"] == 0) & (t > 0)
  expected = run["lr"] * np.minimum(1.0, t / run["warmup"]) * np.where(
      epoch_start, run["gamma"], 1.0)
  np.testing.assert_allclose(data["train/readme/lr"], expected, rtol=1e-6)
