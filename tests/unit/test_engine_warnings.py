"""What the engine does instead of the best path is said, not silent: a resume without this rank's
RNG state, deepspeed.leaf_modules=auto finding no block class, a checkpoint pruning cannot delete,
a TR-DPO reference that would never move."""

from __future__ import annotations

import logging
import os
import random

import pytest
import torch
from torch import nn

from dpo_dist import checkpoint as C
from dpo_dist import distributed as D
from dpo_dist import engine as E
from dpo_dist import model as M
from dpo_dist.config import DeepSpeedConfig, config_from_dict
from tests.unit.tiny_models import tiny_llama


class NoEngine:
    """Stands for the DeepSpeed engine: resuming its state is not what these tests are about."""

    def load_checkpoint(self, *args, **kwargs):
        return None, {}


def checkpoint(tmp_path, step: int, *, rng: bool):
    cfg = config_from_dict({"output_dir": str(tmp_path)})
    tag = C.checkpoint_root(cfg) / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text(f"{step}\n")
    if rng:
        torch.save(C._rng_state(), tag / "rng_rank00000.pt")
    return cfg, tag


def test_a_resume_without_this_ranks_rng_file_warns_that_it_is_not_exact(tmp_path, caplog):
    cfg, tag = checkpoint(tmp_path, 4, rng=False)
    env = D.DistEnv(0, 0, 1, "127.0.0.1", 0, None)
    with caplog.at_level(logging.WARNING, logger="dpo_dist.engine"):
        assert C.load_latest_checkpoint(NoEngine(), cfg, env) == 4
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"resume from {tag}: no rng_rank00000.pt" in warning
    assert "RNG state is not restored and the resumed run is not exact" in warning
    assert "expected when the checkpoint was written by fewer ranks" in warning


def test_a_resume_with_the_rng_file_restores_it_without_a_warning(tmp_path, caplog):
    random.seed(1)
    cfg, _ = checkpoint(tmp_path, 4, rng=True)
    want = random.random()
    random.seed(2)
    with caplog.at_level(logging.WARNING, logger="dpo_dist.engine"):
        assert C.load_latest_checkpoint(NoEngine(), cfg, D.DistEnv(0, 0, 1, "127.0.0.1", 0, None)) == 4
    assert random.random() == want
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_b_auto_fetch_units_without_block_classes_says_it_hooks_every_module(caplog):
    class Blocks(nn.Module):
        _no_split_modules = ["MissingBlock"]

        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 2)

    with caplog.at_level(logging.INFO, logger="dpo_dist.engine"):
        assert M.mark_fetch_units(nn.Sequential(nn.Linear(2, 2)), DeepSpeedConfig()) == []
        assert M.mark_fetch_units(Blocks(), DeepSpeedConfig()) == []
        assert M.mark_fetch_units(tiny_llama(), DeepSpeedConfig()) == ["LlamaDecoderLayer"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # none for the model whose blocks were marked
    assert "ZeRO-3 fetch units: per module" in warnings[0]
    assert "deepspeed.leaf_modules=auto found no block class: Sequential declares no _no_split_modules" in warnings[0]
    assert "none of Blocks's _no_split_modules (MissingBlock) is one of its modules" in warnings[1]


def test_c_pruning_warns_about_what_it_cannot_delete_and_goes_on(tmp_path, caplog, monkeypatch):
    root = tmp_path / "checkpoints"
    for step, complete in ((1, True), (2, True), (3, True), (4, False)):
        tag = root / f"step_{step:08d}"
        tag.mkdir(parents=True)
        (tag / "state.pt").write_text("x")
        if complete:
            (tag / "COMPLETE").write_text(f"{step}\n")
    (root / "step_00000001" / "stuck.pt").write_text("x")
    unlink = os.unlink

    def failing_unlink(path, *args, **kwargs):
        if os.fspath(path).endswith("stuck.pt"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", failing_unlink)
    with caplog.at_level(logging.WARNING, logger="dpo_dist.engine"):
        C._prune_checkpoints(root, keep=1)
    # The others were pruned past the failure: only the newest complete one and what failed stay.
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000003"]
    assert sorted(p.name for p in (root / "step_00000001").iterdir()) == ["stuck.pt"]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"could not delete 2 entries of {root / 'step_00000001'}" in warning
    assert "stuck.pt: [Errno 13] Permission denied" in warning and "delete it by hand" in warning


@pytest.mark.parametrize("keep", [1, 2])
def test_c_pruning_that_succeeds_is_quiet(tmp_path, caplog, keep):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "COMPLETE").write_text(f"{step}\n")
    with caplog.at_level(logging.WARNING, logger="dpo_dist.engine"):
        C._prune_checkpoints(root, keep=keep)
    assert len(list(root.iterdir())) == keep and not caplog.records


@pytest.mark.parametrize("sync_every, warned", [(512, True), (120, False), (0, False)])
def test_d_a_tr_dpo_reference_that_never_syncs_is_said(caplog, sync_every, warned):
    """TRL's ref_model_sync_steps default (512) on a 120-step run: the reference would never move."""
    reference = {"mode": "online", "sync_every": sync_every}
    cfg = config_from_dict({"output_dir": "/tmp/x", "train": {"max_steps": 120}, "reference": reference})
    caplog.set_level(logging.INFO, logger=E.log.name)
    E.log_schedule(cfg, 6000)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected = ["reference.sync_every=512 is more than the run's 120 steps: the reference never moves (plain online DPO)"]
    assert said == (expected if warned else [])
