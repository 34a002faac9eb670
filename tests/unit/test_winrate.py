"""Win-rate prompts and their split over ranks (dpo_dist.winrate), without starting ranks."""

from __future__ import annotations

import json

import pytest

from dpo_dist.config import DataConfig, DPOConfig
from dpo_dist.generation import PromptItem, SamplingParams, generate_texts, load_causal_lm
from dpo_dist.winrate import eval_prompts, rank_share
from tests.helpers import make_tiny_model_dir


def test_string_prompts_of_chat_records_are_a_user_turn(tmp_path):
    """Training renders a record with chat responses as chat, its string prompt as a user turn
    (dpo_dist.data.tokenize); the win-rate must ask the model the same way."""
    path = tmp_path / "eval.jsonl"
    rows = [
        {"prompt": "12+34=", "chosen": [{"role": "assistant", "content": "46"}], "rejected": "47"},
        {"prompt": "91-46=", "chosen": "45", "rejected": "44"},
        {"prompt": [{"role": "user", "content": "47+38="}], "chosen": "85", "rejected": "75"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    items = eval_prompts(DPOConfig(data=DataConfig(eval_path=str(path))))
    assert [item.prompt for item in items] == [
        [{"role": "user", "content": "12+34="}],
        "91-46=",
        [{"role": "user", "content": "47+38="}],
    ]


@pytest.mark.parametrize("count, batch_size", [(7, 2), (8, 4), (3, 5)])
def test_ranks_share_whole_batches_of_similar_length(count, batch_size):
    items = [PromptItem(i, "x" * ((5 * i) % count + 1)) for i in range(count)]  # lengths shuffled
    one_rank = rank_share(items, 0, 1, batch_size)
    assert [len(i.prompt) for i in one_rank] == sorted(len(i.prompt) for i in items), "batched by length"
    batches = [[i.example_id for i in one_rank[s : s + batch_size]] for s in range(0, count, batch_size)]
    for world in (2, 3):
        shares = [rank_share(items, rank, world, batch_size) for rank in range(world)]
        ids = sorted(i.example_id for share in shares for i in share)
        assert ids == list(range(count)), "every prompt is answered exactly once"
        # Each rank's own batches (generate_texts cuts its share by batch_size) are those of one rank.
        for share in shares:
            ranks_batches = [[i.example_id for i in share[s : s + batch_size]] for s in range(0, len(share), batch_size)]
            assert all(batch in batches for batch in ranks_batches), (world, ranks_batches)


def test_sampled_answers_do_not_depend_on_the_number_of_ranks(tmp_path):
    """Each batch is seeded by its first prompt: with whole batches per rank, every rank count
    draws the same samples for every prompt."""
    model, tokenizer = load_causal_lm(make_tiny_model_dir(tmp_path / "model", layers=1), "cpu")
    items = [PromptItem(i, p) for i, p in enumerate(["12+34=", "reverse: abc", "sort: dcba", "91-46=", "47+38="])]
    params = SamplingParams(max_new_tokens=5, do_sample=True, temperature=1.0, top_p=0.95)

    def answers(world: int) -> dict[int, str]:
        out = {}
        for rank in range(world):
            share = rank_share(items, rank, world, 2)
            completions = generate_texts(model, tokenizer, [i.prompt for i in share], params, batch_size=2, seed=3,
                                         seed_offsets=[i.example_id for i in share])
            out.update({item.example_id: c.text for item, c in zip(share, completions)})
        return out

    one = answers(1)
    assert answers(2) == one and answers(3) == one
    assert len(set(one.values())) == len(items)
