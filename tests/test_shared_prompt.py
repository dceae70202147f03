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


def entries(batch) -> list[tuple[int, int, int]]:
    """(flat position, label, sequence) of every scored token of every sequence."""
    index, labels = batch.score_index[batch.score_take].tolist(), batch.score_labels[batch.score_take].tolist()
    return list(zip(index, labels, batch.score_sequence.tolist()))


def block_list(batch) -> list[tuple[list[int], list[int]]]:
    b = batch.blocks
    return [(q.tolist(), k.tolist()) for q, k in zip(b.q_index.split(b.q_lengths), b.k_index.split(b.k_lengths))]


def test_blocks_say_which_keys_each_query_sees():
    """Two pairs sharing their prompts, packed: the chosen block sees its prompt and itself causally; the rejected
    block sees its prompt and itself, never the chosen response; positions continue from the prompt's end; both
    responses' first tokens are scored from the prompt's last position."""
    pairs = [TokenizedPair(0, [1, 2], [3, 4], [5]), TokenizedPair(1, [6], [7], [8, 9])]
    batch = collate_packed(pairs, pad_id=0, budget=16, shared=True)
    assert batch.tokens.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2]]
    assert block_list(batch) == [([0, 1, 2, 3], [0, 1, 2, 3]), ([4], [0, 1, 4]), ([5, 6], [5, 6]), ([7, 8], [5, 7, 8])]
    # sequences: 0, 1 chosen of pairs 0, 1; 2, 3 their rejected
    assert sorted(entries(batch)) == [(1, 3, 0), (1, 5, 2), (2, 4, 0), (5, 7, 1), (5, 8, 3), (7, 9, 3)]
    assert batch.num_input_tokens == (2 * 2 + 2 + 1) + (2 * 1 + 1 + 2)  # as TRL counts: each prompt twice
    assert batch.num_computed_tokens == 9 and batch.cu_seqlens is None
    padded = collate_shared(pairs, pad_id=0, multiple=4)  # one row per pair, rounded up to 8
    assert padded.tokens.tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 8, 9, 0, 0, 0, 0]]
    assert padded.num_slots == 16


def test_a_rows_pairs_make_one_prefix_tree():
    """A ranked row (prompt [1, 2]; completions A = [3, 4], B = [3, 5], C = [6]; pairs A > B, A > C, B > C) and a
    conversation (turn 0: [7] then [8] over [9]; turn 1: [7, 8, 10] then [11] over [12, 13]) packed with shared
    prompts: each completion and each shared prefix once (B's first token is A's), each branch attending to its
    prefix and itself with positions continuing from the prefix; every sequence scores its own response."""
    ranked = [([1, 2], [3, 4], [3, 5]), ([1, 2], [3, 4], [6]), ([1, 2], [3, 5], [6])]
    turns = [([7], [8], [9]), ([7, 8, 10], [11], [12, 13])]
    pairs = [TokenizedPair(k, *ids, row=0) for k, ids in enumerate(ranked)]
    pairs += [TokenizedPair(3 + k, *ids, row=1, turn=k) for k, ids in enumerate(turns)]
    batch = collate_packed(pairs, pad_id=0, budget=16, shared=True)
    assert batch.tokens.tolist() == [list(range(1, 14))]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 3, 2, 0, 1, 1, 2, 3, 3, 4]]
    assert block_list(batch) == [
        ([0, 1, 2, 3], [0, 1, 2, 3]),  # prompt + A
        ([4], [0, 1, 2, 4]),  # B past its shared first token
        ([5], [0, 1, 5]),  # C
        ([6, 7], [6, 7]),  # turn 0's prompt + chosen
        ([8], [6, 8]),  # turn 0's rejected
        ([9, 10], [6, 7, 9, 10]),  # turn 1's prompt past turn 0's, + chosen
        ([11, 12], [6, 7, 9, 11, 12]),  # turn 1's rejected
    ]
    a, b, c = [(1, 3), (2, 4)], [(1, 3), (2, 5)], [(1, 6)]
    responses = [a, a, b, [(6, 8)], [(9, 11)], b, c, c, [(6, 9)], [(9, 12), (11, 13)]]  # sequences 0-4, 5-9
    want = sorted((flat, label, sequence) for sequence, scored in enumerate(responses) for flat, label in scored)
    assert sorted(entries(batch)) == want
    assert sorted(zip(batch.score_index.tolist(), batch.score_labels.tolist())) == sorted({(f, t) for f, t, _ in want})
    # each position counted in each pair as TRL holds it (a pair's prompt twice); their sum is TRL's token count
    assert batch.pair_weights[0, :6, :3].t().tolist() == [[2, 2, 2, 1, 1, 0], [2, 2, 1, 1, 0, 1], [2, 2, 1, 0, 1, 1]]
    assert batch.token_weights.sum() == batch.num_input_tokens == 22 + (2 + 1 + 1) + (6 + 1 + 2)
    assert batch.num_computed_tokens == 13
    padded = collate_shared(pairs, pad_id=0)  # a row per tree
    assert padded.tokens.tolist() == [[1, 2, 3, 4, 5, 6, 0], [7, 8, 9, 10, 11, 12, 13]]
