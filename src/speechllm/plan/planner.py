"""`speechllm plan`: parameters, memory per GPU and FLOPs per training step of the paper-scale models.

Every model is built on the `meta` device (shapes only, no weights, nothing downloaded) from the architecture
configs in `config/models/<hub name>.json`, so parameter counts are exact. Memory and FLOPs follow these
formulas for one micro-batch on one GPU: B utterances of U seconds each (`plan.utterance_seconds`), B the
busiest GPU's share as the training sampler hands it out (`speechllm.data.bucketing.rank_batch_sizes`: with
`batch_budget: global` the stage's `batch_seconds` and `max_batch_size` hold for the micro-batch of all
`plan.gpus` GPUs, at least one utterance each, split longest first; with `per_rank` each GPU packs the full
budget):

Memory
    weights       trainable: 4 B/param (fp32 master weights, also under bf16 autocast); frozen: the loaded
                  dtype (LLM `models.llm.dtype`, 1 B/param with `load_in_8bit`; speech encoder fp32).
    gradients     4 B per trainable param.
    optimizer     Adam(W): 8 B per trainable param (exp_avg + exp_avg_sq in fp32).
    activations   tensors kept for backward, s = 2 B under bf16 autocast, else 4 B, dropout masks 1 B;
                  attention in HF models is fused (flash / memory-efficient SDPA: no T^2 term); the adaptor's
                  relative-position attention is explicit (B*heads*T^2 scores). Per layer and position
                  (Korthikanti et al. 2022, generalised to FFN size f):
                    trainable transformer layer   (8h + 2f) s  + masks (2h + f)
                    frozen LLM layer on the gradient path (frozen Linear layers keep no input)
                        LLaMA (SwiGLU)  (6h + 3f) s,  BLOOM (GELU)  (6h + f) s
                        (+ BLOOM's ALiBi mask B*heads*L^2*s)
                        with gradient checkpointing only the layer input h*s, plus one layer recomputed
                        at a time
                    E-Branchformer block          see `ebranchformer_activation_elements`
                    frozen speech encoder         nothing (no_grad), but the featurizer keeps all its hidden
                                                  states
                    loss logits                   fp32 log-softmax over the label positions (B*K*V*4), CTC:
                                                  B*T2*V*4
Estimates, not measurements: allocator overhead, the frozen encoder's transient forward peak, CUDA context and
temporary buffers are not counted.

FLOPs (multiply-add = 2 FLOPs; matmuls and convolutions only, as `torch.utils.flop_counter` counts them)
    forward       2 * sum over Linear/Conv weights of (weight size * positions where it is applied) — i.e.
                  2 * params * tokens per part, with each module at its own rate (conv stack at its strides,
                  LM head only on the K label positions) — plus attention 4*B*T^2*h per layer
                  (relative-position attention 8*B*T^2*d: content, position (2T-1 keys) and value products).
    backward      trainable part: 2x forward (input and weight gradients); frozen part on the gradient path:
                  1x its matmuls (input gradients only) + 2x its attention; frozen part before every trainable
                  parameter: 0. Gradient checkpointing adds one more forward of the LLM's decoder layers, less
                  each layer's FFN output projection (torch's non-reentrant checkpoint stops recomputing once
                  it has what backward needs, and a frozen Linear keeps no input). A strided convolution's
                  input gradient is counted at its multiply-adds (= forward); `torch.utils.flop_counter`
                  counts it at the input resolution (zero-stuffed), which is more.
    teacher       Kang & Roy's distillation runs the frozen LLM once more on the transcript prompt (forward
                  only).
Per optimizer step = per micro-batch * `accum_grad` * GPUs (an upper bound when the shares are uneven).

Time (with `plan.mfu` and `plan.gpu`, a key of `plan.gpu_peak_tflops`)
    micro-batch   sum over parts of FLOPs / (mfu * the GPU's peak at the part's compute precision): the
                  stage's `train.<stage>.precision` (bf16 autocast, tf32 or fp32 matmuls), except the LLM,
                  whose weights in `models.llm.dtype` bfloat16/float16 (or 8-bit) run 16-bit matmuls. The
                  busiest GPU's share.
    epoch         `num_iters_per_epoch` micro-batches (ESPnet's iterations); GPU-hours = hours * `plan.gpus`.
    run           `max_epochs` epochs (an upper bound under early stopping), or `max_steps` * `accum_grad`
                  micro-batches when that comes first.
    reference     `plan.reference.<stage>`: the reference's own statement (GPUs, GPU type, hours per epoch),
                  and the MFU it implies for these FLOPs when the GPU type and count match.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    PretrainedConfig,
    SeamlessM4TFeatureExtractor,
    WhisperFeatureExtractor,
)
from transformers.modeling_layers import GradientCheckpointingLayer

from speechllm.data.bucketing import rank_batch_sizes
from speechllm.io import read_json
from speechllm.models.adaptor import AdaptorConfig, SpeechAdaptor, adaptor_config
from speechllm.models.ctc_head import CTCHead
from speechllm.models.encoder_inputs import encoder_only, input_family
from speechllm.models.frames import fbank_frame_count
from speechllm.models.frontend import SpeechFrontend, without_language_adapters
from speechllm.models.hubert_pool import HubertPoolEncoder, PoolConfig
from speechllm.models.lora import add_lora, is_lora_weight

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
TRAINABLE_BYTES = 4  # fp32 master weights
GRAD_BYTES = 4
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASK_BYTES = 1  # dropout masks (bool)

Positions = Callable[[str, nn.Module], float]


class PlanError(ValueError):
    """A config or architecture file the planner cannot use; the message names it."""


# --------------------------------------------------------------------------- architecture configs


def find_arch_file(name_or_path: str, models_dir: Path) -> Path:
    """`<models_dir>/<last part of the hub id>.json`, else the local model directory's `config.json`."""
    candidates = [Path(models_dir) / f"{Path(name_or_path).name}.json", Path(name_or_path) / "config.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise PlanError(
        f"no architecture config for {name_or_path!r}: looked for {', '.join(map(str, candidates))}"
    )


