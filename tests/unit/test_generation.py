"""Batched generation (dpo_dist.generation) on a tiny local model: EOS, padding, seeds; prompt files."""

from __future__ import annotations

import json

import pytest

from dpo_dist.generation import SamplingParams, generate_texts, load_causal_lm, read_prompts
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


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_prompt_files_ask_string_prompts_of_chat_records_as_a_user_turn(tmp_path, suffix):
    """dpo-data generate reads prompts as training renders them (dpo_dist.data.tokenize): the
    string prompt of a record with chat responses is a user turn under the chat template."""
    chat_reply = [{"role": "assistant", "content": "46"}]
    rows = [
        {"prompt": "12+34=", "chosen": chat_reply, "rejected": "47"},
        {"prompt": "91-46=", "chosen": "45", "rejected": "44"},
        {"prompt": "sort: dcba"},
        {"prompt": [{"role": "user", "content": "47+38="}], "chosen": "85", "rejected": "75"},
    ]
    path = tmp_path / f"prompts{suffix}"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) if suffix == ".jsonl" else json.dumps(rows))
    items = read_prompts(path)
    assert [item.prompt for item in items] == [
        [{"role": "user", "content": "12+34="}],
        "91-46=",
        "sort: dcba",
        [{"role": "user", "content": "47+38="}],
    ]
    assert items[0].extra == {"chosen": chat_reply, "rejected": "47"}
