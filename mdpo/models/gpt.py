"""Build a Megatron-Core GPTModel from a HF-config-shaped description (the math of every family in
`models.families`: Llama 2 / 3.x, Qwen 1.0 / 2 / 2.5 / 3, Mistral, Baichuan 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_geglu import quick_gelu
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.moe_layer import RouterBuilder
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import MLATransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from mdpo.config import Layout, LoRAConfig, ModelConfig, padded_vocab_size
from mdpo.models.attention import (
    ALiBiAttention,
    BlockAttention,
    LocalAttention,
    SDPAttention,
    row_major,
    varlen_takes_window,
    with_core_attention,
)
from mdpo.models.lora import with_adapters
from mdpo.models.mla import LatentDownProjection, LatentSelfAttention, mla_fields
from mdpo.models.moe import ExpertBiasRouter, mark_experts, moe_fields
from mdpo.models.norms import PostNormLayer, PostNormLayerSubmodules, ProjectionNorm, TorchNorm, ZeroCenteredRMSNorm
from mdpo.models.rotary import RopeSelfAttention, layer_softmax_scale, table_frequencies


def transformer_engine_available() -> bool:
    """TE's fused layers are used only when TE imports and there is a GPU to run them."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401 - optional dependency
    except Exception:
        return False
    return True


def core_attention(model: ModelConfig) -> str:
    """What `model.attention` means on this machine: `te` (Transformer Engine's layers: asked for, or `auto` with TE
    present; never with ALiBi), `sdpa` (torch SDPA: asked for, `auto` without TE, on CPU too, where it ran a real
    UltraFeedback step 6% faster padded and 20% packed than Megatron's unfused attention; always with ALiBi) or
    `local` (Megatron's unfused attention, asked for). `auto` takes TE's layers only for models they express
    (`ModelConfig.fits_te_layers`: not OLMo's norms) and mdpo wires (`ModelConfig.gpt_oss_parts`: not gpt-oss's;
    never MLA, which mdpo builds on its local layers)."""
    te_fits = model.fits_te_layers and not model.gpt_oss_parts and not model.is_mla
    if model.position_embedding != "alibi" and (
        model.attention == "te" or (model.attention == "auto" and te_fits and transformer_engine_available())
    ):
        return "te"
    return "local" if model.attention == "local" and model.position_embedding != "alibi" else "sdpa"


def packs_as_thd(model: ModelConfig, dtype: torch.dtype) -> bool:
    """Whether packed rows (unshared prompts) reach the core attention as THD sequences, for a kernel that takes
    sequence boundaries: Transformer Engine's, or torch's flash varlen through mdpo's SDPA (CUDA, half precision,
    no ALiBi). Elsewhere they go as blocks (`models.attention`), attended sequence by sequence."""
    attention = core_attention(model)
    if attention == "te":
        return True
    if (
        model.is_mla
    ):  # Megatron's MLA takes THD as [t, heads, d] rows, which mdpo's core attentions do not (`models.mla`)
        return False
    flash = torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16)
    window_ok = model.sliding_window is None or varlen_takes_window()  # else a window needs blocks' masks
    # the varlen kernel takes no sinks: blocks then attend with their explicit softmax (`models.attention`)
    plain = model.position_embedding != "alibi" and not model.attention_sinks
    return attention == "sdpa" and plain and flash and window_ok


def fuses_rope_locally(model: ModelConfig) -> bool:
    """Whether mdpo's compiled rotation (`models.rotary`) applies RoPE: `model.fused_rope` on the local layers (on
    TE's layers the flag is Megatron's `apply_rope_fusion`, TE's kernel)."""
    return model.fused_rope and core_attention(model) != "te"


