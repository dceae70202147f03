"""Preference-optimisation losses (DPO and its variants) as pure per-pair tensor math.

Inputs are per-pair *summed* response log-probs, shape [B], from the policy and the frozen reference, so this
module knows nothing about models, parallelism or tokens. The formulas follow TRL 0.28's ``DPOTrainer.dpo_loss``,
and TRL 1.16's ``sft`` term, f-divergences (``f_divergence_type``) and WPO weights (``use_weighting``), so that runs
are comparable with TRL; where TRL keeps hidden state (``bco_pair``'s running reward mean) or length-normalises
log-probs before the call (``ipo``), this module takes the value or the response lengths instead. LD-DPO's
``ld_alpha`` acts on the summed log-probs themselves, before they reach this module (`training.logprobs`).
``plackett_luce`` is the DPO paper's objective over a ranking (Rafailov et al. 2023, Eq. 18), laid out as the
ranking's pairs best vs second, second vs third, ...: each pair's term is its stage's, -log of the softmax of the
chosen response's reward among its own and every later one's, so the terms of a ranking sum to its negative
log-likelihood (a ranking of two: sigmoid's loss).
``sft`` is each pair's mean token NLL where TRL 1.16 pools the chosen tokens of its per-device batch: the two agree
when those lengths are equal, and only the per-pair mean keeps the loss independent of how a global batch is split
into micro-batches and ranks. The objective's settings are a `DPOConfig`, which checks them once when it is built:
`pair_losses` only computes.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mdpo.config import LOSS_TYPES, DPOConfig

__all__ = ["LOSS_TYPES", "PairLosses", "pair_losses", "wpo_weights"]

# TRL replaces label_smoothing == 0 by this for exo_pair, whose target distribution needs eps > 0.
_EXO_DEFAULT_EPS = 1e-3
# TRL's alpha_divergence: within this of alpha = 1 the score is its limit, the log-ratio (reverse KL)...
_ALPHA_ONE_TOLERANCE = 1e-6
# ...and (alpha - 1) * log-ratio is clamped to this before exp (TRL's float32 bound), so the score stays finite.
_ALPHA_EXPONENT_MAX = 80.0


@dataclass(frozen=True)
class _Pairs:
    """What a per-type loss may read; reference log-probs are already zero when reference-free. The scores are
    f-DPO's f'(policy / reference) of each response, which the f-divergence loss types compare instead of the
    log-ratios (they are the log-ratios under reverse KL, plain DPO)."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_scores: Tensor
    rejected_scores: Tensor
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None
    beta: float
    label_smoothing: float
    bco_delta: float
    discopop_tau: float
    sft_chosen: Tensor  # the chosen responses' plain summed log-probs (policy_chosen unless LD-DPO weights it)
    rankings: Tensor  # [B] each pair's ranking: pairs with one value are consecutive stages of one ranking

    @property
    def chosen_logratios(self) -> Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> Tensor:
        return self.policy_rejected - self.ref_rejected

    @property
    def margin(self) -> Tensor:
        """The DPO logit: how much more the policy prefers chosen over rejected than the reference does (the score
        difference; the log-ratio difference under reverse KL)."""
        return self.chosen_scores - self.rejected_scores

    @property
    def normalized_margin(self) -> Tensor:
        """The margin on per-token means, so long responses do not dominate (ipo, sigmoid_norm)."""
        assert self.chosen_lengths is not None and self.rejected_lengths is not None
        return self.chosen_scores / self.chosen_lengths - self.rejected_scores / self.rejected_lengths


# f-DPO (Wang et al. 2023, "Beyond Reverse KL"): a divergence f puts f'(policy / reference) where DPO has the
# log-ratio; each function takes the log-ratio and alpha_divergence's alpha. TRL 1.16 writes 1 - exp(-x) and
# exp(t) - 1, which expm1 equals without the cancellation near 0 (and computes them here in float32 at least).


