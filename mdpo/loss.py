"""Preference-optimisation losses (DPO and its variants) as pure per-pair tensor math.

Inputs are per-pair *summed* response log-probs, shape [B], from the policy and the frozen
reference, so this module knows nothing about models, parallelism or tokens. The formulas follow
TRL 0.28's ``DPOTrainer.dpo_loss`` so that runs are comparable with TRL; where TRL keeps hidden
state (``bco_pair``'s running reward mean) or length-normalises log-probs before the call
(``ipo``), this module takes an explicit option or the response lengths instead.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mdpo.errors import ConfigError

__all__ = ["LOSS_TYPES", "nll_loss", "preference_loss"]

# Extra keyword options of preference_loss and their defaults; anything else is a config typo.
_OPTION_DEFAULTS: dict[str, float] = {"bco_delta": 0.0, "discopop_tau": 0.05}
# TRL replaces label_smoothing == 0 by this for exo_pair, whose target distribution needs eps > 0.
_EXO_DEFAULT_EPS = 1e-3


@dataclass(frozen=True)
class _Pairs:
    """What a per-type loss may read; reference log-probs are already zero when reference-free."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None
    beta: float
    label_smoothing: float
    bco_delta: float
    discopop_tau: float

    @property
    def chosen_logratios(self) -> Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> Tensor:
        return self.policy_rejected - self.ref_rejected

    @property
    def margin(self) -> Tensor:
        """The DPO logit: how much more the policy prefers chosen over rejected than the reference does."""
        return self.chosen_logratios - self.rejected_logratios

    @property
    def normalized_margin(self) -> Tensor:
        """The margin on per-token mean log-probs, so long responses do not dominate (ipo, sigmoid_norm)."""
        assert self.chosen_lengths is not None and self.rejected_lengths is not None
        return self.chosen_logratios / self.chosen_lengths - self.rejected_logratios / self.rejected_lengths


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
    return torch.sigmoid(p.beta * p.chosen_logratios) + torch.sigmoid(-p.beta * p.margin)


def _discopop(p: _Pairs) -> Tensor:
    # Blend of logistic and exponential losses, mixed by sigmoid(x / tau). The exponential term
    # exp(-x) * sigmoid(x / tau) is evaluated in log space: exp(-x) alone overflows for x << 0.
    x = p.beta * p.margin
    tau = p.discopop_tau
    logistic = -F.logsigmoid(x) * torch.sigmoid(-x / tau)
    exponential = torch.exp(F.logsigmoid(x / tau) - x)
    return logistic + exponential


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
}
_NEEDS_LENGTHS = frozenset({"ipo", "sigmoid_norm"})

LOSS_TYPES: tuple[str, ...] = tuple(_LOSSES)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """At least float32: the losses are [B]-sized and cheap, and half precision loses long lengths."""
    return torch.promote_types(t.dtype, torch.float32)


def _check_shape(name: str, t: Tensor, like: Tensor) -> None:
    if tuple(t.shape) != tuple(like.shape):
        raise ConfigError(f"{name} has shape {tuple(t.shape)}, expected {tuple(like.shape)} like policy_chosen_logps")


def _as_lengths(name: str, value: Tensor | Sequence[float], like: Tensor) -> Tensor:
    """Response token counts as a float tensor shaped like the log-probs; they must be positive."""
    lengths = torch.as_tensor(value, device=like.device)
    _check_shape(name, lengths, like)
    lengths = lengths.to(like.dtype)
    bad = ~(lengths > 0)  # also catches NaN
    if bool(bad.any()):
        raise ConfigError(f"{name} must be positive token counts, got {lengths[bad][0].item():g}")
    return lengths


