"""What a training run measures of the model it trains (train.py), and where the figures go.

- On the built-in shapes: the shapes score of each sample grid (ddpm/shapes_score.py), and with --score_images N
  the score of N samples at the end, drawn as the grids are.
- With --eval_bpd_images N: an unbiased estimate of bits/dim (ddpm/likelihood.py) at each pipeline save, on
  images no run trains on where the data has them (built-in shapes of another seed, an IDX folder's test split),
  otherwise on the first training images, under a tag that says so.
- With --eval_fid_images N: FID and KID (ddpm/fid.py) of N samples at each pipeline save, drawn by the grids' sampler
  with the noise evaluate.py --metric fid --seed SEED draws, against the training data's reference statistics,
  computed once and cached in fid-reference/ of --cache_dir, else of output_dir.

Each figure is logged at the step it is measured; `figures` holds the latest for the model card.
"""

from argparse import Namespace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddpm.data import HELD_OUT_SEED, ImageSource, make_builtin_source
from ddpm.fid import ReferenceImages, fid_of_samples, reference_statistics
from ddpm.idx import IdxSource, has_split
from ddpm.inception import RESIZES, load_inception
from ddpm.likelihood import VariationalBound, estimate_bits_per_dim, images_as_x0, model_variance_of
from ddpm.loggers import TensorBoardLogger, WandbLogger
from ddpm.sampling import generate, generate_in_batches, image_generators, sampling_scheduler
from ddpm.scheduler import DDPMScheduler
from ddpm.shapes_score import ShapesScore, shapes_score


def is_builtin(args: Namespace) -> bool:
    return not args.dataset_name and not args.train_data_dir


def bpd_images(args: Namespace, source: ImageSource) -> tuple[ImageSource, str, str]:
    """The images --eval_bpd_images measures, the words that describe them, and the tag their estimate is logged
    under."""
    if is_builtin(args):
        held_out = make_builtin_source(args.resolution, HELD_OUT_SEED, args.eval_bpd_images)
        return held_out, "held-out", "eval/bpd_estimate"
    if isinstance(source, IdxSource) and has_split(args.train_data_dir, "test"):
        return IdxSource(args.train_data_dir, "test"), "test-split", "eval/bpd_estimate"
    return source, "training", "eval/bpd_estimate_on_training_images"


