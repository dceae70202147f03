"""The offline demo's tokenizer and echo preference task."""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mdpo.data.synthetic import build_demo_tokenizer, echo_pairs, make_demo_data, write_jsonl
from mdpo.errors import ConfigError

PROMPT_RE = re.compile(r"^(\d{5})=$")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo_tok")
    build_demo_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return build_demo_tokenizer(tok_dir / "again")


TEXTS = ["12+7=", "19", "3-11=", "0", "What is 3 + 4?\nAnswer: 7", "a  b", ""]


def test_tokenizer_basics(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) < 128
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")


@pytest.mark.parametrize("text", TEXTS + [r["prompt"] + r["chosen"] for r in echo_pairs(20, 3)])
def test_round_trip_bos_first_no_eos(tok, text):
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.eos_token_id not in ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok(text, add_special_tokens=False)["input_ids"] == ids[1:]


def test_digits_are_single_tokens(tok):
    # Per-digit tokens are what make copying learnable position by position.
    assert len(tok("12+7=19", add_special_tokens=False)["input_ids"]) == 7


def test_unknown_chars_map_to_unk(tok):
    ids = tok("1é+2€=\t")["input_ids"]
    assert ids.count(tok.unk_token_id) == 3
    assert tok.decode(ids, skip_special_tokens=True) == "1+2="


def test_reload_identical(tok, tok_dir):
    reloaded = AutoTokenizer.from_pretrained(str(tok_dir))
    assert reloaded.get_vocab() == tok.get_vocab()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(reloaded, attr) == getattr(tok, attr)
    for text in TEXTS + ["1é+2€="]:
        assert reloaded(text)["input_ids"] == tok(text)["input_ids"]


def test_pairs_deterministic_and_differ_in_exactly_one_digit():
    rows = echo_pairs(500, seed=7)
    assert rows == echo_pairs(500, seed=7)
    assert rows != echo_pairs(500, seed=8)
    assert len({r["prompt"] for r in rows}) == 500
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected"}
        assert r["chosen"] == PROMPT_RE.match(r["prompt"])[1]
        assert re.fullmatch(r"\d{5}", r["rejected"])
        assert sum(a != b for a, b in zip(r["chosen"], r["rejected"])) == 1


def test_exclusion_and_impossible_requests():
    taken = frozenset(r["chosen"] for r in echo_pairs(100, seed=1, length=2))
    assert not {r["chosen"] for r in echo_pairs(0, seed=2, length=2, exclude=taken)}
    with pytest.raises(ConfigError):
        echo_pairs(1, seed=2, length=2, exclude=taken)


def test_write_jsonl(tmp_path):
    rows = echo_pairs(3, 0)
    p = write_jsonl(rows, tmp_path / "sub" / "x.jsonl")
    assert [json.loads(line) for line in p.read_text().splitlines()] == rows


def test_make_demo_data_disjoint_and_deterministic(tmp_path):
    train, evl = make_demo_data(tmp_path / "a", n_train=300, n_eval=50, seed=3)
    assert (train.name, evl.name) == ("train.jsonl", "eval.jsonl")
    tr = [json.loads(line) for line in train.read_text().splitlines()]
    ev = [json.loads(line) for line in evl.read_text().splitlines()]
    assert (len(tr), len(ev)) == (300, 50)
    eval_prompts = {r["prompt"] for r in ev}
    assert len(eval_prompts) == 50
    assert not eval_prompts & {r["prompt"] for r in tr}
    for r in tr + ev:
        assert r["prompt"] == r["chosen"] + "=" and r["chosen"] != r["rejected"]

    train2, eval2 = make_demo_data(tmp_path / "b", n_train=300, n_eval=50, seed=3)
    assert train2.read_text() == train.read_text() and eval2.read_text() == evl.read_text()
