"""save_pipeline / load_pipeline: diffusers' DDPMPipeline folder, written and read to the letter."""

import inspect
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
from safetensors import safe_open

import ddpm
from ddpm import DDPMScheduler, PipelineLoadError, UNet2DModel, load_pipeline, save_pipeline
from ddpm.files import WriteError
from oracle import (  # noqa: F401  (single_thread is an autouse fixture)
    CIFAR10_LAYOUT,
    TINY,
    diffusers,
    diffusers_unet,
    measured,
    perturb_,
    public_config,
    relative_error,
    save_diffusers_pipeline,
    single_thread,
)

WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULER_OPTIONS = {
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
    "clip_sample": False,
}


@pytest.fixture
def diffusers_folder(tmp_path):
    """A folder written by diffusers' DDPMPipeline.save_pretrained, and the model in it."""
    theirs = diffusers_unet(TINY)
    save_diffusers_pipeline(tmp_path / "pipeline", theirs, **SCHEDULER_OPTIONS)
    return tmp_path / "pipeline", theirs


@pytest.fixture
def our_unet():
    torch.manual_seed(0)
    return perturb_(UNet2DModel(**TINY), seed=1).eval()


def files_in(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(folder / "unet" / WEIGHTS)


def assert_state_dict_equal(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def forward_relative_error(ours, theirs, config) -> float:
    sample = torch.randn(2, config.get("in_channels", 3), 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return relative_error(ours(sample, torch.tensor([5, 900])), theirs(sample, torch.tensor([5, 900])).sample)


# Reading diffusers' folders


def test_load_pipeline_reads_diffusers_weights_exactly(diffusers_folder):
    folder, theirs = diffusers_folder
    unet, _ = load_pipeline(folder)
    assert_state_dict_equal(unet.state_dict(), theirs.state_dict())


def test_load_pipeline_reads_diffusers_unet_and_scheduler_config(diffusers_folder):
    folder, theirs = diffusers_folder
    unet, scheduler = load_pipeline(folder)
    assert public_config(unet.config) == public_config(theirs.config)
    assert public_config(scheduler.config) == public_config(diffusers.DDPMScheduler(**SCHEDULER_OPTIONS).config)


def test_load_pipeline_gives_fp32_by_default(diffusers_folder):
    unet, _ = load_pipeline(diffusers_folder[0])
    assert {tensor.dtype for tensor in unet.state_dict().values()} == {torch.float32}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load_as_fp32_by_default(dtype, diffusers_folder):
    folder, theirs = diffusers_folder
    half = {key: tensor.to(dtype) for key, tensor in theirs.state_dict().items()}
    safetensors.torch.save_file(half, folder / "unet" / WEIGHTS, metadata={"format": "pt"})
    unet, _ = load_pipeline(folder)
    assert_state_dict_equal(unet.state_dict(), {key: tensor.float() for key, tensor in half.items()})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weights_load_in_the_asked_dtype(dtype, diffusers_folder):
    folder, theirs = diffusers_folder
    half = {key: tensor.to(dtype) for key, tensor in theirs.state_dict().items()}
    safetensors.torch.save_file(half, folder / "unet" / WEIGHTS, metadata={"format": "pt"})
    unet, _ = load_pipeline(folder, dtype=dtype)
    assert_state_dict_equal(unet.state_dict(), half)


def test_fp32_weights_load_in_the_asked_half_dtype(diffusers_folder):
    folder, theirs = diffusers_folder
    unet, _ = load_pipeline(folder, dtype=torch.bfloat16)
    assert_state_dict_equal(unet.state_dict(), {k: v.to(torch.bfloat16) for k, v in theirs.state_dict().items()})


def test_pytorch_bin_weights_load(diffusers_folder):
    folder, theirs = diffusers_folder
    (folder / "unet" / WEIGHTS).unlink()
    torch.save(theirs.state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")
    unet, _ = load_pipeline(folder)
    assert_state_dict_equal(unet.state_dict(), theirs.state_dict())


def flatten_to_legacy_layout(folder: Path, unet_config: dict, scheduler_config: dict) -> None:
    """The layout of early hub repos such as google/ddpm-cifar10-32: everything at the root."""
    (folder / "unet" / WEIGHTS).rename(folder / WEIGHTS)
    shutil.rmtree(folder / "unet")
    shutil.rmtree(folder / "scheduler")
    (folder / "config.json").write_text(json.dumps(unet_config))
    (folder / "scheduler_config.json").write_text(json.dumps(scheduler_config))


# google/ddpm-cifar10-32's files written by diffusers 0.0.x/0.1.x: only some keys, one obsolete.
LEGACY_UNET_KEYS = [
    "act_fn", "attention_head_dim", "block_out_channels", "center_input_sample", "down_block_types",
    "downsample_padding", "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block",
    "mid_block_scale_factor", "norm_eps", "norm_num_groups", "out_channels", "sample_size",
    "time_embedding_type", "up_block_types",
]  # fmt: skip
LEGACY_SCHEDULER = {
    "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "tensor_format": "pt",
    "trained_betas": None, "variance_type": "fixed_small",
}  # fmt: skip


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
def test_legacy_flat_layout_loads(weights_format, tmp_path):
    theirs = diffusers_unet(CIFAR10_LAYOUT)
    folder = tmp_path / "cifar"
    save_diffusers_pipeline(folder, theirs)
    unet_config = {"_class_name": "UNet2DModel", "_diffusers_version": "0.0.4"}
    unet_config.update({key: public_config(theirs.config)[key] for key in LEGACY_UNET_KEYS})
    flatten_to_legacy_layout(folder, unet_config, LEGACY_SCHEDULER)
    if weights_format == "bin":
        (folder / WEIGHTS).unlink()
        torch.save(theirs.state_dict(), folder / "diffusion_pytorch_model.bin")

    unet, scheduler = load_pipeline(folder)

    assert_state_dict_equal(unet.state_dict(), theirs.state_dict())
    assert public_config(unet.config) == public_config(diffusers.UNet2DModel.from_pretrained(folder).config)
    known = {key: value for key, value in public_config(LEGACY_SCHEDULER).items() if key != "tensor_format"}
    assert public_config(scheduler.config) == public_config(diffusers.DDPMScheduler(**known).config)


def test_config_keys_left_out_take_diffusers_defaults(diffusers_folder):
    folder, theirs = diffusers_folder
    signature = inspect.signature(diffusers.UNet2DModel.__init__).parameters.values()
    defaults = public_config({p.name: p.default for p in signature if p.default is not inspect.Parameter.empty})
    config = read_json(folder / "unet" / "config.json")
    sparse = {key: value for key, value in config.items() if defaults.get(key, ...) != value}
    (folder / "unet" / "config.json").write_text(json.dumps(sparse))
    unet, _ = load_pipeline(folder)
    assert public_config(unet.config) == public_config(theirs.config)


# Refused folders


def test_pipeline_load_error_is_a_value_error():
    assert issubclass(PipelineLoadError, ValueError)


def rewrite_weights(folder: Path, change) -> None:
    path = folder / "unet" / WEIGHTS
    weights = safetensors.torch.load_file(path)
    change(weights)
    safetensors.torch.save_file(weights, path, metadata={"format": "pt"})


def test_missing_weight_is_refused_naming_it(diffusers_folder):
    rewrite_weights(diffusers_folder[0], lambda weights: weights.pop("conv_out.bias"))
    with pytest.raises(PipelineLoadError, match=re.escape("conv_out.bias")):
        load_pipeline(diffusers_folder[0])


def test_unexpected_weight_is_refused_naming_it(diffusers_folder):
    rewrite_weights(diffusers_folder[0], lambda weights: weights.update({"extra_block.weight": torch.zeros(3)}))
    with pytest.raises(PipelineLoadError, match=re.escape("extra_block.weight")):
        load_pipeline(diffusers_folder[0])


def test_weight_of_wrong_shape_is_refused_naming_it(diffusers_folder):
    rewrite_weights(diffusers_folder[0], lambda weights: weights.update({"conv_in.weight": torch.zeros(16, 3, 5, 5)}))
    with pytest.raises(PipelineLoadError, match=re.escape("conv_in.weight")):
        load_pipeline(diffusers_folder[0])


def test_missing_unet_config_is_refused_naming_the_file(diffusers_folder):
    (diffusers_folder[0] / "unet" / "config.json").unlink()
    with pytest.raises(PipelineLoadError, match=re.escape("config.json")):
        load_pipeline(diffusers_folder[0])


def test_unparseable_unet_config_is_refused_naming_the_file(diffusers_folder):
    (diffusers_folder[0] / "unet" / "config.json").write_text('{"block_out_channels": [16, 32],')
    with pytest.raises(PipelineLoadError, match=re.escape("config.json")):
        load_pipeline(diffusers_folder[0])


def test_missing_weights_file_is_refused_naming_it(diffusers_folder):
    (diffusers_folder[0] / "unet" / WEIGHTS).unlink()
    with pytest.raises(PipelineLoadError, match="diffusion_pytorch_model"):
        load_pipeline(diffusers_folder[0])


# Writing: the folder diffusers writes, to the letter


@pytest.fixture
def both_folders(tmp_path, our_unet):
    """The same model and scheduler saved by us and by diffusers."""
    scheduler = DDPMScheduler(**SCHEDULER_OPTIONS)
    save_pipeline(tmp_path / "ours", our_unet, scheduler)
    theirs = diffusers.UNet2DModel(**TINY)
    theirs.load_state_dict(our_unet.state_dict())
    save_diffusers_pipeline(tmp_path / "theirs", theirs, **SCHEDULER_OPTIONS)
    return tmp_path / "ours", tmp_path / "theirs"


def test_saved_folder_holds_the_files_diffusers_writes(both_folders):
    ours, theirs = both_folders
    assert files_in(ours) == files_in(theirs) == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    }


@pytest.mark.parametrize("name", ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json"])
def test_saved_json_has_the_keys_and_values_diffusers_writes(name, both_folders):
    ours, theirs = (read_json(folder / name) for folder in both_folders)
    assert sorted(ours) == sorted(theirs)
    ours.pop("_diffusers_version")
    theirs.pop("_diffusers_version")
    assert ours == theirs


def test_saved_model_index_names_the_ddpm_pipeline_and_its_components(both_folders):
    index = read_json(both_folders[0] / "model_index.json")
    assert index["_class_name"] == "DDPMPipeline"
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["unet"] == ["diffusers", "UNet2DModel"]


@pytest.mark.parametrize("name", ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json"])
def test_saved_json_is_formatted_like_diffusers(name, both_folders):
    text = (both_folders[0] / name).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_saved_weights_are_fp32_safetensors_with_pt_metadata(both_folders, our_unet):
    path = both_folders[0] / "unet" / WEIGHTS
    with safe_open(path, "pt") as weights:
        assert weights.metadata() == {"format": "pt"}
    assert_state_dict_equal(weights_of(both_folders[0]), our_unet.state_dict())


def test_diffusers_loads_saved_unet_with_no_missing_or_unexpected_keys(both_folders):
    _, info = diffusers.UNet2DModel.from_pretrained(both_folders[0], subfolder="unet", output_loading_info=True)
    assert info["missing_keys"] == []
    assert info["unexpected_keys"] == []
    assert info["mismatched_keys"] == []
    assert info["error_msgs"] == []


def test_diffusers_pipeline_loads_saved_folder_and_gives_the_same_outputs(both_folders, our_unet):
    pipeline = diffusers.DDPMPipeline.from_pretrained(both_folders[0])
    assert isinstance(pipeline.unet, diffusers.UNet2DModel)
    assert isinstance(pipeline.scheduler, diffusers.DDPMScheduler)
    assert public_config(pipeline.scheduler.config) == public_config(DDPMScheduler(**SCHEDULER_OPTIONS).config)
    error = forward_relative_error(our_unet, pipeline.unet.eval(), TINY)
    assert measured("diffusers loading our folder: forward relative error", error) <= 1e-5


def test_save_then_load_gives_back_the_same_weights_and_configs(tmp_path, our_unet):
    scheduler = DDPMScheduler(**SCHEDULER_OPTIONS)
    save_pipeline(tmp_path, our_unet, scheduler)
    unet, loaded_scheduler = load_pipeline(tmp_path)
    assert_state_dict_equal(unet.state_dict(), our_unet.state_dict())
    assert public_config(unet.config) == public_config(our_unet.config)
    assert public_config(loaded_scheduler.config) == public_config(scheduler.config)


@pytest.fixture(scope="module")
def distributed_data_parallel(tmp_path_factory):
    """DistributedDataParallel in a one-process CPU (gloo) group: its state dict names start `module.`."""
    started_here = not dist.is_initialized()
    if started_here:
        store = tmp_path_factory.mktemp("process_group") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield torch.nn.parallel.DistributedDataParallel
    if started_here:
        dist.destroy_process_group()


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_save_pipeline_strips_wrapper_prefixes(prefix, tmp_path, our_unet, request):
    wrapped = our_unet
    if "module." in prefix:
        wrapped = request.getfixturevalue("distributed_data_parallel")(wrapped)
    if "_orig_mod." in prefix:
        wrapped = torch.compile(wrapped)
    assert next(iter(wrapped.state_dict())).startswith(prefix)
    save_pipeline(tmp_path, wrapped, DDPMScheduler())
    assert_state_dict_equal(weights_of(tmp_path), our_unet.state_dict())
    assert read_json(tmp_path / "unet" / "config.json")["block_out_channels"] == [16, 32]


def test_save_pipeline_writes_non_contiguous_parameters(tmp_path, our_unet):
    weight = our_unet.down_blocks[1].attentions[0].to_q.weight
    weight.data = weight.data.t().contiguous().t()
    assert not weight.is_contiguous()
    save_pipeline(tmp_path, our_unet, DDPMScheduler())
    assert_state_dict_equal(weights_of(tmp_path), our_unet.state_dict())


# Crashes while saving over an existing pipeline


class SimulatedCrash(OSError):
    pass


@pytest.fixture
def pipeline_to_overwrite(tmp_path, our_unet):
    """A folder holding a saved pipeline, and a different pipeline about to be saved over it."""
    save_pipeline(tmp_path, our_unet, DDPMScheduler())
    torch.manual_seed(1)
    new_unet = perturb_(UNet2DModel(**dict(TINY, block_out_channels=(32, 64), norm_num_groups=16)), seed=2)
    new_scheduler = DDPMScheduler(prediction_type="v_prediction")
    return tmp_path, new_unet, new_scheduler


def assert_old_pipeline_still_loads(folder: Path, old_unet: UNet2DModel) -> None:
    unet, scheduler = load_pipeline(folder)
    assert_state_dict_equal(unet.state_dict(), old_unet.state_dict())
    assert public_config(scheduler.config) == public_config(DDPMScheduler().config)


def test_crash_while_writing_weights_keeps_the_old_pipeline(pipeline_to_overwrite, our_unet, monkeypatch):
    folder, new_unet, new_scheduler = pipeline_to_overwrite
    real_save = safetensors.torch.save

    def save_half_then_crash(tensors, filename, metadata=None):
        data = real_save(tensors, metadata=metadata)
        Path(filename).write_bytes(data[: len(data) // 2])
        raise SimulatedCrash("No space left on device")

    def crash(*args, **kwargs):
        raise SimulatedCrash("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_half_then_crash)
    monkeypatch.setattr(safetensors.torch, "save", crash)
    # ddpm may hold its own reference, from `from safetensors.torch import save_file`.
    monkeypatch.setattr(sys.modules[save_pipeline.__module__], "save_file", save_half_then_crash, raising=False)
    with pytest.raises(WriteError, match=f"^cannot write the pipeline in {re.escape(str(folder))}: no space left on "
                                         "the device$"):
        save_pipeline(folder, new_unet, new_scheduler)
    monkeypatch.undo()

    assert_old_pipeline_still_loads(folder, our_unet)
    assert not list(Path(folder).rglob(".*.tmp-*"))  # the failed save's temporary files are gone


def test_crash_while_writing_the_unet_config_keeps_the_old_pipeline(pipeline_to_overwrite, our_unet, monkeypatch):
    folder, new_unet, new_scheduler = pipeline_to_overwrite
    real_dumps, real_dump = json.dumps, json.dump

    def crash_on_unet_config(dump):
        def dump_unless_unet_config(obj, *args, **kwargs):
            if isinstance(obj, dict) and "block_out_channels" in obj:
                raise SimulatedCrash("killed while writing unet/config.json")
            return dump(obj, *args, **kwargs)

        return dump_unless_unet_config

    monkeypatch.setattr(json, "dumps", crash_on_unet_config(real_dumps))
    monkeypatch.setattr(json, "dump", crash_on_unet_config(real_dump))
    with pytest.raises(SimulatedCrash):
        save_pipeline(folder, new_unet, new_scheduler)
    monkeypatch.undo()

    assert_old_pipeline_still_loads(folder, our_unet)


def test_ddpm_exports_the_documented_api():
    assert set(ddpm.__all__) >= {"UNet2DModel", "DDPMScheduler", "save_pipeline", "load_pipeline", "generate",
                                 "PipelineLoadError"}
