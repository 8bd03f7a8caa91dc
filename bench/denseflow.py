"""Benchmark of the DenseFlow backbone (issue 8): what remat costs, and one unit vs PyTorch.

Part `step`: the CIFAR-10 DenseFlow config (configs/cifar10_denseflow.py, DF-74-10 with EIW
transitions, 130.9M parameters) at a small batch, with `model.memory` = "store" and "remat"
(per-unit recomputation through `memory.remat_call`). Each mode runs in its own process: it
compiles `train_step.make_train_step` (loss, gradient, Adamax update, as training runs it) once from
the abstract train state, reads XLA's compiled `memory_analysis()` (temp bytes: the activations
and scratch of the step; argument bytes: state and batch), builds a state with synthetic
weights (no data-dependent init: that is a second whole-model compile; the step's FLOPs and
buffers do not depend on the values), and then the parent asks the modes for one step in turn,
round after round (interleaved, so machine load hits both alike). Compile times are reported.

Part `unit`: one DenseFlow unit (layers_conf[b] x [ActNorm, 1x1 conv, affine coupling whose
network is the multi-head DenseNet with gated convs and Nystrom attention, channel switch]) of
the same config, forward + backward of a loss on its output and log-det, BatchNorm in training
mode, against the authors' PyTorch unit (their `InvertibleDenseBlock(...).blocks[0]`, imported
from `--authors_repo`, a checkout of github.com/studying910/EIW-Flow; nothing of it is copied
here). The PyTorch peer builds the unit, runs ActNorm's data-dependent init, perturbs every
weight (so the zero-initialised output conv does not make the coupling trivial) and hands its
state_dict and input to the JAX peer, which converts it with the key map of
`eiw_flow_jax.model.backbones.denseflow_torch`:
both compute the same function on the same input (the max difference is printed). Peers run in
separate processes, interleaved; `*_remat` / `torch_ckpt` are the per-unit rematerialised
variants (jax.checkpoint of the unit; the authors' `checkpointing=True` in the coupling nets).

torch is a benchmark-only extra (`pip install -e .[bench]`).

  # DF-74-10: XLA:CPU's default compile of this step takes over 30 minutes; at backend
  # optimization level 0 it takes 18 (store) to 29 (remat) minutes and ~12 GB (the
  # convolutions and matmuls are library calls, so their speed does not depend on that level):
  XLA_FLAGS=--xla_backend_optimization_level=0 python bench/denseflow.py --part=step --batch=2 \
      --rounds=3 --modes=store   # then --modes=remat (two full compiles at once need ~24 GB)
  python bench/denseflow.py --part=step --batch=16 --rounds=2 --layers_conf=1,1,1
  python bench/denseflow.py --part=unit --authors_repo=/path/to/EIW-Flow --unit_batch=8
  python bench/denseflow.py --part=unit --authors_repo=... --peers=jax,torch,jax_remat,torch_ckpt
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
import workers
from absl import app, flags

flags.DEFINE_enum("part", "step", ["step", "unit"], "What to benchmark.")
flags.DEFINE_string("config", "configs/cifar10_denseflow.py", "Config (relative to the repo).")
flags.DEFINE_integer("batch", 2, "Batch size of the full train step (part step).")
flags.DEFINE_list("layers_conf", [], "Override model.denseflow.layers_conf (part step), e.g. "
                  "1,1,1: the config's widths with fewer coupling layers, which compiles in "
                  "minutes where DF-74-10's 74 layers take over half an hour on a 2-core CPU.")
flags.DEFINE_list("modes", ["store", "remat"], "model.memory modes (part step).")
flags.DEFINE_integer("rounds", 5, "Interleaved timed rounds.")
flags.DEFINE_integer("unit_block", 0, "Dense block of the benchmarked unit (part unit).")
flags.DEFINE_integer("unit_index", 0, "Unit within the block (part unit).")
flags.DEFINE_integer("unit_batch", 8, "Batch of the unit benchmark.")
flags.DEFINE_list("peers", ["jax", "torch"],
                  "Unit peers: jax, torch, jax_remat (nn.remat unit), torch_ckpt (their "
                  "checkpointing=True).")
flags.DEFINE_string("authors_repo", "", "Checkout of studying910/EIW-Flow (part unit).")
flags.DEFINE_string("compilation_cache",
                    os.path.join(tempfile.gettempdir(), "eiw_denseflow_bench_cache"),
                    "JAX persistent compilation cache of the step workers ('' disables it): a "
                    "rerun, or a worker started by hand beforehand, skips the long compile.")
flags.DEFINE_string("worker", "", "Internal: run as this worker.")
flags.DEFINE_string("exchange", "", "Internal: directory where the peers exchange weights.")
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2.0**20


def _load_config():
  import importlib.util

  path = os.path.join(REPO, FLAGS.config)
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# ---- part step ---------------------------------------------------------------------------------


def _synthetic_variables(flow, shapes):
  """Variables of the right shapes without the data-dependent init (a second whole-model
  compile on CPU): small random weights, 1x1-conv matrices near the identity, ActNorm and
  BatchNorm at their neutral values. The step's FLOPs and buffers do not depend on the values."""
  import flax.traverse_util as tu
  import jax.numpy as jnp

  rng = np.random.RandomState(0)
  out = {}
  for collection, tree in shapes.items():
    flat = {}
    for path, leaf in tu.flatten_dict(tree).items():
      name, shape = path[-1], tuple(leaf.shape)
      if collection == "constants":
        value = np.ones(shape) if name == "var" else np.zeros(shape)
      elif name in ("shift", "log_scale", "bias") or (name == "scale" and len(shape) == 1):
        value = np.ones(shape) if name == "scale" else np.zeros(shape)
      elif len(shape) == 2 and shape[0] == shape[1] and name == "weight":
        value = np.eye(shape[0]) + 0.01 * rng.randn(*shape)
      else:
        fan_in = max(1, int(np.prod(shape[:-1])))
        value = rng.randn(*shape) / np.sqrt(fan_in)
        if {"conv_out", "conv2"} & set(path):  # zero-initialised in the model: keep them small
          value = 0.01 * value
      flat[path] = jnp.asarray(value, leaf.dtype)
    out[collection] = tu.unflatten_dict(flat)
  return out


