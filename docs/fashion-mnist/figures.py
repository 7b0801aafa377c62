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
    parser.add_argument("--min_side", type=int, default=480,
                        help="enlarge the grid by a whole factor, nearest-neighbour, to at least this many pixels")
    args = parser.parse_args()

    grids = sorted((args.run_dir / "samples").glob("*.png"))
    if not grids:
        parser.error(f"no sample grid in {args.run_dir / 'samples'}")
    with Image.open(grids[-1]) as grid:
        # nearest neighbour: every generated pixel stays one flat square, nothing is smoothed in
        scale = max(1, -(-args.min_side // min(grid.size)))  # train.py's grids are already at least 256 px
        grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(
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
