"""scripts/slurm/train.sbatch and the Hydra SLURM launcher on a real SLURM cluster: two emulated nodes
(two slurmd on this machine, started by scripts/slurm/local_cluster.py), one CPU worker per node, gloo.

References: a one-process run of the same command (the two nodes must compute what it computes), the
run's own checkpoint (a preempted, requeued job must resume from it and log every step once), and
SLURM's record of each job (requeued, completed, cancelled, failed)."""
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import conftest
from conftest import REPO_DIR, read_metrics
from scripts.slurm import local_cluster

SBATCH_SCRIPT = REPO_DIR / "scripts" / "slurm" / "train.sbatch"


def tiny():
    """The tiny model of train.py's tests (a step takes milliseconds of compute, a run is mostly start-up), on the
    session's corpus (the shakespeare_bins fixture, which the cluster fixture requests)."""
    return ["config=shakespeare_sophiag", "optim.hess_interval=2", *conftest.TINY, f"data.dir={conftest.CORPUS['dir']}"]


# one cluster per test process, and one test process for them all (pytest -n 2: its ports are fixed)
pytestmark = [pytest.mark.xdist_group("slurm"), pytest.mark.slow]
missing = local_cluster.missing_binaries()
needs_cluster = pytest.mark.skipif(
    bool(missing) or os.geteuid() != 0,
    reason=f"SLURM/MUNGE programs missing ({', '.join(missing)}): run scripts/slurm/install_debian.sh as root"
    if missing else "the local SLURM cluster runs its daemons as root and munge: run the tests as root")


def without_slurm_variables(env):
    return {k: v for k, v in env.items() if not k.startswith("SLURM_")}


def test_outside_slurm_the_script_says_to_use_sbatch():
    result = subprocess.run(["bash", str(SBATCH_SCRIPT), "config=shakespeare_sophiag"], cwd=REPO_DIR,
                            capture_output=True, text=True, env=without_slurm_variables(os.environ), timeout=30)
    assert result.returncode == 2
    assert "sbatch scripts/slurm/train.sbatch" in result.stderr


# -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(shakespeare_bins):
    """A running two-node cluster; yields the environment for sbatch & co. Daemons stop whatever happens."""
    # not pytest's tmp_path: its root is closed to other users, and munged runs as the munge user
    cluster_dir = Path(tempfile.mkdtemp(prefix="slurm-test-"))
    try:
        config_path = local_cluster.start(cluster_dir, num_nodes=2)
        with socket.socket() as s:  # a free port for the rendezvous of this module's jobs
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # sbatch hands this environment to the job: SLURM_CONF lets train.py's `scontrol requeue` reach us,
        # one thread per worker keeps two workers from fighting over two cores.
        env = {**without_slurm_variables(os.environ), "SLURM_CONF": str(config_path), "RDZV_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PATH": local_cluster.cluster_env(cluster_dir)["PATH"]}
        yield env
    finally:
        local_cluster.stop(cluster_dir)
        shutil.rmtree(cluster_dir, ignore_errors=True)


def slurm(env, *args):
    result = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{' '.join(args)} failed: {result.stderr}"
    return result.stdout


def submit(env, log_path, train_args):
    """sbatch from the repository root, as users do; returns the job id."""
    result = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--output={log_path}", str(SBATCH_SCRIPT),
                             *train_args], cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_info(env, job_id):
    """`scontrol show job` as a dict, e.g. {"JobState": "RUNNING", "Restarts": "0", ...}."""
    fields = slurm(env, "scontrol", "--oneliner", "show", "job", job_id).split()
    return dict(field.split("=", 1) for field in fields if "=" in field)


