"""Batched generation (dpo_dist.generation) on a tiny local model: EOS, padding, seeds; prompt files."""

from __future__ import annotations

import json
import re

import pytest

from dpo_dist.generation import (
    GenerationError,
    SamplingParams,
    generate_texts,
    load_causal_lm,
    load_tokenizer,
    model_identity,
    read_prompts,
)
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


def test_a_prompts_chat_template_kwargs_render_it_and_stay_with_its_pairs(tiny, tmp_path, monkeypatch):
    """TRL's per-record chat_template_kwargs (Qwen3's enable_thinking) decide how a prompt is asked,
    in generation as in training; dpo-data generate keeps them in the pairs it writes."""
    import copy

    from dpo_dist.generation import generate_preferences

    model, tokenizer = tiny
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}"
        "{% if enable_thinking is defined and not enable_thinking %}/no_think {% endif %}={% endif %}"
    )
    quiet = {"enable_thinking": False}
    rows = [{"prompt": [{"role": "user", "content": "12+34"}], "chat_template_kwargs": quiet},
            {"prompt": [{"role": "user", "content": "12+34"}]}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    items = read_prompts(path)
    assert [item.template_kwargs for item in items] == [quiet, {}]
    greedy = SamplingParams(max_new_tokens=2)
    asked = generate_texts(model, tokenizer, [i.prompt for i in items], greedy, batch_size=1, template_kwargs=[i.template_kwargs for i in items])
    assert [c.prompt_tokens for c in asked] == [1 + len("12+34/no_think ="), 1 + len("12+34=")]
    from dpo_dist import generation, serve

    monkeypatch.setattr(generation, "load_causal_lm", lambda *args: (model, tokenizer))
    served = serve.ServedModel("/models/m", "m")  # dpo-serve: a request's chat_template_kwargs, as vLLM's
    assert len(served.encode(items[0].prompt, quiet)) == asked[0].prompt_tokens

    class Longest:  # a scoring judge: the longer answer wins
        def score(self, prompts, texts):
            return [float(len(t)) for t in texts]

    records, _ = generate_preferences(model, tokenizer, items[:1], Longest(), num_samples=4,
                                      params=SamplingParams(max_new_tokens=3, do_sample=True), batch_size=4, seed=0)
    assert records and all(r["chat_template_kwargs"] == quiet for r in records)
    path.write_text(json.dumps({**rows[0], "chat_template_kwargs": {"tokenize": True}}) + "\n")
    with pytest.raises(GenerationError, match=r"prompts.jsonl:1: 'chat_template_kwargs' may not set tokenize"):
        read_prompts(path)


QUIET_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}"
    "{% if enable_thinking is defined and not enable_thinking %}/no_think {% endif %}={% endif %}"
)


def test_dpo_data_generate_asks_each_prompt_with_its_own_chat_template_kwargs(tiny, monkeypatch):
    """Several prompts, several samples each: every sample of a prompt is rendered with that
    prompt's variables (the pairs are trained so), not another prompt's."""
    import copy

    from dpo_dist import generation
    from dpo_dist.generation import PromptItem, generate_preferences

    model, tokenizer = tiny
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = QUIET_TEMPLATE
    quiet = {"enable_thinking": False}
    items = [PromptItem(0, [{"role": "user", "content": "12+34"}], template_kwargs=quiet),
             PromptItem(1, [{"role": "user", "content": "91-46"}])]
    asked = []
    real = generation.generate_texts
    monkeypatch.setattr(generation, "generate_texts", lambda *a, **k: asked.extend(real(*a, **k)) or asked)

    class Longest:
        def score(self, prompts, texts):
            return [float(len(t)) for t in texts]

    generate_preferences(model, tokenizer, items, Longest(), num_samples=3, params=SamplingParams(max_new_tokens=2, do_sample=True),
                         batch_size=2, seed=0)
    assert [c.prompt_tokens for c in asked] == [1 + len("12+34/no_think =")] * 3 + [1 + len("91-46=")] * 3


def test_dpo_serve_renders_a_chat_request_with_its_chat_template_kwargs(tiny, monkeypatch):
    """vLLM's chat_template_kwargs of a /v1/chat/completions request reach the chat template;
    apply_chat_template's own arguments are refused (400), as in a record."""
    import copy

    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from dpo_dist import generation, serve

    model, tokenizer = tiny
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = QUIET_TEMPLATE
    monkeypatch.setattr(generation, "load_causal_lm", lambda *args: (model, tokenizer))
    client = TestClient(serve.create_app(serve.ServedModel("/models/m", "m")))

    def ask(**extra):
        body = {"model": "m", "messages": [{"role": "user", "content": "12+34"}], "max_tokens": 1, **extra}
        return client.post("/v1/chat/completions", json=body)

    quiet = ask(chat_template_kwargs={"enable_thinking": False})
    assert quiet.status_code == 200, quiet.text
    assert quiet.json()["usage"]["prompt_tokens"] == 1 + len("12+34/no_think =")
    assert ask().json()["usage"]["prompt_tokens"] == 1 + len("12+34=")
    refused = ask(chat_template_kwargs={"add_generation_prompt": False, "chat_template": "{{ 1 }}"})
    assert refused.status_code == 400 and "chat_template_kwargs: may not set add_generation_prompt, chat_template" in refused.text


