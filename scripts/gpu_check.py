"""
The GPU check: every code path a GPU run takes, and what this project claims about speed and memory on a GPU, each
figure measured against a named peer on the same device, through train.py's own loop where a loop is measured.
One command, one JSON:

    python scripts/gpu_check.py --out $OUT/gpu_check.json             # on a GPU node: everything, the cuda tests too
    python scripts/gpu_check.py --smoke --device cpu --out smoke.json  # the same at toy shapes, on the CPU
    python scripts/gpu_check.py --out x.json --only train_paths,memory_refresh_vs_step

Benchmarks, in order (each: pass / fail / skip, its figures and the peer it was compared with):
  train_paths             train.py a few steps each on a small model: SophiaG, SophiaH, Lion and Muon (compiled on
                          a GPU); DDP on a one-process group (torchrun, force_distributed=true: NCCL, DDP's hooks,
                          compile under DDP); FSDP2 on a one-process group with the bf16 policy (SophiaH's double
                          backward on the gathered weights, the sharded checkpoint). Each: the loss falls, dynamo
                          (TORCH_LOGS=recompiles) recompiles nothing in the run's second half and never hits its
                          limit (past which it runs a function eagerly, with one warning)
  memory_refresh_vs_step  train.py's peak memory (allocated and reserved) in a step with a Hessian refresh vs a step
                          without, SophiaG and SophiaH at gpt2_small's micro-batch (CUDA), beside the figures
                          scripts/hessian_memory.py computes
  cuda_tests              python -m pytest -m cuda tests (tests/test_cuda.py): each test's outcome (CUDA)
  two_gpus                DDP and FSDP on two NCCL ranks (torchrun --nproc_per_node=2; needs two GPUs)
  train_throughput        tokens/s and MFU of train.py at the gpt2_small shape (block 1024, bf16 on a GPU): AdamW
                          and SophiaG (k = 10, half-batch Hessian), compiled on a GPU, against HF's GPT2LMHeadModel
                          with the same shapes, precision, accumulation, clip, fused AdamW and compile
  optimizer_step          one step of SophiaG / SophiaH (fused), Lion, Muon (Newton-Schulz in bf16, AdamW on the
                          rest) and the official per-parameter loop (SophiaG fused=False) against
                          torch.optim.AdamW(fused=True), at 124M and 770M shapes
  sophia_overhead         train.py's time per step with SophiaG (k = 10, half-batch Hessian) over AdamW's

Every train.py run goes through scripts/benchmark.py's train_steps (a subprocess; its metrics.jsonl read back),
on the embedded Shakespeare corpus; the first log window (torch.compile) is left out of the timings. Goals are
judged at the real shapes; --smoke records them only (toy shapes say nothing about speed), but the paths' checks
(train_paths, two_gpus) are judged at every scale. --out gets
{"environment": {...}, "benchmarks": [{name, status, summary, figures, note, reference, seconds}, ...]}, rewritten
after every benchmark, and a table is printed last. Exit status: 0 when no benchmark failed, 1 when one did (an
error, or a goal missed), 2 for bad input (no GPU without --smoke, an unknown benchmark, no corpus).
"""

import argparse
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # `python scripts/x.py` puts scripts/, not the repo root, on the path

import muon
import sophia
from config_schema import compose_config
from distributed import native_bf16
from mfu import estimate_mfu, peak_flops
from model import GPT, GPTConfig
from scripts.benchmark import gpt2_groups, step_seconds, train_steps, windows

# Goals, judged at the real shapes (with --smoke only recorded)
OVERHEAD_GOAL = 0.06    # SophiaG's loop (k=10, half-batch Hessian) over AdamW's: the paper's ~5% plus a little
OPT_STEP_GOAL = 1.5     # SophiaG/SophiaH fused step over AdamW(fused=True) at 770M (the same memory traffic)
HF_SPEED_GOAL = 0.95    # our tokens/s over HF's GPT2LMHeadModel under the same settings
PAPER_HESS_BS = 480 * 1024  # SophiaG's step(bs=...) in the paper's runs
CPU_PEAK = 1e11         # on a CPU: a nominal peak for MFU (train.py would otherwise time matmuls in every run)
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone")


