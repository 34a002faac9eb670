"""``dpo-data``: check and describe preference data files.

``dpo-data check PATH [PATH ...] [--tokenizer DIR]`` prints one ``PATH:LINE: reason`` line per
bad record (and ``PATH: no records`` for a file without any, which training refuses), then ``N
good, M bad`` over the files it could read; it exits 0 when all records are good, 1 when any is
bad or a file is empty, 2 on a usage error (no path, a missing file, an unsupported or unreadable
format, a tokenizer that cannot be loaded). Records are tokenized as training tokenizes them
(``encode_records``), so the bad ones are exactly those training's data step refuses: invalid
records, chat records the tokenizer's template cannot render, and pairs whose chosen and
rejected encode to the same token ids.

``--tokenizer DIR`` (check, stats, audit) is the run's tokenizer: ``model.tokenizer_path``, or
``model.path`` when that is unset; the default is the bundled tokenizer, which the default
``model.path`` holds. ``--max-length N`` (stats, audit) defaults to ``DataConfig.max_length``.

``dpo-data stats PATH [--tokenizer DIR] [--max-length N]`` prints record counts, token-length
percentiles and how many pairs ``data.max_length=N`` would truncate. A file without records is
refused as training refuses it (``PATH: no records``, exit 2).

``dpo-data audit PATH [--eval PATH] [--out DIR] [--tokenizer DIR] [--max-length N]`` prints one
``name: count`` line per check (``dpo_dist.audit.CHECKS``; ``leakage: -`` without ``--eval``: not
checked), then the paths of ``DIR/audit.md`` and ``DIR/audit.png``; exit 0.

``dpo-data generate --model DIR --prompts FILE --out FILE.jsonl [--num-samples N] [--judge
rule|reward_model]`` samples N responses per prompt and writes the judge's best and worst as a
pair; prompts whose samples tie (or are empty) are skipped and counted. ``--tie-margin`` is for
``--judge reward_model`` only (the rule judge scores pass/fail; it refuses a margin). Prompts are
asked as training renders them: the string prompt of a record with chat-message responses is a
user turn.

Subcommands live in ``SUBCOMMANDS``: adding one is a function that declares its arguments, a
function that runs it and returns the exit code, and one entry in that list.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpo_dist.config import DataConfig
from dpo_dist.data import DataError, ReadResult, bundled_tokenizer_path, encode_records, read_preferences
from dpo_dist.data.records import FIELDS
from dpo_dist.data.tokenize import use_chat_template
from launch.common import ArgumentParser

EXIT_OK, EXIT_BAD_DATA, EXIT_USAGE = 0, 1, 2
DEFAULT_MAX_LENGTH = DataConfig.max_length
"""``--max-length``'s default: the config schema's ``data.max_length`` (one default for every subcommand)."""
_CHECK_CHUNK = 16384
"""Records ``dpo-data check`` encodes at a time (``encode_records`` batches within): its memory
stays bounded on big files, as it keeps only counts and problems, not token ids."""


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A mistake in how the command was called; printed as one line, exit code 2."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.subcommand.run(args)
    except (DataError, UsageError) as e:
        print(f"dpo-data: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="dpo-data", description="Check and describe preference data.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for subcommand in SUBCOMMANDS:
        sub = commands.add_parser(subcommand.name, help=subcommand.help, description=subcommand.help)
        subcommand.add_arguments(sub)
        sub.set_defaults(subcommand=subcommand)
    return parser


# ---- check ---------------------------------------------------------------------------------------


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help=".jsonl, .json, .parquet or datasets dir")
    _tokenizer_argument(parser)
    _columns_arguments(parser)


def _tokenizer_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer", metavar="DIR", default=None,
        help="the run's tokenizer: its model.tokenizer_path, or model.path when unset "
        "(default: the bundled one, as the default model.path)",
    )
    parser.add_argument(
        "--chat-template", metavar="JINJA_OR_FILE", default=None,
        help="the run's data.chat_template, used instead of the tokenizer's own",
    )


def _columns_arguments(parser: argparse.ArgumentParser) -> None:
    for field_name in FIELDS:
        parser.add_argument(
            f"--{field_name}-key", metavar="KEY", default=field_name,
            help=f"the record key of the {field_name}{' response' if field_name != 'prompt' else ''} "
            f"(data.{field_name}_key; default: %(default)s)",
        )


def _columns(args: argparse.Namespace) -> tuple[str, str, str]:
    """The ``--*-key`` flags as ``read_preferences``' ``columns``."""
    columns = (args.prompt_key, args.chosen_key, args.rejected_key)
    if len(set(columns)) != 3 or not all(c.strip() for c in columns):
        raise UsageError(f"--prompt-key, --chosen-key and --rejected-key must be distinct names, got {list(columns)}")
    return columns


