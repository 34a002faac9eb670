"""Judges (rule, reward model, OpenAI-compatible endpoint), win-rate statistics and pair picking."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dpo_dist.config import JudgeConfig
from dpo_dist.generation import pick_pair
from dpo_dist.judges import (
    Comparison,
    JudgeError,
    OpenAIJudge,
    RewardModelJudge,
    RuleJudge,
    add_usage,
    combine_orders,
    parse_choice,
    preflight,
)
from dpo_dist.winrate import summarize, wilson_interval
from tests.helpers import bundled_llama_config


def make_tiny_reward_model_dir(path: Path, *, seed: int = 0) -> Path:
    """A random one-label Llama sequence classifier + the bundled tokenizer (a stand-in reward model)."""
    import torch
    from transformers import LlamaForSequenceClassification

    tok, cfg = bundled_llama_config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=1,
    )
    torch.manual_seed(seed)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---- rule ----------------------------------------------------------------------------------------


def test_rule_judge_on_hand_made_pairs():
    items = [
        Comparison("47+38=", "85", "75"),  # policy right, reference wrong
        Comparison("91-46=", "55", " 45\n"),  # whitespace around an answer is fine
        Comparison("reverse: kqzmt", "tmzqk", "tmzqk"),  # both right
        Comparison("sort: dbeca", "abdce", "abcdd"),  # both wrong
        Comparison([{"role": "user", "content": "12+30="}], "42", "43"),  # chat: the last user turn
        Comparison("47+38=", "085", "85."),  # near misses are wrong
    ]
    verdicts = RuleJudge().compare(items)
    assert [v.winner for v in verdicts] == ["a", "b", "tie", "tie", "a", "tie"]
    assert verdicts[0].details == {"score_a": 1.0, "score_b": 0.0}


def test_rule_judge_refuses_prompts_outside_the_task():
    with pytest.raises(JudgeError, match="prompt 1 is not one"):
        RuleJudge().compare([Comparison("23+45=", "68", "67"), Comparison("What is DPO?", "x", "y")])
    with pytest.raises(JudgeError, match="judge=rule only checks bundled-task prompts"):
        preflight(JudgeConfig(name="rule"), ["23+45=", "  23+45="])


# ---- reward model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    return make_tiny_reward_model_dir(tmp_path_factory.mktemp("rm") / "rm")


def test_reward_model_judge_prefers_the_higher_score(reward_model):
    prompts = ["12+34=", "reverse: abc", [{"role": "user", "content": "hello"}]]
    responses = ["46", "a much longer response", "hi there"]
    judge = RewardModelJudge(reward_model, batch_size=2)
    scores = judge.score(prompts, responses)
    # Right padding and batching must not change a score.
    one_by_one = RewardModelJudge(reward_model, batch_size=1).score(prompts, responses)
    assert scores == pytest.approx(one_by_one, abs=1e-5)
    assert len(set(scores)) == 3
    items = [Comparison(prompts[0], responses[0], responses[1]), Comparison(prompts[0], responses[1], responses[0])]
    first, swapped = judge.compare(items)
    assert {first.winner, swapped.winner} == {"a", "b"}, "swapping the responses swaps the winner"
    assert judge.compare([Comparison("12+34=", "46", "46")])[0].winner == "tie"
    judge.tie_margin = 1e9
    assert judge.compare(items[:1])[0].winner == "tie"


def test_reward_model_score_is_the_classifiers_logit_and_the_higher_one_wins(reward_model):
    """A score is the classifier's own output for prompt + response (chat prompts through the
    tokenizer's chat template), not a transform of it; the response with the higher one wins."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    classifier = AutoModelForSequenceClassification.from_pretrained(reward_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_model)

    def logit(text: str) -> float:
        ids = tokenizer(text, add_special_tokens=not text.startswith(tokenizer.bos_token))["input_ids"]
        with torch.no_grad():
            return classifier(torch.tensor([ids])).logits[0, 0].item()

    chat = [{"role": "user", "content": "hello"}]
    prompts = ["12+34=", "12+34=", "reverse: abc", chat]
    responses = ["46", "a much longer response", "cba", "hi there"]
    texts = [p + r for p, r in zip(prompts[:3], responses[:3])]
    texts.append(tokenizer.apply_chat_template([*chat, {"role": "assistant", "content": "hi there"}], tokenize=False))
    judge = RewardModelJudge(reward_model, batch_size=2)
    scores = judge.score(prompts, responses)
    assert scores == pytest.approx([logit(text) for text in texts], abs=1e-5)

    high, low = sorted(responses[:2], key=lambda r: scores[responses.index(r)], reverse=True)
    assert scores[responses.index(high)] > scores[responses.index(low)] + 1e-4  # a real difference
    as_a, as_b = judge.compare([Comparison("12+34=", high, low), Comparison("12+34=", low, high)])
    assert (as_a.winner, as_b.winner) == ("a", "b")
    assert as_a.details == {"score_a": pytest.approx(scores[responses.index(high)], abs=1e-5),
                            "score_b": pytest.approx(scores[responses.index(low)], abs=1e-5)}


