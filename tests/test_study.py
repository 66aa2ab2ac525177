"""scripts/study.py and the study's library (studylib.py): the definitions in configs/study/ give every command of
the published record, their commands compose the configs they claim (checked by composing them as train.py does),
the grid extension on synthetic loss surfaces whose minimum is known, the record (a run in it is not run again, the
report works from it alone), the plan's estimates against measured runs and the README's GPU-hour arithmetic, and
the scale axes' report."""

import json
import math
import os
import shlex
import subprocess

import numpy as np
import pytest
import torch
import yaml

import studylib
from scripts import study as study_cli
from tests.conftest import compose_config, cpu_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_STUDY = os.path.join(REPO, "configs", "study", "cpu.yaml")

# validation tokens per proxy as their meta.json says (the preparation is data/*/prepare.py's business, tested there)
VAL_TOKENS = {"shakespeare": 84_511, "shakespeare_char": 253_771}


@pytest.fixture
def known_val_tokens(monkeypatch):
    """The corpora's validation sizes without preparing them (the commands' eval_steps depend on them)."""
    monkeypatch.setattr(studylib, "val_tokens",
                        lambda preset, extra=(): VAL_TOKENS[str(studylib.preset_config(preset, extra).data.name)])


def write_study(tmp_path, **spec):
    """A study definition in tmp_path; returns its path."""
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "test", "seeds": [1337, 2, 3], **spec}))
    return path


def two_contenders(steps=100, budgets=(1, 0.5, 0.25), baseline_budgets=(2,), lion_grid=(1e-4, 3e-4, 1e-3),
                   adamw_grid=(1e-3, 2e-3, 4e-3)):
    """AdamW and Lion on the BPE preset at `steps` a 1x budget (no data needed to write their commands)."""
    return {"budgets": list(budgets), "baseline_budgets": list(baseline_budgets), "max_extensions": 3,
            "proxies": {"bpe": {"steps": steps, "contenders": {
                "adamw": {"preset": "shakespeare_adamw", "grid": {"optim.lr": list(adamw_grid)}},
                "lion": {"preset": "shakespeare_adamw", "overrides": ["optim=lion"], "grid": {"optim.lr": list(lion_grid)}}}}}}


# -----------------------------------------------------------------------------
# the definitions give the published record's commands

def test_definitions_give_every_command_of_the_record(known_val_tokens):
    """Every line of docs/study/runs.jsonl (and docs/study/time.jsonl) is a run configs/study/cpu.yaml calls for,
    with the same key and the same command, character for character; the char and bpe proxies, whose studies are
    complete, have no run left to do."""
    study = studylib.load_study(CPU_STUDY)
    record = studylib.read_record(study.record)
    assert len(record) >= 132
    planned = {}
    for proxy in study.proxies.values():
        planned.update(studylib.planned_jobs(study, proxy, record))
    for key, line in record.items():
        assert key in planned, f"{key}: not a run of configs/study/cpu.yaml"
        assert planned[key].command() == line["command"], key
    for name in ("char", "bpe"):  # complete: the sweep bracketed, every budget and seed run
        todo = [k for k, job in planned.items() if job.proxy == name and k not in record]
        assert todo == [], todo
        assert len([k for k in record if k.startswith(f"{name}/")]) == len([k for k in planned if k.startswith(f"{name}/")])
    timings = [json.loads(text) for text in study.times.read_text().splitlines() if text.strip()]
    assert {(t["proxy"], t["contender"]) for t in timings} >= {("char", "adamw"), ("bpe", "sophiag")}
    for t in timings:
        proxy = study.proxies[t["proxy"]]
        contender = next(c for c in proxy.contenders if c.name == t["contender"])
        job = studylib.Job(study, proxy.name, contender, t["settings"], study.time_steps, study.seeds[0],
                           study.runs / "time", eval_interval=study.time_steps)
        assert job.command() == t["command"]


