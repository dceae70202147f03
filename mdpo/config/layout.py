"""The one home of the layout rules: how TP x PP x CP x DP processes split a model and a global batch.

`Layout` is frozen and checks itself when built. The config checks a layout without a world size (DP = 1), the
trainer with torchrun's world size, the converters with the layout they write, and the planner with every layout it
searches; each names the sizes in its own words (`Wording`: config keys, command-line flags, the planner's table),
but the rules, and the sizes derived from them (DP, the sequence-length multiple, a stage's layers, the padded
vocabulary), are written only here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mdpo.errors import ConfigError

VOCAB_PAD_MULTIPLE = 128
# Core attentions that split a sequence over context-parallel ranks: Transformer Engine's and mdpo's SDPA.
CONTEXT_PARALLEL_ATTENTIONS = ("auto", "te", "sdpa")


@dataclass(frozen=True)
class Wording:
    """How a front end names the layout's sizes and the model's counts in its error messages. `key` and `size`
    format a size's name and its value (fields `name`, `NAME`, `value`); `counts` format what a size must divide
    (fields `heads`, `kv_heads`, `layers`)."""

    key: str
    size: str
    counts: dict[str, str]
    short: dict[str, str] = field(default_factory=dict)  # a size's own name where NAME is not its upper case

    def name(self, name: str) -> str:
        return self.key.format(name=name, NAME=self.short.get(name, name.upper()))

    def sized(self, name: str, value: int) -> str:
        return self.size.format(name=name, NAME=self.short.get(name, name.upper()), value=value)


CONFIG_WORDING = Wording(
    key="parallel.{name}",
    size="parallel.{name}={value}",
    counts={
        "heads": "model.num_attention_heads={heads}",
        "kv_heads": "model.num_key_value_heads={kv_heads}",
        "layers": "model.num_hidden_layers={layers}",
    },
)
FLAG_WORDING = Wording(
    key="--{name}",
    size="--{name} {value}",
    counts={
        "heads": "the attention heads ({heads} query, {kv_heads} key/value)",
        "kv_heads": "the attention heads ({heads} query, {kv_heads} key/value)",
        "layers": "the {layers} layers",
    },
)
PLANNER_WORDING = Wording(
    key="{NAME}",
    size="{NAME}={value}",
    counts={
        "heads": "the heads ({heads}, {kv_heads} key/value)",
        "kv_heads": "the heads ({heads}, {kv_heads} key/value)",
        "layers": "{layers} layers",
    },
    short={"sequence_parallel": "SP"},
)


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Megatron-LM's rule: round the vocabulary up to a multiple of TP x 128 so every TP shard is equal."""
    step = multiple * tp
    return -(-vocab_size // step) * step


def stage_layers(num_layers: int, pp_rank: int, pp_size: int, vp_stage: int = 0, vpp: int = 1) -> range:
    """Global layer indices of one model chunk (the stage's only one when vpp = 1): chunk `vp_stage` of stage
    `pp_rank` is virtual stage vp_stage x PP + pp_rank of PP x VPP equal parts (`Layout.check_model` guarantees
    the split), as Megatron's `get_transformer_layer_offset` places them."""
    per_chunk = num_layers // (pp_size * vpp)
    first = (vp_stage * pp_size + pp_rank) * per_chunk
    return range(first, first + per_chunk)


@dataclass(frozen=True)
class Layout:
    """Process-group sizes in Megatron's order (TP innermost, then CP, DP, PP): world = TP x PP x CP x DP.

    `vpp` is the number of model chunks per pipeline stage (Megatron's interleaved 1F1B schedule): chunk v of
    stage p holds the layers of virtual stage v x PP + p (`chunk_layers`)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    vpp: int = 1
    sequence_parallel: bool = False
    ep: int = 1  # expert-parallel size: each MoE layer's experts split over EP ranks (carved out of TP x CP x DP)
    etp: int | None = None  # expert-tensor-parallel size (each expert split over ETP ranks); None = TP, Megatron's
    wording: Wording = field(default=CONFIG_WORDING, repr=False, compare=False)  # how errors name the sizes

    def __post_init__(self) -> None:
        w = self.wording
        for name in ("tp", "pp", "cp", "dp", "vpp", "ep", "etp"):
            value = getattr(self, name)
            if name == "etp" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{w.name(name)} must be >= 1, got {value!r}")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError(f"{w.name('sequence_parallel')}=true needs {w.name('tp')} > 1")
        if self.vpp > 1 and self.pp == 1:
            raise ConfigError(f"{w.name('vpp')} > 1 needs {w.name('pp')} > 1 (model chunks interleave over stages)")

    @classmethod
    def for_world(cls, world: int, **sizes) -> Layout:
        """The layout of `world` processes: DP is what TP x PP x CP leave."""
        probe = cls(**sizes)  # the sizes' own rules first
        if world % probe.model_parallel:
            w = probe.wording
            raise ConfigError(
                f"world size {world} is not divisible by {w.name('tp')} x {w.name('pp')} x {w.name('cp')} = "
                f"{probe.tp} x {probe.pp} x {probe.cp}"
            )
        layout = dataclasses.replace(probe, dp=world // probe.model_parallel)
        layout.check_expert_groups()
        return layout

    def check_expert_groups(self) -> None:
        """EP x ETP ranks hold one copy of the experts: they must divide the TP x CP x DP ranks of a stage (so EP
        divides DP when ETP = TP and CP = 1), out of which Megatron carves the expert groups."""
        w = self.wording
        if (self.tp * self.cp * self.dp) % (self.expert_tp * self.ep):
            raise ConfigError(
                f"{w.name('ep')} x {w.name('etp')} = {self.ep} x {self.expert_tp} does not divide the "
                f"{self.tp * self.cp * self.dp} ranks of one pipeline stage (TP x CP x DP = {self.tp} x {self.cp} x "
                f"{self.dp}): Megatron carves the expert groups out of them"
            )

    # ------------------------------------------------------------------ derived sizes

    @property
    def model_parallel(self) -> int:
        """Processes that hold one copy of the model between them (TP x PP x CP)."""
        return self.tp * self.pp * self.cp

    @property
    def expert_tp(self) -> int:
        """The expert-tensor-parallel size: `etp`, or TP when unset (Megatron's default)."""
        return self.etp if self.etp is not None else self.tp

    @property
    def expert_dp(self) -> int:
        """Data-parallel replicas of each expert (Megatron's expert data-parallel size): the ranks of one stage that
        EP x ETP leave."""
        return self.tp * self.cp * self.dp // (self.expert_tp * self.ep)

    @property
    def world(self) -> int:
        return self.model_parallel * self.dp

    @property
    def sizes(self) -> list[int]:
        """[TP, PP, DP, CP] (and EP, ETP for an expert-parallel layout), as checkpoints record it."""
        experts = [self.ep, self.expert_tp] if self.ep > 1 or self.etp is not None else []
        return [self.tp, self.pp, self.dp, self.cp, *experts]

    @property
    def sequence_multiple(self) -> int:
        """What every padded row's length must be a multiple of: TP with sequence parallelism (the sequence is split
        over the TP ranks), times 2 x CP with context parallelism (each CP rank takes two chunks of every row)."""
        return (self.tp if self.sequence_parallel else 1) * (2 * self.cp if self.cp > 1 else 1)

    @property
    def pack_multiple(self) -> int:
        """What a packed row's length must be a multiple of (packed rows have no context parallelism)."""
        return self.tp if self.sequence_parallel else 1

    def padded_vocab(self, vocab_size: int) -> int:
        return padded_vocab_size(vocab_size, self.tp)

    def stage_layers(self, num_layers: int, pp_rank: int, vp_stage: int = 0) -> range:
        return stage_layers(num_layers, pp_rank, self.pp, vp_stage, self.vpp)

    @property
    def min_microbatches(self) -> int:
        """Micro-batches one schedule call needs at least: PP with the interleaved schedule (Megatron's rule)."""
        return self.pp if self.vpp > 1 else 1

    # ------------------------------------------------------------------ rules against the rest of a run

    def check_model(
        self,
        heads: int,
        kv_heads: int | None,
        layers: int,
        experts: int | None = None,
        expert_width: int = 0,
        expert_bias: bool = False,
    ) -> None:
        """TP splits the query and key/value heads evenly; PP x VPP splits the layers evenly; EP splits the experts
        and ETP each expert's width evenly (EP > 1 needs experts); experts with biases (gpt-oss) are not split
        (Megatron-Core's MoE layer asserts ETP = 1 with them)."""
        kv_heads = kv_heads or heads
        w = self.wording
        counts = {"heads": heads, "kv_heads": kv_heads, "layers": layers}
        for count in ("heads", "kv_heads"):
            if counts[count] % self.tp:
                raise ConfigError(f"{w.sized('tp', self.tp)} does not divide {w.counts[count].format(**counts)}")
        chunks = self.pp * self.vpp
        if layers % chunks:
            size = w.sized("pp", self.pp) if self.vpp == 1 else f"{w.name('pp')} x {w.name('vpp')} = {chunks}"
            raise ConfigError(f"{size} does not divide {w.counts['layers'].format(**counts)}")
        if not experts and (self.ep > 1 or (self.etp or 1) > 1):
            raise ConfigError(f"{w.name('ep')} and {w.name('etp')} > 1 need a mixture-of-experts model (this has none)")
        if experts and experts % self.ep:
            raise ConfigError(f"{w.sized('ep', self.ep)} does not divide the model's {experts} experts")
        if experts and expert_bias and self.expert_tp != 1:
            raise ConfigError(
                f"the expert-tensor-parallel size {self.expert_tp} ({w.name('etp')}, else {w.name('tp')}) must be 1 "
                "for experts with biases (gpt-oss): Megatron-Core's MoE layer takes their biases only unsplit"
            )
        if experts and expert_width % self.expert_tp:
            raise ConfigError(
                f"the expert-tensor-parallel size {self.expert_tp} ({w.name('etp')}, else {w.name('tp')}) does not "
                f"divide the experts' width {expert_width}"
            )

    def pools_routing(self, recompute: str) -> bool:
        """Whether transformers' pooled load-balancing loss (the routing of every layer of a forward summed on the
        last stage) is exact here: one pipeline stage, and routers that run once per forward (full recompute runs
        them without gradients first, then again in the backward)."""
        return self.pp == 1 and recompute != "full"

    def check_moe(self, experts: int | None, aux_coef: float, recompute: str, aux_type: str = "auto") -> None:
        """What training a mixture of experts adds: Megatron-Core's MoE layers train under TP only with sequence
        parallelism; transformers' load-balancing loss (`aux_type` transformers, `aux_coef` > 0) only where it is
        exact (`pools_routing`): elsewhere Megatron's per-layer losses (megatron, seq) attach in each stage."""
        if not experts:
            return
        w = self.wording
        if self.tp > 1 and not self.sequence_parallel:
            raise ConfigError(
                f"{w.sized('tp', self.tp)} with a mixture-of-experts model needs {w.name('sequence_parallel')}=true "
                "(Megatron-Core's MoE layers train under tensor parallelism only with it; unset, it is on)"
            )
        if aux_coef and aux_type == "transformers" and not self.pools_routing(recompute):
            where = f"{w.sized('pp', self.pp)}" if self.pp > 1 else "recompute full"
            raise ConfigError(
                f"dpo.router_aux_loss_type=transformers with {where}: transformers' loss pools the routing of every "
                "layer of a forward, which a pipeline splits over stages and full recompute runs twice; use "
                "megatron or seq (per layer, any layout), or auto"
            )

    def check_batch(self, global_batch: int, micro_batch: int, packing: bool) -> None:
        """A global batch splits evenly over the DP ranks, and (padded rows) each share into whole micro-batches;
        the interleaved schedule needs at least PP pairs per DP rank (each a micro-batch of its own if need be)."""
        if self.vpp > 1 and global_batch // self.dp < self.pp:
            raise ConfigError(
                f"schedule.global_batch_size={global_batch} gives {global_batch // self.dp} pairs per data-parallel "
                f"rank, fewer than parallel.pp={self.pp}: the interleaved schedule (parallel.vpp > 1) needs at "
                "least one micro-batch per stage"
            )
        if packing and global_batch % self.dp:
            raise ConfigError(
                f"schedule.global_batch_size={global_batch} is not divisible by the data-parallel size {self.dp}"
            )
        if not packing and global_batch % (micro_batch * self.dp):
            raise ConfigError(
                f"schedule.global_batch_size={global_batch} is not divisible by micro_batch_size x DP = "
                f"{micro_batch} x {self.dp}"
            )

    def check_rows(self, packing: bool) -> None:
        """Context parallelism cuts every row into 2 x CP chunks: a packed row would have to be cut per sequence."""
        if self.cp > 1 and packing:
            raise ConfigError(
                f"{self.wording.name('cp')} > 1 takes padded micro-batches (data.packing=false): packed rows would "
                "have to be split sequence by sequence"
            )

    def check_attention(self, attention: str, position_embedding: str, resolved: str | None = None) -> None:
        """What the core attention must do for this layout. The config checks `model.attention` as written (`auto`
        passes: the machine decides); the model build checks what it `resolved` to (te, sdpa or local)."""
        name = self.wording.name
        used = resolved or attention
        if self.cp > 1 and (position_embedding == "alibi" or used not in CONTEXT_PARALLEL_ATTENTIONS):
            on_machine = f" ({resolved} on this machine)" if resolved not in (None, attention) else ""
            raise ConfigError(
                f"{name('cp')} > 1 needs RoPE and model.attention auto, te or sdpa (Megatron's local attention and "
                f"ALiBi have no context parallelism), got model.attention={attention}{on_machine}"
            )
