"""Sharded parameters (FSDP2's DTensors): the optimizers update shards as they update whole tensors.

Reference: the optimizers on whole tensors (their updates on DTensor shards must give the same tensors, and
sophia_stats the same numbers). This module is also the torchrun worker of that test (run as a script)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_DIR

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


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


def test_optimizers_on_shards_equal_whole_tensors():
    result = subprocess.run([*TORCHRUN, __file__], cwd=REPO_DIR, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for name in optimizer_cases():
        assert f"{name}: shards equal whole tensors" in result.stdout


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_DIR))  # torchrun runs this file as a script: the repo's modules import
    sharded_optimizer_worker()