def _finite(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return value


def _loss_terms(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None) -> list[tuple[str, float]]:
    """Pair each requested loss type with its weight, rejecting unknown names and bad weights."""
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not names:
        raise ConfigError(f"loss_type is empty; use one or more of: {', '.join(LOSS_TYPES)}")
    for name in names:
        if not isinstance(name, str) or name not in _LOSSES:
            raise ConfigError(f"unknown loss_type {name!r}; valid: {', '.join(LOSS_TYPES)}")
    if loss_weights is None:
        return [(name, 1.0) for name in names]
    weights = [_finite("loss_weights entry", w) for w in loss_weights]
    if len(weights) != len(names):
        raise ConfigError(f"loss_weights has {len(weights)} entries {weights} but loss_type has {len(names)} {names}")
    for w in weights:
        if w < 0:
            raise ConfigError(f"loss_weights entries must be >= 0, got {w!r}")
    return list(zip(names, weights, strict=True))


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | Sequence[float] | None = None,
    rejected_lengths: Tensor | Sequence[float] | None = None,
    loss_weights: Sequence[float] | None = None,
    reference_free: bool = False,
    rpo_alpha: float = 0.0,
    **options: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses and implicit rewards, each shaped [B].

    Log-probs are summed over response tokens. ``loss_type`` is one of ``LOSS_TYPES`` or a list of
    them, combined as the ``loss_weights``-weighted sum (weights default to 1.0). Rewards are
    ``beta * (policy - reference)`` on the summed log-probs, detached: they are metrics, not loss.

    - ``reference_free``: reference log-probs are taken as zero (they may then be None).
    - ``label_smoothing`` (eps, in [0, 0.5)) is used by sigmoid (cDPO), sigmoid_norm, robust,
      exo_pair (eps 0 means 1e-3, as in TRL), aot and aot_unpaired; other types ignore it.
    - ``chosen_lengths`` / ``rejected_lengths``: response token counts; required by ipo and
      sigmoid_norm (which compare per-token average log-probs) and by ``rpo_alpha > 0``.
    - ``rpo_alpha``: adds ``rpo_alpha * (-policy_chosen_logps / chosen_lengths)``, the chosen
      response's mean token NLL (RPO; NeMo's sft_loss_weight), to every pair's loss.
    - options: ``bco_delta`` (default 0.0) is the reward offset of bco_pair; TRL uses a running
      mean of past batch rewards, which a caller can keep and pass in. ``discopop_tau``
      (default 0.05) is DiscoPOP's mixing temperature.

    aot and aot_unpaired sort over the batch, so their pair i is not tied to input pair i and the
    result depends on which pairs share a call (e.g. the local micro-batch).
    """
    unknown = sorted(set(options) - set(_OPTION_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown preference_loss option {unknown[0]!r}; known: {', '.join(_OPTION_DEFAULTS)}")
    opts = {key: _finite(key, options.get(key, default)) for key, default in _OPTION_DEFAULTS.items()}
    if opts["discopop_tau"] <= 0:
        raise ConfigError(f"discopop_tau must be > 0, got {opts['discopop_tau']!r}")

    terms = _loss_terms(loss_type, loss_weights)
    names = [name for name, _ in terms]
    beta = _finite("beta", beta)
    if beta <= 0:
        raise ConfigError(f"beta must be > 0, got {beta!r}")
    label_smoothing = _finite("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 0.5:
        why = " (robust divides by 1 - 2*label_smoothing)" if "robust" in names else ""
        raise ConfigError(f"label_smoothing must be in [0, 0.5){why}, got {label_smoothing!r}")
    rpo_alpha = _finite("rpo_alpha", rpo_alpha)
    if rpo_alpha < 0:
        raise ConfigError(f"rpo_alpha must be >= 0, got {rpo_alpha!r}")

    like = policy_chosen_logps
    if like.dim() != 1:
        raise ConfigError(f"policy_chosen_logps must have shape [B], got {tuple(like.shape)}")
    _check_shape("policy_rejected_logps", policy_rejected_logps, like)
    refs = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    for name, ref in refs.items():
        if ref is None:
            if not reference_free:
                raise ConfigError(f"{name} is None but reference_free is False")
        else:
            _check_shape(name, ref, like)

    dtype = _compute_dtype(like)
    policy_chosen = policy_chosen_logps.to(dtype)
    policy_rejected = policy_rejected_logps.to(dtype)
    if reference_free:
        ref_chosen = torch.zeros_like(policy_chosen)
        ref_rejected = torch.zeros_like(policy_rejected)
    else:
        assert ref_chosen_logps is not None and ref_rejected_logps is not None
        ref_chosen = ref_chosen_logps.detach().to(dtype)
        ref_rejected = ref_rejected_logps.detach().to(dtype)

    length_users = sorted(_NEEDS_LENGTHS.intersection(names))
    if chosen_lengths is None and (length_users or rpo_alpha > 0):
        user = f"loss_type {length_users[0]!r}" if length_users else f"rpo_alpha={rpo_alpha!r}"
        raise ConfigError(f"chosen_lengths is required by {user}")
    if rejected_lengths is None and length_users:
        raise ConfigError(f"rejected_lengths is required by loss_type {length_users[0]!r}")
    c_len = r_len = None
    if chosen_lengths is not None:
        c_len = _as_lengths("chosen_lengths", chosen_lengths, policy_chosen)
    if rejected_lengths is not None:
        r_len = _as_lengths("rejected_lengths", rejected_lengths, policy_chosen)

    pairs = _Pairs(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        chosen_lengths=c_len,
        rejected_lengths=r_len,
        beta=beta,
        label_smoothing=label_smoothing,
        bco_delta=opts["bco_delta"],
        discopop_tau=opts["discopop_tau"],
    )
    losses = sum(weight * _LOSSES[name](pairs) for name, weight in terms)
    if rpo_alpha > 0:
        assert c_len is not None
        losses = losses + rpo_alpha * (-policy_chosen / c_len)

    chosen_rewards = beta * pairs.chosen_logratios.detach()
    rejected_rewards = beta * pairs.rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def nll_loss(chosen_logps_sum: Tensor, chosen_lengths: Tensor | Sequence[float]) -> Tensor:
    """Per-pair mean token NLL of the chosen response, ``-sum / length``, shaped [B]."""
    if chosen_logps_sum.dim() != 1:
        raise ConfigError(f"chosen_logps_sum must have shape [B], got {tuple(chosen_logps_sum.shape)}")
    logps = chosen_logps_sum.to(_compute_dtype(chosen_logps_sum))
    return -logps / _as_lengths("chosen_lengths", chosen_lengths, logps)
