"""
A run built from its configuration: the run directory (locked, with the checkpoint to resume from), the data
streams, the model (from scratch or init_from, sharded or wrapped), the optimizer and its Hessian estimator, and
the state the loop's steps share (Run). train.py's loop reads this; nothing here trains.
"""

import hashlib
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import hellaswag
import lion
import muon
import sophia
from checkpoint import checkpoint_path, open_run_dir, restore
from config_schema import BatchPlan, ConfigError
from data.stream import Streams, load_streams
from distributed import Env, shard_model, wrap_model
from hessian import GaussNewtonBartlett, Hutchinson, build_estimator, check_double_backward
from metrics import MetricsLog, SinceLog, start_wandb, tokens_per_step
from mfu import peak_flops
from model import GPT, GPTConfig

if typing.TYPE_CHECKING:  # wandb is imported only by runs that log to it
    import wandb

REPO_DIR = Path(__file__).resolve().parent


MAX_RUN_NAME = 200


def run_name_of(cfg):
    """The preset name plus the command-line overrides: the same on every rank, no timestamps."""
    if cfg.run_name:
        return str(cfg.run_name)
    preset, overrides = "run", []
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        preset = hydra_cfg.runtime.choices.get("config") or preset
        skipped = ("config=", "out_dir=", "run_name=", "resume=", "device=", "wandb.", "compile=",
                   "log_interval=", "ckpt_interval=", "eval.")
        overrides = [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith(skipped)]
    name = re.sub(r"[^A-Za-z0-9_.=,-]+", "-", "_".join([preset] + overrides))
    if len(name) > MAX_RUN_NAME:  # a folder name has at most 255 bytes: keep a readable head, a hash keeps it unique
        name = f"{name[:MAX_RUN_NAME - 11]}_{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def out_dir_of(cfg):
    """out_dir, a relative one against the working directory; null: <repo>/out/<run_name>."""
    return Path(cfg.out_dir).absolute() if cfg.out_dir else REPO_DIR / "out" / cfg.run_name


def build_optimizer(cfg, model):
    """Every optimizer gets the same parameter groups (weight decay on nn.Linear weights only, model.py), on the
    device of the model's parameters."""
    optim = cfg.optim
    groups = model.configure_optimizer_groups(optim.weight_decay)
    betas = tuple(optim.betas)
    if optim.name == "muon":  # Muon on the decayed group (the blocks' matrices), AdamW on the other
        return muon.MuonAdamW(*muon.param_groups(model, optim.weight_decay), lr=optim.lr,
                              adam_lr=optim.lr if optim.adam_lr is None else optim.adam_lr, momentum=optim.momentum,
                              nesterov=optim.nesterov, ns_steps=optim.ns_steps,
                              ns_dtype=muon.newton_schulz_dtype(str(optim.ns_dtype), next(model.parameters()).device),
                              adjust_lr_fn=str(optim.adjust_lr_fn),
                              betas=betas, eps=optim.eps)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=betas, eps=optim.eps, fused=True)
    if optim.name == "lion":
        return lion.Lion(groups, lr=optim.lr, betas=betas, weight_decay=optim.weight_decay)
    if optim.name == "sophiag":
        return sophia.SophiaG(groups, lr=optim.lr, betas=betas, rho=optim.rho, weight_decay=optim.weight_decay)
    return sophia.SophiaH(groups, lr=optim.lr, betas=betas, rho=optim.rho, weight_decay=optim.weight_decay)


def compile_enabled(cfg, device):
    """compile=auto: compiled on CUDA; on CPU, compiling takes longer than a short run saves."""
    choice = str(cfg.compile).lower()  # the schema types it as a string: true/false arrive as "True"/"False"
    return device.type == "cuda" if choice == "auto" else choice == "true"


@dataclass
class Progress:
    """Where the run stands: everything a checkpoint needs besides the model and the optimizer."""
    step: int = 0
    train_seqs: int = 0        # sequences the training stream has handed out
    hess_seqs: int = 0         # sequences the Hessian stream has handed out
    elapsed_before: float = 0  # seconds spent before this process started (earlier jobs of a resumed run)
    wandb_run_id: str | None = None

    def to_checkpoint(self, elapsed_s):
        """The checkpoint's entries that from_checkpoint reads back. elapsed_s: the run's seconds so far, this
        process's included (it becomes elapsed_before of the process that resumes)."""
        return {"step": self.step, "data_state": {"train_seqs": self.train_seqs, "hess_seqs": self.hess_seqs},
                "wandb_run_id": self.wandb_run_id, "elapsed_s": elapsed_s}

    @classmethod
    def from_checkpoint(cls, ckpt):
        return cls(step=ckpt["step"], train_seqs=ckpt["data_state"]["train_seqs"],
                   hess_seqs=ckpt["data_state"]["hess_seqs"], elapsed_before=ckpt.get("elapsed_s", 0.0),
                   wandb_run_id=ckpt.get("wandb_run_id"))


