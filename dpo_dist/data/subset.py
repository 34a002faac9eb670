"""Which records of a data file a run uses: ``data.max_samples`` and ``data.eval_split``.

``data.max_samples=N`` keeps the first N records of ``data.train_path``, counted as the file holds
them (example ids 0 .. N-1), invalid ones included: the selection comes before anything is dropped,
as OpenRLHF's ``--max_samples`` and a TRL user's ``dataset.select(range(N))`` select before
processing, so the same N records are used whatever ``data.on_invalid``, the tokenizer or
``data.max_length`` make of them (fewer pairs than N remain when some are invalid or dropped by
``data.truncation``; the start-of-run log says how many). Reading stops at record N.

``data.eval_split`` (with ``data.eval_path=null``) holds records of those out of training for
evaluation, as ``train_test_split(test_size=...)``: a float in (0, 1) is a fraction of the valid
records (rounded up, as there), an int >= 1 a number of them. Records are held out by prompt: the
distinct prompts (``normalize``: the comparison form ``dpo-data audit`` checks leakage with) are
ordered by the sha256 of that form, and whole prompts are taken in that order until at least as
many records as asked for are held out. So every pair of a prompt lands on the same side (the held
-out prompts leak nothing into training: ``dpo-data audit``'s ``leakage`` of the two sides is 0),
and the split depends on the records alone: the same on every rank, resume and re-run, and with
another seed. Invalid records belong to neither side; the training side reports them.

``Selection`` is what of a file is used; ``DataSource`` a file and its selection.
``DataConfig.sources()`` (``dpo_dist.config``) gives a run's train and eval sources: every
consumer of ``data.train_path`` / ``data.eval_path`` goes through it. A selection other than all
records is part of the file's ``data_fingerprint``, so of the tokenization cache key and the
reference cache fingerprint; the whole file's keys stay as they were.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dpo_dist.data.records import PreferenceRecord, ReadResult

SIDES = ("all", "train", "eval")


def normalize(text) -> str:
    """Comparison form of a prompt or response: NFKC, case-folded, whitespace collapsed.
    Chat messages become ``role: content`` lines first."""
    if isinstance(text, list):
        text = "\n".join(f"{m['role']}: {m['content']}" for m in text)
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


@dataclass(frozen=True)
class Selection:
    """The records of a file a run uses (module docstring): the first ``max_samples`` (0: all),
    then with ``eval_split`` one side of the held-out split."""

    max_samples: int = 0
    eval_split: float | int = 0
    side: str = "all"
    """``train`` or ``eval``: the side of ``eval_split`` selected; ``all`` without a split."""

    def __post_init__(self) -> None:
        if self.side not in SIDES or (self.side == "all") != (not self.eval_split):
            raise ValueError(f"side must be train or eval with an eval_split, all without, got {self.side!r}")

    def key(self) -> dict[str, Any] | None:
        """What ``data_fingerprint`` adds for this selection; None for every record, so that the
        keys of whole files (tokenization and reference caches) stay as they were."""
        key: dict[str, Any] = {"max_samples": self.max_samples} if self.max_samples else {}
        if self.side != "all":
            key.update(eval_split=self.eval_split, side=self.side)
        return key or None

    def label(self, path: str) -> str:
        """``path`` as logs and errors name this selection of it."""
        parts = [f"first {self.max_samples} records"] if self.max_samples else []
        if self.side != "all":
            parts.append(f"{'training side of' if self.side == 'train' else 'held out by'} data.eval_split={self.eval_split}")
        return f"{path} ({', '.join(parts)})" if parts else path

    def apply(self, result: ReadResult) -> tuple[ReadResult, str | None]:
        """``result`` (read with ``limit=max_samples``) cut to this selection's side, and the
        line that says what was selected (None for every record). The training side keeps the
        invalid records' problems, so that they are reported once."""
        notes = []
        if self.max_samples:
            read = result.num_records
            which = f"all {read} of its records (it has fewer)" if read < self.max_samples else f"its first {read} records"
            notes.append(f"data.max_samples={self.max_samples}: {which}, counted before invalid or over-long ones are dropped")
        if self.side == "all":
            return result, "; ".join(notes) or None
        held = held_out(result.records, self.eval_split, self.label(result.path))
        prompts = len({normalize(r.prompt) for r in result.records if r.example_id in held})
        valid = len(result.records)
        notes.append(
            f"data.eval_split={self.eval_split}: {len(held)} of the {valid} valid records held out for evaluation "
            f"({prompts} prompts, each with all its records), {valid - len(held)} for training"
        )
        records = [r for r in result.records if (r.example_id in held) == (self.side == "eval")]
        problems = result.problems if self.side == "train" else []
        return dataclasses.replace(result, records=records, problems=problems), "; ".join(notes)


ALL_RECORDS = Selection()


def held_out(records: Sequence[PreferenceRecord], eval_split: float | int, where: str) -> set[int]:
    """Example ids of the ``records`` that ``eval_split`` holds out (module docstring): whole
    prompts in the order of their normalised form's sha256, until at least the fraction (rounded
    up) or count asked for. ``where`` names the data in the ``DataError`` for a split that leaves
    no record on one side."""
    from dpo_dist.data.records import DataError

    by_prompt: dict[str, list[int]] = {}
    for record in records:
        by_prompt.setdefault(normalize(record.prompt), []).append(record.example_id)
    valid = len(records)
    if not valid:
        return set()  # nothing to split: the file's own error says why (no records, all invalid)
    wanted = math.ceil(eval_split * valid) if isinstance(eval_split, float) else eval_split
    if wanted >= valid:
        raise DataError(f"{where}: data.eval_split={eval_split} asks for {wanted} of its {valid} valid records: none would be left to train on")
    held: list[int] = []
    for prompt in sorted(by_prompt, key=lambda p: (hashlib.sha256(p.encode()).digest(), p)):
        if len(held) >= wanted:
            break
        held.extend(by_prompt[prompt])
    if len(held) >= valid:
        raise DataError(
            f"{where}: data.eval_split={eval_split} holds out all {valid} valid records: a prompt's records stay "
            f"on one side, and they have {len(by_prompt)} distinct prompt{'s' if len(by_prompt) > 1 else ''}"
        )
    return set(held)


@dataclass(frozen=True)
class DataSource:
    """A data file and the records of it a run uses (``DataConfig.sources()``)."""

    path: str
    selection: Selection = ALL_RECORDS

    def label(self) -> str:
        return self.selection.label(self.path)
