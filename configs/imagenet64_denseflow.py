"""ImageNet 64x64 with the paper's model: DenseFlow DF-74-10 with EIW transitions.

The authors' command: --epochs 10 --batch_size 32 --optimizer adamax --lr 1e-3 --gamma 0.95
--warmup 5000, DF-74-10 (then 1 epoch at lr 2e-5 with train_more.py; not reproduced here).
Target: DenseFlow reports 3.35 bits/dim (IWBO, k = 200, --kbs 25); EIW-Flow reports its own
number in its paper's table.
GPU memory per device, from XLA's GPU compiler, one node of 8 H100s at 4 images each (the
batch over 8 GPUs), float32: 6.19 GiB of the 59.33 JAX's allocator takes of an H100 (arguments
1.95: params, EMA and Adamax's two moments; temporaries 4.24); >= 394 GFLOP per GPU per step,
roofline >= 8.7 ms a step (lower bounds: each unit's scanned layers are counted once).
Command: `python -m eiw_flow_jax.aot
--config=configs/imagenet64_denseflow.py --topology=h100:8 --noeval` (docs/gpu.md).
"""

from eiw_flow_jax.config import recipes


def get_config():
  return recipes.denseflow_df_74_10(
      "imagenet64", (64, 64, 3), batch_size=32, epochs=10, num_train=1_281_167,
      decay_rate=0.95, iwbo_samples=200, iwbo_chunk=25,
  )
