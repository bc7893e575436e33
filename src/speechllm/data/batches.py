"""Manifest records → padded batches (waveforms, token targets, language ids, prompt pieces)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from speechllm.audio import load_audio, speed_perturb
from speechllm.data.languages import lid_label
from speechllm.data.manifest import duration_seconds, location


class SpeechDataset(Dataset):
    """Loads each record's audio (speed-perturbed when the record says so) at `sampling_rate`."""

    def __init__(self, records: list[dict[str, Any]], sampling_rate: int, manifest: str = "") -> None:
        self.records = records
        self.sampling_rate = sampling_rate
        # Names the set in errors about it as a whole (an empty set has no record to name it).
        self.manifest = manifest

    def __len__(self) -> int:
        return len(self.records)

    def durations(self) -> list[float]:
        return [duration_seconds(r) for r in self.records]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        wav = load_audio(record["audio"], self.sampling_rate, line=location(record))
        wav = speed_perturb(wav, record.get("speed", 1.0), self.sampling_rate)
        return {"record": record, "wav": torch.from_numpy(wav)}


@dataclass
class Batch:
    wav: torch.Tensor  # (B, N) float32, right-padded with zeros
    wav_lengths: torch.Tensor  # (B,) long
    records: list[dict[str, Any]]
    ctc_targets: list[list[int]] = field(default_factory=list)  # LLM token ids of the normalised transcript
    lid: torch.Tensor | None = None  # (B,) long, 1..num_languages
    prefix: list[list[int]] = field(default_factory=list)  # CE prompt pieces and targets (token ids)
    postfix: list[list[int]] = field(default_factory=list)
    target: list[list[int]] = field(default_factory=list)

    def to(self, device: torch.device) -> Batch:
        self.wav = self.wav.to(device)
        self.wav_lengths = self.wav_lengths.to(device)
        if self.lid is not None:
            self.lid = self.lid.to(device)
        return self


def pad_waveforms(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) float32 waveforms right-padded with zeros, and their (B,) long lengths."""
    lengths = torch.tensor([w.shape[0] for w in waves], dtype=torch.long)
    wav = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        wav[i, : w.shape[0]] = w
    return wav, lengths


class Collator:
    """Pads waveforms and tokenises text fields with the LLM tokenizer (no special tokens, as BLOOM)."""

    def __init__(
        self,
        tokenizer: Any,
        language_ids: dict[str, int] | None = None,
        default_prefix: str = "",
        default_postfix: str = "",
    ) -> None:
        self.tokenizer = tokenizer
        self.language_ids = language_ids or {}
        self.default_prefix = default_prefix
        self.default_postfix = default_postfix

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        wav, lengths = pad_waveforms([item["wav"] for item in items])
        records = [item["record"] for item in items]
        batch = Batch(wav=wav, wav_lengths=lengths, records=records)
        batch.ctc_targets = [self.ids(r.get("transcription", "")) for r in records]
        if self.language_ids:  # an unknown language is an error, never label 0 (the LID-CTC blank)
            batch.lid = torch.tensor(
                [
                    lid_label(r["language"], self.language_ids, location(r) or f"record {r.get('id')}")
                    for r in records
                ]
            )
        batch.prefix = [self.ids(r.get("prefix", self.default_prefix)) for r in records]
        batch.postfix = [self.ids(r.get("postfix", self.default_postfix)) for r in records]
        batch.target = [self.ids(r.get("target", r.get("transcription", ""))) for r in records]
        return batch
