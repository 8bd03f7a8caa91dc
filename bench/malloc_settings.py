"""Benchmark: the train step back to back under glibc malloc settings (eiw_flow_jax.host_malloc).

Each setting runs in a fresh process (glibc reads GLIBC_TUNABLES at start): build the train
step (bench/peer_pytorch.py's JAX peer, with its model flags), warm up, then time --steps
steps back to back, as the training loop runs them (or with --idle_s of sleep before each),
with `getrusage` around them for the minor page faults and kernel time per step. Settings
alternate, --repeats times, so machine load hits them alike; one table row per process.

  python bench/malloc_settings.py                      # CIFAR config: 32x32x3, L=3, K=8, width 256
  python bench/malloc_settings.py --idle_s=0.3         # idle before each step, as in peer_pytorch
  python bench/malloc_settings.py --image_size=8 --channels=1 --num_levels=2 \
      --steps_per_level=4 --hidden=64 --batch=64          # the digits config
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import peer_pytorch  # its model-shape flags (--batch, --hidden, ...) and its JAX train step
from absl import app, flags

from eiw_flow_jax import host_malloc

flags.DEFINE_integer("steps", 10, "Timed steps per process, back to back.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first.")
flags.DEFINE_integer("repeats", 2, "Processes per setting (alternating).")
flags.DEFINE_float("idle_s", 0.0, "Idle seconds before each timed step (0: back to back; "
                   "peer_pytorch's --pause_s is the same idea across processes).")
FLAGS = flags.FLAGS

SETTINGS = {
    "glibc defaults": "",
    "huge pages (the CLI's default)": ":".join(host_malloc.HUGE_PAGES),
    "heap reuse": ":".join(host_malloc.HEAP_REUSE),
    "heap reuse + huge pages (EIW_FLOW_JAX_HOST_MALLOC=reuse)": ":".join(
        host_malloc.HEAP_REUSE + host_malloc.HUGE_PAGES),
}


def measure() -> dict:
  run, _ = peer_pytorch.jax_peer()
  for _ in range(FLAGS.warmup):
    run()
  before, times = resource.getrusage(resource.RUSAGE_SELF), []
  for _ in range(FLAGS.steps):
    time.sleep(FLAGS.idle_s)
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  after = resource.getrusage(resource.RUSAGE_SELF)
  return {
      "median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * min(times),
      "faults": (after.ru_minflt - before.ru_minflt) / FLAGS.steps,
      "kernel_s": (after.ru_stime - before.ru_stime) / FLAGS.steps,
      "maxrss_mib": after.ru_maxrss / 1024,
  }


def main(argv):
  if FLAGS.worker:  # peer_pytorch's --worker flag: here any value means "measure and print"
    print(json.dumps(measure()), flush=True)
    return
  del argv
  rows = []
  passed = [*peer_pytorch.model_flag_args(), f"--steps={FLAGS.steps}",
            f"--warmup={FLAGS.warmup}", f"--idle_s={FLAGS.idle_s}"]
  base = {k: v for k, v in os.environ.items()
          if k not in ("GLIBC_TUNABLES", host_malloc.MODE_VARIABLE, host_malloc.LEGACY_OPT_OUT)}
  for _ in range(FLAGS.repeats):
    for name, tunables in SETTINGS.items():
      env = {**base, "GLIBC_TUNABLES": tunables}
      out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker=measure", *passed],
                           env=env, capture_output=True, text=True, check=True).stdout
      rows.append((name, json.loads(out.strip().splitlines()[-1])))
  pattern = f"{FLAGS.idle_s} s idle before each" if FLAGS.idle_s else "back to back"
  print(f"{FLAGS.image_size}x{FLAGS.image_size}x{FLAGS.channels}, L={FLAGS.num_levels}, "
        f"K={FLAGS.steps_per_level}, width {FLAGS.hidden}, batch {FLAGS.batch}; {FLAGS.steps} "
        f"steps per process, {pattern}, {os.cpu_count()} CPU cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end\n")
  print("| setting | median ms | min ms | minor faults/step | kernel s/step | max RSS MiB |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name, r in rows:
    print(f"| {name} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['faults']:.0f} | "
          f"{r['kernel_s']:.3f} | {r['maxrss_mib']:.0f} |")
  print("\n" + "; ".join(f"{name}: GLIBC_TUNABLES={value or '(unset)'}"
                         for name, value in SETTINGS.items()))


if __name__ == "__main__":
  app.run(main)
