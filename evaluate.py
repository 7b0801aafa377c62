"""Evaluate a trained DDPM: the variational bound in bits/dim (the NLL of the paper's Table 1), the FID and KID of
its samples against its training data, or the shapes score of its samples (for a model of the built-in shapes).

$ python evaluate.py ddpm-output --builtin_data --num_images 1000
$ python evaluate.py ddpm-output --metric shapes --num_images 256
$ python evaluate.py conditional-output --metric shapes --num_images 240 --guidance_scale 2   (+ conditional accuracy)
$ python evaluate.py ddpm-output --metric fid --train_data_dir fashion-mnist --num_images 10000 --sampler ddim
$ python evaluate.py --metric fid --images samples/ --reference cifar10-train/   (or a .npz of reference statistics)
$ python evaluate.py google/ddpm-cifar10-32 --dataset_name cifar10 --split test --num_images 10000 \\
      --output_json cifar10.json --plot cifar10.png
Under torchrun the images are split across the processes, one GPU each, and the figures gathered:
$ torchrun --standalone --nproc_per_node=8 evaluate.py MODEL_DIR --dataset_name cifar10 --num_images 10000

bits/dim: all T terms of the bound (Eq. 5) and the prior term, with the EMA weights the folder holds, clipped
x_0 predictions and the discretised decoder (Eq. 13); see ddpm/likelihood.py. The noise comes from one CPU
generator seeded with --seed, one draw of the batch's shape per timestep, for t = T..1, batch after batch: the
order of the original code, so a figure is reproducible on any device. Under torchrun, process r > 0 seeds its
generator from (--seed, r), so a figure depends on the number of processes too.

fid: --num_images samples, image i drawn from its own generator seeded from (--seed, i) as sample.py --outdir draws
it, so the figure does not depend on the batch size or the number of processes; their Inception features against
the reference statistics of the training data (resized and center-cropped to the model's resolution, as training
sees them), cached as a .npz in --fid_cache and reused while the data, settings and network are the same. KID
beside it. The network, the resize and the formulas: ddpm/inception.py, ddpm/fid.py and docs/fid.md.
"""

import argparse
import importlib.util
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ddpm import PipelineLoadError, distributed, load_pipeline
from ddpm.class_conditional import balanced_labels, conditional_accuracy, generate_for_labels
from ddpm.data import HELD_OUT_SEED, DataError, ShapesSource, TrainingImages, load_images
from ddpm.files import WriteError, reported_as_write_error, write_atomically
from ddpm.fid import (ReferenceImages, ReferenceStatistics, check_comparable, compare, default_cache_dir,
                      features_of_dataset, features_of_images, reference_statistics)
