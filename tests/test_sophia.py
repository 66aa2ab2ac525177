"""Sophia, Lion and the Hessian estimators against formulas written here and closed forms."""

import io
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hessian
import sophia

# the fused path must really be compiled here, not its eager fallback
pytestmark = pytest.mark.filterwarnings("error:.*torch.compile failed:UserWarning")

# ---- the update rules, written plainly from the paper / the official code, one tensor at a time


def official_sophia_step(theta, m, h, g, *, lr, beta1, rho, bs, wd, maximize, clip_negative):
    g = -g if maximize else g
    theta = theta * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g
    denom = torch.clamp(rho * bs * h, min=1e-15) if clip_negative else rho * bs * h + 1e-15
    ratio = torch.clamp(m.abs() / denom, max=1.0)
    theta = theta - lr * torch.sign(m) * ratio
    return theta, m


def lion_step(theta, m, g, *, lr, beta1, beta2, wd):
    theta = theta * (1 - lr * wd)
    theta = theta - lr * torch.sign(beta1 * m + (1 - beta1) * g)
    m = beta2 * m + (1 - beta2) * g
    return theta, m


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 5, generator=gen, dtype=dtype).requires_grad_()
    bias = torch.randn(5, generator=gen, dtype=dtype).requires_grad_()
    return weight, bias


def random_grads(shapes, gen, dtype):
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


# ---- SophiaG / SophiaH trajectories


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("cls", [sophia.SophiaG, sophia.SophiaH])
def test_sophia_trajectory_matches_formula_float64(cls, maximize, fused):
    weight, bias = make_params(torch.float64)
    lr, betas, rho, bs = 0.05, (0.9, 0.95), 0.2, 20
    opt = cls([{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}],
              lr=lr, betas=betas, rho=rho, maximize=maximize, fused=fused)
    clip_negative = cls is sophia.SophiaH
    theta = [weight.detach().clone(), bias.detach().clone()]
    m = [torch.zeros_like(t) for t in theta]
    h = [torch.zeros_like(t) for t in theta]
    wds = [0.1, 0.0]
    gen = torch.Generator().manual_seed(1)
    win_rates = []
    for step in range(7):
        lr_now = lr * (1 - step / 10)  # a schedule: lr changes every step
        for group in opt.param_groups:
            group["lr"] = lr_now
        if step % 3 == 0:  # Hessian refresh, from its own "estimator" gradients
            estimates = random_grads([t.shape for t in theta], gen, torch.float64)
            weight.grad, bias.grad = (e.clone() for e in estimates)
            assert bool(opt.update_hessian())
            for i, e in enumerate(estimates):
                h[i] = betas[1] * h[i] + (1 - betas[1]) * (e if clip_negative else e * e)
        grads = random_grads([t.shape for t in theta], gen, torch.float64)
        weight.grad, bias.grad = (g.clone() for g in grads)
        opt.step(bs=bs)
        for i in range(2):
            theta[i], m[i] = official_sophia_step(theta[i], m[i], h[i], grads[i], lr=lr_now, beta1=betas[0],
                                                  rho=rho, bs=bs, wd=wds[i], maximize=maximize,
                                                  clip_negative=clip_negative)
        for p, t in zip((weight, bias), theta):
            torch.testing.assert_close(p.detach(), t, rtol=1e-12, atol=1e-14)
        unclipped = sum(int((mi.abs() < rho * bs * hi).sum()) for mi, hi in zip(m, h))
        stats = opt.sophia_stats(bs, parts={"weight": [weight], "bias": [bias]})
        assert stats["optim/win_rate"].dim() == 0
        assert stats["optim/win_rate"].item() == pytest.approx(unclipped / 35)
        for name, i, p in (("weight", 0, weight), ("bias", 1, bias)):  # per part: its own coordinates only
            own = int((m[i].abs() < rho * bs * h[i]).sum())
            assert stats[f"optim/win_rate/{name}"].item() == pytest.approx(own / p.numel())
        assert stats["optim/hessian_norm"].item() == pytest.approx(sum(hi.abs().sum().item() for hi in h))
        win_rates.append(unclipped / 35)
    # both branches of the clip were taken, and the state holds what the formula says
    assert 0 < max(win_rates) < 1
    for p, mi, hi in zip((weight, bias), m, h):
        state = opt.state[p]
        assert set(state) == {"step", "exp_avg", "hessian"} and state["step"].item() == 7
        torch.testing.assert_close(state["exp_avg"], mi, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state["hessian"], hi, rtol=1e-12, atol=1e-14)
    if clip_negative:
        assert (h[0] < 0).any()  # negative curvature was exercised


