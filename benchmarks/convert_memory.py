"""Peak host memory of `mdpo convert` on a ~1B-parameter random Llama (bf16, sharded safetensors).

    python benchmarks/convert_memory.py [--out /tmp/convert_bench] [--layouts 1x1 2x2]

Writes the HF folder shard by shard (never holding the model), then runs hf-to-megatron at each layout and
megatron-to-hf once, sampling memory every 50 ms. Prints a table: the peak of the whole process tree's proportional
set size (PSS: pages shared between processes, e.g. the checkpoint writer's forked workers, counted once), the peak
RSS of the largest single process, and the model's and largest shard's size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

# TinyLlama-1.1B's shape: 22 layers, hidden 2048, 32 heads / 4 KV heads, MLP 5632, vocab 32000.
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
LAYERS_PER_SHARD = 4


def write_model(folder: Path) -> None:
    c = CONFIG
    h, f, v, kv = c["hidden_size"], c["intermediate_size"], c["vocab_size"], 2048 // 32 * c["num_key_value_heads"]
    rand = lambda *shape: (0.02 * torch.randn(*shape)).to(torch.bfloat16)
    shards = [{"model.embed_tokens.weight": rand(v, h)}]
    for i in range(c["num_hidden_layers"]):
        if i % LAYERS_PER_SHARD == 0:
            shards.append({})
        p = f"model.layers.{i}."
        shards[-1].update(
            {
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "self_attn.q_proj.weight": rand(h, h),
                p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h),
                p + "self_attn.o_proj.weight": rand(h, h),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "mlp.gate_proj.weight": rand(f, h),
                p + "mlp.up_proj.weight": rand(f, h),
                p + "mlp.down_proj.weight": rand(h, f),
            }
        )
    shards.append({"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rand(v, h)})
    folder.mkdir(parents=True)
    weight_map = {}
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shards[k] = None  # keep one shard in memory at a time
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(CONFIG))


def peak_rss(cmd: list[str]) -> tuple[float, float, float]:
    """(seconds, peak PSS of the process tree, peak RSS of its largest process), in GiB, sampled every 50 ms."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    tree_peak = single_peak = 0
    while proc.poll() is None:
        try:
            info = [p.memory_full_info() for p in [root, *root.children(recursive=True)]]
        except psutil.Error:
            continue
        tree_peak = max(tree_peak, sum(i.pss for i in info))
        single_peak = max(single_peak, max(i.rss for i in info))
        time.sleep(0.05)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-2000:]}")
    return time.time() - start, tree_peak / 2**30, single_peak / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/mdpo_convert_bench")
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x2"], help="TPxPP layouts to write with")
    args = parser.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    write_model(root / "hf")
    files = sorted((root / "hf").glob("*.safetensors"))
    model_gib = sum(f.stat().st_size for f in files) / 2**30
    shard_gib = max(f.stat().st_size for f in files) / 2**30
    mdpo = [sys.executable, "-m", "mdpo", "convert"]
    rows = []
    for layout in args.layouts:
        tp, pp = layout.split("x")
        out = root / f"mc_{layout}"
        cmd = [*mdpo, "hf-to-megatron", "--hf", str(root / "hf"), "--out", str(out), "--tp", tp, "--pp", pp]
        rows.append((f"hf-to-megatron TP{tp} PP{pp}", *peak_rss(cmd)))
    first = root / f"mc_{args.layouts[0]}"
    rows.append(
        ("megatron-to-hf", *peak_rss([*mdpo, "megatron-to-hf", "--ckpt", str(first), "--out", str(root / "back")]))
    )
    params = sum(torch.Size(s).numel() for s in _shapes(root / "hf")) / 1e9
    print(
        f"model: {params:.2f}B parameters, bf16, {model_gib:.2f} GiB in {len(files)} shards "
        f"(largest {shard_gib:.2f} GiB)"
    )
    print(f"{'command':<28} {'seconds':>8} {'peak PSS, all processes':>24} {'largest process':>16}")
    for name, seconds, tree, single in rows:
        print(f"{name:<28} {seconds:>8.1f} {tree:>20.2f} GiB {single:>12.2f} GiB")


def _shapes(folder: Path):
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                yield f.get_slice(name).get_shape()


if __name__ == "__main__":
    main()
