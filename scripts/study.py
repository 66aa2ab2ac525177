"""
The optimizer study: does Sophia beat AdamW, and where does its gap close? One resumable engine for every scale (the
CPU proxies, their scale axes, GPT-2 small on a GPU cluster); what a study runs is its definition in
configs/study/NAME.yaml: the proxies (a preset and its overrides), the contenders and their grids, the budgets,
the seeds and the selection rules.

    python scripts/study.py configs/study/cpu.yaml --phase all --proxy char --jobs 2   # sweep, budgets, time, report
    python scripts/study.py configs/study/cpu.yaml --dry-run                 # the plan: its commands, estimated time
    python scripts/study.py configs/study/cpu.yaml --phase time --proxy char # on a quiet machine: seconds per step
    python scripts/study.py configs/study/cpu.yaml --phase report            # the report, from the record alone
    python scripts/study.py configs/study/cpu.yaml --phase verify --proxy char   # rerun recorded commands, compare
    python scripts/study.py configs/study/cpu.yaml --phase verify --against other/runs.jsonl  # another machine's record
    python scripts/study.py configs/study/smoke.yaml --launcher slurm --out out/smoke   # end to end in minutes
    python scripts/study.py configs/study/gpt2_small.yaml --launcher slurm --dry-run   # the paper-scale plan, GPU-hours

Phases:
  sweep    one seed at the sweep's budget over each contender's grid. A best point on the edge of its grid gets the
           next point beyond that edge, until it is inside (at most max_extensions per contender; the report says
           when that cap was hit). A contender with a regime (SophiaG: the blocks' mean win rate in 0.1-0.5) has
           its best chosen among the runs inside it.
  budgets  each contender's best setting at its proxy's budgets (multiples of the 1x budget), the baseline's also
           at baseline_budgets (each its own full schedule), every seed (the sweep's run is the first seed at 1x);
           a control contender only where it beats the baseline in the sweep.
  time     each contender's seconds per step at its best setting (Hessian refreshes included), one run at a time;
           locally refused when the load average exceeds --max-load: run it last, on a quiet machine.
  report   the record's statistics (scripts/compare.py --budgets): <report>.json, <report>.md and the plots, with
           the data multiplier of each contender along the scale axes where the study defines them.
  verify   (not part of `all`) rerun recorded commands, each on the code of its recorded commit (exported with
           git archive when HEAD is another), and print each final val loss beside the recorded one; exit 1 when one
           differs by more than --tolerance. --verify-runs N per contender, the cheapest first (0: every run).
           With --against FILE (a record the study wrote on another machine or checkout) it reruns nothing: it
           prints each run in both side by side, the median and largest difference, and the best settings in both.

--launcher local (default) runs --jobs train.py processes here; --launcher slurm submits each run as a job through
scripts/slurm/train.sbatch (the definition's slurm.sbatch options), waits for them, collects the finished runs from
their run directories (a shared filesystem) into the record with their "slurm_job_id", and submits a failed run
again up to slurm.retries times. Either way a run in the record is never run again, and a run already queued or
running on SLURM is waited on, not submitted twice: rerun the same command to resume.
--dry-run prints each run's command and the compute it needs: GPU-hours at the definition's stated MFU for a GPU
study, else minutes from the seconds the record measured (scaled by FLOPs for a proxy not measured yet), and the
plan of the whole study: the runs listed, the grid extensions and budgets still to come, the timing.
--out DIR puts the record, the report and the run directories under DIR (default: the definition's files, else
out/study/NAME); the published studies keep theirs in docs/.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import studylib  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="the study's definition, e.g. configs/study/cpu.yaml")
    parser.add_argument("--phase", default="all", choices=["sweep", "budgets", "time", "report", "all", "verify"])
    parser.add_argument("--launcher", default="local", choices=["local", "slurm"],
                        help="local: train.py processes here (default); slurm: one sbatch job per run")
    parser.add_argument("--out", type=Path, help="a folder for the record, the report and the run directories "
                                                 "(default: the definition's files, else out/study/NAME)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the runs to do with the compute they need, and the plan; run nothing")
    parser.add_argument("--proxy", help="one of the study's proxies (default: every one)")
    parser.add_argument("--contenders", help="comma-separated subset, e.g. adamw,sophiag (default: every one)")
    parser.add_argument("--jobs", type=int, default=2, help="local: runs side by side (default 2)")
    parser.add_argument("--max-load", type=float, default=0.5, help="time, local: refuse above this 1-minute load")
    parser.add_argument("--verify-runs", type=int, default=1,
                        help="verify: record lines to rerun per contender, the cheapest first (default 1; 0: all)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="verify: the largest difference from a recorded final val loss that passes (default 1e-4)")
    parser.add_argument("--against", type=Path,
                        help="verify: compare with this record (the study's runs.jsonl from another machine or "
                             "checkout) instead of rerunning")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs: give 1 or more")
    if args.against and (args.phase != "verify" or not args.against.is_file()):
        parser.error(f"--against {args.against}: give a runs.jsonl the study wrote, with --phase verify")
    try:
        study = studylib.select(studylib.load_study(args.study, args.out), args.proxy, args.contenders)
        return studylib.run_study(study, args)
    except studylib.StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
