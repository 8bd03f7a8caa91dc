"""Plots and tables from a sweep of training runs (e.g. bench/ablation_runs.sh): reads each run's
TensorBoard events and results.json, writes PNG figures and prints a markdown summary.

  python bench/plot_runs.py RUNS_DIR --out docs/figures --prefix mnist_idx [--table]

RUNS_DIR holds VARIANT/seedS/ workdirs. Figures:
  PREFIX_test_bpd.png           test bpd (EMA parameters) vs step, mean over seeds with the
                                min..max band; the last point is results.json's final bpd.
  PREFIX_shuffle_level{L}.png   per split level, over training: entropy per dimension of the
                                factored latents' prior, the Shuffle's weight entropy (per_example:
                                H(softmax of the Solver's scores); global: H(g) and H(mean s)),
                                the fraction of non-identity permutations, and how often each
                                channel stays (per_example: fraction of examples; global: 0/1).
`--table` prints mean ± sd of the final test bpd, parameter counts and paired differences by
seed. The events are read by `eiw_flow_jax.training.reporting.read_events` (no TensorFlow or
tensorboard needed).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import re
import sys
from collections.abc import Sequence

import numpy as np

from eiw_flow_jax.training.reporting import read_events

# Plot order and colours; variants not listed are appended in name order.
VARIANT_ORDER = (
    "vanilla", "global", "global_frozen", "per_example", "per_example_weights_only",
    "per_example_permutation_only",
)


class Run:
  """One workdir: its events, final results and config."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.scalars, self.texts = read_events(workdir)
    self.results = _load_json(os.path.join(workdir, "results.json"))
    self.config = _load_json(os.path.join(workdir, "config.json"))

  def series(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
    points = self.scalars.get(tag, [])
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])

  def test_bpd(self) -> tuple[np.ndarray, np.ndarray]:
    steps, values = self.series("eval/bpd")
    if self.results:
      steps = np.append(steps, self.results["step"])
      values = np.append(values, self.results["bpd"])
    return steps, values

  def global_permutation_stats(self, level: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`global`: non-identity indicator and per-channel stay indicators from the logged text."""
    perms = self.texts.get(f"shuffle/level{level}/permutation", [])
    if not perms:
      return {}
    steps = np.array([s for s, _ in perms])
    table = np.array([[int(t) for t in text.split()] for _, text in perms])
    channels = table.shape[1]
    out = {"non_identity_fraction": (steps, np.any(table != np.arange(channels), axis=1) * 1.0)}
    kept = table[:, : channels // 2]
    for c in range(channels):
      out[f"stay_frequency/{c}"] = (steps, np.any(kept == c, axis=1) * 1.0)
    return out


def _load_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def load_runs(root: str) -> dict[str, dict[int, Run]]:
  """variant -> seed -> Run for every ROOT/VARIANT/seedS holding an events file."""
  runs: dict[str, dict[int, Run]] = collections.defaultdict(dict)
  for workdir in sorted(glob.glob(os.path.join(root, "*", "seed*"))):
    match = re.fullmatch(r"seed(\d+)", os.path.basename(workdir))
    if match and glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
      runs[os.path.basename(os.path.dirname(workdir))][int(match.group(1))] = Run(workdir)
  if not runs:
    raise FileNotFoundError(f"No runs (VARIANT/seedS/ with TensorBoard events) under {root!r}.")
  order = {name: i for i, name in enumerate(VARIANT_ORDER)}
  return dict(sorted(runs.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def _colour(variants: Sequence[str], variant: str):
  import matplotlib.pyplot as plt

  return plt.get_cmap("tab10")(list(variants).index(variant) % 10)


def _mean_band(curves: list[tuple[np.ndarray, np.ndarray]]):
  """Mean, min and max over seeds at the steps that every seed logged."""
  if not curves:
    return None
  common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
  if not common:
    return None
  stacked = np.stack([np.array([dict(zip(s.tolist(), v))[t] for t in common]) for s, v in curves])
  return np.array(common), stacked.mean(0), stacked.min(0), stacked.max(0)


def _plot_band(ax, curves, label, colour, style="-") -> None:
  band = _mean_band([c for c in curves if c[0].size])
  if band is None:
    return
  steps, mean, low, high = band
  ax.plot(steps, mean, style, color=colour, label=label, marker="." if steps.size < 12 else None)
  if len(curves) > 1:
    ax.fill_between(steps, low, high, color=colour, alpha=0.15, linewidth=0)


def plot_test_bpd(runs: dict[str, dict[int, Run]], path: str, title: str) -> None:
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  variants = list(runs)
  for variant, by_seed in runs.items():
    curves = [run.test_bpd() for run in by_seed.values()]
    _plot_band(ax, curves, f"{variant} (n={len(curves)})", _colour(variants, variant))
  ax.set_xlabel("training step")
  ax.set_ylabel("test bits/dim (EMA parameters)")
  ax.set_title(f"{title}: test bpd, mean over seeds (band: min..max)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _zoom_to_tail(ax, runs)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _zoom_to_tail(ax, runs) -> None:
  """Keep the y-range on the later evaluations: the first one is often far above the rest."""
  values = [v for by_seed in runs.values() for run in by_seed.values()
            for v in run.test_bpd()[1][1:]]
  if len(values) >= 2:
    low, high = min(values), max(values)
    pad = 0.1 * (high - low + 1e-3)
    ax.set_ylim(low - pad, high + pad)


def _levels(runs: dict[str, dict[int, Run]]) -> list[int]:
  levels = set()
  for by_seed in runs.values():
    for run in by_seed.values():
      for tag in run.scalars:
        match = re.match(r"shuffle/level(\d+)/", tag)
        if match:
          levels.add(int(match.group(1)))
  return sorted(levels)


def plot_shuffle_level(runs: dict[str, dict[int, Run]], level: int, path: str, title: str) -> None:
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 3, figsize=(15, 8))
  (a_fact, a_went, a_nonid), (a_stay_pe, a_stay_gl, a_train) = axes
  variants = list(runs)
  prefix = f"shuffle/level{level}"
  max_entropy = {}
  for variant, by_seed in runs.items():
    colour = _colour(variants, variant)
    rs = list(by_seed.values())
    _plot_band(a_fact, [r.series(f"{prefix}/factored_entropy") for r in rs], variant, colour)
    _plot_band(a_train, [r.series("train/bpd") for r in rs], variant, colour)
    if any(f"{prefix}/weight_entropy" in r.scalars for r in rs):
      _plot_band(a_went, [r.series(f"{prefix}/weight_entropy") for r in rs], variant, colour)
      n = len([t for t in rs[0].scalars if t.startswith(f"{prefix}/stay_frequency/")])
      max_entropy[f"log {n} (candidates)"] = math.log(n) if n else None
    if any(f"{prefix}/g_entropy" in r.scalars for r in rs):
      _plot_band(a_went, [r.series(f"{prefix}/g_entropy") for r in rs], f"{variant}: H(g)", colour)
      _plot_band(a_went, [r.series(f"{prefix}/mean_s_entropy") for r in rs],
                 f"{variant}: H(mean s)", colour, "--")
      n = len(rs[0].texts.get(f"{prefix}/permutation", [(0, "")])[0][1].split())
      max_entropy[f"log {n} (channels)"] = math.log(n) if n else None
    if any(f"{prefix}/non_identity_fraction" in r.scalars for r in rs):
      _plot_band(a_nonid, [r.series(f"{prefix}/non_identity_fraction") for r in rs], variant,
                 colour)
    global_stats = [r.global_permutation_stats(level) for r in rs]
    if all(global_stats):
      _plot_band(a_nonid, [g["non_identity_fraction"] for g in global_stats], variant, colour)
  for label, value in max_entropy.items():
    if value is not None:
      a_went.axhline(value, color="grey", linestyle=":", linewidth=1)
      a_went.annotate(f"max = {label}", (0.01, value), xycoords=("axes fraction", "data"),
                      fontsize=7, va="bottom", color="grey")
  _plot_stays(a_stay_pe, runs, level, "per_example")
  _plot_stays(a_stay_gl, runs, level, "global")
  a_fact.set_title("entropy / dim of the factored latents' prior")
  a_went.set_title("Shuffle weight entropy (nats)")
  a_nonid.set_title("fraction of examples with a non-identity permutation")
  a_train.set_title("train bpd (log interval mean)")
  for ax in axes.flat:
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.suptitle(f"{title}: Shuffle diagnostics at split level {level} (mean over seeds, "
               "band: min..max)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _plot_stays(ax, runs, level: int, variant: str) -> None:
  """How often each channel stays, for one variant (mean over seeds), one line per channel."""
  import matplotlib.pyplot as plt

  by_seed = runs.get(variant, {})
  prefix = f"shuffle/level{level}/stay_frequency/"
  if variant == "global":
    stats = [r.global_permutation_stats(level) for r in by_seed.values()]
    per_channel = collections.defaultdict(list)
    for s in stats:
      for key, curve in s.items():
        if key.startswith("stay_frequency/"):
          per_channel[int(key.split("/")[1])].append(curve)
    what = "global: is channel c kept (0/1; pi over all channels)"
  else:
    per_channel = collections.defaultdict(list)
    for run in by_seed.values():
      for tag in run.scalars:
        if tag.startswith(prefix):
          per_channel[int(tag[len(prefix):])].append(run.series(tag))
    what = "per_example: fraction of examples keeping candidate c"
  cmap = plt.get_cmap("viridis")
  for c, curves in sorted(per_channel.items()):
    band = _mean_band(curves)
    if band is not None:
      ax.plot(band[0], band[1], color=cmap(c / max(1, len(per_channel) - 1)), label=f"c={c}")
  ax.set_title(what if per_channel else f"{variant}: no runs", fontsize=9)
  ax.set_ylim(-0.05, 1.05)


def _count_params(config_dict: dict) -> int:
  """Trainable parameter count of the flow a run's config.json describes (shapes only)."""
  import jax
  import jax.numpy as jnp
  import ml_collections

  import eiw_flow_jax

  config = ml_collections.ConfigDict(config_dict)
  config.model.image_shape = tuple(config.model.image_shape)
  flow = eiw_flow_jax.build_flow(config)
  x = jax.ShapeDtypeStruct((2, *config.model.image_shape), jnp.uint8)
  shapes = jax.eval_shape(flow.init, jax.random.PRNGKey(0), x)
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes["params"]))


