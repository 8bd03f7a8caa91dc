"""Shared configuration skeleton and validation.

Every file in `configs/` builds on `base_config()` and overrides what its dataset needs, so all
configs have the same fields and the same checks (`validate_config`) run before any compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import ml_collections

if TYPE_CHECKING:
  from eiw_flow_jax import data

SPLITS = ("vanilla", "eiw")
EIW_MODES = ("global", "per_example")
COUPLINGS = ("affine", "additive")
REGULARIZERS = ("kl", "literal")
MEMORY_MODES = ("store", "remat", "invert")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KERNELS = ("auto", "portable")  # eiw_flow_jax.kernels.KERNELS (not imported: it loads JAX)
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
  # per flow step) or "invert" (rebuild each step's input through its exact inverse: memory
  # independent of steps_per_level). See eiw_flow_jax/memory.py and docs/performance.md.
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
  # How convolutions are computed (eiw_flow_jax/kernels): "auto" takes the XLA:CPU forms
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
  # Locked: setting a field that does not exist (`config.model.memroy = ...`, a typo) raises
  # instead of being ignored. Values of existing fields can still be changed.
  config.lock()
  return config


def denseflow_df_74_10(dataset: str, image_shape: tuple[int, int, int], *, batch_size: int,
                       epochs: int, num_train: int, decay_rate: float, iwbo_samples: int,
                       iwbo_chunk: int) -> ml_collections.ConfigDict:
  """base_config() for `dataset` with DF-74-10, EIW transitions and DenseFlow's training recipe.

  The model: block_conf 6 4 1, layers_conf 5 6 20, layer_mid_chnls 48 48 48, growth_rate 10
  (the defaults of base_config), EIW global transitions with the authors' literal regulariser
  and sigma 1e-3. Training (DenseFlow's README): Adamax (b1 0.9, b2 0.99), lr 1e-3, 5000
  warmup steps, lr *= decay_rate after every epoch of int(num_train / batch_size) + 1 steps,
  no clipping, no EMA; ActNorm initialised on one training batch. Note: the optimiser file of
  both repositories (`optim/expdecay.py`) actually builds a OneCycleLR (max_lr 3e-3) and
  ignores --warmup/--gamma; the README's recipe is the one followed here.
  """
  config = base_config()
  config.dataset.name = dataset
  config.model.image_shape = image_shape
  config.model.backbone = "denseflow"
  config.model.split = "eiw"
  config.model.eiw.mode = "global"
  config.model.eiw.regularizer = "literal"
  config.model.eiw.sigma = 1e-3
  config.model.eiw.reduction = 16
  config.model.n_bits = 8
  steps_per_epoch = int(num_train / batch_size) + 1
  config.batch_size = batch_size
  config.init_batch_size = batch_size
  config.num_train_steps = epochs * steps_per_epoch
  config.optimizer.name = "adamax"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 5000
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.99
  config.optimizer.grad_clip_norm = 0.0
  config.optimizer.decay_rate = decay_rate
  config.optimizer.steps_per_epoch = steps_per_epoch
  config.ema_decay = 0.0
  config.eval_batch_size = 16
  config.eval.iwbo_samples = iwbo_samples
  config.eval.iwbo_chunk = iwbo_chunk
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 0
  config.sample.num_samples = 64
  return config


def glow_recipe(dataset: str, *, image_shape: tuple[int, int, int], num_levels: int,
                steps_per_level: int, batch_size: int, num_train_steps: int,
                warmup_steps: int = 2000, eval_every_steps: int = 20_000,
                hidden_channels: int = 512, eval_batch_size: int | None = None,
                checkpoint_every_steps: int = 2000) -> ml_collections.ConfigDict:
  """base_config() for `dataset` with the Glow backbone and Glow's training recipe.

  Glow (Kingma & Dhariwal 2018; github.com/openai/glow README): affine coupling, learned top
  prior, Adam with lr 1e-3 after a linear warmup, n_bits 8; the eval batch is the train batch
  unless given; logs every 100 steps. A dataset's config states its L, K, batch and schedule;
  the step count, warmup length, EMA and clipping are this project's choices. The split stays
  EIW-Flow's (`split=eiw`, `eiw.mode=global`); `--config.model.split=vanilla` is Glow itself
  (Glow has no Shuffle), compared with the same published rows. The backbone differs from
  openai/glow in three documented ways (top prior per position, no ActNorm log-scale factor 3,
  no edge-bias padding): README.md, "Glow backbone vs openai/glow".

  Memory figures in the configs' docstrings are the TPU compiler's (`python -m eiw_flow_jax.aot`,
  TPU v5e, docs/tpu.md) where a config names that command; GPU buffer assignment differs, so
  leave headroom there. Roofline step times are lower bounds (no all-reduce, kernels at peak);
  wall times stated as "at an assumed 20 TFLOP/s" are estimates from XLA's FLOP count; flows in
  fp32 often sustain only 5-10 TFLOP/s (2-4x longer).
  """
  config = base_config()
  config.dataset.name = dataset
  config.model.image_shape = image_shape
  config.model.num_levels = num_levels
  config.model.steps_per_level = steps_per_level
  config.model.hidden_channels = hidden_channels
  config.model.coupling = "affine"
  config.model.n_bits = 8
  config.batch_size = batch_size
  config.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
  config.num_train_steps = num_train_steps
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = warmup_steps
  config.log_every_steps = 100
  config.checkpoint_every_steps = checkpoint_every_steps
  config.eval_every_steps = eval_every_steps
  return config


# The Glow-style model both MNIST configs train (this project's choice: Glow reported no MNIST).
MNIST_GLOW_MODEL = {
    "image_shape": (28, 28, 1), "num_levels": 2, "steps_per_level": 16, "hidden_channels": 256,
}


def hardware_variant(config: ml_collections.ConfigDict, hardware: str | None,
                     variants: Mapping[str, Mapping[str, Any]]) -> ml_collections.ConfigDict:
  """`config` for `--config=configs/<name>.py:<hardware>`, as Flax's examples keep per-hardware
  configs: ml_collections' config_flags passes the text after ':' to `get_config(hardware)`.

  `variants[hardware]` maps dotted field names to values set on `config`; no hardware (the plain
  path) leaves the config as the file states it. An unknown name is a ConfigError naming the
  known ones.
  """
  if not hardware:
    return config
  if hardware not in variants:
    known = ", ".join(sorted(variants)) or "none"
    raise ConfigError(
        f"Unknown hardware variant {hardware!r} for the {config.dataset.name} config; "
        f"expected one of: {known} (or no ':<variant>' for the default)."
    )
  for dotted, value in variants[hardware].items():
    *parents, leaf = dotted.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config



# Glow's LSUN setup (configs/lsun_*.py); 16 images on a 16 GiB v5e chip fit as stored (7.27 GiB).
LSUN_HARDWARE = {"v5e_16": {}}


def glow_lsun(dataset: str, hardware: str = "") -> ml_collections.ConfigDict:
  """Glow's LSUN 64x64 setup (github.com/openai/glow README, "LSUN 64x64 quantitative result").

  L=3, K=48, 512 hidden channels, affine coupling, lr 1e-3, n_bits 8 (`glow_recipe`). Glow
  (like RealNVP) trained on random 64x64 crops of 96x96 images, while the data layer here takes
  the largest centre square resized to 64x64, so numbers are close to but not exactly
  comparable. Batch 256, step count, warmup, EMA and clipping are this project's choices.
  Evaluated on "validation" (LSUN has no public test split). Hardware: 8 accelerators with
  >= 16 GB each, 32 images per device.

  Memory per device, from the TPU compiler (scanned steps, `store`), TPU v5e, float32 coupling
  networks: at 32 images a chip 11.90 GiB of the 15.75 the compiler allows (arguments 1.00,
  temporaries 10.86), 4572 GFLOP per chip per step, roofline >= 148 ms a step, >= 12.3 h for
  300k steps on 8 chips; at 16 images a chip 7.27 GiB (arguments 1.00, temporaries 6.23),
  2287 GFLOP, roofline >= 100 ms a step, >= 8.3 h on 16 chips. Command: `python -m
  eiw_flow_jax.aot --config=configs/lsun_bedroom.py --topology=v5e:2x2 --per_device_batch=32
  --noeval` (docs/tpu.md). `:v5e_16` (16 chips of 16 GiB, 16 images each): as is.
  """
  config = glow_recipe(
      dataset, image_shape=(64, 64, 3), num_levels=3, steps_per_level=48, batch_size=256,
      num_train_steps=300_000,
  )
  config.dataset.eval_split = ""  # the dataset's usual eval split: "validation"
  return hardware_variant(config, hardware, LSUN_HARDWARE)


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
  _require(value in allowed, f"{name} must be one of {allowed}, got {value!r}.")


def level_channels(image_shape: tuple[int, int, int], num_levels: int) -> list[int]:
  """Channels at the end of each level, where the split happens (after the 2x2 squeeze)."""
  channels, out = image_shape[2], []
  for level in range(num_levels):
    channels *= 4
    out.append(channels)
    if level < num_levels - 1:
      channels //= 2
  return out


def resolve_anchor_width(anchor_width: int, channels: int) -> int:
  """The `per_example` anchor width A at a level with `channels` channels (0 means default)."""
  return max(1, channels // 4) if anchor_width == 0 else int(anchor_width)


def compute_dtype(model: ml_collections.ConfigDict) -> Any:
  """The coupling networks' compute dtype (`model.dtype`) as a jnp dtype, or None for "auto"
  (the inputs' dtype, Flax's `dtype=None`)."""
  import jax.numpy as jnp

  name = model.get("dtype", "auto")
  _choice("model.dtype", name, DTYPES)
  return None if name == "auto" else jnp.dtype(name)


def _int_tuple(name: str, value: object, length: int | None = None) -> tuple[int, ...]:
  ok = isinstance(value, (tuple, list)) and len(value) >= 1 and all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
  _require(ok, f"{name} must be a non-empty list of ints >= 1, got {value!r}.")
  if length is not None:
    _require(len(value) == length,
             f"{name} must have one entry per dense block ({length}, as block_conf), "
             f"got {len(value)}: {value!r}.")
  return tuple(value)


def validate_denseflow_config(model: ml_collections.ConfigDict) -> None:
  """Checks `model.denseflow` (and what the DenseFlow backbone reads elsewhere)."""
  _require("denseflow" in model,
           "model.backbone='denseflow' needs a model.denseflow sub-config (see base_config).")
  df = model.denseflow
  blocks = _int_tuple("model.denseflow.block_conf", df.block_conf)
  _int_tuple("model.denseflow.layers_conf", df.layers_conf, len(blocks))
  mids = _int_tuple("model.denseflow.layer_mid_chnls", df.layer_mid_chnls, len(blocks))
  _require(all(m >= 2 for m in mids),
           f"model.denseflow.layer_mid_chnls must be >= 2 (attention width is half), got {mids}.")
  for field in ("growth_rate", "coupling_depth", "coupling_growth", "attention_landmarks",
                "dequant_steps",
                "dequant_context_channels", "dequant_mid_channels", "dequant_depth",
                "dequant_growth", "dequant_context_depth", "dequant_context_growth"):
    value = df[field]
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             f"model.denseflow.{field} must be an int >= 1, got {value!r}.")
  height, width, _ = tuple(model.image_shape)
  factor = 2 ** len(blocks)
  _require(
      height % factor == 0 and width % factor == 0,
      f"model.image_shape {tuple(model.image_shape)} must have H and W divisible by "
      f"2**len(block_conf) = {factor} (an initial squeeze and one per transition), "
      f"got H={height}, W={width}.",
  )
  landmarks = df.get("attention_landmarks", 4)
  for b in range(len(blocks)):
    h_b, w_b = height // 2 ** (b + 1), width // 2 ** (b + 1)
    _require((h_b * w_b) % landmarks == 0,
             f"model.image_shape {tuple(model.image_shape)}: dense block {b} works at "
             f"{h_b}x{w_b} = {h_b * w_b} pixels; the Nystrom attention needs a multiple of its "
             f"{landmarks} landmarks (model.denseflow.attention_landmarks). Use fewer blocks, "
             "larger images or a landmark count dividing every block's H*W.")
  _require(model.split in SPLITS, f"model.split must be one of {SPLITS}, got {model.split!r}.")
  _require(model.split == "vanilla" or model.eiw.mode == "global",
           "model.eiw.mode must be 'global' with the denseflow backbone (the authors' "
           f"transition), got {model.eiw.mode!r}.")
  memory = model.get("memory", "store")
  _require(memory in DENSEFLOW_MEMORY,
           f"model.memory={memory!r} is not supported by the denseflow backbone: expected one "
           f"of {DENSEFLOW_MEMORY} ('invert' is supported for the glow backbone only).")
  _require(model.get("kernels", "auto") == "auto",
           f"model.kernels={model.get('kernels')!r} is not supported by the denseflow backbone: "
           "expected 'auto' ('portable' is implemented for the glow backbone's coupling "
           "networks; DenseFlow's only XLA:CPU form is its 1x1 convolutions' derivative rule).")
  dtype = model.get("dtype", "auto")
  _require(dtype in ("auto", "float32"),
           f"model.dtype={dtype!r} is not supported by the denseflow backbone: expected 'auto' "
           "or 'float32' (mixed precision is implemented for the glow backbone's coupling "
           "networks).")


def validate_model_config(model: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field, what was expected and what came."""
  shape = tuple(model.image_shape)
  _require(
      len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape),
      f"model.image_shape must be three positive ints (H, W, C), got {model.image_shape!r}.",
  )
  backbone = model.get("backbone", "glow")
  _choice("model.backbone", backbone, BACKBONES)
  scan_steps = model.get("scan_steps", True)
  _require(isinstance(scan_steps, bool),
           f"model.scan_steps must be True or False, got {scan_steps!r}.")
  if backbone == "denseflow":
    _require(
        isinstance(model.n_bits, int) and 1 <= model.n_bits <= 8,
        f"model.n_bits must be an int in [1, 8] (data is uint8), got {model.n_bits!r}.",
    )
    _choice("model.eiw.regularizer", model.eiw.regularizer, REGULARIZERS)
    _require(model.eiw.sigma >= 0, f"model.eiw.sigma must be >= 0, got {model.eiw.sigma!r}.")
    _require(model.eiw.reduction >= 1,
             f"model.eiw.reduction must be >= 1, got {model.eiw.reduction!r}.")
    validate_denseflow_config(model)
    return
  _require(
      isinstance(model.num_levels, int) and model.num_levels >= 1,
      f"model.num_levels must be an int >= 1, got {model.num_levels!r}.",
  )
  height, width, _ = shape
  factor = 2**model.num_levels
  _require(
      height % factor == 0 and width % factor == 0,
      f"model.image_shape {shape} must have H and W divisible by 2**num_levels = {factor} "
      f"(num_levels={model.num_levels}), got H={height}, W={width}.",
  )
  _require(
      model.steps_per_level >= 1,
      f"model.steps_per_level must be >= 1, got {model.steps_per_level!r}.",
  )
  _require(
      model.hidden_channels >= 1,
      f"model.hidden_channels must be >= 1, got {model.hidden_channels!r}.",
  )
  _require(
      isinstance(model.n_bits, int) and 1 <= model.n_bits <= 8,
      f"model.n_bits must be an int in [1, 8] (data is uint8), got {model.n_bits!r}.",
  )
  _choice("model.coupling", model.coupling, COUPLINGS)
  _choice("model.split", model.split, SPLITS)
  _choice("model.memory", model.get("memory", "store"), MEMORY_MODES)
  _choice("model.dtype", model.get("dtype", "auto"), DTYPES)
  _choice("model.kernels", model.get("kernels", "auto"), KERNELS)
  tolerance = model.get("invert_tolerance", 1e-3)
  _require(
      isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool) and tolerance > 0,
      f"model.invert_tolerance must be a number > 0, got {tolerance!r}.",
  )
  eiw = model.eiw
  _choice("model.eiw.mode", eiw.mode, EIW_MODES)
  _choice("model.eiw.regularizer", eiw.regularizer, REGULARIZERS)
  _require(eiw.sigma >= 0, f"model.eiw.sigma must be >= 0, got {eiw.sigma!r}.")
  _require(eiw.reduction >= 1, f"model.eiw.reduction must be >= 1, got {eiw.reduction!r}.")
  _require(eiw.beta > 0, f"model.eiw.beta must be > 0, got {eiw.beta!r}.")
  _require(
      eiw.solver_hidden >= 1, f"model.eiw.solver_hidden must be >= 1, got {eiw.solver_hidden!r}."
  )
  _require(
      eiw.entropy_weight >= 0, f"model.eiw.entropy_weight must be >= 0, got {eiw.entropy_weight!r}."
  )
  for flag in ("freeze_permutation", "use_weights", "use_permutation"):
    _require(
        isinstance(eiw[flag], bool),
        f"model.eiw.{flag} must be a bool (True or False), got {eiw[flag]!r}.",
    )
  _require(
      isinstance(eiw.anchor_width, int) and eiw.anchor_width >= 0,
      f"model.eiw.anchor_width must be an int >= 0 (0 = default), got {eiw.anchor_width!r}.",
  )
  if model.split == "eiw" and eiw.mode == "per_example":
    for level, channels in enumerate(level_channels(shape, model.num_levels)[:-1]):
      kept = channels // 2
      anchor = resolve_anchor_width(eiw.anchor_width, channels)
      upper = kept - 1 if kept >= 2 else 1
      _require(
          1 <= anchor <= upper,
          f"model.eiw.anchor_width gives A={anchor} at level {level} with C={channels} channels; "
          f"expected 1 <= A <= {upper} (A < C//2 = {kept}).",
      )


