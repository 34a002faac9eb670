"""Offline export: a DeepSpeed ZeRO checkpoint -> a consolidated Hugging Face model directory.

Training exports ``final/`` itself (``engine.export_hf``); this is for any intermediate
checkpoint, on a single CPU process: DeepSpeed's ``zero_to_fp32`` merges the partitions, the
model skeleton is built on the meta device (no second copy of the weights), and the weights
are saved as safetensors with the tokenizer of the run.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from dpo_dist.runinfo import read_config

log = logging.getLogger("dpo_dist.export")


class ExportError(ValueError):
    """The checkpoint cannot be exported (one line saying why)."""


def resolve_checkpoint(path: str | Path) -> tuple[Path, str, Path]:
    """(checkpoints dir, tag, run dir) for a run dir, a checkpoints dir or one checkpoint dir."""
    path = Path(path).resolve()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name == "checkpoints":
        done = sorted(p.name for p in path.iterdir() if (p / "COMPLETE").exists())
        if not done:
            raise ExportError(f"{path}: no complete checkpoint")
        return path, done[-1], path.parent
    if not (path / "COMPLETE").exists():
        raise ExportError(f"{path}: not a complete dpo_dist checkpoint (no COMPLETE marker)")
    return path.parent, path.name, path.parent.parent


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str = "auto") -> Path:
    """Write a Hugging Face model (safetensors + config + tokenizer) for ``checkpoint`` to ``out_dir``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root, tag, run_dir = resolve_checkpoint(checkpoint)
    cfg = read_config(run_dir / "config.yaml")
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    weights = {k.removeprefix("model."): v for k, v in state.items()}
    hf_config = AutoConfig.from_pretrained(cfg.model.path)
    target = _dtype(dtype, hf_config)
    if cfg.model.lora.enabled:
        model = _lora_model(cfg, weights, target)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        model.load_state_dict({k: v.to(target) for k, v in weights.items()}, strict=True, assign=True)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(cfg.model.resolved_tokenizer_path()).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log.info("exported %s/%s to %s (%s)", root, tag, out_dir, target)
    return out_dir


def _lora_model(cfg, adapter_weights: dict[str, torch.Tensor], dtype: torch.dtype):
    """Base model + the checkpoint's adapters; merged when ``model.lora.merge_on_export``.

    LoRA checkpoints hold only the adapters (the frozen base is ``model.path``), so the base is
    loaded from there and every checkpoint tensor must land on an adapter parameter.
    """
    from transformers import AutoModelForCausalLM

    from dpo_dist.engine import apply_lora

    base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype)
    model = apply_lora(base, cfg.model.lora, cfg.train.seed)
    result = model.load_state_dict({k: v.to(dtype) for k, v in adapter_weights.items()}, strict=False)
    missing_adapters = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing_adapters:
        raise ExportError(
            f"checkpoint does not match model.lora of its run: unexpected {result.unexpected_keys[:3]}, "
            f"missing adapters {missing_adapters[:3]}"
        )
    return model.merge_and_unload() if cfg.model.lora.merge_on_export else model


def _dtype(name: str, hf_config) -> torch.dtype:
    if name == "auto":
        return getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
