"""Draw images from a trained DDPM with the DDPM, DDIM or DPM-Solver++ sampler: a grid, or many single PNGs (for FID).

    python sample.py output/ --num_images 16 --seed 0 --output grid.png
    python sample.py output/ --sampler ddim --num_images 16 --output grid.png       # 50 DDIM steps
    python sample.py output/ --sampler dpm --num_images 16 --output grid.png        # 20 DPM-Solver++ steps
    python sample.py google/ddpm-cifar10-32 --num_images 50000 --batch_size 500 --outdir samples/
    torchrun --standalone --nproc_per_node=8 sample.py output/ --num_images 50000 --batch_size 500 --outdir samples/
    python sample.py conditional/ --class_label circle-red-white --guidance_scale 2 --output circles.png
    python sample.py conditional/ --guidance_scale 2 --output classes.png                # a row per class

MODEL_DIR is a DDPMPipeline or DDIMPipeline folder (ours or diffusers') or a Hugging Face Hub repo id.

Grid mode (--output, the default): with the default batch_size (= num_images) the pixels equal diffusers'
DDPMPipeline(batch_size=num_images, generator=torch.manual_seed(seed)), or with --sampler ddim
DDIMPipeline(..., eta=eta, num_inference_steps=n), or with --sampler dpm a DDPMPipeline whose scheduler is
DPMSolverMultistepScheduler.from_config(pipe.scheduler.config), called with num_inference_steps=n (20 unless
given). Smaller batches are drawn one after another from that one generator, seeded once, so they differ from
the pipeline's single batch but are still fixed by the seed.
--outdir then also writes each image of the grid.

Many-images mode (--outdir without --output): OUTDIR/000000.png, 000001.png, ... and no grid. Image i
has a generator of its own, seeded from (seed, i) (ddpm.sampling.image_generators), so its noise is
the same whatever the batch size or number of processes (the pixels too, up to the float rounding of a
batched forward pass: a value may rarely differ by 1/255). Under torchrun each process draws its share.
Images already in OUTDIR are skipped, so a stopped run continues where it stopped when started again
(OUTDIR/sample_settings.json records the settings, and a run with others is refused); each PNG is
written under a temporary name and renamed when complete.

A class-conditional model (train.py --class_conditional; its classes named in class_labels.json) draws images of
--class_label, guided with --guidance_scale S (Ho & Salimans 2022: eps_uncond + S (eps_cond - eps_uncond), both
halves in one forward of twice the batch; S = 1 the conditional model alone, one forward). Without --class_label,
the grid has a row per class, each as long as a row of the square grid of --num_images, and many-images mode gives
image i the class i mod K: balanced over the classes. The noise is drawn as above, so with --class_label and one
batch the pixels equal diffusers' UNet2DModel and scheduler run in a loop guided by hand (the model card shows it).
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch
from PIL import Image
from tqdm import tqdm

from ddpm import PipelineLoadError, distributed, generate, load_pipeline
from ddpm.class_conditional import (balanced_labels, generate_for_labels, grid_labels,
                                    images_per_class)
from ddpm.fast_sampling import FastUNet
from ddpm.files import write_atomically
from ddpm.guidance import class_label
from ddpm.pipeline_io import pipeline_folder, read_class_labels
from ddpm.sampling import DEFAULT_STEPS, SAMPLERS, image_generators, sample_grid, sampling_scheduler

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model_dir", metavar="MODEL_DIR", help="DDPMPipeline folder or Hugging Face Hub repo id")
parser.add_argument("--num_images", type=int, default=16, help="how many images to draw (default: %(default)s)")
parser.add_argument("--seed", type=int, default=0,
                    help="seed of the one torch.Generator all noise comes from (default: %(default)s)")
parser.add_argument("--sampler", choices=list(SAMPLERS), default="ddpm",
                    help="DDPM (Ho et al. 2020), DDIM (Song et al. 2021) or DPM-Solver++ (Lu et al. 2022) steps "
                         "(default: %(default)s)")
parser.add_argument("--eta", type=float, default=0.0,
                    help="DDIM noise in [0, 1]: 0 deterministic, 1 DDPM's variance; --sampler ddim only "
                         "(default: %(default)s)")
parser.add_argument("--num_inference_steps", type=int, default=None,
                    help="denoising steps, at most the training timesteps (default: 1000 for ddpm, 50 for ddim, "
                         "20 for dpm)")
parser.add_argument("--class_label", default=None,
                    help="a class-conditional model's class, by name (class_labels.json) or number (default: a row per "
                         "class in a grid, image i of class i mod K in many-images mode)")
parser.add_argument("--guidance_scale", type=float, default=None,
                    help="classifier-free guidance of a class-conditional model: 1 the conditional model alone, "
                         "above 1 more of the class (default: 1)")
parser.add_argument("--batch_size", type=int, default=None,
                    help="images per forward pass (default: num_images; in many-images mode at most 64)")
parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="where the UNet runs (default: cuda if available, else cpu)")
parser.add_argument("--output", default=None,
                    help="grid image file, ceil(sqrt(n)) images per row (default: grid.png; "
                         "no grid when --outdir is given without --output)")
parser.add_argument("--outdir", default=None,
                    help="write each image as a PNG there; without --output, many-images mode "
                         "(default: no single images)")
parser.add_argument("--compile", action="store_true",
                    help="torch.compile the UNet (pays off over many steps; the first step compiles)")
parser.add_argument("--bf16", action="store_true",
                    help="run the UNet in bf16 autocast; x_t and the scheduler stay fp32 (pixels differ a little)")
parser.add_argument("--cuda_graph", action="store_true",
                    help="replay each denoising forward from a CUDA graph (GPU only; the same pixels as without)")
args = parser.parse_args()


def error(message: str) -> NoReturn:
    """Exit with a one-line error, in argparse's format."""
    sys.exit(f"sample.py: error: {message}")


