"""The GPU attention backends' calling conventions, checked on CPU.

The flash (FA2, FA4) and torch-varlen kernels run only on CUDA, so on a CPU machine the code that
calls them would otherwise never run. Here each kernel is replaced by a stand-in with the real
function's signature (positional and keyword-only parameters, defaults, return value as of
flash-attn 2.8, flash-attn-4 4.0.0b36 and torch 2.11-2.13) that checks the contract the real
kernel relies on (int32 cu_seqlens, host-int max lengths, [total, heads, dim] layout, causal, the
window convention) and computes the attention in plain torch. A packed model on such a backend
must then match the stock model run one sequence at a time, values and gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import MistralConfig, MistralForCausalLM

from dpo_dist import attention
from dpo_dist.attention import enable_packed_attention, packed_forward_kwargs
from tests.unit.tiny_models import packed_batch, random_sequences, seeded, tiny_config, tiny_llama

CALLS: list[dict] = []


def reference_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, left: int | None, gqa_ok: bool):
    """Causal attention per sequence; ``left`` keys before the query are visible (None: all)."""
    assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "layout is [total_tokens, heads, head_dim]"
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32, "cu_seqlens must be int32"
    assert cu_q.device == q.device, "cu_seqlens must be on the tensors' device"
    assert isinstance(max_q, int) and isinstance(max_k, int), "max lengths must be host ints (no device sync)"
    assert torch.equal(cu_q, cu_k) and int(cu_q[-1]) == q.shape[0]
    lengths = (cu_q[1:] - cu_q[:-1]).tolist()
    assert max(lengths) == max_q == max_k
    groups = q.shape[1] // k.shape[1]
    assert groups == 1 or gqa_ok, "this kernel needs as many key/value heads as query heads"
    out = []
    for start, stop in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (x[start:stop].transpose(0, 1).float() for x in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        n = stop - start
        i = torch.arange(n)
        visible = i[None, :] <= i[:, None]
        if left is not None:
            visible &= i[None, :] >= i[:, None] - left
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=visible, scale=scale)
        out.append(o.transpose(0, 1).to(q.dtype))
    return torch.cat(out)


def torch_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch.nn.attention.varlen.varlen_attn (torch >= 2.11: causal through window_size)."""
    left, right = window_size
    assert right == 0, "causal attention is window_size=(left, 0)"
    CALLS.append({"kernel": "varlen", "window_size": window_size, "enable_gqa": enable_gqa})
    return reference_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale,
                               None if left == -1 else left, enable_gqa)


def torch_varlen_attn_without_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                                  scale=None, window_size=(-1, -1)):
    """A varlen_attn without ``enable_gqa``: key/value heads must be repeated by the caller."""
    return torch_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size)


def fa2_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                    deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn.flash_attn_varlen_func (FA2): returns the output alone; GQA native."""
    assert causal and dropout_p == 0.0
    left, right = window_size
    assert right in (-1, 0)
    CALLS.append({"kernel": "fa2", "window_size": window_size})
    return reference_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                               None if left == -1 else left, True)


def fa4_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                    min_seqlen_k=None, seqused_q=None, seqused_k=None, gather_kv_indices=None, page_table=None,
                    softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None, softcap=0.0,
                    num_splits=1, pack_gqa=None, deterministic=False, score_mod=None, score_mod_bwd=None,
                    mask_mod=None, block_sparse_tensors=None, aux_tensors=None, aux_scalars=None, return_lse=False,
                    scheduler_metadata=None, seqlen_k_per_split=None, disable_scheduler_metadata=False,
                    gather_bwd_recompute_p=False, gather_bwd_token_chunk=None):
    """flash_attn.cute.flash_attn_varlen_func (FA4): returns (out, lse); None means no window."""
    assert causal and qv is None
    left, right = window_size
    assert right in (None, 0)
    CALLS.append({"kernel": "fa4", "window_size": window_size})
    out = reference_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                              left, True)
    return out, torch.zeros(q.shape[1], q.shape[0])


STAND_INS = {
    "varlen": ("varlen", lambda: (torch_varlen_attn, True)),
    "varlen_without_gqa": ("varlen", lambda: (torch_varlen_attn_without_gqa, False)),
    "fa2": ("flash", lambda: (fa2_varlen_func, "FA2 (stand-in)")),
    "fa4": ("flash", lambda: (fa4_varlen_func, "FA4 (stand-in)")),
}


@pytest.fixture(params=sorted(STAND_INS))
def stand_in(request, monkeypatch):
    """(backend name, kernel name) with that kernel installed and allowed on this CPU."""
    backend, kernel = STAND_INS[request.param]
    monkeypatch.setattr(attention, "_varlen_kernel" if backend == "varlen" else "_flash_kernel", kernel)
    monkeypatch.setattr(attention, "_unavailable_reason", lambda *args: None)
    CALLS.clear()
    return backend, request.param


def logits_and_grads(model, sequences, packed: bool):
    if packed:
        batch = packed_batch(sequences)
        logits = model(input_ids=batch.input_ids, **packed_forward_kwargs(batch)).logits[0]
        pieces = list(logits.split([len(ids) for ids, _ in sequences]))
    else:
        pieces = [model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0] for ids, _ in sequences]
    torch.manual_seed(1)
    sum(torch.sum(p * torch.randn_like(p)) for p in pieces).backward()
    return pieces, [p.grad for p in model.parameters()]


def test_gqa_model_on_the_kernel_matches_unpacked(stand_in):
    backend, kernel = stand_in
    stock = tiny_llama(num_key_value_heads=2)
    packed = copy.deepcopy(stock)
    assert enable_packed_attention(packed, backend) == backend
    sequences = random_sequences([5, 11, 8, 16])
    got, got_grads = logits_and_grads(packed, sequences, packed=True)
    want, want_grads = logits_and_grads(stock, sequences, packed=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert CALLS and all(call["kernel"] == kernel.split("_")[0] for call in CALLS)
    if kernel == "varlen":
        assert all(call["enable_gqa"] for call in CALLS)  # no repeated K/V when the kernel does GQA


def test_sliding_window_reaches_the_kernel_as_left_window(stand_in):
    backend, kernel = stand_in
    stock = seeded(MistralForCausalLM, tiny_config(MistralConfig, sliding_window=4))
    packed = copy.deepcopy(stock)
    enable_packed_attention(packed, backend)
    sequences = random_sequences([12, 3, 9])
    with torch.no_grad():
        batch = packed_batch(sequences)
        got = packed(input_ids=batch.input_ids, **packed_forward_kwargs(batch)).logits[0]
        want = torch.cat([stock(input_ids=ids.unsqueeze(0), use_cache=False).logits[0] for ids, _ in sequences])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert {tuple(call["window_size"]) for call in CALLS} == {(3, 0)}  # 4 tokens: itself and 3 before
