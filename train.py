"""
Train a GPT-2 with Sophia, AdamW or Lion, on one process or under torchrun, configured by Hydra.

    python train.py                                        # the embedded default: tiny GPT, Shakespeare, CPU
    python train.py config=shakespeare_adamw               # the same run with AdamW
    torchrun --standalone --nproc_per_node=8 train.py config=gpt2_small_sophiag
    torchrun --standalone --nproc_per_node=8 train.py config=gpt2_xl_sophiag   # 1.5B, sharded (parallel=fsdp)
    python train.py config=gpt2_small_adamw optim.lr=3e-4 max_steps=2000 wandb.enabled=true

Every optimizer goes through this one loop, with one data order and one model, so that their curves can
be compared. Randomness is a function of (seed, step, rank): the data order, the dropout masks and the
Hessian estimator's samples, so a resumed run continues exactly as if it had never stopped.
"""

import errno
import fcntl
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import config_schema  # registers the configuration's schema with Hydra, before @hydra.main composes
import sophia
from data.common import open_split
from mfu import estimate_mfu, peak_flops
from model import GPT, GPTConfig

REPO_DIR = Path(__file__).resolve().parent
CHECKPOINT_FORMAT = 1
# parallel=ddp writes one file; parallel=fsdp a torch.distributed.checkpoint directory (a symlink to it, in fact)
CHECKPOINT_NAMES = {"ddp": "ckpt.pt", "fsdp": "ckpt.dcp"}
CONVERTER = "scripts/convert_checkpoint.py"
# DCP without a process group (parallel=fsdp on one process, the converter) warns that it assumes one process: it does
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class ConfigError(ValueError):
    """Bad input found before any training: the message names the fix. Exit status 2."""


class RunError(RuntimeError):
    """The run cannot go on (it diverged, the disk is full): the message says what was kept. Exit status 1."""


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


@dataclass(frozen=True)
class BatchPlan:
    """How a step's global batch, and the Hessian batch, split into micro-batches on each rank."""
    grad_accum: int         # training micro-batches per rank per step
    lr_decay_steps: int     # the cosine ends here (optim.lr -> min_lr)
    sophia: bool            # SophiaG/SophiaH: refresh the Hessian every optim.hess_interval steps
    hess_batch: int = 0     # sequences in one global Hessian batch
    hess_accum: int = 0     # Hessian micro-batches per rank
    hess_micro: int = 0     # sequences per Hessian micro-batch
    step_bs: int = 0        # Sophia's step(bs=...): see plan_batches


