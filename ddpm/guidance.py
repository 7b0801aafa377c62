"""Classifier-free guidance (Ho & Salimans 2022): one network learns eps_theta(x_t, c) and, for the null label,
eps_theta(x_t); sampling extrapolates from the second towards the first.

The null label is the last row of the class embedding: a model of K classes has num_class_embeds = K + 1, and
label K means "no class". Training replaces each label by K with probability p (drop_class_labels); sampling
runs the UNet through GuidedUNet, which `ddpm.sampling.generate` takes in place of the UNet.
"""

import torch
from torch import nn

from .unet import unwrap_model


def null_label(unet: nn.Module) -> int:
    """K, the label that means "no class", of a UNet with num_class_embeds = K + 1; ValueError for any other."""
    config = unwrap_model(unet).config
    if config["num_class_embeds"] is None or config["class_embed_type"] is not None:
        raise ValueError("classifier-free guidance needs a UNet with a class embedding table (num_class_embeds = "
                         f"classes + 1, class_embed_type None), got num_class_embeds={config['num_class_embeds']!r}, "
                         f"class_embed_type={config['class_embed_type']!r}")
    if config["num_class_embeds"] < 2:
        raise ValueError(f"num_class_embeds={config['num_class_embeds']} leaves no class beside the null label; "
                         "a model of K classes has num_class_embeds = K + 1")
    return config["num_class_embeds"] - 1


def drop_class_labels(class_labels: torch.Tensor, null: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Each label replaced by the null label with probability p (Ho & Salimans 2022, Algorithm 1, line 3:
    c <- null with probability p_uncond): one uniform draw per label from `generator`, on the labels' device."""
    if not 0 <= p <= 1:
        raise ValueError(f"the class dropout probability must be in [0, 1], got {p}")
    dropped = torch.rand(class_labels.shape, generator=generator, device=class_labels.device) < p
    return torch.where(dropped, torch.full_like(class_labels, null), class_labels)


class GuidedUNet(nn.Module):
    """The guided model output for fixed class labels, as forward(x_t, t), so generate() samples with it unchanged.

    Ho & Salimans 2022, Eq. 6, with w = s - 1:  eps~ = eps_theta(x_t) + s (eps_theta(x_t, c) - eps_theta(x_t)).
    s = 1 is the conditional model alone (one forward of the batch); any other s runs both halves, conditional and
    null-labelled, as one forward of twice the batch. The same combination applies to an x_0 or v output.
    """

    def __init__(self, unet: nn.Module, class_labels: torch.Tensor | int, guidance_scale: float = 1.0):
        super().__init__()
        self.unet, self.guidance_scale = unet, float(guidance_scale)
        self.config = unwrap_model(unet).config  # what generate() reads: sample_size, in_channels
        self.null_label = null_label(unet)
        device = next(unet.parameters()).device
        labels = torch.as_tensor(class_labels, dtype=torch.int64).reshape(-1)
        outside = [label for label in labels.tolist() if not 0 <= label <= self.null_label]
        if outside or labels.numel() == 0:
            raise ValueError(f"class labels must be in [0, {self.null_label - 1}], or {self.null_label} for no class; "
                             f"got {outside[:5] or 'none'}")
        self.class_labels = labels.to(device)
        self.training = unet.training  # generate() restores this mode after sampling, on the UNet too

    def labels_for(self, batch_size: int) -> torch.Tensor:
        """The labels of a batch: one label for all, or one per image."""
        if len(self.class_labels) == 1:
            return self.class_labels.expand(batch_size)
        if len(self.class_labels) != batch_size:
            raise ValueError(f"GuidedUNet holds {len(self.class_labels)} class labels for a batch of {batch_size} "
                             "images; give one label, or one per image")
        return self.class_labels

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> torch.Tensor:
        labels = self.labels_for(sample.shape[0])
        if self.guidance_scale == 1:
            return self.unet(sample, timestep, labels)
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.numel() > 1:  # one timestep per image: the same for both halves
            timesteps = timesteps.repeat(2)
        both = self.unet(torch.cat([sample, sample]), timesteps,
                         torch.cat([labels, torch.full_like(labels, self.null_label)]))
        conditional, unconditional = both.chunk(2)
        # Eq. 6: eps_theta(x_t) + s (eps_theta(x_t, c) - eps_theta(x_t))
        return unconditional + self.guidance_scale * (conditional - unconditional)


def class_label(name_or_id: str, class_names: list[str]) -> int:
    """The label of a class given by its name (class_labels.json's) or its number; ValueError naming the classes."""
    if name_or_id in class_names:
        return class_names.index(name_or_id)
    if name_or_id.strip().isdigit() and int(name_or_id) < len(class_names):
        return int(name_or_id)
    shown = ", ".join(f"{k} {name}" for k, name in enumerate(class_names[:30]))
    more = f", ... ({len(class_names)} in all)" if len(class_names) > 30 else ""
    raise ValueError(f"no class {name_or_id!r}: give a name or a number of {shown}{more}")
