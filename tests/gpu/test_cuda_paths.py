"""CUDA-only kernels (skipped on CPU machines): packed bf16 log-probs through the GPU backends agree
with the SDPA backend computed on the same GPU, values and gradients; on the GPU the SDPA backend
itself (one call per sequence, kv heads expanded) agrees with one masked call over the row."""

from __future__ import annotations

import pytest
import torch

from dpo_dist.attention import available_backends, enable_packed_attention
from dpo_dist.logprobs import sequence_logps
from tests.unit.tiny_models import packed_batch, random_sequences, tiny_llama

pytestmark = pytest.mark.gpu

LENGTHS = [37, 120, 5, 64, 250, 9]


# The bench's Llama shapes have head_dim 64 (FA4's SM90 tiles are tuned for >= 64); the tiny one
# has 16. Query/key-value heads: grouped (4/2), multi-head (4/4), multi-query (4/1).
SHAPES = {
    "gqa_hd16": {},
    "gqa_hd64": {"hidden_size": 256, "intermediate_size": 512},
    "mha_hd64": {"hidden_size": 256, "intermediate_size": 512, "num_key_value_heads": 4},
    "mqa_hd64": {"hidden_size": 256, "intermediate_size": 512, "num_key_value_heads": 1},
}


def scored(backend: str, make_model, dtype=torch.bfloat16):
    torch.manual_seed(0)
    model = make_model().to("cuda", dtype)
    enable_packed_attention(model, backend)
    batch = packed_batch(random_sequences(LENGTHS)).to("cuda")
    logps = sequence_logps(model, batch, chunk_tokens=64).logps
    logps.sum().backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    return logps.detach().float(), grads


def assert_backend_matches_sdpa(backend: str, make_model) -> None:
    if backend not in available_backends(torch.device("cuda"), torch.bfloat16):
        pytest.skip(f"{backend} not installed on this GPU machine")
    got, got_grads = scored(backend, make_model)
    want, want_grads = scored("sdpa", make_model)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-1)  # bf16: a few ulps of a summed log-prob
    cosine = torch.nn.functional.cosine_similarity(got_grads, want_grads, dim=0)
    assert cosine > 0.999, cosine


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["flash", "varlen"])
def test_gpu_backend_matches_sdpa_in_bf16(backend, shape):
    assert_backend_matches_sdpa(backend, lambda: tiny_llama(**SHAPES[shape]))


@pytest.mark.parametrize("backend", ["flash", "varlen"])
def test_gpu_backend_applies_a_sliding_window_within_each_sequence(backend):
    """Mistral's sliding window (shorter than most sequences here) on the GPU kernels."""
    from transformers import MistralConfig, MistralForCausalLM

    from tests.unit.tiny_models import seeded, tiny_config

    config = tiny_config(MistralConfig, sliding_window=16, hidden_size=256, intermediate_size=512)
    assert_backend_matches_sdpa(backend, lambda: seeded(MistralForCausalLM, config))


FUSED_SDPA = ("EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION")


@pytest.mark.parametrize("shape", [*SHAPES, "mistral_window"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_sdpa_per_sequence_runs_fused_and_matches_one_masked_call_over_the_row(shape, dtype, monkeypatch):
    """The SDPA backend on a GPU (the fallback for fp32 weights): per-sequence calls reading host
    boundaries, grouped kv heads expanded where the kernel needs it, run with PyTorch's math path
    disabled (so a fallback to [heads, L, L] scores fails here), and agree with the block-diagonal
    mask a caller without host boundaries gets."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import MistralConfig, MistralForCausalLM

    from dpo_dist import attention
    from tests.unit.tiny_models import seeded, tiny_config

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if shape == "mistral_window":
        config = tiny_config(MistralConfig, sliding_window=16, hidden_size=256, intermediate_size=512)
        make = lambda: seeded(MistralForCausalLM, config)  # noqa: E731
    else:
        make = lambda: tiny_llama(**SHAPES[shape])  # noqa: E731
    with sdpa_kernel([getattr(SDPBackend, name) for name in FUSED_SDPA]):
        got, got_grads = scored("sdpa", make, dtype)
    monkeypatch.setattr(attention, "_sequence_bounds", lambda *a: None)
    want, want_grads = scored("sdpa", make, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_grads, want_grads, rtol=1e-3, atol=1e-5)
    else:
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-1)
        assert torch.nn.functional.cosine_similarity(got_grads, want_grads, dim=0) > 0.999
