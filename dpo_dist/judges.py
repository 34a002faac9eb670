"""Pluggable judges: which of two responses to a prompt is better.

Every judge answers ``compare(items) -> verdicts`` for a list of ``Comparison(prompt, a, b)``;
a ``Verdict`` names the winner (``"a"``, ``"b"`` or ``"tie"``) and carries judge-specific details
for the per-example log. Three are built in (``judge=<name>``, settings under ``eval.judge.*``):

- ``rule``: the bundled task's verifier (``dpo_dist.tasks.verify``). A response that verifies beats
  one that does not; both or neither is a tie. Prompts outside the task are an error, never
  silently scored as wrong.
- ``reward_model``: a local ``AutoModelForSequenceClassification`` (one label) scores
  ``prompt + response`` (chat prompts through its chat template); the higher score wins, a
  difference of at most ``tie_margin`` is a tie.
- ``openai``: any OpenAI-compatible ``/chat/completions`` endpoint, asked in BOTH orders (A/B and
  B/A) to cancel position bias: the winner must win both; disagreement or an unusable answer is
  a tie. Requests time out, are retried with jittered exponential backoff (timeouts, connection
  errors, 429, 5xx, a 200 whose body is not a chat completion; a server's ``Retry-After`` is
  honoured up to ``MAX_RETRY_AFTER_S``), and token usage and an estimated cost are counted.
  The first request that fails for good stops the others and is the error.

``rule`` and ``reward_model`` are ``ScoringJudge``s: they also score single responses, which
``dpo-data generate`` needs to rank several samples of one prompt.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_dist import tasks
from dpo_dist.config import JudgeConfig
from dpo_dist.generation import Text, encode_prompt, model_identity, plain_prompt

log = logging.getLogger("dpo_dist.judges")


class JudgeError(ValueError):
    """A judge that cannot work as configured, or an endpoint that keeps failing (one line)."""


@dataclass(frozen=True)
class Comparison:
    """Two responses to one prompt; ``a`` is conventionally the policy's."""

    prompt: Text
    a: str
    b: str


@dataclass(frozen=True)
class Verdict:
    """``winner`` is ``"a"``, ``"b"`` or ``"tie"``; ``details`` go to the per-example log."""

    winner: str
    details: dict[str, Any] = field(default_factory=dict)


def same_response(item: Comparison) -> bool:
    """Both responses say the same (surrounding whitespace aside): no judge can prefer one."""
    return item.a.strip() == item.b.strip()


class Judge:
    """Base class: ``compare`` a batch of pairs; ``usage`` reports costs; ``close`` frees resources."""

    name = "judge"

    def compare(self, items: Sequence[Comparison]) -> list[Verdict]:
        """One verdict per item, in order."""
        raise NotImplementedError

    def usage(self) -> dict[str, Any]:
        """What judging cost so far (requests, tokens, USD); empty for local judges."""
        return {}

    def close(self) -> None:
        """Release models or connections (the judge is unusable afterwards)."""

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ScoringJudge(Judge):
    """A judge that scores each response on its own; comparing is a difference of scores."""

    tie_margin = 0.0

    def score(self, prompts: Sequence[Text], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response); higher is better."""
        raise NotImplementedError

    def compare(self, items: Sequence[Comparison]) -> list[Verdict]:
        prompts = [item.prompt for item in items]
        scores = self.score(prompts * 2, [item.a for item in items] + [item.b for item in items])
        verdicts = []
        for item, score_a, score_b in zip(items, scores[: len(items)], scores[len(items) :]):
            # The same text twice is a tie even when batched float math scores it 1e-8 apart.
            if same_response(item) or abs(score_a - score_b) <= self.tie_margin:
                winner = "tie"
            else:
                winner = "a" if score_a > score_b else "b"
            verdicts.append(Verdict(winner, {"score_a": score_a, "score_b": score_b}))
        return verdicts


# ---- rule ----------------------------------------------------------------------------------------


def task_prompt(prompt: Text) -> str:
    """The bundled-task question in ``prompt``: the text, or the last user message of a chat."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


class RuleJudge(ScoringJudge):
    """The bundled task's verifier: 1.0 for a response that is exactly right, else 0.0."""

    name = "rule"

    @staticmethod
    def check_prompts(prompts: Sequence[Text]) -> None:
        """Raise ``JudgeError`` naming the first prompt the verifier cannot check."""
        for index, prompt in enumerate(prompts):
            try:
                tasks.parse(task_prompt(prompt))
            except ValueError:
                raise JudgeError(
                    f"judge=rule only checks bundled-task prompts; prompt {index} is not one: "
                    f"{plain_prompt(prompt)[:60]!r} (use judge=reward_model or judge=openai)"
                ) from None

    def score(self, prompts: Sequence[Text], responses: Sequence[str]) -> list[float]:
        self.check_prompts(prompts)
        return [1.0 if tasks.verify(task_prompt(p), r) else 0.0 for p, r in zip(prompts, responses)]