def _step_worker(mode: str):
  import jax
  import jax.numpy as jnp

  from eiw_flow_jax.model.flow import build_flow
  from eiw_flow_jax.training import optimizer, sharding, train_state, train_step

  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    lock = os.path.join(FLAGS.compilation_cache, f"{mode}.compiling")
    while os.path.exists(lock):  # another process is compiling this step into the cache
      time.sleep(10)
  config = _load_config()
  config.model.memory = mode
  if FLAGS.layers_conf:
    config.model.denseflow.layers_conf = tuple(int(v) for v in FLAGS.layers_conf)
  config.batch_size = config.init_batch_size = FLAGS.batch
  h, w, c = config.model.image_shape
  levels = 2**config.model.n_bits
  images = np.random.RandomState(0).randint(0, levels, (FLAGS.batch, h, w, c)).astype(np.uint8)
  mesh = sharding.make_mesh(jax.devices()[:1])
  flow, tx = build_flow(config), optimizer.make_optimizer(config)
  step = train_step.make_train_step(config, flow, tx, mesh)
  batch = sharding.global_batch(images, sharding.batch_sharding(mesh))
  start = time.perf_counter()
  abstract = train_state.abstract_state(flow, tx, mesh)
  compiled = step.lower(abstract, batch).compile()
  compile_s = time.perf_counter() - start
  print(f"step:{mode}: compiled in {compile_s:.0f} s", file=sys.stderr, flush=True)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  start = time.perf_counter()
  shapes = jax.eval_shape(flow.init, jax.random.PRNGKey(0), jnp.asarray(images))
  variables = _synthetic_variables(flow, shapes)
  variables = jax.tree.map(lambda v: sharding.host_replicated(v, mesh), variables)
  shardings = sharding.state_shardings(mesh, abstract)
  state = jax.jit(lambda v: train_state.state_from_variables(tx, v), out_shardings=shardings)(
      variables)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - start
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])
    if not bool(metrics["finite"]):
      raise FloatingPointError(f"{mode}: non-finite step")

  info = {"init_s": init_s, "compile_s": compile_s, "params": params,
          "flops": float(cost.get("flops", 0.0)),
          "temp_bytes": int(mem.temp_size_in_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes),
          "alias_bytes": int(mem.alias_size_in_bytes),
          "code_bytes": int(mem.generated_code_size_in_bytes)}
  return run, info


