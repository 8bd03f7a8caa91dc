"""Test bits/dim over the whole eval split, results.json, and PNG grids of samples.

Every function takes the variables to use (the training loop passes the EMA parameters) and the
device mesh; eval batches are sharded over the mesh axis "data" like training batches. The eval
split is padded to whole batches with masked-out examples, so every example is counted once.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import math
import os
import subprocess
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from eiw_flow_jax import data
from eiw_flow_jax.model import Flow

# Offsets folded into the seed for eval noise and sampling (train.py owns the others).
EVAL_STREAM, SAMPLE_STREAM = 3, 4
RESULTS_FILE = "results.json"
SAMPLES_DIR = "samples"


def _global(local: np.ndarray, mesh: Mesh) -> jax.Array:
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)


@functools.lru_cache(maxsize=8)
def _bpd_sum_fn(flow: Flow, mesh: Mesh):
  def fn(variables, images, mask, rng):
    bpd = flow.bpd(variables, images, rng)
    # where, not multiply: a padding example's bpd may be anything, even NaN.
    return jnp.sum(jnp.where(mask, bpd, 0.0)), jnp.sum(mask.astype(jnp.int32))

  return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))


def evaluate_bpd(
    config: ml_collections.ConfigDict,
    flow: Flow,
    variables: Any,
    mesh: Mesh,
    rng: jax.Array,
) -> tuple[float, int]:
  """(mean test bpd, number of examples) over the whole eval split; one noise draw each."""
  fn = _bpd_sum_fn(flow, mesh)
  sums, counts = [], []
  for index, batch in enumerate(data.eval_batches(config)):
    total, count = fn(
        variables, _global(batch["image"], mesh), _global(batch["mask"], mesh),
        jax.random.fold_in(rng, index),
    )
    sums.append(total)
    counts.append(count)
  sums, counts = jax.device_get((sums, counts))
  count = int(np.sum(counts))
  bpd = float(np.sum(np.asarray(sums, np.float64)) / count) if count else math.nan
  return bpd, count


@functools.lru_cache(maxsize=8)
def _iwbo_sum_fn(flow: Flow, mesh: Mesh, k: int, chunk: int):
  def fn(variables, images, mask, rng):
    bpd = flow.iwbo_bpd(variables, images, rng, k, chunk)
    return jnp.sum(jnp.where(mask, bpd, 0.0)), jnp.sum(mask.astype(jnp.int32))

  return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))


def evaluate_iwbo(
    config: ml_collections.ConfigDict,
    flow: Flow,
    variables: Any,
    mesh: Mesh,
    rng: jax.Array,
) -> tuple[float, int]:
  """(mean test IWBO bpd with k = config.eval.iwbo_samples, examples) for DenseFlow.

  Each eval batch of B examples runs k / config.eval.iwbo_chunk passes of B * iwbo_chunk
  examples (a `lax.scan` with a running logsumexp), so k = 1000 fits in memory; lower
  `eval_batch_size` or `eval.iwbo_chunk` if it does not.
  """
  k, chunk = int(config.eval.iwbo_samples), int(config.eval.iwbo_chunk)
  fn = _iwbo_sum_fn(flow, mesh, k, min(chunk, k))
  sums, counts = [], []
  for index, batch in enumerate(data.eval_batches(config)):
    total, count = fn(
        variables, _global(batch["image"], mesh), _global(batch["mask"], mesh),
        jax.random.fold_in(rng, 1_000_003 + index),
    )
    sums.append(total)
    counts.append(count)
  sums, counts = jax.device_get((sums, counts))
  count = int(np.sum(counts))
  bpd = float(np.sum(np.asarray(sums, np.float64)) / count) if count else math.nan
  return bpd, count


def config_hash(config: ml_collections.ConfigDict) -> str:
  """Stable short hash of every config field."""
  return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


def git_commit() -> str:
  """The commit of the checkout holding this package, or "unknown"."""
  try:
    out = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=os.path.dirname(os.path.abspath(__file__)),
        capture_output=True, text=True, timeout=10, check=True,
    )
    return out.stdout.strip() or "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def evaluate_and_write(
    config: ml_collections.ConfigDict,
    workdir: str,
    flow: Flow,
    variables: Any,
    mesh: Mesh,
    rng: jax.Array,
    *,
    info: data.DatasetInfo,
    step: int,
) -> dict[str, Any]:
  """Test bpd over the whole eval split, written to `<workdir>/results.json` (process 0)."""
  bpd, count = evaluate_bpd(config, flow, variables, mesh, rng)
  if count != info.num_eval:
    raise RuntimeError(f"Evaluated {count} examples but the eval split has {info.num_eval}.")
  results = {
      "bpd": bpd,
      "dataset": config.dataset.name,
      "eval_split": data.resolve_split(config, "eval"),
      "num_train": info.num_train,
      "num_eval": info.num_eval,
      "num_evaluated": count,
      "step": int(step),
      "parameters": "ema" if config.ema_decay > 0 else "raw",
      "n_bits": config.model.n_bits,
      "split": config.model.split,
      "eiw_mode": config.model.eiw.mode,
      "backbone": config.model.get("backbone", "glow"),
      "config_hash": config_hash(config),
      "git_commit": git_commit(),
      "device_kind": jax.devices()[0].device_kind,
      "device_count": jax.device_count(),
      "process_count": jax.process_count(),
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if results["backbone"] == "denseflow":
    # DenseFlow's objective is a bound: "bpd" is the ELBO (one draw of all noise per example);
    # the importance-weighted bound with k samples is the number the papers report.
    results["elbo_bpd"] = bpd
    k = int(config.get("eval", {}).get("iwbo_samples", 0))
    if k > 0:
      iwbo, iwbo_count = evaluate_iwbo(config, flow, variables, mesh, rng)
      if iwbo_count != count:
        raise RuntimeError(f"IWBO evaluated {iwbo_count} examples, ELBO {count}.")
      results["iwbo_bpd"], results["iwbo_k"] = iwbo, k
      logging.info("Test IWBO (k=%d) %.4f bpd", k, iwbo)
  if jax.process_index() == 0:
    path = os.path.join(workdir, RESULTS_FILE)
    with open(path, "w") as f:
      json.dump(results, f, indent=2)
    logging.info("Test bpd %.4f over %d examples at step %d -> %s", bpd, count, step, path)
  return results


def image_grid(images: np.ndarray, *, max_value: int, pad: int = 1) -> np.ndarray:
  """(N, H, W, C) integer images in [0, max_value] -> one 8-bit grid image (rows, cols, C)."""
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  scaled = np.clip(images.astype(np.float32) * (255.0 / max_value), 0, 255).astype(np.uint8)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for index in range(n):
    r, q = divmod(index, cols)
    top, left = pad + r * (h + pad), pad + q * (w + pad)
    grid[top : top + h, left : left + w] = scaled[index]
  return grid


def save_png(grid: np.ndarray, path: str, *, min_size: int = 256) -> None:
  """Writes a grid with Pillow, enlarged (nearest neighbour) so tiny images stay visible."""
  from PIL import Image

  image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  factor = max(1, math.ceil(min_size / max(image.size)))
  if factor > 1:
    image = image.resize((image.size[0] * factor, image.size[1] * factor), Image.NEAREST)
  image.save(path)


@functools.lru_cache(maxsize=8)
def _sample_fn(flow: Flow, mesh: Mesh, num: int):
  return jax.jit(
      lambda v, rng, t: flow.sample(v, rng, num, t), out_shardings=NamedSharding(mesh, P())
  )


def write_sample_grids(
    config: ml_collections.ConfigDict,
    workdir: str,
    flow: Flow,
    variables: Any,
    mesh: Mesh,
    rng: jax.Array,
) -> list[str]:
  """One PNG grid per temperature in config.sample.temperatures, in `<workdir>/samples/`."""
  out_dir = os.path.join(workdir, SAMPLES_DIR)
  fn = _sample_fn(flow, mesh, config.sample.num_samples)
  # Pixel value shown as white; by default the top of the model's n_bits range.
  max_value = config.sample.get("display_max", 0) or 2**config.model.n_bits - 1
  paths = []
  for index, temperature in enumerate(config.sample.temperatures):
    images = np.asarray(jax.device_get(fn(variables, jax.random.fold_in(rng, index), temperature)))
    path = os.path.join(out_dir, f"temperature_{float(temperature):.2f}.png")
    if jax.process_index() == 0:
      os.makedirs(out_dir, exist_ok=True)
      save_png(image_grid(images, max_value=max_value), path)
    paths.append(path)
  logging.info("Wrote %d sample grids to %s", len(paths), out_dir)
  return paths
