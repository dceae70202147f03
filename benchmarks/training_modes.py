"""Full tuning vs LoRA, online vs precomputed reference, on the same model and data: step time and peak memory, side
by side in one invocation.

    python benchmarks/training_modes.py [--steps 10] [--hidden 512] [--layers 8] [--lora-rank 16]

Builds a small random Llama (HF folder), the demo tokenizer and data, then runs `mdpo precompute-ref` once and
`mdpo train` four times (full tuning and LoRA, each with dpo.reference=online and =precomputed), each in its own
process so peak RSS is per run. Prints a table: median step time, tokens/s, peak RSS, and the precompute pass's
own time (paid once per data set), then the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

_WRAPPER = """
import resource, runpy, sys
sys.argv = ["mdpo", *sys.argv[1:]]
try:
    runpy.run_module("mdpo", run_name="__main__")
finally:
    print("PEAK_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def run(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one `mdpo` process."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _WRAPPER, *args], capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    peak = [line for line in result.stderr.splitlines() if line.startswith("PEAK_KIB")][-1].split()[1]
    return time.perf_counter() - start, int(peak) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=16)
    opts = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from mdpo.data.synthetic import build_demo_tokenizer, make_demo_data

    root = Path(tempfile.mkdtemp(prefix="mdpo-bench-"))
    tokenizer = build_demo_tokenizer(root / "tok")
    train, _ = make_demo_data(root / "data", n_train=64 * opts.steps, n_eval=8)
    hf = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=opts.hidden,
        intermediate_size=4 * opts.hidden,
        num_hidden_layers=opts.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(hf).save_pretrained(root / "hf")
    config = {
        "model": {"init_from": str(root / "hf")},
        "data": {"train_file": str(train), "tokenizer": str(root / "tok"), "max_length": 32, "cache": False},
        "schedule": {"global_batch_size": 64, "micro_batch_size": 16, "train_steps": opts.steps},
        "dpo": {"reference_cache": str(root / "cache")},
        "logging": {"progress": False, "plot": False},
        "checkpoint": {"export_hf": False},
    }
    (root / "c.yaml").write_text(yaml.safe_dump(config))

    rows = {}
    seconds, _ = run(["precompute-ref", str(root / "c.yaml")])
    for tuning, extra in (("full", []), (f"LoRA r{opts.lora_rank}", [f"lora.rank={opts.lora_rank}"])):
        for mode in ("online", "precomputed"):
            run_dir = root / f"{tuning}_{mode}".replace(" ", "_")
            _, peak = run(
                ["train", str(root / "c.yaml"), f"dpo.reference={mode}", f"logging.run_dir={run_dir}", *extra]
            )
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            speeds = sorted(r["tokens_per_second"] for r in records[1:])  # step 1 includes warm-up
            step_tokens = records[-1]["num_tokens"]
            median = speeds[len(speeds) // 2]
            rows[tuning, mode] = (step_tokens / median * 1000, median, peak)
    print(f"model: hidden {opts.hidden}, {opts.layers} layers; {opts.steps} steps of 64 pairs; CPU")
    print(f"precompute-ref pass over {64 * opts.steps} pairs: {seconds:.1f} s wall (once per data set)")
    print(f"{'tuning':<10} {'reference':<12} {'step ms':>9} {'tokens/s':>10} {'peak RSS MiB':>13}")
    for (tuning, mode), (ms, tps, peak) in rows.items():
        print(f"{tuning:<10} {mode:<12} {ms:>9.0f} {tps:>10.0f} {peak:>13.0f}")
    lora = f"LoRA r{opts.lora_rank}"
    for mode in ("online", "precomputed"):
        (full_ms, _, full_peak), (lora_ms, _, lora_peak) = rows["full", mode], rows[lora, mode]
        print(f"{mode}: LoRA / full: step time x{lora_ms / full_ms:.2f}, peak RSS x{lora_peak / full_peak:.2f}")
    (full_ms, _, full_peak), (pre_ms, _, pre_peak) = rows["full", "online"], rows["full", "precomputed"]
    print(f"full tuning: precomputed / online: step time x{pre_ms / full_ms:.2f}, peak RSS x{pre_peak / full_peak:.2f}")


if __name__ == "__main__":
    main()
