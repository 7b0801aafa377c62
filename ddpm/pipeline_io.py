"""The on-disk format: a diffusers DDPMPipeline folder, written and read without diffusers.

    model_index.json
    scheduler/scheduler_config.json
    unet/config.json
    unet/diffusion_pytorch_model.safetensors
    class_labels.json                            (class-conditional models: {"0": "circle-red-white", ...})

Legacy hub repos (google/ddpm-cifar10-32) keep config.json, the weights and scheduler_config.json
at the root; we read those too.
"""

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .ddim import DEFAULT_CONFIG as DDIM_DEFAULTS
from .files import reported_as_write_error, write_temporary
from .ddim import DDIMScheduler
from .scheduler import DEFAULT_CONFIG as SCHEDULER_DEFAULTS
from .scheduler import DDPMScheduler
from .unet import DEFAULT_CONFIG as UNET_DEFAULTS
from .unet import UNet2DModel, unwrap_model

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose format we write
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_LABELS_NAME = "class_labels.json"  # ours: diffusers' DDPMPipeline ignores it
LEGACY_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
MODEL_INDEX = {
    "_class_name": "DDPMPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "DDPMScheduler"],
    "unet": ["diffusers", "UNet2DModel"],
}
# Attention weights of diffusers < 0.14 had other names; diffusers renames them on load, so do we.
OLD_ATTENTION_NAME = re.compile(r"(attentions\.\d+\.)(query|key|value|proj_attn)\.")
NEW_ATTENTION_NAME = {"query": "to_q.", "key": "to_k.", "value": "to_v.", "proj_attn": "to_out.0."}


class PipelineLoadError(ValueError):
    """A pipeline folder that cannot be loaded: the message names the file or tensor at fault."""


