"""The step count that --max_train_minutes fixes, on a clock the test moves."""

import pytest

import ddpm.time_budget
from ddpm.time_budget import TimeBudget


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(ddpm.time_budget, "clock", fake)
    return fake


def train_until_due(budget: TimeBudget, clock: FakeClock, step: int, seconds_per_step) -> int:
    """Steps on from `step`, step k taking seconds_per_step(k), until the budget says to fit; that step."""
    while not budget.due(step):
        step += 1
        clock.now += seconds_per_step(step)
        budget.after_step(step)
    return step


def test_the_step_count_comes_from_the_rate_after_the_first_steps_and_the_time_left(clock):
    budget = TimeBudget(minutes=1, warmup_steps=40)
    budget.start(step=0)
    # the first 5 steps build kernels (1 s each), then 10 steps/s
    step = train_until_due(budget, clock, 0, lambda k: 1.0 if k <= 5 else 0.1)
    assert step == 40 and clock.now == pytest.approx(8.5)
    total, how = budget.steps_that_fit(step, cap=None)
    # 10 steps/s over steps 5-40, 51.5 s left: 515 steps more (counting the slow steps in the rate: 4.1 steps/s)
    assert total == 40 + 515
    assert budget.fitted
    assert how.startswith("555 optimizer steps fit in the time budget of 1 min (10.00 steps/s over steps 5-40")


def test_a_short_warmup_still_measures_the_rate_over_twenty_steps(clock):
    budget = TimeBudget(minutes=1, warmup_steps=1)
    budget.start(step=0)
    assert train_until_due(budget, clock, 0, lambda k: 0.1) == 25


def test_max_train_steps_caps_the_fitted_count(clock):
    budget = TimeBudget(minutes=1, warmup_steps=40)
    budget.start(step=0)
    step = train_until_due(budget, clock, 0, lambda k: 0.1)
    total, how = budget.steps_that_fit(step, cap=100)
    assert total == 100 and how.endswith("--max_train_steps caps them at 100")


def test_a_resumed_run_counts_the_seconds_its_checkpoint_had_used(clock):
    fresh, resumed = TimeBudget(minutes=1, warmup_steps=40), TimeBudget(minutes=1, warmup_steps=40)
    fresh.start(step=0)
    clock.now = 100.0
    resumed.resume(used_seconds=30.0, fitted_total=None)
    resumed.start(step=0)
    assert resumed.used_seconds() == 30.0
    start = clock.now
    step = train_until_due(resumed, clock, 0, lambda k: 0.1)
    assert step == 40
    total, _ = resumed.steps_that_fit(step, cap=None)
    # 10 steps/s, 60 - 30 - 4 = 26 s left
    assert clock.now - start == pytest.approx(4.0) and total == 40 + 260


def test_a_budget_spent_before_the_rate_is_known_ends_the_run_at_that_step(clock):
    budget = TimeBudget(minutes=1, warmup_steps=200)
    budget.resume(used_seconds=55.0, fitted_total=None)
    budget.start(step=10)
    step = train_until_due(budget, clock, 10, lambda k: 2.0)
    assert step == 13  # 55 + 3 x 2 s >= 60, before step 15 starts the measured window
    total, how = budget.steps_that_fit(step, cap=None)
    assert total == 13
    assert how.startswith("the time budget of 1 min was used up at step 13, during the LR warmup: training ends here")


def test_a_budget_spent_during_a_long_warmup_ends_the_run_at_the_time_left_zero(clock):
    budget = TimeBudget(minutes=1, warmup_steps=5000)
    budget.start(step=0)
    step = train_until_due(budget, clock, 0, lambda k: 0.5)
    assert step == 120
    assert budget.steps_that_fit(step, cap=None)[0] == 120


def test_the_count_is_fitted_again_each_twentieth_of_the_budget_from_the_rate_since_the_last_fit(clock):
    budget = TimeBudget(minutes=1, warmup_steps=40)
    budget.start(step=0)
    step = train_until_due(budget, clock, 0, lambda k: 0.125)
    first, _ = budget.steps_that_fit(step, cap=None)
    assert first == 40 + 440  # 8 steps/s, 55 s left
    # the machine slows to 4 steps/s: due again once 3 s (a twentieth of 60 s) and 20 steps have passed
    step = train_until_due(budget, clock, step, lambda k: 0.25)
    assert step == 60 and clock.now == 10.0
    total, how = budget.steps_that_fit(step, cap=None)
    assert total == 60 + 200  # 4 steps/s, 50 s left
    assert how == ("260 optimizer steps fit now (step 60) in the time budget of 1 min (4.00 steps/s over steps 40-60, "
                   "50 s left)")


def test_a_fit_again_that_moves_the_count_by_under_one_percent_keeps_it_and_says_nothing(clock):
    budget = TimeBudget(minutes=1, warmup_steps=40)
    budget.start(step=0)
    step = train_until_due(budget, clock, 0, lambda k: 0.125)
    first, _ = budget.steps_that_fit(step, cap=None)
    step = train_until_due(budget, clock, step, lambda k: 0.1255)  # 0.4% slower: 478 steps instead of 480
    assert budget.steps_that_fit(step, cap=None) == (first, "")


def test_a_budget_spent_after_the_first_fit_ends_the_run_at_the_next_fit(clock):
    budget = TimeBudget(minutes=1, warmup_steps=40)
    budget.start(step=0)
    step = train_until_due(budget, clock, 0, lambda k: 0.1)
    budget.steps_that_fit(step, cap=None)
    step = train_until_due(budget, clock, step, lambda k: 10.0)  # ten times slower: the budget runs out
    assert clock.now >= 60
    assert budget.steps_that_fit(step, cap=None) == (step, f"the time budget of 1 min was used up at step {step}: "
                                                             "training ends here")


def test_a_resumed_run_keeps_its_checkpoints_count_until_its_own_rate_moves_it(clock):
    budget = TimeBudget(minutes=1, warmup_steps=40)
    budget.resume(used_seconds=30.0, fitted_total=540)
    budget.start(step=300)
    # 8 steps/s as the checkpoint's run had: 300 + 8 x 30 s = 540, the same count
    step = train_until_due(budget, clock, 300, lambda k: 0.125)
    assert budget.steps_that_fit(step, cap=None) == (540, "")
    # then twice as slow: fitted again
    step = train_until_due(budget, clock, step, lambda k: 0.25)
    assert budget.steps_that_fit(step, cap=None)[0] < 500
