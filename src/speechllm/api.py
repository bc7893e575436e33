"""Use a trained model from Python: `speechllm.load(path_or_hub_id)` returns a `SpeechModel`.

    >>> import speechllm
    >>> model = speechllm.load("results/models/tmi")                  # or a hub id, e.g. "me/bloomzmms-tmi"
    >>> model.transcribe(["a.wav", "b.flac"], batch_size=8)           # ["...", "..."]
    >>> model.ask("Repeat the sentence: {audio:a.wav}. ")             # "..."
    >>> model.ask(["Translate the following text from German to English\\n", (samples, 44100), "\\n"])

A model directory is what the pipeline exports (`speechllm.json` + `model.safetensors`; frozen parts loaded
with `from_pretrained`) or what `speechllm push` uploads. Audio may be a file path, a numpy array or torch
tensor (mono, or 2-D with channels on the shorter axis), an `(array, sampling_rate)` pair, a Hugging Face
datasets audio value (`{"array": ..., "sampling_rate": ...}` or a torchcodec `AudioDecoder`) or an `Audio`;
any rate and channel count is mixed down and resampled to the rate the speech encoder expects. Inputs are
encoded and decoded in padded batches: waveforms right-padded with their lengths (the encoders mask the
padding), LLM prompts left-padded with an attention mask and position ids (`SpeechLLM.build_inputs`), so a
clip's text does not depend on its batch.
Longer prose: the project's docs (Python API).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speechllm.audio import AudioError, array_to_mono, check_min_length, load_audio
from speechllm.cliutils import pick_device
from speechllm.data.batches import pad_waveforms
from speechllm.evaluate.decode import postprocess
from speechllm.infer import (
    ASK_MAX_NEW_TOKENS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_BEAMS,
    SAMPLING_RATE,
    TRANSCRIBE_BEAMS,
    TRANSCRIBE_MAX_NEW_TOKENS,
    AudioPart,
    PromptError,
    check_askable,
    parse_prompt,
    text_token_ids,
)
from speechllm.models.export import DTYPES, ModelDirError, load_model_dir, read_spec
from speechllm.models.speech_llm import Segment

DECODERS = ("auto", "ctc", "llm")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class Audio:
    """One audio input: a file path, or samples with their sampling rate.

    Attributes:
        source: a path, or samples (numpy array or torch tensor; (N,), (N, C) or (C, N)).
        sampling_rate: rate of `source` samples (None: the model's rate); ignored for files (read from them).
        name: what error messages call it (default: the path, or "audio #i").
    """

    source: str | os.PathLike[str] | np.ndarray | torch.Tensor
    sampling_rate: int | None = None
    name: str | None = None


AudioInput = str | os.PathLike[str] | np.ndarray | torch.Tensor | tuple[Any, int] | Mapping[str, Any] | Audio


def is_audio_input(item: Any) -> bool:
    """True for what `as_audio` accepts as one clip (in a prompt's part list a plain string is text)."""
    if isinstance(item, Audio | AudioPart | os.PathLike | np.ndarray | torch.Tensor):
        return True
    if isinstance(item, Mapping):
        return "array" in item
    if hasattr(item, "get_all_samples"):
        return True
    return (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], np.ndarray | torch.Tensor)
        and isinstance(item[1], int)
    )


def as_audio(item: Any, sampling_rate: int | None = None, name: str | None = None) -> Audio:
    """One clip in any accepted form as an `Audio` (samples without a rate get `sampling_rate`)."""
    if isinstance(item, Audio):
        return item if name is None or item.name else Audio(item.source, item.sampling_rate, name)
    if isinstance(item, AudioPart):
        return Audio(item.path, name=name)
    if isinstance(item, str | os.PathLike):
        return Audio(os.fspath(item), name=name)
    if isinstance(item, Mapping):  # a Hugging Face datasets Audio feature value
        if "array" not in item or "sampling_rate" not in item:
            raise AudioError(
                f"{name or 'audio'}: an audio dict needs 'array' and 'sampling_rate' keys, got {sorted(item)}"
            )
        return Audio(np.asarray(item["array"]), int(item["sampling_rate"]), name or item.get("path"))
    if hasattr(item, "get_all_samples"):  # a torchcodec AudioDecoder (what `datasets` audio columns hold)
        samples = item.get_all_samples()
        return Audio(samples.data, int(samples.sample_rate), name)
    if isinstance(item, tuple) and len(item) == 2:
        return Audio(item[0], int(item[1]), name)
    if isinstance(item, np.ndarray | torch.Tensor):
        return Audio(item, sampling_rate, name)
    raise AudioError(
        f"{name or 'audio'}: expected a path, an array or tensor, (array, sampling_rate) or an "
        f"audio dict, got {type(item).__name__}"
    )


