"""Batched text generation from a local Hugging Face causal LM, shared by win-rate evaluation,
preference-data generation (``dpo-data generate``) and serving (``dpo-serve``).

Prompts are encoded by the training rule (``dpo_dist.data.tokenize``): a plain-text prompt is
``tokenizer(prompt)`` with its special tokens (BOS); a chat prompt (a messages list) is rendered
with the tokenizer's chat template and ``add_generation_prompt=True``, and a rendering that already
starts with the BOS text gets no second BOS; a prompt's ``chat_template_kwargs`` (a record's, a
request's) go to the template. So a model is asked exactly what it was trained on.

Rows of a batch are left-padded. A completion ends at the tokenizer's EOS or at any EOS token of
the model's generation config (a chat model's end-of-turn token); it is decoded without special
tokens; a stop string ends it too and is not part of its text (as in the OpenAI API).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("dpo_dist.generation")

Text = str | list[dict[str, str]]
"""A prompt: plain text or chat messages (``[{"role": ..., "content": ...}]``)."""


class GenerationError(ValueError):
    """A prompt or model that cannot be generated from (one line saying why)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt. ``do_sample=False`` is greedy (temperature and top_p unused)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    """One generated continuation and its token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """``stop`` (EOS or a stop string) or ``length`` (``max_new_tokens`` reached)."""


@dataclass
class PromptItem:
    """A prompt of an input file with its position (``example_id``) for ordering and reports."""

    example_id: int
    prompt: Text
    extra: dict[str, Any] = field(default_factory=dict)
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """The record's ``chat_template_kwargs``: variables its chat prompt is rendered with."""


def load_causal_lm(path: str | Path, device=None, dtype: str = "auto", device_map: str | None = None,
                   tokenizer_path: str | Path | None = None):
    """``(model, tokenizer)`` from a local directory, in eval mode on ``device``.

    ``dtype=auto`` is bf16 on CUDA and fp32 on CPU, as in training. ``device_map`` (``auto``,
    ``balanced``, ``sequential``) instead spreads the layers over every visible GPU (Accelerate's
    big-model inference): a model no single GPU holds runs in one process, one layer's GPU at a
    time. A PEFT adapter directory loads its base (``adapter_config.json``) with the adapter merged.
    ``tokenizer_path``: where the tokenizer lives when not in ``path`` (``model.tokenizer_path``;
    see ``load_tokenizer``). Nothing is downloaded: a path that is not a model directory, or one
    whose tokenizer or weights cannot be loaded, is a ``GenerationError``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    tokenizer = load_tokenizer(path, tokenizer_path)
    base = adapter_base(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base or path, dtype=torch_dtype, local_files_only=True, device_map=device_map
        )
        if base is not None:
            from dpo_dist.adapters import load_adapter

            # Merged: generation then runs a plain model, as fast as a merged export.
            model = load_adapter(model, path).merge_and_unload()
    except (OSError, ValueError) as e:  # no weights, a base that is not there, an adapter that does not fit it
        raise GenerationError(f"{path}: cannot load the model: {_first_line(e)}") from None
    return (model if device_map else model.to(device)).eval(), tokenizer


def adapter_base(path: str | Path) -> str | None:
    """The local directory of the base model of a PEFT adapter directory (``adapter_config.json``,
    e.g. a LoRA run's ``final/`` exported with ``model.lora.merge_on_export=false``; found as
    ``dpo_dist.adapters.adapter_base`` finds it); None for any other path."""
    from dpo_dist.adapters import adapter_base as find_base
    from dpo_dist.config import ConfigError

    try:
        base = find_base(path)
    except ConfigError as e:  # unreadable, or its base is not here: this module's one-line error
        raise GenerationError(str(e)) from None
    return base.path if base is not None else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # transformers' list of what it tried ("... from one of:") follows on the lines dropped here.
    return " ".join(text.splitlines()[0].split()).rstrip(":") if text else type(exc).__name__


def model_identity(path: str | Path, tokenizer_path: str | Path | None = None) -> str:
    """sha256 of what decides a model directory's answers: its weights and ``config.json``
    (``fingerprint.model_fingerprint``, memoized: a re-export of the same weights matches), its
    tokenizer (the chat template included; ``tokenizer_path``'s when given, as in
    ``load_tokenizer``) and ``generation_config.json`` (the EOS tokens generation stops at); for
    an adapter directory also its adapter settings and base weights."""
    from dpo_dist.data.cache import tokenizer_fingerprint
    from dpo_dist.fingerprint import json_sha256, model_fingerprint

    base = adapter_base(path)
    # An adapter generates with its base's generation config (it has none of its own).
    generation_config = Path(base or path) / "generation_config.json"
    settings = json.loads(generation_config.read_text()) if generation_config.is_file() else None
    if isinstance(settings, dict):
        settings.pop("transformers_version", None)  # who wrote it, not what it says
    # model_fingerprint covers an adapter's settings and base weights too.
    identity = {"model": model_fingerprint(path), "tokenizer": tokenizer_fingerprint(load_tokenizer(path, tokenizer_path)), "generation": settings}
    return json_sha256(identity)


def load_tokenizer(path: str | Path, tokenizer_path: str | Path | None = None):
    """The tokenizer of a local model directory (or adapter directory); a path that is not one,
    or one without a usable tokenizer, is a ``GenerationError``.

    ``tokenizer_path``: a separate tokenizer directory for the model of ``path`` (a run's
    ``model.tokenizer_path``), loaded instead of anything in ``path``; None: ``path``'s own."""
    from transformers import AutoTokenizer

    from dpo_dist.adapters import tokenizer_dir

    path = Path(path)
    base = adapter_base(path)
    if base is None and not (path / "config.json").is_file():
        raise GenerationError(f"{path}: not a Hugging Face model directory (no config.json)")
    source = Path(tokenizer_path if tokenizer_path is not None else tokenizer_dir(path))
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:  # a directory without tokenizer files: ValueError
        raise GenerationError(f"{source}: cannot load its tokenizer: {_first_line(e)}") from None


