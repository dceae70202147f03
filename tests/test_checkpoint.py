"""Reliability: exact resume (bitwise on CPU), pre-emption (SIGTERM), kill -9, incomplete checkpoints, non-finite
steps. Each compares against an uninterrupted run of the same config."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import REPO, run_mdpo, subprocess_env, tiny_hf_family, tiny_run_files
from safetensors.torch import load_file

STEPS = 6
CASES = ("qwen3_tied", "qwen3_moe", "deepseek_v3")  # models besides the setup's Llama, named by a layout's suffix


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    files = tiny_run_files(root, n_train=96, n_eval=8, data_seed=2, model_seed=2)
    config = {
        "model": {"init_from": str(files["hf"])},
        "data": {"train_file": str(files["train"]), "tokenizer": str(files["tokenizer"]), "max_length": 64},
        "schedule": {"global_batch_size": 8, "micro_batch_size": 4, "train_steps": STEPS, "warmup_ratio": 0.3},
        "optimizer": {"lr": 1e-3},
        "logging": {"progress": False, "plot": False},
    }
    (root / "c.yaml").write_text(yaml.safe_dump(config))
    vocab = json.loads((files["hf"] / "config.json").read_text())["vocab_size"]
    for case in CASES:
        tiny_hf_family(case, seed=2, vocab_size=vocab).save_pretrained(root / case)
    return root


def train(root: Path, run: str, *overrides: str, nproc: int = 1):
    result = run_mdpo(["train", str(root / "c.yaml"), f"logging.run_dir={root / run}", *overrides], nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def outcome(run_dir: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("tokens_per_second", None)  # wall-clock, differs run to run
        record.pop("peak_memory_gib", None)  # process memory, differs run to run
    return records, load_file(str(run_dir / "hf" / "model.safetensors"))


def assert_bitwise(got, want):
    assert got[0] == want[0]
    assert got[1].keys() == want[1].keys()
    assert all(torch.equal(got[1][k], want[1][k]) for k in want[1])


# bco_pair's running reward mean is training state too: these resumes are bitwise only if it is restored.
BCO = "dpo.loss_type=[sigmoid, bco_pair]"
MOE = ["parallel.ep=2", "parallel.distributed_optimizer=true", "dpo.router_aux_loss_coef=0.1"]
LAYOUTS = {
    "tp1": (1, [BCO]),
    "tp2_sp_bf16": (2, [BCO, "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.precision=bf16"]),
    "pp2_vpp2": (2, [BCO, "parallel.pp=2", "parallel.vpp=2"]),
    # a tied head across stages (Megatron's copy of the embedding on the last stage, its own optimizer state)
    "pp2_qwen3_tied": (2, [BCO, "parallel.pp=2"]),
    # experts split over 2 ranks, their optimizer state sharded apart from the dense part's; the load-balancing loss
    "ep2_distopt_qwen3_moe": (2, [BCO, *MOE]),
    # DeepSeek-V3 (MLA, a shared expert, group-limited sigmoid routing) with its correction bias moving after each
    # step: model state, saved and restored
    "ep2_distopt_bias_update_deepseek_v3": (2, [BCO, *MOE, "model.router_bias_update_rate=0.01"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_stopped_and_resumed_run_is_bitwise_the_uninterrupted_one(setup, name):
    nproc, layout = LAYOUTS[name]
    for case in CASES:
        if name.endswith(case):
            layout = [*layout, f"model.init_from={setup / case}"]
    train(setup, f"{name}_full", *layout, nproc=nproc)
    first = train(setup, f"{name}_resumed", *layout, "schedule.exit_interval=2", nproc=nproc)
    assert "stopped after step 2" in first.stdout
    # The resumed part also profiles a step (logging.profile_step): profiling must not change the result.
    second = train(setup, f"{name}_resumed", *layout, "logging.profile_step=4", nproc=nproc)
    assert "resumed from" in second.stdout and "(step 2)" in second.stdout
    assert_bitwise(outcome(setup / f"{name}_resumed"), outcome(setup / f"{name}_full"))
    if "bias_update" in name:  # the bias moved before the stop and after it: a resume without it would differ
        start, end = load_file(setup / "deepseek_v3" / "model.safetensors"), outcome(setup / f"{name}_full")[1]
        layers = json.loads((setup / "deepseek_v3" / "config.json").read_text())["num_hidden_layers"]  # MTP after
        biases = [k for k in start if k.endswith("e_score_correction_bias") and int(k.split(".")[2]) < layers]
        assert len(biases) == 3 and all((end[key] - start[key]).abs().max() > 0.015 for key in biases)
    # the table lists the step's ops by time (its top 40, which of them wins varies run to run); the trace has all
    profile = (setup / f"{name}_resumed" / "profile.txt").read_text()
    assert profile.startswith("step 4") and "aten::" in profile and "Self CPU time total" in profile
    assert '"aten::mm"' in (setup / f"{name}_resumed" / "profile_trace.json").read_text()


@pytest.mark.parametrize(
    ("first", "then"),
    [([], ["parallel.tp=2"]), (["parallel.pp=2", "parallel.vpp=2"], [])],
    ids=["tp1_to_tp2", "pp2_vpp2_to_tp1"],
)
def test_resume_at_another_layout(setup, first, then):
    """A checkpoint resumed at another layout (resharded: TP=1 under TP=2; two model chunks per stage of PP=2, saved
    as model0/model1, under one process) continues the same run, to fp32 reordering noise."""
    if not (setup / "tp1_full").exists():
        train(setup, "tp1_full", BCO)
    run = "relayout_" + "_".join(first + then).replace("parallel.", "").replace("=", "")
    train(setup, run, BCO, *first, "schedule.exit_interval=3", nproc=2 if first else 1)
    train(setup, run, BCO, *then, nproc=2 if then else 1)
    (got, got_w), (want, want_w) = outcome(setup / run), outcome(setup / "tp1_full")
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for key, tensor in want_w.items():
        assert (got_w[key] - tensor).abs().max() <= 1e-5 * tensor.abs().max(), key


def _launch(setup: Path, run: str, *overrides: str, nproc: int = 1) -> subprocess.Popen:
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"] if nproc > 1 else []
    cmd = [
        sys.executable,
        *launcher,
        "-m",
        "mdpo",
        "train",
        str(setup / "c.yaml"),
        f"logging.run_dir={setup / run}",
        *overrides,
    ]
    # its own process group: a kill takes its helpers (the checkpoint writer's Manager process) down with it
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists() and sum(1 for _ in path.read_text().splitlines()) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


LONG = ("schedule.train_steps=24", "checkpoint.save_interval=3")


def test_sigterm_saves_and_exits_0_then_resumes(setup):
    train(setup, "long_full", *LONG)
    proc = _launch(setup, "sigterm", *LONG)
    _wait_for_step(setup / "sigterm", 4, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped after step" in out
    train(setup, "sigterm", *LONG)
    assert_bitwise(outcome(setup / "sigterm"), outcome(setup / "long_full"))


def _run_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The launcher and everything under it (torchrun's workers lead sessions of their own, so a process group
    kill misses them: that is what this test is about)."""
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_a_second_run_on_a_busy_folder_is_refused_and_a_dead_runs_lock_taken_over(setup):
    """While a run trains, the same command (same run directory), or another run writing to its checkpoint.dir,
    stops at once with one line naming the holder; after the first run is SIGKILLed its lock is simply taken over
    and the run resumes."""
    run_dir, busy = setup / "busy", ("schedule.train_steps=5000", "checkpoint.save_interval=3")  # still training
    proc = _launch(setup, "busy", *busy, "checkpoint.dir=" + str(setup / "busy_ckpt"))
    _wait_for_step(run_dir, 5, proc)
    second = run_mdpo(["train", str(setup / "c.yaml"), f"logging.run_dir={run_dir}", *busy])
    other = run_mdpo(
        [
            "train",
            str(setup / "c.yaml"),
            f"logging.run_dir={setup / 'busy_other'}",
            *busy,
            f"checkpoint.dir={setup / 'busy_ckpt'}",
        ]
    )
    holder = f"pid {proc.pid})"
    for result, key in ((second, "logging.run_dir"), (other, "checkpoint.dir")):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
        assert lines[0].startswith(f"mdpo: error: {key}: ") and "in use by another mdpo run" in lines[0], lines
        assert lines[0].endswith(
            f"{holder}; wait for it to end or stop it (a lock left by a process that died is taken over)"
        ), lines
    assert proc.poll() is None  # the first run was not disturbed
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    result = train(setup, "busy", *busy, "checkpoint.dir=" + str(setup / "busy_ckpt"), "schedule.exit_interval=1")
    assert "resumed from" in result.stdout and "stopped after step" in result.stdout