def layer_spec(
    model: ModelConfig,
    layer: int,
    experts: bool = False,
    lora: LoRAConfig | None = None,
    router: RouterBuilder | None = None,
) -> ModuleSpec:
    """Layer `layer` (its number in the model, from 0): Transformer Engine's fused layers when available; otherwise
    Megatron-Core's local layers (norms: `models.norms`), with torch SDPA as the core attention (`auto`, `sdpa`) or
    Megatron's unfused attention when asked (`local`). ALiBi always runs through SDPA with the biases added to the
    scores (the config refuses te/local with it). Its attention takes the layer's RoPE (`RopeSelfAttention`), or is
    Megatron's multi-latent attention (`models.mla`, local layers only).
    `experts`: a MoE layer (Megatron's MoELayer: grouped GEMM experts on TE's layers, one MLP per expert on the
    local ones) whose router is `router` (`moe.ExpertBiasRouter`, Megatron's TopKRouter, when None); `lora`: the
    target linears with adapters (`models.lora`; local layers only)."""
    attention = core_attention(model)
    num_experts = model.num_experts if experts else None
    if attention == "te":
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=experts, qk_layernorm=model.qk_norm
        )
    else:
        spec = _local_layer_spec(model, num_experts, attention)
    self_attention = spec.submodules.self_attention
    if model.is_mla:  # Megatron's MLA with its own RoPE (`models.mla`)
        self_attention.module = LatentSelfAttention
    else:
        self_attention.module = RopeSelfAttention
        self_attention.params = {**self_attention.params, **_layer_rope(model, layer)}
    if experts:
        spec.submodules.mlp.submodules.router = router or ExpertBiasRouter
    return with_adapters(spec, lora) if lora is not None else spec


def _layer_rope(model: ModelConfig, layer: int) -> dict:
    """What a layer's attention knows of its RoPE (`RopeSelfAttention`): which of two tables, when the window layers
    have their own (`model.window_rope_theta`), its softmax scale (a scaled RoPE's attention factor), and whether
    mdpo's compiled rotation applies it."""
    windowed = layer in model.window_layers()
    table = None if model.window_rope_theta is None else ("window" if windowed else "full")
    return dict(rope_table=table, softmax_scale=layer_softmax_scale(model, windowed), fused=fuses_rope_locally(model))


def norm_class(model: ModelConfig) -> type:
    """The local layers' RMSNorm: Gemma's 1 + w, or torch's (`models.norms`)."""
    return ZeroCenteredRMSNorm if model.zero_centered_norms else TorchNorm


def _local_layer_spec(model: ModelConfig, num_experts: int | None, attention: str) -> ModuleSpec:
    local = get_gpt_layer_local_spec(
        num_experts=num_experts,
        normalization="RMSNorm",
        qk_layernorm=model.qk_norm or model.is_mla,
        multi_latent_attention=model.is_mla,
    )
    norm = norm_class(model)
    local.submodules.input_layernorm = local.submodules.pre_mlp_layernorm = norm
    if model.is_mla:  # the norms of MLA's q and kv latents (DeepSeek's q_a_layernorm, kv_a_layernorm)
        attention_parts = local.submodules.self_attention.submodules
        attention_parts.q_layernorm = attention_parts.kv_layernorm = norm
        # the down projections whole on every TP rank, as on TE's layers (`models.mla`)
        attention_parts.linear_q_down_proj = attention_parts.linear_kv_down_proj = LatentDownProjection
    if model.qk_norm:
        attention_parts = local.submodules.self_attention.submodules
        if model.qk_norm_span == "projection":  # OLMo 2's: all heads together, the statistics summed over TP
            attention_parts.q_layernorm = ModuleSpec(module=ProjectionNorm, params={"heads": "query"})
            attention_parts.k_layernorm = ModuleSpec(module=ProjectionNorm, params={"heads": "key"})
        else:  # per head, on whole sequences: Megatron sums their gradients over TP (other heads per rank)
            attention_parts.q_layernorm = attention_parts.k_layernorm = norm
    if model.norm_position != "pre":  # norms after attention and the MLP: OLMo 2 / 3 (none before), Gemma (both)
        parts = vars(local.submodules) | {"post_self_attn_layernorm": norm, "post_mlp_layernorm": norm}
        if model.norm_position == "post":
            parts |= {"input_layernorm": IdentityOp, "pre_mlp_layernorm": IdentityOp}
        local = ModuleSpec(module=PostNormLayer, submodules=PostNormLayerSubmodules(**parts))
    if model.position_embedding == "alibi":
        return with_core_attention(local, ALiBiAttention)
    if attention == "sdpa":
        return with_core_attention(local, SDPAttention)
    return with_core_attention(local, LocalAttention)


