"""Whether this process's JAX computations will run on the CPU, decided before JAX loads.

The command line's host settings (`malloc`: glibc malloc tunables, `threads`: one
OpenBLAS thread) are for XLA:CPU's step: its buffers, its LAPACK calls. On a TPU or GPU host the
step runs on the accelerator, and they are left alone. JAX itself can tell only once it has
loaded its backends (seconds, and then too late for both settings), so this decides cheaply
from what JAX will look at: `JAX_PLATFORMS` when set (its first platform is the default one),
else whether an accelerator plugin is installed and its device is present.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping

# Accelerator -> (its JAX plugin packages, device paths of which one exists where it is present).
ACCELERATORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "tpu": (("libtpu",), ("/dev/accel0", "/dev/vfio/0")),
    "cuda": (("jax_cuda12_plugin", "jax_cuda13_plugin"), ("/dev/nvidiactl", "/dev/nvidia0")),
    "rocm": (("jax_rocm60_plugin", "jax_rocm7_plugin"), ("/dev/kfd",)),
}


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None  # finds, does not import
  except (ImportError, ValueError):
    return False


def default_platform(
    environ: Mapping[str, str],
    installed: Callable[[str], bool] = _installed,
    exists: Callable[[str], bool] = os.path.exists,
) -> str:
  """The platform JAX will compute on by default: `JAX_PLATFORMS`'s first entry if that is set
  (or the older `JAX_PLATFORM_NAME`), else the first accelerator of `ACCELERATORS` whose plugin
  is installed and whose device exists, else "cpu". (A plugin without its device, e.g. libtpu
  installed for ahead-of-time TPU compiles on a CPU host, leaves JAX on the CPU.)"""
  chosen = environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or ""
  if chosen.strip():
    return chosen.split(",")[0].strip().lower()
  for name, (plugins, devices) in ACCELERATORS.items():
    if any(installed(p) for p in plugins) and any(exists(d) for d in devices):
      return name
  return "cpu"


def runs_on_cpu(environ: Mapping[str, str] | None = None) -> bool:
  """Whether `default_platform` of `environ` (default: this process's) is the CPU."""
  return default_platform(os.environ if environ is None else environ) == "cpu"