# ---- reward model --------------------------------------------------------------------------------

REWARD_MODEL_FALLBACK_CONTEXT = 4096
"""Tokens a reward model reads (the last ones of prompt + response) when its config declares no
``max_position_embeddings``: an assumption, logged when made."""


class RewardModelJudge(ScoringJudge):
    """A local sequence-classification reward model with one output: higher is better."""

    name = "reward_model"

    def __init__(self, path: str | Path, *, batch_size: int = 16, tie_margin: float = 0.0, device=None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise JudgeError(f"eval.judge.reward_model_path={path}: not a Hugging Face model directory")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, local_files_only=True)
        if model.config.num_labels != 1:
            raise JudgeError(f"{path}: a reward model has one output label, this one has {model.config.num_labels}")
        self.pad_id = self._pad_id()
        # The classifier pools the last non-pad token, which it finds through config.pad_token_id.
        model.config.pad_token_id = self.pad_id
        self.model = model.to(self.device).eval()
        self.max_length = getattr(model.config, "max_position_embeddings", None)
        if not self.max_length:
            self.max_length = REWARD_MODEL_FALLBACK_CONTEXT
            log.warning(
                "%s: the reward model's config declares no context length (max_position_embeddings); "
                "assuming %d tokens: longer prompt + response texts are scored on their last %d tokens",
                path, self.max_length, self.max_length,
            )
        self.batch_size = batch_size
        self.tie_margin = tie_margin

    def _pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise JudgeError("the reward model's tokenizer has neither a pad nor an EOS token")
        return pad

    def text(self, prompt: Text, response: str) -> str:
        """What the reward model reads: plain ``prompt + response``, or the chat rendering of both."""
        if isinstance(prompt, str):
            return prompt + response
        if not getattr(self.tokenizer, "chat_template", None):
            raise JudgeError("chat prompts need a reward-model tokenizer with a chat template")
        messages = [*prompt, {"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def score(self, prompts: Sequence[Text], responses: Sequence[str]) -> list[float]:
        import torch

        # Left-truncate: the classifier reads the last token, so the end of a response must stay.
        ids = [encode_prompt(self.text(p, r), self.tokenizer)[-self.max_length :] for p, r in zip(prompts, responses)]
        # Batched longest first: rows of similar length share a batch (little padding), and a
        # batch too big for the device fails at once rather than at the end.
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        scores = [0.0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for i, score in zip(batch, logits[:, 0].float().cpu().tolist()):
                scores[i] = score
        return scores

    def close(self) -> None:
        self.model = None


# ---- OpenAI-compatible endpoint ------------------------------------------------------------------

JUDGE_SYSTEM_PROMPT = (
    "You are a careful, impartial judge. You compare two responses to the same prompt and decide "
    "which one is better: more correct, more helpful, and more faithful to the prompt. Do not let "
    "the order of the responses or their length influence you."
)
JUDGE_USER_TEMPLATE = (
    "[Prompt]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
    "Which response is better? Answer with a single letter: A or B."
)
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 60.0
"""The longest wait a server's ``Retry-After`` header can ask for: a bad header (an hour, a
day) must not stall a run; the retry budget (``max_retries``) still bounds the attempts."""
_ONLY_LETTER = re.compile(r"^\W*(?:response\s*)?([AB])\W*$", re.IGNORECASE)
_ANY_LETTER = re.compile(r"\b([AB])\b")


def parse_choice(answer: str) -> str | None:
    """``"A"`` or ``"B"`` from a judge's answer, or None when it is not clearly one of them: the
    answer is just the letter, or names exactly one of the two (``"A or B"`` is no answer)."""
    only = _ONLY_LETTER.match(answer.strip())
    if only:
        return only.group(1).upper()
    letters = set(_ANY_LETTER.findall(answer))
    return letters.pop() if len(letters) == 1 else None


def combine_orders(first: str | None, second: str | None) -> str:
    """Winner of a pair asked as (a, b) -> ``first`` and as (b, a) -> ``second``; tie unless both agree."""
    first_pick = {"A": "a", "B": "b"}.get(first or "")
    second_pick = {"A": "b", "B": "a"}.get(second or "")
    return first_pick if first_pick is not None and first_pick == second_pick else "tie"


class OpenAIJudge(Judge):
    """Pairwise verdicts from an OpenAI-compatible chat endpoint, each pair asked in both orders."""

    name = "openai"

    def __init__(self, cfg: JudgeConfig):
        import httpx

        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        key = api_key(cfg)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(cfg.timeout_s))
        # httpx logs every request at INFO: two lines per pair would drown the run's log.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self._lock = threading.Lock()
        self._abort = threading.Event()  # set when one request failed for good: the rest stop retrying
        self._jitter = random.Random()  # its own generator: judging leaves the global one alone
        self._usage = {"requests": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0, "unparsed": 0}

    def compare(self, items: Sequence[Comparison]) -> list[Verdict]:
        asked = [item for item in items if not same_response(item)]  # identical pairs cost nothing
        # Both orders of every pair go through one pool, so a slow endpoint is used concurrently.
        jobs = [(item.prompt, item.a, item.b) for item in asked] + [(item.prompt, item.b, item.a) for item in asked]
        answers = self._run_all(jobs)
        forward, backward = iter(answers[: len(asked)]), iter(answers[len(asked) :])
        verdicts = []
        for item in items:
            if same_response(item):
                verdicts.append(Verdict("tie", {"identical": True}))
                continue
            (ab_text, ab), (ba_text, ba) = next(forward), next(backward)
            verdicts.append(Verdict(combine_orders(ab, ba), {"ab": ab_text, "ba": ba_text}))
        return verdicts

    def _run_all(self, jobs: list[tuple[Text, str, str]]) -> list[tuple[str, str | None]]:
        """``ask`` every job on ``concurrency`` threads. The first failure cancels what has not
        started and wakes the requests waiting to retry (they give up), so the error is reported
        at once rather than after every other request has used up its retries."""
        self._abort.clear()
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            futures = [pool.submit(self.ask, *job) for job in jobs]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
                # Before the abort, every failure is a real one (afterwards others fail as _Aborted).
                failed = next((f.exception() for f in futures if f.done() and f.exception()), None)
                if failed is None:
                    return [f.result() for f in futures]
                raise failed
            finally:
                self._abort.set()
                for f in futures:
                    f.cancel()

    def ask(self, prompt: Text, a: str, b: str) -> tuple[str, str | None]:
        """One request: the judge's raw answer and the letter it picked (None if unclear)."""
        messages = [
            {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
            {"role": "user", "content": JUDGE_USER_TEMPLATE.format(prompt=plain_prompt(prompt), a=a, b=b)},
        ]
        payload = {"model": self.cfg.model, "messages": messages, "temperature": 0, "max_tokens": self.cfg.max_tokens}
        answer, usage = self._post(payload)
        choice = parse_choice(answer)
        with self._lock:
            self._usage["prompt_tokens"] += _token_count(usage.get("prompt_tokens"))
            self._usage["completion_tokens"] += _token_count(usage.get("completion_tokens"))
            self._usage["unparsed"] += choice is None
        return answer, choice

    def _post(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """POST with retries; the answer's text and its ``usage``. Timeouts, connection errors,
        429, 5xx and a 200 that is not a chat completion (a proxy's error page, a cut-off body)
        wait and retry; other HTTP errors fail at once."""
        import httpx

        delay = self.cfg.backoff_s
        for attempt in range(self.cfg.max_retries + 1):
            with self._lock:
                self._usage["requests"] += 1
            # Jitter: requests that failed together (a burst of 429s) do not all retry together.
            wait_s = delay * self._jitter.uniform(0.5, 1.5)
            try:
                response = self.client.post(self.url, json=payload)
            except httpx.TimeoutException:
                error = f"no answer within {self.cfg.timeout_s:g}s"
            except httpx.TransportError as e:
                error = f"connection failed ({type(e).__name__}: {e})"
            else:
                if response.status_code == 200:
                    answer = _chat_answer(response)
                    if not isinstance(answer, str):
                        return answer
                    error = answer
                else:
                    error = f"HTTP {response.status_code}: {_error_message(response)}"
                    if response.status_code not in RETRY_STATUSES:
                        raise JudgeError(f"judge=openai: {self.url}: {error}")
                    wait_s = max(wait_s, _retry_after(response))
            if attempt == self.cfg.max_retries:
                raise JudgeError(f"judge=openai: {self.url}: gave up after {attempt + 1} attempts; last: {error}")
            with self._lock:
                self._usage["retries"] += 1
            log.warning("judge request failed (%s); retry %d/%d in %.1fs", error, attempt + 1, self.cfg.max_retries, wait_s)
            if self._abort.wait(wait_s):
                raise _Aborted("another judge request failed")
            delay *= 2
        raise AssertionError("unreachable")

    def usage(self) -> dict[str, Any]:
        with self._lock:
            usage = dict(self._usage)
        usage["cost_usd"] = (
            usage["prompt_tokens"] * self.cfg.price_input_per_mtok
            + usage["completion_tokens"] * self.cfg.price_output_per_mtok
        ) / 1e6
        return usage

    def close(self) -> None:
        self.client.close()


def api_key(cfg: JudgeConfig) -> str | None:
    """The key from the environment variable named by ``api_key_env`` (None when that is null)."""
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise JudgeError(
            f"judge=openai: environment variable {cfg.api_key_env} is not set "
            "(eval.judge.api_key_env names it; null for a server without keys)"
        )
    return key


class _Aborted(JudgeError):
    """A request given up because another one failed (never the error reported)."""


def _chat_answer(response) -> tuple[str, dict[str, Any]] | str:
    """``(content, usage)`` of a 200 chat completion, or a string saying what is wrong with it.
    A null content (a refusal) is an empty answer: a tie, not an error."""
    try:
        body = response.json()
    except ValueError:
        return "answered 200 with a body that is not JSON"
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return "answered 200 without choices[0].message.content"
    usage = body.get("usage")
    return content if isinstance(content, str) else "", usage if isinstance(usage, dict) else {}


def _token_count(value: Any) -> int:
    """A ``usage`` token count; anything but a non-negative integer counts 0."""
    return value if isinstance(value, int) and value >= 0 else 0


def _error_message(response) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the start of the body."""
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return " ".join(str(message or response.text).split())[:200]


def _retry_after(response) -> float:
    """Seconds the server's ``Retry-After`` asks for, at most ``MAX_RETRY_AFTER_S``; 0 when it
    asks for nothing usable (absent, negative, not a number of seconds)."""
    try:
        seconds = float(response.headers.get("retry-after", 0))
    except ValueError:
        return 0.0
    return min(seconds, MAX_RETRY_AFTER_S) if math.isfinite(seconds) and seconds > 0 else 0.0


# ---- construction --------------------------------------------------------------------------------


PROBE = Comparison("2+2=", "4", "5")
"""The one comparison ``preflight`` asks an endpoint (in one order)."""


def preflight(cfg: JudgeConfig, prompts: Sequence[Text]) -> dict[str, Any]:
    """Cheap checks before any generation, so a misconfigured judge fails in seconds, not after hours;
    returns what they cost (``Judge.usage``; empty for local judges).

    ``openai`` asks the endpoint one short question: a wrong ``base_url``, key or model name, or
    a request the model refuses (e.g. an unsupported parameter), shows here and not after hours
    of generation."""
    if cfg.name == "rule":
        RuleJudge.check_prompts(prompts)
    elif cfg.name == "reward_model":
        if not (Path(cfg.reward_model_path) / "config.json").is_file():
            raise JudgeError(f"eval.judge.reward_model_path={cfg.reward_model_path}: not a Hugging Face model directory")
    elif cfg.name == "openai":
        with OpenAIJudge(cfg) as judge:
            answer, choice = judge.ask(PROBE.prompt, PROBE.a, PROBE.b)
            usage = judge.usage()
        if choice is None:
            log.warning("judge=openai: %s answered %r when asked for A or B; unclear answers count as ties",
                        cfg.model, answer[:80])
        return usage
    return {}


def add_usage(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two ``Judge.usage`` reports summed key by key (a key missing from one counts 0 there)."""
    return {key: first.get(key, 0) + second.get(key, 0) for key in {**first, **second}}


def judge_identity(cfg: JudgeConfig) -> dict[str, Any]:
    """What decides a verdict besides the prompt and the two responses: ``dpo-eval winrate``
    reuses a saved verdict only for the same identity (and settings that only change how fast
    or how costly judging is are not part of it)."""
    if cfg.name == "reward_model":
        return {"name": cfg.name, "model": model_identity(cfg.reward_model_path), "tie_margin": cfg.tie_margin}
    if cfg.name == "openai":
        return {"name": cfg.name, "base_url": cfg.base_url, "model": cfg.model, "max_tokens": cfg.max_tokens,
                "prompt": [JUDGE_SYSTEM_PROMPT, JUDGE_USER_TEMPLATE]}
    return {"name": cfg.name}


def build_judge(cfg: JudgeConfig, device=None) -> Judge:
    """The judge ``cfg`` names, ready to ``compare``."""
    if cfg.name == "rule":
        return RuleJudge()
    if cfg.name == "reward_model":
        return RewardModelJudge(cfg.reward_model_path, batch_size=cfg.batch_size, tie_margin=cfg.tie_margin, device=device)
    if cfg.name == "openai":
        return OpenAIJudge(cfg)
    raise JudgeError(f"unknown judge {cfg.name!r}")
