"""Kang & Roy model: HuBERT + pooling encoder, MiniChat-style chat prompt on a frozen LLaMA, export and 8-bit
errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import HubertConfig, HubertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from speechllm.models import export
from speechllm.models.export import build_model, kang_roy_spec, load_llm, load_model_dir, save_model_dir
from speechllm.models.hubert_pool import HubertPoolEncoder, PoolConfig
from speechllm.models.kang_roy import ChatTemplate, KangRoy, chat_ids, text_ids
from speechllm.models.speech_llm import SpeechLLM

ATOL = 1e-5
CHAT = ChatTemplate()  # "[|User|]" / "</s>[|Assistant|]", the reference's strings


def tiny_hubert_config(**overrides) -> HubertConfig:
    """HuBERT-large's layout (layer-norm conv extractor, stable-layer-norm encoder), shrunk; 80-sample hop."""
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32, 32, 32),
        conv_stride=(5, 4, 4),
        conv_kernel=(10, 4, 4),
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        feat_proj_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        apply_spec_augment=True,
        mask_time_prob=0.05,
        mask_time_length=2,
        mask_time_min_masks=2,
        layerdrop=0.1,
    )
    kwargs.update(overrides)
    return HubertConfig(**kwargs)


def build_chat_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """SentencePiece-like BPE with LLaMA's special ids (<unk> 0, <s> 1, </s> 2) that prepends <s>, no pad
    token."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    texts = [
        "[|User|] hello there how are you</s>[|Assistant|] i am fine thank you",
        "summarize the following article in three sentences or less",
        "the cat sat on the mat",
    ] * 10
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
    fast.save_pretrained(out_dir)
    return fast


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny HubertModel and a tiny LlamaForCausalLM + tokenizer, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("kang_roy")
    tokenizer = build_chat_tokenizer(root / "llm")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
    )
    lm.save_pretrained(root / "llm")
    HubertModel(tiny_hubert_config()).save_pretrained(root / "hubert")
    return {"llm": root / "llm", "hubert": root / "hubert"}


@pytest.fixture()
def spec(tiny_dirs) -> dict:
    models_cfg = {
        "llm": {
            "name_or_path": str(tiny_dirs["llm"]),
            "revision": "main",
            "dtype": "float32",
            "load_in_8bit": False,
        },
        "speech_encoder": {
            "name_or_path": str(tiny_dirs["hubert"]),
            "revision": "main",
            "normalize_waveform": False,
        },
        "pooling": {"kernel_size": 8, "stride": 4},
        "chat": {"prefix": CHAT.prefix, "suffix": CHAT.suffix, "label_eos": False},
        "prompt": {"prefix": "", "postfix": ""},
    }
    return kang_roy_spec(models_cfg, stage="kd")


def waves(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right zero-padded random waveforms (B, max N) and their lengths (B,)."""
    generator = torch.Generator().manual_seed(seed)
    wav = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wav[i, :n] = torch.randn(n, generator=generator) * 0.1
    return wav, torch.tensor(lengths)


def encoder_frames(samples: int) -> int:
    """Conv feature extractor arithmetic of the tiny config, written out."""
    for kernel, stride in zip((10, 4, 4), (5, 4, 4), strict=True):
        samples = (samples - kernel) // stride + 1
    return samples


# --------------------------------------------------------------------------- encoder


def test_pool_config_output_length() -> None:
    pool = PoolConfig(8, 4)
    assert pool.output_length(torch.tensor([7, 8, 11, 12, 50])).tolist() == [0, 1, 1, 2, 11]
    with pytest.raises(ValueError):
        PoolConfig(0, 4)


