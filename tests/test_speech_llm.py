"""Tests for the speech frontend, the CTC head and the SpeechLLM wrapper, on tiny random models (no
downloads)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
)

from speechllm.models.ctc_head import CTCHead
from speechllm.models.frontend import SpeechFrontend, conv_frame_lengths, lengths_to_mask, normalize_waveform
from speechllm.models.speech_llm import IGNORE_INDEX, SpeechLLM

VOCAB = 120
HIDDEN = 32
PAD_ID = 3
EOS_ID = 2
ATOL = 1e-5
LM_FAMILIES = ["bloom", "llama"]


def make_lm(family: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    if family == "bloom":
        config = BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4)
        lm = BloomForCausalLM(config)
    else:
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        lm = LlamaForCausalLM(config)
    return lm.float().eval()


def make_wav2vec2(seed: int = 0, **extra: object) -> Wav2Vec2Model:
    """MMS's stable-layer-norm layout at toy size (20-sample hop, 25-sample receptive field); `extra`
    config."""
    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        **extra,
    )
    return Wav2Vec2Model(config)


def random_ids(generator: torch.Generator, length: int) -> list[int]:
    """Token ids that avoid the pad/eos ids."""
    return torch.randint(4, VOCAB, (length,), generator=generator).tolist()


def make_batch(requires_grad: bool = False) -> tuple[list[list], list[list[int]], list[torch.Tensor]]:
    """Three prompts with different layouts and lengths, plus targets of different lengths."""
    gen = torch.Generator().manual_seed(1)
    speech = [torch.randn(t, HIDDEN, generator=gen).requires_grad_(requires_grad) for t in (5, 2, 3, 4)]
    segments = [
        [random_ids(gen, 3), speech[0], random_ids(gen, 2)],
        [random_ids(gen, 1), speech[1], random_ids(gen, 4)],
        [random_ids(gen, 2), speech[2], random_ids(gen, 1), speech[3], random_ids(gen, 2)],
    ]
    targets = [random_ids(gen, 4), random_ids(gen, 1), random_ids(gen, 6)]
    return segments, targets, speech


# ---------------------------------------------------------------------------------------------- SpeechLLM


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_build_inputs_layout(family: str) -> None:
    model = SpeechLLM(make_lm(family), PAD_ID, EOS_ID)
    segments, targets, _ = make_batch()
    built = model.build_inputs(segments, targets)
    prompt_lengths = [10, 7, 12]
    lengths = [p + len(t) for p, t in zip(prompt_lengths, targets, strict=True)]
    max_length = max(lengths)
    assert built.inputs_embeds.shape == (3, max_length, HIDDEN)
    assert built.prompt_lengths.tolist() == prompt_lengths
    assert built.target_lengths.tolist() == [len(t) for t in targets]
    pad_embedding = model.lm.get_input_embeddings().weight[PAD_ID]
    for b, length in enumerate(lengths):
        num_pad = max_length - length
        assert built.attention_mask[b].tolist() == [0] * num_pad + [1] * length
        assert built.position_ids[b].tolist() == [0] * num_pad + list(range(length))
        assert torch.equal(built.inputs_embeds[b, :num_pad], pad_embedding.expand(num_pad, -1))
        expected = [IGNORE_INDEX] * (max_length - len(targets[b]) - 1) + targets[b] + [EOS_ID]
        assert built.labels[b].tolist() == expected
    # The speech vectors and the embedded target tokens sit where expected (sample 0, 3 prefix ids first).
    num_pad0 = max_length - lengths[0]
    assert torch.equal(built.inputs_embeds[0, num_pad0 + 3 : num_pad0 + 8], segments[0][1])
    target_embeds = model.lm.get_input_embeddings()(torch.tensor(targets[0]))
    assert torch.equal(built.inputs_embeds[0, -len(targets[0]) :], target_embeds)
    assert built.label_span == max(len(t) for t in targets) + 1


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_batched_logits_and_loss_match_single(family: str) -> None:
    model = SpeechLLM(make_lm(family), PAD_ID, EOS_ID)
    segments, targets, _ = make_batch()
    with torch.no_grad():
        built = model.build_inputs(segments, targets)
        batch_logits = model.lm_logits(built)
        batch_out = model(segments, targets)
        total_ce, total_tokens, total_correct = 0.0, 0, 0
        for b in range(len(segments)):
            single = model.build_inputs([segments[b]], [targets[b]])
            single_logits = model.lm_logits(single)[0]
            length = single_logits.shape[0]
            torch.testing.assert_close(batch_logits[b, -length:], single_logits, atol=ATOL, rtol=0)
            # Hand-built reference CE: the last prompt position predicts target[0], the last position eos.
            prompt_length = int(single.prompt_lengths[0])
            predicted = torch.tensor(targets[b] + [EOS_ID])
            scored = single_logits[prompt_length - 1 :].float()
            total_ce += F.cross_entropy(scored, predicted, reduction="sum").item()
            total_tokens += len(predicted)
            total_correct += int((scored.argmax(-1) == predicted).sum())
            single_out = model([segments[b]], [targets[b]])
            assert single_out.loss.item() == pytest.approx(
                F.cross_entropy(scored, predicted, reduction="sum").item(), abs=ATOL
            )
    assert batch_out.loss.item() == pytest.approx(total_ce / len(segments), abs=ATOL)
    assert int(batch_out.num_tokens) == total_tokens
    assert int(batch_out.num_correct) == total_correct
    assert batch_out.logits.shape == (3, built.label_span, VOCAB)
    assert batch_out.loss.dtype == torch.float32


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_gradients_reach_speech_with_checkpointing(family: str) -> None:
    lm = make_lm(family)
    segments, targets, speech = make_batch(requires_grad=True)
    reference = SpeechLLM(copy.deepcopy(lm), PAD_ID, EOS_ID).train()
    reference(segments, targets).loss.backward()
    reference_grads = [s.grad.clone() for s in speech]
    for s in speech:
        s.grad = None

    model = SpeechLLM(lm, PAD_ID, EOS_ID, gradient_checkpointing=True)  # nn.Module starts in training mode
    assert model.training and not model.lm.training
    assert all(not m.training for m in model.lm.modules() if isinstance(m, torch.nn.Dropout))
    layers = model._checkpointed_layers()
    assert layers
    calls = []
    for layer in layers:
        inner = layer._gradient_checkpointing_func
        assert inner.keywords["use_reentrant"] is False

        def counting(*args, _inner=inner, **kwargs):
            calls.append(1)
            return _inner(*args, **kwargs)

        layer._gradient_checkpointing_func = counting
    loss = model(segments, targets).loss
    loss.backward()
    assert len(calls) == len(layers)
    for s, ref in zip(speech, reference_grads, strict=True):
        assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
        torch.testing.assert_close(s.grad, ref, atol=ATOL, rtol=0)
    assert all(p.grad is None for p in model.lm.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    # Back in eval mode, the layers are not checkpointed.
    model.eval()
    assert all(not layer.training for layer in layers)


@pytest.mark.parametrize("family", LM_FAMILIES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_batched_matches_single(family: str, num_beams: int) -> None:
    model = SpeechLLM(make_lm(family), PAD_ID, EOS_ID)
    segments, _, _ = make_batch()
    max_new_tokens = 6
    batched = model.generate(segments, max_new_tokens=max_new_tokens, num_beams=num_beams)
    singles = [model.generate([s], max_new_tokens=max_new_tokens, num_beams=num_beams)[0] for s in segments]
    assert batched == singles
    assert all(0 < len(h) <= max_new_tokens for h in batched)
    assert all(EOS_ID not in h and (not h or h[-1] != PAD_ID) for h in batched)


@pytest.mark.parametrize("family", LM_FAMILIES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_unfinished_hypotheses_lose_their_last_token_as_the_reference(family: str, num_beams: int) -> None:
    """`drop_last_token` cuts the last token of a sequence that ran out of budget (the reference's
    `yseq[1:-1]`); a sequence that ended with eos keeps all its tokens either way."""
    lm = make_lm(family)
    segments, _, _ = make_batch()
    budget = 4
    kept = SpeechLLM(lm, PAD_ID, EOS_ID).generate(segments, max_new_tokens=budget, num_beams=num_beams)
    unfinished = [k for k, h in enumerate(kept) if len(h) == budget]  # budget tokens, none of them eos
    assert unfinished
    dropped = SpeechLLM(lm, PAD_ID, EOS_ID).generate(
        segments, budget, num_beams=num_beams, unfinished_hypotheses="drop_last_token"
    )
    assert dropped == [h[:-1] if k in unfinished else h for k, h in enumerate(kept)]
    # With its greedy first token as eos, a prompt finishes at once: nothing is dropped.
    first = SpeechLLM(lm, PAD_ID, EOS_ID).generate(segments[:1], 1)[0][0]
    finished = SpeechLLM(lm, PAD_ID, first)
    for mode in ("keep", "drop_last_token"):
        assert finished.generate(segments[:1], budget, unfinished_hypotheses=mode) == [[]]
    with pytest.raises(ValueError, match="evaluate.unfinished_hypotheses"):
        finished.generate(segments[:1], budget, unfinished_hypotheses="drop")


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_greedy_generate_matches_teacher_forced_argmax(family: str) -> None:
    """Positions during cached decoding agree with the full-sequence forward pass."""
    model = SpeechLLM(make_lm(family), PAD_ID, EOS_ID)
    segments, _, _ = make_batch()
    hyps = model.generate(segments, max_new_tokens=5)
    with torch.no_grad():
        built = model.build_inputs(segments, hyps, append_eos=False)
        logits = model.lm_logits(built)
    for b, hyp in enumerate(hyps):
        positions = built.target_mask[b]
        assert logits[b, positions].argmax(-1).tolist() == hyp


TOKENIZER_ROWS = 100  # fewer ids than the LM head's VOCAB rows, as BLOOMZ's tokenizer (250,680 of 250,880)


def within_tokenizer(ids: list[int]) -> list[int]:
    return [4 + i % (TOKENIZER_ROWS - 4) for i in ids]


@pytest.mark.parametrize("family", LM_FAMILIES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_output_rows_equal_an_lm_resized_to_the_tokenizer(family: str, num_beams: int) -> None:
    """`output_rows` scores and decodes as the reference's `resize_token_embeddings(len(tokenizer))` model."""
    segments, targets, _ = make_batch()
    segments = [[s if isinstance(s, torch.Tensor) else within_tokenizer(s) for s in p] for p in segments]
    targets = [within_tokenizer(t) for t in targets]
    lm = make_lm(family)
    with (
        torch.no_grad()
    ):  # make the rows past the tokenizer win: they point along the LM's final hidden states
        built = SpeechLLM(lm, PAD_ID, EOS_ID).build_inputs(segments, targets)
        hidden = lm(
            inputs_embeds=built.inputs_embeds, attention_mask=built.attention_mask, output_hidden_states=True
        ).hidden_states[-1][built.attention_mask.bool()]
        lm.get_output_embeddings().weight[TOKENIZER_ROWS:] = 50 * F.normalize(hidden.mean(0), dim=0)
    resized = copy.deepcopy(lm)
    resized.resize_token_embeddings(TOKENIZER_ROWS)
    full = SpeechLLM(lm, PAD_ID, EOS_ID)
    masked = SpeechLLM(copy.deepcopy(lm), PAD_ID, EOS_ID, output_rows=TOKENIZER_ROWS)
    reference = SpeechLLM(resized, PAD_ID, EOS_ID)
    with torch.no_grad():
        losses = [m(segments, targets).loss.item() for m in (full, masked, reference)]
    assert losses[1] == pytest.approx(losses[2], abs=ATOL) and abs(losses[0] - losses[2]) > 1.0
    hyps = [m.generate(segments, max_new_tokens=4, num_beams=num_beams) for m in (full, masked, reference)]
    assert any(
        i >= TOKENIZER_ROWS for h in hyps[0] for i in h
    )  # the unmasked LM emits rows past the tokenizer
    assert hyps[1] == hyps[2]


