"""
Compare training runs: validation-loss curves side by side, and how many steps (and seconds) each
run needs to reach a target loss, with the speed-up against a baseline.

    python scripts/compare.py out/shakespeare_adamw_max_steps=50 out/shakespeare_sophiag_max_steps=50 --out compare.png
    python scripts/compare.py multirun_out/ --best --baseline adamw      # tuned vs tuned from a sweep
    python scripts/compare.py --wandb ENTITY/PROJECT --group my_experiment --out compare.png
    python scripts/compare.py out/study/char --budgets --baseline adamw --seconds-per-step s.json --out budgets.png
    python scripts/compare.py out/run_a out/run_b --metric eval/hellaswag_acc_norm --x tokens --out hellaswag.png

Runs whose configs are identical except for `seed`, `out_dir`, `run_name`, `resume`, `wandb.*` and the
logging knobs are seeds of one group; a group's curve is the mean over its seeds. The target loss defaults to the
baseline's final validation loss (mean over its seeds); the baseline is the first group unless
--baseline names another. The markdown table printed at the end explains itself in its footnotes.
Two runs with the same seed in one group are refused (one run passed twice counts once); runs that differ in
length, schedule, batch or data are compared with a warning (printed, and marked in the table).

--budgets: runs of one setting at several max_steps (each its own full schedule) and seeds. Per optimizer and
budget: the final val loss with its 95% t-interval over seeds, and the data multiplier: the steps the baseline would
need to reach that loss, read off the baseline's final-loss-vs-steps curve (seed means per budget, linear in
log(steps); beyond its range only through the printed fit L = a + b·ln(steps), marked †), divided by the run's
steps, per seed, then mean and 95% interval. The time multiplier scales it by the measured seconds per step
(--seconds-per-step, a JSON {label: s/step}); the paper's steps-to-target on each budget's schedule beside it.

The statistics, tables and plots are the study's library's (studylib.py); this is its command line.
"""

import argparse
import difflib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from studylib import (  # noqa: E402  (the statistics, tables and plots live in the study's library)
    CompareError,
    Group,
    analyse,
    analyse_budgets,
    budget_groups,
    budget_json,
    budget_table,
    by_budget,
    check_seeds,
    clean,
    final_losses,
    find_baseline,
    find_run_dirs,
    group_runs,
    label_groups,
    length_warnings,
    load_run_dir,
    load_wandb_runs,
    markdown_table,
    mismatch_warnings,
    pick_best,
    plot,
    plot_budgets,
    read_metrics,
    read_seconds_per_step,
    table_json,
    time_unit,
)


