"""GPU path (skipped without CUDA), run by tools/gpu_check.sh on a lent GPU: bf16 log-probs against the HF float64
oracle, the fast attention (SDPA flash, varlen for packed rows) against Megatron's local attention, and a short
bf16 training run."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import run_mdpo, tiny_hf_llama
from test_oracle_hf import VOCAB, hf_logps_float64, mdpo_model, random_pairs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def bf16_logps(hf, attention: str, packed: bool) -> torch.Tensor:
    from mdpo.data.batching import collate, collate_packed
    from mdpo.training.logprobs import sequence_stats
    from mdpo.training.step import _forward

    model = mdpo_model(hf, attention).to(device="cuda", dtype=torch.bfloat16)
    pairs = random_pairs()
    batch = (collate_packed(pairs, pad_id=0, budget=512) if packed else collate(pairs, pad_id=0)).to("cuda")
    with torch.no_grad():
        logits = _forward(batch, model, thd=attention == "sdpa")
        stats = sequence_stats(logits, batch.labels, batch.loss_mask, VOCAB, batch.segment_ids, 2 * len(pairs))
    return stats.logps.double()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_fast_attention_matches_local_and_hf_float64(megatron_world, packed):
    """The GPU's fast path (SDPA flash kernel; packed rows through torch's varlen flash attention) and Megatron's
    local attention give the same bf16 log-probs, both close to HF's float64 ones."""
    hf = tiny_hf_llama(seed=0, vocab_size=VOCAB)
    pairs = random_pairs()
    want = [hf_logps_float64(hf, p.prompt, p.chosen) for p in pairs]
    want = torch.tensor(want + [hf_logps_float64(hf, p.prompt, p.rejected) for p in pairs], dtype=torch.float64)
    fast, local = bf16_logps(hf, "sdpa", packed).cpu(), bf16_logps(hf, "local", packed).cpu()
    assert torch.allclose(fast, want, rtol=2e-2, atol=0.1), (fast, want)
    assert torch.allclose(local, want, rtol=2e-2, atol=0.1), (local, want)
    assert torch.allclose(fast, local, rtol=1e-2, atol=0.05), (fast, local)


def test_varlen_attention_equals_block_mask_forward_and_backward():
    """torch's flash varlen kernel (used for packed rows on GPU) against SDPA with the block-diagonal causal mask."""
    from mdpo.models.attention import _varlen_attn, causal_varlen_attention

    assert _varlen_attn() is not None, f"torch {torch.__version__} has no torch.nn.attention.varlen"
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [5, 130, 1, 64, 300]
    t, heads, d = sum(lengths), 4, 64
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(t, heads, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    grad = torch.randn(t, heads, d, device="cuda", generator=g, dtype=torch.bfloat16)
    results = []
    for dtype in (torch.bfloat16, torch.float32):  # float32 takes the block-mask path: the reference
        inputs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = causal_varlen_attention(*inputs, cu, max(lengths), scale=0.1)
        out.backward(grad.to(dtype))
        results.append([out.float(), *(x.grad.float() for x in inputs)])
    for name, fast, exact in zip(("out", "dq", "dk", "dv"), *results):
        err = (fast - exact).abs().max().item() / exact.abs().max().item()
        assert err < 2e-2, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_short_bf16_training_run(tmp_path, packing):
    from mdpo.data.synthetic import build_demo_tokenizer, make_demo_data

    tokenizer = build_demo_tokenizer(tmp_path / "tok")
    train, _ = make_demo_data(tmp_path / "data", n_train=64, n_eval=8)
    tiny_hf_llama(seed=1, vocab_size=len(tokenizer)).save_pretrained(tmp_path / "hf")
    config = {
        "model": {"init_from": str(tmp_path / "hf")},
        "data": {"train_file": str(train), "tokenizer": str(tmp_path / "tok"), "max_length": 64, "packing": packing},
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
