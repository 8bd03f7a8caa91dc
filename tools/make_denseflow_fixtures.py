"""Writes the DenseFlow parity fixtures from the authors' PyTorch code (needs torch).

  python tools/make_denseflow_fixtures.py --authors_repo=/path/to/EIW-Flow \\
      [--denseflow_repo=/path/to/DenseFlow] [--out_dir=tests/fixtures]

`--authors_repo` is a checkout of github.com/studying910/EIW-Flow (its `DIW-Flow/` directory
is used; passing that directory itself works too); `--denseflow_repo` one of
github.com/matejgrcic/DenseFlow (vanilla transitions). Nothing of either is copied here: the
script imports their code from the given path, builds their `DenseFlow` model on small random
configs, randomises every weight (zero-initialised layers included, so every path counts),
feeds fixed uint8 images and fixed noise draws (dequantization eps and every unit's
augmentation eta, injected in place of their samplers), and writes per fixture an .npz with
the state_dict, inputs, noise (NCHW, as torch has them), the config, and the expected
outputs of their `Flow.log_prob` loop: every transform's log-det and the final
log-likelihood (`elbo`) and EIW `scale_loss`. `tests/test_denseflow_parity.py` converts the
weights with `eiw_flow_jax.commands.convert` and compares, without torch.

The coupling and dequantization networks of their code have hard-coded widths (DNMH: depth 7,
growth 64; the dequantizer: 4 steps, 64 channels) that would make a fixture tens of MB. Those
constants are patched to small values here (the same classes, narrower); the config written
alongside records them, and `eiw_flow_jax`'s config exposes them as fields. The full-width
parameter counts are computed separately (`--param_counts`, no patching).

The `saturated` cases keep the EIW weight generators at torch's default initialisation (the
scale a trained model has, not the small rescaled weights of the other cases): their softmax
over C channels underflows, to float32 subnormals (which torch keeps and sorts as distinct)
and exact zeros (which tie, and torch's descending sort leaves in no defined order). Each such
case states where its ties and subnormals must lie (asserted, with the seed chosen for it), and
records per transition torch's weights and sort indices, plus the ELBO and scale loss of the
same model with the weight generator's sort replaced by a stable sort of its logits (the rule
of `eiw_flow_jax`): the scale loss depends on the order of tied channels, the ELBO must not
where every tie lies in the factored half.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np

SMALL = {
    "coupling_depth": 2,
    "coupling_growth": 4,
    "dequant_steps": 2,
    "dequant_context_channels": 4,
    "dequant_mid_channels": 4,
    "dequant_depth": 1,
    "dequant_growth": 4,
    "dequant_context_depth": 2,
    "dequant_context_growth": 4,
}

CASES = {
    # name: (repo kind, data_shape CHW, block_conf, layers_conf, layer_mid_chnls, growth_rate
    #        [, saturation: what the default-scale weight generators must show, and the seed])
    "denseflow_eiw_3scale": ("eiw", (1, 16, 16), [2, 1, 2], [1, 1, 1], [4, 4, 4], 2),
    "denseflow_vanilla_tiny": ("denseflow", (3, 8, 8), [2, 2], [1, 2], [6, 4], 2),
    # C = 96: torch's 7 zeros (tied) and 18 subnormals all in the factored half.
    "denseflow_eiw_saturated_factored": (
        "eiw", (3, 8, 8), [2, 1], [1, 1], [4, 4], 12,
        {"seed": 6, "zeros_in_factored": True, "subnormals_in_kept": False}),
    # C = 144: 8 subnormal weights among the kept 72 (distinct in torch, 0 when flushed), 41
    # zeros in the factored half.
    "denseflow_eiw_saturated_kept": (
        "eiw", (9, 8, 8), [1, 1], [1, 1], [4, 4], 4,
        {"seed": 1, "zeros_in_factored": True, "subnormals_in_kept": True}),
}

FULL_COUNTS = {
    # name: (data_shape, block_conf, layers_conf, layer_mid_chnls, growth_rate)
    "DF-74-10 3x32x32": ((3, 32, 32), [6, 4, 1], [5, 6, 20], [48, 48, 48], 10),
    "DF-74-10 3x64x64": ((3, 64, 64), [6, 4, 1], [5, 6, 20], [48, 48, 48], 10),
}


def import_authors(root: str):
  """Imports their DenseFlow with `root` (the dir holding `denseflow/`) first on sys.path."""
  if os.path.isdir(os.path.join(root, "DIW-Flow")):
    root = os.path.join(root, "DIW-Flow")
  if not os.path.isdir(os.path.join(root, "denseflow")):
    raise SystemExit(f"{root} has no denseflow/ package: pass a checkout of the repository.")
  sys.path.insert(0, root)
  import experiments.image.model.affine_coupling as affine_coupling
  import experiments.image.model.dense_flow as dense_flow
  import experiments.image.model.dequantization as dequantization

  return dense_flow, affine_coupling, dequantization


def patch_small(dense_flow, affine_coupling, dequantization) -> None:
  original_dnmh = affine_coupling.DenseNetMultihead

  def small_dnmh(**kwargs):
    kwargs.update(depth=SMALL["coupling_depth"], growth=SMALL["coupling_growth"])
    return original_dnmh(**kwargs)

  affine_coupling.DenseNetMultihead = small_dnmh
  original_block = dequantization.DenseBlock  # only the context network uses it directly

  def small_block(**kwargs):
    kwargs.update(depth=SMALL["dequant_context_depth"], growth=SMALL["dequant_context_growth"])
    return original_block(**kwargs)

  dequantization.DenseBlock = small_block
  dense_flow.DequantizationFlow = functools.partial(
      dequantization.DequantizationFlow,
      num_steps=SMALL["dequant_steps"],
      num_context=SMALL["dequant_context_channels"],
      mid_channels=SMALL["dequant_mid_channels"],
      depth=SMALL["dequant_depth"],
      growth=SMALL["dequant_growth"],
  )


class _QueuedNormal:
  """Stands in for a block's torch Normal(0, 1): hands out the given draws in order."""

  def __init__(self, torch, draws):
    self.draws = list(draws)
    self.dist = torch.distributions.Normal(0.0, 1.0)

  def sample(self, size):
    eta = self.draws.pop(0)
    assert tuple(eta.shape) == tuple(size), (eta.shape, size)
    return eta

  def log_prob(self, x):
    return self.dist.log_prob(x)


