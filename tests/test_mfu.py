"""mfu.py: the peak FLOP/s table, the CPU peak measured with a clock we control, and MFU's formula."""

import re

import pytest
import torch

import mfu

# every current NVIDIA datacentre GPU by the exact name torch.cuda.get_device_name() reports, and its dense bf16
# peak: half the datasheet's tensor-core figure "with sparsity"
DATACENTRE_BF16 = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM: 1,979 with sparsity
    "NVIDIA H100 PCIe": 756e12,  # 1,513
    "NVIDIA H100 NVL": 835e12,  # 1,671
    "NVIDIA H200": 989e12,  # H200 SXM: 1,979
    "NVIDIA H200 NVL": 835e12,  # 1,671: not the SXM's row
    "NVIDIA H800": 989e12,
    "NVIDIA H800 PCIe": 756e12,
    "NVIDIA A100-SXM4-40GB": 312e12,  # 624
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,  # 733
    "NVIDIA B200": 2250e12,  # HGX B200: 4.5 PFLOPS
    "NVIDIA GB200": 2500e12,  # GB200 NVL72: 5 PFLOPS a GPU
}


def fake_gpu(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_gpu_peak_lookup(monkeypatch):
    for name, bf16_peak in DATACENTRE_BF16.items():
        fake_gpu(monkeypatch, name)
        assert mfu.peak_flops("cuda:0", torch.bfloat16) == bf16_peak, name
        assert mfu.peak_flops("cuda", "bfloat16") == bf16_peak, name
    for name, bf16_peak in [("NVIDIA L4", 121e12), ("NVIDIA A10G", 70e12), ("Tesla T4", 65e12)]:
        fake_gpu(monkeypatch, name)
        assert mfu.peak_flops("cuda", torch.bfloat16) == bf16_peak, name
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB")
    # fp32: true fp32 unless TF32 matmuls are allowed
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert mfu.peak_flops("cuda", torch.float32) == 19.5e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert mfu.peak_flops("cuda", torch.float32) == 156e12
    # a GPU the table lacks, or a MIG slice of one it has (a fraction of the GPU): the run goes on, MFU null, one
    # warning naming the fix
    for name in ("Some Future GPU", "NVIDIA A100-SXM4-40GB MIG 1g.5gb", "NVIDIA H2000"):
        fake_gpu(monkeypatch, name)
        with pytest.warns(UserWarning, match="GPU_PEAK_FLOPS"):
            assert mfu.peak_flops("cuda", torch.bfloat16) is None
    assert mfu.estimate_mfu(1e6, 1e9, None) is None


def test_bench_train_reports_mfu_as_n_a_on_a_gpu_the_table_lacks(monkeypatch, capsys):
    """The peak of an unknown GPU is None: bench_train prints its timings with MFU n/a instead of crashing (here
    on the CPU, with the GPU table's answer for such a GPU)."""
    from scripts import bench_train
    monkeypatch.setattr(mfu, "peak_flops", lambda device, dtype, cpu_peak=None: None)
    monkeypatch.setattr("sys.argv", ["bench_train.py", "--model", "tiny", "--batch", "1", "--seq", "16", "--steps", "1",
                                     "--warmup", "0", "--device", "cpu", "--cpu-peak", "1e11", "--no-hf", "--threads", "1"])
    bench_train.main()
    out = capsys.readouterr().out
    assert "peak=unknown" in out
    [row] = [line for line in out.splitlines() if line.startswith("ours ")]
    assert row.split()[-1] == "n/a" and float(row.split()[2]) > 0  # tokens/s measured, MFU not


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