class ConfigError(ValueError):
  """A config that cannot run; raised by `validate_config` before any compute."""


def _known_datasets() -> tuple[str, ...]:
  # The data layer owns the registry; imported lazily so model-only users skip TFDS.
  from eiw_flow_jax import data

  return tuple(sorted(data.DATASETS))


def _positive_int(name: str, value: object, *, allow_zero: bool = False) -> None:
  low = 0 if allow_zero else 1
  _require(
      isinstance(value, int) and not isinstance(value, bool) and value >= low,
      f"{name} must be an int >= {low}, got {value!r}.",
  )


def validate_config(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int | None = None,
    num_processes: int | None = None,
) -> None:
  """Checks the whole config (model, dataset, training) and raises ConfigError naming the field.

  `num_devices` / `num_processes` (global device count, JAX process count) enable the checks
  that batches split evenly; leave them None to check only what the config alone determines
  (e.g. before `jax.distributed.initialize()`).
  """
  try:
    validate_model_config(config.model)
    _validate_training(config)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from e
  except (TypeError, AttributeError, KeyError) as e:  # a field missing or of the wrong type
    raise ConfigError(f"Invalid config ({type(e).__name__}): {e}") from e
  for count, what in ((num_devices, "devices"), (num_processes, "processes")):
    if count is None:
      continue
    for field in ("batch_size", "eval_batch_size"):
      value = config[field]
      if value % count:
        raise ConfigError(
            f"config.{field}={value} must be divisible by the number of {what} ({count}): "
            f"each of them gets an equal share of every batch."
        )


