"""``engine.train_step`` on a tiny model without DeepSpeed (a stand-in engine: forward, backward,
step): which forwards a step runs, in which order, and the losses they give."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpo_dist import engine as E
from dpo_dist import model as M
from dpo_dist.attention import enable_packed_attention
from dpo_dist.config import config_from_dict
from dpo_dist.data.tokenize import TokenizedPair
from tests.unit.tiny_models import tiny_llama


class RecordingEngine:
    """What train_step needs of a DeepSpeed engine of PackedPolicy; logs each forward as ``name``."""

    def __init__(self, policy: M.PackedPolicy, name: str, calls: list[str]):
        self.module, self.name, self.calls = policy, name, calls
        self.logps: list[torch.Tensor] = []
        """Each forward's per-sequence log-probs, in call order."""

    def __call__(self, *tensors, **host):
        self.calls.append(self.name if torch.is_grad_enabled() else f"{self.name} (no grad)")
        out = self.module(*tensors, **host)
        self.logps.append(out[0].detach().clone())
        return out

    def backward(self, loss):
        self.calls.append("backward")
        loss.backward()

    def train(self, mode: bool = True):  # DeepSpeed's train() sets the wrapped module's mode
        self.module.train(mode)

    def eval(self):
        self.train(False)

    def set_gradient_accumulation_boundary(self, boundary):
        pass

    def step(self):
        self.calls.append("step")

    def zero_optimization(self):  # a stage-0 fp32 engine: train_step measures the gradient norm itself
        return False

    def bfloat16_enabled(self):
        return False

    def get_global_grad_norm(self):
        return None


def pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    rng = np.random.default_rng(seed)
    return [
        TokenizedPair(i, rng.integers(3, 100, 6), rng.integers(3, 100, 4 + i % 3), rng.integers(3, 100, 3 + i % 2))
        for i in range(n)
    ]


def context(loss: str, calls: list[str], **loss_settings) -> E.StepContext:
    cfg = config_from_dict({"loss": {"name": loss, **loss_settings}, "reference": {"mode": "online"}, "model": {"attn_backend": "sdpa"}})
    torch.manual_seed(0)
    model = tiny_llama()
    enable_packed_attention(model, "sdpa")
    # The tail sums, as build_engine and build_inference_engine ask for them.
    policy = M.PackedPolicy(model, chunk_tokens=64, normalize="sum", micro_batch_tokens=64, tails=cfg.uses_tail_logps())
    reference = object.__new__(E.OnlineReference)  # a frozen copy: here the same weights, no DeepSpeed
    reference.uses_policy, reference.engine = False, RecordingEngine(policy, "reference", calls)
    reference.ld_alpha = cfg.loss.ld_alpha
    return E.StepContext(RecordingEngine(policy, "policy", calls), reference, cfg, torch.device("cpu"), world=1)


def other_reference(ctx: E.StepContext, calls: list[str]) -> M.PackedPolicy:
    """Makes ctx's reference another model than the policy (the log-ratios are not 0); returns it."""
    reference_model = tiny_llama(seed=1)
    enable_packed_attention(reference_model, "sdpa")
    tails = ctx.cfg.uses_tail_logps()
    reference_policy = M.PackedPolicy(reference_model, chunk_tokens=64, normalize="sum", micro_batch_tokens=64, tails=tails)
    ctx.reference.engine = RecordingEngine(reference_policy, "reference", calls)
    return reference_policy


def four_pair_step(ctx: E.StepContext, calls: list[str]):
    """One step of 4 pairs in 2 micro-batches against another reference: (the step's mean loss,
    the 4 pairs collated into one batch, the reference)."""
    from dpo_dist.data import collate_packed

    reference_policy = other_reference(ctx, calls)
    data = pairs(4)
    sums = E.train_step(ctx, data, [E.MicroBatchPlan([0, 1]), E.MicroBatchPlan([2, 3])], denominator=4.0)
    return dict(zip(E._SUMS, sums.tolist()))["loss"] / 4, collate_packed(data), reference_policy


