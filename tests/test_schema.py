"""config_schema.py: typed knobs. A wrong type or an unknown key is one line and exit code 2 before any work;
`python train.py --help` lists every knob; every preset composes with values of the schema's types."""
import re
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import config_schema
from conftest import flatten

REPO_DIR = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO_DIR / "configs" / "config").glob("*.yaml"))


def train_py(*args, cwd=REPO_DIR):
    return subprocess.run([sys.executable, str(REPO_DIR / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False)


def composed(overrides):
    with initialize_config_dir(config_dir=str(REPO_DIR / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


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
    (["config=no_such_preset"], ["config=no_such_preset", "shakespeare_sophiag"]),
    # a sweep: every point is checked before the first one starts
    (["-m", "optim.lr=1e-3,abc"], ["optim.lr=abc", "expected float"]),
])
def test_a_wrong_type_or_unknown_key_is_one_line_and_exit_code_2(tmp_path, args, expected):
    result = train_py(*args, "max_steps=2", f"out_dir={tmp_path / 'run'}", "hydra.sweep.dir=" + str(tmp_path / "sweep"),
                      cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(part in lines[0] for part in expected), lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_the_message_names_a_yaml_files_bad_value(tmp_path, monkeypatch, capsys):
    shutil.copytree(REPO_DIR / "configs", tmp_path / "configs")
    preset = tmp_path / "configs" / "config" / "shakespeare_adamw.yaml"
    preset.write_text(preset.read_text().replace("max_steps: 500", "max_steps: five hundred"))
    monkeypatch.setattr(config_schema, "CONFIG_DIR", tmp_path / "configs")
    with pytest.raises(SystemExit) as stop:
        config_schema.check_command_line(["config=shakespeare_adamw"])
    message = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(message.splitlines()) == 1
    assert "max_steps in configs/config/shakespeare_adamw.yaml" in message and "five hundred" in message
    assert "expected int" in message


def test_good_command_lines_pass_the_check():
    config_schema.check_command_line(["optim=adamw"])  # the default (Sophia) preset under AdamW: its rho unused
    config_schema.check_command_line(["config=gpt2_small_sophiah", "optim.hess_batch_size=240", "wandb.tags=[a,b]"])
    config_schema.check_command_line(["-m", "optim=adamw,sophiag", "optim.lr=1e-3,2e-3", "hydra/launcher=slurm",
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
    keys = flatten(OmegaConf.to_container(composed([f"config={preset}"])))
    assert set(keys) <= set(rows), sorted(set(keys) - set(rows))
    for key in keys:
        type_, _, description = rows[key]
        assert re.fullmatch(r"(int|float|bool|str|list of \w+)( or null)?", type_) and len(description) > 5, key


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
    assert_matches_schema(composed([f"config={preset}"]))


@pytest.mark.parametrize("group", ["model", "optim", "data"])
def test_every_group_option_composes_with_the_schemas_types(group):
    options = sorted(p.stem for p in (REPO_DIR / "configs" / group).glob("*.yaml"))
    assert options
    for option in options:
        # shakespeare_adamw sets no optimizer-specific key, so any optimizer goes under it
        assert_matches_schema(composed(["config=shakespeare_adamw", f"{group}={option}"]))