def test_output_rows_beyond_the_head_are_refused() -> None:
    with pytest.raises(ValueError, match="output_rows=121 must be in 1..120"):
        SpeechLLM(make_lm("bloom"), PAD_ID, EOS_ID, output_rows=VOCAB + 1)


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_generate_in_train_mode_with_checkpointing(family: str) -> None:
    model = SpeechLLM(make_lm(family), PAD_ID, EOS_ID, gradient_checkpointing=True)
    segments, _, _ = make_batch()
    expected = model.eval().generate(segments, max_new_tokens=4)
    model.train()
    assert model.generate(segments, max_new_tokens=4) == expected
    assert all(layer.training for layer in model._checkpointed_layers())


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_option_logprobs_match_single(family: str) -> None:
    model = SpeechLLM(make_lm(family), PAD_ID, EOS_ID)
    segments, _, _ = make_batch()
    gen = torch.Generator().manual_seed(2)
    options = [random_ids(gen, 1), random_ids(gen, 3), random_ids(gen, 2)]
    scores = model.option_logprobs(segments, options)
    assert scores.shape == (len(segments), len(options))
    expected = torch.zeros(len(segments), len(options))
    with torch.no_grad():
        for b, sample in enumerate(segments):
            prompt_logits = model.lm_logits(model.build_inputs([sample]))[0]
            prompt_length = prompt_logits.shape[0]
            for k, option in enumerate(options):
                full = model.build_inputs([sample], [option], append_eos=False)
                log_probs = model.lm_logits(full)[0].float().log_softmax(-1)
                expected[b, k] = sum(log_probs[prompt_length - 1 + i, tok] for i, tok in enumerate(option))
                # The first option token's score depends on the prompt only.
                first = prompt_logits[-1].float().log_softmax(-1)[option[0]]
                assert log_probs[prompt_length - 1, option[0]].item() == pytest.approx(first.item(), abs=ATOL)
    torch.testing.assert_close(scores, expected, atol=ATOL, rtol=0)
    assert torch.equal(scores.argsort(dim=-1), expected.argsort(dim=-1))


