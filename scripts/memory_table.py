"""
Per-GPU bytes of weights + gradients + optimizer state, parallel=ddp against parallel=fsdp (README's table).

    python scripts/memory_table.py --gpus 8                       # computed from the parameter counts
    torchrun --standalone --nproc_per_node=2 scripts/memory_table.py --measure gpt2_small --parallel fsdp --accum 4
    torchrun --standalone --nproc_per_node=2 scripts/memory_table.py --measure gpt2_small --accum 4 --grad-sync step

Computed: fp32 weights (4 bytes a parameter), fp32 gradients (4) and two fp32 state tensors (8: AdamW's m and v,
Sophia's m and h; Lion has one), all on every GPU under DDP, a 1/world_size slice of each under FSDP. Under FSDP
with gradient accumulation, fsdp_grad_sync=step (the reduce-scatter deferred to the last micro-batch) holds the
unsharded fp32 gradients between micro-batches: 4 bytes a parameter on every GPU, whatever the GPU count.
Measured (--measure MODEL, a configs/model preset, under torchrun on CPU with gloo): --accum micro-batches of the
real model as train.py builds it (sharded by shard_model for fsdp, each backward under train.py's gradient_sync),
then one optimizer step. The gradient bytes are the most a rank held after any micro-batch's backward: the
parameters' (sharded) .grad, and the unsharded gradients FSDP accumulates between reductions. Weights and
optimizer state are counted after the step: local shards under FSDP. The largest rank is printed.
Left out of both: activations, DDP's gradient buckets (a second copy of the gradients), and under FSDP the
gathered copies of the unit being computed (one block, or the root with the embedding) and its gradient.
"""

import argparse
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # `python scripts/x.py` puts scripts/, not the repo root, on the path

import torch

from model import GPT, GPTConfig
from scripts.benchmark import MODEL_PRESETS, model_config

SIZES = {"gpt2_small": ("125M", 12, 12, 768), "gpt2_medium": ("355M", 24, 16, 1024),
         "gpt2_large": ("770M", 36, 20, 1280), "gpt2_xl": ("1.5B", 48, 25, 1600)}
BYTES_PER_PARAM = 4 + 4 + 8  # weights, gradients, two optimizer state tensors (AdamW, SophiaG), fp32


def config(size):
    _, n_layer, n_head, n_embd = SIZES[size]
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def computed_table(gpus):
    rows = [f"| model | parameters | ddp | fsdp, {gpus} GPUs | fsdp, {gpus} GPUs, fsdp_grad_sync=step |",
            "|---|---|---|---|---|"]
    for size, (label, *_) in SIZES.items():
        with torch.device("meta"):  # shapes only
            n = GPT(config(size)).num_params(non_embedding=False)
        deferred = (BYTES_PER_PARAM - 4) * n / gpus + 4 * n  # the shards, plus every unsharded fp32 gradient
        rows.append(f"| {label} | {n / 1e6:,.0f}M | {BYTES_PER_PARAM * n / 2**30:.2f} GiB | "
                    f"{BYTES_PER_PARAM * n / gpus / 2**30:.2f} GiB | {deferred / 2**30:.2f} GiB |")
    return "\n".join(rows)


def local_bytes(t):
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def gradient_bytes(model):
    """The bytes of the gradients this rank holds now: the parameters' .grad (a shard under FSDP), and under FSDP
    the unsharded gradients it accumulates while the reduce-scatter is deferred. FSDP2 keeps those on its own
    objects, not on the module's parameters: read through its (private) per-module state."""
    from torch.distributed.fsdp import FSDPModule
    total = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
        for fsdp_param in group.fsdp_params if group is not None else []:
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            for grad in (unsharded.grad if unsharded is not None else None, fsdp_param.unsharded_accumulated_grad):
                total += local_bytes(grad) if grad is not None else 0
    return total


def measure(name, parallel, accum, grad_sync):
    """accum micro-batches and one SophiaG step of the real model on this rank; prints the largest rank's bytes of
    weights, gradients (the most held after any micro-batch) and optimizer state."""
    import torch.distributed as dist

    import sophia
    from distributed import Env, gradient_sync, shard_model
    dist.init_process_group("gloo")
    env = Env(rank=dist.get_rank(), local_rank=0, world_size=dist.get_world_size(), device=torch.device("cpu"),
              dtype="float32", sharded=parallel == "fsdp", defer_grad_sync=grad_sync == "step")
    torch.manual_seed(0)
    raw = GPT(model_config(name))
    if parallel == "fsdp":
        shard_model(raw, env)
        model = raw
    else:
        model = torch.nn.parallel.DistributedDataParallel(raw)
    optimizer = sophia.SophiaG(raw.configure_optimizer_groups(0.1), fused=False)  # the state of AdamW's size
    grads_held = 0
    for micro in range(accum):
        idx = torch.randint(0, raw.config.vocab_size, (1, 16))
        with gradient_sync(model, raw, env, last=micro == accum - 1):
            _, loss = model(idx, idx)
            (loss / accum).backward()
        grads_held = max(grads_held, gradient_bytes(raw))
    optimizer.step(bs=16)
    params = list(raw.parameters())
    weights = sum(local_bytes(p) for p in params)
    state = sum(local_bytes(v) for s in optimizer.state.values() for k, v in s.items() if k != "step")
    held = torch.tensor([weights + grads_held + state, weights, grads_held, state], dtype=torch.float64)
    dist.all_reduce(held, op=dist.ReduceOp.MAX)
    if env.is_master:
        n = sum(p.numel() for p in params)
        total, weights, grads, state = held.tolist()
        sync = f" fsdp_grad_sync={grad_sync}" if parallel == "fsdp" else ""
        print(f"{name} parallel={parallel}{sync} on {env.world_size} ranks, {accum} micro-batch(es): "
              f"{total / 2**30:.2f} GiB on the largest rank ({total / n:.2f} bytes per parameter: weights "
              f"{weights / n:.2f}, gradients {grads / n:.2f}, optimizer state {state / n:.2f})")
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--gpus", type=int, default=8, help="world size of the computed fsdp columns")
    parser.add_argument("--measure", choices=MODEL_PRESETS,
                        help="run under torchrun: count one rank's tensors for this configs/model preset")
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="fsdp")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches before the optimizer step")
    parser.add_argument("--grad-sync", choices=["micro_batch", "step"], default="micro_batch",
                        help="fsdp: train.py's fsdp_grad_sync")
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.parallel, args.accum, args.grad_sync)
    else:
        print(computed_table(args.gpus))


if __name__ == "__main__":
    main()
