"""The model card: output_dir/README.md, the page the Hugging Face Hub shows for a trained pipeline.

YAML metadata that huggingface_hub.ModelCard reads (library, tags, dataset, license), then how to load the
pipeline, the latest sample grid, the training recipe and the figures the run has: its training loss and,
when there are any, evaluation scores. A class-conditional model's card names its classes and shows how to sample
a class with guidance: with sample.py, and with diffusers' UNet2DModel and scheduler (DDPMPipeline passes no labels).
"""

import argparse
import json
import os
import shlex
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .files import write_temporary

TAGS = ["pytorch", "diffusers", "unconditional-image-generation", "diffusers:DDPMPipeline", "ddpm"]
CONDITIONAL_TAGS = ["pytorch", "diffusers", "class-conditional-image-generation", "classifier-free-guidance", "ddpm"]
CLASSES_SHOWN = 30  # the card lists at most this many class names


def write_model_card(output_dir: str | os.PathLike, args: argparse.Namespace, *, data: str, world_size: int,
                     step: int, total_steps: int, loss: float | None, evaluation: dict[str, float] | None = None,
                     repo_id: str | None = None, class_names: list[str] | None = None) -> Path:
    """Write output_dir/README.md describing train.py's run `args` at `step`; returns its path.

    `data` describes the training images; `evaluation` maps a score's name to its value (e.g. "bits/dim");
    `class_names`: a class-conditional model's classes, label k's at k.
    """
    output_dir = Path(output_dir)
    metadata = ModelCardData(license=args.hub_license, library_name="diffusers",
                             tags=TAGS if class_names is None else CONDITIONAL_TAGS,
                             datasets=[args.dataset_name] if args.dataset_name else None)
    card = ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n"
                     + card_body(output_dir, args, data, world_size, step, total_steps, loss, evaluation or {},
                                 repo_id, class_names))
    path = output_dir / "README.md"
    # renamed into place: a background upload holds on to a complete card, never a half-written one
    os.replace(write_temporary(path, lambda tmp: card.save(tmp)), path)
    return path


def card_body(output_dir: Path, args: argparse.Namespace, data: str, world_size: int, step: int, total_steps: int,
              loss: float | None, evaluation: dict[str, float], repo_id: str | None,
              class_names: list[str] | None = None) -> str:
    name = repo_id or str(output_dir)
    kind = "An unconditional" if class_names is None else "A class-conditional"
    lines = [f"# {name.rsplit('/', 1)[-1]}", "",
             f"{kind} image diffusion model: a DDPM (Ho et al. 2020, https://arxiv.org/abs/2006.11239) "
             f"UNet at {args.resolution}x{args.resolution}, trained on {data}; step {step:,} of {total_steps:,}.", ""]
    if class_names is not None:
        lines += classes_paragraph(class_names, args.class_dropout)
    # train.py names each grid by its epoch: the highest is the latest
    grids = sorted((path for path in (output_dir / "samples").glob("*.png") if path.stem.isdigit()),
                   key=lambda path: int(path.stem))
    if grids:
        grid, epoch = grids[-1].relative_to(output_dir).as_posix(), int(grids[-1].stem)
        weights = "EMA weights" if args.use_ema else "training weights"
        rows = "" if class_names is None else f", a row per class, guidance scale {args.guidance_scale:g}"
        lines += [f"![Samples after epoch {epoch}]({grid})", "",
                  f"`{grid}`: samples after epoch {epoch}, from the {weights}, with a fixed seed and "
                  f"{args.ddpm_num_inference_steps} denoising steps{rows}.", ""]
    if class_names is None:
        lines += ["## Use", "", "With diffusers:", "", "```python", "import torch",
                  "from diffusers import DDPMPipeline", "",
                  f"pipeline = DDPMPipeline.from_pretrained({json.dumps(name)})",
                  "images = pipeline(batch_size=16, generator=torch.manual_seed(0)).images", "```", "",
                  "or with this project's `sample.py` (the same pixels for the same seed):", "", "```bash",
                  f"python sample.py {shlex.quote(name)} --num_images 16 --seed 0 --output grid.png", "```", ""]
    else:
        lines += conditional_use(name, args)
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
    if class_names is not None:
        recipe["classes"] = f"{len(class_names)}, label dropout {args.class_dropout:g} (classifier-free guidance)"
    lines += ["## Training", "", *table(recipe), ""]
    figures = {**({"training loss (last logged)": loss} if loss is not None else {}), **evaluation}
    if figures:
        lines += ["## Results", "", *table({name: f"{value:.4g}" if isinstance(value, float) else str(value)
                                            for name, value in figures.items()}), ""]
    return "\n".join(lines)


