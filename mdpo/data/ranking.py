"""Ranked completions -> preference pairs: the `data.rank_pairs` rules, pure functions of a row's scores.

Scores are higher-better (ranks, 1 = best, enter as their negatives). A tie never makes a pair. The rules that need a
single best completion (every rule but ``all_pairs``) make no pair from a row whose best score is shared, and
``best_vs_worst`` none where the worst is shared: choosing one of the tied would be an arbitrary preference.

- ``all_pairs``: every two completions with different scores, the higher chosen (n(n-1)/2 less the ties);
- ``best_vs_worst``: the best against the worst (one pair);
- ``best_vs_rest``: the best against each other completion (n - 1 pairs);
- ``best_vs_random``: the best against one other drawn by `rng` (one pair), as UltraFeedback-binarized was made;
- ``ranking``: the completions best first, each against the next (n - 1 pairs): the stages of a whole ranking, as the
  ``plackett_luce`` loss takes it (a row with a tie anywhere makes none: a ranking needs a strict order).

`min_score_gap` then drops the pairs whose scores differ by less (counted; ``ranking`` takes none, as a ranking
is whole or nothing).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

Couple = tuple[int, int]  # (chosen, rejected) completion indices


@dataclass(frozen=True)
class Ranking:
    """What a rule makes of one row: its pairs, what it left out, and why no pair can come from it ("" if any can)."""

    pairs: tuple[Couple, ...] = ()
    ties: int = 0  # couples left out because their scores are equal
    below_gap: int = 0  # pairs dropped because their score gap is below min_score_gap
    no_pair: str = ""


def rank_pairs(
    scores: Sequence[float], rule: str, min_score_gap: float = 0.0, rng: random.Random | None = None
) -> Ranking:
    """The pairs `rule` makes of completions with these scores (`rng`: best_vs_random's draw)."""
    if len(scores) < 2:
        return Ranking(no_pair=f"{len(scores)} completion: a pair needs two")
    if len(set(scores)) == 1:
        return Ranking(no_pair="every completion has the same score")
    if rule == "all_pairs":
        couples = [(i, j) if scores[i] > scores[j] else (j, i) for i, j in _all_couples(len(scores))]
        kept = [(c, r) for c, r in couples if scores[c] != scores[r]]
        return _with_gap(scores, kept, len(couples) - len(kept), min_score_gap)
    if rule == "ranking":
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        if len(set(scores)) < len(scores):
            return Ranking(no_pair="tied scores: a ranking needs a strict order")
        return Ranking(tuple(zip(order, order[1:])))
    best = _single(scores, max(scores))
    if best is None:
        return Ranking(no_pair=f"the best score is shared by {scores.count(max(scores))} completions")
    others = [j for j in range(len(scores)) if j != best]
    if rule == "best_vs_rest":
        return _with_gap(scores, [(best, j) for j in others], 0, min_score_gap)
    if rule == "best_vs_random":
        if rng is None:
            raise ValueError("best_vs_random needs an rng")
        return _with_gap(scores, [(best, rng.choice(others))], 0, min_score_gap)
    if rule == "best_vs_worst":
        worst = _single(scores, min(scores))
        if worst is None:
            return Ranking(no_pair=f"the worst score is shared by {scores.count(min(scores))} completions")
        return _with_gap(scores, [(best, worst)], 0, min_score_gap)
    raise ValueError(f"unknown rank_pairs rule {rule!r}")


def _all_couples(n: int) -> list[Couple]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def _single(scores: Sequence[float], value: float) -> int | None:
    """The index of the one completion with this score, or None when several have it."""
    found = [i for i, s in enumerate(scores) if s == value]
    return found[0] if len(found) == 1 else None


def _with_gap(scores: Sequence[float], couples: list[Couple], ties: int, min_score_gap: float) -> Ranking:
    kept = tuple((c, r) for c, r in couples if scores[c] - scores[r] >= min_score_gap)
    below = len(couples) - len(kept)
    no_pair = "" if kept else f"every pair's score gap is below data.min_score_gap={min_score_gap:g}"
    return Ranking(kept, ties, below, no_pair)
