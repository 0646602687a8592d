"""The pretrained recipe for text: fine-tune a Transformer encoder from the base-model hub (docs/base-models.md).

Any encoder ``transformers`` loads with ``AutoModelForSequenceClassification`` (BERT, DistilBERT, RoBERTa,
MiniLM, DeBERTa ...) gets a new head for the dataset's classes, or one output for regression, and trains
end to end (``adapter`` full) or as peft's LoRA adapters on a frozen base (``adapter`` lora). The base comes
from the job's ``base`` channel, checked against the digest `conveyor base-models push` recorded; nothing is
ever downloaded.

Each row is one text (`data.Encoder.row_texts`) cut to ``max_length`` tokens; a batch is cut to its own
longest row (dynamic padding). The shared loop (`loop.fit`) trains it with the recipe's defaults: AdamW
without decay on biases and LayerNorm, linear warm-up and decay, clipped gradients, bf16 autocast on a GPU.

Shipped with the model (``code/hf_text.py``): serving loads the fine-tuned model from ``hf/`` (a LoRA model
is merged into its base first, so serving needs no peft).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from data import DataError, Encoder

if TYPE_CHECKING:  # splits.py is training-only; this file also serves
    from splits import Split

# Jobs and servers read base models from disk only: never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

log = logging.getLogger("train")
ARCHITECTURE = "hf_sequence_classifier"
# Where the model directory keeps the fine-tuned model (Hugging Face layout) and a LoRA run's adapter.
MODEL_DIRECTORY, ADAPTER_DIRECTORY = "hf", "adapter"
BASE_MANIFEST = (
    "conveyor-base.json"  # written by `conveyor base-models push` (functions/common/base_models.py)
)
# LoRA as peft's documentation and the LoRA paper fine-tune encoders: rank 8, alpha 16.
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 8, 16, 0.1
SERVING_REQUIREMENTS = (
    "# A fine-tuned base model: the PyTorch inference image provides torch; these read its files.\n"
    "transformers==5.23.0\ntokenizers==0.23.3\nsafetensors==0.8.0\n"
)


def defaults(args: argparse.Namespace) -> Mapping[str, Any]:
    """The recipe's hyperparameter defaults: transformers' Trainer's learning rate (5e-5) with BERT's
    fine-tuning schedule (warm-up over a tenth of the steps, then linear decay), a few epochs more than its
    3 for small datasets (early stopping keeps the best); LoRA's adapters take a larger rate, as peft's
    examples do."""
    return {
        "epochs": 5,
        "batch_size": 16,
        "learning_rate": 3e-4 if getattr(args, "adapter", "full") == "lora" else 5e-5,
        "weight_decay": 0.01,
        "patience": 2,
        # Dynamic padding gives every batch its own shape: compiling would recompile for most of them.
        "compile": "false",
        "lr_schedule": "linear",
        "warmup_ratio": 0.1,
        "max_grad_norm": 1.0,
    }


# ------------------------------------------------------------------------------------ the base channel


def verify_base(directory: str | Path, expected: str | None) -> str:
    """Check the base channel against its ``conveyor-base.json`` (every file's SHA-256) and against the
    digest preprocessing checked (`expected`); returns the digest.

    Raises
    ------
    DataError
        When a file is missing or changed, or the base is not the one preprocessing checked.
    """
    directory = Path(directory)
    manifest_path = directory / BASE_MANIFEST
    if not manifest_path.exists():
        # A base copied in by hand: preprocessing digested its names and sizes.
        sizes = {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*") if p.is_file()}
        listing = "".join(f"{n}\0{s}\n" for n, s in sorted(sizes.items()))
        digest = "sizes-sha256:" + hashlib.sha256(listing.encode()).hexdigest()
    else:
        recorded = json.loads(manifest_path.read_text(encoding="utf-8"))
        for name, entry in sorted(recorded["files"].items()):
            path = directory / name
            if not path.is_file() or _sha256(path) != entry["sha256"]:
                raise DataError(
                    f"base model file {name} is missing or changed since it was pushed: push the base "
                    "model again under a new name"
                )
        # The manifest's formula (common.base_models.manifest_digest), over the hashes just checked.
        lines = "".join(f"{n}\0{recorded['files'][n]['sha256']}\n" for n in sorted(recorded["files"]))
        digest = "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
    if expected and digest != expected:
        raise DataError(
            f"the base channel holds base model {digest}, not the {expected} that preprocessing checked: "
            "upload the dataset again to retrain on the base model as it is now"
        )
    return digest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def quiet() -> None:
    # A job's log is a file: transformers' per-file progress bars only clutter it.
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        # A DataError's message is the job's failure reason as it is (this file also serves: no loop.py).
        raise DataError(
            "the pretrained recipes need transformers, tokenizers and safetensors (and peft for LoRA), and "
            "this training image has none: the job should run sourcedir-hf.tar.gz, which brings their wheels "
            "(training/requirements-hf.txt); run `conveyor publish-code` for this stack, and upload the "
            "dataset again"
        ) from None
    transformers_logging.disable_progress_bar()


def load_tokenizer(directory: str | Path) -> Any:
    """The base model's own tokenizer, padding on the right (a batch is cut to its longest row)."""
    from transformers import AutoTokenizer

    quiet()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.padding_side = "right"
    return tokenizer


def build_encoder(args: argparse.Namespace, manifest: dict[str, Any], splits: dict[str, Split]) -> Encoder:
    """The pretrained encoding of the dataset, with the base's tokenizer; `args.max_length` is settled to
    what the base can read (its position embeddings)."""
    quiet()
    from transformers import AutoConfig

    digest = verify_base(args.base, args.base_model_digest)
    config = AutoConfig.from_pretrained(args.base, local_files_only=True)
    tokenizer = load_tokenizer(args.base)
    limits = [
        n
        for n in (
            getattr(config, "max_position_embeddings", None),
            getattr(tokenizer, "model_max_length", None),
        )
        if isinstance(n, int) and 0 < n < 1_000_000
    ]
    length = min([args.max_length, *limits])
    if length < args.max_length:
        log.info(
            "max_length %d is more than %s reads: rows are cut to %d tokens",
            args.max_length,
            args.base_model,
            length,
        )
    args.max_length = length
    encoder = Encoder.from_manifest(
        manifest,
        train_target=splits["train"].columns[manifest["target"]],
        text_encoding="pretrained",
        sequence_length=length,
    )
    encoder.tokenizer = tokenizer
    train = splits["train"]
    example = encoder.row_texts({n: train.columns[n][:1] for n in encoder.feature_names}, min(1, train.rows))
    log.info(
        "base model %s (%s, %s): rows read as text of at most %d tokens, e.g. %r",
        args.base_model,
        getattr(config, "model_type", "?"),
        digest[:19],
        length,
        (example[0][:120] if example else ""),
    )
    return encoder


# ------------------------------------------------------------------------------------ the network


class SequenceClassifier(nn.Module):
    """A ``transformers`` sequence classification model as the training loop and serving call it:
    ``forward(input_ids, attention_mask)`` returns logits (one per class, or the standardised value).

    Parameters
    ----------
    model
        ``AutoModelForSequenceClassification``'s model, or peft's model around it.
    info
        What `architecture` records beside the name: base model, digest, adapter, max length, labels.
    tokenizer
        The base's tokenizer, saved with the model.
    """

    # Rows per forward pass when predicting (`loop.predict`, `inference.predict_fn`).
    predict_batch_rows = 64
    predict_batch_tokens = 2048  # padded tokens per forward pass when predicting: 16 rows of 128
    serving_requirements = SERVING_REQUIREMENTS

    def __init__(self, model: nn.Module, info: Mapping[str, Any], tokenizer: Any = None) -> None:
        super().__init__()
        self.model = model
        self.info = dict(info)
        self.tokenizer = tokenizer

    def row_lengths(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Each row's tokens: `model.outputs_in_batches` batches rows of about one length together."""
        return attention_mask.sum(dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits for a batch; its columns past its longest row (all padding) are cut first."""
        if len(input_ids):
            longest = max(1, int(attention_mask.sum(dim=1).max()))
            input_ids, attention_mask = input_ids[:, :longest], attention_mask[:, :longest]
        output = self.model(input_ids=input_ids.long(), attention_mask=attention_mask.long())
        return output.logits

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW's groups: weight decay on the weight matrices, none on biases and LayerNorm (1-D)."""
        return decay_groups(self, weight_decay)

    def architecture(self) -> dict[str, Any]:
        """What serving needs to load the model (``model_config.json``); the weights are in ``hf/``."""
        return {"name": ARCHITECTURE, "directory": MODEL_DIRECTORY, **self.info}

    def save_weights(self, model_dir: Path) -> None:
        """The fine-tuned model and its tokenizer in ``hf/`` (safetensors); a LoRA run's adapter alone in
        ``adapter/`` too, and ``hf/`` then holds it merged into the base, so serving runs one plain model."""
        self.model = save_fine_tuned(self.model, self.info, model_dir)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(model_dir / MODEL_DIRECTORY))


def build_classifier(args: argparse.Namespace, encoder: Encoder) -> SequenceClassifier:
    """The base model with a new head for the encoder's task, as `args.adapter` trains it."""
    from transformers import AutoModelForSequenceClassification

    quiet()
    classification = encoder.task == "classification"
    names = (
        {
            "id2label": {i: str(label) for i, label in enumerate(encoder.labels)},
            "label2id": {str(label): i for i, label in enumerate(encoder.labels)},
        }
        if classification
        else {"num_labels": 1}  # a classifier's count follows from id2label (both warn if a head differs)
    )
    model, loading = AutoModelForSequenceClassification.from_pretrained(
        str(args.base),
        problem_type="single_label_classification" if classification else "regression",
        ignore_mismatched_sizes=True,  # a base fine-tuned before brings a head of another size
        output_loading_info=True,
        local_files_only=True,
        dtype=torch.float32,  # float32 weights; the steps autocast to bf16 on a GPU
        **names,
    )
    model, info = ready_to_train(model, loading, args, with_lora)
    info.update(max_length=encoder.sequence_length, num_labels=encoder.output_width)
    return SequenceClassifier(model, info, encoder.tokenizer)


def ready_to_train(
    model: Any, loading: Mapping[str, Any], args: argparse.Namespace, lora: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """A base loaded with a new head (``from_pretrained(..., output_loading_info=True)``) made ready as
    `args` asks: gradient checkpointing, and `lora(model, new_modules)` for the LoRA adapter (the new modules,
    named from the loading info, train whole). Logs what trains; returns the model and what every fine-tuned
    model's architecture records of it.

    Raises
    ------
    DataError
        When gradient checkpointing is asked of a model type that does not support it.
    """
    new_keys = [
        k if isinstance(k, str) else k[0] for k in [*loading["missing_keys"], *loading["mismatched_keys"]]
    ]
    new_modules = sorted({key.split(".")[0] for key in new_keys})
    parameters = sum(p.numel() for p in model.parameters())
    if args.gradient_checkpointing == "true":
        if not model.supports_gradient_checkpointing:
            raise DataError(
                f"base model {args.base_model} ({model.config.model_type}) does not support gradient "
                'checkpointing: remove "gradient_checkpointing" from the hyperparameters'
            )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.adapter == "lora":
        model = lora(model, list(new_modules))  # peft extends the list it is given
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "%s: %d parameters, %d trained (%s adapter); new, randomly initialised: %s",
        args.base_model,
        parameters,
        trained,
        args.adapter,
        ", ".join(new_modules) or "nothing",
    )
    info = {
        "base_model": args.base_model,
        "base_model_digest": args.base_model_digest,
        "model_type": getattr(model.config, "model_type", None),
        "adapter": args.adapter,
        "parameters": parameters,
        "trained_parameters": trained,
    }
    return model, info


def decay_groups(network: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's groups of a fine-tuned network: decay on weight matrices and kernels, none on biases and
    norms (1-D)."""
    trained = [p for p in network.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trained if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0},
    ]


def save_fine_tuned(model: Any, info: Mapping[str, Any], model_dir: Path) -> Any:
    """Save a fine-tuned model in ``hf/`` (safetensors); a LoRA run's adapter alone in ``adapter/`` too,
    and ``hf/`` then holds it merged into the base. Returns the model as saved (merged)."""
    if info.get("adapter") == "lora":
        model.save_pretrained(str(model_dir / ADAPTER_DIRECTORY))
        model = model.merge_and_unload()
    model.save_pretrained(str(model_dir / MODEL_DIRECTORY))
    return model


def with_lora(model: nn.Module, new_modules: list[str]) -> nn.Module:
    """peft's LoRA on the base's attention (peft's default modules for the model type, else every linear
    layer); the freshly initialised head trains whole."""
    from peft import LoraConfig, get_peft_model

    settings = {
        "task_type": "SEQ_CLS",
        "r": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": LORA_DROPOUT,
        "modules_to_save": new_modules or None,
    }
    try:
        return get_peft_model(model, LoraConfig(**settings))  # type: ignore[arg-type]
    except ValueError:  # peft has no default target modules for this model type
        return get_peft_model(model, LoraConfig(target_modules="all-linear", **settings))  # type: ignore[arg-type]


def load_classifier(model_dir: str | Path, architecture: Mapping[str, Any]) -> SequenceClassifier:
    """The fine-tuned model a training job saved (`SequenceClassifier.save_weights`), with its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    directory = Path(model_dir) / architecture.get("directory", MODEL_DIRECTORY)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(directory), local_files_only=True, dtype=torch.float32
    )
    info = {k: v for k, v in architecture.items() if k not in ("name", "directory")}
    return SequenceClassifier(model, info, load_tokenizer(directory))
