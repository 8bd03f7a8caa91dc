"""MNIST 28x28x1, 8-bit, from the TFDS catalog (`python -m eiw_flow_jax.prepare --dataset=mnist`).

Glow reported no MNIST numbers; this is a Glow-style model sized for MNIST (this project's
choice): L=2 levels (28 is divisible by 4, not by 8), K=16 steps per level, 256 hidden channels,
affine coupling, Adam lr 1e-3 with warmup, batch 256. Flows of this kind reach about 1.0-1.1
bits/dim on MNIST (e.g. RealNVP/Glow-style baselines in the Residual Flows and FFJORD papers);
`eiw_flow_jax.commands.table` tabulates no published number for it.

Hardware: one accelerator (or 8, 32 images each).
Memory per device at 256 images on one device: about 5.6 GiB: 0.06 GiB of state plus 22 MiB
per image (XLA:CPU's memory analysis).
Memory mode `store` (keep every activation for the backward pass): the TPU compiler's fastest
for float32 coupling networks; recomputing (`remat`) moves more bytes here than it saves. TPU v5e
at 64 images per chip (the batch on 4 chips, scanned steps): 0.43 GiB per chip (arguments 0.04,
temporaries 0.38); 124 GFLOP and 2.8 GB per chip per step; roofline >= 3.4 ms a step, >= 3 min
for 50k steps (`remat`: 0.05 GiB, 164 GFLOP, 3.1 GB, 3.8 ms).
Command: `python -m eiw_flow_jax.aot --compare --config=configs/mnist.py --topology=v5e:2x2
--per_device_batch=64 --noeval --compare_memory=store,remat --compare_dtype=auto` (docs/tpu.md).
GPU memory per device, from XLA's GPU compiler, 8 H100s at 32 images each: 0.39 GiB (arguments
0.04, temporaries 0.35); 61 GFLOP per GPU per step, roofline >= 1.0 ms a step. Command: `python
-m eiw_flow_jax.aot --config=configs/mnist.py --topology=h100:8 --noeval` (docs/gpu.md).
Wall time: not measured. Estimate: about 20 min on one device at an assumed sustained
20 TFLOP/s (XLA: 2 GFLOP per image per step x 256 x 50k steps); 40-80 min at 5-10 TFLOP/s.
"""

from eiw_flow_jax.config import recipes


def get_config():
  config = recipes.glow_recipe(
      "mnist", **recipes.MNIST_GLOW_MODEL, batch_size=256, eval_batch_size=512,
      num_train_steps=50_000,  # ~210 epochs of 60k images
      warmup_steps=1000, eval_every_steps=5000,
  )
  config.model.memory = "store"  # the TPU compiler's fastest in float32 (docstring)
  return config
