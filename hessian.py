"""
The Hessian estimators that refresh Sophia's diagonal Hessian every k steps, chosen once when the run is built:
Gauss-Newton-Bartlett (SophiaG: labels sampled from the model) and Hutchinson (SophiaH: u * (H u) through a
double backward). Each holds what it works on (the model as trained and as built, the trainable tensors, the
process group, the micro-batch size), fills p.grad with its estimate over one micro-batch at a time, and finish()
averages it over the ranks the way its parallelism needs.
"""

import torch

from config_schema import ConfigError
from distributed import average_over_ranks, clip_gradients, gradient_sync, hold_gathered, shard_estimates


def micro_batches(x, y, size):
    """A chunk's sequences x, y (B, T) in micro-batches of `size`, each with its share of the chunk's mean: the
    pieces' losses, weighted so, add up to the chunk's mean loss."""
    return [(xs, ys, xs.shape[0] / x.shape[0], start * x.shape[1])
            for start, xs, ys in zip(range(0, x.shape[0], size), x.split(size), y.split(size))]


class GaussNewtonBartlett:
    """B * grad(L(sampled labels))^2: the gradient of the mean cross-entropy against labels sampled from the
    model's softmax; DDP/FSDP average it over the ranks, and the optimizer squares the average."""

    def __init__(self, grad_clip, model, raw_model, params, env, micro_batch_size):
        self.grad_clip = grad_clip
        self.model, self.raw_model, self.params, self.env = model, raw_model, params, env
        self.micro_batch_size = micro_batch_size

    def begin(self):
        pass

    def add(self, x, y, scale, generator, last):
        """One chunk x, y (B, T): its labels are drawn from one uniform per prediction, so the forward and backward
        may run in micro-batches of optim.hess_micro_batch_size and still sample the same labels."""
        uniform = torch.rand(x.numel(), 1, dtype=torch.float64, device=x.device, generator=generator)  # (B·T, 1)
        pieces = micro_batches(x, y, self.micro_batch_size)
        for i, (xs, _, share, first_row) in enumerate(pieces):
            with gradient_sync(self.model, self.raw_model, self.env, last and i == len(pieces) - 1):
                with self.env.autocast():
                    logits, _ = self.model(xs)  # (b, T, vocab): labels are sampled from these
                gnb_backward(logits, scale * share, uniform=uniform[first_row:first_row + xs.numel()])

    def finish(self):
        """Clip the Hessian batch's gradient as the official loop does; returns its norm before the clip."""
        return clip_gradients(self.params, self.grad_clip if self.grad_clip > 0 else float("inf"))


class Hutchinson:
    """u * (H u) with random probes u, through a double backward on the plain module (no compile, no DDP hooks)
    with the math attention kernel (the fused kernels have no double backward). One probe per chunk, shared by
    its micro-batches (optim.hess_micro_batch_size), so that they add up to the chunk's estimate. Under FSDP the
    double backward runs on the gathered weights (bf16 under dtype=bfloat16), so each rank sums full-size
    estimates, in fp32, then one reduce-scatter averages them and leaves each rank its slice."""

    def __init__(self, probe, raw_model, params, env, micro_batch_size):
        self.probe = probe
        self.raw_model, self.params, self.env = raw_model, params, env
        self.micro_batch_size = micro_batch_size

    def begin(self):
        self.estimates = None
        if self.env.sharded:
            hold_gathered(self.raw_model, True)

    def add(self, x, y, scale, generator, last):
        probes = None
        for xs, ys, share, _ in micro_batches(x, y, self.micro_batch_size):
            with math_attention(), self.env.autocast():
                _, loss = self.raw_model(xs, ys)
            # under FSDP the parameters are the gathered weights now, in the order of self.params
            params = list(self.raw_model.parameters()) if self.env.sharded else self.params
            probes = hutchinson_backward(loss, params, scale * share, generator, self.probe, probes)
            if self.env.sharded:  # FSDP would take the gathered weights' .grad for its own accumulation: keep them
                grads = [q.grad.float() if q.grad is not None else torch.zeros(q.shape, device=q.device)
                         for q in params]
                self.estimates = grads if self.estimates is None else [a + b for a, b in zip(self.estimates, grads)]
                for q in params:
                    q.grad = None

    def finish(self):
        if self.env.sharded:
            hold_gathered(self.raw_model, False)
            shard_estimates(self.params, self.estimates, self.env)
            self.estimates = None
        elif self.env.distributed:  # the DDP hooks did not run: average u*(Hu) over the ranks here
            average_over_ranks([p.grad for p in self.params if p.grad is not None])
        return None


