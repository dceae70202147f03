"""mdpo.loss against float64 oracles written here from the papers / TRL 0.28 and 1.16 math, in plain Python."""

import collections
import math
import re
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import nll_loss, preference_loss

from mdpo.config import DPOConfig
from mdpo.errors import ConfigError
from mdpo.loss import LOSS_TYPES, pair_losses, wpo_weights

ALL_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "apo_zero",
    "apo_down",
    "discopop",
    "aot_unpaired",
    "sigmoid_norm",
    "sft",
    "plackett_luce",
)
SMOOTHED = ("sigmoid", "sigmoid_norm", "robust", "exo_pair", "aot", "aot_unpaired")
# TRL 1.16's f_divergence_type values, and the loss types it lets them change (dpo_trainer.py, DPOTrainer.__init__)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tensors here have ~8 elements; CPU log_sigmoid still opens an OpenMP region that costs ms per call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- oracle (plain Python floats = float64)


def log_sigmoid(x: float) -> float:
    # log(1 / (1 + e^-x)) = -softplus(-x), split so exp never sees a large positive argument
    return -(max(-x, 0.0) + math.log1p(math.exp(-abs(x))))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def cdpo(z: float, eps: float) -> float:
    """Conservative DPO: BCE of sigmoid(z) against soft label 1 - eps."""
    return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def f_score(x: float, f: str, alpha: float) -> float:
    """TRL 1.16's score for log-ratio x = log(pi / pi_ref): f'(pi / pi_ref) of f-DPO, as DPOTrainer._compute_loss
    writes it (forward KL 1 - 1/t, JS log(2t / (1 + t)), alpha (t^(alpha-1) - 1) / (alpha - 1) with its exponent
    clamped at 80 and reverse KL within 1e-6 of alpha = 1)."""
    if f == "reverse_kl":
        return x
    if f == "forward_kl":
        return 1 - math.exp(-x)
    if f == "js_divergence":
        return math.log(2) + log_sigmoid(x)
    assert f == "alpha_divergence", f
    if abs(alpha - 1) < 1e-6:
        return x
    return (math.exp(min((alpha - 1) * x, 80.0)) - 1) / (alpha - 1)


def oracle(
    name, pc, pr, rc, rr, lc=None, lr=None, *, beta=0.1, eps=0.0, delta=0.0, tau=0.05, f="reverse_kl", alpha=0.5
):
    """Expected per-pair losses for lists of floats (policy/ref chosen/rejected, lengths)."""
    n = len(pc)
    ch = [pc[i] - rc[i] for i in range(n)]  # log pi/pi_ref on chosen
    rj = [pr[i] - rr[i] for i in range(n)]
    sc = [f_score(x, f, alpha) for x in ch]  # what the f-divergence types compare in place of ch / rj
    sr = [f_score(x, f, alpha) for x in rj]
    h = [sc[i] - sr[i] for i in range(n)]  # DPO logit
    out = []
    if name in ("aot", "aot_unpaired"):
        if name == "aot":
            a = sorted(pc[i] - pr[i] for i in range(n))
            b = sorted(rc[i] - rr[i] for i in range(n))
        else:
            a, b = sorted(ch), sorted(rj)
        return [cdpo(beta * (a[i] - b[i]), eps) for i in range(n)]
    for i in range(n):
        z = beta * h[i]
        if name == "sigmoid":
            out.append(cdpo(z, eps))
        elif name == "hinge":
            out.append(max(0.0, 1.0 - z))
        elif name == "ipo":
            hn = sc[i] / lc[i] - sr[i] / lr[i]
            out.append((hn - 1 / (2 * beta)) ** 2)
        elif name == "sigmoid_norm":
            hn = sc[i] / lc[i] - sr[i] / lr[i]
            out.append(cdpo(beta * hn, eps))
        elif name == "robust":
            out.append(((1 - eps) * -log_sigmoid(z) - eps * -log_sigmoid(-z)) / (1 - 2 * eps))
        elif name == "exo_pair":
            e = eps if eps > 0 else 1e-3
            # KL(q || p), q = (sigmoid(z), sigmoid(-z)), p = (1 - e, e)
            kl_chosen = sigmoid(z) * (log_sigmoid(z) - math.log(1 - e))
            kl_rejected = sigmoid(-z) * (log_sigmoid(-z) - math.log(e))
            out.append(kl_chosen + kl_rejected)
        elif name == "nca_pair":
            c, r = beta * ch[i], beta * rj[i]
            out.append(-log_sigmoid(c) - 0.5 * log_sigmoid(-c) - 0.5 * log_sigmoid(-r))
        elif name == "bco_pair":
            out.append(-log_sigmoid(beta * ch[i] - delta) - log_sigmoid(-(beta * rj[i] - delta)))
        elif name == "sppo_hard":
            out.append((ch[i] - 1 / (2 * beta)) ** 2 + (rj[i] + 1 / (2 * beta)) ** 2)
        elif name == "apo_zero":
            out.append((1 - sigmoid(beta * ch[i])) + sigmoid(beta * rj[i]))
        elif name == "apo_down":
            out.append(sigmoid(beta * ch[i]) + (1 - sigmoid(beta * (ch[i] - rj[i]))))
        elif name == "discopop":
            m = sigmoid(z / tau)
            # e^-z overflows a double beyond ~709; there use e^-z * m = exp(-z + log m)
            exp_part = math.exp(-z) * m if -z < 700 else math.exp(-z + log_sigmoid(z / tau))
            out.append(-log_sigmoid(z) * (1 - m) + exp_part)
        elif name == "sft":
            out.append(-pc[i] / lc[i])  # the chosen response's mean token NLL
        elif name == "plackett_luce":  # a pair alone is a ranking of two: P(chosen first) = sigmoid(z)
            out.append(-log_sigmoid(z))
        else:
            raise AssertionError(name)
    return out


