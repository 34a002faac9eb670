"""Preference losses against their formulas written out independently, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_dist.attention import enable_packed_attention
from dpo_dist.logprobs import sequence_logps, split_pairs
from dpo_dist.losses import (
    LOSS_NAMES,
    LOSS_OPTIONS,
    MEAN_LOGP_LOSSES,
    PAIR_INPUTS,
    REFERENCE_FREE_LOSSES,
    f_divergence_score,
    preference_loss,
    sft_nll,
    wpo_pair_weights,
)
from tests.unit.tiny_models import packed_batch, random_sequences, tiny_llama

BETAS = [0.05, 0.1, 0.5, 2.0]
EPSILONS = [0.0, 0.1, 0.3]


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """log(1 / (1 + e^-x)) computed in float64 without F.logsigmoid."""
    return -torch.log1p(torch.exp(-x))


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x))


CHOSEN_TOKENS = torch.arange(1, 17)  # rpo's and sft's per-token NLL: chosen lengths 1..16 of 16 pairs


def expected_loss(name, pc, pr, rc, rr, beta, eps=0.0, gamma=0.5, tau=0.05, alpha=1.0):
    """Each paper's per-pair loss, from the brief's formulas, in float64."""
    if rc is None:  # a reference-free loss
        rc = rr = torch.zeros_like(pc)
    h = (pc - pr) - (rc - rr)
    a, b = pc - rc, pr - rr  # per-side log-ratios
    if name == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if name == "robust":
        return ((1 - eps) * -log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if name == "hinge":
        return torch.clamp(1 - beta * h, min=0)
    if name == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if name == "kto_pair":
        kl_chosen = torch.clamp((pc - rc).mean(), min=0).detach()
        kl_rejected = torch.clamp((pr - rr).mean(), min=0).detach()
        chosen = 1 - sigmoid(beta * ((pc - rc) - kl_rejected))
        rejected = 1 - sigmoid(beta * (kl_chosen - (pr - rr)))
        return 0.5 * chosen + 0.5 * rejected
    if name == "simpo":
        margin = beta * pc - beta * pr - gamma
        return -(1 - eps) * log_sigmoid(margin) - eps * log_sigmoid(-margin)
    if name == "exo_pair":  # KL(p || q) of the two-outcome distributions p = (s, 1 - s), q = (1 - eps, eps)
        s = sigmoid(beta * h)
        return s * torch.log(s / (1 - eps)) + (1 - s) * torch.log((1 - s) / eps)
    if name == "nca_pair":
        return -log_sigmoid(beta * a) - 0.5 * log_sigmoid(-beta * a) - 0.5 * log_sigmoid(-beta * b)
    if name == "bco_pair":
        return -log_sigmoid(beta * a) - log_sigmoid(-beta * b)
    if name in ("aot", "aot_unpaired"):  # k-th smallest against k-th smallest
        x, y = ((pc - pr), (rc - rr)) if name == "aot" else (a, b)
        d = beta * (torch.sort(x).values - torch.sort(y).values)
        return -(1 - eps) * log_sigmoid(d) - eps * log_sigmoid(-d)
    if name == "sppo_hard":
        return (a - 1 / (2 * beta)) ** 2 + (b + 1 / (2 * beta)) ** 2
    if name == "apo_zero":
        return (1 - sigmoid(beta * a)) + sigmoid(beta * b)
    if name == "apo_down":
        return sigmoid(beta * a) + (1 - sigmoid(beta * (a - b)))
    if name == "discopop":
        mix = sigmoid(beta * h / tau)
        return -log_sigmoid(beta * h) * (1 - mix) + torch.exp(-beta * h) * mix
    if name == "orpo":  # P = exp(mean log-prob), odds = P / (1 - P)
        p_c, p_r = torch.exp(pc), torch.exp(pr)
        return -beta * log_sigmoid(torch.log((p_c / (1 - p_c)) / (p_r / (1 - p_r))))
    if name == "cpo":
        margin = beta * (pc - pr)
        return -(1 - eps) * log_sigmoid(margin) - eps * log_sigmoid(-margin)
    nll = -pc / CHOSEN_TOKENS[: len(pc)]
    if name == "rpo":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) + alpha * nll
    if name == "sft":
        return nll
    raise AssertionError(name)


def random_logps(seed: int, pairs: int = 16, scale: float = 20.0) -> list[torch.Tensor]:
    """policy chosen/rejected and reference chosen/rejected log-probs, float64, leaves with grad."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [-scale * torch.rand(pairs, generator=generator, dtype=torch.float64) for _ in range(4)]
    # Keep the policy near the reference, as in training, so every regime (incl. hinge's kink) appears.
    tensors[0] = tensors[2] + torch.randn(pairs, generator=generator, dtype=torch.float64) * 3
    tensors[1] = tensors[3] + torch.randn(pairs, generator=generator, dtype=torch.float64) * 3
    return [t.requires_grad_(True) for t in tensors]


