"""README claims that no other test pins, each against an independent reference: a closed form (FLOPs per token,
the clip rate from the logged norms), the data itself (the permutation, the validation sequences), a fake clock,
the composed preset (--help), the checkpoint's own weights (the end-of-run sample)."""
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_DIR, compose_config, flatten, read_metrics, train_in_process


def test_clip_rate_mfu_and_throughput_values(tmp_path, shakespeare_bins):
    """optim/clip_rate: the fraction of steps whose gradient norm exceeded grad_clip; mfu: tokens/s x FLOPs per
    token (PaLM's 6N + 12·L·C·T, N counted here from the shapes) / the peak (cpu_peak_flops=1e11 in TINY);
    throughput/tokens_per_s: the step's tokens over the time between log lines, evaluations left out."""
    grad_clip = 0.92  # between the gradient norms of these steps (0.85-1.0): some clip, some do not
    status, _ = train_in_process(["optim=adamw", "max_steps=12", f"grad_clip={grad_clip}"], tmp_path)
    assert status == 0
    logs = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    clipped = [float(r["grad_norm"] > grad_clip) for r in logs]  # log_interval=1: one step per line
    assert [r["optim/clip_rate"] for r in logs] == clipped and 0 < sum(clipped) < len(clipped)

    V, L, C, T = 50304, 2, 32, 32  # TINY: the padded vocabulary, 2 layers of width 32, block_size 32
    N = V * C + L * (12 * C * C + 2 * C) + C  # embedding/head (tied), attention 4C², MLP 8C², 2 LayerNorms; ln_f
    flops_per_token = 6 * N + 12 * L * C * T
    tokens_per_step = 4 * 32  # total_batch_size=4 sequences of block_size tokens
    training_seconds, wall_seconds = 0.0, 0.0
    for previous, r in zip(logs, logs[1:]):
        assert r["mfu"] == pytest.approx(r["throughput/tokens_per_s"] * flops_per_token / 1e11, rel=1e-9)
        if previous["step"] % 4 != 0:  # no evaluation between the two lines
            training_seconds += tokens_per_step / r["throughput/tokens_per_s"]
            wall_seconds += r["time/elapsed_s"] - previous["time/elapsed_s"]
    # the same time, but for the few microseconds between the clock's two readings at each line
    assert training_seconds == pytest.approx(wall_seconds, rel=0.1)


def test_validation_is_the_same_sequences_at_every_evaluation(tmp_path, shakespeare_bins):
    """With a learning rate too small to move the weights, every evaluation gives the loss of the initial model
    on the first eval_steps x micro_batch_size sequences of the validation stream, computed here."""
    from data.common import open_split
    from data.stream import SequenceStream
    from model import GPT, GPTConfig
    status, _ = train_in_process(["optim=adamw", "max_steps=8", "optim.lr=1e-12", "min_lr=0"], tmp_path)
    assert status == 0
    evaluations = {r["step"]: r["val/loss"] for r in read_metrics(tmp_path) if "val/loss" in r}
    assert list(evaluations) == [0, 4, 8]

    torch.manual_seed(1337)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    val = SequenceStream(open_split(shakespeare_bins, "val"), 32, 0)
    with torch.no_grad():
        losses = [model(*val.batch(first, 2, torch.device("cpu")))[1] for first in (0, 2)]  # eval_steps=2
    expected = torch.stack(losses).mean().item()
    assert list(evaluations.values()) == pytest.approx([expected] * 3, rel=1e-6)


def test_the_end_of_run_sample_comes_from_the_final_weights(tmp_path, shakespeare_bins):
    """A finished run prints 64 tokens sampled from its final weights after <|endoftext|> (seed, temperature
    0.8, top-k 200, GPT-2's 50257 tokens), and how to get more."""
    from data.common import get_gpt2_encoding
    from model import GPT, GPTConfig
    status, printed = train_in_process(["optim=adamw", "max_steps=4"], tmp_path)
    assert status == 0
    header = f"a sample (more: python scripts/sample.py out_dir={tmp_path}):\n"
    assert header in printed
    text = printed.split(header, 1)[1].strip()

    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    model.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"])
    model.eval()
    encoding = get_gpt2_encoding()
    generator = torch.Generator().manual_seed(1337)
    ids = model.generate(torch.tensor([[50256]]), 64, temperature=0.8, top_k=200, generator=generator,
                         vocab_size=50257)
    assert ids.shape == (1, 65) and int(ids[0, 1:].max()) < 50257
    assert text == encoding.decode(ids[0, 1:].tolist()).strip()


