"""Reference log-probs: one forward pass into Arrow shards, reused by every run that can.

The frozen reference model runs forward-only once per (model weights, tokenizer, data file,
tokenization settings). Its summed response log-probs land in a cache directory that every
training run and every sweep point (beta and lr are not inputs) reads back.

Public API
----------
- ``reference_fingerprints(model_path, tokenizer, data_path, *, max_length, truncation, dtype, quantize, tail_logps)``
  and ``fingerprints_from_config(config, tokenizer, data_path, *, dtype)``: the fingerprint dict
  ``{"model", "tokenizer", "data", "settings"}`` (sha256 hex strings) plus ``"settings_values"``
  (the plain settings, so a mismatch can say *which* setting changed).
  ``combined_fingerprint(fps)`` and ``default_cache_dir(fingerprint)``
  (``$DPO_DIST_CACHE`` or ``~/.cache/dpo_dist``, then ``reference/<fingerprint[:16]>``).
- ``ensure_reference(model, dataset, cache_dir, *, fingerprints, ...) -> ReferenceSummary``: what the
  engine and ``dpo-precompute`` call on every rank. Under the cache lock it reuses a complete,
  valid cache (``computed=False``), computes what is missing of an absent or unfinished one
  (``computed=True``), or raises ``ReferenceCacheError`` for a cache built from other inputs or
  a corrupted one: it never overwrites a cache that belongs to another model. ``model`` may be a
  zero-argument factory, called (on every rank) only when something must be computed, so a run
  that reuses the cache never builds the reference model.
- ``precompute_reference(model, dataset, cache_dir, *, fingerprints, ...) -> ReferenceSummary``: the
  pass itself (resume included), without the lock: call it only with exclusive use of cache_dir.
- ``ReferenceStore.open(cache_dir, expected_fingerprints, example_ids, verified=None)`` and
  ``store.lookup(example_ids)``: the training-time reader (checks everything, then joins by id).
  Pass ``verified=summary.verified_shards`` from this job's ``ensure_reference`` so that a shard
  rank 0 has just hashed is not hashed again on every rank (``ensure_reference_for_run`` does).
- ``describe_cache(cache_dir)`` / ``verify_cache(cache_dir)``: lines for ``dpo-data shards DIR``.

The reading and file side (schema, manifest, shard digests and atomic writes, ``ReferenceStore``,
inspection) is ``dpo_dist.reference_store``; its public names are importable from here too.

The same functions serve any ``TokenizedDataset``; the engine uses ``cache_dir`` for the train
split and ``cache_dir/eval-<fingerprint>`` for each eval file (``eval_cache_dir``).

On-disk layout
--------------
::

    DIR/manifest.json            written by rank 0 before any shard (complete: false) and
                                 rewritten with complete: true after every shard is on disk
    DIR/part-00000.arrow         Arrow IPC file: example_id int64, chosen_logp float32,
    DIR/part-00000.arrow.sha256  rejected_logp float32, chosen_tokens int32, rejected_tokens int32;
    DIR/part-00001.arrow ...     rows sorted by example_id. Sidecar: ``sha256sum`` format, written
                                 after its shard, so ``sha256sum -c *.sha256`` checks a cache
    DIR/.lock                    flock target (see Locking)

A cache for LD-DPO runs (``loss.ld_alpha``; settings ``tail_logps: true``) has two more float32
columns, ``chosen_tail_logp`` and ``rejected_tail_logp``: each response's log-probs summed past its
pair's shorter response (``reference_store.TAIL_COLUMNS``), from which any ld_alpha is a sum away.

Shard ``k`` holds the dataset positions ``[k * P, (k + 1) * P)`` with ``P = pairs_per_shard``
(recorded in the manifest): ``RRRRR`` is a *global shard index*, not a rank. Shards go to ranks
round-robin over the shards still missing, so the set of files and rows is the same for any world
size, and a pass killed on 8 ranks can be finished on 2. The manifest holds ``format_version``,
``fingerprint``, ``fingerprints``, ``settings``, absolute ``model_path`` and ``tokenizer_path``,
``num_examples``, ``pairs_per_shard``, ``num_shards``, ``shards: {name: {rows, sha256}}`` and
``complete``. ``chosen_tokens``/``rejected_tokens`` count the scored response tokens, so a
per-token mean is available without another pass (``lookup(..., normalize="mean")``).

Writes are atomic: a shard or sidecar is written to a hidden temp file in DIR, fsynced and
``os.replace``-d into place; a reader never sees half a file.

Resume
------
The manifest (``complete: false``) is written before any shard, so a killed pass leaves a record
of the inputs it was computing for. A rerun with the same fingerprints keeps every shard whose
sidecar digest matches its bytes, deletes half-finished leftovers (a shard without sidecar, a
digest mismatch, temp files) and computes only the missing shards; different fingerprints are
refused like a complete cache would be.

Locking and sweeps
------------------
Jobs of a sweep (``dpo-train -m loss.beta=...``) start together and share one ``cache_dir``.
``ensure_reference`` takes an exclusive ``fcntl.flock`` on ``DIR/.lock`` from the job's rank 0
and keeps it while checking and, if needed, computing; the decision is re-checked after the lock
is acquired. Rank 0 then writes a per-job random token into the lock file; the job's other ranks
poll the file (not a collective) until they see their token, because a waiting job may wait for
hours and a collective would hit its timeout. So one job computes, the others block, then find
the cache complete and reuse it. The lock is released (token erased) when the job is done with
the cache, and by the kernel if the process dies. flock works across nodes on NFS and on Lustre
mounted with ``-o flock``.

With ZeRO-3 every rank must run the same number of forwards (each layer gathers its parameters
collectively), so ranks with fewer micro-batches run discarded forwards until all have done as
many as the busiest rank.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dpo_dist import distributed as D
from dpo_dist.attention import unwrap_model
from dpo_dist.data import (
    PackedBatch,
    collate_packed,
    data_fingerprint,
    pack_pairs,
    tokenizer_fingerprint,
)
from dpo_dist.data.cache import CACHE_FORMAT
from dpo_dist.data.records import FIELDS
from dpo_dist.data.subset import ALL_RECORDS, Selection
from dpo_dist.fingerprint import cache_root, json_sha256, model_fingerprint, release_flock, write_holder
from dpo_dist.logprobs import SequenceLogps, sequence_logps, split_pairs
from dpo_dist.memory import replicate_frozen_copy
from dpo_dist.reference_store import (
    COMPONENTS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SCHEMA,
    TAIL_SETTING,
    ReferenceCacheError,
    ReferenceStore,
    combined_fingerprint,
    describe_cache,
    has_tails,
    matching_manifest,
    read_manifest,
    require_components,
    sha256_file,
    shard_digest,
    shard_name,
    shard_rows,
    shard_schema,
    verify_cache,
    verify_shards,
    write_bytes_atomic,
    write_json_atomic,
)

if TYPE_CHECKING:
    from dpo_dist.config import DPOConfig
    from dpo_dist.data import TokenizedDataset
    from dpo_dist.distributed import DistEnv

logger = logging.getLogger("dpo_dist.reference")

__all__ = [  # the on-disk side lives in dpo_dist.reference_store; its public names are here too
    "FORMAT_VERSION",
    "SCHEMA",
    "ReferenceCacheError",
    "ReferenceStore",
    "ReferenceSummary",
    "RunReference",
    "combined_fingerprint",
    "default_cache_dir",
    "describe_cache",
    "ensure_reference",
    "ensure_reference_for_run",
    "fingerprints_from_config",
    "precompute_for_run",
    "precompute_reference",
    "reference_fingerprints",
    "reference_settings",
    "shard_name",
    "verify_cache",
]

LOGP_REDUCTION = "sum"
DEFAULT_PAIRS_PER_SHARD = 1024
"""Pairs per shard: the unit of resume (a 70B pass loses at most one shard's work per rank)."""
LOCK_NAME = ".lock"

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_DTYPE_ALIASES = {
    "fp32": "fp32",
    "float32": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
}


@dataclass
class ReferenceSummary:
    """What ``ensure_reference``/``precompute_reference`` did (identical on every rank)."""

    cache_dir: Path
    fingerprint: str
    num_examples: int
    num_shards: int
    computed: bool
    """False when a complete cache was reused as is."""
    examples_computed: int
    """Pairs computed by this call over all ranks (0 when reused)."""
    shards_computed: int
    seconds: float
    verified_shards: dict[str, Any] = field(default_factory=dict)
    """The manifest's ``shards`` entries (``{name: {rows, sha256}}``) whose files rank 0 hashed in
    this call: every shard of the cache, as ``ReferenceStore.open(..., verified=...)`` wants."""


# --------------------------------------------------------------------------------------------
# Fingerprints


def dtype_name(dtype: torch.dtype | str) -> str:
    """``fp32``/``bf16``/``fp16`` for a torch dtype or its common spellings (``auto`` is refused)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unsupported reference dtype {dtype}")
        return _DTYPE_NAMES[dtype]
    if dtype not in _DTYPE_ALIASES:
        raise ValueError(f"reference dtype must be resolved to fp32, bf16 or fp16, got {dtype!r}")
    return _DTYPE_ALIASES[dtype]


def reference_settings(
    *, max_length: int, truncation: str, dtype: torch.dtype | str, quantize: str = "none", tail_logps: bool = False
) -> dict[str, Any]:
    """Everything besides model, tokenizer and data that changes the cached numbers. ``quantize``
    (QLoRA's 4-bit base) and ``tail_logps`` (LD-DPO's tail columns, ``reference_store.TAIL_SETTING``)
    are recorded only when set, so 16-bit caches without tails keep their fingerprints. A cache
    without tails is then never taken for an LD-DPO run, and ld_alpha itself is not recorded: a
    sweep over it shares one cache."""
    quantized = {"quantize": quantize} if quantize != "none" else {}
    tails = {TAIL_SETTING: True} if tail_logps else {}
    return {
        **quantized,
        **tails,
        "max_length": int(max_length),
        "truncation": truncation,
        "dtype": dtype_name(dtype),
        "logp_reduction": LOGP_REDUCTION,
        "format_version": FORMAT_VERSION,
        # The data component hashes the file's bytes; how they become token ids is versioned here.
        "tokenization_format": CACHE_FORMAT,
    }


def reference_fingerprints(
    model_path: str | os.PathLike,
    tokenizer,
    data_path: str | os.PathLike,
    *,
    max_length: int,
    truncation: str,
    dtype: torch.dtype | str,
    quantize: str = "none",
    tail_logps: bool = False,
    columns: Sequence[str] = FIELDS,
    selection: Selection = ALL_RECORDS,
) -> dict[str, Any]:
    """Fingerprints of one reference pass. Hashing a big model is slow the first time only
    (memoized per file); still, compute this on rank 0 and broadcast it on large jobs. Records
    read through other ``columns`` (``data.prompt_key``...) are other data, and so are some of
    its records (``selection``: ``data.max_samples``, a side of ``data.eval_split``)."""
    settings = reference_settings(
        max_length=max_length, truncation=truncation, dtype=dtype, quantize=quantize, tail_logps=tail_logps
    )
    return {
        "model": model_fingerprint(model_path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": data_fingerprint(data_path, columns, selection),
        "settings": json_sha256(settings),
        "settings_values": settings,
    }


def fingerprints_from_config(
    config: DPOConfig, tokenizer, data_path: str | os.PathLike, *, dtype: torch.dtype | str, selection: Selection = ALL_RECORDS
) -> dict[str, Any]:
    """``reference_fingerprints`` for a run config (train or eval ``data_path`` and the
    ``selection`` of its records: ``data.sources()``); only the reference
    model's path and tokenization settings are read from it, and of the loss settings whether
    loss.ld_alpha is set (not its value), so beta, lr and ld_alpha sweeps share one cache."""
    return reference_fingerprints(
        config.reference_model_path(),
        tokenizer,
        data_path,
        max_length=config.data.max_length,
        truncation=config.data.truncation,
        dtype=dtype,
        quantize=config.model.lora.quantize,
        tail_logps=config.uses_tail_logps(),
        columns=config.data.columns(),
        selection=selection,
    )


def default_cache_dir(fingerprint: str) -> Path:
    """``<cache root>/reference/<fingerprint[:16]>``: equal inputs share a directory."""
    return cache_root() / "reference" / fingerprint[:16]


# --------------------------------------------------------------------------------------------
# Orchestration


def ensure_reference(
    model: torch.nn.Module | Callable[[], torch.nn.Module],
    dataset: TokenizedDataset,
    cache_dir: str | os.PathLike,
    *,
    fingerprints: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    lock_poll_s: float = 1.0,
    **pass_options: Any,
) -> ReferenceSummary:
    """Make ``cache_dir`` a complete reference cache for ``fingerprints``; call on every rank.

    Reuses a complete valid cache, computes only what is missing otherwise, and raises
    ``ReferenceCacheError`` (on every rank) for a cache of other inputs or a corrupted one.
    ``pass_options`` are ``precompute_reference``'s keyword arguments (model_path,
    tokenizer_path, micro_batch_tokens, chunk_tokens, device, pairs_per_shard, progress).
    """
    start = time.perf_counter()
    cache_dir = Path(cache_dir).expanduser().absolute()
    require_components(fingerprints)
    with _CacheLock(cache_dir, rank, world_size, lock_poll_s):
        manifest = _on_rank0(lambda: _reusable_manifest(cache_dir, fingerprints), world_size)
        if manifest is not None:
            logger.info("reference cache %s is complete: reusing it", cache_dir)
            return ReferenceSummary(
                cache_dir=cache_dir,
                fingerprint=manifest["fingerprint"],
                num_examples=manifest["num_examples"],
                num_shards=manifest["num_shards"],
                computed=False,
                examples_computed=0,
                shards_computed=0,
                seconds=time.perf_counter() - start,
                verified_shards=manifest["shards"],
            )
        return precompute_reference(
            model, dataset, cache_dir, fingerprints=fingerprints, rank=rank, world_size=world_size, **pass_options
        )


def precompute_reference(
    model: torch.nn.Module | Callable[[], torch.nn.Module],
    dataset: TokenizedDataset,
    cache_dir: str | os.PathLike,
    *,
    fingerprints: dict[str, Any],
    model_path: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    rank: int = 0,
    world_size: int = 1,
    micro_batch_tokens: int,
    chunk_tokens: int = 1024,
    device: torch.device | str = "cpu",
    pairs_per_shard: int = DEFAULT_PAIRS_PER_SHARD,
    progress: bool = True,
) -> ReferenceSummary:
    """Compute the shards of ``cache_dir`` that are missing and mark the cache complete.

    Call on every rank with the same arguments; takes no lock (use ``ensure_reference`` unless
    nothing else can touch ``cache_dir``). A complete cache is only verified, never reopened.

    ``model`` (or what the factory returns) is the reference, in eval mode, on ``device``, with
    packed attention enabled: a causal LM (possibly wrapped), or a module mapping a
    ``PackedBatch`` to ``SequenceLogps`` such as a ZeRO-3 engine around ``model.PackedPolicy``
    (see ``_scorer``). It must run in the dtype fingerprinted in ``settings_values``.
    ``micro_batch_tokens`` and ``chunk_tokens`` shape the forwards, not the results, and
    ``pairs_per_shard`` applies only when a new cache is started (a resumed one keeps its own).
    Settings with ``tail_logps`` also write LD-DPO's tail columns (a module must then return
    ``tail_logps``).
    ``computed`` in the summary is True when this call ran any forward.
    """
    start = time.perf_counter()
    cache_dir = Path(cache_dir).expanduser().absolute()
    require_components(fingerprints)
    plan: _Plan = _on_rank0(
        lambda: _prepare(cache_dir, len(dataset), fingerprints, model_path, tokenizer_path, pairs_per_shard),
        world_size,
    )
    if plan.todo:
        if not isinstance(model, torch.nn.Module):
            model = model()
        _check_forward_dtype(model, fingerprints)
        with torch.no_grad():
            _run_shards(
                model,
                dataset,
                cache_dir,
                plan,
                tails=has_tails(fingerprints.get("settings_values")),
                rank=rank,
                world_size=world_size,
                micro_batch_tokens=micro_batch_tokens,
                chunk_tokens=chunk_tokens,
                device=device,
                progress=progress,
            )
    verified = plan.verified_shards
    if not plan.complete:
        _barrier(world_size)
        verified = _on_rank0(lambda: _finalize(cache_dir, plan.num_shards), world_size)["shards"]
    seconds = time.perf_counter() - start
    examples = sum(stop - begin for begin, stop in (plan.shard_range(k) for k in plan.todo))
    if rank == 0 and not plan.complete:
        logger.info(
            "reference cache %s complete: computed %d of %d pairs (%d shards) in %.1f s",
            cache_dir, examples, plan.num_examples, len(plan.todo), seconds,
        )  # fmt: skip
    return ReferenceSummary(
        cache_dir=cache_dir,
        fingerprint=plan.fingerprint,
        num_examples=plan.num_examples,
        num_shards=plan.num_shards,
        computed=bool(plan.todo),
        examples_computed=examples,
        shards_computed=len(plan.todo),
        seconds=seconds,
        verified_shards=verified,
    )


@dataclass
class _Plan:
    """The shard layout of a cache and the shards still to compute (decided by rank 0)."""

    num_examples: int
    pairs_per_shard: int
    fingerprint: str
    todo: list[int]
    complete: bool = False
    """The cache was already complete (and verified): nothing to compute or finalize."""
    verified_shards: dict[str, Any] = field(default_factory=dict)
    """The manifest's shard entries, when ``complete``."""

    @property
    def num_shards(self) -> int:
        return -(-self.num_examples // self.pairs_per_shard)

    def shard_range(self, index: int) -> tuple[int, int]:
        begin = index * self.pairs_per_shard
        return begin, min(begin + self.pairs_per_shard, self.num_examples)


def _reusable_manifest(cache_dir: Path, fingerprints: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a complete cache for these fingerprints with intact shards; None if
    there is none or it is unfinished; raises for other inputs or corruption."""
    manifest = matching_manifest(cache_dir, fingerprints)
    if manifest is None or not manifest.get("complete"):
        return None
    verify_shards(cache_dir, manifest)
    return manifest


def _prepare(
    cache_dir: Path,
    num_examples: int,
    fingerprints: dict[str, Any],
    model_path: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    pairs_per_shard: int,
) -> _Plan:
    """Rank 0: validate or start the manifest, drop half-written leftovers, list missing shards."""
    if pairs_per_shard < 1:
        raise ValueError(f"pairs_per_shard must be >= 1, got {pairs_per_shard}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = matching_manifest(cache_dir, fingerprints)
    if manifest is None:
        manifest = _new_manifest(fingerprints, model_path, tokenizer_path, num_examples, pairs_per_shard)
    elif manifest["num_examples"] != num_examples:
        raise ReferenceCacheError(
            f"reference cache {cache_dir} was made for {manifest['num_examples']} examples but the "
            f"dataset has {num_examples}; delete it or pick another reference.cache_dir"
        )
    plan = _Plan(num_examples, int(manifest["pairs_per_shard"]), manifest["fingerprint"], todo=[])
    if manifest.get("complete"):
        # Never reopen a finished cache: readers may be using it, and a damaged shard must be
        # reported, not quietly recomputed.
        verify_shards(cache_dir, manifest)
        plan.complete, plan.verified_shards = True, manifest["shards"]
        return plan
    for tmp in cache_dir.glob(".*.tmp"):  # left by a killed writer (all writers are locked out now)
        tmp.unlink(missing_ok=True)
    done = {}
    for index in range(plan.num_shards):
        name = shard_name(index)
        digest = _finished_shard_digest(cache_dir, name)
        if digest is None:
            plan.todo.append(index)
        else:
            done[name] = {"rows": shard_rows(cache_dir / name), "sha256": digest}
    manifest.update(complete=False, shards=done, updated_at=_now())
    write_json_atomic(cache_dir / MANIFEST_NAME, manifest)
    if done:
        logger.info(
            "reference cache %s: resuming, %d of %d shards already done",
            cache_dir,
            len(done),
            plan.num_shards,
        )
    return plan


def _finished_shard_digest(cache_dir: Path, name: str) -> str | None:
    """The shard's sha256 if it and a matching sidecar exist; otherwise remove the leftovers."""
    shard, sidecar = cache_dir / name, cache_dir / f"{name}.sha256"
    if shard.is_file() and sidecar.is_file():
        recorded = sidecar.read_text().split()[:1]
        digest = sha256_file(shard)
        if recorded == [digest]:
            return digest
        logger.warning("reference cache %s: %s does not match its sidecar; recomputing it", cache_dir, name)
    shard.unlink(missing_ok=True)
    sidecar.unlink(missing_ok=True)
    return None


def _new_manifest(
    fingerprints: dict[str, Any],
    model_path: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    num_examples: int,
    pairs_per_shard: int,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "complete": False,
        "fingerprint": combined_fingerprint(fingerprints),
        "fingerprints": {name: fingerprints[name] for name in COMPONENTS},
        "settings": fingerprints.get("settings_values"),
        "model_path": str(Path(model_path).expanduser().absolute()),
        "tokenizer_path": str(Path(tokenizer_path).expanduser().absolute()),
        "num_examples": num_examples,
        "pairs_per_shard": pairs_per_shard,
        "num_shards": -(-num_examples // pairs_per_shard),
        "columns": shard_schema(has_tails(fingerprints.get("settings_values"))).names,
        "shards": {},
        "created_at": _now(),
    }


def _finalize(cache_dir: Path, num_shards: int) -> dict[str, Any]:
    """Rank 0, after every rank is done: record every shard and mark the manifest complete."""
    manifest = read_manifest(cache_dir)
    shards = {}
    for index in range(num_shards):
        name = shard_name(index)
        # Re-hashed, not read off the sidecar: a shard rewritten after its sidecar (a straggling
        # rank of a dead job) must not enter a manifest that is never reopened once complete.
        digest = _finished_shard_digest(cache_dir, name)
        if digest is None:
            raise ReferenceCacheError(
                f"reference cache {cache_dir}: shard {name} is missing or does not match its sidecar; "
                "run again to compute it"
            )
        shards[name] = {"rows": shard_rows(cache_dir / name), "sha256": digest}
    rows = sum(entry["rows"] for entry in shards.values())
    if rows != manifest["num_examples"]:
        raise ReferenceCacheError(
            f"reference cache {cache_dir}: {rows} rows written for {manifest['num_examples']} examples"
        )
    manifest.update(shards=shards, num_rows=rows, complete=True, completed_at=_now(), updated_at=_now())
    write_json_atomic(cache_dir / MANIFEST_NAME, manifest)
    return manifest


# --------------------------------------------------------------------------------------------
# The forward pass


def _run_shards(
    model, dataset, cache_dir, plan, *, tails, rank, world_size, micro_batch_tokens, chunk_tokens, device, progress
):
    """This rank's missing shards (round-robin), then filler forwards up to the busiest rank."""
    lengths = np.asarray(dataset.lengths())
    packs = {k: _pack_shard(plan.shard_range(k), lengths, micro_batch_tokens) for k in plan.todo}
    forwards = [sum(len(packs[k]) for k in plan.todo[r::world_size]) for r in range(world_size)]
    mine = plan.todo[rank::world_size]
    meter = _Progress(
        total=sum(stop - begin for begin, stop in map(plan.shard_range, mine)),
        enabled=progress and rank == 0,
        desc=f"reference (rank 0 of {world_size})",
    )
    score = _scorer(model, chunk_tokens, tails)
    with meter:
        for index in mine:
            table = _compute_shard(score, dataset, packs[index], device, meter, tails)
            _write_shard(cache_dir, index, table, plan.fingerprint)
        # ZeRO-3 gathers each layer's weights collectively: every rank needs as many forwards.
        filler = max(forwards) - forwards[rank] if getattr(model, "collective", True) else 0
        if filler:
            dummy = collate_packed([dataset[0]]).to(device)
            for _ in range(filler):
                score(dummy)


def _pack_shard(shard: tuple[int, int], lengths: np.ndarray, micro_batch_tokens: int) -> list[list[int]]:
    """Micro-batches of a shard as dataset positions."""
    begin, stop = shard
    return [[begin + i for i in group] for group in pack_pairs(lengths[begin:stop], micro_batch_tokens)]


def _scorer(model: torch.nn.Module, chunk_tokens: int, tails: bool = False) -> Callable[[PackedBatch], SequenceLogps]:
    """How to get summed log-probs (and with ``tails`` tail sums) of a packed row from ``model``.

    A causal LM (possibly wrapped by DDP, PEFT or a DeepSpeed engine) is scored with
    ``sequence_logps``. Any other module must itself map a ``PackedBatch`` to summed
    ``SequenceLogps`` (a DeepSpeed engine around ``model.PackedPolicy(lm, chunk, "sum")``): the
    form to use under ZeRO-3, where every micro-batch should be one top-level forward so that
    DeepSpeed's per-forward bookkeeping (parameter trace, prefetch) resets.
    """
    try:
        unwrap_model(model)
    except TypeError:
        return model
    return lambda batch: sequence_logps(model, batch, chunk_tokens=chunk_tokens, normalize=LOGP_REDUCTION, tails=tails)


def _compute_shard(score, dataset, micro_batches, device, meter, tails: bool = False) -> pa.Table:
    """Summed response log-probs of a shard's pairs (with ``tails`` also their tail sums), as a
    table sorted by example_id.

    The outputs stay on the device until the shard is done: one host sync per shard, so the host
    collates the next micro-batch while the device still runs this one."""
    example_ids, outputs = [], {"logp": [], "tokens": [], **({"tail_logp": []} if tails else {})}
    for positions in micro_batches:
        pairs = [dataset[p] for p in positions]
        batch = collate_packed(pairs).to(device)
        out = score(batch)
        if tails and out.tail_logps is None:
            raise ValueError("the reference cache records tail sums, but the reference model returned none (tail_logps)")
        example_ids.extend(pair.example_id for pair in pairs)
        outputs["logp"].append(out.sum_logps.detach().float())
        outputs["tokens"].append(out.token_counts.detach().int())
        if tails:
            outputs["tail_logp"].append(out.tail_logps.detach().float())
        meter.update(len(positions), batch.num_tokens)
    arrays = {"example_id": np.asarray(example_ids, dtype=np.int64)}
    for column, pieces in outputs.items():
        # Sequences run chosen_0, rejected_0, chosen_1, ... in every micro-batch, so also concatenated.
        chosen, rejected = split_pairs(torch.cat(pieces).cpu())
        arrays |= {f"chosen_{column}": chosen.numpy(), f"rejected_{column}": rejected.numpy()}
    schema = shard_schema(tails)
    order = np.argsort(arrays["example_id"], kind="stable")
    return pa.table({name: arrays[name][order] for name in schema.names}, schema=schema)


def _check_forward_dtype(model: torch.nn.Module, fingerprints: dict[str, Any]) -> None:
    """Refuse to label numbers with a dtype they were not computed in."""
    expected = (fingerprints.get("settings_values") or {}).get("dtype")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if expected is None or param is None:
        return
    actual = dtype_name(param.dtype)
    if actual != expected:
        raise ValueError(f"the reference model runs in {actual} but the cache fingerprint says {expected}")


class _Progress:
    """tqdm over pairs with a tokens/s postfix; a no-op where disabled (ranks other than 0)."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self._bar = tqdm(total=total, unit="pair", desc=desc, disable=not enabled, dynamic_ncols=True)
        self._tokens = 0
        self._start = time.perf_counter()

    def update(self, pairs: int, tokens: int) -> None:
        self._tokens += tokens
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self._bar.update(pairs)
        self._bar.set_postfix(tok_s=f"{self._tokens / elapsed:,.0f}", refresh=False)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()


# --------------------------------------------------------------------------------------------
# Runs: what the engine and the precompute task call


@dataclass
class RunReference:
    """The cached reference log-probs of one run: a store per split.

    Example ids are positions within their own file, so train and eval ids overlap: look eval
    pairs up with ``eval_logps``, never ``logps``. On CPU batches both also check that the
    batch's response token counts equal the cached ones, which catches a wrong-split lookup.
    """

    cache_dir: Path
    computed: bool
    """True if this run computed any part of either split's cache."""
    train: ReferenceStore | None
    """None for dpo-eval, which needs the eval split only."""
    eval: ReferenceStore | None

    ld_alpha: float | None = None
    """LD-DPO's alpha (loss.ld_alpha): the sums looked up are ``logprobs.length_desensitized``'s."""

    def logps(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs (chosen, rejected) of a train batch, on the batch's device."""
        if self.train is None:
            raise ReferenceCacheError("this reference was opened for evaluation: it has no train split")
        return _batch_logps(self.train, batch, self.ld_alpha)

    def eval_logps(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs (chosen, rejected) of an eval batch."""
        if self.eval is None:
            raise ReferenceCacheError("this run has no eval reference cache (no data.eval_path or data.eval_split)")
        return _batch_logps(self.eval, batch, self.ld_alpha)

    def run_info(self) -> dict[str, Any]:
        """The ``run_info.json`` ``"reference"`` entry: the same keys as an online or absent
        reference's (``engine.run_info``), so readers need not guess the source from which are there."""
        return {"cache_dir": str(self.cache_dir), "computed": self.computed, "mode": "precompute"}


def _batch_logps(store: ReferenceStore, batch: PackedBatch, ld_alpha: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = store.lookup(batch.example_ids, ld_alpha=ld_alpha)
    if batch.labels.device.type == "cpu":  # on an accelerator this check would cost a host sync
        cached_chosen, cached_rejected = store.token_counts(batch.example_ids)
        chosen_counts, rejected_counts = split_pairs(batch.scored_token_counts())
        bad = (chosen_counts != cached_chosen) | (rejected_counts != cached_rejected)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ReferenceCacheError(
                f"reference cache {store.cache_dir}: example id {int(batch.example_ids[i])} has "
                f"{int(chosen_counts[i])}/{int(rejected_counts[i])} response tokens in the batch but "
                f"{int(cached_chosen[i])}/{int(cached_rejected[i])} in the cache (wrong split or stale cache)"
            )
    return chosen, rejected


def ensure_reference_for_run(
    cfg: DPOConfig, env: DistEnv, device: torch.device, backend: str, train_data, eval_data
) -> RunReference:
    """Ensure the train (``cache_dir``) and eval (``eval_cache_dir``) caches, then open them.

    ``cache_dir`` is ``reference.cache_dir`` or ``default_cache_dir`` of the train fingerprints;
    each eval file has its own directory inside it, so a changed eval file neither meets another
    file's cache nor costs the train pass again. ``train_data=None`` (dpo-eval) ensures the eval
    split only. The reference model is built only if something is missing and freed afterwards.
    """
    summaries, dirs, fingerprints = _ensure_run_splits(cfg, env, device, backend, train_data, eval_data)

    def open_split(name: str, data) -> ReferenceStore | None:
        if data is None:
            return None
        # Rank 0 hashed every shard of the split just now, under the lock: no rank hashes them again.
        verified = summaries[name].verified_shards
        return ReferenceStore.open(dirs[name], fingerprints[name], data.example_ids, verified=verified)

    return RunReference(
        cache_dir=dirs["train"],
        computed=any(summary.computed for summary in summaries.values()),
        train=open_split("train", train_data),
        eval=open_split("eval", eval_data),
        ld_alpha=cfg.loss.ld_alpha,
    )


def eval_cache_dir(cache_dir: Path, eval_fingerprints: dict[str, Any]) -> Path:
    """``cache_dir/eval-<eval fingerprint[:16]>``: one directory per eval file and settings."""
    return cache_dir / f"eval-{combined_fingerprint(eval_fingerprints)[:16]}"


def precompute_for_run(cfg: DPOConfig) -> dict[str, ReferenceSummary]:
    """The ``precompute`` task (``dpo-precompute``): fill the run's reference caches on every rank."""
    from dpo_dist.engine import setup_job

    job = setup_job(cfg)
    summaries, _, _ = _ensure_run_splits(
        cfg, job.env, job.device, job.backend, job.train_data, job.eval_data, job.tokenizer
    )
    # The pass ends on rank 0's broadcast: rank 0 would leave (and close its gloo connections)
    # while the others still read it, which aborts them ("terminate called ..."). Leave together.
    D.barrier()
    return summaries


def _ensure_run_splits(cfg, env, device, backend, train_data, eval_data, tokenizer=None):
    """``ensure_reference`` for each split, sharing one lazily built reference model."""
    from dpo_dist.model import training_dtype

    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.resolved_tokenizer_path())
    dtype = training_dtype(cfg, device)
    train, held_out = cfg.data.sources()
    sources = {"train": train, **({"eval": held_out} if eval_data is not None else {})}
    # Rank 0 hashes (a 70B checkpoint is 140 GB); the others take its answer. The train
    # fingerprints name the cache directory even when only the eval split is ensured (dpo-eval).
    fingerprints = _on_rank0(
        lambda: {
            name: fingerprints_from_config(cfg, tokenizer, source.path, dtype=dtype, selection=source.selection)
            for name, source in sources.items()
        },
        env.world_size,
    )
    cache_dir = Path(cfg.reference.cache_dir or default_cache_dir(combined_fingerprint(fingerprints["train"])))
    cache_dir = cache_dir.expanduser().absolute()
    dirs = {"train": cache_dir}
    if "eval" in fingerprints:
        dirs["eval"] = eval_cache_dir(cache_dir, fingerprints["eval"])
    splits = {name: data for name, data in (("train", train_data), ("eval", eval_data)) if data is not None}
    built: list[torch.nn.Module] = []

    def model() -> torch.nn.Module:
        if not built:
            built.append(_build_reference_model(cfg, device, backend, dtype))
        return built[0]

    summaries = {}
    for name, data in splits.items():
        summaries[name] = ensure_reference(
            model,
            data,
            dirs[name],
            fingerprints=fingerprints[name],
            model_path=cfg.reference_model_path(),
            tokenizer_path=cfg.model.resolved_tokenizer_path(),
            rank=env.rank,
            world_size=env.world_size,
            micro_batch_tokens=cfg.train.micro_batch_tokens,
            chunk_tokens=cfg.model.logits_chunk_tokens,
            device=device,
        )
    if built:
        from dpo_dist.model import free_memory, release_engine

        release_engine(built.pop().engine)
        free_memory()
    return summaries, dirs, fingerprints


def _build_reference_model(
    cfg: DPOConfig, device: torch.device, backend: str, dtype: torch.dtype
) -> torch.nn.Module:
    """The frozen reference as a ZeRO-3 inference engine, loaded like the policy."""
    from dpo_dist.engine import build_inference_engine
    from dpo_dist.model import training_dtype

    if dtype != training_dtype(cfg, device):
        raise ReferenceCacheError(f"reference dtype {dtype} differs from the run's {training_dtype(cfg, device)}")
    replicate, why = reference_replicates(cfg, device, dtype)
    logger.info("reference pass: %s (%s)", "a whole copy of the model per rank" if replicate else "partitioned with ZeRO-3", why)
    # QLoRA: the reference is the quantized base the policy starts from, not model.path's weights.
    quantize = cfg.model.lora.quantize
    engine = build_inference_engine(cfg, cfg.reference_model_path(), device, backend, LOGP_REDUCTION, quantize, replicate)
    return _EngineScorer(engine)


def reference_replicates(cfg: DPOConfig, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the frozen reference holds a whole copy per rank (``reference.partition``), and why:
    for the precompute pass and the online reference (``engine.OnlineReference``) alike. Called on
    every rank; all get rank 0's answer.

    ``auto`` replicates when the frozen weights take at most half of one device's memory
    (``memory.replicate_frozen_copy``, the planner's rule too), leaving the rest to activations and
    the logits chunk: forwards then need no collectives, where ZeRO-3 gathers every layer on every
    forward."""
    setting = cfg.reference.partition
    if setting != "auto":
        return setting == "replicate", f"reference.partition={setting}"
    weights = _model_bytes(cfg.reference_model_path(), dtype)
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
        where = "of the GPU's"
    else:  # the node's ranks share the host's memory
        ranks = D.first_env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=1)
        memory = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // max(ranks, 1)
        where = f"of 1/{ranks} of the host's available"
    replicate = replicate_frozen_copy(weights, memory)
    reason = f"reference.partition=auto: weights {weights / 2**30:.2f} GiB {'<=' if replicate else '>'} half {where} {memory / 2**30:.1f} GiB"
    # Rank 0 decides for all: memories differ between ranks (available host pages read at another
    # moment, mixed GPUs), and ranks building different engines would hang in mismatched collectives.
    return D.broadcast_object((replicate, reason))


def _model_bytes(path: str, dtype: torch.dtype) -> int:
    """Bytes of the model's weights in ``dtype``, counted on a meta-device skeleton of its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpo_dist.adapters import model_dir
    from dpo_dist.export import zero3_loading_paused

    config_dir = model_dir(path)  # an adapter export: its base holds the weights
    # The online reference may be decided while a ZeRO-3 policy is alive (built first): unhidden,
    # transformers would build this skeleton inside zero.Init, which fails on the meta device.
    with zero3_loading_paused(), torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    return sum(p.numel() for p in skeleton.parameters()) * torch.empty((), dtype=dtype).element_size()


class _EngineScorer(torch.nn.Module):
    """A DeepSpeed engine of ``model.PackedPolicy`` as a module mapping a PackedBatch to
    SequenceLogps: each micro-batch is one top-level engine forward (see ``_scorer``)."""

    def __init__(self, engine: torch.nn.Module):
        super().__init__()
        self.engine = engine
        # A partitioned engine's forwards are collectives (every rank must run as many).
        self.collective = engine.zero_optimization_partition_weights()

    def forward(self, batch: PackedBatch) -> SequenceLogps:
        from dpo_dist.model import run_packed

        return run_packed(self.engine, batch)


# --------------------------------------------------------------------------------------------
# Writing shards


def _write_shard(cache_dir: Path, index: int, table: pa.Table, fingerprint: str) -> None:
    """Write a shard atomically, then its sidecar (the sidecar marks the shard finished)."""
    name = shard_name(index)
    table = table.replace_schema_metadata(
        {"dpo_dist.fingerprint": fingerprint, "dpo_dist.format_version": str(FORMAT_VERSION)}
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    data = sink.getvalue()
    write_bytes_atomic(cache_dir / name, data, prefix=f".{name}.")
    digest = shard_digest(data)
    write_bytes_atomic(
        cache_dir / f"{name}.sha256", f"{digest}  {name}\n".encode(), prefix=f".{name}.sha256."
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# Coordination: rank 0 decides, the lock serialises jobs


def _broadcast(value: Any, world_size: int) -> Any:
    """Rank 0's ``value`` on every rank."""
    if world_size == 1:
        return value
    _require_process_group(world_size)
    return D.broadcast_object(value)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        _require_process_group(world_size)
        dist.barrier()


def _require_process_group(world_size: int) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} needs an initialised torch.distributed process group")


def _on_rank0(fn: Callable[[], Any], world_size: int) -> Any:
    """``fn()`` on rank 0, its result on every rank; its error (a ``ReferenceCacheError`` too)
    raised on every rank instead of leaving the others waiting. The others wait without the
    collective timeout: hashing a 70B reference model for the first time can outlast it."""
    if world_size > 1:
        _require_process_group(world_size)
    return D.on_rank0(fn)


class _CacheLock:
    """Exclusive ``flock`` on ``DIR/.lock`` held by a job's rank 0; the job's other ranks wait
    by polling the lock file for the job's token (see the module docstring)."""

    def __init__(self, cache_dir: Path, rank: int, world_size: int, poll_s: float):
        self.path = cache_dir / LOCK_NAME
        self.rank, self.world_size, self.poll_s = rank, world_size, poll_s
        self._fd: int | None = None

    def __enter__(self) -> _CacheLock:
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}" if self.rank == 0 else None
        token = _broadcast(token, self.world_size)
        # The first, non-blocking attempt is a collective, so that a failure there (a directory
        # that cannot be made, NFS mounted nolock, Lustre without -o flock) reaches every rank
        # instead of leaving them polling for a token that never comes.
        acquired = _on_rank0(lambda: self._try_acquire(token), self.world_size)
        if not acquired:
            if self.rank == 0:
                self._acquire(token)
            else:
                D.wait_for_token(self.path, token, self.poll_s)
        _barrier(self.world_size)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            release_flock(self._fd)
            self._fd = None

    def _try_acquire(self, token: str) -> bool:
        """Rank 0: take the lock if it is free; False (the file kept open) if another job holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fd = fd
            return False
        except OSError:
            os.close(fd)
            raise
        self._own(fd, token)
        return True

    def _acquire(self, token: str) -> None:
        """Rank 0, after ``_try_acquire`` found the lock taken: wait for it (possibly for hours)."""
        fd = self._fd
        holder = self.path.read_text().split(":")[:2] or ["?"]
        logger.info("reference cache %s is locked by %s; waiting for it", self.path.parent, ":".join(holder))
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._own(fd, token)

    def _own(self, fd: int, token: str) -> None:
        write_holder(fd, token)
        self._fd = fd
