"""
Optimizer step cost on GPT-2 124M-shaped parameters, in one process, against torch's fused AdamW.

    nice -n 10 python scripts/bench_optim.py [--device cpu] [--dtype float32] [--steps 10] [--warmup 3]
    python scripts/bench_optim.py --model baby --only muon --skip-gnb   # the char proxy's shape, Muon's rows

The parameters are model.py's GPT at the gpt2_small shape (--model: another configs/model preset, e.g. baby, the
char proxy's 4x4x128) in model.py's own groups (configure_optimizer_groups:
weight decay on nn.Linear weights only; the tied embedding/head once), through scripts/benchmark.py's
gpt2_groups; --bias adds GPT-2's biases. Gradients are random and fixed. Every optimizer runs its warm-up steps
(compilation included), then the optimizers take turns, one timed step each per round, so that a
change in machine load hits them all alike. Printed: median and min step time, their ratios against
AdamW(fused=True), and the optimizer state size. On a busy machine, `--threads 1 --clock cpu` gives
the steadiest comparison (CPU time of one thread, which preemption does not inflate).

A second table times the GNB Hessian estimate at the logits level on --gnb-shape logits: our
gnb_backward (softmax, two-level inverse-CDF sampling, gradient formed in place) against a plain
F.cross_entropy forward+backward on data labels, and against the official recipe
(torch.distributions.Categorical sampling, then cross-entropy forward+backward).
"""

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # `python scripts/x.py` puts scripts/, not the repo root, on the path

import hessian
import lion  # noqa: E402
import muon
import sophia
from scripts.benchmark import MODEL_PRESETS, gpt2_groups, model_config

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer")
parser.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer (compiles)")
parser.add_argument("--model", default="gpt2_small", choices=MODEL_PRESETS,
                    help="the configs/model preset whose shapes the parameters take (baby: the char proxy's)")
parser.add_argument("--only", default="",
                    help="comma-separated: time only the optimizers whose name contains one of these "
                         "(case-insensitive; AdamW fused, the reference, always runs), e.g. 'muon'")
parser.add_argument("--bias", action="store_true", help="add GPT-2's biases")
parser.add_argument("--gnb-shape", default="8,128,50304", help="B,T,V of the logits for the GNB table")
parser.add_argument("--gnb-steps", type=int, default=5)
parser.add_argument("--skip-gnb", action="store_true", help="only the optimizer table")
parser.add_argument("--skip-optim", action="store_true", help="only the GNB table")
parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this thread's CPU time (time.thread_time), which other processes on a busy "
                         "machine barely disturb; needs --threads 1 on a CPU device")
args = parser.parse_args()

device = torch.device(args.device)
if args.clock == "cpu" and (args.threads != 1 or device.type != "cpu"):
    sys.exit("--clock cpu times one CPU thread: add --threads 1 (and use --device cpu)")
if args.threads:
    torch.set_num_threads(args.threads)
clock = time.thread_time if args.clock == "cpu" else time.perf_counter
dtype = getattr(torch, args.dtype)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn):
    sync()
    t0 = clock()
    fn()
    sync()
    return clock() - t0


