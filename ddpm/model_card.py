"""The model card: output_dir/README.md, the page the Hugging Face Hub shows for a trained pipeline.

YAML metadata that huggingface_hub.ModelCard reads (library, tags, dataset, license), then how to load the
pipeline, the latest sample grid, the training recipe and the figures the run has: its training loss and,
when there are any, evaluation scores.
"""

import argparse
import json
import os
import shlex
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .files import write_temporary

TAGS = ["pytorch", "diffusers", "unconditional-image-generation", "diffusers:DDPMPipeline", "ddpm"]


def write_model_card(output_dir: str | os.PathLike, args: argparse.Namespace, *, data: str, world_size: int,
                     step: int, total_steps: int, loss: float | None, evaluation: dict[str, float] | None = None,
                     repo_id: str | None = None) -> Path:
    """Write output_dir/README.md describing train.py's run `args` at `step`; returns its path.

    `data` describes the training images; `evaluation` maps a score's name to its value (e.g. "bits/dim").
    """
    output_dir = Path(output_dir)
    metadata = ModelCardData(license=args.hub_license, library_name="diffusers", tags=TAGS,
                             datasets=[args.dataset_name] if args.dataset_name else None)
    card = ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n"
                     + card_body(output_dir, args, data, world_size, step, total_steps, loss, evaluation or {},
                                 repo_id))
    path = output_dir / "README.md"
    # renamed into place: a background upload holds on to a complete card, never a half-written one
    os.replace(write_temporary(path, lambda tmp: card.save(tmp)), path)
    return path


def card_body(output_dir: Path, args: argparse.Namespace, data: str, world_size: int, step: int, total_steps: int,
              loss: float | None, evaluation: dict[str, float], repo_id: str | None) -> str:
    name = repo_id or str(output_dir)
    lines = [f"# {name.rsplit('/', 1)[-1]}", "",
             f"An unconditional image diffusion model: a DDPM (Ho et al. 2020, https://arxiv.org/abs/2006.11239) "
             f"UNet at {args.resolution}x{args.resolution}, trained on {data}; step {step:,} of {total_steps:,}.", ""]
    # train.py names each grid by its epoch: the highest is the latest
    grids = sorted((path for path in (output_dir / "samples").glob("*.png") if path.stem.isdigit()),
                   key=lambda path: int(path.stem))
    if grids:
        grid, epoch = grids[-1].relative_to(output_dir).as_posix(), int(grids[-1].stem)
        weights = "EMA weights" if args.use_ema else "training weights"
        lines += [f"![Samples after epoch {epoch}]({grid})", "",
                  f"`{grid}`: samples after epoch {epoch}, from the {weights}, with a fixed seed and "
                  f"{args.ddpm_num_inference_steps} denoising steps.", ""]
    lines += ["## Use", "", "With diffusers:", "", "```python", "import torch", "from diffusers import DDPMPipeline",
              "", f"pipeline = DDPMPipeline.from_pretrained({json.dumps(name)})",
              "images = pipeline(batch_size=16, generator=torch.manual_seed(0)).images", "```", "",
              "or with this project's `sample.py` (the same pixels for the same seed):", "", "```bash",
              f"python sample.py {shlex.quote(name)} --num_images 16 --seed 0 --output grid.png", "```", ""]
    ema = (f"max decay {args.ema_max_decay:g} (inv_gamma {args.ema_inv_gamma:g}, power {args.ema_power:g})"
           if args.use_ema else "no")
    batch = args.train_batch_size * world_size * args.gradient_accumulation_steps
    recipe = {
        "preset": args.preset,
        "data": data,
        "resolution": f"{args.resolution}x{args.resolution}",
        "global batch": f"{args.train_batch_size} x {world_size} processes x {args.gradient_accumulation_steps} "
                        f"accumulation = {batch}",
        "learning rate": f"{args.learning_rate:g}, {args.lr_scheduler} schedule, {args.lr_warmup_steps} warmup steps",
        "optimizer": f"AdamW, betas ({args.adam_beta1:g}, {args.adam_beta2:g}), weight decay "
                     f"{args.adam_weight_decay:g}, gradient clipping {args.max_grad_norm:g}",
        "steps": f"{step:,} of {total_steps:,} optimizer steps",
        "EMA": ema,
        "precision": {"no": "fp32", "fp16": "fp16 autocast", "bf16": "bf16 autocast"}[args.mixed_precision],
        "diffusion": f"T = {args.ddpm_num_steps}, {args.ddpm_beta_schedule} betas, {args.prediction_type} prediction",
    }
    lines += ["## Training", "", *table(recipe), ""]
    figures = {**({"training loss (last logged)": loss} if loss is not None else {}), **evaluation}
    if figures:
        lines += ["## Results", "", *table({name: f"{value:.4g}" if isinstance(value, float) else str(value)
                                            for name, value in figures.items()}), ""]
    return "\n".join(lines)


def table(rows: dict[str, str]) -> list[str]:
    """A two-column Markdown table without a header row's text."""
    return ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows.items())]
