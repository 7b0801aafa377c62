"""ddpm.fast_sampling.FastUNet: bf16 autocast and CUDA-graph replay of the denoising forward.

The CUDA-graph tests run only where a CUDA GPU is present.
"""

import numpy as np
import pytest
import torch

from ddpm import DDIMScheduler, DDPMScheduler, UNet2DModel, generate
from ddpm.fast_sampling import FastUNet
from oracle import TINY, perturb_, relative_error, single_thread  # noqa: F401  (autouse fixture)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_unet(device: str = "cpu") -> UNet2DModel:
    torch.manual_seed(0)
    return perturb_(UNet2DModel(**TINY)).eval().to(device)


def test_fast_unet_without_options_draws_the_same_images_as_the_unet():
    unet = tiny_unet()
    expected = generate(unet, DDPMScheduler(), 2, torch.manual_seed(0), num_inference_steps=5)
    assert torch.equal(generate(FastUNet(unet), DDPMScheduler(), 2, torch.manual_seed(0), num_inference_steps=5),
                       expected)


def test_bf16_autocast_returns_fp32_close_to_fp32_but_computed_in_bf16():
    unet = tiny_unet()
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor(500)
    expected = unet(x, t)
    actual = FastUNet(unet, torch.bfloat16)(x, t)
    assert actual.dtype == torch.float32
    assert 0 < relative_error(actual, expected) <= 0.05


def test_cuda_graph_on_the_cpu_is_a_value_error_naming_the_device():
    with pytest.raises(ValueError, match="cuda_graph=True needs the UNet on a CUDA device, it is on cpu"):
        FastUNet(tiny_unet(), cuda_graph=True)


@needs_cuda
@pytest.mark.parametrize("scheduler", [DDPMScheduler(), DDIMScheduler()], ids=["ddpm", "ddim"])
def test_cuda_graph_draws_the_images_eager_draws_in_fp32(scheduler):
    unet = tiny_unet("cuda")
    graphed = FastUNet(unet, cuda_graph=True)
    for batch_size in (3, 2):  # a second shape captures a second graph
        expected = generate(unet, scheduler, batch_size, torch.manual_seed(batch_size), num_inference_steps=20)
        actual = generate(graphed, scheduler, batch_size, torch.manual_seed(batch_size), num_inference_steps=20)
        assert (actual - expected).abs().max().item() <= 1e-5
        assert np.array_equal((actual * 255).round().numpy(), (expected * 255).round().numpy())
    assert len(graphed.graphs) == 2


@needs_cuda
def test_cuda_graph_in_bf16_draws_the_images_eager_bf16_draws():
    unet = tiny_unet("cuda")
    expected = generate(FastUNet(unet, torch.bfloat16), DDIMScheduler(), 2, torch.manual_seed(0),
                        num_inference_steps=20)
    actual = generate(FastUNet(unet, torch.bfloat16, cuda_graph=True), DDIMScheduler(), 2, torch.manual_seed(0),
                      num_inference_steps=20)
    assert (actual - expected).abs().max().item() <= 1e-3