def pair_inputs(name: str, pairs: int = 16) -> dict:
    return {"chosen_tokens": CHOSEN_TOKENS[:pairs]} if name in PAIR_INPUTS else {}


def cases():
    for name in LOSS_NAMES:
        epsilons = EPSILONS if "label_smoothing" in LOSS_OPTIONS[name] else [0.0]
        if name == "exo_pair":  # its target (1 - eps, eps) needs eps > 0
            epsilons = [1e-3, 0.1, 0.3]
        for beta in BETAS:
            for eps in epsilons:
                yield pytest.param(name, beta, eps, id=f"{name}-beta{beta}-eps{eps}")


@pytest.mark.parametrize("name, beta, eps", list(cases()))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_formula_in_value_and_gradient(name, beta, eps, seed):
    inputs = random_logps(seed)
    if name == "orpo":  # mean log-probs are < 0 (ORPO's odds need P < 1)
        inputs = [(-(t.detach().abs() + 1e-3) / 4).requires_grad_(True) for t in inputs]
    options = {"label_smoothing": eps} if "label_smoothing" in LOSS_OPTIONS[name] else {}
    if name == "simpo":
        options["gamma"] = 0.3 + seed * 0.4
    if name == "discopop":
        options["discopop_tau"] = 0.05 * (1 + seed)
    if name == "rpo":
        options["alpha"] = 0.5 * seed
    losses, chosen_rewards, rejected_rewards = preference_loss(name, *inputs, beta=beta, **options, **pair_inputs(name))
    expected = expected_loss(
        name, *inputs, beta=beta, eps=eps, gamma=options.get("gamma", 0.5), tau=options.get("discopop_tau", 0.05),
        alpha=options.get("alpha", 1.0),
    )

    assert losses.shape == (16,)
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)
    weights = torch.linspace(0.5, 1.5, 16, dtype=torch.float64)
    got_grads = torch.autograd.grad((losses * weights).sum(), inputs, allow_unused=True)
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs, allow_unused=True)
    for got, want in zip(got_grads, expected_grads):
        if want is None:  # the reference side of a reference-free loss
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)

    pc, pr, rc, rr = (t.detach() for t in inputs)
    if name in REFERENCE_FREE_LOSSES:
        want_chosen, want_rejected = beta * pc, beta * pr
    else:
        want_chosen, want_rejected = beta * (pc - rc), beta * (pr - rr)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    torch.testing.assert_close(chosen_rewards, want_chosen)
    torch.testing.assert_close(rejected_rewards, want_rejected)


def test_defaults_and_special_values():
    pc, pr, rc, rr = (t.detach() for t in random_logps(5))
    for name in ("sigmoid", "robust"):
        at_zero = preference_loss(name, pc, pr, rc, rr, beta=0.1)[0]
        torch.testing.assert_close(at_zero, expected_loss("sigmoid", pc, pr, rc, rr, beta=0.1))
    torch.testing.assert_close(
        preference_loss("simpo", pc, pr, None, None, beta=2.0)[0],
        expected_loss("simpo", pc, pr, rc, rr, beta=2.0, gamma=0.5),
    )
    # A zero label_smoothing is accepted everywhere (but by EXO, whose target needs eps > 0), so
    # one config can drive every other loss.
    for name in set(LOSS_NAMES) - {"exo_pair"}:
        ref = (None, None) if name in REFERENCE_FREE_LOSSES else (rc, rr)
        options = {"kl_baselines": torch.tensor([0.1, 0.2])} if name == "kto_pair" else pair_inputs(name)
        smoothed = preference_loss(name, pc, pr, *ref, beta=0.1, label_smoothing=0.0, **options)
        plain = preference_loss(name, pc, pr, *ref, beta=0.1, **options)
        for got, want in zip(smoothed, plain):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert REFERENCE_FREE_LOSSES == {"simpo", "orpo", "cpo", "sft"} and MEAN_LOGP_LOSSES == {"simpo", "orpo"}


