"""The step's optimizer pass (`training.optimizer.optimizer_step`): the gradients prepared once and their norm computed
once (one model-parallel all-reduce), where mdpo's finiteness check followed by Megatron's `step()` did both twice;
the update bitwise that pass's, with and without the distributed optimizer."""

from __future__ import annotations

from collections import Counter

import megatron.core.optimizer.clip_grads as clip_grads
import megatron.core.optimizer.optimizer as megatron_optimizer
import pytest
import torch

from mdpo.config import Layout, ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig


def _policy_with_gradients(distributed: bool):
    """A tiny policy (DDP, Megatron's optimizer with clipping at 0.1, below the norm) holding one backward's
    gradients."""
    from mdpo.training.optimizer import build_optimizer, wrap_ddp
    from mdpo.training.setup import build_model

    model = ModelConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    cfg = TrainConfig(
        model=model,
        optimizer=OptimizerConfig(lr=1e-2, clip_grad=0.1),
        parallel=ParallelConfig(distributed_optimizer=distributed),
    )
    torch.manual_seed(0)
    (chunk,) = build_model(cfg, Layout(), torch.float32, load=False)
    policy = [wrap_ddp(cfg, chunk)]
    optimizer = build_optimizer(cfg, policy, torch.float32)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    hidden = policy[0](input_ids=tokens, position_ids=torch.arange(12).expand(2, -1), attention_mask=None)
    hidden.float().pow(2).mean().backward()
    policy[0].finish_grad_sync()
    return policy, optimizer


@pytest.mark.parametrize("distributed", [False, True], ids=["adam", "distributed_optimizer"])
def test_one_pass_prepares_and_norms_the_gradients_once_and_updates_as_megatron_does(
    megatron_world, distributed, monkeypatch
):
    from mdpo.training.optimizer import optimizer_step

    counts = Counter()
    norm_fp32 = clip_grads.get_grad_norm_fp32

    def counted_norm(*args, **kwargs):
        counts["norm"] += 1
        return norm_fp32(*args, **kwargs)

    for module in (clip_grads, megatron_optimizer):  # the optimizer module imported it by name
        monkeypatch.setattr(module, "get_grad_norm_fp32", counted_norm)
    ours, megatrons = _policy_with_gradients(distributed), _policy_with_gradients(distributed)
    parts = lambda optimizer: getattr(optimizer, "chained_optimizers", [optimizer])
    for part in parts(ours[1]):
        prepare = part.prepare_grads
        monkeypatch.setattr(part, "prepare_grads", lambda prepare=prepare: counts.update(["prepare"]) or prepare())

    updated, norm = optimizer_step(ours[1], loss_is_finite=True)
    assert updated and counts == {"norm": 1, "prepare": len(parts(ours[1]))}, counts
    counts.clear()
    # the pass before: mdpo's finiteness check (prepare, norm), then Megatron's step() (prepare, norm, clip, update)
    megatrons[1].prepare_grads()
    checked = float(megatrons[1].get_grad_norm())
    success, megatron_norm, _ = megatrons[1].step()
    assert success and counts["norm"] == 2
    assert norm == checked == float(megatron_norm) and norm > 0.1  # the same norm, and clipping took effect
    for (name, got), (_, want) in zip(ours[0][0].named_parameters(), megatrons[0][0].named_parameters(), strict=True):
        assert torch.equal(got, want), name


def test_a_nonfinite_loss_or_norm_moves_nothing(megatron_world):
    from mdpo.training.optimizer import optimizer_step

    policy, optimizer = _policy_with_gradients(distributed=False)
    before = {name: p.detach().clone() for name, p in policy[0].named_parameters()}
    assert optimizer_step(optimizer, loss_is_finite=False)[0] is False
    next(policy[0].parameters()).main_grad.view(-1)[0] = float("inf")
    updated, norm = optimizer_step(optimizer, loss_is_finite=True)
    assert not updated and norm == float("inf")
    assert all(torch.equal(p, before[name]) for name, p in policy[0].named_parameters())
