"""GPU path (skipped without CUDA), run by tools/gpu_check.sh on a lent GPU: bf16 log-probs against the HF float64
oracle in every layout (padded, packed, shared prompt, both), the fast attention (SDPA flash; varlen for packed rows
and shared-prompt blocks) against Megatron's local attention, and short bf16 training runs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import (
    VOCAB,
    collate_as,
    hf_logps_float64,
    mdpo_model,
    model_config,
    random_pairs,
    run_mdpo,
    tiny_hf_family,
    tiny_hf_llama,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def bf16_logps(hf, attention: str, layout: str, fused_rope: bool = False) -> torch.Tensor:
    """bf16 log-probs through the trainer's forward and scoring: THD for packed rows on SDPA (the varlen kernel),
    blocks for shared prompts (one varlen call over all blocks on SDPA, per-block masks on local)."""
    from mdpo.training.step import Scorer

    model = mdpo_model(hf, attention, fused_rope=fused_rope).to(device="cuda", dtype=torch.bfloat16)
    cfg = model_config(hf.config)
    cfg.attention = attention
    batch = collate_as(layout, random_pairs()).to("cuda")
    scorer = Scorer(cfg, chunk_tokens=7, thd=attention == "sdpa")
    with torch.no_grad():
        stats = scorer.stats(batch, model, scorer.forward(batch, model))
    return stats.logps.double()


@pytest.mark.parametrize("layout", ["padded", "packed", "shared", "shared_packed"])
def test_fast_attention_matches_local_and_hf_float64(megatron_world, layout):
    """The GPU's fast path (SDPA flash kernel; packed rows and shared-prompt blocks through torch's varlen flash
    attention) and Megatron's local attention give the same bf16 log-probs, both close to HF's float64 ones."""
    hf = tiny_hf_llama(seed=0, vocab_size=VOCAB)
    pairs = random_pairs()
    want = [hf_logps_float64(hf, p.prompt, p.chosen) for p in pairs]
    want = torch.tensor(want + [hf_logps_float64(hf, p.prompt, p.rejected) for p in pairs], dtype=torch.float64)
    fast, local = bf16_logps(hf, "sdpa", layout).cpu(), bf16_logps(hf, "local", layout).cpu()
    assert torch.allclose(fast, want, rtol=2e-2, atol=0.1), (fast, want)
    assert torch.allclose(local, want, rtol=2e-2, atol=0.1), (local, want)
    assert torch.allclose(fast, local, rtol=1e-2, atol=0.05), (fast, local)


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_packed"])
def test_fused_rope_bf16_gives_the_unfused_rotations_logps(megatron_world, layout):
    """model.fused_rope on the GPU (Megatron's rotation through torch.compile's Triton kernels), bf16, SDPA: padded
    rows (a table per row position), packed rows as THD sequences (a per-token table in place of Megatron's
    per-sequence rotation) and packed shared-prompt blocks give the unfused rotation's log-probs within bf16
    rounding, both close to HF's float64 ones."""
    hf = tiny_hf_llama(seed=0, vocab_size=VOCAB)
    pairs = random_pairs()
    want = [hf_logps_float64(hf, p.prompt, p.chosen) for p in pairs]
    want = torch.tensor(want + [hf_logps_float64(hf, p.prompt, p.rejected) for p in pairs], dtype=torch.float64)
    fused, unfused = (bf16_logps(hf, "sdpa", layout, fused_rope=f).cpu() for f in (True, False))
    assert torch.allclose(fused, want, rtol=2e-2, atol=0.1), (fused, want)
    assert torch.allclose(fused, unfused, rtol=1e-2, atol=0.05), (fused, unfused)