def test_reward_model_judge_batches_by_length_and_keeps_the_order(reward_model):
    """Rows are batched longest first, so similar lengths share a batch (no padding here);
    the scores come back in the order of the inputs."""
    judge = RewardModelJudge(reward_model, batch_size=2)
    model, padding = judge.model, []

    def counting_padding(input_ids, attention_mask):
        padding.append(int((attention_mask == 0).sum()))
        return model(input_ids=input_ids, attention_mask=attention_mask)

    judge.model = counting_padding
    responses = ["x" * 20, "y", "z" * 20, "w", "v" * 10]
    scores = judge.score(["12+34="] * 5, responses)
    assert padding == [0, 9, 0], padding  # (x20, z20), (v10, y), (w)
    alone = RewardModelJudge(reward_model, batch_size=1).score(["12+34="] * 5, responses)
    assert scores == pytest.approx(alone, abs=1e-5)


def test_reward_model_judge_needs_a_model_directory(tmp_path):
    with pytest.raises(JudgeError, match="not a Hugging Face model directory"):
        RewardModelJudge(tmp_path)


# ---- OpenAI-compatible endpoint against a local stub ---------------------------------------------

_RESPONSES = re.compile(r"\[Response A\]\n(.*)\n\n\[Response B\]\n(.*)\n\nWhich", re.S)


