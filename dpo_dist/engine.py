"""The DPO engine: DeepSpeed ZeRO-3 setup, the train loop, eval, checkpoint/resume, export.

One readable loop::

    train -> train_step -> forward_backward (one packed micro-batch)

Batching. Step ``s`` consumes exactly ``train.pairs_per_step`` pairs, the same ones whatever
the world size: a seeded permutation per epoch fixes the global order, rank ``r`` takes every
``world``-th pair of the step, packs its pairs into micro-batches by token budget and all
ranks agree (without communicating) on one micro-batch count, because ZeRO-3 gathers and
reduce-scatters in every forward/backward and so needs the same number on every rank. Each
micro-batch's loss is ``sum(pair losses) * world / pairs_per_step``; DeepSpeed averages
gradients over ranks, so the update is the mean over the step's pairs: 1 rank x 4 micro-batches
and 2 ranks x 2 give the same step. Supervised fine-tuning (``stage=sft``) divides by the step's
scored response tokens instead (a token-weighted NLL, as TRL's SFTTrainer), counted on the host.

Metrics are summed on device and reduced, together with the preemption flag, in one all-reduce
per optimizer step: the step's only host sync.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from dpo_dist import distributed as D
from dpo_dist.adapters import adapter_base, is_adapter_dir, load_adapter, model_dir
from dpo_dist.attention import auto_skipped, enable_packed_attention, resolve_attn_backend, unwrap_model
from dpo_dist.config import ConfigError, DeepSpeedConfig, DPOConfig, LoraConfig
from dpo_dist.data import collate_packed, load_tokenized, pack_pairs
from dpo_dist.data.batch import PackedBatch
from dpo_dist.data.tokenize import use_chat_template
from dpo_dist.export import CHECKPOINT_EXPORT, merged_lora_weight, write_atomically, zero3_loading_paused
from dpo_dist.logprobs import SequenceLogps, normalized_logps, sequence_logps, split_pairs
from dpo_dist.losses import (
    BATCH_STATISTICS,
    LOSS_OPTIONS,
    REFERENCE_FREE_LOSSES,
    aot_sort_keys,
    aot_targets_for,
    kl_ratio_sums,
    preference_loss,
    sft_nll,
    wpo_pair_weights,
)
from dpo_dist.runinfo import (
    BestCheckpoint,
    MetricsLog,
    best_checkpoint,
    claim_run_dir,
    latest_complete_checkpoint,
    read_best,
    read_metrics,
    release_run_dir,
    write_best,
    write_run_info,
)

log = logging.getLogger("dpo_dist.engine")

# The per-step sums kept on device and all-reduced once per step: first those computed on device
# from a micro-batch's outputs, then host counts and the preemption flag, added as scalars (a
# tensor built from a host number would sync with the device at every micro-batch).
_DEVICE_SUMS = (
    "loss", "correct", "margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp", "scored_tokens", "nll"
)
_SUMS = (*_DEVICE_SUMS, "grad_norm", "pairs", "tokens", "stop")


# ----------------------------------------------------------------------------- batching


class PairSampler:
    """Global pair order: a fresh seeded permutation per epoch, consumed ``pairs_per_step`` at a time.

    Position ``i`` of the stream is pair ``perm[epoch(i)][i % n]``: the order depends only on the
    seed and the step, so a resumed run continues exactly where the checkpoint left off.
    """

    def __init__(self, num_pairs: int, pairs_per_step: int, seed: int):
        if num_pairs == 0:
            raise ValueError("no training pairs")
        self.n, self.per_step, self.seed = num_pairs, pairs_per_step, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def pairs_for_step(self, step: int) -> np.ndarray:
        stream = np.arange(step * self.per_step, (step + 1) * self.per_step)
        return np.array([self._perm(i // self.n)[i % self.n] for i in stream], dtype=np.int64)


@dataclass
class MicroBatchPlan:
    """Dataset positions of one micro-batch and its weight (0 for a filler micro-batch)."""

    positions: list[int]
    weight: float = 1.0


def plan_micro_batches(
    positions: np.ndarray, lengths: np.ndarray, rank: int, world: int, budget: int
) -> list[MicroBatchPlan]:
    """This rank's micro-batches for a step's ``positions``, equal in number on every rank.

    Every rank computes every rank's packing (cheap, deterministic), so they agree on the count
    without a collective. A rank with fewer micro-batches splits its fullest ones; one that
    cannot split further (a single pair each) runs a zero-weight repeat of a pair.
    """
    per_rank = [pack_pairs(lengths[positions[r::world]], budget) for r in range(world)]
    count = max(len(p) for p in per_rank)
    mine = [list(mb) for mb in per_rank[rank]]
    local = positions[rank::world]
    while len(mine) < count and any(len(mb) > 1 for mb in mine):
        i = max(range(len(mine)), key=lambda j: len(mine[j]))
        half = len(mine[i]) // 2
        mine[i : i + 1] = [mine[i][:half], mine[i][half:]]
    plans = [MicroBatchPlan([int(local[j]) for j in mb]) for mb in mine]
    while len(plans) < count:
        plans.append(MicroBatchPlan([int(local[0])] if len(local) else [int(positions[0])], weight=0.0))
    return plans


# ----------------------------------------------------------------------------- model


class PackedPolicy(nn.Module):
    """Wraps a causal LM so that DeepSpeed's forward returns per-sequence log-probs of a packed row."""

    def __init__(
        self,
        model: nn.Module,
        chunk_tokens: int,
        normalize: str,
        micro_batch_tokens: int,
        weighting: bool = False,
        tails: bool = False,
    ):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.normalize = normalize
        # The same LM-head call count on every rank (see logprobs.sequence_logps).
        self.num_chunks = -(-micro_batch_tokens // chunk_tokens)
        self.weighting = weighting
        """Also return WPO's aligned log-probs (loss.use_weighting)."""
        self.tails = tails
        """Also return LD-DPO's tail sums (loss.ld_alpha)."""

    def output_names(self) -> tuple[str, ...]:
        """The ``SequenceLogps`` fields ``forward`` returns, in order (``run_packed`` names them)."""
        optional = {"aligned_logps": self.weighting, "tail_logps": self.tails}
        return ("logps", "sum_logps", "token_counts") + tuple(name for name, wanted in optional.items() if wanted)

    def forward(self, *tensors: torch.Tensor, **host) -> tuple[torch.Tensor, ...]:
        # Plain tensors in and out (PackedBatch.split): ZeRO-3 hooks the backward of the tensors it
        # finds among a module's inputs and outputs.
        batch = PackedBatch.join(tensors, host)
        out = sequence_logps(
            self.model,
            batch,
            chunk_tokens=self.chunk_tokens,
            normalize=self.normalize,
            num_chunks=self.num_chunks,
            weighting=self.weighting,
            tails=self.tails,
        )
        return tuple(getattr(out, name) for name in self.output_names())


def run_packed(engine, batch: PackedBatch) -> SequenceLogps:
    """Per-sequence log-probs of a packed micro-batch through a DeepSpeed engine of PackedPolicy."""
    tensors, host = batch.split()
    return SequenceLogps(**dict(zip(engine.module.output_names(), engine(*tensors, **host), strict=True)))


def training_dtype(cfg: DPOConfig, device: torch.device) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.model.dtype]


