"""Our preference losses against TRL's own loss code, values, gradients and rewards, in float64.

TRL 1.16 has no public loss function: ``DPOTrainer._compute_loss`` runs the model forward and the
loss in one method, and SimPO lives in ``trl.experimental.cpo.CPOTrainer.cpo_loss``. Both are
called here unbound on small stand-ins that carry only the attributes they read, with a stand-in
model whose per-token log-probs sum to the log-probs under test, so no model or dataset is built.

Where TRL and we agree, the values match to float64 rounding (rtol 1e-10). Where they differ, the
test pins the difference down, and the paper decides (see each test and dpo_dist/losses.py).
SimPO and CPO are compared with ``trl.experimental.cpo.CPOTrainer.cpo_loss``, ORPO with
``trl.experimental.orpo.ORPOTrainer.odds_ratio_loss``.

- ``ipo``: TRL divides each side's log-ratio by its completion length inside the loss; our kernel
  is IPO eq. 17 on whatever log-probs it is given, and conf/loss/ipo.yaml feeds it per-token means
  (``logp_normalization=mean``), which is the same loss. TRL's logged IPO rewards stay on sums.
- ``sigmoid`` with label_smoothing > 0: TRL 1.16's DPOTrainer ignores it (plain DPO); ours is
  cDPO as TRL's CPOTrainer and older DPOTrainer compute it, and is compared with that code.
- ``rpo`` (sigmoid + alpha * NLL of chosen): TRL's ``sft`` term (and CPO's and ORPO's NLL) is one
  token-level mean over the whole batch; RPO (Pang et al. 2024, eq. 1) normalises each chosen response's NLL by its own
  length, as ``sft_nll`` does. Equal for equal lengths only.
- ``kto_pair``: not in TRL 1.16 (removed; CPOTrainer rejects the name), so nothing to compare.
- ``loss.ld_alpha`` (LD-DPO): TRL splits each completion's per-token log-probs at the pair's
  shared length itself, for the policy and for its precomputed reference; ours start from the same
  per-token log-probs through ``response_tail_sums`` and ``length_desensitized``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dpo_dist.logprobs import SequenceLogps, normalized_logps, response_tail_sums, split_pairs
from dpo_dist.losses import LOSS_NAMES, preference_loss, sft_nll
from tests.helpers import REPO

pytest.importorskip("trl", minversion="1.16")
from trl import DPOConfig  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402

with warnings.catch_warnings():
    # TRL warns on every import from trl.experimental that its APIs may change; this test is the
    # place that would notice such a change.
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

BETAS = [0.05, 0.1, 0.5, 2.0]
PAIRS = 12
# Losses that TRL 1.16's DPOTrainer computes on summed log-probs like ours, with the options each reads.
DPO_TRAINER_LOSSES = {
    "sigmoid": [0.0],
    "robust": [0.0, 0.1, 0.3],
    "hinge": [0.0],
    "exo_pair": [1e-3, 0.1, 0.3],
    "nca_pair": [0.0],
    "bco_pair": [0.0],
    "sppo_hard": [0.0],
    "apo_zero": [0.0],
    "apo_down": [0.0],
    "discopop": [0.0],
}
NOT_IN_TRL = {"kto_pair"}


@contextlib.contextmanager
def float64_default():
    """TRL builds some constants with torch.tensor(python_float) (EXO's epsilon): in the default
    float32 they would cost ~1e-8 of precision, which would hide real differences at float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_inputs(seed: int, pairs: int = PAIRS):
    """(policy chosen, policy rejected, ref chosen, ref rejected) float64 leaves with grad, and
    (chosen, rejected) completion lengths; the policy stays near the reference as in training."""
    generator = torch.Generator().manual_seed(seed)
    ref_chosen, ref_rejected = (-20 * torch.rand(pairs, generator=generator, dtype=torch.float64) for _ in range(2))
    policy_chosen = ref_chosen + 3 * torch.randn(pairs, generator=generator, dtype=torch.float64)
    policy_rejected = ref_rejected + 3 * torch.randn(pairs, generator=generator, dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)]
    lengths = [torch.randint(1, 9, (pairs,), generator=generator) for _ in range(2)]
    return inputs, lengths


class _Accelerator:
    """Single process on CPU; ``gather`` records what TRL gathers, which is how the per-pair
    rewards (TRL only logs their means) are read back."""

    device = torch.device("cpu")

    def __init__(self):
        self.gathered: list[torch.Tensor] = []

    def gather(self, tensor):
        self.gathered.append(tensor)
        return tensor

    def gather_for_metrics(self, tensor):
        return tensor

    def autocast(self):
        return contextlib.nullcontext()


