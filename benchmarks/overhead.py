"""The DPO step against its floor: what mdpo's training step costs over the compute any trainer must do on the same
model and micro-batches, as a ratio, in one invocation.

    python benchmarks/overhead.py [--repeats 3] [--global-batch 8] [--max-length 512] [--pack-tokens 2048] [--out F]

DPO step: `Trainer.train_step(step)` of a real `Trainer` (packed rows, shared prompt), with the precomputed
reference (mdpo's own `precompute-ref` run first, once per model) and with the online reference. Floor: the same
step's micro-batches (built as `Trainer._train_step` builds them) through `run_schedule` (Megatron-Core's
`forward_backward_func`) with a bare loss, the sum of the sequences' log-probs from the same chunked vocab-parallel
`Scorer.stats` the trainer uses; with the online reference also the reference's forward-only pass; then the
gradient buffers zeroed before and `optimizer_step` after, as the trainer does. Both sides run on the trainer's own
policy chunks, optimizer and run, alternating (DPO, floor, DPO, floor, ...) on the same step's pairs; the ratio is
the median of the per-step ratios DPO / floor.

Rows: a dense Llama (Llama 2 tokenizer) and a Qwen3-MoE (Qwen tokenizer; transformers' pooled load-balancing loss
weighted 0.01), each in one process and at TP=2 (this script again under `torch.distributed.run`, with a timeout).
Data: every row of ../shared/data/ultrafeedback_binarized_sample_200.jsonl. A row above `--profile-above` gets one
DPO step and one floor step (the same pairs) under cProfile and the functions that make the difference printed.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "ultrafeedback_binarized_sample_200.jsonl"
TOKENIZERS = {"dense": SHARED / "tokenizers" / "llama2", "moe": SHARED / "tokenizers" / "qwen2"}
DENSE = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
MOE = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    norm_topk_prob=True,
    router_aux_loss_coef=0.01,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
T = TypeVar("T")
CHILD = "MDPO_OVERHEAD_CHILD"  # set in the processes that measure; the parent only prepares and reports


# ---------------------------------------------------------------------------------------------- the floor


def _floor_loss(batch, scorer, model: torch.nn.Module, output: torch.Tensor):
    """The bare loss: the summed log-probs of the micro-batch's sequences (the trainer's own chunked vocab-parallel
    `Scorer.stats`), the pair count for Megatron's per-token division, no metrics."""
    stats = scorer.stats(batch, model, output)
    return stats.logps.sum(), torch.tensor(batch.num_pairs, dtype=torch.int, device=output.device), {}


def _floor_forward_step(scorer, data_iterator, model: torch.nn.Module):
    batch = next(data_iterator)
    return scorer.forward(batch, model), partial(_floor_loss, batch, scorer, model)


def floor_step(trainer, step: int, online: bool) -> int:
    """The floor on `step`'s micro-batches: collation, the online reference's forward (`online`), the policy's
    forward and backward with the bare loss, the optimizer step; no objective, metrics or router sums. Returns the
    number of micro-batches."""
    from mdpo.data.batching import rank_share
    from mdpo.training.optimizer import optimizer_step
    from mdpo.training.step import run_schedule

    layout, ranks = trainer.run.layout, trainer.run.ranks
    microbatches = trainer._microbatches(
        rank_share(trainer.sampler.global_batch(step), ranks.dp, layout.dp), trainer.train_pairs
    )
    if online:
        trainer.reference.logps(microbatches, "train")
    experts = trainer.run.experts
    if experts is not None and experts.sums is not None:
        experts.sums.start(None)  # the routers record nothing, as in a reference's forward
    for chunk in trainer.policy:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    run_schedule(partial(_floor_forward_step, trainer.run.scorer), microbatches, trainer.policy, forward_only=False)
    optimizer_step(trainer.optimizer, True)
    return len(microbatches)


