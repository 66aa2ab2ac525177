"""
The configuration's schema: every knob of train.py, its type, its choices and a one-line description.

The values live in configs/ (train.yaml, the groups, the presets); each YAML file names its schema here
in its defaults list (`base_train`, `base_model`, `base_<optimizer>`, `base_data`), so Hydra checks every
value's type, and refuses a value outside a knob's choices, as it composes. A field's `help` is its line in
`python train.py --help` (cli.py), and check_values checks what a type cannot say. To add a knob: a field here,
with its help; its value in YAML.
"""

import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum, StrEnum
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def knob(help):
    """A schema field: its value comes from the YAML files; `help` is its line in `python train.py --help`."""
    return field(default=MISSING, metadata={"help": help})


# The choices of a knob: Hydra refuses any other value as it composes. StrEnum members compare, hash and
# print as their strings (cfg.parallel == "fsdp", f"{cfg.dtype}").

class Dtype(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


class Parallel(StrEnum):
    ddp = "ddp"
    fsdp = "fsdp"


class FsdpGradSync(StrEnum):
    micro_batch = "micro_batch"
    step = "step"


class Probe(StrEnum):
    rademacher = "rademacher"
    gaussian = "gaussian"


class MuonLr(StrEnum):
    match_rms_adamw = "match_rms_adamw"
    original = "original"


class NewtonSchulzDtype(StrEnum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float32 = "float32"


class WandbMode(StrEnum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class ModelConfig:
    name: str = knob("the model's name (W&B group and tag)")
    n_layer: int = knob("transformer blocks")
    n_head: int = knob("attention heads per block")
    n_embd: int = knob("embedding width, a multiple of n_head")
    block_size: int = knob("sequence length in tokens")
    vocab_size: int = knob("vocabulary size (GPT-2's 50257 padded to 50304)")
    dropout: float = knob("dropout probability (0 in the paper)")
    bias: bool = knob("biases in the Linear and LayerNorm layers")
    scale_attn_by_inverse_layer_idx: bool = knob("also divide layer i's attention scores by i + 1 (official runs)")


@dataclass
class OptimConfig:
    """What every optimizer has; each one below adds its own knobs."""
    name: str = knob("the optimizer (choose it with optim=adamw | lion | sophiag | sophiah | muon)")
    lr: float = knob("peak learning rate, reached after warmup_steps")
    betas: list[float] = knob("[beta1, beta2]: the two EMA decay rates, each in [0, 1)")
    weight_decay: float = knob("decoupled weight decay, on nn.Linear weights only (not embeddings, biases, norms)")


@dataclass
class AdamWConfig(OptimConfig):
    eps: float = knob("added to sqrt(v) in AdamW's denominator")


@dataclass
class LionConfig(OptimConfig):
    pass


@dataclass
class SophiaGConfig(OptimConfig):
    rho: float = knob("clipping threshold of the preconditioned step (the paper: 0.03-0.08)")
    hess_interval: int = knob("k: refresh the Hessian EMA every k steps")
    hess_batch_size: int | None = knob("sequences in a Hessian batch; null -> total_batch_size (official)")
    hess_micro_batch_size: int | None = knob("sequences per forward/backward of the Hessian refresh (its memory; the "
                                             "estimate does not depend on it); null -> micro_batch_size")


@dataclass
class SophiaHConfig(SophiaGConfig):
    probe: Probe = knob("Hutchinson's probe vectors u: random signs, or standard normal entries")


@dataclass
class MuonConfig(OptimConfig):
    """Muon on the blocks' weight matrices at lr; AdamW (betas, eps) on the embeddings, LayerNorms and biases."""
    adam_lr: float | None = knob("peak lr of the AdamW part (embeddings, LayerNorms, biases); null -> optim.lr")
    momentum: float = knob("Muon's momentum (EMA of the gradient), in [0, 1)")
    nesterov: bool = knob("Muon orthogonalizes the Nesterov look-ahead (gradient + momentum), not the momentum")
    ns_steps: int = knob("Newton-Schulz iterations that orthogonalize Muon's update")
    adjust_lr_fn: MuonLr = knob("Muon's lr per matrix: match_rms_adamw (update RMS as AdamW's: shares its lr)")
    ns_dtype: NewtonSchulzDtype = knob("dtype of the Newton-Schulz iteration: bfloat16 (torch's Muon), float32, or "
                                       "auto: bfloat16 on CUDA and on CPUs with bf16 matmul instructions (AVX-512 "
                                       "BF16, AMX), float32 on other CPUs, where bf16 is the slow path")
    eps: float = knob("added to sqrt(v) in AdamW's denominator")


OPTIMIZERS = {"adamw": AdamWConfig, "lion": LionConfig, "sophiag": SophiaGConfig, "sophiah": SophiaHConfig,
              "muon": MuonConfig}


@dataclass
class DataConfig:
    name: str = knob("the corpus: data/<name>/prepare.py writes its train.bin and val.bin")
    dir: str | None = knob("where the bins are; null -> <repo>/data/<name>; relative to the repo root")


@dataclass
class WandbConfig:
    enabled: bool = knob("log to Weights & Biases too (metrics.jsonl is always written)")
    project: str = knob("W&B project")
    entity: str | None = knob("W&B entity (user or team); null -> your default one")
    group: str | None = knob("W&B group; null -> the model name, so one size's optimizers sit together")
    tags: list[str] = knob("extra W&B tags (the optimizer, model and data names are always added)")
    mode: WandbMode | None = knob("how W&B logs (offline: to disk only); null -> wandb's own default (WANDB_MODE)")


@dataclass
class EvalConfig:
    hellaswag: str | None = knob("HellaSwag .jsonl (data/hellaswag/prepare.py) scored at every evaluation as lm-eval's "
                                 "hellaswag task (eval/hellaswag_acc, _acc_norm); null: off; relative to the cwd")
    hellaswag_limit: int | None = knob("score only the first N HellaSwag examples (a cheaper signal); null: all")


@dataclass
class TrainConfig:
    out_dir: str | None = knob("run directory; null -> out/<run_name>; may use ${run_name}")
    run_name: str | None = knob("null -> the preset name plus the command-line overrides")
    resume: bool = knob("continue from out_dir's checkpoint (ckpt.pt; ckpt.dcp under parallel=fsdp) when it exists")
    seed: int = knob("seed of the initial weights, the data order, dropout and the Hessian samples")
    init_from: str = knob("scratch | an HF GPT-2 name (gpt2, ...) | a save_pretrained folder: its weights")
    device: str = knob("auto (cuda:LOCAL_RANK when CUDA is there, else cpu) | cpu | cuda | cuda:N")
    dtype: Dtype = knob("auto: bfloat16 autocast on CUDA, float32 on CPU (no float16: it overflows Sophia's Hessian)")
    # a str, not a choice: Hydra reads compile=true as a bool, which no Enum accepts; check_values checks it
    compile: str = knob("auto (compiled on CUDA, eager on CPU) | true | false: torch.compile the model")
    parallel: Parallel = knob("ddp: every rank holds the whole model; fsdp: FSDP2 shards weights, grads, state")
    force_distributed: bool = knob("one process too runs the multi-GPU code path: a process group of one, DDP's "
                                   "wrapper or FSDP's shards (checks that path on one GPU)")
    fsdp_grad_sync: FsdpGradSync = knob("parallel=fsdp: micro_batch reduce-scatters every micro-batch's gradients (each "
                                        "rank holds its fp32 shard); step: on the last one only (fewer collectives, "
                                        "full-size fp32 gradients on every rank)")
    max_steps: int = knob("optimizer steps")
    warmup_steps: int = knob("linear warmup from 0 to optim.lr over this many steps")
    lr_decay_steps: int | None = knob("cosine decay from optim.lr to min_lr over this many steps; null -> max_steps")
    min_lr: float = knob("learning rate at the end of the cosine decay")
    grad_clip: float = knob("clip the global gradient norm at this value; 0 disables")
    max_skipped_updates: int = knob("stop (exit 1) after this many updates in a row skipped for a non-finite gradient")
    total_batch_size: int = knob("sequences per optimizer step, over all ranks and micro-steps (the paper: 480)")
    micro_batch_size: int = knob("sequences per forward/backward on one rank; accumulation is derived")
    eval_interval: int = knob("evaluate every this many steps (and at the end)")
    eval_steps: int = knob("validation micro-batches per evaluation, spread over the ranks")
    log_interval: int = knob("steps between metrics lines")
    ckpt_interval: int = knob("steps between checkpoints (and at the end, and on preemption)")
    cpu_peak_flops: float | None = knob("MFU peak on CPU in FLOP/s; null -> a timed fp32 matmul's (mfu is then "
                                        "relative to it, and left off the progress line)")
    model: ModelConfig = MISSING
    optim: OptimConfig = MISSING
    data: DataConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def register():
    cs = ConfigStore.instance()
    cs.store(name="base_train", node=TrainConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    for name, schema in OPTIMIZERS.items():
        # typed but not struct: a Sophia preset sets optim.rho, and `python train.py optim=adamw` puts AdamW
        # under that preset; unknown_keys() still refuses such a key from the command line, and typos
        node = OmegaConf.structured(schema)
        OmegaConf.set_struct(node, False)
        cs.store(group="optim", name=f"base_{name}", node=node)


register()
# train.yaml's `min_lr: ${mul:${optim.lr},0.1}` keeps the cosine's floor at lr/10 when a sweep changes optim.lr;
# rounded to 12 digits so that config.yaml reads 3e-05, not 2.9999999999999997e-05
OmegaConf.register_new_resolver("mul", lambda a, b: float(f"{a * b:.12g}"), replace=True)


# -----------------------------------------------------------------------------------------------------
# The schema as a table of knobs: key, type, and the field's help.

@dataclass
class Knob:
    key: str     # dotted, e.g. optim.lr
    type: object
    help: str


def knobs(schema, prefix=""):
    """The schema's fields, nested ones flattened, in order."""
    for f in fields(schema):
        if is_dataclass(f.type):
            yield from knobs(f.type, f"{prefix}{f.name}.")
        else:
            yield Knob(f"{prefix}{f.name}", f.type, f.metadata.get("help", ""))


def all_knobs():
    """Every knob by key; the optimizers' shared names have the same type and description."""
    table = {k.key: k for k in knobs(TrainConfig)}
    for schema in OPTIMIZERS.values():
        table.update((k.key, k) for k in knobs(schema, "optim."))
    return table


def type_name(tp):
    """int, float or null, list of float, auto|float32|bfloat16 ... as a user would write it."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return f"{type_name(args[0])} or null"
    if typing.get_origin(tp) is list:
        return f"list of {type_name(args[0])}"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "|".join(member.value for member in tp)
    return tp.__name__


# -----------------------------------------------------------------------------------------------------
# The values' checks: what a type cannot say (a positive lr, a batch that splits over the ranks, ...).

class ConfigError(ValueError):
    """Bad input found before any training (the command line, a YAML file, a value, a path): the message is the
    one line users see, and names the fix. Exit status 2."""


@dataclass(frozen=True)
class BatchPlan:
    """How a step's global batch, and the Hessian batch, split into micro-batches on each rank."""
    grad_accum: int         # training micro-batches per rank per step
    lr_decay_steps: int     # the cosine ends here (optim.lr -> min_lr)
    sophia: bool            # SophiaG/SophiaH: refresh the Hessian every optim.hess_interval steps
    hess_batch: int = 0     # sequences in one global Hessian batch
    hess_accum: int = 0     # Hessian chunks per rank
    hess_chunk: int = 0     # sequences per chunk: each draws its own sampled labels or probes
    hess_micro: int = 0     # sequences per forward/backward of the refresh (divides hess_chunk)
    step_bs: int = 0        # Sophia's step(bs=...): see plan_batches


def plan_batches(cfg, world_size):
    """Split the global batch, and the Hessian batch, over the ranks and micro-steps; check_values refuses a
    configuration whose batches do not split exactly."""
    optim = cfg.optim
    lr_decay_steps = cfg.lr_decay_steps if cfg.lr_decay_steps is not None else cfg.max_steps
    # The global batch is fixed in sequences; each rank runs grad_accum micro-batches of micro_batch_size.
    grad_accum = cfg.total_batch_size // (cfg.micro_batch_size * world_size)
    if optim.name not in ("sophiag", "sophiah"):
        return BatchPlan(grad_accum, lr_decay_steps, sophia=False)
    # The Hessian batch runs in chunks of micro_batch_size, or in one smaller one per rank; each chunk's samples
    # are seeded by its place in the global batch (as the training micro-batches), so the estimate does not
    # depend on the world size, nor on hess_micro_batch_size, which only splits a chunk's forward and backward.
    hess_batch = optim.hess_batch_size or cfg.total_batch_size
    hess_chunk = min(cfg.micro_batch_size, hess_batch // world_size)
    hess_micro = optim.get("hess_micro_batch_size") or hess_chunk
    # GNB's estimate is B·grad² of the mean loss over B predictions: SophiaG takes B as `bs` (official).
    # Hutchinson's u*(Hu) is already the Hessian of the mean loss, so SophiaH's rho is gamma itself (bs=1).
    step_bs = hess_batch * cfg.model.block_size if optim.name == "sophiag" else 1
    return BatchPlan(grad_accum, lr_decay_steps, sophia=True, hess_batch=hess_batch,
                     hess_accum=hess_batch // world_size // max(hess_chunk, 1), hess_chunk=hess_chunk,
                     hess_micro=hess_micro, step_bs=step_bs)


def check_values(cfg, world_size):
    """Raise ConfigError for a value that would fail later: run for every run of a command line before the
    first one starts (cli.check_command_line), and again by train.py under the launched job."""
    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    optim = cfg.optim
    need(optim.name in OPTIMIZERS,
         f"optim.name={optim.name} is unknown: choose optim={' | '.join(OPTIMIZERS)}")
    need(cfg.max_steps >= 1, f"max_steps={cfg.max_steps}: set max_steps to 1 or more")
    for key in ("eval_interval", "eval_steps", "log_interval", "ckpt_interval", "micro_batch_size",
                "total_batch_size"):
        need(cfg[key] >= 1, f"{key}={cfg[key]}: set it to 1 or more")
    plan = plan_batches(cfg, world_size)  # the numbers train.py runs with: what follows checks them
    lr_decay_steps = plan.lr_decay_steps
    need(cfg.warmup_steps >= 0 and lr_decay_steps >= 1,
         f"warmup_steps={cfg.warmup_steps}, lr_decay_steps={lr_decay_steps}: use warmup_steps >= 0, lr_decay_steps >= 1")
    need(cfg.warmup_steps <= cfg.max_steps,
         f"warmup_steps={cfg.warmup_steps} > max_steps={cfg.max_steps}: the learning rate would never reach "
         f"optim.lr; lower warmup_steps (the paper warms up for 2% of the steps)")
    need(lr_decay_steps >= cfg.warmup_steps,
         f"lr_decay_steps={lr_decay_steps} < warmup_steps={cfg.warmup_steps}: the learning rate would drop to "
         f"min_lr right after the warmup; set lr_decay_steps >= warmup_steps (null = max_steps)")
    need(cfg.max_skipped_updates >= 1, f"max_skipped_updates={cfg.max_skipped_updates}: set it to 1 or more")
    model = cfg.model
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        need(model[key] >= 1, f"model.{key}={model[key]}: set it to 1 or more")
    need(model.n_embd % model.n_head == 0,
         f"model.n_embd={model.n_embd} is not a multiple of model.n_head={model.n_head}: each head gets "
         f"n_embd / n_head dimensions; pick n_head dividing n_embd")
    need(0 <= model.dropout < 1, f"model.dropout={model.dropout}: use a value in [0, 1)")
    need(optim.lr > 0, f"optim.lr={optim.lr}: the learning rate must be positive")
    need(0 <= cfg.min_lr <= optim.lr, f"min_lr={cfg.min_lr} must lie in [0, optim.lr={optim.lr}]: set min_lr too, "
                                      f"e.g. min_lr={optim.lr / 10:.3g} (a tenth of optim.lr)")
    need(str(cfg.compile).lower() in ("auto", "true", "false"),
         f"compile={cfg.compile}: use auto (compiled on CUDA), true or false")
    if cfg.eval.hellaswag is not None:
        need(Path(cfg.eval.hellaswag).is_file(),
             f"eval.hellaswag={cfg.eval.hellaswag} is not a file: fetch it with python data/hellaswag/prepare.py "
             f"(-> data/hellaswag/hellaswag_val.jsonl), give the path of hellaswag_val.jsonl, or eval.hellaswag=null")
    need(cfg.eval.hellaswag_limit is None or cfg.eval.hellaswag_limit >= 1,
         f"eval.hellaswag_limit={cfg.eval.hellaswag_limit}: set it to 1 or more, or null for every example")
    for beta in optim.get("betas", []):
        need(0 <= beta < 1, f"optim.betas={list(optim.betas)}: each beta must lie in [0, 1)")

    if optim.name == "muon":
        need(cfg.parallel == "ddp", "optim=muon runs under parallel=ddp only (Muon orthogonalizes whole matrices, "
                                    "which FSDP shards): use parallel=ddp")
        need(0 <= optim.momentum < 1, f"optim.momentum={optim.momentum}: use a value in [0, 1)")
        need(1 <= optim.ns_steps < 100, f"optim.ns_steps={optim.ns_steps}: use 1 to 99 (Muon's usual: 5)")
        need(optim.adam_lr is None or optim.adam_lr > 0, f"optim.adam_lr={optim.adam_lr}: use a positive lr, or null")

    per_step = cfg.micro_batch_size * world_size
    need(plan.grad_accum * per_step == cfg.total_batch_size,
         f"total_batch_size={cfg.total_batch_size} is not a multiple of micro_batch_size={cfg.micro_batch_size} "
         f"x world_size={world_size} = {per_step}: pick a micro_batch_size that divides "
         f"{cfg.total_batch_size / world_size:g} (total_batch_size / world_size), or change total_batch_size")
    if not plan.sophia:
        return
    need(optim.rho > 0, f"optim.rho={optim.rho}: rho must be positive (the paper uses 0.03-0.08)")
    need(optim.hess_interval >= 1, f"optim.hess_interval={optim.hess_interval}: set it to 1 or more")
    need(plan.hess_chunk >= 1 and plan.hess_accum * plan.hess_chunk * world_size == plan.hess_batch,
         f"optim.hess_batch_size={plan.hess_batch} does not split over world_size={world_size} in micro-batches of "
         f"micro_batch_size={cfg.micro_batch_size}: use a multiple of {per_step}, or a multiple of "
         f"{world_size} below {per_step} (the paper's half batch: {cfg.total_batch_size // 2})")
    hess_micro = optim.get("hess_micro_batch_size")
    need(hess_micro is None or (hess_micro >= 1 and plan.hess_chunk % hess_micro == 0),
         f"optim.hess_micro_batch_size={hess_micro} does not divide the {plan.hess_chunk} sequences the Hessian "
         f"refresh draws its samples for at a time (min(micro_batch_size, hess_batch_size / world_size)): use one of "
         f"{', '.join(str(d) for d in range(1, plan.hess_chunk + 1) if plan.hess_chunk % d == 0)}, or null")


# -----------------------------------------------------------------------------------------------------
# The one way to compose a configuration outside train.py (scripts, tests), as train.py composes it.

def compose_config(preset=None, overrides=()):
    """The config `python train.py [config=preset] overrides...` runs with (a DictConfig, interpolations kept)."""
    preset_override = [f"config={preset}"] if preset else []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
        return compose(config_name="train", overrides=[*preset_override, *overrides])
