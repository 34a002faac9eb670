"""Preference losses: pure functions of per-pair sequence log-probabilities.

Public API:

- ``preference_loss(name, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
  ref_rejected_logps, *, beta, **options) -> (losses, chosen_rewards, rejected_rewards)``,
  all tensors of shape [pairs]. ``losses`` are per pair (the engine reduces them); rewards are
  ``beta * (policy - reference)`` per side (``beta * policy`` for reference-free losses), detached.
- ``LOSS_NAMES``: the valid ``name`` values: sigmoid, robust, hinge, ipo, kto_pair, simpo, exo_pair,
  nca_pair, bco_pair, aot, aot_unpaired, sppo_hard, apo_zero, apo_down, discopop (the names TRL's
  ``loss_type`` uses), orpo and cpo (TRL's ORPOTrainer and CPOTrainer), rpo (sigmoid + alpha * NLL)
  and sft (the NLL alone; both take ``chosen_tokens``). TRL's ``sigmoid_norm`` is sigmoid on
  per-token means (``loss.logp_normalization=mean``).
- ``LOSS_OPTIONS``: name -> the ``options`` that loss accepts (with their defaults).
- ``F_DIVERGENCE_LOSSES``: the margin losses that take f-DPO's ``f_divergence_type`` and
  ``f_alpha_divergence_coef`` (``f_divergence_score``): each side's log-ratio becomes f' of it.
- ``BATCH_STATISTICS``: name -> options that are statistics of a larger batch (kto_pair's
  ``kl_baselines``, computed by the caller with ``kl_ratio_sums`` over that batch; aot's and
  aot_unpaired's ``aot_targets``, with ``aot_sort_keys`` and ``aot_targets_for``).
- ``PAIR_INPUTS``: name -> required per-pair data (rpo's and sft's ``chosen_tokens``).
- ``REFERENCE_FREE_LOSSES``: losses that ignore the reference (the ref arguments may be None).
- ``MEAN_LOGP_LOSSES``: losses defined on length-normalized (mean per-token) log-probs; the config
  forces ``loss.logp_normalization=mean`` for them. Every other loss expects summed log-probs.
- ``wpo_pair_weights(chosen_aligned_logps, rejected_aligned_logps) -> [pairs]``: WPO's per-pair
  weights of the preference loss (``loss.use_weighting``).
- ``sft_nll(chosen_sum_logps, chosen_token_counts) -> [pairs]``: the per-token NLL of each chosen
  response, the SFT term of RPO (Pang et al. 2024, arXiv 2404.19733, the NLL term of the DPO+NLL
  loss, Sec. 2), of ORPO and of CPO; the engine adds ``alpha * sft_nll(...)`` to the preference
  losses (``loss.alpha``, 1.0 in conf/loss/rpo.yaml, orpo.yaml and cpo.yaml).

Notation: with summed response log-probs pi_c, pi_r (policy) and ref_c, ref_r (reference), ``logits
= (pi_c - pi_r) - (ref_c - ref_r)`` and the per-side log-ratios ``pi_c - ref_c``, ``pi_r - ref_r``.
Options, named as the ``loss.*`` config fields that feed them: ``label_smoothing`` (eps, the assumed
label-flip rate) for sigmoid, robust, simpo, aot and aot_unpaired, and EXO's target (1 - eps, eps),
which needs eps > 0; ``gamma`` (the absolute target reward margin, default 0.5 like ``loss.gamma``;
TRL CPOTrainer's ``simpo_gamma`` is the same number, the SimPO repository's ``gamma_beta_ratio`` is
``gamma / beta``) for simpo; ``discopop_tau`` for discopop; ``label_smoothing`` for rpo and cpo too;
``alpha`` (default 1.0) for rpo, whose NLL term is part of the loss, while for orpo and cpo the
caller adds ``alpha * sft_nll(...)`` (the engine does). A ``label_smoothing`` of 0 is accepted by
every other loss so that one config can drive them all.

Against TRL 1.16's own loss code (tests/unit/test_losses_vs_trl.py, float64): values, gradients and
rewards agree to rounding for sigmoid, robust, hinge, exo_pair, nca_pair, bco_pair, sppo_hard,
apo_zero, apo_down and discopop (DPOTrainer), simpo and cpo (CPOTrainer) and orpo (ORPOTrainer); for
aot and aot_unpaired the batch mean and its gradients do (a per-pair term is its rank's, not its
own). TRL sorts aot's terms within each device's micro-batch; the engine passes ``aot_targets`` from
the whole optimizer step on all ranks, as it does kto_pair's baselines. Where TRL differs, ours
follows the paper: TRL's DPOTrainer "sigmoid" ignores label_smoothing (ours is cDPO, as TRL's
CPOTrainer computes it); TRL's IPO length-normalises inside the loss (ours is fed per-token means by
conf/loss/ipo.yaml, the same loss); TRL's RPO, ORPO and CPO NLL is one token-level mean over the
batch (ours, ``sft_nll``, is per response, RPO eq. 1), and TRL's ORPO NLL also scores the prompt
tokens (ORPO eq. 6 scores the response given the prompt, as ours does); TRL's DiscoPOP overflows to
nan at very negative margins; kto_pair is not in TRL 1.x.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


class _Pairs(NamedTuple):
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    score: Callable[[torch.Tensor], torch.Tensor] | None = None
    """f-DPO's f' of a side's log-ratio (``f_divergence_score``); None: the log-ratio itself (DPO)."""

    def logits(self) -> torch.Tensor:
        if self.score is not None:
            return self.score(self.chosen_ratio()) - self.score(self.rejected_ratio())
        return (self.policy_chosen - self.policy_rejected) - (self.ref_chosen - self.ref_rejected)

    def chosen_ratio(self) -> torch.Tensor:
        return self.policy_chosen - self.ref_chosen

    def rejected_ratio(self) -> torch.Tensor:
        return self.policy_rejected - self.ref_rejected


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# exp() arguments are capped here (TRL caps its alpha-divergence's the same way): an extreme
# log-ratio then gives a huge finite score instead of inf, and inf - inf = nan in the margin. Past
# the cap the score is constant (no gradient), and a loss that squares it (ipo) can still overflow
# float32 from a summed log-ratio of about -44 on: forward KL's f'(u) = 1 - 1/u grows as 1/u.
_MAX_EXPONENT = 80.0


