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
"""

import argparse
import difflib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
import yaml

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
