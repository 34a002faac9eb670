"""The memory planner and step-time model (dpo_dist.memory), dpo-plan, the 70B presets, and
dpo-train's pre-launch memory check."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
import types
from dataclasses import replace

import pytest
import torch

from dpo_dist.config import config_from_dict
from dpo_dist.memory import (
    GIB,
    LORA_MODULES,
    ModelShape,
    PlanError,
    PlanSettings,
    ThroughputAssumptions,
    min_gpus_that_fit,
    plan_memory,
    preset_shape_path,
    project_step,
    suggestions,
)
from tests.helpers import REPO, run_cli

PRESETS = ("llama3_1b", "llama3_8b", "llama3_70b")
# Public parameter counts of Llama 3.2 1B, Llama 3.1 8B and 70B.
PARAMS = {"llama3_1b": 1_235_814_400, "llama3_8b": 8_030_261_248, "llama3_70b": 70_553_706_496}


def shape(name: str) -> ModelShape:
    return ModelShape.from_path(preset_shape_path(name))


def settings(gpus: int, **changes) -> PlanSettings:
    return PlanSettings(gpus=gpus, gpus_per_node=8, gpu_memory_gib=80, **changes)


def hf_config(name: str) -> dict:
    values = json.loads(preset_shape_path(name).read_text())
    values.pop("_comment")
    return values


@pytest.mark.parametrize("name", PRESETS)
def test_shapes_count_what_transformers_builds(name):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**hf_config(name)))
    s = shape(name)
    assert s.num_params() == sum(p.numel() for p in model.parameters()) == PARAMS[name]
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert s.largest_module_params() == largest


def test_lora_param_count_matches_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(LlamaConfig(**hf_config("llama3_8b"))), LoraConfig(r=16, target_modules=list(LORA_MODULES)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert shape("llama3_8b").lora_params(16, LORA_MODULES) == trainable
    with pytest.raises(PlanError, match="model.lora.target_modules: lm_head"):
        shape("llama3_8b").lora_params(16, ["q_proj", "lm_head"])


def test_shape_from_config_json_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config("llama3_8b")))
    assert ModelShape.from_path(tmp_path).num_params() == PARAMS["llama3_8b"]
    with pytest.raises(PlanError, match="no config.json"):
        ModelShape.from_path(tmp_path / "missing")
    with pytest.raises(PlanError, match="mixture-of-experts"):
        ModelShape.from_hf_config({**hf_config("llama3_8b"), "num_local_experts": 8})
    with pytest.raises(PlanError, match="no intermediate_size"):
        ModelShape.from_hf_config({k: v for k, v in hf_config("llama3_8b").items() if k != "intermediate_size"})


def deepspeed_live_estimate_gib(model, gpus: int) -> float:
    """Per-GPU GiB that ``estimate_zero3_model_states_mem_needs_all_live`` prints for no offload."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=gpus, num_nodes=1)
    row = next(line for line in out.getvalue().splitlines() if "offload_param=none, offload_optimizer=none, zero_init=1" in line)
    return float(re.findall(r"([\d.]+)GB", row)[1])


@pytest.mark.parametrize("gpus", [1, 2])
def test_model_states_agree_with_deepspeeds_live_estimate(gpus):
    """DeepSpeed's estimate from a live model (20M params) vs the planner's model states for its
    shape: the same 18 B/param + 4 B x largest module, plus the fp32 sub-group copy the planner adds
    (see the next test)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    plan = plan_memory(ModelShape.from_hf_config(cfg.to_dict()), settings(gpus, dtype_bytes=2))
    theirs = deepspeed_live_estimate_gib(model, gpus)
    transient = plan.item("optimizer-step fp32 gradients") / GIB
    assert plan.model_state_bytes() / GIB == pytest.approx(theirs + transient, abs=0.0051)  # DeepSpeed prints 2 decimals


@pytest.mark.parametrize("name", PRESETS)
def test_model_states_agree_with_deepspeeds_estimate(name):
    """Without offload DeepSpeed counts 18 B/param (bf16 weights, fp32 gradient partitions as with
    the default deepspeed.grad_accum_dtype=fp32, fp32 master, m, v) + 4 B x the largest module; the
    planner adds the fp32 copy of one 1e9-element sub-group that DeepSpeed makes for the Adam step.
    With optimizer offload both are b*P/N + 4*largest on the GPU. On the host DeepSpeed counts
    16 B/param (fp32 master, m, v, gradients; without its 1.5 buffer factor), the planner 20: it
    adds the partitions the micro-batch gradients are summed in."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    s = shape(name)
    for gpus in (8, 32, 64, 128, 512):
        for offload in (False, True):
            plan = plan_memory(s, settings(gpus, offload_optimizer=offload))
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                s.num_params(), s.largest_module_params(), num_gpus_per_node=8, num_nodes=gpus // 8,
                cpu_offload=offload, cpu_offload_params=False, zero_init=True, additional_buffer_factor=1.0,
            )
            transient = plan.item("optimizer-step fp32 gradients")
            assert plan.model_state_bytes() == pytest.approx(gpu + transient, rel=1e-6), (name, gpus, offload)
            if offload:
                assert transient == 0 and plan.host_per_node == pytest.approx(cpu * 20 / 16, rel=1e-6), (name, gpus)


