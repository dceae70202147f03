"""The DPO run, top to bottom: parallel state, data, models, optimizer, then steps of reference pass + train pass."""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import yaml
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from tqdm import tqdm

from mdpo import parallel
from mdpo.checkpoint.convert import export_origin, load_initial_weights, write_hf_export
from mdpo.checkpoint.dist import complete_checkpoints, load_checkpoint, read_meta, save_checkpoint
from mdpo.config import TrainConfig, config_to_dict
from mdpo.data.batching import (
    MicroBatch,
    PairSampler,
    collate,
    collate_packed,
    context_parallel_share,
    pack_microbatches,
    rank_share,
)
from mdpo.data.encoding import load_tokenizer
from mdpo.data.pairs import TokenizedPair, TokenizeReport
from mdpo.data.pairs import load_pairs as read_pairs
from mdpo.errors import ConfigError, DataError, MdpoError
from mdpo.models import sharding
from mdpo.models.gpt import build_gpt_model, packs_as_thd, transformer_config
from mdpo.training.metrics import SUM_FIELDS, MetricsWriter, finalize
from mdpo.training.reference import ReferenceLogps, cache_path, reference_stamp, save_reference_logps
from mdpo.training.step import (
    DPOObjective,
    attach_reference_logps,
    dpo_forward_step,
    reduce_sums,
    run_schedule,
)


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp: int = 1
    cp_rank: int = 0

    @property
    def sizes(self) -> list[int]:
        """[TP, PP, DP, CP], as checkpoints record it."""
        return [self.tp, self.pp, self.dp, self.cp]


def init_parallel(cfg: TrainConfig) -> Layout:
    """torch.distributed and Megatron's TP/PP/CP/DP groups for this run's layout (checked against the world size)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    tp, pp, cp = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp
    if world % (tp * pp * cp):
        raise ConfigError(
            f"world size {world} is not divisible by parallel.tp x parallel.pp x parallel.cp = {tp} x {pp} x {cp}"
        )
    dp = world // (tp * pp * cp)
    gbs, mbs = cfg.schedule.global_batch_size, cfg.schedule.micro_batch_size
    if cfg.data.packing and gbs % dp:
        raise ConfigError(f"schedule.global_batch_size={gbs} is not divisible by the data-parallel size {dp}")
    if not cfg.data.packing and gbs % (mbs * dp):
        raise ConfigError(f"schedule.global_batch_size={gbs} is not divisible by micro_batch_size x DP = {mbs} x {dp}")
    parallel.start(tp, pp, cp)
    return Layout(
        tp,
        pp,
        dp,
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
        cp,
        parallel_state.get_context_parallel_rank(),
    )


def load_pairs(path: str, cfg: TrainConfig, tokenizer, what: str) -> list[TokenizedPair]:
    """Rank 0 tokenizes (and fills the data cache) first; the other ranks then read the cache. A data error on
    rank 0 is raised on every rank, so no rank waits forever at the barrier."""
    report = TokenizeReport()
    error = None
    if torch.distributed.get_rank() == 0:
        try:
            pairs = read_pairs(cfg.data, path, tokenizer, report)
        except MdpoError as err:
            error = str(err)
    message = [error]
    torch.distributed.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise DataError(message[0])
    if torch.distributed.get_rank() != 0:
        pairs = read_pairs(cfg.data, path, tokenizer, report)
    _log(f"{what}: {len(pairs)} pairs from {path} ({report.summary()})")
    return pairs


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the ranks agree on it at a step boundary (a signal may reach them at different
    times), so every rank saves the same checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_writable(folder: Path, key: str) -> None:
    """Fail at start-up, not at the first save, when an output folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".mdpo_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise MdpoError(f"{key}: cannot write to {folder} ({err.strerror or err})") from None


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint's step (a killed run may have logged past its last save);
    a run starting from step 0 starts a new file."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _nonfinite_pairs(outputs: list[dict]) -> list[int]:
    """Dataset indices of the pairs in micro-batches whose loss is not finite, from every rank."""
    local = [i for out in outputs if not math.isfinite(float(out["sums"][0])) for i in out["pair_ids"]]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    return sorted({i for part in gathered for i in part})