from ddpm.idx import has_split
from ddpm.inception import RESIZES, InceptionError, load_inception
from ddpm.likelihood import VARIANCES, VariationalBound, model_variance_of, x0_from_pixels
from ddpm.pipeline_io import pipeline_folder
from ddpm.sampling import DEFAULT_STEPS, SAMPLERS, generate, generate_in_batches, image_generators, sampling_scheduler
from ddpm.shapes_score import CLASSES, VALID_RMSE, fit, score


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("model_dir", metavar="MODEL_DIR", nargs="?", default=None,
        help="DDPMPipeline folder or Hugging Face Hub repo id (none with --images)")
    add("--metric", choices=["bpd", "fid", "shapes"], default="bpd",
        help="bpd: the bound in bits/dim on data; fid: FID and KID of samples against data; shapes: the shapes "
             "score of samples (default: bpd)")
    add("--train_data_dir", default=None,
        help="bpd on a local folder of images, or of MNIST-format IDX files (their test split by default)")
    add("--dataset_name", default=None, help="bpd on a Hugging Face Hub dataset")
    add("--split", default=None,
        help="the split of a Hub dataset (default: test) or of a folder of IDX files (train or test; default: test if "
             "it has t10k-* files)")
    add("--builtin_data", action="store_true", help=f"bpd on built-in shapes images of seed {HELD_OUT_SEED}, "
                                                    "which no training run (with --seed >= 0) has seen; fid against "
                                                    "the 2,048 built-in shapes train.py trains on")
    add("--num_images", type=int, default=None,
        help="images to evaluate, the first of the data, or samples to draw (default: 1000 for bpd, 10000 for fid, "
             "256 for shapes; with --images all of them)")
    add("--batch_size", type=int, default=64, help="images per forward pass, per process (default: 64)")
    add("--seed", type=int, default=0, help="seed of the noise (default: 0)")
    add("--variance", choices=VARIANCES, default=None,
        help="the reverse process variance sigma_t^2: beta~_t or beta_t (default: the scheduler config's)")
    add("--num_inference_steps", type=int, default=None,
        help="denoising steps of the samples for --metric fid and shapes (default: T with ddpm, 50 with ddim, "
             "20 with dpm and dpm-sde)")
    add("--sampler", choices=list(SAMPLERS), default="ddpm",
        help="how --metric fid and shapes draw their samples: DDPM, DDIM, DPM-Solver++ or SDE-DPM-Solver++")
    add("--guidance_scale", type=float, default=None,
        help="shapes: a class-conditional model's classifier-free guidance, 1 the conditional model alone; its "
             "samples are balanced over the classes and scored for the conditional accuracy too (default: 1)")
    add("--images", default=None, help="fid: a folder of images to compare with --reference, instead of samples")
    add("--reference", default=None,
        help="fid: the reference, a folder of images (as they are) or a .npz of statistics (ours or pytorch-fid's), "
             "instead of --dataset_name, --train_data_dir or --builtin_data")
    add("--num_reference", type=int, default=None, help="fid: the first N reference images (default: all)")
    add("--builtin_seed", type=int, default=0,
        help="fid --builtin_data: the built-in shapes train.py draws with this --seed (default: 0)")
    add("--inception", default=None,
        help="fid: a TorchScript pool_3 network (float32 N x 3 x 299 x 299 of (p - 128) / 128 to N x 2048), "
             "instead of torch-fidelity's, which is downloaded on first use; docs/fid.md")
    add("--resize", choices=RESIZES, default=RESIZES[0],
        help="fid: how images reach 299 x 299: legacy_tensorflow (TF1 bilinear, the papers' code), clean "
             "(clean-fid's PIL bicubic) or legacy_pytorch (pytorch-fid's bilinear) (default: legacy_tensorflow)")
    add("--fid_cache", default=None,
        help=f"fid: where reference statistics are cached (default: {default_cache_dir()})")
    add("--num_workers", type=int, default=0, help="fid: processes that read and resize images (default: 0)")
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
    check_fid_args(parser, args, datasets)
    if args.model_dir is None and args.images is None:
        parser.error("MODEL_DIR is missing (only --metric fid --images A --reference B goes without a model)")
    if args.metric == "bpd" and not datasets:
        parser.error("--metric bpd needs data: pass --train_data_dir, --dataset_name or --builtin_data")
    if args.metric == "shapes" and datasets:
        parser.error(f"--metric shapes scores samples the model draws; it takes no --{datasets[0]}")
    if args.split is not None and not (args.dataset_name or args.train_data_dir):
        parser.error(f"--split {args.split!r} picks a split of a --dataset_name or of a folder of IDX files; "
                     "neither was given")
    if args.split is None and args.metric == "fid":
        args.split = "train"  # FID compares with the training set, as the papers do
    if args.split is None:  # the test split where there is one
        idx_test = args.train_data_dir and Path(args.train_data_dir).is_dir() and has_split(args.train_data_dir, "test")
        args.split = "test" if args.dataset_name or idx_test else "train"
    if args.metric == "bpd" and args.sampler != "ddpm":
        parser.error(f"--sampler {args.sampler} draws samples for --metric shapes; the bound of --metric bpd has none")
    if args.metric != "bpd" and args.plot:
        parser.error("--plot draws the bits per timestep: it goes with --metric bpd")
    if args.guidance_scale is not None and args.metric != "shapes":
        parser.error(f"--guidance_scale guides the samples of --metric shapes, not {args.metric}")
    if args.guidance_scale is not None and args.guidance_scale < 0:
        parser.error(f"--guidance_scale must be >= 0, got {args.guidance_scale}")
    if args.metric != "bpd" and args.variance:
        parser.error(f"--variance sets the bound's sigma_t^2: it goes with --metric bpd, not {args.metric}")
    defaults = {"bpd": 1000, "shapes": 256, "fid": None if args.images else 10000}
    args.num_images = args.num_images if args.num_images is not None else defaults[args.metric]
    if args.metric == "fid" and args.num_images is not None and args.num_images < 2:
        parser.error(f"--num_images must be at least 2 for fid (a covariance needs two images), got {args.num_images}")
    for name in ("num_images", "batch_size", "num_inference_steps", "num_reference"):
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


