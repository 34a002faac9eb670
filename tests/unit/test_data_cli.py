"""``dpo-data check`` and ``dpo-data stats``: exact output and exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest

from launch.data import main

REPO = Path(__file__).resolve().parents[2]
FIXTURES = "tests/fixtures/data"


def dpo_data(*args):
    """Run the CLI as a user would, from the repository root with relative paths."""
    return subprocess.run(
        [sys.executable, "-m", "launch.data", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_check_all_good_exits_0():
    done = dpo_data("check", f"{FIXTURES}/valid.jsonl")
    assert (done.returncode, done.stdout, done.stderr) == (0, "3 good, 0 bad\n", "")


def test_check_bad_records_exits_1_with_exact_lines():
    done = dpo_data("check", f"{FIXTURES}/mixed.json", f"{FIXTURES}/valid.jsonl", f"{FIXTURES}/mixed.jsonl")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[:4] == [
        f"{FIXTURES}/mixed.json:1: missing key 'rejected'",
        f"{FIXTURES}/mixed.json:2: record is not a JSON object",
        f"{FIXTURES}/mixed.json:4: 'chosen' is empty",
        f"{FIXTURES}/mixed.jsonl:4: invalid JSON: Expecting value at column 32",
    ]
    assert lines[-2] == f"{FIXTURES}/mixed.jsonl:18: chosen and rejected are identical"
    assert lines[-1] == "9 good, 16 bad"
    assert len(lines) == 3 + 13 + 1
    assert done.stderr == ""


def test_check_usage_errors_exit_2_without_traceback():
    missing = dpo_data("check", f"{FIXTURES}/valid.jsonl", "nope.jsonl")
    assert missing.returncode == 2
    assert missing.stdout == "3 good, 0 bad\n"
    assert missing.stderr == "dpo-data: error: nope.jsonl: no such file or directory\n"
    no_args = dpo_data("check")
    assert no_args.returncode == 2 and no_args.stdout == ""
    assert no_args.stderr == "dpo-data check: error: the following arguments are required: PATH (see --help)\n"
    for done in (missing, no_args):
        assert "Traceback" not in done.stderr


def test_unsupported_format_exits_2(tmp_path, capsys):
    (tmp_path / "d.txt").write_text("hello\n")
    assert main(["check", str(tmp_path / "d.txt")]) == 2
    assert capsys.readouterr().err.startswith(
        f"dpo-data: error: {tmp_path / 'd.txt'}: unsupported format '.txt'"
    )


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert capsys.readouterr().err == "dpo-data: error: the following arguments are required: COMMAND (see --help)\n"


def test_stats_prints_counts_percentiles_and_truncation(capsys):
    assert main(["stats", f"{REPO}/{FIXTURES}/valid.jsonl", "--max-length", "40"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{REPO}/{FIXTURES}/valid.jsonl: 3 records, 0 bad, 3 pairs",
        "tokens          p50      p90      p99      max",
        "prompt           13       64       64       64",
        "chosen            4        7        7        7",
        "rejected          6        9        9        9",
        "sequence         15       71       71       71",
        "pair             30      141      141      141",
        "over max-length 40: 1 of 3 pairs would be truncated (or dropped)",
    ]


def test_stats_counts_bad_records_and_rejects_a_missing_tokenizer(capsys, tmp_path):
    assert main(["stats", f"{REPO}/{FIXTURES}/mixed.jsonl"]) == 0
    assert (
        capsys.readouterr().out.splitlines()[0]
        == f"{REPO}/{FIXTURES}/mixed.jsonl: 17 records, 13 bad, 4 pairs"
    )
    assert main(["stats", f"{REPO}/{FIXTURES}/valid.jsonl", "--tokenizer", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == f"dpo-data: error: --tokenizer {tmp_path / 'none'}: not a directory\n"


def test_generate_refuses_a_tie_margin_with_the_rule_judge(tmp_path, capsys):
    """--judge rule scores pass/fail (1 or 0): a margin would silently change nothing (< 1) or
    drop every prompt (>= 1). It is a usage error, before any model is loaded; the default is fine."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("12+34=\n")
    out = tmp_path / "pairs.jsonl"
    common = ["generate", "--prompts", str(prompts), "--out", str(out)]
    assert main([*common, "--model", str(tmp_path), "--tie-margin", "0.5"]) == 2
    assert capsys.readouterr().err == (
        "dpo-data: error: --tie-margin 0.5 needs --judge reward_model: --judge rule scores a response "
        "1 (verified) or 0, so a margin has no meaning for it\n"
    )
    assert not out.exists()
    # The default margin with the rule judge gets past that check (to the next one, here).
    assert main([*common, "--model", str(tmp_path / "none"), "--tie-margin", "0"]) == 2
    assert capsys.readouterr().err == f"dpo-data: error: --model {tmp_path / 'none'}: not a directory\n"
