"""Compile time and peak resident memory of the train step against K, scanned vs unrolled.

  python bench/compile_time.py --ks=2,4,8,16,32                 # compile only
  python bench/compile_time.py --ks=4 --steps=5                 # and step time
  python bench/compile_time.py --config=configs/cifar10_denseflow.py --ks=0 --variants=true \
      --topology=v5e:2x2 --batch=16 --parts=forward,grad,update,step   # where the time goes
  python bench/compile_time.py --config=configs/cifar10_denseflow.py --ks=0 --variants=true \
      --topology=v5e:2x2 --batch=16 --efforts=0,-1      # XLA's default effort against its least

--parts compiles parts of the step apart, each in its own process: `forward` (the training
loss), `grad` (its value and gradient), `update` (the optimizer's update and its application
over the parameters, nothing else), `step` (the whole train step, the default). K=0 keeps the
config's own depth (DenseFlow has no K). --efforts compiles each at each value of
`config.compiler.exec_time_optimization_effort` (0: XLA's default).

For each K in --ks and each of `model.scan_steps` = True / False (alternating which goes
first), a fresh process builds the train step of --config (default configs/cifar10.py: L=3,
width 512) at that K with --batch images on one device, lowers it (tracing) and compiles it
for this machine's backend under XLA's default flags, and reports the seconds of each, the
process's peak resident memory (`ru_maxrss`: JAX's runtime plus the compiler's peak), the CPU
seconds of each (this process, all threads: less sensitive to other load than wall time) and,
with --steps N, the median of N train steps after one warm-up. With --topology (jax[tpu]
installed) the step is compiled deviceless for that TPU topology, data-parallel over its chips,
--batch images per chip; `memory_analysis()` then gives the chip's temporaries. Processes run
one at a time, so compiles do not overlap; the machine's other load still shows in wall times.
A child that fails prints {"k": ..., "error": ...} and the command exits 1 after the others.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compiled_platform(devices) -> str:
  return getattr(devices[0], "device_kind", devices[0].platform)


def child(args: argparse.Namespace) -> None:
  sys.path.insert(0, REPO)
  import importlib.util

  import jax
  import jax.numpy as jnp
  import numpy as np

  from eiw_flow_jax.model.flow import build_flow
  from eiw_flow_jax.training import optimizer, sharding, train_state, train_step

  spec = importlib.util.spec_from_file_location("config_module", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if args.k:
    config.model.steps_per_level = args.k
  config.model.scan_steps = args.scan == "true"
  config.model.memory = args.memory
  config.compiler.exec_time_optimization_effort = args.effort
  config.batch_size = args.batch
  if args.hidden:
    config.model.hidden_channels = args.hidden
  if args.topology:
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
    config.batch_size = args.batch * len(devices)
  else:
    devices = jax.devices()[:1]
  mesh = sharding.make_mesh(devices)
  flow = build_flow(config)
  tx = optimizer.make_optimizer(config)
  abstract = train_state.abstract_state(flow, tx, mesh, ema=train_state.keeps_ema(config))
  images = jax.ShapeDtypeStruct((config.batch_size, *config.model.image_shape), jnp.uint8,
                                sharding=sharding.batch_sharding(mesh))
  step = train_step.make_train_step(config, flow, tx, mesh)
  start, cpu_start = time.perf_counter(), time.process_time()
  lowered = _part(args.part, step, flow, tx, config).lower(abstract, images)
  lower_s = time.perf_counter() - start
  start, cpu_lowered = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  cpu_compiled = time.process_time()
  out = {"k": args.k, "scan": args.scan == "true", "memory": args.memory, "part": args.part,
         "effort": args.effort,
         "platform": compiled_platform(devices),
         "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
         # CPU seconds of this process (all threads): less sensitive to the machine's load.
         "lower_cpu_s": round(cpu_lowered - cpu_start, 1),
         "compile_cpu_s": round(cpu_compiled - cpu_lowered, 1),
         "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
  if args.topology:
    analysis = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["temp_gib_per_chip"] = round(analysis.temp_size_in_bytes / 2**30, 2)
    out["gflop"] = round(float(cost.get("flops", 0.0)) / 1e9, 1)
  if args.steps and not args.topology and args.part == "step":
    x = np.random.default_rng(0).integers(0, 2**config.model.n_bits,
                                          (args.batch, *config.model.image_shape), dtype=np.uint8)
    variables = flow.init(jax.random.PRNGKey(0), x)
    # Through host copies: params and EMA must not share a buffer (the step donates both).
    state = jax.device_get(train_state.state_from_variables(tx, variables))
    state = jax.device_put(jax.tree.map(np.array, state), sharding.state_shardings(mesh, abstract))
    x = jax.device_put(x, sharding.batch_sharding(mesh))
    state, metrics = compiled(state, x)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      state, metrics = compiled(state, x)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    out["step_s"] = round(float(np.median(times)), 3)
    out["finite"] = bool(metrics["finite"])
  print(json.dumps(out), flush=True)


def _part(part: str, step, flow, tx, config):
  """What --part compiles, as a jitted function of (train state, uint8 images), with the
  config's compiler options (as the train step has them)."""
  import functools

  import jax
  import optax

  from eiw_flow_jax.training.compiler_options import compiler_options, jit_options

  jit = functools.partial(jax.jit, compiler_options=jit_options(compiler_options(config)))

  rng = jax.random.PRNGKey(0)

  def loss(params, state, images):
    variables = {"params": params, "constants": state.constants}
    return flow.loss(variables, images, rng)[0]

  def update(state, images):
    del images
    updates, opt_state = tx.update(state.params, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state

  parts = {
      "step": step,
      "forward": jit(lambda state, images: loss(state.params, state, images)),
      "grad": jit(lambda state, images: jax.value_and_grad(loss)(state.params, state, images)),
      "update": jit(update, donate_argnums=(0,)),
  }
  return parts[part]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "cifar10.py"))
  parser.add_argument("--ks", default="2,4,8,16,32")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--memory", default="store")
  parser.add_argument("--hidden", type=int, default=0, help="coupling width (0: the config's)")
  parser.add_argument("--repeats", type=int, default=1, help="runs of each (K, variant)")
  parser.add_argument("--steps", type=int, default=0, help="train steps timed (0: none)")
  parser.add_argument("--variants", default="true,false", help="scan_steps values")
  parser.add_argument("--topology", default="",
                      help="compile for this TPU topology instead (e.g. v5e:2x2; needs "
                      "jax[tpu]); --batch is then per chip")
  parser.add_argument("--xla_flags", default="",
                      help="XLA_FLAGS of the compiling processes (default: none, XLA's defaults)")
  parser.add_argument("--parts", default="step",
                      help="what to compile: step, forward, grad, update (comma-separated)")
  parser.add_argument("--efforts", default="0",
                      help="config.compiler.exec_time_optimization_effort values, each in "
                      "[-1, 1] (comma-separated; 0: XLA's default)")
  parser.add_argument("--child", action="store_true")
  parser.add_argument("--effort", type=float, default=0.0)
  parser.add_argument("--part", default="step")
  parser.add_argument("--k", type=int)
  parser.add_argument("--scan")
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  sys.path.insert(0, REPO)
  from eiw_flow_jax.host import threads as host_threads
  from eiw_flow_jax.training.compiler_options import EFFORT_RANGE, is_effort

  env = host_threads.blas_thread_environ({**os.environ, "PYTHONPATH": REPO})
  env["XLA_FLAGS"] = args.xla_flags  # empty: XLA's defaults, whatever this process has
  variants = args.variants.split(",")
  runs = [int(k) for k in args.ks.split(",") for _ in range(args.repeats)]
  failed = False
  parts = args.parts.split(",")
  unknown = sorted(set(parts) - {"step", "forward", "grad", "update"})
  if unknown:
    parser.error(f"--parts: unknown {', '.join(unknown)} (step, forward, grad, update)")
  try:
    efforts = [float(e) for e in args.efforts.split(",")]
  except ValueError:
    parser.error(f"--efforts: expected numbers in {EFFORT_RANGE}, got {args.efforts!r}")
  if not all(is_effort(e) for e in efforts):
    parser.error(f"--efforts: each must be in {EFFORT_RANGE}, got {args.efforts!r}")
  for index, k in enumerate(runs):
    order = variants if index % 2 == 0 else variants[::-1]
    for scan in order:
      for effort in efforts:
        for part in parts:
          command = [sys.executable, os.path.abspath(__file__), "--child", f"--k={k}",
                     f"--scan={scan}", f"--config={args.config}", f"--batch={args.batch}",
                     f"--memory={args.memory}", f"--steps={args.steps}",
                     f"--topology={args.topology}", f"--hidden={args.hidden}",
                     f"--part={part}", f"--effort={effort}"]
          result = subprocess.run(command, env=env, capture_output=True, text=True)
          lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
          if result.returncode or not lines:
            print(json.dumps({"k": k, "scan": scan, "part": part, "effort": effort,
                              "error": result.stderr[-2000:]}), flush=True)
            failed = True
          else:
            print(lines[-1], flush=True)
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  main()
