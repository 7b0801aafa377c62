"""Train a DDPM (Ho et al. 2020) image model: the recipe of diffusers' "Train a diffusion model"
tutorial, in one plain PyTorch script. The output folder loads in DDPMPipeline.from_pretrained.

On one machine (CPU, or one GPU):
$ python train.py                                   # quickstart: built-in shapes, 16x16, minutes on a CPU
$ python train.py --preset butterflies-128          # the tutorial exactly (downloads from the Hub)

With torchrun, one process per GPU (global batch = train_batch_size x GPUs x accumulation steps):
$ torchrun --standalone --nproc_per_node=1 train.py --preset cifar10-32
$ torchrun --standalone --nproc_per_node=8 train.py --preset cifar10-32
Across 2 nodes (run on each, K = 0 on the first and 1 on the second; HOST:PORT on the first node):
$ torchrun --nnodes=2 --node_rank=K --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT \
      train.py --preset cifar10-32

SIGTERM or SIGINT (preemption) finishes the current step, writes a checkpoint and exits 0;
`--resume_from_checkpoint latest` continues from it exactly.
"""

import copy
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torchvision.utils import save_image
from tqdm.auto import tqdm

from ddpm import DDIMScheduler, DDPMScheduler, UNet2DModel, generate, save_pipeline
from ddpm import distributed, hub
from ddpm.checkpoint import (CheckpointError, capture_rng_state, list_checkpoints, load_checkpoint,
                             restore_rng_state, save_checkpoint, set_aside_checkpoints_after)
from ddpm.cuda_graph_step import CudaGraphStep, on_side_stream, recording_stream
from ddpm.data import CACHE_BYTES, DataError, EpochSampler, TrainingImages, load_images
from ddpm.device_data import DeviceDataUnavailable, DeviceImages
from ddpm.ema import EMA
from ddpm.fast_sampling import FastUNet
from ddpm.loss import diffusion_loss
from ddpm.loggers import LoggerError, make_logger
from ddpm.lr_schedule import decay_progress, make_lr_scheduler
from ddpm.model_card import write_model_card
from ddpm.presets import check_preset_data
from ddpm.run_evaluation import RunEvaluation
from ddpm.sampling import sample_grid
from ddpm.time_budget import NOT_YET_FITTED, TimeBudget
from ddpm.train_args import parse_args


def log_main(ctx, message: str) -> None:
    if ctx.is_main:
        tqdm.write(message)


def rank_seed(purpose: str, seed: int, rank: int) -> int:
    """A seed of its own for each (purpose, --seed, rank): hashed, so no two pairs share a stream."""
    return random.Random(f"{purpose}/{seed}/{rank}").getrandbits(63)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which checkpoints before exiting."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def fail(message: str) -> None:
    """End the run before training with a one-line error."""
    sys.exit(f"train.py: error: {message}")


