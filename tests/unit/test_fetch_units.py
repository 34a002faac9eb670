"""ZeRO-3 fetch units (deepspeed.leaf_modules): which modules dpo_dist.model.mark_fetch_units makes
DeepSpeed gather whole. Flags only: nothing here initialises DeepSpeed."""

from __future__ import annotations

import pytest
from deepspeed.utils import z3_leaf_module

from dpo_dist.config import ConfigError, DeepSpeedConfig, LoraConfig
from dpo_dist.model import apply_lora, mark_fetch_units
from tests.unit.tiny_models import tiny_llama


def leaf_classes(model) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules() if z3_leaf_module(m)})


def test_auto_marks_every_transformer_block_and_nothing_inside_it():
    model = tiny_llama()
    assert mark_fetch_units(model, DeepSpeedConfig()) == ["LlamaDecoderLayer"] == leaf_classes(model)
    assert all(z3_leaf_module(layer) for layer in model.model.layers)


def test_none_named_classes_and_stages_without_hooks():
    model = tiny_llama()
    assert mark_fetch_units(model, DeepSpeedConfig(leaf_modules="none")) == [] == leaf_classes(model)
    assert mark_fetch_units(model, DeepSpeedConfig(stage=0)) == [] == leaf_classes(model)
    assert mark_fetch_units(model, DeepSpeedConfig(leaf_modules="LlamaMLP, LlamaAttention")) == ["LlamaMLP", "LlamaAttention"]
    assert leaf_classes(model) == ["LlamaAttention", "LlamaMLP"]


def test_a_model_with_lora_adapters_keeps_per_module_hooks():
    """DeepSpeed 0.19 fails LoRA's backward when a block holding adapters is a leaf."""
    model = apply_lora(tiny_llama(), LoraConfig(r=4, alpha=8), seed=0)
    assert mark_fetch_units(model, DeepSpeedConfig()) == [] == leaf_classes(model)


def test_a_class_the_model_lacks_is_a_config_error():
    with pytest.raises(ConfigError, match="deepspeed.leaf_modules: no module of class MixtralBlock in this model"):
        mark_fetch_units(tiny_llama(), DeepSpeedConfig(leaf_modules="MixtralBlock"))
