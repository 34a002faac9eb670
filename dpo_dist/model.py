"""Building a model for DeepSpeed: loading under ZeRO-3 (optionally 4-bit), packed attention,
dropout off, LoRA (new or continued), activation checkpointing, the optimizer and its schedule,
and the DeepSpeed engine itself; also releasing one again.

``build_engine`` is the entry point for the policy; ``build_inference_engine`` (``dpo_dist.engine``)
builds a frozen reference on the same pieces.
"""

from __future__ import annotations

import logging
import math
import re
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from dpo_dist.adapters import adapter_base, is_adapter_dir, load_adapter, model_dir
from dpo_dist.attention import enable_packed_attention
from dpo_dist.config import ConfigError, DeepSpeedConfig, DPOConfig, LoraConfig
from dpo_dist.data.batch import PackedBatch
from dpo_dist.export import zero3_loading_paused
from dpo_dist.logprobs import SequenceLogps, sequence_logps

# The engine's logger: a training job's lines read as one log, filtered by one name.
log = logging.getLogger("dpo_dist.engine")


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
    if is_peft(model):
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
    trainable, total = _parameter_counts(wrapped)
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
    trainable, total = _parameter_counts(wrapped)
    log.info(
        "LoRA: continuing the adapter %s (r=%d alpha=%g on %s; base %s)%s: %d trainable of %d parameters",
        path, lora.r, lora.alpha, ",".join(lora.target_modules), wrapped.peft_config[wrapped.active_adapter].base_model_name_or_path,
        "; a frozen copy of it scores the online reference" if reference_copy else "", trainable, total,
    )
    return wrapped


def _parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters of ``model``, for the LoRA log lines."""
    params = list(model.parameters())
    return sum(_numel(p) for p in params if p.requires_grad), sum(_numel(p) for p in params)


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


def scores_online_with_policy(cfg: DPOConfig) -> bool:
    """Whether the policy's own engine scores the reference online (``OnlineReference`` with LoRA)."""
    return cfg.model.lora.enabled and cfg.stage == "dpo" and cfg.loss.uses_reference() and cfg.reference.mode == "online"


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")
