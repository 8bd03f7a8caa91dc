"""Looking inside a trained flow: interpolate, bits per pixel, what the Shuffle keeps.

  flow, variables, config, step = eiw_flow_jax.load(workdir)   # eiw_flow_jax.training.inference
  flow.interpolate(variables, x_a, x_b, num=8)   # (B, num, H, W, C), latent-space straight lines
  flow.bits_per_dim_map(variables, x)            # (B, H, W) bits per pixel position
  flow.shuffle_assignment(variables, x)          # per split level: kept mask (B, C), order, ...

`Flow` exposes the last three as methods; the logic lives here, on the backbone's captures
(`position_log_likelihoods`, `shuffle_assignment`). uint8 images are mapped to the
middle of their quantization bin, y = (x + 0.5) / 2^n_bits, instead of a random point in it, so
every result is a deterministic function of the images (and quantizing y gives x back exactly).
Float inputs are taken as dequantized images y as they are.

`notebooks/explore.ipynb` shows all of it on a small digits model.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Variables = dict[str, Any]
Flow = Any  # an eiw_flow_jax.model.flow.Flow; not imported: model.py imports this module


# ----------------------------------------------------------------------------------------------
# Inputs.


def as_continuous(flow: Flow, x: Array, name: str) -> Array:
  """uint8 images -> their bins' midpoints (x + 0.5) / 2^n; float images y -> y, checked."""
  x = jnp.asarray(x) if isinstance(x, np.ndarray) else x
  if getattr(x, "dtype", None) == jnp.uint8:
    flow.check_uint8(x)
    return (x.astype(jnp.float32) + 0.5) / 2.0**flow.n_bits
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}: expected uint8 images or float dequantized images y in [0, 1], "
                     f"got {type(x).__name__} of dtype {getattr(x, 'dtype', None)}.")
  flow.check_continuous(x)
  return x


# ----------------------------------------------------------------------------------------------
# Interpolation.


def interpolate(flow: Flow, variables: Variables, x_a: Array, x_b: Array, num: int = 8) -> Array:
  """Images along the straight line between two images' latents, at every level.

  For each pair (x_a[i], x_b[i]): z(t) = (1 - t) encode(x_a) + t encode(x_b) for every level's
  latent, t = 0, 1/(num-1), ..., 1, decoded. uint8 inputs (mapped to their bins' midpoints)
  give uint8 images, float inputs y give float y; either way t = 0 and t = 1 give back x_a and
  x_b (exactly for uint8; to float round-off for y). Shapes: x_a, x_b (B, H, W, C) -> (B, num,
  H, W, C). DenseFlow: its augmentation channels are drawn with the fixed key of `encode` and
  dropped by `decode`; per_example EIW: each latent is in its example's own channel order.
  """
  if not isinstance(num, (int, np.integer)) or isinstance(num, bool) or num < 2:
    raise ValueError(f"num: expected an int >= 2 (the two ends included), got {num!r}.")
  y_a, y_b = as_continuous(flow, x_a, "x_a"), as_continuous(flow, x_b, "x_b")
  if y_a.shape != y_b.shape or x_a.dtype != x_b.dtype:
    raise ValueError(f"x_a, x_b: expected the same shape and dtype, got {tuple(x_a.shape)} "
                     f"{x_a.dtype} and {tuple(x_b.shape)} {x_b.dtype}.")
  y = _interpolate(flow, int(num), variables, y_a, y_b)
  return flow.quantize(y) if x_a.dtype == jnp.uint8 else y


@functools.partial(jax.jit, static_argnums=(0, 1))
def _interpolate(flow: Flow, num: int, variables: Variables, y_a: Array, y_b: Array) -> Array:
  b = y_a.shape[0]
  latents = flow.encode(variables, jnp.concatenate([y_a, y_b]))
  t = jnp.linspace(0.0, 1.0, num)
  path = []
  for z in latents:
    z_a, z_b = z[:b, None], z[b:, None]
    weight = t.reshape(1, num, *([1] * (z.ndim - 1)))
    path.append(((1.0 - weight) * z_a + weight * z_b).reshape(b * num, *z.shape[1:]))
  return flow.decode(variables, path).reshape(b, num, *flow.image_shape)


