"""Varlen causal attention for packed rows, plugged into Hugging Face causal LMs.

A packed row (``dpo_dist.data.batch.PackedBatch``) holds many sequences back to back; every token
may attend only to earlier tokens of its own sequence. The boundaries travel as ``cu_seqlens``
through the ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments that transformers forwards
from ``model(...)`` to the attention function (see ``packed_forward_kwargs``).

Backends, in the order ``auto`` tries them:

- ``flash``: flash_attn's varlen kernel (FA2 ``flash_attn.flash_attn_varlen_func``, or FA4
  ``flash_attn.cute`` when the ``flash-attn-4`` distribution is installed). CUDA, fp16/bf16.
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.11). CUDA, fp16/bf16: it
  dispatches only to flash/cuDNN kernels and has no CPU implementation.
- ``sdpa``: ``F.scaled_dot_product_attention``, any device and dtype: the CPU and fallback path.
  One causal call per sequence of the row, its boundaries read from ``cu_seq_lens_host`` (host
  ints, ``packed_forward_kwargs``), since a mask over the row would cost the full [T, T] scores.
  Only a caller that passes no host boundaries on a GPU gets one call with a block-diagonal causal
  boolean mask (T*T bytes, built once per forward). Both forms are tested to agree.

A forced backend that cannot run raises ``AttentionBackendError``; nothing falls back silently.

Public API: ``ATTN_BACKENDS``, ``AttentionBackendError``, ``available_backends``, ``auto_skipped``,
``resolve_attn_backend``, ``enable_packed_attention``, ``is_packed_attention``,
``packed_forward_kwargs``, ``unwrap_model``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import logging
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel

from dpo_dist.data.batch import PackedBatch

logger = logging.getLogger(__name__)

ATTN_BACKENDS = ("auto", "flash", "varlen", "sdpa")
_KERNEL_ORDER = ("flash", "varlen", "sdpa")
_HALF_DTYPES = (torch.float16, torch.bfloat16)

# Names under which the functions are registered with transformers. They avoid the substrings
# "flash" and "sdpa": transformers special-cases implementation names that contain them.
_IMPL_NAMES = {
    "flash": "dpo_dist_packed_fa",
    "varlen": "dpo_dist_packed_varlen",
    "sdpa": "dpo_dist_packed_mask",
}


class AttentionBackendError(ValueError):
    """A packed-attention backend was requested or called in a way that cannot be correct."""


# ---------------------------------------------------------------------------------------------
# Backend discovery


@functools.cache
def _flash_kernel() -> tuple[Callable | None, str]:
    """The installed flash-attention varlen function and a description, or (None, why not)."""
    if importlib.util.find_spec("flash_attn") is None:
        return None, "installed: no"
    # FA2 wheels also ship a flash_attn/cute folder, so only the flash-attn-4 distribution means FA4.
    distributions = importlib.metadata.packages_distributions().get("flash_attn", [])
    is_fa4 = any(name.replace("_", "-").lower() == "flash-attn-4" for name in distributions)
    try:
        if is_fa4:
            from flash_attn.cute import flash_attn_varlen_func
        else:
            from flash_attn import flash_attn_varlen_func
    except Exception as error:  # a broken CUDA extension raises anything from ImportError to OSError
        return None, f"installed: yes, import failed: {type(error).__name__}: {error}"
    return flash_attn_varlen_func, "FA4 (flash_attn.cute)" if is_fa4 else "FA2"


@functools.cache
def _varlen_kernel() -> tuple[Callable | None, bool]:
    """torch's varlen_attn and whether it accepts ``enable_gqa``; (None, False) when unusable."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    parameters = inspect.signature(varlen_attn).parameters
    # torch 2.10 only had is_causal; causal-with-window needs window_size (torch >= 2.11).
    if "window_size" not in parameters:
        return None, False
    return varlen_attn, "enable_gqa" in parameters


def _unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    """None when ``backend`` can run on ``device`` with weights of ``dtype``, else one line why not."""
    if backend == "sdpa":
        return None
    half_ok = dtype is None or dtype in _HALF_DTYPES
    dtype_note = "" if dtype is None else f", dtype: {str(dtype).removeprefix('torch.')}"
    if backend == "flash":
        kernel, status = _flash_kernel()
        if kernel is not None and device.type == "cuda" and half_ok:
            return None
        return (
            f"model.attn_backend=flash needs the flash_attn package, a CUDA device and fp16/bf16 weights; "
            f"{status}, device: {device.type}{dtype_note}"
        )
    kernel, _ = _varlen_kernel()
    capable = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    if kernel is not None and capable and half_ok:
        return None
    return (
        "model.attn_backend=varlen needs torch.nn.attention.varlen.varlen_attn with window_size "
        f"(torch >= 2.11), a CUDA device of compute capability >= 8.0 and fp16/bf16 weights; "
        f"torch: {torch.__version__}, varlen_attn: {'yes' if kernel else 'no'}, device: {device.type}{dtype_note}"
    )


