"""config_schema.py: typed knobs; cli.py: the command line. A wrong type or an unknown key is one line and exit
code 2 before any work; `python train.py --help` lists every knob; every preset composes with values of the schema's types."""
import re
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

import cli
import config_schema
from conftest import flatten

REPO_DIR = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO_DIR / "configs" / "config").glob("*.yaml"))


def train_py(*args, cwd=REPO_DIR):
    return subprocess.run([sys.executable, str(REPO_DIR / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False)


# -----------------------------------------------------------------------------------------------------
# Mistakes: one line naming the key, the value and the expected type; exit code 2; nothing run.

@pytest.mark.parametrize("args, expected", [
    (["optim.lr=abc"], ["optim.lr=abc", "expected float"]),
    (["max_steps=abc"], ["max_steps=abc", "expected int"]),
    (["model.n_layer=1.5"], ["model.n_layer=1.5", "expected int"]),
    (["optim.betas=[0.9,abc]"], ["optim.betas=[0.9,abc]", "expected list of float"]),
    (["optim=sophiag", "optim.hess_batch_size=half"], ["optim.hess_batch_size=half", "expected int or null"]),
    (["wandb.tags=abc"], ["wandb.tags=abc", "expected list of str"]),
    (["max_stepz=5"], ["max_stepz=5", "unknown key max_stepz", "did you mean max_steps?"]),
    (["+max_stepz=5"], ["+max_stepz=5", "unknown key max_stepz"]),
    (["optim=adamw", "optim.rho=0.1"], ["optim.rho=0.1", "optim=adamw has no key rho"]),
    # a mistyped preset or group option: the closest one, as for a mistyped key
    (["config=shakespeare_sophia"], ["config=shakespeare_sophia", "did you mean config=shakespeare_sophiag?"]),
    (["model=gpt2_smal"], ["model=gpt2_smal", "did you mean model=gpt2_small?"]),
    (["config=no_such_preset"], ["config=no_such_preset", "python train.py --help lists them"]),
    # a name that begins several options: all of them, not the closest in spelling alone (sophiah)
    (["optim=sophia"], ["optim=sophia", "did you mean optim=sophiag or optim=sophiah?"]),
    # an override typed as a flag: a pointer to key=value, not Hydra's usage block
    (["--max_steps=100"], ["--max_steps=100", "without dashes: python train.py max_steps=100"]),
    # a value outside a knob's choices: refused by Hydra as it composes (typed choices), with the choices
    (["dtype=float16"], ["dtype=float16", "expected auto|float32|bfloat16"]),
    (["parallel=zero3"], ["parallel=zero3", "expected ddp|fsdp"]),
    (["optim=sophiah", "optim.probe=uniform"], ["optim.probe=uniform", "expected rademacher|gaussian"]),
    (["wandb.mode=onlin"], ["wandb.mode=onlin", "expected online|offline|disabled or null"]),
    (["compile=yes"], ["compile=yes: use auto"]),
    # a value no type can refuse
    (["warmup_steps=5"], ["warmup_steps=5 > max_steps=2"]),
    (["total_batch_size=5"], ["total_batch_size=5 is not a multiple of micro_batch_size=8"]),
    (["optim.lr=1e-5", "min_lr=1e-4"], ["min_lr=0.0001 must lie in [0, optim.lr=1e-05]", "e.g. min_lr=1e-06"]),
    # a sweep: every point is checked before the first one starts, so one bad point stops none midway
    (["-m", "optim.lr=1e-3,abc"], ["optim.lr=abc", "expected float"]),
    (["-m", "warmup_steps=1,5"], ["warmup_steps=5 > max_steps=2"]),
    (["-m", "optim=adamw,sophiag", "optim.lr=1e-3,-1"], ["optim.lr=-1.0: the learning rate must be positive"]),
])
def test_a_wrong_type_or_unknown_key_is_one_line_and_exit_code_2(tmp_path, args, expected):
    flags, overrides = [a for a in args if a.startswith("-")], [a for a in args if not a.startswith("-")]
    result = train_py(*flags, "device=cpu", "max_steps=2", "warmup_steps=0", *overrides, f"out_dir={tmp_path / 'run'}",
                      "hydra.sweep.dir=" + str(tmp_path / "sweep"), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(part in lines[0] for part in expected), lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_the_message_names_a_yaml_files_bad_value(tmp_path):
    """Hydra's own composition of the run (-cp: its primary config directory) fails: one line, exit code 2."""
    shutil.copytree(REPO_DIR / "configs", tmp_path / "configs")
    size = tmp_path / "configs" / "size" / "shakespeare_char.yaml"
    size.write_text(size.read_text().replace("max_steps: 2000", "max_steps: two thousand"))
    result = train_py("-cp", str(tmp_path / "configs"), "config=shakespeare_char_adamw",
                      f"out_dir={tmp_path / 'run'}", cwd=tmp_path)
    message = result.stderr.strip()
    assert result.returncode == 2 and len(message.splitlines()) == 1, result.stderr
    assert "max_steps in configs/size/shakespeare_char.yaml" in message and "two thousand" in message
    assert "expected int" in message


@pytest.mark.parametrize("argv, expected", [
    (["--seed", "3"], "--seed 3: overrides are key=value, without dashes: python train.py seed=3 "),
    (["optim=adamw", "--optim.lr=1e-3"], "--optim.lr=1e-3: overrides are key=value, without dashes: "
                                         "python train.py optim.lr=1e-3 "),
    (["--config=gpt2_small_adamw"], "python train.py config=gpt2_small_adamw "),
    (["-m", "--resume"], "--resume: overrides are key=value, without dashes: python train.py resume=true "),
    (["--max_steps"], "python train.py max_steps=VALUE "),
])
def test_an_override_typed_as_a_flag_points_at_key_value(capsys, argv, expected):
    with pytest.raises(SystemExit) as stop:
        cli.check_command_line(argv)
    message = capsys.readouterr().err
    assert stop.value.code == 2 and message.count("\n") == 1 and expected in message, message


@pytest.mark.parametrize("argv, raised", [(["optim.lr=abc"], SystemExit), (["optim.lr=1e-3"], ConfigAttributeError)])
def test_only_hydras_composition_errors_become_one_line(monkeypatch, tmp_path, capsys, argv, raised):
    """run_main: a composition error is one line and exit 2; an error raised inside the run (here a task that
    reads a key the config lacks, as a bug would) stays the exception it is."""
    @hydra.main(version_base="1.3", config_path=str(REPO_DIR / "configs"), config_name="train")
    def task(cfg):
        return cfg.no_such_key

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # restored afterwards: run_main sets it
    monkeypatch.setattr(sys, "argv", ["train.py", *argv, f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(raised) as stop:
        cli.run_main(task)
    if raised is SystemExit:
        message = capsys.readouterr().err
        assert stop.value.code == 2 and message.count("\n") == 1 and "optim.lr=abc: expected float" in message


def test_hydras_own_flags_stay_hydras(capsys):
    """--cfg job prints the composed config (Hydra's flag, left to Hydra by the command line's check)."""
    cli.check_command_line(["--cfg", "job", "--resolve", "max_steps=3"])
    result = train_py("--cfg", "job", "max_steps=3")
    assert result.returncode == 0 and "max_steps: 3" in result.stdout, result.stderr


def test_good_command_lines_pass_the_check():
    """A single run's checks, as train.py's main() makes them on Hydra's composition; a sweep's, up front."""
    for overrides in (["optim=adamw"],  # the default (Sophia) preset under AdamW: its rho unused
                      ["config=gpt2_small_sophiah", "optim.hess_batch_size=240", "wandb.tags=[a,b]"]):
        cfg = config_schema.compose_config(None, overrides)
        cli.check_composed(cfg, overrides)
        config_schema.check_values(cfg, world_size=1)
    cli.check_command_line(["-m", "optim=adamw,sophiag", "optim.lr=1e-3,2e-3", "hydra/launcher=slurm",
                                      "out_dir=out/sweep/${run_name}"])


# -----------------------------------------------------------------------------------------------------
# --help: every knob of the composed configs, with its type, value and description.

@pytest.fixture(scope="module")
def help_text():
    result = train_py("--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


def help_rows(text):
    """key -> (type, value, description) from the help's table rows."""
    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if line.startswith("  ") and len(cells) == 4:
            rows.setdefault(cells[0], cells[1:])
    return rows


@pytest.mark.parametrize("preset", ["shakespeare_sophiag", "gpt2_small_sophiah", "gpt2_small_adamw", "gpt2_small_lion"])
def test_help_lists_every_key_of_a_composed_config(help_text, preset):
    rows = help_rows(help_text)
    keys = flatten(OmegaConf.to_container(config_schema.compose_config(preset)))
    assert set(keys) <= set(rows), sorted(set(keys) - set(rows))
    for key in keys:
        type_, _, description = rows[key]
        assert re.fullmatch(r"(int|float|bool|str|list of \w+|\w+(\|\w+)+)( or null)?", type_), (key, type_)
        assert len(description) > 5, key


def test_help_is_grouped_and_names_the_presets(help_text):
    titles = [line for line in help_text.splitlines() if line and not line.startswith(" ")]
    for title in ["top-level", "model (model=tiny)", "optim=adamw", "optim=lion", "optim=sophiag (now)",
                  "optim=sophiah", "data (data=shakespeare)", "wandb"]:
        assert title in titles, titles
    assert "config=PRESET" in help_text and all(preset in help_text for preset in PRESETS)


def test_hydra_help_is_still_hydras():
    result = train_py("--hydra-help")
    assert result.returncode == 0 and "Hydra (" in result.stdout


def test_every_knob_has_a_description():
    assert all(knob.help for knob in config_schema.all_knobs().values())


def test_help_says_what_it_is_told_by_the_fields_metadata(help_text):
    """The descriptions are the fields' metadata (not parsed from the source): a changed one shows at once."""
    rows = help_rows(help_text)
    for key, knob in config_schema.all_knobs().items():
        assert rows[key][2] == knob.help, key
    assert rows["dtype"][0] == "auto|float32|bfloat16" and rows["parallel"][:2] == ["ddp|fsdp", "ddp"]
    assert "nn.Linear weights only" in rows["optim.weight_decay"][2]  # model.configure_optimizer_groups
    assert "ckpt.dcp under parallel=fsdp" in rows["resume"][2]


def test_help_of_a_preset_shows_its_values():
    result = train_py("--help", "config=gpt2_xl_sophiag")
    rows = help_rows(result.stdout)
    assert result.returncode == 0 and rows["parallel"][1] == "fsdp" and rows["model.n_layer"][1] == "48"


def test_choices_compare_and_save_as_their_strings(tmp_path):
    """Code reads the typed choices as strings (cfg.parallel == "fsdp"); saved configs hold plain strings."""
    cfg = config_schema.compose_config("gpt2_xl_sophiag", ["optim=sophiah"])
    assert cfg.parallel == "fsdp" and f"{cfg.parallel}/{cfg.dtype}/{cfg.optim.probe}" == "fsdp/auto/rademacher"
    assert {"fsdp": 1}[cfg.parallel] == 1
    saved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert type(saved["parallel"]) is str and type(saved["optim"]["probe"]) is str
    OmegaConf.save(cfg, tmp_path / "config.yaml")  # as build.py writes a run's config.yaml
    assert (tmp_path / "config.yaml").read_text().count("parallel: fsdp\n") == 1


def test_the_checks_of_train_py_are_check_values(monkeypatch, tmp_path):
    """train() refuses what check_command_line refuses, through the one function, before anything else."""
    import train

    def refuse(cfg, world_size):
        calls.append(world_size)
        raise config_schema.ConfigError("refused")
    calls = []
    monkeypatch.setattr(train, "check_values", refuse)
    with pytest.raises(config_schema.ConfigError, match="refused"):
        train.train(config_schema.compose_config(None, [f"out_dir={tmp_path / 'run'}"]))
    assert calls == [1] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("world_size, micro, hess_batch", [(1, 8, None), (1, 8, 12), (2, 4, 48), (4, 8, 12),
                                                                  (3, 5, 9), (2, 8, 3), (2, 8, 9)])
def test_check_values_refuses_exactly_the_hessian_batches_that_do_not_split(world_size, micro, hess_batch):
    """A Hessian batch is accepted iff the plan's micro-batches add up to it on every rank, counted here
    independently: the batch splits evenly over the ranks, and each rank's share into micro_batch_size chunks or
    one smaller chunk."""
    cfg = config_schema.compose_config("shakespeare_sophiag", [
        f"micro_batch_size={micro}", f"total_batch_size={micro * world_size * 2}",
        f"optim.hess_batch_size={'null' if hess_batch is None else hess_batch}"])
    batch = hess_batch or micro * world_size * 2
    per_rank, rest = divmod(batch, world_size)
    splits = rest == 0 and per_rank >= 1 and (per_rank < micro or per_rank % micro == 0)
    if splits:
        config_schema.check_values(cfg, world_size)
        plan = config_schema.plan_batches(cfg, world_size)
        assert plan.hess_batch == batch and plan.hess_accum * plan.hess_micro * world_size == batch
    else:
        with pytest.raises(config_schema.ConfigError, match=f"optim.hess_batch_size={batch} does not split"):
            config_schema.check_values(cfg, world_size)


def test_no_private_hydra_import():
    for module in ("config_schema.py", "cli.py"):
        source = (REPO_DIR / module).read_text()
        assert "hydra._internal" not in source and "inspect" not in source, module


# -----------------------------------------------------------------------------------------------------
# Every preset and group option composes, with exactly the schema's keys and values of its types.

def matches(value, tp):
    """An independent reading of the annotations: does the YAML's value have the declared type?"""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return value is None or matches(value, args[0])
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(matches(v, args[0]) for v in value)
    return type(value) is tp


def assert_matches_schema(cfg):
    schema = {k.key: k.type for k in config_schema.knobs(config_schema.TrainConfig)}
    schema = {k: t for k, t in schema.items() if not k.startswith("optim.")}
    optim = config_schema.OPTIMIZERS[cfg.optim.name]
    assert OmegaConf.get_type(cfg.optim) is optim
    schema.update((k.key, k.type) for k in config_schema.knobs(optim, "optim."))
    values = flatten(OmegaConf.to_container(cfg, resolve=True))  # as train.py reads them: min_lr=${mul:...}
    assert set(values) == set(schema), sorted(set(values) ^ set(schema))
    for key, value in values.items():
        assert matches(value, schema[key]), (key, value, schema[key])


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_with_the_schemas_types(preset):
    assert_matches_schema(config_schema.compose_config(preset))


@pytest.mark.parametrize("group", ["size", "model", "optim", "data"])
def test_every_group_option_composes_with_the_schemas_types(group):
    options = sorted(p.stem for p in (REPO_DIR / "configs" / group).glob("*.yaml"))
    assert options
    for option in options:
        # shakespeare_adamw sets no optimizer-specific key, so any optimizer goes under it
        assert_matches_schema(config_schema.compose_config("shakespeare_adamw", [f"{group}={option}"]))