@dataclasses.dataclass(frozen=True)
class Scale:
    model: tuple       # Hydra overrides on the gpt2_small_* presets (none: GPT-2 124M, block 1024)
    micro: int         # sequences per micro-batch; a training step is two, the Hessian batch one (the paper's half)
    window: int        # steps per metrics line, and SophiaG's hess_interval k: one refresh per window
    windows: int       # timed windows per run, after the first (compilation)
    hf_steps: int      # HF's timed steps, after 2 untimed
    opt_models: dict   # optimizer_step: label -> GPTConfig fields
    opt_steps: int     # timed steps per optimizer
    paths_model: tuple  # train_paths and two_gpus: the small model (Hydra overrides)
    paths_micro: int   # its micro-batch; a step is two
    paths_steps: int   # steps per run, a metrics line each


FULL = Scale(model=(), micro=12, window=10, windows=5, hf_steps=10,
             opt_models={"124M": dict(n_layer=12, n_head=12, n_embd=768),
                         "770M": dict(n_layer=36, n_head=20, n_embd=1280)}, opt_steps=20,
             paths_model=("model.n_layer=2", "model.n_head=4", "model.n_embd=256", "model.block_size=256"),
             paths_micro=4, paths_steps=8)
SMOKE = Scale(model=("model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64"),
              micro=2, window=2, windows=2, hf_steps=2,
              opt_models={"124M": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512),
                          "770M": dict(n_layer=3, n_head=2, n_embd=96, block_size=64, vocab_size=512)}, opt_steps=3,
              paths_model=("model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64"),
              paths_micro=2, paths_steps=4)


class Context:
    """What the benchmarks share: the device, the scale, and the train.py runs made so far."""

    def __init__(self, smoke, device=None):
        self.smoke, self.scale = smoke, SMOKE if smoke else FULL
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device("cuda:0" if device == "cuda" else device)
        self.cuda = self.device.type == "cuda"
        self.bf16 = self.cuda and native_bf16(self.device)  # train.py's dtype=auto
        self.dtype = "bfloat16" if self.bf16 else "float32"
        self.compiled = self.cuda                              # train.py's compile=auto
        self.notes = [f"CPU: eager only; MFU against a nominal {CPU_PEAK:g} FLOP/s (cpu_peak_flops)"] if not self.cuda \
            else [] if self.bf16 else [f"{torch.cuda.get_device_name(self.device)} has no native bf16 (compute "
                                       f"capability 8.0+): everything runs in fp32"]
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.runs = {}  # (optim, compiled) -> metrics records of a train.py run

    def timed(self, fn):
        sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def result(status, summary, figures=None, note=""):
    return {"status": status, "summary": summary, "figures": figures or {}, "note": note}


def judged(ctx, ok, summary, figures, goal, note=""):
    """A benchmark's result against its goal: judged at the real shapes; with --smoke recorded as a pass."""
    figures["goal_met"] = bool(ok)
    goal = f"goal {goal}" + (": recorded, not judged at --smoke's toy shapes" if ctx.smoke else "")
    return result("pass" if ok or ctx.smoke else "fail", summary, figures, f"{note}; {goal}" if note else goal)


def mode(compiled):
    return "compiled" if compiled else "eager"


# -----------------------------------------------------------------------------------------------------
# train.py's loop, as users run it

def run_overrides(ctx, optim, compiled):
    """config=gpt2_small_<optim> at this scale on the Shakespeare corpus, on the check's device: two micro-batches
    a step; Sophia with k = window and the paper's half-batch Hessian (one micro-batch)."""
    s = ctx.scale
    overrides = [f"config=gpt2_small_{optim}", "data=shakespeare", f"device={ctx.device.type}", *s.model,
                 f"compile={str(compiled).lower()}", f"total_batch_size={2 * s.micro}", f"micro_batch_size={s.micro}",
                 "warmup_steps=0"]
    if optim.startswith("sophia"):
        overrides += [f"optim.hess_interval={s.window}", f"optim.hess_batch_size={s.micro}"]
    return overrides + ([] if ctx.cuda else [f"cpu_peak_flops={CPU_PEAK}"])