@pytest.mark.parametrize("cls", [sophia.SophiaG, sophia.SophiaH])
def test_fused_matches_reference_float32(cls):
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        # five equal-size weights: one bundle of sophia.BUNDLE = 4 through one compiled call, one alone
        params = [torch.randn(40, 24, requires_grad=True) for _ in range(5)] + [
            torch.randn(24, requires_grad=True), torch.randn(3, 4, 5, requires_grad=True)]
        opt = cls([{"params": params[:6], "weight_decay": 0.2}, {"params": params[6:], "weight_decay": 0.0}],
                  lr=1e-2, rho=0.05, fused=fused)
        run_steps(opt, params, torch.Generator().manual_seed(3), 6, bs=100)
        results.append([p.detach().clone() for p in params] +
                       [opt.state[p][k] for p in params for k in ("exp_avg", "hessian")])
    for fused_t, ref_t in zip(*results):
        torch.testing.assert_close(fused_t, ref_t, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_sophiah_rho_is_gamma_of_the_mean_loss_hessian(fused):
    """SophiaH's convention: rho = γ and step(bs=1), whatever the Hessian batch. The loss is a mean over B
    quadratics sharing the diagonal Hessian D (one coordinate negative), so hutchinson_backward's single
    Rademacher probe gives u⊙Du = D exactly, and the step must be the paper's rule with γ·h."""
    gen = torch.Generator().manual_seed(0)
    D = torch.tensor([4.0, -1.0, 0.5, 2.0, 1e-3, 3.0], dtype=torch.float64)
    centers = torch.randn(32, 6, generator=gen, dtype=torch.float64)  # B = 32 examples
    x = torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_()
    gamma, lr, wd, (beta1, beta2) = 0.5, 0.1, 0.1, (0.9, 0.95)
    opt = sophia.SophiaH([x], lr=lr, betas=(beta1, beta2), rho=gamma, weight_decay=wd, fused=fused)

    def mean_loss():
        return (0.5 * D * (x - centers) ** 2).sum(1).mean()

    theta, m, h = x.detach().clone(), torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    unclipped = torch.zeros(6, dtype=torch.bool)
    for step in range(8):
        if step % 2 == 0:
            x.grad = None
            hessian.hutchinson_backward(mean_loss(), [x], 1.0, gen)
            assert bool(opt.update_hessian())
            h = beta2 * h + (1 - beta2) * D
        x.grad = None
        mean_loss().backward()
        opt.step(bs=1)
        g = D * (theta - centers.mean(0))  # the mean loss's gradient, by hand
        theta = theta * (1 - lr * wd)
        m = beta1 * m + (1 - beta1) * g
        ratio = m / torch.clamp(gamma * h, min=1e-15)
        unclipped |= ratio.abs() < 1
        theta = theta - lr * torch.clamp(ratio, -1.0, 1.0)
        torch.testing.assert_close(x.detach(), theta, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.state[x]["hessian"], h, rtol=1e-12, atol=1e-14)
    assert unclipped.any() and not unclipped[1]  # both branches; negative curvature: sign steps only


def test_lion_has_a_module_of_its_own_and_sophia_still_names_it():
    """One concept per file: Lion is defined in lion.py, not sophia.py; the old import path gives the same class."""
    import lion
    from sophia import Lion
    assert Lion is lion.Lion and sophia.Lion is lion.Lion
    assert "class Lion" not in (Path(sophia.__file__)).read_text()


def test_lion_matches_formula_float64():
    weight, bias = make_params(torch.float64)
    lr, betas, wd = 0.01, (0.95, 0.98), 0.3
    opt = sophia.Lion([weight, bias], lr=lr, betas=betas, weight_decay=wd)
    theta = [weight.detach().clone(), bias.detach().clone()]
    m = [torch.zeros_like(t) for t in theta]
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        grads = random_grads([t.shape for t in theta], gen, torch.float64)
        weight.grad, bias.grad = (g.clone() for g in grads)
        opt.step()
        for i in range(2):
            theta[i], m[i] = lion_step(theta[i], m[i], grads[i], lr=lr, beta1=betas[0], beta2=betas[1], wd=wd)
    for p, t, mi in zip((weight, bias), theta, m):
        torch.testing.assert_close(p.detach(), t, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[p]["exp_avg"], mi, rtol=1e-12, atol=1e-14)
        assert len(opt.state[p]) == 1  # one buffer per parameter


def test_lr_schedule_and_new_shapes_do_not_recompile():
    # the fused step takes lr etc. as a tensor and sizes as runtime arguments: warm it up once, then a
    # changing lr and unseen sizes must reuse the compiled kernels (a recompile raises here, and the
    # fallback's warning is turned into an error)
    warm = [torch.randn(8, 3, requires_grad=True) for _ in range(4)] + [torch.randn(3, requires_grad=True)]
    opt = sophia.SophiaG(warm, lr=1e-3)
    for p in warm:
        p.grad = torch.randn_like(p)
    opt.update_hessian()
    opt.step()
    params = [torch.randn(17, 5, requires_grad=True) for _ in range(6)] + [torch.randn(9, requires_grad=True)]
    opt2 = sophia.SophiaG(params, lr=2e-3, rho=0.1, weight_decay=0.3)
    for p in params:
        p.grad = torch.randn_like(p)
    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        warnings.simplefilter("error")
        for lr in (1e-3, 5e-4, 1e-4):
            opt2.param_groups[0]["lr"] = lr
            opt2.update_hessian()
            opt2.step(bs=77)


# ---- robustness: bad input, non-finite Hessian estimates, checkpoints


BAD = [({"lr": 0.0}, "lr"), ({"lr": -1e-3}, "lr"), ({"betas": (1.0, 0.99)}, "betas"),
       ({"betas": (0.9, -0.1)}, "betas"), ({"weight_decay": -0.1}, "weight_decay")]
BAD_RHO = [({"rho": 0.0}, "rho"), ({"rho": -0.1}, "rho")]


@pytest.mark.parametrize("cls, kwargs, word", [(sophia.SophiaG, k, w) for k, w in BAD + BAD_RHO] +
                         [(sophia.SophiaH, k, w) for k, w in BAD + BAD_RHO] + [(sophia.Lion, k, w) for k, w in BAD])
def test_bad_hyperparameters_raise_naming_the_fix(cls, kwargs, word):
    with pytest.raises(ValueError, match=word) as err:
        cls([torch.zeros(2, requires_grad=True)], **kwargs)
    assert "e.g." in str(err.value)


def test_bad_probe_raises():
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="rademacher"):
        hessian.hutchinson_backward((x ** 3).sum(), [x], 1.0, probe="normal")


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("cls, bad", [(sophia.SophiaG, float("nan")), (sophia.SophiaG, float("inf")),
                                      (sophia.SophiaG, 1e30),  # finite, but its square overflows fp32
                                      (sophia.SophiaH, float("nan")), (sophia.SophiaH, float("-inf"))])
