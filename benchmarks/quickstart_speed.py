"""How fast this machine trains the quickstart UNet right now: training images per second (forward, backward,
AdamW) at 16x16, on one and on two threads; beside it, side by side in the same rounds, the variants the fourth
search of docs/quickstart.md compared: the preset's UNet at the third search's batch (32), and the third search's
preset (its wider UNet, 16-32-64 channels, batch 32) at both batches. Each variant is timed for --seconds per
round after 3 untimed steps, the rounds interleave the variants (a shared machine's speed drifts), and the median
round is printed, with its ratio to the preset in images per second (what counts for a run of fixed length).

The quickstart preset trains for a time budget (9.5 minutes), so its step count follows this speed; a shared
machine's speed varies from hour to hour (docs/quickstart.md), so measure it beside any timing you quote.

$ python benchmarks/quickstart_speed.py                 # ~2 min
$ python benchmarks/quickstart_speed.py --threads 2
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ddpm import UNet2DModel
from ddpm.presets import PRESETS

PRESET = PRESETS["quickstart"]
THIRD_SEARCH_UNET = {**PRESET["model"], "block_out_channels": [16, 32, 64]}
BASELINE = f"the preset (batch {PRESET['train_batch_size']})"
VARIANTS = {  # name: (UNet config, batch size)
    BASELINE: (PRESET["model"], PRESET["train_batch_size"]),
    "the preset's UNet, batch 32": (PRESET["model"], 32),
    "the third search's preset (16-32-64, batch 32)": (THIRD_SEARCH_UNET, 32),
    "the third search's UNet, batch 64": (THIRD_SEARCH_UNET, 64),
}


def training_step(model: dict, batch_size: int):
    torch.manual_seed(0)
    unet = UNet2DModel(**model, sample_size=PRESET["resolution"])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=PRESET["learning_rate"], fused=True)  # as train.py
    x = torch.randn(batch_size, 3, PRESET["resolution"], PRESET["resolution"])
    timesteps = torch.randint(0, 1000, (batch_size,))

    def step() -> None:
        loss = F.mse_loss(unet(x, timesteps), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def steps_per_second(step, seconds: float) -> float:
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=2.0, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for threads in args.threads:
        torch.set_num_threads(threads)
        steps = {name: training_step(model, batch) for name, (model, batch) in VARIANTS.items()}
        for step in steps.values():
            for _ in range(3):
                step()
        rates = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                rates[name].append(steps_per_second(step, args.seconds) * VARIANTS[name][1])
        baseline = statistics.median(rates[BASELINE])
        for name, values in rates.items():
            rate = statistics.median(values)
            print(f"{threads} thread(s), {name}: {rate:.0f} images/s, {rate / VARIANTS[name][1]:.2f} steps/s "
                  f"({rate / baseline:.2f}x the preset's images/s)", flush=True)


if __name__ == "__main__":
    main()
