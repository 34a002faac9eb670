"""User errors are one line ``prog: error: ...`` on stderr and a non-zero exit, never a traceback:
a model that cannot be loaded, argparse usage errors, bad option values."""

from __future__ import annotations

import pytest

from tests.helpers import run_cli

OFFLINE = {"HF_HUB_OFFLINE": "1"}


def one_error_line(stderr: str, prog: str) -> str:
    """The only ``error:`` line of ``stderr`` (asserting there is exactly one and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if "error:" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- model.path


@pytest.mark.parametrize(
    "module, prog, extra",
    [
        ("launch.train", "dpo-train", ["train.max_steps=1", "cluster.nproc_per_node=2"]),
        ("launch.precompute", "dpo-precompute", []),
    ],
)
def test_unloadable_model_path_is_one_line_from_all_ranks(tmp_path, module, prog, extra):
    missing = tmp_path / "nomodel"
    missing.mkdir()  # there, but no model in it: the ranks find out
    result = run_cli(module, f"model.path={missing}", f"output_dir={tmp_path / 'run'}", *extra, env=OFFLINE)
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error_line(result.stderr, prog)
    assert line.startswith(f"{prog}: error: model.path={missing}: no model/tokenizer there ("), line


@pytest.mark.parametrize("key", ["model.path", "model.tokenizer_path"])
def test_a_model_directory_that_is_not_there_is_one_line_before_any_rank(tmp_path, key):
    missing = tmp_path / "nomodel"
    result = run_cli("launch.train", f"{key}={missing}", f"output_dir={tmp_path / 'run'}", env=OFFLINE)
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error_line(result.stderr, "dpo-train")
    assert line == f"dpo-train: error: {key}={missing}: no model/tokenizer there (no such directory; models are read from local directories, nothing is downloaded)"
    assert "[rank" not in result.stderr  # refused by the launcher: no rank started


def test_a_reference_model_that_cannot_score_the_policy_is_one_line_before_any_rank(tmp_path):
    """reference.model_path must be there, share the policy's vocabulary and, for TR-DPO (whose
    update mixes the two models' weights), its architecture."""
    from tests.helpers import bundled_llama_config

    def model_dir(name, **changes):
        _, config = bundled_llama_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)
        for key, value in changes.items():
            setattr(config, key, value)
        config.save_pretrained(tmp_path / name)  # config.json is all the launcher reads
        return tmp_path / name

    policy, wide, other_vocab = model_dir("policy"), model_dir("wide", num_hidden_layers=3), model_dir("vocab", vocab_size=128)
    base = [f"model.path={policy}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1"]
    cases = [
        ([f"reference.model_path={tmp_path / 'missing'}"], f"reference.model_path={tmp_path / 'missing'}: no model/tokenizer there (no such directory"),
        ([f"reference.model_path={other_vocab}"], f"reference.model_path={other_vocab}: vocab_size 128 differs from model.path's 101, but it scores the policy's token ids"),
        (
            [f"reference.model_path={wide}", "reference.mode=online", "reference.sync_every=2"],
            f"reference.model_path={wide}: num_hidden_layers 3 differs from model.path's 2, but TR-DPO (reference.sync_every) mixes its weights with the policy's",
        ),
    ]
    for extra, expected in cases:
        result = run_cli("launch.train", *base, *extra, env=OFFLINE)
        assert result.returncode == 2, result.stderr[-3000:]
        assert one_error_line(result.stderr, "dpo-train").startswith(f"dpo-train: error: {expected}")
        assert "[rank" not in result.stderr


