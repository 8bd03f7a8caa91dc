"""ImageNet 64x64x3, 8-bit: van den Oord et al.'s downsampled ImageNet (TFDS
`downsampled_imagenet/64x64`), with Glow's architecture.

Glow (github.com/openai/glow README, "ImageNet 64x64 quantitative result"): L=4, K=48, 512
hidden channels, affine coupling, lr 1e-3, n_bits 8. The batch of 256 (half of Glow's 512 at
32x32, for memory at 4x the pixels), the step count, warmup, EMA and clipping are this
project's choices. Evaluated on "validation". `dataset.name="imagenet64_resized"` reads TFDS
`imagenet_resized/64x64` instead: NOT comparable with published numbers.

Published target (test bits/dim): Glow 3.81 (arXiv:1807.03039, Table 2). Also tabulated:
RealNVP 3.98, Flow++ 3.69, DenseFlow 3.35.
`--config.model.split=vanilla` is Glow itself; the recipe, and this backbone's three
differences from openai/glow: `recipes.glow_recipe`.

Data: `python -m eiw_flow_jax.prepare --dataset=imagenet64 --data_dir=DIR --source_dir=SRC` with
train_64x64.tar and valid_64x64.tar in SRC.
Hardware: 8 accelerators with >= 16 GB each, 32 images per device.
Memory mode `remat` (recompute each flow step in the backward pass): the TPU compiler's fastest
for float32 coupling networks. TPU v5e at 32 images per chip (scanned steps): 3.20 GiB per chip
(arguments 1.68, temporaries 1.47); 6237 GFLOP and 109.7 GB per chip per step; roofline
>= 134 ms a step, >= 14.9 h for 400k steps (`store`: 13.48 GiB of the 15.75 the compiler allows,
4683 GFLOP, 126.5 GB, 155 ms; with bfloat16 coupling networks `store` takes 142 ms). Command:
`python -m eiw_flow_jax.aot --config=configs/imagenet64.py --topology=v5e:2x2
--per_device_batch=32 --noeval [--config.model.memory=M] [--config.model.dtype=bfloat16]`
(docs/tpu.md).
`configs/imagenet64.py:v5e_16`: 16 chips of 16 GiB, 16 images each: as is (with `store`, 8.75
GiB of 15.75 per chip: arguments 1.68, temporaries 7.02; same command with
--per_device_batch=16).
GPU memory per device, from XLA's GPU compiler, one node of 8 H100s at 32 images each, float32,
`store`: 13.53 GiB of the 59.33 JAX's allocator takes of an H100 (arguments 1.67, temporaries
11.87); 4649 GFLOP per GPU per step; roofline >= 33.5 ms a step (memory traffic), >= 3.7 h for
400k steps. Command: `python -m eiw_flow_jax.aot --config=configs/imagenet64.py
--topology=h100:8 --noeval --config.model.memory=store` (docs/gpu.md).
"""

from eiw_flow_jax.config import recipes

HARDWARE = {"v5e_16": {}}  # fits as stored (above)


def get_config(hardware: str = ""):
  config = recipes.glow_recipe(
      "imagenet64", image_shape=(64, 64, 3), num_levels=4, steps_per_level=48, batch_size=256,
      num_train_steps=400_000,
  )
  config.dataset.eval_split = ""  # the dataset's usual eval split: "validation"
  config.model.memory = "remat"  # the TPU compiler's fastest in float32 (docstring)
  return recipes.hardware_variant(config, hardware, HARDWARE)