# ---- part unit ---------------------------------------------------------------------------------


def _unit_spec():
  """(channels, H, W, layers, mid) of the benchmarked unit, from the config."""
  from eiw_flow_jax.model.backbones.denseflow import denseflow_shapes

  config = _load_config()
  df = config.model.denseflow
  b, u = FLAGS.unit_block, FLAGS.unit_index
  if not 0 <= b < len(df.block_conf) or not 0 <= u < df.block_conf[b]:
    raise SystemExit(f"--unit_block={b} --unit_index={u}: the config has block_conf "
                     f"{tuple(df.block_conf)}.")
  h, w, c = denseflow_shapes(config.model)["block_in"][b]
  return (c + u * df.growth_rate, h, w, df.layers_conf[b], df.layer_mid_chnls[b],
          df.coupling_depth, df.coupling_growth, df.get("attention_landmarks", 4))


def _loss_np(z: np.ndarray, log_det: np.ndarray) -> float:
  return float(np.mean(0.5 * np.sum(z.reshape(z.shape[0], -1) ** 2, -1) - log_det))


def _torch_unit_worker(kind: str):
  import torch

  root = FLAGS.authors_repo
  if os.path.isdir(os.path.join(root, "DIW-Flow")):
    root = os.path.join(root, "DIW-Flow")
  if not os.path.isdir(os.path.join(root, "denseflow")):
    raise SystemExit(f"--authors_repo={FLAGS.authors_repo!r} has no denseflow/ package: pass a "
                     "checkout of github.com/studying910/EIW-Flow.")
  sys.path.insert(0, root)
  from experiments.image.model.flow_modules import InvertibleDenseBlock

  chnls, h, w, layers, mid, depth, growth, landmarks = _unit_spec()
  if (depth, growth, landmarks) != (7, 64, 4):
    raise SystemExit("The authors' unit has coupling depth 7, growth 64 and 4 landmarks "
                     f"hard-coded; the config has {(depth, growth, landmarks)}.")
  torch.manual_seed(0)
  block = InvertibleDenseBlock(chnls, 1, layers, mid, growth_rate=1,
                               checkpointing=kind == "torch_ckpt")
  unit = block.blocks[0]
  rng = np.random.RandomState(0)
  x = rng.randn(FLAGS.unit_batch, chnls, h, w).astype(np.float32)
  xt = torch.from_numpy(x)
  path = os.path.join(FLAGS.exchange, "unit.npz")
  if kind == "torch":  # the reference: initialise, perturb, share weights and outputs
    unit.train()
    with torch.no_grad():
      unit(xt.clone())  # ActNorm's data-dependent init (and one BatchNorm update)
      for key, p in unit.state_dict().items():
        if p.is_floating_point() and not key.endswith(("running_mean", "running_var")):
          p.add_(torch.from_numpy((0.02 * rng.randn(*p.shape)).astype(np.float32)))
      state = {k: v.numpy().copy() for k, v in unit.state_dict().items()
               if v.is_floating_point()}
    z, ld = unit(xt.clone())
    np.savez(path, x=x, z=z.detach().numpy(), log_det=ld.detach().numpy(),
             **{f"w/{k}": v for k, v in state.items()})
  else:
    data = np.load(path)
    unit.load_state_dict({k[2:]: torch.from_numpy(data[k]) for k in data.files
                          if k.startswith("w/")}, strict=False)
    for m in unit.modules():  # ActNorm: already initialised by the reference
      if hasattr(m, "initialized"):
        m.initialized.fill_(1)
  unit.train()
  params = [p for p in unit.parameters() if p.requires_grad]

  def run():
    for p in params:
      p.grad = None
    z, ld = unit(xt.clone())
    loss = (0.5 * z.pow(2).flatten(1).sum(-1) - ld).mean()
    loss.backward()
    if not np.isfinite(float(loss.detach())):
      raise FloatingPointError(f"{kind}: non-finite loss")

  return run, {"threads": torch.get_num_threads(),
               "params": sum(p.numel() for p in params)}