SMALLEST_NORMAL = np.float32(2.0**-126)


def weight_generators(model) -> list:
  return [t.weightGenerator for t in model.transforms
          if t.__class__.__name__ == "InvertibleTransition"]


def _generator_outputs(wg) -> tuple[np.ndarray, np.ndarray]:
  """torch's float32 weights and descending-sort indices of one weight generator."""
  import torch

  with torch.no_grad():
    weight, indices = wg.sort()
  return weight[0].numpy(), indices.numpy()


def check_saturation(model, want: dict) -> list[str]:
  """What `want` asks of the weight generators' float32 softmax that they do not show."""
  problems, zeros_seen, kept_subnormals = [], False, False
  for t, wg in enumerate(weight_generators(model)):
    weight, indices = _generator_outputs(wg)
    kept = len(weight) // 2
    ordered = weight[indices]
    tied = np.zeros(len(weight), bool)
    same = ordered[1:] == ordered[:-1]
    tied[1:] |= same
    tied[:-1] |= same
    if tied[:kept].any():  # ties among kept channels: the authors' likelihood is undefined
      problems.append(f"transition {t}: {int(tied[:kept].sum())} kept channels tie")
    zeros_seen |= bool((weight == 0).any())
    kept_subnormals |= bool(((ordered[:kept] > 0) & (ordered[:kept] < SMALLEST_NORMAL)).any())
    if not want["subnormals_in_kept"] and (ordered[:kept] < SMALLEST_NORMAL).any():
      problems.append(f"transition {t}: kept weights below the normal range")
  if want["zeros_in_factored"] and not zeros_seen:
    problems.append("no weight underflows to 0")
  if want["subnormals_in_kept"] and not kept_subnormals:
    problems.append("no subnormal weight among the kept channels")
  return problems


def logit_sort(self):
  """WeightGenerator.sort with torch's sort of the weights replaced by a stable descending sort
  of the logits (eiw_flow_jax's rule); the weights returned are the same."""
  import torch

  logits = self.fc[2](self.fc[1](self.fc[0](self.in_channel)))
  _, indices = torch.sort(logits, descending=True, stable=True)
  return self.fc[3](logits), indices[0]


def _log_prob_loop(torch, model, x, batch) -> tuple[dict, list]:
  """Their `Flow.log_prob` loop, every transform's log-det kept; (outputs, scale losses)."""
  out = {}
  h_t = torch.from_numpy(x.astype(np.int64))
  total = torch.zeros(batch)
  losses = []
  for i, t in enumerate(model.transforms):
    res = t(h_t)
    if t.__class__.__name__ == "InvertibleTransition" and len(res) == 3:
      h_t, ld, loss = res
      losses.append(loss)
    else:
      h_t, ld = res
    out[f"expected/ldj_{i}"] = ld.numpy().astype(np.float32)
    total = total + ld
  base_lp = model.base_dist.log_prob(h_t)
  out["expected/base_log_prob"] = base_lp.numpy()
  out["expected/z_top"] = h_t.numpy()
  out["expected/elbo"] = (total + base_lp).numpy()
  return out, losses


