"""parallel=fsdp (FSDP2): the same run as parallel=ddp, shard by shard.

References: a 2-rank DDP run of the same command (losses, gradient norms, Sophia's statistics and the final
weights must agree to fp32 round-off), and the optimizers on whole tensors (their updates on DTensor shards
must give the same tensors). This module is also the torchrun worker of the optimizer test (run as a script)."""
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_DIR, read_metrics, refusal_in_process, run_train, train_in_process

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def by_step(records, key):
    return {r["step"]: r[key] for r in records if key in r}


def sharded_weights(ckpt_dir):
    """The full weights of a sharded checkpoint directory, as a state_dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(ckpt_dir, ckpt_dir.parent / "full.pt")
    return torch.load(ckpt_dir.parent / "full.pt", weights_only=False)["model"]


# two micro-batches per rank (accumulation without communication), a Hessian batch of two as well, an evaluation
# that splits 2 + 1 over the ranks. No clipping: the clip coefficient comes from an fp32 norm whose round-off
# differs between whole tensors and shards (~1e-5 here), and the sign-like Sophia step turns that into a full
# lr on the odd coordinate whose momentum is ~0; clipping on shards is checked on its own in
# test_optimizers_on_shards_equal_whole_tensors. The weights agree to fp32 round-off, not bit for bit: FSDP
# reduce-scatters each micro-batch's gradients and adds the averages (fsdp_grad_sync=micro_batch), DDP adds the
# micro-batches before its all-reduce, the same sums in another order (up to ~3e-7 apart here, in the embedding
# rows of rare tokens, whose tiny gradients AdamW's normalisation scales up to a full step).
EQUAL_ARGS = ["max_steps=4", "total_batch_size=8", "micro_batch_size=2", "grad_clip=0", "eval_steps=3"]


# sophiah: its Hessian-vector products run on the gathered weights (distributed.hold_gathered)
@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adamw", "sophiag", "sophiah"])
@pytest.mark.usefixtures("shakespeare_bins")
def test_fsdp_equals_ddp_step_by_step(tmp_path, optim):
    args = [f"optim={optim}", *EQUAL_ARGS] + (["optim.hess_interval=2"] if optim.startswith("sophia") else [])
    run_train(args, tmp_path / "ddp", launcher=TORCHRUN)
    fsdp = run_train(args + ["parallel=fsdp"], tmp_path / "fsdp", launcher=TORCHRUN)
    assert "2 rank(s) x 2 micro-batch(es)" in fsdp.stdout
    ddp, fsdp = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "fsdp")
    keys = ["train/loss", "val/loss", "grad_norm"]
    if optim.startswith("sophia"):
        keys += ["optim/hessian_norm", "optim/win_rate", "optim/win_rate/embedding", "optim/win_rate/blocks"]
        assert by_step(ddp, "optim/win_rate")[4] > 0  # the Hessian was refreshed and is used
    # rel 1e-4: on CPU an fp32 norm over the 1.6M-entry embedding is itself off by ~2e-5, and the shards' norms
    # are summed in another order than the whole tensor's
    for key in keys:
        assert by_step(fsdp, key) == pytest.approx(by_step(ddp, key), rel=1e-4, abs=1e-7), key
    assert sorted(by_step(fsdp, "train/loss")) == [1, 2, 3, 4]

    # the final weights, put together from the shards
    expected = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=False)["model"]
    got = sharded_weights(tmp_path / "fsdp" / "ckpt.dcp")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


# -----------------------------------------------------------------------------------------------------
# One rank (force_distributed=true): the sharded code path, and its bf16 policy, on one GPU or CPU

@pytest.mark.slow  # bf16 on a CPU without bf16 instructions: a minute or two
@pytest.mark.usefixtures("shakespeare_bins")
def test_fsdp_on_one_rank_runs_the_sharded_path_and_its_bf16_policy(tmp_path):
    """parallel=fsdp force_distributed=true in one process: FSDP2 over a gloo group of one. In float32 it computes
    what the unsharded model computes (the same losses, Hessian and weights, to round-off); with dtype=bfloat16 it
    runs the mixed-precision policy a GPU run uses (bf16 gathered weights, fp32 shards and reductions): its losses
    are bf16 round-off away from the float32 ones, not equal to them."""
    common = ["optim=sophiah", "optim.hess_interval=1", "max_steps=2", "grad_clip=0", "eval_steps=1"]
    sharded = ["parallel=fsdp", "force_distributed=true"]
    status, plain = train_in_process(common, tmp_path / "plain")
    assert status == 0 and "device cpu float32\n" in plain
    status, fp32 = train_in_process(common + sharded, tmp_path / "fp32")
    assert status == 0 and "1 rank(s)" in fp32 and "device cpu float32, fsdp (sharded) over gloo" in fp32
    status, bf16 = train_in_process(common + sharded + ["dtype=bfloat16"], tmp_path / "bf16")
    assert status == 0 and "device cpu bfloat16, fsdp (sharded) over gloo" in bf16

    runs = {name: read_metrics(tmp_path / name) for name in ("plain", "fp32", "bf16")}
    for key in ("train/loss", "val/loss", "grad_norm", "optim/hessian_norm"):
        expected = by_step(runs["plain"], key)
        assert by_step(runs["fp32"], key) == pytest.approx(expected, rel=1e-5), key
        assert by_step(runs["bf16"], key) == pytest.approx(expected, rel=2e-2), key
    assert by_step(runs["bf16"], "train/loss") != by_step(runs["plain"], "train/loss")  # bf16 rounding shows
    expected = torch.load(tmp_path / "plain" / "ckpt.pt", weights_only=False)["model"]
    for name, tensor in sharded_weights(tmp_path / "fp32" / "ckpt.dcp").items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def memory_table(*args):
    """scripts/memory_table.py --measure under torchrun on 2 gloo ranks: (bytes per parameter of the gradients
    held on the largest rank, the whole line)."""
    result = subprocess.run([*TORCHRUN, str(REPO_DIR / "scripts" / "memory_table.py"), "--measure", "tiny", *args],
                            cwd=REPO_DIR, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    return float(line.split("gradients ")[1].split(",")[0]), line


@pytest.mark.slow
def test_fsdp_keeps_only_gradient_shards_across_micro_batches_by_default():
    """4 micro-batches on 2 ranks: with train.py's default fsdp_grad_sync each micro-batch's gradients are
    reduce-scattered, so a rank holds half of them in fp32 (2 bytes a parameter); deferring the sync to the last
    micro-batch (fsdp_grad_sync=step) accumulates them unsharded, 4 bytes a parameter on every rank, as DDP's."""
    from conftest import compose_config
    default = compose_config()["fsdp_grad_sync"]
    grads, line = memory_table("--accum", "4", "--grad-sync", default)
    assert grads == pytest.approx(2.0, abs=0.01), line
    assert "on 2 ranks, 4 micro-batch(es)" in line and "weights 2.00" in line and "optimizer state 4.00" in line
    assert memory_table("--accum", "4", "--grad-sync", "step")[0] == pytest.approx(4.0, abs=0.01)
    assert memory_table("--accum", "4", "--parallel", "ddp")[0] == pytest.approx(4.0, abs=0.01)


