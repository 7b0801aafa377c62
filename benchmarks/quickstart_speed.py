"""How fast this machine trains the quickstart UNet right now: training steps per second (forward, backward,
AdamW), batch 32 at 16x16, on one and on two threads, each timed for --seconds after 5 untimed steps.

The quickstart preset's step count was sized to fit 10 minutes on this project's 2-core CPU; a shared machine's
speed varies from hour to hour (docs/quickstart.md), so measure it beside any timing you quote.

$ python benchmarks/quickstart_speed.py                 # ~20 s
$ python benchmarks/quickstart_speed.py --threads 2 --batch_size 64
"""

import argparse
import time

import torch
import torch.nn.functional as F

from ddpm import UNet2DModel
from ddpm.presets import PRESETS


def steps_per_second(threads: int, batch_size: int, seconds: float) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    preset = PRESETS["quickstart"]
    unet = UNet2DModel(**preset["model"], sample_size=preset["resolution"])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=preset["learning_rate"], foreach=True)
    x = torch.randn(batch_size, 3, preset["resolution"], preset["resolution"])
    timesteps = torch.randint(0, 1000, (batch_size,))

    def step() -> None:
        loss = F.mse_loss(unet(x, timesteps), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    for threads in args.threads:
        rate = steps_per_second(threads, args.batch_size, args.seconds)
        print(f"{threads} thread(s), batch {args.batch_size}: {rate:.2f} steps/s, {rate * args.batch_size:.0f} images/s")


if __name__ == "__main__":
    main()
