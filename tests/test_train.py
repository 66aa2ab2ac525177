"""train.py end to end on the real Shakespeare bins and tiny models: real processes where the process matters
(signals, kill -9, torchrun, exit statuses), train() in the test process where only the numbers do.

References: an uninterrupted second run (resume), one process with gradient accumulation (DDP), and the loop
written out by hand: a step with torch's own AdamW, the official SophiaG loop (steps and Hessian refreshes)."""
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO_DIR, read_metrics, refusal_in_process, run_train, train_command, train_in_process


def by_step(records, key):
    return {r["step"]: r[key] for r in records if key in r}


@pytest.mark.parametrize("optim", ["adamw", "sophiag", "sophiah", "lion", "muon"])
@pytest.mark.usefixtures("shakespeare_bins")
def test_resume_continues_exactly(tmp_path, optim):
    """Stop after 4 of 8 steps, run the same command again: the losses equal an uninterrupted run's. With dropout:
    its masks (training and Hessian forwards) are seeded from (seed, step, micro-batch), not a running generator
    that a resumed process would restart."""
    common = [f"optim={optim}", "max_steps=8", "model.dropout=0.1"]
    common += ["optim.hess_interval=2"] if optim.startswith("sophia") else []
    # in this process: a resumed run builds everything from its checkpoint (and reseeds) as a new process does;
    # the signal, kill -9 and two-rank tests resume in new processes
    train_in_process(common, tmp_path / "whole")
    # the schedule depends on lr_decay_steps, not on where a run stops: stop at 4 with the same schedule
    train_in_process(common + ["max_steps=4", "lr_decay_steps=8"], tmp_path / "split")
    first_half = read_metrics(tmp_path / "split")
    assert max(r["step"] for r in first_half) == 4
    status, printed = train_in_process(common + ["lr_decay_steps=8"], tmp_path / "split")
    assert status == 0 and "resumed from" in printed and "at step 4" in printed

    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    for key in ("train/loss", "val/loss", "grad_norm", "lr"):
        assert by_step(split, key) == pytest.approx(by_step(whole, key), rel=1e-6, abs=1e-7), key
    # each step logged once, resume point included
    steps = [r["step"] for r in split if "train/loss" in r]
    assert steps == list(range(1, 9))
    if optim.startswith("sophia"):
        assert by_step(split, "optim/hessian_norm") == pytest.approx(by_step(whole, "optim/hessian_norm"), rel=1e-6)

    # the final weights are the same too
    a = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-6, atol=1e-7)


# ckpt_interval beyond the run: only the signal handler can write a checkpoint before the last step. The run is
# stopped a few steps after step 4, then resumed to step 24 (the same schedule: lr_decay_steps)
SIGNAL_ARGS = ["max_steps=400", "lr_decay_steps=400", "optim=adamw", "log_interval=1000", "ckpt_interval=1000"]
RESUMED_TO = 24


