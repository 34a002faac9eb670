"""Packed, chunked per-sequence log-probs against unpacked and full-logits computations."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
)

from dpo_dist.attention import enable_packed_attention, packed_forward_kwargs
from dpo_dist.data.batch import IGNORE_INDEX
from dpo_dist.logprobs import padded_sequence_logps, sequence_logps, split_pairs
from dpo_dist.model import enable_activation_checkpointing
from tests.unit.tiny_models import (
    backend_params,
    packed_batch,
    padded_batch,
    random_sequences,
    reference_sequence_logps,
    seeded,
    tiny_config,
    tiny_llama,
)

LENGTHS = [5, 9, 17, 12, 30, 7, 3, 21]


def max_relative_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().double(), expected.detach().double()
    return float(((got - expected).abs() / expected.abs().clamp(min=1e-12)).max())


def stock_and_packed(model):
    """(model with its own attention, deep copy switched to packed sdpa attention)."""
    packed = copy.deepcopy(model)
    enable_packed_attention(packed, "sdpa")
    return model, packed


def response_token_counts(sequences) -> torch.Tensor:
    # Position 0 of a sequence is never predicted, so its label cannot count.
    return torch.tensor([int((labels[1:] != IGNORE_INDEX).sum()) for _, labels in sequences])


def full_logits_logps(model, batch) -> torch.Tensor:
    """Per-sequence sums from the whole [T, V] log-softmax at once: the memory-hungry reference."""
    logits = model(input_ids=batch.input_ids, **packed_forward_kwargs(batch)).logits[0].float()
    log_probs = logits[:-1].log_softmax(dim=-1)
    targets = batch.labels[0, 1:]
    scored = (targets != IGNORE_INDEX) & (batch.seq_index[1:] == batch.seq_index[:-1])
    token_logps = log_probs.gather(1, targets.clamp(min=0)[:, None])[:, 0] * scored
    return torch.zeros(batch.num_sequences).index_add(0, batch.seq_index[:-1], token_logps)


@pytest.mark.parametrize("backend", backend_params())
def test_packed_equals_unpacked_and_longhand(backend):
    stock = tiny_llama()
    packed_model = copy.deepcopy(stock)
    enable_packed_attention(packed_model, backend)
    sequences = random_sequences(LENGTHS)
    with torch.no_grad():
        packed = sequence_logps(packed_model, packed_batch(sequences), chunk_tokens=16)
        singles = torch.cat([sequence_logps(packed_model, packed_batch([s])).logps for s in sequences])
        longhand = reference_sequence_logps(stock, sequences)
    assert packed.logps.dtype == torch.float32
    assert max_relative_diff(packed.logps, singles) <= 1e-5
    assert max_relative_diff(packed.logps, longhand) <= 1e-5
    assert torch.equal(packed.token_counts, response_token_counts(sequences))
    assert torch.equal(packed.sum_logps, packed.logps)


def test_mean_normalization_divides_by_response_tokens():
    _, packed_model = stock_and_packed(tiny_llama())
    batch = packed_batch(random_sequences(LENGTHS))
    with torch.no_grad():
        summed = sequence_logps(packed_model, batch)
        mean = sequence_logps(packed_model, batch, normalize="mean")
    torch.testing.assert_close(mean.sum_logps, summed.logps)
    torch.testing.assert_close(mean.logps, summed.logps / summed.token_counts)


def test_mean_of_a_response_with_no_scored_token_is_zero_not_nan():
    """An empty prompt's one-token response is scored nowhere (no position predicts a sequence's
    first token): its per-token mean is 0, not 0 / 0, and the row's other means are unchanged."""
    _, packed_model = stock_and_packed(tiny_llama())
    sequences = random_sequences([7, 1])
    ids, labels = sequences[1]
    labels[0] = ids[0]
    with torch.no_grad():
        summed = sequence_logps(packed_model, packed_batch(sequences))
        mean = sequence_logps(packed_model, packed_batch(sequences), normalize="mean")
    assert mean.token_counts.tolist() == [5, 0] and mean.logps[1] == 0
    torch.testing.assert_close(mean.logps[0], summed.logps[0] / 5)


def test_padded_path_agrees_and_refuses_packed_models():
    stock, packed_model = stock_and_packed(tiny_llama())
    sequences = random_sequences(LENGTHS)
    with torch.no_grad():
        padded = padded_sequence_logps(stock, padded_batch(sequences))
        packed = sequence_logps(packed_model, packed_batch(sequences))
    assert max_relative_diff(padded.logps, packed.logps) <= 1e-5
    assert torch.equal(padded.token_counts, packed.token_counts)
    with pytest.raises(ValueError, match="standard attention"):
        padded_sequence_logps(packed_model, padded_batch(sequences))