@pytest.mark.parametrize("loss", ["sigmoid", "kto_pair"])
def test_online_reference_forwards_all_run_before_the_policys(loss):
    """ZeRO-3 prefetches along the recorded order of the policy's forward and backward: a reference
    forward between them (with LoRA, the policy itself with adapters off) broke it every micro-batch.
    kto_pair's statistics pass reuses those reference log-probs (no second reference forward)."""
    calls: list[str] = []
    ctx = context(loss, calls)
    data = pairs(6)
    plans = [E.MicroBatchPlan([0, 1]), E.MicroBatchPlan([2, 3]), E.MicroBatchPlan([4, 5])]
    sums = E.train_step(ctx, data, plans, denominator=6.0)
    statistics = ["policy (no grad)"] * 3 if loss == "kto_pair" else []
    assert calls == ["reference (no grad)"] * 3 + statistics + ["policy", "backward"] * 3 + ["step"]
    totals = dict(zip(E._SUMS, sums.tolist()))
    # Policy == reference: every log-ratio is 0 (and so are kto_pair's KL baselines): DPO's loss is
    # -log sigmoid(0) = ln 2, kto_pair's 1 - sigmoid(0) = 1/2 per response.
    want = {"sigmoid": math.log(2), "kto_pair": 0.5}[loss]
    assert totals["pairs"] == 6 and totals["loss"] / 6 == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("loss", ["aot", "aot_unpaired"])
