"""The planner (`mdpo plan`): its parameter counts against HF's models and mdpo's mapping tables (total and active
counts of mixtures of experts too), its static memory (weights, gradient buffer, optimizer states) against the bytes
Megatron actually allocates, its activations against what autograd keeps, the search's rules and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import run_mdpo

from mdpo import planner
from mdpo.config import Layout, ModelConfig, TrainConfig
from mdpo.models import families
from mdpo.models.families.base import hf_shapes
from mdpo.planner import validation as v

# a small Qwen3-MoE with layer 1 dense (transformers' mlp_only_layers), experts narrower than the dense MLP
SMALL_MOE = ModelConfig(
    family="qwen3_moe",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    qk_norm=True,
    num_experts=4,
    moe_topk=2,
    moe_intermediate_size=48,
    moe_layers=[0, 2],
)
# the same with Qwen2-MoE's attention and a gated shared expert (wider than the routed experts) in its MoE layers
SMALL_SHARED_MOE = dataclasses.replace(
    SMALL_MOE, family="qwen2_moe", head_dim=None, qk_norm=False, qkv_bias=True, shared_expert_intermediate_size=80
)
# DeepSeek-V3's: multi-latent attention (q through its low-rank projection), layer 0 dense, the sigmoid router (its
# score bias a buffer, no parameter) and an ungated shared expert
SMALL_DEEPSEEK = dataclasses.replace(
    SMALL_MOE,
    family="deepseek_v3",
    head_dim=None,
    qk_norm=False,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    moe_layers=[1, 2],
    shared_expert_intermediate_size=48,
    shared_expert_gate=False,
    router_score="sigmoid",
    router_expert_bias=True,
    routed_scaling_factor=2.5,
)
SMALL = {"small_moe": SMALL_MOE, "small_shared_moe": SMALL_SHARED_MOE, "small_deepseek": SMALL_DEEPSEEK}
# every preset of every registered family, and the small MoEs above
SHAPES = [(family.name, name) for family in families.FAMILIES.values() for name in family.presets]
SHAPES += [(shape.family, name) for name, shape in SMALL.items()]


def _transformers_model(shape: ModelConfig) -> torch.nn.Module:
    """transformers' own class of the shape's family (its oracle) built from the config.json the family writes for
    the shape, on the meta device (no memory)."""
    import transformers

    family = families.get(shape.family)
    config = transformers.AutoConfig.for_model(**family.write_config(shape))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == family.oracle
    return model


@pytest.mark.parametrize(("family", "name"), SHAPES)
def test_presets_count_the_families_parameters(family, name):
    """Each preset's count (the planner's presets are the registry's) equals the parameters of transformers' own
    class of its family (tied heads counted once, Qwen 3's q/k norms, head sizes apart from hidden / heads); for the
    families transformers has no class of (Qwen 1.0, Baichuan 2: remote code) the tensors of mdpo's mapping table.
    A mixture of experts' active parameters (a token's) are that total less the experts a token does not use, taken
    from transformers' expert modules: (E - k) / E of each layer's routed experts (Qwen2-MoE's shared expert runs for
    every token). Measured: Qwen3-30B-A3B 30,532,122,624 total / 3,353,032,704 active, Qwen3-235B-A22B
    235,093,634,560 / 22,190,763,520, Mixtral 8x7B 46,702,792,704 / 12,879,925,248, Qwen1.5-MoE-A2.7B
    14,315,784,192 / 2,689,173,504, Qwen2-57B-A14B 57,408,658,944 / 14,249,270,784, GLM-4.5 352,797,814,784 /
    33,632,251,904, GLM-4.5-Air 106,852,245,504 / 13,424,123,904 (transformers builds no MTP layer)."""
    shape = SMALL.get(name) or planner.MODELS[name]
    assert shape.family == family
    if not isinstance(families.get(family).oracle, str):
        tables = hf_shapes(families.get(family), shape)
        assert planner.params(shape) == sum(math.prod(tensor) for tensor in tables.values())
        return
    model = _transformers_model(shape)
    total = sum(p.numel() for p in model.parameters())
    assert planner.params(shape) == total
    if shape.is_moe:
        experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
        assert len(experts) == len(shape.expert_layers())
        expert_total = sum(p.numel() for m in experts for p in m.parameters())
        idle = (shape.num_experts - shape.moe_topk) / shape.num_experts
        assert planner.active_params(shape) == pytest.approx(total - expert_total * idle, abs=0.5)
        assert planner.expert_params(shape) == expert_total


def _allocated(shape: ModelConfig, lora_rank: int = 0) -> dict[str, int]:
    """Bytes of a real (fp32, CPU, one process) policy's weights, DDP gradient buffers (dense and expert-parallel)
    and Adam's moments after one step (they exist from the first step), with LoRA the adapters' alone; and how many
    expert parameters it built."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mdpo.config import LoRAConfig
    from mdpo.training.setup import build_model

    lora = LoRAConfig(rank=lora_rank) if lora_rank else None
    (model,) = build_model(TrainConfig(model=shape), Layout(), torch.float32, load=False, lora=lora)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, params_dtype=torch.float32), [ddp])
    optimizer.step()
    states = [
        t
        for opt in optimizer.chained_optimizers
        for st in opt.optimizer.state.values()
        for k, t in st.items()
        if k in ("exp_avg", "exp_avg_sq")
    ]
    return {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "grads": sum(
            b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers + ddp.expert_parallel_buffers
        ),
        "optimizer": sum(t.numel() * t.element_size() for t in states),
        "experts": sum(p.numel() for n, p in model.named_parameters() if ".experts." in n),
    }


