"""Tiny random-initialised Transformer encoders saved with `save_pretrained`, for tests: nothing is
downloaded. Each has a WordPiece vocabulary of the given words, so it tokenises the test data into real
ids, and a few thousand parameters, so it fine-tunes in seconds on a CPU."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the",
    "a",
    "is",
    "was",
    "not",
    "very",
    "good",
    "bad",
    "great",
    "awful",
    "terrible",
    "fine",
    "love",
    "hate",
    "movie",
    "film",
    "plot",
    "actor",
    "boring",
    "fun",
    "excellent",
    "poor",
    "product",
    "service",
    "fast",
    "slow",
    "broken",
    "works",
    "refund",
    "happy",
    "sad",
    "ok",
    "and",
    "but",
    "it",
    "this",
]


def save_tiny_encoder(
    folder: Path,
    family: str = "bert",
    words: Iterable[str] = WORDS,
    hidden: int = 16,
    layers: int = 2,
    dropout: float = 0.1,
) -> Path:
    """Save a tiny `family` ("bert" or "distilbert") encoder and its tokenizer to `folder`; returns it.
    (`dropout` 0: training is deterministic whatever the processes draw, so runs can be compared.)"""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast, DistilBertConfig, DistilBertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = [*SPECIAL, *dict.fromkeys(w.lower() for w in words)]
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    torch.manual_seed(0)
    if family == "bert":
        config = BertConfig(
            vocab_size=len(vocabulary),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=64,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        model = BertModel(config)
    elif family == "distilbert":
        config = DistilBertConfig(
            vocab_size=len(vocabulary), dim=hidden, n_layers=layers, n_heads=2, hidden_dim=2 * hidden,
            max_position_embeddings=64, dropout=dropout, attention_dropout=dropout, seq_classif_dropout=dropout,
        )  # fmt: skip
        model = DistilBertModel(config)
    else:
        raise ValueError(family)
    model.save_pretrained(folder)
    # transformers 5 takes the vocabulary as `vocab` (a path or a dict); `vocab_file` is ignored there.
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocabulary)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    return folder


def record_base(folder: Path, name: str = "tiny") -> str:
    """Write ``conveyor-base.json`` into `folder` as `conveyor base-models push` records it; returns the
    digest (what preprocessing passes a training job as ``base_model_digest``)."""
    import json

    from common import base_models as hub

    folder = Path(folder)
    info = hub.inspect(hub.FolderFiles(folder))
    sizes = hub.FolderFiles(folder).sizes()
    sizes.pop(hub.MANIFEST_NAME, None)
    hashes = {n: (size, hub.file_sha256(lambda p=folder / n: [p.read_bytes()])) for n, size in sizes.items()}
    manifest = hub.build_manifest(name, info, hashes)
    (folder / hub.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return manifest["digest"]


def save_tiny_image_model(folder: Path, family: str = "vit", image_size: int = 16, labels: int = 10) -> Path:
    """Save a tiny random-initialised image classifier (`family` "vit" or "resnet", with a head for `labels`
    classes as an ImageNet model has its own) and its image processor's config to `folder`; returns it.

    The ViT's processor resizes to a fixed size, as ViT's do; the ResNet's resizes the shorter side and crops
    87.5% of it, as microsoft/resnet-50's ConvNeXt-style processor does."""
    import torch
    from transformers import (
        ConvNextImageProcessor,
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if family == "vit":
        config = ViTConfig(
            image_size=image_size, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, num_labels=labels,
        )  # fmt: skip
        model = ViTForImageClassification(config)
        processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    elif family == "resnet":
        config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=labels)
        model = ResNetForImageClassification(config)
        processor = ConvNextImageProcessor(size={"shortest_edge": image_size}, crop_pct=0.875)
    else:
        raise ValueError(family)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