def test_70b_fits_from_32_gpus_and_states_are_18_bytes_per_param():
    s = shape("llama3_70b")
    at64 = plan_memory(s, settings(64))
    states = ("parameters", "gradients", "optimizer states")
    assert sum(at64.item(n) for n in states) == pytest.approx(18 * PARAMS["llama3_70b"] / 64)
    bf16_sums = plan_memory(s, settings(64, grad_accum_bytes=2))  # deepspeed.grad_accum_dtype=bf16
    assert sum(bf16_sums.item(n) for n in states) == pytest.approx(16 * PARAMS["llama3_70b"] / 64)
    assert at64.fits and 40 * GIB < at64.peak < 55 * GIB
    h100 = PlanSettings(gpus=64, gpus_per_node=8, gpu_memory_gib=79.6)  # what an "80GB" H100 reports
    assert plan_memory(s, h100).verdict().startswith(f"fits: peak {at64.peak / GIB:.1f} of 79.6 GiB per GPU")  # not "of 80"
    at8 = plan_memory(s, settings(8))
    assert not at8.fits and "exceeds the 80 GiB of a GPU (cluster.gpu_memory_gb) on 8 GPUs" in at8.verdict()
    assert min_gpus_that_fit(s, settings(8)) == 32
    assert "32 GPUs" in suggestions(s, settings(8))
    assert min_gpus_that_fit(s, settings(8, grad_accum_bytes=2)) == 24  # 2 B/param less


def test_whole_block_fetch_units_count_a_block_where_it_is_the_largest_piece():
    """With deepspeed.leaf_modules (default) ZeRO-3 gathers a whole block at once: for Llama 3 the LM
    head is still the largest piece, for a small-vocabulary model the block is."""
    s = shape("llama3_70b")
    assert s.largest_fetch_params(True) == s.largest_fetch_params(False) == s.largest_module_params() == 128256 * 8192
    small_vocab = ModelShape.from_hf_config({**hf_config("llama3_1b"), "vocab_size": 512})
    assert small_vocab.largest_fetch_params(True) == small_vocab.layer_params() > small_vocab.largest_module_params()
    per_module = plan_memory(small_vocab, settings(8, whole_blocks=False)).item("ZeRO-3 gathered params + buckets")
    blocks = plan_memory(small_vocab, settings(8)).item("ZeRO-3 gathered params + buckets")
    assert blocks - per_module == 2 * 2 * (small_vocab.layer_params() - small_vocab.largest_module_params())
    cfg = config_from_dict({"deepspeed": {"leaf_modules": "none"}})
    assert PlanSettings.from_config(cfg).whole_blocks is False and PlanSettings.from_config(config_from_dict({})).whole_blocks


def test_offload_checkpointing_lora_and_reference_move_the_right_items():
    s, n = shape("llama3_70b"), 64
    base = plan_memory(s, settings(n))
    offload = plan_memory(s, settings(n, offload_optimizer=True))
    assert offload.item("optimizer states") == offload.item("gradients") == 0
    assert offload.host_per_node == pytest.approx(8 * 20 * PARAMS["llama3_70b"] / n)
    assert not plan_memory(s, settings(n, activation_checkpointing=False)).fits  # 80 layers of 8k tokens
    assert plan_memory(s, settings(n, micro_batch_tokens=16384)).item("activations (saved)") > 1.9 * base.item("activations (saved)")

    copy = plan_memory(s, settings(n, reference="copy"))
    assert copy.item("reference model (online copy)") > 2 * PARAMS["llama3_70b"] / n
    lora = plan_memory(s, settings(n, lora_r=16, reference="adapters"))
    assert lora.item("reference model") == 0 and lora.item("optimizer states") < 0.01 * base.item("optimizer states")
    assert lora.item("parameters") == base.item("parameters")  # the frozen base is still partitioned
    host_limited = plan_memory(s, settings(32, offload_optimizer=True, host_memory_gb=256))
    assert not host_limited.fits and "cluster.mem_gb=256" in host_limited.verdict()
    with pytest.raises(PlanError, match="ZeRO stage 3 only"):
        plan_memory(s, settings(n, zero_stage=2))


