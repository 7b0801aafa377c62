"""What a training run writes besides its checkpoints (on the main process): the sample grids, the pipeline folder
with its model card, and with --push_to_hub their upload."""

import copy
from argparse import Namespace
from pathlib import Path

import torch
from torchvision.utils import save_image

from .ema import EMA
from .hub import HubRepo
from .loggers import TensorBoardLogger, WandbLogger
from .model_card import write_model_card
from .pipeline_io import save_pipeline
from .run_evaluation import RunEvaluation
from .sampling import generate, sample_grid
from .scheduler import DDPMScheduler


def sampling_weights(unet: torch.nn.Module, ema: EMA | None) -> torch.nn.Module:
    """The weights to sample from and save: a copy holding the EMA weights, or the training model itself."""
    if ema is None:
        return unet
    ema_model = copy.deepcopy(unet)  # not a new UNet2DModel: its initialisation would draw from the RNG
    ema.copy_to(ema_model)
    return ema_model


class RunOutputs:
    """The grids, the pipeline folder and the model card of one run, written into `output_dir`."""

    def __init__(self, args: Namespace, output_dir: Path, scheduler: DDPMScheduler, grid_scheduler,
                 logger: TensorBoardLogger | WandbLogger, evaluation: RunEvaluation, hub_repo: HubRepo | None,
                 data_description: str, world_size: int):
        self.args, self.output_dir, self.scheduler, self.grid_scheduler = args, output_dir, scheduler, grid_scheduler
        self.logger, self.evaluation, self.hub_repo = logger, evaluation, hub_repo
        self.data_description, self.world_size = data_description, world_size

    def save_when_due(self, unet: torch.nn.Module, ema: EMA | None, run, epochs_completed: int, epoch_ended: bool,
                      last: bool, loss: float | None) -> None:
        """After a step of `run` (training_state.RunState): a grid every --save_images_epochs, the pipeline every
        --save_model_epochs, both at the end with --score_images' score."""
        args = self.args
        save_images = last or (epoch_ended and epochs_completed % args.save_images_epochs == 0)
        save_model = last or (epoch_ended and epochs_completed % args.save_model_epochs == 0)
        if not (save_images or save_model):
            return
        weights = sampling_weights(unet, ema)  # one EMA copy for both
        if save_images:
            self.save_samples(weights, epochs_completed, run.step)
        if last:
            self.evaluation.score_samples(weights, self.grid_scheduler, run.step)
        if save_model:
            self.save_pipeline(weights, run.step, run.total_steps, loss)

    def save_samples(self, weights: torch.nn.Module, epoch_number: int, step: int) -> None:
        """samples/{epoch}.png: a grid drawn with a fixed seed, so that grids compare over the run; logged, and
        scored on the built-in data."""
        images = generate(weights, self.grid_scheduler, self.args.eval_batch_size,
                          torch.Generator().manual_seed(self.args.seed), self.args.ddpm_num_inference_steps,
                          progress=True)
        grid = sample_grid(images)
        (self.output_dir / "samples").mkdir(parents=True, exist_ok=True)
        save_image(grid, self.output_dir / "samples" / f"{epoch_number:04d}.png")
        self.logger.log_image("samples", grid, step)
        self.evaluation.score_grid(images, step)

    def save_pipeline(self, weights: torch.nn.Module, step: int, total_steps: int, loss: float | None) -> None:
        """The pipeline folder and its model card (with the run's scores), uploaded with --push_to_hub."""
        save_pipeline(self.output_dir, weights, self.scheduler)
        self.evaluation.estimate_bpd(weights, step)
        write_model_card(self.output_dir, self.args, data=self.data_description, world_size=self.world_size,
                         step=step, total_steps=total_steps, loss=loss,
                         evaluation=self.evaluation.figures or None,
                         repo_id=self.hub_repo.repo_id if self.hub_repo else None)
        if self.hub_repo is not None:
            self.hub_repo.push(step)