@pytest.mark.parametrize("proxy", ["bpe", "char", "char_t3072"])
def test_dry_run_commands_compose_the_configs_they_name(proxy, known_val_tokens, tmp_path, capsys):
    """A fresh record (--out): the dry run lists the proxy's whole starting grid, each command composes (Hydra,
    as train.py) to the schedule, evaluation and folder the study promises."""
    study = studylib.load_study(CPU_STUDY)
    contenders = study.proxies[proxy].contenders
    assert study_cli.main([CPU_STUDY, "--dry-run", "--phase", "sweep", "--proxy", proxy,
                           "--out", f"{REPO}/out/test_study"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("OMP_NUM_THREADS=1 python train.py ")]
    expected = sum(len(studylib.grid_points(c.grid)) for c in contenders)
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
        # the evaluation: eval_tokens validation tokens, or one pass over the validation split when it holds fewer
        batch_tokens = cfg["micro_batch_size"] * cfg["model"]["block_size"]
        eval_tokens = cfg["eval_steps"] * batch_tokens
        val = VAL_TOKENS[cfg["data"]["name"]]
        assert min(study.eval_tokens, val - 2 * batch_tokens) <= eval_tokens <= max(study.eval_tokens + batch_tokens,
                                                                                    base["eval_steps"] * batch_tokens)
        assert eval_tokens <= val
        assert cfg["max_steps"] % cfg["eval_interval"] == 0 and cfg["seed"] == 1337
        assert cfg["out_dir"].startswith(f"out/test_study/runs/{proxy}/")  # relative to the repo, where train.py runs
        assert not cfg["wandb"]["enabled"]
        if "grad_clip=0.16666666666666666" in overrides:  # the official-style AdamW
            assert cfg["optim"]["name"] == "adamw"
            assert math.isclose(cfg["optim"]["eps"], base["optim"]["eps"] / 6, rel_tol=1e-12)
        if proxy == "char_t3072":  # 4x the char proxy's tokens per step
            assert cfg["total_batch_size"] * cfg["model"]["block_size"] == 3072
        seen.add((cfg["optim"]["name"], cfg["optim"]["lr"], cfg["optim"].get("rho"), cfg["grad_clip"]))
    assert len(seen) == expected  # every command a different setting
    names = {name for name, *_ in seen}
    assert {"adamw", "lion", "sophiag"} <= names


@pytest.mark.parametrize("change,message", [
    ({"seeds": None}, "`seeds` is missing"),
    ({"sedes": [1]}, "unknown key(s) ['sedes']"),
    ({"proxies": {"p": {"contenders": {"adamw": {"preset": "no_such_preset", "grid": {"optim.lr": [1e-3]}}}}}},
     "no preset 'no_such_preset'"),
    ({"proxies": {"p": {"contenders": {"adamw": {"preset": "shakespeare_adamw", "grid": {"optim.lr": ["fast"]}}}}}},
     "'fast' is not a number"),
    ({"proxies": {"p": {"contenders": {"lion": {"preset": "shakespeare_adamw", "grid": {"optim.lr": [1e-3]}}}}}},
     "no contender 'adamw'"),
    ({"axes": {"tokens_per_step": ["bpe", "nowhere"]}}, "['nowhere'] are not among the proxies"),
])
def test_a_bad_definition_is_refused_in_one_line(tmp_path, capsys, change, message):
    spec = {"name": "test", "seeds": [1337], **two_contenders(), **change}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}))
    assert study_cli.main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_wandb_groups_a_studys_runs_and_tags_them(tmp_path):
    """wandb: true adds what train.py needs to log every run in one W&B group named after the study, tagged with
    the proxy, contender, setting, budget and seed; the CPU study (wandb: false) adds nothing (its record's
    commands hold no wandb override: test_definitions_give_every_command_of_the_record)."""
    study = studylib.load_study(write_study(tmp_path, wandb=True, **two_contenders()))
    proxy = study.proxies["bpe"]
    job = studylib.Job(study, "bpe", proxy.contenders[1], {"optim.lr": 1e-5}, 50, 2, study.runs)
    cfg = compose_config(None, shlex.split(job.command())[3:])
    assert cfg["wandb"]["enabled"] and cfg["wandb"]["group"] == "test"
    assert cfg["wandb"]["tags"] == ["bpe", "lion", "lr1e-05", "steps50", "seed2"]
    assert cfg["optim"]["name"] == "lion" and cfg["max_steps"] == 50 and cfg["seed"] == 2


# -----------------------------------------------------------------------------
# the grid extension: pure functions of the results

def bowl(center):
    """A loss with its minimum at `center` ({key: value}), quadratic in log(value) along each axis."""
    return lambda point: sum(math.log(dict(point)[k] / c) ** 2 for k, c in center.items())


def test_extension_steps_beyond_the_edge_the_best_point_is_on():
    lr_grid = {"optim.lr": [1e-3, 2e-3, 4e-3]}
    points = studylib.grid_points(lr_grid)
    # best at the top edge: the next point is x2 (the grid's own spacing) beyond it
    assert studylib.extension({p: bowl({"optim.lr": 1e-2})(p) for p in points}) == (("optim.lr", 8e-3),)
    assert studylib.extension({p: bowl({"optim.lr": 1e-4})(p) for p in points}) == (("optim.lr", 5e-4),)
    assert studylib.extension({p: bowl({"optim.lr": 2.1e-3})(p) for p in points}) is None  # inside
    # a diverged point (inf) never counts as the best; a lone point steps by x3
    assert studylib.extension({(("optim.lr", 1e-3),): math.inf, (("optim.lr", 2e-3),): 1.0}) == (("optim.lr", 4e-3),)
    assert studylib.extension({(("optim.lr", 1e-3),): 1.0}) == (("optim.lr", 3.33e-4),)


def python_study(tmp_path, contenders, max_extensions=3):
    return studylib.Study(name="test", proxies={"bpe": studylib.Proxy("bpe", contenders)}, seeds=[1337],
                          runs=tmp_path / "runs", record=tmp_path / "runs.jsonl", times=tmp_path / "time.jsonl",
                          report=tmp_path / "report", max_extensions=max_extensions)