# DP=2 with the distributed optimizer: the most state a kill can cut into (each rank's optimizer shard).
KILL_LAYOUTS = {"dp2_distopt": ["parallel.distributed_optimizer=true"]}


@pytest.mark.parametrize("name", list(KILL_LAYOUTS))
def test_launcher_killed_three_times_leaves_no_process_and_the_run_ends_exact(setup, name):
    """torchrun's whole process group SIGKILLed at 3 random moments (training, saving, evaluating, starting up),
    the same command started again each time: no process of a killed run survives its launcher (they would train
    on beside the restarted run), metrics.jsonl holds each step once, and the final metrics and weights are
    bitwise those of an uninterrupted run."""
    layout = KILL_LAYOUTS[name]
    train(setup, f"kill_{name}_full", *LONG, *layout, nproc=2)
    rng = random.Random(f"kill-{name}")
    run_dir = setup / f"kill_{name}"
    for kill in range(3):
        proc = _launch(setup, run_dir.name, *LONG, *layout, nproc=2)
        done = sum(1 for _ in (run_dir / "metrics.jsonl").open()) if (run_dir / "metrics.jsonl").exists() else 0
        target = min(24, done + rng.randint(0, 6))
        if target > done:
            _wait_for_step(run_dir, target, proc)
        else:
            time.sleep(rng.uniform(1.0, 6.0))  # during start-up (or the initial evaluation)
        time.sleep(rng.uniform(0.0, 1.0))
        processes = _run_processes(proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while _alive(processes) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(processes), (kill, [p.cmdline()[:4] for p in _alive(processes)])
    # A checkpoint folder without its completion marker (a save cut short) must never be picked up.
    fake = run_dir / "checkpoints" / "step_0000023"  # never saved by this run (23 % 3 != 0)
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "mdpo_meta.json").write_text("{}")
    result = train(setup, run_dir.name, *LONG, *layout, nproc=2)
    assert "step_0000023" not in result.stdout
    records, weights = outcome(run_dir)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 25))
    assert_bitwise((records, weights), outcome(setup / f"kill_{name}_full"))


