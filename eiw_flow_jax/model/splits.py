"""Factoring out latents: the vanilla split, the two EIW Shuffle-then-split variants, the top prior.

A split takes z (B, H, W, C) at the end of a level and returns `SplitOutput`: the channels that
`kept` going up the flow, the `factored` latent that leaves, the log-det of any invertible map
applied on the way (only `per_example` has one), the factored latent's log-density under its
conditional Gaussian prior N(mu(kept), sigma(kept)), and per-example auxiliary terms (the EIW
regulariser). `merge` is the exact inverse of the bijective part; `prior` gives (mu, log sigma)
for sampling; `assignment` says which channels stay, in which order, with which weights;
`shared_permutation` is the channel order where it is the same for every example.

The global Shuffle (one order for all examples from learned logits, a Solver, the regulariser
between their weights) is shared with DenseFlow's EIW transition
(`eiw_flow_jax.model.backbones.denseflow.Transition`): `order_from_logits`, `shuffle`,
`unshuffle`, `global_shuffle_regularizer`, `global_shuffle_diagnostics`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from eiw_flow_jax.model.bijectors import (
    SPLIT_SCOPE,
    TOP_PRIOR_SCOPE,
    ZeroConv,
    check_image_batch,
    layer_scope,
    sum_except_batch,
)

Array = jax.Array
_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(z: Array, mean: Array, log_std: Array) -> Array:
  """Per-example sum of log N(z; mean, exp(log_std)^2)."""
  log_density = -0.5 * _LOG_2PI - log_std - 0.5 * jnp.square((z - mean) * jnp.exp(-log_std))
  return sum_except_batch(log_density)


def gaussian_entropy_per_dim(log_std: Array) -> Array:
  """Per-example differential entropy of N(., exp(log_std)) divided by its dimension."""
  dims = math.prod(log_std.shape[1:])
  return sum_except_batch(log_std) / dims + 0.5 * math.log(2.0 * math.pi * math.e)


def categorical_entropy(logits: Array) -> Array:
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def assignment_from_order(order: Array, num_kept: int, log_weights: Array) -> dict[str, Array]:
  """A split's channel assignment from its order (B, C): position i of the shuffled channels
  holds channel order[i], the first `num_kept` positions stay (see `explore.shuffle_assignment`).
  """
  kept = jnp.zeros(order.shape, bool).at[
      jnp.arange(order.shape[0])[:, None], order[:, :num_kept]].set(True)
  return {"kept": kept, "order": order, "log_weights": log_weights}


def identity_assignment(z: Array, num_kept: int) -> dict[str, Array]:
  """The assignment of a split that keeps the first `num_kept` channels of z, unscaled."""
  b, c = z.shape[0], z.shape[-1]
  order = jnp.broadcast_to(jnp.arange(c), (b, c))
  return assignment_from_order(order, num_kept, jnp.zeros((b, c), jnp.float32))


# ----------------------------------------------------------------------------------------------
# The global Shuffle: one channel order for all examples, from learned logits.


def order_from_logits(logits: Array) -> Array:
  """The channels by descending logit, ties by index (stable): softmax's order, without its
  underflow to equal zeros."""
  return jnp.argsort(-logits, stable=True)


def shuffle(z: Array, order: Array) -> Array:
  """z's channels in `order` (position i holds channel order[i])."""
  return jnp.take(z, order, axis=-1)


def unshuffle(z: Array, order: Array) -> Array:
  """The inverse of `shuffle(., order)`."""
  return jnp.take(z, jnp.argsort(order), axis=-1)


def global_shuffle_regularizer(logits: Array, log_s: Array, form: str) -> Array:
  """Per example, between the global weights g = softmax(logits) and the Solver's s (B, C),
  both over channels in the same order: KL(g || s) = sum_c g_c (log g_c - log s_c) ("kl"), or
  the authors' literal form sum_c g_c (log g_c - s_c) (torch's KLDivLoss fed probabilities
  instead of log-probabilities). log g comes from log_softmax, so channels whose weight
  underflows to 0 add 0 with finite gradients."""
  log_g = jax.nn.log_softmax(logits)
  target = log_s if form == "kl" else jnp.exp(log_s)
  return jnp.sum(jnp.exp(log_g) * (log_g - target), axis=-1)


