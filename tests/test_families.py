"""Both systems over other LLM and speech-encoder families: Qwen2 (2.5), Qwen3, Llama 3, Gemma 2 / 3 and
Mistral causal LMs x WavLM / HuBERT (waveform) and Whisper / w2v-BERT 2.0 (log-mel) encoders, all tiny and
random, saved and loaded through `from_pretrained` (tests/tiny_families.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_adaptor
from test_kang_roy import waves
from tiny_families import ENCODER_FAMILIES, LLM_FAMILIES, SAMPLING_RATE, TOKENIZERS, build_encoder, build_llm
from transformers import AutoTokenizer

import speechllm
from speechllm.models.encoder_inputs import EncoderInputs
from speechllm.models.export import (
    ModelDirError,
    build_model,
    ctc_blank_id,
    kang_roy_spec,
    model_spec,
    save_model_dir,
)
from speechllm.models.frames import InputTooShortError, fbank_frame_count, whisper_frame_count
from speechllm.models.prompt_format import prompt_frame
from speechllm.targets.generate import HFGenerator, generate_shard
from speechllm.train.distillation import DistillationConfig, distillation_loss

ATOL = 1e-4
LLMS = list(LLM_FAMILIES)
TEXTS = ["the cat", "hello world", "fine"]
LENGTHS = [28000, 15000, 21000]  # under the tiny Whisper's 2 s window


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    dirs = {name: build_llm(name, root / name) for name in LLMS}
    dirs.update({name: build_encoder(name, root / name) for name in ENCODER_FAMILIES})
    return dirs


def tokenizer_family(llm: str):
    return TOKENIZERS[LLM_FAMILIES[llm][0]]


def llm_cfg(path: Path) -> dict:
    return {"name_or_path": str(path), "revision": "main", "dtype": "float32", "load_in_8bit": False}


def encoder_cfg(path: Path, encoder: str) -> dict:
    return {
        "name_or_path": str(path),
        "revision": "main",
        "normalize_waveform": encoder == "wavlm",
        "language_adapters": False,
        "frame_count": "conv",
    }


def bloomzmms_spec(
    dirs: dict[str, Path], llm: str, encoder: str, prompt_format: str, stage: str = "ctc"
) -> dict:
    models_cfg = {
        "llm": llm_cfg(dirs[llm]),
        "speech_encoder": encoder_cfg(dirs[encoder], encoder),
        "prompt": {
            "prefix": "Repeat the sentence: ",
            "postfix": ". ",
            "format": prompt_format,
            "system": None,
        },
        "ctc_head": {"blank_id": tokenizer_family(llm).blank},
    }
    return model_spec(models_cfg, tiny_adaptor(), {"English": 1, "German": 2}, stage=stage)


def ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


# ------------------------------------------------------------------------------------------- speech encoders


@pytest.mark.parametrize("encoder", ENCODER_FAMILIES)
def test_encoder_frames_follow_the_family_and_batching_changes_nothing(family_dirs, encoder) -> None:
    """Frame counts equal what the encoder really outputs for the valid input; the frontend's layer sum covers
    every hidden state and its projection the encoder's width; a batch gives each clip its frames alone."""
    spec = bloomzmms_spec(family_dirs, "qwen2", encoder, "plain")
    model, _ = build_model(spec, with_ctc=False, with_llm=False)
    model.eval()
    frontend = model.frontend
    assert frontend.layer_weights.shape == (frontend.encoder.config.num_hidden_layers + 1,)
    assert frontend.proj.in_features == frontend.encoder.config.hidden_size
    wav, lengths = waves(LENGTHS)
    with torch.no_grad():
        feats, feat_lengths = frontend(wav, lengths)
        for i, n in enumerate(LENGTHS):
            single, single_lengths = frontend(wav[i : i + 1, :n], lengths[i : i + 1])
            assert int(single_lengths[0]) == int(feat_lengths[i])
            torch.testing.assert_close(
                feats[i, : feat_lengths[i]], single[0, : feat_lengths[i]], atol=ATOL, rtol=0
            )
    if frontend.features is not None:
        fe = frontend.features.feature_extractor
        masks = fe(
            [w[:n].numpy() for w, n in zip(wav, LENGTHS, strict=True)],
            sampling_rate=SAMPLING_RATE,
            return_attention_mask=True,
            return_tensors="np",
        )["attention_mask"].sum(-1)
        if encoder == "whisper":  # mel frames, then the stride-2 convolution
            assert [whisper_frame_count(n) for n in LENGTHS] == [(int(m) + 1) // 2 for m in masks]
        else:
            assert [fbank_frame_count(n) for n in LENGTHS] == [int(m) for m in masks]
    expected = {"whisper": whisper_frame_count, "w2v-bert": fbank_frame_count}.get(encoder)
    if expected is not None:
        assert feat_lengths.tolist() == [expected(n) for n in LENGTHS]


@pytest.mark.parametrize("encoder", ENCODER_FAMILIES)
def test_min_input_length_is_exact_per_encoder_family(family_dirs, encoder) -> None:
    spec = bloomzmms_spec(family_dirs, "qwen2", encoder, "plain")
    model, _ = build_model(spec, with_ctc=False, with_llm=False)
    model.eval()
    shortest = model.min_input_samples()
    with torch.no_grad():
        out = model.encode(*waves([shortest]))
        assert int(out.speech_lengths[0]) == 1
        with pytest.raises(InputTooShortError):
            model.encode(*waves([shortest - 1]))


def test_whisper_clips_longer_than_its_window_are_refused(family_dirs) -> None:
    model, _ = build_model(
        bloomzmms_spec(family_dirs, "qwen2", "whisper", "plain"), with_ctc=False, with_llm=False
    )
    assert model.max_input_samples() == 32000
    wavlm, _ = build_model(
        bloomzmms_spec(family_dirs, "qwen2", "wavlm", "plain"), with_ctc=False, with_llm=False
    )
    assert wavlm.max_input_samples() is None
    with pytest.raises(ValueError, match="longer than the Whisper encoder's 32000-sample window"):
        model.encode(*waves([32001]))


def test_log_mel_encoders_need_their_feature_extractor(family_dirs) -> None:
    from transformers import AutoConfig

    with pytest.raises(ValueError, match="needs its feature extractor"):
        EncoderInputs(AutoConfig.from_pretrained(family_dirs["w2v-bert"]), None)
    spec = bloomzmms_spec(family_dirs, "qwen2", "whisper", "plain")
    spec["speech_encoder"]["normalize_waveform"] = True
    with pytest.raises(ValueError, match="normalize_waveform must be false"):
        build_model(spec, with_ctc=False, with_llm=False)


# ------------------------------------------------------------------------------------------- prompt formats


@pytest.mark.parametrize("llm", LLMS)
def test_prompt_frames_follow_each_family(family_dirs, llm) -> None:
    family = tokenizer_family(llm)
    tokenizer = AutoTokenizer.from_pretrained(family_dirs[llm])
    plain = prompt_frame(tokenizer, "plain")
    assert list(plain.head) == ([tokenizer.bos_token_id] if family.adds_bos else [])
    assert plain.tail == () and plain.eos_token_id == tokenizer.eos_token_id
    chat = prompt_frame(tokenizer, "chat")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello world"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.wrap_text("hello world") == rendered
    assert list(chat.head) + ids(tokenizer, "hello world") + list(chat.tail) == ids(tokenizer, rendered)
    assert chat.eos_token_id == tokenizer.convert_tokens_to_ids(family.turn_end)


def test_chat_format_needs_a_chat_template(family_dirs, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(family_dirs["llama"])
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        prompt_frame(tokenizer, "chat")


@pytest.mark.parametrize("llm", LLMS)
def test_blank_is_chosen_per_tokenizer(family_dirs, llm) -> None:
    tokenizer = AutoTokenizer.from_pretrained(family_dirs[llm])
    spec = {"llm": {"name_or_path": "x"}, "ctc_head": {"blank_id": tokenizer_family(llm).blank}}
    blank = ctc_blank_id(spec, tokenizer)
    assert tokenizer.convert_ids_to_tokens(blank) == tokenizer_family(llm).blank
    assert all(blank not in ids(tokenizer, text) for text in TEXTS)
    with pytest.raises(ModelDirError, match="is not a token"):
        ctc_blank_id({**spec, "ctc_head": {"blank_id": "<no such token>"}}, tokenizer)


# ------------------------------------------------------------------------------------------- BLOOMZMMS recipe


@pytest.mark.parametrize("encoder", ["wavlm", "whisper"])
@pytest.mark.parametrize("llm", LLMS)
def test_bloomzmms_recipe_steps(family_dirs, llm, encoder, tmp_path) -> None:
    """CTC step onto the LLM's own input embeddings, CE step in the chat turn (batched = per sample),
    generation, export -> transcribe / ask."""
    spec = bloomzmms_spec(family_dirs, llm, encoder, "chat")
    model, tokenizer = build_model(spec, with_ctc=True, with_llm=True)
    frame = prompt_frame(tokenizer, "chat")
    embeddings = model.llm.lm.get_input_embeddings()
    assert model.ctc_head.ctc_lo.weight.shape[0] == len(tokenizer) < embeddings.weight.shape[0]
    torch.testing.assert_close(model.ctc_head.ctc_lo.weight, embeddings(torch.arange(len(tokenizer))))
    assert tokenizer.convert_ids_to_tokens(model.ctc_blank_id) == tokenizer_family(llm).blank
    assert (model.prompt_head, model.prompt_tail, model.llm.eos_token_id) == (
        list(frame.head),
        list(frame.tail),
        frame.eos_token_id,
    )
    wav, lengths = waves(LENGTHS)
    targets = [ids(tokenizer, t) for t in TEXTS]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

    # CTC step (stage 1) with the LID inter-CTC.
    model.train()
    ctc, lid = model.ctc_losses(model.encode(wav, lengths), targets, torch.tensor([1, 2, 1]))
    assert torch.isfinite(ctc) and torch.isfinite(lid) and ctc > 0
    (ctc + lid).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adaptor.parameters())
    assert all(p.grad is None for p in model.llm.parameters()) and all(
        p.grad is None for p in model.frontend.encoder.parameters()
    )
    optimizer.step()
    optimizer.zero_grad()

    # CE step (stage 2): [head; prefix; speech; postfix; tail] then target + turn end.
    prefix, postfix = ids(tokenizer, "Repeat the sentence: "), ids(tokenizer, ". ")
    segments = model.prompt_segments(
        [prefix] * 3, model.speech_segments(model.encode(wav, lengths)), [postfix] * 3
    )
    assert segments[0][0] == list(frame.head) and segments[0][-1] == list(frame.tail)
    out = model.llm(segments, targets)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adaptor.parameters())
    optimizer.zero_grad()
    built = model.llm.build_inputs(segments, targets)
    assert built.labels[0, -1].item() == frame.eos_token_id

    # Batched and per-sample losses agree (left padding, position ids from the mask).
    model.eval()
    with torch.no_grad():
        speech = model.speech_segments(model.encode(wav, lengths))
        segments = model.prompt_segments([prefix] * 3, speech, [postfix] * 3)
        batched = model.llm(segments, targets)
        singles = [model.llm([segments[i]], [targets[i]]).loss for i in range(3)]
        assert float(batched.loss) * 3 == pytest.approx(float(sum(singles)), rel=1e-4)
        prompts = [[prefix, s, postfix] for s in speech]
        generated = model.generate(prompts, max_new_tokens=4, num_beams=1)
        assert generated == [model.generate([p], max_new_tokens=4, num_beams=1)[0] for p in prompts]

    # Export the CTC stage -> transcribe; the CE stage -> ask.
    save_model_dir(model, spec, tmp_path / "ctc")
    save_model_dir(model, {**spec, "stage": "t"}, tmp_path / "t")
    clips = [(wav[i, :n].numpy().astype(np.float32), SAMPLING_RATE) for i, n in enumerate(LENGTHS)]
    ctc_model = speechllm.load(tmp_path / "ctc", device="cpu")
    assert ctc_model.transcribe(clips, batch_size=3) == ctc_model.transcribe(clips, batch_size=1)
    asked = speechllm.load(tmp_path / "t", device="cpu")
    answers = asked.ask(
        [["Repeat the sentence: ", clip, ". "] for clip in clips], batch_size=3, num_beams=1, max_new_tokens=4
    )
    assert answers == [tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]


