"""Test bits/dim over the whole eval split, results.json, and PNG grids of samples.

Every function takes the variables to use (the training loop passes the EMA parameters) and the
device mesh; eval batches are sharded over the mesh axis "data" like training batches. The eval
split is padded to whole batches with masked-out examples, so every example is counted once.

Files (results.json, samples/*.png, TensorBoard events) go through `etils.epath`, so the workdir
may be a bucket (`gs://...`). TensorBoard gets the final test bpd as `eval/bpd` and each sample
grid as an image `samples/temperature_<t>`.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import math
import os
import subprocess
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from eiw_flow_jax.data import pipeline, registry
from eiw_flow_jax.model.flow import Flow
from eiw_flow_jax.training import reporting
from eiw_flow_jax.training.compiler_options import CompilerOptions, compiler_options, jit_options
from eiw_flow_jax.training.sharding import mesh_platform
from eiw_flow_jax.training.train_state import IWBO_BATCH_OFFSET
from eiw_flow_jax.workdir import config_history, storage

RESULTS_FILE = "results.json"
# Training wall time summed over every (resumed) training run of a workdir.
TRAIN_TIME_FILE = "train_time.json"


def _global(local: np.ndarray, mesh: Mesh) -> jax.Array:
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)


def _masked_sum_step(
    per_example_bpd: Callable[[Any, jax.Array, jax.Array], jax.Array], mesh: Mesh,
    options: CompilerOptions,
) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """(variables, uint8 batch, bool mask, rng) -> (sum of the unmasked examples'
  `per_example_bpd`, their count), jitted with `options` and replicated over `mesh`."""

  def fn(variables, images, mask, rng):
    bpd = per_example_bpd(variables, images, rng)
    # where, not multiply: a padding example's bpd may be anything, even NaN.
    return jnp.sum(jnp.where(mask, bpd, 0.0)), jnp.sum(mask.astype(jnp.int32))

  return jax.jit(fn, out_shardings=NamedSharding(mesh, P()), compiler_options=jit_options(options))


@functools.lru_cache(maxsize=8)
def bpd_sum_step(flow: Flow, mesh: Mesh,
                 options: CompilerOptions = ()) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """The eval step, jitted with `options` (`compiler_options.compiler_options(config)`):
  (variables, uint8 batch, bool mask, rng) -> (sum of the unmasked examples' bpd, their count),
  replicated over `mesh`. The mask hides the padding of the split's last batch."""
  return _masked_sum_step(flow.for_platform(mesh_platform(mesh)).bpd, mesh, options)


def evaluate_bpd(
    config: ml_collections.ConfigDict,
    flow: Flow,
    variables: Any,
    mesh: Mesh,
    rng: jax.Array,
) -> tuple[float, int]:
  """(mean test bpd, number of examples) over the whole eval split; one noise draw each."""
  step = bpd_sum_step(flow, mesh, compiler_options(config))
  return _mean_over_eval_split(config, step, variables, mesh, rng, 0)


def _mean_over_eval_split(
    config: ml_collections.ConfigDict, sum_fn: Any, variables: Any, mesh: Mesh, rng: jax.Array,
    rng_offset: int,
) -> tuple[float, int]:
  """(mean of `sum_fn`'s per-example values, examples) over the eval split; the per-batch sums
  stay on device until the end (one transfer), and are added in float64."""
  sums, counts = [], []
  for index, batch in enumerate(pipeline.eval_batches(config)):
    total, count = sum_fn(
        variables, _global(batch["image"], mesh), _global(batch["mask"], mesh),
        jax.random.fold_in(rng, rng_offset + index),
    )
    sums.append(total)
    counts.append(count)
  sums, counts = jax.device_get((sums, counts))
  count = int(np.sum(counts))
  mean = float(np.sum(np.asarray(sums, np.float64)) / count) if count else math.nan
  return mean, count


@functools.lru_cache(maxsize=8)
def _iwbo_sum_fn(flow: Flow, mesh: Mesh, k: int, chunk: int, options: CompilerOptions):
  flow = flow.for_platform(mesh_platform(mesh))
  return _masked_sum_step(
      lambda variables, images, rng: flow.iwbo_bpd(variables, images, rng, k, chunk), mesh,
      options)


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
  fn = _iwbo_sum_fn(flow, mesh, k, min(chunk, k), compiler_options(config))
  # Other noise than evaluate_bpd's (offset keys), so the two bounds are independent draws.
  return _mean_over_eval_split(config, fn, variables, mesh, rng, IWBO_BATCH_OFFSET)


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


def num_parameters(variables: Any) -> int:
  """Number of trained scalars (the `params` collection; fixed constants are not counted)."""
  return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(variables["params"])))


