"""A preemption signal to ``dpo-train cluster=local`` (as Slurm sends one to a batch script that
runs it): the launcher passes it on, the ranks checkpoint, and the command exits 75."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])  # Slurm: warning, preemption
def test_a_signalled_local_run_checkpoints_and_exits_75(tmp_path, sig):
    run = tmp_path / "run"
    args = [
        f"output_dir={run}", "cluster.nproc_per_node=2", "train.max_steps=1000", "train.checkpoint_every=0",
        "train.eval_every=0", "wandb.mode=disabled",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log", "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "launch.train", *args], cwd=REPO, env=env, stdout=log, stderr=log)
        try:
            # run_info.json is written once training has started: both ranks handle the signal by then.
            deadline = time.monotonic() + 120
            while not (run / "run_info.json").exists():
                assert proc.poll() is None and time.monotonic() < deadline, (log.seek(0), log.read()[-3000:])
                time.sleep(0.2)
            proc.send_signal(sig)
            status = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        log.seek(0)
        output = log.read()
    assert status == 75, output[-3000:]
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("dpo-train: error: rank "), output[-3000:]
    assert "preempted" in errors[0], errors
    saved = sorted((run / "checkpoints").glob("step_*/COMPLETE"))
    assert saved and not (run / "final").exists(), output[-3000:]