def test_build_inputs_rejects_empty_prompt() -> None:
    model = SpeechLLM(make_lm("bloom"), PAD_ID, EOS_ID)
    with pytest.raises(ValueError):
        model.build_inputs([[[]]], [[5, 6]])
    with pytest.raises(ValueError):
        model.build_inputs([[torch.zeros(2, HIDDEN + 1)]], [[5]])


# ---------------------------------------------------------------------------------------------- CTC head


def test_ctc_head_from_embeddings() -> None:
    embeddings = torch.randn(VOCAB + 8, HIDDEN)
    head = CTCHead.from_embeddings(embeddings, VOCAB)
    assert head.ctc_lo.weight.shape == (VOCAB, HIDDEN)
    assert torch.equal(head.ctc_lo.weight, embeddings[:VOCAB])
    assert head.ctc_lo.bias is None
    assert not any(p.requires_grad for p in head.parameters())
    x = torch.randn(2, 7, HIDDEN)
    torch.testing.assert_close(head(x), x @ embeddings[:VOCAB].T)
    with pytest.raises(ValueError):
        CTCHead.from_embeddings(embeddings, VOCAB + 9)


def test_ctc_loss() -> None:
    torch.manual_seed(0)
    head = CTCHead.from_embeddings(torch.randn(VOCAB, HIDDEN), VOCAB)
    x = torch.randn(3, 9, HIDDEN, requires_grad=True)
    x_lengths = torch.tensor([9, 6, 2])
    targets = [[5, 6, 7], [8, 8], [9, 10, 11, 12]]  # the last one cannot fit into 2 frames -> zeroed
    loss = head.loss(x, x_lengths, targets, blank_id=PAD_ID)
    log_probs = head(x).float().log_softmax(-1)
    per_utt = [
        F.ctc_loss(
            log_probs[b, : x_lengths[b]],
            torch.tensor(t),
            x_lengths[b : b + 1],
            torch.tensor([len(t)]),
            blank=PAD_ID,
            reduction="sum",
            zero_infinity=True,
        )
        for b, t in enumerate(targets)
    ]
    assert per_utt[2].item() == 0.0
    assert loss.item() == pytest.approx(sum(p.item() for p in per_utt) / 3, rel=1e-5)
    padded = torch.tensor([[5, 6, 7, 0], [8, 8, 0, 0], [9, 10, 11, 12]])
    loss_padded = head.loss(x, x_lengths, padded, blank_id=PAD_ID, target_lengths=torch.tensor([3, 2, 4]))
    assert loss_padded.item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert head.ctc_lo.weight.grad is None