@pytest.mark.parametrize(("name", "lora_r"), [("llama3_1b", 0), ("llama3_8b", 0), ("llama3_8b", 16)])
def test_persistent_tensors_follow_deepspeeds_rule(name, lora_r, monkeypatch):
    """DeepSpeed's own marking (numel <= threshold, tensor by tensor, no total cap) on the model
    transformers builds (a tied 1B, an untied 8B, 8B with PEFT adapters) persists exactly the
    elements the planner counts from the shape, at thresholds on either side of tensor sizes."""
    from deepspeed.runtime.zero import parameter_offload
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(parameter_offload, "print_rank_0", lambda *args, **kwargs: None)  # needs a process group
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**hf_config(name)))
        if lora_r:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=lora_r, target_modules=list(LORA_MODULES)))
    for param in model.parameters():
        param.ds_numel = param.numel()
    s = shape(name)
    sizes = sorted({numel for _, numel, _ in s.parameter_tensors(lora_r, LORA_MODULES)})
    assert s.num_params() == PARAMS[name] and len(sizes) > 4
    for threshold in (0, *(n + d for n in sizes for d in (-1, 0)), 100_000, 10**9):
        persistent = parameter_offload.DeepSpeedZeRoOffload.mark_persistent_parameters(
            types.SimpleNamespace(module=model), threshold, sys.maxsize
        )
        assert sum(p.ds_numel for p in persistent) == s.persistent_params(threshold, lora_r, LORA_MODULES), threshold


def test_param_persistence_threshold_is_planned():
    """deepspeed.param_persistence_threshold=1e9 (as in benchmarks/README.md) keeps every 70B tensor
    but the embedding and LM head (1.05B each) gathered on every GPU: 127.5 GiB, which fits on no
    number of GPUs. The default (1e5) keeps only the 161 RMSNorm weights."""
    from launch.plan import compose_config, plan_for

    cfg, path = compose_config(["experiment=llama3_70b_64gpu", "deepspeed.param_persistence_threshold=1000000000"])
    s, planned, plan = plan_for(cfg, path)
    assert not plan.fits and planned.param_persistence_threshold == 10**9
    vocab_hidden = 128256 * 8192
    assert plan.item("persistent parameters") == 2 * (PARAMS["llama3_70b"] - 2 * vocab_hidden)
    assert min_gpus_that_fit(s, planned) is None
    assert suggestions(s, planned) == ["deepspeed.param_persistence_threshold=100000"]

    default = plan_memory(s, replace(planned, param_persistence_threshold=100_000))
    assert default.fits and default.item("persistent parameters") == 2 * (2 * 80 + 1) * 8192
    at = dict(param_persistence_threshold=10**9)
    assert plan_memory(shape("llama3_8b"), settings(8, **at)).item("persistent parameters") == 2 * PARAMS["llama3_8b"]
    copy = plan_memory(shape("llama3_8b"), settings(8, reference="copy", **at))
    assert copy.item("persistent parameters") == 2 * 2 * PARAMS["llama3_8b"]  # the online reference is a second engine
    fp32 = plan_memory(shape("llama3_8b"), settings(8, dtype_bytes=4, grad_accum_bytes=4, **at))
    assert fp32.item("persistent parameters") == 4 * PARAMS["llama3_8b"]


def test_lora_counts_no_gradient_for_the_frozen_fetch_unit():
    """Under LoRA the largest fetch unit (the 70B LM head) is frozen: it is gathered but gets no
    gradient. The largest gradient of one module is the down_proj adapters, r x (28672 + 8192)."""
    s = shape("llama3_70b")
    full = plan_memory(s, settings(64, whole_blocks=False))
    lora = plan_memory(s, settings(64, whole_blocks=False, lora_r=16, reference="adapters"))
    largest, adapters = 128256 * 8192, 16 * (28672 + 8192)
    dropped = full.item("ZeRO-3 gathered params + buckets") - lora.item("ZeRO-3 gathered params + buckets")
    assert dropped == 2 * (largest - adapters) and 1.9 * GIB < dropped < 2 * GIB
    assert "0.6M adapter grads" in next(i.detail for i in lora.items if i.name == "ZeRO-3 gathered params + buckets")