def _max_length_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--max-length", type=int, default=DEFAULT_MAX_LENGTH, metavar="N",
        help=f"{help} (default: %(default)s, data.max_length's default in the config schema)",
    )


def run_check(args: argparse.Namespace) -> int:
    # Before any output: a --tokenizer that cannot be loaded is a usage error, not a bad file.
    tokenizer = _load_tokenizer(args.tokenizer or bundled_tokenizer_path(), args.chat_template)
    good = bad = 0
    read = unreadable = empty = False
    for path in args.paths:
        try:
            result = read_preferences(path, _columns(args))
        except DataError as e:
            # Keep checking the other files; the exit code still reports the usage error.
            print(f"dpo-data: error: {e}", file=sys.stderr)
            unreadable = True
            continue
        read = True
        num_good, problems = _check_records(result, tokenizer)
        for problem in problems:
            print(problem)
        if not result.num_records:
            print(f"{path}: no records")
            empty = True
        good += num_good
        bad += len(problems)
    if read:  # no summary of files that could not be read: "0 good, 0 bad" would say they were
        print(f"{good} good, {bad} bad")
    if unreadable:
        return EXIT_USAGE
    return EXIT_BAD_DATA if bad or empty else EXIT_OK


def _check_records(result: ReadResult, tokenizer) -> tuple[int, list]:
    """(good records, every problem in line order) of one file, as training's data step finds
    them: the read problems, then what tokenizing finds (a chat template that fails, chosen and
    rejected that encode to the same ids)."""
    unencodable: list = []
    good = 0
    for start in range(0, len(result.records), _CHECK_CHUNK):
        chunk = result.records[start : start + _CHECK_CHUNK]
        good += len(encode_records(chunk, tokenizer, source=result.path, problems=unencodable))
    return good, sorted(result.problems + unencodable, key=lambda problem: problem.line)


def _read_records(path: str, columns) -> ReadResult:
    """``read_preferences``, refusing a file without records as training does (``PATH: no records``)."""
    result = read_preferences(path, columns)
    if not result.num_records:
        raise DataError(f"{result.path}: no records")
    return result


# ---- stats ---------------------------------------------------------------------------------------

_PERCENTILES = (50, 90, 99)


def _stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help=".jsonl, .json, .parquet or datasets dir")
    _tokenizer_argument(parser)
    _columns_arguments(parser)
    _max_length_argument(parser, "data.max_length to test")


def run_stats(args: argparse.Namespace) -> int:
    if args.max_length < 1:
        raise UsageError(f"--max-length must be positive, got {args.max_length}")
    tokenizer = _load_tokenizer(args.tokenizer or bundled_tokenizer_path(), args.chat_template)
    result = _read_records(args.path, _columns(args))
    unencodable: list = []  # chat records the template cannot render, responses that encode identically
    pairs = encode_records(result.records, tokenizer, source=result.path, problems=unencodable)
    print(f"{result.path}: {result.num_records} records, {len(result.problems) + len(unencodable)} bad, {len(pairs)} pairs")
    if not pairs:
        return EXIT_OK
    prompt = np.array([p.prompt_len for p in pairs])
    chosen = np.array([p.chosen_len for p in pairs])
    rejected = np.array([p.rejected_len for p in pairs])
    sequence = np.concatenate([prompt + chosen, prompt + rejected])
    rows = {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "sequence": sequence,
        "pair": 2 * prompt + chosen + rejected,
    }
    print(f"{'tokens':<10}" + "".join(f"{name:>9}" for name in [*(f"p{q}" for q in _PERCENTILES), "max"]))
    for name, values in rows.items():
        cells = [*np.percentile(values, _PERCENTILES, method="inverted_cdf"), values.max()]
        print(f"{name:<10}" + "".join(f"{int(c):>9}" for c in cells))
    over = int(np.count_nonzero(np.maximum(prompt + chosen, prompt + rejected) > args.max_length))
    print(f"over max-length {args.max_length}: {over} of {len(pairs)} pairs would be truncated (or dropped)")
    return EXIT_OK


