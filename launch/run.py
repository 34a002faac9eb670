"""Dispatch a validated config to the ranks: this machine (cluster=local) or Slurm (cluster=slurm)."""

from __future__ import annotations

import logging
from pathlib import Path

from launch.common import UserError


def launch(prog: str, cfg, task: str) -> None:
    """Run ``task`` for ``cfg`` on the configured cluster; exits non-zero if any rank failed."""
    logging.getLogger("dpo_dist").info("%s %s: run directory %s", prog, task, Path(cfg.output_dir).resolve())
    if cfg.cluster.name == "slurm":
        from launch.common import fail
        from slurm.submit import SlurmJobFailed, SlurmSubmitFailed, submit_and_wait

        try:
            submit_and_wait(cfg, task)
        except (SlurmJobFailed, SlurmSubmitFailed) as exc:  # sbatch refused it, or it ran and failed:
            fail(prog, str(exc), status=1)  # status 1, not the usage-error 2
        return
    from dpo_dist.launcher import LaunchError, run_local

    try:
        run_local(cfg, task)
    except LaunchError as exc:
        raise UserError(str(exc)) from None  # a user error's own line, or which rank died how