def _validate_training(config: ml_collections.ConfigDict) -> None:
  known = _known_datasets()
  _choice("config.dataset.name", config.dataset.name, known)
  _require(
      isinstance(config.seed, int) and config.seed >= 0,
      f"config.seed must be an int >= 0, got {config.seed!r}.",
  )
  for field in ("batch_size", "eval_batch_size", "num_train_steps", "init_batch_size"):
    _positive_int(f"config.{field}", config[field])
  for field in ("log_every_steps", "keep_checkpoints", "max_consecutive_nonfinite"):
    _positive_int(f"config.{field}", config[field])
  _positive_int("config.prefetch_batches", config.get("prefetch_batches", 2), allow_zero=True)
  _positive_int("config.dataset.worker_count", config.dataset.get("worker_count", 0),
                allow_zero=True)
  for field in ("checkpoint_every_steps", "eval_every_steps"):
    _positive_int(f"config.{field}", config[field], allow_zero=True)
  _require(
      0.0 <= config.ema_decay < 1.0,
      f"config.ema_decay must be in [0, 1), got {config.ema_decay!r}.",
  )
  opt = config.optimizer
  _require(
      opt.learning_rate > 0,
      f"config.optimizer.learning_rate must be > 0, got {opt.learning_rate!r}.",
  )
  _positive_int("config.optimizer.warmup_steps", opt.warmup_steps, allow_zero=True)
  _require(
      0.0 <= opt.end_learning_rate_factor <= 1.0,
      "config.optimizer.end_learning_rate_factor must be in [0, 1], got "
      f"{opt.end_learning_rate_factor!r}.",
  )
  _choice("config.optimizer.name", opt.get("name", "adam"), OPTIMIZERS)
  decay_rate = opt.get("decay_rate", 1.0)
  _require(0.0 < decay_rate <= 1.0,
           f"config.optimizer.decay_rate must be in (0, 1] (1 disables), got {decay_rate!r}.")
  if decay_rate < 1.0:
    _positive_int("config.optimizer.steps_per_epoch", opt.get("steps_per_epoch", 0))
  if "eval" in config:
    k, chunk = config.eval.iwbo_samples, config.eval.iwbo_chunk
    _positive_int("config.eval.iwbo_samples", k, allow_zero=True)
    _positive_int("config.eval.iwbo_chunk", chunk)
    if k:
      _require(config.model.get("backbone", "glow") == "denseflow",
               "config.eval.iwbo_samples > 0 needs model.backbone='denseflow' (Glow's "
               "likelihood is exact given the dequantization noise), got "
               f"{config.model.get('backbone', 'glow')!r}.")
      _require(k % min(chunk, k) == 0,
               f"config.eval.iwbo_samples={k} must be a multiple of config.eval.iwbo_chunk="
               f"{chunk}.")
  for field in ("b1", "b2"):
    _require(
        0.0 <= opt[field] < 1.0, f"config.optimizer.{field} must be in [0, 1), got {opt[field]!r}."
    )
  _require(
      opt.grad_clip_norm >= 0,
      f"config.optimizer.grad_clip_norm must be >= 0 (0 disables), got {opt.grad_clip_norm!r}.",
  )
  temperatures = tuple(config.sample.temperatures)
  _require(
      len(temperatures) > 0 and all(t >= 0 for t in temperatures),
      f"config.sample.temperatures must be a non-empty list of numbers >= 0, got {temperatures!r}.",
  )
  _positive_int("config.sample.num_samples", config.sample.num_samples)
  _positive_int("config.sample.display_max", config.sample.display_max, allow_zero=True)


def check_dataset(config: ml_collections.ConfigDict) -> data.DatasetInfo:
  """The dataset's `data.DatasetInfo`; a dataset that does not fit the config is a ConfigError."""
  from eiw_flow_jax import data  # lazily, as in _known_datasets

  try:
    return data.get_dataset_info(config)
  except ValueError as e:  # wrong split name, image shape, ...: a config problem
    raise ConfigError(f"Dataset {config.dataset.name!r}: {e}") from e
