"""Collects the results.json of training runs into a bits/dim table next to published numbers.

  python -m eiw_flow_jax.table WORKDIR [WORKDIR ...] [--out=DIR]

Each WORKDIR is a run's --workdir (holding results.json) or a folder searched recursively for
them. Writes `bpd_table.md` (a Markdown table, then the published numbers it compares with, the
data versions and the references) and `bpd_table.json` (one object per run, with the published
numbers, their sources and the gaps) into --out (default: the current folder).

Per run: dataset, data version, backbone, split, EIW mode, steps, training wall time, devices,
parameter count, measured test bpd, and for each published model that reported the same
benchmark its number and the gap (measured minus published; negative is better than the paper).
A workdir whose results.json is missing, unreadable or lacks fields is reported and skipped (a
warning per workdir); with --strict it is an error. No run found at all is an error.

A benchmark is one data version (`eiw_flow_jax.data.registry.DATA_VERSIONS`) at one resolution
and bit depth: the same images prepared another way give other bits/dim (Chrabaszcz et al.'s
box-resized ImageNet is easier than van den Oord et al.'s; DenseFlow's CelebA squashes whole
faces where RealNVP crops them), so a run is compared only with the numbers published on its
own version. Which version each paper used is read from the authors' code (`Published.version`,
docs/datasets.md); a paper whose version could not be determined would say so here and be
compared with nothing. The published numbers (test bits/dim, 8-bit data unless said otherwise)
are `BENCHMARKS`, each from the paper and table named with it; docs/formulation.md shows them as
a table, which tests/test_docs.py keeps equal to `BENCHMARKS`.

EIW-Flow's own numbers (arXiv:2407.04958) are not included: they could not be checked against
the paper with a page reference here, so none is quoted. Runs on versions without a published
number (digits, mnist_idx, `celeba`, `lsun_bedroom`: this project's own crops, ...) get none; a
CelebA run is compared only with numbers of its bit depth (`n_bits`) and resolution.
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
from eiw_flow_jax.data import registry
from eiw_flow_jax.training import evaluate

TABLE_MD = "bpd_table.md"
TABLE_JSON = "bpd_table.json"

REFERENCES = {
    "RealNVP": "Dinh, Sohl-Dickstein & Bengio, Density estimation using Real NVP, ICLR 2017 "
               "(arXiv:1605.08803)",
    "Glow": "Kingma & Dhariwal, Glow: Generative flow with invertible 1x1 convolutions, NeurIPS "
            "2018 (arXiv:1807.03039)",
    "Flow++": "Ho, Chen, Srinivas, Duan & Abbeel, Flow++: Improving flow-based generative "
              "models with variational dequantization and architecture design, ICML 2019 "
              "(arXiv:1902.00275)",
    "DenseFlow": "Grcic, Grubisic & Segvic, Densely connected normalizing flows, NeurIPS 2021 "
                 "(arXiv:2106.04627)",
}
MODELS = tuple(REFERENCES)


@dataclasses.dataclass(frozen=True)
class Published:
  """One published number: where it is printed and how its data version is known."""

  model: str  # a key of REFERENCES
  bpd: float
  table: str  # where in the paper
  version: str  # the evidence for its benchmark's data version (the authors' code)


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A published benchmark: one data version at one resolution and bit depth, and its numbers."""

  title: str
  data_version: str | None  # a key of registry.DATA_VERSIONS; None: no registered dataset
  image_shape: tuple[int, int, int]
  n_bits: int
  published: tuple[Published, ...]


# Evidence for the data versions, cited at file and line in docs/datasets.md.
_OORD_REALNVP = "real_nvp/imnet_formatting.py reads image-net.org/small's train_32x32.tar, ..."
_OORD_GLOW = "openai/glow README: imagenet-oord, downloaded from image-net.org/small"
_OORD_FLOWPP = "flowpp flows_imagenet/create_imagenet_benchmark_datasets.py: image-net.org/small"
_CHRABASZCZ_DENSEFLOW = ("DenseFlow's ImageNet loaders and make_imagenet_data.py read "
                         "Imagenet32_train.zip's pickled batches; README, Dec 2023")
_CIFAR = "one published version"

