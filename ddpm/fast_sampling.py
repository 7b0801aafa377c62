"""Sampling fast on a GPU: the UNet's denoising forward in bf16 autocast, replayed from a CUDA graph.

One forward of the UNet is hundreds of kernel launches. A CUDA graph records them once per batch shape
and replays them with a single launch, from static buffers: the input x_t, the timestep and the output
eps_theta(x_t, t) live at fixed addresses, and each step copies x_t and t in before the replay. The
scheduler step (a few element-wise kernels, and the noise drawn on the CPU from the seeded generator)
stays eager, so the numbers and the order of random draws are those of the eager loop.
"""

import torch
from torch import nn

from .cuda_graph_step import on_side_stream
from .unet import unwrap_model


class FastUNet(nn.Module):
    """`unet` for sampling: forward(x_t, t) under `autocast_dtype` (None: the weights' own dtype) and, with
    cuda_graph=True, replayed from a CUDA graph captured the first time each batch shape is seen."""

    def __init__(self, unet: nn.Module, autocast_dtype: torch.dtype | None = None, cuda_graph: bool = False):
        super().__init__()
        device = next(unet.parameters()).device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"FastUNet: cuda_graph=True needs the UNet on a CUDA device, it is on {device}")
        self.unet, self.autocast_dtype, self.cuda_graph = unet, autocast_dtype, cuda_graph
        self.config = unwrap_model(unet).config  # what generate() reads: sample_size, in_channels
        self.graphs: dict[tuple, tuple] = {}  # (shape, dtype) -> (graph, static x_t, static t, static output)
        self.pool = torch.cuda.graph_pool_handle() if cuda_graph else None  # one memory pool for all shapes

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> torch.Tensor:
        if not self.cuda_graph:
            return self.denoise(sample, timestep)
        key = (tuple(sample.shape), sample.dtype)
        if key not in self.graphs:
            self.graphs[key] = self.capture(sample, timestep)
        graph, static_sample, static_timestep, static_output = self.graphs[key]
        static_sample.copy_(sample)
        static_timestep.fill_(int(timestep))  # a host scalar: no wait for the GPU, unlike copying a CPU tensor
        graph.replay()
        return static_output.clone()  # the next replay overwrites the static output

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> torch.Tensor:
        """eps_theta(x_t, t), in the autocast dtype if any, returned in the dtype of x_t."""
        # cache_enabled=False: a CUDA graph must not hold on to autocast's cached weight casts
        with torch.autocast(sample.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None,
                            cache_enabled=False):
            return self.unet(sample, timestep).to(sample.dtype)

    def capture(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> tuple:
        """Record one denoising forward for the shape of `sample` as a CUDA graph."""
        static_sample = sample.clone()
        static_timestep = torch.full((), int(timestep), dtype=torch.int64, device=sample.device)
        # warm up on a side stream first (cuDNN's algorithm search and lazy set-up must not be captured)
        with on_side_stream(torch.cuda.Stream(sample.device)):
            for _ in range(2):
                self.denoise(static_sample, static_timestep)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may call CUDA while this thread records (as in train.py)
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            static_output = self.denoise(static_sample, static_timestep)
        return graph, static_sample, static_timestep, static_output
