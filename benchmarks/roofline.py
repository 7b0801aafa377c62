"""Roofline of one training step of ddpm's UNet: FLOPs and the fewest bytes per op class, and the time floor
they give on a GPU. No GPU needed: the step runs on the meta device (shapes only, no memory, no arithmetic).

One step is L_simple's forward and backward (every aten op recorded) plus an AdamW update, counted by rule.
Counting rules:
- FLOPs: torch.utils.flop_counter's formulas (convolutions, matmuls, attention), as benchmark.py counts them
  for MFU. GroupNorm and elementwise ops are not counted there (a few FLOPs per element: never the limit).
- bytes: each op reads each of its input tensors and writes each output once, at --bytes_per_element (2: bf16,
  weights included); views and allocations move nothing. On the meta device attention runs as its math
  composition (bmm, softmax): at most 64 positions here, so its scores are a rounding error.
- AdamW (fused, fp32 master weights): per parameter reads weight, m, v (fp32) and the bf16 gradient, writes
  weight, m, v and a bf16 copy of the weight: 28 bytes.
- time of an op: max(FLOPs / --tflops, bytes / --bandwidth); MFU = counted FLOPs / time / --peak_tflops.

$ python benchmarks/roofline.py                                    # tutorial UNet at 128, batch 64, H100
$ python benchmarks/roofline.py --config cifar10 --batch_size 128 --markdown roofline.md
"""

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from ddpm import DDPMScheduler, UNet2DModel
from ddpm.loss import diffusion_loss
from ddpm.presets import CIFAR10_UNET, TUTORIAL_UNET

CONFIGS = {
    "tutorial128": dict(TUTORIAL_UNET, sample_size=128),
    "cifar10": dict(CIFAR10_UNET, sample_size=32),
}
CLASSES = ("convolution", "matmul/attention", "norm", "elementwise", "AdamW")
aten = torch.ops.aten
CONVOLUTION = {aten.convolution, aten.convolution_backward}
MATMUL = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten._safe_softmax, aten._softmax_backward_data}
NORM = {aten.native_group_norm, aten.native_group_norm_backward}
MOVES_NOTHING = {aten._unsafe_view, aten.empty_like, aten.new_empty_strided, aten.empty, aten.detach}
ADAMW_BYTES_PER_PARAMETER = 28


def op_class(packet) -> str:
    if packet in CONVOLUTION:
        return "convolution"
    if packet in MATMUL:
        return "matmul/attention"
    if packet in NORM:
        return "norm"
    return "elementwise"  # adds, SiLU and its backward, bias-gradient sums, copies, cat, upsampling, the loss


