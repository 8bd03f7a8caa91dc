"""eiw_flow_jax: EIW-Flow (arXiv:2407.04958) and multi-scale normalizing flows in JAX/Flax."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The public names (and the submodules) load on first use, so that importing the package stays
# light: `python -m eiw_flow_jax.main` imports it before main.py runs, and main.py re-executes
# itself (eiw_flow_jax.host_malloc) before importing JAX, which then loads once per start.
_EXPORTS = {
    "DenseFlow": "model", "DenseFlowBackbone": "model", "Flow": "model",
    "MultiScaleFlow": "model", "build_flow": "model",
    "base_config": "config_lib", "validate_model_config": "config_lib",
    "LoadedFlow": "inference", "load": "inference",
}
__all__ = [
    "DenseFlow", "DenseFlowBackbone", "Flow", "LoadedFlow", "MultiScaleFlow", "base_config",
    "build_flow", "load", "validate_model_config",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
  from eiw_flow_jax.config_lib import base_config, validate_model_config
  from eiw_flow_jax.inference import LoadedFlow, load
  from eiw_flow_jax.model import (
      DenseFlow,
      DenseFlowBackbone,
      Flow,
      MultiScaleFlow,
      build_flow,
  )


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  elif name == "main":  # the command line defines absl flags on import: only when asked for
    raise AttributeError(f"module {__name__!r} has no attribute 'main' (import eiw_flow_jax.main)")
  else:
    try:  # `eiw_flow_jax.train` without `import eiw_flow_jax.train`, as when __init__ imported it
      value = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"{__name__}.{name}":
        raise
      raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted([*globals(), *_EXPORTS])
