"""Per-GPU memory plan and step-time projection for DeepSpeed ZeRO-3 DPO (``dpo-plan``).

Pure arithmetic on a model's *shape* (a Hugging Face ``config.json``; no weights needed) and the
run config; nothing here touches a GPU. ``dpo-train`` runs ``plan_memory`` before launching a GPU
job and refuses a plan whose per-GPU peak exceeds ``cluster.gpu_memory_gb``.

Memory model (bytes per GPU; N = ranks, P = parameters, Pt = trainable parameters, b = 2 for bf16)
----------------------------------------------------------------------------------------------
- parameters ``b*P/N``, gradients ``g*Pt/N`` (the partitions DeepSpeed sums micro-batch gradients
  in: g = 4 with ``deepspeed.grad_accum_dtype=fp32``, the default, g = b with bf16 sums),
  optimizer states ``12*Pt/N`` (fp32 master weights + Adam m and v): 18 bytes/param in all (16).
- optimizer-step transient: DeepSpeed upcasts the gradients of one optimizer sub-group
  (``sub_group_size``, default 1e9 elements) to fp32 right before the Adam step: ``4*min(1e9, Pt/N)``.
  It is alive only after the backward has freed the activations, so it is a second peak.
- activations for ``train.micro_batch_tokens`` tokens (T): with activation checkpointing every
  decoder layer keeps its input (``b*T*H`` per layer) and one layer at a time is recomputed and
  back-propagated (its full activations plus a backward working set); without checkpointing every
  layer keeps its full activations. Per token and layer the saved activations of a Llama block are
  ``(4+b)*H`` per RMSNorm (fp32 upcast + normalized bf16), ``b*(5*Hq + 4*Hkv)`` for attention
  (q, k, v before and after RoPE, output; FlashAttention keeps no T x T matrix) and ``4*b*I`` for
  the SwiGLU MLP (gate, up, silu(gate), product).
- ``model.attn_backend=sdpa`` (or ``auto`` with fp32 weights): one fused SDPA call per sequence, no
  T x T matrix, but per layer kept it saves each sequence's output besides the concatenated one and,
  with grouped kv heads and fp32 weights, k and v expanded to every query head (see ``activation_items``).
- logits: one chunk of (at most) ``model.logits_chunk_tokens`` positions x vocab at a time, forward
  and recomputed in backward: bf16 logits, fp32 upcast, fp32 log-softmax, fp32 and bf16 gradients:
  ``(2b + 12)*chunk*V``. An upper bound: only scored positions (about half) reach the head, in
  ``ceil(micro_batch_tokens / chunk)`` chunks, so a real chunk is about half as long.
- ZeRO-3 buffers: the largest fetch unit gathered in full plus its full gradient before the
  reduce-scatter (DeepSpeed's own estimate counts the same ``4*largest_layer``), the prefetch bucket
  and two reduce buckets. A fetch unit is one module, or a whole transformer block when blocks are
  gathered whole (``deepspeed.leaf_modules``, default); for Llama 3 the LM head is larger than a
  block either way. With LoRA that unit is frozen (no gradient): the gradient counted is the
  largest adapted layer's adapters.
- persistent parameters: every tensor of at most ``deepspeed.param_persistence_threshold``
  elements stays gathered in full on every GPU for the whole run, ``b*numel`` (RMSNorm weights at
  the default 1e5; nearly the whole model at 1e9), twice with a partitioned online reference copy.
- reference: none when precomputed; with ``reference.mode=online`` a second copy of the weights:
  partitioned, plus its own gathered module, or with ``reference.partition`` replicating it
  (``auto`` for weights of at most half a GPU, ``replicate_frozen_copy``) the whole bf16 weights on
  every GPU, which its forwards then never gather (LoRA runs the reference as the policy with
  adapters disabled, so no copy).
- a fragmentation margin (a fraction of everything the caching allocator holds) and a fixed
  allowance for memory outside PyTorch's allocator (CUDA context, NCCL buffers, cuBLAS workspace).
Items are added as if all were alive at once (conservative), except that the optimizer-step
transient replaces the activations, logits and gathered buffers of the forward/backward peak.

Throughput model: see ``project_step``. All assumptions are fields of ``PlanAssumptions`` and
``ThroughputAssumptions`` with their defaults documented there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_dist.adapters import model_dir
from dpo_dist.config import ASSETS_DIR, ConfigError, DeepSpeedConfig

if TYPE_CHECKING:
    from dpo_dist.config import DPOConfig

GIB = 2**30
SHAPES_DIR = ASSETS_DIR / "model_shapes"
"""Hand-written ``config.json`` shapes of the presets (public architecture numbers, no weights)."""
ADAM_STATE_BYTES = 12
QLORA_WEIGHT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""Bytes per 4-bit base weight (``model.lora.quantize``): the packed value plus bitsandbytes'
double-quantized constants (an 8-bit absmax per block of 64, an fp32 one per 256 of those)."""
"""fp32 master weights + Adam m + Adam v, per trainable parameter."""
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(ValueError):
    """The planner cannot model this input (one line saying why)."""


def replicate_frozen_copy(weight_bytes: float, device_bytes: float) -> bool:
    """``reference.partition=auto``: whether a frozen reference model is held whole on every rank,
    the one rule of the engine (``dpo_dist.reference.reference_replicates``, with the device's
    memory) and of the plan (with ``cluster.gpu_memory_gb``). Whole when its weights take at most
    half of one device's memory, leaving the rest to activations and the logits chunk: its forwards
    then need no collectives, where ZeRO-3 gathers every layer on every forward."""
    return weight_bytes <= device_bytes / 2