def loop_records(ctx, optim, compiled):
    """The metrics of one train.py run of (1 + windows) windows, made once and shared by the benchmarks."""
    if (optim, compiled) not in ctx.runs:
        out_dir, steps = ctx.tmp / f"{optim}_{mode(compiled)}", ctx.scale.window * (1 + ctx.scale.windows)
        ctx.runs[optim, compiled] = train_steps(run_overrides(ctx, optim, compiled), steps, out_dir, ctx.scale.window)
        shutil.rmtree(out_dir)  # its checkpoint: 1.5 GB at GPT-2 124M
    return ctx.runs[optim, compiled]


# -----------------------------------------------------------------------------------------------------
# HF's model, which train.py cannot run: the same work timed in this process

def hf_throughput(ctx, compiled):
    """tokens/s and MFU of HF's GPT2LMHeadModel (sdpa attention) with train.py's settings for the AdamW run:
    the model's shape, micro-batches and accumulation, precision, gradient clip and torch's fused AdamW, on
    random token ids already on the device (which, if anything, favours HF: no data loading)."""
    cfg = compose_config(None, run_overrides(ctx, "adamw", compiled))
    model_args = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    ours = GPT(GPTConfig(**model_args))
    flops_per_token = ours.flops_per_token()
    hf = ours.to_hf(attn_implementation="sdpa").to(ctx.device).train()
    del ours
    forward = torch.compile(hf) if compiled else hf
    optim = cfg.optim  # one group: the step's cost does not depend on which tensors decay
    opt = torch.optim.AdamW(hf.parameters(), lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                            eps=optim.eps, fused=True)
    accum, micro, block = cfg.total_batch_size // cfg.micro_batch_size, cfg.micro_batch_size, cfg.model.block_size
    ids = torch.randint(0, 50257, (accum, micro, block), device=ctx.device)  # GPT-2's own token ids
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if ctx.bf16 else nullcontext()

    def step():
        for x in ids:  # x: (micro, block)
            with autocast:
                loss = forward(input_ids=x, labels=x).loss  # HF shifts the labels itself
            (loss / accum).backward()
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.grad_clip)):  # train_step's one sync
            opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()  # compilation, the optimizer state
    seconds = ctx.timed(lambda: [step() for _ in range(ctx.scale.hf_steps)]) / ctx.scale.hf_steps
    tokens_per_s = accum * micro * block / seconds
    peak = peak_flops(ctx.device, ctx.dtype, None if ctx.cuda else CPU_PEAK)
    return tokens_per_s, estimate_mfu(tokens_per_s, flops_per_token, peak)


# -----------------------------------------------------------------------------------------------------
# The benchmarks

def bench_throughput(ctx):
    # compiled on a GPU, eager on a CPU: train.py's compile=auto (eager on a GPU would cost the check a minute more)
    variants = [("adamw", ctx.compiled), ("sophiag", ctx.compiled)]
    figures = {}
    for optim, compiled in variants:
        steady = windows(loop_records(ctx, optim, compiled))
        label = f"ours_{optim}_{mode(compiled)}"
        figures[f"{label}_tokens_per_s"] = round(statistics.median(r["throughput/tokens_per_s"] for r in steady), 1)
        mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
        figures[f"{label}_mfu"] = round(statistics.median(mfus), 4) if mfus else None
    figures.update(tokens_per_step=steady[0]["tokens"] // steady[0]["step"], dtype=ctx.dtype)
    try:
        import transformers
        transformers.logging.set_verbosity_error()  # its notes on our toy configs
        hf_modes = (ctx.compiled,)
    except ImportError:
        hf_modes = ()
    ratios = {}
    for compiled in hf_modes:
        tokens_per_s, mfu = hf_throughput(ctx, compiled)
        ctx.free()  # HF's model and optimizer state
        figures[f"hf_adamw_{mode(compiled)}_tokens_per_s"] = round(tokens_per_s, 1)
        figures[f"hf_adamw_{mode(compiled)}_mfu"] = None if mfu is None else round(mfu, 4)
        ratios[mode(compiled)] = figures[f"ours_adamw_{mode(compiled)}_tokens_per_s"] / tokens_per_s
        figures[f"ours_vs_hf_{mode(compiled)}"] = round(ratios[mode(compiled)], 3)
    best = mode(ctx.compiled)
    mfu = figures[f"ours_adamw_{best}_mfu"]
    summary = (f"AdamW {best} {figures[f'ours_adamw_{best}_tokens_per_s']:,.0f} tok/s, MFU "
               f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'}; " + ", ".join(f"{r:.2f}x HF {m}"
                                                                                for m, r in ratios.items()))
    note = "" if hf_modes else "HF comparison skipped: transformers is not installed"
    return judged(ctx, all(r >= HF_SPEED_GOAL for r in ratios.values()), summary, figures,
                  f"ours >= {HF_SPEED_GOAL} x HF's tokens/s, {'compiled' if ctx.compiled else 'eager'}", note)


