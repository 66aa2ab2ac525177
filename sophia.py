"""
Sophia (Liu, Li, Hall, Liang, Ma 2023: "Sophia: A Scalable Stochastic Second-order Optimizer for
Language Model Pre-training"). Lion is in lion.py; the two diagonal-Hessian estimators (the math that fills p.grad
with an estimate) are in hessian.py.

SophiaG is a drop-in for the official class (github.com/Liuhong99/Sophia, sophia.py): same constructor,
update_hessian(), step(closure=None, bs=5120), and the same state keys (step, exp_avg, hessian), so
code and checkpoints written for it carry over. Per parameter θ with gradient g, every step:

    θ ← θ·(1 − lr·wd)                                   decoupled weight decay, applied first
    m ← β1·m + (1 − β1)·g                               no bias correction
    θ ← θ − lr · sign(m) · min(|m| / (rho·bs·h + 1e-15), 1)

and every k steps (the caller decides k) update_hessian(): h ← β2·h + (1 − β2)·p.grad², where p.grad
holds the gradient of the loss against labels sampled from the model (hessian.gnb_backward).
`bs` is the number of predictions (tokens) in the Hessian batch: rho·bs plays the paper's γ and the
batch factor B of the Gauss-Newton-Bartlett estimator B·ĝ⊙ĝ.

SophiaH: the same step rule with the Hutchinson estimate h ← β2·h + (1 − β2)·u⊙(Hu) and negative
curvature clipped; its rho convention is in the SophiaH docstring.

Two implementations of each step, chosen by `fused` (default True):
- fused=True: one compiled kernel per parameter tensor (torch.compile; inductor writes one C++ loop on
  CPU, one Triton kernel on CUDA) that reads θ, g, m, h once and writes θ, m once; equal-size tensors
  go BUNDLE at a time through one compiled call. Hyper-parameters go in as a small tensor, so a new lr
  every step does not recompile, and nothing in step() or update_hessian() waits for the device. If
  compiling fails (no C++ compiler, unsupported platform), a warning says so and the same code runs
  eagerly.
- fused=False: the readable reference, a per-tensor loop of the formula above as the official code
  writes it.

Sharded parameters (DTensors, e.g. under FSDP2's fully_shard): every update is element-wise, so each
rank updates its local shard (`.to_local()` views, plain tensors for both paths); the state stays a
DTensor like its parameter, so that torch.distributed.checkpoint saves it sharded. sophia_stats sums
its counts and norms over the shards, so it reports the unsharded values, and update_hessian skips a
non-finite estimate on every rank when any shard holds NaN/inf.

A non-finite Hessian estimate (NaN/inf anywhere in this refresh) is skipped whole: the state is left as
it was, and update_hessian() returns a 0-d bool tensor, False when it skipped. On the fused path this
flag is computed on the device (an L2-norm pass over the estimates, then torch.where), so calling
update_hessian() never syncs; reading the flag (bool(flag), .item()) does, so log it at log steps.
"""

import functools
import warnings

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

# ----------------------------------------------------------------------------------------------------
# Fused kernels: plain torch code that torch.compile turns into one loop per call (eager, it also runs
# as is, just as several kernels).


def _sophia_update(param, grad, exp_avg, hessian, hyper):
    # hyper: (7,) in param's compute dtype, see _hyper(); one kernel reads param, grad, exp_avg,
    # hessian once and writes param, exp_avg once.
    lr, decay, beta1, grad_weight, rho_bs, eps_add, eps_floor = hyper.unbind()
    param.mul_(decay)                                        # θ·(1 − lr·wd)
    exp_avg.mul_(beta1).add_(grad * grad_weight)             # β1·m + (±)(1 − β1)·g, − when maximizing
    # SophiaG: eps_add=1e-15, eps_floor=-inf -> rho·bs·h + 1e-15
    # SophiaH: eps_add=0,     eps_floor=1e-15 -> max(rho·bs·h, 1e-15)
    denom = torch.maximum(rho_bs * hessian + eps_add, eps_floor)
    # clamp(m/d, -1, 1) is exactly sign(m)·min(|m|/d, 1) for d > 0
    param.sub_(lr * torch.clamp(exp_avg / denom, -1.0, 1.0))


