"""The density of a 4-dimensional flow built from the real modules integrates to 1.

A 1x1x4 input goes through ActNorm, the 1x1 convolution and an affine coupling (one FlowStep),
then a split (vanilla or EIW) with its conditional prior, and the 2 kept channels meet the top
prior. With every parameter non-zero (random Solver, random theta), grid quadrature over a box
that holds nearly all the mass must give 1 within 2%. A Shuffle that chose its permutation from
all of z (not invertible) fails this check: the negative control below shows the test can fail.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import perturb

from eiw_flow_jax.model.bijectors import FlowStep
from eiw_flow_jax.model.splits import EIWGlobalSplit, EIWPerExampleSplit, TopPrior, VanillaSplit

HALF_WIDTH = 8.0
POINTS = 40  # per axis: 40**4 = 2.6M density evaluations
PERTURBATION = 0.08  # every parameter non-zero, yet tails stay inside the box


class NonBijectiveShuffle(EIWPerExampleSplit):
  """A wrong Shuffle: weights and order computed from all of z, which the inverse cannot see."""

  def split(self, z):
    log_w = self.beta * jnp.tanh(z.mean(axis=(1, 2))[..., 1:] * 3.0 / self.beta)
    perm = jnp.argsort(-log_w, axis=-1, stable=True)
    shuffled = self._permute(z[..., 1:], perm)
    kept = jnp.concatenate([z[..., :1], shuffled[..., :1]], axis=-1)
    return self._finish(kept, shuffled[..., 1:], jnp.zeros(z.shape[0]), {})


SPLITS = {
    "vanilla": lambda: VanillaSplit(4, name="split"),
    "eiw_global": lambda: EIWGlobalSplit(4, reduction=2, name="split"),
    "eiw_per_example": lambda: EIWPerExampleSplit(4, anchor_width=1, solver_width=8, name="split"),
    "eiw_per_example_vp": lambda: EIWPerExampleSplit(
        4, anchor_width=1, solver_width=8, volume_preserving=True, name="split"
    ),
    "non_bijective_control": lambda: NonBijectiveShuffle(4, anchor_width=1, name="split"),
}


class TinyFlow(nn.Module):
  split_name: str

  def setup(self):
    self.step = FlowStep(hidden=8, coupling="affine")
    self.split = SPLITS[self.split_name]()
    self.top = TopPrior((1, 1, 2))

  def __call__(self, z):
    h, log_det = self.step(z)
    out = self.split.split(h)
    return log_det + out.log_det + out.log_prior + self.top.log_prob(out.kept)


def _integral(split_name: str) -> float:
  model = TinyFlow(split_name)
  data = jax.random.normal(jax.random.PRNGKey(0), (256, 1, 1, 4)) * 1.3 + 0.2
  variables = model.init({"params": jax.random.PRNGKey(1)}, data)
  variables = perturb(variables, jax.random.PRNGKey(2), scale=PERTURBATION)
  params = variables["params"]
  if "solver_out" in params["split"]:  # strong, non-zero weights so the order really varies
    kernel = params["split"]["solver_out"]["kernel"]
    params["split"]["solver_out"]["kernel"] = jax.random.normal(jax.random.PRNGKey(3), kernel.shape)
  if "theta" in params["split"]:
    params["split"]["theta"] = jnp.array([0.3, -0.2, 0.9, 0.1])
  # Kept channels far from the dropped ones' N(0, 1)-like prior: were the density the same for
  # every channel a Shuffle may move, a permutation chosen from all of z would still integrate
  # to 1 (each output has as many preimages on average), and the negative control would pass or
  # fail with the random draw (checked: 0.78-1.00 over six draws with a near-symmetric prior).
  params["top"] = {"mean": jnp.array([0.0, 1.5]).reshape(1, 1, 2),
                   "log_std": jnp.log(jnp.array([1.0, 0.5])).reshape(1, 1, 2)}

  axis = np.linspace(-HALF_WIDTH, HALF_WIDTH, POINTS + 1)
  centres = (axis[1:] + axis[:-1]) / 2  # midpoint rule
  cell = (axis[1] - axis[0]) ** 4
  grid = np.stack(np.meshgrid(centres, centres, centres, centres, indexing="ij"), -1)
  points = jnp.asarray(grid.reshape(-1, 1, 1, 4), jnp.float32)
  density = jax.jit(lambda p: jnp.exp(model.apply(variables, p)))
  chunk = POINTS**3
  total = sum(float(jnp.sum(density(points[i : i + chunk]))) for i in range(0, len(points), chunk))
  return total * cell


@pytest.mark.parametrize("split_name", [s for s in SPLITS if s != "non_bijective_control"])
def test_density_integrates_to_one(split_name):
  assert _integral(split_name) == pytest.approx(1.0, abs=0.02)


def test_non_bijective_shuffle_is_caught():
  assert abs(_integral("non_bijective_control") - 1.0) > 0.05