OPTIMIZERS = {  # name -> (constructor from param groups, step()'s keyword arguments); the peer first
    "adamw_fused": (lambda g: torch.optim.AdamW(g, lr=6e-4, betas=(0.9, 0.95), fused=True), {}),
    "sophiag_fused": (lambda g: sophia.SophiaG(g, lr=6e-4, rho=0.05), {"bs": PAPER_HESS_BS}),
    "sophiah_fused": (lambda g: sophia.SophiaH(g, lr=6e-4, rho=0.05), {"bs": 1}),  # SophiaH's rho is γ itself
    "lion": (lambda g: sophia.Lion(g, lr=1e-4, betas=(0.95, 0.98)), {}),
    "sophiag_official_loop": (lambda g: sophia.SophiaG(g, lr=6e-4, rho=0.05, fused=False), {"bs": PAPER_HESS_BS}),
    # optim=muon: Muon (Newton-Schulz in bf16, torch's) on model.py's decayed group, fused AdamW on the other
    "muon_bf16": (lambda g: muon.MuonAdamW(*g, lr=6e-4, adam_lr=6e-4, momentum=0.95, nesterov=True, ns_steps=5,
                                          ns_dtype=torch.bfloat16, adjust_lr_fn="match_rms_adamw", betas=(0.9, 0.95),
                                          eps=1e-8), {}),
}


def optimizer_step_times(ctx, config):
    """Median seconds per step of each optimizer on one set of fp32 parameters (train.py's master weights) in
    model.py's groups, steps interleaved; and SophiaG's update_hessian."""
    groups = gpt2_groups(config, ctx.device)
    optimizers = {}
    for name, (make, kwargs) in OPTIMIZERS.items():
        opt = make([dict(g) for g in groups])
        if isinstance(opt, sophia.SophiaG):
            opt.update_hessian()  # h from the random gradients, so that the clip is exercised
        for _ in range(3):
            opt.step(**kwargs)  # compilation, the state
        optimizers[name] = (opt, kwargs)
    times = {name: [] for name in optimizers}
    for _ in range(ctx.scale.opt_steps):
        for name, (opt, kwargs) in optimizers.items():
            times[name].append(ctx.timed(lambda: opt.step(**kwargs)))
    hessian = statistics.median(ctx.timed(optimizers["sophiag_fused"][0].update_hessian) for _ in range(5))
    n_params = sum(p.numel() for g in groups for p in g["params"])
    del optimizers, groups
    ctx.free()
    return {name: statistics.median(ts) for name, ts in times.items()}, hessian, n_params


