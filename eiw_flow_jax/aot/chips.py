"""Published figures of each accelerator the ahead-of-time check knows: TPU chips (`CHIPS`) and
NVIDIA GPUs (`GPUS`, with the XLA target description a deviceless GPU compile needs)."""

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

  @property
  def memory_bytes_per_s(self) -> float:
    return self.hbm_bytes_per_s

  def peak_flops(self, dtype: str) -> tuple[float, str]:
    """(FLOP/s, precision named) the roofline uses for coupling networks computing in `dtype`:
    the bf16 peak for every dtype (see the class docstring)."""
    del dtype
    return self.bf16_flops, "bf16"


# Sources: the Cloud TPU documentation's page of each version, table of key specifications:
# https://cloud.google.com/tpu/docs/v4 ("Peak compute per chip 275
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


# ----------------------------------------------------------------------------------------------
# NVIDIA GPUs.

# Limits common to compute capabilities 8.0, 8.9 and 9.0, from the CUDA C++ Programming Guide's
# table "Technical Specifications per Compute Capability"
# (https://docs.nvidia.com/cuda/cuda-c-programming-guide/#features-and-technical-specifications):
# warp size 32; 1024 threads per block; block dimensions 1024 x 1024 x 64; grid dimensions
# (2**31 - 1) x 65535 x 65535; 64K 32-bit registers per SM and per block; 48 KB of shared
# memory per block unless a kernel opts in to more (`shared_memory_per_block_optin`).
_WARP = 32
_THREADS_PER_BLOCK = 1024
_BLOCK_DIMS = (1024, 1024, 64)
_GRID_DIMS = (2**31 - 1, 65535, 65535)
_REGISTERS_PER_SM = _REGISTERS_PER_BLOCK = 64 * 1024
_SHARED_MEMORY_PER_BLOCK = 48 * 1024
KiB, MiB = 1024, 1024**2

