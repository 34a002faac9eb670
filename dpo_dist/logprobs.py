"""Per-sequence log-probabilities of response tokens, without full [T, V] fp32 logits.

``sequence_logps`` runs the decoder of a causal LM on one packed row, then scores next tokens in
chunks of ``chunk_tokens`` positions through the LM head. Each chunk's logits are upcast to fp32,
reduced to one log-prob per position and dropped; under autograd each chunk is activation-
checkpointed, so backward recomputes its logits instead of keeping them. Only one chunk's
[chunk_tokens, V] tensors are alive at a time, forward or backward: the logits, their fp32 upcast
and log-softmax, and in backward their gradients, ``(2b + 12) * chunk_tokens * V`` bytes for
b-byte weights (2.1 GB at 1024 x 128k in bf16; ``dpo_dist.memory`` plans with the same count),
where full fp32 logits of a 16k-token micro-batch would take 8.4 GB before any gradient.

Precision: autograd sums the LM-head weight's gradient over chunks in the weight's dtype. In bf16
that adds rounding: against fp64, the gradient's relative error was 0.24% unchunked, 0.42% at 8
chunks and 0.65% at 32 (8192 tokens, hidden 256, vocab 8192, CPU), within bf16's own noise, so
no fp32 accumulator (it would need a custom autograd function around ZeRO-3's gathered head).

Scoring rule: the hidden state at position t scores token t+1 when ``labels[t + 1] != -100`` and
both positions belong to the same sequence (``PackedBatch.scored_positions``, computed on the host
at collate time). Only those positions go through the LM head: prompt positions, about half of a
preference pair's tokens, cost no vocabulary projection and no log-softmax.

Output-logit transforms that some models apply after the LM head are reproduced from the config:
``logit_scale`` (Cohere: multiply), ``logits_scaling`` (Granite: divide) and
``final_logit_softcapping`` (Gemma 2/3: tanh soft-cap). Any other post-head transform in a model's
``forward`` is not seen here, because only the decoder and the LM head are called.

LD-DPO (``tails=True``, for ``loss.ld_alpha``): each response's "tail", its tokens past the
shorter response of its pair, is summed too, from the same per-token log-probs (no further LM-head
work). The shared length comes from the row's own token counts on the device: both responses of a
pair are always in one row, so the host passes nothing and nothing is synchronised.

Public API: ``SequenceLogps``, ``sequence_logps``, ``padded_sequence_logps``, ``split_pairs``,
``response_tail_sums``, ``length_desensitized``, ``normalized_logps``, ``LOGP_NORMALIZATIONS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpo_dist.attention import is_packed_attention, packed_forward_kwargs, unwrap_model
from dpo_dist.data.batch import IGNORE_INDEX, PackedBatch, PaddedBatch

LOGP_NORMALIZATIONS = ("sum", "mean")


@dataclass
class SequenceLogps:
    """Per-sequence results of one micro-batch, in batch order (chosen_0, rejected_0, chosen_1, ...)."""

    logps: torch.Tensor
    """[S] float32: summed response-token log-probs, or their mean per token when normalize="mean"."""
    sum_logps: torch.Tensor
    """[S] float32: summed response-token log-probs whatever the normalization (for NLL terms)."""
    token_counts: torch.Tensor
    """[S] int64: number of scored response tokens per sequence."""
    aligned_logps: torch.Tensor | None = None
    """[S] float32, detached, when asked for (``weighting=True``): the mean over the response's
    tokens of log p(token) - log sum_v p(v)^2, the exponent of WPO's sequence weight (Zhou et al.
    2024, arXiv 2406.11827, eq. 2, with its sampling-aligned per-token probability, as TRL computes it)."""
    tail_logps: torch.Tensor | None = None
    """[S] float32, when asked for (``tails=True``): the sum of the response's token log-probs past
    its pair's shared length (``response_tail_sums``), differentiable like ``sum_logps``."""

    def desensitized_sums(self, ld_alpha: float | None) -> torch.Tensor:
        """[S] summed log-probs with LD-DPO's ``ld_alpha`` (``length_desensitized``); None: ``sum_logps``."""
        return length_desensitized(self.sum_logps, self.tail_logps, ld_alpha)


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-sequence values ordered chosen_0, rejected_0, chosen_1, ... into (chosen, rejected)."""
    return x[0::2], x[1::2]


def length_desensitized(sum_logps: torch.Tensor, tail_logps: torch.Tensor | None, ld_alpha: float | None) -> torch.Tensor:
    """LD-DPO's log-prob of a response (Liu et al. 2024, arXiv 2409.06411; TRL's ld_alpha):
    the sum over its first l_p tokens (l_p: the shorter response of its pair) plus ``ld_alpha``
    times the sum over the rest, its ``tail_logps``. Written as ``sum - (1 - ld_alpha) * tail`` so
    that ld_alpha = 1 gives ``sum_logps`` exactly. ``ld_alpha`` None (LD off): ``sum_logps``."""
    if ld_alpha is None:
        return sum_logps
    if tail_logps is None:
        raise ValueError("ld_alpha needs the tail sums: score with tails=True")
    return sum_logps - (1.0 - ld_alpha) * tail_logps


def response_tail_sums(token_logps: torch.Tensor, sequence: torch.Tensor, token_counts: torch.Tensor) -> torch.Tensor:
    """[S] per sequence, the sum of ``token_logps`` at 0-based response positions >= its pair's
    shared length min(chosen tokens, rejected tokens): 0 for the shorter response of a pair.

    ``token_logps`` [N]: the scored tokens of all sequences, each sequence's in order and the
    sequences one after another (as ``scored_positions`` lists them); ``sequence`` [N] the sequence
    of each; ``token_counts`` [S] the tokens per sequence, sequences paired chosen_i, rejected_i.
    Device ops only, no host sync."""
    shared = torch.minimum(*split_pairs(token_counts))
    shared = torch.stack([shared, shared], dim=1).flatten()  # per sequence, in chosen_i, rejected_i order
    first = torch.cumsum(token_counts, dim=0) - token_counts  # index of each sequence's first scored token
    position = torch.arange(sequence.numel(), device=sequence.device) - first.index_select(0, sequence)
    tail = position >= shared.index_select(0, sequence)
    return token_logps.new_zeros(token_counts.numel()).index_add(0, sequence, torch.where(tail, token_logps, 0.0))


def sequence_logps(
    model: nn.Module,
    batch: PackedBatch,
    *,
    chunk_tokens: int = 1024,
    normalize: str = "sum",
    num_chunks: int | None = None,
    weighting: bool = False,
    tails: bool = False,
) -> SequenceLogps:
    """Response log-probs of every sequence of one packed row; differentiable w.r.t. the model.
    ``weighting`` also returns WPO's ``aligned_logps`` (one more no-grad reduction per LM-head chunk),
    ``tails`` LD-DPO's ``tail_logps`` (a row of pairs: chosen_0, rejected_0, ...).

    ``model`` is a causal LM switched to packed attention (``dpo_dist.attention.enable_packed_attention``),
    possibly wrapped by PEFT, DDP or DeepSpeed. No device-to-host synchronisation happens here.

    ``num_chunks`` fixes how many LM-head calls a row takes, whatever its length (chunks of
    ``ceil(T / num_chunks)`` positions, some possibly empty). Under ZeRO-3 every LM-head call
    gathers its weight collectively, so all ranks must make the same number of calls although
    their rows differ in length; the engine passes ``ceil(micro_batch_tokens / chunk_tokens)``.
    """
    _check_normalize(normalize)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if tails and batch.num_sequences != 2 * batch.num_pairs:
        raise ValueError(f"tails need a row of pairs, got {batch.num_sequences} sequences for {batch.num_pairs} pairs")
    causal_lm = unwrap_model(model)
    decoder, lm_head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
    if decoder is causal_lm or lm_head is None:
        raise TypeError(f"{type(causal_lm).__name__} has no separate decoder and LM head to score with")

    hidden = decoder(input_ids=batch.input_ids, **packed_forward_kwargs(batch))[0][0]  # [T, H]
    positions = batch.scored_positions  # only these reach the LM head (prompt positions score nothing)
    targets = batch.labels[0].index_select(0, positions + 1)
    if num_chunks is not None:
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
        chunk_tokens = max(1, -(-len(positions) // num_chunks))
    token_logps, log_sum_sq = _chunked_token_logps(
        lm_head, hidden.index_select(0, positions), targets, chunk_tokens, _logit_transform(causal_lm.config), num_chunks, weighting
    )
    sequence = batch.seq_index.index_select(0, positions)
    sum_logps = token_logps.new_zeros(batch.num_sequences).index_add(0, sequence, token_logps)
    out = _normalized(sum_logps, batch.scored_token_counts(), normalize)
    if weighting:
        aligned = sum_logps.detach().new_zeros(batch.num_sequences).index_add(0, sequence, token_logps.detach() - log_sum_sq)
        out.aligned_logps = aligned / out.token_counts.clamp(min=1)
    if tails:
        out.tail_logps = response_tail_sums(token_logps, sequence, out.token_counts)
    return out


def padded_sequence_logps(model: nn.Module, batch: PaddedBatch, normalize: str = "sum") -> SequenceLogps:
    """The same quantities from a standard padded forward; for parity tests and baselines only.

    It materializes the full [S, L, V] fp32 logits and their log-softmax, so it is memory-hungry by
    design. ``model`` must use a standard attention implementation (eager/sdpa/flash_attention_2),
    not packed attention, which needs cu_seqlens.
    """
    _check_normalize(normalize)
    if is_packed_attention(model):
        raise ValueError(
            "padded_sequence_logps needs a model with standard attention; this one was switched to packed "
            "attention (use model.set_attn_implementation('sdpa') or a separate copy)"
        )
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    log_probs = logits[:, :-1].float().log_softmax(dim=-1)
    targets = batch.labels[:, 1:]
    scored = targets != IGNORE_INDEX
    token_logps = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sum_logps = torch.where(scored, token_logps, 0.0).sum(dim=-1)
    return _normalized(sum_logps, scored.long().sum(dim=-1), normalize)


def _check_normalize(normalize: str) -> None:
    if normalize not in LOGP_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(LOGP_NORMALIZATIONS)}, got {normalize!r}")


def normalized_logps(sum_logps: torch.Tensor, token_counts: torch.Tensor, normalize: str) -> torch.Tensor:
    """Summed log-probs as ``normalize`` asks: themselves, or per token (``mean``)."""
    return sum_logps if normalize == "sum" else sum_logps / token_counts.clamp(min=1)


def _normalized(sum_logps: torch.Tensor, token_counts: torch.Tensor, normalize: str) -> SequenceLogps:
    logps = normalized_logps(sum_logps, token_counts, normalize)
    return SequenceLogps(logps=logps, sum_logps=sum_logps, token_counts=token_counts)


def _logit_transform(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The post-LM-head logit transform the model's forward applies, from its config (see module doc)."""
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if scale is None and divisor is None and softcap is None:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return transform