# ---------------------------------------------------------------------------------------------
# Model shape


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a dense Llama-style decoder that memory and FLOPs depend on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie_embeddings: bool
    head_dim: int
    source: str = ""

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], source: str = "") -> ModelShape:
        """From a Hugging Face ``config.json`` dict of a dense Llama-style model."""
        for moe_key in ("num_local_experts", "num_experts", "n_routed_experts"):
            if config.get(moe_key):
                raise PlanError(f"{source or 'config'}: mixture-of-experts models ({moe_key}) are not modelled")
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(
                hidden=hidden,
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                intermediate=int(config["intermediate_size"]),
                vocab=int(config["vocab_size"]),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                head_dim=int(config.get("head_dim") or hidden // heads),
                source=source,
            )
        except KeyError as missing:
            raise PlanError(f"{source or 'config'}: no {missing.args[0]} (needs a Llama-style config.json)") from None

    @classmethod
    def from_path(cls, path: str | Path) -> ModelShape:
        """From a model directory holding ``config.json`` (weights optional), a PEFT adapter
        directory (its base's shape) or a JSON file."""
        try:
            path = Path(model_dir(path)).expanduser()
        except ConfigError as exc:  # an adapter whose base is not here
            raise PlanError(str(exc)) from None
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise PlanError(f"{path}: no config.json to take the model shape from")
        return cls.from_hf_config(json.loads(file.read_text()), source=str(file))

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder block, by module name."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def parameter_tensors(self, lora_r: int = 0, lora_targets: Iterable[str] = ()) -> list[tuple[str, int, int]]:
        """(name, elements, how many) of every parameter tensor of the model, with LoRA adapters of
        rank ``lora_r`` on ``lora_targets``: ZeRO-3 decides tensor by tensor which ones persist."""
        h = self.hidden
        shapes = self.linear_shapes()
        block = [(name, a * b) for name, (a, b) in shapes.items()]
        block += [("input_layernorm", h), ("post_attention_layernorm", h)]
        if lora_r:
            for target in self._lora_targets(lora_targets):
                block += [(f"{target}.lora_A", lora_r * shapes[target][0]), (f"{target}.lora_B", lora_r * shapes[target][1])]
        tensors = [(name, numel, self.layers) for name, numel in block]
        tensors += [("embed_tokens", self.embedding_params(), 1), ("norm", h, 1)]
        if not self.tie_embeddings:
            tensors.append(("lm_head", self.embedding_params(), 1))
        return tensors

    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden  # + two RMSNorm weights

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def num_params(self) -> int:
        return sum(numel * count for _, numel, count in self.parameter_tensors())

    def persistent_params(self, threshold: int, lora_r: int = 0, lora_targets: Iterable[str] = ()) -> int:
        """Elements of the tensors ZeRO-3 never partitions: DeepSpeed's rule
        (``DeepSpeedZeRoOffload.mark_persistent_parameters``) is ``numel <= threshold``, tensor by
        tensor, up to ``stage3_model_persistence_threshold`` elements in all, which dpo_dist leaves
        at DeepSpeed's default (``sys.maxsize``: no cap)."""
        return sum(numel * count for _, numel, count in self.parameter_tensors(lora_r, lora_targets) if numel <= threshold)

    def matmul_params(self) -> int:
        """Parameters used in a matmul per token (the embedding lookup is not one; the LM head is)."""
        return self.layers * (self.layer_params() - 2 * self.hidden) + self.embedding_params()

    def largest_module_params(self) -> int:
        """Parameters of the largest single module (embedding, LM head or one linear layer)."""
        return max([self.embedding_params(), *(a * b for a, b in self.linear_shapes().values())])

    def largest_fetch_params(self, whole_blocks: bool) -> int:
        """Parameters ZeRO-3 gathers in one piece: the largest module, or a whole transformer block
        if that is larger and blocks are fetch units (``deepspeed.leaf_modules``)."""
        return max(self.largest_module_params(), self.layer_params() if whole_blocks else 0)

    def _lora_targets(self, targets: Iterable[str]) -> list[str]:
        """The distinct LoRA target modules, in block order; PlanError for one not in a block."""
        shapes, targets = self.linear_shapes(), set(targets)
        unknown = sorted(targets - set(shapes))
        if unknown:
            raise PlanError(f"model.lora.target_modules: {', '.join(unknown)} not in a Llama block ({', '.join(shapes)})")
        return [name for name in shapes if name in targets]

    def lora_params(self, r: int, targets: Iterable[str]) -> int:
        """Adapter parameters of rank ``r`` on the named linear layers of every block."""
        shapes = self.linear_shapes()
        return self.layers * sum(r * sum(shapes[t]) for t in self._lora_targets(targets))

    def largest_lora_module_params(self, r: int, targets: Iterable[str]) -> int:
        """Adapter parameters (A and B) of the largest adapted linear layer: under LoRA the largest
        set of gradients one module's backward makes at once (the frozen weights get none)."""
        shapes = self.linear_shapes()
        return max((r * sum(shapes[t]) for t in self._lora_targets(targets)), default=0)

    def describe(self) -> str:
        return (
            f"{self.num_params() / 1e9:.2f}B params: hidden {self.hidden}, {self.layers} layers, "
            f"{self.heads} heads / {self.kv_heads} kv, intermediate {self.intermediate}, vocab {self.vocab}"
        )


def preset_shape_path(name: str) -> Path | None:
    """The shipped ``config.json`` shape of preset ``name`` (llama3_1b/8b/70b), if there is one."""
    path = SHAPES_DIR / f"{name}.json"
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# Plan inputs


@dataclass(frozen=True)
class PlanAssumptions:
    """Numbers the memory plan assumes rather than derives."""

    fragmentation: float = 0.10
    """Margin for caching-allocator fragmentation, as a fraction of the allocator-held bytes
    (ZeRO-3 gathers and frees tensors of many sizes every layer)."""
    non_torch_gib: float = 2.0
    """Memory outside PyTorch's allocator: CUDA context (~0.5 GiB), NCCL buffers, cuBLAS workspace."""
    sub_group_size: int = 1_000_000_000
    """DeepSpeed's ``sub_group_size`` default (dpo_dist does not override it)."""
    backward_working_factor: float = 1.0
    """Backward working set of one decoder layer, as a multiple of its saved activations."""


@dataclass(frozen=True)
class PlanSettings:
    """What the plan needs from the run config (``from_config``), in planner terms."""

    gpus: int
    gpus_per_node: int
    gpu_memory_gib: float
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    dtype_bytes: int = 2
    grad_accum_bytes: int = 4
    """Bytes per element of the gradient partitions: 4 when micro-batch gradients are summed in fp32."""
    micro_batch_tokens: int = 8192
    activation_checkpointing: bool = True
    logits_chunk_tokens: int = 2048
    reference: str = "none"
    """none (precomputed or reference-free) | copy (online, a second model) | adapters (online, LoRA disabled)."""
    reference_partition: str = "zero3"
    """How a ``copy`` is held (``reference.partition``): zero3 (partitioned like the policy, gathered
    in its forwards) | replicate (whole on every GPU, never gathered) | auto (decided per plan by
    ``replicate_frozen_copy`` from the model's weights and ``gpu_memory_gib``: ``reference_replicated``)."""
    statistics_pass: bool = False
    """The loss needs step-wide statistics (kto_pair, aot, aot_unpaired): one more no-grad forward
    of the policy per micro-batch (``engine.batch_statistics``; an online reference's log-probs are reused)."""
    wpo: bool = False
    """loss.use_weighting: WPO's log sum p^2 per scored position, one more fp32 chunk x vocab
    temporary in the LM head (``logprobs._token_logps``)."""
    lora_r: int = 0
    lora_targets: tuple[str, ...] = LORA_MODULES
    quantized_base: bool = False
    """QLoRA: the decoder blocks' linear weights are 4-bit (``QLORA_WEIGHT_BYTES``)."""
    sdpa_backend: bool = False
    """Packed attention through the SDPA backend: one call per sequence (grouped kv heads expanded
    with fp32 weights)."""
    prefetch_bucket: int = 50_000_000
    reduce_bucket: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    whole_blocks: bool = True
    """ZeRO-3 gathers each transformer block whole (``deepspeed.leaf_modules`` other than none)."""
    param_persistence_threshold: int = DeepSpeedConfig.param_persistence_threshold
    """Tensors of at most this many elements stay gathered (``deepspeed.param_persistence_threshold``)."""
    host_memory_gb: float = 0.0
    """Host memory per node for the offload check (``cluster.mem_gb``), in GiB: slurm/submit.py
    asks Slurm for ``mem_gb x 1024`` MiB. 0 = unknown (not checked)."""
    min_micro_batch_tokens: int = 2
    """The smallest ``train.micro_batch_tokens`` the config accepts (2 x ``data.max_length``)."""

    @classmethod
    def from_config(cls, cfg: DPOConfig, gpus: int | None = None) -> PlanSettings:
        """Settings of a GPU run of ``cfg`` (every rank one GPU); ``gpus`` overrides the world size."""
        cluster = cfg.cluster
        per_node = cluster.gpus_per_node or (cluster.nproc_per_node if cluster.name == "local" else cluster.tasks_per_node)
        uses_reference = cfg.stage == "dpo" and cfg.loss.uses_reference() and cfg.reference.mode == "online"
        reference = "none" if not uses_reference else ("adapters" if cfg.model.lora.enabled else "copy")
        ds = cfg.deepspeed
        return cls(
            gpus=gpus or cluster.world_size(),
            gpus_per_node=per_node,
            gpu_memory_gib=cluster.gpu_memory_gib(),
            zero_stage=ds.stage,
            offload_optimizer=ds.offload_optimizer != "none",
            offload_param=ds.offload_param != "none",
            dtype_bytes=4 if cfg.model.dtype == "fp32" else 2,  # auto is bf16 on GPUs
            grad_accum_bytes=4 if cfg.model.dtype == "fp32" or ds.grad_accum_dtype == "fp32" else 2,
            micro_batch_tokens=cfg.train.micro_batch_tokens,
            activation_checkpointing=cfg.model.activation_checkpointing,
            logits_chunk_tokens=cfg.model.logits_chunk_tokens,
            reference=reference,
            # The setting, not a decision: auto needs the model's size, which the shape gives at plan time.
            reference_partition=cfg.reference.partition,
            statistics_pass=cfg.stage == "dpo" and cfg.loss.uses_batch_statistics(),
            wpo=cfg.stage == "dpo" and cfg.loss.use_weighting,
            lora_r=cfg.model.lora.r,
            lora_targets=tuple(cfg.model.lora.target_modules),
            quantized_base=cfg.model.lora.quantized,
            # auto takes a varlen kernel on the GPUs, but for fp32 weights only sdpa runs there.
            sdpa_backend=cfg.model.attn_backend == "sdpa" or (cfg.model.attn_backend == "auto" and cfg.model.dtype == "fp32"),
            prefetch_bucket=ds.prefetch_bucket_size,
            reduce_bucket=ds.reduce_bucket_size,
            max_live_parameters=ds.max_live_parameters,
            whole_blocks=ds.leaf_modules != "none" and not cfg.model.lora.enabled,  # see model.mark_fetch_units
            param_persistence_threshold=ds.param_persistence_threshold,
            host_memory_gb=cluster.mem_gb,
            min_micro_batch_tokens=2 * cfg.data.max_length,  # DPOConfig's rule: any pair fits one micro-batch
        )

    def no_grad_forwards(self) -> int:
        """Forwards per micro-batch besides the training one: the online reference's, and the policy's
        again for a loss with step-wide statistics."""
        return int(self.reference != "none") + int(self.statistics_pass)

    def reference_replicated(self, shape: ModelShape) -> bool:
        """An online copy held whole on every GPU, as the engine decides (``OnlineReference``). For
        ``reference_partition=auto``: its weights take at most half of ``gpu_memory_gib``
        (``replicate_frozen_copy``) and training still fits beside the whole copy; the precompute
        pass has the GPU to itself, the online copy shares it with the policy's states."""
        if self.reference != "copy" or self.reference_partition == "zero3":
            return False
        if self.reference_partition == "replicate":
            return True
        if not replicate_frozen_copy(self.dtype_bytes * shape.num_params(), self.gpu_memory_gib * GIB):
            return False
        return plan_memory(shape, replace(self, reference_partition="replicate")).fits

    def gathered_forwards(self, shape: ModelShape) -> int:
        """Weight all-gathers of a partitioned model per micro-batch: the policy's forward and
        backward, its statistics forward, and the reference's unless that is a whole copy."""
        reference = self.reference != "none" and not self.reference_replicated(shape)
        return 2 + int(reference) + int(self.statistics_pass)

    def describe(self) -> str:
        offload = [k for k, on in (("optimizer", self.offload_optimizer), ("params", self.offload_param)) if on]
        nodes = math.ceil(self.gpus / self.gpus_per_node) if self.gpus_per_node else 1
        return (
            f"{self.gpus} GPUs ({nodes} node(s) x {self.gpus_per_node}) of {self.gpu_memory_gib:g} GiB; "
            f"ZeRO-{self.zero_stage}, offload: {', '.join(offload) or 'none'}; "
            f"{'bf16' if self.dtype_bytes == 2 else 'fp32'} (gradient sums {'fp32' if self.grad_accum_bytes == 4 else 'bf16'}); "
            f"{self.micro_batch_tokens} tokens/micro-batch; "
            f"activation checkpointing {'on' if self.activation_checkpointing else 'off'}; "
            f"logits chunk {self.logits_chunk_tokens}; reference model on GPU: {_REFERENCE_TEXT[self.reference]}"
            f"{f' (reference.partition={self.reference_partition})' if self.reference == 'copy' else ''}; "
            f"{'a no-grad statistics forward per micro-batch; ' if self.statistics_pass else ''}"
            f"attention: {'sdpa, one call per sequence' if self.sdpa_backend else 'a varlen kernel (flash or torch varlen)'}; "
            f"{'QLoRA' if self.quantized_base else 'LoRA'} {'r=' + str(self.lora_r) if self.lora_r else 'off'}"
        )


_REFERENCE_TEXT = {"none": "no (precomputed or reference-free)", "copy": "online copy", "adapters": "policy, adapters disabled"}


# ---------------------------------------------------------------------------------------------
# Memory plan


@dataclass(frozen=True)
class MemoryItem:
    name: str
    bytes: float
    detail: str
    phase: str
    """static (always alive) | fwd_bwd (forward/backward only) | step (optimizer step only) | extra (margins)."""


@dataclass
class MemoryPlan:
    """Per-GPU memory of one configuration and whether it fits."""

    shape: ModelShape
    settings: PlanSettings
    items: list[MemoryItem]
    fwd_bwd_peak: float
    step_peak: float
    host_per_node: float
    problems: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.fwd_bwd_peak, self.step_peak)

    @property
    def budget(self) -> float:
        return self.settings.gpu_memory_gib * GIB

    @property
    def fits(self) -> bool:
        return not self.problems

    def item(self, name: str) -> float:
        return next(i.bytes for i in self.items if i.name == name)

    def model_state_bytes(self) -> float:
        """Parameters, gradients, optimizer states, the step transient and the largest fetch unit
        with its gradient: the quantities DeepSpeed's ``estimate_zero3_model_states_mem_needs``
        covers (it counts that gradient even for frozen weights)."""
        names = ("parameters", "gradients", "optimizer states", "optimizer-step fp32 gradients")
        return sum(self.item(n) for n in names) + self.settings.dtype_bytes * sum(fetch_unit_params(self.shape, self.settings))

    def report(self) -> str:
        """The breakdown as aligned text lines (GiB)."""
        width = max(len(i.name) for i in self.items) + 2
        lines = [f"model: {self.shape.describe()}", f"plan:  {self.settings.describe()}", ""]
        lines.append(f"{'per-GPU memory':<{width}}{'GiB':>8}   detail")
        for item in self.items:
            lines.append(f"  {item.name:<{width - 2}}{item.bytes / GIB:>8.2f}   {item.detail}")
        lines.append(f"  {'peak, forward/backward':<{width - 2}}{self.fwd_bwd_peak / GIB:>8.2f}")
        lines.append(f"  {'peak, optimizer step':<{width - 2}}{self.step_peak / GIB:>8.2f}")
        lines.append(f"  {'GPU memory (cluster.gpu_memory_gb)':<{width - 2}}{self.budget / GIB:>8.2f}")
        if self.host_per_node:
            lines.append(f"host memory per node (offloaded states, pinned): {self.host_per_node / GIB:.1f} GiB")
        lines.append(self.verdict())
        return "\n".join(lines)

    def verdict(self) -> str:
        if self.fits:
            return f"fits: peak {self.peak / GIB:.1f} of {self.settings.gpu_memory_gib:g} GiB per GPU ({(self.budget - self.peak) / GIB:.1f} GiB headroom)"
        return "does not fit: " + "; ".join(self.problems)


