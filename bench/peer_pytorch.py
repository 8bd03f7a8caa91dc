"""Benchmark against PyTorch: one Glow training step (forward, backward, Adam) in three peers.

- `jax`: this project's train step (`train_step.make_train_step`: loss, gradient, clipping, Adam,
  EMA, non-finite guard), vanilla split; `--config_variant` adds JAX peers with other config
  fields (the EIW splits, the memory modes), `--xla_variant` / `--env_variant` with other XLA
  flags or environment.
- `torch`: the same Glow written plainly in PyTorch below (ActNorm with data-dependent init,
  LU-parameterised invertible 1x1 convolution, affine coupling with Glow's network
  conv3x3-ActNorm-ReLU-conv1x1-ActNorm-ReLU-zero conv3x3 and sigmoid(raw + 2) scale, squeeze,
  split with a learned conditional Gaussian prior, learned top prior), Adam.
- `normflows`: normflows' `GlowBlock`s in a `MultiscaleFlow` built to the same L, K, width
  (LU, affine, sigmoid scale, ActNorm in the coupling network) with `GlowBase` priors (a learned
  per-channel Gaussian, not conditioned on the kept half), Adam.

Each peer runs in its own process, builds and warms up (JAX compiles), then the parent asks
each in turn for --steps_per_turn steps back to back (3 by default, as the training loop runs
them; the first of each turn is left out), round after round (interleaved, so machine load hits
all alike), and prints min and median ms/step with ratios to the JAX step, the JAX step's FLOPs
(XLA cost analysis), its achieved GFLOP/s and the GFLOP/s of a large float32 matmul through JAX.

`--steps_per_turn=1` times one step per turn, after the other peers' turns and the pause. That
first step measures the host as much as the step: XLA:CPU maps its step buffers afresh each step
(the peers' tensors stay in malloc's heap), and a virtual machine that hands freed memory back
to its hypervisor (free page reporting) makes the first touch after a second or more of idle
slow: 0.3-0.8 s more for the CIFAR config's step on one such VM (docs/performance.md).

torch and normflows are benchmark-only extras: `pip install -e .[bench]`. On a GPU machine the
PyTorch peers run on CUDA where torch sees it (`--torch_device`), the JAX peer on JAX's default
backend; the header names each peer's device.

  python bench/peer_pytorch.py                    # 32x32x3, L=3, K=8, width 256, batch 16
  python bench/peer_pytorch.py --rounds=10 --peers=jax,torch
  python bench/peer_pytorch.py --rounds=10 --steps_per_turn=1   # one step per turn
  python bench/peer_pytorch.py --peers=jax --xla_variant=onednn=--xla_cpu_use_onednn=true
  python bench/peer_pytorch.py --peers=jax --config_variant=eiw=model.split=eiw \
      --config_variant=per_example=model.split=eiw,model.eiw.mode=per_example  # EIW overhead
  python bench/peer_pytorch.py --peers=jax --config_variant=remat=model.memory=remat \
      --config_variant=invert=model.memory=invert                   # memory modes' step time
  python bench/peer_pytorch.py --host_malloc=none --peers=jax \
      --env_variant=hugepages=GLIBC_TUNABLES=glibc.malloc.hugetlb=1

Every peer runs under the glibc malloc tunables the project's command line runs under
(`eiw_flow_jax.host.malloc`: huge pages where THP is in madvise mode), all peers alike;
`--host_malloc=reuse` adds heap reuse (XLA:CPU's step buffers reused instead of page-faulted
afresh each step), `--host_malloc=none` leaves this process's environment as it is. The
header line says which GLIBC_TUNABLES the peers ran with.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Callable

import numpy as np
import workers
from absl import app, flags

flags.DEFINE_integer("batch", 16, "Batch size.")
flags.DEFINE_integer("image_size", 32, "Image height and width.")
flags.DEFINE_integer("channels", 3, "Image channels.")
flags.DEFINE_integer("num_levels", 3, "Levels L.")
flags.DEFINE_integer("steps_per_level", 8, "Steps K per level.")
flags.DEFINE_integer("hidden", 256, "Coupling network width.")
flags.DEFINE_integer("rounds", 7, "Interleaved timed rounds.")
flags.DEFINE_list("peers", ["jax", "torch", "normflows"], "Peers to run.")
flags.DEFINE_multi_string(
    "xla_variant", [],
    "Extra JAX peers run with other XLA flags, as NAME=FLAGS (e.g. "
    "onednn=--xla_cpu_use_onednn=true); each is timed as peer jax[NAME] in its own process.")
flags.DEFINE_multi_string(
    "env_variant", [],
    "Extra JAX peers run with an environment variable set, as NAME=VAR=VALUE (e.g. "
    "hugepages=GLIBC_TUNABLES=glibc.malloc.hugetlb=1); each is timed as peer jax[NAME].")
flags.DEFINE_multi_string(
    "config_variant", [],
    "Extra JAX peers with config fields changed, as NAME=FIELD=VALUE[,FIELD=VALUE...] (values "
    "as Python literals, else strings), each timed as peer jax[NAME]: the memory modes "
    "(remat=model.memory=remat), the EIW splits against the vanilla one "
    "(eiw=model.split=eiw; per_example=model.split=eiw,model.eiw.mode=per_example).")
flags.DEFINE_multi_string("config_field", [], "Internal: FIELD=VALUE set on the JAX peer's config.")
flags.DEFINE_enum(
    "host_malloc", "cli", ["cli", "reuse", "none"],
    "glibc malloc tunables for every peer alike (eiw_flow_jax.host.malloc): cli = those the "
    "project's command line runs under by default (huge pages), reuse = heap reuse as well "
    "(EIW_FLOW_JAX_HOST_MALLOC=reuse), none = this process's environment as it is.")
flags.DEFINE_float(
    "pause_s", 0.3,
    "Idle seconds before each timed step, so that the previous peer's spinning worker threads "
    "(OpenMP, XLA's pool) have gone to sleep and do not steal the cores.")
flags.DEFINE_integer(
    "steps_per_turn", 3,
    "Steps each peer runs back to back per turn. S > 1: the training loop's pattern; the first "
    "step of each turn is left out of the figures, which then hold rounds x (S - 1) steps per "
    "peer. 1: one step per turn, after the pause and the other peers' turns, all kept.")
flags.DEFINE_enum(
    "torch_device", "auto", ["auto", "cpu", "cuda"],
    "Where the PyTorch peers run: auto is cuda when torch sees a GPU, else cpu. (The JAX peer "
    "runs on JAX's default backend.)")
flags.DEFINE_string("worker", "", "Internal: run as the worker for this peer.")
FLAGS = flags.FLAGS


MODEL_FLAGS = ("batch", "image_size", "channels", "num_levels", "steps_per_level", "hidden")


def config_variant_fields(variant: str) -> tuple[str, list[str]]:
  """--config_variant NAME=FIELD=VALUE[,FIELD=VALUE...] -> (NAME, ["FIELD=VALUE", ...])."""
  name, _, assignments = variant.partition("=")
  fields = assignments.split(",") if assignments else []
  if not name or not fields or not all("=" in f and f.partition("=")[0] for f in fields):
    raise ValueError(
        f"--config_variant: expected NAME=FIELD=VALUE[,FIELD=VALUE...], got {variant!r}.")
  return name, fields


def set_config_fields(config, fields: list[str]) -> None:
  """Sets each "a.b.c=VALUE" on `config` (a Python literal, else the string)."""
  import ast  # noqa: PLC0415

  for field in fields:
    dotted, _, text = field.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = dotted.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value


def model_flag_args() -> list[str]:
  """The model-shape flags as arguments, for worker processes (this and the scripts using it)."""
  return [f"--{name}={getattr(FLAGS, name)}" for name in MODEL_FLAGS]


def _images() -> np.ndarray:
  rng = np.random.RandomState(0)
  shape = (FLAGS.batch, FLAGS.image_size, FLAGS.image_size, FLAGS.channels)
  return rng.randint(0, 256, shape).astype(np.uint8)


# ---- peers: each returns (step function, info dict) -------------------------------------------


def jax_peer():
  import jax
  import jax.numpy as jnp

  from eiw_flow_jax.config.schema import base_config
  from eiw_flow_jax.model.flow import build_flow
  from eiw_flow_jax.training import optimizer, sharding, train_state, train_step

  config = base_config()
  m = config.model
  m.image_shape = (FLAGS.image_size, FLAGS.image_size, FLAGS.channels)
  m.num_levels, m.steps_per_level, m.hidden_channels = (
      FLAGS.num_levels, FLAGS.steps_per_level, FLAGS.hidden)
  m.split = "vanilla"
  config.batch_size = FLAGS.batch
  set_config_fields(config, FLAGS.config_field)
  mesh = sharding.make_mesh(jax.devices()[:1])
  flow, tx = build_flow(config), optimizer.make_optimizer(config)
  images = _images()
  state = train_state.create_state(config, flow, tx, mesh, images)
  step = train_step.make_train_step(config, flow, tx, mesh)
  batch = sharding.global_batch(images, sharding.batch_sharding(mesh))
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  holder = {"state": state}

  def run():  # the executable compiled above (calling `step` would compile it once more)
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])

  def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(reps):
      start = time.perf_counter()
      f(a).block_until_ready()
      best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9

  device = jax.devices()[0]
  return run, {"flops": float(cost.get("flops", 0.0)), "matmul": matmul_gflops,
               "compiled": compiled, "device": f"{device.platform} ({device.device_kind})"}


def _torch_glow():
  import torch
  from torch import nn
  from torch.nn import functional as F

  class ActNorm(nn.Module):
    def __init__(self, c):
      super().__init__()
      self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))
      self.logs = nn.Parameter(torch.zeros(1, c, 1, 1))
      self.initialised = False

    def forward(self, x):
      if not self.initialised:
        with torch.no_grad():
          self.bias.copy_(-x.mean(dim=(0, 2, 3), keepdim=True))
          self.logs.copy_(-torch.log(x.std(dim=(0, 2, 3), keepdim=True) + 1e-6))
        self.initialised = True
      return (x + self.bias) * torch.exp(self.logs), x.shape[2] * x.shape[3] * self.logs.sum()

  class InvConv(nn.Module):
    def __init__(self, c):
      super().__init__()
      w = torch.linalg.qr(torch.randn(c, c))[0]
      p, lower, upper = torch.linalg.lu(w)
      s = torch.diag(upper)
      self.register_buffer("p", p)
      self.register_buffer("sign", torch.sign(s))
      self.register_buffer("mask", torch.tril(torch.ones(c, c), -1))
      self.register_buffer("eye", torch.eye(c))
      self.lower = nn.Parameter(lower)
      self.upper = nn.Parameter(torch.triu(upper, 1))
      self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def forward(self, x):
      lower = self.lower * self.mask + self.eye
      upper = self.upper * self.mask.T + torch.diag(self.sign * torch.exp(self.log_s))
      w = self.p @ lower @ upper
      y = F.conv2d(x, w.view(*w.shape, 1, 1))
      return y, x.shape[2] * x.shape[3] * self.log_s.sum()

  class ZeroConv(nn.Module):
    def __init__(self, cin, cout):
      super().__init__()
      self.conv = nn.Conv2d(cin, cout, 3, padding=1)
      nn.init.zeros_(self.conv.weight)
      nn.init.zeros_(self.conv.bias)
      self.logs = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x):
      return self.conv(x) * torch.exp(3.0 * self.logs)

  class Coupling(nn.Module):
    def __init__(self, c, hidden):
      super().__init__()
      self.half = c // 2
      self.conv1 = nn.Conv2d(self.half, hidden, 3, padding=1, bias=False)
      self.norm1 = ActNorm(hidden)
      self.conv2 = nn.Conv2d(hidden, hidden, 1, bias=False)
      self.norm2 = ActNorm(hidden)
      self.out = ZeroConv(hidden, 2 * (c - self.half))

    def forward(self, x):
      xa, xb = x[:, : self.half], x[:, self.half :]
      h = F.relu(self.norm1(self.conv1(xa))[0])
      h = F.relu(self.norm2(self.conv2(h))[0])
      h = self.out(h)
      shift, raw = h[:, 0::2], h[:, 1::2]
      log_scale = F.logsigmoid(raw + 2.0)
      yb = (xb + shift) * torch.exp(log_scale)
      return torch.cat([xa, yb], 1), log_scale.flatten(1).sum(1)

  def squeeze(x):
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)

  def gaussian(z, mean, logs):
    return (-0.5 * math.log(2 * math.pi) - logs - 0.5 * ((z - mean) * torch.exp(-logs)) ** 2
            ).flatten(1).sum(1)

  class Glow(nn.Module):
    def __init__(self, channels, size, levels, k, hidden):
      super().__init__()
      self.levels = nn.ModuleList()
      self.priors = nn.ModuleList()
      c = channels
      for level in range(levels):
        c, size = 4 * c, size // 2
        steps = nn.ModuleList()
        for _ in range(k):
          steps.append(nn.ModuleList([ActNorm(c), InvConv(c), Coupling(c, hidden)]))
        self.levels.append(steps)
        if level < levels - 1:
          self.priors.append(ZeroConv(c // 2, 2 * (c - c // 2)))
          c = c // 2
      self.top = nn.Parameter(torch.zeros(1, 2 * c, size, size))

    def log_prob(self, x):
      log_det = torch.zeros(x.shape[0], device=x.device)
      log_prior = torch.zeros(x.shape[0], device=x.device)
      h = x
      for level, steps in enumerate(self.levels):
        h = squeeze(h)
        for step in steps:
          for layer in step:
            h, ld = layer(h)
            log_det = log_det + ld
        if level < len(self.priors):
          half = h.shape[1] // 2
          kept, factored = h[:, :half], h[:, half:]
          p = self.priors[level](kept)
          log_prior = log_prior + gaussian(factored, p[:, 0::2], p[:, 1::2])
          h = kept
      mean, logs = self.top[:, 0::2], self.top[:, 1::2]
      return log_prior + gaussian(h, mean, logs) + log_det

  return Glow


def _bpd_loss(log_prob, dims: int):
  return -(log_prob - dims * math.log(256.0)).mean() / (dims * math.log(2.0))


def _torch_peer(kind: str):
  import torch

  torch.manual_seed(0)
  device = torch_device(torch.cuda.is_available())
  x = torch.from_numpy(_images()).permute(0, 3, 1, 2).float().to(device)
  dims = x[0].numel()

  def dequantize():
    return (x + torch.rand_like(x)) / 256.0 - 0.5

  if kind == "torch":
    glow = _torch_glow()(FLAGS.channels, FLAGS.image_size, FLAGS.num_levels,
                         FLAGS.steps_per_level, FLAGS.hidden).to(device)
    with torch.no_grad():
      glow.log_prob(dequantize())  # data-dependent ActNorm init
    log_prob = glow.log_prob
    model = glow
  else:
    import normflows as nf

    levels, k = FLAGS.num_levels, FLAGS.steps_per_level
    c, size = FLAGS.channels, FLAGS.image_size
    q0, merges, flows = [], [], []
    for i in range(levels):  # i = 0 is the coarsest level, as in normflows' Glow example
      level_flows = [nf.flows.GlowBlock(c * 2 ** (levels + 1 - i), FLAGS.hidden,
                                        split_mode="channel", scale=True, net_actnorm=True)
                     for _ in range(k)]
      flows.append(level_flows + [nf.flows.Squeeze()])
      if i > 0:
        merges.append(nf.flows.Merge())
        shape = (c * 2 ** (levels - i), size // 2 ** (levels - i), size // 2 ** (levels - i))
      else:
        shape = (c * 2 ** (levels + 1), size // 2**levels, size // 2**levels)
      q0.append(nf.distributions.GlowBase(shape))
    model = nf.MultiscaleFlow(q0, flows, merges, class_cond=False).to(device)
    with torch.no_grad():
      model.log_prob(dequantize(), None)  # data-dependent ActNorm init

    def log_prob(z):
      return model.log_prob(z, None)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

  def run():
    optimizer.zero_grad(set_to_none=True)
    loss = _bpd_loss(log_prob(dequantize()), dims)
    loss.backward()
    optimizer.step()
    if not math.isfinite(float(loss.detach())):  # also waits for a GPU to finish the step
      raise FloatingPointError(f"{kind}: non-finite loss")

  return run, {"threads": torch.get_num_threads(), "device": device}


def torch_device(cuda_available: bool) -> str:
  """The PyTorch peers' device for --torch_device; refuses cuda where torch sees no GPU."""
  if FLAGS.torch_device == "cuda" and not cuda_available:
    raise RuntimeError("--torch_device=cuda, but torch sees no CUDA device here (a CPU-only "
                       "wheel, or no GPU): use --torch_device=cpu or auto.")
  if FLAGS.torch_device == "auto":
    return "cuda" if cuda_available else "cpu"
  return FLAGS.torch_device


