"""``dpo-report SWEEP_DIR``: a table of a sweep's runs and ``SWEEP_DIR/report.png``.

    dpo-report multirun/2026-11-25/14-02-11            # table + SWEEP_DIR/report.png
    dpo-report multirun/2026-11-25/14-02-11 --no-plot  # table only
    dpo-report outputs/run1 --out /tmp/run1.png        # a single run works too

For runs on Slurm whose ``status.json`` says they are still alive, the scheduler is asked (when
``scontrol``/``sacct`` are on PATH), so a job that died without a word shows as failed, cancelled,
timeout... Exit status: 0, or 2 (one line) when the directory holds no runs or the plot cannot be
written.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from launch.common import ArgumentParser

PROG = "dpo-report"


def _scheduler_state():
    """A ``job_id -> Slurm state`` lookup, or None where Slurm's commands are not installed."""
    if shutil.which("scontrol") is None and shutil.which("sacct") is None:
        return None
    from slurm.scheduler import SchedulerError, job_state

    def lookup(job_id: str) -> str | None:
        try:
            return job_state(job_id)
        except SchedulerError as exc:
            print(f"{PROG}: warning: {exc}", file=sys.stderr)
            return None

    return lookup


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, description="Tabulate and plot the runs of a sweep.")
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (or one run directory)")
    parser.add_argument("--out", type=Path, help="PNG path (default: SWEEP_DIR/report.png)")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    from dpo_dist.report import format_table, load_sweep, plot, table

    if not args.sweep_dir.is_dir():
        print(f"{PROG}: error: {args.sweep_dir}: not a directory", file=sys.stderr)
        return 2
    runs = load_sweep(args.sweep_dir, _scheduler_state())
    if not runs:
        print(f"{PROG}: error: {args.sweep_dir}: no run directories (with config.yaml or .hydra/)", file=sys.stderr)
        return 2
    print(format_table(*table(runs)))
    for run in runs:
        for note in run.notes:
            print(note)
    if not args.no_plot:
        out = args.out or args.sweep_dir / "report.png"
        try:
            plot(runs, out)
        except OSError as exc:  # e.g. --out in a directory that does not exist: one line, not a traceback
            print(f"{PROG}: error: {out}: cannot write the plot: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