def summary_table(runs: dict[str, dict[int, Run]], baseline: str = "vanilla") -> str:
  """Markdown: per variant final test bpd by seed, mean ± sd, parameters; paired differences."""
  finished = {
      v: {s: r.results["bpd"] for s, r in by.items() if r.results} for v, by in runs.items()
  }
  seeds = sorted({s for by in finished.values() for s in by})
  lines = ["| variant | params | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
           "| --- | --- |" + " --- |" * len(seeds) + " --- |"]
  for variant, by_seed in finished.items():
    if not by_seed:
      continue
    any_run = next(r for r in runs[variant].values() if r.config)
    params = _count_params(any_run.config) if any_run.config else "?"
    cells = [f"{by_seed[s]:.4f}" if s in by_seed else "–" for s in seeds]
    lines.append(f"| {variant} | {params:,} | " + " | ".join(cells) + f" | {_mean_sd(by_seed)} |")
  pairs = [(v, baseline) for v in finished if v != baseline]
  pairs += [("per_example", v) for v in finished if v.startswith("per_example_")]
  lines += ["", "Paired differences by seed (A - B, negative: A better):", "",
            "| A - B | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
            "| --- |" + " --- |" * len(seeds) + " --- |"]
  for a, b in pairs:
    shared = {s: finished[a][s] - finished[b][s] for s in seeds
              if s in finished.get(a, {}) and s in finished.get(b, {})}
    if shared:
      cells = [f"{shared[s]:+.4f}" if s in shared else "–" for s in seeds]
      lines.append(f"| {a} - {b} | " + " | ".join(cells) + f" | {_mean_sd(shared, sign=True)} |")
  return "\n".join(lines)


