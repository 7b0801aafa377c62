"""Time evaluate.py's bits/dim: the DDPM paper's CIFAR-10 UNet (35.7M parameters, random weights), T = 1000,
32x32 images, 10,000 of them on a GPU (the CIFAR-10 test set; the paper's TPU v3-8 would take about 11 minutes).

The images are built-in shapes at 32 px (no download; what the pixels show does not change the cost). Batches run
exactly as evaluate.py runs them (VariationalBound.evaluate: one CPU generator, T draws per batch). The run stops
at --time_limit seconds after a batch ends and extrapolates the time for --num_images from the batches done.
Where one batch alone takes too long (a CPU), --timesteps K times K of the T steps of one batch, spread over
[0, T), and extrapolates from them.

$ PYTHONPATH=. python benchmarks/evaluate_speed.py             # GPU: 10,000 images, batch 500, stops after 600 s
$ PYTHONPATH=. python benchmarks/evaluate_speed.py --device cpu --num_images 1000 --batch_size 16 --timesteps 10
"""

import argparse
import platform
import time

import torch
from torch.utils.data import DataLoader

from ddpm import DDPMScheduler, UNet2DModel
from ddpm.data import HELD_OUT_SEED, TrainingImages, make_builtin_source
from ddpm.likelihood import VariationalBound, x0_from_pixels
from ddpm.presets import CIFAR10_UNET

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--num_images", type=int, default=10_000)
parser.add_argument("--batch_size", type=int, default=500)
parser.add_argument("--time_limit", type=float, default=600, help="stop after the batch that ends past this (s)")
parser.add_argument("--timesteps", type=int, default=None, help="time only K timesteps of one batch, extrapolate")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
args = parser.parse_args()

device = torch.device(args.device)
name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
print(f"device: {name}; torch {torch.__version__}; batch {args.batch_size}; T = 1000")
torch.manual_seed(0)
unet = UNet2DModel(**CIFAR10_UNET, sample_size=32).to(device).eval()
bound = VariationalBound(DDPMScheduler(num_train_timesteps=1000), "fixed_large", device=device)
dataset = TrainingImages(make_builtin_source(32, HELD_OUT_SEED, args.num_images), 32, 3, center_crop=True,
                         random_flip=False)
loader = DataLoader(dataset, batch_size=args.batch_size, sampler=[(i, 0) for i in range(args.num_images)])

# the CPU side alone: T noise draws of one batch, as evaluate.py draws them
generator = torch.Generator().manual_seed(0)
start = time.perf_counter()
for _ in range(bound.T):
    torch.randn((args.batch_size, 3, 32, 32), generator=generator, dtype=torch.float32)
print(f"noise draws of one batch on the CPU: {time.perf_counter() - start:.1f} s")


def time_some_timesteps() -> None:
    """K timesteps of one batch, spread over [0, T): the time for all images, extrapolated."""
    x0 = x0_from_pixels(next(iter(loader))).to(device)
    with torch.inference_mode():
        bound.terms_at(unet, x0, torch.full((len(x0),), 0, device=device), torch.zeros_like(x0))  # warm-up
        start = time.perf_counter()
        for i in torch.linspace(0, bound.T - 1, args.timesteps).round().long().tolist():
            noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device)
            bound.terms_at(unet, x0, torch.full((len(x0),), i, device=device), noise.double()).cpu()
    step_s = (time.perf_counter() - start) / args.timesteps
    batches = -(-args.num_images // args.batch_size)
    print(f"{step_s:.2f} s per timestep of a batch of {len(x0)} ({args.timesteps} timesteps timed): extrapolated "
          f"{args.num_images} images x {bound.T} timesteps in {step_s * bound.T * batches / 3600:.1f} h on {name}")


def time_batches() -> None:
    """Whole batches as evaluate.py runs them, until all images are done or the time limit has passed."""
    generator = torch.Generator().manual_seed(0)
    done, totals = 0, []
    start = time.perf_counter()
    for images in loader:
        terms = bound.evaluate(unet, x0_from_pixels(images).to(device), generator)
        totals.append(terms.total.cpu())  # waits for the batch to finish
        done += len(images)
        elapsed = time.perf_counter() - start
        print(f"{done} images in {elapsed:.1f} s ({done / elapsed:.2f} images/s)", flush=True)
        if elapsed > args.time_limit:
            break
    elapsed = time.perf_counter() - start
    if done == args.num_images:
        print(f"measured: {args.num_images} images in {elapsed / 60:.1f} min on {name}")
    else:
        print(f"extrapolated from {done} images in {elapsed:.0f} s: {args.num_images} images in "
              f"{elapsed / done * args.num_images / 60:.1f} min on {name}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(f"bits/dim of the random-weight model (a sanity figure): {torch.cat(totals).mean().item():.3f}")


time_some_timesteps() if args.timesteps else time_batches()