@pytest.mark.parametrize(
    "override, expected",
    [
        ("output_dir=/proc/dpo_dist_cannot", "dpo-train: error: output_dir=/proc/dpo_dist_cannot: cannot create it ("),
        ("reference.cache_dir=/proc/dpo_dist_cannot", "dpo-train: error: reference.cache_dir=/proc/dpo_dist_cannot: cannot create it ("),
    ],
)
def test_directories_that_cannot_be_made_are_one_line(tmp_path, override, expected):
    args = [override] if override.startswith("output_dir") else [override, f"output_dir={tmp_path / 'run'}"]
    result = run_cli("launch.train", *args, "train.max_steps=1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert one_error_line(result.stderr, "dpo-train").startswith(expected)


@pytest.mark.parametrize("argv", [["train", "output_dir=x"], ["loss.beta", "=", "0.5"]])
def test_a_word_that_is_not_an_override_is_one_line(argv):
    result = run_cli("launch.train", *argv)
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error_line(result.stderr, "dpo-train")
    assert line.startswith(f"dpo-train: error: {argv[0]!r} is not an override: write key=value"), line


def test_load_failures_name_their_key_and_other_os_errors_stay_bugs(tmp_path):
    from transformers import AutoTokenizer

    from dpo_dist.config import config_from_dict
    from dpo_dist.worker import user_error_message

    def load_error(path) -> BaseException:
        with pytest.raises((OSError, ValueError)) as info:
            AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return info.value

    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    cfg = config_from_dict({"model": {"path": str(missing)}, "output_dir": str(tmp_path / "run")})
    message = user_error_message(load_error(missing), cfg)
    assert message and message.startswith(f"model.path={missing}: no model/tokenizer there (") and "\n" not in message
    cfg = config_from_dict({"model": {"tokenizer_path": str(empty)}, "output_dir": str(tmp_path / "run")})
    assert user_error_message(load_error(empty), cfg).startswith(f"model.tokenizer_path={empty}: no model/tokenizer")
    # An OSError that no from_pretrained raised is not a model path: a bug keeps its traceback.
    assert user_error_message(OSError("No space left on device"), cfg) is None
    assert user_error_message(ValueError("bad"), cfg) is None


# ----------------------------------------------------------------------------- argparse


def _main(name: str):
    import importlib

    return importlib.import_module(name).main


@pytest.mark.parametrize(
    "module, prog, argv, expected",
    [
        ("launch.data", "dpo-data", [], "the following arguments are required: COMMAND"),
        ("launch.data", "dpo-data check", ["check"], "the following arguments are required: PATH"),
        ("launch.data", "dpo-data stats", ["stats", "x.jsonl", "--max-length", "ten"], "argument --max-length"),
        ("launch.export", "dpo-export", ["--dtype", "int3", "ckpt"], "argument --dtype: invalid choice"),
        ("launch.serve", "dpo-serve", [], "the following arguments are required: MODEL_DIR"),
        ("launch.report", "dpo-report", ["runs", "--bogus"], "unrecognized arguments: --bogus"),
        ("launch.plan", "dpo-plan", ["--bogus"], "unrecognized arguments: --bogus"),
        ("tools.bench", "dpo-bench", ["--preset", "nope", "--out", "x.json"], "argument --preset: invalid choice"),
    ],
)
def test_usage_errors_are_one_line_exit_2(capsys, module, prog, argv, expected):
    with pytest.raises(SystemExit) as info:
        _main(module)(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert "usage:" not in captured.err
    line = one_error_line(captured.err, prog)
    assert captured.err == line + "\n"
    assert expected in line and line.endswith(" (see --help)"), line


@pytest.mark.parametrize(
    "gpus, expected",
    [("32,x", "--gpus: expected comma-separated integers, got '32,x'"), ("32,0", "--gpus: GPU counts must be positive")],
)
def test_plan_gpus_names_the_option(capsys, gpus, expected):
    from launch.plan import main

    with pytest.raises(SystemExit) as info:
        main(["experiment=llama3_70b_64gpu", "--throughput", "--gpus", gpus])
    assert info.value.code == 2
    line = one_error_line(capsys.readouterr().err, "dpo-plan")
    assert expected in line, line


def test_plan_gpus_parses_the_list():
    from launch.plan import parse_args

    args, overrides = parse_args(["loss.beta=0.2", "--gpus", "8,64"])
    assert args.gpus == [8, 64] and overrides == ["loss.beta=0.2"]
    assert parse_args([])[0].gpus == [32, 64, 128, 256, 512]
