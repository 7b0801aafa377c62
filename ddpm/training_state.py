"""Where a run stands, and how it is saved and resumed: what a checkpoint's state.json records (RunState), the
objects it saves (Training), the walk through the data epoch after epoch (EpochBatches), and the seeds of each
process's random streams. ddpm/checkpoint.py is the on-disk format; this module decides what goes in it."""

import dataclasses
import random
from argparse import Namespace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import distributed
from .checkpoint import (CheckpointError, capture_rng_state, list_checkpoints, load_checkpoint, outputs_written,
                         restore_rng_state, save_checkpoint)
from .data import EpochSampler
from .ema import EMA
from .time_budget import TimeBudget


def rank_seed(purpose: str, seed: int, rank: int) -> int:
    """A seed of its own for each (purpose, --seed, rank): hashed, so no two pairs share a stream."""
    return random.Random(f"{purpose}/{seed}/{rank}").getrandbits(63)


def seed_global_rngs(seed: int, rank: int) -> None:
    """torch's global RNG (dropout draws from it), and Python's and numpy's, which nothing in training draws from
    but a checkpoint keeps: seeded, so that the same command writes the same checkpoints."""
    torch.manual_seed(rank_seed("dropout", seed, rank))
    random.seed(rank_seed("python", seed, rank))
    np.random.seed(rank_seed("numpy", seed, rank) % 2**32)


@dataclasses.dataclass
class RunState:
    """Where a run stands after `step` optimizer steps; a checkpoint's state.json holds these fields."""

    total_steps: int  # the run's length (fitted by --max_train_minutes' budget as the run goes)
    step: int = 0
    epoch: int = 0  # the data's position: `epoch_batches` micro-batches drawn of epoch `epoch`
    epoch_batches: int = 0
    skipped_steps: int = 0  # fp16 steps GradScaler skipped
    lr_step: int = 0  # the updates the LR schedule has counted: not the skipped ones; `step` again after a refit
    lr_anchor: tuple[int, float] | None = None  # where the LR decay stood at the budget's last refit (lr_schedule)
    logged_loss: float | None = None  # the latest logged mean loss (the model card shows it)
    loss_window: list | None = None  # [sum, steps] of the losses since that log: a resumed run logs the same means
    # the grid and pipeline due at `step` (run_outputs.outputs_due); on resume, those a kill or a stop left unwritten
    outputs_due: dict | None = None


@dataclasses.dataclass
class Training:
    """What a checkpoint saves besides RunState: the weights, the optimizer, the fp16 scaler, the EMA, and the
    generator of the noise and timesteps (Algorithm 1, lines 3-4)."""

    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA | None
    noise_generator: torch.Generator


