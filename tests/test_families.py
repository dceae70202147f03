"""Today's families (Llama 3.1 with RoPE scaling, Llama 3.2 tied, Qwen 2.5 untied and tied, Qwen 3 tied with a head
size other than hidden / heads, Mistral with an explicit head size) against transformers' own classes in float64:
tiny checkpoints made by those classes with every weight random (norms, biases and q/k norms too), read by mdpo from
the saved folders as `model.init_from` reads them, scored by training's forward in every row layout and at TP=2
(with SP), PP=2 x VPP=2 (tied heads across stages), PP=2 with the fused RoPE, CP=2 and DP=2."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from conftest import (
    FAMILY_CASES,
    MOE_CASES,
    POOLED_AUX_CASES,
    REPO,
    ROW_LAYOUTS,
    collate_as,
    run_mdpo,
    tiny_hf_family,
)

VOCAB = 250
RTOL = 1e-5


def family_pairs() -> list[tuple[list[int], list[int], list[int], int]]:
    """(prompt, chosen, rejected, input row) ids of different lengths, positions up to 36: pairs 0-2 one ranked row
    (a prompt behind three completions, every two a pair; two of them share their first tokens), pair 3 alone (a
    one-token prompt), pairs 4-5 one conversation (turn 1's prompt is turn 0's prompt and chosen answer and a user
    turn). With a shared prompt each row is one prefix tree (`data.trees`)."""
    g = torch.Generator().manual_seed(11)
    ids = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()
    prompt, first, second, third = ids(12), ids(15), ids(6), ids(7)
    second = first[:3] + second
    alone = (ids(1), ids(14), ids(3))
    asked, answered, rejected = ids(8), ids(8), ids(8)
    follow_up = asked + answered + ids(9)
    return [
        (prompt, first, second, 0),
        (prompt, first, third, 0),
        (prompt, second, third, 0),
        (*alone, 1),
        (asked, answered, rejected, 2),
        (follow_up, ids(5), ids(11), 2),
    ]


def hf_logps_float64(folder: Path, pairs, edit=None, **config_changes) -> torch.Tensor:
    """Summed log p(response | prompt) of every chosen then every rejected sequence, each run alone, by
    transformers' class of the folder in float64 (its weights first changed by `edit(model)` when given)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = (
        AutoModelForCausalLM.from_pretrained(
            folder, config=config, attn_implementation="eager", experts_implementation="eager"
        )
        .double()
        .eval()
    )
    if edit is not None:
        with torch.no_grad():
            edit(model)
    sums = []
    for side in (1, 2):
        for pair in pairs:
            prompt, response = pair[0], pair[side]
            with torch.no_grad():
                logits = model(torch.tensor([prompt + response])).logits[0]
            logprobs = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
            sums.append(logprobs.gather(1, torch.tensor(response)[:, None]).sum())
    return torch.stack(sums)


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """Each case saved by transformers (a tied model's files hold no lm_head) with its float64 log-probs."""
    root, pairs = tmp_path_factory.mktemp("families"), family_pairs()
    out = {}
    for case in FAMILY_CASES:
        tiny_hf_family(case, seed=3, vocab_size=VOCAB).save_pretrained(root / case)
        out[case] = (root / case, hf_logps_float64(root / case, pairs))
    return out


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = ((got.double() - want).abs() / want.abs()).max().item()
    assert err <= RTOL, f"{what}: max relative log-prob error {err:.3g}"


def test_tied_checkpoints_hold_no_head(families):
    from safetensors import safe_open

    for case, (folder, _) in families.items():
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            assert ("lm_head.weight" in f.keys()) == ("tied" not in case), case  # noqa: SIM118 - not a dict


