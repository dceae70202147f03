"""Oracle 2: TP=2, PP=2, DP=2 and TP2xPP2 runs (torchrun, gloo) equal the TP=1 run step for step, and runs
without a shared prompt equal the (shared) reference run.

Each layout trains the same HF weights on the same pairs for three steps; the per-step metrics and the
exported weights must agree with the single-process run, and so must 8 micro-batches of 1 vs 1 of 8. The pairs
are multi-turn conversations with a preference at one or two assistant turns (the families': ranked rows of three
completions, every two a pair), so with a shared prompt each row is one prefix tree (`data.trees`) wherever the
micro-batches leave its pairs together.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import conversation_rows, ranked_rows, run_mdpo, tiny_hf_family, tiny_run_files
from safetensors.torch import load_file

from mdpo.data.synthetic import write_jsonl

STEPS = 3
LAYOUTS = {
    # name: (processes, overrides)
    "tp1_mb8": (1, ["schedule.micro_batch_size=8"]),
    "tp2": (2, ["parallel.tp=2", "schedule.micro_batch_size=2"]),
    # 8 micro-batches of 1 through the pipeline (vs 1 of 8 in the reference run)
    "pp2_mb1": (2, ["parallel.pp=2", "schedule.micro_batch_size=1"]),
    "dp2_distopt": (2, ["parallel.distributed_optimizer=true", "schedule.micro_batch_size=2"]),
    "tp2_pp2": (
        4,
        ["parallel.tp=2", "parallel.pp=2", "schedule.micro_batch_size=1", "parallel.distributed_optimizer=true"],
    ),
    # Context parallelism: every sequence split over 2 ranks (chunks 0+3 and 1+2), K/V gathered; with DP=2 the
    # gradients and the distributed optimizer span DP x CP.
    "cp2": (2, ["parallel.cp=2", "model.attention=sdpa", "schedule.micro_batch_size=2"]),
    "dp2_cp2": (
        4,
        ["parallel.cp=2", "model.attention=sdpa", "parallel.distributed_optimizer=true", "schedule.micro_batch_size=2"],
    ),
    # Whole pairs packed into rows of at most 192 tokens (several packs per step, of different lengths), through
    # the pipeline: the loss is still the exact mean over the step's pairs.
    "packed_pp2": (2, ["parallel.pp=2", "data.packing=true", "data.pack_tokens=192"]),
    # Sequence parallelism on the local layers: each TP rank's norms see half of every packed row (padded to even),
    # so the norm weights' gradients are summed over TP; shared-prompt blocks, RoPE and scoring see the whole row.
    "tp2_sp_packed": (
        2,
        ["parallel.tp=2", "parallel.sequence_parallel=true", "data.packing=true", "data.pack_tokens=192"],
    ),
    # ... and with the fused kernels (model.fused_swiglu: Megatron's SwiGLU, torch.compile'd, its own backward;
    # model.fused_rope: Megatron's rotation compiled, per-token tables of the blocks) against the unfused one process.
    "tp2_sp_packed_fused": (
        2,
        [
            "parallel.tp=2",
            "parallel.sequence_parallel=true",
            "data.packing=true",
            "data.pack_tokens=192",
            "model.fused_swiglu=true",
            "model.fused_rope=true",
        ],
    ),
    # The reference run shares each pair's prompt (data.share_prompt: auto); these do not, so they prove sharing
    # exact: same metrics step for step and same weights, at TP=2 (with full activation recompute, which changes
    # when work happens, never the result) and packed through the pipeline.
    "tp2_unshared_recompute_full": (
        2,
        ["parallel.tp=2", "schedule.micro_batch_size=2", "data.share_prompt=false", "parallel.recompute=full"],
    ),
    "packed_pp2_unshared": (
        2,
        ["parallel.pp=2", "data.packing=true", "data.pack_tokens=192", "data.share_prompt=false"],
    ),
    # The interleaved pipeline: two model chunks per stage (one layer each), padded and packed micro-batches (each
    # schedule call in one frame), several packs of different lengths a step.
    "pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2", "schedule.micro_batch_size=2"]),
    "packed_pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2", "data.packing=true", "data.pack_tokens=192"]),
    # Overlapped gradient reduction / parameter gather (the final export must see the gathered weights).
    "dp2_overlap_selective": (
        2,
        [
            "parallel.distributed_optimizer=true",
            "parallel.overlap_grad_reduce=true",
            "parallel.overlap_param_gather=true",
            "parallel.recompute=selective",
            "schedule.micro_batch_size=2",
        ],
    ),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parallel")
    files = tiny_run_files(root, n_train=96, n_eval=8, data_seed=0, model_seed=3)
    pairs = [json.loads(line) for line in files["train"].read_text().splitlines()]
    write_jsonl(conversation_rows(pairs[:64]), root / "conversations.jsonl")
    write_jsonl(ranked_rows(pairs[:48]), root / "ranked.jsonl")  # 72 pairs
    write_jsonl(pairs[:64], root / "digits.jsonl")  # plain pairs: see DIGITS
    config = {
        "model": {"init_from": str(files["hf"])},
        "data": {
            "train_file": str(root / "conversations.jsonl"),
            "tokenizer": str(files["tokenizer"]),
            "max_length": 96,
        },
        "schedule": {"global_batch_size": 8, "train_steps": STEPS, "warmup_ratio": 0.0, "seed": 5},
        # adam_eps well above fp32 summation noise: with 1e-8, grads that cancel to ~1e-8 make Adam's
        # g/(|g|+eps) amplify reordering noise (different micro-batch sums) into ~1e-3 of a step.
        "optimizer": {"lr": 1e-4, "clip_grad": 1.0, "adam_eps": 1e-6},
        # A loss mixture with an NLL term, so that every logged component is checked across layouts too, with
        # every training-level term of the objective: LD-DPO's tail weight (score_tail, reduced over CP), WPO's pair
        # weights (the vocab-parallel square mass) and bco_pair's running reward mean (DP-reduced between steps).
        "dpo": {
            "loss_type": ["sigmoid", "ipo", "bco_pair"],
            "loss_weights": [1.0, 0.1, 0.5],
            "rpo_alpha": 0.2,
            "ld_alpha": 0.5,
            "use_weighting": True,
        },
        "logging": {"progress": False, "plot": False},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    vocab = json.loads((files["hf"] / "config.json").read_text())["vocab_size"]
    for case in FAMILY_LAYOUTS:
        # Mixtral with seed 3 routes none of the digits data's scored tokens to one expert of its last layer
        seed = 4 if case == "mixtral" else 3
        family, overrides = VARIANTS.get(case, (case, {}))
        tiny_hf_family(family, seed=seed, vocab_size=vocab, **overrides).save_pretrained(root / case)
    return root


# Today's families, each trained in one process and in a layout that splits what it adds: q/k/v biases and head
# sizes apart from hidden / heads over TP, Qwen 3's q/k norms (gradients summed over TP, with SP), tied heads across
# pipeline stages (the embedding's gradient all-reduced with its copy on the last stage) and over TP.
_SP_PACKED = ["parallel.tp=2", "parallel.sequence_parallel=true", "data.packing=true", "data.pack_tokens=192"]
_AUX = ["dpo.router_aux_loss_coef=0.1"]
_BIAS_UPDATE = "model.router_bias_update_rate=0.01"
FAMILY_LAYOUTS = {
    "llama3.1": (2, ["parallel.tp=2", "schedule.micro_batch_size=2"]),
    "llama3.2_tied": (2, ["parallel.pp=2", "schedule.micro_batch_size=2"]),
    "qwen2.5": (2, ["parallel.tp=2", "schedule.micro_batch_size=2"]),
    "qwen2.5_tied": (4, ["parallel.tp=2", "parallel.pp=2", "schedule.micro_batch_size=2"]),
    "qwen3_tied": (2, _SP_PACKED),
    # a sliding window shorter than the sequences, its layers split over two stages of two model chunks
    "mistral": (2, ["parallel.pp=2", "parallel.vpp=2", "schedule.micro_batch_size=2"]),
    # OLMo's q/k norms over all heads (their statistics all-reduced over TP, forward and backward; the whole weight
    # on each rank, its gradient a slice per rank, summed) and its norms after the sublayers
    "olmo2": (2, _SP_PACKED),
    # Gemma 3: its four 1 + w norms, GeGLU, scaled embeddings and two RoPEs over two stages of two model chunks
    "gemma3_tied": (2, ["parallel.pp=2", "parallel.vpp=2", "schedule.micro_batch_size=2"]),
    # the same text model inside Gemma3ForConditionalGeneration: its vision tower carried untrained into the export
    "gemma3_multimodal_tied": (2, ["parallel.tp=2", "schedule.micro_batch_size=2"]),
    # mixtures of experts with a load-balancing loss of weight 0.1 (its gradient then shows in every router): the
    # experts split over 2 ranks with the distributed optimizer (expert and dense parameters sharded apart); TP=2
    # + SP (each expert split over 2 ranks); TP=2 + SP with EP=2 (whole experts per rank) on packed rows
    "qwen3_moe": (2, ["parallel.ep=2", "parallel.distributed_optimizer=true", "schedule.micro_batch_size=2", *_AUX]),
    "mixtral": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "schedule.micro_batch_size=2", *_AUX]),
    "qwen3_moe_unnormed": (
        2,
        [*_SP_PACKED, "parallel.ep=2", "parallel.etp=1", *_AUX],
    ),
    # Qwen2-MoE's shared expert split over TP with SP, its sigmoid gate whole on each rank (gradients summed over TP)
    "qwen2_moe": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "schedule.micro_batch_size=2", *_AUX]),
    # gpt-oss: its sinks split with the heads over TP (SP, packed rows: blocks with the sinks' explicit softmax), the
    # biased experts whole on each of 2 EP ranks (Megatron takes expert biases at ETP = 1 only)
    "gpt_oss": (2, [*_SP_PACKED, "parallel.ep=2", "parallel.etp=1", *_AUX]),
    # DeepSeek-V3: MLA split over TP with SP (its q / kv latents' norms on each rank's tokens, gradients summed over
    # TP), the experts split over 2 EP ranks, packed rows; no load-balancing loss (transformers' class has none), its
    # auxiliary-loss-free balancing instead: the correction bias moved after each step by the loads counted on every
    # rank
    "deepseek_v3": (2, [*_SP_PACKED, "parallel.ep=2", "parallel.etp=1", _BIAS_UPDATE]),
    # ... and a dense one at TP=2 without SP: each rank projects every token through MLA's whole down projections,
    # whose RoPE key (used by every rank's heads) gets its gradient summed over TP (`models.mla`)
    "deepseek_v3_dense": (2, ["parallel.tp=2", "schedule.micro_batch_size=2"]),
    # GLM-4.5: its half-rotary heads with q/k/v biases and q/k norms split over TP with SP, DeepSeek-V3's router and
    # experts over 2 EP ranks, packed rows
    "glm4_moe": (2, [*_SP_PACKED, "parallel.ep=2", "parallel.etp=1"]),
}
# FAMILY_LAYOUTS cases that are another case's model with config.json changed: (case, its overrides)
VARIANTS = {
    "deepseek_v3_dense": (
        "deepseek_v3",
        dict(n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=4, num_nextn_predict_layers=0),
    )
}


# Mixtures of experts whose tiny routers send none of the ranked (chat-templated) rows' tokens to some expert, which
# training then leaves where it was (and which the check that training moved every tensor would fail on), or whose
# loss moves less than that check's 1e-3 in three steps: they train on the plain digit pairs, as one pair a row.
DIGITS = ("qwen3_moe", "mixtral", "glm4_moe")


def run_layout(root: Path, name: str, family: str | None = None) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """A layout's run; of `family`'s model when given (`name` tp1_mb8: one process; any other: its FAMILY_LAYOUTS)."""
    nproc, overrides = LAYOUTS[name] if family is None or name == "tp1_mb8" else FAMILY_LAYOUTS[family]
    if family is not None:
        data = root / ("digits.jsonl" if family in DIGITS else "ranked.jsonl")
        overrides = [*overrides, f"model.init_from={root / family}", f"data.train_file={data}"]
        # the same objective, and the same bias update
        overrides += [o for o in FAMILY_LAYOUTS[family][1] if o.startswith(("dpo.", _BIAS_UPDATE))]
        name = f"{family}_{name}"
    return run(root, name, nproc, overrides)


def run(root: Path, name: str, nproc: int, overrides: list[str]) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """`mdpo train` of the setup's config with these overrides in RUN_DIR root/name (once): its metrics and export."""
    run_dir = root / name
    if not (run_dir / "hf" / "model.safetensors").exists():
        result = run_mdpo(["train", str(root / "config.yaml"), f"logging.run_dir={run_dir}", *overrides], nproc)
        assert result.returncode == 0, result.stderr[-4000:]
        assert_export_gathers_the_model_once(result.stdout, run_dir / "hf")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records, load_file(str(run_dir / "hf" / "model.safetensors"))


