"""Global batches of pairs, split over data-parallel ranks and micro-batches: padded rows or packs, each pair's
prompt once (shared) or in both of its sequences.

A micro-batch of m pairs holds 2m sequences; sequence k < m is pair k's chosen response, sequence m + k its
rejected one, so a pair never straddles micro-batches, DP ranks or pipeline stages. Four layouts:

- padded: each sequence [prompt | response] is a row, right-padded to the longest; plain causal attention.
- packed: all 2m sequences in one row, each attending only to itself (`blocks`; THD kernels take `cu_seqlens`).
- shared (padded): each run of one input row's pairs is one row, a prefix tree (`data.trees`): a pair alone is
  [prompt | chosen | rejected], the rejected tokens' positions continuing from the prompt's end, as in their own
  sequence; chosen attends to prompt + chosen, rejected to prompt + rejected and never to chosen (`blocks`), and
  both responses' first tokens are scored from the prompt's last position. A ranked row's pairs share one prompt
  and each completion appears once however many pairs it is in; a conversation's turns share their history.
- shared and packed: those trees one after another in one row.

What is scored is explicit: `score_index` (flat positions, row * length + column) and `score_labels` (the token
predicted there), each (position, token) once, and per use of one by a sequence an entry: `score_take` (which
score), `score_sequence` (which of the 2m sequences it adds to) and `score_tail` (the token lies past the pair's
shorter response: LD-DPO weights it by `dpo.ld_alpha`). Everything is built here, on the host, so the step needs
no device sync.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mdpo.blocks import Blocks
from mdpo.data.packing import pack_pairs, pair_lengths
from mdpo.data.pairs import TokenizedPair
from mdpo.data.trees import pair_sequences, prefix_tree, row_runs, tree_length, trees_length
from mdpo.errors import DataError


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [rows, length] input ids
    position_ids: torch.Tensor  # [rows, length]
    score_index: torch.Tensor  # [u] flat positions whose next-token log-prob is scored
    score_labels: torch.Tensor  # [u] the token scored there
    score_take: torch.Tensor  # [n] the score (0..u-1) each entry takes
    score_sequence: torch.Tensor  # [n] the sequence (0..2m-1) the entry adds to
    score_tail: torch.Tensor  # [n] bool: the entry's token lies past the pair's shorter response (LD-DPO's tail)
    pair_ids: list[int]  # dataset indices, for error messages
    pair_turns: list[int] = dataclasses.field(default_factory=list)  # each pair's turn position in its row
    # [m] each pair's ranking (`ranking_units`): pairs with one value are the stages of one ranking (plackett_luce)
    pair_rankings: torch.Tensor | None = None
    num_input_tokens: int = 0  # as TRL counts them: every sequence's real tokens, its prompt included
    num_computed_tokens: int = 0  # real tokens the rows hold (a shared prefix once)
    num_slots: int = 0  # token slots this micro-batch takes: rows x padded length, or the pack budget
    blocks: Blocks | None = None  # None: plain causal rows
    cu_seqlens: torch.Tensor | None = None  # packed, unshared: int32 sequence boundaries, for THD attention kernels
    max_seqlen: int = 0  # packed: the longest sequence (THD kernels take it from the host)
    # [rows, length, m] each position's count among the tokens of each pair's two sequences, as TRL's batch would
    # hold them (a pair's prompt 2, its responses 1, padding 0): MoE load balancing is per pair; and its sum over
    # the pairs [rows, length] (sums to num_input_tokens; 0 marks padding)
    pair_weights: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None
    echo: bool = False  # a repeat that only keeps an expert-parallel group's forwards in step: results not counted

    @property
    def num_pairs(self) -> int:
        return len(self.pair_ids)

    def to(self, device: torch.device | str) -> MicroBatch:
        for name in (
            "tokens",
            "position_ids",
            "score_index",
            "score_labels",
            "score_take",
            "score_sequence",
            "score_tail",
            "pair_rankings",
            "cu_seqlens",
            "pair_weights",
            "token_weights",
        ):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        if self.blocks is not None:
            self.blocks = self.blocks.to(device)
        return self


class _Rows:
    """Builds a micro-batch's rows: token ids, position ids, scores and attention blocks, sequence by sequence."""

    def __init__(self, rows: int, length: int, pad_id: int, pairs: int) -> None:
        self.length, self.num_pairs = length, pairs
        self.tokens = torch.full((rows, length), pad_id, dtype=torch.long)
        self.positions = torch.arange(length).repeat(rows, 1)  # padding keeps its index (CP slices RoPE by it)
        self.pair_weights = torch.zeros(rows * length, pairs)  # see MicroBatch.pair_weights
        self.scores: dict[tuple[int, int], int] = {}  # (flat position, label) -> its place in score_index
        self.entries: list[tuple[int, int, bool]] = []  # (score, sequence, past the shorter response)
        self.blocks: list[tuple[list[int], list[int]]] = []  # (query flat positions, key flat positions)

    def _place(self, row: int, start: int, ids: list[int], first_position: int) -> list[int]:
        self.tokens[row, start : start + len(ids)] = torch.tensor(ids)
        self.positions[row, start : start + len(ids)] = torch.arange(first_position, first_position + len(ids))
        base = row * self.length + start
        return list(range(base, base + len(ids)))

    def _score(self, path: list[int], ids: list[int], prompt: int, sequence: int, shorter: int) -> None:
        """Sequence `sequence` = `ids` on the flat positions `path`: its tokens past the prompt scored (each from the
        position before it; those past `shorter`, the pair's shorter response length, marked as tail), and every
        position counted for its pair."""
        for t, token in enumerate(ids[prompt:]):
            score = self.scores.setdefault((path[prompt - 1 + t], token), len(self.scores))
            self.entries.append((score, sequence, t >= shorter))
        self.pair_weights[path, sequence % self.num_pairs] += 1.0

    def sequence(
        self, row: int, start: int, prompt: list[int], response: list[int], sequence: int, shorter: int
    ) -> int:
        """[prompt | response] at `start`, one square causal block; returns its end."""
        ids = prompt + response
        flat = self._place(row, start, ids, 0)
        self._score(flat, ids, len(prompt), sequence, shorter)
        self.blocks.append((flat, flat))
        return start + len(ids)

    def tree(self, row: int, start: int, pairs: Sequence[TokenizedPair], first: int) -> int:
        """The pairs of one input row (pair k the micro-batch's pair `first` + k) at `start` as one prefix tree
        (`prefix_tree`): each sequence adds only its tokens past the longest prefix it shares with an earlier one,
        positions continuing from that prefix, in a block attending to the prefix and itself; returns its end."""
        every = pair_sequences(pairs)
        paths: list[list[int]] = []
        for n, (ids, (parent, shared)) in enumerate(zip(every, prefix_tree(every))):
            path = paths[parent][:shared] if parent >= 0 else []
            if shared < len(ids):
                new = self._place(row, start, ids[shared:], shared)
                self.blocks.append((new, path + new))
                path, start = path + new, start + len(new)
            paths.append(path)
            pair = pairs[n // 2]
            sequence = first + n // 2 + (self.num_pairs if n % 2 else 0)
            self._score(path, ids, len(pair.prompt), sequence, _shorter(pair))
        return start

    def batch(self, pairs: Sequence[TokenizedPair], *, with_blocks: bool, **fields: object) -> MicroBatch:
        (positions, labels), (takes, sequences, tails) = zip(*self.scores), zip(*self.entries)
        long = lambda column: torch.tensor(column, dtype=torch.long)
        blocks = None
        if with_blocks:
            queries, keys = zip(*self.blocks)
            flat_positions = self.positions.reshape(-1)
            q_index = torch.tensor([i for q in queries for i in q], dtype=torch.long)
            k_index = torch.tensor([i for k in keys for i in k], dtype=torch.long)
            offsets = lambda lengths: torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
            q_lengths, k_lengths = tuple(map(len, queries)), tuple(map(len, keys))
            blocks = Blocks(
                q_index,
                k_index,
                offsets(q_lengths),
                offsets(k_lengths),
                flat_positions[q_index],
                flat_positions[k_index],
                q_lengths,
                k_lengths,
            )
        pair_weights = self.pair_weights.view(*self.tokens.shape, self.num_pairs)
        return MicroBatch(
            tokens=self.tokens,
            position_ids=self.positions,
            score_index=long(positions),
            score_labels=long(labels),
            score_take=long(takes),
            score_sequence=long(sequences),
            score_tail=torch.tensor(tails, dtype=torch.bool),
            pair_ids=[p.index for p in pairs],
            pair_turns=[p.turn for p in pairs],
            pair_rankings=torch.tensor(ranking_units(pairs), dtype=torch.long),
            num_input_tokens=sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs),
            blocks=blocks,
            token_weights=pair_weights.sum(-1),
            pair_weights=pair_weights,
            **fields,
        )


