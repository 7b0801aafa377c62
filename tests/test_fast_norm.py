"""UNet2DModel.enable_fast_norm(): every GroupNorm keeps bf16 inputs and outputs under autocast, with
fp32 statistics. Off by default; in fp32 it gives torch's GroupNorm numbers, under bf16 autocast the
UNet stays within bf16 tolerance of the fp32 model, and the parameters and config do not change.

Where the fast norm matters is CUDA: CUDA's autocast runs torch's GroupNorm in fp32 (fp32 out), the CPU's runs it
in the input's dtype already. So on the CPU the tests check how the fast norm runs (outside autocast, in the input's
dtype) and its precision; the tests parametrized with "cuda" (run only where a CUDA GPU is present) check that it
returns bf16 where torch's norm returns fp32.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from ddpm import DDPMScheduler, UNet2DModel
from ddpm.loss import diffusion_loss
from ddpm.unet import GroupNorm
from oracle import (  # noqa: F401  (single_thread is an autouse fixture)
    TINY,
    measured,
    perturb_,
    relative_error,
    single_thread,
)

# A cold inductor C++ build of a tiny UNet takes minutes on a 2-core CPU (tests/test_speed_options.py)
RUN_INDUCTOR = os.environ.get("DDPM_TEST_INDUCTOR") == "1"
SHAPES = {"image": (2, 32, 8, 8), "tokens": (2, 32, 64)}  # ResnetBlock2D's norms, and Attention's on (B, C, HW)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def fast_norm(channels: int = 32, groups: int = 8) -> GroupNorm:
    torch.manual_seed(0)
    norm = GroupNorm(groups, channels, eps=1e-5)
    perturb_(norm, scale=0.5)  # weight and bias away from 1 and 0
    norm.fast = True
    return norm


def activations(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    """An input with a mean and scale of its own per channel, as a layer's activations have."""
    generator = torch.Generator().manual_seed(seed)
    per_channel = (1, shape[1]) + (1,) * (len(shape) - 2)
    return (torch.randn(shape, generator=generator) * (1 + torch.rand(per_channel, generator=generator))
            + 3 * torch.randn(per_channel, generator=generator))


def tiny_unet(**overrides) -> UNet2DModel:
    torch.manual_seed(0)
    return perturb_(UNet2DModel(**dict(TINY, **overrides)))


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0, noise and timesteps for 2 TINY images."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 3, 8, 8, generator=generator), \
        torch.tensor([10, 999])


def gradients(model: torch.nn.Module, autocast: bool, memory_format=torch.contiguous_format) -> torch.Tensor:
    """All parameter gradients of L_simple on one batch, flattened into one vector."""
    model.train().zero_grad(set_to_none=True)
    x0, noise, timesteps = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = diffusion_loss(model, DDPMScheduler(), x0.contiguous(memory_format=memory_format),
                              noise.contiguous(memory_format=memory_format), timesteps)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_fast_norm_is_off_by_default():
    unet = tiny_unet()
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 21 and all(isinstance(norm, GroupNorm) for norm in norms)  # the switch reaches all
    assert not any(norm.fast for norm in norms)
    unet.enable_fast_norm()
    assert all(norm.fast for norm in norms)
    unet.disable_fast_norm()
    assert not any(norm.fast for norm in norms)


def test_fast_norm_changes_no_state_dict_name_or_value_and_no_config_key():
    unet = tiny_unet()
    state, config = {k: v.clone() for k, v in unet.state_dict().items()}, dict(unet.config)
    unet.enable_fast_norm()
    assert list(unet.state_dict()) == list(state)
    assert all(torch.equal(unet.state_dict()[name], tensor) for name, tensor in state.items())
    assert unet.config == config


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_fast_group_norm_in_fp32_equals_torch_group_norm(shape):
    norm, x = fast_norm(), activations(shape)
    expected = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    assert measured("fast GroupNorm vs torch, fp32", relative_error(norm(x), expected)) <= 1e-6


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_fast_group_norm_in_fp32_has_torch_group_norm_gradients(shape):
    norm, x = fast_norm(), activations(shape).requires_grad_()
    upstream = activations(shape, seed=2)
    torch.autograd.backward(norm(x), upstream)
    actual = [x.grad, norm.weight.grad, norm.bias.grad]
    x.grad = norm.weight.grad = norm.bias.grad = None
    torch.autograd.backward(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps), upstream)
    for name, grad, expected in zip(("input", "weight", "bias"), actual, [x.grad, norm.weight.grad, norm.bias.grad]):
        assert measured(f"fast GroupNorm {name} gradient vs torch", relative_error(grad, expected)) <= 1e-5, name