QWEN3_TIED = dict(head_dim=32, qk_norm=True, tie_word_embeddings=True)  # Qwen 3 0.6B's features
# multi-latent attention, queries through a low-rank projection: its adapters on four projections, two replicated
MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


@pytest.mark.parametrize(
    ("lora_rank", "features"),
    [(0, {}), (4, {}), (0, QWEN3_TIED), (4, QWEN3_TIED), (0, MLA), (4, MLA)],
    ids=["full", "lora", "full_qwen3_tied", "lora_qwen3_tied", "full_mla", "lora_mla"],
)
def test_static_memory_is_what_megatron_allocates(megatron_world, lora_rank, features):
    """Weights, the DDP gradient buffer and Adam's states of a real (fp32, CPU) policy, counted in bytes; with
    LoRA the buffer and the states are the adapters' alone; a tied head's matrix is held once, q/k norms and a head
    size apart from hidden / heads counted."""
    # vocabulary 256: no padding
    shape = ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        **features,
    )
    measured = _allocated(shape, lora_rank)
    candidate = planner.Candidate(precision="fp32", distributed_optimizer=False)
    cluster = planner.Cluster(planner.GPUS["h100-80g"], gpus_per_node=1)
    workload = planner.Workload(reference="none", max_tokens=64, lora_rank=lora_rank)
    predicted = planner.memory_per_gpu(shape, candidate, workload, cluster)
    for part in ("weights", "grads", "optimizer"):
        assert predicted[part] * planner.GIB == pytest.approx(measured[part], rel=0.02), part  # buffers pad to 128s


@pytest.mark.parametrize("name", list(SMALL))
def test_moe_static_memory_is_what_megatron_allocates(megatron_world, name):
    """An MoE policy (4 experts, top 2, layer 1 dense; with and without a shared expert) at EP=1: weights, gradient
    buffers and Adam's states as Megatron allocates them, within 0.2% (the final norm and the buffers' padding: a
    missing router would be 0.3%); the routed experts' count exactly; and per EP rank (EP=2, ETP=1 or 2) the rank's
    E / EP experts, each 1 / ETP of Megatron's expert, which is all a rank of an expert-parallel run builds."""
    shape = SMALL[name]
    measured = _allocated(shape)
    candidate = planner.Candidate(precision="fp32", distributed_optimizer=False)
    cluster = planner.Cluster(planner.GPUS["h100-80g"], gpus_per_node=1)
    predicted = planner.memory_per_gpu(shape, candidate, planner.Workload(reference="none", max_tokens=64), cluster)
    for part in ("weights", "grads", "optimizer"):
        assert predicted[part] * planner.GIB == pytest.approx(measured[part], rel=0.002), part
    assert planner.stage_params(shape, Layout(), 0)[1] == measured["experts"]
    for etp in (1, 2):
        layout = Layout(tp=2, dp=2, ep=2, etp=etp, sequence_parallel=True)
        assert planner.stage_params(shape, layout, 0)[1] == measured["experts"] / 2 / etp