def plan_batches(cfg, world_size):
    """Check the configuration and split the batches; raise ConfigError for anything that would fail later."""
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
    need(cfg.warmup_steps <= cfg.max_steps,
         f"warmup_steps={cfg.warmup_steps} > max_steps={cfg.max_steps}: the learning rate would never reach "
         f"optim.lr; lower warmup_steps (the paper warms up for 2% of the steps)")
    need(lr_decay_steps >= cfg.warmup_steps,
         f"lr_decay_steps={lr_decay_steps} < warmup_steps={cfg.warmup_steps}: the learning rate would drop to "
         f"min_lr right after the warmup; set lr_decay_steps >= warmup_steps (null = max_steps)")
    need(cfg.max_skipped_updates >= 1, f"max_skipped_updates={cfg.max_skipped_updates}: set it to 1 or more")
    need(cfg.parallel in ("ddp", "fsdp"), f"parallel={cfg.parallel}: use parallel=ddp or parallel=fsdp")
    model = cfg.model
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        need(model[key] >= 1, f"model.{key}={model[key]}: set it to 1 or more")
    need(model.n_embd % model.n_head == 0,
         f"model.n_embd={model.n_embd} is not a multiple of model.n_head={model.n_head}: each head gets "
         f"n_embd / n_head dimensions; pick n_head dividing n_embd")
    need(0 <= model.dropout < 1, f"model.dropout={model.dropout}: use a value in [0, 1)")
    need(optim.lr > 0, f"optim.lr={optim.lr}: the learning rate must be positive")
    need(0 <= cfg.min_lr <= optim.lr, f"min_lr={cfg.min_lr} must lie in [0, optim.lr={optim.lr}]")
    need(str(cfg.compile).lower() in ("auto", "true", "false"),
         f"compile={cfg.compile}: use auto (compiled on CUDA), true or false")
    need(cfg.dtype in ("auto", "float32", "bfloat16"),
         f"dtype={cfg.dtype}: use auto, float32 or bfloat16 (float16 overflows Sophia's Hessian: use bfloat16)")
    for key in ("eval_interval", "eval_steps", "log_interval", "ckpt_interval", "micro_batch_size",
                "total_batch_size"):
        need(cfg[key] >= 1, f"{key}={cfg[key]}: set it to 1 or more")
    for beta in optim.get("betas", []):
        need(0 <= beta < 1, f"optim.betas={list(optim.betas)}: each beta must lie in [0, 1)")

    # The global batch is fixed in sequences; each rank runs grad_accum micro-batches of micro_batch_size.
    per_step = cfg.micro_batch_size * world_size
    need(cfg.total_batch_size % per_step == 0,
         f"total_batch_size={cfg.total_batch_size} is not a multiple of micro_batch_size={cfg.micro_batch_size} "
         f"x world_size={world_size} = {per_step}: pick a micro_batch_size that divides "
         f"{cfg.total_batch_size / world_size:g} (total_batch_size / world_size), or change total_batch_size")
    grad_accum = cfg.total_batch_size // per_step
    if optim.name not in ("sophiag", "sophiah"):
        return BatchPlan(grad_accum, lr_decay_steps, sophia=False)

    need(optim.rho > 0, f"optim.rho={optim.rho}: rho must be positive (the paper uses 0.03-0.08)")
    need(optim.hess_interval >= 1, f"optim.hess_interval={optim.hess_interval}: set it to 1 or more")
    # the Hessian batch runs in micro-batches of micro_batch_size, or in one smaller one per rank
    hess_batch = optim.hess_batch_size or cfg.total_batch_size
    hess_per_rank = hess_batch // world_size
    hess_micro = min(cfg.micro_batch_size, hess_per_rank)
    need(hess_batch % world_size == 0 and hess_micro >= 1 and hess_per_rank % hess_micro == 0,
         f"optim.hess_batch_size={hess_batch} does not split over world_size={world_size} in micro-batches of "
         f"micro_batch_size={cfg.micro_batch_size}: use a multiple of {per_step}, or a multiple of "
         f"{world_size} below {per_step} (the paper's half batch: {cfg.total_batch_size // 2})")
    # GNB's estimate is B·grad² of the mean loss over B predictions: SophiaG takes B as `bs` (official).
    # Hutchinson's u*(Hu) is already the Hessian of the mean loss, so SophiaH's rho is gamma itself (bs=1).
    step_bs = hess_batch * cfg.model.block_size if optim.name == "sophiag" else 1
    return BatchPlan(grad_accum, lr_decay_steps, sophia=True, hess_batch=hess_batch,
                     hess_accum=hess_per_rank // hess_micro, hess_micro=hess_micro, step_bs=step_bs)


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
    if cfg.data.dir:
        data_dir = Path(cfg.data.dir) if Path(cfg.data.dir).is_absolute() else REPO_DIR / cfg.data.dir
        if not data_dir.is_dir():
            raise ConfigError(f"data.dir={cfg.data.dir} does not exist: fix the path, or prepare the data there "
                              f"with python data/{cfg.data.name}/prepare.py --out-dir {data_dir}")
    else:
        data_dir = REPO_DIR / "data" / cfg.data.name
        if cfg.data.name == "shakespeare" and not (data_dir / "meta.json").exists():  # the embedded corpus
            if is_master:
                print(f"preparing the Shakespeare corpus in {data_dir} (once, a few seconds)")
                from data.shakespeare.prepare import prepare
                with redirect_stderr(io.StringIO()):  # its progress bars: noise for a few seconds' work
                    prepare(out_dir=data_dir)
            if distributed:
                dist.barrier()
    try:
        return open_split(data_dir, "train"), open_split(data_dir, "val")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    except OSError as e:  # unreadable: permissions, a broken mount
        raise ConfigError(f"cannot read the data in {data_dir} ({e.strerror}: {e.filename}): fix its permissions, "
                          f"or set data.dir= to a readable copy") from None


# -----------------------------------------------------------------------------------------------------
# Optimizers: one parameter grouping (weight decay on >=2-D weights only) for all of them.

def build_optimizer(cfg, model):
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


def compile_enabled(cfg, device):
    """compile=auto: compiled on CUDA; on CPU, compiling takes longer than a short run saves."""
    choice = str(cfg.compile).lower()  # the schema types it as a string: true/false arrive as "True"/"False"
    return device.type == "cuda" if choice == "auto" else choice == "true"


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
# parallel=fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) shards weights, gradients and optimizer state.

def is_sharded(cfg, env):
    """parallel=fsdp over several processes (one process has nothing to shard over: it runs unsharded)."""
    return cfg.parallel == "fsdp" and env.distributed


def shard_model(model, env):
    """Each transformer block is one FSDP unit (its weights all-gathered just before its forward and backward,
    freed after); the root holds the rest, the tied embedding/head weight included, so its two uses share one
    unit. Parameters become DTensors; each rank keeps a 1/world_size slice. On CUDA with bfloat16: bf16
    compute on the gathered copies, fp32 sharded master weights and fp32 gradient reductions."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy()  # fp32 throughout
    if env.device.type == "cuda" and env.dtype == "bfloat16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def gradient_sync(run, last):
    """Gradient accumulation communicates once per step: DDP all-reduces, FSDP reduce-scatters (averaging) the
    gradients on the last micro-batch only. Returns the context to run the micro-batch's backward in."""
    if is_sharded(run.cfg, run.env):
        run.raw_model.set_requires_gradient_sync(last)
        return nullcontext()
    return run.model.no_sync() if run.env.distributed and not last else nullcontext()


def clip_gradients(params, max_norm):
    """clip_grad_norm_; returns the norm before clipping as a plain 0-d tensor. On FSDP's DTensor gradients it
    sums the shards' squares over the ranks: the global norm, as DDP's, returned as a replicated DTensor."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def hold_gathered(model, hold):
    """FSDP for Hutchinson's double backward, which differentiates with autograd.grad w.r.t. the weights the
    forward used (the all-gathered ones): hold=True keeps them gathered through forward and backward and
    reduces no gradient; hold=False restores the training settings and frees them."""
    for block in model.transformer.h:
        block.set_reshard_after_forward(not hold, recurse=False)  # the root never frees them after forward
    model.set_reshard_after_backward(not hold)
    model.set_requires_gradient_sync(not hold)
    if not hold:
        for module in (model, *model.transformer.h):
            module.reshard()


def shard_estimates(params, estimates):
    """FSDP: average the ranks' full-size Hutchinson estimates; each rank keeps its slice as the sharded .grad
    that update_hessian reads."""
    from torch.distributed.tensor import distribute_tensor
    for p, estimate in zip(params, estimates):
        estimate = estimate.to(p.dtype)
        dist.all_reduce(estimate, op=dist.ReduceOp.AVG)
        p.grad = distribute_tensor(estimate, p.device_mesh, p.placements, src_data_rank=None)  # no communication


# -----------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary file and renamed, so a crash never leaves half a checkpoint.

def save_checkpoint(path, state):
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")  # per process: two writers never share one
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # never leave a partial file behind; the previous checkpoint is untouched
        # torch.save turns a failed write into a RuntimeError whose context is the OSError
        os_error = next((x for x in (e, e.__cause__, e.__context__) if isinstance(x, OSError)), None)
        if os_error is None:
            raise
        no_space = os_error.errno == errno.ENOSPC
        why = "no space left on the device" if no_space else os_error.strerror or str(os_error)
        raise RunError(f"could not write the checkpoint {path} ({why}); the previous checkpoint is kept. "
                       f"{'Free some space' if no_space else 'Fix the cause'}, then rerun the same command to resume "
                       f"from it") from None


def first_non_finite(named_tensors):
    """The name of the first floating-point tensor holding NaN or inf, or None. Sharded tensors (DTensors) are
    checked shard by shard, and the ranks agree on the answer: then every rank must call this."""
    named = [(name, t) for name, t in named_tensors if torch.is_tensor(t) and t.is_floating_point()]
    shard = next((t for _, t in named if isinstance(t, DTensor)), None)
    if shard is None:
        return next((name for name, t in named if not bool(torch.isfinite(t).all())), None)
    device = shard.to_local().device
    bad = torch.stack([~torch.isfinite(t.to_local() if isinstance(t, DTensor) else t).all().to(device)
                       for _, t in named]).int()
    dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=shard.device_mesh.get_group())
    return next((name for (name, _), b in zip(named, bad.tolist()) if b), None)


def optimizer_tensors(optimizer_state):
    """(name, tensor) for every tensor of an optimizer state_dict, named like "state[3].exp_avg"."""
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            yield f"optimizer state[{index}].{key}", value


def load_checkpoint(path, cfg):
    """The checkpoint's dict, checked against cfg. A sharded one (a directory): its training state only; the
    weights and optimizer state load later, into the sharded model (load_sharded)."""
    sharded = path.is_dir()
    state_file = path / "train_state.pt" if sharded else path
    try:
        # mmap: every rank reads the checkpoint, and the page cache shares one copy among a node's ranks
        ckpt = torch.load(state_file, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # empty, truncated, corrupt, or not a checkpoint at all
        size = f"{state_file.stat().st_size:,} bytes" if state_file.exists() else "missing"
        raise ConfigError(f"cannot read the checkpoint {state_file} ({size}, {type(e).__name__}: "
                          f"not a complete torch checkpoint); move it away to start over, or set out_dir= to a "
                          f"fresh directory") from None
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
    if not sharded:
        check_finite(path, ckpt["model"], ckpt["optimizer"])
    return ckpt


def saved_step(path):
    """The step a checkpoint of either format was written at; -1 when it cannot be read."""
    state_file = path / "train_state.pt" if path.is_dir() else path
    try:
        return int(torch.load(state_file, map_location="cpu", weights_only=False, mmap=True)["step"])
    except Exception:
        return -1


def check_finite(path, model_state, optimizer_state):
    bad = first_non_finite(model_state.items()) or first_non_finite(optimizer_tensors(optimizer_state))
    if bad:
        raise ConfigError(f"the checkpoint {path} holds NaN/inf in {bad}: it comes from a diverged run; move it "
                          f"away and start over (with a lower optim.lr), or set out_dir= to a fresh directory")


def save_sharded(path, model, optimizer, train_state, env):
    """parallel=fsdp: every rank writes its shards with torch.distributed.checkpoint into the free one of two
    directories, path.a and path.b; rank 0 adds train_state.pt, then points the symlink `path` at the new
    directory (a rename: atomic) and removes the old one. A crash at any point leaves the previous checkpoint
    whole, and `path` on it. Works on one process too (the model then unsharded)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    current = os.readlink(path) if path.is_symlink() else None
    slot = path.with_name(f"{path.name}.{'b' if current == path.name + '.a' else 'a'}")
    if env.is_master:
        shutil.rmtree(slot, ignore_errors=True)  # what a crashed save left there
    if env.distributed:
        dist.barrier()  # no rank writes into the directory before it is empty
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=slot,
                 no_dist=not dist.is_initialized())
    except Exception as e:  # every rank gets the exception of any: the disk is full, not writable
        if env.is_master:
            shutil.rmtree(slot, ignore_errors=True)
        raise RunError(f"could not write the checkpoint {slot} ({e}); the previous checkpoint is kept. Fix the "
                       f"cause, then rerun the same command to resume from it") from None
    if env.is_master:
        save_checkpoint(slot / "train_state.pt", train_state)
        link = path.with_name(f"{path.name}.tmp.{os.getpid()}")
        link.unlink(missing_ok=True)
        link.symlink_to(slot.name)  # relative: the run directory can move
        os.replace(link, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the swap itself reaches the disk
        finally:
            os.close(fd)
        if current:
            shutil.rmtree(path.with_name(current), ignore_errors=True)


def load_sharded(path, model, optimizer):
    """Weights and optimizer state from a sharded checkpoint, into the (sharded or not) model: DCP reads the
    slices this rank holds, whatever the world size that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)  # fills the optimizer state to load into
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path,
             no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def lock_run_dir(out_dir):
    """Rank 0 holds an exclusive lock on the run directory for the life of the run, so that a second process
    (a command started twice, a requeued job overlapping its predecessor, a sweep reusing a folder) cannot
    interleave its metrics and checkpoints with ours. The OS drops the lock when the process dies, so a crash
    never leaves the directory locked. Returns the open lock file; closing it releases the lock."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / "run.lock", "a+")
    except OSError as e:
        raise ConfigError(f"cannot write to out_dir={out_dir} ({e.strerror}): set out_dir= to a writable "
                          f"directory") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise ConfigError(f"{out_dir} is in use by another training process (PID {holder}): wait for it to "
                          f"finish or stop it, or set out_dir= to another directory") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


class MetricsLog:
    """metrics.jsonl (one JSON object per event) and, when enabled, the same keys to W&B. Rank 0 only."""

    def __init__(self, path, resume_step, wandb_run):
        self.path, self.wandb_run = path, wandb_run
        if resume_step is not None and path.exists():
            # drop what the interrupted run logged after its last checkpoint: each step is logged once
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError):
                    pass  # a line cut by the crash
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        elif path.exists():
            path.unlink()

    def log(self, record):
        # NaN/inf are not JSON: a diverged value is written as null
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(finite, allow_nan=False) + "\n")
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
# Set-up: processes and device, run directory, data, model and optimizer.