BENCHMARKS = (
    Benchmark("CIFAR-10", "cifar10", (32, 32, 3), 8, (
        Published("RealNVP", 3.49, "Table 1", _CIFAR),
        Published("Glow", 3.35, "Table 2", _CIFAR),
        Published("Flow++", 3.08, "Table 1", _CIFAR),
        Published("DenseFlow", 2.98, "Table 1", _CIFAR),
    )),
    Benchmark("ImageNet 32x32, van den Oord et al.", "imagenet:van_den_oord", (32, 32, 3), 8, (
        Published("RealNVP", 4.28, "Table 1", _OORD_REALNVP),
        Published("Glow", 4.09, "Table 2", _OORD_GLOW),
        Published("Flow++", 3.86, "Table 1", _OORD_FLOWPP),
    )),
    Benchmark("ImageNet 64x64, van den Oord et al.", "imagenet:van_den_oord", (64, 64, 3), 8, (
        Published("RealNVP", 3.98, "Table 1", _OORD_REALNVP),
        Published("Glow", 3.81, "Table 2", _OORD_GLOW),
        Published("Flow++", 3.69, "Table 1", _OORD_FLOWPP),
    )),
    Benchmark("ImageNet 32x32, Chrabaszcz et al.", "imagenet:chrabaszcz", (32, 32, 3), 8, (
        Published("DenseFlow", 3.63, "Table 1", _CHRABASZCZ_DENSEFLOW),
    )),
    Benchmark("ImageNet 64x64, Chrabaszcz et al.", "imagenet:chrabaszcz", (64, 64, 3), 8, (
        Published("DenseFlow", 3.35, "Table 1", _CHRABASZCZ_DENSEFLOW),
    )),
    Benchmark("CelebA 64x64, RealNVP's crop", "celeba:realnvp_crop", (64, 64, 3), 8, (
        Published("RealNVP", 3.02, "Table 1",
                  "real_nvp_multiscale_dataset.py: image[40:188, 15:163], resize_images"),
    )),
    Benchmark("CelebA 64x64, whole image squashed", "celeba:whole_squashed", (64, 64, 3), 8, (
        Published("DenseFlow", 1.99, "Table 1",
                  "DenseFlow's celeba.py resizes the uncropped image (its crop is unused)"),
    )),
    # Listed for completeness; no registered dataset is CelebA-HQ, so no run matches it.
    Benchmark("CelebA-HQ 256x256, 5-bit", None, (256, 256, 3), 5, (
        Published("Glow", 1.03, "as reported for Glow (not its Table 2)",
                  "Karras et al.'s CelebA-HQ"),
    )),
    Benchmark("LSUN bedroom 64x64, RealNVP's", "lsun_bedroom:realnvp", (64, 64, 3), 8, (
        Published("RealNVP", 2.72, "Table 1",
                  "real_nvp/lsun_formatting.py: smallest side 96; random 64x64 crops"),
        Published("Glow", 2.38, "Table 2", "openai/glow lsun_realnvp: lsun.py --realnvp"),
    )),
    Benchmark("LSUN church outdoor 64x64, RealNVP's", "lsun_church:realnvp", (64, 64, 3), 8, (
        Published("RealNVP", 3.08, "Table 1",
                  "real_nvp/lsun_formatting.py: smallest side 96; random 64x64 crops"),
        Published("Glow", 2.67, "Table 2", "openai/glow lsun_realnvp: lsun.py --realnvp"),
    )),
)

REQUIRED = ("bpd", "dataset", "split", "step", "n_bits")


class TableError(Exception):
  """Bad input the user can fix; main() prints it as one line and exits 1."""


def data_version_of(results: dict[str, Any]) -> str | None:
  """The run's data version: as recorded in results.json, else its dataset's in the registry
  (results.json files written before the field existed); None for an unknown dataset."""
  recorded = results.get("data_version")
  if isinstance(recorded, str):
    return recorded
  spec = registry.DATASETS.get(results["dataset"])
  return spec.data_version if spec else None