# ---------------------------------------------------------------- inputs


def random_batch(seed: int = 0, n: int = 8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pc = -torch.rand(n, generator=g, dtype=torch.float64) * 150 - 5
    pr = -torch.rand(n, generator=g, dtype=torch.float64) * 150 - 5
    rc = pc + torch.randn(n, generator=g, dtype=torch.float64) * 8
    rr = pr + torch.randn(n, generator=g, dtype=torch.float64) * 8
    lc = torch.randint(1, 64, (n,), generator=g).to(torch.float64)
    lr = torch.randint(1, 64, (n,), generator=g).to(torch.float64)
    return tuple(t.to(dtype) for t in (pc, pr, rc, rr)) + (lc, lr)


def large_batch(dtype=torch.float64):
    """Chosen log-ratio +m/2 and rejected -m/2 for margins m up to +/-1e4, plus a one-sided extreme."""
    margins = torch.tensor([1e3, -1e3, 1e4, -1e4, 0.0, 3.0], dtype=torch.float64)
    rc = torch.tensor([-50.0, -80.0, -20.0, -300.0, -40.0, -10.0], dtype=torch.float64)
    rr = torch.tensor([-60.0, -70.0, -500.0, -25.0, -40.0, -12.0], dtype=torch.float64)
    pc, pr = rc + margins / 2, rr - margins / 2
    pc = torch.cat([pc, torch.tensor([-1e4 - 5.0])])
    pr = torch.cat([pr, torch.tensor([-30.0])])
    rc = torch.cat([rc, torch.tensor([-5.0])])
    rr = torch.cat([rr, torch.tensor([-31.0])])
    lc = torch.tensor([1.0, 2.0, 1.0, 3.0, 7.0, 4.0, 1.0], dtype=torch.float64)
    lr = torch.tensor([1.0, 5.0, 2.0, 1.0, 7.0, 9.0, 1.0], dtype=torch.float64)
    return tuple(t.to(dtype) for t in (pc, pr, rc, rr)) + (lc, lr)


def call(name, pc, pr, rc, rr, lc, lr, **kw):
    return preference_loss(pc, pr, rc, rr, loss_type=name, chosen_lengths=lc, rejected_lengths=lr, **kw)


def expected(name, pc, pr, rc, rr, lc, lr, **kw):
    lists = [t.double().tolist() for t in (pc, pr, rc, rr, lc, lr)]
    return torch.tensor(oracle(name, *lists, **kw), dtype=torch.float64)


# ---------------------------------------------------------------- tests


def plackett_luce_nll(rewards: list[float]) -> float:
    """The DPO paper's Plackett-Luce negative log-likelihood of a ranking (Rafailov et al. 2023, Eq. 18), its
    completions' rewards beta * log(pi / pi_ref) listed best first: -sum_k log(exp(r_k) / sum_{j >= k} exp(r_j))."""
    total = 0.0
    for k, r in enumerate(rewards):
        rest = rewards[k:]
        top = max(rest)
        total -= r - (top + math.log(sum(math.exp(x - top) for x in rest)))
    return total


def test_plackett_luce_sums_to_each_rankings_negative_log_likelihood():
    """Rankings of 2 to 6 completions (and a lone pair), laid out as mdpo lays them (best vs second, second vs
    third, ...; one ranking id per pair): each ranking's pair losses sum to its Plackett-Luce NLL, and the gradient
    reaching each completion's log-probs is the NLL's (float64 oracle in plain Python, finite differences)."""
    g = torch.Generator().manual_seed(7)
    sizes = [3, 2, 6, 4, 5]
    policy = [(-torch.rand(n, generator=g, dtype=torch.float64) * 60).requires_grad_() for n in sizes]
    reference = [p.detach() + torch.randn(p.shape, generator=g, dtype=torch.float64) * 4 for p in policy]
    chosen = torch.cat([p[:-1] for p in policy])
    rejected = torch.cat([p[1:] for p in policy])
    ref_chosen, ref_rejected = torch.cat([r[:-1] for r in reference]), torch.cat([r[1:] for r in reference])
    rankings = torch.cat([torch.full((n - 1,), k) for k, n in enumerate(sizes)])
    beta = 0.3
    dpo = DPOConfig(loss_type="plackett_luce", beta=beta)
    losses = pair_losses(dpo, chosen, rejected, ref_chosen, ref_rejected, rankings=rankings).losses
    per_ranking = torch.zeros(len(sizes), dtype=torch.float64).index_add(0, rankings, losses)
    rewards = lambda k: [beta * (p - r) for p, r in zip(policy[k].tolist(), reference[k].tolist())]
    for k in range(len(sizes)):
        assert math.isclose(per_ranking[k].item(), plackett_luce_nll(rewards(k)), rel_tol=1e-12), k
    losses.sum().backward()
    for k in range(len(sizes)):  # d NLL / d log pi of each completion, by central differences of the oracle
        for i in range(sizes[k]):
            shifted = [
                plackett_luce_nll([x + (beta * d if j == i else 0.0) for j, x in enumerate(rewards(k))])
                for d in (1e-6, -1e-6)
            ]
            numeric = (shifted[0] - shifted[1]) / 2e-6
            assert math.isclose(policy[k].grad[i].item(), numeric, rel_tol=1e-6, abs_tol=1e-9), (k, i)
    # a ranking of two is DPO's sigmoid loss; each pair its own ranking without `rankings`
    alone = pair_losses(dpo, chosen, rejected, ref_chosen, ref_rejected).losses
    sigmoid_losses = pair_losses(DPOConfig(beta=beta), chosen, rejected, ref_chosen, ref_rejected).losses
    torch.testing.assert_close(alone, sigmoid_losses, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(losses, alone)  # the rankings matter


def test_loss_types_exported():
    assert set(LOSS_TYPES) == set(ALL_TYPES)
    assert len(LOSS_TYPES) == len(ALL_TYPES)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_matches_oracle(name):
    batch = random_batch(seed=ALL_TYPES.index(name))
    for beta in (0.1, 0.7):
        losses, _, _ = call(name, *batch, beta=beta)
        assert losses.shape == (8,) and losses.dtype == torch.float64
        torch.testing.assert_close(losses, expected(name, *batch, beta=beta), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", SMOOTHED)
def test_label_smoothing(name):
    batch = random_batch(seed=3)
    losses, _, _ = call(name, *batch, beta=0.2, label_smoothing=0.2)
    want = expected(name, *batch, beta=0.2, eps=0.2)
    torch.testing.assert_close(losses, want, rtol=1e-10, atol=1e-10)
    plain, _, _ = call(name, *batch, beta=0.2)
    assert not torch.allclose(plain, losses)  # smoothing must actually change the loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ALL_TYPES)
def test_large_margins_finite_and_correct(name, dtype):
    for beta in (0.1, 1.0):
        check_large_margins(name, dtype, beta)


def check_large_margins(name, dtype, beta):
    pc, pr, rc, rr, lc, lr = large_batch(dtype)
    pc = pc.clone().requires_grad_(True)
    pr = pr.clone().requires_grad_(True)
    losses, chosen_r, rejected_r = call(name, pc, pr, rc, rr, lc, lr, beta=beta, label_smoothing=0.1)
    assert torch.isfinite(losses).all(), losses
    assert torch.isfinite(chosen_r).all() and torch.isfinite(rejected_r).all()
    losses.sum().backward()
    assert torch.isfinite(pc.grad).all()
    assert torch.isfinite(pr.grad).all() if name != "sft" else pr.grad is None  # sft reads only the chosen
    want = expected(name, *large_batch(), beta=beta, eps=0.1)
    assert torch.isfinite(want).all()
    tol = dict(rtol=1e-10, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(losses.double().detach(), want, **tol)


def test_half_precision_is_computed_in_float32():
    pc, pr, rc, rr, lc, lr = large_batch(torch.bfloat16)
    losses, _, _ = call("ipo", pc, pr, rc, rr, lc, lr)
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()


@pytest.mark.parametrize("name", ALL_TYPES)
def test_rewards_are_detached_beta_logratios(name):
    pc, pr, rc, rr, lc, lr = random_batch(seed=5)
    pc, pr = pc.requires_grad_(True), pr.requires_grad_(True)
    losses, chosen_r, rejected_r = call(name, pc, pr, rc, rr, lc, lr, beta=0.3)
    assert losses.requires_grad
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    f64 = torch.float64
    want_c = torch.tensor([0.3 * (a - b) for a, b in zip(pc.tolist(), rc.tolist(), strict=True)], dtype=f64)
    want_r = torch.tensor([0.3 * (a - b) for a, b in zip(pr.tolist(), rr.tolist(), strict=True)], dtype=f64)
    torch.testing.assert_close(chosen_r, want_c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rejected_r, want_r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", [t for t in ALL_TYPES if t != "sft"])  # sft reads no reference
def test_reference_free_treats_reference_as_zero(name):
    pc, pr, rc, rr, lc, lr = random_batch(seed=7)
    zeros = torch.zeros_like(pc)
    losses, chosen_r, rejected_r = call(name, pc, pr, rc, rr, lc, lr, reference_free=True)
    want = expected(name, pc, pr, zeros, zeros, lc, lr)
    torch.testing.assert_close(losses, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(chosen_r, 0.1 * pc)
    torch.testing.assert_close(rejected_r, 0.1 * pr)
    with_ref, _, _ = call(name, pc, pr, rc, rr, lc, lr)
    assert not torch.allclose(with_ref, losses)
    # reference log-probs may be omitted entirely
    no_ref, _, _ = call(name, pc, pr, None, None, lc, lr, reference_free=True)
    torch.testing.assert_close(no_ref, losses)


def test_reference_gets_no_gradient():
    pc, pr, rc, rr, lc, lr = random_batch(seed=8)
    rc, rr = rc.requires_grad_(True), rr.requires_grad_(True)
    losses, _, _ = call("sigmoid", pc.requires_grad_(True), pr, rc, rr, lc, lr)
    losses.sum().backward()
    assert rc.grad is None and rr.grad is None and pc.grad is not None


def test_weighted_list_of_losses():
    batch = random_batch(seed=11)
    names = ["sigmoid", "ipo", "apo_zero"]
    weights = [0.8, 0.2, 1.5]
    losses, _, _ = call(names, *batch, beta=0.2, loss_weights=weights)
    want = sum(w * expected(n, *batch, beta=0.2) for n, w in zip(names, weights, strict=True))
    torch.testing.assert_close(losses, want, rtol=1e-10, atol=1e-10)
    default, _, _ = call(names, *batch, beta=0.2)
    torch.testing.assert_close(default, sum(expected(n, *batch, beta=0.2) for n in names))
    single, _, _ = call(("hinge",), *batch, loss_weights=[3.0])
    torch.testing.assert_close(single, 3.0 * expected("hinge", *batch))


def test_rpo_alpha_adds_mean_token_nll_of_chosen():
    pc, pr, rc, rr, lc, lr = random_batch(seed=13)
    losses, _, _ = call("sigmoid", pc, pr, rc, rr, lc, None, rpo_alpha=0.5)
    nll = torch.tensor([-a / n for a, n in zip(pc.tolist(), lc.tolist(), strict=True)], dtype=torch.float64)
    torch.testing.assert_close(losses, expected("sigmoid", pc, pr, rc, rr, lc, lr) + 0.5 * nll)
    torch.testing.assert_close(nll_loss(pc, lc), nll)
    torch.testing.assert_close(nll_loss(pc, lc.tolist()), nll)


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm"])
def test_length_normalised_types(name):
    pc, pr, rc, rr, lc, lr = random_batch(seed=17)
    # per-token averages are unchanged when log-probs and lengths scale together...
    base, _, _ = call(name, pc, pr, rc, rr, lc, lr)
    scaled, _, _ = call(name, 3 * pc, 2 * pr, 3 * rc, 2 * rr, 3 * lc, 2 * lr)
    torch.testing.assert_close(base, scaled)
    # ...and differ from the summed-log-prob loss unless every length is 1
    unnormalised = "sigmoid" if name == "sigmoid_norm" else None
    ones = torch.ones_like(lc)
    unit, _, _ = call(name, pc, pr, rc, rr, ones, ones)
    h = [(a - b) - (c - d) for a, b, c, d in zip(*(t.tolist() for t in (pc, rc, pr, rr)), strict=True)]
    if unnormalised:
        torch.testing.assert_close(unit, expected("sigmoid", pc, pr, rc, rr, ones, ones))
    else:
        torch.testing.assert_close(unit, torch.tensor([(x - 5.0) ** 2 for x in h], dtype=torch.float64))
    assert not torch.allclose(unit, base)
    # lengths may be plain Python lists
    listed, _, _ = call(name, pc, pr, rc, rr, lc.tolist(), lr.tolist())
    torch.testing.assert_close(listed, base)


def test_bco_delta_and_discopop_tau_options():
    batch = random_batch(seed=19)
    bco, _, _ = call("bco_pair", *batch, bco_delta=0.7)
    torch.testing.assert_close(bco, expected("bco_pair", *batch, delta=0.7))
    assert not torch.allclose(bco, call("bco_pair", *batch)[0])
    disco, _, _ = call("discopop", *batch, beta=0.3, discopop_tau=0.5)
    torch.testing.assert_close(disco, expected("discopop", *batch, beta=0.3, tau=0.5))
    assert not torch.allclose(disco, call("discopop", *batch, beta=0.3)[0])


def test_aot_depends_on_batch_order_statistics_not_pairing():
    pc, pr, rc, rr, lc, lr = random_batch(seed=23)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    # shuffling only the reference pairs leaves aot (sorted) unchanged but changes sigmoid
    aot, _, _ = call("aot", pc, pr, rc, rr, lc, lr)
    aot_perm, _, _ = call("aot", pc, pr, rc[perm], rr[perm], lc, lr)
    torch.testing.assert_close(aot, aot_perm)
    sig, _, _ = call("sigmoid", pc, pr, rc, rr, lc, lr)
    sig_perm, _, _ = call("sigmoid", pc, pr, rc[perm], rr[perm], lc, lr)
    assert not torch.allclose(sig, sig_perm)


# ---------------------------------------------------------------- sft (TRL 1.16's loss type) and rpo_alpha


def test_sft_is_the_chosen_mean_token_nll_and_reads_nothing_else():
    pc, pr, rc, rr, lc, lr = random_batch(seed=29)
    nll = torch.tensor([-a / n for a, n in zip(pc.tolist(), lc.tolist(), strict=True)], dtype=torch.float64)
    alone, _, _ = preference_loss(pc, pr, rc, rr, loss_type="sft", chosen_lengths=lc)  # no rejected lengths needed
    torch.testing.assert_close(alone, nll, rtol=1e-12, atol=1e-12)
    # neither the reference, the rejected response, beta nor the f-divergence moves it (TRL's sft term reads only
    # the chosen tokens' log-probs)
    for kw in (dict(reference_free=True), dict(beta=0.9), dict(f_divergence="js_divergence")):
        other, _, _ = preference_loss(pc, 2 * pr, rc + 3, rr, loss_type="sft", chosen_lengths=lc, **kw)
        torch.testing.assert_close(other, nll, rtol=1e-12, atol=1e-12)
    scaled, _, _ = preference_loss(pc, pr, rc, rr, loss_type="sft", chosen_lengths=2 * lc)
    torch.testing.assert_close(scaled, nll / 2)


def test_sft_in_a_weighted_mixture():
    batch = random_batch(seed=31)
    names, weights = ["sigmoid", "sft", "ipo"], [1.0, 0.3, 0.2]
    losses, _, _ = call(names, *batch, beta=0.2, loss_weights=weights)
    want = sum(w * expected(n, *batch, beta=0.2) for n, w in zip(names, weights, strict=True))
    torch.testing.assert_close(losses, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(losses, call(["sigmoid", "ipo"], *batch, beta=0.2, loss_weights=[1.0, 0.2])[0])


@pytest.mark.parametrize("base", ["sigmoid", "ipo", "bco_pair"])
def test_rpo_alpha_equals_a_weighted_sft_term(base):
    """rpo_alpha: a is the older spelling of loss_type [base, sft] with loss_weights [1, a]."""
    pc, pr, rc, rr, lc, lr = random_batch(seed=37)
    a = 0.35
    listed, _, _ = call([base, "sft"], pc, pr, rc, rr, lc, lr, loss_weights=[1.0, a])
    rpo, _, _ = call(base, pc, pr, rc, rr, lc, lr, rpo_alpha=a)
    torch.testing.assert_close(listed, rpo, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(
        rpo, expected(base, pc, pr, rc, rr, lc, lr) + a * expected("sft", pc, pr, rc, rr, lc, lr)
    )
    # the training step's view: the listed sft is a term (logged as loss/sft), rpo_alpha's is `nll` (nll_loss)
    listed_out = pair_losses(DPOConfig(loss_type=[base, "sft"], loss_weights=[1.0, a]), pc, pr, rc, rr, lc, lr)
    rpo_out = pair_losses(DPOConfig(loss_type=base, rpo_alpha=a), pc, pr, rc, rr, lc, lr)
    assert list(listed_out.terms) == [base, "sft"] and listed_out.nll is None
    assert list(rpo_out.terms) == [base] and rpo_out.nll is not None
    torch.testing.assert_close(listed_out.terms["sft"], rpo_out.nll, rtol=0, atol=0)
    torch.testing.assert_close(listed_out.terms["sft"], expected("sft", pc, pr, rc, rr, lc, lr), rtol=1e-12, atol=0)
    torch.testing.assert_close(listed_out.losses, rpo_out.losses, rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------- f-divergences (TRL 1.16's f_divergence_type)


@pytest.mark.parametrize("f", F_DIVERGENCES)
@pytest.mark.parametrize("name", F_TYPES)
def test_f_divergence_matches_oracle(name, f):
    # log-ratios of a few nats, as in training (random_batch's reach +/-25: forward KL's exp(25) would dominate)
    pc, pr, rc, rr, lc, lr = random_batch(seed=41 + F_TYPES.index(name))
    rc, rr = pc + (rc - pc) / 4, pr + (rr - pr) / 4
    eps = 0.1 if name in ("robust", "exo_pair") else 0.0
    for beta, alpha in ((0.1, 0.5), (0.5, 0.2), (0.3, 1.7)):
        kw = dict(beta=beta, label_smoothing=eps)
        losses, chosen_r, _ = call(name, pc, pr, rc, rr, lc, lr, f_divergence=f, f_alpha_coef=alpha, **kw)
        want = expected(name, pc, pr, rc, rr, lc, lr, beta=beta, eps=eps, f=f, alpha=alpha)
        torch.testing.assert_close(losses, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(chosen_r, beta * (pc - rc))  # rewards stay beta * log-ratio, as TRL logs them
        plain, _, _ = call(name, pc, pr, rc, rr, lc, lr, **kw)
        # teeth: every divergence but reverse KL changes every loss that compares scores (sft compares none)
        assert torch.allclose(plain, losses) == (f == "reverse_kl" or name == "sft"), (name, f, alpha)


def test_f_divergence_in_a_weighted_mixture():
    pc, pr, rc, rr, lc, lr = random_batch(seed=43)
    rc, rr = pc + (rc - pc) / 4, pr + (rr - pr) / 4
    names, weights = ["sigmoid", "ipo", "sft"], [1.0, 0.5, 0.25]
    kw = dict(f_divergence="alpha_divergence", f_alpha_coef=0.3)
    losses, _, _ = call(names, pc, pr, rc, rr, lc, lr, loss_weights=weights, **kw)
    want = sum(
        w * expected(n, pc, pr, rc, rr, lc, lr, f="alpha_divergence", alpha=0.3)
        for n, w in zip(names, weights, strict=True)
    )
    torch.testing.assert_close(losses, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_divergence_near_one_is_reverse_kl(dtype):
    pc, pr, rc, rr, lc, lr = random_batch(seed=47, dtype=dtype)
    rc, rr = pc + (rc - pc) / 4, pr + (rr - pr) / 4
    reverse, _, _ = call("sigmoid", pc, pr, rc, rr, lc, lr, f_divergence="reverse_kl")
    # within TRL's 1e-6 of alpha = 1: exactly the limit, f'(t) = log t
    for alpha in (1.0, 1.0 + 5e-7, 1.0 - 9e-7):
        limit, _, _ = call("sigmoid", pc, pr, rc, rr, lc, lr, f_divergence="alpha_divergence", f_alpha_coef=alpha)
        assert torch.equal(limit, reverse), alpha
    # just outside it the formula is used, continuous with the limit (in float32 too: no exp(t) - 1 cancellation)
    for alpha in (1.0 + 2e-6, 1.0 - 2e-6, 1.0 + 1e-4):
        near, _, _ = call("sigmoid", pc, pr, rc, rr, lc, lr, f_divergence="alpha_divergence", f_alpha_coef=alpha)
        want = expected("sigmoid", pc, pr, rc, rr, lc, lr, f="alpha_divergence", alpha=alpha)
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(near.double(), want, **tol)
        torch.testing.assert_close(near.double(), reverse.double(), rtol=5e-3, atol=0)
        assert not torch.equal(near, reverse)


def test_alpha_divergence_exponent_is_clamped_as_in_trl():
    # alpha = 2: the score of log-ratio x is e^x - 1, with x clamped at 80 (TRL's float32 bound), so a rejected
    # log-ratio of 100 scores e^80 - 1: hinge is then 1 + beta * (e^80 - 1 - score(chosen)), not 1 + beta * e^100
    pc = torch.tensor([-20.0, -30.0], dtype=torch.float64)
    pr = torch.tensor([-10.0, -40.0], dtype=torch.float64)
    rc = pc - torch.tensor([0.5, -1.0], dtype=torch.float64)
    rr = pr - torch.tensor([100.0, 2.0], dtype=torch.float64)
    lc = lr = torch.ones(2, dtype=torch.float64)
    losses, _, _ = call("hinge", pc, pr, rc, rr, lc, lr, beta=0.1, f_divergence="alpha_divergence", f_alpha_coef=2.0)
    torch.testing.assert_close(losses, expected("hinge", pc, pr, rc, rr, lc, lr, f="alpha_divergence", alpha=2.0))
    clamped = 1 + 0.1 * ((math.exp(80) - 1) - (math.exp(0.5) - 1))
    assert losses[0].item() == pytest.approx(clamped, rel=1e-12)
    unclamped = 1 + 0.1 * ((math.exp(100) - 1) - (math.exp(0.5) - 1))
    assert losses[0].item() != pytest.approx(unclamped, rel=1e-3)
    assert losses[1].item() == pytest.approx(max(0.0, 1 - 0.1 * ((math.exp(-1) - 1) - (math.exp(2) - 1))), rel=1e-12)
    # float32: the same clamp keeps the score finite where e^100 would overflow
    f32 = [t.float() for t in (pc, pr, rc, rr, lc, lr)]
    losses32, _, _ = call("hinge", *f32, beta=0.1, f_divergence="alpha_divergence", f_alpha_coef=2.0)
    assert torch.isfinite(losses32).all()
    torch.testing.assert_close(losses32.double(), losses, rtol=1e-5, atol=0)


REFUSED = tuple(t for t in ALL_TYPES if t not in F_TYPES)


@pytest.mark.parametrize("f", F_DIVERGENCES[1:])
@pytest.mark.parametrize("name", REFUSED)
def test_f_divergence_refused_for_other_loss_types(name, f):
    assert set(REFUSED) == {
        "nca_pair",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "plackett_luce",
    }
    with pytest.raises(ConfigError) as info:
        DPOConfig(loss_type=["sigmoid", name], f_divergence=f)
    assert str(info.value) == (
        f"dpo.f_divergence={f} applies only to loss types sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, "
        f"discopop, sft (f-DPO's log Z(x) cancels only in a chosen-rejected difference), got dpo.loss_type "
        f"'{name}'; use dpo.f_divergence=reverse_kl with it"
    )
    DPOConfig(loss_type=["sigmoid", name])  # reverse KL (plain DPO) takes every loss type


B = 4
_x = torch.full((B,), -10.0)
_len = torch.full((B,), 5.0)

ERROR_CASES = [
    (dict(loss_type="dpo"), ["'dpo'", "sigmoid", "aot_unpaired"]),
    (dict(loss_type=["sigmoid", "bogus"]), ["'bogus'", "loss_type"]),
    (dict(loss_type=[]), ["loss_type"]),
    (dict(beta=0.0), ["beta", "0.0"]),
    (dict(beta=-0.5), ["beta", "-0.5"]),
    (dict(beta=float("nan")), ["beta", "nan"]),
    (dict(label_smoothing=-0.1), ["label_smoothing", "-0.1"]),
    (dict(label_smoothing=0.5), ["label_smoothing", "0.5"]),
    (dict(label_smoothing=0.7, loss_type="hinge"), ["label_smoothing", "0.7"]),
    (dict(label_smoothing=0.5, loss_type="robust"), ["label_smoothing", "0.5", "robust"]),
    (dict(frobnicate=1.0), ["'frobnicate'", "bco_delta"]),
    (dict(discopop_tau=0.0, loss_type="discopop"), ["discopop_tau", "0.0"]),
    (dict(loss_type="ipo", chosen_lengths=None), ["chosen_lengths", "ipo"]),
    (dict(loss_type="ipo", rejected_lengths=None), ["rejected_lengths", "ipo"]),
    (dict(loss_type=["sigmoid", "sigmoid_norm"], chosen_lengths=None), ["chosen_lengths", "sigmoid_norm"]),
    (dict(rpo_alpha=1.0, chosen_lengths=None), ["chosen_lengths", "rpo_alpha"]),
    (dict(rpo_alpha=-1.0), ["rpo_alpha", "-1.0"]),
    (dict(loss_type="ipo", chosen_lengths=torch.tensor([5.0, 0.0, 5.0, 5.0])), ["chosen_lengths", "0"]),
    (dict(loss_type="sigmoid_norm", rejected_lengths=[5, 5, -3, 5]), ["rejected_lengths", "-3"]),
    (dict(loss_type="ipo", chosen_lengths=torch.full((B + 1,), 5.0)), ["chosen_lengths", f"({B + 1},)"]),
    (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), ["loss_weights", "1.0"]),
    (dict(loss_weights=[-2.0]), ["loss_weights", "-2.0"]),
    (dict(policy_rejected_logps=torch.zeros(B - 1)), ["policy_rejected_logps", f"({B - 1},)"]),
    (dict(ref_chosen_logps=torch.zeros(B + 2)), ["ref_chosen_logps", f"({B + 2},)"]),
    (dict(ref_rejected_logps=torch.zeros(B, 1)), ["ref_rejected_logps", f"({B}, 1)"]),
    (dict(policy_chosen_logps=torch.zeros(B, 2)), ["policy_chosen_logps", f"({B}, 2)"]),
    (dict(ref_chosen_logps=None), ["ref_chosen_logps", "reference_free"]),
    (dict(loss_type="sft", chosen_lengths=None), ["chosen_lengths", "'sft'"]),
    (dict(loss_type=["ipo", "sft"], rejected_lengths=None), ["rejected_lengths", "'ipo'"]),
    (
        dict(f_divergence="kl"),
        ["dpo.f_divergence must be reverse_kl, forward_kl, js_divergence or alpha_divergence, got 'kl'"],
    ),
    (dict(f_divergence="js_divergence", loss_type=["sft", "apo_zero"]), ["f_divergence=js_divergence", "'apo_zero'"]),
    (dict(f_divergence="alpha_divergence", f_alpha_coef=float("inf")), ["dpo.f_alpha_coef must be finite", "inf"]),
]


@pytest.mark.parametrize(("overrides", "needles"), ERROR_CASES, ids=[str(c[0])[:60] for c in ERROR_CASES])
def test_errors(overrides, needles):
    args = dict(
        policy_chosen_logps=_x,
        policy_rejected_logps=_x - 1,
        ref_chosen_logps=_x + 1,
        ref_rejected_logps=_x,
        chosen_lengths=_len,
        rejected_lengths=_len,
    )
    args.update(overrides)
    positional = [args.pop(k) for k in list(args)[:4]]
    with pytest.raises(ConfigError) as info:
        preference_loss(*positional, **args)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_valid_baseline_of_error_cases_does_not_raise():
    # guards test_errors: the shared arguments alone must be accepted
    losses, _, _ = preference_loss(
        _x, _x - 1, _x + 1, _x, loss_type=["ipo", "sigmoid_norm"], chosen_lengths=_len, rejected_lengths=_len
    )
    assert torch.isfinite(losses).all()


def test_nll_loss_errors():
    with pytest.raises(ConfigError, match=re.escape("chosen_lengths")):
        nll_loss(_x, torch.zeros(B))
    with pytest.raises(ConfigError, match=re.escape(f"({B + 1},)")):
        nll_loss(_x, torch.ones(B + 1))


# ---------------------------------------------------------------- TRL 1.16's own loss code, where TRL is installed


def trl_loss(
    per_token,
    completion_mask,
    ref_chosen,
    ref_rejected,
    loss_types,
    loss_weights=None,
    *,
    ld_alpha=None,
    log_sum_sq=None,
    **settings,
):
    """TRL 1.16's DPOTrainer._compute_loss run on given per-token log-probs: a stand-in trainer holds what the
    method reads, and a stand-in model returns the log-probs (zero off the completion, as TRL's fused head) and,
    for WPO (`log_sum_sq` given: use_weighting), the per-token log sum_v p_v^2."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    outputs = types.SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
        log_sum_sq_probs=log_sum_sq,
    )
    identity = lambda t: t  # one process: gathers are identities
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=False),
        accelerator=types.SimpleNamespace(device=per_token.device, gather_for_metrics=identity, gather=identity),
        aux_loss_enabled=False,
        ld_alpha=ld_alpha,
        precompute_ref_logps=True,  # reference log-probs come in the inputs
        use_weighting=log_sum_sq is not None,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        args=types.SimpleNamespace(discopop_tau=0.05),
        loss_types=list(loss_types),
        loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=settings.get("beta", 0.1),
        label_smoothing=settings.get("label_smoothing", 0.0),
        f_divergence_type=settings.get("f_divergence", "reverse_kl"),
        f_alpha_divergence_coef=settings.get("f_alpha_coef", 0.5),
    )
    inputs = dict(
        input_ids=torch.zeros(completion_mask.shape, dtype=torch.long),
        attention_mask=torch.ones_like(completion_mask),
        completion_mask=completion_mask,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
    )
    return trl_dpo.DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)


def token_batch(chosen_lengths, rejected_lengths, seed=0):
    """Per-token log-probs of [chosen rows; rejected rows] after a 3-token prompt, the completion mask, and the
    summed log-probs, lengths and reference log-probs mdpo takes."""
    lengths = torch.tensor(list(chosen_lengths) + list(rejected_lengths))
    g = torch.Generator().manual_seed(seed)
    width = 3 + int(lengths.max()) + 2  # two columns of padding
    positions = torch.arange(width)
    completion_mask = ((positions >= 3) & (positions < 3 + lengths[:, None])).long()
    shift_mask = completion_mask[:, 1:]
    per_token = (-3 * torch.rand(shift_mask.shape, generator=g)) * shift_mask
    sums = per_token.sum(dim=1)
    ref = sums + 1.5 * torch.randn(sums.shape, generator=g)
    n = len(chosen_lengths)
    counts = shift_mask.sum(dim=1).float()
    mdpo_args = (sums[:n], sums[n:], ref[:n], ref[n:], counts[:n], counts[n:])
    return per_token, completion_mask, mdpo_args


def test_matches_trl_own_loss_code():
    per_token, mask, (pc, pr, rc, rr, lc, lr) = token_batch([5, 2, 7, 4], [3, 6, 1, 5])
    for f in F_DIVERGENCES:
        for name in F_TYPES[:-1]:  # sft: below
            kw = dict(beta=0.3, f_divergence=f, f_alpha_coef=0.4)
            kw["label_smoothing"] = 0.1 if name in ("robust", "exo_pair") else 0.0  # TRL 1.16's sigmoid has none
            want = trl_loss(per_token, mask, rc, rr, [name], **kw)
            losses, _, _ = call(name, pc, pr, rc, rr, lc, lr, **kw)
            torch.testing.assert_close(losses.mean(), want, rtol=2e-6, atol=1e-6, msg=f"{name} {f}")
    kw = dict(f_divergence="alpha_divergence", f_alpha_coef=1.0 + 5e-7)
    want = trl_loss(per_token, mask, rc, rr, ["sigmoid", "ipo"], [1.0, 0.5], **kw)
    losses, _, _ = call(["sigmoid", "ipo"], pc, pr, rc, rr, lc, lr, loss_weights=[1.0, 0.5], **kw)
    torch.testing.assert_close(losses.mean(), want, rtol=2e-6, atol=1e-6)


def test_sft_against_trl_which_pools_the_batch_chosen_tokens():
    # TRL 1.16 takes the mean over every chosen token of its (per-device) batch; mdpo each pair's mean, averaged
    # over pairs. They agree when the chosen lengths are equal...
    per_token, mask, (pc, pr, rc, rr, lc, lr) = token_batch([4, 4, 4], [2, 6, 3], seed=1)
    want = trl_loss(per_token, mask, rc, rr, ["sigmoid", "sft"], [1.0, 0.7])
    listed, _, _ = call(["sigmoid", "sft"], pc, pr, rc, rr, lc, lr, loss_weights=[1.0, 0.7])
    rpo, _, _ = call("sigmoid", pc, pr, rc, rr, lc, lr, rpo_alpha=0.7)
    torch.testing.assert_close(listed.mean(), want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(rpo.mean(), want, rtol=2e-6, atol=1e-6)
    # ...and otherwise TRL weights each pair by its chosen length: sum of chosen NLLs over all chosen tokens
    per_token, mask, (pc, pr, rc, rr, lc, lr) = token_batch([1, 9, 3], [2, 6, 3], seed=2)
    want = trl_loss(per_token, mask, rc, rr, ["sft"])
    pooled = -sum(pc.tolist()) / sum(lc.tolist())
    assert want.item() == pytest.approx(pooled, rel=1e-6)
    per_pair, _, _ = preference_loss(pc, pr, rc, rr, loss_type="sft", chosen_lengths=lc)
    means = [-a / n for a, n in zip(pc.tolist(), lc.tolist(), strict=True)]
    assert per_pair.mean().item() == pytest.approx(sum(means) / len(means), rel=1e-6)
    assert per_pair.mean().item() != pytest.approx(pooled, rel=1e-3)


def test_ld_alpha_and_wpo_weights_against_trl_own_loss_code():
    """LD-DPO's weighted sums and WPO's pair weights, given to pair_losses, against TRL 1.16 with ld_alpha and
    use_weighting on the same per-token values (equal chosen lengths, so TRL's pooled sft is the per-pair mean; the
    rejected ones longer and shorter, so tails fall on both sides). The tail mask is TRL's: 1-based completion
    position > min(chosen, rejected length); mdpo builds its own in data.batching (test_oracle_hf checks it)."""
    per_token, mask, (pc, pr, rc, rr, lc, lr) = token_batch([4, 4, 4, 4], [3, 6, 1, 5], seed=3)
    shift = mask[:, 1:]
    log_sum_sq = -2 * torch.rand(per_token.shape, generator=torch.Generator().manual_seed(4)) * shift
    n, alpha = 4, 0.4
    lengths = shift.sum(dim=1)
    shorter = torch.minimum(lengths[:n], lengths[n:]).repeat(2)
    tail = shift.cumsum(dim=1) > shorter[:, None]
    ld = (per_token * torch.where(tail, alpha, 1.0)).sum(dim=1)
    aligned = ((per_token - log_sum_sq) * shift).sum(dim=1)
    weights = wpo_weights(aligned[:n], aligned[n:], lc, lr)
    assert weights.std() > 0.01  # pairs weighted differently: a weight dropped or swapped would show
    cases = [
        (["sigmoid"], None, {}),
        (["sigmoid", "sft"], [1.0, 0.5], {}),
        (["ipo"], None, {}),
        (["hinge"], None, {"f_divergence": "js_divergence"}),
    ]
    for loss_types, loss_weights, extra in cases:
        for use_ld, use_wpo in ((True, False), (False, True), (True, True)):
            if use_wpo and "sft" in loss_types:
                continue  # TRL 1.16 raises there: it scales sft's expanded scalar in place (*=)
            want = trl_loss(
                per_token,
                mask,
                rc,
                rr,
                loss_types,
                loss_weights,
                ld_alpha=alpha if use_ld else None,
                log_sum_sq=log_sum_sq if use_wpo else None,
                beta=0.2,
                **extra,
            )
            dpo = DPOConfig(
                loss_type=loss_types,
                loss_weights=loss_weights,
                beta=0.2,
                ld_alpha=alpha if use_ld else None,
                use_weighting=use_wpo,
                **extra,
            )
            chosen, rejected = (ld[:n], ld[n:]) if use_ld else (pc, pr)
            out = pair_losses(
                dpo, chosen, rejected, rc, rr, lc, lr, sft_chosen=pc, pair_weights=weights if use_wpo else None
            )
            torch.testing.assert_close(
                out.losses.mean(), want, rtol=2e-6, atol=1e-6, msg=f"{loss_types} ld={use_ld} wpo={use_wpo}"
            )


def test_wpo_weights_float64():
    """exp(mean aligned log-prob) of each response, multiplied; lengths below 1 clamp as TRL's clamp_min(1)."""
    chosen, rejected = torch.tensor([-2.0, -0.5, -9.0]), torch.tensor([-1.0, -3.0, 0.0])
    lc, lr = torch.tensor([4.0, 1.0, 3.0]), torch.tensor([2.0, 6.0, 0.0])
    want = [
        math.exp(c / max(a, 1.0)) * math.exp(r / max(b, 1.0))
        for c, r, a, b in zip(chosen.tolist(), rejected.tolist(), lc.tolist(), lr.tolist())
    ]
    got = wpo_weights(chosen.requires_grad_(), rejected, lc, lr)
    assert not got.requires_grad
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)


def test_bco_pair_shifts_by_the_running_mean_unless_bco_delta_is_set():
    """With dpo.bco_delta null the step passes the running mean (bco_mean); a number overrides it."""
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-3.0, -5.0], [-4.0, -2.0], [-3.5, -4.0], [-3.0, -3.0]))
    running = pair_losses(DPOConfig(loss_type="bco_pair", beta=0.5), pc, pr, rc, rr, bco_mean=0.3).losses
    fixed = pair_losses(DPOConfig(loss_type="bco_pair", beta=0.5, bco_delta=0.3), pc, pr, rc, rr, bco_mean=9.0).losses
    c, r = 0.5 * (pc - rc).double() - 0.3, 0.5 * (pr - rr).double() - 0.3
    want = -F.logsigmoid(c) - F.logsigmoid(-r)
    torch.testing.assert_close(running.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(fixed.double(), want, rtol=1e-6, atol=0)