_INJECT = """
import dataclasses
import sys
import mdpo.training.step as step
real, calls = step.pair_losses, [0]
def faulty(*args, **kwargs):
    out = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == 3:  # one call per micro-batch (2 per step): step 2's first
        out = dataclasses.replace(out, losses=out.losses * float("nan"))
    return out
step.pair_losses = faulty
from mdpo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _inject(setup: Path, run: str, *overrides: str) -> subprocess.CompletedProcess:
    """`mdpo train` with step 2's first micro-batch's losses made NaN (in the command's own process)."""
    script = setup / "inject_nan.py"
    script.write_text(_INJECT)
    args = [str(script), "train", str(setup / "c.yaml"), f"logging.run_dir={setup / run}"]
    return run_mdpo([*args, "checkpoint.save_at_end=false", *overrides], timeout=300)


def test_nonfinite_loss_stops_naming_step_and_pairs(setup):
    result = _inject(setup, "nan_stop")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("mdpo: error:")][0]
    assert "step 2: non-finite loss (nan)" in message
    pairs = json.loads(message.split("offending micro-batches: ")[1])
    assert len(pairs) == 4  # the micro-batch of 4 pairs whose loss was poisoned


def test_nonfinite_loss_skipped_when_asked(setup):
    result = _inject(setup, "nan_skip", "optimizer.nonfinite=skip")
    assert result.returncode == 0, result.stderr[-2000:]
    records, weights = outcome(setup / "nan_skip")
    assert [r["skipped"] for r in records] == [False, True, False, False, False, False]
    assert records[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(w).all() for w in weights.values())
    result = _inject(setup, "nan_limit", "optimizer.nonfinite=skip", "optimizer.max_skipped_steps=0")
    assert result.returncode == 2 and "step 2: non-finite" in result.stderr


