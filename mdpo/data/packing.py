"""Packing whole preference pairs into fixed token budgets (first-fit decreasing), as pure functions.

A pair is packed whole (its chosen and its rejected sequence, each with the prompt), so one loss call still sees
both log-probs of every pair: its length is len(prompt) + len(chosen) + len(prompt) + len(rejected). With a shared
prompt (`data.share_prompt`) the packed unit is a tree of one row's pairs, of `data.trees.tree_length`.

A pair longer than the budget is an error (ValueError naming it), not a bin of its own: a pack over budget would
break fixed-shape buffers at run time; the data path's max_length (budget >= 2 x max_length always fits) or
data.over_length=drop is the place to bound pair lengths.
"""

from __future__ import annotations

from collections.abc import Sequence


def pair_length(prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int]) -> int:
    """Tokens a pair takes in a pack: both sequences, each with its own copy of the prompt."""
    return 2 * len(prompt) + len(chosen) + len(rejected)


def pair_lengths(pairs: Sequence) -> list[int]:
    """Pack lengths of TokenizedPair-like objects (prompt, chosen, rejected id lists)."""
    return [pair_length(p.prompt, p.chosen, p.rejected) for p in pairs]


def pack_pairs(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bins of pair positions, each bin's total <= budget, by first-fit decreasing.

    Deterministic: pairs are placed longest first (ties by position) into the first bin with room; bins are in
    the order they were opened. A segment tree over bins' free space finds that bin in O(log n), so a million
    pairs pack in seconds."""
    if budget <= 0:
        raise ValueError(f"packing budget must be > 0, got {budget}")
    for i, n in enumerate(lengths):
        if n < 0 or n > budget:
            raise ValueError(f"pair {i} has {n} tokens; a pack holds 0..{budget} (raise the budget or cut pairs)")
    size = 1
    while size < len(lengths):
        size *= 2
    free = [budget] * (2 * size)  # leaves size..2*size-1: free tokens of bin k (unopened bins are empty)
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        node = 1
        while node < size:  # descend to the leftmost bin with room
            node = 2 * node if free[2 * node] >= lengths[i] else 2 * node + 1
        k = node - size
        if k == len(bins):
            bins.append([])
        bins[k].append(i)
        free[node] -= lengths[i]
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def packing_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], budget: int) -> float:
    """Real tokens / (bins x budget): the share of packed compute that is not padding (0.0 for no bins)."""
    if not bins:
        return 0.0
    return sum(lengths[i] for b in bins for i in b) / (len(bins) * budget)
