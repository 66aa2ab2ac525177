"""What only a CUDA GPU can show (skipped without one: the `cuda` marker, tests/conftest.py): the Sophia step's
hyper-parameters reach the GPU from pinned memory, step() / update_hessian() / sophia_stats() never wait for
the GPU, and the GNB estimator with bf16 logits."""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import sophia
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
    n = sophia.gnb_backward(ours, 0.5, torch.Generator(device=DEVICE).manual_seed(7))
    assert n == 2048 > sophia.GNB_ROWS and ours.grad.dtype == torch.bfloat16  # filled in chunks
    # the same labels: the same generator state through the same sampler, on fp32 probabilities
    probs = torch.softmax(logits0.view(-1, vocab), dim=-1, dtype=torch.float32)
    labels = sophia.sample_categorical(probs, torch.Generator(device=DEVICE).manual_seed(7))
    assert labels.unique().numel() > 100  # real draws, not one label
    peer = logits0.float().requires_grad_()
    (0.5 * F.cross_entropy(peer.view(-1, vocab), labels)).backward()
    torch.testing.assert_close(ours.grad.float(), peer.grad.bfloat16().float(), **BF16_TOL)


def test_gnb_with_bf16_logits_matches_the_gauss_newton_diagonal():
    # softmax regression logits_n = W x_n in bf16; Gauss-Newton diagonal of the mean loss, closed form from the
    # bf16 values: GN[v, d] = (1/N) Σ_n x_nd² p_nv (1 − p_nv). R replicas of W give R independent estimates.
    gen = torch.Generator().manual_seed(0)
    n, d, vocab, replicas = 5, 3, 4, 40_000
    x = torch.randn(n, d, generator=gen).to(DEVICE, torch.bfloat16)
    w = torch.randn(vocab, d, generator=gen).to(DEVICE, torch.bfloat16)
    xe, we = x.double(), w.double()
    probs = torch.softmax(xe @ we.T, dim=-1)
    gauss_newton = torch.einsum("nd,nv->vd", xe ** 2, probs * (1 - probs)) / n
    wr = w.expand(replicas, vocab, d).clone().requires_grad_()
    sophia.gnb_backward(torch.einsum("nd,rvd->rnv", x, wr), 1.0, torch.Generator(device=DEVICE).manual_seed(1))
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
    sophia.gnb_backward(logits, 1.0, torch.Generator(device=DEVICE).manual_seed(3))
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, _ = model(x)
    vocab = logits.size(-1)
    probs = torch.softmax(logits.detach().reshape(-1, vocab), dim=-1, dtype=torch.float32)  # as gnb_backward
    labels = sophia.sample_categorical(probs, torch.Generator(device=DEVICE).manual_seed(3))
    F.cross_entropy(logits.float().view(-1, vocab), labels).backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(ours[name]).all(), name
        # bf16 backward: equal up to bf16 round-off, relative to each tensor's scale
        torch.testing.assert_close(ours[name], p.grad, rtol=2e-2, atol=1e-2 * p.grad.abs().max().item(), msg=name)
