"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    checkpoint-{step}/
        model.safetensors         training weights
        ema.safetensors           EMA weights (with --use_ema)
        optimizer.pt              AdamW state, read back with torch.load(weights_only=True)
        rng-rank{r}.safetensors   torch CPU / CUDA / noise-generator states of rank r
        state.json                step, data position, LR schedule, grad scaler, EMA step, Python
                                  and numpy RNG states of every rank, the outputs due at the step
        outputs-written           (empty) the outputs due at the step are written: none is left to redo

Each checkpoint is written into a hidden temporary folder and renamed into place when complete,
so a kill at any moment leaves the earlier checkpoints intact and never a half-written one.
"""

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .files import reported_as_write_error, write_atomically

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# in checkpoint-{step}/, written once the outputs due at that step (grid, pipeline, card, upload) are all written
OUTPUTS_WRITTEN = "outputs-written"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the folder or file."""


def capture_rng_state(noise_generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: (tensors, JSON-able values)."""
    tensors = {"torch_cpu": torch.get_rng_state(), "noise_generator": noise_generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    values = {"python": [version, list(mt_state), gauss],
              "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, values


def restore_rng_state(noise_generator: torch.Generator, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    noise_generator.set_state(tensors["noise_generator"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    version, mt_state, gauss = values["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(output_dir: Path, step: int, model_state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor] | None, optimizer_state: dict[str, Any],
                    rng_states: list[tuple[dict[str, torch.Tensor], dict[str, Any]]], state: dict[str, Any],
                    total_limit: int | None) -> Path:
    """Write checkpoint-{step} atomically (rng_states: one per rank), then prune beyond `total_limit`."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with reported_as_write_error(f"checkpoint-{step}", output_dir):
        try:
            tmp.mkdir(parents=True)
            save_file(contiguous_cpu(model_state), str(tmp / "model.safetensors"))
            if ema_state is not None:
                save_file(contiguous_cpu(ema_state), str(tmp / "ema.safetensors"))
            torch.save(optimizer_state, tmp / "optimizer.pt")
            for rank, (tensors, _) in enumerate(rng_states):
                save_file(contiguous_cpu(tensors), str(tmp / f"rng-rank{rank}.safetensors"))
            state = {**state, "rng": [values for _, values in rng_states]}
            (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
            for path in tmp.iterdir():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        except Exception:  # a failed write (a full disk) leaves no half-written folder behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if final.exists():  # the same step saved again, after resuming from an earlier checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    directory = os.open(output_dir, os.O_RDONLY)  # make the rename durable before older checkpoints go
    os.fsync(directory)
    os.close(directory)
    if total_limit is not None:
        others = [path for path in list_checkpoints(output_dir) if path != final]
        for old in others[:max(0, len(others) - (total_limit - 1))]:  # oldest first; never the one just written
            shutil.rmtree(old)
    return final


def mark_outputs_written(checkpoint: Path) -> None:
    """Record that the grid, pipeline and card due at the checkpoint's step are all on disk (and uploaded)."""
    write_atomically(checkpoint / OUTPUTS_WRITTEN, lambda tmp: tmp.write_text(""))


def outputs_written(checkpoint: Path) -> bool:
    return (checkpoint / OUTPUTS_WRITTEN).is_file()


def contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest step first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m[1]), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_NAME.match(p.name))]
    return [path for _, path in sorted(found)]


def set_aside_checkpoints_after(output_dir: Path, step: int) -> list[Path]:
    """Rename checkpoint-N for every N > step to abandoned-checkpoint-N, and return the new paths.

    They belong to a run that this one replaces (a new run, or a resume from an earlier checkpoint), so a
    later `--resume_from_checkpoint latest` must not pick them up. Nothing is deleted.
    """
    moved = []
    for path in list_checkpoints(output_dir):
        if int(CHECKPOINT_NAME.match(path.name)[1]) <= step:
            continue
        target, copy = path.with_name(f"abandoned-{path.name}"), 1
        while target.exists():  # set aside before, by an earlier restart
            target, copy = path.with_name(f"abandoned-{path.name}-{copy}"), copy + 1
        os.replace(path, target)
        moved.append(target)
    return moved


def load_checkpoint(path: Path, rank: int) -> dict[str, Any]:
    """Read a checkpoint folder: model, ema, optimizer, state and this rank's RNG state."""
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{str(path)!r} is not a checkpoint folder (no state.json)")
    try:
        state = json.loads((path / "state.json").read_text())
        rng_file = path / f"rng-rank{rank}.safetensors"
        return {
            "state": state,
            "model": load_file(str(path / "model.safetensors")),
            "ema": load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None,
            "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
            "rng": (load_file(str(rng_file)), state["rng"][rank]) if rng_file.is_file() else None,
        }
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {error}") from None
