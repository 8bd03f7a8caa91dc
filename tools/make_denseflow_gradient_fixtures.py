"""Writes the DenseFlow training-parity fixtures from the authors' PyTorch code (needs torch).

  python tools/make_denseflow_gradient_fixtures.py --authors_repo=/path/to/EIW-Flow \\
      [--out_dir=tests/fixtures]

`--authors_repo` is a checkout of github.com/studying910/EIW-Flow (nothing of it is copied
here). The models are built as `make_denseflow_fixtures.py` builds its (the same patched small
widths, weights randomised the same way, noise injected in place of their samplers), in
training mode (`model.train()`: BatchNorm on batch statistics). Per case the .npz holds the
state_dict, a uint8 batch and its noise, and, from their code:

- `grad/KEY`: the gradient of their training objective with respect to every parameter, as
  their `FlowExperiment.train_fn` computes it: `loss, scale_loss = elbo_bpd(model, x)`,
  `(loss + sigma * scale_loss).backward()`. `elbo_bpd` runs `model.log_prob` twice (the bpd
  from the first pass, the EIW scale loss from the second); both passes are fed the same draws
  here, which makes their objective the one `DenseFlow.loss` computes in one pass. (That the
  two passes otherwise see independent draws is checked: the gradient with distinct draws A
  and B is the bpd gradient at A plus sigma times the scale-loss gradient at B.)
- `grad_scale/KEY`: the gradient of the scale loss alone (one pass), which sigma = 1e-3 makes
  a small part of `grad/`.
- `grad64/KEY`: `grad/` with their model and inputs in float64 (stored as float32), to tell
  float32 rounding from a real difference.
- `expected/`: the bpd and scale loss, in float32 and float64.

The EIW weight generator's sort is replaced by the stable descending sort of its logits
(`make_denseflow_fixtures.logit_sort`, this project's rule): the same order as torch's
wherever torch's float32 weights differ; in the saturated case, whose underflowed weights tie
in the factored half, the regulariser (and its gradient) depends on the order of the ties.

The training case also records 20 optimizer steps of their recipe on fixed batches and noise
(`train/`): the optimiser their `train.py` imports (`optim/expdecay_flow.py`: Adamax with its
argument defaults, a `LinearWarmupScheduler` stepped per batch, `ExponentialLR(gamma)` per
epoch; `optim/expdecay.py`, a OneCycleLR, is imported by neither train.py nor train_more.py),
its arguments parsed by its own `add_optim_args` from README-style flags, driven by their
`FlowExperiment.train_fn` (imported with its logging dependencies stubbed out), one call per
epoch of `steps_per_epoch` batches; per step the learning rate the update used, the bpd, the
scale loss and the loss. Runs: `decay` (no --warmup: lr x gamma per epoch), `readme` (--warmup
with --gamma, as their README trains: the warmup scheduler resets the learning rate every
batch, so the per-epoch decay reaches only each epoch's first update) and `clipped` (no
warmup, --use_grad_norm).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_denseflow_fixtures as forward  # noqa: E402 - the sibling script, as a module

GRADIENT_CASES = {
    # name: (a make_denseflow_fixtures.CASES spec or the name of one, batch, sigma, seed)
    # Three scales, two EIW transitions (a regulariser's gradient crosses the first one's sort).
    "denseflow_grads_eiw": (("eiw", (1, 16, 16), [2, 1, 1], [1, 1, 1], [4, 4, 4], 2), 4, 1e-3, 0),
    # The weight generator at torch's default scale: a saturated softmax (zeros, subnormals).
    "denseflow_grads_eiw_saturated": ("denseflow_eiw_saturated_factored", 4, 1e-3, None),
}
TRAIN_CASE = "denseflow_grads_eiw"
TRAIN = {"steps": 20, "steps_per_epoch": 5}
TRAIN_FLAGS = ["--optimizer", "adamax", "--lr", "1e-3", "--gamma", "0.8"]  # the rest: defaults
TRAIN_RUNS = {
    "decay": [],
    "readme": ["--warmup", "6"],
    "clipped": ["--use_grad_norm", "0.5"],
}


def _spec(case):
  spec = case[0]
  return forward.CASES[spec] if isinstance(spec, str) else spec


def _stub_logging_modules() -> None:
  """Their experiment module imports loggers and plotting that the train loop never calls."""
  stubs = {
      "prettytable": {"PrettyTable": None},
      "torchvision": {},
      "torchvision.utils": {"save_image": None},
      "torch.utils.tensorboard": {"SummaryWriter": None},
      "wandb": {},
      "denseflow.data": {},  # its loaders import scikit-learn; only data.path is used
      "denseflow.data.path": {"get_denseflow_path": lambda: "."},
  }
  for name, attrs in stubs.items():
    if name not in sys.modules:
      module = types.ModuleType(name)
      module.__dict__.update(attrs)
      sys.modules[name] = module


def _use_logit_sort(model) -> None:
  for wg in forward.weight_generators(model):
    wg.sort = types.MethodType(forward.logit_sort, wg)


def kl_div_batchmean_torch18(input, target):
  """Their `KLDivLoss(reduction="batchmean")(input, target)` as the torch of their
  requirements.txt (1.8.1) computes and differentiates it: entries with target 0 are 0 and
  pass no gradient. Since torch 1.13 kl_div is built on xlogy, whose gradient at target 0 is
  NaN (pytorch/pytorch issue 89558): a weight generator whose float32 softmax underflows to 0
  then gets a NaN gradient."""
  import torch

  positive = target > 0
  safe = torch.where(positive, target, torch.ones_like(target))
  pointwise = torch.where(positive, target * (safe.log() - input), torch.zeros_like(target))
  return pointwise.sum() / input.shape[0]


def _use_torch18_kl_div(model) -> None:
  import torch

  class KLDivTorch18(torch.nn.Module):
    def forward(self, input, target):
      return kl_div_batchmean_torch18(input, target)

  for t in model.transforms:
    if t.__class__.__name__ == "InvertibleTransition":
      t.loss_cal = KLDivTorch18()


def _to_float64(m):
  """Their model in float64, in place, but for the input scaling of the dequantizer's context
  net, which stays `x.float()` (as eiw_flow_jax's does under x64); also the weight generator's
  constant input C, a float32 tensor outside the module's buffers."""
  m.double()
  for wg in forward.weight_generators(m):
    wg.in_channel = wg.in_channel.double()
  bins = m.transforms[0].quantization_bins
  m.transforms[0].encoder.context_init[0].lambd = (
      lambda x: (2 * x.float() / (bins - 1) - 1).double())
  return m


def _grads(model, every_parameter: bool = True) -> dict[str, np.ndarray]:
  """Each parameter's .grad (zeros where none reaches it, unless `every_parameter`)."""
  out = {}
  for key, p in model.named_parameters():
    if p.grad is None and every_parameter:
      raise SystemExit(f"{key} gets no gradient from their objective.")
    out[key] = (np.zeros(p.shape, np.float32) if p.grad is None else
                p.grad.detach().numpy().astype(np.float32))
  return out


def _inject(torch, model, eps, etas, passes: int = 1) -> None:
  """`inject_noise` with the draws in the model's dtype."""
  dtype = np.float64 if next(model.parameters()).dtype == torch.float64 else np.float32
  forward.inject_noise(torch, model, eps.astype(dtype), [e.astype(dtype) for e in etas], passes)


def _objective_grads(torch, elbo_bpd, model, x, eps, etas, sigma, draws_b=None):
  """(bpd, scale loss, gradient) of their objective; both log_prob passes see (eps, etas)
  unless `draws_b` = (eps, etas) for the second."""
  model.zero_grad()
  calls = []
  log_prob = model.log_prob

  def counted_log_prob(x, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2 and draws_b is not None:
      _inject(torch, model, *draws_b)
    return log_prob(x, *args, **kwargs)

  model.log_prob = counted_log_prob
  _inject(torch, model, eps, etas, passes=2)
  try:
    loss, scale_loss = elbo_bpd(model, torch.from_numpy(x.astype(np.int64)))
    (loss + sigma * scale_loss).backward()
  finally:
    del model.log_prob
  if len(calls) != 2:
    raise SystemExit(f"elbo_bpd ran log_prob {len(calls)} times, not twice: update the docs.")
  return loss.item(), scale_loss.item(), _grads(model)


def _scale_loss_grads(torch, model, x, eps, etas):
  """(scale loss, its gradient) in one log_prob pass."""
  model.zero_grad()
  _inject(torch, model, eps, etas)
  _, scale_loss = model.log_prob(torch.from_numpy(x.astype(np.int64)))
  scale_loss.backward()
  # Nothing after the last transition counts.
  return scale_loss.item(), _grads(model, every_parameter=False)


def _nll_grads(torch, model, x, eps, etas):
  model.zero_grad()
  _inject(torch, model, eps, etas)
  log_prob, _ = model.log_prob(torch.from_numpy(x.astype(np.int64)))
  (-log_prob.sum() / (np.log(2.0) * x.size)).backward()
  return _grads(model, every_parameter=False)  # the Solvers only serve the regulariser


def _check_two_draws(torch, elbo_bpd, model, x, rng, spec, sigma) -> float:
  """Their objective with draws A and B is grad bpd(A) + sigma grad scale(B); the largest
  deviation relative to the gradient's largest entry."""
  _, eps_a, etas_a = forward.draw_inputs(rng, spec, x.shape[0])
  _, eps_b, etas_b = forward.draw_inputs(rng, spec, x.shape[0])
  *_, both = _objective_grads(torch, elbo_bpd, model, x, eps_a, etas_a, sigma,
                              draws_b=(eps_b, etas_b))
  nll_a = _nll_grads(torch, model, x, eps_a, etas_a)
  _, scale_b = _scale_loss_grads(torch, model, x, eps_b, etas_b)
  top = max(float(np.max(np.abs(g))) for g in both.values())
  gap = max(float(np.max(np.abs(both[k] - (nll_a[k] + sigma * scale_b[k])))) for k in both)
  if gap > 1e-4 * top:
    raise SystemExit(f"their objective is not bpd(A) + sigma scale(B): {gap} of {top}.")
  return gap / top


def _train_runs(torch, new_model, spec, rng) -> dict[str, np.ndarray]:
  """20 steps of their train loop per TRAIN_RUNS entry, from the same weights, batches, noise."""
  _stub_logging_modules()
  import experiments.image.experiment.baseline_flow as baseline_flow
  import experiments.image.optim.expdecay_flow as expdecay_flow

  steps, per_epoch = TRAIN["steps"], TRAIN["steps_per_epoch"]
  batch = GRADIENT_CASES[TRAIN_CASE][1]
  sigma = GRADIENT_CASES[TRAIN_CASE][2]
  # Noise drawn in float16 (stored so, exactly; used as float32): half the fixture's size.
  draws = [forward.draw_inputs(rng, spec, batch) for _ in range(steps)]
  draws = [(x, _half(eps), [_half(e) for e in etas]) for x, eps, etas in draws]
  out = {"train/x": np.stack([d[0] for d in draws]),
         "train/eps": np.stack([d[1] for d in draws]).astype(np.float16)}
  for i in range(len(draws[0][2])):
    out[f"train/eta_{i}"] = np.stack([d[2][i] for d in draws]).astype(np.float16)
  their_elbo_bpd = baseline_flow.elbo_bpd
  settings = {}
  for run, flags in TRAIN_RUNS.items():
    net = new_model()
    parser = argparse.ArgumentParser()
    expdecay_flow.add_optim_args(parser)
    args = parser.parse_args(TRAIN_FLAGS + flags)
    args.sigma, args.device, args.epochs = sigma, "cpu", steps // per_epoch
    optimizer, scheduler_iter, scheduler_epoch = expdecay_flow.get_optim(args, net)
    settings[run] = {"optimizer": type(optimizer).__name__, **optimizer.defaults,
                     **{k: getattr(args, k) for k in ("warmup", "gamma", "use_grad_norm")}}
    record = {"lr": [], "bpd": [], "scale_loss": [], "loss": []}

    def recording_elbo_bpd(model, x, record=record, optimizer=optimizer):
      s = len(record["lr"])
      forward.inject_noise(torch, model, draws[s][1], draws[s][2], passes=2)
      record["lr"].append(optimizer.param_groups[0]["lr"])
      loss, scale_loss = their_elbo_bpd(model, x)
      record["bpd"].append(loss.item())
      record["scale_loss"].append(scale_loss.item())
      record["loss"].append((loss + sigma * scale_loss).item())
      return loss, scale_loss

    baseline_flow.elbo_bpd = recording_elbo_bpd
    experiment = types.SimpleNamespace(
        model=net, optimizer=optimizer, scheduler_iter=scheduler_iter,
        scheduler_epoch=scheduler_epoch, args=args)
    try:
      for epoch in range(steps // per_epoch):
        batches = [torch.from_numpy(draws[s][0].astype(np.int64))
                   for s in range(epoch * per_epoch, (epoch + 1) * per_epoch)]
        experiment.train_loader = _Loader(batches)
        baseline_flow.FlowExperiment.train_fn(experiment, epoch)
    finally:
      baseline_flow.elbo_bpd = their_elbo_bpd
    for key, values in record.items():
      out[f"train/{run}/{key}"] = np.asarray(values, np.float64)
    print(f"  {run}: lr {np.round(record['lr'], 6).tolist()}\n    loss {record['loss']}")
  out["train_json"] = np.asarray(json.dumps(dict(TRAIN, runs=settings)))
  return out


def _half(a: np.ndarray) -> np.ndarray:
  return a.astype(np.float16).astype(np.float32)


class _Loader:
  """What their train_fn reads of a DataLoader: iteration and len(.dataset)."""

  def __init__(self, batches):
    self.batches = batches
    self.dataset = range(sum(len(b) for b in batches))

  def __iter__(self):
    return iter(self.batches)


def make_case(name: str, modules, out_dir: str) -> str:
  import torch
  from denseflow.utils import elbo_bpd

  case = GRADIENT_CASES[name]
  spec, batch, sigma, seed = _spec(case), case[1], case[2], case[3]
  model, rng = forward.build_model(modules[0], name, spec, 0 if seed is None else seed)
  initial_state = copy.deepcopy(model.state_dict())

  def new_model():
    """Their model afresh with the initial state, in training mode, sorting by logit. (Not a
    deepcopy: their DenseNet calls its layers through a closure that a copy would share.)"""
    m, _ = forward.build_model(modules[0], name, spec, 0 if seed is None else seed)
    m.load_state_dict(initial_state)
    m.train()
    _use_logit_sort(m)
    _use_torch18_kl_div(m)
    return m

  out = {f"weights/{k}": p.numpy().astype(np.float32)
         for k, p in initial_state.items() if p.is_floating_point()}
  x, eps, etas = forward.draw_inputs(rng, spec, batch)
  model = new_model()
  stock = new_model()
  for t in stock.transforms:
    if t.__class__.__name__ == "InvertibleTransition":
      t.loss_cal = torch.nn.KLDivLoss(reduction="batchmean")
  stock_scale, stock_grads = _scale_loss_grads(torch, stock, x, eps, etas)
  nan_tensors = sorted(k for k, g in stock_grads.items() if not np.all(np.isfinite(g)))
  print(f"{name}: with torch {torch.__version__}'s own kl_div, {len(nan_tensors)} tensors get a "
        f"non-finite gradient {nan_tensors}")
  bpd, scale_loss, grads = _objective_grads(torch, elbo_bpd, model, x, eps, etas, sigma)
  out.update({f"grad/{k}": g for k, g in grads.items()})
  scale_alone, scale_grads = _scale_loss_grads(torch, model, x, eps, etas)
  if not np.isclose(scale_alone, stock_scale, rtol=1e-6, atol=1e-7):
    raise SystemExit(f"{name}: the torch 1.8 kl_div gives {scale_alone}, torch's {stock_scale}.")
  out.update({f"grad_scale/{k}": g for k, g in scale_grads.items()})
  out["expected/bpd"], out["expected/scale_loss"] = np.float32(bpd), np.float32(scale_loss)

  model64 = _to_float64(new_model())  # built in float32 (their constant C is float32)
  default_dtype = torch.get_default_dtype()
  torch.set_default_dtype(torch.float64)  # their log_prob accumulates in a default-dtype zeros
  try:
    for wg in forward.weight_generators(model64):  # no float64 ties: torch's order is the logits'
      _, indices = type(wg).sort(wg)
      if not torch.equal(indices, wg.sort()[1]):
        raise SystemExit(f"{name}: torch's float64 order is not the logit order.")
    bpd64, scale64, grads64 = _objective_grads(torch, elbo_bpd, model64, x, eps, etas, sigma)
  finally:
    torch.set_default_dtype(default_dtype)
  out.update({f"grad64/{k}": g for k, g in grads64.items()})
  out["expected/bpd64"], out["expected/scale_loss64"] = np.float64(bpd64), np.float64(scale64)

  gap = _check_two_draws(torch, elbo_bpd, new_model(), x, np.random.RandomState(1234), spec,
                         sigma)
  print(f"{name}: bpd {bpd:.6f} (float64 {bpd64:.6f}), scale loss {scale_loss:.6f}; "
        f"two draws: objective = bpd(A) + sigma scale(B) to {gap:.1e} of the largest entry")
  if name == TRAIN_CASE:
    out.update(_train_runs(torch, new_model, spec, rng))
  out["inputs/x"], out["inputs/eps"] = x, eps
  for i, e in enumerate(etas):
    out[f"inputs/eta_{i}"] = e
  config = dict(forward.case_config(spec), sigma=sigma, batch=batch)
  out["config_json"] = np.asarray(json.dumps(config))
  path = os.path.join(out_dir, f"{name}.npz")
  np.savez_compressed(path, **out)
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--authors_repo", required=True, help="checkout of studying910/EIW-Flow")
  parser.add_argument("--out_dir", default=os.path.join("tests", "fixtures"))
  parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
  args = parser.parse_args()
  try:
    import torch  # noqa: F401
  except ImportError as e:
    raise SystemExit("This script needs torch: pip install torch==2.13.0") from e
  modules = forward.import_authors(args.authors_repo)
  forward.patch_small(*modules)
  wanted = [c for c in args.cases.split(",") if c] or list(GRADIENT_CASES)
  unknown = sorted(set(wanted) - set(GRADIENT_CASES))
  if unknown:
    raise SystemExit(f"Unknown cases {unknown}; known: {sorted(GRADIENT_CASES)}")
  os.makedirs(args.out_dir, exist_ok=True)
  for name in wanted:
    print("wrote", make_case(name, modules, args.out_dir))


if __name__ == "__main__":
  main()
