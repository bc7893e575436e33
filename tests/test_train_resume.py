"""Exact resume: a training run killed with SIGKILL and restarted ends with an uninterrupted run's weights.

Also the checkpoint files themselves (atomic writes, pruning, RNG round trip, weights_only loading) and the
recipe bookkeeping (k-best averaging, early stopping). The helpers here build the tiny training runs that
test_ddp.py and test_tracking.py use too.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from speechllm.train.checkpoint import CheckpointManager, KeptState, TrainerState, capture_rng, restore_rng
from speechllm.train.loop import (
    StageConfig,
    average_states,
    early_stopping_update,
    rank_kept,
    selection_value,
)

SR = 16000
ADAPTOR = {
    "input_dim": 16,
    "d_model": 32,
    "heads": 2,
    "linear_units": 64,
    "cgmlp_units": 64,
    "cgmlp_kernel": 5,
    "merge_kernel": 5,
    "num_blocks": 2,
    "dropout": 0.1,
    "pos_dropout": 0.1,
    "attn_dropout": 0.1,
    "interctc_layer": 1,
}
CTC_STAGE = {
    "lr": 2.0e-3,
    "weight_decay": 1.0e-6,
    "warmup_steps": 4,
    "grad_clip": 5.0,
    "accum_grad": 2,
    "batch_seconds": 2.5,
    "num_buckets": 2,
    "max_epochs": 3,
    "num_iters_per_epoch": 10,
    "patience": None,
    "early_stopping_metric": "dev_loss",
    "best_metric": "dev_cer",
    "keep_best": 1,
    "checkpoint_every": 3,
    "keep_checkpoints": 2,
    "log_every": 1,
    "precision": "fp32",
    "find_unused_parameters": True,
    "fsdp": False,
    "num_workers": 0,
    "ctc_weight": 0.8,
    "interctc_weight": 0.2,
}
SENTENCES = [
    ("en_us", "the cat sits on the mat"),
    ("de_de", "der hund schläft im garten"),
    ("en_us", "hello world"),
    ("de_de", "der hund"),
    ("en_us", "the cat"),
]


def write_corpus(root: Path, num_train: int = 12, num_dev: int = 4, seed: int = 0) -> dict[str, Path]:
    """Noisy-tone clips of 0.4-1.0 s with short transcripts; train/dev manifests and language ids."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in (("train", num_train), ("dev", num_dev)):
        lines = []
        for i in range(count):
            language, text = SENTENCES[i % len(SENTENCES)]
            n = int(rng.integers(int(0.4 * SR), int(1.0 * SR)))
            t = np.arange(n) / SR
            wav = 0.3 * np.sin(2 * np.pi * (150 + 40 * (i % 5)) * t) + 0.05 * rng.standard_normal(n)
            audio = root / f"{split}_{i}.wav"
            sf.write(str(audio), wav.astype(np.float32), SR)
            lines.append(
                json.dumps(
                    {
                        "id": f"{split}_{i}",
                        "language": language,
                        "audio": str(audio),
                        "num_samples": n,
                        "sampling_rate": SR,
                        "raw_transcription": text,
                        "transcription": text,
                        "target": text,
                        "llm_response": f"you said {text}",
                    }
                )
            )
        paths[split] = root / f"{split}.jsonl"
        paths[split].write_text("\n".join(lines) + "\n")
    paths["language_ids"] = root / "language_ids.json"
    paths["language_ids"].write_text(json.dumps({"English": 1, "German": 2}))
    return paths


def run_settings(tiny_models: dict[str, Path], stage: dict, wandb_mode: str = "disabled") -> dict:
    """The `--settings` JSON that rules/common.smk builds, for the tiny models."""
    models = {
        "llm": {
            "name_or_path": str(tiny_models["llm"]),
            "revision": "main",
            "dtype": "float32",
            "load_in_8bit": False,
            "gradient_checkpointing": False,
        },
        "speech_encoder": {
            "name_or_path": str(tiny_models["encoder"]),
            "revision": "main",
            "normalize_waveform": True,
        },
        "adaptor": ADAPTOR,
        "prompt": {"prefix": "Repeat the sentence: ", "postfix": ". "},
    }
    return {
        "experiment": "tests",
        "seed": 0,
        "models": models,
        "adaptor": ADAPTOR,
        "sampling_rate": SR,
        "wandb": {"project": "speechllm-tests", "mode": wandb_mode},
        "stage": stage,
    }