def bench_optimizers():
    # the --model preset's shapes (GPT-2 124M by default) in model.py's weight-decay and no-decay groups
    shape = dataclasses.asdict(model_config(args.model))
    model_groups = gpt2_groups({**shape, "bias": args.bias}, device, dtype)
    tensors = [p for g in model_groups for p in g["params"]]
    n_params = sum(p.numel() for p in tensors)

    def groups():
        return [dict(g) for g in model_groups]

    hess_bs = 480 * 1024  # the paper's tokens per batch: SophiaG's bs; SophiaH's rho is γ itself (bs=1)
    candidates = {
        "AdamW fused": lambda: torch.optim.AdamW(groups(), lr=6e-4, betas=(0.9, 0.95), fused=True),
        "AdamW foreach": lambda: torch.optim.AdamW(groups(), lr=6e-4, betas=(0.9, 0.95), foreach=True),
        "SophiaG fused": lambda: sophia.SophiaG(groups(), lr=6e-4, rho=0.05),
        "SophiaG reference (official loop)": lambda: sophia.SophiaG(groups(), lr=6e-4, rho=0.05, fused=False),
        "SophiaH fused": lambda: sophia.SophiaH(groups(), lr=6e-4, rho=0.05),
        "Lion foreach": lambda: lion.Lion(groups(), lr=1e-4, betas=(0.95, 0.98)),
        # optim=muon's split (muon.param_groups): Muon on model.py's decayed group, the blocks' matrices, fused
        # AdamW on the other, the embeddings and the vectors; Newton-Schulz in bf16 (torch's) and in fp32
        **{f"Muon (blocks, Newton-Schulz {name}) + AdamW fused (rest)": lambda dtype=dtype: muon.MuonAdamW(
            *groups(), lr=6e-4, adam_lr=6e-4, momentum=0.95, nesterov=True, ns_steps=5,
            ns_dtype=dtype, adjust_lr_fn="match_rms_adamw", betas=(0.9, 0.95), eps=1e-8)
           for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))},
    }

    wanted = [w.strip().lower() for w in args.only.split(",") if w.strip()]
    candidates = {name: make for name, make in candidates.items()
                  if name == "AdamW fused" or not wanted or any(w in name.lower() for w in wanted)}

    def step_kwargs(opt):
        if isinstance(opt, sophia.SophiaH):
            return {"bs": 1}
        return {"bs": hess_bs} if isinstance(opt, sophia.SophiaG) else {}

    print(f"# Optimizer step on {args.model}'s shapes ({shape['n_layer']}x{shape['n_head']}x{shape['n_embd']}, "
          f"vocab {shape['vocab_size']}): {n_params / 1e6:.1f}M params in {len(tensors)} "
          f"tensors, {args.dtype} on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock)")
    optimizers = {}
    for name, make in candidates.items():
        opt = make()
        if isinstance(opt, sophia.SophiaG):
            opt.update_hessian()  # h from the random grads, so that the clip is exercised as in training
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            opt.step(**step_kwargs(opt))
        sync()
        print(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s for {args.warmup} steps", flush=True)
        optimizers[name] = opt

    times = {name: [] for name in optimizers}
    for _ in range(args.steps):
        for name, opt in optimizers.items():
            times[name].append(timed(lambda: opt.step(**step_kwargs(opt))))
    hessian_times = {name: [timed(optimizers[name].update_hessian) for _ in range(max(3, args.steps // 2))]
                     for name in ("SophiaG fused", "SophiaG reference (official loop)") if name in optimizers}

    def state_bytes(opt):  # the per-parameter buffers (the 0-d step counters left out)
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.numel() > 1)

    base_median, base_min = statistics.median(times["AdamW fused"]), min(times["AdamW fused"])
    param_bytes = n_params * dtype.itemsize
    print()
    print("| optimizer step | median (ms) | min (ms) | median / AdamW fused | min / AdamW fused | state (MiB) "
          "| state / params |")
    print("|---|---|---|---|---|---|---|")
    for name, opt in optimizers.items():
        med, low = statistics.median(times[name]), min(times[name])
        print(f"| {name} | {med * 1e3:.1f} | {low * 1e3:.1f} | {med / base_median:.2f}x | {low / base_min:.2f}x | "
              f"{state_bytes(opt) / 2**20:.0f} | {state_bytes(opt) / param_bytes:.2f} |")
    for name, ts in hessian_times.items():
        med, low = statistics.median(ts), min(ts)
        print(f"| update_hessian, {name} | {med * 1e3:.1f} | {low * 1e3:.1f} | {med / base_median:.2f}x | "
              f"{low / base_min:.2f}x | | |")


def bench_gnb():
    # the Hessian refresh at the logits level: sampling + the gradient w.r.t. the logits
    B, T, V = (int(x) for x in args.gnb_shape.split(","))
    logits = (torch.randn(B, T, V, device=device) * 3).requires_grad_()
    targets = torch.randint(V, (B * T,), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    probs = torch.softmax(logits.detach().view(-1, V), -1)

    def plain_ce():
        logits.grad = None
        F.cross_entropy(logits.view(-1, V), targets).backward()

    def ours_gnb():
        logits.grad = None
        hessian.gnb_backward(logits, 1.0, gen)

    def official_gnb():
        logits.grad = None
        labels = torch.distributions.Categorical(logits=logits.detach().view(-1, V)).sample()
        F.cross_entropy(logits.view(-1, V), labels).backward()

    def multinomial_gnb():
        logits.grad = None
        labels = torch.multinomial(torch.softmax(logits.detach().view(-1, V), -1), 1, generator=gen).view(-1)
        F.cross_entropy(logits.view(-1, V), labels).backward()

    def full_cdf_sample():
        cdf = probs.cumsum(-1)
        u = torch.rand(B * T, 1, device=device, generator=gen) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).clamp_(max=V - 1)

    rows = {
        "F.cross_entropy fwd+bwd on data labels (peer)": plain_ce,
        "gnb_backward (ours: softmax, two-level inverse CDF, gradient in place)": ours_gnb,
        "Categorical sample + CE fwd+bwd (official recipe)": official_gnb,
        "softmax + torch.multinomial + CE fwd+bwd": multinomial_gnb,
        "sampler only: sample_categorical (ours)": lambda: hessian.sample_categorical(probs, gen),
        "sampler only: cumsum + searchsorted": full_cdf_sample,
        "sampler only: torch.multinomial": lambda: torch.multinomial(probs, 1, generator=gen),
        "sampler only: Categorical(logits)":
            lambda: torch.distributions.Categorical(logits=logits.detach().view(-1, V)).sample(),
    }
    for fn in rows.values():
        fn()
    times = {name: [] for name in rows}
    for _ in range(args.gnb_steps):
        for name, fn in rows.items():
            times[name].append(timed(fn))
    peer = statistics.median(times["F.cross_entropy fwd+bwd on data labels (peer)"])
    print()
    print(f"# GNB at the logits level: logits ({B}, {T}, {V}) fp32 on {device}, {args.clock} clock")
    print("| what | median (ms) | min (ms) | median / CE fwd+bwd |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {min(ts) * 1e3:.1f} | "
              f"{statistics.median(ts) / peer:.2f}x |")


if not args.skip_optim:
    bench_optimizers()
if not args.skip_gnb:
    bench_gnb()
