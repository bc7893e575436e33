"""Training step of the speech adaptor vs ESPnet's E-Branchformer encoder (the reference) with the same
weights.

Usage: python benchmarks/adaptor_vs_espnet.py [--blocks 4] [--interctc-layer 3] [--batch-size 2] [--seconds 8]
                                              [--rounds 5] [--threads 1] [--seed 0] [--profile N]

Both sides get the paper's block configuration (config/experiments/bloomzmms.yaml `models.adaptor`: d 1024,
8 heads, FFN 2048, cgMLP 8192, kernels 31, dropout 0.1) with fewer blocks and a small batch so a CPU copes:
`--batch-size` unpadded utterances of `--seconds` of random 20 ms preencoder features. The reference side is
ESPnet's `EBranchformerEncoder` with LID inter-CTC self-conditioning after block `--interctc-layer`, the
BLOOMZMMS overlay's LID softmax and the post-encoder (the overlay's modules, run as this project's); ours is
`SpeechAdaptor`. ESPnet's default initialisation is copied into ours.

First a parity round in eval mode: the outputs (speech embeddings and LID logits) must equal ESPnet's to
1e-5, or the script exits non-zero. The gradients' relative error against ESPnet's and, for both sides,
against ESPnet run in float64 is printed: it is largest for the subsampling convolutions (1e-4 to 1e-3),
whose ReLUs switch wherever a float32 rounding error moves an input of about 1e-7 across zero; any float32
implementation does that at some of the 6 M positions (ESPnet's own oneDNN convolutions as often as the
im2col ones here), so there it measures chance, not a difference in the arithmetic. Then, in training mode
(dropout on), forward + backward of three parts, each in alternating rounds (reference, ours, reference, ...)
with the median round reported: the Conv2dSubsampling, one E-Branchformer block, and the whole adaptor. Times
are this process's CPU seconds (which other load on a shared machine inflates far less than wall time; the
wall-clock ratio is printed too). `--profile N` also prints each side's N costliest operators for one round
of the whole adaptor (torch.profiler).

ESPnet is a test-only oracle (tests/oracle-requirements.txt); without it the script says so and exits 0.
Otherwise the last line printed is ``adaptor speedup vs espnet: <ratio>`` (goal >= 1.5).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import yaml
from torch import nn

from speechllm.models.adaptor import AdaptorConfig, SpeechAdaptor, adaptor_config, lengths_to_mask
from speechllm.models.espnet_reference import (
    OverlayLidCtc,
    copy_encoder_weights,
    espnet_encoder,
)
from speechllm.models.positional import relative_sinusoid_table

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPO / "config" / "experiments" / "bloomzmms.yaml"
FRAMES_PER_SECOND = 50  # MMS features: one per 20 ms
ATOL = 1e-5
GRADIENT_FLOOR = 1e-4
SKIP_MESSAGE = "espnet is not importable"


@dataclasses.dataclass
class Side:
    """One implementation: the forward of each timed part, and its parameters by our names."""

    name: str
    params: dict[str, nn.Parameter]
    adaptor: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> (speech, lid_logits)
    subsampling: Callable[[], torch.Tensor]
    block: Callable[[], torch.Tensor]


def paper_config(blocks: int, interctc_layer: int) -> AdaptorConfig:
    config = yaml.safe_load(PAPER_CONFIG.read_text())
    sizes = {**config["models"]["adaptor"], "num_blocks": blocks, "interctc_layer": interctc_layer}
    return adaptor_config(sizes, len(config["data"]["languages"]))


def reference_side(
    reference: nn.Module,
    ours: SpeechAdaptor,
    feats: torch.Tensor,
    lengths: torch.Tensor,
    block_input: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> Side:
    """ESPnet's encoder plus its own copies of our LID head and post-encoder (the overlay's modules), in
    `dtype`."""
    reference = reference.to(dtype)
    feats, block_input = feats.to(dtype), block_input.to(dtype)
    lid_head, postencoder = copy.deepcopy(ours.lid_ctc).to(dtype), copy.deepcopy(ours.postencoder).to(dtype)
    overlay = OverlayLidCtc(lid_head)
    masks = lengths_to_mask(lengths, feats.size(1))[:, None]
    block_mask = torch.ones(block_input.shape[:2], dtype=torch.bool)[:, None]
    pos_emb = relative_sinusoid_table(block_input.size(1), block_input.size(2))[None]

    def adaptor() -> tuple[torch.Tensor, torch.Tensor]:
        (encoded, intermediate), encoded_lengths, _ = reference(feats, lengths, ctc=overlay)
        lid_logits = lid_head(intermediate[0][1], encoded_lengths)[0]
        return postencoder(encoded, encoded_lengths)[0], lid_logits

    def subsampling() -> torch.Tensor:
        return reference.embed(feats, masks)[0][0]

    def block() -> torch.Tensor:
        return reference.encoders[0]((block_input, pos_emb), block_mask)[0][0]

    params = {name.replace("embed.out.0.", "embed.out."): p for name, p in reference.named_parameters()}
    for prefix, module in (("lid_ctc", lid_head), ("postencoder", postencoder)):
        params.update({f"{prefix}.{name}": p for name, p in module.named_parameters()})
    return Side("ESPnet", params, adaptor, subsampling, block)


def our_side(
    ours: SpeechAdaptor, feats: torch.Tensor, lengths: torch.Tensor, block_input: torch.Tensor
) -> Side:
    block_mask = torch.ones(block_input.shape[:2], dtype=torch.bool)
    pos_emb = relative_sinusoid_table(block_input.size(1), block_input.size(2))[None]

    def adaptor() -> tuple[torch.Tensor, torch.Tensor]:
        out = ours(feats, lengths)
        return out.speech, out.lid_logits

    def subsampling() -> torch.Tensor:
        return ours.pos_enc(ours.embed(feats, lengths)[0])[0]

    def block() -> torch.Tensor:
        return ours.encoders[0](block_input, pos_emb, block_mask)

    return Side("ours", dict(ours.named_parameters()), adaptor, subsampling, block)


def weighted_sum(outputs: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
    """A scalar loss that gives every output element its own fixed random gradient."""
    generator = torch.Generator().manual_seed(seed)
    return sum((out * torch.randn(out.shape, generator=generator)).sum() for out in outputs)


def train_step(side: Side, part: str, seed: int) -> None:
    outputs = side.adaptor() if part == "adaptor" else (getattr(side, part)(),)
    weighted_sum(outputs, seed).backward()
    for param in side.params.values():  # as optimizer.zero_grad() does
        param.grad = None


def forward_backward(side: Side, seed: int) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs and parameter gradients (by our names) of one forward + backward of the whole adaptor."""
    outputs = side.adaptor()
    weighted_sum(outputs, seed).backward()
    grads = {name: p.grad for name, p in side.params.items()}
    for param in side.params.values():
        param.grad = None
    return [out.detach() for out in outputs], grads


