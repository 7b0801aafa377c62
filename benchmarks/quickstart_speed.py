"""How fast this machine trains the quickstart UNet right now: training steps per second (forward, backward,
AdamW), batch 32 at 16x16, on one and on two threads; beside it, side by side in the same rounds, the variants
the third search of docs/quickstart.md compared: the second search's UNet (attention at 4x4) and AdamW's
foreach ops instead of its fused kernel. Each variant is timed for --seconds per round after 3 untimed steps,
the rounds interleave the variants (a shared machine's speed drifts), and the median round is printed.

The quickstart preset's step count was sized to fit 10 minutes on this project's 2-core CPU; a shared machine's
speed varies from hour to hour (docs/quickstart.md), so measure it beside any timing you quote.

$ python benchmarks/quickstart_speed.py                 # ~1 min
$ python benchmarks/quickstart_speed.py --threads 2 --batch_size 16
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ddpm import UNet2DModel
from ddpm.presets import PRESETS

PRESET = PRESETS["quickstart"]
WITH_ATTENTION = {**PRESET["model"], "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
                  "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}
BASELINE = "the preset (fused AdamW, as train.py)"
VARIANTS = {  # name: (UNet config, AdamW's implementation)
    BASELINE: (PRESET["model"], "fused"),
    "the preset, foreach AdamW": (PRESET["model"], "foreach"),
    "attention at 4x4 (second search), fused": (WITH_ATTENTION, "fused"),
}


def training_step(model: dict, adamw: str, batch_size: int):
    torch.manual_seed(0)
    unet = UNet2DModel(**model, sample_size=PRESET["resolution"])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=PRESET["learning_rate"], **{adamw: True})
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
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=2.0, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for threads in args.threads:
        torch.set_num_threads(threads)
        steps = {name: training_step(model, adamw, args.batch_size) for name, (model, adamw) in VARIANTS.items()}
        for step in steps.values():
            for _ in range(3):
                step()
        rates = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                rates[name].append(steps_per_second(step, args.seconds))
        baseline = statistics.median(rates[BASELINE])
        for name, values in rates.items():
            rate = statistics.median(values)
            print(f"{threads} thread(s), batch {args.batch_size}, {name}: {rate:.2f} steps/s, "
                  f"{rate * args.batch_size:.0f} images/s ({rate / baseline:.2f}x the preset)", flush=True)


if __name__ == "__main__":
    main()
