"""Learning-rate schedules, as the factor LambdaLR multiplies the optimizer's lr by.

Same values as diffusers.optimization.get_scheduler. `step` counts the optimizer updates done
(an fp16 step that GradScaler skipped does not count).
"""

import math
from typing import Callable

import torch

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def decay_progress(step: int, warmup_steps: int, total_steps: int, anchor: tuple[int, float] | None = None) -> float:
    """How far the decay after the warmup has gone at `step`: 0 at the end of the warmup, 1 at total_steps.

    Linear in the step from `anchor` = (step, progress) on, (warmup_steps, 0) unless given: when
    --max_train_minutes fits total_steps again mid-run, the anchor is where the decay stood then, so the
    learning rate goes on from there without a jump and still reaches its end at the new total_steps.
    """
    anchor_step, anchor_progress = anchor or (warmup_steps, 0.0)
    return anchor_progress + (1 - anchor_progress) * (step - anchor_step) / max(1, total_steps - anchor_step)


def lr_lambda(name: str, warmup_steps: int, total_steps: int,
              anchor: tuple[int, float] | None = None) -> Callable[[int], float]:
    """The lr factor as a function of the optimizer step for schedule `name` (`anchor`: decay_progress)."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; choose one of {', '.join(LR_SCHEDULES)}")

    def warmup(step: int) -> float:
        # linear warmup from 0 to 1 over warmup_steps
        return step / max(1, warmup_steps)

    def constant(step: int) -> float:
        return 1.0

    def constant_with_warmup(step: int) -> float:
        if step < warmup_steps:
            return warmup(step)
        return 1.0

    def linear(step: int) -> float:
        if step < warmup_steps:
            return warmup(step)
        # straight line from 1 down to 0 at total_steps, then stays at 0
        return max(0.0, 1.0 - decay_progress(step, warmup_steps, total_steps, anchor))

    def cosine(step: int) -> float:
        if step < warmup_steps:
            return warmup(step)
        # half a cosine period, 0.5 (1 + cos(pi progress)), from 1 at the end of warmup
        # to 0 at total_steps; like diffusers' it rises again past total_steps
        progress = decay_progress(step, warmup_steps, total_steps, anchor)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return {
        "constant": constant,
        "constant_with_warmup": constant_with_warmup,
        "linear": linear,
        "cosine": cosine,
    }[name]


def learning_rate(name: str, peak: float, step: int, warmup_steps: int, total_steps: int,
                  anchor: tuple[int, float] | None = None) -> float:
    """The learning rate of the update after `step` updates (a pure function of the step, set before each
    update, as nanoGPT's get_lr): `peak` times schedule `name`'s factor, the product LambdaLR takes."""
    return peak * lr_lambda(name, warmup_steps, total_steps, anchor)(step)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
