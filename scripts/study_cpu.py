"""
Does Sophia beat AdamW? The study of issue 16 on CPU, for two proxies of the embedded Shakespeare corpus:
`char` (the main one: presets shakespeare_char_*, a 4x4x128 baby GPT on characters) and `bpe` (the tiny GPT-2 BPE
model of presets shakespeare_*).

    python scripts/study_cpu.py --phase all --proxy char --jobs 2      # sweep, budgets, time, report
    python scripts/study_cpu.py --phase sweep --proxy all --dry-run    # print the commands, run nothing
    python scripts/study_cpu.py --phase time --proxy char              # on a quiet machine: seconds per step
    python scripts/study_cpu.py --phase report                         # docs/study_cpu.{json,md} + plots, from the record
    python scripts/study_cpu.py --phase verify --proxy char            # rerun recorded commands, compare their losses
    python scripts/study_cpu.py --phase verify --against other/runs.jsonl   # compare with another machine's record

Phases:
  sweep    one seed at the preset's budget: AdamW lr, official-style AdamW lr (grad_clip 1/6, eps/6: the official
           GPT-2 small run's effective values), Lion lr, SophiaG lr x rho, Muon lr (where the loop has optim=muon).
           A best point on the edge of its grid gets the next point beyond that edge, until it is inside
           (at most MAX_EXTENSIONS per contender; the report says when that cap was hit).
  budgets  each contender's best setting at 1x, 1/2x and 1/4x the preset's steps, AdamW's also at 2x (each its own
           full schedule: the same warmup, cosine to min_lr at its own last step), every seed (the sweep's run is the
           first seed at 1x); the official-style AdamW only where it beats plain AdamW in the sweep.
  time     each contender's seconds per step at its best setting (Hessian refreshes included), one run at a time
           in this process's order; refused when the load average exceeds --max-load: run it last, on a quiet machine.
  report   scripts/compare.py --budgets over the record: docs/study_cpu.json, docs/study_cpu.md, and the plots
           docs/study_cpu_<proxy>_budgets.png and docs/study_cpu_<proxy>_sweep.png.
  verify   (not part of `all`) rerun recorded commands, each on the code of its recorded commit (exported with
           git archive under <--out>/verify/code when HEAD is another), and print each final val loss beside the
           recorded one; exit 1 when one differs by more than --tolerance. --verify-runs N per contender, the
           cheapest first (0: every run). On the machine that made the record a rerun is expected to be bit-equal
           (one thread per run, fixed seeds); another CPU's kernels may round differently. With --against FILE
           (a runs.jsonl the study wrote on another machine or checkout) it reruns nothing: it prints each run in
           both side by side, the median and largest difference, and each contender's best setting in both.

Every run uses OMP_NUM_THREADS=1 (--jobs N of them side by side), min_lr = lr x the preset's min_lr/lr (so each lr
of a sweep decays to the same fraction of itself), an evaluation over at least EVAL_TOKENS validation tokens at
EVALS_PER_RUN evenly spaced points, and out_dir=<--out>/<proxy>/<contender>/<settings>_steps<N>_seed<S>.

The record: every finished run appends one line to docs/study/runs.jsonl (its command, settings, final loss, win
rates, loss curve, commit), the timing phase to docs/study/time.jsonl. Commit them as they grow: a run in the record
is never run again, and the report reads the record alone, so a new machine resumes the study from a checkout.
"""

import argparse
import functools
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from config_schema import compose_config  # noqa: E402
from data.stream import data_dir_of  # noqa: E402
from scripts import compare  # noqa: E402

DOCS = REPO / "docs"
RECORD = DOCS / "study" / "runs.jsonl"
TIME_RECORD = DOCS / "study" / "time.jsonl"
EVAL_TOKENS = 100_000          # validation tokens of every evaluation (the floor for the final loss)
EVALS_PER_RUN = 4              # evaluations after step 0: every max_steps / 4 steps (the loss curve's points)
# Budgets, as multiples of the preset's max_steps, in the order they run (the preset's own budget first, so that
# a study cut short still has every contender's seeds there). AdamW's curve is what every other final loss is read
# off, so it also runs at 2x: a contender up to twice as fast as AdamW at 1x is interpolated, not extrapolated.
BUDGET_FACTORS = (1, 0.5, 0.25)
REFERENCE_EXTRA_FACTORS = (2,)
SOPHIA_REGIME = (0.1, 0.5)     # SophiaG's blocks win rate where its authors run it (official README: 0.1-0.5)
MAX_EXTENSIONS = 3             # grid points added beyond an edge, per contender
TIME_STEPS = 200               # steps of a timing run
QUIET_WAIT_S = 120             # time: how long to wait for the load average to fall below --max-load
OFFICIAL_ADAMW = {"grad_clip": 1 / 6}  # and optim.eps / 6: the official GPT-2 small run (6 micro-batches, loss not / 6)


class StudyError(Exception):
    """A request the study cannot carry out; its message says why and what to do."""


@dataclass
class Contender:
    name: str               # adamw, adamw_official, lion, sophiag, muon
    preset: str             # configs/config/<preset>.yaml
    grid: dict              # {"optim.lr": [...], "optim.rho": [...]}: the sweep's starting grid
    extra: list = field(default_factory=list)  # overrides every run of it gets (optim=lion, grad_clip=...)


