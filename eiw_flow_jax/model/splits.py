"""Factoring out latents: the vanilla split, the two EIW Shuffle-then-split variants, the top prior.

A split takes z (B, H, W, C) at the end of a level and returns `SplitOutput`: the channels that
`kept` going up the flow, the `factored` latent that leaves, the log-det of any invertible map
applied on the way (only `per_example` has one), the factored latent's log-density under its
conditional Gaussian prior N(mu(kept), sigma(kept)), and per-example auxiliary terms (the EIW
regulariser). `merge` is the exact inverse of the bijective part; `prior` gives (mu, log sigma)
for sampling. The formulation is fixed in shared/design/EIW_FLOW.md.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from eiw_flow_jax.model.bijectors import ZeroConv, check_image_batch, sum_except_batch

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


class VanillaSplit(_SplitBase):
  """Static split: the first C/2 channels stay, the rest leave."""

  def setup(self) -> None:
    self._check_channels()
    self.prior_net = self._prior_net()

  def split(self, z: Array) -> SplitOutput:
    check_image_batch(z, "VanillaSplit", self.channels)
    zero = jnp.zeros((z.shape[0],), z.dtype)
    return self._finish(z[..., : self.num_kept], z[..., self.num_kept :], zero, {})

  def merge(self, kept: Array, factored: Array) -> tuple[Array, Array]:
    return jnp.concatenate([kept, factored], axis=-1), jnp.zeros((kept.shape[0],), kept.dtype)

  def diagnostics(self, z: Array) -> dict[str, Array]:
    return {"factored_entropy": self.factored_entropy(z[..., : self.num_kept])}


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
    return jnp.argsort(-self.theta, stable=True)

  def solver_log_weights(self, z: Array) -> Array:
    """log s(z), (B, C): a per-example distribution over channels, in the original order."""
    pooled = jnp.mean(z, axis=(1, 2))
    return jax.nn.log_softmax(self.solver_out(nn.relu(self.solver_hidden(pooled))), axis=-1)

  def regularizer_per_example(self, z: Array) -> Array:
    log_g = jax.nn.log_softmax(self.theta)
    log_s = self.solver_log_weights(z)
    if self.regularizer == "kl":
      return jnp.sum(jnp.exp(log_g) * (log_g - log_s), axis=-1)
    # The authors' literal form: torch's KLDivLoss fed probabilities instead of log-probabilities.
    return jnp.sum(jnp.exp(log_g) * (log_g - jnp.exp(log_s)), axis=-1)

  def split(self, z: Array) -> SplitOutput:
    check_image_batch(z, "EIWGlobalSplit", self.channels)
    shuffled = jnp.take(z, self.permutation(), axis=-1)
    zero = jnp.zeros((z.shape[0],), z.dtype)
    aux = {"regularizer": self.regularizer_per_example(z)}
    return self._finish(
        shuffled[..., : self.num_kept], shuffled[..., self.num_kept :], zero, aux
    )

  def merge(self, kept: Array, factored: Array) -> tuple[Array, Array]:
    shuffled = jnp.concatenate([kept, factored], axis=-1)
    inverse_perm = jnp.argsort(self.permutation())
    return jnp.take(shuffled, inverse_perm, axis=-1), jnp.zeros((kept.shape[0],), kept.dtype)

  def diagnostics(self, z: Array) -> dict[str, Array]:
    perm = self.permutation()
    mean_s = jnp.mean(jnp.exp(self.solver_log_weights(z)), axis=0)
    kept = jnp.take(z, perm, axis=-1)[..., : self.num_kept]
    return {
        "g_entropy": categorical_entropy(self.theta),
        "mean_s_entropy": -jnp.sum(mean_s * jnp.log(mean_s)),
        "regularizer": jnp.mean(self.regularizer_per_example(z)),
        "permutation": perm,
        "kept_channels": perm[: self.num_kept],
        "factored_entropy": self.factored_entropy(kept),
    }


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

  def split(self, z: Array) -> SplitOutput:
    check_image_batch(z, "EIWPerExampleSplit", self.channels)
    scores, log_w, _, kept, factored = self._shuffle(z)
    log_det = z.shape[1] * z.shape[2] * jnp.sum(log_w, axis=-1)
    aux = {"weight_entropy": categorical_entropy(scores)}
    return self._finish(kept, factored, log_det, aux)

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

  def params_for(self, batch: int) -> tuple[Array, Array]:
    shape = (batch, *self.shape)
    return jnp.broadcast_to(self.mean, shape), jnp.broadcast_to(self.log_std, shape)

  def log_prob(self, z: Array) -> Array:
    check_image_batch(z, "TopPrior", self.shape[-1])
    return gaussian_log_prob(z, *self.params_for(z.shape[0]))
