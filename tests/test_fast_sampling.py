"""Sampling fast on a GPU: ddpm.fast_sampling.FastUNet (bf16 autocast, CUDA-graph replay of the denoising forward),
and the sampling noise, drawn on the CPU from the seeded generator and copied to the GPU without waiting for it.

The tests marked needs_cuda run only where a CUDA GPU is present.
"""

import time

import numpy as np
import pytest
import torch

import ddpm.ddim
import ddpm.sampling
import ddpm.scheduler
from ddpm import DDIMScheduler, DDPMScheduler, UNet2DModel, generate
from ddpm.fast_sampling import FastUNet
from ddpm.sampling import image_generators
from ddpm.scheduler import randn
from oracle import TINY, perturb_, relative_error, single_thread  # noqa: F401  (autouse fixture)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_unet(device: str = "cpu") -> UNet2DModel:
    torch.manual_seed(0)
    return perturb_(UNet2DModel(**TINY)).eval().to(device)


def randn_before_pinning(shape, generator, device, dtype):
    """scheduler.randn as it was: drawn on the generator's device, then .to(device), which waits for a GPU."""
    if isinstance(generator, list):
        draws = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(draws).to(device)
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


SAMPLERS = {  # scheduler, eta, generators (called with the batch size)
    "ddpm_one_generator": (DDPMScheduler(), 0.0, lambda batch: torch.Generator().manual_seed(3)),
    "ddim_eta_1_one_generator_per_image": (DDIMScheduler(), 1.0, lambda batch: image_generators(3, list(range(batch)))),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sampler", SAMPLERS.values(), ids=SAMPLERS.keys())
def test_noise_drawn_into_a_host_buffer_gives_the_pixels_the_plain_draw_gave(monkeypatch, sampler, dtype):
    scheduler, eta, generators = sampler
    unet = tiny_unet().to(dtype)
    actual = generate(unet, scheduler, 3, generators(3), num_inference_steps=10, eta=eta)
    for module in (ddpm.scheduler, ddpm.ddim, ddpm.sampling):
        monkeypatch.setattr(module, "randn", randn_before_pinning)
    expected = generate(unet, scheduler, 3, generators(3), num_inference_steps=10, eta=eta)
    assert torch.equal(actual, expected)


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


@needs_cuda
@pytest.mark.parametrize("per_image", [False, True], ids=["one_generator", "one_generator_per_image"])
def test_noise_for_the_gpu_is_the_cpu_draw_queued_without_waiting_for_the_gpu(per_image):
    generators = (lambda: image_generators(0, [0, 1, 2, 3])) if per_image else (lambda: torch.manual_seed(0))
    shape, cuda = (4, 3, 32, 32), torch.device("cuda")
    randn(shape, generators(), cuda, torch.float32)  # page-locked memory allocated once, then cached
    torch.cuda.synchronize()  # and free again
    busy_from, busy_to = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    busy_from.record()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time, queued before the copy
    busy_to.record()
    start = time.perf_counter()
    noise = randn(shape, generators(), cuda, torch.float32)
    queued_ms = 1000 * (time.perf_counter() - start)
    torch.cuda.synchronize()
    # a copy from pageable memory would have returned only after the queued work, like .to(device) did
    assert queued_ms < 0.5 * busy_from.elapsed_time(busy_to)
    assert torch.equal(noise.cpu(), randn_before_pinning(shape, generators(), "cpu", torch.float32))


@needs_cuda
def test_sampling_through_a_cuda_graph_never_waits_for_the_gpu_between_steps(monkeypatch):
    graphed = FastUNet(tiny_unet("cuda"), torch.bfloat16, cuda_graph=True)
    forward, calls, steps = FastUNet.forward, [], 10

    def forward_checking_syncs(self, *args):
        # "error" from the second step (the first records the graph) to the last (then generate() copies the images)
        calls.append(1)
        torch.cuda.set_sync_debug_mode("error" if 2 <= len(calls) < steps else "default")
        return forward(self, *args)

    monkeypatch.setattr(FastUNet, "forward", forward_checking_syncs)
    try:
        generate(graphed, DDPMScheduler(), 4, torch.manual_seed(0), num_inference_steps=steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == steps
