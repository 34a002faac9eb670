"""``cluster=slurm``: submit through submitit, wait, report; and how preemption becomes a requeue.

Design
------
Submission (``dpo-train ... cluster=slurm``). The submitting process writes the resolved
``OUTPUT_DIR/config.yaml`` and submits one sbatch job (``cluster.nodes`` x ``cluster.tasks_per_node``
tasks, one rank each) whose tasks run ``slurm.runtime.SlurmTask``: torchrun variables from
Slurm's (master = the step's first node, resolved through Slurm when its name does not resolve;
port = ``cluster.master_port + (16 * SLURM_JOB_ID + SLURM_STEP_ID) % 1000``), then ``dpo_dist.worker.run_task(cfg, task)``.
Every ``srun`` runs with ``SLURM_KILL_BAD_EXIT=1`` (``--kill-on-bad-exit``): one failed rank
ends the job at once. The submitting process then waits
(polling ``scontrol``/``sacct``: submitit's own watcher can take minutes to notice a failure),
prints the job id and its log folder ``OUTPUT_DIR/slurm/JOBID/``, and exits non-zero with one
line (from ``OUTPUT_DIR/status.json``) if the job failed.

In-allocation detection. Code that runs inside an ``srun`` step (``SLURM_JOB_ID`` and
``SLURM_STEP_ID`` set; the batch script has no step id) never submits: :func:`submit_and_wait`
runs the rank right there. That is what makes sweeps work (below), and also a hand-written
``srun dpo-train cluster=slurm ...``.

Sweeps (``dpo-train -m loss.beta=0.05,0.1 optim.lr=1e-6,5e-6 cluster=slurm``). ``cluster`` is a
config group and cannot select Hydra's launcher, so ``launch.common.hydra_main`` does: when the
sweep's composed configs say ``cluster.name=slurm`` it adds ``hydra/launcher=dpo_slurm``
(``conf/hydra/launcher/dpo_slurm.yaml``: hydra-submitit-launcher's ``submitit_slurm``, logs in
``SWEEP_DIR/slurm/``) and ``hydra.launcher.*`` overrides from :func:`launcher_overrides`, the same
:func:`executor_parameters` a single job uses. (A subclass of the launcher would be neater, but
Hydra only instantiates launchers from the ``hydra_plugins`` namespace package.) All points go out
as one job array; on every task of an array element Hydra runs the usual task function, which
reaches :func:`submit_and_wait` inside the allocation and runs the rank. Sweeping a ``cluster.*``
key is refused (one array, one resource shape). The points share one reference cache (its
directory derives from the model/data fingerprint, not from beta or lr) and its lock: one job
computes, the others wait and reuse it; each ``run_info.json`` says which.

Preemption and requeue. The engine owns the preemption signal: its handler (SIGUSR1/USR2/TERM)
only sets a flag, the ranks agree on it at the end of the step, save a complete checkpoint and
raise ``Preempted``. submitit's own USR2 handler would instead call ``checkpoint()`` and requeue
*immediately*, mid-step, without the engine's checkpoint; so ``SlurmTask`` has no ``checkpoint()``
method and the engine's handler, installed later, replaces submitit's. After ``Preempted``, rank 0
runs ``scontrol requeue`` itself (``slurm.runtime``), if the job has been requeued fewer than
``cluster.max_requeues`` times (``SLURM_RESTART_COUNT``) and Slurm still reports it RUNNING. That
last check matters: a warning signal (``#SBATCH --signal=USR2@<delay>`` before the time limit, or
``scancel --signal=USR2``) leaves the job RUNNING, whereas ``scancel`` marks it CANCELLED before
its SIGTERM arrives, and ``scontrol requeue`` would bring even a cancelled job back. The other
ranks wait at a barrier until the requeue has been requested (otherwise the first rank to exit
would make srun kill rank 0 before it asks), then all exit with status 75 and no submitit
result, so the waiting client keeps waiting. A sweep waits for all its points the same way
(:func:`report_sweep_failures`) and, if any failed, exits 1 with one line naming each failed point,
why (as for a single job) and its log. The requeued job (same id, same pickled
task) resumes from the newest complete checkpoint in ``output_dir``: same data position, RNG and
optimizer state, so its losses equal an uninterrupted run's. A warning that arrives before the
engine's handler exists (start-up) requeues at once, under the same bound: nothing is lost yet.
Jobs carry ``--requeue`` so a cluster with ``JobRequeue=0`` still allows it.

Failures. If ``sbatch`` refuses the job (no controller reachable, a bad partition or account) or
is not on PATH, the submitting process exits 1 with one line carrying sbatch's own reason
(:func:`sbatch_errors`; a sweep's array likewise). A rank that fails writes ``status.json`` (``failed`` + its error) and exits non-zero;
``--kill-on-bad-exit`` stops the others; collectives also time out
(``deepspeed.comm_timeout_minutes``), so nothing hangs.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slurm.runtime import read_status
from slurm.scheduler import STUCK_REASONS, SchedulerError, is_terminal, job_state, pending_reason

POLL_S = 1.0
STATE_POLL_S = 5.0


class SlurmJobFailed(RuntimeError):
    """A Slurm job (or sweep point) ended without finishing; the message is one line."""


class SlurmSubmitFailed(RuntimeError):
    """sbatch refused the job (no controller, bad partition, no sbatch at all); one line."""


def sbatch_error_line(stderr: str) -> str:
    """The line of sbatch's stderr that says why: its ``fatal:`` line if any (the earlier lines
    of a missing configuration are DNS lookups), else the first."""
    lines = [ln.strip() for ln in str(stderr).splitlines() if ln.strip()]
    fatal = [ln for ln in lines if ln.startswith("sbatch: fatal:")]
    return (fatal or lines or ["sbatch failed without a message"])[0]


def require_slurm_commands() -> None:
    """Raise :class:`SlurmSubmitFailed` unless ``sbatch`` and ``srun`` are on PATH (submitit
    needs both; without them it fails with a traceback)."""
    missing = [name for name in ("sbatch", "srun") if shutil.which(name) is None]
    if missing:
        raise SlurmSubmitFailed(
            f"Slurm submission failed: no {' or '.join(missing)} on PATH (not a Slurm submit host?)"
        )


@contextlib.contextmanager
def sbatch_errors():
    """Turn a failed ``sbatch`` under submitit (its multi-line FailedJobError, or no sbatch on
    PATH) into :class:`SlurmSubmitFailed` with sbatch's own one-line reason. submitit also
    echoes sbatch's stderr before raising; that copy is held back (the one line says it)."""
    from submitit.core.utils import FailedJobError

    require_slurm_commands()
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except FailedJobError as exc:
        raise SlurmSubmitFailed(f"Slurm submission failed: {sbatch_error_line(str(exc))}") from None
    sys.stderr.write(held.getvalue())  # a successful submission's own output is not lost


