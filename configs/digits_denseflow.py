"""A small DenseFlow (the paper's backbone) on scikit-learn's 8x8 digits, for CPU experiments.

Same data and bits as configs/digits.py (batch 64, Adam 1e-3, EMA 0.999) but 800 steps, with
`model.backbone = "denseflow"` shrunk to a 2-core CPU budget: two dense blocks (4x4x4 ->
transition -> 2x2), 2 units of 2 coupling layers each, coupling nets 32 wide (depth 3, growth
16), growth_rate 4, a 2-step dequantizer. Test bpd is reported as the ELBO and as the IWBO with
k = 20 (`eval.iwbo_samples`). `model.split` picks EIW (the authors' `global` transition, default)
or `vanilla`. About 4 minutes per run on 2 CPU cores (1.5 of them compiling; docs/results.md).
"""

from eiw_flow_jax.config.schema import base_config


def get_config():
  config = base_config()
  config.dataset.name = "digits"
  config.model.backbone = "denseflow"
  config.model.image_shape = (8, 8, 1)
  config.model.n_bits = 5
  config.model.denseflow.update(dict(
      block_conf=(2, 2),
      layers_conf=(2, 2),
      layer_mid_chnls=(32, 32),
      growth_rate=4,
      coupling_depth=3,
      coupling_growth=16,
      dequant_steps=2,
      dequant_context_channels=16,
      dequant_mid_channels=16,
      dequant_depth=2,
      dequant_growth=16,
      dequant_context_depth=2,
      dequant_context_growth=8,
  ))
  config.batch_size = 64
  config.num_train_steps = 800
  config.optimizer.warmup_steps = 100
  config.eval_batch_size = 128
  config.eval.iwbo_samples = 20
  config.eval.iwbo_chunk = 10
  config.log_every_steps = 50
  config.checkpoint_every_steps = 250
  config.sample.display_max = 16  # the largest stored value, shown as white
  return config
