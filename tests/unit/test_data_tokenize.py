"""The bundled tokenizer, the tokenization rules (plain and chat) and the truncation rules."""

import importlib.util
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from dpo_dist.data import (
    DataError,
    PreferenceRecord,
    TokenizedPair,
    bundled_tokenizer_path,
    collate_packed,
    load_tokenized,
    tokenize_records,
    truncate_pair,
)
from dpo_dist.data.batch import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[2]
BOS, EOS, PAD, UNK = 1, 2, 3, 0


def load_tokenizer():
    return AutoTokenizer.from_pretrained(bundled_tokenizer_path(), local_files_only=True)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def chars(tok, text):
    return tok.encode(text, add_special_tokens=False)


def record(prompt, chosen, rejected, example_id=0):
    return PreferenceRecord(example_id, example_id + 1, prompt, chosen, rejected)


# ---- bundled tokenizer ---------------------------------------------------------------------------


def test_bundled_tokenizer_ids_and_size(tok):
    assert Path(bundled_tokenizer_path()).is_absolute()
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (UNK, BOS, EOS, PAD)
    assert len(tok) == 101
    assert chars(tok, "\t\n ~") == [4, 5, 6, 100]


@pytest.mark.parametrize(
    "text", ["Hello, world!", "  two  spaces\n\ttab\n", "x = (3.14 * 2) // 7; [ok]? {'a': \"b\"}"]
)
def test_bundled_tokenizer_round_trips_text(tok, text):
    ids = chars(tok, text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok(text)["input_ids"] == [BOS, *ids]  # BOS added, EOS not


def test_bundled_tokenizer_maps_unknown_chars_to_unk(tok):
    assert chars(tok, "aé") == [chars(tok, "a")[0], UNK]


def test_bundled_chat_template(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<s><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!</s>"
    )
    assert tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True) == (
        "<s><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    )


def test_committed_assets_match_the_build_tool(tmp_path):
    spec = importlib.util.spec_from_file_location("build_tokenizer", REPO / "tools" / "build_tokenizer.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.save(tmp_path)
    built = sorted(p.name for p in tmp_path.iterdir())
    assert built == sorted(p.name for p in Path(bundled_tokenizer_path()).iterdir())
    for name in built:
        assert (tmp_path / name).read_bytes() == (Path(bundled_tokenizer_path()) / name).read_bytes(), name


# ---- tokenization rules --------------------------------------------------------------------------


def test_plain_record_ids(tok):
    (pair,), stats = tokenize_records([record("Q?", "Yes", "No")], tok, max_length=64)
    assert pair.prompt_ids.tolist() == [BOS, *chars(tok, "Q?")]
    assert pair.chosen_ids.tolist() == [*chars(tok, "Yes"), EOS]
    assert pair.rejected_ids.tolist() == [*chars(tok, "No"), EOS]
    assert (pair.prompt_len, pair.chosen_len, pair.rejected_len) == (3, 4, 3)
    assert (pair.chosen_seq_len, pair.rejected_seq_len, pair.num_tokens) == (7, 6, 13)
    assert (stats.truncated, stats.dropped) == (0, 0)


def test_no_double_bos_or_eos_when_the_text_has_them(tok):
    (pair,), _ = tokenize_records([record("<s>Q?", "Yes</s>", "No")], tok, max_length=64)
    assert pair.prompt_ids.tolist() == [BOS, *chars(tok, "Q?")]
    assert pair.chosen_ids.tolist() == [*chars(tok, "Yes"), EOS]


def test_chat_record_is_rendered_by_the_template(tok):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}]
    chat = record(prompt, [{"role": "assistant", "content": "Paris."}], "Rome.")
    (pair,), _ = tokenize_records([chat], tok, max_length=256)
    assert tok.decode(pair.prompt_ids) == "<s><|system|>\nBe brief.\n<|user|>\nCapital?\n<|assistant|>\n"
    assert pair.prompt_ids.tolist().count(BOS) == 1 and pair.prompt_ids[0] == BOS
    assert pair.chosen_ids.tolist() == [*chars(tok, "Paris."), EOS]
    assert pair.rejected_ids.tolist() == [*chars(tok, "Rome."), EOS]