@dataclass(frozen=True)
class Env:
    """This process: its rank among world_size, its device, and the precision it computes in."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dtype: str  # "float32" or "bfloat16" (autocast)

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_master(self):
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.dtype == "bfloat16" else nullcontext()


def world_size_from_env():
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_processes(cfg):
    """Pick the device and precision, and join the process group under torchrun."""
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    world_size = world_size_from_env()
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={cfg.device} but CUDA is not available: use device=auto or device=cpu")
        if device.type == "cuda" and (world_size > 1 or device.index is None):
            device = torch.device(f"cuda:{local_rank}")  # set_device needs an index
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # TF32 for any fp32 matmul left outside autocast. (Not via torch.backends: submitit's cloudpickle
        # cannot pickle a function that touches it, which breaks Hydra sweeps on SLURM.)
        torch.set_float32_matmul_precision("high")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "bfloat16" and device.type == "cpu" and rank == 0:
        print("note: bfloat16 autocast on CPU is much slower than float32 on most CPUs")
    if world_size > 1:
        from datetime import timedelta
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return Env(rank, local_rank, world_size, device, dtype)


def checkpoint_path(out_dir, cfg):
    return out_dir / CHECKPOINT_NAMES[cfg.parallel]


def resolve_out_dir(cfg, env):
    """The run directory, its lock (rank 0), and the checkpoint to resume from (None for a fresh run)."""
    run_name = resolve_run_name(cfg)
    # out_dir may interpolate ${run_name}, so that each run of a sweep gets a folder of its own:
    # python train.py -m config=shakespeare_adamw optim.lr=1e-3,2e-3 'out_dir=out/sweep/${run_name}'
    cfg.run_name = run_name
    out_dir = Path(cfg.out_dir) if cfg.out_dir else REPO_DIR / "out" / run_name
    out_dir = out_dir if out_dir.is_absolute() else Path.cwd() / out_dir
    lock = lock_run_dir(out_dir) if env.is_master else None
    ckpt_path = checkpoint_path(out_dir, cfg)
    if ckpt_path.exists() and not cfg.resume:
        raise ConfigError(f"{ckpt_path} exists and resume=false would overwrite it: set resume=true to "
                          f"continue it, or out_dir= to a fresh directory")
    ckpt = load_checkpoint(ckpt_path, cfg) if ckpt_path.exists() else None
    # the other parallel= mode's checkpoint: refuse it, and refuse to resume behind it (a converted copy)
    mode, other = next((m, out_dir / name) for m, name in CHECKPOINT_NAMES.items() if m != cfg.parallel)
    other_step = saved_step(other) if cfg.resume and other.exists() else None
    if other_step is not None and (ckpt is None or other_step > ckpt["step"]):
        newer = f", newer than {ckpt_path.name} (step {ckpt['step']})" if ckpt else ""
        raise ConfigError(f"{out_dir} holds a parallel={mode} checkpoint ({other.name}, step {other_step}{newer}): "
                          f"resume with parallel={mode}, or convert it for parallel={cfg.parallel} first: "
                          f"python {CONVERTER} {out_dir} --to {cfg.parallel}")
    return out_dir, lock, ckpt


@dataclass
class Streams:
    train: SequenceStream
    hessian: SequenceStream  # fresh training data for the Hessian estimate
    val: SequenceStream      # the same validation sequences for every run


def load_streams(cfg, env, plan):
    train_tokens, val_tokens = load_data(cfg, env.is_master, env.distributed)
    seq_len = cfg.model.block_size
    streams = Streams(train=SequenceStream(train_tokens, seq_len, cfg.seed),
                      hessian=SequenceStream(train_tokens, seq_len, cfg.seed + 1),
                      val=SequenceStream(val_tokens, seq_len, 0))
    if cfg.eval_steps * cfg.micro_batch_size > streams.val.num_seqs:
        raise ConfigError(f"eval_steps={cfg.eval_steps} x micro_batch_size={cfg.micro_batch_size} sequences exceed the "
                          f"{streams.val.num_seqs:,} validation sequences of model.block_size={seq_len} (each "
                          f"evaluation would reuse some): set eval_steps <= {streams.val.num_seqs // cfg.micro_batch_size}")
    if plan.hess_batch > streams.train.num_seqs:
        raise ConfigError(f"optim.hess_batch_size={plan.hess_batch} sequences exceed the {streams.train.num_seqs:,} "
                          f"training sequences: lower optim.hess_batch_size")
    return streams


@dataclass
class Progress:
    """Where the run stands: everything a checkpoint needs besides the model and the optimizer."""
    step: int = 0
    train_seqs: int = 0        # sequences the training stream has handed out
    hess_seqs: int = 0         # sequences the Hessian stream has handed out
    elapsed_before: float = 0  # seconds spent before this process started (earlier jobs of a resumed run)
    wandb_run_id: str | None = None


@dataclass
class Run:
    """What the loop's steps share, built once by build_run. Only `progress` and the `since_log` sums change."""
    cfg: DictConfig
    env: Env
    plan: BatchPlan
    out_dir: Path
    streams: Streams
    raw_model: GPT
    model: torch.nn.Module     # raw_model, compiled and/or wrapped in DDP (FSDP shards raw_model itself)
    params: list               # the trainable tensors, each once (the tied embedding/head too)
    optimizer: torch.optim.Optimizer
    progress: Progress
    metrics: "MetricsLog | None"  # rank 0 only
    peak_flops: float             # the device's peak, for MFU
    wandb_run: object = None
    # since the last log line, on the device (read at log steps only, so no per-step sync)
    loss_sum: torch.Tensor = None
    clipped_steps: torch.Tensor = None
    hessian_skipped: torch.Tensor = None  # since the start of this process
    skipped_steps: int = 0
    consecutive_skips: int = 0  # updates skipped in a row (non-finite gradient): the run stops at max_skipped_updates
    lock: object = None         # rank 0: the open lock file of the run directory

    @property
    def ckpt_path(self):
        return checkpoint_path(self.out_dir, self.cfg)


