"""
What the benchmark scripts share: n training steps through train.py's own loop, a configs/model preset as a
GPTConfig, and GPT-2-shaped parameter groups with random gradients for timing optimizers.

train.py runs as users run it, in a subprocess (no script imports train.py, whose train_step and refresh_hessian
stay in the loop's file), and its speed and memory are read back from the metrics.jsonl it writes: the run's own
clock (evaluation left out), so a benchmark measures exactly what a user's run reports, process start-up, data
pipeline and torch.compile included, and the timings never pass through a second copy of the loop.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # `python scripts/x.py` puts scripts/, not the repo root, on the path

from config_schema import compose_config
from metrics import read_metrics
from model import GPT, GPTConfig

MODEL_PRESETS = sorted(path.stem for path in (REPO_DIR / "configs" / "model").glob("*.yaml"))


def train_steps(overrides, steps, out_dir, window=10, timeout=1800, launcher=(sys.executable,), env=None,
                output=False):
    """`python train.py OVERRIDES` (or under `launcher`, e.g. torchrun) for `steps` steps into the fresh folder
    out_dir, a metrics line every `window` steps, evaluation and a checkpoint only at the start and the end;
    returns its metrics.jsonl records, and with output=True also what it printed (stdout and stderr in the order
    printed). A run that fails raises RuntimeError with the end of its output."""
    args = [*overrides, f"out_dir={out_dir}", f"max_steps={steps}", f"log_interval={window}",
            f"eval_interval={steps}", "eval_steps=1", f"ckpt_interval={steps}", "wandb.enabled=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **(env or {})}
    proc = subprocess.run([*launcher, str(REPO_DIR / "train.py"), *args], cwd=REPO_DIR, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(overrides)} exited {proc.returncode}: {proc.stdout.strip()[-1500:]}")
    records = read_metrics(out_dir)
    return (records, proc.stdout) if output else records


def windows(records, skip=1):
    """The metrics lines of the training windows, after the first `skip` (torch.compile, the optimizer state's
    allocation and the first evaluation fall in the first one)."""
    return [r for r in records if "throughput/tokens_per_s" in r][skip:]


def step_seconds(record):
    """Seconds per training step in one window: tokens per step over the window's tokens/s."""
    return record["tokens"] / record["step"] / record["throughput/tokens_per_s"]


def model_config(name, seq=0):
    """GPTConfig of `python train.py model=<name>`, block_size at least seq."""
    from omegaconf import OmegaConf
    preset = OmegaConf.to_container(compose_config(None, [f"model={name}"]).model, resolve=True)
    cfg = {k: v for k, v in preset.items() if k in GPTConfig.__dataclass_fields__}  # drops e.g. `name`
    cfg["block_size"] = max(cfg.get("block_size", 1024), seq)
    cfg["dropout"] = 0.0
    return GPTConfig(**cfg)


def gpt2_groups(config, device, dtype=torch.float32, seed=0):
    """model.py's parameter groups (weight decay on nn.Linear weights only) of a GPT of this GPTConfig, with
    random gradients: what an optimizer step sees in training."""
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: a 770M model's init on a CPU takes a while
        model = GPT(GPTConfig(**config)).to(dtype)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model.configure_optimizer_groups(0.1)