def test_aot_step_is_one_sort_over_all_of_the_steps_pairs(loss):
    """AOT sorts its pairs' margins (or log-ratios): split into micro-batches, each sorted on its own,
    the step would take a different loss. With the step's rank partners (engine.batch_statistics)
    three micro-batches and a filler give the loss and gradients of one sort over all six pairs."""
    from dpo_dist.data import collate_packed
    from dpo_dist.logprobs import split_pairs
    from dpo_dist.losses import preference_loss

    calls: list[str] = []
    ctx = context(loss, calls)
    reference_policy = other_reference(ctx, calls)
    data = pairs(6)
    plans = [E.MicroBatchPlan([0, 3]), E.MicroBatchPlan([1, 4]), E.MicroBatchPlan([2, 5]), E.MicroBatchPlan([0], weight=0.0)]
    sums = E.train_step(ctx, data, plans, denominator=6.0)
    policy = ctx.engine.module.model
    got_loss = dict(zip(E._SUMS, sums.tolist()))["loss"] / 6
    got_grads = [p.grad.clone() for p in policy.parameters()]

    policy.zero_grad()
    batch = collate_packed([data[i] for i in (0, 3, 1, 4, 2, 5)])
    with torch.no_grad():
        ref = split_pairs(reference_policy(*batch.split()[0], **batch.split()[1])[0])
    losses = preference_loss(loss, *split_pairs(ctx.engine.module(*batch.split()[0], **batch.split()[1])[0]), *ref, beta=0.1)[0]
    (losses.sum() / 6).backward()
    assert got_loss == pytest.approx(losses.sum().item() / 6, rel=1e-6)
    for got, want in zip(got_grads, (p.grad for p in policy.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def _aot_rank(rank: int, world: int, init_file: str, name: str, per_rank: list, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        weights = [w for w, _ in per_rank[rank]]
        logps = [tuple(torch.tensor(v) for v in values) for _, values in per_rank[rank]]
        out[rank] = [{k: v.tolist() for k, v in d.items()} for d in E.aot_statistics(name, weights, logps, capacity=4)]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_aot_statistics_across_ranks_equal_one_sort(tmp_path, name):
    """Three gloo ranks: rank 0 with a filler between two real micro-batches, rank 1 with one, rank 2
    with only a filler (fewer pairs than ranks would do that). Every real micro-batch gets the
    partners of one sort over all six pairs; fillers get none, and nobody hangs. The capacity (4)
    exceeds every rank's 3 pairs, as when a step's pairs do not divide evenly by the ranks: each
    rank's partners start at its own padded slot, rank x capacity."""
    import torch.multiprocessing as mp

    from dpo_dist.losses import aot_sort_keys, aot_targets_for

    rng = np.random.default_rng(3)

    def values(pairs: int):
        return [(-20 * rng.random(pairs)).tolist() for _ in range(4)]

    filler = (0.0, values(1))
    per_rank = [[(1.0, values(2)), filler, (1.0, values(1))], [(1.0, values(3))], [filler]]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_aot_rank, args=(3, str(tmp_path / "init"), name, per_rank, out), nprocs=3, join=True)
    real = [torch.tensor(v) for r in per_rank for w, v in r if w > 0]  # rank order, micro-batch order
    columns = [torch.cat([values[j] for values in real]).float() for j in range(4)]
    want = aot_targets_for(name, aot_sort_keys(name, *columns))
    got = [torch.tensor(d["aot_targets"]) for r in range(3) for d in out[r] if d]
    assert [bool(d) for r in range(3) for d in out[r]] == [True, False, True, True, False]
    torch.testing.assert_close(torch.cat(got, dim=-1), want)


@pytest.mark.parametrize("loss", ["kto_pair", "aot"])
def test_statistics_pass_sees_the_gradient_forwards_dropout_masks(loss):
    """With LoRA dropout each forward draws new masks. The statistics (kto_pair's KL baselines, aot's
    rank partners) must describe the log-probs the loss is taken of, as in TRL where one forward
    gives both: the gradient forward of each micro-batch replays its statistics forward's draws."""
    from dpo_dist.config import LoraConfig
    from dpo_dist.data import collate_packed

    calls: list[str] = []
    ctx = context(loss, calls)
    lora = LoraConfig(r=4, alpha=8.0, dropout=0.5, target_modules=["q_proj", "v_proj", "o_proj"])
    model = M.apply_lora(ctx.engine.module.model, lora, seed=0)
    for name, param in model.named_parameters():  # PEFT zero-inits lora_B: the adapters (and their dropout) would be inert
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    ctx.engine.module.model = model
    ctx.engine.module.train()
    data = pairs(6)
    plans = [E.MicroBatchPlan([0, 1]), E.MicroBatchPlan([2, 3]), E.MicroBatchPlan([4, 5])]
    E.train_step(ctx, data, plans, denominator=6.0)
    assert calls == ["reference (no grad)"] * 3 + ["policy (no grad)"] * 3 + ["policy", "backward"] * 3 + ["step"]
    statistics, gradient = ctx.engine.logps[:3], ctx.engine.logps[3:]  # the policy's forwards (the reference logs its own)
    for stats_logps, grad_logps in zip(statistics, gradient, strict=True):
        torch.testing.assert_close(grad_logps, stats_logps, rtol=0, atol=0)
    # The masks are live: a forward with fresh draws gives other log-probs.
    ctx.engine.logps.clear()
    batch = collate_packed([data[0], data[1]])
    with torch.no_grad():
        ctx.engine(*batch.split()[0], **batch.split()[1])
    assert not torch.allclose(ctx.engine.logps[0], statistics[0])


@pytest.mark.parametrize("settings", [{"f_divergence_type": "js_divergence"}, {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}])
def test_f_divergence_settings_reach_the_loss(settings):
    """loss.f_divergence_type (and alpha) reach preference_loss: the step's loss is f-DPO's of the
    policy and reference log-probs, not DPO's (which would differ: the reference is another model)."""
    from dpo_dist.logprobs import split_pairs
    from dpo_dist.losses import preference_loss

    calls: list[str] = []
    ctx = context("sigmoid", calls, **settings)
    got, batch, reference_policy = four_pair_step(ctx, calls)
    with torch.no_grad():
        policy = split_pairs(ctx.engine.module(*batch.split()[0], **batch.split()[1])[0])
        ref = split_pairs(reference_policy(*batch.split()[0], **batch.split()[1])[0])
    want = preference_loss("sigmoid", *policy, *ref, beta=0.1, **settings)[0].mean().item()
    dpo = preference_loss("sigmoid", *policy, *ref, beta=0.1)[0].mean().item()
    assert got == pytest.approx(want, rel=1e-6) and abs(want - dpo) > 1e-4


def test_weighted_losses_share_one_statistics_pass():
    """loss.weights with two statistics losses (kto_pair's KL baselines, aot's rank partners): one
    no-grad forward per micro-batch serves both, and the step's loss is the weighted sum of each
    term over the whole step (a filler micro-batch included), as one batch of all its pairs gives."""
    from dpo_dist.data import collate_packed
    from dpo_dist.logprobs import split_pairs
    from dpo_dist.losses import preference_loss

    calls: list[str] = []
    weights = {"kto_pair": 0.7, "aot": 0.4, "sigmoid": 1.0}
    ctx = context("kto_pair", calls, weights=weights)
    reference_policy = other_reference(ctx, calls)
    data = pairs(6)
    plans = [E.MicroBatchPlan([0, 3]), E.MicroBatchPlan([1, 4]), E.MicroBatchPlan([2, 5]), E.MicroBatchPlan([0], weight=0.0)]
    sums = E.train_step(ctx, data, plans, denominator=6.0)
    assert calls == ["reference (no grad)"] * 4 + ["policy (no grad)"] * 4 + ["policy", "backward"] * 4 + ["step"]
    got = dict(zip(E._SUMS, sums.tolist()))

    batch = collate_packed([data[i] for i in (0, 3, 1, 4, 2, 5)])
    with torch.no_grad():
        policy = split_pairs(ctx.engine.module(*batch.split()[0], **batch.split()[1])[0])
        ref = split_pairs(reference_policy(*batch.split()[0], **batch.split()[1])[0])
    terms = {name: preference_loss(name, *policy, *ref, beta=0.1) for name in weights}
    want = sum(weight * terms[name][0].sum().item() for name, weight in weights.items()) / 6
    assert got["loss"] / 6 == pytest.approx(want, rel=1e-6)
    # Rewards (and accuracy) are loss.name's: kto_pair's, beta * log-ratio like every loss with a reference.
    chosen_rewards = terms["kto_pair"][1]
    assert got["chosen_reward"] / 6 == pytest.approx(chosen_rewards.mean().item(), rel=1e-5)


def test_wpo_weights_each_pairs_preference_loss_not_the_nll():
    """loss.use_weighting: each pair's preference loss times exp(aligned chosen + aligned rejected)
    of the policy (detached), the loss.alpha NLL added unweighted; the policy engine returns the
    aligned log-probs only when asked (PackedPolicy(weighting=True), as build_engine does for it)."""
    from dpo_dist.logprobs import sequence_logps, split_pairs
    from dpo_dist.losses import preference_loss, sft_nll

    calls: list[str] = []
    ctx = context("sigmoid", calls, use_weighting=True, alpha=0.5)
    ctx.engine.module.weighting = True
    got, batch, reference_policy = four_pair_step(ctx, calls)
    with torch.no_grad():
        policy = sequence_logps(ctx.engine.module.model, batch, chunk_tokens=64, weighting=True)
        ref = split_pairs(reference_policy(*batch.split()[0], **batch.split()[1])[0])
    chosen_aligned, rejected_aligned = split_pairs(policy.aligned_logps)
    losses = preference_loss("sigmoid", *split_pairs(policy.logps), *ref, beta=0.1)[0]
    chosen_sums, _ = split_pairs(policy.sum_logps)
    chosen_counts, _ = split_pairs(policy.token_counts)
    weights = torch.exp(chosen_aligned + rejected_aligned)
    want = (losses * weights + 0.5 * sft_nll(chosen_sums, chosen_counts)).mean().item()
    assert got == pytest.approx(want, rel=1e-6)
    assert not torch.allclose(weights, torch.ones_like(weights), atol=1e-3)  # the weights matter here


@pytest.mark.parametrize("loss", ["sigmoid", "aot"])
def test_ld_alpha_reaches_policy_reference_and_statistics(loss):
    """loss.ld_alpha: the step's loss is that of LD-DPO's log-probs, sum - (1 - alpha) * tail, on the
    policy's side and the (online) reference's, and aot's statistics pass sorts those too (its two
    micro-batches give the loss of one sort over all four pairs); the loss.alpha NLL stays on the
    whole chosen responses. Not DPO's loss: the pairs differ in length and the reference is another model."""
    from dpo_dist.logprobs import sequence_logps, split_pairs
    from dpo_dist.losses import preference_loss, sft_nll

    calls: list[str] = []
    ctx = context(loss, calls, ld_alpha=0.25, alpha=0.5)
    got, batch, reference_policy = four_pair_step(ctx, calls)
    with torch.no_grad():
        policy, ref = (sequence_logps(m.model, batch, chunk_tokens=64, tails=True) for m in (ctx.engine.module, reference_policy))
    ld = [split_pairs(out.sum_logps - 0.75 * out.tail_logps) for out in (policy, ref)]
    nll = sft_nll(split_pairs(policy.sum_logps)[0], split_pairs(policy.token_counts)[0])
    want = (preference_loss(loss, *ld[0], *ld[1], beta=0.1)[0] + 0.5 * nll).mean().item()
    plain = (preference_loss(loss, *split_pairs(policy.sum_logps), *split_pairs(ref.sum_logps), beta=0.1)[0] + 0.5 * nll).mean().item()
    assert got == pytest.approx(want, rel=1e-6) and abs(want - plain) > 1e-4


def test_disable_dropout_zeroes_every_dropout_probability():
    """model.disable_dropout (TRL's default): a model whose config has attention dropout, and any
    nn.Dropout, scores in train mode exactly as in eval mode afterwards; before, it does not."""
    from torch import nn

    from dpo_dist.data import collate_packed

    model = tiny_llama(attention_dropout=0.5)
    enable_packed_attention(model, "sdpa")
    model.model.layers[0].mlp.down_proj = nn.Sequential(model.model.layers[0].mlp.down_proj, nn.Dropout(0.3))
    policy = M.PackedPolicy(model, chunk_tokens=64, normalize="sum", micro_batch_tokens=64)
    batch = collate_packed(pairs(2))

    def logps(train: bool) -> torch.Tensor:
        policy.train(train)
        with torch.no_grad():
            return policy(*batch.split()[0], **batch.split()[1])[0]

    model.model.layers[1].mlp.residual_dropout = 0.2  # a probability a module keeps for F.dropout (Starcoder2)
    assert not torch.equal(logps(True), logps(False))
    # Two attention layers' attention_dropout, the residual_dropout and the nn.Dropout.
    assert M.disable_dropout(model) == 4
    assert model.model.layers[1].mlp.residual_dropout == 0.0 and M.disable_dropout(model) == 0
    torch.testing.assert_close(logps(True), logps(False), rtol=0, atol=0)
    # The config (read at every forward by some models, e.g. Falcon) is zeroed for training; the
    # export writes the model's own value.
    assert model.config.attention_dropout == 0.0
    with M.original_dropout_config(model) as config:
        assert config.attention_dropout == 0.5 and "_dpo_original_dropout" not in config.to_json_string()
    assert model.config.attention_dropout == 0.0


def test_lora_online_reference_scores_in_eval_mode_and_restores_the_mode():
    """With LoRA the online reference is the policy with adapters disabled. The policy trains in
    train mode; its reference forwards run in eval mode like every other reference (here the base
    model keeps attention dropout, as with model.disable_dropout=false: no draws), and the policy
    is in train mode again afterwards, also after an exception."""
    from dpo_dist.config import LoraConfig
    from dpo_dist.data import collate_packed

    model = tiny_llama(attention_dropout=0.5)
    enable_packed_attention(model, "sdpa")
    model = M.apply_lora(model, LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]), seed=0)
    engine = RecordingEngine(M.PackedPolicy(model, chunk_tokens=64, normalize="sum", micro_batch_tokens=64), "policy", [])
    engine.train()
    reference = object.__new__(E.OnlineReference)
    reference.uses_policy, reference.engine, reference.ld_alpha = True, engine, None
    batch = collate_packed(pairs(2))
    first, second = reference.logps(batch), reference.logps(batch)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # no dropout draws
    assert engine.module.training and model.training
    engine.eval()
    with E.reference_adapters(engine), torch.no_grad():
        torch.testing.assert_close(first[0], engine(*batch.split()[0], **batch.split()[1])[1][0::2], rtol=0, atol=0)
    engine.train()
    with pytest.raises(RuntimeError), E.eval_mode(engine):
        assert not engine.module.training
        raise RuntimeError("a failed forward")
    assert engine.module.training