def available_backends(device: torch.device | str, dtype: torch.dtype | None = None) -> list[str]:
    """Backends that can run on ``device`` (with weights of ``dtype`` when given), in ``auto`` order."""
    device = torch.device(device)
    return [name for name in _KERNEL_ORDER if _unavailable_reason(name, device, dtype) is None]


def auto_skipped(device: torch.device | str, dtype: torch.dtype | None = None) -> list[tuple[str, str]]:
    """(backend, why it cannot run) for each backend ``auto`` passes over before its choice."""
    device = torch.device(device)
    skipped = []
    for name in _KERNEL_ORDER:
        reason = _unavailable_reason(name, device, dtype)
        if reason is None:
            break
        skipped.append((name, reason))
    return skipped


def resolve_attn_backend(requested: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The concrete backend for ``model.attn_backend=requested``: ``auto`` picks the first available.

    Raises ``AttentionBackendError`` for an unknown name or a forced backend that cannot run here.
    """
    if requested not in ATTN_BACKENDS:
        raise AttentionBackendError(
            f"model.attn_backend={requested!r} is not one of {', '.join(ATTN_BACKENDS)}"
        )
    device = torch.device(device)
    if requested == "auto":
        return available_backends(device, dtype)[0]
    reason = _unavailable_reason(requested, device, dtype)
    if reason is not None:
        raise AttentionBackendError(reason)
    return requested


# ---------------------------------------------------------------------------------------------
# Kernels: q is (total_q, Hq, D), k/v are (total_k, Hkv, D); each returns (total_q, Hq, Dv).


def _flash_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, window):
    kernel, _ = _flash_kernel()
    options = {"softmax_scale": scale, "causal": True}
    if window is not None:
        options["window_size"] = (window - 1, 0)
    out = kernel(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, **options
    )
    return out[0] if isinstance(out, tuple) else out  # FA4 returns (out, lse)


def _varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, window):
    kernel, takes_gqa = _varlen_kernel()
    groups = q.shape[1] // k.shape[1]
    options = {}
    if groups > 1 and takes_gqa:
        options["enable_gqa"] = True
    elif groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    left = -1 if window is None else window - 1
    return kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(left, 0), **options)


# One cached mask per sliding-window size (models like Gemma 2 alternate sizes between layers). An
# entry is reused only for the very same cu_seqlens tensor, unmodified (same _version): every layer of
# one forward, and its activation-checkpoint recomputation, share one mask.
_mask_cache: dict[tuple[int | None, torch.device], tuple[weakref.ref, int, int, torch.Tensor]] = {}


def _block_causal_mask(cu_seqlens: torch.Tensor, total: int, window: int | None, device) -> torch.Tensor:
    """[total, total] bool: True where query i may attend key j (same sequence, j <= i, in window)."""
    cache_key = (window, torch.device(device))
    cached = _mask_cache.get(cache_key)
    if cached is not None:
        ref, version, cached_total, mask = cached
        if ref() is cu_seqlens and version == cu_seqlens._version and cached_total == total:
            return mask
    positions = torch.arange(total, device=device)
    # searchsorted instead of repeat_interleave(lengths): no device-to-host sync for the output size.
    sequence = torch.searchsorted(cu_seqlens[1:].to(device=device, dtype=torch.long), positions, right=True)
    q_pos, k_pos = positions[:, None], positions[None, :]  # compared straight to bool: no int64 [T, T]
    mask = (sequence[:, None] == sequence[None, :]) & (k_pos <= q_pos)
    if window is not None:
        mask &= k_pos > q_pos - window
    _mask_cache[cache_key] = (weakref.ref(cu_seqlens), cu_seqlens._version, total, mask)
    return mask


def _sdpa_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, window, dropout=0.0, bounds=None):
    bounds = _sequence_bounds(cu_q, bounds)
    if bounds is not None:
        return _sdpa_per_sequence(q, k, v, bounds, scale, window, dropout)
    _warn_row_mask_once(q.device)
    mask = _block_causal_mask(cu_q, q.shape[0], window, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        dropout_p=dropout,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(0, 1)


def _sequence_bounds(cu_q: torch.Tensor, bounds: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The row's boundaries as host ints where reading them costs no device sync, else None (mask)."""
    if bounds is not None:
        return bounds
    return tuple(cu_q.tolist()) if cu_q.device.type == "cpu" else None


@functools.cache
def _warn_row_mask_once(device: torch.device) -> None:
    logger.warning(
        "sdpa packed attention on %s got no cu_seq_lens_host (host boundaries): one masked call over "
        "each packed row, T x T scores; pass dpo_dist.attention.packed_forward_kwargs(batch) instead",
        device,
    )


def _expands_kv_heads(q: torch.Tensor, window: int | None) -> bool:
    """Whether grouped kv heads must be expanded to every query head for a fused SDPA kernel.

    PyTorch's CPU kernels take grouped heads as they are. On CUDA only the flash kernel (fp16/bf16,
    sm80+, no mask) does; the memory-efficient one (fp32, older GPUs, or a sliding-window mask)
    does not and would fall to the math path with [heads, L, L] scores. Expanded heads cost
    T x heads x head_dim instead."""
    if q.device.type == "cpu":
        return False
    flash = q.dtype in _HALF_DTYPES and q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) >= (8, 0)
    return not flash or window is not None


