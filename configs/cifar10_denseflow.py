"""CIFAR-10 32x32x3 with the paper's model: DenseFlow DF-74-10 with EIW transitions.

The authors' command (DenseFlow README, EIW-Flow's DIW-Flow/): --epochs 400 --batch_size 64
--optimizer adamax --lr 1e-3 --gamma 0.9975 --warmup 5000 --block_conf 6 4 1 --layers_conf 5 6
20 --layer_mid_chnls 48 48 48 --growth_rate 10 (DenseFlow then fine-tunes 20 more epochs at
lr 2e-5 with train_more.py; not reproduced here). 130,922,462 parameters.
Target: DenseFlow reports 2.98 bits/dim on the test set (IWBO, k = 1000); EIW-Flow reports its
own number in its paper's table. Evaluation here: the ELBO and the IWBO with k = 1000
(`eval.iwbo_samples`), 50 samples per pass as their --kbs 50.
At batch 64 the model needs gradient checkpointing on most GPUs (their --checkpointing):
`--config.model.memory=remat` where the config has that field.
Memory per device, from the TPU compiler (each dense block one scan over its units, `store`),
TPU v5e at 16 images per chip (the batch of 64 on 4 chips), float32: 7.39 GiB of the 15.75 the
compiler allows (arguments 1.73: params and Adamax's two moments of 130.9M parameters, no EMA
copy; temporaries 5.51; code 0.15); 1618 GFLOP and 122.5 GB per chip per step (every iteration
of the scans counted), roofline 149.6 ms a step, bound by HBM traffic. Command: `python -m
eiw_flow_jax.aot --config=configs/cifar10_denseflow.py --topology=v5e:2x2 --per_device_batch=16
--noeval` (docs/tpu.md, with its compile times).
GPU memory per device, from XLA's GPU compiler (`store`), one node of 8 H100s at 8 images
each (the batch over 8 GPUs), float32: 4.32 GiB of the 59.33 JAX's allocator takes of an H100
(arguments 1.46: params and Adamax's two moments, no EMA copy; temporaries 2.85); 807 GFLOP and
82.5 GB per GPU per step (every iteration of the scans counted), roofline 24.6 ms a step, bound
by memory traffic. On one H100 at the whole batch of 64 (`--topology=h100:1`): 16.47 GiB
(temporaries 15.01), without `memory=remat`, so within JAX's share of an A100 40GB (29.57 GiB)
and, barely, of an L4 (16.87). Command: `python -m eiw_flow_jax.aot
--config=configs/cifar10_denseflow.py --topology=h100:8 --noeval` (docs/gpu.md).
"""

from eiw_flow_jax.config import recipes


def get_config():
  return recipes.denseflow_df_74_10(
      "cifar10", (32, 32, 3), batch_size=64, epochs=400, num_train=50_000,
      # their README's --gamma 0.9975 has no effect in their runs (docs/denseflow.md).
      decay_rate=1.0, iwbo_samples=1000, iwbo_chunk=50,
  )