def test_memory_table_pairs_items_by_name(monkeypatch):
    """tools/plan.py lines plans up by item name: a preset with items the others lack (here the
    sdpa backend's copies, in the middle column) gets its own rows, "-" elsewhere, and no value shifts."""
    import tools.plan

    composed = tools.plan.preset_settings
    masked = tools.plan.PRESETS[1]

    def preset_settings(name):
        s, pairs = composed(name)
        return (replace(s, sdpa_backend=True) if name == masked else s), pairs

    monkeypatch.setattr(tools.plan, "preset_settings", preset_settings)
    s = shape("llama3_70b")
    table = tools.plan.memory_table(s)
    rows = {cells[0]: cells[1:] for line in table.splitlines()[2:] for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    plans = [plan_memory(s, preset_settings(name)[0]) for name in tools.plan.PRESETS]
    for column, plan in enumerate(plans):
        for item in plan.items:
            assert rows[item.name][column] == f"{item.bytes / GIB:.2f}", (item.name, column)
    assert rows["sdpa per-sequence copies"][0] == rows["sdpa per-sequence copies"][2] == "-"
    order = [list(rows).index(name) for name in ("logits chunk", "sdpa per-sequence copies", "ZeRO-3 gathered params + buckets")]
    assert order == sorted(order)  # extra rows where their plan has them, not at the end


def test_sdpa_backend_plans_its_per_sequence_copies_and_no_t_by_t_matrix():
    """model.attn_backend=sdpa runs one fused call per sequence (attention._sdpa_per_sequence): per
    kept layer each sequence's output (saved by SDPA) besides the concatenated one; with fp32
    weights and grouped kv heads (Llama 3 70B: 64 heads, 8 kv heads) also k and v expanded to every
    query head, plus their gradients in the layer being back-propagated. bf16 runs flash on the
    grouped heads. Every layer keeps its copies without checkpointing; nothing grows with T x T."""
    s, t = shape("llama3_70b"), 8192
    output = 2 * t * 64 * 128  # bf16 x tokens x query heads x head_dim
    varlen = plan_memory(s, settings(64))
    bf16 = plan_memory(s, settings(64, sdpa_backend=True))
    assert bf16.item("sdpa per-sequence copies") == output
    assert bf16.peak - varlen.peak == pytest.approx(output * 1.1) and bf16.fits  # + 10% margin
    fp32 = settings(16, sdpa_backend=True, dtype_bytes=4, grad_accum_bytes=4)
    expanded = 2 * output  # fp32
    assert plan_memory(s, fp32).item("sdpa per-sequence copies") == 3 * expanded + 2 * expanded
    no_ckpt = plan_memory(s, replace(fp32, activation_checkpointing=False))
    assert no_ckpt.item("sdpa per-sequence copies") == 80 * 3 * expanded + 2 * expanded
    long = plan_memory(s, replace(fp32, micro_batch_tokens=4 * t))
    assert long.item("sdpa per-sequence copies") == 4 * (3 * expanded + 2 * expanded)  # linear in T
    mha = ModelShape.from_hf_config({**hf_config("llama3_1b"), "num_key_value_heads": 32})  # nothing to expand
    mha_fp32 = settings(8, sdpa_backend=True, dtype_bytes=4, grad_accum_bytes=4)
    assert plan_memory(mha, mha_fp32).item("sdpa per-sequence copies") == 4 * t * 2048


def test_host_memory_is_checked_in_gib_as_slurm_is_asked_for_it():
    """cluster.mem_gb reaches Slurm as mem_gb x 1024 MiB (slurm/submit.py), so it is GiB: 70B with
    optimizer offload on 32 GPUs pins 329 GiB (353 GB) per node, which cluster.mem_gb=340 holds."""
    s = shape("llama3_70b")
    need = plan_memory(s, settings(32, offload_optimizer=True)).host_per_node
    assert 340e9 < need < 340 * GIB
    assert plan_memory(s, settings(32, offload_optimizer=True, host_memory_gb=340)).fits
    short = plan_memory(s, settings(32, offload_optimizer=True, host_memory_gb=320))
    assert "need 329 GiB of host memory per node, cluster.mem_gb=320" in short.verdict()
    assert "deepspeed=zero3_offload (needs 657 GiB host memory per node)" in suggestions(s, settings(16))  # 706 GB


def test_smaller_micro_batch_is_suggested_only_where_the_config_accepts_it():
    """train.micro_batch_tokens must hold 2 x data.max_length: halving 16384 with max_length 8192
    would be refused by dpo-train, so the suggestion stops at the smallest accepted value."""
    cfg = config_from_dict({
        "model": {"path": "/m", "activation_checkpointing": True},
        "data": {"max_length": 6144},
        "train": {"micro_batch_tokens": 16384},
        "cluster": {"name": "slurm", "nodes": 4, "tasks_per_node": 8, "gpus_per_node": 8},
    })
    s = PlanSettings.from_config(cfg)
    assert not plan_memory(shape("llama3_70b"), s).fits
    options = suggestions(shape("llama3_70b"), s)
    assert "train.micro_batch_tokens=8192" not in options and "train.micro_batch_tokens=12288" in options
    config_from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "micro_batch_tokens": 12288}})  # accepted


