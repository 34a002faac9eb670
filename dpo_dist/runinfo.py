"""The files of a run directory: config.yaml, run_info.json, metrics.jsonl and best.json."""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import platform
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from dpo_dist.config import ConfigError, DPOConfig, config_from_dict
from dpo_dist.fingerprint import release_flock, write_holder

log = logging.getLogger(__name__)


def write_config(cfg: DPOConfig) -> Path:
    """Write the resolved config to ``output_dir/config.yaml`` (what the ranks read)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    _atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


RESUMABLE_CHANGES = (
    "output_dir", "model.name", "model.attn_backend", "model.activation_checkpointing", "model.logits_chunk_tokens",
    "model.lora.merge_on_export", "data.cache_dir", "deepspeed.offload_optimizer", "deepspeed.offload_param",
    "deepspeed.overlap_comm", "deepspeed.reduce_bucket_size", "deepspeed.prefetch_bucket_size",
    "deepspeed.param_persistence_threshold", "deepspeed.max_live_parameters", "deepspeed.leaf_modules",
    "deepspeed.comm_timeout_minutes", "cluster.", "train.micro_batch_tokens", "train.checkpoint_every",
    "train.keep_checkpoints", "train.export_checkpoints", "train.metric_for_best_model", "train.eval_every",
    "train.log_every", "reference.mode", "reference.cache_dir",
    "reference.partition", "wandb.", "eval.",
)
"""Settings a run may change between its jobs (a resume, a requeue, a re-run of a finished run):
how and where it runs, not what it trains. Any other difference is another run (``check_same_run``)."""


def check_same_run(cfg: DPOConfig) -> None:
    """Refuse (``ConfigError``) to train into an ``output_dir`` that holds a run trained with other
    settings: it would resume that run's checkpoints under the new settings (DeepSpeed restores
    the old learning rate schedule, a lower max_steps stops past its end), or call it finished,
    while config.yaml, which dpo-eval, dpo-export and dpo-report read, then names settings that
    never trained it. ``RESUMABLE_CHANGES`` may differ, and train.max_steps may grow."""
    out = Path(cfg.output_dir)
    path = out / "config.yaml"
    if not path.is_file() or not has_trained(out):
        return
    try:
        before = _flat(config_from_dict(yaml.safe_load(path.read_text()) or {}).to_dict())
    except Exception as exc:  # noqa: BLE001 - an unreadable or outdated config.yaml is itself the answer
        raise ConfigError(f"output_dir={out}: holds a run whose config.yaml cannot be read ({' '.join(str(exc).split())}); train into a new output_dir") from None
    now = _flat(cfg.to_dict())
    for flat in (before, now):  # the same file named relative or absolute (runs/x vs $PWD/runs/x)
        for key in _PATH_KEYS:
            if flat.get(key):
                flat[key] = str(Path(flat[key]).expanduser().resolve())
    # Training longer continues the run (the schedule stretches from the resumed step on); a
    # lower max_steps would stop a run already past it, or call one finished that went further.
    # With train.epochs the length is the epochs (max_steps is not used), which may grow alike.
    length = "train.epochs" if before.get("train.epochs") is not None and now.get("train.epochs") is not None else "train.max_steps"
    longer = now[length] >= before[length]
    unused = {"train.max_steps"} if length == "train.epochs" else set()
    changed = [
        f"{key}: {before.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key)
        and not (key == length and longer)
        and key not in unused
        and not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)
    ]
    if changed:
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise ConfigError(
            f"output_dir={out} holds a run trained with other settings ({shown}): resume it with its own "
            "settings, or train into a new output_dir"
        )
    grown = now[length] > before[length]
    if grown and (out / "final").exists() and latest_complete_checkpoint(out / "checkpoints") is None:
        # Training would start again from step 0 and overwrite the finished run's metrics and final/.
        size = f"{before['train.epochs']:g}-epoch" if length == "train.epochs" else f"{before['train.max_steps']}-step"
        raise ConfigError(
            f"output_dir={out} holds a finished {size} run with no checkpoint to go on from "
            f"(train.checkpoint_every={before['train.checkpoint_every']}): train longer into a new output_dir "
            f"(e.g. with model.path={out / 'final'})"
        )


def check_sft_chain(sft: DPOConfig, dpo: DPOConfig) -> None:
    """Refuse (``ConfigError``) to train an ``sft_first`` chain's SFT stage longer once its DPO
    stage has trained: the longer SFT run replaces ``sft/final``, the model that DPO stage started
    from and scored against, so the DPO stage would be called finished, or resume, under a policy
    and reference it never had. (``check_same_run`` of the DPO stage cannot see it: its settings,
    ``model.path=sft/final`` included, are unchanged.)"""
    saved = Path(sft.output_dir) / "config.yaml"
    if not saved.is_file() or not has_trained(Path(dpo.output_dir)):
        return
    before = (yaml.safe_load(saved.read_text()) or {}).get("train", {}).get("max_steps")
    if before is not None and sft.train.max_steps != before:
        raise ConfigError(
            f"output_dir={dpo.output_dir}: its DPO stage trained from the {before}-step SFT stage in {sft.output_dir}; "
            f"sft_first.max_steps={sft.train.max_steps} would replace that model under it: train the longer chain into a new output_dir"
        )


def has_trained(out: Path) -> bool:
    """Whether run directory ``out`` holds any training: metrics, checkpoints or an export."""
    return any((out / name).exists() for name in ("metrics.jsonl", "checkpoints", "final"))


def complete_checkpoints(root: Path) -> list[tuple[str, int]]:
    """The checkpoints with a COMPLETE marker under ``root`` (``OUTPUT_DIR/checkpoints``), oldest
    first, as (directory name, step); half-written ones are not listed."""
    if not root.is_dir():
        return []
    done = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "COMPLETE").exists())
    return [(name, int(name.split("_")[1])) for name in done]


def latest_complete_checkpoint(root: Path) -> tuple[str, int] | None:
    """The newest complete checkpoint (``complete_checkpoints``), or None."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


