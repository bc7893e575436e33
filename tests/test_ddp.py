"""DDP on the CPU: two gloo processes started by `accelerate launch` train one tiny CTC run together."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from test_train_resume import CTC_STAGE, run_settings, subprocess_env, train_command, write_corpus


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_share_batches_and_end_with_identical_weights(tiny_models, tmp_path):
    corpus = write_corpus(tmp_path / "data", num_train=16)
    stage = {**CTC_STAGE, "max_epochs": 2, "num_iters_per_epoch": 6, "checkpoint_every": 100}
    run_dir = tmp_path / "run"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *train_command("ctc", run_settings(tiny_models, stage), corpus, run_dir),
    ]
    res = subprocess.run(
        launch, capture_output=True, text=True, timeout=300, env=subprocess_env(ACCELERATE_USE_CPU="true")
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]

    summary = json.loads((run_dir / "train/summary.json").read_text())
    assert summary["num_processes"] == 2
    final_step = stage["max_epochs"] * stage["num_iters_per_epoch"] // stage["accum_grad"]
    assert summary["final_step"] == final_step
    # Same number of batches on both ranks, different batches (each rank its share of the plan) ...
    assert summary["batches_per_process"] == [final_step * stage["accum_grad"]] * 2
    assert len(set(summary["data_sha256_per_process"])) == 2
    # ... and, with the gradients all-reduced, bit-identical weights on both ranks.
    digests = summary["final_weights_sha256_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # Rank 0 wrote the shared checkpoint files, each rank its own RNG states.
    last = run_dir / "train/checkpoints" / f"step_{final_step:08d}"
    assert sorted(p.name for p in last.iterdir()) == [
        "model.safetensors",
        "rng_rank0.pt",
        "rng_rank1.pt",
        "trainer.pt",
        "trainer_state.json",
    ]
    assert (run_dir / "model/model.safetensors").is_file()
