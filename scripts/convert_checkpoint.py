"""
Convert a run's checkpoint between the two formats train.py writes:

    python scripts/convert_checkpoint.py out/gpt2_xl_sophiag              # ckpt.dcp (parallel=fsdp) -> ckpt.pt
    python scripts/convert_checkpoint.py out/gpt2_small_sophiag --to fsdp  # ckpt.pt (parallel=ddp) -> ckpt.dcp

ckpt.pt is one file with the whole model and optimizer state: what parallel=ddp resumes from, and what
scripts/sample.py and scripts/export_hf.py read. ckpt.dcp is the sharded torch.distributed.checkpoint directory of
parallel=fsdp, which resumes on any world size. Everything else (step, data position, config, W&B run id)
carries over, so the converted checkpoint resumes exactly where the original stopped. Runs on one CPU process;
it needs the memory of the whole model and optimizer state.

Exit status, as train.py's: 0 converted, 2 nothing to convert (no checkpoint of the source format), 1 the
converted checkpoint could not be written (the source is untouched).
"""

import argparse
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # `python scripts/x.py` puts scripts/, not the repo root, on the path

import torch
from omegaconf import OmegaConf

import sophia
from build import build_optimizer
from checkpoint import CHECKPOINT_NAMES, RunError, load_sharded, save_checkpoint, save_sharded
from config_schema import ConfigError
from distributed import Env
from model import GPT, GPTConfig


def build(config):
    """The run's model and optimizer, whole, on the CPU."""
    cfg = OmegaConf.create(config)
    model = GPT(GPTConfig(**{k: v for k, v in config["model"].items() if k != "name"}))
    optimizer = build_optimizer(cfg, model)
    if isinstance(optimizer, sophia.SophiaG):
        optimizer.fused = False  # loading takes one zero step to create the state: no need to compile for it
    return model, optimizer


def to_single_file(run_dir):
    source, target = run_dir / CHECKPOINT_NAMES["fsdp"], run_dir / CHECKPOINT_NAMES["ddp"]
    if not source.is_dir():
        raise ConfigError(f"{run_dir} holds no sharded checkpoint ({source.name}): give the out_dir of a "
                                f"parallel=fsdp run")
    state = torch.load(source / "train_state.pt", map_location="cpu", weights_only=False)
    model, optimizer = build(state["config"])
    load_sharded(source, model, optimizer)  # no process group: DCP reads every shard into the whole tensors
    save_checkpoint(target, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state})
    return source, target, state["step"]


def to_sharded(run_dir):
    source, target = run_dir / CHECKPOINT_NAMES["ddp"], run_dir / CHECKPOINT_NAMES["fsdp"]
    if not source.is_file():
        raise ConfigError(f"{run_dir} holds no single-file checkpoint ({source.name}): give the out_dir of a "
                                f"parallel=ddp run")
    ckpt = torch.load(source, map_location="cpu", weights_only=False)
    model, optimizer = build(ckpt["config"])
    model.load_state_dict(ckpt.pop("model"))
    optimizer.load_state_dict(ckpt.pop("optimizer"))
    env = Env(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), dtype="float32")
    save_sharded(target, model, optimizer, ckpt, env)  # what parallel=fsdp on one process writes
    return source, target, ckpt["step"]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a run's checkpoint: sharded ckpt.dcp <-> single-file ckpt.pt.")
    parser.add_argument("run", type=Path, help="the run folder (train.py's out_dir)")
    parser.add_argument("--to", choices=["ddp", "fsdp"], default="ddp",
                        help="ddp: ckpt.dcp -> ckpt.pt (default; for sample.py, export_hf.py, parallel=ddp); "
                             "fsdp: ckpt.pt -> ckpt.dcp")
    args = parser.parse_args(argv)
    try:
        source, target, step = (to_single_file if args.to == "ddp" else to_sharded)(args.run)
    except (ConfigError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    print(f"wrote {target} (step {step}) from {source}; resume it with parallel={args.to}")


if __name__ == "__main__":
    main()