def test_non_finite_hessian_estimate_is_skipped(cls, bad, fused):
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = cls(params, lr=1e-3, fused=fused)
    for p in params:
        p.grad = torch.randn_like(p)
    assert bool(opt.update_hessian())
    before = [opt.state[p]["hessian"].clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[2] = bad  # one bad entry in one tensor spoils the whole refresh
    flag = opt.update_hessian()
    assert torch.is_tensor(flag) and flag.dtype == torch.bool and not bool(flag)
    for p, h in zip(params, before):
        assert torch.equal(opt.state[p]["hessian"], h)
    params[1].grad[2] = 0.5
    assert bool(opt.update_hessian())
    assert not torch.equal(opt.state[params[0]]["hessian"], before[0])
    assert all(torch.isfinite(opt.state[p]["hessian"]).all() for p in params)


def run_steps(opt, params, gen, n, bs=64):
    for step in range(n):
        if step % 2 == 0:
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.update_hessian()
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 0.1
        opt.step(bs=bs)


def test_state_dict_round_trip_continues_identically():
    params = list(make_params(torch.float32))
    opt = sophia.SophiaG(params, lr=1e-2, rho=0.1)
    run_steps(opt, params, torch.Generator().manual_seed(0), 3)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    run_steps(opt, params, torch.Generator().manual_seed(1), 3)

    buffer.seek(0)
    ckpt = torch.load(buffer)
    restored = [t.clone().requires_grad_() for t in ckpt["params"]]
    opt2 = sophia.SophiaG(restored, lr=1.0, rho=1.0)  # hyper-parameters come from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    run_steps(opt2, restored, torch.Generator().manual_seed(1), 3)
    for a, b in zip(params, restored):
        assert torch.equal(a.detach(), b.detach())
        assert torch.equal(opt.state[a]["hessian"], opt2.state[b]["hessian"])
        assert torch.equal(opt.state[a]["step"], opt2.state[b]["step"])


def test_loads_a_checkpoint_in_the_official_layout():
    # what the official SophiaG's state_dict() holds: 0-d float step, exp_avg, hessian; its group keys
    weight, bias = make_params(torch.float64)
    gen = torch.Generator().manual_seed(5)
    m = random_grads([weight.shape, bias.shape], gen, torch.float64)
    h = [x.abs() for x in random_grads([weight.shape, bias.shape], gen, torch.float64)]
    official = {
        "state": {i: {"step": torch.tensor(12.0), "exp_avg": m[i].clone(), "hessian": h[i].clone()} for i in range(2)},
        "param_groups": [{"lr": 0.01, "betas": (0.965, 0.99), "rho": 0.04, "weight_decay": 0.1,
                          "maximize": False, "capturable": False, "params": [0, 1]}],
    }
    opt = sophia.SophiaG([weight, bias])
    opt.load_state_dict(official)
    theta = [weight.detach().clone(), bias.detach().clone()]
    grads = random_grads([weight.shape, bias.shape], gen, torch.float64)
    weight.grad, bias.grad = (g.clone() for g in grads)
    opt.step(bs=480)
    for i, p in enumerate((weight, bias)):
        expected, _ = official_sophia_step(theta[i], m[i], h[i], grads[i], lr=0.01, beta1=0.965, rho=0.04,
                                           bs=480, wd=0.1, maximize=False, clip_negative=False)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)
        assert opt.state[p]["step"].item() == 13
    # and our own state_dict has the official layout
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "hessian"}
    assert set(sd["param_groups"][0]) == {"lr", "betas", "rho", "weight_decay", "maximize", "capturable", "params"}


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("cls", [sophia.SophiaG, sophia.SophiaH])
def test_capturable_changes_only_the_step_counter(cls, fused):
    # the official flag keeps the step count on the parameter's device as a (1,) tensor; the numbers
    # must be those of capturable=False
    results = []
    for capturable in (False, True):
        params = list(make_params(torch.float32))
        opt = cls(params, lr=1e-2, rho=0.1, capturable=capturable, fused=fused)
        run_steps(opt, params, torch.Generator().manual_seed(4), 5)
        results.append((params, opt))
    (plain_params, plain), (captured_params, captured) = results
    for a, b in zip(plain_params, captured_params):
        assert torch.equal(a.detach(), b.detach())
        for key in ("exp_avg", "hessian"):
            assert torch.equal(plain.state[a][key], captured.state[b][key])
        assert plain.state[a]["step"].shape == () and captured.state[b]["step"].shape == (1,)
        assert captured.state[b]["step"].item() == plain.state[a]["step"].item() == 5
    assert not torch.equal(plain_params[0].detach(), make_params(torch.float32)[0].detach())  # it moved


