"""Shared test helpers: small configs, parameter perturbation, subprocess environment."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import types

# The suite runs on the CPU. With libtpu installed (the `tpu` extra, for tests/test_aot.py's
# deviceless TPU compiles, which work under this setting) JAX would otherwise look for TPU chips
# first and libtpu print warnings on stderr. Set before JAX is imported (it reads it then) and
# inherited by every subprocess; an explicit JAX_PLATFORMS wins.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from eiw_flow_jax.config.schema import base_config  # noqa: E402

# The suite's time is mostly XLA:CPU compiling small graphs. Two compile-only flags: LLVM
# optimisation level 0 (most of the compile time is LLVM optimising the emitted loops: a tiny EIW
# model's init 10.9 s -> 3.0 s on 2 cores; the whole suite ~0.7x the time) and XLA:CPU's older
# loop emitters instead of its MLIR fusion emitters (a tiny flow's loss-and-gradient: 2.2 s ->
# 0.8 s to compile). The matmul/convolution libraries are the same, the fusions nearly so; float
# round-off differs slightly (a gradient computed two ways: ~6e-7 of its scale), which the
# tests' float32 tolerances cover. Set EIW_FLOW_JAX_TEST_XLA_FLAGS="" to run the suite under
# XLA's defaults. Set at import, before any test starts JAX's backend (which reads XLA_FLAGS
# then), and passed to the subprocesses of the `env` fixture.
LOOP_EMITTERS_FLAG = "--xla_cpu_use_fusion_emitters=false"


def xla_accepts(flag: str) -> bool:
  """Whether this jaxlib's XLA knows `flag`: an unknown flag in XLA_FLAGS aborts the process, and
  the loop-emitter switch may not exist in every jax version requirements.txt allows (~2 s)."""
  probe = subprocess.run(
      [sys.executable, "-c", "import jax; jax.devices()"], capture_output=True, timeout=120,
      env={**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"})
  return probe.returncode == 0


TEST_XLA_FLAGS = os.environ.get("EIW_FLOW_JAX_TEST_XLA_FLAGS")
if TEST_XLA_FLAGS is None:
  TEST_XLA_FLAGS = "--xla_backend_optimization_level=0" + (
      f" {LOOP_EMITTERS_FLAG}" if xla_accepts(LOOP_EMITTERS_FLAG) else "")


def with_test_xla_flags(flags: str = "") -> str:
  """`flags` plus the suite's compile flags, as one XLA_FLAGS value."""
  return " ".join(f for f in (flags, TEST_XLA_FLAGS) if f)


os.environ["XLA_FLAGS"] = with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))


def make_config(
    image_shape=(8, 8, 1), num_levels=2, steps=2, hidden=8, split="eiw", mode="global", n_bits=8
):
  config = base_config()
  config.model.image_shape = image_shape
  config.model.num_levels = num_levels
  config.model.steps_per_level = steps
  config.model.hidden_channels = hidden
  config.model.split = split
  config.model.eiw.mode = mode
  config.model.n_bits = n_bits
  config.model.eiw.solver_hidden = 8
  config.model.eiw.reduction = 2  # tiny channel counts: keep the SE bottleneck wider than 1
  return config


def reduced_cifar_config(steps: int = 2, width: int = 512):
  """configs/cifar10.py with K steps per level (32 published) and `width` hidden channels,
  unrolled (one compile whose own cost analysis counts every step), under memory "store" (the
  AOT tests' figures were measured with it; the config's default is remat): the same network
  otherwise. The TPU and GPU AOT tests compile it."""
  from eiw_flow_jax.commands.aot import load_config  # noqa: PLC0415 - defines no flags

  config = load_config(f"{REPO}/configs/cifar10.py")
  config.model.steps_per_level = steps
  config.model.scan_steps = False
  config.model.hidden_channels = width
  config.model.memory = "store"
  return config


def perturb(variables, rng, scale=0.1):
  """Adds Gaussian noise to every trained parameter, so zero-initialised parts become active.

  The noise is drawn on the host (numpy, seeded by `rng`'s key data): drawn with JAX, op by op
  or jitted, every parameter shape compiled its own random kernels (~8 s per tiny model)."""
  seed = np.asarray(jax.random.key_data(rng) if jax.dtypes.issubdtype(
      rng.dtype, jax.dtypes.prng_key) else rng).ravel().tolist()
  noise = np.random.default_rng(seed)

  def noisy(leaf):
    return jnp.asarray(np.asarray(leaf) + scale * noise.standard_normal(leaf.shape).astype(
        leaf.dtype))

  return {**variables, "params": jax.tree_util.tree_map(noisy, variables.get("params", {}))}


def random_uint8(shape, n_bits=8, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, 2**n_bits, shape).astype(np.uint8))


def log_abs_det_jacobian(fn, x_single):
  """log|det d fn / d x| for one example, by jax.jacfwd on the flattened map."""
  flat = x_single.reshape(-1)

  def flat_fn(v):
    return fn(v.reshape(x_single.shape)).reshape(-1)

  jac = jax.jacfwd(flat_fn)(flat)
  return jnp.linalg.slogdet(jac)[1]


VARIANTS = [("vanilla", "global"), ("eiw", "global"), ("eiw", "per_example")]


