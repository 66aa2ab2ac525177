"""
What Sophia costs per training step in train.py, against AdamW on the same model, batch and data.

Runs train.py as users run it (scripts/benchmark.py's train_steps: a subprocess, its metrics.jsonl read back),
alternating AdamW and Sophia runs of the same preset, and compares the steady-state time per step from the runs'
own clock (evaluation excluded; the first log window, which holds torch.compile's warm-up, dropped). With
k = optim.hess_interval, every k-th step adds a Hessian refresh: one extra forward and backward on the Hessian
batch, so the floor is (hess_batch / total_batch) / k, 5% with the paper's half batch and k = 10.

    python scripts/bench_overhead.py                                   # CPU presets, half-batch Hessian
    python scripts/bench_overhead.py --hess-batch full --steps 60 --repeats 3
    python scripts/bench_overhead.py --preset gpt2_small --override model.n_layer=2   # on a GPU
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # `python scripts/x.py` puts scripts/, not the repo root, on the path

from config_schema import compose_config
from scripts.benchmark import step_seconds, train_steps, windows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="shakespeare", help="preset stem: <stem>_adamw vs <stem>_<optim>")
    parser.add_argument("--optim", default="sophiag", choices=["sophiag", "sophiah", "lion"])
    parser.add_argument("--hess-batch", default="half", choices=["half", "full"],
                        help="Hessian batch: half the training batch (the paper's subset) or all of it (official loop)")
    parser.add_argument("--steps", type=int, default=60, help="steps per run; a multiple of --window")
    parser.add_argument("--window", type=int, default=10, help="steps per timing window (= k keeps one refresh each)")
    parser.add_argument("--repeats", type=int, default=3, help="AdamW/Sophia pairs, interleaved")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override for both runs")
    args = parser.parse_args()

    sophia_overrides = list(args.override)
    if args.optim.startswith("sophia"):
        sophia_overrides.append(f"optim.hess_interval={args.window}")
        if args.hess_batch == "half":
            base = compose_config(f"{args.preset}_{args.optim}", args.override)
            sophia_overrides.append(f"optim.hess_batch_size={base.total_batch_size // 2}")
    times = {"adamw": [], args.optim: []}
    for repeat in range(args.repeats):
        for optimizer in times:
            overrides = [f"config={args.preset}_{optimizer}",
                         *(sophia_overrides if optimizer == args.optim else args.override)]
            with tempfile.TemporaryDirectory() as out_dir:
                records = train_steps(overrides, args.steps, Path(out_dir) / "run", window=args.window)
            times[optimizer].append(statistics.median(step_seconds(r) for r in windows(records)))
            print(f"repeat {repeat}: {optimizer} {1000 * times[optimizer][-1]:.1f} ms/step", flush=True)

    adamw, sophia = statistics.median(times["adamw"]), statistics.median(times[args.optim])
    ratios = [s / a for s, a in zip(times[args.optim], times["adamw"])]
    print(f"\n| preset | optimizer | ms/step (median of {args.repeats}) | vs AdamW |")
    print("|---|---|---|---|")
    print(f"| {args.preset} | adamw | {1000 * adamw:.1f} | 1.00 |")
    print(f"| {args.preset} | {args.optim} ({' '.join(sophia_overrides)}) | {1000 * sophia:.1f} | "
          f"{sophia / adamw:.3f} |")
    print(f"\n{args.optim}'s step overhead: {100 * (sophia / adamw - 1):+.1f}% (median of per-pair ratios "
          f"{100 * (statistics.median(ratios) - 1):+.1f}%, pairs: {', '.join(f'{100 * (r - 1):+.1f}%' for r in ratios)})")
    print(time.strftime("%Y-%m-%d %H:%M"))


if __name__ == "__main__":
    main()
