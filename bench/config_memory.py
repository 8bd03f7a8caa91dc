"""Per-device memory of a config's compiled train step, from XLA's memory analysis.

  python bench/config_memory.py configs/cifar10.py [configs/imagenet32.py ...] [--batches=4,8]

Compiles the real train step (forward, backward, Adam, EMA) on this machine's backend at small
per-device batches without running it, reads `compiled.memory_analysis()` (arguments: params,
EMA, Adam moments, batch; temporaries: activations kept for the backward pass and scratch), and
extrapolates linearly in the batch to the config's per-device batch on `--devices` devices:
memory(b) = fixed + b * per_example, fitted on the compiled batches. On CPU this is an estimate
of what an accelerator needs (XLA's GPU/TPU buffer assignment differs, typically by a few tens
of percent); it is the figure quoted in each config's docstring. XLA's cost analysis gives the
step's FLOPs, fitted the same way; the wall-time estimate divides the run's FLOPs by an assumed
sustained throughput per device (--tflops, default 20: fp32 convolutions on an A100/H100-class
GPU at a realistic utilisation), so it is an order of magnitude, not a measurement.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eiw_flow_jax import train  # noqa: E402
from eiw_flow_jax.model import build_flow  # noqa: E402


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("config_module", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def step_costs(config, batch: int) -> tuple[int, float]:
  """(argument + temporary bytes, flops) of the train step compiled at global batch `batch`."""
  config = config.copy_and_resolve_references()
  config.batch_size = batch
  mesh = train.make_mesh(jax.devices()[:1])
  flow = build_flow(config)
  tx = train.make_optimizer(config)
  state = train.abstract_state(flow, tx, mesh)
  images = jax.ShapeDtypeStruct((batch, *config.model.image_shape), jnp.uint8,
                                sharding=train.batch_sharding(mesh))
  step = train.make_train_step(config, flow, tx, mesh)
  compiled = step.lower(state, images).compile()
  analysis = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return analysis.argument_size_in_bytes + analysis.temp_size_in_bytes, float(cost["flops"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("configs", nargs="+")
  parser.add_argument("--batches", default="2,4", help="per-device batches to compile")
  parser.add_argument("--devices", type=int, default=8, help="devices the batch is split over")
  parser.add_argument("--tflops", type=float, default=20.0,
                      help="assumed sustained TFLOP/s per device, for the wall-time estimate")
  args = parser.parse_args()
  small, large = (int(b) for b in args.batches.split(","))
  for path in args.configs:
    config = load_config(path)
    (mem_s, flops_s), (mem_l, flops_l) = step_costs(config, small), step_costs(config, large)
    per_example = (mem_l - mem_s) / (large - small)
    fixed = mem_s - small * per_example
    flops_per_example = (flops_l - flops_s) / (large - small)
    per_device = config.batch_size // args.devices
    total = fixed + per_device * per_example
    train_flops = flops_per_example * config.batch_size * config.num_train_steps
    hours = train_flops / (args.devices * args.tflops * 1e12) / 3600
    print(f"{os.path.basename(path)}: state+fixed {fixed / 2**30:.2f} GiB, "
          f"{per_example / 2**20:.1f} MiB per example; per-device batch {per_device} "
          f"({config.batch_size} over {args.devices} devices): {total / 2**30:.1f} GiB; "
          f"{flops_per_example / 1e9:.1f} GFLOP per example per step; "
          f"{config.num_train_steps} steps at {args.tflops:g} TFLOP/s sustained per device: "
          f"{hours:.0f} h", flush=True)

if __name__ == "__main__":
  main()