def _sophia_update_bundle(params, grads, exp_avgs, hessians, hyper):
    # the same update for a few tensors of one size in one compiled call: fewer calls, each with a
    # fixed cost on CPU
    for param, grad, exp_avg, hessian in zip(params, grads, exp_avgs, hessians):
        _sophia_update(param, grad, exp_avg, hessian, hyper)


BUNDLE = 4  # tensors per bundled call: GPT-2's 12 layers give bundles of 4 equal-size weights


def _hessian_update_gnb(hessian, grad, hyper, finite):
    # h ← β2·h + (1 − β2)·g², left unchanged when the refresh holds NaN/inf anywhere (finite: 0-d bool
    # on the device). Reads h and g once, writes h once.
    beta2, one_minus_beta2 = hyper.unbind()
    hessian.copy_(torch.where(finite, hessian * beta2 + one_minus_beta2 * grad * grad, hessian))


def _hessian_update_hutchinson(hessian, u_hu, hyper, finite):
    # h ← β2·h + (1 − β2)·u⊙Hu, the same way
    beta2, one_minus_beta2 = hyper.unbind()
    hessian.copy_(torch.where(finite, hessian * beta2 + one_minus_beta2 * u_hu, hessian))


# cpp.dynamic_threads: on CPU, inductor otherwise decides once, from the size of the first tensor it
# sees, whether the loop is multi-threaded; a small first tensor (a LayerNorm weight) would make every
# later call single-threaded. With it the kernel always has an OpenMP region.
INDUCTOR_OPTIONS = {"cpp.dynamic_threads": True}


@functools.cache
def _inductor_options():
    """INDUCTOR_OPTIONS less those the running torch's inductor does not have. torch.compile rejects an
    unknown option outright, which would send every step down the slow eager fallback: leave the option
    out instead, and say so once."""
    from torch._inductor import config
    missing = object()

    def known(key):
        node = config
        for part in key.split("."):
            node = getattr(node, part, missing)
            if node is missing:
                return False
        return True

    unknown = [key for key in INDUCTOR_OPTIONS if not known(key)]
    if unknown:
        warnings.warn(f"torch {torch.__version__}: inductor has no option {', '.join(unknown)}; compiling the "
                      f"fused Sophia kernels without it (still compiled; on CPU possibly fewer threads)")
    return {key: value for key, value in INDUCTOR_OPTIONS.items() if key not in unknown}


def compile_errors():
    """What a compiled function raises while it compiles, before any of its code runs: dynamo's errors
    (InductorError among them: a missing C++ compiler, a failed Triton compile), and the recompile limit
    under fullgraph. Anything else comes from the kernels themselves."""
    from torch._dynamo import exc  # here, not at import: importing this module stays cheap
    return exc.TorchDynamoException, exc.FailOnRecompileLimitHit


@functools.cache
def _compiled(fn):
    # Compiled on first use (importing this module stays cheap). dynamic=True and 1-D views (see
    # _flat): one kernel for every tensor size and rank, so GPT-2's 75 tensors cost one compilation
    # per dtype, not 75, and stay well under dynamo's limit of 8 variants per function.
    return torch.compile(fn, dynamic=True, fullgraph=True, options=_inductor_options())


def _flat(*tensors):
    # contiguous tensors (the usual case) go into the kernels as 1-D views of themselves
    return [t.view(-1) for t in tensors] if all(t.is_contiguous() for t in tensors) else list(tensors)


def _local(t):
    """This rank's shard of a DTensor (a view: updating it updates the DTensor), any other tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_group(tensors):
    """The process group that the DTensors among tensors are sharded over (one 1-D mesh), else None."""
    return next((t.device_mesh.get_group() for t in tensors if isinstance(t, DTensor)), None)


def _on_every_rank(flag, group):
    """A 0-d bool flag AND-ed over the ranks of group (None: as is), so that every shard decides alike."""
    if group is None:
        return flag
    flag = flag.to(torch.int32)  # collectives reduce integers, not bools
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return flag.bool()


def _hyper(values, like):
    """Hyper-parameters as one small tensor on like's device, in its compute dtype (fp32 for
    fp32/bf16/fp16 params, so that 1 − lr·wd does not round to 1 in bf16; fp64 for fp64). Built on the
    host in pinned memory and copied asynchronously, so a CUDA step never waits for the device."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    host = torch.tensor(values, dtype=dtype, pin_memory=like.device.type == "cuda")
    return host.to(like.device, non_blocking=True)


