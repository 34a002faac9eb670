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
    REFERENCE_FREE_LOSSES,
    preference_loss,
    sft_nll,
)
from tests.unit.tiny_models import packed_batch, random_sequences, tiny_llama

BETAS = [0.05, 0.1, 0.5, 2.0]
EPSILONS = [0.0, 0.1, 0.3]


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """log(1 / (1 + e^-x)) computed in float64 without F.logsigmoid."""
    return -torch.log1p(torch.exp(-x))


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x))


def expected_loss(name, pc, pr, rc, rr, beta, eps=0.0, gamma=0.5):
    """Each paper's per-pair loss, from the brief's formulas, in float64."""
    h = (pc - pr) - (rc - rr)
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
    raise AssertionError(name)


def random_logps(seed: int, pairs: int = 16, scale: float = 20.0) -> list[torch.Tensor]:
    """policy chosen/rejected and reference chosen/rejected log-probs, float64, leaves with grad."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [-scale * torch.rand(pairs, generator=generator, dtype=torch.float64) for _ in range(4)]
    # Keep the policy near the reference, as in training, so every regime (incl. hinge's kink) appears.
    tensors[0] = tensors[2] + torch.randn(pairs, generator=generator, dtype=torch.float64) * 3
    tensors[1] = tensors[3] + torch.randn(pairs, generator=generator, dtype=torch.float64) * 3
    return [t.requires_grad_(True) for t in tensors]


def cases():
    for name in LOSS_NAMES:
        epsilons = EPSILONS if "label_smoothing" in LOSS_OPTIONS[name] else [0.0]
        for beta in BETAS:
            for eps in epsilons:
                yield pytest.param(name, beta, eps, id=f"{name}-beta{beta}-eps{eps}")


@pytest.mark.parametrize("name, beta, eps", list(cases()))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_formula_in_value_and_gradient(name, beta, eps, seed):
    inputs = random_logps(seed)
    options = {"label_smoothing": eps} if "label_smoothing" in LOSS_OPTIONS[name] else {}
    if name == "simpo":
        options["gamma"] = 0.3 + seed * 0.4
    losses, chosen_rewards, rejected_rewards = preference_loss(name, *inputs, beta=beta, **options)
    expected = expected_loss(name, *inputs, beta=beta, eps=eps, gamma=options.get("gamma", 0.5))

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
    # A zero label_smoothing is accepted everywhere, so one config can drive every loss.
    for name in LOSS_NAMES:
        preference_loss(name, pc, pr, rc, rr, beta=0.1, label_smoothing=0.0)
    assert REFERENCE_FREE_LOSSES == MEAN_LOGP_LOSSES == {"simpo"}


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
            "unknown preference loss 'dpo'; valid names: sigmoid, robust, hinge, ipo, kto_pair, simpo",
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
        ("ipo", {"beta": 0.1, "gamma": 1.0}, "loss 'ipo' does not take option gamma=1.0; its options: none"),
        ("simpo", {"beta": 2.0, "gamma": -1.0}, "gamma for loss 'simpo' must be a finite number >= 0"),
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
