"""model.lora.* reaches PEFT: the adapters' dropout is the configured one."""

from __future__ import annotations

import pytest
from torch import nn

from dpo_dist.config import LoraConfig
from dpo_dist.model import apply_lora
from tests.unit.tiny_models import tiny_llama


@pytest.mark.parametrize("dropout", [0.25, 0.0])
def test_lora_dropout_is_the_configured_probability(dropout):
    lora = LoraConfig(r=4, alpha=8.0, dropout=dropout, target_modules=["q_proj", "v_proj"])
    model = apply_lora(tiny_llama(), lora, seed=0)
    layers = [m for name, m in model.named_modules() if name.endswith(("q_proj", "v_proj")) and hasattr(m, "lora_dropout")]
    assert len(layers) == 2 * 2  # q and v of both decoder layers
    for layer in layers:
        (adapter,) = layer.active_adapters
        module = layer.lora_dropout[adapter]
        if dropout:
            assert isinstance(module, nn.Dropout) and module.p == dropout, module
        else:
            assert isinstance(module, nn.Identity), module  # PEFT skips a dropout of 0
        assert layer.r[adapter] == 4 and layer.scaling[adapter] == 8.0 / 4
