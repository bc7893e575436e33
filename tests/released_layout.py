"""Tiny checkpoints in the layout of the published BLOOMZMMS ESPnet repositories, built from the reference's
own libraries as oracles: s3prl's wav2vec2 upstream (`wav2vec2_custom`, loaded from a converted {task_cfg,
model_cfg, model_weight} file as the recipe's `downloads/converted_mms1b_all.pt`) with its S3PRLUpstream
length matching and Featurizer, ESPnet's UtteranceMVN, linear preencoder and E-Branchformer encoder, and the
overlay's small heads (LID CTC with its length adaptor, the dummy post-encoder, the CTC head) written from
their documented key names
(DigitalPhonetics/bloomzmms@77dc192:espnet-bloomzmms-files/espnet2/asr/{ctc.py,postencoder/
hugging_face_transformers_postencoder.py,espnet_model.py}). Test-only: s3prl and ESPnet live in .venv/oracle.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

HOP = 320
LID_CLASSES = 140  # the overlay's hard-coded CTC(odim=140) for the LID head
UPSTREAM = {
    "encoder_embed_dim": 32,
    "encoder_layers": 2,
    "encoder_ffn_embed_dim": 64,
    "encoder_attention_heads": 2,
    "conv_pos": 16,
    "conv_pos_groups": 2,
    "conv_feature_layers": "[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2",
}
ENCODER_CONF = {
    "output_size": 32,
    "attention_heads": 2,
    "attention_layer_type": "rel_selfattn",
    "pos_enc_layer_type": "rel_pos",
    "rel_pos_type": "latest",
    "cgmlp_linear_units": 64,
    "cgmlp_conv_kernel": 5,
    "use_linear_after_conv": False,
    "gate_activation": "identity",
    "num_blocks": 2,
    "dropout_rate": 0.1,
    "positional_dropout_rate": 0.1,
    "attention_dropout_rate": 0.1,
    "input_layer": "conv2d",
    "layer_drop_rate": 0.1,
    "linear_units": 64,
    "positionwise_layer_type": "linear",
    "macaron_ffn": True,
    "use_ffn": True,
    "merge_conv_kernel": 5,
    "interctc_layer_idx": [1],
    "interctc_use_conditioning": True,
}
PREENCODER_OUT = 16


def oracle_modules():
    """(s3prl upstream module, ESPnet modules) or skip when the test-only oracles are not installed."""
    try:
        from espnet2.asr.encoder.e_branchformer_encoder import EBranchformerEncoder
        from espnet2.asr.preencoder.linear import LinearProjection
        from espnet2.layers.utterance_mvn import UtteranceMVN
        from s3prl.upstream.wav2vec2.expert import UpstreamExpert
        from s3prl.upstream.wav2vec2.wav2vec2_model import Wav2Vec2Config, Wav2Vec2Model
    except ImportError as error:
        pytest.skip(f"test-only oracles (ESPnet, s3prl) not importable: {error}; `make test` installs them")
    return types.SimpleNamespace(
        EBranchformerEncoder=EBranchformerEncoder,
        LinearProjection=LinearProjection,
        UtteranceMVN=UtteranceMVN,
        UpstreamExpert=UpstreamExpert,
        Wav2Vec2Config=Wav2Vec2Config,
        Wav2Vec2Model=Wav2Vec2Model,
        s3prl_upstream=s3prl_upstream_module(),
    )


def s3prl_upstream_module() -> types.ModuleType:
    """s3prl's `nn/upstream.py` (S3PRLUpstream, Featurizer) loaded on its own: its package imports every
    upstream of the hub, whose dependencies are not installed; the two classes need none of them."""
    import s3prl

    sys.modules.setdefault("s3prl.hub", types.ModuleType("s3prl.hub"))
    path = Path(s3prl.__file__).parent / "nn" / "upstream.py"
    spec = importlib.util.spec_from_file_location("_s3prl_nn_upstream", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OverlayCtc(nn.Module):
    """The overlay's CTC: optional length adaptor (Conv1d k2 s2 + ReLU), `ctc_lo`; `softmax` maps back to the
    input length with nearest interpolation (used by ESPnet's encoder for self-conditioning)."""

    def __init__(self, odim: int, dim: int, bias: bool, length_adaptor_layers: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(length_adaptor_layers):
            layers += [nn.Conv1d(dim, dim, 2, 2), nn.ReLU()]
        self.length_adaptor = nn.Sequential(*(layers or [nn.Identity()]))
        self.ctc_lo = nn.Linear(dim, odim, bias=bias)

    def mapped(self, x: torch.Tensor) -> torch.Tensor:
        return self.length_adaptor(x.permute(0, 2, 1)).permute(0, 2, 1)

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.ctc_lo(self.mapped(x)), dim=2)
        if probs.shape[1] != x.shape[1]:
            probs = F.interpolate(probs.permute(0, 2, 1), x.shape[1]).permute(0, 2, 1)
        return probs


class OverlayPostencoder(nn.Module):
    """The overlay's `hugging_face_transformers` post-encoder with `model_name_or_path: dummy`."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.length_adaptor = nn.Sequential(nn.Conv1d(dim, dim, 2, 2), nn.ReLU())
        self.linear_in = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.length_adaptor(x.permute(0, 2, 1)).permute(0, 2, 1)
        return self.linear_in(x), lengths.div(2, rounding_mode="floor")


class ReferenceModel(nn.Module):
    """The ESPnet BLOOMZMMS model's modules under their attribute names, so `state_dict()` has the released
    keys."""

    def __init__(self, o: types.SimpleNamespace, converted: Path, llm_hidden: int, vocab: int | None) -> None:
        super().__init__()
        upstream_cls = o.s3prl_upstream.S3PRLUpstream
        upstream = upstream_cls.__new__(upstream_cls)  # its __init__ resolves the name through s3prl's hub
        nn.Module.__init__(upstream)
        upstream.upstream = o.UpstreamExpert(str(converted))
        upstream.normalize = False
        upstream._num_layers = UPSTREAM["encoder_layers"] + 1
        upstream._hidden_sizes = [UPSTREAM["encoder_embed_dim"]] * upstream._num_layers
        upstream._downsample_rates = [HOP] * upstream._num_layers
        self.frontend = nn.Module()
        self.frontend.upstream = upstream
        self.frontend.featurizer = o.s3prl_upstream.Featurizer(upstream)
        self.normalize = o.UtteranceMVN(norm_means=True, norm_vars=False)
        self.preencoder = o.LinearProjection(UPSTREAM["encoder_embed_dim"], PREENCODER_OUT)
        self.encoder = o.EBranchformerEncoder(input_size=PREENCODER_OUT, **ENCODER_CONF)
        d = ENCODER_CONF["output_size"]
        self.lid_ctc = OverlayCtc(LID_CLASSES, d, bias=True, length_adaptor_layers=1)
        self.encoder.conditioning_layer = nn.Linear(LID_CLASSES, d)
        self.postencoder = OverlayPostencoder(d, llm_hidden)
        self.ctc = OverlayCtc(vocab, llm_hidden, bias=False, length_adaptor_layers=0) if vocab else None

    @torch.no_grad()
    def forward(self, wav: torch.Tensor) -> dict[str, torch.Tensor]:
        """espnet_model.encode on one unpadded utterance (1, L): every intermediate the tests compare."""
        lengths = torch.tensor([wav.shape[1]])
        all_hs, all_lens = self.frontend.upstream(wav, lengths)
        feats, feat_lens = self.frontend.featurizer(all_hs, all_lens)
        feats, feat_lens = self.normalize(feats, feat_lens)
        feats, feat_lens = self.preencoder(feats, feat_lens)
        enc, enc_lens, _ = self.encoder(feats, feat_lens, ctc=self.lid_ctc)
        if isinstance(enc, tuple):  # (output, intermediate outputs) with interctc layers
            enc = enc[0]
        speech, speech_lens = self.postencoder(enc, enc_lens)
        out = {"hidden_states": torch.stack(all_hs), "preencoder": feats, "speech": speech}
        if self.ctc is not None:
            out["ctc_log_probs"] = self.ctc.ctc_lo(speech).log_softmax(-1)
        return out


def randomize(module: nn.Module, seed: int) -> None:
    """Random values in every parameter (layer norms and biases too), so a wrong mapping cannot go unseen."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def build_reference(tmp: Path, llm_hidden: int, vocab: int | None, seed: int = 0) -> ReferenceModel:
    """The tiny reference model in eval mode, its upstream saved as s3prl's converted file under `tmp`."""
    o = oracle_modules()
    torch.manual_seed(seed)
    model_cfg = {
        **UPSTREAM,
        "extractor_mode": "layer_norm",
        "layer_norm_first": True,
        "conv_bias": True,
        "quantize_targets": True,
        "latent_vars": 8,
        "latent_groups": 2,
        "final_dim": 24,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "dropout_input": 0.0,
        "dropout_features": 0.0,
    }
    upstream = o.Wav2Vec2Model(o.Wav2Vec2Config(**model_cfg))
    randomize(upstream, seed)
    converted = tmp / "converted_tiny.pt"
    torch.save(
        {"task_cfg": {"normalize": True}, "model_cfg": model_cfg, "model_weight": upstream.state_dict()},
        converted,
    )
    reference = ReferenceModel(o, converted, llm_hidden, vocab)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if not name.startswith("frontend.upstream."):
                p.copy_(
                    torch.randn(p.shape, generator=generator) * 0.3
                    + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
                )
    return reference.eval()


def hf_speech_encoder_config(out_dir: Path) -> Path:
    """The HF Wav2Vec2 config of the tiny upstream (as MMS-1B-all's: stable layer norm, layer-norm conv
    extractor, and its language adapters, which the importer removes), saved without weights."""
    from transformers import Wav2Vec2Config

    config = Wav2Vec2Config(
        hidden_size=UPSTREAM["encoder_embed_dim"],
        num_hidden_layers=UPSTREAM["encoder_layers"],
        num_attention_heads=UPSTREAM["encoder_attention_heads"],
        intermediate_size=UPSTREAM["encoder_ffn_embed_dim"],
        conv_dim=[16] * 7,
        conv_stride=[5, 2, 2, 2, 2, 2, 2],
        conv_kernel=[10, 3, 3, 3, 3, 2, 2],
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=UPSTREAM["conv_pos"],
        num_conv_pos_embedding_groups=UPSTREAM["conv_pos_groups"],
        adapter_attn_dim=16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        layerdrop=0.0,
    )
    config.save_pretrained(out_dir)
    return out_dir


def training_config(stage: str, llm: str, token_list: list[str]) -> dict:
    """The dumped ESPnet training config of a tiny BLOOMZMMS run (the keys of the released
    exp/*/config.yaml)."""
    cfg = {
        "frontend": "s3prl",
        "frontend_conf": {
            "frontend_conf": {
                "upstream": "wav2vec2_custom",
                "path_or_url": "downloads/converted_mms1b_all.pt",
            },
            "download_dir": "hub",
            "multilayer_feature": True,
            "fs": "16k",
        },
        "normalize": "utterance_mvn",
        "normalize_conf": {},
        "preencoder": "linear",
        "preencoder_conf": {"input_size": UPSTREAM["encoder_embed_dim"], "output_size": PREENCODER_OUT},
        "encoder": "e_branchformer",
        "encoder_conf": dict(ENCODER_CONF),
        "postencoder": "hugging_face_transformers",
        "postencoder_conf": {"model_name_or_path": "dummy", "length_adaptor_n_layers": 1, "output_size": 32},
        "model": "espnet",
        "model_conf": {
            "ctc_weight": 1.0 if stage == "ctc" else 0.0,
            "interctc_weight": 0.2,
            "aux_ctc": {"1": "utt2lid_token"},
            "extract_feats_in_collect_stats": False,
            "ignore_id": 3,
            "sym_blank": "<pad>",
            "sym_sos": "<s>",
            "sym_eos": "</s>",
        },
        "ctc_conf": {"bias": False},
        "token_type": "hugging_face",
        "bpemodel": llm,
        "token_list": token_list,
        "optim": "adam",
        "optim_conf": {"lr": 0.0001},
        "max_epoch": 70,
        "specaug": None,
        "freeze_param": ["frontend.upstream", "ctc"],
    }
    if stage == "ctc":
        cfg.update(decoder="rnn", decoder_conf={})
    else:
        cfg.update(
            decoder="hugging_face_transformers",
            decoder_conf={
                "model_name_or_path": llm,
                "load_in_8bit": True,
                "causal_lm": True,
                "prefix": "Repeat the sentence: ",
                "postfix": ". ",
            },
        )
    return cfg


def int8_decoder_entries() -> dict[str, object]:
    """What an averaged CE file carries of the lazily built int8 BLOOMZ: int8 weights, scales, bnb's str
    `weight_format` (summed to "rowrowrow" by the averaging), prefix / postfix embeddings."""
    qkv = "decoder.decoder.h.0.self_attention.query_key_value"
    return {
        f"{qkv}.weight": torch.randint(-128, 127, (96, 32), dtype=torch.int8),
        f"{qkv}.bias": torch.randn(96),
        f"{qkv}.SCB": torch.randn(96),
        f"{qkv}.weight_format": "rowrowrow",
        "decoder.decoder.word_embeddings.weight": torch.randn(10, 32),
        "decoder.prefix": torch.randn(1, 4, 32),
        "decoder.postfix": torch.randn(1, 2, 32),
    }


def write_repo(root: Path, stage: str, state: dict[str, object], config: dict) -> Path:
    """An unpacked ESPnet model-zoo repository: meta.yaml, exp/<run>/config.yaml and the flat .pth."""
    run = f"exp/asr_train_asr_e_branchformer_tiny_{'ctc' if stage == 'ctc' else 'aed-t'}_raw_hugging_face_sp"
    model_file = f"{run}/{'10epoch.pth' if stage == 'ctc' else 'valid.acc.ave_3best.pth'}"
    (root / run).mkdir(parents=True)
    (root / run / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    torch.save(state, root / model_file)
    meta = {
        "espnet": "202304",
        "torch": "2.1.2+cu121",
        "python": "3.10",
        "files": {"asr_model_file": model_file},
        "yaml_files": {"asr_train_config": f"{run}/config.yaml"},
    }
    (root / "meta.yaml").write_text(yaml.safe_dump(meta), encoding="utf-8")
    (root / "README.md").write_text("tiny test repository\n", encoding="utf-8")
    return root
