"""Validation of `config.model` (both backbones), before any model is built.

The model reads its config directly (`model.scan_steps`, never with a default of its own): every
config is built on `eiw_flow_jax.base_config()`, which holds each field and its default, and
`check_fields_present` says so clearly where a config was not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from eiw_flow_jax.config.checks import choice, int_tuple, require
from eiw_flow_jax.config.schema import (
  BACKBONES,
  COUPLINGS,
  DENSEFLOW_MEMORY,
  DTYPES,
  EIW_MODES,
  KERNELS,
  MEMORY_MODES,
  REGULARIZERS,
  SPLITS,
  base_config,
)
from eiw_flow_jax.model.shapes import level_channels, resolve_anchor_width


def missing_fields(expected: Any, got: Any, prefix: str) -> list[str]:
  """Dotted names of the fields of `expected` (a config) absent from `got`, recursively."""
  nested = (Mapping, ml_collections.ConfigDict)
  out = []
  for name, value in expected.items():
    field = f"{prefix}.{name}"
    if name not in got:
      out.append(field)
    elif isinstance(value, nested) and isinstance(got[name], nested):
      out += missing_fields(value, got[name], field)
  return out


def check_fields_present(model: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the fields of the schema's `config.model` that `model` lacks."""
  missing = missing_fields(base_config().model, model, "model")
  require(
      not missing,
      f"{', '.join(missing[:5])}{' and more' if len(missing) > 5 else ''}: missing from the "
      "model config; build configs on eiw_flow_jax.base_config(), which holds every field with "
      "its default, and override only what differs.",
  )


def validate_denseflow_config(model: ml_collections.ConfigDict) -> None:
  """Checks `model.denseflow` (and what the DenseFlow backbone reads elsewhere)."""
  df = model.denseflow
  blocks = int_tuple("model.denseflow.block_conf", df.block_conf)
  int_tuple("model.denseflow.layers_conf", df.layers_conf, len(blocks))
  mids = int_tuple("model.denseflow.layer_mid_chnls", df.layer_mid_chnls, len(blocks))
  require(all(m >= 2 for m in mids),
           f"model.denseflow.layer_mid_chnls must be >= 2 (attention width is half), got {mids}.")
  for field in ("growth_rate", "coupling_depth", "coupling_growth", "attention_landmarks",
                "dequant_steps",
                "dequant_context_channels", "dequant_mid_channels", "dequant_depth",
                "dequant_growth", "dequant_context_depth", "dequant_context_growth"):
    value = df[field]
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             f"model.denseflow.{field} must be an int >= 1, got {value!r}.")
  height, width, _ = tuple(model.image_shape)
  factor = 2 ** len(blocks)
  require(
      height % factor == 0 and width % factor == 0,
      f"model.image_shape {tuple(model.image_shape)} must have H and W divisible by "
      f"2**len(block_conf) = {factor} (an initial squeeze and one per transition), "
      f"got H={height}, W={width}.",
  )
  landmarks = df.attention_landmarks
  for b in range(len(blocks)):
    h_b, w_b = height // 2 ** (b + 1), width // 2 ** (b + 1)
    require((h_b * w_b) % landmarks == 0,
             f"model.image_shape {tuple(model.image_shape)}: dense block {b} works at "
             f"{h_b}x{w_b} = {h_b * w_b} pixels; the Nystrom attention needs a multiple of its "
             f"{landmarks} landmarks (model.denseflow.attention_landmarks). Use fewer blocks, "
             "larger images or a landmark count dividing every block's H*W.")
  require(model.split in SPLITS, f"model.split must be one of {SPLITS}, got {model.split!r}.")
  require(model.split == "vanilla" or model.eiw.mode == "global",
           "model.eiw.mode must be 'global' with the denseflow backbone (the authors' "
           f"transition), got {model.eiw.mode!r}.")
  memory = model.memory
  require(memory in DENSEFLOW_MEMORY,
           f"model.memory={memory!r} is not supported by the denseflow backbone: expected one "
           f"of {DENSEFLOW_MEMORY} ('invert' is supported for the glow backbone only).")
  require(model.kernels == "auto",
           f"model.kernels={model.kernels!r} is not supported by the denseflow backbone: "
           "expected 'auto' ('portable' is implemented for the glow backbone's coupling "
           "networks; DenseFlow's only XLA:CPU form is its 1x1 convolutions' derivative rule).")
  dtype = model.dtype
  require(dtype in ("auto", "float32"),
           f"model.dtype={dtype!r} is not supported by the denseflow backbone: expected 'auto' "
           "or 'float32' (mixed precision is implemented for the glow backbone's coupling "
           "networks).")


