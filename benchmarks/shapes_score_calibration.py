"""The measurements behind ddpm/shapes_score.py's VALID_RMSE, and the speed of the fit.

For each resolution: the best-fit RMSE of real built-in images (seed 1, never a training seed by default),
of the same images blurred by a Gaussian of sigma = 1 px and 0.5 px, and of uniform noise; the fraction
under VALID_RMSE; the time to fit the first 256.

$ python benchmarks/shapes_score_calibration.py --resolutions 8 16 32 --num_images 2048
"""

import argparse
import time

import torch
from torchvision.transforms.functional import gaussian_blur, pil_to_tensor

from ddpm import shapes_score
from ddpm.data import make_builtin_source

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--resolutions", type=int, nargs="+", default=[8, 16, 32])
parser.add_argument("--num_images", type=int, default=2048)
parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

for resolution in args.resolutions:
    start = time.perf_counter()
    shapes_score.candidates(min(resolution, shapes_score.GRID_RESOLUTION))
    grid_s = time.perf_counter() - start
    source = make_builtin_source(resolution, seed=1, size=args.num_images)
    real = torch.stack([pil_to_tensor(source.get(i)) for i in range(args.num_images)]).float() / 255
    start = time.perf_counter()
    shapes_score.fit(real[:256])
    fit_s = time.perf_counter() - start
    print(f"{resolution} px: grid masks built in {grid_s:.1f} s (once per process); 256 images fitted in {fit_s:.1f} s")
    cases = {"real": real, "blur sigma 1": gaussian_blur(real, kernel_size=7, sigma=1.0),
             "blur sigma 0.5": gaussian_blur(real, kernel_size=7, sigma=0.5),
             "uniform noise": torch.rand(256, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))}
    for name, images in cases.items():
        rmse = shapes_score.fit(images).rmse
        q = rmse.quantile(torch.tensor([0.0, 0.01, 0.5, 0.99, 1.0])).tolist()
        valid = (rmse < shapes_score.VALID_RMSE).double().mean().item()
        print(f"  {name:15s} n={len(rmse):5d} RMSE min {q[0]:6.2f} 1% {q[1]:6.2f} median {q[2]:6.2f} 99% {q[3]:6.2f} "
              f"max {q[4]:6.2f}; under {shapes_score.VALID_RMSE:g}: {valid:.4f}")
