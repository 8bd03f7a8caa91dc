"""The devices of a TPU or GPU topology, without the hardware (deviceless compiles).

A topology is `NAME:SHAPE`: a TPU as JAX names it (`v5e:2x2`, `v4:2x2x1`: libtpu's compiler) or
an NVIDIA GPU of `chips.GPUS` (`h100:8`, `h100:2x8`, `h100:1x2x8`: GPUs per host, hosts x GPUs
per host, or XLA's partitions x hosts x GPUs per host; the CUDA plugin's compiler, described to
XLA by `chips.GpuSpec.target_config`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Mapping

import jax

from eiw_flow_jax.aot import AotError
from eiw_flow_jax.aot.chips import (
    CHIPS,
    DEFAULT_GPU_MEMORY_FRACTION,
    GPUS,
    ChipSpec,
    GiB,
    GpuSpec,
    chip_for,
)

GPU_EXTRA = 'pip install -e ".[gpu-aot]"'
_TOPOLOGY = re.compile(r"([a-z0-9][a-z0-9-]*):(\d+(?:x\d+)*)")
_TPU_NAME = re.compile(r"v\d+[a-z]*")
# Environment variables JAX's CUDA plugin reads for its allocator's share of each GPU's memory:
# the current name and the older one (jaxlib 0.10.2 refuses both set at once).
MEMORY_FRACTION_VARIABLES = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")


@dataclasses.dataclass(frozen=True)
class Target:
  """A topology's devices and what is known of their accelerator."""

  devices: list[jax.Device]
  platform: str  # "tpu" or "gpu"
  chip: ChipSpec | GpuSpec | None  # None: a TPU this package has no figures for
  hosts: int  # processes (one per host) the topology has
  memory_fraction: float | None = None  # GPU: the share of its memory JAX's allocator takes

  @property
  def usable_bytes(self) -> int | None:
    """What one device may use: the GPU's share for JAX's allocator; for a TPU, the compiler's
    limit from `ChipSpec` (None where unknown)."""
    if isinstance(self.chip, GpuSpec):
      return self.chip.usable_bytes(self.memory_fraction)
    if self.chip is None:
      return None
    cores = int(getattr(self.devices[0], "num_cores", 1) or 1)
    return int(self.chip.usable_gib_per_core * cores * GiB)


def libtpu_available() -> bool:
  """Whether `libtpu` (the TPU compiler; `pip install -e ".[tpu]"`) is installed."""
  return importlib.util.find_spec("libtpu") is not None


def gpu_compiler_available() -> bool:
  """Whether JAX's CUDA plugin (the GPU compiler; `pip install -e ".[gpu-aot]"`) is installed."""
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ImportError:  # no jax_plugins package at all
    return False


def _quiet_libtpu_env() -> None:
  """Environment for loading libtpu only to compile (set before its first load).

  Several processes may compile at once (libtpu otherwise holds /tmp/libtpu_lockfile, meant for
  processes that own the chips). Off a TPU VM, libtpu looks for the VM's accelerator type and
  worker hostnames and prints several lines of warnings to stderr without them; these
  placeholders describe no TPU and only apply where there is none (no /dev/accel* or /dev/vfio).
  """
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  on_tpu_vm = any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0"))
  if not on_tpu_vm and "TPU_ACCELERATOR_TYPE" not in os.environ:
    os.environ["TPU_ACCELERATOR_TYPE"] = "v5litepod-1"
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def _quiet_cuda_env() -> None:
  """Environment for loading the CUDA plugin only to compile (set before its first load).

  Without a GPU the plugin's start-up check fails at `cuInit` and prints a traceback (its
  topologies then may be refused); JAX_SKIP_CUDA_CONSTRAINTS_CHECK skips that check and
  CUDA_VISIBLE_DEVICES=-1 keeps CUDA from looking for devices. Only where there is no GPU
  (no /dev/nvidiactl): on a GPU host the process keeps its GPUs.
  """
  if not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0")):
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")


def gpu_memory_fraction(environ: Mapping[str, str]) -> float:
  """The share of each GPU's memory JAX's allocator takes in a process with `environ`:
  XLA_CLIENT_MEM_FRACTION (or its older name), else JAX's default."""
  given = [name for name in MEMORY_FRACTION_VARIABLES if environ.get(name, "").strip()]
  if len(given) > 1:
    raise AotError(f"set one of {' and '.join(given)}: JAX refuses both.")
  for name in MEMORY_FRACTION_VARIABLES:
    text = environ.get(name, "").strip()
    if text:
      try:
        fraction = float(text)
      except ValueError:
        fraction = float("nan")  # refused below, as an out-of-range value is
      if not 0 < fraction <= 1:
        raise AotError(f"{name} must be a fraction in (0, 1], got {text!r}.")
      return fraction
  return DEFAULT_GPU_MEMORY_FRACTION


