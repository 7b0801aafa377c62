"""Classifier-free guidance (ddpm/guidance.py) against diffusers' UNet2DModel and DDPMScheduler, guided by hand."""

from __future__ import annotations  # the diffusers annotations below are not evaluated

import random

import pytest
import torch

from ddpm import DDIMScheduler, DDPMScheduler, UNet2DModel, generate
from ddpm.fast_sampling import FastUNet
from ddpm.guidance import GuidedUNet, class_label, drop_class_labels, null_label
from oracle import (MICRO, diffusers, measured, micro_unets, relative_error,  # noqa: F401  (autouse fixture)
                    single_thread)

CLASSES = 4
CONFIG = dict(MICRO, num_class_embeds=CLASSES + 1)  # label 4 is the null label


@pytest.fixture(scope="module")
def unets() -> tuple[UNet2DModel, diffusers.UNet2DModel]:
    """Ours and diffusers' class-conditional MICRO model, holding the same (perturbed) weights."""
    return micro_unets(num_class_embeds=CONFIG["num_class_embeds"])


def noisy_sample(batch_size: int = 3) -> torch.Tensor:
    return torch.randn(batch_size, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def guided_by_hand(unet: diffusers.UNet2DModel, x, t, labels, scale: float) -> torch.Tensor:
    """eps_uncond + s (eps_cond - eps_uncond) from two calls of diffusers' UNet."""
    conditional = unet(x, t, class_labels=labels).sample
    unconditional = unet(x, t, class_labels=torch.full_like(labels, CLASSES)).sample
    return unconditional + scale * (conditional - unconditional)


@pytest.mark.parametrize("scale", [0.0, 2.0, 4.5])
@pytest.mark.parametrize("timestep", [637, torch.tensor(637), torch.tensor([5, 500, 990])],
                         ids=["int", "0-d tensor", "batch tensor"])
def test_the_guided_output_equals_diffusers_outputs_combined_by_hand(unets, scale, timestep):
    ours, theirs = unets
    x, labels = noisy_sample(), torch.tensor([2, 0, 3])
    with torch.no_grad():
        expected = guided_by_hand(theirs, x, timestep, labels, scale)
        actual = GuidedUNet(ours, labels, scale)(x, timestep)
    assert measured(f"guided eps s={scale} relative error", relative_error(actual, expected)) <= 1e-5


def test_scale_one_is_the_conditional_model_itself(unets):
    ours, _ = unets
    x, labels = noisy_sample(), torch.tensor([1, 1, 2])
    with torch.no_grad():
        assert torch.equal(GuidedUNet(ours, labels, 1.0)(x, 400), ours(x, 400, labels))


@pytest.mark.parametrize(("scale", "batch"), [(3.0, 6), (1.0, 3)])
def test_one_forward_per_step_of_twice_the_batch_or_of_the_batch_at_scale_one(unets, scale, batch):
    ours, _ = unets
    batches = []
    hook = ours.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            GuidedUNet(ours, torch.tensor([0, 1, 2]), scale)(noisy_sample(), 100)
    finally:
        hook.remove()
    assert batches == [batch]


def test_one_label_is_used_for_the_whole_batch(unets):
    ours, _ = unets
    x = noisy_sample()
    with torch.no_grad():
        assert torch.equal(GuidedUNet(ours, 2, 3.0)(x, 10), GuidedUNet(ours, torch.tensor([2, 2, 2]), 3.0)(x, 10))


def test_sampling_through_generate_with_scale_one_gives_the_images_of_the_conditional_unet_called_directly(unets):
    ours, _ = unets
    labels = torch.tensor([3, 0])
    scheduler = DDPMScheduler()
    images = generate(GuidedUNet(ours, labels, 1.0), scheduler, 2, torch.manual_seed(7), num_inference_steps=8)
    generator = torch.manual_seed(7)
    x = torch.randn(2, 3, 8, 8, generator=generator)  # Algorithm 2, as generate runs it
    scheduler.set_timesteps(8)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(ours(x, t, labels), t, x, generator=generator)
    assert torch.equal(images, (x / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_guided_sampling_matches_a_diffusers_loop_guided_by_hand(unets, scale):
    ours, theirs = unets
    labels = torch.tensor([1, 3])
    images = generate(GuidedUNet(ours, labels, scale), DDPMScheduler(), 2, torch.manual_seed(3),
                      num_inference_steps=10)
    scheduler, generator = diffusers.DDPMScheduler(), torch.manual_seed(3)
    # DDPMPipeline.__call__, the guidance added by hand
    x = diffusers.utils.torch_utils.randn_tensor((2, 3, 8, 8), generator=generator)
    scheduler.set_timesteps(10)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(guided_by_hand(theirs, x, t, labels, scale), t, x, generator=generator).prev_sample
    expected = (x / 2 + 0.5).clamp(0, 1)
    assert measured(f"guided DDPM sampling s={scale} max abs diff", (images - expected).abs().max().item()) <= 1e-4


def test_guided_sampling_works_with_ddim_and_inside_fast_unet(unets):
    ours, _ = unets
    guided = GuidedUNet(ours, torch.tensor([0, 2]), 2.0)
    direct = generate(guided, DDIMScheduler(), 2, torch.manual_seed(1), num_inference_steps=5)
    wrapped = generate(FastUNet(guided), DDIMScheduler(), 2, torch.manual_seed(1), num_inference_steps=5)
    assert torch.equal(direct, wrapped) and direct.shape == (2, 3, 8, 8)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_sampling_leaves_the_unet_in_the_mode_it_was_in(training):
    unet = UNet2DModel(**CONFIG).train(training)
    generate(GuidedUNet(unet, 1, 2.0), DDPMScheduler(), 1, torch.manual_seed(0), num_inference_steps=2)
    assert all(module.training == training for module in unet.modules())


def test_the_null_label_is_the_last_row_of_the_class_table(unets):
    assert null_label(unets[0]) == CLASSES


@pytest.mark.parametrize("config", [MICRO, dict(MICRO, class_embed_type="timestep")], ids=["unconditional", "timestep"])
def test_guidance_of_a_model_without_a_class_table_is_a_value_error(config):
    with pytest.raises(ValueError, match="classifier-free guidance needs a UNet with a class embedding table"):
        GuidedUNet(UNet2DModel(**config), 0, 2.0)


@pytest.mark.parametrize("labels", [torch.tensor([0, 5]), -1, torch.tensor([], dtype=torch.long)])
def test_labels_outside_the_classes_and_the_null_label_are_a_value_error_naming_them(unets, labels):
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 3\], or 4 for no class; got"):
        GuidedUNet(unets[0], labels, 2.0)


def test_a_label_count_other_than_one_or_the_batch_is_a_value_error(unets):
    with pytest.raises(ValueError, match="holds 2 class labels for a batch of 3 images"):
        GuidedUNet(unets[0], torch.tensor([0, 1]), 2.0)(noisy_sample(3), 10)


# -----------------------------------------------------------------------------
# Training: the class dropout (Ho & Salimans 2022, Algorithm 1)


def test_class_dropout_replaces_labels_by_the_null_label_with_probability_p():
    labels = torch.arange(20_000) % CLASSES
    dropped = drop_class_labels(labels, CLASSES, 0.1, torch.Generator().manual_seed(0))
    replaced = dropped != labels
    assert (dropped[replaced] == CLASSES).all()
    assert 0.09 < replaced.float().mean() < 0.11


@pytest.mark.parametrize(("p", "kept"), [(0.0, True), (1.0, False)])
def test_class_dropout_of_zero_keeps_every_label_and_of_one_drops_every_label(p, kept):
    labels = torch.arange(100) % CLASSES
    dropped = drop_class_labels(labels, CLASSES, p, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, labels) if kept else (dropped == CLASSES).all()


def test_class_dropout_draws_from_its_generator_only():
    labels = torch.arange(64) % CLASSES
    state, python_state = torch.get_rng_state(), random.getstate()
    first = drop_class_labels(labels, CLASSES, 0.5, torch.Generator().manual_seed(9))
    assert torch.equal(first, drop_class_labels(labels, CLASSES, 0.5, torch.Generator().manual_seed(9)))
    assert torch.equal(torch.get_rng_state(), state) and random.getstate() == python_state


def test_a_class_dropout_outside_zero_one_is_a_value_error():
    with pytest.raises(ValueError, match="class dropout probability must be in \\[0, 1\\], got 1.5"):
        drop_class_labels(torch.zeros(2, dtype=torch.long), CLASSES, 1.5, torch.Generator())


# -----------------------------------------------------------------------------
# Naming a class for sampling


def test_a_class_is_named_by_name_or_by_number():
    names = ["circle-red-white", "square-blue-black", "7"]
    assert class_label("square-blue-black", names) == 1
    assert class_label("0", names) == 0
    assert class_label("7", names) == 2  # a name wins over a number


def test_an_unknown_class_is_a_value_error_listing_the_classes():
    with pytest.raises(ValueError, match="no class 'cat': give a name or a number of 0 circle-red-white, 1 square"):
        class_label("cat", ["circle-red-white", "square-blue-black"])
    with pytest.raises(ValueError, match="no class '2'"):
        class_label("2", ["a", "b"])
