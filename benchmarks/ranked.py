"""One forward per prompt against the expanded pairs, on ranked rows: tokens computed and step time, side by side in
one invocation.

    python benchmarks/ranked.py [--hidden 128] [--layers 4] [--global-batch 24] [--max-length 1024]

The data is every row of the UltraFeedback sample in ../shared/data, regrouped into rows shaped as raw UltraFeedback
publishes them (`instruction` + four `completions`, each a `response` with its `overall_score`): row 2j's prompt with
its own two responses and row 2j+1's two, with their scores. `data.rank_pairs: all_pairs` makes a pair of every two
completions with different scores (up to 6 a row). Three runs of `mdpo train` on one random Llama (Llama 2's
tokenizer, the Tulu 2 template), one epoch each, micro-batches of `--micro-batch` pairs:

- expanded: every pair its own two sequences, its prompt in both (TRL's layout; data.share_prompt=false);
- per pair: the same pairs written one per row, each pair's prompt once (mdpo's shared prompt without trees);
- tree: the ranked rows, each row's pairs one prefix tree (data.share_prompt=true): the prompt and each completion
  once however many pairs hold them.

The expanded and tree runs train the same pairs in the same order: their losses must agree step for step (checked).
Prints each run's tokens computed, its epoch's training time, and both as ratios to the expanded run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
ULTRAFEEDBACK = SHARED / "data" / "ultrafeedback_binarized_sample_200.jsonl"
TOKENIZER = SHARED / "tokenizers" / "llama2"


def ranked_rows(rows: list[dict]) -> list[dict]:
    """Rows 2j and 2j+1 of the binarized sample as one raw-UltraFeedback row of four rated completions."""
    answer = lambda row, side: {"response": row[side][-1]["content"], "overall_score": row[f"score_{side}"]}
    four = lambda first, second: [answer(row, side) for row in (first, second) for side in ("chosen", "rejected")]
    return [{"instruction": a["prompt"], "completions": four(a, b)} for a, b in zip(rows[0::2], rows[1::2])]


def expanded_rows(ranked: list[dict]) -> list[dict]:
    """The pairs all_pairs makes of each ranked row (a higher score chosen, ties none), one plain row each."""
    message = lambda role, text: [{"role": role, "content": text}]
    out = []
    for row in ranked:
        done = row["completions"]
        for i, a in enumerate(done):
            for b in done[i + 1 :]:
                if a["overall_score"] != b["overall_score"]:
                    best, worst = (a, b) if a["overall_score"] > b["overall_score"] else (b, a)
                    out.append(
                        {
                            "prompt": message("user", row["instruction"]),
                            "chosen": message("assistant", best["response"]),
                            "rejected": message("assistant", worst["response"]),
                        }
                    )
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(name: str, root: Path, hf: Path, data: Path, share: bool, args: argparse.Namespace) -> dict:
    """One epoch of `mdpo train` in a subprocess: per step, the loss, tokens computed and seconds."""
    overrides = [
        f"model.init_from={hf}",
        f"data.train_file={data}",
        f"data.tokenizer={TOKENIZER}",
        "data.template=tulu2",
        "data.rank_pairs=all_pairs",
        f"data.max_length={args.max_length}",
        f"data.share_prompt={str(share).lower()}",
        "data.cache=false",
        f"schedule.global_batch_size={args.global_batch}",
        f"schedule.micro_batch_size={args.micro_batch}",
        "schedule.epochs=1",
        "schedule.seed=0",
        "dpo.reference=online",
        f"logging.run_dir={root / name}",
        "logging.progress=false",
        "logging.plot=false",
        "checkpoint.export_hf=false",
        "checkpoint.save_at_end=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "mdpo", "train", *overrides], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"mdpo train ({name}) failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r and "eval_loss" not in r]
    return {
        "losses": [r["loss"] for r in train],
        "computed": sum(r["num_tokens_computed"] for r in train),
        "input": sum(r["num_tokens"] for r in train),
        "seconds": sum(r["num_tokens"] / r["tokens_per_second"] for r in train),
        "steps": len(train),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=24, help="pairs per step")
    parser.add_argument("--micro-batch", type=int, default=6, help="pairs per micro-batch")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not ULTRAFEEDBACK.exists():
        sys.exit(f"{ULTRAFEEDBACK} is missing: the benchmark reads the shared UltraFeedback sample")

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = Path(tempfile.mkdtemp(prefix="mdpo-ranked-"))
    ranked = ranked_rows([json.loads(line) for line in ULTRAFEEDBACK.read_text().splitlines()])
    files = {"ranked": write_jsonl(root / "ranked.jsonl", ranked)}
    files["pairs"] = write_jsonl(root / "pairs.jsonl", expanded_rows(ranked))
    vocab = len(AutoTokenizer.from_pretrained(TOKENIZER))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2 * args.max_length,
    )
    LlamaForCausalLM(config).save_pretrained(root / "hf")
    runs = {
        "expanded": run("expanded", root, root / "hf", files["ranked"], False, args),
        "per pair": run("per_pair", root, root / "hf", files["pairs"], True, args),
        "tree": run("tree", root, root / "hf", files["ranked"], True, args),
    }
    base, tree = runs["expanded"], runs["tree"]
    drift = max(abs(a - b) for a, b in zip(base["losses"], tree["losses"], strict=True))
    print(
        f"{len(ranked)} ranked rows of 4 completions from {ULTRAFEEDBACK.name}; all_pairs; Llama hidden "
        f"{args.hidden} x {args.layers} layers, vocab {vocab}, max_length {args.max_length}; {base['steps']} steps "
        f"of {args.global_batch} pairs, micro-batches of {args.micro_batch}; {args.threads} threads"
    )
    print(f"{'run':<10}{'tokens computed':>16}{'of expanded':>13}{'epoch s':>10}{'speed-up':>10}")
    for name, r in runs.items():
        ratio, speed = r["computed"] / base["computed"], base["seconds"] / r["seconds"]
        print(f"{name:<10}{r['computed']:>16}{ratio:>13.3f}{r['seconds']:>10.1f}{speed:>9.2f}x")
    print(f"input tokens (TRL's count) {base['input']}; tree vs expanded loss, largest step difference {drift:.2e}")
    if drift > 1e-4:
        sys.exit("the tree run's losses differ from the expanded run's")


if __name__ == "__main__":
    main()