def decoder_spec(
    model: ModelConfig,
    config: TransformerConfig,
    vp_stage: int | None = None,
    lora: LoRAConfig | None = None,
    router: RouterBuilder | None = None,
) -> ModuleSpec | TransformerBlockSubmodules:
    """What GPTModel builds this stage's layers and final norm from. Given a layer spec alone, Megatron picks the
    final norm itself (TE's, apex's or WrappedTorchNorm, whichever imports), so the local layers come as a block
    whose final norm is `TorchNorm` too. TE's layers keep TE's final norm, which takes sequence parallelism. A MoE
    model's layers are listed one by one (each with its RoPE; those in `model.moe_layers` with experts)."""
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    first = get_transformer_layer_offset(config, vp_stage=vp_stage)
    moe = set(model.expert_layers())
    specs = [layer_spec(model, i, i in moe, lora, router) for i in range(first, first + count)]
    if core_attention(model) == "te":
        from megatron.core.extensions.transformer_engine import TENorm  # te: Transformer Engine imports

        return TransformerBlockSubmodules(layer_specs=specs, layer_norm=TENorm)
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=norm_class(model))


def _windows(model: ModelConfig) -> dict:
    """A sliding window as Megatron's `window_size` (HF's `sliding_window=W` attends W keys, itself included:
    (W - 1, 0)) on the layers `window_attn_skip_freq` marks (None: every layer); read by Transformer Engine's
    attention and by mdpo's own (`models.attention.layer_window`)."""
    layers = model.window_layers()
    if not layers:
        return {}
    every = model.sliding_window_layers is None
    marks = None if every else [int(i in layers) for i in range(model.num_hidden_layers)]
    return dict(window_size=(model.sliding_window - 1, 0), window_attn_skip_freq=marks)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation: transformers' gelu_pytorch_tanh (Gemma's GeGLU gate)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": gelu_tanh, "quick_gelu": quick_gelu}  # model.hidden_act


def _architecture(model: ModelConfig) -> dict:
    """Llama math in Megatron terms: RMSNorm, SwiGLU (gated silu), no biases but Qwen's on q/k/v, GQA, the head
    size (`kv_channels`, explicit for Qwen 3 and Mistral), Qwen 3's per-head q/k norms and sliding windows (Mistral,
    Qwen's use_sliding_window); gpt-oss's clamped GLU with an offset, biased linears and router, and attention sinks
    (Megatron's learnable softmax offset, read by mdpo's core attentions); multi-latent attention (`models.mla`); no
    dropout."""
    return dict(
        **_windows(model),
        **(mla_fields(model) if model.is_mla else {}),
        num_layers=model.num_hidden_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.intermediate_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.kv_heads,
        kv_channels=model.kv_channels,
        # per-head q/k norms, whose gradients Megatron sums over TP by name ("q_layernorm"): not MLA's latent norms,
        # whole on every rank (the spec builds them), which that sum would double without sequence parallelism
        qk_layernorm=model.qk_norm,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=ACTIVATIONS[model.hidden_act],
        activation_func_clamp_value=model.glu_clamp,
        glu_linear_offset=model.glu_linear_offset,
        add_bias_linear=model.linear_bias,
        softmax_type="learnable" if model.attention_sinks else "vanilla",
        add_qkv_bias=model.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
    )


