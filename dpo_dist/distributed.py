"""Ranks, process groups and preemption: the small helpers every rank calls.

Rank and world come from torchrun-style variables (``RANK``, ``WORLD_SIZE``, ...), which both
``cluster=local`` and ``cluster=slurm`` set before dpo_dist code runs. Inside an ``srun`` task
without them (a hand-written sbatch script), :func:`slurm_env` derives them from Slurm's
variables: rank ``SLURM_PROCID``, world ``SLURM_NTASKS``, master = the step's first node, port
= a base port + ``(16 * SLURM_JOB_ID + SLURM_STEP_ID) % 1000`` so that jobs sharing a node,
and concurrent steps of one job, do not collide.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

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


def first_env_int(*names: str, default: int) -> int:
    """The first of the environment variables ``names`` that is set, as an int, else ``default``."""
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def slurm_job_id() -> str | None:
    """This job's id as Slurm shows it (``ARRAYJOB_TASK`` for an array element), or None."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return job


def in_slurm_step() -> bool:
    """True inside an ``srun`` task: one rank of a Slurm job step.

    The batch script of a job also has ``SLURM_JOB_ID`` and ``SLURM_PROCID=0`` but no step id,
    and must not be mistaken for rank 0 of ``SLURM_NTASKS`` ranks (it would wait for peers).
    """
    step = os.environ.get("SLURM_STEP_ID") or os.environ.get("SLURM_STEPID")
    return bool(os.environ.get("SLURM_JOB_ID")) and bool(step)


def detect_env() -> DistEnv:
    """Rank/world from torchrun variables, else from an srun task's Slurm variables, else one process."""
    if os.environ.get("RANK", "") == "" and in_slurm_step():
        return slurm_env()
    return DistEnv(
        rank=first_env_int("RANK", default=0),
        local_rank=first_env_int("LOCAL_RANK", default=0),
        world_size=first_env_int("WORLD_SIZE", default=1),
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=first_env_int("MASTER_PORT", default=29500),
        slurm_job_id=slurm_job_id(),
    )


SLURM_BASE_PORT = 29500
"""The base of the Slurm port rule when ``cluster.master_port`` is null (its default)."""


def slurm_env(base_port: int | None = SLURM_BASE_PORT) -> DistEnv:
    """Where this srun task sits, from Slurm's variables (``MASTER_ADDR``/``MASTER_PORT`` win if set).
    ``base_port`` None is :data:`SLURM_BASE_PORT`."""
    base = SLURM_BASE_PORT if base_port is None else base_port
    port = os.environ.get("MASTER_PORT") or base + slurm_port_offset()
    return DistEnv(
        rank=int(os.environ["SLURM_PROCID"]),
        # LOCAL_RANK picks the GPU (here and in DeepSpeed, which calls set_device(LOCAL_RANK)).
        local_rank=slurm_gpu_index(int(os.environ.get("SLURM_LOCALID", "0"))),
        world_size=int(os.environ["SLURM_NTASKS"]),
        master_addr=os.environ.get("MASTER_ADDR") or slurm_master_addr(),
        master_port=int(port),
        slurm_job_id=slurm_job_id(),
    )


def slurm_port_offset() -> int:
    """0-999 from the job and step ids: two steps running at once in one job (a hand-written
    sbatch script) need two rendezvous ports. 16 steps per job id, so jobs less than 62 ids
    apart sharing a node, each with steps 0-15, never collide."""
    step = os.environ.get("SLURM_STEP_ID") or os.environ.get("SLURM_STEPID") or "0"
    return (16 * int(os.environ["SLURM_JOB_ID"]) + int(step)) % 1000


def gpu_index(local_rank: int) -> int:
    """The visible GPU of the rank with this node-local index: device ``local_rank`` itself.

    Raises ConfigError (one line) when there is no such device: wrapping around (``local_rank %
    count``) would put two ranks on one GPU without a word, each with half the memory the plan
    counted on. ``cluster=local`` refuses such a launch before any rank starts; this catches a rank
    started some other way. Without CUDA the index only names the rank."""
    count = torch.cuda.device_count()
    if count and local_rank >= count:
        from dpo_dist.config import ConfigError

        raise ConfigError(
            f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible: ranks would share GPUs; "
            "start at most one rank per GPU on a node"
        )
    return local_rank


