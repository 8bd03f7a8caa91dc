"""PNG grids of samples drawn at each temperature (`samples/temperature_<t>.png`), also in
TensorBoard as images `samples/temperature_<t>`, and next to them the run's bits/dim curves
(`samples/bpd_curves.png`); written through `etils.epath`, so the workdir may be a bucket
(`gs://...`).

A sample whose decoded values are not finite (a diverged or badly trained model) cannot be
quantized: such values are counted, reported (a warning, and TensorBoard's
`samples/nonfinite_values/temperature_<t>`) and drawn in `NONFINITE_COLOUR`, not as the black
pixels quantizing NaN would give.
"""


from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from eiw_flow_jax.model.flow import Flow
from eiw_flow_jax.training import reporting
from eiw_flow_jax.training.sharding import mesh_platform
from eiw_flow_jax.workdir import storage

SAMPLES_DIR = "samples"
NONFINITE_COLOUR = (255, 0, 255)  # magenta: a pixel with a decoded value that is not finite


def image_grid(
    images: np.ndarray, *, max_value: int, pad: int = 1, marked: np.ndarray | None = None
) -> np.ndarray:
  """(N, H, W, C) integer images in [0, max_value] -> one 8-bit grid image (rows, cols, C).

  `marked` (N, H, W) bool: pixels drawn in NONFINITE_COLOUR (the grid is then RGB).
  """
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  scaled = np.clip(images.astype(np.float32) * (255.0 / max_value), 0, 255).astype(np.uint8)
  if marked is not None and marked.any():
    scaled = np.broadcast_to(scaled, (n, h, w, 3)).copy() if c == 1 else scaled.copy()
    scaled[marked] = NONFINITE_COLOUR
    c = 3
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for index in range(n):
    r, q = divmod(index, cols)
    top, left = pad + r * (h + pad), pad + q * (w + pad)
    grid[top : top + h, left : left + w] = scaled[index]
  return grid


def enlarge(grid: np.ndarray, *, min_size: int = 256) -> np.ndarray:
  """Nearest-neighbour enlargement so tiny images stay visible (longest side >= min_size)."""
  factor = max(1, math.ceil(min_size / max(grid.shape[:2])))
  return np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1)


def save_png(grid: np.ndarray, path: str, *, min_size: int = 256) -> None:
  """Writes a grid with Pillow, enlarged so tiny images stay visible; `path` may be a URL."""
  from PIL import Image

  grid = enlarge(grid, min_size=min_size)
  image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  file = storage.path(path)
  with storage.writing("a sample grid", file), file.open("wb") as f:
    image.save(f, format="PNG")


@functools.lru_cache(maxsize=8)
def _sample_fn(flow: Flow, mesh: Mesh, num: int):
  """Jitted (variables, rng, temperature) -> (uint8 images, mask of their decoded values that
  are not finite)."""
  flow = flow.for_platform(mesh_platform(mesh))

  def sample(variables, rng, temperature):
    y, _ = flow.sample_continuous(variables, rng, num, temperature)
    return flow.quantize(y), ~jnp.isfinite(y)

  return jax.jit(sample, out_shardings=NamedSharding(mesh, P()))


def write_sample_grids(
    config: ml_collections.ConfigDict,
    workdir: str,
    flow: Flow,
    variables: Any,
    mesh: Mesh,
    rng: jax.Array,
    *,
    step: int | None = None,
) -> list[str]:
  """One PNG grid per temperature in config.sample.temperatures, in `<workdir>/samples/`, and
  the bits/dim curves of the workdir's events (`reporting.write_bpd_curves`) next to them.

  With `step`, the grids also go to TensorBoard as images `samples/temperature_<t>`, with the
  count of decoded values that are not finite as `samples/nonfinite_values/temperature_<t>`.
  Returns the grids' paths.
  """
  out_dir = storage.path(workdir, SAMPLES_DIR)
  fn = _sample_fn(flow, mesh, config.sample.num_samples)
  # Pixel value shown as white; by default the top of the model's n_bits range.
  max_value = config.sample.display_max or 2**config.model.n_bits - 1
  paths, grids, counts = [], {}, {}
  for index, temperature in enumerate(config.sample.temperatures):
    images, nonfinite = (np.asarray(a) for a in jax.device_get(
        fn(variables, jax.random.fold_in(rng, index), temperature)))
    name = f"temperature_{float(temperature):.2f}"
    path = os.fspath(out_dir / f"{name}.png")
    counts[f"samples/nonfinite_values/{name}"] = int(nonfinite.sum())
    marked = nonfinite.any(axis=-1)  # the pixels holding them
    if jax.process_index() == 0:
      with storage.writing("sample grids", out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
      grid = image_grid(images, max_value=max_value, marked=marked)
      save_png(grid, path)
      grids[f"samples/{name}"] = enlarge(grid, min_size=128)
      if marked.any():
        logging.warning(
            "Samples at temperature %s: %d of %d decoded values are not finite (NaN or inf; "
            "the model may have diverged); their %d pixels are drawn in magenta in %s.",
            temperature, int(nonfinite.sum()), nonfinite.size, int(marked.sum()), path)
    paths.append(path)
  if step is not None:
    reporting.log_to_tensorboard(workdir, int(step), counts, grids, ".samples")
  if jax.process_index() == 0:
    curves = os.fspath(out_dir / reporting.BPD_CURVES_FILE)
    if reporting.write_bpd_curves(workdir, curves):
      logging.info("Wrote the bits/dim curves to %s", curves)
  logging.info("Wrote %d sample grids to %s", len(paths), out_dir)
  return paths


def check_writable(workdir: str, mode: str) -> None:
  """storage.StorageError now if `--mode=<mode>` could not write its output into `workdir`.

  eval writes results.json (and TensorBoard events), sample the PNGs under samples/: a
  read-only workdir must fail before the evaluation runs, not after. Process 0 writes the
  output, so it probes (a file created and removed); the others learn the verdict.
  """
  target = storage.path(workdir, SAMPLES_DIR) if mode == "sample" else storage.path(workdir)
  what = "sample grids" if mode == "sample" else "results"
  error = None
  # No workdir: nothing to evaluate either, and restoring says so; do not create it here.
  if jax.process_index() == 0 and storage.path(workdir).exists():
    probe = target / f".write_test-{os.getpid()}"
    try:
      with storage.writing(what, target):
        target.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except storage.StorageError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if jax.process_index() != 0 and int(failed):
      raise storage.StorageError(f"Process 0 cannot write {what} to {target}; see its log.")
  if error is not None:
    raise error
