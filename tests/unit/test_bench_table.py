"""tools/bench_table.py: the README tables and the target check of a bench JSON."""

from __future__ import annotations

import json

from tests.helpers import REPO
from tools import bench_table


def system(tps, mfu=None, peak=1.0):
    return {"tokens_per_s": tps, "mfu": mfu, "peak_mem_gb": peak, "step0_loss": 0.6931471805599453}


def test_committed_cpu_result_renders_and_meets_the_cpu_targets(capsys):
    assert bench_table.main([str(REPO / "benchmarks" / "cpu-small.json")]) == 0
    out = capsys.readouterr().out
    report = json.loads((REPO / "benchmarks" / "cpu-small.json").read_text())
    ours = report["systems"]["ours_precomputed"]["tokens_per_s"]
    assert f"| ours, precomputed reference | {ours:,.0f} |" in out
    assert out.count("met  ") == 2 and "MISSED" not in out


def test_gpu_targets_include_mfu_and_memory(tmp_path, capsys):
    report = {
        "device": "NVIDIA H100 80GB HBM3", "preset": "gpu-1b",
        "systems": {
            "ours_precomputed": system(52000, mfu=0.41, peak=30), "ours_online": system(40000, mfu=0.3, peak=33),
            "trl_online": system(25000, peak=42), "trl_precomputed": system(33000, peak=40),
            "ours_reference_pass": "error: RuntimeError: boom",
        },
        "scaling_micro_batch_tokens": {"4096": system(45000, 0.35, 20), "1024": system(30000, 0.2, 12)},
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    assert bench_table.main([str(path)]) == 1  # MFU 0.41 < 0.45
    out = capsys.readouterr().out
    assert "met  ours_online/trl_online: 1.60x" in out
    assert "met  ours_precomputed/trl_precomputed: 1.58x" in out
    assert "MISSED MFU of ours_precomputed: 0.410 (target >= 0.45)" in out
    assert "met  peak memory: ours at most 33.0 GB, TRL at least 40.0 GB" in out
    assert "| ours, reference pass alone (forward only) | error: RuntimeError: boom |" in out
    assert out.index("| 1,024 |") < out.index("| 4,096 |")


def test_trl_rows_name_what_the_run_changed(tmp_path, capsys):
    report = {
        "device": "cpu (2 cores)", "preset": "cpu-small",
        "config": {"trl_overrides": {"gradient_checkpointing": False}, "trl_fp32_weights": True},
        "systems": {"trl_online": system(400), "trl_precomputed": system(500)},
        "scaling_micro_batch_tokens": {},
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    bench_table.main([str(path)])
    out = capsys.readouterr().out
    assert "| TRL `DPOTrainer`, gradient_checkpointing=False, fp32 weights (online, padded) | 400 |" in out
    assert "| TRL `precompute_ref_log_probs=True`, gradient_checkpointing=False, fp32 weights | 500 |" in out
