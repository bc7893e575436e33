"""Import the published checkpoints as project model directories: the BLOOMZMMS ESPnet model-zoo repositories
(`akreal/bloomzmms-{ctc,ce-t,ce-mi,ce-tmi}`) and Kang & Roy's audio-encoder state dict.

An ESPnet repository is the unpacked `espnet2.bin.pack asr` output (DigitalPhonetics/bloomzmms@77dc192:
espnet-bloomzmms-files/egs2/TEMPLATE/asr1/asr.sh): `meta.yaml` names the training config
(`yaml_files. asr_train_config`, `exp/<run>/config.yaml`) and the weights (`files.asr_model_file`), a flat
`model.state_dict()` (`espnet2/train/trainer.py`; `.../main_funcs/average_nbest_models.py` for the averaged CE
files). The model is built from that config's own architecture values; every tensor is renamed to the
project's name or dropped on purpose:

* `decoder.*` (CE files): the lazily built int8 BLOOMZ, which ESPnet's own loader discards (`strict=False`,
  `espnet2/tasks/abs_task.py`) and whose int8 tensors the 3-best averaging summed without dividing; the LLM is
  loaded from its hub id instead, as ESPnet's `Speech2Text` does.
* the wav2vec2 pretraining heads (`quantizer.*`, `project_q.*`, `final_proj.*`), unused by the forward pass.

Everything else maps one to one (no reshape): the s3prl/fairseq MMS upstream onto HF `Wav2Vec2Model` names
(bundled in the model directory, built without MMS language adapters as s3prl's model has none), the
featurizer and preencoder onto `SpeechFrontend`, the E-Branchformer encoder, LID inter-CTC head and
post-encoder onto `SpeechAdaptor`, and the CTC repository's frozen `ctc.ctc_lo` onto `CTCHead` (kept in
`ctc_head.safetensors`: the recipe's embedding initialisation was skipped on a size mismatch, so it is taken
from the file, not rebuilt from the LLM). A key left unmapped, a missing one, a wrong shape or an unsupported
config key or value stops the import with an error naming it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from speechllm import __version__
from speechllm.models.adaptor import AdaptorConfig, SpeechAdaptor
from speechllm.models.bloomzmms import BloomzMMS
from speechllm.models.export import (
    BUNDLED_KEY,
    CTC_HEAD_FILE,
    FORMAT,
    kang_roy_spec,
    llm_hidden_size,
    save_model_dir,
)
from speechllm.models.frames import DEFAULT_LENGTH_ADAPTOR_LAYERS
from speechllm.models.frontend import SpeechFrontend, without_language_adapters
from speechllm.models.hubert_pool import HubertPoolEncoder, PoolConfig

log = logging.getLogger(__name__)

META_FILE = "meta.yaml"
SPEECH_ENCODER_FOLDER = "speech_encoder"
# The ESPnet CTC blank: espnet2/asr/ctc.py hands torch's CTC loss its default blank 0 (config
# models.ctc_head.blank_id).
ESPNET_CTC_BLANK = 0
UPSTREAM_PREFIX = "frontend.upstream.upstream.model."
DECODER_PREFIX = "decoder."
# wav2vec2 pretraining-only modules of s3prl's fairseq copy, unused by `extract_features`.
PRETRAINING_PREFIXES = ("quantizer.", "project_q.", "final_proj.")
# s3prl's fairseq Wav2Vec2Model (layer-norm feature extractor, layer_norm_first) -> HF Wav2Vec2Model names
# (s3prl/s3prl@v0.4.10:s3prl/upstream/wav2vec2/wav2vec2_model.py; transformers `modeling_wav2vec2.py`).
UPSTREAM_RENAMES: tuple[tuple[str, str], ...] = (
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (
        r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)",
        r"feature_extractor.conv_layers.\1.layer_norm.\2",
    ),
    (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (
        r"encoder\.pos_conv\.0\.(?:weight_g|parametrizations\.weight\.original0)",
        "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    ),
    (
        r"encoder\.pos_conv\.0\.(?:weight_v|parametrizations\.weight\.original1)",
        "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
    ),
    (r"encoder\.pos_conv\.0\.bias", "encoder.pos_conv_embed.conv.bias"),
    (
        r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)",
        r"encoder.layers.\1.attention.\2_proj.\3",
    ),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"mask_emb", "masked_spec_embed"),
)
# The rest of the ESPnet model -> BloomzMMS names (speech side; `ctc.*` goes to the CTC head file).
SPEECH_RENAMES: tuple[tuple[str, str], ...] = (
    (r"frontend\.featurizer\.weights", "frontend.layer_weights"),
    (r"preencoder\.linear_out\.(weight|bias)", r"frontend.proj.\1"),
    (r"encoder\.embed\.out\.0\.(weight|bias)", r"adaptor.embed.out.\1"),
    (r"encoder\.(.+)", r"adaptor.\1"),
    (r"lid_ctc\.(.+)", r"adaptor.lid_ctc.\1"),
    (r"postencoder\.(.+)", r"adaptor.postencoder.\1"),
)
CTC_RENAMES: tuple[tuple[str, str], ...] = ((r"ctc\.ctc_lo\.weight", "ctc_lo.weight"),)

# E-Branchformer `encoder_conf` (espnet==202304 espnet2/asr/encoder/e_branchformer_encoder.py): keys whose
# value must be the paper's (the only variant the project implements), with ESPnet's default for an absent
# key.
ENCODER_FIXED: dict[str, tuple[Any, Any]] = {  # key: (required value, ESPnet default)
    "attention_layer_type": ("rel_selfattn", "rel_selfattn"),
    "pos_enc_layer_type": ("rel_pos", "rel_pos"),
    "rel_pos_type": ("latest", "latest"),
    "use_linear_after_conv": (False, False),
    "gate_activation": ("identity", "identity"),
    "input_layer": ("conv2d", "conv2d"),
    "zero_triu": (False, False),
    "use_ffn": (True, False),
    "macaron_ffn": (True, False),
    "ffn_activation_type": ("swish", "swish"),
    "positionwise_layer_type": ("linear", "linear"),
    "interctc_use_conditioning": (True, False),
}
ENCODER_SIZES: dict[str, tuple[str, Any]] = {  # key: (AdaptorConfig field, ESPnet default)
    "output_size": ("d_model", 256),
    "attention_heads": ("heads", 4),
    "cgmlp_linear_units": ("cgmlp_units", 2048),
    "cgmlp_conv_kernel": ("cgmlp_kernel", 31),
    "num_blocks": ("num_blocks", 12),
    "dropout_rate": ("dropout", 0.1),
    "positional_dropout_rate": ("pos_dropout", 0.1),
    "attention_dropout_rate": ("attn_dropout", 0.0),
    "linear_units": ("linear_units", 2048),
    "merge_conv_kernel": ("merge_kernel", 3),
}
# Training-only or inert with the fixed values above: layer drop (off at inference), the positional table's
# precomputed length (the project computes it per input), the padding index of an `embed` input layer.
ENCODER_INERT = {"layer_drop_rate", "max_pos_emb_len", "padding_idx", "interctc_layer_idx"}
# model_conf keys that only shape the training losses or the collect-stats stage.
MODEL_CONF_TRAINING = {
    "ctc_weight",
    "interctc_weight",
    "aux_ctc",
    "ignore_id",
    "sym_blank",
    "sym_sos",
    "sym_eos",
    "sym_space",
    "extract_feats_in_collect_stats",
    "lsm_weight",
    "length_normalized_loss",
    "report_cer",
    "report_wer",
    "transducer_multi_blank_durations",
    "transducer_multi_blank_sigma",
}
CTC_CONF_TRAINING = {"dropout_rate", "ctc_type", "reduce", "ignore_nan_grad", "zero_infinity"}
# The overlay decoder's prefix tuning from a template (unused by the paper's runs).
PREFIX_TUNING_KEYS = (
    "prefix_tuning_template_path",
    "prefix_tuning_template_plm",
    "prefix_tuning_template_text",
)
FRONTEND_CONF_KEYS = {"frontend_conf", "download_dir", "multilayer_feature", "fs", "layer"}


class CheckpointImportError(ValueError):
    """A released checkpoint the importer cannot map; the message names the file and the key or value."""


@dataclass
class EspnetRepo:
    """An unpacked ESPnet model-zoo repository: its training config and model file."""

    root: Path
    config_path: Path
    model_path: Path
    config: dict[str, Any]


def read_espnet_repo(root: Path) -> EspnetRepo:
    """Read `meta.yaml` and the training config it names (paths relative to the repository, as packed)."""
    meta_path = Path(root) / META_FILE
    if not meta_path.is_file():
        raise CheckpointImportError(f"not an ESPnet model-zoo repository (no {META_FILE}): {root}")
    meta = _read_mapping(meta_path)

    def named(section: str, key: str) -> Path:
        value = _section(meta, section, meta_path).get(key)
        if not isinstance(value, str):
            raise CheckpointImportError(f"{meta_path}: {section}.{key} is missing")
        path = Path(root) / value
        if not path.is_file():
            raise CheckpointImportError(f"{meta_path}: {section}.{key} names {value}, which is not in {root}")
        return path

    config_path, model_path = named("yaml_files", "asr_train_config"), named("files", "asr_model_file")
    return EspnetRepo(Path(root), config_path, model_path, _read_mapping(config_path))


def _read_mapping(path: Path) -> dict[str, Any]:
    """A YAML file holding a mapping; malformed YAML or another kind of document is an error naming it."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointImportError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointImportError(f"{path}: not a mapping")
    return data


