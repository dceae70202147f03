"""The minimal pair data path: JSONL rows, HH-RLHF prompt split, tokenization, collation and sampling."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import shared_path

from mdpo.data.batching import PairSampler, collate, rank_microbatches
from mdpo.data.pairs import TokenizedPair, TokenizeReport, read_pairs_jsonl, split_hh, tokenize_pairs
from mdpo.errors import DataError


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"})
BAD_ROWS = {
    "malformed JSON": "{not json",
    "expected a JSON object": "[1, 2]",
    "missing column 'rejected'": json.dumps({"prompt": "p", "chosen": "c"}),
    "'chosen' must be a string": json.dumps({"prompt": "p", "chosen": 3, "rejected": "r"}),
    "'rejected' is empty": json.dumps({"prompt": "p", "chosen": "c", "rejected": "  "}),
    "chosen and rejected are identical": json.dumps({"prompt": "p", "chosen": "c", "rejected": "c"}),
}


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_bad_row_is_an_error_naming_file_and_row(tmp_path, reason):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, BAD_ROWS[reason], GOOD])
    with pytest.raises(DataError) as err:
        read_pairs_jsonl(path)
    assert f"{path}:2: {reason}" in str(err.value)


def test_bad_rows_skipped_and_counted_when_asked(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, *BAD_ROWS.values(), GOOD])
    report = TokenizeReport()
    rows = read_pairs_jsonl(path, on_bad_row="skip", report=report)
    assert len(rows) == 2
    assert sum(report.counts.values()) == len(BAD_ROWS)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_pairs_jsonl(tmp_path / "nope.jsonl")


def test_hh_split_takes_the_shared_prefix_to_the_last_assistant_turn():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: like this"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: no"
    prompt, c, r = split_hh(chosen, rejected)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
    assert (c, r) == (" like this", " no")


def test_hh_file_reads_without_prompt_column(tmp_path):
    rows = read_pairs_jsonl(shared_path("data", "hh_helpful_base_test_500.jsonl"), on_bad_row="skip")
    assert len(rows) >= 490
    assert all(r["prompt"].endswith("\n\nAssistant:") for r in rows)


def test_tokenize_appends_eos_and_truncates_with_counts(llama2_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama2_tokenizer_dir)
    rows = [
        {"prompt": "Question: what is two plus two?", "chosen": " Four.", "rejected": " Five, I think."},
        {"prompt": "word " * 50, "chosen": " a", "rejected": " b"},
        {"prompt": "Hi", "chosen": " x" * 40, "rejected": " y"},
    ]
    report = TokenizeReport()
    pairs = tokenize_pairs(rows, tok, max_length=24, report=report)
    assert [p.index for p in pairs] == [0, 2]
    first = pairs[0]
    assert first.prompt == tok(rows[0]["prompt"])["input_ids"]
    assert first.chosen[-1] == tok.eos_token_id and first.rejected[-1] == tok.eos_token_id
    assert tok.decode(first.chosen[:-1]).strip() == "Four."
    assert len(pairs[1].prompt) + len(pairs[1].chosen) == 24
    assert report.counts == {"dropped: prompt >= max_length": 1, "truncated: chosen response": 1}


def test_collate_masks_exactly_the_response_labels():
    pairs = [TokenizedPair(0, [1, 2, 3], [4, 5], [6]), TokenizedPair(1, [7], [8, 9, 10], [11, 12])]
    batch = collate(pairs, pad_id=0)
    assert batch.tokens.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0], [1, 2, 3, 6, 0], [7, 11, 12, 0, 0]]
    # labels are the next tokens; the mask selects labels that are response tokens (EOS included upstream)
    picked = [batch.labels[i][batch.loss_mask[i].bool()].tolist() for i in range(4)]
    assert picked == [[4, 5], [8, 9, 10], [6], [11, 12]]
    assert batch.num_input_tokens == 5 + 4 + 4 + 3
    assert batch.attention_mask.shape == (1, 1, 5, 5) and bool(batch.attention_mask[0, 0, 0, 1])


def test_sampler_is_layout_independent_and_reshuffles_per_epoch():
    sampler = PairSampler(num_pairs=20, global_batch_size=8, seed=3)
    assert sampler.steps_per_epoch == 2
    step0 = sampler.global_batch(0)
    assert step0 == PairSampler(20, 8, 3).global_batch(0)
    assert sampler.global_batch(2) != step0  # epoch 2 has its own order
    by_dp = [i for r in range(2) for mb in rank_microbatches(step0, r, 2, 2) for i in mb]
    by_mb = [i for mb in rank_microbatches(step0, 0, 1, 8) for i in mb]
    assert sorted(by_dp) == sorted(by_mb) == sorted(step0)
    assert len(set(torch.tensor(sampler.global_batch(0) + sampler.global_batch(1)).tolist())) == 16


def test_too_few_pairs_for_a_batch():
    with pytest.raises(DataError, match="global_batch_size=8"):
        PairSampler(num_pairs=5, global_batch_size=8, seed=0)