def bench_optimizer_step(ctx):
    figures, ok = {}, True
    for tag, config in ctx.scale.opt_models.items():
        times, hessian, n_params = optimizer_step_times(ctx, config)
        figures[f"{tag}_params"] = n_params
        for name, seconds in times.items():
            figures[f"{tag}_{name}_ms"] = round(1e3 * seconds, 3)
            figures[f"{tag}_{name}_vs_adamw"] = round(seconds / times["adamw_fused"], 3)
        figures[f"{tag}_sophiag_update_hessian_ms"] = round(1e3 * hessian, 3)
        ok &= times["sophiag_fused"] < times["sophiag_official_loop"]
        if tag == "770M":
            ok &= max(times["sophiag_fused"], times["sophiah_fused"]) <= OPT_STEP_GOAL * times["adamw_fused"]
    summary = "; ".join(f"{tag}: G {figures[f'{tag}_sophiag_fused_vs_adamw']:.2f}x, H "
                        f"{figures[f'{tag}_sophiah_fused_vs_adamw']:.2f}x, Lion {figures[f'{tag}_lion_vs_adamw']:.2f}x, "
                        f"Muon {figures[f'{tag}_muon_bf16_vs_adamw']:.2f}x, "
                        f"official loop {figures[f'{tag}_sophiag_official_loop_vs_adamw']:.2f}x AdamW"
                        for tag in ctx.scale.opt_models)
    return judged(ctx, ok, summary, figures, f"SophiaG/H fused <= {OPT_STEP_GOAL} x AdamW(fused=True) at 770M, "
                  "and faster than the official loop at both shapes (fp32 params)")


def bench_overhead(ctx):
    runs = {optim: windows(loop_records(ctx, optim, ctx.compiled)) for optim in ("adamw", "sophiag")}
    seconds = {optim: [step_seconds(r) for r in steady] for optim, steady in runs.items()}
    adamw, sophiag = statistics.median(seconds["adamw"]), statistics.median(seconds["sophiag"])
    k = ctx.scale.window
    figures = {"adamw_ms_per_step": round(1e3 * adamw, 2), "sophiag_ms_per_step": round(1e3 * sophiag, 2),
               "overhead": round(sophiag / adamw - 1, 4),
               "windows": [round(s / a - 1, 4) for s, a in zip(seconds["sophiag"], seconds["adamw"])],
               "floor": 0.5 / k, "hess_interval": k, "compiled": ctx.compiled}
    summary = f"{100 * figures['overhead']:+.1f}% over AdamW (floor +{100 * figures['floor']:.0f}%)"
    return judged(ctx, figures["overhead"] <= OVERHEAD_GOAL, summary, figures,
                  f"<= +{100 * OVERHEAD_GOAL:.0f}% per step, k = 10, half-batch Hessian",
                  f"median seconds per step over {len(seconds['adamw'])} windows of {k} steps, each with one refresh")


def bench_memory(ctx):
    if not ctx.cuda:
        return result("skip", "needs CUDA", note="needs CUDA: train.py logs memory/peak_mib on CUDA only")
    from scripts.hessian_memory import computed
    k = ctx.scale.window
    micro = ctx.scale.micro
    computed_mib = {kind: round(b / 2**20, 1) for kind, b in computed("gpt2_small", micro, ctx.dtype).items()} \
        if not ctx.smoke else {}
    figures = {"micro_batch": micro, "hess_micro_batch": micro, "compiled": ctx.compiled, "dtype": ctx.dtype,
               **{f"computed_{kind}_mib": mib for kind, mib in computed_mib.items()}}
    for optim in ("sophiag", "sophiah"):
        out_dir = ctx.tmp / f"memory_{optim}"
        records = train_steps(run_overrides(ctx, optim, ctx.compiled), 3 * k, out_dir, window=1)
        shutil.rmtree(out_dir)
        steady = windows(records, skip=k)  # after the first k steps: compiled, state allocated, first refresh done
        # a metrics line every step: the refresh after step s (s % k == k - 1) falls in the line of step s + 1
        with_refresh = [r for r in steady if r["step"] % k == 0]
        step_only = [r for r in steady if r["step"] % k != 0]
        for label, rows in (("step", step_only), ("step_with_refresh", with_refresh)):
            figures[f"{optim}_{label}_peak_mib"] = round(max(r["memory/peak_mib"] for r in rows), 1)
            figures[f"{optim}_{label}_reserved_mib"] = round(max(r["memory/reserved_mib"] for r in rows), 1)
    summary = ", ".join(f"{optim}: with a refresh {figures[f'{optim}_step_with_refresh_peak_mib']:,.0f} MiB vs a step "
                        f"alone {figures[f'{optim}_step_peak_mib']:,.0f} MiB" for optim in ("sophiag", "sophiah"))
    ok = figures["sophiag_step_with_refresh_peak_mib"] <= figures["sophiag_step_peak_mib"] + 1
    return judged(ctx, ok, summary, figures,
                  "SophiaG's refresh never raises the peak above a training step's (torch.cuda.max_memory_allocated "
                  "since the last metrics line, 1 MiB slack), the same micro-batch for both; SophiaH's recorded",
                  "computed_*: scripts/hessian_memory.py's activation and gradient bytes of one micro-batch, over "
                  "the weights (the measured peaks hold the weights and the optimizer state too)")


