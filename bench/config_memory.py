"""Per-device memory and FLOPs of a config's compiled train step, from XLA's own analyses.

  python bench/config_memory.py configs/cifar10.py [configs/imagenet32.py ...]

Compiles the real train step (forward, backward, Adam, EMA) on this machine's backend without
running it and reads `compiled.memory_analysis()` (arguments: params, EMA, Adam moments, batch;
temporaries: activations kept for the backward pass and scratch) and `cost_analysis()` (FLOPs).
Compiling the full models (K=32-48 steps per level, 512 channels) takes many minutes on a
small CPU, so the step is compiled at K in --ks and per-device batch in --batches (four small
compilations) and both quantities are fitted as c0 + c1*K + b*(c2 + c3*K), which is exact for
a stack of identical steps (every flow step of a level has the same shapes), then evaluated at
the config's K and per-device batch on --devices devices. On CPU this estimates what an
accelerator needs (XLA's GPU/TPU buffer assignment differs, typically by tens of percent).
The wall-time estimate divides the run's FLOPs by an assumed sustained throughput per device
(--tflops, default 20: fp32 convolutions on an A100/H100-class GPU at a realistic
utilisation), so it is an order of magnitude, not a measurement.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eiw_flow_jax import optimizer, sharding, train, train_state  # noqa: E402
from eiw_flow_jax.model import build_flow  # noqa: E402


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("config_module", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def step_costs(config, steps_per_level: int, batch: int) -> tuple[float, float]:
  """(argument + temporary bytes, flops) of the train step at K=`steps_per_level`, `batch`."""
  config = config.copy_and_resolve_references()
  config.model.steps_per_level = steps_per_level
  config.batch_size = batch
  mesh = sharding.make_mesh(jax.devices()[:1])
  flow = build_flow(config)
  tx = optimizer.make_optimizer(config)
  state = train_state.abstract_state(flow, tx, mesh)
  images = jax.ShapeDtypeStruct((batch, *config.model.image_shape), jnp.uint8,
                                sharding=sharding.batch_sharding(mesh))
  step = train.make_train_step(config, flow, tx, mesh)
  compiled = step.lower(state, images).compile()
  analysis = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
  return float(memory), float(cost["flops"])


def fit(config, ks: tuple[int, int], batches: tuple[int, int]):
  """Coefficients (c0, c1, c2, c3) of memory and of flops in c0 + c1*K + b*(c2 + c3*K)."""
  (k0, k1), (b0, b1) = ks, batches
  m = {(k, b): step_costs(config, k, b) for k in ks for b in batches}
  out = []
  for i in range(2):
    per_b_k0 = (m[(k0, b1)][i] - m[(k0, b0)][i]) / (b1 - b0)
    per_b_k1 = (m[(k1, b1)][i] - m[(k1, b0)][i]) / (b1 - b0)
    c3 = (per_b_k1 - per_b_k0) / (k1 - k0)
    c2 = per_b_k0 - c3 * k0
    fixed_k0 = m[(k0, b0)][i] - b0 * per_b_k0
    fixed_k1 = m[(k1, b0)][i] - b0 * per_b_k1
    c1 = (fixed_k1 - fixed_k0) / (k1 - k0)
    c0 = fixed_k0 - c1 * k0
    out.append((c0, c1, c2, c3))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("configs", nargs="+")
  parser.add_argument("--batches", default="2,4", help="two per-device batches to compile")
  parser.add_argument("--ks", default="1,2", help="two steps-per-level values to compile")
  parser.add_argument("--devices", type=int, default=8, help="devices the batch is split over")
  parser.add_argument("--tflops", type=float, default=20.0,
                      help="assumed sustained TFLOP/s per device, for the wall-time estimate")
  args = parser.parse_args()
  small, large = (int(b) for b in args.batches.split(","))
  ks = tuple(int(k) for k in args.ks.split(","))
  batches = tuple(int(b) for b in args.batches.split(","))
  for path in args.configs:
    config = load_config(path)
    (m0, m1, m2, m3), (f0, f1, f2, f3) = fit(config, ks, batches)
    k = config.model.steps_per_level
    per_device = config.batch_size // args.devices
    memory = m0 + m1 * k + per_device * (m2 + m3 * k)
    fixed = m0 + m1 * k
    flops_per_example = f2 + f3 * k
    train_flops = flops_per_example * config.batch_size * config.num_train_steps
    hours = train_flops / (args.devices * args.tflops * 1e12) / 3600
    print(f"{os.path.basename(path)}: K={k}, state and fixed {fixed / 2**30:.2f} GiB + "
          f"{(m2 + m3 * k) / 2**20:.0f} MiB per example -> {memory / 2**30:.1f} GiB per device "
          f"at {per_device} per device ({config.batch_size} over {args.devices} devices); "
          f"{flops_per_example / 1e9:.0f} GFLOP per example per step; "
          f"{config.num_train_steps} steps at {args.tflops:g} TFLOP/s per device: "
          f"{hours:.0f} h", flush=True)

if __name__ == "__main__":
  main()
