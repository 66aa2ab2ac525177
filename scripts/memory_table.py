"""
Per-GPU bytes of weights + gradients + optimizer state, parallel=ddp against parallel=fsdp (README's table).

    python scripts/memory_table.py --gpus 8                       # computed from the parameter counts
    torchrun --standalone --nproc_per_node=8 scripts/memory_table.py --measure gpt2_small --parallel fsdp

Computed: fp32 weights (4 bytes a parameter), fp32 gradients (4) and two fp32 state tensors (8: AdamW's m and v,
Sophia's m and h; Lion has one), all on every GPU under DDP, a 1/world_size slice of each under FSDP.
Measured (--measure, under torchrun on CPU with gloo): one optimizer step of the real model as train.py builds it
(sharded by shard_model for fsdp), then the bytes of the tensors each rank holds are summed (local
shards of the parameters, their gradients and the optimizer state) and the largest rank is printed.
Left out of both: activations, DDP's gradient buckets (a second copy of the gradients), and under FSDP the
gathered bf16 copies of the unit being computed (one block, or the root with the embedding) and its gradient.
"""

import argparse
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # `python scripts/x.py` puts scripts/, not the repo root, on the path

import torch

from model import GPT, GPTConfig

SIZES = {"gpt2_small": ("125M", 12, 12, 768), "gpt2_medium": ("355M", 24, 16, 1024),
         "gpt2_large": ("770M", 36, 20, 1280), "gpt2_xl": ("1.5B", 48, 25, 1600)}
BYTES_PER_PARAM = 4 + 4 + 8  # weights, gradients, two optimizer state tensors (AdamW, SophiaG), fp32


def config(size):
    _, n_layer, n_head, n_embd = SIZES[size]
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def computed_table(gpus):
    rows = [f"| model | parameters | ddp | fsdp, {gpus} GPUs |", "|---|---|---|---|"]
    for size, (label, *_) in SIZES.items():
        with torch.device("meta"):  # shapes only
            n = GPT(config(size)).num_params(non_embedding=False)
        rows.append(f"| {label} | {n / 1e6:,.0f}M | {BYTES_PER_PARAM * n / 2**30:.2f} GiB | "
                    f"{BYTES_PER_PARAM * n / gpus / 2**30:.2f} GiB |")
    return "\n".join(rows)


def local_bytes(t):
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def measure(size, parallel):
    """One SophiaG step of the real model on this rank; returns the bytes of weights, grads and state it holds."""
    import torch.distributed as dist

    import sophia
    from distributed import Env, shard_model
    dist.init_process_group("gloo")
    env = Env(rank=dist.get_rank(), local_rank=0, world_size=dist.get_world_size(), device=torch.device("cpu"),
              dtype="float32", sharded=parallel == "fsdp")
    torch.manual_seed(0)
    model = GPT(config(size))
    if parallel == "fsdp":
        shard_model(model, env)
        model.set_requires_gradient_sync(True)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    raw = model.module if parallel == "ddp" else model
    optimizer = sophia.SophiaG(raw.configure_optimizer_groups(0.1), fused=False)  # the state of AdamW's size
    idx = torch.randint(0, 50304, (1, 16))
    _, loss = model(idx, idx)
    loss.backward()
    optimizer.step(bs=16)
    params = [p for p in raw.parameters()]
    held = sum(local_bytes(p) + local_bytes(p.grad) for p in params)
    held += sum(local_bytes(v) for state in optimizer.state.values() for k, v in state.items() if k != "step")
    total = torch.tensor([held], dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    if env.is_master:
        n = sum(p.numel() for p in params)
        print(f"{size} parallel={parallel} on {env.world_size} ranks: {total.item() / 2**30:.2f} GiB on the largest "
              f"rank ({total.item() / n:.2f} bytes per parameter)")
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--gpus", type=int, default=8, help="world size of the computed fsdp column")
    parser.add_argument("--measure", choices=list(SIZES), help="run under torchrun: count one rank's tensors")
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="fsdp")
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.parallel)
    else:
        print(computed_table(args.gpus))


if __name__ == "__main__":
    main()
