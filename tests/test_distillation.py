"""Kang & Roy's KD loss: batched with left padding = mean of per-sample losses = the reference's batch-1 loss.

A tiny LLaMA is built locally; the reference computation is written out below from the spec (§3.1): unpadded
batch-1 sequence, NTP on `logits[-R:-1]`, soft cross-entropy on `logits[-R:]`, MSE on `hidden_states[l][-R:]`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import HubertConfig, HubertModel, LlamaConfig, LlamaForCausalLM

from speechllm.models.speech_llm import SpeechLLM
from speechllm.train.distillation import (
    DistillationConfig,
    distillation_loss,
    pack_right_padded,
    reference_encoder_training,
    response_rows,
    response_targets,
)

VOCAB, HIDDEN, LAYERS = 96, 32, 4
BOS, EOS, PAD = 1, 2, 0
PREFIX, SUFFIX = [BOS, 5, 6], [EOS, 7, 8]  # "<s>[|User|]", "</s>[|Assistant|]" stand-ins
CONFIG = DistillationConfig(ntp_weight=0.5, ld_weight=0.5, fd_weight=1.0, fd_layers=[0, 1, 3, 4])
ATOL = 1e-5


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).float().eval()


def mixed_batch(seed: int = 0) -> tuple[list[torch.Tensor], list[list[int]], list[list[int]]]:
    """Speech (T_b, H) leaves, transcripts and responses, all of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    speech_lengths, transcript_lengths, response_lengths = [7, 3, 11, 5, 9], [4, 9, 2, 6, 5], [6, 1, 9, 3, 4]
    speech = [(0.5 * torch.randn(n, HIDDEN, generator=gen)).requires_grad_() for n in speech_lengths]
    transcripts = [torch.randint(9, VOCAB, (n,), generator=gen).tolist() for n in transcript_lengths]
    responses = [torch.randint(9, VOCAB, (n,), generator=gen).tolist() for n in response_lengths]
    return speech, transcripts, responses


def prompts(speech, transcripts):
    return [[PREFIX, s, SUFFIX] for s in speech], [[PREFIX, t, SUFFIX] for t in transcripts]


def reference_loss(
    lm: LlamaForCausalLM,
    speech: torch.Tensor,
    transcript: list[int],
    response: list[int],
    config: DistillationConfig,
) -> dict[str, torch.Tensor]:
    """The reference trainer at batch 1: no padding or attention mask, labels [placeholder] + response."""
    embed = lm.get_input_embeddings()

    def sequence(middle: torch.Tensor) -> torch.Tensor:
        ids = lambda xs: embed(torch.tensor(xs))  # noqa: E731
        return torch.cat([ids(PREFIX), middle, ids(SUFFIX), ids(response)]).unsqueeze(0)

    student = lm(inputs_embeds=sequence(speech), output_hidden_states=True)
    with torch.no_grad():
        teacher = lm(inputs_embeds=sequence(embed(torch.tensor(transcript))), output_hidden_states=True)
    num_labels = len(response) + 1
    ntp = F.cross_entropy(student.logits[0, -num_labels:-1], torch.tensor(response))
    target = teacher.logits[:, -num_labels:].softmax(-1)
    ld = -(target * student.logits[:, -num_labels:].log_softmax(-1)).sum(-1).mean()
    fd = sum(
        F.mse_loss(student.hidden_states[i][:, -num_labels:], teacher.hidden_states[i][:, -num_labels:])
        for i in config.fd_layers
    )
    loss = config.ntp_weight * ntp + config.ld_weight * ld + config.fd_weight * fd
    return {"loss": loss, "ntp": ntp, "ld": ld, "fd": fd}


def test_response_rows_mark_each_samples_response_positions():
    # Right padding: sample b starts at b * span; its rows run from the last prompt position to the last
    # token.
    assert response_rows([3, 1, 2], [2, 0, 4], 6) == [2, 3, 4, 6, 13, 14, 15, 16, 17]


