"""ImageNet 32x32 with the paper's model: DenseFlow DF-74-10 with EIW transitions.

The authors' command: --epochs 20 --batch_size 64 --optimizer adamax --lr 1e-3 --gamma 0.95
--warmup 5000, DF-74-10 (then 2 epochs at lr 2e-5 with train_more.py; not reproduced here).
Target: DenseFlow reports 3.63 bits/dim (IWBO, k = 200, --kbs 50); EIW-Flow reports its own
number in its paper's table.

Memory per device, from the TPU compiler (each dense block one scan over its units, `store`),
TPU v5e at 16 images per chip (the batch of 64 on 4 chips), float32: 7.39 GiB of the 15.75 the
compiler allows (arguments 1.73: params and Adamax's two moments, no EMA copy; temporaries
5.51; code 0.15): the CIFAR-10 config's program (same shapes); 1618 GFLOP and 122.5 GB per
chip per step (every iteration of the scans counted), roofline 149.6 ms a step. Command:
`python -m eiw_flow_jax.aot --config=configs/imagenet32_denseflow.py --topology=v5e:2x2
--noeval` (docs/tpu.md).

GPU memory per device, from XLA's GPU compiler (`store`), one node of 8 H100s at 8 images
each (the batch over 8 GPUs), float32: 4.32 GiB of the 59.33 JAX's allocator takes of an H100
(arguments 1.46: params and Adamax's two moments, no EMA copy; temporaries 2.85); 807 GFLOP and
82.5 GB per GPU per step (every iteration of the scans counted), roofline 24.6 ms a step, bound
by memory traffic.
Command: `python -m eiw_flow_jax.aot
--config=configs/imagenet32_denseflow.py --topology=h100:8 --noeval` (docs/gpu.md).

Data: Chrabaszcz et al.'s box-resized ImageNet (`imagenet32_resized`), the version both
authors' loaders read (Imagenet32_train.zip; docs/datasets.md), not van den Oord's of the Glow
configs: `python -m eiw_flow_jax.prepare --dataset=imagenet32_resized --data_dir=DIR
--source_dir=SRC` with Imagenet32_train.zip and Imagenet32_val.zip in SRC.
"""

from eiw_flow_jax.config import recipes


def get_config():
  return recipes.denseflow_df_74_10(
      "imagenet32_resized", (32, 32, 3), batch_size=64, epochs=20, num_train=1_281_167,
      # their README's --gamma 0.95 has no effect in their runs (docs/denseflow.md).
      decay_rate=1.0, iwbo_samples=200, iwbo_chunk=50,
  )
