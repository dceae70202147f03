"""``mdpo data stats``: what the data path makes of a data set, before any GPU time is spent on it.

Counts (rows, pairs, ties, skips, drops, truncations, boundary fixes, each by reason), token-length percentiles of
prompts, responses and pairs, the padding that dynamic padding wastes at the given micro-batch sizes against the
efficiency of packing whole pairs, the tokens a shared prompt (`data.share_prompt`) removes, and chosen pairs
rendered with their trained tokens marked. It reads the data exactly as training does (same `load_pairs`, same
cache), so a stats run also warms the cache.

    mdpo data stats CONFIG.yaml [--eval] [flags]
    mdpo data stats --data FILE --tokenizer DIR [--template NAME] [--max-length N] [--json] [--show N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
from collections.abc import Sequence

from mdpo.config import DataConfig, ScheduleConfig, load_section
from mdpo.config.sections import DATA_FORMATS, RANK_PAIRS
from mdpo.data.batching import pack_microbatches
from mdpo.data.encoding import BOUNDARY_FIXED, load_tokenizer
from mdpo.data.packing import pack_pairs, packing_efficiency, pair_lengths
from mdpo.data.pairs import TokenizedPair, TokenizeReport, load_pairs
from mdpo.data.trees import trees_length
from mdpo.errors import ConfigError, MdpoError

_MARKS = {False: ("[[", "]]"), True: ("\x1b[1;32m", "\x1b[0m")}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `data stats` arguments (flags override the config's data section)."""
    parser.add_argument("config", nargs="?", help="training config YAML; its data section is used")
    parser.add_argument("--eval", action="store_true", help="read data.eval_file instead of data.train_file")
    parser.add_argument("--data", help="data file or folder (overrides data.train_file)")
    parser.add_argument("--tokenizer", help="HF tokenizer folder (overrides data.tokenizer)")
    parser.add_argument("--format", help="auto | " + " | ".join(DATA_FORMATS[1:]))
    parser.add_argument("--rank-pairs", choices=RANK_PAIRS, help="ranked rows: which pairs a row's completions make")
    parser.add_argument("--min-score-gap", type=float, help="ranked rows: drop pairs whose scores differ by less")
    parser.add_argument("--template", help="auto | tulu2 | tulu3 | tokenizer | raw | a Jinja chat template")
    parser.add_argument("--max-length", type=int, help="tokens of prompt + one response")
    parser.add_argument("--max-prompt-length", type=int, help="tokens of a prompt")
    parser.add_argument("--prompt-truncation", choices=("keep_end", "keep_start"))
    parser.add_argument("--over-length", choices=("truncate", "drop"))
    parser.add_argument("--on-bad-row", choices=("error", "skip"), help="default: the config's, else skip")
    parser.add_argument("--num-proc", type=int, help="tokenizing processes")
    parser.add_argument("--cache-dir", help="tokenized-set cache folder")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--micro-batch-sizes", default="1,4", help="micro-batch sizes (pairs) for padding waste")
    parser.add_argument("--pack-budget", type=int, help="tokens per pack (default: 2 x max_length)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed for the micro-batches")
    parser.add_argument(
        "--show",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="render pair N (0-based; the row where each row is one pair) with trained tokens in [[ ]]; repeatable",
    )
    parser.add_argument("--color", action="store_true", help="mark trained tokens in color instead of [[ ]]")
    parser.add_argument("--json", action="store_true", help="print the stats as JSON")
    return parser