def _token_logps(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, transform, weighting: bool = False):
    """log p(target | hidden) per position in fp32; 0 where the target is IGNORE_INDEX. With
    ``weighting`` also log sum_v p(v)^2 per position (detached): (log p, log sum p^2)."""
    logits = lm_head(hidden).float()
    if transform is not None:
        logits = transform(logits)
    # cross_entropy is log_softmax + nll_loss: the log-softmax is its only [chunk, V] tensor (kept for backward).
    token_logps = -F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    if not weighting:
        return token_logps
    with torch.no_grad():  # log sum softmax(z)^2 = logsumexp(2z) - 2 logsumexp(z), no [chunk, V] probabilities kept
        log_sum_sq = torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1)
    return token_logps, log_sum_sq


def _chunked_token_logps(
    lm_head, hidden, targets, chunk_tokens: int, transform, num_chunks: int | None = None, weighting: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position (log p, log sum p^2 or None without ``weighting``) over all chunks."""
    if num_chunks is None:
        if hidden.shape[0] == 0:
            empty = hidden.new_zeros(0, dtype=torch.float32)
            return empty, (empty if weighting else None)
        num_chunks = -(-hidden.shape[0] // chunk_tokens)
    # Checkpointing only matters when a graph is being recorded; the reference pass runs under no_grad.
    recording = torch.is_grad_enabled()
    pieces = []
    for start in range(0, num_chunks * chunk_tokens, chunk_tokens):
        chunk = (
            lm_head,
            hidden[start : start + chunk_tokens],
            targets[start : start + chunk_tokens],
            transform,
            weighting,
        )
        if recording:
            pieces.append(checkpoint(_token_logps, *chunk, use_reentrant=False))
        else:
            pieces.append(_token_logps(*chunk))
    if not weighting:
        return torch.cat(pieces), None
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
