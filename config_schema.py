"""
The configuration's schema: every knob of train.py, its type, its choices and a one-line description.

The values live in configs/ (train.yaml, the groups, the presets); each YAML file names its schema here
in its defaults list (`base_train`, `base_model`, `base_<optimizer>`, `base_data`), so Hydra checks every
value's type, and refuses a value outside a knob's choices, as it composes. A field's `help` is its line in
`python train.py --help`. check_command_line() composes every run a command line asks for (each point of a
`-m` sweep too) and checks its values (check_values) before any of them starts: a mistake is one line and
exit status 2. To add a knob: a field here, with its help; its value in YAML.
"""

import argparse
import difflib
import itertools
import os
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum, StrEnum
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

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
    cpu_peak_flops: float | None = knob("MFU peak on CPU in FLOP/s; null -> measured once by timing fp32 matmuls")
    model: ModelConfig = MISSING
    optim: OptimConfig = MISSING
    data: DataConfig = MISSING
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
# a preset's `min_lr: ${mul:${optim.lr},0.1}` keeps the cosine's floor at lr/10 when a sweep changes optim.lr;
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


def check_values(cfg, world_size):
    """Raise ConfigError for a value that would fail later: run for every run of a command line before the
    first one starts (check_command_line), and again by train.py's plan_batches under the launched job."""
    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    optim = cfg.optim
    need(optim.name in OPTIMIZERS,
         f"optim.name={optim.name} is unknown: choose optim={' | '.join(OPTIMIZERS)}")
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
    for key in ("eval_interval", "eval_steps", "log_interval", "ckpt_interval", "micro_batch_size",
                "total_batch_size"):
        need(cfg[key] >= 1, f"{key}={cfg[key]}: set it to 1 or more")
    for beta in optim.get("betas", []):
        need(0 <= beta < 1, f"optim.betas={list(optim.betas)}: each beta must lie in [0, 1)")

    if optim.name == "muon":
        need(cfg.parallel == "ddp", "optim=muon runs under parallel=ddp only (Muon orthogonalizes whole matrices, "
                                    "which FSDP shards): use parallel=ddp")
        need(0 <= optim.momentum < 1, f"optim.momentum={optim.momentum}: use a value in [0, 1)")
        need(1 <= optim.ns_steps < 100, f"optim.ns_steps={optim.ns_steps}: use 1 to 99 (Muon's usual: 5)")
        need(optim.adam_lr is None or optim.adam_lr > 0, f"optim.adam_lr={optim.adam_lr}: use a positive lr, or null")

    # The global batch is fixed in sequences; each rank runs grad_accum micro-batches of micro_batch_size.
    per_step = cfg.micro_batch_size * world_size
    need(cfg.total_batch_size % per_step == 0,
         f"total_batch_size={cfg.total_batch_size} is not a multiple of micro_batch_size={cfg.micro_batch_size} "
         f"x world_size={world_size} = {per_step}: pick a micro_batch_size that divides "
         f"{cfg.total_batch_size / world_size:g} (total_batch_size / world_size), or change total_batch_size")
    if optim.name not in ("sophiag", "sophiah"):
        return
    need(optim.rho > 0, f"optim.rho={optim.rho}: rho must be positive (the paper uses 0.03-0.08)")
    need(optim.hess_interval >= 1, f"optim.hess_interval={optim.hess_interval}: set it to 1 or more")
    # the Hessian batch runs in chunks of micro_batch_size, or in one smaller one per rank (plan_batches)
    hess_batch = optim.hess_batch_size or cfg.total_batch_size
    hess_per_rank = hess_batch // world_size
    hess_chunk = min(cfg.micro_batch_size, hess_per_rank)
    need(hess_batch % world_size == 0 and hess_chunk >= 1 and hess_per_rank % hess_chunk == 0,
         f"optim.hess_batch_size={hess_batch} does not split over world_size={world_size} in micro-batches of "
         f"micro_batch_size={cfg.micro_batch_size}: use a multiple of {per_step}, or a multiple of "
         f"{world_size} below {per_step} (the paper's half batch: {cfg.total_batch_size // 2})")
    hess_micro = optim.get("hess_micro_batch_size")
    need(hess_micro is None or (hess_micro >= 1 and hess_chunk % hess_micro == 0),
         f"optim.hess_micro_batch_size={hess_micro} does not divide the {hess_chunk} sequences the Hessian refresh "
         f"draws its samples for at a time (min(micro_batch_size, hess_batch_size / world_size)): use one of "
         f"{', '.join(str(d) for d in range(1, hess_chunk + 1) if hess_chunk % d == 0)}, or null")


