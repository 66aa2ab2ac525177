"""
Compare training runs: validation-loss curves side by side, and how many steps (and seconds) each
run needs to reach a target loss, with the speed-up against a baseline.

    python scripts/compare.py out/shakespeare_adamw_max_steps=50 out/shakespeare_sophiag_max_steps=50 --out compare.png
    python scripts/compare.py multirun_out/ --best --baseline adamw      # tuned vs tuned from a sweep
    python scripts/compare.py --wandb ENTITY/PROJECT --group my_experiment --out compare.png
    python scripts/compare.py out/study/char --budgets --baseline adamw --seconds-per-step s.json --out budgets.png

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
    read_seconds_per_step,
    table_json,
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
    args = parser.parse_args(argv)
    try:
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
