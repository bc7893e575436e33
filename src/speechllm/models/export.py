"""Model directories: `speechllm.json` (what it is, its parts, prompt defaults) + `model.safetensors`
(the trained weights). Frozen parts (speech encoder, LLM) are referenced by `from_pretrained` id."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForCausalLM, AutoTokenizer

from speechllm import __version__
from speechllm.io import atomic_dir, read_json
from speechllm.models.adaptor import AdaptorConfig, SpeechAdaptor
from speechllm.models.bloomzmms import BloomzMMS
from speechllm.models.ctc_head import CTCHead
from speechllm.models.encoder_inputs import LOG_MEL_FAMILIES, encoder_only, input_family
from speechllm.models.frontend import SpeechFrontend, without_language_adapters
from speechllm.models.hubert_pool import HubertPoolEncoder, PoolConfig
from speechllm.models.kang_roy import ChatTemplate, KangRoy, chat_ids
from speechllm.models.lora import add_lora, is_lora_weight
from speechllm.models.prompt_format import (
    FRAME_KEY,
    frame_from_record,
    frame_from_spec,
    frame_record,
    prompt_frame,
)
from speechllm.models.speech_llm import SpeechLLM

FORMAT = "speechllm-model/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KINDS = ("bloomzmms", "kang_roy")
# The frozen parts a spec references by `name_or_path` (a hub id or a local path). A model directory packaged
# for the hub (`speechllm push`) carries local parts inside itself; `"bundled": "<folder>"` names where.
MODEL_PARTS = ("speech_encoder", "llm")
BUNDLED_KEY = "bundled"
# A CTC head kept apart from the trained weights (`ctc_head.weights` in the spec): an imported model's frozen
# head, which comes from its checkpoint instead of being cut from the LLM's embeddings
# (speechllm.models.espnet_import).
CTC_HEAD_FILE = "ctc_head.safetensors"


class ModelDirError(ValueError):
    """A model directory that cannot be loaded; the message names the directory and what is wrong."""


def llm_spec(llm_cfg: dict[str, Any]) -> dict[str, Any]:
    """The LLM part of a spec: what loads it, and its LoRA adapters when `models.llm.lora` is set."""
    spec = {k: llm_cfg[k] for k in ("name_or_path", "revision", "dtype", "load_in_8bit")}
    if (
        llm_cfg.get("output_rows", "model") != "model"
    ):  # absent in model directories written before the switch
        spec["output_rows"] = llm_cfg["output_rows"]
    if llm_cfg.get("lora"):
        spec["lora"] = dict(llm_cfg["lora"])
    return spec


def output_rows(llm_spec: dict[str, Any], tokenizer: Any) -> int | None:
    """The speech LLM's `output_rows`: the tokenizer's size for `output_rows: tokenizer`, else None (all
    rows)."""
    value = llm_spec.get("output_rows", "model")
    if value not in ("model", "tokenizer"):
        raise ModelDirError(f"models.llm.output_rows must be model or tokenizer, not {value!r}")
    return len(tokenizer) if value == "tokenizer" else None


def with_lora(llm: SpeechLLM, spec: dict[str, Any]) -> SpeechLLM:
    """The spec's LoRA adapters on the LLM, in the stages that train through it (not `ctc`: a CTC-stage model
    in front of the LLM, e.g. `ce_init`, is the frozen LLM, which fresh adapters would equal anyway)."""
    lora = spec["llm"].get("lora")
    if lora and spec.get("stage") != "ctc":
        add_lora(llm.lm, lora)
    return llm


def model_spec(
    models_cfg: dict[str, Any], adaptor: AdaptorConfig, language_ids: dict[str, int], stage: str
) -> dict[str, Any]:
    """The `speechllm.json` content for a BLOOMZMMS model built from the `models` config section."""
    return {
        "format": FORMAT,
        "kind": "bloomzmms",
        "stage": stage,
        "speechllm_version": __version__,
        "speech_encoder": dict(models_cfg["speech_encoder"]),
        "llm": llm_spec(models_cfg["llm"]),
        "adaptor": asdict(adaptor),
        "language_ids": language_ids,
        "prompt": dict(models_cfg["prompt"]),
        **({"ctc_head": dict(models_cfg["ctc_head"])} if "ctc_head" in models_cfg else {}),
    }


def kang_roy_spec(models_cfg: dict[str, Any], stage: str) -> dict[str, Any]:
    """The `speechllm.json` content for a Kang & Roy model (HuBERT + pooling into a frozen chat LLM)."""
    return {
        "format": FORMAT,
        "kind": "kang_roy",
        "stage": stage,
        "speechllm_version": __version__,
        "speech_encoder": dict(models_cfg["speech_encoder"]),
        "llm": llm_spec(models_cfg["llm"]),
        "pooling": dict(models_cfg["pooling"]),
        "chat": dict(models_cfg["chat"]),
        "prompt": dict(models_cfg["prompt"]),
    }


class QuantizationUnavailable(RuntimeError):
    """8-bit loading was asked for on a machine that cannot do it."""


def check_8bit_support() -> None:
    """bitsandbytes' LLM.int8() needs the package and a CUDA device; say which is missing."""
    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if missing:
        raise QuantizationUnavailable(
            f"models.llm.load_in_8bit is true but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not available; set load_in_8bit: false to load the "
            "LLM in models.llm.dtype (bfloat16 at paper scale)"
        )


