"""The engine on a CUDA device (skipped elsewhere): bf16 ZeRO-3 training steps with the packed
GPU attention, online reference, and every engine's memory given back afterwards (the bench
builds seven engines in one process)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_engine_steps_and_releases_its_memory(tmp_path):
    out = tmp_path / "smoke.json"
    result = subprocess.run([sys.executable, "tests/gpu/engine_smoke.py", "cuda", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["backend"] in ("flash", "varlen"), report
    assert report["dtype"] == "torch.bfloat16" and report["grad_accum_dtype"] == "torch.float32"
    assert abs(report["losses"][0] - math.log(2)) < 1e-2, report  # policy = reference at step 0 (bf16)
    assert all(math.isfinite(loss) for loss in report["losses"]), report
    memory = report["allocated"]
    assert memory["during"] > memory["before"] and memory["after"] <= memory["before"] + 2**20, memory