def test_ctc_greedy_decode() -> None:
    blank = PAD_ID
    paths = torch.tensor(
        [
            [blank, 5, 5, blank, 5, 7, 7, blank, 9, 9],
            [6, 6, 6, blank, blank, 6, 8, 8, 4, 4],  # only the first 8 frames are valid
            [blank] * 10,
        ]
    )
    logits = F.one_hot(paths, VOCAB).float()
    hyps = CTCHead.greedy_decode(logits, torch.tensor([10, 8, 10]), blank_id=blank)
    assert hyps == [[5, 5, 7, 9], [6, 6, 8], []]


# ---------------------------------------------------------------------------------------------- frontend


def test_normalize_waveform_matches_layer_norm() -> None:
    wav = torch.randn(2, 50)
    lengths = torch.tensor([50, 31])
    out = normalize_waveform(wav, lengths_to_mask(lengths, 50), eps=1e-5)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[b, :n], F.layer_norm(wav[b, :n], (n,), eps=1e-5))
        assert (out[b, n:] == 0).all()


def test_frontend_init_and_modes() -> None:
    encoder = make_wav2vec2()
    frontend = SpeechFrontend(encoder, out_dim=16, normalize_waveform=True)
    assert frontend.layer_weights.shape == (encoder.config.num_hidden_layers + 1,)
    assert torch.equal(frontend.layer_weights.detach(), torch.zeros_like(frontend.layer_weights))
    assert not any(p.requires_grad for p in frontend.encoder.parameters())
    trainable = {name for name, p in frontend.named_parameters() if p.requires_grad}
    assert trainable == {"layer_weights", "proj.weight", "proj.bias"}
    frontend.train()
    assert frontend.training and frontend.proj.training
    assert not any(m.training for m in frontend.encoder.modules())
    frontend.eval()
    assert not frontend.training


