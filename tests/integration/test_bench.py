"""Smoke test of tools/bench.py: every system runs and the JSON has the documented schema.

Timings are never asserted (benchmarks live in benchmarks/, not in tests); the TRL systems run
only where trl is installed (the `bench` extra)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, run_cli

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
        if name.startswith("trl"):  # TRL as a user runs it: one plain process, no DDP wrapper, its defaults
            assert system["distributed_type"] == "DistributedType.NO", system
            assert system["gradient_checkpointing"] is True and system["padding_free"] is False, system
            assert system["weights_dtype"] == "float32", system  # the preset's dtype (fp32 on CPU)
        assert system["tokens_per_s"] > 0 and system["peak_mem_gb"] > 0
        assert system["mfu"] is None  # no stated peak on CPU
        if name != "ours_reference_pass":
            assert math.isclose(system["step0_loss"], math.log(2), rel_tol=1e-5)
    assert set(report["scaling_micro_batch_tokens"]) == {"128"}


def test_bench_subset_with_config_overrides(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(
        "tools.bench", "--preset", "cpu-smoke", "--steps", "1", "--systems", "ours_precomputed", "--scaling", "",
        "--set", "model.logits_chunk_tokens=16", "--trl-set", "gradient_checkpointing=false", "--trl-fp32-weights",
        "--out", str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["systems"]) == {"ours_precomputed"}  # its reference pass ran, untimed and unreported
    assert report["systems"]["ours_precomputed"]["tokens_per_s"] > 0
    assert report["scaling_micro_batch_tokens"] == {}
    assert report["config"]["overrides"] == {"model": {"logits_chunk_tokens": 16}}
    assert report["config"]["trl_overrides"] == {"gradient_checkpointing": False}
    assert report["config"]["trl_fp32_weights"] is True


def test_bench_online_reference_with_lora(tmp_path):
    """ours_online with LoRA scores the reference as the policy with adapters disabled (it must be
    attached to the policy engine, and not released twice): step 0 at ln 2."""
    out = tmp_path / "bench.json"
    result = run_cli(
        "tools.bench", "--preset", "cpu-smoke", "--steps", "1", "--systems", "ours_online", "--scaling", "",
        "--set", "model.lora.r=4", "--out", str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    online = json.loads(out.read_text())["systems"]["ours_online"]
    assert abs(online["step0_loss"] - math.log(2)) < 1e-5 and online["tokens_per_s"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "model.nope=1"], "dpo-bench: error: model.nope: unknown config key"),
        (["--attn-backend", "varlen"], "dpo-bench: error: model.attn_backend=varlen needs"),
    ],
)
def test_bench_user_errors_are_one_line(tmp_path, args, message):
    if "varlen" in args and torch.cuda.is_available():
        pytest.skip("varlen can run on this CUDA machine")
    result = run_cli("tools.bench", "--preset", "cpu-smoke", *args, "--out", str(tmp_path / "b.json"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("dpo-bench:")][0].startswith(message)


PLAN_CHECK_ON_CPU = """
import json, sys, torch
from pathlib import Path
from dpo_dist import distributed as D
from tests.helpers import make_tiny_model_dir
from tools import plan_check

D.init_distributed(D.DistEnv(0, 0, 1, "127.0.0.1", D.free_port(), None), 5)
cfg = plan_check.run_config(make_tiny_model_dir(Path(sys.argv[1])), {"model": {"dtype": "fp32"}, "train": {"micro_batch_tokens": 4096}})
measured = plan_check.measure(cfg, 1, "sdpa", torch.device("cpu"))
planned = plan_check.planned(cfg, "sdpa")
print(json.dumps({"pairs": cfg.train.pairs_per_step, "measured": measured, "planned": planned}))
"""


def test_plan_check_measures_real_engine_steps_on_cpu(tmp_path):
    """tools/plan_check.py (the planner's GPU check) drives the real engine; its measuring loop runs
    here on CPU (step time only), so an engine API change cannot break it unseen before a GPU run."""
    result = subprocess.run([sys.executable, "-c", PLAN_CHECK_ON_CPU, str(tmp_path / "model")], cwd=REPO,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["pairs"] == 2  # 4096 tokens / (2 x (512 + 512)) per pair
    assert report["measured"]["step_s"] > 0 and report["measured"]["allocated_gib"] is None
    assert report["planned"]["allocated_gib"] > 0 and "activations (saved)" in report["planned"]["items_gib"]


def test_bench_export_smoke(tmp_path):
    """tools/bench_export.py on a 1-layer model: both exports of a checkpoint and both end-of-training
    exports (2 ranks) run, each pair holds identical tensors, and the report has the numbers
    benchmarks/README.md quotes."""
    out = tmp_path / "export.json"
    result = run_cli("tools.bench_export", "--layers", "1", "--hidden", "256", "--end-wide", "none", "--repeats", "1",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["identical_tensors"] is True
    assert report["config"]["checkpoint_gb"] > report["config"]["fp32_model_gb"] > 0
    for system in ("streaming", "whole_model"):
        assert report["systems"][system]["peak_anon_gb"] > 0 and report["systems"][system]["shards"] == 1
    end = report["training_end"]
    assert end["identical_tensors"] is True
    assert end["config"]["dtype"] == "bfloat16" and end["config"]["world_size"] == 2
    model = end["models"]["1x256"]
    assert model["parameters"] == report["config"]["parameters"] and model["model_gb"] > 0
    for allocator in ("glibc_default", "mmap_threshold_128KB"):
        for system in ("streaming", "whole_model"):
            assert model[allocator][system]["peak_anon_gb_runs"] == [model[allocator][system]["peak_anon_gb"]]
            assert model[allocator][system]["shards"] == 1


def test_bench_lm_head_smoke(tmp_path):
    """tools/bench_lm_head.py on a 1-layer model: both heads timed on the same rows, about half the
    positions scored (cpu-small's prompt and response spread), the JSON benchmarks/README.md quotes."""
    out = tmp_path / "head.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_lm_head.py"), "--vocab", "4096", "--tokens", "600",
         "--steps", "1", "--layers", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["vocab_size"] == 4096 and 0.3 < row["scored_fraction"] < 0.7
    assert row["all_positions_tokens_per_s"] > 0 and row["scored_positions_tokens_per_s"] > 0
    assert row["speedup"] == pytest.approx(row["scored_positions_tokens_per_s"] / row["all_positions_tokens_per_s"])
