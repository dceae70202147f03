"""What every command that runs the model starts with: the parallel world, seeds, dtype and device, the tokenizer,
and a pipeline stage of the model with its starting weights. Shared by training and `mdpo precompute-ref`."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from transformers import PreTrainedTokenizerBase

from mdpo import parallel
from mdpo.checkpoint.load import load_initial_weights
from mdpo.config import Layout, LoRAConfig, ParallelConfig, TrainConfig
from mdpo.data.batching import MicroBatch, rank_share, ranking_units
from mdpo.data.encoding import load_tokenizer
from mdpo.data.pairs import TokenizedPair
from mdpo.errors import ConfigError
from mdpo.models.gpt import build_gpt_model, core_attention, packs_as_thd, transformer_config
from mdpo.models.lora import init_adapters
from mdpo.training.console import log
from mdpo.training.data import make_microbatches
from mdpo.training.experts import Experts
from mdpo.training.step import Scorer

# Micro-batches a forward-only pass puts on the device per schedule call (results leave it as often).
FORWARD_CHUNK = 32


@dataclass(frozen=True)
class Run:
    """One process's share of a run: the layout (checked against the world size), its ranks, and how it computes."""

    layout: Layout
    ranks: parallel.Ranks
    dtype: torch.dtype
    device: torch.device | None  # None on CPU: tensors stay where they are built
    tokenizer: PreTrainedTokenizerBase
    share_prompt: bool  # each pair one sequence [prompt | chosen | rejected] (data.share_prompt, resolved)
    scorer: Scorer  # how the last stage's output becomes per-sequence log-probs
    experts: Experts | None  # a mixture of experts' routers, load balancing and expert-parallel forwards

    @property
    def is_logger(self) -> bool:
        """Global rank 0 writes the run's files and prints."""
        return torch.distributed.get_rank() == 0

    def share(self, cfg: TrainConfig, pairs: list[TokenizedPair], indices: Sequence[int]) -> list[int]:
        """This DP rank's contiguous share of `indices` (into `pairs`): whole rankings under plackett_luce."""
        units = ranking_units([pairs[i] for i in indices]) if cfg.dpo.whole_rankings else None
        return rank_share(indices, self.ranks.dp, self.layout.dp, units)

    def microbatches(self, cfg: TrainConfig, pairs: list[TokenizedPair], indices: list[int]) -> list[MicroBatch]:
        """This rank's pairs (`indices` into `pairs`) as micro-batches of its layout, on the host (at least
        `Layout.min_microbatches` of them when there are that many pairs), as many as every other rank of an
        expert group runs (`Experts.in_step`)."""
        build = lambda at_least: make_microbatches(
            cfg.data,
            cfg.schedule,
            self.layout,
            pairs,
            indices,
            self.tokenizer.pad_token_id,
            self.ranks.cp,
            self.share_prompt,
            at_least,
            cfg.dpo.whole_rankings,
        )
        batches = build(0)
        return self.experts.in_step(batches, build) if self.experts is not None else batches

    def on_device(self, batches: list[MicroBatch]) -> list[MicroBatch]:
        return [mb.to(self.device) for mb in batches] if self.device is not None else batches

    def device_chunks(self, batches: list[MicroBatch]) -> Iterator[list[MicroBatch]]:
        """A forward-only pass over many micro-batches (evaluation, `precompute-ref`): FORWARD_CHUNK of them on the
        device at a time, the rest on the host; a remainder too short for the interleaved schedule
        (`Layout.min_microbatches`) joins the chunk before it."""
        starts = list(range(0, len(batches), FORWARD_CHUNK))
        if len(starts) > 1 and len(batches) - starts[-1] < self.layout.min_microbatches:
            starts.pop()
        for start, end in zip(starts, [*starts[1:], len(batches)]):
            yield self.on_device(batches[start:end])


