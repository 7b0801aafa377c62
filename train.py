"""Train a DDPM (Ho et al. 2020) image model: the recipe of diffusers' "Train a diffusion model" tutorial,
in one plain PyTorch script. The output folder loads in DDPMPipeline.from_pretrained.

On one machine (CPU, or one GPU):
$ python train.py                                # quickstart: built-in shapes, 16x16, minutes on a CPU
$ python train.py --preset butterflies-128       # the tutorial exactly (downloads from the Hub)

With torchrun, one process per GPU (global batch = train_batch_size x GPUs x accumulation steps):
$ torchrun --standalone --nproc_per_node=1 train.py --preset cifar10-32
$ torchrun --standalone --nproc_per_node=8 train.py --preset cifar10-32
Across 2 nodes (run on each, K = 0 on the first and 1 on the second; HOST:PORT on the first node):
$ torchrun --nnodes=2 --node_rank=K --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT \
      train.py --preset cifar10-32

SIGTERM or SIGINT (preemption) finishes the current step, writes a checkpoint and exits 0;
`--resume_from_checkpoint latest` continues from it exactly.

The algorithm: Algorithm 1 of the paper is the loop's first block (ddpm/loss.py has its formulas), Algorithm 2
is ddpm/sampling.py; docs/paper-to-code.md maps every equation to its function.
"""

import math
import signal
import sys
import time
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ddpm import DDPMScheduler, UNet2DModel
from ddpm import distributed, hub, training_state
from ddpm.checkpoint import CheckpointError, mark_outputs_written, set_aside_checkpoints_after
from ddpm.conditional_evaluation import ConditionalRunEvaluation
from ddpm.cuda_graph_step import CudaGraphStep, on_side_stream, recording_stream
from ddpm.data import CACHE_BYTES, DataError, EpochSampler, TrainingImages, load_images
from ddpm.device_data import DeviceDataUnavailable, DeviceImages
from ddpm.ema import EMA
from ddpm.files import WriteError
from ddpm.guidance import drop_class_labels, null_label
from ddpm.loggers import LoggerError, make_logger
from ddpm.loss import draw_noise_and_timesteps
from ddpm.lr_schedule import learning_rate, set_learning_rate
from ddpm.presets import check_preset_data
from ddpm.run_evaluation import RunEvaluation
from ddpm.run_outputs import RunOutputs, outputs_due, pipeline_missing
from ddpm.sampling import sampling_scheduler
from ddpm.time_budget import NOT_YET_FITTED, TimeBudget
from ddpm.train_args import parse_args, with_class_embedding
from ddpm.train_step import EagerStep, TrainingDiverged
from ddpm.training_state import EpochBatches, RunState, Training, rank_seed, seed_global_rngs


def log_main(ctx, message: str) -> None:
    if ctx.is_main:
        tqdm.write(message)


def fail(message: str) -> None:
    """End the run with a one-line error."""
    sys.exit(f"train.py: error: {message}")


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which checkpoints before exiting."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def training_data(args, ctx, channels: int):
    """The images (source, dataset), this rank's sampler of each epoch's order, and the loader of
    batches; with --class_conditional, labelled, and the UNet config given the data's classes."""
    check_preset_data(args.preset, args.train_data_dir)
    source = load_images(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir,
                         args.resolution, args.seed, label_column=args.label_column)
    if len(source) == 0:
        raise DataError(f"the dataset holds no images ({source.description})")
    dataset = TrainingImages(source, args.resolution, channels, args.center_crop, args.random_flip,
                             cache_bytes=CACHE_BYTES if args.cache_images else 0, progress=ctx.is_main,
                             report=ctx.is_main, with_labels=args.class_conditional)
    if args.class_conditional:
        args.model_config = with_class_embedding(args.model_config, dataset.class_names)
    sampler = EpochSampler(len(dataset), args.seed, ctx.rank, ctx.world_size)
    if len(sampler) < args.train_batch_size:
        raise DataError(f"each process gets {len(sampler)} images per epoch, fewer than --train_batch_size "
                        f"{args.train_batch_size}; use a smaller batch or more images")
    if args.device_data:  # small data: the same batches, drawn on the device without a host synchronisation
        try:
            return source, dataset, sampler, DeviceImages(dataset, sampler, args.train_batch_size, ctx.device)
        except DeviceDataUnavailable as reason:
            log_main(ctx, f"the batches come from a DataLoader, not from the device: {reason}")
    loader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, drop_last=True,
                        num_workers=args.dataloader_num_workers, pin_memory=ctx.device.type == "cuda",
                        persistent_workers=args.dataloader_num_workers > 0,
                        worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator())  # keeps the global RNG (dropout) out of the data order
    return source, dataset, sampler, loader


