"""The reference cache on disk: the Arrow shard schema, the manifest, shard files and their
digests, the training-time reader (``ReferenceStore``) and ``dpo-data shards``' inspection.

``dpo_dist.reference`` computes caches (and documents the layout, resume and locking); this module
is everything that reads, checks or atomically writes their files. Its public names are also
importable from ``dpo_dist.reference``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from dpo_dist.fingerprint import NEW_FILE_MODE, json_sha256
from dpo_dist.logprobs import length_desensitized, normalized_logps

FORMAT_VERSION = 1
"""Bump when the shard or manifest layout, or the meaning of a column, changes."""

COMPONENTS = ("model", "tokenizer", "data", "settings")
"""Fingerprint components, in the order mismatches are reported."""

MANIFEST_NAME = "manifest.json"

SCHEMA = pa.schema(
    [
        ("example_id", pa.int64()),
        ("chosen_logp", pa.float32()),
        ("rejected_logp", pa.float32()),
        ("chosen_tokens", pa.int32()),
        ("rejected_tokens", pa.int32()),
    ]
)
"""The shard columns of every cache."""

TAIL_COLUMNS = (("chosen_tail_logp", pa.float32()), ("rejected_tail_logp", pa.float32()))
"""LD-DPO (loss.ld_alpha): the summed log-probs of each response's tokens past its pair's shorter
response (``logprobs.response_tail_sums``), in caches whose settings say ``tail_logps`` (written
only for runs that need them, so every other cache keeps ``SCHEMA`` and its fingerprint)."""

TAIL_SETTING = "tail_logps"
"""The reference setting recorded (True) when a cache has ``TAIL_COLUMNS``; absent otherwise."""


def shard_schema(tails: bool) -> pa.Schema:
    """The columns of a cache's shards: ``SCHEMA``, and ``TAIL_COLUMNS`` when it has tail sums."""
    return pa.schema([*SCHEMA, *TAIL_COLUMNS]) if tails else SCHEMA


def has_tails(settings: Any) -> bool:
    """Whether reference settings (a manifest's ``settings``, ``settings_values``) include tail sums."""
    return isinstance(settings, dict) and settings.get(TAIL_SETTING) is True

_MISMATCH = {
    # The model fingerprint covers config.json too, not only the weights.
    "model": "model files changed",
    "tokenizer": "tokenizer changed",
    "data": "data file changed (or what is read of it: data.*_key, data.max_samples, data.eval_split)",
    # Settings include the reference dtype and quantization, not only tokenization.
    "settings": "reference settings changed",
}


class ReferenceCacheError(RuntimeError):
    """A reference cache that cannot be used as is; the message is one line naming the reason."""


def combined_fingerprint(fingerprints: dict[str, Any]) -> str:
    """One sha256 over the four components (``settings_values`` is covered by ``settings``)."""
    require_components(fingerprints)
    return json_sha256({name: fingerprints[name] for name in COMPONENTS})


def shard_name(index: int) -> str:
    return f"part-{index:05d}.arrow"


# --------------------------------------------------------------------------------------------
# Reading


