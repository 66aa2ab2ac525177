"""
Checkpoints and the run directory: atomic single-file checkpoints (parallel=ddp), sharded ones through
torch.distributed.checkpoint (parallel=fsdp), the checks that refuse a damaged, foreign or non-finite checkpoint,
and the lock that keeps a second process out of a run directory.
"""

import errno
import fcntl
import os
import shutil

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor

from config_schema import ConfigError

CHECKPOINT_FORMAT = 1
# parallel=ddp writes one file; parallel=fsdp a torch.distributed.checkpoint directory (a symlink to it, in fact)
CHECKPOINT_NAMES = {"ddp": "ckpt.pt", "fsdp": "ckpt.dcp"}
CONVERTER = "scripts/convert_checkpoint.py"


class RunError(RuntimeError):
    """The run cannot go on (it diverged, the disk is full): the message says what was kept. Exit status 1."""


def checkpoint_path(out_dir, parallel):
    return out_dir / CHECKPOINT_NAMES[parallel]


def find_checkpoint(out_dir):
    """The checkpoint in a run directory, of either format (the single file first), or None."""
    return next((out_dir / name for name in CHECKPOINT_NAMES.values() if (out_dir / name).exists()), None)


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




def open_run_dir(out_dir, cfg, env):
    """Lock the run directory (rank 0) and find the checkpoint to resume from: (lock, ckpt dict or None).
    A checkpoint that cannot be resumed is refused here, before the expensive work."""
    lock = lock_run_dir(out_dir) if env.is_master else None
    ckpt_path = checkpoint_path(out_dir, cfg.parallel)
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
    return lock, ckpt


def restore(ckpt, ckpt_path, raw_model, optimizer):
    """Load a checkpoint's weights and optimizer state (found by open_run_dir) into the built model."""
    if ckpt_path.is_dir():
        load_sharded(ckpt_path, raw_model, optimizer)
        check_finite(ckpt_path, raw_model.state_dict(), optimizer.state_dict())
    else:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])


def save_run(run, elapsed_s):
    """Rank 0 writes the checkpoint (every rank its shards under FSDP); every rank waits, so that none runs ahead
    of a checkpoint in progress. A model that is diverging never replaces a good checkpoint. Returns whether a
    checkpoint was written (False: postponed, because the last update was skipped)."""
    if run.consecutive_skips:
        if run.env.is_master:
            print(f"step {run.progress.step}: checkpoint postponed: the last update was skipped (non-finite gradient)")
        return False
    # every rank holds the same weights, so every rank decides the same way without communicating (FSDP's
    # shards: first_non_finite agrees over the ranks)
    bad = first_non_finite(run.raw_model.state_dict().items())
    bad = bad or first_non_finite(optimizer_tensors(run.optimizer.state_dict()))
    if bad:
        raise RunError(f"step {run.progress.step}: {bad} holds NaN/inf: the run diverged. The last checkpoint in "
                       f"{run.out_dir} is kept; lower optim.lr (now {run.cfg.optim.lr}) and resume or start over")
    train_state = {"format": CHECKPOINT_FORMAT, **run.progress.to_checkpoint(elapsed_s),
                   "config": OmegaConf.to_container(run.cfg, resolve=True, enum_to_str=True), "run_name": run.cfg.run_name,
                   "torch_version": torch.__version__}
    if run.cfg.parallel == "fsdp":  # every rank writes its shards
        save_sharded(run.ckpt_path, run.raw_model, run.optimizer, train_state, run.env)
    elif run.env.is_master:
        save_checkpoint(run.ckpt_path, {"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
                                        **train_state})
    if run.env.distributed:
        dist.barrier()
    return True
