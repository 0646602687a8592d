"""The networks conveyor trains. One `torch.nn.Module` per task family; the training loop knows none of them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TabularMLP(nn.Module):
    """A multilayer perceptron over encoded tabular features (standardised numbers, one-hot categories)."""

    def __init__(
        self, in_features: int, out_features: int, hidden: tuple[int, ...] = (128, 64), dropout: float = 0.1
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.LayerNorm(size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def build_model(architecture: dict[str, Any]) -> nn.Module:
    """The module that `model_config.json`'s `architecture` describes."""
    if architecture["name"] != "tabular_mlp":
        raise ValueError(f"unknown architecture {architecture['name']!r}")
    return TabularMLP(
        in_features=architecture["in_features"],
        out_features=architecture["out_features"],
        hidden=tuple(architecture["hidden"]),
        dropout=architecture["dropout"],
    )