def load_for_deepspeed(
    cfg: DPOConfig, path: str, device: torch.device, *, frozen: bool, quantize: str = "none", replicate: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """The causal LM at ``path`` loaded for ``deepspeed.initialize`` in the run's dtype (partitioned
    at load under ZeRO-3), and the DeepSpeed config to initialize it with (``frozen``: no optimizer).
    ``quantize``: QLoRA's 4-bit base (``model.lora.quantize``), for the policy and its reference.
    ``replicate`` (frozen only): a whole copy on every rank (stage 0) whatever ``deepspeed.stage``."""
    dtype = training_dtype(cfg, device)
    dsc = cfg.deepspeed.to_dict(bf16=dtype == torch.bfloat16, grad_clip=cfg.optim.grad_clip, frozen=frozen)
    if replicate:
        assert frozen, "only a frozen model can be replicated: training partitions as configured"
        dsc["zero_optimization"] = {"stage": 0}
    model = load_causal_lm(path, dtype, dsc, quantization_config(quantize, dtype))
    return model, dsc


def quantization_config(quantize: str, dtype: torch.dtype):
    """bitsandbytes' 4-bit config of QLoRA (NF4 or FP4, double-quantized constants, computing in
    ``dtype``), or None for ``none``. The packed 4-bit weights are stored as ``dtype`` tensors
    (``bnb_4bit_quant_storage``): ZeRO-3 flattens and partitions all weights of one dtype."""
    if quantize == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"model.lora.quantize={quantize} needs bitsandbytes: pip install bitsandbytes"
        ) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def mark_fetch_units(model: nn.Module, ds: DeepSpeedConfig) -> list[str]:
    """Under ZeRO-3 make each module of the ``deepspeed.leaf_modules`` classes a leaf: DeepSpeed then
    hooks and gathers it as one unit. Must run before ``deepspeed.initialize`` (it sets the hooks).
    Returns the class names marked."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    leaf_modules = ds.leaf_modules
    if ds.stage != 3 or leaf_modules == "none":
        return []
    if _is_peft(model):
        # DeepSpeed 0.19 releases an adapter weight inside a leaf block before its backward uses it
        # (size-0 tensor in LoRA's matmul backward); per-module hooks handle adapters correctly.
        log.info("ZeRO-3 fetch units: per module (DeepSpeed %s cannot gather a block holding PEFT adapters whole)", deepspeed.__version__)
        return []
    if leaf_modules == "auto":
        names = list(getattr(model, "_no_split_modules", None) or [])
    else:
        names = [name.strip() for name in leaf_modules.split(",") if name.strip()]
    present = {type(m).__name__ for m in model.modules()}
    missing = [name for name in names if name not in present]
    if missing and leaf_modules != "auto":
        raise ConfigError(f"deepspeed.leaf_modules: no module of class {', '.join(missing)} in this model")
    names = [name for name in names if name in present]
    if names:
        marked = set_z3_leaf_modules(model, names)
        log.info("ZeRO-3 fetch units: %d %s modules, each gathered whole", len(marked), "/".join(names))
    elif leaf_modules == "auto":
        # auto takes the model's own block classes; without any, DeepSpeed hooks and gathers every
        # module separately (more, smaller all-gathers per layer): say so rather than run slower unseen.
        cls = type(model).__name__
        why = f"none of {cls}'s _no_split_modules ({', '.join(missing)}) is one of its modules" if missing else f"{cls} declares no _no_split_modules"
        log.warning(
            "ZeRO-3 fetch units: per module, each gathered by its own hook (deepspeed.leaf_modules=auto found no block class: %s); "
            "name the block classes in deepspeed.leaf_modules to gather each block whole",
            why,
        )
    return names


def load_causal_lm(path: str, dtype: torch.dtype, ds_cfg: dict[str, Any], quantization=None) -> nn.Module:
    """Load a Hugging Face causal LM partitioned at load time under ZeRO-3.

    ``HfDeepSpeedConfig`` must be alive during ``from_pretrained``: transformers then builds the
    model inside ``deepspeed.zero.Init``, so no rank ever holds the full weights.

    A PEFT adapter directory (``adapter_config.json``, e.g. a LoRA run's ``final/`` exported with
    ``model.lora.merge_on_export=false``) loads its base model the same way, then the adapter, frozen.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    is_adapter = is_adapter_dir(path)
    zero3 = ds_cfg["zero_optimization"]["stage"] == 3
    keep_alive = HfDeepSpeedConfig(ds_cfg) if zero3 else None
    with nullcontext() if zero3 else zero3_loading_paused():
        model = AutoModelForCausalLM.from_pretrained(model_dir(path), dtype=dtype, quantization_config=quantization)
    model._dpo_hf_ds_config = keep_alive  # transformers holds it weakly
    for module in model.modules():
        # bitsandbytes repacks a 4-bit weight in place for its AVX512 CPU kernel on the first
        # no-grad forward and flags its quant_state; under ZeRO-3 the next gather restores the
        # partition's unpacked bytes while the flag stays: every later forward would be wrong.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if is_adapter:
        # The adapter weights are ordinary tensors here; deepspeed.initialize partitions them.
        model = load_adapter(model, path)
    return model


_DROPOUT_NAME = re.compile(r"dropout|pdrop", re.IGNORECASE)


def disable_dropout(model: nn.Module) -> int:
    """Zero every dropout of ``model`` (``model.disable_dropout``): its nn.Dropout modules, the float
    probabilities modules keep for ``F.dropout`` (``attention_dropout``, Starcoder2's
    ``residual_dropout``, Bloom's ``hidden_dropout``, ...) and those some models read from their
    config at every forward (Falcon). The config's original values are kept for the export
    (``original_dropout_config``). Returns how many non-zero probabilities were zeroed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            changed += module.p > 0
            module.p = 0.0
        else:
            changed += len(_zero_dropout_attributes(module))
    config = getattr(model, "config", None)
    if config is not None:
        original = _zero_dropout_attributes(config)
        model._dpo_original_dropout = {**getattr(model, "_dpo_original_dropout", {}), **original}
    return changed


def _zero_dropout_attributes(obj) -> dict[str, float]:
    """Set ``obj``'s non-zero float attributes named like a dropout probability to 0; their values before."""
    original = {k: v for k, v in vars(obj).items() if _DROPOUT_NAME.search(k) and isinstance(v, float) and v > 0}
    for name in original:
        setattr(obj, name, 0.0)
    return original


@contextmanager
def original_dropout_config(model: nn.Module):
    """``model.config`` with the dropout probabilities ``disable_dropout`` zeroed in it put back
    inside: the export writes the model's own config, not this run's training setting."""
    original = getattr(model, "_dpo_original_dropout", {})
    zeroed = {name: getattr(model.config, name) for name in original}
    for name, value in original.items():
        setattr(model.config, name, value)
    try:
        yield model.config
    finally:
        for name, value in zeroed.items():
            setattr(model.config, name, value)


def apply_lora(model: nn.Module, lora: LoraConfig, seed: int) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters on ``lora.target_modules``; only the adapters train.

    Under ZeRO-3 the base weights are already partitioned; the new adapter weights are ordinary
    tensors until ``deepspeed.initialize`` partitions them from rank 0's values.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    # The adapter initialisation depends on the seed alone, not on how much RNG loading consumed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            wrapped = get_peft_model(model, peft_config)
        except ValueError as exc:  # PEFT: "Target modules {...} not found in the base model..."
            raise ConfigError(f"model.lora.target_modules: {str(exc).splitlines()[0]}") from None
    trainable = sum(_numel(p) for p in wrapped.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in wrapped.parameters())
    log.info("LoRA r=%d alpha=%g on %s: %d trainable of %d parameters", lora.r, lora.alpha, ",".join(lora.target_modules), trainable, total)
    return wrapped


REFERENCE_ADAPTER = "ref"
"""The frozen copy of a continued adapter that an online reference scores with (TRL's name for it)."""


def continue_lora(model: nn.Module, path: str, lora: LoraConfig, reference_copy: bool) -> nn.Module:
    """Wrap ``model`` (the base) with the PEFT adapter at ``path`` to train it further (TRL: a
    ``PeftModel`` passed as the model). ``reference_copy``: load it a second time, frozen, as
    ``REFERENCE_ADAPTER`` (TRL's recipe for a pretrained adapter): an online reference must be the
    starting policy, base plus this adapter as loaded, and the base alone (adapters disabled, what
    a fresh adapter starts as) is not. A copy costs the adapter's size, a second model the base's.
    ``lora``: the run's settings, which are the adapter's (``LoraConfig.continued``), for the log."""
    wrapped = load_adapter(model, path, trainable=True)
    if reference_copy:
        wrapped.load_adapter(path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    trainable = sum(_numel(p) for p in wrapped.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in wrapped.parameters())
    log.info(
        "LoRA: continuing the adapter %s (r=%d alpha=%g on %s; base %s)%s: %d trainable of %d parameters",
        path, lora.r, lora.alpha, ",".join(lora.target_modules), wrapped.peft_config[wrapped.active_adapter].base_model_name_or_path,
        "; a frozen copy of it scores the online reference" if reference_copy else "", trainable, total,
    )
    return wrapped


def _numel(param: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it (its local tensor is then empty)."""
    return getattr(param, "ds_numel", param.numel())


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant, so it composes with ZeRO-3 hooks).

    transformers renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    (the old name warns and goes in v6); older releases, like the 5.17 of our GPU image, have only
    the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lr_lambda(cfg: DPOConfig):
    """The lr factor of optimizer step ``step`` (0-based): linear warmup over the warmup steps
    (``OptimConfig.warmup_for``; never 0: the first step already learns), ``lr`` itself at the
    step after them, then cosine/linear decay that reaches ``min_lr_ratio * lr`` at the last step,
    ``max_steps - 1``."""
    total, floor = cfg.train.max_steps, cfg.optim.min_lr_ratio
    warmup = cfg.optim.warmup_for(total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.optim.schedule == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return factor


def build_optimizer(cfg: DPOConfig, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay. With ``deepspeed.offload_optimizer=cpu`` the step runs on
    the host, where DeepSpeed takes only its own vectorised CPU Adam (it refuses a torch optimizer
    there: a per-tensor Python step over billions of host parameters would take minutes)."""
    settings = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    groups = decay_groups(params, cfg.optim.weight_decay)
    if cfg.deepspeed.offload_optimizer == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **settings)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **settings)


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups: weight decay on matrices only, not on biases and norm weights
    (1-D), as HF's Trainer (bias and LayerNorm excluded), nanoGPT and torchtitan do. A ZeRO-3
    parameter is flat on every rank: its ``ds_shape`` is the real one."""
    if weight_decay == 0:
        return [{"params": params}]

    def is_matrix(p: nn.Parameter) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    groups = [{"params": [p for p in params if is_matrix(p)]}, {"params": [p for p in params if not is_matrix(p)], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def policy_normalization(cfg: DPOConfig) -> str:
    """How the policy's per-sequence log-probs are reduced: SFT sums its NLL over tokens itself."""
    return "sum" if cfg.stage == "sft" else cfg.loss.logp_normalization


