"""Content fingerprints for caches: sha256 of files, memoized, and of small JSON values.

Why memoize: the reference cache is keyed by the model's weights, and hashing 140 GB of Llama 3
70B safetensors takes minutes on every run. ``file_sha256`` remembers each file's digest in
``<cache root>/filehash.json`` under its absolute path together with its size, ``mtime_ns``,
inode and ``ctime_ns``; the digest is reused only while all are unchanged, so rewriting a file
re-hashes it, even when the rewrite kept the size and restored the mtime (``cp -p``,
``rsync -t``): no call can set ctime, and writing to a file (or replacing it) changes it.
A file modified less than ``RACY_S`` before it was hashed is not memoized (git's "racy clean"
rule): a filesystem with coarse timestamps could give a same-size rewrite within the same tick
the same mtime and ctime, and the old digest would be reused; an older file's next write always
gets a later mtime.

The cache root is ``$DPO_DIST_CACHE`` if set, else ``~/.cache/dpo_dist``. Several processes
(ranks, sweep jobs) may update the memo at once: each write re-reads the file, merges its own
entries and replaces the file atomically, so a lost race only costs a later re-hash, never a
wrong digest.

This module depends on nothing else in dpo_dist, so any package (data, reference) can use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("dpo_dist.fingerprint")

CACHE_ENV = "DPO_DIST_CACHE"
WEIGHT_PATTERNS = {
    "safetensors": ("model*.safetensors", "adapter_model.safetensors"),
    "bin": ("pytorch_model*.bin", "adapter_model.bin"),
}
"""Weight files that make up a model's fingerprint (plus ``config.json``): the ones
``from_pretrained`` loads, safetensors first. Other files in the folder (a trainer's
``training_args.bin`` or ``optimizer.bin``) do not change the log-probs."""

_MEMO_NAME = "filehash.json"
_MEMO_VERSION = 1
_BLOCK = 8 << 20
_HASH_THREADS = 8
RACY_S = 2.0
"""A file modified this recently before hashing is re-hashed next time (module docstring)."""
"""hashlib releases the GIL on large updates, so sharded checkpoints hash in parallel."""
_memo_unwritable_logged = False
"""Whether this process has said that the memo cannot be written (said once: it is retried on
every hash, and a run hashes many files)."""


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


NEW_FILE_MODE = 0o666 & ~_read_umask()
"""The mode ``open`` gives a new file, for files written through ``tempfile.mkstemp`` (always
0600), which would hide a cache shared through ``$DPO_DIST_CACHE`` from the other users. Read
once, at import: the umask can only be read by setting it, which races with threads creating
files."""


def cache_root() -> Path:
    """``$DPO_DIST_CACHE`` or ``~/.cache/dpo_dist`` (not created here)."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "dpo_dist"


def json_sha256(value: Any) -> str:
    """sha256 of ``value`` as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def bytes_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 8 MiB blocks, never memoized."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike, *, memo: bool = True) -> str:
    """sha256 of a file's bytes, reusing the memoized digest while the file is unchanged (size,
    mtime, inode and ctime)."""
    return files_sha256([path], memo=memo)[0]


def files_sha256(paths: Iterable[str | os.PathLike], *, memo: bool = True) -> list[str]:
    """sha256 of several files (in order), hashing only those not memoized, in parallel."""
    resolved = [Path(p).resolve() for p in paths]
    stats = [p.stat() for p in resolved]
    entries = _read_memo() if memo else {}
    digests: list[str | None] = []
    for path, st in zip(resolved, stats):
        entry = entries.get(str(path))
        fresh = entry and all(entry.get(key) == value for key, value in _memo_key(st).items())
        digests.append(entry["sha256"] if fresh else None)
    todo = [i for i, d in enumerate(digests) if d is None]
    if todo:
        settled = time.time_ns() - int(RACY_S * 1e9)
        with ThreadPoolExecutor(max_workers=min(_HASH_THREADS, len(todo))) as pool:
            for i, digest in zip(todo, pool.map(bytes_sha256, [resolved[i] for i in todo])):
                digests[i] = digest
        keep = [i for i in todo if stats[i].st_mtime_ns < settled]
        if memo and keep:
            _update_memo(
                {str(resolved[i]): {**_memo_key(stats[i]), "sha256": digests[i]} for i in keep}
            )
    return [d for d in digests if d is not None]


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over a Hugging Face model directory's weight files and ``config.json``.

    Each file contributes its name relative to the directory and its own sha256, so renaming or
    re-sharding a checkpoint changes the fingerprint too. Tokenizer files are not part of it (the
    tokenizer has its own fingerprint).
    """
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory not found")
    for patterns in WEIGHT_PATTERNS.values():
        weights = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
        if weights:
            break
    else:
        names = ", ".join(pattern for patterns in WEIGHT_PATTERNS.values() for pattern in patterns)
        raise FileNotFoundError(f"{model_dir}: no weight files ({names})")
    files = weights + ([root / "config.json"] if (root / "config.json").is_file() else [])
    digests = files_sha256(files)
    identity = {p.relative_to(root).as_posix(): d for p, d in zip(files, digests)}
    adapter_config = root / "adapter_config.json"
    if adapter_config.is_file():
        # A PEFT adapter scores as its base plus the adapter: its settings (alpha, r, targets)
        # and the base's weights decide the log-probs, not where the base lives.
        from dpo_dist.adapters import adapter_base  # it imports config, which imports this module

        adapter = json.loads(adapter_config.read_text())
        adapter.pop("base_model_name_or_path", None)
        adapter.pop("peft_version", None)  # who wrote it, not what it computes
        identity = {"files": identity, "adapter": adapter, "base": model_fingerprint(adapter_base(root).path)}
    return json_sha256(identity)


def _memo_key(st: os.stat_result) -> dict[str, int]:
    """What must be unchanged for a memoized digest to be reused (see the module docstring)."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "ctime_ns": st.st_ctime_ns}


def _memo_path() -> Path:
    return cache_root() / _MEMO_NAME


def _read_memo() -> dict[str, dict[str, Any]]:
    """The memo's entries; an unreadable or foreign memo counts as empty (it is only a cache)."""
    try:
        data = json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _MEMO_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _update_memo(new_entries: dict[str, dict[str, Any]]) -> None:
    """Merge entries into the memo and replace it atomically; failures only lose the memo."""
    path = _memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_memo()
        entries.update(new_entries)
        fd, tmp = tempfile.mkstemp(prefix=f".{_MEMO_NAME}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                os.fchmod(fd, NEW_FILE_MODE)
                json.dump({"version": _MEMO_VERSION, "entries": entries}, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        # A read-only home must not break training; the next run simply hashes again, which
        # for a large model costs minutes every run: say so, once.
        global _memo_unwritable_logged
        if not _memo_unwritable_logged:
            _memo_unwritable_logged = True
            log.warning(
                "cannot write the file-hash memo %s (%s): model weights will be hashed again on every "
                "run (minutes for a large model); set $%s to a writable directory to keep the digests",
                path, e.strerror or e, CACHE_ENV,
            )


def write_holder(fd: int, holder: str) -> None:
    """Name the holder of a just-taken ``flock`` in its lock file (read by waiting jobs and ranks,
    possibly on other nodes: flushed to the file system)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    os.fsync(fd)


def release_flock(fd: int) -> None:
    """Empty a lock file that names its holder, release its ``flock`` and close it."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