def inside_allocation() -> bool:
    """True in a task of an ``srun`` step: this process is a rank and must not submit again."""
    if not os.environ.get("SLURM_JOB_ID"):
        return False
    from dpo_dist.distributed import in_slurm_step  # imports torch: only inside a job

    return in_slurm_step()


def executor_parameters(cluster, name: str) -> dict[str, Any]:
    """``submitit.SlurmExecutor.update_parameters`` arguments for a ``ClusterConfig``."""
    params: dict[str, Any] = {
        "job_name": name,
        "nodes": cluster.nodes,
        "ntasks_per_node": cluster.tasks_per_node,
        "cpus_per_task": cluster.cpus_per_task,
        "time": cluster.time,
        # A short job must not spend most of its time being warned.
        "signal_delay_s": min(cluster.signal_delay_s, cluster.time * 60 // 4),
        # srun's --kill-on-bad-exit: one failed rank ends the step instead of leaving its peers
        # blocked in a collective (an environment variable, so sweeps can set it too).
        "setup": ["export SLURM_KILL_BAD_EXIT=1"],
        # Later keys win: cluster.additional_parameters can override even these (e.g. signal).
        "additional_parameters": {"requeue": True, **dict(cluster.additional_parameters)},
    }
    if cluster.gpus_per_node:
        params["gpus_per_node"] = cluster.gpus_per_node
    if cluster.mem_gb:
        params["mem"] = f"{math.ceil(cluster.mem_gb * 1024)}M"  # 0 = partition default; --mem=0 means all
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cluster, key):
            params[key] = getattr(cluster, key)
    return params