# -----------------------------------------------------------------------------------------------------
# Sharded checkpoints

def convert(run_dir, to="ddp", in_process=True):
    """scripts/convert_checkpoint.py RUN --to TO; its output. In this process unless in_process=False."""
    if in_process:
        from scripts.convert_checkpoint import main as convert_main
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            convert_main([str(run_dir), "--to", to])
        return printed.getvalue()
    result = subprocess.run([sys.executable, str(REPO_DIR / "scripts" / "convert_checkpoint.py"), str(run_dir),
                             "--to", to], cwd=REPO_DIR, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare_bins")
def test_resume_continues_exactly_on_another_world_size(tmp_path):
    """Stop a 2-rank run at step 4, go on with one process to 6, then with 2 ranks to 8: the same metrics and the
    same final weights and optimizer state as an uninterrupted 2-rank run (DCP reshards on load)."""
    common = ["optim=sophiag", "optim.hess_interval=2", "grad_clip=0", "parallel=fsdp", "lr_decay_steps=8"]
    run_train(common + ["max_steps=8"], tmp_path / "whole", launcher=TORCHRUN)
    split = tmp_path / "split"
    run_train(common + ["max_steps=4"], split, launcher=TORCHRUN)
    status, one = train_in_process(common + ["max_steps=6"], split)
    assert status == 0 and "resumed from" in one and "at step 4" in one
    assert "parallel=fsdp with one process: the model is not sharded" in one
    two = run_train(common + ["max_steps=8"], split, launcher=TORCHRUN)
    assert "at step 6" in two.stdout

    whole, parts = read_metrics(tmp_path / "whole"), read_metrics(split)
    for key in ("train/loss", "val/loss", "grad_norm", "optim/hessian_norm", "optim/win_rate"):
        expected = by_step(whole, key)
        got = {step: v for step, v in by_step(parts, key).items() if step in expected}  # + the evaluation at 6
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-7), key
    assert [r["step"] for r in parts if "train/loss" in r] == list(range(1, 9))  # each step logged once
    # the checkpoint is a link to one complete directory; the previous ones are gone
    assert os.readlink(split / "ckpt.dcp") in ("ckpt.dcp.a", "ckpt.dcp.b")
    assert sorted(p.name for p in split.iterdir() if p.name.startswith("ckpt")) == \
        sorted(["ckpt.dcp", os.readlink(split / "ckpt.dcp")])

    convert(tmp_path / "whole")
    convert(split)
    a = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=False)
    b = torch.load(split / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 8 and a["data_state"] == b["data_state"]
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][index][key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.usefixtures("shakespeare_bins")
def test_converter_and_the_other_format_refused_by_name(tmp_path):
    """A sharded checkpoint converts to ckpt.pt with the same weights (sample.py reads it) and resumes under
    parallel=ddp; a checkpoint of the other format is refused with the converter's command; and back."""
    out = tmp_path / "run"
    assert train_in_process(["optim=sophiag", "optim.hess_interval=2", "max_steps=2", "parallel=fsdp"], out)[0] == 0
    status, stderr = refusal_in_process(["optim=sophiag", "max_steps=4"], out)
    assert status == 2 and f"convert_checkpoint.py {out} --to ddp" in stderr

    assert "wrote" in convert(out, in_process=False)  # the command, as users run it
    from scripts.sample import load_run
    model, _ = load_run(out)
    sharded = sharded_weights(out / "ckpt.dcp")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, sharded[name]), name
    status, resumed = train_in_process(["optim=sophiag", "optim.hess_interval=2", "max_steps=4"], out)
    assert status == 0 and "resumed from" in resumed and "ckpt.pt at step 2" in resumed

    # now ckpt.pt (step 4) is ahead of ckpt.dcp (step 2): parallel=fsdp must not go back to step 2
    status, stderr = refusal_in_process(["optim=sophiag", "max_steps=6", "parallel=fsdp"], out)
    assert status == 2 and "newer than ckpt.dcp (step 2)" in stderr
    assert f"convert_checkpoint.py {out} --to fsdp" in stderr
    convert(out, to="fsdp")
    status, resumed = train_in_process(["optim=sophiag", "optim.hess_interval=2", "max_steps=6", "parallel=fsdp"], out)
    assert status == 0 and "ckpt.dcp at step 4" in resumed


