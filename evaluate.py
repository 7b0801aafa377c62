"""Evaluate a trained DDPM: the variational bound in bits/dim (the NLL of the paper's Table 1), or the shapes score
of its samples (for a model of the built-in shapes).

$ python evaluate.py ddpm-output --builtin_data --num_images 1000
$ python evaluate.py ddpm-output --metric shapes --num_images 256
$ python evaluate.py google/ddpm-cifar10-32 --dataset_name cifar10 --split test --num_images 10000 \\
      --output_json cifar10.json --plot cifar10.png
Under torchrun the images are split across the processes, one GPU each, and the figures gathered:
$ torchrun --standalone --nproc_per_node=8 evaluate.py MODEL_DIR --dataset_name cifar10 --num_images 10000

bits/dim: all T terms of the bound (Eq. 5) and the prior term, with the EMA weights the folder holds, clipped
x_0 predictions and the discretised decoder (Eq. 13); see ddpm/likelihood.py. The noise comes from one CPU
generator seeded with --seed, one draw of the batch's shape per timestep, for t = T..1, batch after batch: the
order of the original code, so a figure is reproducible on any device. Under torchrun, process r > 0 seeds its
generator from (--seed, r), so a figure depends on the number of processes too.
"""

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ddpm import DDIMScheduler, DDPMScheduler, PipelineLoadError, distributed, load_pipeline
from ddpm.data import HELD_OUT_SEED, DataError, TrainingImages, load_images
from ddpm.idx import has_split
from ddpm.likelihood import VARIANCES, VariationalBound, model_variance_of, x0_from_pixels
from ddpm.pipeline_io import pipeline_folder
from ddpm.sampling import generate_in_batches
from ddpm.shapes_score import VALID_RMSE, fit, score


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("model_dir", metavar="MODEL_DIR", help="DDPMPipeline folder or Hugging Face Hub repo id")
    add("--metric", choices=["bpd", "shapes"], default="bpd",
        help="bpd: the bound in bits/dim on data; shapes: the shapes score of samples (default: bpd)")
    add("--train_data_dir", default=None,
        help="bpd on a local folder of images, or of MNIST-format IDX files (their test split by default)")
    add("--dataset_name", default=None, help="bpd on a Hugging Face Hub dataset")
    add("--split", default=None,
        help="the split of a Hub dataset (default: test) or of a folder of IDX files (train or test; default: test if "
             "it has t10k-* files)")
    add("--builtin_data", action="store_true", help=f"bpd on built-in shapes images of seed {HELD_OUT_SEED}, "
                                                    "which no training run (with --seed >= 0) has seen")
    add("--num_images", type=int, default=None,
        help="images to evaluate, the first of the data, or samples to draw (default: 1000 for bpd, 256 for shapes)")
    add("--batch_size", type=int, default=64, help="images per forward pass, per process (default: 64)")
    add("--seed", type=int, default=0, help="seed of the noise (default: 0)")
    add("--variance", choices=VARIANCES, default=None,
        help="the reverse process variance sigma_t^2: beta~_t or beta_t (default: the scheduler config's)")
    add("--num_inference_steps", type=int, default=None,
        help="denoising steps of the samples for --metric shapes (default: T with ddpm, 50 with ddim)")
    add("--sampler", choices=["ddpm", "ddim"], default="ddpm",
        help="how --metric shapes draws its samples: ddpm, or ddim (50 steps unless --num_inference_steps)")
    add("--output_json", default=None, help="write the figures to this JSON file")
    add("--plot", default=None, help="draw the bits per timestep into this image file (needs matplotlib)")
    add("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the UNet runs (default: cuda if available, else cpu)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    datasets = [name for name in ("train_data_dir", "dataset_name", "builtin_data") if getattr(args, name)]
    if len(datasets) > 1:
        parser.error(f"{' and '.join('--' + name for name in datasets)} name {len(datasets)} datasets; pass one")
    if args.metric == "bpd" and not datasets:
        parser.error("--metric bpd needs data: pass --train_data_dir, --dataset_name or --builtin_data")
    if args.metric == "shapes" and datasets:
        parser.error(f"--metric shapes scores samples the model draws; it takes no --{datasets[0]}")
    if args.split is not None and not (args.dataset_name or args.train_data_dir):
        parser.error(f"--split {args.split!r} picks a split of a --dataset_name or of a folder of IDX files; "
                     "neither was given")
    if args.split is None:  # the test split where there is one
        idx_test = args.train_data_dir and Path(args.train_data_dir).is_dir() and has_split(args.train_data_dir, "test")
        args.split = "test" if args.dataset_name or idx_test else "train"
    if args.metric == "bpd" and args.sampler != "ddpm":
        parser.error(f"--sampler {args.sampler} draws samples for --metric shapes; the bound of --metric bpd has none")
    if args.metric == "shapes" and args.plot:
        parser.error("--plot draws the bits per timestep: it goes with --metric bpd")
    args.num_images = args.num_images if args.num_images is not None else {"bpd": 1000, "shapes": 256}[args.metric]
    for name in ("num_images", "batch_size", "num_inference_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here; use --device cpu")
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            parser.error("--plot needs matplotlib: pip install matplotlib (or the project's [plot] extra)")
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        if Path(args.plot).suffix.lower().lstrip(".") not in formats:
            parser.error(f"--plot {args.plot!r}: unknown image file extension; use one of .{', .'.join(formats)}")
    return args


def fail(message: str) -> NoReturn:
    """End the run with a one-line error, in argparse's format."""
    sys.exit(f"evaluate.py: error: {message}")


def resolution_of(config: dict, model_dir: str) -> int:
    """The square image size the UNet takes, or a one-line error saying why it takes none."""
    size = config["sample_size"]
    if size is None:
        fail(f"the UNet config of {model_dir!r} has no sample_size, so the image size is unknown")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            fail(f"the UNet of {model_dir!r} takes {size} images; evaluate.py takes square ones")
        size = size[0]
    levels = len(config["block_out_channels"])
    if size % 2 ** (levels - 1):
        fail(f"the UNet of {model_dir!r} has sample_size {size}, which its {levels} levels cannot take "
             f"(it must be divisible by {2 ** (levels - 1)})")
    if config["in_channels"] not in (1, 3) or config["out_channels"] != config["in_channels"]:
        fail(f"the UNet of {model_dir!r} has {config['in_channels']} input and {config['out_channels']} output "
             "channels; evaluate.py takes 1 or 3 of each, the same (no learned variance)")
    return size


def noise_generator(seed: int, rank: int) -> torch.Generator:
    """The CPU generator of the noise: seeded with --seed on rank 0, from (--seed, rank) on the others."""
    seed = seed if rank == 0 else random.Random(f"evaluate/{seed}/{rank}").getrandbits(63)
    return torch.Generator().manual_seed(seed)


def shard(count: int, ctx: distributed.Context) -> range:
    """This process's consecutive share of `count` images."""
    return range(ctx.rank * count // ctx.world_size, (ctx.rank + 1) * count // ctx.world_size)


def evaluate_bpd(args: argparse.Namespace, unet, scheduler, resolution: int, ctx: distributed.Context) -> None:
    variance = args.variance or model_variance_of(scheduler.config["variance_type"])
    try:
        source = load_images(args.dataset_name, None, args.train_data_dir, None, resolution, HELD_OUT_SEED,
                             builtin_size=args.num_images, split=args.split)
        dataset = TrainingImages(source, resolution, unet.config["in_channels"], center_crop=True, random_flip=False)
    except DataError as error:
        fail(str(error))
    count = min(args.num_images, len(source))
    if count < args.num_images and ctx.is_main:
        tqdm.write(f"{source.description}: evaluating all {count} images (fewer than --num_images {args.num_images})")
    indices = shard(count, ctx)
    # resized and center-cropped as training does (no flips); each batch becomes x_0 = k / 127.5 - 1 in float64
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=[(i, 0) for i in indices])
    try:
        bound = VariationalBound(scheduler, variance, device=ctx.device)
    except ValueError as error:  # a schedule whose bound cannot be computed (T < 2, zero terminal SNR)
        fail(f"{args.model_dir}: {error}")
    generator = noise_generator(args.seed, ctx.rank)
    T = bound.T
    prior_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    terms_sum = torch.zeros(T, dtype=torch.float64, device=ctx.device)
    progress = tqdm(total=len(loader) * T, desc=f"bits/dim of {count} images", unit="step", disable=not ctx.is_main,
                    dynamic_ncols=True)
    start = time.perf_counter()
    for images in loader:
        terms = bound.evaluate(unet, x0_from_pixels(images).to(ctx.device), generator, progress)
        prior_sum += terms.prior.sum()
        terms_sum += terms.terms.sum(dim=0)
    progress.close()
    gathered = distributed.gather_to_main(ctx, (prior_sum.item(), terms_sum.cpu()))
    if not ctx.is_main:
        return
    seconds = time.perf_counter() - start
    prior = sum(g[0] for g in gathered) / count
    per_timestep = (sum(g[1] for g in gathered) / count).tolist()
    figures = {"bits_per_dim": prior + sum(per_timestep), "prior_bpd": prior, "decoder_bpd": per_timestep[0],
               "kl_bpd": sum(per_timestep[1:]), "num_images": count, "variance": variance,
               "per_timestep_bpd": per_timestep}
    if args.output_json:
        write_json(args.output_json, figures)
    if args.plot:
        plot_bits_per_timestep(per_timestep, prior, args.plot)
        print(f"wrote {args.plot}")
    print(f"{source.description}: {count} images x {T} timesteps in {seconds:.1f} s on {ctx.world_size} "
          f"process(es) ({count / seconds:.3g} images/s), variance {variance}")
    print(f"bits/dim: {figures['bits_per_dim']:.4f} (prior {prior:.3g}, decoder L_0 {figures['decoder_bpd']:.4f}, "
          f"KL {figures['kl_bpd']:.4f}) over {count} images")


def evaluate_shapes(args: argparse.Namespace, unet, scheduler, ctx: distributed.Context) -> None:
    if unet.config["in_channels"] != 3:
        fail(f"the shapes score is for RGB models of the built-in shapes; this UNet has "
             f"{unet.config['in_channels']} channel(s)")
    generator = noise_generator(args.seed, ctx.rank)
    count = len(shard(args.num_images, ctx))
    found = fit(generate_in_batches(unet, scheduler, count, generator, args.num_inference_steps, args.batch_size,
                                    progress=ctx.is_main)) if count else None
    gathered = distributed.gather_to_main(ctx, None if found is None else (found.classes, found.rmse))
    if not ctx.is_main:
        return
    gathered = [g for g in gathered if g is not None]
    result = score(torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered]))
    if args.output_json:
        write_json(args.output_json, {"valid_fraction": result.valid_fraction,
                                      "classes_covered": result.classes_covered,
                                      "tv_to_uniform": result.tv_to_uniform, "median_rmse": result.median_rmse,
                                      "num_images": result.num_images,
                                      "valid_rmse": VALID_RMSE, "sampler": args.sampler,
                                      "num_inference_steps": args.num_inference_steps})
    print(f"shapes score: {result} over {result.num_images} samples ({args.sampler}, {args.num_inference_steps} "
          "denoising steps)")