def adopt_pretrained_architecture(cfg, env):
    """init_from=NAME_OR_DIR: the model's shape comes from that GPT-2. Of the model knobs only dropout and
    block_size (up to the pretrained model's positions) stay ours."""
    from transformers import AutoConfig
    try:
        hc = AutoConfig.from_pretrained(cfg.init_from)
    except (OSError, ValueError) as e:
        raise ConfigError(f"init_from={cfg.init_from}: no model found ({type(e).__name__}); give an HF GPT-2 name "
                          f"(gpt2, gpt2-medium, ...: needs the network or the HF cache), a folder written by "
                          f"save_pretrained or scripts/export_hf.py, or init_from=scratch") from None
    if hc.model_type != "gpt2":
        raise ConfigError(f"init_from={cfg.init_from} is a {hc.model_type} model: only GPT-2 models convert to ours "
                          f"(GPT2LMHeadModel); give a GPT-2, or init_from=scratch")
    if cfg.model.block_size > hc.n_positions:
        raise ConfigError(f"model.block_size={cfg.model.block_size} exceeds the {hc.n_positions} positions of "
                          f"init_from={cfg.init_from}: set model.block_size <= {hc.n_positions}")
    pretrained = {"n_layer": hc.n_layer, "n_head": hc.n_head, "n_embd": hc.n_embd, "vocab_size": hc.vocab_size,
                  "bias": True, "scale_attn_by_inverse_layer_idx": hc.scale_attn_by_inverse_layer_idx}
    ignored = [f"model.{k}={cfg.model[k]}" for k, v in pretrained.items() if cfg.model[k] != v]
    if ignored and env.is_master:
        print(f"note: init_from={cfg.init_from} sets the architecture; ignoring {', '.join(ignored)}")
    for key, value in pretrained.items():
        cfg.model[key] = value


