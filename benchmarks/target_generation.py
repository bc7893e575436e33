"""Synthetic-target generation speed: our batched generation vs HF `generate`, on CPU.

Usage: python benchmarks/target_generation.py [--model DIR] [--num-prompts N] [--batch-size B]
                                              [--max-new-tokens T] [--threads K] [--seed S] [--repeats R]

Prompts are demo transcripts wrapped in demo instruction templates (prefix + text + postfix, varied lengths).
The model is `--model` (e.g. resources/models/demo-llm) or, by default, a tiny BLOOM of the demo config's size
built here with the demo tokenizer helper and saved/loaded with save_pretrained/from_pretrained. Both sides
decode greedily. Three methods run alternately `--repeats` times and each one's median time is reported, so a
burst of load from other processes on a shared machine does not decide a ratio:

- one-at-a-time HF `generate` (no padding): the exact greedy text of every prompt;
- the reference's way (DigitalPhonetics/bloomzmms@77dc192:data/synthetic-targets/make_labels.py): HF
  `generate` on `--batch-size` prompts at a time in input order, left padded (BLOOMZ's tokenizer pads left),
  greedy (`num_beams=1`), every row decoded to the batch's end and cut at its end of sequence;
- ours: `generate_batched` (continuous batching over a KV cache, `--batch-size` rows).

Each batched method's texts are compared with one-at-a-time `generate`; the script exits non-zero if ours
differ. The reference's left-padded batches may differ from it (padding changes the float rounding of the
attention, which can flip a near-tied greedy choice); their count is reported, not an error. The tiny random
BLOOM never emits end of sequence, so every row runs to `--max-new-tokens` and continuous batching has nothing
to gain over the reference there; a trained model (`--model resources/models/demo-llm`) ends rows at different
lengths, as BLOOMZ does. The last two lines are ``batched/one-at-a-time tokens per second: <ratio>``
(target >= 5) and, last, ``batched/reference batched generate tokens per second: <ratio>`` (target >= 1.5).
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

from speechllm.demo.build import DEMO_COLUMNS, build_tokenizer
from speechllm.demo.corpus import parallel_sentences
from speechllm.targets.generate import generate_batched, row_tokens
from speechllm.targets.templates import builtin_templates

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
    templates = builtin_templates()
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
    texts += [p + s for p, s in builtin_templates()]
    tokenizer = build_tokenizer(texts, build["tokenizer_vocab_size"], out_dir)
    torch.manual_seed(seed)
    vocab = len(tokenizer) + build["llm_vocab_pad_to"]
    model = BloomForCausalLM(
        BloomConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=3, **build["llm"])
    )
    model.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def one_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[list[str], int]:
    """Plain HF `generate` per prompt (no padding). Returns (texts, generated token count)."""
    texts, tokens = [], 0
    stop = {tokenizer.eos_token_id}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
        new = row_tokens(gen[0, ids.shape[1] :].tolist(), max_new_tokens, stop)
        tokens += len(new)
        texts.append(tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return texts, tokens


@torch.no_grad()
def reference_batched(
    model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int
) -> list[str]:
    """HF `generate` on `batch_size` prompts at a time in input order, left padded, greedy, as the reference's
    make_labels.py; each row's continuation is cut at its first end of sequence (the reference's decode with
    `skip_special_tokens` drops the padding after it)."""
    tokenizer.padding_side = "left"
    stop = {tokenizer.eos_token_id}
    texts = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(
            prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
        rows = [row_tokens(ids, max_new_tokens, stop) for ids in gen[:, enc.input_ids.shape[1] :].tolist()]
        texts += tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return texts


def differing_prompts(runs: list[list[str]], single: list[str]) -> list[int]:
    """Indices whose text differs from one-at-a-time `generate` in any run."""
    return sorted({i for run in runs for i, (a, b) in enumerate(zip(run, single, strict=True)) if a != b})


def report_differences(label: str, runs: list[list[str]], single: list[str]) -> bool:
    """Print how many of `runs`' texts equal one-at-a-time `generate` (and the first few that differ)."""
    differing = differing_prompts(runs, single)
    for i in differing[:5]:
        print(
            f"prompt {i} differs:\n  {label}: {sorted({run[i] for run in runs})!r}\n  single: {single[i]!r}"
        )
    same = len(single) - len(differing)
    print(f"{label}: greedy text identical to one-at-a-time generate for {same} of {len(single)} prompts")
    return not differing


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="LLM directory (default: build a tiny BLOOM)"
    )
    parser.add_argument("--num-prompts", type=int, default=DEFAULT_NUM_PROMPTS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help="alternate runs of each side; the median time counts",
    )
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
    print(
        f"model: {args.model or 'tiny BLOOM built here'} ({sum(p.numel() for p in model.parameters()):,} "
        f"parameters); {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens; "
        f"max_new_tokens {args.max_new_tokens}; greedy; CPU threads {args.threads}"
    )

    generate_batched(model, tokenizer, prompts[: args.batch_size], args.batch_size, 2, 1)  # warm-up
    reference_batched(model, tokenizer, prompts[: args.batch_size], args.batch_size, 2)
    one_at_a_time(model, tokenizer, prompts[:1], 2)
    times: dict[str, list[float]] = {"single": [], "reference": [], "ours": []}
    runs: dict[str, list[list[str]]] = {"reference": [], "ours": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        single, tokens = one_at_a_time(model, tokenizer, prompts, args.max_new_tokens)
        times["single"].append(time.perf_counter() - start)
        start = time.perf_counter()
        runs["reference"].append(
            reference_batched(model, tokenizer, prompts, args.batch_size, args.max_new_tokens)
        )
        times["reference"].append(time.perf_counter() - start)
        start = time.perf_counter()
        runs["ours"].append(
            generate_batched(model, tokenizer, prompts, args.batch_size, args.max_new_tokens, 1)
        )
        times["ours"].append(time.perf_counter() - start)
    seconds = {method: statistics.median(values) for method, values in times.items()}

    print(f"{'method':<42} {'seconds':>9} {'new tokens':>11} {'tokens/s':>10}   (median of {args.repeats})")
    for method, label in (
        ("single", "one-at-a-time HF generate"),
        ("reference", f"reference: HF generate, batches of {args.batch_size}"),
        ("ours", f"batched (ours, batch {args.batch_size})"),
    ):
        print(f"{label:<42} {seconds[method]:>9.2f} {tokens:>11d} {tokens / seconds[method]:>10.1f}")
    report_differences("reference batched generate", runs["reference"], single)
    ours_identical = report_differences("ours", runs["ours"], single)
    print(
        f"batched/one-at-a-time tokens per second: {seconds['single'] / seconds['ours']:.{RATIO_DECIMALS}f}"
    )
    print(
        f"batched/reference batched generate tokens per second: "
        f"{seconds['reference'] / seconds['ours']:.{RATIO_DECIMALS}f}"
    )
    return 0 if ours_identical else 1


if __name__ == "__main__":
    sys.exit(main())