def _hub_kwargs(part_cfg: dict[str, Any]) -> dict[str, Any]:
    """`from_pretrained` keywords of a model part: its revision when `name_or_path` is a hub id."""
    return {"revision": part_cfg.get("revision")} if _is_hub(part_cfg["name_or_path"]) else {}


def load_tokenizer(llm_cfg: dict[str, Any]):
    return AutoTokenizer.from_pretrained(llm_cfg["name_or_path"], **_hub_kwargs(llm_cfg))


def llm_hidden_size(llm_cfg: dict[str, Any]) -> int:
    """The LLM's embedding width from its config alone (no weights loaded)."""
    return int(AutoConfig.from_pretrained(llm_cfg["name_or_path"], **_hub_kwargs(llm_cfg)).hidden_size)


def load_llm(llm_cfg: dict[str, Any], device: torch.device | str = "cpu", stored_dtype: bool = False):
    """The frozen causal LM and its tokenizer through the hub-style `from_pretrained` calls; in
    `models.llm.dtype`, or with `stored_dtype` in the precision its weights are stored in."""
    if llm_cfg.get("load_in_8bit"):
        check_8bit_support()
    kwargs = _hub_kwargs(llm_cfg)
    tokenizer = load_tokenizer(llm_cfg)
    if llm_cfg.get("load_in_8bit"):
        from transformers import BitsAndBytesConfig  # optional: needs bitsandbytes and a GPU

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    lm = AutoModelForCausalLM.from_pretrained(
        llm_cfg["name_or_path"], dtype="auto" if stored_dtype else DTYPES[llm_cfg["dtype"]], **kwargs
    )
    if not llm_cfg.get("load_in_8bit"):
        lm = lm.to(device)
    return lm, tokenizer


def _is_hub(name: str) -> bool:
    return not Path(name).exists()


def build_kang_roy(
    spec: dict[str, Any],
    with_llm: bool,
    device: torch.device | str = "cpu",
    gradient_checkpointing: bool = False,
) -> tuple[KangRoy, Any]:
    """A KangRoy from a spec: trainable HuBERT encoder + pooling, frozen chat LLM. Returns (model,
    tokenizer)."""
    enc_cfg = spec["speech_encoder"]
    if enc_cfg.get("normalize_waveform"):
        raise ModelDirError(
            "kang_roy reads the raw waveform, as the reference: models.speech_encoder."
            "normalize_waveform must be false"
        )
    if spec["llm"].get("output_rows", "model") != "model":
        raise ModelDirError(
            "kang_roy distils over every row of the LM head, as the reference: models.llm."
            "output_rows must be model"
        )
    if enc_cfg.get("frame_count", "conv") != "conv":
        raise ModelDirError(
            "kang_roy pools HuBERT's own frames, as the reference: models.speech_encoder."
            "frame_count must be conv"
        )
    hubert = encoder_only(AutoModel.from_pretrained(enc_cfg["name_or_path"], **_hub_kwargs(enc_cfg)))
    if with_llm:
        lm, tokenizer = load_llm(spec["llm"], device)
        hidden_size = lm.get_input_embeddings().weight.shape[1]
        # The reference sets pad = eos (MiniChat's tokenizer has no pad token).
        eos = kang_roy_frame(spec, tokenizer)[2]
        llm = with_lora(SpeechLLM(lm, pad_token_id(tokenizer), eos, gradient_checkpointing), spec)
    else:  # the encoder alone (e.g. the untrained model's export): the LLM's width and tokenizer suffice
        tokenizer, hidden_size, llm = load_tokenizer(spec["llm"]), llm_hidden_size(spec["llm"]), None
    encoder = HubertPoolEncoder(
        hubert, hidden_size, PoolConfig(**spec["pooling"]), load_feature_extractor(enc_cfg, hubert.config)
    )
    prefix, suffix, _ = kang_roy_frame(spec, tokenizer)
    model = KangRoy(encoder, llm, prefix, suffix, bool(spec["chat"].get("label_eos", False)))
    return model.to(device), tokenizer


