"""The three training objectives behind one `nn.Module`, so DDP / FSDP see every forward.

- "ctc" (BLOOMZMMS stage 1): `ctc_weight` × CTC over the LLM vocabulary + `interctc_weight` × LID inter-CTC
  (over the LID frames `lid_ctc_lengths` names).
- "ce"  (BLOOMZMMS stage 2, T / MI / TMI): token-summed cross-entropy on target + eos / B.
- "kd"  (Kang & Roy): next-token + logit + feature distillation against the transcript-prompted LLM.

`forward(batch)` returns the training loss and detached statistics; `forward(batch, evaluate=True)` returns
the sums a dev evaluation accumulates (and CTC hypotheses). Both go through the (possibly DDP/FSDP-wrapped)
module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from speechllm.data.batches import Batch, Collator
from speechllm.data.manifest import location
from speechllm.models.bloomzmms import check_lid_ctc_lengths
from speechllm.models.frames import InputTooShortError
from speechllm.train.distillation import DistillationConfig, distillation_loss

OBJECTIVES = ("ctc", "ce", "kd")


class DistillationCollator(Collator):
    """Batches for the KD objective: audio, the teacher's transcript ids and the LLM response ids.

    The transcript (`text_field`, lower-cased as the responses were generated) goes to `batch.ctc_targets` and
    the response (`response_field`) to `batch.target`, both tokenised as the reference (`tok(text)` without
    its BOS, see `kang_roy.text_ids`).
    """

    def __init__(
        self,
        tokenizer: Any,
        text_field: str = "raw_transcription",
        lowercase: bool = True,
        response_field: str = "llm_response",
    ) -> None:
        super().__init__(tokenizer)
        self.text_field = text_field
        self.lowercase = lowercase
        self.response_field = response_field

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        from speechllm.models.kang_roy import text_ids

        batch = super().__call__(items)
        for field in (self.text_field, self.response_field):
            missing = [
                f"{location(r) or 'line ?'} ({r.get('id', '?')})" for r in batch.records if not r.get(field)
            ]
            if missing:
                raise ValueError(
                    f"the KD objective needs '{field}' in every manifest record; missing at "
                    f"{', '.join(missing[:5])}"
                )
        texts = [r[self.text_field] for r in batch.records]
        batch.ctc_targets = [text_ids(self.tokenizer, t.lower() if self.lowercase else t) for t in texts]
        batch.target = [text_ids(self.tokenizer, r[self.response_field]) for r in batch.records]
        return batch


class ObjectiveModule(nn.Module):
    """Wraps a BloomzMMS (ctc / ce) or KangRoy (kd) model with the loss of one objective.

    Args:
        model: the model being trained (its frozen parts stay frozen).
        objective: "ctc", "ce" or "kd".
        ctc_weight, interctc_weight: CTC-stage weights (reference 0.8 / 0.2).
        lid_ctc_lengths: LID frames the LID inter-CTC reads, "frames" or the reference's "halved"
            (config train.ctc.lid_ctc_lengths; `speechllm.models.bloomzmms.LID_CTC_LENGTHS`).
        distillation: KD weights and layers (batches from `DistillationCollator`).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: str,
        ctc_weight: float = 1.0,
        interctc_weight: float = 0.0,
        distillation: DistillationConfig | None = None,
        lid_ctc_lengths: str = "frames",
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r} (expected one of {OBJECTIVES})")
        self.model = model
        self.objective = objective
        self.ctc_weight = ctc_weight
        self.interctc_weight = interctc_weight
        self.lid_ctc_lengths = check_lid_ctc_lengths(lid_ctc_lengths)
        self.distillation = distillation or DistillationConfig()

    def forward(self, batch: Batch, evaluate: bool = False) -> Any:
        if self.objective == "ctc":
            return self._ctc(batch, evaluate)
        if self.objective == "ce":
            return self._ce(batch, evaluate)
        return self._kd(batch, evaluate)

    def _encode(self, batch: Batch) -> Any:
        """The model's speech encoding; a clip too short for it is named by its manifest location."""
        try:
            return self.model.encode(batch.wav, batch.wav_lengths)
        except InputTooShortError as err:
            clips = [f"{batch.records[i].get('audio')} ({location(batch.records[i])})" for i in err.indices]
            raise InputTooShortError(f"{', '.join(clips[:5])}: {err}", err.indices) from err

    # ------------------------------------------------------------------ objectives

    def _ctc(self, batch: Batch, evaluate: bool) -> Any:
        out = self._encode(batch)
        ctc, lid = self.model.ctc_losses(out, batch.ctc_targets, batch.lid, self.lid_ctc_lengths)
        loss = self.ctc_weight * ctc + self.interctc_weight * lid
        size = len(batch.records)
        if evaluate:
            return {"loss_sum": loss.detach() * size, "utterances": size, "hyps": self.model.ctc_decode(out)}
        stats = {"loss_ctc": ctc.detach(), "loss_lid": lid.detach()}
        return loss, stats

    def _ce(self, batch: Batch, evaluate: bool) -> Any:
        out = self._encode(batch)
        segments = self.model.prompt_segments(batch.prefix, self.model.speech_segments(out), batch.postfix)
        res = self.model.llm(segments, batch.target)
        if evaluate:
            return {
                "loss_sum": res.loss.detach() * len(batch.records),
                "utterances": len(batch.records),
                "correct": res.num_correct,
                "tokens": res.num_tokens,
            }
        return res.loss, {"acc": res.num_correct.float() / res.num_tokens.clamp(min=1)}

    def _kd(self, batch: Batch, evaluate: bool) -> Any:
        speech = self._encode(batch)
        student = self.model.chat_segments([[s] for s in speech])
        teacher = self.model.chat_segments([[t] for t in batch.ctc_targets])  # see DistillationCollator
        out = distillation_loss(
            self.model.llm, student, teacher, batch.target, self.distillation, append_eos=self.model.label_eos
        )
        if evaluate:
            size = len(batch.records)
            return {
                "loss_sum": out.loss.detach() * size,
                "ntp_sum": out.ntp.detach() * size,
                "ld_sum": out.ld.detach() * size,
                "fd_sum": out.fd.detach() * size,
                "utterances": size,
                "correct": out.num_correct,
                "tokens": out.num_tokens,
            }
        stats = {
            "loss_ntp": out.ntp.detach(),
            "loss_ld": out.ld.detach(),
            "loss_fd": out.fd.detach(),
            "acc": out.num_correct.float() / out.num_tokens.clamp(min=1),
        }
        return out.loss, stats