def fake_record(study, contender, loss, points):
    record = {}
    for point in points:
        job = studylib.sweep_job(study, study.proxies["bpe"], contender, point)
        record[job.key] = {"key": job.key, "final_val_loss": loss(point), "settings": dict(point)}
    return record


# lr 1.5e-3 takes one extension (3.33e-3), rho 8 two (12.5, 31.2): exactly the cap of 3, and inside
@pytest.mark.parametrize("center,capped", [({"optim.lr": 1.5e-3, "optim.rho": 8.0}, False),
                                           ({"optim.lr": 1e-5, "optim.rho": 0.5}, True)])
def test_sweep_extends_until_the_best_point_is_inside(tmp_path, center, capped):
    grid = {"optim.lr": [3e-4, 1e-3], "optim.rho": [0.01, 0.1, 0.5, 2.0, 5.0]}
    contender = studylib.Contender("sophiag", "shakespeare_sophiag", grid, steps=100)
    study = python_study(tmp_path, [contender])
    proxy = study.proxies["bpe"]
    loss, record, rounds = bowl(center), {}, 0
    while True:  # what phase_sweep does, with the loss surface in place of train.py
        results, todo, was_capped = studylib.sweep_state(study, proxy, contender, record)
        if not todo:
            break
        record.update(fake_record(study, contender, loss, todo))
        rounds += 1
    assert rounds >= 2 and was_capped == capped
    best, on_edge, cap_hit = studylib.best_settings(study, proxy, contender, record)
    assert cap_hit == capped and on_edge == capped
    assert len(results) - 10 <= study.max_extensions
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
    return studylib.record_line(job, "finished", events, job.steps * 0.1, "abc")


@pytest.fixture
def synthetic_study(tmp_path, monkeypatch):
    """AdamW and Lion at 100 steps a 1x budget, trained by fake_train; returns (definition, --out, launched keys)."""
    launched = []

    def fake_run_jobs(study, jobs, record, args, refill=None):  # one round at a time: the sweep asks again
        for job in jobs:
            if job.key not in record:
                launched.append(job.key)
                record[job.key] = fake_train(job)
                studylib.append_line(study.record, record[job.key])
        return set()  # none failed

    monkeypatch.setattr(studylib, "run_jobs", fake_run_jobs)
    return write_study(tmp_path, **two_contenders()), tmp_path / "out", launched


def test_record_round_trip_and_report_from_the_record_alone(synthetic_study):
    """Synthetic finished runs written through record_line, a second pass that runs nothing, and the report's
    multipliers from the record alone, checked against compare.py's closed form (AdamW's final loss linear in
    log(steps), the other contender reaching AdamW's loss of 1.5x its steps)."""
    definition, out, launched = synthetic_study
    args = [str(definition), "--out", str(out)]
    assert study_cli.main([*args, "--phase", "sweep"]) == 0
    assert study_cli.main([*args, "--phase", "budgets"]) == 0
    # 3 + 3 sweep runs, then 3 budgets x 3 seeds (AdamW, the reference: 4 budgets) less the sweep's best run
    # (seed 1337 at 1x)
    assert len(launched) == 6 + (12 - 1) + (9 - 1) and len(set(launched)) == len(launched)
    lines = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(lines) == len(launched)
    # each line notes its machine: torch's kernel level and version, and bf16 as the kernel's CPU flags say
    bf16 = "bf16" if {"avx512_bf16", "amx_bf16"} & cpu_flags() else "no bf16"
    assert {line["machine"] for line in lines} == {studylib.machine()}
    assert lines[0]["machine"].endswith(f", {torch.backends.cpu.get_cpu_capability()}, {bf16}, torch {torch.__version__}")

    launched.clear()  # a second pass: everything is in the record, nothing runs
    assert study_cli.main([*args, "--phase", "sweep"]) == 0 and study_cli.main([*args, "--phase", "budgets"]) == 0
    assert launched == []

    # the report from the record alone (no run directory was ever written)
    assert not (out / "runs").exists()
    (out / "time.jsonl").write_text(json.dumps({"proxy": "bpe", "contender": "adamw", "seconds_per_step": 0.1}) + "\n"
                                    + json.dumps({"proxy": "bpe", "contender": "lion", "seconds_per_step": 0.08}) + "\n")
    assert study_cli.main([*args, "--phase", "report"]) == 0
    report = json.loads((out / "report.json").read_text())
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
    assert (out / "report_bpe_budgets.png").is_file()
    assert (out / "report_bpe_sweep.png").is_file()
    markdown = (out / "report.md").read_text()
    assert "| lion | 100 | 3 |" in markdown
    assert ("lion's win rate in the blocks (mean over each run, then over seeds): "
            "25 steps 0.300, 50 steps 0.300, 100 steps 0.300") in markdown
    assert C["lion"]["budgets"][0]["win_rate"][0]["blocks"] == {"mean": pytest.approx(0.3), "peak": 0.4, "final": 0.4}
    # every proxy entry carries its tokens per step and parameters (the tiny BPE model: 4 x 128 wide, block 128)
    assert report["proxies"]["bpe"]["tokens_per_step"] == 8 * 128
    assert report["proxies"]["bpe"]["n_params"] == 50304 * 128 + 4 * (12 * 128 ** 2 + 2 * 128) + 128