def make_tiny_adapter_dir(base, path, *, with_tokenizer: bool = True):
    """A LoRA adapter saved with PEFT on ``base`` (as a run's final/ with merge_on_export=false),
    with random B so that it changes the answers (PEFT's default B=0 would not)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    peft_model.save_pretrained(path)
    if with_tokenizer:
        AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return peft_model.eval()


def test_an_adapter_directory_loads_its_base_with_the_adapter_merged(tmp_path):
    """dpo-eval winrate, dpo-serve and dpo-data generate take an adapter-only export: the base
    named in adapter_config.json with the adapter merged (the same logits as the PEFT model)."""
    import torch

    base = make_tiny_model_dir(tmp_path / "base", layers=1)
    peft_model = make_tiny_adapter_dir(base, tmp_path / "adapter")
    model, tokenizer = load_causal_lm(tmp_path / "adapter", "cpu")
    assert not hasattr(model, "peft_config"), "merged: a plain model"
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        plain, _ = load_causal_lm(base, "cpu")
        assert not torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-4), "the adapter matters"
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    # An adapter saved without a tokenizer uses its base's; its identity is not the base's.
    make_tiny_adapter_dir(base, tmp_path / "bare", with_tokenizer=False)
    assert load_tokenizer(tmp_path / "bare")("12+34=")["input_ids"] == tokenizer("12+34=")["input_ids"]
    assert len({model_identity(base), model_identity(tmp_path / "adapter")}) == 2


def test_a_model_directory_without_tokenizer_or_weights_is_a_generation_error(tmp_path):
    """One line naming the directory (dpo-serve, dpo-data generate, dpo-eval winrate), not
    transformers' multi-line error and traceback."""
    import shutil

    full = make_tiny_model_dir(tmp_path / "full", layers=1)
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(full / "config.json", config_only)
    with pytest.raises(GenerationError, match=f"^{re.escape(str(config_only))}: cannot load its tokenizer: [^\\n]+$"):
        load_causal_lm(config_only, "cpu")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(full, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(GenerationError, match=f"^{re.escape(str(no_weights))}: cannot load the model: [^\\n]*no file named"):
        load_causal_lm(no_weights, "cpu")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    # An adapter whose base is not here: its adapter_config.json is the file to fix.
    gone = re.escape(repr(str(tmp_path / "gone")))
    with pytest.raises(GenerationError, match=f"^{re.escape(str(adapter / 'adapter_config.json'))}: base model base_model_name_or_path={gone} not found"):
        load_causal_lm(adapter, "cpu")


def split_tokenizer(full, root):
    """``(model dir without tokenizer files, tokenizer dir)`` made from the model directory ``full``:
    the layout of a run whose ``model.tokenizer_path`` is not its ``model.path``."""
    import shutil

    bare, tokenizer_dir = root / "weights_only", root / "tokenizer_only"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(full / name, bare)
    tokenizer_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(full / name, tokenizer_dir)
    return bare, tokenizer_dir


def test_a_model_directory_without_a_tokenizer_uses_the_one_named_separately(tmp_path):
    """model.tokenizer_path: the model loads, answers and is identified with that tokenizer,
    exactly as the same weights with their tokenizer beside them."""
    full = make_tiny_model_dir(tmp_path / "full", layers=1)
    bare, tokenizer_dir = split_tokenizer(full, tmp_path)
    with pytest.raises(GenerationError, match="cannot load its tokenizer"):
        load_tokenizer(bare)
    model, tokenizer = load_causal_lm(bare, "cpu", tokenizer_path=tokenizer_dir)
    expected_model, expected_tokenizer = load_causal_lm(full, "cpu")
    greedy = SamplingParams(max_new_tokens=4)
    assert [c.text for c in generate_texts(model, tokenizer, PROMPTS, greedy, batch_size=2)] == [
        c.text for c in generate_texts(expected_model, expected_tokenizer, PROMPTS, greedy, batch_size=2)
    ]
    assert model_identity(bare, tokenizer_dir) == model_identity(full)


def test_dpo_serve_says_when_a_model_declares_no_context(monkeypatch, caplog):
    """dpo-serve bounds prompt + max_tokens by the model's max_position_embeddings; a model that
    declares none is served as unbounded (only the server's limits apply), and that is logged."""
    import logging
    from types import SimpleNamespace

    from dpo_dist import generation, serve

    caplog.set_level(logging.WARNING, logger="dpo_dist.serve")
    declared = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512))
    monkeypatch.setattr(generation, "load_causal_lm", lambda *args: (declared, None))
    assert serve.ServedModel("/models/declared", "m").context == 512
    assert not [r for r in caplog.records if r.name == "dpo_dist.serve"]
    monkeypatch.setattr(generation, "load_causal_lm", lambda *args: (SimpleNamespace(config=SimpleNamespace()), None))
    assert serve.ServedModel("/models/undeclared", "m").context == 1 << 30
    warnings = [r.getMessage() for r in caplog.records if r.name == "dpo_dist.serve"]
    assert len(warnings) == 1 and warnings[0].startswith("/models/undeclared: the model's config declares no context")
    assert "as unbounded" in warnings[0]
