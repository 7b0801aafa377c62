"""Speed options change the speed or the memory, never the numbers: gradient checkpointing,
channels_last and torch.compile against the plain model."""

import os

import pytest
import torch
from safetensors import safe_open
from torch.utils.checkpoint import checkpoint

from ddpm import DDPMScheduler, UNet2DModel, generate, save_pipeline
from ddpm import unet as unet_module
from ddpm.loss import diffusion_loss
from oracle import (  # noqa: F401  (single_thread is an autouse fixture)
    TINY,
    perturb_,
    relative_error,
    single_thread,
)

# A cold inductor build of the TINY UNet took 128 s on this project's 2-core CPU machines (4.7 s with a
# warm cache in /tmp/torchinductor_$USER), so the inductor test runs only when asked for.
RUN_INDUCTOR = os.environ.get("DDPM_TEST_INDUCTOR") == "1"


def tiny_unet(**overrides) -> UNet2DModel:
    torch.manual_seed(0)
    return perturb_(UNet2DModel(**dict(TINY, **overrides)))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0, noise and timesteps for a batch of 2 TINY images."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 3, 8, 8, generator=generator)
    noise = torch.randn(2, 3, 8, 8, generator=generator)
    return x0, noise, torch.tensor([10, 999])


def loss_and_gradients(unet: UNet2DModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    unet.train()
    unet.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks in both runs
    loss = diffusion_loss(unet, DDPMScheduler(), *batch())
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in unet.named_parameters()}


def test_gradient_checkpointing_is_off_by_default_and_adds_no_state_dict_names():
    unet = tiny_unet()
    names = list(unet.state_dict())
    assert unet.gradient_checkpointing is False
    unet.enable_gradient_checkpointing()
    assert unet.gradient_checkpointing is True
    assert list(unet.state_dict()) == names


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_with_dropout():
    unet = tiny_unet(dropout=0.1)
    expected_loss, expected_grads = loss_and_gradients(unet)
    unet.enable_gradient_checkpointing()
    loss, grads = loss_and_gradients(unet)
    assert (loss - expected_loss).abs().item() <= 1e-6
    for name, grad in grads.items():
        assert (grad - expected_grads[name]).abs().max().item() <= 1e-6, name


def test_gradient_checkpointing_keeps_less_than_half_the_activations(monkeypatch):
    def kept_bytes(unet: UNet2DModel) -> int:
        """Distinct storages kept for the backward: autograd's saved tensors, plus the block inputs
        that checkpointing holds on to (it keeps them itself, outside the saved-tensor hooks)."""
        parameters = {p.untyped_storage().data_ptr() for p in unet.parameters()}
        storages = {}

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        def recording_checkpoint(block, *args, **kwargs):
            for arg in args:
                for tensor in arg if isinstance(arg, list) else [arg]:
                    keep(tensor)
            return checkpoint(block, *args, **kwargs)

        monkeypatch.setattr(unet_module, "checkpoint", recording_checkpoint)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            diffusion_loss(unet.train(), DDPMScheduler(), *batch())
        return sum(storages.values())

    unet = tiny_unet()
    plain = kept_bytes(unet)
    unet.enable_gradient_checkpointing()
    assert kept_bytes(unet) < 0.5 * plain


def test_gradient_checkpointing_is_inactive_in_eval_mode_and_under_no_grad(monkeypatch):
    checkpointed = []  # one entry per block run through torch.utils.checkpoint

    def recording_checkpoint(block, *args, **kwargs):
        checkpointed.append(block)
        return checkpoint(block, *args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", recording_checkpoint)
    unet = tiny_unet()
    unet.enable_gradient_checkpointing()
    x0, _, timesteps = batch()
    unet.eval()(x0, timesteps)
    with torch.no_grad():
        unet.train()(x0, timesteps)
    assert checkpointed == []
    unet.train()(x0, timesteps)  # the one case that checkpoints: training, with gradients
    assert len(checkpointed) > 0


def test_channels_last_model_and_input_give_the_same_output():
    unet = tiny_unet().eval()
    x0, _, timesteps = batch()
    with torch.no_grad():
        expected = unet(x0, timesteps)
        unet_cl = unet.to(memory_format=torch.channels_last)
        actual = unet_cl(x0.contiguous(memory_format=torch.channels_last), timesteps)
    assert relative_error(actual, expected) <= 1e-5


def test_channels_last_gives_the_same_loss_and_gradients():
    unet = tiny_unet()
    expected_loss, expected_grads = loss_and_gradients(unet)
    loss, grads = loss_and_gradients(unet.to(memory_format=torch.channels_last))
    assert (loss - expected_loss).abs().item() <= 1e-5
    # measured against the largest gradient: some are ~0 in exact arithmetic (the key bias, as softmax
    # ignores a constant added to every score), and their rounding noise differs with the conv layout
    flat = torch.cat([grad.flatten() for grad in grads.values()])
    expected_flat = torch.cat([expected_grads[name].flatten() for name in grads])
    assert relative_error(flat, expected_flat) <= 1e-5


def check_compiled(backend: str, tmp_path) -> None:
    unet = tiny_unet().eval()
    compiled = torch.compile(unet, backend=backend)
    x0, _, timesteps = batch()
    with torch.no_grad():
        assert relative_error(compiled(x0, timesteps), unet(x0, timesteps)) <= 1e-5
    save_pipeline(tmp_path, compiled, DDPMScheduler())
    with safe_open(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert sorted(names) == sorted(unet.state_dict())
    assert not any("_orig_mod." in name for name in names)


def test_torch_compile_traced_by_dynamo_gives_the_same_output_and_saves_plain_names(tmp_path):
    # aot_eager: dynamo's graph capture and AOTAutograd without inductor's C++ build (seconds on a CPU)
    check_compiled("aot_eager", tmp_path)


@pytest.mark.skipif(not RUN_INDUCTOR, reason="a cold inductor C++ build of the tiny UNet takes ~130 s on a 2-core "
                                             "CPU; set DDPM_TEST_INDUCTOR=1 to run it")
def test_torch_compile_with_inductor_gives_the_same_output_and_saves_plain_names(tmp_path):
    check_compiled("inductor", tmp_path)


def test_generate_with_a_compiled_unet_draws_the_same_images():
    unet = tiny_unet().eval()
    expected = generate(unet, DDPMScheduler(), 2, torch.Generator().manual_seed(0), num_inference_steps=3)
    compiled = torch.compile(unet, backend="aot_eager")
    actual = generate(compiled, DDPMScheduler(), 2, torch.Generator().manual_seed(0), num_inference_steps=3)
    assert (actual - expected).abs().max().item() <= 1e-5


@pytest.mark.skipif(not RUN_INDUCTOR, reason="a cold inductor C++ build of the tiny UNet takes ~130 s on a 2-core "
                                             "CPU; set DDPM_TEST_INDUCTOR=1 to run it")
def test_generate_with_a_frozen_inductor_unet_as_sample_py_compiles_it_draws_the_same_images():
    unet = tiny_unet().eval()
    expected = generate(unet, DDPMScheduler(), 2, torch.Generator().manual_seed(0), num_inference_steps=3)
    compiled = torch.compile(unet, options={"freezing": True})  # sample.py --compile
    actual = generate(compiled, DDPMScheduler(), 2, torch.Generator().manual_seed(0), num_inference_steps=3)
    assert (actual - expected).abs().max().item() <= 1e-5
