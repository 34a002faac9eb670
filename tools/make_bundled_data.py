"""Write the bundled preference data set (dpo_dist/assets/data/{train,eval}.jsonl).

The task itself (prompt formats, answers, plausible mistakes, the verifier) lives in
``dpo_dist.tasks``; this tool only fixes the sizes and seed, checks the result and writes it.
Output is byte-for-byte reproducible: same seed and sizes give identical files.

    python tools/make_bundled_data.py                      # the shipped files
    python tools/make_bundled_data.py --out-dir /tmp/data --seed 1 --train-size 2000
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package

from dpo_dist import tasks  # noqa: E402

DEFAULT_OUT_DIR = REPO_ROOT / "dpo_dist" / "assets" / "data"


def to_jsonl(records: list[dict]) -> str:
    """One compact JSON object per line, keys in a fixed order, so the bytes are reproducible."""
    lines = [
        json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}, ensure_ascii=True) for r in records
    ]
    return "\n".join(lines) + "\n"


def check(train: list[dict], evals: list[dict]) -> None:
    """Refuse to write a data set that breaks the task's promises (a generator bug, not bad luck)."""
    for split, records in (("train", train), ("eval", evals)):
        for i, r in enumerate(records):
            if not tasks.verify(r["prompt"], r["chosen"]) or tasks.verify(r["prompt"], r["rejected"]):
                raise AssertionError(f"{split}:{i + 1}: verifier disagrees with the labels: {r}")
    overlap = {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    if overlap:
        raise AssertionError(f"{len(overlap)} eval prompts also in train, e.g. {sorted(overlap)[:3]}")


def summary(name: str, records: list[dict], text: str) -> str:
    kinds = Counter(tasks.parse(r["prompt"]).kind for r in records)
    longest = max(len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) for r in records)
    per_kind = ", ".join(f"{k} {kinds[k]}" for k in tasks.KINDS)
    return f"{name}: {len(records)} pairs ({per_kind}); {len(text.encode())} bytes; longest {longest} chars"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--eval-size", type=int, default=400)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)

    train, evals = tasks.generate_splits(args.seed, args.train_size, args.eval_size)
    check(train, evals)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("eval", evals)):
        text = to_jsonl(records)
        (args.out_dir / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(summary(f"{args.out_dir / name}.jsonl", records, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