# executor_parameters() key -> hydra-submitit-launcher key (hydra/launcher=submitit_slurm).
_LAUNCHER_KEYS = {
    "nodes": "nodes",
    "ntasks_per_node": "tasks_per_node",
    "cpus_per_task": "cpus_per_task",
    "time": "timeout_min",
    "signal_delay_s": "signal_delay_s",
    "setup": "setup",
    "additional_parameters": "additional_parameters",
    "gpus_per_node": "gpus_per_node",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
}


def launcher_overrides(cluster) -> list[str]:
    """``hydra.launcher.*`` overrides that give a sweep's job array the resources a single
    ``cluster=slurm`` job would get (the same :func:`executor_parameters`)."""
    params = executor_parameters(cluster, name="")
    params.pop("job_name")  # Hydra names the array after hydra.job.name
    if "mem" in params:  # the launcher only knows whole GB; sbatch takes the exact value
        params["additional_parameters"] = {"mem": params.pop("mem"), **params["additional_parameters"]}
    # `++` sets the key whether or not the launcher's schema already holds it (additional_parameters
    # is a struct dict: a plain override could not add keys to it).
    overrides = [f"++hydra.launcher.{_LAUNCHER_KEYS[k]}={_override_literal(v)}" for k, v in params.items()]
    overrides.append(f"++hydra.launcher.max_num_timeout={cluster.max_requeues}")
    return overrides


