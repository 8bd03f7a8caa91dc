"""CelebA 64x64x3, 8-bit: the RealNVP / DenseFlow variant (TFDS `celeb_a`, 148x148 centre crop
resized to 64x64). Not CelebA-HQ: Glow's CelebA result is CelebA-HQ 256x256 at 5 bits (1.03),
a different dataset that this project does not register, so Glow has no comparable number here.

Architecture after Glow: K=32 steps per level and 512 hidden channels as in Glow's CelebA-HQ
model, with L=4 levels for 64x64 (Glow used L=6 at 256x256). n_bits 8 as RealNVP and DenseFlow;
`--config.model.n_bits=5` gives a 5-bit CelebA 64x64 (the 8-bit pixels shifted right by 3), for
which no published number is tabulated. Batch 256, lr 1e-3 with warmup; step count, EMA and
clipping are this project's choices.

Published target (test bits/dim, 64x64 8-bit CelebA): RealNVP 3.02 (arXiv:1605.08803, Table 1);
DenseFlow 1.99 (arXiv:2106.04627), a much larger model. Run with `--config.model.split=vanilla`
for the Glow-architecture baseline, as is for EIW-Flow. The backbone's three deviations from
openai/glow are in README.md, "Glow backbone vs openai/glow".

Data: `python -m eiw_flow_jax.prepare --dataset=celeba --data_dir=DIR`.
Hardware: 8 accelerators with >= 40 GB each, 32 images per device.
Memory per device at 32 images: about 19.9 GiB: params, EMA and Adam state plus fixed buffers
1.24 GiB, plus 598 MiB per image (bench/config_memory.py: XLA's memory analysis of the
compiled train step on CPU, fitted over K and batch; XLA's GPU/TPU buffer assignment
differs by tens of percent, so leave headroom).
Wall time: not measured (no accelerator was available). Estimate: about 13 h on 8
devices at an assumed sustained 20 TFLOP/s each, from XLA's count of 97 GFLOP per
image per train step x batch x 300k steps; normalizing flows in fp32 often sustain
only 5-10 TFLOP/s, i.e. 26-52 h.
"""

from eiw_flow_jax.config_lib import base_config


def get_config():
  config = base_config()
  config.dataset.name = "celeba"
  config.model.image_shape = (64, 64, 3)
  config.model.num_levels = 4
  config.model.steps_per_level = 32
  config.model.hidden_channels = 512
  config.model.n_bits = 8
  config.batch_size = 256
  config.eval_batch_size = 256
  config.num_train_steps = 300_000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 2000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 20_000
  return config
