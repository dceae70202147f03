"""GPU path (skipped without CUDA): bf16 log-probs against the HF float64 oracle, and a short bf16 training run."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import run_mdpo, tiny_hf_llama
from test_oracle_hf import VOCAB, hf_logps_float64, mdpo_model, random_pairs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_logps_close_to_hf_float64(megatron_world):
    from mdpo.data.batching import collate
    from mdpo.training.logprobs import sequence_stats

    hf = tiny_hf_llama(seed=0, vocab_size=VOCAB)
    model = mdpo_model(hf).to(torch.bfloat16)
    pairs = random_pairs()
    batch = collate(pairs, pad_id=0).to("cuda")
    with torch.no_grad():
        logits = model(input_ids=batch.tokens, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
        got = sequence_stats(logits, batch.labels, batch.loss_mask, VOCAB).logps.double().cpu()
    want = [hf_logps_float64(hf, p.prompt, p.chosen) for p in pairs]
    want += [hf_logps_float64(hf, p.prompt, p.rejected) for p in pairs]
    want = torch.tensor(want, dtype=torch.float64)
    assert torch.allclose(got, want, rtol=2e-2, atol=0.1), (got, want)


def test_short_bf16_training_run(tmp_path):
    from mdpo.data.synthetic import build_demo_tokenizer, make_demo_data

    tokenizer = build_demo_tokenizer(tmp_path / "tok")
    train, _ = make_demo_data(tmp_path / "data", n_train=64, n_eval=8)
    tiny_hf_llama(seed=1, vocab_size=len(tokenizer)).save_pretrained(tmp_path / "hf")
    config = {
        "model": {"init_from": str(tmp_path / "hf")},
        "data": {"train_file": str(train), "tokenizer": str(tmp_path / "tok"), "max_length": 64},
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