def activation_bytes_per_token_layer(shape: ModelShape, dtype_bytes: int) -> float:
    """Saved activations of one Llama decoder block per token (see the module docstring)."""
    b, h = dtype_bytes, shape.hidden
    norms = 2 * (4 + b) * h
    attention = b * (5 * shape.q_dim + 4 * shape.kv_dim)
    mlp = 4 * b * shape.intermediate
    return norms + attention + mlp


def activation_items(shape: ModelShape, s: PlanSettings, a: PlanAssumptions) -> list[MemoryItem]:
    """Saved activations, the one-layer working set, SDPA's copies and the logits chunk for one micro-batch."""
    t, b = s.micro_batch_tokens, s.dtype_bytes
    layer = activation_bytes_per_token_layer(shape, b) * t
    # Embedding output, final-norm output (its scored rows are kept for the checkpointed logits
    # chunks) and its gradient: an upper bound, the scored rows are about half.
    around = 3 * b * t * shape.hidden
    if s.activation_checkpointing:
        saved = shape.layers * b * t * shape.hidden + around
        saved_detail = f"{shape.layers} layer inputs x {t} tokens (checkpointed)"
    else:
        saved = shape.layers * layer + around
        saved_detail = f"{shape.layers} layers x {t} tokens, all activations kept"
    working = layer * (1 + a.backward_working_factor) if s.activation_checkpointing else layer * a.backward_working_factor
    chunk = min(s.logits_chunk_tokens, t)
    items = [
        MemoryItem("activations (saved)", saved, saved_detail, "fwd_bwd"),
        MemoryItem("activations (one layer, backward)", working, "recomputed layer + its backward working set", "fwd_bwd"),
        MemoryItem(
            "logits chunk",
            (2 * b + 12 + (4 if s.wpo else 0)) * chunk * shape.vocab,
            f"{chunk} positions x vocab {shape.vocab}" + (" (+ WPO's fp32 2 x logits)" if s.wpo else ""),
            "fwd_bwd",
        ),
    ]
    if s.sdpa_backend:
        # attention._sdpa_per_sequence: SDPA saves each sequence's output for its backward besides
        # the concatenated output o_proj saves. With fp32 weights only the memory-efficient kernel
        # runs fused and it takes no grouped kv heads: k and v are expanded to every query head
        # (saved per kept layer, and their gradients in the layer being back-propagated). bf16
        # runs the flash kernel on grouped heads (sm80+). No T x T matrix exists.
        expanded = shape.kv_heads != shape.heads and s.dtype_bytes == 4
        kept = 1 if s.activation_checkpointing else shape.layers
        per_layer = b * t * shape.q_dim * (3 if expanded else 1)
        copies = "outputs per sequence" + (" + k, v expanded to every query head (+ their grads)" if expanded else "")
        total = per_layer * kept + (2 * b * t * shape.q_dim if expanded else 0)
        items.append(MemoryItem("sdpa per-sequence copies", total, f"{copies}: {kept} layer(s) x {t} tokens", "fwd_bwd"))
    return items