@pytest.mark.parametrize("llm", LLMS)
def test_plain_format_starts_with_the_bos_the_family_expects(family_dirs, llm) -> None:
    model, tokenizer = build_model(
        bloomzmms_spec(family_dirs, llm, "wavlm", "plain"), with_ctc=False, with_llm=True
    )
    bos = [tokenizer.bos_token_id] if tokenizer_family(llm).adds_bos else []
    assert model.prompt_head == bos and model.prompt_tail == []
    assert model.llm.eos_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("prompt_format", ["plain", "chat"])
@pytest.mark.parametrize("llm", LLMS)
def test_target_generation_prompts_the_llm_as_training_does(
    family_dirs, llm, prompt_format, tmp_path
) -> None:
    """T/MI/TMI targets: the text prompt in the same frame as the speech prompts; the text equals the model's
    own generation from the same token ids."""
    model, tokenizer = build_model(
        bloomzmms_spec(family_dirs, llm, "wavlm", prompt_format), with_ctc=False, with_llm=True
    )
    frame = prompt_frame(tokenizer, prompt_format)
    items = [(text, "Repeat the sentence: ", ". ") for text in TEXTS]
    generator = HFGenerator(model.llm.lm, tokenizer, batch_size=2)
    out = tmp_path / "shard0.jsonl"
    generate_shard(items, 0, 1, generator, {"max_new_tokens": 5}, out, (frame.head_text, frame.tail_text))
    import json

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    with torch.no_grad():
        expected = model.generate([[ids(tokenizer, p + t + q)] for t, p, q in items], max_new_tokens=5)
    assert [r["output"] for r in rows] == tokenizer.batch_decode(
        expected, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


# ------------------------------------------------------------------------------------------- Kang & Roy


@pytest.mark.parametrize("encoder", ["hubert", "w2v-bert"])
@pytest.mark.parametrize("llm", LLMS)
def test_kang_roy_kd_step_in_the_tokenizers_chat_turn(family_dirs, llm, encoder, tmp_path) -> None:
    models_cfg = {
        "llm": llm_cfg(family_dirs[llm]),
        "speech_encoder": {**encoder_cfg(family_dirs[encoder], encoder), "normalize_waveform": False},
        "pooling": {"kernel_size": 2, "stride": 2},
        "chat": {"prefix": "", "suffix": "", "label_eos": True, "format": "tokenizer", "system": None},
        "prompt": {"prefix": "", "postfix": ""},
    }
    spec = kang_roy_spec(models_cfg, stage="kd")
    model, tokenizer = build_model(spec, with_ctc=False, with_llm=True)
    frame = prompt_frame(tokenizer, "chat")
    assert (model.prefix_ids, model.suffix_ids, model.llm.eos_token_id) == (
        list(frame.head),
        list(frame.tail),
        frame.eos_token_id,
    )
    wav, lengths = waves(LENGTHS)
    responses = [ids(tokenizer, t) for t in reversed(TEXTS)]
    model.train()
    student = model.chat_segments([[s] for s in model.encode(wav, lengths)])
    teacher = model.chat_segments([[ids(tokenizer, t)] for t in TEXTS])
    out = distillation_loss(
        model.llm, student, teacher, responses, DistillationConfig(fd_layers=[0, 1, 2]), append_eos=True
    )
    assert torch.isfinite(out.loss) and out.ld > 0
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.llm.parameters())

    model.eval()
    with torch.no_grad():
        speech = model.encode(wav, lengths)
        student = model.chat_segments([[s] for s in speech])
        batched = distillation_loss(
            model.llm, student, teacher, responses, DistillationConfig(fd_layers=[0, 2])
        )
        singles = [
            distillation_loss(
                model.llm,
                student[i : i + 1],
                teacher[i : i + 1],
                responses[i : i + 1],
                DistillationConfig(fd_layers=[0, 2]),
            ).loss
            for i in range(3)
        ]
        assert float(batched.loss) == pytest.approx(float(sum(singles)) / 3, rel=1e-4)
        turns = [[ids(tokenizer, "Summarize: "), s] for s in speech]
        generated = model.generate(turns, max_new_tokens=4)
        assert generated == [model.generate([t], max_new_tokens=4)[0] for t in turns]

    save_model_dir(model, spec, tmp_path / "kd")
    asked = speechllm.load(tmp_path / "kd", device="cpu")
    clips = [(wav[i, :n].numpy().astype(np.float32), SAMPLING_RATE) for i, n in enumerate(LENGTHS)]
    answers = asked.ask([["Summarize: ", clip] for clip in clips], batch_size=3, max_new_tokens=4)
    assert answers == [tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]


