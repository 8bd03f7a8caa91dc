"""The devices of a TPU topology, without a TPU (libtpu's deviceless compile)."""

from __future__ import annotations

import importlib.util
import os
import re

import jax

from eiw_flow_jax.aot import AotError


def libtpu_available() -> bool:
  """Whether `libtpu` (the TPU compiler; `pip install -e ".[tpu]"`) is installed."""
  return importlib.util.find_spec("libtpu") is not None


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


def topology_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
  """The devices of a TPU topology (`v5e:2x2`, `v4:2x2x1`, ...), `num_slices` of them."""
  if not libtpu_available():
    raise AotError(
        "compiling for a TPU topology needs libtpu: pip install -e \".[tpu]\" (jax[tpu] of the "
        f"installed jax {jax.__version__})."
    )
  if not re.fullmatch(r"[a-z0-9]+:\d+(x\d+)*", topology):
    raise AotError(
        f"--topology must look like v5e:2x2 or v4:2x2x1 (version:chips per axis), got "
        f"{topology!r}."
    )
  if num_slices < 1:
    raise AotError(f"--num_slices must be >= 1, got {num_slices}.")
  from jax.experimental import topologies  # noqa: PLC0415

  _quiet_libtpu_env()
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
  except Exception as e:  # noqa: BLE001 - libtpu's message for an unknown name says why
    detail = " ".join(str(e).split())[:300]
    raise AotError(f"TPU topology {topology!r} (num_slices={num_slices}): {detail}") from e
  return list(desc.devices)


# ----------------------------------------------------------------------------------------------
# One compile.