many_images = args.outdir is not None and args.output is None
args.output = args.output or "grid.png"
batch_size_given = args.batch_size is not None
if args.batch_size is None:
    args.batch_size = min(args.num_images, 64) if many_images else args.num_images
if args.num_inference_steps is None:
    args.num_inference_steps = DEFAULT_STEPS[args.sampler]
args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
if args.num_images < 1:
    parser.error(f"--num_images must be at least 1, got {args.num_images}")
if args.batch_size < 1:
    parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
if args.num_inference_steps < 1:
    parser.error(f"--num_inference_steps must be at least 1, got {args.num_inference_steps}")
if not 0 <= args.eta <= 1:
    parser.error(f"--eta must be in [0, 1], got {args.eta}")
if args.eta != 0 and args.sampler != "ddim":
    parser.error(f"--eta {args.eta} needs --sampler ddim (DDPM's own noise is DDIM's eta = 1)")
if args.guidance_scale is not None and args.guidance_scale < 0:
    parser.error(f"--guidance_scale must be >= 0 (0: the unconditional model, 1: the conditional one), got "
                 f"{args.guidance_scale}")
if many_images and args.seed < 0:
    parser.error(f"--seed must be >= 0 in many-images mode, got {args.seed}")
if args.device == "cuda" and not torch.cuda.is_available():
    parser.error("--device cuda: no CUDA GPU is available here; use --device cpu")
if args.cuda_graph and args.device != "cuda":
    parser.error(f"--cuda_graph needs a CUDA GPU, and the device is {args.device}")
if args.cuda_graph and args.compile:
    parser.error("--cuda_graph and --compile: choose one")
if Path(args.output).suffix.lower() not in Image.registered_extensions():
    parser.error(f"--output {args.output!r}: unknown image file extension; use e.g. .png")
if "WORLD_SIZE" in os.environ and not many_images:
    parser.error("under torchrun, give --outdir without --output: only many-images mode splits the work")