@pytest.mark.parametrize("chunk", ["1", "7", "T", "T+5"])
def test_chunked_equals_full_logits_in_values_and_gradients(chunk):
    _, model = stock_and_packed(tiny_llama())
    batch = packed_batch(random_sequences([6, 11, 4, 9]))
    tokens = batch.num_tokens
    chunk_tokens = {"1": 1, "7": 7, "T": tokens, "T+5": tokens + 5}[chunk]
    weights = torch.randn(batch.num_sequences, generator=torch.Generator().manual_seed(3))

    def values_and_grads(compute):
        model.zero_grad()
        logps = compute()
        (logps * weights).sum().backward()
        return logps.detach(), [p.grad.clone() for p in model.parameters()]

    chunked, chunked_grads = values_and_grads(
        lambda: sequence_logps(model, batch, chunk_tokens=chunk_tokens).logps
    )
    full, full_grads = values_and_grads(lambda: full_logits_logps(model, batch))
    assert max_relative_diff(chunked, full) <= 1e-6
    for (name, _), got, expected in zip(model.named_parameters(), chunked_grads, full_grads):
        assert expected.abs().sum() > 0, name  # every parameter gets gradient from the log-probs
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_activation_checkpointed_decoder_gives_the_same_gradients():
    plain = tiny_llama()
    enable_packed_attention(plain, "sdpa")
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    batch = packed_batch(random_sequences(LENGTHS))
    for model in (plain, checkpointed):
        model.train()
        sequence_logps(model, batch, chunk_tokens=16).logps.sum().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


class SavedTensorMeter:
    """Bytes that autograd saves for backward during a forward pass, and those of [..., V] activations."""

    def __init__(self, model: nn.Module, vocab: int):
        self.parameters = {p.data_ptr() for p in model.parameters()}
        self.vocab = vocab
        self.total_bytes = self.vocab_bytes = 0

    def pack(self, tensor):
        size = tensor.numel() * tensor.element_size()
        self.total_bytes += size
        if tensor.shape and tensor.shape[-1] == self.vocab and tensor.data_ptr() not in self.parameters:
            self.vocab_bytes += size
        return tensor

    def measure(self, compute):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            return compute()


