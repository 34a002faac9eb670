"""Tokenize preference records into prompt / chosen / rejected token ids.

Plain-text records:
  prompt ids   = ``tokenizer(prompt)`` with the tokenizer's special tokens (its BOS, if it adds one;
                 not an EOS a tokenizer set to append one puts after it: the prompt ends nothing);
  response ids = ``tokenizer(response, add_special_tokens=False)``, then ``eos_token_id``, as the
                 response is encoded after its prompt: a SentencePiece tokenizer with a dummy prefix
                 (Llama 2, Mistral) puts a "▁" in front of any text it encodes alone, which the
                 same text following the prompt does not get (``_encode_responses``).

Chat records (any of prompt / chosen / rejected is a messages list; a plain-string prompt then
becomes one ``user`` message and a plain-string response one ``assistant`` message):
  prompt text   = ``apply_chat_template(prompt_messages, add_generation_prompt=True)``;
  response text = ``apply_chat_template(prompt_messages + response_messages)`` minus the prompt
                  text, which must be its prefix (otherwise ``DataError``: the template renders
                  earlier turns differently once a response follows, and the split is ambiguous).
  Both are then encoded by the plain-text rule above, with two guards:
  - no double BOS: a prompt text that already starts with the BOS token text (templates such as
    Llama 3's write it) is encoded without special tokens;
  - no double EOS: EOS is appended to a response only if its ids do not already end with it
    (templates usually close an assistant turn with the EOS token text), nor to a chat response
    whose template closes the turn with another special token (Llama 3's ``<|eot_id|>`` where the
    tokenizer's EOS is ``<|end_of_text|>``, Gemma's ``<end_of_turn>``): that token is where the
    chat model stops, as TRL adds no EOS to conversational data. Whitespace a template writes
    after such a closing token (ChatML's ``<|im_end|>\n``) is layout between turns: not scored.
  The guards apply to plain-text records too, so a prompt written as "<s>..." gets one BOS.
  A record's ``tools`` and ``chat_template_kwargs`` (``{"enable_thinking": false}``) go to every
  ``apply_chat_template`` call of it, as TRL passes them.

A pair is the sequences prompt + chosen and prompt + rejected. Labels cover response tokens only.

Truncation (``data.truncation``), applied when either sequence is longer than ``max_length``;
each truncated pair counts once in ``TruncationStats.truncated``, each dropped one in ``dropped``:
- ``keep_end_of_prompt`` (default): drop tokens from the START of the prompt so that the longer
  response fits, keeping the BOS (if the prompt starts with it) and at least one other prompt
  token; if still too long, cut each response from its end to the room left (at least 1 token;
  a cut response loses its EOS, as it should: the text did not end there).
- ``keep_start``: cut the responses from their end (to at least 1 token): the start of every
  sequence is kept. A pair whose prompt alone fills ``max_length`` is dropped, as TRL drops it:
  its responses would follow a prompt cut short, or be cut away.
- ``drop``: drop the pair.
``max_length`` must be at least 3 (BOS + one prompt token + one response token), so
``keep_end_of_prompt`` always produces a pair that fits.

A record whose chosen and rejected texts differ but encode to the same ids (e.g. "2</s>" and "2":
EOS is appended only when missing) is an invalid record like textually identical ones (``problems``,
under ``data.on_invalid``). A pair whose chosen and rejected ids are identical after truncation (cutting both responses to
a shared prefix) is dropped and counted in ``TruncationStats.identical`` instead: it carries no
preference signal and would count as wrong in reward accuracy. SFT, which trains on chosen
alone, keeps them (``keep_identical``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpo_dist.data.records import DataError, Messages, PreferenceRecord, Problem, Text

logger = logging.getLogger(__name__)

TRUNCATION_MODES = ("keep_end_of_prompt", "keep_start", "drop")
MIN_MAX_LENGTH = 3
_ENCODE_BATCH = 1024
"""Records encoded per tokenizer call: large enough for the fast tokenizer's batching, small
enough that intermediate Python lists stay modest."""


@dataclass(eq=False)
class TokenizedPair:
    """Token ids of one preference pair (int32 arrays); the responses exclude the prompt."""

    example_id: int
    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray

    def __post_init__(self) -> None:
        self.example_id = int(self.example_id)
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int32))

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def chosen_len(self) -> int:
        """Chosen response tokens (the scored ones), without the prompt."""
        return len(self.chosen_ids)

    @property
    def rejected_len(self) -> int:
        """Rejected response tokens (the scored ones), without the prompt."""
        return len(self.rejected_ids)

    @property
    def chosen_seq_len(self) -> int:
        return self.prompt_len + self.chosen_len

    @property
    def rejected_seq_len(self) -> int:
        return self.prompt_len + self.rejected_len

    @property
    def num_tokens(self) -> int:
        """Tokens the pair takes in a packed micro-batch: both full sequences."""
        return self.chosen_seq_len + self.rejected_seq_len


@dataclass
class TruncationStats:
    """How many pairs the truncation rule changed or dropped."""

    truncated: int = 0
    dropped: int = 0
    identical: int = 0
    """Dropped because chosen and rejected ids are identical after truncation."""


def tokenize_records(
    records: Sequence[PreferenceRecord],
    tokenizer,
    max_length: int,
    truncation: str = "keep_end_of_prompt",
    *,
    source: str = "records",
    problems: list[Problem] | None = None,
    keep_identical: bool = False,
) -> tuple[list[TokenizedPair], TruncationStats]:
    """Encode ``records`` and apply the truncation rule; ``source`` prefixes error locations.
    ``problems``: see ``encode_records``. ``keep_identical``: keep pairs whose responses became
    identical (SFT data)."""
    check_truncation(max_length, truncation)
    stats = TruncationStats()
    pairs = []
    for pair in encode_records(records, tokenizer, source=source, problems=problems):
        kept = truncate_pair(pair, max_length, truncation, tokenizer.bos_token_id)
        if kept is None:
            stats.dropped += 1
            continue
        if not keep_identical and np.array_equal(kept.chosen_ids, kept.rejected_ids):
            stats.identical += 1
            continue
        if kept is not pair:
            stats.truncated += 1
        pairs.append(kept)
    return pairs, stats


def check_truncation(max_length: int, truncation: str) -> None:
    """Raise ValueError for settings the truncation rules cannot honour."""
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if max_length < MIN_MAX_LENGTH:
        raise ValueError(f"max_length must be at least {MIN_MAX_LENGTH}, got {max_length}")


def encode_records(
    records: Sequence[PreferenceRecord],
    tokenizer,
    *,
    source: str = "records",
    problems: list[Problem] | None = None,
) -> list[TokenizedPair]:
    """Encode ``records`` without any truncation (see the module docstring for the rules).

    A chat record the tokenizer's template cannot render (an unknown role, no template, a
    rendering that does not split into prompt and response) raises ``DataError``; with a
    ``problems`` list it is appended there as a bad record instead and left out."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; responses must end with one")
    pairs = []
    for start in range(0, len(records), _ENCODE_BATCH):
        pairs.extend(_encode_batch(records[start : start + _ENCODE_BATCH], tokenizer, source, problems))
    return pairs


