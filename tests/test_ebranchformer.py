"""Tests of the speech adaptor: Conv2dSubsampling, rel-pos attention, E-Branchformer, LID conditioning."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from speechllm.models import subsampling
from speechllm.models.adaptor import (
    AdaptorConfig,
    SpeechAdaptor,
    lengths_to_mask,
    lid_class_count,
    upsample_nearest,
)
from speechllm.models.attention import RelPositionMultiHeadedAttention, rel_shift
from speechllm.models.ebranchformer import ConvolutionalGatingMLP, EBranchformerLayer
from speechllm.models.espnet_reference import ESPNET_ENCODER_MODULE, OverlayLidCtc, copy_encoder_weights
from speechllm.models.espnet_reference import espnet_encoder as build_espnet_encoder
from speechllm.models.positional import RelPositionalEncoding
from speechllm.models.subsampling import Conv2dSubsampling

ATOL = 1e-5

SMALL = AdaptorConfig(
    input_dim=20,
    d_model=32,
    heads=2,
    linear_units=64,
    cgmlp_units=64,
    cgmlp_kernel=5,
    merge_kernel=3,
    num_blocks=3,
    interctc_layer=2,
    num_lid_classes=7,
    llm_hidden_size=48,
)


def small_layer() -> EBranchformerLayer:
    return EBranchformerLayer(
        d_model=SMALL.d_model,
        num_heads=SMALL.heads,
        linear_units=SMALL.linear_units,
        cgmlp_units=SMALL.cgmlp_units,
        cgmlp_kernel=SMALL.cgmlp_kernel,
        merge_kernel=SMALL.merge_kernel,
        dropout=SMALL.dropout,
        attn_dropout=SMALL.attn_dropout,
        layer_norm_eps=SMALL.layer_norm_eps,
    )


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (incl. LayerNorm gains/biases) a non-trivial random value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def depthwise_conv_by_hand(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """'Same' depthwise conv over time written out: x (B, T, C), weight (C, 1, K), bias (C,) -> (B, T, C)."""
    kernel = weight.size(-1)
    pad = (kernel - 1) // 2
    padded = torch.cat([x.new_zeros(x.size(0), pad, x.size(2)), x, x.new_zeros(x.size(0), pad, x.size(2))], 1)
    out = bias.expand_as(x).clone()
    for k in range(kernel):
        out = out + weight[:, 0, k] * padded[:, k : k + x.size(1)]
    return out


def sinusoid_by_hand(distance: float, d_model: int) -> torch.Tensor:
    values = []
    for k in range(d_model // 2):
        angle = distance / (10000.0 ** (2 * k / d_model))
        values += [math.sin(angle), math.cos(angle)]
    return torch.tensor(values)


# --------------------------------------------------------------------------- subsampling / positions


@pytest.mark.parametrize("frames", [7, 8, 9, 10, 11, 50, 101])
def test_subsampling_shape_and_lengths(frames: int) -> None:
    module = Conv2dSubsampling(SMALL.input_dim, SMALL.d_model)
    lengths = torch.tensor([frames, max(frames - 3, 0), 7, 3])
    out, out_lengths = module(torch.randn(4, frames, SMALL.input_dim), lengths)
    assert out.shape == (4, ((frames - 1) // 2 - 1) // 2, SMALL.d_model)
    expected = [max(((int(n) - 1) // 2 - 1) // 2, 0) for n in lengths]
    assert out_lengths.tolist() == expected
    assert module.out.in_features == SMALL.d_model * (((SMALL.input_dim - 1) // 2 - 1) // 2)


def test_subsampling_flattens_channel_major() -> None:
    module = Conv2dSubsampling(SMALL.input_dim, SMALL.d_model)
    x = torch.randn(2, 15, SMALL.input_dim)
    hidden = module.conv(x.unsqueeze(1))  # (B, C, T1, F1)
    batch, channels, frames, features = hidden.shape
    flat = torch.empty(batch, frames, channels * features)
    for c in range(channels):
        flat[:, :, c * features : (c + 1) * features] = hidden[:, c]
    out, _ = module(x, torch.tensor([15, 15]))
    torch.testing.assert_close(out, module.out(flat), atol=ATOL, rtol=0)


def test_rel_positional_encoding_values() -> None:
    d_model, frames = 8, 5
    module = RelPositionalEncoding(d_model, dropout=0.1).eval()
    x = torch.randn(2, frames, d_model)
    scaled, pos_emb = module(x)
    torch.testing.assert_close(scaled, x * math.sqrt(d_model))
    assert pos_emb.shape == (1, 2 * frames - 1, d_model)
    for m in range(2 * frames - 1):
        torch.testing.assert_close(
            pos_emb[0, m], sinusoid_by_hand(frames - 1 - m, d_model), atol=ATOL, rtol=0
        )


# --------------------------------------------------------------------------- attention


def test_rel_shift_matches_direct_indexing() -> None:
    batch, heads, length = 2, 3, 6
    scores = torch.randn(batch, heads, length, 2 * length - 1)
    expected = torch.empty(batch, heads, length, length)
    for i in range(length):
        for j in range(length):
            expected[:, :, i, j] = scores[:, :, i, length - 1 - i + j]
    torch.testing.assert_close(rel_shift(scores), expected, atol=0, rtol=0)


def test_rel_pos_attention_matches_formula() -> None:
    torch.manual_seed(0)
    heads, d_model, length = 2, 8, 5
    d_k = d_model // heads
    attn = RelPositionMultiHeadedAttention(heads, d_model, dropout=0.1).eval()
    randomize_(attn)
    x = torch.randn(2, length, d_model)
    pos_emb = torch.stack([sinusoid_by_hand(length - 1 - m, d_model) for m in range(2 * length - 1)])[None]
    mask = lengths_to_mask(torch.tensor([length, 3]), length)

    q = attn.linear_q(x).view(2, length, heads, d_k)
    k = attn.linear_k(x).view(2, length, heads, d_k)
    v = attn.linear_v(x).view(2, length, heads, d_k)
    expected = torch.zeros(2, length, heads, d_k)
    for b in range(2):
        for h in range(heads):
            for i in range(length):
                scores = torch.full((length,), -math.inf)
                for j in range(int(mask[b].sum())):
                    p = attn.linear_pos(sinusoid_by_hand(i - j, d_model)).view(heads, d_k)[h]
                    content = (q[b, i, h] + attn.pos_bias_u[h]) @ k[b, j, h]
                    position = (q[b, i, h] + attn.pos_bias_v[h]) @ p
                    scores[j] = (content + position) / math.sqrt(d_k)
                expected[b, i, h] = torch.softmax(scores, 0) @ v[b, :, h]
    expected = attn.linear_out(expected.reshape(2, length, d_model))
    torch.testing.assert_close(attn(x, x, x, pos_emb, mask), expected, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- E-Branchformer


def test_cgmlp_matches_formula() -> None:
    torch.manual_seed(0)
    units, kernel = SMALL.cgmlp_units, SMALL.cgmlp_kernel
    cgmlp = ConvolutionalGatingMLP(SMALL.d_model, units, kernel, 0.1, SMALL.layer_norm_eps).eval()
    randomize_(cgmlp)
    x = torch.randn(2, 9, SMALL.d_model)

    w1, b1 = cgmlp.channel_proj1[0].weight, cgmlp.channel_proj1[0].bias
    hidden = F.gelu(x @ w1.T + b1)
    value, gate = hidden[..., : units // 2], hidden[..., units // 2 :]
    norm = cgmlp.csgu.norm
    mean = gate.mean(-1, keepdim=True)
    var = gate.var(-1, unbiased=False, keepdim=True)
    gate = (gate - mean) / torch.sqrt(var + SMALL.layer_norm_eps) * norm.weight + norm.bias
    gate = depthwise_conv_by_hand(gate, cgmlp.csgu.conv.weight, cgmlp.csgu.conv.bias)
    expected = (value * gate) @ cgmlp.channel_proj2.weight.T + cgmlp.channel_proj2.bias

    torch.testing.assert_close(cgmlp(x), expected, atol=ATOL, rtol=0)
    assert cgmlp.csgu.conv.groups == units // 2 and cgmlp.csgu.conv.weight.shape == (units // 2, 1, kernel)


def test_layer_matches_formula() -> None:
    torch.manual_seed(0)
    layer = small_layer().eval()
    randomize_(layer)
    x = torch.randn(2, 7, SMALL.d_model)
    _, pos_emb = RelPositionalEncoding(SMALL.d_model, 0.0)(x)

    h = x + 0.5 * layer.feed_forward_macaron(layer.norm_ff_macaron(x))
    a = layer.norm_mha(h)
    x_att = layer.attn(a, a, a, pos_emb, None)
    x_mlp = layer.cgmlp(layer.norm_mlp(h))
    concat = torch.cat([x_att, x_mlp], -1)
    merged = concat + depthwise_conv_by_hand(
        concat, layer.depthwise_conv_fusion.weight, layer.depthwise_conv_fusion.bias
    )
    h = h + layer.merge_proj(merged)
    ff = layer.feed_forward
    h = h + 0.5 * ff.w_2(F.silu(ff.w_1(layer.norm_ff(h))))
    expected = layer.norm_final(h)

    torch.testing.assert_close(layer(x, pos_emb, None), expected, atol=ATOL, rtol=0)
    assert layer.depthwise_conv_fusion.groups == 2 * SMALL.d_model


def test_layer_norms_use_espnet_epsilon() -> None:
    norms = [m for m in SpeechAdaptor(SMALL).modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(norm.eps == 1e-12 for norm in norms)


# --------------------------------------------------------------------------- adaptor


def test_upsample_nearest_matches_interpolate_without_padding() -> None:
    for target in range(2, 120):
        source = target // 2
        x = torch.randn(2, source, 4)
        lengths = torch.full((2,), source)
        ours = upsample_nearest(x, lengths, torch.full((2,), target), target)
        reference = F.interpolate(x.transpose(1, 2), target).transpose(1, 2)
        torch.testing.assert_close(ours, reference, atol=0, rtol=0)


def test_adaptor_shapes_and_lengths() -> None:
    torch.manual_seed(0)
    model = SpeechAdaptor(SMALL)
    feat_lengths = torch.tensor([101, 64, 30])
    out = model(torch.randn(3, 101, SMALL.input_dim), feat_lengths)
    t1 = ((feat_lengths - 1) // 2 - 1) // 2
    assert out.speech.shape == (3, 24 // 2, SMALL.llm_hidden_size)
    assert out.lid_logits.shape == (3, 24 // 2, SMALL.num_lid_classes)
    assert out.speech_lengths.tolist() == (t1 // 2).tolist()
    assert out.lid_lengths.tolist() == (t1 // 2).tolist()


def test_adaptor_rejects_too_short_input() -> None:
    model = SpeechAdaptor(SMALL)
    shortest = model.min_input_frames()
    assert shortest == 11
    model(torch.randn(1, shortest, SMALL.input_dim), torch.tensor([shortest]))
    with pytest.raises(ValueError, match="too short"):
        model(torch.randn(1, shortest - 1, SMALL.input_dim), torch.tensor([shortest - 1]))


def test_padding_invariance() -> None:
    torch.manual_seed(0)
    model = SpeechAdaptor(SMALL).eval()
    # T1 = 23, 15, 10: the shorter utterances have odd and even 80 ms lengths.
    lengths = [97, 65, 45]
    utterances = [torch.randn(n, SMALL.input_dim) for n in lengths]
    batch = torch.randn(len(lengths), max(lengths), SMALL.input_dim) * 10.0  # garbage in the padding
    for index, utterance in enumerate(utterances):
        batch[index, : utterance.size(0)] = utterance
    with torch.no_grad():
        batched = model(batch, torch.tensor(lengths))
        for index, utterance in enumerate(utterances):
            alone = model(utterance[None], torch.tensor([utterance.size(0)]))
            n_speech, n_lid = int(alone.speech_lengths[0]), int(alone.lid_lengths[0])
            assert int(batched.speech_lengths[index]) == n_speech == alone.speech.size(1)
            assert int(batched.lid_lengths[index]) == n_lid == alone.lid_logits.size(1)
            torch.testing.assert_close(batched.speech[index, :n_speech], alone.speech[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(
                batched.lid_logits[index, :n_lid], alone.lid_logits[0], atol=ATOL, rtol=0
            )


def test_dropout_active_only_in_training() -> None:
    torch.manual_seed(0)
    model = SpeechAdaptor(SMALL)
    feats, lengths = torch.randn(2, 40, SMALL.input_dim), torch.tensor([40, 33])
    model.eval()
    torch.testing.assert_close(model(feats, lengths).speech, model(feats, lengths).speech)
    model.train()
    assert not torch.allclose(model(feats, lengths).speech, model(feats, lengths).speech)


def test_gradient_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = SpeechAdaptor(SMALL).train()
    out = model(torch.randn(2, 60, SMALL.input_dim), torch.tensor([60, 47]))
    loss = (out.speech * torch.randn_like(out.speech)).sum() + (
        out.lid_logits * torch.randn_like(out.lid_logits)
    ).sum()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.requires_grad, name
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_paper_scale_parameter_counts() -> None:
    with torch.device("meta"):
        model = SpeechAdaptor(AdaptorConfig())
    assert all(p.device.type == "meta" for p in model.parameters())

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    # Figures of spec §2.1 (millions), derived independently of this code; allow 1 % rounding slack.
    assert count(model.embed) == pytest.approx(42.0e6, rel=0.01)
    for block in model.encoders:
        assert count(block) == pytest.approx(28.55e6, rel=0.01)
    assert len(model.encoders) * count(model.encoders[0]) == pytest.approx(485.3e6, rel=0.01)
    assert count(model.postencoder) == pytest.approx(6.3e6, rel=0.01)
    assert count(model.lid_ctc) + count(model.conditioning_layer) == pytest.approx(2.4e6, rel=0.01)
    assert model.num_parameters() == pytest.approx(536e6, rel=0.01)
    assert model.num_parameters(trainable_only=True) == model.num_parameters()
    # Exact totals of this implementation, for the record.
    assert count(model.encoders[0]) == 28_549_120
    assert model.num_parameters() == 535_975_052


# --------------------------------------------------------------------------- ESPnet parity (optional)
# ESPnet is a test-only oracle, not a dependency: `make test` installs it without its dependency set into
# .venv/oracle (tests/oracle-requirements.txt) and puts that on PYTHONPATH; a bare `pytest` skips these.
# Inputs are unpadded because the adaptor deliberately differs from ESPnet on padded batches
# (padding-invariant LID upsampling and masking, see speechllm.models.adaptor).


def espnet_encoder(config: AdaptorConfig, conditioning: bool = False) -> torch.nn.Module:
    pytest.importorskip(
        ESPNET_ENCODER_MODULE,
        reason="espnet2 is not importable (a test-only oracle: `make test` installs it into .venv/oracle); "
        "parity skipped",
    )
    reference = build_espnet_encoder(config, conditioning)
    randomize_(reference, seed=1)
    return reference.eval()


def test_parity_with_espnet_encoder() -> None:
    """E-Branchformer stack against ESPnet with copied weights (unpadded input; conditioning off)."""
    config = dataclasses.replace(SMALL)
    reference = espnet_encoder(config)
    ours = SpeechAdaptor(config).eval()
    missing = copy_encoder_weights(reference, ours)
    assert all(key.startswith(("lid_ctc.", "conditioning_layer.", "postencoder.")) for key in missing)

    feats = torch.randn(1, 57, config.input_dim)
    lengths = torch.tensor([57])
    with torch.no_grad():
        expected, expected_lengths, _ = reference(feats, lengths)
        x, our_lengths = ours.embed(feats, lengths)
        mask = lengths_to_mask(our_lengths, x.size(1))
        x, pos_emb = ours.pos_enc(x)
        for layer in ours.encoders:
            x = layer(x, pos_emb, mask)
        x = ours.after_norm(x)
    assert our_lengths.tolist() == expected_lengths.tolist()
    assert expected.abs().max() > 0.1  # randomised LayerNorm gains: not a trivially normalised output
    torch.testing.assert_close(x, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("frames", [57, 61])  # odd and even 80 ms lengths (T1 = 13, 14)
def test_parity_with_espnet_self_conditioned_encoder(frames: int) -> None:
    """Whole adaptor incl. LID inter-CTC self-conditioning after block `interctc_layer` against ESPnet."""
    config = dataclasses.replace(SMALL)
    reference = espnet_encoder(config, conditioning=True)
    ours = SpeechAdaptor(config).eval()
    missing = copy_encoder_weights(reference, ours)
    assert all(key.startswith(("lid_ctc.", "conditioning_layer.", "postencoder.")) for key in missing)
    for seed, part in enumerate((ours.lid_ctc, ours.conditioning_layer, ours.postencoder), start=2):
        randomize_(part, seed=seed)

    feats = torch.randn(1, frames, config.input_dim)
    lengths = torch.tensor([frames])
    with torch.no_grad():
        reference.conditioning_layer.load_state_dict(ours.conditioning_layer.state_dict())
        (expected, intermediate), expected_lengths, _ = reference(
            feats, lengths, ctc=OverlayLidCtc(ours.lid_ctc)
        )
        out = ours(feats, lengths)
        expected_speech, expected_speech_lengths = ours.postencoder(expected, expected_lengths)
        expected_lid, _ = ours.lid_ctc(intermediate[0][1], expected_lengths)
    assert intermediate[0][0] == config.interctc_layer
    assert out.speech_lengths.tolist() == expected_speech_lengths.tolist()
    torch.testing.assert_close(out.speech, expected_speech, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.lid_logits, expected_lid, atol=ATOL, rtol=0)


@pytest.mark.parametrize("im2col", [False, True])
def test_gradients_match_espnet(im2col: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Backward of the whole adaptor (subsampling convolutions through oneDNN or im2col, depthwise
    convolutions run as 2-D ones, LID self-conditioning, post-encoder) against ESPnet's encoder with the same
    weights."""
    monkeypatch.setattr(subsampling, "IM2COL_MIN_REDUCTION", 0 if im2col else 10**9)
    torch.manual_seed(0)
    config = dataclasses.replace(SMALL)
    reference = espnet_encoder(config, conditioning=True)
    ours = SpeechAdaptor(config).eval()
    copy_encoder_weights(reference, ours)
    heads = {"lid_ctc": copy.deepcopy(ours.lid_ctc), "postencoder": copy.deepcopy(ours.postencoder)}

    feats, lengths = torch.randn(2, 61, config.input_dim), torch.tensor([61, 61])
    out = ours(feats, lengths)
    (encoded, intermediate), encoded_lengths, _ = reference(
        feats, lengths, ctc=OverlayLidCtc(heads["lid_ctc"])
    )
    expected_speech = heads["postencoder"](encoded, encoded_lengths)[0]
    expected_lid = heads["lid_ctc"](intermediate[0][1], encoded_lengths)[0]
    speech_weight, lid_weight = torch.randn_like(expected_speech), torch.randn_like(expected_lid)
    ((out.speech * speech_weight).sum() + (out.lid_logits * lid_weight).sum()).backward()
    ((expected_speech * speech_weight).sum() + (expected_lid * lid_weight).sum()).backward()

    reference_params = dict(reference.named_parameters())
    for prefix, head in heads.items():
        reference_params.update({f"{prefix}.{name}": param for name, param in head.named_parameters()})
    for name, param in ours.named_parameters():
        expected = reference_params[name.replace("embed.out.", "embed.out.0.")].grad
        assert param.grad is not None and expected is not None, name
        scale = float(expected.abs().max())
        torch.testing.assert_close(param.grad, expected, atol=ATOL * max(scale, 1.0), rtol=1e-4, msg=name)


def test_lid_classes_come_from_the_data_or_the_config() -> None:
    """models.adaptor.lid_classes: null sizes the LID head to the data's languages + blank; a number (the
    reference's 140) is kept, unless too small for the data's labels."""
    assert lid_class_count(None, 6) == 7
    assert lid_class_count(140, 6) == 140 and lid_class_count(140, 139) == 140
    with pytest.raises(ValueError, match=r"models\.adaptor\.lid_classes is 6, but the data has 6 languages"):
        lid_class_count(6, 6)
