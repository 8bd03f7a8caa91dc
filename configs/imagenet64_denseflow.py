"""ImageNet 64x64 with the paper's model: DenseFlow DF-74-10 with EIW transitions.

The authors' command: --epochs 10 --batch_size 32 --optimizer adamax --lr 1e-3 --gamma 0.95
--warmup 5000, DF-74-10 (then 1 epoch at lr 2e-5 with train_more.py; not reproduced here).
Target: DenseFlow reports 3.35 bits/dim (IWBO, k = 200, --kbs 25); EIW-Flow reports its own
number in its paper's table.

Memory per device, from the TPU compiler (each dense block one scan over its units, `store`),
TPU v5e at 8 images per chip (the batch of 32 on 4 chips), float32: 10.61 GiB of the 15.75 the
compiler allows (arguments 1.73: params and Adamax's two moments, no EMA copy; temporaries
8.70; code 0.17); 3350 GFLOP and 203.8 GB per chip per step (every iteration of the scans
counted), roofline 248.8 ms a step. Command: `python -m eiw_flow_jax.aot
--config=configs/imagenet64_denseflow.py --topology=v5e:2x2 --noeval` (docs/tpu.md).

GPU memory per device, from XLA's GPU compiler (`store`), one node of 8 H100s at 4 images
each (the batch over 8 GPUs), float32: 6.08 GiB of the 59.33 JAX's allocator takes of an H100
(arguments 1.46: params and Adamax's two moments, no EMA copy; temporaries 4.61); 1670 GFLOP and
117.4 GB per GPU per step (every iteration of the scans counted), roofline 35.0 ms a step,
bound by memory traffic.
Command: `python -m eiw_flow_jax.aot
--config=configs/imagenet64_denseflow.py --topology=h100:8 --noeval` (docs/gpu.md).

Data: Chrabaszcz et al.'s box-resized ImageNet (`imagenet64_resized`), the version both
authors' loaders read (Imagenet64_train_part1.zip, ...; docs/datasets.md), not van den Oord's of
the Glow configs: `python -m eiw_flow_jax.prepare --dataset=imagenet64_resized --data_dir=DIR
--source_dir=SRC` with Imagenet64_train_part1.zip, _part2.zip and Imagenet64_val.zip in SRC.
"""

from eiw_flow_jax.config import recipes


def get_config():
  return recipes.denseflow_df_74_10(
      "imagenet64_resized", (64, 64, 3), batch_size=32, epochs=10, num_train=1_281_167,
      # their README's --gamma 0.95 has no effect in their runs (docs/denseflow.md).
      decay_rate=1.0, iwbo_samples=200, iwbo_chunk=25,
  )