PEERS = ("jax", "torch", "normflows")
# The modules each peer imports beyond this project's requirements (benchmark-only extras).
PEER_EXTRAS = {"torch": ("torch",), "normflows": ("torch", "normflows")}


def peer_problems(peers: list[str],
                  find_spec: Callable[[str], object] = importlib.util.find_spec) -> list[str]:
  """Why `peers` cannot run here (unknown names, missing extras); empty when they can."""
  problems = []
  unknown = [peer for peer in peers if peer not in PEERS]
  if unknown:
    problems.append(f"expected peers among {', '.join(PEERS)}, got {', '.join(unknown)}.")
  if not peers:
    problems.append(f"expected at least one peer among {', '.join(PEERS)}.")
  needs = []
  for peer in peers:
    missing = [module for module in PEER_EXTRAS.get(peer, ()) if find_spec(module) is None]
    if missing:
      needs.append(f"peer {peer} needs {' and '.join(missing)}")
  if needs:
    problems.append(f"{'; '.join(needs)}, not installed here: pip install -e .[bench] "
                    "(torch==2.13.0, normflows).")
  return problems


def worker(kind: str) -> None:
  run, info = jax_peer() if kind.startswith("jax") else _torch_peer(kind)
  for _ in range(2):
    run()
  matmul = info.pop("matmul", None)
  info.pop("compiled", None)
  commands = {"matmul": lambda: {"gflops": matmul()}} if matmul is not None else {}
  workers.serve(kind, run, info, commands)