def _jax_unit_worker(kind: str):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from eiw_flow_jax.model.backbones import denseflow_torch
  from eiw_flow_jax.model.backbones.denseflow import DenseUnit

  chnls, h, w, layers, mid, depth, growth, landmarks = _unit_spec()
  data = np.load(os.path.join(FLAGS.exchange, "unit.npz"))
  variables = {"params": {}, "constants": {}}
  for key in data.files:
    if not key.startswith("w/"):
      continue
    mapped = denseflow_torch._map_key("transforms.3.blocks.0." + key[2:], 1)
    if mapped is None:
      continue
    collection, path, kind_ = mapped
    leaf, value = denseflow_torch._convert_value(kind_, data[key])
    path = path[2:] if leaf is None else (*path[2:], leaf)  # drop ("block0", "unit0")
    node = variables[collection]
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jnp.asarray(value)
  cls = nn.remat(DenseUnit) if kind == "jax_remat" else DenseUnit
  unit = cls(layers, mid, depth, growth, train=True, num_landmarks=landmarks)
  x = jnp.asarray(np.transpose(data["x"], (0, 2, 3, 1)))
  shapes = jax.eval_shape(lambda: unit.init(jax.random.PRNGKey(0), x))
  if jax.tree.structure(shapes) != jax.tree.structure(variables):
    raise SystemExit("The converted unit weights do not match DenseUnit's variables.")

  (z, ld), _ = jax.jit(lambda v, x: unit.apply(v, x, mutable=["constants"]))(variables, x)
  z = np.transpose(np.asarray(z), (0, 3, 1, 2))
  err = float(np.max(np.abs(z - data["z"])) / max(1.0, float(np.max(np.abs(data["z"])))))
  err_ld = float(np.max(np.abs(np.asarray(ld) - data["log_det"])) /
                 max(1.0, float(np.max(np.abs(data["log_det"])))))

  def loss_fn(params, constants, x):
    (z, ld), new = unit.apply({"params": params, "constants": constants}, x,
                              mutable=["constants"])
    return jnp.mean(0.5 * jnp.sum(jnp.square(z).reshape(z.shape[0], -1), -1) - ld), new

  grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  params, constants = variables["params"], variables["constants"]
  compiled = grad.lower(params, constants, x).compile()
  mem = compiled.memory_analysis()

  def run():
    (loss, _), grads = compiled(params, constants, x)
    jax.block_until_ready(grads)
    if not np.isfinite(float(loss)):
      raise FloatingPointError(f"{kind}: non-finite loss")

  return run, {"rel_err_z": err, "rel_err_log_det": err_ld,
               "temp_bytes": int(mem.temp_size_in_bytes),
               "params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))}


# ---- driver ------------------------------------------------------------------------------------


def worker(name: str) -> None:
  if name.startswith("step:"):
    run, info = _step_worker(name.split(":", 1)[1])
  elif name.startswith("torch"):
    run, info = _torch_unit_worker(name)
  else:
    run, info = _jax_unit_worker(name)
  start = time.perf_counter()
  run()  # warm-up (and, for JAX, the first run of the compiled executable)
  info["first_s"] = time.perf_counter() - start
  workers.serve(name, run, info)


def _start(pool: workers.InterleavedWorkers, name: str, passed: list[str]) -> dict:
  return pool.start(name, [os.path.abspath(__file__), f"--worker={name}", *passed],
                    env=workers.worker_environ(), cwd=REPO)


def _header() -> None:
  print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPU cores; "
        f"load average before {tuple(round(v, 2) for v in os.getloadavg())}; "
        f"{FLAGS.rounds} interleaved rounds\n")