def timed(run: Callable[[], T]) -> tuple[float, float, T]:
    """Wall seconds (perf_counter, the GPU synchronised), this process's CPU seconds (all its threads: less moved by
    other processes' load on a shared machine) and the result of `run()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, result


# ---------------------------------------------------------------------------------------------- profiles


def _where(key: tuple[str, int, str]) -> str:
    path, line, name = key
    for root in (str(REPO) + "/", "site-packages/"):
        if root in path:
            path = path.split(root, 1)[1]
    return f"{name} ({path}:{line})" if path != "~" else name


# the DPO step's functions and their counterparts in the floor
_COUNTERPARTS = {"_train_step": "floor_step", "_dpo_loss": "_floor_loss", "dpo_forward_step": "_floor_forward_step"}


def own_work(dpo: dict, floor: dict) -> float:
    """Seconds of the DPO step's own work in two cProfile tables (pstats' {function: (calls, primitive calls, self
    s, cumulative s, {caller: (..., cumulative s)})}): the self time of the functions the floor never calls, plus
    each call such a function makes to one the floor has, unless the floor's counterpart of the caller (the floor
    step for `_train_step`, the bare loss for `_dpo_loss`, ...) makes that call too: that is the shared compute."""
    floor_by_name = {key[2]: key for key in floor}
    own = {key for key in dpo if key not in floor}
    twin = {key: floor_by_name.get(_COUNTERPARTS.get(key[2], "")) for key in own}
    total = 0.0
    for key, (_, _, self_s, _, callers) in dpo.items():
        if key in own:
            total += self_s
            continue
        floor_callers = floor[key][4] if key in floor else {}
        total += sum(edge[3] for caller, edge in callers.items() if caller in own and twin[caller] not in floor_callers)
    return total


def profile_difference(trainer, step: int, online: bool, top: int = 12) -> str:
    """One DPO step and one floor step on the same pairs under cProfile: the DPO step's parts against their
    counterparts in the floor (cumulative time), the functions only the DPO step calls (cumulative), and the
    functions both call whose cumulative time grew most. A compute function's time varies by a few percent from
    one call to the next on a shared machine: small differences in the last list are noise."""
    profiles = []
    for run in (lambda: trainer.train_step(step), lambda: floor_step(trainer, step, online)):
        profile = cProfile.Profile()
        profile.enable()
        run()
        profile.disable()
        profiles.append(pstats.Stats(profile).stats)
    dpo, floor = profiles
    by_name = lambda stats, name: next((v for k, v in stats.items() if k[2] == name), (0, 0, 0.0, 0.0))
    floor_s = by_name(floor, "floor_step")[3]
    own = own_work(dpo, floor)
    lines = [
        f"  the DPO step's own work: {own:.4f} s = {own / floor_s * 100:.2f}% of the floor step under cProfile "
        f"({floor_s:.3f} s): the self time of the functions only it calls plus the calls they (and its counterparts "
        "of the floor's functions) make that the floor does not; cProfile inflates Python calls, so an upper bound",
        "  the DPO step's parts against the floor's (cumulative s, calls; shared compute and its noise included):",
    ]
    for ours, theirs in _COUNTERPARTS.items():
        a, b = by_name(dpo, ours), by_name(floor, theirs)
        lines.append(f"    {a[3]:8.4f} vs {b[3]:8.4f}  {a[3] - b[3]:+8.4f}  {ours} ({a[1]}) vs {theirs} ({b[1]})")
    only = [(v[3], k) for k, v in dpo.items() if k not in floor and k[2] not in (*_COUNTERPARTS, "train_step")]
    lines.append("  functions only the DPO step calls (cumulative s, calls; nested ones count in their callers too):")
    for cumulative, key in sorted(only, reverse=True)[:top]:
        lines.append(f"    {cumulative:8.4f}  {dpo[key][1]:>5}  {_where(key)}")
    small = 0.05 * floor_s  # larger ones hold the shared compute and its noise
    grown = [(v[3] - floor[k][3], k) for k, v in dpo.items() if k in floor and floor[k][3] < small]
    lines.append(
        "  functions both call (under 5% of the floor step), most cumulative time added (s, calls DPO / floor):"
    )
    for diff, key in sorted(grown, reverse=True)[:top]:
        lines.append(f"    {diff:+8.4f}  {dpo[key][1]:>5} / {floor[key][1]:<5} {_where(key)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- one process


def measure(opts: argparse.Namespace) -> None:
    """In a child (one process, or each rank under torchrun): build the Trainer, time the rows, write the result
    (global rank 0) to `opts.result`."""
    from mdpo import startup

    startup.prepare()
    torch.set_num_threads(opts.threads)
    from mdpo.cli import load_run_config
    from mdpo.training.reference import build_reference
    from mdpo.training.trainer import Trainer

    cfg = load_run_config(None, json.loads(opts.overrides))
    trainer = Trainer(cfg)
    try:
        rank0 = trainer.run.is_logger
        precomputed_cfg = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, reference="precomputed"))
        references = {
            "precomputed": build_reference(precomputed_cfg, trainer.run, splits={"train": trainer.train_pairs}),
            "online": trainer.reference,  # what the trainer built for dpo.reference=online: a frozen copy
        }
        rows, step = [], 0
        for mode, reference in references.items():
            trainer.reference = reference
            online = mode == "online"
            for _ in range(opts.warmup):  # the first steps of a reference (and of the run) pay one-time costs
                trainer.train_step(step)
                step += 1
            times = {"dpo": [], "floor": [], "dpo_cpu": [], "floor_cpu": [], "tokens": [], "microbatches": []}
            for repeat in range(opts.repeats):
                runs = {"dpo": partial(trainer.train_step, step), "floor": partial(floor_step, trainer, step, online)}
                for side in ("dpo", "floor") if repeat % 2 == 0 else ("floor", "dpo"):  # DPO, floor, floor, DPO, ...
                    wall, cpu, result = timed(runs[side])
                    times[side].append(wall)
                    times[f"{side}_cpu"].append(cpu)
                    times["tokens" if side == "dpo" else "microbatches"].append(
                        result["num_tokens_computed"] if side == "dpo" else result
                    )
                if rank0:
                    seconds = f"dpo {times['dpo'][-1]:.3f} s, floor {times['floor'][-1]:.3f} s"
                    print(f"[overhead] {mode} step {step}: {seconds}", flush=True)
                step += 1
            row = dict(mode=mode, **times)
            row["ratio"] = statistics.median(d / f for d, f in zip(times["dpo"], times["floor"]))
            row["cpu_ratio"] = statistics.median(d / f for d, f in zip(times["dpo_cpu"], times["floor_cpu"]))
            if row["ratio"] > opts.profile_above:
                row["profile"] = profile_difference(trainer, step, online)
                step += 1
            rows.append(row)
        if rank0:
            Path(opts.result).write_text(json.dumps({"pairs": len(trainer.train_pairs), "rows": rows}))
    finally:
        trainer.lock.release()
        from mdpo import parallel

        parallel.stop()


# ---------------------------------------------------------------------------------------------- the parent


def _run(command: list[str], env: dict, timeout: int, what: str) -> None:
    """A child under `timeout` (torchrun and gloo can hang), its output on stderr (progress; stdout keeps the
    table)."""
    result = subprocess.run(["timeout", "-k", "10", str(timeout), *command], env=env, stdout=sys.stderr)
    if result.returncode:
        sys.exit(f"{what} failed (exit {result.returncode}{': timed out' if result.returncode == 124 else ''})")


def _hf_model(kind: str, folder: Path, vocab: int) -> str:
    """A random HF model folder (seeded); its shape in words."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    if kind == "dense":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **DENSE))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=vocab, **MOE))
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    shape = DENSE if kind == "dense" else MOE
    experts = f", {shape['num_experts']} experts top {shape['num_experts_per_tok']}" if kind == "moe" else ""
    return (
        f"{type(model).__name__[: -len('ForCausalLM')]} hidden {shape['hidden_size']}, "
        f"{shape['num_hidden_layers']} layers, {shape['num_attention_heads']}/{shape['num_key_value_heads']} heads"
        f"{experts}, vocab {vocab}: {params:.1f}M parameters"
    )