def f_divergence_score(log_ratio: torch.Tensor, f_divergence_type: str, alpha: float) -> torch.Tensor:
    """f-DPO, Wang et al. 2023 (arXiv 2309.16240): DPO's margin with each side's log-ratio log u
    (u = pi / pi_ref) replaced by f'(u) of the divergence that regularises the policy. reverse_kl:
    log u (DPO itself); forward_kl: 1 - 1/u; js_divergence: log(2u / (1 + u)); alpha_divergence:
    (1 - u^-alpha) / alpha, alpha in (0, 1), reverse_kl as alpha -> 0 and forward_kl as alpha -> 1.

    TRL 1.16's code computes (u^(c-1) - 1) / (c - 1) for its f_alpha_divergence_coef c, which is
    this with alpha = 1 - c (its docstring names u^-alpha, as here); both agree at its default 0.5."""
    if f_divergence_type == "reverse_kl":
        return log_ratio
    if f_divergence_type == "forward_kl":
        return -torch.expm1((-log_ratio).clamp(max=_MAX_EXPONENT))
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if f_divergence_type == "alpha_divergence":
        # expm1: 1 - exp(x) cancels to 0 in float32 for |x| below ~1e-7 (small alpha or log-ratio).
        return -torch.expm1((-alpha * log_ratio).clamp(max=_MAX_EXPONENT)) / alpha
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; valid: {', '.join(F_DIVERGENCES)}")


def _smoothed_logistic(margin: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)


