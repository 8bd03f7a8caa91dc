"""CIFAR-10 32x32x3, 8-bit (TFDS `cifar10`), with Glow's CIFAR-10 hyperparameters.

Glow (Kingma & Dhariwal 2018; github.com/openai/glow README): L=3 levels, K=32 steps per level,
512 hidden channels, affine coupling, learned top prior, Adam with lr 1e-3 after a linear
warmup, n_bits 8, and 8 GPUs x 64 = 512 images per batch. The step count, warmup length, EMA
and clipping are this project's choices.

Published target (test bits/dim): Glow 3.35 (arXiv:1807.03039, Table 2). Also tabulated by
`eiw_flow_jax.commands.table`: RealNVP 3.49, Flow++ 3.08, DenseFlow 2.98 (other architectures).
`--config.model.split=vanilla` is Glow itself; the recipe, and this backbone's three
differences from openai/glow: `recipes.glow_recipe`.

Data: `python -m eiw_flow_jax.prepare --dataset=cifar10 --data_dir=DIR` (needs the [prepare]
extra and internet once), then `--config.dataset.data_dir=DIR`.
Hardware: 8 accelerators with >= 16 GB each (Glow's 8 GPUs), 64 images per device.
Memory mode `remat` (recompute each flow step in the backward pass): the TPU compiler's fastest
for float32 coupling networks. TPU v5e at 64 images per chip (scanned steps): 0.97 GiB per chip
(train state 0.67, temporaries 0.27); 1992 GFLOP and 24.4 GB per chip per step; roofline
>= 29.8 ms a step, >= 1.7 h for 200k steps (`store`: 4.05 GiB, 1496 GFLOP, 30.9 GB, 37.7 ms).
With `--config.model.dtype=bfloat16` (not the default: it changes the numerics) the fastest is
`--config.model.memory=remat_wide`: 27.2 ms (`store` 27.9). Command: `python -m eiw_flow_jax.aot
--config=configs/cifar10.py --topology=v5e:2x2 --per_device_batch=64 --noeval
[--config.model.memory=M] [--config.model.dtype=bfloat16]`, or `--compare` (docs/tpu.md).
`configs/cifar10.py:v5e_16`: 16 chips of 16 GiB, 32 images each: as is.
GPU memory per device, from XLA's GPU compiler, one node of 8 H100s at 64 images each, float32,
`store`: 4.64 GiB of the 59.33 JAX's allocator takes of an H100 (arguments 0.66, temporaries
3.99); 1483 GFLOP per GPU per step; roofline >= 11.6 ms a step (memory traffic), >= 39 min for
200k steps. Command: `python -m eiw_flow_jax.aot --config=configs/cifar10.py --topology=h100:8
--noeval --config.model.memory=store` (docs/gpu.md).
"""

from eiw_flow_jax.config import recipes

HARDWARE = {"v5e_16": {}}


def get_config(hardware: str = ""):
  config = recipes.glow_recipe(
      "cifar10", image_shape=(32, 32, 3), num_levels=3, steps_per_level=32, batch_size=512,
      num_train_steps=200_000,  # ~2000 epochs of 50k images
      warmup_steps=1000, eval_every_steps=10_000,
  )
  config.init_batch_size = 512
  config.model.memory = "remat"  # the TPU compiler's fastest in float32 (docstring)
  return recipes.hardware_variant(config, hardware, HARDWARE)
