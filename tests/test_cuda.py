"""What only a CUDA GPU can show (skipped without one: the `cuda` marker, tests/conftest.py): the fused Sophia
step compiled by Triton against the reference path (fp32 and bf16 parameters), its hyper-parameters reaching the
GPU from pinned memory, step() / update_hessian() / sophia_stats() never waiting for the GPU, the GNB and
Hutchinson estimators against closed forms on the GPU, our GPT against HF's logits on the GPU (fp32 without TF32,
bf16), and train.py on the GPU: resume equal to one run, two NCCL ranks equal to one process, DDP on one NCCL process
(torchrun, force_distributed=true) equal to the plain run, FSDP on one GPU equal to the plain run in fp32 and within
bf16 round-off of it with the bf16 policy; distributed.native_bf16 against torch's answer without emulation.

    python -m pytest -q -m cuda tests          # on a GPU node; scripts/gpu_check.py runs it too, and the paths
"""
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import hessian
import sophia
from conftest import read_metrics, run_train
from model import GPT, GPTConfig

# the fused path must really be compiled (Triton), not its eager fallback
pytestmark = [pytest.mark.cuda, pytest.mark.filterwarnings("error:.*torch.compile failed:UserWarning")]
DEVICE = torch.device("cuda:0")
BF16_TOL = {"rtol": 1.6e-2, "atol": 1e-5}  # torch.testing's defaults for bfloat16


def param_groups(seed=0):
    """Two groups (decay / no decay) with random gradients: five equal-size weights (a bundle of 4 and one)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    shapes = [(64, 32)] * 5 + [(100, 32), (32,), (32,)]
    params = [torch.randn(s, device=DEVICE, generator=gen).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=DEVICE, generator=gen)
    return [{"params": params[:6], "weight_decay": 0.1}, {"params": params[6:], "weight_decay": 0.0}]


def host_to_device_copies(fn):
    """The names of the host-to-device copies fn launches, as the CUDA profiler (CUPTI) reports them:
    'Memcpy HtoD (Pinned -> Device)' or 'Memcpy HtoD (Pageable -> Device)'."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.name.startswith("Memcpy HtoD")]


@pytest.mark.parametrize("cls", [sophia.SophiaG, sophia.SophiaH])
def test_hyperparameters_reach_the_gpu_from_pinned_memory(cls):
    # the profiler tells the two kinds of copy apart (the reference: a plain tensor is pageable)
    assert any("Pageable" in name for name in host_to_device_copies(
        lambda: torch.tensor([1.0, 2.0]).to(DEVICE, non_blocking=True)))
    opt = cls(param_groups(), lr=1e-3)
    opt.update_hessian()
    opt.step(bs=100)  # compiled here, outside the profile

    def refresh_and_step():
        opt.update_hessian()
        opt.step(bs=100)

    copies = host_to_device_copies(refresh_and_step)
    # one small hyper-parameter tensor per group in step(), one in update_hessian()
    assert len(copies) >= 3, copies
    assert all("Pinned" in name for name in copies), copies


