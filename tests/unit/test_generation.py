"""Batched generation (dpo_dist.generation) on a tiny local model: EOS, padding, seeds."""

from __future__ import annotations

import pytest

from dpo_dist.generation import SamplingParams, generate_texts, load_causal_lm
from tests.helpers import make_tiny_model_dir

PROMPTS = ["12+34=", "reverse: abcdefgh", "sort: dcba", "91-46="]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tokenizer = load_causal_lm(make_tiny_model_dir(tmp_path_factory.mktemp("gen") / "model", layers=1), "cpu")
    return model, tokenizer


def test_generation_stops_at_the_models_own_eos_tokens(tiny):
    """A chat model's generation_config lists its end-of-turn token next to the tokenizer's EOS
    (Llama 3 Instruct: <|eot_id|> and <|end_of_text|>); generation ends at either, and the EOS
    token is counted but is not part of the text."""
    model, tokenizer = tiny
    greedy = SamplingParams(max_new_tokens=8)
    free = generate_texts(model, tokenizer, PROMPTS[:1], greedy, batch_size=1)[0]
    assert free.finish_reason == "length" and len(free.text) == 8, free  # one token per character
    end_of_turn = tokenizer(free.text[2], add_special_tokens=False)["input_ids"][0]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    try:
        stopped = generate_texts(model, tokenizer, PROMPTS[:1], greedy, batch_size=1)[0]
    finally:
        model.generation_config.eos_token_id = saved
    assert (stopped.text, stopped.completion_tokens, stopped.finish_reason) == (free.text[:2], 3, "stop")


def test_left_padded_batches_answer_as_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    greedy = SamplingParams(max_new_tokens=6)
    batched = generate_texts(model, tokenizer, PROMPTS, greedy, batch_size=4)
    alone = generate_texts(model, tokenizer, PROMPTS, greedy, batch_size=1)
    assert [c.text for c in batched] == [c.text for c in alone]
    assert len({c.prompt_tokens for c in batched}) > 1, "the prompts differ in length: the batch is padded"