def test_settings_from_config():
    cfg = config_from_dict({
        "model": {"path": "/m", "lora": {"r": 8}, "attn_backend": "sdpa"},
        "reference": {"mode": "online"},
        "cluster": {"name": "slurm", "nodes": 4, "tasks_per_node": 8, "gpus_per_node": 8, "gpu_memory_gb": 141},
        "deepspeed": {"offload_optimizer": "cpu"},
    })
    s = PlanSettings.from_config(cfg)
    assert (s.gpus, s.gpus_per_node, s.gpu_memory_gib, s.dtype_bytes) == (32, 8, 139.4, 2)  # usable of an H200
    assert (s.reference, s.lora_r, s.offload_optimizer, s.sdpa_backend) == ("adapters", 8, True, True)
    assert PlanSettings.from_config(config_from_dict({"reference": {"mode": "online"}})).reference == "copy"
    # auto takes a varlen kernel on the GPUs for bf16 weights; for fp32 only the sdpa backend runs.
    assert not PlanSettings.from_config(config_from_dict({"model": {"attn_backend": "auto", "dtype": "bf16"}})).sdpa_backend
    assert PlanSettings.from_config(config_from_dict({"model": {"attn_backend": "auto", "dtype": "fp32"}})).sdpa_backend
    assert PlanSettings.from_config(config_from_dict({"loss": {"name": "simpo", "logp_normalization": "mean"}, "reference": {"mode": "online"}})).reference == "none"


def test_online_reference_copy_is_replicated_as_the_engine_decides():
    """reference.mode=online without LoRA holds its copy as engine.OnlineReference does
    (reference.partition, auto by the rule reference.reference_replicates applies with the device's
    memory, here the plan's gpu_memory_gib): a replicated copy is the whole bf16 weights on every GPU
    for the whole run (the optimizer step included), with no persistent share or gathers of its own."""
    from dpo_dist.memory import replicate_frozen_copy

    s8, s70, p8 = shape("llama3_8b"), shape("llama3_70b"), PARAMS["llama3_8b"]
    online = {"reference": {"mode": "online"}}
    assert PlanSettings.from_config(config_from_dict(online)).reference_partition == "auto"  # the config's default
    zero3 = config_from_dict({"reference": {"mode": "online", "partition": "zero3"}})
    assert PlanSettings.from_config(zero3).reference_partition == "zero3"
    assert replicate_frozen_copy(10, 20) and not replicate_frozen_copy(10, 19)  # at most half a device
    auto = settings(8, reference="copy", reference_partition="auto")  # 80 GiB GPUs
    assert auto.reference_replicated(s8) and not auto.reference_replicated(s70)  # 15 GiB / 131 GiB of weights
    assert not replace(auto, gpu_memory_gib=24).reference_replicated(s8)
    assert replace(auto, reference_partition="replicate").reference_replicated(s70)
    assert not replace(auto, reference_partition="zero3").reference_replicated(s8)
    assert not settings(8, reference="adapters", reference_partition="replicate").reference_replicated(s8)  # no copy
    assert "online copy (reference.partition=auto)" in auto.describe()

    none, parts, whole = (plan_memory(s8, settings(8, **kw)) for kw in ({}, {"reference": "copy"}, {"reference": "copy", "reference_partition": "auto"}))
    copy = next(i for i in whole.items if i.name == "reference model (online copy)")
    assert copy.bytes == 2 * p8 and copy.phase == "static" and "never gathered" in copy.detail
    assert parts.item("reference model (online copy)") < 0.2 * copy.bytes  # 1/8 of it + one gathered LM head
    assert whole.item("persistent parameters") == none.item("persistent parameters") < parts.item("persistent parameters")
    assert whole.item("ZeRO-3 gathered params + buckets") == none.item("ZeRO-3 gathered params + buckets")
    for peak in ("fwd_bwd_peak", "step_peak"):  # static: in the optimizer step's peak too
        assert getattr(whole, peak) - getattr(none, peak) == pytest.approx(1.1 * 2 * p8)  # + the fragmentation margin

    a, tokens = ThroughputAssumptions(), 64 * 2 * 8192 * 0.9
    p_none, p_parts, p_whole = (
        project_step(s8, settings(64, **kw), tokens, 1024, a)
        for kw in ({}, {"reference": "copy"}, {"reference": "copy", "reference_partition": "replicate"})
    )
    assert p_whole.comm_gb_per_gpu == p_none.comm_gb_per_gpu < p_parts.comm_gb_per_gpu  # its forward gathers nothing
    assert p_whole.compute_s == p_parts.compute_s > p_none.compute_s  # but it is a forward

    # auto also asks whether training fits beside the whole copy: on 40 GiB GPUs the 8B weights take
    # less than half, but states + activations + the copy do not fit, so auto partitions it.
    tight = replace(auto, gpu_memory_gib=40)
    assert replicate_frozen_copy(2 * p8, 40 * GIB) and not plan_memory(s8, replace(tight, reference_partition="replicate")).fits
    assert not tight.reference_replicated(s8) and plan_memory(s8, tight).fits
    # A forced replicate that does not fit is told how to fit.
    assert "reference.partition=zero3" in suggestions(s8, replace(tight, reference_partition="replicate"))


