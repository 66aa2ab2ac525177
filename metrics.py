"""
What a run reports: metrics.jsonl (one JSON object per event), the same keys to Weights & Biases, the clock
and the time left, and the progress line printed at every log step.
"""

import collections
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from mfu import estimate_mfu


def read_metrics(out_dir):
    """The events of out_dir/metrics.jsonl, [] while the run has not written it yet."""
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def tokens_per_step(cfg):
    return cfg.total_batch_size * cfg.model.block_size


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
                         resume="allow", dir=str(out_dir), mode=cfg.wandb.mode and str(cfg.wandb.mode),  # plain str
                         group=cfg.wandb.group or cfg.model.name,
                         tags=[cfg.optim.name, cfg.model.name, cfg.data.name] + list(cfg.wandb.tags),
                         config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        return run, run_id
    except Exception as e:
        print(f"warning: W&B could not start ({type(e).__name__}: {e}); logging to metrics.jsonl only")
        return None, run_id


class Clock:
    """Wall-clock time of the run; the time the training steps alone took since the last log line (evaluation
    left out), for the throughput; and the time left, at the pace of the recent steps, start-up left out."""

    RECENT_STEPS = 100  # the pace is that of at least the last this many steps: several Hessian refreshes

    def __init__(self, elapsed_before, step):
        # monotonic: a clock adjustment (NTP, a daylight-saving change) never makes a step take negative time
        self.start = time.monotonic()
        self.elapsed_before = elapsed_before
        self.last_log, self.step_at_last_log, self.eval_seconds = self.start, step, 0.0
        self.startup_steps, self.startup_seconds = 0, 0.0  # in the current log window
        self.windows = collections.deque()  # (steps, seconds) of the recent log windows, start-up left out

    def elapsed(self):
        return self.elapsed_before + time.monotonic() - self.start

    def leave_out(self, seconds):
        """A step that took `seconds` for one-time work (torch.compile, SophiaG's fused kernels, the first Hessian
        refresh, warming the allocator): the throughput counts it, the time left does not extrapolate it."""
        self.startup_steps += 1
        self.startup_seconds += seconds

    def since_log(self, step):
        """(steps, seconds spent training) since the last log line, and start a new window."""
        now = time.monotonic()
        steps, seconds = step - self.step_at_last_log, now - self.last_log - self.eval_seconds
        if steps > self.startup_steps:
            self.windows.append((steps - self.startup_steps, seconds - self.startup_seconds))
            while sum(s for s, _ in self.windows) - self.windows[0][0] >= self.RECENT_STEPS:
                self.windows.popleft()
        self.last_log, self.step_at_last_log, self.eval_seconds = now, step, 0.0
        self.startup_steps, self.startup_seconds = 0, 0.0
        return steps, seconds

    def time_left(self, steps_left):
        """Seconds for steps_left more steps at the recent pace; None before a window without start-up alone."""
        if not self.windows:
            return None
        steps, seconds = (sum(column) for column in zip(*self.windows))
        return steps_left * seconds / steps


def duration(seconds):
    """3725.2 -> '1:02:05'."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def log_train(run, clock, lr, grad_norm):
    """The metrics line of a log step: averages since the last one, then the sums start again."""
    cfg, env, step, since = run.cfg, run.env, run.progress.step, run.since_log
    if env.distributed:
        dist.all_reduce(since.loss_sum, op=dist.ReduceOp.AVG)
    steps, seconds = clock.since_log(step)
    tokens_per_s = steps * tokens_per_step(cfg) / seconds
    mfu = estimate_mfu(tokens_per_s / env.world_size, run.raw_model.flops_per_token(), run.peak_flops)
    record = {"step": step, "tokens": step * tokens_per_step(cfg), "train/loss": since.loss_sum.item() / steps,
              "lr": lr, "grad_norm": grad_norm.item(), "time/elapsed_s": clock.elapsed(),
              "throughput/tokens_per_s": tokens_per_s, "mfu": mfu,
              "optim/clip_rate": since.clipped_steps.item() / steps}
    if env.device.type == "cuda":
        # since the last log line, the most memory held by tensors, and the most the allocator reserved from the
        # GPU (tensors plus its cache and fragmentation): an out-of-memory error comes when the reserved memory
        # cannot grow, so that is what micro_batch_size must fit
        record["memory/peak_mib"] = torch.cuda.max_memory_allocated(env.device) / 2**20
        record["memory/reserved_mib"] = torch.cuda.max_memory_reserved(env.device) / 2**20
        torch.cuda.reset_peak_memory_stats(env.device)
    if run.plan.sophia:
        record.update(sophia_record(run.optimizer, run.raw_model.parts(), run.plan.step_bs, since))
        hessian_skipped = run.hessian_skipped.item()
        if hessian_skipped:
            record["optim/hessian_skipped"] = hessian_skipped
            if env.is_master:
                print(f"step {step}: {hessian_skipped} non-finite Hessian estimate(s) skipped so far")
    if run.skipped_steps:
        record["skipped_steps"] = run.skipped_steps
    if env.is_master:
        run.metrics.log(record)
        # on CPU without cpu_peak_flops the peak is a matmul timed at start-up, not the hardware's: metrics.jsonl
        # keeps mfu against it (a measure of the step's efficiency), the line leaves it out rather than present
        # it as the CPU's utilisation
        matmul_peak = env.device.type == "cpu" and cfg.cpu_peak_flops is None
        mfu_text = "" if matmul_peak else f"mfu {100 * mfu:.1f}%, " if mfu is not None else "mfu n/a, "
        left = clock.time_left(cfg.max_steps - step)
        left_text = f", {duration(left)} left" if left is not None else ""
        print(f"step {step}/{cfg.max_steps}: loss {record['train/loss']:.4f}, lr {lr:.2e}, "
              f"grad norm {record['grad_norm']:.3f}, {tokens_per_s:,.0f} tokens/s, {mfu_text}"
              f"{duration(clock.elapsed())} elapsed{left_text}")
    since.reset()


def sophia_record(optimizer, parts, step_bs, since):
    """Sophia's keys: the win rate (overall and per part: name -> its parameters), the Hessian's norm, and the
    Hessian batch's gradient norm before its clip and how often that clip fired, over the refreshes since the last
    log line (since: the SinceLog). step_bs: the predictions per step, the bs of optimizer.step."""
    record = {k: float(v) for k, v in optimizer.sophia_stats(step_bs, parts).items()}
    if since.refreshes:
        record["optim/hessian_grad_norm"] = since.hessian_grad_norm_sum.item() / since.refreshes
        record["optim/hessian_clip_rate"] = since.hessian_clipped.item() / since.refreshes
    return record


class SinceLog:
    """Sums on the device since the last log line, read only at log steps (so no step waits for the device)."""

    def __init__(self, device):
        self.loss_sum = torch.zeros((), device=device)
        self.clipped_steps = torch.zeros((), device=device)
        self.hessian_grad_norm_sum = torch.zeros((), device=device)
        self.hessian_clipped = torch.zeros((), device=device)
        self.refreshes = 0

    def reset(self):
        for t in (self.loss_sum, self.clipped_steps, self.hessian_grad_norm_sum, self.hessian_clipped):
            t.zero_()
        self.refreshes = 0
