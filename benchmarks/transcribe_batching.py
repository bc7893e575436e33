"""Transcription throughput of `SpeechModel.transcribe`: batched vs one clip at a time, on the demo model.

Usage: python benchmarks/transcribe_batching.py [--batch-size 16] [--num-utterances 32] [--rounds 5]
           [--threads 1] [--device cpu] [--seed 0] [--ctc-model DIR] [--llm-model DIR]

By default the demo's architecture is built here from config/config.yaml (untrained: the demo tokenizer's
size, the demo BLOOM, the demo MMS-architecture encoder and E-Branchformer adaptor), as a CTC-stage model and
a CE-stage model; `--ctc-model results/models/ctc --llm-model results/models/tmi` measures the trained ones
after `make demo`. The utterances are synthetic (tones in noise) with the demo's durations. Two decoders:

- CTC: the CTC-stage model's encoder pass and greedy CTC decoding;
- LLM: the CE model's encoder pass and beam search through the LLM with its training prompt
  (`evaluate.num_beams` beams, `evaluate.max_new_tokens` new tokens from the config). An untrained LLM rarely
  emits eos, so every utterance runs the full budget: the one-at-a-time mode pays its per-step overhead
  `max_new_tokens` times per utterance, the batched mode once per batch.

"batched" is one `transcribe(clips, batch_size=B)` call, "one at a time" calls `transcribe(clip)` per clip
(batch_size 1). The modes run in alternating rounds and each reports its median round (as kd_batching.py), so
a noisy machine's drifts hit both alike; both modes must give the same text.

The last line printed is the LLM decoder's `batched/one-at-a-time utterances per second: <ratio>`.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from kd_batching import paired_samples_per_second  # the alternating-rounds timer

import speechllm
from speechllm.demo.build import build_speech_encoder, build_tokenizer
from speechllm.demo.corpus import parallel_sentences
from speechllm.models.adaptor import adaptor_config
from speechllm.models.export import build_model, model_spec, save_model_dir

REPO = Path(__file__).resolve().parents[1]
UTTERANCE_SECONDS = (1.5, 4.0)  # the demo's spoken sentences are about this long


def demo_models(config: dict[str, Any], out_dir: Path, seed: int) -> tuple[Path, Path]:
    """(CTC-stage, CE-stage) model directories of the demo's architecture with untrained weights."""
    from transformers import BloomConfig, BloomForCausalLM

    models_cfg, build = config["models"], config["models"]["demo_build"]
    texts = [text for row in parallel_sentences() for key, text in row.items() if key not in ("id", "split")]
    tokenizer = build_tokenizer(texts, build["tokenizer_vocab_size"], out_dir / "llm")
    torch.manual_seed(seed)
    vocab = len(tokenizer) + build["llm_vocab_pad_to"]
    BloomForCausalLM(
        BloomConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=3, **build["llm"])
    ).save_pretrained(out_dir / "llm")
    build_speech_encoder(out_dir / "encoder", build, config["data"]["sampling_rate"], seed)
    parts = {
        "llm": {**models_cfg["llm"], "name_or_path": str(out_dir / "llm")},
        "speech_encoder": {**models_cfg["speech_encoder"], "name_or_path": str(out_dir / "encoder")},
        "prompt": models_cfg["prompt"],
    }
    adaptor = adaptor_config(
        models_cfg["adaptor"], len(config["data"]["languages"]), llm_hidden_size=build["llm"]["hidden_size"]
    )
    dirs = []
    for stage in ("ctc", "ce"):
        spec = model_spec(parts, adaptor, {}, stage)
        model, _ = build_model(spec, with_ctc=stage == "ctc", with_llm=stage == "ce")
        save_model_dir(model, spec, out_dir / stage)
        dirs.append(out_dir / stage)
    return dirs[0], dirs[1]


def make_utterances(count: int, sampling_rate: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(count):
        t = np.arange(int(rng.uniform(*UTTERANCE_SECONDS) * sampling_rate)) / sampling_rate
        tone = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 300) * t)
        clips.append((tone + 0.05 * rng.standard_normal(t.shape[0])).astype(np.float32))
    return clips


def measure(
    model: speechllm.SpeechModel,
    clips: list[np.ndarray],
    batch_size: int,
    rounds: int,
    options: dict[str, int],
) -> tuple[float, float]:
    """Utterances per second (batched, one at a time); both modes must give the same text."""
    batched_text = model.transcribe(clips, batch_size, **options)
    single_text = [model.transcribe(clip, 1, **options) for clip in clips]
    if batched_text != single_text:
        raise SystemExit(f"batched and one-at-a-time transcripts differ: {batched_text} vs {single_text}")
    return paired_samples_per_second(
        lambda: model.transcribe(clips, batch_size, **options),
        lambda: [model.transcribe(clip, 1, **options) for clip in clips],
        len(clips),
        rounds,
        model.device,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="clips per batch (config evaluate.batch_size)"
    )
    parser.add_argument("--num-utterances", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per mode (median)")
    parser.add_argument("--max-new-tokens", type=int, help="LLM budget (default: evaluate.max_new_tokens)")
    parser.add_argument("--num-beams", type=int, help="LLM beams (default: evaluate.num_beams)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    parser.add_argument("--ctc-model", help="a CTC-stage model directory (default: built here, untrained)")
    parser.add_argument("--llm-model", help="a CE-stage model directory (default: built here, untrained)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    evaluate = config["evaluate"]
    llm_options = {
        "num_beams": args.num_beams or evaluate["num_beams"],
        "max_new_tokens": args.max_new_tokens or evaluate["max_new_tokens"],
    }
    clips = make_utterances(args.num_utterances, config["data"]["sampling_rate"], args.seed)
    with tempfile.TemporaryDirectory(prefix="transcribe-batching-") as scratch:
        built = (
            demo_models(config, Path(scratch), args.seed) if not (args.ctc_model and args.llm_model) else None
        )
        ctc_dir = args.ctc_model or built[0]
        llm_dir = args.llm_model or built[1]
        rows = []
        for name, model_dir, options in (
            ("CTC (greedy)", ctc_dir, {}),
            (
                f"LLM (beam {llm_options['num_beams']}, {llm_options['max_new_tokens']} new tokens)",
                llm_dir,
                llm_options,
            ),
        ):
            model = speechllm.load(model_dir, device=args.device)
            rows.append((name, *measure(model, clips, args.batch_size, args.rounds, options)))
    seconds = sum(len(c) for c in clips) / config["data"]["sampling_rate"]
    print(
        f"demo architecture ({'trained' if built is None else 'untrained'}), {args.device}, {args.threads} "
        f"thread(s); {len(clips)} utterances, {seconds:.0f} s of audio, batch size {args.batch_size}"
    )
    print(f"{'utterances/s':<40} {'batched':>9} {'one-at-a-time':>14} {'ratio':>7}")
    for name, batched, single in rows:
        print(f"{name:<40} {batched:>9.2f} {single:>14.2f} {batched / single:>7.2f}")
    print(f"batched/one-at-a-time utterances per second: {rows[-1][1] / rows[-1][2]:.2f}")


if __name__ == "__main__":
    main()