def paths_overrides(ctx, optim):
    """A few steps of config=gpt2_small_<optim> on the small model, each logged: two micro-batches a step, a
    Hessian refresh every second step, lr 1e-3 from the first step (so that every optimizer's loss falls at once)."""
    s = ctx.scale
    return [f"config=gpt2_small_{optim}", "data=shakespeare", f"device={ctx.device.type}", *s.paths_model,
            f"total_batch_size={2 * s.paths_micro}", f"micro_batch_size={s.paths_micro}", "warmup_steps=0",
            "optim.lr=1e-3", *(["optim.hess_interval=2"] if optim.startswith("sophia") else []),
            *([] if ctx.cuda else [f"cpu_peak_flops={CPU_PEAK}"])]


def path_run(ctx, name, overrides, launcher=(sys.executable,)):
    """One train.py run of train_paths or two_gpus, with dynamo's recompiles logged: its figures and problems."""
    out_dir = ctx.tmp / f"path_{name}"
    t0 = time.time()
    records, printed = train_steps(overrides, ctx.scale.paths_steps, out_dir, window=1, launcher=launcher,
                                   env={"TORCH_LOGS": "recompiles"}, output=True)
    shutil.rmtree(out_dir)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    header = next((line for line in printed.splitlines() if line.startswith("run ")), "")
    # every path (training micro-batches, a Hessian refresh, the first checkpoint-free steps) has run by half-way:
    # a recompile after that is one that would come back every few steps
    half = printed.find(f"step {ctx.scale.paths_steps // 2 + 1}/{ctx.scale.paths_steps}:")
    figures = {"first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
               "recompiles": printed.count("Recompiling function"),
               "recompiles_second_half": printed[half:].count("Recompiling function") if half >= 0 else None,
               "seconds": round(time.time() - t0, 1), "header": header[header.find("parameters, ") + 12:]}
    if any("memory/peak_mib" in r for r in records):
        figures["peak_mib"] = round(max(r.get("memory/peak_mib", 0) for r in records), 1)
    problems = []
    if not losses[-1] < losses[0]:
        problems.append(f"the loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f})")
    if figures["recompiles_second_half"] != 0:
        problems.append(f"{figures['recompiles_second_half']} recompiles in the second half of the run")
    if "torch._dynamo hit config." in printed:
        problems.append("dynamo's recompile limit hit: a function runs eagerly from then on")
    return figures, problems


def run_paths(ctx, runs):
    """runs: name -> (overrides, launcher, words its header must show). Several at once on a GPU (compiling keeps
    the CPU busy, the small model leaves the GPU idle), one at a time on a CPU. Returns (figures, problems)."""
    def one(item):
        name, (overrides, launcher, expected) = item
        try:
            figures, problems = path_run(ctx, name, overrides, launcher)
        except Exception as e:  # a run that crashed: its output's end is the finding
            return name, {}, [f"{type(e).__name__}: {str(e)[-600:]}"]
        problems += [f"its header lacks {word!r}" for word in expected if word not in figures["header"]]
        return name, figures, problems

    with ThreadPoolExecutor(max_workers=4 if ctx.cuda else 1) as pool:
        outcomes = list(pool.map(one, runs.items()))
    figures = {f"{name}_{key}": value for name, figs, _ in outcomes for key, value in figs.items()}
    problems = [f"{name}: {p}" for name, _, ps in outcomes for p in ps]
    return figures, problems


