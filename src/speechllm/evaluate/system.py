"""A system under evaluation: where the prompt's content comes from, and the frozen LLM that answers.

Decoders (`speechllm evaluate --decoder`):

* ``ctc``: the CTC head's transcript is the output (ASR only).
* ``llm``: each clip's speech vectors go into the prompt (the speech LLM).
* ``cascade``: each clip's CTC transcript goes into the prompt as text (our CTC ASR, or an HF CTC checkpoint
  named by `evaluate.cascade_asr`, e.g. Kang & Roy's `facebook/hubert-large-ls960-ft`, lower-cased as theirs).
* ``text``: each clip's gold text goes into the prompt (the text upper bound).

With text in place of speech, the prompt is rendered as one string and tokenised once (what a text user of the
LLM would send), while speech prompts tokenise each text piece around the speech on its own (as the
reference). BLOOMZMMS prompts are used as they are; Kang & Roy prompts are wrapped in the MiniChat chat turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from speechllm.evaluate.ctc_search import CTCSearch, ctc_decode
from speechllm.evaluate.decode import load_wavs, postprocess
from speechllm.evaluate.settings import CascadeAsr, SystemSettings
from speechllm.models.frames import conv_stack_length, smallest_input
from speechllm.models.kang_roy import ChatTemplate, reference_text_turn_ids
from speechllm.models.speech_llm import Segment, SpeechLLM, check_unfinished_hypotheses, token_logprobs

DECODERS = ("ctc", "llm", "cascade", "text")
# How a text-only chat turn (Kang & Roy's text and cascade baselines) is tokenised: "segments" as the speech
# prompt (chat prefix ids + user text ids + chat suffix ids), "reference" as `generate_text_response` (one
# string).
TEXT_TURNS = ("segments", "reference")


@dataclass(frozen=True)
class Clip:
    """One spoken text: its audio file (its manifest location `<manifest>:<line>`, for errors) and its gold
    text."""

    audio: str
    text: str = ""
    line: int | str | None = None


Fill = torch.Tensor | str  # what takes a clip's place in a prompt: speech vectors (T, H) or text


def assemble(pieces: Sequence[Fill], text_ids: Callable[[str], list[int]]) -> list[Segment]:
    """Prompt segments: adjacent strings merged and tokenised once, speech tensors kept in place."""
    segments: list[Segment] = []
    run: list[str] = []
    for piece in pieces:
        if isinstance(piece, str):
            run.append(piece)
            continue
        if run:
            segments.append(text_ids("".join(run)))
            run = []
        segments.append(piece)
    if run:
        segments.append(text_ids("".join(run)))
    return [s for s in segments if isinstance(s, torch.Tensor) or len(s) > 0]


@dataclass
class SpeechReadout:
    """Speech vectors per clip and, with a CTC head, its transcript of the same encoder output."""

    speech: list[torch.Tensor]
    ctc_text: list[str] | None = None


@dataclass
class EvalSystem:
    """Everything a benchmark needs from one system.

    Attributes:
        decoder: one of DECODERS.
        tokenizer: the LLM's tokenizer.
        llm: the frozen LLM wrapper (None for a CTC-only system).
        text_ids: text -> token ids without special tokens.
        wrap: prompt segments -> the LLM's full input segments (identity, or the chat template).
        read_speech: clips -> speech vectors (and the CTC branch's text), for decoder ``llm``.
        transcribe: clips -> CTC transcripts, for decoders ``ctc`` and ``cascade``.
        notes: facts recorded in the score file (e.g. why there is no CTC-branch score).
        chat: the chat turn's strings of a Kang & Roy system (None: the prompts are used as they are).
        unfinished_hypotheses: what `generate` does with the last token of an answer that ran out of budget
            (config evaluate.unfinished_hypotheses; models/speech_llm.py UNFINISHED_HYPOTHESES).
    """

    decoder: str
    tokenizer: Any
    llm: SpeechLLM | None
    text_ids: Callable[[str], list[int]]
    wrap: Callable[[list[list[Segment]]], list[list[Segment]]] = lambda segments: segments
    read_speech: Callable[[Sequence[Clip]], SpeechReadout] | None = None
    transcribe: Callable[[Sequence[Clip]], list[str]] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    chat: ChatTemplate | None = None
    unfinished_hypotheses: str = "keep"

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}; expected one of {DECODERS}")

    # ------------------------------------------------------------------ inputs

    def fills(self, clips: Sequence[Clip]) -> tuple[list[Fill], list[str] | None]:
        """What replaces each clip in a prompt, and the CTC branch's transcripts where the model has one."""
        if self.decoder == "text":
            return [c.text for c in clips], None
        if self.decoder in ("ctc", "cascade"):
            assert self.transcribe is not None, "this system has no CTC transcriber"
            texts = self.transcribe(clips)
            return list(texts), list(texts)
        assert self.read_speech is not None, "this system has no speech encoder"
        out = self.read_speech(clips)
        return list(out.speech), out.ctc_text

    def prompts(self, pieces: Sequence[Sequence[Fill]], text_turn: str = "segments") -> list[list[Segment]]:
        """Full LLM input segments for prompts given as text pieces and fills.

        With `text_turn` "reference", a chat system's all-text prompts become the one string the reference's
        `generate_text_response` tokenises (`reference_text_turn_ids`); speech prompts are never affected.
        """
        if text_turn not in TEXT_TURNS:
            raise ValueError(f"text_turn must be one of {TEXT_TURNS}, got {text_turn!r}")
        if text_turn == "reference" and self.chat is not None:
            return [
                [reference_text_turn_ids(self.tokenizer, self.chat, "".join(p))]
                if all(isinstance(piece, str) for piece in p)
                else self.wrap([assemble(p, self.text_ids)])[0]
                for p in pieces
            ]
        return self.wrap([assemble(p, self.text_ids) for p in pieces])

    @staticmethod
    def describe(pieces: Sequence[Fill | str], names: Sequence[str] | None = None) -> str:
        """A readable prompt for the Parquet outputs: speech shown as `<speech>` (or `<speech:name>`)."""
        out, speech_index = [], 0
        for piece in pieces:
            if isinstance(piece, torch.Tensor):
                name = names[speech_index] if names else None
                out.append(f"<speech:{name}>" if name else "<speech>")
                speech_index += 1
            else:
                out.append(piece)
        return "".join(out)

    # ------------------------------------------------------------------ LLM

    def _require_llm(self) -> SpeechLLM:
        if self.llm is None:
            raise ValueError(f"decoder {self.decoder!r} has no LLM")
        return self.llm

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return [postprocess(t) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def generate(
        self, segments: Sequence[Sequence[Segment]], num_beams: int, max_new_tokens: int
    ) -> list[str]:
        """Beam-search answers (special tokens dropped, newlines to spaces, stripped)."""
        ids = self._require_llm().generate(
            segments,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            unfinished_hypotheses=self.unfinished_hypotheses,
        )
        return self.decode(ids)

    def option_logprobs(
        self, segments: Sequence[Sequence[Segment]], options: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """(B, K) summed log-probabilities of each option after each prompt."""
        return self._require_llm().option_logprobs(segments, options)

    @torch.no_grad()
    def response_nll(
        self, segments: Sequence[Sequence[Segment]], targets: Sequence[Sequence[int]], append_eos: bool
    ) -> tuple[list[float], list[int]]:
        """Per sample: summed negative log-likelihood of the teacher-forced response, and its token count."""
        llm = self._require_llm()
        with llm._inference_layers():
            inputs = llm.build_inputs(segments, targets, append_eos=append_eos)
            span = inputs.label_span
            logits = llm.lm_logits(inputs, logits_to_keep=span)
        labels = inputs.labels[:, -span:].to(logits.device)
        logp = token_logprobs(logits, labels)
        counts = (labels != -100).sum(dim=-1)
        return [-float(x) for x in logp.sum(dim=-1)], [int(n) for n in counts]


# ---------------------------------------------------------------------- builders


def bloom_text_ids(tokenizer: Any) -> Callable[[str], list[int]]:
    return lambda text: list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def own_ctc_transcriber(
    model: Any, tokenizer: Any, sampling_rate: int, device: torch.device, search: CTCSearch
) -> Callable[[Sequence[Clip]], list[str]]:
    """Transcripts from a BLOOMZMMS model's own CTC head."""

    @torch.no_grad()
    def transcribe(clips: Sequence[Clip]) -> list[str]:
        wav, lengths = load_wavs(
            [c.audio for c in clips],
            sampling_rate,
            [c.line for c in clips],
            device,
            model.min_input_samples(),
        )
        out = model.encode(wav, lengths)
        ids = ctc_decode(model.ctc_head(out.speech), out.speech_lengths, model.ctc_blank_id, search)
        return [postprocess(t) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]

    return transcribe


def hf_ctc_transcriber(
    name_or_path: str, revision: str | None, sampling_rate: int, device: torch.device, lowercase: bool
) -> Callable[[Sequence[Clip]], list[str]]:
    """Greedy transcripts from an HF CTC checkpoint (`AutoModelForCTC` + its tokenizer), e.g. HuBERT-large-ft.

    As Kang & Roy's cascade: the raw waveform goes in (no feature normalisation) and the text is lower-cased.
    """
    from pathlib import Path

    from transformers import AutoModelForCTC, AutoTokenizer

    kwargs = {} if Path(name_or_path).exists() else {"revision": revision}
    asr = AutoModelForCTC.from_pretrained(name_or_path, **kwargs).to(device).eval()
    asr_tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    # Shortest clip that gives a wav2vec2-family checkpoint's conv feature extractor one frame.
    kernels, strides = getattr(asr.config, "conv_kernel", None), getattr(asr.config, "conv_stride", None)
    shortest = smallest_input(lambda n: conv_stack_length(n, kernels, strides)) if kernels and strides else 0

    @torch.no_grad()
    def transcribe(clips: Sequence[Clip]) -> list[str]:
        texts = []
        for clip in clips:  # one at a time: these checkpoints take no attention mask (as the reference)
            wav, _ = load_wavs([clip.audio], sampling_rate, [clip.line], device, shortest)
            ids = asr(wav).logits.argmax(dim=-1)
            text = asr_tokenizer.batch_decode(ids)[0]
            texts.append(postprocess(text.lower() if lowercase else text))
        return texts

    return transcribe


def bloomzmms_speech_reader(
    model: Any, tokenizer: Any, sampling_rate: int, device: torch.device, search: CTCSearch
) -> Callable[[Sequence[Clip]], SpeechReadout]:
    @torch.no_grad()
    def read(clips: Sequence[Clip]) -> SpeechReadout:
        wav, lengths = load_wavs(
            [c.audio for c in clips],
            sampling_rate,
            [c.line for c in clips],
            device,
            model.min_input_samples(),
        )
        out = model.encode(wav, lengths)
        ctc_text = None
        if model.ctc_head is not None:  # the CTC branch scored from the same encoder output, at no extra cost
            ids = ctc_decode(model.ctc_head(out.speech), out.speech_lengths, model.ctc_blank_id, search)
            ctc_text = [postprocess(t) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return SpeechReadout(model.speech_segments(out), ctc_text)

    return read


def kang_roy_speech_reader(
    model: Any, sampling_rate: int, device: torch.device
) -> Callable[[Sequence[Clip]], SpeechReadout]:
    @torch.no_grad()
    def read(clips: Sequence[Clip]) -> SpeechReadout:
        wav, lengths = load_wavs(
            [c.audio for c in clips],
            sampling_rate,
            [c.line for c in clips],
            device,
            model.min_input_samples(),
        )
        return SpeechReadout(model.encode(wav, lengths))

    return read


def chat_wrapper(
    prefix_ids: Sequence[int], suffix_ids: Sequence[int]
) -> Callable[[list[list[Segment]]], list[list[Segment]]]:
    """The frame around each prompt: Kang & Roy's chat turn (`<s>[|User|]` + the user turn +
    `</s>[|Assistant|]`), or a BLOOMZMMS prompt format's (nothing for BLOOMZ's plain prompt)."""
    head = [list(prefix_ids)] if prefix_ids else []
    tail = [list(suffix_ids)] if suffix_ids else []
    return lambda turns: [[*head, *turn, *tail] for turn in turns]


def build_system(
    model_dir: str, decoder: str, settings: SystemSettings, sampling_rate: int, device: torch.device
) -> tuple[EvalSystem, dict[str, Any]]:
    """Load what `decoder` needs from an exported model directory. Returns (system, spec).

    ``text`` loads only the LLM; ``llm`` on a BLOOMZMMS model whose stage is ``ctc`` (the CE starting point)
    also builds the CTC head when `evaluate.ctc_branch` is set, so its ASR score file carries the CTC branch's
    CER. CE-trained models have no trained CTC branch (stage 2 trains without it, as the reference).
    """
    from pathlib import Path

    from speechllm.models.export import kang_roy_frame, load_llm, load_model_dir, pad_token_id, read_spec
    from speechllm.models.prompt_format import frame_from_spec

    spec = read_spec(Path(model_dir))
    kind = spec.get("kind", "bloomzmms")
    chat = None
    if kind == "kang_roy" and spec["chat"].get("format", "strings") == "strings":
        chat = ChatTemplate(
            **{k: v for k, v in spec["chat"].items() if k not in ("label_eos", "format", "system")}
        )
    search = CTCSearch.from_settings(settings.ctc)
    unfinished = check_unfinished_hypotheses(settings.unfinished_hypotheses)
    cascade_cfg = settings.cascade_asr or CascadeAsr()
    cascade_asr = cascade_cfg.name_or_path
    notes: dict[str, Any] = {"kind": kind, "ctc_search": search.search}
    if decoder == "ctc" and kind != "bloomzmms":
        raise ValueError(
            f"{model_dir}: decoder 'ctc' needs a BLOOMZMMS model with a CTC head (kind {kind!r})"
        )

    if decoder == "text":
        lm, tokenizer = load_llm(spec["llm"], device)
        if kind == "kang_roy":
            prefix_ids, suffix_ids, eos = kang_roy_frame(spec, tokenizer)
        else:
            frame = frame_from_spec(tokenizer, spec["prompt"])
            prefix_ids, suffix_ids, eos = list(frame.head), list(frame.tail), frame.eos_token_id
        llm = SpeechLLM(lm, pad_token_id(tokenizer), eos)
        system = EvalSystem("text", tokenizer, llm, bloom_text_ids(tokenizer), notes=notes, chat=chat)
        system.unfinished_hypotheses = unfinished
        system.wrap = chat_wrapper(prefix_ids, suffix_ids)
        return system, spec

    with_ctc = kind == "bloomzmms" and (
        decoder == "ctc"
        or (decoder == "cascade" and not cascade_asr)
        or (decoder == "llm" and spec.get("stage") == "ctc" and settings.ctc_branch)
    )
    model, tokenizer, spec = load_model_dir(
        Path(model_dir), with_ctc=with_ctc, with_llm=decoder != "ctc", device=device
    )
    model.eval()
    llm = getattr(model, "llm", None)
    system = EvalSystem(decoder, tokenizer, llm, bloom_text_ids(tokenizer), notes=notes, chat=chat)
    system.unfinished_hypotheses = unfinished
    if kind == "kang_roy":
        system.wrap = model.chat_segments
        system.read_speech = kang_roy_speech_reader(model, sampling_rate, device)
    else:
        system.wrap = model.wrap_prompts
        system.read_speech = bloomzmms_speech_reader(model, tokenizer, sampling_rate, device, search)
        if decoder == "llm" and not with_ctc:
            notes["ctc_branch"] = (
                "none: CE-trained models have no trained CTC branch (stage 2 trains without it, "
                "as the reference); the `ctc` system scores the CTC branch"
            )
    if decoder == "ctc" or (decoder == "cascade" and not cascade_asr):
        if kind != "bloomzmms":
            raise ValueError(
                f"{model_dir}: a {kind} model has no CTC head; set evaluate.cascade_asr to an HF CTC "
                "checkpoint for its cascade"
            )
        system.transcribe = own_ctc_transcriber(model, tokenizer, sampling_rate, device, search)
        if decoder == "cascade":  # the ctc decoder's transcripts are its output, not a cascade's input
            notes["cascade_asr"] = f"{model_dir} (own CTC head)"
    elif decoder == "cascade":
        system.transcribe = hf_ctc_transcriber(
            cascade_asr,
            cascade_cfg.revision,
            sampling_rate,
            device,
            cascade_cfg.lowercase,
        )
        notes["cascade_asr"] = str(cascade_asr)
    return system, spec
