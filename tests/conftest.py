"""Test-wide settings: CPU DeepSpeed, an isolated cache, GPU tests skipped without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Caches (tokenization, reference log-probs, file hashes) live in a per-session temp dir."""
    os.environ["DPO_DIST_CACHE"] = str(tmp_path_factory.mktemp("dpo_dist_cache"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