def make_microbatches(
    cfg: TrainConfig, pairs: list[TokenizedPair], indices: list[int], pad_id: int, cp_rank: int = 0
) -> list[MicroBatch]:
    """Micro-batches of the given pairs: packs (data.packing) or groups of micro_batch_size padded pairs. With
    sequence parallelism their length is a multiple of the TP size; with context parallelism a multiple of 2 x CP,
    and this CP rank keeps its two chunks of every row."""
    multiple = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    if cfg.data.packing:
        budget = cfg.data.pack_tokens or 2 * cfg.data.max_length
        groups = pack_microbatches(pairs, indices, budget)
        return [collate_packed([pairs[i] for i in g], pad_id, budget, multiple) for g in groups]
    mbs, cp = cfg.schedule.micro_batch_size, cfg.parallel.cp
    multiple *= 2 * cp if cp > 1 else 1
    batches = (collate([pairs[i] for i in indices[k : k + mbs]], pad_id, multiple) for k in range(0, len(indices), mbs))
    return [context_parallel_share(batch, cp, cp_rank) for batch in batches]


def _reset_peak_memory() -> None:
    """Start the peak-memory metric at training: loading, and on CPU the imports' transient peaks, are not it."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    # Linux: resets the resident set's high-water mark; elsewhere the process's lifetime peak stands (ru_maxrss)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_gib() -> float:
    """The resident set's high-water mark (VmHWM on Linux, else ru_maxrss), in GiB."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kib / 2**20


def _log(message: str) -> None:
    if torch.distributed.get_rank() == 0:
        tqdm.write(f"[mdpo] {message}")