def check_fid_args(parser: argparse.ArgumentParser, args: argparse.Namespace, datasets: list[str]) -> None:
    """The flags of --metric fid: which reference, which images, and none of them with another metric."""
    fid_only = [name for name in ("images", "reference", "num_reference", "inception", "fid_cache")
                if getattr(args, name) is not None]
    if args.metric != "fid":
        if fid_only:
            parser.error(f"--{fid_only[0]} goes with --metric fid, not {args.metric}")
        return
    if args.images is not None:
        if args.model_dir is not None:
            parser.error(f"--images compares a folder with --reference; it takes no MODEL_DIR (got {args.model_dir!r})")
        if args.reference is None:
            parser.error("--images A needs --reference B: a folder of images or a .npz of statistics")
        if not Path(args.images).is_dir():
            parser.error(f"--images {args.images!r} is not a folder")
    if args.reference is not None and datasets:
        parser.error(f"--reference and --{datasets[0]} both name the reference; pass one")
    if args.reference is None and not datasets and args.model_dir is not None:
        parser.error("--metric fid needs a reference: the training data (--dataset_name, --train_data_dir or "
                     "--builtin_data) or --reference (a folder of images or a .npz of statistics)")
    if args.reference is not None and not (Path(args.reference).is_dir() or Path(args.reference).is_file()):
        parser.error(f"--reference {args.reference!r}: no such folder or file")
    if args.reference is not None and Path(args.reference).is_file() and args.num_reference is not None:
        parser.error(f"--num_reference picks reference images; the statistics in {args.reference!r} are fixed")
    if args.num_workers < 0:
        parser.error(f"--num_workers must be at least 0, got {args.num_workers}")


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
    summary = (f"{source.description}: {count} images x {T} timesteps in {seconds:.1f} s on {ctx.world_size} "
               f"process(es) ({count / seconds:.3g} images/s), variance {variance}\n"
               f"bits/dim: {figures['bits_per_dim']:.4f} (prior {prior:.3g}, decoder L_0 {figures['decoder_bpd']:.4f}, "
               f"KL {figures['kl_bpd']:.4f}) over {count} images")
    write_outputs(args, figures, summary, plot=lambda path: plot_bits_per_timestep(per_timestep, prior, path))


CLASS_NAMES = ShapesSource.CLASS_NAMES  # the built-in shapes' classes: label k is named CLASS_NAMES[k]


def is_conditional(unet) -> bool:
    """Whether the UNet has a table of class embeddings (train.py --class_conditional)."""
    return unet.config["num_class_embeds"] is not None and unet.config["class_embed_type"] is None


def evaluate_shapes(args: argparse.Namespace, unet, scheduler, ctx: distributed.Context) -> None:
    if unet.config["in_channels"] != 3:
        fail(f"the shapes score is for RGB models of the built-in shapes; this UNet has "
             f"{unet.config['in_channels']} channel(s)")
    if is_conditional(unet) and unet.config["num_class_embeds"] - 1 != len(CLASSES):
        fail(f"the shapes score asks for the {len(CLASSES)} classes of the built-in shapes; this class-conditional "
             f"UNet has {unet.config['num_class_embeds'] - 1}")
    if args.guidance_scale is not None and not is_conditional(unet):
        fail(f"--guidance_scale needs a class-conditional model; {args.model_dir!r} has no class table")
    args.guidance_scale = 1.0 if args.guidance_scale is None else args.guidance_scale
    generator = noise_generator(args.seed, ctx.rank)
    indices = shard(args.num_images, ctx)
    # a class-conditional model: sample i of class i mod K (balanced), guided with --guidance_scale
    labels = balanced_labels(indices, unet.config["num_class_embeds"] - 1) if is_conditional(unet) else None
    if not indices:
        samples = None
    elif labels is None:
        samples = generate_in_batches(unet, scheduler, len(indices), generator, args.num_inference_steps,
                                      args.batch_size, progress=ctx.is_main)
    else:
        samples = generate_for_labels(unet, scheduler, labels, generator, args.num_inference_steps,
                                      args.guidance_scale, args.batch_size, progress=ctx.is_main)
    found = fit(samples) if samples is not None else None
    gathered = distributed.gather_to_main(ctx, None if found is None else (found.classes, found.rmse, labels))
    if not ctx.is_main:
        return
    gathered = [g for g in gathered if g is not None]
    classes, rmse = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
    result = score(classes, rmse)
    figures = {"valid_fraction": result.valid_fraction, "classes_covered": result.classes_covered,
               "tv_to_uniform": result.tv_to_uniform, "median_rmse": result.median_rmse,
               "num_images": result.num_images, "valid_rmse": VALID_RMSE, "sampler": args.sampler,
               "num_inference_steps": args.num_inference_steps}
    conditional = ""
    if labels is not None:
        asked = torch.cat([g[2] for g in gathered])
        per_class = {name: conditional_accuracy(classes[asked == k], asked[asked == k])
                     for k, name in enumerate(CLASS_NAMES) if (asked == k).any()}
        figures.update(conditional_accuracy=conditional_accuracy(classes, asked), guidance_scale=args.guidance_scale,
                       conditional_accuracy_per_class=per_class)
        conditional = (f", conditional accuracy {figures['conditional_accuracy']:.3f} (guidance scale "
                       f"{args.guidance_scale:g}, classes balanced)")
    write_outputs(args, figures, f"shapes score: {result}{conditional} over {result.num_images} samples "
                                 f"({args.sampler}, {args.num_inference_steps} denoising steps)")


