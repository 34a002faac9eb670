"""``dpo-data check`` and ``dpo-data stats``: exact output and exit codes."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dpo_dist.config import DataConfig
from dpo_dist.data import DataError, bundled_tokenizer_path, load_tokenized
from launch.data import build_parser, main

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


# ---- check tokenizes as training does ------------------------------------------------------------

UNTOKENIZABLE = [
    {"prompt": "1+1=", "chosen": "2", "rejected": "3"},  # 1: good
    {"prompt": [{"role": "usr", "content": "2+2="}], "chosen": "4", "rejected": "5"},  # 2: template fails
    {"prompt": "3+3=", "chosen": "6</s>", "rejected": "6"},  # 3: same ids (EOS is appended when missing)
    {"prompt": "4+4="},  # 4: invalid record
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_check_reports_exactly_what_training_refuses(tmp_path, capsys, caplog):
    """The records training's data step refuses (read problems, a chat template that fails, chosen
    and rejected that encode alike) are the ones check lists: its hint sends users there."""
    path = write_jsonl(tmp_path / "d.jsonl", UNTOKENIZABLE)
    assert main(["check", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{path}:2: chat template failed: unknown chat role: usr",
        f"{path}:3: chosen and rejected encode to the same token ids",
        f"{path}:4: missing key 'chosen'",
        "1 good, 3 bad",
    ]
    tokenizer = AutoTokenizer.from_pretrained(bundled_tokenizer_path(), local_files_only=True)
    # data.on_invalid=skip drops exactly these records (and logs them in the same words) ...
    with caplog.at_level(logging.WARNING, logger="dpo_dist.data"):
        dataset = load_tokenized(path, tokenizer, DataConfig.max_length, on_invalid="skip")
    assert len(dataset) == 1
    assert [m.strip() for m in caplog.messages if m.startswith("  ")] == lines[:3]
    # ... and data.on_invalid=error refuses the file for them (for the read problems first, before
    # tokenizing; check lists all at once).
    path = write_jsonl(tmp_path / "d.jsonl", UNTOKENIZABLE[:3])
    with pytest.raises(DataError, match=f"2 invalid records \\(first: {path}:2: chat template failed"):
        load_tokenized(path, tokenizer, DataConfig.max_length)
    assert main(["check", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [*lines[:2], "1 good, 2 bad"]


def test_check_uses_the_given_tokenizer(tmp_path, capsys):
    """--tokenizer is the run's tokenizer: one without a chat template cannot render chat records."""
    plain = tmp_path / "plain"
    shutil.copytree(bundled_tokenizer_path(), plain)
    (plain / "chat_template.jinja").unlink()
    chat = {"prompt": [{"role": "user", "content": "2+2="}], "chosen": "4", "rejected": "5"}
    path = write_jsonl(tmp_path / "d.jsonl", [chat])
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().out == "1 good, 0 bad\n"
    assert main(["check", str(path), "--tokenizer", str(plain)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}:1: chat messages need a tokenizer with a chat template",
        "0 good, 1 bad",
    ]
    assert main(["check", str(path), "--tokenizer", str(tmp_path / "none")]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", f"dpo-data: error: --tokenizer {tmp_path / 'none'}: not a directory\n")


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("dir", None, "a directory must be a dataset saved with save_to_disk"),
        ("missing.jsonl", "", "no such file or directory"),
        ("d.csv", "prompt,chosen,rejected\n", "unsupported format '.csv'"),
        ("d.json", '{"prompt": "p", "chosen": "a", "rejected": "b"}', "a .json file must hold a list of records, got object"),
    ],
)
def test_check_prints_no_summary_when_no_file_could_be_read(tmp_path, capsys, name, content, reason):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif name != "missing.jsonl":
        path.write_text(content)
    assert main(["check", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"dpo-data: error: {path}: {reason}") and captured.err.count("\n") == 1


# ---- stats and audit -----------------------------------------------------------------------------


def test_max_length_has_one_default_from_the_config_and_help_shows_it(capsys):
    parser = build_parser()
    for command in ("stats", "audit"):
        assert parser.parse_args([command, "x.jsonl"]).max_length == DataConfig.max_length
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        assert f"(default: {DataConfig.max_length}," in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["stats", "audit", "audit --eval"])
def test_stats_and_audit_refuse_a_file_without_records_as_training_does(tmp_path, capsys, command):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    if command == "audit --eval":
        good = write_jsonl(tmp_path / "good.jsonl", UNTOKENIZABLE[:1])
        args = ["audit", str(good), "--eval", str(empty), "--out", str(tmp_path / "out")]
    else:
        args = [command, str(empty), *(["--out", str(tmp_path / "out")] if command == "audit" else [])]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", f"dpo-data: error: {empty}: no records\n")


def test_other_key_names_are_read_by_training_and_check_alike(tmp_path, capsys):
    """data.prompt_key/chosen_key/rejected_key (OpenRLHF's --prompt_key...): the fields under those
    keys; reasons, and training's hint to dpo-data check, name the keys as the file spells them;
    the tokenization cache keeps other columns apart."""
    rows = [
        {"question": "2+2=", "good": "4", "bad": "5", "prompt": "ignored: not the prompt key"},
        {"question": "3+3=", "good": "6"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    columns = ("question", "good", "bad")
    flags = ["--prompt-key", "question", "--chosen-key", "good", "--rejected-key", "bad"]
    assert main(["check", str(path), *flags]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{path}:2: missing key 'bad'", "1 good, 1 bad"]
    tokenizer = AutoTokenizer.from_pretrained(bundled_tokenizer_path(), local_files_only=True)
    cache = tmp_path / "cache"
    dataset = load_tokenized(path, tokenizer, 64, on_invalid="skip", cache_dir=cache, columns=columns)
    assert len(dataset) == 1 and tokenizer.decode(dataset[0].prompt_ids, skip_special_tokens=True) == "2+2="
    with pytest.raises(DataError) as info:
        load_tokenized(path, tokenizer, 64, cache_dir=cache, columns=columns)
    assert str(info.value).endswith(f"(run `dpo-data check {path} --prompt-key question --chosen-key good --rejected-key bad` to list all)")
    with pytest.raises(DataError, match="2 invalid records"):  # the default keys: another cache entry, both records bad
        load_tokenized(path, tokenizer, 64, cache_dir=cache)
    assert main(["check", str(path), "--chosen-key", "question", "--prompt-key", "question"]) == 2
    assert "must be distinct names" in capsys.readouterr().err
    with pytest.raises(Exception, match=r"data.prompt_key: the three data.\*_key must be distinct"):
        DataConfig(prompt_key="x", chosen_key="x")
