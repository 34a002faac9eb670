"""Ranks, process groups and preemption: the small helpers every rank calls.

Rank and world come from torchrun-style variables (``RANK``, ``WORLD_SIZE``, ...), which both
``cluster=local`` and ``cluster=slurm`` set before dpo_dist code runs; plain Slurm variables
(``SLURM_PROCID``, ...) are accepted too, for users who ``srun`` the worker themselves.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("dpo_dist.distributed")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    slurm_job_id: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def detect_env() -> DistEnv:
    """Rank/world from torchrun variables, else from Slurm's, else a single process."""
    slurm_job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if slurm_job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        slurm_job = f"{slurm_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return DistEnv(
        rank=_first_int("RANK", "SLURM_PROCID", default=0),
        local_rank=_first_int("LOCAL_RANK", "SLURM_LOCALID", default=0),
        world_size=_first_int("WORLD_SIZE", "SLURM_NTASKS", default=1),
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_first_int("MASTER_PORT", default=29500),
        slurm_job_id=slurm_job,
    )


def export_env(env: DistEnv) -> None:
    """Write ``env`` as torchrun variables, which torch.distributed and DeepSpeed read."""
    os.environ.update(
        RANK=str(env.rank),
        LOCAL_RANK=str(env.local_rank),
        WORLD_SIZE=str(env.world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def init_distributed(env: DistEnv, timeout_minutes: int) -> None:
    """Start the process group through DeepSpeed (NCCL on GPUs, gloo on CPU).

    The timeout bounds every collective, so a dead rank fails the job instead of hanging it.
    """
    if dist.is_initialized():
        return
    if not torch.cuda.is_available():
        # DeepSpeed picks its accelerator at import; on a CPU machine it must be told.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    export_env(env)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        verbose=False,
        rank=env.rank,
        world_size=env.world_size,
    )


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (one small collective)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class PreemptionFlag:
    """Records that the scheduler asked us to stop (SIGUSR1/SIGUSR2/SIGTERM).

    The handler only sets a flag; the train loop checks it once per optimizer step, agrees on
    it across ranks, saves a checkpoint and exits so that the job is requeued. Saving inside a
    signal handler would race with in-flight collectives.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None

    def install(self) -> PreemptionFlag:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("received %s: will checkpoint at the end of this step and exit", self.signal_name)
