"""``dpo-data audit``: exact counts per check on crafted files, the summary-line contract, report and PNG."""

from __future__ import annotations

import json
import random
import string

import pytest

from dpo_dist.audit import CHECKS, near_duplicate_pairs, normalize
from launch.data import main

LONG = " ".join(["the quick brown fox jumps over the lazy dog and keeps running"] * 4)


def _write(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


@pytest.fixture
def crafted(tmp_path):
    train = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},  # line 1
        {"prompt": "what is  2+2? ", "chosen": "4", "rejected": "5"},  # 2: duplicate of 1 (normalised)
        {"prompt": "Tell a story.", "chosen": LONG, "rejected": "no"},  # 3: long, truncated at 64 tokens
        {"prompt": "Tell a story.", "chosen": LONG[:-1] + "x", "rejected": "no"},  # 4: near duplicate of 3
        {"prompt": "Name a colour.", "chosen": "Same Answer", "rejected": "same  answer"},  # 5: identical (normalised)
        {"prompt": "Name a shape.", "chosen": "circle", "rejected": "circle"},  # 6: exact copy: invalid too
        "{not json",  # 7: invalid
        {"prompt": "Pick a number.", "chosen": "7", "rejected": "seven"},  # 8: rejected longer
    ]
    evals = [
        {"prompt": "WHAT IS 2+2?", "chosen": "4", "rejected": "3"},  # leaked (normalised)
        {"prompt": "A brand new question?", "chosen": "yes", "rejected": "no"},
    ]
    return _write(tmp_path / "train.jsonl", train), _write(tmp_path / "eval.jsonl", evals)


def test_counts_summary_lines_report_and_png(crafted, tmp_path, capsys):
    train, evals = crafted
    out = tmp_path / "report"
    assert main(["audit", train, "--eval", evals, "--out", str(out), "--max-length", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Chosen longer (char-level tokenizer): lines 3 and 4 only; line 5 is "Same Answer" vs "same  answer".
    expected = {
        "duplicates": 1,
        "near_duplicates": 1,
        "leakage": 1,
        "identical_responses": 2,
        "length_bias": 2,
        "truncated": 2,
        "duplicate_prompts": 2,
        "invalid": 2,
    }
    assert lines[: len(CHECKS)] == [f"{name}: {expected[name]}" for name in CHECKS]
    assert lines[len(CHECKS) :] == [f"report: {out / 'audit.md'}", f"histogram: {out / 'audit.png'}"]
    report = (out / "audit.md").read_text()
    assert "| near_duplicates | 1 |" in report and f"{train}:4 ~ {train}:3" in report
    assert f"{evals}:1 prompt is in {train}:1" in report
    assert f"{train}:6 (exact copy)" in report and "![token length histograms](audit.png)" in report
    png = (out / "audit.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(out / "audit.png").shape
    assert width > 3 * height / 2


def test_length_bias_warning_and_no_eval(tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "chosen": "a long answer", "rejected": "short"} for i in range(5)]
    path = _write(tmp_path / "biased.jsonl", rows)
    assert main(["audit", path, "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Not checked is not "no leakage": the count is "-" without --eval.
    assert "length_bias: 5" in lines and "leakage: -" in lines
    report = (tmp_path / "out" / "audit.md").read_text()
    assert "**Warning**" in report and "leakage not checked" in report and "| leakage | - |" in report


def test_a_chat_record_the_template_cannot_render_is_invalid_not_fatal(tmp_path, capsys):
    """Training counts such a record invalid (data.on_invalid); the audit must too, and go on."""
    chat = {"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "bb"}]}
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "wizard", "content": "hi"}], **chat},  # line 2: no such role in the template
        {"prompt": [{"role": "user", "content": "hi"}], **chat},
    ]
    path = _write(tmp_path / "chat.jsonl", rows)
    assert main(["audit", path, "--out", str(tmp_path / "out")]) == 0
    assert "invalid: 1" in capsys.readouterr().out.splitlines()
    report = (tmp_path / "out" / "audit.md").read_text()
    assert f"- {path}:2: chat template failed: unknown chat role: wizard" in report
    assert "| rejected | " in report  # the other two records were still measured


@pytest.mark.parametrize(
    "args, message",
    [
        (["audit", "missing.jsonl"], "missing.jsonl: no such file or directory"),
        (["audit", "{train}", "--tokenizer", "/nonexistent"], "--tokenizer /nonexistent: not a directory"),
        (["audit", "{train}", "--max-length", "0"], "--max-length must be positive"),
    ],
)
def test_usage_errors_are_one_line_exit_2(crafted, args, message, capsys):
    args = [a.replace("{train}", crafted[0]) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpo-data: error: ") and message in err[0]


def test_near_duplicates_use_the_jaccard_threshold():
    rng = random.Random(0)
    base = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(400))
    one_edit = base[:200] + "#" + base[201:]  # 5-gram Jaccard about 0.98
    many_edits = "".join("#" if i % 12 == 0 else c for i, c in enumerate(base))  # about 0.5
    unrelated = "".join(rng.choice(string.ascii_lowercase) for _ in range(400))
    pairs = near_duplicate_pairs([base, unrelated, one_edit, many_edits, base])
    assert [(i, j) for i, j, _ in pairs] == [(2, 0), (4, 0)]
    # Exact repeats are the duplicates check's business; skipping them leaves the near one.
    assert [(i, j) for i, j, _ in near_duplicate_pairs([base, unrelated, one_edit, base], skip={3})] == [(2, 0)]


def test_normalize():
    assert normalize("  Hello\tWORLD \n") == "hello world"
    assert normalize("ﬁne") == "fine"  # NFKC folds the ligature
    assert normalize([{"role": "user", "content": "Hi  there"}]) == "user: hi there"
