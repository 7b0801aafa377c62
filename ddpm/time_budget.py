"""--max_train_minutes: as many optimizer steps as fit in a time budget, decided once.

The step rate is measured while the learning rate warms up; at the end of the warmup the number of steps that
fit in the rest of the budget is fixed, the LR schedule is fitted to it, and checkpoints record it. From there
on the run is as deterministic as one given --max_train_steps: resumed from a checkpoint, it ends at the same
step with the same weights. What the budget cannot foresee is the machine slowing down after the fit.
"""

import math
import time

from . import distributed

# the clock of the budget (tests replace it)
clock = time.perf_counter

# The first steps of a process build kernels and caches: they count against the budget, not in the rate
SETTLING_STEPS = 5
# the fewest steps the rate is measured over
MIN_RATE_STEPS = 20
# the LR schedule's total until the fit: far away, so that a cosine or linear decay stays at its start
NOT_YET_FITTED = 2**62


class TimeBudget:
    """Counts the training time of a run (and of the runs it resumes) and fits the step count to the budget."""

    def __init__(self, minutes: float, warmup_steps: int):
        self.seconds = minutes * 60
        self.warmup_steps = warmup_steps
        self.fitted = False

    def start(self, step: int, used_seconds: float = 0.0) -> None:
        """At the first step of this process, `used_seconds` spent by the runs it resumes."""
        self.start_time = clock() - used_seconds
        self.fit_step = max(self.warmup_steps, step + SETTLING_STEPS + MIN_RATE_STEPS)
        self.rate_from = None  # (step, time) where the measured window begins
        self.rate_from_step = step + SETTLING_STEPS

    def plan(self, cap: int | None) -> str:
        """The run's length as the start line says it, before the fit."""
        at_most = f", at most {cap}" if cap else ""
        return (f"as many optimizer steps as fit in {self.seconds / 60:g} min{at_most} (counted at the end of the LR "
                "warmup)")

    def used_seconds(self) -> float:
        return clock() - self.start_time

    def after_step(self, step: int) -> None:
        if step == self.rate_from_step:
            self.rate_from = (step, clock())

    def due(self, step: int) -> bool:
        """True when the step count should be fixed now: the warmup is over, or the budget is spent."""
        return step >= self.fit_step or self.used_seconds() >= self.seconds

    def steps_that_fit(self, step: int, cap: int | None) -> tuple[int, str]:
        """The run's total steps (at most `cap`), from the rate since the window began; and how it was found."""
        self.fitted = True
        now = clock()
        left = self.seconds - (now - self.start_time)
        if left <= 0 or self.rate_from is None or step <= self.rate_from[0]:  # (the last two only off rank 0)
            return step, (f"the time budget of {self.seconds / 60:g} min was used up at step {step}, during the LR "
                          "warmup: training ends here (a longer --max_train_minutes or a shorter --lr_warmup_steps "
                          "trains on)")
        from_step, from_time = self.rate_from
        rate = (step - from_step) / (now - from_time)
        total = step + math.floor(rate * left)
        how = (f"{total} optimizer steps fit in the time budget of {self.seconds / 60:g} min "
               f"({rate:.2f} steps/s over steps {from_step}-{step}, {left:.0f} s left)")
        if cap is not None and cap < total:
            total, how = cap, f"{how}; --max_train_steps caps them at {cap}"
        return total, how

    def fit_when_due(self, ctx: distributed.Context, step: int, check_every: int,
                     cap: int | None) -> tuple[int, str] | None:
        """Called after each step: the run's total steps and how they were found at the step they are fixed, else None.

        Rank 0's clock decides (asked every check_every steps and from the fit step on), so that every rank stops
        at the same step.
        """
        if self.fitted:
            return None
        self.after_step(step)
        if not (step >= self.fit_step or step % check_every == 0) or not distributed.from_main(ctx, self.due(step)):
            return None
        total, how = self.steps_that_fit(step, cap)
        return int(distributed.from_main(ctx, total)), how
