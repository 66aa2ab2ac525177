"""
The configuration's schema: every knob of train.py, its type and a one-line description.

The values live in configs/ (train.yaml, the groups, the presets); each YAML file names its schema here
in its defaults list (`base_train`, `base_model`, `base_<optimizer>`, `base_data`), so Hydra checks every
value's type as it composes. A field's trailing comment is its line in `python train.py --help`, and
check_command_line() turns a wrong type or an unknown key into one line before any work.
To add a knob: a field here (with its comment), its value in YAML.
"""

import difflib
import inspect
import itertools
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class ModelConfig:
    name: str = MISSING                              # the model's name (W&B group and tag)
    n_layer: int = MISSING                           # transformer blocks
    n_head: int = MISSING                            # attention heads per block
    n_embd: int = MISSING                            # embedding width, a multiple of n_head
    block_size: int = MISSING                        # sequence length in tokens
    vocab_size: int = MISSING                        # vocabulary size (GPT-2's 50257 padded to 50304)
    dropout: float = MISSING                         # dropout probability (0 in the paper)
    bias: bool = MISSING                             # biases in the Linear and LayerNorm layers
    scale_attn_by_inverse_layer_idx: bool = MISSING  # also divide layer i's attention scores by i + 1 (official runs)


@dataclass
class OptimConfig:
    """What every optimizer has; each one below adds its own knobs."""
    name: str = MISSING            # the optimizer (choose it with optim=adamw | lion | sophiag | sophiah | muon)
    lr: float = MISSING            # peak learning rate, reached after warmup_steps
    betas: list[float] = MISSING   # [beta1, beta2]: the two EMA decay rates, each in [0, 1)
    weight_decay: float = MISSING  # decoupled weight decay, on >=2-D weights only


@dataclass
class AdamWConfig(OptimConfig):
    eps: float = MISSING  # added to sqrt(v) in AdamW's denominator


@dataclass
class LionConfig(OptimConfig):
    pass


@dataclass
class SophiaGConfig(OptimConfig):
    rho: float = MISSING                   # clipping threshold of the preconditioned step (the paper: 0.03-0.08)
    hess_interval: int = MISSING           # k: refresh the Hessian EMA every k steps
    hess_batch_size: int | None = MISSING  # sequences in a Hessian batch; null -> total_batch_size (official)


@dataclass
class SophiaHConfig(SophiaGConfig):
    probe: str = MISSING  # Hutchinson's probe vectors: rademacher | gaussian


@dataclass
class MuonConfig(OptimConfig):
    """Muon on the blocks' weight matrices at lr; AdamW (betas, eps) on the embeddings, LayerNorms and biases."""
    adam_lr: float | None = MISSING  # peak lr of the AdamW part (embeddings, LayerNorms, biases); null -> optim.lr
    momentum: float = MISSING        # Muon's momentum (EMA of the gradient), in [0, 1)
    nesterov: bool = MISSING         # Muon orthogonalizes the Nesterov look-ahead (gradient + momentum), not the momentum
    ns_steps: int = MISSING          # Newton-Schulz iterations that orthogonalize Muon's update
    adjust_lr_fn: str = MISSING      # Muon's lr per matrix: match_rms_adamw (update RMS as AdamW's: shares its lr) | original
    eps: float = MISSING             # added to sqrt(v) in AdamW's denominator


OPTIMIZERS = {"adamw": AdamWConfig, "lion": LionConfig, "sophiag": SophiaGConfig, "sophiah": SophiaHConfig,
              "muon": MuonConfig}


@dataclass
class DataConfig:
    name: str = MISSING        # the corpus: data/<name>/prepare.py writes its train.bin and val.bin
    dir: str | None = MISSING  # where the bins are; null -> <repo>/data/<name>; relative to the repo root


@dataclass
class WandbConfig:
    enabled: bool = MISSING       # log to Weights & Biases too (metrics.jsonl is always written)
    project: str = MISSING        # W&B project
    entity: str | None = MISSING  # W&B entity (user or team); null -> your default one
    group: str | None = MISSING   # W&B group; null -> the model name, so one size's optimizers sit together
    tags: list[str] = MISSING     # extra W&B tags (the optimizer, model and data names are always added)
    mode: str | None = MISSING    # online | offline | disabled; null -> wandb's own default (WANDB_MODE)