@dataclass
class Proxy:
    """One proxy of the study: a preset family, the overrides that place it on a scale axis, its contenders' starting
    grids, and the budgets each contender runs at (multiples of the preset's max_steps)."""
    stem: str                       # configs/config/<stem>_<optimizer>.yaml
    grids: dict                     # {contender: {"optim.lr": [...], ...}}
    overrides: list = field(default_factory=list)   # every run of the proxy gets these first
    budgets: tuple = BUDGET_FACTORS                 # every contender
    reference_budgets: tuple = REFERENCE_EXTRA_FACTORS  # AdamW's in addition: the curve the others are read off


# The starting grids. char: the exploratory runs of the proxy's first study (2,000 steps, one seed) had AdamW best at
# 2e-3 of {1e-3, 2e-3}, Lion 3e-4, SophiaG 3e-4 with rho 0.5 (rho 0.05: 8-15% of coordinates unclipped, 0.5: 35-40%,
# 5: 99%). rho spans fully clipped (0.01) to nearly unclipped (5). Muon's grid is its preset's lr x {1/2, 1, 2}.
# bpe: an earlier 200-step sweep had AdamW best at 2e-3 of {5e-4, 1e-3, 2e-3}; SophiaG left the blocks 1.8% unclipped
# at rho 0.3 and 5-18% at rho 3, so rho spans fully clipped (0.03) to 30.
# The scale axes (char_t<tokens per step>, char_w<width>) start from the char proxy's best settings, one x2 step to
# each side, and rho at char's in-regime best: the sweep's extension brackets whatever moved. They run the four
# optimizers (the official-style AdamW control stays on char), every contender at 1x and AdamW also at 1/2x and 2x.
AXIS_GRIDS = {"adamw": {"optim.lr": [2e-3, 4e-3, 8e-3]},
              "lion": {"optim.lr": [1.5e-4, 3e-4, 6e-4]},
              "sophiag": {"optim.lr": [1.5e-4, 3e-4, 6e-4], "optim.rho": [0.5]},
              "muon": {"optim.lr": [2e-3, 4e-3, 8e-3]}}
PROXIES = {
    "char": Proxy("shakespeare_char", {"adamw": {"optim.lr": [1e-3, 2e-3, 4e-3]},
                                       "adamw_official": {"optim.lr": [1e-3, 2e-3, 4e-3]},
                                       "lion": {"optim.lr": [1e-4, 3e-4, 1e-3]},
                                       "sophiag": {"optim.lr": [3e-4, 1e-3], "optim.rho": [0.01, 0.1, 0.5, 2.0, 5.0]},
                                       "muon": {"optim.lr": [1e-3, 2e-3, 4e-3]}}),
    "bpe": Proxy("shakespeare", {"adamw": {"optim.lr": [1e-3, 2e-3, 4e-3]},
                                 "adamw_official": {"optim.lr": [1e-3, 2e-3, 4e-3]},
                                 "lion": {"optim.lr": [1e-4, 3e-4, 1e-3]},
                                 "sophiag": {"optim.lr": [3e-4, 1e-3], "optim.rho": [0.03, 0.3, 3.0, 10.0, 30.0]},
                                 "muon": {"optim.lr": [5e-4, 1e-3, 2e-3]}}),
    # tokens per step x4 and x8 (the sequences per step; one micro-batch, so the evaluation is one pass over the
    # validation split), and the model twice as wide (about 3.9x the parameters)
    "char_t3072": Proxy("shakespeare_char", AXIS_GRIDS, ["total_batch_size=48", "micro_batch_size=48"], (1, 0.5), (2,)),
    "char_t6144": Proxy("shakespeare_char", AXIS_GRIDS, ["total_batch_size=96", "micro_batch_size=96"], (1, 0.5), (2,)),
    "char_w256": Proxy("shakespeare_char", AXIS_GRIDS, ["model.n_embd=256"], (1, 0.5), (2,)),
}


@functools.lru_cache(maxsize=None)
def preset_config(preset, extra=()):
    """The composed config of a preset with overrides (a DictConfig; cached: composing takes a while)."""
    return compose_config(preset, list(extra))


@functools.lru_cache(maxsize=None)
def val_tokens(preset, extra=()):
    """Tokens in the preset's validation split, preparing the data first if it is not (once, before any two runs
    could both prepare it). None for a data.dir that has no meta.json."""
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