def bench_paths(ctx):
    backend = "nccl" if ctx.cuda else "gloo"
    fsdp_dtype = "bfloat16" if ctx.bf16 or not ctx.cuda else "float32"  # the bf16 policy, wherever bf16 is native
    one_process = (*TORCHRUN, "--nproc_per_node=1")
    runs = {optim: (paths_overrides(ctx, optim), (sys.executable,), [f"optimizer {optim}"])
            for optim in ("sophiag", "sophiah", "lion", "muon")}
    runs["ddp_one_process"] = (paths_overrides(ctx, "sophiag") + ["force_distributed=true"], one_process,
                               ["1 rank(s)", f"ddp over {backend}"])
    runs["fsdp_one_process"] = (paths_overrides(ctx, "sophiah") + ["parallel=fsdp", "force_distributed=true",
                                                                   f"dtype={fsdp_dtype}"], (sys.executable,),
                                ["1 rank(s)", f"{fsdp_dtype}, fsdp (sharded) over {backend}"])
    figures, problems = run_paths(ctx, runs)
    figures["compiled"] = ctx.compiled
    summary = f"{len(runs)} runs: " + ("every loss falls, recompiles bounded" if not problems else "; ".join(problems))
    return result("fail" if problems else "pass", summary[:400], figures,
                  f"goal, judged at every scale: in each run of {ctx.scale.paths_steps} steps the loss falls, no "
                  f"recompile in the second half, dynamo's limit never hit" + (f"; {'; '.join(problems)}" if problems else ""))


def bench_two_gpus(ctx):
    if not ctx.cuda or torch.cuda.device_count() < 2:
        return result("skip", "needs 2 GPUs", note=f"needs 2 CUDA GPUs: {torch.cuda.device_count() if ctx.cuda else 0} "
                                                    f"in use")
    two = (*TORCHRUN, "--nproc_per_node=2")
    dtype = "bfloat16" if ctx.bf16 else "float32"
    runs = {"ddp_two_ranks": (paths_overrides(ctx, "sophiag"), two, ["2 rank(s)", "ddp over nccl"]),
            "fsdp_two_ranks": (paths_overrides(ctx, "sophiah") + ["parallel=fsdp"], two,
                               ["2 rank(s)", f"{dtype}, fsdp (sharded) over nccl"])}
    figures, problems = run_paths(ctx, runs)
    summary = "2 NCCL ranks, DDP and FSDP: " + ("the losses fall" if not problems else "; ".join(problems))
    return result("fail" if problems else "pass", summary[:400], figures,
                  "goal: the loss falls, no recompile in the second half" + (f"; {'; '.join(problems)}" if problems
                                                                                else ""))


def bench_cuda_tests(ctx):
    if not ctx.cuda:
        return result("skip", "needs CUDA", note="needs CUDA: without a GPU pytest -m cuda skips every test")
    report = ctx.tmp / "cuda_tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-n", "4", "-p", "no:cacheprovider",
                           f"--junitxml={report}", "tests"], cwd=REPO_DIR, capture_output=True, text=True,
                          timeout=900)
    outcomes = {}
    if report.exists():
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
            outcomes[f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}"] = \
                {"failure": "failed", "error": "error", "skipped": "skipped"}[kinds[0]] if kinds else "passed"
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "error", "skipped")}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return result("pass" if proc.returncode == 0 else "fail",
                  f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
                  f"{counts['skipped']} skipped: {tail[0][:200]}", {"tests": outcomes, **counts},
                  "pytest exit status " + str(proc.returncode)
                  + ("" if proc.returncode == 0 else ": " + (proc.stdout + proc.stderr)[-3000:]))


