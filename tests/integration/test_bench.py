"""Smoke test of tools/bench.py: every system runs and the JSON has the documented schema.

Timings are never asserted (benchmarks live in benchmarks/, not in tests); the TRL systems run
only where trl is installed (the `bench` extra)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.integration


def test_bench_smoke_writes_the_schema(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("tools.bench", "--preset", "cpu-smoke", "--steps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"device", "preset", "versions", "config", "systems"} <= report.keys()
    names = {"ours_precomputed", "ours_online", "trl_online", "trl_precomputed", "ours_reference_pass"}
    assert set(report["systems"]) == names
    has_trl = importlib.util.find_spec("trl") is not None
    for name, system in report["systems"].items():
        if name.startswith("trl") and not has_trl:
            assert system.startswith("skipped")
            continue
        assert system["tokens_per_s"] > 0 and system["peak_mem_gb"] > 0
        assert system["mfu"] is None  # no stated peak on CPU
        if name != "ours_reference_pass":
            assert math.isclose(system["step0_loss"], math.log(2), rel_tol=1e-5)
    assert set(report["scaling_micro_batch_tokens"]) == {"128"}
