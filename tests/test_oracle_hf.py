"""Oracle 1: mdpo's log-probs and DPO loss against HF LlamaForCausalLM and a float64 reimplementation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ROW_LAYOUTS as LAYOUTS
from conftest import (
    VOCAB,
    collate_as,
    hf_logps_float64,
    mdpo_logps,
    mdpo_model,
    model_config,
    model_config_of,
    preference_loss,
    random_pairs,
    tiny_hf_llama,
)


@pytest.mark.parametrize("attention", ["local", "sdpa"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sequence_logps_equal_hf_float64(megatron_world, layout, attention):
    """Each sequence a row, all eight packed in one row, each pair one row with its prompt once, and those pair rows
    packed: every layout gives HF's log-probs of every sequence run alone, with Megatron's local attention and with
    torch SDPA as the core attention (blocks attended one by one on CPU: no [s, s] mask)."""
    hf = tiny_hf_llama(seed=0, vocab_size=VOCAB)
    pairs = random_pairs()
    cfg = model_config(hf.config)
    cfg.attention = attention
    got = mdpo_logps(mdpo_model(hf, attention), pairs, layout, cfg)
    want = [hf_logps_float64(hf, p.prompt, p.chosen) for p in pairs]
    want += [hf_logps_float64(hf, p.prompt, p.rejected) for p in pairs]
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-5), (got, want)


def test_fused_swiglu_gives_hf_logps_and_autograds_gradients(megatron_world):
    """model.fused_swiglu (Megatron's SwiGLUFunction, torch.compile'd, its own backward): HF's float64 log-probs
    forward, and every weight's gradient of a DPO-like objective equal to the unfused MLP's (plain autograd)."""
    hf = tiny_hf_llama(seed=0, vocab_size=VOCAB)
    pairs = random_pairs()
    want = [hf_logps_float64(hf, p.prompt, p.chosen) for p in pairs]
    want += [hf_logps_float64(hf, p.prompt, p.rejected) for p in pairs]
    cfg = model_config(hf.config)
    cfg.fused_swiglu = True
    fused = mdpo_model(hf, fused_swiglu=True)
    got = mdpo_logps(fused, pairs, "packed", cfg)
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-5), (got, want)

    from mdpo.training.step import Scorer

    grads, activations = [], []
    for model in (fused, mdpo_model(hf)):
        model.train()
        model.decoder.layers[0].mlp.linear_fc2.register_forward_hook(
            lambda _module, inputs, _output: activations.append(  # the activation's backward (under a view)
                [type(fn).__name__ for fn in (inputs[0].grad_fn, inputs[0].grad_fn.next_functions[0][0])]
            )
        )
        scorer = Scorer(cfg, chunk_tokens=7, thd=False)
        batch = collate_as("padded", pairs)
        logps = scorer.stats(batch, model, scorer.forward(batch, model)).logps
        (logps[:4] - logps[4:]).sigmoid().log().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert "SwiGLUFunctionBackward" in activations[0] and activations[1][0] == "MulBackward0", activations
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[1].items():
        assert grad.norm() > 0, name
        assert (grads[0][name] - grad).norm() <= 1e-5 * grad.norm(), name


@pytest.mark.parametrize("attention", ["local", "sdpa"])
def test_fused_rope_gives_hf_logps_in_every_layout_and_the_unfused_gradients(megatron_world, attention):
    """model.fused_rope (Megatron's rotation of q and k under torch.compile, applied as the QKV projection hands them
    out): HF's float64 log-probs of every sequence alone in the four layouts (per row position and per token tables),
    and every weight's gradient of a DPO-like objective equal to Megatron's unfused rotation's, with shared prompts."""
    from mdpo.training.step import Scorer

    hf = tiny_hf_llama(seed=0, vocab_size=VOCAB)
    pairs = random_pairs()
    want = [hf_logps_float64(hf, p.prompt, p.chosen) for p in pairs]
    want = torch.tensor(want + [hf_logps_float64(hf, p.prompt, p.rejected) for p in pairs], dtype=torch.float64)
    cfg = model_config(hf.config)
    cfg.attention, cfg.fused_rope = attention, True
    fused = mdpo_model(hf, attention, fused_rope=True)
    assert all(layer.self_attention.fused for layer in fused.decoder.layers)
    for layout in LAYOUTS:
        got = mdpo_logps(fused, pairs, layout, cfg)
        assert torch.allclose(got.double(), want, rtol=0, atol=1e-5), (layout, got, want)

    grads, rotations = [], []
    for model in (fused, mdpo_model(hf, attention)):
        model.train()
        model.decoder.layers[0].self_attention.core_attention.register_forward_pre_hook(
            lambda _module, inputs: rotations.append(type(inputs[0].grad_fn).__name__)  # how q was rotated
        )
        scorer = Scorer(cfg, chunk_tokens=7, thd=False)
        batch = collate_as("shared_packed", pairs)
        logps = scorer.stats(batch, model, scorer.forward(batch, model)).logps
        (logps[:4] - logps[4:]).sigmoid().log().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert rotations == ["CompiledFunctionBackward", "CatBackward0"], rotations  # one compiled graph; Megatron's
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[1].items():
        assert grad.norm() > 0, name
        assert (grads[0][name] - grad).norm() <= 1e-5 * grad.norm(), name