def train_command(stage_name: str, settings: dict, corpus: dict[str, Path], run_dir: Path) -> list[str]:
    return [
        "-m",
        "speechllm.cli",
        "train",
        stage_name,
        "--settings",
        json.dumps(settings),
        "--train",
        str(corpus["train"]),
        "--dev",
        str(corpus["dev"]),
        "--language-ids",
        str(corpus["language_ids"]),
        "--out-dir",
        str(run_dir / "model"),
        "--log-dir",
        str(run_dir / "train"),
        "--run-name",
        f"tests-{stage_name}",
        "--threads",
        "1",
    ]


def subprocess_env(**extra: str) -> dict[str, str]:
    # W&B is not under test here, and the two side-by-side runs would share one deterministic W&B run id;
    # `make` exports WANDB_MODE=offline, so this must override, not default.
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        **extra,
    }


def start(args: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen:
    with log_file.open("w") as fh:
        return subprocess.Popen([sys.executable, *args], stdout=fh, stderr=subprocess.STDOUT, env=env)


def wait(proc: subprocess.Popen, log_file: Path, timeout: float = 240) -> None:
    assert proc.wait(timeout=timeout) == 0, log_file.read_text()[-4000:]


def checkpoint_steps(run_dir: Path) -> list[int]:
    return CheckpointManager(run_dir / "train" / "checkpoints", keep=1).steps()


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "train" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for(ready: Callable[[], Any], proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll until `ready()` holds (or `proc` ended, or time is up): the moment to interrupt a run."""
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def assert_same_end(straight: Path, resumed: Path, final_step: int, summary_keys: tuple[str, ...]) -> None:
    """An interrupted and resumed run ended as the uninterrupted one: bit-identical final checkpoint and
    exported weights, and the same summary values under `summary_keys`."""
    for name in (f"train/checkpoints/step_{final_step:08d}/model.safetensors", "model/model.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    summary_a = json.loads((straight / "train/summary.json").read_text())
    summary_b = json.loads((resumed / "train/summary.json").read_text())
    assert summary_a["final_step"] == final_step
    for key in summary_keys:
        assert summary_a[key] == summary_b[key], key


# ------------------------------------------------------------------------------------------ the SIGKILL test

SAME_SUMMARY = (
    "history",
    "final_weights_sha256_per_process",
    "data_sha256_per_process",
    "batches_per_process",
)


def test_sigkill_and_resume_gives_the_same_weights(tiny_models, tmp_path):
    """Also: the newest checkpoint damaged after the kill is skipped, the one before resumed from."""
    corpus = write_corpus(tmp_path / "data")
    settings = run_settings(tiny_models, CTC_STAGE)
    env = subprocess_env()
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # The uninterrupted run and the run to be killed go side by side (2 cores).
    reference = start(train_command("ctc", settings, corpus, straight), env, tmp_path / "straight.log")
    victim = start(train_command("ctc", settings, corpus, killed), env, tmp_path / "killed.log")
    wait_for(lambda: len(checkpoint_steps(killed)) >= 2, victim)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-4000:]
    stopped_at = checkpoint_steps(killed)
    final_step = CTC_STAGE["max_epochs"] * CTC_STAGE["num_iters_per_epoch"] // CTC_STAGE["accum_grad"]
    assert len(stopped_at) == 2 and stopped_at[-1] < final_step, "the run was not killed midway"
    assert not (killed / "model").exists()
    # Silent damage to the newest checkpoint (zeros inside its tensor data; the file still loads): the resumed
    # run sets it aside and continues from the one before, ending with the same weights all the same.
    checkpoints = killed / "train" / "checkpoints"
    damaged = checkpoints / f"step_{stopped_at[-1]:08d}"
    weights_file = damaged / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    start_of_data = 8 + int.from_bytes(data[:8], "little")
    length = min(65536, (len(data) - start_of_data) // 2)
    data[start_of_data + length // 2 : start_of_data + length // 2 + length] = bytes(length)
    weights_file.write_bytes(bytes(data))
    assert load_file(str(weights_file))

    resumed = start(train_command("ctc", settings, corpus, killed), env, tmp_path / "resumed.log")
    wait(reference, tmp_path / "straight.log")
    wait(resumed, tmp_path / "resumed.log")
    resumed_log = (tmp_path / "resumed.log").read_text()
    assert f"skipping damaged checkpoint {damaged}" in resumed_log
    assert f"resuming from {checkpoints / f'step_{stopped_at[-2]:08d}'}" in resumed_log

    # Final weights (the last checkpoint) and the exported, selected weights are bit-identical.
    assert_same_end(straight, killed, final_step, SAME_SUMMARY)
    # The metrics written before the kill were kept, those after the checkpoint rewritten: same rows.
    rows_a = (straight / "train/metrics.jsonl").read_text().splitlines()
    rows_b = (killed / "train/metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(r).items() if not k.endswith("_per_second")} for r in rows_a]
    assert strip == [
        {k: v for k, v in json.loads(r).items() if not k.endswith("_per_second")} for r in rows_b
    ]
    assert len(checkpoint_steps(killed)) == CTC_STAGE["keep_checkpoints"]


# ------------------------------------------------------------------------------------------ the SIGTERM test

# Periodic checkpoints only at epoch ends (every 5 updates): the one written on SIGTERM is told apart.
SIGTERM_STAGE = {**CTC_STAGE, "checkpoint_every": 1000, "keep_checkpoints": 5}


def test_sigterm_checkpoints_the_current_update_and_the_retry_ends_identical(tiny_models, tmp_path):
    """Slurm's warning before the time limit (sbatch --signal=TERM@...) or the limit itself: the job finishes
    its update, checkpoints exactly there, exits 75 (a retry), and the retry ends with an uninterrupted run's
    weights."""
    import psutil

    corpus = write_corpus(tmp_path / "data")
    settings = run_settings(tiny_models, SIGTERM_STAGE)
    # The stopped run logs to W&B offline: its service process gets the signal too (Slurm signals every
    # process of the job step) and must not turn the stop into a crash.
    env, tracked = subprocess_env(), subprocess_env(WANDB_MODE="offline")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    reference = start(train_command("ctc", settings, corpus, straight), env, tmp_path / "straight.log")
    victim = start(train_command("ctc", settings, corpus, stopped), tracked, tmp_path / "stopped.log")
    wait_for(lambda: logged_steps(stopped), victim)
    for process in [psutil.Process(victim.pid), *psutil.Process(victim.pid).children(recursive=True)]:
        process.send_signal(signal.SIGTERM)
    assert victim.wait(timeout=120) == 75, (tmp_path / "stopped.log").read_text()[-4000:]
    log = (tmp_path / "stopped.log").read_text()
    stop_step = int(re.search(r"stopping after update (\d+)", log).group(1))
    final_step = CTC_STAGE["max_epochs"] * CTC_STAGE["num_iters_per_epoch"] // CTC_STAGE["accum_grad"]
    assert 0 < stop_step < final_step and stop_step % 5 != 0, f"stopped at {stop_step}, not mid-epoch"
    assert checkpoint_steps(stopped)[-1] == stop_step  # written on the signal, not by the schedule
    assert logged_steps(stopped)[-1] == stop_step and not (stopped / "model").exists()

    resumed = start(train_command("ctc", settings, corpus, stopped), tracked, tmp_path / "resumed.log")
    wait(reference, tmp_path / "straight.log")
    wait(resumed, tmp_path / "resumed.log")
    checkpoint = stopped / "train" / "checkpoints" / f"step_{stop_step:08d}"
    assert f"resuming from {checkpoint}" in (tmp_path / "resumed.log").read_text()
    assert_same_end(straight, stopped, final_step, SAME_SUMMARY)


# ------------------------------------------------------------------------------------------ checkpoint files


def test_rng_states_round_trip_through_weights_only_files(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (
        random.random(),
        np.random.rand(),
        torch.rand(3),
        torch.nn.functional.dropout(torch.ones(8), 0.5),
    )
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (
        random.random(),
        np.random.rand(),
        torch.rand(3),
        torch.nn.functional.dropout(torch.ones(8), 0.5),
    )
    assert (
        expected[:2] == again[:2]
        and torch.equal(expected[2], again[2])
        and torch.equal(expected[3], again[3])
    )


def _save(manager: CheckpointManager, step: int, kept: list[KeptState] | None = None) -> None:
    weights = {"w": torch.full((2,), float(step))}
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    state = TrainerState(step=step, kept=kept or [], fingerprint="f")
    manager.save(
        state, weights, {"optimizer": optimizer.state_dict(), "scheduler": {"last_epoch": step}}, rank=0
    )


def test_checkpoints_are_atomic_pruned_and_reloadable(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    a = manager.save_kept(1, {"w": torch.zeros(2)})
    _save(manager, 1, [KeptState(0.5, 1, a)])
    b = manager.save_kept(2, {"w": torch.ones(2)})
    _save(manager, 2, [KeptState(0.4, 2, b)])
    _save(manager, 3, [KeptState(0.4, 2, b)])
    # Only the newest two remain; kept weights nobody references any more are gone.
    assert manager.steps() == [2, 3]
    assert sorted(p.name for p in manager.kept_dir.iterdir()) == [
        b,
        f"{b}.sha256",
    ]  # the weights and their digest
    # A write interrupted by a kill leaves a temporary directory, never a step directory; it is cleaned.
    (tmp_path / ".tmp-step_00000004").mkdir()
    (tmp_path / ".tmp-step_00000004" / "model.safetensors").write_bytes(b"partial")
    assert manager.latest() == manager.path(3)
    manager.clean_partial()
    assert not (tmp_path / ".tmp-step_00000004").exists()
    state, weights, trainer, rng = CheckpointManager.load(manager.latest(), rank=0)
    assert (
        state.step == 3
        and state.kept == [KeptState(0.4, 2, b)]
        and torch.equal(weights["w"], torch.full((2,), 3.0))
    )
    assert trainer["scheduler"]["last_epoch"] == 3 and "state" in trainer["optimizer"] and "torch" in rng
    with pytest.raises(Exception, match="RNG state for process 1"):
        CheckpointManager.load(manager.latest(), rank=1)


# ----------------------------------------------------------------------------------------- recipe bookkeeping


def test_selection_values_and_averaging():
    assert selection_value({"dev_acc": 0.8}, "dev_acc") == -0.8
    assert selection_value({"dev_cer": None}, "dev_cer") == float("inf")
    avg = average_states(
        [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}, {"w": torch.tensor([2.0, 1.0])}]
    )
    assert torch.allclose(avg["w"], torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="dev_cer is only measured"):
        StageConfig.from_config("ce", {**CTC_STAGE, "best_metric": "dev_cer"})
    assert StageConfig.from_config("ctc", CTC_STAGE).batch_budget == "global"  # ESPnet's semantics
    with pytest.raises(ValueError, match="batch_budget must be one of"):
        StageConfig.from_config("ctc", {**CTC_STAGE, "batch_budget": "per_gpu"})


def test_k_best_bookkeeping_and_patience_follow_espnet():
    # CE: dev accuracy per evaluation (steps 1..6); the 3 best are kept, ties keep the earlier evaluation.
    accuracies = [0.50, 0.70, 0.60, 0.70, 0.80, 0.40]
    kept = []
    for step, acc in enumerate(accuracies, start=1):
        kept = rank_kept(kept, selection_value({"dev_acc": acc}, "dev_acc"), step, keep_best=3)
    assert [k.step for k in kept] == [5, 2, 4]
    # Early stopping on the dev loss with patience 1: stop after more than 1 evaluation in a row without gain.
    best, since, stops = None, 0, []
    for loss in [5.0, 4.0, 4.5, 3.9, 4.0, 4.1, 3.0]:
        best, since = early_stopping_update(best, since, loss)
        stops.append(since > 1)
    assert stops == [False, False, False, False, False, True, False] and best == 3.0


def test_patience_set_on_a_resumed_run_counts_the_evaluations_before_the_resume():
    """`patience` does not enter the run fingerprint, so a run started without early stopping resumes with
    it. The evaluations before the resume count as in a run that had patience from the start: dev loss best
    at the first, then three evaluations without gain, then patience 2 is set: the run stops at once."""
    from types import SimpleNamespace

    from speechllm.train.loop import Trainer

    def evaluate(trainer, losses):
        for loss in losses:
            trainer.state.step += 1
            Trainer.after_evaluation(trainer, {"dev_loss": loss})

    def trainer(patience):
        stage = StageConfig.from_config("ctc", {**CTC_STAGE, "best_metric": "last", "patience": patience})
        return SimpleNamespace(stage=stage, state=TrainerState())

    straight, resumed = trainer(2), trainer(None)
    evaluate(straight, [3.0, 3.5, 3.2, 3.1])
    evaluate(resumed, [3.0, 3.5, 3.2, 3.1])
    resumed.stage = straight.stage  # resumed from its checkpoint with patience 2
    assert Trainer.stop_reason(straight) == "patience"
    assert (resumed.state.best_early_stop, resumed.state.evals_since_best) == (3.0, 3)
    assert Trainer.stop_reason(resumed) == "patience"


def test_fingerprint_ignores_run_length_but_not_the_recipe(tmp_path):
    import argparse

    from speechllm.train.commands import run_fingerprint

    corpus = write_corpus(tmp_path, num_train=2, num_dev=1)
    args = argparse.Namespace(stage="ctc", train=corpus["train"], dev=corpus["dev"], init_from=None)
    base = {"seed": 0, "stage": CTC_STAGE, "wandb": {"project": "p", "mode": "offline"}}

    def fingerprint(**stage):
        return run_fingerprint({**base, "stage": {**CTC_STAGE, **stage}}, args)

    same = [
        fingerprint(max_epochs=10),
        fingerprint(patience=5, checkpoint_every=7),
        run_fingerprint({**base, "wandb": {"project": "q", "mode": "online"}}, args),
    ]
    assert set(same) == {fingerprint()}  # a longer run or other tracking resumes the same checkpoints
    assert fingerprint(lr=1e-3) != fingerprint() and fingerprint(accum_grad=1) != fingerprint()
    # linear decay's slope depends on the run length
    assert fingerprint(schedule="linear_decay", max_epochs=4) != fingerprint(schedule="linear_decay")
    before = fingerprint()
    corpus["train"].write_text(corpus["train"].read_text().replace("cat", "dog"))
    assert fingerprint() != before  # other training data


def without_transcription(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "transcription"}


@pytest.mark.parametrize(
    ("split", "edit", "message"),
    [
        ("train", without_transcription, "{path}:2: missing field(s) transcription"),
        (
            "dev",
            lambda r: {**r, "language": "fr_fr"},
            "{path}:2: language 'fr_fr' (French) has no language-ID label",
        ),
    ],
)
def test_a_bad_manifest_line_is_refused_before_training(tiny_models, tmp_path, split, edit, message):
    """A training manifest missing `transcription` would train CTC on empty targets, and an utterance in a
    language the LID labels do not cover would get label 0, the LID-CTC blank: the job stops at once with the
    file and line, and writes no model."""
    corpus = write_corpus(tmp_path / "data", num_train=3, num_dev=2)
    lines = corpus[split].read_text().splitlines()
    corpus[split].write_text("\n".join([lines[0], json.dumps(edit(json.loads(lines[1]))), *lines[2:]]) + "\n")
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, *train_command("ctc", run_settings(tiny_models, CTC_STAGE), corpus, run)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=240,
    )
    assert done.returncode != 0
    assert message.format(path=corpus[split]) in done.stderr
    assert not (run / "model").exists()