def wait_for(condition, timeout, what, log_path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    log = Path(log_path).read_text()[-4000:] if Path(log_path).exists() else "(no log yet)"
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; job log:\n{log}")


def train_steps(records):
    return [r["step"] for r in records if "train/loss" in r]


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def finished(env, job_id):
    info = job_info(env, job_id)
    return info if info["JobState"] in ENDED else None


def run_on_two_nodes(cluster, work, parallel="ddp"):
    """A 4-step run on 2 nodes x 1 worker, submitted with train.sbatch and waited for."""
    log_path = work / "slurm.out"
    job_id = submit(cluster, log_path, [*tiny(), "max_steps=4", f"out_dir={work / 'run'}", f"parallel={parallel}"])
    info = wait_for(lambda: finished(cluster, job_id), 240, f"job {job_id} to finish", log_path)
    return info, log_path.read_text(), work / "run"


@pytest.fixture(scope="module")
def one_process_run(shakespeare_bins, tmp_path_factory):
    """The reference of the two-node runs: the same 4-step command in one process, which accumulates the two
    micro-batches itself. Run once for the module; its metrics."""
    out_dir = tmp_path_factory.mktemp("one_process")
    reference = subprocess.run([sys.executable, "train.py", *tiny(), "max_steps=4", f"out_dir={out_dir}"],
                               cwd=REPO_DIR, capture_output=True, text=True, timeout=300,
                               env={**without_slurm_variables(os.environ), "OMP_NUM_THREADS": "1"})
    assert reference.returncode == 0, reference.stderr[-3000:]
    return read_metrics(out_dir)


@needs_cluster
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_nodes_compute_what_one_process_computes(cluster, one_process_run, tmp_path, parallel):
    info, log, out_dir = run_on_two_nodes(cluster, tmp_path, parallel)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]"
    assert "2 node(s) x 1 worker(s)" in log  # train.sbatch: one torchrun per node, one CPU worker each
    assert "2 rank(s) x 1 micro-batch(es)" in log  # train.py: world size 2
    two_nodes = read_metrics(out_dir)
    assert train_steps(two_nodes) == [1, 2, 3, 4]

    assert (out_dir / ("ckpt.dcp" if parallel == "fsdp" else "ckpt.pt")).exists()
    for key in ("train/loss", "val/loss", "grad_norm", "optim/hessian_norm"):
        got = {r["step"]: r[key] for r in two_nodes if key in r}
        want = {r["step"]: r[key] for r in one_process_run if key in r}
        assert got == pytest.approx(want, rel=1e-4), key


@needs_cluster
def test_preemption_notice_requeues_the_job_and_it_resumes(cluster, one_process_run, tmp_path):
    """scancel --signal=USR1 is what SLURM sends 120 s before the time limit (#SBATCH --signal=USR1@120)."""
    # Size the run from the one-process reference's speed (two nodes are no faster): long enough (~15 s of
    # steps) for the signal to land mid-run on a fast machine, short enough not to drag on a slow one.
    first = [r for r in one_process_run if "train/loss" in r]
    seconds_per_step = (first[-1]["time/elapsed_s"] - first[0]["time/elapsed_s"]) / (len(first) - 1)
    max_steps = min(400, max(10, math.ceil(15 / max(seconds_per_step, 1e-3))))

    log_path = tmp_path / "slurm.out"
    out_dir = tmp_path / "run"
    job_id = submit(cluster, log_path, [*tiny(), f"max_steps={max_steps}", f"out_dir={out_dir}"])
    wait_for(lambda: len(train_steps(read_metrics(out_dir))) >= 2, 180, "the first training steps", log_path)
    slurm(cluster, "scancel", "--signal=USR1", job_id)  # to every process of the job's steps, as SLURM does

    # train.py checkpoints and runs `scontrol requeue`: the job goes back to the queue, a restart counted.
    def requeued():  # counted as restarted, and done stopping its first run
        info = job_info(cluster, job_id)
        return info if info["Restarts"] == "1" and info["JobState"] not in ("COMPLETING", "REQUEUED") else None
    info = wait_for(requeued, 120, f"job {job_id} to be requeued", log_path)
    if info["JobState"] == "PENDING":  # SLURM holds a requeued job for 2 minutes (Reason=BeginTime): start it now
        slurm(cluster, "scontrol", "update", f"JobId={job_id}", "StartTime=now")

    info = wait_for(lambda: finished(cluster, job_id), 300, f"requeued job {job_id} to finish", log_path)
    log = log_path.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    assert f"job {job_id} (restart 1)" in log  # the same script ran again, appending to the same log
    stopped_at = int(re.search(r"stop signal received: checkpoint at step (\d+) ", log).group(1))
    assert f"requeued SLURM job {job_id}" in log
    # No task may die of the notice itself (srun reports "task N: User defined signal 1"): torchrun's default
    # reaction to SIGUSR1 is to exit, and on clusters that track a step by cgroup its workers die with it,
    # checkpoint unwritten. (This cluster tracks processes by parent links, so orphaned workers would
    # survive here: the log line is the evidence to check.)
    assert "User defined signal" not in log
    assert 0 < stopped_at < max_steps
    assert f"resumed from {out_dir / 'ckpt.pt'} at step {stopped_at}" in log
    # every step logged exactly once across the two runs, the resumed ones after the checkpoint's step
    assert train_steps(read_metrics(out_dir)) == list(range(1, max_steps + 1))


