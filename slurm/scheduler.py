"""What dpo_dist asks Slurm directly: a job's state, and a requeue.

``scontrol`` answers from slurmctld's memory (exact, no lag) while the job is known there
(``MinJobAge`` after it ends); ``sacct`` answers later, from the accounting database, with a few
seconds of lag. :func:`job_state` tries them in that order.
"""

from __future__ import annotations

import re
import subprocess

# States after which a job will not run again by itself. PREEMPTED counts: a job that Slurm
# requeues after preemption shows REQUEUED/PENDING instead.
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "CANCELLED",
        "FAILED",
        "TIMEOUT",
        "NODE_FAIL",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "SPECIAL_EXIT",
    }
)


class SchedulerError(RuntimeError):
    """A Slurm command failed; the message names the command and its error."""


def _run(cmd: list[str], timeout: float = 60) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SchedulerError(f"`{' '.join(cmd)}` failed: {exc}") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise SchedulerError(f"`{' '.join(cmd)}` failed: {message[0] if message else f'status {done.returncode}'}")
    return done.stdout


def job_state(job_id: str) -> str | None:
    """The job's state word (``RUNNING``, ``PENDING``, ``COMPLETED``, ``CANCELLED``, ...), or None
    while Slurm does not know the job yet (accounting lags submission by a few seconds)."""
    try:
        out = _run(["scontrol", "show", "job", "-o", str(job_id)])
        match = re.search(r"\bJobState=(\S+)", out)
        if match:
            return match.group(1)
    except SchedulerError:
        pass  # purged from slurmctld (MinJobAge): ask accounting
    out = _run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", str(job_id)])
    for line in out.splitlines():
        jid, _, state = line.partition("|")
        if jid == str(job_id) and state:
            return state.split()[0]  # "CANCELLED by 0" -> "CANCELLED"
    return None


STUCK_REASONS = frozenset({
    "PartitionNodeLimit", "PartitionTimeLimit", "PartitionConfig", "InvalidAccount", "InvalidQOS",
    "QOSMaxNodePerJobLimit", "QOSMaxWallDurationPerJobLimit", "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob",
    "AssocMaxNodesPerJobLimit", "AssocMaxWallDurationPerJobLimit", "BadConstraints",
})  # fmt: skip
"""Pending reasons that do not clear by waiting: the job asks for more than its partition, QOS or
account allows, and only an administrator or a resubmission helps."""


def pending_reason(job_id: str) -> str | None:
    """Why a PENDING job waits (``Reason=`` of ``scontrol show job``), or None."""
    try:
        out = _run(["scontrol", "show", "job", "-o", str(job_id)])
    except SchedulerError:
        return None
    match = re.search(r"\bReason=(\S+)", out)
    return match.group(1) if match and match.group(1) != "None" else None


def is_terminal(state: str | None) -> bool:
    return state is not None and state.split()[0] in TERMINAL_STATES


def requeue(job_id: str) -> None:
    """Put a running job back in the queue (Slurm stops its tasks, then starts it again)."""
    _run(["scontrol", "requeue", str(job_id)])