def classes_paragraph(class_names: list[str], class_dropout: float) -> list[str]:
    """What a class-conditional card says of its classes."""
    shown = ", ".join(f"{k} `{name}`" for k, name in enumerate(class_names[:CLASSES_SHOWN]))
    more = f", ... ({len(class_names)} in all)" if len(class_names) > CLASSES_SHOWN else ""
    return [f"It draws an image of a class asked for, with classifier-free guidance (Ho & Salimans 2022, "
            f"https://arxiv.org/abs/2207.12598): trained with each label replaced by the null label "
            f"{len(class_names)} with probability {class_dropout:g}. Its {len(class_names)} classes, named in "
            f"`class_labels.json`: {shown}{more}.", ""]


def conditional_use(name: str, args: argparse.Namespace) -> list[str]:
    """How to sample a class-conditional model: sample.py, then diffusers' UNet2DModel and scheduler with the
    guidance written out, the same pixels for the same seed (DDPMPipeline cannot pass class labels)."""
    steps, size = args.ddpm_num_inference_steps, args.resolution
    channels = args.model_config.get("in_channels", 3)
    quoted = shlex.quote(name)
    return ["## Use", "", "With this project's `sample.py`: 16 images of class 0 (a name or a number), guidance "
            "scale 2; without `--class_label`, a grid with a row per class:", "", "```bash",
            f"python sample.py {quoted} --class_label 0 --guidance_scale 2 --num_inference_steps {steps} "
            "--num_images 16 --seed 0 --output grid.png",
            f"python sample.py {quoted} --guidance_scale 2 --num_inference_steps {steps} --output classes.png",
            "```", "",
            "With diffusers, whose DDPMPipeline passes no class labels: its UNet2DModel and scheduler, guided by hand "
            "(the same pixels as the first command):", "", "```python", "import torch",
            "from diffusers import DDPMScheduler, UNet2DModel", "",
            f"unet = UNet2DModel.from_pretrained({json.dumps(name)}, subfolder=\"unet\")",
            f"scheduler = DDPMScheduler.from_pretrained({json.dumps(name)}, subfolder=\"scheduler\")",
            "label, scale, null = 0, 2.0, unet.config.num_class_embeds - 1  # the last label means no class",
            "generator = torch.manual_seed(0)",
            f"x = torch.randn(16, {channels}, {size}, {size}, generator=generator)",
            "labels = torch.tensor([label] * 16 + [null] * 16)  # both halves in one forward",
            f"scheduler.set_timesteps({steps})",
            "for t in scheduler.timesteps:",
            "    with torch.no_grad():",
            "        conditional, unconditional = unet(torch.cat([x, x]), t, class_labels=labels).sample.chunk(2)",
            "    eps = unconditional + scale * (conditional - unconditional)  # Ho & Salimans 2022, Eq. 6",
            "    x = scheduler.step(eps, t, x, generator=generator).prev_sample",
            "images = (x / 2 + 0.5).clamp(0, 1)  # (16, C, H, W) in [0, 1]", "```", ""]


def table(rows: dict[str, str]) -> list[str]:
    """A two-column Markdown table without a header row's text."""
    return ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows.items())]