def check_trainable_start(cfg: DPOConfig) -> None:
    """What can be checked of the model to train before any work: a continued adapter's base is
    there (one line naming its adapter_config.json otherwise), a fresh adapter's target modules
    are modules of the model."""
    if is_adapter_dir(cfg.model.path):
        adapter_base(cfg.model.path)
    elif cfg.model.lora.enabled:
        check_lora_targets(cfg)


def check_lora_targets(cfg: DPOConfig) -> None:
    """``model.lora.target_modules`` that match no module of the model, found on a weightless
    (meta-device) copy in seconds, not after a reference pass (PEFT only says so when wrapping)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.path))
    names = [name for name, _ in skeleton.named_modules()]
    # PEFT's rule for a list of names: the module's name is the target or ends with "." + target.
    missing = [t for t in cfg.model.lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"model.lora.target_modules: no module named {', '.join(missing)} in {type(skeleton).__name__} "
            f"(its linear layers: {', '.join(leaves)})"
        )


def build_engine(cfg: DPOConfig, device: torch.device, backend: str, load_universal: bool = False):
    """The policy's DeepSpeed engine; ``load_universal``: it will resume from a universal
    checkpoint (``load_latest_checkpoint`` on another number of ranks than wrote the checkpoint)."""
    import deepspeed

    # A continued adapter is put on its base after the base's dropout is off (below): its own
    # dropout is model.lora.dropout, as a fresh adapter's.
    model, dsc = load_for_deepspeed(cfg, model_dir(cfg.model.path), device, frozen=False, quantize=cfg.model.lora.quantize)
    if load_universal:
        dsc = {**dsc, "checkpoint": {"load_universal": True}}
    enable_packed_attention(model, backend, device)
    if cfg.model.disable_dropout and (dropped := disable_dropout(model)):
        log.info("model.disable_dropout: zeroed %d dropout layers of the model", dropped)
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(model)
    if is_adapter_dir(cfg.model.path):
        model = continue_lora(model, cfg.model.path, cfg.model.lora, reference_copy=scores_online_with_policy(cfg))
    elif cfg.model.lora.enabled:
        model = apply_lora(model, cfg.model.lora, cfg.train.seed)
    mark_fetch_units(model, cfg.deepspeed)
    weighting = cfg.stage == "dpo" and cfg.loss.use_weighting
    policy = PackedPolicy(
        model, cfg.model.logits_chunk_tokens, policy_normalization(cfg), cfg.train.micro_batch_tokens, weighting, cfg.uses_tail_logps()
    )
    optimizer = build_optimizer(cfg, [p for p in policy.parameters() if p.requires_grad], device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=dsc
    )
    # from_pretrained hands the model over in eval mode: without this, dropout (model.lora.dropout)
    # stayed off until the first evaluation switched the engine to train mode.
    engine.train()
    return engine


def release_engine(engine) -> None:
    """Let a DeepSpeed engine's memory be freed while the process goes on (the reference pass
    before the policy is built, one bench system before the next).

    Dropping the last reference is not enough under ZeRO-3, which keeps every engine alive from
    module level (measured: every discarded engine kept its partitions, Adam states and reduce
    buckets until exit): ``parameter_offload.FWD_MODULE_STACK`` keeps the engine's top module,
    whose hooks hold the engine, and an unbounded ``lru_cache`` on a method of the parameter
    coordinator keys its entries by submodule. After this call, drop your references to the
    engine and call ``free_memory``."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    engine.destroy()
    owned = {id(m) for m in engine.module.modules()}
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if id(m) not in owned]
    # The cached method sits under DeepSpeed's NVTX wrapper, so look inside closures too. Clearing
    # also drops other live engines' entries, which they recompute on their next step.
    for attribute in vars(PartitionedParameterCoordinator).values():
        cells = getattr(attribute, "__closure__", None) or ()
        for candidate in (attribute, *(cell.cell_contents for cell in cells)):
            if hasattr(candidate, "cache_clear"):
                candidate.cache_clear()


def free_memory() -> None:
    """Collect unreachable objects now (DeepSpeed engines are reference cycles) and hand the
    freed CUDA blocks back, so the next model's peak does not include the last one's."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- reference


def build_inference_engine(
    cfg: DPOConfig,
    path: str,
    device: torch.device,
    backend: str,
    normalize: str = "sum",
    quantize: str = "none",
    replicate: bool = False,
):
    """A frozen model as a ZeRO-3 inference engine of ``PackedPolicy`` (partitioned like the policy),
    or with ``replicate`` a whole copy on every rank (no collectives in its forwards). It returns
    tail sums when the run needs them (``DPOConfig.uses_tail_logps``)."""
    import deepspeed

    model, dsc = load_for_deepspeed(cfg, path, device, frozen=True, quantize=quantize, replicate=replicate)
    if not replicate:
        mark_fetch_units(model, cfg.deepspeed)
    enable_packed_attention(model, backend, device)
    model.requires_grad_(False)
    policy = PackedPolicy(model, cfg.model.logits_chunk_tokens, normalize, cfg.train.micro_batch_tokens, tails=cfg.uses_tail_logps())
    engine = deepspeed.initialize(model=policy, config=dsc)[0]
    engine.eval()
    return engine


def build_generation_engine(cfg: DPOConfig, path: str, device: torch.device):
    """A frozen causal LM for ``generate``, partitioned over the ranks like the policy (ZeRO-3):
    no rank ever holds the whole model, each forward gathers one layer at a time. Its forwards
    are collectives, so every rank must make the same ``generate`` calls, with ``synced_gpus``
    (``dpo_dist.generation.generate_texts(synced_batches=...)``). Call ``engine.module.generate``."""
    import deepspeed

    model, dsc = load_for_deepspeed(cfg, path, device, frozen=True)
    mark_fetch_units(model, cfg.deepspeed)
    model.requires_grad_(False)
    engine = deepspeed.initialize(model=model, config=dsc)[0]
    engine.eval()
    return engine


def online_reference_replicates(cfg: DPOConfig, device: torch.device, dtype: torch.dtype, training: bool = True) -> tuple[bool, str]:
    """``reference.partition`` for the online copy, and why: the precompute pass's rule
    (``reference.reference_replicates``), and for ``auto`` beside training on a GPU also the memory
    plan with the copy whole (``memory.PlanSettings.reference_replicated``) for this job's ranks
    and this device's memory: unlike the precompute pass, the copy lives beside the policy's
    states, activations and logits. Called on every rank; all get rank 0's answer."""
    from dpo_dist.reference import reference_replicates

    replicate, why = reference_replicates(cfg, device, dtype)
    if not (replicate and training and cfg.reference.partition == "auto" and device.type == "cuda"):
        return replicate, why
    import torch.distributed as dist

    from dpo_dist.memory import GIB, ModelShape, PlanError, PlanSettings, plan_memory

    # The job's ranks, not cluster.*: a plain sbatch job's config may say one local rank.
    world = dist.get_world_size() if dist.is_initialized() else 1
    per_node = D.first_env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=world)
    try:
        shape = ModelShape.from_path(cfg.model.path)  # the policy's: its states and activations dominate
        memory = torch.cuda.get_device_properties(device).total_memory / GIB
        settings = PlanSettings.from_config(cfg, gpus=world)
        whole = dataclasses.replace(settings, gpus_per_node=per_node, gpu_memory_gib=memory, reference_partition="replicate")
        plan = plan_memory(shape, whole)
    except PlanError as exc:  # a shape the planner cannot describe: the weights rule alone
        return replicate, f"{why}; not planned beside training: {exc}"
    where = f"{plan.peak / GIB:.1f} of {memory:.1f} GiB on {world} GPU(s)"
    if plan.fits:
        return D.broadcast_object((True, f"{why}; training fits beside it (planned peak {where})"))
    return D.broadcast_object((False, f"{why}, but training beside a whole copy would not fit (planned peak {where})"))


def scores_online_with_policy(cfg: DPOConfig) -> bool:
    """Whether the policy's own engine scores the reference online (``OnlineReference`` with LoRA)."""
    return cfg.model.lora.enabled and cfg.stage == "dpo" and cfg.loss.uses_reference() and cfg.reference.mode == "online"


