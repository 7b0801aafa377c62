"""The noise-prediction network eps_theta(x_t, t): a U-Net with ResNet and self-attention blocks.

The architecture of DDPM (Ho et al. 2020, Appendix B), written to match diffusers' UNet2DModel
module for module, so that state dicts move between the two with no renaming.
"""

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# diffusers' UNet2DModel.__init__ defaults. Every key is written to config.json.
DEFAULT_CONFIG: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

# Options diffusers has and we do not: each allowed value, anything else is refused by name.
SUPPORTED_VALUES: dict[str, tuple] = {
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D", None),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None, "timestep", "identity"),
}
DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")


def resolve_config(**config: Any) -> dict[str, Any]:
    """Fill in diffusers' defaults and refuse, by key and value, anything this UNet cannot build."""
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"UNet2DModel: unknown config key(s) {unknown}; known keys are {sorted(DEFAULT_CONFIG)}")
    full = {**DEFAULT_CONFIG, **config}
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        full[key] = list(full[key])
    if isinstance(full["sample_size"], tuple):
        full["sample_size"] = list(full["sample_size"])

    for key, allowed in SUPPORTED_VALUES.items():
        if full[key] not in allowed:
            raise ValueError(f"UNet2DModel: unsupported {key}={full[key]!r}; this implementation supports {list(allowed)}")
    for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        for block_type in full[key]:
            if block_type not in allowed:
                raise ValueError(f"UNet2DModel: unsupported block type {block_type!r} in {key}; supported: {list(allowed)}")

    channels, groups = full["block_out_channels"], full["norm_num_groups"]
    if not (len(full["down_block_types"]) == len(full["up_block_types"]) == len(channels) >= 1):
        raise ValueError(
            "UNet2DModel: down_block_types, up_block_types and block_out_channels must have the same length >= 1, "
            f"got {len(full['down_block_types'])}, {len(full['up_block_types'])} and {len(channels)}"
        )
    if not isinstance(groups, int) or any(c % groups for c in channels):
        raise ValueError(f"UNet2DModel: norm_num_groups={groups!r} must divide every block_out_channels {channels}")
    if full["layers_per_block"] < 1:
        raise ValueError(f"UNet2DModel: layers_per_block must be >= 1, got {full['layers_per_block']}")
    classes = full["num_class_embeds"]
    if classes is not None and (not isinstance(classes, int) or isinstance(classes, bool) or classes < 1):
        raise ValueError(f"UNet2DModel: num_class_embeds must be None or an int >= 1, got {classes!r}")
    return full


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal position embedding of the timestep (Transformer-style, DDPM Appendix B)."""
    half = dim // 2
    # frequencies 10000^(-i / (half - freq_shift)), i = 0..half-1
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half - freq_shift)
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if flip_sin_to_cos:
        embedding = torch.cat([embedding[:, half:], embedding[:, :half]], dim=-1)
    if dim % 2 == 1:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def rescale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x / factor, skipped when factor is 1: the same numbers without one more pass over x."""
    return x if factor == 1 else x / factor


class GroupNorm(nn.GroupNorm):
    """torch's GroupNorm (Wu & He 2018), same parameters and state-dict names, with an opt-in path for
    mixed precision (`fast`, set by UNet2DModel.enable_fast_norm): torch's kernel run in the input's dtype,
    which sums the statistics in fp32, so that a bf16 input gives a bf16 output instead of autocast's fp32."""

    fast = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return super().forward(x)  # under autocast on CUDA: fp32 in and out, whatever x's dtype
        # outside autocast (CUDA's runs group_norm in fp32); gamma and beta in x's dtype too: one dtype for all
        # three, which torch's kernels take on every device. (The meta device has no autocast to leave.)
        device = x.device.type
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear -> SiLU -> linear."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """Two 3x3 convs with GroupNorm and SiLU; the time embedding is added between them."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 dropout: float, output_scale_factor: float = 1.0):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # 1x1 conv on the residual path only where the channel count changes
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        # x may carry channels_last strides from attention: laid out as the weights are (contiguous unless the
        # model was made channels_last), it keeps diffusers' conv kernel and numbers, and channels_last copy-free
        channels_last = self.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        shortcut = self.conv_shortcut(x.contiguous(memory_format=layout)) if self.conv_shortcut is not None else x
        return rescale(shortcut + h, self.output_scale_factor)


