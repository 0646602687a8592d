"""SageMaker script-mode entry point: train a model on the processed splits, evaluate it on the test split,
and save a model that serves itself (docs/contracts.md, section 3).

The recipe (the manifest's, or the ``recipe`` hyperparameter) picks the network: a tabular MLP over
numbers, categories and bags of words, a BiLSTM text model, or a CNN for a dataset of class folders of
images. One training loop, `fit`, trains any of them: it sees tensors, an objective and a network, never
the task.

The container contract (``SM_MODEL_DIR``, ``SM_OUTPUT_DATA_DIR``, ``SM_CHANNEL_*``, ``SM_HPS``) gives the
defaults, so the same file runs in the AWS PyTorch training image and on a laptop::

    python training/train.py --train d/train --validation d/validation --test d/test \\
        --manifest d/manifest --epochs 5
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import distributed, nn
from torch.nn import functional
from torch.nn.parallel import DistributedDataParallel

from checkpoint import Checkpoints, checkpoint_directory
from data import SPLITS, DataError, Encoder, Split, is_missing, read_manifest, read_split, tokenize
from metrics import classification_evaluation, regression_evaluation
from model import TabularMLP, TextBiLSTM
from report import write_report

log = logging.getLogger("train")
HERE = Path(__file__).resolve().parent
# What `code/` in model.tar.gz needs for the SageMaker PyTorch serving container to load the model.
SERVING_FILES = ("inference.py", "model.py", "data.py", "images.py")
SERVING_REQUIREMENTS = (
    "# The AWS PyTorch inference image provides torch, numpy and Pillow (image models); inference.py needs\n"
    "# nothing else.\n"
)
CONFIG_FORMAT_VERSION = 1
PREDICT_BATCH_ROWS = 65_536
# At most this share of free memory goes to the encoded splits; the rest is for the model, batches, Python.
MEMORY_SHARE = 0.5
CHANNELS = (*SPLITS, "manifest")
RECIPES = ("tabular", "text", "image")
# class_weights=auto weighs classes (sqrt) from this imbalance on: a minority under 20% of a binary target,
# which Google's ML guide calls moderate imbalance. Milder imbalance costs more accuracy to weigh than it gains.
IMBALANCE_RATIO = 4.0
# The linear path's fit: L-BFGS iterations at most (small problems converge in tens).
LINEAR_MAX_ITERATIONS = 500
# Default vocabulary per text feature: bag-of-words slots are dense inputs, embeddings rows are cheap.
DEFAULT_VOCABULARY = {"tabular": 2_000, "text": 20_000}
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
)


class ConfigurationError(ValueError):
    """A missing channel or an unusable hyperparameter."""


class _Parser(argparse.ArgumentParser):
    # argparse would print usage and exit 2; raising lets main() record the reason in the failure file.
    def error(self, message: str) -> Any:
        raise ConfigurationError(message)


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
    parser.add_argument(
        "--model-dir", "--model_dir", dest="model_dir", default=env.get("SM_MODEL_DIR", "model")
    )
    parser.add_argument(
        "--output-data-dir",
        "--output_data_dir",
        dest="output_data_dir",
        default=env.get("SM_OUTPUT_DATA_DIR", "output"),
    )
    for channel in CHANNELS:
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
        help="tabular (an MLP; text as bags of words), text (a BiLSTM reads text in order) or image (a "
        "CNN; image datasets only); auto: the manifest's recipe",
    )
    hyper.add_argument("--epochs", type=int, default=60)
    hyper.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=64)
    hyper.add_argument("--learning-rate", "--learning_rate", dest="learning_rate", type=float, default=1e-3)
    hyper.add_argument(
        "--hidden-units",
        "--hidden_units",
        dest="hidden_units",
        type=parse_hidden_units,
        default=(128, 64),
        help='hidden layer widths, e.g. "128,64"',
    )
    hyper.add_argument(
        "--linear-path",
        "--linear_path",
        dest="linear_path",
        default="true",
        choices=("true", "false"),
        help="tabular recipe: fit a linear model first (L2-regularised, as scikit-learn's LogisticRegression "
        "and Ridge by default), keep it, and train the MLP on top of it for what it misses; the MLP's part "
        "is kept only as far as it lowers validation loss",
    )
    hyper.add_argument("--dropout", type=float, default=0.1)
    hyper.add_argument("--weight-decay", "--weight_decay", dest="weight_decay", type=float, default=1e-4)
    hyper.add_argument(
        "--class-weights",
        "--class_weights",
        dest="class_weights",
        default="auto",
        choices=("auto", "none", "sqrt", "balanced"),
        help="weight classes by inverse frequency (balanced), its square root, or not at all; auto: sqrt "
        f"when the most common class outnumbers the rarest more than {IMBALANCE_RATIO:g} to 1 in train, "
        "else none",
    )
    hyper.add_argument(
        "--max-vocabulary",
        "--max_vocabulary",
        dest="max_vocabulary",
        type=int,
        default=None,
        help="tokens kept per text feature, its most frequent in train (from the manifest): bag-of-words "
        "slots (tabular recipe, default 2000) or embedded tokens (text recipe, default 20000)",
    )
    hyper.add_argument(
        "--max-sequence-length",
        "--max_sequence_length",
        dest="max_sequence_length",
        type=int,
        default=256,
        help="text recipe: tokens read per text value, its first ones (at most the longest in train)",
    )
    hyper.add_argument("--embedding-dim", "--embedding_dim", dest="embedding_dim", type=int, default=64)
    hyper.add_argument(
        "--sequence-units",
        "--sequence_units",
        dest="sequence_units",
        type=int,
        default=64,
        help="text recipe: LSTM units per direction",
    )
    hyper.add_argument(
        "--image-size",
        "--image_size",
        dest="image_size",
        type=int,
        default=64,
        help="image recipe: the side of the square each image is resized and cropped to, in pixels",
    )
    hyper.add_argument("--seed", type=int, default=7)
    hyper.add_argument("--patience", type=int, default=8, help="epochs without a lower validation loss")
    hyper.add_argument(
        "--checkpoint-steps",
        "--checkpoint_steps",
        dest="checkpoint_steps",
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
        default="auto",
        choices=("auto", "true", "false"),
        help="torch.compile the network for the training steps; auto: on a GPU only (on a CPU the "
        "compilation takes longer than small models train)",
    )
    parser.set_defaults(**_defaults_from_sm_hps())

    args, unknown = parser.parse_known_args(argv)
    if unknown:
        log.info("ignoring arguments this script does not use: %s", " ".join(unknown))
    missing = [c for c in CHANNELS if not getattr(args, c)]
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


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (every device), so a rerun trains the same model."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False


class Objective:
    """What the training loop asks of a task: the loss to minimise and the validation report.

    `l2` is the linear path's penalty, ``l2 * |W|^2 / rows`` added to the mean train loss: the defaults of
    scikit-learn's LogisticRegression (C=1) and Ridge (alpha=1), written per row.
    """

    l2 = 0.0

    def train_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def validation_report(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """``validation_loss`` (early stopping watches it) and the task's readable metric."""
        raise NotImplementedError


