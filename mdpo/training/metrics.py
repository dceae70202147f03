"""DPO metrics: per-micro-batch sums, reduced over micro-batches and DP ranks, then turned into TRL's means; and
the run's record of them (`MetricsLogger`: RUN_DIR/metrics.jsonl, TensorBoard, W&B)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from megatron.core import parallel_state

from mdpo.data.batching import MicroBatch
from mdpo.errors import MdpoError
from mdpo.loss import PairLosses
from mdpo.training.logprobs import SequenceStats

# Everything is summed over pairs (or tokens) so that any micro-batch / DP split reduces to the same numbers.
SUM_FIELDS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logit_sum/chosen",
    "logit_sum/rejected",
    "num_tokens/chosen",
    "num_tokens/rejected",
    "num_tokens/input",
    "num_tokens/computed",
    "num_tokens/slots",
    "num_pairs",
)
# The sums logged as means per pair, under their own (TRL's) names.
PER_PAIR = SUM_FIELDS[: SUM_FIELDS.index("logps/rejected") + 1]
# Multi-turn data: reward accuracy per turn position (a conversation's t-th preference turn), over its pairs.
TURN_ACCURACY, TURN_PAIRS = "rewards/accuracies/turn_", "num_pairs/turn_"


def turn_fields(turns: int) -> tuple[str, ...]:
    """The per-turn sums of data with `turns` turn positions (none for one: every pair its row's only turn)."""
    if turns < 2:
        return ()
    return tuple(f"{prefix}{t}" for t in range(turns) for prefix in (TURN_ACCURACY, TURN_PAIRS))


def loss_components(losses: PairLosses) -> dict[str, torch.Tensor]:
    """The per-pair terms logged besides the loss (TRL's names): each loss type's own when there are several, and
    the NLL term with rpo_alpha."""
    values = {f"loss/{t}": term for t, term in losses.terms.items()} if len(losses.terms) > 1 else {}
    if losses.nll is not None:
        values["nll_loss"] = losses.nll
    return values


@dataclass(frozen=True)
class MetricSums:
    """Metrics as named sums over pairs and tokens (SUM_FIELDS, then the loss components): added over micro-batches
    and ranks they give the same numbers whatever the split. One float64 tensor (exact enough over many pairs), so
    a step reduces them in one collective; it stays on the loss's device until then."""

    names: tuple[str, ...]
    values: torch.Tensor

    @classmethod
    def zeros(cls, names: tuple[str, ...], device: torch.device | str) -> MetricSums:
        return cls(names, torch.zeros(len(names), dtype=torch.float64, device=device))

    def __add__(self, other: MetricSums) -> MetricSums:
        if other.names != self.names:
            raise ValueError(f"metric sums of other fields: {other.names} vs {self.names}")
        return MetricSums(self.names, self.values + other.values)

    def add(self, **extra: torch.Tensor) -> MetricSums:
        """These sums with amounts added to named fields; a name not among them becomes a new last field."""
        names, values = list(self.names), list(self.values.unbind())
        for name, value in extra.items():
            if name not in names:
                names.append(name)
                values.append(self.values.new_zeros(()))
            values[names.index(name)] = values[names.index(name)] + value.double()
        return MetricSums(tuple(names), torch.stack(values))

    def record(self, prefix: str = "") -> dict[str, float]:
        """TRL-named means: per pair, logits per response token (mean over the vocabulary), token counts."""
        s = dict(zip(self.names, self.values.tolist()))
        pairs = max(s["num_pairs"], 1.0)
        extra = [name for name in self.names[len(SUM_FIELDS) :] if not name.startswith((TURN_ACCURACY, TURN_PAIRS))]
        out = {prefix + name: s[name] / pairs for name in PER_PAIR + tuple(extra)}
        for name in self.names:  # per turn position, over that turn's pairs (left out of a step that has none)
            if name.startswith(TURN_ACCURACY) and s[TURN_PAIRS + name[len(TURN_ACCURACY) :]] > 0:
                out[prefix + name] = s[name] / s[TURN_PAIRS + name[len(TURN_ACCURACY) :]]
        out[prefix + "logits/chosen"] = s["logit_sum/chosen"] / max(s["num_tokens/chosen"], 1.0)
        out[prefix + "logits/rejected"] = s["logit_sum/rejected"] / max(s["num_tokens/rejected"], 1.0)
        # As TRL counts it: every non-padding input token (prompts included, once per sequence).
        out[prefix + "num_tokens"] = s["num_tokens/input"]
        # What the model ran: a shared prompt once (what MFU counts).
        out[prefix + "num_tokens_computed"] = s["num_tokens/computed"]
        # Real tokens over the slots they took (padded rows x length, or packs x pack budget); a shared prompt once.
        out[prefix + "packing_efficiency"] = s["num_tokens/computed"] / max(s["num_tokens/slots"], 1.0)
        return out


def pair_sums(losses: PairLosses, stats: SequenceStats, batch: MicroBatch) -> MetricSums:
    """One micro-batch's metric sums: its pairs' losses and rewards, both sides' log-probs, logit sums and token
    counts (`stats` holds the chosen sequences, then the rejected), the batch's token counts, then the loss
    components."""
    m = batch.num_pairs
    count = lambda n: losses.losses.new_tensor(float(n), dtype=torch.float64)
    chosen_rewards, rejected_rewards = losses.chosen_rewards, losses.rejected_rewards
    values = [
        losses.losses.sum(),
        chosen_rewards.sum(),
        rejected_rewards.sum(),
        (chosen_rewards > rejected_rewards).float().sum(),
        (chosen_rewards - rejected_rewards).sum(),
        stats.logps[:m].sum(),
        stats.logps[m:].sum(),
        stats.logit_sums[:m].sum(),
        stats.logit_sums[m:].sum(),
        stats.num_tokens[:m].sum(),
        stats.num_tokens[m:].sum(),
        count(batch.num_input_tokens),
        count(batch.num_computed_tokens),
        count(batch.num_slots),
        count(losses.losses.numel()),
    ]
    components = loss_components(losses)
    values += [per_pair.sum() for per_pair in components.values()]
    return MetricSums(SUM_FIELDS + tuple(components), torch.stack([v.detach().double() for v in values]))


def turn_sums(losses: PairLosses, batch: MicroBatch, turns: int) -> dict[str, torch.Tensor]:
    """Per turn position (`turn_fields`, none for `turns` < 2): the micro-batch's pairs there with the chosen
    reward above the rejected one, and its pairs there."""
    if turns < 2:
        return {}
    correct = (losses.chosen_rewards > losses.rejected_rewards).detach().double()
    turn = correct.new_tensor(batch.pair_turns)
    sums = [value for t in range(turns) for value in ((correct * (turn == t)).sum(), (turn == t).sum().double())]
    return dict(zip(turn_fields(turns), sums))


def step_record(sums: list[MetricSums], names: tuple[str, ...], prefix: str = "") -> dict[str, float]:
    """This rank's micro-batches' sums (none on pipeline stages other than the last) -> the step's TRL-named record
    on every rank: added, summed over the DP ranks, handed from the last PP stage to the others (one all-reduce,
    one broadcast) and moved to the host once."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    total = sum(sums, MetricSums.zeros(names, device))
    torch.distributed.all_reduce(total.values, group=parallel_state.get_data_parallel_group())
    torch.distributed.broadcast(
        total.values,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return MetricSums(names, total.values.cpu()).record(prefix)


class MetricsWriter:
    """RUN_DIR/metrics.jsonl, one JSON object per line, flushed each write so a crash keeps what was logged;
    optionally mirrored to TensorBoard and Weights & Biases (imported only when asked for)."""

    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        config: dict | None = None,
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tensorboard = self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MdpoError("logging.tensorboard=true needs the `tensorboard` package") from None
            self._tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise MdpoError("logging.wandb_project is set but the `wandb` package is not installed") from None
            self._wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config)
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        step = int(record["step"])
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._handle.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint's step (a killed run may have logged past its last save);
    a run starting from step 0 starts a new file."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def check_writable(folder: Path, key: str) -> None:
    """Fail at start-up, not at the first save, when an output folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".mdpo_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise MdpoError(f"{key}: cannot write to {folder} ({err.strerror or err})") from None


class MetricsLogger:
    """A run's record in RUN_DIR: its resolved config (config.yaml) and one line per logged step (metrics.jsonl,
    cut back to the resumed step, mirrored to TensorBoard / W&B when asked). Only global rank 0 writes; on the
    other ranks every call does nothing."""

    def __init__(
        self, run_dir: Path, config: dict[str, Any], tensorboard: bool, wandb_project: str | None, is_logger: bool
    ) -> None:
        self.run_dir, self.config, self.is_logger = run_dir, config, is_logger
        self._sinks = (tensorboard, wandb_project)
        self._writer: MetricsWriter | None = None
        if is_logger:
            check_writable(run_dir, "logging.run_dir")

    def start(self, step: int) -> None:
        """Open the sinks for a run starting (or resuming) at `step`."""
        if not self.is_logger:
            return
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        truncate_metrics(self.run_dir / "metrics.jsonl", step)
        self._writer = MetricsWriter(self.run_dir, *self._sinks, self.config)

    def log(self, record: dict) -> None:
        if self._writer is not None:
            self._writer.write(record)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