def test_step_projection_is_communication_bound_for_70b():
    s, a = shape("llama3_70b"), ThroughputAssumptions()
    assert 0.38 < a.efficiency() < 0.45  # the H100 anchor: 406 of the 989 TFLOP/s data-sheet peak
    tokens = 512 * 2048
    steps = [project_step(s, settings(g), tokens, 1024, a) for g in (32, 64, 128, 256, 512)]
    assert all(x.step_s >= y.step_s for x, y in zip(steps, steps[1:]))
    # Per micro-batch every GPU moves ~3 x 2 B x P of weights and gradients, whatever the GPU count.
    per_micro = [p.comm_gb_per_gpu / p.micro_batches for p in steps]
    assert all(abs(v - 3 * 2 * PARAMS["llama3_70b"] / 1e9) < 0.1 * v for v in per_micro)
    assert steps[-1].step_s > 10  # never faster than one micro-batch of weight traffic at 400 Gbit/s
    one = steps[0]
    assert one.mfu == pytest.approx(6 * PARAMS["llama3_70b"] * tokens / (one.step_s * 32 * a.peak_tflops * 1e12))
    lora = project_step(s, settings(64, lora_r=16), tokens, 1024, a)
    online = project_step(s, settings(64, reference="copy"), tokens, 1024, a)
    full = project_step(s, settings(64), tokens, 1024, a)
    assert lora.compute_s < full.compute_s < online.compute_s and lora.comm_s < full.comm_s < online.comm_s


def test_lm_head_flops_count_scored_positions_and_the_checkpointed_chunks():
    """The engine runs the LM head only at scored positions, and its logits chunks are checkpointed
    (computed again in backward) with or without activation checkpointing of the decoder, which in
    turn never recomputes the head. Per scored token the head costs forward + recompute + backward."""
    from dpo_dist.memory import forward_flops_per_token, train_flops_per_token

    s1 = shape("llama3_1b")
    head = 2 * s1.vocab * s1.hidden  # one forward of the head at one position

    def flops(**kw):
        return train_flops_per_token(s1, 555, no_grad_forwards=0, head_checkpointed=True, **({"lora": False, "recompute": False} | kw))

    assert flops(scored_fraction=0.5) - flops(scored_fraction=0.0) == pytest.approx(0.5 * head * (1 + 2 + 1))
    assert flops(scored_fraction=0.5, lora=True) - flops(scored_fraction=0.0, lora=True) == pytest.approx(0.5 * head * (1 + 1 + 1))
    decoder_forward = sum(forward_flops_per_token(s1, 555, 0.0))
    assert flops(scored_fraction=0.5, recompute=True) - flops(scored_fraction=0.5) == pytest.approx(decoder_forward)
    # Plain LM training (the calibration run): the head at every token, once forward, twice backward.
    plain = train_flops_per_token(s1, 555, lora=False, recompute=False, no_grad_forwards=0)
    assert plain - flops(scored_fraction=0.0) == pytest.approx(3 * head)
    # The projection scores half the tokens: for the 1B shape (a fifth of its matmuls is the head)
    # that is a few percent fewer FLOPs than counting the head at every token.
    assert 0.9 < flops(scored_fraction=0.5) / train_flops_per_token(s1, 555, lora=False, recompute=False, no_grad_forwards=0) < 0.97


def test_wpo_plans_its_extra_lm_head_temporary():
    """loss.use_weighting computes log sum p^2 from one more fp32 chunk x vocab tensor (2 x logits)."""
    s8 = shape("llama3_8b")
    plain = PlanSettings.from_config(config_from_dict({}))
    wpo = PlanSettings.from_config(config_from_dict({"loss": {"use_weighting": True}}))
    assert wpo.wpo and not plain.wpo
    assert not PlanSettings.from_config(config_from_dict({"stage": "sft", "loss": {"use_weighting": True}})).wpo
    chunk = min(plain.logits_chunk_tokens, plain.micro_batch_tokens)
    extra = plan_memory(s8, wpo).item("logits chunk") - plan_memory(s8, plain).item("logits chunk")
    assert extra == 4 * chunk * s8.vocab