def _override_literal(value: Any) -> str:
    """``value`` in Hydra's override grammar (strings quoted, so any text survives)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as a Hydra override")


def make_executor(folder: str | os.PathLike, cluster, name: str, **extra: Any):
    """A submitit Slurm executor writing its pickles and logs under ``folder`` (``%j`` = job id)."""
    import submitit

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cluster.max_requeues)
    executor.update_parameters(**executor_parameters(cluster, name), **extra)
    return executor


def submit_and_wait(cfg, task: str) -> Any:
    """Run ``task`` for ``cfg`` on Slurm and wait; inside an allocation, run this rank instead.

    Raises :class:`SlurmJobFailed` (one line) if the job ends without finishing.
    """
    if inside_allocation():
        from slurm.runtime import run_in_allocation

        if os.environ.get("SLURM_PROCID") == "0":
            print(
                f"inside Slurm job {os.environ['SLURM_JOB_ID']} (an srun step of {os.environ.get('SLURM_NTASKS')} "
                "task(s)): each task runs as one rank here instead of submitting a new job",
                flush=True,
            )
        return run_in_allocation(cfg, task)
    from dpo_dist.runinfo import write_config
    from slurm.runtime import SlurmTask

    config_path = write_config(cfg).resolve()
    folder = config_path.parent / "slurm" / "%j"
    cluster = cfg.cluster
    with sbatch_errors():
        executor = make_executor(folder, cluster, f"dpo-{task}")
        job = executor.submit(SlurmTask(str(config_path), task))
    print(
        f"submitted Slurm job {job.job_id} ({cluster.nodes} node(s) x {cluster.tasks_per_node} task(s)); "
        f"logs: {job.paths.folder}/",
        flush=True,
    )
    try:
        wait_for_jobs([job])
    except KeyboardInterrupt:
        print(f"\nSlurm job {job.job_id} keeps running (scancel {job.job_id} stops it)", file=sys.stderr)
        sys.exit(130)
    outcome = job_outcome(job, cfg.output_dir)
    if not outcome.ok:
        raise SlurmJobFailed(outcome.message)
    print(f"Slurm job {job.job_id} done: {cfg.output_dir}", flush=True)
    return outcome.results[0]


def report_sweep_failures(on_failure: Callable[[str], None]) -> None:
    """Make a Slurm sweep wait like a single job and end failed points with one line.

    hydra-submitit-launcher submits the array with ``AutoExecutor.map_array``, then reads each
    point's result through submitit's watcher (minutes to notice a failure) and raises submitit's
    multi-line error at the first failed point, which Hydra prints as a traceback. It is a Hydra
    plugin, so it cannot be subclassed from here; instead ``map_array`` is wrapped while its
    ``launch`` runs: after submitting, every point is awaited with :func:`wait_for_jobs` (Slurm
    polling), and if any failed, ``on_failure`` gets one line naming each failed point (its swept
    values, why, and its log) and must not return (``launch.common.fail``)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

    launch = BaseSubmititLauncher.launch
    if getattr(launch, "reports_failures", False):
        return

    def launch_and_report(self, job_overrides, initial_job_idx):
        submit = submitit.AutoExecutor.map_array
        sweep_dir = Path(str(self.config.hydra.sweep.dir))

        def map_array_and_wait(executor, fn, *iterables):
            try:
                with sbatch_errors():
                    jobs = submit(executor, fn, *iterables)
            except SlurmSubmitFailed as exc:
                on_failure(str(exc))
                raise  # on_failure does not return; if it does, the error still stands
            array = str(jobs[0].job_id).split("_")[0]
            print(f"submitted Slurm job array {array} ({len(jobs)} sweep points); logs: {jobs[0].paths.folder.parent}/", flush=True)
            wait_for_jobs(jobs)
            swept = _swept_values(job_overrides)
            failed = []
            for offset, job in enumerate(jobs):
                outcome = job_outcome(job, sweep_dir / str(initial_job_idx + offset))
                if not outcome.ok:
                    failed.append(f"point {initial_job_idx + offset} ({swept[offset]}): {outcome.message}")
            if failed:
                on_failure(f"{len(failed)} of {len(jobs)} sweep points failed: " + "; ".join(failed))
            return jobs

        try:
            require_slurm_commands()  # before the launcher's executor asks for srun with a traceback
        except SlurmSubmitFailed as exc:
            on_failure(str(exc))
            raise
        original = submitit.AutoExecutor.map_array
        submitit.AutoExecutor.map_array = map_array_and_wait
        try:
            return launch(self, job_overrides, initial_job_idx)
        finally:
            submitit.AutoExecutor.map_array = original

    launch_and_report.reports_failures = True
    BaseSubmititLauncher.launch = launch_and_report


def _swept_values(job_overrides) -> list[str]:
    """Per sweep point, the ``key=value`` overrides that differ between points."""
    points = [dict(o.split("=", 1) for o in overrides if "=" in o) for overrides in job_overrides]
    keys = [k for k in points[0] if len({p.get(k) for p in points}) > 1] if len(points) > 1 else []
    return [" ".join(f"{k}={p[k]}" for k in keys) or "the only point" for p in points]


# ----------------------------------------------------------------------------- waiting


def _task_jobs(job) -> list:
    return [job.task(i) for i in range(job.num_tasks)]


def wait_for_jobs(jobs: list, poll_s: float = POLL_S, state_poll_s: float = STATE_POLL_S) -> None:
    """Block until every job has a result from each task or has ended in Slurm.

    A result file is checked every ``poll_s``; the scheduler, every ``state_poll_s``. Requeued
    jobs are PENDING/RUNNING again, so waiting continues across requeues.
    """
    pending = list(jobs)
    last_state_poll = 0.0
    while pending:
        poll_states = time.monotonic() - last_state_poll >= state_poll_s
        if poll_states:
            last_state_poll = time.monotonic()
        pending = [job for job in pending if not _finished(job, poll_states)]
        if pending:
            time.sleep(poll_s)


def _finished(job, poll_state: bool) -> bool:
    if all(t.paths.result_pickle.exists() for t in _task_jobs(job)):
        return True
    if not poll_state:
        return False
    try:
        state = job_state(job.job_id)
    except SchedulerError as exc:
        print(f"warning: {exc}; retrying", file=sys.stderr)
        return False
    if state == "PENDING":
        _warn_if_stuck(job)
    return is_terminal(state)