def _prepare(kind: str, root: Path, opts: argparse.Namespace) -> tuple[str, list[str]]:
    """The model's HF folder and the run's overrides; the model, tokenizer and template in words."""
    from mdpo.data.encoding import load_tokenizer

    tokenizer = load_tokenizer(str(TOKENIZERS[kind]))
    vocab = 32000 if kind == "dense" else 151936  # Llama 2's vocabulary; Qwen's 151,665 ids padded as Qwen pads them
    template = "the tokenizer's chat template" if tokenizer.chat_template else "Tulu 2 (no chat template)"
    shape = f"{_hf_model(kind, root / kind, vocab)}; tokenizer {TOKENIZERS[kind]} ({len(tokenizer)} ids), {template}"
    overrides = [
        f"model.init_from={root / kind}",
        f"data.train_file={DATA}",
        f"data.tokenizer={TOKENIZERS[kind]}",
        f"data.max_length={opts.max_length}",
        "data.packing=true",
        f"data.pack_tokens={opts.pack_tokens}",
        f"data.cache_dir={root / 'data_cache'}",
        f"schedule.global_batch_size={opts.global_batch}",
        "schedule.train_steps=1000",
        f"dpo.reference_cache={root / kind / 'reference'}",
        "logging.progress=false",
        "logging.plot=false",
        "checkpoint.export_hf=false",
        "checkpoint.save_at_end=false",
    ]
    return shape, overrides + (["dpo.router_aux_loss_coef=0.01"] if kind == "moe" else [])