def kang_roy_frame(spec: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int], int]:
    """(chat prefix ids, suffix ids, eos) of a Kang & Roy spec: the configured MiniChat-style strings
    (`chat.format: strings`, the reference), or the tokenizer's own chat template
    (`chat.format: tokenizer`)."""
    chat = {k: v for k, v in spec["chat"].items() if k not in ("label_eos", "format", "system")}
    if spec["chat"].get("format", "strings") == "tokenizer":
        if FRAME_KEY in spec["chat"]:  # recorded when the model was built (see frame_from_spec)
            frame = frame_from_record(spec["chat"][FRAME_KEY])
        else:
            frame = prompt_frame(tokenizer, "chat", spec["chat"].get("system"))
            spec["chat"][FRAME_KEY] = frame_record(frame)
        return list(frame.head), list(frame.tail), frame.eos_token_id
    prefix, suffix = chat_ids(tokenizer, ChatTemplate(**chat))
    return prefix, suffix, int(tokenizer.eos_token_id)


def load_speech_encoder(enc_cfg: dict[str, Any]):
    """The frozen speech encoder of a BLOOMZMMS spec, without MMS language adapters unless
    `language_adapters` is true (specs written before the key existed loaded the hub config as it is)."""
    kwargs = _hub_kwargs(enc_cfg)
    config = AutoConfig.from_pretrained(enc_cfg["name_or_path"], **kwargs)
    if not enc_cfg.get("language_adapters", True):
        config = without_language_adapters(config)
    return encoder_only(AutoModel.from_pretrained(enc_cfg["name_or_path"], config=config, **kwargs))


def load_feature_extractor(enc_cfg: dict[str, Any], config: Any) -> Any:
    """The encoder's own feature extractor for the log-mel families (Whisper, w2v-BERT 2.0); None for waveform
    encoders, which read the samples (normalised or not by models.speech_encoder.normalize_waveform)."""
    if input_family(config) not in LOG_MEL_FAMILIES:
        return None
    return AutoFeatureExtractor.from_pretrained(enc_cfg["name_or_path"], **_hub_kwargs(enc_cfg))


