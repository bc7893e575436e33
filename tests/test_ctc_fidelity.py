"""Reference fidelity of the CTC stage and the frontend (issue #20): the CTC blank, the LID inter-CTC lengths,
MMS without language adapters and s3prl's frame count, each a config switch recorded in exported models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from test_speech_llm import make_wav2vec2
from transformers import Wav2Vec2Config, Wav2Vec2Model

from speechllm.evaluate.ctc_search import CTCSearch
from speechllm.evaluate.decode import ctc_transcribe
from speechllm.models.adaptor import AdaptorConfig, AdaptorOutput, SpeechAdaptor
from speechllm.models.bloomzmms import BloomzMMS
from speechllm.models.ctc_head import CTCHead
from speechllm.models.export import (
    ModelDirError,
    build_model,
    load_model_dir,
    load_speech_encoder,
    save_model_dir,
)
from speechllm.models.frontend import (
    SpeechFrontend,
    conv_frame_lengths,
    frame_lengths,
    lengths_to_mask,
    s3prl_frame_lengths,
    subtract_utterance_mean,
)
from speechllm.plan.planner import load_experiment
from speechllm.train.loop import StageConfig
from speechllm.train.objectives import ObjectiveModule

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5


def with_settings(spec: dict, blank_id: int | None = None, **encoder: object) -> dict:
    spec = json.loads(json.dumps(spec))
    spec["speech_encoder"].update(encoder)
    if blank_id is not None:
        spec["ctc_head"] = {"blank_id": blank_id}
    return spec


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("experiment", ["config/config.yaml", "config/experiments/bloomzmms.yaml"])
def test_configs_follow_the_reference_blank_and_mms(experiment: str) -> None:
    """Blank 0 and no MMS adapters by default and at paper scale; the two fixes the reference did not make
    (all LID frames, the encoder's own frame count) stay the defaults, their reference values are switches."""
    cfg = load_experiment(REPO / experiment)
    assert cfg["models"]["ctc_head"] == {"blank_id": 0}
    assert cfg["models"]["speech_encoder"]["language_adapters"] is False
    assert cfg["models"]["speech_encoder"]["frame_count"] == "conv"
    assert cfg["train"]["ctc"]["lid_ctc_lengths"] == "frames"


# --------------------------------------------------------------------------- CTC blank


def test_blank_id_comes_from_the_config_and_is_exported(tiny_spec, tmp_path) -> None:
    spec = with_settings(tiny_spec, blank_id=0, frame_count="s3prl", language_adapters=False)
    model, tok = build_model(spec, with_ctc=True, with_llm=False)
    assert tok.pad_token_id == 3 and model.ctc_blank_id == 0
    assert model.frontend.frame_count == "s3prl"
    save_model_dir(model, spec, tmp_path / "model")
    written = json.loads((tmp_path / "model" / "speechllm.json").read_text())
    assert written["ctc_head"] == {"blank_id": 0}
    assert written["speech_encoder"]["frame_count"] == "s3prl"
    assert written["speech_encoder"]["language_adapters"] is False
    loaded, _, _ = load_model_dir(tmp_path / "model", with_ctc=True, with_llm=False)
    assert loaded.ctc_blank_id == 0 and loaded.frontend.frame_count == "s3prl"


def test_model_dirs_without_the_keys_keep_their_training_settings(tiny_spec) -> None:
    """Directories exported before the switches existed trained with blank = <pad> and conv frames."""
    assert "ctc_head" not in tiny_spec and "frame_count" not in tiny_spec["speech_encoder"]
    model, tok = build_model(tiny_spec, with_ctc=True, with_llm=False)
    assert model.ctc_blank_id == tok.pad_token_id and model.frontend.frame_count == "conv"


def test_blank_outside_the_tokenizer_is_refused(tiny_spec) -> None:
    _, tok = build_model(tiny_spec, with_ctc=False, with_llm=False)
    with pytest.raises(ModelDirError, match=f"models.ctc_head.blank_id {len(tok)} is not a token id"):
        build_model(with_settings(tiny_spec, blank_id=len(tok)), with_ctc=True, with_llm=False)


def one_hot_output(paths: list[list[int]], vocab: int) -> AdaptorOutput:
    """Adaptor output whose CTC logits (under an identity CTC head) pick `paths[b][t]` at frame t."""
    frames = max(len(p) for p in paths)
    speech = torch.full((len(paths), frames, vocab), -5.0)
    for b, path in enumerate(paths):
        for t, token in enumerate(path):
            speech[b, t, token] = 5.0
    lengths = torch.tensor([len(p) for p in paths])
    return AdaptorOutput(speech, lengths, torch.zeros(len(paths), frames, 3), lengths)


def test_every_ctc_decoder_uses_the_configured_blank(tiny_spec, tmp_path, monkeypatch) -> None:
    """Greedy (dev CER through the objective), prefix beam search and `transcribe`'s decoding read the one
    configured blank: token 0 separates repeats and is dropped; <pad> (3) is an ordinary token."""
    model, tok = build_model(with_settings(tiny_spec, blank_id=0), with_ctc=True, with_llm=False)
    vocab = len(tok)
    model.ctc_head = CTCHead(vocab, vocab)
    with torch.no_grad():
        model.ctc_head.ctc_lo.weight.copy_(torch.eye(vocab))
    paths = [[5, 5, 0, 5, 9, 0, 3], [7, 0, 0, 8, 8]]
    expected = [[5, 5, 9, 3], [7, 8]]
    out = one_hot_output(paths, vocab)
    monkeypatch.setattr(model, "encode", lambda wav, lengths: out)
    assert model.ctc_decode(out) == expected

    class DevBatch:
        wav, wav_lengths, lid = torch.zeros(2, 1), torch.ones(2, dtype=torch.long), torch.tensor([1, 2])
        ctc_targets = expected
        records = [{}, {}]

    assert ObjectiveModule(model, "ctc")(DevBatch(), evaluate=True)["hyps"] == expected
    clip = tmp_path / "clip.wav"
    sf.write(str(clip), np.zeros(1600, dtype=np.float32), 16000)
    beam = CTCSearch("prefix_beam", beam_size=4, token_top_k=4)
    texts = ctc_transcribe(model, tok, [str(clip)] * 2, 16000, [None, None], torch.device("cpu"), beam)
    assert texts == [t.strip() for t in tok.batch_decode(expected, skip_special_tokens=True)]


def summed_ctc_loss(log_probs: torch.Tensor, flat: list[int], frames: torch.Tensor, lengths: list[int]):
    """ESPnet's CTC loss with torch's default blank 0: summed over the batch, divided by its size."""
    batch = len(lengths)
    total = F.ctc_loss(
        log_probs, torch.tensor(flat), frames, torch.tensor(lengths), reduction="sum", zero_infinity=True
    )
    return total / batch


def test_ctc_loss_uses_the_blank_and_refuses_it_as_a_target() -> None:
    torch.manual_seed(0)
    head = CTCHead(8, 12)
    x, lengths = torch.randn(2, 9, 8), torch.tensor([9, 7])
    targets = [[4, 5, 5], [3, 6]]  # 3 is <pad>: a label like any other once the blank is 0
    log_probs = head(x).log_softmax(-1).transpose(0, 1)
    expected = summed_ctc_loss(log_probs, [4, 5, 5, 3, 6], lengths, [3, 2])
    torch.testing.assert_close(head.loss(x, lengths, targets, blank_id=0), expected)
    with pytest.raises(ValueError, match="contains the blank id 3 .*models.ctc_head.blank_id"):
        head.loss(x, lengths, targets, blank_id=3)
    padded = torch.tensor([[4, 5, 5], [3, 6, 0]])  # padding may hold the blank
    torch.testing.assert_close(head.loss(x, lengths, padded, 0, torch.tensor([3, 2])), expected)


# --------------------------------------------------------------------------- LID inter-CTC lengths


def tiny_bloomzmms() -> BloomzMMS:
    torch.manual_seed(0)
    cfg = AdaptorConfig(
        input_dim=8,
        d_model=16,
        heads=2,
        linear_units=32,
        cgmlp_units=32,
        cgmlp_kernel=3,
        merge_kernel=3,
        num_blocks=2,
        interctc_layer=1,
        num_lid_classes=4,
        llm_hidden_size=12,
        dropout=0.0,
        pos_dropout=0.0,
        attn_dropout=0.0,
    )
    return BloomzMMS(torch.nn.Identity(), SpeechAdaptor(cfg).eval(), CTCHead(12, 20), None, ctc_blank_id=0)


@pytest.mark.parametrize("mode", ["frames", "halved"])
def test_lid_ctc_lengths_switch(mode: str) -> None:
    """`halved` = the reference: the post-encoder lengths floor(T1/2) halved again by the LID head's ratio, so
    the loss reads the first floor(T1/4) of the utterance's floor(T1/2) LID frames; `frames` reads them
    all."""
    model = tiny_bloomzmms()
    feat_lengths = torch.tensor([70, 45])
    out = model.adaptor(torch.randn(2, 70, 8), feat_lengths)
    t1 = model.adaptor.embed.output_length(feat_lengths)
    assert out.lid_lengths.tolist() == (t1 // 2).tolist() == out.speech_lengths.tolist()
    targets, lid = [[5, 6], [7]], torch.tensor([2, 3])
    _, lid_loss = model.ctc_losses(out, targets, lid, mode)
    read = out.lid_lengths if mode == "frames" else t1 // 4
    expected = summed_ctc_loss(out.lid_logits.log_softmax(-1).transpose(0, 1), [2, 2, 3], read, [2, 1])
    torch.testing.assert_close(lid_loss, expected)
    other = model.ctc_losses(out, targets, lid, "halved" if mode == "frames" else "frames")[1]
    assert not torch.allclose(lid_loss, other)

    class Batch:
        wav, wav_lengths, ctc_targets, records = None, None, targets, [{}, {}]

    Batch.lid = lid
    model.encode = lambda wav, lengths: out
    train_ctc = load_experiment(REPO / "config" / "config.yaml")["train"]["ctc"]
    stage = StageConfig.from_config(
        "ctc", dict(train_ctc, ctc_weight=0.0, interctc_weight=1.0, lid_ctc_lengths=mode)
    )
    objective = ObjectiveModule(
        model, "ctc", stage.ctc_weight, stage.interctc_weight, None, stage.lid_ctc_lengths
    )
    torch.testing.assert_close(objective(Batch())[0], expected)


def test_unknown_lid_ctc_lengths_names_the_key() -> None:
    with pytest.raises(ValueError, match="train.ctc.lid_ctc_lengths"):
        ObjectiveModule(tiny_bloomzmms(), "ctc", lid_ctc_lengths="quartered")


# --------------------------------------------------------------------------- MMS language adapters


def adapter_encoder(path) -> Wav2Vec2Model:
    """A tiny MMS-style Wav2Vec2 with per-layer attention adapters (as facebook/mms-1b-all's config),
    saved."""
    model = make_wav2vec2(adapter_attn_dim=4).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter_layer" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("language_adapters", [False, True])
def test_speech_encoder_language_adapters_switch(tmp_path, language_adapters: bool) -> None:
    with_adapters = adapter_encoder(tmp_path / "mms")
    enc_cfg = {
        "name_or_path": str(tmp_path / "mms"),
        "revision": "main",
        "normalize_waveform": True,
        "language_adapters": language_adapters,
    }
    encoder = load_speech_encoder(enc_cfg).eval()
    has_adapters = any("adapter_layer" in name for name, _ in encoder.named_parameters())
    assert has_adapters is language_adapters
    wav = torch.randn(1, 1200)
    with torch.no_grad():
        got = encoder(wav).last_hidden_state
        if language_adapters:
            torch.testing.assert_close(got, with_adapters(wav).last_hidden_state)
            return
        # Without adapters: exactly the plain encoder over the checkpoint's other weights (s3prl's model).
        plain = Wav2Vec2Model(
            Wav2Vec2Config(**{**with_adapters.config.to_dict(), "adapter_attn_dim": None})
        ).eval()
        state = {k: v for k, v in with_adapters.state_dict().items() if "adapter_layer" not in k}
        plain.load_state_dict(state, strict=True)
        torch.testing.assert_close(got, plain(wav).last_hidden_state)
        assert not torch.allclose(got, with_adapters(wav).last_hidden_state)


# --------------------------------------------------------------------------- s3prl frame count


def test_s3prl_frame_lengths_are_ceil_of_the_hop() -> None:
    config = Wav2Vec2Config()  # MMS / wav2vec 2.0: hop 320 samples, receptive field 400
    lengths = torch.tensor([16_000, 16_001, 16_080, 800, 400, 320, 1, 0])
    assert s3prl_frame_lengths(config, lengths).tolist() == [len(range(0, n, 320)) for n in lengths.tolist()]
    assert s3prl_frame_lengths(config, lengths).tolist() == [50, 51, 51, 3, 2, 1, 1, 0]
    assert conv_frame_lengths(config, lengths).tolist() == [49, 49, 50, 2, 1, 0, 0, 0]
    assert frame_lengths(config, lengths, "conv").tolist() == conv_frame_lengths(config, lengths).tolist()
    with pytest.raises(ValueError, match="models.speech_encoder.frame_count"):
        frame_lengths(config, lengths, "ceil")


def tiny_frontend(frame_count: str) -> SpeechFrontend:
    frontend = SpeechFrontend(
        make_wav2vec2(), out_dim=16, normalize_waveform=True, frame_count=frame_count
    ).eval()
    with torch.no_grad():
        frontend.layer_weights.normal_()
    return frontend


def s3prl_reference(frontend: SpeechFrontend, wav: torch.Tensor) -> torch.Tensor:
    """The reference frontend on one utterance, step by step as s3prl's S3PRLUpstream.forward and ESPnet's
    UtteranceMVN (s3prl/s3prl@v0.4.10:s3prl/nn/upstream.py): zero-pad to 800 samples if shorter, then
    `_match_length` to len(range(0, L, hop)) frames by repeating the last one, cut to (L - 1) // hop + 1."""
    length = wav.shape[1]
    padded = F.pad(wav, (0, max(0, 800 - length)))
    hidden = frontend.encode_hidden_states(padded, torch.tensor([padded.shape[1]]))  # (S, 1, T, D)
    expected = len(range(0, padded.shape[1], 20))
    if hidden.shape[2] < expected:
        hidden = torch.cat([hidden, hidden[:, :, -1:].repeat(1, 1, expected - hidden.shape[2], 1)], dim=2)
    hidden = hidden[:, :, : (length - 1) // 20 + 1]
    feats = torch.einsum("s,sbtd->btd", torch.softmax(frontend.layer_weights, 0), hidden)
    feats = subtract_utterance_mean(feats, torch.ones(feats.shape[:2], dtype=torch.bool))
    return frontend.proj(feats)[0]


@pytest.mark.parametrize("length", [1605, 1619, 1620, 500])
def test_s3prl_frame_count_matches_the_reference_frontend(length: int) -> None:
    """ceil(L/20) frames on a hop-20 encoder, the missing ones the last frame repeated and counted in the
    utterance mean; 500 samples are first zero-padded to 800 (s3prl's 0.05 s minimum)."""
    frontend = tiny_frontend("s3prl")
    wav = torch.randn(1, length)
    with torch.no_grad():
        feats, feat_lengths = frontend(wav, torch.tensor([length]))
        expected = s3prl_reference(frontend, wav)
    assert feat_lengths.tolist() == [(length - 1) // 20 + 1] and feats.shape[1] == expected.shape[0]
    torch.testing.assert_close(feats[0], expected, atol=ATOL, rtol=0)
    conv_feats, conv_lengths = tiny_frontend("conv")(wav, torch.tensor([length]))
    assert int(conv_lengths[0]) < int(feat_lengths[0])


def test_s3prl_frame_count_is_padding_invariant() -> None:
    frontend = tiny_frontend("s3prl")
    gen = torch.Generator().manual_seed(1)
    wav_lengths = torch.tensor([1700, 1619, 640, 410])
    wav = torch.randn(4, 1700, generator=gen)
    wav[1, 1619:], wav[2, 640:], wav[3, 410:] = 3.0, -2.0, 7.0  # garbage in the padding must not matter
    with torch.no_grad():
        feats, feat_lengths = frontend(wav, wav_lengths)
        assert feat_lengths.tolist() == [(n - 1) // 20 + 1 for n in wav_lengths.tolist()]
        for b, (n, t) in enumerate(zip(wav_lengths.tolist(), feat_lengths.tolist(), strict=True)):
            single, _ = frontend(wav[b : b + 1, :n], wav_lengths[b : b + 1])
            torch.testing.assert_close(feats[b, :t], single[0], atol=ATOL, rtol=0)
            assert (feats[b, t:] == 0).all()
    assert lengths_to_mask(feat_lengths, feats.shape[1]).sum() == feat_lengths.sum()


def test_ctc_head_keeps_the_stored_embedding_values(tiny_spec, tmp_path) -> None:
    """The CTC head is copied from the LLM's embeddings as stored (the reference loaded the LLM in fp32 to
    export them), not rounded to models.llm.dtype: an fp16-stored LLM under dtype bfloat16 gives the exact
    fp16 values."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(tiny_spec["llm"]["name_or_path"])
    weight = lm.get_input_embeddings().weight
    with torch.no_grad():  # 1 + k / 1024: fp16 holds them, bfloat16 (8 significant bits) does not
        weight.copy_(1 + (torch.arange(weight.numel()) % 7).view_as(weight) / 1024)
    stored = tmp_path / "llm-fp16"
    lm.half().save_pretrained(stored)
    AutoTokenizer.from_pretrained(tiny_spec["llm"]["name_or_path"]).save_pretrained(stored)
    spec = json.loads(json.dumps(tiny_spec))
    spec["llm"].update(name_or_path=str(stored), dtype="bfloat16")
    model, tok = build_model(spec, with_ctc=True, with_llm=False)
    expected = weight[: len(tok)].float()
    assert torch.equal(model.ctc_head.ctc_lo.weight, expected)
    assert not torch.equal(expected.bfloat16().float(), expected)  # bfloat16 would have rounded them