@needs_cluster
def test_hydra_sweep_runs_one_slurm_job_per_point(cluster, tmp_path):
    """configs/hydra/launcher/slurm.yaml: `train.py -m hydra/launcher=slurm` submits each point as a job."""
    sweep = [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null",
             "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path}",
             *tiny(), "max_steps=2", f"out_dir={tmp_path}/runs/lr_${{optim.lr}}", "optim.lr=1e-3,2e-3"]
    # (a folder per point named by its lr: ${run_name} would name it by every override, data.dir's long temporary
    # path included, past the 255 bytes a file name may have)
    result = subprocess.run(sweep, cwd=REPO_DIR, env=cluster, capture_output=True, text=True, timeout=300)
    # submitit pickles train.py's main (a __main__ function, so by value) with cloudpickle, which cannot
    # pickle torch.backends.* attribute modules referenced from it (a limitation of cloudpickle's)
    assert "cannot pickle" not in result.stderr, \
        "train.py must not touch torch.backends.* in __main__ (cloudpickle): " + result.stderr[-2000:]
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    # one run directory per point, each with its own learning rate and all of its steps
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    lrs = []
    for run in runs:
        config = (run / "config.yaml").read_text()
        lrs.append(float(re.search(r"^  lr: (\S+)$", config, re.MULTILINE).group(1)))
        assert train_steps(read_metrics(run)) == [1, 2]
    assert sorted(lrs) == [1e-3, 2e-3]
    # the jobs carried train.py's preemption contract
    submission = next((tmp_path / ".submitit").glob("*submission*.sh")).read_text()
    assert "#SBATCH --signal=USR1@120" in submission and "#SBATCH --requeue" in submission


@needs_cluster
def test_scancel_cancels_the_job_for_good(cluster, tmp_path):
    """scancel sends SIGTERM: train.py may checkpoint, but must not requeue, or no user could cancel a run."""
    log_path = tmp_path / "slurm.out"
    out_dir = tmp_path / "run"
    job_id = submit(cluster, log_path, [*tiny(), "max_steps=400", f"out_dir={out_dir}"])
    wait_for(lambda: len(train_steps(read_metrics(out_dir))) >= 2, 180, "the first training steps", log_path)
    slurm(cluster, "scancel", job_id)
    def settled():  # ended, or back in the queue
        info = job_info(cluster, job_id)
        return info if info["JobState"] in ENDED + ("PENDING",) else None
    info = wait_for(settled, 120, f"job {job_id} to end", log_path)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), \
        f"after scancel the job is {info['JobState']} with {info['Restarts']} restart(s): " \
        f"train.py requeued it on SIGTERM?\n{log_path.read_text()[-2000:]}"
    slurm(cluster, "scancel", job_id)  # if it was requeued after all, do not leave it pending