# ---- estimators


def test_hutchinson_converges_to_the_hessian_diagonal():
    # loss = ½ xᵀAx over x = (a.flatten(), b): the Hessian is A, so E[u⊙Au] = diag(A)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(10, 10, generator=gen, dtype=torch.float64)
    A = q @ q.T / 10 + torch.diag(torch.linspace(1.0, 5.0, 10, dtype=torch.float64))
    a = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def loss():
        x = torch.cat([a.flatten(), b])
        return 0.5 * x @ A @ x

    # per-probe variance of u_i(Au)_i: Σ_{j≠i} A_ij² (Rademacher), that + 2·A_ii² (Gaussian)
    off_diagonal = (A ** 2).sum(1) - torch.diag(A) ** 2
    for probe, variance in (("rademacher", off_diagonal), ("gaussian", off_diagonal + 2 * torch.diag(A) ** 2)):
        a.grad = b.grad = None
        n_probes = 3000
        for _ in range(n_probes):
            hessian.hutchinson_backward(loss(), [a, b], 1.0 / n_probes, gen, probe=probe)
        estimate = torch.cat([a.grad.flatten(), b.grad])
        assert ((estimate - torch.diag(A)).abs() < 5 * (variance / n_probes).sqrt()).all()

    # one Rademacher probe is exact on a diagonal Hessian (u⊙Du = D·u² = D)
    a.grad = b.grad = None
    D = torch.linspace(-2.0, 3.0, 10, dtype=torch.float64)
    x = torch.cat([a.flatten(), b])
    hessian.hutchinson_backward(0.5 * (D * x * x).sum(), [a, b], 2.0, gen)
    torch.testing.assert_close(torch.cat([a.grad.flatten(), b.grad]), 2.0 * D, rtol=1e-12, atol=0)


