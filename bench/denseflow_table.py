"""Markdown tables of a bench/denseflow_runs.sh sweep: test ELBO and IWBO bpd per seed.

  python bench/denseflow_table.py /work/runs8/digits

Reads OUT_DIR/{eiw,vanilla}/seedS/results.json (written by `eiw_flow_jax.commands.main`) and prints,
for the ELBO and the IWBO (k from the results), each split's bpd per seed with mean ± sd
(sample sd, n - 1), and the paired EIW - vanilla differences per seed (negative: EIW better).
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np


def load(out_dir: str) -> dict[str, dict[int, dict]]:
  runs: dict[str, dict[int, dict]] = {}
  for path in sorted(glob.glob(os.path.join(out_dir, "*", "seed*", "results.json"))):
    split = os.path.basename(os.path.dirname(os.path.dirname(path)))
    seed = int(os.path.basename(os.path.dirname(path))[len("seed"):])
    with open(path) as f:
      runs.setdefault(split, {})[seed] = json.load(f)
  return runs


def _mean_sd(values: list[float], sign: str = "") -> str:
  if len(values) < 2:
    return f"{values[0]:{sign}.4f}" if values else "-"
  return f"{np.mean(values):{sign}.4f} ± {np.std(values, ddof=1):.4f}"


def tables(runs: dict[str, dict[int, dict]]) -> str:
  if not runs:
    raise SystemExit("no results.json found")
  seeds = sorted({s for by_seed in runs.values() for s in by_seed})
  lines = []
  for key, name in (("elbo_bpd", "ELBO"), ("iwbo_bpd", "IWBO")):
    ks = {r.get("iwbo_k") for by_seed in runs.values() for r in by_seed.values()}
    title = name if key == "elbo_bpd" else f"{name} (k = {', '.join(map(str, sorted(ks)))})"
    lines += [f"Test {title} bpd:", "",
              "| split | params | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
              "| --- | --- | " + " | ".join("---" for _ in seeds) + " | --- |"]
    for split in sorted(runs):
      by_seed = runs[split]
      vals = [by_seed[s][key] if s in by_seed else None for s in seeds]
      params = next(iter(by_seed.values())).get("num_parameters", 0)
      lines.append(f"| {split} | {params:,} | "
                   + " | ".join("-" if v is None else f"{v:.4f}" for v in vals)
                   + f" | {_mean_sd([v for v in vals if v is not None])} |")
    if {"eiw", "vanilla"} <= set(runs):
      diffs = [runs["eiw"][s][key] - runs["vanilla"][s][key] if s in runs["eiw"]
               and s in runs["vanilla"] else None for s in seeds]
      lines.append("| EIW - vanilla | | "
                   + " | ".join("-" if d is None else f"{d:+.4f}" for d in diffs)
                   + f" | {_mean_sd([d for d in diffs if d is not None], '+')} |")
    lines.append("")
  walls = {split: [r.get("wall_time_s", 0.0) for r in by_seed.values()]
           for split, by_seed in runs.items()}
  lines.append("Wall time per run (s, `results.json`): " + "; ".join(
      f"{split} {', '.join(f'{w:.0f}' for w in ws)}" for split, ws in sorted(walls.items())))
  return "\n".join(lines)


def main() -> None:
  if len(sys.argv) != 2:
    raise SystemExit(__doc__)
  print(tables(load(sys.argv[1])))


if __name__ == "__main__":
  main()
