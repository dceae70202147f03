"""mdpo against TRL's DPOTrainer on CPU: the same tiny Llama (same weights), pairs, order and hyperparameters.

    pip install -e ".[bench]"   # TRL
    python benchmarks/vs_trl.py --data real     # all 200 UltraFeedback rows, Tulu 2, max_length 1024, hidden 256
    python benchmarks/vs_trl.py --data short    # pairs of at most 384 tokens both tokenize alike, hidden 128
    python benchmarks/vs_trl.py --model qwen3_moe --micro-batch 1   # a Qwen3-MoE, its load-balancing loss on

`--model qwen3_moe`: a Qwen3-MoE of the same width (8 experts of width hidden, top 2, renormalised, the
load-balancing loss weighted 0.01); at `--micro-batch 1` TRL's loss (DPO + 0.01 x transformers' aux_loss of the
pair's two sequences) is what mdpo computes per pair, and `aux_loss` is compared too.

`--data real` (what users train on): every row of ../shared/data/ultrafeedback_binarized_sample_200.jsonl, one
epoch. mdpo reads the file itself (its UltraFeedback reader and Tulu 2 template); TRL gets the same conversations as
Tulu 2 text. Each trainer tokenizes and truncates for itself (max_length 1024): the benchmark filters nothing (TRL
itself drops a row whose prompt alone fills max_length). The model is the issue's shape (4 layers, hidden 256, 8
heads, the Llama 2 vocabulary).

`--data short`: UltraFeedback and HH-RLHF pairs rendered to plain text, kept only where they fit `--max-length`
untruncated and both trainers tokenize them to the same ids, so both see the same tokens (hidden 128).

TRL's DPOConfig turns gradient checkpointing on by default; it is turned off here, as mdpo recomputes nothing by
default, so both run the same passes. Either way mdpo's sampler fixes the order and TRL reads the pairs in that
order (sequential sampler). Runs, in one invocation: TRL (online reference), then mdpo padded and packed with an
online reference and packed with a precomputed one (the prompt shared by both responses wherever that is exact:
`data.share_prompt` left at auto, and once without sharing). Prints pairs/s and tokens/s of each over the sum of
step times (tokens as TRL counts them: prompt + response of both sequences, so sharing shows as speed, not fewer
tokens), the ratios to TRL, the CPU time (user / system) of each mdpo process and the max difference of each loss
curve from TRL's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL = dict(
    vocab_size=32000,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
REAL_MODEL = {
    **MODEL,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 2048,
}
MOE = dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.01)
TOKENIZER = SHARED / "tokenizers" / "llama2"
ULTRAFEEDBACK = SHARED / "data" / "ultrafeedback_binarized_sample_200.jsonl"


def tulu2_rows(path: Path, eos_token: str) -> list[dict]:
    """UltraFeedback rows as Tulu 2 text for TRL: the conversation before the last turn (the Tulu 2 format as mdpo's
    template writes it), then each last reply."""
    from mdpo.data.templates import tulu_prompt

    rows = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        rows.append(
            {
                "prompt": tulu_prompt(r["chosen"][:-1], eos_token),
                "chosen": r["chosen"][-1]["content"].strip(),
                "rejected": r["rejected"][-1]["content"].strip(),
            }
        )
    return rows


def plain_rows() -> list[dict]:
    """UltraFeedback (Tulu 2 format) and HH-RLHF pairs as plain prompt / chosen / rejected text."""
    rows = []
    for line in ULTRAFEEDBACK.read_text().splitlines():
        r = json.loads(line)
        prompt = f"<|user|>\n{r['prompt']}\n<|assistant|>\n"
        rows.append({"prompt": prompt, "chosen": r["chosen"][-1]["content"], "rejected": r["rejected"][-1]["content"]})
    for line in (SHARED / "data" / "hh_helpful_base_test_500.jsonl").read_text().splitlines():
        r = json.loads(line)
        cut = r["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        if r["rejected"][:cut] == r["chosen"][:cut]:
            rows.append({"prompt": r["chosen"][:cut], "chosen": r["chosen"][cut:], "rejected": r["rejected"][cut:]})
    return [r for r in rows if r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mdpo_ids(path: Path, tokenizer, max_length: int) -> list[tuple]:
    from mdpo.config import DataConfig
    from mdpo.data.pairs import TokenizeReport, load_pairs

    data = DataConfig(
        train_file=str(path),
        tokenizer="",
        max_length=max_length,
        format="plain",
        template="raw",
        over_length="drop",
        cache=False,
    )
    return [(p.index, p.prompt, p.chosen, p.rejected) for p in load_pairs(data, str(path), tokenizer, TokenizeReport())]


def trl_trainer(hf: Path, tokenizer, rows: list[dict], args, out: Path):
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[float] = []

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.steps.append(time.perf_counter() - self.start)

    class InOrder(DPOTrainer):  # the pairs are already in mdpo's sampler order
        def _get_train_sampler(self, *_, **__):
            return SequentialSampler(self.train_dataset)

    config = DPOConfig(
        output_dir=str(out),
        beta=args.beta,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.global_batch // args.micro_batch,
        max_steps=args.steps,
        max_length=args.max_length,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        optim="adamw_torch",
        gradient_checkpointing=False,
    )
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    timer = Timer()
    trainer = InOrder(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[timer]
    )
    return trainer, timer


def run_mdpo(name: str, root: Path, hf: Path, data: list[str], args, *extra: str) -> dict:
    """One mdpo run in a subprocess (precompute-ref first for a precomputed reference): its losses, step times and
    CPU time (user, system) from the child's resource usage."""
    overrides = [
        f"model.init_from={hf}",
        *data,
        f"data.max_length={args.max_length}",
        "data.cache=false",
        f"schedule.global_batch_size={args.global_batch}",
        f"schedule.micro_batch_size={args.micro_batch}",
        f"schedule.train_steps={args.steps}",
        f"schedule.warmup_ratio={args.warmup_steps / args.steps}",
        "schedule.seed=0",
        f"optimizer.lr={args.lr}",
        "optimizer.weight_decay=0.0",
        "optimizer.clip_grad=1.0",
        "optimizer.adam_eps=1e-8",
        f"dpo.beta={args.beta}",
        f"logging.run_dir={root / name}",
        "logging.progress=false",
        "logging.plot=false",
        "checkpoint.export_hf=false",
        "checkpoint.save_at_end=false",
        f"dpo.reference_cache={root / 'refcache' / name}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    precompute = 0.0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for command in (["precompute-ref"] if "dpo.reference=precomputed" in extra else []) + ["train"]:
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "mdpo", command, *overrides], env=env, capture_output=True, text=True
        )
        if result.returncode != 0:
            sys.exit(f"mdpo {command} failed:\n{result.stderr[-3000:]}")
        if command == "precompute-ref":
            precompute = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    records = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r and "eval_loss" not in r]
    return {
        "losses": [r["loss"] for r in train],
        "aux": [r.get("aux_loss", 0.0) for r in train],
        "step_s": [r["num_tokens"] / r["tokens_per_second"] for r in train],
        "precompute_s": precompute,
        "cpu": (after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime),
        "peak_gib": max(r["peak_memory_gib"] for r in train),
    }