def load_arch_config(name_or_path: str, models_dir: Path) -> tuple[PretrainedConfig, dict[str, Any]]:
    """(HF config, extra facts) from an architecture file; keys starting with `_` are facts, not config."""
    path = find_arch_file(name_or_path, models_dir)
    data = read_json(path)
    facts = {k.lstrip("_"): v for k, v in data.items() if k.startswith("_")}
    settings = {k: v for k, v in data.items() if not k.startswith("_") and k != "transformers_version"}
    if "model_type" not in settings:
        raise PlanError(f"{path}: no model_type")
    model_type = settings.pop("model_type")
    return AutoConfig.for_model(model_type, **settings), facts


def model_from_config(
    config: PretrainedConfig,
    causal_lm: bool,
    device: torch.device | str = "meta",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The HF model (`AutoModelForCausalLM` or the bare `AutoModel`) built on `device`: shapes only on the
    meta device, random weights elsewhere (the GPU benchmark); nothing is downloaded."""
    factory = AutoModelForCausalLM if causal_lm else AutoModel
    with torch.device(device):
        return factory.from_config(config, **({"dtype": dtype} if dtype is not None else {}))


def meta_model(config: PretrainedConfig, causal_lm: bool) -> nn.Module:
    """The HF model with parameters on the meta device."""
    return model_from_config(config, causal_lm)


def lm_from_config(
    config: PretrainedConfig,
    llm_cfg: dict[str, Any],
    device: torch.device | str = "meta",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The frozen causal LM on `device`, with its LoRA adapters (trainable) when `models.llm.lora` is set
    (they act in the CE / KD stages, the only ones that plan the LLM)."""
    lm = model_from_config(config, causal_lm=True, device=device, dtype=dtype)
    lm.requires_grad_(False)
    if llm_cfg.get("lora"):
        add_lora(lm, llm_cfg["lora"])
    return lm


def speech_encoder_from_config(config: PretrainedConfig, device: torch.device | str = "meta") -> nn.Module:
    """The speech encoder as the models use it (an encoder-decoder such as Whisper cut to its encoder)."""
    return encoder_only(model_from_config(config, causal_lm=False, device=device))


def arch_feature_extractor(config: PretrainedConfig, facts: dict[str, Any]) -> Any:
    """A log-mel encoder's feature extractor from the `_feature_extractor` facts of its architecture file (its
    `preprocessor_config.json` values); None for waveform encoders."""
    family = input_family(config)
    if family == "whisper":
        return WhisperFeatureExtractor(**facts.get("feature_extractor", {}))
    if family == "w2v-bert":
        return SeamlessM4TFeatureExtractor(**facts.get("feature_extractor", {}))
    return None


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- FLOPs


def matmul_flops(module: nn.Module, positions: Positions) -> float:
    """2 * weight size * positions over every Linear / Conv layer; `positions(name, layer)` gives where it
    applies (output positions, summed over the batch)."""
    total = 0.0
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Linear | nn.Conv1d | nn.Conv2d):
            total += 2.0 * layer.weight.numel() * positions(name, layer)
    return total