try:
    unet, scheduler = load_pipeline(pipeline_folder(args.model_dir), dtype=torch.float32,
                                    scheduler_class=SAMPLERS[args.sampler])
    scheduler = sampling_scheduler(args.sampler, scheduler.config)  # with the sampler's options (dpm-sde's)
except PipelineLoadError as exc:
    error(str(exc))
conditional = unet.config["num_class_embeds"] is not None and unet.config["class_embed_type"] is None
if not conditional and (args.class_label is not None or args.guidance_scale is not None):
    error(f"--{'class_label' if args.class_label is not None else 'guidance_scale'} needs a class-conditional model "
          f"(train.py --class_conditional); {args.model_dir!r} has no class table")
if conditional:
    try:  # named in class_labels.json; a diffusers folder without it: by number
        class_names = read_class_labels(pipeline_folder(args.model_dir), unet)
        class_names = class_names or [str(k) for k in range(unet.config["num_class_embeds"] - 1)]
        label = None if args.class_label is None else class_label(args.class_label, class_names)
    except (PipelineLoadError, ValueError) as exc:
        error(str(exc))
    args.guidance_scale = 1.0 if args.guidance_scale is None else args.guidance_scale
num_train_timesteps = scheduler.config["num_train_timesteps"]
if args.num_inference_steps > num_train_timesteps:
    error(f"--num_inference_steps {args.num_inference_steps} exceeds the {num_train_timesteps} "
          f"training timesteps of {args.model_dir!r}")
ctx = distributed.setup(args.device, timeout_s=1800)  # one process per GPU under torchrun
unet.to(ctx.device)
if args.compile:
    # freezing: the weights stay fixed while sampling, so inductor folds them in as constants (and on
    # the CPU prepacks the convolutions' weights): a denoising forward ran 1.19x eager diffusers' speed
    # on a CPU with it, 0.90x without (docs/benchmarks.md)
    unet = torch.compile(unet, options={"freezing": True})
# around GuidedUNet for a class-conditional model (one graph for both halves), else around the UNet
fast = ((lambda model: FastUNet(model, torch.bfloat16 if args.bf16 else None, cuda_graph=args.cuda_graph))
        if args.bf16 or args.cuda_graph else None)
if fast is not None and not conditional:
    unet = fast(unet)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] to a PIL image, rounded as DDPMPipeline's numpy_to_pil: (x * 255).round()."""
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)  # 1 channel: mode "L"


def draw(batch_size: int, generator: torch.Generator | list[torch.Generator], progress: bool,
         labels: torch.Tensor | None = None) -> torch.Tensor:
    """`batch_size` images, of the classes `labels` for a class-conditional model."""
    if labels is None:
        return generate(unet, scheduler, batch_size, generator=generator, num_inference_steps=args.num_inference_steps,
                        eta=args.eta, progress=progress)
    return generate_for_labels(unet, scheduler, labels, generator, args.num_inference_steps, args.guidance_scale,
                               batch_size, eta=args.eta, progress=progress, wrap=fast)


def labels_of(indices: list[int] | range) -> torch.Tensor | None:
    """The classes of images `indices` of a class-conditional model: --class_label, or i mod K; None without."""
    if not conditional:
        return None
    return balanced_labels(indices, len(class_names)) if label is None else torch.full((len(indices),), label)