def test_values_where_policy_equals_reference():
    """logits = 0 and both log-ratios 0: each loss's value there follows from its formula by hand."""
    zero = torch.zeros(3, dtype=torch.float64)
    beta, eps, ln2 = 0.1, 1e-3, math.log(2)
    at_zero = {
        "exo_pair": 0.5 * math.log(0.5 / (1 - eps)) + 0.5 * math.log(0.5 / eps),
        "nca_pair": 2 * ln2,
        "bco_pair": 2 * ln2,
        "sppo_hard": 2 * (1 / (2 * beta)) ** 2,
        "apo_zero": 1.0,
        "apo_down": 1.0,
        "discopop": 0.5 * ln2 + 0.5,
    }
    for name, value in at_zero.items():
        losses = preference_loss(name, zero, zero, zero, zero, beta=beta)[0]
        torch.testing.assert_close(losses, torch.full_like(losses, value), msg=name)


def grads(name, chosen_ratio, rejected_ratio):
    """d loss / d policy_chosen and d policy_rejected at the given log-ratios (reference at 0).
    ORPO's mean log-probs are taken 1 nat lower: at 0 a response is certain (infinite odds)."""
    if name == "orpo":
        chosen_ratio, rejected_ratio = chosen_ratio - 1, rejected_ratio - 1
    pc = torch.tensor([chosen_ratio], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([rejected_ratio], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    losses = preference_loss(name, pc, pr, zero, zero, beta=0.1, **pair_inputs(name, 1))[0]
    return [g.item() for g in torch.autograd.grad(losses.sum(), (pc, pr))]


def test_losses_point_the_gradient_the_way_their_papers_say():
    """Gradient descent at policy = reference raises the chosen log-prob and lowers the rejected one,
    except APO-down: its two chosen terms cancel there; once the rejected answer is well below
    (margin 50, beta 0.1) it lowers the chosen log-prob too, for answers worse than the model's.
    DiscoPOP is non-convex where its mix switches: within a few tau of margin 0 its exponential part
    (1 at 0, above the logistic ln 2) takes over as the margin grows, so there it pushes the margin
    down; from beta * margin = +-1 on it pushes the margin up like the others."""
    for name in set(LOSS_NAMES) - {"apo_down", "discopop", "sft"}:  # sft: see test_rpo_and_sft_...
        grad_chosen, grad_rejected = grads(name, 0.0, 0.0)
        assert grad_chosen < 0 < grad_rejected, name
    for margin in (-10.0, 10.0):
        grad_chosen, grad_rejected = grads("discopop", margin / 2, -margin / 2)
        assert grad_chosen < 0 < grad_rejected, margin
    grad_chosen, grad_rejected = grads("discopop", 0.0, 0.0)
    assert grad_chosen > 0 > grad_rejected
    assert grads("apo_down", 0.0, 0.0)[0] == 0 < grads("apo_down", 0.0, 0.0)[1]
    grad_chosen, grad_rejected = grads("apo_down", 0.0, -50.0)
    assert grad_chosen > 0 and grad_rejected > 0
    grad_chosen, grad_rejected = grads("apo_zero", 0.0, -50.0)
    assert grad_chosen < 0 < grad_rejected


def test_discopop_stays_finite_where_its_exponential_overflows():
    """At a margin of -500 exp(-margin) is inf in float32; the mix weight there is 0, so the loss is
    the logistic part (500) and its gradient that of -logsigmoid."""
    pc = torch.tensor([-5000.0], requires_grad=True)
    zero = torch.zeros(1)
    loss = preference_loss("discopop", pc, zero, zero, zero, beta=0.1)[0]
    (grad,) = torch.autograd.grad(loss.sum(), pc)
    torch.testing.assert_close(loss, torch.tensor([500.0]))
    torch.testing.assert_close(grad, torch.tensor([-0.1]))


def test_orpo_stays_finite_for_a_response_the_policy_is_certain_of():
    """A mean log-prob of 0 (every token certain; float32 rounds near-certain ones there) has
    infinite odds: the loss stays finite, its gradient too, and equals the loss at -1e-6."""
    pc = torch.tensor([0.0, -1e-9, -0.5], requires_grad=True)
    pr = torch.tensor([-1.0, -1.0, -1.0], requires_grad=True)
    loss = preference_loss("orpo", pc, pr, None, None, beta=0.1)[0]
    grad_c, grad_r = torch.autograd.grad(loss.sum(), (pc, pr))
    assert torch.isfinite(loss).all() and torch.isfinite(grad_c).all() and torch.isfinite(grad_r).all()
    capped = preference_loss("orpo", torch.tensor([-1e-6]), pr[:1].detach(), None, None, beta=0.1)[0]
    torch.testing.assert_close(loss[:2].detach(), capped.expand(2))
    assert grad_c[2] < 0 < grad_r[2]
    # In float32 (the engine's log-probs), 1 - exp(x) near x = 0 loses most digits to cancellation
    # unless computed as -expm1(x): near-certain responses must still match the float64 formula.
    near = torch.tensor([-2e-6, -1e-5, -3e-4])
    other = torch.full_like(near, -2.0)
    got = preference_loss("orpo", near, other, None, None, beta=1.0)[0]
    want = expected_loss("orpo", near.double(), other.double(), None, None, beta=1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    # torch.where back-propagates through both branches: each must stay finite where it is unused.
    from dpo_dist.losses import _log1mexp

    x = torch.tensor([-1e-9, -0.5, -0.9, -30.0], requires_grad=True)
    (grad,) = torch.autograd.grad(_log1mexp(x).sum(), x)
    torch.testing.assert_close(_log1mexp(x.detach().double()), torch.log(-torch.expm1(x.detach().double())))
    assert torch.isfinite(grad).all(), grad
    # bf16 log-probs from a direct caller: computed in float32 (as TRL does), no nan gradients.
    for dtype in (torch.bfloat16, torch.float16):
        half = torch.tensor([-5e-4, -2e-6, -0.5], dtype=dtype, requires_grad=True)
        loss = preference_loss("orpo", half, torch.full((3,), -2.0, dtype=dtype), None, None, beta=0.1)[0]
        (grad,) = torch.autograd.grad(loss.sum(), half)
        assert loss.dtype == torch.float32 and torch.isfinite(grad).all(), (dtype, grad)


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_aot_with_rank_partners_from_the_whole_batch_splits_into_any_parts(name):
    """aot sorts the batch: parts sorted on their own give another loss, while each part given its
    pairs' rank partners in the whole batch (aot_targets_for) sums to the whole batch's loss, with
    its gradients; extra +inf entries (the engine's padding) change no partner."""
    from dpo_dist.losses import aot_sort_keys, aot_targets_for

    inputs = random_logps(11, pairs=10)
    whole = preference_loss(name, *inputs, beta=0.3, label_smoothing=0.1)[0].sum()
    want = torch.autograd.grad(whole, inputs[:2])
    keys = aot_sort_keys(name, *inputs)
    padded = torch.cat([keys, torch.full((2, 3), math.inf, dtype=keys.dtype)], dim=1)
    targets = aot_targets_for(name, padded)[..., :10]
    assert torch.isfinite(targets).all() and torch.equal(targets, aot_targets_for(name, keys))
    parts = (slice(0, 3), slice(3, 4), slice(4, 10))
    split = sum(
        preference_loss(name, *(t[p] for t in inputs), beta=0.3, label_smoothing=0.1, aot_targets=targets[..., p])[0].sum()
        for p in parts
    )
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-12)
    for got, expected in zip(torch.autograd.grad(split, inputs[:2]), want):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    own = sum(preference_loss(name, *(t[p] for t in inputs), beta=0.3)[0].sum() for p in parts)
    assert abs(own.item() - preference_loss(name, *inputs, beta=0.3)[0].sum().item()) > 1e-3


def test_rpo_and_sft_need_the_chosen_token_counts_and_are_what_the_engine_computes():
    """rpo = sigmoid + alpha * sft_nll, the sum the engine forms for loss=rpo; sft is the NLL alone,
    reaching only the chosen log-probs. Both refuse to guess the lengths of summed log-probs."""
    pc, pr, rc, rr = random_logps(7, pairs=4)
    tokens = torch.tensor([3, 1, 8, 5])
    rpo = preference_loss("rpo", pc, pr, rc, rr, beta=0.1, alpha=0.7, chosen_tokens=tokens)[0]
    engine = preference_loss("sigmoid", pc, pr, rc, rr, beta=0.1)[0] + 0.7 * sft_nll(pc, tokens)
    torch.testing.assert_close(rpo, engine, rtol=0, atol=0)
    sft, chosen_rewards, _ = preference_loss("sft", pc, pr, None, None, beta=0.1, chosen_tokens=tokens)
    torch.testing.assert_close(sft, -pc / tokens)
    assert torch.autograd.grad(sft.sum(), (pc, pr), allow_unused=True)[1] is None
    torch.testing.assert_close(chosen_rewards, 0.1 * pc.detach())
    for name in ("rpo", "sft"):
        with pytest.raises(ValueError, match=f"loss '{name}' needs chosen_tokens="):
            preference_loss(name, pc, pr, rc, rr, beta=0.1)
        with pytest.raises(ValueError, match=r"chosen_tokens must have the log-probs' shape \[pairs\], got \(3,\)"):
            preference_loss(name, pc, pr, rc, rr, beta=0.1, chosen_tokens=tokens[:3])
    with pytest.raises(ValueError, match="alpha for loss 'rpo' must be a finite number >= 0"):
        preference_loss("rpo", pc, pr, rc, rr, beta=0.1, alpha=-1.0, chosen_tokens=tokens)


def test_sft_nll_is_mean_token_nll_of_chosen():
    sums = torch.tensor([-12.0, -3.0, -7.5], requires_grad=True)
    counts = torch.tensor([4, 1, 3])
    nll = sft_nll(sums, counts)
    torch.testing.assert_close(nll, torch.tensor([3.0, 3.0, 2.5]))
    (grad,) = torch.autograd.grad(nll.sum(), sums)
    torch.testing.assert_close(grad, torch.tensor([-1 / 4, -1.0, -1 / 3]))
    torch.testing.assert_close(sft_nll(torch.zeros(1), torch.zeros(1, dtype=torch.long)), torch.zeros(1))


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        (
            "dpo",
            {"beta": 0.1},
            "unknown preference loss 'dpo'; valid names: sigmoid, robust, hinge, ipo, kto_pair, simpo, exo_pair, "
            "nca_pair, bco_pair, aot, aot_unpaired, sppo_hard, apo_zero, apo_down, discopop, orpo, cpo, rpo, sft",
        ),
        ("sigmoid", {"beta": 0.0}, "beta must be a finite number > 0, got 0.0"),
        ("ipo", {"beta": -0.1}, "beta must be a finite number > 0"),
        ("sigmoid", {"beta": float("nan")}, "beta must be a finite number > 0"),
        ("sigmoid", {"beta": torch.tensor(0.1)}, "beta must be a finite number > 0"),
        (
            "robust",
            {"beta": 0.1, "label_smoothing": 0.5},
            r"label_smoothing for loss 'robust' must be in \[0, 0.5\)",
        ),
        ("robust", {"beta": 0.1, "label_smoothing": -0.1}, "label_smoothing for loss 'robust'"),
        ("sigmoid", {"beta": 0.1, "label_smoothing": 0.7}, r"must be in \[0, 0.5\], got 0.7"),
        (
            "hinge",
            {"beta": 0.1, "label_smoothing": 0.1},
            "loss 'hinge' does not take option label_smoothing=0.1",
        ),
        ("nca_pair", {"beta": 0.1, "gamma": 1.0}, "loss 'nca_pair' does not take option gamma=1.0; its options: none"),
        ("simpo", {"beta": 2.0, "gamma": -1.0}, "gamma for loss 'simpo' must be a finite number >= 0"),
        ("exo_pair", {"beta": 0.1, "label_smoothing": 0.0}, r"label_smoothing for loss 'exo_pair' must be in \(0, 0.5\)"),
        ("discopop", {"beta": 0.1, "discopop_tau": 0.0}, "discopop_tau for loss 'discopop' must be a finite number > 0"),
    ],
)
def test_invalid_names_and_options_raise(name, kwargs, message):
    inputs = [t.detach() for t in random_logps(0)]
    with pytest.raises(ValueError, match=message):
        preference_loss(name, *inputs, **kwargs)