_WARNED: set[tuple[str, str]] = set()


def _warn_if_stuck(job) -> None:
    """Say once when a pending job waits for something waiting cannot bring (PartitionNodeLimit:
    more nodes than its partition has): the command would otherwise wait in silence."""
    reason = pending_reason(job.job_id)
    if reason in STUCK_REASONS and (job.job_id, reason) not in _WARNED:
        _WARNED.add((job.job_id, reason))
        print(
            f"warning: Slurm job {job.job_id} is pending with reason {reason}: it cannot start until an "
            f"administrator changes that limit; scancel {job.job_id} and resubmit within it "
            "(cluster.nodes, cluster.time, cluster.partition, cluster.account, cluster.qos)",
            file=sys.stderr,
            flush=True,
        )


# ----------------------------------------------------------------------------- outcome


@dataclass
class Outcome:
    """How a finished job ended: ``ok`` with every task's result, or a one-line ``message``."""

    ok: bool
    results: list
    message: str = ""


def job_outcome(job, output_dir: str | os.PathLike) -> Outcome:
    """Results of every task if all succeeded, else why not (status.json, submitit error, Slurm state)."""
    from submitit.core.utils import pickle_load

    results, errors = [], []
    for rank, task_job in enumerate(_task_jobs(job)):
        path = task_job.paths.result_pickle
        if not path.exists():
            results.append(None)
            continue
        kind, value = pickle_load(path)
        results.append(value if kind == "success" else None)
        if kind != "success":
            errors.append((rank, str(value).strip().splitlines()[-1]))
    if all(r is not None for r in results) and not errors:
        return Outcome(True, results)
    return Outcome(False, results, _failure_message(job, output_dir, errors))


def _failure_message(job, output_dir, errors: list[tuple[int, str]]) -> str:
    try:
        state = job_state(job.job_id) or "UNKNOWN"
    except SchedulerError:
        state = "UNKNOWN"
    status = read_status(output_dir)
    tasks = _task_jobs(job)
    errored = {rank for rank, _ in errors}
    killed = _first_srun_failure(tasks[0].paths.stderr)
    signalled = killed is not None and "Exited with exit code" not in killed[1]  # else it ended itself
    if signalled and killed[0] not in errored and not tasks[min(killed[0], job.num_tasks - 1)].paths.result_pickle.exists():
        # The first task srun saw end was killed without a word of its own (out of memory, a
        # signal, its node): the other ranks' errors ("Connection closed by peer") are the consequence.
        rank, detail = killed[0], f"rank {killed[0]}: ended without a result ({killed[1]})"
    elif status and str(status.get("job_id")) == str(job.job_id) and status.get("state") in ("failed", "preempted"):
        detail, rank = status.get("message") or status["state"], int(status.get("rank") or 0)
    elif errors:
        # The rank srun saw fail first, else the lowest: the others may be dying of its absence.
        rank, message = next(((r, m) for r, m in errors if killed and r == killed[0]), errors[0])
        detail = f"rank {rank}: {message}"
    else:
        rank, detail = 0, "ended without a result"
    log = tasks[min(rank, job.num_tasks - 1)].paths.stderr
    return f"Slurm job {job.job_id} {state}: {detail} (log: {log})"


def _first_srun_failure(stderr: Path) -> tuple[int, str] | None:
    """The first task srun reported ending badly, from task 0's log (srun writes there, in the
    order it saw them): ``srun: error: n2: task 1: Killed`` gives (1, "srun: n2: task 1: Killed")."""
    try:
        text = Path(stderr).read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"srun: error: (\S+): tasks? ([0-9,-]+): (.+)", text)
    if match is None:
        return None
    rank = min(_task_ids(match.group(2)))
    return rank, f"srun: {match.group(1)}: task {rank}: {match.group(3).strip()}"


def _task_ids(spec: str) -> set[int]:
    """srun's task list: ``1``, ``0,2`` or ``4-7``."""
    ids: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.partition("-")
        ids.update(range(int(low), int(high or low) + 1))
    return ids