def hf_token_stats_float64(hf_model, prompt: list[int], response: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response token, each sequence run alone in float64: log p(token) and log sum_v p_v^2 (TRL's
    log_sum_sq_probs, WPO's normaliser)."""
    ids = prompt + response
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model.double()(torch.tensor([ids])).logits[0], dim=-1)
    hf_model.float()
    rows = torch.arange(len(prompt) - 1, len(ids) - 1)
    return logprobs[rows, torch.tensor(response)], (2 * logprobs[rows]).logsumexp(dim=-1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ld_dpo_and_wpo_sums_equal_trl_float64(megatron_world, layout):
    """LD-DPO (ld_alpha 0.3): each response's tokens past the pair's shorter response count 0.3 times, as TRL's
    shared/tail masks do; WPO: the summed log p(token) - log sum_v p_v^2. Every layout, against HF in float64 on each
    sequence alone; the plain sums (the sft term's) are unchanged."""
    from mdpo.training.step import Scorer

    hf = tiny_hf_llama(seed=0, vocab_size=VOCAB)
    pairs = random_pairs()  # chosen/rejected lengths 5/3, 3/2... pairs 2 and 3 longer on either side
    alpha = 0.3
    scorer = Scorer(model_config(hf.config), chunk_tokens=7, thd=False, ld_alpha=alpha)
    model = mdpo_model(hf, "sdpa")
    batch = collate_as(layout, pairs)
    with torch.no_grad():
        stats = scorer.stats(batch, model, scorer.forward(batch, model), square_mass=True)
    want_ld, want_plain, want_wpo = [], [], []
    for side in ("chosen", "rejected"):
        for p in pairs:
            logps, square = hf_token_stats_float64(hf, p.prompt, getattr(p, side))
            shorter = min(len(p.chosen), len(p.rejected))
            weights = torch.where(torch.arange(1, len(logps) + 1) > shorter, alpha, 1.0).double()
            want_ld.append((logps * weights).sum())
            want_plain.append(logps.sum())
            want_wpo.append((logps - square).sum())
    for got, want in ((stats.logps, want_ld), (stats.plain_logps, want_plain), (stats.wpo_logps, want_wpo)):
        assert torch.allclose(got.double(), torch.stack(want), rtol=0, atol=2e-5), (got, want)
    assert not torch.allclose(stats.logps, stats.plain_logps)  # some pair has a tail on either side


def test_vocab_padding_is_masked_out(megatron_world):
    """The padded head rows are zero, not -inf: without the mask their exp(0) would leak into the softmax."""
    from mdpo.data.batching import MicroBatch
    from mdpo.training.logprobs import sequence_stats

    hidden, weight = torch.ones(1, 2, 4), torch.zeros(256, 4)  # every logit 0
    index = torch.tensor([0, 1])
    batch = MicroBatch(
        tokens=torch.zeros(1, 2, dtype=torch.long),
        position_ids=torch.zeros(1, 2, dtype=torch.long),
        score_index=index,
        score_labels=torch.zeros(2, dtype=torch.long),
        score_take=index,
        score_sequence=torch.zeros(2, dtype=torch.long),
        score_tail=torch.zeros(2, dtype=torch.bool),
        pair_ids=[0],
    )
    stats = sequence_stats(hidden, batch, weight, VOCAB, chunk_tokens=1)
    assert torch.allclose(stats.logps, torch.tensor([-2 * torch.log(torch.tensor(250.0)).item(), 0.0]))


def test_dpo_loss_equals_float64_formula(megatron_world):

    policy_hf, ref_hf = tiny_hf_llama(seed=0, vocab_size=VOCAB), tiny_hf_llama(seed=1, vocab_size=VOCAB)
    pairs = random_pairs()
    m = len(pairs)
    policy, ref = mdpo_logps(mdpo_model(policy_hf), pairs), mdpo_logps(mdpo_model(ref_hf), pairs)
    beta, smoothing = 0.1, 0.1
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy[:m], policy[m:], ref[:m], ref[m:], beta=beta, label_smoothing=smoothing
    )

    def hf_side(model, key):
        return torch.tensor([hf_logps_float64(model, p.prompt, getattr(p, key)) for p in pairs], dtype=torch.float64)

    pc, pr = hf_side(policy_hf, "chosen"), hf_side(policy_hf, "rejected")
    rc, rr = hf_side(ref_hf, "chosen"), hf_side(ref_hf, "rejected")
    z = beta * ((pc - rc) - (pr - rr))
    want = -(1 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z)
    assert torch.allclose(losses.double(), want, rtol=0, atol=1e-5)
    assert torch.allclose(chosen_rewards.double(), beta * (pc - rc), atol=1e-5)
    assert torch.allclose(rejected_rewards.double(), beta * (pr - rr), atol=1e-5)
    assert z.abs().max() > 0.01  # the two models differ, so the check is not the trivial log(2)


def test_an_echo_micro_batch_never_reaches_the_loss(megatron_world, monkeypatch):
    """An expert group's echo (a forward-only pass's repeat that keeps its ranks' all-to-alls in step) runs the model
    and counts nothing: the objective is never called on it (no pairs, no metric sums)."""
    import dataclasses
    from functools import partial

    from mdpo.config import DPOConfig
    from mdpo.training import step

    model = mdpo_model(tiny_hf_llama())
    batch = dataclasses.replace(collate_as("padded", random_pairs()), echo=True)
    objective = step.DPOObjective.from_config(DPOConfig(reference="none"), VOCAB)
    monkeypatch.setattr(step, "_dpo_loss", lambda *args: pytest.fail("an echo reached the loss"))
    forward = partial(step.dpo_forward_step, objective, step.Scorer(model_config_of(model), 7, False))
    with torch.no_grad():
        output, loss_func = forward(iter([(batch, None)]), model)
        loss, count, extra = loss_func(output)
    assert loss.item() == 0.0 and count.item() == 0 and "sums" not in extra
