"""The config schema: every field with its default, and the values each field allows.

Every file in `configs/` builds on `base_config()` and overrides what its dataset needs, so all
configs have the same fields; the checks run before any compute (`training.validation`).
The allowed values below are the one definition each; the modules that interpret a field import
its tuple from here.
"""

from __future__ import annotations

import ml_collections

SPLITS = ("vanilla", "eiw")
EIW_MODES = ("global", "per_example")
COUPLINGS = ("affine", "additive")
REGULARIZERS = ("kl", "literal")
MEMORY_MODES = ("store", "remat", "invert", "remat_wide")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KERNELS = ("auto", "portable")  # how convolutions are computed: eiw_flow_jax.model.kernels
BACKBONES = ("glow", "denseflow")
OPTIMIZERS = ("adam", "adamax")
DENSEFLOW_MEMORY = ("store", "remat")


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every dataset config (the published method: EIW, `global`)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "digits"  # see eiw_flow_jax.data for the registered names
  config.dataset.data_dir = ""  # TFDS data dir; "" means TFDS's default (~/tensorflow_datasets)
  config.dataset.source_dir = ""  # raw files for offline builders (e.g. MNIST idx files)
  config.dataset.train_split = "train"
  config.dataset.eval_split = "test"
  # grain worker processes for the training input pipeline (0: in this process). A checkpoint's
  # iterator state must be restored with the worker_count it was saved with.
  config.dataset.worker_count = 0

  config.model = ml_collections.ConfigDict()
  config.model.backbone = "glow"  # "glow" or "denseflow" (the paper's model)
  config.model.image_shape = (8, 8, 1)  # (H, W, C)
  config.model.num_levels = 2
  config.model.steps_per_level = 4
  config.model.hidden_channels = 64
  config.model.coupling = "affine"
  config.model.n_bits = 8
  # Activation memory of the backward pass: "store" (keep everything), "remat" (jax.checkpoint
  # per flow step), "invert" (rebuild each step's input through its exact inverse: memory
  # independent of steps_per_level) or "remat_wide" (recompute a step but keep its coupling
  # network's wide activation and output: the TPU's fastest, docs/tpu.md). See
  # eiw_flow_jax/model/memory.py and docs/performance.md.
  config.model.memory = "store"
  # "invert" falls back to an exact recomputation (and warns) when inputs rebuilt through the
  # inverse drift by more than this (relative max error at a level's input).
  config.model.invert_tolerance = 1e-3
  # Run each Glow level's K flow steps (each DenseFlow unit's coupling layers) as one lax.scan
  # over their stacked parameters (True: compile time independent of K) or unrolled (False: K
  # copies in the program). Same parameter layout either way (backbones/glow.py, denseflow.py;
  # docs/benchmarks.md).
  config.model.scan_steps = True
  # Compute dtype of the coupling networks: "auto" computes in the inputs' dtype (float32, or
  # float64 under jax_enable_x64), as Flax's dtype=None; "bfloat16" (TPU, GPU), "float16" (GPU)
  # or "float32" cast to it, while parameters, log-determinants, priors and the loss stay in the
  # inputs' dtype.
  config.model.dtype = "auto"
  # How convolutions are computed (eiw_flow_jax/model/kernels): "auto" takes the XLA:CPU forms
  # (matmuls) in programs compiled for the CPU and convolutions elsewhere; "portable" takes the
  # convolutions everywhere (to run on CPU what a TPU or GPU program computes).
  config.model.kernels = "auto"
  config.model.split = "eiw"
  config.model.eiw = ml_collections.ConfigDict()
  config.model.eiw.mode = "global"
  config.model.eiw.sigma = 1e-3  # weight of the KL regulariser (`global`)
  config.model.eiw.reduction = 16  # SE Solver reduction ratio r (`global`)
  config.model.eiw.regularizer = "kl"  # "kl" (proper KL) or "literal" (the authors' form)
  # Ablation: pi fixed at the identity; theta, Solver and regulariser still train (`global`).
  config.model.eiw.freeze_permutation = False
  config.model.eiw.beta = 2.0  # bound on |log w| (`per_example`)
  config.model.eiw.anchor_width = 0  # A; 0 means max(1, C // 4) at each level (`per_example`)
  config.model.eiw.volume_preserving = False  # centre log w per example (`per_example`)
  config.model.eiw.entropy_weight = 0.0  # lambda of the optional entropy term (`per_example`)
  config.model.eiw.solver_hidden = 32  # conv width of the anchor Solver (`per_example`)
  # Ablations (`per_example`): False gives log w = 0 / the identity permutation respectively.
  config.model.eiw.use_weights = True
  config.model.eiw.use_permutation = True
  # The DenseFlow backbone (used when model.backbone == "denseflow"); the authors' argument
  # names. Defaults: DF-74-10. num_levels, steps_per_level, hidden_channels and coupling are
  # Glow's and ignored by it; split ("eiw" | "vanilla"), eiw.mode ("global" only),
  # eiw.reduction, eiw.regularizer and eiw.sigma apply to it.
  config.model.denseflow = ml_collections.ConfigDict()
  config.model.denseflow.block_conf = (6, 4, 1)  # units per dense block (one block per scale)
  config.model.denseflow.layers_conf = (5, 6, 20)  # coupling layers per unit, per block
  config.model.denseflow.layer_mid_chnls = (48, 48, 48)  # coupling-net width, per block
  config.model.denseflow.growth_rate = 10  # noise channels appended per unit
  config.model.denseflow.coupling_depth = 7  # dense layers in a coupling net (authors: 7)
  config.model.denseflow.coupling_growth = 64  # their growth (authors: 64)
  # Landmarks of the coupling nets' Nystrom attention (authors: 4, hard-coded); every dense
  # block's H*W must be a multiple of it (e.g. 7 for 28x28 MNIST with two blocks: 14x14, 7x7).
  config.model.denseflow.attention_landmarks = 4
  config.model.denseflow.dequant_steps = 4  # variational dequantization flow (Flow++ style)
  config.model.denseflow.dequant_context_channels = 64
  config.model.denseflow.dequant_mid_channels = 64
  config.model.denseflow.dequant_depth = 4
  config.model.denseflow.dequant_growth = 64
  config.model.denseflow.dequant_context_depth = 4  # the context network's dense blocks
  config.model.denseflow.dequant_context_growth = 16

  config.batch_size = 64  # global batch, split over all devices of all processes
  config.eval_batch_size = 256
  config.num_train_steps = 1000

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"  # "adam" or "adamax" (DenseFlow's)
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.cosine_decay = False
  config.optimizer.end_learning_rate_factor = 0.0  # final lr / peak lr with cosine decay
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.grad_clip_norm = 50.0  # 0 disables clipping
  config.optimizer.decay_rate = 1.0  # lr *= decay_rate ** epoch (DenseFlow's gamma); 1: off
  config.optimizer.steps_per_epoch = 0  # the epoch length for decay_rate (>= 1 when < 1)

  config.eval = ml_collections.ConfigDict()
  config.eval.iwbo_samples = 0  # k of the importance-weighted bound (denseflow); 0: ELBO only
  config.eval.iwbo_chunk = 50  # samples per pass (memory: eval_batch_size * iwbo_chunk images)

  config.ema_decay = 0.999  # 0 disables EMA (eval uses the raw parameters)
  config.max_consecutive_nonfinite = 10
  config.init_batch_size = 256  # examples for data-dependent ActNorm initialisation
  config.prefetch_batches = 2  # batches put on the devices ahead of the step (0: none)

  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 3
  config.eval_every_steps = 0  # 0: evaluate only at the end of training

  config.sample = ml_collections.ConfigDict()
  config.sample.temperatures = (0.5, 0.7, 0.8, 1.0)
  config.sample.num_samples = 64
  config.sample.display_max = 0  # pixel value shown as white in grids; 0: 2**n_bits - 1

  config.distributed = False  # call jax.distributed.initialize() (multi-host)

  # XLA's effort on the train and eval steps (JAX's options of the same names, passed to their
  # jit as compiler options), each in [-1, 1], 0 XLA's default. A negative
  # exec_time_optimization_effort compiles faster, and in less host memory, a program that may
  # run slower (on TPU -1 halves DenseFlow DF-74-10's compile: docs/tpu.md); memory_fitting_effort
  # trades compile time for fitting the program in less device memory.
  config.compiler = ml_collections.ConfigDict()
  config.compiler.exec_time_optimization_effort = 0.0
  config.compiler.memory_fitting_effort = 0.0
  # Locked: setting a field that does not exist (`config.model.memroy = ...`, a typo) raises
  # instead of being ignored. Values of existing fields can still be changed.
  config.lock()
  return config
