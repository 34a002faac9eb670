"""Packed attention: backend resolution, isolation of packed sequences, GQA and sliding windows."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dpo_dist.attention import (
    ATTN_BACKENDS,
    AttentionBackendError,
    available_backends,
    enable_packed_attention,
    is_packed_attention,
    packed_forward_kwargs,
    resolve_attn_backend,
)
from dpo_dist.model import enable_activation_checkpointing
from tests.unit.tiny_models import (
    backend_params,
    packed_batch,
    random_sequences,
    seeded,
    tiny_config,
    tiny_llama,
)

CPU = torch.device("cpu")


def packed_logits(model, sequences) -> list[torch.Tensor]:
    """Logits of one packed forward, cut back into one [len, V] tensor per sequence."""
    batch = packed_batch(sequences)
    logits = model(input_ids=batch.input_ids, **packed_forward_kwargs(batch)).logits[0]
    return list(logits.split([len(ids) for ids, _ in sequences]))


def unpacked_logits(model, sequences) -> list[torch.Tensor]:
    return [model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0] for ids, _ in sequences]


def test_auto_picks_sdpa_on_cpu():
    assert ATTN_BACKENDS == ("auto", "flash", "varlen", "sdpa")
    assert available_backends(CPU) == ["sdpa"]
    assert resolve_attn_backend("auto", CPU) == "sdpa"
    assert resolve_attn_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    assert resolve_attn_backend("sdpa", CPU) == "sdpa"


@pytest.mark.parametrize(
    "backend, needs",
    [
        ("flash", "needs the flash_attn package, a CUDA device"),
        ("varlen", "a CUDA device of compute capability"),
    ],
)
def test_forced_cuda_backend_on_cpu_is_a_clear_error(backend, needs):
    with pytest.raises(AttentionBackendError) as raised:
        resolve_attn_backend(backend, CPU)
    message = str(raised.value)
    assert message.startswith(f"model.attn_backend={backend} ")
    assert needs in message and "device: cpu" in message
    assert "\n" not in message


def test_unknown_backend_is_rejected():
    with pytest.raises(AttentionBackendError, match="'xformers' is not one of auto, flash, varlen, sdpa"):
        resolve_attn_backend("xformers", CPU)


def test_enable_switches_the_model_and_logs_the_backend(caplog):
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="dpo_dist.attention"):
        assert enable_packed_attention(model, "auto") == "sdpa"
    assert is_packed_attention(model)
    assert [r.getMessage() for r in caplog.records if r.name == "dpo_dist.attention"] == [
        "packed attention backend: sdpa (requested: auto, LlamaForCausalLM on cpu)"
    ]
    with pytest.raises(AttentionBackendError, match="model.attn_backend=flash"):
        enable_packed_attention(tiny_llama(), "flash")


def test_missing_cu_seqlens_is_an_error_not_cross_attention():
    model = tiny_llama()
    enable_packed_attention(model, "sdpa")
    with pytest.raises(AttentionBackendError, match="without cu_seq_lens_q/cu_seq_lens_k"):
        model(input_ids=torch.randint(1, 128, (1, 8)), use_cache=False)


def test_kv_cache_and_softcap_are_refused():
    model = tiny_llama()
    enable_packed_attention(model, "sdpa")
    batch = packed_batch(random_sequences([4, 6]))
    attention = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation]
    q = torch.zeros(1, 4, 10, 16)
    kv = torch.zeros(1, 2, 10, 16)
    varlen = {k: v for k, v in packed_forward_kwargs(batch).items() if k.startswith(("cu_", "max_"))}
    layer = model.model.layers[0].self_attn
    with pytest.raises(AttentionBackendError, match="use_cache=False"):
        attention(layer, q[:, :, :1], kv, kv, None, **varlen)
    with pytest.raises(AttentionBackendError, match="softcap"):
        attention(layer, q, kv, kv, None, softcap=50.0, **varlen)


@pytest.mark.parametrize("backend", backend_params())
def test_packed_sequences_do_not_see_each_other(backend):
    """The pitfall in notes/cpu-stack.md: changing sequence 1 must not move sequence 2's logits."""
    model = tiny_llama()
    enable_packed_attention(model, backend)
    sequences = random_sequences([9, 13, 6])
    altered = [(torch.randint(1, 128, (9,), generator=torch.Generator().manual_seed(7)), sequences[0][1])]
    altered += sequences[1:]
    with torch.no_grad():
        before, after = packed_logits(model, sequences), packed_logits(model, altered)
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(after[2], before[2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kv_heads", [2, 1, 4])
def test_packed_forward_matches_one_sequence_per_forward(backend, kv_heads):
    """GQA (2 kv heads), MQA (1) and MHA (4) models: packed logits and grads equal unpacked ones."""
    stock = tiny_llama(num_key_value_heads=kv_heads)
    packed = copy.deepcopy(stock)
    enable_packed_attention(packed, backend)
    sequences = random_sequences([5, 11, 8, 16])
    got, expected = packed_logits(packed, sequences), unpacked_logits(stock, sequences)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    weights = [torch.randn_like(e) for e in expected]
    sum(torch.sum(g * w) for g, w in zip(got, weights)).backward()
    sum(torch.sum(e * w) for e, w in zip(expected, weights)).backward()
    for (name, p_packed), p_stock in zip(packed.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p_packed.grad, p_stock.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", backend_params())
def test_sliding_window_model_matches_unpacked(backend):
    """Mistral passes sliding_window to attention; the window must apply inside each sequence."""
    config = tiny_config(MistralConfig, sliding_window=4)
    stock = seeded(MistralForCausalLM, config)
    packed = copy.deepcopy(stock)
    enable_packed_attention(packed, backend)
    sequences = random_sequences([12, 3, 9])
    with torch.no_grad():
        got, expected = packed_logits(packed, sequences), unpacked_logits(stock, sequences)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_mask_is_built_once_per_forward_and_the_cache_stays_bounded(monkeypatch, caplog):
    from dpo_dist import attention

    monkeypatch.setattr(attention, "_sequence_bounds", lambda *a: None)  # a GPU caller without host bounds
    attention._warn_row_mask_once.cache_clear()
    monkeypatch.setattr(attention, "_mask_cache", {})
    builds = []
    searchsorted = torch.searchsorted
    monkeypatch.setattr(
        attention.torch, "searchsorted", lambda *a, **k: builds.append(1) or searchsorted(*a, **k)
    )
    model = tiny_llama(num_hidden_layers=3)
    enable_packed_attention(model, "sdpa")
    enable_activation_checkpointing(model)
    model.train()
    for lengths in ([6, 10], [4, 4, 9], [12]):
        builds.clear()
        batch = packed_batch(random_sequences(lengths))
        model(input_ids=batch.input_ids, **packed_forward_kwargs(batch)).logits.sum().backward()
        assert len(builds) == 1  # 3 layers forward + 3 recomputed in backward share one mask
    assert len(attention._mask_cache) == 1
    # The row mask is what a GPU caller without host boundaries gets: said once.
    warnings = [r.getMessage() for r in caplog.records if "no cu_seq_lens_host" in r.getMessage()]
    assert len(warnings) == 1 and "T x T scores" in warnings[0], warnings


def test_mask_cache_follows_in_place_changes_of_cu_seqlens(monkeypatch):
    """The per-forward mask cache must not serve a stale mask when a cu_seqlens buffer is reused."""
    from dpo_dist import attention

    monkeypatch.setattr(attention, "_sequence_bounds", lambda *a: None)
    model = tiny_llama()
    enable_packed_attention(model, "sdpa")
    first, second = random_sequences([6, 10]), random_sequences([10, 6])
    batch = packed_batch(first)
    with torch.no_grad():
        model(input_ids=batch.input_ids, **packed_forward_kwargs(batch))
        reused = packed_batch(second)
        batch.cu_seqlens.copy_(reused.cu_seqlens)  # same tensor object, new boundaries
        reused.cu_seqlens = batch.cu_seqlens
        logits = model(input_ids=reused.input_ids, **packed_forward_kwargs(reused)).logits[0]
        expected = model(
            input_ids=second[0][0].unsqueeze(0), **packed_forward_kwargs(packed_batch(second[:1]))
        )
    torch.testing.assert_close(logits[:10], expected.logits[0], rtol=1e-5, atol=1e-5)


def test_packed_forward_kwargs_disable_the_cache():
    batch = packed_batch(random_sequences([3, 5]))
    kwargs = packed_forward_kwargs(batch)
    assert kwargs["use_cache"] is False
    assert kwargs["cu_seq_lens_q"] is batch.cu_seqlens and kwargs["cu_seq_lens_k"] is batch.cu_seqlens
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 5
    assert kwargs["position_ids"] is batch.position_ids
    assert kwargs["cu_seq_lens_host"] == (0, 3, 8) == tuple(batch.cu_seqlens.tolist())


@pytest.mark.parametrize("model_class", ["llama", "mistral_window"])
def test_per_sequence_and_masked_sdpa_agree_in_values_and_gradients(monkeypatch, model_class):
    """The sdpa backend attends sequence by sequence (with grouped kv heads as they are on CPU,
    expanded to every query head on GPUs); the block-diagonal mask over the row, all that a caller
    without host boundaries gets on a GPU, must agree, with and without a sliding window shorter
    than the sequences."""
    from dpo_dist import attention

    batch = packed_batch(random_sequences([5, 12, 3, 8]))
    bounds = attention._sequence_bounds

    def run(path: str):
        monkeypatch.setattr(attention, "_sequence_bounds", (lambda *a: None) if path == "mask" else bounds)
        monkeypatch.setattr(attention, "_expands_kv_heads", lambda *a: path == "expanded")
        if model_class == "llama":
            model = tiny_llama()
        else:
            model = seeded(MistralForCausalLM, tiny_config(MistralConfig, sliding_window=4))
        enable_packed_attention(model, "sdpa")
        logits = model(input_ids=batch.input_ids, **packed_forward_kwargs(batch)).logits
        logits.square().mean().backward()
        return logits.detach(), [p.grad for p in model.parameters()]

    (a, grads_a), (b, grads_b), (c, grads_c) = run("per_sequence"), run("mask"), run("expanded")
    for logits, grads in ((b, grads_b), (c, grads_c)):
        torch.testing.assert_close(logits, a, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, grads_a):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_sdpa_reads_sequence_boundaries_from_the_host_not_the_device():
    """On a GPU, reading cu_seqlens in every layer would be a device sync: with the batch's host
    boundaries the device tensor is never read (here it lives on the meta device, which has no
    values to read), and the result is the same."""
    model = tiny_llama()
    enable_packed_attention(model, "sdpa")
    batch = packed_batch(random_sequences([7, 4, 10]))
    with torch.no_grad():
        want = model(input_ids=batch.input_ids, **packed_forward_kwargs(batch)).logits
        batch.cu_seqlens = batch.cu_seqlens.to("meta")
        got = model(input_ids=batch.input_ids, **packed_forward_kwargs(batch)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_host_boundaries_that_do_not_match_the_row_are_refused():
    model = tiny_llama()
    enable_packed_attention(model, "sdpa")
    batch = packed_batch(random_sequences([7, 4, 10]))
    for wrong in ((0, 7, 11, 20), (0, 7, 21), (1, 7, 11, 21)):
        kwargs = packed_forward_kwargs(batch) | {"cu_seq_lens_host": wrong}
        with pytest.raises(AttentionBackendError, match="cu_seq_lens_host"), torch.no_grad():
            model(input_ids=batch.input_ids, **kwargs)


def test_the_backend_is_resolved_for_the_device_the_model_will_run_on(monkeypatch):
    """At ZeRO stages 0-2 the model is loaded on the host and DeepSpeed moves it to the GPU: a GPU
    backend must be checked against the GPU, not against where the weights are at that moment."""
    import dpo_dist.attention as attention

    def on_cuda_only(backend, device, dtype):
        return None if device.type == "cuda" or backend == "sdpa" else f"{backend} needs CUDA"

    monkeypatch.setattr(attention, "_unavailable_reason", on_cuda_only)
    model = tiny_llama()  # weights on the CPU
    with pytest.raises(AttentionBackendError, match="varlen needs CUDA"):
        enable_packed_attention(model, "varlen")
    assert enable_packed_attention(tiny_llama(), "varlen", torch.device("cuda")) == "varlen"


def test_auto_names_what_it_passed_over_and_why(monkeypatch):
    """auto's choice is explained: every backend before it with the reason it cannot run (logged by
    the engine on CUDA, where a missing or broken flash_attn would otherwise go unnoticed)."""
    import dpo_dist.attention as attention

    assert [name for name, _ in attention.auto_skipped("cpu")] == ["flash", "varlen"]
    assert all("CUDA device" in reason for _, reason in attention.auto_skipped("cpu"))
    assert attention.resolve_attn_backend("auto", "cpu") == "sdpa"

    def flash_broken(backend, device, dtype):
        return "flash_attn failed to import" if backend == "flash" else None

    monkeypatch.setattr(attention, "_unavailable_reason", flash_broken)
    assert attention.auto_skipped("cpu") == [("flash", "flash_attn failed to import")]
    assert attention.resolve_attn_backend("auto", "cpu") == "varlen"


def test_varlen_without_gqa_support_says_it_copies_kv_heads(monkeypatch):
    """A torch whose varlen_attn lacks enable_gqa repeats K/V per query head in every layer: the
    backend line says so for grouped-query models (the tiny model: 4 query heads, 2 K/V heads)."""
    import dpo_dist.attention as attention

    config = tiny_llama().config
    assert config.num_attention_heads != config.num_key_value_heads
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: (object(), False))
    assert attention._repeats_kv_heads(config)
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: (object(), True))
    assert not attention._repeats_kv_heads(config)
    config.num_key_value_heads = config.num_attention_heads
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: (object(), False))
    assert not attention._repeats_kv_heads(config)  # no grouping: nothing to copy
