"""
Processes and parallelism: the process group under torchrun, the device and precision (Env), DDP and FSDP2
wrapping, the gradient clip that works on shards, averaging Hessian estimates over ranks in one collective, and
the stop signals every rank agrees on.
"""

import os
import signal
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from config_schema import ConfigError


@dataclass(frozen=True)
class Env:
    """This process: its rank among world_size, its device, the precision it computes in, whether it is in a
    process group (several processes, or one with force_distributed=true), and whether the model is sharded
    (parallel=fsdp in a process group)."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dtype: str             # "float32" or "bfloat16" (autocast)
    sharded: bool = False
    one_rank_group: bool = False  # force_distributed=true with one process: DDP/FSDP on a process group of one
    defer_grad_sync: bool = False  # FSDP: reduce-scatter on the last micro-batch only (fsdp_grad_sync=step)

    @property
    def distributed(self):
        return self.world_size > 1 or self.one_rank_group

    @property
    def is_master(self):
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.dtype == "bfloat16" else nullcontext()


def world_size_from_env():
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(name, local_rank, world_size):
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available: use device=auto or device=cpu")
    if device.type == "cuda" and (world_size > 1 or device.index is None):
        device = torch.device(f"cuda:{local_rank}")  # set_device needs an index
    return device


def native_bf16(device):
    """bf16 matmuls in hardware: compute capability 8.0 and up (Ampere on). torch.cuda.is_bf16_supported() is
    True on older GPUs too (V100, T4), where bf16 is emulated: slow, and inductor leaves such frames uncompiled."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def pick_dtype(name, device):
    """(dtype, note): auto is bfloat16 on a GPU with native bf16, else float32 (the note says why on a GPU
    without); an explicit bfloat16 on a GPU without native bf16 is refused. On CPU, as asked."""
    if device.type != "cuda":
        return ("float32" if name == "auto" else str(name)), None
    if native_bf16(device):
        return ("bfloat16" if name == "auto" else str(name)), None
    major, minor = torch.cuda.get_device_capability(device)
    gpu = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    if name == "bfloat16":
        raise ConfigError(f"dtype=bfloat16: {gpu} has no native bf16 (it needs compute capability 8.0+, Ampere "
                          f"or newer; emulated bf16 is slow and not compiled): use dtype=auto or dtype=float32")
    note = f"note: {gpu} has no native bf16 (compute capability 8.0+): dtype=auto trains in float32" \
        if name == "auto" else None
    return ("float32" if name == "auto" else str(name)), note


def setup_processes(cfg):
    """Pick the device and precision, and join the process group under torchrun (or force_distributed=true)."""
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    world_size = world_size_from_env()
    device = pick_device(cfg.device, local_rank, world_size)
    dtype, note = pick_dtype(cfg.dtype, device)  # before anything else: a refusal is one line
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # TF32 for any fp32 matmul left outside autocast. (Not via torch.backends: submitit's cloudpickle
        # cannot pickle a function that touches it, which breaks Hydra sweeps on SLURM.)
        torch.set_float32_matmul_precision("high")
    if note and rank == 0:
        print(note)
    if dtype == "bfloat16" and device.type == "cpu" and rank == 0:
        print("note: bfloat16 autocast on CPU is much slower than float32 on most CPUs")
    one_rank_group = world_size == 1 and cfg.force_distributed
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world_size > 1 or (one_rank_group and "MASTER_ADDR" in os.environ):  # torchrun's rendezvous
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    elif one_rank_group:  # plain `python train.py`: a group of one needs no rendezvous, only a store
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(minutes=30))
    sharded = cfg.parallel == "fsdp" and (world_size > 1 or one_rank_group)
    if cfg.parallel == "fsdp" and not sharded and rank == 0:
        print("note: parallel=fsdp with one process: the model is not sharded (checkpoints still are, in ckpt.dcp; "
              "force_distributed=true shards it over a group of one)")
    return Env(rank, local_rank, world_size, device, dtype, sharded, one_rank_group=one_rank_group,
               defer_grad_sync=cfg.fsdp_grad_sync == "step")


# -----------------------------------------------------------------------------------------------------
# parallel=fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) shards weights, gradients and optimizer state.

def shard_model(model, env):
    """Each transformer block is one FSDP unit (its weights all-gathered just before its forward and backward,
    freed after); the root holds the rest, the tied embedding/head weight included, so its two uses share one
    unit. Parameters become DTensors; each rank keeps a 1/world_size slice.

    With dtype=bfloat16 the gathered copies are bf16 (torchtitan's policy, and the arithmetic of the official
    1.5B run, whose framework computes with bf16 copies of fp32 weights): the all-gathers move half the bytes,
    and the gathered unit takes half the memory. The sharded master weights, the optimizer state and the
    gradient reductions stay fp32. This is not DDP's arithmetic (fp32 weights under autocast, where LayerNorm
    and the embedding run in fp32): parallel=fsdp equals parallel=ddp in float32 only."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy()  # fp32 throughout
    if env.dtype == "bfloat16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def wrap_model(raw_model, env, compile_model):
    """The module the training step calls: compiled and/or wrapped in DDP (FSDP shards raw_model itself)."""
    model = torch.compile(raw_model) if compile_model else raw_model
    if env.distributed and not env.sharded:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    return model


def gradient_sync(model, raw_model, env, last):
    """DDP all-reduces the gradients on the last micro-batch only. FSDP reduce-scatters (averaging) every
    micro-batch's gradients, so that each rank only ever holds its fp32 gradient shard plus one unit's unsharded
    gradient: deferring the sync (env.defer_grad_sync, fsdp_grad_sync=step) saves collectives but accumulates
    full-size fp32 gradients on every rank, 4 bytes a parameter. Returns the context to run the backward in."""
    if env.sharded:
        raw_model.set_requires_gradient_sync(last or not env.defer_grad_sync)
        return nullcontext()
    return model.no_sync() if env.distributed and not last else nullcontext()


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


def average_over_ranks(tensors):
    """Average same-shape tensors over the ranks in place, in one all-reduce of one flat buffer."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.AVG)
    for t, piece in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(piece.view_as(t))


def row_chunks(tensor, world_size):
    """The dim-0 slices FSDP2 gives each rank (torch.chunk's split; ranks past the last chunk hold none)."""
    chunks = list(torch.chunk(tensor, world_size, dim=0))
    return chunks + [tensor[:0]] * (world_size - len(chunks))


def shard_estimates(params, estimates, env):
    """FSDP: average the ranks' full-size Hutchinson estimates and give each rank its slice, as the sharded .grad
    that update_hessian reads, in one reduce-scatter: rank r's bucket holds slice r of every estimate."""
    buckets = [torch.cat([row_chunks(e.to(p.dtype), env.world_size)[r].reshape(-1)
                          for p, e in zip(params, estimates)]) for r in range(env.world_size)]
    length = max(b.numel() for b in buckets)
    send = torch.cat([torch.nn.functional.pad(b, (0, length - b.numel())) for b in buckets])  # (world * length,)
    mine = torch.empty(length, dtype=send.dtype, device=send.device)
    dist.reduce_scatter_single(mine, send, op=dist.ReduceOp.AVG)
    local_shapes = [p.to_local().shape for p in params]
    pieces = mine[:sum(s.numel() for s in local_shapes)].split([s.numel() for s in local_shapes])
    for p, piece, shape in zip(params, pieces, local_shapes):
        p.grad = DTensor.from_local(piece.view(shape), p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                    run_check=False)


# -----------------------------------------------------------------------------------------------------
# Stop signals: SLURM's preemption notice, scancel, Ctrl-C.

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