# ----------------------------------------------------------------------------------------------
# Bits per pixel.


def _spread(position_map: Array, image_hw: tuple[int, int]) -> Array:
  """(B, h, w) -> (B, H, W): each value spread evenly over the (H/h) x (W/w) pixels it covers."""
  fh, fw = image_hw[0] // position_map.shape[1], image_hw[1] // position_map.shape[2]
  blocks = jnp.repeat(jnp.repeat(position_map, fh, axis=1), fw, axis=2)
  return blocks / (fh * fw)


def bits_per_dim_map(
    flow: Flow, variables: Variables, x: Array, rng: Array | None = None
) -> Array:
  """Per-pixel-position bits (B, H, W): where the model spends its code length.

  map.sum((1, 2)) / D equals `flow.bpd` of the same dequantized images (D = H W C); map / C is
  bits per dimension at each position. uint8 x are taken at their bins' midpoints unless `rng`
  is given (then one uniform dequantization draw, as `flow.bpd`); float x are y as they are.
  The code length -log2 p(y) + D n_bits is attributed as follows (a latent position at level l
  covers a 2^(l+1) x 2^(l+1) block of pixels; a term of such a position is spread evenly over
  its block):
    - n_bits per dimension (the dequantization's -D n ln 2): C n_bits at every position;
    - each level's factored latent and the top latent: -log2 of its prior density at that
      latent position (summed over its channels), the conditional prior's mean and scale
      depending on the kept channels around it;
    - affine couplings: -log2 of their scale at that latent position (summed over channels);
    - ActNorm, the 1x1 convolutions and the per_example Shuffle's channel weights: their
      log-dets are the same at every latent position of a level, hence spread evenly over all
      pixels (squeeze, centring, the global Shuffle and additive couplings have log-det 0).
  Glow backbone only: DenseFlow's bound adds -log q(u|x) of its learned dequantizer and the
  augmentation noise's terms, which live on noise, not on pixel positions (ValueError).
  """
  if rng is None:
    y = as_continuous(flow, x, "x")
  else:
    y = flow.dequantize(x, rng, variables)
  flow.check_unit_cube(y)
  return _bits_map(flow, variables, y)


@functools.partial(jax.jit, static_argnums=0)
def _bits_map(flow: Flow, variables: Variables, y: Array) -> Array:
  maps, log_det = flow.module.apply(variables, y, method="position_log_likelihoods")
  hw = flow.image_shape[:2]
  log_likelihood = sum(_spread(m, hw) for m in maps) + (log_det / math.prod(hw))[:, None, None]
  constant = flow.image_shape[2] * flow.n_bits
  return constant - log_likelihood / math.log(2.0)


# ----------------------------------------------------------------------------------------------
# What the Shuffle keeps.


def shuffle_assignment(flow: Flow, variables: Variables, x: Array) -> list[dict[str, Array]]:
  """Per split level (in `encode`'s order), which channels stay and which are factored out.

  Channel c is the c-th channel of the level's output before its split (after the level's flow
  steps; DenseFlow: after the transition's squeeze). Per level a dict of arrays:
    - "kept": bool (B, C), True for the channels that go up the flow (C/2 of them);
    - "order": int (B, C), the Shuffle's order: after it, position i holds channel order[i];
      the first C/2 positions stay, the rest are factored (in that order in the latent);
    - "log_weights": float (B, C), the per_example Shuffle's log-scale of each channel
      (0 for the anchor channels and in the other modes, which do not scale).
  Vanilla splits keep the first half; EIW `global` (Glow and DenseFlow) has one order for all
  examples, broadcast over B; EIW `per_example` decides it per example from its anchor.
  x: uint8 images (at their bins' midpoints) or dequantized y.
  """
  y = as_continuous(flow, x, "x")
  return _shuffle_assignment(flow, variables, y)


@functools.partial(jax.jit, static_argnums=0)
def _shuffle_assignment(flow: Flow, variables: Variables, y: Array) -> list[dict[str, Array]]:
  return flow.module.apply(variables, *flow.backbone_inputs(y), method="shuffle_assignment")
