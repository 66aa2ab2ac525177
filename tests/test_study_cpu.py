"""scripts/study_cpu.py: its commands compose the configs they claim (checked by composing them as train.py
does), the grid extension on synthetic loss surfaces whose minimum is known, and the record: a run in it is not
run again, and the report works from it alone."""

import json
import math
import os
import shlex
import subprocess

import numpy as np
import pytest
import torch

from scripts import study_cpu
from tests.conftest import compose_config, cpu_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def record_in(tmp_path, monkeypatch):
    """The record and docs/ in a temporary folder."""
    monkeypatch.setattr(study_cpu, "DOCS", tmp_path / "docs")
    monkeypatch.setattr(study_cpu, "RECORD", tmp_path / "docs" / "study" / "runs.jsonl")
    monkeypatch.setattr(study_cpu, "TIME_RECORD", tmp_path / "docs" / "study" / "time.jsonl")
    return tmp_path


# validation tokens per proxy as their meta.json says (the preparation is data/*/prepare.py's business, tested there)
VAL_TOKENS = {"shakespeare": 84_511, "shakespeare_char": 253_771}


@pytest.mark.parametrize("proxy", ["bpe", "char"])
def test_dry_run_commands_compose_the_configs_they_name(proxy, record_in, monkeypatch, capsys):
    if not study_cpu.preset_exists(f"{study_cpu.PROXIES[proxy].stem}_adamw"):
        pytest.skip(f"no {proxy} presets in this checkout")
    monkeypatch.setattr(study_cpu, "val_tokens",
                        lambda preset, extra=(): VAL_TOKENS[str(study_cpu.preset_config(preset, extra).data.name)])
    contenders, _ = study_cpu.contenders_of(proxy)
    assert study_cpu.main(["--dry-run", "--phase", "sweep", "--proxy", proxy, "--out", f"{REPO}/out/test_study"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("OMP_NUM_THREADS=1 python train.py ")]
    expected = sum(len(study_cpu.grid_points(c.grid)) for c in contenders)
    assert len(commands) == expected and len(set(commands)) == expected
    seen = set()
    for command in commands:
        overrides = shlex.split(command)[3:]  # after OMP_NUM_THREADS=1 python train.py
        preset = overrides[0].removeprefix("config=")
        cfg = compose_config(preset, overrides[1:])  # raises on an unknown key or a bad value
        base = compose_config(preset, [o for o in overrides[1:] if o.startswith("optim=")])
        # the schedule keeps the preset's shape: its steps and warmup, min_lr the preset's fraction of lr
        assert cfg["max_steps"] == base["max_steps"] and cfg["warmup_steps"] == base["warmup_steps"]
        assert math.isclose(cfg["min_lr"] / cfg["optim"]["lr"], base["min_lr"] / base["optim"]["lr"], rel_tol=1e-2)
        # the evaluation: EVAL_TOKENS validation tokens, or one pass over the validation split when it holds fewer
        batch_tokens = cfg["micro_batch_size"] * cfg["model"]["block_size"]
        eval_tokens = cfg["eval_steps"] * batch_tokens
        val = VAL_TOKENS[cfg["data"]["name"]]
        assert min(study_cpu.EVAL_TOKENS, val - 2 * batch_tokens) <= eval_tokens <= max(study_cpu.EVAL_TOKENS + batch_tokens,
                                                                                        base["eval_steps"] * batch_tokens)
        assert eval_tokens <= val
        assert cfg["max_steps"] % cfg["eval_interval"] == 0 and cfg["seed"] == 1337
        assert cfg["out_dir"].startswith(f"out/test_study/{proxy}/")  # relative to the repo, where train.py runs
        if "grad_clip=0.16666666666666666" in overrides:  # the official-style AdamW
            assert cfg["optim"]["name"] == "adamw"
            assert math.isclose(cfg["optim"]["eps"], base["optim"]["eps"] / 6, rel_tol=1e-12)
        seen.add((cfg["optim"]["name"], cfg["optim"]["lr"], cfg["optim"].get("rho"), cfg["grad_clip"]))
    assert len(seen) == expected  # every command a different setting
    names = {name for name, *_ in seen}
    assert {"adamw", "lion", "sophiag"} <= names


# -----------------------------------------------------------------------------
# the grid extension: pure functions of the results

def bowl(center):
    """A loss with its minimum at `center` ({key: value}), quadratic in log(value) along each axis."""
    return lambda point: sum(math.log(dict(point)[k] / c) ** 2 for k, c in center.items())


def test_extension_steps_beyond_the_edge_the_best_point_is_on():
    lr_grid = {"optim.lr": [1e-3, 2e-3, 4e-3]}
    points = study_cpu.grid_points(lr_grid)
    # best at the top edge: the next point is x2 (the grid's own spacing) beyond it
    assert study_cpu.extension({p: bowl({"optim.lr": 1e-2})(p) for p in points}) == (("optim.lr", 8e-3),)
    assert study_cpu.extension({p: bowl({"optim.lr": 1e-4})(p) for p in points}) == (("optim.lr", 5e-4),)
    assert study_cpu.extension({p: bowl({"optim.lr": 2.1e-3})(p) for p in points}) is None  # inside
    # a diverged point (inf) never counts as the best; a lone point steps by x3
    assert study_cpu.extension({(("optim.lr", 1e-3),): math.inf, (("optim.lr", 2e-3),): 1.0}) == (("optim.lr", 4e-3),)
    assert study_cpu.extension({(("optim.lr", 1e-3),): 1.0}) == (("optim.lr", 3.33e-4),)


def fake_record(contender, loss, steps, seed, out_root, points):
    record = {}
    for point in points:
        job = study_cpu.Job("bpe", contender, dict(point), steps, seed, out_root)
        record[job.key] = {"key": job.key, "final_val_loss": loss(point), "settings": dict(point)}
    return record


# lr 1.5e-3 takes one extension (3.33e-3), rho 8 two (12.5, 31.2): exactly the cap of 3, and inside
@pytest.mark.parametrize("center,capped", [({"optim.lr": 1.5e-3, "optim.rho": 8.0}, False),
                                           ({"optim.lr": 1e-5, "optim.rho": 0.5}, True)])
def test_sweep_extends_until_the_best_point_is_inside(tmp_path, monkeypatch, center, capped):
    monkeypatch.setattr(study_cpu, "preset_steps", lambda contender: 100)
    grid = {"optim.lr": [3e-4, 1e-3], "optim.rho": [0.01, 0.1, 0.5, 2.0, 5.0]}
    contender = study_cpu.Contender("sophiag", "shakespeare_sophiag", grid)
    loss, record, rounds = bowl(center), {}, 0
    while True:  # what phase_sweep does, with the loss surface in place of train.py
        results, todo, was_capped = study_cpu.sweep_state("bpe", contender, record, tmp_path, 1337)
        if not todo:
            break
        record.update(fake_record(contender, loss, 100, 1337, tmp_path, todo))
        rounds += 1
    assert rounds >= 2 and was_capped == capped
    best, on_edge, cap_hit = study_cpu.best_settings("bpe", contender, record, tmp_path, 1337)
    assert cap_hit == capped and on_edge == capped
    assert len(results) - 10 <= study_cpu.MAX_EXTENSIONS
    if not capped:
        # the best of all points run is inside along both axes: a value tried on either side of it
        for axis in best:
            values = [dict(p)[axis] for p in results]
            assert min(values) < best[axis] < max(values)
        # and it is the point nearest the minimum among those tried
        assert loss(tuple(sorted(best.items()))) == min(loss(p) for p in results)
    else:  # lr 1e-5 is beyond reach of 3 extensions of x3.33 from 3e-4 (2.7e-6 < 1e-5 needs ~3.5)
        assert best["optim.lr"] == min(dict(p)["optim.lr"] for p in results)


# -----------------------------------------------------------------------------
# the record

# a synthetic study: AdamW's final loss linear in log(steps), Lion reaching AdamW's loss in 1/1.5 of its steps
SEED_OFFSETS = {1337: -0.01, 2: 0.0, 3: 0.01}


def synthetic_final_loss(contender, lr, steps, seed):
    multiplier = 1.5 if contender == "lion" else 1.0
    tuned = {"adamw": 2e-3, "lion": 3e-4}[contender]  # the sweeps' minima, inside the grids
    return 4 - 0.5 * np.log(multiplier * steps / 100) + SEED_OFFSETS[seed] + abs(math.log(lr / tuned))


def fake_train(job):
    """What train.py would leave: metrics.jsonl with eval and Sophia-less train lines, as a record line."""
    final = synthetic_final_loss(job.contender.name, job.settings["optim.lr"], job.steps, job.seed)
    events = [{"step": s, "val/loss": final + 1 - s / job.steps} for s in range(0, job.steps + 1, job.steps // 4)]
    events += [{"step": s, "train/loss": 5.0, "time/elapsed_s": s * 0.1, "throughput/tokens_per_s": 1e4}
               for s in range(10, job.steps + 1, 10)]
    if job.contender.name == "lion":  # as a Sophia run logs them: the blocks' win rate 0.2 then 0.4
        for e in events[-2:]:
            e["optim/win_rate/blocks"] = 0.2 if e is events[-2] else 0.4
    return study_cpu.record_line(job, "finished", events, job.steps * 0.1, "abc")


@pytest.fixture
def synthetic_study(record_in, monkeypatch):
    """AdamW and Lion at 100 steps a preset, trained by fake_train; returns the keys of the runs launched."""
    monkeypatch.setattr(study_cpu, "preset_steps", lambda contender: 100)
    monkeypatch.setattr(study_cpu, "eval_steps_of", lambda preset, extra=(): (4, 4096))
    adamw = study_cpu.Contender("adamw", "shakespeare_adamw", {"optim.lr": [1e-3, 2e-3, 4e-3]})
    lion = study_cpu.Contender("lion", "shakespeare_adamw", {"optim.lr": [1e-4, 3e-4, 1e-3]}, ["optim=lion"])
    monkeypatch.setattr(study_cpu, "contenders_of", lambda proxy: ([adamw, lion], []))
    launched = []

    def fake_run_jobs(jobs, record, args, refill=None):  # one round at a time: the sweep asks again
        for job in jobs:
            if job.key not in record:
                launched.append(job.key)
                record[job.key] = fake_train(job)
                study_cpu.RECORD.parent.mkdir(parents=True, exist_ok=True)
                with open(study_cpu.RECORD, "a") as f:
                    f.write(json.dumps(record[job.key]) + "\n")
        return set()  # none failed

    monkeypatch.setattr(study_cpu, "run_jobs", fake_run_jobs)
    return launched


def test_record_round_trip_and_report_from_the_record_alone(record_in, synthetic_study):
    """Synthetic finished runs written through record_line, a second pass that runs nothing, and the report's
    multipliers from the record alone, checked against compare.py's closed form (AdamW's final loss linear in
    log(steps), the other contender reaching AdamW's loss of 1.5x its steps)."""
    launched = synthetic_study
    args = ["--proxy", "bpe", "--out", str(record_in / "out")]
    assert study_cpu.main(["--phase", "sweep", *args]) == 0
    assert study_cpu.main(["--phase", "budgets", *args]) == 0
    # 3 + 3 sweep runs, then 3 budgets x 3 seeds (AdamW, the reference: 4 budgets) less the sweep's best run
    # (seed 1337 at 1x)
    assert len(launched) == 6 + (12 - 1) + (9 - 1) and len(set(launched)) == len(launched)
    lines = [json.loads(line) for line in study_cpu.RECORD.read_text().splitlines()]
    assert len(lines) == len(launched)
    # each line notes its machine: torch's kernel level and version, and bf16 as the kernel's CPU flags say
    bf16 = "bf16" if {"avx512_bf16", "amx_bf16"} & cpu_flags() else "no bf16"
    assert {line["machine"] for line in lines} == {study_cpu.machine()}
    assert lines[0]["machine"].endswith(f", {torch.backends.cpu.get_cpu_capability()}, {bf16}, torch {torch.__version__}")

    launched.clear()  # a second pass: everything is in the record, nothing runs
    assert study_cpu.main(["--phase", "sweep", *args]) == 0 and study_cpu.main(["--phase", "budgets", *args]) == 0
    assert launched == []

    # the report from the record alone (no out/ was ever written)
    assert not (record_in / "out").exists()
    study_cpu.TIME_RECORD.write_text(json.dumps({"proxy": "bpe", "contender": "adamw", "seconds_per_step": 0.1}) + "\n"
                                     + json.dumps({"proxy": "bpe", "contender": "lion", "seconds_per_step": 0.08}) + "\n")
    assert study_cpu.main(["--phase", "report", *args]) == 0
    report = json.loads((record_in / "docs" / "study_cpu.json").read_text())
    C = report["proxies"]["bpe"]["contenders"]
    assert C["adamw"]["best"] == {"optim.lr": 2e-3} and C["lion"]["best"] == {"optim.lr": 3e-4}
    assert not C["adamw"]["best_on_edge"] and len(C["adamw"]["sweep"]) == 3
    assert sorted(b["steps"] for b in C["lion"]["budgets"]) == [25, 50, 100]
    assert sorted(b["steps"] for b in C["adamw"]["budgets"]) == [25, 50, 100, 200]
    assert all(b["seeds"] == [1337, 2, 3] for b in C["lion"]["budgets"])
    per_seed = 1.5 * np.exp(-np.array(list(SEED_OFFSETS.values())) / 0.5)
    np.testing.assert_allclose(C["lion"]["data_multiplier"]["mean"], per_seed.mean(), rtol=1e-9)
    assert C["lion"]["data_multiplier"]["budget_steps"] == 100
    np.testing.assert_allclose(C["lion"]["time_multiplier"]["mean"], per_seed.mean() * 0.1 / 0.08, rtol=1e-9)
    command = C["lion"]["budgets"][0]["commands"][0]
    assert command.startswith("OMP_NUM_THREADS=1 python train.py config=shakespeare_adamw optim=lion optim.lr=0.0003 "
                              "max_steps=25 ")
    assert (record_in / "docs" / "study_cpu_bpe_budgets.png").is_file()
    assert (record_in / "docs" / "study_cpu_bpe_sweep.png").is_file()
    markdown = (record_in / "docs" / "study_cpu.md").read_text()
    assert "| lion | 100 | 3 |" in markdown
    assert ("lion's win rate in the blocks (mean over each run, then over seeds): "
            "25 steps 0.300, 50 steps 0.300, 100 steps 0.300") in markdown
    assert C["lion"]["budgets"][0]["win_rate"][0]["blocks"] == {"mean": pytest.approx(0.3), "peak": 0.4, "final": 0.4}


def test_report_of_a_sweep_alone_has_the_sweep_and_no_multipliers(record_in, synthetic_study):
    """A study stopped after its sweep (one budget, one seed each): the report holds the sweep, its best points
    and plot, and says why it has no multipliers, rather than fitting AdamW's curve to one point."""
    args = ["--proxy", "bpe", "--out", str(record_in / "out")]
    assert study_cpu.main(["--phase", "sweep", *args]) == 0 and len(synthetic_study) == 6
    assert study_cpu.main(["--phase", "report", *args]) == 0
    C = json.loads((record_in / "docs" / "study_cpu.json").read_text())["proxies"]["bpe"]["contenders"]
    assert C["adamw"]["best"] == {"optim.lr": 2e-3} and C["lion"]["best"] == {"optim.lr": 3e-4}
    for name, lr in (("adamw", 2e-3), ("lion", 3e-4)):
        best = next(s for s in C[name]["sweep"] if s["settings"] == {"optim.lr": lr})
        assert best["final_val_loss"] == pytest.approx(synthetic_final_loss(name, lr, 100, 1337))
        assert "data_multiplier" not in C[name]
    markdown = (record_in / "docs" / "study_cpu.md").read_text()
    assert "AdamW has runs at one budget only" in markdown
    assert (record_in / "docs" / "study_cpu_bpe_sweep.png").is_file()
    assert not (record_in / "docs" / "study_cpu_bpe_budgets.png").exists()


def test_sweep_extends_a_grid_as_soon_as_it_is_done(record_in, monkeypatch):
    """Through run_jobs itself (train.py replaced by a process that ends at once): AdamW's best on the low edge of
    its grid gets its extension before Lion's grid starts, so a study cut short has AdamW bracketed."""
    monkeypatch.setattr(study_cpu, "preset_steps", lambda contender: 100)
    monkeypatch.setattr(study_cpu, "eval_steps_of", lambda preset, extra=(): (4, 4096))
    adamw = study_cpu.Contender("adamw", "shakespeare_adamw", {"optim.lr": [4e-3, 8e-3]})  # tuned: 2e-3
    lion = study_cpu.Contender("lion", "shakespeare_adamw", {"optim.lr": [1e-4, 3e-4, 1e-3]}, ["optim=lion"])
    monkeypatch.setattr(study_cpu, "contenders_of", lambda proxy: ([adamw, lion], []))

    class Ended:  # a train.py that has exited 0
        returncode = 0

        def __init__(self, *args, **kwargs):
            pass

        def poll(self):
            return 0

    finished = []

    def fake_finished_line(job, returncode, log_path):
        finished.append(job.key.split("/", 1)[1])
        return fake_train(job)

    monkeypatch.setattr(study_cpu.subprocess, "Popen", Ended)
    monkeypatch.setattr(study_cpu, "finished_line", fake_finished_line)
    monkeypatch.setattr(study_cpu.time, "sleep", lambda seconds: None)
    assert study_cpu.main(["--phase", "sweep", "--proxy", "bpe", "--jobs", "1", "--out", str(record_in / "out")]) == 0
    assert finished == ["adamw/lr0.004_steps100_seed1337", "adamw/lr0.008_steps100_seed1337",
                        "adamw/lr0.002_steps100_seed1337", "adamw/lr0.001_steps100_seed1337",  # bracketed: 2e-3
                        "lion/lr0.0001_steps100_seed1337", "lion/lr0.0003_steps100_seed1337",
                        "lion/lr0.001_steps100_seed1337"]


def test_time_phase_refuses_a_busy_machine(record_in, monkeypatch, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    monkeypatch.setattr(study_cpu, "QUIET_WAIT_S", 0)
    monkeypatch.setattr(study_cpu, "contenders_of", lambda proxy: ([], []))
    assert study_cpu.main(["--phase", "time", "--proxy", "bpe", "--max-load", "0.5"]) == 2
    assert "load average is 3.00 > --max-load 0.5" in capsys.readouterr().err
    assert not study_cpu.TIME_RECORD.exists()


@pytest.mark.skipif(os.environ.get("STUDY_E2E") != "1", reason="8 train.py processes (minutes on a busy machine): "
                    "STUDY_E2E=1 runs it")
def test_end_to_end_on_tiny_models(record_in, monkeypatch, token_data):
    """Real train.py runs: 2 optimizers x 2 budgets x 2 seeds of a 1-layer model for a few steps, two at a time;
    the record holds what their metrics.jsonl hold, and a second pass starts nothing."""
    tiny = ["device=cpu", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "total_batch_size=4",
            "micro_batch_size=2", "log_interval=2", "warmup_steps=1", "cpu_peak_flops=1e11", f"data.dir={token_data}"]
    adamw = study_cpu.Contender("adamw", "shakespeare_adamw", {"optim.lr": [1e-3]}, tiny)
    sophiag = study_cpu.Contender("sophiag", "shakespeare_sophiag", {"optim.lr": [1e-3], "optim.rho": [0.05]},
                                  [*tiny, "optim.hess_interval=2"])
    monkeypatch.setattr(study_cpu, "contenders_of", lambda proxy: ([adamw, sophiag], []))
    monkeypatch.setattr(study_cpu, "preset_steps", lambda contender: 8)
    monkeypatch.setattr(study_cpu, "BUDGET_FACTORS", (0.5, 1))
    monkeypatch.setattr(study_cpu, "REFERENCE_EXTRA_FACTORS", ())
    monkeypatch.setattr(study_cpu, "MAX_EXTENSIONS", 0)
    monkeypatch.setattr(study_cpu, "EVAL_TOKENS", 256)
    args = ["--proxy", "bpe", "--seeds", "1337,2", "--jobs", "2", "--out", str(record_in / "out")]
    assert study_cpu.main(["--phase", "sweep", *args]) == 0
    assert study_cpu.main(["--phase", "budgets", *args]) == 0
    lines = [json.loads(line) for line in study_cpu.RECORD.read_text().splitlines()]
    assert sorted((ln["contender"], ln["steps"], ln["seed"]) for ln in lines) == \
        sorted((c, steps, seed) for c in ("adamw", "sophiag") for steps in (4, 8) for seed in (1337, 2))
    for line in lines:
        run_dir = record_in / "out" / line["key"]
        events = [json.loads(e) for e in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [(e["step"], e["val/loss"]) for e in events if "val/loss" in e]
        assert line["status"] == "finished" and line["curve"] == [list(e) for e in evals]
        assert line["final_val_loss"] == evals[-1][1] and evals[-1][0] == line["steps"]
        wins = [e["optim/win_rate/blocks"] for e in events if "optim/win_rate/blocks" in e]
        if line["contender"] == "sophiag":
            assert wins and line["win_rate"]["blocks"] == {"mean": np.mean(wins), "peak": max(wins), "final": wins[-1]}
            assert line["hessian_clip_rate"] is not None
        else:
            assert not wins and line["win_rate"]["blocks"] is None
    # a second pass finds everything in the record: nothing starts
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a recorded run was started again"))
    assert study_cpu.main(["--phase", "budgets", *args]) == 0


def test_a_failing_sweep_run_is_not_retried_in_a_loop(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study_cpu, "preset_steps", lambda contender: 100)
    contender = study_cpu.Contender("adamw", "shakespeare_adamw", {"optim.lr": [1e-3, 2e-3]})
    calls = []

    def run_jobs_that_fail(jobs, record, args, refill=None):
        calls.append(jobs)
        failed = {j.key for j in jobs}
        assert refill(set()) == jobs and refill(failed) == []  # what refill offers after a failure: not it again
        return failed

    monkeypatch.setattr(study_cpu, "run_jobs", run_jobs_that_fail)

    class Args:
        seeds, out, dry_run = [1337], tmp_path, False

    study_cpu.phase_sweep("bpe", [contender], {}, Args())  # returns: both runs failed once, nothing recorded
    assert len(calls) == 1 and len(calls[0]) == 2
    assert "2 sweep run(s) failed" in capsys.readouterr().out


def test_sophiag_is_judged_within_its_regime():
    """SophiaG's best setting is chosen among runs whose blocks' mean win rate lies in SOPHIA_REGIME: a lower loss
    reached fully clipped (sign momentum) does not make it SophiaG's best; other contenders are not filtered."""
    def line(contender, loss, blocks_mean):
        blocks = None if blocks_mean is None else {"mean": blocks_mean, "peak": blocks_mean, "final": blocks_mean}
        return {"contender": contender, "final_val_loss": loss, "win_rate": {"all": None, "embedding": None,
                                                                              "blocks": blocks}}
    low, high = study_cpu.SOPHIA_REGIME
    assert study_cpu.loss_of(line("sophiag", 1.8, (low + high) / 2)) == 1.8
    assert study_cpu.loss_of(line("sophiag", 1.7, low / 10)) == math.inf  # 99% clipped
    assert study_cpu.loss_of(line("sophiag", 1.7, min(1.0, high * 1.5))) == math.inf  # nearly unclipped
    assert study_cpu.loss_of(line("sophiag", 1.7, None)) == math.inf
    assert study_cpu.loss_of(line("lion", 1.7, None)) == 1.7
    results = {(("optim.rho", 0.01),): study_cpu.loss_of(line("sophiag", 1.70, 0.01)),
               (("optim.rho", 0.5),): study_cpu.loss_of(line("sophiag", 1.80, 0.30)),
               (("optim.rho", 5.0),): study_cpu.loss_of(line("sophiag", 2.10, 0.90))}
    assert study_cpu.best_point(results) == (("optim.rho", 0.5),)
    assert study_cpu.extension(results) is None  # inside the grid: rho tried below and above


@pytest.mark.skipif(subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode != 0,
                    reason="not a git checkout: verify reruns the code of a recorded commit")
def test_verify_reruns_recorded_commands_and_flags_a_different_loss(record_in, token_data, capsys):
    """A record line from a real tiny train.py run on HEAD's code: verify reruns it and gets the same final loss;
    the same run recorded with its loss moved by 1e-3 is flagged (exit 1); a run of uncommitted code is refused
    with its reason, not rerun."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    # this checkout if clean, else HEAD's files exported
    code = study_cpu.code_at(head, record_in / "code", study_cpu.git_commit())
    assert (code / "train.py").read_bytes() == subprocess.run(["git", "show", f"{head}:train.py"], cwd=REPO,
                                                              capture_output=True).stdout
    tiny = ["config=shakespeare_adamw", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
            "device=cpu", "total_batch_size=4", "micro_batch_size=2", "log_interval=2", "warmup_steps=1", "cpu_peak_flops=1e11",
            f"data.dir={token_data}", "max_steps=4", "eval_steps=2", "eval_interval=2", "ckpt_interval=4", "seed=5"]
    subprocess.run(["python", "train.py", *tiny, f"out_dir={record_in / 'original'}"], cwd=code, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    loss = study_cpu.final_val_loss(record_in / "original", 4)
    assert loss is not None and math.isfinite(loss)
    command = "OMP_NUM_THREADS=1 " + shlex.join(["python", "train.py", *tiny, "out_dir=out/somewhere"])
    base = {"proxy": "bpe", "contender": "adamw", "status": "finished", "steps": 4, "command": command}
    lines = [{**base, "key": "bpe/adamw/same", "final_val_loss": loss, "commit": head},
             {**base, "key": "bpe/adamw/moved", "final_val_loss": loss + 1e-3, "commit": head},
             {**base, "key": "bpe/adamw/dirty", "final_val_loss": loss, "commit": head + "-dirty"}]
    verify = ["--phase", "verify", "--proxy", "bpe", "--contenders", "adamw", "--out", str(record_in / "out")]
    assert study_cpu.main(verify) == 2 and "nothing to verify" in capsys.readouterr().err  # an empty record
    study_cpu.RECORD.parent.mkdir(parents=True)
    study_cpu.RECORD.write_text("".join(json.dumps(line) + "\n" for line in lines))
    status = study_cpu.main([*verify, "--verify-runs", "0", "--jobs", "2"])
    out = capsys.readouterr().out
    assert status == 1
    rows = {row.split(" | ")[0].strip("| "): row for row in out.splitlines() if row.startswith("| bpe/")}
    assert rows["bpe/adamw/same"].endswith("| +0.00e+00 | yes |")
    assert rows["bpe/adamw/moved"].endswith("| -1.00e-03 | NO |")
    assert "cannot verify bpe/adamw/dirty: commit" in out and "uncommitted code" in out
    assert rows["bpe/adamw/dirty"].endswith("| n/a | NO |")
    assert "1 of 3 rerun(s) within 0.0001 of the record" in out
    assert "record's machine(s): not noted (made before the record noted it)" in out
    assert f"rerun's machine: {study_cpu.machine()}" in out
    # the rerun wrote to its own folder, not the recorded out_dir
    assert study_cpu.final_val_loss(record_in / "out" / "verify" / "runs" / "bpe/adamw/same", 4) == loss


def test_against_compares_two_records_run_by_run(record_in, monkeypatch, capsys):
    """--against reruns nothing: it pairs the finished runs both records hold (a run only one has is left out),
    prints each difference, their median and largest, and whether each contender's best sweep setting is the same;
    it fails (exit 1) when a difference exceeds --tolerance, and says so when the records share no run (exit 2)."""
    adamw = study_cpu.Contender("adamw", "shakespeare_char_adamw", {"optim.lr": [1e-3, 2e-3, 4e-3, 8e-3]})
    monkeypatch.setattr(study_cpu, "contenders_of", lambda proxy: ([adamw], []))
    monkeypatch.setattr(study_cpu, "preset_steps", lambda contender: 100)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("--against started a run"))

    def write(path, losses, seed=1337, machine=None):
        lines = [{"key": study_cpu.Job("char", adamw, {"optim.lr": lr}, 100, seed, record_in / "out").key,
                  "proxy": "char", "contender": "adamw", "status": "finished", "steps": 100, "seed": seed,
                  "final_val_loss": loss, "commit": "0" * 40, **({"machine": machine} if machine else {}),
                  "win_rate": {"blocks": {"mean": loss / 10}}} for lr, loss in losses.items()]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    write(study_cpu.RECORD, {1e-3: 2.0, 2e-3: 1.9, 4e-3: 1.95, 8e-3: 2.2})
    other = record_in / "other" / "runs.jsonl"
    write(other, {1e-3: 2.0, 2e-3: 1.91, 4e-3: 1.89, 8e-3: 2.23}, machine="CPU B, AVX2, no bf16")
    with open(other, "a") as f:  # a run the record does not have
        f.write(json.dumps({**json.loads(other.read_text().splitlines()[0]), "key": "char/adamw/only_here"}) + "\n")
    against = ["--phase", "verify", "--proxy", "char", "--against", str(other), "--out", str(record_in / "out")]
    assert study_cpu.main(against) == 1
    out = capsys.readouterr().out
    rows = {row.split(" | ")[0].strip("| "): row for row in out.splitlines() if row.startswith("| char/")}
    assert sorted(rows) == sorted(f"char/adamw/lr{lr:g}_steps100_seed1337" for lr in (1e-3, 2e-3, 4e-3, 8e-3))
    assert rows["char/adamw/lr0.001_steps100_seed1337"].endswith("| 2.000000 | +0.00e+00 | yes |")
    assert rows["char/adamw/lr0.008_steps100_seed1337"].endswith("| 2.230000 | +3.00e-02 | NO |")
    assert "record's machine(s): not noted (made before the record noted it)" in out
    assert "other's machine(s): CPU B, AVX2, no bf16" in out
    assert "4 run(s) in both; 1 bit-equal; |difference| median 2.00e-02, largest 6.00e-02 " \
           "(char/adamw/lr0.004_steps100_seed1337)" in out
    assert "blocks (mean over a run): largest difference 0.0060 (char/adamw/lr0.004_steps100_seed1337)" in out
    assert "best sweep setting {'optim.lr': 0.002} in the record, {'optim.lr': 0.004} in the other: DIFFERENT" in out
    assert study_cpu.main([*against, "--tolerance", "0.1"]) == 0
    write(other, {1e-3: 2.0, 2e-3: 1.9, 4e-3: 1.95, 8e-3: 2.2})  # the record's own losses
    capsys.readouterr()
    assert study_cpu.main(against) == 0
    out = capsys.readouterr().out
    assert "4 run(s) in both; 4 bit-equal" in out and "in the other: the same" in out
    write(other, {1e-3: 2.0, 2e-3: 1.9, 4e-3: 1.95}, seed=2)
    assert study_cpu.main(against) == 2 and "no finished run of char is in both" in capsys.readouterr().err
    for wrong in ([*against[:-3], str(record_in / "missing.jsonl")], ["--phase", "report", *against[2:]]):
        with pytest.raises(SystemExit):  # a missing file, or --against with another phase: one line, nothing runs
            study_cpu.main(wrong)
        assert "--against" in capsys.readouterr().err