def batch_tokens(batch: Batch, objective: str) -> int:
    """Text tokens a batch trains on (throughput): CTC targets, CE targets + eos, or KD responses."""
    if objective == "ctc":
        return sum(len(t) for t in batch.ctc_targets)
    if objective == "ce":
        return sum(len(t) + 1 for t in batch.target)
    return sum(len(t) for t in batch.target)


@torch.no_grad()
def evaluate_dev(
    module: nn.Module, loader: Any, objective: str, tokenizer: Any, device: torch.device, autocast: Any
) -> dict[str, float]:
    """Dev metrics through the (wrapped) objective module.

    CTC: `dev_loss` and greedy-CTC `dev_cer` / `dev_wer`; CE: `dev_loss` and teacher-forced `dev_acc`;
    KD: `dev_loss`, its parts and `dev_acc`. Losses are per-utterance means (batches weighted by size).
    """
    from speechllm.evaluate.metrics import asr_scores

    was_training = module.training
    module.eval()
    sums: dict[str, float] = {}
    refs: list[str] = []
    hyps: list[str] = []
    for batch in loader:
        batch = batch.to(device)
        with autocast():
            out = module(batch, evaluate=True)
        for key, value in out.items():
            if key == "hyps":
                hyps += tokenizer.batch_decode(value, skip_special_tokens=True)
            else:
                sums[key] = sums.get(key, 0.0) + float(value)
        if objective == "ctc":
            refs += [r["transcription"] for r in batch.records]
    module.train(was_training)
    utterances = max(sums.get("utterances", 0.0), 1.0)
    metrics = {"dev_loss": sums.get("loss_sum", 0.0) / utterances}
    if objective == "ctc":
        scores = asr_scores(refs, hyps)
        metrics.update(dev_cer=scores["cer"], dev_wer=scores["wer"])
    else:
        metrics["dev_acc"] = sums.get("correct", 0.0) / max(sums.get("tokens", 0.0), 1.0)
    if objective == "kd":
        metrics.update({f"dev_{part}": sums[f"{part}_sum"] / utterances for part in ("ntp", "ld", "fd")})
    return metrics