def main_budgets(runs, args):
    """--budgets: the table, the plot (final loss vs steps) and the JSON."""
    groups = budget_groups(runs)
    for g in groups:
        check_seeds([Group(runs=r, settings=g.settings, label=f"{g.label} at {s} steps") for s, r in by_budget(g).items()])
    baseline = find_baseline(groups, args.baseline)
    seconds = read_seconds_per_step(args.seconds_per_step) if args.seconds_per_step else None
    unknown = sorted(set(seconds or {}) - {g.label for g in groups})
    if unknown:
        raise CompareError(f"--seconds-per-step names {unknown}, which are not among the labels "
                           f"{[g.label for g in groups]}: key the JSON by these labels")
    curve = analyse_budgets(groups, baseline, seconds)
    print(budget_table(groups, baseline, curve))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot_budgets(groups, baseline, args.out)
    print(f"\nwrote {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(budget_json(groups, baseline, curve), f, indent=2)
        print(f"wrote {args.json}")
    return 0


# -----------------------------------------------------------------------------
# --metric NAME: any logged key (eval/hellaswag_acc_norm, train/loss, optim/win_rate, ...) against steps, tokens or time

METRIC_AXES = {"steps": "step", "tokens": "tokens", "time": "time/elapsed_s"}  # --x -> the logged key


def metric_series(events, metric, x_key):
    """(x, values), each (P,), of the events that logged `metric` (not null), in step order; a step logged twice (a
    resumed run) keeps its later event. x is NaN where the event lacks x_key."""
    by_step = {int(e["step"]): e for e in events if e.get(metric) is not None and e.get("step") is not None}
    steps = sorted(by_step)
    x = np.array([np.nan if by_step[s].get(x_key) is None else float(by_step[s][x_key]) for s in steps])
    return x, np.array([float(by_step[s][metric]) for s in steps])


def main_metric(args):
    """--metric: a line per run of the metric against --x, and a table of its first, last, min and max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run_dir(d) for d in find_run_dirs(args.runs)]
    groups = group_runs(runs)
    label_groups(groups)  # labels as in the loss comparison: the optimizer and what tells the runs apart
    x_key, series, seen = METRIC_AXES[args.x], [], set()
    for g in groups:
        for run in g.runs:
            events = read_metrics(os.path.join(run.path, "metrics.jsonl"))
            seen.update(k for e in events for k in e)
            name = g.label + (f" seed={run.config.get('seed')}" if len(g.runs) > 1 else "")
            series.append((name, run.name, *metric_series(events, args.metric, x_key)))
    if not any(len(values) for *_, values in series):
        close = difflib.get_close_matches(args.metric, sorted(seen), n=1)
        raise CompareError(f"no run logged {args.metric!r}" + (f" (did you mean {close[0]}?)" if close else "")
                           + f"; logged keys: {', '.join(sorted(seen))}")
    divisor, unit = (1, "")
    if args.x == "time":
        divisor, unit = time_unit(max((np.nanmax(x) for *_, x, _ in series if np.isfinite(x).any()), default=0.0))
    x_label = {"steps": "optimizer steps", "tokens": "training tokens", "time": f"wall-clock ({unit})"}[args.x]

    rows = [f"| run | points | first | last | min (at {x_label}) | max (at {x_label}) |", "|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, path, x, values in series:
        if not len(values):
            rows.append(f"| {name} | 0 | n/a | n/a | n/a | n/a |")
            print(f"warning: {path} logged no {args.metric}", file=sys.stderr)
            continue
        lo, hi = int(np.nanargmin(values)), int(np.nanargmax(values))
        rows.append(f"| {name} | {len(values)} | {values[0]:.4g} | {values[-1]:.4g} | {values[lo]:.4g} "
                    f"({x[lo] / divisor:g}) | {values[hi]:.4g} ({x[hi] / divisor:g}) |")
        ok = np.isfinite(x) & np.isfinite(values)
        ax.plot(x[ok] / divisor, values[ok], marker="o" if ok.sum() < 30 else None, ms=3, label=name)
    print("\n".join(rows))
    ax.set_xlabel(x_label)
    ax.set_ylabel(args.metric)
    ax.set_title(f"{args.metric} against {x_label}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"\nwrote {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(clean({"metric": args.metric, "x": args.x, "runs": [
                {"label": name, "run": path, "x": x.tolist(), "values": values.tolist()}
                for name, path, x, values in series]}), f, indent=2)
        print(f"wrote {args.json}")
    return 0


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run directories, or directories holding run directories")
    parser.add_argument("--out", default="out/compare.png", help="PNG to write (default: out/compare.png)")
    parser.add_argument("--target-loss", type=float, help="default: the baseline's final val loss, mean over seeds")
    parser.add_argument("--baseline", help="group label, optimizer name or run directory (default: the first group)")
    parser.add_argument("--best", action="store_true", help="per optimizer, keep only its best setting of a sweep")
    parser.add_argument("--json", help="also write the table's numbers to this JSON file")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from W&B instead of (or as well as) dirs")
    parser.add_argument("--group", help="the W&B group to read (with --wandb)")
    parser.add_argument("--budgets", action="store_true",
                        help="runs of several max_steps (each its own full schedule): final loss per budget and the "
                             "data multiplier against the baseline's final-loss-vs-steps curve")
    parser.add_argument("--seconds-per-step", metavar="JSON",
                        help="with --budgets: {label: measured seconds per step}, for the time multiplier")
    parser.add_argument("--metric", metavar="NAME",
                        help="plot and tabulate any logged key instead of val/loss, e.g. eval/hellaswag_acc_norm")
    parser.add_argument("--x", choices=sorted(METRIC_AXES), default="steps", help="with --metric: the x axis")
    args = parser.parse_args(argv)
    try:
        if args.metric:
            if args.wandb or args.budgets or args.best or args.target_loss is not None or args.seconds_per_step:
                raise CompareError("--metric reads run directories, with --x, --out and --json only")
            if not args.runs:
                raise CompareError("nothing to compare: pass run directories")
            if not args.out.lower().endswith(".png"):
                raise CompareError(f"--out {args.out}: give a .png file name")
            return main_metric(args)
        if not args.runs and not args.wandb:
            raise CompareError("nothing to compare: pass run directories, or --wandb ENTITY/PROJECT --group G")
        if args.wandb and not args.group:
            raise CompareError("--wandb needs --group G (the W&B group of the runs to compare)")
        if not args.out.lower().endswith(".png"):
            raise CompareError(f"--out {args.out}: give a .png file name")
        if args.target_loss is not None and not math.isfinite(args.target_loss):
            raise CompareError("--target-loss must be a finite number")

        runs = [load_run_dir(d) for d in find_run_dirs(args.runs)]
        if args.wandb:
            runs += load_wandb_runs(args.wandb, args.group)
        if args.budgets:
            return main_budgets(runs, args)
        if args.seconds_per_step:
            raise CompareError("--seconds-per-step goes with --budgets")
        groups = group_runs(runs)
        label_groups(groups)
        check_seeds(groups)
        if args.best:
            groups, lines = pick_best(groups)
            print("\n".join(lines) + "\n")
        baseline = find_baseline(groups, args.baseline)
        warnings = length_warnings(groups) + mismatch_warnings(groups, baseline)
        if args.target_loss is not None:
            target, target_source = args.target_loss, "--target-loss"
        else:
            target = float(np.mean(final_losses(baseline)))
            target_source = f"final val loss of the baseline {baseline.label}, mean over {len(baseline.runs)} seed(s)"
            if not math.isfinite(target):
                raise CompareError(f"the baseline {baseline.label}'s final val loss is {target} (diverged?); "
                                   "pass --target-loss or another --baseline")
        analyse(groups, baseline, target)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    for message, _ in warnings:
        print(f"warning: {message}", file=sys.stderr)
    print(markdown_table(groups, baseline, target, target_source, warnings))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot(groups, baseline, target, target_source, args.out)
    print(f"\nwrote {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table_json(groups, baseline, target, target_source, warnings), f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