def gradient_error(grads: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    """The largest relative error ||grad - exact|| / ||exact|| over parameters. Gradients that vanish in exact
    arithmetic (the key projection's bias: softmax ignores a constant per query) are measured against
    `GRADIENT_FLOOR` times the largest gradient norm of all."""
    floor = GRADIENT_FLOOR * max(float(grad.norm()) for grad in exact.values())
    return max(
        float((grad.double() - exact[name].double()).norm()) / max(float(exact[name].norm()), floor)
        for name, grad in grads.items()
    )


def parity(
    reference: Side, ours: Side, exact_grads: dict[str, torch.Tensor], seed: int
) -> tuple[float, float, float, float]:
    """Eval mode, whole adaptor: (largest |output difference| ours vs ESPnet, gradient error ours vs ESPnet,
    ESPnet's and our gradient error vs `exact_grads`, ESPnet's in float64)."""
    (ref_out, ref_grads), (our_out, our_grads) = (forward_backward(side, seed) for side in (reference, ours))
    output_diff = max(float((a - b).abs().max()) for a, b in zip(ref_out, our_out, strict=True))
    return (
        output_diff,
        gradient_error(our_grads, ref_grads),
        gradient_error(ref_grads, exact_grads),
        gradient_error(our_grads, exact_grads),
    )


def timed(step: Callable[[], None]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    step()
    return time.process_time() - cpu, time.perf_counter() - wall


def alternating(
    reference: Side, ours: Side, part: str, rounds: int, seed: int
) -> dict[str, tuple[float, float]]:
    """Median (CPU, wall) seconds per side of `rounds` alternating training steps of `part`, after a
    warm-up."""
    times: dict[str, list[tuple[float, float]]] = {reference.name: [], ours.name: []}
    for side in (reference, ours):
        train_step(side, part, seed)
    for _ in range(rounds):
        for side in (reference, ours):
            times[side.name].append(timed(lambda side=side: train_step(side, part, seed)))
    return {
        name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
        for name, ts in times.items()
    }


def profile_table(side: Side, seed: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        train_step(side, "adaptor", seed)
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=32, max_shapes_column_width=60
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=4, help="E-Branchformer blocks (paper: 17)")
    parser.add_argument(
        "--interctc-layer", type=int, default=3, help="LID self-conditioning after this block"
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of every utterance")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per side and part (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="print each side's N costliest operators (0: no profile)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = paper_config(args.blocks, args.interctc_layer)
    try:
        torch.manual_seed(args.seed)
        reference = espnet_encoder(config, conditioning=True)
    except ImportError as error:
        print(f"{SKIP_MESSAGE} ({error}); it is a test-only oracle (tests/oracle-requirements.txt): skipped")
        return 0
    ours = SpeechAdaptor(config)
    copy_encoder_weights(reference, ours)
    frames = round(args.seconds * FRAMES_PER_SECOND)
    generator = torch.Generator().manual_seed(args.seed)
    feats = torch.randn(args.batch_size, frames, config.input_dim, generator=generator)
    lengths = torch.full((args.batch_size,), frames)
    frames_80ms = int(ours.embed.output_length(frames))
    block_input = torch.randn(args.batch_size, frames_80ms, config.d_model, generator=generator)
    sides = (
        reference_side(reference, ours, feats, lengths, block_input),
        our_side(ours, feats, lengths, block_input),
    )
    print(
        f"paper blocks (d {config.d_model}, {config.heads} heads, FFN {config.linear_units}, cgMLP "
        f"{config.cgmlp_units}, kernels {config.cgmlp_kernel}/{config.merge_kernel}), {config.num_blocks} "
        f"blocks, LID conditioning after block {config.interctc_layer}; {args.batch_size} x "
        f"{args.seconds:g} s ({frames} frames -> {frames_80ms} at 80 ms); CPU threads {args.threads}"
    )

    reference.eval(), ours.eval()
    exact = reference_side(copy.deepcopy(reference), ours, feats, lengths, block_input, torch.float64)
    exact_grads = forward_backward(exact, args.seed)[1]
    del exact  # the float64 model: only its gradients are kept
    output_diff, grad_diff, ref_error, our_error = parity(*sides, exact_grads, args.seed)
    del exact_grads
    equal = output_diff <= ATOL
    print(
        f"eval-mode parity: max |output diff| {output_diff:.2e} ({'<=' if equal else '>'} {ATOL:g}); "
        f"gradient error vs ESPnet {grad_diff:.2e}, vs ESPnet in float64: ESPnet {ref_error:.2e}, "
        f"ours {our_error:.2e} (largest relative L2 error of a parameter)"
    )
    reference.train(), ours.train()

    if args.profile:
        for side in sides:
            print(f"--- {side.name}: {args.profile} costliest operators, one forward + backward")
            print(profile_table(side, args.seed, args.profile))

    print(
        f"{'forward + backward, median of ' + str(args.rounds):<38} {'ESPnet s':>9} {'ours s':>9} "
        f"{'ratio':>7} {'wall ratio':>11}"
    )
    ratio = 0.0
    for part, label in (
        ("subsampling", "Conv2dSubsampling"),
        ("block", "one E-Branchformer block"),
        ("adaptor", f"adaptor ({config.num_blocks} blocks)"),
    ):
        times = alternating(*sides, part, args.rounds, args.seed)
        (ref_cpu, ref_wall), (our_cpu, our_wall) = times["ESPnet"], times["ours"]
        ratio = ref_cpu / our_cpu
        print(f"{label:<38} {ref_cpu:>9.3f} {our_cpu:>9.3f} {ratio:>7.2f} {ref_wall / our_wall:>11.2f}")
    print(f"adaptor speedup vs espnet: {ratio:.2f}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