def read_train_time(workdir: str) -> float | None:
  """Training wall time in seconds recorded in the workdir, or None if none was recorded."""
  path = storage.path(workdir, TRAIN_TIME_FILE)
  try:
    return float(json.loads(path.read_text())["wall_time_s"])
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, TypeError) as e:
    logging.warning("Ignoring unreadable %s: %s", path, e)
    return None


def record_train_time(workdir: str, seconds: float, step: int) -> float:
  """Adds one training run's wall time (process 0 writes); returns the total over all runs.

  A run that resumes adds to what earlier runs recorded, so the total is the time spent
  training this workdir to `step` (a run killed before it finishes records nothing).
  """
  total = (read_train_time(workdir) or 0.0) + float(seconds)
  if jax.process_index() == 0:
    path = storage.path(workdir, TRAIN_TIME_FILE)
    with storage.writing("the training time record", path):
      path.write_text(json.dumps({"wall_time_s": total, "step": int(step)}))
  return total


def evaluate_and_write(
    config: ml_collections.ConfigDict,
    workdir: str,
    flow: Flow,
    variables: Any,
    mesh: Mesh,
    rng: jax.Array,
    *,
    info: registry.DatasetInfo,
    step: int,
) -> dict[str, Any]:
  """Test bpd over the whole eval split, written to `<workdir>/results.json` (process 0).

  Besides bpd and the data, results.json names the run for `eiw_flow_jax.commands.table`: backbone,
  split and EIW mode, step, devices, `num_parameters`, the training `wall_time_s` recorded in
  the workdir by `train_loop.train` (summed over resumed runs; null when the workdir has none)
  and the `config_changes` resumes made (`workdir.config_history`).
  """
  bpd, count = evaluate_bpd(config, flow, variables, mesh, rng)
  if count != info.num_eval:
    raise RuntimeError(f"Evaluated {count} examples but the eval split has {info.num_eval}.")
  results = {
      "bpd": bpd,
      "dataset": config.dataset.name,
      "data_version": info.data_version,  # registry.DATA_VERSIONS: which preparation of the data
      "eval_split": registry.resolve_split(config, "eval"),
      "num_train": info.num_train,
      "num_eval": info.num_eval,
      "num_evaluated": count,
      "step": int(step),
      "parameters": "ema" if config.ema_decay > 0 else "raw",
      "n_bits": config.model.n_bits,
      "backbone": config.model.backbone,
      "split": config.model.split,
      "eiw_mode": config.model.eiw.mode,
      "image_shape": list(config.model.image_shape),
      "num_parameters": num_parameters(variables),
      "wall_time_s": read_train_time(workdir),  # training time; None if not recorded
      # What resumes changed on the way ({"step", "field", "old", "new", "time"}, oldest first).
      "config_changes": config_history.read(workdir),
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
    k = int(config.eval.iwbo_samples)
    if k > 0:
      iwbo, iwbo_count = evaluate_iwbo(config, flow, variables, mesh, rng)
      if iwbo_count != count:
        raise RuntimeError(f"IWBO evaluated {iwbo_count} examples, ELBO {count}.")
      results["iwbo_bpd"], results["iwbo_k"] = iwbo, k
      logging.info("Test IWBO (k=%d) %.4f bpd", k, iwbo)
  if jax.process_index() == 0:
    path = storage.path(workdir, RESULTS_FILE)
    storage.write_text(path, json.dumps(results, indent=2), "results")
    reporting.log_to_tensorboard(workdir, int(step), {"eval/bpd": bpd}, {}, ".eval")
    logging.info("Test bpd %.4f over %d examples at step %d -> %s", bpd, count, step, path)
  return results

