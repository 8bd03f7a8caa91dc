"""Collects the results.json of training runs into a bits/dim table next to published numbers.

  python -m eiw_flow_jax.table WORKDIR [WORKDIR ...] [--out=DIR]

Each WORKDIR is a run's --workdir (holding results.json) or a folder searched recursively for
them. Writes `bpd_table.md` (a Markdown table, then the references) and `bpd_table.json` (one
object per run, with the published numbers and gaps) into --out (default: the current folder).

Per run: dataset, backbone, split, EIW mode, steps, training wall time, devices, parameter
count, measured test bpd, and for each published model that reported the same benchmark its
number and the gap (measured minus published; negative is better than the paper). A workdir
whose results.json is missing, unreadable or lacks fields is reported and skipped (a warning per
workdir); with --strict it is an error. No run found at all is an error.

Published numbers (test bits/dim, 8-bit data unless said otherwise) are `BENCHMARKS`, each
from the paper named in `REFERENCES`; docs/formulation.md shows them as a table (which
tests/test_docs.py keeps equal to `BENCHMARKS`). EIW-Flow's own numbers (arXiv:2407.04958) are
not included: they could not be checked against the paper with a page reference. Runs on datasets
without a published number (digits, mnist_idx, imagenet*_resized, ...) get none; a CelebA run
is compared only with numbers of its bit depth (`n_bits`) and resolution.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from absl import app, flags, logging

from eiw_flow_jax.commands import command_line
from eiw_flow_jax.training import evaluate

TABLE_MD = "bpd_table.md"
TABLE_JSON = "bpd_table.json"

REFERENCES = {
    "RealNVP": "Dinh, Sohl-Dickstein & Bengio, Density estimation using Real NVP, ICLR 2017 "
               "(arXiv:1605.08803), Table 1",
    "Glow": "Kingma & Dhariwal, Glow: Generative flow with invertible 1x1 convolutions, NeurIPS "
            "2018 (arXiv:1807.03039), Table 2 (CIFAR-10, ImageNet, LSUN); CelebA-HQ 256x256 "
            "5-bit: 1.03, as reported for Glow (no CelebA-HQ dataset is registered here)",
    "Flow++": "Ho, Chen, Srinivas, Duan & Abbeel, Flow++: Improving flow-based generative "
              "models with variational dequantization and architecture design, ICML 2019 "
              "(arXiv:1902.00275), density-estimation results table",
    "DenseFlow": "Grcic, Grubisic & Segvic, Densely connected normalizing flows, NeurIPS 2021 "
                 "(arXiv:2106.04627), density-estimation results table",
}


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A published benchmark: which runs it applies to, and the numbers reported on it."""

  title: str
  datasets: tuple[str, ...]  # config.dataset.name values evaluated on this benchmark
  image_shape: tuple[int, int, int]
  n_bits: int
  published: dict[str, float]


BENCHMARKS = (
    Benchmark("CIFAR-10", ("cifar10",), (32, 32, 3), 8,
              {"RealNVP": 3.49, "Glow": 3.35, "Flow++": 3.08, "DenseFlow": 2.98}),
    Benchmark("ImageNet 32x32", ("imagenet32",), (32, 32, 3), 8,
              {"RealNVP": 4.28, "Glow": 4.09, "Flow++": 3.86, "DenseFlow": 3.63}),
    Benchmark("ImageNet 64x64", ("imagenet64",), (64, 64, 3), 8,
              {"RealNVP": 3.98, "Glow": 3.81, "Flow++": 3.69, "DenseFlow": 3.35}),
    Benchmark("CelebA 64x64 (8-bit)", ("celeba",), (64, 64, 3), 8,
              {"RealNVP": 3.02, "DenseFlow": 1.99}),
    # Listed for completeness; no registered dataset is CelebA-HQ, so no run matches it.
    Benchmark("CelebA-HQ 256x256 (5-bit)", (), (256, 256, 3), 5, {"Glow": 1.03}),
    Benchmark("LSUN bedroom 64x64", ("lsun_bedroom",), (64, 64, 3), 8,
              {"RealNVP": 2.72, "Glow": 2.38}),
    Benchmark("LSUN church outdoor 64x64", ("lsun_church",), (64, 64, 3), 8,
              {"RealNVP": 3.08, "Glow": 2.67}),
)
MODELS = ("RealNVP", "Glow", "Flow++", "DenseFlow")

