"""What a training run writes besides its checkpoints (on the main process): the sample grids (of a class-conditional
model, a row per class), the pipeline folder with its model card (and class_labels.json), with --keep_best fid a copy
of the pipeline of the lowest FID so far in best/ (best.json: its FID and step, read back by a resumed run), and with
--push_to_hub their upload."""

import copy
import json
from argparse import Namespace
from pathlib import Path

import torch
from torchvision.utils import save_image
from tqdm.auto import tqdm

from .class_conditional import generate_for_labels, grid_labels, images_per_class
from .checkpoint import mark_outputs_written
from .ema import EMA
from .files import reported_as_write_error, write_atomically
from .hub import HubRepo
from .loggers import TensorBoardLogger, WandbLogger
from .model_card import write_model_card
from .pipeline_io import CLASS_LABELS_NAME, WEIGHTS_NAME, save_pipeline
from .run_evaluation import RunEvaluation
from .sampling import generate, sample_grid
from .scheduler import DDPMScheduler


PIPELINE_FILES = ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", f"unet/{WEIGHTS_NAME}",
                  "README.md")


def sampling_weights(unet: torch.nn.Module, ema: EMA | None) -> torch.nn.Module:
    """The weights to sample from and save: a copy holding the EMA weights, or the training model itself."""
    if ema is None:
        return unet
    ema_model = copy.deepcopy(unet)  # not a new UNet2DModel: its initialisation would draw from the RNG
    ema.copy_to(ema_model)
    return ema_model


def outputs_due(args: Namespace, epochs_completed: int, epoch_ended: bool, last: bool) -> dict | None:
    """What is due after a step: a grid every --save_images_epochs, the pipeline every --save_model_epochs, both
    at the end (`final`); None when nothing is."""
    images = last or (epoch_ended and epochs_completed % args.save_images_epochs == 0)
    model = last or (epoch_ended and epochs_completed % args.save_model_epochs == 0)
    if not (images or model):
        return None
    return {"images": images, "model": model, "final": last, "epochs_completed": epochs_completed}


def pipeline_missing(output_dir: Path, class_conditional: bool = False) -> bool:
    """Whether a file of the pipeline folder or its card (and a class-conditional model's class_labels.json) is not
    there: deleted by hand since the run ended."""
    names = PIPELINE_FILES + ((CLASS_LABELS_NAME,) if class_conditional else ())
    return not all((output_dir / name).is_file() for name in names)


def read_best(best_dir: Path) -> dict | None:
    """best/best.json's {"fid", "step"}, or None where there is none (or it cannot be read: the next save replaces
    best/)."""
    path = best_dir / "best.json"
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text())
        return {"fid": float(best["fid"]), "step": int(best["step"])}
    except (OSError, ValueError, KeyError, TypeError) as error:
        tqdm.write(f"ignoring {path}, which cannot be read ({error}); the next pipeline save replaces best/")
        return None