def load_state(path: Path) -> dict[str, Any]:
    """A saved state dict, memory-mapped (a 10 GB file needs no 10 GB of RAM); tensors and `str` values
    only."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # pickle / zip errors name nothing useful on their own
        raise CheckpointImportError(f"{path}: cannot be read as a torch state dict: {error}") from error
    if not isinstance(state, Mapping):
        raise CheckpointImportError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return dict(state)


# ---------------------------------------------------------------------------------------------------- config


@dataclass
class EspnetArchitecture:
    """What the training config says about the model: adaptor sizes, stage, LLM and prompt."""

    # AdaptorConfig fields known from the config (num_lid_classes comes from the weights)
    adaptor: dict[str, Any]
    stage: str  # "ctc" (ctc_weight 1) or "ce" (ctc_weight 0 with the hugging_face_transformers decoder)
    llm: str
    prefix: str
    postfix: str
    vocab_size: int
    upstream_size: int


def _section(cfg: dict[str, Any], key: str, where: Path) -> dict[str, Any]:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise CheckpointImportError(f"{where}: {key} must be a mapping, got {value!r}")
    return value


def _require(where: Path, key: str, value: Any, expected: Any) -> None:
    if value != expected:
        raise CheckpointImportError(
            f"{where}: unsupported {key}: {value!r} (the importer supports {expected!r})"
        )


def _size(where: Path, key: str, value: Any) -> int:
    """A layer width the model is built with: a positive whole number, else an error naming the key."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointImportError(f"{where}: unsupported {key} {value!r} (a positive whole number)")
    return value


