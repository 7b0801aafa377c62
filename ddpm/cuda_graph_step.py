"""One whole training step captured as a CUDA graph and replayed (train.py --cuda_graph, issue 9).

At 32x32 and batch 128 every kernel of a step is small, and launching them from Python takes longer than running
them: on one H100 the CIFAR-10 UNet's model step ran 1,236 images/s eager, 1,487 compiled, 2,670 as one CUDA graph
of eager kernels and 4,579 as one graph around the compiled UNet (benchmarks/train_step_gpu.py, docs/benchmarks.md).
A graph replays the kernels it recorded, on the same memory, with no Python in between. So everything that changes
from step to step lives in device tensors that the graph reads, filled before each replay:

    the batch, eps and t        static buffers, copied into (eps and t are still drawn by train.py's generator,
    (and the class labels)      so the noise, and exact resume, are as without a graph)
    the learning rate           a 0-dim tensor in AdamW's param group while it records (capturable, fused AdamW);
                                train.py keeps writing floats to the group, copied into the tensor before a replay
    the EMA's 1 - decay         a 0-dim tensor (EMA.move_towards)

The step itself is EagerStep's (ddpm/train_step.py): L_simple (ddpm/loss.py) under autocast, backward, gradient clipping, AdamW, the EMA.
Its first WARMUP_STEPS calls run eagerly on a side stream (torch.compile compiles, cuDNN picks its kernels, AdamW
makes its state); the next one records the graph, with the gradients unset so that each replay writes them afresh
(never accumulates), and replays it. Every call is one real optimizer step.

Under torchrun the graph records DDP's gradient all-reduce too (NCCL collectives can be captured since NCCL 2.9.6),
as PyTorch's CUDA notes ("Usage with DistributedDataParallel") prescribe: DDP is built on the stream that runs the
warm-up and records the graph (train.py builds it on `recording_stream`), and the warm-up runs DDP_WARMUP_STEPS
eager steps, past the 10 first iterations in which DDP's reducer times itself with host synchronisations. Every
rank records and replays the same graph at the same step, so the collectives pair up as in eager steps. At the end
train.py releases the graph before the process group: one holding NCCL's collectives would keep it from closing.

Not with: gradient accumulation, fp16 (GradScaler's skipped steps are decided on the host), gradient checkpointing
(it reads the RNG state on the host): train_args.check_cuda_graph refuses each with one line. On a CPU (the tests)
the step runs uncaptured.
"""

import warnings
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .ema import EMA
from .loss import diffusion_loss
from .scheduler import DDPMScheduler
from .train_step import labels_argument

WARMUP_STEPS = 3  # eager steps before the capture (PyTorch's CUDA graphs notes warm up with 3)
# under DDP, one more than the notes' "at least 11 DDP-enabled eager iterations": DDP's reducer times its iterations
# 1-10 with host synchronisations (Reducer::should_collect_runtime_stats), which must not fall in the recording
DDP_WARMUP_STEPS = 12


def recording_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The side stream that builds DDP, runs the warm-up steps and records the graph; None on a CPU."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


@contextmanager
def on_side_stream(stream: torch.cuda.Stream | None):
    """Run the block's kernels on `stream`, after the current stream's work so far and before its work to come (as
    PyTorch's CUDA graphs notes warm up and build DDP); None (a CPU): the block as it is."""
    if stream is None:
        yield
        return
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


