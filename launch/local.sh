#!/usr/bin/env bash
# Trains on this machine with every local device (all GPUs, all TPU chips of one TPU VM, or the
# CPU): one process, the global batch split over the devices.
#
#   launch/local.sh [--dry-run] [--jax=cuda12|tpu|cpu] CONFIG WORKDIR [main.py flags...]
#   launch/local.sh configs/cifar10.py /data/runs/c10 --config.dataset.data_dir=/data/tfds
#
#   --jax=VARIANT  first install the matching jax into the current Python ("jax[cuda12]",
#                  "jax[tpu]" or plain "jax") together with this checkout
#   --dry-run      print the commands instead of running them
# PYTHON (default python3) selects the interpreter. Ctrl-C or SIGTERM saves a checkpoint and
# stops (exit 130 / 143); the same command resumes.
set -euo pipefail

DRY_RUN=0
JAX=""
while (($#)); do
  case "$1" in
    --dry-run | --dry_run) DRY_RUN=1; shift ;;
    --jax=*) JAX="${1#*=}"; shift ;;
    -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) break ;;
  esac
done
if (($# < 2)); then
  echo "usage: launch/local.sh [--dry-run] [--jax=cuda12|tpu|cpu] CONFIG WORKDIR [flags...]" >&2
  exit 2
fi
CONFIG="$1" WORKDIR="$2"
shift 2
PYTHON="${PYTHON:-python3}"
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"

run() {
  if ((DRY_RUN)); then
    echo "+ $*"
  else
    "$@"
  fi
}

case "$JAX" in
  "") ;;
  cuda12 | tpu) run "$PYTHON" -m pip install -q "jax[$JAX]" -e "$REPO_ROOT" ;;
  cpu) run "$PYTHON" -m pip install -q jax -e "$REPO_ROOT" ;;
  *) echo "local.sh: --jax must be cuda12, tpu or cpu, got '$JAX'" >&2; exit 2 ;;
esac

run "$PYTHON" -m eiw_flow_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