def state_items(shape: ModelShape, s: PlanSettings, a: PlanAssumptions) -> list[MemoryItem]:
    """Partitioned parameters, gradients and optimizer states (static) and the step transient."""
    n = s.gpus
    total = shape.num_params()
    trainable = shape.lora_params(s.lora_r, s.lora_targets) if s.lora_r else total
    what = f"{trainable / 1e6:.1f}M LoRA params" if s.lora_r else "all params"
    param_bytes = weight_bytes(shape, s)
    params = 0.0 if s.offload_param else param_bytes / n
    grads = 0.0 if s.offload_optimizer else s.grad_accum_bytes * trainable / n
    optim = 0.0 if s.offload_optimizer else ADAM_STATE_BYTES * trainable / n
    transient = 0.0 if s.offload_optimizer else 4 * min(a.sub_group_size, trainable / n)
    where = "on host" if s.offload_optimizer else f"1/{n} each"
    return [
        MemoryItem(
            "parameters",
            params,
            "on host" if s.offload_param else f"{param_bytes / total:.2f} B x {total / 1e9:.2f}B / {n}" + (" (4-bit blocks)" if s.quantized_base else ""),
            "static",
        ),
        MemoryItem("gradients", grads, f"{s.grad_accum_bytes} B x {what}, {where}", "static"),
        MemoryItem("optimizer states", optim, f"12 B (fp32 master, m, v) x {what}, {where}", "static"),
        MemoryItem(
            "optimizer-step fp32 gradients",
            transient,
            "on host (offloaded optimizer)" if s.offload_optimizer else "one sub-group upcast for the Adam step",
            "step",
        ),
    ]


