"""When and where a run's training state is saved and restored: every `checkpoint.save_interval` steps, at the
end, and when SIGTERM/SIGINT (a scheduler's pre-emption), `schedule.exit_interval` or the time budget
(`schedule.exit_duration_minutes`) ask the run to stop, in which case it saves and leaves. On start it resumes from
the newest intact checkpoint (or the one named), after comparing this run with the one that saved it."""

from __future__ import annotations

import enum
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from mdpo.checkpoint.description import base_fingerprint
from mdpo.checkpoint.dist import complete_checkpoints, load_checkpoint, read_meta, save_checkpoint, saved_components
from mdpo.checkpoint.load import check_lora_base
from mdpo.checkpoint.manifest import damage
from mdpo.config import Layout, TrainConfig, config_to_dict
from mdpo.config.resume import config_changes, data_changes
from mdpo.errors import ConfigError, MdpoError
from mdpo.training.console import log
from mdpo.training.metrics import check_writable


class StopRequest:
    """SIGTERM/SIGINT set a flag; the ranks agree on it at a step boundary (a signal may reach them at different
    times), so every rank saves the same checkpoint. Installed for the training loop only."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, out_of_time: bool = False) -> bool:
        """Whether any rank got a signal or (`out_of_time`) sees the time budget run out."""
        asked = self.requested or out_of_time
        flag = torch.tensor([1.0 if asked else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_reference(folder: Path, meta: dict, wanted: bool) -> None:
    """A TR-DPO run's reference has moved: resuming one without it (or the other way round) would not continue it."""
    if ("reference" in saved_components(meta)) == wanted:
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
    """Owns the checkpoint folder, the save cadence, the stop signals and time budget, and resuming."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, layout: Layout, is_logger: bool) -> None:
        self.cfg, self.layout, self.is_logger = cfg.checkpoint, layout, is_logger
        self.run_config = config_to_dict(cfg)
        self.exit_interval = cfg.schedule.exit_interval
        self.budget_s = cfg.schedule.exit_duration_minutes * 60 if cfg.schedule.exit_duration_minutes else None
        self.lora_base = cfg.model.init_from if cfg.lora.enabled else None  # checkpoints hold its adapters, name it
        self.lora_fingerprint = base_fingerprint(self.lora_base) if self.lora_base is not None else None
        self.global_batch_size = cfg.schedule.global_batch_size
        self.root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
        self._stop: StopRequest | None = None
        self._last_step_end: float | None = None
        if is_logger and cfg.checkpoint.dir:
            check_writable(self.root, "checkpoint.dir")

    def resume(self, states: dict[str, Any], data: dict | None = None) -> tuple[int, Path | None, set[str]]:
        """Load the checkpoint `checkpoint.resume` names (auto: the newest intact one) into the run's components
        (`states`: model chunks, optimizer, scheduler, objective, and a reference when its weights are training
        state; the checkpoint must hold one exactly then): (the step to start at, the folder loaded, None when
        starting afresh, and the components restored). `data`: this run's `data_fingerprint` (global rank 0),
        compared with the checkpoint's."""
        if self.cfg.resume == "none":
            return 0, None, set()
        folder = self._choose()
        if folder is None:
            return 0, None, set()
        meta = read_meta(folder)
        _check_reference(folder, meta, "reference" in states)
        _check_lora(folder, meta, self.lora_base)
        self._compare(folder, meta, data)
        saved = list(meta["layout"]) + [1] * (4 - len(meta["layout"]))  # [TP, PP, DP] before CP existed
        _, restored = load_checkpoint(folder, states, load_rng=saved == self.layout.sizes)
        return int(meta["step"]), folder, restored

    def _choose(self) -> Path | None:
        """Collective: the checkpoint to resume from, verified against its manifest on global rank 0. Auto: the
        newest intact one, a damaged newer one named and moved aside (`step_N.damaged`: it is never picked again
        nor pruned in place of an intact one); a named folder must be intact."""
        choice: list = [None]
        if torch.distributed.get_rank() == 0:
            try:
                choice = [self._verified()]
            except MdpoError as err:
                choice = [err]
        torch.distributed.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], MdpoError):
            raise choice[0]
        return choice[0]

    def _verified(self) -> Path | None:
        if self.cfg.resume != "auto":
            folder = Path(self.cfg.resume)
            read_meta(folder)  # a complete checkpoint at all
            problem = damage(folder)
            if problem is not None:
                raise MdpoError(
                    f"checkpoint.resume={folder}: damaged checkpoint ({problem}); name an intact one, or resume=auto "
                    "for the newest intact checkpoint"
                )
            return folder
        damaged = []
        for folder in reversed(complete_checkpoints(self.root)):
            problem = damage(folder)
            if problem is None:
                if damaged:
                    log(f"resuming from the newest intact checkpoint, {folder.name}")
                return folder
            aside = folder.with_name(f"{folder.name}.damaged")
            for n in range(1, 100):  # an earlier damaged copy of the same step stays too
                if not aside.exists():
                    break
                aside = folder.with_name(f"{folder.name}.damaged{n}")
            folder.rename(aside)
            log(f"checkpoint {folder} is damaged ({problem}): moved aside to {aside.name}")
            damaged.append(f"{folder.name} ({problem})")
        if damaged:
            raise MdpoError(f"{self.root}: no intact checkpoint to resume from: {'; '.join(damaged)}")
        return None

    def _compare(self, folder: Path, meta: dict, data: dict | None) -> None:
        """This run against the one that saved `folder` (global rank 0 judges, every rank follows): changes that
        keep the run are listed; changes that make it another are refused, unless checkpoint.allow_changes."""
        verdict: list = [None]
        if torch.distributed.get_rank() == 0 and "config" in meta:
            keeping, changing = config_changes(meta["config"], self.run_config)
            if data is not None:
                changing += data_changes(meta.get("data"), data)
            if keeping:
                log(f"resuming with changes that keep the run: {', '.join(keeping)}")
            if changing and self.cfg.allow_changes:
                log(f"checkpoint.allow_changes: resuming with changes that make it another run: {', '.join(changing)}")
            elif changing:
                verdict = [
                    f"{folder}: this run differs from the checkpoint's in what it trains: {', '.join(changing)}; "
                    "resume with the checkpoint's settings, start a new run (another logging.run_dir or "
                    "checkpoint.resume=none), or set checkpoint.allow_changes=true to go on with them"
                ]
        torch.distributed.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise ConfigError(verdict[0])

    def start(self) -> None:
        """From here until `close`, SIGTERM/SIGINT and the time budget ask the run to save and stop at the next step
        boundary."""
        self._stop = StopRequest()
        self._last_step_end = time.time()

    def _out_of_time(self) -> bool:
        """Whether the next step, as long as the last one, would end past the time budget (counted from this
        process's start)."""
        now = time.time()
        step_s, self._last_step_end = now - (self._last_step_end or now), now
        if self.budget_s is None:
            return False
        return now + step_s > psutil.Process().create_time() + self.budget_s

    def after_step(self, step: int, train_steps: int) -> After:
        """Collective (the ranks agree on a signal or the budget): what the loop does once `step` steps are done.
        The last step's save is `save_at_end`'s, not this."""
        stop = self._stop is not None and self._stop.agreed(self._out_of_time())
        stop = stop or bool(self.exit_interval and step % self.exit_interval == 0)
        if step >= train_steps:
            return After.GO_ON
        if stop:
            return After.STOP
        every = self.cfg.save_interval
        return After.SAVE if every and step % every == 0 else After.GO_ON

    def save(self, step: int, states: dict[str, Any], meta: dict) -> Path:
        """Collective: a checkpoint of `step` holding `states` (keeping the last `keep_last`)."""
        meta = {
            "consumed_samples": step * self.global_batch_size,
            "global_batch_size": self.global_batch_size,
            "layout": self.layout.sizes,
            **meta,
        }
        if self.lora_fingerprint is not None:
            meta["lora_base"] = self.lora_fingerprint
        return save_checkpoint(self.root, step, states, meta, self.cfg.keep_last)

    def close(self) -> None:
        if self._stop is not None:
            self._stop.restore()
            self._stop = None