BEST_RECORD = "best.json"
"""``train.metric_for_best_model``'s record in the run directory (``BestCheckpoint``)."""


@dataclass(frozen=True)
class BestCheckpoint:
    """The checkpoint with the best eval value of a metric, as ``best.json`` records it."""

    metric: str
    greater_is_better: bool
    step: int
    value: float
    checkpoint: str
    """Its directory, relative to the run directory (``checkpoints/step_N``)."""


def best_checkpoint(run_dir: str | Path, metric: str, greater_is_better: bool) -> BestCheckpoint | None:
    """The complete checkpoint of ``run_dir`` whose step's eval row in ``metrics.jsonl`` has the
    best ``metric`` (the earliest of equal values, as HF's strict comparison keeps it; nan never),
    or None. Read from the files alone, so a resumed job knows the best so far: ``metrics.jsonl``
    is cut back to the checkpoint it resumes from, and the best checkpoint is never pruned."""
    out = Path(run_dir)
    checkpoints = dict((step, name) for name, step in complete_checkpoints(out / "checkpoints"))
    path = out / "metrics.jsonl"
    # The last row of a step wins, as a resumed eval of the same step writes the same values.
    values = {row["step"]: row[metric] for row in (read_metrics(path) if path.exists() else []) if metric in row}
    best: BestCheckpoint | None = None
    for step in sorted(checkpoints.keys() & values.keys()):
        value = float(values[step])
        if math.isnan(value) or (best is not None and not (value > best.value if greater_is_better else value < best.value)):
            continue
        best = BestCheckpoint(metric, greater_is_better, step, value, f"checkpoints/{checkpoints[step]}")
    return best


