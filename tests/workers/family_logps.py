"""Under torchrun: every model folder's per-sequence log-probs at several layouts, each through what training runs
(`build_model` streaming the HF folder per rank, the micro-batches of the layout, an online reference's
forward-only schedule),
one process group for all of them (Megatron's groups made once per layout).

usage: torchrun --nproc_per_node=N family_logps.py LAYOUTS OUT.pt PAIRS.pt FOLDER [FOLDER ...]
LAYOUTS: comma-separated names of LAYOUTS (expert-parallel ones run the mixture-of-experts folders only);
PAIRS.pt: [(prompt ids, chosen ids, rejected ids, input row), ...];
OUT.pt: {layout: {folder: tensor [chosen..., rejected...]}}.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")

# name: (parallel section, data section, model overrides); every layout has DP = world / (TP x PP x CP). Dense models
# run the layouts without experts, mixtures of experts those with EP and MOE_TOO (MoE training under TP needs SP).
LAYOUTS = {
    "tp2": (dict(tp=2), dict(), dict()),
    "tp2_sp_packed_shared": (dict(tp=2, sequence_parallel=True), dict(packing=True, share_prompt=True), dict()),
    "pp2_vpp2_shared": (dict(pp=2, vpp=2), dict(share_prompt=True), dict()),
    "pp2_packed_fused_rope": (dict(pp=2), dict(packing=True), dict(fused_rope=True)),
    "cp2": (dict(cp=2), dict(share_prompt=False), dict(attention="sdpa")),
    # mixtures of experts: the experts split over 2 EP ranks (which are DP ranks of the dense part); with TP = 2 and
    # sequence parallelism, experts whole on each rank (ETP = 1); with PP = 2 (4 processes)
    "ep2": (dict(ep=2, distributed_optimizer=True), dict(), dict()),
    "tp2_sp_ep2_packed": (dict(tp=2, sequence_parallel=True, ep=2, etp=1), dict(packing=True), dict()),
    "ep2_pp2": (dict(ep=2, pp=2), dict(share_prompt=True), dict()),
}
MOE_TOO = ("tp2_sp_packed_shared", "pp2_vpp2_shared", "cp2")


def main(layouts: str, out: str, pairs_file: str, folders: list[str]) -> None:
    from mdpo import parallel, startup

    startup.prepare()
    from megatron.core import parallel_state, tensor_parallel

    from mdpo.checkpoint.description import describe_model
    from mdpo.config import DataConfig, DPOConfig, ParallelConfig, ScheduleConfig, TrainConfig
    from mdpo.data.batching import rank_share
    from mdpo.data.pairs import TokenizedPair
    from mdpo.training.data import make_microbatches
    from mdpo.training.reference import OnlineReference
    from mdpo.training.setup import build_model
    from mdpo.training.step import Scorer

    pairs = [TokenizedPair(i, *ids) for i, ids in enumerate(torch.load(pairs_file))]
    world, results, current = int(os.environ["WORLD_SIZE"]), {}, None
    for name in layouts.split(","):
        sizes, data, overrides = LAYOUTS[name]
        results[name] = {}
        for folder in folders:
            model = describe_model({"init_from": folder})
            if (sizes.get("ep", 1) > 1) != model.is_moe and name not in MOE_TOO:
                continue
            model = describe_model({"init_from": folder, **overrides})  # after the check: MLA refuses the fused RoPE
            # biased experts (gpt-oss) whole on each rank: Megatron's rule
            own_sizes = {**sizes, "etp": 1} if model.is_moe and model.linear_bias else sizes
            cfg = TrainConfig(
                model=model,
                data=DataConfig(train_file="-", tokenizer="-", max_length=48, pack_tokens=96, **data),
                parallel=ParallelConfig(**own_sizes),
                schedule=ScheduleConfig(global_batch_size=len(pairs), micro_batch_size=2),
                dpo=DPOConfig(router_aux_loss_coef=0.0),  # forward only (and no pipeline takes it)
            )
            layout = cfg.parallel.layout(world)
            if layout != current:  # Megatron's groups made once per layout: gloo keeps every group's threads
                if current is not None:
                    parallel_state.destroy_model_parallel()
                ranks, current = parallel.start(layout), layout
            tensor_parallel.model_parallel_cuda_manual_seed(0)
            reference = OnlineReference(build_model(cfg, layout, torch.float32, load=True), Scorer(cfg.model, 7, False))
            mine = rank_share(range(len(pairs)), ranks.dp, layout.dp)  # a row's pairs together, as training has them
            batches = make_microbatches(
                cfg.data, cfg.schedule, layout, pairs, mine, 0, ranks.cp, bool(cfg.data.share_prompt)
            )
            logps = reference.logps(batches)
            found = {}
            if parallel_state.is_pipeline_last_stage() and ranks.tp == ranks.cp == 0:
                for batch, both in zip(batches, logps, strict=True):
                    chosen, rejected = both.chunk(2)
                    found.update({p: (chosen[k], rejected[k]) for k, p in enumerate(batch.pair_ids)})
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, found)
            table = {pid: logps for part in gathered for pid, logps in part.items()}
            logps = [table[i][side].item() for side in (0, 1) for i in range(len(pairs))]
            results[name][folder] = torch.tensor(logps, dtype=torch.float64)
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)
    parallel.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
