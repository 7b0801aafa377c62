"""What a class-conditional training run measures (train.py --class_conditional): RunEvaluation's figures
(ddpm/run_evaluation.py), with a grid of a row per class, --score_images samples balanced over the classes, and on
the built-in shapes the conditional accuracy beside the valid fraction (ddpm/class_conditional.py)."""

from argparse import Namespace

import torch
from torch import nn

from .class_conditional import balanced_labels, conditional_accuracy, generate_for_labels
from .run_evaluation import RunEvaluation
from .shapes_score import fit, score


class ConditionalRunEvaluation(RunEvaluation):
    """RunEvaluation of a class-conditional run (args.model_config with its class embedding): its grid has a row
    per class, and on the built-in shapes its scores add the conditional accuracy. --score_images samples are
    balanced over the classes."""

    def __init__(self, args: Namespace, *rest):
        super().__init__(args, *rest)
        self.num_classes = args.model_config["num_class_embeds"] - 1  # the last label is the null label
        self.grid_accuracy: float | None = None  # of the latest grid
        self.final_accuracy: float | None = None  # of --score_images samples at the end

    def score_class_grid(self, images: torch.Tensor, class_labels: torch.Tensor, step: int) -> None:
        """The shapes score and conditional accuracy of a grid of samples of `class_labels`."""
        if not self.scored:
            return
        found = fit(images)
        self.grid_score = score(found.classes, found.rmse)
        self.log_shapes_score("samples", self.grid_score, step)
        self.grid_accuracy = conditional_accuracy(found.classes, class_labels)
        self.logger.log_scalars({"samples/conditional_accuracy": self.grid_accuracy}, step)
        self.figures["shapes score: valid fraction of the last grid"] = self.grid_score.valid_fraction
        self.figures["shapes score: conditional accuracy of the last grid"] = self.grid_accuracy

    def score_samples(self, unet: nn.Module, scheduler, step: int) -> None:
        """With --score_images N on the built-in shapes: N samples, image i of class i mod K, drawn with the
        grids' guidance scale and other noise than the grids' (seed + 1), in batches of 64; scored as a grid."""
        if not (self.scored and self.args.score_images):
            return
        labels = balanced_labels(range(self.args.score_images), self.num_classes)
        samples = generate_for_labels(unet, scheduler, labels, torch.Generator().manual_seed(self.args.seed + 1),
                                      self.args.ddpm_num_inference_steps, self.args.guidance_scale, progress=True)
        found = fit(samples)
        self.final_score = score(found.classes, found.rmse)
        self.final_accuracy = conditional_accuracy(found.classes, labels)
        self.log_shapes_score("eval", self.final_score, step)
        self.logger.log_scalars({"eval/conditional_accuracy": self.final_accuracy}, step)
        for figure in ("valid fraction", "conditional accuracy"):  # the larger sample says more
            self.figures.pop(f"shapes score: {figure} of the last grid", None)
        count = self.args.score_images
        self.figures[f"shapes score: valid fraction of {count} samples"] = self.final_score.valid_fraction
        self.figures[f"shapes score: conditional accuracy of {count} samples"] = self.final_accuracy

    def summary(self) -> str | None:
        """RunEvaluation's last line, with the conditional accuracy and the guidance scale."""
        line = super().summary()
        accuracy = self.final_accuracy if self.final_accuracy is not None else self.grid_accuracy
        if line is None or accuracy is None:
            return line
        return f"{line}, conditional accuracy {accuracy:.3f} (guidance scale {self.args.guidance_scale:g})"