def test_pack_right_padded_lays_out_each_sequence_from_position_zero():
    llm = SpeechLLM(tiny_llama(), PAD, EOS)
    embed = llm.lm.get_input_embeddings()
    speech = [torch.randn(n, HIDDEN).requires_grad_() for n in (2, 3)]
    responses = [[20, 21, 22], [30]]
    packed = pack_right_padded(llm, [[PREFIX, s, SUFFIX] for s in speech], responses)
    ids = lambda xs: embed(torch.tensor(xs))  # noqa: E731
    want = [  # prompts of 8 and 9 positions, sequences of 11 and 10: one pad embedding after the second
        torch.cat([ids(PREFIX), speech[0], ids(SUFFIX), ids(responses[0])]),
        torch.cat([ids(PREFIX), speech[1], ids(SUFFIX), ids(responses[1]), ids([PAD])]),
    ]
    torch.testing.assert_close(packed.inputs_embeds, torch.stack(want), atol=0, rtol=0)
    # Response rows, flat in (B, 11): the last prompt position through the last response token.
    assert packed.rows.tolist() == [7, 8, 9, 10, 11 + 8, 11 + 9]
    assert packed.keep.flatten().nonzero().flatten().tolist() == packed.rows.tolist()
    packed.inputs_embeds.sum().backward()
    assert all(torch.equal(s.grad, torch.ones_like(s)) for s in speech)


def test_response_targets_average_each_sample_over_its_own_rows():
    no_eos = response_targets([[5, 6, 7], [8]], None, torch.device("cpu"))
    assert no_eos.labels.tolist() == [5, 6, 7, -100, 8, -100]
    torch.testing.assert_close(no_eos.position_weights, torch.tensor([1 / 8] * 4 + [1 / 4] * 2))
    torch.testing.assert_close(no_eos.label_weights, torch.tensor([1 / 6] * 3 + [0.0, 1 / 2, 0.0]))
    with_eos = response_targets([[5, 6, 7], [8]], EOS, torch.device("cpu"))
    assert with_eos.labels.tolist() == [5, 6, 7, EOS, 8, EOS]
    torch.testing.assert_close(with_eos.label_weights, with_eos.position_weights)