def test_time_left_leaves_evaluations_out(monkeypatch):
    """The time left is the steps left times a smoothed step time measured without the evaluations (a fake
    monotonic clock: steps of 1 s, an evaluation of 30 s in the second window)."""
    import metrics
    now = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    clock = metrics.Clock(elapsed_before=50.0, step=0)
    now[0] += 10.0  # 10 steps of 1 s
    assert clock.since_log(10) == (10, pytest.approx(10.0))
    assert clock.time_left(90) == pytest.approx(90.0)
    now[0] += 30.0  # an evaluation, which log_eval adds to eval_seconds
    clock.eval_seconds += 30.0
    now[0] += 20.0  # 10 steps of 2 s
    assert clock.since_log(20) == (10, pytest.approx(20.0))
    assert clock.time_left(80) == pytest.approx(80 * (0.7 * 1.0 + 0.3 * 2.0))  # the moving average
    assert clock.elapsed() == pytest.approx(50.0 + 60.0)  # the wall clock counts everything


def test_data_order_is_a_seeded_non_overlapping_permutation_per_epoch():
    """Each epoch hands out every sequence slot once (starts a whole number of sequences apart from the epoch's
    shift, so no two overlap), in an order and shift that depend on (seed, epoch) only."""
    from data.stream import SequenceStream
    tokens = np.arange(10 * 8 + 5, dtype=np.uint16)  # token i is i: a sequence's first input is its start
    stream = SequenceStream(tokens, 8, seed=3)
    n = stream.num_seqs
    epochs = []
    for epoch in range(3):
        x, y = stream.batch(epoch * n, n, torch.device("cpu"))
        starts = x[:, 0].numpy()
        shift = int(starts.min()) % 8
        assert sorted((starts - shift) // 8) == list(range(n)) and np.all((starts - shift) % 8 == 0)
        assert torch.equal(y, x + 1)  # targets: the inputs shifted by one token
        epochs.append(starts.tolist())
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled each epoch
    again = SequenceStream(tokens, 8, seed=3)  # a resumed process: position -> the same sequence
    assert again.batch(n + 2, 3, torch.device("cpu"))[0][:, 0].tolist() == epochs[1][2:5]
    assert SequenceStream(tokens, 8, seed=4).batch(0, n, torch.device("cpu"))[0][:, 0].tolist() != epochs[0]


def test_help_with_a_preset_shows_its_values():
    """`python train.py --help config=PRESET`: each knob's row shows the value the preset composes to."""
    result = subprocess.run([sys.executable, "train.py", "--help", "config=gpt2_small_adamw"], cwd=REPO_DIR,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if line.startswith("  ") and len(cells) == 4:
            rows.setdefault(cells[0], cells[2])  # the first table that names a key: the run's own section
    composed = flatten(compose_config("gpt2_small_adamw"))
    shown = {"optim.lr": "0.0006", "model.n_layer": "12", "total_batch_size": "480", "max_steps": "100000"}
    for key, text in shown.items():
        assert rows[key] == text and float(text) == composed[key], key
    for key in ("optim.lr", "optim.weight_decay", "min_lr", "model.n_embd", "model.block_size", "warmup_steps"):
        assert float(rows[key]) == pytest.approx(composed[key], rel=1e-12), key


@pytest.mark.slow
def test_the_default_out_dir_is_the_same_on_every_rank(shakespeare_bins):
    """out_dir unset: <repo>/out/<preset + overrides>, named without time or rank, so that the 2 ranks of a
    sharded run write their shards into one checkpoint. (The only test that writes into the repository's out/,
    which .gitignore covers; the folder is removed.)"""
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    # seed=PID: an override that gives the run a folder of its own
    # a preset and few overrides, not TINY's: the folder is named by them, and a file name has at most 255 bytes
    cmd = [*launcher, str(REPO_DIR / "train.py"), "config=shakespeare_adamw", "device=cpu", "micro_batch_size=4", "eval_steps=1",
           "warmup_steps=0", f"data.dir={shakespeare_bins}", "max_steps=1", "parallel=fsdp", f"seed={os.getpid()}"]
    result = subprocess.run(cmd, cwd=REPO_DIR, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    named = re.search(r"^run directory: (\S+)$", result.stdout, re.MULTILINE)
    assert named, result.stdout[-2000:] + result.stderr[-2000:]
    out_dir = Path(named.group(1))
    try:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert out_dir.parent == REPO_DIR / "out"
        assert f"seed={os.getpid()}" in out_dir.name  # the overrides name it, not a time
        shards = sorted(p.name for p in (out_dir / "ckpt.dcp").iterdir() if p.suffix == ".distcp")
        assert len(shards) == 2, shards  # one per rank, in the one folder
        assert math.isfinite(read_metrics(out_dir)[-1]["val/loss"])
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
