"""The bundled preference task: four small skills whose answers can be checked exactly.

Every prompt names one problem and has exactly one correct answer, so a rule-based judge can score
generations (win-rate) and every preference pair is verifiably right: ``chosen`` is the answer,
``rejected`` is a *plausible mistake* (a dropped carry, an off-by-one digit, two letters swapped),
never random noise. The formats are short because the bundled tokenizer is character-level:

======== =================== ==========  =========================================
kind     prompt              answer      rejected (one of, for example)
======== =================== ==========  =========================================
add      ``47+38=``          ``85``      ``75`` (carry dropped), ``84``, ``95``, ``58``
sub      ``91-46=``          ``45``      ``55`` (borrow dropped), ``44``, ``35``, ``54``
reverse  ``reverse: kqzmt``  ``tmzqk``   ``tzmqk`` (two letters swapped), ``kqzmt``
sort     ``sort: dbeca``     ``abcde``   ``abdce``, ``abcdd`` (a letter repeated)
======== =================== ==========  =========================================

Operands have two digits, 10..99 (``sub`` never goes negative); words are 3..6 (reverse) or 3..7 (sort)
random lowercase letters. A rejected answer first picks a *family* of mistake uniformly (arithmetic:
carry, units, tens, digit order; words: order, letter, missing, extra, and copy for reverse), then one
instance, so every family is about equally common.

Public API (pure Python, no torch):

- :func:`parse` ``(prompt) -> Problem``: raises :class:`ValueError` for a prompt that is not a task
  prompt, because a judge that silently scores unknown prompts as wrong would hide a data bug.
- :func:`reference_answer` ``(prompt) -> str``: the one correct answer.
- :func:`verify` ``(prompt, response) -> bool``: ``response`` with surrounding whitespace removed must
  equal the answer exactly (``085`` or ``85.`` are wrong). Generations are decoded without special
  tokens, so text after EOS never reaches it.
- :func:`mistakes` / :func:`make_rejected`: the plausible wrong answers to a problem, by family.
- :func:`generate_splits` ``(seed, n_train, n_eval) -> (train, eval)``: the bundled data set, lists of
  ``{"prompt", "chosen", "rejected"}`` records with disjoint prompts; same arguments, same output.

Changing anything that :func:`generate_splits` draws changes the shipped files: regenerate them with
``tools/make_bundled_data.py`` and rebuild the model with ``tools/build_tiny_model.py``.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

KINDS = ("add", "sub", "reverse", "sort")
# Two-digit operands only: a fixed layout puts every digit at a fixed offset from "=", which a tiny
# model learns as an algorithm instead of memorising a table.
OPERANDS = (10, 99)
WORD_LENGTHS = {"reverse": (3, 6), "sort": (3, 7)}
LETTERS = string.ascii_lowercase

_ARITH_RE = re.compile(r"^([1-9]\d)([+-])([1-9]\d)=$")
_WORD_RE = re.compile(r"^(reverse|sort): ([a-z]+)$")


@dataclass(frozen=True)
class Problem:
    """One parsed prompt: ``operands`` are two ints (add, sub) or one word (reverse, sort)."""

    kind: str
    operands: tuple

    @property
    def prompt(self) -> str:
        if self.kind == "add":
            return f"{self.operands[0]}+{self.operands[1]}="
        if self.kind == "sub":
            return f"{self.operands[0]}-{self.operands[1]}="
        return f"{self.kind}: {self.operands[0]}"

    @property
    def answer(self) -> str:
        if self.kind == "add":
            return str(self.operands[0] + self.operands[1])
        if self.kind == "sub":
            return str(self.operands[0] - self.operands[1])
        word = self.operands[0]
        return word[::-1] if self.kind == "reverse" else "".join(sorted(word))


def parse(prompt: str) -> Problem:
    """The problem a prompt asks; ``ValueError`` if it is not exactly a bundled-task prompt."""
    arith = _ARITH_RE.match(prompt)
    if arith:
        a, op, b = int(arith.group(1)), arith.group(2), int(arith.group(3))
        if op == "+" or a >= b:  # the task never asks for a negative difference
            return Problem("add" if op == "+" else "sub", (a, b))
    word = _WORD_RE.match(prompt)
    if word:
        return Problem(word.group(1), (word.group(2),))
    raise ValueError(f"not a bundled-task prompt: {prompt!r}")


def reference_answer(prompt: str) -> str:
    """The one correct response to ``prompt``."""
    return parse(prompt).answer


def verify(prompt: str, response: str) -> bool:
    """True iff ``response`` (surrounding whitespace ignored) is exactly the correct answer."""
    return response.strip() == reference_answer(prompt)


# --- generation ------------------------------------------------------------------------------


def sample_problem(kind: str, rng: random.Random) -> Problem:
    """A uniformly random problem of ``kind``."""
    low, high = OPERANDS
    if kind == "add":
        return Problem(kind, (rng.randint(low, high), rng.randint(low, high)))
    if kind == "sub":
        a = rng.randint(low, high)
        return Problem(kind, (a, rng.randint(low, a)))
    if kind in WORD_LENGTHS:
        length = rng.randint(*WORD_LENGTHS[kind])
        return Problem(kind, ("".join(rng.choice(LETTERS) for _ in range(length)),))
    raise ValueError(f"unknown task kind {kind!r}; expected one of {', '.join(KINDS)}")


def _digitwise(a: int, b: int, op) -> int:
    """``a op b`` computed column by column with every carry/borrow dropped (a classic mistake)."""
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width), str(b).zfill(width)
    return int("".join(str(op(int(x), int(y)) % 10) for x, y in zip(da, db)))


def _arith_mistakes(problem: Problem) -> dict[str, list[int]]:
    """Plausible wrong answers to an add/sub problem, by family of mistake."""
    a, b = problem.operands
    answer = int(problem.answer)
    column = (lambda x, y: x + y) if problem.kind == "add" else (lambda x, y: abs(x - y))
    dropped = _digitwise(a, b, column)  # sub: the smaller digit taken from the larger, no borrow
    spurious = answer + 10 if problem.kind == "add" else answer - 10
    return {
        "carry": [dropped if dropped != answer else spurious],  # carry/borrow dropped, or one invented
        "units": [answer - 1, answer + 1],
        "tens": [answer - 10, answer + 10],
        "order": [int(str(answer)[::-1])],  # digits written in the wrong order
    }


def _swap(text: str, i: int) -> str:
    return text[:i] + text[i + 1] + text[i] + text[i + 2 :]


def _word_mistakes(problem: Problem, rng: random.Random) -> dict[str, list[str]]:
    """Plausible wrong answers to a reverse/sort problem, by family of mistake."""
    answer = problem.answer
    i = rng.randrange(len(answer))
    families = {
        "order": [_swap(answer, j) for j in range(len(answer) - 1)],  # two neighbours transposed
        "letter": [answer[:i] + rng.choice(LETTERS) + answer[i + 1 :]],
        "missing": [answer[:i] + answer[i + 1 :]],
        "extra": [answer[: i + 1] + answer[i:]],
    }
    if problem.kind == "reverse":
        families["copy"] = [problem.operands[0]]  # echoed instead of reversed
    return families


def mistakes(problem: Problem, rng: random.Random) -> dict[str, list[str]]:
    """The wrong answers ``make_rejected`` draws from, by family; families with none are left out.

    Candidates that happen to equal the answer (a swap of two equal letters, "88" with its digits
    reversed, a replacement letter equal to the original) or are empty or negative are removed.
    """
    if problem.kind in ("add", "sub"):
        raw = {k: [str(v) for v in vs if v >= 0] for k, vs in _arith_mistakes(problem).items()}
    else:
        raw = _word_mistakes(problem, rng)
    families = {k: [m for m in dict.fromkeys(vs) if m and m != problem.answer] for k, vs in raw.items()}
    return {k: vs for k, vs in families.items() if vs}


def make_rejected(problem: Problem, rng: random.Random) -> str:
    """One plausible but wrong answer: a family of mistake uniformly, then one of its candidates.

    Drawing the family first keeps the mix even: otherwise the many possible transpositions of a
    long word would crowd out every other kind of mistake.
    """
    families = mistakes(problem, rng)
    return rng.choice(families[rng.choice(sorted(families))])


def _unique_problems(kind: str, count: int, rng: random.Random) -> list[Problem]:
    """``count`` distinct problems of ``kind``, in sampling order (sets only test membership, so the
    order never depends on PYTHONHASHSEED)."""
    seen: set[Problem] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 100 * count:
            raise ValueError(f"cannot draw {count} distinct {kind!r} problems")
        problem = sample_problem(kind, rng)
        if problem not in seen:
            seen.add(problem)
            out.append(problem)
    return out


def generate_splits(seed: int = 0, n_train: int = 6000, n_eval: int = 400) -> tuple[list[dict], list[dict]]:
    """The bundled train and eval pairs: each kind in equal share, no prompt in both splits.

    Both sizes must be multiples of ``len(KINDS)``. Problems are drawn without replacement per
    kind, then cut into eval (first) and train, so the splits are disjoint by construction.
    """
    if n_train % len(KINDS) or n_eval % len(KINDS):
        raise ValueError(f"n_train and n_eval must be multiples of {len(KINDS)}")
    rng = random.Random(seed)
    train: list[dict] = []
    evals: list[dict] = []
    for kind in KINDS:
        per_train, per_eval = n_train // len(KINDS), n_eval // len(KINDS)
        problems = _unique_problems(kind, per_train + per_eval, rng)
        records = [
            {"prompt": p.prompt, "chosen": p.answer, "rejected": make_rejected(p, rng)} for p in problems
        ]
        evals.extend(records[:per_eval])
        train.extend(records[per_eval:])
    # Interleave kinds so any prefix of the file (a short run) sees all of them.
    rng.shuffle(train)
    rng.shuffle(evals)
    return train, evals
