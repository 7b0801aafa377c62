"""One optimizer step of training, eager: the gradient of L_simple over the micro-batches, then the update.

train.py calls every step the same way, whichever class runs it (ddpm/cuda_graph_step.py replays the same step
from a CUDA graph):

    for each micro-batch:  step.accumulate(x0, noise, timesteps)    Algorithm 1, line 5: the gradient
    step.update()                                                   clip, AdamW, EMA

(class-conditional training passes each micro-batch's labels too: accumulate(x0, noise, timesteps, class_labels)).

`loss_sum` and `nonfinite` are device tensors the step adds to, read by the loop only when it logs or saves, so a
step never waits for the GPU.
"""

from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .ema import EMA
from .loss import diffusion_loss
from .scheduler import DDPMScheduler

# fp16: this many skipped steps in a row (the loss scale fell by 2^50) mean the loss itself is NaN, not an overflow
MAX_SKIPPED_IN_A_ROW = 50


def labels_argument(class_labels: torch.Tensor | None) -> dict:
    """diffusion_loss's class_labels keyword, left out for an unconditional model: its call stays as before."""
    return {} if class_labels is None else {"class_labels": class_labels}


class TrainingDiverged(RuntimeError):
    """The loss is NaN or infinite; the message says from when and what to try."""


class EagerStep:
    """`model` runs the forward (the UNet, compiled or wrapped in DDP); `unet` is the plain module the optimizer
    and the EMA hold. `scaler` is enabled under fp16 only."""

    def __init__(self, model: nn.Module, unet: nn.Module, scheduler: DDPMScheduler, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, ema: EMA | None, autocast_dtype: torch.dtype | None,
                 snr_gamma: float | None, max_grad_norm: float, accumulation_steps: int, device: torch.device):
        self.model, self.unet, self.scheduler, self.optimizer = model, unet, scheduler, optimizer
        self.scaler, self.ema, self.autocast_dtype = scaler, ema, autocast_dtype
        self.snr_gamma, self.max_grad_norm, self.accumulation_steps = snr_gamma, max_grad_norm, accumulation_steps
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.grad_norm: torch.Tensor | None = None  # of the last update, before clipping
        self.skipped_in_a_row = 0
        self.micro_steps = 0

    def accumulate(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   class_labels: torch.Tensor | None = None) -> None:
        """Add one micro-batch's share of the gradient of the loss (ddpm/loss.py), given its class labels if any."""
        self.micro_steps += 1
        last = self.micro_steps == self.accumulation_steps
        is_ddp = isinstance(self.model, DistributedDataParallel)
        with (nullcontext() if last or not is_ddp else self.model.no_sync()):  # all-reduce on the last one only
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                loss = diffusion_loss(self.model, self.scheduler, x0, noise, timesteps, self.snr_gamma,
                                      **labels_argument(class_labels))
            self.scaler.scale(loss / self.accumulation_steps).backward()
        self.loss_sum += loss.detach() / self.accumulation_steps
        if not self.scaler.is_enabled():  # under fp16 an overflowing loss only makes GradScaler skip the step
            self.nonfinite |= ~torch.isfinite(loss.detach())

    def update(self, step: int) -> bool:
        """Algorithm 1, line 5's gradient descent step: clip the gradient, take the AdamW step, move the EMA;
        False when GradScaler skipped it (fp16 overflow). `step`: the step being taken (1-based), for messages."""
        self.micro_steps = 0
        self.scaler.unscale_(self.optimizer)
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.max_grad_norm)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            self.skipped_in_a_row += 1  # fp16 overflow: GradScaler skipped the update and lowered the scale
            if self.skipped_in_a_row == MAX_SKIPPED_IN_A_ROW:
                raise TrainingDiverged(f"{MAX_SKIPPED_IN_A_ROW} fp16 steps in a row overflowed, up to step {step}; "
                                       "the last checkpoint is kept (try a lower --learning_rate, or "
                                       "--mixed_precision bf16)")
            return False
        self.skipped_in_a_row = 0
        if self.ema is not None:
            self.ema.update(self.unet)
        return True

    def release(self) -> None:
        """Nothing to free (CudaGraphStep frees its graph here)."""