@pytest.mark.parametrize("loss", ["ipo", "sigmoid"])
def test_per_token_losses_log_rewards_of_the_whole_responses(loss):
    """With loss.logp_normalization=mean (ipo, TRL's sigmoid_norm) the loss compares per-token
    mean log-ratios, but the logged rewards, margins and accuracy are beta times each response's
    summed log-ratio, DPO's implicit reward, as TRL logs them (per-token ones can differ in sign)."""
    from dpo_dist.logprobs import split_pairs
    from dpo_dist.losses import preference_loss

    calls: list[str] = []
    ctx = context(loss, calls, logp_normalization="mean")
    ctx.engine.module.normalize = M.policy_normalization(ctx.cfg)  # as build_engine makes it
    assert ctx.engine.module.normalize == "mean"
    reference_policy = other_reference(ctx, calls)
    data = pairs(4)
    sums = E.train_step(ctx, data, [E.MicroBatchPlan([0, 1]), E.MicroBatchPlan([2, 3])], denominator=4.0)
    got = dict(zip(E._SUMS, sums.tolist()))
    from dpo_dist.data import collate_packed

    batch = collate_packed(data)
    with torch.no_grad():
        out = ctx.engine.module(*batch.split()[0], **batch.split()[1])
        policy_means, policy_sums, counts = split_pairs(out[0]), split_pairs(out[1]), split_pairs(out[2])
        ref_sums = split_pairs(reference_policy(*batch.split()[0], **batch.split()[1])[1])
    ref_means = [s / n for s, n in zip(ref_sums, counts)]
    losses = preference_loss(loss, *policy_means, *ref_means, beta=0.1)[0]
    assert got["loss"] / 4 == pytest.approx(losses.mean().item(), rel=1e-6)
    chosen = 0.1 * (policy_sums[0] - ref_sums[0])
    rejected = 0.1 * (policy_sums[1] - ref_sums[1])
    assert got["chosen_reward"] / 4 == pytest.approx(chosen.mean().item(), rel=1e-5)
    assert got["rejected_reward"] / 4 == pytest.approx(rejected.mean().item(), rel=1e-5)
    assert got["correct"] == (chosen > rejected).sum().item()


