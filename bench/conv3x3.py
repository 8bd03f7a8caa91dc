"""Benchmark: Glow's skewed 3x3 convolutions as lax.conv against `conv3x3_by_matmul` (CPU).

`kernels.apply_conv` computes, on CPU, a 3x3 convolution with few channels on one side (the
coupling network's first layer C/2 -> hidden and its zero-initialised last layer hidden -> C)
as one matmul plus nine shifted copies. This script measures that choice two ways:

- `--part=layers`: each such layer of the configured Glow alone, forward + backward (gradients
  with respect to input and kernel), lax.conv against the matmul form, compiled in one process
  and timed in interleaved rounds; min and median ms, GFLOP/s (2 x MACs x 3 for fwd+bwd) and
  the speed-up.
- `--part=step`: the whole train step of `bench/peer_pytorch.py` (loss, gradient, Adam, EMA),
  once with every convolution on lax.conv and once with the matmul form, each in its own
  process, interleaved round by round (`--steps_per_turn` steps back to back per turn, as in
  `bench/peer_pytorch.py`).

  python bench/conv3x3.py --part=layers            # 32x32x3, L=3, K=8, width 256, batch 16
  python bench/conv3x3.py --part=step --rounds=10
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np
import peer_pytorch  # its flags (model shape, rounds, pause) and its JAX train-step peer
import workers
from absl import app, flags

flags.DEFINE_enum("part", "layers", ["layers", "step"], "What to time.")
FLAGS = flags.FLAGS

VARIANTS = ("lax", "matmul")


def _lax_conv(x, kernel):
  """The reference: XLA's own SAME convolution."""
  import jax

  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _use_lax_conv() -> None:
  """Route every 3x3 convolution back to lax.conv (the reference for this comparison)."""
  from eiw_flow_jax.kernels import xla_cpu

  xla_cpu.conv3x3_by_matmul = _lax_conv  # xla_cpu.conv looks it up at trace time


def _force_matmul_form() -> None:
  """Route every skewed 3x3 convolution to the matmul form, whatever the width, so that the
  step A/B measures the form itself at small widths too."""
  from eiw_flow_jax.kernels import xla_cpu

  # The dispatcher looks the rule up at trace time.
  xla_cpu.conv3x3_takes_matmul_form = functools.partial(
      xla_cpu.conv3x3_takes_matmul_form, min_width=0)


def _layer_shapes() -> list[tuple[int, int, int]]:
  """(size, C_in, C_out) of the configured Glow's 3x3 layers with few channels on one side
  (`conv3x3_takes_matmul_form` at any width)."""
  from eiw_flow_jax.kernels.xla_cpu import conv3x3_takes_matmul_form

  shapes, c, size = [], FLAGS.channels, FLAGS.image_size
  for level in range(FLAGS.num_levels):
    c, size = 4 * c, size // 2
    shapes += [(size, c // 2, FLAGS.hidden), (size, FLAGS.hidden, 2 * (c - c // 2))]
    if level < FLAGS.num_levels - 1:
      c //= 2
  return [(s, i, o) for s, i, o in shapes
          if conv3x3_takes_matmul_form((3, 3, i, o), min_width=0)]


def _time_layers() -> None:
  import jax
  import jax.numpy as jnp

  from eiw_flow_jax.kernels.xla_cpu import conv3x3_by_matmul

  print(f"batch {FLAGS.batch}, forward + backward (input and kernel gradients), "
        f"{FLAGS.rounds} interleaved rounds, backend {jax.default_backend()}\n")
  print("| layer | lax median ms | lax min ms | matmul median ms | matmul min ms | "
        "lax GFLOP/s (min) | matmul GFLOP/s (min) | speed-up (min) |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  key = jax.random.PRNGKey(0)
  for size, cin, cout in _layer_shapes():
    x = jax.random.normal(key, (FLAGS.batch, size, size, cin))
    kernel = 0.1 * jax.random.normal(key, (3, 3, cin, cout))
    cotangent = jax.random.normal(key, (FLAGS.batch, size, size, cout))
    steps = {}
    for name, conv in (("lax", _lax_conv), ("matmul", conv3x3_by_matmul)):
      steps[name] = jax.jit(jax.grad(lambda x, k, conv=conv, c=cotangent: jnp.vdot(conv(x, k), c),
                                     argnums=(0, 1)))
      jax.block_until_ready(steps[name](x, kernel))
    times = {name: [] for name in steps}
    for _ in range(FLAGS.rounds):
      for name, step in steps.items():
        start = time.perf_counter()
        jax.block_until_ready(step(x, kernel))
        times[name].append(time.perf_counter() - start)
    flops = 3 * 2 * FLAGS.batch * size * size * 9 * cin * cout
    lax_t, mm_t = np.array(times["lax"]), np.array(times["matmul"])
    print(f"| {size}x{size}, {cin} -> {cout} | {1e3 * np.median(lax_t):.2f} | "
          f"{1e3 * lax_t.min():.2f} | {1e3 * np.median(mm_t):.2f} | {1e3 * mm_t.min():.2f} | "
          f"{flops / lax_t.min() / 1e9:.0f} | {flops / mm_t.min() / 1e9:.0f} | "
          f"{lax_t.min() / mm_t.min():.2f}x |")


def _time_step() -> None:
  if FLAGS.steps_per_turn < 1:
    raise app.UsageError(f"--steps_per_turn must be at least 1, got {FLAGS.steps_per_turn}.")
  pool = workers.InterleavedWorkers()
  for variant in VARIANTS:
    pool.start(variant, [os.path.abspath(__file__), f"--worker={variant}",
                         *peer_pytorch.model_flag_args()])
  times = pool.time_steps(FLAGS.rounds, FLAGS.pause_s, FLAGS.steps_per_turn)
  pool.close()
  print(f"train step, {FLAGS.image_size}x{FLAGS.image_size}x{FLAGS.channels}, "
        f"L={FLAGS.num_levels}, K={FLAGS.steps_per_level}, width {FLAGS.hidden}, batch "
        f"{FLAGS.batch}; {pool.describe(FLAGS.rounds, FLAGS.steps_per_turn, 'variant')}, "
        f"load average "
        f"{os.getloadavg()[0]:.1f} at the end\n")
  print("| 3x3 convolutions | median ms | min ms | time vs lax (median) | (min) |")
  print("| --- | --- | --- | --- | --- |")
  ref_med, ref_min = np.median(times["lax"]), np.min(times["lax"])
  for variant, t in times.items():
    print(f"| {variant} | {1e3 * np.median(t):.0f} | {1e3 * np.min(t):.0f} | "
          f"{np.median(t) / ref_med:.2f}x | {np.min(t) / ref_min:.2f}x |")


def main(argv):
  del argv
  if FLAGS.worker:
    if FLAGS.worker not in VARIANTS:
      raise app.UsageError(f"--worker: expected one of {VARIANTS}, got {FLAGS.worker!r}.")
    if FLAGS.worker == "lax":
      _use_lax_conv()
    else:
      _force_matmul_form()
    peer_pytorch.worker("jax")
  elif FLAGS.part == "layers":
    _time_layers()
  else:
    _time_step()


if __name__ == "__main__":
  app.run(main)