@dataclass
class Run:
    """What the loop's steps share, built once by build_run. Only `progress`, the `since_log` sums and the skip
    counters change as it trains."""
    cfg: DictConfig
    env: Env
    plan: BatchPlan
    out_dir: Path
    streams: Streams
    raw_model: GPT
    model: torch.nn.Module     # raw_model, compiled and/or wrapped in DDP (FSDP shards raw_model itself)
    params: list               # the trainable tensors, each once (the tied embedding/head too)
    optimizer: torch.optim.Optimizer
    estimator: GaussNewtonBartlett | Hutchinson | None  # Sophia's Hessian estimator, else None
    progress: Progress
    peak_flops: float | None   # the device's peak, for MFU (None: unknown GPU)
    since_log: SinceLog
    hessian_skipped: torch.Tensor     # non-finite Hessian estimates skipped since this process started
    resumed: bool = False
    metrics: MetricsLog | None = None  # rank 0 only
    wandb_run: "wandb.sdk.wandb_run.Run | None" = None  # rank 0, with wandb.enabled
    lock: typing.IO | None = None  # rank 0: the open lock file of the run directory
    hellaswag: list | None = None  # eval.hellaswag's examples, tokenized (hellaswag.Example), scored at each evaluation
    skipped_steps: int = 0
    consecutive_skips: int = 0  # updates skipped in a row (non-finite gradient): the run stops at max_skipped_updates

    @property
    def ckpt_path(self):
        return checkpoint_path(self.out_dir, self.cfg.parallel)


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
    out_dir = out_dir_of(cfg)
    lock, ckpt = open_run_dir(out_dir, cfg, env)  # a bad checkpoint is refused before the expensive work
    streams = load_streams(cfg, env, plan)
    hellaswag_examples = hellaswag.examples_for_run(cfg)  # a bad file is refused here, before the model is built

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model_args = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    raw_model = GPT(GPTConfig(**model_args)).to(env.device)
    if cfg.optim.name == "sophiah":
        check_double_backward(raw_model, env.device, env.autocast())
    if ckpt is None and cfg.init_from != "scratch":
        load_pretrained_weights(raw_model, cfg)
    if env.sharded:
        shard_model(raw_model, env)  # before the optimizer: sharding replaces the parameters
    optimizer = build_optimizer(cfg, raw_model)
    progress = Progress()
    if ckpt is not None:
        restore(ckpt, checkpoint_path(out_dir, cfg.parallel), raw_model, optimizer)
        progress = Progress.from_checkpoint(ckpt)
    model = wrap_model(raw_model, env, compile_enabled(cfg, env.device))
    params = [p for p in raw_model.parameters() if p.requires_grad]
    estimator = build_estimator(cfg, model, raw_model, params, env, plan.hess_micro)
    run = Run(cfg=cfg, env=env, plan=plan, out_dir=out_dir, streams=streams, raw_model=raw_model, model=model,
              params=params, optimizer=optimizer, estimator=estimator, progress=progress, resumed=ckpt is not None,
              lock=lock, hellaswag=hellaswag_examples,
              peak_flops=peak_flops(env.device, env.dtype, cfg.cpu_peak_flops), since_log=SinceLog(env.device),
              hessian_skipped=torch.zeros((), device=env.device, dtype=torch.long))
    if env.is_master:
        start_run_dir(run)
    return run


def start_run_dir(run):
    """Rank 0: config.yaml, metrics.jsonl (trimmed to the checkpoint on resume), W&B, and the run's header."""
    cfg, env = run.cfg, run.env
    run.out_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.merge(cfg, {"run_name": cfg.run_name, "out_dir": str(run.out_dir)})
    (run.out_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved, resolve=True))
    if cfg.wandb.enabled:
        run.wandb_run, run.progress.wandb_run_id = start_wandb(cfg, cfg.run_name, run.out_dir,
                                                               run.progress.wandb_run_id)
    run.metrics = MetricsLog(run.out_dir / "metrics.jsonl", run.progress.step if run.resumed else None, run.wandb_run)
    if run.progress.step >= cfg.max_steps:
        return  # nothing to train: train.py says so in one line
    if run.resumed:
        print(f"resumed from {run.ckpt_path} at step {run.progress.step}")
    optimizer = cfg.optim.name
    if isinstance(run.optimizer, muon.MuonAdamW):  # auto's choice, which the config does not show
        optimizer += f" (Newton-Schulz in {str(run.optimizer.ns_dtype).removeprefix('torch.')})"
    parallel = ""
    if env.distributed:  # which wrapper, over which backend: what a check of the multi-GPU path looks for
        import torch.distributed as dist
        parallel = f", {'fsdp (sharded)' if env.sharded else 'ddp'} over {dist.get_backend()}"
    print(f"run {cfg.run_name}: {run.raw_model.num_params() / 1e6:.2f}M parameters, optimizer {optimizer}, "
          f"{env.world_size} rank(s) x {run.plan.grad_accum} micro-batch(es) of {cfg.micro_batch_size} = "
          f"{tokens_per_step(cfg):,} tokens/step, device {env.device} {env.dtype}{parallel}")
    print(f"run directory: {run.out_dir}")
    if cfg.warmup_steps >= cfg.max_steps:  # a shortened preset (max_steps=100 of a 100-step warmup): say so
        print(f"note: warmup_steps={cfg.warmup_steps} >= max_steps={cfg.max_steps}: the whole run is warmup, the "
              f"learning rate reaches optim.lr at its end and never decays; set warmup_steps lower for a run this short")
    if run.hellaswag is not None:
        print(f"HellaSwag: {len(run.hellaswag):,} examples of {cfg.eval.hellaswag} scored at every evaluation "
              f"(lm-eval's hellaswag: eval/hellaswag_acc, eval/hellaswag_acc_norm)")