def weight_bytes(shape: ModelShape, s: PlanSettings) -> float:
    """Bytes of all the model's weights: the run's dtype, or QLoRA's 4-bit blocks for the decoder
    blocks' linear weights (embeddings, norms and the LM head stay in the run's dtype)."""
    total = s.dtype_bytes * shape.num_params()
    if s.quantized_base:
        quantized = shape.layers * (shape.layer_params() - 2 * shape.hidden)
        total += (QLORA_WEIGHT_BYTES - s.dtype_bytes) * quantized
    return total


def fetch_unit_params(shape: ModelShape, s: PlanSettings) -> tuple[int, int]:
    """(gathered, gradient) elements of the largest ZeRO-3 fetch unit: gathered in full, and its
    full gradient before the reduce-scatter. With LoRA only the adapters get gradients, and the
    largest of those is one adapted layer's A and B (the LM head or embedding gathered is frozen)."""
    largest = shape.largest_fetch_params(s.whole_blocks)
    return largest, shape.largest_lora_module_params(s.lora_r, s.lora_targets) if s.lora_r else largest


def persistent_item(shape: ModelShape, s: PlanSettings) -> MemoryItem:
    """Tensors ZeRO-3 keeps gathered in full on every GPU for the whole run (``numel <=
    deepspeed.param_persistence_threshold``), on top of their partitions; static, since DeepSpeed
    re-gathers them right after each optimizer step. At the default (1e5) that is the RMSNorm
    weights (and small LoRA adapters); at 1e9 every tensor but Llama 3 70B's embedding and LM head
    (1.05B each), and all of 8B. Where the largest fetch unit is itself persistent, its gather
    buffer is still counted (conservative)."""
    threshold = s.param_persistence_threshold
    numel = shape.persistent_params(threshold, s.lora_r, s.lora_targets)
    detail = f"tensors <= {threshold:,} elements: {numel / 1e6:,.1f}M params"
    if s.reference == "copy" and not s.reference_replicated(shape):  # a second ZeRO-3 engine, same threshold, no adapters
        numel += shape.persistent_params(threshold)
        detail += " + the reference copy's"
    detail += f", {s.dtype_bytes} B each, never partitioned"
    return MemoryItem("persistent parameters", s.dtype_bytes * numel, detail, "static")


