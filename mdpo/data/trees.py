"""One forward per prompt: the sequences of an input row's pairs (a ranked row's completions behind one prompt, a
conversation's turns with each rejected branch behind its own prefix) laid out as one prefix tree, as pure functions.

Each sequence joins the earlier one it shares the longest token prefix with and adds only its tokens past that
prefix. Under causal attention a token's hidden state depends only on the tokens before it at their positions, so a
prefix computed once serves every sequence that shares it exactly (`data.batching` gives each branch a block that
attends to its prefix and to itself, its positions continuing from the prefix). The pairs of one row are consecutive
in a micro-batch wherever the sampler did not cut them apart; each such run is one tree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """The length of the longest common prefix of two id arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def prefix_tree(sequences: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Where each sequence joins the ones before it: (the earlier sequence it shares the longest prefix with, the
    earliest of those on a tie, -1 for the first; that prefix's length). A repeated sequence joins its first copy
    whole (it adds nothing)."""
    arrays = [np.asarray(ids, dtype=np.int64) for ids in sequences]
    first: dict[tuple[int, ...], int] = {}
    joins = []
    for i, ids in enumerate(sequences):
        key = tuple(ids)
        if key in first:
            joins.append((first[key], len(ids)))
            continue
        best = (-1, 0)
        for j in first.values():
            shared = common_prefix(arrays[i], arrays[j])
            if shared > best[1]:
                best = (j, shared)
        first[key] = i
        joins.append(best)
    return joins


def pair_sequences(pairs: Sequence) -> list[list[int]]:
    """Each pair's chosen then rejected sequence, prompt included, pair by pair: a tree's sequences in its order."""
    return [pair.prompt + response for pair in pairs for response in (pair.chosen, pair.rejected)]


def tree_length(pairs: Sequence) -> int:
    """Tokens the pairs take as one tree: every sequence's tokens past the prefix it shares."""
    sequences = pair_sequences(pairs)
    return sum(len(ids) - shared for ids, (_, shared) in zip(sequences, prefix_tree(sequences)))


def trees_length(pairs: Sequence) -> int:
    """Tokens the pairs take as trees, one per run of one row's pairs (`row_runs`)."""
    return sum(tree_length([pairs[k] for k in run]) for run in row_runs(pairs))


def row_runs(pairs: Sequence) -> list[range]:
    """The runs of consecutive pairs from one input row (TokenizedPair.row), in order: the trees of a micro-batch."""
    runs, start = [], 0
    for k in range(1, len(pairs) + 1):
        if k == len(pairs) or pairs[k].row != pairs[start].row:
            runs.append(range(start, k))
            start = k
    return runs
