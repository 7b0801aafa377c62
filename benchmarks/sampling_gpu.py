"""Sampling speed on a GPU: ddpm's eager / CUDA-graph / bf16 denoising loop against diffusers' DDPMPipeline.

1. The tutorial UNet at 128x128, batch 16: denoising steps/s of DDPMPipeline (fp32, eager) and of ddpm's
   generate() eager fp32, CUDA graph fp32, bf16 autocast, bf16 + CUDA graph, in one process on one card.
   Steps/s does not depend on the number of steps, so each row times fewer than 1000 steps (the table
   says how many) and gives the 1000-step time they imply.
2. The DDPM paper's CIFAR-10 UNet at 32x32, 256 images in one batch: the wall time of 1000 DDPM steps (and
   of 50 DDIM steps), measured over all the steps when the part's time allows, else extrapolated (said so).

Every row has its own time budget (--budget_s): a short probe estimates the speed, the timed run is cut
to fit, and a row still running at 3x its budget is stopped and reported as such. Random weights (speed
does not depend on them); the PyTorch defaults for TF32 (cuDNN convolutions: on; matmuls: off), in all rows.
Without diffusers installed, the DDPMPipeline row is left out.

$ PYTHONPATH=. python benchmarks/sampling_gpu.py                    # on a GPU: 13 rows of ~15 s, ~4 minutes
$ PYTHONPATH=. python benchmarks/sampling_gpu.py --budget_s 3       # ~2 minutes (benchmarks/gpu_check.sh)
$ PYTHONPATH=. python benchmarks/sampling_gpu.py --quick            # a tiny UNet, to check that it runs (CPU too)
"""

import argparse
import platform
import signal
import time
from contextlib import contextmanager
from typing import Callable

import torch

from ddpm import DDIMScheduler, DDPMScheduler, UNet2DModel, generate
from ddpm.fast_sampling import FastUNet
from ddpm.presets import CIFAR10_UNET, TUTORIAL_UNET

try:
    import diffusers  # the DDPMPipeline row only
except ImportError:
    diffusers = None

QUICK_UNET = {"block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
              "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 8}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budget_s", type=float, default=10.0, help="seconds of timed sampling per row")
    p.add_argument("--quick", action="store_true",
                   help="a tiny UNet at 8x8, 4 and 8 images, 20 steps, 2 s per row: checks that the script runs")
    args = p.parse_args()
    if args.budget_s <= 0:
        p.error(f"--budget_s must be > 0, got {args.budget_s}")
    if args.quick:
        args.budget_s = min(args.budget_s, 2.0)
    return args


class RowTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raise RowTimeout in this (main) thread if the block runs longer than `seconds`."""
    def expire(signum, frame):
        raise RowTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure(sample: Callable[[int], object], steps: int, budget_s: float, device: torch.device) -> tuple[int, float]:
    """(steps timed, seconds) of one sample(n) call: n = `steps`, or fewer if that would exceed `budget_s`.

    Two untimed steps first (cuDNN set-up, graph capture), then a 3-step probe sizes the timed call.
    """
    sample(2)
    probe = 3
    probe_s = seconds(lambda: sample(probe), device)
    n = max(probe, min(steps, int(budget_s * probe / probe_s)))
    return n, seconds(lambda: sample(n), device)


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # on a CPU the script only checks that it runs; a shared CPU thrashes with more
    if args.quick:
        parts = [("quick UNet", dict(QUICK_UNET, sample_size=8), 4, 20), ("quick UNet", None, 8, 20)]
    else:
        parts = [("tutorial UNet", dict(TUTORIAL_UNET, sample_size=128), 16, 1000),
                 ("CIFAR-10 UNet", dict(CIFAR10_UNET, sample_size=32), 256, 1000)]
    (label_a, config_a, batch_a, steps_a), (label_b, config_b, batch_b, steps_b) = parts
    config_b = config_b or config_a

    rows = []  # (model, images, sampler, variant, steps asked, steps timed, seconds, note)
    limit_s = 3 * args.budget_s + 120  # a row's hard limit: room for the warm-up, a graph capture, a slow probe

    def run_row(model: str, images: int, sampler: str, variant: str, steps: int, sample: Callable[[int], object]):
        print(f"measuring {model}, {images} images, {sampler}, {variant} ...", flush=True)
        try:
            with time_limit(limit_s):
                n, elapsed = measure(sample, steps, args.budget_s, device)
            rows.append((model, images, sampler, variant, steps, n, elapsed, ""))
        except RowTimeout:
            rows.append((model, images, sampler, variant, steps, 0, 0.0, f"stopped after {limit_s:g} s"))
        except torch.OutOfMemoryError:
            rows.append((model, images, sampler, variant, steps, 0, 0.0, "out of memory"))
        finally:
            if cuda:
                torch.cuda.empty_cache()

    def ours(unet: UNet2DModel, variant: str) -> torch.nn.Module | None:
        """The UNet as `variant` runs it, or None where it cannot run here (a CUDA graph on the CPU)."""
        bf16, graph = "bf16" in variant, "graph" in variant
        if graph and not cuda:
            return None
        return FastUNet(unet, torch.bfloat16 if bf16 else None, cuda_graph=graph) if bf16 or graph else unet

    variants = ["eager fp32", "CUDA graph fp32", "eager bf16", "CUDA graph bf16"]

    # Part 1: DDPMPipeline against our loop, same weights, same batch
    torch.manual_seed(0)
    unet = UNet2DModel(**config_a).to(device).eval()
    if diffusers is not None:
        theirs = diffusers.UNet2DModel(**config_a).to(device).eval()
        theirs.load_state_dict(unet.state_dict())
        pipeline = diffusers.DDPMPipeline(unet=theirs, scheduler=diffusers.DDPMScheduler())
        pipeline.set_progress_bar_config(disable=True)
        run_row(label_a, batch_a, "DDPM", "diffusers DDPMPipeline fp32", steps_a,
                lambda n: pipeline(batch_size=batch_a, generator=torch.manual_seed(0), num_inference_steps=n,
                                   output_type="np"))
        del pipeline, theirs
    for variant in variants:
        model = ours(unet, variant)
        if model is not None:
            run_row(label_a, batch_a, "DDPM", f"ddpm {variant}", steps_a,
                    lambda n, model=model: generate(model, DDPMScheduler(), batch_a, torch.manual_seed(0), n))
    del unet, model

    # Part 2: many images of the CIFAR-10 model in one batch
    torch.manual_seed(0)
    unet = UNet2DModel(**config_b).to(device).eval()
    for variant in variants:
        model = ours(unet, variant)
        if model is not None:
            run_row(label_b, batch_b, "DDPM", f"ddpm {variant}", steps_b,
                    lambda n, model=model: generate(model, DDPMScheduler(), batch_b, torch.manual_seed(0), n))
            run_row(label_b, batch_b, "DDIM", f"ddpm {variant}", min(50, steps_b),
                    lambda n, model=model: generate(model, DDIMScheduler(), batch_b, torch.manual_seed(0), n))

    print_table(rows, device)


def print_table(rows: list[tuple], device: torch.device) -> None:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    version = diffusers.__version__ if diffusers else "not installed"
    print(f"\n{card}; torch {torch.__version__}, diffusers {version}\n")
    print("| model | images | sampler | run | steps timed | steps/s | vs DDPMPipeline | time for the full steps |")
    print("|---|---|---|---|---|---|---|---|")
    baseline = {(model, images): n / elapsed for model, images, _, variant, _, n, elapsed, _ in rows
                if variant.startswith("diffusers") and n}
    for model, images, sampler, variant, steps, n, elapsed, note in rows:
        if not n:
            print(f"| {model} | {images} | {sampler} | {variant} | - | - | - | {note} |")
            continue
        rate = n / elapsed
        ratio = f"{rate / baseline[(model, images)]:.2f}x" if (model, images) in baseline else "-"
        full = f"{elapsed:.2f} s measured" if n == steps else f"{steps / rate:.2f} s (extrapolated)"
        print(f"| {model} | {images} | {sampler} | {variant} | {n} of {steps} | {rate:.2f} | {ratio} | {full} |")


if __name__ == "__main__":
    main()