def train_dtype(cfg: TrainConfig) -> torch.dtype:
    """Weights and activations: bf16 (with Megatron's fp32 master weights and grads) or fp32."""
    precision = cfg.parallel.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def build_stage(cfg: TrainConfig, layout: Layout, dtype: torch.dtype, load: bool):
    """This rank's pipeline stage of the model: `model.init_from` loaded into it when `load` (HF folder or Megatron
    checkpoint, streamed per tensor and resharded for this layout), else a seeded random init."""
    # Initialised even when weights are loaded next: Megatron marks tensor-parallel weights (which the grad norm and
    # weight decay need) only in its init functions.
    config = transformer_config(
        cfg.model,
        tp=layout.tp,
        pp=layout.pp,
        cp=layout.cp,
        params_dtype=dtype,
        sequence_parallel=cfg.parallel.sequence_parallel,
        recompute=cfg.parallel.recompute,
    )
    model = build_gpt_model(
        cfg.model,
        config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    # Megatron-Core's local RMSNorm (torch.nn.RMSNorm) is built in float32 whatever params_dtype says; its bf16
    # optimizer maps only bf16 weights to checkpoint entries (Megatron-LM's Float16Module casts them all too).
    for param in model.parameters():
        param.data = param.data.to(dtype)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if load and cfg.model.init_from is not None:
        load_initial_weights(model, cfg.model)
    return model


def gather_full_state(model: torch.nn.Module, cfg: TrainConfig, layout: Layout) -> dict | None:
    """The whole model's tensors on global rank 0 (None elsewhere), from the DP- and CP-rank-0 replicas."""
    local = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    local = {sharding.te_name_inverse(k): v for k, v in local.items()}
    payload = (layout.tp_rank, layout.pp_rank, local) if layout.dp_rank == layout.cp_rank == 0 else None
    gathered = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(payload, gathered, dst=0)
    if gathered is None:
        return None
    pieces = {(tp, pp): sd for tp, pp, sd in (g for g in gathered if g is not None)}
    return sharding.merge_state_dicts(
        pieces, num_layers=cfg.model.num_hidden_layers, tp_size=layout.tp, pp_size=layout.pp
    )


class Trainer:
    """Owns the parallel models, optimizer and data for one run; `fit()` runs it."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.layout = init_parallel(cfg)
        seed = cfg.schedule.seed
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        self.dtype = train_dtype(cfg)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.run_dir = Path(cfg.logging.run_dir)
        if torch.distributed.get_rank() == 0:
            _check_writable(self.run_dir, "logging.run_dir")
            if cfg.checkpoint.dir:
                _check_writable(Path(cfg.checkpoint.dir), "checkpoint.dir")

        self.objective = DPOObjective.from_config(cfg.dpo, cfg.model.vocab_size)
        self.thd = packs_as_thd(cfg.model)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if len(self.tokenizer) > cfg.model.vocab_size:
            raise ConfigError(
                f"tokenizer {cfg.data.tokenizer} has {len(self.tokenizer)} tokens but model.vocab_size is "
                f"{cfg.model.vocab_size}"
            )
        self.train_pairs = load_pairs(cfg.data.train_file, cfg, self.tokenizer, "train")
        self.eval_pairs = load_pairs(cfg.data.eval_file, cfg, self.tokenizer, "eval") if cfg.data.eval_file else []
        self.sampler = PairSampler(len(self.train_pairs), cfg.schedule.global_batch_size, seed)
        self.train_steps = cfg.schedule.train_steps or max(1, int(cfg.schedule.epochs * self.sampler.steps_per_epoch))

        policy = build_stage(cfg, self.layout, self.dtype, load=True)
        self.reference, self.reference_cache = None, {}
        if cfg.dpo.reference == "online":
            # The reference starts as an exact copy of the policy and never trains.
            self.reference = build_stage(cfg, self.layout, self.dtype, load=False)
            self.reference.load_state_dict(policy.state_dict())
            self.reference.requires_grad_(False).eval()
        elif cfg.dpo.reference == "precomputed":
            stamp = reference_stamp(cfg)
            for split, pairs in (("train", self.train_pairs), ("eval", self.eval_pairs)):
                if pairs:
                    needed = [p.index for p in pairs]
                    self.reference_cache[split] = ReferenceLogps(cache_path(cfg, split), stamp, needed)

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            overlap_param_gather=cfg.parallel.overlap_param_gather,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        )
        self.policy = DistributedDataParallel(config=policy.config, ddp_config=ddp_config, module=policy)
        opt = cfg.optimizer
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=opt.lr,
                min_lr=0.0,
                weight_decay=opt.weight_decay,
                adam_beta1=opt.adam_beta1,
                adam_beta2=opt.adam_beta2,
                adam_eps=opt.adam_eps,
                clip_grad=opt.clip_grad,
                bf16=self.dtype == torch.bfloat16,
                params_dtype=self.dtype,
                use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            ),
            [self.policy],
        )
        # HF's rounding; Megatron's scheduler needs at least one step after warmup.
        warmup = min(math.ceil(cfg.schedule.warmup_ratio * self.train_steps), self.train_steps - 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=opt.lr,
            min_lr=0.0,
            lr_warmup_steps=warmup,
            lr_decay_steps=self.train_steps,
            lr_decay_style="linear",
            start_wd=opt.weight_decay,
            end_wd=opt.weight_decay,
            wd_incr_steps=self.train_steps,
            wd_incr_style="constant",
        )
        config = policy.config
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self.policy.no_sync
        config.grad_scale_func = self.optimizer.scale_loss

        self.is_logger = torch.distributed.get_rank() == 0

    def _microbatches(self, indices: list[int], pairs: list[TokenizedPair]) -> list[MicroBatch]:
        """This rank's pairs as micro-batches: packs of at most data.pack_tokens tokens, or micro_batch_size
        pairs padded to their longest sequence."""
        batches = make_microbatches(self.cfg, pairs, indices, self.tokenizer.pad_token_id, self.layout.cp_rank)
        return [mb.to(self.device) for mb in batches] if self.device is not None else batches

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step; a non-finite loss or grad norm skips the update (the caller applies the policy).
        Timed from collation to the finished update (the GPU synchronised), so tokens_per_second is honest."""
        started = time.perf_counter()
        microbatches = self._microbatches(
            rank_share(self.sampler.global_batch(step), self.layout.dp_rank, self.layout.dp), self.train_pairs
        )
        self._attach_reference(microbatches, "train")
        self.policy.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = run_schedule(
            partial(dpo_forward_step, self.objective, self.thd), microbatches, self.policy, forward_only=False
        )
        record = finalize(self._reduce(outputs), self.objective.components)
        learning_rate = self.optimizer.param_groups[0]["lr"]
        # The norm is checked before the update: Megatron's clipping turns an inf norm into NaN weights.
        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        finite = math.isfinite(record["loss"]) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.scheduler.step(increment=1)
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
            peak_memory_gib=self._peak_memory_gib(),
            skipped=not finite,
        )
        return record

    def profiled_step(self, step: int) -> dict[str, float]:
        """One train_step under torch.profiler: rank 0 writes RUN_DIR/profile.txt (ops by device time, the GPU's
        kernels when there is one) and profile_trace.json (for chrome://tracing or Perfetto)."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profiler:
            record = self.train_step(step)
        if self.is_logger:
            sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            table = profiler.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=80)
            (self.run_dir / "profile.txt").write_text(f"step {step + 1}\n{table}\n")
            profiler.export_chrome_trace(str(self.run_dir / "profile_trace.json"))
        return record

    def _peak_memory_gib(self) -> float:
        """The largest peak over ranks since training started: CUDA memory allocated on GPU, the resident set on
        CPU (see _reset_peak_memory)."""
        if torch.cuda.is_available():
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=self.device)
        else:
            peak = torch.tensor([_peak_rss_gib()])
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        return float(peak)

    def evaluate(self) -> dict[str, float]:
        """Forward-only DPO metrics over the held-out pairs (each DP rank takes every dp-th pair)."""
        if len(self.eval_pairs) < self.layout.dp:
            raise DataError(f"{self.cfg.data.eval_file}: fewer eval pairs than data-parallel ranks ({self.layout.dp})")
        mine = list(range(self.layout.dp_rank, len(self.eval_pairs), self.layout.dp))
        microbatches = self._microbatches(mine, self.eval_pairs)
        self._attach_reference(microbatches, "eval")
        with torch.no_grad():
            outputs = run_schedule(
                partial(dpo_forward_step, self.objective, self.thd), microbatches, self.policy, forward_only=True
            )
        return finalize(self._reduce(outputs), self.objective.components, prefix="eval_")

    def fit(self) -> dict[str, float]:
        """Train for the configured steps, resuming from the latest complete checkpoint; returns the last step's
        metrics (plus `eval_*` at the end and `initial_eval_*` before the first step when there is an eval set).
        SIGTERM/SIGINT (a scheduler's pre-emption) save a checkpoint and return early."""
        cfg = self.cfg
        start = self._resume()
        _reset_peak_memory()
        writer = None
        if self.is_logger:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            _truncate_metrics(self.run_dir / "metrics.jsonl", start)
            writer = MetricsWriter(
                self.run_dir, cfg.logging.tensorboard, cfg.logging.wandb_project, config_to_dict(cfg)
            )
        summary: dict[str, float] = {}
        if self.eval_pairs and start == 0:
            initial = self.evaluate()
            summary.update({"initial_" + k: v for k, v in initial.items()})
            self._emit(writer, {"step": 0, **initial})
        stop = _StopRequest()
        progress = tqdm(
            total=self.train_steps, initial=start, desc="dpo", disable=not (self.is_logger and cfg.logging.progress)
        )
        record: dict[str, float] = {}
        skipped = 0
        step = start
        for step in range(start, self.train_steps):
            step_fn = self.profiled_step if step + 1 == cfg.logging.profile_step else self.train_step
            record = step_fn(step)
            if record["skipped"]:
                skipped += 1
                where = f"step {step + 1}: non-finite loss ({record['loss']}) or grad norm ({record['grad_norm']})"
                if cfg.optimizer.nonfinite == "stop" or skipped > cfg.optimizer.max_skipped_steps:
                    raise MdpoError(f"{where}; pairs in the offending micro-batches: {record['nonfinite_pairs']}")
                _log(f"{where}: step skipped ({skipped} so far)")
            record["skipped_steps"] = skipped
            if (step + 1) % cfg.logging.log_interval == 0 or step + 1 == self.train_steps:
                self._emit(writer, record)
            interval = cfg.logging.eval_interval
            if self.eval_pairs and interval and (step + 1) % interval == 0 and step + 1 < self.train_steps:
                self._emit(writer, {"step": step + 1, **self.evaluate()})
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}")
            exit_interval = cfg.schedule.exit_interval
            leaving = stop.agreed() or bool(exit_interval and (step + 1) % exit_interval == 0)
            if leaving and step + 1 < self.train_steps:
                progress.close()
                stop.restore()
                self.save(step + 1)
                _log(f"stopped after step {step + 1} with a checkpoint; run the same command again to resume")
                if writer is not None:
                    writer.close()
                return {**summary, **record, "stopped_early": True}
            every = cfg.checkpoint.save_interval
            if every and (step + 1) % every == 0 and step + 1 < self.train_steps:
                self.save(step + 1)
        progress.close()
        stop.restore()
        summary.update(record)
        if self.eval_pairs:
            final = self.evaluate()
            summary.update(final)
            self._emit(writer, {"step": self.train_steps, **final})
        if writer is not None:
            writer.close()
        if cfg.checkpoint.save_at_end and start < self.train_steps:
            self.save(self.train_steps)
        if cfg.checkpoint.export_hf:
            self.export_hf(self.run_dir / "hf")
        if self.is_logger and cfg.logging.plot:
            from mdpo.plot import plot_metrics

            _log(f"plot: {plot_metrics(self.run_dir)}")
        return summary

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.cfg.checkpoint.dir or self.run_dir / "checkpoints")

    def _sync_params(self) -> None:
        """With parallel.overlap_param_gather each DP rank holds only its shard of the updated weights until the
        next forward's hooks gather them; a checkpoint or export reads the weights directly, so gather them now."""
        if self.cfg.parallel.overlap_param_gather:
            self.policy.start_param_sync(force_sync=True)

    def save(self, step: int) -> None:
        self._sync_params()
        meta = {
            "consumed_samples": step * self.cfg.schedule.global_batch_size,
            "global_batch_size": self.cfg.schedule.global_batch_size,
            "layout": self.layout.sizes,
            "config": config_to_dict(self.cfg),
        }
        folder = save_checkpoint(
            self.checkpoint_root, step, self.policy.module, self.optimizer, self.scheduler, meta,
            self.cfg.checkpoint.keep_last,
        )  # fmt: skip
        _log(f"checkpoint: {folder}")

    def _resume(self) -> int:
        """Load the checkpoint `checkpoint.resume` names (auto: the latest complete one); the step to start at."""
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return 0
        if resume == "auto":
            found = complete_checkpoints(self.checkpoint_root)
            if not found:
                return 0
            folder = found[-1]
        else:
            folder = Path(resume)
        meta = read_meta(folder)
        if meta["global_batch_size"] != self.cfg.schedule.global_batch_size:
            raise ConfigError(
                f"{folder}: saved with schedule.global_batch_size={meta['global_batch_size']}, now "
                f"{self.cfg.schedule.global_batch_size}: the resumed data order would differ"
            )
        saved = list(meta["layout"]) + [1] * (4 - len(meta["layout"]))  # [TP, PP, DP] before CP existed
        same_layout = saved == self.layout.sizes
        load_checkpoint(folder, self.policy.module, self.optimizer, self.scheduler, load_rng=same_layout)
        _log(f"resumed from {folder} (step {meta['step']})")
        return int(meta["step"])

    def _attach_reference(self, microbatches: list[MicroBatch], split: str) -> None:
        """Reference log-probs for each micro-batch: a forward pass (online), the cache (precomputed), or none."""
        if self.reference is not None:
            attach_reference_logps(microbatches, self.reference, self.objective.vocab_size, self.thd)
        elif split in self.reference_cache:
            for mb in microbatches:
                mb.ref_logps = self.reference_cache[split].lookup(mb.pair_ids, torch.float32, mb.tokens.device)

    def _reduce(self, outputs: list[dict]):
        return reduce_sums(outputs, len(SUM_FIELDS) + len(self.objective.components))

    def _emit(self, writer: MetricsWriter | None, record: dict) -> None:
        if writer is not None:
            writer.write(record)

    def export_hf(self, folder: Path) -> None:
        """The trained policy as a HF folder of the model's family (tokenizer included), gathered on rank 0."""
        self._sync_params()
        full = gather_full_state(self.policy.module, self.cfg, self.layout)
        if full is not None:
            init_from = self.cfg.model.init_from
            write_hf_export(folder, full, self.cfg.model, export_origin(Path(init_from)) if init_from else None)
            self.tokenizer.save_pretrained(folder)
            _log(f"exported HF model to {folder}")
        torch.distributed.barrier()