REQUIRED = ("bpd", "dataset", "split", "step", "n_bits")


class TableError(Exception):
  """Bad input the user can fix; main() prints it as one line and exits 1."""


def benchmark_for(results: dict[str, Any]) -> Benchmark | None:
  """The published benchmark a run is comparable with, or None."""
  shape = tuple(results.get("image_shape") or ())
  for bench in BENCHMARKS:
    if (results["dataset"] in bench.datasets and results["n_bits"] == bench.n_bits
        and (not shape or shape == bench.image_shape)):
      return bench
  return None


def find_results(paths: Iterable[str]) -> tuple[list[str], list[str]]:
  """(results.json files, warnings): each path is a workdir or a folder searched recursively."""
  files, warnings = [], []
  for path in paths:
    path = os.path.abspath(os.path.expanduser(path))
    direct = os.path.join(path, evaluate.RESULTS_FILE)
    if os.path.isfile(path) and os.path.basename(path) == evaluate.RESULTS_FILE:
      files.append(path)
    elif os.path.isfile(direct):
      files.append(direct)
    elif os.path.isdir(path):
      found = sorted(
          os.path.join(root, evaluate.RESULTS_FILE)
          for root, _, names in os.walk(path) if evaluate.RESULTS_FILE in names
      )
      if found:
        files.extend(found)
      else:
        warnings.append(f"{path}: no {evaluate.RESULTS_FILE} in it or below (not evaluated yet?)")
    else:
      warnings.append(f"{path}: no such workdir")
  return files, warnings


def load_results(path: str) -> dict[str, Any]:
  """One results.json, checked; raises TableError naming the file and what is wrong."""
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise TableError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
  if not isinstance(results, dict):
    raise TableError(f"{path}: expected a JSON object, got {type(results).__name__}")
  missing = [key for key in REQUIRED if key not in results]
  if missing:
    raise TableError(f"{path}: missing fields {missing}")
  if not isinstance(results["bpd"], (int, float)) or isinstance(results["bpd"], bool):
    raise TableError(f"{path}: bpd must be a number, got {results['bpd']!r}")
  return results


def row(results: dict[str, Any], path: str) -> dict[str, Any]:
  """One table row: the run's fields, the published numbers and the gaps."""
  bench = benchmark_for(results)
  bpd = float(results["bpd"])
  # DenseFlow's likelihood is a bound: the papers report the importance-weighted bound (IWBO),
  # so that is the number compared with the published ones when it was evaluated.
  if results.get("backbone", "glow") == "denseflow":
    if isinstance(results.get("iwbo_bpd"), (int, float)):
      bpd, measure = float(results["iwbo_bpd"]), f"IWBO k={results.get('iwbo_k')}"
    else:
      measure = "ELBO"
  else:
    measure = "exact"
  published = dict(bench.published) if bench else {}
  return {
      "workdir": os.path.dirname(path),
      "dataset": results["dataset"],
      "benchmark": bench.title if bench else None,
      "backbone": results.get("backbone", "glow"),
      "split": results["split"],
      "mode": results.get("eiw_mode") if results["split"] == "eiw" else None,
      "steps": results["step"],
      "wall_time_s": results.get("wall_time_s"),
      "device_count": results.get("device_count"),
      "device_kind": results.get("device_kind"),
      "num_parameters": results.get("num_parameters"),
      "n_bits": results["n_bits"],
      "bpd": bpd,
      "measure": measure,
      "elbo_bpd": results.get("elbo_bpd"),
      "published": published,
      "gap": {model: bpd - value for model, value in published.items()},
  }


def collect(
    paths: Sequence[str], *, strict: bool = False
) -> tuple[list[dict[str, Any]], list[str]]:
  """Rows for every readable results.json under `paths`, sorted; and the warnings."""
  files, warnings = find_results(paths)
  rows = []
  for path in files:
    try:
      rows.append(row(load_results(path), path))
    except TableError as e:
      warnings.append(str(e))
  if strict and warnings:
    raise TableError("; ".join(warnings))
  if not rows:
    raise TableError(
        f"No readable {evaluate.RESULTS_FILE} under {list(paths)}"
        + (f" ({'; '.join(warnings)})" if warnings else "")
        + ". Train (`python -m eiw_flow_jax.main ... --workdir=DIR`) or evaluate "
        "(`--mode=eval`) first."
    )
  rows.sort(key=lambda r: (r["dataset"], r["split"], r["mode"] or "", r["workdir"]))
  return rows, warnings