def test_batched_loss_is_the_mean_of_per_sample_losses_and_matches_the_reference():
    lm = tiny_llama()
    llm = SpeechLLM(lm, PAD, EOS)
    speech, transcripts, responses = mixed_batch()
    student, teacher = prompts(speech, transcripts)
    batched = distillation_loss(llm, student, teacher, responses, CONFIG)
    batched.loss.backward()
    batched_grads = [s.grad.clone() for s in speech]
    for s in speech:
        s.grad = None

    singles = [
        distillation_loss(llm, [student[b]], [teacher[b]], [responses[b]], CONFIG) for b in range(len(speech))
    ]
    for part in ("loss", "ntp", "ld", "fd"):
        mean = torch.stack([getattr(o, part) for o in singles]).mean()
        torch.testing.assert_close(getattr(batched, part), mean, atol=ATOL, rtol=0)
    torch.stack([o.loss for o in singles]).mean().backward()
    for got, want in zip(batched_grads, (s.grad for s in speech), strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert all(g.abs().sum() > 0 for g in batched_grads)  # the gradient reaches every utterance's speech
    assert int(batched.num_tokens) == sum(len(r) for r in responses)

    for b, single in enumerate(singles):
        ref = reference_loss(lm, speech[b].detach(), transcripts[b], responses[b], CONFIG)
        for part in ("loss", "ntp", "ld", "fd"):
            torch.testing.assert_close(getattr(single, part), ref[part], atol=ATOL, rtol=0)
    assert all(p.grad is None for p in lm.parameters())  # the LLM stays frozen


def test_bf16_autocast_gives_a_float32_loss_close_to_fp32():
    """precision: bf16 runs the LLM under autocast; the loss sums stay float32 and near the fp32 value."""
    llm = SpeechLLM(tiny_llama(), PAD, EOS)
    speech, transcripts, responses = mixed_batch()
    student, teacher = prompts(speech, transcripts)
    full = distillation_loss(llm, student, teacher, responses, CONFIG)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = distillation_loss(llm, student, teacher, responses, CONFIG)
    assert half.loss.dtype == torch.float32
    half.loss.backward()
    assert all(s.grad is not None and torch.isfinite(s.grad).all() for s in speech)
    torch.testing.assert_close(half.loss, full.loss.detach(), rtol=0.05, atol=0.05)


def test_sorting_or_bucketing_by_length_leaves_the_loss_unchanged():
    """The batch loss is a mean over samples: any order, or buckets weighted by their size, give the same
    value."""
    llm = SpeechLLM(tiny_llama(), PAD, EOS)
    speech, transcripts, responses = mixed_batch()
    student, teacher = prompts(speech, transcripts)
    whole = distillation_loss(llm, student, teacher, responses, CONFIG)
    order = sorted(range(len(speech)), key=lambda b: speech[b].shape[0] + len(responses[b]))
    student, teacher, responses = ([xs[b] for b in order] for xs in (student, teacher, responses))
    in_order = distillation_loss(llm, student, teacher, responses, CONFIG)
    short, long = (
        distillation_loss(llm, student[c], teacher[c], responses[c], CONFIG)
        for c in (slice(0, 2), slice(2, 5))
    )
    for part in ("loss", "ntp", "ld", "fd"):
        torch.testing.assert_close(getattr(in_order, part), getattr(whole, part), atol=ATOL, rtol=0)
        buckets = (2 * getattr(short, part) + 3 * getattr(long, part)) / 5
        torch.testing.assert_close(buckets, getattr(whole, part), atol=ATOL, rtol=0)


def test_teacher_prompt_as_student_gives_zero_feature_loss():
    llm = SpeechLLM(tiny_llama(), PAD, EOS)
    _, transcripts, responses = mixed_batch()
    embedded = [llm.embed_tokens(torch.tensor(t)) for t in transcripts]
    student, teacher = [[PREFIX, e, SUFFIX] for e in embedded], [[PREFIX, t, SUFFIX] for t in transcripts]
    out = distillation_loss(llm, student, teacher, responses, CONFIG)
    assert float(out.fd) < 1e-10
    # LD is then the teacher's entropy over the response positions, NTP its cross-entropy: both positive.
    assert float(out.ld) > 0 and float(out.ntp) > 0


def test_eos_label_and_input_errors():
    llm = SpeechLLM(tiny_llama(), PAD, EOS)
    speech, transcripts, responses = mixed_batch()
    student, teacher = prompts(speech, transcripts)
    with_eos = distillation_loss(llm, student, teacher, responses, CONFIG, append_eos=True)
    assert int(with_eos.num_tokens) == sum(len(r) + 1 for r in responses)
    with pytest.raises(ValueError, match="empty responses at batch positions \\[1\\]"):
        distillation_loss(llm, student[:2], teacher[:2], [responses[0], []], CONFIG)
    with pytest.raises(ValueError, match="fd_layers \\[9\\] out of range"):
        distillation_loss(llm, student, teacher, responses, DistillationConfig(fd_layers=[0, 9]))


def _tiny_kang_roy(tmp_path: Path, lora: dict | None = None):
    """A tiny HuBERT + LLaMA Kang & Roy model (built and saved locally), its tokenizer and train / dev sets;
    `lora`: LoRA adapters on the LLM (models.llm.lora)."""
    from test_train_resume import write_corpus
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from speechllm.data.batches import SpeechDataset
    from speechllm.data.manifest import read_manifest
    from speechllm.models.export import build_model, kang_roy_spec

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    texts = [
        "[|User|] the cat sits on the mat</s>[|Assistant|] hello world",
        "der hund schläft im garten",
    ] * 10
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(tmp_path / "llm")
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(fast),
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=BOS,
            eos_token_id=EOS,
        )
    ).save_pretrained(tmp_path / "llm")
    HubertModel(
        HubertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(32, 32, 32),
            conv_stride=(5, 4, 4),
            conv_kernel=(10, 4, 4),
            feat_extract_norm="layer",
            do_stable_layer_norm=True,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
        )
    ).save_pretrained(tmp_path / "hubert")
    spec = kang_roy_spec(
        {
            "llm": {
                "name_or_path": str(tmp_path / "llm"),
                "revision": "main",
                "dtype": "float32",
                "load_in_8bit": False,
                "lora": lora,
            },
            "speech_encoder": {
                "name_or_path": str(tmp_path / "hubert"),
                "revision": "main",
                "normalize_waveform": False,
            },
            "pooling": {"kernel_size": 8, "stride": 4},
            "chat": {"prefix": "[|User|]", "suffix": "</s>[|Assistant|]", "label_eos": False},
            "prompt": {"prefix": "", "postfix": ""},
        },
        stage="kd",
    )
    model, tokenizer = build_model(spec, with_ctc=False, with_llm=True)
    corpus = write_corpus(tmp_path / "data", num_train=6, num_dev=2)
    datasets = [SpeechDataset(read_manifest(corpus[s]), 16000) for s in ("train", "dev")]
    return model, tokenizer, datasets