def truncate_pair(
    pair: TokenizedPair, max_length: int, truncation: str, bos_token_id: int | None
) -> TokenizedPair | None:
    """``pair`` itself if it fits, a truncated copy, or None when the rule drops it."""
    if max(pair.chosen_seq_len, pair.rejected_seq_len) <= max_length:
        return pair
    if truncation == "drop":
        return None
    prompt, chosen, rejected = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
    if truncation == "keep_end_of_prompt":
        has_bos = bos_token_id is not None and len(prompt) > 0 and prompt[0] == bos_token_id
        keep = max(max_length - max(len(chosen), len(rejected)), min(len(prompt), 1 + has_bos))
        prompt = _keep_prompt_end(prompt, keep, has_bos)
        room = max_length - len(prompt)
    else:  # keep_start
        if len(prompt) >= max_length:
            return None
        room = max_length - len(prompt)
    return TokenizedPair(pair.example_id, prompt, chosen[:room], rejected[:room])


def _keep_prompt_end(prompt: np.ndarray, keep: int, has_bos: bool) -> np.ndarray:
    if not has_bos:
        return prompt[len(prompt) - keep :]
    return np.concatenate([prompt[:1], prompt[len(prompt) - (keep - 1) :]])


def _encode_batch(
    records: Sequence[PreferenceRecord], tokenizer, source: str, problems: list[Problem] | None
) -> list[TokenizedPair]:
    closing = _closing_tokens(tokenizer)
    rendered = []
    for record in records:
        try:
            rendered.append((record, _render(record, tokenizer, closing)))
        except _TemplateError as error:
            if problems is None:
                raise DataError(f"{source}:{record.line}: {error}") from None
            problems.append(Problem(source, record.line, str(error)))
    if not rendered:
        return []
    texts = [text for _, text in rendered]
    prompts = _encode_prompts([t[0] for t in texts], tokenizer)
    chosen = _encode_responses([t[1] for t in texts], tokenizer, closing)
    rejected = _encode_responses([t[2] for t in texts], tokenizer, closing)
    pairs = []
    for (record, _), p, c, r in zip(rendered, prompts, chosen, rejected):
        if c == r:
            reason = "chosen and rejected encode to the same token ids"
            if problems is None:
                raise DataError(f"{source}:{record.line}: {reason}")
            problems.append(Problem(source, record.line, reason))
            continue
        pairs.append(TokenizedPair(record.example_id, p, c, r))
    return pairs