def _unknown_keys(where: Path, section: str, keys: set[str], known: set[str]) -> None:
    unknown = sorted(keys - known)
    if unknown:
        raise CheckpointImportError(f"{where}: unsupported {section} key(s) {unknown}")


def encoder_adaptor_fields(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """AdaptorConfig fields from `encoder: e_branchformer` + `encoder_conf`; other variants are named
    errors."""
    _require(where, "encoder", cfg.get("encoder"), "e_branchformer")
    conf = _section(cfg, "encoder_conf", where)
    _unknown_keys(where, "encoder_conf", set(conf), set(ENCODER_FIXED) | set(ENCODER_SIZES) | ENCODER_INERT)
    for key, (required, default) in ENCODER_FIXED.items():
        _require(where, f"encoder_conf.{key}", conf.get(key, default), required)
    fields = {field: conf.get(key, default) for key, (field, default) in ENCODER_SIZES.items()}
    interctc = conf.get("interctc_layer_idx")
    if not (isinstance(interctc, list) and len(interctc) == 1 and isinstance(interctc[0], int)):
        raise CheckpointImportError(
            f"{where}: unsupported encoder_conf.interctc_layer_idx {interctc!r} (the "
            "importer supports one LID inter-CTC layer, e.g. [3])"
        )
    aux = _section(cfg, "model_conf", where).get("aux_ctc") or {}
    if set(map(str, aux)) != {str(interctc[0])} or set(aux.values()) != {"utt2lid_token"}:
        raise CheckpointImportError(
            f"{where}: model_conf.aux_ctc {aux!r} must name the LID head's layer "
            f"{interctc[0]} (encoder_conf.interctc_layer_idx) and only it, with utt2lid_token (the LID head)"
        )
    fields["interctc_layer"] = interctc[0]  # ESPnet's index is 1-based, as AdaptorConfig's
    return fields


def check_frontend(cfg: dict[str, Any], where: Path) -> None:
    """s3prl `wav2vec2_custom` with all layers (multilayer_feature), then utterance mean subtraction."""
    _require(where, "frontend", cfg.get("frontend"), "s3prl")
    conf = _section(cfg, "frontend_conf", where)
    _unknown_keys(where, "frontend_conf", set(conf), FRONTEND_CONF_KEYS)
    _require(
        where,
        "frontend_conf.frontend_conf.upstream",
        (conf.get("frontend_conf") or {}).get("upstream"),
        "wav2vec2_custom",
    )
    _require(where, "frontend_conf.multilayer_feature", conf.get("multilayer_feature", False), True)
    inner = conf.get("frontend_conf") or {}
    _unknown_keys(
        where,
        "frontend_conf.frontend_conf",
        set(inner),
        {"upstream", "path_or_url", "normalize", "extra_conf", "tile_factor"},
    )
    _require(where, "frontend_conf.frontend_conf.normalize", inner.get("normalize", False), False)
    _require(where, "frontend_conf.frontend_conf.extra_conf", inner.get("extra_conf") or None, None)
    _require(where, "frontend_conf.frontend_conf.tile_factor", inner.get("tile_factor", 1), 1)
    if conf.get("fs", 16000) not in (16000, "16k"):
        raise CheckpointImportError(f"{where}: unsupported frontend_conf.fs {conf['fs']!r} (16000)")
    _require(where, "frontend_conf.layer", conf.get("layer", -1), -1)
    _require(where, "normalize", cfg.get("normalize"), "utterance_mvn")
    norm = _section(cfg, "normalize_conf", where)
    _unknown_keys(where, "normalize_conf", set(norm), {"norm_means", "norm_vars", "eps"})
    _require(where, "normalize_conf.norm_means", norm.get("norm_means", True), True)
    _require(where, "normalize_conf.norm_vars", norm.get("norm_vars", False), False)


def espnet_architecture(cfg: dict[str, Any], where: Path) -> EspnetArchitecture:
    """Check an ESPnet BLOOMZMMS training config and read the model's architecture from it.

    Sections that shape the model are checked key by key (an unknown key or value is an error); the rest of
    the dumped arguments (optimiser, batching, ...) only affect training and are not read.
    """
    check_frontend(cfg, where)
    fields = encoder_adaptor_fields(cfg, where)
    _require(where, "preencoder", cfg.get("preencoder"), "linear")
    pre = _section(cfg, "preencoder_conf", where)
    _unknown_keys(where, "preencoder_conf", set(pre), {"input_size", "output_size"})
    _require(where, "postencoder", cfg.get("postencoder"), "hugging_face_transformers")
    post = _section(cfg, "postencoder_conf", where)
    _unknown_keys(
        where,
        "postencoder_conf",
        set(post),
        {"model_name_or_path", "length_adaptor_n_layers", "output_size", "lang_token_id"},
    )
    _require(where, "postencoder_conf.lang_token_id", post.get("lang_token_id", -1), -1)
    upstream_size = _size(where, "preencoder_conf.input_size", pre.get("input_size"))
    preencoder_size = _size(where, "preencoder_conf.output_size", pre.get("output_size"))
    llm_width = _size(where, "postencoder_conf.output_size", post.get("output_size"))
    _require(where, "postencoder_conf.model_name_or_path", post.get("model_name_or_path"), "dummy")
    # The overlay's LID head has one length-adaptor layer; AdaptorConfig uses one count for both heads.
    _require(
        where,
        "postencoder_conf.length_adaptor_n_layers",
        post.get("length_adaptor_n_layers"),
        DEFAULT_LENGTH_ADAPTOR_LAYERS,
    )
    model_conf = _section(cfg, "model_conf", where)
    _unknown_keys(where, "model_conf", set(model_conf), MODEL_CONF_TRAINING | {"lang_token_id"})
    _require(where, "model_conf.lang_token_id", model_conf.get("lang_token_id", -1), -1)
    _require(where, "model", cfg.get("model", "espnet"), "espnet")
    _require(where, "token_type", cfg.get("token_type"), "hugging_face")
    token_list = cfg.get("token_list")
    if not isinstance(token_list, list) or not token_list:
        raise CheckpointImportError(f"{where}: token_list must be the inline list of the LLM's tokens")
    ctc_weight = float(model_conf.get("ctc_weight", 0.5))
    if ctc_weight == 1.0:
        stage, llm, prefix, postfix = "ctc", cfg.get("bpemodel"), "", ""
        ctc_conf = _section(cfg, "ctc_conf", where)
        _unknown_keys(
            where, "ctc_conf", set(ctc_conf), CTC_CONF_TRAINING | {"bias", "length_adaptor_n_layers"}
        )
        _require(where, "ctc_conf.bias", ctc_conf.get("bias", True), False)
        _require(where, "ctc_conf.length_adaptor_n_layers", ctc_conf.get("length_adaptor_n_layers", 0), 0)
    elif ctc_weight == 0.0:
        _require(where, "decoder", cfg.get("decoder"), "hugging_face_transformers")
        dec = _section(cfg, "decoder_conf", where)
        _unknown_keys(
            where,
            "decoder_conf",
            set(dec),
            {"model_name_or_path", "load_in_8bit", "causal_lm", "prefix", "postfix", "torch_compile"}
            | set(PREFIX_TUNING_KEYS),
        )
        for key in PREFIX_TUNING_KEYS:
            _require(where, f"decoder_conf.{key}", dec.get(key, ""), "")
        _require(where, "decoder_conf.causal_lm", dec.get("causal_lm"), True)
        stage, llm = "ce", dec.get("model_name_or_path")
        prefix, postfix = dec.get("prefix", ""), dec.get("postfix", "")
    else:
        raise CheckpointImportError(
            f"{where}: unsupported model_conf.ctc_weight {ctc_weight} (1.0: a CTC model, "
            "0.0: an LLM-decoder model; joint CTC/attention decoding is not supported)"
        )
    if not isinstance(llm, str) or not llm:
        raise CheckpointImportError(f"{where}: no LLM named (bpemodel / decoder_conf.model_name_or_path)")
    fields.update(
        input_dim=preencoder_size,
        llm_hidden_size=llm_width,
        length_adaptor_layers=DEFAULT_LENGTH_ADAPTOR_LAYERS,
    )
    return EspnetArchitecture(fields, stage, llm, str(prefix), str(postfix), len(token_list), upstream_size)


# ---------------------------------------------------------------------------------------------------- weights


def rename(key: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    """The first rule's rewrite of `key` that matches it whole, or None."""
    for pattern, target in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(target)
    return None


@dataclass
class MappedState:
    """A released ESPnet state dict split by destination, with the keys dropped on purpose."""

    upstream: dict[str, torch.Tensor]  # HF Wav2Vec2Model names
    speech: dict[str, torch.Tensor]  # BloomzMMS names (frontend.layer_weights, frontend.proj, adaptor.*)
    ctc_head: dict[str, torch.Tensor]  # CTCHead names
    dropped: dict[str, int]  # reason -> number of entries


def map_espnet_state(state: Mapping[str, Any], where: Path) -> MappedState:
    """Rename every entry of a BLOOMZMMS ESPnet state dict or drop it for a stated reason; anything else is an
    error naming the key."""
    mapped = MappedState({}, {}, {}, {"decoder (int8 BLOOMZ)": 0, "wav2vec2 pretraining heads": 0})
    unmapped = []
    source: dict[tuple[int, str], str] = {}  # (target, new name) -> the checkpoint key it came from
    for key, value in state.items():
        if key.startswith(DECODER_PREFIX):
            mapped.dropped["decoder (int8 BLOOMZ)"] += 1
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointImportError(f"{where}: {key} holds a {type(value).__name__}, not a tensor")
        if key.startswith(UPSTREAM_PREFIX):
            suffix = key[len(UPSTREAM_PREFIX) :]
            if suffix.startswith(PRETRAINING_PREFIXES):
                mapped.dropped["wav2vec2 pretraining heads"] += 1
                continue
            target, name = mapped.upstream, rename(suffix, UPSTREAM_RENAMES)
        elif key.startswith("ctc."):
            target, name = mapped.ctc_head, rename(key, CTC_RENAMES)
        else:
            target, name = mapped.speech, rename(key, SPEECH_RENAMES)
        if name is None:
            unmapped.append(key)
            continue
        if (earlier := source.setdefault((id(target), name), key)) != key:
            raise CheckpointImportError(f"{where}: {earlier} and {key} both map to {name}")
        target[name] = value
    if unmapped:
        raise CheckpointImportError(
            f"{where}: {len(unmapped)} key(s) the importer cannot map: {unmapped[:10]}"
        )
    return mapped


def check_exact_keys(
    own: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    where: Path,
    what: str,
    name: Callable[[str], str] = str,
) -> None:
    """Every key of `own` present in `state`, none extra, every shape equal; else an error naming the key
    (`name` gives a key's name in the checkpoint)."""
    missing = sorted(name(k) for k in set(own) - set(state))
    extra = sorted(name(k) for k in set(state) - set(own))
    if missing:
        raise CheckpointImportError(f"{where}: {what} key(s) missing from the checkpoint: {missing[:10]}")
    if extra:
        raise CheckpointImportError(f"{where}: {what} key(s) the model does not have: {extra[:10]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointImportError(
                f"{where}: {name(key)} has shape {tuple(value.shape)}, the configured "
                f"{what} expects {tuple(own[key].shape)}"
            )


def load_exactly(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    where: Path,
    what: str,
    name: Callable[[str], str] = str,
) -> None:
    """Load `state` into `module` after `check_exact_keys`."""
    check_exact_keys(module.state_dict(), state, where, what, name)
    module.load_state_dict(state, strict=True)


def check_filled(module: torch.nn.Module, where: Path) -> None:
    """Nothing of a module built on the meta device was left without a tensor from the checkpoint."""
    on_meta = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if on_meta:
        raise CheckpointImportError(f"{where}: {on_meta[:5]} were not filled from the checkpoint")


def speech_encoder_config(name_or_path: str, revision: str | None = None) -> PretrainedConfig:
    """The HF architecture of the frozen upstream, without MMS language adapters (s3prl's model has none)."""
    kwargs = {} if Path(name_or_path).exists() else {"revision": revision}
    return without_language_adapters(AutoConfig.from_pretrained(name_or_path, **kwargs))


def build_upstream(
    config: PretrainedConfig, weights: Mapping[str, torch.Tensor], where: Path
) -> PreTrainedModel:
    """The HF speech encoder of `config` holding the checkpoint's upstream weights.

    Built on the meta device and given the (memory-mapped) tensors themselves: MMS-1B is neither initialised
    randomly nor copied in memory. Wav2Vec2-family models have no buffers that would stay on `meta`.
    """
    with torch.device("meta"):
        encoder = AutoModel.from_config(config)
    check_exact_keys(
        encoder.state_dict(),
        weights,
        where,
        "speech encoder (upstream)",
        lambda k: f"{k} (the HF name of a {UPSTREAM_PREFIX}* tensor)",
    )
    encoder.load_state_dict(weights, strict=True, assign=True)
    check_filled(encoder, where)
    return encoder.eval()


@dataclass
class ImportOptions:
    """Choices the ESPnet repository cannot make: the upstream's HF architecture, how to load the LLM."""

    speech_encoder: str = "facebook/mms-1b-all"
    speech_encoder_revision: str = "main"
    llm: str | None = None  # None: the config's (decoder_conf.model_name_or_path / bpemodel)
    llm_revision: str = "main"
    llm_dtype: str = "bfloat16"
    load_in_8bit: bool = False
    # s3prl's task_cfg.normalize, true for MMS (its converted file is unpublished)
    normalize_waveform: bool = True
    # load the hub upstream and LLM and record whether the file's copies equal them
    compare_with_sources: bool = False


def import_espnet(
    repo_dir: Path, out_dir: Path, options: ImportOptions, source: str | None = None
) -> dict[str, Any]:
    """Write a project model directory from an unpacked ESPnet BLOOMZMMS repository; returns its spec."""
    repo = read_espnet_repo(repo_dir)
    arch = espnet_architecture(repo.config, repo.config_path)
    state = load_state(repo.model_path)
    mapped = map_espnet_state(state, repo.model_path)
    lid_weight = mapped.speech.get("adaptor.lid_ctc.ctc_lo.weight")
    if lid_weight is None:
        raise CheckpointImportError(f"{repo.model_path}: lid_ctc.ctc_lo.weight is missing")
    adaptor_cfg = AdaptorConfig(**arch.adaptor, num_lid_classes=int(lid_weight.shape[0]))

    config = speech_encoder_config(options.speech_encoder, options.speech_encoder_revision)
    if int(config.hidden_size) != arch.upstream_size:
        raise CheckpointImportError(
            f"{repo.config_path}: preencoder_conf.input_size {arch.upstream_size} is not "
            f"the hidden size {config.hidden_size} of {options.speech_encoder}"
        )
    encoder = build_upstream(config, mapped.upstream, repo.model_path)
    with torch.device("meta"):  # the new parts are filled from the file below (the encoder is already real)
        frontend = SpeechFrontend(
            encoder, adaptor_cfg.input_dim, options.normalize_waveform, frame_count="s3prl"
        )
        model = BloomzMMS(frontend, SpeechAdaptor(adaptor_cfg), None, None, ctc_blank_id=ESPNET_CTC_BLANK)
    speech_side = {k: v for k, v in model.state_dict().items() if not k.startswith("frontend.encoder.")}
    check_exact_keys(speech_side, mapped.speech, repo.model_path, "speech adaptor", espnet_name)
    model.load_state_dict(mapped.speech, strict=False, assign=True)  # the encoder's weights are in already
    check_filled(model, repo.model_path)
    ctc_head = check_ctc_head(mapped.ctc_head, arch, adaptor_cfg, repo.model_path)

    llm = options.llm or arch.llm
    checks = source_equality(encoder, ctc_head, options, llm) if options.compare_with_sources else {}
    spec = {
        "format": FORMAT,
        "kind": "bloomzmms",
        "stage": arch.stage,
        "speechllm_version": __version__,
        "speech_encoder": {
            "name_or_path": options.speech_encoder,
            "revision": options.speech_encoder_revision,
            BUNDLED_KEY: SPEECH_ENCODER_FOLDER,
            "normalize_waveform": options.normalize_waveform,
            "language_adapters": False,
            "frame_count": "s3prl",
        },
        "llm": {
            "name_or_path": llm,
            "revision": options.llm_revision,
            "dtype": options.llm_dtype,
            "load_in_8bit": options.load_in_8bit,
            # ESPnet resized the LLM to the token list before training (its softmax never saw the padding
            # rows).
            "output_rows": "tokenizer",
        },
        "adaptor": asdict(adaptor_cfg),
        # The reference's LID label order depends on its training data and is not published.
        "language_ids": {},
        "prompt": {"prefix": arch.prefix, "postfix": arch.postfix},
        "ctc_head": {"blank_id": ESPNET_CTC_BLANK, **({"weights": CTC_HEAD_FILE} if ctc_head else {})},
        "imported_from": {
            "format": "espnet",
            "source": source or str(repo_dir),
            "config": str(repo.config_path.relative_to(repo.root)),
            "model_file": str(repo.model_path.relative_to(repo.root)),
            "dropped": mapped.dropped,
            **({"equal_to_sources": checks} if checks else {}),
        },
    }

    def write_parts(tmp: Path) -> None:
        encoder.save_pretrained(tmp / SPEECH_ENCODER_FOLDER)
        if ctc_head:
            save_file(
                {k: v.contiguous() for k, v in ctc_head.items()},
                str(tmp / CTC_HEAD_FILE),
                metadata={"format": FORMAT},
            )

    save_model_dir(model, spec, out_dir, write_parts=write_parts)
    log.info(
        "imported %s (%s stage) into %s; dropped %s", repo.model_path, arch.stage, out_dir, mapped.dropped
    )
    return spec


# BloomzMMS speech-side prefixes -> ESPnet's, most specific first (for naming keys in errors).
ESPNET_PREFIXES = (
    ("frontend.layer_weights", "frontend.featurizer.weights"),
    ("frontend.proj.", "preencoder.linear_out."),
    ("adaptor.embed.out.", "encoder.embed.out.0."),
    ("adaptor.lid_ctc.", "lid_ctc."),
    ("adaptor.postencoder.", "postencoder."),
    ("adaptor.", "encoder."),
)


def source_equality(
    encoder: PreTrainedModel, ctc_head: Mapping[str, torch.Tensor], options: ImportOptions, llm: str
) -> dict[str, Any]:
    """Whether the file's frozen parts equal their sources: the upstream vs. `options.speech_encoder`'s
    weights (adapters aside) and the CTC head vs. the LLM's input embeddings cut to the vocabulary (the
    reference's embedding initialisation was skipped on a size mismatch, so its CTC head may be a random
    init)."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if Path(options.speech_encoder).exists() else {"revision": options.speech_encoder_revision}
    config = speech_encoder_config(options.speech_encoder, options.speech_encoder_revision)
    source = AutoModel.from_pretrained(options.speech_encoder, config=config, **kwargs).state_dict()
    differing = [
        k for k, v in encoder.state_dict().items() if k not in source or not torch.equal(v, source[k])
    ]
    checks: dict[str, Any] = {
        f"speech_encoder == {options.speech_encoder}": not differing,
        "speech_encoder tensors differing": len(differing),
    }
    del source
    if ctc_head:
        llm_kwargs = {} if Path(llm).exists() else {"revision": options.llm_revision}
        lm = AutoModelForCausalLM.from_pretrained(llm, **llm_kwargs)
        weight = ctc_head["ctc_lo.weight"]
        rows = lm.get_input_embeddings().weight[: weight.shape[0]]
        checks[f"ctc_head == {llm} input embeddings[:{weight.shape[0]}]"] = bool(
            rows.shape == weight.shape and torch.equal(rows.to(weight.dtype), weight)
        )
    for what, value in checks.items():
        log.info("check: %s: %s", what, value)
    return checks


def espnet_name(key: str) -> str:
    """The ESPnet name of a BloomzMMS speech-side key (for error messages)."""
    for ours, theirs in ESPNET_PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return key


def check_ctc_head(
    weights: dict[str, torch.Tensor], arch: EspnetArchitecture, adaptor: AdaptorConfig, where: Path
) -> dict[str, torch.Tensor]:
    """The CTC head of a CTC repository: [vocab, llm_hidden] without bias; CE repositories have none."""
    if arch.stage != "ctc":
        if weights:
            raise CheckpointImportError(
                f"{where}: an LLM-decoder (ctc_weight 0) model carries ctc.* tensors {sorted(weights)}"
            )
        return {}
    if "ctc_lo.weight" not in weights:
        raise CheckpointImportError(f"{where}: ctc.ctc_lo.weight is missing (a CTC model's frozen head)")
    shape = tuple(weights["ctc_lo.weight"].shape)
    if shape != (arch.vocab_size, adaptor.llm_hidden_size):
        raise CheckpointImportError(
            f"{where}: ctc.ctc_lo.weight has shape {shape}, expected "
            f"({arch.vocab_size}, {adaptor.llm_hidden_size}) (token_list x postencoder "
            "output_size)"
        )
    return weights


# ------------------------------------------------------------------------------------------------ Kang & Roy

KANG_ROY_WRAPPER = "audio_encoder"
# torch < 2.1 weight-norm names -> the parametrization names of torch >= 2.1 / transformers 5.
WEIGHT_NORM_RENAMES: tuple[tuple[str, str], ...] = (
    (r"(.*)\.weight_g", r"\1.parametrizations.weight.original0"),
    (r"(.*)\.weight_v", r"\1.parametrizations.weight.original1"),
)


def kang_roy_state(state: Mapping[str, Any], where: Path) -> dict[str, torch.Tensor]:
    """The audio encoder's tensors from a released file: flat `AudioEncoder.state_dict()` or a training
    checkpoint `{"audio_encoder": ...}` (wonjune-kang/llm-speech-summarization@8336630:trainer.py,
    inference.py), with old weight-norm names renamed."""
    if KANG_ROY_WRAPPER in state:
        state = state[KANG_ROY_WRAPPER]
        if not isinstance(state, Mapping):
            raise CheckpointImportError(f"{where}: {KANG_ROY_WRAPPER} is not a state dict")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointImportError(f"{where}: {key} holds a {type(value).__name__}, not a tensor")
        out[rename(key, WEIGHT_NORM_RENAMES) or key] = value
    return out


def import_kang_roy(checkpoint: Path, out_dir: Path, models_cfg: dict[str, Any]) -> dict[str, Any]:
    """Write a Kang & Roy model directory (stage `kd`) from the released audio-encoder checkpoint.

    `models_cfg` is the `models` config section (speech_summarization.yaml): the HuBERT architecture and the
    chat LLM it was trained for; the encoder weights all come from the file.
    """
    state = kang_roy_state(load_state(checkpoint), checkpoint)
    enc_cfg = models_cfg["speech_encoder"]
    kwargs = {} if Path(enc_cfg["name_or_path"]).exists() else {"revision": enc_cfg.get("revision")}
    hubert = AutoModel.from_config(AutoConfig.from_pretrained(enc_cfg["name_or_path"], **kwargs))
    encoder = HubertPoolEncoder(
        hubert, llm_hidden_size(models_cfg["llm"]), PoolConfig(**models_cfg["pooling"])
    )
    load_exactly(encoder, state, checkpoint, "Kang & Roy audio encoder")

    class _Encoder(torch.nn.Module):  # KangRoy's names: the audio encoder is its `encoder`
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def trainable_state_dict(self) -> dict[str, torch.Tensor]:
            return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    spec = {
        **kang_roy_spec(models_cfg, stage="kd"),
        "imported_from": {"format": "kang_roy", "source": str(checkpoint)},
    }
    save_model_dir(_Encoder(), spec, out_dir)  # type: ignore[arg-type]
    log.info("imported %s into %s", checkpoint, out_dir)
    return spec