def test_backward_graph_never_holds_full_logits():
    vocab = 16384
    model = tiny_llama(vocab_size=vocab)
    enable_packed_attention(model, "sdpa")
    batch = packed_batch(random_sequences([30, 40, 20, 38], vocab=vocab))
    tokens, chunk_tokens = batch.num_tokens, 16
    full_logits_bytes = tokens * vocab * 4
    head_calls = []
    model.lm_head.register_forward_hook(lambda module, args, out: head_calls.append(tuple(out.shape)))

    chunked = SavedTensorMeter(model, vocab)
    logps = chunked.measure(lambda: sequence_logps(model, batch, chunk_tokens=chunk_tokens).logps)
    forward_rows = sum(rows for rows, _ in head_calls)
    naive = SavedTensorMeter(model, vocab)
    naive.measure(lambda: full_logits_logps(model, batch))

    # The meter sees full logits when a path keeps them (so this test can fail)...
    assert naive.vocab_bytes >= full_logits_bytes * (tokens - 1) // tokens
    # ...while the chunked path keeps no vocabulary-sized activation at all, and little in total.
    assert chunked.vocab_bytes == 0
    assert chunked.total_bytes < full_logits_bytes // 2

    # Only positions that score a response token reach the LM head: prompt positions (a third of
    # each sequence here) and each sequence's last position cost no vocabulary projection.
    scored = len(batch.scored_positions)
    assert forward_rows == scored < tokens - 1 - 30
    chunks = -(-scored // chunk_tokens)
    head_calls.clear()
    logps.sum().backward()
    # Backward recomputes every chunk's logits (one chunk at a time) instead of storing them.
    assert len(head_calls) == chunks
    assert max(rows for rows, _ in head_calls) <= chunk_tokens


def test_reference_pass_under_no_grad_skips_checkpointing(monkeypatch):
    """Under no_grad (the reference pass) the chunks run directly: checkpointing would only add
    its bookkeeping. With grad every chunk goes through the checkpoint function."""
    import dpo_dist.logprobs as logprobs

    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(logprobs, "checkpoint", counting_checkpoint)
    _, model = stock_and_packed(tiny_llama())
    batch = packed_batch(random_sequences(LENGTHS))
    with torch.no_grad():
        out = sequence_logps(model, batch, chunk_tokens=8)
    assert not out.logps.requires_grad
    assert len(calls) == 0
    recorded = sequence_logps(model, batch, chunk_tokens=8).logps
    chunks = -(-len(batch.scored_positions) // 8)
    assert len(calls) == chunks  # every chunk of the graph-recording pass is checkpointed
    torch.testing.assert_close(out.logps, recorded.detach())


def test_nothing_is_scored_across_a_sequence_boundary():
    """Even if a sequence's first token is labelled, the previous sequence's last position never scores it."""
    stock, packed_model = stock_and_packed(tiny_llama())
    sequences = random_sequences([8, 10, 6])
    for ids, labels in sequences[1:]:
        labels[0] = ids[0]
    with torch.no_grad():
        packed = sequence_logps(packed_model, packed_batch(sequences))
        longhand = reference_sequence_logps(stock, sequences)
    assert max_relative_diff(packed.logps, longhand) <= 1e-5
    assert torch.equal(packed.token_counts, response_token_counts(sequences))


def test_peft_wrapped_model_scores_and_trains_adapters():
    stock = tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(stock), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert enable_packed_attention(peft_model, "auto") == "sdpa"
    sequences = random_sequences(LENGTHS)
    out = sequence_logps(peft_model, packed_batch(sequences))
    # LoRA starts as the identity (B = 0), so the scores are the base model's.
    assert max_relative_diff(out.logps, reference_sequence_logps(stock, sequences)) <= 1e-5
    out.logps.sum().backward()
    adapter_grads = [p.grad for name, p in peft_model.named_parameters() if "lora_B" in name]
    assert adapter_grads and all(g is not None and g.abs().sum() > 0 for g in adapter_grads)


@pytest.mark.parametrize(
    "model_class, config",
    [
        (GraniteForCausalLM, tiny_config(GraniteConfig, logits_scaling=4.0)),
        (CohereForCausalLM, tiny_config(CohereConfig, logit_scale=0.5)),
        # Gemma 2 also alternates sliding-window and full layers and scales queries by its own rule.
        (
            Gemma2ForCausalLM,
            tiny_config(
                Gemma2Config,
                head_dim=16,
                final_logit_softcapping=2.0,
                attn_logit_softcapping=None,
                sliding_window=4,
            ),
        ),
    ],
    ids=["granite-logits_scaling", "cohere-logit_scale", "gemma2-final_softcap"],
)
def test_other_architectures_with_output_logit_transforms(model_class, config):
    stock, packed_model = stock_and_packed(seeded(model_class, config))
    sequences = random_sequences(LENGTHS)
    with torch.no_grad():
        packed = sequence_logps(packed_model, packed_batch(sequences), chunk_tokens=16)
        padded = padded_sequence_logps(stock, padded_batch(sequences))
    assert max_relative_diff(packed.logps, padded.logps) <= 1e-5


def test_lm_head_bias_is_applied():
    stock = tiny_llama()
    stock.lm_head = nn.Linear(64, 128, bias=True)
    nn.init.normal_(stock.lm_head.bias, std=1.0)
    stock, packed_model = stock_and_packed(stock)
    sequences = random_sequences(LENGTHS)
    with torch.no_grad():
        packed = sequence_logps(packed_model, packed_batch(sequences))
        longhand = reference_sequence_logps(stock, sequences)
    assert max_relative_diff(packed.logps, longhand) <= 1e-5


def test_invalid_arguments_are_rejected():
    _, model = stock_and_packed(tiny_llama())
    batch = packed_batch(random_sequences([4, 5]))
    with pytest.raises(ValueError, match="normalize must be one of sum, mean"):
        sequence_logps(model, batch, normalize="avg")
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        sequence_logps(model, batch, chunk_tokens=0)


def test_split_pairs_follows_the_packing_order():
    chosen, rejected = split_pairs(torch.tensor([10.0, 11.0, 20.0, 21.0, 30.0, 31.0]))
    assert chosen.tolist() == [10.0, 20.0, 30.0] and rejected.tolist() == [11.0, 21.0, 31.0]


@pytest.mark.parametrize("num_chunks", [1, 3, 100])
def test_fixed_chunk_count_calls_the_lm_head_that_often_and_agrees(num_chunks):
    """ZeRO-3 needs the same LM-head call count on every rank whatever the row length."""
    _, model = stock_and_packed(tiny_llama())
    batch = packed_batch(random_sequences([6, 11, 4, 9]))
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            got = sequence_logps(model, batch, num_chunks=num_chunks).logps
    finally:
        hook.remove()
    assert len(calls) == num_chunks  # 100 > T: the surplus chunks are empty calls, not skipped
    assert max_relative_diff(got, full_logits_logps(model, batch)) <= 1e-6


@pytest.mark.parametrize("chunk_tokens", [5, 1024])
def test_wpo_aligned_logps_from_each_sequence_alone(chunk_tokens):
    """weighting=True adds, per sequence, the mean over its response tokens of log p(token) minus
    log sum_v p(v)^2 (WPO's aligned log-prob), from each sequence's own full-vocabulary softmax;
    the log-probs and their gradients are those of weighting=False, the new output is detached."""
    stock, packed_model = stock_and_packed(tiny_llama())
    sequences = random_sequences(LENGTHS)
    batch = packed_batch(sequences)
    want = []
    with torch.no_grad():
        for ids, labels in sequences:
            probs = stock(input_ids=ids[None]).logits[0, :-1].double().softmax(dim=-1)
            scored = labels[1:] != IGNORE_INDEX
            token_p = probs.gather(1, ids[1:, None])[:, 0]
            aligned = torch.log(token_p) - torch.log((probs**2).sum(dim=-1))
            want.append(aligned[scored].mean())
    out = sequence_logps(packed_model, batch, chunk_tokens=chunk_tokens, weighting=True)
    torch.testing.assert_close(out.aligned_logps.double(), torch.stack(want), rtol=1e-5, atol=1e-6)
    assert not out.aligned_logps.requires_grad
    plain = sequence_logps(packed_model, batch, chunk_tokens=chunk_tokens)
    assert plain.aligned_logps is None
    torch.testing.assert_close(out.logps, plain.logps, rtol=0, atol=0)
    grads = [torch.autograd.grad(o.logps.sum(), packed_model.parameters()) for o in (out, plain)]
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("chunk_tokens, num_chunks", [(5, None), (1024, None), (64, 7)])
def test_ld_tail_sums_from_each_sequence_alone(chunk_tokens, num_chunks):
    """tails=True adds LD-DPO's tail sums: per sequence, its response tokens' log-probs at 0-based
    response positions >= min(chosen tokens, rejected tokens) of its pair, from one plain forward
    per sequence. Pairs of differing lengths either way round, and one of equal lengths (no tail on
    either side); the log-probs are those of tails=False, and ld_alpha = 1 gives them exactly."""
    from dpo_dist.logprobs import length_desensitized

    stock, packed_model = stock_and_packed(tiny_llama())
    # (prompt, response) lengths of chosen_i, rejected_i: longer chosen, longer rejected, equal, 1 vs 1.
    shapes = [(4, 9), (4, 3), (6, 5), (6, 12), (3, 7), (3, 7), (2, 1), (2, 1)]
    sequences = []
    for i, (prompt, response) in enumerate(shapes):
        ids, _ = random_sequences([prompt + response], seed=i)[0]
        labels = ids.clone()
        labels[:prompt] = IGNORE_INDEX
        sequences.append((ids, labels))
    batch = packed_batch(sequences)
    want = []
    with torch.no_grad():
        for i, (ids, labels) in enumerate(sequences):
            log_probs = stock(input_ids=ids[None]).logits[0, :-1].double().log_softmax(dim=-1)
            token_logps = log_probs.gather(1, ids[1:, None])[:, 0][labels[1:] != IGNORE_INDEX]
            shared = min(shapes[i][1], shapes[i ^ 1][1])  # i ^ 1: the other response of the pair
            want.append(token_logps[shared:].sum())
    out = sequence_logps(packed_model, batch, chunk_tokens=chunk_tokens, num_chunks=num_chunks, tails=True)
    torch.testing.assert_close(out.tail_logps.double(), torch.stack(want), rtol=1e-5, atol=1e-6)
    assert out.tail_logps[4:6].tolist() == [0.0, 0.0] and (out.tail_logps[[0, 3]] < 0).all()
    assert out.tail_logps.requires_grad  # the tails' tokens take ld_alpha's share of the gradient
    plain = sequence_logps(packed_model, batch, chunk_tokens=chunk_tokens, num_chunks=num_chunks)
    assert plain.tail_logps is None
    torch.testing.assert_close(out.logps, plain.logps, rtol=0, atol=0)
    assert torch.equal(length_desensitized(out.sum_logps, out.tail_logps, 1.0), plain.sum_logps)
    assert torch.equal(out.desensitized_sums(None), plain.sum_logps)
    half = out.desensitized_sums(0.5)
    torch.testing.assert_close(half, out.sum_logps - 0.5 * out.tail_logps)
    with pytest.raises(ValueError, match="tails need a row of pairs"):
        sequence_logps(packed_model, packed_batch(sequences[:3]), tails=True)
