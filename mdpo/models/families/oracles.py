"""Float64 stand-ins for the families whose model code is remote (Qwen 1.0, Baichuan 2), the oracles of
`mdpo convert --check` for them: a model folder's remote code is never run, and these share nothing with the
mapping tables (each maps the HF tensors by hand). Each is a `base.StandIn`: (model, HF tensors in float64) -> a
forward from token ids [b, s] to logits [b, s, vocab].

- Qwen 1.0 is `Qwen2ForCausalLM` with equal KV heads, `c_attn` split into q/k/v, gate = `w2`, up = `w1`.
- Baichuan 2 7B (RoPE) is `LlamaForCausalLM` after splitting `W_pack` and normalising the head's rows; 13B (ALiBi)
  is a plain-PyTorch model (ALiBi as Baichuan adds it, NormHead).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from mdpo.config import ModelConfig

Forward = Callable[[torch.Tensor], torch.Tensor]


def _module_forward(cls: type[PreTrainedModel], config: PretrainedConfig, state: dict[str, torch.Tensor]) -> Forward:
    """transformers' `cls` in float64 holding `state` (on the tensors' device), as a tokens -> logits function."""
    model = cls(config).double()
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}, strict=True)
    model = model.to(next(iter(state.values())).device).eval()
    return lambda tokens: model(tokens).logits


def qwen_stand_in(model: ModelConfig, sd: dict[str, torch.Tensor]) -> Forward:
    """Qwen 1.0 == Qwen2ForCausalLM with equal KV heads, c_attn split into q/k/v, gate = w2, up = w1."""
    h = model.hidden_size
    mapped = {
        "model.embed_tokens.weight": sd["transformer.wte.weight"],
        "model.norm.weight": sd["transformer.ln_f.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(model.num_hidden_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[src + f"attn.c_attn.{kind}"].split(h)
            mapped.update(
                {
                    dst + f"self_attn.q_proj.{kind}": q,
                    dst + f"self_attn.k_proj.{kind}": k,
                    dst + f"self_attn.v_proj.{kind}": v,
                }
            )
        mapped.update(
            {
                dst + "self_attn.o_proj.weight": sd[src + "attn.c_proj.weight"],
                dst + "input_layernorm.weight": sd[src + "ln_1.weight"],
                dst + "post_attention_layernorm.weight": sd[src + "ln_2.weight"],
                dst + "mlp.gate_proj.weight": sd[src + "mlp.w2.weight"],
                dst + "mlp.up_proj.weight": sd[src + "mlp.w1.weight"],
                dst + "mlp.down_proj.weight": sd[src + "mlp.c_proj.weight"],
            }
        )
    config = Qwen2Config(
        vocab_size=model.vocab_size,
        hidden_size=h,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_attention_heads,
        rms_norm_eps=model.rms_norm_eps,
        rope_theta=model.rope_theta,
        max_position_embeddings=model.max_position_embeddings,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
    return _module_forward(Qwen2ForCausalLM, config, mapped)


def baichuan_stand_in(model: ModelConfig, sd: dict[str, torch.Tensor]) -> Forward:
    """Baichuan 2 by its position embedding: 7B (RoPE) or 13B (ALiBi)."""
    if model.position_embedding == "alibi":
        return lambda tokens: _baichuan_alibi_logits(model, sd, tokens)
    return _baichuan_rope(model, sd)


def _baichuan_rope(model: ModelConfig, sd: dict[str, torch.Tensor]) -> Forward:
    """Baichuan 2 7B == LlamaForCausalLM after splitting W_pack and normalising the head's rows."""
    mapped = {}
    for name, tensor in sd.items():
        if name.endswith("W_pack.weight"):
            for part, piece in zip("qkv", tensor.split(model.hidden_size)):
                mapped[name.replace("W_pack", f"{part}_proj")] = piece
        elif name == "lm_head.weight":
            mapped[name] = tensor / tensor.norm(dim=-1, keepdim=True)
        else:
            mapped[name] = tensor
    config = LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        rms_norm_eps=model.rms_norm_eps,
        max_position_embeddings=model.max_position_embeddings,
        tie_word_embeddings=False,
    )
    return _module_forward(LlamaForCausalLM, config, mapped)


def _baichuan_alibi_logits(model: ModelConfig, sd: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Baichuan 2 13B in float64 plain PyTorch: ALiBi bias slope_h * key_position on the scores (Baichuan's form),
    causal mask, no position embedding, NormHead. tokens [b, s] -> logits [b, s, vocab]."""
    n, h, eps = model.num_attention_heads, model.hidden_size, model.rms_norm_eps
    d, (b, s) = h // n, tokens.shape
    closest = 2 ** int(math.log2(n))
    base = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    extra = [2 ** (-8 * (i + 1) / (2 * closest)) for i in range(2 * closest)][0::2][: n - closest]
    slopes = torch.tensor(base + extra, dtype=torch.float64, device=tokens.device)
    bias = slopes[:, None, None] * torch.arange(s, dtype=torch.float64, device=tokens.device)[None, None, :]
    bias = bias + torch.full((s, s), float("-inf"), dtype=torch.float64, device=tokens.device).triu(1)
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    x = sd["model.embed_tokens.weight"][tokens]
    for i in range(model.num_hidden_layers):
        p = lambda name, i=i: sd[f"model.layers.{i}.{name}.weight"]
        q, k, v = (
            t.reshape(b, s, n, d).transpose(1, 2)
            for t in (rms(x, p("input_layernorm")) @ p("self_attn.W_pack").T).split(h, -1)
        )
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1) @ v
        x = x + attn.transpose(1, 2).reshape(b, s, h) @ p("self_attn.o_proj").T
        y = rms(x, p("post_attention_layernorm"))
        x = x + (F.silu(y @ p("mlp.gate_proj").T) * (y @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    head = sd["lm_head.weight"]
    return rms(x, sd["model.norm.weight"]) @ (head / head.norm(dim=-1, keepdim=True)).T
