"""Learning-rate schedules."""

from __future__ import annotations

import torch


def warmup_inverse_sqrt(step: int, warmup_steps: int) -> float:
    """ESPnet WarmupLR factor: W^0.5 · min(s^-0.5, s · W^-1.5) — linear warm-up to 1, then inverse-sqrt decay."""
    s = step + 1
    return warmup_steps**0.5 * min(s**-0.5, s * warmup_steps**-1.5)


def warmup_lr(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_inverse_sqrt(step, warmup_steps))
