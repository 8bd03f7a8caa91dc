"""ImageNet 32x32x3, 8-bit: van den Oord et al.'s downsampled ImageNet (TFDS
`downsampled_imagenet/32x32`), the data of the density papers, with Glow's hyperparameters.

Glow (github.com/openai/glow README, "ImageNet 32x32 quantitative result"): L=3, K=48, 512
hidden channels, affine coupling, lr 1e-3, n_bits 8, 8 GPUs x 64 = 512 images per batch.
Evaluated on the "validation" split (the usual test set for density estimation). Step count,
warmup, EMA and clipping are this project's choices. `dataset.name="imagenet32_resized"` reads
TFDS `imagenet_resized/32x32` instead, a different downsampling: NOT comparable.

Published target (test bits/dim): Glow 4.09 (arXiv:1807.03039, Table 2). Also tabulated:
RealNVP 4.28, Flow++ 3.86, DenseFlow 3.63.
`--config.model.split=vanilla` is Glow itself; the recipe, and this backbone's three
differences from openai/glow: `recipes.glow_recipe`.

Data: `python -m eiw_flow_jax.prepare --dataset=imagenet32 --data_dir=DIR --source_dir=SRC` with
train_32x32.tar and valid_32x32.tar in SRC (no TensorFlow needed for this one).
Hardware: 8 accelerators with >= 16 GB each, 64 images per device.
Memory mode `remat` (recompute each flow step in the backward pass): the TPU compiler's fastest
for float32 coupling networks. TPU v5e at 64 images per chip (scanned steps): 1.55 GiB per chip
(arguments 1.00, temporaries 0.53); 2987 GFLOP and 36.6 GB per chip per step; roofline
>= 44.6 ms a step, >= 5.0 h for 400k steps (`store`: 6.14 GiB, 2243 GFLOP, 46.3 GB, 56.6 ms;
with bfloat16 coupling networks `store` takes 41.7 ms). Command: `python -m eiw_flow_jax.aot
--config=configs/imagenet32.py --topology=v5e:2x2 --per_device_batch=64 --noeval
[--config.model.memory=M] [--config.model.dtype=bfloat16]` (docs/tpu.md).
`configs/imagenet32.py:v5e_16`: 16 chips of 16 GiB, 32 images each: as is.
GPU memory per device, from XLA's GPU compiler, one node of 8 H100s at 64 images each, float32,
`store`: 6.96 GiB of the 59.33 JAX's allocator takes of an H100 (arguments 0.99, temporaries
5.97); 2225 GFLOP per GPU per step; roofline >= 17.3 ms a step (memory traffic), >= 1.9 h
for 400k steps.
Command: `python -m eiw_flow_jax.aot --config=configs/imagenet32.py --topology=h100:8 --noeval
--config.model.memory=store` (docs/gpu.md).
"""

from eiw_flow_jax.config import recipes

HARDWARE = {"v5e_16": {}}


def get_config(hardware: str = ""):
  config = recipes.glow_recipe(
      "imagenet32", image_shape=(32, 32, 3), num_levels=3, steps_per_level=48, batch_size=512,
      num_train_steps=400_000,  # ~160 epochs of 1.28M images
  )
  config.dataset.eval_split = ""  # the dataset's usual eval split: "validation"
  config.init_batch_size = 512
  config.model.memory = "remat"  # the TPU compiler's fastest in float32 (docstring)
  return recipes.hardware_variant(config, hardware, HARDWARE)
