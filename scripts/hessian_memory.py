"""
The memory one micro-batch needs beyond the weights: a training micro-batch against a Hessian refresh's, SophiaG's
(GNB: sampled labels) and SophiaH's (Hutchinson: a double backward through the math attention kernel), at each
preset's micro-batch size. optim.hess_micro_batch_size sets the refresh's micro-batch; this says which one fits.

    python scripts/hessian_memory.py                               # computed, every gpt2 preset, bf16 autocast
    python scripts/hessian_memory.py --models gpt2_small --micro 1,2 --dtype float32 --measure   # and measured

Computed: the code train.py runs (model.py's forward, hessian.gnb_backward, hessian.hutchinson_backward) on the meta
device (shapes and dtypes, no data, no memory), every tensor it allocates counted from its allocation to its
release: the peak of the bytes alive, over what existed before (the weights). Gradients of the weights, allocated
by the backward, are part of it. Attention as the fused kernels of CPU and CUDA run it for the training and GNB
passes (no T x T scores kept), as the math kernel for Hutchinson's. The meta device keeps the loss's log-softmax
buffers the way its decomposition does, more than the CPU's kernels (an upper estimate there); autocast does not
act on meta tensors, so --dtype bfloat16 casts the model to bf16 instead (autocast keeps LayerNorm, softmax and
the loss in fp32: a slight underestimate). Measured (--measure): the same count with real tensors and this
device's own kernels, and on CUDA also torch.cuda.max_memory_allocated over the weights. Both leave out the
optimizer state (the same for every pass).
"""

import argparse
import sys
import weakref
from contextlib import nullcontext
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # `python scripts/x.py` puts scripts/, not the repo root, on the path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import hessian
from config_schema import compose_config
from hessian import math_attention
from model import GPT
from scripts.benchmark import model_config

PRESETS = {"gpt2_small": "gpt2_small_sophiag", "gpt2_medium": "gpt2_medium_sophiag",
           "gpt2_large": "gpt2_large_sophiag", "gpt2_xl": "gpt2_xl_sophiag"}
PASSES = ("train", "gnb", "hutchinson")


class LiveBytes(TorchDispatchMode):
    """Every storage an op creates while this mode is on, counted until it is freed: `peak` is the most bytes
    alive at once. A storage is counted once, however many views share it."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, weakref.WeakKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                storage = t.untyped_storage()
                if storage not in self.seen:
                    self.seen[storage] = storage.nbytes()
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self.free, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out

    def free(self, nbytes):
        self.live -= nbytes


def one_pass(model, kind, micro, autocast, generator):
    """One micro-batch of `kind` (train, gnb or hutchinson) on idx of micro sequences, as train.py runs it."""
    idx = torch.zeros(micro, model.config.block_size, dtype=torch.long, device=model.lm_head.weight.device)
    if kind == "train":
        with autocast:
            _, loss = model(idx, idx)
        loss.backward()
    elif kind == "gnb":
        with autocast:
            logits, _ = model(idx)
        hessian.gnb_backward(logits, 1.0, generator)
    else:
        with math_attention(), autocast:
            _, loss = model(idx, idx)
        hessian.hutchinson_backward(loss, list(model.parameters()), 1.0, generator)


def counted_peak(model, kind, micro, dtype, device):
    autocast = torch.autocast("cuda" if device.type == "cuda" else "cpu", dtype=torch.bfloat16) \
        if dtype == "bfloat16" else nullcontext()
    model.zero_grad(set_to_none=True)
    with LiveBytes() as counter:
        one_pass(model, kind, micro, autocast, None)
    model.zero_grad(set_to_none=True)
    return counter.peak


def fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """F.scaled_dot_product_attention as a fused kernel runs it, keeping no (T, T) scores for the backward: the
    CPU flash kernel (the meta device would otherwise take the math path, which the training and GNB passes do
    not take on CPU or CUDA)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                        scale=scale)[0]


def computed(name, micro, dtype):
    """{pass: peak bytes} of the model preset `name` on the meta device (shapes only). Autocast does not act on
    meta tensors: for bfloat16 the model itself is cast to bf16, which autocast's fp32 islands (LayerNorm,
    softmax, the loss) make a slight underestimate of an autocast run."""
    with torch.device("meta"):
        model = GPT(model_config(name)).to(getattr(torch, dtype))
    peaks = {}
    for kind in PASSES:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if kind != "hutchinson":  # Hutchinson runs the math kernel (hessian.math_attention) everywhere
            torch.nn.functional.scaled_dot_product_attention = fused_attention
        try:
            peaks[kind] = counted_peak(model, kind, micro, "float32", torch.device("meta"))
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
    return peaks


def measured(name, micro, dtype, device):
    """{pass: (counted peak bytes, CUDA's max_memory_allocated over the weights or None)}: real tensors on device."""
    torch.manual_seed(0)
    model = GPT(model_config(name)).to(device)
    results = {}
    for kind in PASSES:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        peak = counted_peak(model, kind, micro, dtype, device)
        results[kind] = (peak, torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None)
    return results


def preset_micro_batch(name):
    return compose_config(PRESETS[name]).micro_batch_size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(PRESETS), help=f"comma-separated, of {', '.join(PRESETS)}")
    parser.add_argument("--micro", default="preset", help="sequences per micro-batch, comma-separated; preset: "
                                                          "each preset's micro_batch_size")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="autocast dtype of the passes (a GPU run's default: bfloat16)")
    parser.add_argument("--measure", action="store_true", help="also run the passes with real tensors")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gib = 2 ** 30
    print(f"| model | micro-batch | dtype | {' | '.join(f'{k} (computed)' for k in PASSES)} |"
          + (f" {' | '.join(f'{k} (measured on {device.type})' for k in PASSES)} |" if args.measure else ""))
    print("|---|---|---|" + "---|" * len(PASSES) * (2 if args.measure else 1))
    for name in args.models.split(","):
        micros = [preset_micro_batch(name)] if args.micro == "preset" else [int(m) for m in args.micro.split(",")]
        for micro in micros:
            row = f"| {name} | {micro} | {args.dtype} | " + " | ".join(
                f"{v / gib:.2f} GiB" for v in computed(name, micro, args.dtype).values()) + " |"
            if args.measure:
                row += " " + " | ".join(f"{peak / gib:.2f} GiB" + ("" if cuda is None else f" (CUDA: {cuda / gib:.2f})")
                                        for peak, cuda in measured(name, micro, args.dtype, device).values()) + " |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
