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
import hashlib
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import distributed, nn

import parallel
import recipes
from arguments import CHANNELS, HYPERPARAMETERS, parse_args
from checkpoint import Checkpoints, checkpoint_directory
from data import DataError, Encoder
from loop import (
    Classification,
    ConfigurationError,
    FitResult,
    Objective,
    Processes,
    Regression,
    autocast_dtype,
    class_weights,
    compiled,
    fit,
    fit_linear_path,
    predict,
    seed_everything,
)
from metrics import classification_evaluation, regression_evaluation
from report import write_report
from splits import Split, read_manifest

# What tests and tools reach through this module, from the loop it runs.
__all__ = [
    "CHANNELS",
    "Classification",
    "ConfigurationError",
    "Regression",
    "autocast_dtype",
    "class_weights",
    "compiled",
    "fit",
    "fit_linear_path",
    "main",
    "parse_args",
    "predict",
    "seed_everything",
]

log = logging.getLogger("train")
HERE = Path(__file__).resolve().parent
# Where a sourcedir brings wheels (conveyor.local.sourcedir): sourcedir-hf's hold the Hugging Face packages.
WHEELHOUSE = "wheelhouse"
# What `code/` in model.tar.gz needs for the SageMaker PyTorch serving container to load the model.
SERVING_FILES = (
    "inference.py",
    "model.py",
    "data.py",
    "images.py",
    "image_cnn.py",
    "hf_text.py",
    "hf_image.py",
)
SERVING_REQUIREMENTS = (
    "# The AWS PyTorch inference image provides torch, numpy and Pillow (image models); inference.py needs\n"
    "# nothing else.\n"
)
CONFIG_FORMAT_VERSION = 1
# At most this share of free memory goes to the encoded splits; the rest is for the model, batches, Python.
MEMORY_SHARE = 0.5


def serving_requirements(network: nn.Module, code: Path) -> str:
    """``code/requirements.txt``, which the serving image pip-installs when it loads the model. A fine-tuned
    base model needs the Hugging Face packages; when this job's code brought their wheels (sourcedir-hf,
    ``wheelhouse/`` beside train.py), they go in ``code/wheelhouse/`` too and install from there alone, so
    the endpoint needs no index and gets exactly the versions the model was trained with."""
    requirements = getattr(network, "serving_requirements", None)
    if requirements is None:
        return SERVING_REQUIREMENTS
    wheelhouse = HERE / WHEELHOUSE
    wheels = sorted(wheelhouse.glob("*.whl")) if wheelhouse.is_dir() else []
    if not wheels:
        return str(requirements)
    (code / WHEELHOUSE).mkdir(exist_ok=True)
    for wheel in wheels:
        shutil.copy2(wheel, code / WHEELHOUSE / wheel.name)
    log.info("code/ carries %d wheels for the serving image (%s)", len(wheels), WHEELHOUSE)
    return f"# Installed from the wheels beside this file.\n--no-index\n--find-links {WHEELHOUSE}\n{requirements}"


def choose_recipe(args: argparse.Namespace, manifest: dict[str, Any]) -> recipes.Recipe:
    """The recipe to train: the hyperparameter's, else the manifest's (a pretrained recipe whenever a base
    model is named: pretrained_image for images, pretrained for the rest). Also settles `args.recipe` and `args.max_vocabulary`.

    Raises
    ------
    ConfigurationError
        For a recipe that cannot train this dataset, or a manifest recipe this code lacks.
    """
    name = manifest.get("recipe", "tabular") if args.recipe == "auto" else args.recipe
    types = {c.get("type") for c in manifest["columns"] if c.get("role") == "feature"}
    if args.base_model:
        name = "pretrained_image" if "image" in types else "pretrained"
    elif name in ("pretrained", "pretrained_image"):
        raise ConfigurationError(
            "the pretrained recipe fine-tunes a base model, and none is named: set base_model in conveyor.json"
        )
    recipe = recipes.get(name)
    reason = recipe.unsuitable(types)
    if reason:
        raise ConfigurationError(reason)
    if args.max_vocabulary is None:
        args.max_vocabulary = recipes.DEFAULT_VOCABULARY.get(name)
    args.recipe = name
    return recipe


def load_splits(args: argparse.Namespace) -> tuple[dict[str, Any], Encoder, dict[str, Split]]:
    """The manifest, the encoder built from it for the recipe (`choose_recipe`), and the three splits
    (rows without a target dropped)."""
    manifest = read_manifest(args.manifest)
    recipe = choose_recipe(args, manifest)
    splits = recipe.read_splits(args, manifest)
    return manifest, recipe.encoder(args, manifest, splits), splits


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
    manifest, encoder, splits = load_splits(args)
    if device.type == "cpu" and recipes.get(args.recipe).single_thread:
        # A small model's mini-batches are too small for intra-op threads to pay off: syncing them costs
        # more than it saves, and on a busy machine spinning OpenMP workers make a step ~50x slower.
        torch.set_num_threads(1)
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

    network = build_network(args, encoder, tensors["train"][0])
    shares = parallel.choose(args.sharding, network, processes.rank, processes.world_size, device)
    if not shares.sharded:  # sharded, each layer's shard moves to the device as it is sharded
        network = network.to(device)
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
    prepare = recipes.get(args.recipe).prepare
    linear_path = prepare(args, network, objective, tensors["train"]) if prepare else None
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
    result = fit(
        network, objective, tensors["train"], tensors["validation"], args, checkpoints, processes, shares
    )
    x_test, y_test = tensors["test"]
    if result.sharded:
        # Every process runs the test split through the sharded network (each layer's forward gathers its
        # weights from all of them); then the main one gathers the whole network on the host to save it.
        outputs = predict(network, x_test).cpu()
        weights = parallel.FullySharded(processes.rank, processes.world_size).full_weights(network)
        if not processes.main:
            return {}
        network = build_network(args, encoder, tensors["train"][0])
        network.load_state_dict(weights)
        network.eval()
    elif not processes.main:
        return {}  # the main process evaluates and saves the model the processes trained together
    else:
        outputs = predict(network, x_test).cpu()
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
    """The recipe's network for the encoder's inputs and outputs (`recipes.Recipe.network`)."""
    return recipes.get(args.recipe).network(args, encoder, train_inputs)


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
    save_weights = getattr(network, "save_weights", None)
    if save_weights is not None:  # a pretrained model saves itself in its library's format
        save_weights(model_dir)
    else:
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
    (code / "requirements.txt").write_text(serving_requirements(network, code))
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
