"""mdpo.training.vocab_head.token_logps against a float64 oracle, today's vocab-parallel path, at TP=1 and TP=2,
in bf16, and its memory bound (no [tokens, vocab/TP] tensor is ever created when chunked)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_mdpo, subprocess_env

PADDED, VOCAB = 256, 250  # 6 padding columns, all in the last TP shard


def make_case(n: int, *, vocab_size: int = VOCAB, padded: int = PADDED, h: int = 32, seed: int = 0) -> dict:
    """fp32 inputs with peaked softmaxes (logit std ~3), random padding rows (so that counting them would show), and
    labels on both sides of the TP=2 shard boundary and at the last real id."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab_size, (n,), generator=g)
    labels[:4] = torch.tensor([vocab_size - 1, 0, padded // 2 - 1, padded // 2]).clamp(max=vocab_size - 1)
    return {
        "hidden": torch.randn(n, h, generator=g),
        "weight": torch.randn(padded, h, generator=g) * 3 / h**0.5,
        "labels": labels,
        "vocab_size": vocab_size,
        "upstream": torch.randn(n, generator=g),
    }


def oracle(case: dict) -> dict[str, torch.Tensor]:
    """Plain float64 PyTorch on the full weight: masked full logits, log_softmax, gather; autograd for the grads; WPO's
    log sum_v p_v^2 as a logsumexp of the doubled log-probs."""
    hidden = case["hidden"].double().requires_grad_()
    weight = case["weight"].double().requires_grad_()
    logits = hidden @ weight.t()
    real = torch.arange(weight.shape[0]) < case["vocab_size"]
    logps = logits.masked_fill(~real, float("-inf")).log_softmax(dim=-1).gather(1, case["labels"][:, None])[:, 0]
    (logps * case["upstream"].double()).sum().backward()
    means = logits.detach()[:, real].mean(dim=-1)
    square = (2 * logits.detach()[:, real].log_softmax(dim=-1)).logsumexp(dim=-1)
    return {
        "logps": logps.detach(),
        "means": means,
        "square": square,
        "grad_hidden": hidden.grad,
        "grad_weight": weight.grad,
    }


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference, relative to the reference's largest magnitude (absolute where that is 0: an
    all-padding shard's weight grad); NaN-free, as a NaN would compare as passing."""
    assert ours.shape == reference.shape
    err = (ours.double() - reference.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    assert err == err and scale == scale, "NaN"
    return err / scale if scale else err


def ours(case: dict, chunk_tokens: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    from mdpo.training.vocab_head import token_logps

    hidden = case["hidden"].to(dtype).requires_grad_()
    weight = case["weight"].to(dtype).requires_grad_()
    logps, means, square = token_logps(
        hidden, weight, case["labels"], case["vocab_size"], chunk_tokens, square_mass=True
    )
    assert logps.dtype == means.dtype == square.dtype == torch.float32
    assert not (means.requires_grad or square.requires_grad)
    (logps * case["upstream"]).sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == dtype
    return {
        "logps": logps.detach(),
        "means": means,
        "square": square,
        "grad_hidden": hidden.grad,
        "grad_weight": weight.grad,
    }


@pytest.mark.parametrize("chunk_tokens", [1, 7, 37, 100])
def test_tp1_matches_float64_oracle(megatron_world, chunk_tokens):
    """fp32 at TP=1, chunks of one token, not dividing n, exactly n and more than n: <= 1e-6 of the max."""
    case = make_case(37)
    expected = oracle(case)
    got = ours(case, chunk_tokens)
    errors = {k: rel_err(got[k], expected[k]) for k in expected}
    assert max(errors.values()) <= 1e-6, errors
    assert expected["grad_weight"][VOCAB:].abs().max() == 0 and got["grad_weight"][VOCAB:].abs().max() == 0
    assert expected["logps"].std() > 1.0  # a peaked softmax: wrong columns or a wrong max would show


def test_tp1_matches_megatron_vocab_parallel_cross_entropy(megatron_world):
    """Today's path (full logits, padding at -inf, Megatron's vocab_parallel_cross_entropy): equal to <= 5e-7."""
    from megatron.core import tensor_parallel

    case = make_case(37, seed=1)
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    logits = hidden @ weight.t()
    means = logits.detach()[:, :VOCAB].sum(dim=-1) / VOCAB
    masked = logits.masked_fill(torch.arange(PADDED) >= VOCAB, float("-inf"))
    logps = -tensor_parallel.vocab_parallel_cross_entropy(masked, case["labels"])
    (logps * case["upstream"]).sum().backward()
    today = {"logps": logps.detach(), "means": means, "grad_hidden": hidden.grad, "grad_weight": weight.grad}
    got = ours(case, chunk_tokens=5)
    errors = {k: rel_err(got[k], today[k]) for k in today}
    assert max(errors.values()) <= 5e-7, errors


def test_bf16_within_bf16_tolerance(megatron_world):
    """bf16 inputs (logits from a bf16 matmul, then fp32): logps and grads near the oracle on the same bf16 values."""
    case = make_case(64, seed=2)
    case.update(hidden=case["hidden"].bfloat16().float(), weight=case["weight"].bfloat16().float())
    expected = oracle(case)
    got = ours(case, chunk_tokens=16, dtype=torch.bfloat16)
    errors = {k: rel_err(got[k], expected[k]) for k in expected}
    assert errors["logps"] <= 4e-3 and errors["means"] <= 4e-3, errors  # measured 1.4e-3 and 1.9e-3
    assert errors["grad_hidden"] <= 1.5e-2 and errors["grad_weight"] <= 1.5e-2, errors  # measured 7.0e-3, 4.7e-3


def test_bf16_math_after_the_matmul_is_fp32(megatron_world):
    """bf16 inputs whose logits are exact in bf16 (h=16, entries -1/0/1 times multiples of 1/8), so that the bf16
    matmul's summation order cannot matter. Then logps and means equal the oracle's to fp32 precision (bf16 math
    would be ~1e-3 off), and the grads equal the fp64 logit grad rounded to bf16 and multiplied out in one bf16
    matmul each (one chunk, so weight's grad is rounded once); a bf16 softmax in backward is 5e-3 off."""
    case = make_case(64, h=16, seed=6)
    g = torch.Generator().manual_seed(6)
    case.update(
        hidden=torch.randint(-1, 2, (64, 16), generator=g).float(),
        weight=torch.randint(-8, 9, (PADDED, 16), generator=g) / 8,
    )
    expected = oracle(case)
    hidden, weight = case["hidden"].double(), case["weight"].double()
    logits = (hidden @ weight.t()).requires_grad_()
    real = torch.arange(PADDED) < VOCAB
    logps = logits.masked_fill(~real, float("-inf")).log_softmax(dim=-1).gather(1, case["labels"][:, None])[:, 0]
    (logps * case["upstream"].double()).sum().backward()
    grad_logits = logits.grad.bfloat16().double()
    expected["grad_hidden"] = (grad_logits @ weight).bfloat16()
    expected["grad_weight"] = (grad_logits.t() @ hidden).bfloat16()
    got = ours(case, chunk_tokens=64, dtype=torch.bfloat16)
    errors = {k: rel_err(got[k], expected[k]) for k in expected}
    assert errors["logps"] <= 1e-6 and errors["means"] <= 1e-6, errors
    assert errors["grad_hidden"] <= 2e-3 and errors["grad_weight"] <= 2e-3, errors  # half a bf16 ulp at the max
    assert expected["logps"].std() > 1.0


def tp2_cases() -> list[dict]:
    """Padding in the last shard at three chunk sizes; a last shard that is all padding; sequence parallelism."""
    cases = [{**make_case(37, seed=3), "chunk_tokens": c, "sp": False} for c in (1, 5, 64)]
    cases.append({**make_case(37, vocab_size=100, seed=4), "chunk_tokens": 8, "sp": False})
    cases.append({**make_case(38, seed=5), "chunk_tokens": 5, "sp": True})
    return cases


def test_tp2_matches_float64_oracle(tmp_path):
    """Two ranks, each with half of the padded vocabulary, under torchrun (gloo): the oracle on the full weight."""
    cases = tp2_cases()
    torch.save(cases, tmp_path / "cases.pt")
    worker = REPO / "tests" / "workers" / "vocab_head_tp2.py"
    result = run_mdpo([str(worker), str(tmp_path / "cases.pt"), str(tmp_path)], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i, case in enumerate(cases):
        expected = oracle(case)
        n_local, v_local = len(case["labels"]) // 2, PADDED // 2
        for r, got in enumerate(rank[i] for rank in ranks):
            own = {"grad_weight": slice(r * v_local, (r + 1) * v_local)}
            if case["sp"]:
                own["grad_hidden"] = slice(r * n_local, (r + 1) * n_local)
            errors = {k: rel_err(got[k], expected[k][own.get(k, slice(None))]) for k in expected}
            assert max(errors.values()) <= 1e-6, (i, r, errors)
        if not case["sp"]:
            assert torch.equal(ranks[0][i]["grad_hidden"], ranks[1][i]["grad_hidden"])
        assert torch.equal(ranks[0][i]["logps"], ranks[1][i]["logps"])


MEMORY_SCRIPT = """
import json, sys, torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from mdpo import parallel, startup
startup.prepare()
from megatron.core import tensor_parallel
from mdpo.config import Layout
from mdpo.training.vocab_head import token_logps

class Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out

n, v_local, vocab_size, h = 2048, 32768, 32000, 64
parallel.start(Layout(tp=1))
g = torch.Generator().manual_seed(0)
labels = torch.randint(0, vocab_size, (n,), generator=g)
hidden_data, weight_data = torch.randn(n, h, generator=g), torch.randn(v_local, h, generator=g) / h**0.5
def today(hidden, weight):
    logits = (hidden @ weight.t()).masked_fill(torch.arange(v_local) >= vocab_size, float("-inf"))
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
runs = {"chunked": lambda x, w: token_logps(x, w, labels, vocab_size, 256)[0],
        "unchunked": lambda x, w: token_logps(x, w, labels, vocab_size, n)[0], "today": today}
out = {}
for name, fn in runs.items():
    hidden, weight = hidden_data.clone().requires_grad_(), weight_data.clone().requires_grad_()
    with Largest() as fwd:
        loss = fn(hidden, weight).sum()
    with Largest() as bwd:
        loss.backward()
    out[name] = {"forward": fwd.numel, "backward": bwd.numel}
parallel.stop()
print(json.dumps(out))
"""


def test_chunked_never_creates_full_logits(tmp_path):
    """n=2048, v_local=32768 (32000 real): the largest tensor any op creates, forward and backward, recorded by a
    dispatch mode in a fresh process. Chunked by 256 it is one chunk's logits; unchunked (and today) n x vocab."""
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    env = subprocess_env(PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    largest = json.loads(result.stdout.strip().splitlines()[-1])
    n, v_local, vocab_size = 2048, 32768, 32000
    assert largest["chunked"] == {"forward": 256 * vocab_size, "backward": 256 * vocab_size}, largest
    assert largest["unchunked"] == {"forward": n * vocab_size, "backward": n * vocab_size}, largest
    assert min(largest["today"].values()) >= n * v_local, largest  # the recorder sees backward's tensors too
