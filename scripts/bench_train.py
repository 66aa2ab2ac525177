"""
Throughput and MFU of one full training step (forward + loss, backward, fused AdamW step, zero_grad):
our GPT against HF transformers' GPT2LMHeadModel (SDPA attention) with the same config and weights,
in the same process, steps interleaved (ours, HF, ours, HF, ...) so that load on a shared machine hits
both alike; the median step time is reported.

    python scripts/bench_train.py --model gpt2_small --batch 4 --seq 256 --steps 10
    python scripts/bench_train.py --model gpt2_medium --batch 8 --seq 1024 --device cuda --dtype bfloat16 --compile

MFU = tokens/s * flops_per_token(seq) / peak, the peak from model.peak_flops (the GPU table, or on CPU the
measured fp32 matmul peak — the same number train.py's MFU uses).
"""

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: import model
import model  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# The paper's shapes (n_layer, n_head, n_embd); configs/model/<name>.yaml wins when it exists.
SHAPES = {
    "tiny": (4, 4, 128),
    "gpt2_small": (12, 12, 768),
    "gpt2_medium": (24, 16, 1024),
    "gpt2_large": (36, 20, 1280),
    "gpt2_xl": (48, 25, 1600),
}


def model_config(name, seq):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "model",
                        f"{name}.yaml")
    if os.path.exists(path):
        from omegaconf import OmegaConf
        fields = GPTConfig.__dataclass_fields__
        cfg = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k in fields}
    else:
        n_layer, n_head, n_embd = SHAPES[name]
        cfg = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    cfg["block_size"] = max(cfg.get("block_size", 1024), seq)
    cfg["dropout"] = 0.0
    return GPTConfig(**cfg)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2_small", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--cpu-peak", type=float, default=None, help="CPU peak FLOP/s instead of measuring it")
    p.add_argument("--no-hf", action="store_true", help="time our model only")
    args = p.parse_args()

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
    peak = model.peak_flops(device, dtype, cpu_peak=args.cpu_peak)
    x = torch.randint(0, 50257, (args.batch, args.seq), device=device)
    y = torch.randint(0, 50257, (args.batch, args.seq), device=device)

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

    for name, step in steps.items():
        for _ in range(args.warmup):
            step()
    sync()
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)

    tokens = args.batch * args.seq
    print(f"model={args.model} (L={config.n_layer} H={config.n_head} C={config.n_embd} V={config.vocab_size}) "
          f"batch={args.batch} seq={args.seq} device={device} dtype={args.dtype} compile={args.compile} "
          f"threads={torch.get_num_threads()}")
    print(f"flops/token={flops_per_token / 1e6:.1f}M  peak={peak / 1e9:.1f} GFLOP/s "
          f"({'measured fp32 matmul' if device.type == 'cpu' and args.cpu_peak is None else 'given/table'})")
    print(f"{'model':<6} {'median s/step':>14} {'tokens/s':>10} {'vs HF':>7} {'MFU':>7}")
    base = statistics.median(times["hf"]) if "hf" in times else None
    for name, ts in times.items():
        med = statistics.median(ts)
        tps = tokens / med
        ratio = f"{base / med:.3f}" if base else "-"
        mfu = model.estimate_mfu(tps, flops_per_token, peak)
        print(f"{name:<6} {med:>14.4f} {tps:>10.1f} {ratio:>7} {100 * mfu:>6.1f}%")
    if device.type == "cpu" and args.cpu_peak is None:
        again = model.measure_cpu_matmul_flops()
        print(f"fp32 matmul peak measured again after the run: {again / 1e9:.1f} GFLOP/s "
              f"(drift = load from other processes)")


if __name__ == "__main__":
    main()