# The DPOConfig defaults that _compute_loss reads and the stand-in copies (checked in a test).
_DPO_DEFAULTS = {"f_divergence_type": "reverse_kl", "ld_alpha": None, "use_weighting": False}


def _dpo_stand_in(loss_types, beta, label_smoothing, loss_weights, discopop_tau, f_divergence_type=None, f_alpha_divergence_coef=0.5):
    """The attributes DPOTrainer.__init__ sets from a DPOConfig, with reference log-probs
    precomputed (they come in the batch, so gradients reach them like the policy's)."""
    return SimpleNamespace(
        beta=beta,
        label_smoothing=label_smoothing,
        loss_types=list(loss_types),
        loss_weights=loss_weights or [1.0] * len(loss_types),
        f_divergence_type=f_divergence_type or _DPO_DEFAULTS["f_divergence_type"],
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        ld_alpha=_DPO_DEFAULTS["ld_alpha"],
        use_weighting=_DPO_DEFAULTS["use_weighting"],
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        model=SimpleNamespace(training=True, is_gradient_checkpointing=False),
        accelerator=_Accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def _stand_in_forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths):
    """A model whose outputs give each completion the log-prob under test, spread evenly over its
    tokens (TRL sums them; its IPO and sft terms also count them), and the batch it reads."""
    logps = torch.cat([policy_chosen, policy_rejected])
    lengths = torch.cat([chosen_lengths, rejected_lengths])
    completion_mask = _completion_mask(lengths)
    return _token_model((logps / lengths)[:, None] * completion_mask[:, 1:]), _batch(completion_mask, ref_chosen, ref_rejected)


def _completion_mask(lengths: torch.Tensor) -> torch.Tensor:
    """Rows [chosen..., rejected...] with one prompt token in front, as TRL's collator lays them out."""
    positions = torch.arange(int(lengths.max()) + 1)
    return ((positions >= 1) & (positions <= lengths[:, None])).long()


def _token_model(per_token_logps: torch.Tensor):
    """A model whose forward gives these per-token log-probs (shifted: position t scores token t + 1)."""
    zeros = torch.zeros_like(per_token_logps.detach())
    outputs = SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    return lambda **kwargs: outputs


def _batch(completion_mask, ref_chosen, ref_rejected) -> dict:
    return {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }


def trl_dpo(loss_types, inputs, lengths, *, beta, label_smoothing=0.0, loss_weights=None, discopop_tau=0.05, **f_divergence):
    """TRL DPOTrainer's loss (the mean over pairs it trains on) and its per-pair (chosen, rejected) rewards."""
    stand_in = _dpo_stand_in(loss_types, beta, label_smoothing, loss_weights, discopop_tau, **f_divergence)
    model, batch = _stand_in_forward(*inputs, *lengths)
    with float64_default():
        loss = DPOTrainer._compute_loss(stand_in, model, batch, return_outputs=False)
    chosen_rewards, rejected_rewards = stand_in.accelerator.gathered[:2]
    # The first two gathers must be the rewards: their means are what TRL logs as rewards/*.
    assert stand_in._metrics["train"]["rewards/chosen"] == [pytest.approx(chosen_rewards.mean().item())]
    assert stand_in._metrics["train"]["rewards/rejected"] == [pytest.approx(rejected_rewards.mean().item())]
    return loss, chosen_rewards, rejected_rewards


def trl_dpo_per_pair(loss_types, inputs, lengths, **options) -> torch.Tensor:
    """TRL's loss of each pair alone (TRL returns only the batch mean)."""
    return torch.stack(
        [
            trl_dpo(loss_types, [t[i : i + 1] for t in inputs], [n[i : i + 1] for n in lengths], **options)[0]
            for i in range(len(inputs[0]))
        ]
    )


def trl_cpo(loss_type, policy_chosen, policy_rejected, *, beta, label_smoothing=0.0, simpo_gamma=0.5):
    """TRL CPOTrainer.cpo_loss: per-pair losses and rewards (AlphaPO off, alpha=0, its default)."""
    stand_in = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type=loss_type,
        simpo_gamma=simpo_gamma,
        accelerator=_Accelerator(),
    )
    with float64_default():
        return CPOTrainer.cpo_loss(stand_in, policy_chosen, policy_rejected)


def assert_same_gradients(ours: torch.Tensor, theirs: torch.Tensor, inputs, used=4) -> None:
    """d/d(the four inputs) of two scalar losses; reference-free losses use only the first two."""
    got = torch.autograd.grad(ours, inputs[:used], retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(theirs, inputs[:used], retain_graph=True, allow_unused=True)
    names = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
    for name, x, g, w in zip(names, inputs, got, want):
        # An input a loss does not reach (a detached side) has gradient 0, not None, for this comparison.
        g, w = (torch.zeros_like(x) if t is None else t for t in (g, w))
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"d/d{name}: {m}")