def test_invalid_shapes_and_missing_reference_raise():
    pc, pr, rc, rr = (t.detach() for t in random_logps(0))
    with pytest.raises(ValueError, match="loss 'sigmoid' needs reference log-probs"):
        preference_loss("sigmoid", pc, pr, None, None, beta=0.1)
    with pytest.raises(ValueError, match=r"1-D log-prob tensors of one shape \[pairs\]"):
        preference_loss("sigmoid", pc, pr[:-1], rc, rr, beta=0.1)
    with pytest.raises(ValueError, match=r"1-D log-prob tensors of one shape \[pairs\]"):
        preference_loss("ipo", pc[None], pr[None], rc[None], rr[None], beta=0.1)


def test_step_zero_sigmoid_loss_is_ln2_on_a_real_packed_batch():
    """Policy == reference at step 0: every pair's DPO loss is ln 2 and both rewards are 0."""
    model = tiny_llama()
    enable_packed_attention(model, "auto")
    batch = packed_batch(random_sequences([7, 12, 9, 15, 20, 6]))
    policy = sequence_logps(model, batch, chunk_tokens=8)
    with torch.no_grad():
        reference = sequence_logps(model, batch, chunk_tokens=8)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        "sigmoid", *split_pairs(policy.logps), *split_pairs(reference.logps), beta=0.1
    )
    assert losses.shape == (batch.num_pairs,)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)), rtol=0, atol=1e-6)
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0
    losses.mean().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_kto_pair_takes_kl_baselines_from_a_larger_batch():
    """The engine passes kto_pair the clamped mean log-ratios of the whole step; without them the
    pairs passed in are the batch. They are statistics, not loss.* settings."""
    from dpo_dist.losses import BATCH_STATISTICS, LOSS_OPTIONS, kl_ratio_sums

    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, dtype=torch.float64) * 5 for _ in range(4))
    beta = 0.3
    whole, _, _ = preference_loss("kto_pair", pc, pr, rc, rr, beta=beta)
    sums = kl_ratio_sums(pc, pr, rc, rr)
    baselines = (sums / 6).clamp(min=0)
    halves = [preference_loss("kto_pair", pc[i], pr[i], rc[i], rr[i], beta=beta, kl_baselines=baselines)[0]
              for i in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=0)  # split, same values
    own = preference_loss("kto_pair", pc[:3], pr[:3], rc[:3], rr[:3], beta=beta)[0]
    assert not torch.allclose(own, whole[:3])  # the half's own baselines differ
    kl_c, kl_r = baselines.tolist()
    want = 0.5 * (1 - torch.sigmoid(beta * ((pc - rc) - kl_r))) + 0.5 * (1 - torch.sigmoid(beta * (kl_c - (pr - rr))))
    torch.testing.assert_close(whole, want)
    assert LOSS_OPTIONS["kto_pair"] == {} and BATCH_STATISTICS["kto_pair"] == ("kl_baselines",)