def _sdpa_per_sequence(q, k, v, bounds, scale, window, dropout):
    """Causal SDPA one sequence at a time: a block-diagonal mask over the row would cost the full
    [T, T] scores (no kernel skips the masked blocks), the square of the packed row instead of the
    sum of each sequence's square. Only a sliding window shorter than a sequence takes a mask,
    that sequence's own."""
    groups = q.shape[1] // k.shape[1]
    gqa = groups > 1
    if gqa and _expands_kv_heads(q, window):
        k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
        gqa = False
    pieces = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        q_s, k_s, v_s = (x[start:stop].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        length = stop - start
        mask = None
        if window is not None and window < length:
            positions = torch.arange(length, device=q.device)
            offset = positions[:, None] - positions[None, :]  # query minus key position
            mask = (offset >= 0) & (offset < window)
        out = F.scaled_dot_product_attention(
            q_s, k_s, v_s, attn_mask=mask, is_causal=mask is None, dropout_p=dropout, scale=scale, enable_gqa=gqa
        )
        pieces.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(pieces)


_KERNELS = {"flash": _flash_attention, "varlen": _varlen_attention, "sdpa": _sdpa_attention}


# ---------------------------------------------------------------------------------------------
# The function transformers calls in every attention layer


def _check_call(backend: str, module: nn.Module, query, key, attention_mask, dropout, kwargs) -> None:
    """Refuse every call whose result would silently differ from per-sequence causal attention."""
    if kwargs.get("cu_seq_lens_q") is None or kwargs.get("cu_seq_lens_k") is None:
        raise AttentionBackendError(
            "packed attention was called without cu_seq_lens_q/cu_seq_lens_k, so packed sequences would "
            "attend to each other; pass dpo_dist.attention.packed_forward_kwargs(batch) to the model"
        )
    if kwargs.get("max_length_q") is None or kwargs.get("max_length_k") is None:
        raise AttentionBackendError("packed attention needs max_length_q/max_length_k (host ints)")
    if attention_mask is not None:
        raise AttentionBackendError("packed attention takes cu_seqlens, not an attention_mask")
    if query.shape[2] != key.shape[2]:
        raise AttentionBackendError(
            "packed attention got a KV cache (query and key lengths differ); call the model with use_cache=False"
        )
    is_causal = kwargs.get("is_causal")
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        raise AttentionBackendError(
            "packed attention is causal only; this module asked for bidirectional attention"
        )
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise AttentionBackendError(
                f"packed attention does not support {unsupported} (from {type(module).__name__})"
            )
    if dropout and backend != "sdpa":
        raise AttentionBackendError(
            f"the {backend} packed-attention backend has no attention dropout; set model.disable_dropout=true "
            "(the default) or config.attention_dropout=0"
        )


def _host_bounds(kwargs, query) -> tuple[int, ...] | None:
    """``cu_seq_lens_host`` (``packed_forward_kwargs``), checked against the row on the host."""
    bounds = kwargs.get("cu_seq_lens_host")
    if bounds is None:
        return None
    tokens = query.shape[0] * query.shape[2]
    if len(bounds) != kwargs["cu_seq_lens_q"].numel() or bounds[0] != 0 or bounds[-1] != tokens:
        raise AttentionBackendError(
            f"cu_seq_lens_host {tuple(bounds)[:4]}... does not describe this packed row of {tokens} tokens "
            f"and {kwargs['cu_seq_lens_q'].numel() - 1} sequences"
        )
    return tuple(bounds)


def _make_attention_function(backend: str) -> Callable:
    kernel = _KERNELS[backend]

    def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """transformers attention interface: q/k/v (B, H, T, D) -> ((B, T, H, D), None)."""
        _check_call(backend, module, query, key, attention_mask, dropout, kwargs)
        batch, heads, length, _ = query.shape
        # Rows are concatenated into one token stream; cu_seqlens index into it (flash-attn convention).
        q, k, v = (x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3]) for x in (query, key, value))
        options = {"dropout": dropout, "bounds": _host_bounds(kwargs, query)} if backend == "sdpa" else {}
        out = kernel(
            q,
            k,
            v,
            kwargs["cu_seq_lens_q"],
            kwargs["cu_seq_lens_k"],
            kwargs["max_length_q"],
            kwargs["max_length_k"],
            scaling if scaling is not None else query.shape[-1] ** -0.5,
            kwargs.get("sliding_window"),
            **options,
        )
        return out.reshape(batch, length, heads, value.shape[-1]), None

    packed_attention.__name__ = f"packed_attention_{backend}"
    return packed_attention


