"""Speed of one training step of the DDPM paper's CIFAR-10 UNet (batch 128, bf16): eager, torch.compile,
compile(mode="reduce-overhead"), and the whole step captured as one CUDA graph, eager or compiled (issue 9).

One step, as train.py takes it: eps and t drawn on the device into static buffers (Algorithm 1), the forward under
autocast, L_simple, backward, gradient clipping, AdamW and the EMA update (foreach ops). The images are a fixed
tensor: this measures the model step, not the data. Under a CUDA graph, AdamW is capturable with its learning rate
a device tensor, and the EMA decay is a device tensor too, both filled before each replay (as a schedule needs).
Each variant runs in a process of its own under --variant_timeout, so one that hangs or fails costs only its row.

$ python benchmarks/train_step_gpu.py                          # every variant, on CUDA
$ python benchmarks/train_step_gpu.py --variants eager,cuda_graph --markdown step.md
$ OMP_NUM_THREADS=1 python benchmarks/train_step_gpu.py --quick   # a tiny UNet at batch 4: does it run (CPU)
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ddpm from this checkout
from ddpm import DDPMScheduler, UNet2DModel  # noqa: E402
from ddpm.cuda_graph_step import CudaGraphStep  # noqa: E402
from ddpm.ema import EMA  # noqa: E402
from ddpm.loss import diffusion_loss  # noqa: E402
from ddpm.presets import CIFAR10_UNET  # noqa: E402

# Tiny enough for a CPU: the --quick check of this script itself
QUICK_UNET = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "dropout": 0.1,
}
VARIANTS = {  # name: (what it is, needs CUDA)
    "eager": ("eager PyTorch", False),
    "compile": ("torch.compile(unet)", False),
    "compile_reduce_overhead": ('torch.compile(unet, mode="reduce-overhead"): CUDA graphs of forward and backward',
                                True),
    "cuda_graph": ("the whole step in one torch.cuda.graph, eager kernels (train.py --cuda_graph's CudaGraphStep)",
                   True),
    "compile_cuda_graph": ("the whole step in one torch.cuda.graph around torch.compile(unet) (CudaGraphStep)",
                           True),
}
GRAPHED = ("cuda_graph", "compile_cuda_graph")  # through ddpm/cuda_graph_step.py, as train.py --cuda_graph
H100_SXM_BF16_TFLOPS = 989.0  # dense, no sparsity
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny UNet at 16x16, batch 4, few steps (on the CPU the "
                   "graph variants run their step uncaptured: a check of this script, not of a graph)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="autocast dtype (default: bf16 on CUDA, "
                                                                        "fp32 on the CPU)")
    p.add_argument("--batch_size", type=int, default=None, help="default: 128, or 4 with --quick")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ", ".join(VARIANTS))
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (compiling); default 20, 2 --quick")
    p.add_argument("--steps", type=int, default=None, help="steps per timed round; default 50, 3 with --quick")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; images/s is their median")
    p.add_argument("--variant_timeout", type=float, default=300, help="seconds each variant may take, all in")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help=f"the card's dense peak for MFU (default on CUDA: H100 SXM bf16, {H100_SXM_BF16_TFLOPS:g})")
    p.add_argument("--markdown", default=None, metavar="OUT.md", help="also write the table here")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # set in the child process that measures
    args = p.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.batch_size = args.batch_size or (4 if args.quick else 128)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 20)
    args.steps = args.steps or (3 if args.quick else 50)
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for, but torch sees no CUDA GPU")
    if min(args.batch_size, args.steps, args.rounds) < 1 or args.warmup < 1:
        p.error("--batch_size, --steps, --rounds and --warmup must be >= 1")
    return args


def unet_config(args) -> dict:
    return dict(QUICK_UNET, sample_size=16) if args.quick else dict(CIFAR10_UNET, sample_size=32)


def train_flops_per_image(config: dict) -> float:
    """Forward + backward FLOPs of the UNet for one image (FlopCounterMode on the meta device, as benchmark.py)."""
    with torch.device("meta"):
        unet = UNet2DModel(**config)
        x = torch.randn(1, config.get("in_channels", 3), config["sample_size"], config["sample_size"])
        t = torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        unet.train()(x, t).pow(2).mean().backward()
    return counter.get_total_flops()


# -----------------------------------------------------------------------------
# One variant, measured in a child process


def measure(args) -> dict:
    device, variant = torch.device(args.device), args.variant
    graphed = variant in GRAPHED
    config = unet_config(args)
    torch.manual_seed(0)
    unet = UNet2DModel(**config).to(device).train()
    model = unet
    if variant != "eager" and variant != "cuda_graph":
        model = torch.compile(unet, mode="reduce-overhead" if variant == "compile_reduce_overhead" else None)
    scheduler = DDPMScheduler()
    size, batch = config["sample_size"], args.batch_size
    x0 = torch.rand(batch, config.get("in_channels", 3), size, size, device=device) * 2 - 1
    noise, timesteps = torch.empty_like(x0), torch.empty(batch, dtype=torch.long, device=device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0, fused=True,
                                  capturable=graphed)  # as train.py's
    ema = EMA(unet, max_decay=0.9999)
    loss_sum = torch.zeros((), device=device)
    dtype = DTYPES[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    def draw() -> None:
        # Algorithm 1: eps ~ N(0, I) and t ~ Uniform({0, ..., T-1}), drawn on the device
        noise.normal_()
        timesteps.random_(0, scheduler.config["num_train_timesteps"])

    def step() -> None:
        """train.py's eager step."""
        draw()
        with autocast:
            loss = diffusion_loss(model, scheduler, x0, noise, timesteps)
        loss.backward()
        loss_sum.add_(loss.detach())
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(unet)

    # train.py --cuda_graph's step: eager on a side stream for its first calls, then recorded once and replayed
    graph_step = CudaGraphStep(model, unet, scheduler, optimizer, ema, dtype, None, 1.0, loss_sum,
                               torch.zeros((), dtype=torch.bool, device=device)) if graphed else None

    def graphed_step() -> None:
        draw()
        graph_step(x0, noise, timesteps)

    def compiled_graphs_step() -> None:
        torch.compiler.cudagraph_mark_step_begin()  # the outputs of the last step may be overwritten now
        step()

    run = graphed_step if graphed else compiled_graphs_step if variant == "compile_reduce_overhead" else step
    start = time.perf_counter()
    for _ in range(args.warmup):
        run()
    synchronize(device)
    warmup_s = time.perf_counter() - start

    loss_sum.zero_()
    seconds = []
    for _ in range(args.rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            run()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    rates = [batch * args.steps / s for s in seconds]
    return {"variant": variant, "images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "warmup_s": warmup_s, "mean_loss": loss_sum.item() / (args.rounds * args.steps)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# The table


def run_variant(args, variant: str) -> dict | str:
    """The variant's measurement from a child process, or why there is none."""
    if VARIANTS[variant][1] and args.device != "cuda" and not (args.quick and variant in GRAPHED):
        return "skipped: needs CUDA (CUDA graphs)"
    argv = [sys.executable, __file__, "--variant", variant, "--device", args.device, "--dtype", args.dtype,
            "--batch_size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--rounds", str(args.rounds)] + (["--quick"] if args.quick else [])
    try:
        child = subprocess.run(argv, capture_output=True, text=True, timeout=args.variant_timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {args.variant_timeout:g} s"
    results = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    if child.returncode != 0 or not results:
        lines = (child.stderr or child.stdout).strip().splitlines() or [f"exit code {child.returncode}"]
        return f"failed: {lines[-1][:200]}"
    return json.loads(results[-1][len("RESULT "):])


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}"


def main() -> None:
    args = parse_args()
    if args.variant:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    config = unet_config(args)
    flops = train_flops_per_image(config)
    peak = args.peak_tflops or (H100_SXM_BF16_TFLOPS if args.device == "cuda" else None)
    name = "tiny UNet (--quick)" if args.quick else "CIFAR-10 UNet"
    print(f"{name}, batch {args.batch_size}, {args.dtype}, {device_name(args.device)}: {len(args.variants)} "
          f"variant(s), at most {args.variant_timeout:g} s each", flush=True)
    lines = [f"| {name}, batch {args.batch_size}, {args.dtype}, {device_name(args.device)} | images/s (min-max) | "
             "ms/step | TFLOP/s | MFU | warm-up, s | mean loss |",
             "|---|---|---|---|---|---|---|"]
    for variant in args.variants:
        result = run_variant(args, variant)
        if isinstance(result, str):
            print(f"{variant}: {result}", flush=True)
            lines.append(f"| {variant} | {result} | | | | | |")
            continue
        rate = result["images_per_s"]
        tflops = flops * rate / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        print(f"{variant}: {rate:.1f} images/s", flush=True)
        lines.append(f"| {variant} | {rate:.1f} ({result['min']:.1f}-{result['max']:.1f}) | "
                     f"{1000 * args.batch_size / rate:.2f} | {tflops:.3g} | {mfu} | {result['warmup_s']:.1f} | "
                     f"{result['mean_loss']:.4f} |")
    parameters = sum(p.numel() for p in UNet2DModel(**config).parameters())
    notes = [f"- {parameters:,} parameters; {flops / 1e9:.2f} GFLOP per image per training step (forward + backward, "
             "FlopCounterMode); MFU against " + (f"{peak:g} TFLOP/s" if peak else "no peak (CPU)"),
             f"- median of {args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up steps; each variant "
             "in its own process",
             *[f"- {variant}: {VARIANTS[variant][0]}" for variant in args.variants],
             f"- torch {torch.__version__}"]
    table = "\n".join(lines + [""] + notes)
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