def test_every_row_layout_equals_transformers_float64(megatron_world, families):
    """One process: padded rows, packed rows, shared prompts and packed shared prompts all give the float64
    log-probs of transformers' class; Llama 3's scaling is in them (without it they differ)."""
    from mdpo.checkpoint.description import describe_model
    from mdpo.checkpoint.load import load_initial_weights
    from mdpo.data.pairs import TokenizedPair
    from mdpo.models.gpt import build_gpt_model, transformer_config
    from mdpo.training.step import Scorer

    pairs = [TokenizedPair(i, *ids) for i, ids in enumerate(family_pairs())]
    for case, (folder, want) in families.items():
        model = describe_model({"init_from": str(folder)})
        gpt = build_gpt_model(model, transformer_config(model), scoring=True)
        load_initial_weights(gpt, model)
        gpt = gpt.eval()
        scorer = Scorer(model, chunk_tokens=7, thd=False)
        for layout in ROW_LAYOUTS:
            batch = collate_as(layout, pairs)
            with torch.no_grad():
                got = scorer.stats(batch, gpt, scorer.forward(batch, gpt)).logps
            assert_close(got, want, f"{case}, {layout}")
    folder, want = families["llama3.1"]
    unscaled = hf_logps_float64(folder, family_pairs(), rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    assert ((unscaled - want).abs() / want.abs()).max() > 10 * RTOL  # the scaling changes these log-probs
    for case in ("qwen2.5_tied", "qwen3_tied"):  # linear, yarn
        folder, want = families[case]
        plain = hf_logps_float64(folder, family_pairs(), rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        assert ((plain - want).abs() / want.abs()).max() > 10 * RTOL, case  # the scaling changes these log-probs
    for case in ("olmo3", "gemma3_tied"):  # each layer type's RoPE changes these log-probs
        folder, want = families[case]
        ropes = json.loads((folder / "config.json").read_text())["rope_parameters"]
        for kind in ropes:
            swap = {kind: ropes["full_attention" if kind == "sliding_attention" else "sliding_attention"]}
            swapped = hf_logps_float64(folder, family_pairs(), rope_parameters=dict(ropes, **swap))
            assert ((swapped - want).abs() / want.abs()).max() > 10 * RTOL, (case, kind)
    folder, want = families["deepseek_v3"]  # MLA's yarn, its mscales, the router's scaling change these log-probs
    yarn = json.loads((folder / "config.json").read_text())["rope_parameters"]
    for changes in (
        dict(rope_parameters={"rope_type": "default", "rope_theta": yarn["rope_theta"]}),
        dict(rope_parameters={**yarn, "mscale": 1.0, "mscale_all_dim": 1.0}),
        dict(routed_scaling_factor=1.0),
    ):
        other = hf_logps_float64(folder, family_pairs(), **changes)
        assert ((other - want).abs() / want.abs()).max() > 10 * RTOL, changes
    folder, want = families["glm4_moe"]  # GLM-4.5's half-rotary heads, its groups, the router's scaling and bias
    rope = json.loads((folder / "config.json").read_text())["rope_parameters"]
    unbiased = lambda model: [layer.mlp.gate.e_score_correction_bias.zero_() for layer in model.model.layers[1:]]
    for changes in (
        dict(rope_parameters={**rope, "partial_rotary_factor": 1.0}),
        dict(n_group=1, topk_group=1),
        dict(routed_scaling_factor=1.0),
        dict(edit=unbiased),
    ):
        other = hf_logps_float64(folder, family_pairs(), **changes)
        assert ((other - want).abs() / want.abs()).max() > 10 * RTOL, changes
    folder, want = families["gemma3_tied"]  # and Gemma's query_pre_attn_scalar (24, not the head size's 32)
    plain = hf_logps_float64(folder, family_pairs(), query_pre_attn_scalar=32)
    assert ((plain - want).abs() / want.abs()).max() > 10 * RTOL
    for case, unwindowed in (
        ("mistral", dict(sliding_window=None)),
        ("qwen2.5", dict(layer_types=["full_attention"] * 4)),
        ("olmo3", dict(layer_types=["full_attention"] * 4)),
        ("gemma3_tied", dict(layer_types=["full_attention"] * 4)),
        ("qwen2_moe", dict(layer_types=["full_attention"] * 4)),
        ("gpt_oss", dict(layer_types=["full_attention"] * 4)),
    ):
        folder, want = families[case]
        whole = hf_logps_float64(folder, family_pairs(), **unwindowed)
        assert ((whole - want).abs() / want.abs()).max() > 10 * RTOL, case  # the windows change these log-probs
    folder, want = families["gpt_oss"]  # and gpt-oss's sinks, its GLU's clamps and yarn
    no_sinks = lambda model: [layer.self_attn.sinks.fill_(float("-inf")) for layer in model.model.layers]
    for changed in (
        hf_logps_float64(folder, family_pairs(), edit=no_sinks),
        hf_logps_float64(folder, family_pairs(), swiglu_limit=1e9),
        hf_logps_float64(folder, family_pairs(), rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
    ):
        assert ((changed - want).abs() / want.abs()).max() > 10 * RTOL


# Cases whose layers other cases already have at every parallel layout (they keep the one-process row layouts and
# the round trips): OLMo 3 has OLMo 2's layer (and adds windows and two RoPEs); the multimodal Gemma 3's text model is
# gemma3_tied's (its loading checked in one process, its training at TP=2 in test_parallel.py); tied heads across
# stages are gemma3_tied's and qwen3_tied's, Llama 3's scaling llama3.1's, linear RoPE and q/k/v biases gemma3_tied's
# and qwen2.5's
COVERED = ("olmo2", "gemma3_multimodal_tied", "llama3.2_tied", "qwen2.5_tied")


def run_layouts(families, tmp_path: Path, layouts: tuple[str, ...], nproc: int) -> dict:
    """The worker's log-probs at these layouts (expert-parallel ones: the MoE cases only; none of COVERED), checked
    against the float64 forward of transformers' class; returns them."""
    torch.save(family_pairs(), tmp_path / "pairs.pt")
    folders = {str(folder): case for case, (folder, _) in families.items() if case not in COVERED}
    worker = REPO / "tests" / "workers" / "family_logps.py"
    args = [str(worker), ",".join(layouts), str(tmp_path / "out.pt"), str(tmp_path / "pairs.pt"), *folders]
    result = run_mdpo(args, nproc=nproc)
    assert result.returncode == 0, result.stderr[-4000:]
    results = torch.load(tmp_path / "out.pt")
    assert tuple(results) == layouts
    moe_too = ("tp2_sp_packed_shared", "pp2_vpp2_shared", "cp2")  # the worker's MOE_TOO
    for layout, per_folder in results.items():
        moe = layout.startswith("ep") or "_ep" in layout
        expected = {f for f, case in folders.items() if (case in MOE_CASES) == moe or layout in moe_too}
        assert set(per_folder) == expected, layout
        for folder, got in per_folder.items():
            assert_close(got, families[folders[folder]][1], f"{folders[folder]} at {layout}")
    return results


def hf_pair_aux_losses(folder: Path, pairs) -> torch.Tensor:
    """Each pair's load-balancing loss as transformers computes it (float64) for a batch of the pair's chosen and
    rejected sequences, right-padded, with their attention mask: what TRL adds with one pair per device batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, experts_implementation="eager").double().eval()
    losses = []
    for prompt, chosen, rejected, *_ in pairs:
        rows = [prompt + chosen, prompt + rejected]
        length = max(map(len, rows))
        ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
        with torch.no_grad():
            losses.append(model(ids, attention_mask=mask, output_router_logits=True).aux_loss)
    return torch.stack(losses)


def test_load_balancing_loss_equals_transformers_float64(megatron_world, families):
    """mdpo's per-pair load-balancing loss (the routers' recorded sums, every row layout: padding not counted, a
    shared prompt counted for both sequences) equals transformers' `aux_loss` of the pair's padded batch."""
    from mdpo.checkpoint.description import describe_model
    from mdpo.checkpoint.load import load_initial_weights
    from mdpo.data.pairs import TokenizedPair
    from mdpo.models.gpt import build_gpt_model, transformer_config
    from mdpo.models.moe import RecordingRouter, RouterSums, pair_aux_losses, routers_order
    from mdpo.training.step import Scorer

    pairs = [TokenizedPair(i, *ids) for i, ids in enumerate(family_pairs())]
    for case in POOLED_AUX_CASES:
        folder = families[case][0]
        want = hf_pair_aux_losses(folder, family_pairs())
        model = describe_model({"init_from": str(folder)})
        sums = RouterSums()
        gpt = build_gpt_model(
            model, transformer_config(model), scoring=True, router=functools.partial(RecordingRouter, sums=sums)
        )
        load_initial_weights(gpt, model)
        gpt = gpt.eval()
        for layout in ROW_LAYOUTS:
            batch = collate_as(layout, pairs)
            sums.start(routers_order(batch.pair_weights, False))
            with torch.no_grad():
                Scorer(model, chunk_tokens=7, thd=False).forward(batch, gpt)
            got = pair_aux_losses(sums, model.num_experts, sequence_parallel=False)
            assert_close(got, want, f"{case} load-balancing loss, {layout}")
        spread = (want.max() - want.min()) / want.mean()
        assert spread > 10 * RTOL, case  # the pairs' losses differ: a pair mixed up would show


def test_parallel_layouts_equal_transformers_float64(families, tmp_path):
    """TP=2 (and with SP, packed shared prompts), PP=2 x VPP=2 (a tied head's copy on the last stage), PP=2 packed
    with the fused RoPE (Llama 3's scaled table), CP=2; the MoE cases at TP=2 + SP, PP=2 x VPP=2, CP=2, EP=2 (experts
    split over 2 ranks, the all-to-all dispatcher) and TP=2 + SP x EP=2 packed: every sequence's log-prob as
    transformers' class gives it."""
    layouts = ("tp2", "tp2_sp_packed_shared", "pp2_vpp2_shared", "pp2_packed_fused_rope", "cp2", "ep2")
    run_layouts(families, tmp_path, (*layouts, "tp2_sp_ep2_packed"), nproc=2)


def test_expert_and_pipeline_parallel_equal_transformers_float64(families, tmp_path):
    """EP=2 x PP=2 (4 processes): each stage's layers, each rank its half of the experts, shared prompts."""
    run_layouts(families, tmp_path, ("ep2_pp2",), nproc=4)


def megatron_balancing_float64(inputs, weights, padding, topk: int, seq: bool):
    """Megatron-Core's load-balancing loss of one layer and micro-batch, in float64 from the router's input hidden
    states [s, b, h] and weight [E, h]: softmax scores of the router logits, each token's top k, padding left out;
    `aux_loss`: E / (k T^2) sum_e (scores summed over tokens)_e (routed slots)_e over the T tokens; `seq`: the same
    per row (the row's columns of scores and slots, T / rows tokens a row), summed, over the rows."""
    s, b, _ = inputs.shape
    scores = torch.softmax(inputs.double() @ weights.double().T, dim=-1) * (~padding).t()[..., None]
    top = torch.zeros_like(scores).scatter(-1, scores.topk(topk, dim=-1).indices, 1.0) * (~padding).t()[..., None]
    experts, tokens = weights.shape[0], (~padding).sum()
    if not seq:
        return experts / (topk * tokens**2) * (scores.sum((0, 1)) * top.sum((0, 1))).sum()
    per_row = (scores.sum(0) * top.sum(0)).sum()  # [b, E] columns: each row's own
    return experts / (topk * (tokens / b) ** 2) * per_row / b


@pytest.mark.parametrize("loss_type", ["megatron", "seq"])
def test_megatron_router_losses_equal_their_float64_formula(megatron_world, families, loss_type):
    """Megatron's per-layer losses in mdpo's step (one process, three padded micro-batches of 2 pairs): the logged
    aux_loss is the mean over micro-batches of each one's sum over layers of the float64 formula (padding left
    out), and the gradient they add to the last MoE layer's router is coef x that mean's gradient: no token-count
    scaling, divided by the step's pairs like the DPO loss's."""
    from functools import partial

    from mdpo.checkpoint.description import describe_model
    from mdpo.config import DPOConfig, Layout, TrainConfig
    from mdpo.data.batching import collate
    from mdpo.data.pairs import TokenizedPair
    from mdpo.training.experts import Experts
    from mdpo.training.metrics import step_record
    from mdpo.training.optimizer import build_optimizer, wrap_ddp
    from mdpo.training.setup import build_model
    from mdpo.training.step import DPOObjective, Scorer, dpo_forward_step, run_schedule

    model = describe_model({"init_from": str(families["qwen3_moe"][0])})
    dpo = DPOConfig(reference="none", router_aux_loss_coef=0.1, router_aux_loss_type=loss_type)
    cfg = TrainConfig(model=model, dpo=dpo)
    experts = Experts.of(cfg, ep=1)
    (chunk,) = build_model(cfg, Layout(), torch.float32, load=True, experts=experts)
    policy = [wrap_ddp(cfg, chunk)]
    build_optimizer(cfg, policy, torch.float32)  # registers the gradients' finalisation (division by the pairs)
    routers = [layer.mlp.router for layer in chunk.decoder.layers if hasattr(layer.mlp, "router")]
    seen = []
    for router in routers:
        router.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    pairs = [TokenizedPair(i, *ids) for i, ids in enumerate(family_pairs())]
    batches = [collate(pairs[k : k + 2], pad_id=0) for k in range(0, 6, 2)]
    objective = DPOObjective.from_config(cfg.dpo, model.vocab_size, experts)

    def step(coef: float) -> tuple[float, torch.Tensor]:
        experts.coef = coef
        objective.before_step(batches, policy)
        policy[0].zero_grad_buffer()
        out = run_schedule(
            partial(dpo_forward_step, objective, Scorer(model, 7, False)),
            batches,
            policy,
            forward_only=False,
            references=[None] * 3,
        )
        record = objective.complete(step_record([o["sums"] for o in out], objective.metric_names))
        return record["aux_loss"], routers[-1].weight.main_grad.clone()

    aux, grad = step(0.1)
    weight = routers[-1].weight.detach().double().requires_grad_(True)
    want, last = 0.0, 0.0
    for k, batch in enumerate(batches):
        padding = batch.token_weights == 0
        for i, router in enumerate(routers):
            value = megatron_balancing_float64(
                seen[3 * k + i], router.weight.detach(), padding, model.moe_topk, loss_type == "seq"
            )
            want += value.item() / 3
        last = (
            last + megatron_balancing_float64(seen[3 * k + 2], weight, padding, model.moe_topk, loss_type == "seq") / 3
        )
    assert aux == pytest.approx(want, rel=1e-5)
    (aux_grad,) = torch.autograd.grad(last, weight)
    _, grad_doubled = step(0.2)  # the DPO loss's gradient is the same: the difference is 0.1 x the losses'
    torch.testing.assert_close((grad_doubled - grad).double(), 0.1 * aux_grad, rtol=1e-4, atol=1e-7)
    assert (0.1 * aux_grad).abs().max() > 1e-4  # the check has teeth: the aux gradient is far above the tolerance


def deepseek_loads_float64(inputs, weights, bias, valid, topk: int, groups: int, group_topk: int) -> torch.Tensor:
    """DeepSeek-V3's routing (noaux_tc) in float64 from a router's input hidden states [s, b, h], weight [E, h] and
    correction bias [E]: sigmoid scores plus the bias choose the top k experts within the group_topk best of `groups`
    groups (a group scored by its two best), each token counted once per chosen expert where `valid` [b, s]."""
    choice = torch.sigmoid(inputs.double() @ weights.double().T).reshape(-1, weights.shape[0]) + bias.double()
    grouped = choice.view(choice.shape[0], groups, -1)
    best = grouped.topk(2, dim=-1).values.sum(-1).topk(group_topk, dim=-1).indices
    allowed = torch.zeros(choice.shape[0], groups, dtype=torch.bool).scatter(1, best, True)
    choice = grouped.masked_fill(~allowed[..., None], float("-inf")).reshape(choice.shape)
    chosen = torch.zeros_like(choice).scatter(1, choice.topk(topk, dim=-1).indices, 1.0)
    return (chosen * valid.t().reshape(-1, 1).double()).sum(0)


def test_router_bias_update_equals_its_float64_formula(megatron_world, families):
    """model.router_bias_update_rate: after a DPO step (one process, three padded micro-batches of 2 pairs) each MoE
    layer's correction bias moved as DeepSeek-V3's auxiliary-loss-free balancing moves it, bias + rate x sign(mean
    load - load), its loads counted in float64 from the routers' inputs (every sequence's real tokens, each chosen
    expert once); the same step on shared prompts (a pair's prompt computed once, counted as TRL's batch holds it)
    moves it the same, and so does the step with an expert group's echo (a repeat of its last micro-batch, run so that
    the all-to-alls of EP ranks short of pairs stay in step): it counts no load."""
    import dataclasses
    from functools import partial

    from mdpo.checkpoint.description import describe_model
    from mdpo.config import DPOConfig, Layout, TrainConfig
    from mdpo.data.batching import collate, collate_shared
    from mdpo.data.pairs import TokenizedPair
    from mdpo.training.experts import Experts
    from mdpo.training.optimizer import build_optimizer, wrap_ddp
    from mdpo.training.setup import build_model
    from mdpo.training.step import DPOObjective, Scorer, dpo_forward_step, run_schedule

    rate = 0.01
    model = describe_model({"init_from": str(families["deepseek_v3"][0]), "router_bias_update_rate": rate})
    cfg = TrainConfig(model=model, dpo=DPOConfig(reference="none"))
    experts = Experts.of(cfg, ep=1)
    (chunk,) = build_model(cfg, Layout(), torch.float32, load=True, experts=experts)
    policy = [wrap_ddp(cfg, chunk)]
    build_optimizer(cfg, policy, torch.float32)  # registers finalize_model_grads, which updates the bias
    routers = [layer.mlp.router for layer in chunk.decoder.layers if hasattr(layer.mlp, "router")]
    initial = [router.expert_bias.clone() for router in routers]
    seen = []
    for router in routers:
        router.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    pairs = [TokenizedPair(i, *ids) for i, ids in enumerate(family_pairs())]
    objective = DPOObjective.from_config(cfg.dpo, model.vocab_size, experts)

    def step(collate_pairs, echo: bool = False) -> list[torch.Tensor]:
        """The biases after one step on `collate_pairs`' micro-batches (each bias as loaded before it), the last
        one repeated as an echo after them with `echo`."""
        for router, bias in zip(routers, initial):
            router.expert_bias.copy_(bias)
        batches = [collate_pairs(pairs[k : k + 2], pad_id=0) for k in range(0, 6, 2)]
        run = batches + [dataclasses.replace(batches[-1], echo=True)] * echo
        objective.before_step(run, policy)
        policy[0].zero_grad_buffer()
        run_schedule(
            partial(dpo_forward_step, objective, Scorer(model, 7, False)),
            run,
            policy,
            forward_only=False,
            references=[None] * len(run),
        )
        return batches, [router.expert_bias.clone() for router in routers]

    batches, got = step(collate)
    echo_would_move = []
    for i, (router, bias) in enumerate(zip(routers, initial)):
        per_batch = [
            deepseek_loads_float64(
                seen[len(routers) * k + i],
                router.weight.detach(),
                bias,
                batch.token_weights > 0,
                model.moe_topk,
                model.router_groups,
                model.router_group_topk,
            )
            for k, batch in enumerate(batches)
        ]
        loads = sum(per_batch)
        want = bias.double() + rate * torch.sign(loads.mean() - loads)
        torch.testing.assert_close(got[i].double(), want, rtol=0, atol=1e-7)
        assert (loads != loads.mean()).sum() >= model.num_experts - 1 and loads.std() > 1, (i, loads)  # it moves
        counted = loads + per_batch[-1]  # the loads if an echo of the last micro-batch were counted
        echo_would_move.append(not torch.equal(torch.sign(counted.mean() - counted), torch.sign(loads.mean() - loads)))
    assert any(echo_would_move)  # so the echo's case below tells counted from not
    assert sum(len(batch.tokens) for batch in batches) == 12  # padded rows: a sequence each, its prompt in it
    for collate_pairs, echo in ((collate_shared, False), (collate, True)):
        _, other = step(collate_pairs, echo)
        assert all(torch.equal(a, b) for a, b in zip(other, got)), (collate_pairs.__name__, echo)
