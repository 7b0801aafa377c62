"""The class embedding of ddpm.UNet2DModel against diffusers.UNet2DModel's: names, config, forward, folders."""

import pytest
import torch

from ddpm import UNet2DModel, load_pipeline, save_pipeline
from ddpm.scheduler import DDPMScheduler
from oracle import (  # noqa: F401  (single_thread is an autouse fixture)
    TINY,
    diffusers,
    diffusers_unet,
    measured,
    public_config,
    relative_error,
    save_diffusers_pipeline,
    single_thread,
)

CLASSES = 5  # a model of 5 classes has a sixth embedding, the null label of classifier-free guidance
CONDITIONAL_CONFIGS = {
    "num_class_embeds": dict(TINY, num_class_embeds=CLASSES + 1),
    "num_class_embeds_time_embedding_dim": dict(TINY, num_class_embeds=CLASSES + 1, time_embedding_dim=48),
    "class_embed_type_timestep": dict(TINY, class_embed_type="timestep"),
    "class_embed_type_identity": dict(TINY, class_embed_type="identity"),
}


def labels_for(config: dict, batch_size: int = 4) -> torch.Tensor:
    """Class labels of the kind each class_embed_type takes: ids, numbers for sinusoids, or embeddings."""
    generator = torch.Generator().manual_seed(2)
    if config.get("class_embed_type") == "identity":
        return torch.randn(batch_size, config.get("time_embedding_dim") or 4 * config["block_out_channels"][0],
                           generator=generator)
    return torch.randint(0, CLASSES + 1, (batch_size,), generator=generator)


def sample_for(config: dict, batch_size: int = 4) -> torch.Tensor:
    return torch.randn(batch_size, 3, config["sample_size"], config["sample_size"],
                       generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """For each config name: (diffusers' perturbed model, ours loaded from the folder diffusers saved)."""
    pairs = {}
    for name, config in CONDITIONAL_CONFIGS.items():
        theirs = diffusers_unet(config)
        folder = tmp_path_factory.mktemp(name)
        save_diffusers_pipeline(folder, theirs)
        pairs[name] = theirs, load_pipeline(folder)[0]
    return pairs


@pytest.mark.parametrize("name", CONDITIONAL_CONFIGS)
def test_state_dict_names_and_shapes_equal_diffusers(name):
    with torch.device("meta"):
        ours = UNet2DModel(**CONDITIONAL_CONFIGS[name]).state_dict()
        theirs = diffusers.UNet2DModel(**CONDITIONAL_CONFIGS[name]).state_dict()
    assert {key: tuple(value.shape) for key, value in ours.items()} == \
        {key: tuple(value.shape) for key, value in theirs.items()}


def test_the_class_table_holds_num_class_embeds_rows_of_the_time_embedding_width():
    unet = UNet2DModel(**CONDITIONAL_CONFIGS["num_class_embeds"])
    assert unet.state_dict()["class_embedding.weight"].shape == (CLASSES + 1, 4 * TINY["block_out_channels"][0])


@pytest.mark.parametrize("name", CONDITIONAL_CONFIGS)
def test_config_equals_diffusers(name):
    with torch.device("meta"):
        ours = UNet2DModel(**CONDITIONAL_CONFIGS[name]).config
        theirs = diffusers.UNet2DModel(**CONDITIONAL_CONFIGS[name]).config
    assert public_config(ours) == public_config(theirs)


@pytest.mark.parametrize("name", CONDITIONAL_CONFIGS)
def test_forward_with_class_labels_matches_diffusers_for_a_folder_diffusers_saved(name, loaded):
    theirs, ours = loaded[name]
    config = CONDITIONAL_CONFIGS[name]
    sample, labels, timesteps = sample_for(config), labels_for(config), torch.tensor([3, 250, 700, 999])
    with torch.no_grad():
        expected = theirs(sample, timesteps, class_labels=labels).sample
        actual = ours(sample, timesteps, labels)
    assert measured(f"conditional unet forward {name} relative error", relative_error(actual, expected)) <= 1e-5


def test_the_class_label_changes_the_output(loaded):
    _, ours = loaded["num_class_embeds"]
    sample = sample_for(TINY, 1)
    with torch.no_grad():
        outputs = [ours(sample, 500, torch.tensor([label])) for label in range(CLASSES + 1)]
    assert all(not torch.allclose(outputs[0], other) for other in outputs[1:])


@pytest.mark.parametrize("name", CONDITIONAL_CONFIGS)
def test_a_folder_we_save_loads_in_diffusers_with_the_same_forward(name, loaded, tmp_path):
    _, ours = loaded[name]
    save_pipeline(tmp_path, ours, DDPMScheduler())
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet").eval()
    reloaded, _ = load_pipeline(tmp_path)
    config = CONDITIONAL_CONFIGS[name]
    assert public_config(reloaded.config) == public_config(ours.config)
    sample, labels = sample_for(config), labels_for(config)
    with torch.no_grad():
        expected = theirs(sample, 321, class_labels=labels).sample
        assert relative_error(ours(sample, 321, labels), expected) <= 1e-5
        assert torch.equal(reloaded(sample, 321, labels), ours(sample, 321, labels))


def test_a_class_conditional_model_without_class_labels_is_a_one_line_value_error():
    unet = UNet2DModel(**CONDITIONAL_CONFIGS["num_class_embeds"])
    with pytest.raises(ValueError, match=r"class-conditional \(num_class_embeds=6.*pass class_labels$") as error:
        unet(sample_for(TINY), 10)
    assert "\n" not in str(error.value)


def test_class_labels_given_to_an_unconditional_model_are_a_one_line_value_error():
    unet = UNet2DModel(**TINY)
    with pytest.raises(ValueError, match="class_labels given to a model without a class embedding") as error:
        unet(sample_for(TINY), 10, torch.zeros(4, dtype=torch.long))
    assert "\n" not in str(error.value)


def test_an_unconditional_model_has_no_class_embedding_tensor():
    assert not any(name.startswith("class_embedding") for name in UNet2DModel(**TINY).state_dict())


@pytest.mark.parametrize("value", [0, -3, 2.5, "10", True])
def test_a_num_class_embeds_that_is_not_a_positive_int_is_a_value_error_naming_it(value):
    with pytest.raises(ValueError, match=f"num_class_embeds must be None or an int >= 1, got {value!r}"):
        UNet2DModel(**dict(TINY, num_class_embeds=value))

