"""The DPO engine end to end on CPU: real DeepSpeed ZeRO-3, gloo, 1 and 2 ranks, through `dpo-train`."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests.helpers import REPO, make_tiny_assets, run_cli, tiny_run_overrides

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return {**make_tiny_assets(root), "cache": root / "refcache"}


def overrides(assets, out, **extra) -> list[str]:
    return tiny_run_overrides(assets, {"output_dir": out, "reference.cache_dir": assets["cache"], **extra})


def train(assets, out, **extra) -> list[dict]:
    result = run_cli("launch.train", *overrides(assets, out, **extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_rows(rows):
    return [r for r in rows if "loss" in r]


def assert_same_trained_weights(got_dir, want_dir, initial_dir, rel: float = 1e-5) -> None:
    """final/ in ``got_dir`` holds the weights ``want_dir``'s run trained: per tensor, the change
    from the initial model agrees to ``rel`` (relative, in norm; measured: 0 for ZeRO stages 0/1 vs 3
    on one rank, 6e-7 for optimizer offload), and the training moved them."""
    from safetensors.torch import load_file

    got, want = (load_file(d / "final" / "model.safetensors") for d in (got_dir, want_dir))
    initial = load_file(initial_dir / "model.safetensors")
    assert got.keys() == want.keys() == initial.keys()
    moved = 0.0
    for name, w0 in initial.items():
        step_got, step_want = got[name] - w0, want[name] - w0
        moved += step_want.norm().item()
        assert (step_got - step_want).norm() <= rel * step_want.norm() + 1e-9, (name, step_got.norm(), step_want.norm())
    assert moved > 0  # the runs trained: the comparison is not of two untouched copies


def test_step0_loss_is_ln2_and_run_dir_contract(assets, tmp_path):
    rows = train(assets, tmp_path / "run", **{"train.max_steps": 2})
    first = train_rows(rows)[0]
    assert first["step"] == 1
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert first["reward_accuracy"] == 0.0 and abs(first["reward_margin"]) < 1e-7
    for key in ("step", "loss", "lr", "grad_norm", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "tokens", "tokens_per_s"):
        assert key in first
    # Eval rows are rows of their own: step and eval/* keys (logged after the step's train row).
    last = rows[-1]
    for key in ("eval/loss", "eval/reward_accuracy", "eval/reward_margin", "eval/chosen_logp", "eval/rejected_logp"):
        assert key in last, last
    assert last["step"] == 2 and not any(key in last for key in ("loss", "lr", "tokens"))
    assert first["chosen_logp"] < 0 and first["rejected_logp"] < 0
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["attention_backend"] == "sdpa"
    # The user's command, not the rank's `python -m dpo_dist.worker config.yaml train`.
    assert info["argv"] == ["dpo-train", *overrides(assets, tmp_path / "run", **{"train.max_steps": 2})]
    assert info["reference"]["cache_dir"] == str(assets["cache"])
    assert (tmp_path / "run" / "config.yaml").exists()
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_a_loss_preset_trains_with_its_options(assets, tmp_path):
    """loss=exo_pair reaches the step with the preset's eps = 1e-3: at step 1 policy = reference, so
    the loss is EXO's value at margin 0, KL((1/2, 1/2) || (1 - eps, eps))."""
    rows = train_rows(train(assets, tmp_path / "exo", **{"loss": "exo_pair", "train.max_steps": 2}))
    eps = 1e-3
    assert abs(rows[0]["loss"] - (0.5 * math.log(0.5 / (1 - eps)) + 0.5 * math.log(0.5 / eps))) < 1e-6
    assert rows[1]["loss"] != rows[0]["loss"]  # it trained


def test_world_size_invariance(assets, tmp_path):
    """1 rank x 8 micro-batches and 2 ranks x 4 take the same steps. Adam's update barely depends
    on the gradient's scale, and clipping removes it, so with the defaults a step whose gradient is
    off by the world size (ranks summed instead of averaged, or not scaled by it) trains the same;
    a large eps and no clipping make the update proportional to the gradient, so that shows."""
    scale_sensitive = {"optim.eps": 1e-3, "optim.grad_clip": 0}
    one = train_rows(train(assets, tmp_path / "w1", **scale_sensitive, **{"cluster.nproc_per_node": 1}))
    two = train_rows(train(assets, tmp_path / "w2", **scale_sensitive, **{"cluster.nproc_per_node": 2}))
    assert [r["step"] for r in one] == [1, 2, 3] == [r["step"] for r in two]
    for a, b in zip(one, two):
        # Measured: 2e-8 relative apart; a gradient off by 2x is 5e-4 apart.
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        for key in ("chosen_reward", "rejected_reward", "reward_margin", "chosen_logp", "rejected_logp", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), (a["step"], key, a[key], b[key])
        assert a["tokens"] == b["tokens"] and a["reward_accuracy"] == b["reward_accuracy"]
        assert a["grad_norm"] > 0
    assert abs(one[-1]["loss"] - one[0]["loss"]) > 1e-3, one  # it trained, by far more than the tolerance