def load_pretrained_weights(raw_model, cfg):
    try:
        state = GPT.from_hf(cfg.init_from).state_dict()
    except ValueError as e:  # a GPT-2 variant ours cannot represent exactly
        raise ConfigError(f"init_from={cfg.init_from}: {e}") from None
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:cfg.model.block_size]  # our block size
    raw_model.load_state_dict(state)


def build_run(cfg, env, plan):
    if cfg.init_from != "scratch":
        adopt_pretrained_architecture(cfg, env)  # before the checkpoint's model is compared with ours
    out_dir, lock, ckpt = resolve_out_dir(cfg, env)  # a bad checkpoint is refused before the expensive work
    streams = load_streams(cfg, env, plan)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model_args = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    raw_model = GPT(GPTConfig(**model_args)).to(env.device)
    if cfg.optim.name == "sophiah":
        check_double_backward(raw_model, env.device, env.autocast())
    if ckpt is None and cfg.init_from != "scratch":
        load_pretrained_weights(raw_model, cfg)
    if is_sharded(cfg, env):
        shard_model(raw_model, env)  # before the optimizer: sharding replaces the parameters
    elif cfg.parallel == "fsdp" and env.is_master:
        print("note: parallel=fsdp with one process: the model is not sharded (checkpoints still are, in ckpt.dcp)")
    optimizer = build_optimizer(cfg, raw_model)
    progress = Progress()
    if ckpt is not None:
        ckpt_path = checkpoint_path(out_dir, cfg)
        if cfg.parallel == "fsdp":
            load_sharded(ckpt_path, raw_model, optimizer)
            check_finite(ckpt_path, raw_model.state_dict(), optimizer.state_dict())
        else:
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        progress = Progress(step=ckpt["step"], train_seqs=ckpt["data_state"]["train_seqs"],
                            hess_seqs=ckpt["data_state"]["hess_seqs"], elapsed_before=ckpt.get("elapsed_s", 0.0),
                            wandb_run_id=ckpt.get("wandb_run_id"))
        if env.is_master:
            print(f"resumed from {ckpt_path} at step {progress.step}")
    model = torch.compile(raw_model) if compile_enabled(cfg, env.device) else raw_model
    if env.distributed and cfg.parallel == "ddp":
        model = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)

    run = Run(cfg=cfg, env=env, plan=plan, out_dir=out_dir, streams=streams, raw_model=raw_model, model=model,
              params=[p for p in raw_model.parameters() if p.requires_grad], optimizer=optimizer,
              progress=progress, metrics=None, lock=lock, peak_flops=peak_flops(env.device, env.dtype, cfg.cpu_peak_flops),
              loss_sum=torch.zeros((), device=env.device), clipped_steps=torch.zeros((), device=env.device),
              hessian_skipped=torch.zeros((), device=env.device, dtype=torch.long))
    if env.is_master:
        start_run_dir(run, resumed=ckpt is not None)
    return run


