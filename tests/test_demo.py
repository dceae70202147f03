"""`mdpo demo` as a user runs it: no download, progress, metrics, plot, and a held-out accuracy >= 0.9."""

from __future__ import annotations

import json

from conftest import run_mdpo


def test_demo_learns_the_preference(tmp_path):
    out = tmp_path / "demo"
    result = run_mdpo(["demo", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_rewards/accuracies" in r]
    assert [r["step"] for r in evals] == list(range(0, 401, 50))  # before, every 50 steps, and at the end
    before, after = evals[0]["eval_rewards/accuracies"], evals[-1]["eval_rewards/accuracies"]
    assert before == 0.0  # policy == reference: no pair can have a positive margin yet
    assert after >= 0.9, after
    assert f"{after:.3f} after" in result.stdout
    assert (out / "metrics.png").stat().st_size > 10_000
    assert (out / "hf" / "model.safetensors").exists()