def math_attention():
    """The flash and memory-efficient attention kernels have no double backward; the math kernel has."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def build_estimator(cfg, model, raw_model, params, env, micro_batch_size):
    """The estimator of optim=sophiag or sophiah; None for the other optimizers. model: raw_model as the
    training step runs it (compiled, DDP-wrapped); params: the trainable tensors, each once."""
    if cfg.optim.name == "sophiag":
        return GaussNewtonBartlett(cfg.grad_clip, model, raw_model, params, env, micro_batch_size)
    if cfg.optim.name == "sophiah":
        return Hutchinson(cfg.optim.probe, raw_model, params, env, micro_batch_size)
    return None


def check_double_backward(model, device, autocast):
    """SophiaH needs Hessian-vector products: fail at start, not at the first refresh."""
    idx = torch.zeros(1, 8, dtype=torch.long, device=device)
    try:
        with math_attention(), autocast:
            _, loss = model(idx, idx)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, create_graph=True)
        torch.autograd.grad(sum(g.sum() for g in grads), params, allow_unused=True)
    except RuntimeError as e:
        raise ConfigError(f"optim=sophiah needs double backward through the model, which failed: {e}. "
                          f"Use optim=sophiag, or compile=false and device=cpu to check") from None


# ----------------------------------------------------------------------------------------------------
# The estimates' math, which the estimators above run. Each function ACCUMULATES into p.grad, like
# loss.backward(): from zeroed grads, call it once per micro-batch of the Hessian batch with scale = 1 / (number
# of those micro-batches), so that p.grad holds the estimate for the whole batch, then optimizer.update_hessian().


def sample_categorical(probs, generator=None, max_block=256, uniform=None):
    """One draw per row of probs (N, V), rows non-negative (they need not sum to 1): returns (N,) int64.
    uniform: (N, 1) float64 draws in [0, 1) to use instead of drawing them from generator.

    Inverse CDF in two levels, so that no (N, V) cumulative sum is written: choose a block of
    `block` consecutive entries by the block masses (N, V/block), then an entry inside the chosen
    block. block = the largest divisor of V up to max_block (192 for V = 50304). The cumulative sums
    are in float64 (they are small), so each entry is drawn with its float32 probability up to the
    fp32 round-off of its block's sum; an entry of probability 0 is never drawn (up to that round-off).
    Not torch.multinomial or distributions.Categorical: both are far slower on GPT-2-sized rows."""
    n, v = probs.shape
    block = max(d for d in range(1, min(v, max_block) + 1) if v % d == 0)
    blocks = probs.view(n, v // block, block)                               # (N, nb, block)
    block_mass = blocks.sum(-1).double()           # (N, nb); summed in fp32 (fp64 is much slower)
    block_end = block_mass.cumsum(-1)                                       # (N, nb)
    u = torch.rand(n, 1, dtype=torch.float64, device=probs.device, generator=generator) if uniform is None else uniform
    u = u * block_end[:, -1:]                                               # (N, 1) in [0, row sum)
    b = torch.searchsorted(block_end, u, right=True).clamp_(max=v // block - 1)   # (N, 1) block index
    u = u - (block_end.gather(1, b) - block_mass.gather(1, b))              # mass left inside block b
    inside = blocks.gather(1, b[:, :, None].expand(n, 1, block)).squeeze(1)  # (N, block)
    inside_end = inside.to(torch.float64).cumsum(-1)
    j = torch.searchsorted(inside_end, u, right=True).clamp_(max=block - 1)  # (N, 1) entry in block
    return (b * block + j).squeeze(1)


def gnb_backward(logits, scale, generator=None, uniform=None):
    """Gauss-Newton-Bartlett: backprop scale · mean CE(logits, ŷ) with ŷ ~ softmax(logits).

    logits: (..., V) with the graph attached (e.g. (B, T, V) from the model). generator: a
    torch.Generator on logits' device, or None for the default one. uniform: (N, 1) float64 draws in
    [0, 1), one per prediction, to use instead of drawing them from generator (a batch split into
    several calls then gets the labels it would get in one). Returns the number of predictions
    N = logits.numel() // V. The gradient is formed directly, d/dlogits = scale·(softmax − onehot(ŷ))/N,
    written in place into the fp32 softmax buffer: one softmax, no log-softmax, no second (N, V) buffer.
    Lower-precision (bf16) logits get a gradient of their own dtype, filled GNB_ROWS rows at a time, so
    that no (N, V) fp32 buffer exists: a refresh then needs no more memory than a training step's
    cross-entropy. The labels do not depend on the chunking. Under DDP run this through the DDP model so
    the gradients are averaged before update_hessian() squares them."""
    vocab = logits.size(-1)
    with torch.no_grad():
        flat = logits.detach().reshape(-1, vocab)                                # (N, V)
        n = flat.size(0)
        if uniform is None:
            uniform = torch.rand(n, 1, dtype=torch.float64, device=flat.device, generator=generator)
        grad = None if flat.dtype == torch.float32 else torch.empty_like(flat)
        step = n if grad is None else GNB_ROWS
        for start in range(0, n, step):
            rows = slice(start, start + step)
            probs = torch.softmax(flat[rows], dim=-1, dtype=torch.float32)      # (rows, V)
            labels = sample_categorical(probs, uniform=uniform[rows])           # (rows,)
            probs.mul_(scale / n)                                               # now scale·softmax/N
            probs[torch.arange(probs.size(0), device=probs.device), labels] -= scale / n  # − scale·onehot/N
            if grad is None:
                grad = probs  # fp32: the softmax buffer is the gradient
            else:
                grad[rows] = probs
    logits.backward(grad.view(logits.shape))
    return n


GNB_ROWS = 1024  # rows per chunk for bf16 logits: 200 MB of fp32 at GPT-2's vocabulary


def hutchinson_backward(loss, params, scale, generator=None, probe="rademacher", probes=None):
    """Hutchinson: p.grad += scale · u⊙(H u), u ~ Rademacher (±1) or Gaussian, H the Hessian of loss.

    loss: scalar with the graph attached (built with create_graph-able ops). params: the tensors to
    estimate for. generator: a torch.Generator on the params' device, or None. E[u⊙Hu] = diag(H).
    Hu comes from double backward: grad of (∇loss · u) with u held constant. probes: the list this
    function returned for an earlier part of the same batch, to use the same u again (Σ_parts
    u⊙(H_part u) = u⊙(H u): a batch split into parts gets the estimate of one call), else None: drawn
    here. Returns the probes used. Under DDP, all-reduce (average) p.grad afterwards."""
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {probe!r}")
    params = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None and g.requires_grad]
    if probes is None:
        probes = []
        for p, _ in pairs:
            if probe == "rademacher":
                u = torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype) * 2 - 1
            else:
                u = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            probes.append(u)
    hvps = torch.autograd.grad([g for _, g in pairs], [p for p, _ in pairs], grad_outputs=probes,
                               allow_unused=True, materialize_grads=True)
    with torch.no_grad():
        for (p, _), u, hu in zip(pairs, probes, hvps):
            estimate = u * hu * scale
            if p.grad is None:
                p.grad = estimate
            else:
                p.grad.add_(estimate)
    return probes
