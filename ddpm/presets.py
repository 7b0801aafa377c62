"""Named training recipes for train.py's --preset: flag defaults plus the UNet config.

Explicit flags override a preset's values. Numbers are from ../shared/reference/recipes.md
(diffusers' tutorial and the DDPM paper) except quickstart, which was sized by measurement.
"""

from pathlib import Path
from typing import Any

from ddpm.data import DataError

# diffusers' "Train a diffusion model" tutorial UNet: 113.7M parameters at 128x128
TUTORIAL_UNET: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}

# The DDPM paper's CIFAR-10 model (google/ddpm-cifar10-32): 35.7M parameters, attention at 16x16
CIFAR10_UNET: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": None,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
    "dropout": 0.1,
}

# Small enough to train on 2 CPU cores in minutes, at 16x16 on the built-in shapes: 0.27M parameters, no attention
# but the middle block's (the third search of docs/quickstart.md: with attention at 4x4 too, a step ran 0.78x as
# fast), 32 channels at 4x4 (the fourth search: with 64 there, 0.69x to 0.82x the images a second, batch 64, 2 threads)
QUICKSTART_UNET: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
}

# Fashion-MNIST at its own 28x28, neither padded nor resized to 32: published bits/dim are over its 784
# original pixels, which padding (240 constant pixels more) or bilinear resizing (interpolated values) would
# change; and 28 = 4 x 7 suits a 3-level UNet (28, 14, 7). At 28 it costs 196 MMAC per image forward against 256
# at 32, and trained at 39 against 27 images/s on this project's 2-core CPU. The DDPM paper's CIFAR-10 layout
# (attention at the second level, 14x14 here) at a quarter of its width, one ResNet block per level
# instead of two, three levels instead of four: 1.11M parameters.
FASHION_MNIST_UNET: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
}

# Debian's dataset-fashion-mnist package installs the four IDX files here.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# How to get the folder a preset reads by default, said when it is missing
DATA_HELP = {
    "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist` (as root), or pass --train_data_dir "
                     "with a folder holding its IDX files (train-images-idx3-ubyte.gz, t10k-images-idx3-ubyte.gz), "
                     "or --dataset_name fashion_mnist to download it from the Hugging Face Hub",
}

PRESETS: dict[str, dict[str, Any]] = {
    "quickstart": {
        # chosen by the measured search of docs/quickstart.md, whose tables hold the figures behind each choice
        "model": QUICKSTART_UNET,
        "resolution": 16,
        "train_batch_size": 64,  # more images a second than batch 32 on two threads
        "eval_batch_size": 16,
        # as many steps as fit in 9.5 minutes, 30 s kept for the grids; the step count is fixed after the warmup
        "max_train_minutes": 9.5,
        "learning_rate": 4e-3,
        # AdamW's second-moment average over ~100 steps instead of ~1,000: the gradients shrink tenfold over the
        # run, and with 0.999 the average lags them, shrinking the steps
        "adam_beta2": 0.99,
        "adam_beta1": 0.8,  # the first-moment average over ~5 steps instead of ~10
        "lr_warmup_steps": 200,
        "lr_scheduler": "cosine",
        "use_ema": False,  # over so short a run, annealed to lr 0, the EMA's older weights drew worse samples
        "prediction_type": "sample",  # x0-prediction with min-SNR-10 weighting and the cosine schedule
        "snr_gamma": 10.0,
        "ddpm_beta_schedule": "squaredcos_cap_v2",
        "save_images_epochs": 30,  # an epoch is 32 steps: a grid every 960 steps and one at the end
        "save_model_epochs": 30,
        "checkpointing_steps": 500,
        "sampler": "ddpm",
        "ddpm_num_inference_steps": 100,
        "score_images": 256,
        "mixed_precision": "no",
        "random_flip": True,
    },
    "butterflies-128": {
        "model": TUTORIAL_UNET,
        "dataset_name": "huggan/smithsonian_butterflies_subset",
        "resolution": 128,
        "train_batch_size": 16,
        "eval_batch_size": 16,
        "num_epochs": 50,
        "learning_rate": 1e-4,
        "lr_warmup_steps": 500,
        "lr_scheduler": "cosine",
        "save_images_epochs": 10,
        "save_model_epochs": 30,
        "mixed_precision": "fp16",
        "random_flip": True,
        "ddpm_num_inference_steps": 1000,
    },
    "cifar10-32": {
        "model": CIFAR10_UNET,
        "dataset_name": "cifar10",
        "resolution": 32,
        "train_batch_size": 128,
        "eval_batch_size": 64,
        "max_train_steps": 800_000,
        "learning_rate": 2e-4,
        "lr_warmup_steps": 5000,
        "lr_scheduler": "constant_with_warmup",
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_weight_decay": 0.0,
        "use_ema": True,
        "ema_max_decay": 0.9999,
        "random_flip": True,
        "save_images_epochs": 10,
        "save_model_epochs": 10,
        "checkpointing_steps": 5000,
        "ddpm_num_inference_steps": 1000,
        "mixed_precision": "auto",  # bf16 on a GPU that has it (Ampere or newer), fp32 on the CPU
        "compile": "auto",  # torch.compile on a GPU, where it is faster (docs/benchmarks.md)
    },
    "fashion-mnist": {
        # DDPM paper objective and EMA; lr, warmup and cosine close to the diffusers Fashion-MNIST script of
        # fastai/fastdiffusion (28 px, lr 8e-4, 500 warmup, cosine, batch 256, EMA 0.9999)
        "model": FASHION_MNIST_UNET,
        "train_data_dir": FASHION_MNIST_DIR,
        "resolution": 28,
        "train_batch_size": 128,
        "eval_batch_size": 16,
        "max_train_steps": 20_000,  # 43 epochs of the 60,000 training images
        "learning_rate": 1e-3,
        "lr_warmup_steps": 500,
        "lr_scheduler": "cosine",
        "use_ema": True,
        "ema_max_decay": 0.9999,
        # shoes point left: the top rows are brighter on the right (shaft, heel) in 100% of the test split's
        # ankle boots, 98% of its sneakers, 85% of its sandals; a flipped shoe is not in the data
        "random_flip": False,
        "save_images_epochs": 10,
        "save_model_epochs": 10,
        "checkpointing_steps": 2000,
        "ddpm_num_inference_steps": 1000,
        "mixed_precision": "no",
    },
}


def check_preset_data(preset: str, train_data_dir: str | None) -> None:
    """Raise DataError, saying how to get the data, if `train_data_dir` is the preset's own folder and it is absent."""
    default = PRESETS[preset].get("train_data_dir")
    if train_data_dir is not None and train_data_dir == default and not Path(default).is_dir():
        raise DataError(f"preset {preset} reads {default}, which does not exist: {DATA_HELP[preset]}")