def test_the_step_reports_the_global_gradient_norm_before_clipping():
    """grad_norm (HF Trainer's and torchtitan's metric) is the 2-norm over every parameter's
    accumulated gradient of the step: here a stage-0 fp32 engine, which computes none itself."""
    calls = []
    ctx = context("sigmoid", calls)
    other_reference(ctx, calls)
    sums = E.train_step(ctx, pairs(4), [E.MicroBatchPlan([0, 1]), E.MicroBatchPlan([2, 3])], denominator=4.0)
    grads = [p.grad for p in ctx.engine.module.parameters() if p.grad is not None]  # the stand-in keeps them
    expected = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    got = dict(zip(E._SUMS, sums.tolist()))["grad_norm"]
    assert expected > 0 and math.isclose(got, expected, rel_tol=1e-5), (got, expected)


def test_a_loss_with_an_nll_term_reports_both_terms():
    """loss = pref_loss + alpha * nll_loss (RPO, ORPO, CPO), each term logged as TRL/OpenRLHF do;
    nll_loss is the chosen response's NLL per token, the mean over pairs."""
    from dpo_dist.data import collate_packed
    from dpo_dist.logprobs import split_pairs

    def step(alpha: float):
        calls = []
        ctx = context("sigmoid", calls, alpha=alpha)
        other_reference(ctx, calls)
        sums = E.train_step(ctx, pairs(4), [E.MicroBatchPlan([0, 1]), E.MicroBatchPlan([2, 3])], denominator=4.0)
        return ctx, E.summarize(dict(zip(E._SUMS, sums.tolist())), ctx.cfg)

    _, plain = step(0.0)
    ctx, mixed = step(0.5)
    assert "nll_loss" not in plain and "pref_loss" not in plain
    with torch.no_grad():
        out = M.run_packed(ctx.engine, collate_packed(pairs(4)))
    chosen_sums, _ = split_pairs(out.sum_logps)
    chosen_counts, _ = split_pairs(out.token_counts)
    expected_nll = float((-chosen_sums / chosen_counts).mean())
    assert math.isclose(mixed["nll_loss"], expected_nll, rel_tol=1e-5)
    assert math.isclose(mixed["pref_loss"], plain["loss"], rel_tol=1e-5)
    assert math.isclose(mixed["loss"], plain["loss"] + 0.5 * expected_nll, rel_tol=1e-5)


