"""compile: auto — compiled on CUDA, eager on CPU — and what a compiled run prints and computes."""
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from build import compile_enabled
from config_schema import ConfigError, check_values
from conftest import REPO_DIR, compose_config, read_metrics, run_train

PRESETS = sorted(p.stem for p in (REPO_DIR / "configs" / "config").glob("*.yaml"))


def test_every_preset_leaves_compile_to_auto():
    assert "gpt2_small_sophiag" in PRESETS and "shakespeare_sophiag" in PRESETS
    for preset in PRESETS:
        assert compose_config(preset)["compile"] == "auto", preset
    assert compose_config()["compile"] == "auto"  # python train.py


@pytest.mark.parametrize("value, cuda, cpu", [("auto", True, False), (True, True, True), (False, False, False)])
def test_auto_means_compiled_on_cuda_only(value, cuda, cpu):
    cfg = OmegaConf.create({"compile": value})
    assert compile_enabled(cfg, torch.device("cuda:0")) is cuda
    assert compile_enabled(cfg, torch.device("cpu")) is cpu


def test_an_unknown_compile_value_stops_before_training():
    cfg = OmegaConf.create(compose_config(overrides=["compile=yes"]))
    with pytest.raises(ConfigError, match="compile=yes: use auto"):
        check_values(cfg, 1)


@pytest.mark.slow
def test_a_compiled_run_prints_its_compile_time_and_trains_as_eager(tmp_path, token_data):
    """compile=true on CPU (auto would not compile here): the compile time is printed before the first step's
    metrics, and the losses equal the eager run's (auto on CPU) up to fp32 round-off."""
    args = ["optim=adamw", "max_steps=3", "warmup_steps=0", f"data.dir={token_data}"]
    compiled = run_train(args + ["compile=true"], tmp_path / "compiled")
    eager = run_train(args, tmp_path / "eager")
    lines = compiled.stdout.splitlines()
    announce = next(i for i, line in enumerate(lines) if line.startswith("compiling the model"))
    took = next(i for i, line in enumerate(lines) if line.startswith("compiled: the first step took"))
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step 1/3"))
    assert announce < took < first_step
    assert float(re.search(r"took ([\d.]+) s", lines[took]).group(1)) > 0
    assert "compiling the model" not in eager.stdout and "compiled: " not in eager.stdout
    by_step = [{r["step"]: r["train/loss"] for r in read_metrics(Path(d)) if "train/loss" in r}
               for d in (tmp_path / "compiled", tmp_path / "eager")]
    assert list(by_step[0]) == [1, 2, 3]
    assert by_step[0] == pytest.approx(by_step[1], rel=1e-4)
    assert by_step[0][3] != by_step[0][1]  # it trained
