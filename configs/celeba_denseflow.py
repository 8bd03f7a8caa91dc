"""CelebA 64x64 with the paper's model: DenseFlow DF-74-10 with EIW transitions.

The authors' command: --epochs 50 --batch_size 32 --optimizer adamax --lr 1e-3 --gamma 0.95
--warmup 5000 --augmentation horizontal_flip, DF-74-10 (then 5 epochs at lr 2e-5; not
reproduced here). Target: DenseFlow reports 1.99 bits/dim (IWBO, k = 200, --kbs 25); EIW-Flow
reports its own number in its paper's table. This project's CelebA pipeline has no horizontal
flips.

Memory per device, from the TPU compiler (each dense block one scan over its units, `store`),
TPU v5e at 8 images per chip (the batch of 32 on 4 chips), float32: 10.61 GiB of the 15.75 the
compiler allows (arguments 1.73: params and Adamax's two moments, no EMA copy; temporaries
8.70; code 0.17); 3350 GFLOP and 203.8 GB per chip per step (every iteration of the scans
counted), roofline 248.8 ms a step. Command: `python -m eiw_flow_jax.aot
--config=configs/celeba_denseflow.py --topology=v5e:2x2 --noeval` (docs/tpu.md).

GPU memory per device, from XLA's GPU compiler (`store`), one node of 8 H100s at 4 images
each (the batch over 8 GPUs), float32: 6.08 GiB of the 59.33 JAX's allocator takes of an H100
(arguments 1.46: params and Adamax's two moments, no EMA copy; temporaries 4.61); 1670 GFLOP and
117.4 GB per GPU per step (every iteration of the scans counted), roofline 35.0 ms a step,
bound by memory traffic.
Command: `python -m eiw_flow_jax.aot
--config=configs/celeba_denseflow.py --topology=h100:8 --noeval` (docs/gpu.md).

Data: `celeba_denseflow`, what the authors' loader (denseflow/data/datasets/image/celeba.py)
does: the whole 178x218 aligned image resized to 64x64 with Pillow's bilinear filter (the
RealNVP crop it computes is unused; docs/datasets.md). `python -m eiw_flow_jax.prepare
--dataset=celeba --data_dir=DIR` prepares the TFDS `celeb_a` that all CelebA names read.
"""

from eiw_flow_jax.config import recipes


def get_config():
  return recipes.denseflow_df_74_10(
      "celeba_denseflow", (64, 64, 3), batch_size=32, epochs=50, num_train=162_770,
      # their README's --gamma 0.95 has no effect in their runs (docs/denseflow.md).
      decay_rate=1.0, iwbo_samples=200, iwbo_chunk=25,
  )