def dpo_cases():
    for name, epsilons in DPO_TRAINER_LOSSES.items():
        for beta in BETAS:
            for eps in epsilons:
                yield pytest.param(name, beta, eps, id=f"{name}-beta{beta}-eps{eps}")


@pytest.mark.parametrize("name, beta, eps", list(dpo_cases()))
@pytest.mark.parametrize("seed", [0, 1])
def test_losses_match_trl_dpo_trainer(name, beta, eps, seed):
    """Per-pair values, gradients of the batch mean w.r.t. all four inputs, and per-pair rewards.
    TRL's batch mean gives each pair's gradient: a pair's loss depends on that pair's inputs only."""
    inputs, lengths = random_inputs(seed)
    options = {"label_smoothing": eps} if name in ("robust", "exo_pair") else {}
    tau = 0.05 * (1 + 3 * seed)
    if name == "discopop":
        options["discopop_tau"] = tau
    ours, chosen_rewards, rejected_rewards = preference_loss(name, *inputs, beta=beta, **options)
    trl_options = dict(beta=beta, label_smoothing=eps, discopop_tau=tau)

    torch.testing.assert_close(ours, trl_dpo_per_pair([name], inputs, lengths, **trl_options), rtol=1e-10, atol=1e-12)
    trl_loss, trl_chosen, trl_rejected = trl_dpo([name], inputs, lengths, **trl_options)
    torch.testing.assert_close(ours.mean(), trl_loss, rtol=1e-10, atol=1e-12)
    assert_same_gradients(ours.mean(), trl_loss, inputs)
    torch.testing.assert_close(chosen_rewards, trl_chosen, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rejected_rewards, trl_rejected, rtol=1e-12, atol=1e-12)


F_DIVERGENCE_CASES = [("forward_kl", None), ("js_divergence", None), ("alpha_divergence", 0.5), ("alpha_divergence", 0.3), ("alpha_divergence", 0.8)]