def pad_token_id(tokenizer: Any) -> int:
    """The id that fills left padding: the tokenizer's pad token, else its eos (Llama 3, MiniChat have no
    pad)."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def ctc_blank_id(spec: dict[str, Any], tokenizer: Any) -> int:
    """The CTC blank of a spec (`ctc_head.blank_id`, config models.ctc_head.blank_id), checked against the
    tokenizer: a token id, or a token string the tokenizer knows (e.g. "<|endoftext|>" for Qwen, whose id 0 is
    "!", a real transcript token). Specs written before the key existed trained with the pad token as the
    blank."""
    blank = spec.get("ctc_head", {}).get("blank_id")
    if blank is None:
        return int(tokenizer.pad_token_id)
    if isinstance(blank, str):
        token = blank
        blank = tokenizer.convert_tokens_to_ids(token)
        if blank is None or blank == tokenizer.unk_token_id and token != tokenizer.unk_token:
            raise ModelDirError(
                f"models.ctc_head.blank_id {token!r} is not a token of the tokenizer of "
                f"{spec['llm']['name_or_path']}"
            )
    if not 0 <= int(blank) < len(tokenizer):
        raise ModelDirError(
            f"models.ctc_head.blank_id {blank} is not a token id of the {len(tokenizer)}-token "
            f"tokenizer of {spec['llm']['name_or_path']}"
        )
    return int(blank)


@torch.no_grad()
def input_embedding_rows(lm: Any, vocab_size: int) -> torch.Tensor:
    """(V, H) what the LLM's input-embedding module makes of token ids 0..V-1 (V = the tokenizer's size,
    cutting the padded rows): its weight rows, times the scale where the module applies one (Gemma 3's
    `embed_scale`), so the CTC head scores speech vectors in the space the LLM reads token embeddings in. Tied
    or untied output layers make no difference: the input embeddings are used."""
    embeddings = lm.get_input_embeddings()
    rows = embeddings.weight.shape[0]
    if vocab_size > rows:
        raise ModelDirError(f"the tokenizer has {vocab_size} tokens but the LLM only {rows} embedding rows")
    return embeddings(torch.arange(vocab_size, device=embeddings.weight.device))


def build_model(
    spec: dict[str, Any],
    with_ctc: bool,
    with_llm: bool,
    device: torch.device | str = "cpu",
    gradient_checkpointing: bool = False,
) -> tuple[BloomzMMS | KangRoy, Any]:
    """A BloomzMMS from a spec; the CTC head is cut from the LLM's input embeddings. Returns (model,
    tokenizer).

    Specs of kind `kang_roy` build a KangRoy instead (it has no CTC head).
    """
    if spec.get("kind") == "kang_roy":
        if with_ctc:
            raise ModelDirError("a kang_roy model has no CTC head (with_ctc=True)")
        return build_kang_roy(spec, with_llm, device, gradient_checkpointing)
    enc_cfg = spec["speech_encoder"]
    encoder = load_speech_encoder(enc_cfg)
    adaptor_cfg = AdaptorConfig(**spec["adaptor"])
    frontend = SpeechFrontend(
        encoder,
        adaptor_cfg.input_dim,
        enc_cfg["normalize_waveform"],
        frame_count=enc_cfg.get("frame_count", "conv"),
        feature_extractor=load_feature_extractor(enc_cfg, encoder.config),
    )
    adaptor = SpeechAdaptor(adaptor_cfg)
    if with_ctc and not with_llm and spec.get("ctc_head", {}).get("weights"):
        # The head is stored in the model directory (load_model_dir fills it in): the LLM is not loaded at
        # all.
        tokenizer = load_tokenizer(spec["llm"])
        ctc_head = CTCHead(llm_hidden_size(spec["llm"]), len(tokenizer))
        model = BloomzMMS(frontend, adaptor, ctc_head, None, ctc_blank_id=ctc_blank_id(spec, tokenizer))
        return model.to(device), tokenizer
    # Without the LLM in the model, only its input embeddings (the CTC head) are read: 8-bit loading would not
    # change them (LLM.int8() quantises linear layers) and needs a GPU, so the init / CTC steps load it
    # plainly, in the precision it is stored in: the reference exported the head from the LLM loaded at the
    # fp32 default (DigitalPhonetics/bloomzmms@77dc192:espnet-bloomzmms-files/egs2/fleurs/asr1/local/
    # export_hf_embed_tokens.py), which keeps the stored values exactly; models.llm.dtype bfloat16 would
    # round fp16- or fp32-stored embeddings.
    if with_llm:
        lm, tokenizer = load_llm(spec["llm"], device)
    else:
        lm, tokenizer = load_llm({**spec["llm"], "load_in_8bit": False}, device, stored_dtype=True)
    ctc_head = (
        CTCHead.from_embeddings(input_embedding_rows(lm, len(tokenizer)), len(tokenizer))
        if with_ctc
        else None
    )
    frame = frame_from_spec(tokenizer, spec["prompt"])
    spec["prompt"][FRAME_KEY] = frame_record(
        frame
    )  # exported with the model: inference prompts as training did
    llm = (
        SpeechLLM(
            lm,
            pad_token_id(tokenizer),
            frame.eos_token_id,
            gradient_checkpointing,
            output_rows(spec["llm"], tokenizer),
        )
        if with_llm
        else None
    )
    if llm is not None:
        with_lora(llm, spec)
    model = BloomzMMS(
        frontend,
        adaptor,
        ctc_head,
        llm,
        ctc_blank_id=ctc_blank_id(spec, tokenizer),
        prompt_head=frame.head,
        prompt_tail=frame.tail,
    )
    return model.to(device), tokenizer


def save_model_dir(
    model: BloomzMMS | KangRoy,
    spec: dict[str, Any],
    out_dir: Path,
    extra: dict[str, Any] | None = None,
    write_parts: Callable[[Path], None] | None = None,
) -> None:
    """Write weights and spec; the directory appears complete or not at all (temp dir + rename).
    `write_parts` writes further files (bundled parts) into the directory before it appears."""
    with atomic_dir(out_dir) as tmp:
        if write_parts is not None:
            write_parts(tmp)
        save_file(model.trainable_state_dict(), str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "speechllm.json").write_text(
            json.dumps({**spec, **(extra or {})}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def read_spec(model_dir: Path) -> dict[str, Any]:
    """A model directory's `speechllm.json`, parts stored inside the directory resolved to their paths."""
    spec = read_raw_spec(model_dir)
    for part in MODEL_PARTS:
        folder = spec.get(part, {}).get(BUNDLED_KEY)
        if folder is None:
            continue
        location = Path(model_dir) / folder
        if (
            not isinstance(folder, str)
            or Path(folder).is_absolute()
            or ".." in Path(folder).parts
            or not location.is_dir()
        ):
            raise ModelDirError(
                f"{Path(model_dir) / 'speechllm.json'}: {part}.{BUNDLED_KEY} must name a "
                f"folder inside the model directory; {folder!r} does not"
            )
        spec[part] = {**spec[part], "name_or_path": str(location)}
    return spec


