"""The DPO engine: the train loop, eval and the online reference, on a DeepSpeed ZeRO-3 engine
built by ``dpo_dist.model`` and checkpointed, resumed and exported by ``dpo_dist.checkpoint``.

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
import logging
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from dpo_dist import distributed as D
from dpo_dist.attention import auto_skipped, enable_packed_attention, resolve_attn_backend
from dpo_dist.checkpoint import (
    Preempted,
    checkpoint_export_dir,
    drop_earlier_exports,
    export_best,
    export_final,
    export_hf,
    finished_metrics,
    load_latest_checkpoint,
    moved_reference_path,
    resume_checkpoint,
    resume_pending_export,
    save_checkpoint,
    seed_everything,
    stoppable_export,
    track_best,
)
from dpo_dist.config import ConfigError, DPOConfig
from dpo_dist.data import collate_packed, load_tokenized, pack_pairs
from dpo_dist.data.batch import PackedBatch
from dpo_dist.data.tokenize import use_chat_template
from dpo_dist.logprobs import SequenceLogps, normalized_logps, split_pairs
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
from dpo_dist.model import (
    REFERENCE_ADAPTER,
    PackedPolicy,
    build_engine,
    check_trainable_start,
    load_for_deepspeed,
    mark_fetch_units,
    run_packed,
    training_dtype,
)
from dpo_dist.runinfo import (
    MetricsLog,
    claim_run_dir,
    read_metrics,
    release_run_dir,
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
    export_final(engine, cfg, tokenizer, env, stop, best)
    wandb_run.finish()
    return last_eval


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
