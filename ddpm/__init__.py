"""ddpm: DDPM (Ho et al. 2020) image diffusion in plain PyTorch, compatible with diffusers' folders."""

from .ddim import DDIMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .pipeline_io import PipelineLoadError, load_pipeline, save_pipeline
from .sampling import generate
from .scheduler import DDPMScheduler
from .unet import UNet2DModel

__all__ = ["UNet2DModel", "DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
           "save_pipeline", "load_pipeline", "generate",
           "PipelineLoadError"]
