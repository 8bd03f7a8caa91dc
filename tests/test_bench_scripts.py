"""bench/ kept alive: every benchmark script runs at toy size, as a subprocess, and prints its
figures in the shape of the tables in docs/benchmarks.md (times are not checked: each cell that
holds a number holds one, each row the table needs is there).

Elsewhere: bench/workers.py and bench/peer_pytorch.py's JAX peer in tests/test_bench_workers.py,
bench/plot_runs.py (its `main(argv)`, the command line) in tests/test_plot_runs.py, the shell
scripts' shellcheck in tests/test_launch.py. The PyTorch peers (bench/peer_pytorch.py's torch and
normflows) need the `bench` extra: their test is marked `torch`, which the default run leaves
out (setup.cfg); `python -m pytest -m torch` runs it, and without torch it fails naming the
extra, it does not skip. bench/denseflow.py's unit part also needs a checkout of the authors'
code (`--authors_repo`): only its refusal without one is tested here.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, with_test_xla_flags

NUMBER = r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]\d+)?x?"

# Tiny Glow flags of bench/peer_pytorch.py (also read by bench/profile_step.py).
TINY_GLOW = ["--image_size=8", "--channels=1", "--num_levels=2", "--steps_per_level=1",
             "--hidden=16", "--batch=4"]


def run_bench(env: dict[str, str], script: str, *args: str, timeout: int = 300,
              extra_env: dict[str, str] | None = None) -> str:
  """`python bench/<script> *args` from the repository root; its stdout (exit status 0)."""
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "bench", script), *args], cwd=REPO,
      env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
  return result.stdout


def table_rows(stdout: str, first_cell: str) -> list[list[str]]:
  """The cells of each markdown row whose first cell is `first_cell`."""
  rows = []
  for line in stdout.splitlines():
    cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
    if line.startswith("|") and cells[0] == first_cell:
      rows.append(cells)
  return rows


def numbers(cells: list[str]) -> list[float]:
  """Each cell as a float; fails on a cell that is not a number (1.00x and 1,934 count)."""
  for cell in cells:
    assert re.fullmatch(NUMBER, cell), f"{cell!r} is not a number in {cells}"
  return [float(cell.rstrip("x").replace(",", "")) for cell in cells]


def test_compile_time_reports_one_json_line_per_compile(env):
  out = run_bench(env, "compile_time.py", "--config=configs/digits.py", "--ks=1",
                  "--variants=true", "--batch=4", "--hidden=8", "--steps=1",
                  f"--xla_flags={with_test_xla_flags()}")
  (record,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert "error" not in record, record["error"]
  assert (record["k"], record["scan"], record["memory"], record["platform"]) == (
      1, True, "store", "cpu")
  for key in ("lower_s", "compile_s", "lower_cpu_s", "compile_cpu_s", "peak_rss_gib", "step_s"):
    assert record[key] >= 0, key
  assert record["peak_rss_gib"] > 0 and record["finite"] is True


def test_compile_time_compiles_parts_of_a_step_apart(env):
  """--parts: the loss alone and the update alone, each in its own process, for a backbone
  without K (--ks=0 keeps the config's depth), at each --efforts value; an unknown part or an
  effort outside [-1, 1] is refused in one line."""
  out = run_bench(env, "compile_time.py", "--config=configs/digits_denseflow.py", "--ks=0",
                  "--variants=true", "--batch=4", "--parts=forward,update", "--efforts=-1",
                  f"--xla_flags={with_test_xla_flags()}")
  records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert [r.get("error") for r in records] == [None, None]
  assert [(r["part"], r["k"], r["platform"], r["effort"]) for r in records] == [
      ("forward", 0, "cpu", -1.0), ("update", 0, "cpu", -1.0)]
  assert all(r["compile_s"] >= 0 and r["peak_rss_gib"] > 0 for r in records)
  for argument, message in (
      ("--parts=forward,backward", "--parts: unknown backward (step, forward, grad, update)"),
      ("--efforts=0,-2", "--efforts: each must be in [-1, 1], got '0,-2'"),
      ("--efforts=low", "--efforts: expected numbers in [-1, 1], got 'low'")):
    refused = subprocess.run([sys.executable, "bench/compile_time.py", argument], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_memory_modes_tables(env):
  modes = ("store", "invert")
  out = run_bench(env, "memory.py", "--ks=1", f"--modes={','.join(modes)}", "--batch=2",
                  "--hidden=8", "--image_size=8", "--num_levels=2", "--time_k=1",
                  "--time_hidden=8", "--time_batch=2", "--rounds=1", "--drift_ks=1",
                  "--drift_scales=0.0", "--drift_hidden=8")
  # K | per mode: MiB, ratio | per mode: compile s
  (memory,) = table_rows(out, "1")[:1]
  values = numbers(memory[1:])
  assert len(values) == 3 * len(modes) and values[1] == 1.0  # store's ratio to itself
  for mode in modes:
    (step,) = table_rows(out, mode)
    assert len(numbers(step[1:])) == 4  # median s, ratio, min s, ratio
  # Drift at initialisation, no parameter noise: float32 round-off per level.
  (drift,) = table_rows(out, "1")[1:]
  level_drifts = numbers(drift[2:])
  assert drift[1] == "0.0" and len(level_drifts) == 2 and max(level_drifts) < 1e-4


def test_checkpoint_digest_table(env, tmp_path):
  out = run_bench(env, "checkpoint_digest.py", "--config=configs/digits.py", "--rounds=1",
                  f"--dir={tmp_path}")
  assert re.search(r"config digits\.py: \d+ arrays, \d+ MiB", out), out
  for name in ("save (sync, whole write)", "restore"):
    (row,) = table_rows(out, name)
    without, with_digests, added = row[1:]
    numbers([without, with_digests])
    assert re.fullmatch(rf"{NUMBER} \({NUMBER}%\)", added), added
  (digest,) = table_rows(out, "digests alone (host copy + SHA-256)")
  assert digest[1] == "" and numbers([digest[2]]) and re.fullmatch(r"\d+ MiB/s", digest[3])


def test_input_pipeline_rates(env):
  datasets = ("digits", "mnist_idx", "cifar10", "celeba")
  out = run_bench(env, "input_pipeline.py", f"--datasets={','.join(datasets)}", "--workers=0",
                  "--batch=4", "--batches=2", "--warmup=1", "--num_examples=16")
  for name in datasets:
    (row,) = table_rows(out, name)
    workers, rate = numbers(row[1:])
    assert workers == 0 and rate > 0


def test_profile_step_sums_op_time_by_kind_and_part(env, tmp_path):
  out = run_bench(env, "profile_step.py", *TINY_GLOW, "--warmup_steps=1", "--traced_steps=1",
                  "--top_rows=3", f"--trace_dir={tmp_path}")
  assert re.search(r"wall ms/step \(traced\): \d+; op time summed over threads: \d+ ms/step",
                   out), out
  sections = out.split("\nby op kind\n")[1].split("\nby phase / model part\n")
  assert len(sections) == 2
  row = re.compile(r"  \S.* +[\d.]+ ms +[\d.]+%")
  for section in sections:
    lines = [line for line in section.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3 and all(row.match(line) for line in lines), section
  assert any(line.startswith(("  forward", "  backward", "  update")) for line in
             sections[1].splitlines())


# A DenseFlow of two blocks with an EIW transition between them, every width at its minimum:
# the train step of bench/denseflow.py compiles in seconds.
TINY_DENSEFLOW = textwrap.dedent("""\
    import importlib.util
    import os


    def get_config():
      path = os.path.join({repo!r}, "configs", "digits_denseflow.py")
      spec = importlib.util.spec_from_file_location("digits_denseflow", path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      config = module.get_config()
      config.model.denseflow.update(dict(
          block_conf=(1, 1), layers_conf=(1, 1), layer_mid_chnls=(4, 4), growth_rate=2,
          coupling_depth=1, coupling_growth=4, dequant_steps=1, dequant_context_channels=4,
          dequant_mid_channels=4, dequant_depth=1, dequant_growth=4, dequant_context_depth=1,
          dequant_context_growth=4))
      return config
    """)


def test_denseflow_train_step_table(env, tmp_path):
  config = tmp_path / "tiny_denseflow.py"
  config.write_text(TINY_DENSEFLOW.format(repo=REPO))
  out = run_bench(env, "denseflow.py", "--part=step", f"--config={config}", "--batch=2",
                  "--rounds=1", "--modes=store", "--compilation_cache=")
  assert re.search(r"tiny_denseflow\.py, batch 2, [\d,]+ parameters", out), out
  (row,) = table_rows(out, "store")
  values = numbers(row[1:])
  assert len(values) == 9 and values[2] == values[4] == 1.0  # store against itself


def test_denseflow_unit_part_needs_the_authors_code():
  result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "denseflow.py"),
                           "--part=unit"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "--part=unit needs --authors_repo" in result.stderr


def test_denseflow_table_from_results(env, tmp_path):
  bpd = {("eiw", 0): 2.25, ("eiw", 1): 2.31, ("vanilla", 0): 2.21, ("vanilla", 1): 2.30}
  for (split, seed), elbo in bpd.items():
    run = tmp_path / split / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(dict(
        elbo_bpd=elbo, iwbo_bpd=elbo - 0.1, iwbo_k=20, num_parameters=371_436,
        wall_time_s=300.0)))
  out = run_bench(env, "denseflow_table.py", str(tmp_path))
  assert "Test ELBO bpd:" in out and "Test IWBO (k = 20) bpd:" in out
  eiw_elbo, eiw_iwbo = table_rows(out, "eiw")
  assert eiw_elbo[1] == "371,436" and numbers(eiw_elbo[2:4]) == [2.25, 2.31]
  assert eiw_elbo[4] == "2.2800 ± 0.0424"
  assert numbers(eiw_iwbo[2:4]) == [2.15, 2.21]
  differences = table_rows(out, "EIW - vanilla")[0]
  assert differences[2:4] == ["+0.0400", "+0.0100"]


def shell_script(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
  return subprocess.run([os.path.join(REPO, "bench", script), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=60)


def test_ablation_runs_queue_and_flags(tmp_path):
  """PYTHON=echo: each queued run's command line lands in its train.log."""
  out = tmp_path / "runs"
  base = {"PATH": os.environ["PATH"], "PYTHON": "echo"}
  missing = shell_script("ablation_runs.sh", "mnist_idx", str(out), env=base)
  assert missing.returncode != 0 and "set MNIST_DIR" in missing.stderr
  env = {**base, "MNIST_DIR": str(tmp_path / "mnist")}
  result = shell_script("ablation_runs.sh", "mnist_idx", str(out), "vanilla:0",
                        "per_example_weights_only:2", env=env)
  assert result.returncode == 0, result.stderr
  times = [line.split("\t") for line in (out / "times.tsv").read_text().splitlines()]
  assert [(v, s, rc) for v, s, _, rc in times] == [
      ("vanilla", "0", "0"), ("per_example_weights_only", "2", "0")]
  log = (out / "per_example_weights_only" / "seed2" / "train.log").read_text().split()
  assert log[:2] == ["-m", "eiw_flow_jax.main"]
  for flag in ("--config=configs/mnist_idx.py", f"--config.dataset.source_dir={tmp_path}/mnist",
               "--config.model.eiw.mode=per_example", "--config.model.eiw.use_permutation=False",
               "--config.seed=2", f"--workdir={out}/per_example_weights_only/seed2"):
    assert flag in log
  unknown = shell_script("ablation_runs.sh", "digits", str(out), "nope:0", env=env)
  assert unknown.returncode == 2 and "unknown variant nope" in unknown.stderr


def test_denseflow_runs_queue_and_flags(tmp_path):
  out = tmp_path / "runs"
  env = {"PATH": os.environ["PATH"], "PYTHON": "echo", "MNIST_DIR": str(tmp_path / "mnist")}
  result = shell_script("denseflow_runs.sh", "mnist_idx", str(out), "eiw:1", env=env)
  assert result.returncode == 0, result.stderr
  log = (out / "eiw" / "seed1" / "train.log").read_text().split()
  for flag in ("--config=configs/mnist_idx_denseflow.py", "--config.model.split=eiw",
               f"--config.dataset.source_dir={tmp_path}/mnist", "--config.seed=1"):
    assert flag in log
  digits = shell_script("denseflow_runs.sh", "digits", str(out), "vanilla:0",
                        env={**env, "MNIST_DIR": ""})
  assert digits.returncode == 0, digits.stderr
  log = (out / "vanilla" / "seed0" / "train.log").read_text()
  assert "configs/digits_denseflow.py" in log and "source_dir" not in log


@pytest.mark.torch
def test_pytorch_peers_against_the_jax_step(env):
  """Needs the `bench` extra (torch, normflows): run with `python -m pytest -m torch`."""
  out = run_bench(env, "peer_pytorch.py", "--peers=jax,torch,normflows", "--rounds=1",
                  "--pause_s=0", *TINY_GLOW, timeout=600)
  for peer in ("jax", "torch", "normflows"):
    (row,) = table_rows(out, peer)
    assert all(value > 0 and math.isfinite(value) for value in numbers(row[1:]))
