"""The training loop's optimizer updates against the references' trainers.

An update whose gradient norm is not finite is skipped. Whether the learning-rate schedule still advances
differs between the references: ESPnet (v.202304 `espnet2/train/trainer.py` `train_one_epoch`) steps its
scheduler only after `optimizer.step()`; Kang & Roy (wonjune-kang/llm-speech-summarization@0a3d8e6:trainer.py)
call `lr_scheduler.step()` after `scaler.step()`, which skips the optimizer step on inf / nan gradients.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_distillation import _tiny_kang_roy, _train_kd
from test_train_resume import CTC_STAGE, write_corpus

from speechllm.train.loop import StageConfig, Trainer
from speechllm.train.tracking import Tracker


def non_finite_at(trainer: Trainer, updates: set[int]) -> None:
    """Make the gradient norm of the given (1-based) updates nan, as a diverged backward would."""
    real = trainer.accelerator.clip_grad_norm_
    calls = {"n": 0}

    def clip(parameters, max_norm):
        calls["n"] += 1
        norm = real(parameters, max_norm)
        return torch.tensor(math.nan) if calls["n"] in updates else norm

    trainer.accelerator.clip_grad_norm_ = clip  # type: ignore[method-assign]


def logged_lrs(log_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["lr"] for r in rows if "lr" in r]


def tracker_factory(log_dir: Path, job: str):
    def make(step, enabled):
        return Tracker(
            log_dir, {"project": "t", "mode": "disabled"}, "tests", job, job, {}, enabled, resume_step=step
        )

    return make


def ctc_trainer(tiny_spec: dict, tmp_path: Path, **stage: object) -> Trainer:
    """A CTC-stage trainer over the tiny model and 8 training utterances, updating at every micro-batch."""
    from speechllm.data.batches import Collator, SpeechDataset
    from speechllm.data.manifest import read_manifest
    from speechllm.models.export import build_model

    model, tokenizer = build_model(tiny_spec, with_ctc=True, with_llm=False)
    corpus = write_corpus(tmp_path / "data", num_train=8, num_dev=2)
    datasets = [SpeechDataset(read_manifest(corpus[s]), 16000) for s in ("train", "dev")]
    settings = {**CTC_STAGE, "accum_grad": 1, "best_metric": "last", "checkpoint_every": 100, **stage}
    collator = Collator(tokenizer, {"English": 1, "German": 2}, "Repeat the sentence: ", ". ")
    return Trainer(
        model,
        tokenizer,
        StageConfig.from_config("ctc", settings),
        *datasets,
        collator,
        tracker_factory(tmp_path / "log", "train_ctc"),
        0,
        tmp_path / "ckpt",
    )


def test_espnet_stages_do_not_advance_the_schedule_on_a_skipped_update(tiny_spec, tmp_path):
    """CTC stage, warm-up 4: update 2 is skipped, so update 3 uses update 2's rate (warm-up step 2 of 4), as
    ESPnet's WarmupLR, which counts only the updates that were made."""
    trainer = ctc_trainer(tiny_spec, tmp_path, max_epochs=None, max_steps=4)
    non_finite_at(trainer, {2})
    trainer.run()
    base = CTC_STAGE["lr"]
    warmup = [base * s / 4 for s in (1, 2, 3, 4)]  # ESPnet WarmupLR during its warm-up: base * s / W
    assert logged_lrs(tmp_path / "log") == pytest.approx([warmup[0], warmup[1], warmup[1], warmup[2]])
    assert trainer.scheduler.last_epoch == 3  # three updates made


def test_kang_roy_advances_the_schedule_on_a_skipped_update(tmp_path):
    """KD, linear decay over 3 updates: update 1 is skipped and the schedule still moves on, as the
    reference's `lr_scheduler.step()` after a GradScaler-skipped step."""
    model, tokenizer, datasets = _tiny_kang_roy(tmp_path)
    real_run = Trainer.run

    def run_with_a_nan_first_update(self):
        non_finite_at(self, {1})
        return real_run(self)

    Trainer.run = run_with_a_nan_first_update  # type: ignore[method-assign]
    try:
        _train_kd(tmp_path, model, tokenizer, datasets)
    finally:
        Trainer.run = real_run  # type: ignore[method-assign]
    assert logged_lrs(tmp_path / "log") == pytest.approx([1e-3, 2e-3 / 3, 1e-3 / 3])


def test_espnet_stages_stop_after_an_epoch_whose_updates_were_all_skipped(tiny_spec, tmp_path):
    """ESPnet stops training after an epoch in which no update was made (`all_steps_are_invalid`), after
    that epoch's evaluation and checkpoint. Epochs of 4 updates: epoch 1 makes one update, epoch 2 none."""
    from speechllm.train.checkpoint import CheckpointManager

    trainer = ctc_trainer(tiny_spec, tmp_path, num_iters_per_epoch=4, max_epochs=3)
    non_finite_at(trainer, {1, 2, 3, 5, 6, 7, 8})
    summary = trainer.run().summary
    assert (summary["stopped"], summary["final_step"], summary["epochs"]) == ("all_updates_invalid", 8, 2)
    assert [h["step"] for h in summary["history"]] == [4, 8]  # the last epoch was still evaluated
    saved = CheckpointManager.load_state(CheckpointManager(tmp_path / "ckpt", 1).latest())
    assert saved.step == 8 and saved.invalid_epoch  # a rerun resumes into the same stop