@pytest.mark.parametrize("name", ["sigmoid", "robust", "hinge", "exo_pair", "discopop"])
@pytest.mark.parametrize("divergence, alpha", F_DIVERGENCE_CASES)
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_f_divergence_matches_trl_dpo_trainer(name, divergence, alpha, beta):
    """f-DPO's scores in place of the log-ratios, for every margin loss TRL generalises on summed
    log-probs. TRL 1.16 computes its alpha-divergence with exponent c - 1 for its coefficient c:
    ours at alpha is TRL's at 1 - alpha (the same at the default 0.5). Its alpha-divergence has
    exp() caps for float16/bfloat16/float32 only, so those cases compare in float32."""
    inputs, lengths = random_inputs(int(beta * 10))
    tolerance = dict(rtol=1e-10, atol=1e-12)
    if alpha:
        inputs = [t.detach().float().requires_grad_() for t in inputs]
        tolerance = dict(rtol=2e-5, atol=1e-6)
    eps = 0.1 if name in ("robust", "exo_pair") else 0.0
    options = {"label_smoothing": eps} if eps else {}
    f_options = {"f_divergence_type": divergence} | ({"f_alpha_divergence_coef": alpha} if alpha else {})
    ours, chosen_rewards, rejected_rewards = preference_loss(name, *inputs, beta=beta, **options, **f_options)
    trl_coef = {"f_alpha_divergence_coef": 1 - alpha} if alpha else {}
    trl_loss, trl_chosen, trl_rejected = trl_dpo([name], inputs, lengths, beta=beta, label_smoothing=eps, f_divergence_type=divergence, **trl_coef)
    torch.testing.assert_close(ours.mean(), trl_loss, **tolerance)
    for got, want in zip(torch.autograd.grad(ours.mean(), inputs, retain_graph=True), torch.autograd.grad(trl_loss, inputs)):
        torch.testing.assert_close(got, want, **tolerance)
    torch.testing.assert_close(chosen_rewards, trl_chosen, **tolerance)  # rewards stay beta * log-ratio
    torch.testing.assert_close(rejected_rewards, trl_rejected, **tolerance)
    plain = preference_loss(name, *inputs, beta=beta, **options)[0]
    assert not torch.allclose(ours, plain)  # the divergence changed the loss


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_weights_match_trl_loss_type_lists(seed):
    """loss.weights is TRL's loss_type list with loss_weights: the weighted sum of the terms' batch
    means (MPO's sigmoid 0.8 + bco_pair 0.2, here with a third term; with an f-divergence, which
    every term must take, margin terms only). The rewards are loss.name's, TRL's beta * log-ratios."""
    from dpo_dist.config import config_from_dict
    from dpo_dist.engine import weighted_preference_loss

    inputs, lengths = random_inputs(seed)
    cases = {"reverse_kl": {"sigmoid": 0.8, "bco_pair": 0.2, "hinge": 0.5}, "js_divergence": {"sigmoid": 0.8, "hinge": 0.5, "robust": 0.3}}
    for f_divergence, weights in cases.items():
        cfg = config_from_dict({"loss": {"name": "sigmoid", "beta": 0.3, "weights": weights, "f_divergence_type": f_divergence}})
        ours, chosen_rewards, rejected_rewards = weighted_preference_loss(cfg, tuple(inputs), {})
        trl_loss, trl_chosen, trl_rejected = trl_dpo(
            list(weights), inputs, lengths, beta=0.3, loss_weights=list(weights.values()), f_divergence_type=f_divergence
        )
        torch.testing.assert_close(ours.mean(), trl_loss, rtol=1e-10, atol=1e-12)
        assert_same_gradients(ours.mean(), trl_loss, inputs)
        torch.testing.assert_close(chosen_rewards, trl_chosen, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rejected_rewards, trl_rejected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_wpo_weights_match_trl_use_weighting(seed):
    """use_weighting: TRL multiplies each pair's loss by exp(mean over the completion of log p -
    log sum p^2) of chosen times rejected; ours is wpo_pair_weights of the per-sequence means
    (SequenceLogps.aligned_logps, checked against a full softmax in test_logprobs.py)."""
    from dpo_dist.losses import wpo_pair_weights

    inputs, lengths = random_inputs(seed)
    model, batch = _stand_in_forward(*inputs, *lengths)
    outputs = model()
    generator = torch.Generator().manual_seed(seed)
    # log sum_v p(v)^2 lies in [log(1/V), 0]: any such per-token values exercise the formula.
    log_sum_sq = -3 * torch.rand(outputs.log_probs.shape, generator=generator, dtype=torch.float64)
    outputs.log_sum_sq_probs = log_sum_sq
    stand_in = _dpo_stand_in(["sigmoid"], 0.1, 0.0, None, 0.05)
    stand_in.use_weighting = True
    with float64_default():
        trl_loss = DPOTrainer._compute_loss(stand_in, lambda **kwargs: outputs, batch, return_outputs=False)
    mask = batch["completion_mask"][:, 1:]
    aligned = ((outputs.log_probs.detach() - log_sum_sq) * mask).sum(dim=1) / mask.sum(dim=1)
    weights = wpo_pair_weights(*aligned.chunk(2))
    ours = (preference_loss("sigmoid", *inputs, beta=0.1)[0] * weights).mean()
    torch.testing.assert_close(ours, trl_loss, rtol=1e-10, atol=1e-12)
    assert_same_gradients(ours, trl_loss, inputs)  # the weights are constants to both
    assert weights.std() > 0.1  # not a uniform rescaling


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("seed", [0, 1])
def test_ipo_matches_trl_on_per_token_means(beta, seed):
    """TRL's IPO is eq. 17 of Azar et al. on per-token log-ratios: it divides each side by its
    completion length (the IPO authors' setting, per TRL). Our kernel takes the log-probs it is
    given; conf/loss/ipo.yaml sets logp_normalization=mean, so the engine feeds it policy and
    reference sums divided by the policy's token counts, which is this call. The rewards differ by
    that normalisation here: TRL logs beta * summed log-ratio for IPO too, and so does the engine
    (test_engine_step.py::test_per_token_losses_log_rewards_of_the_whole_responses); the kernel's are per token."""
    inputs, (chosen_n, rejected_n) = random_inputs(seed)
    pc, pr, rc, rr = inputs
    ours, chosen_rewards, rejected_rewards = preference_loss(
        "ipo", pc / chosen_n, pr / rejected_n, rc / chosen_n, rr / rejected_n, beta=beta
    )
    lengths = [chosen_n, rejected_n]
    torch.testing.assert_close(ours, trl_dpo_per_pair(["ipo"], inputs, lengths, beta=beta), rtol=1e-10, atol=1e-12)
    trl_loss, trl_chosen, trl_rejected = trl_dpo(["ipo"], inputs, lengths, beta=beta)
    torch.testing.assert_close(ours.mean(), trl_loss, rtol=1e-10, atol=1e-12)
    assert_same_gradients(ours.mean(), trl_loss, inputs)
    torch.testing.assert_close(chosen_rewards * chosen_n, trl_chosen, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rejected_rewards * rejected_n, trl_rejected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("seed", [0, 1])
def test_sigmoid_norm_preset_matches_trl_sigmoid_norm(beta, seed):
    """TRL's sigmoid_norm divides each side's summed log-ratio by its completion length; our
    conf/loss/sigmoid_norm.yaml is sigmoid with logp_normalization=mean, which feeds the kernel
    policy and reference sums divided by the token counts: the same loss and gradients."""
    import yaml

    preset = yaml.safe_load((REPO / "conf" / "loss" / "sigmoid_norm.yaml").read_text())
    assert preset["name"] == "sigmoid" and preset["logp_normalization"] == "mean" and preset["label_smoothing"] == 0
    inputs, (chosen_n, rejected_n) = random_inputs(seed)
    pc, pr, rc, rr = inputs
    ours = preference_loss("sigmoid", pc / chosen_n, pr / rejected_n, rc / chosen_n, rr / rejected_n, beta=beta)[0]
    lengths = [chosen_n, rejected_n]
    torch.testing.assert_close(ours, trl_dpo_per_pair(["sigmoid_norm"], inputs, lengths, beta=beta), rtol=1e-10, atol=1e-12)
    trl_loss = trl_dpo(["sigmoid_norm"], inputs, lengths, beta=beta)[0]
    torch.testing.assert_close(ours.mean(), trl_loss, rtol=1e-10, atol=1e-12)
    assert_same_gradients(ours.mean(), trl_loss, inputs)


@pytest.mark.parametrize("beta", [0.5, 2.0, 10.0])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_simpo_matches_trl_cpo_trainer(beta, eps, seed):
    """SimPO (Meng et al. eq. 6) is CPOTrainer's loss_type="simpo" on mean log-probs; TRL's
    ``simpo_gamma`` is the absolute margin like our ``gamma``. Rewards are beta * policy in both.
    (CPOTrainer adds cpo_alpha * NLL outside cpo_loss unless cpo_alpha=0; SimPO has no such term.)"""
    inputs, _ = random_inputs(seed)
    pc, pr = (t / 8 for t in inputs[:2])  # per-token means are a few nats, not tens
    gamma = 0.3 + 0.7 * seed
    weights = torch.linspace(0.5, 1.5, PAIRS, dtype=torch.float64)
    ours, chosen_rewards, rejected_rewards = preference_loss(
        "simpo", pc, pr, None, None, beta=beta, gamma=gamma, label_smoothing=eps
    )
    theirs, trl_chosen, trl_rejected = trl_cpo("simpo", pc, pr, beta=beta, label_smoothing=eps, simpo_gamma=gamma)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert_same_gradients((ours * weights).sum(), (theirs * weights).sum(), inputs, used=2)
    torch.testing.assert_close(chosen_rewards, trl_chosen, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rejected_rewards, trl_rejected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("eps", [0.1, 0.3, 0.5])
def test_label_smoothed_sigmoid_is_trl_cdpo_not_trl_1_16_dpo_trainer(beta, eps):
    """Our sigmoid with eps > 0 is cDPO (Mitchell 2023, eq. 3): -(1-eps) logsig(beta h) - eps logsig(-beta h).
    TRL 1.16's DPOTrainer dropped label smoothing from "sigmoid" (it reads it only for robust, EXO
    and aot), so there it is plain DPO; TRL's cDPO formula survives in CPOTrainer.cpo_loss, which on
    the per-side log-ratios (pi - ref) is exactly cDPO and our loss, rewards included."""
    inputs, lengths = random_inputs(0)
    pc, pr, rc, rr = inputs
    weights = torch.linspace(0.5, 1.5, PAIRS, dtype=torch.float64)
    ours, chosen_rewards, rejected_rewards = preference_loss("sigmoid", *inputs, beta=beta, label_smoothing=eps)
    theirs, trl_chosen, trl_rejected = trl_cpo("sigmoid", pc - rc, pr - rr, beta=beta, label_smoothing=eps)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert_same_gradients((ours * weights).sum(), (theirs * weights).sum(), inputs)
    torch.testing.assert_close(chosen_rewards, trl_chosen, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rejected_rewards, trl_rejected, rtol=1e-12, atol=1e-12)

    plain = preference_loss("sigmoid", *inputs, beta=beta)[0]
    dpo_trainer = trl_dpo_per_pair(["sigmoid"], inputs, lengths, beta=beta, label_smoothing=eps)
    torch.testing.assert_close(dpo_trainer, plain, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(dpo_trainer, ours)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_rpo_matches_trl_sigmoid_plus_sft_for_equal_lengths(beta, alpha):
    """RPO in TRL 1.16 is loss_type=["sigmoid", "sft"] with loss_weights=[1, alpha] (rpo_alpha is
    gone). Ours is the engine's sigmoid + alpha * sft_nll per pair, averaged over pairs. With every
    chosen response the same length the two are the same loss, gradients included."""
    inputs, _ = random_inputs(3)
    lengths = [torch.full((PAIRS,), 5), torch.randint(1, 9, (PAIRS,), generator=torch.Generator().manual_seed(3))]
    ours = preference_loss("sigmoid", *inputs, beta=beta)[0] + alpha * sft_nll(inputs[0], lengths[0])
    trl_loss = trl_dpo(["sigmoid", "sft"], inputs, lengths, beta=beta, loss_weights=[1.0, alpha])[0]
    torch.testing.assert_close(ours.mean(), trl_loss, rtol=1e-10, atol=1e-12)
    assert_same_gradients(ours.mean(), trl_loss, inputs)
    rpo = preference_loss("rpo", *inputs, beta=beta, alpha=alpha, chosen_tokens=lengths[0])[0]
    torch.testing.assert_close(rpo, ours, rtol=0, atol=0)  # the public rpo is the engine's sum
    sft = preference_loss("sft", inputs[0], inputs[1], None, None, beta=beta, chosen_tokens=lengths[0])[0]
    trl_sft = trl_dpo(["sft"], inputs, lengths, beta=beta)[0]
    torch.testing.assert_close(sft.mean(), trl_sft, rtol=1e-10, atol=1e-12)
    assert_same_gradients(sft.mean(), trl_sft, inputs)


def test_rpo_nll_differs_from_trl_for_unequal_lengths():
    """TRL's sft term is -sum(chosen token log-probs) / sum(chosen tokens) over the whole batch, so
    long chosen responses weigh more. RPO (Pang et al. 2024, arXiv 2404.19733, eq. 1) divides each
    chosen response's NLL by its own length before averaging over pairs, which sft_nll does: we
    keep ours. Here both are pinned down so a change on either side is seen."""
    beta, alpha = 0.1, 1.0
    inputs, lengths = random_inputs(4)
    pc, chosen_n = inputs[0], lengths[0]
    dpo = preference_loss("sigmoid", *inputs, beta=beta)[0]
    ours = (dpo + alpha * sft_nll(pc, chosen_n)).mean()
    trl_loss = trl_dpo(["sigmoid", "sft"], inputs, lengths, beta=beta, loss_weights=[1.0, alpha])[0]

    torch.testing.assert_close(trl_loss, dpo.mean() + alpha * -pc.sum() / chosen_n.sum(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, dpo.mean() + alpha * (-pc / chosen_n).mean(), rtol=1e-12, atol=1e-12)
    assert abs(ours.item() - trl_loss.item()) > 1e-3


def test_discopop_stays_finite_where_trl_overflows():
    """At beta * margin = -500 in float32, TRL's exp(-margin) * mix is inf * 0 = nan; ours computes
    the product in log space and gives the logistic part (500), as DiscoPOP eq. 5 does in the limit."""
    pc = torch.tensor([-5000.0], requires_grad=True)
    zero = torch.zeros(1)
    inputs = [pc, zero, zero, zero]
    ours = preference_loss("discopop", *inputs, beta=0.1)[0]
    stand_in = _dpo_stand_in(["discopop"], 0.1, 0.0, None, 0.05)
    model, batch = _stand_in_forward(*inputs, torch.ones(1, dtype=torch.long), torch.ones(1, dtype=torch.long))
    theirs = DPOTrainer._compute_loss(stand_in, model, batch, return_outputs=False)
    torch.testing.assert_close(ours, torch.tensor([500.0]))
    assert torch.isnan(theirs) or torch.allclose(theirs, ours.mean())  # the latter once TRL guards it


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_cpo_matches_trl_cpo_trainer(beta, eps, seed):
    """CPO (Xu et al. eq. 3) is CPOTrainer's default loss_type="sigmoid": DPO's logistic loss on the
    policy's summed log-probs, label-smoothed; rewards beta * policy. (Its cpo_alpha * NLL is added
    outside cpo_loss, as our engine adds loss.alpha * sft_nll.)"""
    inputs, _ = random_inputs(seed)
    pc, pr = inputs[:2]
    weights = torch.linspace(0.5, 1.5, PAIRS, dtype=torch.float64)
    ours, chosen_rewards, rejected_rewards = preference_loss("cpo", pc, pr, None, None, beta=beta, label_smoothing=eps)
    theirs, trl_chosen, trl_rejected = trl_cpo("sigmoid", pc, pr, beta=beta, label_smoothing=eps)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert_same_gradients((ours * weights).sum(), (theirs * weights).sum(), inputs, used=2)
    torch.testing.assert_close(chosen_rewards, trl_chosen, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rejected_rewards, trl_rejected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_orpo_matches_trl_orpo_trainer(beta, seed):
    """ORPO (Hong et al. eq. 7) against ORPOTrainer.odds_ratio_loss on mean log-probs: TRL returns
    beta * log sigmoid(log odds ratio) and subtracts its mean from the NLL, so our per-pair loss is
    its negative; rewards beta * policy in both. Mean log-probs from near-certain (-1e-3 nats per
    token, both branches of log(1 - exp(x))) to unlikely (-3). TRL computes it in float32 (it calls
    .float() on the log-probs), so the comparison is at float32 precision."""
    inputs, _ = random_inputs(seed)
    pc, pr = (-(t.detach().abs() / 8 + 1e-3) for t in inputs[:2])
    pc.requires_grad_(True), pr.requires_grad_(True)
    assert (pc > -0.69).any() and (pc < -0.69).any()
    weights = torch.linspace(0.5, 1.5, PAIRS, dtype=torch.float64)
    ours, chosen_rewards, rejected_rewards = preference_loss("orpo", pc, pr, None, None, beta=beta)
    stand_in = SimpleNamespace(beta=beta, accelerator=_Accelerator())
    with float64_default():
        theirs, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(stand_in, pc, pr)
    assert theirs.dtype == torch.float32
    torch.testing.assert_close(ours.float(), -theirs, rtol=1e-6, atol=1e-7)
    got = torch.autograd.grad((ours * weights).sum(), (pc, pr))
    want = torch.autograd.grad(-(theirs * weights).sum(), (pc, pr))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(chosen_rewards.float(), trl_chosen, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rejected_rewards.float(), trl_rejected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("seed", [0, 1])
def test_aot_matches_trl_on_one_batch(name, eps, seed):
    """TRL's aot / aot_unpaired sort the batch they are given: the batch mean and its gradients
    (w.r.t. all four inputs) agree with ours on the same pairs. Per pair they cannot: a pair's term
    is that of its rank, not its own."""
    inputs, lengths = random_inputs(seed)
    ours = preference_loss(name, *inputs, beta=0.1, label_smoothing=eps)[0]
    trl_loss = trl_dpo([name], inputs, lengths, beta=0.1, label_smoothing=eps)[0]
    torch.testing.assert_close(ours.mean(), trl_loss, rtol=1e-10, atol=1e-12)
    assert_same_gradients(ours.mean(), trl_loss, inputs)


def test_every_loss_is_compared_or_absent_from_trl():
    """Each LOSS_NAMES entry is compared above, or TRL 1.16 does not have it: kto_pair was removed
    (DPOTrainer rejects the name and CPOTrainer says to use KTOTrainer, an unpaired loss with a
    separate KL batch, not this one)."""
    compared = set(DPO_TRAINER_LOSSES) | {"ipo", "simpo", "cpo", "orpo", "rpo", "sft", "aot", "aot_unpaired"}
    assert set(LOSS_NAMES) == compared | NOT_IN_TRL
    inputs, lengths = random_inputs(0, pairs=2)
    with pytest.raises(ValueError, match="Unknown loss type: kto_pair"):
        trl_dpo(["kto_pair"], inputs, lengths, beta=0.1)


def test_stand_in_uses_trl_defaults():
    """The DPOConfig defaults the stand-in hard-codes (a changed default would change what TRL's
    "standard" loss is) and that precomputed reference log-probs are a supported mode."""
    defaults = {f.name: f.default for f in dataclasses.fields(DPOConfig)}
    assert {key: defaults[key] for key in _DPO_DEFAULTS} == _DPO_DEFAULTS
    assert "precompute_ref_log_probs" in defaults and "discopop_tau" in defaults


def per_token_inputs(seed: int, pairs: int = PAIRS):
    """Per-token log-probs of policy (a float64 leaf with grad) and reference, [2 * pairs, L] in
    TRL's shifted layout (rows chosen..., rejected...; 0 past each completion), and the (chosen,
    rejected) lengths: random, with every third pair of equal lengths (no tail on either side)."""
    generator = torch.Generator().manual_seed(seed)
    chosen_n, rejected_n = (torch.randint(1, 9, (pairs,), generator=generator) for _ in range(2))
    rejected_n[::3] = chosen_n[::3]
    mask = _completion_mask(torch.cat([chosen_n, rejected_n]))[:, 1:]
    reference = -3 * torch.rand(mask.shape, generator=generator, dtype=torch.float64) * mask
    policy = (reference + 0.5 * torch.randn(mask.shape, generator=generator, dtype=torch.float64)) * mask
    return policy.requires_grad_(True), reference, (chosen_n, rejected_n)


def packed_sequences(per_token: torch.Tensor, lengths, normalize: str = "sum") -> SequenceLogps:
    """The per-token log-probs of TRL's rows as our packed row lists them (chosen_0, rejected_0,
    chosen_1, ...), summed per sequence (``logps`` as ``normalize`` asks), with LD-DPO's tail sums
    (``response_tail_sums``)."""
    counts = torch.stack(lengths, dim=1).flatten()  # [2 * pairs]: chosen_i, rejected_i
    pairs = len(lengths[0])
    rows = torch.stack([torch.arange(pairs), torch.arange(pairs) + pairs], dim=1).flatten()
    token_logps = torch.cat([per_token[row, :n] for row, n in zip(rows.tolist(), counts.tolist())])
    sequence = torch.repeat_interleave(torch.arange(len(counts)), counts)
    sums = token_logps.new_zeros(len(counts)).index_add(0, sequence, token_logps)
    tails = response_tail_sums(token_logps, sequence, counts)
    return SequenceLogps(logps=normalized_logps(sums, counts, normalize), sum_logps=sums, token_counts=counts, tail_logps=tails)


def ours_ld(settings: dict, ld_alpha, policy, reference, lengths):
    """Our (losses, chosen rewards, rejected rewards) of loss ``settings`` with ``ld_alpha``: the
    engine's loss_logps of the policy's sums and tail sums; the reference's sums and tail sums as the
    cache stores them, made LD-DPO's as the store's lookup does (``desensitized_sums``) and
    normalised as the engine's reference_logps does; then the engine's loss."""
    from dpo_dist.config import config_from_dict
    from dpo_dist.engine import loss_logps, weighted_preference_loss

    cfg = config_from_dict({"loss": {"beta": 0.3, "ld_alpha": ld_alpha, **settings}})
    normalize = cfg.loss.logp_normalization
    policy_logps = split_pairs(loss_logps(cfg, packed_sequences(policy, lengths, normalize)))
    ref_sums = split_pairs(packed_sequences(reference, lengths).desensitized_sums(ld_alpha))
    ref_logps = [normalized_logps(sums, n, normalize) for sums, n in zip(ref_sums, lengths)]
    return weighted_preference_loss(cfg, (*policy_logps, *ref_logps), {})


LD_CASES = {
    "sigmoid": {"name": "sigmoid"},
    "sigmoid-js": {"name": "sigmoid", "f_divergence_type": "js_divergence"},
    "bco_pair": {"name": "bco_pair"},
    "ipo-mean": {"name": "ipo", "logp_normalization": "mean"},
}


@pytest.mark.parametrize("case", list(LD_CASES))
@pytest.mark.parametrize("ld_alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_ld_dpo_matches_trl_ld_alpha(case, ld_alpha, seed):
    """loss.ld_alpha against TRL's ld_alpha on the same per-token log-probs (``ours_ld``): TRL's
    precompute pass (compute_ref_log_probs) gives the reference's LD log-probs, its _compute_loss
    the policy's and the loss. Loss, gradients w.r.t. each policy token log-prob and rewards agree
    (IPO's rewards are per token in ours, as without LD). ld_alpha = 1 is plain DPO."""
    settings = LD_CASES[case]
    policy, reference, lengths = per_token_inputs(seed)
    completion_mask = _completion_mask(torch.cat(lengths))
    stand_in = _dpo_stand_in([settings["name"]], 0.3, 0.0, None, 0.05, settings.get("f_divergence_type"))
    stand_in.ld_alpha, stand_in.ref_model = ld_alpha, _token_model(reference)  # a separate reference model (no PEFT)
    with float64_default():
        ref_batch = {"input_ids": completion_mask, "completion_mask": completion_mask}
        ref_chosen, ref_rejected = DPOTrainer.compute_ref_log_probs(stand_in, stand_in.ref_model, ref_batch)
        batch = _batch(completion_mask, ref_chosen, ref_rejected)
        trl_loss = DPOTrainer._compute_loss(stand_in, _token_model(policy), batch, return_outputs=False)
    trl_chosen, trl_rejected = stand_in.accelerator.gathered[:2]
    ours, chosen_rewards, rejected_rewards = ours_ld(settings, ld_alpha, policy, reference, lengths)

    torch.testing.assert_close(ours.mean(), trl_loss, rtol=1e-10, atol=1e-12)
    got, want = (torch.autograd.grad(loss, policy, retain_graph=True)[0] for loss in (ours.mean(), trl_loss))
    # On the completions' tokens: TRL's masks also cover the padding after a completion, where
    # its model's log-probs are the constant 0 (the stand-in's would carry a gradient).
    completion = completion_mask[:, 1:].bool()
    torch.testing.assert_close(got[completion], want[completion], rtol=1e-9, atol=1e-12)
    scale = lengths if settings.get("logp_normalization") == "mean" else (1, 1)
    torch.testing.assert_close(chosen_rewards * scale[0], trl_chosen, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rejected_rewards * scale[1], trl_rejected, rtol=1e-10, atol=1e-12)
    # Some pairs differ in length, so the tails change the loss, unless ld_alpha = 1 (exactly DPO).
    plain = ours_ld(settings, None, policy, reference, lengths)[0]
    assert torch.equal(ours, plain) == (ld_alpha == 1.0)