def eval_steps_of(preset, extra=()):
    """Validation micro-batches for EVAL_TOKENS tokens (the preset's eval_steps if it has more), but no more than one
    pass over the validation split: past it the evaluation would repeat the same text. Returns (steps, tokens)."""
    cfg = preset_config(preset, extra)
    batch, block = int(cfg.micro_batch_size), int(cfg.model.block_size)
    steps = max(int(cfg.eval_steps), math.ceil(EVAL_TOKENS / (batch * block)))
    total = val_tokens(preset, extra)
    if total is not None:
        steps = min(steps, max(1, (total // block) // batch))
    return steps, steps * batch * block


def preset_exists(name):
    return (REPO / "configs" / "config" / f"{name}.yaml").is_file()


def contenders_of(proxy):
    """The proxy's contenders that the loop has today, and a note for each one it lacks."""
    spec = PROXIES[proxy]
    stem, grids, common = spec.stem, spec.grids, list(spec.overrides)
    if not preset_exists(f"{stem}_adamw"):
        return [], [f"{proxy}: no preset {stem}_adamw (configs/config/): the whole proxy is skipped"]
    found, notes = [], []
    base = f"{stem}_adamw"
    found.append(Contender("adamw", base, grids["adamw"], common))
    if "adamw_official" in grids:
        eps = float(preset_config(base).optim.eps)
        official = [f"grad_clip={OFFICIAL_ADAMW['grad_clip']!r}", f"optim.eps={eps / 6!r}"]
        found.append(Contender("adamw_official", base, grids["adamw_official"], common + official))
    for name in ("lion", "sophiag", "muon"):
        if name not in grids:
            continue
        if preset_exists(f"{stem}_{name}"):
            found.append(Contender(name, f"{stem}_{name}", grids[name], common))
        elif (REPO / "configs" / "optim" / f"{name}.yaml").is_file():  # the loop has it: the AdamW preset with it
            found.append(Contender(name, base, grids[name], common + [f"optim={name}"]))
        else:
            notes.append(f"{proxy}: no optim={name} in this checkout (configs/optim/{name}.yaml): {name} is skipped")
    return found, notes


# -----------------------------------------------------------------------------
# runs: their overrides, directories and commands

def round_sig(x):
    """3 significant digits: a grid value prints the same in a folder name, an override and the record."""
    return float(f"{x:.3g}")


def slug(settings, steps, seed):
    """lr0.001_rho0.5_steps2000_seed1337: no '=' (Hydra's override grammar would refuse it in out_dir=)."""
    return "_".join([f"{k.split('.')[-1]}{v:g}" for k, v in sorted(settings.items())] + [f"steps{steps}", f"seed{seed}"])


@dataclass
class Job:
    proxy: str
    contender: Contender
    settings: dict          # {"optim.lr": 0.001, ...}
    steps: int
    seed: int
    out_root: Path
    eval_interval: int | None = None  # None: EVALS_PER_RUN evaluations

    @property
    def key(self):  # the run's identity in the record, and its folder under --out
        return f"{self.proxy}/{self.contender.name}/{slug(self.settings, self.steps, self.seed)}"

    @property
    def out_dir(self):
        return self.out_root / self.key

    def overrides(self):
        """Everything after `python train.py`; the preset's own values where these do not say otherwise."""
        extra = tuple(self.contender.extra)
        preset = preset_config(self.contender.preset, extra)
        lr = float(self.settings.get("optim.lr", preset.optim.lr))
        min_lr = round_sig(lr * float(preset.min_lr) / float(preset.optim.lr))
        eval_steps, _ = eval_steps_of(self.contender.preset, extra)
        return [f"config={self.contender.preset}", *self.contender.extra,
                *[f"{k}={v!r}" for k, v in sorted(self.settings.items())],
                f"max_steps={self.steps}", f"min_lr={min_lr!r}", f"eval_steps={eval_steps}",
                f"eval_interval={self.eval_interval or max(1, self.steps // EVALS_PER_RUN)}", f"ckpt_interval={self.steps}",
                f"seed={self.seed}", f"out_dir={relative(self.out_dir)}"]

    def command(self):
        return "OMP_NUM_THREADS=1 " + shlex.join(["python", "train.py", *self.overrides()])


def relative(path):
    """A path inside the repository as the commands run it (from the repository root), else absolute."""
    return os.path.relpath(path, REPO) if Path(path).is_relative_to(REPO) else str(path)


def preset_steps(contender):
    return int(preset_config(contender.preset, tuple(contender.extra)).max_steps)


# -----------------------------------------------------------------------------
# the record

def read_record(path=None):
    """{key: line} of the record (or of another file the study wrote); a later line of a key wins (a run redone on
    purpose)."""
    path = path or RECORD
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {line["key"]: line for line in lines}


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
            "eval_tokens": eval_steps_of(job.contender.preset, tuple(job.contender.extra))[1],
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
    events = compare.read_metrics(metrics) if metrics.is_file() and metrics.stat().st_size else []
    seconds = max((e["time/elapsed_s"] for e in events if e.get("time/elapsed_s") is not None), default=None)
    return record_line(job, status, events, seconds, git_commit())


def run_jobs(jobs, record, args, refill=None):
    """Run the jobs not yet in the record, --jobs at a time, appending each finished one to the record.
    refill(failed), when given, is asked for the jobs to run after each one ends: the list left to run is replaced
    by its answer (less the running ones), so that a job the new results call for can start next.
    Returns the keys of the jobs that failed (not recorded: a rerun of the study tries them again)."""
    todo, failed = [j for j in jobs if j.key not in record], set()
    for job in jobs:
        if job.key in record:
            print(f"in the record: {job.key}")
    if args.dry_run:
        for job in todo:
            print(job.command())
        print(f"({len(todo)} run(s) to do, {sum(j.steps for j in todo)} optimizer steps in all)")
        return failed
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = []  # (job, process, log path)
    while todo or running:
        while todo and len(running) < args.jobs:
            job = todo.pop(0)
            job.out_dir.parent.mkdir(parents=True, exist_ok=True)
            log_path = job.out_dir.parent / (job.out_dir.name + ".log")
            print(f"start: {job.command()}  (log: {log_path})", flush=True)
            with open(log_path, "w") as log:
                process = subprocess.Popen(["python", "train.py", *job.overrides()], cwd=REPO, env=env,
                                           stdout=log, stderr=subprocess.STDOUT)
            running.append((job, process, log_path))
        time.sleep(1)
        for entry in [r for r in running if r[1].poll() is not None]:
            running.remove(entry)
            job, process, log_path = entry
            line = finished_line(job, process.returncode, log_path)
            if line is None:
                print(f"FAILED (exit {process.returncode}): {job.key}; see {log_path}; not recorded", flush=True)
                failed.add(job.key)
                continue
            record[job.key] = line
            RECORD.parent.mkdir(parents=True, exist_ok=True)
            with open(RECORD, "a") as f:
                f.write(json.dumps(line) + "\n")
            print(f"done ({line['status']}, final val loss {line['final_val_loss']}): {job.key}", flush=True)
        if refill is not None and len(running) < args.jobs:
            running_keys = {job.key for job, _, _ in running}
            todo = [j for j in refill(failed) if j.key not in record and j.key not in running_keys]
    return failed


# -----------------------------------------------------------------------------
# the sweep and its grid extension (pure functions of the results)

def in_regime(line):
    """Whether a SophiaG run ran where its authors run it: the blocks' win rate (fraction of coordinates unclipped,
    mean over the run) within SOPHIA_REGIME. Outside it, almost every coordinate is clipped (sign momentum, i.e.
    Lion) or almost none is (a diagonal Newton step without the clip)."""
    blocks = (line.get("win_rate") or {}).get("blocks")
    return blocks is not None and SOPHIA_REGIME[0] <= blocks["mean"] <= SOPHIA_REGIME[1]


def loss_of(line):
    """A diverged or unfinished run never wins, nor does a SophiaG run outside its regime (it is still recorded and
    reported): SophiaG's best setting, its grid extension and its budgets are chosen within the regime."""
    value = None if line is None else line.get("final_val_loss")
    if value is None or (line.get("contender") == "sophiag" and not in_regime(line)):
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


def sweep_state(proxy, contender, record, out_root, seed):
    """The sweep's points so far: the starting grid plus the extensions in the record, their results, and the
    point to run next (None when the best is inside, or the cap is hit). Returns (results, next point, capped)."""
    steps = preset_steps(contender)
    points = grid_points(contender.grid)
    for _ in range(MAX_EXTENSIONS + 1):
        lines = {p: record.get(Job(proxy, contender, dict(p), steps, seed, out_root).key) for p in points}
        if any(line is None for line in lines.values()):
            return {p: loss_of(line) for p, line in lines.items()}, [p for p in points if lines[p] is None], False
        results = {p: loss_of(line) for p, line in lines.items()}
        point = extension(results)
        if point is None:
            return results, [], False
        if len(points) - len(grid_points(contender.grid)) >= MAX_EXTENSIONS:
            return results, [], True
        points.append(point)
    raise AssertionError("unreachable")


def sweep_jobs(proxy, contenders, record, args, failed):
    """The sweep's runs to do now, in the contenders' order (the official-style AdamW control last): each one's
    missing grid points, or, once its grid is done, the extension its results call for. A failed run is not
    retried until the next invocation of the study."""
    jobs = []
    for c in sorted(contenders, key=lambda c: c.name == "adamw_official"):
        _, todo, _ = sweep_state(proxy, c, record, args.out, args.seeds[0])
        jobs += [Job(proxy, c, dict(p), preset_steps(c), args.seeds[0], args.out) for p in todo]
    return [j for j in jobs if j.key not in failed]


def phase_sweep(proxy, contenders, record, args):
    """Every contender's missing points, side by side; a contender's grid extension starts as soon as its grid is
    done (before the later contenders' points), so that a study cut short has its first contenders bracketed."""
    failed = set()
    while True:
        jobs = sweep_jobs(proxy, contenders, record, args, failed)
        if not jobs:
            if failed:
                print(f"{proxy}: {len(failed)} sweep run(s) failed (see their logs); their contenders' sweeps wait")
            return
        failed |= run_jobs(jobs, record, args,
                           refill=lambda failed_now: sweep_jobs(proxy, contenders, record, args, failed | failed_now))
        if args.dry_run:
            print("(dry run: the grid's extensions depend on these results and are not shown)")
            return


def best_settings(proxy, contender, record, out_root, seed):
    """(settings, on_edge, capped) of a finished sweep, or None while it is not finished."""
    results, todo, capped = sweep_state(proxy, contender, record, out_root, seed)
    if todo or not results or all(math.isinf(v) for v in results.values()):
        return None
    return dict(best_point(results)), capped or extension(results) is not None, capped


def budget_jobs(proxy, contender, record, args):
    best = best_settings(proxy, contender, record, args.out, args.seeds[0])
    if best is None:
        print(f"{proxy}/{contender.name}: its sweep is not finished (run --phase sweep): no budget runs yet")
        return []
    if contender.name == "adamw_official" and not beats_adamw(proxy, contender, record, args):
        return []  # AdamW as the official run clipped it: budgets only if it beats plain AdamW in the sweep
    base, spec = preset_steps(contender), PROXIES[proxy]
    factors = spec.budgets + (spec.reference_budgets if contender.name == "adamw" else ())
    return [Job(proxy, contender, best[0], int(round(base * f)), seed, args.out)
            for f in factors for seed in args.seeds]


def beats_adamw(proxy, contender, record, args):
    """Whether the contender's best sweep loss is below plain AdamW's (both sweeps finished)."""
    adamw = next(c for c in contenders_of(proxy)[0] if c.name == "adamw")
    best_loss = {}
    for c in (contender, adamw):
        results, todo, _ = sweep_state(proxy, c, record, args.out, args.seeds[0])
        if todo or not results:
            return False
        best_loss[c.name] = min(results.values())
    return best_loss[contender.name] < best_loss["adamw"]


def phase_budgets(proxy, contenders, record, args):
    """Every contender's 1x seeds first, then AdamW's 2x, then the shorter budgets: a study cut short has the most
    useful runs."""
    jobs = [j for c in contenders for j in budget_jobs(proxy, c, record, args)]
    base = {c.name: preset_steps(c) for c in contenders}
    order = {1: 0, 2: 1, 0.5: 2, 0.25: 3}
    jobs.sort(key=lambda j: order.get(j.steps / base[j.contender.name], 4))
    run_jobs(jobs, record, args)


# -----------------------------------------------------------------------------
# time: seconds per step, one run at a time

def seconds_per_step(events, tokens_per_step):
    """Mean seconds per step over the log lines after the first (which holds the start-up): each line's
    throughput covers its steps only (evaluation excluded), Hessian refreshes included."""
    rates = [e["throughput/tokens_per_s"] for e in events if e.get("throughput/tokens_per_s")][1:]
    return float(np.mean([tokens_per_step / r for r in rates])) if rates else None


def phase_time(proxy, contenders, record, args):
    load, waited = os.getloadavg()[0], 0
    while load > args.max_load and waited < QUIET_WAIT_S and not args.dry_run:  # the runs just ended? let it settle
        time.sleep(15)
        load, waited = os.getloadavg()[0], waited + 15
    if load > args.max_load and not args.dry_run:
        print(f"!!! the 1-minute load average is {load:.2f} > --max-load {args.max_load}: timings would measure the "
              "other processes too. Not timing: rerun --phase time on a quiet machine (or raise --max-load, and say so)",
              file=sys.stderr)
        return False
    for c in contenders:
        best = best_settings(proxy, c, record, args.out, args.seeds[0])
        if best is None:
            print(f"{proxy}/{c.name}: its sweep is not finished: not timed")
            continue
        job = Job(proxy, c, best[0], TIME_STEPS, args.seeds[0], args.out / "time", eval_interval=TIME_STEPS)
        if args.dry_run:
            print(job.command())
            continue
        shutil.rmtree(job.out_dir, ignore_errors=True)  # a fresh run every time: a finished one would not run
        load_before = os.getloadavg()[0]
        done = subprocess.run(["python", "train.py", *job.overrides()], cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"timing run failed (exit {done.returncode}): {job.command()}\n{done.stdout[-2000:]}", file=sys.stderr)
            continue
        cfg = preset_config(c.preset, tuple(c.extra))
        events = compare.read_metrics(job.out_dir / "metrics.jsonl")
        line = {"proxy": proxy, "contender": c.name, "settings": best[0], "steps": TIME_STEPS,
                "seconds_per_step": seconds_per_step(events, int(cfg.total_batch_size) * int(cfg.model.block_size)),
                "load_before": load_before, "load_after": os.getloadavg()[0],
                "command": job.command(), "commit": git_commit(), "machine": machine(),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        TIME_RECORD.parent.mkdir(parents=True, exist_ok=True)
        with open(TIME_RECORD, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"{proxy}/{c.name}: {line['seconds_per_step']:.4f} s/step (load {load_before:.2f} -> "
              f"{line['load_after']:.2f})", flush=True)
    return True


# -----------------------------------------------------------------------------
# verify: a recorded command, rerun on its recorded commit, gives its recorded final val loss

def verify_lines(proxies, record, runs_per_contender):
    """The record lines to rerun: per contender of the chosen proxies, its cheapest finished runs (fewest steps
    first), runs_per_contender of them (0: all)."""
    chosen = []
    for proxy, (contenders, _) in proxies.items():
        for c in contenders:
            lines = sorted((ln for ln in record.values() if ln["proxy"] == proxy and ln["contender"] == c.name
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
    """The recorded command as argv, writing to out_dir instead of the recorded run's folder."""
    words = shlex.split(line["command"])
    if words[:2] != ["OMP_NUM_THREADS=1", "python"]:
        raise StudyError(f"{line['key']}: unexpected command {line['command']!r} (expected OMP_NUM_THREADS=1 python ...)")
    return [*[w for w in words[1:] if not w.startswith("out_dir=")], f"out_dir={out_dir}"]


def final_val_loss(out_dir, steps):
    """The val loss logged at the last step, or None."""
    metrics = out_dir / "metrics.jsonl"
    events = compare.read_metrics(metrics) if metrics.is_file() and metrics.stat().st_size else []
    finals = [e["val/loss"] for e in events if e.get("val/loss") is not None and e.get("step") == steps]
    return finals[-1] if finals else None


def run_side_by_side(runs, jobs):
    """runs: [(argv, cwd, log path)], `jobs` at a time, each with OMP_NUM_THREADS=1; returns when all have ended."""
    env, running, waiting = {**os.environ, "OMP_NUM_THREADS": "1"}, [], list(runs)
    while waiting or running:
        while waiting and len(running) < jobs:
            argv, cwd, log = waiting.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"rerun in {cwd}: {shlex.join(argv)}", flush=True)
            with open(log, "w") as f:
                running.append(subprocess.Popen(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT))
        time.sleep(1)
        running = [p for p in running if p.poll() is None]


def phase_verify(proxies, record, args):
    """Rerun the chosen record lines, --jobs at a time, each on its recorded commit, and compare final val losses.
    Returns 0 when every one is within --tolerance of its record, 1 otherwise."""
    root, head, todo = args.out / "verify", git_commit(), []
    for line in verify_lines(proxies, record, args.verify_runs):
        out_dir = root / "runs" / line["key"]
        try:
            folder = code_at(line["commit"], root / "code", head)
            argv = rerun_argv(line, out_dir)
        except StudyError as e:
            print(f"cannot verify {line['key']}: {e}")
            todo.append((line, None, None, out_dir))
            continue
        if not args.dry_run:
            shutil.rmtree(out_dir, ignore_errors=True)
            if not any(w.startswith("data.dir=") for w in argv):
                prepare_data(folder, preset_config(line["preset"]))
        todo.append((line, folder, argv, out_dir))
    if args.dry_run:
        for line, folder, argv, _ in todo:
            if folder is not None:
                print(f"(cd {folder} && OMP_NUM_THREADS=1 {shlex.join(argv)})")
        return 0
    if not todo:
        print(f"nothing to verify: no finished run of {', '.join(proxies)} in {RECORD}", file=sys.stderr)
        return 2
    run_side_by_side([(argv, folder, Path(f"{out_dir}.log")) for _, folder, argv, out_dir in todo if folder], args.jobs)
    pairs = []
    for line, folder, _, out_dir in todo:
        got = None if folder is None else final_val_loss(out_dir, line["steps"])
        if folder is not None and got is None:
            print(f"{line['key']}: the rerun logged no final val loss; see {out_dir}.log")
        pairs.append((line, got))
    print_machines(("record", [line for line, _ in pairs]))
    print(f"rerun's machine: {machine()}")  # a CPU of another kind rounds apart: "Checking the record" (README)
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


def phase_against(proxies, record, args):
    """Compare the record with another one the study wrote (--against: the same study on another machine or
    checkout), run by run, without rerunning anything: each shared finished run's two final val losses, the
    median and largest difference, the largest difference in SophiaG's blocks win rate, and each contender's best
    sweep setting in both. Returns 0 when every shared run is within --tolerance, 1 otherwise, 2 when none is
    shared."""
    other = read_record(args.against)
    wanted = {(proxy, c.name) for proxy, (contenders, _) in proxies.items() for c in contenders}
    pairs = sorted(((line, other[key]) for key, line in record.items()
                    if (line["proxy"], line["contender"]) in wanted and key in other
                    and line["status"] == other[key]["status"] == "finished"), key=lambda pair: pair[0]["key"])
    if not pairs:
        print(f"no finished run of {', '.join(proxies)} is in both {RECORD} and {args.against}", file=sys.stderr)
        return 2
    print_machines(("record", [line for line, _ in pairs]), ("other", [twin for _, twin in pairs]))
    status = print_differences([(line, twin["final_val_loss"]) for line, twin in pairs], "other", args.tolerance)
    gaps = sorted((abs(twin["final_val_loss"] - line["final_val_loss"]), line["key"]) for line, twin in pairs)
    print(f"{len(pairs)} run(s) in both; {sum(gap == 0 for gap, _ in gaps)} bit-equal; |difference| median "
          f"{float(np.median([gap for gap, _ in gaps])):.2e}, largest {gaps[-1][0]:.2e} ({gaps[-1][1]})")
    def blocks_mean(line):
        return ((line.get("win_rate") or {}).get("blocks") or {}).get("mean")

    wins = [(abs(blocks_mean(twin) - blocks_mean(line)), line["key"]) for line, twin in pairs
            if None not in (blocks_mean(line), blocks_mean(twin))]
    if wins:
        print(f"win rate in the blocks (mean over a run): largest difference {max(wins)[0]:.4f} ({max(wins)[1]})")
    for proxy, (contenders, _) in proxies.items():
        for c in contenders:
            best = [best_settings(proxy, c, r, args.out, args.seeds[0]) for r in (record, other)]
            if None not in best:
                print(f"{proxy}/{c.name}: best sweep setting {best[0][0]} in the record, {best[1][0]} in the other: "
                      f"{'the same' if best[0][0] == best[1][0] else 'DIFFERENT'}")
    return status


# -----------------------------------------------------------------------------
# report: from the record alone

def run_of(line):
    """A record line -> compare.Run: one contender (optim.name = the contender) at one budget and seed."""
    events = [{"step": s, "val/loss": loss} for s, loss in line["curve"]]
    if line["final_val_loss"] is None:  # diverged: its final loss is no number
        events.append({"step": line["steps"] + 1, "val/loss": float("nan")})
    config = {"optim": {"name": line["contender"]}, "max_steps": line["steps"], "seed": line["seed"]}
    return compare.run_from_events(line["key"], config, events)


def proxy_report(proxy, contenders, record, times, args):
    """(the proxy's part of docs/study_cpu.json, its markdown)."""
    P, runs, md = {"contenders": {}}, [], [f"## proxy `{proxy}`\n"]
    sweep_rows = ["| contender | settings | final val loss | win rate blocks (mean/peak/final) | "
                  "win rate all (mean) | Hessian grad norm (mean) | Hessian clip rate (mean) |", "|---|---|---|---|---|---|---|"]
    for c in contenders:
        seed, steps = args.seeds[0], preset_steps(c)
        results, todo, capped = sweep_state(proxy, c, record, args.out, seed)
        sweep = [record[Job(proxy, c, dict(p), steps, seed, args.out).key] for p in results
                 if Job(proxy, c, dict(p), steps, seed, args.out).key in record]
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
        best = best_settings(proxy, c, record, args.out, seed)
        if best is None:
            C.update(best=None, best_on_edge=None, budgets=[])
            P["contenders"][c.name] = C
            md.append(f"- {c.name}: sweep not finished ({len(todo)} run(s) to go)")
            continue
        C.update(best=best[0], best_on_edge=best[1], extensions_capped=best[2])
        if c.name == "sophiag":  # its best is chosen within its regime: say what the best outside it did
            outside = [s for s in sweep if s["final_val_loss"] is not None and not in_regime(s)]
            if outside:
                o = min(outside, key=lambda s: s["final_val_loss"])
                C["best_outside_regime"] = {"settings": o["settings"], "final_val_loss": o["final_val_loss"],
                                            "win_rate_blocks": (o["win_rate"]["blocks"] or {}).get("mean")}
                md.append(f"- sophiag: best chosen among runs whose blocks' mean win rate is in {list(SOPHIA_REGIME)} "
                          f"(its authors' regime): {best[0]}; the best outside it, "
                          f"{' '.join(f'{k}={v:g}' for k, v in o['settings'].items())} (blocks win rate "
                          f"{C['best_outside_regime']['win_rate_blocks']:.3f}), reached {o['final_val_loss']:.4f}")
        if best[2]:
            md.append(f"- {c.name}: the grid extension stopped at its cap ({MAX_EXTENSIONS}); the best point is still "
                      "on the grid's edge")
        lines = sorted((record[j.key] for j in budget_jobs(proxy, c, record, args) if j.key in record),
                       key=lambda ln: (ln["steps"], ln["seed"] != args.seeds[0]))  # shortest budget first
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
        plot_sweep(proxy, P, DOCS / f"study_cpu_{proxy}_sweep.png")
        md.append(f"![sweep](study_cpu_{proxy}_sweep.png)\n")
    names = {r.config["optim.name"] for r in runs}
    if "adamw" not in names:
        md.append("no AdamW budget runs yet: no multipliers")
        return P, "\n".join(md)
    adamw_budgets = {r.config["max_steps"] for r in runs if r.config["optim.name"] == "adamw"}
    if len(adamw_budgets) < 2:  # a curve through one point: nothing to read a multiplier off
        md.append(f"AdamW has runs at one budget only ({sorted(adamw_budgets)[0]} steps): no multipliers yet "
                  "(run --phase budgets)")
        return P, "\n".join(md)
    groups = compare.budget_groups(runs)
    baseline = next(g for g in groups if g.label == "adamw")
    seconds = {c: t["seconds_per_step"] for c, t in times.get(proxy, {}).items() if c in names and t["seconds_per_step"]}
    curve = compare.analyse_budgets(groups, baseline, seconds if "adamw" in seconds else None)
    P["adamw_curve"], P["seconds_per_step"] = curve, seconds
    for g in groups:
        C = P["contenders"][g.label]
        C["budget_stats"] = compare.clean(g.stats["budgets"])
        one_x = next((r for r in g.stats["budgets"] if r["steps"] == preset_steps(next(c for c in contenders
                                                                                       if c.name == g.label))), None)
        for key in ("data_multiplier", "time_multiplier"):
            stats = None if one_x is None else one_x[key]
            C[key] = None if not stats else compare.clean({"budget_steps": one_x["steps"], "mean": stats["mean"],
                                                           "ci95": stats["ci95"], "extrapolated": one_x["extrapolated"]})
    md += ["### budgets", "", compare.budget_table(groups, baseline, curve), ""]
    for name, C in P["contenders"].items():  # the regime of every Sophia result
        regime = [(b["steps"], [w["blocks"]["mean"] for w in b["win_rate"] if w["blocks"]]) for b in C["budgets"]]
        if any(values for _, values in regime):
            md.append(f"- {name}'s win rate in the blocks (mean over each run, then over seeds): " + ", ".join(
                f"{steps} steps {np.mean(values):.3f}" for steps, values in regime if values))
    for name, t in sorted(times.get(proxy, {}).items()):
        before, after = (f"{t[key]:.2f}" if t.get(key) is not None else "?" for key in ("load_before", "load_after"))
        md.append(f"- time: {name} {t['seconds_per_step']:.4f} s/step at {t.get('settings')}, {t.get('date')}, load average "
                  f"{before} before, {after} after")
    if "adamw" not in seconds:
        md.append("- no timing of AdamW in docs/study/time.jsonl: no time multipliers (run --phase time)")
    compare.plot_budgets(groups, baseline, DOCS / f"study_cpu_{proxy}_budgets.png", f"{proxy} proxy: final val loss")
    md += ["", f"![final loss vs budget](study_cpu_{proxy}_budgets.png)", ""]
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


def read_times():
    """{proxy: {contender: the latest timing line}}."""
    times = {}
    if TIME_RECORD.is_file():
        for text in TIME_RECORD.read_text().splitlines():
            if text.strip():
                line = json.loads(text)
                times.setdefault(line["proxy"], {})[line["contender"]] = line
    return times


def phase_report(proxies, record, args):
    times = read_times()
    DOCS.mkdir(parents=True, exist_ok=True)
    out = {"commit": sorted({ln["commit"] for ln in record.values()}), "proxies": {}}
    md = ["# The CPU study (scripts/study_cpu.py)", "",
          f"Runs in the record: {len(record)}; code commit(s): {', '.join(out['commit']) or 'none'}.", ""]
    for proxy, (contenders, notes) in proxies.items():
        P, text = proxy_report(proxy, contenders, record, times, args)
        P["notes"], P["timing"] = notes, times.get(proxy, {})
        out["proxies"][proxy] = P
        md += [*(f"- {n}" for n in notes), text, ""]
    (DOCS / "study_cpu.json").write_text(json.dumps(compare.clean(out), indent=2) + "\n")
    (DOCS / "study_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print("wrote docs/study_cpu.json, docs/study_cpu.md and the plots docs/study_cpu_<proxy>_{budgets,sweep}.png")


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", default="all", choices=["sweep", "budgets", "time", "report", "all",
                                                                 "verify"])
    parser.add_argument("--proxy", default="all", choices=[*PROXIES, "all"],
                        help="one proxy, or all (default): every proxy in PROXIES")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, each OMP_NUM_THREADS=1 (default 2)")
    parser.add_argument("--seeds", default="1337,2,3", help="comma-separated; the first is the sweep's (default 1337,2,3)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "study", help="run directories (default out/study)")
    parser.add_argument("--max-load", type=float, default=0.5, help="time: refuse above this 1-minute load average")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the runs to do, run nothing")
    parser.add_argument("--verify-runs", type=int, default=1,
                        help="verify: record lines to rerun per contender, the cheapest first (default 1; 0: all)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="verify: the largest difference from a recorded final val loss that passes (default 1e-4)")
    parser.add_argument("--against", type=Path,
                        help="verify: compare with this record (the study's runs.jsonl from another machine or "
                             "checkout) instead of rerunning")
    parser.add_argument("--contenders", help="comma-separated subset, e.g. adamw,sophiag (default: every one the loop has)")
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds}: give comma-separated integers, e.g. --seeds 1337,2,3")
    if not args.seeds or args.jobs < 1:
        parser.error("give at least one seed and --jobs 1 or more")
    if args.against and (args.phase != "verify" or not args.against.is_file()):
        parser.error(f"--against {args.against}: give a runs.jsonl the study wrote, with --phase verify")
    args.out = args.out.absolute()

    proxies = {p: contenders_of(p) for p in (PROXIES if args.proxy == "all" else [args.proxy])}
    if args.contenders:
        wanted = args.contenders.split(",")
        known = {c.name for contenders, _ in proxies.values() for c in contenders}
        if set(wanted) - known:
            parser.error(f"--contenders {args.contenders}: {sorted(set(wanted) - known)} not among {sorted(known)}")
        if "adamw" not in wanted:
            print("note: without adamw the report has no multipliers (AdamW is their baseline)")
        proxies = {p: ([c for c in contenders if c.name in wanted], notes) for p, (contenders, notes) in proxies.items()}
    for _, notes in proxies.values():
        for note in notes:
            print(f"note: {note}")
    record = read_record()
    if args.phase == "verify":
        return phase_against(proxies, record, args) if args.against else phase_verify(proxies, record, args)
    phases = ["sweep", "budgets", "time", "report"] if args.phase == "all" else [args.phase]
    for phase in phases:
        for proxy, (contenders, _) in proxies.items():
            if phase == "sweep":
                phase_sweep(proxy, contenders, record, args)
            elif phase == "budgets":
                phase_budgets(proxy, contenders, record, args)
            elif phase == "time" and not phase_time(proxy, contenders, record, args) and args.phase == "time":
                return 2
        if phase == "report" and not args.dry_run:
            phase_report(proxies, record, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
