"""Checkpoints, resume and Hugging Face exports of a training run (``dpo_dist.engine`` drives them).

A checkpoint is DeepSpeed's (``checkpoints/step_N/``) plus every rank's RNG state and, once a
TR-DPO reference has moved, that reference; ``COMPLETE`` marks it whole, and only complete ones
are resumed from or count when pruning. A run resumed on another number of ranks loads a ZeRO
checkpoint through DeepSpeed's universal format, converted once. Exports (``final/``, ``best/``,
``checkpoints/step_N/hf/``) are written to a staging directory and swapped in whole; a stop
signal between shards raises ``Preempted``, and the resumed job exports again.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpo_dist import distributed as D
from dpo_dist.adapters import model_dir
from dpo_dist.attention import unwrap_model
from dpo_dist.config import ConfigError, DPOConfig
from dpo_dist.export import CHECKPOINT_EXPORT, merged_lora_weight, write_atomically
from dpo_dist.model import REFERENCE_ADAPTER, is_peft, original_dropout_config, training_dtype
from dpo_dist.runinfo import (
    BestCheckpoint,
    best_checkpoint,
    latest_complete_checkpoint,
    read_best,
    write_best,
)

# The engine's logger: a training job's lines read as one log, filtered by one name.
log = logging.getLogger("dpo_dist.engine")


def checkpoint_root(cfg: DPOConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


MOVED_REFERENCE = "reference"
"""A checkpoint's sub-directory holding the TR-DPO reference as moved so far (``reference.sync_every``)."""


def save_checkpoint(engine, cfg: DPOConfig, env: D.DistEnv, step: int, reference=None, tokenizer=None) -> None:
    """DeepSpeed's checkpoint of ``engine`` plus every rank's RNG state and, once a TR-DPO
    ``reference`` (an ``OnlineReference``) has moved, that reference; COMPLETE marks it whole."""
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
    if reference is not None and reference.moved(step):
        reference.save(cfg, tokenizer, root / tag / MOVED_REFERENCE, env)
    D.barrier()
    if env.is_main:
        (root / tag / "COMPLETE").write_text(f"{step}\n")
        best = track_best(cfg)
        _prune_checkpoints(root, cfg.train.keep_checkpoints, also_keep=Path(best.checkpoint).name if best else None)
    D.barrier()


def checkpoint_export_dir(cfg: DPOConfig, step: int) -> Path:
    """Where step ``step``'s checkpoint holds its Hugging Face model (``train.export_checkpoints``)."""
    return checkpoint_root(cfg) / _tag(step) / CHECKPOINT_EXPORT


def resume_pending_export(engine, cfg: DPOConfig, tokenizer, env: D.DistEnv, start: int) -> None:
    """``hf/`` of the checkpoint a run resumes from (step ``start``), written now when
    ``train.export_checkpoints`` wants one and it has none: a preemption checkpoint leaves it to
    the resumed job (its grace period belongs to the DeepSpeed state), an export stopped by a
    signal or killed leaves only its staging directory, and a run that turned the setting on has
    none yet. The engine holds exactly that checkpoint's weights. Before the preemption flag, as
    ``resume_pending_eval``: a signal now requeues at once and the next job exports."""
    if start == 0 or not cfg.train.export_checkpoints:
        return
    out = checkpoint_export_dir(cfg, start)
    if D.on_rank0(out.is_dir):  # rank 0 decides for all: the export is collective
        return
    log.info("export of checkpoint step %d (left by the job that saved it) to %s", start, out)
    export_hf(engine, cfg, tokenizer, out, env)


def _prune_checkpoints(root: Path, keep: int, also_keep: str | None = None) -> None:
    """Delete all but the newest ``keep`` complete checkpoints and ``also_keep`` (the best one's
    directory name), and every incomplete one."""
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    complete = [p for p in dirs if (p / "COMPLETE").exists()]
    for p in [p for p in complete[:-keep] if p.name != also_keep] + [p for p in dirs if p not in complete]:
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


def moved_reference_path(cfg: DPOConfig, env: D.DistEnv) -> str | None:
    """The TR-DPO reference saved with the checkpoint a resume starts from, or None (no
    checkpoint, or none moved yet: the reference is still the initial one). Rank 0 decides;
    a checkpoint past a sync without its reference is refused (every rank raises)."""
    if not cfg.reference.syncs():
        return None

    def find() -> str | None:
        found = latest_complete_checkpoint(checkpoint_root(cfg))
        if found is None or not cfg.reference.moved_after(found[1]):
            return None
        path = checkpoint_root(cfg) / found[0] / MOVED_REFERENCE
        if not path.is_dir():
            raise ConfigError(
                f"{path.parent} has no {MOVED_REFERENCE}/: the reference moved at step {cfg.reference.sync_every} "
                "(reference.sync_every) is lost, so this run cannot resume exactly; train into a new output_dir"
            )
        return str(path)

    return D.on_rank0(find)


