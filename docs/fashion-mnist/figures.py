"""The figures of a train.py run for the docs: its last sample grid upscaled, and its training loss curve.

$ python docs/fashion-mnist/figures.py RUN_DIR OUT_PREFIX    # writes OUT_PREFIX-grid.png and OUT_PREFIX-loss.png

Needs matplotlib (`pip install -e '.[docs]'`).
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a train.py --output_dir")
    parser.add_argument("out_prefix", help="path prefix of the two PNGs")
    parser.add_argument("--scale", type=int, default=8, help="nearest-neighbour upscaling of the grid")
    args = parser.parse_args()

    grids = sorted((args.run_dir / "samples").glob("*.png"))
    if not grids:
        parser.error(f"no sample grid in {args.run_dir / 'samples'}")
    with Image.open(grids[-1]) as grid:
        # nearest neighbour: every generated pixel stays one flat square, nothing is smoothed in
        grid.resize((grid.width * args.scale, grid.height * args.scale), Image.Resampling.NEAREST).save(
            f"{args.out_prefix}-grid.png")

    events = EventAccumulator(str(args.run_dir / "logs"), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    loss = events.Scalars("train/loss")
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    axes.plot([e.step for e in loss], [e.value for e in loss], linewidth=1)
    axes.set(xlabel="optimizer step", ylabel="training loss (L_simple)", yscale="log",
             title=f"{args.run_dir.name}: train/loss, mean of each logging window")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(f"{args.out_prefix}-loss.png")
    print(f"{grids[-1]} -> {args.out_prefix}-grid.png; {len(loss)} loss points -> {args.out_prefix}-loss.png")


if __name__ == "__main__":
    main()