def short_pairs(root: Path, tokenizer, args) -> tuple[list[dict], list[str], int]:
    """Pairs both trainers tokenize identically that fit untruncated, as many as the steps take, in mdpo's order:
    (TRL's rows in order, mdpo's data overrides, trained tokens as TRL counts them)."""
    from mdpo.data.batching import PairSampler

    rows = plain_rows()
    ours = mdpo_ids(write_jsonl(root / "all.jsonl", rows), tokenizer, args.max_length)
    fitting = [rows[i] for i, *_ in ours]
    trainer, _ = trl_trainer(root / "hf", tokenizer, fitting, args, root / "trl_probe")
    theirs = trainer.train_dataset
    same = [
        k
        for k, (_, p, c, r) in enumerate(ours)
        if (theirs[k]["prompt_ids"], theirs[k]["chosen_ids"], theirs[k]["rejected_ids"]) == (p, c, r)
    ]
    needed = args.steps * args.global_batch
    if len(same) < needed:
        sys.exit(f"only {len(same)} pairs tokenize identically in both; {needed} needed")
    pairs = [fitting[k] for k in same][:needed]
    lengths = [ours[k] for k in same][:needed]
    data = write_jsonl(root / "pairs.jsonl", pairs)
    sampler = PairSampler(range(len(pairs)), args.global_batch, seed=0)
    order = [i for step in range(args.steps) for i in sampler.global_batch(step)]
    tokens = sum(2 * len(lengths[i][1]) + len(lengths[i][2]) + len(lengths[i][3]) for i in order)
    print(
        f"{len(same)} of {len(rows)} pairs fit {args.max_length} tokens and tokenize identically; using {needed}; "
        f"{tokens} trained tokens over {args.steps} steps"
    )
    overrides = [f"data.train_file={data}", f"data.tokenizer={TOKENIZER}", "data.format=plain", "data.template=raw"]
    return [pairs[i] for i in order], overrides, tokens