def fid_reference(args: argparse.Namespace, network, resolution: int | None, channels: int | None,
                  ctx: distributed.Context) -> ReferenceStatistics | None:
    """The reference statistics (on the main process): a .npz as it is, else computed once and cached."""
    if args.reference and Path(args.reference).is_file():
        reference = ReferenceStatistics.load(args.reference) if ctx.is_main else None
        if reference is not None:
            check_comparable(reference, network, args.resize)
        return reference
    if args.reference:
        images = ReferenceImages.of_folder(args.reference, args.num_reference)
    else:
        data_dir = args.train_data_dir and str(Path(args.train_data_dir).resolve())  # the cache is found from anywhere
        source = load_images(args.dataset_name, None, data_dir, None, resolution, args.builtin_seed,
                             builtin_size=args.num_reference or 2048, split=args.split)
        images = ReferenceImages.of_data(source, resolution, channels, args.num_reference, args.split)
    start = time.perf_counter()
    reference = reference_statistics(images, network, args.resize, args.fid_cache, args.batch_size, args.num_workers,
                                     ctx)
    if ctx.is_main:
        print(f"reference: {reference.describe()}, ready in {time.perf_counter() - start:.1f} s")
    return reference


def model_step(model_dir: str) -> int | None:
    """The training step train.py wrote into the folder's model card ("step 1,200 of 5,000"), if it did."""
    card = Path(model_dir) / "README.md"
    found = re.search(r"; step ([\d,]+) of [\d,]+\.", card.read_text()) if card.is_file() else None
    return int(found[1].replace(",", "")) if found else None


def evaluate_fid(args: argparse.Namespace, unet, scheduler, ctx: distributed.Context) -> None:
    """FID and KID of --num_images samples of the model (or of the --images folder) against the reference."""
    try:
        network = load_inception(args.inception, ctx.device)
        resolution = resolution_of(unet.config, args.model_dir) if unet is not None else None
        channels = None if unet is None else unet.config["in_channels"]
        reference = fid_reference(args, network, resolution, channels, ctx)
        if unet is None:
            images = ReferenceImages.of_folder(args.images, args.num_images)
            count, sampling_s = len(images), 0.0
            start = time.perf_counter()
            features = features_of_dataset(images, shard(count, ctx), network, args.resize, args.batch_size,
                                           args.num_workers, progress=ctx.is_main, desc=f"features of {count} images")
            features_s = time.perf_counter() - start
        else:
            count = args.num_images
            features, sampling_s, features_s = sample_features(args, unet, scheduler, network, ctx)
    except (DataError, InceptionError) as error:
        fail(str(error))
    gathered = distributed.gather_to_main(ctx, (features, sampling_s, features_s))
    if not ctx.is_main:
        return
    start = time.perf_counter()
    figures = compare(np.concatenate([g[0] for g in gathered]), reference)
    statistics_s = time.perf_counter() - start
    sampling_s, features_s = max(g[1] for g in gathered), max(g[2] for g in gathered)
    figures.update(reference={"description": reference.describe(), **reference.provenance,
                              "path": str(reference.path) if reference.path else None},
                   resize=args.resize, inception=network.sha256,
                   seconds={"sampling": sampling_s, "features": features_s, "statistics": statistics_s})
    if unet is not None:
        figures.update(model=args.model_dir, sampler=args.sampler, steps=args.num_inference_steps, seed=args.seed,
                       model_step=model_step(args.model_dir))
        what = f"{count} samples ({args.sampler}, {args.num_inference_steps} steps, seed {args.seed})"
        print(f"sampled {count} images in {sampling_s:.1f} s ({count / max(sampling_s, 1e-9):.3g} images/s) on "
              f"{ctx.world_size} process(es)")
    else:
        what = f"{count} images of {args.images}"
    print(f"Inception features of {count} images in {features_s:.1f} s ({count / max(features_s, 1e-9):.3g} "
          f"images/s); FID and KID from them in {statistics_s:.1f} s")
    kid = "n/a (the reference has no features)" if figures["kid_mean"] is None else \
        f"{figures['kid_mean']:.5f} +- {figures['kid_std']:.5f}"
    write_outputs(args, figures, f"FID {figures['fid']:.3f}, KID {kid}: {what} against {reference.describe()}; "
                                 f"Inception {network.sha256[:12]}, resize {args.resize}")