def _encode_prompts(texts: list[str], tokenizer) -> list[list[int]]:
    """Encode prompts, adding the tokenizer's special tokens unless the text starts with BOS."""
    bos = tokenizer.bos_token
    has_bos = [bool(bos) and text.startswith(bos) for text in texts]
    ids: list[list[int]] = [[] for _ in texts]
    for flag in (False, True):
        positions = [i for i, h in enumerate(has_bos) if h == flag]
        if positions:
            encoded = _encode([texts[i] for i in positions], tokenizer, add_special_tokens=not flag)
            for i, e in zip(positions, encoded):
                # Without special tokens (a text with its own BOS) nothing was appended.
                ids[i] = e if flag else without_appended_eos(e, texts[i], tokenizer)
    return ids


def without_appended_eos(ids: list[int], text: str, tokenizer) -> list[int]:
    """A prompt's ids (encoded with special tokens) without the EOS that a tokenizer set to append
    one (``add_eos_token``) put after it: the response, not the prompt, ends the sequence. An EOS
    the text itself ends with stays (the encoding without special tokens ends with it too)."""
    eos = tokenizer.eos_token_id
    if not ids or ids[-1] != eos:
        return ids
    own = _encode([text], tokenizer, add_special_tokens=False)[0]
    return ids if own and own[-1] == eos else ids[:-1]


_SENTINEL = "\n"
"""Encoded in front of a response by tokenizers with a dummy prefix, then removed: after it the
response starts mid-text, as it does after its prompt."""


def _encode_responses(texts: list[str], tokenizer, closing: dict[str, int]) -> list[list[int]]:
    """Response ids as after their prompt, ending with EOS unless their text ends with EOS or
    another of ``closing``'s special tokens (a chat template's end of turn)."""
    eos = tokenizer.eos_token_id
    closed = [any(text.endswith(token) and text != token for token in closing) for text in texts]
    encoded = _encode(texts, tokenizer, add_special_tokens=False)
    if _adds_dummy_prefix(tokenizer):
        head = _encode([_SENTINEL], tokenizer, add_special_tokens=False)[0]
        after = _encode([_SENTINEL + text for text in texts], tokenizer, add_special_tokens=False)
        # A response whose start merges with the sentinel (a vocabulary with pieces like "\nThe";
        # not Llama 2's or Mistral's, whose newline is a byte token) keeps its own encoding: said.
        merged = sum(a[: len(head)] != head for a in after)
        if merged:
            logger.warning(
                "%d of %d responses start with text the tokenizer merges with a newline: encoded on "
                "their own, with the tokenizer's leading '▁' (dummy prefix)", merged, len(texts)
            )
        encoded = [a[len(head) :] if a[: len(head)] == head else e for a, e in zip(after, encoded)]
    return [e if e and (e[-1] == eos or (shut and e[-1] in closing.values())) else [*e, eos] for e, shut in zip(encoded, closed)]


