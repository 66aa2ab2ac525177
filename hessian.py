"""
The Hessian estimators that refresh Sophia's diagonal Hessian every k steps, chosen once when the run is built:
Gauss-Newton-Bartlett (SophiaG: labels sampled from the model) and Hutchinson (SophiaH: u * (H u) through a
double backward). Each fills p.grad with its estimate over one micro-batch at a time; finish() averages it over
the ranks the way its parallelism needs.
"""

import torch

import sophia
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

    def __init__(self, grad_clip):
        self.grad_clip = grad_clip

    def begin(self, run):
        pass

    def add(self, run, x, y, scale, generator, last):
        """One chunk x, y (B, T): its labels are drawn from one uniform per prediction, so the forward and backward
        may run in micro-batches of optim.hess_micro_batch_size and still sample the same labels."""
        uniform = torch.rand(x.numel(), 1, dtype=torch.float64, device=x.device, generator=generator)  # (B·T, 1)
        pieces = micro_batches(x, y, run.plan.hess_micro)
        for i, (xs, _, share, first_row) in enumerate(pieces):
            with gradient_sync(run.model, run.raw_model, run.env, last and i == len(pieces) - 1):
                with run.env.autocast():
                    logits, _ = run.model(xs)  # (b, T, vocab): labels are sampled from these
                sophia.gnb_backward(logits, scale * share, uniform=uniform[first_row:first_row + xs.numel()])

    def finish(self, run):
        """Clip the Hessian batch's gradient as the official loop does; returns its norm before the clip."""
        return clip_gradients(run.params, self.grad_clip if self.grad_clip > 0 else float("inf"))


class Hutchinson:
    """u * (H u) with random probes u, through a double backward on the plain module (no compile, no DDP hooks)
    with the math attention kernel (the fused kernels have no double backward). One probe per chunk, shared by
    its micro-batches (optim.hess_micro_batch_size), so that they add up to the chunk's estimate. Under FSDP the
    double backward runs on the gathered weights (bf16 under dtype=bfloat16), so each rank sums full-size
    estimates, in fp32, then one reduce-scatter averages them and leaves each rank its slice."""

    def __init__(self, probe):
        self.probe = probe

    def begin(self, run):
        self.estimates = None
        if run.env.sharded:
            hold_gathered(run.raw_model, True)

    def add(self, run, x, y, scale, generator, last):
        probes = None
        for xs, ys, share, _ in micro_batches(x, y, run.plan.hess_micro):
            with math_attention(), run.env.autocast():
                _, loss = run.raw_model(xs, ys)
            # under FSDP the parameters are the gathered weights now, in the order of run.params
            params = list(run.raw_model.parameters()) if run.env.sharded else run.params
            probes = sophia.hutchinson_backward(loss, params, scale * share, generator, self.probe, probes)
            if run.env.sharded:  # FSDP would take the gathered weights' .grad for its own accumulation: keep them
                grads = [q.grad.float() if q.grad is not None else torch.zeros(q.shape, device=q.device)
                         for q in params]
                self.estimates = grads if self.estimates is None else [a + b for a, b in zip(self.estimates, grads)]
                for q in params:
                    q.grad = None

    def finish(self, run):
        if run.env.sharded:
            hold_gathered(run.raw_model, False)
            shard_estimates(run.params, self.estimates, run.env)
            self.estimates = None
        elif run.env.distributed:  # the DDP hooks did not run: average u*(Hu) over the ranks here
            average_over_ranks([p.grad for p in run.params if p.grad is not None])
        return None


def math_attention():
    """The flash and memory-efficient attention kernels have no double backward; the math kernel has."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def build_estimator(cfg):
    """The estimator of optim=sophiag or sophiah; None for the other optimizers."""
    if cfg.optim.name == "sophiag":
        return GaussNewtonBartlett(cfg.grad_clip)
    if cfg.optim.name == "sophiah":
        return Hutchinson(cfg.optim.probe)
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