def _reverse_kl(logratios: Tensor, alpha: float) -> Tensor:
    return logratios  # DPO itself: f(t) = t log t


def _forward_kl(logratios: Tensor, alpha: float) -> Tensor:
    return -torch.expm1(-logratios)  # f'(t) = 1 - 1/t


def _js_divergence(logratios: Tensor, alpha: float) -> Tensor:
    return math.log(2.0) + F.logsigmoid(logratios)  # f'(t) = log(2t / (1 + t))


def _alpha_divergence(logratios: Tensor, alpha: float) -> Tensor:
    # f'(t) = (t^(alpha - 1) - 1) / (alpha - 1), whose limit at alpha = 1 is log t.
    if abs(alpha - 1.0) < _ALPHA_ONE_TOLERANCE:
        return logratios
    exponent = torch.clamp((alpha - 1.0) * logratios, max=_ALPHA_EXPONENT_MAX)
    return torch.expm1(exponent) / (alpha - 1.0)


_F_SCORES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "reverse_kl": _reverse_kl,
    "forward_kl": _forward_kl,
    "js_divergence": _js_divergence,
    "alpha_divergence": _alpha_divergence,
}


def _smoothed_logistic(x: Tensor, eps: float) -> Tensor:
    """Cross-entropy of sigmoid(x) against the label (1 - eps, eps): cDPO's conservative target."""
    return -(1.0 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def _sigmoid(p: _Pairs) -> Tensor:
    return _smoothed_logistic(p.beta * p.margin, p.label_smoothing)


def _sigmoid_norm(p: _Pairs) -> Tensor:
    return _smoothed_logistic(p.beta * p.normalized_margin, p.label_smoothing)


def _hinge(p: _Pairs) -> Tensor:
    return torch.relu(1.0 - p.beta * p.margin)


def _ipo(p: _Pairs) -> Tensor:
    # beta plays IPO's tau: the margin is regressed onto 1 / (2 tau) instead of pushed to infinity.
    return (p.normalized_margin - 1.0 / (2.0 * p.beta)) ** 2


def _robust(p: _Pairs) -> Tensor:
    # Unbiased under label flips with rate eps, hence the division by 1 - 2 eps.
    eps = p.label_smoothing
    x = p.beta * p.margin
    return (-(1.0 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1.0 - 2.0 * eps)


def _exo_pair(p: _Pairs) -> Tensor:
    # KL(softmax of implicit rewards || (1 - eps, eps)); written with logsigmoid so it stays finite.
    eps = p.label_smoothing or _EXO_DEFAULT_EPS
    x = p.beta * p.margin
    return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
        F.logsigmoid(-x) - math.log(eps)
    )


def _nca_pair(p: _Pairs) -> Tensor:
    chosen = p.beta * p.chosen_logratios
    rejected = p.beta * p.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _bco_pair(p: _Pairs) -> Tensor:
    chosen = p.beta * p.chosen_logratios - p.bco_delta
    rejected = p.beta * p.rejected_logratios - p.bco_delta
    return -F.logsigmoid(chosen) - F.logsigmoid(-rejected)


def _sppo_hard(p: _Pairs) -> Tensor:
    # Hard-label SPPO: chosen log-ratio regressed to +1/(2 beta), rejected to -1/(2 beta).
    return (p.chosen_logratios - 0.5 / p.beta) ** 2 + (p.rejected_logratios + 0.5 / p.beta) ** 2


def _aot(p: _Pairs) -> Tensor:
    # Distributional alignment: compare sorted policy and reference log-ratio quantiles over the batch.
    policy, _ = torch.sort(p.policy_chosen - p.policy_rejected, dim=0)
    reference, _ = torch.sort(p.ref_chosen - p.ref_rejected, dim=0)
    return _smoothed_logistic(p.beta * (policy - reference), p.label_smoothing)


def _aot_unpaired(p: _Pairs) -> Tensor:
    chosen, _ = torch.sort(p.chosen_logratios, dim=0)
    rejected, _ = torch.sort(p.rejected_logratios, dim=0)
    return _smoothed_logistic(p.beta * (chosen - rejected), p.label_smoothing)


def _apo_zero(p: _Pairs) -> Tensor:
    # 1 - sigmoid(x) written as sigmoid(-x) to keep precision when x is large.
    return torch.sigmoid(-p.beta * p.chosen_logratios) + torch.sigmoid(p.beta * p.rejected_logratios)


def _apo_down(p: _Pairs) -> Tensor:
    logratio_margin = p.chosen_logratios - p.rejected_logratios  # the log-ratios: apo takes no f-divergence
    return torch.sigmoid(p.beta * p.chosen_logratios) + torch.sigmoid(-p.beta * logratio_margin)


def _discopop(p: _Pairs) -> Tensor:
    # Blend of logistic and exponential losses, mixed by sigmoid(x / tau). The exponential term
    # exp(-x) * sigmoid(x / tau) is evaluated in log space: exp(-x) alone overflows for x << 0.
    x = p.beta * p.margin
    tau = p.discopop_tau
    logistic = -F.logsigmoid(x) * torch.sigmoid(-x / tau)
    exponential = torch.exp(F.logsigmoid(x / tau) - x)
    return logistic + exponential


def _plackett_luce(p: _Pairs) -> Tensor:
    # Stage i of a ranking: chosen_i against itself and every later completion, i.e. the rejected responses of
    # stages i, i+1, ... of the same ranking (each stage's rejected is the next one's chosen).
    chosen = p.beta * p.chosen_logratios
    rejected = p.beta * p.rejected_logratios
    b = chosen.shape[0]
    later = (p.rankings[:, None] == p.rankings[None, :]) & torch.ones(
        b, b, dtype=torch.bool, device=chosen.device
    ).triu()
    against = torch.where(later, rejected[None, :], torch.full_like(rejected, -math.inf)[None, :])
    return torch.logsumexp(torch.cat([chosen[:, None], against], dim=1), dim=1) - chosen


def _sft(p: _Pairs) -> Tensor:
    # The chosen response's mean token NLL (also rpo_alpha's term): no reference, no log-ratio, no f-divergence.
    assert p.chosen_lengths is not None
    return -p.sft_chosen / p.chosen_lengths


_LOSSES: dict[str, Callable[[_Pairs], Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "robust": _robust,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "aot_unpaired": _aot_unpaired,
    "sigmoid_norm": _sigmoid_norm,
    "sft": _sft,
    "plackett_luce": _plackett_luce,
}


@dataclass(frozen=True)
class PairLosses:
    """Per-pair values, each [B]: the objective's loss, the implicit rewards beta * (policy - reference) on the
    summed log-probs (detached: metrics, not loss, whatever the f-divergence, as in TRL), each loss type's own
    unweighted term (``sft`` among them), and the chosen response's mean token NLL when ``rpo_alpha > 0``."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    terms: dict[str, Tensor]
    nll: Tensor | None = None


def _compute_dtype(t: Tensor) -> torch.dtype:
    """At least float32: the losses are [B]-sized and cheap, and half precision loses long lengths."""
    return torch.promote_types(t.dtype, torch.float32)


def _pairs(
    dpo: DPOConfig,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    chosen_lengths: Tensor | None,
    rejected_lengths: Tensor | None,
    bco_mean: float,
    sft_chosen: Tensor | None,
    rankings: Tensor | None,
) -> _Pairs:
    """What the loss types read, in the compute dtype: the log-probs, f-DPO's scores of each response, lengths and
    the objective's settings (bco_pair's shift: the fixed `bco_delta`, else the running mean)."""
    score = _F_SCORES[dpo.f_divergence]
    return _Pairs(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        chosen_scores=score(policy_chosen - ref_chosen, dpo.f_alpha_coef),
        rejected_scores=score(policy_rejected - ref_rejected, dpo.f_alpha_coef),
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        beta=dpo.beta,
        label_smoothing=dpo.label_smoothing,
        bco_delta=bco_mean if dpo.bco_delta is None else dpo.bco_delta,
        discopop_tau=dpo.discopop_tau,
        sft_chosen=policy_chosen if sft_chosen is None else sft_chosen.to(policy_chosen.dtype),
        rankings=torch.arange(policy_chosen.shape[0], device=policy_chosen.device) if rankings is None else rankings,
    )


def pair_losses(
    dpo: DPOConfig,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    sft_chosen: Tensor | None = None,
    pair_weights: Tensor | None = None,
    bco_mean: float = 0.0,
    rankings: Tensor | None = None,
) -> PairLosses:
    """The objective `dpo` describes, on [B] tensors of one shape (with `dpo.reference_free` the reference is zero:
    its values, None then, are not read). `sft_chosen` is the chosen responses' plain summed log-probs for the sft
    term where `policy_chosen` is LD-DPO's weighted sum (default: `policy_chosen`); `pair_weights` multiply every
    pair's loss (WPO, `wpo_weights`); `bco_mean` is bco_pair's shift when `dpo.bco_delta` is None (the running reward
    mean the caller keeps); `rankings` [B] groups consecutive pairs into the stages of one ranking for plackett_luce
    (`data.batching.ranking_units`; default: each pair its own). Nothing is checked here: `dpo` checked itself
    when it was built, and callers pass well-formed tensors."""
    dtype = _compute_dtype(policy_chosen)
    policy_chosen, policy_rejected = policy_chosen.to(dtype), policy_rejected.to(dtype)
    if dpo.reference_free:
        ref_chosen, ref_rejected = torch.zeros_like(policy_chosen), torch.zeros_like(policy_rejected)
    else:
        ref_chosen, ref_rejected = ref_chosen.detach().to(dtype), ref_rejected.detach().to(dtype)
    c_len = chosen_lengths.to(dtype) if chosen_lengths is not None else None
    r_len = rejected_lengths.to(dtype) if rejected_lengths is not None else None
    pairs = _pairs(
        dpo, policy_chosen, policy_rejected, ref_chosen, ref_rejected, c_len, r_len, bco_mean, sft_chosen, rankings
    )
    terms = {name: _LOSSES[name](pairs) for name in dpo.loss_types}
    losses = sum(weight * terms[name] for name, weight in zip(dpo.loss_types, dpo.weights))
    nll = _sft(pairs) if dpo.rpo_alpha > 0 else None  # rpo_alpha's term; a listed sft is terms["sft"]
    if nll is not None:
        losses = losses + dpo.rpo_alpha * nll
    if pair_weights is not None:  # TRL weights each loss type's term, sft's included: the sum alike
        losses = losses * pair_weights.detach().to(dtype)
    return PairLosses(
        losses=losses,
        chosen_rewards=dpo.beta * pairs.chosen_logratios.detach(),
        rejected_rewards=dpo.beta * pairs.rejected_logratios.detach(),
        terms=terms,
        nll=nll,
    )


def wpo_weights(
    chosen_aligned: Tensor, rejected_aligned: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor
) -> Tensor:
    """WPO's per-pair weights (Zhou et al. 2024, Eq. 2, as TRL 1.16 computes them): each response's summed
    log p(token) - log sum_v p_v^2 (its probability against the policy's own distribution at that position) over
    its length, exponentiated, and the two responses' values multiplied. [B] each; no gradient flows through them."""
    dtype = _compute_dtype(chosen_aligned)
    mean = lambda aligned, lengths: aligned.detach().to(dtype) / lengths.to(dtype).clamp(min=1.0)
    return torch.exp(mean(chosen_aligned, chosen_lengths)) * torch.exp(mean(rejected_aligned, rejected_lengths))
