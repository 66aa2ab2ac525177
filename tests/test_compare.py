"""scripts/compare.py and the statistics it runs (studylib.py) against closed forms: synthetic run directories
whose loss curves cross the target at steps known in closed form, several seeds (mean/std against numpy), and the
bad inputs it must survive."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

import studylib
from scripts import compare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EVAL_STEPS = np.arange(100, 1001, 100)  # evals every 100 steps up to 1000
TOKENS_PER_STEP = 1024


def make_run(path, optimizer, seed, loss_fn, seconds_per_step=0.5, lr=1e-3, rho=None, steps=EVAL_STEPS, extra=None):
    """A train.py-like run directory: config.yaml (nested, as OmegaConf writes it) and metrics.jsonl with
    training events between the eval events. loss_fn(step) -> val loss; extra: more config.yaml keys."""
    os.makedirs(path, exist_ok=True)
    optim = {"name": optimizer, "lr": lr, "betas": [0.9, 0.95]}
    if rho is not None:
        optim["rho"] = rho
    config = {"seed": seed, "run_name": f"{optimizer}_seed={seed}", "out_dir": str(path), "max_steps": int(steps[-1]),
              "optim": optim, "model": {"n_layer": 2}, "wandb": {"enabled": False, "project": "x"}}
    config.update(extra or {})
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step in steps:
            step = int(step)
            f.write(json.dumps({"step": step - 1, "tokens": (step - 1) * TOKENS_PER_STEP, "train/loss": 9.0,
                                "lr": lr, "time/elapsed_s": (step - 1) * seconds_per_step}) + "\n")
            f.write(json.dumps({"step": step, "tokens": step * TOKENS_PER_STEP, "val/loss": float(loss_fn(step)),
                                "time/elapsed_s": step * seconds_per_step}) + "\n")
    return str(path)


def load_groups(paths, best=False):
    runs = [studylib.load_run_dir(d) for d in studylib.find_run_dirs(paths)]
    groups = studylib.group_runs(runs)
    studylib.label_groups(groups)
    if best:
        groups, _ = studylib.pick_best(groups)
    return groups


# linear curves: loss = 6 - k * step / 1000, so linear interpolation is exact and the target 4.0 is crossed
# at step 2000 / k (between eval points).
ADAMW_SLOPES = [2.05, 2.1, 2.2]
SOPHIA_SLOPES = [2.2, 2.5, 3.1]


def test_steps_and_speedup_closed_form(tmp_path):
    dirs = [make_run(tmp_path / f"adamw{i}", "adamw", i, lambda s, k=k: 6 - k * s / 1000, seconds_per_step=0.5)
            for i, k in enumerate(ADAMW_SLOPES)]
    dirs += [make_run(tmp_path / f"sophia{i}", "sophiag", i, lambda s, k=k: 6 - k * s / 1000, seconds_per_step=0.6)
             for i, k in enumerate(SOPHIA_SLOPES)]
    adamw, sophia = groups = load_groups(dirs)
    assert [g.label for g in groups] == ["adamw", "sophiag"]  # seeds grouped, labels from the optimizer
    assert [len(g.runs) for g in groups] == [3, 3]
    assert studylib.length_warnings(groups) == [] and studylib.mismatch_warnings(groups, adamw) == []  # like runs
    studylib.analyse(groups, adamw, target=4.0)

    adamw_steps = 2000 / np.array(ADAMW_SLOPES)
    sophia_steps = 2000 / np.array(SOPHIA_SLOPES)
    np.testing.assert_allclose(adamw.stats["steps"]["per_seed"], adamw_steps, rtol=1e-12)
    np.testing.assert_allclose(sophia.stats["steps"]["value"], sophia_steps.mean(), rtol=1e-12)
    np.testing.assert_allclose(sophia.stats["steps"]["std"], sophia_steps.std(ddof=1), rtol=1e-9)
    ratios = adamw_steps.mean() / sophia_steps
    np.testing.assert_allclose(sophia.stats["speedup_steps"]["value"], ratios.mean(), rtol=1e-12)
    np.testing.assert_allclose(sophia.stats["speedup_steps"]["std"], ratios.std(ddof=1), rtol=1e-9)
    # wall clock: 0.5 s/step vs 0.6 s/step
    np.testing.assert_allclose(sophia.stats["time"]["value"], 0.6 * sophia_steps.mean(), rtol=1e-12)
    time_ratios = 0.5 * adamw_steps.mean() / (0.6 * sophia_steps)
    np.testing.assert_allclose(sophia.stats["speedup_time"]["value"], time_ratios.mean(), rtol=1e-12)
    np.testing.assert_allclose(sophia.stats["speedup_time"]["std"], time_ratios.std(ddof=1), rtol=1e-9)
    finals = 6 - np.array(SOPHIA_SLOPES)
    np.testing.assert_allclose(sophia.stats["final_loss"]["value"], finals.mean(), rtol=1e-12)
    np.testing.assert_allclose(sophia.stats["final_loss"]["std"], finals.std(ddof=1), rtol=1e-9)

    table = studylib.markdown_table(groups, adamw, 4.0, "--target-loss")
    row = next(line for line in table.splitlines() if line.startswith("| sophiag"))
    assert f"{ratios.mean():.2f} ± {ratios.std(ddof=1):.2f}×" in row
    assert f"{sophia_steps.mean():.0f} ± {sophia_steps.std(ddof=1):.0f}" in row


def test_default_target_is_baseline_mean_final(tmp_path):
    # hyperbolic curves a + b / step; the baseline seeds end at 3.09, 3.10, 3.11, so the default target is 3.10,
    # which the 3.11 seed never reaches: the baseline's value is where its mean curve (3.00 + 100/step) crosses
    # 3.10, at its last step 1000. Sophia seeds 3 + b/step cross 3.10 at b / 0.1 = 400, 500, 600 (eval points).
    dirs = [make_run(tmp_path / f"adamw{i}", "adamw", i, lambda s, a=a: a + 100 / s) for i, a in enumerate([2.99, 3.0, 3.01])]
    dirs += [make_run(tmp_path / f"sophia{i}", "sophiag", i, lambda s, b=b: 3.0 + b / s) for i, b in enumerate([40, 50, 60])]
    out = tmp_path / "c.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "compare.py"), *dirs, "--out",
                             str(tmp_path / "c.png"), "--json", str(out)],
                            capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    np.testing.assert_allclose(numbers["target_loss"], np.mean([3.09, 3.10, 3.11]), rtol=1e-12)
    adamw, sophia = numbers["groups"]
    assert adamw["steps_to_target"]["how"] == "mean curve" and adamw["steps_to_target"]["reached"] == 2
    np.testing.assert_allclose(adamw["steps_to_target"]["value"], 1000, rtol=1e-9)
    np.testing.assert_allclose(sophia["steps_to_target"]["per_seed"], [400, 500, 600], rtol=1e-9)
    ratios = 1000 / np.array([400, 500, 600])
    np.testing.assert_allclose(sophia["speedup_steps"]["value"], ratios.mean(), rtol=1e-9)
    np.testing.assert_allclose(sophia["speedup_steps"]["std"], ratios.std(ddof=1), rtol=1e-9)
    assert "mean curve; 2/3 seeds reached" in result.stdout
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_not_reached_gives_bounds_not_numbers(tmp_path):
    # adamw: 6 - 2s/1000 crosses 4.5 at 750; "flat" never gets below 5; "late" reaches 4.2 (never 4.0)
    dirs = [make_run(tmp_path / "adamw", "adamw", 0, lambda s: 6 - 2 * s / 1000),
            make_run(tmp_path / "flat", "lion", 0, lambda s: 5.0 + 1 / s),
            make_run(tmp_path / "sophia0", "sophiag", 0, lambda s: 6 - 4 * s / 1000),
            make_run(tmp_path / "sophia1", "sophiag", 1, lambda s: 6 - 1.8 * s / 1000)]
    groups = load_groups(dirs)
    adamw, flat, sophia = groups
    studylib.analyse(groups, adamw, target=4.5)
    assert flat.stats["steps"]["how"] == "not reached"
    assert flat.stats["speedup_steps"]["bound"] == "<"  # needs more than 1000 steps: speed-up < 750 / 1000
    np.testing.assert_allclose(flat.stats["speedup_steps"]["value"], 0.75)
    # one sophia seed at 375, the other at 833.3: both reached, ordinary mean
    np.testing.assert_allclose(sophia.stats["steps"]["value"], np.mean([375, 1500 / 1.8]))

    studylib.analyse(groups, adamw, target=3.5)  # sophia seed 1 (final 4.2) now misses it
    assert sophia.stats["steps"]["how"] == "mean curve"  # mean curve 6 - 2.9 s/1000 crosses at 2500/2.9
    np.testing.assert_allclose(sophia.stats["steps"]["value"], 2500 / 2.9, rtol=1e-9)
    # the baseline ends at 4.0 > 3.5: its value is a lower bound (> 1000 steps), so are the speed-ups
    assert adamw.stats["steps"]["how"] == "not reached"
    assert sophia.stats["speedup_steps"]["bound"] == ">"
    np.testing.assert_allclose(sophia.stats["speedup_steps"]["value"], 1000 / (2500 / 2.9), rtol=1e-9)
    assert flat.stats["speedup_steps"]["bound"] == "n/a"
    table = studylib.markdown_table(groups, adamw, 3.5, "--target-loss")
    assert "not reached (> 1000)" in table and "| n/a |" in table and "> 1.16×" in table


def test_partial_last_line_is_tolerated(tmp_path, capsys):
    run_dir = make_run(tmp_path / "killed", "adamw", 0, lambda s: 6 - 2 * s / 1000)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 1001, "tokens": 10250, "train/lo')  # killed mid-write
    run = studylib.load_run_dir(run_dir)
    np.testing.assert_array_equal(run.steps, EVAL_STEPS)
    assert "partial last line" in capsys.readouterr().err


def test_resumed_run_keeps_the_last_event_of_a_repeated_step(tmp_path):
    run_dir = make_run(tmp_path / "resumed", "adamw", 0, lambda s: 6 - 2 * s / 1000)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:  # requeued: steps 900, 1000 evaluated again
        f.writelines(json.dumps({"step": step, "tokens": step * TOKENS_PER_STEP, "val/loss": loss,
                                 "time/elapsed_s": step * 0.5}) + "\n" for step, loss in [(900, 4.5), (1000, 4.4)])
    run = studylib.load_run_dir(run_dir)
    np.testing.assert_array_equal(run.steps, EVAL_STEPS)
    np.testing.assert_allclose(run.val_loss, [6 - 2 * s / 1000 for s in EVAL_STEPS[:-2]] + [4.5, 4.4])


def test_bad_inputs_have_clear_errors(tmp_path):
    run_dir = make_run(tmp_path / "broken", "adamw", 0, lambda s: 5.0)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    with open(metrics_path) as f:
        lines = f.read().splitlines()
    lines[3] = lines[3][:10]
    with open(metrics_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(studylib.CompareError, match="line 4 is not valid JSON"):
        studylib.load_run_dir(run_dir)

    os.makedirs(tmp_path / "empty")
    with pytest.raises(studylib.CompareError, match="no metrics.jsonl"):
        studylib.find_run_dirs([str(tmp_path / "empty")])
    with pytest.raises(studylib.CompareError, match="no such directory"):
        studylib.find_run_dirs([str(tmp_path / "missing")])

    train_only = make_run(tmp_path / "train_only", "adamw", 0, lambda s: 5.0)
    with open(os.path.join(train_only, "metrics.jsonl")) as f:
        kept = [line for line in f if "val/loss" not in line]
    with open(os.path.join(train_only, "metrics.jsonl"), "w") as f:
        f.writelines(kept)
    with pytest.raises(studylib.CompareError, match="no 'val/loss'"):
        studylib.load_run_dir(train_only)

    with open(os.path.join(train_only, "metrics.jsonl"), "w"):
        pass  # truncated: nothing logged yet
    with pytest.raises(studylib.CompareError, match="is empty"):
        studylib.load_run_dir(train_only)

    # through the CLI: exit status 2 and the message, no traceback
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "compare.py"), str(tmp_path / "empty"),
                             "--out", str(tmp_path / "x.png")],
                            capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.png").exists()



def test_a_missing_run_folder_suggests_the_one_train_py_wrote(tmp_path):
    # `python train.py config=shakespeare_adamw max_steps=50` writes out/shakespeare_adamw_max_steps=50
    make_run(tmp_path / "out" / "shakespeare_adamw_max_steps=50", "adamw", 0, lambda s: 3 + 100 / s)
    make_run(tmp_path / "out" / "shakespeare_sophiag_max_steps=50", "sophiag", 0, lambda s: 3 + 50 / s)
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "compare.py"), "out/shakespeare_adamw",
                             "out/shakespeare_sophiag_max_steps=50", "--out", "c.png"],
                            capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr == ("error: out/shakespeare_adamw: no such directory; "
                             "did you mean out/shakespeare_adamw_max_steps=50?\n")

    with pytest.raises(studylib.CompareError, match=r"did you mean .*shakespeare_sophiag_max_steps=50\?$"):
        studylib.find_run_dirs([str(tmp_path / "out" / "shakespeare_sophia_max_steps=50")])  # a typo
    with pytest.raises(studylib.CompareError, match=r"no such directory$"):  # nothing alike: no guess
        studylib.find_run_dirs([str(tmp_path / "out" / "gpt2_small_lion")])
    with pytest.raises(studylib.CompareError, match=r"no such directory$"):  # its parent is missing too
        studylib.find_run_dirs([str(tmp_path / "elsewhere" / "shakespeare_adamw")])
    make_run(tmp_path / "out" / "shakespeare_adamw_max_steps=100", "adamw", 0, lambda s: 3 + 100 / s)
    with pytest.raises(studylib.CompareError, match=r"did you mean \S+max_steps=100 or \S+max_steps=50\?$"):
        studylib.find_run_dirs([str(tmp_path / "out" / "shakespeare_adamw")])


def test_the_same_seed_twice_in_a_group_is_refused(tmp_path):
    # the same run under two names (copied, or rerun with another out_dir): it must not count as two seeds
    first = make_run(tmp_path / "adamw", "adamw", 0, lambda s: 3 + 100 / s)
    again = make_run(tmp_path / "adamw_again", "adamw", 0, lambda s: 3 + 100 / s)
    other = make_run(tmp_path / "adamw_seed1", "adamw", 1, lambda s: 3 + 110 / s)
    sophia = make_run(tmp_path / "sophia", "sophiag", 0, lambda s: 3 + 50 / s)  # seed 0 too, but another group
    studylib.check_seeds(load_groups([first, other, sophia]))  # distinct seeds within each group: fine
    with pytest.raises(studylib.CompareError, match="adamw and .*adamw_again are both seed 0 of 'adamw'"):
        studylib.check_seeds(load_groups([first, other, again, sophia]))

    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "compare.py"), first, again, sophia,
                             "--out", str(tmp_path / "x.png")], capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1  # one line
    assert result.stderr.startswith(f"error: {first} and {again} are both seed 0")  # both folders, by name
    assert "pass only one of them, or rerun one with another seed=N" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_runs_of_different_max_steps_are_compared_with_a_warning(tmp_path):
    dirs = [make_run(tmp_path / f"adamw{i}", "adamw", i, lambda s: 3 + 100 / s) for i in range(2)]  # max_steps 1000
    dirs.append(make_run(tmp_path / "sophia", "sophiag", 0, lambda s: 3 + 50 / s, steps=np.arange(100, 501, 100)))
    out = tmp_path / "c.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "compare.py"), *dirs,
                             "--out", str(tmp_path / "c.png"), "--json", str(out)],
                            capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr
    message = "runs differ in max_steps (1000 vs 500): their speed-up compares different schedules"
    assert f"warning: {message}\n" in result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]  # below the header
    assert rows[0].startswith("| adamw max_steps=1000 (baseline) | 2 |")  # the baseline is not flagged
    assert rows[1].startswith("| sophiag max_steps=500 ⚠ | 1 |")
    assert f"\n5. ⚠ {message}\n" in result.stdout  # a footnote after the four usual ones
    assert json.loads(out.read_text())["warnings"] == [message]


def test_schedule_batch_and_data_differences_are_flagged_against_the_baseline(tmp_path):
    def setup(warmup=10, decay=None, min_lr=1e-4, batch=8, block=64, data="shakespeare"):
        return {"warmup_steps": warmup, "lr_decay_steps": decay, "min_lr": min_lr, "total_batch_size": batch,
                "model": {"n_layer": 2, "block_size": block}, "data": {"name": data, "dir": None}}

    dirs = [make_run(tmp_path / "adamw", "adamw", 0, lambda s: 3 + 100 / s, extra=setup()),
            make_run(tmp_path / "sophia", "sophiag", 0, lambda s: 3 + 50 / s,
                     extra=setup(warmup=20, batch=16, data="openwebtext")),
            make_run(tmp_path / "lion", "lion", 0, lambda s: 3 + 70 / s, extra=setup(decay=300, min_lr=3e-5, block=128))]
    groups = load_groups(dirs)
    adamw, sophia, lion = groups
    warnings = studylib.mismatch_warnings(groups, adamw)
    schedules, per_token = "their speed-up compares different schedules", "a step is not the same number of tokens"
    assert [(message, [g.label for g in flagged]) for message, flagged in warnings] == [
        (f"runs differ in warmup_steps (10 vs 20): {schedules}", [sophia.label]),
        (f"runs differ in lr_decay_steps (null vs 300): {schedules}", [lion.label]),
        (f"runs differ in min_lr (0.0001 vs 3e-05): {schedules}", [lion.label]),
        (f"runs differ in total_batch_size (8 vs 16): {per_token}: compare them per token, not per step", [sophia.label]),
        (f"runs differ in model.block_size (64 vs 128): {per_token}: compare them per token, not per step", [lion.label]),
        ("runs differ in data.name (shakespeare vs openwebtext): their losses are measured on different data",
         [sophia.label]),
    ]
    studylib.analyse(groups, adamw, 3.1)
    table = studylib.markdown_table(groups, adamw, 3.1, "--target-loss", warnings)
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # below the header
    assert [" ⚠ |" in row for row in rows] == [False, True, True]
    assert all(f"⚠ {message}" in table for message, _ in warnings)
    # with the sophia run as baseline, the other two differ from it: both are flagged for the batch
    batch = next(f for m, f in studylib.mismatch_warnings(groups, sophia) if "total_batch_size" in m)
    assert batch == [adamw, lion]


def test_seeds_that_end_at_different_steps_are_flagged(tmp_path):
    # one seed stopped at step 500 of its 1000 (killed, or still running): same settings, so the same group
    full = make_run(tmp_path / "adamw0", "adamw", 0, lambda s: 3 + 100 / s)
    short = make_run(tmp_path / "adamw1", "adamw", 1, lambda s: 3 + 100 / s, steps=np.arange(100, 501, 100),
                     extra={"max_steps": 1000})
    sophia = make_run(tmp_path / "sophia", "sophiag", 0, lambda s: 3 + 50 / s)
    groups = load_groups([full, short, sophia])
    assert [len(g.runs) for g in groups] == [2, 1]
    warnings = studylib.length_warnings(groups)
    assert len(warnings) == 1 and warnings[0][1] == [groups[0]]
    assert warnings[0][0].startswith(f"the seeds of adamw end at different steps ({full} at step 1000, {short} at "
                                     "step 500): its final loss averages runs of different lengths")
    studylib.analyse(groups, groups[0], 3.2)
    table = studylib.markdown_table(groups, groups[0], 3.2, "--target-loss", warnings)
    assert "| adamw (baseline) ⚠ | 2 |" in table and "| sophiag | 1 |" in table

def test_best_picks_the_lowest_final_loss_per_optimizer(tmp_path):
    sweep = tmp_path / "sweep"  # like a multirun: numbered job dirs, searched recursively
    job = 0
    finals = {}
    for optimizer, lr, rho, level in [("adamw", 1e-3, None, 3.3), ("adamw", 3e-4, None, 3.1), ("adamw", 1e-4, None, 3.4),
                                      ("sophiag", 1e-3, 0.05, 3.2), ("sophiag", 1e-3, 0.01, 3.0),
                                      ("sophiag", 3e-4, 0.05, float("nan"))]:  # a diverged setting never wins
        for seed in range(2):
            final = level + 0.01 * seed
            make_run(sweep / str(job), optimizer, seed, lambda s, f=final: f + 100 / s, lr=lr, rho=rho)
            finals.setdefault((optimizer, lr, rho), []).append(final + 0.1)
            job += 1
    groups = load_groups([str(sweep)])
    assert len(groups) == 6 and all(len(g.runs) == 2 for g in groups)
    assert [os.path.basename(g.runs[0].name) for g in groups] == ["0", "2", "4", "6", "8", "10"]
    winners, lines = studylib.pick_best(groups)
    assert [(g.settings["optim.name"], g.settings["optim.lr"], g.settings.get("optim.rho")) for g in winners] == \
        [("adamw", 3e-4, None), ("sophiag", 1e-3, 0.01)]
    assert lines[0].startswith("best adamw: optim.lr=0.0003") and "3 setting(s) tried" in lines[0]
    assert lines[1].startswith("best sophiag: optim.lr=0.001, optim.rho=0.01")

    out = tmp_path / "best.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "compare.py"), str(sweep), "--best",
                             "--baseline", "adamw", "--out", str(tmp_path / "best.png"), "--json", str(out)],
                            capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    assert [g["label"] for g in numbers["groups"]] == ["adamw lr=0.0003", "sophiag lr=0.001 rho=0.01"]
    np.testing.assert_allclose(numbers["target_loss"], np.mean(finals[("adamw", 3e-4, None)]), rtol=1e-12)
    np.testing.assert_allclose(numbers["groups"][1]["final_val_loss"]["value"],
                               np.mean(finals[("sophiag", 1e-3, 0.01)]), rtol=1e-12)
    assert "best sophiag" in result.stdout


def group_lines(ax, color):
    """(faint, bold) Line2D counts of one color in a panel: per-seed lines and the mean curve."""
    from matplotlib.colors import same_color
    lines = [line for line in ax.get_lines() if same_color(line.get_color(), color)]
    return sum(line.get_alpha() == 0.3 for line in lines), sum(line.get_linewidth() == 2 for line in lines)


def test_plot_writes_a_png(tmp_path):
    dirs = [make_run(tmp_path / f"a{i}", "adamw", i, lambda s, i=i: 3 + (100 + 10 * i) / s) for i in range(2)]
    dirs.append(make_run(tmp_path / "s", "sophiag", 0, lambda s: 3 + 50 / s, seconds_per_step=0.6))
    groups = load_groups(dirs)
    studylib.analyse(groups, groups[0], 3.1)
    out = tmp_path / "curves.png"
    fig = studylib.plot(groups, groups[0], 3.1, "--target-loss", str(out))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    # losses 4.1 -> 3.1 (ratio < 1.5): a linear axis, labelled without "log"
    steps_ax = fig.axes[0]
    assert steps_ax.get_yscale() == "linear" and steps_ax.get_ylabel() == "validation loss"
    # two adamw seeds: faint per-seed lines under the bold mean, and the title says so; sophiag: its one run
    assert fig.get_suptitle() == "validation loss; faint: single seeds, bold: mean over seeds; dashed: target = --target-loss"
    colors = [line.get_color() for line in steps_ax.get_lines() if line.get_linewidth() == 2]
    for ax in fig.axes:
        assert group_lines(ax, colors[0]) == (2, 1) and group_lines(ax, colors[1]) == (0, 1)
        assert len(ax.get_lines()) == 2 + 1 + 1 + 1  # and the dashed target
    assert [t.get_text() for t in steps_ax.get_legend().get_texts()] == \
        ["adamw (baseline), 2 seeds", "sophiag, 1 seed", "target 3.100"]

    # the curves drawn are the runs' values: per panel x in steps, tokens and minutes (600 s at most)
    adamw_losses = [3 + (100 + 10 * i) / EVAL_STEPS for i in range(2)]
    sophia_loss = 3 + 50 / EVAL_STEPS
    panels = [(EVAL_STEPS, EVAL_STEPS), (EVAL_STEPS * TOKENS_PER_STEP, EVAL_STEPS * TOKENS_PER_STEP),
              (EVAL_STEPS * 0.5 / 60, EVAL_STEPS * 0.6 / 60)]
    for ax, (adamw_x, sophia_x) in zip(fig.axes, panels):
        seed0, seed1, adamw_mean, sophia, target = (line.get_xydata() for line in ax.get_lines())
        np.testing.assert_allclose(seed0, np.column_stack([adamw_x, adamw_losses[0]]), rtol=1e-12)
        np.testing.assert_allclose(seed1, np.column_stack([adamw_x, adamw_losses[1]]), rtol=1e-12)
        np.testing.assert_allclose(adamw_mean, np.column_stack([adamw_x, (adamw_losses[0] + adamw_losses[1]) / 2]),
                                   rtol=1e-12)
        np.testing.assert_allclose(sophia, np.column_stack([sophia_x, sophia_loss]), rtol=1e-12)
        np.testing.assert_allclose(target[:, 1], 3.1)


def test_plot_of_single_seeds_on_a_log_axis(tmp_path):
    # losses 13 -> 4: the log axis keeps the end visible, and its label says it is log scale
    dirs = [make_run(tmp_path / "adamw", "adamw", 0, lambda s: 3 + 1000 / s),
            make_run(tmp_path / "sophia", "sophiag", 0, lambda s: 3 + 500 / s)]
    groups = load_groups(dirs)
    studylib.analyse(groups, groups[0], 4.0)
    fig = studylib.plot(groups, groups[0], 4.0, "--target-loss", str(tmp_path / "curves.png"))
    assert all(ax.get_yscale() == "log" for ax in fig.axes)  # shared y: every panel
    assert fig.axes[0].get_ylabel() == "validation loss (log scale)"
    # no group has several seeds: no faint lines are drawn, and the title does not mention them
    assert fig.get_suptitle() == "validation loss; one run each; dashed: target = --target-loss"
    for ax in fig.axes:
        assert [line.get_linewidth() for line in ax.get_lines()] == [2, 2, 1]


class FakeWandbRun:
    """Shaped like wandb.apis.public.Run: .name, .config (nested, plus W&B's own _wandb key), and
    .scan_history(keys) returning only the rows that hold every requested key, as W&B does."""

    def __init__(self, name, config, rows):
        self.name, self.config, self.rows = name, config, rows
        self.asked = []

    def scan_history(self, keys=None, page_size=1000, min_step=0, max_step=None):
        self.asked.append(keys)
        if keys is None:
            return iter([dict(row) for row in self.rows])
        return iter([{k: row[k] for k in keys} for row in self.rows if all(k in row for k in keys)])

    def history(self, samples=500, keys=None, x_axis="_step", pandas=True, stream="default"):
        return list(self.scan_history(keys))


def test_wandb_converter_matches_the_run_directory(tmp_path):
    run_dir = make_run(tmp_path / "r", "sophiag", 3, lambda s: 3 + 50 / s, rho=0.05)
    from_dir = studylib.load_run_dir(run_dir)
    with open(os.path.join(run_dir, "config.yaml")) as f:
        config = yaml.safe_load(f)
    # as train.py logs to W&B: every key but "step", which becomes W&B's _step
    rows = [{**{k: v for k, v in event.items() if k != "step"}, "_step": event["step"], "_runtime": 99.0}
            for event in studylib.read_metrics(os.path.join(run_dir, "metrics.jsonl"))]
    fake = FakeWandbRun("bright-sun-7", {**config, "_wandb": {"x": 1}}, rows)
    from_wandb = studylib.run_from_wandb(fake)
    assert fake.asked == [studylib.WANDB_EVAL_KEYS]  # eval rows in one filtered scan, no full-history fallback
    assert from_wandb.name == "bright-sun-7" and "_wandb" not in from_wandb.config
    assert from_wandb.config == from_dir.config
    for column in ("steps", "tokens", "elapsed_s", "val_loss"):
        np.testing.assert_array_equal(getattr(from_wandb, column), getattr(from_dir, column))
    assert studylib.settings_of(from_wandb) == studylib.settings_of(from_dir)

    # eval rows without our step/time keys: fall back to W&B's _step and _runtime; dotted (flat) config keys
    rows = [{"_step": 10 * i, "_runtime": 2.0 * i, "val/loss": 5.0 - i} for i in range(1, 4)] + [{"_step": 5, "train/loss": 1}]
    run = studylib.run_from_wandb(FakeWandbRun("flat", {"optim.name": "adamw", "seed": 1}, rows))
    np.testing.assert_array_equal(run.steps, [10, 20, 30])
    np.testing.assert_array_equal(run.elapsed_s, [2, 4, 6])
    assert np.isnan(run.tokens).all() and run.config == {"optim.name": "adamw", "seed": 1}


def test_wandb_reader_asks_for_the_group_and_explains_network_errors(monkeypatch):
    import wandb

    rows = [{"_step": s, "tokens": s, "val/loss": 4 - s / 100, "time/elapsed_s": s} for s in (100, 200)]
    asked = {}

    class FakeApi:
        def __init__(self, *args, **kwargs):
            pass

        def runs(self, path, filters=None, **kwargs):
            asked.update(path=path, filters=filters)
            return [FakeWandbRun(f"run{seed}", {"optim": {"name": "adamw"}, "seed": seed}, rows) for seed in range(2)]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    runs = studylib.load_wandb_runs("me/sophia", "exp1")
    assert asked == {"path": "me/sophia", "filters": {"group": "exp1"}}
    assert len(studylib.group_runs(runs)) == 1  # two seeds of one setting

    class OfflineApi:
        def __init__(self, *args, **kwargs):
            raise ConnectionError("Max retries exceeded with url: /graphql")

    monkeypatch.setattr(wandb, "Api", OfflineApi)
    with pytest.raises(studylib.CompareError, match=r"(?s)could not read W&B runs of me/sophia.*wandb login"):
        studylib.load_wandb_runs("me/sophia", "exp1")


# --budgets: AdamW's final loss follows L(S) = 4 - 0.5 ln(S / 1000) exactly (seed offsets sum to zero), so its
# interpolation and its fit in log(steps) are exact, and an optimizer whose final loss at S is L(m S) + offset
# has a data multiplier of exactly m exp(-offset / 0.5) per seed, inside the curve's range or beyond it (the fit).
BUDGETS = [500, 1000, 2000]
OFFSETS = [-0.01, 0.0, 0.01]


def adamw_law(steps):
    return 4 - 0.5 * np.log(steps / 1000)


def make_budget_runs(tmp_path, optimizer, multiplier, seconds_per_step, lr=1e-3):
    dirs = []
    for budget in BUDGETS:
        for seed, offset in enumerate(OFFSETS):
            final = adamw_law(multiplier * budget) + offset
            # a straight line down to its final loss: the step it reaches a target at is closed form too
            dirs.append(make_run(tmp_path / f"{optimizer}_{budget}_{seed}", optimizer, seed,
                                 lambda s, f=final, b=budget: f + 2 * (1 - s / b), lr=lr,
                                 seconds_per_step=seconds_per_step, steps=np.arange(budget // 10, budget + 1, budget // 10)))
    return dirs


def test_budgets_data_multiplier_closed_form(tmp_path):
    dirs = make_budget_runs(tmp_path, "adamw", 1.0, 0.5) + make_budget_runs(tmp_path, "sophiag", 1.5, 0.6)
    (tmp_path / "s.json").write_text(json.dumps({"adamw": 0.5, "sophiag": 0.6}))
    out = tmp_path / "b.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "compare.py"), *dirs, "--budgets",
                             "--baseline", "adamw", "--seconds-per-step", str(tmp_path / "s.json"),
                             "--out", str(tmp_path / "b.png"), "--json", str(out)],
                            capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    np.testing.assert_allclose(numbers["baseline_curve"]["fit"]["a"], 4 + 0.5 * np.log(1000), rtol=1e-9)
    np.testing.assert_allclose(numbers["baseline_curve"]["fit"]["b"], -0.5, rtol=1e-9)
    adamw, sophia = numbers["groups"]
    assert [g["label"] for g in numbers["groups"]] == ["adamw", "sophiag"]
    per_seed = 1.5 * np.exp(-np.array(OFFSETS) / 0.5)
    t_975_2 = 4.302653  # Student t, 2 degrees of freedom
    for row, budget in zip(sophia["budgets"], BUDGETS):
        assert row["steps"] == budget and row["seeds"] == [0, 1, 2]
        np.testing.assert_allclose(row["final_val_loss"], adamw_law(1.5 * budget) + np.array(OFFSETS), rtol=1e-12)
        np.testing.assert_allclose(row["data_multiplier"]["per_seed"], per_seed, rtol=1e-9)
        half = t_975_2 * per_seed.std(ddof=1) / np.sqrt(3)
        np.testing.assert_allclose(row["data_multiplier"]["mean"], per_seed.mean(), rtol=1e-9)
        np.testing.assert_allclose(row["data_multiplier"]["ci95"], [per_seed.mean() - half, per_seed.mean() + half],
                                   rtol=1e-4)
        np.testing.assert_allclose(row["time_multiplier"]["per_seed"], per_seed * 0.5 / 0.6, rtol=1e-9)
        # beyond AdamW's largest budget (1.5 x 2000 > 2000 for two seeds) only through the fit
        assert row["extrapolated"] == (budget == 2000)
        # the paper's measure: sophia's line f + 2 (1 - s/S) reaches AdamW's final mean L(S) at S (1 - (L(S) - f) / 2)
        reach = budget * (1 - (adamw_law(budget) - row["final_val_loss"]) / 2)
        np.testing.assert_allclose(row["steps_to_target_speedup"]["per_seed"], budget / reach, rtol=1e-9)
    for row in adamw["budgets"]:  # the baseline against itself: its seeds' offsets only
        np.testing.assert_allclose(row["data_multiplier"]["per_seed"], np.exp(-np.array(OFFSETS) / 0.5), rtol=1e-9)
    assert "| sophiag | 2000 | 3 |" in result.stdout and "† outside the baseline's range" in result.stdout
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_steps_for_loss_interpolates_in_log_steps():
    steps, losses = np.array([100.0, 1000.0]), np.array([5.0, 4.0])
    assert studylib.steps_for_loss(4.5, steps, losses, (7.0, -1 / np.log(10))) == (pytest.approx(100 * 10 ** 0.5), False)
    # a curve that rises (no decreasing fit) cannot be extrapolated: no number rather than a wrong one
    assert studylib.steps_for_loss(3.0, steps, np.array([4.0, 5.0]), (0.0, 1.0)) == (None, True)
    mean, ci = studylib.mean_ci95([1.0, 2.0, 3.0, float("nan")])  # a diverged seed is left out
    assert mean == 2.0 and ci == pytest.approx([2 - 4.303 / np.sqrt(3), 2 + 4.303 / np.sqrt(3)])


def add_metric(run_dir, metric, value_fn, steps=EVAL_STEPS):
    """Append eval events logging `metric` = value_fn(step) (as train.py logs eval/hellaswag_* beside val/loss)."""
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        for step in steps:
            f.write(json.dumps({"step": int(step), "tokens": int(step) * TOKENS_PER_STEP, "val/loss": 4.0,
                                metric: value_fn(int(step)), "time/elapsed_s": int(step) * 0.5}) + "\n")


def test_metric_plots_and_tabulates_any_logged_key(tmp_path, capsys):
    """--metric NAME --x steps|tokens|time: each run's first, last, min and max of the key (and where they are), the
    points in the JSON equal to what was logged; a key nobody logged, or --metric with --budgets, is refused."""
    metric = "eval/hellaswag_acc_norm"
    adamw = make_run(tmp_path / "adamw", "adamw", 0, lambda s: 5.0)
    sophia = make_run(tmp_path / "sophia", "sophiag", 0, lambda s: 5.0)
    add_metric(adamw, metric, lambda s: 0.25 + s / 10_000)                    # rises: min at 100, max at 1000
    add_metric(sophia, metric, lambda s: 0.3 + 0.1 * np.sin(s / 150))      # peaks inside the run
    # the time axis in minutes: the runs last 500 s (compare.time_unit)
    for x, scale, shown in (("steps", 1, 1), ("tokens", TOKENS_PER_STEP, 1), ("time", 0.5, 1 / 60)):
        out, numbers = tmp_path / f"{x}.png", tmp_path / f"{x}.json"
        assert compare.main([adamw, sophia, "--metric", metric, "--x", x, "--out", str(out),
                             "--json", str(numbers)]) == 0
        table = capsys.readouterr().out
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        runs = json.loads(numbers.read_text())["runs"]
        assert [r["label"] for r in runs] == ["adamw", "sophiag"]
        for r, fn in zip(runs, (lambda s: 0.25 + s / 10_000, lambda s: 0.3 + 0.1 * np.sin(s / 150))):
            np.testing.assert_allclose(r["x"], EVAL_STEPS * scale)
            np.testing.assert_allclose(r["values"], [fn(s) for s in EVAL_STEPS])
        assert f"| adamw | 10 | 0.26 | 0.35 | 0.26 ({100 * scale * shown:g}) | 0.35 ({1000 * scale * shown:g}) |" in table
        peak = EVAL_STEPS[np.argmax(np.sin(EVAL_STEPS / 150))]  # 200: sin(4/3) is the largest of the eval points
        assert f"{0.3 + 0.1 * np.sin(peak / 150):.4g} ({peak * scale * shown:g}) |" in table.splitlines()[3]

    assert compare.main([adamw, "--metric", "eval/hellaswag_acc_nrom", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no run logged 'eval/hellaswag_acc_nrom' (did you mean eval/hellaswag_acc_norm?)" in err
    assert compare.main([adamw, "--metric", metric, "--budgets", "--out", str(tmp_path / "x.png")]) == 2
    assert "--metric reads run directories" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
