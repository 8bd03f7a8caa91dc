"""ImageNet 32x32x3, 8-bit: van den Oord et al.'s downsampled ImageNet (TFDS
`downsampled_imagenet/32x32`), the data of the density papers, with Glow's hyperparameters.

Glow (github.com/openai/glow README, "ImageNet 32x32 quantitative result"): L=3, K=48, 512
hidden channels, affine coupling, lr 1e-3, n_bits 8, 8 GPUs x 64 = 512 images per batch.
Evaluated on the "validation" split (the usual test set for density estimation). Step count,
warmup, EMA and clipping are this project's choices. `dataset.name="imagenet32_resized"` reads
TFDS `imagenet_resized/32x32` instead, a different downsampling: NOT comparable.

Published target (test bits/dim): Glow 4.09 (arXiv:1807.03039, Table 2). Also tabulated:
RealNVP 4.28, Flow++ 3.86, DenseFlow 3.63.
Reproducing Glow needs `--config.model.split=vanilla` (Glow has no Shuffle; this config
defaults to EIW-Flow, `split=eiw`, `eiw.mode=global`, which is compared with the same rows).
The backbone differs from openai/glow in three documented ways (top prior per position, no
ActNorm log-scale factor 3, no edge-bias padding): README.md, "Glow backbone vs openai/glow".

Data: `python -m eiw_flow_jax.prepare --dataset=imagenet32 --data_dir=DIR --source_dir=SRC` with
train_32x32.tar and valid_32x32.tar in SRC (no TensorFlow needed for this one).
Hardware: 8 accelerators with >= 24 GB each, 64 images per device.
Memory per device at 64 images: about 17.5 GiB: params, EMA and Adam state plus fixed buffers
1.10 GiB, plus 262 MiB per image (bench/config_memory.py: XLA's memory analysis of the
compiled train step on CPU, fitted over K and batch; XLA's GPU/TPU buffer assignment
differs by tens of percent, so leave headroom).
Wall time: not measured (no accelerator was available). Estimate: about 12 h on 8
devices at an assumed sustained 20 TFLOP/s each, from XLA's count of 35 GFLOP per
image per train step x batch x 400k steps; normalizing flows in fp32 often sustain
only 5-10 TFLOP/s, i.e. 24-48 h.
"""

from eiw_flow_jax.config_lib import base_config


def get_config():
  config = base_config()
  config.dataset.name = "imagenet32"
  config.dataset.eval_split = ""  # the dataset's usual eval split: "validation"
  config.model.image_shape = (32, 32, 3)
  config.model.num_levels = 3
  config.model.steps_per_level = 48
  config.model.hidden_channels = 512
  config.model.n_bits = 8
  config.batch_size = 512
  config.eval_batch_size = 512
  config.num_train_steps = 400_000  # ~160 epochs of 1.28M images
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 2000
  config.init_batch_size = 512
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 20_000
  return config