def read_waveform(audio: Audio, sampling_rate: int, where: str) -> torch.Tensor:
    """(N,) float32 mono waveform at `sampling_rate`; AudioError names the clip."""
    if isinstance(audio.source, str | os.PathLike):
        return torch.from_numpy(load_audio(audio.source, sampling_rate))
    samples = audio.source
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().float().numpy()
    rate = audio.sampling_rate or sampling_rate
    return torch.from_numpy(array_to_mono(np.asarray(samples), rate, sampling_rate, where))


def smallest_passing(test: Callable[[int], bool]) -> int:
    """The smallest n >= 1 with `test(n)` true, for a `test` monotone in n."""
    low, high = 1, 1
    while not test(high):
        low, high = high + 1, high * 2
    while low < high:
        middle = (low + high) // 2
        if test(middle):
            high = middle
        else:
            low = middle + 1
    return high


def resolve_model_dir(
    path_or_hub_id: str | os.PathLike[str],
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local model directory as it is, or a hub repository's files (fetched into the Hugging Face cache).

    Hub ids go through `huggingface_hub.snapshot_download`, so `HF_HUB_OFFLINE=1` / `local_files_only` use the
    cached copy and `HF_HUB_CACHE` / `cache_dir` say where the cache is.
    """
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelDirError(f"{path}: not a model directory")
    repo_id = os.fspath(path_or_hub_id)
    if not HUB_ID.fullmatch(repo_id):
        raise ModelDirError(f"{repo_id}: no such model directory, and not a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
            )
        )
    except Exception as err:  # not found, no access, offline without a cached copy: one line that says which
        raise ModelDirError(
            f"{repo_id}: no such local model directory, and getting it from the hub failed: "
            f"{type(err).__name__}: {' '.join(str(err).split())}"
        ) from err


class SpeechModel:
    """A loaded speechllm model: BLOOMZMMS (CTC or CE stage) or Kang & Roy.

    Build it with `speechllm.load(...)` or `SpeechModel.from_pretrained(...)`. Methods take one input or a
    list; one input gives one string, a list gives a list of strings in the same order.

    Attributes:
        model: the torch module (`BloomzMMS` or `KangRoy`), in eval mode.
        tokenizer: the LLM's tokenizer.
        spec: the model directory's `speechllm.json`.
        model_dir: where the model's files are (the hub cache's snapshot for a hub id).
        decoder: "ctc" (the CTC head transcribes) or "llm" (the LLM answers).
        device: where the model runs.
        sampling_rate: the rate the speech encoder expects; all audio is resampled to it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        spec: dict[str, Any],
        model_dir: Path,
        decoder: str,
        device: torch.device,
        sampling_rate: int = SAMPLING_RATE,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.model_dir = Path(model_dir)
        self.decoder = decoder
        self.device = device
        self.sampling_rate = sampling_rate
        self._min_samples: int | None = None

    def __repr__(self) -> str:
        return (
            f"SpeechModel({str(self.model_dir)!r}, kind={self.kind!r}, stage={self.spec.get('stage')!r}, "
            f"decoder={self.decoder!r}, device={str(self.device)!r})"
        )

    @property
    def kind(self) -> str:
        """The model kind: "bloomzmms" or "kang_roy"."""
        return self.spec.get("kind", "bloomzmms")

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        decoder: str = "auto",
        sampling_rate: int = SAMPLING_RATE,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> SpeechModel:
        """Load a model directory, or a hub repository made by `speechllm push`.

        Args:
            path_or_hub_id: a local model directory, or a hub id ("owner/name", fetched with
                `huggingface_hub.snapshot_download`; `HF_HUB_OFFLINE=1` uses the cache only).
            device: "cpu", "cuda", "cuda:1", ... (None: a GPU when there is one).
            dtype: "float32", "bfloat16", "float16" or a torch dtype for the whole model (None: the LLM in the
                dtype its `speechllm.json` names, the speech side in float32).
            decoder: "auto" (CTC for a CTC-stage model, else the LLM), "ctc" or "llm" (e.g. a CTC-stage model
                in front of its LLM, the `ce_init` system).
            sampling_rate: the rate the speech encoder expects.
            revision, cache_dir, local_files_only, token: passed to `snapshot_download` for hub ids.

        Example:
            >>> model = SpeechModel.from_pretrained("results/models/ctc", device="cpu")
            >>> model.transcribe("clip.wav")
        """
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        model_dir = resolve_model_dir(path_or_hub_id, revision, cache_dir, local_files_only, token)
        spec = read_spec(model_dir)
        kind = spec.get("kind", "bloomzmms")
        if decoder == "ctc" and kind != "bloomzmms":
            raise ModelDirError(
                f"{model_dir}: decoder 'ctc' needs a BLOOMZMMS model with a CTC head (kind {kind!r})"
            )
        use_ctc = decoder == "ctc" or (
            decoder == "auto" and kind == "bloomzmms" and spec.get("stage") == "ctc"
        )
        torch_device = torch.device(device) if device is not None else pick_device()
        dtype_name = dtype_key(dtype)
        model, tokenizer, spec = load_model_dir(
            model_dir, with_ctc=use_ctc, with_llm=not use_ctc, device=torch_device, dtype=dtype_name
        )
        return cls(
            model, tokenizer, spec, model_dir, "ctc" if use_ctc else "llm", torch_device, sampling_rate
        )

    # ------------------------------------------------------------------ audio

    def min_samples(self) -> int:
        """The shortest waveform (samples at `sampling_rate`) that gives at least one speech vector."""
        if self._min_samples is None:
            if self.kind == "kang_roy":
                encoder = self.model.encoder
                self._min_samples = smallest_passing(
                    lambda n: int(encoder.output_lengths(torch.tensor([n]))[0]) >= 1
                )
            else:
                frames = self.model.adaptor.min_input_frames()
                frontend = self.model.frontend
                self._min_samples = smallest_passing(
                    lambda n: int(frontend.output_lengths(torch.tensor([n]))[0]) >= frames
                )
        return self._min_samples

    def waveforms(self, clips: Sequence[Audio]) -> list[torch.Tensor]:
        """Each clip as a (N,) mono waveform at the model's rate; too short a clip is an error naming it."""
        waves = []
        for index, clip in enumerate(clips):
            where = clip.name or (
                os.fspath(clip.source) if isinstance(clip.source, str | os.PathLike) else f"audio #{index}"
            )
            wave = read_waveform(clip, self.sampling_rate, where)
            check_min_length(wave.shape[0], self.min_samples(), self.sampling_rate, where)
            waves.append(wave)
        return waves

    def _encoded_batches(
        self, waves: Sequence[torch.Tensor], batch_size: int
    ) -> Iterator[tuple[list[int], Any]]:
        """Longest first, `batch_size` clips per padded encoder pass: (clip indices, the encoder's output)."""
        check_batch_size(batch_size)
        order = sorted(range(len(waves)), key=lambda i: -waves[i].shape[0])
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            wav, lengths = pad_waveforms([waves[i] for i in chunk])
            with torch.no_grad():
                yield chunk, self.model.encode(wav.to(self.device), lengths.to(self.device))

    def speech_vectors(self, waves: Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
        """The LLM-space speech vectors (T_i, H) of each waveform, in input order."""
        out: list[torch.Tensor | None] = [None] * len(waves)
        for chunk, encoded in self._encoded_batches(waves, batch_size):
            segments = encoded if self.kind == "kang_roy" else self.model.speech_segments(encoded)
            for index, segment in zip(chunk, segments, strict=True):
                out[index] = segment
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ transcription

    def transcribe(
        self,
        audio: AudioInput | Sequence[AudioInput],
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        sampling_rate: int | None = None,
        num_beams: int = TRANSCRIBE_BEAMS,
        max_new_tokens: int = TRANSCRIBE_MAX_NEW_TOKENS,
    ) -> str | list[str]:
        """Transcribe one clip or a list of clips, `batch_size` at a time.

        A CTC-stage model transcribes with its CTC head (greedy); a CE-trained BLOOMZMMS model with its LLM
        and its training prompt (`speechllm.json` "prompt": prefix + speech + postfix), by beam search.

        Args:
            audio: a clip (path, array, tensor, (array, rate), audio dict or `Audio`) or a list of them.
            batch_size: clips per padded batch (1 = one at a time; the text is the same).
            sampling_rate: rate of bare arrays and tensors (None: the model's rate, 16 kHz).
            num_beams, max_new_tokens: LLM decoding (ignored by the CTC decoder).

        Returns:
            The text of one clip, or a list with one text per clip.

        Example:
            >>> model = speechllm.load("results/models/ctc")
            >>> model.transcribe(["a.wav", (samples_44k, 44100)], batch_size=16)
        """
        if self.kind == "kang_roy":
            raise ValueError(
                f"{self.model_dir} is a Kang & Roy model: it answers prompts rather than "
                "transcribing; use ask(...) or generate_audio_response(...)"
            )
        single = not isinstance(audio, list | tuple) or is_audio_input(audio)
        items = [audio] if single else list(audio)
        clips = [as_audio(item, sampling_rate) for item in items]
        texts = self._transcribe_clips(self.waveforms(clips), batch_size, num_beams, max_new_tokens)
        return texts[0] if single else texts

    def _transcribe_clips(
        self, waves: Sequence[torch.Tensor], batch_size: int, num_beams: int, max_new_tokens: int
    ) -> list[str]:
        texts: list[str] = [""] * len(waves)
        prompt = self.spec["prompt"]
        prefix, postfix = (
            text_token_ids(self.tokenizer, self.kind, prompt[key]) for key in ("prefix", "postfix")
        )
        for chunk, encoded in self._encoded_batches(waves, batch_size):
            if self.decoder == "ctc":
                with torch.no_grad():
                    ids = self.model.ctc_decode(encoded)
                decoded = [postprocess(t) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
            else:
                segments = [[prefix, speech, postfix] for speech in self.model.speech_segments(encoded)]
                ids = self.model.generate(segments, max_new_tokens=max_new_tokens, num_beams=num_beams)
                decoded = [postprocess(t) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
            for index, text in zip(chunk, decoded, strict=True):
                texts[index] = text
        return texts

    # ------------------------------------------------------------------ prompting

    def ask(
        self,
        prompt: str | Sequence[Any] | Sequence[str | Sequence[Any]],
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        audio: Mapping[str, AudioInput] | None = None,
        sampling_rate: int | None = None,
        num_beams: int | None = None,
        max_new_tokens: int = ASK_MAX_NEW_TOKENS,
        **generate_kwargs: Any,
    ) -> str | list[str]:
        """Prompt the LLM with text and speech mixed; one prompt or a list of prompts, `batch_size` at a time.

        A prompt is a string whose `{audio:NAME}` slots are audio files (or keys of `audio`), or a list of
        parts: strings are text, anything else (path objects, arrays, tensors, (array, rate), `Audio`) is
        audio.
        Each clip's speech vectors take its place in the prompt, the text around it its token embeddings. A
        Kang & Roy model gets the prompt as the user turn of its chat template.

        Args:
            prompt: one prompt, or a list of prompts (strings or part lists).
            batch_size: prompts per batch (left-padded with attention masks; 1 = one at a time, same text).
            audio: clips for `{audio:NAME}` slots by name (a slot whose name is not a key is a file path).
            sampling_rate: rate of bare arrays and tensors (None: the model's rate, 16 kHz).
            num_beams: beam size (None: 5 for BLOOMZMMS, 1 = greedy for Kang & Roy, as each reference).
            max_new_tokens: generation budget.
            generate_kwargs: more Hugging Face `generate` options (e.g. `repetition_penalty`).

        Returns:
            The answer (special tokens dropped, stripped), or a list with one answer per prompt.

        Example:
            >>> model = speechllm.load("results/models/tmi")
            >>> model.ask("Repeat the sentence: {audio:clip.wav}. ")
            >>> model.ask(["Translate the following text from German to English\\n{audio:de.wav}\\n",
            ...            "Repeat the sentence: {audio:clip}. "], audio={"clip": (samples, 8000)})
        """
        check_askable(self.spec, self.model_dir)
        if self.decoder != "llm":
            raise ValueError(
                f"{self.model_dir} was loaded with decoder 'ctc'; load it with decoder='llm' to ask"
            )
        single = isinstance(prompt, str) or (
            isinstance(prompt, list | tuple) and any(map(is_audio_input, prompt))
        )
        prompts = [prompt] if single else list(prompt)
        parts = [self.prompt_parts(p, audio or {}, sampling_rate) for p in prompts]
        answers = self._answer(parts, batch_size, num_beams, max_new_tokens, generate_kwargs)
        return answers[0] if single else answers

    def prompt_parts(
        self, prompt: str | Sequence[Any], audio: Mapping[str, AudioInput], sampling_rate: int | None
    ) -> list[str | Audio]:
        """A prompt as text strings and `Audio` clips, in order; it must hold at least one clip."""
        if isinstance(prompt, str):
            parts: list[str | Audio] = []
            for part in parse_prompt(prompt):
                if isinstance(part, AudioPart):
                    named = part.path in audio
                    parts.append(
                        as_audio(
                            audio[part.path] if named else part.path, sampling_rate, f"{{audio:{part.path}}}"
                        )
                    )
                else:
                    parts.append(part)
            return parts
        if not isinstance(prompt, list | tuple):
            raise PromptError(
                f"a prompt is a string or a list of text and audio parts, got {type(prompt).__name__}"
            )
        parts = [part if isinstance(part, str) else as_audio(part, sampling_rate) for part in prompt]
        if not any(isinstance(part, Audio) for part in parts):
            raise PromptError(
                "the prompt has no audio part (use generate_text_response for text-only prompts)"
            )
        return parts

    def _answer(
        self,
        prompts: Sequence[Sequence[str | Audio]],
        batch_size: int,
        num_beams: int | None,
        max_new_tokens: int,
        generate_kwargs: dict[str, Any],
    ) -> list[str]:
        """Answers to prompts of text and clips: clips read and checked first, then batches of prompts
        (longest audio first) encoded and decoded together."""
        check_batch_size(batch_size)
        clips = [part for prompt in prompts for part in prompt if isinstance(part, Audio)]
        waves = iter(self.waveforms(clips))
        prompt_waves = [
            [next(waves) if isinstance(part, Audio) else part for part in prompt] for prompt in prompts
        ]
        audio_length = [
            sum(p.shape[0] for p in prompt if isinstance(p, torch.Tensor)) for prompt in prompt_waves
        ]
        order = sorted(range(len(prompts)), key=lambda i: -audio_length[i])
        answers: list[str] = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            chunk_waves = [p for i in chunk for p in prompt_waves[i] if isinstance(p, torch.Tensor)]
            speech = iter(self.speech_vectors(chunk_waves, len(chunk_waves)))
            turns = [
                [next(speech) if isinstance(p, torch.Tensor) else p for p in prompt_waves[i]] for i in chunk
            ]
            for index, text in zip(
                chunk, self.generate(turns, num_beams, max_new_tokens, **generate_kwargs), strict=True
            ):
                answers[index] = text
        return answers

    def generate(
        self,
        turns: Sequence[Sequence[str | torch.Tensor]],
        num_beams: int | None = None,
        max_new_tokens: int = ASK_MAX_NEW_TOKENS,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Decode the LLM's answers to prompts given as text pieces and speech vectors (T, H), one batch."""
        segments: list[list[Segment]] = []
        for turn in turns:
            pieces: list[Segment] = []
            for part in turn:
                ids = (
                    part
                    if isinstance(part, torch.Tensor)
                    else text_token_ids(self.tokenizer, self.kind, part)
                )
                if isinstance(ids, torch.Tensor) or ids:
                    pieces.append(ids)
            segments.append(pieces)
        beams = num_beams or DEFAULT_BEAMS[self.kind]
        # The chat template (Kang & Roy) or the prompt format's frame (BLOOMZMMS) goes around each prompt.
        ids = self.model.generate(segments, max_new_tokens, num_beams=beams, **generate_kwargs)
        return [self.tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in ids]

    # ------------------------------------------------------------------ Kang & Roy's names

    def generate_audio_response(
        self,
        audio: AudioInput | Sequence[AudioInput],
        additional_text_prompt: str = "",
        max_new_tokens: int = ASK_MAX_NEW_TOKENS,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        sampling_rate: int | None = None,
        num_beams: int | None = None,
        **generate_kwargs: Any,
    ) -> str | list[str]:
        """The LLM's response to speech, with an optional text prompt before it (Kang & Roy's inference name).

        Example:
            >>> model = speechllm.load("results/models/kang_roy")
            >>> model.generate_audio_response(article_16k, "Summarize the following article in 3 sentences "
            ...                               "or less: ")
        """
        single = not isinstance(audio, list | tuple) or is_audio_input(audio)
        items = [audio] if single else list(audio)
        prompts = [[additional_text_prompt, as_audio(item, sampling_rate)] for item in items]
        answers = self.ask(
            prompts, batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens, **generate_kwargs
        )
        return answers[0] if single else answers

    def generate_text_response(
        self,
        input_text: str | Sequence[str],
        max_new_tokens: int = ASK_MAX_NEW_TOKENS,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        num_beams: int | None = None,
        **generate_kwargs: Any,
    ) -> str | list[str]:
        """The LLM's response to text alone (Kang & Roy's inference name), in the model's prompt format: the
        chat turn for a Kang & Roy model (as its `text` topline), the text as it is for BLOOMZMMS.

        Example:
            >>> model.generate_text_response("summarize: the cat sat on the mat.")
        """
        if self.decoder != "llm":
            raise ValueError(f"{self.model_dir} was loaded with decoder 'ctc'; load it with decoder='llm'")
        check_batch_size(batch_size)
        single = isinstance(input_text, str)
        texts = [input_text] if single else list(input_text)
        answers: list[str] = []
        for start in range(0, len(texts), batch_size):
            answers += self.generate(
                [[t] for t in texts[start : start + batch_size]], num_beams, max_new_tokens, **generate_kwargs
            )
        return answers[0] if single else answers


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def dtype_key(dtype: str | torch.dtype | None) -> str | None:
    """A dtype argument as a key of `models.export.DTYPES` (None stays None)."""
    if dtype is None:
        return None
    for key, value in DTYPES.items():
        if dtype in (key, value):
            return key
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def load(
    path_or_hub_id: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **kwargs: Any,
) -> SpeechModel:
    """Load a trained model: a model directory (`results/models/tmi`) or a hub id made by `speechllm push`.

    Same as `SpeechModel.from_pretrained` (which documents `decoder`, `revision`, `cache_dir`, ...).

    Example:
        >>> import speechllm
        >>> model = speechllm.load("results/models/tmi", device="cpu")
        >>> model.ask("Repeat the sentence: {audio:clip.wav}. ")
        >>> model.transcribe(["a.wav", "b.wav"], batch_size=8)
    """
    return SpeechModel.from_pretrained(path_or_hub_id, device=device, dtype=dtype, **kwargs)
