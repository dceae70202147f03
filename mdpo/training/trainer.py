"""The DPO run, top to bottom: the run's processes and data, the policy (and reference), the optimizer, then steps
of reference pass + policy pass + update, with metrics, checkpoints and the final export around them."""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from mdpo import parallel
from mdpo.checkpoint.components import CommonState, Component, ModelChunks, OptimizerState
from mdpo.checkpoint.description import export_origin
from mdpo.checkpoint.dist import read_meta
from mdpo.checkpoint.hf import carried_tensors
from mdpo.checkpoint.hf_export import gather_full_state, write_hf_export, write_peft_adapter
from mdpo.config import TrainConfig, config_to_dict
from mdpo.data.batching import MicroBatch, PairSampler, ranking_units
from mdpo.data.pairs import TokenizedPair, data_fingerprint
from mdpo.errors import MdpoError
from mdpo.models import families
from mdpo.models.lora import merge_adapters, split_adapters
from mdpo.plot import plot_metrics
from mdpo.training.checkpointing import After, Checkpointer
from mdpo.training.console import log
from mdpo.training.data import load_pairs_on_ranks
from mdpo.training.evaluation import evaluate_pairs
from mdpo.training.memory import peak_memory_gib, reset_peak_memory
from mdpo.training.metrics import MetricsLogger, step_record
from mdpo.training.optimizer import build_optimizer, build_scheduler, optimizer_step, wrap_ddp
from mdpo.training.profiling import profiled
from mdpo.training.reference import build_reference
from mdpo.training.run_lock import lock_run
from mdpo.training.setup import build_model, start_run
from mdpo.training.step import DPOObjective, dpo_forward_step, run_schedule


def _nonfinite_pairs(outputs: list[dict]) -> list[int]:
    """Dataset indices of the pairs in micro-batches whose loss is not finite, from every rank."""
    local = [i for out in outputs if not math.isfinite(out["sums"].values[0].item()) for i in out["pair_ids"]]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    return sorted({i for part in gathered for i in part})


