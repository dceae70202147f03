"""pack_pairs: first-fit decreasing over whole pairs, checked against a direct O(n^2) first-fit."""

from __future__ import annotations

import random

import pytest

from mdpo.data.packing import pack_pairs, packing_efficiency, pair_length, pair_lengths
from mdpo.data.pairs import TokenizedPair


def first_fit_decreasing(lengths, budget):
    """The textbook algorithm, scanning every open bin: the oracle for the segment-tree version."""
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = next((k for k, room in enumerate(free) if room >= lengths[i]), len(bins))
        if k == len(bins):
            bins.append([])
            free.append(budget)
        bins[k].append(i)
        free[k] -= lengths[i]
    return bins


def test_small_example_by_hand():
    # 5 -> bin 0; 4 -> bin 1; 3 -> bin 0 (full); 3 -> bin 1; 2 -> bin 2; 1 -> bin 1 (full)
    assert pack_pairs([5, 4, 3, 3, 2, 1], budget=8) == [[0, 2], [1, 3, 5], [4]]
    assert packing_efficiency([5, 4, 3, 3, 2, 1], [[0, 2], [1, 3, 5], [4]], 8) == pytest.approx(18 / 24)


@pytest.mark.parametrize("seed", range(5))
def test_every_pair_once_no_bin_over_budget_same_as_the_oracle(seed):
    rng = random.Random(seed)
    budget = rng.choice([64, 100, 4096])
    lengths = [rng.randint(1, budget) if rng.random() < 0.3 else rng.randint(1, budget // 4) for _ in range(300)]
    bins = pack_pairs(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)
    assert bins == first_fit_decreasing(lengths, budget)
    assert bins == pack_pairs(list(lengths), budget)  # deterministic


def test_edges_and_errors():
    assert pack_pairs([], 10) == [] and packing_efficiency([], [], 10) == 0.0
    assert pack_pairs([10], 10) == [[0]]
    with pytest.raises(ValueError, match="pair 1 has 11 tokens"):
        pack_pairs([3, 11], 10)
    with pytest.raises(ValueError, match="budget must be > 0"):
        pack_pairs([1], 0)


def test_pair_length_counts_the_prompt_twice():
    pair = TokenizedPair(0, [1, 2, 3], [4, 5], [6])
    assert pair_length(pair.prompt, pair.chosen, pair.rejected) == 3 + 2 + 3 + 1
    assert pair_lengths([pair, pair]) == [9, 9]
