"""
Throughput and MFU of one full training step (forward + loss, backward, fused AdamW step, zero_grad):
our GPT against HF transformers' GPT2LMHeadModel (SDPA attention) with the same config and weights,
in the same process, steps interleaved (ours, HF, ours, HF, ...) so that load on a shared machine hits
both alike; the median step time is reported.

    python scripts/bench_train.py --model gpt2_small --batch 4 --seq 256 --steps 10
    python scripts/bench_train.py --model gpt2_medium --batch 8 --seq 1024 --device cuda --dtype bfloat16 --compile

MFU = tokens/s * flops_per_token(seq) / peak: on GPU the peak from mfu.peak_flops' table; on CPU the
fp32 2048^3 matmul timing mfu.peak_flops uses, repeated between the steps (median). On CPU the table
also gives CPU time per step and MFU per CPU-second (the same matmul timed by process CPU time), which
other processes on a shared machine disturb far less than wall time.
"""

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # `python scripts/x.py` puts scripts/, not the repo root, on the path

import mfu
from model import GPT
from scripts.benchmark import MODEL_PRESETS, model_config


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2_small", choices=MODEL_PRESETS, help="a configs/model preset")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--cpu-peak", type=float, default=None, help="CPU peak FLOP/s instead of measuring it")
    p.add_argument("--no-hf", action="store_true", help="time our model only")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and dtype != torch.float32:
        print(f"note: {args.dtype} matmuls on CPU are far slower than fp32 on most CPUs")
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    config = model_config(args.model, args.seq)
    torch.manual_seed(0)
    ours = GPT(config).to(device)
    flops_per_token = ours.flops_per_token(seq_len=args.seq)  # attention term at the length trained on
    peak = mfu.peak_flops(device, dtype, cpu_peak=args.cpu_peak)
    vocab = min(config.vocab_size, 50257)  # GPT-2's real token ids (its vocab_size is padded), or a smaller vocab's
    x = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    y = torch.randint(0, vocab, (args.batch, args.seq), device=device)

    def adamw(m):
        groups = m.configure_optimizer_groups(0.1) if isinstance(m, GPT) else [
            {"params": [q for q in m.parameters() if q.dim() >= 2], "weight_decay": 0.1},
            {"params": [q for q in m.parameters() if q.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)

    contenders = {"ours": ours}
    if not args.no_hf:
        contenders["hf"] = ours.to_hf(attn_implementation="sdpa").to(device).train()
    steps = {}
    for name, m in contenders.items():
        m.train()
        opt = adamw(m)
        fwd = torch.compile(m) if args.compile else m
        if name == "ours":
            def step(fwd=fwd, opt=opt):
                with autocast:
                    _, loss = fwd(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            def step(fwd=fwd, opt=opt):
                with autocast:
                    loss = fwd(input_ids=x, labels=x).loss  # HF's own LM loss (shifts labels inside)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        steps[name] = step

    for step in steps.values():
        for _ in range(args.warmup):
            step()
    sync()
    # Wall time per step, and on CPU also process CPU time per step: on a machine shared with other
    # work, wall time counts the time our threads wait for a core, CPU time mostly does not.
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    # The peak moves with the load too: time the same fp32 matmul mfu.peak_flops uses between the
    # steps, on both clocks, so that MFU compares like with like.
    peaks_wall, peaks_cpu = [], []
    measure_peak = device.type == "cpu" and args.cpu_peak is None
    for _ in range(args.steps):
        for name, step in steps.items():
            sync()
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            sync()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
        if measure_peak:
            peaks_wall.append(mfu.measure_cpu_matmul_flops(repeats=2))
            peaks_cpu.append(mfu.measure_cpu_matmul_flops(repeats=2, clock=time.process_time))
    if measure_peak:
        peak = statistics.median(peaks_wall)

    tokens = args.batch * args.seq
    print(f"model={args.model} (L={config.n_layer} H={config.n_head} C={config.n_embd} V={config.vocab_size}) "
          f"batch={args.batch} seq={args.seq} device={device} dtype={args.dtype} compile={args.compile} "
          f"threads={torch.get_num_threads()} steps={args.steps} (median)")
    if measure_peak:
        peak_cpu = statistics.median(peaks_cpu)
        print(f"flops/token={flops_per_token / 1e6:.1f}M  peak (fp32 2048^3 matmul between the steps, median): "
              f"{peak / 1e9:.1f} GFLOP/s wall [min {min(peaks_wall) / 1e9:.1f}, max {max(peaks_wall) / 1e9:.1f}], "
              f"{peak_cpu / 1e9:.1f} GFLOP per CPU-second")
    else:
        peak_text = "unknown: this GPU is not in mfu.GPU_PEAK_FLOPS" if peak is None else f"{peak / 1e9:.1f} GFLOP/s"
        print(f"flops/token={flops_per_token / 1e6:.1f}M  peak={peak_text} (GPU table or given)")
    header = f"{'model':<6} {'s/step':>8} {'tokens/s':>9} {'vs HF':>6} {'MFU':>6}"
    if measure_peak:
        header += f" | {'cpu-s/step':>10} {'vs HF':>6} {'MFU(cpu time)':>13}"
    print(header)
    for name in steps:
        med = statistics.median(wall[name])
        ratio = f"{statistics.median(wall['hf']) / med:.3f}" if "hf" in wall else "-"
        utilisation = mfu.estimate_mfu(tokens / med, flops_per_token, peak)  # None: a GPU the peak table lacks
        mfu_text = "n/a" if utilisation is None else f"{100 * utilisation:.1f}%"
        line = f"{name:<6} {med:>8.3f} {tokens / med:>9.1f} {ratio:>6} {mfu_text:>6}"
        if measure_peak:
            cpu_med = statistics.median(cpu[name])
            cpu_ratio = f"{statistics.median(cpu['hf']) / cpu_med:.3f}" if "hf" in cpu else "-"
            mfu_cpu = mfu.estimate_mfu(tokens / cpu_med, flops_per_token, peak_cpu)  # per CPU-second
            line += f" | {cpu_med:>10.3f} {cpu_ratio:>6} {100 * mfu_cpu:>12.1f}%"
        print(line)

if __name__ == "__main__":
    main()