@needs_cluster
def test_a_node_that_never_joins_fails_the_job_with_a_message(cluster, tmp_path):
    """RDZV_TIMEOUT bounds the wait for the other nodes: an error that says so, not a job hanging forever."""
    # node n2's torchrun never starts: its python is a wrapper that sleeps first
    stalled_python = tmp_path / "python"
    stalled_python.write_text('#!/bin/bash\n'
                              'if [ "$SLURMD_NODENAME" = n2 ] && [ "$2" = torch.distributed.run ]; then sleep 300; fi\n'
                              f'exec {sys.executable} "$@"\n')
    stalled_python.chmod(0o755)
    env = {**cluster, "PYTHON": str(stalled_python), "RDZV_TIMEOUT": "10"}
    log_path = tmp_path / "slurm.out"
    job_id = submit(env, log_path, [*tiny(), "max_steps=2", f"out_dir={tmp_path / 'run'}"])
    info = wait_for(lambda: finished(cluster, job_id), 120, f"job {job_id} to give up", log_path)
    log = log_path.read_text()
    assert info["JobState"] == "FAILED", log[-3000:]
    assert "RendezvousTimeoutError" in log
    assert "not all 2 nodes joined within 10 s" in log


# -----------------------------------------------------------------------------------------------------
# scripts/study.py --launcher slurm: a study's runs as SLURM jobs (train.sbatch), collected into its record

@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    """The embedded corpus as characters (the smoke study's data), prepared in a temporary folder."""
    from data.shakespeare_char import prepare
    return prepare.prepare(tmp_path_factory.mktemp("shakespeare_char"))


