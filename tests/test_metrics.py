"""Metrics: reduction over uneven micro-batches equals a hand computation; loss components; logging sinks."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from mdpo.config import DPOConfig
from mdpo.training.logprobs import SequenceStats
from mdpo.training.metrics import MetricSums, MetricsWriter, pair_sums, turn_sums
from mdpo.training.step import DPOObjective

BETA = 0.1
PC = torch.tensor([-10.0, -20.0, -5.0])  # policy chosen / rejected, reference chosen / rejected
PR = torch.tensor([-12.0, -18.0, -9.0])
RC = torch.tensor([-11.0, -20.0, -6.0])
RR = torch.tensor([-11.0, -19.0, -8.0])
LC = torch.tensor([4.0, 8.0, 2.0])  # response lengths
LR = torch.tensor([5.0, 6.0, 3.0])


def objective(**dpo) -> DPOObjective:
    return DPOObjective.from_config(DPOConfig(beta=BETA, **dpo), vocab_size=100)


def sums_for(obj: DPOObjective, rows: slice, turns: tuple[int, ...] = (0, 0, 0)) -> MetricSums:
    """A micro-batch of the pairs `rows` (at these turn positions): per-sequence stats (chosen, then rejected) and
    the batch's token counts, as the step sums them."""
    logit_sums = torch.ones(3)[rows]
    logps = torch.cat([PC[rows], PR[rows]])
    stats = SequenceStats(logps, logps, torch.cat([logit_sums, 2 * logit_sums]), torch.cat([LC[rows], LR[rows]]))
    batch = types.SimpleNamespace(
        num_pairs=len(PC[rows]), num_input_tokens=7, num_computed_tokens=6, num_slots=10, pair_turns=turns[rows]
    )
    losses = obj(PC[rows], PR[rows], RC[rows], RR[rows], LC[rows], LR[rows])
    return pair_sums(losses, stats, batch).add(**turn_sums(losses, batch, obj.turns))


def test_uneven_microbatches_reduce_to_the_hand_computed_means():
    obj = objective(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], rpo_alpha=0.2)
    sums = sums_for(obj, slice(0, 1)) + sums_for(obj, slice(1, 3))
    assert sums.names == obj.metric_names
    out = sums.record()

    chosen_rewards, rejected_rewards = BETA * (PC - RC), BETA * (PR - RR)  # by hand, per pair
    sigmoid = -F.logsigmoid(chosen_rewards - rejected_rewards)
    ipo = ((PC - RC) / LC - (PR - RR) / LR - 1 / (2 * BETA)) ** 2
    nll = -PC / LC
    assert out["loss/sigmoid"] == pytest.approx(sigmoid.mean().item(), rel=1e-6)
    assert out["loss/ipo"] == pytest.approx(ipo.mean().item(), rel=1e-6)
    assert out["nll_loss"] == pytest.approx(nll.mean().item(), rel=1e-6)
    assert out["loss"] == pytest.approx((sigmoid + 0.5 * ipo + 0.2 * nll).mean().item(), rel=1e-6)
    assert out["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=1e-6)
    assert out["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), rel=1e-6)
    assert out["rewards/margins"] == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), rel=1e-6)
    assert out["rewards/accuracies"] == pytest.approx(2 / 3)  # pair 1 has chosen reward 0 < rejected 0.1
    assert out["logps/chosen"] == pytest.approx(PC.mean().item())
    assert out["logits/chosen"] == pytest.approx(3 / LC.sum().item())  # logit sums 1 per pair over 14 tokens
    assert out["logits/rejected"] == pytest.approx(6 / LR.sum().item())
    assert out["num_tokens"] == 14  # 7 input tokens per micro-batch
    assert out["num_tokens_computed"] == 12  # 6 per micro-batch: a shared prompt counted once
    assert out["packing_efficiency"] == pytest.approx(12 / 20)  # computed tokens over 10 slots per micro-batch


def test_reward_accuracy_per_turn_position():
    """Pairs at turn positions 0, 1, 1 (pair 1 wrong, as above) over uneven micro-batches: turn 0 all right, turn 1
    half; a position no pair of the step has is left out; the overall accuracy is unchanged."""
    obj = DPOObjective.from_config(DPOConfig(beta=BETA), vocab_size=100, turns=3)
    sums = sums_for(obj, slice(0, 1), (0, 1, 1)) + sums_for(obj, slice(1, 3), (0, 1, 1))
    assert sums.names == obj.metric_names
    out = sums.record()
    assert out["rewards/accuracies/turn_0"] == 1.0 and out["rewards/accuracies/turn_1"] == 0.5
    assert "rewards/accuracies/turn_2" not in out and out["rewards/accuracies"] == pytest.approx(2 / 3)
    assert not any("turn" in name for name in sums_for(objective(), slice(0, 3)).record())  # one turn: none


def test_single_loss_has_no_components_and_bad_names_fail_at_start():
    from mdpo.errors import ConfigError

    assert objective().components == ()
    with pytest.raises(ConfigError, match="nope"):
        objective(loss_type="nope")


def test_tensorboard_and_wandb_sinks(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = []
    fake = types.SimpleNamespace(
        init=lambda **kw: types.SimpleNamespace(log=lambda d, step: logged.append((step, d)), finish=lambda: None)
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    writer = MetricsWriter(tmp_path, tensorboard=True, wandb_project="p")
    writer.write({"step": 1, "loss": 0.5, "rewards/accuracies": 1.0})
    writer.write({"step": 2, "loss": 0.25, "rewards/accuracies": 0.5})
    writer.close()
    assert [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0.5, 0.25]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert logged == [(1, {"loss": 0.5, "rewards/accuracies": 1.0}), (2, {"loss": 0.25, "rewards/accuracies": 0.5})]