def validate_model_config(model: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field, what was expected and what came."""
  check_fields_present(model)
  shape = tuple(model.image_shape)
  require(
      len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape),
      f"model.image_shape must be three positive ints (H, W, C), got {model.image_shape!r}.",
  )
  backbone = model.backbone
  choice("model.backbone", backbone, BACKBONES)
  scan_steps = model.scan_steps
  require(isinstance(scan_steps, bool),
           f"model.scan_steps must be True or False, got {scan_steps!r}.")
  if backbone == "denseflow":
    require(
        isinstance(model.n_bits, int) and 1 <= model.n_bits <= 8,
        f"model.n_bits must be an int in [1, 8] (data is uint8), got {model.n_bits!r}.",
    )
    choice("model.eiw.regularizer", model.eiw.regularizer, REGULARIZERS)
    require(model.eiw.sigma >= 0, f"model.eiw.sigma must be >= 0, got {model.eiw.sigma!r}.")
    require(model.eiw.reduction >= 1,
             f"model.eiw.reduction must be >= 1, got {model.eiw.reduction!r}.")
    validate_denseflow_config(model)
    return
  require(
      isinstance(model.num_levels, int) and model.num_levels >= 1,
      f"model.num_levels must be an int >= 1, got {model.num_levels!r}.",
  )
  height, width, _ = shape
  factor = 2**model.num_levels
  require(
      height % factor == 0 and width % factor == 0,
      f"model.image_shape {shape} must have H and W divisible by 2**num_levels = {factor} "
      f"(num_levels={model.num_levels}), got H={height}, W={width}.",
  )
  require(
      model.steps_per_level >= 1,
      f"model.steps_per_level must be >= 1, got {model.steps_per_level!r}.",
  )
  require(
      model.hidden_channels >= 1,
      f"model.hidden_channels must be >= 1, got {model.hidden_channels!r}.",
  )
  require(
      isinstance(model.n_bits, int) and 1 <= model.n_bits <= 8,
      f"model.n_bits must be an int in [1, 8] (data is uint8), got {model.n_bits!r}.",
  )
  choice("model.coupling", model.coupling, COUPLINGS)
  choice("model.split", model.split, SPLITS)
  choice("model.memory", model.memory, MEMORY_MODES)
  choice("model.dtype", model.dtype, DTYPES)
  choice("model.kernels", model.kernels, KERNELS)
  tolerance = model.invert_tolerance
  require(
      isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool) and tolerance > 0,
      f"model.invert_tolerance must be a number > 0, got {tolerance!r}.",
  )
  eiw = model.eiw
  choice("model.eiw.mode", eiw.mode, EIW_MODES)
  choice("model.eiw.regularizer", eiw.regularizer, REGULARIZERS)
  require(eiw.sigma >= 0, f"model.eiw.sigma must be >= 0, got {eiw.sigma!r}.")
  require(eiw.reduction >= 1, f"model.eiw.reduction must be >= 1, got {eiw.reduction!r}.")
  require(eiw.beta > 0, f"model.eiw.beta must be > 0, got {eiw.beta!r}.")
  require(
      eiw.solver_hidden >= 1, f"model.eiw.solver_hidden must be >= 1, got {eiw.solver_hidden!r}."
  )
  require(
      eiw.entropy_weight >= 0, f"model.eiw.entropy_weight must be >= 0, got {eiw.entropy_weight!r}."
  )
  for flag in ("freeze_permutation", "use_weights", "use_permutation"):
    require(
        isinstance(eiw[flag], bool),
        f"model.eiw.{flag} must be a bool (True or False), got {eiw[flag]!r}.",
    )
  require(
      isinstance(eiw.anchor_width, int) and eiw.anchor_width >= 0,
      f"model.eiw.anchor_width must be an int >= 0 (0 = default), got {eiw.anchor_width!r}.",
  )
  if model.split == "eiw" and eiw.mode == "per_example":
    for level, channels in enumerate(level_channels(shape, model.num_levels)[:-1]):
      kept = channels // 2
      anchor = resolve_anchor_width(eiw.anchor_width, channels)
      upper = kept - 1 if kept >= 2 else 1
      require(
          1 <= anchor <= upper,
          f"model.eiw.anchor_width gives A={anchor} at level {level} with C={channels} channels; "
          f"expected 1 <= A <= {upper} (A < C//2 = {kept}).",
      )
