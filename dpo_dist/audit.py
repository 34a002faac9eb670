"""Audit a preference data set for the problems that quietly spoil DPO (``dpo-data audit``).

Checks, each a count (``CHECKS`` is their order in the summary):

- ``duplicates``: records identical to an earlier record after normalisation (Unicode NFKC,
  case-folded, whitespace collapsed) of prompt, chosen and rejected.
- ``near_duplicates``: other records whose character 5-gram sets have Jaccard similarity
  >= 0.9 with an earlier record. Candidates come from MinHash LSH (128 permutations, 16 bands of
  8 rows: a pair at 0.9 is found with probability > 0.999) and are confirmed by the exact Jaccard.
- ``leakage``: records of ``--eval`` whose normalised prompt is also a training prompt (``-``,
  not checked, without ``--eval``).
- ``identical_responses``: pairs whose chosen and rejected are equal after normalisation,
  including exact copies (which ``dpo-data check`` rejects as invalid).
- ``length_bias``: pairs whose chosen response has more tokens than the rejected one. Preference
  data where the longer answer usually wins teaches DPO to be verbose; the report gives the
  fraction and the mean difference.
- ``truncated``: pairs whose longer sequence (prompt + response) exceeds ``--max-length`` tokens.
- ``duplicate_prompts``: records whose normalised prompt appeared earlier (several pairs per
  prompt can be intended; it is reported, not judged).
- ``invalid``: records ``dpo-data check`` rejects (in the audited file and in ``--eval``), and
  chat records of the audited file that the tokenizer's chat template cannot render.

All but ``leakage`` and ``invalid`` look at the valid records of the audited file. Token counts
follow the training rule (``dpo_dist.data.tokenize``) with the given tokenizer.
"""

from __future__ import annotations

import logging
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpo_dist.data import DataError, PreferenceRecord, Problem, encode_records, read_preferences
from dpo_dist.data.records import FIELDS
from dpo_dist.data.subset import normalize  # also how data.eval_split groups records by prompt

log = logging.getLogger("dpo_dist.audit")

CHECKS = (
    "duplicates",
    "near_duplicates",
    "leakage",
    "identical_responses",
    "length_bias",
    "truncated",
    "duplicate_prompts",
    "invalid",
)
NEAR_DUPLICATE_JACCARD = 0.9
SHINGLE_CHARS = 5
MINHASH_PERMUTATIONS = 128
LSH_BANDS = 16
MAX_CANDIDATES = 64
"""Earlier records compared per record at most: keeps a file of near-identical templates linear."""
LENGTH_BIAS_WARN = 0.6
"""Warn when the chosen response is the longer one in at least this fraction of unequal pairs."""
EXAMPLES_SHOWN = 10
_IDENTICAL_REASON = "chosen and rejected are identical"
"""The reason ``dpo_dist.data.records.validate_record`` gives for an exact copy."""


@dataclass
class AuditResult:
    """Counts per check, example locations per check, token lengths and length-bias statistics."""

    path: str
    eval_path: str | None
    records: int
    eval_records: int
    max_length: int
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    lengths: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, check: str, example: str) -> None:
        """Count one finding of ``check``; the first few are kept as examples for the report."""
        self.counts[check] = self.counts.get(check, 0) + 1
        if len(self.examples[check]) < EXAMPLES_SHOWN:
            self.examples[check].append(example)

    def count_text(self, name: str) -> str:
        """A check's count, or ``-`` for ``leakage`` without an eval file (not checked, not zero)."""
        if name == "leakage" and self.eval_path is None:
            return "-"
        return str(self.counts.get(name, 0))

    def summary_lines(self) -> list[str]:
        """The ``name: count`` contract lines, every check in ``CHECKS`` order (``leakage: -``
        when it was not checked)."""
        return [f"{name}: {self.count_text(name)}" for name in CHECKS]


def record_text(record: PreferenceRecord) -> str:
    """A record's normalised prompt, chosen and rejected joined by a separator no text contains."""
    return "\x1f".join(normalize(getattr(record, name)) for name in ("prompt", "chosen", "rejected"))