def save_pipeline(directory: str | os.PathLike, unet: nn.Module, scheduler: DDPMScheduler,
                  class_names: list[str] | None = None) -> None:
    """Write `unet` and `scheduler` as a DDPMPipeline folder that `DDPMPipeline.from_pretrained` loads, and the
    names of a class-conditional unet's classes, label k's at k, as class_labels.json (removed if None).

    Every file is written under a temporary name first and then renamed into place, so a crash at
    any moment leaves each file either the old complete one or the new complete one.
    """
    directory = Path(directory)
    unet = unwrap_model(unet)
    if class_names is not None:
        check_class_names(class_names, unet, "save_pipeline")
    state_dict = {strip_wrapper_prefixes(name): tensor.detach().contiguous().cpu()
                  for name, tensor in unet.state_dict().items()}
    files = {
        directory / "model_index.json": config_json(MODEL_INDEX),
        directory / "scheduler" / "scheduler_config.json":
            config_json({"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **scheduler.config}),
        directory / "unet" / "config.json":
            config_json({"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, **unet.config}),
    }
    if class_names is not None:
        files[directory / CLASS_LABELS_NAME] = json.dumps(dict(enumerate(class_names)), indent=2) + "\n"
    weights_path = directory / "unet" / WEIGHTS_NAME
    temporary = {}
    with reported_as_write_error("the pipeline", directory):
        try:  # every file written before any is renamed: a failed write (a full disk) leaves the old set whole
            for path, text in files.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary[path] = write_temporary(path, lambda tmp, text=text: tmp.write_text(text))
            temporary[weights_path] = write_temporary(
                weights_path, lambda tmp: save_file(state_dict, str(tmp), metadata={"format": "pt"}))
        except Exception:  # a failed write (a full disk): no temporary left behind
            for tmp in temporary.values():
                tmp.unlink(missing_ok=True)
            raise
    for path, tmp in temporary.items():
        os.replace(tmp, path)
    if class_names is None:
        (directory / CLASS_LABELS_NAME).unlink(missing_ok=True)  # left by an earlier save: not this model's


def check_class_names(class_names: list[str], unet: nn.Module, where: str) -> None:
    """ValueError unless there is one name, a string, per class of `unet` (num_class_embeds = classes + 1)."""
    config = unwrap_model(unet).config
    classes = config["num_class_embeds"] - 1 if config["num_class_embeds"] and not config["class_embed_type"] else None
    if len(class_names) != classes:
        raise ValueError(f"{where}: {len(class_names)} class names for a UNet of num_class_embeds="
                         f"{config['num_class_embeds']!r} and class_embed_type={config['class_embed_type']!r}; "
                         "K class names go with num_class_embeds = K + 1 (the null label) and class_embed_type None")
    not_strings = [name for name in class_names if not isinstance(name, str)]
    if not_strings:
        raise ValueError(f"{where}: class names must be strings, got {not_strings[0]!r}")


def read_class_labels(directory: str | os.PathLike, unet: nn.Module | None = None) -> list[str] | None:
    """The class names of a pipeline folder, label k's at k, from its class_labels.json; None if it has none.
    Given the folder's `unet`, they must be one per class of it."""
    path = Path(directory) / CLASS_LABELS_NAME
    if not path.is_file():
        return None
    try:
        mapping = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PipelineLoadError(f"cannot parse {str(path)!r}: {error}") from None
    if not isinstance(mapping, dict) or set(mapping) != {str(k) for k in range(len(mapping))}:
        seen = f"keys {sorted(mapping)[:5]}" if isinstance(mapping, dict) else f"a JSON {type(mapping).__name__}"
        raise PipelineLoadError(f"{str(path)!r} must map the labels \"0\", \"1\", ... to class names, got {seen}")
    names = [mapping[str(k)] for k in range(len(mapping))]
    try:
        if unet is not None:
            check_class_names(names, unet, str(path))
        elif not all(isinstance(name, str) for name in names):
            raise ValueError(f"{str(path)}: class names must be strings, got {names[:5]}")
    except ValueError as error:
        raise PipelineLoadError(str(error)) from None
    return names


def config_json(config: dict[str, Any]) -> str:
    """JSON exactly as diffusers writes it."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def strip_wrapper_prefixes(name: str) -> str:
    """`module.` (DistributedDataParallel) and `_orig_mod.` (torch.compile) are not part of the model."""
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name


def load_pipeline(directory: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  scheduler_class: type[DDPMScheduler | DDIMScheduler] = DDPMScheduler,
                  ) -> tuple[UNet2DModel, DDPMScheduler | DDIMScheduler]:
    """Read a DDPMPipeline or DDIMPipeline folder (ours, diffusers', or the legacy flat hub layout) into
    (unet, scheduler); the scheduler is a `scheduler_class` built from the folder's scheduler config."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PipelineLoadError(f"pipeline folder {str(directory)!r} does not exist")
    if (directory / "unet").is_dir() or not (directory / "config.json").is_file():
        unet_dir, scheduler_path = directory / "unet", directory / "scheduler" / "scheduler_config.json"
    else:  # legacy flat layout
        unet_dir, scheduler_path = directory, directory / "scheduler_config.json"

    unet_config = read_config(unet_dir / "config.json", "UNet2DModel")
    scheduler_config = read_config(scheduler_path, "DDPMScheduler", "DDIMScheduler")
    try:
        unet = UNet2DModel(**keep_known_keys(unet_config, UNET_DEFAULTS, unet_dir / "config.json"))
        # a DDPM config read by the DDIM scheduler (or the other way) drops the other's keys silently, as diffusers
        scheduler = scheduler_class.from_config(
            keep_known_keys(scheduler_config, {**SCHEDULER_DEFAULTS, **DDIM_DEFAULTS}, scheduler_path))
    except ValueError as error:
        raise PipelineLoadError(f"{directory}: {error}") from None

    state_dict = read_weights(unet_dir)
    check_state_dict(state_dict, unet.state_dict(), unet_dir)
    unet.load_state_dict(state_dict)
    return unet.to(device=device, dtype=dtype).eval(), scheduler


def pipeline_folder(name_or_path: str) -> str:
    """A local pipeline folder as it is, or a Hugging Face Hub repo id downloaded into the Hub cache."""
    if os.path.exists(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise PipelineLoadError(f"pipeline folder {name_or_path!r} does not exist") from None
    try:
        return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.bin"])
    except Exception as error:  # offline, no such repo, no access, network failure...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PipelineLoadError(f"no folder {name_or_path!r} here, and could not download {name_or_path!r} from the "
                                f"Hugging Face Hub: {reason}") from None


def read_config(path: Path, *class_names: str) -> dict[str, Any]:
    """A config JSON file of one of `class_names` as a dict, without diffusers' private `_` keys."""
    if not path.is_file():
        raise PipelineLoadError(f"missing config file {str(path)!r}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PipelineLoadError(f"cannot parse config file {str(path)!r}: {error}") from None
    if not isinstance(config, dict):
        raise PipelineLoadError(f"config file {str(path)!r} does not hold a JSON object")
    found = config.get("_class_name", class_names[0])
    if found not in class_names:
        expected = " or a ".join(class_names)
        raise PipelineLoadError(f"config file {str(path)!r} describes a {found}, expected a {expected}")
    return {key: value for key, value in config.items() if not key.startswith("_")}


def keep_known_keys(config: dict[str, Any], known: dict[str, Any], path: Path) -> dict[str, Any]:
    """Drop keys this implementation does not know (other diffusers versions write some), with a warning."""
    unknown = sorted(set(config) - set(known))
    if unknown:
        warnings.warn(f"{path}: ignoring unknown config keys {unknown}", stacklevel=3)
    return {key: value for key, value in config.items() if key in known}


def read_weights(unet_dir: Path) -> dict[str, torch.Tensor]:
    """The UNet weights: safetensors if present, else the .bin file loaded with weights_only=True."""
    safetensors_path, bin_path = unet_dir / WEIGHTS_NAME, unet_dir / LEGACY_WEIGHTS_NAME
    try:
        if safetensors_path.is_file():
            state_dict = load_file(str(safetensors_path))
        elif bin_path.is_file():
            state_dict = torch.load(bin_path, map_location="cpu", weights_only=True)
        else:
            raise PipelineLoadError(f"missing weights: neither {str(safetensors_path)!r} nor {str(bin_path)!r} exists")
    except (SafetensorError, OSError, RuntimeError, EOFError) as error:
        path = safetensors_path if safetensors_path.is_file() else bin_path
        raise PipelineLoadError(f"cannot read weights file {str(path)!r}: {error}") from None
    return {OLD_ATTENTION_NAME.sub(lambda m: m[1] + NEW_ATTENTION_NAME[m[2]], name): tensor
            for name, tensor in state_dict.items()}


def check_state_dict(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], unet_dir: Path) -> None:
    """Refuse missing, unexpected and wrongly shaped tensors (diffusers leaves a missing one uninitialised)."""
    missing = sorted(set(expected) - set(found))
    if missing:
        raise PipelineLoadError(f"{unet_dir}: weights file lacks {len(missing)} tensor(s) the config needs, "
                                f"first {missing[0]!r}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise PipelineLoadError(f"{unet_dir}: weights file has {len(unexpected)} tensor(s) the config does not "
                                f"use, first {unexpected[0]!r}")
    for name, tensor in expected.items():
        if found[name].shape != tensor.shape:
            raise PipelineLoadError(f"{unet_dir}: tensor {name!r} has shape {tuple(found[name].shape)}, "
                                    f"the config needs {tuple(tensor.shape)}")