def resume_checkpoint(cfg: DPOConfig, env: D.DistEnv) -> tuple[str, int, bool] | None:
    """(tag, step, whether its ZeRO partitions were written by another number of ranks) of the
    newest complete checkpoint, or None. Rank 0 decides: on shared storage a rank's directory
    listing can lag (NFS attribute caches), and ranks loading partitions of different steps would
    silently corrupt the model."""

    def find():
        found = latest_complete_checkpoint(checkpoint_root(cfg))
        if found is None:
            return None
        written = checkpoint_world(checkpoint_root(cfg) / found[0], cfg)
        return (*found, written is not None and written != env.world_size)

    return D.broadcast_object(find() if env.is_main else None)


def load_latest_checkpoint(engine, cfg: DPOConfig, env: D.DistEnv, resume: tuple[str, int, bool] | None = None) -> int:
    """Resume from the newest complete checkpoint (``resume``: ``resume_checkpoint``'s answer, asked
    here when not given); returns the number of steps already done. Partitions written by another
    number of ranks are converted once into a DeepSpeed universal checkpoint and loaded from it
    (the engine must then be built with ``load_universal``): a run can go on on more or fewer GPUs."""
    found = resume if resume is not None else resume_checkpoint(cfg, env)
    if found is None:
        return 0
    tag, step, other_world = found
    root = checkpoint_root(cfg)
    if other_world:
        root = universal_checkpoint(root / tag, env)
    engine.load_checkpoint(str(root), tag=tag, load_module_strict=not cfg.model.lora.enabled)
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
            "expected when the checkpoint was written by fewer ranks, else the file was lost",
            checkpoint_root(cfg) / tag, rng_file.name, env.rank,
        )
    log.info("resumed from %s (step %d)", checkpoint_root(cfg) / tag, step)
    return step


def checkpoint_world(directory: Path, cfg: DPOConfig) -> int | None:
    """How many ranks wrote the ZeRO 1-3 partitions in ``directory``; None for stage 0, whose
    single unpartitioned file resumes on any number."""
    if cfg.deepspeed.stage == 0:
        return None
    return len(list(directory.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))) or None


UNIVERSAL = "universal"
"""A checkpoint's DeepSpeed universal form, ``checkpoints/step_N/universal/step_N``."""


def universal_checkpoint(directory: Path, env: D.DistEnv) -> Path:
    """The load directory of ``directory``'s universal checkpoint (DeepSpeed's ``ds_to_universal``:
    every parameter and optimizer state whole, re-partitioned on load for any number of ranks),
    made once by rank 0 while the others wait."""
    out = directory / UNIVERSAL

    def convert() -> None:
        if (out / "COMPLETE").exists():
            return
        log.info("resume from %s on another number of ranks: converting it to a universal checkpoint in %s", directory, out)
        shutil.rmtree(out, ignore_errors=True)
        command = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", str(directory), "--output_folder", str(out / directory.name),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = " ".join(done.stderr.strip().splitlines()[-1:]) or f"exit status {done.returncode}"
            raise ConfigError(f"{directory}: cannot convert to a universal checkpoint for another number of ranks ({tail})")
        (out / "COMPLETE").write_text("universal\n")

    D.rank0_then_wait(convert)
    return out


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def export_hf(engine, cfg: DPOConfig, tokenizer, out_dir: Path, env: D.DistEnv, stop=None) -> None:
    """Consolidated Hugging Face checkpoint (safetensors + config + tokenizer) on rank 0.

    A ZeRO-3 model is gathered parameter by parameter and written one 5GB shard at a time
    (``_export_partitioned``): rank 0's host holds one shard. A LoRA policy is exported merged
    (``W + scale * B @ A``: a plain model) or, with ``model.lora.merge_on_export=false``, as its
    adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``, loaded onto the base
    with PEFT; its config names the base it was loaded on). QLoRA merges into the unquantized weights
    of ``model.path`` (or of a continued adapter's base; see ``_export_adapters``). A continued
    adapter's frozen reference copy is left out either way.
    ``stop``: asked between the shards of a ZeRO-3 export (``export.save_consolidated``).
    """
    lora = is_peft(engine.module.model)
    if lora and (cfg.model.lora.quantized or not cfg.model.lora.merge_on_export):
        _export_adapters(engine, cfg, tokenizer, out_dir, env)
        return
    if engine.zero_optimization_partition_weights():
        _export_partitioned(engine, tokenizer, out_dir, env, stop)
        return
    state = engine.module.state_dict()
    if env.is_main:
        prefix = "model."
        weights = {k[len(prefix) :]: v.detach().cpu() for k, v in state.items() if k.startswith(prefix)}
        del state  # the merge replaces tensors in ``weights`` one by one: no second full copy
        if lora:
            merge_lora_state_dict(weights, engine.module.model)
        hf_model = unwrap_model(engine.module.model)

        def write(tmp: Path) -> None:
            with original_dropout_config(hf_model):
                hf_model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        write_atomically(out_dir, write)
        log.info("exported Hugging Face model%s to %s", " (LoRA merged)" if lora else "", out_dir)
    D.barrier()