def test_kto_pair_baselines_and_wpo_weights_pass_no_gradient():
    """kto_pair's KL reference points are detached (the paper; TRL's KTOTrainer), also when the
    caller's baselines carry a graph; WPO's weights are detached too: they scale a pair's
    gradient, they are not optimised."""
    pc, pr, rc, rr = random_logps(4, pairs=6)
    baselines = torch.stack([(pc - rc).mean(), (pr - rr).mean()])
    with_graph = preference_loss("kto_pair", pc, pr, rc, rr, beta=0.3, kl_baselines=baselines)[0]
    detached = preference_loss("kto_pair", pc, pr, rc, rr, beta=0.3, kl_baselines=baselines.detach())[0]
    for got, want in zip(torch.autograd.grad(with_graph.sum(), (pc, pr)), torch.autograd.grad(detached.sum(), (pc, pr))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    weights = wpo_pair_weights(pc / 10, pr / 10)
    assert not weights.requires_grad
    torch.testing.assert_close(weights, torch.exp((pc + pr).detach() / 10))


def _f_divergence_inputs():
    torch.manual_seed(3)
    return [torch.randn(16, dtype=torch.float64) * 2 for _ in range(4)]


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "rpo"])
def test_f_divergence_scores_are_the_papers_f_prime(name):
    """f-DPO replaces each side's log-ratio log u by f'(u): forward KL 1 - 1/u, JS log(2u/(1+u)),
    alpha (1 - u^-alpha)/alpha; the loss is the plain one of the scores' margin, written out here
    by feeding the scores as 'policy' log-probs against a zero reference."""
    pc, pr, rc, rr = _f_divergence_inputs()
    u_c, u_r = torch.exp(pc - rc), torch.exp(pr - rr)
    f_primes = {
        "forward_kl": lambda u: 1 - 1 / u,
        "js_divergence": lambda u: torch.log(2 * u / (1 + u)),
        "alpha_divergence": lambda u: (1 - u**-0.3) / 0.3,
    }
    extra = {"chosen_tokens": CHOSEN_TOKENS} if name == "rpo" else {}
    zeros = torch.zeros(16, dtype=torch.float64)
    for divergence, f_prime in f_primes.items():
        got = preference_loss(name, pc, pr, rc, rr, beta=0.5, f_divergence_type=divergence, f_alpha_divergence_coef=0.3, **extra)[0]
        # Rewritten as reverse KL on the scores (rpo's NLL term reads the policy log-probs themselves).
        want = preference_loss(name, f_prime(u_c), f_prime(u_r), zeros, zeros, beta=0.5, **extra)[0]
        if name == "rpo":
            want = want - sft_nll(f_prime(u_c), CHOSEN_TOKENS) + sft_nll(pc, CHOSEN_TOKENS)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        # The score itself, not only its margin (where a constant offset would cancel).
        torch.testing.assert_close(f_divergence_score(pc - rc, divergence, 0.3), f_prime(u_c), rtol=1e-12, atol=1e-12)