# ---------------------------------------------------------------------------------------------
# Model integration


def unwrap_model(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside DDP/DeepSpeed (``.module``) and PEFT (``get_base_model()``) wrappers."""
    current = model
    while not isinstance(current, PreTrainedModel):
        if hasattr(current, "get_base_model"):
            current = current.get_base_model()
        elif isinstance(getattr(current, "module", None), nn.Module):
            current = current.module
        else:
            raise TypeError(f"{type(model).__name__} does not wrap a transformers PreTrainedModel")
    return current


def enable_packed_attention(model: nn.Module, backend: str, device: torch.device | None = None) -> str:
    """Switch ``model`` to packed attention with ``backend`` (``auto`` resolves); return the backend used.

    ``device``: where the model will run, when that is not where its weights are now (a model
    loaded on the host that DeepSpeed moves to the GPU at stages 0-2); default: its weights' device."""
    hf_model = unwrap_model(model)
    parameter = next(hf_model.parameters())
    device = parameter.device if device is None else torch.device(device)
    name = resolve_attn_backend(backend, device, hf_model.dtype)
    implementation = _IMPL_NAMES[name]
    AttentionInterface.register(implementation, _make_attention_function(name))
    hf_model.set_attn_implementation(implementation)
    # transformers only warns (and keeps the old attention) for models it cannot switch; that old
    # attention would let packed sequences see each other, so refuse instead.
    if hf_model.config._attn_implementation != implementation:
        raise AttentionBackendError(
            f"{type(hf_model).__name__} cannot switch its attention implementation, so it cannot run packed rows"
        )
    detail = f" [{_flash_kernel()[1]}]" if name == "flash" else ""
    if name == "varlen" and _repeats_kv_heads(hf_model.config):
        detail = " [this torch's varlen_attn has no enable_gqa: K/V heads are copied per query head in every layer]"
    logger.info(
        "packed attention backend: %s%s (requested: %s, %s on %s)",
        name,
        detail,
        backend,
        type(hf_model).__name__,
        device,
    )
    return name


def _repeats_kv_heads(config) -> bool:
    """Whether the varlen backend copies K/V per query head for this model (grouped-query attention
    and a varlen_attn without ``enable_gqa``): more memory traffic per layer, said in the log."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return bool(heads and kv_heads and heads != kv_heads and not _varlen_kernel()[1])


def is_packed_attention(model: nn.Module) -> bool:
    """Whether ``enable_packed_attention`` switched this model (it then needs cu_seqlens on every call)."""
    return unwrap_model(model).config._attn_implementation in _IMPL_NAMES.values()


def packed_forward_kwargs(batch: PackedBatch) -> dict:
    """Keyword arguments for ``model(...)`` or its decoder to run one packed row.

    ``use_cache=False`` always: with a cache, transformers' own sdpa path attends across packed
    sequences, and a KV cache has no use in training or scoring anyway.
    """
    return {
        "position_ids": batch.position_ids,
        "cu_seq_lens_q": batch.cu_seqlens,
        "cu_seq_lens_k": batch.cu_seqlens,
        "max_length_q": batch.max_seqlen,
        "max_length_k": batch.max_seqlen,
        "cu_seq_lens_host": batch.cu_seqlens_host,
        "use_cache": False,
    }