def _duration(seconds: float | None) -> str:
  if seconds is None or not math.isfinite(seconds):
    return "n/a"
  hours, rest = divmod(int(round(seconds)), 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _count(n: int | None) -> str:
  if n is None:
    return "n/a"
  return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def markdown(rows: Sequence[dict[str, Any]], warnings: Sequence[str] = ()) -> str:
  """The table as Markdown, with the references and any skipped workdirs."""
  header = ["dataset", "backbone", "split", "mode", "steps", "wall time", "devices", "params",
            "bpd", "likelihood"] + [f"{m} (gap)" for m in MODELS] + ["workdir"]
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  for r in rows:
    devices = f"{r['device_count']} x {r['device_kind']}" if r["device_count"] else "n/a"
    cells = [r["dataset"], r["backbone"], r["split"], r["mode"] or "-", str(r["steps"]),
             _duration(r["wall_time_s"]), devices, _count(r["num_parameters"]),
             f"{r['bpd']:.4f}", r["measure"]]
    for model in MODELS:
      value = r["published"].get(model)
      cells.append("" if value is None else f"{value:.2f} ({r['gap'][model]:+.3f})")
    cells.append(os.path.basename(r["workdir"]) or r["workdir"])
    lines.append("| " + " | ".join(cells) + " |")
  lines += [
      "",
      "bpd: test bits/dim of the EMA parameters over the whole eval split; likelihood: exact "
      "(Glow backbone), or for DenseFlow the importance-weighted bound with k samples (IWBO, "
      "what DenseFlow reports) or, without it, the ELBO. Published: test "
      "bits/dim of the same benchmark (gap = measured - published; negative is better). "
      "Empty: no published number for that dataset, bit depth and resolution. EIW-Flow's own "
      "numbers are not quoted (not checked against the paper with a page reference).",
      "",
      "References:",
      *[f"- {model}: {ref}" for model, ref in REFERENCES.items()],
  ]
  if warnings:
    lines += ["", "Skipped:", *[f"- {w}" for w in warnings]]
  return "\n".join(lines) + "\n"


def write_table(
    paths: Sequence[str], out_dir: str = ".", *, strict: bool = False
) -> tuple[str, str, list[dict[str, Any]]]:
  """Writes bpd_table.md and bpd_table.json into out_dir; returns both paths and the rows."""
  rows, warnings = collect(paths, strict=strict)
  for warning in warnings:
    logging.warning("Skipped %s", warning)
  os.makedirs(out_dir, exist_ok=True)
  md_path, json_path = os.path.join(out_dir, TABLE_MD), os.path.join(out_dir, TABLE_JSON)
  with open(md_path, "w") as f:
    f.write(markdown(rows, warnings))
  with open(json_path, "w") as f:
    json.dump({"rows": rows, "skipped": warnings, "references": REFERENCES}, f, indent=2)
  return md_path, json_path, rows


_OUT = flags.DEFINE_string("out", ".", "Folder for bpd_table.md and bpd_table.json.")
_STRICT = flags.DEFINE_bool(
    "strict", False, "Fail (exit 1) when a workdir has no readable results.json, not skip it."
)


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError("Give at least one WORKDIR: python -m eiw_flow_jax.table WORKDIR...")
  try:
    md_path, json_path, rows = write_table(argv[1:], _OUT.value, strict=_STRICT.value)
  except TableError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  with open(md_path) as f:
    print(f.read(), end="")
  runs = f"{len(rows)} run" + ("" if len(rows) == 1 else "s")
  print(f"Wrote {md_path} and {json_path} ({runs}).", flush=True)


def cli() -> None:
  """Parses the command line and runs `main` (what `python -m eiw_flow_jax.table` does)."""
  command_line.run(main)


if __name__ == "__main__":
  cli()