def _saved_bytes_per_token(
    layers: int, recompute: str, fused_swiglu: bool = False, fused_rope: bool = False, **experts: int | None
) -> float:
    """Bytes of the distinct tensors autograd keeps for backward in one forward of a real model (with `experts`, an
    MoE one's: every layer with experts), per token."""
    from mdpo.models.gpt import build_gpt_model, transformer_config

    cfg = ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention="sdpa",
        fused_swiglu=fused_swiglu,
        fused_rope=fused_rope,
        **experts,
    )
    model = build_gpt_model(cfg, transformer_config(cfg, recompute=recompute)).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, 512, (2, 256))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=tokens, position_ids=torch.arange(256).expand(2, 256), attention_mask=None)
    return sum(kept.values()) / tokens.numel()


@pytest.mark.parametrize(
    ("recompute", "fused_swiglu"),
    [("none", False), ("selective", False), ("full", False), ("none", True), ("selective", True)],
)
def test_activation_bytes_per_layer_are_what_autograd_keeps(megatron_world, recompute, fused_swiglu):
    """The planner's per-token, per-layer activation bytes against the tensors a real Megatron layer (local spec,
    SDPA, GQA, fp32 on CPU: torch's composite RMSNorm keeps 2 hidden-sized tensors) saves for backward, with the
    unfused and the fused SwiGLU (model.fused_swiglu: 3 instead of 5 intermediate-sized tensors)."""
    per_layer = (
        _saved_bytes_per_token(4, recompute, fused_swiglu) - _saved_bytes_per_token(2, recompute, fused_swiglu)
    ) / 2
    shape = ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    fp32 = planner.Candidate(precision="fp32", recompute=recompute, fused_swiglu=fused_swiglu)
    assert planner.activation_bytes_per_token_layer(shape, fp32, norm_saves=2) == pytest.approx(per_layer, rel=0.03)


@pytest.mark.parametrize(("fused_swiglu", "shared"), [(False, None), (True, None), (False, 240)])
def test_moe_activation_bytes_are_what_autograd_keeps(megatron_world, fused_swiglu, shared):
    """An MoE layer (4 experts, top 2, experts of 160 next to a dense MLP of 688; with a gated shared expert of 240)
    against a real one: the whole layer within 3% as the dense layer's test, and what the experts and router keep in
    place of the dense MLP (the two models' per-layer difference: top-k dispatched copies, the experts' SwiGLU on
    them, the routing, the shared expert's SwiGLU and gate) within 1%."""
    experts = dict(num_experts=4, moe_topk=2, moe_intermediate_size=160, shared_expert_intermediate_size=shared)

    def per_layer(**moe: int | None) -> float:
        return (
            _saved_bytes_per_token(4, "none", fused_swiglu, **moe)
            - _saved_bytes_per_token(2, "none", fused_swiglu, **moe)
        ) / 2

    dense, moe = per_layer(), per_layer(**experts)
    shape = ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        **experts,
    )
    fp32 = planner.Candidate(precision="fp32", fused_swiglu=fused_swiglu)
    predicted = planner.activation_bytes_per_token_layer(shape, fp32, norm_saves=2, moe=True)
    assert predicted == pytest.approx(moe, rel=0.03)
    in_place_of_mlp = predicted - planner.activation_bytes_per_token_layer(shape, fp32, norm_saves=2)
    assert in_place_of_mlp == pytest.approx(moe - dense, rel=0.01), (in_place_of_mlp, moe - dense)


def test_fused_rope_keeps_less_than_the_unfused_rotation(megatron_world):
    """model.fused_rope keeps nothing q-sized for backward: per layer it saves exactly the unfused rotation's bytes
    less the cos and sin tables Megatron's rotation keeps for q and for k (4 x head_dim fp32 values per row
    position; the compiled graph keeps the one table all layers share). The planner counts neither (under 1% at
    real shapes), so it needs nothing for the flag."""
    per_layer = {
        fused: (
            _saved_bytes_per_token(4, "none", fused_rope=fused) - _saved_bytes_per_token(2, "none", fused_rope=fused)
        )
        / 2
        for fused in (False, True)
    }
    rows, head_dim = 2, 64  # `_saved_bytes_per_token`'s batch and model
    cos_sin = 4 * head_dim * 4 / rows  # bytes per token: four fp32 tables of head_dim values per row position
    assert per_layer[False] - per_layer[True] == pytest.approx(cos_sin, abs=0.01)  # and a 0-d tensor per layer


_FLOORS: dict[tuple, float] = {}  # the process floor of each (sequence, micro-batch, reference): measured once