def test_alpha_divergence_lies_between_reverse_and_forward_kl():
    inputs = _f_divergence_inputs()

    def loss(divergence, alpha=0.5):
        return preference_loss("sigmoid", *inputs, beta=0.1, f_divergence_type=divergence, f_alpha_divergence_coef=alpha)[0]

    torch.testing.assert_close(loss("alpha_divergence", 1e-7), loss("reverse_kl"), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss("alpha_divergence", 1 - 1e-7), loss("forward_kl"), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("divergence", ["forward_kl", "alpha_divergence"])
def test_f_divergence_stays_finite_at_extreme_log_ratios(divergence):
    """A response the policy has pushed far below the reference (log u = -500) overflows exp(-log u):
    the exponent is capped, so the loss and its gradients stay finite."""
    pc = torch.tensor([-600.0, -10.0], requires_grad=True)
    pr = torch.tensor([-10.0, -600.0], requires_grad=True)
    ref = torch.tensor([-100.0, -100.0])
    losses = preference_loss("sigmoid", pc, pr, ref, ref, beta=0.1, f_divergence_type=divergence)[0]
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert losses[0] > 1e30 and losses[1] == 0  # chosen crushed: a huge loss; rejected crushed: none


def test_f_divergence_only_for_margin_losses():
    inputs = _f_divergence_inputs()
    with pytest.raises(ValueError, match="does not take option f_divergence_type='js_divergence'"):
        preference_loss("bco_pair", *inputs, beta=0.1, f_divergence_type="js_divergence")
    plain = preference_loss("bco_pair", *inputs, beta=0.1)[0]  # the default is accepted by every loss
    torch.testing.assert_close(preference_loss("bco_pair", *inputs, beta=0.1, f_divergence_type="reverse_kl")[0], plain)
    with pytest.raises(ValueError, match="must be one of reverse_kl"):
        preference_loss("sigmoid", *inputs, beta=0.1, f_divergence_type="chi2")
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        preference_loss("sigmoid", *inputs, beta=0.1, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.0)


@pytest.mark.parametrize("alpha", [1e-2, 1e-4, 1e-6])
def test_alpha_divergence_score_is_accurate_in_float32_for_small_alpha(alpha):
    """(1 - u^-alpha) / alpha cancels in float32 when alpha * log u is tiny (1 - exp(-1e-9) == 0):
    the score of a log-ratio of 1e-3 at alpha 1e-6 would be 0 instead of ~1e-3."""
    log_ratio = torch.tensor([1e-3, -0.5, 2.0, -30.0])
    got = f_divergence_score(log_ratio, "alpha_divergence", alpha)
    want = f_divergence_score(log_ratio.double(), "alpha_divergence", alpha)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