def assert_export_gathers_the_model_once(output: str, hf: Path) -> None:
    """The end-of-run export gathers about the model's own bytes on rank 0 (fp32, padded vocabulary rows, a tied
    head's copy), at every layout: with the distributed optimizer each parameter is a view into Megatron's whole
    parameter buffer, and sending the views sent that buffer once per tensor (rank 0 past 18 GiB for a 30M MoE)."""
    found = re.search(r"exported HF model to \S+ \(([\d.]+) MiB of tensors gathered\)", output)
    assert found, output[-2000:]
    model_bytes = sum(t.numel() * 4 for t in load_file(str(hf / "model.safetensors")).values())
    assert float(found.group(1)) * 2**20 <= 1.25 * model_bytes, (found.group(0), model_bytes)


METRICS = (
    "loss",
    "loss/sigmoid",
    "loss/ipo",
    "loss/bco_pair",
    "nll_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "grad_norm",
    "learning_rate",
    "num_tokens",
)


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "tp1_mb8"])
def test_layout_matches_single_process(setup, name):
    assert_same_run(run_layout(setup, "tp1_mb8"), run_layout(setup, name), setup / "hf", name)


@pytest.mark.parametrize("family", list(FAMILY_LAYOUTS))
def test_family_layout_matches_single_process(setup, family):
    frozen = () if _BIAS_UPDATE in FAMILY_LAYOUTS[family][1] else FROZEN
    want, got = run_layout(setup, "tp1_mb8", family), run_layout(setup, "split", family)
    assert_same_run(want, got, setup / family, family, frozen=frozen)