def test_docs_hold_the_current_generated_tables():
    from tools.plan import generated

    assert generated() in (REPO / "docs" / "scaling.md").read_text(), "run: python tools/plan.py --update"


# ----------------------------------------------------------------------------- command line


def test_dpo_plan_exit_status_and_report(tmp_path):
    fits = run_cli("launch.plan", "experiment=llama3_70b_64gpu")
    assert fits.returncode == 0, fits.stderr
    assert "llama3_70b.json" in fits.stdout and "fits: peak 49.7 of 79.1 GiB" in fits.stdout
    for item in ("parameters", "gradients", "optimizer states", "activations (saved)", "logits chunk",
                 "ZeRO-3 gathered params + buckets", "reference model", "fragmentation margin"):
        assert f"  {item} " in fits.stdout, item

    (tmp_path / "config.json").write_text(json.dumps(hf_config("llama3_70b")))  # a shape, no weights
    too_small = run_cli("launch.plan", "model=llama3_70b", f"model.path={tmp_path}", "cluster=slurm",
                        "cluster.nodes=1", "cluster.tasks_per_node=8", "cluster.gpus_per_node=8", "--throughput", "--gpus", "8,64")
    assert too_small.returncode == 1
    assert "dpo-plan: does not fit: per-GPU peak" in too_small.stderr
    assert "fits with: 24 GPUs" in too_small.stdout and "| 64 | 8 |" in too_small.stdout

    bad = run_cli("launch.plan", "loss.beta=-1")
    assert bad.returncode == 2 and bad.stderr.strip() == "dpo-plan: error: loss.beta: must be > 0, got -1.0"