@pytest.mark.parametrize("name", ["base", "pp2", "moe"])
def test_predicted_peak_memory_within_10_percent_of_a_real_run(name):
    """A real `mdpo train` (benchmarks/validate_planner.py's configurations, a mixture of experts among them): peak
    RSS over the process floor."""
    cluster = planner.Cluster(planner.GPU(24, 1.0, 1.0, 10.0), gpus_per_node=1, norm_saves=v.CPU_NORM_SAVES)
    model, seq, mbs, *_, reference = v.CONFIGS[name]
    if (seq, mbs, reference) not in _FLOORS:
        _FLOORS[seq, mbs, reference] = v.floor_gib(seq, mbs, reference, cluster)
    floor = _FLOORS[seq, mbs, reference]
    measured = v.measure(*v.CONFIGS[name], steps=3, env=v.MEMORY_ENV)["peak_memory_gib"] - floor
    predicted = v.predict(*v.CONFIGS[name], cluster).memory_gib["total"]
    assert predicted == pytest.approx(measured, rel=0.10), (predicted, measured, floor)


def test_search_ranks_fitting_layouts_and_respects_the_rules():
    model, workload = planner.MODELS["llama2-70b"], planner.Workload(global_batch=256)
    cluster = planner.Cluster(planner.GPUS["a800-80g"], nodes=4)
    plans = planner.search(model, workload, cluster, top=20)
    assert plans and all(p.fits for p in plans)
    assert [p.step_s for p in plans] == sorted(p.step_s for p in plans)
    for p in plans:
        assert not planner.check_layout(model, p.candidate, workload, cluster)
        assert p.dp * p.layout.tp * p.layout.pp * p.layout.cp == cluster.world
    # the interleaved pipeline is searched: its bubble is VPP times smaller, its warmup keeps more activations
    interleaved = [p for p in plans if p.layout.vpp > 1]
    assert interleaved, "no interleaved layout among the fastest"
    best = interleaved[0]
    plain = planner.plan(
        model, dataclasses.replace(best.candidate, layout=dataclasses.replace(best.layout, vpp=1)), workload, cluster
    )
    assert best.time_s["bubble"] == pytest.approx(plain.time_s["bubble"] / best.layout.vpp)
    p, v = best.layout.pp, best.layout.vpp
    m = math.ceil(planner.microbatches_per_step(workload, best.candidate))
    in_flight = min(2 * (p - 1) + (v - 1) * p + 1, v * m) / v  # Megatron's warmup, in whole stages
    ratio = best.memory_gib["activations"] / plain.memory_gib["activations"]
    assert ratio == pytest.approx(in_flight / p, rel=0.02), (ratio, in_flight, p)
    # 70B does not fit one 80 GB node with the full optimizer on every GPU and no model parallelism
    one_node = planner.Cluster(cluster.gpu)
    alone = planner.plan(model, planner.Candidate.on(one_node.world, distributed_optimizer=False), workload, one_node)
    assert not alone.fits and alone.memory_gib["weights"] > 100


def test_shared_prompt_with_sequence_parallelism_but_not_context_parallelism():
    """As the trainer: a shared prompt runs with sequence parallelism (mdpo's local layers split the sequence too),
    never with CP; the search shares prompts at TP > 1 + SP, so the 13B recipe's layout counts each prompt once."""
    model, workload = planner.MODELS["tulu2-13b"], planner.Workload(global_batch=256)
    cluster = planner.Cluster(planner.GPUS["a800-80g"], nodes=2)
    shared = planner.Candidate.on(cluster.world, tp=4, sequence_parallel=True, pack_tokens=16384)
    assert shared.share_prompt and not planner.check_layout(model, shared, workload, cluster)
    with_cp = planner.Candidate.on(cluster.world, tp=4, cp=2, sequence_parallel=True, packing=False)
    assert "a shared prompt needs CP=1" in "; ".join(planner.check_layout(model, with_cp, workload, cluster))
    plans = planner.search(model, workload, cluster, top=5)
    assert all(p.layout.sequence_parallel and p.candidate.share_prompt for p in plans if p.layout.tp > 1)
    recipe = [p for p in plans if p.layout.tp == 4 and p.layout.pp == 1 and p.candidate.pack_tokens == 16384]
    assert recipe and recipe[0].step_s <= 1.01 * plans[0].step_s  # the 13B recipe's layout, within 1% of the best