def slurm_gpu_index(local_id: int) -> int:
    """The GPU of the Slurm task with node-local id ``local_id`` (``SLURM_LOCALID``).

    Slurm may bind each task to GPUs of its own (``--gpus-per-task=1``, ``--gpu-bind``): task 3
    of a node then sees one GPU, its own, as device 0, and ``local_id % count`` picks it. Only
    Slurm does this binding, so only here is the wrap-around allowed; ``cluster=slurm`` requires
    ``tasks_per_node == gpus_per_node``, so without binding every task's id is below the count."""
    count = torch.cuda.device_count()
    return local_id % count if count else local_id


def first_node(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[003-010,12],cpu1`` -> ``gpu003``."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    # Each bracket holds ranges like 003-010,12: the first host takes the start of the first range.
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first)


def slurm_master_addr() -> str:
    """Address of the step's first node, where rank 0 runs.

    The step's, not the job's: an ``srun`` over part of the allocation (``srun -N1`` in a
    2-node job, or two steps side by side) may not run on the job's first node at all.
    Node names usually resolve through DNS. When one does not (test clusters where nodes are
    aliases of one host), Slurm's own ``NodeAddr`` for it is used, and the choice is logged.
    """
    names = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    nodelist = next((os.environ[n] for n in names if os.environ.get(n)), None)
    if not nodelist:
        raise RuntimeError("inside a Slurm step but SLURM_STEP_NODELIST is not set: set MASTER_ADDR yourself")
    node = first_node(nodelist)
    try:
        socket.getaddrinfo(node, None)
        return node
    except socket.gaierror:
        pass
    addr = _slurm_node_addr(node)
    log.warning("MASTER_ADDR: node name %r does not resolve; using its Slurm NodeAddr %s", node, addr)
    return addr


def _slurm_node_addr(node: str) -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["scontrol", "show", "node", "-o", node], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(
            f"MASTER_ADDR: node {node!r} does not resolve and `scontrol show node` failed ({exc}); set MASTER_ADDR"
        ) from None
    match = re.search(r"\bNodeAddr=(\S+)", out)
    if not match:
        raise RuntimeError(f"MASTER_ADDR: node {node!r} does not resolve and Slurm reports no NodeAddr; set MASTER_ADDR")
    return match.group(1)


def export_slurm_env(base_port: int | None) -> DistEnv | None:
    """In an srun task without torchrun variables, derive and export them; otherwise do nothing.

    ``base_port`` is ``cluster.master_port`` (None: :data:`SLURM_BASE_PORT`); see :func:`slurm_env`
    for the port rule.
    """
    if os.environ.get("RANK", "") != "" or not in_slurm_step():
        return None
    env = slurm_env(base_port)
    export_env(env)
    if env.is_main:
        log.info(
            "Slurm job %s: rank 0 of %d, rendezvous %s:%d", env.slurm_job_id, env.world_size, env.master_addr, env.master_port
        )
    return env


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
        index = gpu_index(env.local_rank)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
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
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        interface = gloo_interface(env.master_addr)
        if interface is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
            log.info("GLOO_SOCKET_IFNAME=%s: this host's name resolves to loopback, %s is reached by %s",
                     interface, env.master_addr, interface)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        verbose=False,
        rank=env.rank,
        world_size=env.world_size,
    )


def gloo_interface(master_addr: str) -> str | None:
    """The network interface gloo must use to reach ``master_addr``, where its own choice would
    fail: gloo binds the address this host's name resolves to, and where that is loopback (Debian's
    ``127.0.1.1 hostname`` line) ranks on other nodes cannot connect. None where gloo's choice works
    (a name that resolves off loopback, or a master on this host)."""
    try:
        if not ipaddress.ip_address(socket.gethostbyname(socket.gethostname())).is_loopback:
            return None
    except (OSError, ValueError):
        pass  # an unresolvable name: gloo falls back to loopback too
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((master_addr, 9))  # UDP: picks the route, sends nothing
            local = probe.getsockname()[0]
    except OSError:
        return None
    if ipaddress.ip_address(local).is_loopback:
        return None
    return next((name for _, name in socket.if_nameindex() if _interface_address(name) == local), None)


