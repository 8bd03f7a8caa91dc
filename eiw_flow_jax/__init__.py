"""eiw_flow_jax: EIW-Flow (arXiv:2407.04958) and multi-scale normalizing flows in JAX/Flax.

The package, by concern (docs/architecture.md): `config` (the schema, recipes), `model` (the
flow API, bijectors, splits, memory strategies, kernels, backbones), `data` (datasets and the
input pipeline), `training` (step, loop, state, evaluation, resuming), `workdir` (checkpoints,
lock, storage, stop signals), `host` (process settings made before JAX loads), `aot`
(ahead-of-time compiles for a topology) and `commands` (`python -m eiw_flow_jax.<command>`:
main, aot, convert, table, prepare).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The public names load on first use, so that importing the package stays light: the command
# line imports it before it re-executes itself (eiw_flow_jax.host.process) and before JAX loads.
_EXPORTS = {
    "DenseFlow": "model.flow", "Flow": "model.flow", "build_flow": "model.flow",
    "DenseFlowBackbone": "model.backbones.denseflow", "MultiScaleFlow": "model.backbones.glow",
    "base_config": "config.schema", "validate_model_config": "model.validation",
    "LoadedFlow": "training.inference", "load": "training.inference",
}
__all__ = [
    "DenseFlow", "DenseFlowBackbone", "Flow", "LoadedFlow", "MultiScaleFlow", "base_config",
    "build_flow", "load", "validate_model_config",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
  from eiw_flow_jax.config.schema import base_config
  from eiw_flow_jax.model.backbones.denseflow import DenseFlowBackbone
  from eiw_flow_jax.model.backbones.glow import MultiScaleFlow
  from eiw_flow_jax.model.flow import DenseFlow, Flow, build_flow
  from eiw_flow_jax.model.validation import validate_model_config
  from eiw_flow_jax.training.inference import LoadedFlow, load


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted([*globals(), *_EXPORTS])