@pytest.mark.parametrize("llm", ["qwen2", "llama"])
def test_kang_roy_responses_in_the_tokenizers_chat_turn(family_dirs, llm, tmp_path) -> None:
    """`targets.responses.prompt_template: chat`: each transcript inside the tokenizer's own chat turn, up to
    2 x that prompt's length."""
    import json

    from speechllm.cli import main

    manifest = tmp_path / "dev.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"id": f"u{i}", "raw_transcription": t.upper()}) + "\n" for i, t in enumerate(TEXTS)
        )
    )
    settings = {
        "llm": llm_cfg(family_dirs[llm]),
        "backend": "hf",
        "seed": 0,
        "vllm": None,
        "responses": {
            "text_field": "raw_transcription",
            "prompt_template": "chat",
            "lowercase": True,
            "add_special_tokens": False,
            "length_factor": 2,
            "num_beams": 1,
            "clean_up_spaces": False,
            "batch_size": 2,
        },
    }
    out = tmp_path / "shard0.jsonl"
    main(
        [
            "targets",
            "responses",
            "--settings",
            json.dumps(settings),
            "--manifest",
            str(manifest),
            "--shard",
            "0",
            "--num-shards",
            "1",
            "--out",
            str(out),
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    model, tokenizer = build_model(
        bloomzmms_spec(family_dirs, llm, "wavlm", "chat"), with_ctc=False, with_llm=True
    )
    frame = prompt_frame(tokenizer, "chat")
    prompts = [frame.wrap_text(t) for t in TEXTS]
    limits = [2 * len(ids(tokenizer, p)) for p in prompts]
    expected = HFGenerator(model.llm.lm, tokenizer, batch_size=1).generate(prompts, limits)
    assert [r["llm_response"] for r in rows] == expected


# ------------------------------------------------------------------------------------------- LoRA (optional)

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.trainable_state_dict().items() if ".lora_" in k}


@pytest.mark.parametrize("llm", ["qwen2", "gemma3"])
def test_lora_on_the_llm_trains_exports_and_reloads(family_dirs, llm, tmp_path) -> None:
    pytest.importorskip("peft")
    from speechllm.models.export import load_model_dir, load_trained_weights

    spec = bloomzmms_spec(family_dirs, llm, "wavlm", "chat", stage="ce")
    spec["llm"]["lora"] = LORA
    model, tokenizer = build_model(spec, with_ctc=False, with_llm=True)
    plain, _ = build_model(
        {**spec, "llm": {k: v for k, v in spec["llm"].items() if k != "lora"}}, False, True
    )
    plain.load_state_dict(model.state_dict(), strict=False)  # the same adaptor, the LLM without adapters
    adapters = lora_weights(model)
    assert adapters and all(p.requires_grad == (".lora_" in n) for n, p in model.llm.named_parameters())
    wav, lengths = waves(LENGTHS)
    targets = [ids(tokenizer, t) for t in TEXTS]
    prefix, postfix = ids(tokenizer, "Repeat the sentence: "), ids(tokenizer, ". ")

    def ce_loss(m):
        segments = m.prompt_segments([prefix] * 3, m.speech_segments(m.encode(wav, lengths)), [postfix] * 3)
        return m.llm(segments, targets).loss

    model.eval(), plain.eval()
    with torch.no_grad():  # B = 0: fresh adapters leave the LLM as it was
        assert float(ce_loss(model)) == pytest.approx(float(ce_loss(plain)), rel=1e-6)
    loss = ce_loss(model)
    loss.backward()
    assert any(
        model.llm.lm.get_parameter(k.removeprefix("llm.lm.")).grad.abs().sum() > 0
        for k in adapters
        if "lora_B" in k
    )
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    with torch.no_grad():
        trained = float(ce_loss(model))
        assert trained != pytest.approx(float(ce_loss(plain)), rel=1e-6)
    save_model_dir(model, spec, tmp_path / "ce")
    reloaded, _, _ = load_model_dir(tmp_path / "ce", with_ctc=False, with_llm=True)
    reloaded.eval()
    with torch.no_grad():
        assert float(ce_loss(reloaded)) == pytest.approx(trained, rel=1e-6)
    # A CTC-stage model (no adapters) initialises the CE stage: its adapters start fresh, or are required.
    ctc_spec = {**spec, "stage": "ctc"}
    ctc_model, _ = build_model(ctc_spec, with_ctc=True, with_llm=True)
    assert not lora_weights(ctc_model)
    save_model_dir(ctc_model, ctc_spec, tmp_path / "ctc")
    fresh, _ = build_model(spec, with_ctc=False, with_llm=True)
    load_trained_weights(fresh, tmp_path / "ctc" / "model.safetensors", fresh_lora=True)
    with pytest.raises(ModelDirError, match="trained tensors missing"):
        load_trained_weights(fresh, tmp_path / "ctc" / "model.safetensors")


def test_lora_kd_teacher_is_the_frozen_llm(family_dirs) -> None:
    pytest.importorskip("peft")
    from speechllm.models.lora import adapters_disabled

    models_cfg = {
        "llm": {**llm_cfg(family_dirs["llama"]), "lora": LORA},
        "speech_encoder": {**encoder_cfg(family_dirs["hubert"], "hubert"), "normalize_waveform": False},
        "pooling": {"kernel_size": 2, "stride": 2},
        "chat": {"prefix": "", "suffix": "", "label_eos": False, "format": "tokenizer", "system": None},
        "prompt": {"prefix": "", "postfix": ""},
    }
    model, tokenizer = build_model(kang_roy_spec(models_cfg, stage="kd"), with_ctc=False, with_llm=True)
    with torch.no_grad():
        for name, param in model.llm.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # trained-looking adapters
    model.eval()
    prompt = model.chat_segments([[ids(tokenizer, t)] for t in TEXTS])
    responses = [ids(tokenizer, t) for t in reversed(TEXTS)]
    config = DistillationConfig(ntp_weight=0.0, ld_weight=1.0, fd_weight=1.0, fd_layers=[0, 1, 2])
    with torch.no_grad():
        # The teacher's own prompt as the student: zero distillation loss only if the teacher runs without
        # adapters exactly when the student runs without them.
        with adapters_disabled(model.llm.lm):
            assert float(distillation_loss(model.llm, prompt, prompt, responses, config).fd) == 0.0
        assert float(distillation_loss(model.llm, prompt, prompt, responses, config).fd) > 0.0
    student = model.chat_segments([[s] for s in model.encode(*waves(LENGTHS))])
    distillation_loss(model.llm, student, prompt, responses, config).loss.backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.llm.lm.named_parameters()
        if "lora_" in n
    )


