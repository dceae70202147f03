"""Shared prompts ([prompt | chosen | rejected] as one sequence) are exact: per-sequence log-probs in every layout
equal the family's independent float64 forward of each sequence run alone, for Llama, Qwen 1.0 (q/k/v bias) and
Baichuan 2 13B (ALiBi on position ids); the attention blocks say exactly which keys each query sees."""

from __future__ import annotations

import pytest
import torch
from conftest import ROW_LAYOUTS as LAYOUTS
from conftest import VOCAB, baichuan_checkpoint, collate_as, qwen_checkpoint, random_pairs, tiny_hf_llama

from mdpo.checkpoint.check import hf_logits
from mdpo.checkpoint.description import describe_model
from mdpo.checkpoint.load import load_hf_weights
from mdpo.data.batching import collate_packed, collate_shared
from mdpo.data.pairs import TokenizedPair


def _folder(family: str, root):
    if family == "llama":
        tiny_hf_llama(seed=0, vocab_size=VOCAB, num_hidden_layers=2).save_pretrained(root / "hf")
        return root / "hf"
    return qwen_checkpoint(root / "hf") if family == "qwen" else baichuan_checkpoint(root / "hf")


def _oracle_logps(folder, model, pairs) -> torch.Tensor:
    """Each sequence [prompt | response] alone through the family's float64 forward; its response's log-prob."""
    sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    rows = [prompt + response for prompt, response in sequences]
    out = []
    for (prompt, _), row, logits in zip(sequences, rows, hf_logits(folder, model, rows), strict=True):
        logp = torch.log_softmax(logits.double().cpu(), dim=-1)
        out.append(sum(logp[t, row[t + 1]].item() for t in range(len(prompt) - 1, len(row) - 1)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("family", ["llama", "qwen", "baichuan13b"])
def test_every_layout_equals_the_float64_oracle(megatron_world, tmp_path, family):
    from mdpo.models.gpt import build_gpt_model, transformer_config
    from mdpo.training.step import Scorer

    folder = _folder(family, tmp_path)
    model = describe_model({"init_from": str(folder)})
    assert (model.position_embedding == "alibi") == (family == "baichuan13b") and model.qkv_bias == (family == "qwen")
    module = build_gpt_model(model, transformer_config(model), scoring=True)
    load_hf_weights(module, folder, model)
    module = module.eval()
    pairs = random_pairs()
    want = _oracle_logps(folder, model, pairs)
    scorer = Scorer(model, chunk_tokens=5, thd=False)
    for layout in LAYOUTS:
        batch = collate_as(layout, pairs)
        with torch.no_grad():
            got = scorer.stats(batch, module, scorer.forward(batch, module)).logps.double()
        assert torch.allclose(got, want, rtol=0, atol=1e-5), (layout, (got - want).abs().max().item())
    assert want[: len(pairs)].sub(want[len(pairs) :]).abs().max() > 0.1  # chosen and rejected really differ


def test_blocks_say_which_keys_each_query_sees():
    """Two pairs sharing their prompts, packed: the chosen block sees its prompt and itself causally; the rejected
    block sees its prompt and itself, never the chosen response; positions continue from the prompt's end; both
    responses' first tokens are scored from the prompt's last position."""
    pairs = [TokenizedPair(0, [1, 2], [3, 4], [5]), TokenizedPair(1, [6], [7], [8, 9])]
    batch = collate_packed(pairs, pad_id=0, budget=16, shared=True)
    assert batch.tokens.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2]]
    b = batch.blocks
    blocks = [(q.tolist(), k.tolist()) for q, k in zip(b.q_index.split(b.q_lengths), b.k_index.split(b.k_lengths))]
    assert blocks == [([0, 1, 2, 3], [0, 1, 2, 3]), ([4], [0, 1, 4]), ([5, 6], [5, 6]), ([7, 8], [5, 7, 8])]
    scores = sorted(zip(batch.score_index.tolist(), batch.score_labels.tolist(), batch.score_sequence.tolist()))
    # sequences: 0, 1 chosen of pairs 0, 1; 2, 3 their rejected
    assert scores == [(1, 3, 0), (1, 5, 2), (2, 4, 0), (5, 7, 1), (5, 8, 3), (7, 9, 3)]
    assert batch.num_input_tokens == (2 * 2 + 2 + 1) + (2 * 1 + 1 + 2)  # as TRL counts: each prompt twice
    assert batch.num_computed_tokens == 9 and batch.cu_seqlens is None
    padded = collate_shared(pairs, pad_id=0, multiple=4)  # one row per pair, rounded up to 8
    assert padded.tokens.tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 8, 9, 0, 0, 0, 0]]
    assert padded.num_slots == 16
