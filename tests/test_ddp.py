"""DDP and FSDP on the CPU: two gloo processes started by `accelerate launch` train one tiny run together."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_resume import (
    ADAPTOR,
    CTC_STAGE,
    assert_same_end,
    checkpoint_steps,
    logged_steps,
    run_settings,
    start,
    subprocess_env,
    train_command,
    wait,
    wait_for,
    write_corpus,
)

from speechllm.data.batches import SpeechDataset
from speechllm.data.bucketing import DurationBucketSampler, split_batch
from speechllm.data.manifest import read_manifest
from speechllm.train.checkpoint import verify_checkpoint
from speechllm.train.loop import chain_digest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], num_processes: int) -> list[str]:
    """`accelerate launch` with N gloo processes on the CPU (ACCELERATE_USE_CPU=true in the environment)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *args,
    ]


# --------------------------------------------------------------------------------------------------- helpers

CE_STAGE = {
    **CTC_STAGE,
    "best_metric": "dev_acc",
    "keep_best": 2,
    "max_batch_size": 3,  # of the micro-batch over both processes: shares of 2 + 1 or 1 + 1
    "checkpoint_every": 100,
    "grad_clip": 0.02,
}
NO_DROPOUT = {**ADAPTOR, "dropout": 0.0, "pos_dropout": 0.0, "attn_dropout": 0.0}


def ce_settings(tiny_models, **stage) -> dict:
    """CE-stage settings without dropout: a run's trajectory then depends on its batches alone."""
    settings = run_settings(tiny_models, {**CE_STAGE, **stage})
    settings["adaptor"] = settings["models"]["adaptor"] = NO_DROPOUT
    return settings


def run(command: list[str], log_file: Path) -> str:
    env = subprocess_env(ACCELERATE_USE_CPU="true")
    res = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    log_file.write_text(res.stdout + res.stderr)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res.stdout + res.stderr


def assert_close(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str, atol: float = 1e-6
) -> None:
    """Equal up to rounding: FSDP sums the squared gradient norm over shards, so the clipping factor (and the
    clipped update) may differ in the last bit. A wrong norm (e.g. a shard's own) would be far off."""
    assert got.keys() == want.keys(), what
    for name in got:
        error = float((got[name] - want[name]).abs().max())
        assert torch.allclose(got[name], want[name], rtol=0, atol=atol), f"{what}: {name} differs by {error}"


def assert_rows_close(got: list[dict], want: list[dict]) -> None:
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for row, expected in zip(got, want, strict=True):
        assert row == pytest.approx(expected, rel=1e-5), (row, expected)


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "train/metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "grad_norm", "lr")} for r in rows if "loss" in r]


# ------------------------------------------------------------------------------------------------------ DDP


def expected_digests(corpus: dict[str, Path], stage: dict, num_processes: int) -> list[str]:
    """Each process's data digest (as the loop chains it) when process r takes its share of every batch of the
    one-process plan: the batches of the one-process run, split longest first (ESPnet `batch[rank::W]`)."""
    records = read_manifest(corpus["train"])
    durations = SpeechDataset(records, 16000).durations()
    single = DurationBucketSampler(
        durations,
        stage["batch_seconds"],
        stage["num_buckets"],
        seed=0,
        max_batch_size=stage.get("max_batch_size"),
    )
    batches: list[list[int]] = []
    for data_pass in range(3):
        single.set_epoch(data_pass)
        batches += list(single)
    batches = batches[: stage["max_epochs"] * stage["num_iters_per_epoch"]]
    assert min(map(len, batches)) >= num_processes  # so the split plan is the one-process plan
    digests = [""] * num_processes
    for batch in batches:
        for rank in range(num_processes):
            ids = [str(records[i]["id"]) for i in split_batch(batch, durations, num_processes, rank)]
            digests[rank] = chain_digest(digests[rank], ids)
    return digests