def start_run_dir(run, resumed):
    """Rank 0: config.yaml, metrics.jsonl (trimmed to the checkpoint on resume), W&B, and the run's header."""
    cfg = run.cfg
    run.out_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.merge(cfg, {"run_name": cfg.run_name, "out_dir": str(run.out_dir)})
    (run.out_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved, resolve=True))
    if cfg.wandb.enabled:
        run.wandb_run, run.progress.wandb_run_id = start_wandb(cfg, cfg.run_name, run.out_dir,
                                                               run.progress.wandb_run_id)
    run.metrics = MetricsLog(run.out_dir / "metrics.jsonl", run.progress.step if resumed else None, run.wandb_run)
    env = run.env
    print(f"run {cfg.run_name}: {run.raw_model.num_params() / 1e6:.2f}M parameters, optimizer {cfg.optim.name}, "
          f"{env.world_size} rank(s) x {run.plan.grad_accum} micro-batch(es) of {cfg.micro_batch_size} = "
          f"{tokens_per_step(cfg):,} tokens/step, device {env.device} {env.dtype}")
    print(f"run directory: {run.out_dir}")


def tokens_per_step(cfg):
    return cfg.total_batch_size * cfg.model.block_size


# -----------------------------------------------------------------------------------------------------
# The loop's steps: a training step, the Hessian refresh, evaluation, logging, checkpoints, stopping.

def train_step(run, lr):
    """One optimizer step over the global batch; returns the gradient norm before clipping (0-d, device)."""
    cfg, env, plan, progress = run.cfg, run.env, run.plan, run.progress
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    for micro in range(plan.grad_accum):
        # micro-batch number `chunk` of the global batch: the same sequences and dropout masks whatever the
        # world size, so two ranks compute exactly what one process computes over two micro-steps
        chunk = env.rank * plan.grad_accum + micro
        torch.manual_seed(random_seed(cfg.seed, progress.step, chunk, "dropout"))
        x, y = run.streams.train.batch(progress.train_seqs + chunk * cfg.micro_batch_size, cfg.micro_batch_size,
                                       env.device)
        # DDP all-reduces (FSDP reduce-scatters) the gradients only on the last micro-step
        with gradient_sync(run, last=micro == plan.grad_accum - 1):
            with env.autocast():
                _, loss = run.model(x, y)  # x, y: (micro_batch_size, block_size)
            (loss / plan.grad_accum).backward()
        run.loss_sum += loss.detach() / plan.grad_accum
    grad_norm = clip_gradients(run.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if cfg.grad_clip > 0:
        run.clipped_steps += (grad_norm > cfg.grad_clip).float()
    # the one host sync of a step (on CUDA it waits for the backward to finish, then the step's kernels are
    # launched): a non-finite gradient skips the update instead of poisoning the optimizer state
    if torch.isfinite(grad_norm):
        run.optimizer.step(**({"bs": plan.step_bs} if plan.sophia else {}))
        run.consecutive_skips = 0
    else:
        run.skipped_steps += 1
        run.consecutive_skips += 1
        if env.is_master:
            print(f"step {progress.step}: non-finite gradient norm, update skipped")
        if run.consecutive_skips >= cfg.max_skipped_updates:  # the same on every rank: the norm is all-reduced
            raise RunError(f"step {progress.step}: {run.consecutive_skips} updates in a row skipped for non-finite "
                           f"gradients: the run diverged. The last checkpoint in {run.out_dir} is kept; lower "
                           f"optim.lr (now {cfg.optim.lr}) and resume or start over")
    run.optimizer.zero_grad(set_to_none=True)
    progress.train_seqs += cfg.total_batch_size
    return grad_norm


def refresh_hessian(run):
    """Fill p.grad with the estimator's sample over a fresh Hessian batch, then update Sophia's Hessian EMA."""
    cfg, env, plan, progress = run.cfg, run.env, run.plan, run.progress
    generator = torch.Generator(device=env.device)
    hold = cfg.optim.name == "sophiah" and is_sharded(cfg, env)
    if hold:
        hold_gathered(run.raw_model, True)
        estimates = None  # summed here: FSDP would take the gathered weights' .grad for its own accumulation
    for micro in range(plan.hess_accum):
        chunk = env.rank * plan.hess_accum + micro  # as in the training step: independent of the world size
        generator.manual_seed(random_seed(cfg.seed, progress.step, chunk, "hessian"))  # sampled labels or probes
        x, y = run.streams.hessian.batch(progress.hess_seqs + chunk * plan.hess_micro, plan.hess_micro, env.device)
        if cfg.optim.name == "sophiag":
            with gradient_sync(run, last=micro == plan.hess_accum - 1):
                with env.autocast():
                    logits, _ = run.model(x)  # (B, T, vocab): labels are sampled from these
                sophia.gnb_backward(logits, 1.0 / plan.hess_accum, generator)
        else:
            # Hutchinson needs double backward: the plain module, with the math attention kernel
            with math_attention(), env.autocast():
                _, loss = run.raw_model(x, y)
            # under FSDP the parameters are the gathered weights now, in the order of run.params
            params = list(run.raw_model.parameters()) if hold else run.params
            sophia.hutchinson_backward(loss, params, 1.0 / plan.hess_accum, generator, cfg.optim.probe)
            if hold:
                grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in params]
                estimates = grads if estimates is None else [a + b for a, b in zip(estimates, grads)]
                for q in params:
                    q.grad = None
    if hold:
        hold_gathered(run.raw_model, False)
        shard_estimates(run.params, estimates)
    elif cfg.optim.name == "sophiah" and env.distributed:
        for p in run.params:  # the DDP hooks did not run: average u*(Hu) over ranks by hand
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
    if cfg.optim.name == "sophiag" and cfg.grad_clip > 0:
        clip_gradients(run.params, cfg.grad_clip)  # as the official loop does
    applied = run.optimizer.update_hessian()  # a 0-d bool on the device: False if the estimate was not finite
    run.hessian_skipped.add_(~applied)  # read at the next log step, so no sync here
    run.optimizer.zero_grad(set_to_none=True)
    progress.hess_seqs += plan.hess_batch