@pytest.mark.parametrize("loss", ["kto_pair", "aot_unpaired"])
def test_losses_with_step_statistics_are_world_size_invariant(assets, tmp_path, loss):
    """kto_pair's KL baselines are batch means: taken per micro-batch, 1 rank x 8 and 2 ranks x 4
    differed by 2e-3 relative; over the whole step (an all-reduced no-grad pre-pass) they agree
    like every other loss, in training and in the held-out eval. aot_unpaired sorts the step's
    log-ratios: its rank partners come from all ranks (an all-gather in the same pre-pass)."""
    settings = {"loss": loss, "optim.eps": 1e-3, "optim.grad_clip": 0, "optim.lr": 2e-3, "optim.warmup_steps": 0}
    one = train(assets, tmp_path / "w1", **settings, **{"cluster.nproc_per_node": 1})
    two = train(assets, tmp_path / "w2", **settings, **{"cluster.nproc_per_node": 2})
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(train_rows(one)) == 3
    for a, b in zip(one, two):
        for key in ("loss", "eval/loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-6 * abs(a[key]), (a["step"], key, a[key], b[key])
    assert any("eval/loss" in r for r in one)
    last = train_rows(one)[-1]
    assert abs(last["chosen_reward"]) + abs(last["rejected_reward"]) > 1e-2, last  # it trained: ratios moved


def test_single_rank_without_zero3_is_the_same_training(assets, tmp_path):
    """deepspeed.stage=0 or 1 on one rank (ZeRO-3 has nothing to partition there; see
    benchmarks/README.md) trains the same: same losses as ZeRO-3, and it exports a final model. The
    frozen reference model runs as stage 0 under stage 1 (DeepSpeed refuses stage 1 without an
    optimizer); online here, so the reference pass and the policy both run every step."""
    zero3 = train_rows(train(assets, tmp_path / "z3"))
    for stage, extra in ((0, {"train.checkpoint_every": 3}), (1, {"reference.mode": "online"})):
        rows = train_rows(train(assets, tmp_path / f"z{stage}", **{"deepspeed.stage": stage, **extra}))
        for a, b in zip(zero3, rows):
            assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (stage, a["loss"], b["loss"])
            # Stage 0's norm is measured by train_step, ZeRO's by DeepSpeed for clipping.
            assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-3), (stage, a["grad_norm"], b["grad_norm"])
        assert [r["step"] for r in rows] == [r["step"] for r in zero3] == [1, 2, 3]
        assert rows[-1]["loss"] != rows[0]["loss"]
        assert_same_trained_weights(tmp_path / f"z{stage}", tmp_path / "z3", assets["model"])
    # dpo-export of a stage-0 checkpoint (one unpartitioned file; DeepSpeed's zero_to_fp32 reads
    # partitions only) is the model final/ holds.
    exported = run_cli("launch.export", str(tmp_path / "z0"), "--out", str(tmp_path / "z0_export"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    from safetensors.torch import load_file

    got, want = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "z0_export", tmp_path / "z0" / "final"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_block_fetch_units_and_activation_checkpointing_train_the_same(assets, tmp_path):
    """ZeRO-3 on 2 ranks gathering each decoder layer whole (deepspeed.leaf_modules=auto, the
    default) trains as DeepSpeed's per-module hooks do, and so does it with every layer recomputed
    in backward (model.activation_checkpointing)."""
    two = {"cluster.nproc_per_node": 2}
    per_module = train_rows(train(assets, tmp_path / "none", **two, **{"deepspeed.leaf_modules": "none"}))
    result = run_cli("launch.train", *overrides(assets, tmp_path / "auto", **two))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ZeRO-3 fetch units: 2 LlamaDecoderLayer modules, each gathered whole" in result.stderr
    blocks = train_rows([json.loads(line) for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()])
    recomputed = train_rows(train(assets, tmp_path / "ckpt", **two, **{"model.activation_checkpointing": True}))
    for rows in (blocks, recomputed):
        assert [r["step"] for r in rows] == [r["step"] for r in per_module]
        for a, b in zip(per_module, rows):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])
    assert per_module[-1]["loss"] != per_module[0]["loss"]


