"""Synthetic-target generation speed: our batched generation vs one-at-a-time HF `generate`, on CPU.

Usage: python benchmarks/target_generation.py [--model DIR] [--num-prompts N] [--batch-size B]
                                              [--max-new-tokens T] [--threads K] [--seed S] [--repeats R]

Prompts are demo transcripts wrapped in demo instruction templates (prefix + text + postfix, varied lengths).
The model is `--model` (e.g. resources/models/demo-llm) or, by default, a tiny BLOOM of the demo config's size
built here with the demo tokenizer helper and saved/loaded with save_pretrained/from_pretrained. Both sides
decode greedily; the script exits non-zero if any output differs. The two sides run alternately `--repeats`
times and each side's median time is reported, so a burst of load from other processes on a shared machine
does not decide the ratio. The last line printed is always
``batched/one-at-a-time tokens per second: <ratio>`` (target >= 5).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, BloomConfig, BloomForCausalLM

from speechllm.data.demo import demo_templates, parallel_sentences
from speechllm.models.demo_build import DEMO_COLUMNS, build_tokenizer
from speechllm.targets.generate import generate_batched, row_tokens

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NUM_PROMPTS = 64
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_THREADS = 1
DEFAULT_SEED = 0
DEFAULT_REPEATS = 3
RATIO_DECIMALS = 2


def demo_prompts(n: int, seed: int) -> list[str]:
    """`n` prompts: random demo sentences (any language) between a random demo template's prefix and
    postfix."""
    rng = random.Random(seed)
    texts = [row[c] for row in parallel_sentences() for c in DEMO_COLUMNS if row.get(c)]
    templates = demo_templates()
    prompts = []
    for _ in range(n):
        prefix, postfix = rng.choice(templates)
        # one to three sentences, so prompt lengths vary as in a real bank of transcripts
        prompts.append(prefix + " ".join(rng.sample(texts, rng.randint(1, 3))) + postfix)
    return prompts


def build_tiny_bloom(out_dir: Path, seed: int) -> Path:
    """A randomly initialised BLOOM of the demo config's size with a demo-trained tokenizer, saved to disk."""
    build = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["models"]["demo_build"]
    texts = [row[c] for row in parallel_sentences() for c in DEMO_COLUMNS if row.get(c)]
    texts += [p + s for p, s in demo_templates()]
    tokenizer = build_tokenizer(texts, build["tokenizer_vocab_size"], out_dir)
    torch.manual_seed(seed)
    vocab = len(tokenizer) + build["llm_vocab_pad_to"]
    model = BloomForCausalLM(BloomConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                         **build["llm"]))
    model.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def one_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[list[str], int]:
    """Plain HF `generate` per prompt (no padding). Returns (texts, generated token count)."""
    texts, tokens = [], 0
    stop = {tokenizer.eos_token_id}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id, use_cache=True)
        new = row_tokens(gen[0, ids.shape[1]:].tolist(), max_new_tokens, stop)
        tokens += len(new)
        texts.append(tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return texts, tokens


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="LLM directory (default: build a tiny BLOOM)")
    parser.add_argument("--num-prompts", type=int, default=DEFAULT_NUM_PROMPTS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help="alternate runs of each side; the median time counts")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_tiny_bloom(Path(tmp) / "tiny-bloom", args.seed)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = demo_prompts(args.num_prompts, args.seed)
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    print(f"model: {args.model or 'tiny BLOOM built here'} ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters); {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens; "
          f"max_new_tokens {args.max_new_tokens}; greedy; CPU threads {args.threads}")

    generate_batched(model, tokenizer, prompts[: args.batch_size], args.batch_size, 2, 1)  # warm-up
    one_at_a_time(model, tokenizer, prompts[:1], 2)
    single_times, batched_times, batched_runs = [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        single, tokens = one_at_a_time(model, tokenizer, prompts, args.max_new_tokens)
        single_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        batched_runs.append(generate_batched(model, tokenizer, prompts, args.batch_size, args.max_new_tokens, 1))
        batched_times.append(time.perf_counter() - start)
    single_s, batched_s = statistics.median(single_times), statistics.median(batched_times)

    print(f"{'method':<34} {'seconds':>9} {'new tokens':>11} {'tokens/s':>10}   (median of {args.repeats})")
    print(f"{'one-at-a-time HF generate':<34} {single_s:>9.2f} {tokens:>11d} {tokens / single_s:>10.1f}")
    print(f"{f'batched (ours, batch {args.batch_size})':<34} {batched_s:>9.2f} {tokens:>11d} "
          f"{tokens / batched_s:>10.1f}")
    differing = sorted({i for batched in batched_runs
                        for i, (a, b) in enumerate(zip(batched, single, strict=True)) if a != b})
    if differing:
        for i in differing[:5]:
            texts = {run[i] for run in batched_runs}
            print(f"prompt {i} differs:\n  batched: {sorted(texts)!r}\n  single:  {single[i]!r}")
        print(f"greedy outputs identical: no ({len(differing)} of {len(prompts)} differ)")
    else:
        print(f"greedy outputs identical: yes ({len(prompts)} of {len(prompts)})")
    print(f"batched/one-at-a-time tokens per second: {single_s / batched_s:.{RATIO_DECIMALS}f}")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
