"""LoRA DPO through `dpo-train` on CPU (PEFT under DeepSpeed ZeRO-3, gloo): learning, frozen base,
reference = base with adapters disabled, merged and adapter-only exports, checkpoint/resume, and
DPO that continues an adapter export against its starting copy."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from dpo_dist.config import ConfigError, config_from_dict
from tests.helpers import make_pairs_jsonl, make_tiny_model_dir, run_cli, tiny_run_overrides

pytestmark = pytest.mark.integration

LORA = {"model.lora.r": 8, "model.lora.alpha": 16, "model.lora.target_modules": "[q_proj,v_proj,up_proj,down_proj]"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {
        "model": make_tiny_model_dir(root / "model"),
        "train": make_pairs_jsonl(root / "train.jsonl", 64, seed=1),
        # pairs_per_step of them: every step sees the same batch, so the loss must go down.
        "one_batch": make_pairs_jsonl(root / "one_batch.jsonl", 8, seed=3),
        "eval": make_pairs_jsonl(root / "eval.jsonl", 8, seed=2),
    }


def train(assets, out, **extra) -> list[dict]:
    settings = {
        "output_dir": out,
        "optim.lr": 1e-2,
        "optim.schedule": "constant",
        "reference.cache_dir": out.parent / f"{out.name}_ref",
        "cluster.nproc_per_node": 2,
        **LORA,
        **extra,
    }
    result = run_cli("launch.train", *tiny_run_overrides(assets, settings), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (out / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, rows) if "loss" in row]


def checkpoint_state(out, step: int) -> dict[str, torch.Tensor]:
    """fp32 weights of a run's DeepSpeed checkpoint, keyed like the PEFT model (``model.`` dropped)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=f"step_{step:08d}")
    return {k.removeprefix("model."): v for k, v in state.items()}


def peft_policy(model_dir, lora_state: dict[str, torch.Tensor]):
    """The trained policy rebuilt on CPU: the base model with the checkpoint's adapter weights, unmerged."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    targets = LORA["model.lora.target_modules"].strip("[]").split(",")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    missing = model.load_state_dict(lora_state, strict=False)
    assert not [k for k in missing.missing_keys if "lora_" in k]
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


STEPS = 16


@pytest.fixture(scope="module")
def online_run(assets, tmp_path_factory):
    """LoRA DPO with the online reference (the policy with adapters disabled) on one repeated batch."""
    out = tmp_path_factory.mktemp("online") / "run"
    run = {"train.max_steps": STEPS, "train.checkpoint_every": STEPS // 2, "reference.mode": "online"}
    return out, train(assets, out, **run, **{"data.train_path": assets["one_batch"]})


def test_lora_dpo_learns_only_adapters_and_merged_export_matches(assets, online_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, rows = online_run
    losses = [r["loss"] for r in rows]
    # Step 0: B = 0, so the policy is the base model, which is the online reference: loss = ln 2.
    assert abs(losses[0] - math.log(2)) < 1e-5, losses[0]
    assert sum(losses[-3:]) / 3 < 0.85 * math.log(2), losses  # measured: 0.53
    assert rows[-1]["reward_accuracy"] == 1.0, rows[-1]

    base = AutoModelForCausalLM.from_pretrained(assets["model"])
    base_state = base.state_dict()
    trained = checkpoint_state(out, STEPS)
    lora = {k: v for k, v in trained.items() if "lora_" in k}
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # adapters moved
    # The frozen base is model.path itself: checkpoints hold only the adapters.
    assert all("lora_" in key for key in trained), [k for k in trained if "lora_" not in k][:3]

    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not any("lora" in k for k in merged.state_dict())
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.k_proj.weight"):
        torch.testing.assert_close(merged.state_dict()[key], base_state[key], rtol=0, atol=0)  # not adapted
    ids = AutoTokenizer.from_pretrained(out / "final")("12+34=46", return_tensors="pt").input_ids
    want = logits(peft_policy(assets["model"], lora), ids)
    torch.testing.assert_close(logits(merged, ids), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, logits(base, ids), atol=1e-3)  # the export holds the trained policy

    # dpo-export of the last checkpoint (adapters only) rebuilds the same merged model.
    exported = out.parent / "exported"
    result = run_cli("launch.export", str(out / "checkpoints" / f"step_{STEPS:08d}"), "--out", str(exported))
    assert result.returncode == 0, result.stderr[-2000:]
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(exported), ids), want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def adapter_run(assets, online_run, tmp_path_factory):
    """The online run resumed from its step-8 checkpoint with the precomputed reference, exporting
    the adapter alone (model.lora.merge_on_export=false)."""
    source, _ = online_run
    out = tmp_path_factory.mktemp("adapter") / "run"
    shutil.copytree(source, out)
    shutil.rmtree(out / "checkpoints" / f"step_{STEPS:08d}")
    shutil.rmtree(out / "final")
    run = {"train.max_steps": STEPS, "train.checkpoint_every": STEPS // 2, "model.lora.merge_on_export": "false"}
    return out, train(assets, out, **run, **{"data.train_path": assets["one_batch"]})


def test_lora_resume_with_precomputed_reference_and_adapter_export(assets, online_run, adapter_run):
    """Resume the online run from its step-8 checkpoint with the precomputed reference (the base
    model's log-probs, which must equal the adapters-disabled policy's) and export the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_dist.model import load_causal_lm

    source, online_rows = online_run
    out, resumed = adapter_run
    info = json.loads((out / "run_info.json").read_text())
    assert info["resumed_from_step"] == STEPS // 2 and info["reference"]["computed"] is True
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(online_rows, resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])

    final = out / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    assert not (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), final).eval()
    ids = AutoTokenizer.from_pretrained(final)("7+8=15", return_tensors="pt").input_ids
    want = logits(policy, ids)
    merged_online = AutoModelForCausalLM.from_pretrained(source / "final")  # the same 16 steps, merged
    torch.testing.assert_close(logits(merged_online, ids), want, rtol=1e-5, atol=1e-5)
    # load_causal_lm takes an adapter directory too (dpo-eval of a run's final/): the same model.
    loaded = load_causal_lm(str(final), torch.float32, {"zero_optimization": {"stage": 0}}).eval()
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=0)