def _closing_tokens(tokenizer) -> dict[str, int]:
    """The tokenizer's special tokens other than BOS/PAD/UNK (text -> id): a response whose text
    ends with one (a chat template's end-of-turn token) ends there."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = set(tokenizer.all_special_tokens) | {t.content for t in added.values() if getattr(t, "special", False)}
    # EOS stays even where it doubles as PAD or BOS (Zephyr's pad is </s>, GPT-2's bos is eos).
    texts -= {tokenizer.bos_token, tokenizer.pad_token, tokenizer.unk_token, None} - {tokenizer.eos_token}
    ids = tokenizer.convert_tokens_to_ids(sorted(texts))
    return {text: i for text, i in zip(sorted(texts), ids) if i is not None and i != tokenizer.unk_token_id}


def _adds_dummy_prefix(tokenizer) -> bool:
    """Whether ``tokenizer`` encodes a text on its own differently from the same text mid-text
    (SentencePiece's dummy "▁" prefix: "a" alone is "▁a"): byte-level BPE (GPT-2, Llama 3) does not."""
    head, alone, after = _encode([_SENTINEL, "a", _SENTINEL + "a"], tokenizer, add_special_tokens=False)
    return after[: len(head)] == head and after[len(head) :] != alone


def _encode(texts: list[str], tokenizer, add_special_tokens: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]


class _TemplateError(Exception):
    """A chat record the tokenizer's template cannot render; the message is the reason."""


def _render(record: PreferenceRecord, tokenizer, closing: dict[str, int]) -> tuple[str, str, str]:
    """Prompt, chosen and rejected text, through the chat template for chat records
    (``closing``: ``_closing_tokens``)."""
    if not record.is_chat:
        return record.prompt, record.chosen, record.rejected
    if not getattr(tokenizer, "chat_template", None):
        raise _TemplateError("chat messages need a tokenizer with a chat template")
    prompt_messages = as_messages(record.prompt, "user")
    extras = {"tools": record.tools, **(record.chat_template_kwargs or {})}
    prompt_text = _apply_template(tokenizer, prompt_messages, True, extras)
    responses = []
    for name in ("chosen", "rejected"):
        messages = prompt_messages + as_messages(getattr(record, name), "assistant")
        full = _apply_template(tokenizer, messages, False, extras)
        if not full.startswith(prompt_text):
            raise _TemplateError(
                "the chat template's rendering of the prompt is not a prefix of its "
                f"rendering with the {name} response; cannot split prompt and response"
            )
        responses.append(_end_at_turn_end(full[len(prompt_text) :], closing))
    return prompt_text, responses[0], responses[1]


def _end_at_turn_end(response: str, closing: dict[str, int]) -> str:
    """The rendered response without the whitespace a template writes after its end-of-turn
    token (ChatML's ``<|im_end|>\n``): it is layout between turns, not something the model says,
    and scoring it would put an EOS after it."""
    stripped = response.rstrip()
    return stripped if any(stripped.endswith(token) for token in closing) else response


def _apply_template(tokenizer, messages: Messages, add_generation_prompt: bool, extras: dict[str, Any]) -> str:
    """``extras``: the record's ``tools`` and its ``chat_template_kwargs``."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False, **extras)
    except Exception as e:  # jinja raises TemplateError, templates raise_exception() anything
        raise _TemplateError(f"chat template failed: {e}") from None


def as_messages(value: Text, role: str) -> Messages:
    """``value`` as chat messages: a messages list as is, a string as one ``role`` message."""
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def chat_template_text(setting: str) -> str:
    """``data.chat_template``'s template: the Jinja text itself, or the contents of the file it
    names; a name of no file that holds no Jinja tag either is a ``DataError``."""
    from pathlib import Path

    if "{{" in setting or "{%" in setting:
        return setting
    path = Path(setting).expanduser()
    try:
        return path.read_text()
    except OSError as e:
        raise DataError(f"data.chat_template={setting}: neither a Jinja template nor a readable file ({e.strerror or e})") from None


def use_chat_template(tokenizer, setting: str | None):
    """``tokenizer`` with the run's ``data.chat_template`` (None: its own template), as every
    tokenizer of a run is used: training, the reference pass, evaluation and generation; the
    tokenizer saved with the exported model carries it. Returns ``tokenizer``."""
    if setting:
        tokenizer.chat_template = chat_template_text(setting)
    return tokenizer
