"""One accelerate training loop for the CTC stage and the CE stage (T / MI / TMI) of BLOOMZMMS."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from speechllm.data.batches import Batch, Collator, SpeechDataset
from speechllm.data.bucketing import DurationBucketSampler
from speechllm.evaluate.metrics import asr_scores
from speechllm.models.bloomzmms import BloomzMMS
from speechllm.train.schedule import warmup_lr
from speechllm.train.tracking import Tracker

PRECISIONS = {"fp32": "no", "tf32": "no", "bf16": "bf16"}


@dataclass
class StageConfig:
    objective: str                  # "ctc" | "ce"
    max_steps: int
    warmup_steps: int
    lr: float
    weight_decay: float
    grad_clip: float
    accum_grad: int
    batch_seconds: float
    num_buckets: int
    eval_every: int
    precision: str
    ctc_weight: float = 1.0
    interctc_weight: float = 0.0
    keep_best: int = 1

    @classmethod
    def from_config(cls, objective: str, cfg: dict[str, Any]) -> StageConfig:
        return cls(objective=objective, **cfg)


def make_accelerator(stage: StageConfig) -> Accelerator:
    if stage.precision == "tf32" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=PRECISIONS[stage.precision],
                       gradient_accumulation_steps=stage.accum_grad)


def stage_loss(model: BloomzMMS, batch: Batch, stage: StageConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective of one batch: weighted CTC + LID inter-CTC, or token-summed CE / B."""
    out = model.encode(batch.wav, batch.wav_lengths)
    if stage.objective == "ctc":
        ctc, lid = model.ctc_losses(out, batch.ctc_targets, batch.lid)
        loss = stage.ctc_weight * ctc + stage.interctc_weight * lid
        return loss, {"loss": loss.item(), "loss_ctc": ctc.item(), "loss_lid": lid.item()}
    segments = model.prompt_segments(batch.prefix, model.speech_segments(out), batch.postfix)
    res = model.llm(segments, batch.target)
    acc = (res.num_correct.float() / res.num_tokens.clamp(min=1)).item()
    return res.loss, {"loss": res.loss.item(), "acc": acc}


@torch.no_grad()
def evaluate_dev(model: BloomzMMS, loader: DataLoader, stage: StageConfig, tokenizer: Any,
                 device: torch.device) -> dict[str, float]:
    """CTC stage: greedy CTC CER/WER on dev. CE stage: teacher-forced token accuracy and loss on dev."""
    model.eval()
    refs, hyps, loss_sum, n_utts, correct, tokens = [], [], 0.0, 0, 0, 0
    for batch in loader:
        batch = batch.to(device)
        out = model.encode(batch.wav, batch.wav_lengths)
        if stage.objective == "ctc":
            hyps += tokenizer.batch_decode(model.ctc_decode(out), skip_special_tokens=True)
            refs += [r["transcription"] for r in batch.records]
        else:
            segments = model.prompt_segments(batch.prefix, model.speech_segments(out), batch.postfix)
            res = model.llm(segments, batch.target)
            loss_sum += res.loss.item() * len(batch.records)
            n_utts += len(batch.records)
            correct += int(res.num_correct)
            tokens += int(res.num_tokens)
    model.train()
    if stage.objective == "ctc":
        scores = asr_scores(refs, hyps)
        return {"dev_cer": scores["cer"], "dev_wer": scores["wer"]}
    return {"dev_acc": correct / max(tokens, 1), "dev_loss": loss_sum / max(n_utts, 1)}


def is_better(stage: StageConfig, metrics: dict[str, float], best: float | None) -> bool:
    value = metrics["dev_cer"] if stage.objective == "ctc" else -metrics["dev_acc"]
    return best is None or value < best


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Parameter average of checkpoints (ESPnet `average_nbest_models`)."""
    return {k: sum(s[k].float() for s in states) / len(states) for k in states[0]}


def train(model: BloomzMMS, tokenizer: Any, stage: StageConfig, train_set: SpeechDataset, dev_set: SpeechDataset,
          collator: Collator, tracker: Tracker, seed: int) -> dict[str, Any]:
    """Train `model` in place; on return it holds the selected weights (best, or the k-best average)."""
    set_seed(seed)
    accelerator = make_accelerator(stage)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = warmup_lr(optimizer, stage.warmup_steps)
    sampler = DurationBucketSampler(train_set.durations(), stage.batch_seconds, stage.num_buckets, seed=seed,
                                    num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collator)
    dev_sampler = DurationBucketSampler(dev_set.durations(), stage.batch_seconds, stage.num_buckets, seed=seed,
                                        shuffle=False)
    dev_loader = DataLoader(dev_set, batch_sampler=dev_sampler, collate_fn=collator)
    model, optimizer = accelerator.prepare(model, optimizer)
    core: BloomzMMS = accelerator.unwrap_model(model)
    model.train()
    kept: list[tuple[float, int, dict[str, torch.Tensor]]] = []
    best_value: float | None = None
    step, epoch, history = 0, 0, []
    progress = tqdm(total=stage.max_steps, desc=f"{stage.objective} training", mininterval=10,
                    disable=not accelerator.is_main_process)
    initial = evaluate_dev(core, dev_loader, stage, tokenizer, accelerator.device)
    tracker.log(initial, step=0)
    window_audio, window_start = 0.0, time.perf_counter()
    while step < stage.max_steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            batch = batch.to(accelerator.device)
            with accelerator.accumulate(model):
                loss, logs = stage_loss(core, batch, stage)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, stage.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window_audio += float(batch.wav_lengths.sum()) / train_set.sampling_rate
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            elapsed = time.perf_counter() - window_start
            row = {**logs, "lr": scheduler.get_last_lr()[0], "epoch": epoch,
                   "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                   "audio_seconds_per_second": window_audio / max(elapsed, 1e-9)}
            window_audio, window_start = 0.0, time.perf_counter()
            if step % stage.eval_every == 0 or step == stage.max_steps:
                dev = evaluate_dev(core, dev_loader, stage, tokenizer, accelerator.device)
                row.update(dev)
                history.append({"step": step, **dev})
                value = dev["dev_cer"] if stage.objective == "ctc" else -dev["dev_acc"]
                if stage.objective == "ctc" and is_better(stage, dev, best_value):
                    best_value = value
                    kept = [(value, step, core.trainable_state_dict())]
                elif stage.objective == "ce":
                    kept.append((value, step, core.trainable_state_dict()))
                    kept = sorted(kept, key=lambda x: (x[0], -x[1]))[: stage.keep_best]
            tracker.log(row, step=step)
            if step >= stage.max_steps:
                break
        epoch += 1
    progress.close()
    selected = average_states([s for _, _, s in kept]) if len(kept) > 1 else kept[0][2]
    core.load_state_dict(selected, strict=False)
    summary = {"initial_dev": initial, "selected_steps": [s for _, s, _ in kept], "history": history,
               "final_step": step, "epochs": epoch}
    tracker.summary({"selected_steps": json.dumps(summary["selected_steps"])})
    return summary


def write_json(path: Path, data: dict[str, Any]) -> None:
    from speechllm.io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