def _sigmoid(pairs: _Pairs, beta: float, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO, Rafailov et al. 2023 (arXiv 2305.18290) eq. 7; eps > 0 is cDPO (Mitchell 2023, cdpo.pdf eq. 3).

    TRL 1.16's DPOTrainer reads label_smoothing only for robust/EXO/aot: its "sigmoid" stays plain
    DPO at any eps. Ours keeps cDPO, which TRL's CPOTrainer (and its older DPOTrainer) compute."""
    return _smoothed_logistic(beta * pairs.logits(), label_smoothing)


def _robust(pairs: _Pairs, beta: float, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """rDPO, Chowdhury et al. 2024 (arXiv 2403.00409), the de-biased loss of Sec. 3 with flip rate eps."""
    margin, eps = beta * pairs.logits(), label_smoothing
    return ((1 - eps) * -F.logsigmoid(margin) + eps * F.logsigmoid(-margin)) / (1 - 2 * eps)


def _hinge(pairs: _Pairs, beta: float) -> torch.Tensor:
    """SLiC-HF, Zhao et al. 2023 (arXiv 2305.10425) eq. 1 on reference-normalized log-ratios, margin 1/beta."""
    return torch.relu(1 - beta * pairs.logits())


def _ipo(pairs: _Pairs, beta: float) -> torch.Tensor:
    """IPO, Azar et al. 2023 (arXiv 2310.12036) eq. 17, with beta as tau, on the log-probs given.

    TRL divides each side's log-ratio by its completion length inside its IPO; here the engine does
    that when loss.logp_normalization=mean, as conf/loss/ipo.yaml sets, which gives TRL's loss."""
    return (pairs.logits() - 1 / (2 * beta)) ** 2


def _kto_pair(pairs: _Pairs, beta: float, *, kl_baselines: torch.Tensor | None = None) -> torch.Tensor:
    """KTO, Ethayarajh et al. 2024 (arXiv 2402.01306) eq. 7, paired form with batch KL baselines as TRL's kto_pair.

    The KL reference points z_ref are the clamped mean log-ratios (chosen, rejected) of the batch,
    detached: the paper does not back-propagate through z_ref, nor does TRL's KTOTrainer (kl =
    (...).mean().detach()); TRL's older kto_pair (gone in 1.16) let gradients flow through them.
    ``kl_baselines`` ([2]: chosen, rejected) supplies them from a larger batch: the engine passes
    the means over the whole optimizer step on all ranks, so that the loss does not depend on how
    the step is split into micro-batches and ranks; without it, the pairs passed in are the batch."""
    chosen_ratio, rejected_ratio = pairs.chosen_ratio(), pairs.rejected_ratio()
    if kl_baselines is None:
        kl_baselines = kl_ratio_sums(pairs.policy_chosen, pairs.policy_rejected, pairs.ref_chosen, pairs.ref_rejected)
        kl_baselines = (kl_baselines / len(chosen_ratio)).clamp(min=0)
    chosen_kl, rejected_kl = kl_baselines.detach().to(chosen_ratio.dtype).unbind()
    chosen_loss = 1 - torch.sigmoid(beta * (chosen_ratio - rejected_kl))
    rejected_loss = 1 - torch.sigmoid(beta * (chosen_kl - rejected_ratio))
    return (chosen_loss + rejected_loss) / 2


def kl_ratio_sums(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """[2] summed (chosen, rejected) log-ratios policy - reference, detached: what kto_pair's KL
    baselines average (sum them over a batch, divide by its pairs, clamp at 0)."""
    with torch.no_grad():
        return torch.stack([(policy_chosen - ref_chosen).sum(), (policy_rejected - ref_rejected).sum()])


def _simpo(pairs: _Pairs, beta: float, *, gamma: float = 0.5, label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO, Meng et al. 2024 (arXiv 2405.14734) eq. 6 on mean log-probs; gamma is the absolute margin.

    Equal to TRL CPOTrainer's loss_type="simpo" with simpo_gamma=gamma (its margin gamma / beta inside
    beta * (...)); SimPO has no NLL term, so compare with cpo_alpha=0 there."""
    margin = beta * (pairs.policy_chosen - pairs.policy_rejected) - gamma
    return _smoothed_logistic(margin, label_smoothing)


def _exo_pair(pairs: _Pairs, beta: float, *, label_smoothing: float = 1e-3) -> torch.Tensor:
    """EXO, Ji et al. 2024 (arXiv 2402.00856) eq. 16 for a pair: KL(sigmoid(beta * logits) || (1 - eps, eps))."""
    margin, eps = beta * pairs.logits(), label_smoothing
    return torch.sigmoid(margin) * (F.logsigmoid(margin) - math.log(1 - eps)) + torch.sigmoid(-margin) * (
        F.logsigmoid(-margin) - math.log(eps)
    )


def _nca_pair(pairs: _Pairs, beta: float) -> torch.Tensor:
    """NCA, Chen et al. 2024 (arXiv 2402.05369), the pairwise NCA loss on rewards beta * (pi - ref) per side."""
    chosen, rejected = beta * pairs.chosen_ratio(), beta * pairs.rejected_ratio()
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _bco_pair(pairs: _Pairs, beta: float) -> torch.Tensor:
    """BCO, Jung et al. 2024 (arXiv 2404.04656), the binary cross-entropy of its Theorem 1 (an upper
    bound of the DPO loss) for a pair: the chosen reward beta * (pi_c - ref_c) classified as good,
    the rejected one as bad; the paper's reward shift delta is 0 here, as in TRL 1.16's bco_pair."""
    return -F.logsigmoid(beta * pairs.chosen_ratio()) - F.logsigmoid(-beta * pairs.rejected_ratio())


def _sppo_hard(pairs: _Pairs, beta: float) -> torch.Tensor:
    """SPPO, Wu et al. 2024 (arXiv 2405.00675) eq. 4.7 with hard win probabilities (chosen 1, rejected 0)."""
    return (pairs.chosen_ratio() - 0.5 / beta) ** 2 + (pairs.rejected_ratio() + 0.5 / beta) ** 2


def _apo_zero(pairs: _Pairs, beta: float) -> torch.Tensor:
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266) eq. 7: raise chosen, lower rejected likelihood."""
    return 1 - torch.sigmoid(beta * pairs.chosen_ratio()) + torch.sigmoid(beta * pairs.rejected_ratio())


def _apo_down(pairs: _Pairs, beta: float) -> torch.Tensor:
    """APO-down, ibid. eq. 8: lower both likelihoods, the rejected more (chosen answers worse than the model's)."""
    chosen = pairs.chosen_ratio()
    return torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - pairs.rejected_ratio()))


def _discopop(pairs: _Pairs, beta: float, *, discopop_tau: float = 0.05) -> torch.Tensor:
    """DiscoPOP, Lu et al. 2024 (arXiv 2406.08414) eq. 5: logistic and exponential losses mixed by sigmoid(margin / tau)."""
    margin = beta * pairs.logits()
    mix = torch.sigmoid(margin / discopop_tau)
    # exp(-margin) * mix in log space: exp(-margin) alone overflows for very negative margins, where mix
    # is 0 and the product would be inf * 0 = nan.
    exponential = torch.exp(F.logsigmoid(margin / discopop_tau) - margin)
    return -F.logsigmoid(margin) * (1 - mix) + exponential


def _aot(
    pairs: _Pairs, beta: float, *, label_smoothing: float = 0.0, aot_targets: torch.Tensor | None = None
) -> torch.Tensor:
    """AOT paired, Melnyk et al. 2024 (arXiv 2406.05882): first-order stochastic dominance of the
    policy's margins pi_c - pi_r over the reference's ref_c - ref_r, as 1-D optimal transport with
    the (label-smoothed) logistic cost, solved by sorting: the k-th smallest policy margin against
    the k-th smallest reference margin (TRL's "aot"). Without ``aot_targets`` the pairs passed in are
    the batch (the returned terms are in rank order). ``aot_targets`` ([pairs], detached) gives each
    pair the reference margin of its policy margin's rank in a larger batch (``aot_targets_for``):
    the same terms, so the loss does not depend on how that batch is split."""
    margins = pairs.policy_chosen - pairs.policy_rejected
    if aot_targets is None:
        margins, aot_targets = margins.sort().values, (pairs.ref_chosen - pairs.ref_rejected).sort().values
    return _smoothed_logistic(beta * (margins - aot_targets), label_smoothing)


def _aot_unpaired(
    pairs: _Pairs, beta: float, *, label_smoothing: float = 0.0, aot_targets: torch.Tensor | None = None
) -> torch.Tensor:
    """AOT unpaired, Melnyk et al. 2024 (arXiv 2406.05882): first-order stochastic dominance of the
    chosen log-ratios pi_c - ref_c over the rejected ones pi_r - ref_r, the k-th smallest of each
    compared (TRL's "aot_unpaired"). ``aot_targets`` ([2, pairs], detached): for each pair the
    rejected log-ratio of its chosen log-ratio's rank, and the chosen log-ratio of its rejected one's
    rank, in a larger batch. Then each chosen and each rejected ratio meets its rank's partner: the
    values count every rank once (the chosen side), the gradient reaches both sides."""
    chosen, rejected = pairs.chosen_ratio(), pairs.rejected_ratio()
    if aot_targets is None:
        return _smoothed_logistic(beta * (chosen.sort().values - rejected.sort().values), label_smoothing)
    rejected_of_chosen_rank, chosen_of_rejected_rank = aot_targets
    chosen_side = _smoothed_logistic(beta * (chosen - rejected_of_chosen_rank), label_smoothing)
    rejected_side = _smoothed_logistic(beta * (chosen_of_rejected_rank - rejected), label_smoothing)
    return chosen_side + (rejected_side - rejected_side.detach())


def aot_sort_keys(name: str, policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """[2, pairs] detached: what aot sorts (policy margins, reference margins) or aot_unpaired sorts
    (chosen log-ratios, rejected log-ratios). The engine gathers these from every rank."""
    with torch.no_grad():
        if name == "aot":
            return torch.stack([policy_chosen - policy_rejected, ref_chosen - ref_rejected])
        return torch.stack([policy_chosen - ref_chosen, policy_rejected - ref_rejected])


def aot_targets_for(name: str, keys: torch.Tensor) -> torch.Tensor:
    """``aot_targets`` of every pair of a batch from its ``aot_sort_keys`` ([2, pairs], in any
    order; extra columns at +inf on both rows sort last and meet each other): for aot [pairs], for
    aot_unpaired [2, pairs] (see ``_aot`` and ``_aot_unpaired``)."""
    values, partners = keys
    if name == "aot":
        return _partner_of_rank(values, partners)
    return torch.stack([_partner_of_rank(values, partners), _partner_of_rank(partners, values)])


def _partner_of_rank(values: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """For each entry of ``values``: the entry of ``partners`` with the same rank (k-th smallest)."""
    rank = torch.empty_like(values, dtype=torch.long)
    # Stable: tied values get their ranks in one order on every rank and every run.
    rank[values.argsort(stable=True)] = torch.arange(len(values), device=values.device)
    return partners.sort(stable=True).values[rank]


def _sft(pairs: _Pairs, beta: float, *, chosen_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Supervised fine-tuning on the chosen response: its NLL per token (``sft_nll``; TRL's loss_type
    "sft" per pair). Reference-free; beta only scales the logged rewards."""
    return sft_nll(pairs.policy_chosen, chosen_tokens)


def _rpo(
    pairs: _Pairs, beta: float, *, alpha: float = 1.0, label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """RPO, Pang et al. 2024 (arXiv 2404.19733) eq. 1: DPO (cDPO with eps) plus alpha times the
    chosen response's NLL per token. The engine computes the same sum itself (``loss=rpo`` runs the
    sigmoid kernel and adds ``loss.alpha * sft_nll``, as for every loss with alpha > 0)."""
    return _sigmoid(pairs, beta, label_smoothing=label_smoothing) + alpha * _sft(pairs, beta, chosen_tokens=chosen_tokens)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler 2012, "Accurately
    computing log(1 - exp(-|a|))"). Each branch gets only inputs in its own range: torch.where
    back-propagates through the branch it did not pick too, and an inf there is a nan gradient."""
    near_zero = x > -math.log(2)
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(x.clamp(min=-math.log(2)))),
        torch.log1p(-torch.exp(x.clamp(max=-math.log(2)))),
    )


def _orpo(pairs: _Pairs, beta: float) -> torch.Tensor:
    """ORPO, Hong et al. 2024 (arXiv 2403.07691) eq. 7: -log sigmoid of the log odds ratio of chosen
    to rejected, odds(y) = P(y) / (1 - P(y)) with P(y) the exp of the mean per-token log-prob, weighted
    by beta (the paper's lambda, TRL ORPOConfig's beta). Reference-free; eq. 6's L_SFT is the NLL term
    the engine adds (``loss.alpha``, 1.0 in conf/loss/orpo.yaml)."""
    # At least float32, as TRL computes it: in bf16, exp(x) rounds to 1 for x above about -4e-3.
    dtype = torch.promote_types(pairs.policy_chosen.dtype, torch.float32)
    # A response whose mean log-prob is 0 (certain) has infinite odds. Capping mean log-probs at
    # -1e-6 (log-odds at most 13.8) leaves every response the policy is less than certain of as it
    # is; a capped side gets no gradient from the odds term (the NLL term still reaches the chosen).
    chosen, rejected = (x.to(dtype).clamp(max=-1e-6) for x in (pairs.policy_chosen, pairs.policy_rejected))
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    return -beta * F.logsigmoid(log_odds)


def _cpo(pairs: _Pairs, beta: float, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """CPO, Xu et al. 2024 (arXiv 2401.08417) eq. 3: DPO's logistic loss on the policy's summed
    log-probs alone (the reference dropped), label-smoothed as TRL's CPOTrainer; the paper's L_NLL
    term is the one the engine adds (``loss.alpha``, 1.0 in conf/loss/cpo.yaml, TRL's cpo_alpha)."""
    return _smoothed_logistic(beta * (pairs.policy_chosen - pairs.policy_rejected), label_smoothing)


_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "hinge": _hinge,
    "ipo": _ipo,
    "kto_pair": _kto_pair,
    "simpo": _simpo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "sppo_hard": _sppo_hard,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "orpo": _orpo,
    "cpo": _cpo,
    "rpo": _rpo,
    "sft": _sft,
}
LOSS_NAMES = tuple(_LOSSES)
BATCH_STATISTICS = {"kto_pair": ("kl_baselines",), "aot": ("aot_targets",), "aot_unpaired": ("aot_targets",)}
"""Keyword arguments a loss takes that are statistics of a batch larger than the pairs passed in
(the engine computes them), not ``loss.*`` settings."""
PAIR_INPUTS = {"rpo": ("chosen_tokens",), "sft": ("chosen_tokens",)}
"""Keyword arguments a loss requires that are data of the pairs passed in, not ``loss.*`` settings:
the chosen responses' token counts ([pairs]) for a per-token NLL of summed log-probs."""
LOSS_OPTIONS = {
    name: {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in BATCH_STATISTICS.get(name, ()) + PAIR_INPUTS.get(name, ())
    }
    for name, fn in _LOSSES.items()
}
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "rpo", "robust", "hinge", "ipo", "exo_pair", "discopop"})
"""The losses of the margin (chosen minus rejected log-ratio) that f-DPO generalises (TRL 1.16's
list, its sigmoid_norm being our sigmoid on mean log-probs): they take the options
``f_divergence_type`` (``F_DIVERGENCES``, default reverse_kl) and ``f_alpha_divergence_coef``
(alpha_divergence's alpha, default 0.5). f-DPO's u is a sequence's probability ratio: pass summed
log-probs (the config refuses a divergence with loss.logp_normalization=mean; TRL's sigmoid_norm and
ipo divide f' of the summed log-ratio by the length, which this API does not do)."""
_F_OPTIONS = {"f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5}
for _name in F_DIVERGENCE_LOSSES:
    LOSS_OPTIONS[_name] = LOSS_OPTIONS[_name] | _F_OPTIONS
REFERENCE_FREE_LOSSES = frozenset({"simpo", "orpo", "cpo", "sft"})
MEAN_LOGP_LOSSES = frozenset({"simpo", "orpo"})


def preference_loss(
    name: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    **options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and detached (chosen, rejected) rewards of preference loss ``name``."""
    if name not in _LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; valid names: {', '.join(LOSS_NAMES)}")
    _check_beta(beta)
    options = _checked_options(name, options)
    reference_free = name in REFERENCE_FREE_LOSSES
    pairs = _checked_pairs(
        name, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, reference_free
    )
    divergence = options.pop("f_divergence_type", "reverse_kl")
    f_alpha = options.pop("f_alpha_divergence_coef", _F_OPTIONS["f_alpha_divergence_coef"])
    if divergence != "reverse_kl":
        pairs = pairs._replace(score=lambda log_ratio: f_divergence_score(log_ratio, divergence, f_alpha))
    for key in PAIR_INPUTS.get(name, ()):
        options[key] = torch.as_tensor(options[key], device=pairs.policy_chosen.device)
        if tuple(options[key].shape) != tuple(pairs.policy_chosen.shape):
            raise ValueError(f"{key} must have the log-probs' shape [pairs], got {tuple(options[key].shape)}")
    losses = _LOSSES[name](pairs, beta, **options)
    with torch.no_grad():
        if reference_free:
            chosen_rewards, rejected_rewards = beta * pairs.policy_chosen, beta * pairs.policy_rejected
        else:
            chosen_rewards = beta * (pairs.policy_chosen - pairs.ref_chosen)
            rejected_rewards = beta * (pairs.policy_rejected - pairs.ref_rejected)
    return losses, chosen_rewards, rejected_rewards


def sft_nll(chosen_sum_logps: torch.Tensor, chosen_token_counts: torch.Tensor) -> torch.Tensor:
    """[pairs] mean per-token negative log-likelihood of each chosen response (RPO/SFT term).

    Each response is normalised by its own length, as in RPO eq. 1, and the engine averages over
    pairs; TRL 1.16's "sft" term instead divides the batch's summed chosen NLL by its chosen token
    count, which weighs long responses more (the two agree when chosen lengths are equal)."""
    return -chosen_sum_logps / chosen_token_counts.clamp(min=1)


def wpo_pair_weights(chosen_aligned_logps: torch.Tensor, rejected_aligned_logps: torch.Tensor) -> torch.Tensor:
    """[pairs] WPO weights, Zhou et al. 2024 (arXiv 2406.11827) eq. 2: w(x, y_w) * w(x, y_l), each
    w the exp of a response's mean aligned token log-prob (``SequenceLogps.aligned_logps``:
    log p(token) - log sum_v p(v)^2), detached. The caller multiplies the preference losses by it;
    TRL 1.16 also weights its "sft" term, while the engine's loss.alpha NLL stays unweighted."""
    return torch.exp(chosen_aligned_logps.detach() + rejected_aligned_logps.detach())


def _check_beta(beta) -> None:
    # A tensor beta would need a device sync to validate, and nothing needs one.
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _checked_options(name: str, options: dict) -> dict:
    accepted = LOSS_OPTIONS[name]
    checked = {}
    for needed in PAIR_INPUTS.get(name, ()):
        if options.get(needed) is None:
            raise ValueError(f"loss {name!r} needs {needed}= (the chosen responses' token counts, [pairs]) for its per-token NLL")
    for key, value in options.items():
        if key in BATCH_STATISTICS.get(name, ()) + PAIR_INPUTS.get(name, ()):
            checked[key] = value
            continue
        if key not in accepted and (key, value) in (("label_smoothing", 0), ("f_divergence_type", "reverse_kl")):
            continue
        if key not in accepted:
            valid = ", ".join(accepted) or "none"
            raise ValueError(f"loss {name!r} does not take option {key}={value!r}; its options: {valid}")
        checked[key] = value
    eps = checked.get("label_smoothing", accepted.get("label_smoothing", 0.0))
    # rDPO divides by 1 - 2 eps and EXO takes log(eps): each needs eps strictly inside at that end.
    open_low, open_high = name == "exo_pair", name in ("robust", "exo_pair")
    in_range = isinstance(eps, (int, float)) and (0 < eps if open_low else 0 <= eps) and (eps < 0.5 if open_high else eps <= 0.5)
    if not in_range:
        bound = f"{'(' if open_low else '['}0, 0.5{')' if open_high else ']'}"
        raise ValueError(f"label_smoothing for loss {name!r} must be in {bound}, got {eps!r}")
    tau = checked.get("discopop_tau", 1.0)
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"discopop_tau for loss {name!r} must be a finite number > 0, got {tau!r}")
    alpha = checked.get("alpha", 0.0)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha for loss {name!r} must be a finite number >= 0, got {alpha!r}")
    divergence = checked.get("f_divergence_type", "reverse_kl")
    if divergence not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type for loss {name!r} must be one of {', '.join(F_DIVERGENCES)}, got {divergence!r}")
    f_alpha = checked.get("f_alpha_divergence_coef", 0.5)
    if not (isinstance(f_alpha, (int, float)) and 0 < f_alpha < 1):
        raise ValueError(f"f_alpha_divergence_coef for loss {name!r} must be in (0, 1), got {f_alpha!r}")
    gamma = checked.get("gamma", 0.0)
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma for loss {name!r} must be a finite number >= 0, got {gamma!r}")
    return checked


def _checked_pairs(name, policy_chosen, policy_rejected, ref_chosen, ref_rejected, reference_free) -> _Pairs:
    if not reference_free and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"loss {name!r} needs reference log-probs")
    tensors = {"policy_chosen_logps": policy_chosen, "policy_rejected_logps": policy_rejected}
    if not reference_free:
        tensors |= {"ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    shapes = {key: tuple(value.shape) for key, value in tensors.items()}
    if len(set(shapes.values())) != 1 or len(shapes["policy_chosen_logps"]) != 1:
        raise ValueError(f"preference_loss needs 1-D log-prob tensors of one shape [pairs], got {shapes}")
    return _Pairs(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
