"""Distributed set-up from torchrun's environment, and the few collectives train.py needs.

Without torchrun (no WORLD_SIZE in the environment) everything here is a single-process no-op.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    # the group for host-side flags: gloo, so agreeing on one never waits for queued GPU work (None: the default)
    cpu_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def setup(device_name: str, timeout_s: float) -> Context:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); one device per process."""
    if "WORLD_SIZE" not in os.environ:
        return Context(0, 0, 1, torch.device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device_name == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    # a rank that stops answering makes every collective fail after timeout_s instead of hanging forever.
    # PyTorch's CUDA-graph notes still ask for TORCH_NCCL_ASYNC_ERROR_HANDLING=0 before DDP's all-reduce is captured
    # (train.py --cuda_graph): NCCL's watchdog thread used to query the events of collectives issued during a capture,
    # which breaks it. Since torch 2.1 those collectives are not handed to the watchdog (pytorch#103503) and a capture
    # first waits for the watchdog's queue to empty (#110665); CudaGraphStep also captures in thread_local mode, where
    # another thread's queries cannot break it. So error handling stays on here. A replayed all-reduce is not timed by
    # the watchdog; a rank stuck in one stops answering every step's gloo collective (any_rank), which times out.
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if backend == "nccl" else None)
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    return Context(rank, local_rank, world_size, device, cpu_group)


def barrier(ctx: Context) -> None:
    if ctx.is_distributed:
        dist.barrier()


def any_rank(ctx: Context, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (e.g. a stop signal that reached only some)."""
    if not ctx.is_distributed:
        return flag
    tensor = torch.tensor([int(flag)])  # a CPU tensor over gloo: no host-device synchronisation
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
    return bool(tensor.item())


def same_on_every_rank(ctx: Context, value: int) -> bool:
    """True on every rank if every rank passed the same integer (e.g. the step it resumes from).

    Ranks that disagree on the step would run different numbers of collectives and hang or pair them wrongly.
    """
    if not ctx.is_distributed:
        return True
    # max(v) == min(v), and min(v) = -max(-v), exactly when all values are equal
    tensor = torch.tensor([value, -value], device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor[0].item() == -tensor[1].item()


def from_main(ctx: Context, value: float) -> float:
    """Rank 0's `value` on every rank (e.g. a decision taken from rank 0's clock)."""
    if not ctx.is_distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)  # a CPU tensor over gloo, as in any_rank
    dist.broadcast(tensor, src=0, group=ctx.cpu_group)
    return tensor.item()


def gather_to_main(ctx: Context, value):
    """A list of every rank's `value` on rank 0 (None elsewhere)."""
    if not ctx.is_distributed:
        return [value]
    gathered = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def cleanup(ctx: Context) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