def _load_tokenizer(directory: str, chat_template: str | None = None):
    """The tokenizer in ``directory``, with ``--chat-template`` (``data.chat_template``) if given."""
    # A name that is not a local folder would make transformers try the Hub; never download here.
    if not os.path.isdir(directory):
        raise UsageError(f"--tokenizer {directory}: not a directory")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        one_line = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"--tokenizer {directory}: cannot load a tokenizer: {one_line}") from None
    if tokenizer.eos_token_id is None:  # training refuses it too (encode_records), for every file
        raise UsageError(f"--tokenizer {directory}: the tokenizer has no EOS token; responses must end with one")
    try:
        return use_chat_template(tokenizer, chat_template)
    except DataError as e:
        raise UsageError(str(e).replace("data.chat_template=", "--chat-template ", 1)) from None


# ---- shards --------------------------------------------------------------------------------------


def _shards_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache_dir", metavar="DIR", help="reference log-prob cache (reference.cache_dir)")


def run_shards(args: argparse.Namespace) -> int:
    """Manifest summary, then every shard re-hashed, for DIR and the eval splits' caches in it
    (DIR/eval-<fingerprint>, one per eval file): exit 0 if the caches check out, 1 if not."""
    from dpo_dist.reference import describe_cache, verify_cache

    cache_dir = Path(args.cache_dir)
    if not cache_dir.is_dir():
        reason = "not a directory" if cache_dir.exists() else "no such directory"
        raise UsageError(f"{args.cache_dir}: {reason}")
    # A run with eval data writes the eval split's cache inside the train one, one per eval file.
    splits = [cache_dir] + sorted(p for p in cache_dir.glob("eval-*") if p.is_dir())
    problems = []
    for split_dir in splits:
        if split_dir != cache_dir:
            print(f"eval split: {split_dir}")
        for line in describe_cache(split_dir):
            print(line)
        split_problems = verify_cache(split_dir)
        for problem in split_problems:
            print(f"problem: {problem}")
        problems += split_problems
    verified = "all shards match their sha256" + (" (train and eval)" if len(splits) > 1 else "")
    noun = "problem" if len(problems) == 1 else "problems"
    print(f"verified: {verified}" if not problems else f"{len(problems)} {noun}")
    return EXIT_BAD_DATA if problems else EXIT_OK


# ---- audit ---------------------------------------------------------------------------------------


def _audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="preference data to audit (.jsonl, .json, .parquet, datasets dir)")
    parser.add_argument("--eval", metavar="PATH", default=None, help="held-out data: count prompts leaked from PATH")
    parser.add_argument("--out", metavar="DIR", default="audit", help="where audit.md and audit.png go (default: ./audit)")
    _tokenizer_argument(parser)
    _columns_arguments(parser)
    _max_length_argument(parser, "data.max_length for the truncation count")


