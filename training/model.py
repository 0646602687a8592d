"""The network conveyor trains on tabular data, and the factory that rebuilds it from ``model_config.json``.

Shipped with the model (``code/model.py``): `inference.py` rebuilds the network from the saved architecture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

ARCHITECTURES = ("tabular_mlp",)


class TabularMLP(nn.Module):
    """A multilayer perceptron over encoded features: standardised numbers, one-hots, bags of words.

    Each hidden layer is Linear, LayerNorm, ReLU, Dropout. LayerNorm rather than BatchNorm: it behaves the
    same in training and serving, and a last mini-batch of one row cannot break it.

    Parameters
    ----------
    in_features
        Width of the encoded input.
    out_features
        One logit per class for classification, 1 for regression.
    hidden_units
        Width of each hidden layer; empty gives a linear model.
    dropout
        Dropout probability after each hidden layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_units: Sequence[int] = (128, 64),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.hidden_units = [int(h) for h in hidden_units]
        self.dropout = float(dropout)
        layers: list[nn.Module] = []
        width = in_features
        for size in self.hidden_units:
            layers += [nn.Linear(width, size), nn.LayerNorm(size), nn.ReLU(), nn.Dropout(self.dropout)]
            width = size
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (classification) or the standardised value (regression), one row per input row."""
        return self.layers(features)

    def architecture(self) -> dict[str, Any]:
        """What `build_model` needs to rebuild this network (saved in ``model_config.json``)."""
        return {
            "name": "tabular_mlp",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "hidden_units": self.hidden_units,
            "dropout": self.dropout,
        }


def build_model(architecture: Mapping[str, Any]) -> nn.Module:
    """Build the network an ``architecture`` block of ``model_config.json`` describes.

    Parameters
    ----------
    architecture
        ``{"name": "tabular_mlp", "in_features", "out_features", "hidden_units", "dropout"}``.

    Returns
    -------
    torch.nn.Module
        The network with freshly initialised weights; load ``model.pth`` into it.
    """
    name = architecture.get("name")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; this model.py knows {', '.join(ARCHITECTURES)}")
    return TabularMLP(
        in_features=int(architecture["in_features"]),
        out_features=int(architecture["out_features"]),
        hidden_units=architecture.get("hidden_units", ()),
        dropout=float(architecture.get("dropout", 0.0)),
    )