def test_gnb_matches_the_gauss_newton_diagonal_of_softmax_regression():
    # logits_n = W x_n, mean CE over N points. Gauss-Newton diagonal of the mean loss, closed form:
    #   GN[v, d] = (1/N) Σ_n x_nd² p_nv (1 − p_nv).
    # GNB: ĝ = ∇ mean CE against y ~ softmax; E[N·ĝ²] = GN. R replicas of W give R independent ĝ in one
    # call: gnb_backward averages over R·N predictions, so replica r's own ĝ is R·W.grad[r].
    gen = torch.Generator().manual_seed(0)
    N, D, V, R = 5, 3, 4, 40000
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    W = torch.randn(V, D, generator=gen, dtype=torch.float64)
    probs = torch.softmax(x @ W.T, dim=-1)                                  # (N, V)
    gauss_newton = torch.einsum("nd,nv->vd", x ** 2, probs * (1 - probs)) / N

    Wr = W.expand(R, V, D).clone().requires_grad_()
    logits = torch.einsum("nd,rvd->rnv", x, Wr)                             # (R, N, V)
    n = hessian.gnb_backward(logits, 1.0, gen)
    assert n == R * N
    g_hat = R * Wr.grad                                                     # (R, V, D)
    estimate = (N * g_hat ** 2).mean(0)
    torch.testing.assert_close(estimate, gauss_newton, rtol=0.05, atol=0)
    # the estimator's gradient has mean zero: E[onehot(y)] = p
    torch.testing.assert_close(g_hat.mean(0), torch.zeros_like(W), rtol=0, atol=0.02)