class Attention(nn.Module):
    """Self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, head_dim: int, groups: int, eps: float, rescale_output_factor: float = 1.0):
        super().__init__()
        self.heads = channels // head_dim
        self.head_dim = head_dim
        self.rescale_output_factor = rescale_output_factor
        inner_dim = self.heads * head_dim
        self.group_norm = GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, inner_dim)
        self.to_k = nn.Linear(channels, inner_dim)
        self.to_v = nn.Linear(channels, inner_dim)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # GroupNorm on (B, C, HW) rather than (B, C, H, W): the same numbers, and the same memory
        # layout as diffusers gives its q/k/v projections, so results agree bit for bit
        tokens = self.group_norm(x.view(batch, channels, height * width)).transpose(1, 2)  # (B, HW, C)

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # (B, HW, heads*d) -> (B, heads, HW, d)
            return t.view(batch, -1, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split_heads(self.to_q(tokens)), split_heads(self.to_k(tokens)), split_heads(self.to_v(tokens))
        # softmax(q k^T / sqrt(d)) v
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, -1, self.heads * self.head_dim)
        out = self.to_out[0](out)
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
        return rescale(out + x, self.rescale_output_factor)


class Downsample2D(nn.Module):
    """Halve the resolution with a strided 3x3 conv."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # the original TensorFlow code's asymmetric "SAME" padding
        return self.conv(x)


