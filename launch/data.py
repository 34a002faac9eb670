"""``dpo-data``: check and describe preference data files.

``dpo-data check PATH [PATH ...]`` prints one ``PATH:LINE: reason`` line per bad record, then
``N good, M bad``; it exits 0 when all records are good, 1 when any is bad, 2 on a usage error
(no path, a missing file, an unsupported or unreadable format).

``dpo-data stats PATH [--tokenizer DIR] [--max-length N]`` prints record counts, token-length
percentiles and how many pairs ``data.max_length=N`` would truncate.

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

from dpo_dist.data import DataError, bundled_tokenizer_path, encode_records, read_preferences

EXIT_OK, EXIT_BAD_DATA, EXIT_USAGE = 0, 1, 2


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
    parser = argparse.ArgumentParser(prog="dpo-data", description="Check and describe preference data.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for subcommand in SUBCOMMANDS:
        sub = commands.add_parser(subcommand.name, help=subcommand.help, description=subcommand.help)
        subcommand.add_arguments(sub)
        sub.set_defaults(subcommand=subcommand)
    return parser


# ---- check ---------------------------------------------------------------------------------------


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help=".jsonl, .json, .parquet or datasets dir")


def run_check(args: argparse.Namespace) -> int:
    good = bad = 0
    unreadable = False
    for path in args.paths:
        try:
            result = read_preferences(path)
        except DataError as e:
            # Keep checking the other files; the exit code still reports the usage error.
            print(f"dpo-data: error: {e}", file=sys.stderr)
            unreadable = True
            continue
        for problem in result.problems:
            print(problem)
        good += len(result.records)
        bad += len(result.problems)
    print(f"{good} good, {bad} bad")
    if unreadable:
        return EXIT_USAGE
    return EXIT_BAD_DATA if bad else EXIT_OK


# ---- stats ---------------------------------------------------------------------------------------

_PERCENTILES = (50, 90, 99)


def _stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help=".jsonl, .json, .parquet or datasets dir")
    parser.add_argument(
        "--tokenizer", metavar="DIR", default=None, help="local tokenizer folder (default: the bundled one)"
    )
    parser.add_argument("--max-length", type=int, default=1024, metavar="N", help="data.max_length to test")


def run_stats(args: argparse.Namespace) -> int:
    if args.max_length < 1:
        raise UsageError(f"--max-length must be positive, got {args.max_length}")
    tokenizer = _load_tokenizer(args.tokenizer or bundled_tokenizer_path())
    result = read_preferences(args.path)
    pairs = encode_records(result.records, tokenizer, source=result.path)
    print(f"{result.path}: {result.num_records} records, {len(result.problems)} bad, {len(pairs)} pairs")
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


def _load_tokenizer(directory: str):
    # A name that is not a local folder would make transformers try the Hub; never download here.
    if not os.path.isdir(directory):
        raise UsageError(f"--tokenizer {directory}: not a directory")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        one_line = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"--tokenizer {directory}: cannot load a tokenizer: {one_line}") from None


# ---- shards --------------------------------------------------------------------------------------


def _shards_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache_dir", metavar="DIR", help="reference log-prob cache (reference.cache_dir)")


def run_shards(args: argparse.Namespace) -> int:
    """Manifest summary, then every shard re-hashed: exit 0 if the cache checks out, 1 if not."""
    from dpo_dist.reference import describe_cache, verify_cache

    if not Path(args.cache_dir).is_dir():
        raise UsageError(f"{args.cache_dir}: no such directory")
    for line in describe_cache(args.cache_dir):
        print(line)
    problems = verify_cache(args.cache_dir)
    for problem in problems:
        print(f"problem: {problem}")
    print("verified: all shards match their sha256" if not problems else f"{len(problems)} problems")
    return EXIT_BAD_DATA if problems else EXIT_OK


SUBCOMMANDS = [
    Subcommand(
        "check", "validate records; one PATH:LINE: reason line per bad record", _check_arguments, run_check
    ),
    Subcommand("stats", "record counts and token-length percentiles", _stats_arguments, run_stats),
    Subcommand("shards", "summarize a reference cache and verify every shard's sha256", _shards_arguments, run_shards),
]


if __name__ == "__main__":
    sys.exit(main())