@record  # under torchrun, a failing rank's traceback goes into the launcher's error summary
def main(argv=None) -> None:
    args = parse_args(argv)
    run_config = {name: value for name, value in vars(args).items() if name != "hub_token"}  # never stored
    ctx = distributed.setup(args.device, args.ddp_timeout)
    device = ctx.device
    output_dir = Path(args.output_dir)
    hub_repo = None
    if args.push_to_hub and ctx.is_main:  # before anything is trained or written: the repo must be usable
        try:
            hub_repo = hub.connect(output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
        except hub.HubError as error:
            fail(str(error))
        log_main(ctx, f"pushing each pipeline save to {hub_repo.url}")

    # Data

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    try:
        check_preset_data(args.preset, args.train_data_dir)
        source = load_images(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir,
                             args.resolution, args.seed)
        if len(source) == 0:
            raise DataError(f"the dataset holds no images ({source.description})")
        channels = args.model_config.get("in_channels", 3)
        dataset = TrainingImages(source, args.resolution, channels, args.center_crop, args.random_flip,
                                 cache_bytes=CACHE_BYTES if args.cache_images else 0, progress=ctx.is_main,
                                 report=ctx.is_main)
        sampler = EpochSampler(len(dataset), args.seed, ctx.rank, ctx.world_size)
    except DataError as error:
        fail(str(error))
    if len(sampler) < args.train_batch_size:
        fail(f"each process gets {len(sampler)} images per epoch, fewer than --train_batch_size "
             f"{args.train_batch_size}; use a smaller batch or more images")
    loader = None
    if args.device_data:  # small data: the same batches, drawn on the device without a host synchronisation
        try:
            loader = DeviceImages(dataset, sampler, args.train_batch_size, device)
        except DeviceDataUnavailable as reason:
            log_main(ctx, f"the batches come from a DataLoader, not from the device: {reason}")
        except DataError as error:
            fail(str(error))
    if loader is None:
        loader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, drop_last=True,
                            num_workers=args.dataloader_num_workers, pin_memory=device.type == "cuda",
                            persistent_workers=args.dataloader_num_workers > 0, worker_init_fn=ignore_stop_signals,
                            generator=torch.Generator())  # keeps the global RNG (dropout) out of the data order
    batches_per_epoch = len(sampler) // args.train_batch_size
    steps_per_epoch = batches_per_epoch / args.gradient_accumulation_steps
    budget = TimeBudget(args.max_train_minutes, args.lr_warmup_steps) if args.max_train_minutes else None
    if budget is not None:
        total_steps = args.max_train_steps or NOT_YET_FITTED  # fitted by the budget from the end of the warmup
    else:
        total_steps = args.max_train_steps or math.ceil(args.num_epochs * steps_per_epoch)

    # Model, noise schedule, optimizer, LR schedule, EMA

    unet = UNet2DModel(**args.model_config).to(device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    unet.to(memory_format=memory_format)
    if args.fast_norm:
        unet.enable_fast_norm()
    scheduler = DDPMScheduler(num_train_timesteps=args.ddpm_num_steps, beta_schedule=args.ddpm_beta_schedule,
                              prediction_type=args.prediction_type)
    # `unet` stays the plain module for the optimizer, EMA, checkpoints and saving; `model` runs the steps
    # Inductor drops channels_last for graphs with convs that halve the channels (every UNet's up path) unless forced
    layout = {"force_layout_optimization": True} if args.channels_last else None
    model = torch.compile(unet, options=layout) if args.compile else unet
    graph_stream = recording_stream(device) if args.cuda_graph else None
    if ctx.is_distributed:
        # under --cuda_graph, DDP is built on the stream that records the step (ddpm/cuda_graph_step.py), after the
        # weights are written and before anything else reads them (DDP broadcasts rank 0's weights)
        with on_side_stream(graph_stream):
            model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    # fused: one kernel for all parameters; on 2 CPU threads the quickstart step ran 1.11x as fast as with foreach ops
    # (docs/quickstart.md, third search)
    # capturable: AdamW's step counts stay on the GPU, where a CUDA graph can advance them
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, fused=True,
                                  capturable=args.cuda_graph)
    lr_scheduler = make_lr_scheduler(optimizer, args.lr_scheduler, args.lr_warmup_steps, total_steps)
    # EMA on every rank: it is updated from the synchronised weights, so the copies stay identical
    ema = EMA(unet, args.ema_inv_gamma, args.ema_power, args.ema_max_decay) if args.use_ema else None
    autocast_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    # noise and timesteps come from a generator of their own, different on each rank
    noise_seed = rank_seed("noise", args.seed, ctx.rank)
    noise_generator = torch.Generator(device).manual_seed(noise_seed)
    # after the (identical) initialisation, dropout draws from the global RNG, seeded per rank too
    torch.manual_seed(rank_seed("dropout", args.seed, ctx.rank))

    # Resume

    step, epoch, epoch_batches, skipped_steps, skipped_in_a_row = 0, 0, 0, 0, 0
    lr_anchor = None  # where the LR decay stood when the budget last fitted the count (lr_schedule.decay_progress)
    resume_path = None
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        resume_path = found[-1] if found else None
        if resume_path is None:
            log_main(ctx, f"no checkpoint in {output_dir} to resume from: starting a new run")
    elif args.resume_from_checkpoint:
        resume_path = Path(args.resume_from_checkpoint)
    elif list_checkpoints(output_dir):
        log_main(ctx, f"warning: {output_dir} holds checkpoints of an earlier run; this run starts anew "
                      "(--resume_from_checkpoint latest continues that run instead)")
    if resume_path is not None:
        try:
            checkpoint = load_checkpoint(resume_path, ctx.rank)
            state = checkpoint["state"]
            for name, now in (("seed", args.seed), ("train_batch_size", args.train_batch_size),
                              ("dataset_size", len(dataset))):
                if state[name] != now:
                    fail(f"checkpoint {str(resume_path)!r} was written with {name} {state[name]}, this run has "
                         f"{now}; resume with the same seed, data and batch size")
            if budget is not None:
                fitted = state.get("steps_fitted_to_budget")
                if fitted:  # its budget fitted the run's length: the same end and LR schedule, until fitted again
                    total_steps, lr_anchor = state["total_steps"], state.get("lr_anchor")
                    lr_scheduler = make_lr_scheduler(optimizer, args.lr_scheduler, args.lr_warmup_steps, total_steps,
                                                     anchor=lr_anchor)
                budget.resume(state.get("train_seconds") or 0.0, total_steps if fitted else None)
            unet.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            for group in optimizer.param_groups:  # the checkpoint's setting came back with its state
                group["capturable"] = args.cuda_graph
            step, epoch, epoch_batches = state["step"], state["epoch"], state["epoch_batches"]
            skipped_steps = state["skipped_steps"]
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            if scaler.is_enabled() and state["grad_scaler"]:  # empty when the checkpoint was not trained in fp16
                scaler.load_state_dict(state["grad_scaler"])
            if ema is not None:
                if checkpoint["ema"] is None:
                    fail(f"--use_ema is on but checkpoint {str(resume_path)!r} holds no EMA weights")
                ema.load_state_dict(checkpoint["ema"], state["ema_step"])
        except (CheckpointError, RuntimeError, KeyError, ValueError) as error:
            fail(f"cannot resume from {str(resume_path)!r}: {str(error).splitlines()[0]}")
        if checkpoint["rng"] is not None and state["world_size"] == ctx.world_size:
            restore_rng_state(noise_generator, *checkpoint["rng"])
        else:
            log_main(ctx, f"warning: checkpoint was written by {state['world_size']} processes, this run has "
                          f"{ctx.world_size}: data order and noise continue, but not exactly as before")
        log_main(ctx, f"resumed from {resume_path} at step {step} (epoch {epoch}, batch {epoch_batches})")

    if not distributed.same_on_every_rank(ctx, step):
        fail(f"the processes would resume from different steps (this one: step {step}, from "
             f"{str(resume_path) if resume_path else 'no checkpoint'}); every node must see the same checkpoint, "
             "e.g. --output_dir on a shared filesystem")

    # Checkpoints after the step this run starts from belong to the run it replaces: renamed, never deleted, so
    # that a later `--resume_from_checkpoint latest` cannot continue that one instead of this one
    if ctx.is_main:
        moved = set_aside_checkpoints_after(output_dir, step)
        if moved:
            log_main(ctx, f"set aside {len(moved)} checkpoint(s) of the run this one replaces, after step {step}: "
                          f"{', '.join(path.name for path in moved)}")
    distributed.barrier(ctx)

    # Logging, sampling and saving (rank 0 writes everything)

    # Preemption: from here on a signal is remembered; the step finishes, a checkpoint is written, exit 0
    stop_requested = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, frame: stop_requested.append(s))

    try:
        logger = make_logger(args, run_config, resumed=resume_path is not None) if ctx.is_main else None
    except LoggerError as error:
        fail(str(error))
    in_memory = (f" (decoded, one uint8 tensor on {device}: batches drawn there)" if isinstance(loader, DeviceImages)
                 else " (decoded, in memory)" if dataset.cached else "")
    skipped = f", {dataset.skipped} unreadable skipped" if dataset.skipped else ""
    precision = {"no": "fp32", "fp16": "fp16 autocast", "bf16": "bf16 autocast"}[args.mixed_precision]
    if args.mixed_precision_auto:
        precision += " (--mixed_precision auto: bf16 on a GPU that has it, else fp32)"
    precision += ", compiled" * args.compile + ", one CUDA graph per step" * args.cuda_graph
    planned = budget.plan(args.max_train_steps) if budget and not budget.fitted else f"{total_steps} optimizer steps"
    log_main(ctx, f"{source.description}{in_memory}{skipped}; "
                  f"{sum(p.numel() for p in unet.parameters()):,} UNet parameters; "
                  f"global batch {args.train_batch_size} x {ctx.world_size} processes x "
                  f"{args.gradient_accumulation_steps} accumulation = "
                  f"{args.train_batch_size * ctx.world_size * args.gradient_accumulation_steps}; "
                  f"{planned} ({steps_per_epoch:g} per epoch) on {device}, {precision}")

    # Evaluation (ddpm/run_evaluation.py): shapes scores on the built-in data, --eval_bpd_images' estimate
    try:
        evaluation = RunEvaluation(args, source, channels, scheduler, device, logger) if ctx.is_main else None
    except (DataError, ValueError) as error:  # a bad test split; a schedule whose bound cannot be computed
        fail(str(error))

    def sampling_model():
        """The weights to sample from: a copy holding the EMA weights, or the training model itself."""
        if ema is None:
            return unet
        ema_model = copy.deepcopy(unet)  # not a new UNet2DModel: its initialisation would draw from the RNG
        ema.copy_to(ema_model)
        return ema_model

    grid_scheduler = DDIMScheduler.from_config(scheduler.config) if args.sampler == "ddim" else scheduler

    def save_samples(weights: torch.nn.Module, epoch_number: int) -> None:
        if args.cuda_graph:  # the grid's denoising forward as a graph too, in the training precision
            weights = FastUNet(weights, autocast_dtype, cuda_graph=True)
        # a fixed seed, so grids are comparable over the run
        images = generate(weights, grid_scheduler, args.eval_batch_size, torch.Generator().manual_seed(args.seed),
                          args.ddpm_num_inference_steps, progress=True)
        grid = sample_grid(images)
        (output_dir / "samples").mkdir(parents=True, exist_ok=True)
        save_image(grid, output_dir / "samples" / f"{epoch_number:04d}.png")
        logger.log_image("samples", grid, step)
        evaluation.score_grid(images, step)

    def save_pipeline_and_card(weights: torch.nn.Module) -> None:
        """The pipeline folder and its model card, uploaded with --push_to_hub."""
        save_pipeline(output_dir, weights, scheduler)
        evaluation.estimate_bpd(weights, step)
        write_model_card(output_dir, args, data=source.description, world_size=ctx.world_size, step=step,
                         total_steps=total_steps, loss=logs.get("loss"), evaluation=evaluation.figures or None,
                         repo_id=hub_repo.repo_id if hub_repo else None)
        if hub_repo is not None:
            hub_repo.push(step)

    def write_checkpoint() -> None:
        rng_states = distributed.gather_to_main(ctx, capture_rng_state(noise_generator))
        if ctx.is_main:
            state = {"step": step, "epoch": epoch, "epoch_batches": epoch_batches, "skipped_steps": skipped_steps,
                     "lr_scheduler": lr_scheduler.state_dict(), "grad_scaler": scaler.state_dict(),
                     "ema_step": ema.optimization_step if ema else None, "world_size": ctx.world_size,
                     "seed": args.seed, "train_batch_size": args.train_batch_size, "dataset_size": len(dataset),
                     "noise_seeds": [rank_seed("noise", args.seed, r) for r in range(ctx.world_size)],
                     "total_steps": total_steps, "steps_fitted_to_budget": budget is not None and budget.fitted,
                     "train_seconds": budget.used_seconds() if budget is not None else None, "lr_anchor": lr_anchor,
                     "args": run_config}
            path = save_checkpoint(output_dir, step, unet.state_dict(), ema.state_dict() if ema else None,
                                   optimizer.state_dict(), rng_states, state, args.checkpoints_total_limit)
            tqdm.write(f"saved {path}")
        distributed.barrier(ctx)

    # Training loop: one iteration per optimizer step

    def next_batch():
        """The next micro-batch, moving on to a new epoch (reshuffled) when this one is used up."""
        nonlocal data_iter, epoch, epoch_batches
        if epoch_batches >= batches_per_epoch:
            epoch, epoch_batches = epoch + 1, 0
            data_iter = None
        if data_iter is None:
            sampler.set_epoch(epoch, start=epoch_batches * args.train_batch_size)
            data_iter = iter(loader)
        epoch_batches += 1
        return next(data_iter).to(device, non_blocking=True, memory_format=memory_format)

    def epochs_completed() -> int:
        """Epochs whose last batch has been drawn (known at once from a checkpoint at an epoch's end)."""
        return epoch + (epoch_batches >= batches_per_epoch)

    data_iter = None
    model.train()
    progress = tqdm(total=None if total_steps == NOT_YET_FITTED else total_steps, initial=step, desc="training",
                    disable=not ctx.is_main, dynamic_ncols=True)
    if budget is not None:
        budget.start(step)
    loss_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    graph_step = (CudaGraphStep(model, unet, scheduler, optimizer, ema, autocast_dtype, args.snr_gamma,
                                args.max_grad_norm, loss_sum, nonfinite, graph_stream) if args.cuda_graph else None)
    window_start, window_images, window_steps = time.perf_counter(), 0, 0
    completed_epochs = epochs_completed()
    logs = {}  # the latest logged values; the model card shows the loss
    while step < total_steps:
        for micro_step in range(args.gradient_accumulation_steps):
            x0 = next_batch()
            # Algorithm 1: t ~ Uniform({1..T}) (0-based here), eps ~ N(0, I)
            noise = torch.randn(x0.shape, generator=noise_generator, device=device)
            timesteps = torch.randint(0, args.ddpm_num_steps, (x0.shape[0],), generator=noise_generator,
                                      device=device)
            window_images += x0.shape[0] * ctx.world_size
            if graph_step is not None:  # the rest of the step, EMA included, replayed from a CUDA graph
                graph_step(x0, noise, timesteps)
                break
            # gradients are all-reduced only on the last micro-step
            sync = micro_step == args.gradient_accumulation_steps - 1
            with (nullcontext() if sync or not ctx.is_distributed else model.no_sync()):
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = diffusion_loss(model, scheduler, x0, noise, timesteps, args.snr_gamma)
                scaler.scale(loss / args.gradient_accumulation_steps).backward()
            loss_sum += loss.detach() / args.gradient_accumulation_steps
            if not scaler.is_enabled():  # under fp16 an overflowing loss only makes GradScaler skip the step
                nonfinite |= ~torch.isfinite(loss.detach())

        if graph_step is None:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
            scale_before = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        else:
            grad_norm, scale_before = graph_step.grad_norm, None
        if scale_before is not None and scaler.get_scale() < scale_before:
            skipped_steps += 1  # fp16 overflow: GradScaler skipped the update and lowered the scale
            skipped_in_a_row += 1
            if skipped_in_a_row == 50:  # the scale fell by 2^50: the loss itself is NaN, not an overflow
                fail(f"50 fp16 steps in a row overflowed, up to step {step + 1}; the last checkpoint is kept "
                     "(try a lower --learning_rate, or --mixed_precision bf16)")
        else:
            skipped_in_a_row = 0
            lr_scheduler.step()
            if ema is not None and graph_step is None:
                ema.update(unet)
        step += 1
        window_steps += 1
        progress.update(1)

        fit = budget.fit_when_due(ctx, step, args.logging_steps, args.max_train_steps) if budget else None
        if fit is not None and fit[0] != total_steps:  # the time budget fits the run's length: the LR decay ends there
            if total_steps != NOT_YET_FITTED:  # fitted again: the decay goes on from where it stands
                lr_anchor = (step, decay_progress(step, args.lr_warmup_steps, total_steps, lr_anchor))
            total_steps = fit[0]
            lr_scheduler = make_lr_scheduler(optimizer, args.lr_scheduler, args.lr_warmup_steps, total_steps, step,
                                             lr_anchor)
            progress.total = total_steps
            progress.refresh()
        if fit is not None and fit[1]:
            log_main(ctx, fit[1])

        stop = distributed.any_rank(ctx, bool(stop_requested))
        last = step == total_steps or stop
        epoch_ended = epochs_completed() > completed_epochs
        completed_epochs = epochs_completed()
        checkpoint_due = step % args.checkpointing_steps == 0 or last
        # checked (a sync) only before something is logged or saved, so NaN weights never reach the disk
        if step % args.logging_steps == 0 or checkpoint_due or epoch_ended:
            if distributed.any_rank(ctx, bool(nonfinite.item())):
                fail(f"the loss became NaN or infinite by step {step}; the last checkpoint is kept "
                     "(try a lower --learning_rate, or --mixed_precision bf16)")

        if step % args.logging_steps == 0 or step == total_steps:
            elapsed = time.perf_counter() - window_start
            logs = {"loss": loss_sum.item() / window_steps, "lr": lr_scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm.item(), "images_per_s": window_images / elapsed,
                    "skipped_steps": skipped_steps}
            if ema is not None:
                logs["ema_decay"] = ema.decay or 0.0
            if ctx.is_main:
                logger.log_scalars({f"train/{name}": value for name, value in logs.items()}, step)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}",
                                     img_s=f"{logs['images_per_s']:.1f}")
            loss_sum.zero_()
            window_start, window_images, window_steps = time.perf_counter(), 0, 0

        if checkpoint_due:
            write_checkpoint()
        if stop and step < total_steps:  # a stop during the last step lets the run finish and save
            log_main(ctx, f"stop signal received: checkpoint written at step {step}, exiting")
            break
        save_images = last or (epoch_ended and completed_epochs % args.save_images_epochs == 0)
        save_model = last or (epoch_ended and completed_epochs % args.save_model_epochs == 0)
        if ctx.is_main and (save_images or save_model):
            weights = sampling_model()  # one EMA copy for both
            if save_images:
                save_samples(weights, completed_epochs)
            if last:
                evaluation.score_samples(weights, grid_scheduler, step)
            if save_model:
                save_pipeline_and_card(weights)

    progress.close()
    summary = evaluation.summary() if evaluation is not None else None
    if summary:
        log_main(ctx, summary)
    if logger is not None:
        logger.close()
    distributed.barrier(ctx)
    if graph_step is not None:
        graph_step.release()  # before the process group: a graph holding NCCL's collectives would hang its end
    distributed.cleanup(ctx)
    if hub_repo is not None:  # after the other ranks are released: an upload may take longer than --ddp_timeout
        hub_repo.wait()


if __name__ == "__main__":
    main()