@pytest.mark.parametrize("cls", [sophia.SophiaG, sophia.SophiaH])
def test_step_update_hessian_and_stats_never_wait_for_the_gpu(cls):
    opt = cls(param_groups(), lr=1e-3)
    opt.update_hessian()
    opt.step(bs=100)  # compiling may synchronize: before the debug mode
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        for lr in (1e-3, 5e-4, 1e-4):  # a schedule: a new lr every step
            opt.param_groups[0]["lr"] = lr
            applied = opt.update_hessian()
            opt.step(bs=100)
            stats = opt.sophia_stats(100)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(applied) and 0 <= stats["optim/win_rate"].item() <= 1  # reading them syncs: outside

    # the reference: the per-tensor path checks finiteness on the host, and the same mode catches that
    reference = cls(param_groups(seed=1), lr=1e-3, fused=False)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchronizing CUDA operation"):
            reference.update_hessian()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_gnb_with_bf16_logits_equals_cross_entropy_on_the_same_labels():
    vocab = 50304  # GPT-2's padded vocabulary: blocks of 192 in the sampler
    logits0 = (torch.randn(2, 1024, vocab, device=DEVICE) * 4).to(torch.bfloat16)
    ours = logits0.clone().requires_grad_()
    n = hessian.gnb_backward(ours, 0.5, torch.Generator(device=DEVICE).manual_seed(7))
    assert n == 2048 > hessian.GNB_ROWS and ours.grad.dtype == torch.bfloat16  # filled in chunks
    # the same labels: the same generator state through the same sampler, on fp32 probabilities
    probs = torch.softmax(logits0.view(-1, vocab), dim=-1, dtype=torch.float32)
    labels = hessian.sample_categorical(probs, torch.Generator(device=DEVICE).manual_seed(7))
    assert labels.unique().numel() > 100  # real draws, not one label
    peer = logits0.float().requires_grad_()
    (0.5 * F.cross_entropy(peer.view(-1, vocab), labels)).backward()
    torch.testing.assert_close(ours.grad.float(), peer.grad.bfloat16().float(), **BF16_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gnb_on_the_gpu_matches_the_gauss_newton_diagonal(dtype):
    # softmax regression logits_n = W x_n in dtype; Gauss-Newton diagonal of the mean loss, closed form from the
    # dtype's values: GN[v, d] = (1/N) Σ_n x_nd² p_nv (1 − p_nv). R replicas of W give R independent estimates.
    gen = torch.Generator().manual_seed(0)
    n, d, vocab, replicas = 5, 3, 4, 40_000
    x = torch.randn(n, d, generator=gen).to(DEVICE, dtype)
    w = torch.randn(vocab, d, generator=gen).to(DEVICE, dtype)
    xe, we = x.double(), w.double()
    probs = torch.softmax(xe @ we.T, dim=-1)
    gauss_newton = torch.einsum("nd,nv->vd", xe ** 2, probs * (1 - probs)) / n
    wr = w.expand(replicas, vocab, d).clone().requires_grad_()
    hessian.gnb_backward(torch.einsum("nd,rvd->rnv", x, wr), 1.0, torch.Generator(device=DEVICE).manual_seed(1))
    g_hat = replicas * wr.grad.double()
    torch.testing.assert_close((n * g_hat ** 2).mean(0), gauss_newton, rtol=0.05, atol=0)
    torch.testing.assert_close(g_hat.mean(0), torch.zeros_like(gauss_newton), rtol=0, atol=0.02)


def test_gnb_through_a_bf16_model_equals_the_official_recipe():
    """Under bf16 autocast, gnb_backward on the model's logits gives the parameter gradients of the official
    recipe: cross-entropy (in fp32) against labels sampled from the logits, backpropagated."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32)).to(DEVICE)
    x = torch.randint(0, 50304, (4, 32), device=DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, _ = model(x)
    assert logits.dtype == torch.bfloat16
    hessian.gnb_backward(logits, 1.0, torch.Generator(device=DEVICE).manual_seed(3))
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, _ = model(x)
    vocab = logits.size(-1)
    probs = torch.softmax(logits.detach().reshape(-1, vocab), dim=-1, dtype=torch.float32)  # as gnb_backward
    labels = hessian.sample_categorical(probs, torch.Generator(device=DEVICE).manual_seed(3))
    F.cross_entropy(logits.float().view(-1, vocab), labels).backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(ours[name]).all(), name
        # bf16 backward: equal up to bf16 round-off, relative to each tensor's scale
        torch.testing.assert_close(ours[name], p.grad, rtol=2e-2, atol=1e-2 * p.grad.abs().max().item(), msg=name)


# ---- the fused step against the reference path, on the GPU (Triton)


def sophia_trajectory(cls, dtype, fused, values=None):
    """Six steps with a Hessian refresh every second one, from fixed random gradients (rounded to `values`, then
    held in dtype) on the GPU: the final params, exp_avg and hessian, each flattened to one float64 vector. Five
    equal-size weights go through one bundled call (sophia.BUNDLE = 4) and one alone."""
    gen = torch.Generator().manual_seed(0)

    def randn(shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(values or dtype).to(DEVICE, dtype)

    shapes = [(40, 24)] * 5 + [(24,), (3, 4, 5)]
    params = [randn(s).requires_grad_() for s in shapes]
    opt = cls([{"params": params[:6], "weight_decay": 0.2}, {"params": params[6:], "weight_decay": 0.0}],
              lr=1e-2, rho=0.05, fused=fused)
    for step in range(6):
        if step % 2 == 0:
            for p in params:
                p.grad = randn(p.shape)
            opt.update_hessian()
        for p in params:
            p.grad = randn(p.shape, 0.1)
        opt.step(bs=100)
    tensors = {"param": [p.detach() for p in params], "exp_avg": [opt.state[p]["exp_avg"] for p in params],
               "hessian": [opt.state[p]["hessian"] for p in params]}
    return {kind: torch.cat([t.double().flatten() for t in ts]).cpu() for kind, ts in tensors.items()}


@pytest.mark.parametrize("cls", [sophia.SophiaG, sophia.SophiaH])
def test_fused_step_on_the_gpu_matches_the_reference_path_in_fp32(cls):
    fused, reference = (sophia_trajectory(cls, torch.float32, f) for f in (True, False))
    for kind in fused:  # the same formula: equal up to fp32 round-off
        torch.testing.assert_close(fused[kind], reference[kind], rtol=1e-5, atol=1e-6, msg=kind)


@pytest.mark.parametrize("cls", [sophia.SophiaG, sophia.SophiaH])
def test_fused_step_with_bf16_params_is_as_accurate_as_the_reference_path(cls):
    """bf16 parameters: the fused kernel rounds once per step, the reference after every op, so they drift apart
    by a few bf16 ulps. Each against the exact trajectory (float64 from the same bf16 values): the fused path's
    error is no larger than the reference's on average, and at worst within 1.5x of the reference's worst."""
    fused, reference = (sophia_trajectory(cls, torch.bfloat16, f) for f in (True, False))
    exact = sophia_trajectory(cls, torch.float64, False, values=torch.bfloat16)
    for kind in exact:
        fused_error, reference_error = (fused[kind] - exact[kind]).abs(), (reference[kind] - exact[kind]).abs()
        assert reference_error.max() > 0, kind  # bf16 rounding shows: the comparison can tell the paths apart
        assert fused_error.mean() <= reference_error.mean(), kind
        assert fused_error.max() <= 1.5 * reference_error.max(), kind


# ---- Hutchinson and our GPT on the GPU


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_on_the_gpu_matches_the_hessian_diagonal(probe):
    """loss = Σ_r ½ x_rᵀ A x_r: the Hessian is A for each of R replicas, so one call draws R probes; their mean is
    within 5σ of diag(A) (per-probe variance Σ_{j≠i} A_ij², + 2 A_ii² for Gaussian probes). One Rademacher probe
    is exact on a diagonal Hessian."""
    gen = torch.Generator().manual_seed(0)
    n, replicas = 10, 20_000
    q = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = q @ q.T / n + torch.diag(torch.linspace(1.0, 5.0, n, dtype=torch.float64))
    x = torch.randn(replicas, n, generator=gen).to(DEVICE).requires_grad_()
    loss = 0.5 * ((x @ a.to(DEVICE, torch.float32)) * x).sum()
    hessian.hutchinson_backward(loss, [x], 1.0, torch.Generator(device=DEVICE).manual_seed(2), probe=probe)
    estimate = x.grad.double().mean(0).cpu()
    variance = (a ** 2).sum(1) - torch.diag(a) ** 2 + (2 * torch.diag(a) ** 2 if probe == "gaussian" else 0)
    assert ((estimate - torch.diag(a)).abs() <= 5 * (variance / replicas).sqrt()).all()

    diag = torch.linspace(-2.0, 3.0, n, device=DEVICE)
    y = torch.randn(4, n, device=DEVICE, requires_grad=True)
    hessian.hutchinson_backward(0.5 * (diag * y * y).sum(), [y], 1.0, torch.Generator(device=DEVICE).manual_seed(3))
    torch.testing.assert_close(y.grad, diag.expand(4, n), rtol=0, atol=1e-6)


def test_gpt_on_the_gpu_gives_hf_logits_in_fp32_and_bf16():
    """The same weights in our GPT and HF's GPT2LMHeadModel (eager attention: HF's own arithmetic) on the GPU: fp32
    logits (TF32 off) equal up to round-off; bf16 ones no further apart than twice HF's own bf16-vs-fp32 noise."""
    from test_model import hf_reference  # a GPT2LMHeadModel with every weight random
    hf = hf_reference(True, vocab_size=50257, n_positions=64)
    ours = GPT.from_hf(hf).to(DEVICE).eval()
    hf = hf.to(DEVICE)
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.no_grad():
            theirs, mine = hf(idx).logits.float(), ours(idx)[0].float()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                theirs16, mine16 = hf(idx).logits.float(), ours(idx)[0].float()
    finally:
        torch.set_float32_matmul_precision(precision)
    assert (mine - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    hf_noise = ((theirs16 - theirs).norm() / theirs.norm()).item()
    assert 0 < hf_noise and ((mine16 - theirs16).norm() / theirs16.norm()).item() <= max(1e-2, 2 * hf_noise)


# ---- train.py on the GPU (compiled, bf16: device=auto, dtype=auto, compile=auto)


def by_step(records, key):
    return {r["step"]: r[key] for r in records if key in r}


COMPARED = ("train/loss", "val/loss", "grad_norm", "optim/hessian_norm")


@pytest.mark.usefixtures("shakespeare_bins")
def test_train_on_the_gpu_resumes_as_one_run(tmp_path):
    """4 + 4 steps of SophiaG equal 8 in one go on the GPU (bf16 round-off apart: the kernels' reduction order may
    differ between processes), each step logged once; the metrics hold the GPU's peak memory."""
    common = ["device=cuda", "optim=sophiag", "max_steps=8", "lr_decay_steps=8", "optim.hess_interval=2"]
    run_train(common, tmp_path / "whole")
    run_train(common + ["max_steps=4"], tmp_path / "split")
    resumed = run_train(common, tmp_path / "split")
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout and "device cuda" in resumed.stdout
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    for key in COMPARED:
        assert by_step(split, key) == pytest.approx(by_step(whole, key), rel=1e-2), key
    assert [r["step"] for r in split if "train/loss" in r] == list(range(1, 9))
    assert all(r["memory/reserved_mib"] >= r["memory/peak_mib"] > 0 for r in whole if "train/loss" in r)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (train.py puts rank r on cuda:r)")
@pytest.mark.usefixtures("shakespeare_bins")
def test_two_nccl_ranks_on_two_gpus_equal_one_process(tmp_path):
    args = ["device=cuda", "optim=sophiag", "max_steps=4", "optim.hess_interval=2", "total_batch_size=4",
            "micro_batch_size=2"]
    run_train(args, tmp_path / "one")
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    ddp = run_train(args, tmp_path / "two", launcher=launcher)
    assert "2 rank(s) x 1 micro-batch(es)" in ddp.stdout
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for key in COMPARED:
        assert by_step(two, key) == pytest.approx(by_step(one, key), rel=1e-2), key


# ---- the multi-GPU code paths on one GPU (force_distributed=true: a process group of one)


def test_native_bf16_is_torchs_answer_without_emulation():
    from distributed import native_bf16
    assert native_bf16(DEVICE) == torch.cuda.is_bf16_supported(including_emulation=False)


@pytest.mark.usefixtures("shakespeare_bins")
def test_ddp_on_one_nccl_process_equals_the_plain_run(tmp_path):
    """torchrun with one process and force_distributed=true: NCCL, DDP's hooks and compile under DDP (DDP's graph
    split by bucket), the same losses as the plain compiled run up to bf16 round-off."""
    args = ["device=cuda", "optim=sophiag", "max_steps=4", "optim.hess_interval=2", "total_batch_size=4",
            "micro_batch_size=2", "compile=true"]
    run_train(args, tmp_path / "plain")
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1")
    ddp = run_train(args + ["force_distributed=true"], tmp_path / "ddp", launcher=launcher)
    assert "1 rank(s)" in ddp.stdout and "ddp over nccl" in ddp.stdout
    plain, one = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "ddp")
    for key in COMPARED:
        assert by_step(one, key) == pytest.approx(by_step(plain, key), rel=1e-2), key


