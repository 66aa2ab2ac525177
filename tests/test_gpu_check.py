"""scripts/gpu_check.py: --smoke --device cpu runs every benchmark on the CPU (so the GPU check cannot rot; on a GPU
node too, where the suite stays on the CPU) and writes the JSON and the table in their documented shape, every path
check's train.py run included; bad input exits 2, a missing transformers skips only the HF comparison, and a failing
benchmark fails the run without stopping the others. Performance is not judged here."""
import json
import os
import re
import shutil
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from conftest import REPO_DIR
from scripts import gpu_check

SCRIPT = str(REPO_DIR / "scripts" / "gpu_check.py")
BENCHMARKS = ["train_paths", "memory_refresh_vs_step", "cuda_tests", "two_gpus", "train_throughput", "optimizer_step",
              "sophia_overhead"]  # in order
NEEDS_CUDA = {"memory_refresh_vs_step", "cuda_tests", "two_gpus"}
RESULT_KEYS = {"name", "status", "summary", "figures", "note", "reference", "seconds"}

# with -n 2, on one worker: the smoke run (a module fixture, a dozen train.py runs) is then made once, not per worker
pytestmark = pytest.mark.xdist_group("gpu_check")


def run_script(args, env=None, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO_DIR, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def gpt2_param_count(n_layer, n_embd, vocab_size, block_size, **_):
    # wte (tied with the head), wpe, per layer qkv + proj + fc + proj2 + two LayerNorm weights, ln_f (bias=False)
    d = n_embd
    return vocab_size * d + block_size * d + n_layer * (3 * d * d + d * d + 4 * d * d + 4 * d * d + 2 * d) + d


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, shakespeare_bins):
    out = tmp_path_factory.mktemp("gpu_check") / "smoke.json"
    proc = run_script(["--smoke", "--device", "cpu", "--out", str(out)], timeout=1800)  # a dozen train.py runs
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_smoke_runs_every_benchmark_into_the_json(smoke):
    _, report = smoke
    assert [b["name"] for b in report["benchmarks"]] == BENCHMARKS
    env = report["environment"]
    assert env["smoke"] is True and env["torch"] == torch.__version__ and env["wall_s"] > 0
    for bench in report["benchmarks"]:
        assert set(bench) == RESULT_KEYS and bench["reference"] and bench["summary"], bench
        if bench["name"] in NEEDS_CUDA:
            assert bench["status"] == "skip" and bench["note"].startswith("needs "), bench
        else:
            assert bench["status"] == "pass" and "goal" in bench["note"], bench  # recorded, not judged
            assert bench["figures"], bench["name"]


def test_smoke_figures_come_from_the_runs_at_the_toy_shapes(smoke):
    _, report = smoke
    figures = {b["name"]: b["figures"] for b in report["benchmarks"]}
    scale = gpu_check.SMOKE
    throughput = figures["train_throughput"]
    assert throughput["tokens_per_step"] == 2 * scale.micro * 64  # two micro-batches of block_size=64 tokens
    for mode in ("eager",):  # ours through train.py, HF in process, each measured (the GPU adds compiled)
        assert throughput[f"ours_adamw_{mode}_tokens_per_s"] > 0 and throughput[f"hf_adamw_{mode}_tokens_per_s"] > 0
        assert throughput[f"ours_vs_hf_{mode}"] == pytest.approx(
            throughput[f"ours_adamw_{mode}_tokens_per_s"] / throughput[f"hf_adamw_{mode}_tokens_per_s"], rel=1e-2)
    assert any(k.startswith("ours_sophiag_") and k.endswith("_tokens_per_s") for k in throughput)

    step = figures["optimizer_step"]
    for tag, config in scale.opt_models.items():  # model.py's parameters, each once (the tied head too)
        assert step[f"{tag}_params"] == gpt2_param_count(**config)
        for name in gpu_check.OPTIMIZERS:
            assert step[f"{tag}_{name}_ms"] > 0
        assert step[f"{tag}_adamw_fused_vs_adamw"] == 1.0

    paths = figures["train_paths"]  # every path's train.py run on the CPU: the loss falls, its header says how it ran
    for run in ("sophiag", "sophiah", "lion", "muon", "ddp_one_process", "fsdp_one_process"):
        assert paths[f"{run}_last_loss"] < paths[f"{run}_first_loss"], run
        assert paths[f"{run}_recompiles_second_half"] == 0 and "device cpu" in paths[f"{run}_header"], run
    assert "1 rank(s)" in paths["ddp_one_process_header"] and "ddp over gloo" in paths["ddp_one_process_header"]
    assert "bfloat16, fsdp (sharded) over gloo" in paths["fsdp_one_process_header"]

    overhead = figures["sophia_overhead"]
    assert overhead["hess_interval"] == scale.window and overhead["floor"] == pytest.approx(0.5 / scale.window)
    assert len(overhead["windows"]) == scale.windows  # the first window (compilation) left out
    assert overhead["overhead"] == pytest.approx(overhead["sophiag_ms_per_step"] / overhead["adamw_ms_per_step"] - 1,
                                                 abs=1e-3)