FROZEN = ("mlp.gate.e_score_correction_bias",)  # HF tensors a run uses but never trains (router_bias_update_rate 0)


def assert_same_run(
    want_run,
    got_run,
    start: Path,
    name: str,
    metrics: tuple[str, ...] = METRICS,
    frozen: tuple[str, ...] = FROZEN,
) -> None:
    """Metrics step for step and exported weights within fp32 reordering noise; training moved every tensor but
    the `frozen` ones."""
    (want_records, want_weights), (got_records, got_weights) = want_run, got_run
    assert len(got_records) == len(want_records) == STEPS
    for got, want in zip(got_records, want_records):
        turns = tuple(key for key in want if key.startswith("rewards/accuracies/turn_"))  # multi-turn data
        for key in metrics + (("aux_loss",) if "aux_loss" in want else ()) + turns:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (name, got["step"], key)
    assert want_records[-1]["loss"] != pytest.approx(want_records[0]["loss"], abs=1e-3)  # training moved
    assert set(got_weights) == set(want_weights)
    from mdpo.models import families

    initial = load_file(str(start / "model.safetensors"))
    family = families.detect(json.loads((start / "config.json").read_text()))
    for key, want in want_weights.items():
        # a vision tower (carried), DeepSeek-V3's router score bias (at update rate 0: loaded and used, never
        # updated): exported bitwise as it came, by every layout
        layers = json.loads((start / "config.json").read_text()).get("num_hidden_layers", 0)
        if family.is_carried(key, layers) or key.endswith(frozen):
            assert torch.equal(want, initial[key]) and torch.equal(got_weights[key], initial[key]), (name, key)
            continue
        scale = want.abs().max().item()
        err = (got_weights[key] - want).abs().max().item()
        assert err <= 1e-5 * scale, (name, key, err, scale)
        # the check has teeth: training moved every tensor by far more than the tolerance
        assert (want - initial[key]).abs().max().item() > 10 * 1e-5 * scale, key
    assert set(initial) == set(want_weights), name  # nothing lost (a tied head: in neither)


