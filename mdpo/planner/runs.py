"""Real `mdpo train` runs, measured: what benchmarks/bench_dpo.py reports and what the planner's predictions are
checked against (`validation`). The pairs are synthetic (digit strings of the demo tokenizer, every sequence
`seq_len` tokens, so only the model's shape and the layout matter) or a real data file with its tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mdpo.config import ModelConfig
from mdpo.data.synthetic import build_demo_tokenizer

# a measured run: no warmup (every timed step at the full rate), no files it does not need
_QUIET = (
    "schedule.warmup_ratio=0",
    "logging.progress=false",
    "logging.plot=false",
    "checkpoint.export_hf=false",
    "checkpoint.save_at_end=false",
)


def _digits(n: int, k: int) -> str:
    return "".join(str((k * 7 + i * 3) % 10) for i in range(n))


def run_config(
    model: ModelConfig,
    *,
    seq_len: int,
    micro_batch: int = 1,
    steps: int = 6,
    warmup: int = 2,
    nproc: int = 1,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    ep: int = 1,
    reference: str = "online",
    packing: bool = False,
    attention: str = "auto",
    global_batch: int | None = None,
    prompt_len: int | None = None,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    real_data: tuple[Path, Path] | None = None,
) -> dict[str, Any]:
    """Train `steps` steps in a fresh process (torchrun when nproc > 1), a model of `model`'s shape, on synthetic
    pairs (every sequence seq_len tokens) or on `real_data` (an UltraFeedback file and its tokenizer, the Tulu 2
    template, data.max_length seq_len); the mean step time, tokens (as TRL counts them, and as computed) and the
    peak memory over the steps after `warmup`. A failed run exits with the end of its stderr (these runs are the
    benchmarks' whole point)."""
    gbs = global_batch or 4 * micro_batch * max(1, nproc // (tp * pp * cp))
    root = Path(os.environ.get("MDPO_BENCH_DIR", tempfile.mkdtemp(prefix="mdpo_bench_")))
    if real_data is None:
        data_overrides = _synthetic_pairs(root, seq_len, prompt_len or seq_len // 4, gbs * steps)
    else:
        data_overrides = [f"data.train_file={real_data[0]}", f"data.tokenizer={real_data[1]}"]
        data_overrides += ["data.format=ultrafeedback", "data.template=tulu2"]
    overrides = [*_model_overrides(model, max(4096, seq_len), attention), *data_overrides]
    overrides += [f"data.max_length={seq_len}", f"data.packing={packing}", f"parallel.tp={tp}", f"parallel.pp={pp}"]
    overrides += [f"parallel.cp={cp}", f"parallel.ep={ep}", f"schedule.global_batch_size={gbs}"]
    overrides += [f"schedule.micro_batch_size={micro_batch}"]
    overrides += [f"schedule.train_steps={steps}", f"dpo.reference={'none' if reference == 'none' else 'online'}"]
    overrides += [f"logging.run_dir={root / 'run'}", *_QUIET, *extra]
    if packing:  # a pack holds a micro-batch's worth of pairs
        overrides.append(f"data.pack_tokens={2 * seq_len * micro_batch}")
    if reference == "none":
        overrides.append("dpo.loss_type=apo_zero")  # a loss defined without a reference: same compute as precomputed
    _train(overrides, nproc, env)
    records = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"global_batch": gbs, **_measured([r for r in records if "loss" in r][warmup:])}


def _train(overrides: list[str], nproc: int, env: dict[str, str] | None) -> None:
    """`mdpo train` in a fresh process (torchrun when nproc > 1); a failure exits with the end of its stderr."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [*(launcher if nproc > 1 else [sys.executable]), "-m", "mdpo", "train", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode:
        sys.exit(result.stderr[-3000:])


def _model_overrides(model: ModelConfig, positions: int, attention: str) -> list[str]:
    """The model's shape (every field the planner counts) and kernels as `mdpo train` overrides."""
    fields = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "head_dim",
        "qkv_bias",
        "qk_norm",
        "qk_norm_span",
        "norm_position",
        "zero_centered_norms",
        "hidden_act",
        "tie_word_embeddings",
        "fused_swiglu",
        "fused_rope",
        "num_experts",
        "moe_topk",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "moe_layers",
        "router_aux_loss_coef",
    )
    shape = [f"model.{name}={'null' if getattr(model, name) is None else getattr(model, name)}" for name in fields]
    return [
        *shape,
        f"model.num_key_value_heads={model.kv_heads}",
        f"model.max_position_embeddings={positions}",
        f"model.attention={attention}",
    ]


def _measured(timed: list[dict]) -> dict[str, float]:
    """Mean step time and tokens (as TRL counts them, and as computed) and the peak memory of the timed steps."""
    return {
        "step_s": sum(r["num_tokens"] / r["tokens_per_second"] for r in timed) / len(timed),
        "tokens": sum(r["num_tokens"] for r in timed) / len(timed),
        "computed_tokens": sum(r["num_tokens_computed"] for r in timed) / len(timed),
        "peak_memory_gib": max(r["peak_memory_gib"] for r in timed),
    }


def _synthetic_pairs(root: Path, seq_len: int, prompt_len: int, count: int) -> list[str]:
    """`count` pairs of digit strings, every sequence seq_len tokens of the demo tokenizer: the data overrides."""
    data = root / "pairs.jsonl"
    build_demo_tokenizer(root / "tokenizer")
    # The demo tokenizer puts BOS first and the trainer appends EOS: a prompt of prompt_len - 1 characters.
    response = seq_len - prompt_len - 1
    rows = [
        {"prompt": _digits(prompt_len - 1, k), "chosen": _digits(response, k + 1), "rejected": _digits(response, k + 2)}
        for k in range(count)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"data.train_file={data}", f"data.tokenizer={root / 'tokenizer'}", "data.format=plain", "data.template=raw"]