def test_gnb_gradient_equals_autograd_cross_entropy_on_the_same_labels():
    V = 1000  # blocks of 250 in the sampler
    logits0 = torch.randn(2, 7, V, generator=torch.Generator().manual_seed(0)) * 4
    ours = logits0.clone().requires_grad_()
    ours.grad = torch.ones_like(ours)  # gnb_backward accumulates, like loss.backward()
    n = hessian.gnb_backward(ours, 0.25, torch.Generator().manual_seed(7))
    assert n == 14
    # the same labels: the same generator state through the same sampler
    labels = hessian.sample_categorical(torch.softmax(logits0.view(-1, V), -1), torch.Generator().manual_seed(7))
    peer = logits0.clone().requires_grad_()
    (0.25 * F.cross_entropy(peer.view(-1, V), labels)).backward()
    torch.testing.assert_close(ours.grad, peer.grad + 1, rtol=1e-6, atol=1e-8)


def test_gnb_with_bf16_logits_needs_no_fp32_buffer_of_their_size_and_draws_the_same_labels(monkeypatch):
    """bf16 logits: the gradient is filled hessian.GNB_ROWS rows at a time, so the largest allocation (CPU
    profiler) is the bf16 gradient itself, not an (N, V) fp32 softmax; the result does not depend on the
    chunking, and equals F.cross_entropy's gradient against the labels the sampler draws from the whole."""
    from torch.profiler import ProfilerActivity, profile
    n, vocab = 64, 1000
    logits0 = (torch.randn(n, vocab, generator=torch.Generator().manual_seed(0)) * 4).bfloat16()
    grads, largest = [], []
    for rows in (n, 8):  # one chunk, then eight
        monkeypatch.setattr(hessian, "GNB_ROWS", rows)
        ours = logits0.clone().requires_grad_()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            hessian.gnb_backward(ours, 0.25, torch.Generator().manual_seed(7))
        largest.append(max(e.cpu_memory_usage for e in prof.events()))
        grads.append(ours.grad)
    assert largest == [n * vocab * 4, n * vocab * 2]  # an fp32 (N, V) softmax in one chunk; then only the bf16 grad
    assert grads[0].dtype == torch.bfloat16 and torch.equal(grads[0], grads[1])
    labels = hessian.sample_categorical(torch.softmax(logits0.float(), -1), torch.Generator().manual_seed(7))
    peer = logits0.float().requires_grad_()
    (0.25 * F.cross_entropy(peer, labels)).backward()
    torch.testing.assert_close(grads[1].float(), peer.grad.bfloat16().float(), rtol=1.6e-2, atol=1e-5)


def test_sample_categorical_draws_from_the_given_probabilities():
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(30, generator=gen, dtype=torch.float32)
    p[[0, 7, 8, 29]] = 0.0  # never drawn, including the first and last entries and a block edge
    p = p * 7.0             # rows need not sum to 1
    n = 200000
    draws = hessian.sample_categorical(p.expand(n, 30), gen, max_block=4)  # blocks of 3: both levels
    assert draws.shape == (n,) and draws.dtype == torch.int64
    freq = torch.bincount(draws, minlength=30).double() / n
    expected = (p / p.sum()).double()
    assert (freq[expected == 0] == 0).all()
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 5 * sigma + 1e-12).all()


def test_an_inductor_option_this_torch_lacks_is_left_out_not_a_fallback(monkeypatch):
    """On another torch, an option we pass may not exist: torch.compile rejects it outright (checked here),
    so the option is dropped with a warning and the fused step is still compiled, not run eagerly."""
    fake = "cpp.option_no_torch_has"
    with pytest.raises(RuntimeError, match=fake):
        torch.compile(lambda x: x + 1, options={fake: True})
    monkeypatch.setattr(sophia, "INDUCTOR_OPTIONS", {**sophia.INDUCTOR_OPTIONS, fake: True})
    sophia._inductor_options.cache_clear()
    sophia._compiled.cache_clear()
    try:
        with pytest.warns(UserWarning, match=f"inductor has no option {fake}"):
            assert sophia._inductor_options() == {k: v for k, v in sophia.INDUCTOR_OPTIONS.items() if k != fake}
        params = [torch.randn(6, 5, requires_grad=True), torch.randn(5, requires_grad=True)]
        opt = sophia.SophiaG(params, lr=1e-2)
        for p in params:
            p.grad = torch.randn_like(p)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            opt.update_hessian()
            opt.step()
        assert not opt._compile_failed and not [w for w in record if "torch.compile failed" in str(w.message)]
    finally:
        sophia._inductor_options.cache_clear()
        sophia._compiled.cache_clear()
        torch._dynamo.reset()  # the variant compiled with other options would count against dynamo's limit