def test_encoder_shapes_and_lengths() -> None:
    torch.manual_seed(0)
    encoder = HubertPoolEncoder(HubertModel(tiny_hubert_config()), llm_hidden_size=48).eval()
    wav, lengths = waves([4000, 2500, 1100])
    speech, speech_lengths = encoder(wav, lengths)
    expected = [(encoder_frames(n) - 8) // 4 + 1 for n in lengths.tolist()]
    assert speech_lengths.tolist() == expected == [11, 6, 2]
    assert speech.shape == (3, 11, 48)
    assert speech[1, 6:].abs().sum() == 0 and speech[2, 2:].abs().sum() == 0
    assert encoder.min_samples() == 645 == min(n for n in range(1, 2000) if encoder_frames(n) >= 8)
    with pytest.raises(ValueError, match="too short"):
        encoder(*waves([4000, 644]))


def test_encoder_padding_invariance() -> None:
    torch.manual_seed(0)
    encoder = HubertPoolEncoder(HubertModel(tiny_hubert_config()), llm_hidden_size=48).eval()
    lengths = [4000, 2500, 1333]
    wav, wav_lengths = waves(lengths, seed=1)
    with torch.no_grad():
        batched, batched_lengths = encoder(wav, wav_lengths)
        for i, n in enumerate(lengths):
            alone, alone_lengths = encoder(wav[i : i + 1, :n], torch.tensor([n]))
            k = int(alone_lengths[0])
            assert int(batched_lengths[i]) == k
            torch.testing.assert_close(batched[i, :k], alone[0], atol=ATOL, rtol=0)


def test_spec_augment_and_layerdrop_follow_train_mode() -> None:
    torch.manual_seed(0)
    hubert = HubertModel(tiny_hubert_config(mask_time_prob=0.5, layerdrop=0.5))
    with torch.no_grad():
        hubert.masked_spec_embed.normal_()
    encoder = HubertPoolEncoder(hubert, llm_hidden_size=48)
    wav, lengths = waves([4000, 3000])
    encoder.eval()
    with torch.no_grad():
        first, _ = encoder(wav, lengths)
        second, _ = encoder(wav, lengths)
    torch.testing.assert_close(first, second)
    encoder.train()
    assert encoder.encoder.training
    speech, _ = encoder(wav, lengths)
    speech.sum().backward()
    # SpecAugment replaced frames by the learned mask embedding: it received a gradient.
    assert hubert.masked_spec_embed.grad is not None and hubert.masked_spec_embed.grad.abs().sum() > 0


# --------------------------------------------------------------------------- chat prompt on the LLM


def test_chat_ids_follow_the_reference(tiny_dirs) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llm"])
    prefix, suffix = chat_ids(tokenizer, CHAT)
    # reference: prefix_ids = tok(PREFIX).input_ids (with <s>), suffix_ids = tok(SUFFIX).input_ids[:, 1:]
    assert prefix == tokenizer("[|User|]").input_ids and prefix[0] == tokenizer.bos_token_id
    assert suffix == tokenizer("</s>[|Assistant|]").input_ids[1:]
    assert suffix[0] == tokenizer.eos_token_id and tokenizer.bos_token_id not in suffix
    assert text_ids(tokenizer, "the cat") == tokenizer("the cat").input_ids[1:]


def test_model_spec_builds_and_exports(spec, tmp_path) -> None:
    model, tokenizer = build_model(spec, with_ctc=False, with_llm=True)
    assert isinstance(model, KangRoy) and isinstance(model.llm, SpeechLLM)
    assert model.llm.pad_token_id == tokenizer.eos_token_id  # no pad token: pad = eos as the reference
    assert model.label_eos is False
    assert all(p.requires_grad for p in model.encoder.parameters())
    assert not any(p.requires_grad for p in model.llm.parameters())
    with pytest.raises(export.ModelDirError, match="no CTC head"):
        build_model(spec, with_ctc=True, with_llm=True)
    raw_only = dict(spec, speech_encoder=dict(spec["speech_encoder"], normalize_waveform=True))
    with pytest.raises(export.ModelDirError, match="normalize_waveform must be false"):
        build_model(raw_only, with_ctc=False, with_llm=True)
    s3prl_frames = dict(spec, speech_encoder=dict(spec["speech_encoder"], frame_count="s3prl"))
    with pytest.raises(export.ModelDirError, match="frame_count must be conv"):
        build_model(s3prl_frames, with_ctc=False, with_llm=True)

    with torch.no_grad():
        for p in model.encoder.embed_projection.parameters():
            p.add_(0.5)
    save_model_dir(model, spec, tmp_path / "kr")
    written = json.loads((tmp_path / "kr" / "speechllm.json").read_text())
    assert written["kind"] == "kang_roy" and written["pooling"] == {"kernel_size": 8, "stride": 4}
    loaded, _, loaded_spec = load_model_dir(tmp_path / "kr", with_ctc=False, with_llm=True)
    assert loaded_spec["chat"]["suffix"] == CHAT.suffix
    for key, value in model.trainable_state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    assert not any(k.startswith("llm.") for k in model.trainable_state_dict())


def test_unknown_kind_is_rejected(spec, tmp_path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "speechllm.json").write_text(json.dumps({**spec, "kind": "whisper_llm"}))
    with pytest.raises(export.ModelDirError, match="unknown model kind"):
        export.read_spec(tmp_path / "m")


def test_batched_chat_logits_equal_per_sample(spec) -> None:
    model, tokenizer = build_model(spec, with_ctc=False, with_llm=True)
    model.eval()
    wav, lengths = waves([4000, 1500], seed=2)
    instruction = text_ids(tokenizer, "summarize the following article")
    with torch.no_grad():
        speech = model.encode(wav, lengths)
        turns = [
            [speech[0]],
            [instruction, speech[1], text_ids(tokenizer, "the cat")],
        ]  # speech only / interleaved
        targets = [text_ids(tokenizer, "i am fine"), text_ids(tokenizer, "thank you")]
        batched = model(turns, targets)
        for i in range(2):
            alone = model(turns[i : i + 1], targets[i : i + 1])
            k = alone.logits.shape[1]
            torch.testing.assert_close(batched.logits[i, -k:], alone.logits[0], atol=ATOL, rtol=0)
            assert batched.labels[i, -k:].tolist() == alone.labels[0].tolist()
    # The sequence is <s>[|User|] + turn + </s>[|Assistant|] + response; labels: the response only (no eos).
    built = model.llm.build_inputs(model.chat_segments(turns[:1]), targets[:1], append_eos=model.label_eos)
    expected_length = len(model.prefix_ids) + speech[0].shape[0] + len(model.suffix_ids) + len(targets[0])
    assert built.inputs_embeds.shape[1] == expected_length
    assert built.labels[0][built.labels[0] != -100].tolist() == targets[0]
    embeds = model.llm.embed_tokens(torch.tensor(model.prefix_ids))
    torch.testing.assert_close(built.inputs_embeds[0, : len(model.prefix_ids)], embeds)
    speech_start = len(model.prefix_ids)
    torch.testing.assert_close(
        built.inputs_embeds[0, speech_start : speech_start + speech[0].shape[0]], speech[0]
    )


def test_gradient_reaches_hubert_not_llm(spec) -> None:
    model, tokenizer = build_model(spec, with_ctc=False, with_llm=True)
    model.train()
    assert model.encoder.encoder.training and not model.llm.lm.training
    wav, lengths = waves([3000, 2000], seed=3)
    out = model(
        [[s] for s in model.encode(wav, lengths)],
        [text_ids(tokenizer, "hello there"), text_ids(tokenizer, "i am")],
    )
    out.loss.backward()
    hubert = model.encoder.encoder
    for module in (hubert.feature_extractor, hubert.encoder.layers[0], model.encoder.embed_projection):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in model.llm.parameters())


