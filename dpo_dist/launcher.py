"""Start the ranks of a job on this machine (``cluster=local``).

Every rank runs ``dpo_dist.worker`` with torchrun-style variables, exactly as a Slurm task
does, so the local and cluster code paths are the same. One rank failing stops all of them:
a job never hangs on a dead peer. A preemption signal to the launcher (SIGTERM, SIGUSR1,
SIGUSR2, e.g. Slurm's warning to a batch script that runs ``cluster=local``) is forwarded to the
ranks, which checkpoint (once training has started; before, there is nothing to save) and exit
75; the launcher waits for them meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from dpo_dist.config import DPOConfig
from dpo_dist.distributed import DistEnv, free_port
from dpo_dist.runinfo import RUN_LOCK_ENV, RunDirInUse, claim_run_dir, release_run_dir, write_config
from dpo_dist.worker import ERROR_DIR_ENV, PREEMPTED_EXIT_CODE

log = logging.getLogger("dpo_dist.launcher")



class LaunchError(RuntimeError):
    """A rank exited with an error (the message names it, ``status`` is its exit status), or the
    launch was refused before any rank started (status 2, a usage error: the message says why)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _die_with_parent() -> None:
    # A `kill -9` of the launcher must not leave ranks training (and writing) as orphans.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def rank_environment(env: DistEnv) -> dict[str, str]:
    variables = dict(os.environ)
    variables.update(
        RANK=str(env.rank),
        LOCAL_RANK=str(env.local_rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_WORLD_SIZE=str(env.world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
        # Two ranks on two cores: more intra-op threads per rank only oversubscribe the CPU.
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // env.world_size))),
    )
    return variables


def check_local_gpus(nproc: int) -> None:
    """Refuse more ranks than this machine's visible GPUs (LaunchError, status 2).

    Each rank takes GPU ``LOCAL_RANK``; with more ranks than GPUs two ranks would share one, each
    with half the memory the plan counted on. Without CUDA the ranks run on the CPU, any number."""
    if not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    if nproc > count:
        raise LaunchError(
            f"cluster.nproc_per_node={nproc} but this machine has {count} visible CUDA GPU(s): ranks would share GPUs; "
            f"set cluster.nproc_per_node to at most {count} (CUDA_VISIBLE_DEVICES= runs the ranks on the CPU)",
            2,
        )


def rendezvous_port(master_port: int | None) -> int:
    """``cluster.master_port`` if set, else a free port; raises LaunchError (status 2) if the set
    port is taken: rank 0 could not listen on it, and the ranks would fail to meet."""
    if master_port is None:
        return free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As rank 0's TCPStore does: a port left in TIME_WAIT by an earlier run is free to it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", master_port))
        except OSError as exc:
            raise LaunchError(
                f"cluster.master_port={master_port}: cannot listen on 127.0.0.1:{master_port} ({exc.strerror}); "
                "choose another port, or leave cluster.master_port unset (null) for a free one",
                2,
            ) from None
    return master_port


def run_local(cfg: DPOConfig, task: str) -> None:
    """Run ``task`` on ``cluster.nproc_per_node`` ranks of this machine and wait for them."""
    nproc = cfg.cluster.nproc_per_node
    # Refusals first: nothing is written for a launch that cannot run, nor into an output_dir
    # another training job holds (its config.yaml and error files are that job's).
    check_local_gpus(nproc)
    port = rendezvous_port(cfg.cluster.master_port)
    locked = {}
    if task == "train":
        try:
            claim_run_dir(cfg.output_dir)
        except RunDirInUse as exc:
            raise LaunchError(str(exc), 2) from None
        locked = {RUN_LOCK_ENV: os.path.realpath(cfg.output_dir)}  # the ranks' train() then takes it as held
    try:
        _run_ranks(cfg, task, nproc, port, locked)
    finally:
        release_run_dir(cfg.output_dir)


def _run_ranks(cfg: DPOConfig, task: str, nproc: int, port: int, extra_env: dict[str, str]) -> None:
    config_path = write_config(cfg)
    errors = Path(cfg.output_dir) / ".rank_errors"
    shutil.rmtree(errors, ignore_errors=True)
    errors.mkdir(parents=True)
    procs: list[subprocess.Popen] = []
    try:
        with forward_signals(procs):
            for rank in range(nproc):
                env = DistEnv(rank, rank, nproc, "127.0.0.1", port, None)
                cmd = [sys.executable, "-m", "dpo_dist.worker", str(config_path), task]
                variables = {**rank_environment(env), ERROR_DIR_ENV: str(errors), **extra_env}
                procs.append(subprocess.Popen(cmd, env=variables, preexec_fn=_die_with_parent))
            _wait_all(procs)
    except LaunchError as exc:
        messages = _user_errors(errors)
        if exc.status == 2 and messages:
            # Usually every rank hits the same bad input: say it once.
            raise LaunchError("; ".join(messages), 2) from None
        raise
    finally:
        shutil.rmtree(errors, ignore_errors=True)


# The signals the ranks' PreemptionFlag turns into "checkpoint, then exit 75".
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@contextlib.contextmanager
def forward_signals(procs: list[subprocess.Popen]):
    """While inside, a preemption signal to the launcher goes to the live ranks instead of
    killing it: its death would SIGKILL them (``PR_SET_PDEATHSIG``) in the middle of the
    checkpoint the signal asks for. ``procs`` may still grow inside."""

    def forward(signum, _frame) -> None:
        log.warning("received %s: passing it on to the ranks", signal.Signals(signum).name)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _user_errors(folder: Path) -> list[str]:
    """Distinct one-line user errors the ranks reported, in rank order."""
    files = sorted(folder.glob("rank*.txt"), key=lambda p: int(p.stem[4:]))
    return list(dict.fromkeys(p.read_text().strip() for p in files))


def _wait_all(procs: list[subprocess.Popen]) -> None:
    """Wait for every rank; on the first failure stop the others and raise for that rank.

    A user error (status 2) on any rank wins: the peers of a rank that stopped on bad input die
    of the broken collective, maybe even before it has exited, and their status 1 says nothing."""
    try:
        while True:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                first = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
                _terminate(procs)
                user = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode == 2]
                rank, code = (user or first)[0]
                raise LaunchError(_describe(rank, code), code)
            if all(c == 0 for c in codes):
                return
            time.sleep(0.2)
    except KeyboardInterrupt:
        _terminate(procs)
        raise


def _describe(rank: int, code: int) -> str:
    if code == PREEMPTED_EXIT_CODE:
        return f"rank {rank} was preempted and exited with status {code} (after a checkpoint once training has started); run again to resume"
    if code < 0:
        return f"rank {rank} was killed by {signal_name(-code)}; stopped the other ranks"
    return f"rank {rank} exited with status {code}; stopped the other ranks"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # a real-time signal has no name
        return f"signal {signum}"


def _terminate(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
