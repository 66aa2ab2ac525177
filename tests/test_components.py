"""The modules train.py is built from, one behaviour each, in-process: the data barrier, the stop signal's
message and requeue, the monotonic clock, the one-collective Hessian averages, the run-name cap and the
path rule, the time left, the rerun of a finished run. Each is easy to get wrong unseen."""

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

import build
import distributed
import metrics
import train
from data import stream

REPO_DIR = Path(__file__).resolve().parents[1]


def data_cfg(name="shakespeare", directory=None):
    return OmegaConf.create({"data": {"name": name, "dir": directory}})


@pytest.mark.parametrize("is_master", [True, False])
def test_every_rank_takes_the_barrier_whether_or_not_it_finds_the_data(tmp_path, monkeypatch, is_master):
    """Rank 0 prepares the embedded corpus; a rank that looks after that finds meta.json and must still enter
    the barrier rank 0 enters, or the ranks' collectives stop matching and the run hangs."""
    monkeypatch.setattr(stream, "REPO_DIR", tmp_path)  # the corpus goes to tmp_path/data/shakespeare
    if not is_master:
        from data.shakespeare.prepare import prepare
        prepare(out_dir=tmp_path / "data" / "shakespeare")  # rank 0 got there first
    barriers = []
    monkeypatch.setattr(stream.dist, "barrier", lambda *a, **k: barriers.append(1))
    train_tokens, val_tokens = stream.load_data(data_cfg(), is_master=is_master, distributed=True)
    assert len(train_tokens) > 0 and len(val_tokens) > 0
    assert barriers == [1]


def test_a_relative_data_dir_resolves_against_the_working_directory(tmp_path, monkeypatch):
    """One rule for every path in the config: relative to where the command runs (as out_dir)."""
    monkeypatch.chdir(tmp_path)
    assert stream.data_dir_of(data_cfg(directory="corpus")) == tmp_path / "corpus"
    assert build.out_dir_of(OmegaConf.create({"out_dir": "runs/a", "run_name": "a"})) == tmp_path / "runs" / "a"


def fake_run(tmp_path, step=7):
    env = SimpleNamespace(is_master=True, distributed=False)
    return SimpleNamespace(env=env, progress=SimpleNamespace(step=step), ckpt_path=tmp_path / "ckpt.pt")


@pytest.mark.parametrize("saved", [True, False])
def test_the_stop_message_and_the_requeue_follow_whether_the_checkpoint_was_written(tmp_path, monkeypatch, capsys,
                                                                                      saved):
    """save_run postpones a checkpoint after a skipped update: then no "checkpoint at step N" and no requeue
    (the requeued job would resume from an older step than the message says)."""
    requeues = []
    monkeypatch.setattr(train, "save_run", lambda run, elapsed: saved)
    monkeypatch.setattr(train.subprocess, "run", lambda cmd, **kw: requeues.append(cmd))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    status = train.stop_for_signal(fake_run(tmp_path), SimpleNamespace(elapsed=lambda: 1.0), signal.SIGUSR1)
    out = capsys.readouterr().out
    assert status == 0
    assert out.startswith("stop signal received: checkpoint at step 7") == saved
    assert requeues == ([["scontrol", "requeue", "42"]] if saved else [])


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_exits_with_the_shells_status_and_no_requeue(tmp_path, monkeypatch, signum, status):
    requeues = []
    monkeypatch.setattr(train, "save_run", lambda run, elapsed: True)
    monkeypatch.setattr(train.subprocess, "run", lambda cmd, **kw: requeues.append(cmd))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert train.stop_for_signal(fake_run(tmp_path), SimpleNamespace(elapsed=lambda: 1.0), signum) == status
    assert requeues == []  # scancel and Ctrl-C stay a cancel


def test_the_clock_ignores_a_wall_clock_jump_backwards(monkeypatch):
    """An NTP correction moves time.time(); the step times and the run's elapsed time must not follow it."""
    monotonic = iter([100.0, 103.0, 105.0])
    monkeypatch.setattr(metrics.time, "monotonic", lambda: next(monotonic))
    monkeypatch.setattr(metrics.time, "time", lambda: 0.0)  # the wall clock set back to 1970
    clock = metrics.Clock(elapsed_before=10.0, step=0)
    steps, seconds = clock.since_log(3)
    assert (steps, seconds) == (3, 3.0)
    assert clock.elapsed() == 15.0