CONTINUED_STEPS = 6


def test_dpo_continues_an_adapter_export_against_it_as_the_reference(assets, adapter_run, tmp_path):
    """model.path = the adapter-only final/ of a LoRA run (base_model_name_or_path made relative to
    the adapter's directory): DPO trains that adapter further. The online reference is its frozen
    starting copy, so step 1 has loss ln 2 and zero rewards although the adapter is far from the
    base (the adapters-disabled reference of a fresh adapter would be wrong); it trains; checkpoints
    hold the trained adapter alone; the adapter export names the base absolute and loads. A resume
    from step 3 with the precomputed reference (the adapter directory scored as base + adapter)
    repeats the online run's losses, and its merged final/ is base + the trained adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "sft_adapter"
    shutil.copytree(adapter_run[0] / "final", adapter)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = os.path.relpath(assets["model"], adapter)  # not from the ranks' directory
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    base = AutoModelForCausalLM.from_pretrained(assets["model"])
    ids = AutoTokenizer.from_pretrained(adapter)("12+34=46", return_tensors="pt").input_ids
    start = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), adapter).eval()
    assert not torch.allclose(logits(start, ids), logits(base, ids), atol=1e-2)  # a trained adapter

    out = tmp_path / "online"
    # The helper's model.lora settings are the adapter's own: given again, they are accepted.
    # At the fresh adapters' 1e-2 Adam's first steps overshoot from this already trained adapter.
    run = {"model.path": adapter, "train.max_steps": CONTINUED_STEPS, "train.checkpoint_every": CONTINUED_STEPS // 2,
           "data.train_path": assets["one_batch"], "optim.lr": 1e-3}
    rows = train(assets, out, **run, **{"reference.mode": "online", "model.lora.merge_on_export": "false"})
    first, losses = rows[0], [r["loss"] for r in rows]
    assert abs(first["loss"] - math.log(2)) < 1e-6, first
    assert abs(first["chosen_reward"]) < 1e-6 and abs(first["rejected_reward"]) < 1e-6, first
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < math.log(2) - 0.01, losses  # measured: 0.681

    trained = checkpoint_state(out, CONTINUED_STEPS)
    assert trained and all(".lora_A.default." in k or ".lora_B.default." in k for k in trained), list(trained)[:3]
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), adapter)
    result = policy.load_state_dict(trained, strict=False)
    assert not [k for k in result.missing_keys if "lora_" in k] and not result.unexpected_keys
    want = logits(policy.eval(), ids)
    assert not torch.allclose(want, logits(start, ids), atol=1e-3)  # the adapter moved
    exported = out / "final"  # the trained adapter alone, without the reference copy, on its base
    assert json.loads((exported / "adapter_config.json").read_text())["base_model_name_or_path"] == str(assets["model"].resolve())
    assert sorted(p.name for p in exported.iterdir() if p.is_dir()) == []
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), exported).eval()
    torch.testing.assert_close(logits(loaded, ids), want, rtol=1e-5, atol=1e-5)

    resumed_dir = tmp_path / "precomputed"
    shutil.copytree(out, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / f"step_{CONTINUED_STEPS:08d}")
    shutil.rmtree(resumed_dir / "final")
    resumed = train(assets, resumed_dir, **run)
    info = json.loads((resumed_dir / "run_info.json").read_text())
    assert info["resumed_from_step"] == CONTINUED_STEPS // 2 and info["reference"]["computed"] is True
    for a, b in zip(rows, resumed, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(resumed_dir / "final"), ids), want, rtol=1e-5, atol=1e-5)


def test_dpo_eval_of_a_lora_run_with_the_online_reference(online_run):
    """`dpo-eval output_dir=RUN` takes the run's LoRA and reference.mode=online settings: the policy is
    the merged final/ (no adapters to disable), so the reference is model.path loaded on its own, and
    the numbers are the run's own final eval (where the reference was the adapters-disabled policy)."""
    out, _ = online_run
    rows = [json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines()]
    final_eval = [row for row in rows if "eval/loss" in row][-1]
    result = run_cli("launch.eval", f"output_dir={out}", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["policy_source"] == str(out / "final") and final_eval["step"] == STEPS
    for key in ("eval/loss", "eval/reward_accuracy", "eval/reward_margin"):
        assert abs(evaluated[key] - final_eval[key]) <= 1e-5 * max(1.0, abs(final_eval[key])), (key, evaluated[key], final_eval[key])


QLORA_STEPS = 8


def test_qlora_trains_on_a_4bit_base_resumes_exactly_and_merges_into_the_unquantized_base(assets, tmp_path):
    """model.lora.quantize=nf4 under ZeRO-3 on 2 ranks with the precomputed reference: the reference
    is the same 4-bit base (step-1 loss ln 2 exactly, and the cache says nf4), the loss goes down,
    a resume from the step-4 checkpoint repeats the losses, final/ is the unquantized base plus
    rank-r updates on the adapted layers only, and dpo-export of the last checkpoint equals it."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run = {
        "train.max_steps": QLORA_STEPS,
        "train.checkpoint_every": QLORA_STEPS // 2,
        "model.lora.quantize": "nf4",
        "data.train_path": assets["one_batch"],
    }
    rows = train(assets, out, **run)
    losses = [r["loss"] for r in rows]
    assert abs(losses[0] - math.log(2)) < 1e-6, losses[0]  # an unquantized reference is ~0.3 here
    assert losses[-1] < 0.85 * math.log(2), losses  # measured: 0.50
    info = json.loads((out / "run_info.json").read_text())
    manifest = json.loads((tmp_path / "run_ref" / "manifest.json").read_text())
    assert info["reference"]["computed"] is True and manifest["settings"]["quantize"] == "nf4"

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(out, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / f"step_{QLORA_STEPS:08d}")
    shutil.rmtree(resumed_dir / "final")
    resumed = train(assets, resumed_dir, **run, **{"reference.cache_dir": tmp_path / "run_ref"})
    assert json.loads((resumed_dir / "run_info.json").read_text())["resumed_from_step"] == QLORA_STEPS // 2
    assert [r["loss"] for r in resumed] == losses  # the base re-quantizes identically

    base = AutoModelForCausalLM.from_pretrained(assets["model"]).state_dict()
    final = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert set(final) == set(base)
    adapted = ("q_proj", "v_proj", "up_proj", "down_proj")
    for key, weight in base.items():
        delta = final[key] - weight
        if any(f"{name}.weight" in key for name in adapted):
            rank = torch.linalg.matrix_rank(delta, atol=1e-6)
            assert delta.abs().max() > 0 and 0 < rank <= 8, (key, rank)  # W + (alpha/r) B A, unquantized W
        else:
            assert delta.abs().max() == 0, key  # embeddings, k/o/gate projections, norms: the base's own

    exported = tmp_path / "exported"
    result = run_cli("launch.export", str(out / "checkpoints" / f"step_{QLORA_STEPS:08d}"), "--out", str(exported))
    assert result.returncode == 0, result.stderr[-2000:]
    offline = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    for key, weight in final.items():
        torch.testing.assert_close(offline[key], weight, rtol=0, atol=1e-7)


def test_qlora_settings_are_checked():
    with pytest.raises(ConfigError, match="model.lora.quantize: got '4bit', expected one of none, nf4, fp4"):
        config_from_dict({"model": {"lora": {"r": 8, "quantize": "4bit"}}})
    with pytest.raises(ConfigError, match="model.lora.quantize: nf4 \\(QLoRA\\) trains adapters .* set model.lora.r"):
        config_from_dict({"model": {"lora": {"quantize": "nf4"}}})


def test_qlora_quantization_config_and_missing_bitsandbytes(monkeypatch):
    """QLoRA's recipe: 4-bit base in the run's dtype for compute and storage (so ZeRO-3 partitions it
    with the other weights), double-quantized constants; no bitsandbytes is one clear line."""
    pytest.importorskip("bitsandbytes")
    import sys

    from dpo_dist.model import quantization_config

    assert quantization_config("none", torch.bfloat16) is None
    q = quantization_config("fp4", torch.bfloat16)
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "fp4", True)
    assert q.bnb_4bit_compute_dtype == q.bnb_4bit_quant_storage == torch.bfloat16
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match="model.lora.quantize=nf4 needs bitsandbytes: pip install bitsandbytes"):
        quantization_config("nf4", torch.float32)


def test_an_adapter_to_continue_is_checked_before_any_work(assets, tmp_path):
    """An adapter whose base model is not here, or LoRA settings that differ from the adapter's,
    are one line before the reference pass. sft_then_dpo always merges its SFT model (its DPO stage
    trains a fresh adapter from it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(assets["model"]), LoraConfig(r=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(adapter)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": "org/absent"}))
    cache = tmp_path / "ref"
    settings = {"output_dir": tmp_path / "run", "model.path": adapter, "reference.cache_dir": cache}
    result = run_cli("launch.train", *tiny_run_overrides(assets, settings), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"dpo-train: error: {adapter / 'adapter_config.json'}: base model base_model_name_or_path='org/absent' not found: "
    ), line
    result = run_cli("launch.train", *tiny_run_overrides(assets, {**settings, "model.lora.r": 8}), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"dpo-train: error: model.lora.r=8: model.path={adapter} is a LoRA adapter with r=4 (its adapter_config.json), "
        "whose training this run continues with its own settings; leave model.lora.r unset"
    )
    assert not cache.exists()  # nothing computed

    cfg = config_from_dict({"output_dir": "x", "sft_first": {"max_steps": 2}, "model": {"lora": {"r": 4, "merge_on_export": False}}})
    sft, dpo = cfg.stages()
    assert sft.model.lora.merge_on_export is True and dpo.model.path == "x/sft/final"
    assert dpo.model.lora.merge_on_export is False  # the DPO result itself may stay an adapter


def test_unknown_lora_target_is_refused_before_the_reference_pass(assets, tmp_path):
    cache = tmp_path / "ref"
    settings = {"output_dir": tmp_path / "run", "reference.cache_dir": cache, **LORA,
                "model.lora.target_modules": "[q_proj,v_projj]"}
    result = run_cli("launch.train", *tiny_run_overrides(assets, settings), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("dpo-train: error: model.lora.target_modules: no module named v_projj in LlamaForCausalLM"), line
    assert "v_proj" in line and not cache.exists()
