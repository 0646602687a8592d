"""The pretrained recipe for images: fine-tune an image classification backbone from the base-model hub
(docs/base-models.md).

Any backbone ``transformers`` loads with ``AutoModelForImageClassification`` (ViT, DeiT, BEiT, Swin, DINOv2,
ConvNeXt, ResNet, RegNet, EfficientNet, MobileNet ...) gets a new head for the dataset's classes and trains
end to end (``adapter`` full) or as peft's LoRA adapters on a frozen base (``adapter`` lora). The base comes
from the job's ``base`` channel, checked against the digest `conveyor base-models push` recorded; nothing is
ever downloaded.

The images are prepared as the base's own ``preprocessor_config.json`` says (`preprocessing`): its input
size, its centre crop, its mean and standard deviation. They are decoded once to uint8 squares of the input
size (`images.decode_images`, the centre crop in the same resampling), and the network normalises them
itself, with the image recipe's random flip and shift while it trains, so serving decodes a request's image
exactly as training did.

Shipped with the model (``code/hf_image.py``): serving loads the fine-tuned model from ``hf/`` (a LoRA model
is merged into its base first, so serving needs no peft).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from data import DataError, Encoder
from hf_text import (
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_RANK,
    MODEL_DIRECTORY,
    SERVING_REQUIREMENTS,
    decay_groups,
    quiet,
    ready_to_train,
    save_fine_tuned,
    verify_base,
)

if TYPE_CHECKING:  # splits.py is training-only; this file also serves
    from splits import Split

log = logging.getLogger("train")
ARCHITECTURE = "hf_image_classifier"
PREPROCESSOR_FILE = "preprocessor_config.json"
# transformers' image processors rescale pixels by 1/255 and normalise with ImageNet's statistics unless
# their config says otherwise (IMAGENET_DEFAULT_MEAN and _STD).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# ConvNeXt's processor crops (by crop_pct) only below this input size, and resizes to the size above it.
CONVNEXT_NO_CROP_FROM = 384


@dataclass(frozen=True)
class Preprocessing:
    """How a base model's images are prepared: a centre square keeping `crop` of the shorter side, resized
    to `image_size`, then normalised per channel with `mean` and `std` (in [0, 1] units)."""

    image_size: int
    crop: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        return cls(
            int(values["image_size"]),
            float(values.get("crop", 1.0)),
            _three(values["mean"], "mean"),
            _three(values["std"], "std"),
        )


def preprocessing(directory: str | Path) -> Preprocessing:
    """The preprocessing a base model's ``preprocessor_config.json`` names, as `Preprocessing`.

    Its ``crop_size`` (when ``do_center_crop``) is the input size, and the crop is that over the resized
    shorter side (``size``); ConvNeXt-style configs give the crop as ``crop_pct`` instead. A processor that
    resizes to a fixed height and width without cropping (ViT's) gets the image's central square: conveyor
    never distorts an image's aspect.

    Raises
    ------
    DataError
        When the file is missing, does not parse, or names a size that is not a positive number of pixels.
    """
    path = Path(directory) / PREPROCESSOR_FILE
    if not path.is_file():
        raise DataError(
            f"the base model has no {PREPROCESSOR_FILE}: save its image processor with save_pretrained "
            "beside the model, so training and serving prepare images as the base was trained on them"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"the base model's {PREPROCESSOR_FILE} does not parse: {error}") from None
    if not isinstance(config, dict):
        raise DataError(f"the base model's {PREPROCESSOR_FILE} is not a JSON object")
    resize = _side(config.get("size"), "size")
    size, crop = resize, 1.0
    crop_size = config.get("crop_size")
    if config.get("crop_pct") is not None and "crop_size" not in config:
        if resize < CONVNEXT_NO_CROP_FROM:
            crop = float(config["crop_pct"])
    elif config.get("do_center_crop", crop_size is not None) and crop_size is not None:
        size = _side(crop_size, "crop_size")
        crop = size / resize
    if not 0.0 < crop <= 1.0:
        raise DataError(
            f"the base model's {PREPROCESSOR_FILE} crops {crop:.3f} of each image: a centre crop keeps "
            "between 0 and all of it"
        )
    normalise = config.get("do_normalize", True)
    mean = _three(config.get("image_mean", IMAGENET_MEAN), "image_mean") if normalise else (0.0, 0.0, 0.0)
    std = _three(config.get("image_std", IMAGENET_STD), "image_std") if normalise else (1.0, 1.0, 1.0)
    if min(std) <= 0:
        raise DataError(f"the base model's {PREPROCESSOR_FILE} has an image_std that is not positive: {std}")
    return Preprocessing(size, round(crop, 6), mean, std)


def _side(value: Any, key: str) -> int:
    # transformers writes sizes as {"shortest_edge": n}, {"height": h, "width": w} or a bare number.
    if isinstance(value, Mapping):
        value = value.get("shortest_edge", value.get("height", value.get("width")))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
        raise DataError(
            f"the base model's {PREPROCESSOR_FILE} has no usable {key} (a number of pixels, or "
            '{"shortest_edge": n} or {"height": n, "width": n})'
        )
    return int(value)


def _three(values: Any, key: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values] * 3
    if not isinstance(values, Sequence) or len(values) != 3:
        raise DataError(f"the base model's {key} needs three values (RGB), got {values!r}")
    first, second, third = (float(v) for v in values)
    return first, second, third


def build_encoder(args: argparse.Namespace, manifest: dict[str, Any], splits: dict[str, Split]) -> Encoder:
    """The image encoding of the dataset at the base's input size and crop; `args.image_size` is settled to
    it."""
    quiet()
    from transformers import AutoConfig

    digest = verify_base(args.base, args.base_model_digest)
    config = AutoConfig.from_pretrained(args.base, local_files_only=True)
    channels = getattr(config, "num_channels", 3)
    if channels != 3:
        raise DataError(f"base model {args.base_model} reads {channels}-channel images; conveyor decodes RGB")
    prepared = preprocessing(args.base)
    args.image_size = prepared.image_size
    args.preprocessing = prepared
    log.info(
        "base model %s (%s, %s): images cut to their centre %.1f%% and resized to %dx%d, normalised with "
        "mean %s and std %s",
        args.base_model,
        getattr(config, "model_type", "?"),
        digest[:19],
        100 * prepared.crop,
        prepared.image_size,
        prepared.image_size,
        [round(m, 3) for m in prepared.mean],
        [round(s, 3) for s in prepared.std],
    )
    return Encoder.from_manifest(manifest, image_size=prepared.image_size, image_crop=prepared.crop)


# ------------------------------------------------------------------------------------ the network


class ImageClassifier(nn.Module):
    """A ``transformers`` image classification model over uint8 images: ``forward(images)`` normalises
    them as the base's preprocessing says (and augments them in training mode, `image_cnn.augment`) and
    returns one logit per class.

    Parameters
    ----------
    model
        ``AutoModelForImageClassification``'s model, or peft's model around it.
    info
        What `architecture` records beside the name: base model, digest, adapter, labels, parameters.
    prepared
        The base's preprocessing.
    base_directory
        The base model's folder: `save_weights` copies its preprocessor_config.json beside the model.
    """

    predict_batch_rows = 64
    serving_requirements = SERVING_REQUIREMENTS
    scale: torch.Tensor  # buffers (register_buffer)
    shift: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        info: Mapping[str, Any],
        prepared: Preprocessing,
        base_directory: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.info = dict(info)
        self.prepared = prepared
        self.base_directory = Path(base_directory) if base_directory else None
        # uint8 -> normalised float in one multiply-add: (x / 255 - mean) / std, as ImageCNN does.
        std = torch.tensor(prepared.std).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -torch.tensor(prepared.mean).view(1, 3, 1, 1) / std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a uint8 ``(N, 3, image_size, image_size)`` batch."""
        from image_cnn import augment

        x = images.float() * self.scale + self.shift
        if self.training:
            x = augment(x)
        return self.model(pixel_values=x.contiguous(memory_format=torch.channels_last)).logits

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW's groups: weight decay on weight matrices and kernels, none on biases and norms (1-D)."""
        return decay_groups(self, weight_decay)

    def architecture(self) -> dict[str, Any]:
        """What serving needs to load the model (``model_config.json``); the weights are in ``hf/``."""
        return {
            "name": ARCHITECTURE,
            "directory": MODEL_DIRECTORY,
            **self.info,
            "preprocessing": self.prepared.as_dict(),
        }

    def save_weights(self, model_dir: Path) -> None:
        """The fine-tuned model in ``hf/`` (safetensors) with the base's preprocessor_config.json; a LoRA
        run's adapter alone in ``adapter/`` too, and ``hf/`` then holds it merged into the base."""
        self.model = save_fine_tuned(self.model, self.info, model_dir)
        if self.base_directory is not None and (self.base_directory / PREPROCESSOR_FILE).is_file():
            shutil.copy2(
                self.base_directory / PREPROCESSOR_FILE, model_dir / MODEL_DIRECTORY / PREPROCESSOR_FILE
            )


def build_classifier(args: argparse.Namespace, encoder: Encoder) -> ImageClassifier:
    """The base model with a new head for the encoder's classes, as `args.adapter` trains it."""
    from transformers import AutoModelForImageClassification

    quiet()
    model, loading = AutoModelForImageClassification.from_pretrained(
        str(args.base),
        id2label={i: str(label) for i, label in enumerate(encoder.labels)},
        label2id={str(label): i for i, label in enumerate(encoder.labels)},
        ignore_mismatched_sizes=True,  # a base fine-tuned before (ImageNet's 1,000 classes) brings its head
        output_loading_info=True,
        local_files_only=True,
        dtype=torch.float32,  # float32 weights; the steps autocast to bf16 on a GPU
    )
    model, info = ready_to_train(model, loading, args, with_lora)
    info["num_labels"] = encoder.output_width
    return ImageClassifier(model, info, args.preprocessing, args.base)


def with_lora(model: nn.Module, new_modules: list[str]) -> nn.Module:
    """peft's LoRA on every linear layer of the base (a ViT's attention and MLP), or, for a convolutional
    base without them (ResNet, RegNet), on its ungrouped convolutions; the new head trains whole."""
    from peft import LoraConfig, get_peft_model

    settings: dict[str, Any] = {
        "r": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": LORA_DROPOUT,
        "modules_to_save": new_modules or None,
    }
    linear = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[0] not in new_modules
    ]
    if linear:
        return get_peft_model(model, LoraConfig(target_modules="all-linear", **settings))  # type: ignore[arg-type]
    convolutions = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and module.groups == 1 and name.split(".")[0] not in new_modules
    ]
    if not convolutions:
        raise DataError(
            "LoRA found no linear layer or ungrouped convolution to adapt in this base model: use "
            '"adapter": "full"'
        )
    return get_peft_model(model, LoraConfig(target_modules=convolutions, **settings))  # type: ignore[arg-type]


def load_classifier(model_dir: str | Path, architecture: Mapping[str, Any]) -> ImageClassifier:
    """The fine-tuned model a training job saved (`ImageClassifier.save_weights`)."""
    from transformers import AutoModelForImageClassification

    quiet()
    directory = Path(model_dir) / architecture.get("directory", MODEL_DIRECTORY)
    model = AutoModelForImageClassification.from_pretrained(
        str(directory), local_files_only=True, dtype=torch.float32
    )
    info = {k: v for k, v in architecture.items() if k not in ("name", "directory", "preprocessing")}
    return ImageClassifier(model, info, Preprocessing.from_dict(architecture["preprocessing"]))
