"""data.eval_split and data.max_samples through dpo-train and dpo-eval: the held-out records of the
training file serve the run's eval rows, its eval reference cache and dpo-eval."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import make_tiny_assets, run_cli, tiny_run_overrides

pytestmark = pytest.mark.integration


def test_a_run_evaluates_on_records_held_out_of_its_training_file(tmp_path):
    assets = make_tiny_assets(tmp_path)  # 64 training pairs
    out, cache = tmp_path / "run", tmp_path / "ref"
    settings = {
        "output_dir": out, "reference.cache_dir": cache, "data.eval_path": "null", "data.max_samples": 48,
        "data.eval_split": 0.25, "train.max_steps": 2, "train.eval_every": 1,
    }  # fmt: skip
    result = run_cli("launch.train", *tiny_run_overrides(assets, settings))
    assert result.returncode == 0, result.stderr[-3000:]
    split = re.search(
        r"data.max_samples=48: its first 48 records, counted before invalid or over-long ones are dropped; "
        r"data.eval_split=0.25: (\d+) of the 48 valid records held out for evaluation \(\d+ prompts, each with all its records\), (\d+) for training",
        result.stderr,
    )
    assert split, result.stderr[-3000:]
    held, trained = int(split[1]), int(split[2])
    assert held >= 12 and held + trained == 48
    info = json.loads((out / "run_info.json").read_text())
    assert (info["train_pairs"], info["eval_pairs"]) == (trained, held)
    assert f"epochs of the {trained} training pairs" in result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval/loss" in row]
    assert [row["step"] for row in evals] == [1, 2]
    assert all(0 <= row["eval/reward_accuracy"] <= 1 for row in evals)
    # One reference pass per side, each over its own records only.
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (cache, *cache.glob("eval-*"))]
    assert [m["num_examples"] for m in manifests] == [trained, held]

    # dpo-eval of the finished run takes its data settings: the same held-out records, the same numbers.
    evaluated = run_cli("launch.eval", f"output_dir={out}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    standalone = json.loads((out / "eval.json").read_text())
    assert standalone["eval_pairs"] == held
    for key in ("eval/loss", "eval/reward_accuracy", "eval/reward_margin"):
        assert abs(standalone[key] - evals[-1][key]) <= 1e-5 * max(1.0, abs(evals[-1][key])), key
