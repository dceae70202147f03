"""When and where a run's training state is saved and restored: every `checkpoint.save_interval` steps, at the
end, and when SIGTERM/SIGINT (a scheduler's pre-emption) or `schedule.exit_interval` ask the run to stop, in which
case it saves and leaves. On start it resumes from the latest complete checkpoint (or the one named)."""

from __future__ import annotations

import enum
import signal
from pathlib import Path

import torch

from mdpo.checkpoint.description import base_fingerprint
from mdpo.checkpoint.dist import complete_checkpoints, has_reference, load_checkpoint, read_meta, save_checkpoint
from mdpo.checkpoint.load import check_lora_base
from mdpo.config import CheckpointConfig, Layout
from mdpo.errors import ConfigError
from mdpo.training.metrics import check_writable


class StopRequest:
    """SIGTERM/SIGINT set a flag; the ranks agree on it at a step boundary (a signal may reach them at different
    times), so every rank saves the same checkpoint. Installed for the training loop only."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:  # noqa: ANN001 - signal handler signature
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_reference(folder: Path, meta: dict, wanted: bool) -> None:
    """A TR-DPO run's reference has moved: resuming one without it (or the other way round) would not continue it."""
    if has_reference(meta) == wanted:
        return
    if wanted:
        raise ConfigError(
            f"{folder}: saved without dpo.sync_ref_model (it holds no reference weights), now dpo.sync_ref_model=true: "
            "resume it with dpo.sync_ref_model=false, or start a new run"
        )
    raise ConfigError(
        f"{folder}: saved with dpo.sync_ref_model=true (its reference weights have moved), now false: the resumed "
        "reference would be the initial policy; resume it with dpo.sync_ref_model=true, or start a new run"
    )


def _check_lora(folder: Path, meta: dict, base: str | None) -> None:
    """A LoRA checkpoint holds adapters for one base model (`lora_base` in its meta), a full-tuning one whole weights:
    each resumes only as what it is, the adapters only onto the base they were trained on."""
    saved = meta.get("lora_base") is not None
    if base is None and saved:
        raise ConfigError(
            f"{folder}: saved by a LoRA run (it holds adapters only), now lora.rank=0: resume it with its lora "
            "section, or export it merged (mdpo convert megatron-to-hf) and start a new run from that"
        )
    if base is not None and not saved:
        raise ConfigError(
            f"{folder}: saved by a full-tuning run (no adapters), now lora.rank > 0: resume it with lora.rank=0, or "
            "start the LoRA run from it in a new run directory"
        )
    if base is not None:
        check_lora_base(folder, meta, base)


class After(enum.Enum):
    """What a finished step asks of the loop."""

    GO_ON = "go on"
    SAVE = "save"
    STOP = "save and stop"


class Checkpointer:
    """Owns the checkpoint folder, the save cadence, the stop signals and resuming."""

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, exit_interval: int | None, layout: Layout,
                 global_batch_size: int, is_logger: bool, lora_base: str | None = None) -> None:  # fmt: skip
        """`lora_base`: a LoRA run's base model folder (checkpoints hold its adapters and name it)."""
        self.cfg, self.exit_interval, self.layout = cfg, exit_interval, layout
        self.lora_base = lora_base
        self.lora_fingerprint = base_fingerprint(lora_base) if lora_base is not None else None
        self.global_batch_size = global_batch_size
        self.root = Path(cfg.dir) if cfg.dir else run_dir / "checkpoints"
        self._stop: StopRequest | None = None
        if is_logger and cfg.dir:
            check_writable(self.root, "checkpoint.dir")

    def resume(self, model, optimizer, scheduler,  # noqa: ANN001 - Megatron's types
               reference: list[torch.nn.Module] | None = None) -> tuple[int, Path | None]:  # fmt: skip
        """Load the checkpoint `checkpoint.resume` names (auto: the latest complete one): (the step to start at,
        the folder loaded; None when starting afresh). `reference`: the reference model when its weights are
        training state (`dpo.sync_ref_model`); the checkpoint must hold one exactly then."""
        if self.cfg.resume == "none":
            return 0, None
        if self.cfg.resume == "auto":
            found = complete_checkpoints(self.root)
            if not found:
                return 0, None
            folder = found[-1]
        else:
            folder = Path(self.cfg.resume)
        meta = read_meta(folder)
        if meta["global_batch_size"] != self.global_batch_size:
            raise ConfigError(
                f"{folder}: saved with schedule.global_batch_size={meta['global_batch_size']}, now "
                f"{self.global_batch_size}: the resumed data order would differ"
            )
        _check_reference(folder, meta, reference is not None)
        _check_lora(folder, meta, self.lora_base)
        saved = list(meta["layout"]) + [1] * (4 - len(meta["layout"]))  # [TP, PP, DP] before CP existed
        load_checkpoint(folder, model, optimizer, scheduler, load_rng=saved == self.layout.sizes, reference=reference)
        return int(meta["step"]), folder

    def start(self) -> None:
        """From here until `close`, SIGTERM/SIGINT ask the run to save and stop at the next step boundary."""
        self._stop = StopRequest()

    def after_step(self, step: int, train_steps: int) -> After:
        """Collective (the ranks agree on a signal): what the loop does once `step` steps are done. The last step's
        save is `save_at_end`'s, not this."""
        stop = self._stop is not None and self._stop.agreed()
        stop = stop or bool(self.exit_interval and step % self.exit_interval == 0)
        if step >= train_steps:
            return After.GO_ON
        if stop:
            return After.STOP
        every = self.cfg.save_interval
        return After.SAVE if every and step % every == 0 else After.GO_ON

    def save(self, step: int, model, optimizer, scheduler, meta: dict,  # noqa: ANN001 - Megatron's types
             reference: list[torch.nn.Module] | None = None) -> Path:  # fmt: skip
        """Collective: a checkpoint of `step` (keeping the last `keep_last`), with `reference` when given."""
        meta = {
            "consumed_samples": step * self.global_batch_size,
            "global_batch_size": self.global_batch_size,
            "layout": self.layout.sizes,
            **meta,
        }
        if self.lora_fingerprint is not None:
            meta["lora_base"] = self.lora_fingerprint
        return save_checkpoint(self.root, step, model, optimizer, scheduler, meta, self.cfg.keep_last, reference)

    def close(self) -> None:
        if self._stop is not None:
            self._stop.restore()
            self._stop = None