class Upsample2D(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """One encoder level: `layers_per_block` resnets (each followed by attention in AttnDownBlock2D),
    then a downsampler except at the lowest level. Every intermediate output is kept as a skip."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int, attention: bool,
                 add_downsample: bool, head_dim: int, config: dict[str, Any]):
        super().__init__()
        groups, eps = config["norm_num_groups"], config["norm_eps"]
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps,
                          config["dropout"])
            for i in range(num_layers)
        )
        self.attentions = nn.ModuleList(
            Attention(out_channels, head_dim, groups, eps) for _ in range(num_layers) if attention
        )
        self.downsamplers = nn.ModuleList(
            [Downsample2D(out_channels, config["downsample_padding"])] if add_downsample else []
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x)
            skips.append(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """One decoder level: `layers_per_block + 1` resnets, each taking a skip from the encoder
    concatenated on channels (then attention in AttnUpBlock2D), then an upsampler except at the top."""

    def __init__(self, in_channels: int, prev_output_channels: int, out_channels: int, temb_channels: int,
                 num_layers: int, attention: bool, add_upsample: bool, head_dim: int, config: dict[str, Any]):
        super().__init__()
        groups, eps = config["norm_num_groups"], config["norm_eps"]
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in_channels = prev_output_channels if i == 0 else out_channels
            resnets.append(ResnetBlock2D(resnet_in_channels + skip_channels, out_channels, temb_channels, groups, eps,
                                         config["dropout"]))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(
            Attention(out_channels, head_dim, groups, eps) for _ in range(num_layers) if attention
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if add_upsample else [])

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        """`skips` are this level's encoder outputs in the order they were made; the last is used first.
        The list is not changed, so a checkpointed recomputation sees the same skips."""
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips))):
            x = resnet(torch.cat([x, skip], dim=1), temb)
            if self.attentions:
                x = self.attentions[i](x)
        for upsampler in self.upsamplers:
            x = upsampler(x)
        return x


class UNetMidBlock2D(nn.Module):
    """The bottleneck: resnet -> attention -> resnet (attention optional)."""

    def __init__(self, channels: int, temb_channels: int, head_dim: int, config: dict[str, Any]):
        super().__init__()
        groups, eps, scale = config["norm_num_groups"], config["norm_eps"], config["mid_block_scale_factor"]
        attention_groups = config["attn_norm_num_groups"] or groups
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, temb_channels, groups, eps, config["dropout"], scale) for _ in range(2)
        )
        self.attentions = nn.ModuleList(
            [Attention(channels, head_dim, attention_groups, eps, scale)] if config["add_attention"] else []
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x, temb)


class UNet2DModel(nn.Module):
    """eps_theta(x_t, t): predicts the noise (or x_0, or v) from a noisy image and its timestep.

    Takes diffusers' UNet2DModel config keys; `forward` returns the output tensor itself.
    """

    def __init__(self, **config: Any):
        super().__init__()
        self.config = resolve_config(**config)
        # Recompute each down/mid/up block in the backward pass instead of keeping its activations
        self.gradient_checkpointing = False
        cfg = self.config
        channels = cfg["block_out_channels"]
        temb_channels = cfg["time_embedding_dim"] or 4 * channels[0]
        levels = len(channels)

        def head_dim(level_channels: int) -> int:  # attention_head_dim null means one head over all channels
            return cfg["attention_head_dim"] or level_channels

        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels)
        # The class embedding, added to the time embedding (diffusers' UNet2DModel): a table of num_class_embeds
        # vectors, the timestep MLP on sinusoids of the label ("timestep"), or the label itself ("identity").
        if cfg["class_embed_type"] is None and cfg["num_class_embeds"] is not None:
            self.class_embedding = nn.Embedding(cfg["num_class_embeds"], temb_channels)
        elif cfg["class_embed_type"] == "timestep":
            self.class_embedding = TimestepEmbedding(channels[0], temb_channels)
        elif cfg["class_embed_type"] == "identity":
            self.class_embedding = nn.Identity()
        else:
            self.class_embedding = None

        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(cfg["down_block_types"]):
            self.down_blocks.append(DownBlock(
                in_channels=channels[max(i - 1, 0)], out_channels=channels[i], temb_channels=temb_channels,
                num_layers=cfg["layers_per_block"], attention=block_type == "AttnDownBlock2D",
                add_downsample=i < levels - 1, head_dim=head_dim(channels[i]), config=cfg,
            ))

        self.mid_block = (
            UNetMidBlock2D(channels[-1], temb_channels, head_dim(channels[-1]), cfg)
            if cfg["mid_block_type"] is not None else None
        )

        reversed_channels = channels[::-1]
        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(cfg["up_block_types"]):
            self.up_blocks.append(UpBlock(
                in_channels=reversed_channels[min(i + 1, levels - 1)],
                prev_output_channels=reversed_channels[max(i - 1, 0)],
                out_channels=reversed_channels[i], temb_channels=temb_channels,
                num_layers=cfg["layers_per_block"] + 1, attention=block_type == "AttnUpBlock2D",
                add_upsample=i < levels - 1, head_dim=head_dim(reversed_channels[i]), config=cfg,
            ))

        self.conv_norm_out = GroupNorm(cfg["norm_num_groups"], channels[0], eps=cfg["norm_eps"])
        self.conv_out = nn.Conv2d(channels[0], cfg["out_channels"], 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory in training: only each block's inputs are kept for the backward
        pass, and the block is run again there (about one more forward per step)."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def enable_fast_norm(self) -> None:
        """Every GroupNorm keeps its input's dtype (bf16 under autocast) with fp32 statistics, instead of CUDA
        autocast's fp32 output: in eager mode no fp32 activation is written and cast back (the gradients of the
        norms' weight and bias are rounded to bf16, as a convolution's are under autocast; under torch.compile
        Inductor may fuse those casts itself). Parameters, state dict and config are unchanged."""
        for module in self.modules():
            if isinstance(module, GroupNorm):
                module.fast = True

    def disable_fast_norm(self) -> None:
        for module in self.modules():
            if isinstance(module, GroupNorm):
                module.fast = False

    def _run_block(self, block: nn.Module, *args: Any) -> Any:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    @property
    def is_class_conditional(self) -> bool:
        return self.class_embedding is not None

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, in_channels, H, W) and a timestep (int, 0-d or (B,) tensor) -> (B, out_channels, H, W).
        A class-conditional model (num_class_embeds or class_embed_type set) needs class_labels, (B,) int64."""
        cfg = self.config
        if self.is_class_conditional and class_labels is None:
            raise ValueError(f"UNet2DModel: this model is class-conditional (num_class_embeds="
                             f"{cfg['num_class_embeds']}, class_embed_type={cfg['class_embed_type']!r}): "
                             "pass class_labels")
        if not self.is_class_conditional and class_labels is not None:
            raise ValueError("UNet2DModel: class_labels given to a model without a class embedding "
                             "(num_class_embeds and class_embed_type are None)")
        if cfg["center_input_sample"]:
            sample = 2 * sample - 1.0

        timesteps = torch.as_tensor(timestep, device=sample.device)
        timesteps = timesteps.reshape(-1).expand(sample.shape[0])
        t_emb = timestep_embedding(timesteps, cfg["block_out_channels"][0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
        temb = self.time_embedding(t_emb.to(self.dtype))
        if class_labels is not None:
            if cfg["class_embed_type"] == "timestep":  # the label through the timestep's own sinusoids
                class_labels = timestep_embedding(class_labels, cfg["block_out_channels"][0], cfg["flip_sin_to_cos"],
                                                  cfg["freq_shift"]).to(self.dtype)
            temb = temb + self.class_embedding(class_labels).to(self.dtype)

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = self._run_block(block, x, temb)
            skips.extend(block_skips)
        if self.mid_block is not None:
            x = self._run_block(self.mid_block, x, temb)
        for block in self.up_blocks:
            level_skips = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            x = self._run_block(block, x, level_skips, temb)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel / DataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
