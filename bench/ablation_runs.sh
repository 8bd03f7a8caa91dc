#!/usr/bin/env bash
# Ablations of the EIW Shuffle (docs/results.md, issue 10): 6 variants x seeds on one dataset.
#
#   bench/ablation_runs.sh SUITE OUT_DIR [VARIANT:SEED ...]
#
# SUITE is `mnist_idx` (configs/mnist_idx.py shrunk to a 2-core CPU budget, see BUDGET below) or
# `digits` (configs/digits.py unchanged, plus test bpd every 250 steps). Without VARIANT:SEED
# items the queue is all 6 variants x seeds 0 1 2, seed-major (every variant of seed 0, then
# seed 1, ...) so that an interrupted sweep still holds complete paired seeds.
#
# Several copies of this script may work on one OUT_DIR at once (e.g. one per free core): each
# run is claimed atomically (mkdir OUT_DIR/.claims/VARIANT-seedS) so no run is done twice. A run
# whose results.json exists is skipped; to retry failed or interrupted runs, delete
# OUT_DIR/.claims and start the script again. Each run writes OUT_DIR/VARIANT/seedS/
# (TensorBoard events, results.json, train.log) and appends "variant seed wall_seconds
# exit_code" to OUT_DIR/times.tsv. Run from the repository root; PYTHON picks the interpreter.
# The mnist_idx suite reads the MNIST idx files from MNIST_DIR (--config.dataset.source_dir).
set -u
suite=${1:?usage: bench/ablation_runs.sh mnist_idx|digits OUT_DIR [SEEDS...]}
out=${2:?usage: bench/ablation_runs.sh mnist_idx|digits OUT_DIR [SEEDS...]}
shift 2
queue=("$@")
python=${PYTHON:-python}

case "$suite" in
  mnist_idx)
    # BUDGET: L=2, K=4, hidden 64, batch 32, 600 steps (~2.1 epochs of the 9000 images), test
    # bpd every 200 steps. About 2.5 minutes per run on 2 quiet CPU cores, ~10 on a loaded one.
    mnist_dir=${MNIST_DIR:?set MNIST_DIR to the directory of the MNIST idx files}
    common=(--config=configs/mnist_idx.py --config.dataset.source_dir="$mnist_dir"
            --config.model.steps_per_level=4
            --config.model.hidden_channels=64 --config.batch_size=32
            --config.num_train_steps=600 --config.optimizer.warmup_steps=100
            --config.log_every_steps=50 --config.eval_every_steps=200
            --config.checkpoint_every_steps=0 --config.sample.num_samples=16) ;;
  digits)
    common=(--config=configs/digits.py --config.eval_every_steps=250) ;;
  *) echo "unknown suite $suite (expected mnist_idx or digits)" >&2; exit 2 ;;
esac

declare -A variants=(
  [vanilla]="--config.model.split=vanilla"
  [global]="--config.model.split=eiw --config.model.eiw.mode=global"
  [global_frozen]="--config.model.split=eiw --config.model.eiw.mode=global --config.model.eiw.freeze_permutation=True"
  [per_example]="--config.model.split=eiw --config.model.eiw.mode=per_example"
  [per_example_weights_only]="--config.model.split=eiw --config.model.eiw.mode=per_example --config.model.eiw.use_permutation=False"
  [per_example_permutation_only]="--config.model.split=eiw --config.model.eiw.mode=per_example --config.model.eiw.use_weights=False"
)
if [ ${#queue[@]} -eq 0 ]; then
  for seed in 0 1 2; do
    for variant in vanilla global global_frozen per_example per_example_weights_only \
        per_example_permutation_only; do
      queue+=("$variant:$seed")
    done
  done
fi

mkdir -p "$out/.claims"
for item in "${queue[@]}"; do
    variant=${item%%:*} seed=${item##*:}
    if [ -z "${variants[$variant]+set}" ]; then
      echo "unknown variant $variant (expected one of ${!variants[*]})" >&2; exit 2
    fi
    dir="$out/$variant/seed$seed"
    [ -f "$dir/results.json" ] && continue
    mkdir "$out/.claims/$variant-seed$seed" 2>/dev/null || continue
    rm -rf "$dir" && mkdir -p "$dir"
    start=$(date +%s)
    # shellcheck disable=SC2086
    "$python" -m eiw_flow_jax.main "${common[@]}" ${variants[$variant]} --config.seed="$seed" \
        --workdir="$dir" >"$dir/train.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$variant" "$seed" "$(( $(date +%s) - start ))" "$rc" >>"$out/times.tsv"
done
