#!/usr/bin/env bash
# The paper's comparison at laptop scale: a tiny GPT on the Shakespeare corpus, on CPU.
#   1. a short learning-rate sweep for AdamW and a learning-rate x rho sweep for SophiaG, equal budgets;
#   2. the best setting of each optimizer over three seeds (the sweep's run is the first, seed 1337), and
#      a third contender: AdamW at its best lr clipped as the official small run was (clip 1/6, eps 1e-8/6,
#      see configs/config/gpt2_small_adamw_official.yaml), seeds 1337, 2, 3;
#   3. scripts/compare.py: loss curves, steps to AdamW's final loss, and the speed-up with its spread;
#   4. SophiaG's win rate per part: the token embedding and the transformer blocks.
# Usage: bash scripts/reproduce_cpu.sh            (its duration on 2 CPU cores: see the README)
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
# AdamW as the official train_adam.py ran GPT-2 small: the loss of A = 6 micro-batches not divided by A
OFFICIAL_ADAMW=(grad_clip=0.16666666666666666 optim.eps=1.6666666666666667e-09)
start=$(date +%s)
mkdir -p "$OUT"
python data/shakespeare/prepare.py > /dev/null  # once, before two processes would both prepare it

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

echo "== 2. the best of each, again with seeds ${EXTRA_SEEDS}; official-style AdamW with three seeds"
adamw_best=$(best adamw overrides)
sophiag_best=$(best sophiag overrides)
echo "best adamw: $adamw_best; best sophiag: $sophiag_best"
seeds() {  # seeds PRESET SEEDS OVERRIDES...: one Hydra multirun over the seeds, into $OUT/best
    local preset=$1 seeds=$2
    shift 2
    python train.py -m config=shakespeare_"$preset" "$@" seed="$seeds" "${COMMON[@]}" 'out_dir='"$OUT"'/best/${run_name}'
}
# two lanes of about equal work (a SophiaG run costs ~1.1 AdamW runs)
# shellcheck disable=SC2086  # the overrides are separate words
(seeds adamw "$EXTRA_SEEDS" $adamw_best && seeds adamw 1337,2 $adamw_best "${OFFICIAL_ADAMW[@]}") \
    > "$OUT/seeds_adamw.log" 2>&1 &
# shellcheck disable=SC2086
(seeds sophiag "$EXTRA_SEEDS" $sophiag_best && seeds adamw 3 $adamw_best "${OFFICIAL_ADAMW[@]}") \
    > "$OUT/seeds_sophiag.log" 2>&1 &
wait

echo "== 3. compare"
python scripts/compare.py "$(best adamw run)" "$(best sophiag run)" "$OUT/best" --baseline "$(best adamw run)" \
    --out "$OUT/compare.png" --json "$OUT/compare.json"

echo "== 4. SophiaG's win rate (fraction of coordinates not clipped) per part, over the logged steps"
python - "$OUT" "$(best sophiag run)" <<'PY'
import json, pathlib, sys
out, first_run = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
runs = [first_run] + sorted(p for p in (out / "best").glob("shakespeare_sophiag_*") if p.is_dir())
print("| run | part | mean over steps | max | at the last step |")
print("|---|---|---|---|---|")
for run in runs:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    for part in ("", "/embedding", "/blocks"):
        values = [r["optim/win_rate" + part] for r in rows if "optim/win_rate" + part in r]
        print(f"| {run.name} | {part.lstrip('/') or 'all'} | {sum(values) / len(values):.4f} | "
              f"{max(values):.4f} | {values[-1]:.4f} |")
PY
echo "reproduction took $(( ($(date +%s) - start) / 60 )) minutes; plot in $OUT/compare.png"
