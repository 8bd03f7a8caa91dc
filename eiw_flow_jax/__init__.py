"""eiw_flow_jax: EIW-Flow (arXiv:2407.04958) and multi-scale normalizing flows in JAX/Flax."""

from eiw_flow_jax.config_lib import base_config, validate_model_config
from eiw_flow_jax.model import DenseFlow, DenseFlowBackbone, Flow, MultiScaleFlow, build_flow

__all__ = [
    "DenseFlow", "DenseFlowBackbone", "Flow", "MultiScaleFlow", "base_config", "build_flow",
    "validate_model_config",
]
__version__ = "0.1.0"