def _mean_sd(values: dict[int, float], sign: bool = False) -> str:
  v = np.array(list(values.values()))
  sd = f"{v.std(ddof=1):.4f}" if v.size > 1 else "n/a"
  return f"{v.mean():+.4f} ± {sd}" if sign else f"{v.mean():.4f} ± {sd}"


def main(argv: Sequence[str] | None = None) -> list[str]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("runs", help="directory of VARIANT/seedS/ workdirs")
  parser.add_argument("--out", default="docs/figures", help="where the PNGs go")
  parser.add_argument("--prefix", default=None, help="file name prefix (default: RUNS basename)")
  parser.add_argument("--title", default=None, help="figure title (default: the prefix)")
  parser.add_argument("--table", action="store_true", help="print the markdown summary")
  args = parser.parse_args(argv)

  import matplotlib

  matplotlib.use("Agg")
  runs = load_runs(args.runs)
  prefix = args.prefix or os.path.basename(os.path.normpath(args.runs))
  title = args.title or prefix
  os.makedirs(args.out, exist_ok=True)
  written = [os.path.join(args.out, f"{prefix}_test_bpd.png")]
  plot_test_bpd(runs, written[0], title)
  for level in _levels(runs):
    written.append(os.path.join(args.out, f"{prefix}_shuffle_level{level}.png"))
    plot_shuffle_level(runs, level, written[-1], title)
  for path in written:
    print(path)
  if args.table:
    print(summary_table(runs))
  return written


if __name__ == "__main__":
  main(sys.argv[1:])