def main(argv):
  del argv
  if FLAGS.worker:
    worker(FLAGS.worker)
    return
  if FLAGS.steps_per_turn < 1:
    raise app.UsageError(f"--steps_per_turn must be at least 1, got {FLAGS.steps_per_turn}.")
  problems = peer_problems(FLAGS.peers)
  if problems:
    raise app.UsageError("--peers: " + " ".join(problems))
  if FLAGS.torch_device == "cuda" and any(peer in PEER_EXTRAS for peer in FLAGS.peers):
    import torch  # noqa: PLC0415 - a benchmark extra, only where a torch peer runs on CUDA

    try:  # here, not only in the workers: before the JAX worker spends its compile
      torch_device(torch.cuda.is_available())
    except RuntimeError as error:
      raise app.UsageError(str(error)) from None
  repo = workers.REPO
  env = workers.worker_environ({"cli": "1", "reuse": "reuse", "none": None}[FLAGS.host_malloc])
  passed = model_flag_args()
  peer_env = {peer: env for peer in FLAGS.peers}
  peer_args = {}
  for variant in FLAGS.config_variant:
    try:
      name, fields = config_variant_fields(variant)
    except ValueError as error:
      raise app.UsageError(str(error)) from None
    peer_env[f"jax[{name}]"] = env
    peer_args[f"jax[{name}]"] = [f"--config_field={field}" for field in fields]
  for variant in FLAGS.xla_variant:
    name, sep, xla_flags = variant.partition("=")
    if not sep or not name:
      raise app.UsageError(f"--xla_variant: expected NAME=FLAGS, got {variant!r}.")
    peer_env[f"jax[{name}]"] = {
        **env, "XLA_FLAGS": (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()}
  for variant in FLAGS.env_variant:
    name, _, assignment = variant.partition("=")
    var, sep, value = assignment.partition("=")
    if not sep or not name or not var:
      raise app.UsageError(f"--env_variant: expected NAME=VAR=VALUE, got {variant!r}.")
    peer_env[f"jax[{name}]"] = {**env, var: value}
  pool = workers.InterleavedWorkers()
  for peer, peer_environ in peer_env.items():
    pool.start(peer, [os.path.abspath(__file__), f"--worker={peer}", *passed,
                      f"--torch_device={FLAGS.torch_device}", *peer_args.get(peer, [])],
                  env=peer_environ, cwd=repo)
  times = pool.time_steps(FLAGS.rounds, FLAGS.pause_s, FLAGS.steps_per_turn)
  infos = pool.infos
  # After a pause, as before each step: the last peer's spinning threads would halve the rate.
  time.sleep(max(FLAGS.pause_s, 0.3))
  matmul = pool.ask("jax", "matmul")["gflops"] if "jax" in infos else None
  pool.close()

  print(f"{FLAGS.image_size}x{FLAGS.image_size}x{FLAGS.channels}, L={FLAGS.num_levels}, "
        f"K={FLAGS.steps_per_level}, width {FLAGS.hidden}, batch {FLAGS.batch}; "
        f"{pool.describe(FLAGS.rounds, FLAGS.steps_per_turn, 'peer')}, "
        f"{os.cpu_count()} CPU cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end; GLIBC_TUNABLES="
        f"{env.get('GLIBC_TUNABLES', '') or '(unset)'}\n")
  print("devices: " + ", ".join(f"{peer} {info['device']}" for peer, info in infos.items()
                                 if "device" in info) + "\n")
  ref = "jax" if "jax" in times else next(iter(times))
  med0, min0 = np.median(times[ref]), np.min(times[ref])
  print(f"| peer | median ms | min ms | speed of {ref} vs peer (median) | (min) |")
  print("| --- | --- | --- | --- | --- |")
  for peer, t in times.items():
    print(f"| {peer} | {1e3 * np.median(t):.0f} | {1e3 * np.min(t):.0f} | "
          f"{np.median(t) / med0:.2f}x | {np.min(t) / min0:.2f}x |")
  if "jax" in infos:
    flops = infos["jax"]["flops"]
    print(f"\nJAX step: {flops / 1e9:.1f} GFLOP (XLA cost analysis); "
          f"{flops / np.min(times['jax']) / 1e9:.1f} GFLOP/s at the min time, "
          f"{flops / np.median(times['jax']) / 1e9:.1f} at the median; a 2048^2 float32 matmul "
          f"through JAX: {matmul:.1f} GFLOP/s (achieved fraction "
          f"{flops / np.min(times['jax']) / 1e9 / matmul:.0%}).")


if __name__ == "__main__":
  app.run(main)