def test_chat_labels_cover_only_the_assistant_part(tok):
    chat = record([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Yo"}], "No")
    pairs, _ = tokenize_records([chat], tok, max_length=256)
    labels = collate_packed(pairs).labels[0]
    scored = labels[labels != IGNORE_INDEX].tolist()
    assert tok.decode(scored) == "Yo</s>No</s>"


def test_string_prompt_with_message_response_becomes_a_user_turn(tok):
    mixed = record("Hi", [{"role": "assistant", "content": "Yo"}], "No")
    (pair,), _ = tokenize_records([mixed], tok, max_length=256)
    assert tok.decode(pair.prompt_ids) == "<s><|user|>\nHi\n<|assistant|>\n"


def test_template_that_does_not_extend_the_prompt_is_an_error():
    tok = load_tokenizer()
    tok.chat_template = "{% for m in messages | reverse %}{{ m['content'] }}{% endfor %}"
    chat = record([{"role": "user", "content": "Q"}], "A", "B")
    with pytest.raises(
        DataError, match=r"^data\.jsonl:1: the chat template's rendering of the prompt is not a prefix"
    ):
        tokenize_records([chat], tok, max_length=64, source="data.jsonl")


def test_chat_without_template_or_with_unknown_role_is_an_error():
    tok = load_tokenizer()
    with pytest.raises(DataError, match="^records:1: chat template failed: unknown chat role: tool$"):
        tokenize_records([record([{"role": "tool", "content": "x"}], "A", "B")], tok, max_length=64)
    tok.chat_template = None
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        tokenize_records([record([{"role": "user", "content": "x"}], "A", "B")], tok, max_length=64)


# ---- truncation ----------------------------------------------------------------------------------

PAIR = TokenizedPair(7, [BOS, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34, 35])


def ids(pair):
    return pair.prompt_ids.tolist(), pair.chosen_ids.tolist(), pair.rejected_ids.tolist()


def test_pair_that_fits_is_returned_unchanged():
    assert truncate_pair(PAIR, 11, "keep_end_of_prompt", BOS) is PAIR
    assert truncate_pair(PAIR, 11, "drop", BOS) is PAIR


@pytest.mark.parametrize(
    "mode, max_length, expected",
    [
        ("keep_end_of_prompt", 9, ([BOS, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34, 35])),
        ("keep_end_of_prompt", 6, ([BOS, 13], [20, 21, 22], [30, 31, 32, 33])),
        ("keep_end_of_prompt", 3, ([BOS, 13], [20], [30])),
        ("keep_start", 9, ([BOS, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33])),
        ("keep_start", 6, ([BOS, 10, 11, 12, 13], [20], [30])),
        ("keep_start", 5, None),  # the prompt alone fills max_length: dropped, as TRL drops it
    ],
)
def test_truncation_rules(mode, max_length, expected):
    truncated = truncate_pair(PAIR, max_length, mode, BOS)
    if expected is None:
        assert truncated is None
        return
    assert ids(truncated) == expected
    assert truncated.example_id == 7


def test_keep_end_of_prompt_without_bos_keeps_one_prompt_token():
    no_bos = TokenizedPair(0, [10, 11, 12, 13, 14], [20, 21, 22], [30, 31, 32, 33, 34, 35])
    assert ids(truncate_pair(no_bos, 6, "keep_end_of_prompt", BOS)) == (
        [14],
        [20, 21, 22],
        [30, 31, 32, 33, 34],
    )


def test_drop_rule_drops():
    assert truncate_pair(PAIR, 10, "drop", BOS) is None


@pytest.mark.parametrize("mode", ["keep_end_of_prompt", "keep_start"])
def test_truncation_always_fits_and_keeps_the_stated_parts(mode):
    rng = random.Random(0)
    for _ in range(300):
        prompt = [BOS] + [rng.randrange(4, 100) for _ in range(rng.randrange(0, 20))]
        chosen = [rng.randrange(4, 100) for _ in range(rng.randrange(1, 20))]
        rejected = [rng.randrange(4, 100) for _ in range(rng.randrange(1, 20))]
        max_length = rng.randrange(3, 45)
        pair = truncate_pair(TokenizedPair(0, prompt, chosen, rejected), max_length, mode, BOS)
        if mode == "keep_start" and len(prompt) >= max_length:
            assert pair is None  # the prompt alone fills max_length: dropped, as TRL drops it
            continue
        p, c, r = ids(pair)
        assert max(len(p) + len(c), len(p) + len(r)) <= max_length
        assert c == chosen[: len(c)] and r == rejected[: len(r)] and min(len(c), len(r)) >= 1
        if mode == "keep_end_of_prompt":
            assert p[0] == BOS and p[1:] == prompt[len(prompt) - len(p) + 1 :]
            assert len(p) >= min(len(prompt), 2)
        else:
            assert p == prompt  # the whole prompt: only the responses are cut


def test_tokenize_records_counts_truncated_and_dropped(tok):
    records = [record("short", "a", "b", 0), record("x" * 50, "yes", "no", 1), record("y", "z" * 40, "n", 2)]
    pairs, stats = tokenize_records(records, tok, max_length=20, truncation="keep_end_of_prompt")
    assert [p.example_id for p in pairs] == [0, 1, 2]
    assert (stats.truncated, stats.dropped) == (2, 0)
    assert ids(pairs[1])[0] == [BOS] + chars(tok, "x" * 15)
    pairs, stats = tokenize_records(records, tok, max_length=20, truncation="drop")
    assert [p.example_id for p in pairs] == [0]
    assert (stats.truncated, stats.dropped) == (0, 2)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end_of_prompt"])
def test_pairs_identical_after_truncation_are_dropped_and_counted(tok, mode):
    """Responses cut to a shared prefix carry no preference signal (and would count as wrong in
    reward accuracy): dropped, counted apart from the over-long ones."""
    records = [record("abc", "xyzwA", "xyzwB", 0), record("abc", "A", "B", 1)]
    pairs, stats = tokenize_records(records, tok, max_length=6, truncation=mode)
    assert [p.example_id for p in pairs] == [1]
    assert (stats.truncated, stats.dropped, stats.identical) == (0, 0, 1)


def test_bad_truncation_settings_are_rejected(tok):
    with pytest.raises(ValueError, match="truncation must be one of"):
        tokenize_records([], tok, max_length=16, truncation="keep_end")
    with pytest.raises(ValueError, match="max_length must be at least 3"):
        tokenize_records([], tok, max_length=2)


def test_pair_ids_are_int32_arrays(tok, tmp_path):
    """What tokenize_records returns, and the pairs of a dataset read back from the cache (and
    the cached Arrow columns themselves), hold int32 ids: half of int64 on every rank's host."""
    records = [record("12+34=", "46", "47", 0), record([{"role": "user", "content": "Hi"}], "Yo", "No", 1)]
    pairs, _ = tokenize_records(records, tok, max_length=64)
    assert len(pairs) == 2
    assert all(a.dtype == np.int32 for p in pairs for a in (p.prompt_ids, p.chosen_ids, p.rejected_ids))

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "12+34=", "chosen": "46", "rejected": "47"}\n')
    load_tokenized(path, tok, max_length=64, cache_dir=tmp_path / "cache")
    cached = load_tokenized(path, tok, max_length=64, cache_dir=tmp_path / "cache")
    assert cached.cache_hit
    pair = cached[0]
    assert all(a.dtype == np.int32 for a in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids))
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert cached.table.schema.field(name).type.value_type == pa.int32(), name


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_whitespace_after_a_chat_turns_eos_is_not_scored(pad_is_eos):
    """ChatML-style templates end every turn with EOS + newline; the response ends at its EOS
    (no newline label, no second EOS after it), also where EOS doubles as the pad token (Zephyr)."""
    tok = load_tokenizer()
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    chat = record([{"role": "user", "content": "Hi"}], "Yo", "No")
    (pair,), _ = tokenize_records([chat], tok, max_length=256)
    assert pair.chosen_ids.tolist() == [*chars(tok, "Yo"), EOS]
    assert pair.rejected_ids.tolist() == [*chars(tok, "No"), EOS]