# -----------------------------------------------------------------------------------------------------
# Command-line checks: compose as Hydra will, before Hydra, so that a mistake is one line and exit code 2
# (Hydra prints several lines and exits 1), and before torchrun's ranks or a sweep's jobs start.

def parse_command_line(argv):
    """(--help, --multirun, overrides), or None for a command line with any other of Hydra's flags."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("-m", "--multirun", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args, others = parser.parse_known_args(argv)
    return None if others else args


def check_command_line(argv=None):
    """Print --help and exit, or check the configuration of every run the command line asks for: a mistake
    exits with one line `error: ...` and code 2; else return, and Hydra goes on as usual."""
    args = parse_command_line(sys.argv[1:] if argv is None else argv)
    if args is None:
        return  # Hydra's own flags (--hydra-help, --cfg, --config-dir, ...): Hydra's business, checked by Hydra
    overrides = [o for o in args.overrides if not re.match(r"[+~]*hydra[./=]", o)]  # Hydra's own settings
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; a sweep's points run one process each
    try:
        if args.help:
            print(help_text(overrides))
            sys.exit(0)
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
            for point in (sweep_points(overrides) if args.multirun else [overrides]):
                check_values(compose_checked(point), world_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def sweep_points(overrides):
    """Every job of a `-m` sweep, as the basic sweeper splits it: the product of the swept values."""
    try:
        parsed = OverridesParser.create(GlobalHydra.instance().config_loader()).parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(one_line(e)) from None
    if any(o.is_sweep_override() and not o.is_discrete_sweep() for o in parsed):
        return []  # range/interval sweeps belong to another sweeper: Hydra checks them alone
    choices = {}  # as BasicSweeper.split_arguments: a later override of a key replaces an earlier one
    for o in parsed:
        key = o.get_key_element()
        values = o.sweep_string_iterator() if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices[key] = [f"{key}={v}" for v in values]
    return [list(point) for point in itertools.product(*choices.values())]


def compose_checked(overrides):
    """The composed config of one run; ConfigError for a wrong type, a missing value or an unknown key."""
    try:
        cfg = compose(config_name="train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(describe(e, given_values(overrides))) from None
    problem = missing_values(cfg) or next(unknown_keys(cfg, given_values(overrides)), None)
    if problem:
        raise ConfigError(problem)
    return cfg


def given_values(overrides):
    """key -> the override as typed, e.g. 'optim.lr' -> 'optim.lr=abc' (the last one of a key wins, as in Hydra)."""
    given = {}
    for o in overrides:
        key, _, _ = o.partition("=")
        given[key.lstrip("+~").split("@")[0]] = o
    return given


def describe(e, given):
    """One line for a composition error: the key, the value, and what the schema expects."""
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, name = e.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(name, [o for o in e.options or [] if not o.startswith("base_")], n=1)
        hint = f"did you mean {group}={close[0]}?" if close else "python train.py --help lists them"
        return f"{group}={name}: no such option in configs/{group}/; {hint}"
    inner = e if isinstance(e, OmegaConfBaseException) else (e.__cause__ or e.__context__)
    key = getattr(inner, "full_key", None) if isinstance(inner, OmegaConfBaseException) else None
    if not key:
        return one_line(e)
    key = key.split("[")[0]  # optim.betas[1] -> optim.betas
    # what only the message says: the YAML file that held the bad value ("In 'config/NAME': ..."), or the
    # override that failed (of several for one key, Hydra applies them in order and stops at the bad one)
    source = re.match(r"In '([^']+)'", str(e))
    typed = re.search(r"^(?:Error merging override |To append to your config use \+)(.+)$", str(e), re.MULTILINE)
    where = f"{key} in configs/{source[1]}.yaml" if source else typed[1] if typed else given.get(key, key)
    if isinstance(inner, ValidationError) and key in all_knobs():
        value = f" ({first_line(inner)})" if source else ""
        return f"{where}{value}: expected {expectation(key)}"
    if isinstance(inner, (ConfigKeyError, AttributeError)):
        return unknown(key, where)
    return f"{where}: {first_line(inner)}"


def expectation(key):
    knob = all_knobs()[key]
    return f"{type_name(knob.type)} ({key}: {knob.help})"


def unknown(key, where):
    close = difflib.get_close_matches(key, all_knobs(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{where}: unknown key {key}{hint}; python train.py --help lists every knob"


def unknown_keys(cfg, given, node=None, schema=TrainConfig, prefix=""):
    """Keys the schema lacks: added with +key=..., or an optimizer's key under another optimizer."""
    node = cfg if node is None else node
    names = {f.name for f in fields(schema)}
    for key, value in node.items_ex(resolve=False):
        full = f"{prefix}{key}"
        if key in names and isinstance(value, DictConfig):
            yield from unknown_keys(cfg, given, value, OmegaConf.get_type(value), f"{full}.")
        elif key not in names and full in all_knobs():  # another optimizer's key
            if full in given:  # from a preset it is unused (python train.py optim=adamw); given, a mistake
                yield f"{given[full]}: optim={cfg.optim.name} has no key {key} (its keys: {', '.join(sorted(names))})"
        elif key not in names:
            yield unknown(full, given.get(full, f"{full} (set in a YAML file)"))


