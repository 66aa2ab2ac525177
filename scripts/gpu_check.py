"""
The GPU acceptance check: what this project claims on a GPU, each claim measured in one process on one
GPU against a named reference, in under 8 minutes on one H100.

    python scripts/gpu_check.py --out gpu_check.json                  # on a GPU node
    python scripts/gpu_check.py --smoke --out smoke.json              # the same checks at toy shapes, any device
    python scripts/gpu_check.py --out x.json --only resume,two_process_ddp

Checks, in order (each: pass / fail / skip, its figures and the reference it was compared with):
  sophia_fused_vs_reference  SophiaG/SophiaH fused step vs the per-tensor reference (fused=False), fp32 and bf16 params
  gnb_closed_form            sophia.gnb_backward vs the Gauss-Newton diagonal of softmax regression, fp32 and bf16
  hutchinson_closed_form     sophia.hutchinson_backward vs the Hessian diagonal of quadratics
  gpt_vs_hf_logits           our GPT vs transformers' GPT2LMHeadModel with the same weights, fp32 and bf16 logits
  train_throughput           tokens/s and MFU through train.py's own train_step at the gpt2_small shape (block 1024,
                             bf16): AdamW and SophiaG, compiled and not, vs HF's model under the same settings
  optimizer_step             SophiaG/SophiaH fused vs torch.optim.AdamW(fused=True) and the official per-parameter
                             loop (SophiaG fused=False), at 124M and 770M shapes
  sophia_overhead            train.py's loop with SophiaG at k=10 and the half-batch Hessian vs AdamW (goal <= +6%)
  memory_refresh_vs_step     peak memory of a Hessian refresh vs a training step at the same micro-batch (CUDA only)
  resume                     train.py 10 + 10 steps vs 20 in one go (subprocesses): equal, every log line once
  two_process_ddp            train.py on 2 ranks sharing the one device (NCCL where it allows, else gloo) vs 1 process

Training data is a synthetic token file written to a temporary folder. --smoke runs every check at toy
shapes (on a CPU in about 2 minutes); its performance goals are recorded there but judged only at the real
shapes. --out gets {"environment": {...}, "checks": [{name, status, figures, reference, note, summary,
seconds}, ...]}, rewritten after every check, and a table is printed last. Exit status: 0 when no check
failed, 1 when one did, 2 for bad input (no GPU without --smoke, an unknown check name).
"""

import argparse
import contextlib
import dataclasses
import gc
import io
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
import warnings
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # `python scripts/x.py` puts scripts/, not the repo root, on the path

import sophia
import train
from data.common import write_meta
from mfu import estimate_mfu
from model import GPT

# Goals, judged at the real shapes (with --smoke only recorded: toy shapes say nothing about speed)
OVERHEAD_GOAL = 0.06    # SophiaG's loop (k=10, half-batch Hessian) over AdamW's: the paper's ~5% plus a little
OPT_STEP_GOAL = 1.5     # SophiaG/SophiaH fused step over AdamW(fused=True) at 770M (the same memory traffic)
HF_SPEED_GOAL = 0.95    # our tokens/s over HF's GPT2LMHeadModel under the same settings
# Tolerances
FP32_TOL = {"rtol": 1e-5, "atol": 1e-6}
BF16_TOL = {"rtol": 1.6e-2, "atol": 1e-5}   # torch.testing's defaults for bfloat16
SAMPLING_RTOL = 0.05    # an estimator's mean vs its closed form (its sampling noise is ~0.7% here)
FP32_LOGITS_TOL = 1e-4  # max |ours - HF| / max |HF|, fp32 with TF32 off
RUN_RTOL = {"cuda": 2e-2, "cpu": 1e-4}  # two runs of train.py that should agree: bf16 on the GPU, fp32 on the CPU
PAPER_HESS_BS = 480 * 1024  # SophiaG's step(bs=...) in the paper's runs


@dataclasses.dataclass(frozen=True)
class Scale:
    model: tuple          # Hydra overrides on top of the gpt2_small_* presets (none: GPT-2 124M, block 1024)
    vocab: int            # token ids in the synthetic data stay below it
    micro: int            # sequences per micro-batch; a training step is two of them
    warmup: int           # untimed steps (compilation) before timing
    timed: int            # timed steps per variant
    repeats: int          # overhead: pairs of 10-step windows, AdamW then SophiaG
    opt_shapes: dict      # optimizer_step: label -> (n_layer, n_embd, vocab, block)
    opt_steps: int
    hf: dict              # gpt_vs_hf_logits: GPT2Config sizes
    hf_tokens: tuple      # (batch, sequence length)
    small_model: tuple    # resume / two_process_ddp: model overrides
    small_batch: tuple    # (total_batch_size, micro_batch_size): 2 micro-batches, or 2 ranks of 1
    data_tokens: tuple    # (train, val)


