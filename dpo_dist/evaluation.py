"""Standalone evaluation (``dpo-eval``): held-out reward accuracy and margins of a trained policy.

The numbers are the ones training logs as ``eval/*`` (the same ``engine.evaluate``), for any
exported model or checkpoint, against the reference of the run config (``reference.model_path``
or ``model.path``, its cached log-probs reused or computed). Results go to ``eval.output`` (default ``output_dir``) as
``eval.json``; the ranks work in ``output_dir/eval`` (see ``rank_config``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_dist import distributed as D
from dpo_dist.config import DPOConfig

if TYPE_CHECKING:
    from dpo_dist.data.subset import DataSource

log = logging.getLogger("dpo_dist.evaluation")


class EvalError(ValueError):
    """Nothing to evaluate (one line saying why)."""


def held_out_source(cfg: DPOConfig, purpose: str) -> DataSource:
    """The run's held-out data (``data.sources()``), or ``EvalError`` saying there is none for ``purpose``."""
    source = cfg.data.sources()[1]
    if source is None:
        raise EvalError(f"no held-out data {purpose}: data.eval_path is null and data.eval_split is 0")
    return source


def rank_config(cfg: DPOConfig, work_subdir: str) -> DPOConfig:
    """The config the ranks get: resolved policy and output paths, and a private working directory.

    Launchers write ``output_dir/config.yaml`` for the ranks; pointing ``output_dir`` at
    ``<output_dir>/<work_subdir>`` keeps an evaluated run's own config.yaml intact, while the
    results still land in the run directory (``eval.output``).
    """
    out = cfg.output_dir
    evaluation = dataclasses.replace(
        cfg.eval, policy_path=cfg.eval.resolved_policy_path(out), output=cfg.eval.resolved_output(out)
    )
    return dataclasses.replace(cfg, output_dir=str(Path(out) / work_subdir), eval=evaluation)


def policy_model_dir(cfg: DPOConfig) -> Path:
    """A Hugging Face directory for ``eval.policy_path``; a DeepSpeed checkpoint is exported first,
    unless it holds its export already (``checkpoints/step_N/hf/``, ``train.export_checkpoints``).

    A LoRA adapter directory counts as one (``generation.load_causal_lm`` and
    ``model.load_causal_lm`` load its base with it), so does the export of a LoRA checkpoint
    made with ``model.lora.merge_on_export=false``, which is such a directory."""
    from dpo_dist.export import CHECKPOINT_EXPORT, export_checkpoint, resolve_checkpoint

    path = Path(cfg.eval.resolved_policy_path(cfg.output_dir))
    if is_model_dir(path):
        return path
    if is_checkpoint(path):

        def exported() -> Path | None:  # swapped in whole: never a partial export
            root, tag, _ = resolve_checkpoint(path)
            return root / tag / CHECKPOINT_EXPORT if is_model_dir(root / tag / CHECKPOINT_EXPORT) else None

        # Rank 0 decides for all: on shared storage a rank's listing of the checkpoints can lag.
        if (found := D.on_rank0(exported)) is not None:
            return found
        out = Path(cfg.output_dir) / "policy"
        D.rank0_then_wait(lambda: export_checkpoint(path, out))
        return out
    raise EvalError(
        f"eval.policy_path={path}: neither a Hugging Face model directory, a LoRA adapter directory "
        "nor a dpo_dist checkpoint"
    )


def is_model_dir(path: Path) -> bool:
    """``path`` is a Hugging Face model directory or a PEFT adapter directory."""
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()


def is_checkpoint(path: Path) -> bool:
    """``path`` names a dpo_dist checkpoint: one, a run's ``checkpoints/`` or a run directory."""
    return (path / "COMPLETE").exists() or (path / "checkpoints").is_dir() or path.name == "checkpoints"


def policy_source(cfg: DPOConfig) -> dict[str, Any]:
    """The policy as the user named it (``eval.policy_path``, resolved) and, for a checkpoint, the
    training step it holds: the evaluated directory itself may be a temporary export."""
    from dpo_dist.export import resolve_checkpoint

    path = Path(cfg.eval.resolved_policy_path(cfg.output_dir))
    step = None
    if not is_model_dir(path) and is_checkpoint(path):
        tag = resolve_checkpoint(path)[1]  # a run or checkpoints/ directory: its latest complete one
        match = re.fullmatch(r"step_(\d+)", tag)
        step = int(match.group(1)) if match else None
    return {"policy_source": str(path), "policy_step": step}


def evaluate_run(cfg: DPOConfig) -> dict[str, float]:
    """The ``eval`` task, on every rank; returns (and on rank 0 writes) the eval metrics."""
    from dpo_dist.engine import StepContext, build_inference_engine, evaluate, prepare_reference, setup_job
    from dpo_dist.model import policy_normalization

    held_out_source(cfg, "to evaluate on")
    job = setup_job(cfg)
    env, device, eval_data = job.env, job.device, job.eval_data
    source = policy_source(cfg)  # before a checkpoint is exported to a temporary directory
    policy_dir = policy_model_dir(cfg)
    # The eval split's reference only: the train split's would be a whole pass for nothing.
    reference = prepare_reference(cfg, env, device, job.backend, None, eval_data, training=False)
    policy = build_inference_engine(cfg, str(policy_dir), device, job.backend, policy_normalization(cfg))
    metrics = evaluate(StepContext(policy, reference, cfg, device, env.world_size), eval_data, env)
    result = {"policy": str(policy_dir), **source, "reference": cfg.reference_model_path(), "eval_pairs": len(eval_data), **metrics}
    if env.is_main:
        out = Path(cfg.eval.resolved_output(cfg.output_dir))
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        for key, value in result.items():
            log.info("%s: %s", key, value)
    return result
