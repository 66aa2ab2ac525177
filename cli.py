"""
train.py's command line in front of Hydra: `--help` from the schema, and one line with exit status 2 for a
mistake, before torchrun's ranks or a sweep's jobs start.

Hydra itself parses the overrides, composes and runs; this module only adds what it lacks: a help table of
every knob (config_schema.py's fields and the YAML files' values), every point of a `-m` sweep checked
(check_values too) before the first one starts, did-you-mean for a mistyped key, preset or option, a pointer
to key=value for an override typed as a flag, and one line for an error Hydra prints in several.
"""

import argparse
import difflib
import itertools
import os
import re
import sys
import textwrap
import traceback
from dataclasses import fields

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from config_schema import (
    CONFIG_DIR,
    OPTIMIZERS,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    WandbConfig,
    all_knobs,
    check_values,
    knobs,
    type_name,
)

# -----------------------------------------------------------------------------------------------------
# Command-line checks: a mistake is one line and exit code 2 (Hydra prints several lines and exits 1), before
# torchrun's ranks or a sweep's jobs start.

def parse_command_line(argv):
    """(--help, --multirun, overrides), or None for a command line with any other of Hydra's flags."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("-m", "--multirun", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args, others = parser.parse_known_args(argv)
    return None if others else args


def check_command_line(argv=None):
    """Print --help and exit, or check every point of a `-m` sweep before the first one starts: a mistake exits
    with one line `error: ...` and code 2; else return, and Hydra goes on as usual. A single run is left to
    Hydra, which composes it once: run_main turns its composition errors into one line, and train.py checks
    the composed config (check_composed, check_values)."""
    argv = sys.argv[1:] if argv is None else argv
    dashed = dashed_override(argv)
    if dashed:
        print(f"error: {dashed}", file=sys.stderr)
        sys.exit(2)
    args = parse_command_line(argv)
    if args is None or not (args.help or args.multirun):
        return  # a single run, or Hydra's own flags (--hydra-help, --cfg, --config-dir, ...): composed by Hydra
    overrides = [o for o in args.overrides if not re.match(r"[+~]*hydra[./=]", o)]  # Hydra's own settings
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; a sweep's points run one process each
    try:
        if args.help:
            print(help_text(overrides))
            sys.exit(0)
        # each point is composed here, and again by Hydra as it starts it: the price of checking its values
        # (which Hydra cannot) before the first point starts
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
            for point in sweep_points(overrides):
                check_values(compose_checked(point), world_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run_main(main, argv=None):
    """Call Hydra's main. For a composition error (a wrong type, an unknown key or option, a bad value in a YAML
    file) Hydra prints several lines and exits 1; with HYDRA_FULL_ERROR set it raises the error instead, which
    becomes one line and exit status 2 here. An error raised inside a run is left as it is."""
    argv = sys.argv[1:] if argv is None else argv
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        # Hydra runs the task inside run_job (hydra.core.utils) and composes before it: an error whose traceback
        # passes through run_job came from the run itself (Hydra's own error printer tells them apart so too)
        if any(frame.name == "run_job" for frame in traceback.extract_tb(e.__traceback__)):
            raise
        print(f"error: {describe(e, given_values(argv))}", file=sys.stderr)
        sys.exit(2)


def check_composed(cfg, overrides):
    """ConfigError for what composes but is wrong: a missing value, or a key the schema lacks (+key=..., or an
    optimizer's key under another optimizer)."""
    problem = missing_values(cfg) or next(unknown_keys(cfg, given_values(overrides)), None)
    if problem:
        raise ConfigError(problem)


def dashed_override(argv):
    """The message for an override typed as a flag (--max_steps=100, --seed 3, --resume), else None. Hydra's own
    flags (--cfg, --config-name, ...) name no knob or config group, and hold no '_' or '.', as knobs' keys do."""
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    for i, arg in enumerate(argv):
        key, equals, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-") or not ("_" in key or "." in key or key in all_knobs() or key in groups):
            continue
        following = argv[i + 1] if i + 1 < len(argv) else ""
        if not equals and following and not following.startswith("-") and "=" not in following:
            arg, value = f"{arg} {following}", following  # --seed 3
        elif not equals:
            value = "true" if key in all_knobs() and all_knobs()[key].type is bool else "VALUE"  # --resume
        return (f"{arg}: overrides are key=value, without dashes: python train.py {key}={value} "
                f"(python train.py --help lists every key)")
    return None


def sweep_points(overrides):
    """Every job of a `-m` sweep, as the basic sweeper splits it: the product of the swept values."""
    try:
        parsed = OverridesParser.create(GlobalHydra.instance().config_loader()).parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(one_line(e)) from None
    if any(o.is_sweep_override() and not o.is_discrete_sweep() for o in parsed):
        return []  # range/interval sweeps belong to another sweeper: Hydra checks them alone
    # Hydra's parser reads the values; their product is the basic sweeper's (split_arguments, in Hydra's private
    # modules), in its order: a later override of a key replaces an earlier one
    choices = {}
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
    check_composed(cfg, overrides)
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
        close = likely_meant(name, [o for o in e.options or [] if not o.startswith("base_")])
        hint = f"did you mean {either(f'{group}={o}' for o in close)}?" if close else "python train.py --help lists them"
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


def likely_meant(typed, options):
    """What a mistyped name most likely meant: the options it begins (optim=sophia: sophiag or sophiah, listed
    both, as neither is more likely), if a few; else the one closest in spelling."""
    begun = sorted(o for o in options if o.startswith(typed))
    return begun if 0 < len(begun) <= 6 else difflib.get_close_matches(typed, options, n=1)


def either(names):
    """'a', 'a or b', 'a, b or c'."""
    *others, last = names
    return f"{', '.join(others)} or {last}" if others else last


def unknown(key, where):
    close = likely_meant(key, list(all_knobs()))
    hint = f" (did you mean {either(close)}?)" if close else ""
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
              ("eval", section(cfg.eval, knobs(EvalConfig, "eval."))),
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


