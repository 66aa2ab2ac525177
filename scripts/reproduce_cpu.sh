#!/usr/bin/env bash
# The paper's comparison at laptop scale: a tiny GPT on the Shakespeare corpus, on CPU.
#   1. a short learning-rate sweep for AdamW and a learning-rate x rho sweep for SophiaG, equal budgets;
#   2. the best setting of each optimizer over three seeds (the sweep's run is the first, seed 1337);
#   3. scripts/compare.py: loss curves, steps to AdamW's final loss, and the speed-up with its spread.
# Usage: bash scripts/reproduce_cpu.sh            (about an hour on 2 CPU cores)
# Rerunning it reuses finished runs (train.py resumes them at their last step).
#        STEPS=100 OUT=out/repro_quick bash scripts/reproduce_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-out/repro}
STEPS=${STEPS:-200}
ADAMW_LRS=${ADAMW_LRS:-5e-4,1e-3,2e-3}
SOPHIA_LRS=${SOPHIA_LRS:-1e-3,2e-3}
SOPHIA_RHOS=${SOPHIA_RHOS:-0.003,0.03}
EXTRA_SEEDS=${EXTRA_SEEDS:-2,3}
# identical for both optimizers: model, data order, batch, schedule, evaluation
COMMON=(max_steps="$STEPS" eval_interval=20 eval_steps=16 log_interval=10 ckpt_interval=1000)
start=$(date +%s)
mkdir -p "$OUT"

# The two optimizers run side by side, one thread each, so that their wall-clock times are comparable.
export OMP_NUM_THREADS=1

echo "== 1. sweep (${STEPS} steps per run)"
python train.py -m config=shakespeare_adamw optim.lr="$ADAMW_LRS" "${COMMON[@]}" \
    'out_dir='"$OUT"'/sweep/${run_name}' > "$OUT/sweep_adamw.log" 2>&1 &
python train.py -m config=shakespeare_sophiag optim.lr="$SOPHIA_LRS" optim.rho="$SOPHIA_RHOS" "${COMMON[@]}" \
    'out_dir='"$OUT"'/sweep/${run_name}' > "$OUT/sweep_sophiag.log" 2>&1 &
wait
python scripts/compare.py "$OUT/sweep" --best --baseline adamw --out "$OUT/sweep.png" --json "$OUT/sweep.json"

# From compare.py's table: the winner's overrides ("optim.lr=0.002 optim.rho=0.003") or its run directory.
best() {
    python -c '
import json, sys
table, name, what = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
[group] = [g for g in table["groups"] if g["settings"]["optim.name"] == name]
keys = ["optim.lr", "optim.rho"] if name.startswith("sophia") else ["optim.lr"]
settings = group["settings"]
print(" ".join(f"{k}={settings[k]}" for k in keys) if what == "overrides" else group["runs"][0])
' "$OUT/sweep.json" "$1" "$2"
}

echo "== 2. the best of each, again with seeds ${EXTRA_SEEDS}"
for preset in adamw sophiag; do
    overrides=$(best "$preset" overrides)
    echo "best $preset: $overrides"
    # shellcheck disable=SC2086  # the overrides are separate words
    python train.py -m config=shakespeare_$preset $overrides seed="$EXTRA_SEEDS" "${COMMON[@]}" \
        'out_dir='"$OUT"'/best/${run_name}' > "$OUT/seeds_$preset.log" 2>&1 &
done
wait

echo "== 3. compare"
python scripts/compare.py "$(best adamw run)" "$(best sophiag run)" "$OUT/best" --baseline adamw \
    --out "$OUT/compare.png" --json "$OUT/compare.json"
echo "reproduction took $(( ($(date +%s) - start) / 60 )) minutes; plot in $OUT/compare.png"