def _version(package: str, parts: int) -> tuple[int, ...]:
  numbers = [int(n) for n in re.findall(r"\d+", importlib.metadata.version(package))[:parts]]
  return tuple(numbers + [0] * (3 - len(numbers)))


def _cuda_versions() -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(cuDNN, CUDA runtime) versions of the installed CUDA wheels: those the training job runs
  with when it installs the same pins (`jax[cuda12]`)."""
  try:
    return _version("nvidia-cudnn-cu12", 3), _version("nvidia-cuda-runtime-cu12", 2)
  except importlib.metadata.PackageNotFoundError as e:
    raise AotError(
        f"compiling for a GPU needs the CUDA wheels of jax[cuda12] ({e.name} is not installed): "
        f"{GPU_EXTRA}.") from e


def _topology_error(topology: str) -> AotError:
  return AotError(
      "--topology must look like v5e:2x2 or v4:2x2x1 (TPU: version:chips per axis) or h100:8, "
      f"h100:2x8 (GPU: name:[hosts x] GPUs per host), got {topology!r}.")


def _unknown_accelerator(name: str, topology: str) -> AotError:
  return AotError(
      f"unknown accelerator {name!r} in --topology={topology}: the GPUs known are "
      f"{', '.join(GPUS)} (e.g. h100:8); TPUs go by JAX's names ({', '.join(CHIPS)}: v5e:2x2).")


def _gpu_shape(topology: str, dims: list[int], num_slices: int) -> tuple[int, int, int]:
  """(partitions, hosts, GPUs per host) of a GPU topology's numbers."""
  if len(dims) > 3:
    raise _topology_error(topology)
  if len(dims) == 3:
    if num_slices > 1:
      raise AotError(f"--topology={topology} names its partitions already: drop --num_slices, "
                     "or give hosts x GPUs per host.")
    partitions, hosts, gpus = dims
  else:
    partitions, (hosts, gpus) = num_slices, ([1, *dims])[-2:]
  if min(partitions, hosts, gpus) < 1:
    raise AotError(f"--topology={topology}: every count must be >= 1.")
  return partitions, hosts, gpus


def _gpu_target(name: str, topology: str, dims: list[int], num_slices: int,
                environ: Mapping[str, str]) -> Target:
  if not gpu_compiler_available():
    raise AotError(
        f"compiling for a GPU topology needs JAX's CUDA plugin (jax[cuda12] of the installed jax "
        f"{jax.__version__}, ~5.5 GB): {GPU_EXTRA}.")
  spec = GPUS[name]
  partitions, hosts, gpus = _gpu_shape(topology, dims, num_slices)
  fraction = gpu_memory_fraction(environ)
  cudnn, runtime = _cuda_versions()
  from jax.experimental import topologies  # noqa: PLC0415

  _quiet_cuda_env()
  try:
    desc = topologies.get_topology_desc(
        platform="cuda", target_config=spec.target_config(cudnn, runtime),
        topology=f"{partitions}x{hosts}x{gpus}")
  except Exception as e:  # noqa: BLE001 - the plugin's message says why
    detail = " ".join(str(e).split())[:300]
    raise AotError(f"GPU topology {topology!r}: {detail}") from e
  return Target(list(desc.devices), "gpu", spec, hosts=partitions * hosts,
                memory_fraction=fraction)


def _tpu_target(topology: str, num_slices: int) -> Target:
  if not libtpu_available():
    raise AotError(
        "compiling for a TPU topology needs libtpu: pip install -e \".[tpu]\" (jax[tpu] of the "
        f"installed jax {jax.__version__}).")
  from jax.experimental import topologies  # noqa: PLC0415

  _quiet_libtpu_env()
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
  except Exception as e:  # noqa: BLE001 - libtpu's message for an unknown name says why
    detail = " ".join(str(e).split())[:300]
    raise AotError(f"TPU topology {topology!r} (num_slices={num_slices}): {detail}") from e
  devices = list(desc.devices)
  return Target(devices, "tpu", chip_for(devices[0].device_kind),
                hosts=len({d.process_index for d in devices}))


def resolve(topology: str, num_slices: int = 1,
            environ: Mapping[str, str] | None = None) -> Target:
  """The devices of `topology` (`num_slices` of it) and their accelerator; `environ` (default:
  this process's) holds the GPU memory fraction the training job will run with."""
  match = _TOPOLOGY.fullmatch(topology)
  if not match:
    raise _topology_error(topology)
  if num_slices < 1:
    raise AotError(f"--num_slices must be >= 1, got {num_slices}.")
  name, shape = match.groups()
  if name in GPUS:
    dims = [int(n) for n in shape.split("x")]
    return _gpu_target(name, topology, dims, num_slices,
                       os.environ if environ is None else environ)
  if _TPU_NAME.fullmatch(name):
    return _tpu_target(topology, num_slices)
  raise _unknown_accelerator(name, topology)


def topology_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
  """The devices of a TPU or GPU topology (`v5e:2x2`, `h100:8`, ...), `num_slices` of it."""
  return resolve(topology, num_slices).devices
