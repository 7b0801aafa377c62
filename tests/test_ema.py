from __future__ import annotations  # the diffusers annotation below is not evaluated

import copy

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from ddpm.ema import EMA
from oracle import diffusers


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model[2].bias.requires_grad_(False)
    return model


@torch.no_grad()
def take_optimizer_step(model: nn.Module) -> None:
    """Stand-in for an optimizer step (and a BatchNorm forward): every tensor moves."""
    for param in model.parameters():
        param.add_(0.1 * torch.randn_like(param))
    model[1].running_mean.add_(1.0)


def diffusers_ema(model: nn.Module, max_decay: float = 0.9999) -> diffusers.training_utils.EMAModel:
    return diffusers.training_utils.EMAModel(model.parameters(), decay=max_decay, use_ema_warmup=True, inv_gamma=1.0,
                                             power=0.75)


@pytest.mark.parametrize("step", [1, 2, 10, 1000, 10000, 10**7])
def test_decay_equals_diffusers_get_decay(step):
    model = tiny_model()
    assert EMA(model).get_decay(step) == diffusers_ema(model).get_decay(step)


def test_decay_warmup_matches_the_recipe_numbers():
    ema = EMA(tiny_model())
    assert ema.get_decay(1) == 0.0
    assert ema.get_decay(10) == pytest.approx(0.822, abs=1e-3)
    assert ema.get_decay(1000) == pytest.approx(0.9944, abs=1e-4)
    assert ema.get_decay(10000) == pytest.approx(0.999, abs=1e-4)
    assert ema.get_decay(10**9) == 0.9999


@pytest.mark.parametrize("max_decay", [0.9999, 0.5])
def test_shadow_is_bit_identical_to_diffusers_over_20_updates(max_decay):
    model = tiny_model()
    ours, theirs = EMA(model, max_decay=max_decay), diffusers_ema(model, max_decay)
    torch.manual_seed(1)
    for _ in range(20):
        take_optimizer_step(model)
        ours.update(model)
        theirs.step(model.parameters())
        assert ours.decay == theirs.cur_decay_value
        assert ours.optimization_step == theirs.optimization_step
    for (name, _), shadow in zip(model.named_parameters(), theirs.shadow_params, strict=True):
        assert torch.equal(ours.shadow[name], shadow), name


def test_first_update_takes_the_weights():
    model = tiny_model()
    ema = EMA(model)
    take_optimizer_step(model)
    ema.update(model)
    assert ema.decay == 0.0
    for name, tensor in model.state_dict().items():
        # ema - 1 * (ema - param) is param up to rounding
        torch.testing.assert_close(ema.shadow[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_frozen_parameters_and_buffers_are_copied_not_averaged():
    model = tiny_model()
    ema = EMA(model)
    for _ in range(5):
        take_optimizer_step(model)
        ema.update(model)
    assert torch.equal(ema.shadow["2.bias"], model[2].bias)
    assert torch.equal(ema.shadow["1.running_mean"], model[1].running_mean)
    assert torch.equal(ema.shadow["1.num_batches_tracked"], model[1].num_batches_tracked)
    assert not torch.equal(ema.shadow["0.weight"], model[0].weight)


def test_state_dict_round_trips_through_safetensors(tmp_path):
    model = tiny_model()
    ema = EMA(model)
    for _ in range(7):
        take_optimizer_step(model)
        ema.update(model)
    save_file(ema.state_dict(), tmp_path / "ema.safetensors")

    restored = EMA(tiny_model())
    restored.load_state_dict(load_file(tmp_path / "ema.safetensors"), ema.optimization_step)
    assert restored.optimization_step == 7
    take_optimizer_step(model)
    ema.update(model)
    restored.update(model)
    assert restored.decay == ema.decay
    for name in ema.shadow:
        assert torch.equal(restored.shadow[name], ema.shadow[name]), name


def test_load_state_dict_from_another_model_is_rejected():
    ema = EMA(tiny_model())
    other = nn.Linear(4, 8).state_dict()
    with pytest.raises(ValueError, match=r"missing \['0.bias'.*unexpected \['bias', 'weight'\]"):
        ema.load_state_dict(other, 3)


def test_copy_to_does_not_alias_shadow_and_model():
    model = tiny_model()
    ema = EMA(model)
    take_optimizer_step(model)
    ema.update(model)
    take_optimizer_step(model)
    ema.update(model)

    sampling_model = copy.deepcopy(model)
    ema.copy_to(sampling_model)
    for name, tensor in sampling_model.state_dict().items():
        assert torch.equal(tensor, ema.shadow[name]), name
        assert tensor.data_ptr() != ema.shadow[name].data_ptr(), name
    with torch.no_grad():
        sampling_model[0].weight.zero_()
    assert ema.shadow["0.weight"].abs().sum() > 0
    assert not torch.equal(model[0].weight, ema.shadow["0.weight"])


def test_torch_compile_wrapper_is_unwrapped():
    model = tiny_model()
    compiled = torch.compile(model)
    ema = EMA(compiled)
    assert set(ema.shadow) == set(model.state_dict())
    take_optimizer_step(model)
    ema.update(compiled)
    ema.copy_to(tiny_model())


def test_ddp_wrapper_is_unwrapped():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = tiny_model()
        wrapped = nn.parallel.DistributedDataParallel(model)
        ema = EMA(wrapped)
        assert set(ema.shadow) == set(model.state_dict())
        take_optimizer_step(model)
        ema.update(wrapped)
        assert torch.equal(ema.shadow["0.weight"], model[0].weight)
    finally:
        dist.destroy_process_group()


def test_update_with_another_model_is_rejected():
    ema = EMA(tiny_model())
    with pytest.raises(ValueError, match="parameter names differ"):
        ema.update(nn.Linear(4, 8))