def data_config(args: argparse.Namespace) -> tuple[DataConfig, str]:
    """The data config (the config file's data section, then flags) and the file to read, checked as training
    checks it."""
    if args.config:
        data = load_section(args.config, "data")
    elif not (args.data and args.tokenizer):
        raise ConfigError("data stats needs a CONFIG.yaml, or --data FILE and --tokenizer DIR")
    else:
        data = DataConfig(on_bad_row="skip")
    flags = {
        "train_file": args.data,
        "tokenizer": args.tokenizer,
        "format": args.format,
        "rank_pairs": args.rank_pairs,
        "min_score_gap": args.min_score_gap,
        "template": args.template,
        "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length,
        "prompt_truncation": args.prompt_truncation,
        "over_length": args.over_length,
        "on_bad_row": args.on_bad_row,
        "num_proc": args.num_proc,
        "cache_dir": args.cache_dir,
    }
    if args.no_cache:
        flags["cache"] = False
    data = dataclasses.replace(data, **{name: value for name, value in flags.items() if value is not None})
    data.check_required()
    path = data.eval_file if args.eval else data.train_file
    if not path:
        raise ConfigError("data.eval_file is not set")
    return data, path


def training_seed(config: str | None) -> int:
    """The config's schedule.seed (best_vs_random's where data.seed is unset), as training reads it."""
    return load_section(config, "schedule").seed if config else ScheduleConfig.seed


def data_stats(args: argparse.Namespace) -> dict:
    """Read the data as training would and describe it (see the module docstring); a dict ready for JSON."""
    data, path = data_config(args)
    tokenizer, report = load_tokenizer(data.tokenizer), TokenizeReport()
    pairs = load_pairs(data, path, tokenizer, report, training_seed=training_seed(args.config))
    counts = report.counts
    lengths = pair_lengths(pairs)
    budget = args.pack_budget or 2 * data.max_length
    bins = pack_pairs(lengths, budget)
    shared_packs = pack_microbatches(pairs, range(len(pairs)), budget, shared=True)
    shared = sum(trees_length([pairs[i] for i in pack]) for pack in shared_packs)
    by_index = {p.index: p for p in pairs}
    micro_batches = [int(m) for m in str(args.micro_batch_sizes).split(",") if m.strip()]
    return {
        "data": path,
        "tokenizer": data.tokenizer,
        "format": report.info.get("format"),
        "template": report.info.get("template"),
        "cache": report.info.get("cache"),
        "rows": report.info.get("rows"),
        "pairs": len(pairs),
        "ties": _total(counts, "tied: "),
        "skipped": _total(counts, "skipped: "),
        "dropped": _total(counts, "dropped: "),
        "truncated": _total(counts, "truncated: "),
        "boundary_fixed": counts.get(BOUNDARY_FIXED, 0),
        "reasons": dict(sorted(counts.items())),
        "lengths": {
            "prompt": percentiles([len(p.prompt) for p in pairs]),
            "chosen": percentiles([len(p.chosen) for p in pairs]),
            "rejected": percentiles([len(p.rejected) for p in pairs]),
            "pair": percentiles(lengths),
        },
        "padding": {str(m): padding_waste(pairs, m, args.seed) for m in micro_batches},
        "packing": {
            "budget": budget,
            "packs": len(bins),
            "efficiency": packing_efficiency(lengths, bins, budget),
        },
        # data.share_prompt: each input row's pairs one prefix tree (a prompt once however many pairs share it)
        # against the expanded pairs (each pair's prompt in both of its sequences)
        "shared_prompt": {
            "tokens": sum(lengths),
            "shared_tokens": shared,
            "removed": 1 - shared / max(sum(lengths), 1),
            "packs": len(shared_packs),
            "efficiency": shared / max(len(shared_packs) * budget, 1),
        },
        "show": [show_pair(tokenizer, by_index.get(n), n, args.color) for n in args.show],
    }


def _total(counts, prefix: str) -> int:
    return sum(n for reason, n in counts.items() if reason.startswith(prefix))


def percentiles(values: Sequence[int]) -> dict[str, float]:
    """p50/p90/p99 (nearest rank: a length that occurs), max and mean; zeros for no values."""
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    ordered = sorted(values)
    rank = lambda q: ordered[max(0, math.ceil(q * len(ordered)) - 1)]
    mean = sum(values) / len(values)
    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": ordered[-1], "mean": mean}