def test_optimizer_offload_trains_the_same(assets, tmp_path):
    """deepspeed=zero3_offload (the 32-GPU 70B preset's): Adam states on the host, stepped by
    DeepSpeed's CPU Adam (DeepSpeed refuses a torch optimizer there), same losses as on-device
    AdamW on 2 ranks, and the export still works."""
    two = {"cluster.nproc_per_node": 2}
    on_device = train_rows(train(assets, tmp_path / "dev", **two))
    offloaded = train_rows(train(assets, tmp_path / "off", **two, **{"deepspeed": "zero3_offload"}))
    assert [r["step"] for r in offloaded] == [r["step"] for r in on_device]
    for a, b in zip(on_device, offloaded):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a["loss"], b["loss"])
    assert offloaded[-1]["loss"] != offloaded[0]["loss"]
    assert_same_trained_weights(tmp_path / "off", tmp_path / "dev", assets["model"])


@pytest.mark.parametrize("preset", ["llama3_70b_32gpu", "llama3_70b_64gpu"])
def test_70b_experiment_presets_train_end_to_end_on_the_tiny_model(assets, tmp_path, preset):
    """Every setting a 70B preset combines (offload or not, 16k/8k-token micro-batches, activation
    checkpointing, sharded win-rate generation, its schedule) runs together: the tiny model in
    their place, on 2 local ranks. Memory is dpo-plan's job (tests/unit/test_memory.py)."""
    out = tmp_path / preset
    result = run_cli(
        "launch.train", f"experiment={preset}", f"model.path={assets['model']}", "data=custom",
        f"data.train_path={assets['train']}", f"data.eval_path={assets['eval']}", "cluster=local",
        "cluster.nproc_per_node=2", "train.max_steps=2", "wandb.mode=disabled", f"output_dir={out}",
        f"reference.cache_dir={tmp_path / 'ref'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = (out / "config.yaml").read_text()
    assert "activation_checkpointing: true" in config and "shard_generation: true" in config
    assert ("offload_optimizer: cpu" in config) == (preset == "llama3_70b_32gpu")
    assert [r["step"] for r in train_rows([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])] == [1, 2]
    assert (out / "final" / "model.safetensors").exists()


def test_kill9_resume_matches_uninterrupted(assets, tmp_path):
    steps = {"train.max_steps": 6, "train.checkpoint_every": 2, "cluster.nproc_per_node": 2}
    reference = train_rows(train(assets, tmp_path / "full", **steps))

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "launch.train", *overrides(assets, out, **steps)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints").exists()
    resumed = train_rows(train(assets, out, **steps))
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(reference, resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
    info = json.loads((out / "run_info.json").read_text())
    assert info["resumed_from_step"] in (2, 4)


def test_export_round_trip(assets, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exp"
    two_ranks = {"cluster.nproc_per_node": 2}
    rows = train(assets, out, **{"train.max_steps": 2, "train.checkpoint_every": 2, **two_ranks})
    exported = AutoModelForCausalLM.from_pretrained(out / "final")
    state = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step_00000002")
    trained = AutoModelForCausalLM.from_pretrained(assets["model"])
    trained.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    original = AutoModelForCausalLM.from_pretrained(assets["model"])
    ids = AutoTokenizer.from_pretrained(out / "final")("12+34=", return_tensors="pt").input_ids
    with torch.no_grad():
        got, want, before = (m(ids).logits for m in (exported, trained, original))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, before)  # the export holds trained, not initial, weights
    generated = exported.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 4 or generated[0, -1] == exported.config.eos_token_id

    # dpo-export of the same (last) checkpoint, cut into shards, is the same model.
    shards = tmp_path / "shards"
    result = run_cli("launch.export", str(out), "--out", str(shards), "--max-shard-size", "300KB")
    assert result.returncode == 0, result.stderr[-2000:]
    generation = [json.loads((d / "generation_config.json").read_text()) for d in (shards, out / "final")]
    assert generation[0] == generation[1]
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(shards)(ids).logits, got, rtol=0, atol=0)
    # dpo-eval of the checkpoint (rank 0 consolidates it while rank 1 waits) = the run's final eval.
    ev = tmp_path / "ev"
    result = run_cli("launch.eval", *overrides(assets, ev, **two_ranks, **{"eval.policy_path": out / "checkpoints"}))
    assert result.returncode == 0, result.stderr[-2000:]
    evaluated = json.loads((ev / "eval.json").read_text())
    assert evaluated["policy"] == str(ev / "eval" / "policy")
    assert (evaluated["policy_source"], evaluated["policy_step"]) == (str(out / "checkpoints"), 2)
    for key in ("eval/loss", "eval/reward_accuracy", "eval/reward_margin"):
        assert abs(evaluated[key] - rows[-1][key]) <= 1e-5 * max(1.0, abs(rows[-1][key])), key
    bad = run_cli("launch.export", str(out), "--out", str(tmp_path / "bad"), "--max-shard-size", "5XB")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "dpo-export: error: --max-shard-size 5XB: not a size: give a positive number and a unit (KB, MB, GB or TB), e.g. 5GB"
    )
    # An export replaces its --out whole: a run directory (or any folder but an earlier export) is refused.
    bad = run_cli("launch.export", str(out), "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        f"dpo-export: error: {out}: not empty and not an earlier export; an export would replace it whole: choose another --out"
    )
    assert (out / "metrics.jsonl").is_file() and (out / "checkpoints").is_dir()
    again = run_cli("launch.export", str(out), "--out", str(shards))  # an earlier export is replaced
    assert again.returncode == 0, again.stderr[-2000:]