def test_two_gloo_processes_split_every_batch_of_one_process(tiny_models, tmp_path):
    """The batch budget is global (ESPnet): at every step the two ranks' sub-batches together are the batch of
    a one-process run, an epoch counts those global batches, and with ESPnet's loss weights (B_r * W / B, the
    shares are uneven: 3 = 2 + 1) the two runs take the same updates. Without dropout they agree up to
    rounding.
    """
    corpus = write_corpus(tmp_path / "data", num_train=24)
    stage = {**CTC_STAGE, "max_epochs": 2, "num_iters_per_epoch": 6, "checkpoint_every": 100}
    settings = run_settings(tiny_models, stage)
    settings["adaptor"] = settings["models"]["adaptor"] = NO_DROPOUT
    single, pair = tmp_path / "single", tmp_path / "pair"
    run([sys.executable, *train_command("ctc", settings, corpus, single)], tmp_path / "single.log")
    run(launch(train_command("ctc", settings, corpus, pair), 2), tmp_path / "pair.log")

    summary = json.loads((pair / "train/summary.json").read_text())
    expected = json.loads((single / "train/summary.json").read_text())
    assert summary["num_processes"] == 2
    final_step = stage["max_epochs"] * stage["num_iters_per_epoch"] // stage["accum_grad"]
    assert summary["final_step"] == expected["final_step"] == final_step
    assert summary["epochs"] == expected["epochs"] == stage["max_epochs"]
    # Every rank one share per global batch: as many micro-batches as the one process ...
    micro_batches = stage["max_epochs"] * stage["num_iters_per_epoch"]
    assert summary["batches_per_process"] == [micro_batches] * 2
    assert expected["batches_per_process"] == [micro_batches]
    # ... and exactly its share of the one-process batch at every step (the ranks' digests chain their ids).
    assert expected["data_sha256_per_process"] == expected_digests(corpus, stage, 1)
    assert summary["data_sha256_per_process"] == expected_digests(corpus, stage, 2)
    assert len(set(summary["data_sha256_per_process"])) == 2
    # Same losses, gradient norms and dev evaluations as the one process, and its weights. Sub-batches sum in
    # another order than the whole batch; Adam's normalised steps (lr 2e-3) carry that rounding to a few 1e-5
    # where a gradient is nearly 0.
    assert_rows_close(train_rows(pair), train_rows(single))
    assert_rows_close(summary["history"], expected["history"])
    last = f"train/checkpoints/step_{final_step:08d}/model.safetensors"
    for name in (last, "model/model.safetensors"):
        assert_close(load_file(str(pair / name)), load_file(str(single / name)), name, atol=1e-4)
    # With the gradients all-reduced, bit-identical weights on both ranks.
    digests = summary["final_weights_sha256_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # Rank 0 wrote the shared checkpoint files and their checksums (every rank's RNG file among them), each
    # rank its own RNG states.
    checkpoint = (pair / last).parent
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "checksums.sha256",
        "model.safetensors",
        "rng_rank0.pt",
        "rng_rank1.pt",
        "trainer.pt",
        "trainer_state.json",
    ]
    verify_checkpoint(checkpoint)
    assert "rng_rank1.pt" in (checkpoint / "checksums.sha256").read_text()


def test_a_signal_to_one_rank_stops_both_after_the_same_update(tiny_models, tmp_path):
    """SIGTERM reaching one rank only (signals may arrive at slightly different times): both ranks stop after
    the same update (one shared checkpoint with both RNG files, no rank left waiting in a collective), and the
    relaunch ends with the weights of an uninterrupted two-process run."""
    import psutil

    corpus = write_corpus(tmp_path / "data", num_train=16)
    stage = {**CTC_STAGE, "checkpoint_every": 1000, "keep_checkpoints": 5}  # periodic only at epoch ends (5)
    settings = run_settings(tiny_models, stage)
    env = subprocess_env(ACCELERATE_USE_CPU="true")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    reference = start(
        launch(train_command("ctc", settings, corpus, straight), 2)[1:], env, tmp_path / "a.log"
    )
    launcher = start(launch(train_command("ctc", settings, corpus, stopped), 2)[1:], env, tmp_path / "b.log")
    wait_for(lambda: logged_steps(stopped), launcher)
    ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "RANK" in p.environ()]
    next(p for p in ranks if p.environ()["RANK"] == "1").send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=120) != 0
    log = (tmp_path / "b.log").read_text()
    stop_step = int(re.search(r"stopping after update (\d+)", log).group(1))
    assert stop_step % 5 != 0 and checkpoint_steps(stopped)[-1] == stop_step, log[-3000:]
    written = stopped / "train/checkpoints" / f"step_{stop_step:08d}"
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in written.iterdir()}

    relaunch = start(launch(train_command("ctc", settings, corpus, stopped), 2)[1:], env, tmp_path / "c.log")
    wait(reference, tmp_path / "a.log")
    wait(relaunch, tmp_path / "c.log")
    assert f"resuming from {written}" in (tmp_path / "c.log").read_text()
    # (data_sha256_per_process is not compared: the checkpoint keeps rank 0's chain of batch ids only.)
    final_step = stage["max_epochs"] * stage["num_iters_per_epoch"] // stage["accum_grad"]
    same = ("history", "final_weights_sha256_per_process", "batches_per_process")
    assert_same_end(straight, stopped, final_step, same)


# ------------------------------------------------------------------------------------------------------ FSDP


