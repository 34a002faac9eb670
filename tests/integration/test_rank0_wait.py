"""Rank-0-only work that outlasts the collective timeout (tokenizing a large dataset, consolidating
a 70B checkpoint for dpo-eval): the other ranks wait in a long-timeout gloo group, not in a
collective of the default group, which would time out; rank 0's errors still reach them."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, run_ranks

pytestmark = pytest.mark.integration

PRELUDE = """
import datetime, os, sys, time
from pathlib import Path
import torch.distributed as dist
sys.path.insert(0, os.getcwd())
from dpo_dist import distributed as D

rank = int(os.environ["RANK"])
out = Path(sys.argv[1])
# A 2 s collective timeout stands in for the real 30 min; rank 0 works for 4 s.
dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=2))
"""

WAIT = (
    PRELUDE
    + """
def slow_export():
    time.sleep(4)
    (out / "exported").write_text("done")

def slow_tokenize():
    time.sleep(4) if rank == 0 else None
    return f"tokenized on {rank}"

D.rank0_then_wait(slow_export)
# Every rank sees rank 0's result once the wait is over.
(out / f"rank{rank}.txt").write_text((out / "exported").read_text())
assert D.rank0_first(slow_tokenize) == f"tokenized on {rank}"
assert D.on_rank0(slow_tokenize) == "tokenized on 0"  # rank 0's result, on every rank
def fails():
    time.sleep(3)
    raise ValueError("data.train_path=x.jsonl: no such file")
try:
    D.rank0_first(fails)
except ValueError as exc:
    (out / f"error{rank}.txt").write_text(str(exc))
dist.barrier()  # the default group still works after the long waits
dist.destroy_process_group()
"""
)

DIES = (
    PRELUDE
    + """
def crash():
    time.sleep(3)
    os._exit(3)
try:
    D.rank0_then_wait(crash)
except Exception as exc:
    print("WAIT ENDED:", type(exc).__name__, flush=True)
    os._exit(1)  # no interpreter teardown: gloo's group destructor aborts (SIGABRT) on a dead peer
"""
)


def test_other_ranks_wait_out_rank0_work_longer_than_the_collective_timeout(tmp_path):
    script = tmp_path / "wait.py"
    script.write_text(WAIT)
    run_ranks([str(script), str(tmp_path)], 2, timeout=60)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["done", "done"]
    assert [(tmp_path / f"error{r}.txt").read_text() for r in range(2)] == ["data.train_path=x.jsonl: no such file"] * 2


def test_a_dead_rank0_ends_the_wait_at_once(tmp_path):
    import os

    from dpo_dist.distributed import free_port

    script = tmp_path / "dies.py"
    script.write_text(DIES)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)],
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    start = time.monotonic()
    assert procs[0].wait(timeout=60) == 3
    out, _ = procs[1].communicate(timeout=60)  # not LONG_WAIT (24 h)
    assert procs[1].returncode == 1 and "WAIT ENDED" in out, out[-2000:]
    assert time.monotonic() - start < 60
