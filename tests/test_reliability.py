"""Nothing lost, nothing silent: train.py as an operator meets it. Two processes on one run directory, a
diverging run, checkpoints that hold NaN, a full disk, unreadable files, and settings that would run
silently wrong. Real processes where the process matters (a lock, a divergence, a full disk, damaged files and
permissions); in the test process the runs that only set the scene (a good checkpoint to keep) and the refused
settings (test_train runs that path as a process). The references are an uninterrupted run and the files on disk."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CORPUS, REPO_DIR, read_metrics, refusal_in_process, run_train, train_command, train_in_process

pytestmark = pytest.mark.usefixtures("shakespeare_bins")


def start_train(args, out_dir):
    """train.py in a new process, its output unbuffered so that the test can follow it line by line."""
    return subprocess.Popen(train_command(args, out_dir), cwd=REPO_DIR, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def wait_for_line(proc, start):
    """Read proc's output up to the line that starts with `start` (the step is then done); returns what was read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(start):
            return "".join(lines)
    raise AssertionError(f"the run ended before a line starting with {start!r}:\n{''.join(lines)[-3000:]}")


def strict_json_lines(path):
    """metrics.jsonl parsed as strict JSON: NaN and Infinity are not JSON and fail here."""
    def refuse(constant):
        raise ValueError(f"{constant} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path):
    """The first process is paused (SIGSTOP: it holds its lock, as a slow one would) while the second tries the
    same folder, so that the first is still at an early step when it is stopped with SIGTERM."""
    out = tmp_path / "run"
    args = ["max_steps=400", "lr_decay_steps=400", "optim=adamw", "log_interval=1000"]
    first = start_train(args, out)
    try:
        wait_for_line(first, "step 4: val loss")
        first.send_signal(signal.SIGSTOP)
        second = run_train(args, out, check=False)
        assert second.returncode == 2
        assert f"is in use by another training process (PID {first.pid})" in second.stderr
        assert second.stderr.count("\n") == 1  # one line
    finally:
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
        output, _ = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, output  # the conventional status after SIGTERM
    steps_logged = [r["step"] for r in read_metrics(out)]
    assert len(steps_logged) == len(set(steps_logged))  # the refused process wrote nothing
    assert not list(out.glob("ckpt.pt.tmp*"))
    stopped_at = torch.load(out / "ckpt.pt", weights_only=False)["step"]
    assert stopped_at < 24, output
    # the lock went with the first process: the same command (to step 24 of the same schedule) resumes and finishes
    run_train(args + ["max_steps=24"], out)
    assert [r["step"] for r in read_metrics(out) if "val/loss" in r] == list(range(0, 25, 4))


@pytest.mark.slow
def test_a_diverging_run_stops_and_keeps_the_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert train_in_process(["max_steps=4", "optim=adamw"], out)[0] == 0  # a good checkpoint at step 4
    good = torch.load(out / "ckpt.pt", weights_only=False)
    # ckpt_interval=4: the saves it attempts while diverging must not replace the good checkpoint
    result = run_train(["max_steps=60", "optim=adamw", "optim.lr=1e6", "min_lr=0", "max_skipped_updates=5",
                        "ckpt_interval=4"], out, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "updates in a row skipped for non-finite gradients: the run diverged" in result.stderr
    assert "done" not in result.stdout
    kept = torch.load(out / "ckpt.pt", weights_only=False)
    assert kept["step"] == good["step"] == 4
    for name, tensor in good["model"].items():
        torch.testing.assert_close(kept["model"][name], tensor, rtol=0, atol=0)
    records = strict_json_lines(out / "metrics.jsonl")
    assert any(r.get("train/loss", 0) is None or r.get("grad_norm", 0) is None for r in records)  # NaN -> null


@pytest.mark.slow
def test_a_checkpoint_holding_nan_is_refused_naming_the_tensor(tmp_path):
    out = tmp_path / "run"
    assert train_in_process(["max_steps=4", "optim=sophiag"], out)[0] == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    index = sorted(ckpt["optimizer"]["state"])[1]
    ckpt["optimizer"]["state"][index]["hessian"].view(-1)[0] = float("nan")
    torch.save(ckpt, out / "ckpt.pt")
    result = run_train(["max_steps=8", "optim=sophiag"], out, check=False)
    assert result.returncode == 2
    assert f"holds NaN/inf in optimizer state[{index}].hessian" in result.stderr


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint"])
def test_an_empty_or_garbage_checkpoint_is_one_line(tmp_path, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(content)
    result = run_train(["max_steps=2"], out, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "cannot read the checkpoint" in result.stderr and f"({len(content)} bytes" in result.stderr
    assert "_use_new_zipfile_serialization" not in result.stderr


@pytest.mark.slow
def test_a_full_disk_keeps_the_good_checkpoint_and_says_so(tmp_path):
    """A real full disk: a tmpfs with room for one checkpoint and a half."""
    probe = tmp_path / "probe"
    assert train_in_process(["max_steps=2", "optim=adamw"], probe)[0] == 0
    size = (probe / "ckpt.pt").stat().st_size
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        out = disk / "run"
        result = run_train(["max_steps=4", "ckpt_interval=2", "optim=adamw"], out, check=False)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "no space left on the device" in result.stderr and "the previous checkpoint is kept" in result.stderr
        assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2
        assert not list(out.glob("ckpt.pt.tmp*"))  # the partial file is gone
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("args, message", [
    (["warmup_steps=20", "max_steps=10"], "warmup_steps=20 > max_steps=10"),
    (["warmup_steps=5", "lr_decay_steps=3", "max_steps=10"], "lr_decay_steps=3 < warmup_steps=5"),
    (["eval_steps=100000"], "set eval_steps <="),
    (["data.dir=/nonexistent/shakespeare"], "data.dir=/nonexistent/shakespeare does not exist"),
    (["model.n_head=3"], "model.n_embd=32 is not a multiple of model.n_head=3"),
    (["model.n_embd=-1"], "model.n_embd=-1: set it to 1 or more"),
    (["max_skipped_updates=0"], "max_skipped_updates=0"),
])
def test_settings_that_would_run_silently_wrong_are_refused(tmp_path, args, message):
    status, stderr = refusal_in_process(args, tmp_path / "run")  # test_train runs this path as a process
    assert status == 2 and message in stderr, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not Path("/nonexistent").exists()


def copy_of_the_corpus(where):
    where.mkdir(parents=True)
    for name in ("meta.json", "train.bin", "val.bin"):
        shutil.copy(CORPUS["dir"] / name, where / name)
    return where


def test_a_damaged_meta_json_names_the_file_and_the_command(tmp_path):
    data = copy_of_the_corpus(tmp_path / "data")
    (data / "meta.json").write_text("{ not json")
    result = run_train([f"data.dir={data}"], tmp_path / "run", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"{data / 'meta.json'} is not valid JSON" in result.stderr
    assert f"python data/<dataset>/prepare.py --out-dir {data}" in result.stderr


def without_root_powers():
    """A launcher under which file permissions apply: root bypasses them unless it drops these capabilities."""
    if os.geteuid() != 0:
        return (sys.executable,)
    drop = "-dac_override,-dac_read_search"
    return ("setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", sys.executable)


def test_an_unreadable_train_bin_is_one_line(tmp_path):
    data = copy_of_the_corpus(tmp_path / "data")
    (data / "train.bin").chmod(0o000)
    result = run_train([f"data.dir={data}"], tmp_path / "run", check=False, launcher=without_root_powers())
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot read the data in {data} (Permission denied" in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_read_only_out_dir_is_one_line(tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    result = run_train([], read_only / "run", check=False, launcher=without_root_powers())
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot write to out_dir={read_only / 'run'} (Permission denied)" in result.stderr
    assert result.stderr.count("\n") == 1


def test_progress_comes_back_from_its_checkpoint_entries_as_it_went_in(tmp_path):
    """Progress writes the checkpoint entries it reads back: every field survives a real save and load, and the
    seconds this process ran become the next process's elapsed_before."""
    import dataclasses

    from build import Progress
    from checkpoint import save_checkpoint
    progress = Progress(step=7, train_seqs=112, hess_seqs=30, elapsed_before=1.5, wandb_run_id="abc123")
    save_checkpoint(tmp_path / "ckpt.pt", progress.to_checkpoint(elapsed_s=9.25))
    back = Progress.from_checkpoint(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    assert back == dataclasses.replace(progress, elapsed_before=9.25)
