"""
Do the tests fail when the code is wrong? Apply each breakage below to a copy of the repository (the working
tree as it is, uncommitted changes included) and run the tests that must catch it: a breakage is caught when they
fail (pytest's exit status 1). CPU heavy: it runs the tests of every breakage.

    python scripts/check_breakages.py                  # every breakage
    python scripts/check_breakages.py --only bs        # the ones whose name contains "bs"
    python scripts/check_breakages.py --baseline       # also run the tests on the unbroken copy first
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]

# name, file, the code as it is, the broken code, the tests (pytest arguments) that must fail
BREAKAGES = [
    ("2 x bs passed to Sophia's step", "train.py",
     'run.optimizer.step(**({"bs": plan.step_bs}',
     'run.optimizer.step(**({"bs": 2 * plan.step_bs}',
     ["tests/test_train.py", "-k", "official_loop"]),
    ("the Hessian refreshed every step instead of every k", "train.py",
     "if plan.sophia and progress.step % k == k - 1:",
     "if plan.sophia:",
     ["tests/test_train.py", "-k", "official_loop"]),
    ("the W&B group dropped", "metrics.py",
     "group=cfg.wandb.group or cfg.model.name,",
     "",
     ["tests/test_wandb.py", "-k", "offline"]),
    ("no save on a stop signal", "train.py",
     "saved = save_run(run, clock.elapsed())",
     "saved = True",
     ["tests/test_train.py", "-k", "signal_checkpoints"]),
    ("dropout from a running generator, not (seed, step, micro-batch)", "train.py",
     'torch.manual_seed(random_seed(cfg.seed, progress.step, chunk, "dropout"))',
     "pass  # the generator seeded once at build_run",
     ["tests/test_train.py", "-k", "resume_continues_exactly and adamw"]),
    # the checkpoint does not record its world size: a run resumed on one process stands for "another world size"
    # in the test below, whose checkpoint two ranks wrote
    ("a DDP checkpoint resumed on another world size, the data counter off by one micro-batch", "build.py",
     "progress = Progress.from_checkpoint(ckpt)",
     "progress = Progress.from_checkpoint(ckpt)\n"
     "        if env.world_size == 1:\n"
     "            progress.train_seqs += cfg.micro_batch_size",
     ["tests/test_train.py", "-k", "two_ranks"]),
]


def copy_of_the_repo(where):
    """The working tree's files that git tracks or would track (not ignored ones: runs, prepared data)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_DIR,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO_DIR / name
        if source.is_file():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, where / name)
    return where


def run_tests(repo, tests):
    """pytest's exit status and the tail of its output: 0 passed, 1 some failed, other: it could not run."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=repo,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return result.returncode, (result.stdout.strip() or result.stderr.strip()).splitlines()[-1:]  # pytest's summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--only", default="", help="run the breakages whose name contains this")
    parser.add_argument("--baseline", action="store_true", help="first check that the tests pass unbroken")
    args = parser.parse_args()
    chosen = [b for b in BREAKAGES if args.only in b[0]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="breakages-") as tmp:
        for name, file, good, bad, tests in chosen:
            repo = copy_of_the_repo(Path(tmp) / f"repo{len(rows)}")
            if args.baseline:
                status, tail = run_tests(repo, tests)
                if status != 0:
                    rows.append((name, "BASELINE FAILS", " ".join(tests), tail))
                    continue
            path = repo / file
            code = path.read_text()
            if code.count(good) != 1:
                rows.append((name, "NOT APPLIED", " ".join(tests), [f"{good!r} is not once in {file}"]))
                continue
            path.write_text(code.replace(good, bad))
            status, tail = run_tests(repo, tests)
            verdict = {0: "MISSED", 1: "caught"}.get(status, f"ERROR (pytest exit {status})")
            rows.append((name, verdict, " ".join(tests), tail))
            print(f"{verdict:8}  {name}  ({' '.join(tests)}: {' '.join(tail)})", flush=True)
            shutil.rmtree(repo, ignore_errors=True)
    print("\n| breakage | result | tests |\n|---|---|---|")
    for name, verdict, tests, _ in rows:
        print(f"| {name} | {verdict} | `{tests}` |")
    sys.exit(0 if all(verdict == "caught" for _, verdict, _, _ in rows) else 1)


if __name__ == "__main__":
    main()