def padding_waste(pairs: Sequence[TokenizedPair], micro_batch: int, seed: int = 0) -> dict:
    """Dynamic padding as `batching.collate` does it: shuffled pairs, micro-batches of `micro_batch` pairs, all
    2m sequences of a micro-batch right-padded to its longest. Waste = padding / padded tokens."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    real = padded = 0
    for start in range(0, len(order), micro_batch):
        group = [pairs[i] for i in order[start : start + micro_batch]]
        seqs = [len(p.prompt) + len(p.chosen) for p in group] + [len(p.prompt) + len(p.rejected) for p in group]
        real += sum(seqs)
        padded += len(seqs) * max(seqs)
    return {"real_tokens": real, "padded_tokens": padded, "waste": 1 - real / padded if padded else 0.0}


def show_pair(tokenizer, pair: TokenizedPair | None, index: int, color: bool = False) -> dict:
    """Pair `index` decoded (special tokens shown) with the trained response tokens marked."""
    if pair is None:
        return {"index": index, "error": f"row {index} is not a usable pair (skipped, dropped or out of range)"}
    opening, closing = _MARKS[color]
    prompt = tokenizer.decode(pair.prompt)
    shown = {"index": index, "prompt_tokens": len(pair.prompt)}
    for key, response in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        full = tokenizer.decode(pair.prompt + response)
        tail = full[len(prompt) :] if full.startswith(prompt) else tokenizer.decode(response)
        shown[key] = f"{prompt}{opening}{tail}{closing}"
        shown[f"{key}_tokens"] = len(response)
    return shown


def format_stats(stats: dict) -> str:
    """The stats as a short human-readable report."""
    lines = [
        f"data: {stats['data']} (format {stats['format']}, template {stats['template']}, cache {stats['cache']})",
        f"rows: {stats['rows']}, pairs: {stats['pairs']}, ties: {stats['ties']}, skipped: {stats['skipped']}, dropped: "
        f"{stats['dropped']}, truncated: {stats['truncated']}, boundary re-tokenized: {stats['boundary_fixed']}",
    ]
    lines += [f"  {reason}: {n}" for reason, n in stats["reasons"].items()]
    lines.append(f"{'tokens':<10}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{'mean':>10}")
    for name, q in stats["lengths"].items():
        lines.append(f"{name:<10}{q['p50']:>8}{q['p90']:>8}{q['p99']:>8}{q['max']:>8}{q['mean']:>10.1f}")
    for m, pad in stats["padding"].items():
        lines.append(f"dynamic padding, micro-batch {m}: {pad['waste']:.1%} of padded tokens are padding")
    pack = stats["packing"]
    lines.append(
        f"packing (first-fit decreasing, {pack['budget']} tokens per pack): {pack['packs']} packs, "
        f"efficiency {pack['efficiency']:.1%}"
    )
    share = stats["shared_prompt"]
    lines.append(
        f"one forward per prompt (data.share_prompt): {share['shared_tokens']} tokens computed of the expanded "
        f"pairs' {share['tokens']}, {share['removed']:.1%} removed; {share['packs']} packs, efficiency "
        f"{share['efficiency']:.1%}"
    )
    for shown in stats["show"]:
        if "error" in shown:
            lines.append(f"--- pair {shown['index']}: {shown['error']}")
            continue
        for key in ("chosen", "rejected"):
            tokens = f"{shown['prompt_tokens']} + {shown[key + '_tokens']} tokens"
            lines.append(f"--- pair {shown['index']}, {key} ({tokens}; trained tokens marked)")
            lines.append(shown[key])
    return "\n".join(lines)


def print_stats(args: argparse.Namespace) -> int:
    """Compute and print (text or --json); user errors are one line on stderr and exit status 2."""
    try:
        stats = data_stats(args)
    except MdpoError as err:
        print(f"mdpo: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=1, ensure_ascii=False) if args.json else format_stats(stats))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="mdpo data stats", description=__doc__.split("\n")[0]))
    return print_stats(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