class _StubJudgeServer:
    """An OpenAI-style /chat/completions on 127.0.0.1 that prefers responses containing "good".

    Prompts steer failures: "slow" stalls the first request past the client's timeout, "busy..."
    answers the first request with 503, "throttled" the first with 429 and a Retry-After of a
    day, "garbled" the first with a 200 that is not JSON, "down" always 503, "biased" always
    answers "A", "refuse" answers 400; a model other than "stub-judge" is a 404. With
    ``fail_after`` set, every request after that many is a 503 (an outage).
    """

    def __init__(self):
        self.asked: list[tuple[str, str, str]] = []
        self.fail_after: int | None = None
        self.auth: set[str] = set()
        self.first_seen: set[str] = set()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _first(self, prompt: str) -> bool:
        with self.lock:
            first = prompt not in self.first_seen
            self.first_seen.add(prompt)
            return first

    def answer(self, body: dict) -> tuple[int, dict | bytes]:
        text = body["messages"][-1]["content"]
        prompt = text.split("\n")[1]
        a, b = _RESPONSES.search(text).groups()
        with self.lock:
            self.asked.append((prompt, a, b))
            outage = self.fail_after is not None and len(self.asked) > self.fail_after
        if outage:
            return 503, {"error": {"message": "outage"}}
        if body["model"] != "stub-judge":
            return 404, {"error": {"message": f"The model `{body['model']}` does not exist"}}
        if prompt == "slow" and self._first(prompt):
            time.sleep(1.5)
        if prompt.startswith("busy") and self._first(prompt):
            return 503, {"error": {"message": "overloaded"}}
        if prompt == "throttled" and self._first(prompt):
            return 429, {"error": {"message": "rate limited"}}, {"Retry-After": "86400"}
        if prompt == "garbled" and self._first(prompt):
            return 200, b"<html>502 Bad Gateway</html>"
        if prompt == "down":
            return 503, {"error": {"message": "overloaded"}}
        if prompt == "refuse":
            return 400, {"error": {"message": "bad request for sure"}}
        verdict = "A" if prompt == "biased" or "good" in a else "B"
        message = {"role": "assistant", "content": f"{verdict}"}
        return 200, {"choices": [{"message": message}], "usage": {"prompt_tokens": 100, "completion_tokens": 1}}

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                stub.auth.add(self.headers.get("Authorization", ""))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload, *headers = stub.answer(body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for name, value in (headers[0] if headers else {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the timeout test)

            def log_message(self, *args):
                pass

        return Handler

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _judge_config(base_url: str, **extra) -> JudgeConfig:
    values = dict(
        name="openai", base_url=base_url, model="stub-judge", api_key_env="DPO_TEST_JUDGE_KEY", timeout_s=0.5,
        max_retries=2, backoff_s=0.01, concurrency=4, price_input_per_mtok=2.0, price_output_per_mtok=8.0,
    )
    return JudgeConfig(**{**values, **extra})


def test_openai_judge_asks_both_orders_retries_and_counts_usage(monkeypatch):
    monkeypatch.setenv("DPO_TEST_JUDGE_KEY", "sk-test")
    items = [
        Comparison("p1", "good answer", "bad answer"),
        Comparison("p2", "meh", "a good one"),
        Comparison("biased", "good", "bad"),  # says "A" in both orders: position bias -> tie
        Comparison("slow", "good", "bad"),  # first request times out, the retry answers
        Comparison("busy", "bad", "good"),  # first request gets 503, the retry answers
    ]
    with _StubJudgeServer() as stub, OpenAIJudge(_judge_config(stub.base_url)) as judge:
        verdicts = judge.compare(items)
        usage = judge.usage()
    assert [v.winner for v in verdicts] == ["a", "b", "tie", "a", "b"]
    assert verdicts[0].details == {"ab": "A", "ba": "B"}
    for item in items:
        assert (item.prompt, item.a, item.b) in stub.asked and (item.prompt, item.b, item.a) in stub.asked
    assert stub.auth == {"Bearer sk-test"}
    assert usage["retries"] == 2 and usage["requests"] == 12
    assert usage["prompt_tokens"] == 1000 and usage["completion_tokens"] == 10
    assert usage["cost_usd"] == pytest.approx((1000 * 2.0 + 10 * 8.0) / 1e6)


class _RecordedWaits(threading.Event):
    """Stands in for a judge's abort event: records each wait before a retry and returns at once."""

    def __init__(self):
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return self.is_set()


def test_openai_judge_retries_after_a_jittered_backoff(monkeypatch):
    """Requests that failed together do not retry in lockstep: each waits backoff_s times a
    random factor in [0.5, 1.5]."""
    monkeypatch.setenv("DPO_TEST_JUDGE_KEY", "sk-test")
    with _StubJudgeServer() as stub, OpenAIJudge(_judge_config(stub.base_url, backoff_s=1.0)) as judge:
        judge._abort = waits = _RecordedWaits()
        verdicts = judge.compare([Comparison(f"busy {i}", "good", "bad") for i in range(8)])
    assert [v.winner for v in verdicts] == ["a"] * 8
    assert len(waits.waits) == 8 and all(0.5 <= w <= 1.5 for w in waits.waits), waits.waits
    assert len(set(waits.waits)) == 8, waits.waits


def test_openai_judge_caps_a_servers_retry_after(monkeypatch):
    """A Retry-After of a day is honoured for MAX_RETRY_AFTER_S (60 s), not a day."""
    monkeypatch.setenv("DPO_TEST_JUDGE_KEY", "sk-test")
    with _StubJudgeServer() as stub, OpenAIJudge(_judge_config(stub.base_url, backoff_s=0.01)) as judge:
        judge._abort = waits = _RecordedWaits()
        verdicts = judge.compare([Comparison("throttled", "good", "bad")])
    assert [v.winner for v in verdicts] == ["a"]
    assert waits.waits == [60.0]


def test_openai_judge_errors_are_one_line(monkeypatch):
    monkeypatch.delenv("DPO_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match="DPO_TEST_JUDGE_KEY is not set"):
        preflight(_judge_config("http://127.0.0.1:9/v1"), ["p"])
    monkeypatch.setenv("DPO_TEST_JUDGE_KEY", "sk-test")
    with _StubJudgeServer() as stub, OpenAIJudge(_judge_config(stub.base_url)) as judge:
        with pytest.raises(JudgeError, match="HTTP 400: bad request for sure") as err:
            judge.compare([Comparison("refuse", "x", "y")])
    assert "\n" not in str(err.value)
    # Nothing listens on port 9 (discard): connection errors are retried, then reported.
    with OpenAIJudge(_judge_config("http://127.0.0.1:9/v1", max_retries=1)) as judge:
        with pytest.raises(JudgeError, match="gave up after 2 attempts; last: connection failed"):
            judge.compare([Comparison("p", "x", "y")])


def test_openai_judge_retries_an_answer_that_is_not_a_chat_completion(monkeypatch):
    """A 200 whose body is not JSON (a proxy's error page) is retried like a 502, not fatal."""
    monkeypatch.setenv("DPO_TEST_JUDGE_KEY", "sk-test")
    with _StubJudgeServer() as stub, OpenAIJudge(_judge_config(stub.base_url)) as judge:
        verdicts = judge.compare([Comparison("garbled", "good", "bad")])
        usage = judge.usage()
    assert [v.winner for v in verdicts] == ["a"]
    assert usage["retries"] == 1 and usage["requests"] == 3 and usage["prompt_tokens"] == 200


def test_openai_judge_failure_stops_the_requests_waiting_to_retry(monkeypatch):
    """One request failing for good is reported at once, not after every other request has
    used up its retries (here 5 + 10 + 20 s of backoff)."""
    monkeypatch.setenv("DPO_TEST_JUDGE_KEY", "sk-test")
    with _StubJudgeServer() as stub, OpenAIJudge(_judge_config(stub.base_url, max_retries=3, backoff_s=5.0)) as judge:
        started = time.monotonic()
        with pytest.raises(JudgeError, match="HTTP 400: bad request for sure"):
            judge.compare([Comparison("down", "x", "y"), Comparison("refuse", "x", "y")])
        assert time.monotonic() - started < 4
        assert judge.compare([Comparison("p1", "good", "bad")])[0].winner == "a", "the judge still works"


def test_openai_preflight_asks_the_endpoint_once(monkeypatch):
    """A wrong model name (or URL, or key) fails before generation, not after it."""
    monkeypatch.setenv("DPO_TEST_JUDGE_KEY", "sk-test")
    with _StubJudgeServer() as stub:
        with pytest.raises(JudgeError, match="HTTP 404: The model `stub-jugde` does not exist"):
            preflight(_judge_config(stub.base_url, model="stub-jugde"), ["p"])
        usage = preflight(_judge_config(stub.base_url), ["p"])
    assert stub.asked == [("2+2=", "4", "5")] * 2
    # The probe is a paid request: dpo-eval winrate adds it to judge_usage (add_usage).
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (1, 100, 1)
    assert usage["cost_usd"] == pytest.approx((100 * 2.0 + 1 * 8.0) / 1e6)
    assert preflight(JudgeConfig(name="rule"), ["23+45="]) == {}
    total = add_usage(usage, {"requests": 4, "retries": 1, "prompt_tokens": 400, "cost_usd": 1.0})
    assert (total["requests"], total["retries"], total["prompt_tokens"], total["completion_tokens"]) == (5, 1, 500, 1)
    assert total["cost_usd"] == pytest.approx(1.0 + usage["cost_usd"])


@pytest.mark.parametrize(
    "answer, letter",
    [("A", "A"), (" b.", "B"), ("Response B", "B"), ("**A** is better", "A"), ("I prefer B", "B"), ("A or B", None), ("neither", None)],
)
def test_parse_choice(answer, letter):
    assert parse_choice(answer) == letter


def test_combine_orders_needs_agreement():
    assert combine_orders("A", "B") == "a"
    assert combine_orders("B", "A") == "b"
    assert combine_orders("A", "A") == "tie"
    assert combine_orders(None, "B") == "tie"


# ---- statistics and pair picking -----------------------------------------------------------------


def test_wilson_interval_and_summary():
    lo, hi = wilson_interval(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    result = summarize(["win"] * 6 + ["tie"] * 2 + ["loss"] * 2)
    assert (result["n"], result["wins"], result["ties"], result["losses"]) == (10, 6, 2, 2)
    assert result["score"] == pytest.approx(0.7) and result["win_rate"] == pytest.approx(0.6)
    assert result["score_ci95"] == list(wilson_interval(7, 10))


def test_pick_pair_takes_best_and_worst_and_skips_ties():
    assert pick_pair(["a", "b", "c"], [0.1, 0.9, -0.5]) == (1, 2)
    assert pick_pair(["a", " ", "c"], [0.1, 9.0, 0.0]) == (0, 2), "empty responses never become pairs"
    assert pick_pair(["a", ""], [1.0, 0.0]) == "empty"
    assert pick_pair(["85", "75"], [1.0, 1.0]) == "tie"
    assert pick_pair(["x", "x "], [1.0, 0.0]) == "tie", "the same text twice is no preference"
    assert pick_pair(["a", "b"], [0.3, 0.2], tie_margin=0.5) == "tie"


def test_a_reward_model_without_a_declared_context_says_what_it_assumes(reward_model, tmp_path, caplog):
    """A config without max_position_embeddings (Bloom: ALiBi, no position table): the judge reads
    the last 4096 tokens, and says so once when it is built, naming the model; a config that
    declares one is not mentioned."""
    import logging

    import torch
    from transformers import AutoTokenizer, BloomConfig, BloomForSequenceClassification

    from tests.helpers import TOKENIZER_DIR

    caplog.set_level(logging.WARNING, logger="dpo_dist.judges")
    RewardModelJudge(reward_model)
    assert not [r for r in caplog.records if r.name == "dpo_dist.judges"]
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=1, n_head=4, num_labels=1,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert getattr(config, "max_position_embeddings", None) is None
    torch.manual_seed(0)
    bloom = tmp_path / "bloom_rm"
    BloomForSequenceClassification(config).save_pretrained(bloom)
    tok.save_pretrained(bloom)
    judge = RewardModelJudge(bloom)
    assert judge.max_length == 4096 and len(judge.score(["12+34="] * 2, ["46", "47"])) == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "dpo_dist.judges"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{bloom}: the reward model's config declares no context length")
    assert "assuming 4096 tokens" in warnings[0]