@pytest.fixture(scope="module")
def uninterrupted_weights(shakespeare_bins, tmp_path_factory):
    """The reference of the signal tests: the same run to step RESUMED_TO, never stopped; its final weights."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_train(SIGNAL_ARGS + [f"max_steps={RESUMED_TO}"], out)
    return torch.load(out / "ckpt.pt", weights_only=False)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGUSR1, 0), (signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_and_the_rerun_continues_exactly(tmp_path, signum, status, uninterrupted_weights):
    """SLURM's preemption notice (USR1), Ctrl-C (INT) or scancel (TERM): the run checkpoints at the end of the
    step, says at which step, exits 0 after USR1 (the requeued job goes on), 130 after Ctrl-C and 143 after
    SIGTERM (so that `train.py && next` stops), and the same command continues to the same weights as an
    uninterrupted run. log_interval and ckpt_interval are larger than the run, so acting on the signal cannot
    wait for a log step, and the checkpoint can only be the handler's."""
    out = tmp_path / "run"
    proc = subprocess.Popen(train_command(SIGNAL_ARGS, out), cwd=REPO_DIR, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:  # the loop is running: the evaluation after step 4
        lines.append(line)
        if line.startswith("step 4: val loss"):
            break
    proc.send_signal(signum)
    output = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == status, output
    assert "Traceback" not in output
    if signum == signal.SIGINT:
        assert "Ctrl-C: checkpointing at the end of this step" in output
    printed = int(re.search(r"stop signal received: checkpoint at step (\d+) in ", output).group(1))
    # the command that resumes: train.py with the same overrides, as typed (it resumes from out_dir by itself)
    command = shlex.join(["python", "train.py", *train_command(SIGNAL_ARGS, out)[2:]])
    assert f"{out / 'ckpt.pt'}; to resume: {command}\n" in output, output
    saved = torch.load(out / "ckpt.pt", weights_only=False)
    assert saved["step"] == printed and 4 <= printed < RESUMED_TO
    assert saved["data_state"]["train_seqs"] == printed * 4  # total_batch_size=4 sequences per step
    assert max(r["step"] for r in read_metrics(out)) <= printed

    run_train(SIGNAL_ARGS + [f"max_steps={RESUMED_TO}"], out)
    assert [r["step"] for r in read_metrics(out) if "val/loss" in r] == list(range(0, RESUMED_TO + 1, 4))  # once
    resumed = torch.load(out / "ckpt.pt", weights_only=False)["model"]
    for name, tensor in uninterrupted_weights.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
def test_kill_9_loses_only_the_steps_since_the_checkpoint_and_the_rerun_continues_exactly(
        tmp_path, uninterrupted_weights):
    """SIGKILL (no handler runs) after step 8's evaluation: the checkpoint of step 4 or 8 (ckpt_interval=4) is
    whole, the same command resumes from it, logs each step once, and ends at the uninterrupted run's weights."""
    out = tmp_path / "run"
    args = [a for a in SIGNAL_ARGS if not a.startswith("ckpt_interval=")] + ["ckpt_interval=4"]
    proc = subprocess.Popen(train_command(args, out), cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("step 8: val loss"):
            break
    proc.kill()
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(out / "ckpt.pt", weights_only=False)["step"]
    assert saved in (4, 8)

    resumed = run_train(args + [f"max_steps={RESUMED_TO}"], out)
    assert f"at step {saved}" in resumed.stdout
    assert [r["step"] for r in read_metrics(out) if "val/loss" in r] == list(range(0, RESUMED_TO + 1, 4))  # once
    weights = torch.load(out / "ckpt.pt", weights_only=False)["model"]
    for name, tensor in uninterrupted_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_a_second_ctrl_c_quits_at_once():
    """The first Ctrl-C asks for a checkpoint at the end of the step; the second interrupts wherever the run is
    (KeyboardInterrupt), for a step that hangs. In this process: two signals in a row cannot be timed against a
    step of milliseconds from outside."""
    from distributed import Env, StopSignals
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        stop = StopSignals(Env(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), dtype="float32"))
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # Python runs the handler between bytecodes of the main thread
        assert stop.agreed() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


# one micro-batch of 2 per rank on 2 ranks, two on one process; dropout on. The metrics are compared, not the
# weights bit for bit: the clip coefficient comes from a norm summed in another order on 2 ranks (~1e-7), which
# Sophia's sign-like step can turn into a full lr on a coordinate whose momentum is ~0
DDP_ARGS = ["optim=sophiag", "optim.hess_interval=2", "total_batch_size=4", "micro_batch_size=2", "model.dropout=0.1",
            "lr_decay_steps=8"]
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


@pytest.fixture(scope="module")
def one_process_run(shakespeare_bins, tmp_path_factory):
    """The reference of the two-rank tests: 8 steps in one process, accumulating two micro-batches."""
    out = tmp_path_factory.mktemp("one_process")
    run_train(DDP_ARGS + ["max_steps=8"], out)
    return out


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_their_checkpoint_resumes_on_one(tmp_path, one_process_run):
    """torchrun with 2 gloo ranks sees the samples and dropout masks one process sees over two micro-batches,
    in the training steps and the Hessian refreshes; and their ckpt.pt resumes on one process (another world
    size: the data counters count sequences) to the same losses as a run that never stopped."""
    out = tmp_path / "two"
    ddp = run_train(DDP_ARGS + ["max_steps=4"], out, launcher=TORCHRUN)
    assert "2 rank(s) x 1 micro-batch(es)" in ddp.stdout
    # only rank 0 wrote, into the one directory
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "config.yaml", "metrics.jsonl", "run.lock"]
    one, two = read_metrics(one_process_run), read_metrics(out)
    keys = ("train/loss", "val/loss", "grad_norm", "optim/hessian_norm", "optim/win_rate", "optim/win_rate/embedding",
            "optim/win_rate/blocks")
    for key in keys:
        expected = {step: v for step, v in by_step(one, key).items() if step <= 4}
        assert by_step(two, key) == pytest.approx(expected, rel=1e-4), key

    resumed = run_train(DDP_ARGS + ["max_steps=8"], out)
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout and "1 rank(s)" in resumed.stdout
    two = read_metrics(out)
    for key in keys:
        assert by_step(two, key) == pytest.approx(by_step(one, key), rel=1e-4), key
    expected = torch.load(one_process_run / "ckpt.pt", weights_only=False)
    assert torch.load(out / "ckpt.pt", weights_only=False)["data_state"] == expected["data_state"]


