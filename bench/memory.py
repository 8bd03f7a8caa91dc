"""Benchmark: activation memory, step time and inverse drift of config.model.memory modes.

1. Memory: XLA's memory analysis of the compiled loss-and-gradient function
   (`jax.jit(jax.value_and_grad(loss)).lower(...).compile().memory_analysis()`), temporary
   bytes for K in --ks under "store", "remat" and "invert", with ratios to "store". Only
   compiled, never run, so the CIFAR config (32x32x3, L=3, width 512, batch 64) is cheap.
2. Step time: the same function run at --time_k / --time_hidden / --time_batch, each mode in
   its own worker process (bench/workers.py), interleaved over --rounds rounds (min and
   median, ratio to "store"). The full train step per mode: bench/peer_pytorch.py --peers=jax
   --config_variant=remat=model.memory=remat.
3. Drift: per level, the relative error of the level input rebuilt through the inverses of its
   K steps (`MultiScaleFlow.inverse_drift`), for parameters perturbed by Gaussian noise of each
   --drift_scales (a stand-in for trained weights, which move away from the identity init).

  python bench/memory.py                                  # everything, CIFAR config
  python bench/memory.py --ks=4,8 --rounds=0 --drift_scales=   # memory table only
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import workers
from absl import app, flags

import eiw_flow_jax
from eiw_flow_jax.config.schema import base_config

flags.DEFINE_list("ks", ["4", "8", "16", "32"], "Steps per level K for the memory table.")
flags.DEFINE_list("modes", ["store", "remat", "invert"], "Memory modes.")
flags.DEFINE_integer("batch", 64, "Batch for the memory table.")
flags.DEFINE_integer("hidden", 512, "Coupling width for the memory table.")
flags.DEFINE_integer("image_size", 32, "Image height and width.")
flags.DEFINE_integer("num_levels", 3, "Levels L.")
flags.DEFINE_string("split", "vanilla", "vanilla | eiw (global).")
flags.DEFINE_integer("time_k", 8, "K for the timing (0: skip timing).")
flags.DEFINE_integer("time_hidden", 256, "Width for the timing.")
flags.DEFINE_integer("time_batch", 16, "Batch for the timing.")
flags.DEFINE_integer("rounds", 5, "Timed rounds (interleaved over modes).")
flags.DEFINE_list("drift_ks", ["8", "32"], "K values for the drift measurement.")
flags.DEFINE_list("drift_scales", ["0.0", "0.02", "0.05"], "Parameter noise for the drift.")
flags.DEFINE_integer("drift_hidden", 64, "Width for the drift measurement.")
flags.DEFINE_string("worker", "", "Internal: run as the step-time worker of this memory mode.")
FLAGS = flags.FLAGS

MIB = 2.0**20


def _config(k: int, hidden: int, mode: str):
  config = base_config()
  m = config.model
  m.image_shape = (FLAGS.image_size, FLAGS.image_size, 3)
  m.num_levels, m.steps_per_level, m.hidden_channels = FLAGS.num_levels, k, hidden
  m.split, m.memory = FLAGS.split, mode
  return config


def _loss_and_grad(config):
  flow = eiw_flow_jax.build_flow(config)

  def loss(params, constants, x, key):
    return flow.loss({"params": params, "constants": constants}, x, key)[0]

  return flow, jax.jit(jax.value_and_grad(loss))


def _abstract_args(flow, batch):
  x = jax.ShapeDtypeStruct((batch, *flow.image_shape), jnp.uint8)
  variables = jax.eval_shape(flow.init, jax.random.PRNGKey(0), x)
  return variables["params"], variables["constants"], x, jax.eval_shape(jax.random.PRNGKey, 0)


def memory_table() -> None:
  print(f"## Temporary memory of loss+grad (XLA memory_analysis), {FLAGS.image_size}x"
        f"{FLAGS.image_size}x3, L={FLAGS.num_levels}, width {FLAGS.hidden}, batch {FLAGS.batch}, "
        f"split {FLAGS.split}\n")
  print("| K | " + " | ".join(f"{m} MiB | ratio" for m in FLAGS.modes) + " | "
        + " | ".join(f"{m} compile s" for m in FLAGS.modes) + " |")
  print("| --- " * (3 * len(FLAGS.modes) + 1) + "|")
  for k in map(int, FLAGS.ks):
    temps, seconds = {}, {}
    for mode in FLAGS.modes:
      flow, fn = _loss_and_grad(_config(k, FLAGS.hidden, mode))
      start = time.perf_counter()
      analysis = fn.lower(*_abstract_args(flow, FLAGS.batch)).compile().memory_analysis()
      seconds[mode] = time.perf_counter() - start
      temps[mode] = analysis.temp_size_in_bytes
    base = temps.get("store", next(iter(temps.values())))
    cells = " | ".join(f"{temps[m] / MIB:.0f} | {temps[m] / base:.3f}" for m in FLAGS.modes)
    times = " | ".join(f"{seconds[m]:.0f}" for m in FLAGS.modes)
    print(f"| {k} | {cells} | {times} |", flush=True)


TIMING_FLAGS = ("time_k", "time_hidden", "time_batch", "image_size", "num_levels", "split")


def timing_worker(mode: str) -> None:
  """One mode's loss and gradient at the timing size, served to `timing` (bench/workers.py)."""
  k, hidden, batch = FLAGS.time_k, FLAGS.time_hidden, FLAGS.time_batch
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randint(0, 256, (batch, FLAGS.image_size, FLAGS.image_size, 3), np.uint8))
  flow, fn = _loss_and_grad(_config(k, hidden, mode))
  variables = flow.init(jax.random.PRNGKey(0), x)  # the same in every mode's process
  args = (variables["params"], variables["constants"], x, jax.random.PRNGKey(1))
  jax.block_until_ready(fn(*args))
  workers.serve(mode, lambda: jax.block_until_ready(fn(*args)), {})