KD_STAGE = {
    "lr": 1e-3,
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "accum_grad": 1,
    "batch_seconds": 2.5,
    "num_buckets": 1,
    "max_epochs": 1,
    "num_iters_per_epoch": 3,
    "best_metric": "last",
    "log_every": 1,
    "checkpoint_every": 10,
    "optimizer": "adamw",
    "betas": [0.9, 0.999],
    "schedule": "linear_decay",
    "grad_clip": None,
    "ntp_weight": 0.5,
    "ld_weight": 0.5,
    "fd_weight": 1.0,
    "fd_layers": [0, 1, 2],
}


def _train_kd(tmp_path: Path, model, tokenizer, datasets, **overrides):
    from speechllm.train.loop import StageConfig, Trainer
    from speechllm.train.objectives import DistillationCollator
    from speechllm.train.tracking import Tracker

    stage = StageConfig.from_config("kd", {**KD_STAGE, **overrides})

    def tracker(step, enabled):
        return Tracker(
            tmp_path / "log",
            {"project": "t", "mode": "disabled"},
            "tests",
            "train_kd",
            "kd",
            {},
            enabled=enabled,
            resume_step=step,
        )

    collator = DistillationCollator(tokenizer, text_field="raw_transcription", lowercase=True)
    return Trainer(model, tokenizer, stage, *datasets, collator, tracker, 0, tmp_path / "ckpt").run()


