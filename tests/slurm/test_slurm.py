"""dpo_dist on a real Slurm (slurm/local_cluster.sh: two nodes on this machine), CPU, tiny model.

Covers: a 2-node ZeRO-3 job through `dpo-train cluster=slurm`; a beta x lr sweep as one job array
sharing one reference pass; preemption (`scancel --signal=USR2`) -> checkpoint -> requeue ->
exact resume; `dpo-report` on the sweep. The scheduler lags by seconds: everything polls.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, make_tiny_assets, run_cli, tiny_run_overrides

pytestmark = pytest.mark.slurm

TIMEOUT_S = 300


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("slurm_assets"))


def overrides(assets, **extra) -> list[str]:
    return tiny_run_overrides(assets, extra)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_rows(run_dir)}


def assert_points_trained_as_configured(points: list[Path]) -> None:
    """Each sweep point ran its own beta and lr on the shared reference: step 1's loss is ln 2
    (policy = reference), step 1 ran at the point's lr (warmup 0: the peak), and no two points
    have the same losses. (Adam's first step barely depends on beta, so at one lr step 2's
    rewards scale with beta: beta 0.5 gives 5x beta 0.1's.)"""
    by_point = {}
    for p in points:
        cfg = yaml.safe_load((p / "config.yaml").read_text())
        by_point[cfg["loss"]["beta"], cfg["optim"]["lr"]] = rows = train_rows(p)
        assert abs(rows[0]["loss"] - math.log(2)) < 1e-6, (p, rows[0])
        assert math.isclose(rows[0]["lr"], cfg["optim"]["lr"], rel_tol=1e-9), (p, rows[0]["lr"], cfg["optim"])
    for a, b in itertools.combinations(by_point, 2):
        apart = max(abs(x["loss"] - y["loss"]) for x, y in zip(by_point[a], by_point[b]))
        assert apart > 1e-5, f"points {a} and {b} trained alike: {by_point[a]} {by_point[b]}"
    for lr in {lr for _, lr in by_point}:
        margins = {beta: by_point[beta, lr][1]["reward_margin"] for beta, point_lr in by_point if point_lr == lr}
        low, high = min(margins), max(margins)
        assert math.isclose(margins[high] / margins[low], high / low, rel_tol=0.05), (lr, margins)


def wait_until(condition, timeout: float, what: str, poll: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_two_node_zero3_job(slurm_cluster, assets, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "launch.train", "cluster=slurm", "cluster.nodes=2", "cluster.tasks_per_node=1", "deepspeed=zero3",
        f"output_dir={out}", *overrides(assets), timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "submitted Slurm job" in result.stdout and f"logs: {out}/slurm/" in result.stdout
    info = read_json(out / "run_info.json")
    assert info["world_size"] == 2
    assert info["argv"][:3] == ["dpo-train", "cluster=slurm", "cluster.nodes=2"]  # not submitit's job script
    assert info["slurm_job_id"] and info["slurm_job_id"].isdigit()
    assert f"submitted Slurm job {info['slurm_job_id']} " in result.stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["deepspeed"]["stage"] == 3
    assert (out / "final" / "model.safetensors").exists()
    assert sorted(train_losses(out)) == [1, 2, 3]
    assert read_json(out / "status.json")["state"] == "done"
    assert (out / "slurm" / info["slurm_job_id"] / f"{info['slurm_job_id']}_1_log.err").exists()


@pytest.fixture(scope="module")
def sweep(slurm_cluster, assets, tmp_path_factory):
    """A 2 x 2 beta x lr sweep on Slurm, with a reference cache of its own (nothing to reuse)."""
    root = tmp_path_factory.mktemp("sweep")
    sweep_dir = root / "multirun"
    grid = {"loss.beta": "0.1,0.5", "optim.lr": "1e-3,5e-4"}
    result = run_cli(
        "launch.train", "-m", "cluster=slurm", f"hydra.sweep.dir={sweep_dir}", *overrides(assets, **grid),
        env={"DPO_DIST_CACHE": str(root / "cache")}, timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return sweep_dir


def test_sweep_is_one_job_array_with_one_reference_pass(sweep):
    points = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert [p.name for p in points] == ["0", "1", "2", "3"]
    infos = [read_json(p / "run_info.json") for p in points]
    references = [info["reference"] for info in infos]
    assert sum(r["computed"] for r in references) == 1, references
    assert len({r["cache_dir"] for r in references}) == 1, references
    arrays = {info["slurm_job_id"].split("_")[0] for info in infos}
    assert len(arrays) == 1 and all("_" in info["slurm_job_id"] for info in infos), infos
    configs = [yaml.safe_load((p / "config.yaml").read_text()) for p in points]
    grid = {(c["loss"]["beta"], c["optim"]["lr"]) for c in configs}
    assert grid == {(0.1, 1e-3), (0.1, 5e-4), (0.5, 1e-3), (0.5, 5e-4)}
    assert all(sorted(train_losses(p)) == [1, 2, 3] for p in points)
    assert_points_trained_as_configured(points)


def test_report_on_sweep(sweep):
    result = run_cli("launch.report", str(sweep), timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[0].split()
    assert header[:3] == ["run", "overrides", "step"] and "status" in header
    rows = [line for line in lines[1:] if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 4, result.stdout
    assert all("loss.beta=" in row and "optim.lr=" in row and row.split()[-1] == "done" for row in rows)
    png = sweep / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as image:
        image.verify()


def test_failed_sweep_point_is_one_line_after_every_point_ends(slurm_cluster, assets, tmp_path):
    """A point that fails at run time fails the sweep with one line naming that point, its error
    and log, after the good point has finished. The record is well-formed (a structurally bad one
    is refused before anything is submitted) but the chat template cannot render its role."""
    bad = tmp_path / "bad.jsonl"
    good_lines = assets["train"].read_text().splitlines()
    unrenderable = json.dumps({
        "prompt": [{"role": "tool", "content": "1+1="}],
        "chosen": [{"role": "assistant", "content": "2"}],
        "rejected": [{"role": "assistant", "content": "3"}],
    })  # fmt: skip
    bad.write_text("\n".join(good_lines[:5] + [unrenderable] + good_lines[5:]) + "\n")
    sweep_dir = tmp_path / "multirun"
    result = run_cli(
        "launch.train", "-m", "cluster=slurm", f"hydra.sweep.dir={sweep_dir}",
        *overrides(assets, **{"data.train_path": f"{assets['train']},{bad}", "data.eval_path": "null"}),
        env={"DPO_DIST_CACHE": str(tmp_path / "cache")}, timeout=TIMEOUT_S,
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("dpo-train: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    line = errors[0]
    assert line.startswith("dpo-train: error: 1 of 2 sweep points failed: point 1 (data.train_path="), line
    assert f"{bad}:6" in line and "tool" in line, line  # the bad record's place and what is wrong
    assert f"log: {sweep_dir}/slurm/" in line, line
    assert "submitted Slurm job array" in result.stdout
    assert sorted(train_losses(sweep_dir / "0")) == [1, 2, 3]  # the good point ran to the end
    assert read_json(sweep_dir / "1" / "status.json")["state"] == "failed"


def test_preempted_job_requeues_and_resumes_exactly(slurm_cluster, assets, tmp_path):
    # Enough steps that the signal lands mid-training; no periodic checkpoints: the only one is
    # the preemption checkpoint.
    steps = {"train.max_steps": 40}
    baseline = tmp_path / "baseline"
    local = run_cli(
        "launch.train", "cluster=local", "cluster.nproc_per_node=2", f"output_dir={baseline}",
        *overrides(assets, **steps), timeout=TIMEOUT_S,
    )
    assert local.returncode == 0, local.stderr[-3000:]

    out = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "launch.train", "cluster=slurm", "cluster.nodes=2", f"output_dir={out}",
           *overrides(assets, **steps)]
    log = open(tmp_path / "dpo-train.out", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: (out / "metrics.jsonl").exists() and len(train_losses(out)) >= 2, TIMEOUT_S, "2 steps")
        job = read_json(out / "run_info.json")["slurm_job_id"]
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
        proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (tmp_path / "dpo-train.out").read_text()
    assert proc.returncode == 0, output[-3000:]
    status = read_json(out / "status.json")
    assert status["state"] == "done" and status["restarts"] == 1, (status, output[-2000:])
    resumed_from = read_json(out / "run_info.json")["resumed_from_step"]
    assert 2 <= resumed_from < 40, "the signal arrived after training had ended"
    want, got = train_losses(baseline), train_losses(out)
    assert sorted(got) == list(range(1, 41))
    for step in want:
        assert abs(want[step] - got[step]) <= 1e-6 * abs(want[step]), (step, want[step], got[step])
