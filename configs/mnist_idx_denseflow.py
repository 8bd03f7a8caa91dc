"""A small DenseFlow (the paper's backbone) on MNIST read offline from idx files, for CPU runs.

Data as configs/mnist_idx.py (the idx files in `--config.dataset.source_dir=DIR`; the 10k test
files split 9000 train / 1000 test, or the real 60k/10k split when the train files are there),
8-bit pixels. The model is shrunk to a 2-core CPU budget: two dense blocks (14x14x4 ->
transition -> 7x7x8, so the Nystrom attention uses 7 landmarks, `attention_landmarks`, instead
of the authors' 4, which need H*W divisible by 4), 2 + 1 units of 2 coupling layers, coupling
nets 16 wide (depth 2, growth 8), growth_rate 2, a 2-step dequantizer. The budget of the
Glow MNIST runs in docs/results.md: batch 32, 600 steps (~2 epochs), Adam 1e-3 with 100
warmup steps, EMA 0.999. Test bpd: the ELBO and the IWBO with k = 10. About 5 minutes per run
on 2 loaded CPU cores, most of it compiling. `model.split` picks EIW (the authors' `global`
transition, default) or `vanilla`. These models are far from converged; see docs/results.md.
"""

from eiw_flow_jax.config.schema import base_config


def get_config():
  config = base_config()
  config.dataset.name = "mnist_idx"
  config.model.backbone = "denseflow"
  config.model.image_shape = (28, 28, 1)
  config.model.n_bits = 8
  config.model.denseflow.update(dict(
      block_conf=(2, 1),
      layers_conf=(2, 2),
      layer_mid_chnls=(16, 16),
      growth_rate=2,
      coupling_depth=2,
      coupling_growth=8,
      attention_landmarks=7,
      dequant_steps=2,
      dequant_context_channels=8,
      dequant_mid_channels=8,
      dequant_depth=1,
      dequant_growth=8,
      dequant_context_depth=1,
      dequant_context_growth=8,
  ))
  config.batch_size = 32
  config.init_batch_size = 64
  config.num_train_steps = 600
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.eval_batch_size = 100
  config.eval.iwbo_samples = 10
  config.eval.iwbo_chunk = 10
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  config.eval_every_steps = 0
  config.sample.num_samples = 16
  return config
