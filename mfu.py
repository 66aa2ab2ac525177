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

# Dense (no sparsity) peak FLOP/s from NVIDIA's datasheets: "bf16" is the tensor-core figure (fp16 the same),
# "tf32" for fp32 matmuls with TF32 allowed, "fp32" for true fp32. Datasheets quote the tensor-core figures with
# 2:4 sparsity: half of those.
H100_SXM = {"bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}  # also H200 SXM, H800 SXM, GH200
H100_PCIE = {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}  # also H800 PCIe
H100_NVL = {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}  # also H200 NVL
A100 = {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}  # SXM and PCIe alike
B200 = {"bf16": 2250e12, "tf32": 1100e12, "fp32": 75e12}  # HGX B200 (1,000 W)
GB200 = {"bf16": 2500e12, "tf32": 1250e12, "fp32": 80e12}  # the B200 of a GB200 (1,200 W)
V100 = {"bf16": 125e12, "tf32": 15.7e12, "fp32": 15.7e12}  # no bf16 or TF32: fp16 tensor cores

# Keyed by the exact torch.cuda.get_device_name(): a name matched by a substring took another GPU's row ("NVIDIA
# H200 NVL" the H200 SXM's), and a MIG slice ("NVIDIA A100-SXM4-40GB MIG 1g.5gb") would get the whole GPU's
# peak. A name not listed gets no MFU (null, "n/a") and one warning naming this table.
GPU_PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": H100_SXM,
    "NVIDIA H100 PCIe": H100_PCIE,
    "NVIDIA H100 NVL": H100_NVL,
    "NVIDIA H200": H100_SXM,  # H200 SXM: the H100's compute, more memory
    "NVIDIA H200 NVL": H100_NVL,
    "NVIDIA H800": H100_SXM,  # the H100 SXM with slower NVLink
    "NVIDIA H800 PCIe": H100_PCIE,
    "NVIDIA GH200 480GB": H100_SXM,
    "NVIDIA A100-SXM4-40GB": A100,
    "NVIDIA A100-SXM4-80GB": A100,
    "NVIDIA A100-PCIE-40GB": A100,
    "NVIDIA A100 80GB PCIe": A100,
    "NVIDIA B200": B200,
    "NVIDIA GB200": GB200,
    "NVIDIA L40S": {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "NVIDIA L40": {"bf16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "NVIDIA L4": {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "NVIDIA A10G": {"bf16": 70e12, "tf32": 35e12, "fp32": 31.2e12},  # AWS's A10G datasheet, not the A10's
    "NVIDIA A10": {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "Tesla V100-SXM2-16GB": V100,
    "Tesla V100-SXM2-32GB": V100,
    "Tesla V100-PCIE-16GB": V100,
    "Tesla V100-PCIE-32GB": V100,
    "Tesla T4": {"bf16": 65e12, "tf32": 8.1e12, "fp32": 8.1e12},
    "NVIDIA GeForce RTX 4090": {"bf16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "NVIDIA GeForce RTX 3090": {"bf16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12},
}

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
    run goes on with mfu null), or on CPU the given cpu_peak or one measured by timing fp32 matmuls (once per
    process and thread count)."""
    device = torch.device(device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = GPU_PEAK_FLOPS.get(name.strip())
        if peaks is None:
            warnings.warn(f"no peak FLOP/s known for GPU {name!r}: mfu is logged as null (add the GPU's exact name and "
                          f"datasheet figures to mfu.GPU_PEAK_FLOPS)", stacklevel=2)
            return None
        if dtype in (torch.bfloat16, torch.float16):
            return peaks["bf16"]
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        return peaks["tf32"] if tf32 else peaks["fp32"]
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
