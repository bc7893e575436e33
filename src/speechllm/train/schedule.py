"""Learning-rate schedules, stepped once per optimizer update."""

from __future__ import annotations

import torch

SCHEDULES = ("warmup_inverse_sqrt", "linear_decay")


def warmup_inverse_sqrt(step: int, warmup_steps: int) -> float:
    """ESPnet WarmupLR factor W^0.5 · min(s^-0.5, s · W^-1.5): linear warm-up to 1, inverse-sqrt decay."""
    s = step + 1
    return warmup_steps**0.5 * min(s**-0.5, s * warmup_steps**-1.5)


def linear_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps` (none if 0), then linear decay to 0 at `total_steps`.

    With no warm-up this is torch's `PolynomialLR(total_iters=total_steps, power=1)` (Kang & Roy's schedule).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, 1.0 - (step - warmup_steps) / max(1, total_steps - warmup_steps))


def warmup_lr(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_inverse_sqrt(step, warmup_steps))


def make_schedule(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int | None
) -> torch.optim.lr_scheduler.LambdaLR:
    """The named schedule as a LambdaLR (its state_dict holds only counters: loads with weights_only)."""
    if name == "warmup_inverse_sqrt":
        if warmup_steps < 1:
            raise ValueError("schedule warmup_inverse_sqrt needs warmup_steps >= 1")
        return warmup_lr(optimizer, warmup_steps)
    if name == "linear_decay":
        if total_steps is None:
            raise ValueError("schedule linear_decay needs a known number of updates (max_steps)")
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: linear_decay(step, warmup_steps, total_steps)
        )
    raise ValueError(f"unknown schedule {name!r} (expected one of {SCHEDULES})")
