"""
Model FLOPs utilisation (MFU): achieved model FLOP/s over the peak FLOP/s of the device a run uses.

The FLOPs per token come from GPT.flops_per_token (model.py, PaLM appendix B: 6N + 12·L·H·Q·T). The peak
comes from a table of GPU datasheets, or on CPU from a given figure (cpu_peak_flops) or a timed fp32 matmul:
never a hard-coded A100 constant.

metrics.jsonl's `mfu` is achieved over that peak. Against a timed matmul it says how close a training step
comes to a large matmul on the same CPU, under the same load: a measure of the step's efficiency, not of the
hardware's utilisation, so the progress line leaves it out (give cpu_peak_flops for the datasheet's figure).
"""

import time
import warnings

import torch

# Dense (no sparsity) peak FLOP/s from NVIDIA's datasheets, keyed by a lower-case substring of
# torch.cuda.get_device_name(). "bf16" is the tensor-core figure (fp16 the same), "tf32" for fp32
# matmuls with TF32 allowed, "fp32" for true fp32. Order matters: more specific names first.
GPU_PEAK_FLOPS = [
    ("h100 pcie", {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("h100 nvl", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("h100", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}),  # SXM
    ("h200", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}),  # also GH200
    ("a100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("a10g", {"bf16": 70e12, "tf32": 35e12, "fp32": 31.2e12}),  # AWS's A10G datasheet, not the A10's
    ("a10", {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("l40s", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("l40", {"bf16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    ("l4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("v100", {"bf16": 125e12, "tf32": 15.7e12, "fp32": 15.7e12}),  # no bf16/TF32: fp16 tensor cores
    ("rtx 4090", {"bf16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    ("rtx 3090", {"bf16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    ("t4", {"bf16": 65e12, "tf32": 8.1e12, "fp32": 8.1e12}),
]

_cpu_peak_cache = {}


def measure_cpu_matmul_flops(n=2048, repeats=5, clock=time.perf_counter):
    """Best achieved fp32 FLOP/s of an n x n matmul on this CPU with torch's current thread count.
    clock=time.process_time gives FLOPs per CPU-second instead (scripts/bench_train.py, shared machines)."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool, caches
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        torch.mm(a, b)
        best = min(best, clock() - t0)
    return 2 * n ** 3 / best


def peak_flops(device, dtype, cpu_peak=None):
    """Peak FLOP/s of the device a run uses: the GPU table above (None, with a warning, for a GPU it lacks: the
    run goes on without MFU), or on CPU the given cpu_peak or one measured by timing fp32 matmuls (once per
    process and thread count)."""
    device = torch.device(device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, peaks in GPU_PEAK_FLOPS:
            if key in name:
                if dtype in (torch.bfloat16, torch.float16):
                    return peaks["bf16"]
                tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
                return peaks["tf32"] if tf32 else peaks["fp32"]
        warnings.warn(f"no peak FLOP/s known for GPU {name!r}: mfu is logged as null (add the GPU's datasheet "
                      f"figures to mfu.GPU_PEAK_FLOPS)", stacklevel=2)
        return None
    if device.type == "cpu":
        if cpu_peak is not None:
            return float(cpu_peak)
        key = torch.get_num_threads()
        if key not in _cpu_peak_cache:
            _cpu_peak_cache[key] = measure_cpu_matmul_flops()
        return _cpu_peak_cache[key]
    raise ValueError(f"no peak FLOP/s known for device type {device.type!r}; pass cpu_peak or use cpu/cuda")


def estimate_mfu(tokens_per_s, flops_per_token, peak):
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak; None when the peak is unknown."""
    return None if peak is None else tokens_per_s * flops_per_token / peak