def _all_finite(estimates, square):
    """0-d bool on estimates[0]'s device: the refresh is usable. One read pass, no host sync.
    Uses the L2 norm of each tensor (NaN and inf propagate into it), squared for GNB: finite norms
    mean finite entries (and squares). A finite estimate whose norm overflows (entries ~1e19 in fp32)
    counts as non-finite too. The inf-norm would be exact but is much slower on CPU."""
    norms = torch._foreach_norm(estimates, 2)
    if square:
        norms = torch._foreach_mul(norms, norms)
    device = estimates[0].device
    return torch.isfinite(torch.stack([x.to(device, non_blocking=True) for x in norms])).all()


# ----------------------------------------------------------------------------------------------------
# SophiaG / SophiaH


def _check_hyperparameters(lr, betas, weight_decay, example_lr, example_betas):
    """Bad settings fail at construction, with a value that works."""
    if not lr > 0.0:
        raise ValueError(f"lr must be > 0, got {lr}: pass a positive learning rate, e.g. lr={example_lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}: e.g. betas={example_betas}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}: e.g. weight_decay=0.1")


class SophiaG(Optimizer):
    """Sophia with the Gauss-Newton-Bartlett estimator. See the module docstring."""

    clip_negative_curvature = False  # denominator rho·bs·h + 1e-15 (official SophiaG)
    estimate_is_squared = True       # update_hessian squares p.grad (GNB: ĥ ∝ ĝ⊙ĝ)

    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1, *,
                 maximize=False, capturable=False, fused=True):
        _check_hyperparameters(lr, betas, weight_decay, example_lr=6e-4, example_betas=(0.965, 0.99))
        if not rho > 0.0:
            raise ValueError(f"rho must be > 0, got {rho}: pass a positive clipping scale, e.g. rho=0.05")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay,
                        maximize=maximize, capturable=capturable)
        super().__init__(params, defaults)
        self.fused = fused  # an attribute, not a group key: param_groups keep the official layout
        self._compile_failed = False

    def __setstate__(self, state):
        # runs in load_state_dict too: checkpoints from older official versions lack these keys
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("capturable", False)

    def _init_state(self, p):
        # official layout: step is a 0-d CPU float tensor, or (1,) on p's device when capturable
        state = self.state[p]
        if len(state) == 0:
            state["step"] = (torch.zeros((1,), dtype=torch.float, device=p.device)
                             if self.defaults["capturable"] else torch.tensor(0.0))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if "hessian" not in state:
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _fused(self, fn, *args):
        """Run fn compiled (one kernel per call, or a few for a bundle). If compiling fails (no C++ compiler,
        unsupported platform, too many variants), warn once and from then on run the same code eagerly:
        correct, just slower. Only a compile error falls back: dynamo compiles a call's whole graph before
        any of its kernels runs, so such a call changed nothing. An error once the kernels run (out of
        memory in Triton's autotuning, say) is raised: the kernels before the failing one have updated their
        tensors, and running them again would apply that update twice."""
        if not self._compile_failed:
            try:
                compiled = _compiled(fn)
            except Exception as err:  # torch.compile itself refused: an unsupported platform or Python
                self._stop_compiling(err)
        if not self._compile_failed:
            try:
                return compiled(*args)
            except compile_errors() as err:
                self._stop_compiling(err)
        return fn(*args)

    def _stop_compiling(self, err):
        self._compile_failed = True
        warnings.warn(f"{type(self).__name__}: torch.compile failed ({type(err).__name__}: {str(err)[:300]}); "
                      f"running the fused step's code eagerly from now on (slower). The CPU fast path needs a C++ "
                      f"compiler (g++); fused=False selects the reference path and silences this.")

    @torch.no_grad()
    def update_hessian(self):
        """h ← β2·h + (1 − β2)·ĥ for every parameter with a grad (ĥ = p.grad² for SophiaG, p.grad for
        SophiaH). Returns a 0-d bool tensor: False when the estimate held NaN/inf anywhere, and then
        no state was changed."""
        hessians, estimates, betas2 = [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                hessians.append(self._init_state(p)["hessian"])
                estimates.append(p.grad)
                betas2.append(group["betas"][1])
        if not estimates:
            return torch.tensor(True)
        shards = _shard_group(estimates)
        hessians, estimates = [_local(h) for h in hessians], [_local(e) for e in estimates]
        square = self.estimate_is_squared

        if not self.fused:
            # reference: check on the host, then the official in-place update
            finite = torch.tensor(all(bool(torch.isfinite(e * e if square else e).all()) for e in estimates))
            if not _on_every_rank(finite, shards):
                return torch.tensor(False)
            for h, e, beta2 in zip(hessians, estimates, betas2):
                if square:
                    h.mul_(beta2).addcmul_(e, e, value=1 - beta2)
                else:
                    h.mul_(beta2).add_(e, alpha=1 - beta2)
            return torch.tensor(True)

        finite = _on_every_rank(_all_finite(estimates, square), shards)  # 0-d bool on the device, no sync
        hypers = {}
        for h, e, beta2 in zip(hessians, estimates, betas2):
            key = (beta2, h.device, h.dtype)
            if key not in hypers:
                hypers[key] = (_hyper([beta2, 1 - beta2], h), finite.to(h.device, non_blocking=True))
            hyper, finite_here = hypers[key]
            update = _hessian_update_gnb if square else _hessian_update_hutchinson
            self._fused(update, *_flat(h, e), hyper, finite_here)
        return finite

    @torch.no_grad()
    def step(self, closure=None, bs=5120):
        """One Sophia step. bs: the number of predictions (tokens) in the Hessian batch."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, hessians, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self._init_state(p)
                # complex tensors: real and imaginary parts are independent coordinates (as official)
                as_real = torch.view_as_real if torch.is_complex(p) else (lambda t: t)
                params.append(as_real(_local(p)))
                grads.append(as_real(_local(p.grad)))
                exp_avgs.append(as_real(_local(state["exp_avg"])))
                hessians.append(as_real(_local(state["hessian"])))
                steps.append(state["step"])
            if not params:
                continue
            torch._foreach_add_(steps, 1)
            beta1 = group["betas"][0]
            lr, rho, wd, maximize = group["lr"], group["rho"], group["weight_decay"], group["maximize"]

            if not self.fused:
                _sophia_reference(params, grads, exp_avgs, hessians, lr=lr, beta1=beta1, rho=rho, bs=bs,
                                  weight_decay=wd, maximize=maximize,
                                  clip_negative_curvature=self.clip_negative_curvature)
                continue

            eps_add, eps_floor = (0.0, 1e-15) if self.clip_negative_curvature else (1e-15, float("-inf"))
            grad_weight = -(1 - beta1) if maximize else 1 - beta1
            values = [lr, 1 - lr * wd, beta1, grad_weight, rho * bs, eps_add, eps_floor]
            same_size = {}  # (device, dtype, shape of the flat view) -> [(param, grad, exp_avg, hessian)]
            for p, g, m, h in zip(params, grads, exp_avgs, hessians):
                flat = _flat(p, g, m, h)
                same_size.setdefault((p.device, p.dtype, flat[0].shape), []).append(flat)
            hypers = {}  # one small tensor per (device, dtype)
            for (device, dtype, _), members in same_size.items():
                if (device, dtype) not in hypers:
                    hypers[device, dtype] = _hyper(values, members[0][0])
                hyper = hypers[device, dtype]
                n_bundled = len(members) - len(members) % BUNDLE
                for i in range(0, n_bundled, BUNDLE):
                    self._fused(_sophia_update_bundle, *zip(*members[i:i + BUNDLE]), hyper)
                for flat in members[n_bundled:]:
                    self._fused(_sophia_update, *flat, hyper)
        return loss

    @torch.no_grad()
    def sophia_stats(self, bs, parts=None):
        """Diagnostics as 0-d tensors (no host sync, no state copies), for log steps:
        optim/win_rate: fraction of coordinates not clipped, |m| < rho·bs·h (healthy: 0.1-0.5);
        optim/win_rate/NAME: the same over the parameters of parts[NAME] (parts: {NAME: [params]}), since
        one large tensor (a 50k-row embedding) can dominate the average;
        optim/hessian_norm: Σ|h|."""
        unclipped, sizes, hessians = {}, {}, []  # by id(param)
        device = None
        for group in self.param_groups:
            threshold = group["rho"] * bs
            for p in group["params"]:
                state = self.state.get(p, {})
                if "hessian" not in state or "exp_avg" not in state:
                    continue
                m, h = _local(state["exp_avg"]), _local(state["hessian"])
                device = device or h.device
                unclipped[id(p)] = torch.count_nonzero(m.abs() < threshold * h).to(device, non_blocking=True)
                sizes[id(p)] = state["exp_avg"].numel()  # a DTensor's numel is the unsharded one
                hessians.append(state["hessian"])
        if not hessians:
            return {"optim/win_rate": torch.tensor(0.0), "optim/hessian_norm": torch.tensor(0.0)}

        shards = _shard_group(hessians)
        # accumulated in fp64: an fp32 sum over a million entries (an embedding) is off in the third digit on CPU
        norms = [x.to(device, non_blocking=True) for x in torch._foreach_norm(
            [_local(h) for h in hessians], 1, dtype=torch.float64)]
        if shards is not None:  # each rank counted its shard: one all-reduce gives the unsharded sums
            packed = torch.stack([x.double() for x in [*unclipped.values(), *norms]])
            dist.all_reduce(packed, group=shards)
            unclipped = dict(zip(unclipped, packed[:len(unclipped)]))
            norms = list(packed[len(unclipped):])

        def win_rate(ids):
            ids = [i for i in ids if i in unclipped]
            return torch.stack([unclipped[i] for i in ids]).sum() / sum(sizes[i] for i in ids)

        stats = {"optim/win_rate": win_rate(list(unclipped)), "optim/hessian_norm": torch.stack(norms).sum()}
        for name, params in (parts or {}).items():
            stats[f"optim/win_rate/{name}"] = win_rate([id(p) for p in params])
        return stats


class SophiaH(SophiaG):
    """Sophia with the Hutchinson estimator: p.grad holds u⊙Hu for update_hessian(), an estimate of the
    diagonal Hessian of the mean loss with no batch factor, so rho is the paper's γ itself: call
    step(bs=1), and θ ← θ − lr·clip(m / max(rho·h, 1e-15), −1, 1). Negative curvature gets a sign step."""

    clip_negative_curvature = True   # denominator max(rho·bs·h, 1e-15)
    estimate_is_squared = False      # update_hessian uses p.grad linearly


def _sophia_reference(params, grads, exp_avgs, hessians, *, lr, beta1, rho, bs, weight_decay,
                      maximize, clip_negative_curvature):
    """The Sophia step, one tensor at a time, written as the official SophiaG writes it."""
    for param, grad, exp_avg, hessian in zip(params, grads, exp_avgs, hessians):
        grad = -grad if maximize else grad
        param.mul_(1 - lr * weight_decay)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        if clip_negative_curvature:
            denom = (rho * bs * hessian).clamp(min=1e-15)
        else:
            denom = rho * bs * hessian + 1e-15
        ratio = (exp_avg.abs() / denom).clamp(max=1)
        param.addcmul_(exp_avg.sign(), ratio, value=-lr)


def __getattr__(name):
    """`from sophia import Lion` and `sophia.Lion`, as before Lion had a module of its own (lion.py)."""
    if name == "Lion":
        from lion import Lion
        return Lion
    raise AttributeError(f"module 'sophia' has no attribute {name!r}")