def test_generate_returns_token_lists(spec) -> None:
    model, tokenizer = build_model(spec, with_ctc=False, with_llm=True)
    model.eval()
    wav, lengths = waves([3000, 2000], seed=4)
    speech = model.encode(wav, lengths)
    hyps = model.generate([[text_ids(tokenizer, "summarize"), speech[0]], [speech[1]]], max_new_tokens=4)
    assert len(hyps) == 2 and all(len(h) <= 4 and all(isinstance(t, int) for t in h) for h in hyps)


# --------------------------------------------------------------------------- 8-bit loading


def test_8bit_without_bitsandbytes_or_cuda_is_a_clear_error(spec, monkeypatch) -> None:
    llm_cfg = dict(spec["llm"], load_in_8bit=True)
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(export.torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        export.QuantizationUnavailable,
        match=r"load_in_8bit is true but the bitsandbytes package .* and a CUDA GPU are not",
    ):
        load_llm(llm_cfg)
    monkeypatch.setattr(export.torch.cuda, "is_available", lambda: True)
    with pytest.raises(
        export.QuantizationUnavailable, match=r"bitsandbytes package \(pip install bitsandbytes\) is"
    ):
        load_llm(llm_cfg)
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(export.torch.cuda, "is_available", lambda: False)
    with pytest.raises(export.QuantizationUnavailable, match="but a CUDA GPU is not available"):
        load_llm(llm_cfg)


def test_8bit_off_loads_in_the_configured_dtype(spec) -> None:
    lm, _ = load_llm(dict(spec["llm"], dtype="bfloat16"))
    assert lm.get_input_embeddings().weight.dtype == torch.bfloat16


def test_encoder_only_build_reads_no_llm_weights(spec, monkeypatch) -> None:
    """The untrained model's export builds the encoder without the LLM: its width comes from the config, so
    an 8-bit LLM setting (which needs a GPU) does not stop a CPU job, and the projection matches the LLM."""
    from speechllm.models.export import build_model

    monkeypatch.setattr(export, "load_llm", lambda *a, **k: pytest.fail("the LLM weights were loaded"))
    model, tokenizer = build_model(
        dict(spec, llm=dict(spec["llm"], load_in_8bit=True)), with_ctc=False, with_llm=False
    )
    assert model.llm is None and tokenizer.bos_token_id is not None
    lm = export.AutoModelForCausalLM.from_pretrained(spec["llm"]["name_or_path"])
    assert model.encoder.embed_projection.out_features == lm.get_input_embeddings().weight.shape[1]
