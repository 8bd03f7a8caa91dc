"""CIFAR-10 32x32x3, 8-bit (TFDS `cifar10`), with Glow's CIFAR-10 hyperparameters.

Glow (Kingma & Dhariwal 2018; github.com/openai/glow README): L=3 levels, K=32 steps per level,
512 hidden channels, affine coupling, learned top prior, Adam with lr 1e-3 after a linear
warmup, n_bits 8, and 8 GPUs x 64 = 512 images per batch. The step count, warmup length, EMA
and clipping are this project's choices.

Published target (test bits/dim): Glow 3.35 (arXiv:1807.03039, Table 2). Also tabulated by
`eiw_flow_jax.table`: RealNVP 3.49, Flow++ 3.08, DenseFlow 2.98 (other architectures).
Reproducing Glow needs `--config.model.split=vanilla` (Glow has no Shuffle; this config
defaults to EIW-Flow, `split=eiw`, `eiw.mode=global`, which is compared with the same rows).
The backbone differs from openai/glow in three documented ways (top prior per position, no
ActNorm log-scale factor 3, no edge-bias padding): README.md, "Glow backbone vs openai/glow".

Data: `python -m eiw_flow_jax.prepare --dataset=cifar10 --data_dir=DIR` (needs the [prepare]
extra and internet once), then `--config.dataset.data_dir=DIR`.
Hardware: 8 accelerators with >= 16 GB each (Glow's 8 GPUs), 64 images per device.
Memory per device at 64 images: about 11.6 GiB: params, EMA and Adam state plus fixed buffers
0.73 GiB, plus 174 MiB per image (bench/config_memory.py: XLA's memory analysis of the
compiled train step on CPU, fitted over K and batch; XLA's GPU/TPU buffer assignment
differs by tens of percent, so leave headroom).
Wall time: not measured (no accelerator was available). Estimate: about 4 h on 8
devices at an assumed sustained 20 TFLOP/s each, from XLA's count of 23 GFLOP per
image per train step x batch x 200k steps; normalizing flows in fp32 often sustain
only 5-10 TFLOP/s, i.e. 8-16 h.
"""

from eiw_flow_jax.config_lib import base_config


def get_config():
  config = base_config()
  config.dataset.name = "cifar10"
  config.model.image_shape = (32, 32, 3)
  config.model.num_levels = 3
  config.model.steps_per_level = 32
  config.model.hidden_channels = 512
  config.model.coupling = "affine"
  config.model.n_bits = 8
  config.batch_size = 512
  config.eval_batch_size = 512
  config.num_train_steps = 200_000  # ~2000 epochs of 50k images
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 1000
  config.init_batch_size = 512
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 10_000
  return config
