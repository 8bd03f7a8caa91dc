"""ImageNet 64x64x3, 8-bit: van den Oord et al.'s downsampled ImageNet (TFDS
`downsampled_imagenet/64x64`), with Glow's architecture.

Glow (github.com/openai/glow README, "ImageNet 64x64 quantitative result"): L=4, K=48, 512
hidden channels, affine coupling, lr 1e-3, n_bits 8. The batch of 256 (half of Glow's 512 at
32x32, for memory at 4x the pixels), the step count, warmup, EMA and clipping are this
project's choices. Evaluated on "validation". `dataset.name="imagenet64_resized"` reads TFDS
`imagenet_resized/64x64` instead: NOT comparable with published numbers.

Published target (test bits/dim): Glow 3.81 (arXiv:1807.03039, Table 2). Also tabulated:
RealNVP 3.98, Flow++ 3.69, DenseFlow 3.35.
Reproducing Glow needs `--config.model.split=vanilla` (Glow has no Shuffle; this config
defaults to EIW-Flow, `split=eiw`, `eiw.mode=global`, which is compared with the same rows).
The backbone differs from openai/glow in three documented ways (top prior per position, no
ActNorm log-scale factor 3, no edge-bias padding): README.md, "Glow backbone vs openai/glow".

Data: `python -m eiw_flow_jax.prepare --dataset=imagenet64 --data_dir=DIR --source_dir=SRC` with
train_64x64.tar and valid_64x64.tar in SRC.
Hardware: 8 accelerators with >= 40 GB each, 32 images per device.
Memory per device at 32 images: about 29.9 GiB: params, EMA and Adam state plus fixed buffers
1.85 GiB, plus 898 MiB per image (bench/config_memory.py: XLA's memory analysis of the
compiled train step on CPU, fitted over K and batch; XLA's GPU/TPU buffer assignment
differs by tens of percent, so leave headroom).
Wall time: not measured (no accelerator was available). Estimate: about 26 h on 8
devices at an assumed sustained 20 TFLOP/s each, from XLA's count of 146 GFLOP per
image per train step x batch x 400k steps; normalizing flows in fp32 often sustain
only 5-10 TFLOP/s, i.e. 52-104 h.
"""

from eiw_flow_jax.config_lib import base_config


def get_config():
  config = base_config()
  config.dataset.name = "imagenet64"
  config.dataset.eval_split = ""  # the dataset's usual eval split: "validation"
  config.model.image_shape = (64, 64, 3)
  config.model.num_levels = 4
  config.model.steps_per_level = 48
  config.model.hidden_channels = 512
  config.model.n_bits = 8
  config.batch_size = 256
  config.eval_batch_size = 256
  config.num_train_steps = 400_000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 2000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 20_000
  return config
