"""Speed and memory of ddpm against diffusers, on the same UNet config and the same weights.

diffusers' UNet2DModel is built, its weights moved away from their init, and the same state dict is
loaded into ddpm's UNet2DModel. The two then take turns (A B, B A, A B, ...) over --repeats rounds,
so a noisy machine slows both alike; each row quotes the medians and the median of the per-round
ratios. Options (--compile, --channels_last, --gradient_checkpointing, --dtype and the speed options
below them) apply to both, except --fast_norm: diffusers has no such path.

$ PYTHONPATH=. python benchmarks/benchmark.py --config small --device cpu --batch_size 8     # ~2 min, 2 free cores
$ PYTHONPATH=. python benchmarks/benchmark.py --config small --device cpu --batch_size 8 --threads 1 --clock cpu
$ PYTHONPATH=. python benchmarks/benchmark.py --config cifar10 --device cuda --dtype bf16 --batch_size 128 --compile
$ PYTHONPATH=. python benchmarks/benchmark.py --config tutorial128 --device cuda --dtype bf16 --batch_size 16 \\
      --markdown tutorial128.md
"""

import argparse
import ctypes
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ddpm import DDPMScheduler, UNet2DModel, generate
from ddpm.presets import CIFAR10_UNET, TUTORIAL_UNET

try:
    import diffusers
except ImportError:
    raise SystemExit("benchmark.py: it times ddpm against diffusers, which is not installed: pip install diffusers")

