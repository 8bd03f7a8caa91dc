"""Benchmark: compiled forward+backward step and sampling time, vanilla vs the EIW variants.

All variants are built and compiled first, then timed in interleaved rounds (so machine noise
hits them alike) and reported as medians and minima, each with its ratio to the vanilla split.
Figures belong in docs/benchmarks.md with the command and device that produced them.

  python bench/step_time.py                        # CIFAR-sized: 32x32x3, L=3, K=8, hidden 256
  python bench/step_time.py --batch=16 --hidden=64 --steps_per_level=4 --rounds=3   # quick
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import eiw_flow_jax
from eiw_flow_jax.config_lib import base_config

flags.DEFINE_integer("batch", 64, "Batch size.")
flags.DEFINE_integer("image_size", 32, "Image height and width.")
flags.DEFINE_integer("channels", 3, "Image channels.")
flags.DEFINE_integer("num_levels", 3, "Levels L.")
flags.DEFINE_integer("steps_per_level", 8, "Steps K per level.")
flags.DEFINE_integer("hidden", 256, "Coupling network width.")
flags.DEFINE_integer("rounds", 5, "Timed rounds per variant (after one warm-up call).")
flags.DEFINE_integer("num_samples", 64, "Images per sampling call.")
FLAGS = flags.FLAGS

VARIANTS = (("vanilla", "global"), ("eiw", "global"), ("eiw", "per_example"))


def _config(split: str, mode: str):
  config = base_config()
  m = config.model
  m.image_shape = (FLAGS.image_size, FLAGS.image_size, FLAGS.channels)
  m.num_levels, m.steps_per_level, m.hidden_channels = (
      FLAGS.num_levels, FLAGS.steps_per_level, FLAGS.hidden)
  m.split, m.eiw.mode = split, mode
  return config


def _timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def main(argv):
  del argv
  rng = np.random.RandomState(0)
  shape = (FLAGS.batch, FLAGS.image_size, FLAGS.image_size, FLAGS.channels)
  x = jnp.asarray(rng.randint(0, 256, shape).astype(np.uint8))
  jobs = {}
  for split, mode in VARIANTS:
    name = "vanilla" if split == "vanilla" else f"eiw_{mode}"
    flow = eiw_flow_jax.build_flow(_config(split, mode))
    variables = flow.init(jax.random.PRNGKey(0), x)
    params, constants = variables["params"], variables["constants"]

    def loss(p, c, x, key, flow=flow):
      return flow.loss({"params": p, "constants": c}, x, key)[0]

    step = jax.jit(jax.value_and_grad(loss))
    sample = jax.jit(
        lambda v, key, flow=flow: flow.sample(v, key, FLAGS.num_samples, 0.7))
    key = jax.random.PRNGKey(1)
    compile_s = _timed(step, params, constants, x, key) + _timed(sample, variables, key)
    jobs[name] = (step, (params, constants, x, key), sample, (variables, key))
    print(f"{name}: compiled step + sampler in {compile_s:.1f}s", flush=True)

  times = {name: {"step": [], "sample": []} for name in jobs}
  for _ in range(FLAGS.rounds):
    for name, (step, step_args, sample, sample_args) in jobs.items():
      times[name]["step"].append(_timed(step, *step_args))
      times[name]["sample"].append(_timed(sample, *sample_args))

  device = jax.devices()[0]
  print(f"\ndevice: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}), "
        f"jax {jax.__version__}")
  print(f"config: {shape[1:]} L={FLAGS.num_levels} K={FLAGS.steps_per_level} "
        f"hidden={FLAGS.hidden} batch={FLAGS.batch}, {FLAGS.rounds} timed rounds")
  base = {k: (float(np.median(v)), float(np.min(v))) for k, v in times["vanilla"].items()}
  print(f"{'variant':<17}{'step med s':>11}{'ratio':>7}{'step min s':>11}{'ratio':>7}"
        f"{'sample med s':>13}{'ratio':>7}{'img/s':>8}")
  for name, t in times.items():
    step_med, step_min = float(np.median(t["step"])), float(np.min(t["step"]))
    sample_med = float(np.median(t["sample"]))
    print(f"{name:<17}{step_med:>11.3f}{step_med / base['step'][0]:>7.3f}{step_min:>11.3f}"
          f"{step_min / base['step'][1]:>7.3f}{sample_med:>13.3f}"
          f"{sample_med / base['sample'][0]:>7.3f}{FLAGS.batch / step_med:>8.1f}")


if __name__ == "__main__":
  app.run(main)