def _kernels(model: ModelConfig) -> dict:
    """Megatron's fusions: the fused SwiGLU when asked (model.fused_swiglu; no biases: Megatron's SwiGLUFunction),
    TE's fused RoPE on TE's layers (local layers: `models.rotary`). No biases and no dropout: the bias-dropout-add
    "fusion" would be a torch.compile of a plain residual add."""
    return dict(
        bias_activation_fusion=model.fused_swiglu,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=model.fused_rope and core_attention(model) == "te",
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def transformer_config(
    model: ModelConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int = 1,
    cp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    params_dtype: torch.dtype = torch.float32,
    init_weights: bool = True,
    sequence_parallel: bool = False,
    recompute: str = "none",
    balancing: str = "transformers",
    aux_coef: float = 0.0,
) -> TransformerConfig:
    """The model (`_architecture`, `moe.moe_fields`), its layout, dtype and recompute, the schedule's loss contract
    and the kernels (`_kernels`) as Megatron's TransformerConfig. MoE layers use the all-to-all token dispatcher
    (the one that takes variable sequence lengths) and TE's grouped GEMM where TE runs; `balancing` and `aux_coef`:
    Megatron's router loss for `dpo.router_aux_loss_type` megatron or seq (`moe.moe_fields`)."""
    return (MLATransformerConfig if model.is_mla else TransformerConfig)(
        **_architecture(model),
        # False only in the converters: Megatron then also skips marking tensor-parallel weights, which training needs
        perform_initialization=init_weights,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        # selective: recompute the core attention in backward; full: keep only each layer's input
        recompute_granularity=None if recompute == "none" else recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        context_parallel_size=cp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        # Pairs are summed per sequence and the loss is a mean over pairs: the schedule must not divide
        # by the micro-batch count, and finalize_model_grads divides by the global pair count instead.
        calculate_per_token_loss=True,
        # Dynamic padding: each micro-batch has its own length, so pipeline stages exchange shapes.
        # (interleaved pipeline: fixed shapes per schedule call, and unbatched p2p, which keeps the two directions
        # apart when the previous and next stage are one rank)
        variable_seq_lengths=vpp == 1,
        batch_p2p_comm=vpp == 1,
        **moe_fields(
            model, ep, etp, core_attention(model) == "te", dispatcher="alltoall", balancing=balancing, coef=aux_coef
        ),
        **_kernels(model),
    )


class PositionedGPTModel(GPTModel):
    """Megatron's GPTModel with mdpo's differences, chosen when it is built:

    - For micro-batches in blocks (shared prompts, packed rows) the rotary embedding follows the position ids.
      Megatron's RoPE uses each token's index in the row, which is right for a row of sequences each attending to
      itself (RoPE sees only relative distances) but not for a shared prompt's rejected response, whose positions
      continue from the prompt's end while it sits after the chosen one. THD packs get a per-token table too when
      mdpo's compiled rotation applies RoPE (`tokenwise_thd_rope`): it takes no sequence boundaries, and a pack's
      position ids restart at each sequence as Megatron's THD rotation does. Multi-latent attention layers have
      RoPEs of their own: they get the position ids instead (`models.mla`).
    - The input embeddings are scaled by `embedding_scale` where the model says so (Gemma's sqrt(hidden size)).
    - The output weight is `output_weight()`: the layer's own or the tied embedding, L2-normalised per row for
      Baichuan 2's NormHead (`norm_head`, in every forward, so gradients flow through the normalisation).
    - With `scoring` (training's build) the last stage hands on its final hidden states, gathered over the
      sequence-parallel ranks: mdpo's loss applies the output weight to the positions it scores only, in chunks
      (`training.logprobs`), so the full [tokens, vocab] logits never exist. Otherwise it returns logits.
    """

    def __init__(
        self,
        *args: object,
        scoring: bool = False,
        norm_head: bool = False,
        tokenwise_thd_rope: bool = False,
        embedding_scale: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.scoring, self.norm_head, self.tokenwise_thd_rope = scoring, norm_head, tokenwise_thd_rope
        self.embedding_scale = embedding_scale

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight as the logits use it: this TP rank's vocabulary rows (the embedding's with
        tied weights, or its copy on a last pipeline stage), normalised per row for a NormHead. Rows are vocabulary
        entries, whole on every TP rank, so the normalisation needs no communication."""
        tied = self.share_embeddings_and_output_weights
        weight = self.shared_embedding_or_output_weight() if tied else self.output_layer.weight
        return F.normalize(weight, dim=-1) if self.norm_head else weight

    def _preprocess(self, *args, **kwargs):
        out = super()._preprocess(*args, **kwargs)
        if out[0] is not None:  # the embedding's transpose: as the core attention's outputs (`row_major`)
            embedded = row_major(out[0])
            if self.embedding_scale is not None:  # in the embedding's dtype, as transformers' Gemma scales it
                embedded = embedded * torch.tensor(self.embedding_scale, dtype=embedded.dtype)
            out = (embedded, *out[1:])
        padding = out[5] if len(out) > 5 else None
        if padding is not None and not self.pre_process and self.config.sequence_parallel:
            # Megatron splits a MoE padding mask over the sequence-parallel ranks on the first stage only
            padding = scatter_to_sequence_parallel_region(padding.t().contiguous()).t().contiguous()
            out = (*out[:5], padding, *out[6:])
        position_ids, params = kwargs.get("position_ids"), kwargs.get("packed_seq_params")
        if self.config.multi_latent_attention and isinstance(params, BlockAttention) and position_ids is not None:
            return (out[0], position_ids.t(), *out[2:])  # MLA's layers read their own RoPE at these (`models.mla`)
        thd = params is not None and params.qkv_format == "thd" and self.tokenwise_thd_rope
        if not (isinstance(params, BlockAttention) or thd) or out[1] is None or position_ids is None:
            return out
        table = out[1][:, 0]  # [rotary positions, 1, dim]: Megatron's table for 0 .. max_seqlen - 1
        return (out[0], table[position_ids.t()], *out[2:])  # [s, b, 1, dim]: each token's own position

    def _postprocess(self, hidden_states: torch.Tensor, *args, runtime_gather_output=None, **kwargs) -> torch.Tensor:
        """The last stage's output, [b, s, ...] as Megatron returns logits: hidden states (`scoring`) or logits
        [b, s, vocab / TP] (mdpo builds no multi-token prediction and passes no labels)."""
        if not self.post_process:
            return hidden_states
        if self.scoring:
            if self.config.sequence_parallel:  # the scoring all-reduces the hidden's gradient over TP itself
                hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
            return hidden_states.transpose(0, 1).contiguous()
        logits, _ = self.output_layer(
            hidden_states, weight=self.output_weight(), runtime_gather_output=runtime_gather_output
        )
        return logits.transpose(0, 1).contiguous()


def build_gpt_model(
    model: ModelConfig,
    config: TransformerConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    scoring: bool = False,
    lora: LoRAConfig | None = None,
    router: RouterBuilder | None = None,
) -> PositionedGPTModel:
    """One pipeline stage (or, with an interleaved pipeline, model chunk `vp_stage` of it) of the policy or the
    reference, every piece from its spec: the output layer hands on hidden states with `scoring` (training) and
    returns logits otherwise, `lora` puts adapters on its target linears (values set by `lora.init_adapters`),
    `router` is a MoE layer's router (`models.moe`). Tied embeddings are Megatron's shared embedding and output
    weight (a copy on the last stage under PP, its gradient all-reduced with the embedding's)."""
    alibi = model.position_embedding == "alibi"
    layout = Layout(
        tp=config.tensor_model_parallel_size,
        cp=config.context_parallel_size,
        sequence_parallel=config.sequence_parallel,
    )
    layout.check_attention(model.attention, model.position_embedding, resolved=core_attention(model))
    gpt = PositionedGPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(model, config, vp_stage, lora, router),
        vocab_size=padded_vocab_size(model.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="none" if alibi else "rope",
        rotary_percent=model.partial_rotary_factor,  # its first dims rotated, rotate_half within them (GLM-4.5)
        rotary_base=model.rope_theta,
        vp_stage=vp_stage,
        scoring=scoring,
        norm_head=model.norm_head,
        tokenwise_thd_rope=fuses_rope_locally(model),
        embedding_scale=model.hidden_size**0.5 if model.scale_embeddings else None,
    )
    frequencies = None if model.is_mla else table_frequencies(model)  # MLA's layers have their own RoPE
    if frequencies is not None:  # a scaled RoPE's (transformers'), or two RoPEs side by side, for Megatron's table
        inv_freq = gpt.rotary_pos_emb.inv_freq
        gpt.rotary_pos_emb.inv_freq = frequencies.to(inv_freq.device, inv_freq.dtype)
    mark_experts(gpt)
    return gpt
