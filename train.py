"""
Train a GPT-2 with Sophia, AdamW or Lion, on one process or under torchrun, configured by Hydra.

    python train.py                                        # the embedded default: tiny GPT, Shakespeare, CPU
    python train.py config=shakespeare_adamw               # the same run with AdamW
    torchrun --standalone --nproc_per_node=8 train.py config=gpt2_small_sophiag
    python train.py config=gpt2_small_adamw optim.lr=3e-4 max_steps=2000 wandb.enabled=true

Every optimizer goes through this one loop, with one data order and one model, so that their curves can
be compared. Randomness is a function of (seed, step, rank): the data order, the dropout masks and the
Hessian estimator's samples, so a resumed run continues exactly as if it had never stopped.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

import sophia
from data.common import open_split
from mfu import estimate_mfu, peak_flops
from model import GPT, GPTConfig

REPO_DIR = Path(__file__).resolve().parent
CHECKPOINT_FORMAT = 1


class ConfigError(ValueError):
    """Bad input found before any training: the message names the fix."""


# -----------------------------------------------------------------------------------------------------
# Configuration checks: everything that can be wrong is caught here, before data or model are built.

def resolve_run_name(cfg):
    """The preset name plus the command-line overrides: the same on every rank, no timestamps."""
    if cfg.run_name:
        return str(cfg.run_name)
    preset, overrides = "run", []
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        preset = hydra_cfg.runtime.choices.get("config") or preset
        skipped = ("config=", "out_dir=", "run_name=", "resume=", "device=", "wandb.", "compile=",
                   "log_interval=", "ckpt_interval=")
        overrides = [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith(skipped)]
    name = "_".join([preset] + overrides)
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "-", name)


def check_config(cfg, world_size):
    """Derive the batch split and raise ConfigError for anything that would fail later."""
    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    optim = cfg.optim
    need(optim.name in ("adamw", "lion", "sophiag", "sophiah"),
         f"optim.name={optim.name} is unknown: choose optim=adamw, lion, sophiag or sophiah")
    need(cfg.max_steps >= 1, f"max_steps={cfg.max_steps}: set max_steps to 1 or more")
    lr_decay_steps = cfg.lr_decay_steps if cfg.lr_decay_steps is not None else cfg.max_steps
    need(cfg.warmup_steps >= 0 and lr_decay_steps >= 1,
         f"warmup_steps={cfg.warmup_steps}, lr_decay_steps={lr_decay_steps}: use warmup_steps >= 0, lr_decay_steps >= 1")
    need(optim.lr > 0, f"optim.lr={optim.lr}: the learning rate must be positive")
    need(0 <= cfg.min_lr <= optim.lr, f"min_lr={cfg.min_lr} must lie in [0, optim.lr={optim.lr}]")
    need(cfg.dtype in ("auto", "float32", "bfloat16"),
         f"dtype={cfg.dtype}: use auto, float32 or bfloat16 (float16 overflows Sophia's Hessian: use bfloat16)")
    for key in ("eval_interval", "eval_steps", "log_interval", "ckpt_interval", "micro_batch_size",
                "total_batch_size"):
        need(cfg[key] >= 1, f"{key}={cfg[key]}: set it to 1 or more")

    # The global batch is fixed in sequences; each rank runs grad_accum micro-batches of micro_batch_size.
    per_step = cfg.micro_batch_size * world_size
    need(cfg.total_batch_size % per_step == 0,
         f"total_batch_size={cfg.total_batch_size} is not a multiple of micro_batch_size={cfg.micro_batch_size} "
         f"x world_size={world_size} = {per_step}: pick a micro_batch_size that divides "
         f"{cfg.total_batch_size / world_size:g} (total_batch_size / world_size), or change total_batch_size")
    grad_accum = cfg.total_batch_size // per_step

    hess_batch, hess_accum, hess_micro = 0, 0, 0
    if optim.name in ("sophiag", "sophiah"):
        need(optim.rho > 0, f"optim.rho={optim.rho}: rho must be positive (the paper uses 0.03-0.08)")
        need(optim.hess_interval >= 1, f"optim.hess_interval={optim.hess_interval}: set it to 1 or more")
        expected = {"sophiag": "gnb", "sophiah": "hutchinson"}[optim.name]
        need(optim.estimator == expected,
             f"optim.estimator={optim.estimator} does not fit optim={optim.name}: SophiaG squares a sampled-label "
             f"gradient (gnb), SophiaH takes u*(Hu) (hutchinson); use optim={'sophiah' if expected == 'gnb' else 'sophiag'}")
        # the Hessian batch runs in micro-batches of micro_batch_size, or in one smaller one per rank
        hess_batch = optim.hess_batch_size or cfg.total_batch_size
        hess_per_rank = hess_batch // world_size
        hess_micro = min(cfg.micro_batch_size, hess_per_rank)
        need(hess_batch % world_size == 0 and hess_micro >= 1 and hess_per_rank % hess_micro == 0,
             f"optim.hess_batch_size={hess_batch} does not split over world_size={world_size} in micro-batches of "
             f"micro_batch_size={cfg.micro_batch_size}: use a multiple of {per_step}, or a multiple of "
             f"{world_size} below {per_step} (the paper's half batch: {cfg.total_batch_size // 2})")
        hess_accum = hess_per_rank // hess_micro
    for beta in optim.get("betas", []):
        need(0 <= beta < 1, f"optim.betas={list(optim.betas)}: each beta must lie in [0, 1)")
    return grad_accum, hess_batch, hess_accum, hess_micro, lr_decay_steps


def random_seed(seed, step, chunk, purpose):
    """The seed for one micro-batch's randomness: a pure function, so resume needs no RNG state."""
    entropy = [seed, step, chunk, {"dropout": 1, "hessian": 2}[purpose]]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def get_lr(step, cfg, lr_decay_steps):
    """Linear warmup from 0 at step 0 (the official formula, lr·step/warmup), then cosine to min_lr over
    lr_decay_steps, then min_lr."""
    if step < cfg.warmup_steps:
        return cfg.optim.lr * step / cfg.warmup_steps
    if step >= lr_decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, lr_decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.optim.lr - cfg.min_lr)


