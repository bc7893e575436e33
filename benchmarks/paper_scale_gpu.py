"""Paper-scale speed on one GPU in a few minutes: training steps, KD batching, target generation, ASR
decoding.

Usage: python benchmarks/paper_scale_gpu.py [--out results/benchmarks/paper_scale_gpu.json] [--budget 330]
           [--steps 30] [--warmup 3] [--peak-tflops BF16 TF32 FP32] [--only PART ...] [--smoke]

The paper-size models are built from their architecture configs (config/models/*.json, as `speechllm plan`
builds them on the meta device) with random weights directly on the GPU: nothing is downloaded. The experiment
configs (config/experiments/bloomzmms.yaml, speech_summarization.yaml) give every size: the per-GPU batch is
the one `speechllm plan` and the training sampler share (`speechllm.data.bucketing.rank_batch_sizes`) for
utterances of `plan.utterance_seconds`, the prompt and target lengths follow `plan.*`, the losses, optimizer
and precision `train.<stage>`. Parts, each timed for up to `--steps` steps after `--warmup`:

- ctc_bf16, ctc_tf32, ce_bf16, ce_tf32: one training micro-batch of the BLOOMZMMS CTC / CE stage (the
  project's `ObjectiveModule` forward, backward, gradient clipping and optimizer step) under bf16 autocast and
  in fp32 with TF32 matmuls: step time (median), audio seconds per second, peak memory beside the plan's
  prediction, and model FLOPs utilisation (the plan's FLOPs over the GPU's peak at each part's precision);
- asr: ASR decoding through the LLM (`SpeechLLM.generate`, `evaluate.num_beams` beams), utterances per second
  at `evaluate.batch_size` per call vs one utterance per call;
- targets: synthetic-target generation with BLOOMZ, tokens per second of the project's batched greedy decoder
  (`GreedyDecoder`, `targets.batch_size` rows) vs HF `generate` one prompt at a time;
- kd: Kang & Roy's KD update (`train.kd.accum_grad` x the sampler's per-GPU batch: 16 utterances in the paper
  config), batched (the largest micro-batch whose planned memory fits the GPU) vs the reference's batch 1,
  samples per second.

Decoding runs the adaptor in fp32 with TF32 matmuls and the LLM in `models.llm.dtype`. Random weights never
emit end of sequence, so every decoded row runs its full budget: `targets.max_new_tokens` for the targets and,
for ASR, the transcript length the plan assumes (`plan.target_tokens_per_second` x `plan.utterance_seconds`),
not `evaluate.max_new_tokens`. The whole run keeps to `--budget` seconds (default: within 6 minutes on one
H100, start-up included): each part has a share; a part whose warm-up leaves no time for a timed step, or that
runs out of memory, is skipped and the JSON says why. The GPU's peak FLOP/s come from `plan.gpu_peak_tflops`
in config/config.yaml by the CUDA device name, or from `--peak-tflops`.

`--smoke` runs the same code on the CPU with the demo's tiny architecture (config/config.yaml's
`models.demo_build`, written as architecture configs into a temporary directory) and its configs.

Writes one JSON file (atomically), prints a table and, last, the CTC stage's bf16 training throughput as
`CTC training audio seconds per second per GPU (bf16): <number>`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from speechllm.data.batches import Batch
from speechllm.demo.build import demo_llm_config, demo_speech_encoder_config
from speechllm.io import atomic_write_text
from speechllm.models.bloomzmms import BloomzMMS
from speechllm.models.export import DTYPES
from speechllm.models.kang_roy import KangRoy
from speechllm.models.speech_llm import SpeechLLM
from speechllm.plan.planner import (
    StagePlan,
    bloomzmms_parts,
    frozen_llm,
    gpu_for_device,
    kang_roy_encoder,
    load_experiment,
    micro_batch_seconds,
    plan_experiment,
)
from speechllm.targets.generate import GreedyDecoder, greedy_loop_supported, row_tokens
from speechllm.train.loop import StageConfig
from speechllm.train.objectives import ObjectiveModule
from speechllm.train.parallel import set_matmul_precision

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = {
    "bloomzmms": REPO / "config" / "experiments" / "bloomzmms.yaml",
    "kang_roy": REPO / "config" / "experiments" / "speech_summarization.yaml",
}
SMOKE_CONFIGS = {
    "bloomzmms": REPO / "config" / "config.yaml",
    "kang_roy": REPO / "config" / "demo_summarization.yaml",
}
PARTS = ("ctc_bf16", "ctc_tf32", "ce_bf16", "ce_tf32", "asr", "targets", "kd")
# Share of --budget each part may take; the rest goes to building the models (BLOOMZ-7b1, MMS-1B,
# MiniChat-3B).
SHARES = {
    "ctc_bf16": 0.07,
    "ctc_tf32": 0.07,
    "ce_bf16": 0.07,
    "ce_tf32": 0.07,
    "asr": 0.13,
    "targets": 0.13,
    "kd": 0.15,
}
MEMORY_FRACTION = 0.85  # of the GPU's memory the planned KD batch may take (allocator slack, CUDA context)
FIRST_TOKEN = 4  # random prompt and target tokens avoid the special ids (BLOOM: 0-3)
HEADLINE = "CTC training audio seconds per second per GPU (bf16)"
GIB = 2**30


class Clock:
    """The run's deadline and each part's share of it."""

    def __init__(self, budget: float) -> None:
        self.start = time.perf_counter()
        self.budget = budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def part_deadline(self, part: str) -> float:
        """Seconds since start by which `part` must end: its share, never past the whole budget."""
        return min(self.elapsed() + SHARES[part] * self.budget, self.budget)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> float | None:
    return float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def skipped(reason: str) -> dict[str, Any]:
    print(f"  skipped: {reason}", flush=True)
    return {"status": "skipped", "reason": reason}


def run_steps(
    step: Callable[[], Any], device: torch.device, warmup: int, steps: int, clock: Clock, deadline: float
) -> list[float] | str:
    """Timed steps after `warmup` untimed ones, as many as `steps` that fit before `deadline` (seconds since
    the clock's start); a reason string when not one timed step fits."""
    last = 0.0
    for _ in range(warmup):
        last, _ = timed(step, device)
    times: list[float] = []
    while len(times) < steps and clock.elapsed() + (times[-1] if times else last) <= deadline:
        times.append(timed(step, device)[0])
    if not times:
        return (
            f"warm-up ({warmup} steps, the last {last:.1f} s) left no time for a timed step in the "
            "part's share"
        )
    return times


# --------------------------------------------------------------------------- configs and models


def load_configs(smoke: bool) -> dict[str, dict[str, Any]]:
    paths = SMOKE_CONFIGS if smoke else PAPER_CONFIGS
    return {system: load_experiment(path) for system, path in paths.items()}


def write_smoke_models(configs: dict[str, dict[str, Any]], out_dir: Path) -> Path:
    """Architecture configs of the demo's tiny encoder and BLOOM under the names the smoke configs use."""
    for cfg in configs.values():
        build = cfg["models"]["demo_build"]
        encoder = demo_speech_encoder_config(build).to_dict()
        llm = dict(
            demo_llm_config(build, build["tokenizer_vocab_size"]).to_dict(),
            _tokenizer_vocab_size=build["tokenizer_vocab_size"],
        )
        for part, data in (("speech_encoder", encoder), ("llm", llm)):
            name = Path(cfg["models"][part]["name_or_path"]).name
            (out_dir / f"{name}.json").write_text(json.dumps(data), encoding="utf-8")
    return out_dir


def with_precision(cfg: dict[str, Any], stage: str, precision: str) -> dict[str, Any]:
    variant = copy.deepcopy(cfg)
    variant["train"][stage]["precision"] = precision
    return variant


def stage_plan(cfg: dict[str, Any], models_dir: Path, stage: str) -> StagePlan:
    return {p.stage: p for p in plan_experiment(cfg, models_dir)}[stage]


def llm_dtype(cfg: dict[str, Any]) -> torch.dtype:
    """`models.llm.dtype` (8-bit loading, `load_in_8bit`, is not benchmarked: bitsandbytes is optional)."""
    return DTYPES[cfg["models"]["llm"]["dtype"]]


def special_ids(lm: torch.nn.Module) -> tuple[int, int]:
    """(pad, eos) of a randomly initialised LM: its config's, pad = eos when it has none (as MiniChat)."""
    eos = int(lm.config.eos_token_id)
    pad = lm.config.pad_token_id
    return (eos if pad is None else int(pad)), eos


def random_ids(generator: torch.Generator, count: int, vocab: int) -> list[int]:
    return torch.randint(FIRST_TOKEN, vocab, (max(1, count),), generator=generator).tolist()


def synthetic_batch(
    cfg: dict[str, Any], utterances: int, vocab: int, num_lid: int, device: torch.device, seed: int
) -> Batch:
    """`utterances` clips of `plan.utterance_seconds` with the plan's prompt, transcript and target
    lengths."""
    plan_cfg = cfg["plan"]
    seconds = float(plan_cfg["utterance_seconds"])
    generator = torch.Generator().manual_seed(seed)
    samples = round(seconds * cfg["data"]["sampling_rate"])
    targets = math.ceil(plan_cfg["target_tokens_per_second"] * seconds)
    transcript = math.ceil(
        plan_cfg.get("transcript_tokens_per_second", plan_cfg["target_tokens_per_second"]) * seconds
    )
    prompt = int(plan_cfg["prompt_tokens"])
    batch = Batch(
        wav=0.1 * torch.randn(utterances, samples, generator=generator),
        wav_lengths=torch.full((utterances,), samples, dtype=torch.long),
        records=[{"id": f"synthetic-{i}"} for i in range(utterances)],
        ctc_targets=[random_ids(generator, transcript, vocab) for _ in range(utterances)],
        lid=torch.randint(1, num_lid, (utterances,), generator=generator),
        prefix=[random_ids(generator, prompt // 2, vocab) for _ in range(utterances)],
        postfix=[random_ids(generator, prompt - prompt // 2, vocab) for _ in range(utterances)],
        target=[random_ids(generator, targets, vocab) for _ in range(utterances)],
    )
    return batch.to(device)


def autocast(device: torch.device, precision: str) -> Any:
    """bf16 autocast as accelerate's `mixed_precision="bf16"` (the training loop's `acc.autocast()`)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def set_precision(precision: str) -> None:
    """TF32 matmuls for `tf32` (the training loop's `set_matmul_precision`), full fp32 matmuls otherwise."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    set_matmul_precision(precision)


def training_step(
    objective: ObjectiveModule,
    stage: StageConfig,
    batches: Sequence[Batch],
    precision: str,
    device: torch.device,
) -> Callable[[], None]:
    """One update: forward + backward per micro-batch (loss scaled by its share), clipping, optimizer step."""
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer_class = torch.optim.AdamW if stage.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(params, lr=stage.lr, betas=stage.betas, weight_decay=stage.weight_decay)
    total = sum(len(b.records) for b in batches)

    def step() -> None:
        for batch in batches:
            with autocast(device, precision):
                loss, _ = objective(batch)
            (loss * len(batch.records) / total).backward()
        torch.nn.utils.clip_grad_norm_(params, stage.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def mfu(plan: StagePlan, cfg: dict[str, Any], gpu: str | None, seconds: float) -> float | None:
    """The plan's FLOPs of the micro-batch at the GPU's peak (MFU 1) over the measured time."""
    return None if gpu is None else micro_batch_seconds(plan, cfg, gpu, 1.0) / seconds


# --------------------------------------------------------------------------- parts


def training_part(
    part: str,
    objective: ObjectiveModule,
    cfg: dict[str, Any],
    models_dir: Path,
    device: torch.device,
    gpu: str | None,
    args: argparse.Namespace,
    clock: Clock,
    vocab: int,
) -> dict[str, Any]:
    stage_name, precision = part.split("_")
    variant = with_precision(cfg, stage_name, precision)
    plan = stage_plan(variant, models_dir, stage_name)
    utterances = plan.workload.utterances
    batch = synthetic_batch(
        variant, utterances, vocab, objective.model.adaptor.config.num_lid_classes, device, args.seed
    )
    deadline = clock.part_deadline(part)
    set_precision(precision)
    objective.train()
    free_memory(device)
    reset_peak(device)
    step = training_step(
        objective,
        StageConfig.from_config(stage_name, variant["train"][stage_name]),
        [batch],
        precision,
        device,
    )
    times = run_steps(step, device, args.warmup, args.steps, clock, deadline)
    del step
    if isinstance(times, str):
        return skipped(times)
    median = statistics.median(times)
    totals = plan.totals()
    return {
        "status": "measured",
        "precision": precision,
        "utterances": utterances,
        "utterance_seconds": plan.workload.utterance_seconds,
        "steps": len(times),
        "step_seconds": median,
        "step_seconds_mean": statistics.fmean(times),
        "audio_seconds_per_second": utterances * plan.workload.utterance_seconds / median,
        "peak_memory_gib": None if (peak := peak_bytes(device)) is None else peak / GIB,
        "plan_memory_gib": totals["memory_bytes"] / GIB,
        "plan_flops": totals["flops_per_micro_batch"],
        "mfu": mfu(plan, variant, gpu, median),
    }


def paired_rates(
    modes: dict[str, Callable[[], int]],
    device: torch.device,
    clock: Clock,
    deadline: float,
    rounds: int,
    warmup: bool = True,
) -> dict[str, dict[str, float]] | str:
    """Work units per second of each mode (each call returns its units), alternating rounds (after one warm-up
    round unless the caller warmed up), while the rounds fit before `deadline`; the median round counts."""
    round_seconds = 0.0
    if warmup:
        round_seconds = sum(timed(fn, device)[0] for fn in modes.values())
    if clock.elapsed() > deadline:
        return f"the warm-up ({clock.elapsed():.0f} s into the run) used up the part's share"
    times: dict[str, list[float]] = {name: [] for name in modes}
    units: dict[str, int] = {}
    while len(times[next(iter(modes))]) < rounds and clock.elapsed() + round_seconds <= deadline:
        for name, fn in modes.items():
            seconds, units[name] = timed(fn, device)
            times[name].append(seconds)
        round_seconds = sum(t[-1] for t in times.values())
    if not units:
        return f"one round ({round_seconds:.1f} s) does not fit in the part's share"
    return {
        name: {
            "rounds": len(t),
            "seconds": statistics.median(t),
            "units": units[name],
            "per_second": units[name] / statistics.median(t),
        }
        for name, t in times.items()
    }


def compared(rates: dict[str, dict[str, float]] | str, unit: str, **facts: Any) -> dict[str, Any]:
    """A part's result from `paired_rates`: skipped with its reason, or the facts, the rates under `unit` and
    the ratio of the first mode's rate to the second's."""
    if isinstance(rates, str):
        return skipped(rates)
    first, second = rates
    return {
        "status": "measured",
        **facts,
        unit: rates,
        "ratio": rates[first]["per_second"] / rates[second]["per_second"],
    }


def asr_part(
    model: BloomzMMS,
    cfg: dict[str, Any],
    device: torch.device,
    args: argparse.Namespace,
    clock: Clock,
    vocab: int,
) -> dict[str, Any]:
    eval_cfg, plan_cfg = cfg["evaluate"], cfg["plan"]
    batch_size, beams = int(eval_cfg["batch_size"]), int(eval_cfg["num_beams"])
    max_new = math.ceil(plan_cfg["target_tokens_per_second"] * plan_cfg["utterance_seconds"])
    batch = synthetic_batch(cfg, batch_size, vocab, model.adaptor.config.num_lid_classes, device, args.seed)
    deadline = clock.part_deadline("asr")
    set_precision("tf32")
    model.eval()

    @torch.no_grad()
    def decode(indices: Sequence[int]) -> int:
        out = model.encode(batch.wav[list(indices)], batch.wav_lengths[list(indices)])
        segments = model.prompt_segments(
            [batch.prefix[i] for i in indices],
            model.speech_segments(out),
            [batch.postfix[i] for i in indices],
        )
        model.llm.generate(segments, max_new_tokens=max_new, num_beams=beams)
        return len(indices)

    def one_by_one() -> int:
        return sum(decode([i]) for i in range(batch_size))

    rates = paired_rates(
        {"batched": lambda: decode(range(batch_size)), "batch_1": one_by_one},
        device,
        clock,
        deadline,
        args.rounds,
    )
    return compared(
        rates,
        "utterances_per_second",
        batch_size=batch_size,
        num_beams=beams,
        max_new_tokens=max_new,
        utterance_seconds=plan_cfg["utterance_seconds"],
    )


def targets_part(
    lm: torch.nn.Module,
    cfg: dict[str, Any],
    device: torch.device,
    args: argparse.Namespace,
    clock: Clock,
    vocab: int,
) -> dict[str, Any]:
    """Greedy continuations of prompts as long as the plan's (template + transcript), random ids."""
    batch_size, max_new = int(cfg["targets"]["batch_size"]), int(cfg["targets"]["max_new_tokens"])
    plan_cfg = cfg["plan"]
    length = int(plan_cfg["prompt_tokens"]) + math.ceil(
        plan_cfg["target_tokens_per_second"] * plan_cfg["utterance_seconds"]
    )
    generator = torch.Generator().manual_seed(args.seed)
    prompts = [
        random_ids(generator, length // 2 + i % (length - length // 2 + 1), vocab)
        for i in range(2 * batch_size)
    ]
    pad, eos = special_ids(lm)
    deadline = clock.part_deadline("targets")
    lm.eval()
    if not greedy_loop_supported(lm):
        return skipped(f"{type(lm).__name__}: the batched greedy decoder does not cover this model")

    @torch.inference_mode()
    def batched(rows: Sequence[list[int]] = prompts, limit: int = max_new) -> int:
        decoder = GreedyDecoder(lm, pad, {eos}, batch_size)
        return sum(len(tokens) for _, tokens in decoder.rows(list(rows), [limit] * len(rows)))

    @torch.inference_mode()
    def one_at_a_time(count: int) -> int:
        tokens = 0
        for ids in prompts[:count]:
            input_ids = torch.tensor([ids], device=device)
            out = lm.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            tokens += len(row_tokens(out[0, len(ids) :].tolist(), max_new, {eos}))
        return tokens

    # Warm-up: one prompt through HF generate (also its time per prompt), one short batch through ours. HF
    # generate one at a time runs prompts x max_new forwards: it gets the prompts half the remaining share
    # holds.
    single_seconds, _ = timed(lambda: one_at_a_time(1), device)
    batched(prompts[:batch_size], 2)
    count = max(1, min(len(prompts), int((deadline - clock.elapsed()) / 2 / max(single_seconds, 1e-6))))
    rates = paired_rates(
        {"batched": batched, "one_at_a_time": lambda: one_at_a_time(count)},
        device,
        clock,
        deadline,
        args.rounds,
        warmup=False,
    )
    return compared(
        rates,
        "tokens_per_second",
        batch_size=batch_size,
        prompts={"batched": len(prompts), "one_at_a_time": count},
        prompt_tokens=[min(map(len, prompts)), max(map(len, prompts))],
        max_new_tokens=max_new,
    )


def kd_batch_size(
    cfg: dict[str, Any], models_dir: Path, device: torch.device, largest: int
) -> tuple[int, float]:
    """The largest KD micro-batch (halving from `largest`) whose planned memory fits the GPU, and that
    memory."""
    capacity = (
        torch.cuda.get_device_properties(device).total_memory * MEMORY_FRACTION
        if device.type == "cuda"
        else math.inf
    )
    size = largest
    while True:
        variant = copy.deepcopy(cfg)
        variant["plan"]["gpus"]["kd"] = 1
        variant["train"]["kd"].update(
            max_batch_size=size, batch_seconds=size * cfg["plan"]["utterance_seconds"], batch_budget="global"
        )
        memory = stage_plan(variant, models_dir, "kd").totals()["memory_bytes"]
        if memory <= capacity or size == 1:
            return size, memory
        size //= 2


def kd_part(
    cfg: dict[str, Any], models_dir: Path, device: torch.device, args: argparse.Namespace, clock: Clock
) -> dict[str, Any]:
    """Kang & Roy's update of `accum_grad` utterances: micro-batches of the largest fitting size vs batch
    1."""
    models_cfg, stage_cfg = cfg["models"], cfg["train"]["kd"]
    deadline = clock.part_deadline("kd")
    encoder = kang_roy_encoder(cfg, models_dir, device)
    lm = frozen_llm(cfg, models_dir, device, llm_dtype(cfg))
    pad, eos = special_ids(lm)
    vocab = int(lm.get_input_embeddings().weight.shape[0])
    prompt = int(cfg["plan"]["prompt_tokens"])
    generator = torch.Generator().manual_seed(args.seed)
    prefix, suffix = (
        random_ids(generator, prompt // 2, vocab),
        random_ids(generator, prompt - prompt // 2, vocab),
    )
    model = KangRoy(
        encoder,
        SpeechLLM(lm, pad, eos, models_cfg["llm"]["gradient_checkpointing"]),
        prefix,
        suffix,
        bool(models_cfg.get("chat", {}).get("label_eos", False)),
    ).to(device)
    stage = StageConfig.from_config("kd", stage_cfg)
    objective = ObjectiveModule(model, "kd", distillation=stage.distillation).train()
    # One update: `accum_grad` micro-batches of the sampler's per-GPU batch (the reference: 16 of one
    # utterance).
    utterances = int(stage_cfg["accum_grad"]) * stage_plan(cfg, models_dir, "kd").workload.utterances
    size, planned = kd_batch_size(cfg, models_dir, device, utterances)
    batch = synthetic_batch(cfg, utterances, vocab, 2, device, args.seed)
    chunks = [slice(i, i + size) for i in range(0, utterances, size)]
    batched = [sub_batch(batch, c) for c in chunks]
    singles = [sub_batch(batch, slice(i, i + 1)) for i in range(utterances)]
    set_precision(stage.precision)
    reset_peak(device)
    steps = {
        "batched": training_step(objective, stage, batched, stage.precision, device),
        "batch_1": training_step(objective, stage, singles, stage.precision, device),
    }
    rates = paired_rates(
        {name: (lambda fn=fn: (fn(), utterances)[1]) for name, fn in steps.items()},
        device,
        clock,
        deadline,
        args.rounds,
    )
    peak = peak_bytes(device)
    return compared(
        rates,
        "samples_per_second",
        precision=stage.precision,
        utterances_per_update=utterances,
        batch_size=size,
        utterance_seconds=cfg["plan"]["utterance_seconds"],
        plan_memory_gib=planned / GIB,
        peak_memory_gib=None if peak is None else peak / GIB,
    )


def sub_batch(batch: Batch, rows: slice) -> Batch:
    return Batch(
        wav=batch.wav[rows],
        wav_lengths=batch.wav_lengths[rows],
        records=batch.records[rows],
        ctc_targets=batch.ctc_targets[rows],
        lid=None if batch.lid is None else batch.lid[rows],
        prefix=batch.prefix[rows],
        postfix=batch.postfix[rows],
        target=batch.target[rows],
    )


# --------------------------------------------------------------------------- the run


def guarded(
    part: str, device: torch.device, clock: Clock, fn: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """A part's result; a spent budget or running out of memory skips it (freeing what it held)."""
    print(f"{part} ...", flush=True)
    if clock.elapsed() >= clock.budget:
        return skipped(f"the run's budget ({clock.budget:g} s) is spent")
    try:
        return fn()
    except torch.OutOfMemoryError as error:
        free_memory(device)
        return skipped(f"out of memory: {str(error).splitlines()[0]}")


def run_bloomzmms(
    cfg: dict[str, Any],
    models_dir: Path,
    device: torch.device,
    gpu: str | None,
    args: argparse.Namespace,
    clock: Clock,
    wanted: set[str],
) -> dict[str, dict[str, Any]]:
    """CTC parts with the speech side alone (no LLM resident), then the LLM joins for CE, ASR and targets."""
    results: dict[str, dict[str, Any]] = {}
    if not wanted & {"ctc_bf16", "ctc_tf32", "ce_bf16", "ce_tf32", "asr", "targets"}:
        return results
    parts = bloomzmms_parts(cfg, models_dir, device)
    vocab = parts.vocab
    model = BloomzMMS(
        parts.frontend, parts.adaptor, parts.ctc_head, None, cfg["models"]["ctc_head"]["blank_id"]
    )
    del parts  # the model holds the modules: deleting one from it frees it
    stage = StageConfig.from_config("ctc", cfg["train"]["ctc"])
    objective = ObjectiveModule(
        model, "ctc", stage.ctc_weight, stage.interctc_weight, lid_ctc_lengths=stage.lid_ctc_lengths
    )
    for part in ("ctc_bf16", "ctc_tf32"):
        if part in wanted:
            results[part] = guarded(
                part,
                device,
                clock,
                lambda p=part: training_part(p, objective, cfg, models_dir, device, gpu, args, clock, vocab),
            )
    if not wanted & {"ce_bf16", "ce_tf32", "asr", "targets"}:
        return results
    model.ctc_head = None
    del objective
    free_memory(device)
    lm = frozen_llm(cfg, models_dir, device, llm_dtype(cfg))
    pad, eos = special_ids(lm)
    model.llm = SpeechLLM(lm, pad, eos, cfg["models"]["llm"]["gradient_checkpointing"])
    objective = ObjectiveModule(model, "ce")
    for part in ("ce_bf16", "ce_tf32"):
        if part in wanted:
            results[part] = guarded(
                part,
                device,
                clock,
                lambda p=part: training_part(p, objective, cfg, models_dir, device, gpu, args, clock, vocab),
            )
    if "asr" in wanted:
        results["asr"] = guarded(
            "asr", device, clock, lambda: asr_part(model, cfg, device, args, clock, vocab)
        )
    if "targets" in wanted:
        del model.frontend, model.adaptor
        free_memory(device)
        results["targets"] = guarded(
            "targets", device, clock, lambda: targets_part(lm, cfg, device, args, clock, vocab)
        )
    return results


def peak_table(
    configs: dict[str, dict[str, Any]], device: torch.device, peak_tflops: Sequence[float] | None
) -> tuple[str | None, str]:
    """(key of the GPU's peaks in the config, device name); `--peak-tflops` adds its own entry."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if peak_tflops is not None:
        for cfg in configs.values():
            cfg["plan"].setdefault("gpu_peak_tflops", {})["--peak-tflops"] = dict(
                zip(("bf16", "tf32", "fp32"), peak_tflops, strict=True)
            )
        return "--peak-tflops", name
    return gpu_for_device(configs["bloomzmms"]["plan"], name), name


def fmt(value: Any, spec: str) -> str:
    """`value` formatted, or a dash as wide as the field."""
    return format(value, spec) if value is not None else format("-", f">{spec.split('.')[0]}")


def print_table(results: dict[str, dict[str, Any]]) -> None:
    print(
        f"{'part':<9} {'batch':>5} {'step s':>8} {'audio s/s':>10} {'peak GiB':>9} {'plan GiB':>9} {'MFU':>6}"
    )
    for part in ("ctc_bf16", "ctc_tf32", "ce_bf16", "ce_tf32"):
        r = results.get(part)
        if r is None or r["status"] != "measured":
            print(f"{part:<9} {'skipped: ' + r['reason'] if r else 'not run'}")
            continue
        print(
            f"{part:<9} {r['utterances']:>5} {r['step_seconds']:>8.3f} "
            f"{r['audio_seconds_per_second']:>10.1f} {fmt(r['peak_memory_gib'], '9.2f')} "
            f"{r['plan_memory_gib']:>9.2f} {fmt(r['mfu'], '6.3f')}"
        )
    for part, key, a, b in (
        ("kd", "samples_per_second", "batched", "batch_1"),
        ("targets", "tokens_per_second", "batched", "one_at_a_time"),
        ("asr", "utterances_per_second", "batched", "batch_1"),
    ):
        r = results.get(part)
        if r is None or r["status"] != "measured":
            print(f"{part:<9} {'skipped: ' + r['reason'] if r else 'not run'}")
            continue
        rates = r[key]
        print(
            f"{part:<9} {key.replace('_per_second', '/s')}: {a} {rates[a]['per_second']:.2f}, {b} "
            f"{rates[b]['per_second']:.2f}, ratio {r['ratio']:.2f}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "paper_scale_gpu.json")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for the whole run (default 330)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per part (at most)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds of the paired parts (at most)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        nargs=3,
        metavar=("BF16", "TF32", "FP32"),
        help="the GPU's dense peak TFLOP/s (default: plan.gpu_peak_tflops by device name)",
    )
    parser.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    parser.add_argument("--models-dir", type=Path, default=REPO / "config" / "models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke", action="store_true", help="the same code on the CPU with the demo's tiny models"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1, --warmup at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    clock = Clock(args.budget)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("paper_scale_gpu.py: no CUDA device (use --smoke to run the same code on the CPU)")
    device = torch.device("cpu" if args.smoke else "cuda")
    torch.manual_seed(args.seed)
    configs = load_configs(args.smoke)
    gpu, device_name = peak_table(configs, device, args.peak_tflops)
    wanted = set(args.only or PARTS)
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = write_smoke_models(configs, Path(tmp)) if args.smoke else args.models_dir
        results = run_bloomzmms(configs["bloomzmms"], models_dir, device, gpu, args, clock, wanted)
        free_memory(device)
        if "kd" in wanted:
            results["kd"] = guarded(
                "kd", device, clock, lambda: kd_part(configs["kang_roy"], models_dir, device, args, clock)
            )
    ctc = results.get("ctc_bf16", {})
    headline = ctc.get("audio_seconds_per_second", 0.0)
    report = {
        "device": device_name,
        "gpu": gpu,
        "peak_tflops": configs["bloomzmms"]["plan"].get("gpu_peak_tflops", {}).get(gpu) if gpu else None,
        "smoke": args.smoke,
        "torch": torch.__version__,
        "budget_seconds": args.budget,
        "elapsed_seconds": clock.elapsed(),
        "steps": args.steps,
        "warmup": args.warmup,
        "configs": {
            k: str(v.relative_to(REPO)) for k, v in (SMOKE_CONFIGS if args.smoke else PAPER_CONFIGS).items()
        },
        "parts": results,
        "headline": {"what": HEADLINE, "value": headline},
    }
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(
        f"{device_name} ({'no peak FLOP/s known: MFU not computed' if gpu is None else gpu}); "
        f"{clock.elapsed():.0f} s of a {args.budget:g} s budget; {args.out}"
    )
    print_table(results)
    print(f"{HEADLINE}: {headline:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