def test_report_of_a_sweep_alone_has_the_sweep_and_no_multipliers(synthetic_study):
    """A study stopped after its sweep (one budget, one seed each): the report holds the sweep, its best points
    and plot, and says why it has no multipliers, rather than fitting AdamW's curve to one point."""
    definition, out, launched = synthetic_study
    args = [str(definition), "--out", str(out)]
    assert study_cli.main([*args, "--phase", "sweep"]) == 0 and len(launched) == 6
    assert study_cli.main([*args, "--phase", "report"]) == 0
    C = json.loads((out / "report.json").read_text())["proxies"]["bpe"]["contenders"]
    assert C["adamw"]["best"] == {"optim.lr": 2e-3} and C["lion"]["best"] == {"optim.lr": 3e-4}
    for name, lr in (("adamw", 2e-3), ("lion", 3e-4)):
        best = next(s for s in C[name]["sweep"] if s["settings"] == {"optim.lr": lr})
        assert best["final_val_loss"] == pytest.approx(synthetic_final_loss(name, lr, 100, 1337))
        assert "data_multiplier" not in C[name]
    markdown = (out / "report.md").read_text()
    assert "AdamW has runs at one budget only" in markdown
    assert (out / "report_bpe_sweep.png").is_file()
    assert not (out / "report_bpe_budgets.png").exists()


def test_sweep_extends_a_grid_as_soon_as_it_is_done(tmp_path, monkeypatch):
    """Through run_jobs itself (train.py replaced by a process that ends at once): AdamW's best on the low edge of
    its grid gets its extension before Lion's grid starts, so a study cut short has AdamW bracketed."""
    definition = write_study(tmp_path, **two_contenders(adamw_grid=(4e-3, 8e-3)))  # AdamW tuned: 2e-3

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

    monkeypatch.setattr(studylib.subprocess, "Popen", Ended)
    monkeypatch.setattr(studylib, "finished_line", fake_finished_line)
    monkeypatch.setattr(studylib.time, "sleep", lambda seconds: None)
    assert study_cli.main([str(definition), "--phase", "sweep", "--jobs", "1", "--out", str(tmp_path / "out")]) == 0
    assert finished == ["adamw/lr0.004_steps100_seed1337", "adamw/lr0.008_steps100_seed1337",
                        "adamw/lr0.002_steps100_seed1337", "adamw/lr0.001_steps100_seed1337",  # bracketed: 2e-3
                        "lion/lr0.0001_steps100_seed1337", "lion/lr0.0003_steps100_seed1337",
                        "lion/lr0.001_steps100_seed1337"]


