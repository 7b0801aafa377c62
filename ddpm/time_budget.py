"""--max_train_minutes: as many optimizer steps as fit in a time budget.

The step rate is measured while the learning rate warms up; at the end of the warmup the number of steps that
fit in the rest of the budget is fixed, and the LR schedule's decay is fitted to end there. A shared machine's
speed moves within minutes, so the count is fitted again every twentieth of the budget, from the rate since
the last fit; the decay goes on from where it stood (lr_schedule.decay_progress), without a jump. Checkpoints
record the count, where the decay stood, and the seconds used: a run resumed from one goes on with the rest of
the budget, and on a machine as fast as before it ends at the same step with the same weights.
"""

import math
import time

from tqdm.auto import tqdm

from . import distributed
from .lr_schedule import decay_progress

# the clock of the budget (tests replace it)
clock = time.perf_counter

# The first steps of a process build kernels and caches: they count against the budget, not in the rate
SETTLING_STEPS = 5
# the fewest steps the rate is measured over
MIN_RATE_STEPS = 20
# the LR schedule's total until the fit: far away, so that a cosine or linear decay stays at its start
NOT_YET_FITTED = 2**62
# after the first fit, the count is fitted again each time this share of the budget has passed
REFIT_SHARE = 1 / 20
# a fit again that would move the count by less than this share of it keeps the count (and the LR schedule)
KEPT_CHANGE = 0.01


class TimeBudget:
    """Counts the training time of a run (and of the runs it resumes) and fits the step count to the budget."""

    def __init__(self, minutes: float, warmup_steps: int):
        self.seconds = minutes * 60
        self.warmup_steps = warmup_steps
        self.fitted = False
        self.fitted_total = None  # the latest fit's count
        self.used_before = 0.0  # seconds spent by the runs this one resumes

    def resume(self, used_seconds: float, fitted_total: int | None) -> None:
        """A run resumed from a checkpoint: the seconds its runs had used, and the count they fitted, if they did."""
        self.used_before = used_seconds
        self.fitted, self.fitted_total = fitted_total is not None, fitted_total

    def start(self, step: int) -> None:
        """At the first step of this process."""
        self.start_time = clock() - self.used_before
        self.fit_step = max(self.warmup_steps, step + SETTLING_STEPS + MIN_RATE_STEPS)
        self.rate_from = None  # (step, time) where the measured window begins
        self.rate_from_step = step + SETTLING_STEPS

    def plan(self, cap: int | None) -> str:
        """The run's length as the start line says it, before the fit."""
        at_most = f", at most {cap}" if cap else ""
        return (f"as many optimizer steps as fit in {self.seconds / 60:g} min{at_most} (counted at the end of the LR "
                "warmup, and again as the run goes)")

    def used_seconds(self) -> float:
        return clock() - self.start_time

    def after_step(self, step: int) -> None:
        if step == self.rate_from_step:
            self.rate_from = (step, clock())

    def due(self, step: int) -> bool:
        """True when the step count should be fitted now: before the first fit, when the warmup is over or the
        budget is spent; after it, when a twentieth of the budget has passed since the last fit (or the
        budget is spent)."""
        if not self.fitted:
            return step >= self.fit_step or self.used_seconds() >= self.seconds
        if self.rate_from is None or step - self.rate_from[0] < MIN_RATE_STEPS:
            return self.used_seconds() >= self.seconds
        return clock() - self.rate_from[1] >= REFIT_SHARE * self.seconds or self.used_seconds() >= self.seconds

    def steps_that_fit(self, step: int, cap: int | None) -> tuple[int, str]:
        """The run's total steps (at most `cap`), from the rate since the window began, and how it was found (empty
        where a fit again keeps the count). The next window begins here."""
        first = not self.fitted
        self.fitted = True
        now = clock()
        left = self.seconds - (now - self.start_time)
        if left <= 0 or self.rate_from is None or step <= self.rate_from[0]:  # (the last two only off rank 0)
            during = ", during the LR warmup" if first else ""
            advice = " (a longer --max_train_minutes or a shorter --lr_warmup_steps trains on)" if first else ""
            return step, (f"the time budget of {self.seconds / 60:g} min was used up at step {step}{during}: "
                          f"training ends here{advice}")
        from_step, from_time = self.rate_from
        rate = (step - from_step) / (now - from_time)
        self.rate_from = (step, now)
        total = step + math.floor(rate * left)
        if cap is not None and cap < total:
            total = cap
        if self.fitted_total is not None and abs(total - self.fitted_total) < KEPT_CHANGE * self.fitted_total:
            return self.fitted_total, ""  # a fit again that would move the count by under 1% keeps it
        self.fitted_total = total
        fit = "fit" if first else f"fit now (step {step})"
        how = (f"{total} optimizer steps {fit} in the time budget of {self.seconds / 60:g} min "
               f"({rate:.2f} steps/s over steps {from_step}-{step}, {left:.0f} s left)")
        if cap is not None and total == cap:
            how = f"{how}; --max_train_steps caps them at {cap}"
        return total, how

    def fit_when_due(self, ctx: distributed.Context, step: int, check_every: int,
                     cap: int | None) -> tuple[int, str] | None:
        """Called after each step: the run's total steps and how they were found at each step they are fitted,
        else None.

        Rank 0's clock decides (asked every check_every steps, and from the first fit's step on until it), so that
        every rank stops at the same step.
        """
        self.after_step(step)
        asked = step % check_every == 0 or (not self.fitted and step >= self.fit_step)
        if not asked or not distributed.from_main(ctx, self.due(step)):
            return None
        total, how = self.steps_that_fit(step, cap)
        return int(distributed.from_main(ctx, total)), how

    def refit(self, ctx: distributed.Context, run, check_every: int, cap: int | None) -> bool:
        """Called after each step with the run's state (training_state.RunState): when a fit is due, prints how it
        went, sets run.total_steps to the new count and returns True if it changed. The LR decay then goes on from
        where it stands (run.lr_anchor) to the new end."""
        fit = self.fit_when_due(ctx, run.step, check_every, cap)
        if fit is None:
            return False
        total, how = fit
        if how and ctx.is_main:
            tqdm.write(how)
        if total == run.total_steps:
            return False
        if run.total_steps != NOT_YET_FITTED:  # fitted again: the decay goes on from where it stands
            run.lr_anchor = (run.step, decay_progress(run.step, self.warmup_steps, run.total_steps, run.lr_anchor))
        run.total_steps, run.lr_step = total, run.step
        return True
