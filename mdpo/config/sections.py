"""The run's configuration: one dataclass per component (torchtitan / Megatron-Core style), each checking itself.

A section checks its own values when built (`__post_init__`) and again in `validate`, for sections edited in place.
Rules that join sections (the layout against the model, packing against context parallelism, a precomputed
reference against the weights it is stamped with) are `TrainConfig.check`'s, and the layout rules themselves are
`Layout`'s. The choices each key takes are listed here once. Every failure is a one-line `ConfigError` naming the
dotted key and the value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mdpo.config.layout import Layout
from mdpo.errors import ConfigError

# RoPE scalings mdpo runs exactly (transformers' rope_type names; its own initialisation computes them): each one's
# config.json parameters (rope_parameters / rope_scaling keys) -> ModelConfig fields, the required ones first
ROPE_PARAMETERS = {
    "llama3": {
        "factor": "rope_scaling_factor",
        "low_freq_factor": "rope_low_freq_factor",
        "high_freq_factor": "rope_high_freq_factor",
        "original_max_position_embeddings": "rope_original_max_position_embeddings",
    },
    "linear": {"factor": "rope_scaling_factor"},
    "yarn": {
        "factor": "rope_scaling_factor",
        "original_max_position_embeddings": "rope_original_max_position_embeddings",
        "beta_fast": "rope_beta_fast",
        "beta_slow": "rope_beta_slow",
        "mscale": "rope_mscale",
        "mscale_all_dim": "rope_mscale_all_dim",
        "attention_factor": "rope_attention_factor",
        "truncate": "rope_truncate",
    },
}
ROPE_REQUIRED = {"llama3": 4, "linear": 1, "yarn": 2}  # how many of each scaling's parameters config.json must give
ROPE_SCALINGS = tuple(ROPE_PARAMETERS)
POSITION_EMBEDDINGS = ("auto", "rope", "alibi")
ATTENTIONS = ("auto", "te", "sdpa", "local")
NORM_POSITIONS = ("pre", "post", "both")
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh", "quick_gelu")
QK_NORM_SPANS = ("head", "projection")
ROUTER_SCORES = ("softmax", "sigmoid")
DATA_FORMATS = (
    "auto",
    "ultrafeedback",
    "hh",
    "plain",
    "conversational",
    "ultrafeedback_raw",
    "nectar",
    "ranked",
    "multi_turn",
)
# How a row of ranked completions becomes pairs (`mdpo.data.ranking`)
RANK_PAIRS = ("all_pairs", "best_vs_worst", "best_vs_rest", "best_vs_random", "ranking")
# apply_chat_template's own arguments, which data.chat_template_kwargs may not set
CHAT_TEMPLATE_ARGUMENTS = ("conversation", "tools", "chat_template", "add_generation_prompt", "tokenize", "return_dict")
TEMPLATES = ("auto", "tulu2", "tulu3", "tokenizer", "raw")  # or a Jinja chat template (`mdpo.data.templates`)
ON_BAD_ROW = ("error", "skip")
PROMPT_TRUNCATIONS = ("keep_end", "keep_start")
OVER_LENGTH = ("truncate", "drop")
RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("auto", "bf16", "fp32")
NONFINITE = ("stop", "skip")
REFERENCE_MODES = ("online", "precomputed", "none")
# A mixture of experts' load-balancing loss: auto (transformers' where exact, else megatron), transformers' pooled
# formula (as TRL adds it), Megatron-Core's per-layer aux_loss, DeepSeek-V3's sequence-wise seq_aux_loss
ROUTER_AUX_LOSS_TYPES = ("auto", "transformers", "megatron", "seq")
# The DPO family, with TRL's names (TRL 0.28's, and 1.16's sft), and the DPO paper's Plackett-Luce objective over a
# whole ranking; mdpo.loss implements each.
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "apo_zero",
    "apo_down",
    "discopop",
    "aot_unpaired",
    "sigmoid_norm",
    "sft",
    "plackett_luce",
)
# f-DPO's divergences between policy and reference (TRL 1.16's f_divergence_type); reverse_kl is plain DPO.
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The loss types another divergence applies to (TRL 1.16's list): those built on the chosen-rejected score
# difference, where f-DPO's beta * log Z(x) cancels, and sft, which uses no log-ratio.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# The linear layers LoRA adapts, in Megatron's terms: the fused q/k/v, the attention output, the fused gate/up and the
# MLP output (`mdpo.models.lora` maps them to each family's HF modules)
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


def need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: object, choices: tuple[str, ...]) -> None:
    two = len(choices) == 2  # two choices read as 'a' or 'b'; longer lists unquoted
    listed = f"'{choices[0]}' or '{choices[1]}'" if two else f"{', '.join(choices[:-1])} or {choices[-1]}"
    need(value in choices, f"{key} must be {listed}, got {value!r}")


def _positive(section: str, obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            need(value > 0, f"{section}.{name} must be > 0, got {value!r}")


class Section:
    """Checks a section's own values: every float finite, then the section's rules (`_rules`)."""

    name: ClassVar[str]

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float):
                need(math.isfinite(value), f"{self.name}.{f.name} must be finite, got {value!r}")
        self._rules()

    def _rules(self) -> None:
        raise NotImplementedError


@dataclass
class ModelConfig(Section):
    """A HF-config-shaped model description: a Llama-like decoder (RMSNorm, SwiGLU, RoPE or ALiBi, GQA), with the
    variations today's families add (q/k/v bias, per-head q/k norms, an explicit head size, tied embeddings, Llama
    3's RoPE scaling)."""

    name: ClassVar[str] = "model"
    hf_config: str | None = None  # HF config.json or model folder; its values fill the fields below
    # Weights to start from: a HF model folder, a `mdpo convert` output or a training checkpoint (step_N folder);
    # None = random init
    init_from: str | None = None
    # the HF format weights are read and exported in: a family of the registry (mdpo.models.families), which the
    # config, a leaf, does not know; checkpoint.description.describe_model checks it
    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008  # the MLP width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = num_attention_heads (MHA)
    head_dim: int | None = None  # size of one attention head (Megatron's kv_channels); None = hidden / heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # bias on the q/k/v projection (Qwen 1.0, Qwen 2 / 2.5)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen 3; Megatron's qk_layernorm)
    # what a q / k norm spans: head (each head: Qwen 3) or projection (the whole query and key projection, every head
    # together: OLMo 2 / 3)
    qk_norm_span: str = "head"
    # where each layer's norms sit: pre (before attention and the MLP: Llama and the others), post (after each, on its
    # output before the residual add: OLMo 2 / 3) or both (four norms: Gemma 3)
    norm_position: str = "pre"
    zero_centered_norms: bool = False  # every RMSNorm scales by 1 + w, its weight w stored centred on 0 (Gemma)
    # the gated MLP's activation: silu (SwiGLU), gelu_pytorch_tanh (GeGLU: Gemma) or quick_gelu (x sigmoid(1.702 x):
    # gpt-oss's, with glu_clamp and glu_linear_offset)
    hidden_act: str = "silu"
    # gpt-oss's clamped GLU: the gate's input clamped to at most glu_clamp, the linear half's to [-glu_clamp,
    # glu_clamp] (None: no clamp), and glu_linear_offset added to the linear half (Megatron's
    # activation_func_clamp_value and glu_linear_offset)
    glu_clamp: float | None = None
    glu_linear_offset: float = 0.0
    # a bias on the attention output projection, the MLP / expert linears and the router (gpt-oss: Megatron's
    # add_bias_linear)
    linear_bias: bool = False
    # a learnt sink logit per head: each query's softmax runs over its scores and the sink, the sink's share dropped
    # (gpt-oss: Megatron's softmax_type learnable)
    attention_sinks: bool = False
    # the softmax scale is 1 / sqrt(query_pre_attn_scalar) (Gemma 3); None: 1 / sqrt(head size)
    query_pre_attn_scalar: float | None = None
    scale_embeddings: bool = False  # the input embeddings times sqrt(hidden size), in the weights' dtype (Gemma)
    tie_word_embeddings: bool = False  # the output layer uses the input embedding's weight (small Llama 3.2 / Qwen)
    # RoPE frequency scaling, with transformers' rope_type names: None, llama3 (Llama 3.1 / 3.2 / 3.3), linear or yarn
    # (Qwen 2.5 / 3's long context), its parameters (ROPE_PARAMETERS) exactly as config.json gives them; None: left
    # out (transformers' default)
    rope_scaling: str | None = None
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    rope_beta_fast: float | None = None
    rope_beta_slow: float | None = None
    rope_mscale: float | None = None
    rope_mscale_all_dim: float | None = None
    rope_attention_factor: float | None = None
    rope_truncate: bool | None = None
    # the share of each head's dims RoPE rotates: its first kv_channels x this (rotate_half within them), the rest
    # pass unrotated (GLM-4.5's partial_rotary_factor 0.5; Megatron's rotary_percent)
    partial_rotary_factor: float = 1.0
    # sliding-window attention (Mistral's sliding_window, Qwen's use_sliding_window): a query attends to the keys
    # less than sliding_window positions back (None: the whole causal context), on the layers sliding_window_layers
    # lists (None: every layer)
    sliding_window: int | None = None
    sliding_window_layers: list[int] | None = None
    # the window layers' own RoPE, unscaled, of this base (Gemma 3's local base; OLMo 3's window layers beside yarn
    # on its full ones); None: the model's RoPE on every layer
    window_rope_theta: float | None = None
    position_embedding: str = "auto"  # auto (from config.json, else rope) | rope | alibi (Baichuan 2 13B)
    norm_head: bool = False  # output weight rows L2-normalised in every forward (Baichuan 2's NormHead)
    init_std: float = 0.02  # std of the normal init when init_from is None
    attention: str = "auto"  # auto (TE if present, else SDPA) | te | sdpa | local (Megatron's unfused attention)
    # Megatron's fused SwiGLU (bias_activation_fusion: one torch.compile kernel that keeps only the gate/up output
    # for backward, 3 instead of 5 intermediate-sized activations per token); off until measured on a GPU
    fused_swiglu: bool = False
    # RoPE in one kernel forward and one backward: Megatron's rotation under torch.compile on the local layers
    # (`models.rotary`), Transformer Engine's fused RoPE on TE's (Megatron's apply_rope_fusion); off until measured
    fused_rope: bool = False
    # Mixture of experts (Qwen3-MoE, Qwen2-MoE, Mixtral): Megatron-Core's router, token dispatcher and experts in the
    # layers `moe_layers` lists (None: every layer; the others keep a dense MLP of intermediate_size)
    num_experts: int | None = None  # None = a dense model
    moe_topk: int = 2  # experts per token (num_experts_per_tok)
    moe_intermediate_size: int | None = None  # one expert's MLP width; None = intermediate_size (Mixtral)
    moe_layers: list[int] | None = None  # the layers with experts (Qwen3-MoE's mlp_only_layers are left out)
    # a shared expert beside the routed ones in every MoE layer (Qwen2-MoE's): a SwiGLU MLP of this width that every
    # token runs, its output scaled by a sigmoid gate of the token ([1, hidden]); None: none
    shared_expert_intermediate_size: int | None = None
    # true: the top-k softmax weights renormalised to sum 1 (a softmax over the k top logits: Mixtral, Qwen3-MoE's
    # norm_topk_prob); false: the softmax over all experts, unrenormalised
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0  # the load-balancing loss weight config.json declares (dpo.* overrides it)
    shared_expert_gate: bool = True  # the shared expert's output scaled by its sigmoid gate (Qwen2-MoE); false: not
    # DeepSeek-V3's routing: sigmoid scores of the router logits (softmax: the others'), a bias added to the scores
    # only to choose the experts (its `e_score_correction_bias`, see below), the chosen weights
    # (renormalised) times routed_scaling_factor, and the top k taken within the router_group_topk best of
    # router_groups equal groups of experts (a group scored by its two best experts; DeepSeek-V2's softmax router:
    # by its best)
    router_score: str = "softmax"
    router_expert_bias: bool = False
    # > 0: that bias moves after every optimizer step as DeepSeek-V3's auxiliary-loss-free balancing moves it, by
    # this much towards the mean load (Megatron-Core's moe_router_bias_update_rate; DeepSeek-V3 pre-trained at 0.001);
    # 0: used as loaded, frozen
    router_bias_update_rate: float = 0.0
    routed_scaling_factor: float = 1.0
    router_groups: int | None = None
    router_group_topk: int | None = None
    # multi-latent attention (DeepSeek-V2 / V3) when kv_lora_rank is set: keys and values from one shared latent of
    # kv_lora_rank (normalised), queries from one of q_lora_rank (None: a plain projection); each head's query and key
    # are qk_nope_head_dim without RoPE then qk_rope_head_dim with it (the key's RoPE part shared by the heads), its
    # value v_head_dim
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # tokens whose logits exist at once when the output layer scores them (forward and backward): the full
    # [tokens, vocab] logits never do
    logprob_chunk_tokens: int = 1024

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    @property
    def expert_width(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def aux_loss_coef(self, override: float | None = None) -> float:
        """The load-balancing loss weight in force: `override` (dpo.router_aux_loss_coef), else config.json's; 0
        for a dense model."""
        if not self.is_moe:
            return 0.0
        return self.router_aux_loss_coef if override is None else override

    def rope_parameters(self) -> dict:
        """The RoPE scaling's config.json parameters as set (transformers' rope_parameters, less rope_type and
        rope_theta); none without a scaling."""
        keys = ROPE_PARAMETERS.get(self.rope_scaling, {})
        return {key: getattr(self, field) for key, field in keys.items() if getattr(self, field) is not None}

    def window_layers(self) -> list[int]:
        """The layers with a sliding window (none without one)."""
        if self.sliding_window is None:
            return []
        every = range(self.num_hidden_layers)
        return list(every) if self.sliding_window_layers is None else sorted(self.sliding_window_layers)

    def expert_layers(self) -> list[int]:
        """The layers with experts (none for a dense model)."""
        if not self.is_moe:
            return []
        return list(range(self.num_hidden_layers)) if self.moe_layers is None else sorted(self.moe_layers)

    @property
    def is_mla(self) -> bool:
        """Multi-latent attention (DeepSeek-V2 / V3)."""
        return self.kv_lora_rank is not None

    @property
    def kv_heads(self) -> int:
        """Key / value heads; MLA's are the query heads (its keys and values are per head)."""
        return self.num_attention_heads if self.is_mla else self.num_key_value_heads or self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """The dims of a head RoPE rotates, as transformers and Megatron-Core round them."""
        return int(self.kv_channels * self.partial_rotary_factor)

    @property
    def kv_channels(self) -> int:
        """The size of one attention head (MLA's: its value's, which sizes the attention's output)."""
        if self.is_mla:
            return self.v_head_dim
        return self.head_dim or self.hidden_size // self.num_attention_heads

    # the numeric fields that must be > 0 when set
    POSITIVE: ClassVar[tuple[str, ...]] = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
        "init_std",
        "logprob_chunk_tokens",
        "rope_scaling_factor",
        "rope_original_max_position_embeddings",
        "sliding_window",
        "window_rope_theta",
        "query_pre_attn_scalar",
        "num_experts",
        "moe_topk",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "glu_clamp",
        "routed_scaling_factor",
        "partial_rotary_factor",
        "router_groups",
        "router_group_topk",
        "kv_lora_rank",
        "q_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
    )

    def _rules(self) -> None:
        _positive("model", self, self.POSITIVE)
        if self.rope_scaling is not None:
            self._check_rope_scaling()
        need(
            not (self.tie_word_embeddings and self.norm_head),
            "model.tie_word_embeddings=true with model.norm_head=true: a NormHead normalises the output weight's rows, "
            "which tied embeddings share with the input",
        )
        self._check_positions()
        self._check_windows()
        self._check_norms()
        if self.is_moe:
            self._check_experts()
        rate = self.router_bias_update_rate
        need(rate >= 0, f"model.router_bias_update_rate must be >= 0, got {rate!r}")
        need(
            rate == 0 or self.router_expert_bias,
            f"model.router_bias_update_rate={rate!r} needs a router with a correction bias (model.router_expert_bias: "
            "DeepSeek-V3's e_score_correction_bias); this model's router has none",
        )
        if self.is_mla:
            self._check_latent_attention()
        need(
            self.is_moe or self.shared_expert_intermediate_size is None,
            "model.shared_expert_intermediate_size is set but model.num_experts is null (a shared expert sits beside "
            "routed experts)",
        )
        heads, kv_heads = self.num_attention_heads, self.kv_heads
        need(
            heads % kv_heads == 0,
            f"model.num_key_value_heads={kv_heads} does not divide model.num_attention_heads={heads}",
        )
        need(
            self.head_dim is not None or self.hidden_size % heads == 0,
            f"model.num_attention_heads={heads} does not divide model.hidden_size={self.hidden_size} "
            "(set model.head_dim)",
        )

    def _check_positions(self) -> None:
        """ALiBi (Baichuan 2 13B) runs through mdpo's SDPA only, and has no RoPE to fuse."""
        _one_of("model.position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
        _one_of("model.attention", self.attention, ATTENTIONS)
        need(
            self.position_embedding != "alibi" or self.attention in ("auto", "sdpa"),
            "model.position_embedding=alibi needs model.attention=auto or sdpa (ALiBi biases are added to the scores "
            "of torch SDPA; Megatron's local and Transformer Engine attention here take no ALiBi), got "
            f"{self.attention!r}",
        )
        need(
            not (self.fused_rope and self.position_embedding == "alibi"),
            "model.fused_rope=true needs RoPE; model.position_embedding is alibi (Baichuan 2 13B), which has none",
        )
        rotary = self.partial_rotary_factor
        need(
            rotary == 1.0 or (rotary < 1.0 and self.rotary_dim >= 2 and self.rotary_dim % 2 == 0),
            f"model.partial_rotary_factor={rotary!r} must be at most 1 and rotate an even number of each head's "
            f"{self.kv_channels} dims, got {self.rotary_dim}",
        )
        need(
            rotary == 1.0 or (self.position_embedding != "alibi" and not self.is_mla),
            f"model.partial_rotary_factor={rotary!r} with ALiBi or model.kv_lora_rank (MLA rotates its "
            "qk_rope_head_dim)",
        )
        need(
            rotary == 1.0 or self.rope_scaling != "yarn",
            f"model.partial_rotary_factor={rotary!r} with model.rope_scaling=yarn: yarn's attention factor scales the "
            "rotated dims only, and mdpo applies it as a softmax scale of the whole head",
        )

    def _check_norms(self) -> None:
        """OLMo's norms (after the sublayers, q / k over the whole projection) are mdpo's local layers' own:
        Transformer Engine's layers fuse a norm into the linear after it and normalise q / k per head."""
        _one_of("model.norm_position", self.norm_position, NORM_POSITIONS)
        _one_of("model.qk_norm_span", self.qk_norm_span, QK_NORM_SPANS)
        need(
            self.qk_norm or self.qk_norm_span == "head",
            f"model.qk_norm_span={self.qk_norm_span} needs model.qk_norm=true",
        )
        need(
            not (self.zero_centered_norms and self.qk_norm_span == "projection"),
            "model.zero_centered_norms=true with model.qk_norm_span=projection: no family has both",
        )
        _one_of("model.hidden_act", self.hidden_act, HIDDEN_ACTS)
        need(
            self.hidden_act == "quick_gelu" or (self.glu_clamp is None and self.glu_linear_offset == 0.0),
            f"model.glu_clamp and model.glu_linear_offset need model.hidden_act=quick_gelu (gpt-oss's GLU), got "
            f"{self.hidden_act!r}",
        )
        need(
            self.hidden_act == "silu" or not self.fused_swiglu,
            f"model.fused_swiglu=true needs model.hidden_act=silu (Megatron's fused SwiGLU), got {self.hidden_act!r}",
        )
        need(
            self.fits_te_layers or self.attention != "te",
            f"model.attention=te with model.norm_position={self.norm_position}, model.qk_norm_span={self.qk_norm_span} "
            f"and model.zero_centered_norms={str(self.zero_centered_norms).lower()}: Transformer Engine's layers fuse "
            "a plain norm into the linear after it and normalise q / k per head (use auto or sdpa: torch SDPA on "
            "mdpo's local layers)",
        )
        need(
            not (self.gpt_oss_parts and self.attention == "te"),
            "model.attention=te with model.attention_sinks, model.linear_bias or model.glu_clamp (gpt-oss): mdpo runs "
            "them on its local layers only, unchecked on Transformer Engine's (use auto, sdpa or local)",
        )

    @property
    def fits_te_layers(self) -> bool:
        """Whether Transformer Engine's layers express the model: norms before the sublayers, plain (weights as
        they are), q / k norms per head."""
        return self.norm_position == "pre" and self.qk_norm_span == "head" and not self.zero_centered_norms

    @property
    def gpt_oss_parts(self) -> bool:
        """Whether the model has gpt-oss's sinks, biased linears or clamped GLU, which mdpo runs on its local layers
        only: it wires neither Transformer Engine's softmax_type nor its biased grouped experts, and has no GPU check
        of them."""
        return self.attention_sinks or self.linear_bias or self.glu_clamp is not None

    def _check_experts(self) -> None:
        need(
            self.moe_topk <= self.num_experts,
            f"model.moe_topk={self.moe_topk} exceeds model.num_experts={self.num_experts}",
        )
        self._check_layers("moe_layers")
        self._check_routing()
        need(
            self.router_aux_loss_coef >= 0,
            f"model.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef!r}",
        )

    def _check_routing(self) -> None:
        """Groups of experts: equal groups, at least two experts each, and as Megatron-Core scores a group (by its
        top k / group_topk experts) equal to transformers' only where that is its count (DeepSeek-V3's sigmoid
        router: the two best; V2's softmax one: the best) or every group is chosen."""
        _one_of("model.router_score", self.router_score, ROUTER_SCORES)
        need(
            not self.router_expert_bias or self.router_score == "sigmoid",
            "model.router_expert_bias=true needs model.router_score=sigmoid (DeepSeek-V3's routing)",
        )
        need(
            self.router_score == "softmax" or self.norm_topk_prob,
            "model.router_score=sigmoid with model.norm_topk_prob=false: Megatron-Core always renormalises the "
            "top-k sigmoid scores",
        )
        if self.router_groups is None:
            need(self.router_group_topk is None, "model.router_group_topk is set but model.router_groups is null")
            return
        groups, chosen = self.router_groups, self.router_group_topk or self.router_groups
        need(
            self.num_experts % groups == 0 and self.num_experts // groups >= 2,
            f"model.router_groups={groups} must divide model.num_experts={self.num_experts} into groups of 2 or more",
        )
        need(chosen <= groups, f"model.router_group_topk={chosen} exceeds model.router_groups={groups}")
        scored_by = 2 if self.router_score == "sigmoid" else 1
        need(
            chosen == groups or self.moe_topk // chosen == scored_by,
            f"model.router_group_topk={chosen} with model.moe_topk={self.moe_topk}: Megatron-Core scores a group by "
            f"its top moe_topk / router_group_topk experts, transformers' {self.router_score} router by its top "
            f"{scored_by}",
        )

    def _check_latent_attention(self) -> None:
        """MLA is Megatron-Core's MLASelfAttention on mdpo's local layers: RoPE (plain or yarn) on pre-norm layers,
        neither windows nor per-head q / k norms."""
        need(
            self.position_embedding != "alibi" and self.rope_scaling in (None, "yarn"),
            "model.kv_lora_rank (multi-latent attention) needs RoPE, unscaled or yarn, got "
            f"position_embedding={self.position_embedding!r}, rope_scaling={self.rope_scaling!r}",
        )
        need(
            self.rope_attention_factor is None and self.rope_truncate in (None, True),
            "model.rope_attention_factor / model.rope_truncate=false with model.kv_lora_rank: Megatron-Core's MLA "
            "yarn takes its attention factor from rope_mscale / rope_mscale_all_dim and truncates",
        )
        both = bool(self.rope_mscale and self.rope_mscale_all_dim)
        need(
            both or (not self.rope_mscale_all_dim and self.rope_mscale in (None, 1.0)),
            f"model.rope_mscale={self.rope_mscale!r} with model.rope_mscale_all_dim={self.rope_mscale_all_dim!r} and "
            "model.kv_lora_rank: Megatron-Core's MLA yarn follows transformers' only with both set, or with "
            "mscale_all_dim unset and mscale 1",
        )
        need(
            self.sliding_window is None and not self.qk_norm and self.norm_position == "pre",
            "model.kv_lora_rank (multi-latent attention) with a sliding window, q/k norms or norms after the sublayers",
        )
        need(
            self.attention in ("auto", "sdpa", "local"),
            f"model.attention={self.attention} with model.kv_lora_rank: mdpo builds MLA on its local layers",
        )
        need(
            not self.fused_rope,
            "model.fused_rope=true with model.kv_lora_rank: Megatron-Core's MLA rotates q and k itself",
        )

    def _check_layers(self, key: str) -> None:
        """A list of layer numbers (model.moe_layers, model.sliding_window_layers) names layers of the model."""
        layers = getattr(self, key) or []
        wrong = [i for i in layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
        need(not wrong, f"model.{key} lists layer {wrong[0] if wrong else 0!r}, not in 0..{self.num_hidden_layers - 1}")

    def _check_windows(self) -> None:
        self._check_layers("sliding_window_layers")
        need(
            self.sliding_window_layers is None or self.sliding_window is not None,
            "model.sliding_window_layers is set but model.sliding_window is null (the window's size)",
        )
        need(
            self.window_rope_theta is None or self.sliding_window is not None,
            "model.window_rope_theta is set but model.sliding_window is null (no layer has a window)",
        )

    def _check_rope_scaling(self) -> None:
        need(
            self.rope_scaling in ROPE_SCALINGS,
            f"model.rope_scaling must be null or {', '.join(ROPE_SCALINGS)}, got {self.rope_scaling!r}",
        )
        need(
            self.rope_scaling != "llama3" or 0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
            "model.rope_low_freq_factor and model.rope_high_freq_factor must satisfy 0 < low < high, got "
            f"{self.rope_low_freq_factor!r} and {self.rope_high_freq_factor!r}",
        )
        need(
            self.position_embedding != "alibi",
            "model.rope_scaling needs RoPE; model.position_embedding is alibi, which has none",
        )


@dataclass
class DataConfig(Section):
    name: ClassVar[str] = "data"
    train_file: str = ""  # required: a data file or folder (see format below)
    eval_file: str | None = None
    tokenizer: str = ""  # required: a HF tokenizer folder
    max_length: int = 8192  # tokens per prompt+response sequence
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    on_bad_row: str = "error"  # error | skip (skips are counted and reported)
    # .jsonl/.json(.gz), .parquet, .arrow, a datasets.save_to_disk folder or a folder of such shards
    # auto | ultrafeedback | hh | plain | conversational | ultrafeedback_raw | nectar | ranked | multi_turn (auto: from
    # the first row's columns and types)
    format: str = "auto"
    template: str = "auto"  # auto | tulu2 | tulu3 | tokenizer | raw | a Jinja template (auto: raw for text rows,
    #                         the tokenizer's chat template for message rows, tulu2 if it has none)
    max_prompt_length: int | None = None  # None = only max_length limits the prompt
    prompt_truncation: str = "keep_end"  # keep_end | keep_start: which part of a prompt over max_prompt_length stays
    over_length: str = "truncate"  # truncate | drop: pairs over max_prompt_length / max_length (always counted)
    num_proc: int = 1  # processes for tokenizing (datasets.map)
    cache: bool = True  # reuse the tokenized set from an earlier run when files, tokenizer and settings match
    cache_dir: str | None = None  # None = $MDPO_CACHE_DIR, else $XDG_CACHE_HOME/mdpo/data or ~/.cache/mdpo/data
    packing: bool = False  # pack whole pairs into micro-batches of pack_tokens tokens instead of padding rows
    pack_tokens: int | None = None  # token budget of a pack; None = 2 x max_length (the longest possible pair)
    # each pair as one sequence [prompt | chosen | rejected] (the prompt computed once); None: wherever it is exact
    # (not with context parallelism or Transformer Engine's attention)
    share_prompt: bool | None = None
    # ranked rows (ultrafeedback_raw, nectar, ranked): which pairs a row's completions make, all_pairs |
    # best_vs_worst | best_vs_rest | best_vs_random; pairs whose score gap is below min_score_gap are dropped
    rank_pairs: str = "all_pairs"
    min_score_gap: float = 0.0
    score_key: str = "overall_score"  # ultrafeedback_raw: each completion's score (overall_score, fine-grained_score)
    seed: int | None = None  # best_vs_random's draws (per row, from its content); None = schedule.seed
    # handed to the chat template (apply_chat_template's keyword arguments), e.g. {enable_thinking: false} for Qwen 3
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # false: an empty "<think></think>" both responses open with (Qwen 3's template) joins the prompt, untrained
    train_empty_think: bool = True

    def rank_seed(self, training_seed: int) -> int:
        """best_vs_random's seed: data.seed, else the training seed."""
        return self.seed if self.seed is not None else training_seed

    @property
    def pack_budget(self) -> int:
        return self.pack_tokens or 2 * self.max_length

    def check_required(self) -> None:
        """The inputs a run cannot start without (the defaults leave them empty)."""
        for key in ("train_file", "tokenizer"):
            need(bool(getattr(self, key)), f"data.{key} is required (set it in the config file or pass data.{key}=...)")

    def _rules(self) -> None:
        _positive("data", self, ("max_length",))
        _one_of("data.on_bad_row", self.on_bad_row, ON_BAD_ROW)
        need(self.format in DATA_FORMATS, f"data.format must be one of {', '.join(DATA_FORMATS)}, got {self.format!r}")
        need(
            self.template in TEMPLATES or "{{" in self.template or "{%" in self.template,
            f"data.template must be {', '.join(TEMPLATES)} or a Jinja chat template, got {self.template!r}",
        )
        _one_of("data.prompt_truncation", self.prompt_truncation, PROMPT_TRUNCATIONS)
        _one_of("data.over_length", self.over_length, OVER_LENGTH)
        need(self.num_proc >= 1, f"data.num_proc must be >= 1, got {self.num_proc!r}")
        if self.max_prompt_length is not None:
            need(
                0 < self.max_prompt_length < self.max_length,
                f"data.max_prompt_length must be in (0, data.max_length={self.max_length}), "
                f"got {self.max_prompt_length!r}",
            )
        _one_of("data.rank_pairs", self.rank_pairs, RANK_PAIRS)
        need(self.min_score_gap >= 0, f"data.min_score_gap must be >= 0, got {self.min_score_gap!r}")
        need(
            self.rank_pairs != "ranking" or self.min_score_gap == 0,
            f"data.min_score_gap={self.min_score_gap:g} drops pairs, and data.rank_pairs=ranking keeps a ranking whole "
            "or not at all: set data.min_score_gap=0",
        )
        need(self.seed is None or 0 <= self.seed < 2**32, f"data.seed must be in [0, 2**32), got {self.seed!r}")
        reserved = sorted(set(self.chat_template_kwargs) & set(CHAT_TEMPLATE_ARGUMENTS))
        need(
            not reserved,
            f"data.chat_template_kwargs may not set {', '.join(reserved)}: mdpo passes apply_chat_template's own "
            "arguments itself",
        )
        if self.pack_tokens is not None:
            need(
                self.pack_tokens >= 2 * self.max_length,
                f"data.pack_tokens={self.pack_tokens} must be >= 2 x data.max_length={2 * self.max_length} "
                "(a pair is two sequences of up to max_length tokens)",
            )


@dataclass
class ParallelConfig(Section):
    name: ClassVar[str] = "parallel"
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size
    vpp: int = 1  # model chunks per pipeline stage (Megatron's interleaved 1F1B; needs pp > 1): a smaller bubble
    cp: int = 1  # context-parallel size: each sequence split over cp ranks (long pairs; TE or SDPA attention)
    ep: int = 1  # expert-parallel size (MoE models): each MoE layer's experts split over ep ranks
    etp: int | None = None  # expert-tensor-parallel size: each expert split over etp ranks; None = tp (Megatron's)
    distributed_optimizer: bool = False  # shard optimizer state over data-parallel ranks
    # split norm/residual activations over the TP ranks too (needs tp > 1); None: on for a mixture of experts at
    # tp > 1 (Megatron-Core's MoE layers train under TP only with it), else off
    sequence_parallel: bool | None = None
    recompute: str = "none"  # none | selective (core attention) | full (each layer's activations)
    overlap_grad_reduce: bool = False  # overlap the data-parallel gradient reduction with the backward pass
    overlap_param_gather: bool = False  # distributed optimizer: gather updated weights during the next forward
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 (weights/activations, fp32 master) | fp32

    def layout(self, world: int | None = None, moe: bool = False) -> Layout:
        """The layout these sizes make: with DP = 1 (the config's own checks), or of `world` processes; `moe`: the
        model has experts (sequence parallelism's default)."""
        sizes = dict(
            tp=self.tp,
            pp=self.pp,
            cp=self.cp,
            vpp=self.vpp,
            sequence_parallel=self.sequence_parallel_for(moe),
            ep=self.ep,
            etp=self.etp,
        )
        return Layout(**sizes) if world is None else Layout.for_world(world, **sizes)

    def sequence_parallel_for(self, moe: bool) -> bool:
        """`sequence_parallel` resolved: as set, or (None) on for a mixture of experts under TP."""
        return self.sequence_parallel if self.sequence_parallel is not None else (moe and self.tp > 1)

    def _rules(self) -> None:
        self.layout()  # sizes >= 1, sequence parallelism needs TP > 1
        _one_of("parallel.recompute", self.recompute, RECOMPUTE)
        _one_of("parallel.precision", self.precision, PRECISIONS)
        need(
            not self.overlap_param_gather or self.distributed_optimizer,
            "parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true (without it every rank "
            "updates whole weights and there is nothing to gather)",
        )


@dataclass
class OptimizerConfig(Section):
    name: ClassVar[str] = "optimizer"
    lr: float = 1e-6  # peak learning rate
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # max global grad norm; 0 = no clipping
    nonfinite: str = "stop"  # a non-finite loss or grad norm: stop (naming step and pairs) | skip the step
    max_skipped_steps: int = 10  # with nonfinite=skip, stop once this many steps were skipped

    def _rules(self) -> None:
        _positive("optimizer", self, ("lr", "adam_eps"))
        for key in ("weight_decay", "clip_grad"):
            need(getattr(self, key) >= 0, f"optimizer.{key} must be >= 0, got {getattr(self, key)!r}")
        for key in ("adam_beta1", "adam_beta2"):
            need(0 <= getattr(self, key) < 1, f"optimizer.{key} must be in [0, 1), got {getattr(self, key)!r}")
        _one_of("optimizer.nonfinite", self.nonfinite, NONFINITE)
        need(self.max_skipped_steps >= 0, f"optimizer.max_skipped_steps must be >= 0, got {self.max_skipped_steps!r}")


@dataclass
class ScheduleConfig(Section):
    name: ClassVar[str] = "schedule"
    global_batch_size: int = 128  # preference pairs per optimizer step
    micro_batch_size: int = 1  # preference pairs per forward/backward
    train_steps: int | None = None  # None = derived from epochs and data size
    epochs: float = 1.0
    warmup_ratio: float = 0.1  # fraction of train_steps spent in linear warmup
    exit_interval: int | None = None  # save and exit after a step divisible by this (Megatron's --exit-interval)
    # a time budget from the process start: save and exit 0 when the next step would end past it (the measured step
    # time); Megatron's --exit-duration-in-mins, NeMo-RL's checkpoint_must_save_by
    exit_duration_minutes: float | None = None
    seed: int = 1234

    def _rules(self) -> None:
        _positive(
            "schedule",
            self,
            ("global_batch_size", "micro_batch_size", "train_steps", "epochs", "exit_duration_minutes"),
        )
        need(0 <= self.warmup_ratio < 1, f"schedule.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        need(0 <= self.seed < 2**32, f"schedule.seed must be in [0, 2**32), got {self.seed!r}")
        need(
            self.global_batch_size % self.micro_batch_size == 0,
            f"schedule.global_batch_size={self.global_batch_size} is not divisible by "
            f"schedule.micro_batch_size={self.micro_batch_size}",
        )


@dataclass
class DPOConfig(Section):
    """The preference objective (mdpo.loss computes it; its hyperparameters are checked here, once)."""

    name: ClassVar[str] = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO (cDPO) label noise, in [0, 0.5)
    loss_type: str | list[str] = "sigmoid"  # a name in LOSS_TYPES, or several (weighted sum)
    loss_weights: list[float] | None = None  # one per loss_type; None = all 1.0
    # weight of the chosen responses' mean token NLL: the older spelling of loss type sft (RPO, NeMo
    # sft_loss_weight); rpo_alpha: a equals loss_type [sigmoid, sft] with loss_weights [1, a]
    rpo_alpha: float = 0.0
    reference: str = "online"  # online | precomputed (see `mdpo precompute-ref`) | none (reference-free)
    reference_cache: str | None = None  # precomputed reference log-probs; None = RUN_DIR/reference_logps
    # bco_pair's reward shift; None = the running mean of past steps' rewards (BCO, TRL 0.x), kept in checkpoints
    bco_delta: float | None = None
    discopop_tau: float = 0.05  # discopop's temperature
    # reverse_kl (DPO) | forward_kl | js_divergence | alpha_divergence: f-DPO's f'(policy / reference) replaces the
    # log-ratio in the loss (only for F_DIVERGENCE_LOSS_TYPES)
    f_divergence: str = "reverse_kl"
    f_alpha_coef: float = 0.5  # alpha_divergence's alpha (TRL f_alpha_divergence_coef); within 1e-6 of 1: reverse_kl
    # LD-DPO: response tokens past the pair's shorter response count ld_alpha times in the summed log-probs (policy
    # and reference); None = plain sums (1.0 is the same), 0.0 = only the shared length counts
    ld_alpha: float | None = None
    use_weighting: bool = False  # WPO: each pair's loss weighted by its responses' length-normalised probabilities
    # TR-DPO (TRL's names): every ref_model_sync_steps steps the online reference becomes
    # ref_model_mixup_alpha * policy + (1 - ref_model_mixup_alpha) * reference
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6  # in (0, 1]; 1 copies the policy
    ref_model_sync_steps: int = 512
    # MoE policies: weight of the load-balancing loss added to the objective (TRL's DPOTrainer adds it the same way);
    # None = the model's own (model.router_aux_loss_coef, from config.json); 0 = off. Logged as aux_loss.
    router_aux_loss_coef: float | None = None
    # which load-balancing loss (ROUTER_AUX_LOSS_TYPES): auto = transformers' pooled formula where it is exact (one
    # pipeline stage, no full recompute), Megatron's per-layer one elsewhere; docs/mixture-of-experts.md
    router_aux_loss_type: str = "auto"

    @property
    def loss_types(self) -> tuple[str, ...]:
        return (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)

    @property
    def weights(self) -> tuple[float, ...]:
        """One weight per loss type (all 1.0 unless loss_weights says)."""
        return tuple(self.loss_weights) if self.loss_weights is not None else (1.0,) * len(self.loss_types)

    @property
    def reference_free(self) -> bool:
        return self.reference == "none"

    @property
    def whole_rankings(self) -> bool:
        """Whether the loss reads a whole ranking at once (plackett_luce), so no batch may cut one."""
        return "plackett_luce" in self.loss_types

    def _rules(self) -> None:
        types = self.loss_types
        need(bool(types), f"dpo.loss_type is empty; use one or more of: {', '.join(LOSS_TYPES)}")
        for loss_type in types:
            need(loss_type in LOSS_TYPES, f"unknown dpo.loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        if self.loss_weights is not None:
            weights = list(self.loss_weights)
            need(
                len(weights) == len(types),
                f"dpo.loss_weights has {len(weights)} entries {weights} but "
                f"dpo.loss_type has {len(types)} {list(types)}",
            )
            for weight in weights:
                need(math.isfinite(weight), f"dpo.loss_weights entries must be finite, got {weight!r}")
                need(weight >= 0, f"dpo.loss_weights entries must be >= 0, got {weight!r}")
        need(self.beta > 0, f"dpo.beta must be > 0, got {self.beta!r}")
        why = " (robust divides by 1 - 2*label_smoothing)" if "robust" in types else ""
        need(
            0 <= self.label_smoothing < 0.5,
            f"dpo.label_smoothing must be in [0, 0.5){why}, got {self.label_smoothing!r}",
        )
        need(self.rpo_alpha >= 0, f"dpo.rpo_alpha must be >= 0, got {self.rpo_alpha!r}")
        need(self.discopop_tau > 0, f"dpo.discopop_tau must be > 0, got {self.discopop_tau!r}")
        _one_of("dpo.f_divergence", self.f_divergence, F_DIVERGENCES)
        others = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
        if self.f_divergence != "reverse_kl" and others:
            raise ConfigError(
                f"dpo.f_divergence={self.f_divergence} applies only to loss types {', '.join(F_DIVERGENCE_LOSS_TYPES)} "
                f"(f-DPO's log Z(x) cancels only in a chosen-rejected difference), got dpo.loss_type {others[0]!r}; "
                "use dpo.f_divergence=reverse_kl with it"
            )
        _one_of("dpo.reference", self.reference, REFERENCE_MODES)
        if self.ld_alpha is not None:
            need(0.0 <= self.ld_alpha <= 1.0, f"dpo.ld_alpha must be in [0, 1] (or null: off), got {self.ld_alpha!r}")
        sorting = [t for t in types if t in ("aot", "aot_unpaired")]
        if self.use_weighting and sorting:
            raise ConfigError(
                f"dpo.use_weighting (WPO) does not apply to loss type {sorting[0]!r}: it sorts over "
                "the batch, so its terms are not tied to pairs (TRL refuses it too)"
            )
        coef = self.router_aux_loss_coef
        need(coef is None or coef >= 0, f"dpo.router_aux_loss_coef must be >= 0 (0: off), got {coef!r}")
        _one_of("dpo.router_aux_loss_type", self.router_aux_loss_type, ROUTER_AUX_LOSS_TYPES)
        self._check_reference_sync()

    def _check_reference_sync(self) -> None:
        """TR-DPO's mixing (sync_ref_model and its two settings)."""
        alpha, every = self.ref_model_mixup_alpha, self.ref_model_sync_steps
        need(0 < alpha <= 1, f"dpo.ref_model_mixup_alpha must be in (0, 1], got {alpha!r}")
        need(every >= 1, f"dpo.ref_model_sync_steps must be >= 1, got {every!r}")
        need(
            not self.sync_ref_model or self.reference == "online",
            f"dpo.sync_ref_model=true needs dpo.reference=online, got dpo.reference={self.reference}: TR-DPO mixes "
            "the policy's weights into a reference model, and there is none to mix into",
        )


@dataclass
class LoRAConfig(Section):
    """Low-rank adapters (PEFT's LoRA) on the transformer's linear layers; the base weights stay frozen and the
    reference is the base itself (the adapters switched off), so no second model is held."""

    name: ClassVar[str] = "lora"
    rank: int = 0  # 0 = off (full tuning)
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank (PEFT's lora_alpha)
    dropout: float = 0.0  # on the adapters' input (PEFT's lora_dropout)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # any of qkv, proj, fc1, fc2

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def _rules(self) -> None:
        need(isinstance(self.rank, int) and self.rank >= 0, f"lora.rank must be >= 0 (0: off), got {self.rank!r}")
        need(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha!r}")
        need(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        need(bool(self.targets), f"lora.targets is empty; use one or more of: {', '.join(LORA_TARGETS)}")
        for target in self.targets:
            need(target in LORA_TARGETS, f"unknown lora.targets entry {target!r}; valid: {', '.join(LORA_TARGETS)}")
        need(len(set(self.targets)) == len(self.targets), f"lora.targets lists an entry twice: {self.targets}")


@dataclass
class LoggingConfig(Section):
    name: ClassVar[str] = "logging"
    run_dir: str = "runs/mdpo"
    log_interval: int = 1  # steps between metric lines
    eval_interval: int | None = None  # steps between held-out evaluations (also before and after training)
    progress: bool = True  # show a progress bar
    plot: bool = True  # write loss/reward plots to run_dir
    tensorboard: bool = False  # also write TensorBoard events to RUN_DIR/tensorboard (needs `tensorboard`)
    wandb_project: str | None = None  # also log to this Weights & Biases project (needs `wandb`)
    profile_step: int | None = None  # run this step (1-based) under torch.profiler: RUN_DIR/profile.txt + trace

    def _rules(self) -> None:
        _positive("logging", self, ("log_interval", "eval_interval", "profile_step"))


@dataclass
class CheckpointConfig(Section):
    name: ClassVar[str] = "checkpoint"
    export_hf: bool = True  # write the trained policy to RUN_DIR/hf as a HF model folder
    dir: str | None = None  # None = RUN_DIR/checkpoints
    save_interval: int | None = None  # steps between checkpoints (None: only at the end and on SIGTERM/SIGINT)
    save_at_end: bool = True
    keep_last: int = 2  # complete checkpoints kept
    # auto (the newest intact checkpoint in dir, if any; a damaged newer one is moved aside) | none | a folder
    resume: str = "auto"
    # resume although settings that change the run (data, seed, batch size, model, objective, optimizer, schedule)
    # differ from the checkpoint's: listed, never silent; without it such a resume is refused
    allow_changes: bool = False

    def _rules(self) -> None:
        need(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last!r}")
        _positive("checkpoint", self, ("save_interval",))


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """The rules that join sections (each section's own rules ran when it was built)."""
        m = self.model
        layout = self.parallel.layout(moe=m.is_moe)
        layout.check_rows(self.data.packing)
        layout.check_attention(m.attention, m.position_embedding)
        layout.check_model(
            m.num_attention_heads,
            m.num_key_value_heads,
            m.num_hidden_layers,
            m.num_experts,
            m.expert_width,
            expert_bias=m.linear_bias,
        )
        layout.check_moe(
            m.num_experts, self.router_aux_loss_coef, self.parallel.recompute, self.dpo.router_aux_loss_type
        )
        need(
            self.data.share_prompt is not True or self.parallel.cp == 1,
            "data.share_prompt=true needs parallel.cp=1 (context parallelism cuts rows into chunks; a shared "
            "prompt's blocks would straddle them): set data.share_prompt=false",
        )
        need(
            self.data.share_prompt is not True or m.attention != "te",
            "data.share_prompt=true needs model.attention auto, sdpa or local (Transformer Engine's attention here "
            "takes no attention blocks): set data.share_prompt=false",
        )
        if self.dpo.whole_rankings:
            need(
                self.data.rank_pairs == "ranking",
                f"dpo.loss_type plackett_luce takes whole rankings, not data.rank_pairs={self.data.rank_pairs}'s "
                "pairs: set data.rank_pairs=ranking (a row of pairs or a conversation's turn is a ranking of two)",
            )
            need(
                self.parallel.ep == 1,
                "dpo.loss_type plackett_luce needs parallel.ep=1: it keeps each ranking in one micro-batch, so data-"
                "parallel ranks can run different numbers of them, which expert parallelism's all-to-alls cannot",
            )
        need(
            self.dpo.reference != "precomputed" or m.init_from is not None,
            "dpo.reference=precomputed needs model.init_from (the reference checkpoint the cache is stamped with)",
        )
        need(
            m.router_bias_update_rate == 0 or self.parallel.recompute != "full",
            "model.router_bias_update_rate > 0 with parallel.recompute=full: Megatron-Core counts the routed tokens "
            "in the forward recomputed during the backward, where mdpo cannot weight them by their micro-batch; use "
            "parallel.recompute none or selective",
        )
        if self.lora.enabled:
            self._check_lora()

    @property
    def router_aux_loss_coef(self) -> float:
        """The load-balancing loss weight in force (`ModelConfig.aux_loss_coef` with dpo's override)."""
        return self.model.aux_loss_coef(self.dpo.router_aux_loss_coef)

    @property
    def router_aux_loss_type(self) -> str:
        """`dpo.router_aux_loss_type` resolved: auto is transformers' pooled formula where the layout makes it exact
        (`Layout.pools_routing`), Megatron's per-layer loss elsewhere."""
        requested = self.dpo.router_aux_loss_type
        if requested != "auto":
            return requested
        pooled = self.parallel.layout(moe=self.model.is_moe).pools_routing(self.parallel.recompute)
        return "transformers" if pooled else "megatron"

    def _check_lora(self) -> None:
        need(
            self.model.attention != "te",
            "lora.rank > 0 needs model.attention auto, sdpa or local: mdpo's adapters wrap Megatron-Core's local "
            "linear layers, not Transformer Engine's fused norm + linear; set model.attention=sdpa",
        )
        need(
            not self.dpo.sync_ref_model,
            "lora.rank > 0 takes dpo.sync_ref_model=false: with LoRA the reference is the frozen base model (the "
            "adapters switched off), which TR-DPO's mixing would have to move",
        )
        need(
            self.model.init_from is not None,
            "lora.rank > 0 needs model.init_from (the base model the adapters are trained on and belong to)",
        )
        need(
            self.model.router_bias_update_rate == 0,
            "lora.rank > 0 takes model.router_bias_update_rate=0: the reference is the base model (the adapters "
            "switched off), whose correction bias an update would move, and a LoRA checkpoint holds the adapters only",
        )
        mlp = [t for t in self.lora.targets if t in ("fc1", "fc2")]
        need(
            not (mlp and self.model.is_moe),
            f"lora.targets {', '.join(mlp)} on a mixture-of-experts model: its experts take no adapters, and PEFT "
            "reads the MLP targets of such a model as its experts' (dense layers included); use lora.targets "
            "[qkv, proj]",
        )


def validate(cfg: TrainConfig) -> None:
    """Every section's rules again (a section may have been edited in place), the inputs a run needs, and the rules
    that join sections; raises the first ConfigError."""
    for section in dataclasses.fields(cfg):
        getattr(cfg, section.name).check()
    cfg.data.check_required()
    cfg.check()
