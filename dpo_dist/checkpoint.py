"""Resumable DeepSpeed checkpoints of a run: ``OUTPUT_DIR/checkpoints/step_NNNNNNNN/`` with each
rank's RNG state beside DeepSpeed's files and a ``COMPLETE`` marker written last, so a
half-written checkpoint is never resumed from; the newest ``train.keep_checkpoints`` complete
ones are kept."""

from __future__ import annotations

import logging
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpo_dist import distributed as D
from dpo_dist.config import DPOConfig

log = logging.getLogger(__name__)


def checkpoint_root(cfg: DPOConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def latest_complete_checkpoint(root: Path) -> tuple[str, int] | None:
    """The newest checkpoint with a COMPLETE marker; half-written ones are never picked."""
    if not root.is_dir():
        return None
    done = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "COMPLETE").exists())
    return (done[-1], int(done[-1].split("_")[1])) if done else None


def save_checkpoint(engine, cfg: DPOConfig, env: D.DistEnv, step: int) -> None:
    root = checkpoint_root(cfg)
    tag = _tag(step)
    # With LoRA the frozen base is model.path itself: saving its partitions again would cost the
    # whole model (141 GB for 70B) per checkpoint.
    engine.save_checkpoint(
        str(root),
        tag=tag,
        client_state={"step": step},
        save_latest=False,
        exclude_frozen_parameters=cfg.model.lora.enabled,
    )
    torch.save(_rng_state(), root / tag / f"rng_rank{env.rank:05d}.pt")
    D.barrier()
    if env.is_main:
        (root / tag / "COMPLETE").write_text(f"{step}\n")
        _prune_checkpoints(root, cfg.train.keep_checkpoints)
    D.barrier()


def _prune_checkpoints(root: Path, keep: int) -> None:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    complete = [p for p in dirs if (p / "COMPLETE").exists()]
    for p in complete[:-keep] + [p for p in dirs if p not in complete]:
        failures = _rmtree(p)
        if failures:
            # Pruning goes on (training must not stop for it), but a checkpoint that stays is disk
            # the user thinks is free: a 70B checkpoint is ~1 TB, and they pile up every save.
            log.warning(
                "checkpoint pruning: could not delete %d entr%s of %s (first: %s); it stays on disk, delete it by hand",
                len(failures), "y" if len(failures) == 1 else "ies", p, failures[0],
            )


def _rmtree(path: Path) -> list[str]:
    """Delete ``path`` as far as possible (past entries that fail); returns ``"entry: error"`` of each failure."""
    failures: list[str] = []
    if sys.version_info >= (3, 12):  # onerror is deprecated there; onexc does not exist before it
        shutil.rmtree(path, onexc=lambda _fn, entry, exc: failures.append(f"{entry}: {exc}"))
    else:
        shutil.rmtree(path, onerror=lambda _fn, entry, info: failures.append(f"{entry}: {info[1]}"))
    return failures


def load_latest_checkpoint(engine, cfg: DPOConfig, env: D.DistEnv) -> int:
    """Resume from the newest complete checkpoint; returns the number of steps already done."""
    # Rank 0 decides: on shared storage a rank's directory listing can lag (NFS attribute
    # caches), and ranks loading partitions of different steps would silently corrupt the model.
    found = D.broadcast_object(latest_complete_checkpoint(checkpoint_root(cfg)) if env.is_main else None)
    if found is None:
        return 0
    tag, step = found
    engine.load_checkpoint(str(checkpoint_root(cfg)), tag=tag, load_module_strict=not cfg.model.lora.enabled)
    rng_file = checkpoint_root(cfg) / tag / f"rng_rank{env.rank:05d}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        # Weights, optimizer and data position are restored, so the run goes on, but not exactly.
        # Under ZeRO 1-3 DeepSpeed refuses a changed world size, so a missing file means a lost one;
        # stage 0 checkpoints are one unpartitioned file and resume on more ranks than wrote them.
        log.warning(
            "resume from %s: no %s, so rank %d's Python/NumPy/torch RNG state is not restored and the "
            "resumed run is not exact (random draws such as dropout differ from an uninterrupted run); "
            "expected when the checkpoint was written by fewer ranks (deepspeed.stage=0), else the file was lost",
            checkpoint_root(cfg) / tag, rng_file.name, env.rank,
        )
    log.info("resumed from %s (step %d)", checkpoint_root(cfg) / tag, step)
    return step


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
