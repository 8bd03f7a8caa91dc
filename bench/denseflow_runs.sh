#!/usr/bin/env bash
# Small DenseFlow, EIW vs vanilla transitions, 3 seeds (docs/results.md, issue 8).
#
#   bench/denseflow_runs.sh SUITE OUT_DIR [SPLIT:SEED ...]
#
# SUITE is `digits` (configs/digits_denseflow.py) or `mnist_idx` (configs/mnist_idx_denseflow.py).
# Without SPLIT:SEED items the queue is eiw and vanilla for seeds 0 1 2, seed-major. Runs are
# sequential; a run whose results.json exists is skipped. Each run writes OUT_DIR/SPLIT/seedS/
# (results.json with the test ELBO and IWBO bpd, train.log) and appends "split seed
# wall_seconds exit_code" to OUT_DIR/times.tsv. Run from the repository root; PYTHON picks the
# interpreter (e.g. PYTHON="nice -n 19 python"). The mnist_idx suite reads the MNIST idx files
# from MNIST_DIR (--config.dataset.source_dir).
set -u
suite=${1:?usage: bench/denseflow_runs.sh digits|mnist_idx OUT_DIR [SPLIT:SEED ...]}
out=${2:?usage: bench/denseflow_runs.sh digits|mnist_idx OUT_DIR [SPLIT:SEED ...]}
shift 2
queue=("$@")
python=${PYTHON:-python}
extra=()
case "$suite" in
  digits) config=configs/digits_denseflow.py ;;
  mnist_idx)
    config=configs/mnist_idx_denseflow.py
    extra=(--config.dataset.source_dir="${MNIST_DIR:?set MNIST_DIR to the directory of the MNIST idx files}") ;;
  *) echo "unknown suite $suite (expected digits or mnist_idx)" >&2; exit 2 ;;
esac
if [ ${#queue[@]} -eq 0 ]; then
  for seed in 0 1 2; do queue+=("eiw:$seed" "vanilla:$seed"); done
fi
for item in "${queue[@]}"; do
  split=${item%%:*} seed=${item##*:}
  case "$split" in
    eiw|vanilla) ;;
    *) echo "unknown split $split (expected eiw or vanilla)" >&2; exit 2 ;;
  esac
  dir="$out/$split/seed$seed"
  [ -f "$dir/results.json" ] && continue
  rm -rf "$dir" && mkdir -p "$dir"
  start=$(date +%s)
  # shellcheck disable=SC2086
  $python -m eiw_flow_jax.main --config="$config" --workdir="$dir" \
      --config.model.split="$split" --config.seed="$seed" \
      --config.checkpoint_every_steps=0 --config.sample.num_samples=16 "${extra[@]}" \
      >"$dir/train.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$split" "$seed" "$(( $(date +%s) - start ))" "$rc" >>"$out/times.tsv"
done
