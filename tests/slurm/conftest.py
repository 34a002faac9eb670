"""A real Slurm for the `slurm` tests: the local two-node cluster of slurm/local_cluster.sh.

The session fixture points SLURM_CONF at it, starts it if it is not running (installing Slurm
with apt-get when needed) and stops it at the end if it started it. Skipped only where Slurm is
not installed and cannot be (not root, or no apt-get).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPT = REPO / "slurm" / "local_cluster.sh"
CLUSTER_DIR = Path(os.environ.get("DPO_DIST_SLURM_DIR", "/tmp/dpo_dist_slurm"))


def _cluster_ready(env: dict[str, str]) -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    states = out.stdout.split()
    return out.returncode == 0 and len(states) == 2 and all(s in ("idle", "mix", "alloc") for s in states)


def _script(action: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running local cluster (exported for this process and its children)."""
    installed = shutil.which("sbatch") is not None
    can_install = os.geteuid() == 0 and shutil.which("apt-get") is not None
    if not installed and not can_install:
        pytest.skip("Slurm is not installed, and installing it needs root with apt-get (slurm/local_cluster.sh)")
    conf = CLUSTER_DIR / "slurm.conf"
    os.environ["SLURM_CONF"] = str(conf)
    started = False
    if not _cluster_ready(dict(os.environ)):
        result = _script("start", timeout=900)
        if result.returncode != 0:
            pytest.fail(f"slurm/local_cluster.sh start failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        started = True
    yield conf
    if started:
        result = _script("stop", timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