def _child_env(threads: int) -> dict[str, str]:
    quiet = {"PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    return {**os.environ, **quiet, CHILD: "1", "OMP_NUM_THREADS": str(threads)}


def _measure_in_child(kind: str, tp: int, overrides: list[str], root: Path, opts: argparse.Namespace) -> dict:
    """`measure` in one process, or at TP > 1 in `tp` processes under torch.distributed.run; its result."""
    result = root / f"{kind}_tp{tp}.json"
    threads = opts.threads if tp == 1 else max(1, opts.threads // tp)
    launcher = [sys.executable]
    if tp > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}"]
    arguments = {
        "--threads": threads,
        "--repeats": opts.repeats,
        "--warmup": opts.warmup,
        "--profile-above": opts.profile_above,
        "--result": result,
        "--overrides": json.dumps([*overrides, f"parallel.tp={tp}", f"logging.run_dir={root / kind}/tp{tp}"]),
    }
    command = [*launcher, __file__, *(str(x) for item in arguments.items() for x in item)]
    _run(command, _child_env(threads), opts.timeout, f"{kind} tp{tp}")
    return json.loads(result.read_text())


def _machine() -> str:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores ({model})"
    return f"{device}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed DPO + floor pairs per row, after warm-up")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--pack-tokens", type=int, default=2048)
    parser.add_argument("--models", default="dense,moe")
    parser.add_argument("--tp", default="1,2")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of one process (TP=2: 1 per rank)")
    parser.add_argument("--profile-above", type=float, default=1.05)
    parser.add_argument("--timeout", type=int, default=600, help="seconds for each child process")
    parser.add_argument("--out", default=None, help="also write the printed output to this file")
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if os.environ.get(CHILD):
        measure(opts)
        return

    import megatron.core
    import transformers

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="mdpo-overhead-"))
    shapes, precompute_s, results = {}, {}, {}
    try:
        for kind in opts.models.split(","):
            shapes[kind], overrides = _prepare(kind, root, opts)
            begun = time.perf_counter()
            command = [sys.executable, "-m", "mdpo", "precompute-ref", *overrides, f"logging.run_dir={root / kind}/pre"]
            _run(command, _child_env(opts.threads), opts.timeout, f"{kind} precompute-ref")
            precompute_s[kind] = time.perf_counter() - begun
            for tp in (int(size) for size in opts.tp.split(",")):
                results[kind, tp] = _measure_in_child(kind, tp, overrides, root, opts)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    out = [
        f"# python benchmarks/overhead.py {' '.join(sys.argv[1:])}".rstrip(),
        f"machine: {_machine()}",
        f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
        f"transformers {transformers.__version__}",
        f"data: every row of {DATA} (mdpo's UltraFeedback reader, data.template auto, data.over_length truncate)",
    ]
    for kind, shape in shapes.items():
        pairs = next(r["pairs"] for (k, _), r in results.items() if k == kind)
        out.append(
            f"{kind}: {shape}; {pairs} of the 200 pairs kept at max_length {opts.max_length} (the rest: prompt >= "
            f"max_length); precompute-ref {precompute_s[kind]:.1f} s (its process, once)"
        )
    out += [
        f"batch: {opts.global_batch} pairs a step, max_length {opts.max_length}, packed into {opts.pack_tokens}-token "
        "rows, each pair's prompt shared; fp32; MoE: transformers' pooled load-balancing loss, coef 0.01 (TP=2: "
        "sequence parallelism on, auto)",
        f"steps: per row {opts.warmup} warm-up DPO step(s), then {opts.repeats} timed DPO steps, each with the floor "
        "on the same step's pairs (DPO first, then floor first, alternately); median s (min-max); ratio = median "
        "of the per-step ratios DPO / floor "
        "(wall time, perf_counter); cpu-time ratio = the same of this process's CPU time (rank 0's at TP=2), "
        "less moved by other processes' load",
        f"threads: {opts.threads} for one process, {max(1, opts.threads // 2)} per rank at TP=2",
        "",
    ]
    fmt = lambda xs: f"{statistics.median(xs):.3f} s ({min(xs):.2f}-{max(xs):.2f})"
    profiles, details = [], []
    for (kind, tp), result in results.items():
        for row in result["rows"]:
            name = f"{kind:<5}  tp{tp}  {row['mode']:<11}  packed shared"
            out.append(
                f"{name}  dpo {fmt(row['dpo'])}  floor {fmt(row['floor'])}  cpu-time ratio {row['cpu_ratio']:.2f}  "
                f"ratio {row['ratio']:.2f}"
            )
            steps = ", ".join(f"{d:.2f}/{f:.2f}" for d, f in zip(row["dpo"], row["floor"]))
            details.append(
                f"{name}: {statistics.median(row['tokens']):.0f} tokens computed, "
                f"{statistics.median(row['microbatches']):.0f} micro-batches a step (medians); dpo/floor s: {steps}"
            )
            if "profile" in row:
                profiles.append(f"{name}: ratio {row['ratio']:.2f}\n{row['profile']}")
    out += ["", "per step:", *details]
    if profiles:
        out += ["", f"profiles (rows above {opts.profile_above}; one DPO step and one floor step, same pairs):"]
        out += profiles
    out.append(f"\n(whole invocation {time.perf_counter() - started:.0f} s)")
    text = "\n".join(out)
    print(text)
    if opts.out:
        Path(opts.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
