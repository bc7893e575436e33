"""Tiny random LLMs and speech encoders of each supported family, saved with save_pretrained and loaded back
through the normal `from_pretrained` path (no hub access).

Each LLM family gets a BPE tokenizer with that family's special tokens, its BOS behaviour and a chat template
written here in the family's turn format (the facts of the format: role markers, turn end, BOS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    HubertConfig,
    HubertModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SeamlessM4TFeatureExtractor,
    Wav2Vec2BertConfig,
    Wav2Vec2BertModel,
    WavLMConfig,
    WavLMModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

HIDDEN = 32
SAMPLING_RATE = 16000
TEXTS = [
    "Repeat the sentence: the cat sits on the mat. ",
    "hello world how are you",
    "i am fine thank you",
    "Summarize the following article: the council approved a new park on monday.",
] * 10

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA = (
    "<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{{ m.content }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% endif %}"
)
MISTRAL = (
    "<s>{% for m in messages %}{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{% elif m.role == 'assistant' %}{{ m.content }}</s>{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class TokenizerFamily:
    """Special tokens (in id order from 0), which are BOS / EOS / PAD / UNK, the chat template, the turn end,
    and the token the CTC blank is (config models.ctc_head.blank_id)."""

    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    adds_bos: bool
    template: str
    turn_end: str
    blank: str


TOKENIZERS = {
    "qwen": TokenizerFamily(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        None,
        "<|im_end|>",
        "<|endoftext|>",
        None,
        False,
        CHATML,
        "<|im_end|>",
        "<|endoftext|>",
    ),
    "llama": TokenizerFamily(
        (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ),
        "<|begin_of_text|>",
        "<|eot_id|>",
        None,
        None,
        True,
        LLAMA3,
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    ),
    "gemma": TokenizerFamily(
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
        True,
        GEMMA,
        "<end_of_turn>",
        "<pad>",
    ),
    "mistral": TokenizerFamily(
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        "<s>",
        "</s>",
        None,
        "<unk>",
        True,
        MISTRAL,
        "</s>",
        "<unk>",
    ),
}
# LLM family -> (tokenizer family, tied input/output embeddings).
LLM_FAMILIES = {
    "qwen2": ("qwen", False),
    "qwen3": ("qwen", True),
    "llama": ("llama", False),
    "gemma2": ("gemma", True),
    "gemma3": ("gemma", True),
    "mistral": ("mistral", False),
}
ENCODER_FAMILIES = ("wavlm", "hubert", "whisper", "w2v-bert")


def build_tokenizer(family: TokenizerFamily, out_dir: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=family.unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(family.specials),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS, trainer=trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    if family.adds_bos:
        bos_id = tok.token_to_id(family.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A",
            pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, bos_id)],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token=family.unk,
    )
    fast.chat_template = family.template
    fast.save_pretrained(out_dir)
    return fast


def llm_config(name: str, vocab_size: int, tokenizer: PreTrainedTokenizerFast, tied: bool):
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": tied,
    }
    common = {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **ids,
    }
    if name == "qwen2":
        return Qwen2ForCausalLM, Qwen2Config(**common)
    if name == "qwen3":
        return Qwen3ForCausalLM, Qwen3Config(**common, head_dim=8)
    if name == "llama":
        return LlamaForCausalLM, LlamaConfig(**common)
    if name == "gemma2":
        return Gemma2ForCausalLM, Gemma2Config(
            **common, head_dim=8, query_pre_attn_scalar=8, sliding_window=64
        )
    if name == "gemma3":
        return Gemma3ForCausalLM, Gemma3TextConfig(
            **common, head_dim=8, query_pre_attn_scalar=8, sliding_window=64
        )
    if name == "mistral":
        return MistralForCausalLM, MistralConfig(**common, sliding_window=None)
    raise ValueError(name)


def build_llm(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Tokenizer + a 2-layer causal LM of the family; 6 more embedding rows than tokens (as real checkpoints
    pad the vocabulary), tied or untied as the family's small models."""
    tokenizer_family, tied = LLM_FAMILIES[name]
    family = TOKENIZERS[tokenizer_family]
    tokenizer = build_tokenizer(family, out_dir)
    model_class, config = llm_config(name, len(tokenizer) + 6, tokenizer, tied)
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids(family.turn_end),
    ]
    model.save_pretrained(out_dir)
    return out_dir


def tiny_whisper_config(**overrides: object) -> WhisperConfig:
    """Whisper at width 32 with 16 mel bins and a 100-frame (2 s) window."""
    kwargs = dict(
        d_model=HIDDEN,
        encoder_layers=2,
        encoder_attention_heads=2,
        decoder_layers=1,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=16,
        max_source_positions=100,
        max_target_positions=16,
        vocab_size=64,
        pad_token_id=1,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    return WhisperConfig(**{**kwargs, **overrides})


def tiny_w2v_bert_config(**overrides: object) -> Wav2Vec2BertConfig:
    """w2v-BERT 2.0's conformer at width 32, reading 2 stacked 16-bin fbanks."""
    kwargs = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        feature_projection_input_dim=32,
        conv_depthwise_kernel_size=5,
        vocab_size=16,
    )
    return Wav2Vec2BertConfig(**{**kwargs, **overrides})


def build_encoder(name: str, out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer speech encoder of the family (width 32) with its feature extractor where it reads
    log-mels."""
    torch.manual_seed(seed)
    if name in ("wavlm", "hubert"):
        layout = {
            "hidden_size": HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "conv_dim": (32, 32, 32),
            "conv_stride": (5, 4, 4),
            "conv_kernel": (10, 4, 4),
            "feat_extract_norm": "layer",
            "do_stable_layer_norm": True,
            "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 2,
        }
        model = (
            WavLMModel(WavLMConfig(**layout, num_buckets=16))
            if name == "wavlm"
            else HubertModel(HubertConfig(**layout))
        )
    elif name == "whisper":
        model = WhisperModel(tiny_whisper_config())
        # A 2 s window (200 mel frames -> 100 encoder frames) instead of Whisper's 30 s.
        WhisperFeatureExtractor(feature_size=16, chunk_length=2).save_pretrained(out_dir)
    elif name == "w2v-bert":
        model = Wav2Vec2BertModel(tiny_w2v_bert_config())
        SeamlessM4TFeatureExtractor(feature_size=16, num_mel_bins=16).save_pretrained(out_dir)
    else:
        raise ValueError(name)
    model.save_pretrained(out_dir)
    return out_dir
