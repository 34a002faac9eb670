"""tools/bench.py without running a model: every system runner is replaced by a stub, so these
check what the bench reports (JSON, exit status, stderr) when systems fail, and its argument checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from tests.helpers import REPO
from tools import bench, bench_table


def numbers(tps: float = 100.0) -> dict:
    return {"tokens_per_s": tps, "mfu": None, "peak_mem_gb": 1.0, "step0_loss": 0.6931471805599453}


@dataclass(frozen=True)
class FakeTrain:
    micro_batch_tokens: int = 256


@dataclass(frozen=True)
class FakeConfig:
    train: FakeTrain = field(default_factory=FakeTrain)


@pytest.fixture
def stubs(monkeypatch):
    """Every runner of tools/bench.py replaced; ``calls`` records what ran (scaling by its budget)."""
    calls: list[str] = []

    def build_model_dir(path, preset):
        path.mkdir(parents=True)
        return 1000

    def reference_pass(cfg, *rest):
        calls.append("ours_reference_pass")
        return numbers(1000.0), "table"

    def ours_train(cfg, dataset, device, backend, reference, preset, n_params):
        if reference is None:
            calls.append("ours_online")
        elif cfg.train.micro_batch_tokens != 256:
            calls.append(f"scaling {cfg.train.micro_batch_tokens}")
        else:
            calls.append("ours_precomputed")
        return numbers()

    def run_trl(preset, model_dir, data, work, precompute, overrides, fp32_weights=False):
        calls.append("trl_precomputed" if precompute else "trl_online")
        return numbers(50.0)

    monkeypatch.setattr(bench, "device_name", lambda: "cpu (test)")
    monkeypatch.setattr(bench, "versions", lambda: {})
    monkeypatch.setattr(bench, "build_model_dir", build_model_dir)
    monkeypatch.setattr(bench, "setup_ours", lambda *a, **k: bench.OurSetup(FakeConfig(), "dataset", "cpu", "sdpa", 1000))
    monkeypatch.setattr(bench, "reference_pass", reference_pass)
    monkeypatch.setattr(bench, "ours_train", ours_train)
    monkeypatch.setattr(bench, "run_trl", run_trl)
    monkeypatch.setattr(bench, "_has_trl", lambda: True)
    return calls


def boom(*args, **kwargs):
    raise RuntimeError("boom\nsecond line")


def bench_main(tmp_path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "bench.json"
    code = bench.main(["--preset", "cpu-smoke", "--out", str(out), *args])
    return code, json.loads(out.read_text())


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("dpo-bench: error:")]


def test_all_systems_measured_exit_0(tmp_path, stubs, capsys):
    code, report = bench_main(tmp_path)
    assert code == 0
    assert stubs == ["ours_reference_pass", "ours_precomputed", "ours_online", "trl_online", "trl_precomputed",
                     "scaling 128"]
    assert set(report["systems"]) == set(bench.SYSTEMS)
    assert all(set(s) == {"tokens_per_s", "mfu", "peak_mem_gb", "step0_loss"} for s in report["systems"].values())
    assert report["config"]["steps_timed"] == bench.PRESETS["cpu-smoke"].steps  # no --steps: the preset's
    assert error_lines(capsys.readouterr().err) == []


def test_a_failing_system_exits_1_after_writing_the_others(tmp_path, stubs, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run_trl", boom)
    code, report = bench_main(tmp_path)
    assert code == 1
    systems = report["systems"]
    assert systems["trl_online"] == systems["trl_precomputed"] == {"error": "RuntimeError: boom"}
    for name in ("ours_reference_pass", "ours_precomputed", "ours_online"):
        assert systems[name]["tokens_per_s"] > 0, name  # the partial results survive in the JSON
    assert report["scaling_micro_batch_tokens"]["128"]["tokens_per_s"] > 0  # runs after the failures
    assert error_lines(capsys.readouterr().err) == [
        "dpo-bench: error: trl_online: RuntimeError: boom",
        "dpo-bench: error: trl_precomputed: RuntimeError: boom",
    ]


def test_trl_not_installed_is_recorded_as_skipped_not_a_failure(tmp_path, stubs, monkeypatch, capsys):
    monkeypatch.setattr(bench, "_has_trl", lambda: False)
    code, report = bench_main(tmp_path)
    assert code == 0
    assert report["systems"]["trl_online"].startswith("skipped (trl not installed")
    assert report["systems"]["trl_precomputed"].startswith("skipped (trl not installed")
    assert error_lines(capsys.readouterr().err) == []


@pytest.mark.parametrize("asked", [[], ["--systems", "ours_precomputed,ours_online"]])
def test_reference_pass_failure_skips_what_needs_it_and_keeps_its_record(tmp_path, stubs, monkeypatch, capsys, asked):
    monkeypatch.setattr(bench, "reference_pass", boom)
    code, report = bench_main(tmp_path, *asked)
    assert code == 1
    skipped = {"error": "skipped: the reference pass failed: RuntimeError: boom"}
    systems = report["systems"]
    # Its own record stays even when the pass was run only for ours_precomputed and the scaling runs.
    assert systems["ours_reference_pass"] == {"error": "RuntimeError: boom"}
    assert systems["ours_precomputed"] == skipped
    assert report["scaling_micro_batch_tokens"] == {"128": skipped}
    assert systems["ours_online"]["tokens_per_s"] > 0  # does not need the pass: still measured
    assert "ours_precomputed" not in stubs and "scaling 128" not in stubs
    lines = error_lines(capsys.readouterr().err)
    assert lines[:2] == ["dpo-bench: error: ours_reference_pass: RuntimeError: boom",
                         f"dpo-bench: error: ours_precomputed: {skipped['error']}"]
    assert lines[-1] == f"dpo-bench: error: scaling 128: {skipped['error']}"


def test_reference_pass_for_scaling_only_is_unreported_when_it_succeeds(tmp_path, stubs):
    code, report = bench_main(tmp_path, "--systems", "ours_online")
    assert code == 0
    assert set(report["systems"]) == {"ours_online"}
    assert set(report["scaling_micro_batch_tokens"]) == {"128"}


def test_error_records_render_in_the_tables(tmp_path, stubs, monkeypatch, capsys):
    monkeypatch.setattr(bench, "reference_pass", boom)
    bench_main(tmp_path)
    capsys.readouterr()
    assert bench_table.main([str(tmp_path / "bench.json")]) == 1  # the precomputed target is not measured
    out = capsys.readouterr().out
    assert "| ours, reference pass alone (forward only) | error: RuntimeError: boom |" in out
    assert "| ours, precomputed reference | skipped: the reference pass failed: RuntimeError: boom |" in out
    assert "| 128 | skipped: the reference pass failed: RuntimeError: boom |" in out
    assert "MISSED ours_precomputed/trl_precomputed: not measured" in out
    assert "ours_online/trl_online: 2.00x" in out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["--steps", "-3"], "argument --steps: must be >= 1, got -3"),
        (["--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
        (["--steps", "two"], "argument --steps: expected an integer, got 'two'"),
    ],
)
def test_bad_step_counts_are_refused_before_running(tmp_path, monkeypatch, capsys, args, expected):
    def must_not_run(args):
        raise AssertionError(f"the bench ran with {args}")

    monkeypatch.setattr(bench, "run", must_not_run)
    with pytest.raises(SystemExit) as info:
        bench.main(["--preset", "cpu-smoke", *args, "--out", str(tmp_path / "b.json")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"dpo-bench: error: {expected} (see --help)\n"
    assert not (tmp_path / "b.json").exists()


def test_explicit_step_counts_are_used(tmp_path, stubs):
    code, report = bench_main(tmp_path, "--steps", "5", "--warmup", "0")
    assert code == 0
    assert report["config"]["steps_timed"] == 5 and report["config"]["warmup_steps"] == 0


def test_script_imports_the_checkout_before_other_copies(tmp_path):
    """Run as ``python tools/bench.py`` with another ``launch`` package earlier on the path: the
    checkout's own one is imported (as dpo_dist is), not the other copy."""
    other = tmp_path / "launch"
    other.mkdir()
    (other / "__init__.py").write_text("")
    (other / "common.py").write_text("raise ImportError('the other copy of launch was imported')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage: dpo-bench" in result.stdout


@pytest.mark.parametrize("where", ["under_a_file", "a_directory"])
def test_an_unwritable_out_is_refused_before_measuring(tmp_path, monkeypatch, capsys, where):
    """--out is checked before the first system runs, not by the report write after it."""

    def must_not_run(args):
        raise AssertionError("the bench ran")

    monkeypatch.setattr(bench, "run", must_not_run)
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "b.json" if where == "under_a_file" else tmp_path
    assert bench.main(["--preset", "cpu-smoke", "--skip-trl", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    reason = f"cannot create the directory {out.parent}: a file is in the way" if where == "under_a_file" else "is a directory"
    assert err == f"dpo-bench: error: --out {out}: {reason}\n"


def test_out_folder_is_created_before_measuring_and_no_probe_is_left(tmp_path, stubs):
    code, report = bench_main(tmp_path / "new" / "dir")
    assert code == 0 and sorted(p.name for p in (tmp_path / "new" / "dir").iterdir()) == ["bench.json"]