if many_images:
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    digits = max(6, len(str(args.num_images - 1)))
    names = [f"{i:0{digits}d}.png" for i in range(args.num_images)]
    # what fixes image i besides (seed, i): a resumed run must not mix in images of other settings
    settings = {"model": os.path.abspath(args.model_dir) if os.path.exists(args.model_dir) else args.model_dir,
                "seed": args.seed, "sampler": args.sampler, "num_inference_steps": args.num_inference_steps,
                "eta": args.eta, "bf16": args.bf16}
    if conditional:  # (an unconditional run's settings stay as they were, so its folders continue)
        settings.update(class_label=label, guidance_scale=args.guidance_scale)
    settings_path = outdir / "sample_settings.json"
    if settings_path.exists() and json.loads(settings_path.read_text()) != settings:
        error(f"{outdir}/ holds images drawn with other settings ({settings_path.read_text().strip()}); "
              "use another --outdir, or the same settings to continue that run")
    if ctx.is_main:
        for stale in outdir.glob(".*.png.tmp-*"):  # left by a stopped run, before any process writes again
            stale.unlink(missing_ok=True)
    present = set(os.listdir(outdir))
    missing = [i for i, name in enumerate(names) if name not in present]
    distributed.barrier(ctx)  # every process has read the folder before any writes to it
    if ctx.is_main and not settings_path.exists():
        write_atomically(settings_path, lambda tmp: tmp.write_text(json.dumps(settings) + "\n"))
    mine = missing[ctx.rank::ctx.world_size]
    if ctx.is_main:
        share = "" if ctx.world_size == 1 else "; the progress bar counts this process's share"
        print(f"{args.num_images - len(missing)} of {args.num_images} images already in {outdir}/; drawing "
              f"{len(missing)} in {ctx.world_size} process(es), {args.sampler} with {args.num_inference_steps} "
              f"steps{share}", file=sys.stderr)
    with tqdm(total=len(mine), unit="image", desc="images", disable=not ctx.is_main) as bar:
        for start in range(0, len(mine), args.batch_size):
            indices = mine[start:start + args.batch_size]
            images = draw(len(indices), image_generators(args.seed, indices), ctx.is_main, labels_of(indices))
            for i, image in zip(indices, images):
                path = outdir / names[i]
                write_atomically(path, lambda tmp, image=image: to_pil(image).save(tmp, format="PNG"))
            bar.update(len(indices))
    distributed.barrier(ctx)
    if ctx.is_main:
        print(f"wrote {len(missing)} images to {outdir}/ ({args.num_images} there in all)")
    distributed.cleanup(ctx)
    sys.exit(0)

Path(args.output).parent.mkdir(parents=True, exist_ok=True)
if args.outdir is not None:
    Path(args.outdir).mkdir(parents=True, exist_ok=True)

# One CPU generator, seeded once, as DDPMPipeline(generator=torch.manual_seed(seed)):
# the noise is drawn on the CPU, so the seed gives the same noise on any device.
generator = torch.Generator().manual_seed(args.seed)
per_class = images_per_class(args.num_images) if conditional and label is None else None
if per_class is not None:  # a row per class: as many images as that takes, in one batch unless told
    args.batch_size = args.batch_size if batch_size_given else per_class * len(class_names)
    labels = grid_labels(len(class_names), per_class)
    args.num_images = len(labels)
else:
    labels = labels_of(range(args.num_images))
batches = []
for start in range(0, args.num_images, args.batch_size):
    batch_size = min(args.batch_size, args.num_images - start)
    print(f"sampling images {start}..{start + batch_size - 1} of {args.num_images}", file=sys.stderr)
    batches.append(draw(batch_size, generator, True, None if labels is None else labels[start:start + batch_size]))
images = torch.cat(batches)  # (N, C, H, W) in [0, 1]

# enlarged, nearest-neighbour, to at least 256 px
grid = sample_grid(images, per_row=per_class)  # per_class None: a square grid
image_format = Image.registered_extensions()[Path(args.output).suffix.lower()]  # the tmp name has no extension
write_atomically(Path(args.output), lambda tmp: to_pil(grid).save(tmp, format=image_format))
print(f"wrote {args.output} ({args.num_images} images)")
if args.outdir is not None:
    for i, image in enumerate(images):
        to_pil(image).save(Path(args.outdir) / f"{i:04d}.png")
    print(f"wrote {args.num_images} images to {args.outdir}/")
