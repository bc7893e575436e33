"""BLOOMZMMS: frozen speech encoder → trainable frontend + E-Branchformer adaptor → (frozen CTC head | frozen
LLM)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from speechllm.models.adaptor import AdaptorOutput, SpeechAdaptor
from speechllm.models.ctc_head import CTCHead
from speechllm.models.frames import min_input_samples
from speechllm.models.frontend import SpeechFrontend
from speechllm.models.speech_llm import Segment, SpeechLLM

LID_BLANK = 0
# How many LID frames the LID inter-CTC loss reads (config train.ctc.lid_ctc_lengths): `frames`, every LID
# frame of the utterance (floor(T1 / 2)); `halved`, the reference's floor(T1 / 4): its espnet_model.py hands
# the LID CTC the post-encoder lengths (already halved), which the LID CTC's forward halves again by its own
# length-adaptor ratio
# (DigitalPhonetics/bloomzmms@77dc192:espnet-bloomzmms-files/espnet2/asr/{espnet_model.py,ctc.py}).
LID_CTC_LENGTHS = ("frames", "halved")


def check_lid_ctc_lengths(value: str) -> str:
    if value not in LID_CTC_LENGTHS:
        raise ValueError(
            f"unknown LID CTC lengths {value!r} (config key train.ctc.lid_ctc_lengths: "
            f"{' | '.join(LID_CTC_LENGTHS)})"
        )
    return value


class BloomzMMS(nn.Module):
    """The speech side (frontend + adaptor) with an optional CTC head (stage 1) and/or LLM (stage 2)."""

    def __init__(
        self,
        frontend: SpeechFrontend,
        adaptor: SpeechAdaptor,
        ctc_head: CTCHead | None,
        llm: SpeechLLM | None,
        ctc_blank_id: int,
        prompt_head: Sequence[int] = (),
        prompt_tail: Sequence[int] = (),
    ) -> None:
        super().__init__()
        # The prompt format's frame around every prompt (models.prompt.format; prompt_format.py): BLOOMZ's
        # plain prompt has none, a chat LLM's user turn opens and closes here.
        self.prompt_head, self.prompt_tail = list(prompt_head), list(prompt_tail)
        self.frontend = frontend
        self.adaptor = adaptor
        self.ctc_head = ctc_head
        self.llm = llm
        self.ctc_blank_id = (
            ctc_blank_id  # config models.ctc_head.blank_id: loss, greedy / beam search, dev CER
        )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: the frozen encoder, CTC head and LLM are referenced, not copied."""
        names = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k in names}

    def min_input_samples(self) -> int:
        """Shortest waveform (samples) that yields one speech vector: the encoder's frame count, then the
        adaptor's subsampling and length adaptor."""

        def frames(samples: int) -> int:
            return int(self.frontend.output_lengths(torch.tensor([samples]))[0])

        return min_input_samples(frames, self.adaptor.config.output_frames)

    def max_input_samples(self) -> int | None:
        """Longest waveform (samples) the encoder reads whole (Whisper: its window), None without a limit."""
        return self.frontend.features.max_samples if self.frontend.features is not None else None

    def encode(self, wav: torch.Tensor, wav_lengths: torch.Tensor) -> AdaptorOutput:
        """wav (B, N) → speech vectors (B, T2, H_llm) and LID logits."""
        feats, feat_lengths = self.frontend(wav, wav_lengths)
        return self.adaptor(feats, feat_lengths)

    def ctc_losses(
        self,
        out: AdaptorOutput,
        targets: Sequence[Sequence[int]],
        lid: torch.Tensor,
        lid_ctc_lengths: str = "frames",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(CTC over LLM tokens, LID inter-CTC), each summed over the batch / B, zero_infinity.

        As the reference, the LID target is the utterance's label repeated to the length of its token target;
        `lid_ctc_lengths` says how many of the utterance's LID frames its loss reads (see LID_CTC_LENGTHS).
        """
        assert self.ctc_head is not None, "this model has no CTC head"
        ctc = self.ctc_head.loss(out.speech, out.speech_lengths, targets, blank_id=self.ctc_blank_id)
        lid_targets = [[int(label)] * max(1, len(t)) for label, t in zip(lid.tolist(), targets, strict=True)]
        log_probs = out.lid_logits.float().log_softmax(-1).transpose(0, 1)
        flat = torch.tensor([x for t in lid_targets for x in t], device=log_probs.device)
        lengths = torch.tensor([len(t) for t in lid_targets], device=log_probs.device)
        lid_loss = nn.functional.ctc_loss(
            log_probs,
            flat,
            self.lid_loss_lengths(out, lid_ctc_lengths),
            lengths,
            blank=LID_BLANK,
            reduction="sum",
            zero_infinity=True,
        ) / len(lid_targets)
        return ctc, lid_loss

    def lid_loss_lengths(self, out: AdaptorOutput, lid_ctc_lengths: str) -> torch.Tensor:
        """(B,) LID frames the LID loss reads: all of them, or the reference's post-encoder lengths divided
        again by the LID head's length-adaptor ratio."""
        if check_lid_ctc_lengths(lid_ctc_lengths) == "halved":
            return torch.div(
                out.speech_lengths, self.adaptor.lid_ctc.length_adaptor.ratio, rounding_mode="floor"
            )
        return out.lid_lengths

    def ctc_decode(self, out: AdaptorOutput) -> list[list[int]]:
        assert self.ctc_head is not None, "this model has no CTC head"
        logits = self.ctc_head(out.speech)
        return CTCHead.greedy_decode(logits, out.speech_lengths, self.ctc_blank_id)

    @staticmethod
    def speech_segments(out: AdaptorOutput) -> list[torch.Tensor]:
        """Per-utterance speech vectors cut to their valid length: [(T2_i, H)]."""
        return [out.speech[i, : int(n)] for i, n in enumerate(out.speech_lengths)]

    def wrap_prompts(self, prompts: Sequence[Sequence[Segment]]) -> list[list[Segment]]:
        """Each prompt's segments inside the prompt format's frame: [head; segments...; tail] (empty parts
        left out)."""
        head = [self.prompt_head] if self.prompt_head else []
        tail = [self.prompt_tail] if self.prompt_tail else []
        return [[*head, *segments, *tail] for segments in prompts]

    def generate(
        self, prompts: Sequence[Sequence[Segment]], max_new_tokens: int, **generate_kwargs: object
    ) -> list[list[int]]:
        """The LLM's continuations of prompts given inside the prompt format's frame (see `wrap_prompts`)."""
        if self.llm is None:
            raise ValueError("this model was loaded without its LLM")
        return self.llm.generate(self.wrap_prompts(prompts), max_new_tokens, **generate_kwargs)

    def prompt_segments(
        self,
        prefix: Sequence[Sequence[int]],
        speech: Sequence[torch.Tensor],
        postfix: Sequence[Sequence[int]],
    ) -> list[list[Segment]]:
        """[head; E(prefix); speech; E(postfix); tail] per utterance (head and tail: the prompt format's)."""
        return self.wrap_prompts(
            [[list(p), s, list(q)] for p, s, q in zip(prefix, speech, postfix, strict=True)]
        )
