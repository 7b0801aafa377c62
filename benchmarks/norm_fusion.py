"""What GroupNorm costs under bf16 autocast, eager and compiled, with torch's norm and with ddpm's fast norm (issue 10).

Autocast runs torch's GroupNorm in fp32: in eager mode it casts the bf16 input up, writes an fp32 output, and the next
convolution casts that back to bf16. The fast norm (`UNet2DModel.enable_fast_norm`) runs torch's kernel in the
input's dtype instead. Under torch.compile neither need write fp32: Inductor may fuse the casts into the norm's kernel.
This script builds one ResnetBlock2D (norm, SiLU, conv, time embedding, norm, SiLU, conv, residual), runs its forward
and backward once under bf16 autocast, and counts, per pass:
  eager     the aten ops run and the activation-sized tensors they write (a dispatch mode records them)
  compiled  the fused kernels in the code Inductor generated and its activation-sized buffers
with the bytes of those tensors per element of the block's activation. No timing: on the CPU the compiled rows are
Inductor's C++ backend; on a GPU (--device cuda), Triton's, which may fuse differently.

    python benchmarks/norm_fusion.py [--device cuda] [--batch_size 8 --channels 64 --size 16]
"""

import argparse
import math
import re

import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm.unet import GroupNorm, ResnetBlock2D

# an allocation in Inductor's wrapper code: empty_strided_cpu((8, 64, 16, 16), (16384, 1, 1024, 64), torch.float32)
ALLOCATION = re.compile(r"empty_strided_(?:cpu|cuda)\(\(([^)]*)\), \([^)]*\), torch\.(\w+)\)")
KERNEL = re.compile(r"\b(cpp_fused_\w+|triton_\w+_fused_\w+)\b")


class AtenOps(TorchDispatchMode):
    """Records each aten op run and the dtypes of its tensor outputs of `elements` elements."""

    def __init__(self, elements: int):
        super().__init__()
        self.elements, self.ops, self.written = elements, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        outputs = out if isinstance(out, (tuple, list)) else [out]
        self.written += [t.dtype for t in outputs if isinstance(t, torch.Tensor) and t.numel() == self.elements]
        return out


def fp32_norm(norm: GroupNorm):
    """What CUDA's autocast makes of torch's GroupNorm (group_norm is on its fp32 list; the CPU's runs it in the
    input's dtype): the input cast to fp32, an fp32 output."""
    return lambda x: F.group_norm(x.float(), norm.num_groups, norm.weight, norm.bias, norm.eps)


NORMS = {  # how each GroupNorm of the block runs
    "torch": lambda norm: None,
    "fp32 (CUDA's autocast, emulated)": lambda norm: setattr(norm, "forward", fp32_norm(norm)),
    "fast (ddpm)": lambda norm: setattr(norm, "fast", True),
}


def block_and_inputs(args: argparse.Namespace, norm: str):
    torch.manual_seed(0)
    block = ResnetBlock2D(args.channels, args.channels, 4 * args.channels, 8, 1e-5, 0.0).to(args.device)
    for module in block.modules():
        if isinstance(module, GroupNorm):
            NORMS[norm](module)
    # bf16, as the convolution before the block writes it under autocast
    x = torch.randn(args.batch_size, args.channels, args.size, args.size, device=args.device, dtype=torch.bfloat16,
                    requires_grad=True)
    return block, x, torch.randn(args.batch_size, 4 * args.channels, device=args.device)


def eager_passes(args: argparse.Namespace, norm: str, elements: int) -> list[tuple[int, list[torch.dtype]]]:
    block, x, temb = block_and_inputs(args, norm)
    with AtenOps(elements) as forward, torch.autocast(args.device, dtype=torch.bfloat16):
        out = block(x, temb)
    loss = out.float().square().mean()
    with AtenOps(elements) as backward:
        loss.backward()
    return [(forward.ops, forward.written), (backward.ops, backward.written)]


def compiled_passes(args: argparse.Namespace, norm: str, elements: int) -> list[tuple[int, list[torch.dtype]]]:
    torch._dynamo.reset()
    block, x, temb = block_and_inputs(args, norm)
    compiled = torch.compile(block)

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16):
            out = compiled(x, temb)
        out.float().square().mean().backward()

    return [(len(set(KERNEL.findall(code))),
             [getattr(torch, dtype) for shape, dtype in ALLOCATION.findall(code)
              if math.prod(int(d) for d in shape.split(",") if d.strip()) == elements])
            for code in run_and_get_code(step)[1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=16)
    args = parser.parse_args()
    elements = args.batch_size * args.channels * args.size ** 2
    print(f"one ResnetBlock2D, {args.channels} channels, {args.size}x{args.size}, batch {args.batch_size}, bf16 "
          f"autocast, on {args.device}")
    print("| mode | norm | pass | aten ops (eager) or fused kernels (compiled) | activation-sized tensors written "
          "| bytes per activation element |")
    print("|---|---|---|---|---|---|")
    for mode, passes in (("eager", eager_passes), ("compiled", compiled_passes)):
        for norm in NORMS:
            for name, (count, dtypes) in zip(("forward", "backward"), passes(args, norm, elements)):
                kinds = sorted({str(dtype).removeprefix("torch."): dtypes.count(dtype) for dtype in dtypes}.items())
                written = ", ".join(f"{n} {dtype}" for dtype, n in kinds)
                bytes_per_element = sum(dtype.itemsize for dtype in dtypes)
                print(f"| {mode} | {norm} | {name} | {count} | {written} | {bytes_per_element} |")


if __name__ == "__main__":
    main()