# The Plackett-Luce objective (data.rank_pairs: ranking makes each ranked row's 3 completions 2 stages): no global
# batch or micro-batch cuts a ranking, so through the pipeline with micro-batches of 1 pair (each then holds a whole
# ranking) it equals one process with micro-batches of 4 (two rankings each).
PLACKETT_LUCE = [
    "dpo.loss_type=plackett_luce",
    "dpo.loss_weights=null",
    "dpo.rpo_alpha=0",
    "dpo.ld_alpha=null",
    "dpo.use_weighting=false",
    "data.rank_pairs=ranking",
]

PL_METRICS = tuple(key for key in METRICS if not key.startswith("loss/") and key != "nll_loss")  # one loss term


def test_plackett_luce_over_whole_rankings_matches_single_process(setup):
    base = [*PLACKETT_LUCE, f"data.train_file={setup / 'ranked.jsonl'}"]
    want = run(setup, "plackett_luce_one_process", 1, [*base, "schedule.micro_batch_size=4"])
    got = run(setup, "plackett_luce_pp2", 2, [*base, "parallel.pp=2", "schedule.micro_batch_size=1"])
    # step 1: the policy is its reference, every reward 0, so a ranking of 3 costs log 3 + log 2 over its 2 pairs
    # (each pair alone, DPO's sigmoid, would cost log 2)
    for records, _ in (want, got):
        assert records[0]["loss"] == pytest.approx(math.log(6) / 2, rel=1e-6)
    assert_same_run(want, got, setup / "hf", "plackett_luce", PL_METRICS)


