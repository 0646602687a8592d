"""The training job's arguments: channels, output directories and hyperparameters, with defaults from
SageMaker's ``SM_*`` variables (docs/contracts.md, section 3), so the same job runs in the training image
and on a laptop::

    python training/train.py --train d/train --validation d/validation --test d/test \\
        --manifest d/manifest --epochs 5

A hyperparameter whose default is None takes the recipe's (`recipes.DEFAULTS`, the pretrained recipe's).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import recipes
from data import SPLITS
from loop import IMBALANCE_RATIO, ConfigurationError

log = logging.getLogger("train")
CHANNELS = (*SPLITS, "manifest")
# The pretrained recipe's base model (conveyor-base.json and its files), when the spec names one.
OPTIONAL_CHANNELS = ("base",)
RECIPES = recipes.names()
HYPERPARAMETERS = (
    "recipe",
    "epochs",
    "batch_size",
    "learning_rate",
    "hidden_units",
    "linear_path",
    "dropout",
    "weight_decay",
    "class_weights",
    "max_vocabulary",
    "max_sequence_length",
    "embedding_dim",
    "sequence_units",
    "image_size",
    "seed",
    "patience",
    "checkpoint_steps",
    "precision",
    "compile",
    "lr_schedule",
    "warmup_ratio",
    "max_grad_norm",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "sharding",
    "base_model",
    "base_model_digest",
    "adapter",
    "max_length",
)


class _Parser(argparse.ArgumentParser):
    # argparse would print usage and exit 2; raising lets main() record the reason in the failure file.
    def error(self, message: str) -> Any:
        raise ConfigurationError(message)


def _option(group: Any, name: str, **settings: Any) -> None:
    """An option spelled both ways, ``--max-length`` and ``--max_length`` (SageMaker passes hyperparameters
    with the underscores of their names), stored as `name`."""
    group.add_argument(f"--{name.replace('_', '-')}", f"--{name}", dest=name, **settings)


def parse_hidden_units(text: str) -> tuple[int, ...]:
    """Hidden layer widths from ``"128,64"`` (also ``"[128, 64]"`` or ``"128 64"``; empty: no hidden layer)."""
    parts = str(text).strip().strip("[]()\"'").replace(",", " ").split()
    try:
        units = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"hidden_units must be comma-separated integers, got {text!r}"
        ) from None
    if any(u < 1 for u in units):
        raise argparse.ArgumentTypeError(f"hidden_units must be positive, got {text!r}")
    return units


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Channels, output directories and hyperparameters, with defaults from SageMaker's ``SM_*`` variables.

    Parameters
    ----------
    argv
        The arguments; ``sys.argv[1:]`` when None. Arguments this script does not know (SageMaker adds
        ``--sagemaker_program`` and the like) are ignored.

    Returns
    -------
    argparse.Namespace

    Raises
    ------
    ConfigurationError
        For a missing channel or a hyperparameter out of range.
    """
    env = os.environ
    parser = _Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    _option(parser, "model_dir", default=env.get("SM_MODEL_DIR", "model"))
    _option(
        parser,
        "output_data_dir",
        default=env.get("SM_OUTPUT_DATA_DIR", "output"),
    )
    for channel in (*CHANNELS, *OPTIONAL_CHANNELS):
        parser.add_argument(
            f"--{channel}",
            default=env.get(f"SM_CHANNEL_{channel.upper()}"),
            help=f"the {channel} channel directory (SM_CHANNEL_{channel.upper()})",
        )
    hyper = parser.add_argument_group("hyperparameters (also read from SM_HPS)")
    hyper.add_argument(
        "--recipe",
        default="auto",
        choices=("auto", *RECIPES),
        help="tabular (an MLP; text as bags of words), text (a BiLSTM reads text in order), image (a "
        "CNN; image datasets only), pretrained (fine-tunes base_model on text) or pretrained_image "
        "(fine-tunes base_model on images); auto: the manifest's recipe",
    )
    # Defaults of None are the recipe's (recipes.DEFAULTS; the pretrained recipe's differ).
    hyper.add_argument("--epochs", type=int, default=None)
    _option(hyper, "batch_size", type=int, default=None)
    _option(hyper, "learning_rate", type=float, default=None)
    _option(
        hyper,
        "hidden_units",
        type=parse_hidden_units,
        default=(128, 64),
        help='hidden layer widths, e.g. "128,64"',
    )
    _option(
        hyper,
        "linear_path",
        default="true",
        choices=("true", "false"),
        help="tabular recipe: fit a linear model first (L2-regularised, as scikit-learn's LogisticRegression "
        "and Ridge by default), keep it, and train the MLP on top of it for what it misses; the MLP's part "
        "is kept only as far as it lowers validation loss",
    )
    hyper.add_argument("--dropout", type=float, default=0.1)
    _option(hyper, "weight_decay", type=float, default=None)
    _option(
        hyper,
        "class_weights",
        default="auto",
        choices=("auto", "none", "sqrt", "balanced"),
        help="weight classes by inverse frequency (balanced), its square root, or not at all; auto: sqrt "
        f"when the most common class outnumbers the rarest more than {IMBALANCE_RATIO:g} to 1 in train, "
        "else none",
    )
    _option(
        hyper,
        "max_vocabulary",
        type=int,
        default=None,
        help="tokens kept per text feature, its most frequent in train (from the manifest): bag-of-words "
        "slots (tabular recipe, default 2000) or embedded tokens (text recipe, default 20000)",
    )
    _option(
        hyper,
        "max_sequence_length",
        type=int,
        default=256,
        help="text recipe: tokens read per text value, its first ones (at most the longest in train)",
    )
    _option(hyper, "embedding_dim", type=int, default=64)
    _option(
        hyper,
        "sequence_units",
        type=int,
        default=64,
        help="text recipe: LSTM units per direction",
    )
    _option(
        hyper,
        "image_size",
        type=int,
        default=64,
        help="image recipe: the side of the square each image is resized and cropped to, in pixels",
    )
    hyper.add_argument("--seed", type=int, default=7)
    hyper.add_argument("--patience", type=int, default=None, help="epochs without a lower validation loss")
    _option(
        hyper,
        "checkpoint_steps",
        type=int,
        default=500,
        help="save a checkpoint every this many optimizer steps (and at every epoch's end); 0: epochs only",
    )
    hyper.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "bf16", "fp32"),
        help="bf16: mixed precision (bfloat16 autocast) for the training steps; auto: bf16 on a GPU that "
        "supports it (Ampere and newer), else fp32",
    )
    hyper.add_argument(
        "--compile",
        default=None,
        choices=("auto", "true", "false"),
        help="torch.compile the network for the training steps; auto: on a GPU only (on a CPU the "
        "compilation takes longer than small models train); the pretrained recipe's default is false",
    )
    _option(
        hyper,
        "lr_schedule",
        default=None,
        choices=("plateau", "linear"),
        help="plateau: halve the learning rate when validation loss stalls (the small models' default); "
        "linear: warm up over warmup_ratio of the steps, then decay to 0 (the pretrained recipe's)",
    )
    _option(hyper, "warmup_ratio", type=float, default=None)
    _option(
        hyper,
        "max_grad_norm",
        type=float,
        default=None,
        help="clip the gradients' norm to this before each step; 0: no clipping",
    )
    _option(
        hyper,
        "gradient_accumulation_steps",
        type=int,
        default=1,
        help="split each batch into this many micro-batches, one forward and backward pass each, and step "
        "once: the same batch in less memory",
    )
    _option(
        hyper,
        "gradient_checkpointing",
        default="false",
        choices=("true", "false"),
        help="pretrained recipe: recompute activations in the backward pass instead of keeping them "
        "(less memory, about a third more compute)",
    )
    hyper.add_argument(
        "--sharding",
        default="auto",
        choices=("auto", "none", "fsdp"),
        help="with several training processes: fsdp shards the weights, gradients and optimiser state over "
        "them (PyTorch FSDP2) instead of each holding the whole model; auto: fsdp on GPUs when the model does "
        "not fit one device's memory",
    )
    base = parser.add_argument_group("the pretrained recipe (set by preprocessing from conveyor.json)")
    _option(base, "base_model", default=None)
    _option(
        base,
        "base_model_digest",
        default=None,
        help="the digest conveyor-base.json recorded; the base channel must match it",
    )
    base.add_argument("--adapter", default="full", choices=("full", "lora"))
    _option(
        base,
        "max_length",
        type=int,
        default=128,
        help="tokens the base model reads per row, its first ones (at most its position embeddings)",
    )
    parser.set_defaults(**_defaults_from_sm_hps())

    args, unknown = parser.parse_known_args(argv)
    if unknown:
        log.info("ignoring arguments this script does not use: %s", " ".join(unknown))
    for name, value in recipes.defaults_for(args).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    missing = [c for c in CHANNELS if not getattr(args, c)]
    if args.base_model and not args.base:
        missing.append("base")
    if missing:
        raise ConfigurationError(
            "missing channel(s) "
            + ", ".join(missing)
            + ": pass --"
            + " --".join(missing)
            + " or set "
            + ", ".join(f"SM_CHANNEL_{c.upper()}" for c in missing)
        )
    checks = {
        "epochs": args.epochs >= 1,
        "batch_size": args.batch_size >= 1,
        "learning_rate": args.learning_rate > 0,
        "dropout": 0 <= args.dropout < 1,
        "weight_decay": args.weight_decay >= 0,
        "patience": args.patience >= 1,
        "class_weights": args.class_weights in ("auto", "none", "sqrt", "balanced"),
        "max_vocabulary": args.max_vocabulary is None or args.max_vocabulary >= 1,
        "max_sequence_length": args.max_sequence_length >= 1,
        "embedding_dim": args.embedding_dim >= 1,
        "sequence_units": args.sequence_units >= 1,
        "image_size": 8 <= args.image_size <= 1024,
        "checkpoint_steps": args.checkpoint_steps >= 0,
        "warmup_ratio": 0 <= args.warmup_ratio < 1,
        "max_grad_norm": args.max_grad_norm >= 0,
        "gradient_accumulation_steps": 1 <= args.gradient_accumulation_steps <= args.batch_size,
        "max_length": 2 <= args.max_length <= 65_536,
    }
    bad = [f"{name}={getattr(args, name)}" for name, ok in checks.items() if not ok]
    if bad:
        raise ConfigurationError("hyperparameters out of range: " + ", ".join(bad))
    return args


def _defaults_from_sm_hps() -> dict[str, str]:
    # SageMaker passes hyperparameters as arguments too; SM_HPS covers a job started without them.
    try:
        hps = json.loads(os.environ.get("SM_HPS") or "{}")
    except json.JSONDecodeError:
        return {}
    # String defaults go through each argument's `type`, as a command-line value would.
    return {k: str(v) for k, v in hps.items() if k in HYPERPARAMETERS}
