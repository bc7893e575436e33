"""Decoding helpers: padded clips, CTC transcripts (greedy or prefix beam search), and the post-processing of
LLM outputs generated from [E(prefix); speech; E(postfix)].

LLM generation is batched with left padding (`SpeechLLM.generate`: beam 5 and 192 new tokens at paper scale)
and post-processed as the reference's tokenizer overlay: `batch_decode(skip_special_tokens=True)`, newlines to
spaces, stripped. The reference also cut the first (dummy input id) and last token of each output; the last is
eos when the beam finished, and we cut at eos instead, so a beam that ran out of budget keeps its final real
token unless config evaluate.unfinished_hypotheses is `drop_last_token` (the benchmarks' `EvalSystem`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from speechllm.audio import check_min_length, load_audio
from speechllm.evaluate.ctc_search import CTCSearch, ctc_decode
from speechllm.models.bloomzmms import BloomzMMS


def postprocess(text: str) -> str:
    """As the reference tokenizer overlay: special tokens already dropped, newlines to spaces, stripped."""
    return text.replace("\n", " ").strip()


def load_wavs(
    paths: Sequence[str],
    sampling_rate: int,
    lines: Sequence[int | str | None],
    device: torch.device,
    min_samples: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (B, N) waveforms and (B,) lengths; `lines` locate each file for errors (`manifest.location`).

    A clip shorter than `min_samples` (the model's shortest input) is an AudioError naming it.
    """
    wavs = []
    for path, line in zip(paths, lines, strict=True):
        wav = load_audio(path, sampling_rate, line=line)
        check_min_length(wav.shape[0], min_samples, sampling_rate, path, line)
        wavs.append(torch.from_numpy(wav))
    lengths = torch.tensor([w.shape[0] for w in wavs])
    batch = torch.zeros(len(wavs), int(lengths.max()))
    for i, w in enumerate(wavs):
        batch[i, : w.shape[0]] = w
    return batch.to(device), lengths.to(device)


@torch.no_grad()
def encode_speech(
    model: BloomzMMS,
    paths: Sequence[str],
    sampling_rate: int,
    lines: Sequence[int | str | None],
    device: torch.device,
) -> tuple[list[torch.Tensor], Any]:
    """Speech vectors per clip [(T2_i, H)] and the raw adaptor output."""
    wav, lengths = load_wavs(paths, sampling_rate, lines, device, model.min_input_samples())
    out = model.encode(wav, lengths)
    return model.speech_segments(out), out


@torch.no_grad()
def ctc_transcribe(
    model: BloomzMMS,
    tokenizer: Any,
    paths: Sequence[str],
    sampling_rate: int,
    lines: Sequence[int | str | None],
    device: torch.device,
    search: CTCSearch | None = None,
) -> list[str]:
    """CTC transcripts (greedy unless `search` says prefix_beam)."""
    _, out = encode_speech(model, paths, sampling_rate, lines, device)
    if search is None or search.search == "greedy":
        ids = model.ctc_decode(out)
    else:
        ids = ctc_decode(model.ctc_head(out.speech), out.speech_lengths, model.ctc_blank_id, search)
    return [postprocess(t) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