class ReferenceStore:
    """Reference log-probs of a complete, verified cache, looked up by example id.

    Rows are indexed by a sorted copy of the ``example_id`` column (numpy ``searchsorted``), so
    memory is a few arrays of ``num_examples`` elements, never Python objects per row.
    """

    def __init__(self, cache_dir: Path, manifest: dict[str, Any], table: pa.Table):
        self.cache_dir = cache_dir
        self.manifest = manifest
        ids = table.column("example_id").to_numpy()
        order = np.argsort(ids, kind="stable")
        self._ids = ids[order]
        self._columns = {name: table.column(name).to_numpy()[order] for name in table.schema.names[1:]}
        duplicated = self._ids[1:][self._ids[1:] == self._ids[:-1]]
        if duplicated.size:
            raise ReferenceCacheError(
                f"reference cache {cache_dir} has duplicate example ids, e.g. {int(duplicated[0])}; delete it"
            )
        self._on_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    @classmethod
    def open(
        cls,
        cache_dir: str | os.PathLike,
        expected_fingerprints: dict[str, Any],
        example_ids: np.ndarray | torch.Tensor | Sequence[int],
        *,
        verified: Mapping[str, Any] | None = None,
    ) -> ReferenceStore:
        """Open a complete cache made from ``expected_fingerprints`` that covers ``example_ids``.

        Refuses (``ReferenceCacheError``, one line) a missing manifest, an unfinished cache, any
        changed fingerprint component, a shard whose sha256 differs and missing example ids.

        ``verified``: the ``shards`` entries of a manifest whose shards this job has just hashed
        (``ReferenceSummary.verified_shards``: rank 0 checks them under the cache lock and every
        rank receives the result). A shard whose entry in the manifest read here is the same is
        trusted; any other is hashed here.
        """
        cache_dir = Path(cache_dir).expanduser().absolute()
        manifest = matching_manifest(cache_dir, expected_fingerprints)
        if manifest is None:
            raise ReferenceCacheError(
                f"reference cache {cache_dir}: manifest.json missing (compute it with dpo-precompute "
                "or reference.mode=precompute)"
            )
        if not manifest.get("complete"):
            raise ReferenceCacheError(
                f"reference cache {cache_dir} is incomplete (complete=false in manifest.json): "
                "rerun the reference pass to finish it"
            )
        verified = verified or {}
        tables = []
        for name, entry in sorted(manifest["shards"].items()):
            # Hashing reads the whole shard; every rank doing it again, seconds after rank 0, is
            # world_size reads of the cache from the shared filesystem that check nothing new: a
            # complete cache is never rewritten, and a recomputed one has a new manifest.
            if verified.get(name) == entry:
                data = shard_bytes(cache_dir, name)
            else:
                data = checked_shard_bytes(cache_dir, name, entry["sha256"])
            tables.append(pa.ipc.open_file(data).read_all().replace_schema_metadata(None))
        table = pa.concat_tables(tables) if tables else shard_schema(has_tails(manifest.get("settings"))).empty_table()
        store = cls(cache_dir, manifest, table)
        store._rows(example_ids)  # every id the run will ask for must be there
        return store

    def __len__(self) -> int:
        return int(self._ids.size)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def lookup(
        self,
        example_ids: np.ndarray | torch.Tensor | Sequence[int],
        *,
        normalize: str = "sum",
        ld_alpha: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen_logp, rejected_logp) float32 tensors for ``example_ids``; ``ld_alpha`` makes them
        LD-DPO's (``logprobs.length_desensitized``, from the tail columns), ``normalize="mean"``
        divides by the response token counts.

        Ids on an accelerator are looked up there, without a host sync; such ids are not checked
        (``open`` checked the run's ids), so ask only for ids of the dataset it was opened for.
        """
        if normalize not in ("sum", "mean"):
            raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
        if ld_alpha is not None and not self.has_tails:
            raise ReferenceCacheError(
                f"reference cache {self.cache_dir} has no tail sums (it was computed for a run without loss.ld_alpha)"
            )
        wanted = ("chosen_logp", "rejected_logp") + (("chosen_tokens", "rejected_tokens") if normalize == "mean" else ())
        wanted += tuple(name for name, _ in TAIL_COLUMNS) if ld_alpha is not None else ()
        if isinstance(example_ids, torch.Tensor) and example_ids.device.type != "cpu":
            columns = self._device_columns(example_ids.device)
            rows = torch.searchsorted(columns["example_id"], example_ids).clamp_(max=max(len(self) - 1, 0))
            values = {name: columns[name][rows] for name in wanted}
        else:
            rows = self._rows(example_ids)
            values = {name: torch.from_numpy(self._columns[name][rows]) for name in wanted}
        sides = []
        for side in ("chosen", "rejected"):
            logps = length_desensitized(values[f"{side}_logp"], values.get(f"{side}_tail_logp"), ld_alpha)
            sides.append(normalized_logps(logps, values.get(f"{side}_tokens"), normalize).float())
        return sides[0], sides[1]

    @property
    def has_tails(self) -> bool:
        """Whether the cache holds LD-DPO's tail sums (``TAIL_COLUMNS``)."""
        return all(name in self._columns for name, _ in TAIL_COLUMNS)

    def token_counts(
        self, example_ids: np.ndarray | torch.Tensor | Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen_tokens, rejected_tokens) int32 CPU tensors: scored response tokens per sequence."""
        rows = self._rows(example_ids)
        return (
            torch.from_numpy(self._columns["chosen_tokens"][rows]),
            torch.from_numpy(self._columns["rejected_tokens"][rows]),
        )

    def _rows(self, example_ids) -> np.ndarray:
        """Row of each id; raises naming the missing ones."""
        ids = _as_numpy_ids(example_ids)
        rows = np.searchsorted(self._ids, ids)
        found = rows < self._ids.size
        found[found] = self._ids[rows[found]] == ids[found]
        if not found.all():
            missing = ids[~found]
            raise ReferenceCacheError(
                f"reference cache {self.cache_dir}: {missing.size} example ids missing from the cache, "
                f"e.g. {int(missing[0])}"
            )
        return rows

    def _device_columns(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._on_device:
            host = {"example_id": self._ids, **self._columns}
            self._on_device[device] = {
                name: torch.from_numpy(values).to(device) for name, values in host.items()
            }
        return self._on_device[device]


def _as_numpy_ids(example_ids) -> np.ndarray:
    if isinstance(example_ids, torch.Tensor):
        example_ids = example_ids.detach().cpu().numpy()
    return np.asarray(example_ids, dtype=np.int64).reshape(-1)


# --------------------------------------------------------------------------------------------
# Inspection (dpo-data shards)


def describe_cache(cache_dir: str | os.PathLike) -> list[str]:
    """Human-readable summary of a cache's manifest: paths, fingerprints, examples, shards."""
    cache_dir, manifest, problem = _inspect(cache_dir, "no manifest.json (not a reference cache, or never started)")
    if problem:
        return [problem]
    # A hand-edited or damaged manifest is described as far as it can be; verify_cache reports it.
    shards = _mapping(manifest.get("shards"))
    if manifest.get("complete"):
        status = "complete"
    else:  # sidecars appear as shards finish, so they show a running pass's progress
        finished = len(list(cache_dir.glob("part-*.arrow.sha256")))
        status = f"incomplete ({finished} of {manifest.get('num_shards')} shards written)"
    settings = _mapping(manifest.get("settings"))
    fps = _mapping(manifest.get("fingerprints"))
    lines = [
        f"cache: {cache_dir}",
        f"status: {status}",
        f"format_version: {manifest.get('format_version')}",
        f"fingerprint: {manifest.get('fingerprint')}",
        f"model: {manifest.get('model_path')} ({fps.get('model')})",
        f"tokenizer: {manifest.get('tokenizer_path')} ({fps.get('tokenizer')})",
        f"data: {fps.get('data')}",
        f"settings: {fps.get('settings')} ({', '.join(f'{k}={v}' for k, v in sorted(settings.items()))})",
        f"examples: {manifest.get('num_examples')} in {manifest.get('num_shards')} shards "
        f"of up to {manifest.get('pairs_per_shard')} pairs",
    ]
    lines += [
        f"{name}: {_mapping(entry).get('rows')} rows, sha256 {_mapping(entry).get('sha256')}"
        for name, entry in sorted(shards.items())
    ]
    return lines


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _inspect(cache_dir: str | os.PathLike, missing: str) -> tuple[Path, dict[str, Any] | None, str | None]:
    """(absolute dir, manifest, None), or the one-line problem when there is no readable manifest."""
    cache_dir = Path(cache_dir).expanduser().absolute()
    try:
        manifest = read_manifest(cache_dir)
    except ReferenceCacheError as err:
        return cache_dir, None, str(err)
    return cache_dir, manifest, None if manifest is not None else f"{cache_dir}: {missing}"


def verify_cache(cache_dir: str | os.PathLike) -> list[str]:
    """Problems of a cache, each one line (empty if it is complete and every shard checks out).

    Re-hashes every shard and re-reads its rows; fingerprints are not compared (that needs the
    inputs: ``ReferenceStore.open`` does it).
    """
    cache_dir, manifest, problem = _inspect(cache_dir, "manifest.json missing")
    if problem:
        return [problem]
    problems = []
    if not manifest.get("complete"):
        problems.append(f"{cache_dir}: incomplete (complete=false in manifest.json)")
    ids = []
    if not isinstance(manifest.get("shards"), dict):
        problems.append(f"{cache_dir}: manifest.json's shards is not a mapping of shard names to entries")
    for name, entry in sorted(_mapping(manifest.get("shards")).items()):
        entry = _mapping(entry)
        try:
            if isinstance(entry.get("sha256"), str):
                data = checked_shard_bytes(cache_dir, name, entry["sha256"])
            else:
                problems.append(f"shard {name}: manifest.json entry has no sha256")
                data = shard_bytes(cache_dir, name)  # its rows are still checked below
            table = pa.ipc.open_file(data).read_all()
        except (ReferenceCacheError, pa.ArrowInvalid, OSError) as err:
            problems.append(str(err))
            continue
        expected = shard_schema(has_tails(manifest.get("settings")))
        if table.schema.remove_metadata() != expected:
            problems.append(f"shard {name} has columns {table.schema.names}, expected {expected.names}")
            continue
        if table.num_rows != entry.get("rows"):
            problems.append(f"shard {name} has {table.num_rows} rows, manifest says {entry.get('rows')}")
        ids.append(table.column("example_id").to_numpy())
    all_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    if manifest.get("complete") and all_ids.size != manifest.get("num_examples"):
        problems.append(f"{all_ids.size} rows for {manifest.get('num_examples')} examples")
    if np.unique(all_ids).size != all_ids.size:
        problems.append(f"{all_ids.size - np.unique(all_ids).size} duplicate example ids")
    return problems


# --------------------------------------------------------------------------------------------
# Manifest and shard files


def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    """The parsed manifest, None if absent; raises for an unreadable or foreign format."""
    path = cache_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ReferenceCacheError(
            f"reference cache {cache_dir}: manifest.json is unreadable ({err})"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ReferenceCacheError(
            f"reference cache {cache_dir} has format_version {found}, this dpo_dist writes {FORMAT_VERSION}; "
            "delete it or pick another reference.cache_dir"
        )
    return manifest


def matching_manifest(cache_dir: Path, fingerprints: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest if its fingerprints equal ``fingerprints``; None if there is none."""
    manifest = read_manifest(cache_dir)
    if manifest is None:
        if any(cache_dir.glob("part-*.arrow")):
            raise ReferenceCacheError(
                f"reference cache {cache_dir} has shards but no manifest.json; delete it or pick another "
                "reference.cache_dir"
            )
        return None
    reasons = _fingerprint_mismatches(manifest, fingerprints)
    if reasons:
        raise ReferenceCacheError(
            f"reference cache {cache_dir} was built from other inputs: {'; '.join(reasons)} "
            "(pick another reference.cache_dir or delete this one)"
        )
    return manifest


def _fingerprint_mismatches(manifest: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """One reason per differing component, the settings one naming the settings that changed."""
    require_components(expected)
    cached = manifest.get("fingerprints", {})
    reasons = []
    for name in COMPONENTS:
        if cached.get(name) == expected[name]:
            continue
        reason = _MISMATCH[name]
        if name == "settings":
            before, after = manifest.get("settings") or {}, expected.get("settings_values") or {}
            changed = [
                f"{k} {before.get(k)} -> {after.get(k)}"
                for k in sorted(set(before) | set(after))
                if before.get(k) != after.get(k)
            ]
            if changed:
                reason += f" ({', '.join(changed)})"
        reasons.append(reason)
    return reasons


def verify_shards(cache_dir: Path, manifest: dict[str, Any]) -> None:
    for name, entry in sorted(manifest["shards"].items()):
        checked_shard_bytes(cache_dir, name, entry["sha256"])


def shard_bytes(cache_dir: Path, name: str) -> pa.Buffer:
    """The shard's bytes, memory-mapped, unchecked."""
    path = cache_dir / name
    if not path.is_file():
        raise ReferenceCacheError(
            f"reference cache {cache_dir}: shard {name} is missing; delete the cache or pick another reference.cache_dir"
        )
    with pa.memory_map(str(path)) as source:
        return source.read_buffer()


def checked_shard_bytes(cache_dir: Path, name: str, sha256: str) -> pa.Buffer:
    """The shard's bytes, memory-mapped, after checking them against the recorded digest."""
    data = shard_bytes(cache_dir, name)
    if shard_digest(data) != sha256:
        raise ReferenceCacheError(
            f"reference cache {cache_dir}: shard {name} is corrupted (sha256 mismatch); delete the cache "
            "or pick another reference.cache_dir"
        )
    return data


def shard_digest(data: bytes | pa.Buffer) -> str:
    """sha256 hex of a shard's bytes. Every shard digest goes through here, so that a test can
    count them (a shard of a reused cache is hashed once per job start)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    with pa.memory_map(str(path)) as source:
        return shard_digest(source.read_buffer())


def shard_rows(path: Path) -> int:
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    write_bytes_atomic(
        path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode(), prefix=f".{path.name}."
    )


def write_bytes_atomic(path: Path, data: bytes | pa.Buffer, *, prefix: str) -> None:
    """tmp file in the same directory, fsync, rename over ``path``, fsync the directory."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, NEW_FILE_MODE)  # mkstemp's 0600 would lock other users out of a shared cache
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def require_components(fingerprints: dict[str, Any]) -> None:
    missing = [name for name in COMPONENTS if not isinstance(fingerprints.get(name), str)]
    if missing:
        raise ValueError(f"fingerprints need {', '.join(COMPONENTS)}; missing {', '.join(missing)}")
