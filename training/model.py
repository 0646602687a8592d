"""The networks conveyor trains, and the factory that rebuilds one from ``model_config.json``.

- `TabularMLP` (the tabular recipe): numbers, one-hot categories and bags of words in one matrix.
- `TextBiLSTM` (the text recipe): each text feature's tokens in order, read by a bidirectional LSTM, beside
  the other features' matrix.
- ``image_cnn.ImageCNN`` (the image recipe), over the uint8 squares ``images.py`` decodes with Pillow.

Shipped with the model (``code/model.py``): `inference.py` rebuilds the network from the saved architecture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

ARCHITECTURES = ("tabular_mlp", "text_bilstm", "image_cnn")


def outputs_in_batches(
    network: nn.Module,
    inputs: Sequence[torch.Tensor],
    device: torch.device | None = None,
    batch_rows: int = 8192,
) -> torch.Tensor:
    """The network's float32 outputs for rows given as `inputs` (moved to `device` a batch at a time when
    given), in batches of its ``predict_batch_rows`` (else `batch_rows`); the caller chooses the grad mode.

    A network with ``row_lengths`` (a Transformer, whose compute grows with each batch's longest row) gets
    its rows longest first, in batches of at most ``predict_batch_tokens`` padded tokens: rows of about one
    length share a batch, so little of the work is padding. The outputs come back in the rows' order.
    """
    rows = len(inputs[0])
    most = int(getattr(network, "predict_batch_rows", batch_rows))
    lengths = getattr(network, "row_lengths", None)
    order = None
    if lengths is None or rows <= 1:
        batches = [slice(i, i + most) for i in range(0, rows, most)]
    else:
        length = lengths(*inputs).cpu()
        order = torch.argsort(length, descending=True, stable=True)
        budget = int(getattr(network, "predict_batch_tokens", 4096))
        batches, start = [], 0
        while start < rows:
            longest = max(1, int(length[order[start]]))  # the batch's first row is its longest
            size = max(1, min(most, budget // longest))
            batches.append(order[start : start + size].to(inputs[0].device))
            start += size
    outputs = [
        network(*(x[b] if device is None else x[b].to(device) for x in inputs)).float() for b in batches
    ]
    if not outputs:
        return network(*(x[:0] if device is None else x[:0].to(device) for x in inputs)).float()
    joined = torch.cat(outputs)
    if order is None:
        return joined
    restored = torch.empty_like(joined)
    restored[order.to(joined.device)] = joined
    return restored


class TabularMLP(nn.Module):
    """A multilayer perceptron over encoded features: standardised numbers, one-hots, bags of words.

    Each hidden layer is Linear, LayerNorm, ReLU, Dropout. LayerNorm rather than BatchNorm: it behaves the
    same in training and serving, and a last mini-batch of one row cannot break it.

    With `linear_path`, a linear layer from the inputs is added to the MLP's output (wide and deep). The
    tabular recipe fits it first, as a regularised linear model, and trains the MLP on top of it for what it
    misses (``train.fit_linear_path``).

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
    linear_path
        Add a linear layer from the inputs to the output (ignored without hidden layers: the network is
        linear already).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_units: Sequence[int] = (128, 64),
        dropout: float = 0.1,
        linear_path: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.hidden_units = [int(h) for h in hidden_units]
        self.dropout = float(dropout)
        self.linear = nn.Linear(in_features, out_features) if linear_path and self.hidden_units else None
        layers: list[nn.Module] = []
        width = in_features
        for size in self.hidden_units:
            layers += [nn.Linear(width, size), nn.LayerNorm(size), nn.ReLU(), nn.Dropout(self.dropout)]
            width = size
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (classification) or the standardised value (regression), one row per input row."""
        if self.linear is None:
            return self.layers(features)
        return self.linear(features) + self.layers(features)

    @property
    def output_layer(self) -> nn.Linear:
        """The last layer of the MLP (the whole network when it has no hidden layers)."""
        last = self.layers[-1]
        assert isinstance(last, nn.Linear)
        return last

    def architecture(self) -> dict[str, Any]:
        """What `build_model` needs to rebuild this network (saved in ``model_config.json``)."""
        return {
            "name": "tabular_mlp",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "hidden_units": self.hidden_units,
            "dropout": self.dropout,
            "linear_path": self.linear is not None,
        }


class TextBiLSTM(nn.Module):
    """A text classifier or regressor: embeddings and a bidirectional LSTM per text feature.

    Each text feature's token ids (padding 0, unknown 1, vocabulary from 2: see ``data.Encoder``) are
    embedded and read in both directions; the mean and the maximum of the LSTM's states over the value's
    tokens summarise it. The summaries and the other features' encoded matrix go through a `TabularMLP`
    head. Word order counts: "not good" and "good, not bad" read differently, which a bag of words cannot
    tell apart.

    Parameters
    ----------
    in_features
        Width of the other features' matrix (0 when text is all there is).
    out_features
        One logit per class for classification, 1 for regression.
    vocabulary_sizes
        Each text feature's vocabulary size (without the padding and unknown ids).
    embedding_dim
        Width of a token's embedding.
    sequence_units
        LSTM units per direction.
    hidden_units, dropout
        The head's hidden layers and dropout; dropout also applies to the embeddings.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        vocabulary_sizes: Sequence[int],
        embedding_dim: int = 64,
        sequence_units: int = 64,
        hidden_units: Sequence[int] = (128, 64),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.vocabulary_sizes = [int(v) for v in vocabulary_sizes]
        self.embedding_dim = embedding_dim
        self.sequence_units = sequence_units
        self.embeddings = nn.ModuleList(
            nn.Embedding(size + 2, embedding_dim, padding_idx=0) for size in self.vocabulary_sizes
        )
        self.readers = nn.ModuleList(
            nn.LSTM(embedding_dim, sequence_units, batch_first=True, bidirectional=True)
            for _ in self.vocabulary_sizes
        )
        self.embedding_dropout = nn.Dropout(dropout)
        summary = 2 * 2 * sequence_units  # mean and max of both directions' states
        self.head = TabularMLP(
            in_features + summary * len(self.vocabulary_sizes), out_features, hidden_units, dropout
        )

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits or the standardised value from the matrix (rows x in_features) and the token ids
        (rows x text features x sequence length)."""
        parts = [features]
        for position, (embedding, reader) in enumerate(zip(self.embeddings, self.readers, strict=True)):
            ids = tokens[:, position].long()
            present = ids != 0
            lengths = present.sum(dim=1)
            # The batch's longest value sets the steps the LSTM takes, not the padded sequence length.
            longest = max(1, int(lengths.max())) if len(ids) else 1
            ids, present = ids[:, :longest], present[:, :longest].unsqueeze(2)
            packed = pack_padded_sequence(
                self.embedding_dropout(embedding(ids)),
                lengths.clamp(min=1).cpu(),  # a missing value reads one padding token, then is masked out
                batch_first=True,
                enforce_sorted=False,
            )
            states, _ = pad_packed_sequence(reader(packed)[0], batch_first=True, total_length=longest)
            counted = present.sum(dim=1).clamp(min=1)
            mean = (states * present).sum(dim=1) / counted
            highest = states.masked_fill(~present, -torch.inf).amax(dim=1)
            parts += [mean, torch.where(lengths.unsqueeze(1) > 0, highest, torch.zeros_like(highest))]
        return self.head(torch.cat(parts, dim=1))

    def architecture(self) -> dict[str, Any]:
        """What `build_model` needs to rebuild this network (saved in ``model_config.json``)."""
        return {
            "name": "text_bilstm",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "vocabulary_sizes": self.vocabulary_sizes,
            "embedding_dim": self.embedding_dim,
            "sequence_units": self.sequence_units,
            "hidden_units": self.head.hidden_units,
            "dropout": self.head.dropout,
        }


def build_model(architecture: Mapping[str, Any]) -> nn.Module:
    """Build the network an ``architecture`` block of ``model_config.json`` describes.

    Parameters
    ----------
    architecture
        What the network's ``architecture()`` returned: ``{"name": "tabular_mlp", "in_features",
        "out_features", "hidden_units", "dropout", "linear_path"}``, or ``"text_bilstm"`` with ``vocabulary_sizes``,
        ``embedding_dim`` and ``sequence_units`` too, or ``"image_cnn"`` (``image_cnn.ImageCNN``).

    Returns
    -------
    torch.nn.Module
        The network with freshly initialised weights; load ``model.pth`` into it.
    """
    name = architecture.get("name")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; this model.py knows {', '.join(ARCHITECTURES)}")
    if name == "image_cnn":
        from image_cnn import ImageCNN  # only image models need Pillow

        return ImageCNN.from_architecture(architecture)
    common = {
        "in_features": int(architecture["in_features"]),
        "out_features": int(architecture["out_features"]),
        "hidden_units": architecture.get("hidden_units", ()),
        "dropout": float(architecture.get("dropout", 0.0)),
    }
    if name == "text_bilstm":
        return TextBiLSTM(
            vocabulary_sizes=architecture["vocabulary_sizes"],
            embedding_dim=int(architecture["embedding_dim"]),
            sequence_units=int(architecture["sequence_units"]),
            **common,
        )
    return TabularMLP(**common, linear_path=bool(architecture.get("linear_path", False)))