class Classification(Objective):
    """Cross-entropy, with class weights against imbalance in training.

    Validation loss is unweighted cross-entropy: the model that is kept is the one whose probabilities fit
    best, and the gate judges plain accuracy against the majority class.
    """

    l2 = 0.5  # C * sum(loss) + |W|^2 / 2, divided by C * rows

    def __init__(self, class_weights: torch.Tensor | None) -> None:
        self.class_weights = class_weights

    def train_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return functional.cross_entropy(outputs, targets, weight=self.class_weights)

    def validation_report(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return {
            "validation_loss": functional.cross_entropy(outputs, targets).item(),
            "validation_accuracy": (outputs.argmax(dim=1) == targets).float().mean().item(),
        }


class Regression(Objective):
    """Mean squared error on the standardised target; RMSE reported in the target's units."""

    l2 = 1.0  # sum(squared error) + alpha * |W|^2, divided by rows; on a standardised target, the same fit

    def __init__(self, target_std: float) -> None:
        self.target_std = target_std

    def train_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return functional.mse_loss(outputs.squeeze(1), targets)

    def validation_report(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        mse = functional.mse_loss(outputs.squeeze(1), targets).item()
        return {"validation_loss": mse, "validation_rmse": math.sqrt(mse) * self.target_std}


def class_weights(train_targets: np.ndarray, classes: int, scheme: str) -> np.ndarray | None:
    """Per-class loss weights from train class counts, scaled so the average row weighs 1.

    ``balanced`` weighs a class by its inverse frequency; ``sqrt`` by the square root of that, which
    helps rare classes without trading away much accuracy; ``none`` gives None; ``auto`` is ``sqrt`` when
    the most common class outnumbers the rarest present one more than `IMBALANCE_RATIO` to 1, else None.
    """
    counts = np.bincount(train_targets, minlength=classes).astype(np.float64)
    if scheme == "auto":
        present = counts[counts > 0]
        scheme = "sqrt" if len(present) and present.max() > IMBALANCE_RATIO * present.min() else "none"
    if scheme == "none":
        return None
    weights = len(train_targets) / (classes * np.maximum(counts, 1.0))
    if scheme == "sqrt":
        weights = np.sqrt(weights)
    weights /= (weights * counts).sum() / max(1, len(train_targets))
    return weights


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes: one, or many under torchrun (SageMaker's
    ``torch_distributed``, several GPUs and/or instances), which set RANK, WORLD_SIZE and LOCAL_RANK."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Processes:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        """The process that reports, checkpoints and saves the model."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class FitResult:
    """How training went: the epoch whose weights were kept, and the per-epoch history."""

    best_epoch: int
    best_validation_loss: float
    epochs_run: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def fit_linear_path(network: TabularMLP, objective: Objective, train: tuple[Inputs, torch.Tensor]) -> int:
    """Fit the network's linear part on the whole train split before the MLP trains; returns L-BFGS's
    iterations.

    The linear part is fitted alone, full batch, to the minimum of the train loss plus `Objective.l2`'s
    penalty on its weights: the model scikit-learn's LogisticRegression or Ridge fits by default. With
    hidden layers the linear path then stays fixed and the MLP's output layer starts at zero, so training
    starts from exactly the linear model and the MLP learns only what it misses (on small, noisy tables
    that may be nothing: `fit` then keeps epoch 0). Without hidden layers the fitted layer is the network,
    and training goes on from it.
    """
    inputs, targets = _as_tuple(train[0])[0], train[1]
    layer = network.linear if network.linear is not None else network.output_layer
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    optimizer = torch.optim.LBFGS(
        layer.parameters(),
        lr=1.0,
        max_iter=LINEAR_MAX_ITERATIONS,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    rows = len(targets)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (
            objective.train_loss(layer(inputs), targets) + objective.l2 * layer.weight.square().sum() / rows
        )
        loss.backward()
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    if network.linear is not None:
        layer.requires_grad_(False)
        nn.init.zeros_(network.output_layer.weight)
        nn.init.zeros_(network.output_layer.bias)
    return int(optimizer.state[layer.weight].get("n_iter", 0))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the training steps autocast to (None: full float32), from the ``precision`` hyperparameter.

    bfloat16 has float32's range, so unlike float16 it needs no gradient scaling; GPUs before Ampere
    (V100, T4) lack it and train in float32.

    Raises
    ------
    ConfigurationError
        For ``bf16`` on a GPU without bfloat16.
    """
    if precision == "fp32":
        return None
    supported = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if precision == "bf16":
        if not supported:
            raise ConfigurationError(f"precision bf16: {device} does not support bfloat16; use fp32 or auto")
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and supported else None


def compiled(model: nn.Module, setting: str, device: torch.device) -> nn.Module:
    """The model the training steps call: `torch.compile`'d per the ``compile`` hyperparameter.

    Compilation errors fall back to eager execution (TorchDynamo's ``suppress_errors``): a model that cannot
    be compiled still trains, only without the speed-up.
    """
    if setting == "false" or (setting == "auto" and device.type != "cuda"):
        return model
    import torch._dynamo  # only when compiling

    torch._dynamo.config.suppress_errors = True
    log.info("compiling the network with torch.compile")
    return torch.compile(model)  # type: ignore[return-value]


# What a network takes: one tensor, or several (its forward's arguments), each with a row per example.
Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def _as_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def fit(
    network: nn.Module,
    objective: Objective,
    train: tuple[Inputs, torch.Tensor],
    validation: tuple[Inputs, torch.Tensor],
    args: argparse.Namespace,
    checkpoints: Checkpoints | None = None,
    processes: Processes = Processes(),
) -> FitResult:
    """Mini-batch AdamW with early stopping on validation loss; leaves the best epoch's weights loaded
    (epoch 0: the network as it started, when no epoch lowered validation loss).

    Prints one line per epoch for SageMaker's metric definitions, e.g.
    ``epoch=3 train_loss=0.4100 validation_loss=0.3900 validation_accuracy=0.8700``.

    Every `args.checkpoint_steps` optimizer steps and at every epoch's end the whole state (weights,
    optimizer, schedule, best epoch, position in the epoch's shuffled order, random state) goes to
    `checkpoints`; a run that finds its checkpoint continues from it, and a single process then trains
    exactly the model an uninterrupted run would have. Under torchrun each step's batch is split across the
    processes and DistributedDataParallel averages their gradients: the same global batch as one process.
    The training steps run under bfloat16 autocast and `torch.compile` when `args.precision` and
    `args.compile` say so (by default on a GPU; see `autocast_dtype` and `compiled`); validation runs in
    float32 on the uncompiled network.
    """
    x_train, y_train = _as_tuple(train[0]), train[1]
    x_val, y_val = validation
    device = y_train.device
    model: nn.Module = network
    if processes.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(network, device_ids=device_ids)
    step_model = compiled(model, args.compile, device)
    precision = autocast_dtype(args.precision, device)
    trained = [p for p in network.parameters() if p.requires_grad]  # a fitted linear path stays as it is
    optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.5, patience=max(1, args.patience // 3)
    )
    # Shuffling draws from its own generator, so the order does not depend on what else consumed randomness.
    shuffler = torch.Generator().manual_seed(args.seed)
    rows = len(y_train)
    steps_per_epoch = math.ceil(rows / args.batch_size)
    best = FitResult(best_epoch=0, best_validation_loss=math.inf, epochs_run=0, seconds=0.0)
    best_state: dict[str, torch.Tensor] = {}
    first_epoch, first_step, step_count, epoch_total = 1, 0, 0, 0.0
    saved = checkpoints.load() if checkpoints is not None else None
    if saved is not None:
        network.load_state_dict(saved["network"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        best = FitResult(**saved["result"])
        best_state = saved["best_state"]
        shuffler.set_state(saved["shuffler"])
        torch.set_rng_state(saved["torch_rng"])
        first_epoch, first_step = saved["epoch"], saved["step"]
        step_count, epoch_total = saved["step_count"], saved["epoch_total"]
        log.info(
            "resuming from the checkpoint: epoch %d, step %d of %d", first_epoch, first_step, steps_per_epoch
        )
    else:
        # Where training starts is a candidate too: a network that starts as a fitted linear model (the
        # tabular recipe's linear path) keeps it unless an epoch lowers validation loss.
        start = objective.validation_report(predict(network, x_val), y_val)
        best.history.append({"epoch": 0, **start})  # no train loss: nothing has trained yet
        if math.isfinite(start["validation_loss"]):
            best.best_validation_loss = start["validation_loss"]
            best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    started = time.monotonic() - best.seconds

    def checkpoint(epoch: int, step: int, epoch_shuffler: torch.Tensor, total: float) -> None:
        if checkpoints is None or not processes.main:
            return
        best.seconds = time.monotonic() - started
        checkpoints.save(
            {
                "network": network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "result": dataclasses.asdict(best),
                "best_state": best_state,
                "shuffler": epoch_shuffler,
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch,
                "step": step,
                "step_count": step_count,
                "epoch_total": total,
            }
        )

    stopped = False
    for epoch in range(first_epoch, args.epochs + 1):
        network.train()
        epoch_shuffler = shuffler.get_state()
        order = torch.randperm(rows, generator=shuffler).to(device)
        total = epoch_total if epoch == first_epoch else 0.0
        for step in range(first_step if epoch == first_epoch else 0, steps_per_epoch):
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            if len(batch) < processes.world_size:  # too few rows to give every process one (same on all)
                continue
            shard = batch[processes.rank :: processes.world_size] if processes.distributed else batch
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
                outputs = step_model(*(x[shard] for x in x_train))
            loss = objective.train_loss(outputs.float(), y_train[shard])
            if processes.distributed:
                # Scaled so that DDP's average over processes is the mean over the whole batch.
                (loss * (len(shard) * processes.world_size / len(batch))).backward()
            else:
                loss.backward()
            optimizer.step()
            total += loss.item() * len(shard)
            step_count += 1
            if checkpoints is not None and checkpoints.due(step_count) and step + 1 < steps_per_epoch:
                checkpoint(epoch, step + 1, epoch_shuffler, total)
        if processes.distributed:
            summed = torch.tensor([total], dtype=torch.float64, device=device)
            distributed.all_reduce(summed)
            total = float(summed.item())
        report = objective.validation_report(predict(network, x_val), y_val)
        train_loss, val_loss = total / rows, report["validation_loss"]
        if processes.main:
            print(
                f"epoch={epoch} train_loss={train_loss:.4f} "
                + " ".join(f"{name}={value:.4f}" for name, value in report.items()),
                flush=True,
            )
        best.history.append({"epoch": epoch, "train_loss": train_loss, **report})
        best.epochs_run = epoch
        if not math.isfinite(val_loss):
            raise FloatingPointError(
                f"validation loss is {val_loss} at epoch {epoch}: try a lower learning_rate"
            )
        scheduler.step(val_loss)
        if val_loss < best.best_validation_loss - 1e-6:
            best.best_epoch, best.best_validation_loss = epoch, val_loss
            best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        elif epoch - best.best_epoch >= args.patience:
            log.info(
                "stopping early at epoch %d: no lower validation loss for %d epochs (lowest %.4f, epoch %d)",
                epoch,
                args.patience,
                best.best_validation_loss,
                best.best_epoch,
            )
            stopped = True
        # The next epoch starts from here: its shuffled order comes from the shuffler's state now.
        checkpoint(epoch + 1, 0, shuffler.get_state(), 0.0)
        if stopped:
            break
    network.load_state_dict(best_state)
    network.eval()
    best.seconds = time.monotonic() - started
    return best


def predict(network: nn.Module, inputs: Inputs) -> torch.Tensor:
    """The network's outputs in evaluation mode, in chunks so a large split fits in memory."""
    tensors = _as_tuple(inputs)
    network.eval()
    with torch.inference_mode():
        chunks = [
            network(*(x[i : i + PREDICT_BATCH_ROWS] for x in tensors))
            for i in range(0, len(tensors[0]), PREDICT_BATCH_ROWS)
        ]
    return torch.cat(chunks).float()


def choose_recipe(args: argparse.Namespace, manifest: dict[str, Any]) -> str:
    """The recipe to train: the hyperparameter's, else the manifest's. Also settles `args.max_vocabulary`.

    Raises
    ------
    ConfigurationError
        For the text recipe on a dataset without a text feature, or a manifest recipe this code lacks.
    """
    recipe = manifest.get("recipe", "tabular") if args.recipe == "auto" else args.recipe
    if recipe not in RECIPES:
        raise ConfigurationError(
            f"the manifest asks for the {recipe!r} recipe; this training code has {', '.join(RECIPES)}"
        )
    types = {c.get("type") for c in manifest["columns"] if c.get("role") == "feature"}
    if recipe == "text" and "text" not in types:
        raise ConfigurationError(
            "the text recipe reads text features, and this dataset has none: use recipe tabular"
        )
    if (recipe == "image") != ("image" in types):
        raise ConfigurationError(
            f"the {recipe} recipe cannot train on this dataset: the image recipe is for datasets of images "
            "(a zip of class folders), and only for them"
        )
    if args.max_vocabulary is None:
        args.max_vocabulary = DEFAULT_VOCABULARY.get(recipe)
    args.recipe = recipe
    return recipe


def load_splits(args: argparse.Namespace) -> tuple[dict[str, Any], Encoder, dict[str, Split]]:
    """The manifest, the encoder built from it for the recipe (`choose_recipe`), and the three splits
    (rows without a target dropped)."""
    manifest = read_manifest(args.manifest)
    recipe = choose_recipe(args, manifest)
    target = manifest["target"]
    if recipe == "image":
        from images import read_image_split  # only image datasets need Pillow

        splits = {}
        for name in SPLITS:
            images = read_image_split(getattr(args, name), name)
            feature = next(c["name"] for c in manifest["columns"] if c.get("role") == "feature")
            columns = {feature: images.images, target: images.labels}
            splits[name] = Split(name, columns, images.rows, images.entries)
        return manifest, Encoder.from_manifest(manifest, image_size=args.image_size), splits
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
    sequence_length = 0
    if recipe == "text":
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
        sequence_length = max(1, min(args.max_sequence_length, longest))
    encoder = Encoder.from_manifest(
        manifest,
        train_target=splits["train"].columns[target],
        max_vocabulary=args.max_vocabulary,
        text_encoding="sequence" if recipe == "text" else "bag_of_words",
        sequence_length=sequence_length,
    )
    return manifest, encoder, splits


def check_memory(
    encoder: Encoder, splits: dict[str, Split], device: torch.device, args: argparse.Namespace
) -> None:
    """Fail before encoding when the encoded splits cannot fit in memory, saying what to lower.

    Every split is encoded (a float32 matrix, and int32 token ids for the text recipe) and kept on the
    device. With the bag of words a text feature adds a column per vocabulary token, so a large vocabulary
    times many rows is what usually does not fit; with the text recipe it is the sequence length.

    Raises
    ------
    ConfigurationError
        When the splits need more than half of the memory available (host, and GPU when training on one).
    """
    rows = sum(split.rows for split in splits.values())
    needed = rows * encoder.row_bytes
    available = available_memory(device)
    if available is None or needed <= available * MEMORY_SHARE:
        return
    message = (
        f"the encoded splits need {needed / 2**30:.1f} GiB ({rows} rows x {encoder.row_bytes} bytes) "
        f"but only {available / 2**30:.1f} GiB of memory is available"
    )
    budget = int(available * MEMORY_SHARE / rows) // 4  # 4-byte values a row may take
    text = [f for f in encoder.features if f["type"] == "text"]
    if encoder.image:
        side = int(math.sqrt(budget * 4 / 3))
        per_feature = side if side >= 8 else 0
        hint = f"lower the hyperparameter image_size (now {encoder.image['image_size']}) to at most {side}"
    elif encoder.sequences:
        per_feature = (budget - encoder.width) // len(encoder.sequences)
        hint = f"lower the hyperparameter max_sequence_length (now {encoder.sequence_length}) to at most {per_feature}"
    elif text:
        per_feature = (budget - encoder.width + sum(len(f["vocabulary"]) for f in text)) // len(text)
        hint = f"lower the hyperparameter max_vocabulary (now {args.max_vocabulary}) to at most {per_feature}"
    else:
        per_feature, hint = 0, ""
    if per_feature >= 1:
        message += f": {hint}, or train on an instance with more memory"
    else:
        message += ": train on an instance with more memory"
    raise ConfigurationError(message)


def available_memory(device: torch.device) -> int | None:
    """Bytes of memory free for the splits: the host's available memory, and the GPU's free memory too."""
    host = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        host = None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free if host is None else min(host, free)
    return host


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train, evaluate on the test split, and save the model and its evaluation.

    Parameters
    ----------
    args
        From `parse_args`.

    Returns
    -------
    dict
        The ``evaluation.json`` document.
    """
    seed_everything(args.seed)
    processes = Processes.from_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", processes.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if processes.distributed and not distributed.is_initialized():
        distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":
        # A tabular MLP's mini-batches are too small for intra-op threads to pay off: syncing them costs
        # more than it saves, and on a busy machine spinning OpenMP workers make a step ~50x slower.
        torch.set_num_threads(1)
    manifest, encoder, splits = load_splits(args)
    check_memory(encoder, splits, device, args)
    tensors = {}
    for name, split in splits.items():
        encoded = encoder.encode_inputs(split.columns, split.rows, split.entries)
        x = tuple(torch.from_numpy(a).to(device) for a in encoded)
        y = torch.from_numpy(encoder.encode_target(split.columns[encoder.target])).to(device)
        tensors[name] = (x, y)
    log.info(  # by every process: each says it is there
        "dataset %s version %s: %s recipe, %s of %r; rows train=%d validation=%d test=%d; "
        "%d features -> %d inputs%s; device %s, %d training process(es)",
        manifest.get("dataset"),
        manifest.get("version"),
        args.recipe,
        encoder.task,
        encoder.target,
        splits["train"].rows,
        splits["validation"].rows,
        splits["test"].rows,
        len(encoder.features),
        encoder.width,
        f" and {len(encoder.sequences)} token sequence(s) of {encoder.sequence_length}"
        if encoder.sequences
        else f" and images of {encoder.image['image_size']} x {encoder.image['image_size']} pixels"
        if encoder.image
        else "",
        device,
        processes.world_size,
    )

    network = build_network(args, encoder, tensors["train"][0]).to(device)
    objective: Objective
    train_truth = tensors["train"][1].cpu().numpy()
    if encoder.task == "classification":
        weights = class_weights(train_truth, encoder.output_width, args.class_weights)
        if weights is not None:
            log.info(
                "class weights (%s): %s",
                args.class_weights,
                ", ".join(f"{label}={w:.3f}" for label, w in zip(encoder.labels, weights, strict=True)),
            )
        objective = Classification(
            None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)
        )
    else:
        objective = Regression(encoder.target_std)
    linear_path: dict[str, Any] | None = None
    if isinstance(network, TabularMLP) and args.linear_path == "true":
        started = time.monotonic()
        iterations = fit_linear_path(network, objective, tensors["train"])
        linear_path = {"iterations": iterations, "seconds": round(time.monotonic() - started, 3)}
        log.info(
            "linear path: fitted in %d L-BFGS iteration(s), %.1f s; %s",
            iterations,
            linear_path["seconds"],
            "the MLP trains on top of it" if network.linear is not None else "training goes on from it",
        )
    checkpoints = Checkpoints(
        checkpoint_directory(),
        {
            "dataset": manifest.get("dataset"),
            "version": manifest.get("version"),
            "hyperparameters": hyperparameters(args),
            "processes": processes.world_size,
        },
        args.checkpoint_steps,
    )
    result = fit(network, objective, tensors["train"], tensors["validation"], args, checkpoints, processes)
    if not processes.main:
        return {}  # the main process evaluates and saves the model the processes trained together
    log.info(
        "kept epoch %d of %d (validation loss %.4f)%s; %.1f s",
        result.best_epoch,
        result.epochs_run,
        result.best_validation_loss,
        ": the fitted linear model, as no epoch lowered validation loss"
        if linear_path is not None and result.best_epoch == 0
        else "",
        result.seconds,
    )

    x_test, y_test = tensors["test"]
    outputs = predict(network, x_test).cpu()
    # What the report plots besides the evaluation: the test rows' scores and answers.
    if encoder.task == "classification":
        plotted = {"probabilities": torch.softmax(outputs, dim=1).numpy(), "truth": y_test.cpu().numpy()}
        evaluation = classification_evaluation(
            plotted["probabilities"], plotted["truth"], train_truth, encoder.labels
        )
    else:
        plotted = {
            "predicted": encoder.decode_target(outputs.squeeze(1).numpy()),
            "actual": encoder.decode_target(y_test.cpu().numpy()),
        }
        evaluation = regression_evaluation(
            plotted["predicted"], plotted["actual"], train_mean=encoder.target_mean
        )
    evaluation["conveyor"].update(
        dataset=manifest.get("dataset"),
        version=manifest.get("version"),
        best_epoch=result.best_epoch,
        epochs_run=result.epochs_run,
        linear_path=linear_path,
        training_seconds=round(result.seconds, 3),
        hyperparameters=hyperparameters(args),
        code_version=code_version(),
    )
    print(final_line(evaluation), flush=True)
    save(args, network, encoder, manifest, evaluation, result, plotted)
    return evaluation


def build_network(
    args: argparse.Namespace, encoder: Encoder, train_inputs: tuple[torch.Tensor, ...]
) -> nn.Module:
    """The recipe's network for the encoder's inputs and outputs, freshly initialised (an image network
    with the train images' channel statistics, which it normalises by)."""
    if encoder.image:
        from images import ImageCNN, channel_statistics

        mean, std = channel_statistics(train_inputs[0].cpu().numpy())
        return ImageCNN(encoder.output_width, encoder.image["image_size"], mean, std, dropout=args.dropout)
    if encoder.sequences:
        return TextBiLSTM(
            encoder.width,
            encoder.output_width,
            [len(f["vocabulary"]) for f in encoder.sequences],
            embedding_dim=args.embedding_dim,
            sequence_units=args.sequence_units,
            hidden_units=args.hidden_units,
            dropout=args.dropout,
        )
    return TabularMLP(
        encoder.width, encoder.output_width, args.hidden_units, args.dropout, args.linear_path == "true"
    )


def code_version(directory: Path = HERE) -> str:
    """What code trained this model: a digest of the source files that ran (and the git commit they were
    published from, which `conveyor publish-code` writes to CODE_VERSION), for the Model Registry."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.py")) + sorted(directory.glob("requirements.txt")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    published = directory / "CODE_VERSION"
    origin = published.read_text().strip()[:100] if published.exists() else "unpublished"
    return f"sha256:{digest.hexdigest()[:16]} {origin}"


def hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    """The hyperparameters this run used, JSON-ready."""
    return {name: list(v) if isinstance(v := getattr(args, name), tuple) else v for name in HYPERPARAMETERS}


def final_line(evaluation: dict[str, Any]) -> str:
    """The end-of-training line SageMaker's metric definitions scrape (``test_accuracy=`` or ``test_r2=``)."""
    summary = evaluation["conveyor"]
    section = next(v for k, v in evaluation.items() if k.endswith("_metrics"))
    parts = [f"test_{summary['metric']}={summary['value']:.4f}"]
    for name in ("macro_f1", "auc", "rmse", "mae"):
        if name in section:
            parts.append(f"test_{name}={section[name]['value']:.4f}")
    # Named so that no metric definition's regex (test_accuracy=, test_r2=) matches it.
    parts.append(f"baseline_{summary['metric']}={summary['baseline']:.4f}")
    return " ".join(parts)


def save(
    args: argparse.Namespace,
    network: nn.Module,
    encoder: Encoder,
    manifest: dict[str, Any],
    evaluation: dict[str, Any],
    result: FitResult,
    plotted: dict[str, Any] | None = None,
) -> None:
    """Write the model directory (weights, config, evaluation, serving code) and the output data (the
    evaluation, the history, and the report with its plots)."""
    model_dir, output_dir = Path(args.model_dir), Path(args.output_data_dir)
    code = model_dir / "code"
    code.mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, model_dir / "model.pth")
    config = {
        "format_version": CONFIG_FORMAT_VERSION,
        "dataset": manifest.get("dataset"),
        "version": manifest.get("version"),
        **encoder.to_config(),
        "architecture": network.architecture(),
    }
    (model_dir / "model_config.json").write_text(json.dumps(config, indent=2) + "\n")
    document = json.dumps(evaluation, indent=2) + "\n"
    (model_dir / "evaluation.json").write_text(document)
    (output_dir / "evaluation.json").write_text(document)
    (output_dir / "history.json").write_text(json.dumps(result.history) + "\n")
    try:
        write_report(output_dir, evaluation, result.history, **(plotted or {}))
    except Exception:  # the model is good whatever happens to its report: say so and go on
        log.exception("the HTML report could not be written; evaluation.json has every figure")
    for name in SERVING_FILES:
        shutil.copy2(HERE / name, code / name)
    (code / "requirements.txt").write_text(SERVING_REQUIREMENTS)
    log.info("saved the model to %s and the evaluation to %s", model_dir, output_dir)


def failure_file(args: argparse.Namespace | None) -> Path:
    """Where SageMaker looks for the reason a job failed (``/opt/ml/output/failure``)."""
    output_data_dir = args.output_data_dir if args else os.environ.get("SM_OUTPUT_DATA_DIR", "output")
    return Path(os.environ.get("SM_OUTPUT_DIR") or Path(output_data_dir).parent) / "failure"


def main(argv: Sequence[str] | None = None) -> int:
    """Run a training job; on failure write the reason to the failure file and return 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    args = None
    try:
        args = parse_args(argv)
        train(args)
        if distributed.is_initialized():
            distributed.destroy_process_group()
    except Exception as exc:
        # Bad input gets its message alone; anything else its type and traceback too.
        expected = isinstance(exc, DataError | ConfigurationError)
        reason = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        if expected:
            log.error("training failed: %s", reason)
        else:
            log.exception("training failed")
        try:
            path = failure_file(args)
            path.parent.mkdir(parents=True, exist_ok=True)
            # SageMaker shows at most 1,024 characters of it as the job's FailureReason.
            path.write_text(reason[:1024])
        except OSError as write_error:
            log.error("could not write the failure file: %s", write_error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