def test_smoke_prints_the_table_last(smoke):
    proc, report = smoke
    lines = proc.stdout.rstrip().splitlines()
    counts = {s: sum(b["status"] == s for b in report["benchmarks"]) for s in ("pass", "skip")}
    assert re.fullmatch(rf"{counts['pass']} passed, 0 failed, {counts['skip']} skipped in \d+ s", lines[-1])
    table = lines[-len(BENCHMARKS) - 2:-1]
    assert table[0].split() == ["benchmark", "status", "s", "result", "compared", "with"]
    assert [row.split()[:2] for row in table[1:]] == [[b["name"], b["status"]] for b in report["benchmarks"]]


def test_without_a_gpu_and_without_smoke_it_says_so_and_exits_2(tmp_path):
    out = tmp_path / "x.json"
    proc = run_script(["--out", str(out)], env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert "no CUDA GPU" in proc.stderr and "--smoke" in proc.stderr
    assert not out.exists()


def test_device_cuda_without_a_gpu_exits_2(tmp_path):
    proc = run_script(["--smoke", "--device", "cuda", "--out", str(tmp_path / "x.json")],
                      env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and not (tmp_path / "x.json").exists()


def test_an_unknown_benchmark_name_exits_2_listing_the_benchmarks(tmp_path):
    proc = run_script(["--smoke", "--out", str(tmp_path / "x.json"), "--only", "optimizer_step,resume"], timeout=120)
    assert proc.returncode == 2
    assert "resume" in proc.stderr and "memory_refresh_vs_step" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_without_transformers_only_the_hf_comparison_is_skipped(monkeypatch, tmp_path):
    """The runs are train.py's metrics lines as it writes them (two windows of 2 steps); transformers cannot be
    imported (None in sys.modules), so the benchmark reports ours alone and says why."""
    ctx = gpu_check.Context(smoke=True)
    shutil.rmtree(ctx.tmp)  # no run made here
    for optim in ("adamw", "sophiag"):
        for compiled in (False, True):
            ctx.runs[optim, compiled] = [{"step": 0, "tokens": 0, "val/loss": 10.0}] + [
                {"step": s, "tokens": 256 * s, "train/loss": 9.0, "throughput/tokens_per_s": 1000.0, "mfu": 0.1}
                for s in (2, 4, 6)]
    monkeypatch.setitem(sys.modules, "transformers", None)
    res = gpu_check.bench_throughput(ctx)
    assert res["status"] == "pass" and "HF comparison skipped: transformers is not installed" in res["note"]
    assert res["figures"]["ours_adamw_eager_tokens_per_s"] == 1000.0
    assert not any(k.startswith("hf_") or k.startswith("ours_vs_hf") for k in res["figures"])


def test_a_failing_or_crashing_benchmark_fails_the_run_and_keeps_the_others(tmp_path, capsys):
    out = tmp_path / "x.json"

    def crash(ctx):
        raise ValueError("a broken benchmark")

    selected = [("fine", "a peer", lambda ctx: gpu_check.result("pass", "ok", {"x": 1})),
                ("bad", "a peer", lambda ctx: gpu_check.result("fail", "too slow", {"x": 2})),
                ("crash", "a peer", crash)]
    assert gpu_check.run_benchmarks(Namespace(smoke=True, out=str(out)), selected) == 1
    results = json.loads(out.read_text())["benchmarks"]
    assert [(b["name"], b["status"]) for b in results] == [("fine", "pass"), ("bad", "fail"), ("crash", "fail")]
    assert "ValueError: a broken benchmark" in results[2]["summary"] and "Traceback" in results[2]["note"]
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("1 passed, 2 failed, 0 skipped")


def test_hessian_memory_counts_the_bytes_alive_at_once():
    """scripts/hessian_memory.py's counter against allocations whose sizes are known: a view shares its base's
    storage (counted once), a freed tensor leaves the count, an in-place op adds nothing."""
    from scripts.hessian_memory import LiveBytes
    with LiveBytes() as counter:
        a = torch.ones(1000)                # 4,000 bytes
        b = a.view(10, 100).mul(2)          # the view is a's storage; the product 4,000 more
        del a
        c = torch.zeros(500)                # a gone, b and c alive: 6,000
        b.add_(1)
    assert counter.peak == 8000 and counter.live == 6000
    assert c.numel() == 500


def test_hessian_memory_computed_on_meta_bounds_the_count_on_cpu():
    """The computed figures (meta tensors: shapes only) against the same passes run with real tensors on the CPU:
    at least as large (the meta device decomposes the loss into more live buffers than the CPU's kernels keep),
    within 2x; and Hutchinson's double backward needs the most."""
    from scripts.hessian_memory import PASSES, computed, measured
    estimate = computed("tiny", 2, "float32")
    counted = measured("tiny", 2, "float32", torch.device("cpu"))
    for kind in PASSES:
        assert counted[kind][0] <= estimate[kind] <= 2 * counted[kind][0], (kind, counted[kind], estimate[kind])
    assert estimate["hutchinson"] > 2 * estimate["train"] and counted["hutchinson"][0] > 2 * counted["train"][0]
