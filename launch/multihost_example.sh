#!/usr/bin/env bash
# Runs one training job as N JAX processes on this machine (CPU), the way N hosts would run it.
#
#   launch/multihost_example.sh [NUM_PROCESSES] [WORKDIR] [extra main.py flags...]
#
# Each process gets DEVICES_PER_PROCESS simulated CPU devices, so the global mesh has
# NUM_PROCESSES * DEVICES_PER_PROCESS devices; every process reads its own share of each batch.
# On a real cluster run the same main.py command once per host (see launch/README.md).
set -euo pipefail

NUM_PROCESSES="${1:-2}"
WORKDIR="${2:-/tmp/eiw_flow_multihost}"
shift $(( $# > 2 ? 2 : $# ))
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-2}"
PORT="${PORT:-12355}"
PYTHON="${PYTHON:-python}"
CONFIG="${CONFIG:-configs/digits.py}"

cd "$(dirname "$0")/.."

# Prepare the dataset once, so the processes do not all build it at the same time.
"$PYTHON" - "$CONFIG" "$@" <<'PY'
import sys
from absl import flags
from ml_collections import config_flags
_CONFIG = config_flags.DEFINE_config_file("config")
flags.FLAGS(["prepare", f"--config={sys.argv[1]}", *[a for a in sys.argv[2:] if a.startswith("--config.")]])
from eiw_flow_jax import data
data.prepare_dataset(_CONFIG.value)
PY

pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" \
  "$PYTHON" -m eiw_flow_jax.main \
    --config="$CONFIG" \
    --workdir="$WORKDIR" \
    --distributed \
    --coordinator_address="localhost:${PORT}" \
    --num_processes="$NUM_PROCESSES" \
    --process_id="$i" \
    "$@" > "${WORKDIR%/}.process_${i}.log" 2>&1 &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
echo "Logs: ${WORKDIR%/}.process_*.log (exit status ${status})"
tail -n 3 "${WORKDIR%/}.process_0.log"
exit "$status"
