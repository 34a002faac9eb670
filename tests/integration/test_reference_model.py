"""reference.model_path: DPO against another model than the policy's starting point (TRL's
``ref_model``, OpenRLHF's ``--ref_pretrain``), through `dpo-train` and `dpo-eval` on CPU."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import make_tiny_assets, make_tiny_model_dir, run_cli, tiny_run_overrides

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_model")
    return {**make_tiny_assets(root), "other": make_tiny_model_dir(root / "other", seed=7)}


def train_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def test_another_reference_model_is_scored_precomputed_online_and_by_dpo_eval(assets, tmp_path):
    other = str(assets["other"])
    runs = {
        "own": {"reference.cache_dir": tmp_path / "cache_own"},
        "precompute": {"reference.model_path": other, "reference.cache_dir": tmp_path / "cache_other"},
        "online": {"reference.model_path": other, "reference.mode": "online"},
    }
    rows = {}
    for name, settings in runs.items():
        out = tmp_path / name
        result = run_cli("launch.train", *tiny_run_overrides(assets, {"output_dir": out, "train.max_steps": 2, **settings}))
        assert result.returncode == 0, result.stderr[-3000:]
        rows[name] = train_rows(out)
    # The policy starts as model.path: against itself step 0 is ln 2; against the other model it is not.
    assert abs(rows["own"][0]["loss"] - math.log(2)) < 1e-6
    assert abs(rows["precompute"][0]["loss"] - math.log(2)) > 1e-3
    for a, b in zip(rows["precompute"], rows["online"], strict=True):  # the same reference either way
        for key in ("loss", "chosen_reward", "rejected_reward"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (a["step"], key, a[key], b[key])
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "cache_other").rglob("manifest.json")]
    assert manifests and {m["model_path"] for m in manifests} == {str(assets["other"].absolute())}

    # dpo-eval of the run scores against the run's reference (its cached eval log-probs).
    evaluated = run_cli("launch.eval", f"output_dir={tmp_path / 'precompute'}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads((tmp_path / "precompute" / "eval.json").read_text())
    assert result["reference"] == other
    assert math.isclose(result["eval/loss"], rows_eval(tmp_path / "precompute")["eval/loss"], rel_tol=1e-5)


def rows_eval(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "eval/loss" in row][-1]