# gpt-oss through a pipeline: its sinks, windows and biased experts over 2 stages, the experts over 2 EP ranks (4
# processes), with Megatron's per-layer load-balancing loss (transformers' pooled one is not exact over stages)
PIPELINE_FAMILIES = {
    "gpt_oss": (
        4,
        ["parallel.pp=2", "parallel.ep=2", "parallel.etp=1"],
        ["dpo.router_aux_loss_coef=0.1", "dpo.router_aux_loss_type=megatron"],
    ),
    # DeepSeek-V3 over 2 stages (MLA, its dense first layer and sigmoid router), its experts over 2 EP ranks and the
    # distributed optimizer over 2 DP ranks, with its sequence-wise balancing loss and its correction bias' update
    "deepseek_v3": (
        4,
        ["parallel.pp=2", "parallel.ep=2", "parallel.etp=1", "parallel.distributed_optimizer=true"],
        ["dpo.router_aux_loss_coef=0.01", "dpo.router_aux_loss_type=seq", _BIAS_UPDATE],
    ),
}


@pytest.mark.parametrize("family", list(PIPELINE_FAMILIES))
def test_family_pipeline_matches_single_process(setup, family):
    """DPO on the ranked rows at EP=2 x PP=2 equals one process: metrics step for step, every exported weight."""
    nproc, layout, objective = PIPELINE_FAMILIES[family]
    base = [f"model.init_from={setup / family}", f"data.train_file={setup / 'ranked.jsonl'}", *objective]
    base.append("schedule.micro_batch_size=2")
    want = run(setup, f"{family}_pipeline_one_process", 1, base)
    got = run(setup, f"{family}_pipeline", nproc, [*base, *layout])
    assert_same_run(want, got, setup / family, family, frozen=() if _BIAS_UPDATE in objective else FROZEN)


