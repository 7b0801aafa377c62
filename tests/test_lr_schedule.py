import pytest
import torch

from ddpm.lr_schedule import LR_SCHEDULES, learning_rate, lr_lambda
from oracle import diffusers

BASE_LR = 1e-4


def diffusers_lrs(name: str, warmup_steps: int, total_steps: int, num_steps: int = 35) -> list[float]:
    """diffusers' lr before the first and after each of num_steps AdamW steps on a dummy parameter."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=BASE_LR)
    scheduler = diffusers.optimization.get_scheduler(name, optimizer, num_warmup_steps=warmup_steps,
                                                     num_training_steps=total_steps)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(num_steps):
        param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("name", LR_SCHEDULES)
@pytest.mark.parametrize(
    "warmup_steps, total_steps",
    [(5, 30), (0, 30), (40, 30)],
    ids=["warmup_5_of_30", "no_warmup", "warmup_longer_than_training"],
)
def test_lr_after_each_optimizer_step_equals_diffusers(name, warmup_steps, total_steps):
    ours = [learning_rate(name, BASE_LR, step, warmup_steps, total_steps) for step in range(36)]
    assert ours == pytest.approx(diffusers_lrs(name, warmup_steps, total_steps), abs=1e-12, rel=0)


def test_cosine_factor_is_half_at_middle_of_decay():
    assert lr_lambda("cosine", 10, 110)(60) == pytest.approx(0.5, abs=1e-15)


def test_warmup_starts_at_zero_and_reaches_one():
    factor = lr_lambda("linear", 5, 30)
    assert factor(0) == 0.0
    assert factor(5) == 1.0


def test_unknown_name_is_rejected_naming_it_and_the_choices():
    with pytest.raises(ValueError, match="'cosin'.*constant, constant_with_warmup, linear, cosine"):
        lr_lambda("cosin", 5, 30)