def benchmark_for(results: dict[str, Any]) -> Benchmark | None:
  """The published benchmark a run is comparable with (same data version, bits, size), or None."""
  shape = tuple(results.get("image_shape") or ())
  version = data_version_of(results)
  for bench in BENCHMARKS:
    if (version is not None and version == bench.data_version
        and results["n_bits"] == bench.n_bits and (not shape or shape == bench.image_shape)):
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
  published = {p.model: p.bpd for p in bench.published} if bench else {}
  return {
      "workdir": os.path.dirname(path),
      "dataset": results["dataset"],
      "data_version": data_version_of(results),
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
      "sources": {p.model: f"{REFERENCES[p.model]}, {p.table}" for p in bench.published}
                 if bench else {},
      "gap": {model: bpd - value for model, value in published.items()},
      "not_compared": {b.title: {p.model: p.bpd for p in b.published}
                       for b in other_versions(results)},
  }


def _family(data_version: str) -> str:
  return data_version.split(":")[0]  # "imagenet:chrabaszcz" -> "imagenet"


def other_versions(results: dict[str, Any]) -> list[Benchmark]:
  """Benchmarks of the run's dataset, size and bits on another data version: not compared."""
  version = data_version_of(results)
  shape = tuple(results.get("image_shape") or ())
  return [
      bench for bench in BENCHMARKS
      if version is not None and bench.data_version is not None
      and bench.data_version != version and _family(bench.data_version) == _family(version)
      and results["n_bits"] == bench.n_bits and (not shape or shape == bench.image_shape)
  ]


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
  header = ["dataset", "data version", "backbone", "split", "mode", "steps", "wall time",
            "devices", "params", "bpd", "likelihood"] + [f"{m} (gap)" for m in MODELS] + [
                "workdir"]
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  for r in rows:
    devices = f"{r['device_count']} x {r['device_kind']}" if r["device_count"] else "n/a"
    cells = [r["dataset"], r["data_version"] or "unknown", r["backbone"], r["split"],
             r["mode"] or "-", str(r["steps"]), _duration(r["wall_time_s"]), devices,
             _count(r["num_parameters"]), f"{r['bpd']:.4f}", r["measure"]]
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
      "bits/dim of the same benchmark: the same data version, bit depth and resolution (gap = "
      "measured - published; negative is better). Empty: no number published on that version. "
      "EIW-Flow's own numbers are not quoted (not checked against the paper with a page "
      "reference).",
  ]
  lines += _compared_section(rows)
  lines += ["", "References:", *[f"- {model}: {ref}" for model, ref in REFERENCES.items()]]
  if warnings:
    lines += ["", "Skipped:", *[f"- {w}" for w in warnings]]
  return "\n".join(lines) + "\n"


def _compared_section(rows: Sequence[dict[str, Any]]) -> list[str]:
  """The published numbers the rows are compared with (source, how the version is known), the
  data versions of the rows, and the numbers left out because they are on another version."""
  titles = sorted({r["benchmark"] for r in rows if r["benchmark"]})
  lines = []
  if titles:
    lines += ["", "Compared with (benchmark: model bpd, source; how its data version is known):"]
    for bench in BENCHMARKS:
      if bench.title in titles:
        lines += [f"- {bench.title}:"] + [
            f"  - {p.model} {p.bpd:.2f}, {p.model} paper {p.table}; version: {p.version}"
            for p in bench.published]
  versions = sorted({r["data_version"] for r in rows if r["data_version"]})
  lines += ["", "Data versions:"] + [
      f"- {v}: {registry.DATA_VERSIONS[v].description}" if v in registry.DATA_VERSIONS
      else f"- {v}: not a version this project knows" for v in versions]
  skipped = {(r["dataset"], title): numbers for r in rows
             for title, numbers in r["not_compared"].items()}
  if skipped:
    lines += ["", "Not compared (published on another data version of the same dataset):"]
    lines += [f"- {dataset} vs {title}: " + ", ".join(f"{m} {v:.2f}" for m, v in numbers.items())
              for (dataset, title), numbers in sorted(skipped.items())]
  return lines


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
    json.dump({"rows": rows, "skipped": warnings, "references": REFERENCES,
               "data_versions": {k: dataclasses.asdict(v)
                                 for k, v in registry.DATA_VERSIONS.items()}}, f, indent=2)
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