# ---- the fused step's fallback: on compile errors only


def test_a_failure_after_a_kernel_ran_raises_and_updates_no_tensor_twice(monkeypatch):
    """A bundled call (4 equal-size tensors) runs a kernel per tensor; the second fails at its first launch (out of
    memory in Triton's autotuning, say) after the first has updated its tensor. The step must raise, not run the
    bundle again eagerly: the first tensor then holds exactly one update, the reference path's, the others none."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(8, 3, generator=gen).requires_grad_() for _ in range(4)]
    grads = [torch.randn(8, 3, generator=gen) for _ in range(4)]
    reference = [p.detach().clone().requires_grad_() for p in params]
    for p, q, g in zip(params, reference, grads):
        p.grad, q.grad = g.clone(), g.clone()
    before = [p.detach().clone() for p in params]
    sophia.SophiaG(reference, lr=1e-2, rho=0.05, weight_decay=0.1, fused=False).step(bs=10)

    def compiled(fn):  # stands in for torch.compile: the bundle's kernels, one tensor after another
        def run(*args):
            if fn is not sophia._sophia_update_bundle:
                return fn(*args)
            for i, tensors in enumerate(zip(*args[:4])):
                if i == 1:
                    raise torch.OutOfMemoryError("injected: the second kernel fails at its first launch")
                sophia._sophia_update(*tensors, args[4])
        return run

    monkeypatch.setattr(sophia, "_compiled", compiled)
    opt = sophia.SophiaG(params, lr=1e-2, rho=0.05, weight_decay=0.1)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        opt.step(bs=10)
    assert not opt._compile_failed
    torch.testing.assert_close(params[0].detach(), reference[0].detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[params[0]]["exp_avg"], (1 - 0.965) * grads[0], rtol=1e-6, atol=0)
    for p, b in zip(params[1:], before[1:]):
        assert torch.equal(p.detach(), b) and not opt.state[p]["exp_avg"].any()


def test_a_compile_error_falls_back_to_the_same_code_run_eagerly(monkeypatch):
    """No working C++ compiler (a real one: inductor's own check fails): one warning naming the error, then the
    step runs eagerly and lands where the reference path does."""
    import torch._inductor.config as inductor
    monkeypatch.setattr(inductor.cpp, "cxx", ("no-such-cxx-compiler",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)  # a cached kernel would need no compiler
    sophia._compiled.cache_clear()
    torch._dynamo.reset()
    try:
        gen = torch.Generator().manual_seed(1)
        params = [torch.randn(6, 5, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()]
        reference = [p.detach().clone().requires_grad_() for p in params]
        for p, q in zip(params, reference):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt = sophia.SophiaG(params, lr=1e-2, rho=0.05)
        with pytest.warns(UserWarning, match="torch.compile failed \\(InductorError") as record:
            opt.update_hessian()
            opt.step(bs=10)
        assert opt._compile_failed and len([w for w in record if "torch.compile failed" in str(w.message)]) == 1
        ref = sophia.SophiaG(reference, lr=1e-2, rho=0.05, fused=False)
        ref.update_hessian()
        ref.step(bs=10)
        for p, q in zip(params, reference):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    finally:
        sophia._compiled.cache_clear()
        torch._dynamo.reset()