def zero3_buffer_items(shape: ModelShape, s: PlanSettings) -> list[MemoryItem]:
    """Persistent and gathered parameters and gradient buckets of ZeRO-3, and an online reference's share."""
    b = s.dtype_bytes
    largest, largest_grad = fetch_unit_params(shape, s)
    prefetch = min(s.prefetch_bucket, s.max_live_parameters)
    gathered = b * (largest + largest_grad + prefetch) + 2 * b * s.reduce_bucket
    grad = "its full grad" if largest_grad == largest else f"{largest_grad / 1e6:.1f}M adapter grads"
    items = [
        persistent_item(shape, s),
        MemoryItem(
            "ZeRO-3 gathered params + buckets",
            gathered,
            f"largest fetch unit {largest / 1e6:.0f}M params + {grad}, prefetch, 2 reduce buckets",
            "fwd_bwd",
        ),
    ]
    if s.reference_replicated(shape):
        # A stage-0 engine: all its weights on every GPU for the whole run (optimizer step
        # included), and nothing gathered, so no buffer or persistent share of its own.
        why = ": weights <= half a GPU" if s.reference_partition == "auto" else ""
        detail = f"whole copy, {b} B x {shape.num_params() / 1e9:.2f}B on every GPU, never gathered (reference.partition={s.reference_partition}{why})"
        items.append(MemoryItem("reference model (online copy)", b * shape.num_params(), detail, "static"))
    elif s.reference == "copy":
        ref = b * shape.num_params() / s.gpus + b * (largest + prefetch)
        items.append(MemoryItem("reference model (online copy)", ref, "partitioned bf16 copy + its gathered module", "fwd_bwd"))
    else:
        detail = "policy with adapters disabled, no copy" if s.reference == "adapters" else "none on the GPU (precomputed log-probs or a reference-free loss)"
        items.append(MemoryItem("reference model", 0.0, detail, "fwd_bwd"))
    return items


def host_bytes_per_node(shape: ModelShape, s: PlanSettings) -> float:
    """Pinned host memory of offloaded states on one node: fp32 states and gradients of its ranks."""
    per_rank = 0.0
    trainable = shape.lora_params(s.lora_r, s.lora_targets) if s.lora_r else shape.num_params()
    if s.offload_optimizer:
        # fp32 master + m + v, fp32 gradient buffer, gradient partitions (summed in grad_accum_bytes).
        per_rank += (ADAM_STATE_BYTES + 4 + s.grad_accum_bytes) * trainable / s.gpus
    if s.offload_param:
        per_rank += s.dtype_bytes * shape.num_params() / s.gpus
    return per_rank * min(s.gpus_per_node or 1, s.gpus)


def plan_memory(shape: ModelShape, settings: PlanSettings, assumptions: PlanAssumptions | None = None) -> MemoryPlan:
    """The per-GPU memory breakdown of ``settings`` for ``shape`` and whether it fits."""
    a = assumptions or PlanAssumptions()
    if settings.zero_stage != 3:
        raise PlanError(f"deepspeed.stage={settings.zero_stage}: the planner models ZeRO stage 3 only")
    if settings.gpus < 1:
        raise PlanError("the plan needs at least one GPU")
    items = state_items(shape, settings, a) + activation_items(shape, settings, a) + zero3_buffer_items(shape, settings)
    static = sum(i.bytes for i in items if i.phase == "static")
    fwd_bwd = static + sum(i.bytes for i in items if i.phase == "fwd_bwd")
    step = static + sum(i.bytes for i in items if i.phase == "step")
    margin = a.fragmentation * max(fwd_bwd, step)
    items.append(MemoryItem("fragmentation margin", margin, f"{a.fragmentation:.0%} of allocator-held memory", "extra"))
    outside = a.non_torch_gib * GIB
    items.append(MemoryItem("CUDA context + NCCL", outside, "outside the PyTorch allocator", "extra"))
    plan = MemoryPlan(
        shape,
        settings,
        items,
        fwd_bwd_peak=fwd_bwd * (1 + a.fragmentation) + outside,
        step_peak=step * (1 + a.fragmentation) + outside,
        host_per_node=host_bytes_per_node(shape, settings),
    )
    plan.problems = _problems(plan)
    return plan


def _problems(plan: MemoryPlan) -> list[str]:
    s, problems = plan.settings, []
    if plan.peak > plan.budget:
        phase = "forward/backward" if plan.fwd_bwd_peak >= plan.step_peak else "optimizer step"
        biggest = sorted((i for i in plan.items if i.phase in ("static", "fwd_bwd")), key=lambda i: -i.bytes)[:3]
        parts = ", ".join(f"{i.name} {i.bytes / GIB:.1f}" for i in biggest)
        problems.append(
            f"per-GPU peak {plan.peak / GIB:.1f} GiB ({phase}) exceeds the {s.gpu_memory_gib:g} GiB of a GPU (cluster.gpu_memory_gb) "
            f"on {s.gpus} GPUs (largest: {parts} GiB)"
        )
    if s.host_memory_gb and plan.host_per_node > s.host_memory_gb * GIB:
        problems.append(
            f"offloaded states need {plan.host_per_node / GIB:.0f} GiB of host memory per node, "
            f"cluster.mem_gb={s.host_memory_gb:g}"
        )
    return problems


def min_gpus_that_fit(
    shape: ModelShape, settings: PlanSettings, assumptions: PlanAssumptions | None = None, limit: int = 4096
) -> int | None:
    """The smallest GPU count (whole nodes) at which ``settings`` fits, or None up to ``limit``."""
    step = settings.gpus_per_node or 1
    for gpus in range(step, limit + 1, step):
        if plan_memory(shape, replace(settings, gpus=gpus), assumptions).fits:
            return gpus
    return None