class CudaGraphStep:
    """ddpm/train_step.py's EagerStep, replayed from a CUDA graph after the first `warmup_steps` (WARMUP_STEPS, or
    DDP_WARMUP_STEPS when `model` is DDP): `accumulate` one micro-batch, then `update`. `loss_sum` and `nonfinite`
    are running tensors added to in place; `grad_norm` holds the last step's gradient norm (before clipping).
    `stream`: recording_stream(device), the one DDP was built on, if any."""

    def __init__(self, model: nn.Module, unet: nn.Module, scheduler: DDPMScheduler, optimizer: torch.optim.Optimizer,
                 ema: EMA | None, autocast_dtype: torch.dtype | None, snr_gamma: float | None, max_grad_norm: float,
                 device: torch.device, stream: torch.cuda.Stream | None = None):
        self.model, self.unet, self.scheduler, self.optimizer, self.ema = model, unet, scheduler, optimizer, ema
        self.snr_gamma, self.max_grad_norm = snr_gamma, max_grad_norm
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        # the autocast cache of cast weights must not outlive the capture: each replay casts afresh
        self.autocast = (torch.autocast(self.device.type, dtype=autocast_dtype, cache_enabled=False)
                         if autocast_dtype is not None else nullcontext())
        self.learning_rates = [torch.tensor(group["lr"], device=self.device) for group in optimizer.param_groups]
        self.one_minus_decay = torch.zeros((), device=self.device)
        self.x0 = self.noise = self.timesteps = None  # the static inputs, allocated at the first call
        self.class_labels = None  # a class-conditional model's too
        self.grad_norm: torch.Tensor | None = None  # set by each step; after the capture, the graph's output
        self.calls = 0
        self.warmup_steps = DDP_WARMUP_STEPS if isinstance(model, DistributedDataParallel) else WARMUP_STEPS
        self.graph = None
        self.capture = self.device.type == "cuda"
        self.stream = stream or recording_stream(self.device)  # warm-up and recording, off the default stream

    def accumulate(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   class_labels: torch.Tensor | None = None) -> None:
        """The step's one micro-batch (and its class labels, if any), copied into the graph's inputs."""
        if self.x0 is None:
            self.x0, self.noise, self.timesteps = (torch.empty_like(x0), torch.empty_like(noise),
                                                   torch.empty_like(timesteps))
            self.class_labels = None if class_labels is None else torch.empty_like(class_labels)
        if (class_labels is None) != (self.class_labels is None):
            raise ValueError("CudaGraphStep: every micro-batch comes with class labels, or none does")
        self.x0.copy_(x0)
        self.noise.copy_(noise)
        self.timesteps.copy_(timesteps)
        if class_labels is not None:
            self.class_labels.copy_(class_labels)

    def update(self, step: int) -> bool:
        """The whole step on the micro-batch given: eager during the warm-up, recorded at the next call, replayed
        after. Always True: no step is skipped. (`step`: the same call as EagerStep.update.)"""
        for tensor, group in zip(self.learning_rates, self.optimizer.param_groups):
            tensor.fill_(group["lr"])  # where the LR schedule stands now
        if self.ema is not None:
            self.one_minus_decay.fill_(1 - self.ema.advance())
        self.calls += 1
        if not self.capture:
            self._step()
        elif self.graph is not None:
            self.graph.replay()
        elif self.calls <= self.warmup_steps:
            with on_side_stream(self.stream), warnings.catch_warnings():
                # AdamW's advice for an optimizer that is never captured: this one is, after these steps
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                self._step()
        else:
            self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it writes
            graph = torch.cuda.CUDAGraph()
            # thread_local: a DataLoader's pin-memory thread may call CUDA while this thread records
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):  # syncs first
                self._step()
            self.graph = graph
            self.graph.replay()  # recording ran nothing: this is the step
        return True

    def release(self) -> None:
        """Free the graph. Under torchrun, before the process group is destroyed: a graph that recorded NCCL
        collectives holds on to the communicator, and destroying it waits for the graph (pytorch/pytorch#115388)."""
        if self.graph is not None:
            torch.cuda.synchronize(self.device)
            self.graph.reset()
            self.graph = None

    def _step(self) -> None:
        """Algorithm 1, lines 3-5, and the update: what the graph records."""
        with self.autocast:
            loss = diffusion_loss(self.model, self.scheduler, self.x0, self.noise, self.timesteps, self.snr_gamma,
                                  **labels_argument(self.class_labels))
        loss.backward()
        self.loss_sum.add_(loss.detach())
        self.nonfinite.logical_or_(~torch.isfinite(loss.detach()))
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.max_grad_norm)
        floats = [group["lr"] for group in self.optimizer.param_groups]
        for tensor, group in zip(self.learning_rates, self.optimizer.param_groups):
            group["lr"] = tensor  # read by the step, not baked into it
        try:
            self.optimizer.step()
        finally:
            for value, group in zip(floats, self.optimizer.param_groups):
                group["lr"] = value
        if self.ema is not None:
            self.ema.move_towards(self.unet, self.one_minus_decay)
        if not self.capture or self.calls <= self.warmup_steps:  # not while recording: the graph keeps its gradients
            self.optimizer.zero_grad(set_to_none=True)
