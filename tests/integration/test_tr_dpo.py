"""TR-DPO (reference.sync_every, reference.sync_alpha): the online reference moves toward the
policy during training, through `dpo-train` on CPU with real DeepSpeed; a resume continues from
the reference as moved so far."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import make_tiny_assets, run_cli, tiny_run_overrides

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("trdpo"))


def train(assets, out, **settings) -> list[dict]:
    values = {"output_dir": out, "reference.mode": "online", **settings}
    result = run_cli("launch.train", *tiny_run_overrides(assets, values))
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]


@pytest.mark.parametrize("partition", ["replicate", "zero3"])
def test_a_reference_synced_fully_every_step_equals_the_policy_at_every_step(assets, tmp_path, partition):
    # sync_alpha=1 copies the policy into the reference after every step: each step starts with
    # policy == reference, so its sigmoid loss is ln 2 and its rewards 0 (a fixed reference
    # drifts away from ln 2 at this lr within 3 steps: test_online_reference).
    rows = train(
        assets, tmp_path / partition, **{"reference.sync_every": 1, "reference.sync_alpha": 1.0,
                                         "reference.partition": partition, "cluster.nproc_per_node": 2}
    )
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert abs(row["loss"] - math.log(2)) < 1e-6, row
        assert abs(row["chosen_reward"]) < 1e-6 and abs(row["rejected_reward"]) < 1e-6, row
    info = json.loads((tmp_path / partition / "run_info.json").read_text())
    assert info["reference"] == {"cache_dir": None, "computed": False, "mode": "online", "sync_every": 1, "sync_alpha": 1.0}


def test_sync_changes_training_only_from_the_sync_on(assets, tmp_path):
    fixed = train(assets, tmp_path / "fixed", **{"train.max_steps": 4})
    moving = train(assets, tmp_path / "moving", **{"train.max_steps": 4, "reference.sync_every": 2, "reference.sync_alpha": 0.5})
    for a, b in zip(fixed[:2], moving[:2]):  # the reference first moves after step 2
        assert a["loss"] == b["loss"], (a, b)
    for a, b in zip(fixed[2:], moving[2:]):
        assert abs(a["loss"] - b["loss"]) > 1e-5, (a, b)


def test_resume_continues_from_the_moved_reference_exactly(assets, tmp_path):
    # A constant lr: a 3-step run grown to 5 steps then follows the 5-step run's schedule.
    # checkpoint_every=2: step 3's checkpoint is the last step's, which every run saves.
    settings = {"reference.sync_every": 2, "reference.sync_alpha": 0.5, "train.checkpoint_every": 2, "optim.schedule": "constant"}
    whole = train(assets, tmp_path / "whole", **{**settings, "train.max_steps": 5})
    out = tmp_path / "resumed"
    first = train(assets, out, **{**settings, "train.max_steps": 3})
    # Step 3's checkpoint holds the reference moved at step 2, as a Hugging Face model.
    assert (out / "checkpoints" / "step_00000003" / "reference" / "config.json").is_file()
    resumed = train(assets, out, **{**settings, "train.max_steps": 5})
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert first == resumed[:3]
    assert json.loads((out / "run_info.json").read_text())["resumed_from_step"] == 3
    # Exact: steps 4 and 5 score against the reference moved at step 2 (and step 4), not model.path.
    for a, b in zip(whole, resumed):
        assert a["loss"] == b["loss"] and a["chosen_reward"] == b["chosen_reward"], (a, b)


def test_sync_without_an_online_reference_copy_is_a_one_line_refusal(assets, tmp_path):
    result = run_cli("launch.train", *tiny_run_overrides(assets, {"output_dir": tmp_path / "x", "reference.sync_every": 2}))
    assert result.returncode != 0
    assert "reference.sync_every: needs reference.mode=online" in result.stderr
    assert "Traceback" not in result.stderr