def test_step_sums_count_each_real_pair_once_and_scale_each_ranks_gradient():
    """Every metric sum of a step (engine._SUMS) against its 4 pairs scored as one batch, with a
    filler micro-batch (weight 0) that must add nothing, neither to the sums nor to the gradient.
    Each micro-batch's backward gets its summed losses times world / denominator (DeepSpeed
    averages gradients over the ranks), and only the last one ends the accumulation. Against the
    policy itself every reward is 0: a tie is not a correct pair."""
    from dpo_dist.data import collate_packed
    from dpo_dist.logprobs import split_pairs
    from dpo_dist.losses import preference_loss

    calls: list[str] = []
    ctx = context("sigmoid", calls)
    ctx.world = 2
    backward, boundaries = [], []
    engine_backward = ctx.engine.backward
    ctx.engine.backward = lambda loss: (backward.append(loss.item()), engine_backward(loss))
    ctx.engine.set_gradient_accumulation_boundary = boundaries.append
    data = pairs(4)
    plans = [E.MicroBatchPlan([0, 1]), E.MicroBatchPlan([2, 3]), E.MicroBatchPlan([1], weight=0.0)]
    same = dict(zip(E._SUMS, E.train_step(ctx, data, plans, denominator=4.0).tolist()))
    assert same["correct"] == 0 and same["margin"] == 0 and same["loss"] == pytest.approx(4 * math.log(2), rel=1e-6)
    assert boundaries == [False, False, True]

    backward.clear()
    reference_policy = other_reference(ctx, calls)
    got = dict(zip(E._SUMS, E.train_step(ctx, data, plans, denominator=4.0).tolist()))
    batch = collate_packed(data)
    with torch.no_grad():
        policy = split_pairs(ctx.engine.module(*batch.split()[0], **batch.split()[1])[0])
        ref = split_pairs(reference_policy(*batch.split()[0], **batch.split()[1])[0])
    losses, chosen, rejected = preference_loss("sigmoid", *policy, *ref, beta=0.1)
    want = {
        "loss": losses.sum(),
        "correct": (chosen > rejected).sum(),
        "margin": (chosen - rejected).sum(),
        "chosen_reward": chosen.sum(),
        "rejected_reward": rejected.sum(),
        "chosen_logp": policy[0].sum(),
        "rejected_logp": policy[1].sum(),
        "scored_tokens": sum(len(p.chosen_ids) + len(p.rejected_ids) for p in data),
        "nll": 0.0,  # loss.alpha = 0: no NLL term
        "pairs": 4,
        "tokens": batch.num_tokens,
        "stop": 0,
    }
    for key in E._SUMS:
        if key != "grad_norm":  # test_the_step_reports_the_global_gradient_norm_before_clipping
            assert got[key] == pytest.approx(float(want[key]), rel=1e-5, abs=1e-6), key
    assert 0 < got["correct"] < 4 and got["chosen_logp"] != pytest.approx(got["rejected_logp"], rel=1e-3)
    assert backward == pytest.approx([(losses[:2].sum() * 2 / 4).item(), (losses[2:].sum() * 2 / 4).item(), 0.0], rel=1e-5)


