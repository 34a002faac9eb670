"""Rank-0-only work that outlasts the collective timeout (consolidating a 70B checkpoint for
dpo-eval): the other ranks wait on a file, not in a collective that would time out."""

from __future__ import annotations

import pytest

from tests.helpers import run_ranks

pytestmark = pytest.mark.integration

SCRIPT = """
import datetime, os, sys, time
from pathlib import Path
import torch.distributed as dist
sys.path.insert(0, os.getcwd())
from dpo_dist import distributed as D

rank = int(os.environ["RANK"])
out = Path(sys.argv[1])
# A 2 s collective timeout stands in for the real 30 min; rank 0 works for 4 s.
dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=2))
(out / "policy.marker").write_text("left by an earlier run")

def slow_export():
    time.sleep(4)
    (out / "exported").write_text("done")

D.rank0_then_wait(slow_export, out / "policy.marker", poll_s=0.05)
# Every rank sees rank 0's result once the wait is over.
(out / f"rank{rank}.txt").write_text((out / "exported").read_text())
dist.barrier()
dist.destroy_process_group()
"""


def test_other_ranks_wait_out_a_rank0_job_longer_than_the_collective_timeout(tmp_path):
    script = tmp_path / "wait.py"
    script.write_text(SCRIPT)
    run_ranks([str(script), str(tmp_path)], 2, timeout=60)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["done", "done"]
