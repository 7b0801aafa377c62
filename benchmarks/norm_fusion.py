"""What torch.compile makes of GroupNorm under bf16 autocast, with torch's norm and with ddpm's fast norm (issue 10).

Autocast runs torch's GroupNorm in fp32: in eager mode its fp32 output is written to memory and cast back to bf16 by
the next convolution. Under torch.compile that need not happen: Inductor may fuse the cast into the norm's kernel.
This script compiles one ResnetBlock2D (norm, SiLU, conv, time embedding, norm, SiLU, conv, residual), runs its
forward and backward once under bf16 autocast, and reads the code Inductor generated: how many fused kernels it
has, and how many bytes its activation-sized buffers take (by dtype), per element of the block's activation. No
timing: it runs on the CPU (Inductor's C++ backend) or on a GPU (Triton), where the counts may differ.

    python benchmarks/norm_fusion.py [--device cuda] [--batch_size 8 --channels 64 --size 16]
"""

import argparse
import math
import re

import torch
from torch._inductor.utils import run_and_get_code

from ddpm.unet import GroupNorm, ResnetBlock2D

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# an allocation in Inductor's wrapper code: empty_strided_cpu((8, 64, 16, 16), (16384, 1, 1024, 64), torch.float32)
ALLOCATION = re.compile(r"empty_strided_(?:cpu|cuda)\(\(([^)]*)\), \([^)]*\), torch\.(\w+)\)")
KERNEL = re.compile(r"\b(cpp_fused_\w+|triton_\w+_fused_\w+)\b")


def generated_code(args: argparse.Namespace, fast_norm: bool) -> list[str]:
    """The forward's and the backward's generated code for one compiled ResnetBlock2D."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    block = ResnetBlock2D(args.channels, args.channels, 4 * args.channels, 8, 1e-5, 0.0).to(args.device)
    for module in block.modules():
        if isinstance(module, GroupNorm):
            module.fast = fast_norm
    compiled = torch.compile(block)
    # bf16, as the convolution before the block writes it under autocast
    x = torch.randn(args.batch_size, args.channels, args.size, args.size, device=args.device, dtype=torch.bfloat16,
                    requires_grad=True)
    temb = torch.randn(args.batch_size, 4 * args.channels, device=args.device)

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16):
            out = compiled(x, temb)
        out.float().square().mean().backward()

    return run_and_get_code(step)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=16)
    args = parser.parse_args()
    elements = args.batch_size * args.channels * args.size ** 2
    print(f"one ResnetBlock2D, {args.channels} channels, {args.size}x{args.size}, batch {args.batch_size}, bf16 "
          f"autocast, torch.compile on {args.device}")
    print("| norm | pass | fused kernels | activation-sized buffers | bytes per activation element |")
    print("|---|---|---|---|---|")
    for fast_norm in (False, True):
        for name, code in zip(("forward", "backward"), generated_code(args, fast_norm)):
            sized = {}
            for shape, dtype in ALLOCATION.findall(code):
                if math.prod(int(d) for d in shape.split(",") if d.strip()) == elements:
                    sized[dtype] = sized.get(dtype, 0) + 1
            size = sum(DTYPE_BYTES.get(dtype, 4) * count for dtype, count in sized.items())
            buffers = ", ".join(f"{count} {dtype}" for dtype, count in sorted(sized.items()))
            print(f"| {'fast (ddpm)' if fast_norm else 'torch'} | {name} | {len(set(KERNEL.findall(code)))} | "
                  f"{buffers} | {size} |")


if __name__ == "__main__":
    main()
