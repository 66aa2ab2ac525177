"""What several test files share: train.py run as users run it on a tiny model, its metrics, the Hydra
configs as train.py composes them, the prepared Shakespeare corpus. No test reaches a network service."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import config_schema  # registers the schema that configs/*.yaml name in their defaults
from metrics import read_metrics  # noqa: F401  (shared with the test modules)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO_DIR = Path(__file__).resolve().parents[1]

# a small model and batch, so that a run's time is mostly start-up. A checkpoint only at the end of a run (and on a
# stop signal): a test that reads one in between sets its own ckpt_interval. On the CPU, also on a GPU node
# (device=auto would take the GPU, bf16 and compile there, and 2-rank runs would ask for a second GPU): only the
# tests marked cuda (tests/test_cuda.py) add device=cuda after these
TINY = ["device=cpu", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "total_batch_size=4", "micro_batch_size=2", "eval_interval=4", "eval_steps=2",
        "log_interval=1", "ckpt_interval=1000", "warmup_steps=2", "cpu_peak_flops=1e11"]


# the prepared Shakespeare corpus of this test session, in its temporary folder (never the repo's data/ folder,
# so that parallel test processes never share, and no stale copy is reused): set by the shakespeare_bins fixture
CORPUS = {"dir": None}


def train_command(args, out_dir, launcher=(sys.executable,)):
    """The command line of train.py with TINY, the session's corpus (args may name another data.dir), then args."""
    if CORPUS["dir"] is None and not any(a.startswith("data.dir=") for a in args):
        raise AssertionError("a test that runs train.py on Shakespeare needs the shakespeare_bins fixture")
    corpus = [f"data.dir={CORPUS['dir']}"] if CORPUS["dir"] is not None else []
    return [*launcher, str(REPO_DIR / "train.py"), *TINY, *corpus, f"out_dir={out_dir}", *args]


def run_train(args, out_dir, check=True, launcher=(sys.executable,), env=None):
    """train.py in a subprocess with TINY, then args; fails the test with its output unless check=False."""
    cmd = train_command(args, out_dir, launcher)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(cmd, cwd=REPO_DIR, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def train_in_process(args, out_dir):
    """train.train() in this process, as `python train.py` with TINY, the session's corpus, then args: for tests
    of what a run computes, where a subprocess adds only start-up (and SophiaG's kernels compile once per test
    process, not once per run). Returns (exit status, printed output). Exit codes, one-line errors and signals
    stay with run_train."""
    import contextlib
    import io
    import signal

    import torch

    import train
    cfg = config_schema.compose_config(None, train_command(args, out_dir)[2:])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run_train's OMP_NUM_THREADS=1: the same sums in the same order
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            status = train.train(cfg)
    finally:
        torch.set_num_threads(threads)
        for signum, handler in handlers.items():  # train() installs its stop-signal handlers
            signal.signal(signum, handler)
    return status, printed.getvalue()


def refusal_in_process(args, out_dir):
    """(exit status, stderr) of `python train.py args` when it refuses its input, without a new process: the
    command line's check (cli.check_command_line exits 2 with one line), then train(), whose
    ConfigError main() prints as `error: ...` and turns into exit status 2. Status 0: nothing refused."""
    import contextlib
    import io

    from hydra import initialize_config_dir

    import cli
    from config_schema import CONFIG_DIR, ConfigError

    overrides = train_command(args, out_dir)[2:]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            cli.check_command_line(overrides)
            # Hydra's composition (its errors as the one line cli.run_main prints) and main()'s check_composed
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
                cli.compose_checked(overrides)
            train_in_process(args, out_dir)
        except SystemExit as e:
            return e.code, stderr.getvalue()
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)  # main()
            return 2, stderr.getvalue()
    return 0, stderr.getvalue()


def flatten(tree, prefix=""):
    """A nested config dict as {"optim.lr": ..., "model.n_layer": ...}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def cpu_flags():
    """The flags of /proc/cpuinfo's first processor (Linux): the kernel's own list of the CPU's instructions, a
    reference independent of torch's detection."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    line = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    return set(line.split(":", 1)[1].split())


def compose_config(preset=None, overrides=()):
    """The config train.py runs with for `python train.py [config=preset] overrides...`, as a plain dict."""
    from omegaconf import OmegaConf
    return OmegaConf.to_container(config_schema.compose_config(preset, overrides), resolve=True, enum_to_str=True)


def write_synthetic_tokens(data_dir, vocab_size=50304, train_tokens=200_000, val_tokens=20_000, seed=0):
    """A prepared data directory of synthetic tokens: a random walk of small steps modulo vocab_size, so that a
    model can learn it."""
    import numpy as np

    from data.common import write_token_data as write
    rng = np.random.default_rng(seed)
    walks = {split: np.cumsum(rng.integers(0, 8, n)) % vocab_size
             for split, n in (("train", train_tokens), ("val", val_tokens))}
    return write(data_dir, walks, tokenizer="synthetic", source="synthetic")


@pytest.fixture(autouse=True, scope="module")
def fresh_compile_caches():
    """Every test module starts with dynamo's caches empty. A training run compiles each fused Sophia kernel a
    few times (once per dtype and bundle length); the whole suite, in one process, builds hundreds of optimizers
    over float32, float64, bfloat16 and complex tensors and several inductor option sets, which would otherwise
    pass dynamo's limit of 8 variants per function and send the fused step down its eager fallback."""
    import torch._dynamo
    torch._dynamo.reset()
    yield


@pytest.fixture(scope="session")
def token_data(tmp_path_factory):
    """A synthetic prepared data directory, for runs that need data but not a real corpus (data.dir=)."""
    return write_synthetic_tokens(tmp_path_factory.mktemp("token_data"))


@pytest.fixture(scope="session")
def shakespeare_bins(tmp_path_factory):
    """The embedded corpus, prepared once per test process into a temporary folder, before the runs that read it
    (so that no run's timing or output includes the preparation); run_train passes it as data.dir."""
    from data.shakespeare.prepare import prepare
    CORPUS["dir"] = prepare(out_dir=tmp_path_factory.mktemp("shakespeare"))
    yield CORPUS["dir"]
    CORPUS["dir"] = None


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda (pyproject.toml's markers) are skipped where no CUDA GPU is visible."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