def test_fsdp_on_two_gloo_processes_equals_one_process_and_resumes(tiny_models, tmp_path):
    """FSDP on 2 processes and one plain process take the same updates (the same settings, accum 1).

    Each rank takes its share of every global batch (ESPnet's split), and ESPnet's loss weights make the
    reduce-scattered gradient that of the whole batch. Without dropout the runs agree up to rounding. The FSDP
    run stops after one epoch; a second launch with two epochs resumes from its checkpoint (full optimizer
    state) and continues.
    """
    corpus = write_corpus(tmp_path / "data", num_train=28)  # 12 batches of 2 or 3: both runs stay in pass 0
    reference, sharded = tmp_path / "reference", tmp_path / "fsdp"
    plain = ce_settings(tiny_models, accum_grad=1, num_iters_per_epoch=3, max_epochs=2)
    run([sys.executable, *train_command("ce", plain, corpus, reference)], tmp_path / "reference.log")
    logs = []
    for epochs in (1, 2):
        fsdp = ce_settings(tiny_models, accum_grad=1, num_iters_per_epoch=3, max_epochs=epochs, fsdp=True)
        logs.append(
            run(launch(train_command("ce", fsdp, corpus, sharded), 2), tmp_path / f"fsdp_{epochs}.log")
        )
    assert all(
        "FSDP: 2 LLM decoder blocks (BloomBlock) and the root unit sharded over 2 processes" in out
        for out in logs
    )
    assert f"resuming from {sharded / 'train/checkpoints/step_00000003'}" in logs[1]

    summary = json.loads((sharded / "train/summary.json").read_text())
    expected = json.loads((reference / "train/summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["final_step"] == expected["final_step"] == 6
    assert summary["batches_per_process"] == [6, 6] and expected["batches_per_process"] == [6]
    assert summary["selected_steps"] == expected["selected_steps"] and len(expected["selected_steps"]) == 2
    # Losses, global gradient norms (clipped at 0.02 in the first updates) and dev evaluations ...
    assert_rows_close(train_rows(sharded), train_rows(reference))
    assert max(r["grad_norm"] for r in train_rows(reference)) > CE_STAGE["grad_clip"]
    assert summary["initial_dev"] == expected["initial_dev"]
    assert_rows_close(summary["history"], expected["history"])
    assert summary["history"][-1]["dev_loss"] < summary["initial_dev"]["dev_loss"]
    # ... and the weights after one epoch, at the end, and the exported k-best average.
    for name in ("step_00000003", "step_00000006"):
        path = f"train/checkpoints/{name}/model.safetensors"
        assert_close(load_file(str(sharded / path)), load_file(str(reference / path)), name)
    exported = "model/model.safetensors"
    assert_close(load_file(str(sharded / exported)), load_file(str(reference / exported)), "exported")
    # The checkpoint holds the full (unsharded) optimizer state of the trainable parameters, by name.
    trainer = torch.load(sharded / "train/checkpoints/step_00000006/trainer.pt", weights_only=True)
    weights = load_file(str(sharded / "train/checkpoints/step_00000006/model.safetensors"))
    state = trainer["optimizer"]["state"]
    assert {k.removeprefix("model.") for k in state} == set(weights)
    assert all(state[k]["exp_avg"].shape == weights[k.removeprefix("model.")].shape for k in state)


def test_fsdp_with_gradient_accumulation_equals_ddp(tiny_models, tmp_path):
    """Accumulation under FSDP (no reduce-scatter until the last micro-batch) against DDP's `no_sync`.

    Both runs give each rank the same batches and the same dropout masks (same seed per rank), so they agree
    up to rounding when the accumulated FSDP gradients equal DDP's.
    """
    corpus = write_corpus(tmp_path / "data", num_train=16)
    stage = {**CE_STAGE, "accum_grad": 2, "num_iters_per_epoch": 4, "max_epochs": 2}
    runs = {}
    for fsdp in (False, True):
        settings = run_settings(tiny_models, {**stage, "fsdp": fsdp})  # with dropout
        runs[fsdp] = tmp_path / f"fsdp_{fsdp}"
        run(launch(train_command("ce", settings, corpus, runs[fsdp]), 2), tmp_path / f"fsdp_{fsdp}.log")
    ddp, sharded = runs[False], runs[True]
    summary = json.loads((sharded / "train/summary.json").read_text())
    expected = json.loads((ddp / "train/summary.json").read_text())
    assert summary["final_step"] == expected["final_step"] == 4
    assert summary["data_sha256_per_process"] == expected["data_sha256_per_process"]
    assert_rows_close(train_rows(sharded), train_rows(ddp))
    assert_rows_close(summary["history"], expected["history"])
    for name in ("train/checkpoints/step_00000004/model.safetensors", "model/model.safetensors"):
        assert_close(load_file(str(sharded / name)), load_file(str(ddp / name)), name)