def _export_partitioned(engine, tokenizer, out_dir: Path, env: D.DistEnv, stop=None) -> None:
    """A ZeRO-3 model exported one safetensors shard at a time (5GB, as ``save_pretrained``):
    every rank gathers each parameter in turn (a LoRA layer's weight with its adapters, merged),
    rank 0 keeps it until its shard is written. Rank 0's host holds one shard, not the whole
    16-bit model (141 GB for 70B)."""
    from dpo_dist.export import DEFAULT_MAX_SHARD_SIZE, save_consolidated, staging_dir, swap_in

    model = engine.module.model
    hf_model = unwrap_model(model.get_base_model() if is_peft(model) else model)
    weights = partitioned_weights(model, keep=env.is_main)
    dtype = next(hf_model.parameters()).dtype
    tmp = staging_dir(out_dir) if env.is_main else out_dir
    with original_dropout_config(hf_model) as config:
        save_consolidated(weights, config, dtype, tmp, DEFAULT_MAX_SHARD_SIZE, writer=env.is_main, stop=stop)
    if env.is_main:
        hf_model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        swap_in(tmp, out_dir)
        log.info("exported Hugging Face model%s to %s (one shard at a time)", " (LoRA merged)" if is_peft(model) else "", out_dir)
    D.barrier()


def partitioned_weights(model: nn.Module, keep: bool) -> dict[str, Any]:
    """The Hugging Face state of a ZeRO-3 ``model`` as lazy tensors for ``export.save_consolidated``,
    named as the plain model's: a PEFT LoRA model's adapted layers become their merged weights
    (``W + scaling * B @ A``), its adapter tensors and ``base_model.model.`` prefix disappear."""
    from dpo_dist.export import MergedLoraTensor, PartitionedTensor

    lora, prefix = is_peft(model), "base_model.model."
    weights: dict[str, Any] = {}
    merged_layers = set()
    if lora:
        from peft.tuners.lora import LoraLayer

        adapter = model.active_adapter
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                weights[f"{name.removeprefix(prefix)}.weight"] = MergedLoraTensor(module, adapter, keep)
                merged_layers.add(name)
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if "lora_" in name or (lora and owner.removesuffix(".base_layer") in merged_layers and leaf == "weight"):
            continue  # an adapter, or a base weight already merged above
        plain = name.removeprefix(prefix).replace(".base_layer.", ".")
        weights[plain] = PartitionedTensor(param, keep)
    state_keys = model.state_dict().keys()  # persistent buffers only; ZeRO-3 never partitions buffers
    for name, buffer in model.named_buffers():
        if name in state_keys:
            weights[name.removeprefix(prefix)] = buffer
    return weights


