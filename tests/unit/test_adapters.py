"""Continuing a PEFT LoRA adapter (``model.path`` an adapter directory): its settings become the
run's, its base is found (absolute, relative, Hub cache) or named in one line, the online reference
is its frozen starting copy, and exports carry the trained adapter alone."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dpo_dist import checkpoint as C
from dpo_dist import engine as E
from dpo_dist import model as M
from dpo_dist.adapters import adapter_base, load_adapter, model_dir, tokenizer_dir
from dpo_dist.attention import enable_packed_attention
from dpo_dist.config import ConfigError, LoraConfig, config_from_dict
from tests.helpers import make_tiny_model_dir

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("adapters") / "base")


def save_adapter(base: Path, out: Path, *, targets=TARGETS, seed: int = 1, tokenizer: bool = False, **settings) -> Path:
    """A PEFT LoRA adapter of ``base`` whose B matrices are not zero (a trained adapter: the policy it
    gives differs from the base model)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=targets, **settings)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    model.save_pretrained(out)
    if tokenizer:
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def edit_adapter_config(adapter: Path, **values) -> None:
    file = adapter / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **values}))


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    return save_adapter(base, tmp_path_factory.mktemp("adapters") / "adapter", tokenizer=True)


def test_an_adapter_path_continues_it_with_its_own_lora_settings(base, adapter, tmp_path):
    lora = config_from_dict({"model": {"path": str(adapter)}}).model.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (4, 8.0, 0.05, ["down_proj", "q_proj", "v_proj"])
    assert lora.enabled and lora.merge_on_export and lora.quantize == "none"
    # The adapter's own values, given again, and this run's export and quantization settings are taken.
    given = {"r": 4, "alpha": 8, "target_modules": ["v_proj", "q_proj", "down_proj"], "merge_on_export": False, "quantize": "nf4"}
    lora = config_from_dict({"model": {"path": str(adapter), "lora": given}}).model.lora
    assert (lora.r, lora.merge_on_export, lora.quantize) == (4, False, "nf4")
    # PEFT's all-linear saves every adapted layer's full path: the run keeps the layer names.
    all_linear = save_adapter(base, tmp_path / "all", targets="all-linear")
    assert config_from_dict({"model": {"path": str(all_linear)}}).model.lora.target_modules == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"
    ]


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [("r", 16, "16, ... r=4"), ("alpha", 32, "32, ... alpha=8"), ("dropout", 0.1, "0.1, ... dropout=0.05"),
     ("target_modules", ["q_proj"], "[q_proj], ... target_modules=[down_proj,q_proj,v_proj]")],
)
def test_lora_settings_that_differ_from_the_adapters_are_refused(adapter, key, value, shown):
    given, theirs = shown.split(", ... ")
    with pytest.raises(ConfigError) as error:
        config_from_dict({"model": {"path": str(adapter), "lora": {key: value}}})
    assert str(error.value) == (
        f"model.lora.{key}={given}: model.path={adapter} is a LoRA adapter with {theirs} (its adapter_config.json), "
        f"whose training this run continues with its own settings; leave model.lora.{key} unset"
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"peft_type": "IA3"}, "is a IA3 adapter: only LoRA adapters can be trained further"),
        ({"use_dora": True}, "its LoRA adapter has DoRA (use_dora), which dpo_dist does not train"),
        ({"modules_to_save": ["lm_head"]}, "has whole modules trained beside the adapter (modules_to_save)"),
        ({"bias": "lora_only"}, "trains biases (bias=lora_only)"),
        ({"target_modules": ".*proj"}, "its adapter's target_modules is '.*proj'; continuing an adapter needs the list"),
    ],
)
def test_adapters_that_cannot_be_trained_further_are_refused_in_one_line(adapter, tmp_path, values, message):
    import shutil

    copy = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    edit_adapter_config(copy, **values)
    with pytest.raises(ConfigError, match=f"^model.path: model.path={copy}.*") as error:
        config_from_dict({"model": {"path": str(copy)}})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_base_is_found_absolute_relative_or_in_the_hub_cache_else_one_line(base, adapter, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    found = adapter_base(adapter)
    assert found.path == found.name == str(base.resolve()) and adapter_base(base) is None
    assert model_dir(adapter) == str(base.resolve()) and model_dir(base) == str(base)
    copy = Path(shutil.copytree(adapter, tmp_path / "runs" / "adapter"))
    # Relative to the adapter's directory (the current one has no such path) ...
    edit_adapter_config(copy, base_model_name_or_path=os.path.relpath(base, copy))
    assert adapter_base(copy).path == str(base.resolve())
    # ... and first to the current directory, where PEFT itself reads it.
    monkeypatch.chdir(base.parent)
    edit_adapter_config(copy, base_model_name_or_path=base.name)
    assert adapter_base(copy).name == str(base.resolve())
    # A Hub id is looked up in the local cache only; an export names it by its id.
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(base, snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    edit_adapter_config(copy, base_model_name_or_path="org/tiny")
    assert adapter_base(copy) == type(found)(str(snapshot), "org/tiny")
    edit_adapter_config(copy, base_model_name_or_path="org/absent")
    with pytest.raises(ConfigError) as error:
        M.check_trainable_start(config_from_dict({"model": {"path": str(copy)}}))
    assert str(error.value) == (
        f"{copy / 'adapter_config.json'}: base model base_model_name_or_path='org/absent' not found: no model directory "
        f"(config.json) at {base.parent / 'org/absent'} nor {copy / 'org/absent'}, nor a Hugging Face Hub model in the "
        "local cache (nothing is downloaded); set it to the base model's local directory"
    )


def test_an_adapter_without_a_tokenizer_uses_its_bases_and_plans_with_its_bases_shape(base, adapter, tmp_path):
    from dpo_dist.memory import ModelShape

    bare = save_adapter(base, tmp_path / "bare")
    assert tokenizer_dir(bare) == str(base.resolve()) and tokenizer_dir(adapter) == str(adapter)
    assert config_from_dict({"model": {"path": str(bare)}}).model.resolved_tokenizer_path() == str(base.resolve())
    assert ModelShape.from_path(adapter) == ModelShape.from_path(base)


def test_an_adapters_fingerprint_takes_its_base_wherever_it_is_named_from(base, adapter, tmp_path):
    import shutil

    from dpo_dist.fingerprint import model_fingerprint

    copy = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    edit_adapter_config(copy, base_model_name_or_path=os.path.relpath(base, copy))
    assert model_fingerprint(copy) == model_fingerprint(adapter)


def logps(policy: M.PackedPolicy, batch) -> torch.Tensor:
    tensors, host = batch.split()
    return policy(*tensors, **host)[0]


def continued_policy(base: Path, adapter: Path) -> M.PackedPolicy:
    """build_engine's policy of a continued adapter with the online reference's frozen copy, without DeepSpeed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    enable_packed_attention(model, "sdpa")
    lora = config_from_dict({"model": {"path": str(adapter)}}).model.lora
    model = M.continue_lora(model, str(adapter), lora, reference_copy=True)
    return M.PackedPolicy(model, chunk_tokens=64, normalize="sum", micro_batch_tokens=256)


def test_the_online_reference_of_a_continued_adapter_is_its_starting_copy(base, adapter):
    """The adapters-disabled base model, a fresh adapter's reference, is not the starting policy of
    a trained adapter; its frozen copy is, before and after training moves the trained one, and
    the switch leaves the trained adapter the only trainable tensors."""
    from transformers import AutoModelForCausalLM

    from dpo_dist.data import collate_packed
    from tests.unit.test_engine_step import pairs

    policy = continued_policy(base, adapter)
    engine = SimpleNamespace(module=policy)
    model = policy.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    batch = collate_packed(pairs(3))
    policy.eval()
    with torch.no_grad():
        start = logps(policy, batch)
        with E.reference_adapters(engine):
            torch.testing.assert_close(logps(policy, batch), start, rtol=0, atol=0)
        with model.disable_adapter():
            assert not torch.allclose(logps(policy, batch), start, atol=1e-3)  # the base is not the start
        peft_start = load_adapter(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
        packed = M.PackedPolicy(peft_start, chunk_tokens=64, normalize="sum", micro_batch_tokens=256)
        enable_packed_attention(peft_start.get_base_model(), "sdpa")
        torch.testing.assert_close(logps(packed, batch), start, rtol=1e-6, atol=1e-6)
        for name, param in model.named_parameters():  # "training" moves the trained adapter only
            if ".lora_B.default." in name:
                param.add_(0.1)
        assert not torch.allclose(logps(policy, batch), start, atol=1e-3)
        with E.reference_adapters(engine):
            torch.testing.assert_close(logps(policy, batch), start, rtol=0, atol=0)
    assert model.active_adapter == "default"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    logps(policy, batch).sum().backward()
    assert all((p.grad is not None) == (n in trainable) for n, p in model.named_parameters())


def test_exports_of_a_continued_adapter_hold_the_trained_adapter_on_its_base(base, adapter, tmp_path):
    """The merged state leaves out the reference copy; dpo-export's rebuild (``lora_model``) of a
    continued run's checkpoint puts the checkpoint's adapter on the adapter's base and names that
    base, absolute, in an adapter export."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpo_dist.export import lora_model

    policy = continued_policy(base, adapter)
    model = policy.model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B.default." in name:
                param.add_(0.1)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    merged = C.merge_lora_state_dict(dict(model.state_dict()), model)
    assert not any("lora_" in k for k in merged)
    reference = AutoModelForCausalLM.from_pretrained(base)
    reference.load_state_dict(merged)

    relative = Path(tmp_path / "adapter")
    import shutil

    shutil.copytree(adapter, relative)
    edit_adapter_config(relative, base_model_name_or_path=os.path.relpath(base, relative))
    for merge in (True, False):
        cfg = config_from_dict({"model": {"path": str(relative), "lora": {"merge_on_export": merge}}})
        out = tmp_path / f"export_{merge}"
        lora_model(cfg, trained, torch.float32).save_pretrained(out)
        if merge:
            loaded = AutoModelForCausalLM.from_pretrained(out)
        else:
            assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
            loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).merge_and_unload()
        ids = torch.tensor([[1, 5, 9, 13, 17]])
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_lora_config_refuses_quantize_without_lora_only_after_an_adapter_could_set_it(adapter):
    with pytest.raises(ConfigError, match="model.lora.quantize: nf4 \\(QLoRA\\) trains adapters on a frozen quantized base"):
        config_from_dict({"model": {"lora": {"quantize": "nf4"}}})
    assert config_from_dict({"model": {"path": str(adapter), "lora": {"quantize": "nf4"}}}).model.lora.r == 4
    assert LoraConfig(quantize="nf4").quantize == "nf4"  # checked where the adapter's r is known