def test_time_left_leaves_start_up_out_and_follows_the_recent_pace(monkeypatch):
    """A synthetic timeline of a run on a loaded machine (500 steps, a log line every 10): an evaluation at step 0
    (30 s), a first step that compiles (60 s), then 1 s per step, then 2 s per step from step 100 on. The time left
    is the steps left at the pace of the recent steps: start-up and evaluations out of it, and a change of pace
    followed within Clock.RECENT_STEPS steps (a moving average keeps a share of every window it has seen)."""
    now = [1000.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    clock = metrics.Clock(elapsed_before=0.0, step=0)

    def steps(first, last, seconds_each):
        now[0] += (last - first) * seconds_each

    now[0] += 30.0  # the evaluation at step 0, which log_eval adds to eval_seconds
    clock.eval_seconds += 30.0
    now[0] += 60.0  # step 0 compiles...
    clock.leave_out(60.0)  # as train.py reports this process's first step
    steps(1, 10, 1.0)  # ...then 1 s per step
    assert clock.since_log(10) == (10, pytest.approx(69.0))  # the throughput counts the first step
    assert clock.time_left(490) == pytest.approx(490.0)  # not 490 x 6.9 s: the first step is not the pace
    for step in range(20, 101, 10):
        steps(step - 10, step, 1.0)
        clock.since_log(step)
    assert clock.time_left(400) == pytest.approx(400.0)
    for step in range(110, 201, 10):
        steps(step - 10, step, 2.0)
        if step == 150:
            now[0] += 30.0  # an evaluation mid-run
            clock.eval_seconds += 30.0
        clock.since_log(step)
        covered = min(step - 100, clock.RECENT_STEPS)  # recent steps at the new pace
        pace = (2.0 * covered + 1.0 * (clock.RECENT_STEPS - covered)) / clock.RECENT_STEPS
        assert clock.time_left(500 - step) == pytest.approx((500 - step) * pace), step
    assert clock.time_left(300) == pytest.approx(600.0)  # the old pace forgotten entirely


def test_time_left_waits_for_a_step_that_is_not_start_up(monkeypatch):
    """log_interval=1: the first line's one step is start-up, so there is no pace yet to extrapolate."""
    now = [0.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    clock = metrics.Clock(elapsed_before=0.0, step=0)
    now[0] += 50.0
    clock.leave_out(50.0)
    assert clock.since_log(1) == (1, 50.0) and clock.time_left(99) is None
    now[0] += 2.0
    clock.since_log(2)
    assert clock.time_left(98) == pytest.approx(196.0)


@pytest.mark.parametrize("optim, hess_interval, first_step, start_up", [
    ("adamw", 0, 0, [0]),
    ("sophiag", 3, 0, [0, 2]),  # the first step, and the first Hessian refresh (after step 2)
    ("sophiag", 1, 0, [0]),  # the first step refreshes the Hessian too
    ("sophiag", 3, 4, [4, 5]),  # a resumed process: its own first step and refresh
])
def test_the_loop_leaves_out_its_first_step_and_first_hessian_refresh(tmp_path, monkeypatch, shakespeare_bins,
                                                                       optim, hess_interval, first_step, start_up):
    """What train.py hands Clock.leave_out: the steps of this process that compile and warm up, no other."""
    from conftest import train_in_process
    left_out = []

    class Recording(metrics.Clock):
        def leave_out(self, seconds):
            left_out.append(progress_steps[-1])
            super().leave_out(seconds)

    progress_steps = []
    real_train_step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda run, lr: (progress_steps.append(run.progress.step),
                                                              real_train_step(run, lr))[1])
    monkeypatch.setattr(train, "Clock", Recording)
    args = [f"optim={optim}", "max_steps=8", "warmup_steps=0"] + ([f"optim.hess_interval={hess_interval}"]
                                                                  if optim == "sophiag" else [])
    if first_step:
        assert train_in_process(args + [f"max_steps={first_step}", f"ckpt_interval={first_step}",
                                        "lr_decay_steps=8"], tmp_path)[0] == 0
        args.append("lr_decay_steps=8")
        left_out.clear()
    assert train_in_process(args, tmp_path)[0] == 0
    assert left_out == start_up


def test_the_rerun_of_a_finished_run_says_so_in_one_line(tmp_path, shakespeare_bins):
    """Not "resumed ... at step 2" (nothing resumes) before "already finished": the one line, naming the ways on."""
    from conftest import read_metrics, train_in_process
    assert train_in_process(["optim=adamw", "max_steps=2"], tmp_path)[0] == 0
    before = read_metrics(tmp_path)
    status, printed = train_in_process(["optim=adamw", "max_steps=2"], tmp_path)
    assert status == 0 and read_metrics(tmp_path) == before
    lines = printed.strip().splitlines()
    assert len(lines) == 1 and "resumed" not in printed, printed
    assert lines[0].startswith(f"{tmp_path} already finished: step 2 of max_steps=2, nothing to do")


@pytest.mark.parametrize("max_steps", [2, 3])
def test_a_run_that_is_all_warmup_says_so(tmp_path, shakespeare_bins, max_steps):
    """warmup_steps=2 (TINY's): a 2-step run never leaves the warmup, and its header says so; a 3-step one does."""
    from conftest import train_in_process
    status, printed = train_in_process(["optim=adamw", f"max_steps={max_steps}"], tmp_path)
    assert status == 0
    note = f"note: warmup_steps=2 >= max_steps={max_steps}: the whole run is warmup"
    assert (note in printed) == (max_steps == 2), printed


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_ranks_estimates_are_averaged_in_one_collective(one_rank_group, monkeypatch):
    """DDP's Hessian average: one all-reduce over one flat buffer, not one per parameter."""
    calls = []
    all_reduce = dist.all_reduce
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, **kw: (calls.append(t.numel()), all_reduce(t, **kw)))
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, 2)]
    expected = [t.clone() for t in tensors]
    distributed.average_over_ranks(tensors)
    assert calls == [12 + 5 + 8]
    for t, e in zip(tensors, expected):
        torch.testing.assert_close(t, e)  # one rank: the average is itself