@torch.no_grad()
def evaluate(run):
    """Mean loss over eval_steps fixed validation micro-batches, spread over the ranks."""
    cfg, env = run.cfg, run.env
    run.model.eval()
    total = torch.zeros(2, device=env.device)  # (sum of losses, number of micro-batches)
    # FSDP all-gathers in every forward, so every rank runs as many (the extra ones are not counted)
    end = math.ceil(cfg.eval_steps / env.world_size) * env.world_size if is_sharded(cfg, env) else cfg.eval_steps
    for i in range(env.rank, end, env.world_size):
        x, y = run.streams.val.batch(min(i, cfg.eval_steps - 1) * cfg.micro_batch_size, cfg.micro_batch_size,
                                     env.device)
        with env.autocast():
            _, loss = run.raw_model(x, y)  # the plain module: no DDP hooks for a forward-only pass
        if i < cfg.eval_steps:
            total += torch.stack([loss.float(), torch.ones((), device=env.device)])
    if is_sharded(cfg, env):
        run.raw_model.reshard()  # the root keeps its gathered weights after a forward (for a backward): free them
    if env.distributed:
        dist.all_reduce(total)
    run.model.train()
    return (total[0] / total[1]).item()


class Clock:
    """Wall-clock time of the run, the time the training steps alone took since the last log line (evaluation
    left out), and a smoothed time per step for the estimate of the time left."""

    def __init__(self, elapsed_before, step):
        self.start = time.time()
        self.elapsed_before = elapsed_before
        self.last_log, self.step_at_last_log, self.eval_seconds = self.start, step, 0.0
        self.seconds_per_step = None  # exponential moving average over log windows

    def elapsed(self):
        return self.elapsed_before + time.time() - self.start

    def since_log(self, step):
        """(steps, seconds spent training) since the last log line, and start a new window."""
        now = time.time()
        steps, seconds = step - self.step_at_last_log, now - self.last_log - self.eval_seconds
        self.last_log, self.step_at_last_log, self.eval_seconds = now, step, 0.0
        per_step = seconds / steps
        self.seconds_per_step = per_step if self.seconds_per_step is None else \
            0.7 * self.seconds_per_step + 0.3 * per_step
        return steps, seconds

    def time_left(self, steps_left):
        return steps_left * (self.seconds_per_step or 0.0)