def render_prompt(prompt: Text, tokenizer, template_kwargs: dict[str, Any] | None = None) -> str:
    """The text a model continues: plain text as is, chat messages through the chat template
    (with ``template_kwargs``, a record's ``chat_template_kwargs``)."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError("chat messages need a tokenizer with a chat template")
    try:
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **(template_kwargs or {}))
    except Exception as e:  # jinja's TemplateError or a template's raise_exception()
        raise GenerationError(f"chat template failed: {' '.join(str(e).split())}") from None


def encode_prompt(text: str, tokenizer) -> list[int]:
    """Token ids of a rendered prompt as training encodes it (``dpo_dist.data.tokenize``): with the
    tokenizer's special tokens unless it already has BOS, without an EOS the tokenizer appends."""
    from dpo_dist.data.tokenize import without_appended_eos

    has_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    ids = tokenizer(text, add_special_tokens=not has_bos)["input_ids"]
    return ids if has_bos else without_appended_eos(ids, text, tokenizer)


def trained_prompt(prompt: Text, chat: bool) -> Text:
    """A record's prompt as training asks it (``dpo_dist.data.tokenize``): in a chat record
    (``chat``: any of its fields is a messages list) a string prompt is one user turn under the
    chat template, not raw text; otherwise the prompt as it is."""
    from dpo_dist.data.tokenize import as_messages

    return as_messages(prompt, "user") if chat else prompt