# -----------------------------------------------------------------------------------------------------
# Data: a stream of non-overlapping sequences, reshuffled each epoch, addressed by position. Position p of
# the stream is a pure function of (seed, p), so the sampler's whole state is one counter per stream.

class SequenceStream:
    def __init__(self, tokens, seq_len, seed):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        # one token of slack for the shifted targets and one sequence for the per-epoch shift
        self.num_seqs = (len(tokens) - 1) // seq_len - 1
        if self.num_seqs < 1:
            raise ConfigError(f"the split holds {len(tokens):,} tokens, fewer than two sequences of "
                              f"model.block_size={seq_len}: lower model.block_size or use a larger corpus")
        self._epoch, self._order, self._shift = None, None, 0

    def _starts(self, positions):
        starts = np.empty(len(positions), dtype=np.int64)
        for i, pos in enumerate(positions):
            epoch, index = divmod(int(pos), self.num_seqs)
            if epoch != self._epoch:  # a fresh order and sequence boundaries every epoch
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._order = torch.randperm(self.num_seqs, generator=g).numpy()
                self._shift = int(torch.randint(self.seq_len, (1,), generator=g))
                self._epoch = epoch
            starts[i] = self._shift + self._order[index] * self.seq_len
        return starts

    def batch(self, first, count, device):
        """Sequences first..first+count-1 of the stream: x, y of shape (count, seq_len), int64."""
        starts = self._starts(range(first, first + count))
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        xy = torch.from_numpy(rows)
        if device.type == "cuda":
            xy = xy.pin_memory().to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]


def load_data(cfg, is_master, distributed):
    data_dir = Path(cfg.data.dir) if cfg.data.dir else REPO_DIR / "data" / cfg.data.name
    if not data_dir.is_absolute():
        data_dir = REPO_DIR / data_dir
    missing = not (data_dir / "meta.json").exists()
    if missing and cfg.data.name == "shakespeare":  # the embedded corpus prepares itself
        if is_master:
            print(f"preparing the Shakespeare corpus in {data_dir} (once)")
            from data.shakespeare.prepare import prepare
            prepare(out_dir=data_dir)
        if distributed:
            dist.barrier()
    try:
        return open_split(data_dir, "train"), open_split(data_dir, "val")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


# -----------------------------------------------------------------------------------------------------
# Optimizers: one parameter grouping (weight decay on >=2-D weights only) for all of them.

