"""reference.mode=online on 2 ranks: the frozen copy held whole on every rank (no all-gather per layer
in every micro-batch's reference forward) or partitioned with ZeRO-3, by reference.partition as for
the precompute pass; either way the same training, through `dpo-train` on CPU."""

from __future__ import annotations

import json

import pytest

from tests.helpers import make_tiny_assets, run_cli, tiny_run_overrides

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("online"))


def test_replicated_and_partitioned_online_references_train_the_same_on_two_ranks(assets, tmp_path):
    rows, logs = {}, {}
    for partition in ("replicate", "zero3"):
        out = tmp_path / partition
        settings = {"output_dir": out, "reference.mode": "online", "reference.partition": partition, "cluster.nproc_per_node": 2}
        result = run_cli("launch.train", *tiny_run_overrides(assets, settings))
        assert result.returncode == 0, result.stderr[-3000:]
        rows[partition] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logs[partition] = result.stderr
        info = json.loads((out / "run_info.json").read_text())
        assert info["world_size"] == 2 and info["reference"] == {"cache_dir": None, "computed": False, "mode": "online"}
    assert "online reference: a whole copy of the model per rank (reference.partition=replicate)" in logs["replicate"]
    assert "online reference: partitioned with ZeRO-3 (reference.partition=zero3)" in logs["zero3"]
    whole, parts = rows["replicate"], rows["zero3"]
    assert [r["step"] for r in whole] == [r["step"] for r in parts] and sum("loss" in r for r in whole) == 3
    for a, b in zip(whole, parts):
        for key in ("loss", "chosen_reward", "rejected_reward", "eval/loss", "eval/reward_margin"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    assert any("eval/loss" in r for r in whole)
    losses = [r["loss"] for r in whole if "loss" in r]
    assert abs(losses[-1] - losses[0]) > 1e-3, losses  # it trained, by far more than the tolerance