def main_step() -> None:
  passed = [f"--config={FLAGS.config}", f"--batch={FLAGS.batch}",
            f"--layers_conf={','.join(FLAGS.layers_conf)}"]
  _header()
  pool, infos = workers.InterleavedWorkers(), {}
  for mode in FLAGS.modes:  # one after the other: compiles do not overlap
    infos[mode] = _start(pool, f"step:{mode}", passed)
    print(f"{mode}: started in {infos[mode]['startup_s']:.0f} s", flush=True)
  times = {name.split(":", 1)[1]: t for name, t in pool.time_steps(FLAGS.rounds).items()}
  pool.close()
  ref = FLAGS.modes[0]
  layers = f" with layers_conf {','.join(FLAGS.layers_conf)}" if FLAGS.layers_conf else ""
  print(f"\n{FLAGS.config}{layers}, batch {FLAGS.batch}, {infos[ref]['params']:,} parameters, "
        f"{infos[ref]['flops'] / 1e9:.1f} GFLOP per step (XLA cost analysis, {ref}); "
        f"load average after {tuple(round(v, 2) for v in os.getloadavg())}\n")
  print(f"| model.memory | median s/step | min s/step | vs {ref} (median) | temp MiB | "
        f"vs {ref} | argument MiB | output MiB | compile s | first step s |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for mode in FLAGS.modes:
    t, i = times[mode], infos[mode]
    print(f"| {mode} | {np.median(t):.2f} | {np.min(t):.2f} | "
          f"{np.median(t) / np.median(times[ref]):.2f}x | {i['temp_bytes'] / MIB:.0f} | "
          f"{i['temp_bytes'] / infos[ref]['temp_bytes']:.2f}x | "
          f"{i['argument_bytes'] / MIB:.0f} | {i['output_bytes'] / MIB:.0f} | "
          f"{i['compile_s']:.0f} | {i['first_s']:.1f} |")


def main_unit() -> None:
  if not FLAGS.authors_repo:
    raise SystemExit("--part=unit needs --authors_repo (a checkout of studying910/EIW-Flow).")
  if "torch" not in FLAGS.peers:
    raise SystemExit("--peers must include torch (the reference that builds the weights).")
  chnls, h, w, layers, mid, *_ = _unit_spec()
  _header()
  with tempfile.TemporaryDirectory() as exchange:
    passed = [f"--config={FLAGS.config}", f"--unit_block={FLAGS.unit_block}",
              f"--unit_index={FLAGS.unit_index}", f"--unit_batch={FLAGS.unit_batch}",
              f"--authors_repo={FLAGS.authors_repo}", f"--exchange={exchange}"]
    order = ["torch"] + [p for p in FLAGS.peers if p != "torch"]
    pool, infos = workers.InterleavedWorkers(), {}
    for peer in order:
      infos[peer] = _start(pool, peer, passed)
    times = pool.time_steps(FLAGS.rounds)
    pool.close()
  print(f"Unit {FLAGS.unit_index} of block {FLAGS.unit_block} of {FLAGS.config}: "
        f"{layers} x [ActNorm, 1x1 conv, affine coupling (multi-head DenseNet, mid {mid}), "
        f"switch] on {FLAGS.unit_batch}x{chnls}x{h}x{w}; forward + backward, BatchNorm in "
        f"training mode; {infos['torch']['params']:,} parameters; torch threads "
        f"{infos['torch']['threads']}; load average after "
        f"{tuple(round(v, 2) for v in os.getloadavg())}")
  for peer in order:
    if "rel_err_z" in infos[peer]:
      print(f"{peer}: same weights and input as torch, max relative difference of the output "
            f"{infos[peer]['rel_err_z']:.1e}, of the log-det {infos[peer]['rel_err_log_det']:.1e};"
            f" compiled temp memory {infos[peer]['temp_bytes'] / MIB:.0f} MiB")
  ref = "jax" if "jax" in times else order[0]
  print(f"\n| peer | median ms | min ms | {ref} speed vs peer (median) | (min) |")
  print("| --- | --- | --- | --- | --- |")
  for peer in order:
    t = times[peer]
    print(f"| {peer} | {1e3 * np.median(t):.0f} | {1e3 * np.min(t):.0f} | "
          f"{np.median(t) / np.median(times[ref]):.2f}x | "
          f"{np.min(t) / np.min(times[ref]):.2f}x |")


def main(argv):
  del argv
  if FLAGS.worker:
    worker(FLAGS.worker)
  elif FLAGS.part == "step":
    main_step()
  else:
    main_unit()


if __name__ == "__main__":
  app.run(main)