@pytest.mark.parametrize("window", [None, 7])
def test_varlen_attention_equals_per_sequence_sdpa_forward_and_backward(window):
    """torch's flash varlen kernel (packed rows and shared-prompt blocks on GPU), with more keys than queries in some
    blocks (a rejected response after its prompt's keys), against float32 SDPA run block by block with a causal
    mask aligned at the end (and a sliding window of 7 positions)."""
    from torch.nn.attention.bias import causal_lower_right

    from mdpo.models.attention import _varlen_attn, causal_varlen, varlen_takes_window, window_allowed

    assert _varlen_attn() is not None, f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if window and not varlen_takes_window():
        pytest.skip(f"torch {torch.__version__}'s varlen kernel takes no window (mdpo attends blocks with masks)")
    g = torch.Generator(device="cuda").manual_seed(0)
    q_lengths, k_lengths = [5, 130, 1, 64, 300], [5, 170, 9, 64, 420]
    heads, d = 4, 64
    cu = lambda lengths: torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lengths), heads, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(sum(k_lengths), heads, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    grad = torch.randn_like(q)
    fast_in = [x.detach().requires_grad_() for x in (q, k, v)]
    fast = causal_varlen(*fast_in, cu(q_lengths), cu(k_lengths), max(q_lengths), max(k_lengths), 0.1, window)
    fast.backward(grad)
    exact_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    pieces = []
    for qi, ki, vi in zip(exact_in[0].split(q_lengths), exact_in[1].split(k_lengths), exact_in[2].split(k_lengths)):
        qi, ki, vi = (x.transpose(0, 1)[None] for x in (qi, ki, vi))
        sq, sk = qi.shape[2], ki.shape[2]
        mask = causal_lower_right(sq, sk)
        if window:
            mask = window_allowed(torch.arange(sk - sq, sk), torch.arange(sk), window).cuda()
        pieces.append(
            torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=0.1)[0].transpose(0, 1)
        )
    exact = torch.cat(pieces)
    exact.backward(grad.float())
    for name, a, b in zip(
        ("out", "dq", "dk", "dv"), [fast, *(x.grad for x in fast_in)], [exact, *(x.grad for x in exact_in)]
    ):
        err = (a.float() - b).abs().max().item() / b.abs().max().item()
        assert err < 2e-2, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("share_prompt", [False, True], ids=["unshared", "shared"])