def build_model(dense_flow, name: str, spec, seed: int):
  """Their `DenseFlow` (from the module `dense_flow`) for one CASES entry, every weight
  randomised as the module doc says; (model in eval mode, the numpy RandomState that drew the
  weights, to draw inputs next)."""
  import torch

  shape, blocks, layers, mids, growth = spec[1:6]
  saturation = spec[6] if len(spec) > 6 else None
  if saturation is not None:
    seed = saturation["seed"]
  torch.manual_seed(seed)
  rng = np.random.RandomState(seed)
  model = dense_flow.DenseFlow(data_shape=shape, block_config=blocks, layers_config=layers,
                               layer_mid_chnls=mids, growth_rate=growth, checkpointing=False)
  if saturation is not None:
    problems = check_saturation(model, saturation)
    if problems:
      raise SystemExit(f"{name} (seed {seed}): {'; '.join(problems)}: choose another seed.")
  with torch.no_grad():
    for key, p in model.state_dict().items():
      if not p.is_floating_point() or key.split(".")[-1] in _FIXED_BUFFERS:
        continue
      if saturation is not None and ".weightGenerator." in key:
        continue  # torch's default initialisation: the scale at which the softmax saturates
      if key.endswith("running_var"):
        p.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, p.shape).astype(np.float32)))
      elif key.endswith("initialized"):
        p.fill_(1.0)
      elif p.ndim == 2 and p.shape[0] == p.shape[1] and "fc" not in key:  # invertible 1x1 conv
        q, _ = np.linalg.qr(rng.randn(*p.shape))
        p.copy_(torch.from_numpy((q + 0.1 * rng.randn(*p.shape)).astype(np.float32)))
      else:
        scale = 0.3 if p.ndim == 4 else 0.2
        p.copy_(torch.from_numpy((scale * rng.randn(*p.shape)).astype(np.float32)))
  model.eval()
  return model, rng