SMALL_UNET = {
    "block_out_channels": [64, 128, 128],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],  # attention at 16x16
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
CONFIGS = {
    "tutorial128": dict(TUTORIAL_UNET, sample_size=128),
    "tutorial32": dict(TUTORIAL_UNET, sample_size=32),
    "cifar10": dict(CIFAR10_UNET, sample_size=32),
    "small": dict(SMALL_UNET, sample_size=32, in_channels=3, out_channels=3),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
H100_SXM_BF16_TFLOPS = 989.0  # dense, no sparsity
NAMES = ("ddpm", "diffusers")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="small", choices=sorted(CONFIGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype (weights stay fp32)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="rounds of A B turns; medians are over these")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each measurement first")
    p.add_argument("--train_steps", type=int, default=1, help="training steps per timed call")
    p.add_argument("--forward_steps", type=int, default=2, help="denoising forwards per timed call")
    p.add_argument("--sample_steps", type=int, default=5, help="num_inference_steps of generate() / DDPMPipeline")
    p.add_argument("--compile", nargs="?", const="both", default=None, choices=["both", "ddpm"],
                   help="torch.compile both models, or (--compile ddpm) only ddpm's, to compare it with eager "
                        "diffusers")
    p.add_argument("--channels_last", action="store_true", help="channels_last weights and inputs for both")
    p.add_argument("--gradient_checkpointing", action="store_true", help="enable it in both models")
    p.add_argument("--fast_norm", action="store_true",
                   help="ddpm only: GroupNorm with bf16 inputs and outputs, fp32 statistics (enable_fast_norm)")
    p.add_argument("--compile_mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile's mode (reduce-overhead and max-autotune capture CUDA graphs)")
    p.add_argument("--force_layout_opt", action="store_true",
                   help="Inductor's force_layout_optimization: keep channels_last through graphs whose convs "
                        "halve the channels, where Inductor would otherwise drop it")
    p.add_argument("--cudnn_benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark: time cuDNN's algorithms for each conv shape first")
    p.add_argument("--adamw", default=None, choices=["fused", "foreach"],
                   help="AdamW implementation (default: fused on CUDA, torch's default on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: this process's CPU time, which other programs on a shared CPU do not inflate "
                        "(use with --threads 1); wall: elapsed time (always on CUDA)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help=f"the card's dense peak for MFU (default on CUDA: H100 SXM bf16, {H100_SXM_BF16_TFLOPS:g})")
    p.add_argument("--measure", default="train,forward,sample,memory",
                   help="which of train, forward, sample, memory to measure (comma-separated); fewer is quicker "
                        "under --compile, where each is compiled anew")
    p.add_argument("--profile", type=int, default=0, help="print the top N ops by self time of one training step")
    p.add_argument("--markdown", default=None, metavar="OUT.md", help="also write the table here")
    args = p.parse_args()
    args.measure = set(args.measure.split(","))
    if not args.measure or not args.measure <= {"train", "forward", "sample", "memory"}:
        p.error(f"--measure takes some of train, forward, sample, memory; got {','.join(sorted(args.measure))!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for, but torch sees no CUDA GPU")
    if args.dtype == "fp16" and args.device == "cpu":
        p.error("--dtype fp16 needs --device cuda (CPU autocast is bf16)")
    if args.clock == "cpu" and args.device == "cuda":
        p.error("--clock cpu measures CPU work only; use --clock wall with --device cuda")
    if not args.compile and (args.compile_mode != "default" or args.force_layout_opt):
        given = f"--compile_mode {args.compile_mode}" if args.compile_mode != "default" else "--force_layout_opt"
        p.error(f"{given} tunes torch.compile; add --compile")
    return args


# -----------------------------------------------------------------------------
# Measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object], device: torch.device, clock: Callable[[], float]) -> float:
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


def take_turns(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device,
               clock: Callable[[], float]) -> dict[str, list[float]]:
    """Seconds per call of each fn, alternating which goes first in each round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for round_ in range(repeats):
        for name in (list(fns) if round_ % 2 == 0 else list(fns)[::-1]):
            times[name].append(seconds(fns[name], device, clock))
    return times


def proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """How far memory rises above its level before `fn`: CUDA allocated bytes, or on the CPU the
    process's peak RSS (reset through /proc/self/clear_refs, Linux), after returning freed heap to the OS."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
    except OSError:
        return None
    before = proc_status_kib("VmRSS")
    fn()
    peak = proc_status_kib("VmHWM")
    return None if before is None or peak is None else (peak - before) / 1024


def held_for_backward_mib(loss_fn: Callable[[], torch.Tensor], device: torch.device) -> float | None:
    """Activation memory: how much more is allocated once the forward has run (and kept what the
    backward needs) than before it. Counts what gradient checkpointing keeps too (its block inputs)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = loss_fn()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        del loss
        return held / 2**20
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except OSError:
        return None
    trim(0)
    before = proc_status_kib("VmRSS")
    loss = loss_fn()
    trim(0)  # give back what the forward freed, so RSS counts only live tensors
    after = proc_status_kib("VmRSS")
    del loss
    return None if before is None or after is None else (after - before) / 1024


def flops_per_image(config: dict) -> tuple[float, float]:
    """Forward and forward+backward FLOPs of ddpm's UNet for one image, counted on the meta device
    (the count does not depend on the dtype)."""
    with torch.device("meta"):
        unet = UNet2DModel(**config)
        size = config["sample_size"]
        x = torch.randn(1, config["in_channels"], size, size)
        t = torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet.eval()(x, t)
    forward = counter.get_total_flops()
    with counter:
        unet.train()(x, t).pow(2).mean().backward()
    return forward, counter.get_total_flops()


# -----------------------------------------------------------------------------
# The two implementations


def build_models(config: dict, device: torch.device, args) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """diffusers' UNet2DModel with perturbed weights, ddpm's with the same state dict, and their
    forward relative difference (a check that the same model is being timed)."""
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    ours = UNet2DModel(**config)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, config["in_channels"], config["sample_size"], config["sample_size"], generator=generator)
    t = torch.tensor([10, 999])
    with torch.no_grad():
        expected = theirs.eval()(x, t).sample
        difference = ((ours.eval()(x, t) - expected).abs().max() / expected.abs().max()).item()
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    for model in (ours, theirs):
        model.to(device=device, memory_format=memory_format)
        if args.gradient_checkpointing:
            model.enable_gradient_checkpointing()
    if args.fast_norm:
        ours.enable_fast_norm()
    return ours, theirs, difference


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = CONFIGS[args.config]
    dtype = DTYPES[args.dtype]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    ours, theirs, difference = build_models(config, device, args)
    parameters = sum(p.numel() for p in ours.parameters())
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    compiled = {"ddpm": bool(args.compile), "diffusers": args.compile == "both"}
    # training runs the compiled module; sampling a second one compiled with freezing (weights as
    # constants, as sample.py --compile does), which only inference allows
    # torch.compile(mode=...) sets these inductor options; it takes a mode or options, not both
    inductor_options = torch._inductor.list_mode_options(args.compile_mode)
    if args.force_layout_opt:
        inductor_options["force_layout_optimization"] = True
    train_forward = {name: torch.compile(model, options=inductor_options) if compiled[name] else model
                     for name, model in (("ddpm", ours), ("diffusers", theirs))}
    forward = {name: torch.compile(model, options={**inductor_options, "freezing": True}) if compiled[name] else model
               for name, model in (("ddpm", ours), ("diffusers", theirs))}
    plain = {"ddpm": ours, "diffusers": theirs}

    def predict(name: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = (train_forward if torch.is_grad_enabled() else forward)[name](x, t)
        return out if name == "ddpm" else out.sample

    generator = torch.Generator().manual_seed(1)
    size, channels, batch = config["sample_size"], config["in_channels"], args.batch_size
    x0 = torch.randn(batch, channels, size, size, generator=generator).to(device, memory_format=memory_format)
    noise = torch.randn(batch, channels, size, size, generator=generator).to(device, memory_format=memory_format)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    schedulers = {"ddpm": DDPMScheduler(), "diffusers": diffusers.DDPMScheduler()}

    # Training step: forward, L_simple, backward, AdamW
    adamw = {"fused": {"fused": True}, "foreach": {"foreach": True}, None: {"fused": device.type == "cuda"}}[args.adamw]
    optimizers = {name: torch.optim.AdamW(plain[name].parameters(), lr=1e-4, **adamw) for name in NAMES}
    scalers = {name: torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16") for name in NAMES}

    def train_loss(name: str) -> torch.Tensor:
        with autocast():
            noisy = schedulers[name].add_noise(x0, noise, timesteps)
            return F.mse_loss(predict(name, noisy, timesteps).float(), noise.float())

    def train_step(name: str) -> None:
        for _ in range(args.train_steps):
            scalers[name].scale(train_loss(name)).backward()
            scalers[name].step(optimizers[name])
            scalers[name].update()
            optimizers[name].zero_grad(set_to_none=True)

    # Sampling: denoising forwards, and whole pipelines of --sample_steps steps
    @torch.inference_mode()
    def denoise(name: str) -> None:
        t = torch.tensor(500, device=device)
        for _ in range(args.forward_steps):
            with autocast():
                predict(name, noise, t)

    pipeline = diffusers.DDPMPipeline(unet=forward["diffusers"], scheduler=schedulers["diffusers"])
    pipeline.set_progress_bar_config(disable=True)

    def sample(name: str) -> None:
        with autocast():
            if name == "ddpm":
                generate(forward["ddpm"], schedulers["ddpm"], batch, torch.Generator().manual_seed(0),
                         args.sample_steps)
            else:
                pipeline(batch, generator=torch.Generator().manual_seed(0), num_inference_steps=args.sample_steps,
                         output_type="np")

    print(f"{args.config}: {parameters:,} parameters; ddpm vs diffusers forward relative difference "
          f"{difference:.2e}; batch {batch}, {args.dtype}, {device}", flush=True)
    for model in plain.values():
        model.train()
    turns = dict(repeats=args.repeats, warmup=args.warmup, device=device, clock=clock)
    train_times = forward_times = sample_times = train_memory = held = forward_memory = None
    if "train" in args.measure:
        train_times = take_turns({n: lambda n=n: train_step(n) for n in NAMES}, **turns)
        print("training timed", flush=True)
    for model in plain.values():
        model.eval()
    if "forward" in args.measure:
        forward_times = take_turns({n: lambda n=n: denoise(n) for n in NAMES}, **turns)
        print("denoising forwards timed", flush=True)
    if "sample" in args.measure:
        sample_times = take_turns({n: lambda n=n: sample(n) for n in NAMES}, **turns)
        print("sampling timed", flush=True)
    if "memory" in args.measure:
        for model in plain.values():
            model.train()
        train_memory = {n: peak_memory_mib(lambda n=n: train_step(n), device) for n in NAMES}
        held = {n: held_for_backward_mib(lambda n=n: train_loss(n), device) for n in NAMES}
        for model in plain.values():
            model.eval()
        forward_memory = {n: peak_memory_mib(lambda n=n: denoise(n), device) for n in NAMES}
    forward_flops, train_flops = flops_per_image(config)

    # -------------------------------------------------------------------------
    # The table

    def rate(times: list[float], per_call: float) -> list[float]:
        return [per_call / s for s in times]

    def row(label: str, values: dict[str, list[float]], fmt: str, higher_is_better: bool) -> str:
        ours_v, theirs_v = statistics.median(values["ddpm"]), statistics.median(values["diffusers"])
        ratio = statistics.median([a / b for a, b in zip(values["ddpm"], values["diffusers"])])
        spread = " ".join(f"{min(v):{fmt}}-{max(v):{fmt}}" for v in values.values())
        better = "higher" if higher_is_better else "lower"
        return (f"| {label} | {ours_v:{fmt}} | {theirs_v:{fmt}} | {ratio:.2f}x ({better} is better) | "
                f"{spread} |")

    def single(label: str, values: dict[str, float | None], fmt: str) -> str:
        if any(v is None for v in values.values()):
            return f"| {label} | n/a | n/a | | |"
        ratio = values["ddpm"] / values["diffusers"] if values["diffusers"] else float("nan")
        return f"| {label} | {values['ddpm']:{fmt}} | {values['diffusers']:{fmt}} | {ratio:.2f}x (lower is better) | |"

    memory_kind = "CUDA allocated" if device.type == "cuda" else "RSS"
    second = "CPU-s" if args.clock == "cpu" else "s"
    lines = [
        f"| {args.config}, batch {batch}, {args.dtype}, {device_name(device)} | ddpm | diffusers | "
        "ddpm / diffusers | min-max (ddpm, diffusers) |",
        "|---|---|---|---|---|",
    ]
    if train_times:
        train_rates = {n: rate(train_times[n], batch * args.train_steps) for n in NAMES}
        lines.append(row(f"training, images/{second}", train_rates, ".2f", True))
    if forward_times:
        lines.append(row(f"denoising forward, steps/{second}",
                         {n: rate(forward_times[n], args.forward_steps) for n in NAMES}, ".2f", True))
    if sample_times:
        lines.append(row(f"generate() / DDPMPipeline, {args.sample_steps} steps, {second}", sample_times, ".2f",
                         False))
    if train_memory:
        lines += [
            single(f"training step, peak {memory_kind} increase, MiB", train_memory, ".0f"),
            single(f"denoising forward, peak {memory_kind} increase, MiB", forward_memory, ".0f"),
            single(f"activations held from forward to backward, {memory_kind}, MiB", held, ".0f"),
        ]
    peak = args.peak_tflops or (H100_SXM_BF16_TFLOPS if device.type == "cuda" else None)
    if train_times:
        achieved = {n: [train_flops * r / 1e12 for r in train_rates[n]] for n in NAMES}
        lines.append(row(f"training, achieved TFLOP/{second}", achieved, ".4f" if device.type == "cpu" else ".1f",
                         True))
        if peak is not None:
            mfu = {n: [100 * a / peak for a in achieved[n]] for n in NAMES}
            lines.append(row(f"training, MFU % of {peak:g} TFLOP/s", mfu, ".1f", True))

    options = [name for name in ("channels_last", "gradient_checkpointing", "force_layout_opt", "cudnn_benchmark")
               if getattr(args, name)]
    if args.compile:
        options.append("compile" if args.compile == "both" else "compile (ddpm only; diffusers eager)")
        if args.compile_mode != "default":
            options.append(f"compile_mode {args.compile_mode}")
    if args.fast_norm:
        options.append("fast_norm (ddpm only)")
    if args.adamw:
        options.append(f"AdamW {args.adamw}")
    notes = [
        f"- {parameters:,} parameters; forward {forward_flops / 1e9:.2f} GFLOP/image, training step "
        f"(forward + backward) {train_flops / 1e9:.2f} GFLOP/image (FlopCounterMode, ddpm's UNet)",
        f"- options, applied to both models unless said: {', '.join(options) or 'none'}"
        f"{'; autocast ' + args.dtype if dtype is not None else ''}",
        f"- medians of {args.repeats} alternating rounds after {args.warmup} warm-up; ratio = median of per-round "
        f"ratios; {args.train_steps} training step(s) and {args.forward_steps} forward(s) per timed call; "
        f"{'CPU time of this process' if args.clock == 'cpu' else 'wall-clock time'}",
        f"- forward relative difference ddpm vs diffusers on these weights: {difference:.1e}",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} CPU threads",
    ]
    if peak is not None:
        notes.append(f"- MFU against {peak:g} TFLOP/s"
                     f"{' (H100 SXM dense bf16; --peak_tflops to change)' if args.peak_tflops is None else ''}")
    table = "\n".join(lines + [""] + notes)
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n")

    if args.profile:
        for name in NAMES:
            plain[name].train()
            with torch.profiler.profile() as profiler:
                train_step(name)
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"\n{name}: one training step, top {args.profile} ops by self time")
            print(profiler.key_averages().table(sort_by=sort, row_limit=args.profile))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU {platform.processor()}"


if __name__ == "__main__":
    main()