def global_shuffle_diagnostics(
    logits: Array, order: Array, log_s: Array, form: str
) -> dict[str, Array]:
  """The global Shuffle's diagnostics: entropies of g and of the batch-mean s, the mean
  regulariser, the order applied (`permutation`) and the channels it keeps (first half)."""
  mean_s = jnp.mean(jnp.exp(log_s), axis=0)
  return {
      "g_entropy": categorical_entropy(logits),
      "mean_s_entropy": -jnp.sum(mean_s * jnp.log(mean_s)),
      "regularizer": jnp.mean(global_shuffle_regularizer(logits, log_s, form)),
      "permutation": order,
      "kept_channels": order[: order.shape[0] // 2],
  }


class SplitOutput(NamedTuple):
  kept: Array
  factored: Array
  log_det: Array  # (B,)
  log_prior: Array  # (B,), log-density of `factored` under its conditional prior
  aux: dict[str, Array]  # per-example extra terms, e.g. {"regularizer": (B,)}


class _SplitBase(nn.Module):
  """Shared parts: channel bookkeeping, input checks and the conditional prior network."""

  channels: int

  def _check_channels(self) -> None:
    if self.channels < 2 or self.channels % 2:
      raise ValueError(
          f"{type(self).__name__}: expected an even number of channels >= 2, got {self.channels}."
      )

  @property
  def num_kept(self) -> int:
    return self.channels // 2

  def _prior_net(self) -> ZeroConv:
    return ZeroConv(2 * (self.channels - self.num_kept), name="prior")

  def prior(self, kept: Array) -> tuple[Array, Array]:
    """(mean, log_std) of the factored latent given the kept channels."""
    h = self.prior_net(kept)
    return h[..., 0::2], h[..., 1::2]

  def _finish(self, kept: Array, factored: Array, log_det: Array, aux: dict) -> SplitOutput:
    mean, log_std = self.prior(kept)
    return SplitOutput(kept, factored, log_det, gaussian_log_prob(factored, mean, log_std), aux)

  def factored_entropy(self, kept: Array) -> Array:
    """Mean differential entropy per dimension of the factored latents' conditional prior."""
    return jnp.mean(gaussian_entropy_per_dim(self.prior(kept)[1]))

  def shared_permutation(self) -> Array | None:
    """The channel order applied before the split where it is the same for every example (a
    function of the parameters alone), else None."""
    return None


class VanillaSplit(_SplitBase):
  """Static split: the first C/2 channels stay, the rest leave."""

  def setup(self) -> None:
    self._check_channels()
    self.prior_net = self._prior_net()

  @layer_scope(SPLIT_SCOPE)
  def split(self, z: Array) -> SplitOutput:
    check_image_batch(z, "VanillaSplit", self.channels)
    zero = jnp.zeros((z.shape[0],), z.dtype)
    return self._finish(z[..., : self.num_kept], z[..., self.num_kept :], zero, {})

  @layer_scope(SPLIT_SCOPE)
  def merge(self, kept: Array, factored: Array) -> tuple[Array, Array]:
    return jnp.concatenate([kept, factored], axis=-1), jnp.zeros((kept.shape[0],), kept.dtype)

  def diagnostics(self, z: Array) -> dict[str, Array]:
    return {"factored_entropy": self.factored_entropy(z[..., : self.num_kept])}

  def assignment(self, z: Array) -> dict[str, Array]:
    return identity_assignment(z, self.num_kept)


class EIWGlobalSplit(_SplitBase):
  """EIW Shuffle, variant `global` (the authors' code), then the split.

  A squeeze-and-excitation Solver gives per-example channel weights s(z); learned global
  weights g = softmax(theta) (theta starts at 0) choose one permutation for all examples,
  pi = stable argsort(-theta). The permutation has log-det 0 and does not depend on z, so the
  split is exact; theta and the Solver learn only through the regulariser
  R = KL(g || s(z)) (or the authors' literal form sum g (log g - s)), returned per example.

  Ablation: `freeze_permutation=True` fixes pi at the identity (the vanilla split) while theta,
  the Solver and the regulariser still train exactly as before, separating what the reordering
  does from what the extra term in the loss does.
  """

  reduction: int = 16
  regularizer: str = "kl"
  freeze_permutation: bool = False

  def setup(self) -> None:
    self._check_channels()
    if self.regularizer not in ("kl", "literal"):
      raise ValueError(f"regularizer must be 'kl' or 'literal', got {self.regularizer!r}.")
    self.prior_net = self._prior_net()
    self.theta = self.param("theta", nn.initializers.zeros, (self.channels,))
    hidden = max(1, self.channels // self.reduction)
    self.solver_hidden = nn.Dense(hidden, use_bias=False, name="solver_hidden")
    self.solver_out = nn.Dense(self.channels, use_bias=False, name="solver_out")

  def permutation(self) -> Array:
    """The channel order pi applied before the split (the identity when frozen)."""
    if self.freeze_permutation:
      return jnp.arange(self.channels)
    return order_from_logits(self.theta)

  def shared_permutation(self) -> Array:
    return self.permutation()

  def solver_log_weights(self, z: Array) -> Array:
    """log s(z), (B, C): a per-example distribution over channels, in the original order."""
    pooled = jnp.mean(z, axis=(1, 2))
    return jax.nn.log_softmax(self.solver_out(nn.relu(self.solver_hidden(pooled))), axis=-1)

  def regularizer_per_example(self, z: Array) -> Array:
    return global_shuffle_regularizer(self.theta, self.solver_log_weights(z), self.regularizer)

  @layer_scope(SPLIT_SCOPE)
  def split(self, z: Array) -> SplitOutput:
    check_image_batch(z, "EIWGlobalSplit", self.channels)
    shuffled = shuffle(z, self.permutation())
    zero = jnp.zeros((z.shape[0],), z.dtype)
    aux = {"regularizer": self.regularizer_per_example(z)}
    return self._finish(
        shuffled[..., : self.num_kept], shuffled[..., self.num_kept :], zero, aux
    )

  @layer_scope(SPLIT_SCOPE)
  def merge(self, kept: Array, factored: Array) -> tuple[Array, Array]:
    shuffled = jnp.concatenate([kept, factored], axis=-1)
    return unshuffle(shuffled, self.permutation()), jnp.zeros((kept.shape[0],), kept.dtype)

  def diagnostics(self, z: Array) -> dict[str, Array]:
    perm = self.permutation()
    kept = shuffle(z, perm)[..., : self.num_kept]
    return {
        **global_shuffle_diagnostics(
            self.theta, perm, self.solver_log_weights(z), self.regularizer),
        "factored_entropy": self.factored_entropy(kept),
    }

  def assignment(self, z: Array) -> dict[str, Array]:
    b = z.shape[0]
    order = jnp.broadcast_to(self.permutation(), (b, self.channels))
    return assignment_from_order(order, self.num_kept, jnp.zeros((b, self.channels), jnp.float32))


class EIWPerExampleSplit(_SplitBase):
  """EIW Shuffle, variant `per_example` (this project's extension), exactly bijective.

  The first A (anchor) channels always stay and alone determine, through the Solver, bounded
  per-example log-weights log w = beta * tanh(s / beta) of the C - A candidate channels. The
  candidates are scaled by w (log-det H W sum(log w)), reordered per example by
  pi = stable argsort(-log w), and the first C/2 - A of them stay. The inverse sees the anchor,
  recomputes (w, pi) and undoes both. The Solver's last Dense is zero-initialised, so training
  starts from the vanilla split.

  Ablations (both default True, the full method): `use_weights=False` applies no scaling
  (log w = 0, log-det 0) while pi is still argsort of the Solver's scores; `use_permutation=False`
  keeps pi at the identity while the scaling stays. With both False the split is the vanilla
  one. Note: pi is piecewise constant in the scores, so without the scaling the Solver gets no
  likelihood gradient (only the optional entropy term, computed on the scores, reaches it).
  """

  anchor_width: int = 1
  beta: float = 2.0
  volume_preserving: bool = False
  solver_width: int = 32
  use_weights: bool = True
  use_permutation: bool = True

  def setup(self) -> None:
    self._check_channels()
    upper = self.num_kept - 1 if self.num_kept >= 2 else 1
    if not 1 <= self.anchor_width <= upper:
      raise ValueError(
          f"EIWPerExampleSplit: anchor width must satisfy 1 <= A <= {upper} for C={self.channels}"
          f" channels, got A={self.anchor_width}."
      )
    self.prior_net = self._prior_net()
    self.solver_conv = nn.Conv(self.solver_width, (3, 3), padding="SAME", name="solver_conv")
    self.solver_out = nn.Dense(
        self.channels - self.anchor_width, kernel_init=nn.initializers.zeros, name="solver_out"
    )

  def scores(self, anchor: Array) -> Array:
    """The Solver's bounded scores (B, C - A) of the candidate channels, from the anchor alone.

    They are the log-weights when `use_weights` is on, and always the key that orders pi.
    """
    h = jnp.mean(nn.relu(self.solver_conv(anchor)), axis=(1, 2))
    s = self.solver_out(h)
    scores = self.beta * jnp.tanh(s / self.beta)
    if self.volume_preserving:
      scores = scores - jnp.mean(scores, axis=-1, keepdims=True)
    return scores

  def log_weights(self, anchor: Array) -> Array:
    """Log-weights (B, C - A) applied to the candidates: the scores, or 0 without weights."""
    scores = self.scores(anchor)
    return scores if self.use_weights else jnp.zeros_like(scores)

  def weights_and_permutation(self, anchor: Array) -> tuple[Array, Array]:
    """(log w, pi): what the anchor alone decides, recomputed identically by the inverse."""
    return self._decide(anchor)[1:]

  def _decide(self, anchor: Array) -> tuple[Array, Array, Array]:
    """(scores, log w, pi) from the anchor."""
    scores = self.scores(anchor)
    log_w = scores if self.use_weights else jnp.zeros_like(scores)
    if self.use_permutation:
      perm = jnp.argsort(-scores, axis=-1, stable=True)
    else:
      perm = jnp.broadcast_to(jnp.arange(scores.shape[-1]), scores.shape)
    return scores, log_w, perm

  @staticmethod
  def _permute(x: Array, perm: Array) -> Array:
    return jnp.take_along_axis(x, perm[:, None, None, :], axis=-1)

  def _shuffle(self, z: Array) -> tuple[Array, Array, Array, Array, Array]:
    """(scores, log w, pi, kept, factored) of the forward Shuffle-then-split."""
    a = self.anchor_width
    anchor, candidates = z[..., :a], z[..., a:]
    scores, log_w, perm = self._decide(anchor)
    shuffled = self._permute(candidates * jnp.exp(log_w)[:, None, None, :], perm)
    stay = self.num_kept - a
    kept = jnp.concatenate([anchor, shuffled[..., :stay]], axis=-1)
    return scores, log_w, perm, kept, shuffled[..., stay:]

  @layer_scope(SPLIT_SCOPE)
  def split(self, z: Array) -> SplitOutput:
    check_image_batch(z, "EIWPerExampleSplit", self.channels)
    scores, log_w, _, kept, factored = self._shuffle(z)
    log_det = z.shape[1] * z.shape[2] * jnp.sum(log_w, axis=-1)
    aux = {"weight_entropy": categorical_entropy(scores)}
    return self._finish(kept, factored, log_det, aux)

  @layer_scope(SPLIT_SCOPE)
  def merge(self, kept: Array, factored: Array) -> tuple[Array, Array]:
    a = self.anchor_width
    anchor = kept[..., :a]
    log_w, perm = self.weights_and_permutation(anchor)
    shuffled = jnp.concatenate([kept[..., a:], factored], axis=-1)
    candidates = self._permute(shuffled, jnp.argsort(perm, axis=-1)) * jnp.exp(-log_w)[
        :, None, None, :
    ]
    log_det = -kept.shape[1] * kept.shape[2] * jnp.sum(log_w, axis=-1)
    return jnp.concatenate([anchor, candidates], axis=-1), log_det

  def assignment(self, z: Array) -> dict[str, Array]:
    """The anchor channels stay in place (log-weight 0); the candidates follow in the order
    the anchor decides, with their log-weights."""
    b, a = z.shape[0], self.anchor_width
    candidate_log_w, perm = self.weights_and_permutation(z[..., :a])
    order = jnp.concatenate([jnp.broadcast_to(jnp.arange(a), (b, a)), a + perm], axis=-1)
    log_w = jnp.zeros((b, self.channels), jnp.float32).at[:, a:].set(candidate_log_w)
    return assignment_from_order(order, self.num_kept, log_w)

  def diagnostics(self, z: Array) -> dict[str, Array]:
    scores, _, perm, kept, _ = self._shuffle(z)
    identity = jnp.arange(perm.shape[-1])
    stay = self.num_kept - self.anchor_width
    stays = jax.nn.one_hot(perm[:, :stay], perm.shape[-1]).sum(axis=1)
    return {
        "weight_entropy": jnp.mean(categorical_entropy(scores)),
        "non_identity_fraction": jnp.mean(jnp.any(perm != identity, axis=-1)),
        "stay_frequency": jnp.mean(stays, axis=0),
        "factored_entropy": self.factored_entropy(kept),
    }


class TopPrior(nn.Module):
  """Learned Gaussian prior of the last level's latent: per-position mean and log std (Glow's
  `learntop`), both zero at init, i.e. N(0, 1)."""

  shape: tuple[int, int, int]

  def setup(self) -> None:
    self.mean = self.param("mean", nn.initializers.zeros, self.shape)
    self.log_std = self.param("log_std", nn.initializers.zeros, self.shape)

  @layer_scope(TOP_PRIOR_SCOPE)
  def params_for(self, batch: int) -> tuple[Array, Array]:
    shape = (batch, *self.shape)
    return jnp.broadcast_to(self.mean, shape), jnp.broadcast_to(self.log_std, shape)

  @layer_scope(TOP_PRIOR_SCOPE)
  def log_prob(self, z: Array) -> Array:
    check_image_batch(z, "TopPrior", self.shape[-1])
    return gaussian_log_prob(z, *self.params_for(z.shape[0]))