# Megatron-Core's per-layer router losses (megatron: aux_loss; seq: DeepSeek-V3's seq_aux_loss), each layer's attached
# in its own backward: where transformers' pooled loss is not exact (pipeline stages, virtual stages, full recompute,
# with experts split over 2 ranks and the distributed optimizer) they equal one process on the same micro-batches.
BALANCING_LAYOUTS = {
    "megatron_ep2_pp2": ("megatron", 4, ["parallel.ep=2", "parallel.pp=2", "parallel.distributed_optimizer=true"]),
    "megatron_pp2_vpp2_recompute": ("megatron", 2, ["parallel.pp=2", "parallel.vpp=2", "parallel.recompute=full"]),
    "seq_ep2_pp2_recompute": ("seq", 4, ["parallel.ep=2", "parallel.pp=2", "parallel.recompute=full"]),
    "seq_pp2_vpp2": ("seq", 2, ["parallel.pp=2", "parallel.vpp=2"]),
}


@pytest.mark.parametrize("name", list(BALANCING_LAYOUTS))
def test_megatron_router_losses_match_single_process(setup, name):
    """Loss, aux_loss, grad norm, every metric and the trained weights at each layout = one process (1e-5), for
    Megatron's aux_loss and seq_aux_loss, on padded micro-batches of 2 pairs (the losses are each micro-batch's)."""
    loss_type, nproc, layout = BALANCING_LAYOUTS[name]
    objective = [
        f"model.init_from={setup / 'qwen3_moe'}",
        f"data.train_file={setup / 'digits.jsonl'}",  # see DIGITS
        "schedule.micro_batch_size=2",
        "dpo.router_aux_loss_coef=0.1",
        f"dpo.router_aux_loss_type={loss_type}",
    ]
    want = run(setup, f"qwen3_moe_{loss_type}_one_process", 1, objective)
    assert all(record["aux_loss"] > 0 for record in want[0])
    assert_same_run(want, run(setup, f"qwen3_moe_{name}", nproc, [*objective, *layout]), setup / "qwen3_moe", name)


@pytest.mark.parametrize("rows", ["packed", "one_pair_rows"])
def test_expert_parallel_forward_passes_over_uneven_shares(setup, rows):
    """`precompute-ref` at EP=2 over 2 processes whose shares differ (63 train pairs, 7 eval pairs: 31 / 32 and 3 / 4):
    every forward joins both ranks' all-to-all, so the rank with fewer micro-batches splits a pack or repeats one
    (an echo, not counted) instead of leaving the other waiting; each pair's reference log-probs equal one process's."""
    data = setup / "data"
    lines = {split: (data / f"{split}.jsonl").read_text().splitlines() for split in ("train", "eval")}
    (setup / "odd_train.jsonl").write_text("\n".join(lines["train"][:63]) + "\n")
    (setup / "odd_eval.jsonl").write_text("\n".join(lines["eval"][:7]) + "\n")
    shape = ["data.packing=true", "data.pack_tokens=192"] if rows == "packed" else ["schedule.micro_batch_size=1"]
    caches = {}
    for nproc, layout in ((1, []), (2, ["parallel.ep=2"])):
        cache = setup / f"ep_cache_{rows}_{nproc}"
        args = ["precompute-ref", str(setup / "config.yaml"), f"model.init_from={setup / 'qwen3_moe'}", *shape]
        args += [f"data.train_file={setup / 'odd_train.jsonl'}", f"data.eval_file={setup / 'odd_eval.jsonl'}"]
        args += [f"dpo.reference_cache={cache}", f"logging.run_dir={cache}_run", *layout]
        result = run_mdpo(args, nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        caches[nproc] = {split: load_file(str(cache / f"{split}.safetensors")) for split in ("train", "eval")}
    for split, count in (("train", 63), ("eval", 7)):
        one, two = caches[1][split], caches[2][split]
        assert torch.equal(one["index"], torch.arange(count)) and torch.equal(two["index"], one["index"]), split
        for key in (k for k in one if k != "index"):
            assert torch.allclose(two[key], one[key], rtol=1e-5, atol=1e-5), (split, key)