class OpRecorder(TorchDispatchMode):
    """Every aten call that moves memory, as (op, FLOPs, bytes read and written)."""

    def __init__(self, bytes_per_element: int):
        super().__init__()
        self.bytes_per_element = bytes_per_element
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if func.is_view or packet in MOVES_NOTHING:
            return out
        inputs = {id(t): t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        nbytes = self.bytes_per_element * sum(t.numel() for t in [*inputs.values(), *outputs])
        self.calls.append((packet, flops, nbytes))
        return out


def record_training_step(config: dict, batch_size: int, bytes_per_element: int) -> tuple[OpRecorder, int]:
    """Run forward and backward of L_simple on the meta device; returns the recorder and the parameter count."""
    with torch.device("meta"):
        unet = UNet2DModel(**config).train()
        size = config["sample_size"]
        x0 = torch.randn(batch_size, config["in_channels"], size, size)
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, 1000, (batch_size,))
    recorder = OpRecorder(bytes_per_element)
    with recorder:
        diffusion_loss(unet, DDPMScheduler(), x0, noise, timesteps).backward()
    return recorder, sum(p.numel() for p in unet.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="tutorial128", choices=sorted(CONFIGS))
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--bytes_per_element", type=int, default=2, help="2: bf16 activations and weights")
    p.add_argument("--tflops", type=float, default=800.0, help="matmul throughput reached, TFLOP/s (H100 bf16)")
    p.add_argument("--bandwidth", type=float, default=3.0, help="memory bandwidth reached, TB/s (H100 HBM3)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="the MFU denominator (H100 SXM dense bf16)")
    p.add_argument("--top", type=int, default=12, help="list the N ops with the largest time floor")
    p.add_argument("--markdown", default=None, metavar="OUT.md", help="also write the tables here")
    args = p.parse_args()
    if args.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {args.batch_size}")

    recorder, parameters = record_training_step(CONFIGS[args.config], args.batch_size, args.bytes_per_element)

    def floor_ms(flops: float, nbytes: float) -> float:
        return 1e3 * max(flops / (args.tflops * 1e12), nbytes / (args.bandwidth * 1e12))

    def totals() -> dict:
        return {"calls": 0, "flops": 0, "bytes": 0, "floor": 0.0}

    classes, ops = {name: totals() for name in CLASSES}, defaultdict(totals)
    for packet, flops, nbytes in recorder.calls:
        for total in (classes[op_class(packet)], ops[packet]):
            total["calls"] += 1
            total["flops"] += flops
            total["bytes"] += nbytes
            total["floor"] += floor_ms(flops, nbytes)
    adamw_bytes = ADAMW_BYTES_PER_PARAMETER * parameters
    classes["AdamW"].update(calls=1, bytes=adamw_bytes, floor=floor_ms(0, adamw_bytes))

    counted_flops = sum(c["flops"] for c in classes.values())
    compute_ms = floor_ms(counted_flops, 0)
    per_op_ms = sum(c["floor"] for c in classes.values())
    fused_ms = per_op_ms - classes["elementwise"]["floor"]

    def mfu(ms: float) -> str:
        return f"{100 * counted_flops / (ms / 1e3) / (args.peak_tflops * 1e12):.0f}%"

    lines = [
        f"| {args.config}, batch {args.batch_size}, one training step | ops | GFLOP | GB moved | "
        f"FLOP floor, ms | byte floor, ms | floor, ms (per op, max of the two) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in classes.items():
        lines.append(f"| {name} | {c['calls']} | {c['flops'] / 1e9:,.0f} | {c['bytes'] / 1e9:,.1f} | "
                     f"{floor_ms(c['flops'], 0):.1f} | {floor_ms(0, c['bytes']):.1f} | {c['floor']:.1f} |")
    total_bytes = sum(c["bytes"] for c in classes.values())
    lines.append(f"| total | {sum(c['calls'] for c in classes.values())} | {counted_flops / 1e9:,.0f} | "
                 f"{total_bytes / 1e9:,.1f} | {compute_ms:.1f} | {floor_ms(0, total_bytes):.1f} | {per_op_ms:.1f} |")
    lines += [
        "",
        f"| time floor of one step (batch {args.batch_size}) | ms | images/s | best MFU of {args.peak_tflops:g} |",
        "|---|---|---|---|",
    ]
    for label, ms in (("every op as recorded, each at its own floor", per_op_ms),
                      ("elementwise ops fused into their neighbours (0 bytes of their own)", fused_ms),
                      (f"FLOPs alone, at {args.tflops:g} TFLOP/s", compute_ms)):
        lines.append(f"| {label} | {ms:.1f} | {args.batch_size / (ms / 1e3):,.0f} | {mfu(ms)} |")

    ranked = sorted(ops.items(), key=lambda item: -item[1]["floor"])
    lines += ["", f"| top {args.top} ops by time floor | class | calls | GFLOP | GB moved | floor, ms (per call) |",
              "|---|---|---|---|---|---|"]
    for packet, record in ranked[:args.top]:
        lines.append(f"| {packet} | {op_class(packet)} | {record['calls']} | {record['flops'] / 1e9:,.0f} | "
                     f"{record['bytes'] / 1e9:,.1f} | {record['floor']:.1f} |")
    lines += ["", f"- {parameters:,} parameters; {counted_flops / args.batch_size / 1e9:.1f} GFLOP per image per "
              f"step (FlopCounterMode's formulas); {args.bytes_per_element} bytes per element; "
              f"{args.tflops:g} TFLOP/s, {args.bandwidth:g} TB/s; torch {torch.__version__}"]
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