def test_row_chunks_match_fsdp2s_split_and_pad_missing_ranks():
    tensor = torch.arange(10.0).reshape(5, 2)
    chunks = distributed.row_chunks(tensor, 4)  # torch.chunk: rows 2, 2, 1, and none for the last rank
    assert [c.shape[0] for c in chunks] == [2, 2, 1, 0]
    torch.testing.assert_close(torch.cat(chunks), tensor)


def test_a_long_run_name_fits_a_folder_name_and_stays_unique():
    cfg = OmegaConf.create({"run_name": None})
    overrides = [f"optim.lr={i}e-4_model.n_layer={i}" for i in range(40)]

    class Fake:
        runtime = SimpleNamespace(choices={"config": "shakespeare_char_sophiag"})

        def __init__(self, task):
            self.overrides = SimpleNamespace(task=task)

    from unittest import mock
    with mock.patch.object(build.HydraConfig, "initialized", return_value=True):
        with mock.patch.object(build.HydraConfig, "get", return_value=Fake(overrides)):
            long_name = build.run_name_of(cfg)
        with mock.patch.object(build.HydraConfig, "get", return_value=Fake(overrides[:-1] + ["seed=2"])):
            other = build.run_name_of(cfg)
        with mock.patch.object(build.HydraConfig, "get", return_value=Fake(["optim.lr=1e-3"])):
            short = build.run_name_of(cfg)
    assert len(long_name.encode()) <= 255 and len(other.encode()) <= 255
    assert long_name.startswith("shakespeare_char_sophiag_optim.lr=0e-4") and long_name != other
    assert short == "shakespeare_char_sophiag_optim.lr=1e-3"


def test_convert_checkpoint_exits_as_documented_when_there_is_nothing_to_convert(tmp_path):
    """Its docstring: 2 when no checkpoint of the source format exists."""
    proc = subprocess.run([sys.executable, str(REPO_DIR / "scripts" / "convert_checkpoint.py"), str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_the_runs_fields_are_typed():
    """build.Run names what each field holds: no field is typed `object`, which would hide what the loop relies on."""
    import dataclasses

    import build
    untyped = [f.name for f in dataclasses.fields(build.Run) if f.type is object or f.type == "object"]
    assert not untyped, untyped
