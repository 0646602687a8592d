"""The training loop every recipe shares: `fit` trains a network on tensors for an objective, and knows
nothing of the task, the data or the recipe that built the network.

What a network may offer the loop beyond ``forward`` (the pretrained recipe's do, `hf_text`):

- ``parameter_groups(weight_decay)``: AdamW's parameter groups (e.g. no decay on biases and LayerNorm);
- ``predict_batch_rows``: rows per forward pass in `predict` (a Transformer's are far fewer than an MLP's).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import distributed, nn
from torch.nn import functional

import parallel
from checkpoint import Checkpoints
from model import TabularMLP, outputs_in_batches

log = logging.getLogger("train")
PREDICT_BATCH_ROWS = 65_536
# class_weights=auto weighs classes (sqrt) from this imbalance on: a minority under 20% of a binary target,
# which Google's ML guide calls moderate imbalance. Milder imbalance costs more accuracy to weigh than it gains.
IMBALANCE_RATIO = 4.0
# The linear path's fit: L-BFGS iterations at most (small problems converge in tens).
LINEAR_MAX_ITERATIONS = 500


class ConfigurationError(ValueError):
    """A missing channel or an unusable hyperparameter."""


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
    sharded: bool = False  # the processes trained shards of the network (FSDP): see `parallel`


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
    shares: parallel.Parallel | None = None,
) -> FitResult:
    """Mini-batch AdamW with early stopping on validation loss; leaves the best epoch's weights loaded
    (epoch 0: the network as it started, when no epoch lowered validation loss).

    Prints one line per epoch for SageMaker's metric definitions, e.g.
    ``epoch=3 train_loss=0.4100 validation_loss=0.3900 validation_accuracy=0.8700``.

    Every `args.checkpoint_steps` optimizer steps and at every epoch's end the whole state (weights,
    optimizer, schedule, best epoch, position in the epoch's shuffled order, random state) goes to
    `checkpoints`; a run that finds its checkpoint continues from it, and a single process then trains
    exactly the model an uninterrupted run would have. Under torchrun each step's batch is split across the
    processes and DistributedDataParallel averages their gradients: the same global batch as one process;
    with ``args.sharding`` fsdp (or auto, for a model too big for one GPU) each process holds a shard of the
    model instead (`parallel.FullySharded`), and the checkpoint is sharded too.
    The training steps run under bfloat16 autocast and `torch.compile` when `args.precision` and
    `args.compile` say so (by default on a GPU; see `autocast_dtype` and `compiled`); validation runs in
    float32 on the uncompiled network.
    """
    x_train, y_train = _as_tuple(train[0]), train[1]
    x_val, y_val = validation
    device = y_train.device
    if shares is None:
        shares = parallel.choose(
            getattr(args, "sharding", "auto"), network, processes.rank, processes.world_size, device
        )
    model = shares.wrap(network, device)
    step_model = compiled(model, args.compile, device)
    precision = autocast_dtype(args.precision, device)
    groups = getattr(network, "parameter_groups", None)
    trained: Any = (
        groups(args.weight_decay)
        if groups is not None
        else [p for p in network.parameters() if p.requires_grad]  # a fitted linear path stays as it is
    )
    optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, weight_decay=args.weight_decay)
    rows = len(y_train)
    steps_per_epoch = math.ceil(rows / args.batch_size)
    schedule = getattr(args, "lr_schedule", "plateau")
    scheduler = learning_rate_schedule(
        optimizer, schedule, args.epochs * steps_per_epoch, getattr(args, "warmup_ratio", 0.0), args.patience
    )
    micro_batches = getattr(args, "gradient_accumulation_steps", 1)
    max_grad_norm = getattr(args, "max_grad_norm", 0.0)
    # Shuffling draws from its own generator, so the order does not depend on what else consumed randomness.
    shuffler = torch.Generator().manual_seed(args.seed)
    best = FitResult(best_epoch=0, best_validation_loss=math.inf, epochs_run=0, seconds=0.0)
    best_state: dict[str, torch.Tensor] = {}
    first_epoch, first_step, step_count, epoch_total = 1, 0, 0, 0.0
    saved = shares.load_checkpoint(checkpoints, network, optimizer) if checkpoints is not None else None
    if saved is not None:
        scheduler.load_state_dict(saved["scheduler"])
        best = FitResult(**saved["result"])
        best_state = saved["best_state"]
        shuffler.set_state(saved["shuffler"])
        torch.set_rng_state(saved["torch_rng"])
        first_epoch, first_step = saved["epoch"], saved["step"]
        # The epoch's loss so far is every process's (see `checkpoint`): the main process carries it on.
        step_count = saved["step_count"]
        epoch_total = saved["epoch_total"] if processes.main else 0.0
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
            best_state = shares.weights(network)
    started = time.monotonic() - best.seconds

    def checkpoint(epoch: int, step: int, epoch_shuffler: torch.Tensor, total: float) -> None:
        if checkpoints is None or not checkpoints.enabled:
            return
        best.seconds = time.monotonic() - started
        if processes.distributed:  # each process summed its own rows' losses; the checkpoint keeps them all
            total = _summed(total, device)
        shares.save_checkpoint(
            checkpoints,
            network,
            optimizer,
            best_state,
            {
                "scheduler": scheduler.state_dict(),
                "result": dataclasses.asdict(best),
                "shuffler": epoch_shuffler,
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch,
                "step": step,
                "step_count": step_count,
                "epoch_total": total,
            },
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
            # Gradient accumulation: the shard in micro-batches, each loss weighed by its share of the batch,
            # so the summed gradients are those of the whole batch; DDP syncs on the last one only.
            size = math.ceil(len(shard) / micro_batches)
            pieces = [shard[i : i + size] for i in range(0, len(shard), size)]
            for position, piece in enumerate(pieces):
                last = position == len(pieces) - 1
                with shares.sync(model, last):
                    with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
                        outputs = step_model(*(x[piece] for x in x_train))
                    loss = objective.train_loss(outputs.float(), y_train[piece])
                    # Scaled so that DDP's average over processes is the mean over the whole batch.
                    (loss * (len(piece) * processes.world_size / len(batch))).backward()
                total += loss.item() * len(piece)
            if max_grad_norm > 0:
                nn.utils.clip_grad_norm_(network.parameters(), max_grad_norm)
            optimizer.step()
            if schedule == "linear":
                scheduler.step()
            step_count += 1
            if checkpoints is not None and checkpoints.due(step_count) and step + 1 < steps_per_epoch:
                checkpoint(epoch, step + 1, epoch_shuffler, total)
        if processes.distributed:
            total = _summed(total, device)
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
        if schedule == "plateau":
            scheduler.step(val_loss)
        if val_loss < best.best_validation_loss - 1e-6:
            best.best_epoch, best.best_validation_loss = epoch, val_loss
            best_state = shares.weights(network)
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
    shares.load_weights(network, best_state)
    network.eval()
    best.seconds = time.monotonic() - started
    best.sharded = shares.sharded
    return best


def predict(network: nn.Module, inputs: Inputs) -> torch.Tensor:
    """The network's outputs in evaluation mode, in batches so a large split fits in memory
    (`model.outputs_in_batches`)."""
    network.eval()
    # Sharded (FSDP), a forward writes the gathered weights into buffers the next step trains with: tensors
    # made in inference mode cannot be written outside it, so no_grad there.
    with torch.no_grad() if parallel.is_sharded(network) else torch.inference_mode():
        return outputs_in_batches(network, _as_tuple(inputs), batch_rows=PREDICT_BATCH_ROWS)


def learning_rate_schedule(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_ratio: float, patience: int
) -> Any:
    """``plateau``: halve the learning rate when validation loss stops falling (stepped per epoch, with the
    loss). ``linear``: rise from 0 over the first `warmup_ratio` of the steps, then fall linearly to 0 at
    the last (stepped per optimizer step): the schedule BERT was fine-tuned with, and transformers'
    ``get_linear_schedule_with_warmup``.
    """
    if schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.5, patience=max(1, patience // 3)
        )
    if schedule != "linear":
        raise ConfigurationError(f"lr_schedule {schedule!r}: use plateau or linear")
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _summed(value: float, device: torch.device) -> float:
    """The sum of `value` over the training processes (a collective: every process calls it)."""
    summed = torch.tensor([value], dtype=torch.float64, device=device)
    distributed.all_reduce(summed)
    return float(summed.item())