def study_definition(tmp_path, char_data, **changes):
    """configs/study/smoke.yaml with its data in a temporary folder, changed as asked (top-level keys, or proxy keys
    given as proxy_<key>)."""
    import yaml
    spec = yaml.safe_load((REPO_DIR / "configs" / "study" / "smoke.yaml").read_text())
    proxy = spec["proxies"]["smoke"]
    proxy["overrides"] = [*proxy["overrides"], f"data.dir={char_data}"]
    for key, value in changes.items():
        if key.startswith("proxy_"):
            proxy[key.removeprefix("proxy_")] = value
        else:
            spec[key] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def study(env, *args, timeout=600):
    """scripts/study.py as users run it, from the repository root; returns its output (it must succeed)."""
    result = subprocess.run([sys.executable, "scripts/study.py", *map(str, args)], cwd=REPO_DIR, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def record_lines(out):
    import json
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def ledger_ids(out):
    import json
    ledger = out / "runs" / "slurm_jobs.jsonl"
    return [json.loads(line)["job_id"] for line in ledger.read_text().splitlines()] if ledger.exists() else []


@needs_cluster
def test_the_smoke_study_runs_on_slurm_and_a_second_invocation_submits_nothing(cluster, char_data, tmp_path):
    """configs/study/smoke.yaml through --launcher slurm: each run one train.sbatch job, collected from its run
    directory into the record with its job id, and reported; a second invocation submits nothing. A recorded run's
    command, run again without SLURM, gives its recorded loss (the reference)."""
    definition, out = study_definition(tmp_path, char_data), tmp_path / "out"
    common = [definition, "--launcher", "slurm", "--out", out]
    study(cluster, *common, "--phase", "sweep")
    study(cluster, *common, "--phase", "budgets")
    lines = record_lines(out)
    # 2 contenders x 2 lrs at 40 steps, then each best at 20 steps (its 40-step run is the sweep's)
    assert sorted((ln["contender"], ln["steps"]) for ln in lines) == [("adamw", 20), ("adamw", 40), ("adamw", 40),
                                                                      ("sophiag", 20), ("sophiag", 40), ("sophiag", 40)]
    assert len({ln["slurm_job_id"] for ln in lines}) == 6 and sorted(ledger_ids(out)) == sorted(ln["slurm_job_id"]
                                                                                                 for ln in lines)
    for line in lines:
        info = job_info(cluster, line["slurm_job_id"])
        assert info["JobState"] == "COMPLETED" and info["JobName"] == f"smoke:{line['key']}"
        events = read_metrics(out / "runs" / line["key"])
        evals = [[e["step"], e["val/loss"]] for e in events if "val/loss" in e]
        assert line["status"] == "finished" and line["curve"] == evals and evals[-1][0] == line["steps"]
        assert line["final_val_loss"] == evals[-1][1] and line["machine"].startswith("SLURM node(s) n")
    # the reference: the recorded command of one run, here without SLURM, into another folder
    line = lines[0]
    words = [w for w in shlex.split(line["command"]) if not w.startswith("out_dir=")][1:]  # OMP_NUM_THREADS=1 below
    subprocess.run([*words, f"out_dir={tmp_path / 'here'}"], cwd=REPO_DIR, check=True, capture_output=True,
                   env={**without_slurm_variables(os.environ), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert [e["val/loss"] for e in read_metrics(tmp_path / "here") if "val/loss" in e][-1] == line["final_val_loss"]

    again = study(cluster, *common, "--phase", "sweep") + study(cluster, *common, "--phase", "budgets")
    assert "submitted" not in again and again.count("in the record:") == 4  # the budgets phase lists its 4
    assert len(ledger_ids(out)) == 6 and len(record_lines(out)) == 6
    study(cluster, *common, "--phase", "report")
    import json
    report = json.loads((out / "report.json").read_text())["proxies"]["smoke"]
    assert report["contenders"]["sophiag"]["data_multiplier"]["budget_steps"] == 40
    assert report["tokens_per_step"] == 4 * 32 and (out / "report_smoke_budgets.png").is_file()


@needs_cluster
def test_a_study_waits_on_its_queued_job_and_resubmits_a_cancelled_one(cluster, char_data, tmp_path):
    """An invocation that dies leaves its job running: the next one waits on that job instead of submitting the run
    again; the job cancelled mid-way is submitted again (train.py resumes it), collected and recorded with the new
    job's id; a third invocation submits nothing."""
    steps = 1000  # a few seconds of steps: time to cancel the job mid-way
    definition = study_definition(tmp_path, char_data, max_extensions=0, ckpt_interval=50,
                                  proxy_steps=steps, proxy_budgets=[1],
                                  proxy_contenders={"adamw": {"preset": "shakespeare_char_adamw",
                                                              "grid": {"optim.lr": [1e-3]}}})
    out = tmp_path / "out"
    command = [sys.executable, "scripts/study.py", str(definition), "--launcher", "slurm", "--out", str(out),
               "--phase", "sweep"]
    run_dir = out / "runs" / "smoke" / "adamw" / f"lr0.001_steps{steps}_seed1337"
    log_path = Path(f"{run_dir}.log")
    first = subprocess.Popen(command, cwd=REPO_DIR, env=cluster, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        job_id = wait_for(lambda: (ledger_ids(out) or [None])[0], 60, "the first submission", log_path)
        wait_for(lambda: job_info(cluster, job_id)["JobState"] == "RUNNING", 120, f"job {job_id} to start", log_path)
    finally:
        first.terminate()  # the study's process dies; its job goes on
        first.wait(timeout=30)
    second = subprocess.Popen(command, cwd=REPO_DIR, env=cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        wait_for(lambda: len(train_steps(read_metrics(run_dir))) >= 2, 180, "the first training steps", log_path)
        assert job_info(cluster, job_id)["JobState"] == "RUNNING"
        slurm(cluster, "scancel", job_id)
        output, _ = second.communicate(timeout=400)
    finally:
        second.kill()
    assert second.returncode == 0, output[-4000:]
    assert f"running already (SLURM job {job_id}): smoke/adamw/lr0.001_steps{steps}_seed1337" in output
    assert job_info(cluster, job_id)["JobState"] == "CANCELLED"
    ids = ledger_ids(out)
    assert len(ids) == 2 and ids[0] == job_id  # submitted once by each: never twice while it ran
    (line,) = record_lines(out)
    assert line["slurm_job_id"] == ids[1] and job_info(cluster, ids[1])["JobState"] == "COMPLETED"
    # every logged step once (log_interval 5), the resumed ones after the checkpoint
    assert train_steps(read_metrics(run_dir)) == list(range(5, steps + 1, 5))
    assert line["final_val_loss"] == [e["val/loss"] for e in read_metrics(run_dir) if "val/loss" in e][-1]

    third = study(cluster, str(definition), "--launcher", "slurm", "--out", out, "--phase", "sweep")
    assert "submitted" not in third and ledger_ids(out) == ids and len(record_lines(out)) == 1
