"""Dispatch a validated config to the ranks: this machine (cluster=local) or Slurm (cluster=slurm)."""

from __future__ import annotations

import logging
from pathlib import Path

from launch.common import UserError, fail


def launch(prog: str, cfg, task: str) -> None:
    """Run ``task`` for ``cfg`` on the configured cluster; exits non-zero if any rank failed."""
    logging.getLogger("dpo_dist").info("%s %s: run directory %s", prog, task, Path(cfg.output_dir).resolve())
    if task in ("train", "precompute"):  # both write output_dir/config.yaml, which later jobs trust
        check_run_dir(cfg)
    if cfg.cluster.name == "slurm":
        from slurm.submit import SlurmJobFailed, SlurmSubmitFailed, inside_allocation, submit_and_wait

        if not inside_allocation():  # inside, this is a rank: the ranks check the data themselves
            check_data(cfg)
        try:
            submit_and_wait(cfg, task)
        except (SlurmJobFailed, SlurmSubmitFailed) as exc:  # sbatch refused it, or it ran and failed:
            fail(prog, str(exc), status=1)  # status 1, not the usage-error 2
        return
    from dpo_dist.launcher import LaunchError, run_local

    try:
        run_local(cfg, task)
    except LaunchError as exc:
        if exc.status == 2:
            raise UserError(str(exc)) from None  # the ranks' own line
        # Otherwise which rank died how, with its status: a crash (1) is not a usage error, and
        # a preemption (75) must stay 75 for whatever requeues the command.
        fail(prog, str(exc), status=exit_status(exc.status))


def check_run_dir(cfg) -> None:
    """``runinfo.check_same_run`` as a ``UserError``."""
    from dpo_dist.config import ConfigError
    from dpo_dist.runinfo import check_same_run

    try:
        check_same_run(cfg)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def check_data(cfg) -> None:
    """Read the data here before a Slurm job is queued: with ``data.on_invalid=error`` a bad record
    then stops the submission, not a job that waited for its GPUs (the ranks check it again, with
    the tokenizer)."""
    if cfg.data.on_invalid != "error":
        return
    from dpo_dist.data import DataError, load_preferences

    for path in dict.fromkeys(p for p in (cfg.data.train_path, cfg.data.eval_path) if p):
        try:
            load_preferences(path, "error")
        except DataError as exc:
            raise UserError(str(exc)) from None


def exit_status(status: int) -> int:
    """A rank's status as a process exit status: killed by signal N (negative) is 128 + N, as in a shell."""
    return 128 - status if status < 0 else status