class Trainer:
    """Owns the parallel models, optimizer and data for one run; `fit()` runs it."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.run = start_run(cfg)
        self.run_dir = Path(cfg.logging.run_dir)
        self.metrics = MetricsLogger(
            self.run_dir, config_to_dict(cfg), cfg.logging.tensorboard, cfg.logging.wandb_project, self.run.is_logger
        )
        self.checkpointer = Checkpointer(cfg, self.run_dir, self.run.layout, self.run.is_logger)
        busy = {"logging.run_dir": self.run_dir} | (
            {"checkpoint.dir": self.checkpointer.root} if cfg.checkpoint.dir else {}
        )
        self.lock = lock_run(busy)  # held until train() ends
        try:
            self._build()
        except BaseException:
            self.lock.release()
            raise

    def _build(self) -> None:
        """The run's data, models and optimizer (with the run's folders locked)."""
        cfg = self.cfg
        if cfg.checkpoint.export_hf:  # what the export carries untrained (a vision tower) is found now, not at the end
            carried_tensors(families.get(cfg.model.family), self._export_origin(), cfg.model.num_hidden_layers)
        tokenizer, template = self.run.tokenizer, families.get(cfg.model.family).default_template
        seed = cfg.schedule.seed
        self.train_pairs = load_pairs_on_ranks(
            cfg.data, cfg.data.train_file, tokenizer, "train", template, training_seed=seed
        )
        self.eval_pairs = (
            load_pairs_on_ranks(cfg.data, cfg.data.eval_file, tokenizer, "eval", template, training_seed=seed)
            if cfg.data.eval_file
            else []
        )
        turns = 1 + max(p.turn for p in self.train_pairs + self.eval_pairs)  # multi-turn data: accuracy per turn
        self.objective = DPOObjective.from_config(cfg.dpo, cfg.model.vocab_size, self.run.experts, turns)
        # what a checkpoint keeps of the training pairs, to compare a resumed run with (global rank 0 judges)
        self.data_fingerprint = data_fingerprint(cfg.data.train_file, self.train_pairs) if self.run.is_logger else None
        self.sampler = PairSampler(
            [p.row for p in self.train_pairs],
            cfg.schedule.global_batch_size,
            cfg.schedule.seed,
            ranking_units(self.train_pairs) if cfg.dpo.whole_rankings else None,
            self.run.layout.dp,
        )
        self.train_steps = cfg.schedule.train_steps or max(1, int(cfg.schedule.epochs * self.sampler.steps_per_epoch))

        # this rank's model chunks; with LoRA the base frozen and, with an online reference, the reference itself
        lora = cfg.lora if cfg.lora.enabled else None
        policy = build_model(cfg, self.run.layout, self.run.dtype, load=True, experts=self.run.experts, lora=lora)
        self.policy = [wrap_ddp(cfg, chunk, index) for index, chunk in enumerate(policy)]
        splits = {"train": self.train_pairs, "eval": self.eval_pairs}
        self.reference = build_reference(cfg, self.run, policy=self.policy, splits=splits)
        self.optimizer = build_optimizer(cfg, self.policy, self.run.dtype)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.train_steps)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, float]:
        """Train for the configured steps, resuming from the latest complete checkpoint; returns the last step's
        metrics (plus `eval_*` at the end and `initial_eval_*` before the first step when there is an eval set).
        SIGTERM/SIGINT (a scheduler's pre-emption) and `schedule.exit_interval` save a checkpoint and return early,
        with `stopped_early`."""
        cfg = self.cfg
        start = self._resume()
        reset_peak_memory()
        self.metrics.start(start)
        progress = tqdm(
            total=self.train_steps, initial=start, desc="dpo", disable=not (self.run.is_logger and cfg.logging.progress)
        )
        summary: dict[str, float] = {}
        try:
            if self.eval_pairs and start == 0:
                initial = self.evaluate()
                summary.update({"initial_" + k: v for k, v in initial.items()})
                self.metrics.log({"step": 0, **initial})
            self.checkpointer.start()
            skipped, record = 0, {}
            for step in range(start + 1, self.train_steps + 1):
                record = self.train_step(step - 1)
                skipped += self._apply_nonfinite_policy(step, record, skipped)
                self.reference.after_step(step, self.policy)
                record["skipped_steps"] = skipped
                if step % cfg.logging.log_interval == 0 or step == self.train_steps:
                    self.metrics.log(record)
                if self._eval_due(step):
                    self.metrics.log({"step": step, **self.evaluate()})
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}")
                after = self.checkpointer.after_step(step, self.train_steps)
                if after is not After.GO_ON:
                    self.save(step)
                if after is After.STOP:
                    log(f"stopped after step {step} with a checkpoint; run the same command again to resume")
                    return {**summary, **record, "stopped_early": True}
            self.checkpointer.close()
            summary.update(record)
            if self.eval_pairs:
                final = self.evaluate()
                summary.update(final)
                self.metrics.log({"step": self.train_steps, **final})
        finally:
            progress.close()
            self.checkpointer.close()
            self.metrics.close()
        self._finish(start)
        return summary

    def _apply_nonfinite_policy(self, step: int, record: dict, skipped: int) -> int:
        """1 when the step was skipped (its loss or grad norm not finite), else 0; raises per optimizer.nonfinite."""
        if not record["skipped"]:
            return 0
        where = f"step {step}: non-finite loss ({record['loss']}) or grad norm ({record['grad_norm']})"
        if self.cfg.optimizer.nonfinite == "stop" or skipped + 1 > self.cfg.optimizer.max_skipped_steps:
            raise MdpoError(f"{where}; pairs in the offending micro-batches: {record['nonfinite_pairs']}")
        log(f"{where}: step skipped ({skipped + 1} so far)")
        return 1

    def _eval_due(self, step: int) -> bool:
        """Held-out evaluation every eval_interval steps (the one after the last step is the final evaluation)."""
        interval = self.cfg.logging.eval_interval
        return bool(self.eval_pairs and interval and step % interval == 0 and step < self.train_steps)

    def _finish(self, start: int) -> None:
        """After the last step: the final checkpoint, the HF export and the plot."""
        cfg = self.cfg
        if cfg.checkpoint.save_at_end and start < self.train_steps:
            self.save(self.train_steps)
        if cfg.checkpoint.export_hf:
            self.export_hf(self.run_dir / "hf")
        if self.run.is_logger and cfg.logging.plot:
            log(f"plot: {plot_metrics(self.run_dir)}")

    # ------------------------------------------------------------------ one step

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step (0-based `step`); a non-finite loss or grad norm skips the update (the caller applies
        the policy). Timed from collation to the finished update (the GPU synchronised), so tokens_per_second is
        honest. With `logging.profile_step` that step runs under torch.profiler."""
        if step + 1 == self.cfg.logging.profile_step:
            with profiled(self.run_dir, step + 1, self.run.is_logger):
                return self._train_step(step)
        return self._train_step(step)

    def _train_step(self, step: int) -> dict[str, float]:
        started = time.perf_counter()
        microbatches = self._microbatches(
            self.run.share(self.cfg, self.train_pairs, self.sampler.global_batch(step)), self.train_pairs
        )
        references = self.reference.logps(microbatches, "train")
        self.objective.before_step(microbatches, self.policy)
        for chunk in self.policy:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = run_schedule(
            partial(dpo_forward_step, self.objective, self.run.scorer),
            microbatches,
            self.policy,
            forward_only=False,
            references=references,
        )
        record = self.objective.complete(step_record([out["sums"] for out in outputs], self.objective.metric_names))
        learning_rate = self.optimizer.param_groups[0]["lr"]
        # The norm is checked before the update: Megatron's clipping turns an inf norm into NaN weights.
        finite, grad_norm = optimizer_step(self.optimizer, math.isfinite(record["loss"]))
        if finite:
            self.scheduler.step(increment=1)
            self.objective.reward_mean.update(record["rewards/chosen"], record["rewards/rejected"])
        else:
            record["nonfinite_pairs"] = _nonfinite_pairs(outputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        record.update(
            step=step + 1,
            epoch=(step + 1) / self.sampler.steps_per_epoch,
            consumed_samples=(step + 1) * self.cfg.schedule.global_batch_size,
            grad_norm=grad_norm,
            learning_rate=learning_rate,
            tokens_per_second=record["num_tokens"] / elapsed,
            peak_memory_gib=peak_memory_gib(),
            skipped=not finite,
        )
        return record

    def evaluate(self) -> dict[str, float]:
        """Forward-only DPO metrics over the held-out pairs: `evaluate_pairs`, which `mdpo eval` runs too."""
        return evaluate_pairs(
            self.cfg,
            self.run,
            self.objective,
            self.policy,
            self.eval_pairs,
            self.reference,
        )

    def _microbatches(self, indices: list[int], pairs: list[TokenizedPair]) -> list[MicroBatch]:
        """This rank's pairs as micro-batches, on this rank's device."""
        return self.run.on_device(self.run.microbatches(self.cfg, pairs, indices))

    # ------------------------------------------------------------------ state out

    def _sync_params(self) -> None:
        """With parallel.overlap_param_gather each DP rank holds only its shard of the updated weights until the
        next forward's hooks gather them; a checkpoint, an export or TR-DPO's mixing reads the weights directly, so
        gather them now."""
        if self.cfg.parallel.overlap_param_gather:
            for chunk in self.policy:
                chunk.start_param_sync(force_sync=True)

    @property
    def _modules(self) -> list[torch.nn.Module]:
        """The policy's model chunks without their DDP wrappers."""
        return [chunk.module for chunk in self.policy]

    @property
    def states(self) -> dict[str, Component]:
        """The run's components with training state, as the checkpointer saves and restores them (one interface,
        `checkpoint.components`): the policy's model chunks, the optimizer over them, the scheduler, the objective
        (bco_pair's running reward mean) and, when its weights move (TR-DPO), the reference's chunks. The sampler's
        position is the step's."""
        model = ModelChunks("model", self._modules)
        states = {
            "model": model,
            "optimizer": OptimizerState("optimizer", self.optimizer, model),
            "scheduler": CommonState("scheduler", self.scheduler),
            "objective": CommonState("objective", self.objective.reward_mean),
        }
        if self.reference.state() is not None:
            states["reference"] = ModelChunks("reference", self.reference.state(), prefix="reference.")
        return states

    def _resume(self) -> int:
        step, folder, restored = self.checkpointer.resume(self.states, self.data_fingerprint)
        if folder is not None:
            if "objective" not in restored:
                self._resume_objective_before_components(folder)
            log(f"resumed from {folder} (step {step})")
        return step

    def _resume_objective_before_components(self, folder: Path) -> None:
        """A checkpoint from before the objective was a component kept bco_pair's running reward mean in its meta,
        or (older still) nowhere: then it resumes only where the running mean is not used."""
        state = read_meta(folder).get("reward_mean")
        if state is not None:
            self.objective.reward_mean.load_state_dict(state)
        elif "bco_pair" in self.cfg.dpo.loss_types and self.cfg.dpo.bco_delta is None:
            raise MdpoError(
                f"{folder}: saved before bco_pair's running reward mean was kept; resume it with a fixed "
                "dpo.bco_delta (0.0 was the old default)"
            )

    def save(self, step: int) -> None:
        self._sync_params()
        meta = {"config": config_to_dict(self.cfg), "data": self.data_fingerprint}
        log(f"checkpoint: {self.checkpointer.save(step, self.states, meta)}")

    def _export_origin(self) -> Path | None:
        """The folder an export reuses config.json, tokenizer files and carried tensors from (`export_origin`)."""
        init_from = self.cfg.model.init_from
        return export_origin(Path(init_from)) if init_from else None

    def export_hf(self, folder: Path) -> None:
        """The trained policy as a HF folder of the model's family (tokenizer included), gathered on rank 0; of a
        LoRA run, the adapters merged into it, and the adapters alone as a PEFT folder (RUN_DIR/adapter)."""
        self._sync_params()
        cfg = self.cfg
        gathered = gather_full_state(self._modules, cfg.model)
        if gathered is not None:
            full, init_from = gathered.tensors, cfg.model.init_from
            if cfg.lora.enabled:
                write_peft_adapter(self.run_dir / "adapter", split_adapters(full)[1], cfg.model, cfg.lora, init_from)
                log(f"exported the PEFT adapter to {self.run_dir / 'adapter'}")
                full = merge_adapters(full, cfg.lora.scaling)
            write_hf_export(folder, full, cfg.model, self._export_origin())
            self.run.tokenizer.save_pretrained(folder)
            log(f"exported HF model to {folder} ({gathered.sent_bytes / 2**20:.1f} MiB of tensors gathered)")
        torch.distributed.barrier()


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run DPO as configured; used by `mdpo train` and `mdpo demo`."""
    try:
        trainer = Trainer(cfg)
        try:
            return trainer.fit()
        finally:
            trainer.lock.release()
    finally:
        parallel.stop()