def test_fast_group_norm_runs_torchs_kernel_outside_autocast_in_the_inputs_dtype(monkeypatch):
    calls = []  # (autocast on, input dtype, weight dtype, bias dtype) of each F.group_norm call
    group_norm = F.group_norm

    def recording_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
        calls.append((torch.is_autocast_enabled("cpu"), x.dtype, weight.dtype, bias.dtype))
        return group_norm(x, num_groups, weight, bias, eps)

    monkeypatch.setattr(F, "group_norm", recording_group_norm)  # torch's GroupNorm.forward calls it too
    norm, x = fast_norm(), activations(SHAPES["image"]).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norm(x)
        norm.fast = False
        norm(x)
    # the fast norm, then torch's: CUDA's autocast would cast the second call to fp32, never the first
    assert calls == [(False,) + (torch.bfloat16,) * 3, (True, torch.bfloat16, torch.float32, torch.float32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_fast_group_norm_under_bf16_autocast_returns_bf16_within_twice_the_rounding_of_the_fp32_norm(shape, device):
    norm, x = fast_norm().to(device), activations(shape).bfloat16().to(device)
    expected = F.group_norm(x.float(), norm.num_groups, norm.weight, norm.bias, norm.eps)
    with torch.autocast(device, dtype=torch.bfloat16):
        actual = norm(x)
        norm.fast = False
        plain = norm(x)
    assert actual.dtype == torch.bfloat16
    assert plain.dtype == (torch.float32 if device == "cuda" else torch.bfloat16)  # what the fast norm changes
    # the best a bf16 output can do is the fp32 norm rounded once; gamma and beta rounded to bf16 add some more
    # (1.43x in all on these inputs). Statistics summed in bf16 would not pass (2.7x)
    rounding = relative_error(expected.bfloat16(), expected)
    assert measured("fast GroupNorm bf16, error / rounding error", relative_error(actual, expected) / rounding) <= 2


@pytest.mark.parametrize("device", DEVICES)
def test_fast_group_norm_gives_a_channels_last_input_the_layout_torchs_norm_gives(device):
    norm = fast_norm().to(device)
    x = activations(SHAPES["image"]).to(device).contiguous(memory_format=torch.channels_last)
    expected = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    assert norm(x).stride() == expected.stride()
    if device == "cpu":  # torch's CPU kernel keeps channels_last
        assert expected.is_contiguous(memory_format=torch.channels_last)


def test_unet_with_fast_norm_in_fp32_gives_the_plain_output_within_1e_6():
    unet = tiny_unet().eval()
    x0, _, timesteps = batch()
    with torch.no_grad():
        expected = unet(x0, timesteps)
        unet.enable_fast_norm()
        assert measured("UNet fast norm fp32 vs plain", relative_error(unet(x0, timesteps), expected)) <= 1e-6


def test_channels_last_unet_with_fast_norm_gives_the_plain_output_within_1e_5():
    unet = tiny_unet().eval()
    x0, _, timesteps = batch()
    with torch.no_grad():
        expected = unet(x0, timesteps)
        unet.to(memory_format=torch.channels_last).enable_fast_norm()
        actual = unet(x0.contiguous(memory_format=torch.channels_last), timesteps)
    assert measured("UNet channels_last fast norm fp32 vs plain", relative_error(actual, expected)) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_unet_with_fast_norm_under_bf16_autocast_is_within_2e_2_of_the_fp32_model_with_bf16_norms(device):
    unet = tiny_unet().eval().to(device)
    x0, _, timesteps = (tensor.to(device) for tensor in batch())
    norm_dtypes = []
    for module in unet.modules():
        if isinstance(module, GroupNorm):
            module.register_forward_hook(lambda module, args, out: norm_dtypes.append(out.dtype))
    with torch.no_grad():
        expected = unet(x0, timesteps).float()
        unet.enable_fast_norm()
        with torch.autocast(device, dtype=torch.bfloat16):
            actual = unet(x0, timesteps)
    assert actual.dtype == torch.bfloat16
    assert norm_dtypes == [torch.float32] * 21 + [torch.bfloat16] * 21  # the fp32 model's norms, then the fast ones
    assert measured("UNet fast norm bf16 vs fp32", relative_error(actual, expected)) <= 2e-2


def test_unet_gradients_with_fast_norm_under_bf16_autocast_are_within_2e_2_of_the_fp32_gradients():
    unet = tiny_unet()
    expected = gradients(unet, autocast=False)
    unet.enable_fast_norm()
    # relative to the largest gradient: some are ~0 in exact arithmetic (the key bias, as softmax ignores
    # a constant added to every score) and carry only rounding noise
    assert measured("UNet fast norm bf16 gradients vs fp32", relative_error(gradients(unet, autocast=True),
                                                                               expected)) <= 2e-2


def test_disable_fast_norm_restores_the_plain_output_bit_for_bit():
    unet = tiny_unet().eval()
    x0, _, timesteps = batch()
    with torch.no_grad():
        expected = unet(x0, timesteps)
        unet.enable_fast_norm()
        unet(x0, timesteps)
        unet.disable_fast_norm()
        assert torch.equal(unet(x0, timesteps), expected)


@pytest.mark.parametrize("backend", [
    # aot_eager: dynamo's capture and AOTAutograd of the fast norm, without inductor's C++ build
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(not RUN_INDUCTOR, reason="set DDPM_TEST_INDUCTOR=1 to run it")),
])
def test_compiled_channels_last_unet_with_fast_norm_under_bf16_has_gradients_within_2e_2_of_fp32(backend):
    # one level (resnets with and without a 1x1 shortcut, attention): half of TINY's graph to compile
    unet = tiny_unet(block_out_channels=(16,), down_block_types=("AttnDownBlock2D",), up_block_types=("AttnUpBlock2D",))
    expected = gradients(unet, autocast=False)
    unet.to(memory_format=torch.channels_last).enable_fast_norm()
    # train.py --compile --channels_last --fast_norm
    options = {"force_layout_optimization": True} if backend == "inductor" else None
    compiled = torch.compile(unet, backend=backend, options=options)
    actual = gradients(compiled, autocast=True, memory_format=torch.channels_last)
    error = relative_error(actual, expected)
    assert measured(f"{backend} channels_last fast norm bf16 gradients vs fp32", error) <= 2e-2