def test_conv_frame_lengths_follow_the_feature_extractor() -> None:
    """Config arithmetic = frames the conv stack really outputs, and fairseq's 49 frames per second of
    16 kHz."""
    config = (
        Wav2Vec2Config()
    )  # MMS / wav2vec 2.0 feature extractor: 7 layers, 20 ms hop, 25 ms receptive field
    assert conv_frame_lengths(config, torch.tensor([16_000, 400, 399, 0])).tolist() == [49, 1, 0, 0]
    encoder = make_wav2vec2()
    lengths = torch.tensor([1600, 1100, 700, 401])
    with torch.no_grad():
        for n, frames in zip(
            lengths.tolist(), conv_frame_lengths(encoder.config, lengths).tolist(), strict=True
        ):
            assert encoder.feature_extractor(torch.randn(1, n)).shape[-1] == frames
    with pytest.raises(ValueError, match="add_adapter"):
        conv_frame_lengths(Wav2Vec2Config(add_adapter=True), lengths)


@pytest.mark.parametrize("normalize", [True, False])
def test_frontend_padding_invariance(normalize: bool) -> None:
    frontend = SpeechFrontend(make_wav2vec2(), out_dim=16, normalize_waveform=normalize).train()
    with torch.no_grad():
        frontend.layer_weights.normal_()
    gen = torch.Generator().manual_seed(3)
    wav_lengths = torch.tensor([1600, 1100, 700])
    wav = torch.randn(3, 1600, generator=gen) * 0.3 + 0.1
    wav[1, 1100:] = 5.0  # garbage in the padding must not matter
    wav[2, 700:] = -3.0
    feats, feat_lengths = frontend(wav, wav_lengths)
    assert feat_lengths.tolist() == conv_frame_lengths(frontend.encoder.config, wav_lengths).tolist()
    assert feats.shape == (3, int(feat_lengths.max()), 16)
    for b, (n, t) in enumerate(zip(wav_lengths.tolist(), feat_lengths.tolist(), strict=True)):
        single, single_lengths = frontend(wav[b : b + 1, :n], wav_lengths[b : b + 1])
        assert single_lengths.tolist() == [t]
        torch.testing.assert_close(feats[b, :t], single[0], atol=ATOL, rtol=0)
        assert (feats[b, t:] == 0).all()
    feats.sum().backward()
    assert frontend.layer_weights.grad is not None and frontend.layer_weights.grad.abs().sum() > 0
    assert all(p.grad is None for p in frontend.encoder.parameters())


def test_frontend_hidden_states_end_with_final_layer_norm() -> None:
    frontend = SpeechFrontend(make_wav2vec2(), out_dim=16, normalize_waveform=False)
    wav = torch.randn(1, 800)
    lengths = torch.tensor([800])
    stacked = frontend.encode_hidden_states(wav, lengths)
    assert stacked.shape[0] == frontend.num_hidden_states
    with torch.no_grad():
        last = frontend.encoder(wav, attention_mask=torch.ones_like(wav, dtype=torch.long)).last_hidden_state
    torch.testing.assert_close(stacked[-1], last)
