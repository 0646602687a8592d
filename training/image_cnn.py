"""The image recipe's network: a small CNN over the uint8 squares `images.decode_images` makes, with the
normalisation and augmentation inside it, so serving (`images.encode_image_instances`, then the network in eval
mode) runs exactly the preprocessing of training. `augment` is shared with the pretrained image recipe
(`hf_image`). Shipped with the model (``code/image_cnn.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from images import DEFAULT_IMAGE_SIZE


def channel_statistics(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 1] units.

    Parameters
    ----------
    images
        uint8, shape ``(N, 3, H, W)``: the training split as `decode_images` returns it.

    Returns
    -------
    tuple of list of float
        ``(mean, std)``, three values each; a channel that never varies gets std 1 so normalising cannot
        divide by zero.
    """
    if images.ndim != 4 or images.dtype != np.uint8 or not images.shape[0]:
        raise ValueError(
            f"expected a non-empty uint8 array of N x C x H x W images, got {images.dtype} {images.shape}"
        )
    channels = images.shape[1]
    # Histograms are exact and need no float copy of the whole split.
    counts = np.zeros((channels, 256), dtype=np.int64)
    step = max(1, 4_000_000 // max(1, images[0, 0].size))
    for start in range(0, images.shape[0], step):
        chunk = images[start : start + step]
        for c in range(channels):
            counts[c] += np.bincount(chunk[:, c].ravel(), minlength=256)
    levels = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum(axis=1)
    mean = (counts @ levels) / total
    variance = np.maximum((counts @ levels**2) / total - mean**2, 0.0)
    std = np.sqrt(variance)
    std[std < 1e-6] = 1.0
    return [float(m) for m in mean], [float(s) for s in std]


def default_widths(image_size: int) -> list[int]:
    """Channel widths per stage: one stage per halving until the feature map is about 4 pixels, 1 to 5.

    64 pixels gives ``[32, 64, 128, 256]``, 32 gives ``[32, 64, 128]``, 16 gives ``[32, 64]``.
    """
    stages = min(5, max(1, int(math.log2(max(image_size, 8) / 4))))
    return [32, 64, 128, 256, 256][:stages]


class ImageCNN(nn.Module):
    """A small VGG-style CNN over uint8 images that normalises and augments them itself.

    Each stage is (Conv 3x3, BatchNorm, ReLU) twice, then a 2x2 max-pool; global average pooling, dropout and
    a linear layer follow. In training mode a random horizontal flip and a random shift of up to an eighth
    of the image (reflection padding) are applied to each image, drawn from torch's global RNG so a seeded
    run repeats; in eval mode the input is only normalised, as in serving.

    Parameters
    ----------
    out_features
        One logit per class.
    image_size
        Side of the square input images.
    mean, std
        Per-channel statistics of the training images in [0, 1] units (`channel_statistics`).
    widths
        Channels of each stage; defaults to `default_widths` of `image_size`.
    dropout
        Dropout probability before the linear layer.
    """

    def __init__(
        self,
        out_features: int,
        image_size: int = DEFAULT_IMAGE_SIZE,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        widths: Sequence[int] | None = None,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need three values, std positive; got {mean!r} and {std!r}")
        self.out_features = int(out_features)
        self.image_size = int(image_size)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.widths = [int(w) for w in (default_widths(self.image_size) if widths is None else widths)]
        if not self.widths:
            raise ValueError("widths needs at least one stage")
        self.dropout = float(dropout)
        # uint8 -> normalised float in one multiply-add: (x / 255 - mean) / std.
        std_tensor = torch.tensor(self.std).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_tensor))
        self.register_buffer("shift", -torch.tensor(self.mean).view(1, 3, 1, 1) / std_tensor)
        layers: list[nn.Module] = []
        channels = 3
        for width in self.widths:
            for _ in range(2):
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
            # ceil_mode: an odd or tiny feature map still pools rather than failing.
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(self.dropout),
            nn.Linear(channels, self.out_features),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits, one row per image of a uint8 ``(N, 3, image_size, image_size)`` batch."""
        x = images.float() * self.scale + self.shift
        if self.training:
            x = augment(x)
        # NHWC lets the convolutions use their fastest kernels on CPU (oneDNN) and on GPU tensor cores.
        return self.head(self.features(x.contiguous(memory_format=torch.channels_last)))

    def architecture(self) -> dict[str, Any]:
        """What `from_architecture` needs to rebuild this network (saved in ``model_config.json``)."""
        return {
            "name": "image_cnn",
            "out_features": self.out_features,
            "image_size": self.image_size,
            "mean": self.mean,
            "std": self.std,
            "widths": self.widths,
            "dropout": self.dropout,
        }

    @classmethod
    def from_architecture(cls, architecture: Mapping[str, Any]) -> ImageCNN:
        """The network an `architecture` block describes, with fresh weights; load ``model.pth`` into it."""
        if architecture.get("name") != "image_cnn":
            raise ValueError(f"not an image_cnn architecture: {architecture.get('name')!r}")
        return cls(
            out_features=int(architecture["out_features"]),
            image_size=int(architecture["image_size"]),
            mean=architecture["mean"],
            std=architecture["std"],
            widths=architecture.get("widths"),
            dropout=float(architecture.get("dropout", 0.0)),
        )


def augment(images: torch.Tensor) -> torch.Tensor:
    """A random horizontal flip and a random shift of up to an eighth of the side, per image.

    Parameters
    ----------
    images
        Float ``(N, C, S, S)``, already normalised; the shift fills with reflected pixels.

    Returns
    -------
    torch.Tensor
        The same shape; randomness from torch's global RNG on the images' device.
    """
    count, channels, height, width = images.shape
    device = images.device
    flip = torch.rand(count, device=device) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
    pad = min(height, width) // 8
    if pad == 0:
        return images
    padded = functional.pad(images, (pad, pad, pad, pad), mode="reflect")
    top = torch.randint(0, 2 * pad + 1, (count, 1), device=device)
    left = torch.randint(0, 2 * pad + 1, (count, 1), device=device)
    rows = (top + torch.arange(height, device=device)).view(count, 1, height, 1)
    columns = (left + torch.arange(width, device=device)).view(count, 1, 1, width)
    batch = torch.arange(count, device=device).view(count, 1, 1, 1)
    channel = torch.arange(channels, device=device).view(1, channels, 1, 1)
    return padded[batch, channel, rows, columns]