def timing() -> None:
  k, hidden, batch = FLAGS.time_k, FLAGS.time_hidden, FLAGS.time_batch
  pool = workers.InterleavedWorkers()
  passed = [f"--{name}={getattr(FLAGS, name)}" for name in TIMING_FLAGS]
  for mode in FLAGS.modes:  # one after the other: compiles do not overlap
    pool.start(mode, [os.path.abspath(__file__), f"--worker={mode}", *passed],
               env=workers.worker_environ(), cwd=workers.REPO)
  times = pool.time_steps(FLAGS.rounds)
  pool.close()
  print(f"\n## Step time (loss+grad), K={k}, width {hidden}, batch {batch}, "
        f"{pool.describe(FLAGS.rounds, 1, 'mode')}\n")
  print("| mode | median s | ratio | min s | ratio |\n| --- | --- | --- | --- | --- |")
  ref = "store" if "store" in times else FLAGS.modes[0]
  med0, min0 = np.median(times[ref]), np.min(times[ref])
  for mode, t in times.items():
    print(f"| {mode} | {np.median(t):.3f} | {np.median(t) / med0:.3f} | {np.min(t):.3f} | "
          f"{np.min(t) / min0:.3f} |", flush=True)


def drift() -> None:
  print(f"\n## Inverse drift per level (relative max error of the level input rebuilt through "
        f"K inverses), width {FLAGS.drift_hidden}, batch 16\n")
  print("| K | param noise | " + " | ".join(f"level {lv}" for lv in range(FLAGS.num_levels))
        + " |")
  print("| --- " * (FLAGS.num_levels + 2) + "|")
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randint(0, 256, (16, FLAGS.image_size, FLAGS.image_size, 3), np.uint8))
  for k in map(int, FLAGS.drift_ks):
    flow = eiw_flow_jax.build_flow(_config(k, FLAGS.drift_hidden, "store"))
    variables = flow.init(jax.random.PRNGKey(0), x)
    y = flow.dequantize(x, jax.random.PRNGKey(1))
    fn = jax.jit(lambda v, y, flow=flow: flow.module.apply(v, y, method="inverse_drift"))
    for scale in map(float, FLAGS.drift_scales):
      params = variables["params"]
      leaves, treedef = jax.tree.flatten(params)
      keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
      noisy = [p + scale * jax.random.normal(key, p.shape) for p, key in zip(leaves, keys)]
      v = {**variables, "params": jax.tree.unflatten(treedef, noisy)}
      drifts = [float(d) for d in fn(v, y)]
      print(f"| {k} | {scale} | " + " | ".join(f"{d:.2e}" for d in drifts) + " |", flush=True)


def main(argv):
  del argv
  if FLAGS.worker:
    timing_worker(FLAGS.worker)
    return
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}\n")
  if FLAGS.ks:
    memory_table()
  if FLAGS.time_k and FLAGS.rounds:
    timing()
  if FLAGS.drift_scales:
    drift()


if __name__ == "__main__":
  app.run(main)
