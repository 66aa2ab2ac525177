"""
Train a GPT-2 with Sophia, AdamW or Lion, on one process or under torchrun, configured by Hydra.

    python train.py                                        # the embedded default: tiny GPT, Shakespeare, CPU
    python train.py config=shakespeare_adamw               # the same run with AdamW
    torchrun --standalone --nproc_per_node=8 train.py config=gpt2_small_sophiag
    torchrun --standalone --nproc_per_node=8 train.py config=gpt2_xl_sophiag   # 1.5B, sharded (parallel=fsdp)
    python train.py config=gpt2_small_adamw optim.lr=3e-4 max_steps=2000 wandb.enabled=true
    python train.py config=gpt2_small_sophiag data=fineweb_edu eval.hellaswag=data/hellaswag/hellaswag_val.jsonl

Every optimizer goes through this one loop, with one data order and one model, so that their curves can
be compared. Randomness is a function of (seed, step, rank): the data order, the dropout masks and the
Hessian estimator's samples, so a resumed run continues exactly as if it had never stopped.

The data flows: config (config_schema.py: checked, and its batch plan) -> run (build.py: run directory,
data, model, optimizer) -> the loop (train, here) -> checkpoints (checkpoint.py) and metrics (metrics.py).
"""

import math
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings

import hydra
import numpy as np
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import cli
import hellaswag
from build import build_run, compile_enabled, run_name_of
from checkpoint import CONVERTER, RunError, save_run
from config_schema import ConfigError, check_values, plan_batches  # its import registers the schema, before @hydra.main composes
from data.common import GPT2_VOCAB_SIZE, tokenizer_for
from data.stream import data_dir_of
from distributed import StopSignals, clip_gradients, gradient_sync, setup_processes, world_size_from_env
from metrics import Clock, log_train, tokens_per_step

# DCP without a process group (parallel=fsdp on one process) warns that it assumes one process: it does
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def refuse_a_gpu_run_without_a_gpu(cfg):
    """A gpt2_* model with device=auto and no GPU visible (a SLURM job without --gpus-per-node, a CPU-only torch)
    would train on the CPU for months: refuse it, unless device=cpu says that is meant."""
    if str(cfg.model.name).startswith("gpt2") and cfg.device == "auto" and not torch.cuda.is_available():
        raise ConfigError(f"model={cfg.model.name} is a GPU run and no CUDA GPU is visible (torch.cuda.is_available() "
                          f"is False: a job without --gpus-per-node, or a CPU-only torch); add device=cpu to train it "
                          f"on the CPU anyway")


def random_seed(seed, step, chunk, purpose):
    """The seed for one micro-batch's randomness: a pure function, so resume needs no RNG state."""
    entropy = [seed, step, chunk, {"dropout": 1, "hessian": 2, "hessian_dropout": 3}[purpose]]
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
# The loop's steps: a training step, the Hessian refresh, evaluation.