def test_summaries_are_per_real_pair_and_sft_per_scored_token():
    totals = dict.fromkeys(E._SUMS, 0.0) | {
        "loss": 6.0, "correct": 3.0, "margin": 1.5, "chosen_reward": 0.9, "rejected_reward": -0.6,
        "chosen_logp": -120.0, "rejected_logp": -150.0, "scored_tokens": 500.0, "pairs": 4.0, "tokens": 801.0,
    }
    dpo, sft = config_from_dict({}), config_from_dict({"stage": "sft"})
    assert E.summarize(totals, dpo) == pytest.approx(
        {
            "loss": 1.5,
            "reward_accuracy": 0.75,
            "reward_margin": 0.375,
            "chosen_reward": 0.225,
            "rejected_reward": -0.15,
            "chosen_logp": -30.0,
            "rejected_logp": -37.5,
            "tokens": 801,
        }
    )
    assert E.summarize(totals, sft) == pytest.approx({"loss": 6.0 / 500, "tokens": 801})
    nothing = dict.fromkeys(E._SUMS, 0.0)  # a rank or an eval set without pairs: zeros, not nan
    assert E.summarize(nothing, dpo)["loss"] == 0.0 and E.summarize(nothing, sft)["loss"] == 0.0


def test_loss_denominator_is_the_steps_pairs_or_for_sft_its_chosen_tokens():
    class Dataset:  # what loss_denominator reads of a TokenizedDataset: scored (chosen, rejected) tokens
        def scored_tokens(self):
            return np.array([[3, 9], [5, 1], [7, 2]])

    positions = np.array([0, 2, 2])  # a position twice: a later epoch's pass over a small set
    assert E.loss_denominator(config_from_dict({}), Dataset(), positions) == 3.0
    assert E.loss_denominator(config_from_dict({"stage": "sft"}), Dataset(), positions) == 17.0


def test_weighted_terms_log_the_rewards_of_loss_name():
    """loss.weights mixing a reference-free term (cpo, loss.name) with one that has a reference:
    the loss is the weighted sum, the logged rewards are cpo's (beta * policy), not the first term's."""
    from dpo_dist.losses import preference_loss

    cfg = config_from_dict({"loss": {"name": "cpo", "weights": {"sigmoid": 1.0, "cpo": 0.5}}})
    generator = torch.Generator().manual_seed(0)
    logps = tuple(-20 * torch.rand(5, generator=generator) for _ in range(4))
    total, chosen, rejected = E.weighted_preference_loss(cfg, logps, {})
    sigmoid, cpo = (preference_loss(name, *logps, beta=0.1)[0] for name in ("sigmoid", "cpo"))
    torch.testing.assert_close(total, sigmoid + 0.5 * cpo)
    torch.testing.assert_close(chosen, 0.1 * logps[0])
    torch.testing.assert_close(rejected, 0.1 * logps[1])


class EvalSet(list):
    """Tokenized pairs with what evaluate reads of a TokenizedDataset besides them: packed lengths."""

    def lengths(self) -> np.ndarray:
        return np.array([pair.num_tokens for pair in self])


class StoreReference:
    """A precomputed reference: summed (chosen, rejected) log-probs by example id, one table per split."""

    def __init__(self, train: torch.Tensor, eval: torch.Tensor):
        self.train, self.eval = train, eval

    def logps(self, batch):
        return self.train[batch.example_ids].unbind(1)

    def eval_logps(self, batch):
        return self.eval[batch.example_ids].unbind(1)