def test_a_chat_turn_closed_by_another_special_token_gets_no_eos():
    """Templates that end an assistant turn with their own special token, not the tokenizer's EOS
    (Llama 3's <|eot_id|> beside <|end_of_text|>, ChatML's <|im_end|> beside <|endoftext|>): the
    response ends at that token, where the chat model stops (TRL adds no EOS to chat data), not
    with a second end token; the newline after it is layout. Plain records still end with EOS."""
    tok = load_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    eot = tok.convert_tokens_to_ids("<|eot|>")
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eot|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    chat = record([{"role": "user", "content": "Hi"}], "Yo", "No")
    plain = record("Hi", "Yo", "No")
    (chat_pair, plain_pair), _ = tokenize_records([chat, plain], tok, max_length=256)
    assert chat_pair.chosen_ids.tolist() == [*chars(tok, "Yo"), eot]
    assert chat_pair.rejected_ids.tolist() == [*chars(tok, "No"), eot]
    assert plain_pair.chosen_ids.tolist() == [*chars(tok, "Yo"), EOS]


def test_the_reference_fingerprint_covers_the_tokenization_rules():
    """A change of tokenization rules bumps CACHE_FORMAT; reference caches keyed on the old ids
    must miss too (their data component hashes only the file's bytes)."""
    from dpo_dist.data.cache import CACHE_FORMAT
    from dpo_dist.reference import reference_settings

    assert reference_settings(max_length=8, truncation="drop", dtype="fp32")["tokenization_format"] == CACHE_FORMAT