def read_raw_spec(model_dir: Path) -> dict[str, Any]:
    """A model directory's `speechllm.json` as written (checked for format and kind)."""
    path = Path(model_dir) / "speechllm.json"
    if not path.is_file():
        raise ModelDirError(f"not a speechllm model directory (no speechllm.json): {model_dir}")
    spec = read_json(path)
    if spec.get("format") != FORMAT:
        raise ModelDirError(f"{path}: unsupported format {spec.get('format')!r} (expected {FORMAT})")
    if spec.get("kind", "bloomzmms") not in KINDS:
        raise ModelDirError(f"{path}: unknown model kind {spec.get('kind')!r} (expected one of {KINDS})")
    return spec


def load_model_dir(
    model_dir: Path,
    with_ctc: bool,
    with_llm: bool,
    device: torch.device | str = "cpu",
    gradient_checkpointing: bool = False,
    dtype: str | None = None,
) -> tuple[BloomzMMS | KangRoy, Any, dict[str, Any]]:
    """Load an exported model: (model, tokenizer, spec).

    `dtype` (a DTYPES key) loads the LLM in it instead of its spec's `llm.dtype` and casts the rest of the
    model to it after the trained weights are in; None keeps the spec's LLM dtype and float32 elsewhere.
    """
    spec = read_spec(model_dir)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ModelDirError(f"unknown dtype {dtype!r} (expected one of {sorted(DTYPES)})")
        spec = {**spec, "llm": {**spec["llm"], "dtype": dtype}}
    model, tokenizer = build_model(spec, with_ctc, with_llm, device, gradient_checkpointing)
    load_trained_weights(model, Path(model_dir) / "model.safetensors")
    if with_ctc:
        load_ctc_head_file(model, spec, Path(model_dir))
    if dtype is not None:
        model.to(DTYPES[dtype])
    return model, tokenizer, spec


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A model directory's safetensors file; a missing, truncated or garbled one is an error naming it
    (safetensors' own error for a damaged header names no file)."""
    if not Path(path).is_file():
        raise ModelDirError(f"{path}: missing")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type (SafetensorError)
        raise ModelDirError(f"{path}: unreadable ({type(err).__name__}: {err})") from err


def load_ctc_head_file(model: BloomzMMS | KangRoy, spec: dict[str, Any], model_dir: Path) -> None:
    """Replace the CTC head cut from the LLM's embeddings by the one the spec names (`ctc_head.weights`)."""
    name = spec.get("ctc_head", {}).get("weights")
    if name is None:
        return
    if name != CTC_HEAD_FILE:
        raise ModelDirError(
            f"{model_dir / 'speechllm.json'}: ctc_head.weights must be {CTC_HEAD_FILE!r}, not {name!r}"
        )
    path = model_dir / name
    if not path.is_file():
        raise ModelDirError(f"{path}: missing (named by ctc_head.weights)")
    assert isinstance(model, BloomzMMS) and model.ctc_head is not None
    state = read_tensors(path)
    own = model.ctc_head.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise ModelDirError(
            f"{path}: holds {[(k, tuple(v.shape)) for k, v in state.items()]}, the CTC head has "
            f"{[(k, tuple(v.shape)) for k, v in own.items()]} (vocabulary of the tokenizer)"
        )
    model.ctc_head.load_state_dict(state)


def load_trained_weights(model: BloomzMMS | KangRoy, path: Path, fresh_lora: bool = False) -> None:
    """Load trained weights; every stored tensor must match a parameter (frozen parts may be absent).

    `fresh_lora`: the weights come from an earlier stage without LoRA (`--init-from` a CTC model): the LLM's
    adapters keep their fresh initialisation instead of being required."""
    state = read_tensors(path)
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ModelDirError(f"{path}: tensors not in the model: {unknown[:5]}")
    missing = [
        k
        for k, p in model.named_parameters()
        if p.requires_grad and k not in state and not (fresh_lora and is_lora_weight(k))
    ]
    if missing:
        raise ModelDirError(f"{path}: trained tensors missing: {missing[:5]}")
    for key, value in state.items():  # torch's own size-mismatch error names neither file nor spec
        if value.shape != own[key].shape:
            raise ModelDirError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model its speechllm.json describes "
                f"expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=False)
