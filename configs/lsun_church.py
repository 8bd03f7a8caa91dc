"""LSUN church outdoor at 64x64x3, 8-bit (TFDS `lsun/church_outdoor`), Glow's LSUN 64x64 setup.

Glow (github.com/openai/glow README, "LSUN 64x64 quantitative result"): L=3, K=48, 512 hidden
channels, affine coupling, lr 1e-3, n_bits 8. Glow (like RealNVP) trained on random 64x64 crops
of 96x96 images, while the data layer here takes the largest centre square resized to 64x64, so
numbers are close to but not exactly comparable. Batch 256, step count, warmup, EMA and clipping
are this project's choices. Evaluated on "validation" (LSUN has no public test split).

Published target (bits/dim): Glow 2.67 (arXiv:1807.03039, Table 2); RealNVP 3.08
(arXiv:1605.08803, Table 1).
Reproducing Glow needs `--config.model.split=vanilla` (Glow has no Shuffle; this config
defaults to EIW-Flow, `split=eiw`, `eiw.mode=global`, which is compared with the same rows).
The backbone differs from openai/glow in three documented ways (top prior per position, no
ActNorm log-scale factor 3, no edge-bias padding): README.md, "Glow backbone vs openai/glow".

Data: only from the LSUN lmdb export (TFDS's LSUN builder needs tensorflow-io, which does not
load next to current TensorFlow): unzip church_outdoor_train_lmdb.zip and
church_outdoor_val_lmdb.zip into SRC, then
`python -m eiw_flow_jax.prepare --dataset=lsun_church --data_dir=DIR --source_dir=SRC`.
Hardware: 8 accelerators with >= 40 GB each, 32 images per device.
Memory per device at 32 images: about 27.8 GiB: params, EMA and Adam state plus fixed buffers
1.04 GiB, plus 856 MiB per image (bench/config_memory.py: XLA's memory analysis of the
compiled train step on CPU, fitted over K and batch; XLA's GPU/TPU buffer assignment
differs by tens of percent, so leave headroom).
Wall time: not measured (no accelerator was available). Estimate: about 19 h on 8
devices at an assumed sustained 20 TFLOP/s each, from XLA's count of 143 GFLOP per
image per train step x batch x 300k steps; normalizing flows in fp32 often sustain
only 5-10 TFLOP/s, i.e. 38-76 h.
"""

from eiw_flow_jax.config_lib import base_config


def get_config():
  config = base_config()
  config.dataset.name = "lsun_church"
  config.dataset.eval_split = ""  # the dataset's usual eval split: "validation"
  config.model.image_shape = (64, 64, 3)
  config.model.num_levels = 3
  config.model.steps_per_level = 48
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
