"""``dpo-report``'s reading of run directories (dpo_dist.report): files that are there but unreadable."""

from __future__ import annotations

import json

import yaml

from dpo_dist.report import load_run


def make_run(root, name: str):
    """A started run directory with a readable config, one train row and run_info.json."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["loss.beta=0.1"]))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"loss": {"beta": 0.1}, "train": {"max_steps": 4}}))
    (run / "config.yaml").write_text(yaml.safe_dump({"loss": {"beta": 0.1}, "train": {"max_steps": 4}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69}) + "\n")
    (run / "run_info.json").write_text("{}")
    return run


def test_unreadable_run_files_are_noted_not_silently_dropped(tmp_path, capsys):
    """A corrupt config.yaml, status.json or winrate.json reads as absent, and the run's notes
    (printed under dpo-report's table) name each one; files that are simply not there are not noted."""
    from launch.report import main

    clean = make_run(tmp_path, "0")
    broken = make_run(tmp_path, "1")
    (broken / "config.yaml").write_text("loss: {beta: [0.1\n")  # cut off mid-write
    (broken / "status.json").write_text('{"state": "runn')
    (broken / "winrate.json").write_text('["not", "an", "object"]')
    (broken / ".hydra" / "overrides.yaml").write_text("loss.beta=0.1\n")  # a string, not a list

    assert load_run(clean).notes == []
    run = load_run(broken)
    assert [note.split(" (")[0] for note in run.notes] == [
        "1: config.yaml is unreadable",
        "1: .hydra/overrides.yaml is unreadable",
        "1: winrate.json is unreadable",
        "1: status.json is unreadable",
    ]
    assert run.notes[0] == "1: config.yaml is unreadable (not YAML: expected ',' or ']', but got '<stream end>' at line 2); ignored"
    assert run.notes[1] == "1: .hydra/overrides.yaml is unreadable (not a YAML list); ignored"
    assert run.notes[2] == "1: winrate.json is unreadable (not a JSON object); ignored"
    assert run.notes[3].startswith("1: status.json is unreadable (not JSON: Unterminated string")
    assert run.winrate is None and run.overrides == [] and run.status == "incomplete"
    assert run.param("train.max_steps") == 4, "the Hydra copy of the config is still read"

    assert main([str(tmp_path), "--no-plot"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-4:] == run.notes
