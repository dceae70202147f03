"""Machinery shared by every HF model family: a family is a mapping table plus config translation, nothing else.

A table row is (Megatron name, HF names, transform). Transforms are the only real tensor work:

- `copy`: the same tensor.
- `vocab`: embedding/head rows padded with zeros to the padded vocabulary (stripped on the way back).
- `norm_vocab`: as `vocab`, rows first L2-normalised (Baichuan 2's NormHead folded in; see `families.baichuan`).
- `qkv`: separate q, k, v (weights or biases) -> Megatron's fused layout, per query group
  [q heads of the group, k, v], so GQA shards cleanly over TP.
- `packed_qkv`: one HF tensor holding q|k|v stacked (Qwen's c_attn, Baichuan's W_pack) -> the same fused layout.
- `gate_up`: [gate; up] stacked into `linear_fc1` (the table lists gate first, whatever the HF names).
- `expert`, `expert_gate_up`: one expert's part of a HF tensor that holds every expert stacked ([experts, in, out]
  weights, [experts, out] biases: gpt-oss), transposed to Megatron's [out, in]; `expert_gate_up` also de-interleaves
  gate (even columns) and up (odd ones) into [gate; up]. The expert is the one the Megatron name numbers; the way
  back stacks the experts again.

Mixture-of-experts families add `moe_tensors`: the MLP rows of a layer with experts (its router, a shared expert's
rows and, with `{e}` in the names, one row per expert, global expert numbers on both sides), which replace the dense
MLP's `mlp.` rows there.

Tensors here are full (unsharded); `mdpo.models.sharding` cuts them for a TP/PP rank. Expected HF shapes are not
written anywhere: they are derived by running the table backwards on meta tensors of the Megatron shapes.

A family is one `Family` record (docs/adding-a-family.md): besides its table and config translation, what the rest
of mdpo asks of it (the config.json values it refuses, the oracle `mdpo convert --check` runs, its planner presets,
the chat template `data.template: auto` falls back to), so that no other list names the families.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mdpo.config import ModelConfig

Entry = tuple[str, tuple[str, ...], str]
LAYER_PREFIX_MCORE = "decoder.layers.{i}."
EMBEDDING, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"


# A float64 forward of a HF folder's tensors, for a family transformers has no class of (its model code is remote):
# (model, tensors) -> a function from token ids [b, s] to logits [b, s, vocab]
StandIn = Callable[[ModelConfig, dict[str, torch.Tensor]], Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class Refusal:
    """A config.json value mdpo's model cannot follow: `key` present with a value `refused` holds for. The message
    names it as `key=value (reason)`."""

    key: str
    refused: Callable[[Any], bool]
    reason: str = ""

    def message(self, value: Any) -> str:
        shown = json.dumps(value) if isinstance(value, bool) else repr(value)
        return f"{self.key}={shown}" + (f" ({self.reason})" if self.reason else "")


@dataclass(frozen=True, eq=False)
class Family:
    """One HF model family: its mapping table, how its config.json translates to and from a ModelConfig, and what
    the rest of mdpo asks of it. The registry (`mdpo.models.families`) lists every family once."""

    name: str  # model.family
    architectures: tuple[str, ...]  # the config.json "architectures" it accepts; the first is what it writes
    model_type: str  # config.json "model_type"
    global_tensors: tuple[Entry, ...]
    layer_tensors: tuple[Entry, ...]  # names relative to the layer prefixes
    hf_layer_prefix: str  # e.g. "model.layers.{i}."
    read_fields: Callable[[dict], dict]  # config.json -> ModelConfig fields (after the refusals); ValueError names
    #                                      what it cannot read (and optionally what is supported)
    write_config: Callable[[ModelConfig], dict]  # ModelConfig -> the config.json keys this family defines
    # `mdpo convert --check`'s independent forward: the name of transformers' own class, or the family's StandIn
    oracle: str | StandIn
    default_template: str  # the data.template `auto` gives message rows whose tokenizer has no chat template
    refusals: tuple[Refusal, ...] = ()  # checked by read_config before read_fields, in order
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # `mdpo plan --model NAME`:
    #                                      ModelConfig fields of published models
    ignored_suffixes: tuple[str, ...] = ()  # HF buffers that are not weights (e.g. rotary inv_freq)
    moe_tensors: tuple[Entry, ...] = ()  # a layer with experts: its MLP rows, `{e}` = the expert's number
    # HF name prefixes of tensors mdpo does not train but keeps (a vision tower): read from the source folder and
    # written back unchanged into every export
    carried: tuple[str, ...] = ()
    # HF layers numbered from the model's num_hidden_layers on (DeepSeek-V3's multi-token prediction layers,
    # `num_nextn_predict_layers`): carried as `carried` is, where the folder has them
    carries_extra_layers: bool = False

    def is_carried(self, name: str, num_layers: int) -> bool:
        """Whether a HF tensor is one mdpo carries from the source to the export untrained (`carried`, or a layer
        past the model's `num_layers` with `carries_extra_layers`)."""
        if self.carried and name.startswith(self.carried):
            return True
        layer = re.match(re.escape(self.hf_layer_prefix).replace(r"\{i\}", r"(\d+)"), name)
        return self.carries_extra_layers and layer is not None and int(layer.group(1)) >= num_layers

    def carried_names(self) -> str:
        """What the family carries untrained, for messages."""
        extra = (
            [f"{self.hf_layer_prefix.format(i='N')}* for N >= num_hidden_layers"] if self.carries_extra_layers else []
        )
        return ", ".join([f"{prefix}*" for prefix in self.carried] + extra)

    @property
    def architecture(self) -> str:
        """The architecture written into config.json (and named in messages)."""
        return self.architectures[0]

    def read_config(self, hf: dict) -> dict:
        """config.json -> ModelConfig fields; ValueError (what, and optionally what is supported instead) names the
        first refused value or what `read_fields` cannot read."""
        for refusal in self.refusals:
            if refusal.key in hf and refusal.refused(hf[refusal.key]):
                raise ValueError(refusal.message(hf[refusal.key]))
        return self.read_fields(hf)

    def entries(
        self, num_layers: int, tied: bool = False, expert_layers: Collection[int] = (), num_experts: int = 0
    ) -> Iterator[Entry]:
        """Every row of the table for a model of `num_layers` layers, of which `expert_layers` have `num_experts`
        experts. With tied embeddings the output layer reads the embedding's HF tensor (the files hold no head;
        Megatron keeps a copy of the embedding on the last pipeline stage) and nothing is written back from it."""
        embedding = next(hf for mcore, hf, _ in self.global_tensors if mcore == EMBEDDING)
        for mcore, hf, kind in self.global_tensors:
            yield (mcore, embedding, kind) if tied and mcore == OUTPUT else (mcore, hf, kind)
        for i in range(num_layers):
            rows = self.layer_tensors
            if i in expert_layers:
                rows = [row for row in rows if not row[0].startswith("mlp.")] + _per_expert(
                    self.moe_tensors, num_experts
                )
            for mcore, hf, kind in rows:
                yield (
                    LAYER_PREFIX_MCORE.format(i=i) + mcore,
                    tuple(self.hf_layer_prefix.format(i=i) + name for name in hf),
                    kind,
                )

    def model_entries(self, model: ModelConfig, tied: bool | None = None) -> Iterator[Entry]:
        """`entries` of a model (its layers, experts and tied head; `tied` overrides the last), less the layer rows of
        tensors the model has not (a family's table lists the variants of its models: DeepSeek's query with or
        without its low-rank projection, with or without a shared expert)."""
        tied = model.tie_word_embeddings if tied is None else tied
        own = mcore_shapes(model, model.vocab_size)
        rows = self.entries(model.num_hidden_layers, tied, set(model.expert_layers()), model.num_experts or 0)
        return (row for row in rows if row[0] in own or not row[0].startswith("decoder.layers."))

    def hf_names(self, num_layers: int, tied: bool = False, expert_layers: Collection[int] = ()) -> set[str]:
        experts = 1 if expert_layers else 0
        return {name for _, names, _ in self.entries(num_layers, tied, expert_layers, experts) for name in names}


def preset(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int, **fields: Any) -> dict[str, Any]:
    """A planner preset's ModelConfig fields, from a published config.json: the counts in its order (`ffn` is one
    SwiGLU branch: Qwen 1.0's config.json lists twice this), then what else changes the counts or the layout rules;
    the rest (norm epsilon, RoPE base and scaling, context length) stay ModelConfig's defaults."""
    return dict(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        **fields,
    )


def _per_expert(rows: tuple[Entry, ...], num_experts: int) -> list[Entry]:
    """MoE rows with `{e}` written out for each expert (the router's row once)."""
    out = []
    for mcore, hf, kind in rows:
        experts = range(num_experts) if "{e}" in mcore else [None]
        out += [(mcore.format(e=e), tuple(name.format(e=e) for name in hf), kind) for e in experts]
    return out


@dataclass(frozen=True)
class Heads:
    """Attention head geometry needed to (un)fuse QKV."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: ModelConfig) -> Heads:
        return cls(model.num_attention_heads, model.kv_heads, model.kv_channels)

    @property
    def sizes(self) -> list[int]:
        """Rows of q, k and v."""
        kv = self.num_kv_heads * self.head_dim
        return [self.num_heads * self.head_dim, kv, kv]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: Heads) -> torch.Tensor:
    """[q; k; v] (HF, weights [rows, hidden] or biases [rows]) -> per query group [q_0..q_{g-1}, k, v] (Megatron)."""
    per_group, rest = heads.num_heads // heads.num_kv_heads, tuple(q.shape[1:])
    q = q.reshape(heads.num_kv_heads, per_group * heads.head_dim, *rest)
    k = k.reshape(heads.num_kv_heads, heads.head_dim, *rest)
    v = v.reshape(heads.num_kv_heads, heads.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, heads: Heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`."""
    per_group, rest = heads.num_heads // heads.num_kv_heads, tuple(qkv.shape[1:])
    grouped = qkv.reshape(heads.num_kv_heads, (per_group + 2) * heads.head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group * heads.head_dim, heads.head_dim, heads.head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def pad_vocab(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Zero rows for the padded vocabulary; their logits are masked out of the softmax anyway."""
    if weight.shape[0] > padded_rows:
        raise ValueError(f"vocab rows {weight.shape[0]} exceed the padded vocabulary {padded_rows}")
    pad = weight.new_zeros(padded_rows - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, pad], dim=0)


def normalize_rows(weight: torch.Tensor) -> torch.Tensor:
    """Unit L2 norm per row, computed in float32 and returned in the weight's dtype."""
    return F.normalize(weight.float(), dim=-1).to(weight.dtype)


STACKED = ("expert", "expert_gate_up")  # the transforms of HF tensors holding every expert
_EXPERT_NUMBER = re.compile(r"\.local_experts\.(\d+)\.")


def expert_number(mcore_name: str) -> int | None:
    """The (global) expert a Megatron tensor belongs to; None outside experts."""
    match = _EXPERT_NUMBER.search(mcore_name)
    return int(match.group(1)) if match else None


def to_mcore(
    kind: str, tensors: list[torch.Tensor], heads: Heads, padded_vocab: int, expert: int | None = None
) -> torch.Tensor:
    if kind in STACKED:  # this expert's [in, out] or [out] -> [out, in] or [out], in a storage of its own (a view
        # would hold every expert's, which a writer saves whole)
        own = tensors[0][expert].movedim(-1, 0)
        if kind == "expert_gate_up":
            return torch.cat([own[0::2], own[1::2]])
        return own.clone(memory_format=torch.contiguous_format)
    if kind == "copy":
        return tensors[0]
    if kind == "vocab":
        return pad_vocab(tensors[0], padded_vocab)
    if kind == "norm_vocab":
        return pad_vocab(normalize_rows(tensors[0]), padded_vocab)
    if kind == "qkv":
        return fuse_qkv(*tensors, heads)
    if kind == "packed_qkv":
        return fuse_qkv(*torch.split(tensors[0], heads.sizes, dim=0), heads)
    if kind == "gate_up":
        return torch.cat(tensors, dim=0)
    raise ValueError(f"unknown transform {kind!r}")


def to_hf(kind: str, tensor: torch.Tensor, heads: Heads, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """One Megatron tensor -> its HF tensors (of a `STACKED` kind: one expert's slice, stacked by the caller)."""
    if kind == "expert":
        return (tensor.movedim(0, -1),)
    if kind == "expert_gate_up":  # [gate; up] -> gate and up interleaved, [in, out]
        return (torch.stack(tensor.chunk(2), dim=1).flatten(0, 1).movedim(0, -1),)
    if kind == "copy":
        return (tensor,)
    if kind in ("vocab", "norm_vocab"):
        return (tensor[:vocab_size],)
    if kind == "qkv":
        return split_qkv(tensor, heads)
    if kind == "packed_qkv":
        return (torch.cat(split_qkv(tensor, heads), dim=0),)
    if kind == "gate_up":
        return tuple(torch.chunk(tensor, 2, dim=0))
    raise ValueError(f"unknown transform {kind!r}")


def mcore_shapes(model: ModelConfig, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Every full Megatron tensor of this architecture (local layer spec names) and its shape; a tied model's output
    layer is its embedding (no tensor of its own)."""
    heads = Heads.of(model)
    h, f = model.hidden_size, model.intermediate_size
    qkv_rows, attn = sum(heads.sizes), heads.num_heads * heads.head_dim
    norms = {
        "pre": ("input_layernorm", "pre_mlp_layernorm"),
        "post": ("post_self_attn_layernorm", "post_mlp_layernorm"),
    }
    norms["both"] = norms["pre"] + norms["post"]
    layer = {
        "self_attention.linear_qkv.weight": (qkv_rows, h),
        "self_attention.linear_proj.weight": (h, attn),
        "mlp.linear_fc1.weight": (2 * f, h),
        "mlp.linear_fc2.weight": (h, f),
        **{f"{norm}.weight": (h,) for norm in norms[model.norm_position]},
    }
    if model.is_mla:
        layer = {k: v for k, v in layer.items() if not k.startswith("self_attention.")} | latent_attention_shapes(model)
    if model.qkv_bias or model.linear_bias:  # Megatron's add_bias_linear biases q/k/v too
        layer["self_attention.linear_qkv.bias"] = (qkv_rows,)
    if model.linear_bias:
        layer |= {"self_attention.linear_proj.bias": (h,), "mlp.linear_fc1.bias": (2 * f,), "mlp.linear_fc2.bias": (h,)}
    if model.attention_sinks:
        layer["self_attention.core_attention.softmax_offset"] = (heads.num_heads,)
    if model.qk_norm:
        whole = model.qk_norm_span == "projection"
        layer["self_attention.q_layernorm.weight"] = (heads.sizes[0] if whole else heads.head_dim,)
        layer["self_attention.k_layernorm.weight"] = (heads.sizes[1] if whole else heads.head_dim,)
    shapes = {EMBEDDING: (padded_vocab, h), "decoder.final_layernorm.weight": (h,)}
    if not model.tie_word_embeddings:
        shapes[OUTPUT] = (padded_vocab, h)
    experts = set(model.expert_layers())
    for i in range(model.num_hidden_layers):
        own = layer
        if i in experts:
            own = {k: v for k, v in layer.items() if not k.startswith("mlp.")} | expert_shapes(model)
        shapes.update({LAYER_PREFIX_MCORE.format(i=i) + name: shape for name, shape in own.items()})
    return shapes


def latent_attention_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """A multi-latent attention layer's tensors (Megatron's MLASelfAttention): the query's down / up projections
    and the norm of its latent (or one projection without q_lora_rank), the key / value latent's down projection
    (the latent, then the heads' shared RoPE key), its norm and up projection (per head: key without RoPE, value), and
    the output projection."""
    h, heads, latent = model.hidden_size, model.num_attention_heads, model.kv_lora_rank
    q_head = model.qk_nope_head_dim + model.qk_rope_head_dim
    prefix = "self_attention."
    if model.q_lora_rank is None:
        query = {"linear_q_proj.weight": (heads * q_head, h)}
    else:
        rank = model.q_lora_rank
        query = {
            "linear_q_down_proj.weight": (rank, h),
            "q_layernorm.weight": (rank,),
            "linear_q_up_proj.weight": (heads * q_head, rank),
        }
    shapes = query | {
        "linear_kv_down_proj.weight": (latent + model.qk_rope_head_dim, h),
        "kv_layernorm.weight": (latent,),
        "linear_kv_up_proj.weight": (heads * (model.qk_nope_head_dim + model.v_head_dim), latent),
        "linear_proj.weight": (h, heads * model.v_head_dim),
    }
    return {prefix + name: shape for name, shape in shapes.items()}


EXPERT = "mlp.experts.local_experts.{e}."  # an expert's Megatron prefix in a layer (SequentialMLP's names)
SHARED_EXPERT = "mlp.shared_experts."  # the shared expert's Megatron prefix in a layer (SharedExpertMLP's names)


def expert_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """A MoE layer's MLP tensors (full, global expert numbers): the router (and its score bias), each expert's
    fc1 / fc2 and, with a shared expert, its fc1 / fc2 (split over TP as a dense MLP) and its sigmoid gate (whole on
    every TP rank)."""
    h, w = model.hidden_size, model.expert_width
    shapes = {"mlp.router.weight": (model.num_experts, h)}
    if model.linear_bias:
        shapes["mlp.router.bias"] = (model.num_experts,)
    if model.router_expert_bias:
        shapes["mlp.router.expert_bias"] = (model.num_experts,)
    for e in range(model.num_experts):
        prefix = EXPERT.format(e=e)
        shapes |= {prefix + "linear_fc1.weight": (2 * w, h), prefix + "linear_fc2.weight": (h, w)}
        if model.linear_bias:
            shapes |= {prefix + "linear_fc1.bias": (2 * w,), prefix + "linear_fc2.bias": (h,)}
    shared = model.shared_expert_intermediate_size
    if shared is not None:
        shapes |= {
            SHARED_EXPERT + "linear_fc1.weight": (2 * shared, h),
            SHARED_EXPERT + "linear_fc2.weight": (h, shared),
        }
        if model.shared_expert_gate:
            shapes[SHARED_EXPERT + "gate_weight"] = (1, h)
    return shapes


def hf_shapes(family: Family, model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape each HF tensor must have: the table run backwards on meta tensors."""
    meta = {name: torch.empty(shape, device="meta") for name, shape in mcore_shapes(model, model.vocab_size).items()}
    return {name: tuple(t.shape) for name, t in mcore_to_hf(family, meta, model).items()}


def shape_of(hf: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """A tensor's shape without reading it where the mapping can tell (lazy safetensors readers)."""
    shapes = getattr(hf, "shapes", None)
    return tuple(shapes[name]) if shapes is not None else tuple(hf[name].shape)


def check_hf_state(family: Family, hf: Mapping[str, torch.Tensor], model: ModelConfig) -> None:
    """Raise KeyError/ValueError naming the first missing, unexpected or misshapen tensor."""
    expected = hf_shapes(family, model)
    layers = model.num_hidden_layers
    present = {n for n in hf if not n.endswith(family.ignored_suffixes) and not family.is_carried(n, layers)}
    missing = sorted(set(expected) - present)
    if missing:
        raise KeyError(f"HF checkpoint is missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    extra = sorted(present - set(expected))
    if extra:
        raise KeyError(f"HF checkpoint has unexpected tensor '{extra[0]}' ({len(extra)} unexpected in all)")
    for name, shape in expected.items():
        if shape_of(hf, name) != shape:
            raise ValueError(f"tensor '{name}' has shape {shape_of(hf, name)}, the model config expects {shape}")


def iter_hf_to_mcore(
    family: Family,
    hf: Mapping[str, torch.Tensor],
    model: ModelConfig,
    padded_vocab: int,
    wanted: Callable[[str], bool] = lambda name: True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full Megatron tensors one at a time (only those `wanted`), reading each HF tensor when it is needed, so a
    caller that consumes them as they come holds one tensor, not the model. Call `check_hf_state` first."""
    heads = Heads.of(model)
    last: dict[str, torch.Tensor] = {}  # the last stacked tensor read: read once for all its experts

    def read(name: str, kind: str) -> torch.Tensor:
        if kind not in STACKED:
            return hf[name]
        if name not in last:
            last.clear()
            last[name] = hf[name]
        return last[name]

    for mcore, hf_names, kind in family.model_entries(model):
        if wanted(mcore):
            tensors = [read(n, kind) for n in hf_names]
            yield mcore, to_mcore(kind, tensors, heads, padded_vocab, expert_number(mcore))


def mcore_to_hf(family: Family, mcore: Mapping[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Full Megatron state dict -> HF state dict of this family, vocab padding stripped (a tied model's head, which
    Megatron copies to the last pipeline stage, is its embedding: not written twice)."""
    heads = Heads.of(model)
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, list[torch.Tensor]] = {}  # HF tensors of every expert, in expert order
    for name, hf_names, kind in family.model_entries(model, tied=False):
        if name == OUTPUT and model.tie_word_embeddings:
            continue
        parts = to_hf(kind, mcore[name], heads, model.vocab_size)
        if kind in STACKED:
            stacks.setdefault(hf_names[0], []).append(parts[0])
            continue
        out.update({hf_name: part.contiguous() for hf_name, part in zip(hf_names, parts)})
    return out | {hf_name: torch.stack(parts) for hf_name, parts in stacks.items()}


PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for a causal LM's modules in adapter_model.safetensors


def adapters_to_peft(
    family: Family, adapters: Mapping[str, torch.Tensor], model: ModelConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Full LoRA tensors (Megatron names: `<layer>.lora_A` [r, in], `<layer>.lora_B` [out, r]) -> PEFT's adapter
    tensors on this family's HF modules, and its `target_modules`. The table's own transform runs on B's rows (a
    fused q/k/v or gate/up B splits as the fused weight does) and every HF module of a fused layer gets the same A,
    so each module's B A is exactly its rows of the fused layer's B A. `target_modules` are the adapted modules'
    names within a layer, over every layer."""
    heads = Heads.of(model)
    out: dict[str, torch.Tensor] = {}
    for mcore, hf_names, kind in family.model_entries(model, tied=False):
        layer = mcore.removesuffix(".weight")
        if not mcore.endswith(".weight") or f"{layer}.lora_B" not in adapters:
            continue
        a = adapters[f"{layer}.lora_A"]
        for hf_name, b in zip(hf_names, to_hf(kind, adapters[f"{layer}.lora_B"], heads, model.vocab_size)):
            module = PEFT_PREFIX + hf_name.removesuffix(".weight")
            out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = a.clone(), b.contiguous()
    layer_prefix = re.compile("^" + PEFT_PREFIX + re.escape(family.hf_layer_prefix).replace(r"\{i\}", r"\d+"))
    targets = sorted({layer_prefix.sub("", key.removesuffix(".lora_A.weight")) for key in out if "lora_A" in key})
    return out, targets
