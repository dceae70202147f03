"""Under torchrun (TP = world size): mdpo.training.vocab_head.token_logps on each case's vocab shard of this rank.

usage: torchrun --nproc_per_node=2 vocab_head_tp2.py CASES.pt OUT_DIR

Each case holds the full (padded) weight; this rank takes its rows, as ColumnParallelLinear does. With "sp" the
rank holds only its slice of the tokens and gathers them the way a sequence-parallel caller must: with
tensor_parallel_output_grad=False, as token_logps already all-reduces hidden's gradient. Writes OUT_DIR/rank{r}.pt.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def main(cases_file: str, out_dir: str) -> None:
    from mdpo import parallel, startup

    startup.prepare()
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    from mdpo.config import Layout
    from mdpo.training.vocab_head import token_logps

    tp = int(os.environ["WORLD_SIZE"])
    parallel.start(Layout(tp=tp))
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    rank = parallel_state.get_tensor_model_parallel_rank()
    results = []
    for case in torch.load(cases_file):
        v_local = case["weight"].shape[0] // tp
        weight = case["weight"][rank * v_local : (rank + 1) * v_local].clone().requires_grad_()
        if case["sp"]:
            n_local = case["hidden"].shape[0] // tp
            local = case["hidden"][rank * n_local : (rank + 1) * n_local].clone().requires_grad_()
            hidden = gather_from_sequence_parallel_region(local, tensor_parallel_output_grad=False)
        else:
            local = hidden = case["hidden"].clone().requires_grad_()
        logps, means, square = token_logps(
            hidden, weight, case["labels"], case["vocab_size"], case["chunk_tokens"], square_mass=True
        )
        (logps * case["upstream"]).sum().backward()
        results.append(
            {
                "logps": logps.detach(),
                "means": means,
                "square": square,
                "grad_hidden": local.grad,
                "grad_weight": weight.grad,
            }
        )
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    parallel.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
