"""`mdpo data stats` on the shared UltraFeedback sample, and its pure helpers."""

from __future__ import annotations

import argparse
import collections
import json

import pytest
from conftest import shared_path

from mdpo.data.encoding import load_tokenizer
from mdpo.data.packing import pair_lengths
from mdpo.data.pairs import TokenizedPair, TokenizeReport, load_pairs
from mdpo.data.stats import add_arguments, data_config, data_stats, format_stats, main, padding_waste, percentiles


def parse(argv):
    return add_arguments(argparse.ArgumentParser()).parse_args(argv)


@pytest.fixture(scope="module")
def uf_args(tmp_path_factory):
    data = shared_path("data", "ultrafeedback_binarized_sample_200.jsonl")
    tokenizer = shared_path("tokenizers", "llama2")
    cache = tmp_path_factory.mktemp("cache")
    return [
        "--data",
        str(data),
        "--tokenizer",
        str(tokenizer),
        "--template",
        "tulu2",
        "--max-length",
        "4096",
        "--cache-dir",
        str(cache),
    ]


@pytest.fixture(scope="module")
def uf_stats(uf_args):
    import datasets

    datasets.disable_progress_bars()
    return data_stats(parse([*uf_args, "--show", "0", "--show", "100000"]))


def test_counts_and_lengths_on_the_ultrafeedback_sample(uf_stats):
    assert (uf_stats["rows"], uf_stats["pairs"], uf_stats["skipped"], uf_stats["dropped"]) == (200, 200, 0, 0)
    assert (uf_stats["format"], uf_stats["template"], uf_stats["truncated"]) == ("ultrafeedback", "tulu2", 0)
    lengths = uf_stats["lengths"]
    for name in ("prompt", "chosen", "rejected", "pair"):
        q = lengths[name]
        assert 0 < q["p50"] <= q["p90"] <= q["p99"] <= q["max"], name
    # the longest UltraFeedback prompt is 6,308 characters: over a thousand tokens
    assert lengths["prompt"]["max"] > 1000 and lengths["pair"]["max"] <= 2 * 4096


def test_packing_beats_dynamic_padding_on_the_sample(uf_stats):
    pad1, pad4 = uf_stats["padding"]["1"]["waste"], uf_stats["padding"]["4"]["waste"]
    assert 0 < pad1 < pad4
    assert 0.4 < pad4 < 0.65  # about half of a micro-batch of 4 pairs is padding
    packing = uf_stats["packing"]
    assert packing["budget"] == 8192 and packing["efficiency"] > 0.9


def distinct_prefixes(pairs) -> int:
    """Tokens of one prefix tree per input row counted as a trie holds them: its sequences' distinct prefixes."""
    by_row = collections.defaultdict(set)
    for pair in pairs:
        for response in (pair.chosen, pair.rejected):
            ids = tuple(pair.prompt + response)
            by_row[pair.row].update(ids[:n] for n in range(1, len(ids) + 1))
    return sum(map(len, by_row.values()))


def test_shared_prompt_removes_each_prompt_once(uf_stats):
    share, prompts = uf_stats["shared_prompt"], uf_stats["lengths"]["prompt"]
    # each prompt once, and the first tokens a pair's two responses share (a prefix tree)
    assert share["tokens"] - share["shared_tokens"] >= round(prompts["mean"] * uf_stats["pairs"])
    assert share["removed"] == pytest.approx(1 - share["shared_tokens"] / share["tokens"])
    assert share["packs"] < uf_stats["packing"]["packs"] and share["efficiency"] > 0.9


def test_show_marks_exactly_the_trained_tokens(uf_stats):
    shown, missing = uf_stats["show"]
    prompt, _, rest = shown["chosen"].partition("[[")
    assert prompt == "<|user|>\nhow to cook t-bone in the oven\n<|assistant|>\n"
    assert rest.startswith("To cook a delicious T-bone steak") and rest.endswith("</s>]]")
    assert shown["rejected"].startswith(prompt + "[[") and shown["prompt_tokens"] > 0
    assert "not a usable pair" in missing["error"]