def sentencepiece_style_tokenizer():
    """A tiny tokenizer in the layout of Mistral's tokenizer.json (Metaspace, prepend_scheme
    "first"): spaces become "▁" and every text encoded on its own gets a dummy "▁" in front
    (built here: no hub access)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    words = "Human what is two plus Assistant It four I think Paris The answer".split()
    corpus = [" ".join(words[i:] + words[:i]) + "\n" for i in range(len(words))] * 20
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize(
    "prompt, response", [("Human what is two plus two Assistant", " It is four"), ("Human what is two plus two\n", "It is four")]
)
def test_responses_encode_as_after_their_prompt_without_a_dummy_prefix(prompt, response):
    """A SentencePiece-style tokenizer encodes a text on its own with a dummy "▁" in front: a
    response that starts a line ("It is four" after a newline) alone is "▁It", where the prompt
    followed by the response, as generation sees it, has "It". The pair encodes as the joint text."""
    sp = sentencepiece_style_tokenizer()
    pair = tokenize_records([PreferenceRecord(0, 1, prompt, response, " I think Paris")], sp, 512)[0][0]
    joint = sp(prompt + response)["input_ids"] + [sp.eos_token_id]
    assert [*pair.prompt_ids, *pair.chosen_ids] == joint
    alone = sp(response, add_special_tokens=False)["input_ids"]
    if not response.startswith(" "):
        assert sp.convert_ids_to_tokens(alone)[0] in ("▁", "▁It") and alone != pair.chosen_ids[:-1].tolist()


def test_tokenizers_without_a_dummy_prefix_encode_responses_alone(tok):
    """The bundled (and byte-level BPE) tokenizers encode a text the same alone and mid-text: the
    responses are their plain encodings plus EOS."""
    from dpo_dist.data.tokenize import _adds_dummy_prefix

    assert not _adds_dummy_prefix(tok) and _adds_dummy_prefix(sentencepiece_style_tokenizer())
    pair = tokenize_records([PreferenceRecord(0, 1, "1+1=", " 2", "3")], tok, 64)[0][0]
    assert pair.chosen_ids.tolist() == [*chars(tok, " 2"), EOS]


def test_an_eos_the_tokenizer_appends_stays_out_of_the_prompt(tmp_path):
    """A tokenizer set to append EOS to every encoding (add_eos_token): the prompt ends without it
    (training and generation alike), the response with its one EOS."""
    import json
    import shutil

    from dpo_dist.generation import encode_prompt

    shutil.copytree(bundled_tokenizer_path(), tmp_path / "tok")
    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    spec["post_processor"]["single"].append({"SpecialToken": {"id": "</s>", "type_id": 0}})
    spec["post_processor"]["special_tokens"]["</s>"] = {"id": "</s>", "ids": [EOS], "tokens": ["</s>"]}
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    appending = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert appending("98+29=")["input_ids"][-1] == EOS  # the setting this test is about
    pair = tokenize_records([PreferenceRecord(0, 1, "98+29=", "127", "126")], appending, 64)[0][0]
    assert pair.prompt_ids.tolist() == [BOS, *chars(appending, "98+29=")]
    assert pair.chosen_ids.tolist() == [*chars(appending, "127"), EOS]
    assert encode_prompt("98+29=", appending) == pair.prompt_ids.tolist()
    # A prompt that itself ends with the EOS text keeps it.
    assert tokenize_records([PreferenceRecord(0, 1, "98+29=</s>", "127", "126")], appending, 64)[0][0].prompt_ids[-1] == EOS


def test_responses_that_encode_identically_are_an_invalid_record(tmp_path, tok):
    """"2</s>" and "2" differ as text but not as ids (EOS is appended only when missing): under
    on_invalid=error the file stops with PATH:LINE, under skip the record is dropped as invalid,
    not counted as made identical by truncation."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt":"1+1=","chosen":"2</s>","rejected":"2"}\n{"prompt":"1+2=","chosen":"3","rejected":"4"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: chosen and rejected encode to the same token ids"):
        load_tokenized(path, tok, 64, on_invalid="error")
    kept = load_tokenized(path, tok, 64, on_invalid="skip")
    assert len(kept) == 1 and kept.num_invalid == 1 and kept.truncation.identical == 0


def test_stats_counts_responses_that_encode_identically_as_bad(tmp_path, capsys):
    from launch.data import main

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt":"1+1=","chosen":"2</s>","rejected":"2"}\n{"prompt":"1+2=","chosen":"3","rejected":"4"}\n')
    assert main(["stats", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{path}: 2 records, 1 bad, 1 pairs"


def test_a_prompt_ending_with_its_own_eos_keeps_it_whatever_follows(tmp_path):
    """An EOS token that swallows the whitespace after it (rstrip): "...</s>\\n" ends in EOS as ids
    but not as text; it is the prompt's own, not one the tokenizer appended."""
    from tokenizers import AddedToken

    appending_not = load_tokenizer()
    appending_not.add_special_tokens({"eos_token": AddedToken("</s>", rstrip=True, special=True)})
    pair = tokenize_records([PreferenceRecord(0, 1, "98+29=</s>\n", "127", "126")], appending_not, 64)[0][0]
    assert pair.prompt_ids[-1] == EOS


def test_whitespace_a_template_writes_without_a_closing_token_stays_in_the_response():
    """Only whitespace after an end-of-turn special token is layout (not scored); a template that
    closes a turn with a plain newline keeps it in the response, which then gets its EOS."""
    tok = load_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    chat = record([{"role": "user", "content": "Hi"}], "Yo", "No")
    (pair,), _ = tokenize_records([chat], tok, max_length=256)
    assert pair.chosen_ids.tolist() == [*chars(tok, "Yo\n"), EOS]
    assert pair.rejected_ids.tolist() == [*chars(tok, "No\n"), EOS]


def test_tools_and_message_keys_reach_the_chat_template(tmp_path):
    """Agentic and reasoning data (TRL passes them on): a record's tools are rendered into its
    prompt, and a response's tool_calls (content null) and reasoning_content into its ids."""
    import json

    from dpo_dist.data import load_preferences

    tok = load_tokenizer()
    tok.chat_template = (
        "{% if tools %}[tools {{ tools | map(attribute='name') | join(',') }}]{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{% if m.reasoning_content %}(think {{ m.reasoning_content }}){% endif %}"
        "{{ m['content'] or '' }}{% for c in m.tool_calls or [] %}(call {{ c['name'] }}){% endfor %}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    call = {"role": "assistant", "content": None, "tool_calls": [{"name": "add", "arguments": {"a": 2}}]}
    raw = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [call],
        "rejected": [{"role": "assistant", "content": "5", "reasoning_content": "guess"}],
        "tools": json.dumps([{"name": "add"}, {"name": "mul"}]),  # datasets often keep it as a JSON string
    }
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(raw) + "\n")
    (rec,) = load_preferences(path)
    assert rec.tools == [{"name": "add"}, {"name": "mul"}] and rec.chosen == [call]
    (pair,), _ = tokenize_records([rec], tok, max_length=256)
    assert tok.decode(pair.prompt_ids) == "<s>[tools add,mul]<|user|>2+2?</s><|assistant|>"
    assert tok.decode(pair.chosen_ids) == "(call add)</s>"
    assert tok.decode(pair.rejected_ids) == "(think guess)5</s>"


def test_chat_template_kwargs_reach_every_rendering_of_the_record(tmp_path):
    """TRL's per-record chat_template_kwargs (Qwen3's enable_thinking): prompt and responses are
    rendered with them, so the prompt stays a prefix of prompt + response; other records are not."""
    import json

    from dpo_dist.data import load_preferences

    tok = load_tokenizer()
    tok.chat_template = (
        "{% set quiet = enable_thinking is defined and not enable_thinking %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' and quiet %}(no think){% endif %}"
        "{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    raw = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}
    path = tmp_path / "kw.jsonl"
    path.write_text(json.dumps({**raw, "chat_template_kwargs": {"enable_thinking": False}}) + "\n" + json.dumps(raw) + "\n")
    quiet, plain = tokenize_records(load_preferences(path), tok, max_length=256)[0]
    assert tok.decode(quiet.prompt_ids) == tok.decode(plain.prompt_ids) == "<s><|user|>2+2?</s><|assistant|>"
    assert tok.decode(quiet.chosen_ids) == "(no think)4</s>" and tok.decode(plain.chosen_ids) == "4</s>"


def test_chat_template_kwargs_that_change_the_generation_prompt_stay_in_the_prompt(tmp_path):
    """Qwen3's enable_thinking=false writes an empty think block after the generation prompt: it is
    part of the prompt (not scored), as the model is asked at inference; so the prompt must be
    rendered with the record's variables too, not only prompt + response."""
    import json

    from dpo_dist.data import load_preferences

    tok = load_tokenizer()
    tok.chat_template = (
        "{% set quiet = enable_thinking is defined and not enable_thinking %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' and quiet %}<think></think>{% endif %}"
        "{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% if quiet %}<think></think>{% endif %}{% endif %}"
    )
    raw = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5", "chat_template_kwargs": {"enable_thinking": False}}
    path = tmp_path / "kw.jsonl"
    path.write_text(json.dumps(raw) + "\n")
    (pair,) = tokenize_records(load_preferences(path), tok, max_length=256)[0]
    assert tok.decode(pair.prompt_ids) == "<s><|user|>2+2?</s><|assistant|><think></think>"
    assert tok.decode(pair.chosen_ids) == "4</s>" and tok.decode(pair.rejected_ids) == "5</s>"


def test_a_run_chat_template_replaces_the_tokenizers_own(tmp_path):
    """data.chat_template (inline Jinja or a file): chat data on a tokenizer without a template, or
    another format; it is part of the tokenizer's fingerprint, so caches do not mix formats."""
    from dpo_dist.data import DataError, tokenizer_fingerprint
    from dpo_dist.data.tokenize import use_chat_template

    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    (tmp_path / "t.jinja").write_text(template)
    chat = record([{"role": "user", "content": "Hi"}], "Yo", "No")
    tok = load_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match="chat messages need a tokenizer with a chat template"):
        tokenize_records([chat], tok, max_length=256)
    before = tokenizer_fingerprint(tok)
    for setting in (template, str(tmp_path / "t.jinja")):
        tok = use_chat_template(load_tokenizer(), setting)
        (pair,), _ = tokenize_records([chat], tok, max_length=256)
        assert tok.decode(pair.prompt_ids) == "<s>[user]Hi</s>[assistant]" and tok.decode(pair.chosen_ids) == "Yo</s>"
    assert tokenizer_fingerprint(tok) not in (before, tokenizer_fingerprint(load_tokenizer()))
    assert use_chat_template(load_tokenizer(), None).chat_template == load_tokenizer().chat_template
    with pytest.raises(DataError, match=r"data.chat_template=nope.jinja: neither a Jinja template nor a readable file"):
        use_chat_template(load_tokenizer(), "nope.jinja")
