"""
What Sophia costs per training step in train.py, against AdamW on the same model, batch and data.

Runs train.py's own loop in this process, alternating AdamW and Sophia runs of the same preset, and compares
the steady-state time per step (evaluation excluded; the first log window, which holds torch.compile's
warm-up, dropped). With k = optim.hess_interval, every k-th step adds a Hessian refresh: one extra forward
and backward on the Hessian batch, so the floor is (hess_batch / total_batch) / k, 5% with the paper's half
batch and k = 10.

    python scripts/bench_overhead.py                                   # CPU presets, half-batch Hessian
    python scripts/bench_overhead.py --hess-batch full --steps 60 --repeats 3
    python scripts/bench_overhead.py --preset gpt2_small --override model.n_layer=2   # on a GPU
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # `python scripts/x.py` puts scripts/, not the repo root, on the path

from hydra import compose, initialize_config_dir

import train


def step_seconds(preset, optimizer, args, overrides, out_dir):
    """Run train.py's loop; return the median steady-state seconds per optimizer step."""
    with initialize_config_dir(config_dir=str(REPO_DIR / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"config={preset}_{optimizer}", f"max_steps={args.steps}", f"log_interval={args.window}",
            f"eval_interval={10 * args.steps}", "eval_steps=1", f"ckpt_interval={10 * args.steps}",
            f"out_dir={out_dir}", f"run_name=bench_{optimizer}", *overrides])
    train.train(cfg)
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["throughput/tokens_per_s"] for r in records if "throughput/tokens_per_s" in r][1:]
    tokens_per_step = cfg.total_batch_size * cfg.model.block_size
    return statistics.median(tokens_per_step / rate for rate in rates), cfg


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

    times = {"adamw": [], args.optim: []}
    sophia_overrides = []
    for repeat in range(args.repeats):
        for optimizer in times:
            overrides = list(args.override)
            if optimizer.startswith("sophia"):
                overrides.append(f"optim.hess_interval={args.window}")
                if args.hess_batch == "half":
                    with initialize_config_dir(config_dir=str(REPO_DIR / "configs"), version_base="1.3"):
                        base = compose(config_name="train", overrides=[f"config={args.preset}_{optimizer}",
                                                                       *args.override])
                    overrides.append(f"optim.hess_batch_size={base.total_batch_size // 2}")
                sophia_overrides = overrides
            with tempfile.TemporaryDirectory() as out_dir:
                seconds, cfg = step_seconds(args.preset, optimizer, args, overrides, out_dir)
            times[optimizer].append(seconds)
            print(f"repeat {repeat}: {optimizer} {1000 * seconds:.1f} ms/step", flush=True)

    adamw, sophia = statistics.median(times["adamw"]), statistics.median(times[args.optim])
    ratios = [s / a for s, a in zip(times[args.optim], times["adamw"])]
    print(f"\n| preset | optimizer | ms/step (median of {args.repeats}) | vs AdamW |")
    print("|---|---|---|---|")
    print(f"| {args.preset} | adamw | {1000 * adamw:.1f} | 1.00 |")
    print(f"| {args.preset} | {args.optim} ({' '.join(sophia_overrides)}) | {1000 * sophia:.1f} | "
          f"{sophia / adamw:.3f} |")
    print(f"\nSophia's step overhead: {100 * (sophia / adamw - 1):+.1f}% (median of per-pair ratios "
          f"{100 * (statistics.median(ratios) - 1):+.1f}%, pairs: {', '.join(f'{100 * (r - 1):+.1f}%' for r in ratios)})")
    print(f"device {cfg.device}, {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    main()