def plain_prompt(prompt: Text) -> str:
    """A human-readable prompt: the text itself, or the chat turns as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def generate_batch(
    model, tokenizer, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, synced_gpus: bool = False
) -> list[Completion]:
    """Continue every prompt of one batch (left-padded to the longest); uses torch's global RNG.

    ``synced_gpus``: the model is partitioned over the ranks (ZeRO-3), so every forward is a
    collective; a rank whose rows are finished keeps stepping until every rank's are."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = eos_token_ids(model, tokenizer)
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    config = _generation_config(tokenizer, params, pad_id, eos_ids)
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            # The tokenizer is only needed to match stop strings.
            tokenizer=tokenizer if params.stop else None,
            synced_gpus=synced_gpus,
        )
    new_tokens = out[:, width:].tolist()
    return [
        _completion(tokens, len(ids), tokenizer, pad_id, eos_ids, params.stop) for tokens, ids in zip(new_tokens, prompt_ids)
    ]


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS (what training appends to every
    response) and every EOS of the model's own generation config. Chat models list their
    end-of-turn token there (Llama 3 Instruct: ``<|eot_id|>`` next to ``<|end_of_text|>``);
    without it such a model talks on past its turn until ``max_new_tokens``."""
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    own = [own] if isinstance(own, int) else list(own or [])
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *own] if i is not None))


def _generation_config(tokenizer, params: SamplingParams, pad_id: int, eos_ids: list[int]):
    """A fresh config, so the model's own generation defaults (top_k=50, ...) never leak in
    (only its EOS tokens are taken, see ``eos_token_ids``)."""
    from transformers import GenerationConfig

    sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0} if params.do_sample else {}
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=params.do_sample,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        bos_token_id=tokenizer.bos_token_id,
        stop_strings=list(params.stop) or None,
        **sampling,
    )


def _completion(
    tokens: list[int], prompt_len: int, tokenizer, pad_id: int, eos_ids: Sequence[int], stop: Sequence[str]
) -> Completion:
    """Cut a generated row at its first EOS (counted, but not part of the text) or at the trailing
    padding, then at a stop string."""
    end = next((i for i, token in enumerate(tokens) if token in eos_ids), None)
    finished = end is not None
    if finished:
        tokens = tokens[: end + 1]
    elif pad_id not in eos_ids:
        # generate() pads rows that stopped early (a stop string); padding is not output.
        while tokens and tokens[-1] == pad_id:
            tokens = tokens[:-1]
    text = tokenizer.decode(tokens[:end] if finished else tokens, skip_special_tokens=True)
    cut = [i for i in (text.find(s) for s in stop) if i >= 0]
    if cut:
        text, finished = text[: min(cut)], True
    return Completion(text, prompt_len, len(tokens), "stop" if finished else "length")


def generate_texts(
    model, tokenizer, prompts: Sequence[Text], params: SamplingParams, *, batch_size: int, seed: int = 0,
    seed_offsets: Sequence[int] | None = None, synced_batches: int | None = None,
    template_kwargs: Sequence[dict[str, Any]] | None = None,
) -> list[Completion]:
    """Completions of ``prompts`` in order, ``batch_size`` at a time; ``template_kwargs``: per
    prompt, the variables its chat template is rendered with (``PromptItem.template_kwargs``).

    Before each batch torch is seeded with ``seed`` plus the ``seed_offsets`` entry of its first
    prompt (default: its position), so sampled outputs repeat for the same seed and batching.

    ``synced_batches``: the model is partitioned over the ranks (ZeRO-3) and every rank must make
    exactly this many ``generate`` calls, all with ``synced_gpus``; a rank with fewer prompts
    fills up with one-token batches whose output is dropped.
    """
    import torch

    kwargs = template_kwargs if template_kwargs is not None else [{}] * len(prompts)
    encoded = [encode_prompt(render_prompt(p, tokenizer, k), tokenizer) for p, k in zip(prompts, kwargs, strict=True)]
    offsets = list(seed_offsets) if seed_offsets is not None else list(range(len(prompts)))
    synced = synced_batches is not None
    out: list[Completion] = []
    for start in range(0, len(encoded), batch_size):
        torch.manual_seed(seed + offsets[start])
        out.extend(generate_batch(model, tokenizer, encoded[start : start + batch_size], params, synced))
    calls = -(-len(encoded) // batch_size)
    if synced and calls > synced_batches:
        raise ValueError(f"{len(encoded)} prompts need {calls} batches of {batch_size}, more than synced_batches={synced_batches}")
    filler = [[_filler_token(tokenizer)]]
    for _ in range(calls, synced_batches or 0):
        generate_batch(model, tokenizer, filler, params, synced_gpus=True)
    return out


def _filler_token(tokenizer) -> int:
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if token is not None:
            return token
    return 0


def read_prompts(path: str | Path) -> list[PromptItem]:
    """Prompts of a file: ``.jsonl`` / ``.json`` objects with a ``prompt`` key (preference files
    work: other keys are kept in ``extra``), or ``.txt`` with one prompt per non-blank line.
    A string prompt of a row with chat-message responses is a user turn, as in training; a row's
    ``chat_template_kwargs`` render its chat prompt, as in training."""
    from dpo_dist.data.records import FieldError, is_chat, template_kwargs_of

    path = Path(path)
    if not path.is_file():
        raise GenerationError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json"):
        raise GenerationError(f"{path}: unsupported prompt file (expected .jsonl, .json or .txt)")
    try:
        if suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [PromptItem(i, line) for i, line in enumerate(ln for ln in lines if ln.strip())]
        rows = _jsonl_rows(path) if suffix == ".jsonl" else _json_rows(path)
    except OSError as e:
        raise GenerationError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise GenerationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    items = []
    for example_id, (line, row) in enumerate(rows):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not _is_text(prompt):
            raise GenerationError(f"{path}:{line}: needs a 'prompt' that is a non-empty string or messages list")
        extra = {k: v for k, v in row.items() if k != "prompt"}
        try:
            template_kwargs = template_kwargs_of(row) or {}
        except FieldError as e:
            raise GenerationError(f"{path}:{line}: {e}") from None
        items.append(PromptItem(example_id, trained_prompt(prompt, is_chat(row)), extra, template_kwargs))
    if not items:
        raise GenerationError(f"{path}: no prompts")
    return items


def _jsonl_rows(path: Path) -> list[tuple[int, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise GenerationError(f"{path}:{number}: not JSON ({e.msg})") from None
    return rows


def _json_rows(path: Path) -> list[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GenerationError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise GenerationError(f"{path}: expected a JSON list of objects")
    return list(enumerate(data))


def _is_text(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    )


# ---- preference data generation (dpo-data generate) ----------------------------------------------


@dataclass
class PreferenceStats:
    """What ``generate_preferences`` did with the prompts it was given."""

    prompts: int = 0
    samples: int = 0
    pairs: int = 0
    ties_skipped: int = 0
    empty_skipped: int = 0

    def lines(self) -> list[str]:
        """``name: value`` lines for the command's output."""
        return [f"{name}: {value}" for name, value in vars(self).items()]