# The fraction of a GPU's memory JAX's allocator takes when neither XLA_CLIENT_MEM_FRACTION nor
# XLA_PYTHON_CLIENT_MEM_FRACTION is set ("JAX will preallocate 75% of the total GPU memory":
# https://docs.jax.dev/en/latest/gpu_memory_allocation.html; jaxlib 0.10.2 passes the variable to
# the CUDA plugin, whose default this is). Every buffer of the program comes from that pool.
DEFAULT_GPU_MEMORY_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """Published figures of one NVIDIA GPU, and its description for XLA's GPU compiler.

  The roofline uses the dense tensor-core peak (not NVIDIA's 2:4-sparsity figure, twice as
  high) of the precision the coupling networks compute in: float32 convolutions and matmuls run
  as TF32 under JAX's default precision on these GPUs (`jax_default_matmul_precision="highest"`
  runs true float32, several times slower), bfloat16 and float16 ones at the BF16/FP16 peak
  (the same figure on these GPUs).
  """

  name: str  # as NVIDIA sells it
  device_kind: str  # jax.Device.device_kind of the compiled-for devices (the target's name)
  memory: str  # per GPU, as published
  memory_bytes: int  # total device memory as the CUDA driver reports it (see GPUS)
  memory_bytes_per_s: float  # published
  tf32_flops: float  # dense tensor-core peak, published
  bf16_flops: float  # dense tensor-core peak, published (= FP16)
  compute_capability: tuple[int, int]
  sm_count: int
  fp32_lanes_per_sm: int
  boost_clock_ghz: float
  l2_cache_bytes: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  threads_per_sm: int
  source: str  # the pages the figures come from

  def peak_flops(self, dtype: str) -> tuple[float, str]:
    """(FLOP/s, precision named) the roofline uses for coupling networks computing in `dtype`."""
    if dtype in ("bfloat16", "float16"):
      return self.bf16_flops, ("BF16" if dtype == "bfloat16" else "FP16") + " dense"
    return self.tf32_flops, "TF32 dense"

  def usable_bytes(self, memory_fraction: float) -> int:
    """What JAX's allocator may hand out on one GPU: `memory_fraction` of the device memory."""
    return int(self.memory_bytes * memory_fraction)

  def target_config(self, cudnn: tuple[int, int, int], cuda_runtime: tuple[int, int, int]) -> str:
    """This GPU as XLA's `stream_executor.GpuTargetConfigProto` in text form (what
    `jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)` takes),
    for the cuDNN and CUDA runtime versions the program will run with."""
    major, minor = self.compute_capability
    clock_ghz = f"{self.boost_clock_ghz:g}"
    device_info = {
        "threads_per_block_limit": _THREADS_PER_BLOCK,
        "threads_per_warp": _WARP,
        "shared_memory_per_block": _SHARED_MEMORY_PER_BLOCK,
        "shared_memory_per_core": self.shared_memory_per_sm,
        "threads_per_core_limit": self.threads_per_sm,
        "core_count": self.sm_count,
        "fpus_per_core": self.fp32_lanes_per_sm,
        "block_dim_limit_x": _GRID_DIMS[0],
        "block_dim_limit_y": _GRID_DIMS[1],
        "block_dim_limit_z": _GRID_DIMS[2],
        "memory_bandwidth": int(self.memory_bytes_per_s),
        "l2_cache_size": self.l2_cache_bytes,
        "clock_rate_ghz": clock_ghz,
        "device_memory_size": self.memory_bytes,
        "shared_memory_per_block_optin": self.shared_memory_per_block_optin,
        "registers_per_core_limit": _REGISTERS_PER_SM,
        "registers_per_block_limit": _REGISTERS_PER_BLOCK,
        "thread_dim_limit_x": _BLOCK_DIMS[0],
        "thread_dim_limit_y": _BLOCK_DIMS[1],
        "thread_dim_limit_z": _BLOCK_DIMS[2],
    }
    lines = ["gpu_device_info {"]
    lines += [f"  {field}: {value}" for field, value in device_info.items()]
    lines += [f"  cuda_compute_capability {{ major: {major} minor: {minor} }}", "}"]
    lines += [
        'platform_name: "CUDA"',
        "dnn_version_info {{ major: {} minor: {} patch: {} }}".format(*cudnn),
        "runtime_version {{ major: {} minor: {} patch: {} }}".format(*cuda_runtime),
        f'device_description_str: "{self.device_kind}"',
    ]
    return "\n".join(lines) + "\n"


