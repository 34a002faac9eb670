"""Offline export: a DeepSpeed ZeRO checkpoint -> a consolidated Hugging Face model directory.

Training exports ``final/`` itself (``checkpoint.export_hf``); this is for any intermediate
checkpoint, on a single CPU process, in bounded memory: a 70B checkpoint's fp32 master weights
alone are 280 GB. DeepSpeed's ``zero_to_fp32`` (lazy mode) memory-maps the ranks' partitions
and gathers one tensor at a time; the tensors are converted to the export dtype and written
one safetensors shard at a time, so the process holds at most one shard (``max_shard_size``)
plus the pages the kernel maps in. LoRA checkpoints hold only the small adapters: they are
loaded onto the base model (``model.path``), and merged or saved as an adapter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from dpo_dist.adapters import is_adapter_dir, load_adapter, model_dir
from dpo_dist.runinfo import read_config

log = logging.getLogger("dpo_dist.export")

DEFAULT_MAX_SHARD_SIZE = "5GB"  # Hugging Face's default for save_pretrained


class ExportError(ValueError):
    """The checkpoint cannot be exported (one line saying why)."""


class ExportStopped(Exception):
    """``save_consolidated``'s ``stop`` said to stop between shards (a preemption warning)."""


CHECKPOINT_EXPORT = "hf"
"""A checkpoint's Hugging Face model, ``checkpoints/step_N/hf/`` (``train.export_checkpoints``)."""

RUN_FILES = ("config.yaml", "run_info.json", "metrics.jsonl")
"""Files a run directory holds (``dpo_dist.runinfo``): a directory with one is a run, not a checkpoint."""


def resolve_checkpoint(path: str | Path) -> tuple[Path, str, Path]:
    """(checkpoints dir, tag, run dir) for a run dir, a checkpoints dir or one checkpoint dir."""
    given = path
    path = Path(path).resolve()
    if not path.exists():
        raise ExportError(f"{given}: does not exist")
    if not path.is_dir():
        raise ExportError(f"{given}: not a directory (give a run dir, its checkpoints/ dir or one checkpoint dir)")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    elif any((path / name).is_file() for name in RUN_FILES):
        raise ExportError(f"{path}: no checkpoints under {path / 'checkpoints'}")
    if path.name == "checkpoints":
        done = sorted(p.name for p in path.iterdir() if (p / "COMPLETE").exists())
        if not done:
            raise ExportError(f"{path}: no complete checkpoint")
        return path, done[-1], path.parent
    if not (path / "COMPLETE").exists():
        raise ExportError(f"{path}: not a complete dpo_dist checkpoint (no COMPLETE marker)")
    return path.parent, path.name, path.parent.parent


SHARD_SIZE_HINT = "not a size: give a positive number and a unit (KB, MB, GB or TB), e.g. 5GB"