def sample_features(args: argparse.Namespace, unet, scheduler, network, ctx: distributed.Context):
    """This process's share of the samples, drawn as sample.py --outdir draws them, as Inception features; and the
    seconds spent sampling and computing features."""
    mine = list(shard(args.num_images, ctx))
    features, sampling_s, features_s = [], 0.0, 0.0
    for start in tqdm(range(0, len(mine), args.batch_size), desc=f"samples and features ({len(mine)} images)",
                      unit="batch", disable=not ctx.is_main, dynamic_ncols=True):
        indices = mine[start:start + args.batch_size]
        clock = time.perf_counter()
        images = generate(unet, scheduler, len(indices), image_generators(args.seed, indices),
                          args.num_inference_steps)
        sampling_s += time.perf_counter() - clock
        clock = time.perf_counter()
        features.append(features_of_images(images, network, args.resize, args.batch_size))
        features_s += time.perf_counter() - clock
    return (np.concatenate(features) if features else np.zeros((0, 2048), np.float32)), sampling_s, features_s


def write_outputs(args: argparse.Namespace, figures: dict, summary: str, plot=None) -> None:
    """--output_json (and --plot, by `plot(path)`), then the summary as the last lines. A failed write (a full disk)
    prints the summary first, then ends the run with one line: the figures are never lost."""
    try:
        if args.output_json:
            write_json(args.output_json, figures)
        if plot is not None and args.plot:
            plot(args.plot)
            print(f"wrote {args.plot}")
    except WriteError as error:
        print(summary)
        fail(str(error))
    print(summary)


def write_file(path: str, write) -> None:
    """`write(tmp)`, then renamed to `path`: whole or not at all; a failure is a WriteError, one line."""
    with reported_as_write_error(Path(path).name, Path(path).parent):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(Path(path), write)


def write_json(path: str, figures: dict) -> None:
    write_file(path, lambda tmp: tmp.write_text(json.dumps(figures, indent=2) + "\n"))
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
    try:
        write_file(path, lambda tmp: figure.savefig(tmp, dpi=120, format=Path(path).suffix[1:] or "png"))
    finally:
        plt.close(figure)


@record  # under torchrun, a failing rank's traceback goes into the launcher's error summary
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.images is not None:  # two folders, no model
        ctx = distributed.setup(args.device, timeout_s=1800)
        evaluate_fid(args, None, None, ctx)
        distributed.cleanup(ctx)
        return
    try:
        unet, scheduler = load_pipeline(pipeline_folder(args.model_dir), dtype=torch.float32,
                                        scheduler_class=SAMPLERS[args.sampler])
        scheduler = sampling_scheduler(args.sampler, scheduler.config)  # with the sampler's options
    except PipelineLoadError as error:
        fail(str(error))
    resolution = resolution_of(unet.config, args.model_dir)
    T = scheduler.config["num_train_timesteps"]
    default_steps = T if args.sampler == "ddpm" else DEFAULT_STEPS[args.sampler]
    args.num_inference_steps = args.num_inference_steps or default_steps
    if args.metric != "bpd" and args.num_inference_steps > T:
        fail(f"--num_inference_steps {args.num_inference_steps} exceeds the {T} training timesteps of "
             f"{args.model_dir!r}")
    ctx = distributed.setup(args.device, timeout_s=1800)
    unet.to(ctx.device).eval()  # dropout off; the folder's weights are the EMA ones when training used EMA
    if args.metric == "bpd":
        evaluate_bpd(args, unet, scheduler, resolution, ctx)
    elif args.metric == "fid":
        evaluate_fid(args, unet, scheduler, ctx)
    else:
        evaluate_shapes(args, unet, scheduler, ctx)
    distributed.cleanup(ctx)


if __name__ == "__main__":
    main()