def real_pairs(root: Path, tokenizer, args) -> tuple[list[dict], list[str], int]:
    """Every UltraFeedback row, one epoch in mdpo's order; TRL tokenizes and truncates its Tulu 2 text itself and
    its own token count (prompt in both sequences) is the tokens figure for every run."""
    from mdpo.data.batching import PairSampler

    rows = tulu2_rows(ULTRAFEEDBACK, tokenizer.eos_token)[: args.rows]
    args.steps = len(rows) // args.global_batch
    args.warmup_steps = min(args.warmup_steps, args.steps - 1)
    sampler = PairSampler(range(len(rows)), args.global_batch, seed=0)
    ordered = [rows[i] for step in range(args.steps) for i in sampler.global_batch(step)]
    trainer, _ = trl_trainer(root / "hf", tokenizer, ordered, args, root / "trl_probe")
    theirs = trainer.train_dataset  # TRL drops rows whose prompt fills max_length, and cuts each sequence there
    seen = [theirs[k % len(theirs)] for k in range(args.steps * args.global_batch)]
    tokens = sum(
        min(len(r["prompt_ids"]) + len(r[side]), args.max_length)
        for r in seen
        for side in ("chosen_ids", "rejected_ids")
    )
    print(
        f"all {len(rows)} UltraFeedback rows ({len(rows) - len(theirs)} dropped by TRL: prompt over max_length), "
        f"{args.steps} steps of {args.global_batch}, max_length {args.max_length}: {tokens} trained tokens as TRL "
        "counts them"
    )
    data = (
        ULTRAFEEDBACK
        if args.rows is None
        else write_jsonl(
            root / "rows.jsonl", [json.loads(line) for line in ULTRAFEEDBACK.read_text().splitlines()[: args.rows]]
        )
    )
    overrides = [
        f"data.train_file={data}",
        f"data.tokenizer={TOKENIZER}",
        "data.format=ultrafeedback",
        "data.template=tulu2",
        "data.over_length=truncate",
    ]
    return ordered, overrides, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("real", "short"), default="real")
    parser.add_argument("--steps", type=int, default=20, help="--data short only (real: one epoch)")
    parser.add_argument("--rows", type=int, default=None, help="--data real: only the first rows (a quick look)")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=None, help="padded runs (default: 8 real, 4 short)")
    parser.add_argument("--max-length", type=int, default=None, help="default: 1024 real, 384 short")
    parser.add_argument("--pack-tokens", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="/tmp/mdpo_vs_trl")
    parser.add_argument("--model", choices=("llama", "qwen3_moe"), default="llama")
    args = parser.parse_args()
    real = args.data == "real"
    args.micro_batch = args.micro_batch or (8 if real else 4)
    args.max_length = args.max_length or (1024 if real else 384)
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from mdpo.data.encoding import load_tokenizer

    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    tokenizer = load_tokenizer(str(TOKENIZER))
    torch.manual_seed(0)
    shape = REAL_MODEL if real else MODEL
    if args.model == "qwen3_moe":
        moe = Qwen3MoeConfig(**shape, **MOE, moe_intermediate_size=shape["hidden_size"], rope_theta=10000.0)
        Qwen3MoeForCausalLM(moe).save_pretrained(root / "hf")
    else:
        LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(root / "hf")
    rows, data, tokens = (real_pairs if real else short_pairs)(root, tokenizer, args)
    pairs = len(rows)

    trainer, timer = trl_trainer(root / "hf", tokenizer, rows, args, root / "trl")
    before = os.times()
    trainer.train()
    after = os.times()
    trl_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    runs = {
        "TRL DPOTrainer (online reference)": {
            "losses": trl_losses,
            "aux": [h.get("aux_loss", 0.0) for h in trainer.state.log_history if "loss" in h],
            "step_s": timer.steps,
            "precompute_s": 0.0,
            "cpu": (after.user - before.user, after.system - before.system),
        }
    }
    packed = ("data.packing=true", f"data.pack_tokens={args.pack_tokens}")
    hf = root / "hf"
    runs["mdpo padded, online reference"] = run_mdpo("padded", root, hf, data, args)
    runs["mdpo packed, online, prompt unshared"] = run_mdpo(
        "unshared", root, hf, data, args, *packed, "data.share_prompt=false"
    )
    runs["mdpo packed, online reference"] = run_mdpo("packed", root, hf, data, args, *packed)
    runs["mdpo packed, precomputed reference"] = run_mdpo(
        "precomputed", root, hf, data, args, *packed, "dpo.reference=precomputed"
    )

    base = pairs / sum(runs["TRL DPOTrainer (online reference)"]["step_s"])
    print(
        f"\n{'run':<38} {'pairs/s':>8} {'tokens/s':>9} {'x TRL':>6} {'CPU user/sys s':>15} "
        f"{'max |loss - TRL|':>17} {'precompute s':>13} {'max |aux_loss - TRL|':>21}"
    )
    trl_aux = runs["TRL DPOTrainer (online reference)"]["aux"]
    for name, run in runs.items():
        seconds = sum(run["step_s"])
        user, system = run["cpu"]
        diff = max(abs(a - b) for a, b in zip(run["losses"], trl_losses, strict=True))
        aux = max(abs(a - b) for a, b in zip(run["aux"], trl_aux, strict=True))
        print(
            f"{name:<38} {pairs / seconds:>8.3f} {tokens / seconds:>9.0f} {pairs / seconds / base:>6.2f} "
            f"{f'{user:.0f}/{system:.0f}':>15} {diff:>17.2e} {run['precompute_s']:>13.1f} {aux:>21.2e}"
        )
    print(
        f"(CPU, {args.threads} threads, model {args.model}, data {args.data}: {pairs} pairs, {tokens} tokens as TRL "
        "counts them; TRL "
        f"loss at step 1 / {args.steps}: {trl_losses[0]:.6f} / {trl_losses[-1]:.6f}; CPU time includes start-up and, "
        "for mdpo, the precompute)"
    )


if __name__ == "__main__":
    main()
