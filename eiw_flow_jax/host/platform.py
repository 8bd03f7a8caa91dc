"""Whether this process's JAX computations will run on the CPU, decided before JAX loads.

The command line's host settings (`malloc`: glibc malloc tunables, `threads`: one
OpenBLAS thread) are for XLA:CPU's step: its buffers, its LAPACK calls. On a TPU or GPU host the
step runs on the accelerator, and they are left alone. JAX itself can tell only once it has
loaded its backends (seconds, and then too late for both settings), so this decides cheaply
from what JAX will look at: `JAX_PLATFORMS` when set (its first platform is the default one),
else whether an accelerator plugin is installed and its device is present.

The same decision keeps JAX quiet where a plugin is installed without its device (libtpu for
ahead-of-time TPU compiles, which the `tpu` extra of the test command installs, on a machine
without TPUs): JAX would initialise the plugin first, and libtpu prints its failure to find
chips on stderr (`unexpected worker hostname`, `Unable to initialize backend 'tpu'`, `No
jellyfish device found`) before JAX falls back to the CPU. `skip_absent_accelerators` sets
`JAX_PLATFORMS=cpu` there, so nothing is probed; where the device is present (a TPU VM),
nothing changes and the chips are used.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, MutableMapping

# Accelerator -> (its JAX plugin packages, device paths of which one exists where it is present).
ACCELERATORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "tpu": (("libtpu",), ("/dev/accel0", "/dev/vfio/0")),
    # /dev/dxg: a GPU under WSL2, which has no /dev/nvidia*.
    "cuda": (("jax_cuda12_plugin", "jax_cuda13_plugin"),
             ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")),
    "rocm": (("jax_rocm60_plugin", "jax_rocm7_plugin"), ("/dev/kfd",)),
}


PLATFORM_VARIABLES = ("JAX_PLATFORMS", "JAX_PLATFORM_NAME")  # JAX's choice, the newer first


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
  chosen = next((environ[v] for v in PLATFORM_VARIABLES if environ.get(v, "").strip()), "")
  if chosen:
    return chosen.split(",")[0].strip().lower()
  for name, (plugins, devices) in ACCELERATORS.items():
    if any(installed(p) for p in plugins) and any(exists(d) for d in devices):
      return name
  return "cpu"


def runs_on_cpu(environ: Mapping[str, str] | None = None) -> bool:
  """Whether `default_platform` of `environ` (default: this process's) is the CPU."""
  return default_platform(os.environ if environ is None else environ) == "cpu"


def skip_absent_accelerators(
    environ: MutableMapping[str, str] | None = None,
    installed: Callable[[str], bool] = _installed,
    exists: Callable[[str], bool] = os.path.exists,
) -> bool:
  """Sets `JAX_PLATFORMS=cpu` in `environ` (default: this process's) where an accelerator
  plugin is installed but no accelerator's device is present and JAX's platform is not chosen
  already, so that JAX does not probe (and libtpu does not complain about) missing chips.

  Returns whether it set the variable. Call it before JAX is imported (it reads the variable
  then); subprocesses inherit it.
  """
  environ = os.environ if environ is None else environ
  if any(environ.get(v, "").strip() for v in PLATFORM_VARIABLES):
    return False
  if default_platform(environ, installed, exists) != "cpu":
    return False  # an accelerator with its device: JAX uses it
  if not any(installed(p) for plugins, _ in ACCELERATORS.values() for p in plugins):
    return False  # nothing to probe: JAX's defaults stay as they are
  environ["JAX_PLATFORMS"] = "cpu"
  return True
