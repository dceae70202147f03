"""Preference-optimisation losses (DPO and its variants) as pure per-pair tensor math.

Inputs are per-pair *summed* response log-probs, shape [B], from the policy and the frozen reference, so this
module knows nothing about models, parallelism or tokens. The formulas follow TRL 0.28's ``DPOTrainer.dpo_loss``,
and TRL 1.16's ``sft`` term, f-divergences (``f_divergence_type``) and WPO weights (``use_weighting``), so that runs
are comparable with TRL; where TRL keeps hidden state (``bco_pair``'s running reward mean) or length-normalises
log-probs before the call (``ipo``), this module takes the value or the response lengths instead. LD-DPO's
``ld_alpha`` acts on the summed log-probs themselves, before they reach this module (`training.logprobs`).
``sft`` is each pair's mean token NLL where TRL 1.16 pools the chosen tokens of its per-device batch: the two agree
when those lengths are equal, and only the per-pair mean keeps the loss independent of how a global batch is split
into micro-batches and ranks. The objective's settings are a `DPOConfig`, which checks them once when it is built:
`pair_losses` (the training step's path) only computes, and `preference_loss` is the checked entry point for direct
callers.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mdpo.config import LOSS_TYPES, DPOConfig
from mdpo.errors import ConfigError

__all__ = ["LOSS_TYPES", "PairLosses", "nll_loss", "pair_losses", "preference_loss", "wpo_weights"]

# The DPOConfig fields preference_loss takes as keyword settings (the rest say where the reference comes from).
OBJECTIVE_SETTINGS = (
    "loss_type",
    "loss_weights",
    "beta",
    "label_smoothing",
    "rpo_alpha",
    "bco_delta",
    "discopop_tau",
    "f_divergence",
    "f_alpha_coef",
)
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
}
_NEEDS_LENGTHS = frozenset({"ipo", "sigmoid_norm"})  # both responses' lengths
_NEEDS_CHOSEN_LENGTHS = _NEEDS_LENGTHS | {"sft"}


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
) -> PairLosses:
    """The objective `dpo` describes, on [B] tensors of one shape (with `dpo.reference_free` the reference is zero:
    its values, None then, are not read). `sft_chosen` is the chosen responses' plain summed log-probs for the sft
    term where `policy_chosen` is LD-DPO's weighted sum (default: `policy_chosen`); `pair_weights` multiply every
    pair's loss (WPO, `wpo_weights`); `bco_mean` is bco_pair's shift when `dpo.bco_delta` is None (the running reward
    mean the caller keeps). Nothing is checked here: `dpo` checked itself when it was built, and callers pass
    well-formed tensors (`preference_loss` checks them for direct callers)."""
    dtype = _compute_dtype(policy_chosen)
    policy_chosen, policy_rejected = policy_chosen.to(dtype), policy_rejected.to(dtype)
    if dpo.reference_free:
        ref_chosen, ref_rejected = torch.zeros_like(policy_chosen), torch.zeros_like(policy_rejected)
    else:
        ref_chosen, ref_rejected = ref_chosen.detach().to(dtype), ref_rejected.detach().to(dtype)
    c_len = chosen_lengths.to(dtype) if chosen_lengths is not None else None
    r_len = rejected_lengths.to(dtype) if rejected_lengths is not None else None
    pairs = _pairs(dpo, policy_chosen, policy_rejected, ref_chosen, ref_rejected, c_len, r_len, bco_mean, sft_chosen)
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


def _check_shape(name: str, t: Tensor, like: Tensor) -> None:
    if tuple(t.shape) != tuple(like.shape):
        raise ConfigError(f"{name} has shape {tuple(t.shape)}, expected {tuple(like.shape)} like policy_chosen_logps")


def _as_lengths(name: str, value: Tensor | Sequence[float], like: Tensor) -> Tensor:
    """Response token counts as a float tensor shaped like the log-probs; they must be positive."""
    lengths = torch.as_tensor(value, device=like.device)
    _check_shape(name, lengths, like)
    lengths = lengths.to(_compute_dtype(like))
    bad = ~(lengths > 0)  # also catches NaN
    if bool(bad.any()):
        raise ConfigError(f"{name} must be positive token counts, got {lengths[bad][0].item():g}")
    return lengths


def _check_inputs(
    dpo: DPOConfig,
    like: Tensor,
    policy_rejected: Tensor,
    refs: dict[str, Tensor | None],
    chosen_lengths: object,
    rejected_lengths: object,
) -> None:
    """preference_loss's inputs: [B] shapes, references unless reference-free, the lengths the loss types read."""
    if like.dim() != 1:
        raise ConfigError(f"policy_chosen_logps must have shape [B], got {tuple(like.shape)}")
    _check_shape("policy_rejected_logps", policy_rejected, like)
    for name, ref in refs.items():
        if ref is None:
            if not dpo.reference_free:
                raise ConfigError(f"{name} is None but reference_free is False")
        else:
            _check_shape(name, ref, like)
    chosen_users = sorted(_NEEDS_CHOSEN_LENGTHS.intersection(dpo.loss_types))
    if chosen_lengths is None and (chosen_users or dpo.rpo_alpha > 0):
        user = f"loss_type {chosen_users[0]!r}" if chosen_users else f"rpo_alpha={dpo.rpo_alpha!r}"
        raise ConfigError(f"chosen_lengths is required by {user}")
    rejected_users = sorted(_NEEDS_LENGTHS.intersection(dpo.loss_types))
    if rejected_lengths is None and rejected_users:
        raise ConfigError(f"rejected_lengths is required by loss_type {rejected_users[0]!r}")


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    chosen_lengths: Tensor | Sequence[float] | None = None,
    rejected_lengths: Tensor | Sequence[float] | None = None,
    reference_free: bool = False,
    **settings: object,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses and implicit rewards, each shaped [B], with every input checked.

    Log-probs are summed over response tokens. `settings` are DPOConfig's objective fields, its defaults where not
    given: ``loss_type`` (one of ``LOSS_TYPES`` or a list of them, combined as the ``loss_weights``-weighted sum),
    ``beta``, ``label_smoothing`` (eps in [0, 0.5): sigmoid (cDPO), sigmoid_norm, robust, exo_pair (eps 0 means 1e-3,
    as in TRL), aot and aot_unpaired use it), ``rpo_alpha`` (adds ``rpo_alpha`` times loss type sft's term
    ``-policy_chosen_logps / chosen_lengths``, the chosen response's mean token NLL: RPO, NeMo's sft_loss_weight;
    ``rpo_alpha=a`` equals ``loss_type=["sigmoid", "sft"], loss_weights=[1, a]``), ``bco_delta`` (bco_pair's reward
    offset; TRL uses a running mean of past batch rewards, which a caller can keep and pass in), ``discopop_tau``
    (DiscoPOP's mixing temperature), ``f_divergence`` (reverse_kl, i.e. DPO; forward_kl, js_divergence or
    alpha_divergence: f-DPO's f'(policy / reference) takes the log-ratio's place in sigmoid, sigmoid_norm, hinge, ipo,
    exo_pair, robust and discopop, as TRL 1.16's ``f_divergence_type``) and ``f_alpha_coef`` (alpha_divergence's
    alpha, TRL's ``f_alpha_divergence_coef``).

    - ``reference_free``: reference log-probs are taken as zero (they may then be None).
    - ``chosen_lengths`` / ``rejected_lengths``: response token counts; required by ipo and sigmoid_norm (which
      compare per-token average log-probs), and chosen_lengths by sft and ``rpo_alpha > 0``.

    aot and aot_unpaired sort over the batch, so their pair i is not tied to input pair i and the result depends on
    which pairs share a call (e.g. the local micro-batch).
    """
    unknown = sorted(set(settings) - set(OBJECTIVE_SETTINGS))
    if unknown:
        raise ConfigError(f"unknown preference_loss option {unknown[0]!r}; known: {', '.join(OBJECTIVE_SETTINGS)}")
    dpo = DPOConfig(**settings, reference="none" if reference_free else "online")  # checks every setting

    like = policy_chosen_logps
    refs = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    _check_inputs(dpo, like, policy_rejected_logps, refs, chosen_lengths, rejected_lengths)
    c_len = _as_lengths("chosen_lengths", chosen_lengths, like) if chosen_lengths is not None else None
    r_len = _as_lengths("rejected_lengths", rejected_lengths, like) if rejected_lengths is not None else None
    out = pair_losses(dpo, like, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, c_len, r_len)
    return out.losses, out.chosen_rewards, out.rejected_rewards


def wpo_weights(
    chosen_aligned: Tensor, rejected_aligned: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor
) -> Tensor:
    """WPO's per-pair weights (Zhou et al. 2024, Eq. 2, as TRL 1.16 computes them): each response's summed
    log p(token) - log sum_v p_v^2 (its probability against the policy's own distribution at that position) over
    its length, exponentiated, and the two responses' values multiplied. [B] each; no gradient flows through them."""
    dtype = _compute_dtype(chosen_aligned)
    mean = lambda aligned, lengths: aligned.detach().to(dtype) / lengths.to(dtype).clamp(min=1.0)
    return torch.exp(mean(chosen_aligned, chosen_lengths)) * torch.exp(mean(rejected_aligned, rejected_lengths))


def nll_loss(chosen_logps_sum: Tensor, chosen_lengths: Tensor | Sequence[float]) -> Tensor:
    """Per-pair mean token NLL of the chosen response, ``-sum / length``, shaped [B]: loss type sft's term."""
    if chosen_logps_sum.dim() != 1:
        raise ConfigError(f"chosen_logps_sum must have shape [B], got {tuple(chosen_logps_sum.shape)}")
    logps = chosen_logps_sum.to(_compute_dtype(chosen_logps_sum))
    return -logps / _as_lengths("chosen_lengths", chosen_lengths, logps)
