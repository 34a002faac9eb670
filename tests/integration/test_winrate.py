"""``dpo-eval winrate`` end to end (2 CPU ranks) and ``dpo-data generate`` on tiny local models."""

from __future__ import annotations

import json
import re

import pytest

from dpo_dist.data import read_preferences
from launch.data import main as data_main
from tests.helpers import make_tiny_model_dir, run_cli
from tests.unit.test_judges import _StubJudgeServer, make_tiny_reward_model_dir

pytestmark = pytest.mark.integration

PROMPTS = ["12+34=", "reverse: abc", "sort: dcba", "91-46=", "47+38=", "reverse: hello", "sort: zyx"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("winrate")
    evals = root / "eval.jsonl"
    evals.write_text("".join(json.dumps({"prompt": p, "chosen": "x", "rejected": "y"}) + "\n" for p in PROMPTS))
    return {
        "reference": make_tiny_model_dir(root / "reference", seed=0, layers=1),
        "policy": make_tiny_model_dir(root / "policy", seed=1, layers=1),
        "rm": make_tiny_reward_model_dir(root / "rm"),
        "eval": evals,
    }


def _winrate(models, out, *extra):
    return run_cli(
        "launch.eval",
        "winrate",
        f"output_dir={out}",
        f"model.path={models['reference']}",
        f"data.eval_path={models['eval']}",
        "eval.max_new_tokens=4",
        "eval.batch_size=2",
        "wandb.mode=disabled",
        *extra,
    )


def test_winrate_two_ranks_into_a_run_dir(models, tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("the: training run's own config\n")
    overrides = [
        f"eval.policy_path={models['policy']}", "eval.max_prompts=6", "cluster.nproc_per_node=2",
        "judge=reward_model", f"eval.judge.reward_model_path={models['rm']}",
    ]
    result = _winrate(models, run, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "winrate: policy vs reference on 6 prompts (judge=reward_model)" in result.stdout
    summary = json.loads((run / "winrate.json").read_text())
    assert summary["n"] == 6 and summary["wins"] + summary["ties"] + summary["losses"] == 6
    assert summary["win_rate"] + summary["tie_rate"] + summary["loss_rate"] == pytest.approx(1.0)
    lo, hi = summary["score_ci95"]
    assert 0 <= lo <= summary["score"] <= hi <= 1 and summary["ci_method"].startswith("wilson")
    assert summary["generation"]["world_size"] == 2 and summary["judge"] == "reward_model"
    samples = [json.loads(line) for line in (run / "winrate_samples.jsonl").read_text().splitlines()]
    assert [s["example_id"] for s in samples] == list(range(6)), "rank 0 gathered both shards, in order"
    assert [s["prompt"] for s in samples] == PROMPTS[:6]
    assert all(s["winner"] in ("policy", "reference", "tie") and 0 < s["policy_tokens"] <= 4 for s in samples)
    assert (run / "config.yaml").read_text() == "the: training run's own config\n", "the run's config is untouched"
    assert (run / "winrate" / "config.yaml").exists() and (run / "winrate" / ".hydra").is_dir()
    # The same command again: rank 0 finds the answers it saved and every rank skips generation.
    again = _winrate(models, run, *overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the 6 answers" in again.stderr and "generating" not in again.stderr, again.stderr[-3000:]
    assert [json.loads(line) for line in (run / "winrate_samples.jsonl").read_text().splitlines()] == samples
    assert json.loads((run / "winrate.json").read_text())["reused"] == {"generations": True, "verdicts": 6}


def test_sharded_generation_matches_a_full_copy_per_rank(models, tmp_path):
    """eval.shard_generation: the models are partitioned over 2 ranks (ZeRO-3) and generate with
    synced ranks; greedy answers equal those of a full model per rank, also with an odd number of
    prompts (one rank makes a filler call) and batches that end early."""
    answers = {}
    for sharded in (False, True):
        out = tmp_path / f"sharded_{sharded}"
        result = _winrate(
            models, out, f"eval.policy_path={models['policy']}", "eval.max_prompts=5", "cluster.nproc_per_node=2",
            "judge=reward_model", f"eval.judge.reward_model_path={models['rm']}", f"eval.shard_generation={sharded}",
            "eval.max_new_tokens=6",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads((out / "winrate.json").read_text())
        assert summary["generation"]["sharded"] is sharded
        samples = [json.loads(line) for line in (out / "winrate_samples.jsonl").read_text().splitlines()]
        answers[sharded] = [(s["example_id"], s["policy"], s["reference"]) for s in samples]
        if sharded:
            logged = re.search(r"partitioned over 2 ranks \(this rank holds (\d+) of (\d+) parameters", result.stderr)
            held, full = map(int, logged.groups())
            assert 0 < held <= full // 2 + 64, (held, full)  # its half of every parameter (+ alignment padding)
    assert answers[True] == answers[False]
    assert len(answers[True]) == 5 and len({a[1] for a in answers[True]} | {a[2] for a in answers[True]}) > 1


def test_sampled_answers_are_the_same_on_one_and_two_ranks(models, tmp_path):
    """World-size invariance: the same seed samples the same answers on any number of ranks."""
    answers = {}
    for ranks in (1, 2):
        out = tmp_path / f"ranks_{ranks}"
        result = _winrate(
            models, out, f"eval.policy_path={models['policy']}", f"cluster.nproc_per_node={ranks}",
            "eval.do_sample=true", "eval.seed=3", "eval.max_new_tokens=6",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        samples = [json.loads(line) for line in (out / "winrate_samples.jsonl").read_text().splitlines()]
        answers[ranks] = [(s["example_id"], s["policy"], s["reference"]) for s in samples]
    assert answers[2] == answers[1] and len(answers[1]) == len(PROMPTS)


def test_winrate_with_an_openai_compatible_judge(models, tmp_path):
    """judge=openai end to end on 2 ranks: rank 0 alone checks the endpoint with one request
    before generating, then every pair that differs is asked in both orders."""
    out = tmp_path / "out"
    with _StubJudgeServer() as stub:
        result = _winrate(
            models, out, f"eval.policy_path={models['policy']}", "eval.max_prompts=4", "cluster.nproc_per_node=2",
            "judge=openai", f"eval.judge.base_url={stub.base_url}", "eval.judge.model=stub-judge",
            "eval.judge.api_key_env=null",
        )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "winrate.json").read_text())
    assert (summary["judge"], summary["judge_model"], summary["n"]) == ("openai", "stub-judge", 4)
    assert stub.asked[0] == ("2+2=", "4", "5") and stub.asked.count(stub.asked[0]) == 1, "one probe, first"
    samples = [json.loads(line) for line in (out / "winrate_samples.jsonl").read_text().splitlines()]
    asked = [s for s in samples if "ab" in s["judge"]]
    # The probe is paid for too: judge_usage counts it.
    assert summary["judge_usage"]["requests"] == 1 + 2 * len(asked) == len(stub.asked)
    for s in asked:
        assert (s["prompt"], s["policy"], s["reference"]) in stub.asked
        assert (s["prompt"], s["reference"], s["policy"]) in stub.asked


def test_winrate_of_a_lora_run_exported_adapter_only(tmp_path):
    """A LoRA run with model.lora.merge_on_export=false: its final/ (an adapter) and a checkpoint
    (exported as an adapter too) are both evaluated; winrate.json names the checkpoint and step."""
    from tests.helpers import make_tiny_assets, tiny_run_overrides

    assets = make_tiny_assets(tmp_path)
    assets["eval"].write_text("".join(json.dumps({"prompt": p, "chosen": "x", "rejected": "y"}) + "\n" for p in PROMPTS[:4]))
    run = tmp_path / "run"
    settings = {
        "output_dir": run, "reference.cache_dir": tmp_path / "ref", "train.max_steps": 2, "train.checkpoint_every": 2,
        "model.lora.r": 4, "model.lora.target_modules": "[q_proj,v_proj]", "model.lora.merge_on_export": "false",
    }
    trained = run_cli("launch.train", *tiny_run_overrides(assets, settings), env={"HF_HUB_OFFLINE": "1"})
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (run / "final" / "adapter_config.json").is_file() and not (run / "final" / "config.json").exists()
    common = ["eval.max_new_tokens=4", "eval.batch_size=2", "wandb.mode=disabled"]
    final = run_cli("launch.eval", "winrate", f"output_dir={run}", *common)
    assert final.returncode == 0, final.stderr[-3000:]
    summary = json.loads((run / "winrate.json").read_text())
    assert summary["policy"] == summary["policy_source"] == str(run / "final") and summary["n"] == 4
    checkpoint = run / "checkpoints" / "step_00000002"
    out = tmp_path / "ckpt_eval"
    evaluated = run_cli("launch.eval", "winrate", f"output_dir={run}", f"eval.policy_path={checkpoint}",
                        f"eval.output={out}", *common)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    summary = json.loads((out / "winrate.json").read_text())
    assert summary["policy"] == str(run / "winrate" / "policy")
    assert (summary["policy_source"], summary["policy_step"]) == (str(checkpoint), 2)


def test_winrate_rule_judge_fails_fast_on_foreign_prompts(models, tmp_path):
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"prompt": "What is DPO?", "chosen": "a", "rejected": "b"}) + "\n")
    result = _winrate(models, tmp_path / "out", f"eval.policy_path={models['policy']}", f"data.eval_path={foreign}")
    assert result.returncode == 2
    errors = [ln for ln in result.stderr.splitlines() if "error" in ln.lower()]
    assert errors == ["dpo-eval: error: judge=rule only checks bundled-task prompts; prompt 0 is not one: "
                      "'What is DPO?' (use judge=reward_model or judge=openai)"], result.stderr[-2000:]
    assert not (tmp_path / "out" / "winrate.json").exists()


def test_generate_preference_pairs_with_a_reward_model(models, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    args = [
        "generate", "--model", str(models["policy"]), "--prompts", str(models["eval"]), "--out", str(out),
        "--num-samples", "3", "--judge", "reward_model", "--reward-model", str(models["rm"]),
        "--max-new-tokens", "4", "--batch-size", "8",
    ]
    assert data_main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    counts = dict(line.split(": ") for line in lines[:-1])
    assert lines[-1] == f"wrote {out}"
    assert int(counts["prompts"]) == len(PROMPTS) and int(counts["samples"]) == 3 * len(PROMPTS)
    pairs = int(counts["pairs"])
    assert pairs + int(counts["ties_skipped"]) + int(counts["empty_skipped"]) == len(PROMPTS) and pairs > 0
    written = read_preferences(out)
    assert len(written.records) == pairs and not written.problems, "every pair passes dpo-data check"
    for row in map(json.loads, out.read_text().splitlines()):
        assert row["chosen_score"] > row["rejected_score"] and row["prompt"] in PROMPTS
    # Same seed, same pairs.
    again = tmp_path / "again.jsonl"
    assert data_main([*args[:6], str(again), *args[7:]]) == 0
    assert again.read_text() == out.read_text()


def test_generate_usage_errors(models, tmp_path, capsys):
    base = ["generate", "--model", str(models["policy"]), "--prompts", str(models["eval"])]
    assert data_main([*base, "--out", str(tmp_path / "x.jsonl"), "--num-samples", "1"]) == 2
    assert data_main([*base, "--out", str(tmp_path / "x.jsonl"), "--judge", "reward_model"]) == 2
    assert data_main([*base[:4], "missing.jsonl", "--out", str(tmp_path / "x.jsonl")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [
        "dpo-data: error: --num-samples must be at least 2, got 1",
        "dpo-data: error: --judge reward_model needs --reward-model DIR (got None)",
        "dpo-data: error: missing.jsonl: no such file",
    ]