def test_lora_adapters_resume_exactly(tmp_path) -> None:
    """A KD run with LoRA stopped after one epoch and resumed from its checkpoint ends with the same adapter
    (and encoder) weights as an uninterrupted two-epoch run."""
    pytest.importorskip("peft")
    import shutil

    from test_distillation import _tiny_kang_roy, _train_kd

    schedule = {"schedule": "warmup_inverse_sqrt", "warmup_steps": 1}
    straight, tokenizer, datasets = _tiny_kang_roy(tmp_path / "straight", lora=LORA)
    _train_kd(tmp_path / "straight", straight, tokenizer, datasets, max_epochs=2, **schedule)
    first, tokenizer, datasets = _tiny_kang_roy(tmp_path / "first", lora=LORA)
    _train_kd(tmp_path / "first", first, tokenizer, datasets, max_epochs=1, **schedule)
    assert lora_weights(first) and not all(
        torch.equal(first.trainable_state_dict()[k], v) for k, v in lora_weights(straight).items()
    )
    resumed, tokenizer, datasets = _tiny_kang_roy(tmp_path / "resumed", lora=LORA)
    shutil.copytree(tmp_path / "first" / "ckpt", tmp_path / "resumed" / "ckpt")
    with torch.no_grad():  # what a fresh start would train from differs: only the checkpoint can restore it
        for name, param in resumed.named_parameters():
            if ".lora_" in name:
                param.normal_(0, 0.3)
    _train_kd(tmp_path / "resumed", resumed, tokenizer, datasets, max_epochs=2, **schedule)
    expected, got = straight.trainable_state_dict(), resumed.trainable_state_dict()
    assert expected.keys() == got.keys() and any(".lora_" in k for k in got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_exported_models_keep_the_prompt_frame_they_were_trained_with(family_dirs, tmp_path) -> None:
    """A chat template that renders differently later (a new revision, a date in the system turn) does not
    change an exported model's prompt: speechllm.json records the frame."""
    import json
    import shutil

    from speechllm.models.export import load_model_dir, read_spec

    llm_dir = tmp_path / "llm"
    shutil.copytree(family_dirs["llama"], llm_dir)
    dirs = {**family_dirs, "llama": llm_dir}
    spec = bloomzmms_spec(dirs, "llama", "wavlm", "chat", stage="ce")
    model, tokenizer = build_model(spec, with_ctc=False, with_llm=True)
    save_model_dir(model, spec, tmp_path / "ce")
    recorded = read_spec(tmp_path / "ce")["prompt"]["frame"]
    assert recorded["head"] == model.prompt_head and recorded["eos_token_id"] == model.llm.eos_token_id
    tokenizer.chat_template = "Today is a new day.\n" + tokenizer.chat_template
    tokenizer.save_pretrained(llm_dir)
    rebuilt, _ = build_model(bloomzmms_spec(dirs, "llama", "wavlm", "chat", stage="ce"), False, True)
    assert rebuilt.prompt_head != model.prompt_head  # the template did change
    reloaded, _, _ = load_model_dir(tmp_path / "ce", with_ctc=False, with_llm=True)
    assert (reloaded.prompt_head, reloaded.prompt_tail) == (model.prompt_head, model.prompt_tail)
    assert json.loads((tmp_path / "ce" / "speechllm.json").read_text())["prompt"]["format"] == "chat"