BENCHMARKS = [  # name, the peer it is compared with, the benchmark; the correctness checks first
    ("train_paths", "the loss at the first step; dynamo's recompile limit", bench_paths),
    ("memory_refresh_vs_step", "a training step alone, same micro-batch", bench_memory),
    ("cuda_tests", "tests/test_cuda.py's references", bench_cuda_tests),
    ("two_gpus", "the loss at the first step", bench_two_gpus),
    ("train_throughput", "HF GPT2LMHeadModel, same shapes, precision and fused AdamW", bench_throughput),
    ("optimizer_step", "torch.optim.AdamW(fused=True); official loop (SophiaG fused=False)", bench_optimizer_step),
    ("sophia_overhead", "AdamW through the same loop", bench_overhead),
]


def environment(ctx, wall_s):
    hf_version = importlib.util.find_spec("transformers") and importlib.metadata.version("transformers")
    return {"device": torch.cuda.get_device_name(ctx.device) if ctx.cuda else platform.processor() or "cpu",
            "gpus": torch.cuda.device_count() if ctx.cuda else 0,
            "torch": torch.__version__, "cuda": torch.version.cuda, "bf16": ctx.bf16, "dtype": ctx.dtype,
            "python": platform.python_version(), "transformers": hf_version, "smoke": ctx.smoke,
            "compiled_by_default": ctx.compiled, "wall_s": round(wall_s, 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "notes": ctx.notes}


def write_json(path, ctx, results, wall_s):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps({"environment": environment(ctx, wall_s), "benchmarks": results}, indent=2) + "\n")
    os.replace(tmp, path)


def print_table(results, wall_s):
    rows = [("benchmark", "status", "s", "result", "compared with")]
    rows += [(r["name"], r["status"], f"{r['seconds']:.0f}", r["summary"][:110], r["reference"][:60]) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "skip")}
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped in {wall_s:.0f} s", flush=True)


def run_benchmarks(args, selected):
    t_start = time.time()
    ctx = Context(args.smoke, getattr(args, "device", None))
    results = []
    print(f"gpu_check{' --smoke' if args.smoke else ''}: {len(selected)} benchmarks on {ctx.device} "
          f"(torch {torch.__version__}), writing {args.out}", flush=True)
    try:
        for i, (name, reference, bench) in enumerate(selected, 1):
            print(f"[{i}/{len(selected)}] {name} ...", flush=True)
            t0 = time.time()
            try:
                res = bench(ctx)
            except Exception as e:
                res = result("fail", f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}",
                             note=traceback.format_exc()[-2000:])
            res = {"name": name, **res, "reference": reference, "seconds": round(time.time() - t0, 1)}
            results.append(res)
            print(f"    {res['status']} ({res['seconds']:.0f} s): {res['summary']}", flush=True)
            write_json(args.out, ctx, results, time.time() - t_start)
    finally:
        shutil.rmtree(ctx.tmp, ignore_errors=True)
    print_table(results, time.time() - t_start)
    return 1 if any(r["status"] == "fail" for r in results) else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="FILE.json: every figure of every benchmark")
    parser.add_argument("--smoke", action="store_true", help="toy shapes, any device (a CPU too)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--only", help="comma-separated benchmark names (default: all)")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    names = [name for name, _, _ in BENCHMARKS]
    only = args.only.split(",") if args.only else names
    unknown = [name for name in only if name not in names]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; the benchmarks: {', '.join(names)}")
    if not torch.cuda.is_available() and (args.device == "cuda" or not args.smoke):
        print(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda}): run it on "
              f"a GPU node, or add --smoke for the toy-shape benchmarks on this CPU", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.smoke:
        parser.error("--device cpu runs the toy shapes only: add --smoke")
    if not (REPO_DIR / "data" / "shakespeare" / "meta.json").exists():  # the corpus every train.py run reads
        try:
            from data.shakespeare.prepare import prepare
            prepare()
        except RuntimeError as e:  # the corpus package is missing: its one line names the fix
            print(f"gpu_check: {e}", file=sys.stderr)
            return 2
    if torch.cuda.is_available() and args.device != "cpu":
        torch.set_float32_matmul_precision("high")  # as train.py: TF32 for HF's fp32 matmuls on a GPU without bf16
    return run_benchmarks(args, [b for b in BENCHMARKS if b[0] in only])


if __name__ == "__main__":
    sys.exit(main())