def test_sharded_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A save that fails or is interrupted leaves the previous checkpoint in place, whole; the next save
    cleans up after it."""
    import torch.distributed.checkpoint as dcp

    from checkpoint import RunError, load_sharded, save_sharded, saved_step
    from distributed import Env
    from model import GPT, GPTConfig
    env = Env(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), dtype="float32")
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16))
    optimizer = torch.optim.AdamW(model.parameters())
    path = tmp_path / "ckpt.dcp"
    save_sharded(path, model, optimizer, {"step": 1}, env)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_save = dcp.save

    def crash(state_dict, checkpoint_id, **kwargs):
        Path(checkpoint_id).mkdir()
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_sharded(path, model, optimizer, {"step": 2}, env)
    assert saved_step(path) == 1
    fresh = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16))
    load_sharded(path, fresh, torch.optim.AdamW(fresh.parameters()))
    for name, tensor in saved.items():
        assert torch.equal(fresh.state_dict()[name], tensor), name

    def disk_full(state_dict, checkpoint_id, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", disk_full)
    with pytest.raises(RunError, match="the previous checkpoint is kept"):
        save_sharded(path, model, optimizer, {"step": 2}, env)
    assert saved_step(path) == 1

    monkeypatch.setattr(dcp, "save", real_save)
    save_sharded(path, model, optimizer, {"step": 3}, env)
    assert saved_step(path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt.dcp", os.readlink(path)])


# -----------------------------------------------------------------------------------------------------
# The optimizers on DTensor shards (a worker under torchrun, 2 gloo ranks)

# uneven first dimensions: 7 rows split 4 + 3, 1 row leaves rank 1 an empty shard
SHAPES = [(7, 3), (5,), (64, 4), (1, 3)]


def optimizer_cases():
    import sophia
    return {
        "sophiag": lambda params: sophia.SophiaG(params, lr=1e-2, rho=0.05, weight_decay=0.1),
        "sophiag_reference": lambda params: sophia.SophiaG(params, lr=1e-2, rho=0.05, weight_decay=0.1, fused=False),
        "sophiah": lambda params: sophia.SophiaH(params, lr=1e-2, rho=0.05, weight_decay=0.1),
        "lion": lambda params: sophia.Lion(params, lr=1e-2, weight_decay=0.1),
    }


def sharded_optimizer_worker():
    """Each optimizer steps whole tensors and their Shard(0) DTensors with the same gradients and Hessian
    estimates; the shards must put together the whole tensors, and sophia_stats must equal the whole one."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for name, make in optimizer_cases().items():
        torch.manual_seed(0)  # the same tensors on every rank
        whole = [torch.randn(shape, requires_grad=True) for shape in SHAPES]
        shards = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in whole]
        opts = [make(whole), make(shards)]
        norms = []
        for step in range(4):
            grads = [torch.randn(shape) for shape in SHAPES]
            if step == 2 and name != "lion":  # a NaN in rank 1's part of one estimate: both skip the refresh
                grads[2][40, 1] = float("nan")
            for params, opt in zip((whole, shards), opts):
                for p, g in zip(params, grads):
                    p.grad = distribute_tensor(g, mesh, [Shard(0)]) if params is shards else g.clone()
                if step == 1:  # clipping: the global norm over the shards (a replicated DTensor), as over whole tensors
                    norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
                    norms.append(norm.full_tensor() if params is shards else norm)
                if name != "lion" and step % 2 == 0:
                    applied = opt.update_hessian()
                    assert bool(applied) == (step != 2), (name, step)
                    for p, g in zip(params, grads):  # a fresh gradient for the step, finite
                        p.grad = distribute_tensor(g.nan_to_num(), mesh, [Shard(0)]) if params is shards \
                            else g.nan_to_num()
                opt.step(**({"bs": 3} if name != "lion" else {}))
            for p, q in zip(whole, shards):
                torch.testing.assert_close(q.full_tensor(), p.detach(), rtol=1e-6, atol=1e-7, msg=name)
        assert norms[0] > 1.0 and float(norms[1]) == pytest.approx(float(norms[0]), rel=1e-6)
        if name != "lion":
            parts = {"first": whole[:1], "rest": whole[1:]}
            expected = opts[0].sophia_stats(3, parts)
            got = opts[1].sophia_stats(3, {"first": shards[:1], "rest": shards[1:]})
            assert 0 < float(expected["optim/win_rate"]) < 1, expected
            for key, value in expected.items():
                assert float(got[key]) == pytest.approx(float(value), rel=1e-6), (name, key)
        if dist.get_rank() == 0:
            print(f"{name}: shards equal whole tensors")
    dist.destroy_process_group()


@pytest.mark.slow
def test_optimizers_on_shards_equal_whole_tensors():
    # PYTHONPATH: the script imports conftest, which imports the repo's modules before any path set-up can run
    result = subprocess.run([*TORCHRUN, __file__], cwd=REPO_DIR, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_DIR)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for name in optimizer_cases():
        assert f"{name}: shards equal whole tensors" in result.stdout


if __name__ == "__main__":  # under torchrun, from test_optimizers_on_shards_equal_whole_tensors
    sharded_optimizer_worker()
