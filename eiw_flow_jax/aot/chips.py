"""Published figures of each accelerator the ahead-of-time check knows."""

from __future__ import annotations

import dataclasses

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """Published figures of one TPU chip, and what the TPU compiler says one device may use.

  `bf16_flops` is the published peak per chip. No fp32 peak is published for these chips;
  under JAX's default matmul precision float32 convolutions and matmuls run on the MXU as one
  bfloat16 pass, so the roofline uses the bf16 peak for float32 models too (with
  `jax_default_matmul_precision="highest"` they take several passes: slower).
  """

  name: str
  device_kind: str  # jax.Device.device_kind of its devices
  hbm: str  # per chip, as published (the pages write GiB for v4, GB for the others)
  hbm_bytes_per_s: float  # per chip, as published
  bf16_flops: float  # per chip, as published
  tensorcores: int  # per chip; a JAX device is one TensorCore or a whole chip (megacore)
  # HBM one device may use, per the TPU compiler's out-of-memory message (libtpu 0.0.42.1,
  # jax 0.10.2: "exceeds available HBM (15.75G)" for a v5e device); per device, not per chip.
  usable_gib_per_core: float
  source: str


# Sources: the Cloud TPU documentation's page of each version, table of key specifications
# (read 2026-12-03): https://cloud.google.com/tpu/docs/v4 ("Peak compute per chip 275
# teraflops (bf16 or int8)", "HBM2 capacity and bandwidth 32 GiB, 1200 GBps", two TensorCores
# per chip), https://cloud.google.com/tpu/docs/v5e ("Peak compute per chip (bf16) 197
# TFLOPs", "HBM2 capacity and bandwidth 16 GB, 819 GBps", one TensorCore),
# https://cloud.google.com/tpu/docs/v5p ("459 TFLOPs", "HBM2e capacity and bandwidth 95 GB,
# 2765 GBps"), https://cloud.google.com/tpu/docs/v6e ("918 TFLOPs", "HBM capacity per chip
# 32 GB", "HBM bandwidth per chip 1640 GBps", one TensorCore).
CHIPS = {
    "v4": ChipSpec("TPU v4", "TPU v4", "32 GiB", 1200e9, 275e12, 2, 15.25,
                   "https://cloud.google.com/tpu/docs/v4"),
    "v5e": ChipSpec("TPU v5e", "TPU v5 lite", "16 GB", 819e9, 197e12, 1, 15.75,
                    "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": ChipSpec("TPU v5p", "TPU v5", "95 GB", 2765e9, 459e12, 2, 95.74 / 2,
                    "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": ChipSpec("TPU v6e", "TPU v6 lite", "32 GB", 1640e9, 918e12, 1, 31.25,
                    "https://cloud.google.com/tpu/docs/v6e"),
}


def chip_for(device_kind: str) -> ChipSpec | None:
  for chip in CHIPS.values():
    if chip.device_kind == device_kind:
      return chip
  return None