def test_full_disk_during_a_save_is_a_clear_error_and_leaves_no_loadable_folder(setup, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        result = run_mdpo(
            [
                "train",
                str(setup / "c.yaml"),
                f"logging.run_dir={tmp_path / 'run'}",
                f"checkpoint.dir={small / 'ck'}",
                "checkpoint.save_interval=1",
            ]
        )
        assert result.returncode == 2, result.stderr[-2000:]
        assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
        from mdpo.checkpoint.dist import complete_checkpoints

        assert complete_checkpoints(small / "ck") == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_distributed_optimizer_resumes_at_other_layouts(setup):
    """DP=2 with the distributed optimizer (torch's AdamW: no TE or Apex here) stopped at step 2 and resumed
    resharded: at DP=1 the weights and every metric bitwise but the grad norm (its squares summed over other shards:
    fp32 rounding); at TP=2 (DP=1), to fp32 reordering noise. (At DP=2 it resumes bitwise: the kill test.)"""
    distopt = "parallel.distributed_optimizer=true"
    train(setup, "distopt_full", distopt, nproc=2)
    want = outcome(setup / "distopt_full")
    for name, nproc, layout in (("distopt_dp1", 1, []), ("distopt_tp2", 2, ["parallel.tp=2"])):
        first = train(setup, name, distopt, "schedule.exit_interval=2", nproc=2)
        assert "stopped after step 2" in first.stdout
        train(setup, name, distopt, *layout, nproc=nproc)
        got = outcome(setup / name)
        if name == "distopt_dp1":
            norms = [(a.pop("grad_norm", None), b.pop("grad_norm", None)) for a, b in zip(got[0], want[0], strict=True)]
            assert all(a == pytest.approx(b, rel=1e-6) for a, b in norms if b is not None)
            assert_bitwise(got, want)
            continue
        for a, b in zip(got[0], want[0], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        for key, tensor in want[1].items():
            assert (got[1][key] - tensor).abs().max() <= 1e-5 * tensor.abs().max(), key


# ------------------------------------------------------------------ damaged checkpoints, changed runs, a time budget


def _damage(folder: Path, kind: str) -> str:
    """Damage a saved checkpoint as a partial copy or a lost file would; returns the file hit."""
    shards = sorted(folder.glob("*.distcp"))
    if kind == "shard_truncated":
        target = shards[-1]
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif kind == "shard_deleted":
        target = shards[0]
        target.unlink()
    elif kind == "metadata_truncated":
        target = folder / ".metadata"
        target.write_bytes(target.read_bytes()[:100])
    else:  # written before manifests: nothing to check, loaded as it is
        target = folder / "mdpo_manifest.json"
        target.unlink()
    return target.name


DAMAGES = {
    "shard_truncated": "tp1",
    "shard_deleted": "tp1",
    "metadata_truncated": "tp1",
    "no_manifest": "tp1",
    "shard_truncated_tp2": "tp2_sp_bf16",
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_resumes_exactly(setup, name):
    """Saved at steps 2 and 4 and stopped; step 4 then damaged (a shard cut short or lost, the DCP metadata cut
    short): the rerun names the file, moves step 4 aside and resumes from step 2, ending bitwise the uninterrupted
    run (metrics.jsonl cut back to step 2). A checkpoint without a manifest (written before them) loads unchecked."""
    layout_name = DAMAGES[name]
    nproc, layout = LAYOUTS[layout_name]
    if not (setup / f"{layout_name}_full" / "hf").exists():
        train(setup, f"{layout_name}_full", *layout, nproc=nproc)
    run = f"damaged_{name}"
    train(setup, run, *layout, "checkpoint.save_interval=2", "schedule.exit_interval=4", nproc=nproc)
    step4 = setup / run / "checkpoints" / "step_0000004"
    hit = _damage(step4, name.removesuffix("_tp2"))
    result = train(setup, run, *layout, "checkpoint.save_interval=2", nproc=nproc)
    if name == "no_manifest":
        assert "(step 4)" in result.stdout and "is damaged" not in result.stdout
    else:
        said = [line for line in result.stdout.splitlines() if "is damaged" in line]
        assert len(said) == 1 and hit in said[0] and "moved aside to step_0000004.damaged" in said[0], result.stdout
        assert "resumed from" in result.stdout and "(step 2)" in result.stdout
        assert (step4.parent / "step_0000004.damaged" / "COMPLETE").is_file()  # kept, never loaded again
    assert_bitwise(outcome(setup / run), outcome(setup / f"{layout_name}_full"))


def test_a_resume_lists_what_changed_and_goes_on_only_when_the_run_is_kept(setup):
    """Stopped at step 2, resumed with logging and save settings changed: listed, and the run goes on exactly; with
    the learning rate changed it is refused in one line (tests/test_bad_inputs.py), and with
    checkpoint.allow_changes=true listed as a change that makes it another run, and taken."""
    train(setup, "changed", BCO, "schedule.exit_interval=2")
    kept = train(setup, "changed", BCO, "logging.log_interval=2", "checkpoint.keep_last=3", "schedule.exit_interval=4")
    lines = [line for line in kept.stdout.splitlines() if "changes that keep the run" in line]
    listed = "checkpoint.keep_last 2 -> 3, logging.log_interval 1 -> 2, schedule.exit_interval 2 -> 4"
    assert lines == [f"[mdpo] resuming with changes that keep the run: {listed}"], kept.stdout
    changed = ["train", str(setup / "c.yaml"), f"logging.run_dir={setup / 'changed'}", BCO, "optimizer.lr=2e-3"]
    refused = run_mdpo(changed)
    assert refused.returncode == 2 and "optimizer.lr 0.001 -> 0.002" in refused.stderr
    allowed = train(setup, "changed", BCO, "optimizer.lr=2e-3", "checkpoint.allow_changes=true")
    said = "[mdpo] checkpoint.allow_changes: resuming with changes that make it another run: optimizer.lr 0.001 -> "
    assert f"{said}0.002" in allowed.stdout and "(step 4)" in allowed.stdout


def test_a_time_budget_saves_and_exits_0_and_the_same_command_resumes_exactly(setup):
    """schedule.exit_duration_minutes=0.01 (0.6 s, already spent by start-up): every launch trains one step, saves
    and exits 0; the same command relaunched until the run ends gives bitwise the uninterrupted run."""
    if not (setup / "tp1_full" / "hf").exists():
        train(setup, "tp1_full", BCO)
    for launch in range(1, STEPS + 1):
        result = train(setup, "budget", BCO, "--exit-duration-in-mins", "0.01")
        stopped = [line for line in result.stdout.splitlines() if "stopped after step" in line]
        said = f"[mdpo] stopped after step {launch} with a checkpoint; run the same command again to resume"
        assert stopped == ([said] if launch < STEPS else []), (launch, result.stdout)
    assert_bitwise(outcome(setup / "budget"), outcome(setup / "tp1_full"))


def test_a_checkpoint_from_before_components_and_manifests_resumes_exactly(setup):
    """A checkpoint as mdpo wrote them before (bco_pair's running mean in the meta, not a component of its own; no
    list of components; no manifest) resumes, and the run ends bitwise the uninterrupted one."""
    if not (setup / "tp1_full" / "hf").exists():
        train(setup, "tp1_full", BCO)
    train(setup, "old_format", BCO, "schedule.exit_interval=2")
    step2 = setup / "old_format" / "checkpoints" / "step_0000002"
    common = torch.load(step2 / "common.pt", weights_only=False)
    meta = json.loads((step2 / "mdpo_meta.json").read_text())
    meta["reward_mean"] = common.pop("objective")
    del meta["components"]
    torch.save(common, step2 / "common.pt")
    (step2 / "mdpo_meta.json").write_text(json.dumps(meta))
    (step2 / "mdpo_manifest.json").unlink()
    result = train(setup, "old_format", BCO)
    assert "(step 2)" in result.stdout
    assert_bitwise(outcome(setup / "old_format"), outcome(setup / "tp1_full"))


def test_expert_parallel_checkpoint_resumes_in_one_process(setup):
    """A MoE run stopped at EP=2 (distributed optimizer) and resumed in one process (each expert's weights and
    optimizer state resharded from its EP rank) continues the one-process run, to fp32 reordering noise; the
    checkpoint's export to HF (one process) is the run's own export."""
    moe = [BCO, f"model.init_from={setup / 'qwen3_moe'}", *MOE[1:]]
    train(setup, "moe_tp1_full", *moe)
    train(setup, "moe_ep2_to_1", *moe, MOE[0], "schedule.exit_interval=3", nproc=2)
    train(setup, "moe_ep2_to_1", *moe)
    (got, got_w), (want, want_w) = outcome(setup / "moe_ep2_to_1"), outcome(setup / "moe_tp1_full")
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "aux_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    for key, tensor in want_w.items():
        assert (got_w[key] - tensor).abs().max() <= 1e-5 * tensor.abs().max(), key