def conv_output_length(length: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (length + 2 * padding - kernel) // stride + 1


def conv_stack_lengths(samples: int, kernels: list[int], strides: list[int]) -> list[int]:
    """Output length of every layer of a wav2vec2-style conv feature extractor."""
    lengths = []
    for kernel, stride in zip(kernels, strides, strict=True):
        samples = conv_output_length(samples, kernel, stride)
        lengths.append(samples)
    return lengths


# --------------------------------------------------------------------------- results


@dataclass
class PartPlan:
    """One model part at one stage: parameters, per-GPU memory (bytes), FLOPs per micro-batch."""

    name: str
    role: str  # trainable | frozen (gradient path) | frozen (no gradient)
    trainable_params: int
    frozen_params: int
    weight_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    forward_flops: float
    backward_flops: float

    @property
    def memory_bytes(self) -> float:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


@dataclass
class Workload:
    """One micro-batch on one GPU."""

    utterances: int  # on the busiest GPU
    utterance_seconds: float
    samples: int  # per utterance
    encoder_frames: int
    speech_embeddings: int
    llm_tokens: int  # prompt + speech + target, per utterance
    label_positions: int  # K positions whose logits the loss reads
    teacher_tokens: int = 0
    step_utterances: int = 0  # of one micro-batch over all GPUs


@dataclass
class StagePlan:
    system: str
    stage: str
    gpus: int
    accum_grad: int
    precision: str
    workload: Workload
    parts: list[PartPlan] = field(default_factory=list)
    estimate: TimeEstimate | None = None

    def totals(self) -> dict[str, float]:
        keys = (
            "trainable_params",
            "frozen_params",
            "weight_bytes",
            "grad_bytes",
            "optimizer_bytes",
            "activation_bytes",
            "forward_flops",
            "backward_flops",
        )
        sums = {k: float(sum(getattr(p, k) for p in self.parts)) for k in keys}
        sums["memory_bytes"] = sum(p.memory_bytes for p in self.parts)
        sums["flops_per_micro_batch"] = sums["forward_flops"] + sums["backward_flops"]
        sums["flops_per_optimizer_step"] = sums["flops_per_micro_batch"] * self.accum_grad * self.gpus
        return sums

    def to_dict(self) -> dict[str, Any]:
        parts = [dict(asdict(p), memory_bytes=p.memory_bytes) for p in self.parts]
        return {
            "system": self.system,
            "stage": self.stage,
            "gpus": self.gpus,
            "accum_grad": self.accum_grad,
            "precision": self.precision,
            "workload": asdict(self.workload),
            "parts": parts,
            "totals": self.totals(),
            "estimate": asdict(self.estimate) if self.estimate else None,
        }


def part_plan(
    name: str,
    module_params: tuple[int, int],
    frozen_dtype_bytes: float,
    activation: float,
    forward: float,
    backward: float,
) -> PartPlan:
    """Memory of a part from its (trainable, frozen) parameter counts."""
    trainable, frozen = module_params
    role = "trainable" if trainable and not frozen else "frozen" if not trainable else "mixed"
    return PartPlan(
        name=name,
        role=role,
        trainable_params=trainable,
        frozen_params=frozen,
        weight_bytes=trainable * TRAINABLE_BYTES + frozen * frozen_dtype_bytes,
        grad_bytes=trainable * GRAD_BYTES,
        optimizer_bytes=trainable * ADAM_BYTES,
        activation_bytes=activation,
        forward_flops=forward,
        backward_flops=backward,
    )


def split_params(module: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, num_params(module) - trainable


# ------------------------------------------------------------------------- speech encoders (wav2vec2 family)


def _conv_layer_index(name: str) -> int | None:
    match = re.search(r"feature_extractor\.conv_layers\.(\d+)\.", name + ".")
    return int(match.group(1)) if match else None


def speech_encoder_flops(
    encoder: nn.Module, batch: int, samples: int, fbank_stride: int = 2
) -> tuple[float, int, list[int]]:
    """Forward FLOPs of a speech encoder on `batch` utterances; also (frames it computes, conv lengths).

    wav2vec2 family: the conv stack at its strides, then the transformer. Whisper: the whole window
    (`max_source_positions` frames, 2x that mel frames for the first convolution) whatever the clip's length.
    w2v-BERT: every layer at the fbank frame rate; relative-key attention adds the query x distance-embedding
    product (2*B*T^2*h per layer)."""
    cfg = encoder.config
    family = input_family(cfg)
    if family == "whisper":
        window = int(cfg.max_source_positions)

        def at_window(name: str, layer: nn.Module) -> float:
            return batch * (2 * window if name == "conv1" else window)

        attention = cfg.encoder_layers * 4.0 * batch * window**2 * cfg.d_model
        return matmul_flops(encoder, at_window) + attention, window, []
    if family == "w2v-bert":
        frames = fbank_frame_count(samples, stride=fbank_stride)
        relative = 2.0 if cfg.position_embeddings_type == "relative_key" else 0.0
        attention = cfg.num_hidden_layers * (4.0 + relative) * batch * frames**2 * cfg.hidden_size
        return matmul_flops(encoder, lambda name, layer: batch * frames) + attention, frames, []
    conv_lengths = conv_stack_lengths(samples, list(cfg.conv_kernel), list(cfg.conv_stride))
    frames = conv_lengths[-1]

    def positions(name: str, layer: nn.Module) -> float:
        index = _conv_layer_index(name)
        return batch * (conv_lengths[index] if index is not None else frames)

    attention = cfg.num_hidden_layers * 4.0 * batch * frames**2 * cfg.hidden_size
    return matmul_flops(encoder, positions) + attention, frames, conv_lengths


def transformer_layer_activation(hidden: int, ffn: int, dropout: bool, act_bytes: int) -> float:
    """Bytes per position of a trainable pre-/post-LN transformer layer with fused attention."""
    return (8 * hidden + 2 * ffn) * act_bytes + (MASK_BYTES * (2 * hidden + ffn) if dropout else 0)


def trainable_speech_encoder_activation(
    encoder: nn.Module,
    batch: int,
    samples: int,
    conv_lengths: list[int],
    act_bytes: int,
    computed_frames: int = 0,
) -> float:
    """Bytes kept for backward by a trainable speech encoder in train mode (HuBERT in Kang & Roy). Log-mel
    encoders (no conv stack lengths): their transformer layers at the `computed_frames` they run on."""
    cfg = encoder.config
    if not conv_lengths:
        frames = computed_frames
        ffn = int(getattr(cfg, "encoder_ffn_dim", None) or cfg.intermediate_size)
        dropout = any(getattr(cfg, k, 0) > 0 for k in ("dropout", "hidden_dropout", "attention_dropout"))
        return (
            batch
            * frames
            * cfg.num_hidden_layers
            * transformer_layer_activation(cfg.hidden_size, ffn, dropout, act_bytes)
        )
    channels = list(cfg.conv_dim)
    conv = 0.0
    previous_length, previous_channels = samples, 1
    for length, width in zip(conv_lengths, channels, strict=True):
        conv += previous_length * previous_channels + 2 * length * width  # conv input, norm input, GELU input
        previous_length, previous_channels = length, width
    frames, hidden = conv_lengths[-1], cfg.hidden_size
    projection = (
        2 * channels[-1] + 2 * hidden
    )  # layer norm + linear inputs, positional conv input + GELU input
    dropout = cfg.hidden_dropout > 0 or cfg.attention_dropout > 0 or cfg.activation_dropout > 0
    per_frame = cfg.num_hidden_layers * transformer_layer_activation(
        hidden, cfg.intermediate_size, dropout, act_bytes
    )
    return batch * (conv * act_bytes + frames * (projection * act_bytes + per_frame))


# --------------------------------------------------------------------------- BLOOMZMMS adaptor


def subsampled(length: int, config: AdaptorConfig) -> tuple[int, int]:
    """`length` (frames or features) after the first and after the second subsampling convolution."""
    once = conv_output_length(length, config.subsampling_kernel, config.subsampling_stride)
    return once, conv_output_length(once, config.subsampling_kernel, config.subsampling_stride)


def adaptor_frames(frames: int, config: AdaptorConfig) -> tuple[int, int]:
    """(T1 after Conv2d subsampling, T2 after the length adaptor) for T0 input frames."""
    t1 = subsampled(frames, config)[1]
    return t1, t1 // config.length_adaptor_ratio


def adaptor_flops(adaptor: SpeechAdaptor, batch: int, frames: int) -> float:
    """Forward FLOPs of the E-Branchformer adaptor."""
    cfg = adaptor.config
    t1, t2 = adaptor_frames(frames, cfg)
    f1, f2 = subsampled(cfg.input_dim, cfg)
    conv_positions = {"embed.conv.0": subsampled(frames, cfg)[0] * f1, "embed.conv.2": t1 * f2}

    def positions(name: str, layer: nn.Module) -> float:
        if name in conv_positions:
            return batch * conv_positions[name]
        if name.endswith("linear_pos"):
            return 2 * t1 - 1  # the relative positions are projected once per batch
        if name.startswith(("lid_ctc", "postencoder")):
            return batch * t2
        return batch * t1

    attention = cfg.num_blocks * 8.0 * batch * t1**2 * cfg.d_model
    return matmul_flops(adaptor, positions) + attention


def ebranchformer_activation_elements(cfg: AdaptorConfig, t1: int) -> tuple[float, float]:
    """(elements in the activation dtype, mask bytes) kept per position by one E-Branchformer block in
    training."""
    d, ff, cg, heads = cfg.d_model, cfg.linear_units, cfg.cgmlp_units, cfg.heads
    macaron = 2 * (3 * d + 2 * ff)  # two half-step FFNs: norm, fc1 and swish inputs, fc2 input
    attention = (
        7 * d + heads * t1 * 2
    )  # norm, qkv input, q+u / q+v / k / v, out input; softmax + dropped scores
    cgmlp = (
        2 * d + 2 * cg + 4 * (cg // 2)
    )  # norm, proj1 in, GELU in, split norm, conv in, gate in x2, proj2 in
    merge = 2 * d + 2 * (2 * d) + 2 * d  # concat, depthwise conv in, merge proj in, final norm in (+residual)
    masks = MASK_BYTES * (heads * t1 + 2 * ff + 6 * d + cg)
    return macaron + attention + cgmlp + merge, masks


def adaptor_activation(adaptor: SpeechAdaptor, batch: int, frames: int, act_bytes: int) -> float:
    cfg = adaptor.config
    t1, t2 = adaptor_frames(frames, cfg)
    per_position, masks = ebranchformer_activation_elements(cfg, t1)
    f1, f2 = subsampled(cfg.input_dim, cfg)
    # conv input, first ReLU output (= second conv input), second ReLU output and its flattened copy
    subsampling = (
        frames * cfg.input_dim + subsampled(frames, cfg)[0] * f1 * cfg.d_model + 2 * t1 * f2 * cfg.d_model
    )
    heads = 2 * t2 * cfg.d_model + t1 * cfg.num_lid_classes  # length adaptors, LID softmax / conditioning
    per_utterance = (
        cfg.num_blocks * t1 * (per_position * act_bytes + masks) + (subsampling + heads) * act_bytes
    )
    return batch * per_utterance


# --------------------------------------------------------------------------- LLM

# Decoder families whose FFN is gated (SwiGLU / GeGLU: gate, up and down projections).
GATED_FFN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")


def llm_layer_activation(config: PretrainedConfig, act_bytes: int) -> float:
    """Bytes per position kept by one frozen decoder layer on the gradient path (fused attention)."""
    hidden, ffn = llm_hidden_size(config), llm_ffn_size(config)
    gated = config.model_type in GATED_FFN_FAMILIES
    return (6 * hidden + (3 if gated else 1) * ffn) * act_bytes


def llm_hidden_size(config: PretrainedConfig) -> int:
    return int(config.hidden_size)


def llm_ffn_size(config: PretrainedConfig) -> int:
    return int(getattr(config, "intermediate_size", None) or 4 * config.hidden_size)


def llm_layers(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)


def llm_heads(config: PretrainedConfig) -> int:
    return int(config.num_attention_heads)


def llm_flops(
    lm: nn.Module, batch: int, tokens: int, label_positions: int
) -> tuple[float, float, float, float]:
    """(decoder-layer matmul FLOPs, attention FLOPs, LM-head FLOPs, FLOPs of each layer's last Linear) of one
    forward pass. A frozen layer's last Linear (the FFN output projection) keeps no input for backward, so
    non-reentrant checkpointing stops its recomputation before it (torch's early stop)."""
    head = lm.get_output_embeddings()
    head_names = {name for name, module in lm.named_modules() if module is head}

    def positions(name: str, layer: nn.Module) -> float:
        return batch * (label_positions if name in head_names else tokens)

    total = matmul_flops(lm, positions)
    head_flops = 2.0 * head.weight.numel() * batch * label_positions
    attention = llm_layers(lm.config) * 4.0 * batch * tokens**2 * llm_hidden_size(lm.config)
    tails = 0.0
    for layer in (m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)):
        last = [m for m in layer.modules() if isinstance(m, nn.Linear)][-1]
        tails += 2.0 * last.weight.numel() * batch * tokens
    return total - head_flops, attention, head_flops, tails


def llm_part(
    lm: nn.Module, workload: Workload, llm_cfg: dict[str, Any], act_bytes: int, losses: int
) -> PartPlan:
    """The frozen LLM on the gradient path (student), plus the teacher forward when
    `workload.teacher_tokens`."""
    batch, tokens, labels = workload.utterances, workload.llm_tokens, workload.label_positions
    config = lm.config
    layers_flops, attention, head_flops, tails = llm_flops(lm, batch, tokens, labels)
    forward = layers_flops + attention + head_flops
    backward = layers_flops + 2 * attention + head_flops
    checkpointing = bool(llm_cfg.get("gradient_checkpointing"))
    hidden, vocab = llm_hidden_size(config), lm.get_output_embeddings().weight.shape[0]
    per_layer = llm_layer_activation(config, act_bytes)
    if llm_cfg.get("lora"):  # the adapted projections keep their inputs (attention input and output: ~2h)
        per_layer += 2 * hidden * act_bytes
    if checkpointing:
        backward += layers_flops - tails + attention  # recomputed forward of the decoder layers
        activation = batch * tokens * (llm_layers(config) * hidden * act_bytes + per_layer)
    else:
        activation = batch * tokens * llm_layers(config) * per_layer
    if config.model_type == "bloom":  # ALiBi + causal mask materialised for SDPA, shared by all layers
        activation += batch * llm_heads(config) * tokens**2 * act_bytes
    activation += losses * batch * labels * vocab * 4  # fp32 log-softmax of the label logits per loss term
    if workload.teacher_tokens:
        t_layers, t_attention, t_head, _ = llm_flops(lm, batch, workload.teacher_tokens, labels)
        forward += t_layers + t_attention + t_head
    weight_bytes = 1 if llm_cfg.get("load_in_8bit") else DTYPE_BYTES[llm_cfg["dtype"]]
    adapters = sum(
        p.numel() for name, p in lm.named_parameters() if is_lora_weight(name)
    )  # the rest is frozen
    return part_plan(
        "llm", (adapters, num_params(lm) - adapters), weight_bytes, activation, forward, backward
    )


# --------------------------------------------------------------------------- systems


def _activation_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


def workload_for(
    cfg: dict[str, Any], stage: str, frames_fn: Callable[[int], tuple[int, int]], samples: int, teacher: bool
) -> tuple[Workload, int]:
    """Per-GPU micro-batch geometry from `train.<stage>` and `plan`; returns (workload, gpus)."""
    plan_cfg = cfg["plan"]
    stage_cfg = cfg["train"][stage]
    gpus = int(plan_cfg["gpus"].get(stage, 1))
    seconds = float(plan_cfg["utterance_seconds"])
    try:
        shares = rank_batch_sizes(
            seconds,
            float(stage_cfg["batch_seconds"]),
            gpus,
            stage_cfg.get("batch_budget", "global"),
            stage_cfg.get("max_batch_size"),
        )
    except ValueError as error:
        raise PlanError(f"config keys 'train.{stage}' / 'plan.gpus.{stage}': {error}") from None
    frames, speech = frames_fn(samples)
    targets = math.ceil(plan_cfg["target_tokens_per_second"] * seconds)
    prompt = int(plan_cfg["prompt_tokens"])
    teacher_tokens = prompt + math.ceil(plan_cfg.get("transcript_tokens_per_second", 0) * seconds) + targets
    workload = Workload(
        utterances=max(shares),
        utterance_seconds=seconds,
        samples=samples,
        encoder_frames=frames,
        speech_embeddings=speech,
        llm_tokens=prompt + speech + targets,
        label_positions=targets + 1,
        teacher_tokens=teacher_tokens if teacher else 0,
        step_utterances=sum(shares),
    )
    return workload, gpus


@dataclass
class BloomzmmsParts:
    """The BLOOMZMMS modules built from the architecture configs (the LLM apart: see `frozen_llm`)."""

    enc_config: PretrainedConfig
    llm_config: PretrainedConfig
    adaptor_config: AdaptorConfig
    vocab: int  # the tokenizer's size: the CTC head's rows
    encoder: nn.Module
    features: Any  # a log-mel encoder's feature extractor; None for waveform encoders
    frontend: SpeechFrontend
    adaptor: SpeechAdaptor
    ctc_head: CTCHead


def bloomzmms_parts(
    cfg: dict[str, Any], models_dir: Path, device: torch.device | str = "meta"
) -> BloomzmmsParts:
    """Frozen speech encoder, frontend, adaptor and (random, frozen) CTC head on `device`, as
    `speechllm.models.export.build_model` assembles them from the hub."""
    models_cfg = cfg["models"]
    enc_cfg = models_cfg["speech_encoder"]
    enc_config, enc_facts = load_arch_config(enc_cfg["name_or_path"], models_dir)
    if not enc_cfg["language_adapters"]:  # built as `speechllm.models.export.load_speech_encoder` builds it
        enc_config = without_language_adapters(enc_config)
    llm_config, llm_facts = load_arch_config(models_cfg["llm"]["name_or_path"], models_dir)
    # lid_classes null: one class per configured language + blank (what `data language-ids` finds when all
    # have data)
    adaptor_cfg = adaptor_config(
        models_cfg["adaptor"], len(cfg["data"]["languages"]), llm_hidden_size=llm_hidden_size(llm_config)
    )
    encoder = speech_encoder_from_config(enc_config, device)
    features = arch_feature_extractor(enc_config, enc_facts)
    vocab = int(llm_facts.get("tokenizer_vocab_size", llm_config.vocab_size))
    with torch.device(device):
        try:
            frontend = SpeechFrontend(
                encoder,
                adaptor_cfg.input_dim,
                enc_cfg["normalize_waveform"],
                frame_count=enc_cfg["frame_count"],
                feature_extractor=features,
            )
        except ValueError as error:
            raise PlanError(f"config key 'models.speech_encoder': {error}") from None
        adaptor = SpeechAdaptor(adaptor_cfg)
        ctc_head = CTCHead(llm_hidden_size(llm_config), vocab)
    return BloomzmmsParts(
        enc_config, llm_config, adaptor_cfg, vocab, encoder, features, frontend, adaptor, ctc_head
    )


def frozen_llm(
    cfg: dict[str, Any],
    models_dir: Path,
    device: torch.device | str = "meta",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The experiment's causal LM (`models.llm`) from its architecture config, frozen."""
    config, _ = load_arch_config(cfg["models"]["llm"]["name_or_path"], models_dir)
    return lm_from_config(config, cfg["models"]["llm"], device, dtype)


def kang_roy_encoder(
    cfg: dict[str, Any], models_dir: Path, device: torch.device | str = "meta"
) -> HubertPoolEncoder:
    """Kang & Roy's trainable HuBERT + pooling + projection to the LLM's width."""
    models_cfg = cfg["models"]
    enc_config, enc_facts = load_arch_config(models_cfg["speech_encoder"]["name_or_path"], models_dir)
    llm_config, _ = load_arch_config(models_cfg["llm"]["name_or_path"], models_dir)
    hubert = speech_encoder_from_config(enc_config, device)
    features = arch_feature_extractor(enc_config, enc_facts)
    with torch.device(device):
        return HubertPoolEncoder(
            hubert, llm_hidden_size(llm_config), PoolConfig(**models_cfg["pooling"]), features
        )


def plan_bloomzmms(cfg: dict[str, Any], models_dir: Path) -> list[StagePlan]:
    models_cfg = cfg["models"]
    built = bloomzmms_parts(cfg, models_dir)
    enc_config, adaptor_cfg, vocab = built.enc_config, built.adaptor_config, built.vocab
    encoder, frontend, adaptor, ctc_head = built.encoder, built.frontend, built.adaptor, built.ctc_head
    features = built.features
    lm = frozen_llm(cfg, models_dir)
    samples = round(cfg["plan"]["utterance_seconds"] * cfg["data"]["sampling_rate"])

    def frames_fn(n: int) -> tuple[int, int]:
        frames = int(
            frontend.output_lengths(torch.tensor([n]))[0]
        )  # the frontend's frame count, not the conv's
        return frames, adaptor_frames(frames, adaptor_cfg)[1]

    plans = []
    for stage in ("ctc", "ce"):
        workload, gpus = workload_for(cfg, stage, frames_fn, samples, teacher=False)
        stage_cfg = cfg["train"][stage]
        act = _activation_bytes(stage_cfg["precision"])
        batch, frames = workload.utterances, workload.encoder_frames
        enc_flops, computed, _ = speech_encoder_flops(encoder, batch, samples, fbank_stride(features))
        parts = [part_plan("speech_encoder", (0, num_params(encoder)), 4, 0.0, enc_flops, 0.0)]
        head_params = split_params(frontend)[0]
        head_flops = 2.0 * frontend.proj.weight.numel() * batch * frames
        # The frontend stacks every hidden state at the frames the encoder computes (Whisper: its window).
        stacked = frontend.num_hidden_states * batch * max(frames, computed) * enc_config.hidden_size * 4
        parts.append(
            part_plan(
                "featurizer+preencoder",
                (head_params, 0),
                4,
                stacked + batch * frames * enc_config.hidden_size * act,
                head_flops,
                2 * head_flops,
            )
        )
        fwd = adaptor_flops(adaptor, batch, frames)
        parts.append(
            part_plan(
                "adaptor",
                split_params(adaptor),
                4,
                adaptor_activation(adaptor, batch, frames, act),
                fwd,
                2 * fwd,
            )
        )
        if stage == "ctc":
            t2 = workload.speech_embeddings
            fwd = 2.0 * ctc_head.ctc_lo.weight.numel() * batch * t2
            parts.append(
                part_plan("ctc_head", (0, num_params(ctc_head)), 4, batch * t2 * vocab * 4, fwd, fwd)
            )
        else:
            parts.append(llm_part(lm, workload, models_cfg["llm"], act, losses=1))
        plans.append(
            StagePlan(
                "bloomzmms",
                stage,
                gpus,
                int(stage_cfg["accum_grad"]),
                stage_cfg["precision"],
                workload,
                parts,
            )
        )
    return plans


def plan_kang_roy(cfg: dict[str, Any], models_dir: Path) -> list[StagePlan]:
    models_cfg = cfg["models"]
    encoder = kang_roy_encoder(cfg, models_dir)
    hubert, enc_config, pool = encoder.encoder, encoder.encoder.config, encoder.pool
    lm = frozen_llm(cfg, models_dir)
    features = arch_feature_extractor(
        enc_config, load_arch_config(models_cfg["speech_encoder"]["name_or_path"], models_dir)[1]
    )
    samples = round(cfg["plan"]["utterance_seconds"] * cfg["data"]["sampling_rate"])

    def frames_fn(n: int) -> tuple[int, int]:
        frames = int(encoder.frame_lengths(torch.tensor([n]))[0])
        return frames, int(pool.output_length(torch.tensor([frames]))[0])

    stage = "kd"
    stage_cfg = cfg["train"][stage]
    distill = stage_cfg.get("ld_weight", 0) > 0 or stage_cfg.get("fd_weight", 0) > 0
    workload, gpus = workload_for(cfg, stage, frames_fn, samples, teacher=distill)
    act = _activation_bytes(stage_cfg["precision"])
    batch = workload.utterances
    enc_flops, frames, conv_lengths = speech_encoder_flops(hubert, batch, samples, fbank_stride(features))
    parts = [
        part_plan(
            "speech_encoder",
            split_params(hubert),
            4,
            trainable_speech_encoder_activation(hubert, batch, samples, conv_lengths, act, frames),
            enc_flops,
            2 * enc_flops,
        )
    ]
    proj = 2.0 * encoder.embed_projection.weight.numel() * batch * workload.speech_embeddings
    parts.append(
        part_plan(
            "pool+projection",
            split_params(encoder.embed_projection),
            4,
            batch * (frames + workload.speech_embeddings) * enc_config.hidden_size * act,
            proj,
            2 * proj,
        )
    )
    losses = 1 + int(stage_cfg.get("ld_weight", 0) > 0)
    parts.append(llm_part(lm, workload, models_cfg["llm"], act, losses=losses))
    return [
        StagePlan(
            "kang_roy", stage, gpus, int(stage_cfg["accum_grad"]), stage_cfg["precision"], workload, parts
        )
    ]


# --------------------------------------------------------------------------- time at a stated MFU


@dataclass
class TimeEstimate:
    """Predicted time of one stage on `gpus` GPUs of type `gpu` at model FLOPs utilisation `mfu`."""

    gpu: str
    mfu: float
    micro_batch_seconds: float
    optimizer_step_seconds: float
    epoch_micro_batches: int | None
    epoch_hours: float | None  # wall clock
    epoch_gpu_hours: float | None
    run_micro_batches: int | None
    run_hours: float | None
    run_gpu_hours: float | None
    reference: dict[str, Any] | None = None  # the reference's statement + the MFU it implies


def gpu_peak_flops(plan_cfg: dict[str, Any], gpu: str, precision: str) -> float:
    """Peak FLOP/s of `gpu` (a key of `plan.gpu_peak_tflops`) at `precision` (bf16 | tf32 | fp32)."""
    table = plan_cfg.get("gpu_peak_tflops") or {}
    if gpu not in table:
        raise PlanError(f"config key 'plan.gpu_peak_tflops': no entry for GPU {gpu!r} (have {sorted(table)})")
    if precision not in table[gpu]:
        raise PlanError(f"config key 'plan.gpu_peak_tflops.{gpu}': no {precision!r} peak")
    return float(table[gpu][precision]) * 1e12


def gpu_for_device(plan_cfg: dict[str, Any], device_name: str) -> str | None:
    """The `plan.gpu_peak_tflops` key found in a CUDA device name (the longest, so "H100 PCIe" beats "H100"),
    or None."""
    found = [key for key in plan_cfg.get("gpu_peak_tflops") or {} if key.lower() in device_name.lower()]
    return max(found, key=len) if found else None


def part_compute_precision(part: PartPlan, stage_precision: str, llm_cfg: dict[str, Any]) -> str:
    """The precision a part's matmuls run at: the LLM's own 16-bit (or 8-bit) weights, else the stage's."""
    if part.name == "llm" and (
        llm_cfg.get("load_in_8bit") or llm_cfg.get("dtype") in ("bfloat16", "float16")
    ):
        return "bf16"
    return stage_precision


def micro_batch_seconds(plan: StagePlan, cfg: dict[str, Any], gpu: str, mfu: float) -> float:
    """FLOPs of one micro-batch on the busiest GPU over (mfu * peak), part by part at its compute
    precision."""
    llm_cfg = cfg["models"].get("llm", {})
    seconds = 0.0
    for part in plan.parts:
        peak = gpu_peak_flops(cfg["plan"], gpu, part_compute_precision(part, plan.precision, llm_cfg))
        seconds += (part.forward_flops + part.backward_flops) / (mfu * peak)
    return seconds


def run_micro_batches(stage_cfg: dict[str, Any]) -> tuple[int | None, int | None]:
    """(micro-batches per epoch, micro-batches of the whole run) from `train.<stage>`; None where not
    fixed."""
    epoch = stage_cfg.get("num_iters_per_epoch")
    caps = []
    if stage_cfg.get("max_epochs") and epoch:
        caps.append(int(stage_cfg["max_epochs"]) * int(epoch))
    if stage_cfg.get("max_steps"):
        caps.append(int(stage_cfg["max_steps"]) * int(stage_cfg["accum_grad"]))
    return (int(epoch) if epoch else None), (min(caps) if caps else None)


def time_estimate(plan: StagePlan, cfg: dict[str, Any]) -> TimeEstimate | None:
    """The stage's predicted times, None without `plan.mfu` / `plan.gpu`."""
    plan_cfg = cfg["plan"]
    if plan_cfg.get("mfu") is None or plan_cfg.get("gpu") is None:
        return None
    gpu, mfu = str(plan_cfg["gpu"]), float(plan_cfg["mfu"])
    step = micro_batch_seconds(plan, cfg, gpu, mfu)
    epoch, run = run_micro_batches(cfg["train"][plan.stage])

    def hours(micro_batches: int | None) -> float | None:
        return None if micro_batches is None else micro_batches * step / 3600

    reference = None
    stated = (plan_cfg.get("reference") or {}).get(plan.stage)
    if stated:
        reference = dict(stated, gpu_hours_per_epoch=stated["gpus"] * stated["hours_per_epoch"])
        # The MFU at which this plan's FLOPs take the stated time: only on the same number of the same GPUs
        # (on fewer GPUs each one's share of the micro-batch, and so its step time, is larger).
        if stated["gpu"] == gpu and int(stated["gpus"]) == plan.gpus and epoch:
            stated_step = stated["hours_per_epoch"] * 3600 / epoch
            reference["implied_mfu"] = mfu * step / stated_step
    return TimeEstimate(
        gpu=gpu,
        mfu=mfu,
        micro_batch_seconds=step,
        optimizer_step_seconds=step * plan.accum_grad,
        epoch_micro_batches=epoch,
        epoch_hours=hours(epoch),
        epoch_gpu_hours=None if epoch is None else hours(epoch) * plan.gpus,
        run_micro_batches=run,
        run_hours=hours(run),
        run_gpu_hours=None if run is None else hours(run) * plan.gpus,
        reference=reference,
    )


def fbank_stride(features: Any) -> int:
    """Frames stacked by a w2v-BERT feature extractor (2 when there is none)."""
    return int(getattr(features, "stride", 2))


SYSTEMS = {"bloomzmms": plan_bloomzmms, "kang_roy": plan_kang_roy}
REQUIRED_KEYS = {
    "bloomzmms": ("models.adaptor", "train.ctc", "train.ce"),
    "kang_roy": ("models.pooling", "train.kd"),
}


def plan_experiment(cfg: dict[str, Any], models_dir: Path) -> list[StagePlan]:
    """Plans of every training stage of the experiment's system (`system`, default bloomzmms)."""
    system = cfg.get("system", "bloomzmms")
    if system not in SYSTEMS:
        raise PlanError(f"config key 'system': unknown system {system!r} (expected one of {sorted(SYSTEMS)})")
    if "plan" not in cfg:
        raise PlanError("config key 'plan' is missing (gpus, utterance_seconds, prompt_tokens, ...)")
    for key in REQUIRED_KEYS[system]:
        section, name = key.split(".")
        if name not in cfg.get(section, {}):
            raise PlanError(f"config key '{key}' is missing (the {system} system needs it)")
    plans = SYSTEMS[system](cfg, models_dir)
    for plan in plans:
        plan.estimate = time_estimate(plan, cfg)
    return plans


# --------------------------------------------------------------------------- config files and output


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Snakemake's `--configfile` semantics: nested dicts merge, everything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_root(path: Path) -> Path:
    """The `config/` directory of a config file (`config/config.yaml` or `config/experiments/<name>.yaml`)."""
    parent = Path(path).resolve().parent
    return parent.parent if parent.name == "experiments" else parent


def load_experiment(path: Path | Sequence[Path], base: Path | None = None) -> dict[str, Any]:
    """Experiment config file(s) merged over the default `config/config.yaml`, in order, as
    `snakemake --configfile A B` does (e.g. `bloomzmms.yaml` then `bloomzmms_exact.yaml`)."""
    import yaml

    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    for source in paths:
        if not source.is_file():
            raise PlanError(f"config file not found: {source}")
    if base is None:
        candidate = config_root(paths[0]) / "config.yaml"
        base = candidate if candidate.is_file() and candidate != paths[0].resolve() else None
    merged: dict[str, Any] = {}
    for source in ([base] if base else []) + paths:
        try:
            data = yaml.safe_load(Path(source).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or " ".join(str(err).split())
            raise PlanError(f"{source}{where}: not valid YAML ({problem})") from err
        if not isinstance(data, dict):
            raise PlanError(f"{source}: not a mapping")
        merged = deep_merge(merged, data)
    return merged


def workflow_schema(config_file: Path) -> Path | None:
    """The workflow's config schema (`workflow/schemas/config.schema.yaml`) of the project a config file
    belongs to, or None where there is none (a config outside a checkout)."""
    path = config_root(config_file).parent / "workflow" / "schemas" / "config.schema.yaml"
    return path if path.is_file() else None


def check_config(cfg: dict[str, Any], schema_path: Path) -> None:
    """The merged config against the workflow's schema, as Snakemake validates it before a run: a wrong value
    (a string for `plan.utterance_seconds`, a null `accum_grad`) is a PlanError naming its key rather than a
    TypeError somewhere in the arithmetic."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(cfg))
    if error is not None:
        key = ".".join(str(part) for part in error.absolute_path) or "<top level>"
        raise PlanError(f"config key '{key}': {error.message} (schema {schema_path})")


def _human(value: float, unit: str) -> str:
    prefixes = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
    for scale, prefix in prefixes:
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def format_plan(plans: list[StagePlan]) -> str:
    """Markdown tables, one per stage."""
    lines = []
    for plan in plans:
        w = plan.workload
        lines += [
            f"## {plan.system} / {plan.stage}: {plan.gpus} GPU(s), {plan.precision}, accum_grad "
            f"{plan.accum_grad}",
            f"per GPU micro-batch: {w.utterances} x {w.utterance_seconds:g} s utterances "
            f"({w.step_utterances} over {plan.gpus} GPU(s)); "
            f"{w.encoder_frames} encoder frames, {w.speech_embeddings} speech embeddings"
            + (
                f", {w.llm_tokens} LLM positions ({w.label_positions} labelled)"
                if any(p.name == "llm" for p in plan.parts)
                else ""
            )
            + (f", teacher {w.teacher_tokens}" if w.teacher_tokens else ""),
            "",
            "| part | role | trainable | frozen | weights GiB | grads GiB | Adam GiB | activations GiB | "
            "fwd FLOPs | bwd FLOPs |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in plan.parts:
            lines.append(
                f"| {p.name} | {p.role} | {p.trainable_params:,} | {p.frozen_params:,} | "
                f"{_gib(p.weight_bytes)} | {_gib(p.grad_bytes)} | {_gib(p.optimizer_bytes)} | "
                f"{_gib(p.activation_bytes)} | {_human(p.forward_flops, 'FLOP')} | "
                f"{_human(p.backward_flops, 'FLOP')} |"
            )
        t = plan.totals()
        lines.append(
            f"| **total** | | {int(t['trainable_params']):,} | {int(t['frozen_params']):,} | "
            f"{_gib(t['weight_bytes'])} | {_gib(t['grad_bytes'])} | {_gib(t['optimizer_bytes'])} | "
            f"{_gib(t['activation_bytes'])} | {_human(t['forward_flops'], 'FLOP')} | "
            f"{_human(t['backward_flops'], 'FLOP')} |"
        )
        lines += [
            "",
            f"memory per GPU: {_gib(t['memory_bytes'])} GiB; FLOPs per micro-batch "
            f"{_human(t['flops_per_micro_batch'], 'FLOP')}, per optimizer step "
            f"{_human(t['flops_per_optimizer_step'], 'FLOP')}",
            "",
        ]
        if plan.estimate:
            lines += format_estimate(plan.estimate, plan.gpus) + [""]
    return "\n".join(lines)


def _hours(value: float | None, unit: str = "h") -> str:
    return "n/a" if value is None else f"{value:,.1f} {unit}"


def format_estimate(e: TimeEstimate, gpus: int) -> list[str]:
    """The predicted times, and the reference's own statement beside them."""
    lines = [
        f"predicted at MFU {e.mfu:g} on {e.gpu}: {e.micro_batch_seconds:.3g} s per micro-batch, "
        f"{e.optimizer_step_seconds:.3g} s per optimizer step; one epoch "
        + (
            f"({e.epoch_micro_batches:,} micro-batches) {_hours(e.epoch_hours)} on {gpus} x {e.gpu} = "
            f"{_hours(e.epoch_gpu_hours, 'GPU-h')}"
            if e.epoch_micro_batches
            else "n/a (one data pass)"
        )
        + "; whole run "
        + (
            f"({e.run_micro_batches:,} micro-batches) {_hours(e.run_hours)} = "
            f"{_hours(e.run_gpu_hours, 'GPU-h')}"
            if e.run_micro_batches
            else "n/a"
        )
    ]
    if e.reference:
        r = e.reference
        implied = (
            f"; these FLOPs in that time are MFU {r['implied_mfu']:.3g}"
            if "implied_mfu" in r
            else f" (not {gpus} x {e.gpu}: not comparable)"
        )
        lines.append(
            f"reference: {r['hours_per_epoch']:g} h per epoch on {r['gpus']} x {r['gpu']} = "
            f"{r['gpu_hours_per_epoch']:g} GPU-h{implied} [{r['source']}]"
        )
    return lines