@pytest.mark.parametrize("loss", ["sigmoid", "kto_pair"])
def test_evaluate_reads_the_eval_reference_and_counts_no_filler(loss):
    """5 eval pairs that fit one per micro-batch on 2 ranks: rank 0 gets pairs 0, 2 and 4, rank 1
    pairs 1 and 3 and a filler (a weight-0 repeat of pair 1, to match rank 0's 3 micro-batches).
    Each rank's metrics (a single process: no all-reduce) are those of its real pairs against the
    eval split's reference (kto_pair's KL baselines too), the filler not counted."""
    from dpo_dist import distributed as D
    from dpo_dist.data import collate_packed
    from dpo_dist.logprobs import split_pairs
    from dpo_dist.losses import preference_loss

    settings = {"model": {"attn_backend": "sdpa"}, "data": {"max_length": 16}, "train": {"micro_batch_tokens": 32}}
    cfg = config_from_dict({"loss": {"name": loss}, **settings})
    torch.manual_seed(0)
    model = tiny_llama()
    enable_packed_attention(model, "sdpa")
    policy = M.PackedPolicy(model, chunk_tokens=64, normalize="sum", micro_batch_tokens=32)
    # Different (positive) log-ratios against the two splits: which one is read shows.
    offsets = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    reference = StoreReference(train=-30.0 - offsets, eval=-40.0 - 2 * offsets)
    ctx = E.StepContext(RecordingEngine(policy, "policy", []), reference, cfg, torch.device("cpu"), world=2)
    data = EvalSet(pairs(5))
    assert [p.weight for p in E.plan_micro_batches(np.arange(5), data.lengths(), 1, 2, 32)] == [1.0, 1.0, 0.0]
    for rank, mine in ((0, [0, 2, 4]), (1, [1, 3])):
        env = D.DistEnv(rank=rank, local_rank=rank, world_size=2, master_addr="localhost", master_port=0, slurm_job_id=None)
        got = E.evaluate(ctx, data, env)
        batch = collate_packed([data[i] for i in mine])
        with torch.no_grad():
            logps = split_pairs(policy(*batch.split()[0], **batch.split()[1])[0])
        losses, chosen, rejected = preference_loss(loss, *logps, *reference.eval[mine].unbind(1), beta=0.1)
        want = {
            "eval/loss": losses.mean(),
            "eval/reward_accuracy": (chosen > rejected).float().mean(),
            "eval/reward_margin": (chosen - rejected).mean(),
            "eval/chosen_reward": chosen.mean(),
            "eval/rejected_reward": rejected.mean(),
            "eval/chosen_logp": logps[0].mean(),
            "eval/rejected_logp": logps[1].mean(),
        }
        assert got == pytest.approx({key: value.item() for key, value in want.items()}, rel=1e-5), rank


def test_sft_step_sums_the_chosen_responses_nll_per_token():
    """stage=sft packs the chosen responses alone: the step's loss sum is their summed NLL, its
    scored tokens theirs, each backward its micro-batch's NLL over the step's chosen tokens
    (loss_denominator), and the summary the NLL per token."""
    from dpo_dist.data import collate_packed
    from dpo_dist.logprobs import sequence_logps

    cfg = config_from_dict({"stage": "sft", "model": {"attn_backend": "sdpa"}})
    torch.manual_seed(0)
    model = tiny_llama()
    enable_packed_attention(model, "sdpa")
    engine = RecordingEngine(M.PackedPolicy(model, chunk_tokens=64, normalize="sum", micro_batch_tokens=64), "policy", [])
    backward = []
    engine_backward = engine.backward
    engine.backward = lambda loss: (backward.append(loss.item()), engine_backward(loss))
    ctx = E.StepContext(engine, None, cfg, torch.device("cpu"), world=1)
    data = pairs(4)
    tokens = float(sum(len(p.chosen_ids) for p in data))
    sums = E.train_step(ctx, data, [E.MicroBatchPlan([0, 1]), E.MicroBatchPlan([2, 3])], denominator=tokens)
    got = dict(zip(E._SUMS, sums.tolist()))
    batch = collate_packed(data, chosen_only=True)
    with torch.no_grad():
        nll = -sequence_logps(model, batch, chunk_tokens=64).sum_logps
    assert got["loss"] == pytest.approx(nll.sum().item(), rel=1e-5)
    assert (got["scored_tokens"], got["pairs"], got["tokens"]) == (tokens, 4, batch.num_tokens)
    assert backward == pytest.approx([nll[:2].sum().item() / tokens, nll[2:].sum().item() / tokens], rel=1e-5)
    assert E.summarize(got, ctx.cfg)["loss"] == pytest.approx(nll.sum().item() / tokens, rel=1e-5)
