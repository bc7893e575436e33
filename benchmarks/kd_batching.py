"""Training throughput of the Kang & Roy KD objective: batched (right padding) vs the reference's batch-1
loop.

Usage: python benchmarks/kd_batching.py [--batch-size 16] [--rounds 20] [--threads 1] [--device cpu]
    [--seed 0]

Both modes run the same tiny HuBERT + pooling + LLaMA model (built here, no downloads) on the same 16
utterances per update: "batched" is one forward/backward over all of them, "batch-1" 16 forward/backward
passes with gradient accumulation (the reference: batch size 1, accumulation 16). The two modes run in
alternating rounds, each on its own copy of the model, and each reports its median round, so a noisy machine's
drifts hit both alike. Two measurements:

- KD objective: student and teacher LLM forwards, NTP + logit + feature distillation, backward into the speech
  embeddings (given, with the lengths the encoder produces) — the part `train/distillation.py` batches;
- full update: the same plus the HuBERT encoder forward/backward on the raw audio and an Adam step. On a CPU
  the encoder's convolutions over raw samples cost the same per second of audio in both modes, which caps this
  ratio.

Each LLM call costs a fixed overhead plus a cost per sample, and batching saves only the overhead; the
benchmark fits both from a forward at batch 1 and at the batch size, which bounds the ratio on this device.
`--device cuda` runs the same comparison on a GPU.

The last line printed is the KD objective's `batched/batch-1 samples per second: <ratio>`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from transformers import HubertConfig, HubertModel, LlamaConfig, LlamaForCausalLM

from speechllm.data.batches import pad_waveforms
from speechllm.models.hubert_pool import HubertPoolEncoder, PoolConfig
from speechllm.models.kang_roy import KangRoy
from speechllm.models.speech_llm import SpeechLLM
from speechllm.train.distillation import DistillationConfig, distillation_loss

SAMPLING_RATE = 16_000
VOCAB = 256
LLM_HIDDEN = 32
LLM_LAYERS = 2
PREFIX, SUFFIX = [1, 5, 6], [2, 7, 8]  # "<s>[|User|]" / "</s>[|Assistant|]" stand-ins
AUDIO_SECONDS = (1.0, 2.0)  # utterance durations (a duration bucket keeps them similar)
TRANSCRIPT_TOKENS = (6, 16)
RESPONSE_TOKENS = (8, 24)
WARMUP_ROUNDS = 1
PROBE_LENGTH = 48  # positions of the forward-cost probe: about the padded length of a batch here
CONFIG = DistillationConfig(
    ntp_weight=0.5, ld_weight=0.5, fd_weight=1.0, fd_layers=list(range(LLM_LAYERS + 1))
)


def tiny_model(seed: int) -> KangRoy:
    """HuBERT-large's layout (20 ms frames) and MiniChat's LLaMA layout, shrunk."""
    torch.manual_seed(seed)
    hubert = HubertModel(
        HubertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(32, 32, 32, 32),
            conv_stride=(5, 4, 4, 4),
            conv_kernel=(10, 4, 4, 4),
            feat_extract_norm="layer",
            do_stable_layer_norm=True,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
        )
    )
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=LLM_HIDDEN,
            intermediate_size=2 * LLM_HIDDEN,
            num_hidden_layers=LLM_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=4,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
    )
    encoder = HubertPoolEncoder(hubert, llm_hidden_size=LLM_HIDDEN, pool=PoolConfig(8, 4))
    return KangRoy(encoder, SpeechLLM(lm, pad_token_id=2, eos_token_id=2), PREFIX, SUFFIX).train()


def make_samples(count: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)

    def randint(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    samples = []
    for _ in range(count):
        n = randint(int(AUDIO_SECONDS[0] * SAMPLING_RATE), int(AUDIO_SECONDS[1] * SAMPLING_RATE))
        samples.append(
            {
                "wav": 0.1 * torch.randn(n, generator=gen),
                "transcript": torch.randint(9, VOCAB, (randint(*TRANSCRIPT_TOKENS),), generator=gen).tolist(),
                "response": torch.randint(9, VOCAB, (randint(*RESPONSE_TOKENS),), generator=gen).tolist(),
            }
        )
    return samples


def kd_loss(model: KangRoy, speech: Sequence[torch.Tensor], samples: Sequence[dict]) -> torch.Tensor:
    student = model.chat_segments([[s] for s in speech])
    teacher = model.chat_segments([[s["transcript"]] for s in samples])
    return distillation_loss(model.llm, student, teacher, [s["response"] for s in samples], CONFIG).loss


def encode(model: KangRoy, samples: Sequence[dict]) -> list[torch.Tensor]:
    """Right-padded audio (collated on the CPU) through HuBERT + pooling: one (T_b, H) speech segment each."""
    wav, lengths = pad_waveforms([s["wav"] for s in samples])
    device = model.llm.lm.device
    return model.encode(wav.to(device), lengths.to(device))


def kd_objective_round(
    model: KangRoy, samples: Sequence[dict], speech: Sequence[torch.Tensor], micro_batch: int
) -> None:
    """Forward + backward of the KD objective over all samples, in micro-batches (mean loss over samples)."""
    for start in range(0, len(samples), micro_batch):
        chunk = slice(start, start + micro_batch)
        (kd_loss(model, speech[chunk], samples[chunk]) * len(samples[chunk]) / len(samples)).backward()


def full_update_round(
    model: KangRoy, optimizer: torch.optim.Optimizer, samples: Sequence[dict], micro_batch: int
) -> None:
    """One optimizer update: encoder + KD forward/backward per micro-batch, then Adam."""
    for start in range(0, len(samples), micro_batch):
        chunk = samples[start : start + micro_batch]
        (kd_loss(model, encode(model, chunk), chunk) * len(chunk) / len(samples)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run_round: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run_round()
    synchronize(device)
    return time.perf_counter() - start


def seconds_per_round(run_round: Callable[[], None], rounds: int, device: torch.device) -> float:
    for _ in range(WARMUP_ROUNDS):
        run_round()
    return statistics.median(timed(run_round, device) for _ in range(rounds))


def paired_samples_per_second(
    batched: Callable[[], None],
    single: Callable[[], None],
    num_samples: int,
    rounds: int,
    device: torch.device,
) -> tuple[float, float]:
    """Samples/s of two modes timed in alternating rounds (median round), so drifts of a noisy machine hit
    both."""
    for _ in range(WARMUP_ROUNDS):
        batched()
        single()
    batched_times, single_times = [], []
    for _ in range(rounds):
        batched_times.append(timed(batched, device))
        single_times.append(timed(single, device))
    return num_samples / statistics.median(batched_times), num_samples / statistics.median(single_times)


def forward_cost(
    batch_size: int, length: int, rounds: int, seed: int, device: torch.device
) -> tuple[float, float]:
    """(fixed ms per call, ms per sample) of a no-grad LLM forward over `length` positions, fitted through
    batch 1 and `batch_size`."""
    lm = tiny_model(seed).llm.lm.to(device)

    def forward(batch: int) -> float:
        embeds = torch.randn(batch, length, LLM_HIDDEN, device=device)

        def run() -> None:
            with torch.no_grad():
                lm(inputs_embeds=embeds, output_hidden_states=True, use_cache=False)

        return 1e3 * seconds_per_round(run, rounds, device)

    one, many = forward(1), forward(batch_size)
    per_sample = (many - one) / (batch_size - 1)
    return one - per_sample, per_sample


def speech_inputs(
    model: KangRoy, samples: Sequence[dict], seed: int, device: torch.device
) -> list[torch.Tensor]:
    """Random speech embeddings (T_b, H) with the lengths the encoder gives each utterance, as gradient
    leaves."""
    with torch.no_grad():
        lengths = model.encoder.output_lengths(torch.tensor([s["wav"].shape[0] for s in samples]))
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(int(n), LLM_HIDDEN, generator=generator).to(device).requires_grad_() for n in lengths]


def measure(
    samples: list[dict], batch_size: int, rounds: int, seed: int, device: torch.device
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Samples per second (batched, batch-1) of the KD objective, then of the full update.

    Each mode has its own copy of the same model (the full update steps its optimizer).
    """
    models = [tiny_model(seed).to(device) for _ in range(2)]
    speech = speech_inputs(models[0], samples, seed, device)
    kd = paired_samples_per_second(
        lambda: kd_objective_round(models[0], samples, speech, batch_size),
        lambda: kd_objective_round(models[1], samples, speech, 1),
        len(samples),
        rounds,
        device,
    )
    optimizers = [
        torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4) for model in models
    ]
    full = paired_samples_per_second(
        lambda: full_update_round(models[0], optimizers[0], samples, batch_size),
        lambda: full_update_round(models[1], optimizers[1], samples, 1),
        len(samples),
        rounds,
        device,
    )
    return kd, full


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=16, help="samples per update (reference: 16)")
    parser.add_argument("--rounds", type=int, default=20, help="timed updates per mode (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    samples = make_samples(args.batch_size, args.seed)
    (kd_batched, kd_single), (full_batched, full_single) = measure(
        samples, args.batch_size, args.rounds, args.seed, device
    )
    print(
        f"tiny HuBERT (2 layers) + pooling + LLaMA ({LLM_LAYERS} layers, hidden {LLM_HIDDEN}), {device}, "
        f"{args.threads} thread(s); {args.batch_size} utterances of "
        f"{AUDIO_SECONDS[0]:g}-{AUDIO_SECONDS[1]:g} s, "
        f"responses of {RESPONSE_TOKENS[0]}-{RESPONSE_TOKENS[1]} tokens per update"
    )
    print(f"{'samples/s':<48} {'batched':>9} {'batch-1':>9} {'ratio':>7}")
    print(
        f"{'full update (HuBERT + KD + Adam)':<48} {full_batched:>9.1f} {full_single:>9.1f} "
        f"{full_batched / full_single:>7.2f}"
    )
    print(
        f"{'KD objective (student + teacher LLM + backward)':<48} {kd_batched:>9.1f} {kd_single:>9.1f} "
        f"{kd_batched / kd_single:>7.2f}"
    )
    if args.batch_size > 1:
        fixed, per_sample = forward_cost(args.batch_size, PROBE_LENGTH, 10 * args.rounds, args.seed, device)
        saving = args.batch_size * (fixed + per_sample) / (fixed + args.batch_size * per_sample)
        print(
            f"LLM forward over {PROBE_LENGTH} positions: {fixed:.3f} ms per call + {per_sample:.3f} ms per "
            "sample; "
            f"estimated per-sample saving of batching {args.batch_size} on the forward alone: {saving:.1f}x"
        )
    print(f"batched/batch-1 samples per second: {kd_batched / kd_single:.2f}")


if __name__ == "__main__":
    main()
