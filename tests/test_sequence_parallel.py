"""Sequence parallelism on Megatron-Core's local layers: every norm of the model (each layer's two and the final
one) is `TorchNorm`, whose weight is marked for the TP all-reduce of its gradient exactly when the sequence is split.
That the runs are exact (norm gradients summed, scatter and gather where Megatron puts them, blocks and shared
prompts) is `tests/test_parallel.py`'s tp2_sp_packed layout."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.spec_utils import build_module

from mdpo.config import ModelConfig
from mdpo.models.gpt import decoder_spec, transformer_config
from mdpo.models.norms import TorchNorm


@pytest.mark.parametrize("attention", ["sdpa", "local"])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["off", "on"])
def test_every_local_norm_marks_its_weight_for_sequence_parallelism(megatron_world, attention, sequence_parallel):
    model = ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention=attention,
    )
    config = transformer_config(model, tp=2, sequence_parallel=sequence_parallel)
    block = decoder_spec(model, config)
    layers = [layer.submodules for layer in block.layer_specs]
    norms = [block.layer_norm] + [n for layer in layers for n in (layer.input_layernorm, layer.pre_mlp_layernorm)]
    assert norms == [TorchNorm] * (1 + 2 * model.num_hidden_layers)
    norm = build_module(TorchNorm, config=config, hidden_size=model.hidden_size, eps=config.layernorm_epsilon)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == model.rms_norm_eps
    params = list(norm.parameters())
    assert len(params) == 1 and params[0].shape == (model.hidden_size,)
    assert [getattr(p, "sequence_parallel", False) for p in params] == [sequence_parallel]
