"""optim=muon: Muon (muon.py) on the blocks' matrices, AdamW on the rest, through train.py's loop.

References: torch.optim.Muon (bit for bit in bfloat16), the SVD (the float32 Newton-Schulz), torch's own Muon and
AdamW applied by hand to the same groups, an uninterrupted second run (tests/test_train.py's resume test runs muon
too), one process against two gloo ranks."""
import io
import sys

import pytest
import torch

from conftest import cpu_flags, read_metrics, run_train
from model import GPT, GPTConfig


def by_step(records, key):
    return {r["step"]: r[key] for r in records if key in r}


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    import muon
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True))
    muon_group, adamw_group = muon.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}  # the tied head appears once, as the embedding
    matrices = {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and n.endswith(".weight")
                and p.ndim == 2}
    assert {names[id(p)] for p in muon_group["params"]} == matrices and len(matrices) == 2 * 4  # qkv, proj, fc, proj
    assert {names[id(p)] for p in adamw_group["params"]} == set(names.values()) - matrices
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.bias"} <= \
        {names[id(p)] for p in adamw_group["params"]}
    assert (muon_group["weight_decay"], adamw_group["weight_decay"]) == (0.1, 0.0)  # model.py's grouping


def muon_alone(matrices, ns_dtype, **settings):
    """A MuonAdamW whose AdamW part holds one unused parameter: its Muon part steps `matrices` alone."""
    import muon
    return muon.MuonAdamW({"params": matrices, "weight_decay": 0.1}, {"params": [torch.zeros(1)], "weight_decay": 0.0},
                          adam_lr=1e-3, ns_steps=5, ns_dtype=ns_dtype, betas=(0.9, 0.95), eps=1e-8, **settings)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", ["match_rms_adamw", "original"])
def test_bfloat16_step_equals_torch_muon_bit_for_bit(nesterov, adjust_lr_fn):
    """Three steps on a tall, a wide and a square matrix (each orthogonalized on its short side), momentum and
    weight decay included: the same bits as torch.optim.Muon."""
    torch.manual_seed(0)
    shapes = [(96, 32), (32, 128), (32, 32)]
    ours, theirs = [[torch.randn(shape) for shape in shapes] for _ in range(2)]
    for a, b in zip(ours, theirs):
        b.data.copy_(a)
    settings = {"lr": 2e-2, "momentum": 0.95, "nesterov": nesterov, "adjust_lr_fn": adjust_lr_fn}
    optimizers = [muon_alone(ours, torch.bfloat16, **settings),
                  torch.optim.Muon(theirs, weight_decay=0.1, ns_steps=5, **settings)]
    for _ in range(3):
        grads = [torch.randn(shape) for shape in shapes]
        for params, optimizer in zip((ours, theirs), optimizers):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float32_newton_schulz_orthogonalizes_like_the_svd():
    """In float32 the update is U S' V^T of the input's SVD U S V^T, S' diagonal within the quintic's band (about
    0.7 to 1.2); bfloat16 gives the same matrix to within its rounding (a few %)."""
    import muon
    torch.manual_seed(0)
    for shape in [(96, 32), (32, 128)]:
        update = torch.randn(shape) @ torch.diag(torch.logspace(-2, 0, shape[1]))  # condition number 100
        u, _, vh = torch.linalg.svd(update.double(), full_matrices=False)
        orthogonal = muon.orthogonalize(update, 5, torch.float32)
        assert orthogonal.dtype == torch.float32 and orthogonal.shape == update.shape
        middle = u.T @ orthogonal.double() @ vh.T  # S': diagonal if the singular vectors are the input's
        off_diagonal = middle - torch.diag(torch.diagonal(middle))
        assert off_diagonal.norm() < 1e-4 * middle.norm()
        assert torch.diagonal(middle).min() > 0.6 and torch.diagonal(middle).max() < 1.25
        in_bf16 = muon.orthogonalize(update, 5, torch.bfloat16).float()
        assert (in_bf16 - orthogonal).norm() < 0.05 * orthogonal.norm()