FULL = Scale(model=(), vocab=50304, micro=12, warmup=2, timed=10, repeats=5,
             opt_shapes={"124M": (12, 768, 50304, 1024), "770M": (36, 1280, 50304, 1024)}, opt_steps=20,
             hf={"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "n_positions": 1024},
             hf_tokens=(2, 1024),
             small_model=("model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.block_size=256"),
             small_batch=(16, 8), data_tokens=(4_000_000, 300_000))
SMOKE = Scale(model=("model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64",
                     "model.vocab_size=512"),
              vocab=512, micro=2, warmup=1, timed=2, repeats=1,
              opt_shapes={"124M (toy)": (2, 64, 512, 64), "770M (toy)": (3, 96, 512, 64)}, opt_steps=3,
              hf={"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 512, "n_positions": 64}, hf_tokens=(2, 64),
              small_model=("model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
                           "model.vocab_size=512"),
              small_batch=(4, 2), data_tokens=(200_000, 20_000))


class Context:
    """What the checks share: the device, the scale, the synthetic data, and train.py runs built once."""

    def __init__(self, smoke):
        self.smoke = smoke
        self.scale = SMOKE if smoke else FULL
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda:0" if self.cuda else "cpu")
        self.bf16 = torch.cuda.is_bf16_supported() if self.cuda else True
        self.compiled_default = train.compile_enabled(SimpleNamespace(compile="auto"), self.device)  # the presets'
        self.notes = [] if self.bf16 else ["this GPU has no bf16: training runs in fp32, bf16 parameter checks skipped"]
        # on a CPU: a nominal peak for MFU (train.py would time matmuls in every run), one thread for toy shapes
        self.cpu_overrides = () if self.cuda else ("cpu_peak_flops=1e11",)
        if not self.cuda:
            torch.set_num_threads(1)
            self.notes.append("CPU: one thread; MFU against a nominal 1e11 FLOP/s (cpu_peak_flops)")
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.data_dir = write_token_data(self.tmp / "data", self.scale.vocab, *self.scale.data_tokens)
        self.runs = {}   # (optim, compiled) -> train.Run
        self.cache = {}  # results one check leaves for another

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn):
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def release(self, *keys):
        for key in keys or list(self.runs):
            run = self.runs.pop(key, None)
            if run is not None and run.lock is not None:
                run.lock.close()
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def write_token_data(data_dir, vocab_size, train_tokens, val_tokens, seed=0):
    """train.bin / val.bin / meta.json as data/common.open_split reads them: uint16 ids of a random walk of
    small steps modulo vocab_size (learnable, so that losses move)."""
    data_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        (np.cumsum(rng.integers(0, 8, n)) % vocab_size).astype(np.uint16).tofile(data_dir / f"{split}.bin")
    write_meta(data_dir, {"splits": {"train": {"tokens": train_tokens}, "val": {"tokens": val_tokens}},
                          "dtype": "uint16", "tokenizer": "synthetic", "source": "scripts/gpu_check.py"})
    return data_dir


def result(status, summary, figures=None, note=""):
    return {"status": status, "summary": summary, "figures": figures or {}, "note": note}


def judged(ctx, ok, summary, figures, goal):
    """A performance result: judged at the real shapes; with --smoke recorded as a pass."""
    figures["goal_met"] = bool(ok)
    if ctx.smoke:
        return result("pass", summary, figures, f"goal {goal}: recorded, not judged at --smoke's toy shapes")
    return result("pass" if ok else "fail", summary, figures, f"goal {goal}")


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def is_close(a, b, tol):
    try:
        torch.testing.assert_close(a, b, **tol)
        return True
    except AssertionError:
        return False


# -----------------------------------------------------------------------------------------------------
# train.py, in this process: its config composed as train.py composes it, its Run, its steps

def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(REPO_DIR / "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def get_run(ctx, optim, compiled):
    """train.py's Run for config=gpt2_small_<optim> at this scale, two micro-batches per step; Sophia with
    k=10 and the paper's half-batch Hessian (one micro-batch). Built once per (optim, compiled)."""
    key = (optim, compiled)
    if key not in ctx.runs:
        s, name = ctx.scale, f"{optim}_{'compiled' if compiled else 'eager'}"
        overrides = [f"config=gpt2_small_{optim}", *s.model, f"data.dir={ctx.data_dir}", f"out_dir={ctx.tmp / name}",
                     f"run_name={name}", f"compile={str(compiled).lower()}", f"total_batch_size={2 * s.micro}",
                     f"micro_batch_size={s.micro}", "warmup_steps=0", "eval_steps=1", *ctx.cpu_overrides]
        if optim == "sophiag":
            overrides += ["optim.hess_interval=10", f"optim.hess_batch_size={s.micro}"]
        cfg = compose(overrides)
        plan = train.plan_batches(cfg, 1)
        with contextlib.redirect_stdout(io.StringIO()):  # the run's header lines
            env = train.setup_processes(cfg)
            run = train.build_run(cfg, env, plan)
        run.model.train()
        ctx.runs[key] = run
    return ctx.runs[key]


def loop(run, n, refresh=True):
    """n steps of train.py's loop: train_step, and refresh_hessian every k steps (Sophia)."""
    cfg, plan, progress = run.cfg, run.plan, run.progress
    k = cfg.optim.get("hess_interval", 0)
    for _ in range(n):
        train.train_step(run, train.get_lr(progress.step, cfg, plan.lr_decay_steps))
        if refresh and plan.sophia and progress.step % k == k - 1:
            train.refresh_hessian(run)
        progress.step += 1


def throughput(ctx, run, step, label):
    """Warm up (compilation), then time ctx.scale.timed steps: figures of one variant."""
    for _ in range(ctx.scale.warmup):
        step()
    seconds = ctx.timed(lambda: [step() for _ in range(ctx.scale.timed)]) / ctx.scale.timed
    tokens_per_s = run.cfg.total_batch_size * run.cfg.model.block_size / seconds
    utilisation = estimate_mfu(tokens_per_s, run.raw_model.flops_per_token(), run.peak_flops)
    return {f"{label}_ms_per_step": round(1e3 * seconds, 2), f"{label}_tokens_per_s": round(tokens_per_s, 1),
            f"{label}_mfu": round(utilisation, 4)}


def hf_step(run, compiled):
    """One step of HF's GPT2LMHeadModel with run's weights, batches, precision, accumulation and clipping,
    and torch's fused AdamW (train.py's AdamW)."""
    cfg, env, plan = run.cfg, run.env, run.plan
    hf = run.raw_model.to_hf(attn_implementation="sdpa").train()
    forward = torch.compile(hf) if compiled else hf
    params = list(hf.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), fused=True)
    position = [0]

    def step():
        for _ in range(plan.grad_accum):
            x, _ = run.streams.train.batch(position[0], cfg.micro_batch_size, env.device)
            position[0] += cfg.micro_batch_size
            with env.autocast():
                loss = forward(input_ids=x, labels=x).loss  # HF shifts the labels itself
            (loss / plan.grad_accum).backward()
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)):  # train_step's one sync
            opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# -----------------------------------------------------------------------------------------------------