@dataclass
class TrainConfig:
    out_dir: str | None = MISSING           # run directory; null -> out/<run_name>; may use ${run_name}
    run_name: str | None = MISSING          # null -> the preset name plus the command-line overrides
    resume: bool = MISSING                  # continue from out_dir/ckpt.pt when it exists (a requeued SLURM job needs this)
    seed: int = MISSING                     # seed of the initial weights, the data order, dropout and the Hessian samples
    init_from: str = MISSING                # scratch | an HF GPT-2 name (gpt2, ...) | a save_pretrained folder: its weights
    device: str = MISSING                   # auto (cuda:LOCAL_RANK when CUDA is there, else cpu) | cpu | cuda | cuda:N
    dtype: str = MISSING                    # auto (bfloat16 autocast on CUDA, float32 on CPU) | float32 | bfloat16
    compile: str = MISSING                  # auto (compiled on CUDA, eager on CPU) | true | false: torch.compile the model
    parallel: str = MISSING                 # ddp: every rank holds the whole model | fsdp: FSDP2 shards weights, grads, state
    max_steps: int = MISSING                # optimizer steps
    warmup_steps: int = MISSING             # linear warmup from 0 to optim.lr over this many steps
    lr_decay_steps: int | None = MISSING    # cosine decay from optim.lr to min_lr over this many steps; null -> max_steps
    min_lr: float = MISSING                 # learning rate at the end of the cosine decay
    grad_clip: float = MISSING              # clip the global gradient norm at this value; 0 disables
    max_skipped_updates: int = MISSING      # stop (exit 1) after this many updates in a row skipped for a non-finite gradient
    total_batch_size: int = MISSING         # sequences per optimizer step, over all ranks and micro-steps (the paper: 480)
    micro_batch_size: int = MISSING         # sequences per forward/backward on one rank; accumulation is derived
    eval_interval: int = MISSING            # evaluate every this many steps (and at the end)
    eval_steps: int = MISSING               # validation micro-batches per evaluation, spread over the ranks
    log_interval: int = MISSING             # steps between metrics lines
    ckpt_interval: int = MISSING            # steps between checkpoints (and at the end, and on preemption)
    cpu_peak_flops: float | None = MISSING  # MFU peak on CPU in FLOP/s; null -> measured once by timing fp32 matmuls
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
# The schema as a table of knobs: key, type, and the field's trailing comment as its description.

@dataclass
class Knob:
    key: str     # dotted, e.g. optim.lr
    type: object
    help: str


def knobs(schema, prefix=""):
    """The schema's fields, nested ones flattened, in order."""
    comments = {}
    for cls in reversed(schema.__mro__[:-1]):  # a subclass's lines after its bases'
        comments.update(re.findall(r"^    (\w+): [^=]+=[^#]+#\s*(.*)$", inspect.getsource(cls), re.MULTILINE))
    for f in fields(schema):
        if is_dataclass(f.type):
            yield from knobs(f.type, f"{prefix}{f.name}.")
        else:
            yield Knob(f"{prefix}{f.name}", f.type, comments.get(f.name, ""))


def all_knobs():
    """Every knob by key; the optimizers' shared names have the same type and description."""
    table = {k.key: k for k in knobs(TrainConfig)}
    for schema in OPTIMIZERS.values():
        table.update((k.key, k) for k in knobs(schema, "optim."))
    return table


def type_name(tp):
    """int, float or null, list of float ... as a user would write it."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return f"{type_name(args[0])} or null"
    if typing.get_origin(tp) is list:
        return f"list of {type_name(args[0])}"
    return tp.__name__


# -----------------------------------------------------------------------------------------------------
# Command-line checks: compose as Hydra will, before Hydra, so that a mistake is one line and exit code 2
# (Hydra prints several lines and exits 1), and before torchrun's ranks or a sweep's jobs start.

class ConfigError(ValueError):
    """Bad input found before any training (the command line, a YAML file, a value, a path): the message is the
    one line users see, and names the fix. Exit status 2."""


def check_command_line(argv=None):
    """Print --help and exit, or check the configuration of every run the command line asks for: a mistake
    exits with one line `error: ...` and code 2; else return, and Hydra goes on as usual."""
    args = get_args_parser().parse_args(argv)  # Hydra's own parser: the same flags, the same meaning
    overrides = [o for o in args.overrides if not re.match(r"[+~]*hydra[./=]", o)]  # Hydra's own settings
    try:
        if args.help:
            print(help_text(overrides))
            sys.exit(0)
        if args.hydra_help or args.info or args.shell_completion or args.experimental_rerun or \
                args.config_path or args.config_dir or args.config_name:
            return  # Hydra's business, or another config tree: Hydra checks it alone
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
            for point in (sweep_points(overrides) if args.multirun else [overrides]):
                compose_checked(point)
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
    try:
        cfg = compose(config_name="train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(describe(e, given_values(overrides))) from None
    problem = missing_values(cfg) or next(unknown_keys(cfg, given_values(overrides)), None)
    if problem:
        raise ConfigError(problem)


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
        options = ", ".join(o for o in e.options or [] if not o.startswith("base_"))
        return f"{group}={name}: no such option in configs/{group}/; choose one of: {options}"
    inner = e if isinstance(e, OmegaConfBaseException) else (e.__cause__ or e.__context__)
    key = getattr(inner, "full_key", None) if isinstance(inner, OmegaConfBaseException) else None
    if not key:
        return one_line(e)
    key = key.split("[")[0]  # optim.betas[1] -> optim.betas
    source = re.match(r"In '([^']+)'", str(e))  # a YAML file's value, not a command-line override's
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
            groups = {g: group_options(g) for g in ("config", "model", "optim", "data")}
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
        f"config=PRESET pins a whole run (configs/config/; now config={choices.config}):",
        textwrap.fill(", ".join(groups["config"]), 100, initial_indent="  ", subsequent_indent="  "),
        "groups: " + "   ".join(f"{g}={'|'.join(groups[g])}" for g in ("model", "optim", "data")),
        "",
        f"Every knob: type, value in `{command}`, description.",
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
    values = OmegaConf.to_container(node)
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