def test_short_bf16_training_run(tmp_path, packing, share_prompt):
    from mdpo.data.synthetic import build_demo_tokenizer, make_demo_data

    tokenizer = build_demo_tokenizer(tmp_path / "tok")
    train, _ = make_demo_data(tmp_path / "data", n_train=64, n_eval=8)
    tiny_hf_llama(seed=1, vocab_size=len(tokenizer)).save_pretrained(tmp_path / "hf")
    config = {
        "model": {"init_from": str(tmp_path / "hf")},
        "data": {
            "train_file": str(train),
            "tokenizer": str(tmp_path / "tok"),
            "max_length": 64,
            "packing": packing,
            "share_prompt": share_prompt,
        },
        "schedule": {"global_batch_size": 16, "micro_batch_size": 4, "train_steps": 5, "warmup_ratio": 0.0},
        "optimizer": {"lr": 1e-3},
        "logging": {"run_dir": str(tmp_path / "run"), "progress": False, "plot": False},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = run_mdpo(["train", str(tmp_path / "c.yaml")])
    assert result.returncode == 0, result.stderr[-4000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_lora_bf16_run_holds_less_than_full_tuning(tmp_path):
    """LoRA against full tuning on one GPU, bf16, the same 100M-parameter random Llama and pairs: both train, and
    LoRA's peak memory is below full tuning's by at least 12 bytes a weight of the base. Full tuning holds 20
    (bf16 weights and reference copy, fp32 gradient buffer, master copy and two Adam moments), LoRA 2 (the frozen
    weights; its online reference is the base itself); 12 leaves room for activations and allocator slack."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mdpo.data.synthetic import build_demo_tokenizer, make_demo_data

    tokenizer = build_demo_tokenizer(tmp_path / "tok")
    train, _ = make_demo_data(tmp_path / "data", n_train=64, n_eval=8)
    hf = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(hf)
    weights = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path / "hf")
    peaks = {}
    for name, extra in (("full", []), ("lora", ["lora.rank=16"])):
        run_dir = tmp_path / name
        config = {
            "model": {"init_from": str(tmp_path / "hf")},
            "data": {"train_file": str(train), "tokenizer": str(tmp_path / "tok"), "max_length": 64},
            "schedule": {"global_batch_size": 16, "micro_batch_size": 4, "train_steps": 4, "warmup_ratio": 0.0},
            "optimizer": {"lr": 1e-4},
            "logging": {"run_dir": str(run_dir), "progress": False, "plot": False},
            "checkpoint": {"save_at_end": False},
        }
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        result = run_mdpo(["train", str(tmp_path / "c.yaml"), *extra])
        assert result.returncode == 0, result.stderr[-4000:]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len(records) == 4 and all(torch.isfinite(torch.tensor([r["loss"] for r in records])))
        peaks[name] = max(r["peak_memory_gib"] for r in records)
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").is_file()
    saved = 12 * weights / 2**30
    assert peaks["full"] - peaks["lora"] >= saved, peaks


def test_fused_swiglu_bf16_keeps_two_fewer_mlp_activations(megatron_world):
    """model.fused_swiglu on the GPU (Megatron's SwiGLUFunction through torch.compile's Triton kernel), bf16: the
    log-probs of the unfused MLP (within bf16 rounding), and a forward + backward whose peak memory is lower by at
    least 80% of the two intermediate-sized bf16 tensors per token and layer that the fusion does not keep."""
    from mdpo.training.step import Scorer

    hf = tiny_hf_llama(seed=0, vocab_size=VOCAB, intermediate_size=4096, num_hidden_layers=4)
    pairs = random_pairs() * 32  # 128 pairs: 256 padded rows
    cfg = model_config(hf.config)
    cfg.attention = "sdpa"
    result = {}
    for fused in (False, True):
        model = mdpo_model(hf, "sdpa", fused_swiglu=fused).to(device="cuda", dtype=torch.bfloat16).train()
        batch = collate_as("padded", pairs).to("cuda")
        scorer = Scorer(cfg, chunk_tokens=512, thd=False)
        for _ in range(2):  # the first call compiles
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            logps = scorer.stats(batch, model, scorer.forward(batch, model)).logps
            logps.sum().backward()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            model.zero_grad(set_to_none=True)
        result[fused] = (logps.detach().double().cpu(), peak, int(batch.tokens.numel()))
    (unfused, peak_unfused, tokens), (fused, peak_fused, _) = result[False], result[True]
    assert torch.allclose(fused, unfused, rtol=1e-2, atol=0.05), (fused, unfused)
    saved = 2 * cfg.intermediate_size * 2 * tokens * cfg.num_hidden_layers
    assert peak_unfused - peak_fused >= 0.8 * saved, (peak_unfused, peak_fused, saved)


@pytest.mark.parametrize("case", ["qwen3_moe", "mistral"])
def test_family_bf16_logps_on_the_gpu_layers(megatron_world, tmp_path, case):
    """On the GPU's layers (Transformer Engine's where TE is installed; else the local layers), bf16, packed rows:
    Qwen3-MoE (TE's grouped-GEMM experts, their weights loaded under TE's names; Megatron's all-to-all dispatcher on
    CUDA) and Mistral with a sliding window of 8 positions (TE's window on each THD sequence, or the varlen kernel's):
    each sequence's log-prob close to transformers' float64 one (near ties in the routing may flip in bf16: the
    tolerance is bf16's)."""
    from transformers import AutoModelForCausalLM

    from mdpo.checkpoint.description import describe_model
    from mdpo.checkpoint.load import load_initial_weights
    from mdpo.models.gpt import build_gpt_model, packs_as_thd, transformer_config
    from mdpo.training.step import Scorer

    tiny_hf_family(case, seed=3, vocab_size=VOCAB).save_pretrained(tmp_path / case)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / case, experts_implementation="eager").double().eval()
    pairs = random_pairs()
    want = [hf_logps_float64(hf, p.prompt, p.chosen) for p in pairs]
    want += [hf_logps_float64(hf, p.prompt, p.rejected) for p in pairs]
    model = describe_model({"init_from": str(tmp_path / case)})
    gpt = build_gpt_model(model, transformer_config(model, params_dtype=torch.bfloat16), scoring=True).cuda()
    load_initial_weights(gpt, model)
    gpt = gpt.eval()
    batch = collate_as("packed", pairs).to("cuda")
    scorer = Scorer(model, chunk_tokens=7, thd=packs_as_thd(model, torch.bfloat16))
    with torch.no_grad():
        got = scorer.stats(batch, gpt, scorer.forward(batch, gpt)).logps.double().cpu()
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=2e-2, atol=0.1), (got, want)