class OnlineReference:
    """Reference log-probs run every step (no cache): a frozen copy of the initial model (whole on
    every rank or partitioned, by ``reference.partition`` as for the precompute pass), or with
    LoRA the policy itself as it started (``reference_adapters``): its adapters disabled, since its
    base weights are the initial model, or for a continued adapter its frozen starting copy (no
    second model; ``attach_policy`` hands it the policy engine once that exists)."""

    moving = None
    """TR-DPO's settings (``ReferenceConfig``) when the copy moves toward the policy, else None."""
    ld_alpha = None
    """LD-DPO's alpha (loss.ld_alpha) applied to the reference's sums as to the policy's, or None."""

    def __init__(self, cfg: DPOConfig, device: torch.device, backend: str, training: bool = True, path: str | None = None):
        """``training=False`` (dpo-eval): a frozen copy of the reference model
        (``DPOConfig.reference_model_path``) even with LoRA (4-bit as the policy's base with
        QLoRA), since an evaluated policy is usually merged, with no adapters to disable; and no
        training states beside the copy to plan for. ``path``: the weights to load instead (a
        moved TR-DPO reference saved with a checkpoint)."""
        self.uses_policy = cfg.model.lora.enabled and training
        self.moving = cfg.reference if training and cfg.reference.syncs() else None
        self.ld_alpha = cfg.loss.ld_alpha
        self.engine = None
        if not self.uses_policy:
            # A partitioned copy all-gathers every layer in every micro-batch's reference forward;
            # a whole copy per rank (what fits beside training) runs with no collectives.
            replicate, why = online_reference_replicates(cfg, device, training_dtype(cfg, device), training)
            log.info("online reference: %s (%s)", "a whole copy of the model per rank" if replicate else "partitioned with ZeRO-3", why)
            if path is not None:
                log.info("online reference: the moved reference (reference.sync_every) saved at %s", path)
            self.engine = build_inference_engine(
                cfg, path or cfg.reference_model_path(), device, backend, quantize=cfg.model.lora.quantize, replicate=replicate
            )

    def attach_policy(self, policy_engine) -> None:
        """LoRA: score with ``policy_engine`` (``reference_adapters``); a frozen copy needs nothing."""
        if self.uses_policy:
            self.engine = policy_engine

    @torch.no_grad()
    def logps(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs of (chosen, rejected) for every pair of ``batch`` (LD-DPO's
        with loss.ld_alpha)."""
        if self.engine is None:
            raise RuntimeError("OnlineReference with LoRA scores with the policy: call attach_policy(engine) first")
        # The policy trains in train mode; as its reference it runs as the precomputed and
        # frozen-copy references do: in eval mode (no dropout draws, none taken from the policy's).
        with reference_adapters(self.engine) if self.uses_policy else nullcontext(), eval_mode(self.engine):
            # Sums: the policy engine may normalise logps per token; the caller normalises.
            return split_pairs(run_packed(self.engine, batch).desensitized_sums(self.ld_alpha))

    eval_logps = logps

    def syncs_after(self, step: int) -> bool:
        """Whether TR-DPO moves this copy after optimizer step ``step`` (``ReferenceConfig.syncs_after``)."""
        return self.moving is not None and self.moving.syncs_after(step)

    def moved(self, step: int) -> bool:
        """Whether this copy after ``step`` steps differs from the initial model."""
        return self.moving is not None and self.moving.moved_after(step)

    @torch.no_grad()
    def move_toward(self, policy_engine) -> None:
        """TR-DPO's soft update (arXiv 2404.09656 eq. 5): ``ref = alpha * policy + (1 - alpha) * ref``
        for every weight. Each parameter is gathered whole (ZeRO-3) on every rank and, for a
        partitioned copy, repartitioned from rank 0's result (DeepSpeed's way to modify ZeRO-3
        weights): a collective per parameter, every ``sync_every`` steps."""
        import deepspeed

        alpha = self.moving.sync_alpha
        ref = self.engine.module.model.named_parameters()
        policy = policy_engine.module.model.named_parameters()
        for (name, target), (source_name, source) in zip(ref, policy, strict=True):
            assert name == source_name, (name, source_name)
            with deepspeed.zero.GatheredParameters([source]), deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                target.data.mul_(1.0 - alpha).add_(source.data.to(target.dtype), alpha=alpha)

    def save(self, cfg: DPOConfig, tokenizer, directory: Path, env: D.DistEnv) -> None:
        """Write the moved reference as a Hugging Face model (any rank count or partitioning
        resumes from it), streamed one shard at a time like the final export."""
        export_hf(self.engine, cfg, tokenizer, directory, env)

    def run_info(self) -> dict[str, Any]:
        info = {"cache_dir": None, "computed": False, "mode": "online"}
        if self.moving is not None:
            info.update(sync_every=self.moving.sync_every, sync_alpha=self.moving.sync_alpha)
        return info


@contextmanager
def eval_mode(engine):
    """``engine`` (a DeepSpeed engine or module) in eval mode inside; its mode before restored
    after, also on an exception (DeepSpeed's train() does not update the engine's own flag, so
    the wrapped module's is the one read)."""
    was_training = getattr(engine, "module", engine).training
    engine.eval()
    try:
        yield
    finally:
        engine.train(was_training)


@contextmanager
def reference_adapters(engine):
    """Context in which the PEFT model inside ``engine`` (a DeepSpeed engine of PackedPolicy) runs
    as the policy started: with a continued adapter's frozen copy (``REFERENCE_ADAPTER``) active
    instead of the trained adapter, else as its base model (a fresh adapter starts as a no-op)."""
    model = engine.module.model
    if REFERENCE_ADAPTER not in model.peft_config:
        with model.disable_adapter():
            yield
        return
    trained = model.active_adapter
    # PEFT's switch also sets which adapter requires grad: the copy stays frozen inside, and the
    # switch back makes the trained adapter trainable again (and the copy frozen), as before.
    model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(trained)


def packed_lengths(dataset, stage: str) -> np.ndarray:
    """Tokens each pair occupies in a packed row: both sequences, or prompt + chosen for SFT."""
    return dataset.sequence_lengths()[:, 0] if stage == "sft" else dataset.lengths()


def loss_denominator(cfg: DPOConfig, dataset, positions: np.ndarray) -> float:
    """What the summed losses of the step over ``positions`` are divided by: its pairs, or for SFT
    its scored response tokens, so that a long response weighs by its length."""
    if cfg.stage == "sft":
        return float(max(1, dataset.scored_tokens()[positions, 0].sum()))
    return float(len(positions))


# ----------------------------------------------------------------------------- steps


@dataclass
class StepContext:
    engine: Any
    reference: Any
    cfg: DPOConfig
    device: torch.device
    world: int


class MicroBatch(NamedTuple):
    """One packed micro-batch of a step or of the eval set, on the device."""

    weight: float
    """The plan's weight: 0 for a filler micro-batch (``plan_micro_batches``)."""
    batch: PackedBatch
    reference: tuple[torch.Tensor, torch.Tensor] | None = None
    """Summed reference log-probs (chosen, rejected) from the step's online reference pass
    (``with_online_reference``); None: looked up when the loss is computed."""


def micro_batches(ctx: StepContext, dataset, plans: list[MicroBatchPlan]) -> Iterator[MicroBatch]:
    """Each plan's pairs collated into one packed row on the device, one plan at a time."""
    sft = ctx.cfg.stage == "sft"
    for plan in plans:
        yield MicroBatch(plan.weight, collate_packed([dataset[p] for p in plan.positions], sft).to(ctx.device))


@torch.no_grad()
def with_online_reference(ctx: StepContext, batches: list[MicroBatch]) -> list[MicroBatch]:
    """An online reference's forwards for all of a step's micro-batches, before the policy's first.

    ZeRO-3 records the order in which the policy's forward and backward fetch parameters and, once
    that trace is complete, prefetches along it. With LoRA the reference is the policy itself with
    its adapters off: run between each micro-batch's forward and backward, it broke the trace every
    micro-batch (and the ranks re-checked it, with host syncs) instead of twice a step."""
    if not isinstance(ctx.reference, OnlineReference):
        return batches
    return [mb._replace(reference=ctx.reference.logps(mb.batch)) for mb in batches]


def forward_backward(ctx: StepContext, mb: MicroBatch, denominator: float, sums: torch.Tensor, statistics: dict) -> None:
    """One packed micro-batch of a training step: losses, backward, metric sums (on device).

    ``denominator`` is the step's ``loss_denominator``; ``statistics``: this micro-batch's entry of
    the step's ``batch_statistics``."""
    result = micro_batch_losses(ctx, mb, train=True, statistics=statistics)
    ctx.engine.backward(result.losses.sum() * (mb.weight * ctx.world / denominator))
    accumulate(sums, mb.weight, mb.batch, result)


class PairResults(NamedTuple):
    """Per-pair outputs of one micro-batch, each [pairs] (SFT: one chosen sequence per pair)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    """The policy's summed response log-probs (zeros on the rejected side for SFT)."""
    rejected_logps: torch.Tensor
    scored_tokens: torch.Tensor
    """Response tokens scored in the pair's sequences."""
    nll: torch.Tensor
    """The chosen response's NLL per token (``losses.sft_nll``), the term ``loss.alpha`` weights
    into ``losses``; zeros without one."""


def micro_batch_losses(ctx: StepContext, mb: MicroBatch, train: bool, statistics: dict | None = None) -> PairResults:
    """Losses, rewards and log-probs of a micro-batch's pairs; ``train`` picks the reference store
    of the training split, else the eval split's. SFT losses are per-sequence summed NLLs.
    ``statistics``: the micro-batch's entry of ``batch_statistics`` (over the whole step or set)."""
    cfg = ctx.cfg
    out = run_packed(ctx.engine, mb.batch)
    if cfg.stage == "sft":
        zeros = torch.zeros_like(out.sum_logps)
        return PairResults(-out.sum_logps, zeros, zeros, out.sum_logps, zeros, out.token_counts, zeros)
    reference = reference_sums(ctx, mb, train)
    logps = (*split_pairs(loss_logps(cfg, out)), *normalized_like_policy(cfg, reference, out))
    losses, chosen_r, rejected_r = weighted_preference_loss(cfg, logps, statistics or {})
    if cfg.loss.use_weighting:  # WPO: pairs the policy would not sample count less
        losses = losses * wpo_pair_weights(*split_pairs(out.aligned_logps))
    chosen_sums, rejected_sums = split_pairs(out.sum_logps)
    if cfg.loss.logp_normalization == "mean" and cfg.loss.kernel_name() not in REFERENCE_FREE_LOSSES:
        # The implicit reward is beta times the response's whole log-ratio (DPO eq. 5), also where
        # the loss compares per-token means (ipo, sigmoid_norm): as TRL logs it. Per-token margins
        # can have the other sign (a long chosen response with the larger total log-ratio).
        # With loss.ld_alpha both sides are LD-DPO's sums, as TRL's log-ratios are.
        with torch.no_grad():
            policy_c, policy_r = split_pairs(out.desensitized_sums(cfg.loss.ld_alpha))
            chosen_r = cfg.loss.beta * (policy_c - reference[0])
            rejected_r = cfg.loss.beta * (policy_r - reference[1])
    chosen_counts, rejected_counts = split_pairs(out.token_counts)
    nll = sft_nll(chosen_sums, chosen_counts) if cfg.loss.alpha > 0 else torch.zeros_like(chosen_sums)
    losses = losses + cfg.loss.alpha * nll if cfg.loss.alpha > 0 else losses
    return PairResults(losses, chosen_r, rejected_r, chosen_sums, rejected_sums, chosen_counts + rejected_counts, nll)


def loss_logps(cfg: DPOConfig, policy: SequenceLogps) -> torch.Tensor:
    """The policy's per-sequence log-probs as the preference loss takes them: ``policy.logps``, or
    with loss.ld_alpha LD-DPO's sums (``logprobs.length_desensitized``), normalised the same way
    (per token of the whole response for ``mean``, as the reference's are in ``reference_logps``)."""
    if cfg.loss.ld_alpha is None:
        return policy.logps
    return normalized_logps(policy.desensitized_sums(cfg.loss.ld_alpha), policy.token_counts, cfg.loss.logp_normalization)


def accumulate(sums: torch.Tensor, weight: float, batch: PackedBatch, result: PairResults) -> None:
    """Add a micro-batch's metric sums into ``sums`` (``_SUMS`` order) without a host sync."""
    r = PairResults(*(t.detach() for t in result))
    values = {
        "loss": r.losses.sum(),
        "correct": (r.chosen_rewards > r.rejected_rewards).sum(),
        "margin": (r.chosen_rewards - r.rejected_rewards).sum(),
        "chosen_reward": r.chosen_rewards.sum(),
        "rejected_reward": r.rejected_rewards.sum(),
        "chosen_logp": r.chosen_logps.sum(),
        "rejected_logp": r.rejected_logps.sum(),
        "scored_tokens": r.scored_tokens.sum(),
        "nll": r.nll.sum(),
    }
    device_sums = torch.stack([values[name].to(sums.dtype) for name in _DEVICE_SUMS])
    sums[: len(_DEVICE_SUMS)] += weight * device_sums
    sums[_SUMS.index("pairs")].add_(weight * batch.num_pairs)
    sums[_SUMS.index("tokens")].add_(weight * batch.num_tokens)


def reference_logps(ctx: StepContext, mb: MicroBatch, policy: SequenceLogps, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of ``mb``'s (chosen, rejected) responses normalised like the policy's."""
    return normalized_like_policy(ctx.cfg, reference_sums(ctx, mb, train), policy)


def reference_sums(ctx: StepContext, mb: MicroBatch, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed fp32 reference log-probs of ``mb``'s (chosen, rejected) responses: the micro-batch's
    own (an online pass ran already) or looked up; eval pairs have their own store because example
    ids restart at 0 in every file. Zeros for reference-free losses (simpo, orpo, cpo ignore them)."""
    if ctx.reference is None:
        zeros = torch.zeros(mb.batch.num_pairs, device=mb.batch.input_ids.device)
        return zeros, zeros
    lookup = ctx.reference.logps if train else ctx.reference.eval_logps
    chosen, rejected = mb.reference if mb.reference is not None else lookup(mb.batch)
    return chosen.to(torch.float32), rejected.to(torch.float32)


def normalized_like_policy(cfg: DPOConfig, sums: tuple[torch.Tensor, torch.Tensor], policy: SequenceLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference sums (LD-DPO's with loss.ld_alpha) as the loss sees the policy's log-probs:
    ``mean`` divides each by the policy's scored-token count of the same response."""
    c_counts, r_counts = split_pairs(policy.token_counts)
    normalize = cfg.loss.logp_normalization
    return normalized_logps(sums[0], c_counts, normalize), normalized_logps(sums[1], r_counts, normalize)


def weighted_preference_loss(cfg: DPOConfig, logps: tuple, statistics: dict[str, dict]) -> tuple[torch.Tensor, ...]:
    """Per-pair losses of ``loss.terms()`` (one loss, or loss.weights' sum, as TRL adds its
    loss_type list) and loss.name's detached rewards. ``logps``: (policy chosen, policy rejected,
    reference chosen, reference rejected); ``statistics``: each term's ``batch_statistics`` entry."""
    total, rewards = None, None
    for name, weight in cfg.loss.terms().items():
        losses, chosen_r, rejected_r = preference_loss(
            name, *logps, beta=cfg.loss.beta, **loss_options(cfg, name), **statistics.get(name, {})
        )
        total = weight * losses if total is None else total + weight * losses
        if rewards is None or name == cfg.loss.kernel_name():
            rewards = (chosen_r, rejected_r)
    return (total, *rewards)


def loss_options(cfg: DPOConfig, name: str | None = None) -> dict[str, float]:
    """The ``loss.*`` fields that loss ``name`` (default: loss.name's) takes (its options are named
    as those fields)."""
    return {key: getattr(cfg.loss, key) for key in LOSS_OPTIONS[name or cfg.loss.kernel_name()]}


def metric_sums(device: torch.device) -> torch.Tensor:
    """Zeroed on-device accumulators, one per ``_SUMS`` entry (fp64 where it is free: on CPU)."""
    return torch.zeros(len(_SUMS), device=device, dtype=torch.float64 if device.type == "cpu" else torch.float32)


def train_step(ctx: StepContext, dataset, plans: list[MicroBatchPlan], denominator: float | None = None) -> torch.Tensor:
    """All micro-batches of one optimizer step; returns the on-device metric sums of this rank.

    ``denominator``: the step's ``loss_denominator`` (``train.pairs_per_step`` when omitted, which
    is right for preference losses)."""
    denominator = denominator or float(ctx.cfg.train.pairs_per_step)
    sums = metric_sums(ctx.device)
    # All of the step's micro-batches collated up front: no host work between backward and forward.
    batches = with_online_reference(ctx, list(micro_batches(ctx, dataset, plans)))
    replay = DropoutReplay(ctx.device, active=ctx.engine.module.training)
    statistics = batch_statistics(ctx, batches, train=True, pairs=ctx.cfg.train.pairs_per_step, replay=replay)
    for i, (mb, mb_statistics) in enumerate(zip(batches, statistics, strict=True)):
        ctx.engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
        replay.replay(i)
        forward_backward(ctx, mb, denominator, sums, mb_statistics)
    norm = optimizer_step(ctx.engine)
    # The same global norm on every rank: summed over ranks by the step's all-reduce.
    sums[_SUMS.index("grad_norm")] = norm.to(sums.device, sums.dtype) / ctx.world
    return sums


def optimizer_step(engine) -> torch.Tensor:
    """``engine.step()``; returns the step's global gradient 2-norm before clipping (the
    ``grad_norm`` that HF's Trainer and torchtitan log), as DeepSpeed's optimizer computes it for
    clipping (ZeRO stages 1-3, bf16); a stage-0 fp32 optimizer computes none, so it is taken here,
    before the step clears the gradients. A tensor on the device: no host sync."""
    own = None
    if not engine.zero_optimization() and not engine.bfloat16_enabled():
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        own = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) if grads else torch.zeros(())
    engine.step()
    norm = own if own is not None else engine.get_global_grad_norm()
    if norm is None:  # e.g. zero_optimization.compute_grad_norm=false: shown as such, not as 0
        return torch.tensor(float("nan"))
    return norm if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))


class DropoutReplay:
    """Makes a step's gradient forwards draw the random numbers (dropout masks, e.g.
    model.lora.dropout) that its statistics pass drew for the same micro-batches: the statistics
    then describe the very log-probs the loss is taken of, as when a loss computes them in its own
    forward (TRL). The generator's state is recorded before each statistics forward and set again
    before the matching gradient forward: host-side seed and offset on CUDA, no device sync."""

    def __init__(self, device: torch.device, active: bool):
        self.device = device
        self.active = active
        """False in eval mode (no random draws in a forward): nothing to record."""
        self.states: list[torch.Tensor] = []

    def _generator(self) -> torch.Generator:
        if self.device.type != "cuda":
            return torch.default_generator
        index = torch.cuda.current_device() if self.device.index is None else self.device.index
        return torch.cuda.default_generators[index]

    def record(self) -> None:
        if self.active:
            self.states.append(self._generator().get_state())

    def replay(self, i: int) -> None:
        """Before micro-batch ``i``'s gradient forward; a no-op when no statistics pass ran."""
        if self.states:
            self._generator().set_state(self.states[i])


@torch.no_grad()
def batch_statistics(
    ctx: StepContext, batches: Iterable[MicroBatch], train: bool, pairs: int, replay: DropoutReplay | None = None
) -> list[dict]:
    """The loss's statistics over all pairs of ``batches`` on all ranks (``losses.BATCH_STATISTICS``),
    per micro-batch one dict {loss term: its keyword arguments}. kto_pair's KL baselines are means over the
    whole optimizer step (or eval set), and aot's rank partners come from sorting all of its pairs,
    so neither loss depends on how the pairs are split into micro-batches and ranks. Costs one extra
    no-grad forward per micro-batch, for those losses only; ``pairs``: the step's (or eval set's)
    pairs on all ranks. ``replay`` records the random state of each forward (``DropoutReplay``)."""
    needed = [] if ctx.cfg.stage == "sft" else [name for name in ctx.cfg.loss.terms() if name in BATCH_STATISTICS]
    if not needed:
        return [{} for _ in batches]
    weights, logps = [], []
    for mb in batches:  # the same micro-batches (fillers too) on every rank: ZeRO-3 forwards are collective
        if replay is not None:
            replay.record()
        out = run_packed(ctx.engine, mb.batch)
        weights.append(mb.weight)
        logps.append((*split_pairs(loss_logps(ctx.cfg, out)), *reference_logps(ctx, mb, out, train)))
    per_micro_batch: list[dict] = [{} for _ in weights]
    for name in needed:  # the same order on every rank: each term's statistics are collective
        if "kl_baselines" in BATCH_STATISTICS[name]:
            term = [{"kl_baselines": kl_baselines(weights, logps, ctx.device)}] * len(weights)
        else:  # A rank holds every world-th pair (plan_micro_batches): aot's gather pads to that many.
            term = aot_statistics(name, weights, logps, capacity=-(-pairs // ctx.world))
        for entry, value in zip(per_micro_batch, term, strict=True):
            entry[name] = value
    return per_micro_batch


def kl_baselines(weights: list[float], logps: list[tuple], device: torch.device) -> torch.Tensor:
    """kto_pair's [2] clamped mean (chosen, rejected) log-ratios over every rank's pairs."""
    sums = torch.zeros(3, device=device, dtype=torch.float64 if device.type == "cpu" else torch.float32)
    for weight, values in zip(weights, logps):
        sums[:2] += weight * kl_ratio_sums(*values).to(sums.dtype)
        sums[2] += weight * len(values[0])
    D.all_reduce_sum(sums)
    return (sums[:2] / sums[2].clamp(min=1)).clamp(min=0).float()


def aot_statistics(name: str, weights: list[float], logps: list[tuple], capacity: int) -> list[dict]:
    """aot's rank partners (``losses.aot_targets_for``) from all ranks' pairs, split back per micro-batch.

    Each rank pads the sort keys of its real pairs (filler micro-batches left out) to ``capacity``
    columns of +inf, which sort last on both rows, so one equal-size all-gather and no host sync
    suffice: 2 x world x capacity floats. A filler micro-batch gets no targets: its loss (in-batch
    sorted) is weighted 0."""
    real = [aot_sort_keys(name, *values).float() for weight, values in zip(weights, logps) if weight > 0]
    counts = [keys.shape[1] for keys in real]
    # Cannot happen (plan_micro_batches gives a rank at most ceil(pairs / world)); were it to, the
    # other ranks would wait in the gather below.
    if sum(counts) > capacity:
        raise ValueError(f"aot statistics: {sum(counts)} pairs on this rank, more than the capacity {capacity}")
    device = logps[0][0].device
    # Every rank gathers, also one holding only fillers (fewer pairs in the step than ranks).
    mine = torch.cat(real, dim=1) if real else torch.zeros(2, 0, device=device)
    padding = torch.full((2, capacity - mine.shape[1]), math.inf, device=device, dtype=torch.float32)
    keys = D.all_gather_cat(torch.cat([mine, padding], dim=1).T.contiguous()).T  # [2, world x capacity]
    targets = aot_targets_for(name, keys)
    start = D.rank() * capacity
    per_real = iter(targets[..., start : start + sum(counts)].split(counts, dim=-1) if real else ())
    return [{"aot_targets": next(per_real)} if weight > 0 else {} for weight in weights]


@torch.no_grad()
def evaluate(ctx: StepContext, dataset, env: D.DistEnv) -> dict[str, float]:
    """Loss, reward accuracy and margins on held-out pairs (each rank takes every world-th pair)."""
    positions = np.arange(len(dataset))
    plans = plan_micro_batches(
        positions, packed_lengths(dataset, ctx.cfg.stage), env.rank, env.world_size, ctx.cfg.train.micro_batch_tokens
    )
    sums = metric_sums(ctx.device)
    with eval_mode(ctx.engine):
        # One micro-batch at a time (the eval set need not fit on the device at once).
        statistics = batch_statistics(ctx, micro_batches(ctx, dataset, plans), train=False, pairs=len(dataset))
        for mb, mb_statistics in zip(micro_batches(ctx, dataset, plans), statistics, strict=True):
            accumulate(sums, mb.weight, mb.batch, micro_batch_losses(ctx, mb, train=False, statistics=mb_statistics))
    totals = dict(zip(_SUMS, D.all_reduce_sum(sums).tolist()))
    return {f"eval/{k}": v for k, v in summarize(totals, ctx.cfg).items() if k not in ("tokens",)}


def summarize(totals: dict[str, float], cfg: DPOConfig) -> dict[str, float]:
    """Per-pair means of a step's summed metrics; SFT reports its NLL per scored token and no rewards.
    A loss with an NLL term (``loss.alpha`` > 0: rpo, orpo, cpo) also reports that term (``nll_loss``,
    unweighted, as TRL and OpenRLHF log it) and the preference loss beside it (``pref_loss``)."""
    pairs = max(totals["pairs"], 1.0)
    if cfg.stage == "sft":
        return {"loss": totals["loss"] / max(totals["scored_tokens"], 1.0), "tokens": int(totals["tokens"])}
    return {
        "loss": totals["loss"] / pairs,
        "reward_accuracy": totals["correct"] / pairs,
        "reward_margin": totals["margin"] / pairs,
        "chosen_reward": totals["chosen_reward"] / pairs,
        "rejected_reward": totals["rejected_reward"] / pairs,
        "chosen_logp": totals["chosen_logp"] / pairs,
        "rejected_logp": totals["rejected_logp"] / pairs,
        **split_nll(totals, pairs, cfg.loss.alpha),
        "tokens": int(totals["tokens"]),
    }


def split_nll(totals: dict[str, float], pairs: float, alpha: float) -> dict[str, float]:
    """``nll_loss`` and ``pref_loss`` (``loss = pref_loss + alpha * nll_loss``), when alpha > 0."""
    if alpha <= 0:
        return {}
    nll = totals["nll"] / pairs
    return {"nll_loss": nll, "pref_loss": totals["loss"] / pairs - alpha * nll}


# ----------------------------------------------------------------------------- checkpoints


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


# ----------------------------------------------------------------------------- export


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
    lora = _is_peft(engine.module.model)
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
    hf_model = unwrap_model(model.get_base_model() if _is_peft(model) else model)
    weights = partitioned_weights(model, keep=env.is_main)
    dtype = next(hf_model.parameters()).dtype
    tmp = staging_dir(out_dir) if env.is_main else out_dir
    with original_dropout_config(hf_model) as config:
        save_consolidated(weights, config, dtype, tmp, DEFAULT_MAX_SHARD_SIZE, writer=env.is_main, stop=stop)
    if env.is_main:
        hf_model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        swap_in(tmp, out_dir)
        log.info("exported Hugging Face model%s to %s (one shard at a time)", " (LoRA merged)" if _is_peft(model) else "", out_dir)
    D.barrier()


def partitioned_weights(model: nn.Module, keep: bool) -> dict[str, Any]:
    """The Hugging Face state of a ZeRO-3 ``model`` as lazy tensors for ``export.save_consolidated``,
    named as the plain model's: a PEFT LoRA model's adapted layers become their merged weights
    (``W + scaling * B @ A``), its adapter tensors and ``base_model.model.`` prefix disappear."""
    from dpo_dist.export import MergedLoraTensor, PartitionedTensor

    lora, prefix = _is_peft(model), "base_model.model."
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


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


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


# ----------------------------------------------------------------------------- run


@dataclass
class JobSetup:
    """What every rank of a train, precompute or eval job has before it builds a model."""

    env: D.DistEnv
    device: torch.device
    tokenizer: Any
    train_data: Any
    eval_data: Any
    backend: str
    """The packed-attention backend ``model.attn_backend`` resolved to on this device and dtype."""


def setup_job(cfg: DPOConfig) -> JobSetup:
    """Join the process group, pick the device, load the tokenizer and the tokenized splits, and
    resolve (and log) the attention backend: the common start of train, precompute and eval."""
    from transformers import AutoTokenizer

    env = D.detect_env()
    D.init_distributed(env, cfg.deepspeed.comm_timeout_minutes)
    device = D.device_for(env)
    tokenizer = use_chat_template(AutoTokenizer.from_pretrained(cfg.model.resolved_tokenizer_path()), cfg.data.chat_template)
    train_data, eval_data = load_splits(cfg, tokenizer)
    dtype = training_dtype(cfg, device)
    backend = resolve_attn_backend(cfg.model.attn_backend, device, dtype)
    log.info("attention backend: %s (model.attn_backend=%s, %s)", backend, cfg.model.attn_backend, device)
    if cfg.model.attn_backend == "auto" and device.type == "cuda":  # on CPU only sdpa runs: nothing to explain
        for name, reason in auto_skipped(device, dtype):
            log.info("attention backend: auto passed over %s: %s", name, reason)
    return JobSetup(env, device, tokenizer, train_data, eval_data, backend)


def load_splits(cfg: DPOConfig, tokenizer):
    """Tokenized train and eval data (``data.sources()``); rank 0 fills the tokenization cache, the
    others then read it."""
    train, held_out = cfg.data.sources()

    def load(source):
        return load_tokenized(
            source.path,
            tokenizer,
            max_length=cfg.data.max_length,
            truncation=cfg.data.truncation,
            on_invalid=cfg.data.on_invalid,
            cache_dir=cfg.data.resolved_cache_dir(),
            keep_identical=cfg.stage == "sft",  # SFT trains on chosen alone
            columns=cfg.data.columns(),
            selection=source.selection,
        )

    return D.rank0_first(lambda: (load(train), load(held_out) if held_out else None))


def prepare_reference(cfg: DPOConfig, env: D.DistEnv, device, backend, train_data, eval_data, training: bool = True):
    """The reference source for this run: the Arrow store (computing what is missing) or online
    (``training=False``: for dpo-eval, see ``OnlineReference``; a resumed TR-DPO run loads its
    reference as moved so far)."""
    if cfg.stage == "sft" or not cfg.loss.uses_reference():
        return None
    if cfg.reference.mode == "online":
        moved = moved_reference_path(cfg, env) if training else None
        return OnlineReference(cfg, device, backend, training, path=moved)
    from dpo_dist.reference import ensure_reference_for_run

    return ensure_reference_for_run(cfg, env, device, backend, train_data, eval_data)


def train(cfg: DPOConfig) -> dict[str, float]:
    """Run a whole training job on this rank; returns the final eval metrics (rank 0's view)."""
    check_trainable_start(cfg)
    job = setup_job(cfg)
    # Rank 0 holds output_dir for the job (another job training into it is refused); the other
    # ranks wait for it, or raise its refusal. A launcher may hold it already (claim_run_dir).
    D.rank0_then_wait(lambda: claim_run_dir(cfg.output_dir))
    try:
        return train_locked(cfg, job)
    finally:
        if job.env.is_main:
            release_run_dir(cfg.output_dir)


def train_locked(cfg: DPOConfig, job: JobSetup) -> dict[str, float]:
    """``train`` once ``job`` is set up and its ``output_dir`` is this job's."""
    from tqdm import tqdm

    env, device, tokenizer, backend = job.env, job.device, job.tokenizer, job.backend
    # train.epochs becomes a step count here, where the pairs that remain are known.
    cfg = dataclasses.replace(cfg, train=cfg.train.resolved(len(job.train_data)))
    log_schedule(cfg, len(job.train_data))
    # Rank 0 decides: every rank must take the same branch.
    finished = D.broadcast_object(finished_metrics(cfg) if env.is_main else None)
    if finished is not None:
        log.info("%s already finished: step %d trained and final/ exported; nothing to do", cfg.output_dir, cfg.train.max_steps)
        return finished
    if env.is_main:
        drop_earlier_exports(cfg)
    train_data, eval_data = job.train_data, job.eval_data
    seed_everything(cfg.train.seed)
    wandb_run = init_wandb(cfg, env)  # before any model work: a missing W&B login fails at once
    reference = prepare_reference(cfg, env, device, backend, train_data, eval_data)
    resume = resume_checkpoint(cfg, env)
    engine = build_engine(cfg, device, backend, load_universal=resume is not None and resume[2])
    if isinstance(reference, OnlineReference):
        reference.attach_policy(engine)
    ctx = StepContext(engine, reference, cfg, device, env.world_size)
    start = load_latest_checkpoint(engine, cfg, env, resume)

    if env.is_main:
        write_run_info(cfg.output_dir, run_info(cfg, env, device, backend, train_data, eval_data, reference, start))
    metrics = MetricsLog(cfg.output_dir, resume_step=start) if env.is_main else None
    # Before the preemption flag, like the reference pass: a signal now requeues at once, and
    # the resumed run finds the eval still pending.
    last_eval = resume_pending_eval(ctx, eval_data, env, start, metrics, wandb_run)
    if env.is_main and start > 0:
        track_best(cfg)  # the pending eval may have made the resumed checkpoint the best
    resume_pending_export(engine, cfg, tokenizer, env, start)
    sampler = PairSampler(len(train_data), cfg.train.pairs_per_step, cfg.train.seed)
    lengths = packed_lengths(train_data, cfg.stage)
    bar = tqdm(total=cfg.train.max_steps, initial=start, desc=cfg.stage, disable=not env.is_main)
    # Only now: until the first step there is nothing to checkpoint, and on Slurm the early
    # handler (slurm/runtime.py) requeues at once instead of waiting for a step that may be
    # far off (a reference pass, loading and resuming 70B).
    preempt = D.PreemptionFlag().install()
    for step in range(start, cfg.train.max_steps):
        t0 = time.perf_counter()
        positions = sampler.pairs_for_step(step)
        plans = plan_micro_batches(positions, lengths, env.rank, env.world_size, cfg.train.micro_batch_tokens)
        lr = engine.get_lr()[0]
        sums = train_step(ctx, train_data, plans, loss_denominator(cfg, train_data, positions))
        if isinstance(reference, OnlineReference) and reference.syncs_after(step + 1):
            reference.move_toward(engine)  # before this step's eval and checkpoint, as TRL's callback
        sums[_SUMS.index("stop")] = float(preempt.requested)
        totals = dict(zip(_SUMS, D.all_reduce_sum(sums).tolist()))
        done = step + 1
        row = {"step": done, **summarize(totals, cfg), "lr": lr, "grad_norm": totals["grad_norm"]}
        row["epoch"] = done * cfg.train.pairs_per_step / len(train_data)
        row["tokens_per_s"] = row["tokens"] / (time.perf_counter() - t0)
        stop = totals["stop"] > 0
        eval_due = _eval_due(cfg, eval_data, done)
        eval_row = None
        # A preempted run has seconds to checkpoint: the eval waits for the resumed run
        # (resume_pending_eval), which logs it right after this step's train row.
        if eval_due and not stop:
            last_eval = evaluate(ctx, eval_data, env)
            eval_row = {"step": done, **last_eval}
        if env.is_main:
            # An eval step gets its train row too (also when preempted), so train rows never
            # have gaps at eval steps.
            if done % cfg.train.log_every == 0 or done == cfg.train.max_steps or eval_due:
                metrics.write(row)
            if eval_row:
                metrics.write(eval_row)
            bar.update(1)
            accuracy = {"acc": f"{row['reward_accuracy']:.2f}"} if "reward_accuracy" in row else {}  # SFT has none
            bar.set_postfix(loss=f"{row['loss']:.4f}", **accuracy)
        wandb_run.log({**row, **last_eval} if eval_row else row, step=done)
        # The last step too, so that a finished run can train longer (a grown train.max_steps).
        last = done == cfg.train.max_steps and cfg.train.checkpoint_every > 0
        if _due(done, cfg.train.checkpoint_every) or last or stop:
            save_checkpoint(engine, cfg, env, done, reference if isinstance(reference, OnlineReference) else None, tokenizer)
            if cfg.train.export_checkpoints and not stop:  # a preemption's grace period is the checkpoint's
                stoppable_export(engine, cfg, tokenizer, env, checkpoint_export_dir(cfg, done), done, lambda: preempt.any_rank(device))
        if stop:
            log.warning("preempted at step %d: checkpoint saved, exiting for requeue", done)
            raise Preempted(done)
    bar.close()
    # With a checkpoint to resume from, a stop signal during an export requeues (stoppable_export).
    stop = (lambda: preempt.any_rank(device)) if cfg.train.checkpoint_every > 0 else None
    best = export_best(engine, cfg, tokenizer, env, device, stop)
    export_final(engine, cfg, tokenizer, env, stop, best_is_last=best is not None and best.step == cfg.train.max_steps)
    wandb_run.finish()
    return last_eval


BEST_EXPORT = "best"
"""``output_dir/best/``: the best checkpoint's Hugging Face model (``train.metric_for_best_model``)."""


def export_final(engine, cfg: DPOConfig, tokenizer, env: D.DistEnv, stop=None, best_is_last: bool = False) -> None:
    """``final/`` after the last step (and after ``best/``: a run with ``final/`` is finished). A
    stop signal before or during it (``stop``, asked between the shards of a ZeRO-3 export; None
    without a checkpoint to resume from) requeues instead: a 70B export takes minutes, and a job
    killed halfway was not requeued. The resumed job starts at the last step and exports
    (``final/`` is swapped in whole, so a stopped export left none). Linked from an export of the
    same weights when there is one: the last checkpoint's ``hf/``, or ``best/`` when
    ``best_is_last`` (it holds the last step)."""
    out = Path(cfg.output_dir) / "final"
    candidates = [checkpoint_export_dir(cfg, cfg.train.max_steps)] if cfg.train.export_checkpoints else []
    if best_is_last:
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


def log_schedule(cfg: DPOConfig, pairs: int) -> None:
    """How much of the data the run sees: a step count picked for the tiny default can be a few
    percent of a real dataset's epoch."""
    steps, per_step = cfg.train.max_steps, cfg.train.pairs_per_step
    given = f"train.epochs={cfg.train.epochs:g}" if cfg.train.epochs is not None else "train.max_steps"
    log.info(
        "schedule: %d steps x %d pairs = %.3g epochs of the %d training pairs (%s)",
        steps, per_step, steps * per_step / pairs, pairs, given,
    )
    if cfg.reference.syncs() and cfg.reference.sync_every > steps:  # TRL's 512-step default on a short run
        log.warning(
            "reference.sync_every=%d is more than the run's %d steps: the reference never moves (plain online DPO)",
            cfg.reference.sync_every, steps,
        )


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


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _eval_due(cfg: DPOConfig, eval_data, done: int) -> bool:
    """Whether the step that brings the run to ``done`` steps ends with an eval: every
    ``train.eval_every`` steps and the last one, when there is eval data."""
    return eval_data is not None and (_due(done, cfg.train.eval_every) or done == cfg.train.max_steps)


def resume_pending_eval(
    ctx: StepContext, eval_data, env: D.DistEnv, start: int, metrics: MetricsLog | None, wandb_run=None
) -> dict[str, float]:
    """The eval of step ``start`` (the checkpoint a run resumes from), run and logged now (to
    ``metrics`` and ``wandb_run``, rank 0's) if that step was due one and ``metrics.jsonl`` lacks
    its row; returns its metrics, ``{}`` if none was due.

    A step that is preempted skips its eval and checkpoints at once, so without this a run
    preempted at an eval step never logs that eval, and one preempted at its last step resumes
    straight to export with no final eval at all (and returns none). It is done here, on resume,
    rather than by the preempted step before it exits: that step's grace period (seconds after
    SIGTERM on Slurm) belongs to the checkpoint, an eval of a large held-out set on 70B can take
    minutes, and an eval run after the checkpoint could itself be cut short, leaving this same
    state for the resumed run to handle anyway. The row is the one the uninterrupted run logs:
    the checkpoint holds the weights the eval would have seen, the eval draws no randomness, and
    it is written right after the step's train row (``MetricsLog`` keeps rows up to ``start``).

    When the row is already logged (a run that checkpointed its last step and then died in
    export), it is read back, so ``train()`` returns the final eval metrics either way.
    """
    if start == 0 or not _eval_due(ctx.cfg, eval_data, start):
        return {}
    logged = None
    if env.is_main and metrics.path.exists():
        rows = [r for r in read_metrics(metrics.path) if r["step"] == start and any(k.startswith("eval/") for k in r)]
        logged = rows[-1] if rows else None
    # Rank 0's log decides for all: the eval is a collective that every rank runs or none.
    logged = D.broadcast_object(logged)
    if logged is not None:
        return {k: v for k, v in logged.items() if k != "step"}
    result = evaluate(ctx, eval_data, env)
    if env.is_main:
        metrics.write({"step": start, **result})
    if wandb_run is not None:
        wandb_run.log(result, step=start)
    log.info("eval of step %d (skipped when that step was preempted) logged on resume", start)
    return result


def run_info(cfg, env, device, backend, train_data, eval_data, reference, start) -> dict[str, Any]:
    # Same shape whatever the source; SFT and reference-free losses (simpo, orpo, cpo) use no reference.
    ref_info = reference.run_info() if reference is not None else {"cache_dir": None, "computed": False, "mode": "none"}
    return {
        "world_size": env.world_size,
        "device": str(device),
        "dtype": str(training_dtype(cfg, device)).replace("torch.", ""),
        "attention_backend": backend,
        "slurm_job_id": env.slurm_job_id,
        "reference": ref_info,
        "train_pairs": len(train_data),
        "max_steps": cfg.train.max_steps,
        "eval_pairs": len(eval_data) if eval_data is not None else 0,
        "resumed_from_step": start,
        "stage": cfg.stage,
        "loss": cfg.loss.name,
        "loss_weights": cfg.loss.terms() if cfg.stage == "dpo" else {},
    }


class WandbSink:
    """Rank 0's W&B run (``run`` None elsewhere or when disabled). W&B is a side channel: if its
    service process dies (Slurm signals every process of a preempted job step, W&B's included),
    logging warns once and stops, and the preemption checkpoint and metrics.jsonl still happen."""

    def __init__(self, run):
        self.run = run

    def log(self, row: dict, step: int) -> None:
        self._call("log", row, step=step)

    def finish(self) -> None:
        self._call("finish")

    def _call(self, method: str, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            getattr(self.run, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - whatever broke the side channel, training goes on
            log.warning("W&B %s failed (%s: %s): W&B logging stops; metrics.jsonl has every row", method, type(exc).__name__, exc)
            self.run = None


def init_wandb(cfg: DPOConfig, env: D.DistEnv) -> WandbSink:
    if not env.is_main or cfg.wandb.mode == "disabled":
        return WandbSink(None)
    import wandb

    try:
        return WandbSink(wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            name=cfg.wandb.name or Path(cfg.output_dir).name,
            mode=cfg.wandb.mode,
            dir=cfg.output_dir,
            config=cfg.to_dict(),
            resume="allow",
            id=_wandb_id(cfg),
        ))
    except (wandb.errors.UsageError, wandb.errors.AuthenticationError, wandb.errors.CommError) as exc:
        # No API key, a bad key or no route to the W&B server: the user's setup, not a crash.
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"wandb.mode={cfg.wandb.mode}: {reason} (wandb login, WANDB_API_KEY, or wandb.mode=offline)") from None


def _wandb_id(cfg: DPOConfig) -> str:
    import hashlib

    return hashlib.sha1(str(Path(cfg.output_dir).resolve()).encode()).hexdigest()[:16]
