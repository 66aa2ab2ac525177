"""
The optimizer study's library: training runs read and compared (loss curves, steps to a target, speed-ups), the
budget statistics (final loss per budget with 95% intervals, the data multiplier read off the baseline's
final-loss-vs-steps curve and its fit), and the study itself: its definition (configs/study/*.yaml), the runs it
makes (locally or as SLURM jobs), the record they leave, the plan of what is left with its estimated compute, and
the report with its tables and plots. scripts/study.py and scripts/compare.py are its command lines.

Parts, in order: reading runs; grouping; statistics; tables and plots; budgets; the study's definition; runs and
the record; launchers; sweep and budgets; the plan; timing; verify; the report.
"""

import difflib
import functools
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from functools import reduce
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent

# config keys that change neither the loss curve nor the speed of a run: runs differing only in these are
# seeds of one group
IGNORED_CONFIG_KEYS = ("seed", "out_dir", "run_name", "resume", "log_interval", "ckpt_interval", "cpu_peak_flops")
IGNORED_CONFIG_PREFIXES = ("wandb.", "hydra.", "_")
# config keys that still separate groups but make their comparison unfair, and why (a warning, not an error)
MISMATCH_REASONS = {
    "max_steps": "their speed-up compares different schedules",
    "warmup_steps": "their speed-up compares different schedules",
    "lr_decay_steps": "their speed-up compares different schedules",
    "min_lr": "their speed-up compares different schedules",
    "total_batch_size": "a step is not the same number of tokens: compare them per token, not per step",
    "model.block_size": "a step is not the same number of tokens: compare them per token, not per step",
    "data.name": "their losses are measured on different data",
    "data.dir": "their losses are measured on different data",
}
# the keys of an eval row in W&B history: train.py logs our `step` as W&B's own _step
WANDB_EVAL_KEYS = ["_step", "tokens", "val/loss", "time/elapsed_s"]


class CompareError(Exception):
    """Bad input: main() prints the message and exits with status 2."""


@dataclass
class Run:
    name: str                # run directory (or W&B run name)
    config: dict             # flat: {"optim.name": "sophiag", "optim.lr": 0.0006, "seed": 1, ...}
    steps: np.ndarray        # (E,) optimizer steps at each eval, strictly increasing
    tokens: np.ndarray       # (E,) training tokens consumed by then (NaN where not logged)
    elapsed_s: np.ndarray    # (E,) wall-clock seconds since the run started (NaN where not logged)
    val_loss: np.ndarray     # (E,) validation loss (NaN if the run diverged)
    path: str | None = None  # absolute run directory, None for W&B runs


@dataclass
class Group:
    runs: list               # list[Run], the seeds of one setting
    settings: dict           # the shared config without the ignored keys
    label: str = ""
    # filled by analyse():
    stats: dict = field(default_factory=dict)


# -----------------------------------------------------------------------------
# reading runs

def flatten(config, prefix=""):
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; already-dotted keys (W&B) stay as they are."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def run_from_events(name, config, events, path=None):
    """Build a Run from logged events (dicts). Only eval events (those with a val/loss) are kept.
    A resumed run may log a step twice: the later event wins."""
    by_step = {}
    for event in events:
        if event.get("val/loss") is None:
            continue
        if event.get("step") is None:
            raise CompareError(f"{name}: an eval event has no 'step': {event}")
        by_step[int(event["step"])] = event
    if not by_step:
        keys = sorted({k for e in events for k in e})
        raise CompareError(f"{name}: no 'val/loss' in its {len(events)} logged events (keys seen: {keys}); "
                           "compare.py needs eval events: does the run evaluate (eval_interval <= max_steps)?")
    steps = sorted(by_step)

    def column(key):  # (E,) float array, NaN where the key is missing
        values = [by_step[s].get(key) for s in steps]
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)

    run = Run(name=name, config=flatten(config), steps=np.array(steps, dtype=np.float64),
              tokens=column("tokens"), elapsed_s=column("time/elapsed_s"), val_loss=column("val/loss"), path=path)
    clock = run.elapsed_s[np.isfinite(run.elapsed_s)]
    if np.any(np.diff(clock) < 0):
        print(f"warning: {name}: time/elapsed_s goes backwards (a resumed run that restarted its clock?); "
              "its wall-clock numbers are not meaningful", file=sys.stderr)
    return run


def read_metrics(path):
    """metrics.jsonl -> list of dicts. A broken LAST line (a run killed mid-write) is skipped with a warning;
    a broken line anywhere else is an error."""
    with open(path) as f:
        lines = [(number, line) for number, line in enumerate(f, start=1) if line.strip()]
    if not lines:
        raise CompareError(f"{path} is empty: the run logged nothing yet")
    events = []
    for number, line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError as e:
            if number == lines[-1][0]:
                print(f"warning: {path}: ignoring a partial last line (the run was killed while writing?)",
                      file=sys.stderr)
                break
            raise CompareError(f"{path} line {number} is not valid JSON ({e}); only a partial last line is tolerated")
        if not isinstance(event, dict):
            raise CompareError(f"{path} line {number} is not a JSON object")
        events.append(event)
    return events


def load_run_dir(run_dir):
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise CompareError(f"{run_dir} has metrics.jsonl but no config.yaml, which compare.py needs to group "
                           "seeds and label runs: is it a train.py run directory?")
    with open(config_path) as f:
        config = yaml.safe_load(f) or {}
    events = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return run_from_events(run_dir, config, events, path=os.path.realpath(run_dir))


def natural_key(text):
    """'run10' after 'run9': Hydra multirun job dirs are numbered 0, 1, ..., 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def close_dirs(path):
    """Existing sibling folders named like a missing one: train.py names a run out/<preset>_<overrides>, so
    `out/shakespeare_adamw` is often `out/shakespeare_adamw_max_steps=50`."""
    parent, name = os.path.split(os.path.normpath(path))
    if not os.path.isdir(parent or "."):
        return []
    siblings = sorted(d for d in os.listdir(parent or ".") if os.path.isdir(os.path.join(parent, d)))
    longer = [d for d in siblings if d.startswith(name)]  # the same preset, with overrides
    return [os.path.join(parent, d) for d in longer[:3] or difflib.get_close_matches(name, siblings, n=1)]


def find_run_dirs(paths):
    """Each path is a run directory, its metrics.jsonl, or a directory searched recursively for run dirs."""
    run_dirs = []
    for path in paths:
        if os.path.basename(path) == "metrics.jsonl" and os.path.isfile(path):
            found = [os.path.dirname(path) or "."]
        elif not os.path.isdir(path):
            near = close_dirs(path)
            raise CompareError(f"{path}: no such directory" + (f"; did you mean {' or '.join(near)}?" if near else ""))
        elif os.path.isfile(os.path.join(path, "metrics.jsonl")):
            found = [path]
        else:
            found = []
            for root, dirs, files in os.walk(path):
                dirs.sort(key=natural_key)  # os.walk visits dirs in this order
                if "metrics.jsonl" in files:
                    found.append(root)
            if not found:
                raise CompareError(f"{path}: no metrics.jsonl in it or below it; pass train.py run directories "
                                   "(out_dir), or a directory that contains them")
        for run_dir in found:
            if os.path.realpath(run_dir) not in [os.path.realpath(d) for d in run_dirs]:
                run_dirs.append(run_dir)
    return run_dirs


def run_from_wandb(wandb_run):
    """A wandb.apis.public.Run (or anything shaped like it: .name, .config, .scan_history) -> Run.
    scan_history reads every row (history() samples 500 rows, which could drop eval points); with keys
    it returns only rows holding all of them, i.e. the eval events. If those keys never sit in one row
    (runs logged by another script), fall back to every row, with W&B's _runtime where time is missing."""
    rows = list(wandb_run.scan_history(keys=WANDB_EVAL_KEYS))
    if not rows:
        rows = [row for row in wandb_run.scan_history() if row.get("val/loss") is not None]
    events = []
    for row in rows:
        events.append({
            "step": row.get("step", row.get("_step")),
            "tokens": row.get("tokens"),
            "val/loss": row.get("val/loss"),
            "time/elapsed_s": row.get("time/elapsed_s", row.get("_runtime")),
        })
    config = {k: v for k, v in dict(wandb_run.config).items() if not k.startswith("_")}
    return run_from_events(wandb_run.name, config, events)


def load_wandb_runs(project, group):
    try:
        import wandb
        api = wandb.Api(timeout=60)
        wandb_runs = list(api.runs(project, filters={"group": group}, order="+created_at"))
        runs = [run_from_wandb(r) for r in wandb_runs]
    except CompareError:
        raise
    except Exception as e:  # no network, not logged in, unknown entity/project: wandb raises many kinds
        raise CompareError(f"could not read W&B runs of {project} (group {group!r}): {type(e).__name__}: {e}\n"
                           "  check the network, `wandb login` (or WANDB_API_KEY), and the entity/project/group "
                           "names; or pass the run directories instead") from e
    if not runs:
        raise CompareError(f"W&B project {project} has no runs in group {group!r}")
    return runs


# -----------------------------------------------------------------------------
# grouping and labels

def settings_of(run):
    return {k: v for k, v in run.config.items()
            if k not in IGNORED_CONFIG_KEYS and not k.startswith(IGNORED_CONFIG_PREFIXES)}


def group_runs(runs):
    """Seeds of one setting -> one Group; groups in order of first appearance."""
    groups = {}
    for run in runs:
        settings = settings_of(run)
        key = json.dumps(settings, sort_keys=True, default=str)
        if key not in groups:
            groups[key] = Group(runs=[], settings=settings)
        groups[key].runs.append(run)
    return list(groups.values())