def train_step(run, lr):
    """One optimizer step over the global batch; returns the gradient norm before clipping (0-d, device)."""
    cfg, env, plan, progress = run.cfg, run.env, run.plan, run.progress
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # a group may run at its own multiple of the schedule
    for micro in range(plan.grad_accum):
        # micro-batch number `chunk` of the global batch: the same sequences and dropout masks whatever the
        # world size, so two ranks compute exactly what one process computes over two micro-steps
        chunk = env.rank * plan.grad_accum + micro
        torch.manual_seed(random_seed(cfg.seed, progress.step, chunk, "dropout"))
        x, y = run.streams.train.batch(progress.train_seqs + chunk * cfg.micro_batch_size, cfg.micro_batch_size,
                                       env.device)
        # DDP all-reduces (FSDP reduce-scatters) the gradients only on the last micro-step
        with gradient_sync(run.model, run.raw_model, env, last=micro == plan.grad_accum - 1):
            with env.autocast():
                _, loss = run.model(x, y)  # x, y: (micro_batch_size, block_size)
            (loss / plan.grad_accum).backward()
        run.since_log.loss_sum += loss.detach() / plan.grad_accum
    grad_norm = clip_gradients(run.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if cfg.grad_clip > 0:
        run.since_log.clipped_steps += (grad_norm > cfg.grad_clip).float()
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
    cfg, env, plan, progress, since = run.cfg, run.env, run.plan, run.progress, run.since_log
    generator = torch.Generator(device=env.device)
    run.estimator.begin()
    for i in range(plan.hess_accum):  # this rank's chunks; the estimator runs each in micro-batches of hess_micro
        chunk = env.rank * plan.hess_accum + i  # as in the training step: independent of the world size
        generator.manual_seed(random_seed(cfg.seed, progress.step, chunk, "hessian"))  # sampled labels or probes
        torch.manual_seed(random_seed(cfg.seed, progress.step, chunk, "hessian_dropout"))  # the forward's dropout
        x, y = run.streams.hessian.batch(progress.hess_seqs + chunk * plan.hess_chunk, plan.hess_chunk, env.device)
        run.estimator.add(x, y, 1.0 / plan.hess_accum, generator, last=i == plan.hess_accum - 1)
    grad_norm = run.estimator.finish()  # GNB: the Hessian batch's gradient norm before its clip
    if grad_norm is not None:
        since.hessian_grad_norm_sum += grad_norm
        if cfg.grad_clip > 0:
            since.hessian_clipped += (grad_norm > cfg.grad_clip).float()
    since.refreshes += 1
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
    end = math.ceil(cfg.eval_steps / env.world_size) * env.world_size if env.sharded else cfg.eval_steps
    for i in range(env.rank, end, env.world_size):
        x, y = run.streams.val.batch(min(i, cfg.eval_steps - 1) * cfg.micro_batch_size, cfg.micro_batch_size,
                                     env.device)
        with env.autocast():
            _, loss = run.raw_model(x, y)  # the plain module: no DDP hooks for a forward-only pass
        if i < cfg.eval_steps:
            total += torch.stack([loss.float(), torch.ones((), device=env.device)])
    if env.sharded:
        run.raw_model.reshard()  # the root keeps its gathered weights after a forward (for a backward): free them
    if env.distributed:
        dist.all_reduce(total)
    run.model.train()
    return (total[0] / total[1]).item()


def log_eval(run, clock):
    t0 = time.monotonic()
    val_loss = evaluate(run)
    scores = {}
    if run.hellaswag is not None:  # a forward holds at most a training micro-batch's tokens
        scores = hellaswag.evaluate(run.raw_model, run.hellaswag, run.env, run.cfg.model.block_size,
                                    min(GPT2_VOCAB_SIZE, run.cfg.model.vocab_size),
                                    run.cfg.micro_batch_size * run.cfg.model.block_size)
    clock.eval_seconds += time.monotonic() - t0
    step = run.progress.step
    if run.env.is_master:
        run.metrics.log({"step": step, "tokens": step * tokens_per_step(run.cfg), "val/loss": val_loss, **scores,
                         "time/elapsed_s": clock.elapsed()})
        more = "".join(f", {key.removeprefix('eval/')} {value:.4f}" for key, value in scores.items())
        print(f"step {step}: val loss {val_loss:.4f}{more}")


# -----------------------------------------------------------------------------------------------------
# Stopping: a signal, the end of the run.

def stop_for_signal(run, clock, signum):
    """Checkpoint and say where; on SLURM's preemption notice, requeue the job. Returns the exit status."""
    saved = save_run(run, clock.elapsed())
    if run.env.is_master:
        job_id = os.environ.get("SLURM_JOB_ID")
        # SLURM's preemption notice (USR1) puts the job back in the queue, to resume from here;
        # SIGTERM (scancel, or the end of the time limit) only checkpoints: a cancel stays a cancel
        requeue = job_id and signum == signal.SIGUSR1 and saved
        resume = "" if requeue else f"; to resume: {resume_command()}"
        if saved:
            print(f"stop signal received: checkpoint at step {run.progress.step} in {run.ckpt_path}{resume}")
        else:
            print(f"stop signal received: no checkpoint at step {run.progress.step} (the last update was skipped); "
                  f"the last good one in {run.ckpt_path} is kept{resume}")
        if requeue:
            subprocess.run(["scontrol", "requeue", job_id], check=False)
            print(f"requeued SLURM job {job_id}")
    # the shell's convention for a process stopped by a signal (Ctrl-C: 130), so `train.py && next` stops here;
    # a requeued job ends normally
    return 0 if signum == signal.SIGUSR1 else 128 + signum


def resume_command():
    """The command that continues this run: train.py with the same overrides, as a run continues from out_dir's
    checkpoint by itself (resume=true, the default)."""
    if not HydraConfig.initialized():  # train() called from Python, not from the command line
        return "the same command"
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
    command = shlex.join([os.path.relpath(__file__), *overrides])
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's: its options are not ours to know
        return f"the same torchrun command (torchrun ... {command})"
    return f"python {command}"


def print_sample(run):
    """A few lines of text from the trained model, so that a first run shows what it learned."""
    tokenizer = tokenizer_for(data_dir_of(run.cfg))  # the data's: GPT-2 BPE or characters
    generator = torch.Generator(device=run.env.device).manual_seed(run.cfg.seed)
    prompt = torch.tensor([tokenizer.start_ids], device=run.env.device)  # (1, T): the start of a text
    run.raw_model.eval()
    ids = run.raw_model.generate(prompt, 64, temperature=0.8, top_k=200, generator=generator,
                                 vocab_size=tokenizer.vocab_size)
    more = f"python scripts/sample.py out_dir={run.out_dir}"
    if run.cfg.parallel == "fsdp":
        more = f"python {CONVERTER} {run.out_dir}, then {more}"
    if run.env.is_master:
        print(f"a sample (more: {more}):\n{tokenizer.decode(ids[0, prompt.shape[1]:].tolist()).strip()}\n")


def already_finished(run):
    if run.env.is_master:
        print(f"{run.out_dir} already finished: step {run.progress.step} of max_steps={run.cfg.max_steps}, nothing to "
              f"do. To train longer, run with a larger max_steps (a new run: its own folder and schedule), or continue "
              f"this folder with out_dir={run.out_dir} max_steps=N (its cosine then stretches to N steps: the learning "
              f"rate rises again). Sample it: python scripts/sample.py out_dir={run.out_dir}")


# -----------------------------------------------------------------------------------------------------

def train(cfg):
    """Returns the exit status: 0 when the run finished or was requeued, 128 + signal when a signal stopped it."""
    check_values(cfg, world_size_from_env())  # before anything expensive
    plan = plan_batches(cfg, world_size_from_env())
    refuse_a_gpu_run_without_a_gpu(cfg)
    cfg.run_name = run_name_of(cfg)
    env = setup_processes(cfg)
    run = build_run(cfg, env, plan)
    stop = StopSignals(env)
    clock = Clock(run.progress.elapsed_before, run.progress.step)
    progress, k, status = run.progress, cfg.optim.get("hess_interval", 0), 0
    if progress.step >= cfg.max_steps:
        already_finished(run)

    run.model.train()
    if progress.step == 0:
        log_eval(run, clock)
    compiling, loop_start = compile_enabled(cfg, env.device) and progress.step < cfg.max_steps, time.monotonic()
    if compiling and env.is_master:
        print("compiling the model (torch.compile): the first step includes it...", flush=True)
    # this process's first step and its first Hessian refresh compile (torch.compile, Sophia's fused kernels) and
    # warm up: the estimate of the time left leaves them out
    startup_steps = {progress.step, progress.step + (k - 1 - progress.step % k) if plan.sophia else progress.step}
    while progress.step < cfg.max_steps:
        lr = get_lr(progress.step, cfg, plan.lr_decay_steps)
        step_start = time.monotonic()
        grad_norm = train_step(run, lr)
        if compiling and env.is_master:
            print(f"compiled: the first step took {time.monotonic() - loop_start:.1f} s", flush=True)
        compiling = False
        if plan.sophia and progress.step % k == k - 1:
            refresh_hessian(run)
        if progress.step in startup_steps:
            clock.leave_out(time.monotonic() - step_start)
        progress.step += 1
        last = progress.step == cfg.max_steps
        if progress.step % cfg.log_interval == 0 or last:
            log_train(run, clock, lr, grad_norm)
        signum = stop.agreed()  # every rank stops at the same step
        if progress.step % cfg.eval_interval == 0 or last:
            log_eval(run, clock)
        if signum and not last:
            status = stop_for_signal(run, clock, signum)
            break
        if progress.step % cfg.ckpt_interval == 0 or last:
            save_run(run, clock.elapsed())
        if last:
            if env.is_master:
                print(f"done: metrics in {run.out_dir / 'metrics.jsonl'}, checkpoint in {run.ckpt_path}")
            if env.is_master or env.sharded:
                print_sample(run)  # under FSDP every rank takes part in each forward

    if run.wandb_run is not None:
        run.wandb_run.finish()
    if run.lock is not None:
        run.lock.close()  # a sweep's next run in this process may use the folder
    if env.distributed:
        dist.destroy_process_group()
    return status


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig):
    try:
        cli.check_composed(cfg, HydraConfig.get().overrides.task)
        status = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    # --help; a wrong type, an unknown key or a bad value in any run asked for (each point of a -m sweep,
    # before the first starts): one line, exit 2
    cli.check_command_line()
    cli.run_main(main)
