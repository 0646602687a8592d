"""SageMaker script-mode entry point: train on the processed splits, evaluate on test, save a self-serving
model. Runs the same on a laptop (`python train.py --train d/train ... --epochs 5`) and in the AWS PyTorch
training image, reading SageMaker's container contract (SM_* variables) for its defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data import Encoder, read_manifest, read_split
from model import build_model

log = logging.getLogger("train")
HERE = Path(__file__).resolve().parent
SERVING_FILES = ("inference.py", "model.py", "data.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", default=env("SM_MODEL_DIR", "model"))
    parser.add_argument("--output-data-dir", default=env("SM_OUTPUT_DATA_DIR", "output/data"))
    for channel in ("train", "validation", "test", "manifest"):
        parser.add_argument(f"--{channel}", default=env(f"SM_CHANNEL_{channel.upper()}"))
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=64)
    parser.add_argument("--learning-rate", "--learning_rate", dest="learning_rate", type=float, default=1e-3)
    parser.add_argument("--hidden-units", "--hidden_units", dest="hidden_units", default="128,64")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--patience", type=int, default=8)
    # SageMaker passes its own hyperparameters (sagemaker_program, ...) too: they are not ours to parse.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        log.info("ignoring arguments %s", unknown)
    for channel in ("train", "validation", "test", "manifest"):
        if not getattr(args, channel):
            parser.error(f"--{channel} (or SM_CHANNEL_{channel.upper()}) is required")
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tensors(
    encoder: Encoder, rows: list[dict[str, str]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if not rows:
        raise ValueError("a split is empty")
    return (
        torch.from_numpy(encoder.encode(rows)).to(device),
        torch.from_numpy(encoder.encode_target(rows)).to(device),
    )


def train(args: argparse.Namespace) -> dict[str, Any]:
    seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = read_manifest(args.manifest)
    encoder = Encoder.from_manifest(manifest)
    splits = {name: read_split(getattr(args, name)) for name in ("train", "validation", "test")}
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        tensors(encoder, splits[n], device) for n in splits
    )
    log.info(
        "device %s; rows train=%d validation=%d test=%d; %d features encoded as %d inputs",
        device,
        len(x_train),
        len(x_val),
        len(x_test),
        len(encoder.features),
        encoder.width,
    )

    architecture = {
        "name": "tabular_mlp",
        "in_features": encoder.width,
        "out_features": encoder.output_width,
        "hidden": [int(h) for h in str(args.hidden_units).split(",") if h.strip()],
        "dropout": args.dropout,
    }
    model = build_model(architecture).to(device)
    classification = encoder.task == "classification"
    loss_fn: nn.Module = nn.CrossEntropyLoss() if classification else nn.MSELoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.5, patience=max(1, args.patience // 3)
    )

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return loss_fn(out, y) if classification else loss_fn(out.squeeze(-1), y)

    best_loss, best_state, best_epoch, waited = math.inf, None, 0, 0
    history = []
    started = time.monotonic()
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator).to(device)
        total = 0.0
        for start in range(0, len(order), args.batch_size):
            batch = order[start : start + args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(x_train[batch], y_train[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        model.eval()
        with torch.no_grad():
            val_loss = loss_of(x_val, y_val).item()
            val_out = model(x_val)
        scheduler.step(val_loss)
        line = f"epoch={epoch} train_loss={total / len(x_train):.4f} validation_loss={val_loss:.4f}"
        if classification:
            line += f" validation_accuracy={(val_out.argmax(-1) == y_val).float().mean().item():.4f}"
        else:
            scaled_rmse = (val_out.squeeze(-1) - y_val).pow(2).mean().sqrt().item()
            line += f" validation_rmse={scaled_rmse * encoder.config['target_std']:.4f}"
        print(line, flush=True)
        history.append({"epoch": epoch, "train_loss": total / len(x_train), "validation_loss": val_loss})
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, waited = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= args.patience:
                print(
                    f"early stop at epoch {epoch}: best validation_loss={best_loss:.4f} at epoch {best_epoch}",
                    flush=True,
                )
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        test_out = model(x_test).float().cpu()
    evaluation = evaluate(encoder, test_out, y_test.cpu(), y_train.cpu())
    evaluation["conveyor"].update(
        best_epoch=best_epoch, training_seconds=round(time.monotonic() - started, 2)
    )
    summary = evaluation["conveyor"]
    print(f"test_{summary['metric']}={summary['value']:.4f} baseline={summary['baseline']:.4f}", flush=True)
    save(args, model, encoder, architecture, evaluation, history)
    return evaluation


def evaluate(
    encoder: Encoder, outputs: torch.Tensor, truth: torch.Tensor, train_truth: torch.Tensor
) -> dict[str, Any]:
    """Test-split metrics in SageMaker's model-quality format plus conveyor's summary for the gate."""

    def metric(value: float) -> dict[str, Any]:
        return {"value": float(value), "standard_deviation": "NaN"}

    y = truth.numpy()
    if encoder.task == "classification":
        probabilities = torch.softmax(outputs, dim=-1).numpy()
        predicted = probabilities.argmax(-1)
        classes = len(encoder.labels)
        confusion = np.zeros((classes, classes), dtype=int)
        np.add.at(confusion, (y, predicted), 1)
        per_class = {}
        f1s = []
        for i, label in enumerate(encoder.labels):
            tp = confusion[i, i]
            precision = tp / confusion[:, i].sum() if confusion[:, i].sum() else 0.0
            recall = tp / confusion[i].sum() if confusion[i].sum() else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            f1s.append(f1)
            per_class[str(label)] = {
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "support": int(confusion[i].sum()),
            }
        accuracy = float((predicted == y).mean())
        majority = int(np.bincount(train_truth.numpy(), minlength=classes).argmax())
        baseline = float((y == majority).mean())
        metrics = {
            "accuracy": metric(accuracy),
            "weighted_f1": metric(
                sum(f * c["support"] for f, c in zip(f1s, per_class.values(), strict=True)) / max(1, len(y))
            ),
            "f1": metric(float(np.mean(f1s))),
        }
        section = "multiclass_classification_metrics"
        if classes == 2:
            section = "binary_classification_metrics"
            metrics["auc"] = metric(roc_auc(probabilities[:, 1], y))
        metrics["confusion_matrix"] = {
            str(encoder.labels[i]): {str(encoder.labels[j]): int(confusion[i, j]) for j in range(classes)}
            for i in range(classes)
        }
        return {
            section: metrics,
            "conveyor": {
                "task": "classification",
                "metric": "accuracy",
                "value": accuracy,
                "baseline": baseline,
                "baseline_name": "majority class",
                "test_rows": len(y),
                "per_class": per_class,
            },
        }
    predicted = encoder.decode_regression(outputs.squeeze(-1).numpy())
    actual = encoder.decode_regression(y)
    errors = predicted - actual
    mse = float(np.mean(errors**2))
    variance = float(np.mean((actual - actual.mean()) ** 2)) or 1e-12
    train_mean = float(encoder.decode_regression(train_truth.numpy()).mean())
    baseline_r2 = 1 - float(np.mean((actual - train_mean) ** 2)) / variance
    r2 = 1 - mse / variance
    return {
        "regression_metrics": {
            "mse": metric(mse),
            "rmse": metric(math.sqrt(mse)),
            "mae": metric(float(np.mean(np.abs(errors)))),
            "r2": metric(r2),
        },
        "conveyor": {
            "task": "regression",
            "metric": "r2",
            "value": r2,
            "baseline": baseline_r2,
            "baseline_name": "train mean",
            "test_rows": len(y),
        },
    }


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) formula, ties averaged."""
    positives = int(truth.sum())
    negatives = len(truth) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = scores.argsort()
    ranks = np.empty(len(scores), dtype=float)
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[truth == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def save(
    args: argparse.Namespace,
    model: nn.Module,
    encoder: Encoder,
    architecture: dict[str, Any],
    evaluation: dict[str, Any],
    history: list[dict[str, Any]],
) -> None:
    model_dir, output_dir = Path(args.model_dir), Path(args.output_data_dir)
    (model_dir / "code").mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, model_dir / "model.pth")
    config = {"encoder": encoder.config, "architecture": architecture, "format_version": 1}
    (model_dir / "model_config.json").write_text(json.dumps(config, indent=2))
    for directory in (model_dir, output_dir):
        (directory / "evaluation.json").write_text(json.dumps(evaluation, indent=2))
    (output_dir / "history.json").write_text(json.dumps(history))
    # The SageMaker PyTorch serving convention: code/ inside model.tar.gz, so the artefact serves itself.
    for name in SERVING_FILES:
        shutil.copy2(HERE / name, model_dir / "code" / name)
    (model_dir / "code" / "requirements.txt").write_text(
        "# The AWS PyTorch inference image provides torch and numpy.\n"
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    args = parse_args(argv)
    try:
        train(args)
    except Exception as exc:
        # SageMaker reports the content of /opt/ml/output/failure as the job's FailureReason.
        failure = Path(os.environ.get("SM_OUTPUT_DIR", Path(args.output_data_dir).parent)) / "failure"
        failure.parent.mkdir(parents=True, exist_ok=True)
        failure.write_text(f"{type(exc).__name__}: {exc}"[:1000])
        log.exception("training failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
