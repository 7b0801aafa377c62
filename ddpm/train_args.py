"""train.py's command line: its flags, the preset a run starts from, and the checks that turn a bad value into
a one-line error before anything starts. Flags typed on the command line override the preset's values."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from ddpm.data import CACHE_BYTES, DataError
from ddpm.presets import PRESETS
from ddpm.sampling import DEFAULT_STEPS, SAMPLERS
from ddpm.unet import UNet2DModel

DESCRIPTION = ("Train a DDPM image model. A preset (--preset) sets the recipe; each flag typed overrides its value "
               "(the defaults below are the quickstart preset's where it sets one).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="quickstart", choices=sorted(PRESETS),
                   help="a named recipe; flags given explicitly override its values (defaults shown are quickstart's)")

    add = p.add_argument_group("data").add_argument
    add("--dataset_name", default=None, help="a Hugging Face Hub dataset; with neither this nor --train_data_dir: "
        "the built-in shapes")
    add("--dataset_config_name", default=None, help="the Hub dataset's config name")
    add("--train_data_dir", default=None, help="a local folder of images, or of MNIST-format IDX files (train-*)")
    add("--builtin_data", action="store_true", help="the built-in shapes, also with a preset that names other data")
    add("--cache_dir", default=None,
        help="where datasets caches Hub downloads, and --eval_fid_images its reference statistics (else in "
             "output_dir)")
    add("--resolution", type=int, default=None, help="image size; must be divisible by 2^(levels-1)")
    add("--center_crop", action="store_true", help="center-crop instead of random-crop after resizing")
    add("--random_flip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips")
    add("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes per device")
    add("--cache_images", action=argparse.BooleanOptionalAction, default=True,
        help=f"keep the decoded images in memory when they fit in {CACHE_BYTES / 2**30:g} GiB per process")
    add("--label_column", default="label", help="the Hub dataset's column of class labels (--class_conditional)")
    add("--device_data", action=argparse.BooleanOptionalAction, default=True,
        help="draw the batches from the cached images on the training device, without a DataLoader (needs "
             "--cache_images and no random crops; else one line says why)")

    add = p.add_argument_group("model and algorithm").add_argument
    add("--model_config_name_or_path", default=None, help="a UNet config.json (or a folder holding one)")
    add("--prediction_type", default="epsilon", choices=["epsilon", "sample", "v_prediction"],
        help="what the UNet predicts: eps (the paper's), x_0, or v")
    add("--snr_gamma", type=float, default=None,
        help="min-SNR-gamma loss weighting (Hang et al. 2023); 0 or not given: off, the paper's L_simple")
    add("--class_conditional", action="store_true",
        help="learn each image's class too, for classifier-free guidance (Ho & Salimans 2022) when sampling")
    add("--class_dropout", type=float, default=0.1,
        help="with --class_conditional, the chance a label is replaced by the null label (the unconditional model)")
    add("--ddpm_num_steps", type=int, default=1000, help="T, the number of diffusion steps")
    add("--ddpm_beta_schedule", default="linear", choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
        help="the betas: linear is the paper's, squaredcos_cap_v2 the cosine schedule of Nichol & Dhariwal")

    add = p.add_argument_group("optimisation").add_argument
    add("--train_batch_size", type=int, default=None, help="images per device per micro-step")
    add("--gradient_accumulation_steps", type=int, default=1, help="micro-steps per optimizer step")
    add("--num_epochs", type=int, default=None,
        help="passes over the data, 100 unless a preset says (ignored with --max_train_steps or --max_train_minutes)")
    add("--max_train_steps", type=int, default=None, help="optimizer steps to train; overrides --num_epochs")
    add("--max_train_minutes", type=float, default=None,
        help="as many optimizer steps as fit in this many minutes, grids included (at most --max_train_steps); a "
             "preset's budget is dropped when --max_train_steps or --num_epochs is given")
    add("--learning_rate", type=float, default=None, help="peak learning rate")
    add("--lr_scheduler", default=None, choices=["constant", "constant_with_warmup", "linear", "cosine"],
        help="learning-rate schedule, counted in optimizer steps")
    add("--lr_warmup_steps", type=int, default=None, help="linear warmup, in optimizer steps")
    add("--adam_beta1", type=float, default=0.95, help="AdamW's beta1")
    add("--adam_beta2", type=float, default=0.999, help="AdamW's beta2")
    add("--adam_weight_decay", type=float, default=1e-6, help="AdamW's weight decay")
    add("--adam_epsilon", type=float, default=1e-8, help="AdamW's epsilon")
    add("--max_grad_norm", type=float, default=1.0, help="gradient clipping (after fp16 unscaling)")
    add("--use_ema", action=argparse.BooleanOptionalAction, default=None, help="sample from EMA weights")
    add("--ema_inv_gamma", type=float, default=1.0, help="EMA warmup: decay 1 - (1 + step / inv_gamma)^-power")
    add("--ema_power", type=float, default=0.75, help="EMA warmup's power")
    add("--ema_max_decay", type=float, default=0.9999, help="the EMA decay's ceiling")
    add("--seed", type=int, default=0, help="seeds weights, data order, noise and sample grids")

    add = p.add_argument_group("performance").add_argument
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    add("--mixed_precision", default="no", choices=["no", "fp16", "bf16", "auto"],
        help="autocast dtype; auto (the cifar10-32 preset's): bf16 on a GPU that has it, else no (fp32)")
    add("--gradient_checkpointing", action="store_true",
        help="recompute each UNet block in the backward pass: less activation memory, more compute")
    add("--channels_last", action="store_true",
        help="channels_last weights and images; with --compile, Inductor keeps the layout throughout")
    add("--fast_norm", action="store_true",
        help="GroupNorm keeps bf16/fp16 inputs and outputs under autocast, with fp32 statistics")
    add("--compile", action=argparse.BooleanOptionalAction, default=False,
        help="torch.compile the UNet for training (the first step compiles); a preset may turn it on for GPUs")
    add("--cuda_graph", action="store_true",
        help="record the whole training step (forward, backward, clipping, AdamW, EMA) as one CUDA graph and replay "
             "it; not with gradient accumulation, fp16 or gradient checkpointing")
    add("--ddp_timeout", type=float, default=1800, help="seconds a collective may wait before the job fails")

    add = p.add_argument_group("checkpoints and output").add_argument
    add("--output_dir", default="ddpm-output", help="pipeline folder, samples/, logs/ and checkpoints")
    add("--checkpointing_steps", type=int, default=500, help="write a checkpoint every N optimizer steps")
    add("--checkpoints_total_limit", type=int, default=None, help="keep at most N checkpoints")
    add("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    add("--save_images_epochs", type=int, default=None, help="write a sample grid every N epochs (and at the end)")
    add("--save_model_epochs", type=int, default=None, help="write the pipeline every N epochs (and at the end)")
    add("--eval_batch_size", type=int, default=None, help="images in each sample grid")
    add("--sampler", default="ddpm", choices=list(SAMPLERS),
        help="the sampler that draws the sample grids: DDPM, DDIM or DPM-Solver++")
    add("--guidance_scale", type=float, default=1.0,
        help="with --class_conditional, the classifier-free guidance of the grids and scores (1: none)")
    add("--ddpm_num_inference_steps", type=int, default=None,
        help="denoising steps for sample grids (with --sampler ddim 50, dpm 20, unless given)")

    add = p.add_argument_group("logging and Hub").add_argument
    add("--logging_dir", default="logs", help="log folder, inside output_dir")
    add("--logger", default="tensorboard", choices=["tensorboard", "wandb"],
        help="where losses and sample grids go; wandb needs pip install -e '.[wandb]' (WANDB_MODE=offline: no network)")
    add("--logging_steps", type=int, default=10, help="log loss, lr and speed every N optimizer steps")
    add("--push_to_hub", action="store_true",
        help="upload the pipeline, model card and sample grids to the Hugging Face Hub at each save (not checkpoints)")
    add("--hub_model_id", default=None, help="the Hub repo, NAME or USER/NAME (default: output_dir's name, yours)")
    add("--hub_token", default=None,
        help="Hub token; others can read it in `ps`, so prefer the default: HF_TOKEN or the saved `hf auth login`")
    add("--hub_private_repo", action="store_true", help="create the Hub repo private")
    add("--hub_license", default="apache-2.0", help="license in the model card (output_dir/README.md), a Hub id")

    add = p.add_argument_group("evaluation").add_argument
    add("--score_images", type=int, default=0,
        help="on the built-in data: the shapes score of this many samples at the end, drawn as the grids are")
    add("--eval_bpd_images", type=int, default=0,
        help="at each pipeline save, log an unbiased estimate of bits/dim (eval/bpd_estimate) on N held-out images "
             "(built-in shapes of another seed, an IDX folder's test split), else the first N training images; 0: off")
    add("--eval_fid_images", type=int, default=0,
        help="at each pipeline save, log FID and KID (eval/fid, eval/kid_mean) of N samples drawn with the grids' "
             "sampler and steps against the training data, its statistics cached in fid-reference/; 0: off")
    add("--fid_inception", default=None,
        help="a local TorchScript pool_3 network for --eval_fid_images, as evaluate.py --inception (default: "
             "torch-fidelity's, downloaded on first use)")
    add("--keep_best", default=None, choices=["fid"],
        help="also keep the pipeline of the lowest --eval_fid_images FID in output_dir/best/ (best.json: its FID and "
             "step)")
    return p


def check_cuda_graph(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--cuda_graph records one whole optimizer step (ddpm/cuda_graph_step.py): what cannot be recorded is refused."""
    if args.gradient_accumulation_steps > 1:
        parser.error(f"--cuda_graph records one micro-step per optimizer step: it cannot run with "
                     f"--gradient_accumulation_steps {args.gradient_accumulation_steps}")
    if args.mixed_precision == "fp16":
        parser.error("--cuda_graph cannot run with --mixed_precision fp16: GradScaler decides on the host whether "
                     "to skip a step; use bf16")
    if args.gradient_checkpointing:
        parser.error("--cuda_graph cannot run with --gradient_checkpointing: recomputing a block reads the RNG state "
                     "on the host")
    if args.device != "cuda":
        parser.error(f"--cuda_graph needs a CUDA GPU; this run is on --device {args.device}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    given = parser.parse_known_args(argv)[0]  # before the preset's values: what was typed
    preset = {k: v for k, v in PRESETS[given.preset].items() if k != "model"}
    parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    if given.builtin_data and (given.dataset_name or given.train_data_dir):
        parser.error(f"--builtin_data and {'--dataset_name' if given.dataset_name else '--train_data_dir'} "
                     "name two datasets; pass one")
    if given.train_data_dir or given.builtin_data:
        args.dataset_name = None  # your own image folder, or the built-in shapes, replaces the preset's Hub dataset
    if given.dataset_name or given.builtin_data:
        args.train_data_dir = given.train_data_dir  # a Hub dataset or the built-in shapes replaces the preset's folder
    if (given.max_train_steps or given.num_epochs) and given.max_train_minutes is None:
        args.max_train_minutes = None  # a step count typed replaces the preset's time budget
    if args.num_epochs is None:
        args.num_epochs = 100
    preset_name = given.preset
    args.model_config = dict(PRESETS[preset_name]["model"])
    args.use_ema = bool(args.use_ema)
    args.random_flip = bool(args.random_flip)
    if args.sampler != "ddpm" and given.ddpm_num_inference_steps is None:  # the sampler's default, not the preset's
        args.ddpm_num_inference_steps = min(DEFAULT_STEPS[args.sampler], args.ddpm_num_steps)

    def positive(name):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    for name in ("resolution", "train_batch_size", "eval_batch_size", "num_epochs", "max_train_steps",
                 "save_images_epochs", "save_model_epochs", "gradient_accumulation_steps", "logging_steps",
                 "ddpm_num_steps", "ddpm_num_inference_steps", "checkpointing_steps", "checkpoints_total_limit"):
        positive(name)
    if args.snr_gamma == 0:
        args.snr_gamma = None  # off, also where the preset sets it
    for name in ("learning_rate", "adam_epsilon", "ema_inv_gamma", "ddp_timeout", "max_grad_norm", "snr_gamma",
                 "max_train_minutes"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    for name in ("dataloader_num_workers", "lr_warmup_steps", "adam_weight_decay", "eval_bpd_images", "score_images",
                 "eval_fid_images",
                 "seed"):  # seed -1 draws the built-in shapes that are held out of every run (HELD_OUT_SEED)
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.eval_fid_images == 1:
        parser.error("--eval_fid_images must be 0 or at least 2 (a covariance needs two images), got 1")
    if args.class_conditional and args.eval_fid_images:  # its samples are drawn without class labels
        parser.error("--eval_fid_images does not sample a class-conditional model yet; score it with evaluate.py "
                     "--metric shapes (built-in shapes), or train without --class_conditional")
    if args.keep_best == "fid" and not args.eval_fid_images:
        parser.error("--keep_best fid needs --eval_fid_images N, the samples its FID is computed on")
    if args.fid_inception is not None and not Path(args.fid_inception).is_file():
        parser.error(f"--fid_inception {args.fid_inception!r}: no such file; pass a TorchScript pool_3 network")
    if not 0 <= args.class_dropout <= 1:
        parser.error(f"--class_dropout must be in [0, 1], got {args.class_dropout}")
    if args.guidance_scale < 0:
        parser.error(f"--guidance_scale must be >= 0, got {args.guidance_scale}")
    if not (0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1 and 0 <= args.ema_max_decay <= 1):
        parser.error(f"--adam_beta1/--adam_beta2 must be in [0, 1) and --ema_max_decay in [0, 1], got "
                     f"{args.adam_beta1}, {args.adam_beta2}, {args.ema_max_decay}")
    if args.ddpm_num_inference_steps > args.ddpm_num_steps:
        parser.error(f"--ddpm_num_inference_steps ({args.ddpm_num_inference_steps}) cannot exceed "
                     f"--ddpm_num_steps ({args.ddpm_num_steps})")
    if args.logger == "wandb" and importlib.util.find_spec("wandb") is None:
        parser.error("--logger wandb needs the wandb package, which is not installed: pip install -e '.[wandb]'")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA GPU")
    if args.compile == "auto":  # a preset's: on a GPU, not on the CPU (where Inductor builds C++ for minutes)
        args.compile = args.device == "cuda"
    if args.cuda_graph:
        check_cuda_graph(parser, args)
    args.mixed_precision_auto = args.mixed_precision == "auto"
    if args.mixed_precision_auto:  # on the CPU bf16 autocast did not train faster than fp32 (docs/benchmarks.md)
        bf16 = args.device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        args.mixed_precision = "bf16" if bf16 else "no"
    if args.device == "cpu" and args.mixed_precision == "fp16":  # measured in docs/benchmarks.md
        source = "" if given.mixed_precision == "fp16" else f" (preset {given.preset})"
        print(f"train.py: warning: --mixed_precision fp16{source} on the CPU is about 80x slower than fp32 (no fast "
              "fp16 kernels there); use --mixed_precision no, or bf16", file=sys.stderr)
    if args.model_config_name_or_path:
        args.model_config = read_model_config(parser, args.model_config_name_or_path)
    try:
        config = dict(args.model_config)
        if config.get("sample_size") is None:
            config["sample_size"] = args.resolution
        elif config["sample_size"] != args.resolution:
            parser.error(f"--resolution {args.resolution} differs from the model config's sample_size "
                         f"{config['sample_size']}")
        levels = len(config["block_out_channels"])
        if args.resolution % 2 ** (levels - 1):
            parser.error(f"--resolution {args.resolution} is not divisible by {2 ** (levels - 1)}, which a UNet "
                         f"with {levels} levels needs")
        args.model_config = config
        UNet2DModel(**config).to("meta")  # validate the config before anything starts
        if config.get("num_class_embeds") and not args.class_conditional:
            parser.error(f"the model config has num_class_embeds {config['num_class_embeds']}, a class embedding: "
                         "train it with --class_conditional, or leave num_class_embeds out")
    except (ValueError, KeyError, TypeError) as error:
        parser.error(f"bad model config: {error}")
    return args


def read_model_config(parser: argparse.ArgumentParser, name_or_path: str) -> dict:
    """A UNet config from a JSON file, or a folder with config.json or unet/config.json."""
    path = Path(name_or_path)
    for candidate in (path, path / "unet" / "config.json", path / "config.json"):
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text())
            except json.JSONDecodeError as error:
                parser.error(f"cannot parse model config {str(candidate)!r}: {error}")
            if not isinstance(config, dict):
                parser.error(f"model config {str(candidate)!r} must hold a JSON object, got {type(config).__name__}")
            return {k: v for k, v in config.items() if not k.startswith("_")}
    parser.error(f"--model_config_name_or_path {name_or_path!r}: no such file, nor a folder with config.json")


def with_class_embedding(config: dict, class_names: list[str]) -> dict:
    """The UNet config of a class-conditional run on `class_names`: num_class_embeds = classes + 1, the last
    label the null label of classifier-free guidance (ddpm/guidance.py). DataError if the config says otherwise."""
    needed = len(class_names) + 1
    if config.get("class_embed_type") is not None:
        raise DataError(f"--class_conditional learns a table of class embeddings; the model config's class_embed_type "
                        f"{config['class_embed_type']!r} is another kind: leave it out")
    if config.get("num_class_embeds") not in (None, needed):
        raise DataError(f"the model config's num_class_embeds {config['num_class_embeds']} does not fit the data's "
                        f"{len(class_names)} classes (classes + 1 for the null label = {needed}); leave it out")
    return {**config, "num_class_embeds": needed}