def _make_dir(flag: str, directory: Path) -> None:
    """Create ``directory`` (and parents), or raise the one-line ``UsageError`` naming ``flag``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # FileExistsError when it, or a parent, is a file
        raise UsageError(f"{flag} {directory}: cannot create directory: {e.strerror or e}") from None


def run_audit(args: argparse.Namespace) -> int:
    """``name: count`` per check, then the paths of the markdown report and the histogram."""
    from dpo_dist.audit import audit, write_report

    if args.max_length < 1:
        raise UsageError(f"--max-length must be positive, got {args.max_length}")
    # Before the work: a bad --out found only when writing would waste the whole audit.
    _make_dir("--out", Path(args.out))
    tokenizer_dir = args.tokenizer or bundled_tokenizer_path()
    tokenizer = _load_tokenizer(tokenizer_dir, args.chat_template)
    result = audit(args.path, tokenizer, eval_path=args.eval, max_length=args.max_length, columns=_columns(args))
    for line in result.summary_lines():
        print(line)
    try:
        report, png = write_report(result, args.out, tokenizer_dir)
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot write the report: {e.strerror or e}") from None
    print(f"report: {report}")
    print(f"histogram: {png}")
    return EXIT_OK


# ---- generate ------------------------------------------------------------------------------------


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", required=True, help="local Hugging Face causal LM to sample from")
    parser.add_argument("--prompts", metavar="FILE", required=True, help=".jsonl/.json with a 'prompt' per record, or .txt")
    parser.add_argument("--out", metavar="FILE.jsonl", required=True, help="prompt/chosen/rejected records to write")
    parser.add_argument("--num-samples", type=int, default=2, metavar="N", help="responses per prompt (>= 2)")
    parser.add_argument("--judge", choices=("rule", "reward_model"), default="rule", help="who ranks the samples")
    parser.add_argument("--reward-model", metavar="DIR", default=None, help="--judge reward_model: its directory")
    parser.add_argument(
        "--tie-margin", type=float, default=0.0,
        help="--judge reward_model: score gap at or below which a prompt is a tie",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="rows generated together")
    parser.add_argument("--max-prompts", type=int, default=0, metavar="N", help="use the first N prompts (0: all)")


def _check_generate_args(args: argparse.Namespace) -> None:
    if args.num_samples < 2:
        raise UsageError(f"--num-samples must be at least 2, got {args.num_samples}")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.temperature <= 0 or not 0 < args.top_p <= 1 or args.tie_margin < 0 or args.max_prompts < 0:
        raise UsageError("need --temperature > 0, 0 < --top-p <= 1, --tie-margin >= 0 and --max-prompts >= 0")
    # The rule judge's scores are pass/fail (1 or 0): a margin under 1 changes nothing, one of 1 or
    # more makes every prompt a tie. Either way the flag would not do what it says.
    if args.judge == "rule" and args.tie_margin != 0:
        raise UsageError(
            f"--tie-margin {args.tie_margin:g} needs --judge reward_model: --judge rule scores a response "
            "1 (verified) or 0, so a margin has no meaning for it"
        )
    if not args.out.endswith(".jsonl"):
        raise UsageError(f"--out {args.out}: must be a .jsonl file")
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: is a directory")
    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model}: not a directory")
    if args.judge == "reward_model" and not (args.reward_model and os.path.isdir(args.reward_model)):
        raise UsageError(f"--judge reward_model needs --reward-model DIR (got {args.reward_model})")


def run_generate(args: argparse.Namespace) -> int:
    """Sample responses, rank them with the judge, write the best/worst of each prompt as a pair."""
    import json

    from dpo_dist.generation import (
        GenerationError,
        SamplingParams,
        generate_preferences,
        load_causal_lm,
        read_prompts,
    )
    from dpo_dist.judges import JudgeError, RewardModelJudge, RuleJudge

    _check_generate_args(args)
    out = Path(args.out)
    _make_dir("--out", out.parent)  # before sampling, which may take hours
    try:
        items = read_prompts(args.prompts)
        items = items[: args.max_prompts] if args.max_prompts else items
        if args.judge == "rule":
            judge = RuleJudge()
            judge.check_prompts([item.prompt for item in items])
        else:
            judge = RewardModelJudge(args.reward_model, batch_size=args.batch_size, tie_margin=args.tie_margin)
        model, tokenizer = load_causal_lm(args.model)
        params = SamplingParams(args.max_new_tokens, True, args.temperature, args.top_p)
        records, stats = generate_preferences(
            model, tokenizer, items, judge, num_samples=args.num_samples, params=params,
            batch_size=args.batch_size, seed=args.seed,
        )
    except (GenerationError, JudgeError) as e:
        raise UsageError(str(e)) from None
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"--out {args.out}: cannot write: {e.strerror or e}") from None
    for line in stats.lines():
        print(line)
    print(f"wrote {out}")
    return EXIT_OK


SUBCOMMANDS = [
    Subcommand(
        "check", "validate records; one PATH:LINE: reason line per bad record", _check_arguments, run_check
    ),
    Subcommand("stats", "record counts and token-length percentiles", _stats_arguments, run_stats),
    Subcommand("shards", "summarize a reference cache and verify every shard's sha256", _shards_arguments, run_shards),
    Subcommand(
        "audit", "duplicates, near duplicates, leakage, length bias, truncation: counts + report", _audit_arguments, run_audit
    ),
    Subcommand(
        "generate", "sample responses from a local model and label them into preference pairs", _generate_arguments,
        run_generate,
    ),
]


if __name__ == "__main__":
    sys.exit(main())