class EpochBatches:
    """The run's micro-batches epoch after epoch, each epoch reshuffled by the sampler, from `run`'s position,
    which it advances; each with its class labels where the loader gives them (class-conditional training)."""

    def __init__(self, loader: DataLoader, sampler: EpochSampler, batch_size: int, run: RunState,
                 device: torch.device, memory_format: torch.memory_format):
        self.loader, self.sampler, self.batch_size, self.run = loader, sampler, batch_size, run
        self.device, self.memory_format = device, memory_format
        self.per_epoch = len(sampler) // batch_size
        self.iterator = None
        self.completed = self.epochs_completed()

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next micro-batch and its class labels (None without): Algorithm 1, line 2, x_0 ~ q(x_0), or
        (x_0, c) ~ q(x_0, c) (Ho & Salimans 2022, Algorithm 1, line 2)."""
        run = self.run
        if run.epoch_batches >= self.per_epoch:
            run.epoch, run.epoch_batches = run.epoch + 1, 0
            self.iterator = None
        if self.iterator is None:
            self.sampler.set_epoch(run.epoch, start=run.epoch_batches * self.batch_size)
            self.iterator = iter(self.loader)
        run.epoch_batches += 1
        batch = next(self.iterator)
        images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return images, None if labels is None else labels.to(self.device, non_blocking=True)

    def epochs_completed(self) -> int:
        """Epochs whose last batch has been drawn (known at once from a checkpoint at an epoch's end)."""
        return self.run.epoch + (self.run.epoch_batches >= self.per_epoch)

    def epoch_ended(self) -> bool:
        """Whether an epoch ended with the batches drawn since the last call."""
        completed = self.epochs_completed()
        ended, self.completed = completed > self.completed, completed
        return ended


def checkpoint_to_resume(resume_from: str | None, output_dir: Path, log: Callable[[str], None]) -> Path | None:
    """The checkpoint named by --resume_from_checkpoint ('latest': the newest in output_dir, if any)."""
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            log(f"no checkpoint in {output_dir} to resume from: starting a new run")
        return found[-1] if found else None
    if resume_from:
        return Path(resume_from)
    if list_checkpoints(output_dir):
        log(f"warning: {output_dir} holds checkpoints of an earlier run; this run starts anew "
            "(--resume_from_checkpoint latest continues that run instead)")
    return None


def resume(path: Path, ctx: distributed.Context, args: Namespace, dataset_size: int, training: Training,
           run: RunState, budget: TimeBudget | None, log: Callable[[str], None]) -> RunState:
    """Load checkpoint `path` into `training` and return the run's state there; CheckpointError if it cannot
    continue this run (another seed, data or batch size; no EMA weights where --use_ema asks for them)."""
    checkpoint = load_checkpoint(path, ctx.rank)
    state = checkpoint["state"]
    try:
        for name, now in (("seed", args.seed), ("train_batch_size", args.train_batch_size),
                          ("dataset_size", dataset_size)):
            if state[name] != now:
                raise CheckpointError(f"it was written with {name} {state[name]}, this run has {now}; resume with "
                                      "the same seed, data and batch size")
        conditional = bool(state.get("args", {}).get("class_conditional"))
        if conditional != args.class_conditional:
            raise CheckpointError(f"it was written {'with' if conditional else 'without'} --class_conditional, "
                                  f"this run is {'' if args.class_conditional else 'un'}conditional; resume as it was "
                                  "written")
        if training.ema is not None and checkpoint["ema"] is None:
            raise CheckpointError("--use_ema is on but it holds no EMA weights")
        resumed = dataclasses.replace(run, step=state["step"], epoch=state["epoch"],
                                      epoch_batches=state["epoch_batches"], skipped_steps=state["skipped_steps"],
                                      lr_step=state["lr_step"] if "lr_step" in state
                                      else state["lr_scheduler"]["last_epoch"],  # (checkpoints before lr_step)
                                      logged_loss=state.get("logged_loss"), loss_window=state.get("loss_window"),
                                      outputs_due=None if outputs_written(path) else state.get("outputs_due"))
        if budget is not None:
            fitted = state.get("steps_fitted_to_budget")
            if fitted:  # its budget fitted the run's length: the same end and LR schedule, until fitted again
                anchor = state.get("lr_anchor")
                resumed.total_steps, resumed.lr_anchor = state["total_steps"], tuple(anchor) if anchor else None
            budget.resume(state.get("train_seconds") or 0.0, resumed.total_steps if fitted else None)
        training.unet.load_state_dict(checkpoint["model"])
        capturable = training.optimizer.param_groups[0].get("capturable", False)
        training.optimizer.load_state_dict(checkpoint["optimizer"])
        for group in training.optimizer.param_groups:  # the checkpoint's setting came back with its state
            group["capturable"] = capturable
        if training.scaler.is_enabled() and state["grad_scaler"]:  # empty when not trained in fp16
            training.scaler.load_state_dict(state["grad_scaler"])
        if training.ema is not None:
            training.ema.load_state_dict(checkpoint["ema"], state["ema_step"])
    except (RuntimeError, KeyError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(str(error).splitlines()[0]) from None
    if checkpoint["rng"] is not None and state["world_size"] == ctx.world_size:
        restore_rng_state(training.noise_generator, *checkpoint["rng"])
    else:
        log(f"warning: checkpoint was written by {state['world_size']} processes, this run has {ctx.world_size}: "
            "data order and noise continue, but not exactly as before")
    log(f"resumed from {path} at step {resumed.step} (epoch {resumed.epoch}, batch {resumed.epoch_batches})")
    return resumed


def save(ctx: distributed.Context, output_dir: Path, run: RunState, training: Training, args: Namespace,
         run_config: dict, dataset_size: int, budget: TimeBudget | None) -> Path | None:
    """Write checkpoint-{run.step} (every rank gives its RNG state; rank 0 writes); its path on rank 0."""
    rng_states = distributed.gather_to_main(ctx, capture_rng_state(training.noise_generator))
    path = None
    if ctx.is_main:
        ema = training.ema
        state = {**dataclasses.asdict(run), "grad_scaler": training.scaler.state_dict(),
                 "ema_step": ema.optimization_step if ema else None, "world_size": ctx.world_size,
                 "seed": args.seed, "train_batch_size": args.train_batch_size, "dataset_size": dataset_size,
                 "noise_seeds": [rank_seed("noise", args.seed, r) for r in range(ctx.world_size)],
                 "steps_fitted_to_budget": budget is not None and budget.fitted,
                 "train_seconds": budget.used_seconds() if budget is not None else None, "args": run_config}
        path = save_checkpoint(output_dir, run.step, training.unet.state_dict(), ema.state_dict() if ema else None,
                               training.optimizer.state_dict(), rng_states, state, args.checkpoints_total_limit)
    distributed.barrier(ctx)
    return path
