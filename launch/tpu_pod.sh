#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice (one host or a pod): creates the slice unless it exists, installs
# this checkout and jax[tpu] on every worker, then runs the same command on all workers, with
# the workdir (and the TFDS data dir) on a bucket, the only storage a pod's hosts share.
#
#   launch/tpu_pod.sh --name=eiw-v4 --zone=us-central2-b --accelerator=v4-32 \
#       --bucket=gs://my-bucket --config=configs/imagenet64.py [--dry-run] [-- main.py flags]
#
# Flags:
#   --name=NAME            TPU VM name (required)
#   --zone=ZONE            e.g. us-central2-b (required)
#   --accelerator=TYPE     accelerator type, e.g. v4-8, v4-32, v5litepod-16 (required)
#   --bucket=gs://BUCKET   holds runs/ and tensorflow_datasets/ (required)
#   --config=PATH          config file in this repository (default configs/cifar10.py)
#   --run=RUN              run name: workdir is BUCKET/runs/RUN (default: NAME)
#   --data_dir=URL         TFDS data dir (default BUCKET/tensorflow_datasets), prepared beforehand
#   --version=IMAGE        TPU VM software version (default tpu-ubuntu2204-base)
#   --project=PROJECT      gcloud project (default: gcloud's configured one)
#   --spot                 create the slice as Spot capacity (preemptible)
#   --skip_install         the workers already have the project installed
#   --detach               start training in the background on the workers (log: ~/RUN.log)
#   --dry-run              print every command instead of running it
# Anything after `--` is passed to `python -m eiw_flow_jax.main` (e.g. --config.batch_size=512).
#
# Preemption: a Spot/preemptible slice gets SIGTERM; training saves a checkpoint and exits 143.
# Run this script again (same flags): it reuses or recreates the slice and resumes the run.
set -euo pipefail

NAME="" ZONE="" ACCELERATOR="" BUCKET="" RUN="" DATA_DIR="" PROJECT=""
CONFIG="configs/cifar10.py"
VERSION="tpu-ubuntu2204-base"
SPOT=0 SKIP_INSTALL=0 DETACH=0 DRY_RUN=0
EXTRA=()

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

while (($#)); do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=* | --accelerator-type=*) ACCELERATOR="${1#*=}" ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --run=*) RUN="${1#*=}" ;;
    --data_dir=*) DATA_DIR="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --skip_install) SKIP_INSTALL=1 ;;
    --detach) DETACH=1 ;;
    --dry-run | --dry_run) DRY_RUN=1 ;;
    -h | --help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

missing=()
for pair in "name:$NAME" "zone:$ZONE" "accelerator:$ACCELERATOR" "bucket:$BUCKET"; do
  [[ -n "${pair#*:}" ]] || missing+=("--${pair%%:*}")
done
if ((${#missing[@]})); then
  echo "tpu_pod.sh: missing ${missing[*]} (see --help)" >&2
  exit 2
fi
if [[ "$BUCKET" != gs://* ]]; then
  echo "tpu_pod.sh: --bucket must be a gs:// URL (the workers share nothing else), got '$BUCKET'" >&2
  exit 2
fi
BUCKET="${BUCKET%/}"
RUN="${RUN:-$NAME}"
DATA_DIR="${DATA_DIR:-$BUCKET/tensorflow_datasets}"
WORKDIR="$BUCKET/runs/$RUN"
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [[ ! -f "$REPO_ROOT/${CONFIG%%:*}" ]]; then  # configs/x.py:variant names configs/x.py
  echo "tpu_pod.sh: no config file $CONFIG in $REPO_ROOT" >&2
  exit 2
fi

# One argument per word, quoted only where the shell needs it (what --dry-run prints).
quote() {
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./=:@,+%-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {
  if ((DRY_RUN)); then
    echo "+ $(quote "$@")"
  else
    "$@"
  fi
}

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")

# 1. Create the slice unless it exists (reused as it is otherwise).
if ((DRY_RUN)) || ! "${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}" >/dev/null 2>&1; then
  create=("${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type="$ACCELERATOR"
          --version="$VERSION")
  ((SPOT)) && create+=(--spot)
  ((DRY_RUN)) && echo "# if '$(quote "${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}")' fails:"
  run "${create[@]}"
else
  echo "Reusing TPU VM $NAME in $ZONE."
fi

SSH=("${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all)

# 2. This checkout (committed files) and jax[tpu] on every worker, in ~/eiw_venv.
if ((!SKIP_INSTALL)); then
  ARCHIVE="${TMPDIR:-/tmp}/eiw_flow_jax-$RUN.tar.gz"
  run git -C "$REPO_ROOT" archive --format=tar.gz --output="$ARCHIVE" HEAD
  run "${GCLOUD[@]}" scp "$ARCHIVE" "$NAME:eiw_flow_jax.tar.gz" "${COMMON[@]}" --worker=all
  install="rm -rf ~/eiw_flow_jax && mkdir -p ~/eiw_flow_jax"
  install+=" && tar -xzf ~/eiw_flow_jax.tar.gz -C ~/eiw_flow_jax"
  install+=" && python3 -m venv ~/eiw_venv && ~/eiw_venv/bin/pip install -q -U pip"
  install+=" && ~/eiw_venv/bin/pip install -q 'jax[tpu]' -e ~/eiw_flow_jax[gcs]"
  run "${SSH[@]}" --command="$install"
fi

# 3. The same command on every worker; JAX finds the pod's coordinator itself.
# (~ is expanded on the workers, so it stays outside the quoted arguments.)
train=(-m eiw_flow_jax.main --config="$CONFIG" --workdir="$WORKDIR"
       --config.dataset.data_dir="$DATA_DIR" --distributed "${EXTRA[@]}")
# shellcheck disable=SC2088
python="~/eiw_venv/bin/python"
command="cd ~/eiw_flow_jax && $python $(quote "${train[@]}")"
if ((DETACH)); then
  command="cd ~/eiw_flow_jax && nohup setsid $python $(quote "${train[@]}") > ~/$RUN.log 2>&1 < /dev/null &"
fi
run "${SSH[@]}" --command="$command"
if ((DETACH)); then
  echo "Started on every worker of $NAME; logs in ~/$RUN.log there, results in $WORKDIR."
fi