def draw_inputs(rng: np.random.RandomState, spec, batch: int):
  """uint8 images (B, C, H, W), the dequantizer's eps and each unit's augmentation eta."""
  shape, blocks, growth = spec[1], spec[2], spec[5]
  x = rng.randint(0, 256, size=(batch, *shape)).astype(np.uint8)
  c, h, w = shape
  eps = rng.randn(batch, 4 * c, h // 2, w // 2).astype(np.float32)
  etas, cur_c, cur_h = [], 4 * c, h // 2
  for b, units in enumerate(blocks):
    etas += [rng.randn(batch, growth, cur_h, cur_h).astype(np.float32) for _ in range(units - 1)]
    cur_c += growth * (units - 1)
    if b < len(blocks) - 1:
      cur_c, cur_h = 2 * cur_c, cur_h // 2
  return x, eps, etas


def case_config(spec) -> dict:
  """The config written with a fixture: the model's arguments and the patched widths."""
  kind, shape, blocks, layers, mids, growth = spec[:6]
  return {"kind": kind, "data_shape": list(shape), "block_conf": blocks,
          "layers_conf": layers, "layer_mid_chnls": mids, "growth_rate": growth, **SMALL}


def make_case(name: str, spec, out_dir: str, seed: int) -> str:
  import torch

  saturation = spec[6] if len(spec) > 6 else None
  model, rng = build_model(_DENSE_FLOW, name, spec, seed)
  batch = 2
  x, eps, etas = draw_inputs(rng, spec, batch)

  inject_noise(torch, model, eps, etas)

  with torch.no_grad():
    out, losses = _log_prob_loop(torch, model, x, batch)
    if not np.all(np.isfinite(out["expected/elbo"])):
      raise SystemExit(f"{name}: their model's ELBO is not finite: {out['expected/elbo']}.")
    out["expected/scale_loss"] = np.float32(sum(float(v) for v in losses)) if losses else (
        np.float32(0.0))
    bpd = -torch.from_numpy(out["expected/elbo"]).sum() / (np.log(2.0) * x.size)
    out["expected/bpd"] = np.float32(bpd)
    if saturation is not None:
      for t, wg in enumerate(weight_generators(model)):
        out[f"expected/wg_weights_{t}"], out[f"expected/wg_indices_{t}"] = (
            _generator_outputs(wg))
      # The same model and noise with the logit order (the noise queues are refilled).
      inject_noise(torch, model, eps, etas)
      generator_class = type(weight_generators(model)[0])
      torch_sort = generator_class.sort
      generator_class.sort = logit_sort
      try:
        logit_out, logit_losses = _log_prob_loop(torch, model, x, batch)
      finally:
        generator_class.sort = torch_sort
      out["expected/elbo_logit_order"] = logit_out["expected/elbo"]
      out["expected/scale_loss_logit_order"] = np.float32(sum(float(v) for v in logit_losses))
      # Every tie is in the factored half, so only the order of N(0, I) terms in a float32
      # sum changes: within the parity test's tolerance.
      gap = np.abs(logit_out["expected/elbo"] - out["expected/elbo"])
      if not np.all(gap <= 2e-3 + 1e-5 * np.abs(out["expected/elbo"])):
        raise SystemExit(f"{name}: the ELBO depends on the order of tied channels ({gap}).")

  for key, p in model.state_dict().items():
    if p.is_floating_point():
      out[f"weights/{key}"] = p.numpy().astype(np.float32)
  out["inputs/x"] = x
  out["inputs/eps"] = eps
  for i, e in enumerate(etas):
    out[f"inputs/eta_{i}"] = e
  out["config_json"] = np.asarray(json.dumps(case_config(spec)))
  path = os.path.join(out_dir, f"{name}.npz")
  np.savez_compressed(path, **out)
  return path


def inject_noise(torch, model, eps: np.ndarray, etas: list[np.ndarray], passes: int = 1) -> None:
  """The dequantizer's base draw and each block's augmentation draws, in place of sampling,
  for `passes` forward passes that all see these same draws."""
  base = model.transforms[0].encoder.base_dist
  eps_t = torch.from_numpy(eps)
  base.sample = lambda num: base.loc + base.log_scale.exp() * eps_t
  queue = [torch.from_numpy(e) for e in etas]
  for t in model.transforms:
    if t.__class__.__name__ == "InvertibleDenseBlock":
      n = len(t.blocks) - 1
      t.noise_dist = _QueuedNormal(torch, queue[:n] * passes)
      queue = queue[n:]


def param_counts(out_dir: str) -> str:
  counts = {}
  for name, (shape, blocks, layers, mids, growth) in FULL_COUNTS.items():
    model = _DENSE_FLOW.DenseFlow(data_shape=shape, block_config=blocks, layers_config=layers,
                                  layer_mid_chnls=mids, growth_rate=growth, checkpointing=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts[name] = {"data_shape": list(shape), "block_conf": blocks, "layers_conf": layers,
                    "layer_mid_chnls": mids, "growth_rate": growth, "trainable": trainable}
    print(name, trainable)
    del model
  path = os.path.join(out_dir, f"denseflow_param_counts_{_KIND}.json")
  with open(path, "w") as f:
    json.dump(counts, f, indent=2)
  return path


_DENSE_FLOW = None
_KIND = None
# Buffers that are constants of the model, not weights: left as the model sets them.
_FIXED_BUFFERS = {"_shift", "_scale", "ldj_per_dim", "temperature", "buffer",
                  "num_batches_tracked"}


def main() -> None:
  global _DENSE_FLOW, _KIND
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--authors_repo", help="checkout of studying910/EIW-Flow")
  parser.add_argument("--denseflow_repo", help="checkout of matejgrcic/DenseFlow")
  parser.add_argument("--out_dir", default=os.path.join("tests", "fixtures"))
  parser.add_argument("--param_counts", action="store_true",
                      help="also count the full-width DF-74-10 parameters (slow, ~1 GB RAM)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cases", default="",
                      help="comma-separated case names to write (default: all of the kind)")
  args = parser.parse_args()
  try:
    import torch  # noqa: F401
  except ImportError as e:
    raise SystemExit("This script needs torch: pip install torch==2.13.0") from e
  repo = {"eiw": args.authors_repo, "denseflow": args.denseflow_repo}
  kinds = [k for k in ("eiw", "denseflow") if repo[k]]
  if len(kinds) != 1:
    raise SystemExit("Pass exactly one of --authors_repo or --denseflow_repo per run (both "
                     "repositories define the same package names).")
  _KIND = kinds[0]
  modules = import_authors(repo[_KIND])
  _DENSE_FLOW = modules[0]
  os.makedirs(args.out_dir, exist_ok=True)
  if args.param_counts:
    print("wrote", param_counts(args.out_dir))
  patch_small(*modules)
  wanted = [c for c in args.cases.split(",") if c]
  unknown = sorted(set(wanted) - set(CASES))
  if unknown:
    raise SystemExit(f"Unknown cases {unknown}; known: {sorted(CASES)}")
  for i, (name, spec) in enumerate(CASES.items()):
    if spec[0] == _KIND and (not wanted or name in wanted):
      print("wrote", make_case(name, spec, args.out_dir, args.seed + i))


if __name__ == "__main__":
  main()
