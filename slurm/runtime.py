"""Inside a Slurm allocation: every task of the job is one rank and runs this.

Two ways lead here, both on every Slurm task of the job:

- ``cluster=slurm`` single jobs: submitit runs :class:`SlurmTask` (``OUTPUT_DIR/config.yaml``, task).
- Sweeps: hydra-submitit-launcher runs the Hydra task of a sweep point, which reaches
  ``slurm.submit.submit_and_wait``; that sees it is already inside an ``srun`` step and calls
  :func:`run_in_allocation` instead of submitting again.

What happens here (see ``slurm/submit.py`` for the whole design):

1. torchrun-style variables from Slurm's (``dpo_dist.distributed.export_slurm_env``), threads =
   ``SLURM_CPUS_PER_TASK``, rank-tagged logging;
2. ``dpo_dist.worker.run_task(cfg, task)``;
3. ``OUTPUT_DIR/status.json`` (rank 0, plus any failing rank) says ``running``, ``done``,
   ``failed`` (with the error), ``requeued`` or ``preempted`` (not requeued, with why), so the
   submitting process and ``dpo-report`` can tell what happened without the scheduler;
4. preemption: the engine checkpoints and raises ``Preempted``; rank 0 requeues the job (bounded
   by ``cluster.max_requeues``, and only while Slurm still calls it RUNNING: a cancelled or
   timed-out job is never brought back), then every rank exits with status 75;
5. failure: the error is recorded, and the rank exits non-zero, so ``srun --kill-on-bad-exit``
   stops its peers at once instead of leaving them blocked in a collective.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from slurm.scheduler import SchedulerError, job_state, requeue

log = logging.getLogger("dpo_dist.slurm")

STATUS_FILE = "status.json"
FAILED_EXIT_CODE = 1
USER_ERROR_EXIT_CODE = 2  # as dpo_dist.worker: the message says what to fix


class SlurmTask:
    """The callable submitit runs on every task of a ``cluster=slurm`` job.

    Pickled by reference (module ``slurm.runtime``), so the job needs this repository importable,
    and it carries only the config path: the job reads the same ``config.yaml`` a hand-written
    ``srun python -m dpo_dist.worker`` would.
    """

    def __init__(self, config_path: str, task: str):
        self.config_path = config_path
        self.task = task

    def __call__(self) -> Any:
        from dpo_dist.runinfo import read_config

        return run_in_allocation(read_config(self.config_path), self.task)

    def __repr__(self) -> str:
        return f"SlurmTask({self.config_path!r}, {self.task!r})"


class RunStatus:
    """``OUTPUT_DIR/status.json``: the last thing this Slurm run reported about itself."""

    def __init__(self, output_dir: str | os.PathLike, rank: int, job_id: str | None):
        self.path = Path(output_dir) / STATUS_FILE
        self.rank, self.job_id = rank, job_id

    def write(self, state: str, message: str = "", **extra: Any) -> None:
        """Record ``state``; a ``failed`` record is never replaced by a later one of the same run.

        When one rank fails, its peers fail next with secondary errors ("connection closed by
        peer"): the first failure is the cause, so it is the one kept.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = read_status(self.path.parent)
            if state == "failed" and current and current.get("state") == "failed" and self._same_run(current):
                return
            self._write(state, message, extra)

    def _same_run(self, record: dict[str, Any]) -> bool:
        return record.get("job_id") == self.job_id and record.get("restarts") == restart_count()

    def _write(self, state: str, message: str, extra: dict[str, Any]) -> None:
        body = {
            "state": state,
            "job_id": self.job_id,
            "restarts": restart_count(),
            "rank": self.rank,
            "message": message,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{self.rank}.tmp")
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        os.replace(tmp, self.path)


def read_status(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(output_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def restart_count() -> int:
    """How many times Slurm has requeued this job (0 on the first run)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def run_in_allocation(cfg, task: str) -> Any:
    """Run ``task`` as this Slurm task's rank; returns its result, or exits (see the module doc)."""
    from dpo_dist.runinfo import RunDirInUse, claim_run_dir, write_config

    env = _prepare_rank(cfg)
    status = RunStatus(cfg.output_dir, env.rank, env.slurm_job_id)
    in_use = False
    if env.is_main and task == "train":
        # Before writing anything there: if another job holds output_dir, this job writes nothing
        # into it, and train() raises the refusal on every rank (claim_run_dir remembers it).
        try:
            claim_run_dir(cfg.output_dir)
        except RunDirInUse:
            in_use = True
    if env.is_main and not in_use:
        write_config(cfg)  # a sweep point has none yet; a single job rewrites the same content
        status.write("running", f"{task} on {env.world_size} rank(s)")
    _install_early_preemption_handler(cfg, env, status)

    from dpo_dist import distributed as D
    from dpo_dist.checkpoint import Preempted
    from dpo_dist.worker import PREEMPTED_EXIT_CODE, first_line, run_task, user_error_message

    try:
        result = run_task(cfg, task)
    except Preempted as exc:
        _requeue_after_checkpoint(cfg, env, status, exc.step)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    except Exception as exc:
        message = user_error_message(exc, cfg)
        if message is not None:
            if not isinstance(exc, RunDirInUse):  # the status there is the other job's
                status.write("failed", f"rank {env.rank}: {message}")
            print(f"dpo_dist: error: {message}", file=sys.stderr)
            raise SystemExit(USER_ERROR_EXIT_CODE) from None
        # a bug: keep the traceback in the task's log
        status.write("failed", f"rank {env.rank}: {type(exc).__name__}: {first_line(exc)}")
        traceback.print_exc()
        raise SystemExit(FAILED_EXIT_CODE) from None
    finally:
        D.destroy()
        sys.stdout.flush()
        sys.stderr.flush()
    if env.is_main:
        status.write("done", f"{task} finished")
    return result


def _prepare_rank(cfg):
    """torchrun variables from Slurm's, thread count, logging; returns this task's DistEnv."""
    # Before torch is imported: intra-op threads beyond the task's CPUs only oversubscribe them.
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        os.environ.setdefault("OMP_NUM_THREADS", os.environ["SLURM_CPUS_PER_TASK"])
    from dpo_dist import distributed as D
    from dpo_dist.worker import setup_rank_logging

    setup_rank_logging(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0")
    return D.export_slurm_env(cfg.cluster.master_port) or D.detect_env()


def request_requeue(max_requeues: int) -> tuple[bool, str]:
    """Ask Slurm to requeue this job; returns (requeued, why) and never raises.

    Requeues only a job Slurm still calls RUNNING: a warning signal (``--signal``, or
    ``scancel --signal``) leaves a job running, while ``scancel`` and the time limit have already
    ended it, and ``scontrol requeue`` would bring even a cancelled job back.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False, "not requeued: SLURM_JOB_ID is not set"
    restarts = restart_count()
    if restarts >= max_requeues:
        return False, (
            f"not requeued: requeued {restarts} time(s) already, cluster.max_requeues={max_requeues}; "
            "run the same command again to resume"
        )
    try:
        state = job_state(job)
        if state != "RUNNING":
            return False, f"not requeued: Slurm reports the job {state} (cancelled or out of time)"
        requeue(job)
    except SchedulerError as exc:
        return False, f"not requeued: {exc}"
    return True, f"requeued (restart {restarts + 1} of at most {max_requeues})"


def _requeue_after_checkpoint(cfg, env, status: RunStatus, step: int) -> None:
    """Rank 0 requeues after the engine's preemption checkpoint; every rank then leaves."""
    from dpo_dist import distributed as D
    from dpo_dist.worker import first_line

    if env.is_main:
        requeued, why = request_requeue(cfg.cluster.max_requeues)
        status.write("requeued" if requeued else "preempted", f"checkpoint at step {step} saved; {why}", step=step)
        log.warning("preempted: checkpoint at step %d saved; %s", step, why)
    # No rank may exit before rank 0 has asked for the requeue: with --kill-on-bad-exit another
    # rank's exit would make srun kill rank 0 first, and the job would end instead.
    try:
        D.barrier()
    except Exception as exc:  # noqa: BLE001 - the requeue is already stopping the peers
        log.warning("barrier after the preemption checkpoint failed (%s); exiting anyway", first_line(exc))


def _install_early_preemption_handler(cfg, env, status: RunStatus) -> None:
    """Handle a warning signal that arrives before the engine installs its own handler.

    submitit installs a USR2 handler that requeues without any bound; this one applies
    ``cluster.max_requeues``. Nothing needs saving yet (the engine's handler replaces this one
    before the first step, and the reference cache keeps finished shards), so rank 0 requeues
    and exits; the requeue stops the other ranks.
    """

    from dpo_dist.worker import PREEMPTED_EXIT_CODE

    def handle(signum, _frame) -> None:
        name = signal.Signals(signum).name
        if not env.is_main:
            log.warning("received %s before training started; rank 0 requeues the job", name)
            return
        requeued, why = request_requeue(cfg.cluster.max_requeues)
        status.write("requeued" if requeued else "preempted", f"{name} with nothing to checkpoint yet; {why}", step=0)
        log.warning("received %s with nothing to checkpoint yet; %s", name, why)
        raise SystemExit(PREEMPTED_EXIT_CODE)

    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, handle)