def suggestions(shape: ModelShape, settings: PlanSettings, assumptions: PlanAssumptions | None = None) -> list[str]:
    """Changes that would make a plan that does not fit fit (each checked with the planner)."""
    options = []
    gpus = min_gpus_that_fit(shape, settings, assumptions)
    if gpus is not None and gpus != settings.gpus:
        options.append(f"{gpus} GPUs")
    # Never below what the config accepts, or the advice would be refused by dpo-train.
    smaller = max(settings.micro_batch_tokens // 2, settings.min_micro_batch_tokens)
    default_threshold = DeepSpeedConfig.param_persistence_threshold
    changes = [
        ("deepspeed=zero3_offload", dict(offload_optimizer=True)),
        ("model.activation_checkpointing=true", dict(activation_checkpointing=True)),
        ("deepspeed.grad_accum_dtype=bf16", dict(grad_accum_bytes=settings.dtype_bytes)),
        (f"train.micro_batch_tokens={smaller}", dict(micro_batch_tokens=smaller)),
        (f"deepspeed.param_persistence_threshold={default_threshold}", dict(param_persistence_threshold=default_threshold)),
    ]
    if settings.reference_replicated(shape):  # reference.partition=replicate (auto would not have replicated a misfit)
        changes.append(("reference.partition=zero3", dict(reference_partition="zero3")))
    for text, change in changes:
        candidate = replace(settings, **change)
        plan = plan_memory(shape, candidate, assumptions)
        if candidate != settings and plan.fits:
            host = f" (needs {plan.host_per_node / GIB:,.0f} GiB host memory per node)" if plan.host_per_node else ""
            options.append(text + host)
    return options


# ---------------------------------------------------------------------------------------------
# Throughput and communication model


@dataclass(frozen=True)
class ThroughputAssumptions:
    """Hardware numbers and one single-GPU measurement the step-time projection starts from."""

    peak_tflops: float = 989.0
    """Dense bf16 peak of one H100 SXM as its data sheet states it: MFU's denominator, as in
    ``tools/bench.py`` (a matmul benchmark reaches 765-783 TFLOP/s of it). Step times do not depend
    on it: compute runs at the measured throughput (``achieved_flops``)."""
    measured_tokens_per_s: float = 53_900.0
    """Single-GPU training throughput that calibrates compute efficiency: plain PyTorch, packed rows,
    varlen attention, fwd+bwd of the Llama-3.2-1B shape on one H100 (shared/notes/performance-anchors.md)."""
    measured_shape: str = "llama3_1b"
    """Shape of that measurement: a preset name or a config.json path."""
    measured_seq_len: float = 555.0
    """Mean sequence length of that measurement (8,877 tokens in 16 sequences)."""
    scored_fraction: float = 0.5
    """Fraction of a preference pair's packed tokens that score a response token, where the engine
    runs the LM head: the response's share of a sequence (the prompt is counted in both of a pair's
    sequences but scored in neither). The calibration run scored every token."""
    inter_node_gbit: float = 400.0
    """Network bandwidth per GPU between nodes, Gbit/s (one 400G InfiniBand NDR NIC per GPU)."""
    intra_node_gbyte: float = 360.0
    """NCCL bus bandwidth inside a node, GB/s (NVLink 4; ~450 GB/s raw per direction)."""
    comm_efficiency: float = 0.8
    """Fraction of the link rate a large ring all-gather / reduce-scatter achieves."""
    overlap: float = 0.8
    """Fraction of the shorter of (compute, communication) hidden behind the other (ZeRO-3
    prefetches the next layer's all-gather and overlaps the reduce-scatter with backward)."""
    packing_fill: float = 0.9
    """Real tokens per micro-batch token budget after packing whole pairs."""
    hbm_gbyte: float = 2000.0
    """Effective HBM bandwidth for the (memory-bound) Adam step, GB/s."""
    pcie_gbyte: float = 25.0
    """Host<->GPU bandwidth per GPU for offloaded optimizer steps, GB/s."""
    cpu_adam_params_per_s: float = 1e9
    """DeepSpeed CPU Adam rate per rank with offload (rough: AVX-512, ~12 cores per rank)."""

    def achieved_flops(self) -> float:
        """FLOP/s one GPU sustains on training matmuls, from the single-GPU measurement."""
        shape = ModelShape.from_path(preset_shape_path(self.measured_shape) or self.measured_shape)
        flops = train_flops_per_token(shape, self.measured_seq_len, lora=False, recompute=False, no_grad_forwards=0)
        return self.measured_tokens_per_s * flops

    def efficiency(self) -> float:
        return self.achieved_flops() / (self.peak_tflops * 1e12)


def forward_flops_per_token(shape: ModelShape, seq_len: float, scored_fraction: float = 1.0) -> tuple[float, float]:
    """(matmul, attention) forward FLOPs per token; causal attention over ``seq_len`` tokens; the LM
    head at ``scored_fraction`` of the tokens (1.0: every position, as plain LM training runs it)."""
    head = 2 * shape.embedding_params()
    matmul = 2 * shape.matmul_params() - head + scored_fraction * head
    attention = 2 * shape.layers * seq_len * shape.q_dim  # QK^T and AV over ~seq_len/2 keys
    return matmul, attention


def train_flops_per_token(
    shape: ModelShape,
    seq_len: float,
    *,
    lora: bool,
    recompute: bool,
    no_grad_forwards: int,
    scored_fraction: float = 1.0,
    head_checkpointed: bool = False,
) -> float:
    """FLOPs per token of one training micro-batch: forward, backward, recompute, and
    ``no_grad_forwards`` more forwards (an online reference, the statistics pass of kto_pair and aot).

    Backward is twice the forward (input and weight gradients); with LoRA the frozen weights need
    input gradients only, so its matmul backward is one forward's worth (adapters are negligible).
    ``recompute`` (activation checkpointing) runs the decoder's forward again. The engine runs the
    LM head only where a response token is scored (``scored_fraction`` of the tokens,
    ``PackedBatch.scored_positions``) and, its logits chunks being checkpointed
    (``head_checkpointed``, ``logprobs.sequence_logps``), computes them twice under autograd
    whatever ``recompute`` says. The defaults describe plain LM training (the calibration run).
    """
    matmul, attention = forward_flops_per_token(shape, seq_len, scored_fraction)
    head = 2 * shape.embedding_params() * scored_fraction
    forward = matmul + attention
    backward = (matmul if lora else 2 * matmul) + 2 * attention
    decoder_again = forward - head if recompute else 0.0  # the decoder's checkpoints end before the LM head
    head_again = head if head_checkpointed else 0.0
    return forward + backward + decoder_again + head_again + no_grad_forwards * forward


@dataclass(frozen=True)
class StepProjection:
    gpus: int
    micro_batches: int
    compute_s: float
    comm_s: float
    optimizer_s: float
    step_s: float
    tokens_per_s: float
    mfu: float
    comm_gb_per_gpu: float


def project_step(
    shape: ModelShape,
    settings: PlanSettings,
    tokens_per_step: float,
    seq_len: float,
    assumptions: ThroughputAssumptions | None = None,
) -> StepProjection:
    """Projected optimizer-step time on ``settings.gpus`` GPUs for ``tokens_per_step`` real tokens.

    Compute: FLOPs of this rank's tokens at the measured single-GPU efficiency. Communication, per
    micro-batch: ZeRO-3 all-gathers the partitioned parameters for the forward and again for the
    backward (plus once more for each no-grad forward: a partitioned online reference, the
    statistics pass; a replicated reference copy gathers nothing) and reduce-scatters the trainable
    gradients; persistent parameters (``deepspeed.param_persistence_threshold``) stay gathered and
    are re-gathered once per step, after the optimizer updated them;
    a ring moves ``(n-1)/n`` of the tensor through every GPU's link, inside a node over NVLink,
    across nodes over each GPU's NIC. Every rank runs at least one micro-batch, so beyond
    ``tokens_per_step / micro_batch_tokens`` GPUs more GPUs no longer shorten the step.
    """
    a = assumptions or ThroughputAssumptions()
    n, b = settings.gpus, settings.dtype_bytes
    lora = settings.lora_r > 0
    tokens_per_rank = tokens_per_step / n
    micro_batches = max(1, math.ceil(tokens_per_rank / (settings.micro_batch_tokens * a.packing_fill)))
    flops = train_flops_per_token(
        shape,
        seq_len,
        lora=lora,
        recompute=settings.activation_checkpointing,
        no_grad_forwards=settings.no_grad_forwards(),
        scored_fraction=a.scored_fraction,
        head_checkpointed=True,
    )
    compute = tokens_per_rank * flops / a.achieved_flops()

    gathers = settings.gathered_forwards(shape)
    trainable = shape.lora_params(settings.lora_r, settings.lora_targets) if lora else shape.num_params()
    ring = (n - 1) / n
    persistent = b * shape.persistent_params(settings.param_persistence_threshold, settings.lora_r, settings.lora_targets)
    per_micro = (gathers * (weight_bytes(shape, settings) - persistent) + b * trainable) * ring
    per_step = micro_batches * per_micro + persistent * ring
    bandwidth = (a.intra_node_gbyte if n <= max(settings.gpus_per_node, 1) else a.inter_node_gbit / 8) * 1e9
    comm = per_step / (bandwidth * a.comm_efficiency)

    optimizer = _optimizer_seconds(trainable / n, settings, a)
    step = compute + comm - a.overlap * min(compute, comm) + optimizer
    useful = 6 * shape.num_params() * tokens_per_step
    return StepProjection(
        gpus=n,
        micro_batches=micro_batches,
        compute_s=compute,
        comm_s=comm,
        optimizer_s=optimizer,
        step_s=step,
        tokens_per_s=tokens_per_step / step,
        mfu=useful / (step * n * a.peak_tflops * 1e12),
        comm_gb_per_gpu=per_step / 1e9,
    )


def _optimizer_seconds(params_per_rank: float, settings: PlanSettings, a: ThroughputAssumptions) -> float:
    """Adam step time: HBM-bound on the GPU, or PCIe transfers plus CPU Adam with offload."""
    if settings.offload_optimizer:
        transfer = (4 + settings.dtype_bytes) * params_per_rank / (a.pcie_gbyte * 1e9)  # fp32 grads down, params up
        return transfer + params_per_rank / a.cpu_adam_params_per_s
    # Read params, grads, master, m, v; write params, master, m, v: ~32 bytes per parameter.
    return 32 * params_per_rank / (a.hbm_gbyte * 1e9)


def throughput_table(
    shape: ModelShape,
    settings: PlanSettings,
    gpu_counts: Iterable[int],
    tokens_per_step: float,
    seq_len: float,
    assumptions: ThroughputAssumptions | None = None,
    memory_assumptions: PlanAssumptions | None = None,
) -> str:
    """A markdown table of ``project_step`` (and whether memory fits) for each GPU count."""
    rows = [
        "| GPUs | nodes | micro-batches/rank | compute s | comm s | optimizer s | step s | tokens/s | MFU (6N) | comm GB/GPU/step | fits (peak GiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for gpus in gpu_counts:
        s = replace(settings, gpus=gpus)
        p = project_step(shape, s, tokens_per_step, seq_len, assumptions)
        plan = plan_memory(shape, s, memory_assumptions)
        nodes = math.ceil(gpus / max(s.gpus_per_node, 1))
        rows.append(
            f"| {gpus} | {nodes} | {p.micro_batches} | {p.compute_s:.2f} | {p.comm_s:.2f} | {p.optimizer_s:.2f} | "
            f"{p.step_s:.2f} | {p.tokens_per_s:,.0f} | {p.mfu:.2f} | {p.comm_gb_per_gpu:,.0f} | "
            f"{'yes' if plan.fits else 'no'} ({plan.peak / GIB:.1f}) |"
        )
    return "\n".join(rows)
