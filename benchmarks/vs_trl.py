"""mdpo against TRL's DPOTrainer on CPU: the same tiny Llama (same weights), pairs, order and hyperparameters.

    pip install -e ".[bench]"   # TRL
    python benchmarks/vs_trl.py [--steps 20] [--threads 2]

Data: real UltraFeedback and HH-RLHF pairs from ../shared/data, rendered to plain text (UltraFeedback in the Tulu 2
format), tokenized with the Llama 2 tokenizer; only pairs that fit `--max-length` untruncated and that both
trainers tokenize to the same ids are kept, so both see the same tokens. mdpo's sampler fixes the order; TRL reads
the pairs in that order (sequential sampler). Runs, in one invocation: TRL (online reference), then mdpo padded with
an online reference, packed with an online reference, and packed with a precomputed reference. Prints tokens/s of
each (trained tokens: prompt + response of both sequences, over the sum of step times), the ratios to TRL, and the
max difference of each mdpo loss curve from TRL's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL = dict(vocab_size=32000, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
             tie_word_embeddings=False)  # fmt: skip


def plain_rows() -> list[dict]:
    """UltraFeedback (Tulu 2 format) and HH-RLHF pairs as plain prompt / chosen / rejected text."""
    rows = []
    for line in (SHARED / "data" / "ultrafeedback_binarized_sample_200.jsonl").read_text().splitlines():
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

    data = DataConfig(train_file=str(path), tokenizer="", max_length=max_length, format="plain", template="raw",
                      over_length="drop", cache=False)  # fmt: skip
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

    config = DPOConfig(output_dir=str(out), beta=args.beta, learning_rate=args.lr, lr_scheduler_type="linear",
                       warmup_steps=args.warmup_steps, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                       adam_epsilon=1e-8, max_grad_norm=1.0, per_device_train_batch_size=args.micro_batch,
                       gradient_accumulation_steps=args.global_batch // args.micro_batch, max_steps=args.steps,
                       max_length=args.max_length, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                       seed=0, dataloader_num_workers=0, disable_tqdm=True, optim="adamw_torch")  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    timer = Timer()
    trainer = InOrder(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      callbacks=[timer])  # fmt: skip
    return trainer, timer


def run_mdpo(name: str, root: Path, hf: Path, data: Path, tokenizer_dir: Path, args, *extra: str) -> dict:
    overrides = [f"model.init_from={hf}", f"data.train_file={data}", f"data.tokenizer={tokenizer_dir}",
                 "data.format=plain", "data.template=raw", f"data.max_length={args.max_length}", "data.cache=false",
                 f"schedule.global_batch_size={args.global_batch}", f"schedule.micro_batch_size={args.micro_batch}",
                 f"schedule.train_steps={args.steps}", f"schedule.warmup_ratio={args.warmup_steps / args.steps}",
                 "schedule.seed=0", f"optimizer.lr={args.lr}", "optimizer.weight_decay=0.0", "optimizer.clip_grad=1.0",
                 "optimizer.adam_eps=1e-8", f"dpo.beta={args.beta}", f"logging.run_dir={root / name}",
                 "logging.progress=false", "logging.plot=false", "checkpoint.export_hf=false",
                 "checkpoint.save_at_end=false", f"dpo.reference_cache={root / 'refcache'}", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    for command in (["precompute-ref"] if "dpo.reference=precomputed" in extra else []) + ["train"]:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "mdpo", command, *overrides], env=env, capture_output=True,
                                text=True)  # fmt: skip
        if result.returncode != 0:
            sys.exit(f"mdpo {command} failed:\n{result.stderr[-3000:]}")
        if command == "precompute-ref":
            precompute = time.perf_counter() - started
    records = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r["num_tokens"] / r["tokens_per_second"] for r in records if "loss" in r and "eval_loss" not in r]
    return {"losses": [r["loss"] for r in records if "loss" in r], "step_s": steps,
            "precompute_s": precompute if "dpo.reference=precomputed" in extra else 0.0}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="/tmp/mdpo_vs_trl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from mdpo.data.batching import PairSampler
    from mdpo.data.encoding import load_tokenizer

    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    tokenizer_dir = SHARED / "tokenizers" / "llama2"
    tokenizer = load_tokenizer(str(tokenizer_dir))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**MODEL)).save_pretrained(root / "hf")

    # Pairs both trainers tokenize identically and that fit untruncated.
    rows = plain_rows()
    ours = mdpo_ids(write_jsonl(root / "all.jsonl", rows), tokenizer, args.max_length)
    fitting = [rows[i] for i, *_ in ours]
    trainer, _ = trl_trainer(root / "hf", tokenizer, fitting, args, root / "trl_probe")
    theirs = trainer.train_dataset
    same = [k for k, (_, p, c, r) in enumerate(ours)
            if (theirs[k]["prompt_ids"], theirs[k]["chosen_ids"], theirs[k]["rejected_ids"]) == (p, c, r)]  # fmt: skip
    needed = args.steps * args.global_batch
    if len(same) < needed:
        sys.exit(f"only {len(same)} pairs tokenize identically in both; {needed} needed")
    pairs = [fitting[k] for k in same][:needed]
    lengths = [ours[k] for k in same][:needed]
    data = write_jsonl(root / "pairs.jsonl", pairs)
    sampler = PairSampler(len(pairs), args.global_batch, seed=0)
    order = [i for step in range(args.steps) for i in sampler.global_batch(step)]
    tokens = sum(2 * len(lengths[i][1]) + len(lengths[i][2]) + len(lengths[i][3]) for i in order)
    print(f"{len(same)} of {len(rows)} pairs fit {args.max_length} tokens and tokenize identically; using {needed}; "
          f"{tokens} trained tokens over {args.steps} steps")  # fmt: skip

    trainer, timer = trl_trainer(root / "hf", tokenizer, [pairs[i] for i in order], args, root / "trl")
    trainer.train()
    trl_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    runs = {"TRL DPOTrainer (online reference)": {"losses": trl_losses, "step_s": timer.steps, "precompute_s": 0.0}}
    runs["mdpo padded, online reference"] = run_mdpo("padded", root, root / "hf", data, tokenizer_dir, args)
    runs["mdpo packed, online reference"] = run_mdpo("packed", root, root / "hf", data, tokenizer_dir, args,
                                                     "data.packing=true")  # fmt: skip
    runs["mdpo packed, precomputed reference"] = run_mdpo("precomputed", root, root / "hf", data, tokenizer_dir, args,
                                                          "data.packing=true", "dpo.reference=precomputed")  # fmt: skip

    base = tokens / sum(runs["TRL DPOTrainer (online reference)"]["step_s"])
    print(f"\n{'run':<38} {'tokens/s':>9} {'x TRL':>6} {'max |loss - TRL loss|':>22} {'precompute s':>13}")
    for name, run in runs.items():
        rate = tokens / sum(run["step_s"])
        diff = max(abs(a - b) for a, b in zip(run["losses"], trl_losses, strict=True))
        print(f"{name:<38} {rate:>9.0f} {rate / base:>6.2f} {diff:>22.2e} {run['precompute_s']:>13.1f}")
    print(
        f"(CPU, {args.threads} threads; loss at step 1 / {args.steps}: TRL {trl_losses[0]:.6f} / {trl_losses[-1]:.6f})"
    )


if __name__ == "__main__":
    main()
