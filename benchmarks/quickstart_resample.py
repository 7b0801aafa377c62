"""Score a finished quickstart trial again under other sampler settings, or with its last raw weights instead of
the EMA weights it saved (docs/quickstart.md): the shapes score of N samples drawn as train.py's final score
draws them (DDPM, noise seed 1 = the run's --seed 0 plus 1), one line per setting.

$ python benchmarks/quickstart_resample.py trials/R1a 256 saved raw=trials/R1a/checkpoint-4200
$ python benchmarks/quickstart_resample.py trials/R2a 256 steps=50 steps=200 variance=fixed_large
$ python benchmarks/quickstart_resample.py trials/R2a 256 detail
$ python benchmarks/quickstart_resample.py trials/Z0 1024 seed=2 detail spacing=trailing

Settings: `saved` (the pipeline folder as train.py wrote it), `raw=CHECKPOINT` (that checkpoint's model weights,
not its EMA), `steps=N` (N strided DDPM steps instead of 100), `variance=fixed_large` (sigma_t^2 = beta_t),
`spacing=trailing` or `spacing=linspace` (the timesteps visited start at T-1 instead of T - T/N, Lin et al.
2023), `seed=N` (noise seed N instead of 1, for the settings after it), `detail` (the saved pipeline, and where its
errors lie: valid fraction per shape; medians over the samples of the edge pixels' share of the squared error
against the best fit, and of the standard deviation of the residual on the background and inside the shape, in
levels of 0..255; and how the fits of all samples, valid or not, fall in (shape, background) pairs and in colours,
against the even share).
"""

import sys
import time
from collections import Counter
from dataclasses import replace

import torch
from safetensors.torch import load_file

from ddpm.data import ShapesSource
from ddpm.pipeline_io import load_pipeline
from ddpm.sampling import generate_in_batches
from ddpm.scheduler import DDPMScheduler
from ddpm.shapes_score import VALID_RMSE, WHITE, BLACK, Fit, fit, pixels_of, score


COLOR_NAMES, BACKGROUND_NAMES = ("red", "green", "blue", "orange"), ("white", "black")


def detail(samples: torch.Tensor, found: Fit) -> str:
    """Valid fraction per shape, and the median edge share of the error and grain, of samples in [0, 1] whose
    best fits are `found`."""
    source = ShapesSource(samples.shape[-1], seed=0, size=1)
    per_shape, edge_share, background_std, inside_std = {}, [], [], []
    for factors, image, rmse in zip(found.factors, 255 * samples, found.rmse):
        valid, count = per_shape.get(factors.shape, (0, 0))
        per_shape[factors.shape] = (valid + int(rmse < VALID_RMSE), count + 1)
        residual = image - pixels_of(source.render(factors))
        coverage = pixels_of(source.render(replace(factors, color=WHITE, background=BLACK)))[0] / 255
        edge, inside, outside = (coverage > 0.02) & (coverage < 0.98), coverage >= 0.98, coverage <= 0.02
        squared = residual.pow(2).sum(0)
        edge_share.append(squared[edge].sum() / squared.sum())
        background_std.append(residual[:, outside].std())
        inside_std.append(residual[:, inside].std() if inside.sum() > 1 else torch.tensor(float("nan")))
    shapes = ", ".join(f"{shape} {valid}/{count}" for shape, (valid, count) in sorted(per_shape.items()))
    median = lambda values: torch.stack(values).nanquantile(0.5).item()  # noqa: E731
    pairs = Counter((f.shape, BACKGROUND_NAMES[ShapesSource.BACKGROUNDS.index(tuple(f.background))])
                    for f in found.factors)
    colors = Counter(COLOR_NAMES[ShapesSource.COLORS.index(tuple(f.color))] for f in found.factors)
    even_pair = len(samples) / (len(ShapesSource.SHAPES) * len(ShapesSource.BACKGROUNDS))
    even_color = len(samples) / len(ShapesSource.COLORS)
    per_pair = ", ".join(f"{shape} on {background} {n}" for (shape, background), n in sorted(pairs.items()))
    per_color = ", ".join(f"{color} {n}" for color, n in sorted(colors.items()))
    return (f"valid per shape: {shapes}; edge share of squared error {median(edge_share):.2f}, residual std "
            f"background {median(background_std):.1f}, inside {median(inside_std):.1f}; fits per (shape, "
            f"background), even {even_pair:.1f}: {per_pair}; per colour, even {even_color:.1f}: {per_color}")


def main(run: str, count: int, settings: list[str]) -> None:
    noise_seed = 1
    for setting in settings:
        name, _, value = setting.partition("=")
        if name == "seed":
            if not value.isdigit():
                sys.exit(f"quickstart_resample: seed= takes a whole number >= 0, got {value!r}")
            noise_seed = int(value)
            continue
        unet, scheduler = load_pipeline(run)
        config, steps = dict(scheduler.config), 100
        if name == "raw":
            unet.load_state_dict(load_file(f"{value}/model.safetensors"))
        elif name == "steps":
            steps = int(value)
        elif name == "variance":
            config["variance_type"] = value
        elif name == "spacing":
            config["timestep_spacing"] = value
        elif name not in ("saved", "detail"):
            sys.exit(f"quickstart_resample: unknown setting {setting!r} (saved, raw=, steps=, variance=, spacing=, "
                     "seed=, detail)")
        start = time.perf_counter()
        with torch.no_grad():
            samples = generate_in_batches(unet, DDPMScheduler.from_config(config), count,
                                          torch.Generator().manual_seed(noise_seed), steps)
        found = fit(samples)  # the score's own fit, shared with the detail
        print(f"{run} {setting} (seed {noise_seed}): {score(found.classes, found.rmse)} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        if name == "detail":
            print(f"{run} {setting}: {detail(samples, found)}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