def parse_shard_size(size: str | int) -> int:
    """``size`` (``max_shard_size``: a number and a unit, KB, MB, GB or TB, e.g. ``5GB``; or bytes
    as an int) in bytes; ``ExportError`` (``SHARD_SIZE_HINT``) when it is not one. Checked up
    front: the shard writer would only read it once the whole checkpoint is consolidated."""
    from huggingface_hub.serialization._base import parse_size_to_int

    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        try:
            value = parse_size_to_int(str(size))
        except ValueError:
            value = 0
    if value <= 0:
        raise ExportError(SHARD_SIZE_HINT)
    return value


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str = "auto",
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    cfg=None,
) -> Path:
    """Write a Hugging Face model (safetensors + config + tokenizer) for ``checkpoint`` to ``out_dir``.
    ``cfg``: the run's config (a ``DPOConfig``), when not read from its ``config.yaml``."""
    try:  # before any work: consolidating a 70B checkpoint takes long
        parse_shard_size(max_shard_size)
    except ExportError as exc:
        raise ExportError(f"max_shard_size={max_shard_size!r}: {exc}") from None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoTokenizer

    root, tag, run_dir = resolve_checkpoint(checkpoint)
    out_dir = Path(out_dir).absolute()
    check_replaceable(out_dir)  # before any work
    cfg = cfg or read_config(run_dir / "config.yaml")
    sources = {Path(p).expanduser().resolve() for p in (cfg.model.path, cfg.model.resolved_tokenizer_path())}
    if out_dir.resolve() in sources:
        raise ExportError(f"{out_dir}: is the run's model.path (or tokenizer): an export would replace the model it starts from")
    # Lazy: tensors are gathered from the memory-mapped partitions only when written.
    # A LoRA run's frozen base is model.path itself: only its adapters are read back.
    if cfg.deepspeed.stage == 0:
        state = _unpartitioned_state(root / tag, trainable_only=cfg.model.lora.enabled)
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(
            str(root), tag=tag, exclude_frozen_parameters=cfg.model.lora.enabled, lazy_mode=True
        )
    weights = {k.removeprefix("model."): v for k, v in state.items()}
    hf_config = AutoConfig.from_pretrained(model_dir(cfg.model.path))
    target = _dtype(dtype, hf_config)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.resolved_tokenizer_path())

    def write(tmp: Path) -> None:
        if cfg.model.lora.enabled:
            adapters = {name: tensor.contiguous() for name, tensor in weights.items()}
            lora_model(cfg, adapters, target).save_pretrained(tmp, max_shard_size=max_shard_size)
        else:
            save_consolidated(weights, hf_config, target, tmp, max_shard_size)
            base_generation_config(model_dir(cfg.model.path), hf_config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    out_dir = Path(out_dir)
    write_atomically(out_dir, write)
    log.info("exported %s/%s to %s (%s)", root, tag, out_dir, target)
    return out_dir


def save_consolidated(
    weights: Mapping,
    hf_config,
    dtype: torch.dtype,
    out_dir: Path,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    writer: bool = True,
    stop: Callable[[], bool] | None = None,
) -> None:
    """Save ``weights`` (name -> tensor, or a lazy tensor: ``.shape``, ``.dtype``, ``.contiguous()``,
    as zero_to_fp32's or ``PartitionedTensor``) as the Hugging Face model of ``hf_config``, one
    shard in memory at a time.

    The names must be exactly the model's: its parameters and persistent buffers, where a tied
    weight (``lm_head.weight`` of a tied-embedding model) may appear and is not written, as
    ``save_pretrained`` does. Shards are cut by huggingface_hub the way ``save_pretrained`` cuts
    them (``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``). Every rank of
    a ZeRO-3 job calls it with ``PartitionedTensor`` values (their gathers are collectives, made
    in the same order everywhere); only the ``writer`` writes. ``stop`` (a collective there too)
    is asked before each shard: True raises ``ExportStopped``, leaving ``out_dir`` half written.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), zero3_loading_paused():  # a shape reference, not a ZeRO-3 model
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    expected = skeleton.state_dict()
    # named_parameters() lists a tied weight once, under its first (owning) name.
    owned = [name for name, _ in skeleton.named_parameters()]
    owned += [name for name, _ in skeleton.named_buffers() if name in expected]
    missing = [name for name in owned if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    if missing or unexpected:
        raise ExportError(
            f"checkpoint does not match the model of its run: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name in owned:
        if tuple(weights[name].shape) != tuple(expected[name].shape):
            raise ExportError(
                f"{name}: checkpoint shape {tuple(weights[name].shape)}, model {tuple(expected[name].shape)}"
            )

    def target_dtype(name: str) -> torch.dtype:
        return dtype if weights[name].dtype.is_floating_point else weights[name].dtype

    try:
        split = split_torch_state_dict_into_shards(
            {
                name: torch.empty(expected[name].shape, dtype=target_dtype(name), device="meta")
                for name in owned
            },
            filename_pattern="model{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )
    except ValueError as exc:
        raise ExportError(f"max_shard_size={max_shard_size!r}: {exc}") from None
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    for filename, names in split.filename_to_tensors.items():
        if stop is not None and stop():
            raise ExportStopped(f"stopped before {filename}")
        shard = {name: weights[name].contiguous().to(target_dtype(name)) for name in names}
        if writer:
            save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
        del shard  # before the next shard is gathered: one shard in memory at a time
    if not writer:
        return
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"
        )
    skeleton.config.dtype = dtype
    skeleton.config.save_pretrained(out_dir)


def base_generation_config(model_path: str, hf_config):
    """The generation settings of the trained model's base: its ``generation_config.json`` (which
    may list end-of-turn tokens beside the EOS, e.g. Llama 3's ``<|eot_id|>``), else those derived
    from its config, as ``from_pretrained`` does; ``final/`` keeps the same."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:  # the base has none
        return GenerationConfig.from_model_config(hf_config)


class PartitionedTensor:
    """A ZeRO-3 parameter as ``save_consolidated`` reads it: ``contiguous()`` gathers it (a
    collective) and returns the whole tensor on the writer, an empty one elsewhere."""

    def __init__(self, param: torch.nn.Parameter, keep: bool):
        self.param, self.keep = param, keep
        self.shape = tuple(getattr(param, "ds_shape", param.shape))
        self.dtype = param.dtype

    def contiguous(self) -> torch.Tensor:
        import deepspeed

        with deepspeed.zero.GatheredParameters([self.param]):
            return self.param.data.detach().cpu().clone() if self.keep else torch.empty(0, dtype=self.dtype)


class MergedLoraTensor:
    """A ZeRO-3 LoRA layer's merged weight ``W + scaling * B @ A`` (summed in fp32, stored in W's
    dtype), read like ``PartitionedTensor``: the three tensors are gathered together."""

    def __init__(self, layer, adapter: str, keep: bool):
        self.layer, self.adapter, self.keep = layer, adapter, keep
        weight = layer.base_layer.weight
        self.shape = tuple(getattr(weight, "ds_shape", weight.shape))
        self.dtype = weight.dtype

    def contiguous(self) -> torch.Tensor:
        import deepspeed

        layer, adapter = self.layer, self.adapter
        weight, a, b = layer.base_layer.weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        with deepspeed.zero.GatheredParameters([weight, a, b]):
            if not self.keep:
                return torch.empty(0, dtype=self.dtype)
            return merged_lora_weight(layer, weight.data, a.data, b.data, adapter).cpu()


def merged_lora_weight(layer, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, adapter: str) -> torch.Tensor:
    """``W + scaling * B @ A`` of PEFT LoRA ``layer`` (summed in fp32, stored in W's dtype)."""
    delta = (b.float() @ a.float()) * layer.scaling[adapter]
    if getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    return (weight.float() + delta).to(weight.dtype)


def _unpartitioned_state(directory: Path, trainable_only: bool) -> dict[str, torch.Tensor]:
    """A ``deepspeed.stage=0`` checkpoint's weights: its model-states file holds them whole
    (DeepSpeed's zero_to_fp32 reads ZeRO 1-3 partitions only). ``trainable_only`` (LoRA): the
    adapters, as zero_to_fp32's exclude_frozen_parameters gives them."""
    path = directory / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise ExportError(f"{directory}: no {path.name}; not a complete deepspeed.stage=0 checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=False)
    module = state["module"]
    if trainable_only:
        module = {name: tensor for name, tensor in module.items() if "lora_" in name}
    return {name: tensor.float() for name, tensor in module.items()}


def write_atomically(out_dir: Path, write) -> None:
    """``write(tmp)`` into a sibling temp directory, then swap it in: readers never see half an export."""
    tmp = staging_dir(out_dir)
    write(tmp)
    swap_in(tmp, out_dir)


def link_export(source: Path, out_dir: Path) -> None:
    """``out_dir`` as a copy of the export ``source`` (swapped in whole) made of hard links to its
    files, so a 70B model is not written twice; copied where the filesystem has no hard links.
    Each keeps its files when the other is deleted (a pruned checkpoint)."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    write_atomically(out_dir, lambda tmp: shutil.copytree(source, tmp, copy_function=link))


def staging_dir(out_dir: Path) -> Path:
    """The empty sibling directory an export of ``out_dir`` is written into first."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def swap_in(tmp: Path, out_dir: Path) -> None:
    check_replaceable(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def check_replaceable(out_dir: Path) -> None:
    """An export replaces ``out_dir`` whole: refuse (``ExportError``) one that holds anything but
    an earlier export (a model's config.json or an adapter's adapter_config.json, no run files),
    e.g. a run directory or a folder of models given as ``--out``."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a directory")
    names = {p.name for p in out_dir.iterdir()}
    is_export = bool(names & {"config.json", "adapter_config.json"}) and not names & {"config.yaml", "metrics.jsonl", "checkpoints"}
    if names and not is_export:
        raise ExportError(f"{out_dir}: not empty and not an earlier export; an export would replace it whole: choose another --out")


def lora_model(cfg, adapter_weights: dict[str, torch.Tensor], dtype: torch.dtype):
    """Base model + the checkpoint's adapters; merged when ``model.lora.merge_on_export``.

    LoRA checkpoints hold only the adapters (the frozen base is ``model.path``, or the base of the
    adapter a run continued), so the base is loaded from there with the run's adapter (fresh, or
    the continued one as it started) and every checkpoint tensor must land on an adapter parameter.
    """
    from transformers import AutoModelForCausalLM

    from dpo_dist.model import apply_lora

    with zero3_loading_paused():
        base = AutoModelForCausalLM.from_pretrained(model_dir(cfg.model.path), dtype=dtype)
    if is_adapter_dir(cfg.model.path):
        model = load_adapter(base, cfg.model.path)
    else:
        model = apply_lora(base, cfg.model.lora, cfg.train.seed)
    result = model.load_state_dict({k: v.to(dtype) for k, v in adapter_weights.items()}, strict=False)
    missing_adapters = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing_adapters:
        raise ExportError(
            f"checkpoint does not match model.lora of its run: unexpected {result.unexpected_keys[:3]}, "
            f"missing adapters {missing_adapters[:3]}"
        )
    return model.merge_and_unload() if cfg.model.lora.merge_on_export else model


@contextlib.contextmanager
def zero3_loading_paused():
    """Build models whole inside this block even while a ZeRO-3 model is alive in the process.

    transformers builds every model (``from_pretrained``, ``from_config``, meta-device skeletons
    too) inside ``deepspeed.zero.Init`` while an ``HfDeepSpeedConfig`` of stage 3 is alive (a
    process-wide weak reference, kept alive with each ZeRO-3 model by ``model.load_causal_lm``).
    A whole copy loaded then would be partitioned with that config (a collective the other ranks
    may not be part of: the end-of-training QLoRA merge on rank 0; a replicated reference beside
    the policy), and a meta skeleton fails (``Cannot copy out of meta tensor``). The reference is
    hidden for the block and restored after: transformers consults it again later (PEFT, saving)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers keeps no public getter of it
    alive = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if alive is not None:
            hf_deepspeed.set_hf_deepspeed_config(alive)


def _dtype(name: str, hf_config) -> torch.dtype:
    if name == "auto":
        return getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