@pytest.mark.parametrize("gpus", [32, 64, 128])
def test_70b_experiment_presets_compose(gpus):
    result = run_cli("launch.train", f"experiment=llama3_70b_{gpus}gpu", "model.path=/x", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "name: llama3_70b" in result.stdout and "activation_checkpointing: true" in result.stdout
    assert f"nodes: {gpus // 8}" in result.stdout and "gpus_per_node: 8" in result.stdout
    assert ("offload_optimizer: cpu" in result.stdout) == (gpus == 32)
    plan = run_cli("launch.plan", f"experiment=llama3_70b_{gpus}gpu")
    assert plan.returncode == 0 and "of 79.1 GiB; ZeRO-3" in plan.stdout, plan.stdout[-2000:]


def test_dpo_train_refuses_a_gpu_plan_that_cannot_fit(tmp_path):
    shutil.copy(preset_shape_path("llama3_70b"), tmp_path / "config.json")
    result = run_cli("launch.train", "model=llama3_70b", f"model.path={tmp_path}", "cluster=slurm",
                     "cluster.nodes=1", "cluster.tasks_per_node=8", "cluster.gpus_per_node=8")
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dpo-train: error: memory plan: does not fit"), result.stderr
    assert "deepspeed=zero3_offload" in lines[0]



def test_the_gpu_budget_is_the_usable_part_of_the_gpus_memory(monkeypatch):
    """cluster.gpu_memory_gb is the card's size as sold (default 80, the contract): the planner budgets
    what CUDA reports of it (79.1 GiB of an 80GB H100); null asks the local GPU (an H200 is not
    refused at 79.1); null without a local GPU, or on Slurm, is a config error."""
    import types

    from dpo_dist.config import ConfigError
    from launch.common import check_overrides, register_schema

    register_schema()
    assert [c.gpu_memory_gb for c in check_overrides("dpo-train", ["cluster=slurm"])] == [80]
    assert [c.gpu_memory_gb for c in check_overrides("dpo-train", [])] == [80]
    h200 = types.SimpleNamespace(total_memory=150_110_011_392)  # 139.8 GiB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: h200)

    def budget(**cluster) -> float:
        return PlanSettings.from_config(config_from_dict({"cluster": cluster})).gpu_memory_gib

    assert budget(name="slurm", gpus_per_node=8, tasks_per_node=8) == 79.1
    assert budget(name="local") == 79.1  # the default describes an 80GB GPU wherever the run is
    assert budget(name="local", gpu_memory_gb=None) == pytest.approx(139.8, abs=0.05)
    assert budget(name="local", gpu_memory_gb=40) == 39.6  # an A100 40GB reports 39.59 GiB
    assert budget(name="slurm", gpus_per_node=8, tasks_per_node=8, gpu_memory_gb=141) <= 139.8
    with pytest.raises(ConfigError, match="cluster.gpu_memory_gb: null"):
        config_from_dict({"cluster": {"name": "slurm", "gpu_memory_gb": None}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no local CUDA GPU"):
        budget(name="local", gpu_memory_gb=None)


def test_qlora_plans_4bit_base_weights_in_the_decoder_blocks_only():
    """model.lora.quantize: the blocks' linear weights cost half a byte plus bitsandbytes' double-
    quantized constants; embeddings, LM head and norms stay bf16; adapters train as with LoRA."""
    s70 = shape("llama3_70b")
    h, kv, i, layers = 8192, 1024, 28672, 80
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i)  # q, o; k, v; gate, up, down
    per_weight = 0.5 + 1 / 64 + 4 / (64 * 256)  # nf4 + 8-bit absmax per 64 + fp32 per 256 absmax
    lora = settings(8, lora_r=16)
    qlora = settings(8, lora_r=16, quantized_base=True)
    want = (2 * (PARAMS["llama3_70b"] - linear) + per_weight * linear) / 8
    assert plan_memory(s70, qlora).item("parameters") == pytest.approx(want)
    assert plan_memory(s70, lora).item("parameters") == pytest.approx(2 * PARAMS["llama3_70b"] / 8)
    for name in ("gradients", "optimizer states"):
        assert plan_memory(s70, qlora).item(name) == plan_memory(s70, lora).item(name)
    cfg = config_from_dict({"model": {"lora": {"r": 16, "quantize": "nf4"}}})
    assert PlanSettings.from_config(cfg).quantized_base is True


def test_step_projection_gathers_persistent_parameters_once_per_step_not_per_micro_batch():
    """Tensors under deepspeed.param_persistence_threshold stay gathered: the projection moves them
    once per step (re-gathered after the optimizer step), the partitioned rest twice per micro-batch."""
    from dpo_dist.memory import project_step

    s70 = shape("llama3_70b")
    base = settings(64, micro_batch_tokens=8192)
    huge = replace(base, param_persistence_threshold=10**9)  # all but the embedding and the LM head
    tokens = 64 * 4 * 8192 * 0.9  # 4 micro-batches per rank at the default packing fill
    default, persistent = project_step(s70, base, tokens, 1024), project_step(s70, huge, tokens, 1024)
    assert default.micro_batches == persistent.micro_batches == 4
    ring, b = 63 / 64, 2
    kept = b * s70.persistent_params(10**9)
    gathered = b * s70.num_params() - kept
    want = (4 * (2 * gathered + b * s70.num_params()) + kept) * ring / 1e9
    assert persistent.comm_gb_per_gpu == pytest.approx(want)
    assert persistent.comm_gb_per_gpu < 0.5 * default.comm_gb_per_gpu


def test_kto_pair_projection_counts_its_statistics_forward():
    """kto_pair runs one more no-grad forward of the policy per micro-batch (engine.batch_statistics;
    an online reference's log-probs are reused): a forward's FLOPs and one more weight all-gather."""
    from dpo_dist.losses import BATCH_STATISTICS
    from dpo_dist.memory import forward_flops_per_token

    assert {n for n in ("sigmoid", "kto_pair", "ipo", "simpo", "rpo", "aot", "aot_unpaired") if config_from_dict({"loss": {"name": n, "logp_normalization": "mean" if n == "simpo" else "sum"}}).loss.uses_batch_statistics()} == set(BATCH_STATISTICS)
    kto = config_from_dict({"loss": {"name": "kto_pair"}})
    assert PlanSettings.from_config(kto).statistics_pass and not PlanSettings.from_config(config_from_dict({})).statistics_pass
    assert not PlanSettings.from_config(config_from_dict({"stage": "sft", "loss": {"name": "kto_pair"}})).statistics_pass
    s8, tokens = shape("llama3_8b"), 64 * 2 * 8192 * 0.9
    a = ThroughputAssumptions()
    fwd = sum(forward_flops_per_token(s8, 1024, a.scored_fraction))
    for reference, extra in (("none", 1), ("copy", 1)):
        plain = project_step(s8, settings(64, reference=reference), tokens, 1024, a)
        stats = project_step(s8, settings(64, reference=reference, statistics_pass=True), tokens, 1024, a)
        assert stats.compute_s - plain.compute_s == pytest.approx(tokens / 64 * extra * fwd / a.achieved_flops())
        gathered = 2 * s8.num_params() - 2 * s8.persistent_params(settings(64).param_persistence_threshold)
        assert stats.comm_gb_per_gpu - plain.comm_gb_per_gpu == pytest.approx(2 * extra * gathered * 63 / 64 / 1e9)
