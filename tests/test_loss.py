"""mdpo.loss against float64 oracles written here from the papers / TRL 0.28 math, in plain Python."""

import math
import re

import pytest
import torch

from mdpo.errors import ConfigError
from mdpo.loss import LOSS_TYPES, nll_loss, preference_loss

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
)
SMOOTHED = ("sigmoid", "sigmoid_norm", "robust", "exo_pair", "aot", "aot_unpaired")


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


def oracle(name, pc, pr, rc, rr, lc=None, lr=None, *, beta=0.1, eps=0.0, delta=0.0, tau=0.05):
    """Expected per-pair losses for lists of floats (policy/ref chosen/rejected, lengths)."""
    n = len(pc)
    ch = [pc[i] - rc[i] for i in range(n)]  # log pi/pi_ref on chosen
    rj = [pr[i] - rr[i] for i in range(n)]
    h = [ch[i] - rj[i] for i in range(n)]  # DPO logit
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
            hn = ch[i] / lc[i] - rj[i] / lr[i]
            out.append((hn - 1 / (2 * beta)) ** 2)
        elif name == "sigmoid_norm":
            hn = ch[i] / lc[i] - rj[i] / lr[i]
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
            out.append(sigmoid(beta * ch[i]) + (1 - sigmoid(z)))
        elif name == "discopop":
            m = sigmoid(z / tau)
            # e^-z overflows a double beyond ~709; there use e^-z * m = exp(-z + log m)
            exp_part = math.exp(-z) * m if -z < 700 else math.exp(-z + log_sigmoid(z / tau))
            out.append(-log_sigmoid(z) * (1 - m) + exp_part)
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
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
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


@pytest.mark.parametrize("name", ALL_TYPES)
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
