"""The optimizer pass of one step, before and after issue 29: mdpo's finiteness check (prepare the gradients, their
norm) followed by Megatron's `step()` (both again, then clip and update) vs `training.optimizer.optimizer_step`
(each once), side by side in one invocation on benchmarks/training_modes.py's model, with a forward + backward for
scale.

    python benchmarks/optimizer_pass.py [--repeats 30] [--hidden 512] [--layers 8] [--distributed-optimizer]

One process, fp32 on CPU (bf16 with CUDA); the two passes alternate on the same gradients, medians printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--distributed-optimizer", action="store_true")
    opts = parser.parse_args()

    from mdpo import parallel, startup

    startup.prepare()
    from megatron.core import tensor_parallel

    from mdpo.config import Layout, ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig
    from mdpo.training.optimizer import build_optimizer, optimizer_step, wrap_ddp
    from mdpo.training.setup import build_model, train_dtype

    parallel.start(Layout())
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = ModelConfig(
        vocab_size=128,
        hidden_size=opts.hidden,
        intermediate_size=4 * opts.hidden,
        num_hidden_layers=opts.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=128,
    )
    cfg = TrainConfig(
        model=model,
        optimizer=OptimizerConfig(lr=1e-6, clip_grad=1.0),
        parallel=ParallelConfig(distributed_optimizer=opts.distributed_optimizer),
    )
    dtype = train_dtype(cfg.parallel)
    (chunk,) = build_model(cfg, Layout(), dtype, load=False)
    policy = [wrap_ddp(cfg, chunk)]
    optimizer = build_optimizer(cfg, policy, dtype)
    device = next(chunk.parameters()).device
    tokens = torch.randint(0, 128, (16, 64), device=device)  # a micro-batch of training_modes.py's size
    positions = torch.arange(64, device=device).expand(16, -1)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None

    def backward() -> float:
        start = time.perf_counter()
        policy[0].zero_grad_buffer()
        hidden = policy[0](input_ids=tokens, position_ids=positions, attention_mask=None)
        hidden.float().pow(2).mean().backward()
        policy[0].finish_grad_sync()
        sync()
        return time.perf_counter() - start

    def before() -> None:  # what the trainer ran until issue 29
        optimizer.prepare_grads()
        float(optimizer.get_grad_norm())
        optimizer.step()

    times: dict[str, list[float]] = {"forward + backward": [], "before: check + step()": [], "one pass": []}
    for _ in range(opts.repeats):
        times["forward + backward"].append(backward())
        for name, fn in (("before: check + step()", before), ("one pass", lambda: optimizer_step(optimizer, True))):
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    params = sum(p.numel() for p in chunk.parameters())
    print(
        f"model: hidden {opts.hidden}, {opts.layers} layers, {params / 1e6:.1f}M parameters, {dtype}, "
        f"distributed optimizer {opts.distributed_optimizer}; {opts.repeats} repeats, medians"
    )
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    for name, ms in medians.items():
        print(f"{name:<24} {ms:8.2f} ms")
    saved = medians["before: check + step()"] - medians["one pass"]
    print(
        f"one pass / before: x{medians['one pass'] / medians['before: check + step()']:.3f}; saved {saved:.2f} ms "
        f"a step ({saved / (medians['forward + backward'] + medians['before: check + step()']) * 100:.1f}% of "
        "forward + backward + optimizer)"
    )
    parallel.stop()


if __name__ == "__main__":
    main()