# Sources, per GPU. Peaks: NVIDIA's datasheets give the tensor-core figures
# "with sparsity"; the dense peak used here is half of that. Clock: the FP32 (non-tensor) peak
# of the datasheet over 2 x the FP32 lanes (e.g. 67 TFLOPS / (2 x 16896) = 1.98 GHz for the
# H100 SXM). Device memory: what the CUDA driver reports on the GPU (`cuDeviceTotalMem`, the
# total JAX's allocator takes its fraction of), as captured from each device in openxla/xla's
# GPU specs (xla/backends/gpu/target_config/specs/{h100_sxm,h200,a100_sxm_80,a100_sxm_40}.txtpb);
# for the L4, nvidia-smi's total (23,034 MiB, https://thundergolfer.com/blog/nvidia-gpu-memory-capacity;
# on the H100 the driver's total is 0.54 GiB below nvidia-smi's, so this one may be high).
# Shared memory and threads per SM by compute capability: the CUDA C++ Programming Guide's
# table (above): 9.0: 228 KB per SM, 227 KB per block opted in, 2048 threads; 8.0: 164 KB,
# 163 KB, 2048; 8.9: 100 KB, 99 KB, 1536.
# - H100 SXM5 80GB: https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
#   (80 GB HBM3, 3.35 TB/s, FP32 67 TFLOPS, TF32 989 and BF16 1,979 TFLOPS with sparsity);
#   https://developer.nvidia.com/blog/nvidia-hopper-architecture-in-depth/ (132 SMs, 128 FP32
#   cores per SM, 50 MB L2, compute capability 9.0).
# - H200 SXM 141GB: https://www.nvidia.com/en-us/data-center/h200/ (141 GB HBM3e, 4.8 TB/s, FP32
#   67 TFLOPS, TF32 989 and BF16 1,979 TFLOPS with sparsity): the H100's Hopper GPU (the same
#   FP32 peak: 132 SMs at 1.98 GHz) with more and faster memory.
# - A100 SXM4 80GB and 40GB: https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
#   (80 GB HBM2e at 2,039 GB/s, 40 GB HBM2 at 1,555 GB/s; TF32 156 and BF16 312 TFLOPS dense,
#   FP32 19.5 TFLOPS); https://images.nvidia.com/aem-dam/en-zz/Solutions/data-center/nvidia-ampere-architecture-whitepaper.pdf
#   (108 SMs, 64 FP32 cores per SM, 1410 MHz boost, 40 MB L2, compute capability 8.0).
# - L4: https://www.nvidia.com/en-us/data-center/l4/ (24 GB GDDR6, 300 GB/s, FP32 30.3 TFLOPS,
#   TF32 120 and BF16 242 TFLOPS with sparsity; Ada Lovelace, compute capability 8.9). NVIDIA's
#   page gives no SM count, clock or L2 size: third-party databases (TechPowerUp's) give a
#   2,040 MHz boost clock, 48 MB of L2 (the AD104 die's) and 58 or 60 SMs; 58 is the count that
#   gives the datasheet's FP32 peak at that clock (58 x 128 x 2 x 2.04 GHz = 30.3 TFLOPS). These
#   three steer XLA's kernel tiling only, not memory or the roofline.
_HOPPER = {"compute_capability": (9, 0), "fp32_lanes_per_sm": 128, "l2_cache_bytes": 50 * MiB,
           "shared_memory_per_sm": 228 * KiB, "shared_memory_per_block_optin": 227 * KiB,
           "threads_per_sm": 2048}
_AMPERE = {"compute_capability": (8, 0), "fp32_lanes_per_sm": 64, "l2_cache_bytes": 40 * MiB,
           "shared_memory_per_sm": 164 * KiB, "shared_memory_per_block_optin": 163 * KiB,
           "threads_per_sm": 2048}
_A100_SOURCE = ("https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
                "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")
GPUS = {
    "h100": GpuSpec(
        "H100 SXM5 80GB", "NVIDIA H100 80GB HBM3", "80 GB HBM3", 84_942_979_072, 3.35e12,
        989e12 / 2, 1979e12 / 2, sm_count=132, boost_clock_ghz=1.98, **_HOPPER,
        source="https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"),
    "h200": GpuSpec(
        "H200 SXM 141GB", "NVIDIA H200", "141 GB HBM3e", 151_397_597_184, 4.8e12,
        989e12 / 2, 1979e12 / 2, sm_count=132, boost_clock_ghz=1.98, **_HOPPER,
        source="https://www.nvidia.com/en-us/data-center/h200/"),
    "a100-80g": GpuSpec(
        "A100 SXM4 80GB", "NVIDIA A100-SXM4-80GB", "80 GB HBM2e", 85_100_068_864, 2039e9,
        156e12, 312e12, sm_count=108, boost_clock_ghz=1.41, **_AMPERE, source=_A100_SOURCE),
    "a100-40g": GpuSpec(
        "A100 SXM4 40GB", "NVIDIA A100-SXM4-40GB", "40 GB HBM2", 42_331_013_120, 1555e9,
        156e12, 312e12, sm_count=108, boost_clock_ghz=1.41, **_AMPERE, source=_A100_SOURCE),
    "l4": GpuSpec(
        "L4", "NVIDIA L4", "24 GB GDDR6", 23_034 * MiB, 300e9, 120e12 / 2, 242e12 / 2,
        compute_capability=(8, 9), sm_count=58, fp32_lanes_per_sm=128, boost_clock_ghz=2.04,
        l2_cache_bytes=48 * MiB, shared_memory_per_sm=100 * KiB,
        shared_memory_per_block_optin=99 * KiB, threads_per_sm=1536,
        source="https://www.nvidia.com/en-us/data-center/l4/"),
}