def connect_hub(args, ctx, output_dir: Path) -> hub.HubRepo:
    """The Hub repo each pipeline save is pushed to, checked before anything is trained or written."""
    try:
        hub_repo = hub.connect(output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
    except hub.HubError as error:
        fail(str(error))
    log_main(ctx, f"pushing each pipeline save to {hub_repo.url}")
    return hub_repo


def training_model(unet, args, ctx, memory_format, graph_stream) -> torch.nn.Module:
    """The module that runs the training steps: `unet` itself, compiled or wrapped in DDP as asked; `unet`
    stays the plain module of the optimizer, the EMA, the checkpoints and the pipeline."""
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(memory_format=memory_format)
    if args.fast_norm:
        unet.enable_fast_norm()
    # Inductor drops channels_last for graphs with convs that halve the channels (the up path) unless forced
    layout = {"force_layout_optimization": True} if args.channels_last else None
    model = torch.compile(unet, options=layout) if args.compile else unet
    if ctx.is_distributed:  # under --cuda_graph, built on the stream that records the step (see its module)
        device_ids = [ctx.device] if ctx.device.type == "cuda" else None
        with on_side_stream(graph_stream):
            model = DistributedDataParallel(model, device_ids=device_ids)
    return model


def resume(args, ctx, output_dir: Path, run: RunState, training: Training, dataset_size: int,
           budget: TimeBudget | None) -> tuple[Path | None, RunState]:
    """The checkpoint resumed from (None: a new run) and the run's state there, the same on every rank."""
    log = lambda message: log_main(ctx, message)  # noqa: E731
    resume_path = training_state.checkpoint_to_resume(args.resume_from_checkpoint, output_dir, log)
    if resume_path is not None:
        try:
            run = training_state.resume(resume_path, ctx, args, dataset_size, training, run, budget, log)
        except CheckpointError as error:
            fail(f"cannot resume from {str(resume_path)!r}: {error}")
    if not distributed.same_on_every_rank(ctx, run.step):
        fail(f"the processes would resume from different steps (this one: step {run.step}, from "
             f"{str(resume_path) if resume_path else 'no checkpoint'}); every node must see the same "
             "checkpoint, e.g. --output_dir on a shared filesystem")
    # Checkpoints after the step this run starts from belong to the run it replaces: renamed, never deleted,
    # so that a later `--resume_from_checkpoint latest` cannot continue that one instead of this one
    moved = set_aside_checkpoints_after(output_dir, run.step) if ctx.is_main else []
    if moved:
        log(f"set aside {len(moved)} checkpoint(s) of the run this one replaces, after step {run.step}: "
            f"{', '.join(path.name for path in moved)}")
    distributed.barrier(ctx)
    return resume_path, run


def is_complete(args, ctx, output_dir: Path, resume_path: Path | None, run: RunState,
                batches: EpochBatches) -> bool:
    """Whether the run resumed from is complete, its final outputs all written (then one line says so). If the
    pipeline was deleted since, its final outputs are due again."""
    if resume_path is None or run.step < run.total_steps or run.outputs_due:
        return False
    if pipeline_missing(output_dir, args.class_conditional):
        run.outputs_due = outputs_due(args, batches.epochs_completed(), epoch_ended=False, last=True)
        return False
    log_main(ctx, f"the run in {output_dir} is complete: {run.step} of {run.total_steps} steps, its pipeline "
                  f"and grids written ({resume_path.name}); nothing to do")
    return True


def finish(ctx, output_dir: Path, run: RunState, logger, evaluation: RunEvaluation | None,
           hub_repo: hub.HubRepo | None) -> None:
    """The run's last line (its scores), the logger closed, the processes released, the last upload waited
    for; at the run's end, its last checkpoint marked complete."""
    summary = evaluation.summary() if evaluation is not None else None
    if summary:
        log_main(ctx, summary)
    if logger is not None:
        logger.close()
    distributed.barrier(ctx)
    distributed.cleanup(ctx)
    # after the other ranks are released: an upload may outlast --ddp_timeout
    uploaded = hub_repo.wait() if hub_repo is not None else True
    if ctx.is_main and run.step == run.total_steps:
        if uploaded:
            mark_outputs_written(output_dir / f"checkpoint-{run.step}")  # the run is complete
        else:
            log_main(ctx, "the last upload failed: run the same command again to upload the final pipeline")


def start_line(args, ctx, source, dataset, loader, unet, run: RunState, budget,
               steps_per_epoch: float) -> str:
    """What the run trains on, with what, for how long, where."""
    in_memory = (f" (decoded, one uint8 tensor on {ctx.device}: batches drawn there)"
                 if isinstance(loader, DeviceImages) else " (decoded, in memory)" if dataset.cached else "")
    skipped = f", {dataset.skipped} unreadable skipped" if dataset.skipped else ""
    precision = {"no": "fp32", "fp16": "fp16 autocast", "bf16": "bf16 autocast"}[args.mixed_precision]
    if args.mixed_precision_auto:
        precision += " (--mixed_precision auto: bf16 on a GPU that has it, else fp32)"
    precision += ", compiled" * args.compile + ", one CUDA graph per step" * args.cuda_graph
    planned = (budget.plan(args.max_train_steps) if budget and not budget.fitted
               else f"{run.total_steps} optimizer steps")
    batch = args.train_batch_size * ctx.world_size * args.gradient_accumulation_steps
    return (f"{source.description}{in_memory}{skipped}; {sum(p.numel() for p in unet.parameters()):,} UNet "
            f"parameters; global batch {args.train_batch_size} x {ctx.world_size} processes x "
            f"{args.gradient_accumulation_steps} accumulation = {batch}; {planned} "
            f"({steps_per_epoch:g} per epoch) on {ctx.device}, {precision}")


class TrainingLog:
    """The figures logged every --logging_steps (mean loss, LR, gradient norm, images/s), to the logger
    and the progress bar; `latest` keeps the last ones (the model card shows the loss)."""

    def __init__(self, logger, progress: tqdm, train_step, ema: EMA | None, window: list | None):
        self.logger, self.progress, self.train_step, self.ema = logger, progress, train_step, ema
        self.latest = {}
        self.start_window()
        if window is not None:  # a resumed run: the losses since the last log, as the checkpoint kept them
            self.train_step.loss_sum.fill_(window[0])
            self.steps = window[1]

    def start_window(self) -> None:
        self.start, self.images, self.steps = time.perf_counter(), 0, 0
        self.train_step.loss_sum.zero_()

    def window(self) -> list:
        """[sum, steps] of the losses since the last log (a sync: for checkpoints only)."""
        return [self.train_step.loss_sum.item(), self.steps]

    def count(self, images: int) -> None:
        self.images, self.steps = self.images + images, self.steps + 1

    def write(self, step: int, lr: float, skipped_steps: int) -> float:
        """Log the window's figures; returns its mean loss."""
        self.latest = {"loss": self.train_step.loss_sum.item() / self.steps, "lr": lr,
                       "grad_norm": self.train_step.grad_norm.item(),
                       "images_per_s": self.images / (time.perf_counter() - self.start),
                       "skipped_steps": skipped_steps}
        if self.ema is not None:
            self.latest["ema_decay"] = self.ema.decay or 0.0
        if self.logger is not None:  # the main process
            self.logger.log_scalars({f"train/{name}": value for name, value in self.latest.items()}, step)
            self.progress.set_postfix(loss=f"{self.latest['loss']:.4f}", lr=f"{lr:.2e}",
                                      img_s=f"{self.latest['images_per_s']:.1f}")
        self.start_window()
        return self.latest["loss"]


@record  # under torchrun, a failing rank's traceback goes into the launcher's error summary
def main(argv=None) -> None:
    args = parse_args(argv)
    run_config = {name: value for name, value in vars(args).items() if name != "hub_token"}  # never stored
    ctx = distributed.setup(args.device, args.ddp_timeout)
    device, output_dir = ctx.device, Path(args.output_dir)
    hub_repo = connect_hub(args, ctx, output_dir) if args.push_to_hub and ctx.is_main else None

    # Data, and the run's length
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    channels = args.model_config.get("in_channels", 3)
    try:
        source, dataset, sampler, loader = training_data(args, ctx, channels)
    except DataError as error:
        fail(str(error))
    steps_per_epoch = len(sampler) // args.train_batch_size / args.gradient_accumulation_steps
    budget = TimeBudget(args.max_train_minutes, args.lr_warmup_steps) if args.max_train_minutes else None
    if budget is not None:  # fitted by the budget from the end of the warmup
        run = RunState(total_steps=args.max_train_steps or NOT_YET_FITTED)
    else:
        run = RunState(total_steps=args.max_train_steps or math.ceil(args.num_epochs * steps_per_epoch))

    # Model, noise schedule, optimizer, EMA, the step
    unet = UNet2DModel(**args.model_config).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    graph_stream = recording_stream(device) if args.cuda_graph else None
    model = training_model(unet, args, ctx, memory_format, graph_stream)
    scheduler = DDPMScheduler(num_train_timesteps=args.ddpm_num_steps, beta_schedule=args.ddpm_beta_schedule,
                              prediction_type=args.prediction_type)
    # fused: one kernel for all parameters; capturable: the step counts stay on the GPU, for a CUDA graph
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                  weight_decay=args.adam_weight_decay, fused=True, capturable=args.cuda_graph)
    # EMA on every rank: it is updated from the synchronised weights, so the copies stay identical
    ema = EMA(unet, args.ema_inv_gamma, args.ema_power, args.ema_max_decay) if args.use_ema else None
    autocast_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    # noise and timesteps come from a generator of their own, different on each rank
    noise_generator = torch.Generator(device).manual_seed(rank_seed("noise", args.seed, ctx.rank))
    # after the (identical) initialisation, dropout draws from the global RNG, seeded per rank too
    seed_global_rngs(args.seed, ctx.rank)
    training = Training(unet, optimizer, scaler, ema, noise_generator)

    # Resume
    resume_path, run = resume(args, ctx, output_dir, run, training, len(dataset), budget)
    batches = EpochBatches(loader, sampler, args.train_batch_size, run, device, memory_format)
    if is_complete(args, ctx, output_dir, resume_path, run, batches):
        distributed.cleanup(ctx)
        return
    # Preemption: from here on a signal is remembered; the step finishes, a checkpoint is written, exit 0
    stop_requested = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, frame: stop_requested.append(s))

    # Logging, evaluation and outputs (rank 0 writes everything but the checkpoints' RNG states)
    try:
        logger = make_logger(args, run_config, resumed=resume_path is not None) if ctx.is_main else None
        evaluation = (ConditionalRunEvaluation if args.class_conditional else RunEvaluation)(
            args, source, channels, scheduler, device, logger) if ctx.is_main else None
    except (LoggerError, DataError, ValueError) as error:  # ValueError: a bound that cannot be computed
        fail(str(error))
    log_main(ctx, start_line(args, ctx, source, dataset, loader, unet, run, budget, steps_per_epoch))
    grid_scheduler = sampling_scheduler(args.sampler, scheduler.config)
    outputs = RunOutputs(args, output_dir, scheduler, grid_scheduler, logger, evaluation, hub_repo,
                         source.description, ctx.world_size, dataset.class_names) if ctx.is_main else None

    # Training loop: one iteration per optimizer step
    if args.cuda_graph:  # the same step (clip, AdamW, EMA included), replayed from a CUDA graph
        train_step = CudaGraphStep(model, unet, scheduler, optimizer, ema, autocast_dtype, args.snr_gamma,
                                   args.max_grad_norm, device, graph_stream)
    else:
        train_step = EagerStep(model, unet, scheduler, optimizer, scaler, ema, autocast_dtype, args.snr_gamma,
                               args.max_grad_norm, args.gradient_accumulation_steps, device)
    model.train()
    progress = tqdm(total=None if run.total_steps == NOT_YET_FITTED else run.total_steps, initial=run.step,
                    desc="training", disable=not ctx.is_main, dynamic_ncols=True)
    if budget is not None:
        budget.start(run.step)
    log = TrainingLog(logger, progress, train_step, ema, run.loss_window)

    def current_lr() -> float:
        return learning_rate(args.lr_scheduler, args.learning_rate, run.lr_step, args.lr_warmup_steps,
                             run.total_steps, run.lr_anchor)

    try:
        if run.outputs_due and ctx.is_main:  # due at the step resumed from, left unwritten (a kill, a stop)
            log_main(ctx, f"writing the outputs due at step {run.step}, which the run before did not finish")
            outputs.write(run.outputs_due, unet, ema, run, checkpoint=resume_path)
        while run.step < run.total_steps:
            set_learning_rate(optimizer, current_lr())
            # Algorithm 1: x_0 ~ q(x_0) (line 2), eps and t (lines 3-4), a gradient step on L_simple (line 5)
            for _ in range(args.gradient_accumulation_steps):
                x0, labels = batches.next()  # labels: None unless --class_conditional
                noise, timesteps = draw_noise_and_timesteps(x0, args.ddpm_num_steps, noise_generator)
                if labels is not None:  # Ho & Salimans 2022, Algorithm 1, line 3: c <- null with prob. p
                    labels = drop_class_labels(labels, null_label(unet), args.class_dropout, noise_generator)
                train_step.accumulate(x0, noise, timesteps, labels)
            updated = train_step.update(run.step + 1)  # clip, AdamW, EMA; False: an fp16 overflow skipped it
            run.step += 1
            run.lr_step += updated  # the LR schedule counts the updates, not the skipped steps
            run.skipped_steps += not updated
            log.count(x0.shape[0] * ctx.world_size * args.gradient_accumulation_steps)
            progress.update(1)

            # Upkeep: the run's length, logs, checkpoints, sample grids, the pipeline
            if budget is not None and budget.refit(ctx, run, args.logging_steps, args.max_train_steps):
                progress.total = run.total_steps
                progress.refresh()
            stop = distributed.any_rank(ctx, bool(stop_requested))
            last, epoch_ended = run.step == run.total_steps, batches.epoch_ended()
            checkpoint_due = run.step % args.checkpointing_steps == 0 or last or stop
            # checked (a sync) only before something is logged or saved, so NaN weights never reach the disk
            if run.step % args.logging_steps == 0 or checkpoint_due or epoch_ended:
                if distributed.any_rank(ctx, bool(train_step.nonfinite.item())):
                    raise TrainingDiverged(f"the loss became NaN or infinite by step {run.step}; the last "
                                           "checkpoint is kept (try a lower --learning_rate, or "
                                           "--mixed_precision bf16)")
            if run.step % args.logging_steps == 0 or last:
                run.logged_loss = log.write(run.step, current_lr(), run.skipped_steps)
            # the grid and pipeline due now, recorded by the checkpoint: a kill before they are written (and
            # marked so) leaves them for the resumed run to write
            run.outputs_due = outputs_due(args, batches.completed, epoch_ended, last)
            if checkpoint_due:
                run.loss_window = log.window()
                saved = training_state.save(ctx, output_dir, run, training, args, run_config, len(dataset),
                                            budget)
                log_main(ctx, f"saved {saved}")
            if stop and not last:  # a stop in the last step lets the run finish and save
                log_main(ctx, f"stop signal received: checkpoint written at step {run.step}, exiting")
                break
            if run.outputs_due and ctx.is_main:
                outputs.write(run.outputs_due, unet, ema, run, checkpoint=saved if checkpoint_due else None)
    except TrainingDiverged as error:
        fail(str(error))
    except WriteError as error:  # the files written before are intact: the same command continues from them
        fail(f"{error}; what was written before is intact: free space and run the same command again "
             "(with --resume_from_checkpoint latest)")
    finally:  # a CUDA graph holding NCCL's collectives would keep the process group from closing
        train_step.release()

    progress.close()
    finish(ctx, output_dir, run, logger, evaluation, hub_repo)


if __name__ == "__main__":
    main()