def test_time_phase_refuses_a_busy_machine(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    monkeypatch.setattr(studylib, "QUIET_WAIT_S", 0)
    definition, out = write_study(tmp_path, **two_contenders()), tmp_path / "out"
    assert study_cli.main([str(definition), "--phase", "time", "--max-load", "0.5", "--out", str(out)]) == 2
    assert "load average is 3.00 > --max-load 0.5" in capsys.readouterr().err
    assert not (out / "time.jsonl").exists()


@pytest.mark.skipif(os.environ.get("STUDY_E2E") != "1", reason="8 train.py processes (minutes on a busy machine): "
                    "STUDY_E2E=1 runs it")
def test_end_to_end_on_tiny_models(tmp_path, monkeypatch, token_data):
    """Real train.py runs: 2 optimizers x 2 budgets x 2 seeds of a 1-layer model for a few steps, two at a time;
    the record holds what their metrics.jsonl hold, and a second pass starts nothing."""
    tiny = ["device=cpu", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "total_batch_size=4",
            "micro_batch_size=2", "log_interval=2", "warmup_steps=1", "cpu_peak_flops=1e11", f"data.dir={token_data}"]
    definition = write_study(tmp_path, seeds=[1337, 2], budgets=[0.5, 1], eval_tokens=256, proxies={"bpe": {
        "steps": 8, "overrides": tiny, "contenders": {
            "adamw": {"preset": "shakespeare_adamw", "grid": {"optim.lr": [1e-3]}},
            "sophiag": {"preset": "shakespeare_sophiag", "overrides": ["optim.hess_interval=2"],
                        "grid": {"optim.lr": [1e-3], "optim.rho": [0.05]}}}}})
    out = tmp_path / "out"
    args = [str(definition), "--jobs", "2", "--out", str(out)]
    assert study_cli.main([*args, "--phase", "sweep"]) == 0
    assert study_cli.main([*args, "--phase", "budgets"]) == 0
    lines = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted((ln["contender"], ln["steps"], ln["seed"]) for ln in lines) == \
        sorted((c, steps, seed) for c in ("adamw", "sophiag") for steps in (4, 8) for seed in (1337, 2))
    for line in lines:
        run_dir = out / "runs" / line["key"]
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
    assert study_cli.main([*args, "--phase", "budgets"]) == 0


def test_a_failing_sweep_run_is_not_retried_in_a_loop(tmp_path, monkeypatch, capsys):
    contender = studylib.Contender("adamw", "shakespeare_adamw", {"optim.lr": [1e-3, 2e-3]}, steps=100)
    study = python_study(tmp_path, [contender])
    calls = []

    def run_jobs_that_fail(study, jobs, record, args, refill=None):
        calls.append(jobs)
        failed = {j.key for j in jobs}
        assert refill(set()) == jobs and refill(failed) == []  # what refill offers after a failure: not it again
        return failed

    monkeypatch.setattr(studylib, "run_jobs", run_jobs_that_fail)

    class Args:
        dry_run = False

    studylib.phase_sweep(study, study.proxies["bpe"], {}, Args())  # returns: both runs failed once, nothing recorded
    assert len(calls) == 1 and len(calls[0]) == 2
    assert "2 sweep run(s) failed" in capsys.readouterr().out


def test_sophiag_is_judged_within_its_regime():
    """SophiaG's best setting is chosen among runs whose blocks' mean win rate lies in its regime (the CPU study's:
    0.1-0.5): a lower loss reached fully clipped (sign momentum) does not make it SophiaG's best; a contender
    without a regime is not filtered."""
    def line(contender, loss, blocks_mean):
        blocks = None if blocks_mean is None else {"mean": blocks_mean, "peak": blocks_mean, "final": blocks_mean}
        return {"contender": contender, "final_val_loss": loss, "win_rate": {"all": None, "embedding": None,
                                                                              "blocks": blocks}}
    study = studylib.load_study(CPU_STUDY)
    regime = next(c for c in study.proxies["char"].contenders if c.name == "sophiag").regime
    assert regime == (0.1, 0.5)
    low, high = regime
    assert studylib.loss_of(line("sophiag", 1.8, (low + high) / 2), regime) == 1.8
    assert studylib.loss_of(line("sophiag", 1.7, low / 10), regime) == math.inf  # 99% clipped
    assert studylib.loss_of(line("sophiag", 1.7, min(1.0, high * 1.5)), regime) == math.inf  # nearly unclipped
    assert studylib.loss_of(line("sophiag", 1.7, None), regime) == math.inf
    assert studylib.loss_of(line("lion", 1.7, None)) == 1.7
    results = {(("optim.rho", 0.01),): studylib.loss_of(line("sophiag", 1.70, 0.01), regime),
               (("optim.rho", 0.5),): studylib.loss_of(line("sophiag", 1.80, 0.30), regime),
               (("optim.rho", 5.0),): studylib.loss_of(line("sophiag", 2.10, 0.90), regime)}
    assert studylib.best_point(results) == (("optim.rho", 0.5),)
    assert studylib.extension(results) is None  # inside the grid: rho tried below and above


@pytest.mark.skipif(subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode != 0,
                    reason="not a git checkout: verify reruns the code of a recorded commit")
def test_verify_reruns_recorded_commands_and_flags_a_different_loss(tmp_path, token_data, capsys):
    """A record line from a real tiny train.py run on HEAD's code: verify reruns it and gets the same final loss;
    the same run recorded with its loss moved by 1e-3 is flagged (exit 1); a run of uncommitted code is refused
    with its reason, not rerun."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    # this checkout if clean, else HEAD's files exported
    code = studylib.code_at(head, tmp_path / "code", studylib.git_commit())
    assert (code / "train.py").read_bytes() == subprocess.run(["git", "show", f"{head}:train.py"], cwd=REPO,
                                                              capture_output=True).stdout
    tiny = ["config=shakespeare_adamw", "device=cpu", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
            "model.block_size=32",
            "total_batch_size=4", "micro_batch_size=2", "log_interval=2", "warmup_steps=1", "cpu_peak_flops=1e11",
            f"data.dir={token_data}", "max_steps=4", "eval_steps=2", "eval_interval=2", "ckpt_interval=4", "seed=5"]
    subprocess.run(["python", "train.py", *tiny, f"out_dir={tmp_path / 'original'}"], cwd=code, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    loss = studylib.final_val_loss(tmp_path / "original", 4)
    assert loss is not None and math.isfinite(loss)
    command = "OMP_NUM_THREADS=1 " + shlex.join(["python", "train.py", *tiny, "out_dir=out/somewhere"])
    base = {"proxy": "bpe", "contender": "adamw", "status": "finished", "steps": 4, "command": command}
    lines = [{**base, "key": "bpe/adamw/same", "final_val_loss": loss, "commit": head},
             {**base, "key": "bpe/adamw/moved", "final_val_loss": loss + 1e-3, "commit": head},
             {**base, "key": "bpe/adamw/dirty", "final_val_loss": loss, "commit": head + "-dirty"}]
    definition, out = write_study(tmp_path, **two_contenders()), tmp_path / "out"
    verify = [str(definition), "--phase", "verify", "--contenders", "adamw", "--out", str(out)]
    assert study_cli.main(verify) == 2 and "nothing to verify" in capsys.readouterr().err  # an empty record
    out.mkdir()
    (out / "runs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    status = study_cli.main([*verify, "--verify-runs", "0", "--jobs", "2"])
    printed = capsys.readouterr().out
    assert status == 1
    rows = {row.split(" | ")[0].strip("| "): row for row in printed.splitlines() if row.startswith("| bpe/")}
    assert rows["bpe/adamw/same"].endswith("| +0.00e+00 | yes |")
    assert rows["bpe/adamw/moved"].endswith("| -1.00e-03 | NO |")
    assert "cannot verify bpe/adamw/dirty: commit" in printed and "uncommitted code" in printed
    assert rows["bpe/adamw/dirty"].endswith("| n/a | NO |")
    assert "1 of 3 rerun(s) within 0.0001 of the record" in printed
    assert "record's machine(s): not noted (made before the record noted it)" in printed
    assert f"rerun's machine: {studylib.machine()}" in printed
    # the rerun wrote to its own folder, not the recorded out_dir
    assert studylib.final_val_loss(out / "runs" / "verify" / "runs" / "bpe/adamw/same", 4) == loss


def test_against_compares_two_records_run_by_run(tmp_path, monkeypatch, capsys):
    """--against reruns nothing: it pairs the finished runs both records hold (a run only one has is left out),
    prints each difference, their median and largest, and whether each contender's best sweep setting is the same;
    it fails (exit 1) when a difference exceeds --tolerance, and says so when the records share no run (exit 2)."""
    definition = write_study(tmp_path, proxies={"char": {"steps": 100, "contenders": {
        "adamw": {"preset": "shakespeare_char_adamw", "grid": {"optim.lr": [1e-3, 2e-3, 4e-3, 8e-3]}}}}})
    out = tmp_path / "out"
    study = studylib.load_study(definition, out)
    adamw = study.proxies["char"].contenders[0]
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("--against started a run"))

    def write(path, losses, seed=1337, machine=None):
        lines = [{"key": studylib.Job(study, "char", adamw, {"optim.lr": lr}, 100, seed, study.runs).key,
                  "proxy": "char", "contender": "adamw", "status": "finished", "steps": 100, "seed": seed,
                  "final_val_loss": loss, "commit": "0" * 40, **({"machine": machine} if machine else {}),
                  "win_rate": {"blocks": {"mean": loss / 10}}} for lr, loss in losses.items()]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    write(study.record, {1e-3: 2.0, 2e-3: 1.9, 4e-3: 1.95, 8e-3: 2.2})
    other = tmp_path / "other" / "runs.jsonl"
    write(other, {1e-3: 2.0, 2e-3: 1.91, 4e-3: 1.89, 8e-3: 2.23}, machine="CPU B, AVX2, no bf16")
    with open(other, "a") as f:  # a run the record does not have
        f.write(json.dumps({**json.loads(other.read_text().splitlines()[0]), "key": "char/adamw/only_here"}) + "\n")
    against = [str(definition), "--phase", "verify", "--proxy", "char", "--out", str(out), "--against", str(other)]
    assert study_cli.main(against) == 1
    printed = capsys.readouterr().out
    rows = {row.split(" | ")[0].strip("| "): row for row in printed.splitlines() if row.startswith("| char/")}
    assert sorted(rows) == sorted(f"char/adamw/lr{lr:g}_steps100_seed1337" for lr in (1e-3, 2e-3, 4e-3, 8e-3))
    assert rows["char/adamw/lr0.001_steps100_seed1337"].endswith("| 2.000000 | +0.00e+00 | yes |")
    assert rows["char/adamw/lr0.008_steps100_seed1337"].endswith("| 2.230000 | +3.00e-02 | NO |")
    assert "record's machine(s): not noted (made before the record noted it)" in printed
    assert "other's machine(s): CPU B, AVX2, no bf16" in printed
    assert "4 run(s) in both; 1 bit-equal; |difference| median 2.00e-02, largest 6.00e-02 " \
           "(char/adamw/lr0.004_steps100_seed1337)" in printed
    assert "blocks (mean over a run): largest difference 0.0060 (char/adamw/lr0.004_steps100_seed1337)" in printed
    assert "best sweep setting {'optim.lr': 0.002} in the record, {'optim.lr': 0.004} in the other: DIFFERENT" in printed
    assert study_cli.main([*against, "--tolerance", "0.1"]) == 0
    write(other, {1e-3: 2.0, 2e-3: 1.9, 4e-3: 1.95, 8e-3: 2.2})  # the record's own losses
    capsys.readouterr()
    assert study_cli.main(against) == 0
    printed = capsys.readouterr().out
    assert "4 run(s) in both; 4 bit-equal" in printed and "in the other: the same" in printed
    write(other, {1e-3: 2.0, 2e-3: 1.9, 4e-3: 1.95}, seed=2)
    assert study_cli.main(against) == 2 and "no finished run of char is in both" in capsys.readouterr().err
    for wrong in ([*against[:-1], str(tmp_path / "missing.jsonl")], [*against[:2], "report", *against[3:]]):
        with pytest.raises(SystemExit):  # a missing file, or --against with another phase: one line, nothing runs
            study_cli.main(wrong)
        assert "--against" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the plan: the compute each run needs

def test_gpu_plan_is_palms_count_at_the_stated_mfu():
    """configs/study/gpt2_small.yaml's estimate of a 100k-step run: the README's arithmetic (49.2B tokens at 6N +
    12LHQT FLOPs per token, about 30 H100-hours at 40% MFU), with N counted in closed form (no biases, tied
    embedding, the position embedding left out), the evaluations' forward passes, and SophiaG's Hessian refresh
    (a full batch every 10 steps)."""
    study = studylib.load_study(os.path.join(REPO, "configs", "study", "gpt2_small.yaml"))
    proxy = study.proxies["gpt2_small"]
    V, L, H, d, T = 50304, 12, 12, 768, 1024
    n_params = V * d + L * (12 * d * d + 2 * d) + d
    flops_per_token = 6 * n_params + 12 * L * H * (d // H) * T
    tokens = 100_000 * 480 * T
    evals = 100_000 // (100_000 // study.evals_per_run) + 1
    eval_flops = evals * 200 * 12 * T * flops_per_token / 3
    for contender, hessian in (("adamw", 0.0), ("sophiag", 0.1)):
        c = next(c for c in proxy.contenders if c.name == contender)
        job = studylib.Job(study, proxy.name, c, {"optim.lr": 6e-4}, 100_000, 1337, study.runs)
        gpu_hours, basis = studylib.job_estimate(study, job, {})
        expected = (tokens * flops_per_token * (1 + hessian) + eval_flops) / (989e12 * 0.4) / 3600
        assert gpu_hours == pytest.approx(expected, rel=1e-12), contender
        assert "40% MFU" in basis
    assert 29 < (tokens * flops_per_token) / (989e12 * 0.4) / 3600 < 30  # the README's "about 30 H100-hours"


def measured_lines(record, proxy):
    return [ln for ln in record.values() if ln["proxy"] == proxy and ln["status"] == "finished" and ln["seconds"]]


def estimate(study, line, record):
    proxy = study.proxies[line["proxy"]]
    contender = next(c for c in proxy.contenders if c.name == line["contender"])
    job = studylib.Job(study, proxy.name, contender, line["settings"], line["steps"], line["seed"], study.runs)
    return studylib.job_estimate(study, job, record)


def test_cpu_plan_reproduces_the_records_measured_seconds(known_val_tokens):
    """A contender's runs estimated from their own measured seconds (a * steps + b, least squares): the estimates
    add up to the seconds measured, as a least-squares fit with an intercept must."""
    study = studylib.load_study(CPU_STUDY)
    record = studylib.read_record(study.record)
    for proxy in ("char", "bpe"):
        for contender in {ln["contender"] for ln in measured_lines(record, proxy)}:
            lines = [ln for ln in measured_lines(record, proxy) if ln["contender"] == contender]
            total = sum(estimate(study, ln, record)[0] for ln in lines)
            assert total == pytest.approx(sum(ln["seconds"] for ln in lines), rel=1e-9), (proxy, contender)


@pytest.mark.parametrize("target,source", [("bpe", "char"), ("char", "bpe")])
def test_cpu_plan_of_a_proxy_not_measured_yet_against_its_measured_runs(target, source, known_val_tokens):
    """The estimate for a proxy the record has not measured (a scale-axis point before its runs): each of its
    recorded runs estimated from the other proxy's runs alone, scaled by the FLOPs of a step and of an evaluation;
    the whole proxy's estimate lies within 25% of the seconds its runs took (the two proxies differ 13x in a step's
    cost: a 50,304-wide head against an 84-character one)."""
    study = studylib.load_study(CPU_STUDY)
    record = studylib.read_record(study.record)
    source_only = {key: line for key, line in record.items() if line["proxy"] == source}
    lines = measured_lines(record, target)
    estimates = [estimate(study, line, source_only) for line in lines]
    assert all(f"from {source}/" in basis for _, basis in estimates)
    measured = sum(line["seconds"] for line in lines)
    assert 0.75 < sum(cost for cost, _ in estimates) / measured < 1.25


def test_dry_run_prints_the_plan_of_the_whole_study(known_val_tokens, tmp_path, capsys):
    """A scale-axis point not started, beside the char proxy's record: the dry run lists its grid with each run's
    estimate, and the plan counts what waits on it: the grid extensions (3 per contender at most), the budget runs
    (every contender at 1x, AdamW also at 1/2x and 2x, the point's 2 seeds, less each sweep's 1x run) and the timing
    runs."""
    out = tmp_path / "out"
    out.mkdir()
    record = studylib.read_record(studylib.load_study(CPU_STUDY).record)
    (out / "runs.jsonl").write_text("".join(json.dumps(ln) + "\n" for ln in record.values() if ln["proxy"] == "char"))
    assert study_cli.main([CPU_STUDY, "--dry-run", "--proxy", "char_t3072", "--out", str(out), "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    estimates = [line for line in printed.splitlines() if line.startswith("# char_t3072/")]
    commands = [line for line in printed.splitlines() if line.startswith("OMP_NUM_THREADS=1 python train.py")]
    assert len(estimates) == len(commands) == 15  # the grids, SophiaG's over 2 rho (the timing: in the plan alone)
    assert all(line.endswith(" min") and "2000 steps, ~" in line for line in estimates)
    plan = printed[printed.index("plan of study cpu (char_t3072):"):]
    assert "now: 15 run(s) (listed above), 30,000 steps: ~" in plan
    assert "extensions: 12 run(s)" in plan
    assert f"later: {(3 * 2 - 1) + 3 * (1 * 2 - 1)} run(s)" in plan
    assert "time: 4 run(s)" in plan
    assert "char_t3072/sophiag from char/sophiag" in plan and "x4 the FLOPs per step" in plan
    minutes = sum(float(line.rsplit("~", 1)[1].removesuffix(" min")) for line in estimates)
    hours = float(plan.split("now: ")[1].split("~")[1].split(" CPU-hours")[0])
    assert hours == pytest.approx(minutes / 60, abs=0.02)  # each run rounded to 0.1 min


# -----------------------------------------------------------------------------
# the scale axes' report

def test_the_scale_axes_report_says_what_each_trend_says_and_cannot_say(tmp_path):
    """Synthetic multipliers along tokens per step: one rising beyond its intervals, one falling, one within them;
    the table, the plot, and the statement with the range it rests on (the proxies' tokens per step and parameters
    counted as train.py counts them: the baby GPT's 4 layers of 12 d^2 + 2 d, d = 128 or 256, an 84-character
    vocabulary padded to 128)."""
    study = replace_report(studylib.load_study(CPU_STUDY), tmp_path)
    baby = {d: 128 * d + 4 * (12 * d * d + 2 * d) + d for d in (128, 256)}
    report = {}
    multipliers = {"char": {"lion": (0.73, 0.70, 0.76), "sophiag": (0.54, 0.49, 0.59), "muon": (2.0, 1.9, 2.1)},
                   "char_t3072": {"lion": (0.85, 0.8, 0.9), "sophiag": (0.6, 0.4, 0.8), "muon": None},
                   "char_t6144": {"lion": (0.95, 0.9, 1.0), "sophiag": (0.62, 0.3, 0.9), "muon": (1.5, 1.4, 1.6)},
                   "char_w256": {"lion": (0.84, None, None), "sophiag": None, "muon": None}}
    for name, values in multipliers.items():
        size = studylib.model_size(study.proxies[name].contenders[0].preset, tuple(study.proxies[name].contenders[0].extra))
        report[name] = {"tokens_per_step": size["tokens_per_step"], "n_params": size["n_params"], "contenders": {
            c: {"data_multiplier": None if m is None else {"mean": m[0], "ci95": None if m[1] is None else [m[1], m[2]],
                                                           "extrapolated": False}}
            for c, m in values.items()}}
    assert [report[p]["tokens_per_step"] for p in ("char", "char_t3072", "char_t6144", "char_w256")] == \
        [768, 3072, 6144, 768]
    assert report["char"]["n_params"] == baby[128] and report["char_w256"]["n_params"] == baby[256]
    markdown, out = studylib.axes_report(study, report)
    assert "| lion | 0.73× [0.70, 0.76] | 0.85× [0.80, 0.90] | 0.95× [0.90, 1.00] |" in markdown
    statement = out["tokens_per_step"]["statement"]
    assert ("- lion: its data multiplier rises from 0.73× [0.70, 0.76] at 768 to 0.95× [0.90, 1.00] at 6,144 tokens "
            "per step (the 95% intervals do not overlap).") in statement
    assert "- muon: its data multiplier falls from 2.00× [1.90, 2.10] at 768 to 1.50× [1.40, 1.60] at 6,144" \
           in statement[2]
    assert statement[1].startswith("- sophiag: from 0.54× [0.49, 0.59] at 768 to 0.62× [0.30, 0.90] at 6,144 tokens "
                                   "per step: no change beyond the 95% intervals")
    assert statement[-1] == ("- What it cannot say: 3 points spanning 8x the tokens per step (768 to 6,144), at "
                             "0.80M parameters, on one corpus: a direction on this proxy, not an extrapolation to "
                             "gpt2_small_adamw (124M parameters, 491,520 tokens per step).")
    assert "- sophiag: multipliers at 1 of 2 points so far: no trend yet." in out["n_params"]["statement"]
    assert ("- lion: from 0.73× [0.70, 0.76] at 0.80M to 0.84× at 3.18M parameters: one seed at one end, no interval "
            "there: no verdict yet.") in out["n_params"]["statement"]
    assert out["n_params"]["proxies"] == ["char", "char_w256"]
    assert (tmp_path / "report_scale.png").is_file()


def replace_report(study, folder):
    from dataclasses import replace
    return replace(study, report=folder / "report")
