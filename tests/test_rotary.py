"""model.fused_rope's rotation against HF Llama's rotary embedding, an independent oracle, in float64.

The THD path (packed rows on a GPU) runs its attention only on CUDA; what it adds for the compiled rotation is the
per-token table and the rotation without sequence boundaries, checked here on CPU (tests/test_gpu.py runs the
whole THD forward)."""

from __future__ import annotations

import pytest
import torch
from conftest import model_config, tiny_llama_config
from megatron.core.packed_seq_params import PackedSeqParams

from mdpo.models.gpt import build_gpt_model, transformer_config
from mdpo.models.rotary import rotate_qk


def test_compiled_rotation_of_a_thd_pack_equals_hf_rope(megatron_world):
    """A pack of three sequences as THD (positions restart at each sequence; the padding continues the last one):
    the per-token table the model hands the compiled rotation, and `rotate_qk` on q and k in Megatron's
    [t, 1, heads, d] layout (GQA), give HF Llama's rotary embedding and `apply_rotary_pos_emb` forward and backward."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf_config = tiny_llama_config()
    cfg = model_config(hf_config)
    cfg.fused_rope = True
    model = build_gpt_model(cfg, transformer_config(cfg))
    lengths = [5, 9, 6]  # the last holds 2 padding tokens
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # [1, t]
    cu = torch.tensor([0, 5, 14, 20], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9)
    tokens = torch.randint(0, cfg.vocab_size, positions.shape)
    table = model._preprocess(input_ids=tokens, position_ids=positions, packed_seq_params=params)[1]
    assert table.shape == (20, 1, 1, 16)

    g = torch.Generator().manual_seed(0)
    q = torch.randn(20, 1, 4, 16, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(20, 1, 2, 16, dtype=torch.float64, generator=g, requires_grad=True)
    grad_q, grad_k = torch.randn_like(q), torch.randn_like(k)
    got = rotate_qk(q, k, table)
    torch.autograd.backward(got, (grad_q, grad_k))
    got_grads = q.grad.clone(), k.grad.clone()

    heads_first = lambda x: x.permute(1, 2, 0, 3)  # [t, 1, n, d] -> HF's [1, n, t, d]
    q.grad = k.grad = None
    cos, sin = LlamaRotaryEmbedding(hf_config)(q.float(), positions)
    want = apply_rotary_pos_emb(heads_first(q), heads_first(k), cos.double(), sin.double())
    want = tuple(x.permute(2, 0, 1, 3) for x in want)
    torch.autograd.backward(want, (grad_q, grad_k))
    for name, a, b in zip(("q", "k", "dq", "dk"), (*got, *got_grads), (*want, q.grad, k.grad)):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (name, (a - b).abs().max())
    assert (got[0] - q).abs().max() > 0.1  # the rotation moved the queries


@pytest.mark.parametrize("rope_type", ["llama3", "linear", "yarn"])
def test_scaled_frequencies_are_computed_where_the_model_is_built_on_meta(rope_type):
    """The converters build the model on the meta device: a scaled RoPE's frequencies are still real numbers, those
    of transformers' own initialisation."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mdpo.config import ModelConfig
    from mdpo.models.rotary import rope_frequencies

    params = {"factor": 4.0, "original_max_position_embeddings": 64}
    model = ModelConfig(
        hidden_size=64,
        num_attention_heads=4,
        rope_scaling=rope_type,
        rope_scaling_factor=4.0,
        rope_original_max_position_embeddings=64,
    )
    with torch.device("meta"):
        inv_freq, factor = rope_frequencies(model)
    hf = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=model.max_position_embeddings,
        rope_parameters={
            "rope_type": rope_type,
            "rope_theta": 10000.0,
            **params,
            **({"low_freq_factor": 1.0, "high_freq_factor": 4.0} if rope_type == "llama3" else {}),
        },
    )
    want, want_factor = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
    assert inv_freq.device.type == "cpu"
    torch.testing.assert_close(inv_freq, want.float(), rtol=0, atol=0)
    assert factor == want_factor