def write_json(path: str, figures: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {path}")


def plot_bits_per_timestep(per_timestep: list[float], prior: float, path: str) -> None:
    """The bits of each term L_{t-1} against t, and the rate as the reverse process runs (the paper's Sec. 4.3)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    T = len(per_timestep)
    figure, (terms_axis, rate_axis) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    terms_axis.semilogy(range(1, T + 1), per_timestep)
    terms_axis.set(xlabel="t", ylabel="bits/dim", title=f"L_(t-1): KL terms, decoder L_0 at t = 1; prior {prior:.2g}")
    # rate: the bits sent from x_T down to x_t (L_T + L_{T-1} + ... + L_t); the decoder L_0 is the distortion
    rate = [prior + sum(per_timestep[T - k:]) for k in range(T)]
    rate_axis.plot(range(T), rate)
    total = rate[-1] + per_timestep[0]
    rate_axis.set(xlabel="reverse process steps (T - t)", ylabel="bits/dim",
                  title=f"rate {rate[-1]:.3f} + distortion L_0 {per_timestep[0]:.3f} = {total:.3f}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


@record  # under torchrun, a failing rank's traceback goes into the launcher's error summary
def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        unet, scheduler = load_pipeline(pipeline_folder(args.model_dir), dtype=torch.float32,
                                        scheduler_class=DDIMScheduler if args.sampler == "ddim" else DDPMScheduler)
    except PipelineLoadError as error:
        fail(str(error))
    resolution = resolution_of(unet.config, args.model_dir)
    T = scheduler.config["num_train_timesteps"]
    args.num_inference_steps = args.num_inference_steps or (50 if args.sampler == "ddim" else T)
    if args.metric == "shapes" and args.num_inference_steps > T:
        fail(f"--num_inference_steps {args.num_inference_steps} exceeds the {T} training timesteps of "
             f"{args.model_dir!r}")
    ctx = distributed.setup(args.device, timeout_s=1800)
    unet.to(ctx.device).eval()  # dropout off; the folder's weights are the EMA ones when training used EMA
    if args.metric == "bpd":
        evaluate_bpd(args, unet, scheduler, resolution, ctx)
    else:
        evaluate_shapes(args, unet, scheduler, ctx)
    distributed.cleanup(ctx)


if __name__ == "__main__":
    main()
