"""mfu.py: the peak FLOP/s table, the CPU peak measured with a clock we control, and MFU's formula."""

import re

import pytest
import torch

import mfu


def test_gpu_peak_lookup(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert mfu.peak_flops("cuda", torch.bfloat16) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert mfu.peak_flops("cuda", "bfloat16") == 756e12
    # more specific names win over their prefixes
    for name, bf16_peak in [("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("NVIDIA A10G", 70e12),
                            ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert mfu.peak_flops("cuda:0", torch.bfloat16) == bf16_peak, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    assert mfu.peak_flops("cuda", torch.bfloat16) == 312e12
    # fp32: true fp32 unless TF32 matmuls are allowed
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert mfu.peak_flops("cuda", torch.float32) == 19.5e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert mfu.peak_flops("cuda", torch.float32) == 156e12
    # a GPU the table lacks (B200, MI300X, RTX A6000, ...): the run goes on, MFU null, one warning naming the fix
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    with pytest.warns(UserWarning, match="GPU_PEAK_FLOPS"):
        assert mfu.peak_flops("cuda", torch.bfloat16) is None
    assert mfu.estimate_mfu(1e6, 1e9, None) is None


def test_cpu_peak_is_the_best_of_the_timed_matmuls():
    # a clock we control: the three timed matmuls take 2 s, 0.5 s and 4 s, so the peak is 2·n³ / 0.5 s
    ticks = iter([10.0, 12.0, 20.0, 20.5, 30.0, 34.0])
    n = 64
    assert mfu.measure_cpu_matmul_flops(n=n, repeats=3, clock=lambda: next(ticks)) == 2 * n ** 3 / 0.5
    with pytest.raises(StopIteration):  # exactly two clock reads per repeat
        next(ticks)


def test_cpu_peak_given_or_measured_once_per_thread_count(monkeypatch):
    measurements = []

    def fake_measurement():
        measurements.append(torch.get_num_threads())
        return 7e9 * len(measurements)

    monkeypatch.setattr(mfu, "measure_cpu_matmul_flops", fake_measurement)
    monkeypatch.setattr(mfu, "_cpu_peak_cache", {})
    assert mfu.peak_flops("cpu", torch.float32, cpu_peak=123e9) == 123e9 and measurements == []
    assert mfu.peak_flops("cpu", torch.float32) == 7e9
    assert mfu.peak_flops("cpu", "float32") == 7e9  # cached: measured once per process and thread count
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert mfu.peak_flops("cpu", torch.float32) == 14e9
    finally:
        torch.set_num_threads(threads)
    assert measurements == [threads, threads + 1]


def test_mfu_is_achieved_over_peak():
    assert mfu.estimate_mfu(1000.0, 6e6, 1e12) == pytest.approx(1000.0 * 6e6 / 1e12)


@pytest.mark.parametrize("given_peak", [None, 1e11])
def test_a_cpu_run_shows_mfu_only_against_a_given_peak(tmp_path, monkeypatch, shakespeare_bins, given_peak):
    """Against a matmul timed at start-up the ratio is not the CPU's utilisation: metrics.jsonl keeps it (achieved
    over that matmul's FLOP/s), the progress line leaves it out; against cpu_peak_flops the line shows it."""
    from conftest import read_metrics, train_in_process
    monkeypatch.setattr(mfu, "measure_cpu_matmul_flops", lambda: 2e10)  # the timed matmul, without timing it
    monkeypatch.setattr(mfu, "_cpu_peak_cache", {})
    status, printed = train_in_process(["optim=adamw", "max_steps=3", f"cpu_peak_flops={given_peak or 'null'}"],
                                       tmp_path)
    assert status == 0
    lines = [line for line in printed.splitlines() if line.startswith("step ") and "tokens/s" in line]
    assert len(lines) == 3 and all(("mfu " in line) == (given_peak is not None) for line in lines), lines
    if given_peak:
        assert all(re.search(r", mfu \d+\.\d%, ", line) for line in lines), lines
    peak = given_peak or 2e10
    flops_per_token = 6 * (50304 * 32 + 2 * (12 * 32 * 32 + 2 * 32) + 32) + 12 * 2 * 32 * 32  # TINY: PaLM's count
    for r in (r for r in read_metrics(tmp_path) if "train/loss" in r):
        assert r["mfu"] == pytest.approx(r["throughput/tokens_per_s"] * flops_per_token / peak, rel=1e-9)
