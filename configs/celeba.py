"""CelebA 64x64x3, 8-bit, as RealNVP prepared it (`celeba_realnvp`: TFDS `celeb_a`, the 148x148
crop at row 40, column 15, TF1's bilinear resize to 64x64). Not CelebA-HQ: Glow's CelebA
result is CelebA-HQ 256x256 at 5 bits (1.03), a different dataset that this project does not
register, so Glow has no comparable number here.

Architecture after Glow: K=32 steps per level and 512 hidden channels as in Glow's CelebA-HQ
model, with L=4 levels for 64x64 (Glow used L=6 at 256x256). n_bits 8 as RealNVP and DenseFlow;
`--config.model.n_bits=5` gives a 5-bit CelebA 64x64 (the 8-bit pixels shifted right by 3), for
which no published number is tabulated. Batch 256, lr 1e-3 with warmup; step count, EMA and
clipping are this project's choices.

Published target (test bits/dim, 64x64 8-bit CelebA, RealNVP's crop): RealNVP 3.02
(arXiv:1605.08803, Table 1). DenseFlow's 1.99 (arXiv:2106.04627) is on whole faces squashed
to 64x64 (`--config.dataset.name=celeba_denseflow`); `celeba` is this project's own centred
crop, compared with nothing (docs/datasets.md). Run with `--config.model.split=vanilla` for the
Glow-architecture baseline, as is for EIW-Flow (`recipes.glow_recipe`).

Data: `python -m eiw_flow_jax.prepare --dataset=celeba --data_dir=DIR` (TFDS `celeb_a`, which
every CelebA name reads).
Hardware: 8 accelerators with >= 16 GB each, 32 images per device.
Memory mode `remat` (recompute each flow step in the backward pass): the TPU compiler's fastest
for float32 coupling networks. TPU v5e at 32 images per chip (scanned steps): 2.21 GiB per chip
(arguments 1.12, temporaries 1.05); 4158 GFLOP and 73.2 GB per chip per step; roofline
>= 89.4 ms a step, >= 7.5 h for 300k steps (`store`: 8.96 GiB, 3122 GFLOP, 84.2 GB, 103 ms).
Command: `python -m eiw_flow_jax.aot --compare --config=configs/celeba.py --topology=v5e:2x2
--per_device_batch=32 --noeval --compare_memory=store,remat --compare_dtype=auto` (docs/tpu.md).
`configs/celeba.py:v5e_16`: 16 chips of 16 GiB, 16 images each: as is (it fits at 32).
GPU memory per device, from XLA's GPU compiler, one node of 8 H100s at 32 images each, float32,
`store`: 9.03 GiB of the 59.33 JAX's allocator takes of an H100 (arguments 1.11, temporaries
7.92); 3099 GFLOP per GPU per step; roofline >= 22.4 ms a step (memory traffic), >= 1.9 h for
300k steps.
Command: `python -m eiw_flow_jax.aot --config=configs/celeba.py --topology=h100:8 --noeval
--config.model.memory=store` (docs/gpu.md).
"""

from eiw_flow_jax.config import recipes

HARDWARE = {"v5e_16": {}}


def get_config(hardware: str = ""):
  config = recipes.glow_recipe(
      "celeba_realnvp", image_shape=(64, 64, 3), num_levels=4, steps_per_level=32, batch_size=256,
      num_train_steps=300_000,
  )
  config.model.memory = "remat"  # the TPU compiler's fastest in float32 (docstring)
  return recipes.hardware_variant(config, hardware, HARDWARE)
