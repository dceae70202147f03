"""`mdpo eval` reproduces a run's own held-out metrics from its checkpoint and its HF export, at TP=1 and TP=2;
those metrics equal an independent float64 HF forward; lm-evaluation-harness runs on an mdpo HF export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_mdpo, tiny_run_files
from transformers import AutoTokenizer, LlamaForCausalLM

from mdpo.training.eval_command import eval_setup, format_table

STEPS = 2
MAX_LENGTH = 48


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A two-step run with an eval file: its checkpoint, HF export and final eval record."""
    root = tmp_path_factory.mktemp("eval")
    files = tiny_run_files(root, n_train=16, n_eval=6, data_seed=5, model_seed=5)
    data = {"train_file": str(files["train"]), "eval_file": str(files["eval"]), "tokenizer": str(files["tokenizer"])}
    config = {
        "model": {"init_from": str(files["hf"])},
        "data": {**data, "max_length": MAX_LENGTH},
        "schedule": {"global_batch_size": 8, "micro_batch_size": 2, "train_steps": STEPS, "warmup_ratio": 0.0},
        "optimizer": {"lr": 1e-2},  # far enough from the reference for margins well away from zero
        "logging": {"run_dir": str(root / "run"), "progress": False, "plot": False},
    }
    (root / "c.yaml").write_text(yaml.safe_dump(config))
    result = run_mdpo(["train", str(root / "c.yaml")])
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in reversed(records) if "eval_loss" in r)
    assert final["step"] == STEPS
    final.pop("step")
    checkpoint = root / "run" / "checkpoints" / f"step_{STEPS:07d}"
    assert checkpoint.is_dir()
    return {**files, "checkpoint": checkpoint, "export": root / "run" / "hf", "final": final}


def mdpo_eval(*args: str, nproc: int = 1) -> dict[str, float]:
    result = run_mdpo(["eval", *args, "--json", "logging.progress=false"], nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)  # the one JSON object is all of stdout


def test_eval_of_the_final_checkpoint_is_the_runs_final_eval(run):
    # No --reference: a training checkpoint's default reference is the model its run started from.
    got = mdpo_eval("--model", str(run["checkpoint"]), "--data", str(run["eval"]))
    assert got == run["final"]  # bitwise on CPU: the same function, weights and micro-batches
    assert abs(got["eval_rewards/margins"]) > 1e-3 and abs(got["eval_rewards/chosen"]) > 1e-3  # not policy = ref


def test_eval_of_the_hf_export_at_tp2_is_the_runs_final_eval(run):
    """The export (streamed from HF tensors) under TP=2 against the run's TP=1 numbers: the HF path and the
    resharding both. A HF folder records no origin and no run settings: the reference and the run's data and
    micro-batch settings are given."""
    settings = (f"data.max_length={MAX_LENGTH}", "schedule.micro_batch_size=2", "parallel.tp=2")
    got = mdpo_eval(
        "--model", str(run["export"]), "--data", str(run["eval"]), "--reference", str(run["hf"]), *settings, nproc=2
    )
    assert got.keys() == run["final"].keys()
    for key, want in run["final"].items():
        assert got[key] == pytest.approx(want, rel=1e-5, abs=1e-9), key