def duration(seconds):
    """3725.2 -> '1:02:05'."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def log_eval(run, clock):
    t0 = time.time()
    val_loss = evaluate(run)
    clock.eval_seconds += time.time() - t0
    step = run.progress.step
    if run.env.is_master:
        run.metrics.log({"step": step, "tokens": step * tokens_per_step(run.cfg), "val/loss": val_loss,
                         "time/elapsed_s": clock.elapsed()})
        print(f"step {step}: val loss {val_loss:.4f}")


def log_train(run, clock, lr, grad_norm):
    """The metrics line of a log step: averages since the last one, then the sums start again."""
    cfg, env, step = run.cfg, run.env, run.progress.step
    if env.distributed:
        dist.all_reduce(run.loss_sum, op=dist.ReduceOp.AVG)
    steps, seconds = clock.since_log(step)
    tokens_per_s = steps * tokens_per_step(cfg) / seconds
    record = {"step": step, "tokens": step * tokens_per_step(cfg), "train/loss": run.loss_sum.item() / steps,
              "lr": lr, "grad_norm": grad_norm.item(), "time/elapsed_s": clock.elapsed(),
              "throughput/tokens_per_s": tokens_per_s,
              "mfu": estimate_mfu(tokens_per_s / env.world_size, run.raw_model.flops_per_token(), run.peak_flops)}
    if run.plan.sophia:
        record["optim/clip_rate"] = run.clipped_steps.item() / steps
        # the token embedding (also the head) holds most coordinates of a small model: its own win rate
        parts = {"embedding": [run.raw_model.transformer.wte.weight],
                 "blocks": list(run.raw_model.transformer.h.parameters())}
        record.update({k: float(v) for k, v in run.optimizer.sophia_stats(run.plan.step_bs, parts).items()})
        if run.hessian_skipped.item():
            record["optim/hessian_skipped"] = run.hessian_skipped.item()
            if env.is_master:
                print(f"step {step}: {run.hessian_skipped.item()} non-finite Hessian estimate(s) skipped so far")
    if run.skipped_steps:
        record["skipped_steps"] = run.skipped_steps
    if env.is_master:
        run.metrics.log(record)
        print(f"step {step}/{cfg.max_steps}: loss {record['train/loss']:.4f}, lr {lr:.2e}, "
              f"grad norm {record['grad_norm']:.3f}, {tokens_per_s:,.0f} tokens/s, mfu {100 * record['mfu']:.1f}%, "
              f"{duration(clock.elapsed())} elapsed, {duration(clock.time_left(cfg.max_steps - step))} left")
    run.loss_sum.zero_()
    run.clipped_steps.zero_()


def save(run, clock):
    """Rank 0 writes the checkpoint; every rank waits, so that none runs ahead of a checkpoint in progress.
    A model that is diverging never replaces a good checkpoint."""
    if run.consecutive_skips:
        if run.env.is_master:
            print(f"step {run.progress.step}: checkpoint postponed: the last update was skipped (non-finite gradient)")
        return
    # every rank holds the same weights, so every rank decides the same way without communicating (FSDP's
    # shards: first_non_finite agrees over the ranks)
    bad = first_non_finite(run.raw_model.state_dict().items())
    bad = bad or first_non_finite(optimizer_tensors(run.optimizer.state_dict()))
    if bad:
        raise RunError(f"step {run.progress.step}: {bad} holds NaN/inf: the run diverged. The last checkpoint in "
                       f"{run.out_dir} is kept; lower optim.lr (now {run.cfg.optim.lr}) and resume or start over")
    p = run.progress
    train_state = {"format": CHECKPOINT_FORMAT, "step": p.step,
                   "data_state": {"train_seqs": p.train_seqs, "hess_seqs": p.hess_seqs},
                   "config": OmegaConf.to_container(run.cfg, resolve=True), "run_name": run.cfg.run_name,
                   "wandb_run_id": p.wandb_run_id, "elapsed_s": clock.elapsed(), "torch_version": torch.__version__}
    if run.cfg.parallel == "fsdp":  # every rank writes its shards
        save_sharded(run.ckpt_path, run.raw_model, run.optimizer, train_state, run.env)
    elif run.env.is_master:
        save_checkpoint(run.ckpt_path, {"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
                                        **train_state})
    if run.env.distributed:
        dist.barrier()


class StopSignals:
    """SIGUSR1 (SLURM's preemption notice), SIGTERM (scancel, the time limit) and Ctrl-C ask the run to
    checkpoint at the end of the current step and exit; a second Ctrl-C quits at once."""

    def __init__(self, env):
        self.env, self.received = env, 0
        # the ranks agree on stopping every step; with NCCL that goes through a small gloo group on the CPU,
        # so it never waits for the GPU
        self.group = dist.new_group(backend="gloo") if env.distributed else None
        for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.on_signal)

    def on_signal(self, signum, frame):
        self.received = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl-C interrupts
            if self.env.is_master:
                print("\nCtrl-C: checkpointing at the end of this step (Ctrl-C again to quit without it)", flush=True)

    def agreed(self):
        """Did any rank receive a signal? Every rank gets the same answer at the same step."""
        if not self.env.distributed:
            return self.received
        flag = torch.tensor([self.received])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)


def stop_for_signal(run, clock, signum):
    save(run, clock)
    if run.env.is_master:
        print(f"stop signal received: checkpoint at step {run.progress.step} in {run.ckpt_path}")
        job_id = os.environ.get("SLURM_JOB_ID")
        # SLURM's preemption notice (USR1) puts the job back in the queue, to resume from here;
        # SIGTERM (scancel, or the end of the time limit) only checkpoints: a cancel stays a cancel
        if job_id and signum == signal.SIGUSR1:
            subprocess.run(["scontrol", "requeue", job_id], check=False)
            print(f"requeued SLURM job {job_id}")


def print_sample(run):
    """A few lines of text from the trained model, so that a first run shows what it learned."""
    from data.common import get_gpt2_encoding
    from scripts.sample import sample_text
    text = sample_text(run.raw_model, get_gpt2_encoding(), max_new_tokens=64, seed=run.cfg.seed)[0]
    more = f"python scripts/sample.py out_dir={run.out_dir}"
    if run.cfg.parallel == "fsdp":
        more = f"python {CONVERTER} {run.out_dir}, then {more}"
    if run.env.is_master:
        print(f"a sample (more: {more}):\n{text.strip()}\n")


# -----------------------------------------------------------------------------------------------------

def train(cfg):
    plan = plan_batches(cfg, world_size_from_env())  # before anything expensive
    env = setup_processes(cfg)
    run = build_run(cfg, env, plan)
    stop = StopSignals(env)
    clock = Clock(run.progress.elapsed_before, run.progress.step)
    progress, k = run.progress, cfg.optim.get("hess_interval", 0)

    run.model.train()
    if progress.step == 0:
        log_eval(run, clock)
    compiling, loop_start = compile_enabled(cfg, env.device) and progress.step < cfg.max_steps, time.time()
    if compiling and env.is_master:
        print("compiling the model (torch.compile): the first step includes it...", flush=True)
    while progress.step < cfg.max_steps:
        lr = get_lr(progress.step, cfg, plan.lr_decay_steps)
        grad_norm = train_step(run, lr)
        if compiling and env.is_master:
            print(f"compiled: the first step took {time.time() - loop_start:.1f} s", flush=True)
        compiling = False
        if plan.sophia and progress.step % k == k - 1:
            refresh_hessian(run)
        progress.step += 1
        last = progress.step == cfg.max_steps
        if progress.step % cfg.log_interval == 0 or last:
            log_train(run, clock, lr, grad_norm)
        signum = stop.agreed()  # every rank stops at the same step
        if progress.step % cfg.eval_interval == 0 or last:
            log_eval(run, clock)
        if signum and not last:
            stop_for_signal(run, clock, signum)
            break
        if progress.step % cfg.ckpt_interval == 0 or last:
            save(run, clock)

    if env.is_master and progress.step >= cfg.max_steps:
        print(f"done: metrics in {run.out_dir / 'metrics.jsonl'}, checkpoint in {run.ckpt_path}")
    if progress.step >= cfg.max_steps and (env.is_master or is_sharded(cfg, env)):
        print_sample(run)  # under FSDP every rank takes part in each forward
    if run.wandb_run is not None:
        run.wandb_run.finish()
    if run.lock is not None:
        run.lock.close()  # a sweep's next run in this process may use the folder
    if env.distributed:
        dist.destroy_process_group()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig):
    try:
        train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    config_schema.check_command_line()  # --help; a wrong type or unknown key: one line, exit 2
    main()