def audit(path: str, tokenizer, *, eval_path: str | None = None, max_length: int = 512, columns: Sequence[str] = FIELDS) -> AuditResult:
    """Run every check on ``path`` (and leakage against ``eval_path``), its records' fields under
    the keys ``columns`` (``data.records``); a file without records raises ``DataError``
    (``PATH: no records``), as training does."""
    train = read_preferences(path, columns)
    evaluation = read_preferences(eval_path, columns) if eval_path else None
    for read in (train, evaluation):
        if read is not None and not read.num_records:
            raise DataError(f"{read.path}: no records")  # as training refuses it: nothing to audit
    result = AuditResult(train.path, eval_path, len(train.records), evaluation.num_records if evaluation else 0, max_length)
    where = {r.example_id: f"{train.path}:{r.line}" for r in train.records}
    for problem in [*train.problems, *(evaluation.problems if evaluation else [])]:
        result.add("invalid", str(problem))
    for problem in train.problems:
        if problem.reason == _IDENTICAL_REASON:
            result.add("identical_responses", f"{problem.path}:{problem.line} (exact copy)")
    texts = [record_text(r) for r in train.records]
    exact = check_duplicates(train.records, texts, where, result)
    check_near_duplicates(train.records, texts, exact, where, result)
    check_prompts(train.records, where, result)
    if evaluation is not None:
        check_leakage(train.records, evaluation.records, where, evaluation.path, result)
    check_lengths(train.records, tokenizer, where, result, source=train.path)
    return result


def check_duplicates(records: Sequence[PreferenceRecord], texts: Sequence[str], where, result: AuditResult) -> set[int]:
    """Count exact (normalised) duplicates; returns the positions of the repeated ones."""
    first: dict[str, int] = {}
    repeats = set()
    for i, text in enumerate(texts):
        if text in first:
            repeats.add(i)
            j = first[text]
            result.add("duplicates", f"{where[records[i].example_id]} repeats {where[records[j].example_id]}")
        else:
            first[text] = i
    return repeats


def check_near_duplicates(records, texts: Sequence[str], skip: set[int], where, result: AuditResult) -> None:
    """Count records with a Jaccard >= 0.9 earlier record (exact repeats are left to ``duplicates``)."""
    for i, j, similarity in near_duplicate_pairs(texts, skip):
        a, b = where[records[i].example_id], where[records[j].example_id]
        result.add("near_duplicates", f"{a} ~ {b} (Jaccard {similarity:.2f})")


def shingles(text: str, k: int = SHINGLE_CHARS) -> np.ndarray:
    """crc32 hashes of the distinct character k-grams (the whole text if it is shorter)."""
    grams = {text[i : i + k] for i in range(max(1, len(text) - k + 1))}
    return np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))