class RunEvaluation:
    """The scores of one run (on the main process): each method measures, logs at `step` and keeps the figure."""

    def __init__(self, args: Namespace, source: ImageSource, channels: int, scheduler: DDPMScheduler,
                 device: torch.device, logger: TensorBoardLogger | WandbLogger):
        self.args, self.logger = args, logger
        self.scored = is_builtin(args) and channels == 3  # does each sample look like an image of the dataset?
        self.grid_score: ShapesScore | None = None  # of the latest grid
        self.final_score: ShapesScore | None = None  # of --score_images samples at the end
        self.figures: dict[str, float] = {}  # the latest of each, for the model card
        if args.eval_bpd_images:
            images, self.bpd_images, self.bpd_tag = bpd_images(args, source)
            self.bpd_x0 = images_as_x0(images, args.resolution, channels, args.eval_bpd_images).to(device)
            self.bound = VariationalBound(scheduler, model_variance_of(scheduler.config["variance_type"]),
                                          device=device)
        self.fid: float | None = None  # of the latest pipeline save
        if args.eval_fid_images:
            self.fid_scheduler = sampling_scheduler(args.sampler, scheduler.config)
            self.inception = load_inception(args.fid_inception, device)
            images = ReferenceImages.of_data(source, args.resolution, channels)
            cache_dir = Path(args.cache_dir or args.output_dir) / "fid-reference"  # shared by runs of one --cache_dir
            self.fid_reference = reference_statistics(images, self.inception, RESIZES[0], cache_dir,
                                                      num_workers=args.dataloader_num_workers)

    def log_shapes_score(self, tag: str, result: ShapesScore, step: int) -> None:
        self.logger.log_scalars({f"{tag}/shapes_valid_fraction": result.valid_fraction,
                                 f"{tag}/shapes_classes_covered": result.classes_covered,
                                 f"{tag}/shapes_tv_to_uniform": result.tv_to_uniform,
                                 f"{tag}/shapes_median_rmse": result.median_rmse}, step)

    def score_grid(self, images: torch.Tensor, step: int) -> None:
        """The shapes score of a sample grid's images, when the run's data is the built-in shapes."""
        if self.scored:
            self.grid_score = shapes_score(images)
            self.log_shapes_score("samples", self.grid_score, step)
            self.figures["shapes score: valid fraction of the last grid"] = self.grid_score.valid_fraction

    def score_samples(self, unet: torch.nn.Module, scheduler, step: int) -> None:
        """With --score_images N on the built-in shapes: the score of N samples, drawn as the grids are but with
        other noise (seed + 1), in batches of 64."""
        if not (self.scored and self.args.score_images):
            return
        samples = generate_in_batches(unet, scheduler, self.args.score_images,
                                      torch.Generator().manual_seed(self.args.seed + 1),
                                      self.args.ddpm_num_inference_steps, progress=True)
        self.final_score = shapes_score(samples)
        self.log_shapes_score("eval", self.final_score, step)
        self.figures.pop("shapes score: valid fraction of the last grid", None)  # the larger sample says more
        self.figures[f"shapes score: valid fraction of {self.args.score_images} samples"] = \
            self.final_score.valid_fraction

    def estimate_bpd(self, unet: torch.nn.Module, step: int) -> None:
        """With --eval_bpd_images: the estimate of bits/dim of `unet`, logged and printed."""
        if not self.args.eval_bpd_images:
            return
        estimate = estimate_bits_per_dim(unet, self.bound, self.bpd_x0, self.args.seed)
        self.figures[f"bits/dim, estimated on {len(self.bpd_x0)} {self.bpd_images} images"] = estimate
        self.logger.log_scalars({self.bpd_tag: estimate}, step)
        tqdm.write(f"step {step}: bits/dim estimate {estimate:.4f} on {len(self.bpd_x0)} {self.bpd_images} images")

    def estimate_fid(self, unet: torch.nn.Module, step: int) -> float | None:
        """With --eval_fid_images N: FID and KID of N samples of `unet` against the training data, logged and
        printed; the FID, or None without the flag. Image i's noise is seeded from (--seed, i) alone, as in
        evaluate.py."""
        if not self.args.eval_fid_images:
            return None
        count, batch = self.args.eval_fid_images, self.args.eval_batch_size
        samples = torch.cat([generate(unet, self.fid_scheduler, min(batch, count - start),
                                      image_generators(self.args.seed, list(range(start, min(start + batch, count)))),
                                      self.args.ddpm_num_inference_steps)
                             for start in range(0, count, batch)])
        figures = fid_of_samples(samples, self.fid_reference, self.inception)
        self.fid = figures["fid"]
        scalars = {"eval/fid": self.fid}
        if figures["kid_mean"] is not None:
            scalars["eval/kid_mean"] = figures["kid_mean"]
        self.logger.log_scalars(scalars, step)
        steps = f"{self.args.sampler}, {self.args.ddpm_num_inference_steps} steps"
        self.figures[f"FID of {count} samples ({steps}) against {figures['num_reference']} training images"] = self.fid
        tqdm.write(f"step {step}: FID {self.fid:.3f} of {count} samples ({steps}) against "
                   f"{figures['num_reference']} training images")
        return self.fid

    def summary(self) -> str | None:
        """The line that ends the run's output: the final shapes score, else the last grid's, if any."""
        if self.final_score is not None:
            steps = f"{self.args.sampler}, {self.args.ddpm_num_inference_steps} steps"
            return f"shapes score of {self.args.score_images} samples ({steps}): {self.final_score}"
        if self.grid_score is not None:
            return f"shapes score of the last sample grid: {self.grid_score}"
        return None