@pytest.mark.usefixtures("shakespeare_bins")
def test_fsdp_on_one_gpu_equals_the_plain_run_in_fp32_and_runs_its_bf16_policy(tmp_path):
    """parallel=fsdp force_distributed=true on one GPU: in float32 the same losses as the unsharded model (TF32 in
    both); with bf16 (the mixed-precision policy: bf16 gathered weights, fp32 shards and reductions; SophiaH's
    double backward on the gathered weights) within bf16 round-off of the float32 run."""
    common = ["device=cuda", "optim=sophiah", "max_steps=4", "optim.hess_interval=2", "compile=false"]
    sharded = ["parallel=fsdp", "force_distributed=true"]
    run_train(common + ["dtype=float32"], tmp_path / "plain")
    fp32 = run_train(common + sharded + ["dtype=float32"], tmp_path / "fp32")
    bf16 = run_train(common + sharded + ["dtype=bfloat16"], tmp_path / "bf16")
    assert "float32, fsdp (sharded) over nccl" in fp32.stdout and "bfloat16, fsdp (sharded) over nccl" in bf16.stdout
    plain = read_metrics(tmp_path / "plain")
    for key in COMPARED:
        assert by_step(read_metrics(tmp_path / "fp32"), key) == pytest.approx(by_step(plain, key), rel=1e-4), key
        assert by_step(read_metrics(tmp_path / "bf16"), key) == pytest.approx(by_step(plain, key), rel=3e-2), key