def test_main_prints_json_and_cli_errors_exit_2(uf_args, capsys):
    assert main([*uf_args, "--json", "--micro-batch-sizes", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["cache"] == "hit" and list(printed["padding"]) == ["2"]
    assert main(["--data", "x.jsonl"]) == 2
    assert "needs a CONFIG.yaml" in capsys.readouterr().err
    assert main([*uf_args, "--template", "chatml"]) == 2


def test_counts_of_a_ranked_file_by_hand(tmp_path):
    """all_pairs with min_score_gap 1 on five ranked rows, counted by hand: [4, 2, 5, 2] makes 5 pairs (the two 2s
    tie); [3, 3, 1] 2 (a tie); [2, 2] none (the row is dropped); [5, 4.5, 1] 2 (5 vs 4.5 is below the gap);
    [1, 3, 2, 4] 6. Rows 5, pairs 15, ties 2, dropped 2 (a row and a pair)."""
    scores = [[4, 2, 5, 2], [3, 3, 1], [2, 2], [5, 4.5, 1], [1, 3, 2, 4]]
    rows = [
        {"prompt": f"Question {n}?", "completions": [f"Answer {n}.{k}" for k in range(len(s))], "scores": s}
        for n, s in enumerate(scores)
    ]
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = shared_path("tokenizers", "llama3")
    args = ["--data", str(path), "--tokenizer", str(tokenizer), "--no-cache", "--min-score-gap", "1"]
    stats = data_stats(parse([*args, "--rank-pairs", "all_pairs"]))
    assert stats["format"] == "ranked" and stats["template"] == "tokenizer"
    assert (stats["rows"], stats["pairs"], stats["ties"], stats["skipped"], stats["dropped"]) == (5, 15, 2, 0, 2)
    assert stats["reasons"] == {
        "dropped: no pair left: every completion has the same score": 1,
        "dropped: score gap < data.min_score_gap": 1,
        "tied: equal scores": 2,
    }
    assert "rows: 5, pairs: 15, ties: 2, skipped: 0, dropped: 2, truncated: 0" in format_stats(stats)
    # one forward per prompt: each row one prefix tree, as many tokens as a trie of its sequences holds
    data, path = data_config(parse([*args, "--rank-pairs", "all_pairs"]))
    pairs = load_pairs(data, path, load_tokenizer(data.tokenizer), TokenizeReport())
    share = stats["shared_prompt"]
    assert share["tokens"] == sum(pair_lengths(pairs)) and share["shared_tokens"] == distinct_prefixes(pairs)
    assert share["shared_tokens"] < 0.4 * share["tokens"]
    # best_vs_worst: [4, 2, 5, 2] has two worst, [3, 3, 1] two best, [2, 2] all tied: 2 pairs from 5 rows
    worst = data_stats(parse([*args, "--rank-pairs", "best_vs_worst"]))
    assert (worst["rows"], worst["pairs"], worst["ties"], worst["dropped"]) == (5, 2, 0, 3)


def test_percentiles_are_nearest_rank():
    q = percentiles(list(range(1, 101)))
    assert (q["p50"], q["p90"], q["p99"], q["max"], q["mean"]) == (50, 90, 99, 100, 50.5)
    assert percentiles([])["max"] == 0


def test_padding_waste_by_hand():
    pairs = [TokenizedPair(0, [1], [2, 3, 4], [5]), TokenizedPair(1, [1, 1], [2], [3])]
    # micro-batch 1: pair 0 pads (4, 2) to 4 -> 2 of 8; pair 1 is (3, 3) -> 0 of 6
    assert padding_waste(pairs, 1) == {"real_tokens": 12, "padded_tokens": 14, "waste": pytest.approx(2 / 14)}
    # micro-batch 2: four sequences padded to 4
    assert padding_waste(pairs, 2)["waste"] == pytest.approx(1 - 12 / 16)