# Correctness on the device

def sophia_trajectory(ctx, cls, dtype, fused, values=None):
    """Six steps with a Hessian refresh every second one, from fixed random gradients (rounded to `values`,
    then held in dtype): the final params and state. Five equal-size weights go through one bundled call
    (sophia.BUNDLE = 4) and one alone."""
    gen = torch.Generator().manual_seed(0)

    def randn(shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(values or dtype).to(ctx.device, dtype)

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
    flat = {"param": [p.detach() for p in params], "exp_avg": [opt.state[p]["exp_avg"] for p in params],
            "hessian": [opt.state[p]["hessian"] for p in params]}
    return {kind: torch.cat([t.double().flatten() for t in tensors]).cpu() for kind, tensors in flat.items()}, opt


def compare_fp32(fused, reference, label):
    """fp32: the fused kernel computes the reference's formula; equal up to round-off."""
    figures = {f"{label}_{kind}_max_abs_diff": max_diff(fused[kind], reference[kind]) for kind in fused}
    failed = [f"{label} {kind}" for kind in fused if not is_close(fused[kind], reference[kind], FP32_TOL)]
    return figures, failed


def compare_bf16(fused, reference, exact, label):
    """bf16: the two paths round at different places (the fused kernel once per step, the reference after every
    op), so they drift apart by a few bf16 ulps. Each is compared with the exact trajectory (float64 from the same
    bf16 values): the fused path must be at least as accurate as the reference path, on average and at worst
    (x1.5)."""
    figures, failed = {}, []
    for kind in fused:
        errors = {path: (values[kind] - exact[kind]).abs() for path, values in (("fused", fused), ("reference", reference))}
        for path, error in errors.items():
            figures[f"{label}_{kind}_{path}_mean_abs_err"] = error.mean().item()
            figures[f"{label}_{kind}_{path}_max_abs_err"] = error.max().item()
        if errors["fused"].mean() > errors["reference"].mean() or \
                errors["fused"].max() > 1.5 * errors["reference"].max() + 1e-12:
            failed.append(f"{label} {kind}")
    return figures, failed


def check_sophia_fused(ctx):
    figures, failed = {}, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for cls in (sophia.SophiaG, sophia.SophiaH):
            (fused, opt), (reference, _) = (sophia_trajectory(ctx, cls, torch.float32, f) for f in (True, False))
            more, bad = compare_fp32(fused, reference, f"{cls.__name__}_float32")
            figures.update(more)
            failed += bad + ([f"{cls.__name__}: the fused step was not compiled"] if opt._compile_failed else [])
            if ctx.bf16:
                (fused, _), (reference, _) = (sophia_trajectory(ctx, cls, torch.bfloat16, f) for f in (True, False))
                exact, _ = sophia_trajectory(ctx, cls, torch.float64, False, values=torch.bfloat16)
                more, bad = compare_bf16(fused, reference, exact, f"{cls.__name__}_bfloat16")
                figures.update(more)
                failed += bad
    fallback = [str(w.message)[:200] for w in caught if "torch.compile failed" in str(w.message)]
    worst32 = max(v for k, v in figures.items() if "float32" in k)
    summary = f"fp32 max|Δ| {worst32:.1e}"
    if ctx.bf16:
        ratio = max(figures[k] / max(figures[k.replace("fused", "reference")], 1e-30)
                    for k in figures if "fused_mean_abs_err" in k)
        summary += f", bf16 mean error vs exact <= {ratio:.2f}x the reference path's"
    note = f"fp32: fused vs reference within {FP32_TOL}; bf16: fused and reference vs float64 from the same bf16 " \
           f"values, the fused path's mean error <= the reference's, max error <= 1.5x"
    note += "" if ctx.bf16 else "; bf16 skipped: this GPU has no bf16"
    note += f"; {fallback[0]}" if fallback else ""
    if failed or fallback:
        return result("fail", f"differ: {', '.join(failed) or 'compile fell back to eager'}", figures, note)
    return result("pass", summary, figures, note)


def gnb_error(ctx, dtype, replicas=40_000, n=5, d=3, vocab=4):
    """Softmax regression logits_n = W x_n, mean CE over n points: the Gauss-Newton diagonal of the mean loss
    is (1/n) Σ x_nd² p_nv (1 − p_nv). GNB's N·ĝ² is unbiased for it; R replicas of W give R independent ĝ in
    one gnb_backward call (replica r's own ĝ is R·W.grad[r]). Returns (max relative error, max |mean ĝ|)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(ctx.device, dtype)
    w = torch.randn(vocab, d, generator=gen, dtype=torch.float64).to(ctx.device, dtype)
    xe, we = x.double().cpu(), w.double().cpu()  # the values the device computes with
    probs = torch.softmax(xe @ we.T, dim=-1)
    gauss_newton = torch.einsum("nd,nv->vd", xe ** 2, probs * (1 - probs)) / n
    wr = w.expand(replicas, vocab, d).clone().requires_grad_()
    logits = torch.einsum("nd,rvd->rnv", x, wr)
    sophia.gnb_backward(logits, 1.0, torch.Generator(device=ctx.device).manual_seed(1))
    g_hat = replicas * wr.grad.double().cpu()
    estimate = (n * g_hat ** 2).mean(0)
    return ((estimate - gauss_newton).abs() / gauss_newton).max().item(), g_hat.mean(0).abs().max().item()


def check_gnb(ctx):
    figures = {}
    for dtype in [torch.float32] + ([torch.bfloat16] if ctx.bf16 else []):
        label = str(dtype).split(".")[-1]
        figures[f"{label}_max_rel_error"], figures[f"{label}_max_abs_mean_grad"] = gnb_error(ctx, dtype)
    ok = all(v <= SAMPLING_RTOL for k, v in figures.items() if "rel_error" in k) and \
        all(v <= 0.02 for k, v in figures.items() if "mean_grad" in k)
    summary = ", ".join(f"{k.split('_')[0]} rel err {v:.3f}" for k, v in figures.items() if "rel_error" in k)
    note = f"max relative error <= {SAMPLING_RTOL} (sampling noise ~0.007 at R = 40,000), |mean ĝ| <= 0.02"
    return result("pass" if ok else "fail", summary, figures, note)


def hutchinson_errors(ctx, probe, replicas=20_000, n=10):
    """loss = Σ_r ½ x_rᵀ A x_r: the Hessian is A for every replica, so one call draws R probes. Returns
    (max |estimate − diag A| / its 5σ bound) from the per-probe variance Σ_{j≠i} A_ij² (+ 2 A_ii², Gaussian)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = q @ q.T / n + torch.diag(torch.linspace(1.0, 5.0, n, dtype=torch.float64))
    x = torch.randn(replicas, n, generator=gen).to(ctx.device).requires_grad_()
    a_dev = a.to(ctx.device, torch.float32)
    loss = 0.5 * ((x @ a_dev) * x).sum()
    sophia.hutchinson_backward(loss, [x], 1.0, torch.Generator(device=ctx.device).manual_seed(2), probe=probe)
    estimate = x.grad.double().mean(0).cpu()
    variance = (a ** 2).sum(1) - torch.diag(a) ** 2 + (2 * torch.diag(a) ** 2 if probe == "gaussian" else 0)
    return ((estimate - torch.diag(a)).abs() / (5 * (variance / replicas).sqrt())).max().item()


def check_hutchinson(ctx):
    figures = {f"{probe}_max_error_over_5sigma": hutchinson_errors(ctx, probe) for probe in ("rademacher", "gaussian")}
    # one Rademacher probe is exact on a diagonal Hessian: u⊙(D u) = D
    diag = torch.linspace(-2.0, 3.0, 10, device=ctx.device)
    x = torch.randn(4, 10, device=ctx.device, requires_grad=True)
    sophia.hutchinson_backward(0.5 * (diag * x * x).sum(), [x], 1.0, torch.Generator(device=ctx.device).manual_seed(3))
    figures["diagonal_exact_max_abs_diff"] = max_diff(x.grad, diag.expand(4, 10))
    ok = all(v <= 1 for k, v in figures.items() if "sigma" in k) and figures["diagonal_exact_max_abs_diff"] <= 1e-6
    summary = ", ".join(f"{k.split('_')[0]} {v:.2f} of 5σ" for k, v in figures.items() if "sigma" in k)
    return result("pass" if ok else "fail", summary + f", diagonal exact to {figures['diagonal_exact_max_abs_diff']:.0e}",
                  figures, "dense A: mean of 20,000 probes within 5σ of diag(A); diagonal D: one probe gives D")


def check_gpt_vs_hf(ctx):
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
        transformers.logging.set_verbosity_error()  # its notes on our toy configs
    except ImportError as e:
        return result("skip", "transformers not installed", note=f"transformers is not installed ({e}): "
                      f"pip install -r requirements.txt to compare with HF's GPT2LMHeadModel")
    torch.manual_seed(0)
    config = GPT2Config(**ctx.scale.hf, bos_token_id=0, eos_token_id=0, activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                        scale_attn_by_inverse_layer_idx=True,
                        attn_implementation="eager")  # HF's own attention arithmetic: independent of our SDPA
    hf = GPT2LMHeadModel(config).to(ctx.device).eval()
    ours = GPT.from_hf(hf).to(ctx.device).eval()
    batch, seq = ctx.scale.hf_tokens
    idx = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(ctx.device)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 off: fp32 against fp32
    try:
        with torch.no_grad():
            ref, got = hf(idx).logits.float(), ours(idx)[0].float()
            figures = {"fp32_max_rel_diff": max_diff(got, ref) / ref.abs().max().item()}
            if ctx.bf16:
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
                    ref16, got16 = hf(idx).logits.float(), ours(idx)[0].float()
                figures["bf16_rms_rel_diff"] = ((got16 - ref16).norm() / ref16.norm()).item()
                figures["hf_bf16_vs_fp32_rms_rel"] = ((ref16 - ref).norm() / ref.norm()).item()  # bf16's own noise
                figures["bf16_argmax_agreement"] = (got16.argmax(-1) == ref16.argmax(-1)).float().mean().item()
    finally:
        torch.set_float32_matmul_precision(precision)
    bf16_tol = max(1e-2, 2 * figures.get("hf_bf16_vs_fp32_rms_rel", 0))
    ok = figures["fp32_max_rel_diff"] <= FP32_LOGITS_TOL and figures.get("bf16_rms_rel_diff", 0) <= bf16_tol
    summary = f"fp32 {figures['fp32_max_rel_diff']:.1e}" + (
        f", bf16 {figures['bf16_rms_rel_diff']:.1e} (HF's bf16 noise {figures['hf_bf16_vs_fp32_rms_rel']:.1e})"
        if ctx.bf16 else "")
    return result("pass" if ok else "fail", summary, figures,
                  f"{batch}x{seq} tokens, {ctx.scale.hf}; fp32 max rel diff <= {FP32_LOGITS_TOL}, bf16 rms rel diff "
                  f"<= max(1e-2, 2 x HF's own bf16-vs-fp32 difference)")


# -----------------------------------------------------------------------------------------------------
# Speed and memory

def check_train_throughput(ctx):
    figures = {}
    variants = [(optim, compiled) for compiled in (False, True) for optim in ("adamw", "sophiag")]
    hf_variants = [False, True]
    if not ctx.cuda:  # compiling takes ~30 s a model on a CPU (tests/test_compile.py covers compile=true there)
        variants, hf_variants = variants[:2], [False]
    for optim, compiled in variants:
        run = get_run(ctx, optim, compiled)
        mode = "compiled" if compiled else "eager"
        figures.update(throughput(ctx, run, lambda run=run: loop(run, 1, refresh=False), f"ours_{optim}_{mode}"))
        if compiled != ctx.compiled_default:
            ctx.release((optim, compiled))
    figures["dtype"], figures["tokens_per_step"] = run.env.dtype, run.cfg.total_batch_size * run.cfg.model.block_size
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        have_hf = True
    except ImportError:
        have_hf = False
    if have_hf:
        base = get_run(ctx, "adamw", ctx.compiled_default)
        for compiled in hf_variants:
            mode = "compiled" if compiled else "eager"
            figures.update(throughput(ctx, base, hf_step(base, compiled), f"hf_adamw_{mode}"))
    ratios = {mode: figures[f"ours_adamw_{mode}_tokens_per_s"] / figures[f"hf_adamw_{mode}_tokens_per_s"]
              for mode in ("eager", "compiled") if f"hf_adamw_{mode}_tokens_per_s" in figures}
    figures.update({f"ours_vs_hf_{mode}": round(r, 3) for mode, r in ratios.items()})
    best = "compiled" if ctx.cuda else "eager"
    summary = (f"AdamW {best} {figures[f'ours_adamw_{best}_tokens_per_s']:,.0f} tok/s, "
               f"MFU {100 * figures[f'ours_adamw_{best}_mfu']:.1f}%; " +
               ", ".join(f"{r:.2f}x HF {m}" for m, r in ratios.items()))
    note = "" if have_hf else "HF comparison skipped: transformers is not installed. "
    note += "" if ctx.cuda else "CPU: eager only (compiled variants on CUDA). "
    note += f"dtype {run.env.dtype}" + ("" if run.env.dtype == "bfloat16" or not ctx.cuda else " (no bf16 on this GPU)")
    res = judged(ctx, all(r >= HF_SPEED_GOAL for r in ratios.values()), summary, figures,
                 f"ours >= {HF_SPEED_GOAL} x HF's tokens/s, eager and compiled")
    res["note"] = f"{note}; {res['note']}"
    return res


def gpt2_param_groups(ctx, n_layer, d, vocab, block):
    """fp32 parameters (train.py's master weights) and random gradients of GPT-2's shapes, in model.py's
    two weight-decay groups."""
    decay = [(vocab, d), (block, d)] + [s for _ in range(n_layer) for s in [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]]
    no_decay = [(d,)] * (2 * n_layer + 1)
    torch.manual_seed(0)
    groups = []
    for shapes, wd in ((decay, 0.1), (no_decay, 0.0)):
        params = [torch.nn.Parameter(torch.randn(s, device=ctx.device) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        groups.append({"params": params, "weight_decay": wd})
    return groups


OPTIMIZERS = {
    "adamw_fused": (lambda g: torch.optim.AdamW(g, lr=6e-4, betas=(0.9, 0.95), fused=True), {}),
    "sophiag_fused": (lambda g: sophia.SophiaG(g, lr=6e-4, rho=0.05), {"bs": PAPER_HESS_BS}),
    "sophiah_fused": (lambda g: sophia.SophiaH(g, lr=6e-4, rho=0.05), {"bs": 1}),
    "sophiag_official_loop": (lambda g: sophia.SophiaG(g, lr=6e-4, rho=0.05, fused=False), {"bs": PAPER_HESS_BS}),
}


def optimizer_step_times(ctx, shape):
    """Median seconds per step of each optimizer on one parameter set, steps interleaved."""
    groups = gpt2_param_groups(ctx, *shape)
    optimizers = {}
    for name, (make, kwargs) in OPTIMIZERS.items():
        opt = make([dict(g) for g in groups])
        if isinstance(opt, sophia.SophiaG):
            opt.update_hessian()  # h from the random gradients, so the clip is exercised
        for _ in range(3):
            opt.step(**kwargs)
        optimizers[name] = (opt, kwargs)
    times = {name: [] for name in optimizers}
    for _ in range(ctx.scale.opt_steps):
        for name, (opt, kwargs) in optimizers.items():
            times[name].append(ctx.timed(lambda: opt.step(**kwargs)))
    hessian = statistics.median(ctx.timed(optimizers["sophiag_fused"][0].update_hessian) for _ in range(5))
    n_params = sum(p.numel() for g in groups for p in g["params"])
    return {name: statistics.median(ts) for name, ts in times.items()}, hessian, n_params


def check_optimizer_step(ctx):
    figures, ok = {}, True
    for label, shape in ctx.scale.opt_shapes.items():
        times, hessian, n_params = optimizer_step_times(ctx, shape)
        tag = label.split()[0]
        figures[f"{tag}_params"] = n_params
        for name, seconds in times.items():
            figures[f"{tag}_{name}_ms"] = round(1e3 * seconds, 3)
            figures[f"{tag}_{name}_vs_adamw"] = round(seconds / times["adamw_fused"], 3)
        figures[f"{tag}_sophiag_update_hessian_ms"] = round(1e3 * hessian, 3)
        ok &= times["sophiag_fused"] < times["sophiag_official_loop"]
        if tag == "770M":
            ok &= max(times["sophiag_fused"], times["sophiah_fused"]) <= OPT_STEP_GOAL * times["adamw_fused"]
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    summary = "; ".join(f"{tag}: G {figures[f'{tag}_sophiag_fused_vs_adamw']:.2f}x, H "
                        f"{figures[f'{tag}_sophiah_fused_vs_adamw']:.2f}x AdamW, official loop "
                        f"{figures[f'{tag}_sophiag_official_loop_vs_adamw']:.2f}x"
                        for tag in (label.split()[0] for label in ctx.scale.opt_shapes))
    return judged(ctx, ok, summary, figures, f"SophiaG/H fused <= {OPT_STEP_GOAL} x AdamW(fused=True) at 770M, "
                  "and faster than the official loop at both shapes (fp32 params)")


def check_sophia_overhead(ctx):
    runs = {optim: get_run(ctx, optim, ctx.compiled_default) for optim in ("adamw", "sophiag")}
    for run in runs.values():
        loop(run, 10)  # warm-up: compilation, the first Hessian refresh
    times = {optim: [] for optim in runs}
    for _ in range(ctx.scale.repeats):
        for optim, run in runs.items():  # 10 consecutive steps hold exactly one refresh (k = 10)
            times[optim].append(ctx.timed(lambda run=run: loop(run, 10)) / 10)
    adamw, sophiag = statistics.median(times["adamw"]), statistics.median(times["sophiag"])
    plan = runs["sophiag"].plan
    figures = {"adamw_ms_per_step": round(1e3 * adamw, 2), "sophiag_ms_per_step": round(1e3 * sophiag, 2),
               "overhead": round(sophiag / adamw - 1, 4),
               "pairs": [round(s / a - 1, 4) for s, a in zip(times["sophiag"], times["adamw"])],
               "floor": plan.hess_batch / runs["sophiag"].cfg.total_batch_size / 10,
               "hess_interval": 10, "hess_batch": plan.hess_batch, "compiled": ctx.compiled_default}
    summary = f"+{100 * figures['overhead']:.1f}% over AdamW (floor +{100 * figures['floor']:.0f}%)"
    return judged(ctx, figures["overhead"] <= OVERHEAD_GOAL, summary, figures,
                  f"<= +{100 * OVERHEAD_GOAL:.0f}% per step, k = 10, half-batch Hessian")


def check_memory(ctx):
    if not ctx.cuda:
        return result("skip", "needs CUDA", note="needs CUDA: torch.cuda.max_memory_allocated")
    run = get_run(ctx, "sophiag", ctx.compiled_default)
    assert run.plan.hess_micro == run.cfg.micro_batch_size  # the same micro-batch for both
    loop(run, 10)  # warm: compiled, optimizer state allocated

    def peak(fn):
        ctx.sync()
        torch.cuda.reset_peak_memory_stats(ctx.device)
        before = torch.cuda.memory_allocated(ctx.device)
        fn()
        ctx.sync()
        return torch.cuda.max_memory_allocated(ctx.device), before

    lr = train.get_lr(run.progress.step, run.cfg, run.plan.lr_decay_steps)
    step_peak, step_before = peak(lambda: train.train_step(run, lr))
    refresh_peak, refresh_before = peak(lambda: train.refresh_hessian(run))
    mib = 2 ** 20
    figures = {"step_peak_mib": round(step_peak / mib, 1), "refresh_peak_mib": round(refresh_peak / mib, 1),
               "step_start_mib": round(step_before / mib, 1), "refresh_start_mib": round(refresh_before / mib, 1),
               "micro_batch": run.cfg.micro_batch_size, "compiled": ctx.compiled_default}
    summary = f"refresh {figures['refresh_peak_mib']:,.0f} MiB vs step {figures['step_peak_mib']:,.0f} MiB"
    return result("pass" if refresh_peak <= step_peak else "fail", summary, figures,
                  "goal: a Hessian refresh never peaks above a training step (torch.cuda.max_memory_allocated)")


# -----------------------------------------------------------------------------------------------------
# train.py as users run it: resume, two processes

def small_run_args(ctx, out_dir, *extra):
    """A short SophiaG run of train.py (Hessian every 5 steps, so refreshes fall on both sides of step 10)."""
    total, micro = ctx.scale.small_batch
    return ["config=gpt2_small_sophiag", *ctx.scale.small_model, f"data.dir={ctx.data_dir}", f"out_dir={out_dir}",
            f"total_batch_size={total}", f"micro_batch_size={micro}", "max_steps=20", "lr_decay_steps=20",
            "warmup_steps=2", "eval_interval=10", "eval_steps=2", "log_interval=1", "ckpt_interval=10",
            "optim.hess_interval=5", *ctx.cpu_overrides, *extra]


def start(ctx, args, launcher=(sys.executable, str(REPO_DIR / "train.py"))):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    if not ctx.cuda:
        env["OMP_NUM_THREADS"] = "1"  # two runs at once on a few cores
    return subprocess.Popen([*launcher, *args], cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def finish(proc, what, timeout=400):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise RuntimeError(f"{what}: no exit within {timeout} s; last output: {output[-500:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}: {output[-1500:]}")
    return output


def read_metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def by_step(records, key):
    return {r["step"]: r[key] for r in records if r.get(key) is not None}


def worst_rel_diffs(records, reference, keys):
    """Per key: the largest relative difference over the steps; None where the steps logged differ."""
    worst = {}
    for key in keys:
        a, b = by_step(records, key), by_step(reference, key)
        worst[key] = None if a.keys() != b.keys() or not a else \
            max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in a)
    return worst


COMPARED = ("train/loss", "val/loss", "grad_norm", "optim/hessian_norm")


def check_resume(ctx):
    whole, split = ctx.tmp / "resume_whole", ctx.tmp / "resume_split"
    procs = [start(ctx, small_run_args(ctx, whole)), start(ctx, small_run_args(ctx, split, "max_steps=10"))]
    whole_out, first_out = (finish(p, what) for p, what in zip(procs, ("the 20-step run", "the first 10 steps")))
    resumed_out = finish(start(ctx, small_run_args(ctx, split)), "the resumed run")
    ctx.cache["one_process"] = read_metrics(whole)
    records, reference = read_metrics(split), read_metrics(whole)
    rtol = RUN_RTOL[ctx.device.type]
    worst = worst_rel_diffs(records, reference, COMPARED)
    train_steps = [r["step"] for r in records if "train/loss" in r]
    eval_steps = [r["step"] for r in records if "val/loss" in r]
    figures = {f"max_rel_diff_{k.replace('/', '_')}": v for k, v in worst.items()}
    figures.update(train_steps_logged=train_steps, eval_steps_logged=eval_steps, rtol=rtol)
    compile_lines = [line for line in whole_out.splitlines() if line.startswith("compiled: ")]
    if compile_lines:
        figures["compile_line"] = compile_lines[0]
    problems = [k for k, v in worst.items() if v is None or v > rtol]
    if train_steps != list(range(1, 21)) or eval_steps != [0, 10, 20]:
        problems.append("log lines not each once")
    if "resumed from" not in resumed_out or "at step 10" not in resumed_out:
        problems.append("the second run did not resume at step 10")
    summary = "loss max rel diff " + (f"{worst['train/loss']:.1e}" if worst["train/loss"] is not None else "n/a")
    summary += ", steps 1-20 logged once" if "log lines not each once" not in problems else ""
    return result("fail" if problems else "pass", f"{summary}{': ' + ', '.join(problems) if problems else ''}",
                  figures, f"10 + 10 steps vs 20, SophiaG with k = 5, {ctx.device.type}; relative tolerance {rtol}")


def check_two_process_ddp(ctx):
    if "one_process" not in ctx.cache:  # the resume check's 20-step run, or the same run now
        finish(start(ctx, small_run_args(ctx, ctx.tmp / "ddp_one")), "the one-process run")
        ctx.cache["one_process"] = read_metrics(ctx.tmp / "ddp_one")
    reference = ctx.cache["one_process"]
    notes = []
    for backend in ("nccl", "gloo") if ctx.cuda else ("gloo",):
        out = ctx.tmp / f"ddp_{backend}"
        launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(Path(__file__).resolve()), "--ddp-worker", backend)
        try:
            output = finish(start(ctx, small_run_args(ctx, out, "run_name=ddp"), launcher), f"torchrun ({backend})")
            break
        except RuntimeError as e:
            notes.append(f"{backend} failed: {str(e)[-300:]}")
            shutil.rmtree(out, ignore_errors=True)
    else:
        return result("fail", "no backend ran 2 processes", note="; ".join(notes))
    rtol = RUN_RTOL[ctx.device.type]
    worst = worst_rel_diffs(read_metrics(out), reference, COMPARED)
    figures = {f"max_rel_diff_{k.replace('/', '_')}": v for k, v in worst.items()}
    figures.update(backend=backend, rtol=rtol)
    problems = [k for k, v in worst.items() if v is None or v > rtol]
    if "2 rank(s) x 1 micro-batch(es)" not in output:
        problems.append("not 2 ranks")
    notes.append(f"2 ranks on one {ctx.device.type} device, {backend}, vs 1 process with 2 micro-batches; "
                 f"relative tolerance {rtol}")
    summary = f"{backend}: loss max rel diff " + (f"{worst['train/loss']:.1e}" if worst["train/loss"] is not None else "n/a")
    return result("fail" if problems else "pass", summary + (f": {', '.join(problems)}" if problems else ""),
                  figures, "; ".join(notes))


def ddp_worker(backend, overrides):
    """One rank of the two_process_ddp check, under torchrun: train.py's own loop with both ranks on device 0
    (train.py would put rank 1 on cuda:1) and the given backend."""
    original = train.setup_processes

    def setup_on_one_device(cfg):
        world_size = os.environ["WORLD_SIZE"]
        os.environ.update(WORLD_SIZE="1", LOCAL_RANK="0")  # the device and precision train.py picks for rank 0
        try:
            env = original(cfg)
        finally:
            os.environ["WORLD_SIZE"] = world_size
        torch.distributed.init_process_group(backend=backend, timeout=timedelta(minutes=5))
        return dataclasses.replace(env, world_size=int(world_size))

    train.setup_processes = setup_on_one_device
    try:
        train.train(compose(overrides))
    except (train.ConfigError, train.RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


# -----------------------------------------------------------------------------------------------------

CHECKS = [  # name, the reference it is compared with, the check
    ("sophia_fused_vs_reference", "SophiaG/SophiaH fused=False (per-tensor reference)", check_sophia_fused),
    ("gnb_closed_form", "Gauss-Newton diagonal of softmax regression (closed form)", check_gnb),
    ("hutchinson_closed_form", "Hessian diagonal of quadratics (closed form)", check_hutchinson),
    ("gpt_vs_hf_logits", "transformers GPT2LMHeadModel, same weights (eager attention)", check_gpt_vs_hf),
    ("train_throughput", "HF GPT2LMHeadModel, same batch, precision and AdamW", check_train_throughput),
    ("optimizer_step", "torch.optim.AdamW(fused=True); official loop (SophiaG fused=False)", check_optimizer_step),
    ("sophia_overhead", "AdamW through the same loop", check_sophia_overhead),
    ("memory_refresh_vs_step", "a training step at the same micro-batch", check_memory),
    ("resume", "one uninterrupted 20-step run", check_resume),
    ("two_process_ddp", "one process, two micro-batches", check_two_process_ddp),
]


def environment(ctx, wall_s):
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    return {"device": torch.cuda.get_device_name(ctx.device) if ctx.cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "bf16": ctx.bf16,
            "python": platform.python_version(), "transformers": hf_version, "smoke": ctx.smoke,
            "compiled_by_default": ctx.compiled_default, "wall_s": round(wall_s, 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "notes": ctx.notes}


def write_json(path, ctx, results, wall_s):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps({"environment": environment(ctx, wall_s), "checks": results}, indent=2) + "\n")
    os.replace(tmp, path)


def print_table(results, wall_s):
    rows = [("check", "status", "s", "result", "compared with")]
    rows += [(r["name"], r["status"], f"{r['seconds']:.0f}", r["summary"][:90], r["reference"][:60]) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "skip")}
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped in {wall_s:.0f} s", flush=True)


def run_checks(args, selected):
    t_start, threads = time.time(), torch.get_num_threads()
    ctx = Context(args.smoke)
    results = []
    print(f"gpu_check{' --smoke' if args.smoke else ''}: {len(selected)} checks on {ctx.device} "
          f"(torch {torch.__version__}), writing {args.out}", flush=True)
    try:
        for i, (name, reference, check) in enumerate(selected, 1):
            print(f"[{i}/{len(selected)}] {name} ...", flush=True)
            t0 = time.time()
            try:
                res = check(ctx)
            except Exception as e:
                res = result("fail", f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}",
                             note=traceback.format_exc()[-2000:])
            res = {"name": name, **res, "reference": reference, "seconds": round(time.time() - t0, 1)}
            results.append(res)
            print(f"    {res['status']} ({res['seconds']:.0f} s): {res['summary']}", flush=True)
            write_json(args.out, ctx, results, time.time() - t_start)
            if check is check_memory:  # the last check of the in-process runs
                ctx.release()
    finally:
        ctx.release()
        shutil.rmtree(ctx.tmp, ignore_errors=True)
        torch.set_num_threads(threads)
    print_table(results, time.time() - t_start)
    return 1 if any(r["status"] == "fail" for r in results) else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="FILE.json: every figure of every check")
    parser.add_argument("--smoke", action="store_true", help="toy shapes, any device (a CPU too)")
    parser.add_argument("--only", help="comma-separated check names (default: all)")
    parser.add_argument("--ddp-worker", choices=["nccl", "gloo"], help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)  # the worker's Hydra overrides
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    if args.ddp_worker:
        return ddp_worker(args.ddp_worker, args.overrides)
    if not args.out or args.overrides:
        parser.error("give --out FILE.json (and no other arguments)")
    names = [name for name, _, _ in CHECKS]
    only = args.only.split(",") if args.only else names
    unknown = [name for name in only if name not in names]
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; the checks: {', '.join(names)}")
    if not torch.cuda.is_available() and not args.smoke:
        print(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda}): run it on "
              f"a GPU node, or add --smoke for the toy-shape checks on this CPU", file=sys.stderr)
        return 2
    return run_checks(args, [c for c in CHECKS if c[0] in only])


if __name__ == "__main__":
    sys.exit(main())