@pytest.mark.parametrize("adjust_lr_fn", ["match_rms_adamw", "original"])
def test_two_steps_equal_torch_muon_and_adamw_by_hand(tmp_path, adjust_lr_fn, shakespeare_bins):
    """The loop's first two steps (the second at a lower lr of the cosine, with momentum and Adam's moments),
    rebuilt by hand from the same pieces with torch.optim.Muon and torch.optim.AdamW, each part at its own lr."""
    lr, adam_lr, min_lr = 2e-2, 3e-3, 2e-3
    result = run_train(["optim=muon", "max_steps=2", "grad_clip=0.5", f"optim.lr={lr}", f"optim.adam_lr={adam_lr}",
                        f"min_lr={min_lr}", "warmup_steps=0", f"optim.adjust_lr_fn={adjust_lr_fn}",
                        "optim.ns_dtype=bfloat16"], tmp_path)  # torch's Muon runs Newton-Schulz in bf16
    assert "optimizer muon (Newton-Schulz in bfloat16)" in result.stdout
    trained = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"]
    records = read_metrics(tmp_path)
    for key in ("step", "tokens", "train/loss", "lr", "grad_norm", "time/elapsed_s", "throughput/tokens_per_s",
                "mfu", "optim/clip_rate"):
        assert key in records[-2], key  # the last train line; the last line is the final evaluation
    assert "val/loss" in records[-1]

    from data.common import open_split
    from data.stream import SequenceStream
    torch.manual_seed(1337)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    stream = SequenceStream(open_split(shakespeare_bins, "train"), 32, 1337)
    matrices = [p for n, p in model.named_parameters() if n.startswith("transformer.h.") and n.endswith(
        ("c_attn.weight", "c_proj.weight", "c_fc.weight"))]
    rest = [p for p in model.parameters() if all(p is not q for q in matrices)]
    initial_matrices = {n: p.detach().clone() for n, p in model.named_parameters() if any(p is q for q in matrices)}
    muon = torch.optim.Muon(matrices, lr=lr, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5,
                            adjust_lr_fn=adjust_lr_fn)
    adamw = torch.optim.AdamW(rest, lr=adam_lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    cosine_middle = min_lr + 0.5 * (lr - min_lr)  # step 1 of a 2-step cosine without warmup
    for step, scale in enumerate((1.0, cosine_middle / lr)):
        for first in (0, 2):  # two micro-batches of 2 sequences, each loss scaled by 1/2
            x, y = stream.batch(4 * step + first, 2, torch.device("cpu"))
            _, loss = model(x, y)
            (loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        muon.param_groups[0]["lr"], adamw.param_groups[0]["lr"] = lr * scale, adam_lr * scale
        muon.step()
        adamw.step()
        model.zero_grad(set_to_none=True)
    assert by_step(records, "lr") == {1: pytest.approx(lr), 2: pytest.approx(cosine_middle)}
    for name, tensor in model.state_dict().items():
        if name in initial_matrices:
            # Newton-Schulz runs in bf16: a last-bit difference in an fp32 gradient (fused vs plain AdamW round the
            # step-1 embeddings apart by 1 ulp on some CPUs) can flip a bf16 rounding, which moves the whole
            # update by about one bf16 ulp (well under 2%); a wrong lr, momentum or scale moves it by far more
            reference_update, update = tensor - initial_matrices[name], trained[name] - initial_matrices[name]
            assert (update - reference_update).norm() < 0.02 * reference_update.norm(), name
        else:
            torch.testing.assert_close(trained[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_auto_newton_schulz_dtype_is_bf16_where_the_cpu_has_bf16_instructions():
    """auto: bf16 on CUDA and on a CPU whose flags (the kernel's, read independently of torch) include AVX-512 BF16
    or AMX BF16; float32 on any other CPU. A named dtype is taken as it is."""
    import muon
    flags = cpu_flags()
    expected = torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & flags else torch.float32
    assert muon.newton_schulz_dtype("auto", "cpu") is expected
    assert muon.newton_schulz_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16  # a device, not a GPU
    assert muon.newton_schulz_dtype("float32", "cuda") is torch.float32
    assert muon.newton_schulz_dtype("bfloat16", "cpu") is torch.bfloat16


def test_state_dict_round_trip_continues_exactly():
    """A copy loaded from the state_dict steps as the original, and the loop's lr setting reaches both parts."""
    from omegaconf import OmegaConf

    from build import build_optimizer
    cfg = OmegaConf.create({"optim": {"name": "muon", "lr": 1e-2, "adam_lr": 2e-3, "betas": [0.9, 0.95],
                                      "weight_decay": 0.1, "eps": 1e-8, "momentum": 0.95, "nesterov": True,
                                      "ns_steps": 5, "ns_dtype": "bfloat16", "adjust_lr_fn": "match_rms_adamw"}})
    torch.manual_seed(0)
    models = [GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randint(64, (2, 8))

    def step(model, optimizer, lr):
        for group in optimizer.param_groups:  # as train.py's train_step
            group["lr"] = lr * group.get("lr_scale", 1.0)
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first = build_optimizer(cfg, models[0])
    assert first.ns_dtype is torch.bfloat16  # the config's, as a torch dtype
    step(models[0], first, 1e-2)
    second = build_optimizer(cfg, models[1])
    saved = io.BytesIO()  # through bytes, as a checkpoint: a state_dict's tensors are the live state itself
    torch.save(first.state_dict(), saved)
    second.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=False))
    models[1].load_state_dict(models[0].state_dict())
    assert [g["lr_scale"] for g in second.param_groups] == [1.0, pytest.approx(0.2)]
    for model, optimizer in zip(models, (first, second)):
        step(model, optimizer, 5e-3)
        assert [g["lr"] for g in optimizer.param_groups[:1] + optimizer.adamw.param_groups] == \
            [5e-3, pytest.approx(1e-3)]
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    state = second.state_dict()["state"]
    assert set(state[0]) == {"momentum_buffer"} and set(state[len(state) - 1]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.slow
@pytest.mark.usefixtures("shakespeare_bins")
def test_two_ranks_equal_one_process(tmp_path):
    """torchrun with 2 gloo ranks sees the samples one process sees over two micro-batches; every rank's Muon
    orthogonalizes the same all-reduced gradient."""
    args = ["optim=muon", "max_steps=4", "total_batch_size=4", "micro_batch_size=2"]
    run_train(args, tmp_path / "one")
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    ddp = run_train(args, tmp_path / "two", launcher=launcher)
    assert "2 rank(s) x 1 micro-batch(es)" in ddp.stdout
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for key in ("train/loss", "val/loss", "grad_norm"):
        assert by_step(two, key) == pytest.approx(by_step(one, key), rel=1e-4), key
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=False)["model"]
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("args, message", [
    (["parallel=fsdp"], "optim=muon runs under parallel=ddp only"),
    (["optim.adjust_lr_fn=rms"], "optim.adjust_lr_fn=rms: expected match_rms_adamw|original"),  # by Hydra
    (["optim.ns_dtype=float16"], "optim.ns_dtype=float16: expected auto|bfloat16|float32"),  # by Hydra
    (["optim.ns_steps=0"], "optim.ns_steps=0: use 1 to 99"),
    (["optim.ns_steps=100"], "optim.ns_steps=100: use 1 to 99"),
    (["optim.adam_lr=0"], "optim.adam_lr=0.0: use a positive lr, or null"),
    (["optim.momentum=1.0"], "optim.momentum=1.0"),
])
@pytest.mark.usefixtures("shakespeare_bins")  # the session's corpus: no run reads the repository's data/
def test_bad_muon_settings_stop_before_any_work(tmp_path, args, message):
    result = run_train(["optim=muon", "max_steps=2", *args], tmp_path / "run", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "run").exists()