def test_checkpoints_are_hf_models_and_the_best_survives_pruning_and_resume(assets, tmp_path):
    """train.export_checkpoints writes checkpoints/step_N/hf/: the model dpo-export makes of that
    checkpoint, and at the last step final/ itself (hard links, not a second export).
    train.metric_for_best_model keeps the best checkpoint past keep_checkpoints=1 and writes best/.
    Jobs resumed at the last step of copies of that run without its exports and best.json find
    the best again and make the same models: hf/ of the resumed checkpoint first; best/ converted
    from its checkpoint, or, when it is the last step, exported with final/ linked from it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_dist.export import export_checkpoint
    from dpo_dist.runinfo import read_config

    # An lr that overshoots: eval/loss is best at step 2.
    settings = {
        "train.max_steps": 4, "train.checkpoint_every": 2, "train.eval_every": 2, "train.keep_checkpoints": 1,
        "optim.lr": 1e-2, "train.metric_for_best_model": "eval/loss",
    }
    out = tmp_path / "run"
    rows = train(assets, out, **settings, **{"train.export_checkpoints": True})
    losses = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    assert losses[2] < losses[4], losses  # the premise: the best is not the newest checkpoint
    ckpt = {step: out / "checkpoints" / f"step_{step:08d}" for step in (2, 4)}
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [c.name for c in ckpt.values()]
    assert json.loads((out / "best.json").read_text()) == {
        "metric": "eval/loss", "greater_is_better": False, "step": 2, "value": losses[2], "checkpoint": "checkpoints/step_00000002",
    }
    ids = AutoTokenizer.from_pretrained(ckpt[2] / "hf")("12+34=", return_tensors="pt").input_ids

    def logits(model_dir):
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits

    cfg = read_config(out / "config.yaml")
    for step, directory in ckpt.items():  # dpo-export's conversion of the same checkpoint
        export_checkpoint(directory, tmp_path / f"dpo-export-{step}", cfg=cfg)
        torch.testing.assert_close(logits(directory / "hf"), logits(tmp_path / f"dpo-export-{step}"), rtol=0, atol=0)
    best, final = logits(out / "best"), logits(out / "final")
    torch.testing.assert_close(best, logits(ckpt[2] / "hf"), rtol=0, atol=0)
    torch.testing.assert_close(final, logits(ckpt[4] / "hf"), rtol=0, atol=0)
    assert not torch.allclose(best, final)
    assert (out / "final" / "model.safetensors").stat().st_ino == (ckpt[4] / "hf" / "model.safetensors").stat().st_ino

    def resumed_copy(name: str, drop: tuple[str, ...], export_checkpoints: bool):
        copy = tmp_path / name
        shutil.copytree(out, copy)
        for path in [copy / "best", copy / "final", copy / "best.json", *(p for pattern in drop for p in copy.glob(pattern))]:
            shutil.rmtree(path, ignore_errors=True) if path.name != "best.json" else path.unlink()
        train(assets, copy, **settings, **{"train.export_checkpoints": export_checkpoints})
        assert json.loads((copy / "run_info.json").read_text())["resumed_from_step"] == 4
        return copy

    # hf/ of step 4 written on resume, final/ linked from it; best/ converted from step 2.
    copy = resumed_copy("converted", ("checkpoints/*/hf",), export_checkpoints=True)
    assert (copy / "checkpoints" / "step_00000004" / "hf").is_dir() and not (copy / "checkpoints" / "step_00000002" / "hf").exists()
    assert json.loads((copy / "best.json").read_text())["step"] == 2
    torch.testing.assert_close(logits(copy / "best"), best, rtol=0, atol=0)
    torch.testing.assert_close(logits(copy / "final"), final, rtol=0, atol=0)
    # Step 2 gone: the best is the last step, exported from the engine, and final/ linked from it.
    copy = resumed_copy("last_is_best", ("checkpoints/*/hf", "checkpoints/step_00000002"), export_checkpoints=False)
    assert json.loads((copy / "best.json").read_text())["step"] == 4 and not (copy / "checkpoints" / "step_00000004" / "hf").exists()
    torch.testing.assert_close(logits(copy / "best"), final, rtol=0, atol=0)
    assert (copy / "final" / "model.safetensors").stat().st_ino == (copy / "best" / "model.safetensors").stat().st_ino


def test_precompute_then_train_reuses_cache_and_eval_matches(assets, tmp_path):
    cache = tmp_path / "ref"
    common = {"reference.cache_dir": cache, "cluster.nproc_per_node": 2}
    pre = run_cli("launch.precompute", *overrides(assets, tmp_path / "pre", **common))
    assert pre.returncode == 0, pre.stderr[-2000:]
    assert (cache / "manifest.json").exists() and len(list(cache.glob("eval-*/manifest.json"))) == 1
    shards = run_cli("launch.data", "shards", str(cache))
    assert shards.returncode == 0 and "verified: all shards match their sha256" in shards.stdout

    rows = train(assets, tmp_path / "run", **common)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["reference"] == {"cache_dir": str(cache), "computed": False, "mode": "precompute"}

    result = run_cli(
        "launch.eval",
        *overrides(assets, tmp_path / "ev", **common, **{"eval.policy_path": tmp_path / "run" / "final"}),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    standalone = json.loads((tmp_path / "ev" / "eval.json").read_text())
    final = rows[-1]
    for key in ("eval/loss", "eval/reward_accuracy", "eval/reward_margin"):
        assert abs(standalone[key] - final[key]) <= 1e-5 * max(1.0, abs(final[key])), key

    part = next(cache.glob("part-*.arrow"))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    corrupted = run_cli("launch.data", "shards", str(cache))
    assert corrupted.returncode == 1 and "sha256 mismatch" in corrupted.stdout
    refused = run_cli("launch.train", *overrides(assets, tmp_path / "run2", **common))
    assert refused.returncode == 2
    assert "corrupted (sha256 mismatch)" in refused.stderr.strip().splitlines()[-1]


def sft_step0_nll_per_token(assets, run_dir) -> float:
    """Step 0's token-weighted NLL of the chosen responses, from plain unpacked HF forwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_dist.data import load_tokenized
    from dpo_dist.engine import PairSampler

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    data = load_tokenized(assets["train"], tokenizer, cfg["data"]["max_length"], cfg["data"]["truncation"])
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()
    nll, tokens = 0.0, 0
    for i in PairSampler(len(data), cfg["train"]["pairs_per_step"], cfg["train"]["seed"]).pairs_for_step(0):
        pair = data[int(i)]
        ids = torch.tensor([*pair.prompt_ids, *pair.chosen_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
        scored = torch.arange(pair.prompt_len - 1, len(ids) - 1)
        nll -= logp[scored, ids[scored + 1]].sum().item()
        tokens += pair.chosen_len
    return nll / tokens


def test_sft_stage_is_token_weighted_world_size_invariant_and_learns(assets, tmp_path):
    """SFT packs chosen sequences only and minimises the NLL per scored token of the step (a long
    response weighs by its length, as in TRL's SFTTrainer), the same on 1 and 2 ranks."""
    sft = {"stage": "sft", "train.max_steps": 5, "optim.lr": 3e-3, "train.pairs_per_step": 16}
    rows = train_rows(train(assets, tmp_path / "sft", **sft, **{"cluster.nproc_per_node": 2}))
    one = train_rows(train(assets, tmp_path / "sft1", **sft, **{"cluster.nproc_per_node": 1}))
    for a, b in zip(one, rows, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a["loss"], b["loss"])
    expected = sft_step0_nll_per_token(assets, tmp_path / "sft")
    assert abs(rows[0]["loss"] - expected) < 1e-5 * expected, (rows[0]["loss"], expected)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert "reward_accuracy" not in rows[0]
    # One chosen sequence per pair: a DPO step over the same pairs packs more tokens.
    dpo = train_rows(train(assets, tmp_path / "dpo", **{"train.max_steps": 1}))
    assert rows[0]["tokens"] < dpo[0]["tokens"]
    assert (tmp_path / "sft" / "final" / "model.safetensors").exists()


def test_default_config_on_bundled_task_learns(tmp_path):
    """`dpo-train` defaults (bundled SFT model and data), shortened: held-out accuracy well above chance."""
    result = run_cli(
        "launch.train", f"output_dir={tmp_path / 'run'}", "train.max_steps=40", "wandb.mode=disabled",
        f"reference.cache_dir={tmp_path / 'ref'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in train_rows(rows)]
    assert abs(losses[0] - math.log(2)) < 1e-6
    assert sum(losses[-5:]) / 5 < losses[0] - 0.1
    assert rows[-1]["eval/reward_accuracy"] > 0.7, rows[-1]  # measured 0.80 at step 40, 0.8775 at 120
    assert rows[-1]["eval/reward_margin"] > 0

    # The workflow's next steps on the same run: standalone eval (same numbers, the run's own
    # config.yaml untouched), win-rate with the task's verifier, then the report.
    config_before = (tmp_path / "run" / "config.yaml").read_bytes()
    standalone = run_cli("launch.eval", f"output_dir={tmp_path / 'run'}", f"reference.cache_dir={tmp_path / 'ref'}")
    assert standalone.returncode == 0, standalone.stderr[-3000:]
    evaluated = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert abs(evaluated["eval/reward_accuracy"] - rows[-1]["eval/reward_accuracy"]) < 1e-9
    assert (tmp_path / "run" / "config.yaml").read_bytes() == config_before
    winrate = run_cli("launch.eval", "winrate", f"output_dir={tmp_path / 'run'}", "eval.max_prompts=40")
    assert winrate.returncode == 0, winrate.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "winrate.json").read_text())
    assert result["n"] == 40 and result["wins"] + result["ties"] + result["losses"] == 40
    report = run_cli("launch.report", str(tmp_path))
    assert report.returncode == 0, report.stderr[-2000:]


def test_sft_then_dpo_chain_uses_the_sft_model_as_policy_and_reference(assets, tmp_path):
    out = tmp_path / "chain"
    chain = {"experiment": "sft_then_dpo", "sft_first.max_steps": 3, "cluster.nproc_per_node": 2}
    # Its own cache: the shared one holds the base model's log-probs, which DPO on the SFT model
    # must refuse (see test_precompute_then_train_reuses_cache_and_eval_matches).
    rows = train(assets, out, **chain, **{"reference.cache_dir": tmp_path / "ref"})
    sft_rows = train_rows([json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()])
    assert len(sft_rows) == 3 and "reward_accuracy" not in sft_rows[0]
    info = json.loads((out / "run_info.json").read_text())
    dpo_cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert dpo_cfg["model"]["path"] == str(out / "sft" / "final") and dpo_cfg["stage"] == "dpo"
    assert info["reference"]["computed"] is True  # a fresh reference pass over the SFT model
    assert abs(train_rows(rows)[0]["loss"] - math.log(2)) < 1e-6  # policy == reference at step 0


def test_bad_data_on_two_ranks_is_one_line_exit_2(assets, tmp_path):
    """Every bad record is logged as PATH:LINE: reason (rank 0 reads the data), then one error line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "chosen": "2"}\n{"prompt": "2+2=", "chosen": "4", "rejected": "4"}\n')
    result = run_cli("launch.train", *overrides(assets, tmp_path / "run", **{"data.train_path": bad, "cluster.nproc_per_node": 2}))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        f"dpo-train: error: {bad}: 2 invalid records (first: {bad}:1: missing key 'rejected'); "
        f"fix them or set data.on_invalid=skip (run `dpo-data check {bad} --tokenizer {assets['model']}` to list all)"
    ), result.stderr[-2000:]
    logged = [line.split(" ERROR ", 1)[1] for line in lines if " dpo_dist.data ERROR " in line]
    assert logged == [f"{bad}:1: missing key 'rejected'", f"{bad}:2: chosen and rejected are identical"], lines
    assert "Traceback" not in result.stderr


def test_discarded_engines_free_their_memory(assets, tmp_path):
    """The reference pass's model is gone before the policy is built, and a released policy engine
    leaves nothing behind (ZeRO-3 otherwise keeps every engine alive through a module-level stack)."""
    from dpo_dist.config import nest_dotted
    from tests.helpers import TINY_RUN, run_ranks

    nested = nest_dotted({**TINY_RUN, "model.path": str(assets["model"]), "data.train_path": str(assets["train"]),
                          "data.eval_path": None, "reference.cache_dir": str(tmp_path / "cache"),
                          "output_dir": str(tmp_path / "run")})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"config": nested, "out": str(tmp_path)}))
    run_ranks(["tests/integration/release_worker.py", str(spec)], 2, label="release")
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["policy_built"]["engines"] == 1, report  # the measurement sees a live engine
        assert report["after_reference_pass"]["engines"] == 0, report
        assert report["after_release"]["engines"] == 0, report
        assert not report["parameter_alive"], report
        # What stays is the tokenized data and the cached reference log-probs, not model state.
        assert report["after_release"]["tensor_bytes"] <= report["after_reference_pass"]["tensor_bytes"] + 4096, report


@pytest.mark.parametrize("dtype", ["auto", "bf16"])
def test_gpu_engine_smoke_script_runs_on_cpu(tmp_path, dtype):
    """tests/gpu/engine_smoke.py (what the GPU test runs) works here too, so it cannot rot unseen; in
    bf16 DeepSpeed sums the gradients of the step's micro-batches in fp32 (deepspeed.grad_accum_dtype)."""
    out = tmp_path / "smoke.json"
    result = subprocess.run([sys.executable, "tests/gpu/engine_smoke.py", "cpu", str(out), dtype], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["backend"] == "sdpa"
    assert report["dtype"] == ("torch.bfloat16" if dtype == "bf16" else "torch.float32")
    assert report["grad_accum_dtype"] == "torch.float32"
    assert abs(report["losses"][0] - math.log(2)) < 1e-6  # policy = reference at step 0, exactly
    memory = report["allocated"]
    assert memory["during"] > 0 and memory["after"] == memory["before"], memory


def test_each_eval_file_gets_its_own_cache_beside_one_train_pass(assets, tmp_path):
    """Without reference.cache_dir the cache directory is keyed by the train inputs; each eval file
    gets its own eval-<fingerprint> directory inside it: another eval file neither meets the old
    one's cache (refused as "built from other inputs") nor costs the train pass again."""
    from tests.helpers import make_pairs_jsonl

    env = {"DPO_DIST_CACHE": str(tmp_path / "root")}
    other_eval = make_pairs_jsonl(tmp_path / "other_eval.jsonl", 6, seed=11)
    logs = []
    for eval_path in (assets["eval"], other_eval, assets["eval"]):
        settings = {"output_dir": tmp_path / "pre", "data.eval_path": eval_path}
        result = run_cli("launch.precompute", *tiny_run_overrides(assets, settings), env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        logs.append(result.stderr)
    (cache,) = (tmp_path / "root" / "reference").iterdir()
    assert len(list(cache.glob("eval-*/manifest.json"))) == 2
    train_passes = [log.count(f"reference cache {cache} complete: computed") for log in logs]
    assert train_passes == [1, 0, 0], logs[1][-2000:]


def test_reference_pass_replicates_a_model_that_fits_and_partitions_on_request(assets, tmp_path):
    """Issue 5: ZeRO-3 only for a model no single device holds, plain forwards otherwise. Both ways
    write the same numbers on 2 ranks (replicated ranks run no collectives and no filler forwards
    when their shares differ; partitioned ones must)."""
    import pyarrow as pa

    def precompute(partition: str) -> tuple[pa.Table, str]:
        cache = tmp_path / partition
        settings = {"output_dir": tmp_path / f"pre_{partition}", "reference.cache_dir": cache,
                    "reference.partition": partition, "cluster.nproc_per_node": 2, "data.eval_path": "null"}
        result = run_cli("launch.precompute", *tiny_run_overrides(assets, settings))
        assert result.returncode == 0, result.stderr[-2000:]
        manifest = json.loads((cache / "manifest.json").read_text())
        tables = [pa.ipc.open_file(str(cache / name)).read_all().replace_schema_metadata(None) for name in sorted(manifest["shards"])]
        return pa.concat_tables(tables), result.stderr

    auto, auto_log = precompute("auto")  # the tiny model fits: replicated
    zero3, zero3_log = precompute("zero3")
    assert "reference pass: a whole copy of the model per rank (reference.partition=auto: weights" in auto_log
    assert "reference pass: partitioned with ZeRO-3 (reference.partition=zero3)" in zero3_log
    assert auto.num_rows == zero3.num_rows > 0
    for column in auto.column_names:
        assert auto.column(column).to_pylist() == zero3.column(column).to_pylist(), column


def test_rerunning_a_finished_run_does_not_train_again(assets, tmp_path):
    """A finished run (last step logged, final/ exported) re-run with the same command returns at
    once: without a checkpoint it trained from scratch again and re-exported."""
    out = tmp_path / "run"
    settings = {"train.max_steps": 2, "train.checkpoint_every": 100}
    rows = train(assets, out, **settings)
    exported = (out / "final" / "model.safetensors").stat().st_mtime_ns
    result = run_cli("launch.train", *overrides(assets, out, **settings))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already finished: step 2 trained and final/ exported; nothing to do" in result.stderr
    assert [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] == rows
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == exported
    longer = train(assets, out, **{**settings, "train.max_steps": 3})  # a longer run is not finished
    assert [r["step"] for r in train_rows(longer)] == [1, 2, 3]


def test_train_epochs_sets_the_steps_from_the_data_and_can_grow(assets, tmp_path):
    """train.epochs=0.25 over the 64 training pairs at 8 a step is 2 steps (whatever max_steps
    says); each row says how far through the data it is; 0.375 epochs then resumes to 3."""
    out = tmp_path / "epochs"
    args = overrides(assets, out, **{"train.epochs": 0.25, "train.max_steps": 50, "train.checkpoint_every": 1})
    result = run_cli("launch.train", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "schedule: 2 steps x 8 pairs = 0.25 epochs of the 64 training pairs (train.epochs=0.25)" in result.stderr
    rows = train_rows([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
    assert [(r["step"], r["epoch"]) for r in rows] == [(1, 0.125), (2, 0.25)]
    assert json.loads((out / "run_info.json").read_text())["max_steps"] == 2
    again = run_cli("launch.train", *args)  # finished: nothing to do
    assert again.returncode == 0 and "already finished: step 2 trained" in again.stderr, again.stderr[-3000:]
    longer = run_cli("launch.train", *overrides(assets, out, **{"train.epochs": 0.375, "train.checkpoint_every": 1}))
    assert longer.returncode == 0, longer.stderr[-3000:]
    rows = train_rows([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
    assert [(r["step"], r["epoch"]) for r in rows] == [(1, 0.125), (2, 0.25), (3, 0.375)]
    assert json.loads((out / "run_info.json").read_text())["resumed_from_step"] == 2
    # The 2-step final/ went at the start (a job stopped during the 3-step export would otherwise
    # leave a run that looks finished with step 2's weights); the 3-step export replaced it.
    assert "removing " + str(out / "final") in longer.stderr and (out / "final" / "config.json").is_file()
    report = run_cli("launch.report", str(out))
    assert report.returncode == 0 and "3/3" in report.stdout, report.stdout + report.stderr[-2000:]


def test_a_run_chat_template_trains_chat_data_on_a_base_tokenizer_and_is_exported(assets, tmp_path):
    """data.chat_template: chat records on a model whose tokenizer has no template (SFT then DPO on
    a base model) train, and final/ carries the template, so generation and serving render alike."""
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(assets["model"], base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    chat = tmp_path / "chat.jsonl"
    with open(chat, "w") as f:
        for a in range(32):
            row = {"prompt": [{"role": "user", "content": f"{a}+1="}], "chosen": str(a + 1), "rejected": str(a + 2)}
            f.write(json.dumps(row) + "\n")
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    # Its own reference cache: the module's shared one holds the assets model's log-probs.
    settings = {"model.path": base, "data.train_path": chat, "data.eval_path": "null", "train.max_steps": 1, "reference.cache_dir": tmp_path / "ref"}
    refused = run_cli("launch.train", *overrides(assets, tmp_path / "none", **settings))
    assert refused.returncode == 2 and "chat messages need a tokenizer with a chat template" in refused.stderr.strip().splitlines()[-1]
    out = tmp_path / "run"
    result = run_cli("launch.train", *overrides(assets, out, **settings, **{"data.chat_template": template}))
    assert result.returncode == 0, result.stderr[-3000:]
    exported = AutoTokenizer.from_pretrained(out / "final", local_files_only=True)
    assert exported.chat_template == template.read_text()


def test_a_checkpoint_resumes_on_another_number_of_ranks(assets, tmp_path):
    """A run checkpointed by 2 ranks goes on on 1 (resubmitted on fewer GPUs): the ZeRO-3 partitions
    are converted once to DeepSpeed's universal checkpoint, and the steps after it are the
    uninterrupted 2-rank run's (world-size invariance; a constant lr, so that the shorter first
    job's schedule is the same)."""
    settings = {"train.checkpoint_every": 2, "optim.schedule": "constant", "optim.warmup_steps": 0}
    full = train_rows(train(assets, tmp_path / "full", **settings, **{"train.max_steps": 4, "cluster.nproc_per_node": 2}))
    moved = tmp_path / "moved"
    train(assets, moved, **settings, **{"train.max_steps": 2, "cluster.nproc_per_node": 2})
    result = run_cli("launch.train", *overrides(assets, moved, **settings, **{"train.max_steps": 4, "cluster.nproc_per_node": 1}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on another number of ranks: converting it to a universal checkpoint" in result.stderr
    assert (moved / "checkpoints" / "step_00000002" / "universal" / "COMPLETE").exists()
    rows = train_rows([json.loads(line) for line in (moved / "metrics.jsonl").read_text().splitlines()])
    assert [r["step"] for r in rows] == [1, 2, 3, 4] == [r["step"] for r in full]
    for a, b in zip(full[2:], rows[2:]):
        for key in ("loss", "chosen_reward", "rejected_reward", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), (a["step"], key, a[key], b[key])
    assert abs(rows[3]["chosen_reward"]) + abs(rows[3]["rejected_reward"]) > 1e-3, rows[3]  # it trained: ratios moved