def missing_values(cfg):
    missing = sorted(OmegaConf.missing_keys(cfg))
    return f"{missing[0]} has no value: set it in its YAML file or on the command line" if missing else None


def first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def one_line(e):
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


# -----------------------------------------------------------------------------------------------------
# python train.py --help: generated from the schema above and the values the YAML files give.

def help_text(overrides=()):
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
            optims = {name: compose(config_name="train", overrides=[*overrides, f"optim={name}"]).optim
                      for name in OPTIMIZERS}
            groups = {g: group_options(g) for g in ("config", "size", "model", "optim", "data")}
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(describe(e, given_values(overrides))) from None
    choices = cfg.hydra.runtime.choices
    command = " ".join(["python train.py", *overrides])
    lines = [
        "Train a GPT-2 with Sophia, AdamW, Lion or Muon (train.py). Overrides are Hydra's:",
        "  python train.py [config=PRESET] [GROUP=OPTION ...] [KEY=VALUE ...]",
        "  python train.py -m KEY=A,B ...      a sweep (hydra/launcher=slurm: one SLURM job per point)",
        "  python train.py --hydra-help        Hydra's own flags;  python train.py --help config=PRESET: its values",
        "",
        f"config=PRESET pins a whole run, a size plus an optimizer (configs/config/; now config={choices.config}):",
        textwrap.fill(", ".join(groups["config"]), 100, initial_indent="  ", subsequent_indent="  "),
        f"size=SIZE: model, data, batch, schedule, evaluation (configs/size/; now size={choices.get('size')}):",
        "  " + ", ".join(groups["size"]),
        "groups: " + "   ".join(f"{g}={'|'.join(groups[g])}" for g in ("model", "optim", "data")),
        "",
        f"Every knob: type (or its choices), value in `{command}`, description.",
    ]
    table = [("top-level", section(cfg, [k for k in knobs(TrainConfig) if "." not in k.key])),
             (f"model (model={choices.model})", section(cfg.model, knobs(ModelConfig, "model.")))]
    for name, schema in OPTIMIZERS.items():
        now = " (now)" if name == cfg.optim.name else ""
        table.append((f"optim={name}{now}", section(optims[name], knobs(schema, "optim."))))
    table += [(f"data (data={choices.data})", section(cfg.data, knobs(DataConfig, "data."))),
              ("wandb", section(cfg.wandb, knobs(WandbConfig, "wandb.")))]
    return "\n".join(lines + format_table(table))


def group_options(group):
    options = GlobalHydra.instance().config_loader().get_group_options(group)
    return [o for o in options if not o.startswith("base_")]


def section(node, keys):
    """(knob, value) rows; values as written, interpolations unresolved."""
    values = OmegaConf.to_container(node, enum_to_str=True)
    return [(k, values[k.key.rpartition(".")[2]]) for k in keys]


def format_table(table):
    lines = []
    for title, rows in table:
        cells = [(k.key, type_name(k.type), yaml_value(value), k.help) for k, value in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(3)]
        lines += ["", title] + ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3]
                                for row in cells]
    return lines


def yaml_value(value):
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    return str(value)


# -----------------------------------------------------------------------------------------------------
# The one way to compose a configuration outside train.py (scripts, tests), as train.py composes it.

def compose_config(preset=None, overrides=()):
    """The config `python train.py [config=preset] overrides...` runs with (a DictConfig, interpolations kept)."""
    preset_override = [f"config={preset}"] if preset else []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
        return compose(config_name="train", overrides=[*preset_override, *overrides])
