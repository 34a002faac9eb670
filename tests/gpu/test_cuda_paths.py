"""CUDA-only kernels (skipped on CPU machines): packed bf16 log-probs through the GPU backends agree
with the masked-SDPA reference computed on the same GPU, values and gradients."""

from __future__ import annotations

import pytest
import torch

from dpo_dist.attention import available_backends, enable_packed_attention
from dpo_dist.logprobs import sequence_logps
from tests.unit.tiny_models import packed_batch, random_sequences, tiny_llama

pytestmark = pytest.mark.gpu

LENGTHS = [37, 120, 5, 64, 250, 9]


def scored(backend: str):
    torch.manual_seed(0)
    model = tiny_llama().to("cuda", torch.bfloat16)
    enable_packed_attention(model, backend)
    batch = packed_batch(random_sequences(LENGTHS)).to("cuda")
    logps = sequence_logps(model, batch, chunk_tokens=64).logps
    logps.sum().backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    return logps.detach().float(), grads


@pytest.mark.parametrize("backend", ["flash", "varlen"])
def test_gpu_backend_matches_masked_sdpa_in_bf16(backend):
    if backend not in available_backends(torch.device("cuda"), torch.bfloat16):
        pytest.skip(f"{backend} not installed on this GPU machine")
    got, got_grads = scored(backend)
    want, want_grads = scored("sdpa")
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-1)  # bf16: a few ulps of a summed log-prob
    cosine = torch.nn.functional.cosine_similarity(got_grads, want_grads, dim=0)
    assert cosine > 0.999, cosine
