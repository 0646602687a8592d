"""The recipes: what trains on a dataset, one entry per model family behind one registry.

A recipe says which datasets it suits, how their splits are read and encoded, which network it builds, and
its hyperparameter defaults; `train.py` runs any of them the same way, and `loop.fit` trains any network.

- ``tabular``: an MLP over numbers, one-hot categories and bags of words, on top of a fitted linear model.
- ``text``: a BiLSTM reads each text feature's tokens in order.
- ``image``: a CNN for a dataset of class folders of images (`images`).
- ``pretrained``: fine-tunes a base model from the hub (`hf_text`: a Transformer encoder for text).
- ``pretrained_image``: fine-tunes an image backbone from the hub (`hf_image`) on a dataset of images.

A new family is a new module and one `register` call here, not another branch in `train.py`.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from data import SPLITS, DataError, Encoder, is_missing, tokenize
from loop import ConfigurationError, Objective, fit_linear_path
from model import TabularMLP, TextBiLSTM
from splits import Split, read_split

log = logging.getLogger("train")

# The hyperparameters whose defaults a recipe may set, and the small models' values for them.
DEFAULTS: Mapping[str, Any] = {
    "epochs": 60,
    "batch_size": 64,
    "learning_rate": 1e-3,
    "weight_decay": 1e-4,
    "patience": 8,
    "compile": "auto",
    "lr_schedule": "plateau",
    "warmup_ratio": 0.0,
    "max_grad_norm": 0.0,
}
# Default vocabulary per text feature: bag-of-words slots are dense inputs, embeddings rows are cheap.
DEFAULT_VOCABULARY = {"tabular": 2_000, "text": 20_000}

Splits = dict[str, Split]


@dataclass(frozen=True)
class Recipe:
    """One model family.

    Attributes
    ----------
    name
        The manifest's ``recipe`` and the hyperparameter's.
    unsuitable
        The reason the recipe cannot train a dataset with these feature types, or None when it can.
    read_splits
        The three splits, rows without a target dropped.
    encoder
        The encoder for the splits (train statistics, vocabularies, a tokenizer).
    network
        The network for the encoder's inputs and outputs (given the encoded train inputs).
    defaults
        Hyperparameter defaults over `DEFAULTS`, given the arguments (the adapter may matter).
    prepare
        Runs before the training loop on the network, the objective and the train tensors; what it returns
        is recorded in the evaluation (the tabular recipe's linear path).
    single_thread
        Train with one torch thread on a CPU: the small models' batches are too small for intra-op threads
        to pay off; a Transformer's matrix products are not.
    """

    name: str
    unsuitable: Callable[[set[str]], str | None]
    read_splits: Callable[[argparse.Namespace, dict[str, Any]], Splits]
    encoder: Callable[[argparse.Namespace, dict[str, Any], Splits], Encoder]
    network: Callable[[argparse.Namespace, Encoder, tuple[torch.Tensor, ...]], nn.Module]
    defaults: Callable[[argparse.Namespace], Mapping[str, Any]] = lambda args: {}
    prepare: Callable[..., dict[str, Any] | None] | None = None
    single_thread: bool = True


_REGISTRY: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add a recipe; a name is registered once."""
    if recipe.name in _REGISTRY:
        raise ValueError(f"recipe {recipe.name!r} is registered already")
    _REGISTRY[recipe.name] = recipe
    return recipe


def names() -> tuple[str, ...]:
    """The registered recipes, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Recipe:
    """The recipe called `name`.

    Raises
    ------
    ConfigurationError
        For a name no recipe has (a manifest written by newer preprocessing, say).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigurationError(
            f"the manifest asks for the {name!r} recipe; this training code has {', '.join(names())}"
        ) from None


def defaults_for(args: argparse.Namespace) -> dict[str, Any]:
    """`DEFAULTS` with the recipe's over them: the pretrained recipe's when a base model is named."""
    name = "pretrained" if getattr(args, "base_model", None) else args.recipe
    recipe = _REGISTRY.get(name)
    return {**DEFAULTS, **(recipe.defaults(args) if recipe else {})}


# ------------------------------------------------------------------------------------ shared pieces


def read_table_splits(args: argparse.Namespace, manifest: dict[str, Any]) -> Splits:
    """The CSV or JSON Lines splits' feature and target columns; rows without a target are dropped."""
    target = manifest["target"]
    features = [c["name"] for c in manifest["columns"] if c.get("role") == "feature"]
    splits = {}
    for name in SPLITS:
        split = read_split(getattr(args, name), name, [*features, target], manifest.get("delimiter", ","))
        dropped = split.drop_missing(target)
        if dropped:
            log.warning("%s split: dropped %d rows without a target", name, dropped)
        if split.rows == 0:
            raise DataError(f"{name} split is empty: no row has a target")
        splits[name] = split
    return splits


def _not_images(recipe: str) -> Callable[[set[str]], str | None]:
    def unsuitable(types: set[str]) -> str | None:
        if "image" in types:
            return (
                f"the {recipe} recipe cannot train on this dataset: the image recipe is for datasets of "
                "images (a zip of class folders), and only for them"
            )
        return None

    return unsuitable


# ------------------------------------------------------------------------------------ tabular


def _tabular_encoder(args: argparse.Namespace, manifest: dict[str, Any], splits: Splits) -> Encoder:
    return Encoder.from_manifest(
        manifest,
        train_target=splits["train"].columns[manifest["target"]],
        max_vocabulary=args.max_vocabulary or DEFAULT_VOCABULARY["tabular"],
    )


def _tabular_network(args: argparse.Namespace, encoder: Encoder, train_inputs: Any) -> nn.Module:
    return TabularMLP(
        encoder.width, encoder.output_width, args.hidden_units, args.dropout, args.linear_path == "true"
    )


def _linear_path(
    args: argparse.Namespace, network: nn.Module, objective: Objective, train: Any
) -> dict[str, Any] | None:
    """The tabular recipe's first step: fit the linear model the MLP trains on top of (`fit_linear_path`)."""
    if not isinstance(network, TabularMLP) or args.linear_path != "true":
        return None
    started = time.monotonic()
    iterations = fit_linear_path(network, objective, train)
    result = {"iterations": iterations, "seconds": round(time.monotonic() - started, 3)}
    log.info(
        "linear path: fitted in %d L-BFGS iteration(s), %.1f s; %s",
        iterations,
        result["seconds"],
        "the MLP trains on top of it" if network.linear is not None else "training goes on from it",
    )
    return result


register(
    Recipe(
        "tabular",
        unsuitable=_not_images("tabular"),
        read_splits=read_table_splits,
        encoder=_tabular_encoder,
        network=_tabular_network,
        prepare=_linear_path,
    )
)


# ------------------------------------------------------------------------------------ text (BiLSTM)


def _text_unsuitable(types: set[str]) -> str | None:
    if "text" not in types:
        return "the text recipe reads text features, and this dataset has none: use recipe tabular"
    return _not_images("text")(types)


def _text_encoder(args: argparse.Namespace, manifest: dict[str, Any], splits: Splits) -> Encoder:
    # As long as the longest train value (in tokens), up to the hyperparameter.
    longest = max(
        (
            len(tokenize(value))
            for column in manifest["columns"]
            if column.get("role") == "feature" and column.get("type") == "text"
            for value in splits["train"].columns[column["name"]]
            if not is_missing(value)
        ),
        default=1,
    )
    return Encoder.from_manifest(
        manifest,
        train_target=splits["train"].columns[manifest["target"]],
        max_vocabulary=args.max_vocabulary or DEFAULT_VOCABULARY["text"],
        text_encoding="sequence",
        sequence_length=max(1, min(args.max_sequence_length, longest)),
    )


def _text_network(args: argparse.Namespace, encoder: Encoder, train_inputs: Any) -> nn.Module:
    return TextBiLSTM(
        encoder.width,
        encoder.output_width,
        [len(f["vocabulary"]) for f in encoder.sequences],
        embedding_dim=args.embedding_dim,
        sequence_units=args.sequence_units,
        hidden_units=args.hidden_units,
        dropout=args.dropout,
    )


register(
    Recipe(
        "text",
        unsuitable=_text_unsuitable,
        read_splits=read_table_splits,
        encoder=_text_encoder,
        network=_text_network,
    )
)


# ------------------------------------------------------------------------------------ image (CNN)


def _image_unsuitable(types: set[str]) -> str | None:
    if "image" not in types:
        return (
            "the image recipe cannot train on this dataset: the image recipe is for datasets of images "
            "(a zip of class folders), and only for them"
        )
    return None


def _image_splits(args: argparse.Namespace, manifest: dict[str, Any]) -> Splits:
    from images import read_image_split  # only image datasets need Pillow

    feature = next(c["name"] for c in manifest["columns"] if c.get("role") == "feature")
    splits = {}
    for name in SPLITS:
        images = read_image_split(getattr(args, name), name)
        columns = {feature: images.images, manifest["target"]: images.labels}
        splits[name] = Split(name, columns, images.rows, images.entries)
    return splits


def _image_encoder(args: argparse.Namespace, manifest: dict[str, Any], splits: Splits) -> Encoder:
    return Encoder.from_manifest(manifest, image_size=args.image_size)


def _image_network(args: argparse.Namespace, encoder: Encoder, train_inputs: Any) -> nn.Module:
    from image_cnn import ImageCNN, channel_statistics

    # Normalised by the train images' channel statistics.
    assert encoder.image is not None
    mean, std = channel_statistics(train_inputs[0].cpu().numpy())
    return ImageCNN(encoder.output_width, encoder.image["image_size"], mean, std, dropout=args.dropout)


register(
    Recipe(
        "image",
        unsuitable=_image_unsuitable,
        read_splits=_image_splits,
        encoder=_image_encoder,
        network=_image_network,
    )
)


# ------------------------------------------------------------------------------------ pretrained


def _pretrained_unsuitable(types: set[str]) -> str | None:
    if "image" in types:
        return (
            "the pretrained recipe fine-tunes text encoders, and this dataset is images: the "
            "pretrained_image recipe fine-tunes image backbones (chosen when conveyor.json names base_model)"
        )
    return None


def _pretrained_defaults(args: argparse.Namespace) -> Mapping[str, Any]:
    import hf_text

    return hf_text.defaults(args)


def _pretrained_encoder(args: argparse.Namespace, manifest: dict[str, Any], splits: Splits) -> Encoder:
    import hf_text  # transformers is imported only when a base model trains

    return hf_text.build_encoder(args, manifest, splits)


def _pretrained_network(args: argparse.Namespace, encoder: Encoder, train_inputs: Any) -> nn.Module:
    import hf_text

    return hf_text.build_classifier(args, encoder)


register(
    Recipe(
        "pretrained",
        unsuitable=_pretrained_unsuitable,
        read_splits=read_table_splits,
        encoder=_pretrained_encoder,
        network=_pretrained_network,
        defaults=_pretrained_defaults,
        single_thread=False,
    )
)


# ------------------------------------------------------------------------------------ pretrained_image


def _pretrained_image_unsuitable(types: set[str]) -> str | None:
    if "image" not in types:
        return (
            "the pretrained_image recipe fine-tunes image backbones on datasets of images (a zip of class "
            "folders), and this dataset has none: the pretrained recipe fine-tunes text encoders"
        )
    return None


def _pretrained_image_encoder(args: argparse.Namespace, manifest: dict[str, Any], splits: Splits) -> Encoder:
    import hf_image  # transformers is imported only when a base model trains

    return hf_image.build_encoder(args, manifest, splits)


def _pretrained_image_network(args: argparse.Namespace, encoder: Encoder, train_inputs: Any) -> nn.Module:
    import hf_image

    return hf_image.build_classifier(args, encoder)


register(
    Recipe(
        "pretrained_image",
        unsuitable=_pretrained_image_unsuitable,
        read_splits=_image_splits,
        encoder=_pretrained_image_encoder,
        network=_pretrained_image_network,
        defaults=_pretrained_defaults,  # the text encoders' fine-tuning defaults suit ViTs and CNNs alike
        single_thread=False,
    )
)