@pytest.fixture(params=VARIANTS, ids=["vanilla", "eiw_global", "eiw_per_example"])
def variant(request):
  return request.param


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pinned_versions(path: str = os.path.join(REPO, "constraints.txt")) -> dict[str, str]:
  """Package name (lower case, '-' for '_') -> the version constraints.txt pins."""
  pins = {}
  with open(path) as f:
    for line in f:
      name, sep, version = line.split("#")[0].strip().partition("==")
      if sep:
        pins[name.strip().lower().replace("_", "-")] = version.strip()
  return pins


def _compiler_versions() -> dict[str, str]:
  import jaxlib  # noqa: PLC0415

  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}


PINNED = pinned_versions()
# Tests marked `compiler_output` assert on what XLA makes of a program (HLO text, buffer sizes),
# which another jax or jaxlib may legitimately change: they run on the pinned pair only.
ON_PINNED_COMPILER = all(PINNED.get(name) == version
                         for name, version in _compiler_versions().items())


MAX_TEST_WORKERS = 4


def pytest_xdist_auto_num_workers(config) -> int:
  """`-n auto` (setup.cfg): one worker per core, at most MAX_TEST_WORKERS. The suite is bound by
  XLA compiling on one thread per program, so workers scale on cores; each worker holds a JAX
  process and its compiles (~1-3 GiB), which caps them on a many-core machine."""
  return max(1, min(os.cpu_count() or 1, MAX_TEST_WORKERS))


def pytest_collection_modifyitems(config, items):
  del config
  if ON_PINNED_COMPILER:
    return
  running = ", ".join(f"{name} {version}" for name, version in _compiler_versions().items())
  skip = pytest.mark.skip(
      reason=f"asserts on compiler output, checked on the pinned jax {PINNED.get('jax')} and "
      f"jaxlib {PINNED.get('jaxlib')} (constraints.txt); this is {running}")
  for item in items:
    if "compiler_output" in item.keywords:
      item.add_marker(skip)


def transparent_hugepage_mode(path: str = "/sys/kernel/mm/transparent_hugepage/enabled") -> str:
  """The kernel's THP mode ("always", "madvise", "never"), or "" where it cannot be read."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return ""
  start, end = text.find("["), text.find("]")
  return text[start + 1 : end] if 0 <= start < end else ""


def load_bench_module(name: str) -> types.ModuleType:
  """bench/<name>.py as a module (bench/ is scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "bench", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS data_dir per test module, so tests never touch ~/tensorflow_datasets."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """One tiny run of 20 steps (checkpoints at 10 and 20) for the session: the tests that damage
  or change a trained workdir work on a copy (`copy_of_run`), never on this one."""
  from test_train import tiny_config

  from eiw_flow_jax.training import train_loop

  data_dir = str(tmp_path_factory.mktemp("tfds_trained"))
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  config = tiny_config(data_dir, num_train_steps=20, checkpoint_every_steps=10)
  train_loop.train(config, workdir)
  return config, workdir


def copy_of_run(trained, tmp_path) -> str:
  """A private copy of the `trained` fixture's workdir."""
  target = str(tmp_path / "copy")
  shutil.copytree(trained[1], target)
  return target


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the session, shared by the tests' own process and
  the command-line subprocesses (`env`), so a program compiled once (the same tiny model in
  several tests, or in a test and a CLI run) is loaded after that. (The suite on 2 cores:
  1145 -> 1100 s with it, within that machine's noise.)"""
  path = tmp_path_factory.getbasetemp() / "eiw_flow_xla_cache"
  path.mkdir(exist_ok=True)
  cache = str(path)
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return cache


# What importing JAX (above) with libtpu installed adds to this process's environment, and so
# to every subprocess's: libtpu's TPU_LIBRARY_PATH and TPU_SKIP_MDS_QUERY, TF_CPP_MIN_LOG_LEVEL;
# with JAX_PLATFORMS (set above) they keep libtpu quiet where a user's shell has none of them.
JAX_IMPORT_VARIABLES = (
    "JAX_PLATFORMS", "TPU_LIBRARY_PATH", "TPU_SKIP_MDS_QUERY", "TF_CPP_MIN_LOG_LEVEL",
    # What an in-process TPU or GPU compile sets (aot/topology.py's _quiet_libtpu_env and
    # _quiet_cuda_env): with these libtpu would stay quiet in a user's process too.
    "ALLOW_MULTIPLE_LIBTPU_LOAD", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES",
    "JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "CUDA_VISIBLE_DEVICES")


@pytest.fixture(scope="module")
def env(compilation_cache):
  """Subprocess environment: CPU, one device, the session's XLA compilation cache."""
  out = dict(os.environ)
  out.update(
      XLA_FLAGS=with_test_xla_flags(),
      JAX_PLATFORMS="cpu",
      JAX_COMPILATION_CACHE_DIR=compilation_cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      PYTHONPATH=REPO + os.pathsep + out.get("PYTHONPATH", ""),
  )
  return out


@pytest.fixture(scope="module")
def user_env(env):
  """`env` as a user's shell has it: no JAX_PLATFORMS, nothing that importing JAX set (the
  commands and notebooks must then keep JAX from probing for absent TPUs themselves).

  ALLOW_MULTIPLE_LIBTPU_LOAD=1: libtpu probes as it would on a user's machine even while
  another test process holds it (a TPU compile in a parallel worker); without it, libtpu
  silently steps aside there, and a check for the absence of its noise could not fail."""
  out = {k: v for k, v in env.items() if k not in JAX_IMPORT_VARIABLES}
  return {**out, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
