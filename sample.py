"""Draw images from a trained DDPM and save them as a grid (and, optionally, one PNG each).

    python sample.py output/ --num_images 16 --seed 0 --output grid.png
    python sample.py google/ddpm-cifar10-32 --num_images 64 --batch_size 16 --outdir samples/

MODEL_DIR is a DDPMPipeline folder (ours or diffusers') or a Hugging Face Hub repo id.
With the default batch_size (= num_images) the pixels equal diffusers'
DDPMPipeline(batch_size=num_images, generator=torch.manual_seed(seed)). Smaller batches
are drawn one after another from that one generator, seeded once, so they differ from
DDPMPipeline's single batch but are still fixed by the seed.
"""

import argparse
import math
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch
from PIL import Image
from torchvision.utils import make_grid

from ddpm import PipelineLoadError, generate, load_pipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model_dir", metavar="MODEL_DIR", help="DDPMPipeline folder or Hugging Face Hub repo id")
parser.add_argument("--num_images", type=int, default=16, help="how many images to draw (default: %(default)s)")
parser.add_argument("--seed", type=int, default=0,
                    help="seed of the one torch.Generator all noise comes from (default: %(default)s)")
parser.add_argument("--num_inference_steps", type=int, default=1000,
                    help="denoising steps, at most the training timesteps (default: %(default)s)")
parser.add_argument("--batch_size", type=int, default=None, help="images per forward pass (default: num_images)")
parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="where the UNet runs (default: cuda if available, else cpu)")
parser.add_argument("--output", default="grid.png",
                    help="grid image file, ceil(sqrt(n)) images per row (default: %(default)s)")
parser.add_argument("--outdir", default=None,
                    help="also write each image as OUTDIR/0000.png, 0001.png, ... (default: no single images)")
parser.add_argument("--compile", action="store_true",
                    help="torch.compile the UNet (pays off over many steps; the first step compiles)")
args = parser.parse_args()


def error(message: str) -> NoReturn:
    """Exit with a one-line error, in argparse's format."""
    sys.exit(f"sample.py: error: {message}")


args.batch_size = args.batch_size or args.num_images
args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
if args.num_images < 1:
    parser.error(f"--num_images must be at least 1, got {args.num_images}")
if args.batch_size < 1:
    parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
if args.num_inference_steps < 1:
    parser.error(f"--num_inference_steps must be at least 1, got {args.num_inference_steps}")
if args.device == "cuda" and not torch.cuda.is_available():
    parser.error("--device cuda: no CUDA GPU is available here; use --device cpu")
if Path(args.output).suffix.lower() not in Image.registered_extensions():
    parser.error(f"--output {args.output!r}: unknown image file extension; use e.g. .png")

# A local folder, or else a Hub repo id to download (into the Hugging Face cache).
model_dir = args.model_dir
if not os.path.exists(model_dir):
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model_dir)
    except HFValidationError:
        error(f"model folder {model_dir!r} does not exist")
    try:
        model_dir = snapshot_download(model_dir, allow_patterns=["*.json", "*.safetensors", "*.bin"])
    except Exception as exc:  # offline, no such repo, no access, network failure...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        error(f"no folder {args.model_dir!r} here, and could not download {args.model_dir!r} "
              f"from the Hugging Face Hub: {reason}")

try:
    unet, scheduler = load_pipeline(model_dir, dtype=torch.float32)
except PipelineLoadError as exc:
    error(str(exc))
unet.to(args.device)
if args.compile:
    # freezing: the weights stay fixed while sampling, so inductor folds them in as constants (and on
    # the CPU prepacks the convolutions' weights): a denoising forward ran 1.19x eager diffusers' speed
    # on a CPU with it, 0.90x without (docs/benchmarks.md)
    unet = torch.compile(unet, options={"freezing": True})
num_train_timesteps = scheduler.config["num_train_timesteps"]
if args.num_inference_steps > num_train_timesteps:
    error(f"--num_inference_steps {args.num_inference_steps} exceeds the {num_train_timesteps} "
          f"training timesteps of {args.model_dir!r}")

Path(args.output).parent.mkdir(parents=True, exist_ok=True)
if args.outdir is not None:
    Path(args.outdir).mkdir(parents=True, exist_ok=True)

# One CPU generator, seeded once, as DDPMPipeline(generator=torch.manual_seed(seed)):
# the noise is drawn on the CPU, so the seed gives the same noise on any device.
generator = torch.Generator().manual_seed(args.seed)
batches = []
for start in range(0, args.num_images, args.batch_size):
    batch_size = min(args.batch_size, args.num_images - start)
    print(f"sampling images {start}..{start + batch_size - 1} of {args.num_images}", file=sys.stderr)
    batches.append(generate(unet, scheduler, batch_size, generator=generator,
                            num_inference_steps=args.num_inference_steps, progress=True))
images = torch.cat(batches)  # (N, C, H, W) in [0, 1]


def to_pil(image: torch.Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] to a PIL image, rounded as DDPMPipeline's numpy_to_pil: (x * 255).round()."""
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)  # 1 channel: mode "L"


grid = make_grid(images, nrow=math.ceil(math.sqrt(args.num_images)))
to_pil(grid).save(args.output)
print(f"wrote {args.output} ({args.num_images} images)")
if args.outdir is not None:
    for i, image in enumerate(images):
        to_pil(image).save(Path(args.outdir) / f"{i:04d}.png")
    print(f"wrote {args.num_images} images to {args.outdir}/")