def _interface_address(name: str) -> str | None:
    """IPv4 address of interface ``name`` (the SIOCGIFADDR ioctl; Linux)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
        except OSError:  # no IPv4 address
            return None
    return socket.inet_ntoa(packed[20:24])


def _multi_rank() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in a single process)."""
    if _multi_rank():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def rank() -> int:
    """This process's rank in the default group (0 in a single process)."""
    return dist.get_rank() if dist.is_initialized() else 0


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (one shape on all ranks) concatenated in rank order along dim 0;
    ``tensor`` itself in a single process."""
    if not _multi_rank():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_object(value):
    """Rank 0's ``value`` (any picklable object) on every rank; a no-op in a single process."""
    if _multi_rank():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


LONG_WAIT = datetime.timedelta(hours=24)
"""How long the other ranks wait out rank-0-only work (tokenizing a large dataset, consolidating
a 70B checkpoint): far past the collective timeout, which is kept short to catch dead ranks."""

_long_wait: tuple | None = None  # (the default group it was made for, the gloo group)


def _long_wait_group() -> dist.ProcessGroup:
    """A gloo group over every rank whose collectives time out after :data:`LONG_WAIT`.

    Made on first use, which is collective: every rank reaches it through the same call of
    :func:`rank0_first` / :func:`rank0_then_wait` / :func:`on_rank0`. Gloo, because an NCCL wait would hold a GPU
    stream and its watchdog for hours. If rank 0 dies, its connections close and the wait ends
    at once, not after a day.
    """
    global _long_wait
    if _long_wait is None or _long_wait[0] is not dist.group.WORLD:  # re-initialised: a new group
        _long_wait = (dist.group.WORLD, dist.new_group(backend="gloo", timeout=LONG_WAIT))
    return _long_wait[1]


def _run_on_rank0(fn, share: bool):
    """``fn()`` on rank 0 while the other ranks wait in a long-timeout broadcast; rank 0's
    exception is raised on every rank (they would otherwise fail later on a missing peer,
    without the reason). With ``share``, every rank returns rank 0's (picklable) result."""
    group = _long_wait_group()
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:
            dist.broadcast_object_list([("error", _picklable(exc))], src=0, group=group)
            raise
        dist.broadcast_object_list([("ok", result if share else None)], src=0, group=group)
        return result
    outcome: list = [None]
    dist.broadcast_object_list(outcome, src=0, group=group)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def _picklable(exc: Exception) -> Exception:
    """``exc``, or a RuntimeError with its message when it cannot be pickled (the broadcast needs it)."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def rank0_first(fn):
    """``fn()`` on rank 0 first (it fills caches), then on the other ranks (they read them)."""
    if not _multi_rank():
        return fn()
    result = _run_on_rank0(fn, share=False)
    return result if dist.get_rank() == 0 else fn()


def rank0_then_wait(fn) -> None:
    """``fn()`` on rank 0 only, the other ranks waiting until it is done (or re-raising its error)."""
    if _multi_rank():
        _run_on_rank0(fn, share=False)
    else:
        fn()


def on_rank0(fn):
    """``fn()`` on rank 0 only (hashing a 70B checkpoint, reading a shared manifest); every rank
    returns its result, or raises its error."""
    return _run_on_rank0(fn, share=True) if _multi_rank() else fn()


def wait_for_token(path: Path, token: str, poll_s: float) -> None:
    """Poll until ``path`` holds exactly ``token`` (written by rank 0): a wait with no timeout, for
    a file lock that another job may hold for hours."""
    while True:
        try:
            if path.read_text() == token:
                return
        except OSError:
            pass  # not written yet (or its directory not made yet)
        time.sleep(poll_s)


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

    def any_rank(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it at the same point)."""
        return all_reduce_sum(torch.tensor([float(self.requested)], device=device)).item() > 0
