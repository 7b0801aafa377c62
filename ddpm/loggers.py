"""Where train.py's scalars and sample grids go (--logger): TensorBoard, or Weights & Biases.

Both receive the same values under the same names, and both write inside output_dir (in --logging_dir).
wandb is an optional extra, imported only when asked for; WANDB_MODE=offline runs it without network.
"""

import argparse
import os
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from .files import write_atomically


class LoggerError(RuntimeError):
    """The logger cannot start: the message says why and what to do."""


class TensorBoardLogger:
    """Event files in log_dir: `tensorboard --logdir log_dir`."""

    def __init__(self, log_dir: Path):
        self.writer = SummaryWriter(str(log_dir))

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def log_image(self, name: str, image: torch.Tensor, step: int) -> None:
        """`image`: (channels, height, width) in [0, 1], e.g. a make_grid of samples."""
        self.writer.add_image(name, image, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A wandb run in log_dir/wandb/; a resumed training run continues the wandb run it started."""

    def __init__(self, log_dir: Path, config: dict, resumed: bool):
        import wandb

        self.wandb = wandb
        log_dir.mkdir(parents=True, exist_ok=True)
        id_file = log_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ddpm"), name=log_dir.parent.resolve().name,
                                  dir=log_dir, config=config, id=run_id, resume="allow" if run_id else None,
                                  allow_val_change=True)  # a resumed run may change flags, e.g. the steps
        except wandb.Error as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise LoggerError(f"wandb could not start: {reason} (`wandb login`, or WANDB_MODE=offline to log "
                              "without network)") from None
        write_atomically(id_file, lambda tmp: tmp.write_text(self.run.id))  # a kill leaves the old id or the new

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_image(self, name: str, image: torch.Tensor, step: int) -> None:
        """`image`: (channels, height, width) in [0, 1], rounded to 8 bits as torchvision's save_image does."""
        pixels = image.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        self.run.log({name: self.wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        self.run.finish()


def make_logger(args: argparse.Namespace, config: dict, resumed: bool) -> TensorBoardLogger | WandbLogger:
    """The --logger of train.py's `args`, writing to output_dir/logging_dir; `config` is what wandb records."""
    log_dir = Path(args.output_dir) / args.logging_dir
    return WandbLogger(log_dir, config, resumed) if args.logger == "wandb" else TensorBoardLogger(log_dir)