def test_one_step_equals_torch_adamw_by_hand(tmp_path, shakespeare_bins):
    """The loop's first step, rebuilt by hand from the same pieces with torch's reference AdamW."""
    # warmup_steps=0: with a warmup, step 0's learning rate is 0 (the official schedule) and nothing would move
    status, _ = train_in_process(["optim=adamw", "max_steps=1", "grad_clip=0.5", "optim.lr=1e-2", "warmup_steps=0"],
                                 tmp_path)
    assert status == 0
    trained = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"]

    from data.common import open_split
    from data.stream import SequenceStream
    from model import GPT, GPTConfig
    torch.manual_seed(1337)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    stream = SequenceStream(open_split(shakespeare_bins, "train"), 32, 1337)
    for first in (0, 2):  # two micro-batches of 2 sequences, each loss scaled by 1/2
        x, y = stream.batch(first, 2, torch.device("cpu"))
        _, loss = model(x, y)
        (loss / 2).backward()
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5) > 0.5  # clipping is exercised
    # the official grouping: the Linear weights of the blocks decay, nothing else
    decay = [p for n, p in model.named_parameters() if n.startswith("transformer.h.") and n.endswith(
        ("c_attn.weight", "c_proj.weight", "c_fc.weight"))]
    no_decay = [p for p in model.parameters() if all(p is not q for q in decay)]
    lr = 1e-2  # no warmup; the first step of the cosine is the peak
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    opt.step()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(trained[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_sophiag_run_equals_the_official_loop_by_hand(tmp_path, shakespeare_bins):
    """train.py's SophiaG against the official loop (Sophia's train_sophiag.py) written out here: every step
    clips and calls step(bs=B·T), B·T the tokens of the Hessian batch (hess_batch_size sequences of block_size);
    after steps k-1, 2k-1, ... (iter_num % k == k - 1) a refresh on a fresh batch of the Hessian stream:
    labels sampled from the model, their gradient clipped, update_hessian(). Dropout on: every forward seeded
    from (seed, step, micro-batch). The weights and the optimizer state must be equal."""
    import math

    import hessian
    import sophia
    from data.common import open_split
    from data.stream import SequenceStream
    from model import GPT, GPTConfig
    from train import random_seed

    steps, k, lr, min_lr, rho = 6, 3, 1e-2, 1e-4, 20.0
    args = ["optim=sophiag", f"max_steps={steps}", f"optim.hess_interval={k}", "warmup_steps=0",
            f"optim.lr={lr}", f"min_lr={min_lr}", f"optim.rho={rho}", "model.dropout=0.1", "grad_clip=1.0",
            "optim.hess_batch_size=2", f"log_interval={steps}"]  # half the training batch: bs counts the
    # Hessian batch's tokens; one log line after the last step, over both refreshes
    status, _ = train_in_process(args, tmp_path)
    assert status == 0
    trained = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    # a rho this large leaves coordinates unclipped, so that bs reaches the weights (a clipped one moves lr·sign(m))
    assert by_step(read_metrics(tmp_path), "optim/win_rate/blocks")[steps] > 0.01

    torch.manual_seed(1337)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.1))
    params = list(model.parameters())
    opt = sophia.SophiaG(model.configure_optimizer_groups(0.2), lr=lr, betas=(0.965, 0.99), rho=rho,
                         weight_decay=0.2)
    tokens = open_split(shakespeare_bins, "train")
    train_stream, hessian_stream = SequenceStream(tokens, 32, 1337), SequenceStream(tokens, 32, 1338)
    cpu = torch.device("cpu")
    model.train()
    hessian_grad_norms = []  # the Hessian batch's gradient norm before its clip, per refresh
    for step in range(steps):
        for group in opt.param_groups:  # no warmup: the cosine from lr to min_lr over the run
            group["lr"] = min_lr + 0.5 * (1 + math.cos(math.pi * step / steps)) * (lr - min_lr)
        for micro in range(2):  # total_batch_size=4 in two micro-batches of 2
            torch.manual_seed(random_seed(1337, step, micro, "dropout"))
            x, y = train_stream.batch(4 * step + 2 * micro, 2, cpu)
            _, loss = model(x, y)
            (loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(bs=2 * 32)  # the Hessian batch in tokens: hess_batch_size x block_size
        opt.zero_grad(set_to_none=True)
        if step % k == k - 1:
            # one micro-batch: the 2 sequences of the Hessian batch, the next ones of the Hessian stream
            torch.manual_seed(random_seed(1337, step, 0, "hessian_dropout"))
            labels = torch.Generator().manual_seed(random_seed(1337, step, 0, "hessian"))
            x, _ = hessian_stream.batch(2 * (step // k), 2, cpu)
            logits, _ = model(x)
            hessian.gnb_backward(logits, 1.0, labels)
            hessian_grad_norms.append(torch.nn.utils.clip_grad_norm_(params, 1.0).item())
            opt.update_hessian()
            opt.zero_grad(set_to_none=True)

    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(trained["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    for index, state in opt.state_dict()["state"].items():
        for key in ("exp_avg", "hessian", "step"):
            torch.testing.assert_close(trained["optimizer"]["state"][index][key], state[key], rtol=1e-5, atol=1e-9,
                                       msg=f"state[{index}].{key}")
    assert trained["data_state"] == {"train_seqs": 4 * steps, "hess_seqs": 2 * (steps // k)}
    # the two diagnostics of the Hessian refresh: mean norm over the refreshes since the last log line, and the
    # fraction of them where the clip at grad_clip fired
    [logged] = [r for r in read_metrics(tmp_path) if "optim/hessian_grad_norm" in r]
    assert len(hessian_grad_norms) == 2
    assert logged["optim/hessian_grad_norm"] == pytest.approx(sum(hessian_grad_norms) / 2, rel=1e-5)
    assert logged["optim/hessian_clip_rate"] == sum(n > 1.0 for n in hessian_grad_norms) / 2


def test_lr_schedule_matches_torch_schedulers():
    """The official schedule: lr·step/warmup (0 at step 0), cosine to min_lr, then min_lr. torch's LinearLR
    cannot start at a factor of 0, so the warmup's reference is LambdaLR with the official expression."""
    from omegaconf import OmegaConf

    import train
    cfg = OmegaConf.create({"warmup_steps": 5, "min_lr": 1e-4, "optim": {"lr": 1e-3}})
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1e-3)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: it / 5)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20 - 5, eta_min=1e-4)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[5])
    assert train.get_lr(0, cfg, 20) == 0.0
    for step in range(20):
        assert train.get_lr(step, cfg, 20) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), step
        opt.step()
        sched.step()
    assert train.get_lr(20, cfg, 20) == pytest.approx(1e-4) and train.get_lr(25, cfg, 20) == 1e-4


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint in place, whole."""
    from checkpoint import save_checkpoint
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.ones(3)})

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(3)})
    assert torch.load(path, weights_only=False)["step"] == 1


# the first two run as processes: a mistake found by the command line's check, one found by train()
@pytest.mark.parametrize("args, message, in_process", [
    (["no_such_knob=1"], "no_such_knob", False),
    (["total_batch_size=5", "micro_batch_size=2"], "pick a micro_batch_size that divides", False),
    (["config=no_such_preset"], "no_such_preset", True),
    (["data=openwebtext", "data.dir=/nonexistent/owt"], "prepare.py", True),
    (["optim.lr=-1"], "learning rate must be positive", True),
    (["optim=sophiag", "optim.rho=0"], "rho must be positive", True),
    (["optim=sophiag", "optim.hess_interval=0"], "hess_interval", True),
    (["optim=sophiag", "optim.betas=[0.9,1.0]"], "betas", True),
    (["optim=sophiag", "optim.hess_batch_size=3"], "hess_batch_size", True),
    (["optim=sophiag", "optim.hess_batch_size=1000000"], "exceed", True),
    (["optim=sophiah", "optim.hess_micro_batch_size=3"], "hess_micro_batch_size", True),
    (["dtype=float16"], "bfloat16", True),
    (["model.block_size=2000000"], "lower model.block_size", True),
])
@pytest.mark.usefixtures("shakespeare_bins")
def test_bad_input_stops_before_training(tmp_path, args, message, in_process):
    """The README's promise: one line naming the fix, on stderr, exit status 2, before any training."""
    if in_process:
        status, stderr = refusal_in_process(["max_steps=2"] + args, tmp_path / "run")
    else:
        result = run_train(["max_steps=2"] + args, tmp_path / "run", check=False)
        status, stderr = result.returncode, result.stderr
    assert status == 2, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.usefixtures("shakespeare_bins")
def test_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    """In this process (test_reliability runs damaged checkpoints as processes)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    status, stderr = refusal_in_process(["max_steps=2"], out)
    assert status == 2 and "cannot read the checkpoint" in stderr
    # a checkpoint of another model size
    (out / "ckpt.pt").unlink()
    assert train_in_process(["max_steps=2", "optim=adamw"], out)[0] == 0
    status, stderr = refusal_in_process(["max_steps=4", "optim=adamw", "model.n_embd=64"], out)
    assert status == 2 and "model.n_embd" in stderr and stderr.count("\n") == 1


# -----------------------------------------------------------------------------------------------------
# What a GPU run meets first, checked on the CPU: the device the suite runs on, bf16 where it is only emulated, a
# GPU run on a node without a GPU, and the Hessian refresh in micro-batches of its own.

def test_the_suites_train_py_runs_name_device_cpu_and_the_cuda_tests_device_cuda(tmp_path):
    """device=auto takes the GPU on a GPU node (bf16, compile), and there a 2-rank run asks for a second GPU: the
    suite's runs (conftest.train_command, which the SLURM tests' command line shares) say device=cpu, and a test
    marked cuda gets the GPU by putting device=cuda after it."""
    from config_schema import compose_config
    assert compose_config(None, train_command(["data.dir=x"], tmp_path)[2:]).device == "cpu"
    assert compose_config(None, train_command(["data.dir=x", "device=cuda"], tmp_path)[2:]).device == "cuda"


@pytest.fixture
def a_gpu(monkeypatch):
    """train.py's view of a CUDA GPU on this CPU machine: its name and compute capability as the test sets them,
    torch.cuda.is_bf16_supported() True as torch answers on any GPU since Volta (emulated bf16 included)."""
    gpu = {"name": "Tesla V100-SXM2-16GB", "capability": (7, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu["name"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)  # no global change here
    return gpu


def test_bf16_only_on_a_gpu_that_has_it_natively(a_gpu, capsys, tmp_path, shakespeare_bins):
    """A V100 (compute capability 7.0) emulates bf16, though torch.cuda.is_bf16_supported() says True: dtype=auto
    trains in float32 there and says so in one line; dtype=bfloat16 is refused with one line (exit 2). From
    compute capability 8.0 (A100), auto is bfloat16."""
    from config_schema import compose_config
    from distributed import setup_processes

    env = setup_processes(compose_config(None, ["device=cuda", "dtype=auto"]))
    assert env.device == torch.device("cuda:0") and env.dtype == "float32"
    [note] = capsys.readouterr().out.splitlines()
    assert "Tesla V100-SXM2-16GB (compute capability 7.0) has no native bf16" in note and "float32" in note
    status, stderr = refusal_in_process(["device=cuda", "dtype=bfloat16", "max_steps=2"], tmp_path / "run")
    assert status == 2 and stderr.count("\n") == 1, stderr
    assert "dtype=bfloat16" in stderr and "no native bf16" in stderr and "dtype=float32" in stderr
    assert not (tmp_path / "run").exists()

    a_gpu.update(name="NVIDIA A100-SXM4-80GB", capability=(8, 0))
    assert setup_processes(compose_config(None, ["device=cuda", "dtype=auto"])).dtype == "bfloat16"
    assert capsys.readouterr().out == ""


def test_a_gpt2_run_without_a_gpu_is_refused_unless_device_cpu_is_given(tmp_path, monkeypatch, shakespeare_bins):
    """A SLURM job without --gpus-per-node sees no GPU: config=gpt2_* stops with one line naming device=cpu, before
    any data or model is touched (the paper's data is not even prepared here). With device=cpu it goes on (and
    stops at the missing data)."""
    result = subprocess.run([sys.executable, "train.py", "config=gpt2_small_adamw", f"out_dir={tmp_path / 'run'}"],
                            cwd=REPO_DIR, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr.startswith("error: model=gpt2_small is a GPU run") and result.stderr.count("\n") == 1
    assert "no CUDA GPU is visible" in result.stderr and "add device=cpu" in result.stderr
    assert not (tmp_path / "run").exists()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, stderr = refusal_in_process(["config=gpt2_medium_sophiag", "device=auto"], tmp_path / "run")
    assert status == 2 and "model=gpt2_medium is a GPU run" in stderr
    status, stderr = refusal_in_process(["config=gpt2_medium_sophiag", "device=cpu", "data.dir=/nonexistent/owt"],
                                        tmp_path / "run")
    assert status == 2 and "GPU run" not in stderr and "prepare.py" in stderr


def hessian_after_one_refresh(tmp_path, name, args, monkeypatch):
    """Sophia's Hessian EMA after the refresh at step 0 (h = (1 - beta2) * the estimate), one flat tensor, and the
    number of backward passes the refresh ran (calls of the estimator's function in hessian.py)."""
    import hessian
    passes = []
    for function in ("gnb_backward", "hutchinson_backward"):
        original = getattr(hessian, function)
        monkeypatch.setattr(hessian, function, lambda *a, original=original, **k: passes.append(1) or original(*a, **k))
    status, _ = train_in_process(["max_steps=1", "optim.hess_interval=1", "warmup_steps=0", *args], tmp_path / name)
    assert status == 0
    state = torch.load(tmp_path / name / "ckpt.pt", weights_only=False)["optimizer"]["state"]
    return torch.cat([s["hessian"].flatten() for _, s in sorted(state.items())]), len(passes)


@pytest.mark.parametrize("optim", ["sophiag", "sophiah"])
@pytest.mark.usefixtures("shakespeare_bins")
def test_the_hessian_estimate_does_not_depend_on_hess_micro_batch_size(tmp_path, optim, monkeypatch):
    """A Hessian batch of 4 sequences run in one forward/backward, or in 4 or 2: the same labels (GNB) or probe
    (Hutchinson) for the chunk they split, each part weighted by its share of the mean, so the same estimate up to
    fp32 round-off. The reference that this can fail: other chunks (micro_batch_size=2: 2 chunks of 2, each with
    its own samples) give another estimate."""
    common = [f"optim={optim}", "total_batch_size=4", "optim.hess_batch_size=4"]
    whole, passes = hessian_after_one_refresh(tmp_path, "whole", [*common, "micro_batch_size=4"], monkeypatch)
    scale = whole.abs().max()
    assert scale > 0 and passes == 1
    for micro in (1, 2):
        split, passes = hessian_after_one_refresh(
            tmp_path, f"split{micro}", [*common, "micro_batch_size=4", f"optim.hess_micro_batch_size={micro}"],
            monkeypatch)
        assert passes == 4 // micro
        torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-5 * scale, msg=f"hess_micro_batch_size={micro}")
    other, _ = hessian_after_one_refresh(tmp_path, "other", [*common, "micro_batch_size=2"], monkeypatch)
    assert (other - whole).abs().max() > 1e-2 * scale