def read_best(run_dir: str | Path) -> BestCheckpoint | None:
    """``best.json`` of ``run_dir``, or None (none written, or unreadable)."""
    try:
        return BestCheckpoint(**json.loads((Path(run_dir) / BEST_RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_best(run_dir: str | Path, best: BestCheckpoint) -> None:
    _atomic_write(Path(run_dir) / BEST_RECORD, json.dumps(asdict(best), indent=2) + "\n")


_PATH_KEYS = ("model.path", "model.tokenizer_path", "reference.model_path", "data.train_path", "data.eval_path")


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and key not in ("weights", "additional_parameters"):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


COMMAND_ENV = "DPO_DIST_COMMAND"
"""The user's command line (a JSON list) as the entry point received it, before the launcher ran the
ranks as ``python -m dpo_dist.worker ...`` (local) or submitit's job script (Slurm); the ranks
inherit it through their environment, and run_info.json records it as ``argv``."""
INHERITED_SECTIONS = ("stage", "model", "data", "loss", "reference", "train")
"""What an evaluation of a finished run takes from its ``config.yaml``: the policy's base model
(the reference), tokenization, data and loss settings it was trained with."""


def inherit_run_settings(values: dict[str, Any], run: dict[str, Any], overridden: list[str]) -> dict[str, Any]:
    """``values`` (a composed config) with ``INHERITED_SECTIONS`` taken from the run's config
    ``run``, except what the user overrode: a ``section=preset`` choice keeps the composed
    section, a ``section.key=value`` keeps the composed value of that key."""
    result = dict(values)
    for section in INHERITED_SECTIONS:
        if section not in run or section in overridden:
            continue
        if not isinstance(run[section], dict):
            result[section] = run[section]
            continue
        merged = json.loads(json.dumps(run[section]))  # a deep copy of plain YAML values
        for key in overridden:
            path = key.split(".")
            if path[0] != section or len(path) < 2:
                continue
            source, target = values[section], merged
            for part in path[1:-1]:
                source, target = source[part], target.setdefault(part, {})
            target[path[-1]] = source[path[-1]]
        result[section] = merged
    if isinstance(result.get("reference"), dict):
        # An evaluation scores against the initial model and never moves it (TR-DPO's
        # reference.sync_every would refuse e.g. reference.mode=precompute here).
        result["reference"] = {**result["reference"], "sync_every": 0}
    return result


def read_config(path: str | Path) -> DPOConfig:
    with open(path) as f:
        return config_from_dict(yaml.safe_load(f))


def versions() -> dict[str, str]:
    import deepspeed
    import pyarrow
    import torch
    import transformers

    import dpo_dist

    return {
        "dpo_dist": dpo_dist.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pyarrow.__version__,
    }


def record_command(argv: list[str]) -> None:
    """Remember ``argv`` as this run's command line for run_info.json (see ``COMMAND_ENV``)."""
    os.environ[COMMAND_ENV] = json.dumps(argv)


def command_line() -> list[str]:
    """The user's command (``record_command``), else this process's own argv (e.g. a worker that
    slurm/dpo_train.sbatch started)."""
    recorded = os.environ.get(COMMAND_ENV)
    return json.loads(recorded) if recorded else list(sys.argv)


def write_run_info(output_dir: str | Path, info: dict[str, Any]) -> None:
    """Write ``run_info.json``. A later job of the run (a resume, or a requeue before the first
    checkpoint) keeps ``reference.computed`` true if an earlier job computed that same cache: the
    run computed it, not this job."""
    info = dict(info)
    reference = info.get("reference")
    if isinstance(reference, dict) and not reference.get("computed"):
        try:
            before = read_run_info(output_dir).get("reference") or {}
        except (OSError, ValueError):
            before = {}
        if before.get("computed") and before.get("cache_dir") == reference.get("cache_dir"):
            info["reference"] = {**reference, "computed": True}
    body = {"versions": versions(), "argv": command_line(), **info}
    _atomic_write(Path(output_dir) / "run_info.json", json.dumps(body, indent=2, default=str) + "\n")


def read_run_info(output_dir: str | Path) -> dict[str, Any]:
    with open(Path(output_dir) / "run_info.json") as f:
        return json.load(f)


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, rows past the checkpoint are dropped first so the
    file reads as if the run had never been interrupted."""

    def __init__(self, output_dir: str | Path, resume_step: int = 0):
        self.path = Path(output_dir) / "metrics.jsonl"
        if self.path.exists():
            kept = [row for row in read_metrics(self.path) if row["step"] <= resume_step]
            _atomic_write(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            # A writer that died mid-row (disk full, a node lost) leaves a partial last line: it is
            # past the last checkpoint, so the resume writes that row again. Anywhere else: damage.
            if i < len(lines) - 1:
                raise
    return rows


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


RUN_LOCK = ".lock"
"""The file a training job's rank 0 holds an exclusive ``flock`` on (``RunLock``)."""
RUN_LOCK_ENV = "DPO_DIST_RUN_LOCKED"
"""Set by a launcher holding the lock of this (resolved) output_dir for the ranks it starts."""


class RunDirInUse(ConfigError):
    """Another training job holds the output_dir: nothing of this job may be written there."""


_claims: dict[str, Any] = {}
"""This process's ``claim_run_dir`` results by resolved output_dir: its RunLock, or the refusal."""


def claim_run_dir(output_dir: str | Path):
    """Hold ``output_dir`` for this process's training job before anything is written into it:
    a ``RunLock`` taken now, or earlier by this process (a Slurm rank 0 claims it first thing,
    ``train`` again later), or None where the launcher that started this rank holds it
    (``RUN_LOCK_ENV``). Raises ``RunDirInUse`` (again on every call) if another job holds it."""
    key = os.path.realpath(output_dir)
    if os.environ.get(RUN_LOCK_ENV) == key:
        return None
    if key not in _claims:
        try:
            _claims[key] = RunLock(output_dir).acquire()
        except RunDirInUse as exc:
            _claims[key] = exc
    claim = _claims[key]
    if isinstance(claim, RunDirInUse):
        raise claim
    return claim


def release_run_dir(output_dir: str | Path) -> None:
    """Give up this process's ``claim_run_dir`` of ``output_dir`` (if it holds one)."""
    claim = _claims.pop(os.path.realpath(output_dir), None)
    if isinstance(claim, RunLock):
        claim.release()


class RunLock:
    """A training job's exclusive lock on ``output_dir`` for its life (taken by the local launcher
    for its ranks or a Slurm job's rank 0, see ``claim_run_dir``): a second job training
    into the same directory (a sweep submitted twice, a resubmission while the first job still
    runs) is refused in one line, instead of both writing its checkpoints, metrics and final/.
    The lock goes with the process (the kernel releases a dead process's ``flock``), so a killed or
    preempted job leaves none behind; a requeued Slurm job (the same job id) waits up to
    ``requeue_wait_s`` for its previous run's, which NFS can keep for a lease period after that
    node died. Where the filesystem has no locks (NFS mounted ``nolock``) it warns and goes on."""

    def __init__(self, output_dir: str | Path, requeue_wait_s: float = 300.0, poll_s: float = 1.0):
        self.path = Path(output_dir) / RUN_LOCK
        self.requeue_wait_s, self.poll_s = requeue_wait_s, poll_s
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        job = os.environ.get("SLURM_JOB_ID")
        me = f"host {socket.gethostname()} pid {os.getpid()}" + (f" Slurm job {job}" if job else "")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.requeue_wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                # An empty holder is a lock being released (its holder empties the file first).
                mine = not holder or (job and holder.endswith(f" Slurm job {job}"))
                if not (mine and time.monotonic() < deadline):
                    os.close(fd)
                    raise RunDirInUse(
                        f"output_dir={self.path.parent} is in use by another training job ({holder or 'unknown'}): "
                        "let it finish (or stop it), or train into another output_dir"
                    ) from None
                time.sleep(self.poll_s)  # this job's own previous run, before a requeue: its lock lapses
            except OSError as exc:
                os.close(fd)
                log.warning("output_dir %s cannot be locked (%s): a second job training into it would not be refused", self.path.parent, exc)
                return self
        write_holder(fd, me)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            release_flock(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