class RunOutputs:
    """The grids, the pipeline folder and the model card of one run, written into `output_dir`."""

    def __init__(self, args: Namespace, output_dir: Path, scheduler: DDPMScheduler, grid_scheduler,
                 logger: TensorBoardLogger | WandbLogger, evaluation: RunEvaluation, hub_repo: HubRepo | None,
                 data_description: str, world_size: int, class_names: list[str] | None = None):
        self.args, self.output_dir, self.scheduler, self.grid_scheduler = args, output_dir, scheduler, grid_scheduler
        self.logger, self.evaluation, self.hub_repo = logger, evaluation, hub_repo
        self.data_description, self.world_size = data_description, world_size
        self.class_names = class_names  # a class-conditional model's, label k's at k
        self.best_dir = output_dir / "best"
        # a resumed run keeps the best of the run it continues; a new run starts best/ over
        self.best = read_best(self.best_dir) if args.keep_best and args.resume_from_checkpoint else None

    def write(self, due: dict, unet: torch.nn.Module, ema: EMA | None, run, checkpoint: Path | None = None) -> None:
        """The outputs `due` (outputs_due's) after `run.step` steps (run: training_state.RunState), the final
        ones with --score_images' score; then `checkpoint`, the one of run.step if any, is marked as having them
        (the final ones are marked by train.py after their upload)."""
        weights = sampling_weights(unet, ema)  # one EMA copy for both
        if due["images"]:
            self.save_samples(weights, due["epochs_completed"], run.step)
        if due["final"]:
            self.evaluation.score_samples(weights, self.grid_scheduler, run.step)
        if due["model"]:
            self.save_pipeline(weights, run.step, run.total_steps, run.logged_loss)
        if checkpoint is not None and not due["final"]:
            mark_outputs_written(checkpoint)

    def save_samples(self, weights: torch.nn.Module, epoch_number: int, step: int) -> None:
        """samples/{epoch}.png: a grid drawn with a fixed seed, so that grids compare over the run (of a
        class-conditional model, a row per class, each as long as a row of the square grid); logged, and scored on
        the built-in data."""
        generator, steps = torch.Generator().manual_seed(self.args.seed), self.args.ddpm_num_inference_steps
        if self.class_names is None:
            images = generate(weights, self.grid_scheduler, self.args.eval_batch_size, generator, steps, progress=True)
            grid = sample_grid(images)
        else:
            per_class = images_per_class(self.args.eval_batch_size)
            labels = grid_labels(len(self.class_names), per_class)
            images = generate_for_labels(weights, self.grid_scheduler, labels, generator, steps,
                                         self.args.guidance_scale, batch_size=len(labels), progress=True)
            grid = sample_grid(images, per_row=per_class)
        (self.output_dir / "samples").mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "samples" / f"{epoch_number:04d}.png"
        with reported_as_write_error(f"samples/{path.name}", self.output_dir):
            write_atomically(path, lambda tmp: save_image(grid, tmp, format="png"))
        self.logger.log_image("samples", grid, step)
        if self.class_names is None:
            self.evaluation.score_grid(images, step)
        else:
            self.evaluation.score_class_grid(images, labels, step)

    def save_pipeline(self, weights: torch.nn.Module, step: int, total_steps: int, loss: float | None) -> None:
        """The pipeline folder and its model card (with the run's scores), uploaded with --push_to_hub."""
        save_pipeline(self.output_dir, weights, self.scheduler, self.class_names)
        self.evaluation.estimate_bpd(weights, step)
        fid = self.evaluation.estimate_fid(weights, step)
        self.write_card(self.output_dir, step, total_steps, loss)
        if self.args.keep_best == "fid" and (self.best is None or fid < self.best["fid"]):
            self.save_best(weights, fid, step, total_steps, loss)
        if self.hub_repo is not None:
            self.hub_repo.push(step)

    def write_card(self, folder: Path, step: int, total_steps: int, loss: float | None) -> None:
        with reported_as_write_error("the model card", folder):
            write_model_card(folder, self.args, data=self.data_description, world_size=self.world_size,
                             step=step, total_steps=total_steps, loss=loss, evaluation=self.evaluation.figures or None,
                             repo_id=self.hub_repo.repo_id if self.hub_repo else None, class_names=self.class_names)

    def save_best(self, weights: torch.nn.Module, fid: float, step: int, total_steps: int, loss: float | None) -> None:
        """best/: the pipeline and card of the lowest FID so far, then best.json, each file renamed into place."""
        save_pipeline(self.best_dir, weights, self.scheduler, self.class_names)
        self.write_card(self.best_dir, step, total_steps, loss)
        self.best = {"fid": fid, "step": step}
        with reported_as_write_error("best/best.json", self.best_dir):
            write_atomically(self.best_dir / "best.json",
                             lambda tmp: tmp.write_text(json.dumps(self.best, indent=2) + "\n"))
        tqdm.write(f"step {step}: FID {fid:.3f}, the lowest so far: pipeline kept in {self.best_dir}")