def train_dtype(parallel_cfg: ParallelConfig) -> torch.dtype:
    """Weights and activations: bf16 (with Megatron's fp32 master weights and grads) or fp32."""
    precision = parallel_cfg.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def start_run(cfg: TrainConfig) -> Run:
    """torch.distributed and Megatron's groups for the configured layout at torchrun's world size, the seeds, and
    the tokenizer (refused when it has more tokens than the model's vocabulary)."""
    layout = cfg.parallel.layout(int(os.environ.get("WORLD_SIZE", 1)), moe=cfg.model.is_moe)
    layout.check_batch(cfg.schedule.global_batch_size, cfg.schedule.micro_batch_size, cfg.data.packing)
    ranks = parallel.start(layout)
    torch.manual_seed(cfg.schedule.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.schedule.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_vocabulary(tokenizer, cfg.data.tokenizer, cfg.model.vocab_size)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    dtype = train_dtype(cfg.parallel)
    scorer = Scorer(cfg.model, cfg.model.logprob_chunk_tokens, packs_as_thd(cfg.model, dtype), cfg.dpo.ld_alpha)
    experts = Experts.of(cfg, layout.ep)
    _say_resolved(cfg, layout)
    return Run(layout, ranks, dtype, device, tokenizer, share_prompt(cfg), scorer, experts)


def _say_resolved(cfg: TrainConfig, layout: Layout) -> None:
    """The automatic choices a mixture of experts' layout made, said once at start."""
    if cfg.parallel.sequence_parallel is None and layout.sequence_parallel:
        log("parallel.sequence_parallel: on (auto: Megatron-Core's MoE layers train under tensor parallelism with it)")
    if (
        cfg.dpo.router_aux_loss_type == "auto"
        and cfg.router_aux_loss_type != "transformers"
        and cfg.router_aux_loss_coef
    ):
        log(
            "dpo.router_aux_loss_type: megatron (auto: transformers' pooled load-balancing loss is exact with one "
            "pipeline stage and no full recompute only; Megatron-Core's per-layer loss, each micro-batch's)"
        )


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, name: str, vocab_size: int) -> None:
    """Every token id must have a row in the model (a config's vocabulary may be larger: Qwen pads 151,665 ids to
    151,936 rows)."""
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"tokenizer {name} has {len(tokenizer)} tokens but model.vocab_size is {vocab_size}")


def share_prompt(cfg: TrainConfig) -> bool:
    """`data.share_prompt` resolved: on (None) wherever it is exact, i.e. without context parallelism and with
    mdpo's own core attentions; an explicit true where it is not is refused (by the config for CP and an explicit
    model.attention=te, here for Transformer Engine's layers that `auto` chose)."""
    te = core_attention(cfg.model) == "te"
    if cfg.data.share_prompt and te:
        raise ConfigError(
            "data.share_prompt=true needs mdpo's core attention (sdpa or local): model.attention=auto chose "
            "Transformer Engine's layers here, whose attention takes no attention blocks; set model.attention=sdpa "
            "or data.share_prompt=false"
        )
    if cfg.data.share_prompt is None and (cfg.parallel.cp > 1 or te):
        why = "context parallelism" if cfg.parallel.cp > 1 else "Transformer Engine's attention"
        log(f"data.share_prompt: off (auto; not exact with {why}): each pair's prompt runs in both sequences")
        return False
    return cfg.data.share_prompt is not False


def stage_config(cfg: TrainConfig, layout: Layout, dtype: torch.dtype, experts: Experts | None) -> TransformerConfig:
    """The TransformerConfig of this rank's model chunks (the policy's with its `experts`' router losses). Weights are
    initialised even when they are loaded next: Megatron marks tensor-parallel weights (which the grad norm and
    weight decay need) only in its init functions."""
    return transformer_config(
        cfg.model,
        tp=layout.tp,
        pp=layout.pp,
        vpp=layout.vpp,
        cp=layout.cp,
        ep=layout.ep,
        etp=layout.etp,
        params_dtype=dtype,
        sequence_parallel=layout.sequence_parallel,
        recompute=cfg.parallel.recompute,
        **(experts.config_fields() if experts is not None else {}),
    )


def build_model(
    cfg: TrainConfig,
    layout: Layout,
    dtype: torch.dtype,
    load: bool,
    *,
    experts: Experts | None = None,
    lora: LoRAConfig | None = None,
) -> list[GPTModel]:
    """This rank's model chunks: its pipeline stage, as `layout.vpp` chunks with an interleaved pipeline (one
    otherwise), each with `model.init_from` loaded into it when `load` (HF folder or Megatron checkpoint, streamed
    per tensor and resharded for this layout), else a seeded random init. The output layer hands on hidden states:
    the loss applies it to the scored positions only. The policy's build passes its `experts` (its routers and
    load-balancing loss) and a LoRA run's `lora` (adapters on a frozen base, `models.lora`); a reference's
    neither."""
    config = stage_config(cfg, layout, dtype, experts)
    router = experts.router() if experts is not None else None
    chunks = []
    for vp_stage in range(layout.vpp) if layout.vpp > 1 else [None]:
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        model = build_gpt_model(
            cfg.model,
            config,
            pre_process=first,
            post_process=last,
            vp_stage=vp_stage,
            scoring=True,
            lora=lora,
            router=router,
        )
        # Megatron-Core's local RMSNorm (torch.nn.RMSNorm) is built in float32 whatever params_dtype says; its bf16
        # optimizer maps only bf16 weights to checkpoint entries (Megatron-LM's Float16Module casts them all too).
        for param in model.parameters():
            param.data = param.data.to(dtype)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        if load and cfg.model.init_from is not None:
            load_initial_weights(model, cfg.model)
        if lora is not None:
            init_adapters(model, cfg.schedule.seed)
        chunks.append(model)
    return chunks


def frozen(chunks: list[GPTModel]) -> list[GPTModel]:
    """Model chunks for forward-only passes (a reference, an evaluated model): no gradients, eval mode."""
    for chunk in chunks:
        chunk.requires_grad_(False).eval()
    return chunks