def _response_sums(model: LlamaForCausalLM, prompt: list[int], response: list[int]) -> tuple[float, float]:
    """(sum of the response tokens' log-probs, sum over them of the mean logit over the vocabulary), float64."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    scored = logits[len(prompt) - 1 : -1]
    logps = torch.log_softmax(scored, -1).gather(1, torch.tensor(response)[:, None]).sum()
    return float(logps), float(scored.mean(-1).sum())


def test_the_runs_eval_metrics_equal_an_independent_hf_forward(run):
    """Oracle: HF transformers in float64 on ids built by hand (the demo tokenizer is one id per character, BOS
    first; each response ends with EOS), the sigmoid DPO loss (beta 0.1) written out."""
    tokenizer = AutoTokenizer.from_pretrained(run["tokenizer"])
    policy = LlamaForCausalLM.from_pretrained(run["export"], dtype=torch.float64).eval()
    reference = LlamaForCausalLM.from_pretrained(run["hf"], dtype=torch.float64).eval()
    rows = [json.loads(line) for line in Path(run["eval"]).read_text().splitlines()]
    beta, totals = 0.1, {}
    for row in rows:
        prompt = [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(list(row["prompt"]))]
        pair = {}
        for side in ("chosen", "rejected"):
            response = [*tokenizer.convert_tokens_to_ids(list(row[side])), tokenizer.eos_token_id]
            logps, logit_sum = _response_sums(policy, prompt, response)
            pair[side] = (logps, logps - _response_sums(reference, prompt, response)[0])
            totals[f"logit_sum/{side}"] = totals.get(f"logit_sum/{side}", 0.0) + logit_sum
            totals[f"tokens/{side}"] = totals.get(f"tokens/{side}", 0) + len(response)
        margin = beta * (pair["chosen"][1] - pair["rejected"][1])
        values = {
            "loss": math.log1p(math.exp(-margin)),
            "rewards/chosen": beta * pair["chosen"][1],
            "rewards/rejected": beta * pair["rejected"][1],
            "rewards/margins": margin,
            "rewards/accuracies": float(margin > 0),
            "logps/chosen": pair["chosen"][0],
            "logps/rejected": pair["rejected"][0],
        }
        for key, value in values.items():
            totals[key] = totals.get(key, 0.0) + value / len(rows)
    final = run["final"]
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert final[f"eval_{key}"] == pytest.approx(totals[key], rel=1e-5, abs=1e-6), key
    for side in ("chosen", "rejected"):
        want = totals[f"logit_sum/{side}"] / totals[f"tokens/{side}"]
        assert final[f"eval_logits/{side}"] == pytest.approx(want, rel=1e-4, abs=1e-7), side


def test_eval_settings_and_table(run):
    """What `mdpo eval` resolves before running: a checkpoint's run settings and origin, overrides over them, the
    reference-free flag; and the table shows every metric."""
    setup = eval_setup(str(run["checkpoint"]), str(run["eval"]), None, False, ["data.max_length=40"])
    assert setup.reference == str(run["hf"])  # the run's model.init_from: training's online reference
    assert setup.cfg.data.tokenizer == str(run["tokenizer"]) and setup.cfg.data.eval_file == str(run["eval"])
    assert (setup.cfg.data.max_length, setup.cfg.schedule.micro_batch_size) == (40, 2)  # override; the run's
    free = eval_setup(str(run["export"]), str(run["eval"]), None, True, [])
    assert free.reference is None and free.cfg.dpo.reference == "none"
    assert free.cfg.data.tokenizer == str(run["export"])  # the export's own tokenizer files
    table = format_table(setup, run["final"]).splitlines()
    assert str(run["hf"]) in table[0] and len(table) == 1 + len(run["final"])
    for line, (name, value) in zip(table[1:], run["final"].items()):
        shown_name, shown = line.split()
        assert shown_name == name and float(shown) == pytest.approx(value, rel=1e-5)


def test_lm_eval_harness_on_an_mdpo_export(run, tmp_path, monkeypatch):
    """lm-eval's HF backend on the run's export, over a local multiple-choice task made of the eval pairs (prompt,
    chosen vs rejected): a finite accuracy, and each log-likelihood equal to a float64 HF forward of its own."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install '.[eval]')")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = {
        "task": "mdpo_pairs",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(run["eval"])}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{[chosen, rejected]}}",
        "doc_to_target": 0,
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (tmp_path / "mdpo_pairs.yaml").write_text(yaml.safe_dump(task))
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={run['export']},dtype=float32,device=cpu",
        tasks=["mdpo_pairs"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        batch_size=4,
        bootstrap_iters=0,
        log_samples=True,
    )
    accuracy = results["results"]["mdpo_pairs"]["acc,none"]
    assert math.isfinite(accuracy)
    tokenizer = AutoTokenizer.from_pretrained(run["export"])
    model = LlamaForCausalLM.from_pretrained(run["export"], dtype=torch.float64).eval()
    samples = results["samples"]["mdpo_pairs"]
    assert len(samples) == 6
    wins = 0
    for sample in samples:
        ours = []
        for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
            prompt = [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(list(context))]
            want = _response_sums(model, prompt, tokenizer.convert_tokens_to_ids(list(continuation)))[0]
            assert response[0][0] == pytest.approx(want, rel=1e-5), (context, continuation)
            ours.append(want)
        wins += ours[0] > ours[1]
    assert accuracy == pytest.approx(wins / len(samples))
