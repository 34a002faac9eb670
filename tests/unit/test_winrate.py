"""Win-rate prompts, their split over ranks and resuming a run (dpo_dist.winrate), in one process."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from dpo_dist import winrate
from dpo_dist.config import DataConfig, DPOConfig, EvalConfig, JudgeConfig, ModelConfig
from dpo_dist.generation import PromptItem, SamplingParams, generate_texts, load_causal_lm
from dpo_dist.judges import JudgeError
from dpo_dist.winrate import eval_prompts, rank_config, rank_share, winrate_run
from tests.helpers import make_tiny_model_dir
from tests.unit.test_judges import _StubJudgeServer


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


def test_prompts_with_tools_are_asked_without_them_and_it_is_said(tmp_path, caplog):
    path = tmp_path / "eval.jsonl"
    user = [{"role": "user", "content": "2+2="}]
    rows = [
        {"prompt": user, "chosen": "4", "rejected": "5", "tools": [{"name": "add"}]},
        {"prompt": user, "chosen": "4", "rejected": "3"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    caplog.set_level(logging.WARNING, logger="dpo_dist.winrate")
    assert [item.prompt for item in eval_prompts(DPOConfig(data=DataConfig(eval_path=str(path))))] == [user, user]
    assert [r.getMessage() for r in caplog.records] == ["1 of 2 prompts have tools: the win-rate asks them without their tool definitions"]


def test_prompts_keep_their_chat_template_kwargs_and_the_answers_depend_on_them(tmp_path, monkeypatch):
    path = tmp_path / "eval.jsonl"
    user = [{"role": "user", "content": "2+2="}]
    row = {"prompt": user, "chosen": "4", "rejected": "5"}
    path.write_text(json.dumps({**row, "chat_template_kwargs": {"enable_thinking": False}}) + "\n" + json.dumps(row) + "\n")
    cfg = DPOConfig(data=DataConfig(eval_path=str(path)))
    items = eval_prompts(cfg)
    assert [item.template_kwargs for item in items] == [{"enable_thinking": False}, {}]
    assert [i.example_id for i in eval_prompts(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_prompts=1)))] == [0]
    import torch

    monkeypatch.setattr(winrate, "model_identity", lambda *paths: "a model")
    plain = [dataclasses.replace(item, template_kwargs={}) for item in items]
    fingerprints = [winrate.generation_fingerprint(cfg, str(tmp_path), i, torch.device("cpu"))["prompts"] for i in (items, plain)]
    assert fingerprints[0] != fingerprints[1], "saved answers of prompts asked otherwise must not be reused"

    from dpo_dist.distributed import DistEnv

    asked = {}
    monkeypatch.setattr(winrate, "load_causal_lm", lambda *a, **k: (object(), object()))
    monkeypatch.setattr(winrate, "generate_texts", lambda model, tok, prompts, params, **options: asked.update(options) or [])
    winrate.generate_with("policy", items, cfg, torch.device("cpu"), DistEnv(0, 0, 1, "127.0.0.1", 1, None), len(items))
    assert asked["template_kwargs"] == [{"enable_thinking": False}, {}]


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


def test_a_rerun_reuses_the_answers_and_verdicts_of_a_run_whose_judge_failed(tmp_path, monkeypatch, caplog):
    """The judge's endpoint goes down half-way: the answers were saved before judging and the
    verdicts as they came; the same command then generates nothing and asks only what is left.
    Another generation setting generates again and says why."""
    for name in ("RANK", "WORLD_SIZE", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level(logging.INFO, logger="dpo_dist.winrate")
    monkeypatch.setattr(winrate, "JUDGE_CHUNK", 2)  # verdicts are saved 2 prompts at a time
    prompts = ["12+34=", "reverse: abc", "sort: dcba", "91-46=", "47+38=", "reverse: hello", "sort: zyx"]
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"prompt": p, "chosen": "x", "rejected": "y"}) + "\n" for p in prompts))
    run = tmp_path / "run"
    with _StubJudgeServer() as stub:
        judge = JudgeConfig(name="openai", base_url=stub.base_url, model="stub-judge", api_key_env=None,
                            max_retries=0, concurrency=1)
        cfg = rank_config(DPOConfig(
            output_dir=str(run),
            model=ModelConfig(path=str(make_tiny_model_dir(tmp_path / "reference", seed=0, layers=1))),
            data=DataConfig(eval_path=str(evals)),
            eval=EvalConfig(policy_path=str(make_tiny_model_dir(tmp_path / "policy", seed=1, layers=1)),
                            max_new_tokens=4, batch_size=2, judge=judge),
        ))
        stub.fail_after = 1 + 2 * 2  # the probe and the first 2 prompts (both orders), then an outage
        with pytest.raises(JudgeError, match="outage"):
            winrate_run(cfg)
        assert not (run / "winrate.json").exists()
        saved = json.loads((run / "winrate" / "generations.json").read_text())
        assert [row["example_id"] for row in saved["rows"]] == list(range(7))
        assert len((run / "winrate" / "verdicts.jsonl").read_text().splitlines()) == 2

        def no_generation(*args, **kwargs):
            raise AssertionError("generated again")

        asked, stub.fail_after = len(stub.asked), None
        with monkeypatch.context() as patched:
            patched.setattr(winrate, "generate_with", no_generation)
            result = winrate_run(cfg)
        assert "skipping generation" in caplog.text
        assert result["n"] == 7 and result["reused"] == {"generations": True, "verdicts": 2}
        samples = [json.loads(line) for line in (run / "winrate_samples.jsonl").read_text().splitlines()]
        assert [(s["policy"], s["reference"]) for s in samples] == [
            (row["policy"]["text"], row["reference"]["text"]) for row in saved["rows"]
        ]
        left = sum("ab" in s["judge"] for s in samples[2:])  # the pairs that differ cost two requests
        assert len(stub.asked) - asked == 1 + 2 * left, "the probe, then only the prompts not judged yet"
        # judge_usage counts what this run paid: the probe too.
        assert result["judge_usage"]["requests"] == 1 + 2 * left
        assert result["judge_usage"]["prompt_tokens"] == 100 * (1 + 2 * left)
        assert (result["policy_source"], result["policy_step"]) == (cfg.eval.policy_path, None)

        caplog.clear()
        longer = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_new_tokens=5))
        assert winrate_run(longer)["reused"]["generations"] is False
    assert "generated with a different max_new_tokens: generating again" in caplog.text


def test_winrate_of_a_lora_adapter_directory(tmp_path, monkeypatch):
    """An adapter-only final/ (model.lora.merge_on_export=false) is evaluated as its base with
    the adapter merged; winrate.json names it as given."""
    from tests.unit.test_generation import make_tiny_adapter_dir

    for name in ("RANK", "WORLD_SIZE", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"prompt": p, "chosen": "x", "rejected": "y"}) + "\n" for p in ["12+34=", "91-46="]))
    base = make_tiny_model_dir(tmp_path / "reference", seed=0, layers=1)
    run = tmp_path / "run"
    make_tiny_adapter_dir(base, run / "final")
    cfg = rank_config(DPOConfig(
        output_dir=str(run), model=ModelConfig(path=str(base)), data=DataConfig(eval_path=str(evals)),
        eval=EvalConfig(max_new_tokens=4, batch_size=2, judge=JudgeConfig(name="rule")),
    ))
    result = winrate_run(cfg)
    assert result["n"] == 2 and result["policy"] == result["policy_source"] == str(run / "final")
    assert result["policy_step"] is None
    samples = [json.loads(line) for line in (run / "winrate_samples.jsonl").read_text().splitlines()]
    assert any(s["policy"] != s["reference"] for s in samples), "the policy is the adapter, not its base"


def test_policy_source_names_the_checkpoint_and_its_step(tmp_path):
    """A checkpoint is evaluated through a temporary export: winrate.json also names the path the
    user gave and the step (a run or checkpoints/ directory: its latest complete checkpoint)."""
    from dpo_dist.evaluation import policy_source

    run = tmp_path / "run"
    for step, complete in ((2, True), (4, True), (6, False)):
        tag = run / "checkpoints" / f"step_{step:08d}"
        tag.mkdir(parents=True)
        if complete:
            (tag / "COMPLETE").write_text("")

    def source(path):
        return policy_source(DPOConfig(output_dir=str(tmp_path / "out"), eval=EvalConfig(policy_path=str(path))))

    assert source(run / "checkpoints" / "step_00000002") == {
        "policy_source": str(run / "checkpoints" / "step_00000002"), "policy_step": 2,
    }
    assert source(run / "checkpoints")["policy_step"] == 4 and source(run)["policy_step"] == 4
    model = make_tiny_model_dir(tmp_path / "model", layers=1)
    assert source(model) == {"policy_source": str(model), "policy_step": None}


def test_the_reference_uses_model_tokenizer_path(tmp_path, monkeypatch):
    """A run whose tokenizer is not in model.path (model.tokenizer_path): the reference answers and
    is fingerprinted with that tokenizer. The policy is the same weights with the same tokenizer
    beside them, so both answer alike and the reference's identity is the policy's."""
    from dpo_dist.generation import model_identity
    from tests.unit.test_generation import split_tokenizer

    for name in ("RANK", "WORLD_SIZE", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"prompt": p, "chosen": "x", "rejected": "y"}) + "\n" for p in ["12+34=", "91-46="]))
    full = make_tiny_model_dir(tmp_path / "policy", seed=0, layers=1)
    bare, tokenizer_dir = split_tokenizer(full, tmp_path)
    run = tmp_path / "run"
    cfg = rank_config(DPOConfig(
        output_dir=str(run), model=ModelConfig(path=str(bare), tokenizer_path=str(tokenizer_dir)),
        data=DataConfig(eval_path=str(evals)),
        eval=EvalConfig(policy_path=str(full), max_new_tokens=4, batch_size=2, judge=JudgeConfig(name="rule")),
    ))
    result = winrate_run(cfg)
    assert result["n"] == 2 and result["ties"] == 2
    samples = [json.loads(line) for line in (run / "winrate_samples.jsonl").read_text().splitlines()]
    assert all(s["policy"] == s["reference"] for s in samples)
    saved = json.loads((run / "winrate" / "generations.json").read_text())
    assert saved["fingerprint"]["reference"] == model_identity(full) == saved["fingerprint"]["policy"]


def test_the_policy_is_side_a_of_every_comparison(tmp_path, monkeypatch):
    """Fixed answers, the policy's right and the reference's wrong: the rule judge must count a
    win for the policy on every prompt (policy and reference swapped anywhere between generation
    and judging would count losses)."""
    from dpo_dist.generation import Completion

    for name in ("RANK", "WORLD_SIZE", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    answers = {"12+34=": 46, "91-46=": 45, "47+38=": 85}
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"prompt": p, "chosen": "x", "rejected": "y"}) + "\n" for p in answers))
    policy_dir = make_tiny_model_dir(tmp_path / "policy", seed=1, layers=1)
    reference_dir = make_tiny_model_dir(tmp_path / "reference", seed=0, layers=1)

    def fixed_answers(model_dir, items, *args, **kwargs):
        off_by = {str(policy_dir): 0, str(reference_dir): 1}[str(model_dir)]
        return [Completion(str(answers[item.prompt] + off_by), 3, 2, "stop") for item in items]

    monkeypatch.setattr(winrate, "generate_with", fixed_answers)
    run = tmp_path / "run"
    cfg = rank_config(DPOConfig(
        output_dir=str(run), model=ModelConfig(path=str(reference_dir)), data=DataConfig(eval_path=str(evals)),
        eval=EvalConfig(policy_path=str(policy_dir), max_new_tokens=4, batch_size=2, judge=JudgeConfig(name="rule")),
    ))
    result = winrate_run(cfg)
    assert (result["n"], result["wins"], result["losses"], result["ties"]) == (3, 3, 0, 0)
    assert result["win_rate"] == 1.0 and result["policy"] == str(policy_dir)
    samples = [json.loads(line) for line in (run / "winrate_samples.jsonl").read_text().splitlines()]
    assert [s["winner"] for s in samples] == ["policy"] * 3
    assert [(s["prompt"], s["policy"], s["reference"]) for s in samples] == [
        (p, str(a), str(a + 1)) for p, a in answers.items()
    ]


def test_winrate_json_names_the_held_out_records_of_a_split(tmp_path):
    """With data.eval_split there is no eval_path to name: winrate.json says which records were asked."""
    from dpo_dist.generation import Completion

    cfg = DPOConfig(output_dir=str(tmp_path), data=DataConfig(train_path="t.jsonl", eval_path=None, eval_split=0.1, max_samples=50))
    answer = Completion("46", 7, 2, "stop")
    result = winrate.judge_and_write(cfg, "policy", [(PromptItem(0, "12+34="), answer, answer)], 1, 0.0, source={})
    assert result["eval_path"] is None and result["eval_data"] == "t.jsonl (first 50 records, held out by data.eval_split=0.1)"
    assert json.loads((tmp_path / "winrate.json").read_text())["eval_data"] == result["eval_data"]