def minhash(sets: Sequence[np.ndarray], num_perm: int = MINHASH_PERMUTATIONS, seed: int = 0) -> np.ndarray:
    """``[len(sets), num_perm]`` MinHash signatures.

    Each permutation is a multiply-shift hash ``(a*x + b) mod 2^64 >> 32`` with odd random ``a``
    (a universal family; uint64 arithmetic wraps, so no slow modulo is needed).
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64)
    out = np.empty((len(sets), num_perm), dtype=np.uint64)
    sizes = np.array([len(s) for s in sets])
    start = 0
    while start < len(sets):
        # Chunks of about a million hashed shingles bound the temporary [shingles, num_perm] array.
        stop = start + max(1, int(np.searchsorted(np.cumsum(sizes[start:]), 1_000_000 // num_perm * 8)))
        part = sets[start:stop]
        values = np.concatenate(part)
        hashed = values[:, None] * a  # in place from here on: this is the audit's hot loop
        hashed += b
        hashed >>= np.uint64(32)
        offsets = np.concatenate([[0], np.cumsum(sizes[start : stop - 1])])
        out[start:stop] = np.minimum.reduceat(hashed, offsets, axis=0)
        start = stop
    return out


def near_duplicate_pairs(texts: Sequence[str], skip: set[int] = frozenset(), threshold: float = NEAR_DUPLICATE_JACCARD):
    """``(i, j, jaccard)`` for each record ``i`` and the first earlier ``j`` with Jaccard >= threshold."""
    keep = [i for i in range(len(texts)) if i not in skip]
    if not keep:
        return []
    sets = [shingles(texts[i]) for i in keep]
    signatures = minhash(sets)
    rows = MINHASH_PERMUTATIONS // LSH_BANDS
    buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(LSH_BANDS)]
    found = []
    for pos, signature in enumerate(signatures):
        candidates: dict[int, None] = {}
        for band, bucket in enumerate(buckets):
            key = signature[band * rows : (band + 1) * rows].tobytes()
            candidates.update(dict.fromkeys(bucket[key][:MAX_CANDIDATES]))
            bucket[key].append(pos)
        mine = set(sets[pos].tolist())
        for other in list(candidates)[:MAX_CANDIDATES]:
            theirs = set(sets[other].tolist())
            similarity = len(mine & theirs) / len(mine | theirs)
            if similarity >= threshold:
                found.append((keep[pos], keep[other], similarity))
                break
    return found


def check_prompts(records: Sequence[PreferenceRecord], where, result: AuditResult) -> None:
    """Identical responses (normalised) and prompts seen earlier in the file."""
    first_prompt: dict[str, int] = {}
    for record in records:
        if normalize(record.chosen) == normalize(record.rejected):
            result.add("identical_responses", where[record.example_id])
        prompt = normalize(record.prompt)
        if prompt in first_prompt:
            result.add("duplicate_prompts", f"{where[record.example_id]} repeats the prompt of {where[first_prompt[prompt]]}")
        else:
            first_prompt[prompt] = record.example_id


def check_leakage(train, evaluation, where, eval_source: str, result: AuditResult) -> None:
    """Eval records whose normalised prompt is also a training prompt."""
    train_prompts: dict[str, int] = {}
    for record in train:
        train_prompts.setdefault(normalize(record.prompt), record.example_id)
    for record in evaluation:
        hit = train_prompts.get(normalize(record.prompt))
        if hit is not None:
            result.add("leakage", f"{eval_source}:{record.line} prompt is in {where[hit]}")


def check_lengths(records, tokenizer, where, result: AuditResult, *, source: str) -> None:
    """Token lengths, length bias (chosen longer) and pairs over ``max_length``.

    A chat record the tokenizer's template cannot render (e.g. an unknown role) is a bad record
    for training too (``data.on_invalid``): it is counted as ``invalid`` and the audit goes on,
    instead of one record stopping the whole audit."""
    unrendered: list[Problem] = []
    pairs = encode_records(records, tokenizer, source=source, problems=unrendered)
    for problem in unrendered:
        result.add("invalid", str(problem))
    prompt = np.array([p.prompt_len for p in pairs], dtype=np.int64)
    chosen = np.array([p.chosen_len for p in pairs], dtype=np.int64)
    rejected = np.array([p.rejected_len for p in pairs], dtype=np.int64)
    result.lengths = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for pair, c, r in zip(pairs, chosen, rejected):
        if c > r:
            result.add("length_bias", f"{where[pair.example_id]} chosen {c} > rejected {r} tokens")
    longest = prompt + np.maximum(chosen, rejected)
    for pair, total in zip(pairs, longest):
        if total > result.max_length:
            result.add("truncated", f"{where[pair.example_id]} {total} tokens")


# ---- report --------------------------------------------------------------------------------------

_MEANINGS = {
    "duplicates": "records identical to an earlier one (normalised text)",
    "near_duplicates": f"records with a character {SHINGLE_CHARS}-gram Jaccard >= {NEAR_DUPLICATE_JACCARD} to an earlier one",
    "leakage": "eval records whose prompt is also a training prompt",
    "identical_responses": "pairs with chosen == rejected (normalised)",
    "length_bias": "pairs whose chosen response has more tokens than the rejected one",
    "truncated": "pairs longer than max-length tokens (truncated or dropped in training)",
    "duplicate_prompts": "records whose prompt appeared earlier",
    "invalid": "records `dpo-data check` rejects, or chat records the tokenizer cannot render",
}


def length_bias_stats(result: AuditResult) -> dict[str, float]:
    """Pairs with the chosen / the rejected response longer / equal, the mean token difference and
    the fraction of unequal pairs where the chosen one is longer."""
    chosen, rejected = result.lengths.get("chosen"), result.lengths.get("rejected")
    if chosen is None or len(chosen) == 0:
        return {"chosen_longer": 0, "rejected_longer": 0, "equal": 0, "mean_diff": 0.0, "fraction": 0.0}
    longer, shorter = int((chosen > rejected).sum()), int((chosen < rejected).sum())
    return {
        "chosen_longer": longer,
        "rejected_longer": shorter,
        "equal": int(len(chosen) - longer - shorter),
        "mean_diff": float((chosen - rejected).mean()),
        "fraction": longer / (longer + shorter) if longer + shorter else 0.0,
    }


def markdown_report(result: AuditResult, tokenizer_name: str, png_name: str) -> str:
    """The audit as a markdown document (summary table, examples, lengths, histogram link)."""
    eval_note = f"`{result.eval_path}` ({result.eval_records} records)" if result.eval_path else "none given (leakage not checked)"
    lines = [
        f"# Data audit: `{result.path}`",
        "",
        f"- valid records: {result.records}",
        f"- eval file: {eval_note}",
        f"- tokenizer: `{tokenizer_name}`, max length {result.max_length} tokens",
        "",
        "| check | count | meaning |",
        "|---|---:|---|",
        *(f"| {name} | {result.count_text(name)} | {_MEANINGS[name]} |" for name in CHECKS),
        "",
        *_length_section(result),
        *_findings_section(result),
        f"![token length histograms]({png_name})",
        "",
    ]
    return "\n".join(lines)


def _length_section(result: AuditResult) -> list[str]:
    bias = length_bias_stats(result)
    lines = ["## Token lengths", "", "| | p50 | p90 | p99 | max | mean |", "|---|---:|---:|---:|---:|---:|"]
    for name, values in result.lengths.items():
        if len(values):
            p50, p90, p99 = np.percentile(values, [50, 90, 99], method="inverted_cdf")
            lines.append(f"| {name} | {p50} | {p90} | {p99} | {values.max()} | {values.mean():.1f} |")
    lines += [
        "",
        "## Length bias",
        "",
        f"chosen longer in {bias['chosen_longer']} pairs, rejected longer in {bias['rejected_longer']}, "
        f"equal in {bias['equal']}; mean chosen - rejected: {bias['mean_diff']:+.2f} tokens.",
    ]
    if bias["fraction"] >= LENGTH_BIAS_WARN:
        lines += [
            "",
            f"**Warning**: the chosen response is the longer one in {bias['fraction']:.0%} of the pairs that "
            "differ in length; DPO can learn length instead of quality. Consider length-balanced pairs or "
            "`loss.logp_normalization=mean`.",
        ]
    return [*lines, ""]


def _findings_section(result: AuditResult) -> list[str]:
    lines = []
    # Length bias is a property of the whole set (its section above), not a list of bad records.
    for name in (c for c in CHECKS if c != "length_bias"):
        shown = result.examples.get(name) or []
        if not shown:
            continue
        more = result.counts[name] - len(shown)
        lines += [f"## {name}", "", *(f"- {e}" for e in shown)]
        lines += [f"- ... and {more} more", ""] if more else [""]
    return lines


def histogram_png(result: AuditResult, path: Path) -> None:
    """Prompt, chosen and rejected token-length histograms side by side."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), constrained_layout=True)
    for ax, name in zip(axes, ("prompt", "chosen", "rejected")):
        values = result.lengths.get(name, np.array([]))
        ax.hist(values, bins=min(50, max(1, len(np.unique(values)))), color="tab:blue")
        ax.set_title(f"{name} tokens (n={len(values)})")
        ax.set_xlabel("tokens")
    axes[0].set_ylabel("records")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: AuditResult, out_dir: str | Path, tokenizer_name: str) -> tuple[Path, Path]:
    """``audit.md`` and ``audit.png`` in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / "audit.md", out / "audit.png"
    histogram_png(result, png)
    md.write_text(markdown_report(result, tokenizer_name, png.name), encoding="utf-8")
    return md, png