def precompute_reference(cfg: TrainConfig) -> list[Path]:
    """`mdpo precompute-ref`: the reference forward once over the train and eval pairs (any TP/PP/DP layout),
    written per split to the reference cache with the stamp `dpo.reference=precomputed` checks."""
    if cfg.model.init_from is None:
        raise ConfigError("precompute-ref needs model.init_from (the reference checkpoint)")
    try:
        layout = init_parallel(cfg)
        torch.manual_seed(cfg.schedule.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.schedule.seed)
        dtype = train_dtype(cfg)
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        reference = build_stage(cfg, layout, dtype, load=True).eval()
        stamp = reference_stamp(cfg)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        written = []
        for split, path in (("train", cfg.data.train_file), ("eval", cfg.data.eval_file)):
            if not path:
                continue
            pairs = load_pairs(path, cfg, tokenizer, split)
            mine = list(range(layout.dp_rank, len(pairs), layout.dp))
            everything = make_microbatches(cfg, pairs, mine, tokenizer.pad_token_id, layout.cp_rank)
            results: list[tuple[list[int], list[float]]] = []
            chunk = 64  # micro-batches per schedule call
            for start in tqdm(
                range(0, len(everything), chunk), desc=f"reference {split}", disable=torch.distributed.get_rank() != 0
            ):
                microbatches = everything[start : start + chunk]
                if device is not None:
                    microbatches = [mb.to(device) for mb in microbatches]
                attach_reference_logps(microbatches, reference, cfg.model.vocab_size, packs_as_thd(cfg.model))
                if parallel_state.is_pipeline_last_stage() and layout.tp_rank == layout.cp_rank == 0:
                    results += [(mb.pair_ids, mb.ref_logps.double().cpu().tolist()) for mb in microbatches]
            gathered = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
            torch.distributed.gather_object(results, gathered, dst=0)
            if gathered is not None:
                table = {}
                for ids, logps in (item for part in gathered for item in part):
                    m = len(ids)
                    table.update({pid: (logps[k], logps[m + k]) for k, pid in enumerate(ids)})
                indices = sorted(table)
                target = cache_path(cfg, split)
                save_reference_logps(
                    target, indices, [table[i][0] for i in indices], [table[i][1] for i in indices], stamp
                )
                _log(f"reference log-probs of {len(indices)} {split} pairs -> {target}")
                written.append(target)
            torch.distributed.barrier()
        return written
    finally:
        parallel.stop()


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run DPO as configured; used by `mdpo train` and `mdpo demo`."""
    try:
        return Trainer(cfg).fit()
    finally:
        parallel.stop()
