"""The train step's measured time on this machine's accelerators, next to the TPU compiler's
roofline for the same program: what to run when a TPU is lent.

Builds the step as `python -m eiw_flow_jax.main` does (`train_step.make_train_step` over a mesh
of every local device, the state from `train_state.create_state`'s data-dependent init), feeds
it random uint8 images of the config's shape (no dataset: the input pipeline is not timed),
runs --warmup steps, then --rounds rounds of --steps steps, each round timed from the first
dispatch to the last result (`block_until_ready`). Prints the step time (min and median over
rounds), images per second and per device, and with --roofline_topology the roofline of
`python -m eiw_flow_jax.aot` for the same config, batch per device and topology (the
topology of the chips this runs on, e.g. v5e:2x2), and the ratio of measured to roofline.

  python bench/step_time.py --config=configs/cifar10.py --per_device_batch=64 \\
      --roofline_topology=v5e:2x2 [--config.model.memory=remat] [--json=step.json]
  python bench/step_time.py --config=configs/digits.py --steps=3 --rounds=2   # CPU smoke run
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from eiw_flow_jax.model.flow import build_flow
from eiw_flow_jax.training import optimizer, run_config, sharding, train_state, train_step

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "digits.py"),
    "Config file; override fields with --config.<field>=<value>.", lock_config=True)
_PER_DEVICE_BATCH = flags.DEFINE_integer(
    "per_device_batch", None,
    "Images per device per step (global batch = this x local devices); default: the "
    "config's batch_size split over the devices.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first one compiles).")
_STEPS = flags.DEFINE_integer("steps", 20, "Steps per timed round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds.")
_ROOFLINE_TOPOLOGY = flags.DEFINE_string(
    "roofline_topology", None,
    "Also compile the step for this TPU topology (eiw_flow_jax.aot) and print its roofline.")
_JSON = flags.DEFINE_string("json", None, "Also write the figures as JSON here.")


def measure(config, per_device_batch: int | None, warmup: int, steps: int,
            rounds: int) -> dict:
  """Seconds per train step (each round's mean) on every local device, and what ran."""
  devices = jax.devices()
  config = config.copy_and_resolve_references()
  if per_device_batch is not None:
    config.batch_size = per_device_batch * len(devices)
  run_config.validate_config(config, num_devices=len(devices))
  mesh = sharding.make_mesh(devices)
  flow, tx = build_flow(config), optimizer.make_optimizer(config)
  rng = np.random.default_rng(0)
  levels = 2**int(config.model.n_bits)

  def images(count: int) -> np.ndarray:
    return rng.integers(0, levels, (count, *flow.image_shape), dtype=np.uint8)

  state = train_state.create_state(config, flow, tx, mesh, images(config.init_batch_size))
  step = train_step.make_train_step(config, flow, tx, mesh)
  batch = sharding.global_batch(images(config.batch_size), sharding.batch_sharding(mesh))
  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(state)
  seconds = []
  for _ in range(rounds):
    started = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    seconds.append((time.perf_counter() - started) / steps)
  return {
      "device_kind": devices[0].device_kind, "devices": len(devices),
      "platform": devices[0].platform, "global_batch": int(config.batch_size),
      "per_device_batch": int(config.batch_size) // len(devices),
      "memory": config.model.get("memory", "store"), "dtype": config.model.get("dtype", "auto"),
      "step_seconds": seconds, "finite": bool(metrics["finite"]),
  }


def main(argv: list[str]) -> None:
  del argv
  figures = measure(_CONFIG.value, _PER_DEVICE_BATCH.value, _WARMUP.value, _STEPS.value,
                    _ROUNDS.value)
  fastest, median = min(figures["step_seconds"]), statistics.median(figures["step_seconds"])
  print(f"{figures['devices']} x {figures['device_kind']} ({figures['platform']}), "
        f"{figures['per_device_batch']} images per device, memory={figures['memory']}, "
        f"dtype={figures['dtype']}")
  print(f"measured step: {fastest * 1e3:.2f} ms (min of {_ROUNDS.value} rounds of "
        f"{_STEPS.value} steps), median {median * 1e3:.2f} ms; "
        f"{figures['global_batch'] / fastest:.0f} images/s, "
        f"{figures['per_device_batch'] / fastest:.0f} per device")
  if _ROOFLINE_TOPOLOGY.value:
    from eiw_flow_jax.aot.compiler import compile_for_topology  # noqa: PLC0415 - needs libtpu

    report = compile_for_topology(_CONFIG.value, _ROOFLINE_TOPOLOGY.value,
                                  figures["per_device_batch"], with_eval=False)
    figures["roofline_seconds"] = report.step_seconds
    print(f"roofline ({_ROOFLINE_TOPOLOGY.value}, TPU compiler): "
          f"{report.step_seconds * 1e3:.3g} ms; measured / roofline = "
          f"{fastest / report.step_seconds:.3g}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(figures, f, indent=2)


if __name__ == "__main__":
  app.run(main)