def format_value(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def label_groups(groups):
    """Label = optimizer + the settings that tell this group apart: optim.* keys that differ among groups
    of the same optimizer, other keys that differ among all groups. Without optim.name: the run name
    without its seed."""
    for g in groups:
        same_optimizer = [h for h in groups if h.settings.get("optim.name") == g.settings.get("optim.name")]
        keys = []
        for k in g.settings:
            peers = same_optimizer if k.startswith("optim.") else groups
            if k != "optim.name" and len({json.dumps(h.settings.get(k), default=str) for h in peers}) > 1:
                keys.append(k)
        short = {k: k.split(".")[-1] for k in keys}
        if len(set(short.values())) < len(short):
            short = {k: k for k in keys}
        parts = [f"{short[k]}={format_value(g.settings[k])}" for k in keys]
        if "optim.name" in g.settings:
            g.label = " ".join([str(g.settings["optim.name"])] + parts)
        else:
            first = g.runs[0]
            stem = str(first.config.get("run_name") or os.path.basename(os.path.normpath(first.name)))
            g.label = " ".join([re.sub(r"[_,\-]?seed[=_\-]?\d+", "", stem)] + parts)
    for i, g in enumerate(groups):  # identical labels (odd formatting collisions): number them
        if sum(h.label == g.label for h in groups) > 1:
            g.label = f"{g.label} #{i + 1}"


def check_seeds(groups):
    """A run passed twice (or copied) would count as two seeds: weighted double, with a spread too small."""
    for g in groups:
        seen = {}
        for run in g.runs:
            seed = run.config.get("seed")
            if seed is not None and seed in seen:
                raise CompareError(f"{seen[seed].name} and {run.name} are both seed {seed} of {g.label!r} with the "
                                   "same settings: pass only one of them, or rerun one with another seed=N")
            seen.setdefault(seed, run)


def length_warnings(groups):
    """Seeds of one group that end at different steps (one stopped early, or is still running): the group's
    final loss would average runs of different lengths. Returns [(message, [flagged group])]."""
    warnings = []
    for g in groups:
        ends = [int(run.steps[-1]) for run in g.runs]
        if len(set(ends)) > 1:
            each = ", ".join(f"{run.name} at step {end}" for run, end in zip(g.runs, ends))
            message = (f"the seeds of {g.label} end at different steps ({each}): its final loss averages runs of "
                       "different lengths (one stopped early, or is still running?)")
            warnings.append((message, [g]))
    return warnings


def mismatch_warnings(groups, baseline):
    """The MISMATCH_REASONS settings that differ among the groups. Returns [(message, flagged groups)], flagged:
    the groups whose value differs from the baseline's, i.e. whose speed-up compares unlike runs."""
    warnings = []
    for key, why in MISMATCH_REASONS.items():
        values = [g.settings.get(key) for g in groups]
        distinct = [v for i, v in enumerate(values) if v not in values[:i]]
        if len(distinct) > 1:
            shown = " vs ".join("null" if v is None else format_value(v) for v in distinct)
            flagged = [g for g, v in zip(groups, values) if v != baseline.settings.get(key)]
            warnings.append((f"runs differ in {key} ({shown}): {why}", flagged))
    return warnings


def final_losses(group):
    return np.array([run.val_loss[-1] for run in group.runs])


def mean_final_loss(group):
    value = float(np.mean(final_losses(group)))
    return value if math.isfinite(value) else math.inf  # a diverged group never wins


def pick_best(groups):
    """--best: per optimizer, the group with the lowest mean final val/loss. Returns the winners and a
    line per optimizer saying which settings won."""
    by_optimizer = {}
    for g in groups:
        by_optimizer.setdefault(g.settings.get("optim.name", g.label), []).append(g)
    winners, lines = [], []
    for optimizer, sweep in by_optimizer.items():
        best = min(sweep, key=mean_final_loss)
        winners.append(best)
        varied = [k for k in best.settings if len({json.dumps(h.settings.get(k), default=str) for h in sweep}) > 1]
        won = ", ".join(f"{k}={format_value(best.settings[k])}" for k in varied) or "its only setting"
        lines.append(f"best {optimizer}: {won} (final val loss {format_mean_std(final_losses(best), '.4f')} "
                     f"over {len(best.runs)} seed(s); {len(sweep)} setting(s) tried)")
    return winners, lines


def find_baseline(groups, name):
    """--baseline: a group label, an optimizer name, a run directory, or a (W&B) run name."""
    if name is None:
        return groups[0]
    matches = [g for g in groups if g.label == name]
    matches = matches or [g for g in groups if g.settings.get("optim.name") == name]
    matches = matches or [g for g in groups for r in g.runs
                          if r.name == name or (r.path and r.path == os.path.realpath(name))]
    if len(matches) != 1:
        why = "matches several groups" if matches else "matches no group"
        labels = ", ".join(repr(g.label) for g in groups)
        raise CompareError(f"--baseline {name!r} {why}; give one of the labels {labels} or a run directory")
    return matches[0]


# -----------------------------------------------------------------------------
# statistics

def first_crossing(x, loss, target):
    """x at which loss first gets to <= target, linearly interpolated between the eval points around the
    crossing; None if it never does. x: (E,) steps or seconds, loss: (E,)."""
    reached = np.nonzero(loss <= target)[0]
    if len(reached) == 0:
        return None
    i = reached[0]
    if i == 0:
        return float(x[0])
    fraction = (loss[i - 1] - target) / (loss[i - 1] - loss[i])
    return float(x[i - 1] + fraction * (x[i] - x[i - 1]))


def mean_curve(group):
    """Seed-averaged curve on the eval steps every seed has: (steps, tokens, elapsed_s, val_loss), each (C,)."""
    common = reduce(np.intersect1d, [run.steps for run in group.runs])
    picked = [np.searchsorted(run.steps, common) for run in group.runs]

    def mean(column):  # (C,) average over seeds
        return np.mean([getattr(run, column)[idx] for run, idx in zip(group.runs, picked)], axis=0)

    return common, mean("tokens"), mean("elapsed_s"), mean("val_loss")


def std(values):
    """Sample standard deviation over seeds (ddof=1); None for a single seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def to_target(group, column, target):
    """Steps (column="steps") or seconds (column="elapsed_s") a group needs to reach the target.
    how = "seeds": every seed got there, value = mean over seeds, std = their sample std;
    how = "mean curve": some seed did not, value = where the seed-averaged curve crosses the target;
    how = "not reached": value = the last x of the mean curve, a lower bound."""
    per_seed = [first_crossing(getattr(run, column), run.val_loss, target) for run in group.runs]
    per_seed = [None if v is None or not math.isfinite(v) else v for v in per_seed]
    reached = [v for v in per_seed if v is not None]
    result = {"per_seed": per_seed, "reached": len(reached), "seeds": len(per_seed), "std": None}
    if len(reached) == len(per_seed):
        return {**result, "how": "seeds", "value": float(np.mean(reached)), "std": std(reached)}
    steps, _, elapsed_s, val_loss = mean_curve(group)
    x = steps if column == "steps" else elapsed_s
    crossing = first_crossing(x, val_loss, target)
    if crossing is not None and math.isfinite(crossing):
        return {**result, "how": "mean curve", "value": crossing}
    finite = x[np.isfinite(x)]
    return {**result, "how": "not reached", "value": float(finite[-1]) if len(finite) else None}


def speedup(base, other):
    """base / other steps-to-target. With every seed of `other` at the target: the mean ± sample std of the
    per-seed ratios base.value / seed value (the baseline taken as exact). bound: "=" a value, ">" a lower
    bound (the baseline never got there), "<" an upper bound (`other` never got there), "n/a"."""
    if base["value"] is None or other["value"] is None or (base["how"] == other["how"] == "not reached"):
        return {"value": None, "std": None, "bound": "n/a"}
    if base["how"] == "not reached":
        return {"value": base["value"] / other["value"], "std": None, "bound": ">"}
    if other["how"] == "not reached":
        return {"value": base["value"] / other["value"], "std": None, "bound": "<"}
    if other["how"] == "mean curve":
        return {"value": base["value"] / other["value"], "std": None, "bound": "="}
    ratios = [base["value"] / v for v in other["per_seed"]]
    return {"value": float(np.mean(ratios)), "std": std(ratios), "bound": "=", "per_seed": ratios}


def analyse(groups, baseline, target):
    for g in groups:
        g.stats = {"steps": to_target(g, "steps", target), "time": to_target(g, "elapsed_s", target)}
        finals = final_losses(g)
        g.stats["final_loss"] = {"value": float(np.mean(finals)), "std": std(finals), "per_seed": finals.tolist()}
    for g in groups:
        g.stats["speedup_steps"] = speedup(baseline.stats["steps"], g.stats["steps"])
        g.stats["speedup_time"] = speedup(baseline.stats["time"], g.stats["time"])


# -----------------------------------------------------------------------------
# output: markdown table, JSON, PNG

def format_mean_std(values, spec):
    values = np.asarray(values, dtype=np.float64)
    s = std(values)
    return format(float(np.mean(values)), spec) + ("" if s is None else " ± " + format(s, spec))


def time_unit(seconds):
    """(divisor, name) that shows `seconds` readably."""
    return (3600, "h") if seconds >= 7200 else (60, "min") if seconds >= 120 else (1, "s")


def format_to_target(stats, unit):
    """unit: "steps" or "seconds"."""
    value = stats["value"]
    if value is None:
        return "n/a"
    divisor, suffix = (1, "") if unit == "steps" else time_unit(value)
    spec = ".0f" if unit == "steps" and value >= 100 else ".3g"  # whole steps, unless there are few
    text = format(value / divisor, spec)
    if stats["how"] == "seeds" and stats["std"] is not None:
        text += " ± " + format(stats["std"] / divisor, spec)
    text += f" {suffix}" if suffix else ""
    if stats["how"] == "mean curve":
        text += f" (mean curve; {stats['reached']}/{stats['seeds']} seeds reached)"
    if stats["how"] == "not reached":
        text = f"not reached (> {text})"
    return text


def format_speedup(stats):
    if stats["bound"] == "n/a" or stats["value"] is None or not math.isfinite(stats["value"]):
        return "n/a"
    text = f"{stats['value']:.2f}" + ("" if stats["std"] is None else f" ± {stats['std']:.2f}") + "×"
    return text if stats["bound"] == "=" else f"{stats['bound']} {text}"


def markdown_table(groups, baseline, target, target_source, warnings=()):
    """warnings: [(message, flagged groups)]; each becomes a ⚠ footnote, and a flagged group's row gets a ⚠."""
    flagged = [g for _, some in warnings for g in some]
    rows = ["| run | seeds | steps to target | speed-up (steps) | time to target | speed-up (time) | final val loss |",
            "|---|---|---|---|---|---|---|"]
    for g in groups:
        name = g.label + (" (baseline)" if g is baseline else "") + (" ⚠" if any(g is h for h in flagged) else "")
        final = g.stats["final_loss"]
        final_text = f"{final['value']:.4f}" + ("" if final["std"] is None else f" ± {final['std']:.4f}")
        rows.append(f"| {name} | {len(g.runs)} | {format_to_target(g.stats['steps'], 'steps')} | "
                    f"{format_speedup(g.stats['speedup_steps'])} | {format_to_target(g.stats['time'], 'seconds')} | "
                    f"{format_speedup(g.stats['speedup_time'])} | {final_text} |")
    notes = [
        (f"Target val loss {target:.4f} ({target_source}). Steps / time to target: the first eval at or below it, "
         "linearly interpolated with the eval before; resolution is the eval interval. Time is the logged "
         "time/elapsed_s: compare it only between runs on the same hardware."),
        ("a ± b: mean ± sample std (ddof=1) over seeds. Where some seed never reached the target, the group's value "
         "is where its seed-averaged curve (on the eval steps all seeds share) crosses it, without a spread (with the "
         "default target this is usual for the baseline: its seeds that end above their own mean never reach it)."),
        (f"Speed-up = the baseline's value ({baseline.label}) / each seed's value, then mean ± sample std of those "
         "per-seed ratios; the baseline's value counts as exact (its own seed spread shows in its row). "
         "'< x': the run never reached the target within its last eval, so x (baseline / that last point) is an "
         "upper bound; '> x': the baseline never reached it, so x is a lower bound; 'n/a': neither did."),
        "Final val loss: the last eval of each seed, mean ± sample std.",
    ] + [f"⚠ {message}" for message, _ in warnings]
    return "\n".join(rows) + "\n\n" + "\n".join(f"{i + 1}. {note}" for i, note in enumerate(notes))


def clean(value):
    """JSON has no NaN: NaN/inf -> null; numpy arrays/floats -> lists/floats."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def table_json(groups, baseline, target, target_source, warnings=()):
    return clean({
        "target_loss": target, "target_source": target_source, "baseline": baseline.label,
        "warnings": [message for message, _ in warnings],
        "groups": [{"label": g.label, "runs": [r.name for r in g.runs], "seeds": [r.config.get("seed") for r in g.runs],
                    "steps_to_target": g.stats["steps"], "speedup_steps": g.stats["speedup_steps"],
                    "seconds_to_target": g.stats["time"], "speedup_time": g.stats["speedup_time"],
                    "final_val_loss": g.stats["final_loss"], "settings": g.settings} for g in groups],
    })


def plot(groups, baseline, target, target_source, out_path):
    """Write the PNG; returns the matplotlib Figure (closed, but still inspectable)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, ScalarFormatter

    max_seconds = max((np.nanmax(r.elapsed_s) for g in groups for r in g.runs if np.isfinite(r.elapsed_s).any()),
                      default=0.0)
    divisor, unit = time_unit(max_seconds)
    panels = [("steps", "optimizer steps", 1.0), ("tokens", "training tokens", 1.0),
              ("elapsed_s", f"wall-clock ({unit})", 1.0 / divisor)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_losses = np.concatenate([r.val_loss for g in groups for r in g.runs])
    all_losses = all_losses[np.isfinite(all_losses)]
    for ax, (column, xlabel, scale) in zip(axes, panels):
        drawn = False
        for i, g in enumerate(groups):
            color = colors[i % len(colors)]
            for run in g.runs:
                ok = np.isfinite(getattr(run, column)) & np.isfinite(run.val_loss)
                drawn = drawn or ok.any()
                if len(g.runs) > 1:  # a single seed is its own mean: one line is enough
                    ax.plot(getattr(run, column)[ok] * scale, run.val_loss[ok], color=color, alpha=0.3, lw=0.8)
            curve = dict(zip(("steps", "tokens", "elapsed_s", "val_loss"), mean_curve(g)))
            ok = np.isfinite(curve[column]) & np.isfinite(curve["val_loss"])
            name = g.label + (" (baseline)" if g is baseline else "") + f", {len(g.runs)} seed" + "s" * (len(g.runs) > 1)
            ax.plot(curve[column][ok] * scale, curve["val_loss"][ok], color=color, lw=2, label=name)
        ax.axhline(target, color="black", ls="--", lw=1, alpha=0.7, label=f"target {target:.3f}")
        if not drawn:
            ax.text(0.5, 0.5, f"no '{column}' logged", transform=ax.transAxes, ha="center", color="gray")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        if column == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter())
    axes[0].set_ylabel("validation loss")
    if len(all_losses) and all_losses.max() / all_losses.min() > 1.5:  # the early drop would hide the end
        axes[0].set_yscale("log")  # shared: all three panels
        axes[0].set_ylabel("validation loss (log scale)")
        for axis_formatter in (axes[0].yaxis.set_major_formatter, axes[0].yaxis.set_minor_formatter):
            formatter = ScalarFormatter()
            formatter.set_scientific(False)
            axis_formatter(formatter)
    axes[0].legend(loc="upper right", fontsize=9)
    lines = "faint: single seeds, bold: mean over seeds" if any(len(g.runs) > 1 for g in groups) else "one run each"
    fig.suptitle(f"validation loss; {lines}; dashed: target = {target_source}")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return fig


# -----------------------------------------------------------------------------
# --budgets: final losses at several budgets, and the data multiplier against the baseline's loss-vs-steps curve

BUDGET_KEYS = ("max_steps", "lr_decay_steps")  # what makes a budget; runs differing only in these are one contender

# two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30 (any statistics table); df > 30: the normal 1.96
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_ci95(values):
    """(mean, [lo, hi]): the mean of the finite values and their 95% t-interval; the interval is None with fewer
    than two values, the mean None with none."""
    values = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(values) == 0:
        return None, None
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None
    t = T95[len(values) - 2] if len(values) - 1 <= len(T95) else 1.96
    half = t * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, [mean - half, mean + half]


def budget_groups(runs):
    """Runs -> contenders (Groups of every budget and seed of one setting), labelled as compare.py labels groups."""
    groups = {}
    for run in runs:
        settings = {k: v for k, v in settings_of(run).items() if k not in BUDGET_KEYS}
        key = json.dumps(settings, sort_keys=True, default=str)
        groups.setdefault(key, Group(runs=[], settings=settings)).runs.append(run)
    groups = list(groups.values())
    label_groups(groups)
    return groups


def by_budget(group):
    """{max_steps: [runs]}, budgets ascending; a run's budget is its config's max_steps (else its last step)."""
    budgets = {}
    for run in group.runs:
        budgets.setdefault(int(run.config.get("max_steps") or run.steps[-1]), []).append(run)
    return dict(sorted(budgets.items()))


def loss_fit(steps, losses):
    """Least squares L = a + b * log(steps) over the baseline's budgets: (a, b)."""
    b, a = np.polyfit(np.log(steps), losses, 1)
    return float(a), float(b)


def steps_for_loss(loss, steps, losses, fit):
    """The steps at which the baseline's final-loss curve (losses at budgets `steps`, ascending) reaches `loss`:
    linear in log(steps) between the two budgets around it (the first such pair); outside the curve's range, from
    the fit L = a + b log(steps). Returns (steps, extrapolated); (None, True) when the fit cannot say (b >= 0)."""
    log_steps = np.log(np.asarray(steps, dtype=np.float64))
    for i in range(len(steps) - 1):
        lo, hi = sorted((losses[i], losses[i + 1]))
        if lo <= loss <= hi and losses[i] != losses[i + 1]:
            fraction = (losses[i] - loss) / (losses[i] - losses[i + 1])
            return float(np.exp(log_steps[i] + fraction * (log_steps[i + 1] - log_steps[i]))), False
        if losses[i] == losses[i + 1] == loss:
            return float(steps[i]), False
    if len(steps) == 1 and loss == losses[0]:
        return float(steps[0]), False
    if fit is None or not fit[1] < 0 or not math.isfinite(loss):
        return None, True
    a, b = fit
    return float(np.exp((loss - a) / b)), True


def analyse_budgets(groups, baseline, seconds_per_step=None):
    """Fills g.stats["budgets"] for every contender: per budget the final losses, the data multiplier and the
    time multiplier (mean and 95% interval over seeds), and the paper's steps-to-target speed-up.
    seconds_per_step: {label: s/step} or None. Returns the baseline's curve and fit (for the notes and JSON)."""
    base = by_budget(baseline)
    curve_steps = np.array(list(base), dtype=np.float64)
    # a diverged seed (NaN) is left out of its budget's mean
    curve_losses = np.array([float(np.nanmean([r.val_loss[-1] for r in runs])) for runs in base.values()])
    fit = loss_fit(curve_steps, curve_losses) if len(curve_steps) >= 2 else None
    seconds = seconds_per_step or {}
    for g in groups:
        rows = []
        for steps, runs in by_budget(g).items():
            finals = [float(r.val_loss[-1]) for r in runs]
            mean, ci = mean_ci95(finals)
            needed = [steps_for_loss(f, curve_steps, curve_losses, fit) for f in finals]
            data = [None if s is None else s / steps for s, _ in needed]
            row = {"steps": steps, "seeds": [r.config.get("seed") for r in runs], "runs": [r.name for r in runs],
                   "final_val_loss": finals, "final_mean": mean, "final_ci95": ci,
                   "baseline_steps": [s for s, _ in needed], "extrapolated": any(e for _, e in needed)}
            row["data_multiplier"] = dict(zip(("mean", "ci95"), mean_ci95(data)), per_seed=data)
            if baseline.label in seconds and g.label in seconds:
                ratio = seconds[baseline.label] / seconds[g.label]
                times = [None if d is None else d * ratio for d in data]
                row["time_multiplier"] = dict(zip(("mean", "ci95"), mean_ci95(times)), per_seed=times)
            else:
                row["time_multiplier"] = None
            rows.append(row)
        g.stats["budgets"] = rows
    # the paper's measure at each budget: steps to the baseline's final loss (seed mean) on the same schedule
    for steps, base_runs in base.items():
        peers = [Group(runs=by_budget(g)[steps], settings=g.settings, label=g.label) for g in groups
                 if steps in by_budget(g)]
        base_peer = next(p for p in peers if p.label == baseline.label)
        analyse(peers, base_peer, float(np.mean([r.val_loss[-1] for r in base_runs])))
        for g, peer in zip([g for g in groups if steps in by_budget(g)], peers):
            row = next(r for r in g.stats["budgets"] if r["steps"] == steps)
            row["steps_to_target_speedup"] = peer.stats["speedup_steps"]
    return {"steps": curve_steps.tolist(), "final_mean": curve_losses.tolist(),
            "fit": None if fit is None else {"a": fit[0], "b": fit[1]}}


def format_interval(stats, spec=".2f", suffix="×"):
    if not stats or stats.get("mean") is None:
        return "n/a"
    text = format(stats["mean"], spec) + suffix
    return text if stats.get("ci95") is None else f"{text} [{stats['ci95'][0]:{spec}}, {stats['ci95'][1]:{spec}}]"


def budget_table(groups, baseline, curve):
    rows = ["| optimizer | steps | seeds | final val loss (95% CI) | data multiplier | time multiplier | "
            "steps-to-target speed-up (paper) |", "|---|---|---|---|---|---|---|"]
    for g in groups:
        for row in g.stats["budgets"]:
            final = format_interval({"mean": row["final_mean"], "ci95": row["final_ci95"]}, ".4f", "")
            dagger = " †" if row["extrapolated"] else ""
            paper = row.get("steps_to_target_speedup")
            rows.append(f"| {g.label}{' (baseline)' if g is baseline else ''} | {row['steps']} | {len(row['seeds'])} | "
                        f"{final} | {format_interval(row['data_multiplier'])}{dagger} | "
                        f"{format_interval(row['time_multiplier'])}{dagger} | "
                        f"{'n/a' if paper is None else format_speedup(paper)} |")
    fit = curve["fit"]
    fit_text = "no fit (fewer than 2 budgets)" if fit is None else f"L = {fit['a']:.4f} + ({fit['b']:.4f})·ln(steps)"
    notes = [
        "Final val loss: the last eval of each run; mean over seeds with its 95% t-interval (Student t, n-1 dof).",
        (f"Data multiplier: the steps {baseline.label} would need to reach a run's final loss, read off "
         f"{baseline.label}'s final-loss-vs-steps curve (its seed means at {', '.join(f'{s:g}' for s in curve['steps'])}"
         f" steps: {', '.join(f'{v:.4f}' for v in curve['final_mean'])}), linear in log(steps) between budgets, "
         "divided by the run's steps; one per seed, then mean and 95% t-interval. >1: fewer steps than the baseline."),
        f"† outside the baseline's range: extrapolated with the least-squares fit {fit_text}.",
        "Time multiplier: the data multiplier × (baseline s/step) / (this optimizer's s/step), from the timing input.",
        ("Steps-to-target (the paper's measure): at each budget, steps to reach the baseline's final loss (seed mean) "
         "on the same schedule, the baseline's / this one's (resolution: the eval interval)."),
    ]
    return "\n".join(rows) + "\n\n" + "\n".join(f"{i + 1}. {note}" for i, note in enumerate(notes))


def budget_json(groups, baseline, curve):
    return clean({"baseline": baseline.label, "baseline_curve": curve,
                  "groups": [{"label": g.label, "settings": g.settings, "budgets": g.stats["budgets"]} for g in groups]})


def plot_budgets(groups, baseline, out_path, title="final validation loss vs budget"):
    """Final val loss (seed mean, 95% interval bars) against steps on a log axis, one line per contender."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for g in groups:
        rows = [r for r in g.stats["budgets"] if r["final_mean"] is not None and math.isfinite(r["final_mean"])]
        steps = np.array([r["steps"] for r in rows], dtype=np.float64)
        means = np.array([r["final_mean"] for r in rows])
        half = np.array([0.0 if r["final_ci95"] is None else r["final_ci95"][1] - r["final_mean"] for r in rows])
        ax.errorbar(steps, means, yerr=half, marker="o", capsize=4,
                    label=g.label + (" (baseline)" if g is baseline else ""))
    ax.set_xscale("log")
    ax.set_xlabel("optimizer steps (each budget its own full schedule; log scale)")
    ax.set_ylabel("final validation loss")
    ax.set_title(title + "; bars: 95% t-interval over seeds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return fig


def read_seconds_per_step(path):
    try:
        with open(path) as f:
            seconds = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"--seconds-per-step {path}: {e}; give a JSON object {{label: seconds per step}}")
    if not isinstance(seconds, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in seconds.values()):
        raise CompareError(f"--seconds-per-step {path}: give a JSON object {{label: seconds per step > 0}}")
    return seconds


# =============================================================================
# The study: its definition (configs/study/NAME.yaml), its runs, the record they leave, the phases that make them.
# Every finished run appends one line to the record (its command, settings, final loss, win rates, loss curve,
# commit): a run in the record is never run again, and the report reads the record alone.

class StudyError(Exception):
    """A request the study cannot carry out (a bad definition, a missing file); its message says what to do."""


@dataclass
class Contender:
    name: str               # adamw, adamw_official, lion, sophiag, muon
    preset: str             # configs/config/<preset>.yaml
    grid: dict              # {"optim.lr": [...], "optim.rho": [...]}: the sweep's starting grid
    extra: list = field(default_factory=list)  # overrides every run of it gets: the proxy's, then its own
    regime: tuple | None = None  # (low, high): its best is chosen among runs whose blocks' mean win rate lies within
    control: bool = False   # swept last, and run at the budgets only where its sweep beats the baseline's
    steps: int | None = None        # the 1x budget; None: the preset's max_steps
    sweep_steps: int | None = None  # the sweep's budget; None: the 1x budget


@dataclass
class Proxy:
    """One point of the study: a preset family with the overrides that place it (on a scale axis, say), its
    contenders, and the budgets each contender runs at (multiples of the 1x budget)."""
    name: str
    contenders: list        # [Contender]; the baseline first
    budgets: tuple = (1,)   # every contender, in the order they run (the 1x budget first)
    baseline_budgets: tuple = ()  # the baseline's in addition: the curve every other final loss is read off
    seeds: tuple = ()       # the budgets' seeds (default: the study's); the first is the sweep's, the study's first


@dataclass
class Study:
    name: str
    proxies: dict           # {name: Proxy}
    seeds: list             # the first is the sweep's
    runs: Path              # run directories: <runs>/<proxy>/<contender>/<settings>_steps<N>_seed<S>
    record: Path            # one JSON line per finished run
    times: Path             # one JSON line per timing run
    report: Path            # <report>.json, <report>.md, <report>_<proxy>_{budgets,sweep}.png, <report>_scale.png
    title: str = ""
    baseline: str = "adamw"
    command: str = "OMP_NUM_THREADS=1 python train.py"  # what each run's overrides follow
    max_extensions: int = 0       # grid points added beyond an edge, per contender
    eval_tokens: int | None = None  # validation tokens of every evaluation (None: the preset's eval_steps)
    evals_per_run: int = 4        # evaluations after step 0, evenly spaced: the loss curve's points
    ckpt_interval: int | None = None  # steps between checkpoints (None: at the end only)
    time_steps: int = 200         # steps of a timing run
    estimate: object = "record"   # "record": seconds measured in the record; or {"peak_flops", "mfu", ...}
    wandb: bool = False           # every run logs to W&B, grouped by the study's name and tagged
    slurm: dict = field(default_factory=dict)  # sbatch (options), retries, poll_s
    axes: dict = field(default_factory=dict)   # {"tokens_per_step": [proxies], "n_params": [...], "reference": preset}
    source: str = ""              # the definition's path, as the commands name it
    defined: dict = field(default_factory=dict)  # every proxy of the definition (--proxy narrows `proxies` only)


STUDY_KEYS = {"name": None, "title": "", "files": None, "command": "OMP_NUM_THREADS=1 python train.py",
              "seeds": None, "baseline": "adamw", "budgets": [1], "baseline_budgets": [], "max_extensions": 0,
              "eval_tokens": None, "evals_per_run": 4, "ckpt_interval": None, "time_steps": 200,
              "estimate": "record", "wandb": False, "slurm": {}, "axes": {}, "proxies": None}
PROXY_KEYS = {"overrides", "budgets", "baseline_budgets", "seeds", "steps", "sweep_steps", "contenders"}
CONTENDER_KEYS = {"preset", "overrides", "grid", "regime", "control"}
SLURM_DEFAULTS = {"sbatch": [], "retries": 2, "poll_s": 30}
ESTIMATE_KEYS = {"device", "peak_flops", "mfu", "gpus_per_run"}


def number(value, where, kind=float):
    """A number from YAML, which reads 1e-3 (no dot) as a string."""
    try:
        result = kind(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        result = None
    if result is None or (kind is int and float(value) != result):
        raise StudyError(f"{where}: {value!r} is not {'an integer' if kind is int else 'a number'}")
    return result


def numbers(value, where, kind=float):
    if not isinstance(value, list) or not value:
        raise StudyError(f"{where}: give a non-empty list, e.g. [1, 0.5]")
    return [number(v, f"{where}[{i}]", kind) for i, v in enumerate(value)]


def known_keys(mapping, keys, where):
    if not isinstance(mapping, dict):
        raise StudyError(f"{where}: give a mapping")
    unknown = sorted(set(mapping) - set(keys))
    if unknown:
        raise StudyError(f"{where}: unknown key(s) {unknown}; the known ones are {sorted(keys)}")


def preset_exists(name):
    return (REPO / "configs" / "config" / f"{name}.yaml").is_file()


def load_study(path, out=None):
    """The study that a configs/study/*.yaml defines. out: a folder for its record, report and run directories
    (else the definition's `files`, else out/study/<name>). Raises StudyError naming the first thing wrong."""
    path = Path(path)
    if not path.is_file():
        near = sorted(p.name for p in (REPO / "configs" / "study").glob("*.yaml"))
        raise StudyError(f"{path}: no such study definition; the repository's are configs/study/{{{','.join(near)}}}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    where = str(path)
    known_keys(spec, STUDY_KEYS, where)
    for key in ("name", "seeds", "proxies"):
        if spec.get(key) is None:
            raise StudyError(f"{where}: `{key}` is missing")
    spec = {**STUDY_KEYS, **spec}
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(spec["name"])):
        raise StudyError(f"{where}: name {spec['name']!r}: letters, digits, '_', '.' and '-' only (it names folders)")
    folder = Path(out).absolute() if out is not None else None
    files = spec["files"] or {}
    known_keys(files, {"runs", "record", "times", "report"}, f"{where}: files")
    if folder is None and not files:
        folder = REPO / "out" / "study" / spec["name"]
    if folder is not None:
        paths = {"runs": folder / "runs", "record": folder / "runs.jsonl", "times": folder / "time.jsonl",
                 "report": folder / "report"}
    else:
        missing = {"runs", "record", "times", "report"} - set(files)
        if missing:
            raise StudyError(f"{where}: files: give {sorted(missing)} too (or no files block: out/study/<name>/)")
        paths = {key: REPO / value for key, value in files.items()}
    slurm = spec["slurm"] or {}
    known_keys(slurm, SLURM_DEFAULTS, f"{where}: slurm")
    slurm = {**SLURM_DEFAULTS, **slurm}
    slurm["retries"] = number(slurm["retries"], f"{where}: slurm.retries", int)
    slurm["poll_s"] = number(slurm["poll_s"], f"{where}: slurm.poll_s")
    if not isinstance(slurm["sbatch"], list):
        raise StudyError(f"{where}: slurm.sbatch: give a list of sbatch options, e.g. [--nodes=1, --gpus-per-node=8]")
    estimate = spec["estimate"]
    if estimate != "record":
        known_keys(estimate, ESTIMATE_KEYS, f"{where}: estimate (or `estimate: record`)")
        estimate = {"device": str(estimate.get("device", "GPU")),
                    "peak_flops": number(estimate.get("peak_flops"), f"{where}: estimate.peak_flops"),
                    "mfu": number(estimate.get("mfu"), f"{where}: estimate.mfu"),
                    "gpus_per_run": number(estimate.get("gpus_per_run", 1), f"{where}: estimate.gpus_per_run", int)}
    study = Study(name=str(spec["name"]), proxies={}, seeds=numbers(spec["seeds"], f"{where}: seeds", int),
                  title=str(spec["title"] or f"The study {spec['name']}"), baseline=str(spec["baseline"]),
                  command=str(spec["command"]),
                  max_extensions=number(spec["max_extensions"], f"{where}: max_extensions", int),
                  eval_tokens=None if spec["eval_tokens"] is None else number(spec["eval_tokens"],
                                                                              f"{where}: eval_tokens", int),
                  evals_per_run=number(spec["evals_per_run"], f"{where}: evals_per_run", int),
                  ckpt_interval=None if spec["ckpt_interval"] is None else number(spec["ckpt_interval"],
                                                                                  f"{where}: ckpt_interval", int),
                  time_steps=number(spec["time_steps"], f"{where}: time_steps", int), estimate=estimate,
                  wandb=bool(spec["wandb"]), slurm=slurm, axes=spec["axes"] or {}, source=relative(path.absolute()),
                  **paths)
    if not isinstance(spec["proxies"], dict) or not spec["proxies"]:
        raise StudyError(f"{where}: proxies: give at least one, e.g. proxies: {{char: {{contenders: ...}}}}")
    for name, proxy in spec["proxies"].items():
        study.proxies[str(name)] = load_proxy(str(name), proxy or {}, spec, f"{where}: proxies.{name}")
    study.defined = study.proxies
    for name, proxy in study.proxies.items():
        if study.baseline not in [c.name for c in proxy.contenders]:
            raise StudyError(f"{where}: proxies.{name}: no contender {study.baseline!r}, the study's baseline "
                             "(every multiplier is read off its curve)")
    known_keys(study.axes, {"tokens_per_step", "n_params", "reference"}, f"{where}: axes")
    for axis in ("tokens_per_step", "n_params"):
        unknown = sorted(set(study.axes.get(axis, [])) - set(study.proxies))
        if unknown:
            raise StudyError(f"{where}: axes.{axis}: {unknown} are not among the proxies {sorted(study.proxies)}")
    return study


def load_proxy(name, spec, study_spec, where):
    known_keys(spec, PROXY_KEYS, where)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise StudyError(f"{where}: letters, digits, '_', '.' and '-' only in a proxy's name (it names folders)")
    overrides = [str(o) for o in spec.get("overrides") or []]
    steps = None if spec.get("steps") is None else number(spec["steps"], f"{where}.steps", int)
    sweep_steps = None if spec.get("sweep_steps") is None else number(spec["sweep_steps"], f"{where}.sweep_steps", int)
    contenders = []
    if not isinstance(spec.get("contenders"), dict) or not spec["contenders"]:
        raise StudyError(f"{where}.contenders: give at least one, e.g. adamw: {{preset: ..., grid: {{optim.lr: [...]}}}}")
    for cname, c in spec["contenders"].items():
        cwhere = f"{where}.contenders.{cname}"
        known_keys(c, CONTENDER_KEYS, cwhere)
        if not preset_exists(str(c.get("preset"))):
            raise StudyError(f"{cwhere}.preset: no preset {c.get('preset')!r} (configs/config/<preset>.yaml)")
        grid = c.get("grid")
        if not isinstance(grid, dict) or not grid:
            raise StudyError(f"{cwhere}.grid: give at least one swept knob, e.g. {{optim.lr: [1e-3, 2e-3, 4e-3]}}")
        regime = c.get("regime")
        if regime is not None:
            regime = tuple(numbers(regime, f"{cwhere}.regime"))
            if len(regime) != 2 or not regime[0] <= regime[1]:
                raise StudyError(f"{cwhere}.regime: give [low, high], the blocks' mean win rate its best must lie in")
        contenders.append(Contender(str(cname), str(c["preset"]),
                                    {str(k): numbers(v, f"{cwhere}.grid.{k}") for k, v in grid.items()},
                                    overrides + [str(o) for o in c.get("overrides") or []], regime,
                                    bool(c.get("control", False)), steps, sweep_steps))
    budgets = spec.get("budgets", study_spec["budgets"])
    baseline_budgets = spec.get("baseline_budgets", study_spec["baseline_budgets"])
    seeds = tuple(numbers(spec.get("seeds", study_spec["seeds"]), f"{where}.seeds", int))
    if not seeds or seeds[0] != int(study_spec["seeds"][0]):
        raise StudyError(f"{where}.seeds: begin with the study's first seed, {study_spec['seeds'][0]} (the sweep's)")
    return Proxy(name, contenders, tuple(numbers(budgets, f"{where}.budgets")),
                 tuple(numbers(baseline_budgets, f"{where}.baseline_budgets")) if baseline_budgets else (), seeds)


@functools.lru_cache(maxsize=None)
def preset_config(preset, extra=()):
    """The composed config of a preset with overrides (a DictConfig; cached: composing takes a while)."""
    from config_schema import compose_config
    return compose_config(preset, list(extra))


@functools.lru_cache(maxsize=None)
def val_tokens(preset, extra=()):
    """Tokens in the preset's validation split, preparing the data first if it is not (once, before any two runs
    could both prepare it). None for a data.dir that has no meta.json."""
    from data.stream import data_dir_of
    cfg = preset_config(preset, extra)
    prepare_data(REPO, cfg)
    data_dir = data_dir_of(cfg)
    if not (data_dir / "meta.json").is_file():
        return None
    tokens = json.loads((data_dir / "meta.json").read_text()).get("splits", {}).get("val", {}).get("tokens")
    return None if tokens is None else int(tokens)


def prepare_data(folder, cfg):
    """Prepare cfg's data inside folder (this repository, or a commit's files exported by verify) unless cfg names
    its own data.dir or it is prepared already: once, before any two runs could both start preparing it."""
    prepare = folder / "data" / str(cfg.data.name) / "prepare.py"
    if not cfg.data.dir and prepare.is_file() and not (prepare.parent / "meta.json").is_file():
        subprocess.run([sys.executable, str(prepare)], cwd=folder, check=True, stdout=subprocess.DEVNULL)


def eval_steps_of(preset, extra, eval_tokens):
    """Validation micro-batches for eval_tokens tokens (the preset's eval_steps if it has more; eval_tokens None:
    the preset's), but no more than one pass over the validation split: past it the evaluation would repeat the
    same text. Returns (steps, tokens)."""
    cfg = preset_config(preset, extra)
    batch, block = int(cfg.micro_batch_size), int(cfg.model.block_size)
    if eval_tokens is None:
        return int(cfg.eval_steps), int(cfg.eval_steps) * batch * block
    steps = max(int(cfg.eval_steps), math.ceil(eval_tokens / (batch * block)))
    total = val_tokens(preset, extra)
    if total is not None:
        steps = min(steps, max(1, (total // block) // batch))
    return steps, steps * batch * block


def preset_steps(contender):
    """The contender's 1x budget."""
    return contender.steps or int(preset_config(contender.preset, tuple(contender.extra)).max_steps)


def sweep_steps(contender):
    return contender.sweep_steps or preset_steps(contender)


@functools.lru_cache(maxsize=None)
def model_size(preset, extra=()):
    """{"tokens_per_step", "n_params" (as train.py counts them: the position embedding left out), "flops_per_token"
    (training, PaLM's count), "hessian_share" (the Hessian refreshes' extra forward-backward per step), "eval_tokens_per_step"
    (micro_batch x block)} of a preset with overrides; the model is built on the meta device (no memory)."""
    import torch
    from omegaconf import OmegaConf

    from model import GPT, GPTConfig
    cfg = preset_config(preset, extra)
    args = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    with torch.device("meta"):
        model = GPT(GPTConfig(**args))
    share = 0.0
    if str(cfg.optim.name) in ("sophiag", "sophiah"):
        hess_batch = cfg.optim.get("hess_batch_size") or cfg.total_batch_size
        share = (int(hess_batch) / int(cfg.total_batch_size)) / int(cfg.optim.hess_interval)
    return {"tokens_per_step": int(cfg.total_batch_size) * int(cfg.model.block_size), "n_params": model.num_params(),
            "flops_per_token": model.flops_per_token(), "hessian_share": share,
            "eval_tokens_per_step": int(cfg.micro_batch_size) * int(cfg.model.block_size)}


def relative(path):
    """A path inside the repository as the commands run it (from the repository root), else absolute."""
    return os.path.relpath(path, REPO) if Path(path).is_relative_to(REPO) else str(path)


def split_command(command):
    """'OMP_NUM_THREADS=1 python train.py' -> ({"OMP_NUM_THREADS": "1"}, ["python", "train.py"])."""
    words, env = shlex.split(command), {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


# -----------------------------------------------------------------------------
# runs: their overrides, directories and commands

def round_sig(x):
    """3 significant digits: a grid value prints the same in a folder name, an override and the record."""
    return float(f"{x:.3g}")


def setting_slug(settings):
    """lr0.001_rho0.5 (no '=': Hydra's override grammar would refuse it in out_dir=)."""
    return "_".join(f"{k.split('.')[-1]}{v:g}" for k, v in sorted(settings.items()))


def slug(settings, steps, seed):
    """lr0.001_rho0.5_steps2000_seed1337."""
    return "_".join(([setting_slug(settings)] if settings else []) + [f"steps{steps}", f"seed{seed}"])


@dataclass
class Job:
    study: Study
    proxy: str              # the proxy's name
    contender: Contender
    settings: dict          # {"optim.lr": 0.001, ...}
    steps: int
    seed: int
    out_root: Path
    eval_interval: int | None = None  # None: the study's evals_per_run evaluations

    @property
    def key(self):  # the run's identity in the record, and its folder under out_root
        return f"{self.proxy}/{self.contender.name}/{slug(self.settings, self.steps, self.seed)}"

    @property
    def out_dir(self):
        return self.out_root / self.key

    @property
    def log_path(self):
        return self.out_dir.parent / (self.out_dir.name + ".log")

    def overrides(self):
        """Everything after `python train.py`; the preset's own values where these do not say otherwise: min_lr the
        preset's fraction of lr (so each lr of a sweep decays to the same fraction of itself)."""
        c, study = self.contender, self.study
        extra = tuple(c.extra)
        preset = preset_config(c.preset, extra)
        lr = float(self.settings.get("optim.lr", preset.optim.lr))
        min_lr = round_sig(lr * float(preset.min_lr) / float(preset.optim.lr))
        eval_steps, _ = eval_steps_of(c.preset, extra, study.eval_tokens)
        eval_interval = self.eval_interval or max(1, self.steps // study.evals_per_run)
        overrides = [f"config={c.preset}", *c.extra, *[f"{k}={v!r}" for k, v in sorted(self.settings.items())],
                     f"max_steps={self.steps}", f"min_lr={min_lr!r}", f"eval_steps={eval_steps}",
                     f"eval_interval={eval_interval}",
                     f"ckpt_interval={min(self.steps, study.ckpt_interval or self.steps)}",
                     f"seed={self.seed}", f"out_dir={relative(self.out_dir)}"]
        if study.wandb:  # one W&B group per study, each run tagged so that its curves filter side by side
            tags = [self.proxy, c.name, setting_slug(self.settings) or "preset", f"steps{self.steps}", f"seed{self.seed}"]
            overrides += ["wandb.enabled=true", f"wandb.group={study.name}", f"wandb.tags=[{','.join(tags)}]"]
        return overrides

    def command(self):
        return f"{self.study.command} {shlex.join(self.overrides())}"


# -----------------------------------------------------------------------------
# the record

def read_record(path):
    """{key: line} of a record the study wrote; a later line of a key wins (a run redone on purpose)."""
    path = Path(path)
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {line["key"]: line for line in lines}


def append_line(path, line):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def git_commit():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return head + ("-dirty" if dirty else "")


@functools.lru_cache(maxsize=None)
def machine():
    """What a record line notes of the machine that made it: the CPU's model name, torch's kernel level (AVX2,
    AVX512: runs on CPUs of different levels round apart), bf16 instructions (optim.ns_dtype=auto's choice for
    Muon) and torch's version."""
    import torch

    from muon import cpu_has_bf16
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.startswith("model name")]
    return (f"{names[0] if names else platform.processor() or 'unknown CPU'}, {torch.backends.cpu.get_cpu_capability()}, "
            f"{'bf16' if cpu_has_bf16() else 'no bf16'}, torch {torch.__version__}")


def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "peak": float(np.max(values)), "final": float(values[-1])}


def record_line(job, status, events, seconds, commit):
    """One line of the record from a finished run's metrics.jsonl events."""
    evals = {}
    for e in events:
        if e.get("val/loss") is not None:
            evals[int(e["step"])] = e["val/loss"]  # a resumed run may log a step twice: the later wins
    train = [e for e in events if "train/loss" in e]
    final = evals.get(max(evals)) if evals else None
    final = final if final is not None and math.isfinite(final) and status == "finished" else None
    return {"key": job.key, "proxy": job.proxy, "contender": job.contender.name, "preset": job.contender.preset,
            "settings": job.settings, "steps": job.steps, "seed": job.seed, "status": status,
            "final_val_loss": final, "curve": [[s, evals[s]] for s in sorted(evals)],
            "win_rate": {part: summary([e.get("optim/win_rate" + suffix) for e in train])
                         for part, suffix in (("all", ""), ("embedding", "/embedding"), ("blocks", "/blocks"))},
            "hessian_grad_norm": summary([e.get("optim/hessian_grad_norm") for e in train]),
            "hessian_clip_rate": summary([e.get("optim/hessian_clip_rate") for e in train]),
            "eval_tokens": eval_steps_of(job.contender.preset, tuple(job.contender.extra), job.study.eval_tokens)[1],
            "seconds": seconds, "command": job.command(), "commit": commit, "machine": machine(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def finished_line(job, returncode, log_path):
    """The record line of a job that ended, or None when it did not finish (killed, or a bug: not a result)."""
    metrics = job.out_dir / "metrics.jsonl"
    log = log_path.read_text(errors="replace") if log_path.is_file() else ""
    if returncode == 0:
        status = "finished"
    elif returncode == 1 and "non-finite" in log:  # max_skipped_updates in a row: the setting diverged
        status = "diverged"
    else:
        return None
    events = read_metrics(metrics) if metrics.is_file() and metrics.stat().st_size else []
    seconds = max((e["time/elapsed_s"] for e in events if e.get("time/elapsed_s") is not None), default=None)
    return record_line(job, status, events, seconds, git_commit())


def reached_the_end(job):
    """Whether the run's metrics.jsonl holds its last step's evaluation (a finished run)."""
    metrics = job.out_dir / "metrics.jsonl"
    events = read_metrics(metrics) if metrics.is_file() and metrics.stat().st_size else []
    return any(e.get("step") == job.steps and e.get("val/loss") is not None for e in events)


# -----------------------------------------------------------------------------
# launchers: where the runs run. Both start a job, and report the jobs that have ended since they were last asked.

class LocalLauncher:
    """train.py processes on this machine, `jobs` side by side (each with the study command's environment, e.g.
    OMP_NUM_THREADS=1). Nothing outlives the invocation, so a run that failed is retried by the next one."""
    retries = 0

    def __init__(self, study, jobs):
        self.env, self.argv = split_command(study.command)
        self.capacity = jobs
        self.running = {}  # key -> (job, process)

    def adopt(self, jobs):
        return jobs

    def describe(self, job):
        return job.command()

    def start(self, job):
        print(f"start: {job.command()}  (log: {job.log_path})", flush=True)
        with open(job.log_path, "w") as log:
            process = subprocess.Popen([*self.argv, *job.overrides()], cwd=REPO, env={**os.environ, **self.env},
                                       stdout=log, stderr=subprocess.STDOUT)
        self.running[job.key] = (job, process)

    def wait(self):
        """[(job, exit status, fields for its record line)] of the jobs that ended."""
        time.sleep(1)
        ended = []
        for key, (job, process) in list(self.running.items()):
            if process.poll() is not None:
                del self.running[key]
                ended.append((job, process.returncode, {}))
        return ended


class SlurmLauncher:
    """Each run a SLURM job through scripts/slurm/train.sbatch (submitted from the repository root; the run
    directories on a filesystem the nodes share). Every submission is noted in <runs>/slurm_jobs.jsonl, so that a
    later invocation waits on a run that is queued or running instead of submitting it again, and collects one
    that ended in between. A run that fails (cancelled, node failure, a crash) is submitted again, up to
    slurm.retries times per invocation; train.py resumes it from its checkpoint."""

    def __init__(self, study, ledger):
        self.env, _ = split_command(study.command)  # the variables; train.sbatch starts train.py itself
        self.sbatch, self.retries, self.poll_s = study.slurm["sbatch"], study.slurm["retries"], study.slurm["poll_s"]
        self.capacity = math.inf
        self.ledger = ledger
        self.running = {}  # key -> (job, SLURM job id)

    def argv(self, job):
        return ["sbatch", "--parsable", f"--job-name={job.study.name}:{job.key}", f"--output={job.log_path}",
                *self.sbatch, "scripts/slurm/train.sbatch", *job.overrides()]

    def describe(self, job):
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), shlex.join(self.argv(job))])

    def adopt(self, jobs):
        """The jobs to submit: those without a job of an earlier invocation. A submitted one is waited on (and
        collected if it ended in between), never submitted twice."""
        submitted = {}
        if self.ledger.is_file():
            for text in self.ledger.read_text().splitlines():
                if text.strip():
                    entry = json.loads(text)
                    submitted[entry["key"]] = entry["job_id"]
        queued = self.queue()
        todo = []
        for job in jobs:
            if job.key not in submitted:
                todo.append(job)
                continue
            job_id = submitted[job.key]
            state = queued.get(job_id, "ended")
            print(f"{state.lower()} already (SLURM job {job_id}): {job.key}; waiting on it, not submitting it again"
                  if job_id in queued else f"collecting SLURM job {job_id}, which ended since: {job.key}", flush=True)
            self.running[job.key] = (job, job_id)
        return todo

    def start(self, job):
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(self.argv(job), cwd=REPO, env={**os.environ, **self.env}, capture_output=True, text=True)
        if done.returncode != 0:
            raise StudyError(f"sbatch refused {job.key}: {done.stderr.strip()}")
        job_id = done.stdout.strip().split(";")[0]
        append_line(self.ledger, {"key": job.key, "job_id": job_id, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                           time.gmtime())})
        print(f"submitted SLURM job {job_id}: {job.key}  (log: {job.log_path})", flush=True)
        self.running[job.key] = (job, job_id)

    def queue(self):
        """{job id: state} of this user's jobs that SLURM still holds (pending, running, completing, requeued)."""
        import getpass
        done = subprocess.run(["squeue", "--noheader", "--format=%i %T", f"--user={getpass.getuser()}"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise StudyError(f"squeue failed: {done.stderr.strip()} (is SLURM reachable from here? SLURM_CONF?)")
        return dict(line.split() for line in done.stdout.splitlines() if line.strip())

    def wait(self):
        time.sleep(self.poll_s)
        queued = self.queue()
        ended = []
        for key, (job, job_id) in list(self.running.items()):
            if job_id in queued:
                continue
            del self.running[key]
            info = scontrol_job(job_id)
            state, code = info.get("JobState"), info.get("ExitCode", "").split(":")[0]
            if state == "COMPLETED":
                returncode = 0
            elif state == "FAILED" and code.isdigit():
                returncode = int(code)
            elif state is None:  # SLURM forgot it (MinJobAge): the run directory says whether it finished
                returncode = 0 if reached_the_end(job) else None
            else:  # cancelled, timed out, node failure, out of memory, preempted
                returncode = None
            nodes = info.get("NodeList")
            print(f"SLURM job {job_id} ended: {state or 'no longer known to SLURM'}: {job.key}", flush=True)
            ended.append((job, returncode, {"slurm_job_id": job_id,
                                            **({"machine": f"SLURM node(s) {nodes}"} if nodes else {})}))
        return ended


def scontrol_job(job_id):
    """`scontrol show job` as a dict ({} once SLURM has forgotten the job)."""
    done = subprocess.run(["scontrol", "--oneliner", "show", "job", str(job_id)], capture_output=True, text=True)
    if done.returncode != 0:
        return {}
    return dict(field.split("=", 1) for field in done.stdout.split() if "=" in field)


def make_launcher(study, args, ledger="slurm_jobs.jsonl"):
    """ledger: the SLURM submissions' file under the run directories (the timing runs keep their own)."""
    return SlurmLauncher(study, study.runs / ledger) if args.launcher == "slurm" else LocalLauncher(study, args.jobs)


def run_jobs(study, jobs, record, args, refill=None):
    """Run the jobs not yet in the record through args.launcher, appending each finished one to the record.
    refill(failed), when given, is asked for the jobs to run after each one ends: the list left to run is replaced
    by its answer (less the running ones), so that a job the new results call for can start next.
    Returns the keys of the jobs that failed (not recorded: a rerun of the study tries them again)."""
    todo, failed = [j for j in jobs if j.key not in record], set()
    for job in jobs:
        if job.key in record:
            print(f"in the record: {job.key}")
    launcher = args.launcher_object
    if args.dry_run:
        for job in todo:
            print(f"# {job.key}: {estimate_text(study, job, record)}")
            print(launcher.describe(job))
        print(f"({len(todo)} run(s) to do, {sum(j.steps for j in todo)} optimizer steps in all)")
        args.plan.setdefault("now", []).extend(todo)
        return failed
    todo = launcher.adopt(todo)
    retried = {}  # key -> times started again in this invocation
    while todo or launcher.running:
        while todo and len(launcher.running) < launcher.capacity:
            job = todo.pop(0)
            job.out_dir.parent.mkdir(parents=True, exist_ok=True)
            launcher.start(job)
        for job, returncode, fields in launcher.wait():
            line = finished_line(job, returncode, job.log_path)
            if line is None and retried.get(job.key, 0) < launcher.retries:
                retried[job.key] = retried.get(job.key, 0) + 1
                print(f"FAILED: {job.key}; starting it again (retry {retried[job.key]} of {launcher.retries}), "
                      "from its checkpoint if it wrote one", flush=True)
                todo.insert(0, job)
                continue
            if line is None:
                print(f"FAILED (exit {returncode}): {job.key}; see {job.log_path}; not recorded", flush=True)
                failed.add(job.key)
                continue
            line.update(fields)
            record[job.key] = line
            if job.key in read_record(study.record):  # collected by another invocation that waited on it too
                continue
            append_line(study.record, line)
            print(f"done ({line['status']}, final val loss {line['final_val_loss']}): {job.key}", flush=True)
        if refill is not None and len(launcher.running) < launcher.capacity:
            todo = [j for j in refill(failed) if j.key not in record and j.key not in launcher.running]
    return failed


# -----------------------------------------------------------------------------
# the sweep and its grid extension (pure functions of the results)

def in_regime(line, regime):
    """Whether a run ran in its contender's regime: the blocks' win rate (fraction of coordinates unclipped, mean
    over the run) within it. SophiaG's is where its authors run it (0.1-0.5); outside it, almost every coordinate
    is clipped (sign momentum, i.e. Lion) or almost none is (a diagonal Newton step without the clip)."""
    blocks = (line.get("win_rate") or {}).get("blocks")
    return blocks is not None and regime[0] <= blocks["mean"] <= regime[1]


def loss_of(line, regime=None):
    """A diverged or unfinished run never wins, nor does a run outside its contender's regime (it is still
    recorded and reported): a regime's contender has its best setting, grid extension and budgets chosen within."""
    value = None if line is None else line.get("final_val_loss")
    if value is None or (regime is not None and not in_regime(line, regime)):
        return math.inf
    return value


def best_point(results):
    """results: {settings tuple ((key, value), ...): final loss} -> the settings with the lowest loss."""
    return min(results, key=lambda point: (results[point], point))


def extension(results):
    """The next grid point beyond the edge the best point lies on, or None when it is inside on every axis:
    along each axis, a value tried below and one above the best's (anywhere in the grid). The new point is the best
    one with that axis stepped beyond the edge by the grid's outermost spacing there (x3 for a one-value axis).
    Points already tried are never proposed again."""
    best = dict(best_point(results))
    for axis in sorted(best):
        values = sorted({dict(p)[axis] for p in results})
        if values[0] < best[axis] < values[-1]:
            continue
        if best[axis] == values[0]:
            value = round_sig(values[0] / (values[1] / values[0] if len(values) >= 2 else 3.0))
        else:
            value = round_sig(values[-1] * (values[-1] / values[-2] if len(values) >= 2 else 3.0))
        point = tuple(sorted({**best, axis: value}.items()))
        if point not in results:
            return point
    return None


def grid_points(grid):
    """{"optim.lr": [a, b], "optim.rho": [c]} -> [((optim.lr, a), (optim.rho, c)), ...]."""
    points = [()]
    for key in sorted(grid):
        points = [p + ((key, v),) for p in points for v in grid[key]]
    return points


def sweep_job(study, proxy, contender, point):
    return Job(study, proxy.name, contender, dict(point), sweep_steps(contender), study.seeds[0], study.runs)


def sweep_state(study, proxy, contender, record):
    """The sweep's points so far: the starting grid plus the extensions in the record, their results, and the
    points to run next (none when the best is inside, or the cap is hit). Returns (results, todo, capped)."""
    points = grid_points(contender.grid)
    for _ in range(study.max_extensions + 1):
        lines = {p: record.get(sweep_job(study, proxy, contender, p).key) for p in points}
        if any(line is None for line in lines.values()):
            return ({p: loss_of(line, contender.regime) for p, line in lines.items()},
                    [p for p in points if lines[p] is None], False)
        results = {p: loss_of(line, contender.regime) for p, line in lines.items()}
        point = extension(results)
        if point is None:
            return results, [], False
        if len(points) - len(grid_points(contender.grid)) >= study.max_extensions:
            return results, [], True
        points.append(point)
    raise AssertionError("unreachable")


def sweep_jobs(study, proxy, record, failed):
    """The sweep's runs to do now, in the contenders' order (controls last): each one's missing grid points, or,
    once its grid is done, the extension its results call for. A failed run is not retried until the next
    invocation of the study."""
    jobs = []
    for c in sorted(proxy.contenders, key=lambda c: c.control):
        _, todo, _ = sweep_state(study, proxy, c, record)
        jobs += [sweep_job(study, proxy, c, p) for p in todo]
    return [j for j in jobs if j.key not in failed]


def phase_sweep(study, proxy, record, args):
    """Every contender's missing points, side by side; a contender's grid extension starts as soon as its grid is
    done (before the later contenders' points), so that a study cut short has its first contenders bracketed."""
    failed = set()
    while True:
        jobs = sweep_jobs(study, proxy, record, failed)
        if not jobs:
            if failed:
                print(f"{proxy.name}: {len(failed)} sweep run(s) failed (see their logs); their contenders' sweeps wait")
            return
        failed |= run_jobs(study, jobs, record, args,
                           refill=lambda failed_now: sweep_jobs(study, proxy, record, failed | failed_now))
        if args.dry_run:
            print("(dry run: the grid's extensions depend on these results and are not shown)")
            return


def best_settings(study, proxy, contender, record):
    """(settings, on_edge, capped) of a finished sweep, or None while it is not finished."""
    results, todo, capped = sweep_state(study, proxy, contender, record)
    if todo or not results or all(math.isinf(v) for v in results.values()):
        return None
    return dict(best_point(results)), capped or extension(results) is not None, capped


def budget_factors(study, proxy, contender):
    """The contender's budgets: its proxy's, and the baseline's extra ones for the baseline."""
    return [*proxy.budgets, *(proxy.baseline_budgets if contender.name == study.baseline else ())]


def budget_jobs(study, proxy, contender, record, quiet=False):
    best = best_settings(study, proxy, contender, record)
    if best is None:
        if not quiet:
            print(f"{proxy.name}/{contender.name}: its sweep is not finished (run --phase sweep): no budget runs yet")
        return []
    if contender.control and not beats_baseline(study, proxy, contender, record):
        return []  # a control (AdamW as the official run clipped it): budgets only if it beats the baseline's sweep
    base = preset_steps(contender)
    return [Job(study, proxy.name, contender, best[0], int(round(base * f)), seed, study.runs)
            for f in budget_factors(study, proxy, contender) for seed in proxy.seeds]


def beats_baseline(study, proxy, contender, record):
    """Whether the contender's best sweep loss is below the baseline's (both sweeps finished)."""
    baseline = next(c for c in proxy.contenders if c.name == study.baseline)
    best_loss = {}
    for c in (contender, baseline):
        results, todo, _ = sweep_state(study, proxy, c, record)
        if todo or not results:
            return False
        best_loss[c.name] = min(results.values())
    return best_loss[contender.name] < best_loss[baseline.name]


def phase_budgets(study, proxy, record, args):
    """Every contender's 1x seeds first (so that a study cut short still has every contender's seeds there), then
    the baseline's extra budgets, then the shorter ones: a study cut short has the most useful runs."""
    jobs = [j for c in proxy.contenders for j in budget_jobs(study, proxy, c, record)]
    order = [*proxy.budgets[:1], *proxy.baseline_budgets, *proxy.budgets[1:]]
    jobs.sort(key=lambda j: [int(round(preset_steps(j.contender) * f)) for f in order].index(j.steps))
    run_jobs(study, jobs, record, args)
    if args.dry_run:  # the budgets of contenders whose sweep is not finished: counted in the plan, not listed
        args.plan.setdefault("later", []).extend(later_budget_jobs(study, proxy, record))


def later_budget_jobs(study, proxy, record):
    """Stand-ins for the budget runs that wait on unfinished sweeps (the grid's first point in place of the best:
    the estimate depends on the contender and the steps alone), less the sweep's run that serves as the first
    seed at 1x."""
    jobs = []
    for c in proxy.contenders:
        if best_settings(study, proxy, c, record) is not None:
            continue
        point = dict(grid_points(c.grid)[0])
        for f in budget_factors(study, proxy, c):
            for seed in proxy.seeds:
                job = Job(study, proxy.name, c, point, int(round(preset_steps(c) * f)), seed, study.runs)
                if job.key != sweep_job(study, proxy, c, grid_points(c.grid)[0]).key:
                    jobs.append(job)
    return jobs


def extension_jobs(study, proxy, record):
    """Stand-ins for the grid extensions the unfinished sweeps may still add (at most max_extensions each)."""
    jobs = []
    for c in proxy.contenders:
        points, todo, _ = sweep_state(study, proxy, c, record)  # points: every one run or to run now
        if todo:
            added = len(points) - len(grid_points(c.grid))
            jobs += [sweep_job(study, proxy, c, todo[0])] * max(0, study.max_extensions - added)
    return jobs


def planned_jobs(study, proxy, record):
    """Every run the definition calls for given the record: the sweep's points (its extensions as far as the
    record's results call for them) and, where a sweep is finished, the budget runs."""
    jobs = {}
    for c in proxy.contenders:
        results, todo, _ = sweep_state(study, proxy, c, record)
        for p in [*results, *todo]:
            job = sweep_job(study, proxy, c, p)
            jobs[job.key] = job
        for job in budget_jobs(study, proxy, c, record, quiet=True):
            jobs[job.key] = job
    return jobs


# -----------------------------------------------------------------------------
# the plan: the compute each run needs. GPU studies: FLOPs (PaLM's count, the Hessian refreshes and evaluations
# included) at a stated MFU of a stated peak. CPU studies: the seconds the record measured.

def step_flops(contender):
    """(training FLOPs of one step, FLOPs of one evaluation pass of eval_steps micro-batches: forward only, a
    third of a training token's) of the contender's runs."""
    size = model_size(contender.preset, tuple(contender.extra))
    return size["tokens_per_step"] * size["flops_per_token"] * (1 + size["hessian_share"]), size


def job_flops(job):
    train, size = step_flops(job.contender)
    eval_steps, _ = eval_steps_of(job.contender.preset, tuple(job.contender.extra), job.study.eval_tokens)
    evals = job.steps // (job.eval_interval or max(1, job.steps // job.study.evals_per_run)) + 1  # step 0 too
    return job.steps * train + evals * eval_steps * size["eval_tokens_per_step"] * size["flops_per_token"] / 3


def fit_seconds(lines):
    """(a, b) of seconds = a * steps + b, least squares over measured runs (b: the evaluations and the start-up,
    which do not grow with the steps); (seconds per step, 0) where the runs have one budget or the fit is not
    positive."""
    steps = np.array([line["steps"] for line in lines], dtype=np.float64)
    seconds = np.array([line["seconds"] for line in lines], dtype=np.float64)
    if len(set(steps.tolist())) >= 2:
        a, b = np.polyfit(steps, seconds, 1)
        if a > 0 and b >= 0:
            return float(a), float(b)
    return float(seconds.sum() / steps.sum()), 0.0


def seconds_model(study, proxy_name, contender, record):
    """(a, b, basis) of seconds = a * steps + b for the contender's runs on the proxy, from the record's measured
    seconds: its own finished runs; else those of the same contender (else the baseline) on another proxy, one of
    the same preset first, then the nearest in FLOPs per step, a scaled by the FLOPs of a step and b by those of an
    evaluation. None without such runs."""
    measured = {}
    for line in record.values():
        if line.get("status") == "finished" and line.get("seconds") and line["proxy"] in study.defined:
            measured.setdefault((line["proxy"], line["contender"]), []).append(line)
    target_step, target_size = step_flops(contender)
    target_eval = eval_steps_of(contender.preset, tuple(contender.extra), study.eval_tokens)[1]
    candidates = []
    for (proxy, name), lines in measured.items():
        source = next((c for c in study.defined[proxy].contenders if c.name == name), None)
        if source is None or name not in (contender.name, study.baseline):
            continue
        ratio = target_step / step_flops(source)[0]
        preference = ((proxy, name) != (proxy_name, contender.name), name != contender.name,
                      source.preset != contender.preset, abs(math.log(ratio)))  # the same family of presets first
        candidates.append((preference, proxy, name, source, lines, ratio))
    if not candidates:
        return None
    _, proxy, name, source, lines, ratio = min(candidates, key=lambda c: c[0])
    a, b = fit_seconds(lines)
    basis = f"{proxy}/{name}: {a:.4g} s/step + {b:.0f} s, fit to {len(lines)} measured run(s)"
    if (proxy, name) == (proxy_name, contender.name):
        return a, b, basis
    source_size = step_flops(source)[1]
    source_eval = eval_steps_of(source.preset, tuple(source.extra), study.eval_tokens)[1]
    eval_ratio = (target_eval * target_size["flops_per_token"]) / (source_eval * source_size["flops_per_token"])
    return a * ratio, b * eval_ratio, (f"{proxy_name}/{contender.name} from {basis}, x{ratio:.3g} the FLOPs per step, "
                                       f"x{eval_ratio:.3g} per evaluation")


def job_estimate(study, job, record):
    """(cost, basis): GPU-hours for a GPU study (estimate: {peak_flops, mfu}), else the run's seconds on one core
    from the record; cost None when the record has nothing to go by."""
    if study.estimate != "record":
        e = study.estimate
        return (job_flops(job) / (e["peak_flops"] * e["mfu"]) / 3600,
                f"PaLM's FLOPs per token (model.py), at {e['mfu']:.0%} MFU of {e['peak_flops']:.3g} FLOP/s ({e['device']})")
    model = seconds_model(study, job.proxy, job.contender, record)
    if model is None:
        return None, f"no measured run in {relative(study.record)} to go by"
    a, b, basis = model
    return a * job.steps + b, basis


def estimate_text(study, job, record):
    cost, _ = job_estimate(study, job, record)
    if cost is None:
        return f"{job.steps} steps, no estimate"
    if study.estimate != "record":
        tokens = step_flops(job.contender)[1]["tokens_per_step"]
        return f"{job.steps} steps x {tokens:,} tokens, {cost:.1f} GPU-hours"
    return f"{job.steps} steps, ~{cost / 60:.1f} min"


def plan_text(study, plan, record, jobs_side_by_side):
    """What a dry run listed, and what waits on it, with the compute it needs."""
    parts = [("now", "listed above"), ("extensions", "grid extensions the sweeps may still add, at most"),
             ("later", "budget runs that wait on the sweeps"), ("time", "timing runs, one at a time")]
    gpu = study.estimate != "record"
    lines, totals, bases, unknown = [f"plan of study {study.name} ({', '.join(study.proxies)}):"], {}, set(), 0
    for part, what in parts:
        jobs = plan.get(part, [])
        if not jobs:
            continue
        costs = [job_estimate(study, j, record) for j in jobs]
        known = [c for c, _ in costs if c is not None]
        unknown += len(costs) - len(known)
        bases |= {basis for c, basis in costs if c is not None}
        total = sum(known)
        if gpu:
            text = f"{total:,.1f} GPU-hours"
        else:
            wall = total if part == "time" else total / jobs_side_by_side
            totals[part] = wall
            text = f"~{total / 3600:.2f} CPU-hours, ~{wall / 3600:.2f} h" + (
                "" if part == "time" else f" at {jobs_side_by_side} side by side")
        totals.setdefault("gpu_" + part, total)
        lines.append(f"  {part}: {len(jobs)} run(s) ({what}), {sum(j.steps for j in jobs):,} steps: {text}")
    if gpu:
        done = sum(v for k, v in totals.items() if k.startswith("gpu_") and k != "gpu_extensions")
        per_run = study.estimate["gpus_per_run"]
        lines.append(f"  in all: {done:,.1f} GPU-hours ({done / per_run:,.1f} h of {per_run}-GPU runs one after "
                     f"another), {done + totals.get('gpu_extensions', 0):,.1f} with every extension")
    elif totals:
        wall = sum(v for k, v in totals.items() if k in ("now", "later", "time"))
        lines.append(f"  in all: ~{wall / 3600:.2f} h on this machine, ~{(wall + totals.get('extensions', 0)) / 3600:.2f} h "
                     "with every extension")
    if unknown:
        lines.append(f"  {unknown} run(s) without an estimate: no measured run in {relative(study.record)} to go by")
    lines += [f"  basis: {basis}" for basis in sorted(bases)]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# time: seconds per step, one run at a time

def seconds_per_step(events, tokens_per_step):
    """Mean seconds per step over the log lines after the first (which holds the start-up): each line's
    throughput covers its steps only (evaluation excluded), Hessian refreshes included."""
    rates = [e["throughput/tokens_per_s"] for e in events if e.get("throughput/tokens_per_s")][1:]
    return float(np.mean([tokens_per_step / r for r in rates])) if rates else None


QUIET_WAIT_S = 120  # time: how long to wait for the load average to fall below --max-load


def phase_time(study, proxy, record, args):
    """Each contender's seconds per step at its best setting, one run at a time: locally on a quiet machine
    (refused above --max-load), on SLURM one job after another (each on whole nodes, as train.sbatch asks)."""
    local = args.launcher == "local"
    load, waited = os.getloadavg()[0], 0
    while local and load > args.max_load and waited < QUIET_WAIT_S and not args.dry_run:  # runs just ended? settle
        time.sleep(15)
        load, waited = os.getloadavg()[0], waited + 15
    if local and load > args.max_load and not args.dry_run:
        print(f"!!! the 1-minute load average is {load:.2f} > --max-load {args.max_load}: timings would measure the "
              "other processes too. Not timing: rerun --phase time on a quiet machine (or raise --max-load, and say so)",
              file=sys.stderr)
        return False
    for c in proxy.contenders:
        best = best_settings(study, proxy, c, record)
        if best is None:
            print(f"{proxy.name}/{c.name}: its sweep is not finished: not timed")
            if args.dry_run:  # counted in the plan at the grid's first point (the estimate depends on the steps)
                args.plan.setdefault("time", []).append(Job(study, proxy.name, c, dict(grid_points(c.grid)[0]),
                                                            study.time_steps, study.seeds[0], study.runs / "time"))
            continue
        job = Job(study, proxy.name, c, best[0], study.time_steps, study.seeds[0], study.runs / "time",
                  eval_interval=study.time_steps)
        launcher = make_launcher(study, args, ledger="time/slurm_jobs.jsonl")  # a fresh run every time, never adopted
        if args.dry_run:
            print(f"# {job.key}: {estimate_text(study, job, record)}")
            print(launcher.describe(job))
            args.plan.setdefault("time", []).append(job)
            continue
        shutil.rmtree(job.out_dir, ignore_errors=True)  # a fresh run every time: a finished one would not run
        job.out_dir.parent.mkdir(parents=True, exist_ok=True)
        load_before = os.getloadavg()[0]
        launcher.start(job)
        ended = []
        while not ended:
            ended = launcher.wait()
        _, returncode, fields = ended[0]
        if returncode != 0:
            log = job.log_path.read_text(errors="replace")[-2000:] if job.log_path.is_file() else ""
            print(f"timing run failed ({fields or f'exit {returncode}'}): {job.command()}\n{log}", file=sys.stderr)
            continue
        size = model_size(c.preset, tuple(c.extra))
        events = read_metrics(job.out_dir / "metrics.jsonl")
        line = {"proxy": proxy.name, "contender": c.name, "settings": best[0], "steps": study.time_steps,
                "seconds_per_step": seconds_per_step(events, size["tokens_per_step"]),
                "load_before": load_before if local else None, "load_after": os.getloadavg()[0] if local else None,
                "command": job.command(), "commit": git_commit(), "machine": machine(),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
        append_line(study.times, line)
        print(f"{proxy.name}/{c.name}: {line['seconds_per_step']:.4f} s/step (load {load_before:.2f} -> "
              f"{os.getloadavg()[0]:.2f})", flush=True)
    return True


# -----------------------------------------------------------------------------
# verify: a recorded command, rerun on its recorded commit, gives its recorded final val loss

def verify_lines(study, record, runs_per_contender):
    """The record lines to rerun: per contender of the chosen proxies, its cheapest finished runs (fewest steps
    first), runs_per_contender of them (0: all)."""
    chosen = []
    for proxy in study.proxies.values():
        for c in proxy.contenders:
            lines = sorted((ln for ln in record.values() if ln["proxy"] == proxy.name and ln["contender"] == c.name
                            and ln["status"] == "finished"), key=lambda ln: (ln["steps"], ln["key"]))
            chosen += lines[:runs_per_contender or None]
    return chosen


def code_at(commit, root, head):
    """A folder holding the code of `commit`: the repository itself when its HEAD (`head`, git_commit()'s answer)
    is that commit with no change outside docs/, else the commit's tracked files exported under root (once;
    `git archive`, so the repository is left as it is). Raises StudyError when the commit cannot be had."""
    if commit.endswith("-dirty"):
        raise StudyError(f"commit {commit}: the run used uncommitted code, which no checkout can give back")
    if head == commit:
        return REPO
    if subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=REPO, capture_output=True).returncode:
        raise StudyError(f"commit {commit} is not in this clone: fetch it (git fetch origin {commit}) and rerun")
    folder = root / commit[:12]
    if not (folder / "train.py").is_file():
        partial = root / f"{commit[:12]}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(partial)], input=archive.stdout, check=True)
        partial.rename(folder)
    return folder


def rerun_argv(line, out_dir):
    """The recorded command as (environment, argv), writing to out_dir instead of the recorded run's folder."""
    env, words = split_command(line["command"])
    if words[:2] != ["python", "train.py"]:
        raise StudyError(f"{line['key']}: unexpected command {line['command']!r} (expected [VAR=value ...] python "
                         "train.py ...)")
    return env, [*[w for w in words if not w.startswith("out_dir=")], f"out_dir={out_dir}"]


def final_val_loss(out_dir, steps):
    """The val loss logged at the last step, or None."""
    metrics = out_dir / "metrics.jsonl"
    events = read_metrics(metrics) if metrics.is_file() and metrics.stat().st_size else []
    finals = [e["val/loss"] for e in events if e.get("val/loss") is not None and e.get("step") == steps]
    return finals[-1] if finals else None


def run_side_by_side(runs, jobs):
    """runs: [(environment, argv, cwd, log path)], `jobs` at a time; returns when all have ended."""
    running, waiting = [], list(runs)
    while waiting or running:
        while waiting and len(running) < jobs:
            env, argv, cwd, log = waiting.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"rerun in {cwd}: {shlex.join(argv)}", flush=True)
            with open(log, "w") as f:
                running.append(subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env}, stdout=f,
                                                stderr=subprocess.STDOUT))
        time.sleep(1)
        running = [p for p in running if p.poll() is None]


def phase_verify(study, record, args):
    """Rerun the chosen record lines, --jobs at a time, each on its recorded commit, and compare final val losses.
    Returns 0 when every one is within --tolerance of its record, 1 otherwise."""
    root, head, todo = study.runs / "verify", git_commit(), []
    for line in verify_lines(study, record, args.verify_runs):
        out_dir = root / "runs" / line["key"]
        try:
            folder = code_at(line["commit"], root / "code", head)
            env, argv = rerun_argv(line, out_dir)
        except StudyError as e:
            print(f"cannot verify {line['key']}: {e}")
            todo.append((line, None, None, None, out_dir))
            continue
        if not args.dry_run:
            shutil.rmtree(out_dir, ignore_errors=True)
            if not any(w.startswith("data.dir=") for w in argv):
                prepare_data(folder, preset_config(line["preset"]))
        todo.append((line, folder, env, argv, out_dir))
    if args.dry_run:
        for line, folder, env, argv, _ in todo:
            if folder is not None:
                print(f"(cd {folder} && {' '.join([*(f'{k}={v}' for k, v in env.items()), shlex.join(argv)])})")
        return 0
    if not todo:
        print(f"nothing to verify: no finished run of {', '.join(study.proxies)} in {study.record}", file=sys.stderr)
        return 2
    run_side_by_side([(env, argv, folder, Path(f"{out_dir}.log")) for _, folder, env, argv, out_dir in todo if folder],
                     args.jobs)
    pairs = []
    for line, folder, _, _, out_dir in todo:
        got = None if folder is None else final_val_loss(out_dir, line["steps"])
        if folder is not None and got is None:
            print(f"{line['key']}: the rerun logged no final val loss; see {out_dir}.log")
        pairs.append((line, got))
    print_machines(("record", [line for line, _ in pairs]))
    print(f"rerun's machine: {machine()}")  # a CPU of another kind rounds apart
    return print_differences(pairs, "rerun", args.tolerance)


def print_machines(*named_lines):
    """Each (name, record lines): the machines those lines were made on, as the record notes them."""
    for name, lines in named_lines:
        machines = sorted({line.get("machine", "not noted (made before the record noted it)") for line in lines})
        print(f"{name}'s machine(s): {'; '.join(machines)}")


def print_differences(pairs, other, tolerance):
    """pairs: [(record line, the other final val loss or None)]. Prints them side by side; returns 0 when every
    one is within `tolerance` of the record, 1 otherwise."""
    rows = []
    for line, got in pairs:
        same = got is not None and abs(got - line["final_val_loss"]) <= tolerance
        delta = "n/a" if got is None else f"{got - line['final_val_loss']:+.2e}"
        rows.append(f"| {line['key']} | {line['commit'][:12]} | {line['final_val_loss']:.6f} | "
                    f"{'n/a' if got is None else f'{got:.6f}'} | {delta} | {'yes' if same else 'NO'} |")
    print("\n".join([f"| run | commit | recorded | {other} | difference | within tolerance |",
                     "|---|---|---|---|---|---|", *rows]))
    within = sum(r.endswith("yes |") for r in rows)
    print(f"{within} of {len(rows)} {other}(s) within {tolerance:g} of the record")
    return 0 if within == len(rows) else 1


def blocks_mean(line):
    return ((line.get("win_rate") or {}).get("blocks") or {}).get("mean")


def phase_against(study, record, args):
    """Compare the record with another one the study wrote (--against: the same study on another machine or
    checkout), run by run, without rerunning anything: each shared finished run's two final val losses, the
    median and largest difference, the largest difference in the blocks' win rate, and each contender's best
    sweep setting in both. Returns 0 when every shared run is within --tolerance, 1 otherwise, 2 when none is
    shared."""
    other = read_record(args.against)
    wanted = {(proxy.name, c.name) for proxy in study.proxies.values() for c in proxy.contenders}
    pairs = sorted(((line, other[key]) for key, line in record.items()
                    if (line["proxy"], line["contender"]) in wanted and key in other
                    and line["status"] == other[key]["status"] == "finished"), key=lambda pair: pair[0]["key"])
    if not pairs:
        print(f"no finished run of {', '.join(study.proxies)} is in both {study.record} and {args.against}",
              file=sys.stderr)
        return 2
    print_machines(("record", [line for line, _ in pairs]), ("other", [twin for _, twin in pairs]))
    status = print_differences([(line, twin["final_val_loss"]) for line, twin in pairs], "other", args.tolerance)
    gaps = sorted((abs(twin["final_val_loss"] - line["final_val_loss"]), line["key"]) for line, twin in pairs)
    print(f"{len(pairs)} run(s) in both; {sum(gap == 0 for gap, _ in gaps)} bit-equal; |difference| median "
          f"{float(np.median([gap for gap, _ in gaps])):.2e}, largest {gaps[-1][0]:.2e} ({gaps[-1][1]})")
    wins = [(abs(blocks_mean(twin) - blocks_mean(line)), line["key"]) for line, twin in pairs
            if None not in (blocks_mean(line), blocks_mean(twin))]
    if wins:
        print(f"win rate in the blocks (mean over a run): largest difference {max(wins)[0]:.4f} ({max(wins)[1]})")
    for proxy in study.proxies.values():
        for c in proxy.contenders:
            best = [best_settings(study, proxy, c, r) for r in (record, other)]
            if None not in best:
                print(f"{proxy.name}/{c.name}: best sweep setting {best[0][0]} in the record, {best[1][0]} in the "
                      f"other: {'the same' if best[0][0] == best[1][0] else 'DIFFERENT'}")
    return status


# -----------------------------------------------------------------------------
# report: from the record alone

def run_of(line):
    """A record line -> Run: one contender (optim.name = the contender) at one budget and seed."""
    events = [{"step": s, "val/loss": loss} for s, loss in line["curve"]]
    if line["final_val_loss"] is None:  # diverged: its final loss is no number
        events.append({"step": line["steps"] + 1, "val/loss": float("nan")})
    config = {"optim": {"name": line["contender"]}, "max_steps": line["steps"], "seed": line["seed"]}
    return run_from_events(line["key"], config, events)


def report_file(study, suffix):
    """<report><suffix>: docs/study_cpu.json, docs/study_cpu_char_sweep.png, ..."""
    return study.report.parent / f"{study.report.name}{suffix}"


def proxy_report(study, proxy, record, times):
    """(the proxy's part of the report's JSON, its markdown)."""
    P, runs, md = {"contenders": {}}, [], [f"## proxy `{proxy.name}`\n"]
    sweep_rows = ["| contender | settings | final val loss | win rate blocks (mean/peak/final) | "
                  "win rate all (mean) | Hessian grad norm (mean) | Hessian clip rate (mean) |", "|---|---|---|---|---|---|---|"]
    for c in proxy.contenders:
        results, todo, capped = sweep_state(study, proxy, c, record)
        sweep = [record[sweep_job(study, proxy, c, p).key] for p in results
                 if sweep_job(study, proxy, c, p).key in record]
        C = {"sweep": [{"settings": s["settings"], "final_val_loss": s["final_val_loss"],
                        "win_rate_blocks": (s["win_rate"]["blocks"] or {}).get("mean"), "win_rate": s["win_rate"],
                        "hessian_grad_norm": s["hessian_grad_norm"], "hessian_clip_rate": s["hessian_clip_rate"],
                        "status": s["status"], "command": s["command"]} for s in sweep]}
        for s in sweep:
            wr = s["win_rate"]
            blocks = "n/a" if wr["blocks"] is None else "/".join(f"{wr['blocks'][k]:.3f}" for k in ("mean", "peak", "final"))
            loss = "diverged" if s["final_val_loss"] is None else f"{s['final_val_loss']:.4f}"
            sweep_rows.append(f"| {c.name} | {' '.join(f'{k}={v:g}' for k, v in s['settings'].items())} | {loss} | "
                              f"{blocks} | {mean_text(wr['all'])} | {mean_text(s['hessian_grad_norm'])} | "
                              f"{mean_text(s['hessian_clip_rate'])} |")
        best = best_settings(study, proxy, c, record)
        if best is None:
            C.update(best=None, best_on_edge=None, budgets=[])
            P["contenders"][c.name] = C
            md.append(f"- {c.name}: sweep not finished ({len(todo)} run(s) to go)")
            continue
        C.update(best=best[0], best_on_edge=best[1], extensions_capped=best[2])
        if c.regime is not None:  # its best is chosen within its regime: say what the best outside it did
            outside = [s for s in sweep if s["final_val_loss"] is not None and not in_regime(s, c.regime)]
            if outside:
                o = min(outside, key=lambda s: s["final_val_loss"])
                C["best_outside_regime"] = {"settings": o["settings"], "final_val_loss": o["final_val_loss"],
                                            "win_rate_blocks": (o["win_rate"]["blocks"] or {}).get("mean")}
                wins = C["best_outside_regime"]["win_rate_blocks"]
                md.append(f"- {c.name}: best chosen among runs whose blocks' mean win rate is in {list(c.regime)} "
                          f"(its authors' regime): {best[0]}; the best outside it, "
                          f"{' '.join(f'{k}={v:g}' for k, v in o['settings'].items())} (blocks win rate "
                          f"{'n/a' if wins is None else f'{wins:.3f}'}), reached {o['final_val_loss']:.4f}")
        if best[2]:
            md.append(f"- {c.name}: the grid extension stopped at its cap ({study.max_extensions}); the best point is "
                      "still on the grid's edge")
        lines = sorted((record[j.key] for j in budget_jobs(study, proxy, c, record) if j.key in record),
                       key=lambda ln: (ln["steps"], ln["seed"] != study.seeds[0]))  # shortest budget first
        C["budgets"] = [{"steps": s, "seeds": [ln["seed"] for ln in lines if ln["steps"] == s],
                         "final_val_loss": [ln["final_val_loss"] for ln in lines if ln["steps"] == s],
                         "commands": [ln["command"] for ln in lines if ln["steps"] == s],
                         "win_rate": [ln["win_rate"] for ln in lines if ln["steps"] == s],
                         "hessian_grad_norm": [ln["hessian_grad_norm"] for ln in lines if ln["steps"] == s],
                         "hessian_clip_rate": [ln["hessian_clip_rate"] for ln in lines if ln["steps"] == s]}
                        for s in sorted({ln["steps"] for ln in lines})]
        runs += [run_of(ln) for ln in lines]
        P["contenders"][c.name] = C
    md += ["", "### sweep (one seed, the preset's budget)", "", *sweep_rows, ""]
    if any(C["sweep"] for C in P["contenders"].values()):
        plot_sweep(proxy.name, P, report_file(study, f"_{proxy.name}_sweep.png"))
        md.append(f"![sweep]({study.report.name}_{proxy.name}_sweep.png)\n")
    names = {r.config["optim.name"] for r in runs}
    if study.baseline not in names:
        md.append("no AdamW budget runs yet: no multipliers" if study.baseline == "adamw" else
                  f"no {study.baseline} budget runs yet: no multipliers")
        return P, "\n".join(md)
    baseline_budgets = {r.config["max_steps"] for r in runs if r.config["optim.name"] == study.baseline}
    if len(baseline_budgets) < 2:  # a curve through one point: nothing to read a multiplier off
        who = "AdamW" if study.baseline == "adamw" else study.baseline
        md.append(f"{who} has runs at one budget only ({sorted(baseline_budgets)[0]} steps): no multipliers yet "
                  "(run --phase budgets)")
        return P, "\n".join(md)
    groups = budget_groups(runs)
    baseline = next(g for g in groups if g.label == study.baseline)
    seconds = {c: t["seconds_per_step"] for c, t in times.get(proxy.name, {}).items()
               if c in names and t["seconds_per_step"]}
    curve = analyse_budgets(groups, baseline, seconds if study.baseline in seconds else None)
    P["adamw_curve"], P["seconds_per_step"] = curve, seconds
    for g in groups:
        C = P["contenders"][g.label]
        C["budget_stats"] = clean(g.stats["budgets"])
        one_x = next((r for r in g.stats["budgets"]
                      if r["steps"] == preset_steps(next(c for c in proxy.contenders if c.name == g.label))), None)
        for key in ("data_multiplier", "time_multiplier"):
            stats = None if one_x is None else one_x[key]
            C[key] = None if not stats else clean({"budget_steps": one_x["steps"], "mean": stats["mean"],
                                                   "ci95": stats["ci95"], "extrapolated": one_x["extrapolated"]})
    md += ["### budgets", "", budget_table(groups, baseline, curve), ""]
    for name, C in P["contenders"].items():  # the regime of every Sophia result
        regime = [(b["steps"], [w["blocks"]["mean"] for w in b["win_rate"] if w["blocks"]]) for b in C["budgets"]]
        if any(values for _, values in regime):
            md.append(f"- {name}'s win rate in the blocks (mean over each run, then over seeds): " + ", ".join(
                f"{steps} steps {np.mean(values):.3f}" for steps, values in regime if values))
    for name, t in sorted(times.get(proxy.name, {}).items()):
        before, after = (f"{t[key]:.2f}" if t.get(key) is not None else "?" for key in ("load_before", "load_after"))
        md.append(f"- time: {name} {t['seconds_per_step']:.4f} s/step at {t.get('settings')}, {t.get('date')}, load "
                  f"average {before} before, {after} after")
    if study.baseline not in seconds:
        md.append(f"- no timing of {'AdamW' if study.baseline == 'adamw' else study.baseline} in "
                  f"{relative(study.times)}: no time multipliers (run --phase time)")
    plot_budgets(groups, baseline, report_file(study, f"_{proxy.name}_budgets.png"), f"{proxy.name} proxy: final val loss")
    md += ["", f"![final loss vs budget]({study.report.name}_{proxy.name}_budgets.png)", ""]
    return P, "\n".join(md)


def mean_text(summary):
    return "n/a" if summary is None else f"{summary['mean']:.3g}"


def plot_sweep(proxy, P, out_path):
    """Left: every contender's sweep, final loss vs lr (SophiaG one line per rho). Right: SophiaG's blocks win rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_win) = plt.subplots(1, 2, figsize=(13, 5))
    for name, C in P["contenders"].items():
        by_rho = {}
        for s in C["sweep"]:
            by_rho.setdefault(s["settings"].get("optim.rho"), []).append(s)
        for rho, points in sorted(by_rho.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            points = sorted(points, key=lambda s: s["settings"]["optim.lr"])
            lrs = [s["settings"]["optim.lr"] for s in points]
            label = name + ("" if rho is None else f" rho={rho:g}")
            ax_loss.plot(lrs, [np.nan if s["final_val_loss"] is None else s["final_val_loss"] for s in points],
                         marker="o", label=label)
            if rho is not None:
                ax_win.plot(lrs, [np.nan if s["win_rate_blocks"] is None else s["win_rate_blocks"] for s in points],
                            marker="o", label=label)
    for ax, ylabel in ((ax_loss, "final val loss"), (ax_win, "win rate in the blocks (mean over the run)")):
        ax.set_xscale("log")
        ax.set_xlabel("optim.lr")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{proxy} proxy: the sweep (one seed, the preset's budget)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def read_times(path):
    """{proxy: {contender: the latest timing line}}."""
    times = {}
    if Path(path).is_file():
        for text in Path(path).read_text().splitlines():
            if text.strip():
                line = json.loads(text)
                times.setdefault(line["proxy"], {})[line["contender"]] = line
    return times


# the scale axes: how each contender's data multiplier moves along tokens per step and along model size

AXES = {"tokens_per_step": "tokens per step", "n_params": "parameters"}


def axis_value(axis, x):
    return f"{x / 1e6:.2f}M" if axis == "n_params" else f"{x:,}"


def axis_rows(study, proxies_report, axis):
    """[(contender, [(proxy, x, data multiplier or None)])] along one axis, its points ordered by x."""
    points = sorted((p for p in study.axes.get(axis, []) if p in proxies_report), key=lambda p: proxies_report[p][axis])
    names = [c.name for p in points for c in study.proxies[p].contenders if c.name != study.baseline]
    rows = []
    for name in [n for n in dict.fromkeys(names) if names.count(n) >= 2]:  # on the axis: at two points or more
        rows.append((name, [(p, proxies_report[p][axis],
                             proxies_report[p]["contenders"].get(name, {}).get("data_multiplier")) for p in points]))
    return rows


def trend_statement(study, proxies_report, axis):
    """What the points say along the axis, contender by contender, and what they cannot say."""
    rows = axis_rows(study, proxies_report, axis)
    points = [p for p, _, _ in rows[0][1]] if rows else []
    if len(points) < 2:
        return []
    xs = [proxies_report[p][axis] for p in points]
    lines = []
    for name, cells in rows:
        known = [(p, x, m) for p, x, m in cells if m and m.get("mean") is not None]
        if len(known) < 2:
            lines.append(f"- {name}: multipliers at {len(known)} of {len(cells)} points so far: no trend yet.")
            continue
        (_, x0, m0), (_, x1, m1) = known[0], known[-1]
        both = (f"{format_interval(m0)} at {axis_value(axis, x0)} to {format_interval(m1)} at {axis_value(axis, x1)} "
                f"{AXES[axis]}")
        if not (m0.get("ci95") and m1.get("ci95")):  # one seed: a mean without an interval cannot be judged
            lines.append(f"- {name}: from {both}: one seed at one end, no interval there: no verdict yet.")
        elif m1["ci95"][0] > m0["ci95"][1] or m1["ci95"][1] < m0["ci95"][0]:
            word = "rises" if m1["mean"] > m0["mean"] else "falls"
            lines.append(f"- {name}: its data multiplier {word} from {both} (the 95% intervals do not overlap).")
        else:
            lines.append(f"- {name}: from {both}: no change beyond the 95% intervals.")
        if any(m.get("extrapolated") for _, _, m in known):
            lines[-1] += " Some multipliers lie beyond AdamW's curve (extrapolated through its fit)."
    reference = study.axes.get("reference")
    scale = ""
    if reference and preset_exists(reference):
        size = model_size(reference)
        scale = (f", not an extrapolation to {reference} ({size['n_params'] / 1e6:.0f}M parameters, "
                 f"{size['tokens_per_step']:,} tokens per step)")
    held = {"tokens_per_step": "n_params", "n_params": "tokens_per_step"}[axis]
    fixed = sorted({proxies_report[p][held] for p in points})
    lines.append(f"- What it cannot say: {len(points)} points spanning {max(xs) / min(xs):.3g}x the {AXES[axis]} "
                 f"({axis_value(axis, min(xs))} to {axis_value(axis, max(xs))}), at "
                 f"{' / '.join(axis_value(held, v) for v in fixed)} {AXES[held]}, on one corpus: a direction on this "
                 f"proxy{scale}.")
    return lines


def axes_report(study, proxies_report):
    """The scale axes' section (markdown), its plot, and the JSON's part."""
    axes = [a for a in AXES if len([p for p in study.axes.get(a, []) if p in proxies_report]) >= 2]
    if not axes:
        return "", {}
    md, out = ["## scale axes: the data multiplier against tokens per step and parameters", ""], {}
    for axis in axes:
        rows = axis_rows(study, proxies_report, axis)
        points = [p for p, _, _ in rows[0][1]] if rows else []
        md += [f"### {AXES[axis]}", "",
               "| contender | " + " | ".join(f"{p} ({axis_value(axis, proxies_report[p][axis])})" for p in points) + " |",
               "|---|" + "---|" * len(points)]
        for name, cells in rows:
            md.append(f"| {name} | " + " | ".join(
                format_interval(m) + (" †" if m and m.get("extrapolated") else "") for _, _, m in cells) + " |")
        statement = trend_statement(study, proxies_report, axis)
        md += ["", *statement, ""]
        out[axis] = {"proxies": points, "statement": statement}
    if any(m for axis in axes for _, cells in axis_rows(study, proxies_report, axis) for _, _, m in cells):
        plot_axes(study, proxies_report, axes, report_file(study, "_scale.png"))
        md += [f"![data multiplier against the scale axes]({study.report.name}_scale.png)", ""]
    md.append(f"Data multiplier: at each proxy's 1x budget, against {study.baseline}'s final-loss-vs-steps curve on "
              "the same proxy (mean over seeds, 95% t-interval; † read off the fit beyond the curve's range).")
    return "\n".join(md), out


def plot_axes(study, proxies_report, axes, out_path):
    """One panel per axis: each contender's data multiplier (95% interval bars) against the axis, log x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, len(axes), figsize=(6.5 * len(axes), 5), squeeze=False)
    for ax, axis in zip(panels[0], axes):
        for name, cells in axis_rows(study, proxies_report, axis):
            known = [(x, m) for _, x, m in cells if m and m.get("mean") is not None]
            if not known:
                continue
            xs = np.array([x for x, _ in known], dtype=np.float64)
            means = np.array([m["mean"] for _, m in known])
            lo = np.array([m["mean"] - m["ci95"][0] if m.get("ci95") else 0.0 for _, m in known])
            hi = np.array([m["ci95"][1] - m["mean"] if m.get("ci95") else 0.0 for _, m in known])
            ax.errorbar(xs, means, yerr=[lo, hi], marker="o", capsize=4, label=name)
        ax.axhline(1.0, color="black", ls="--", lw=1, label=f"{study.baseline} (1 by definition)")
        ax.set_xscale("log")
        points = [(p, x) for p, x, _ in axis_rows(study, proxies_report, axis)[0][1]]
        ax.set_xlim(min(x for _, x in points) / 1.5, max(x for _, x in points) * 1.5)  # every point, measured or not
        ax.set_xticks([x for _, x in points], [f"{p}\n{axis_value(axis, x)}" for p, x in points])
        ax.minorticks_off()
        ax.set_xlabel(f"{AXES[axis]} (log scale)")
        ax.set_ylabel(f"data multiplier vs {study.baseline} at the 1x budget")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(f"study {study.name}: the data multiplier along the scale axes; bars: 95% t-interval over seeds")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def phase_report(study, record):
    times = read_times(study.times)
    study.report.parent.mkdir(parents=True, exist_ok=True)
    out = {"commit": sorted({ln["commit"] for ln in record.values()}), "proxies": {}}
    md = [f"# {study.title} (scripts/study.py {study.source})", "",
          f"Runs in the record: {len(record)}; code commit(s): {', '.join(out['commit']) or 'none'}.", ""]
    for proxy in study.proxies.values():
        P, text = proxy_report(study, proxy, record, times)
        size = model_size(proxy.contenders[0].preset, tuple(proxy.contenders[0].extra))  # the proxy's model and batch
        P["notes"], P["timing"] = [], times.get(proxy.name, {})
        P["tokens_per_step"], P["n_params"] = size["tokens_per_step"], size["n_params"]
        out["proxies"][proxy.name] = P
        md += [text, ""]
    text, axes = axes_report(study, out["proxies"])
    if axes:
        out["axes"] = axes
        md += [text, ""]
    json_path, md_path = report_file(study, ".json"), report_file(study, ".md")
    json_path.write_text(json.dumps(clean(out), indent=2) + "\n")
    md_path.write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {relative(json_path)}, {relative(md_path)} and the plots {relative(study.report)}_*.png")


# -----------------------------------------------------------------------------
# the phases, as scripts/study.py asks for them

def select(study, proxy=None, contenders=None):
    """The study narrowed to one proxy and to some contenders (scripts/study.py --proxy, --contenders)."""
    proxies = study.proxies
    if proxy is not None:
        if proxy not in proxies:
            raise StudyError(f"--proxy {proxy}: not among the study's proxies {sorted(proxies)}")
        proxies = {proxy: proxies[proxy]}
    if contenders is not None:
        wanted = contenders.split(",")
        known = {c.name for p in proxies.values() for c in p.contenders}
        if set(wanted) - known:
            raise StudyError(f"--contenders {contenders}: {sorted(set(wanted) - known)} not among {sorted(known)}")
        if study.baseline not in wanted:
            print(f"note: without {study.baseline} the report has no multipliers ({study.baseline} is their baseline)")
        proxies = {name: replace(p, contenders=[c for c in p.contenders if c.name in wanted])
                   for name, p in proxies.items()}
    return replace(study, proxies=proxies)


def run_study(study, args):
    """args: phase, launcher, jobs, dry_run, max_load, verify_runs, tolerance, against (scripts/study.py's).
    Returns the exit status."""
    record = read_record(study.record)
    args.plan, args.launcher_object = {}, make_launcher(study, args)
    if args.phase == "verify":
        return phase_against(study, record, args) if args.against else phase_verify(study, record, args)
    phases = ["sweep", "budgets", "time", "report"] if args.phase == "all" else [args.phase]
    for phase in phases:
        for proxy in study.proxies.values():
            if phase == "sweep":
                phase_sweep(study, proxy, record, args)
                if args.dry_run:
                    args.plan.setdefault("extensions", []).extend(extension_jobs(study, proxy, record))
            elif phase == "budgets":
                phase_budgets(study, proxy, record, args)
            elif phase == "time" and not phase_time(study, proxy, record, args) and args.phase == "time":
                return 2
        if phase == "report" and not args.dry_run:
            phase_report(study, record)
    if args.dry_run and any(args.plan.values()):
        print(plan_text(study, args.plan, record, 1 if args.launcher == "slurm" else args.jobs))
    return 0