def pick_pair(responses: Sequence[str], scores: Sequence[float], tie_margin: float = 0.0) -> tuple[int, int] | str:
    """``(chosen, rejected)`` indices: the best and the worst non-empty response by score, or the
    reason there is no pair: ``"empty"`` (fewer than two non-empty responses) or ``"tie"`` (the
    best does not beat the worst by more than ``tie_margin``, or both say the same)."""
    usable = [i for i, r in enumerate(responses) if r.strip()]
    if len(usable) < 2:
        return "empty"
    best = max(usable, key=lambda i: scores[i])
    worst = min(usable, key=lambda i: scores[i])
    if scores[best] - scores[worst] <= tie_margin or responses[best].strip() == responses[worst].strip():
        return "tie"
    return best, worst


def generate_preferences(
    model, tokenizer, items: Sequence[PromptItem], judge, *, num_samples: int, params: SamplingParams,
    batch_size: int, seed: int,
) -> tuple[list[dict[str, Any]], PreferenceStats]:
    """Sample ``num_samples`` responses per prompt, score them with ``judge`` (a ScoringJudge) and
    keep the best and worst of each prompt as ``{"prompt", "chosen", "rejected", ...}`` records."""
    prompts = [item.prompt for item in items for _ in range(num_samples)]
    template_kwargs = [item.template_kwargs for item in items for _ in range(num_samples)]
    # Samples of one prompt are separate rows, so each draws its own tokens.
    completions = generate_texts(model, tokenizer, prompts, params, batch_size=batch_size, seed=seed, template_kwargs=template_kwargs)
    texts = [c.text for c in completions]
    scores = judge.score(prompts, texts)
    stats = PreferenceStats(prompts=len(items), samples=len(texts))
    records = []
    for k, item in enumerate(items):
        span = slice(k * num_samples, (k + 1) * num_samples)
        picked = pick_pair(texts[span], scores[span], getattr(judge, "tie_margin", 0.0))
        if picked == "empty":
            stats.empty_skipped += 1
        elif picked == "tie":
            stats.ties_skipped += 1
        else:
            best, worst = (k * num_samples + i for i in picked)
            records.append(
                {
                    "prompt": item.prompt,
                    "chosen": texts[best],
                    "rejected": texts[worst],
                    "chosen_score": scores[best],
                    "rejected_score": scores[worst],
                    # training renders the pair with them, as the answers were asked
                    **({"chat_template_kwargs": item.template_kwargs} if item.template_kwargs else {}),
                }
            )
    stats.pairs = len(records)
    return records, stats
