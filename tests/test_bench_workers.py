"""bench/workers.py: the interleaved-timing protocol the benchmarks share (fake workers, no model);
bench/peer_pytorch.py: its refusals, its missing-extras message, and its JAX peer end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, load_bench_module

workers = load_bench_module("workers")

# A worker whose step sleeps a little longer each call, so that the kept steps can be told apart.
_WORKER = (
    "import sys, time; sys.path.insert(0, {bench!r}); import workers\n"
    "calls = [0]\n"
    "def run():\n"
    "  calls[0] += 1\n"
    "  time.sleep(0.01 * calls[0])\n"
    "workers.serve('w', run, {{'kind': 'test'}})\n"
)


@pytest.fixture
def pool():
  pool = workers.InterleavedWorkers()
  for name in ("a", "b"):
    pool.start(name, ["-c", _WORKER.format(bench=os.path.join(REPO, "bench"))])
  yield pool
  pool.close()


def test_one_step_per_turn_and_several_back_to_back(pool):
  assert pool.infos["a"]["ready"] == "w" and pool.infos["a"]["kind"] == "test"
  one = pool.time_steps(rounds=2)
  assert {name: len(t) for name, t in one.items()} == {"a": 2, "b": 2}
  several = pool.time_steps(rounds=2, steps_per_turn=3)
  # Each turn's first step is left out: 2 rounds x 2 kept steps, calls 4-5 and 7-8 (call 3,
  # which would be kept otherwise, sleeps 0.03 s).
  assert {name: len(t) for name, t in several.items()} == {"a": 4, "b": 4}
  assert min(several["a"]) >= 0.04 and min(several["b"]) >= 0.04


def test_bad_counts_are_refused(pool):
  with pytest.raises(ValueError, match="steps_per_turn must be at least 1, got 0"):
    pool.time_steps(rounds=1, steps_per_turn=0)
  with pytest.raises(RuntimeError, match="worker a: unknown command 'steps 0'"):
    pool.ask("a", "steps 0")
  with pytest.raises(RuntimeError, match="worker b: unknown command 'steps x'"):
    pool.ask("b", "steps x")
  # A fresh worker's calls 1 and 2 sleep 0.01 and 0.02 s: both timed, in order.
  first, second = pool.ask("a", "steps 2")["seconds"]
  assert first >= 0.01 and second >= 0.02


PEER_SCRIPT = os.path.join(REPO, "bench", "peer_pytorch.py")
TINY_MODEL = ["--image_size=8", "--channels=1", "--num_levels=2", "--steps_per_level=1",
              "--hidden=16", "--batch=4", "--pause_s=0"]


@pytest.mark.parametrize("args, message", [
    (["--steps_per_turn=0"], "--steps_per_turn must be at least 1, got 0"),
    (["--peers=jax,glow"], "--peers: expected peers among jax, torch, normflows, got glow."),
    (["--peers="], "--peers: expected at least one peer among jax, torch, normflows."),
])
def test_peer_benchmark_refuses_bad_flags(args, message):
  out = subprocess.run([sys.executable, PEER_SCRIPT, *args],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
  assert out.returncode != 0
  assert message in out.stderr


def _in_peer_script_process(body: str):
  """Runs `body` (which prints JSON) after `import peer_pytorch` in a fresh Python: importing
  the script defines its absl flags, once per process. Returns the printed value."""
  code = (f"import json, sys; sys.path.insert(0, {os.path.join(REPO, 'bench')!r}); "
          "import peer_pytorch\n" + body)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       timeout=120, check=True).stdout
  return json.loads(out)


def test_peer_benchmark_names_missing_extras():
  with_torch, without_normflows, without_either = _in_peer_script_process(
      "def only_torch(module):\n"
      "  return object() if module == 'torch' else None\n"
      "print(json.dumps([peer_pytorch.peer_problems(['jax', 'torch'], only_torch),\n"
      "                  peer_pytorch.peer_problems(['jax', 'torch', 'normflows'], only_torch),\n"
      "                  peer_pytorch.peer_problems(['torch', 'normflows'], lambda m: None)]))\n")
  assert with_torch == []
  assert without_normflows == [
      "peer normflows needs normflows, not installed here: pip install -e .[bench] "
      "(torch==2.13.0, normflows)."]
  assert without_either[0].startswith(
      "peer torch needs torch; peer normflows needs torch and normflows, not installed here")


def test_peer_benchmark_config_variants():
  parsed = _in_peer_script_process(
      "from ml_collections import ConfigDict\n"
      "from eiw_flow_jax.config.schema import base_config\n"
      "name, fields = peer_pytorch.config_variant_fields("
      "'pe=model.split=eiw,model.eiw.mode=per_example,model.eiw.beta=3.0')\n"
      "config = base_config()\n"
      "peer_pytorch.set_config_fields(config, fields)\n"
      "errors = []\n"
      "for bad in ('remat', 'remat=', '=model.memory=remat', 'x=model.memory'):\n"
      "  try:\n"
      "    peer_pytorch.config_variant_fields(bad)\n"
      "  except ValueError as error:\n"
      "    errors.append(str(error))\n"
      "print(json.dumps([name, config.model.split, config.model.eiw.mode,\n"
      "                  config.model.eiw.beta, errors]))\n")
  name, split, mode, beta, errors = parsed
  assert (name, split, mode, beta) == ("pe", "eiw", "per_example", 3.0)
  assert len(errors) == 4 and all(e.startswith("--config_variant: expected NAME=FIELD=VALUE")
                                  for e in errors), errors


def test_peer_benchmark_jax_alone_back_to_back_by_default():
  """The JAX peer needs no extras: a tiny model end to end, in the default protocol, with a
  config variant (the EIW split) as a second JAX peer."""
  out = subprocess.run([sys.executable, PEER_SCRIPT, "--peers=jax", "--rounds=2", *TINY_MODEL,
                        "--config_variant=eiw=model.split=eiw"],
                       capture_output=True, text=True, cwd=REPO, timeout=600, check=True).stdout
  assert "2 interleaved rounds of 3 step(s) per peer (the first of each turn left out)" in out
  rows = [line for line in out.splitlines() if line.startswith("| jax |")]
  assert len(rows) == 1 and rows[0].endswith("| 1.00x | 1.00x |")
  assert len([line for line in out.splitlines() if line.startswith("| jax[eiw] |")]) == 1
  assert "GFLOP (XLA cost analysis)" in out and "matmul through JAX" in out


def test_peer_benchmark_torch_device_choice():
  """--torch_device: auto follows torch's CUDA availability; cuda without a GPU is refused."""
  choices = _in_peer_script_process(
      "flags = peer_pytorch.FLAGS\n"
      "out = []\n"
      "for choice in ('auto', 'cpu', 'cuda'):\n"
      "  flags(['peer_pytorch', '--torch_device=' + choice])\n"
      "  for cuda in (True, False):\n"
      "    try:\n"
      "      out.append(peer_pytorch.torch_device(cuda))\n"
      "    except RuntimeError as error:\n"
      "      out.append(str(error))\n"
      "print(json.dumps(out))\n")
  assert choices[:5] == ["cuda", "cpu", "cpu", "cpu", "cuda"]
  assert choices[5].startswith("--torch_device=cuda, but torch sees no CUDA device here")