def merge_lora_state_dict(state: dict[str, torch.Tensor], peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Turn the full (gathered) state dict of a PEFT LoRA model, in place, into a plain one.

    Each adapted linear layer's ``base_layer.weight`` becomes ``weight + scaling * B @ A`` (summed
    in fp32, stored in the weight's dtype), adapter tensors are dropped and PEFT's name prefix
    ``base_model.model.`` removed. In place, one layer at a time, so a 70B merge never holds two
    copies of the weights. Adapter kinds other than LoRA on linear layers are refused; a continued
    adapter's frozen reference copy (``REFERENCE_ADAPTER``) is no part of the policy and dropped.
    """
    from peft.tuners.lora import LoraLayer

    prefix, adapter = "base_model.model.", peft_model.active_adapter
    merged: dict[str, torch.Tensor] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        weight = state.pop(f"{name}.base_layer.weight")
        a = state.pop(f"{name}.lora_A.{adapter}.weight")
        b = state.pop(f"{name}.lora_B.{adapter}.weight")
        merged[f"{name.removeprefix(prefix)}.weight"] = merged_lora_weight(module, weight, a, b, adapter)
        bias = state.pop(f"{name}.base_layer.bias", None)
        if bias is not None:
            merged[f"{name.removeprefix(prefix)}.bias"] = bias
    reference_copy = re.compile(rf"\.lora_\w+?\.{REFERENCE_ADAPTER}(\.|$)")
    for key in [k for k in state if reference_copy.search(k)]:
        del state[key]
    leftover = [k for k in state if "lora_" in k]
    if leftover:
        raise ValueError(f"cannot merge adapter weights {leftover[0]} (only LoRA on linear layers is supported)")
    for key in list(state):
        merged[key.removeprefix(prefix)] = state.pop(key)
    state.update(merged)
    return state


def _export_adapters(engine, cfg: DPOConfig, tokenizer, out_dir: Path, env: D.DistEnv) -> None:
    """Export from the trainable (adapter) weights alone, gathered from their ZeRO-3 partitions:
    saved with PEFT, or (QLoRA with ``merge_on_export``) merged into ``model.path``'s (base) weights
    loaded unquantized on rank 0, as ``dpo-export`` merges a LoRA checkpoint: the policy's 4-bit
    base is an approximation of those weights, not what a merged model should carry."""
    import deepspeed

    from dpo_dist.export import lora_model

    peft_model = engine.module.model
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in trainable]):
        state = {n: p.detach().cpu().clone() for n, p in trainable} if env.is_main else {}
    if env.is_main:
        merge = cfg.model.lora.merge_on_export

        def write(tmp: Path) -> None:
            if merge:
                dtype = next(iter(state.values())).dtype  # the run's dtype, as a 16-bit export
                lora_model(cfg, state, dtype).save_pretrained(tmp, safe_serialization=True)
            else:
                # The trained adapter alone (not a continued adapter's reference copy); its config
                # names the base model it was loaded on (adapters.load_adapter).
                peft_model.save_pretrained(tmp, state_dict=state, safe_serialization=True, selected_adapters=[peft_model.active_adapter])
            tokenizer.save_pretrained(tmp)

        write_atomically(out_dir, write)
        what = f"model (LoRA merged into {model_dir(cfg.model.path)})" if merge else "LoRA adapter"
        log.info("exported %s to %s", what, out_dir)
    D.barrier()


BEST_EXPORT = "best"
"""``output_dir/best/``: the best checkpoint's Hugging Face model (``train.metric_for_best_model``)."""


def export_final(engine, cfg: DPOConfig, tokenizer, env: D.DistEnv, stop=None, best: BestCheckpoint | None = None) -> None:
    """``final/`` after the last step (and after ``best/``: a run with ``final/`` is finished). A
    stop signal before or during it (``stop``, asked between the shards of a ZeRO-3 export; None
    without a checkpoint to resume from) requeues instead: a 70B export takes minutes, and a job
    killed halfway was not requeued. The resumed job starts at the last step and exports
    (``final/`` is swapped in whole, so a stopped export left none). Linked from an export of the
    same weights when there is one: the last checkpoint's ``hf/``, or ``best/`` when ``best`` (what
    ``export_best`` wrote it from) is the last step."""
    out = Path(cfg.output_dir) / "final"
    candidates = [checkpoint_export_dir(cfg, cfg.train.max_steps)] if cfg.train.export_checkpoints else []
    if best is not None and best.step == cfg.train.max_steps:  # else best/ holds earlier weights
        candidates.append(Path(cfg.output_dir) / BEST_EXPORT)
    source = D.on_rank0(lambda: next((c for c in candidates if c.is_dir()), None))  # each is swapped in whole
    if source is not None:
        linked_export(source, out, env)
    else:
        stoppable_export(engine, cfg, tokenizer, env, out, cfg.train.max_steps, stop)


def export_best(engine, cfg: DPOConfig, tokenizer, env: D.DistEnv, device: torch.device, stop=None) -> BestCheckpoint | None:
    """``best/`` at the end of a run with ``train.metric_for_best_model``, and its checkpoint
    (None without one). Linked from the best checkpoint's ``hf/`` when it has one; the last
    step's is the engine's own weights, exported as ``final/`` is (``stop`` as there); an earlier
    one is converted from its DeepSpeed checkpoint by rank 0 as ``dpo-export`` does, while the
    other ranks wait (the engine's weights are the last step's, and loading the best step's into
    it would need the number of ranks that wrote them). Written on every finishing job: a run
    that trained longer may have a new best."""
    metric = cfg.train.metric_for_best_model
    if metric is None:
        return None
    best = D.on_rank0(lambda: track_best(cfg))
    if best is None:
        log.warning("train.metric_for_best_model=%s: no checkpoint has an eval of it, so there is no %s/", metric, BEST_EXPORT)
        return None
    out, directory = Path(cfg.output_dir) / BEST_EXPORT, Path(cfg.output_dir) / best.checkpoint
    if D.on_rank0((directory / CHECKPOINT_EXPORT).is_dir):
        linked_export(directory / CHECKPOINT_EXPORT, out, env)
    elif best.step == cfg.train.max_steps:
        stoppable_export(engine, cfg, tokenizer, env, out, best.step, stop)
    else:
        from dpo_dist.export import export_checkpoint

        # The dtype final/ has: the training dtype of the engine's weights.
        dtype = "bf16" if training_dtype(cfg, device) == torch.bfloat16 else "fp32"
        log.info("%s/: converting %s on rank 0 (train.export_checkpoints=true exports every checkpoint as it is saved)", BEST_EXPORT, directory)
        D.rank0_then_wait(lambda: export_checkpoint(directory, out, dtype, cfg=cfg))
    log.info("best model (%s %.6g at step %d) is %s", metric, best.value, best.step, out)
    return best


def track_best(cfg: DPOConfig) -> BestCheckpoint | None:
    """Rank 0: the best checkpoint so far of ``train.metric_for_best_model`` (``runinfo.best_checkpoint``),
    written to ``best.json`` and logged when it changed; None without one (or without the metric)."""
    metric = cfg.train.metric_for_best_model
    if metric is None:
        return None
    best = best_checkpoint(cfg.output_dir, metric, cfg.train.greater_is_better())
    if best is not None and best != read_best(cfg.output_dir):
        write_best(cfg.output_dir, best)
        log.info("best checkpoint so far: step %d (%s %.6g), kept beside the newest train.keep_checkpoints", best.step, metric, best.value)
    return best


def linked_export(source: Path, out: Path, env: D.DistEnv) -> None:
    """``out`` made from the export ``source`` of the same weights by rank 0 (``export.link_export``)."""
    from dpo_dist.export import link_export

    D.rank0_then_wait(lambda: link_export(source, out))
    log.info("exported Hugging Face model to %s (hard links to %s, the same weights)", out, source)


def stoppable_export(engine, cfg: DPOConfig, tokenizer, env: D.DistEnv, out: Path, step: int, stop=None) -> None:
    """``export_hf`` of the engine's weights (those of step ``step``) to ``out``, asking ``stop``
    before and between shards; a stop exits for a requeue (``Preempted``) that resumes from step
    ``step``'s checkpoint, where the export is done again (a stopped one leaves no ``out``)."""
    from dpo_dist.export import ExportStopped

    try:
        if stop is not None and stop():
            raise ExportStopped("before the export")
        export_hf(engine, cfg, tokenizer, out, env, stop=stop)
    except ExportStopped as exc:
        log.warning("preempted during the export of %s (%s): exiting for requeue; the resumed job exports it", out, exc)
        raise Preempted(step) from None


def finished_metrics(cfg: DPOConfig) -> dict[str, float] | None:
    """The final eval metrics of a run that already finished in ``output_dir`` (its last step's
    train row logged and ``final/`` exported, which is swapped in whole), else None. Re-running
    a finished command then returns at once instead of training again from its last checkpoint
    (or from scratch when it saved none)."""
    out = Path(cfg.output_dir)
    final = out / "final"
    if not ((final / "config.json").exists() or (final / "adapter_config.json").exists()):
        return None
    try:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    if not any(row.get("step") == cfg.train.max_steps and "loss" in row for row in rows):
        return None
    evals = [row for row in rows if row.get("step") == cfg.train.max_steps and any(k.startswith("eval/") for k in row)]
    return {k: v for k, v in evals[-1].items() if k != "step"} if evals else {}


def drop_earlier_exports(cfg: DPOConfig) -> None:
    """Remove ``final/`` and ``best/`` of a run that is not finished (``finished_metrics``): they
    hold the weights of the shorter run it was before ``train.max_steps`` grew. Left in place, a
    job stopped during this run's own export (after its last step's metrics row) would make the
    run look finished with those older weights."""
    for name in ("final", BEST_EXPORT):
        path = Path(cfg.output_dir) / name
        if path.is_dir():
            log.info("removing %s: it holds the weights of this run before it was set to %d steps", path, cfg.train.max_steps)
            shutil.rmtree(path)


class Preempted(Exception):
    """Raised after a preemption checkpoint; the worker exits with PREEMPTED_EXIT_CODE for a requeue."""

    def __init__(self, step: int):
        super().__init__(f"preempted after step {step}")
        self.step = step