def test_plan_cli_json_and_errors(tmp_path):
    result = run_mdpo(["plan", "--model", "tulu2-13b", "--nodes", "2", "--global-batch", "256", "--json"])
    assert result.returncode == 0, result.stderr
    plans = json.loads(result.stdout)
    assert plans and {"memory_gib", "time_s", "workload_h", "layout"} <= set(plans[0])
    one = run_mdpo(["plan", "--model", "tulu2-13b", "--gpus-per-node", "6", "--tp", "3"])
    assert one.returncode == 2 and "TP=3 does not divide the heads" in one.stderr
    assert len(one.stderr.strip().splitlines()) == 1
    unknown = run_mdpo(["plan", "--model", str(tmp_path / "nothing")])
    assert unknown.returncode == 2 and "neither a preset" in unknown.stderr


def test_moe_search_follows_the_expert_and_load_balancing_rules():
    """Qwen3-30B-A3B on 2 x 8 H100: every layout found passes `Layout`'s expert rules (EP divides the 128 experts,
    EP x ETP the ranks of a stage); with the model's load-balancing loss on a pipeline is valid (the trainer then
    takes Megatron's per-layer loss), and MoE under TP needs sequence parallelism. Expert parallelism pays: without
    a pipeline (where transformers' per-pair loss is exact) only split experts fit, and faster. The
    dispatcher's all-to-alls move each token's top-8 hidden vectors to their experts and back, forward and backward,
    7/8 of them off the rank at EP=8 (within a node), and cost more across nodes (EP=16)."""
    model, cluster = planner.MODELS["qwen3-30b-a3b"], planner.Cluster(planner.GPUS["h100-80g"], nodes=2)
    workload = planner.Workload(global_batch=256, max_tokens=4096)
    plans = planner.search(model, workload, cluster, top=30)
    assert plans and any(p.layout.ep > 1 for p in plans)
    unpiped = {ep: planner.Candidate.on(cluster.world, tp=2, ep=ep, etp=1, sequence_parallel=True) for ep in (2, 8)}
    (two, eight) = (planner.plan(model, candidate, workload, cluster) for candidate in unpiped.values())
    assert eight.fits and not two.fits and eight.step_s < two.step_s
    for p in plans:
        lay = p.layout
        assert not planner.check_layout(model, p.candidate, workload, cluster)
        assert model.num_experts % lay.ep == 0 and (lay.tp * lay.cp * lay.dp) % (lay.ep * lay.expert_tp) == 0
    piped = planner.Candidate.on(cluster.world, tp=2, pp=2, ep=4, sequence_parallel=True, pack_tokens=4096)
    assert workload.aux_loss(model) > 0 and not planner.check_layout(model, piped, workload, cluster)
    no_sp = planner.Candidate.on(cluster.world, tp=2, ep=8)
    problems = "; ".join(planner.check_layout(model, no_sp, workload, cluster))
    assert "with a mixture-of-experts model needs SP=true" in problems

    quiet = dataclasses.replace(cluster, collective_latency_us=0.0)
    within, across = (
        planner.plan(model, planner.Candidate.on(16, tp=2, ep=ep, etp=1, sequence_parallel=True), workload, quiet)
        for ep in (8, 16)
    )
    tokens_per_rank = 256 * (1010 - 200) / 0.95 / 8 / 2  # a step's token slots (pack fill 0.95) over DP, then TP
    copies = 2 * 2 * tokens_per_rank * 8 * 48  # there and back, forward and backward; top 8, 48 layers
    expected = copies * 2048 * 2 * 7 / 8 / (450 * 1e9)  # hidden vectors in bf16 over NVLink
    assert within.time_s["ep_comm"] == pytest.approx(expected)
    assert across.time_s["ep_comm"] > 10 * within.time_s["ep_comm"]
    assert across.memory_gib["weights"] < within.memory_gib["weights"]


def test_plan_cli_moe(tmp_path):
    """`--ep` and `--etp` fix the expert sizes as --tp fixes TP; the JSON carries them and the dispatcher's time;
    Layout's rule refuses an EP x ETP that does not divide a stage's ranks, in one line."""
    flags = ["plan", "--model", "qwen3-30b-a3b", "--gpu", "h100-80g", "--nodes", "2", "--tp", "2"]
    result = run_mdpo([*flags, "--sequence-parallel", "--ep", "8", "--etp", "1", "--max-tokens", "4096", "--json"])
    assert result.returncode == 0, result.stderr
    (one,) = json.loads(result.stdout)
    assert (one["layout"]["ep"], one["layout"]["etp"], one["dp"]) == (8, 1, 8) and one["time_s"]["ep_comm"] > 0
    wrong = run_mdpo([*flags, "--sequence-parallel", "--ep", "3"])
    assert wrong.returncode == 2 and "EP x ETP = 3 x 2 does not divide" in wrong.stderr, wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
