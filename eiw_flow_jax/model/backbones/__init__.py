"""Backbones: multi-scale flows that `eiw_flow_jax.model.flow.Flow` wraps.

Every backbone is a linen module built from the validated `config.model` that implements the
interface of `base.Backbone`, the only way the rest of the package reaches it (through `Flow`):
what its levels are (`levels`: per level the latent's shape, the channels at its split and
the split's kind), where its EIW splits are and which channel order each shares across
examples (`split_permutations`), its maps (`forward`, `inverse`, `generate`, `prior_means`),
its diagnostics and explore captures (`diagnostics`, `shuffle_assignment`, `split_inputs`,
`position_log_likelihoods`), and its parameter layout (`migrate_layout` from older layouts,
`stacked_axis` naming the leading axis of stacked modules). Parameter names are the backbone's
own: nothing outside this package parses them.

Glow's (`MultiScaleFlow`, `glow.py`) share the bijectors (`eiw_flow_jax.model.bijectors`) and
splits (`eiw_flow_jax.model.splits`); DenseFlow's (`DenseFlowBackbone`, `denseflow.py`, the
paper's model) has its own layers, parameterised as the authors' PyTorch code
(`dense_bijectors.py`, `dense_nets.py`, `dense_dequantizer.py`; `denseflow_torch.py` reads their
checkpoints), and shares the global Shuffle with the splits; its data-side maps also take the
augmentation noise, and `forward_x(x, noise)` runs the variational dequantization too.
`layouts.py` holds what the layout migrations share.
"""

from __future__ import annotations

from eiw_flow_jax.model.backbones.base import Backbone, Level
from eiw_flow_jax.model.backbones.denseflow import DenseFlowBackbone
from eiw_flow_jax.model.backbones.glow import MultiScaleFlow

__all__ = ["Backbone", "DenseFlowBackbone", "Level", "MultiScaleFlow"]

