"""Under torchrun: load converted checkpoints into mdpo's GPTModel at TP = world size and save their full logits.

usage: torchrun --nproc_per_node=TP convert_logits.py OUT.pt TOKENS.pt CKPT [CKPT ...]
"""

from __future__ import annotations

import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def main(out: str, tokens_file: str, ckpts: list[str]) -> None:
    from mdpo import parallel, startup

    startup.prepare()
    from megatron.core import parallel_state, tensor_parallel

    from mdpo.checkpoint.description import describe_model
    from mdpo.checkpoint.load import load_initial_weights
    from mdpo.config import Layout
    from mdpo.models.gpt import build_gpt_model, transformer_config

    tp = int(__import__("os").environ.get("WORLD_SIZE", 1))
    parallel.start(Layout(tp=tp))
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    tokens = torch.load(tokens_file)
    b, s = tokens.shape
    positions = torch.arange(s)[None].expand(b, s)
    results = {}
    for ckpt in ckpts:
        model = describe_model({"init_from": ckpt})
        module = build_gpt_model(model, transformer_config(model, tp=tp, init_weights=False)).eval()
        load_initial_weights(module, model)
        with torch.no_grad():
            logits = module(input_ids=tokens, position_ids=positions, attention_mask=None)  # causal; [b, s, v/tp]
        parts = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        results[ckpt] = torch.cat(parts, dim=-1)[..., : model.vocab_size]
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)
    parallel.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
