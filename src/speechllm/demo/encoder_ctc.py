"""Character-CTC fine-tuning of the demo speech encoder, as MMS-1B-all is MMS-1B fine-tuned with CTC.

BLOOMZMMS freezes MMS-1B-**all** (spec bloomzmms.md §2.1), a model whose top layers already carry phonetic,
text-aligned information. A randomly initialised tiny Wav2Vec2 carries none, and the adaptor's CTC stage then
stalls on the frequent-token plateau. This step gives the demo encoder the same kind of training on the demo's
own training speech: `Wav2Vec2ForCTC` over the characters of the normalised transcripts (blank = pad, word
delimiter "|"), saved with its `Wav2Vec2CTCTokenizer` so the directory looks like `facebook/mms-1b-all`:
`Wav2Vec2Model.from_pretrained` takes the encoder, `Wav2Vec2ForCTC` + the processor make a character ASR
model.

Demo scale only: the training waveforms are held in memory (the demo's 1.7 h are ~0.4 GB).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import torch
from tqdm import tqdm
from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2ForCTC

from speechllm.data.batches import SpeechDataset, pad_waveforms
from speechllm.data.bucketing import DurationBucketSampler, sorted_batches
from speechllm.data.manifest import ManifestError, read_manifest
from speechllm.models.frontend import (
    WAVEFORM_NORM_EPS,
    conv_frame_lengths,
    lengths_to_mask,
    normalize_waveform,
)
from speechllm.train.schedule import warmup_lr

log = logging.getLogger("speechllm")

BLANK, UNKNOWN, WORD_DELIMITER = "<pad>", "<unk>", "|"
TEXT_FIELD = "transcription"
DROPOUTS = ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout", "final_dropout")


@dataclass(frozen=True)
class CtcFinetuneConfig:
    """`models.demo_build.speech_encoder.ctc_finetune` (0 updates keeps the random initialisation)."""

    updates: int
    max_padded_seconds: float
    num_buckets: int
    lr: float
    warmup_steps: int
    grad_clip: float
    dropout: float
    log_every: int


@dataclass
class Utterances:
    """Normalised waveforms (N_i,) and character-id targets (C_i,) of one manifest, in memory."""

    waves: list[torch.Tensor]
    targets: list[torch.Tensor]
    texts: list[str]
    seconds: list[float]


def character_vocab(texts: list[str]) -> dict[str, int]:
    """Blank (id 0, HF's CTC pad), unknown, the word delimiter for spaces, then every character, sorted."""
    chars = sorted({c for text in texts for c in text} - {" "})
    return {token: i for i, token in enumerate([BLANK, UNKNOWN, WORD_DELIMITER, *chars])}


def write_tokenizer(vocab: dict[str, int], out_dir: Path) -> Wav2Vec2CTCTokenizer:
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "vocab.json"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    tokenizer = Wav2Vec2CTCTokenizer(
        str(vocab_file),
        unk_token=UNKNOWN,
        pad_token=BLANK,
        word_delimiter_token=WORD_DELIMITER,
        bos_token=None,
        eos_token=None,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def read_transcribed(manifest: Path) -> list[dict[str, Any]]:
    """Manifest records with audio and a non-empty transcript (an empty one names the file and line); an
    empty manifest is an error too (fine-tuning would wait forever for a first batch)."""
    records = read_manifest(manifest, required=("audio", TEXT_FIELD))
    if not records:
        raise ManifestError(f"{manifest}: no utterances to fine-tune or score the demo encoder on")
    for record in records:
        if not str(record[TEXT_FIELD]).strip():
            raise ManifestError(f"{manifest}:{record['_line']}: empty {TEXT_FIELD!r}")
    return records


def load_utterances(
    records: list[dict[str, Any]], manifest: Path, tokenizer: Wav2Vec2CTCTokenizer, sampling_rate: int
) -> Utterances:
    """Load, speed-perturb (as the record says) and normalise every utterance once, up front."""
    dataset = SpeechDataset(records, sampling_rate)
    waves, targets = [], []
    for i in range(len(dataset)):
        wav = dataset[i]["wav"].unsqueeze(0)
        mask = torch.ones_like(wav, dtype=torch.bool)
        waves.append(normalize_waveform(wav, mask, WAVEFORM_NORM_EPS).squeeze(0))
        targets.append(torch.tensor(tokenizer(records[i][TEXT_FIELD]).input_ids))
    return Utterances(
        waves, targets, [r[TEXT_FIELD] for r in records], [w.shape[0] / sampling_rate for w in waves]
    )


def pad_batch(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) zero-padded waveforms and their (B, N) long attention mask."""
    wav, lengths = pad_waveforms(waves)
    return wav, lengths_to_mask(lengths, wav.shape[1]).long()


def ctc_model(encoder_dir: Path, vocab_size: int, pad_token_id: int, dropout: float) -> Wav2Vec2ForCTC:
    """The saved (random) encoder under a fresh character CTC head, every dropout set to `dropout`.

    With no attention dropout, SDPA keeps its fused CPU kernel in training: about twice as fast per update.
    """
    config = Wav2Vec2Config.from_pretrained(encoder_dir)
    config.update(
        {
            "vocab_size": vocab_size,
            "pad_token_id": pad_token_id,
            "ctc_loss_reduction": "mean",
            "ctc_zero_infinity": True,
            **dict.fromkeys(DROPOUTS, dropout),
        }
    )
    return Wav2Vec2ForCTC.from_pretrained(encoder_dir, config=config)


@torch.no_grad()
def greedy_transcripts(
    model: Wav2Vec2ForCTC, tokenizer: Wav2Vec2CTCTokenizer, utterances: Utterances, max_padded_seconds: float
) -> list[str]:
    """Best-path CTC decoding in duration-sorted batches; the tokenizer merges repeats and drops blanks."""
    model.eval()
    texts = [""] * len(utterances.waves)
    for batch in sorted_batches(utterances.seconds, max_padded_seconds):
        wav, mask = pad_batch([utterances.waves[i] for i in batch])
        ids = model(wav, attention_mask=mask).logits.argmax(dim=-1)
        frames = conv_frame_lengths(model.config, mask.sum(dim=1))
        for i, row, n in zip(batch, ids, frames, strict=True):
            texts[i] = tokenizer.decode(row[: int(n)].tolist())
    return texts


def finetune(model: Wav2Vec2ForCTC, train: Utterances, cfg: CtcFinetuneConfig, seed: int) -> list[float]:
    """`cfg.updates` Adam updates on duration-bucketed batches (warm-up, inverse-sqrt decay); returns the
    losses."""
    torch.manual_seed(seed)
    sampler = DurationBucketSampler(train.seconds, cfg.max_padded_seconds, cfg.num_buckets, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    scheduler = warmup_lr(optimizer, cfg.warmup_steps)
    losses: list[float] = []
    model.train()
    progress = tqdm(total=cfg.updates, desc="encoder char-CTC", mininterval=10)
    epoch = 0
    while len(losses) < cfg.updates:
        sampler.set_epoch(epoch)
        for batch in sampler:
            wav, mask = pad_batch([train.waves[i] for i in batch])
            labels = torch.nn.utils.rnn.pad_sequence(
                [train.targets[i] for i in batch], batch_first=True, padding_value=-100
            )
            loss = model(wav, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.update()
            if len(losses) % cfg.log_every == 0:
                log.info(
                    "update %d: train CTC loss %.3f (mean of the last %d)",
                    len(losses),
                    float(np.mean(losses[-cfg.log_every :])),
                    cfg.log_every,
                )
            if len(losses) == cfg.updates:
                break
        epoch += 1
    progress.close()
    return losses


def finetune_encoder(
    encoder_dir: Path,
    train_manifest: Path,
    dev_manifest: Path,
    cfg: CtcFinetuneConfig,
    sampling_rate: int,
    seed: int,
) -> dict[str, Any]:
    """Fine-tune the encoder saved in `encoder_dir` with character CTC and save it there as `Wav2Vec2ForCTC`.

    Writes `vocab.json` + tokenizer files and `ctc_finetune.json` (losses and dev CER before and after).
    """
    train_records, dev_records = read_transcribed(train_manifest), read_transcribed(dev_manifest)
    tokenizer = write_tokenizer(character_vocab([r[TEXT_FIELD] for r in train_records]), encoder_dir)
    train = load_utterances(train_records, train_manifest, tokenizer, sampling_rate)
    dev = load_utterances(dev_records, dev_manifest, tokenizer, sampling_rate)
    model = ctc_model(encoder_dir, len(tokenizer), tokenizer.pad_token_id, cfg.dropout)
    before = jiwer.cer(dev.texts, greedy_transcripts(model, tokenizer, dev, cfg.max_padded_seconds))
    losses = finetune(model, train, cfg, seed)
    hypotheses = greedy_transcripts(model, tokenizer, dev, cfg.max_padded_seconds)
    after = jiwer.cer(dev.texts, hypotheses)
    model.save_pretrained(encoder_dir)
    window = max(1, len(losses) // 20)
    report = {
        "updates": cfg.updates,
        "train_utterances": len(train.waves),
        "train_hours": sum(train.seconds) / 3600,
        "characters": len(tokenizer),
        "first_loss": float(np.mean(losses[:window])),
        "final_loss": float(np.mean(losses[-window:])),
        "dev_cer_before": before,
        "dev_cer": after,
        "dev_examples": [
            {"reference": r, "hypothesis": h} for r, h in zip(dev.texts[:3], hypotheses[:3], strict=True)
        ],
    }
    (encoder_dir / "ctc_finetune.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