def test_kd_objective_trains_a_kang_roy_model(tmp_path):
    """The loop's "kd" objective on a tiny HuBERT + LLaMA Kang & Roy model: losses finite, weights move."""
    model, tokenizer, datasets = _tiny_kang_roy(tmp_path)
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    result = _train_kd(tmp_path, model, tokenizer, datasets)
    rows = [json.loads(line) for line in Path(tmp_path / "log/metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    assert len(trained) == 3 and all(r["loss_fd"] >= 0 and r["loss_ld"] > 0 for r in trained)
    assert {"dev_loss", "dev_ntp", "dev_ld", "dev_fd", "dev_acc"} <= set(rows[-1])
    assert result.summary["final_step"] == 3 and result.summary["selected_steps"] == [3]
    assert [r["lr"] for r in trained] == pytest.approx(
        [1e-3, 2e-3 / 3, 1e-3 / 3]
    )  # linear decay over 3 updates
    after = model.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def reference_trainer_modes(num_epochs: int, batches_per_epoch: int, validation_interval: int) -> list[bool]:
    """The encoder's mode at each batch, following the control flow of the reference's `Trainer.train`
    (wonjune-kang/llm-speech-summarization@0a3d8e6:trainer.py): `.train()` at each epoch's start, `step += 1`
    after each batch, `validate()` (which calls `.eval()`) when `step % validation_interval == 0` and at the
    epoch's end."""
    modes, step, training = [], 0, True
    for _ in range(num_epochs):
        training = True
        for _ in range(batches_per_epoch):
            modes.append(training)
            step += 1
            if step % validation_interval == 0:
                training = False
        training = False
    return modes


@pytest.mark.parametrize(("epochs", "per_epoch", "interval"), [(3, 7, 3), (4, 5, 5), (3, 4, 10), (2, 6, 1)])
def test_reference_encoder_schedule_follows_the_reference_trainer(epochs, per_epoch, interval):
    expected = reference_trainer_modes(epochs, per_epoch, interval)
    got = [
        reference_encoder_training(e * per_epoch + i, e * per_epoch, interval)
        for e in range(epochs)
        for i in range(per_epoch)
    ]
    assert got == expected


@pytest.mark.parametrize("mode", ["reference", "train"])
def test_the_loop_sets_the_encoder_mode_per_micro_batch(tmp_path, mode):
    """Two epochs of 3 micro-batches, validation interval 2: the reference trains batches 0, 1 of epoch 0 and
    batch 3 (the first) of epoch 1; `train` keeps the encoder in train mode at every training forward."""
    model, tokenizer, datasets = _tiny_kang_roy(tmp_path)
    seen: list[bool] = []
    model.encoder.register_forward_pre_hook(
        lambda module, args: seen.append(module.training) if torch.is_grad_enabled() else None
    )
    overrides = {"max_epochs": 2, "encoder_mode": mode}
    if mode == "reference":
        overrides["reference_validation_interval"] = 2
    result = _train_kd(tmp_path, model, tokenizer, datasets, **overrides)
    assert result.summary["final_step"] == 6
    expected = [True, True, False, True, False, False] if mode == "reference" else [True] * 6
    assert seen == expected
    if mode == "reference":
        assert expected == reference_trainer_modes(2, 3, 2)


def test_reference_encoder_mode_survives_a_resume(tmp_path):
    """A run stopped after epoch 0 resumes with the epoch's first micro-batch (3) in train mode: the epoch
    start comes back from the checkpoint (from 0 instead, 3 // 2 != 0 // 2 would put it in eval mode)."""
    model, tokenizer, datasets = _tiny_kang_roy(tmp_path)
    settings = {"max_epochs": 2, "encoder_mode": "reference", "reference_validation_interval": 2}
    assert _train_kd(tmp_path, model, tokenizer, datasets, max_steps=3, **settings).summary["final_step"] == 3
    seen: list[bool] = []
    model.encoder.register_forward_pre_hook(
        lambda module, args: seen.append(module.training) if torch.is_grad_enabled() else None
    )
    assert _train_kd(tmp_path, model, tokenizer, datasets, max_steps=6, **settings).summary["final_step"] == 6
    assert seen == reference_trainer_modes(2, 3, 2)[3:] == [True, False, False]


def test_reference_encoder_mode_needs_the_kd_objective_and_an_interval():
    from speechllm.train.loop import StageConfig

    with pytest.raises(ValueError, match="reference_validation_interval"):
        StageConfig.from_config("kd", {**KD_STAGE, "encoder_mode": "reference"})
    with pytest.raises(ValueError, match="kd objective"):
        StageConfig.from_config(
            "ce", {**KD_STAGE, "encoder_mode": "reference", "reference_validation_interval": 2}
        )
    with pytest.raises(ValueError, match="encoder_mode must be"):
        StageConfig.from_config("kd", {**KD_STAGE, "encoder_mode": "eval"})