def build_optimizer(cfg, model, device):
    optim = cfg.optim
    groups = model.configure_optimizer_groups(optim.weight_decay)
    betas = tuple(optim.betas)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=betas, eps=optim.eps, fused=True)
    if optim.name == "lion":
        return sophia.Lion(groups, lr=optim.lr, betas=betas, weight_decay=optim.weight_decay)
    if optim.name == "sophiag":
        return sophia.SophiaG(groups, lr=optim.lr, betas=betas, rho=optim.rho, weight_decay=optim.weight_decay)
    return sophia.SophiaH(groups, lr=optim.lr, betas=betas, rho=optim.rho, weight_decay=optim.weight_decay)


def math_attention():
    """The flash and memory-efficient attention kernels have no double backward; the math kernel has."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def check_double_backward(model, device, autocast):
    """SophiaH needs Hessian-vector products: fail at start, not at the first refresh."""
    idx = torch.zeros(1, 8, dtype=torch.long, device=device)
    try:
        with math_attention(), autocast:
            _, loss = model(idx, idx)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, create_graph=True)
        torch.autograd.grad(sum(g.sum() for g in grads), params, allow_unused=True)
    except RuntimeError as e:
        raise ConfigError(f"optim=sophiah needs double backward through the model, which failed: {e}. "
                          f"Use optim=sophiag, or compile=false and device=cpu to check") from None


# -----------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary file and renamed, so a crash never leaves half a checkpoint.

def save_checkpoint(path, state):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, cfg):
    try:
        # mmap: every rank reads the checkpoint, and the page cache shares one copy among a node's ranks
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # truncated, corrupt, or not a checkpoint at all
        raise ConfigError(f"cannot read the checkpoint {path} ({type(e).__name__}: {e}); move it away to "
                          f"start over, or set out_dir= to a fresh directory") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a checkpoint of this train.py (format {CHECKPOINT_FORMAT}); "
                          f"set out_dir= to a fresh directory")
    saved_model = ckpt["config"]["model"]
    now_model = OmegaConf.to_container(cfg.model, resolve=True)
    differ = sorted(k for k in set(saved_model) | set(now_model) if saved_model.get(k) != now_model.get(k))
    if differ:
        raise ConfigError(f"the checkpoint in {path.parent} has a different model ({', '.join(f'model.{k}' for k in differ)}): "
                          f"use the checkpoint's model settings, or set out_dir= to a fresh directory")
    if ckpt["config"]["optim"]["name"] != cfg.optim.name:
        raise ConfigError(f"the checkpoint in {path.parent} was trained with optim={ckpt['config']['optim']['name']}, "
                          f"not optim={cfg.optim.name}: set out_dir= to a fresh directory to switch optimizers")
    return ckpt


class MetricsLog:
    """metrics.jsonl (one JSON object per event) and, when enabled, the same keys to W&B. Rank 0 only."""

    def __init__(self, path, resume_step, wandb_run):
        self.path, self.wandb_run = path, wandb_run
        if resume_step is not None and path.exists():
            # drop what the interrupted run logged after its last checkpoint: each step is logged once
            lines = [l for l in path.read_text().splitlines() if l.strip()]
            kept = []
            for line in lines:
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError):
                    pass  # a line cut by the crash
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(l + "\n" for l in kept))
            os.replace(tmp, path)
        elif path.exists():
            path.unlink()

    def log(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def start_wandb(cfg, run_name, out_dir, run_id):
    """One W&B run per training run, resumable by id; a W&B failure never stops training."""
    try:
        import secrets
        import wandb
        run_id = run_id or secrets.token_hex(6)  # kept in the checkpoint: a resumed job continues this W&B run
        run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=run_name, id=run_id,
                         resume="allow", dir=str(out_dir), mode=cfg.wandb.mode,
                         group=cfg.wandb.group or cfg.model.name,
                         tags=[cfg.optim.name, cfg.model.name, cfg.data.name] + list(cfg.wandb.tags),
                         config=OmegaConf.to_container(cfg, resolve=True))
        return run, run_id
    except Exception as e:
        print(f"warning: W&B could not start ({type(e).__name__}: {e}); logging to metrics.jsonl only")
        return None, run_id


# -----------------------------------------------------------------------------------------------------

def train(cfg):
    # ---- processes and devices
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    is_master = rank == 0

    grad_accum, hess_batch, hess_accum, hess_micro, lr_decay_steps = check_config(cfg, world_size)  # before anything expensive

    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={cfg.device} but CUDA is not available: use device=auto or device=cpu")
        if device.type == "cuda" and distributed:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # TF32 for any fp32 matmul left outside autocast. (Not via torch.backends: submitit's cloudpickle
        # cannot pickle a function that touches it, which breaks Hydra sweeps on SLURM.)
        torch.set_float32_matmul_precision("high")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "bfloat16" and device.type == "cpu":
        print("note: bfloat16 autocast on CPU is much slower than float32 on most CPUs")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext())

    if distributed:
        from datetime import timedelta
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=30))

    run_name = resolve_run_name(cfg)
    # out_dir may interpolate ${run_name}, so that each run of a sweep gets a folder of its own:
    # python train.py -m config=shakespeare_adamw optim.lr=1e-3,2e-3 'out_dir=out/sweep/${run_name}'
    cfg.run_name = run_name
    out_dir = Path(cfg.out_dir) if cfg.out_dir else REPO_DIR / "out" / run_name
    out_dir = out_dir if out_dir.is_absolute() else Path.cwd() / out_dir
    ckpt_path = out_dir / "ckpt.pt"
    resuming = cfg.resume and ckpt_path.exists()
    if ckpt_path.exists() and not cfg.resume:
        raise ConfigError(f"{ckpt_path} exists and resume=false would overwrite it: set resume=true to "
                          f"continue it, or out_dir= to a fresh directory")

    ckpt = load_checkpoint(ckpt_path, cfg) if resuming else None  # refuse a bad checkpoint before the work

    # ---- data
    seq_len = cfg.model.block_size
    train_tokens, val_tokens = load_data(cfg, is_master, distributed)
    train_stream = SequenceStream(train_tokens, seq_len, cfg.seed)
    hess_stream = SequenceStream(train_tokens, seq_len, cfg.seed + 1)  # fresh data for the Hessian estimate
    val_stream = SequenceStream(val_tokens, seq_len, 0)  # the same validation sequences for every run
    if hess_batch > train_stream.num_seqs:
        raise ConfigError(f"optim.hess_batch_size={hess_batch} sequences exceed the {train_stream.num_seqs:,} "
                          f"training sequences: lower optim.hess_batch_size")

    # ---- model and optimizer
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model_args = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    raw_model = GPT(GPTConfig(**model_args)).to(device)
    optimizer = build_optimizer(cfg, raw_model, device)
    if cfg.optim.name == "sophiah":
        check_double_backward(raw_model, device, autocast)

    step, data_state, wandb_run_id, elapsed_before = 0, {"train_seqs": 0, "hess_seqs": 0}, None, 0.0
    if resuming:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, data_state = ckpt["step"], ckpt["data_state"]
        wandb_run_id, elapsed_before = ckpt.get("wandb_run_id"), ckpt.get("elapsed_s", 0.0)
        if is_master:
            print(f"resumed from {ckpt_path} at step {step}")

    model = torch.compile(raw_model) if cfg.compile else raw_model
    if distributed:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    # Sophia's win rate per part: the token embedding (also the head) holds most coordinates of a small model
    win_rate_parts = {"embedding": [raw_model.transformer.wte.weight],
                      "blocks": list(raw_model.transformer.h.parameters())}

    flops_per_token = raw_model.flops_per_token()
    peak = peak_flops(device, dtype, cpu_peak=cfg.cpu_peak_flops)
    tokens_per_step = cfg.total_batch_size * seq_len

    # ---- run directory, metrics, W&B (rank 0 only)
    wandb_run = None
    if is_master:
        out_dir.mkdir(parents=True, exist_ok=True)
        config_yaml = OmegaConf.to_yaml(OmegaConf.merge(cfg, {"run_name": run_name, "out_dir": str(out_dir)}),
                                        resolve=True)
        (out_dir / "config.yaml").write_text(config_yaml)
        if cfg.wandb.enabled:
            wandb_run, wandb_run_id = start_wandb(cfg, run_name, out_dir, wandb_run_id)
        metrics = MetricsLog(out_dir / "metrics.jsonl", step if resuming else None, wandb_run)
        print(f"run {run_name}: {raw_model.num_params() / 1e6:.2f}M parameters, optimizer {cfg.optim.name}, "
              f"{world_size} rank(s) x {grad_accum} micro-batch(es) of {cfg.micro_batch_size} = "
              f"{tokens_per_step:,} tokens/step, device {device} {dtype}")

    # ---- preemption: SIGUSR1 (SLURM's notice) -> checkpoint, requeue, exit 0; SIGTERM -> checkpoint, exit 0
    stop_signal = {"received": 0}

    def on_signal(signum, frame):
        stop_signal["received"] = signum

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def checkpoint():
        if is_master:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "data_state": dict(data_state),
                "config": OmegaConf.to_container(cfg, resolve=True), "run_name": run_name,
                "wandb_run_id": wandb_run_id, "elapsed_s": elapsed_before + time.time() - t_start,
                "torch_version": torch.__version__})
        if distributed:
            dist.barrier()

    @torch.no_grad()
    def evaluate():
        """Mean loss over eval_steps fixed validation micro-batches, spread over the ranks."""
        model.eval()
        total = torch.zeros(2, device=device)  # (sum of losses, number of micro-batches)
        for i in range(rank, cfg.eval_steps, world_size):
            x, y = val_stream.batch(i * cfg.micro_batch_size, cfg.micro_batch_size, device)
            with autocast:
                _, loss = raw_model(x, y)  # the plain module: no DDP hooks for a forward-only pass
            total += torch.stack([loss.float(), torch.ones((), device=device)])
        if distributed:
            dist.all_reduce(total)
        model.train()
        return (total[0] / total[1]).item()

    def forward_backward(x, y, scale, last):
        # DDP all-reduces the gradients only on the last micro-step
        sync = model.no_sync() if distributed and not last else nullcontext()
        with sync:
            with autocast:
                _, loss = model(x, y)
            (loss * scale).backward()
        return loss.detach()

    def refresh_hessian():
        """Every hess_interval steps: fill p.grad with the estimator's sample, then update the EMA."""
        generator = torch.Generator(device=device)
        for micro in range(hess_accum):
            chunk = rank * hess_accum + micro  # as in the training step: independent of the world size
            generator.manual_seed(random_seed(cfg.seed, step, chunk, "hessian"))  # sampled labels or probes
            x, y = hess_stream.batch(data_state["hess_seqs"] + chunk * hess_micro, hess_micro, device)
            if cfg.optim.name == "sophiag":
                sync = model.no_sync() if distributed and micro < hess_accum - 1 else nullcontext()
                with sync:
                    with autocast:
                        logits, _ = model(x)  # (B, T, vocab): labels are sampled from these
                    sophia.gnb_backward(logits, 1.0 / hess_accum, generator)
            else:
                # Hutchinson needs double backward: the plain module, with the math attention kernel
                with math_attention(), autocast:
                    _, loss = raw_model(x, y)
                sophia.hutchinson_backward(loss, params, 1.0 / hess_accum, generator, cfg.optim.probe)
        if cfg.optim.name == "sophiah" and distributed:
            for p in params:  # the DDP hooks did not run: average u*(Hu) over ranks by hand
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        if cfg.optim.name == "sophiag" and cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # as the official loop does
        applied = optimizer.update_hessian()  # a 0-d bool on the device: False if the estimate was not finite
        hessian_skipped.add_(~applied)  # read at the next log step, so no sync here
        optimizer.zero_grad(set_to_none=True)
        data_state["hess_seqs"] += hess_batch

    # GNB's estimate is B * grad^2 of the mean loss over B predictions: SophiaG takes B as `bs`.
    # Hutchinson's u*(Hu) is already the Hessian of the mean loss, so SophiaH's rho is gamma itself (bs=1).
    step_kwargs = {}
    if cfg.optim.name == "sophiag":
        step_kwargs = {"bs": hess_batch * seq_len}
    elif cfg.optim.name == "sophiah":
        step_kwargs = {"bs": 1}

    # ---- the loop
    def log_eval():
        nonlocal eval_seconds
        t0 = time.time()
        val_loss = evaluate()
        eval_seconds += time.time() - t0
        if is_master:
            metrics.log({"step": step, "tokens": step * tokens_per_step, "val/loss": val_loss,
                         "time/elapsed_s": elapsed_before + time.time() - t_start})
            print(f"step {step}: val loss {val_loss:.4f}")

    t_start = time.time()
    t_last, step_last, eval_seconds = t_start, step, 0.0
    loss_sum = torch.zeros((), device=device)
    clipped_steps = torch.zeros((), device=device)
    hessian_skipped = torch.zeros((), device=device, dtype=torch.long)
    skipped_steps = 0
    model.train()
    if step == 0:
        log_eval()
    while step < cfg.max_steps:
        lr = get_lr(step, cfg, lr_decay_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(grad_accum):
            # micro-batch number `chunk` of the global batch: the same sequences and dropout masks whatever
            # the world size, so two ranks compute exactly what one process computes over two micro-steps
            chunk = rank * grad_accum + micro
            torch.manual_seed(random_seed(cfg.seed, step, chunk, "dropout"))
            x, y = train_stream.batch(data_state["train_seqs"] + chunk * cfg.micro_batch_size,
                                      cfg.micro_batch_size, device)
            loss_sum += forward_backward(x, y, 1.0 / grad_accum, last=micro == grad_accum - 1) / grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if cfg.grad_clip > 0:
            clipped_steps += (grad_norm > cfg.grad_clip).float()
        # the one host sync of a step (on CUDA it waits for the backward to finish, then the step's kernels
        # are launched): a non-finite gradient skips the update instead of poisoning the optimizer state
        if torch.isfinite(grad_norm):
            optimizer.step(**step_kwargs)
        else:
            skipped_steps += 1
            if is_master:
                print(f"step {step}: non-finite gradient norm, update skipped")
        optimizer.zero_grad(set_to_none=True)
        data_state["train_seqs"] += cfg.total_batch_size

        if hess_accum and step % cfg.optim.hess_interval == cfg.optim.hess_interval - 1:
            refresh_hessian()
        step += 1

        stop = False
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            if distributed:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            now = time.time()
            steps_done = step - step_last
            tokens_per_s = steps_done * tokens_per_step / (now - t_last - eval_seconds)
            record = {"step": step, "tokens": step * tokens_per_step,
                      "train/loss": loss_sum.item() / steps_done, "lr": lr, "grad_norm": grad_norm.item(),
                      "time/elapsed_s": elapsed_before + now - t_start, "throughput/tokens_per_s": tokens_per_s,
                      "mfu": estimate_mfu(tokens_per_s / world_size, flops_per_token, peak)}
            if hess_accum:
                record["optim/clip_rate"] = clipped_steps.item() / steps_done
                stats = optimizer.sophia_stats(step_kwargs["bs"], parts=win_rate_parts)
                record.update({k: float(v) for k, v in stats.items()})
                if hessian_skipped.item():
                    record["optim/hessian_skipped"] = hessian_skipped.item()
                    if is_master:
                        print(f"step {step}: {hessian_skipped.item()} non-finite Hessian estimate(s) skipped so far")
            if skipped_steps:
                record["skipped_steps"] = skipped_steps
            if is_master:
                metrics.log(record)
                print(f"step {step}: loss {record['train/loss']:.4f}, lr {lr:.2e}, "
                      f"grad norm {record['grad_norm']:.3f}, {tokens_per_s:,.0f} tokens/s, "
                      f"mfu {100 * record['mfu']:.1f}%")
            loss_sum.zero_()
            clipped_steps.zero_()
            t_last, step_last, eval_seconds = now, step, 0.0
            # preemption: every rank must stop at the same step, so they agree here, at a log step
            signals = torch.tensor(float(stop_signal["received"]), device=device)
            if distributed:
                dist.all_reduce(signals, op=dist.ReduceOp.MAX)
            stop = bool(signals.item()) and step < cfg.max_steps

        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            log_eval()
        if stop:
            checkpoint()
            if is_master:
                print(f"stop signal received: checkpoint at step {step} in {ckpt_path}")
                job_id = os.environ.get("SLURM_JOB_ID")
                # SLURM's preemption notice (USR1) puts the job back in the queue, to resume from here;
                # SIGTERM (scancel, or the end of the time limit) only checkpoints: a cancel stays a cancel
                if job_id and stop_signal["received"] == signal.SIGUSR1:
                    subprocess.run(["scontrol", "requeue", job_id], check=False)
                    print(f"requeued SLURM job {job_id}")
            break
        if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
            checkpoint()

    if is_master and step >= cfg.max_steps:
        print(f"done: metrics in {out_dir / 'metrics.jsonl'}, checkpoint in {ckpt_path}")
    if wandb_run is not None:
        wandb_run.finish()
    if distributed:
        dist.destroy_process_group()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig):
    try:
        train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
