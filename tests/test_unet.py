"""ddpm.UNet2DModel against diffusers.UNet2DModel: names, shapes, config and forward pass."""

import json

import pytest
import torch

from ddpm import UNet2DModel, load_pipeline
from oracle import (  # noqa: F401  (single_thread is an autouse fixture)
    CIFAR10,
    FORWARD_CONFIGS,
    TINY,
    TUTORIAL,
    diffusers,
    diffusers_unet,
    measured,
    public_config,
    relative_error,
    save_diffusers_pipeline,
    single_thread,
)

FULL_SIZE_CONFIGS = {"tutorial": TUTORIAL, "cifar10": CIFAR10}
ALL_CONFIGS = {**FORWARD_CONFIGS, **FULL_SIZE_CONFIGS}


@pytest.fixture(scope="module")
def loaded_pair(tmp_path_factory):
    """For each config name: (diffusers' perturbed model, ours loaded from the folder diffusers saved)."""
    pairs = {}

    def get(name: str):
        if name not in pairs:
            theirs = diffusers_unet(FORWARD_CONFIGS[name])
            folder = tmp_path_factory.mktemp(name)
            save_diffusers_pipeline(folder, theirs)
            ours, _ = load_pipeline(folder)
            pairs[name] = theirs, ours.eval()
        return pairs[name]

    return get


def sample_for(config: dict, batch_size: int = 2) -> torch.Tensor:
    size = config.get("sample_size")
    return torch.randn(batch_size, config.get("in_channels", 3), size, size, generator=torch.Generator().manual_seed(1))


def build_on_meta(cls, config: dict) -> torch.nn.Module:
    """Full-size models are built without memory: only names and shapes are compared."""
    with torch.device("meta"):
        return cls(**config)


@pytest.mark.parametrize("name", FORWARD_CONFIGS)
def test_forward_matches_diffusers_for_a_folder_diffusers_saved(name, loaded_pair):
    theirs, ours = loaded_pair(name)
    sample = sample_for(FORWARD_CONFIGS[name])
    timesteps = torch.tensor([10, 999])
    with torch.no_grad():
        expected = theirs(sample, timesteps).sample
        actual = ours(sample, timesteps)
    assert actual.shape == expected.shape
    assert measured(f"unet forward {name} relative error", relative_error(actual, expected)) <= 1e-5


@pytest.mark.parametrize(
    "timestep", [500, torch.tensor(500), torch.tensor([500, 500])], ids=["int", "0-d tensor", "batch tensor"]
)
def test_forward_accepts_int_0d_and_batch_timesteps(timestep, loaded_pair):
    theirs, ours = loaded_pair("tiny")
    sample = sample_for(TINY)
    with torch.no_grad():
        expected = theirs(sample, timestep).sample
        actual = ours(sample, timestep)
    assert measured("unet forward timestep forms relative error", relative_error(actual, expected)) <= 1e-5


def test_forward_returns_a_plain_tensor_of_shape_batch_out_channels_height_width():
    unet = UNet2DModel(**dict(TINY, in_channels=3, out_channels=1)).eval()
    with torch.no_grad():
        output = unet(torch.randn(2, 3, 8, 8), 3)
    assert type(output) is torch.Tensor
    assert output.shape == (2, 1, 8, 8)


def test_dropout_is_active_in_train_mode_and_off_in_eval_mode():
    torch.manual_seed(0)
    unet = UNet2DModel(**dict(TINY, dropout=0.5))
    sample = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        unet.train()
        train_outputs = unet(sample, 3), unet(sample, 3)
        unet.eval()
        eval_outputs = unet(sample, 3), unet(sample, 3)
    assert not torch.equal(*train_outputs)
    assert torch.equal(*eval_outputs)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_state_dict_names_and_shapes_equal_diffusers(name):
    config = ALL_CONFIGS[name]
    ours = build_on_meta(UNet2DModel, config).state_dict()
    theirs = build_on_meta(diffusers.UNet2DModel, config).state_dict()
    assert sorted(ours) == sorted(theirs)
    assert {key: tuple(ours[key].shape) for key in ours} == {key: tuple(theirs[key].shape) for key in theirs}


@pytest.mark.parametrize(("name", "count"), [("tutorial", 113_673_219), ("cifar10", 35_746_307)])
def test_full_size_models_have_diffusers_parameter_count(name, count):
    unet = build_on_meta(UNet2DModel, FULL_SIZE_CONFIGS[name])
    assert sum(parameter.numel() for parameter in unet.parameters()) == count


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_holds_every_diffusers_key_with_the_same_value(name):
    config = ALL_CONFIGS[name]
    ours = build_on_meta(UNet2DModel, config).config
    theirs = build_on_meta(diffusers.UNet2DModel, config).config
    assert public_config(ours) == public_config(theirs)


def test_default_config_equals_diffusers_defaults():
    assert public_config(build_on_meta(UNet2DModel, {}).config) == public_config(
        build_on_meta(diffusers.UNet2DModel, {}).config
    )


def test_config_survives_a_json_round_trip():
    unet = UNet2DModel(**FORWARD_CONFIGS["cifar10_layout"])
    rebuilt = UNet2DModel(**json.loads(json.dumps(unet.config)))
    assert public_config(rebuilt.config) == public_config(unet.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}


UNSUPPORTED = [
    ("down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D")),
    ("up_block_types", ("CrossAttnUpBlock2D", "UpBlock2D")),
    ("class_embed_type", "projection"),
    ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("act_fn", "gelu"),
    ("mid_block_type", "UNetMidBlock2DCrossAttn"),
    ("upsample_type", "resnet"),
    ("downsample_type", "resnet"),
]


@pytest.mark.parametrize(("key", "value"), UNSUPPORTED, ids=[f"{k}={v}" for k, v in UNSUPPORTED])
def test_unsupported_config_value_raises_value_error_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        UNet2DModel(**dict(TINY, **{key: value}))


def test_different_numbers_of_down_and_up_blocks_raise_value_error():
    with pytest.raises(ValueError, match="up_block_types|down_block_types"):
        UNet2DModel(**dict(TINY, up_block_types=("UpBlock2D",)))
