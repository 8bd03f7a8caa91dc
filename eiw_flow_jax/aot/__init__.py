"""Ahead-of-time compiles for a TPU or GPU topology on any machine: memory per device, cost,
roofline.

  python -m eiw_flow_jax.aot --config=configs/cifar10.py --topology=v5e:4x4 \\
      [--per_device_batch=64] [--num_slices=2] [--max_batch_search=300] [--config.x=y ...]
  python -m eiw_flow_jax.aot --config=configs/cifar10.py --topology=h100:8   # or h100:4x8, ...
  python -m eiw_flow_jax.aot --table configs/digits.py configs/cifar10.py \\
      --topology=v5e:2x2,v5p:2x2x1,h100:8 [--per_device_batch=N]

The first thing to run before renting a slice or GPU nodes. With `libtpu` installed (`pip install
-e ".[tpu]"`), JAX compiles for a TPU topology without a TPU (`jax.experimental.topologies`);
with JAX's CUDA plugin (`pip install -e ".[gpu-aot]"`), for NVIDIA GPUs without one, from a
description of the GPU for XLA (`chips.GpuSpec.target_config`). The train step and the eval step
are built exactly as `python -m eiw_flow_jax.main` builds them (`training.run.Run`: the same
train step, abstract state, mesh and shardings) over a mesh of the topology's
devices, lowered on `jax.ShapeDtypeStruct`s (no array is allocated) and compiled by the real
compiler, whose memory and cost analyses are printed: per device the arguments (parameters,
EMA, optimizer state), temporaries, outputs and total against what one device may use (the TPU
compiler's limit; on a GPU, the share of its memory JAX's allocator takes), FLOPs and bytes per
step, a roofline lower bound on the step time and images/s from `CHIPS` / `GPUS`, and
(`--max_batch_search`) the largest per-device batch that fits. A config that does not fit exits
1 with one line. `--table` prints a "before you rent" table over configs and topologies: fits,
GiB per device, step time and wall time to the config's step count.

The per-device batch defaults to the config's global batch split over the topology's devices
(what `main` would run there); `--per_device_batch` sets the global batch to N x devices.
TPU topology names are JAX's: `v4:2x2x1`, `v5e:2x2`, `v5p:2x2x1`, `v6e:4x4`, ...;
`--num_slices` compiles for several such slices joined by the data-center network
(multi-slice). GPU topologies name the GPU and GPUs per host, or hosts x GPUs per host
(`topology.resolve`). docs/tpu.md and docs/gpu.md hold measured figures and the caveats.

Not covered: the data-dependent init (`train_state.create_state` runs `flow.init` on one device on
`init_batch_size` images before the first step), the input pipeline's host memory, and the
time of the gradient all-reduce over the interconnect (the roofline counts one device's
compute and memory traffic only).

Modules: `chips` (published figures of each accelerator), `topology` (its devices without the
hardware), `compiler` (lowering and compiling the steps, memory and cost), `search` (the largest
batch that fits), `report` (what is printed); the command line is `eiw_flow_jax.commands.aot`.
"""

from __future__ import annotations


class AotError(Exception):
  """Bad input the user can fix (topology, config, no compiler installed); the CLI prints one
  line."""