def _shorter(pair: TokenizedPair) -> int:
    return min(len(pair.chosen), len(pair.rejected))


def _rounded(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def collate(pairs: Sequence[TokenizedPair], pad_id: int, multiple: int = 1) -> MicroBatch:
    """Each sequence a row, right-padded to the longest (rounded up to `multiple`: sequence parallelism splits the
    sequence over TP ranks, context parallelism into 2 x CP chunks); padding only ever follows real tokens, so the
    causal mask alone keeps it out of every real token's attention."""
    m = len(pairs)
    sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    length = _rounded(max(len(prompt) + len(response) for prompt, response in sequences), multiple)
    rows = _Rows(2 * m, length, pad_id, m)
    for k, (prompt, response) in enumerate(sequences):
        rows.sequence(k, 0, prompt, response, k, _shorter(pairs[k % m]))
    computed = sum(len(prompt) + len(response) for prompt, response in sequences)
    return rows.batch(pairs, with_blocks=False, num_computed_tokens=computed, num_slots=2 * m * length)


def collate_shared(pairs: Sequence[TokenizedPair], pad_id: int, multiple: int = 1) -> MicroBatch:
    """Each run of one input row's pairs a row, laid out as a prefix tree (`_Rows.tree`; a pair alone is
    [prompt | chosen | rejected]), right-padded to the longest (rounded up to `multiple`)."""
    runs = row_runs(pairs)
    length = _rounded(max(tree_length([pairs[k] for k in run]) for run in runs), multiple)
    rows = _Rows(len(runs), length, pad_id, len(pairs))
    computed = sum(rows.tree(n, 0, [pairs[k] for k in run], run.start) for n, run in enumerate(runs))
    return rows.batch(pairs, with_blocks=True, num_computed_tokens=computed, num_slots=len(runs) * length)


def collate_packed(
    pairs: Sequence[TokenizedPair], pad_id: int, budget: int, multiple: int = 1, shared: bool = False
) -> MicroBatch:
    """All of the pairs in one row, pair by pair (chosen then rejected; or, `shared`, each run of one input row's
    pairs as a prefix tree). Only when the row must be a multiple of `multiple` (sequence parallelism) is it padded;
    the padding attends nothing and is never scored (for THD kernels it joins the last sequence)."""
    m = len(pairs)
    real = trees_length(pairs) if shared else sum(pair_lengths(pairs))
    if real > budget:
        raise ValueError(f"pairs take {real} tokens, more than the pack budget {budget}")
    total = _rounded(real, multiple)
    rows = _Rows(1, total, pad_id, m)
    end, boundaries = 0, [0]
    if shared:
        for run in row_runs(pairs):
            end = rows.tree(0, end, [pairs[k] for k in run], run.start)
    else:
        for k, pair in enumerate(pairs):
            end = rows.sequence(0, end, pair.prompt, pair.chosen, k, _shorter(pair))
            boundaries.append(end)
            end = rows.sequence(0, end, pair.prompt, pair.rejected, m + k, _shorter(pair))
            boundaries.append(end)
    if total > real:  # the padding continues the last sequence's positions (THD kernels count it in that one)
        last = int(rows.positions[0, real - 1])
        rows.positions[0, real:] = torch.arange(last + 1, last + 1 + total - real)
    fields: dict[str, object] = {"num_computed_tokens": real, "num_slots": max(budget, total)}
    if not shared:  # THD kernels: one sequence per boundary (the padding joins the last)
        boundaries[-1] = total
        fields["cu_seqlens"] = torch.tensor(boundaries, dtype=torch.int32)
        fields["max_seqlen"] = max(b - a for a, b in zip(boundaries, boundaries[1:]))
    return rows.batch(pairs, with_blocks=True, **fields)


def context_parallel_share(batch: MicroBatch, cp: int, rank: int) -> MicroBatch:
    """This context-parallel rank's part of a padded micro-batch (length a multiple of 2 x cp): every row cut into
    2 x cp chunks, of which the rank keeps chunks `rank` and `2cp - 1 - rank` (Megatron's layout: causal attention
    work is balanced, and its RoPE slices positions the same way). Scores stay with the positions they are taken
    at, and the token counts stay the whole micro-batch's, for the metrics."""
    if cp == 1:
        return batch
    rows, length = batch.tokens.shape
    chunk = length // (2 * cp)
    if batch.blocks is not None or chunk * 2 * cp != length:
        raise ValueError(f"context parallelism takes padded rows of a multiple of {2 * cp} tokens, got {length}")
    early = torch.arange(rank * chunk, (rank + 1) * chunk)
    keep = torch.cat([early, length - 1 - early.flip(0)])  # chunk 2cp - 1 - rank
    local = torch.full((length,), -1, dtype=torch.long)
    local[keep] = torch.arange(keep.numel())
    row, column = batch.score_index // length, batch.score_index % length
    mine = local[column] >= 0
    taken = mine[batch.score_take]  # the entries whose score this rank takes
    renumbered = mine.long().cumsum(0) - 1
    return dataclasses.replace(
        batch,
        tokens=batch.tokens[:, keep],
        position_ids=batch.position_ids[:, keep],
        score_index=row[mine] * keep.numel() + local[column[mine]],
        score_labels=batch.score_labels[mine],
        score_take=renumbered[batch.score_take[taken]],
        score_sequence=batch.score_sequence[taken],
        score_tail=batch.score_tail[taken],
        pair_weights=None if batch.pair_weights is None else batch.pair_weights[:, keep],
        token_weights=None if batch.token_weights is None else batch.token_weights[:, keep],
    )


class PairSampler:
    """Seeded per-epoch shuffle of input rows; step k's global batch is fixed by (seed, k) whatever the DP layout.

    The rows are shuffled and each row's pairs follow one another in the epoch's order (a ranked row's pairs, a
    conversation's turns: `TokenizedPair.row`), so that they meet in one micro-batch and share one forward
    (`data.trees`); a cut between global batches, DP ranks' shares or micro-batches may fall inside a row, whose
    parts then each compute its prompt. The global batch (counted in pairs) is cut into DP-rank shares, each cut
    into micro-batches: the same pairs make up a step for any micro-batch size or DP size. A trailing partial
    global batch of an epoch is not used. With one pair per row this is a shuffle of the pairs.

    With `units` (each pair's ranking, `ranking_units`: plackett_luce's) no cut falls inside a ranking: each cut at
    k x global_batch_size pairs moves forward to the next ranking's start, so a step holds whole rankings and about
    global_batch_size pairs (within a ranking's length), and an epoch as many steps; `shares` (DP ranks) then each
    get whole rankings too, which needs no ranking longer than a share.
    """

    def __init__(
        self,
        rows: Sequence[int],
        global_batch_size: int,
        seed: int,
        units: Sequence[int] | None = None,
        shares: int = 1,
    ) -> None:
        if len(rows) < global_batch_size:
            raise DataError(
                f"{len(rows)} usable pairs are fewer than one global batch (schedule.global_batch_size="
                f"{global_batch_size})"
            )
        groups: dict[int, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(row, []).append(index)
        self.groups = list(groups.values())
        self.units = units
        if units is not None:
            unit, longest = Counter(units).most_common(1)[0]
            if longest > global_batch_size // shares:
                first = list(units).index(unit)
                raise DataError(
                    f"pair {first}'s ranking has {longest} pairs, more than a data-parallel rank's share of a global "
                    f"batch (schedule.global_batch_size / DP = {global_batch_size // shares}): plackett_luce takes "
                    "a ranking whole on one rank; raise schedule.global_batch_size"
                )
        self.num_pairs = len(rows)
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.steps_per_epoch = self.num_pairs // global_batch_size

    def global_batch(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        shuffled = torch.randperm(len(self.groups), generator=torch.Generator().manual_seed(self.seed + epoch))
        order = [index for g in shuffled.tolist() for index in self.groups[g]]
        units = None if self.units is None else [self.units[i] for i in order]
        start, end = (unit_start(units, k * self.global_batch_size) for k in (within, within + 1))
        return order[start:end]


def ranking_units(pairs: Sequence[TokenizedPair]) -> list[int]:
    """Each pair's ranking, numbered in order: a pair continues the ranking of the pair before it when both come from
    one row's turn with one prompt and its chosen response is the earlier one's rejected (`data.rank_pairs: ranking`
    lays a row out so: best vs second, second vs third, ...); any other pair starts its own (a ranking of two)."""
    units: list[int] = []
    for k, pair in enumerate(pairs):
        before = pairs[k - 1] if k else None
        link = lambda p, response: (p.row, p.turn, p.prompt, response)
        continues = before is not None and link(before, before.rejected) == link(pair, pair.chosen)
        units.append(units[-1] if continues else (units[-1] + 1 if units else 0))
    return units


def unit_start(units: Sequence[int] | None, cut: int) -> int:
    """`cut` (a position in a sequence of pairs) moved forward to the start of the next unit (`ranking_units`)
    unless it is at one; unchanged without units (every pair its own)."""
    if units is None:
        return cut
    while 0 < cut < len(units) and units[cut] == units[cut - 1]:
        cut += 1
    return cut


def rank_share(indices: Sequence[int], dp_rank: int, dp_size: int, units: Sequence[int] | None = None) -> list[int]:
    """This DP rank's contiguous share of `indices` (pair indices), so a row's pairs stay together: equal shares where
    the count divides (a global batch: the config makes it so), else the earlier ranks' one smaller (eval data).
    With `units` (one per index, `ranking_units`) the cuts move forward to whole rankings (`unit_start`)."""
    n = len(indices)
    return list(indices[unit_start(units, n * dp_rank // dp_size) : unit_start(units, n * (dp_rank + 1) // dp_size)])


def pack_microbatches(
    pairs: Sequence[TokenizedPair],
    indices: Sequence[int],
    budget: int,
    shared: bool = False,
    whole_rankings: bool = False,
) -> list[list[int]]:
    """This rank's pairs (dataset indices) grouped into packs of at most `budget` tokens by first-fit decreasing:
    pair by pair, or (`shared`) tree by tree, a tree being a run of one input row's pairs (`data.trees`), one longer
    than the budget halved until its parts fit. A pack keeps its trees' pairs together, in the order given. With
    `whole_rankings` a ranking's pairs (`ranking_units`) are one unit, never cut; one over the budget is an error."""
    mine = [pairs[i] for i in indices]
    if whole_rankings:
        units = [list(run) for run in _runs(ranking_units(mine))]
    elif shared:
        units = [part for run in row_runs(mine) for part in _fitting(list(run), mine, budget)]
    else:
        units = [[k] for k in range(len(mine))]
    if shared:
        lengths = [tree_length([mine[k] for k in unit]) for unit in units]
    else:
        lengths = [sum(pair_lengths([mine[k] for k in unit])) for unit in units]
    over = [k for k, length in enumerate(lengths) if length > budget]
    if over:
        unit = units[over[0]]
        raise DataError(
            f"pair {mine[unit[0]].index}'s ranking ({len(unit)} pairs) takes {lengths[over[0]]} tokens, more than a "
            f"pack (data.pack_tokens={budget}): plackett_luce takes a ranking whole in one micro-batch; raise "
            "data.pack_tokens"
        )
    bins = pack_pairs(lengths, budget)
    return [[indices[k] for unit in sorted(b) for k in units[unit]] for b in bins]


def _fitting(unit: list[int], pairs: Sequence[TokenizedPair], budget: int) -> list[list[int]]:
    """A tree's pairs (positions in `pairs`) in as many halvings as make each part's tree fit the budget."""
    if len(unit) == 1 or tree_length([pairs[k] for k in unit]) <= budget:
        return [unit]
    half = len(unit) // 2
    return _fitting(unit[:half], pairs, budget) + _fitting(unit[half:], pairs, budget)


def split_groups(
    groups: list[list[int]], count: int, units: Callable[[list[int]], list[int]] | None = None
) -> list[list[int]]:
    """At least `count` micro-batches when there are that many pairs (the interleaved pipeline needs one per
    stage): the group with the most pairs is halved until there are enough. Order within groups is kept. With
    `units` (a group's pairs -> their rankings, `ranking_units`) a group is halved at a ranking's start only, and a
    group of one ranking is not split."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        cuts = {k: _middle(g, units) for k, g in enumerate(groups)}
        splittable = [k for k, cut in cuts.items() if 0 < cut < len(groups[k])]
        if not splittable:
            break
        largest = max(splittable, key=lambda k: len(groups[k]))
        group, cut = groups[largest], cuts[largest]
        groups[largest : largest + 1] = [group[:cut], group[cut:]]
    return groups


def _middle(group: list[int], units: Callable[[list[int]], list[int]] | None) -> int:
    """Where a group is halved: its middle, or the ranking start nearest after it (before it, when none is)."""
    if units is None:
        return len(group) // 2
    found = units(group)
    after = unit_start(found, len(group) // 2)
    if after < len(group):
        return after
    starts = [k for k in range(1, len(group)) if found[k] != found[k - 1]]
    return starts[-1] if starts else 0


def _runs(units: Sequence[int]) -> list[range]:
    """The runs of equal consecutive values: each ranking's positions."""
    starts = [k for k in range(len(units)) if k == 0 or units[k] != units[k - 1]]
    return [range(a, b) for a, b in zip(starts, starts[1:] + [len(units)])]


def in_frame(batch: MicroBatch, rows: int, length: int) -> MicroBatch:
    """The micro-batch in a [rows, length] frame, padding rows and columns added at the end: the interleaved
    pipeline sends one activation shape per schedule call. Flat indices of the scores and blocks are remapped; the
    added tokens are scored nowhere and attend nothing (plain rows: only earlier padding); in a packed row they
    continue the last sequence, as `collate_packed`'s own padding does."""
    old_rows, old_length = batch.tokens.shape
    if (old_rows, old_length) == (rows, length):
        return batch
    remap = lambda flat: flat // old_length * length + flat % old_length
    tokens = batch.tokens.new_zeros(rows, length)
    tokens[:old_rows, :old_length] = batch.tokens
    positions = torch.arange(length, device=batch.tokens.device).repeat(rows, 1)
    positions[:old_rows, :old_length] = batch.position_ids
    fields: dict[str, object] = {"num_slots": max(batch.num_slots, rows * length)}
    if batch.token_weights is not None:
        weights = batch.token_weights.new_zeros(rows, length)
        weights[:old_rows, :old_length] = batch.token_weights
        fields["token_weights"] = weights
        fields["pair_weights"] = batch.pair_weights.new_zeros(rows, length, batch.pair_weights.shape[-1])
        fields["pair_weights"][:old_rows, :old_length] = batch.pair_weights
    if batch.cu_seqlens is not None:  # one packed row: the padding joins its last sequence
        last = int(batch.position_ids[0, -1])
        positions[0, old_length:] = torch.arange(last + 1, last + 1 + length - old_length)
        cu = batch.cu_seqlens.clone()
        cu[-1] = length
        fields.update(cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))
    if batch.blocks is not None:
        blocks = batch.blocks
        fields["blocks"] = dataclasses.replace(blocks, q_index=remap(blocks.q_index), k_index=remap(blocks.k_index))
    return dataclasses.replace(
        batch, tokens=tokens, position_ids=positions, score_index=remap(batch.score_index), **fields
    )
