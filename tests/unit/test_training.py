"""The training recipe end to end on small synthetic datasets: train.py as SageMaker runs it, the artefact it
leaves, and the serving handlers loaded from the artefact's own code/ (docs/contracts.md, sections 2-4)."""

import base64
import contextlib
import csv
import importlib
import inspect
import io
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from samples import SHAPES, image_suffix, negation_rows, shape_image

ROOT = Path(__file__).resolve().parents[2]
TRAINING = ROOT / "training"
# Top-level names the training code imports itself by (as in /opt/ml/code and /opt/ml/model/code).
TRAINING_MODULES = (
    "data",
    "model",
    "metrics",
    "inference",
    "train",
    "loop",
    "recipes",
    "hf_text",
    "checkpoint",
    "report",
    "images",
    "image_cnn",
    "hf_image",
    "splits",
    "arguments",
    "parallel",
)
EPOCH_LINE = re.compile(
    r"^epoch=\d+ train_loss=[-+0-9.eE]+ validation_loss=[-+0-9.eE]+ validation_(accuracy|rmse)="
)
MISSING_MARKERS = ["", "NA", " n/a ", "NaN", "null", "None"]


@contextlib.contextmanager
def modules_from(directory: Path):
    """Import the training modules from `directory`, then forget them so other tests get their own."""
    saved = {name: sys.modules.pop(name) for name in TRAINING_MODULES if name in sys.modules}
    sys.path.insert(0, str(directory))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(directory))
        for name in TRAINING_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


# --- synthetic datasets, laid out as SageMaker's channels ------------------------------------------------


def tier_rows(n, rng):
    """Three string classes driven by a numeric `spend` and a categorical `plan`; an ID column to ignore."""
    rows = []
    for i in range(n):
        plan = rng.choice(["basic", "pro", "enterprise", "trial"])
        spend = rng.gauss(50, 20)
        score = (spend - 50) / 20 + {"basic": -0.8, "pro": 0.6, "enterprise": 1.6, "trial": -1.6}[plan]
        score += rng.gauss(0, 0.3)
        tier = "bronze" if score < -0.5 else "silver" if score < 0.9 else "gold"
        spend_text = rng.choice(MISSING_MARKERS) if rng.random() < 0.04 else f"{spend:.2f}"
        plan_text = rng.choice(["", "NA"]) if rng.random() < 0.03 else plan
        rows.append({"customer_id": f"C{i:05d}", "spend": spend_text, "plan": plan_text, "tier": tier})
    return rows


def churn_rows(n, rng):
    """Integer labels 0/1 (imbalanced, about 30% ones), a numeric and a categorical feature."""
    rows = []
    for _ in range(n):
        tenure = rng.uniform(0, 60)
        contract = rng.choice(["monthly", "yearly"])
        logit = 2.6 - tenure / 8 + (1.8 if contract == "monthly" else -1.8) + rng.gauss(0, 0.5)
        rows.append({"tenure": f"{tenure:.1f}", "contract": contract, "churned": "1" if logit > 0 else "0"})
    return rows


def price_rows(n, rng):
    """A numeric target in the hundreds of thousands: the encoder must scale it and serving unscale it."""
    rows = []
    for _ in range(n):
        size = rng.uniform(30, 200)
        rooms = rng.randint(1, 6)
        city = rng.choice(["north", "south", "east"])
        price = 1500 * size + 9000 * rooms + {"north": 40000, "south": 0, "east": -30000}[city]
        rows.append(
            {
                "size_m2": f"{size:.1f}",
                "rooms": str(rooms),
                "city": city,
                "price": f"{price + rng.gauss(0, 8000):.0f}",
            }
        )
    return rows


def manifest_for(train_rows, task, target, features, ignored=(), labels=None):
    """A manifest as preprocessing writes it: feature statistics from the train split only."""
    columns = []
    for name, kind in features.items():
        present = [
            r[name].strip()
            for r in train_rows
            if r[name].strip().lower() not in {"", "na", "n/a", "nan", "null", "none"}
        ]
        stats = {"count": len(present), "missing": len(train_rows) - len(present)}
        if kind == "numeric":
            numbers = [float(v) for v in present]
            stats.update(
                mean=statistics.fmean(numbers),
                std=statistics.stdev(numbers),
                min=min(numbers),
                max=max(numbers),
            )
        elif kind == "text":
            # The contract's tokeniser and vocabulary order, written out here rather than imported.
            tokens = [t for value in present for t in re.findall(r"\w+", value.lower())]
            ranked = sorted(Counter(tokens).items(), key=lambda kv: (-kv[1], kv[0]))
            stats.update(
                mean_tokens=round(len(tokens) / max(1, len(present)), 2),
                vocabulary=[t for t, _ in ranked[:20_000]],
                truncated=len(ranked) > 20_000,
            )
        else:
            ranked = sorted(Counter(present).items(), key=lambda kv: (-kv[1], kv[0]))
            stats.update(categories=[v for v, _ in ranked[:50]], truncated=len(ranked) > 50)
        columns.append({"name": name, "role": "feature", "type": kind, "stats": stats})
    columns += [{"name": name, "role": "ignored", "reason": "identifier-like"} for name in ignored]
    values = [r[target] for r in train_rows]
    if task == "classification":
        columns.append(
            {
                "name": target,
                "role": "target",
                "type": "categorical",
                "stats": {"count": len(values), "missing": 0, "class_counts": dict(Counter(values))},
            }
        )
    else:
        numbers = [float(v) for v in values]
        columns.append(
            {
                "name": target,
                "role": "target",
                "type": "numeric",
                "stats": {
                    "count": len(numbers),
                    "missing": 0,
                    "mean": statistics.fmean(numbers),
                    "std": statistics.stdev(numbers),
                    "min": min(numbers),
                    "max": max(numbers),
                },
            }
        )
    manifest = {
        "schema_version": 1,
        "dataset": "synthetic",
        "version": "20261122T175500Z-1a2b3c",
        "format": "csv",
        "delimiter": ",",
        "task": task,
        "recipe": "text" if "text" in features.values() else "tabular",
        "target": target,
        "columns": columns,
    }
    if labels is not None:
        manifest["labels"] = labels
    return manifest


def write_channels(root: Path, rows, manifest) -> dict[str, Path]:
    """train/validation/test/part-00000.csv (80/10/10, original strings) and manifest/manifest.json."""
    n = len(rows)
    cut = {
        "train": rows[: int(n * 0.8)],
        "validation": rows[int(n * 0.8) : int(n * 0.9)],
        "test": rows[int(n * 0.9) :],
    }
    channels = {}
    for split, part in cut.items():
        directory = root / split
        directory.mkdir(parents=True)
        with (directory / "part-00000.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(part)
        channels[split] = directory
    (root / "manifest").mkdir()
    (root / "manifest" / "manifest.json").write_text(json.dumps(manifest))
    channels["manifest"] = root / "manifest"
    return channels


def split_rows(channels, split):
    with (channels[split] / "part-00000.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


class TrainedCase:
    def __init__(self, root, channels, manifest, completed):
        self.root, self.channels, self.manifest, self.completed = root, channels, manifest, completed
        self.model_dir, self.output_dir = root / "opt/ml/model", root / "opt/ml/output/data"

    def evaluation(self):
        return json.loads((self.model_dir / "evaluation.json").read_text())


def training_command(root: Path, rows, manifest, *extra, launcher=()):
    """The command and environment of a training job on `rows`, checkpointing to <root>/checkpoints."""
    channels = write_channels(root / "input", rows, manifest)
    ml = root / "opt/ml"
    env = {
        **os.environ,
        "SM_MODEL_DIR": str(ml / "model"),
        "SM_OUTPUT_DATA_DIR": str(ml / "output/data"),
        "SM_OUTPUT_DIR": str(ml / "output"),
        "SM_CHECKPOINT_DIR": str(root / "checkpoints"),
        **{f"SM_CHANNEL_{name.upper()}": str(path) for name, path in channels.items()},
    }
    command = [*launcher, str(TRAINING / "train.py"), "--hidden_units", "32,16", "--batch_size", "64", *extra]
    if not launcher:
        command.insert(0, sys.executable)
    return command, env


def run_training(root: Path, rows, manifest, *extra) -> TrainedCase:
    # Hyperparameters as SageMaker passes them: underscores, strings, and its own sagemaker_* ones too.
    command, env = training_command(
        root,
        rows,
        manifest,
        "--epochs",
        "25",
        "--sagemaker_program",
        "train.py",
        "--sagemaker_submit_directory",
        "s3://artifacts/code/training/sourcedir.tar.gz",
        *extra,
    )
    completed = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    channels = {
        name: Path(env[f"SM_CHANNEL_{name.upper()}"]) for name in ("train", "validation", "test", "manifest")
    }
    return TrainedCase(root, channels, manifest, completed)


@pytest.fixture(scope="module")
def tiers(tmp_path_factory):
    rows = tier_rows(1000, random.Random(1))
    manifest = manifest_for(
        rows[:800],
        "classification",
        "tier",
        {"spend": "numeric", "plan": "categorical"},
        ignored=["customer_id"],
        labels=["bronze", "gold", "silver"],
    )
    return run_training(tmp_path_factory.mktemp("tiers"), rows, manifest)


@pytest.fixture(scope="module")
def churn(tmp_path_factory):
    rows = churn_rows(800, random.Random(2))
    manifest = manifest_for(
        rows[:640],
        "classification",
        "churned",
        {"tenure": "numeric", "contract": "categorical"},
        labels=[0, 1],
    )
    return run_training(tmp_path_factory.mktemp("churn"), rows, manifest)


@pytest.fixture(scope="module")
def prices(tmp_path_factory):
    rows = price_rows(600, random.Random(3))
    manifest = manifest_for(
        rows[:480], "regression", "price", {"size_m2": "numeric", "rooms": "numeric", "city": "categorical"}
    )
    return run_training(tmp_path_factory.mktemp("prices"), rows, manifest)


@contextlib.contextmanager
def served(case: TrainedCase):
    """The artefact's own serving handlers, as the container loads them from <model_dir>/code/."""
    with modules_from(case.model_dir / "code") as load:
        inference = load("inference")
        assert Path(inference.__file__).parent == case.model_dir / "code"
        yield inference, inference.model_fn(str(case.model_dir))


def serve(inference, model, instances):
    data = inference.input_fn(json.dumps({"instances": instances}), "application/json")
    return json.loads(inference.output_fn(inference.predict_fn(data, model), "application/json"))


# --- training jobs ---------------------------------------------------------------------------------------


def test_the_model_directory_holds_what_the_contract_lists(tiers):
    model_dir = tiers.model_dir
    for name in (
        "model.pth",
        "model_config.json",
        "evaluation.json",
        "code/inference.py",
        "code/model.py",
        "code/data.py",
        "code/requirements.txt",
    ):
        assert (model_dir / name).is_file(), name
    assert (tiers.output_dir / "evaluation.json").read_text() == (model_dir / "evaluation.json").read_text()
    requirements = (model_dir / "code/requirements.txt").read_text().splitlines()
    assert all(line.startswith("#") or not line.strip() for line in requirements)
    config = json.loads((model_dir / "model_config.json").read_text())
    assert config["task"] == "classification" and config["target"] == "tier"
    assert config["labels"] == ["bronze", "gold", "silver"]
    assert [f["name"] for f in config["features"]] == ["spend", "plan"]
    assert config["architecture"]["hidden_units"] == [32, 16]


def test_multiclass_accuracy_clearly_beats_the_majority_class(tiers):
    evaluation = tiers.evaluation()
    summary = evaluation["conveyor"]
    assert summary["task"] == "classification" and summary["metric"] == "accuracy"
    assert summary["baseline_name"] == "majority class" and summary["test_rows"] == 100
    assert summary["value"] > summary["baseline"] + 0.25, summary
    metrics = evaluation["multiclass_classification_metrics"]
    assert metrics["accuracy"] == {"value": summary["value"], "standard_deviation": "NaN"}
    assert 0 < metrics["macro_f1"]["value"] <= 1
    assert sum(sum(row.values()) for row in metrics["confusion_matrix"].values()) == 100


def test_stdout_has_the_lines_the_metric_definitions_scrape(tiers):
    lines = tiers.completed.stdout.splitlines()
    epochs = [line for line in lines if EPOCH_LINE.match(line)]
    assert epochs and epochs[0].startswith("epoch=1 ")
    final = [line for line in lines if re.search(r"\btest_accuracy=([-+0-9.eE]+)", line)]
    assert len(final) == 1
    value = float(re.search(r"test_accuracy=([-+0-9.eE]+)", final[0]).group(1))
    assert value == pytest.approx(tiers.evaluation()["conveyor"]["value"], abs=1e-4)
    # Only epoch lines may feed the validation metrics; an early-stop message must not.
    assert all(EPOCH_LINE.match(line) for line in lines if "validation_loss=" in line)


def test_integer_labels_train_and_binary_metrics_are_reported(churn):
    evaluation = churn.evaluation()
    summary = evaluation["conveyor"]
    assert summary["value"] > summary["baseline"] + 0.15, summary
    metrics = evaluation["binary_classification_metrics"]
    assert metrics["auc"]["value"] > 0.9
    assert set(metrics["confusion_matrix"]) == {"0", "1"}


def test_regression_beats_the_train_mean(prices):
    evaluation = prices.evaluation()
    summary = evaluation["conveyor"]
    assert summary["metric"] == "r2" and summary["baseline_name"] == "train mean"
    assert summary["value"] > 0.8 and summary["baseline"] <= 0.01
    metrics = evaluation["regression_metrics"]
    assert metrics["rmse"]["value"] == pytest.approx(math.sqrt(metrics["mse"]["value"]))
    assert re.search(r"^test_r2=[-+0-9.eE]+ ", prices.completed.stdout, re.MULTILINE)
    assert "validation_rmse=" in prices.completed.stdout


# --- serving from the artefact ---------------------------------------------------------------------------


def test_served_predictions_match_the_evaluation(tiers):
    test_rows = split_rows(tiers.channels, "test")
    instances = [{k: v for k, v in row.items() if k != "tier"} for row in test_rows]
    with served(tiers) as (inference, model):
        predictions = serve(inference, model, instances)["predictions"]
    assert len(predictions) == len(test_rows)
    for prediction in predictions:
        assert prediction["label"] in ("bronze", "gold", "silver")
        assert set(prediction["probabilities"]) == {"bronze", "gold", "silver"}
        assert sum(prediction["probabilities"].values()) == pytest.approx(1, abs=1e-6)
        assert prediction["label"] == max(prediction["probabilities"], key=prediction["probabilities"].get)
    accuracy = np.mean([p["label"] == r["tier"] for p, r in zip(predictions, test_rows, strict=True)])
    # Serving must encode exactly as training did: the same rows get the same accuracy.
    assert accuracy == pytest.approx(tiers.evaluation()["conveyor"]["value"])


def test_served_integer_labels_are_json_numbers(churn):
    instances = [
        {"tenure": 2, "contract": "monthly"},
        {"tenure": "58.5", "contract": "yearly"},
        {"tenure": None, "contract": ""},
    ]
    with served(churn) as (inference, model):
        predictions = serve(inference, model, instances)["predictions"]
    assert [p["label"] for p in predictions[:2]] == [1, 0]
    assert all(type(p["label"]) is int and set(p["probabilities"]) == {"0", "1"} for p in predictions)


def test_served_regression_values_are_in_the_targets_units(prices):
    test_rows = split_rows(prices.channels, "test")
    instances = [{k: v for k, v in row.items() if k != "price"} for row in test_rows]
    with served(prices) as (inference, model):
        values = [p["value"] for p in serve(inference, model, instances)["predictions"]]
    actual = np.array([float(r["price"]) for r in test_rows])
    r2 = 1 - np.sum((actual - values) ** 2) / np.sum((actual - actual.mean()) ** 2)
    assert r2 == pytest.approx(prices.evaluation()["conveyor"]["value"], abs=1e-6)


def test_bad_requests_name_the_row_and_column(churn):
    good = {"tenure": 12, "contract": "monthly"}
    with served(churn) as (inference, _):

        def error(body, content_type="application/json"):
            with pytest.raises(ValueError) as raised:
                inference.input_fn(body if isinstance(body, str) else json.dumps(body), content_type)
            return str(raised.value)

        assert (
            error({"instances": [good, {"contract": "monthly"}]})
            == "instance 1: missing feature column 'tenure'"
        )
        assert error({"instances": [{"tenure": "abc", "contract": "x"}]}) == (
            "instance 0: column 'tenure' must be a number, got 'abc'"
        )
        assert "instance 0: column 'tenure'" in error({"instances": [{"tenure": True, "contract": "x"}]})
        assert "instance 0: column 'contract'" in error({"instances": [{"tenure": 1, "contract": [1]}]})
        assert "instances" in error({"rows": [good]})
        assert "instances" in error({"instances": []})
        assert "at most 10000" in error({"instances": [good] * 10_001})
        assert "not valid JSON" in error("{not json")
        assert "content type" in error({"instances": [good]}, "text/csv")
        # Unknown keys are ignored; null, "" and missing markers are imputed; charset parameters are fine.
        data = inference.input_fn(
            json.dumps(
                {"instances": [{**good, "churned": 1, "extra": "x"}, {"tenure": None, "contract": "NA"}]}
            ),
            "application/json; charset=utf-8",
        )
        assert [a.shape for a in data] == [(2, 1 + 3)]
        with pytest.raises(ValueError, match="cannot answer"):
            inference.output_fn([], "text/csv")


def test_handlers_take_the_arguments_the_serving_toolkit_passes(churn):
    # sagemaker-inference passes a request context only to a handler with one parameter more than this.
    with served(churn) as (inference, _):
        counts = {
            name: len(inspect.signature(getattr(inference, name)).parameters)
            for name in ("model_fn", "input_fn", "predict_fn", "output_fn")
        }
        error = inference.InvalidInput("instance 0: missing feature column 'tenure'")
    assert counts == {"model_fn": 1, "input_fn": 2, "predict_fn": 2, "output_fn": 2}
    assert (error.status_code, str(error)) == (400, "instance 0: missing feature column 'tenure'")


# --- the recipe's parts, in process ----------------------------------------------------------------------


@pytest.fixture
def training_modules():
    with modules_from(TRAINING) as load:
        yield load


def test_a_missing_channel_fails_with_a_reason_sagemaker_reports(tmp_path, monkeypatch, training_modules):
    for name in (
        "SM_CHANNEL_TRAIN",
        "SM_CHANNEL_VALIDATION",
        "SM_CHANNEL_TEST",
        "SM_CHANNEL_MANIFEST",
        "SM_HPS",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SM_OUTPUT_DIR", str(tmp_path / "output"))
    train = training_modules("train")
    assert train.main(["--train", str(tmp_path), "--validation", str(tmp_path), "--test", str(tmp_path)]) == 1
    reason = (tmp_path / "output" / "failure").read_text()
    assert "missing channel(s) manifest" in reason and "SM_CHANNEL_MANIFEST" in reason


def test_an_empty_split_fails_with_a_reason_sagemaker_reports(tmp_path, monkeypatch, training_modules):
    rows = churn_rows(100, random.Random(5))
    manifest = manifest_for(
        rows[:80],
        "classification",
        "churned",
        {"tenure": "numeric", "contract": "categorical"},
        labels=[0, 1],
    )
    channels = write_channels(tmp_path / "input", rows, manifest)
    (channels["validation"] / "part-00000.csv").write_text("tenure,contract,churned\n")
    monkeypatch.setenv("SM_OUTPUT_DIR", str(tmp_path / "output"))
    train = training_modules("train")
    argv = [f"--{name}={path}" for name, path in channels.items()]
    argv += [
        f"--model-dir={tmp_path / 'model'}",
        f"--output-data-dir={tmp_path / 'output/data'}",
        "--epochs=1",
    ]
    assert train.main(argv) == 1
    assert "validation split is empty" in (tmp_path / "output" / "failure").read_text()
    assert not (tmp_path / "model" / "model.pth").exists()


def test_hyperparameters_come_from_sm_hps_and_arguments(monkeypatch, training_modules):
    monkeypatch.setenv(
        "SM_HPS", json.dumps({"epochs": 30, "hidden_units": "[16, 8]", "learning_rate": "0.01"})
    )
    for name in ("train", "validation", "test", "manifest"):
        monkeypatch.setenv(f"SM_CHANNEL_{name.upper()}", f"/opt/ml/input/data/{name}")
    train = training_modules("train")
    args = train.parse_args(["--epochs", "5", "--sagemaker_program", "train.py"])
    assert (args.epochs, args.hidden_units, args.learning_rate) == (5, (16, 8), 0.01)
    assert args.train == "/opt/ml/input/data/train"
    with pytest.raises(ValueError, match="batch_size=0"):
        train.parse_args(["--batch-size", "0"])
    with pytest.raises(ValueError, match="hidden_units"):
        train.parse_args(["--hidden-units", "64,wide"])


def test_the_encoder_survives_json_and_imputes_missing_values(training_modules):
    data = training_modules("data")
    encoder = data.Encoder(
        task="classification",
        target="y",
        labels=[-1, 1],
        features=[
            {"name": "age", "type": "numeric", "mean": 40.0, "std": 10.0},
            {"name": "plan", "type": "categorical", "categories": ["basic", "pro"]},
        ],
    )
    copy = data.Encoder.from_config(json.loads(json.dumps(encoder.to_config())))
    columns = {"age": ["50", " NA ", "n/a", "30"], "plan": ["pro", "null", "gold", " basic "]}
    expected = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1], [-1, 1, 0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(copy.encode(columns, 4), expected)
    np.testing.assert_array_equal(copy.encode_target(["1", "-1", "+1", " 1"]), [1, 0, 1, 1])
    with pytest.raises(data.DataError, match="not one of the manifest's labels"):
        copy.encode_target(["2"])


def test_auc_and_f1_agree_with_hand_computed_values(training_modules):
    metrics = training_modules("metrics")
    assert metrics.roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert metrics.roc_auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    evaluation = metrics.classification_evaluation(
        probabilities, np.array([0, 1, 1, 1]), np.array([1, 1, 0]), ["no", "yes"]
    )
    binary = evaluation["binary_classification_metrics"]
    assert binary["accuracy"]["value"] == pytest.approx(0.75)
    assert binary["f1"]["value"] == pytest.approx(0.8)  # precision 1, recall 2/3
    assert evaluation["conveyor"]["baseline"] == pytest.approx(0.75)  # train majority "yes"
    assert binary["confusion_matrix"] == {"no": {"no": 1, "yes": 0}, "yes": {"no": 1, "yes": 2}}


# --- the tabular recipe's linear path ---------------------------------------------------------------------


def fit_arguments(train, *extra):
    """Hyperparameters as parse_args gives them (the channels are not read)."""
    channels = [
        arg for name in ("train", "validation", "test", "manifest") for arg in (f"--{name}", "unused")
    ]
    return train.parse_args([*channels, *extra])


def test_the_linear_path_is_ridge_fitted_exactly_and_the_mlp_starts_from_it(training_modules):
    import torch

    train, model = training_modules("train"), training_modules("model")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = (x @ np.array([1.5, -2.0, 0.5, 0.0]) + 0.3 + rng.normal(scale=0.5, size=300)).astype(np.float32)
    network = model.TabularMLP(4, 1, (16,), 0.0, linear_path=True)
    inputs = torch.from_numpy(x)
    iterations = train.fit_linear_path(network, train.Regression(1.0), ((inputs,), torch.from_numpy(y)))
    # Ridge(alpha=1) in closed form: centred data, the intercept not penalised.
    centred, target = x - x.mean(axis=0), y - y.mean()
    weights = np.linalg.solve(centred.T @ centred + np.eye(4), centred.T @ target)
    assert network.linear.weight.detach().numpy()[0] == pytest.approx(weights, abs=1e-4)
    assert network.linear.bias.item() == pytest.approx(y.mean() - x.mean(axis=0) @ weights, abs=1e-4)
    assert iterations >= 1
    # Training starts from exactly the linear model, whose weights stay as fitted.
    assert not any(p.requires_grad for p in network.linear.parameters())
    assert torch.equal(network(inputs), network.linear(inputs))
    assert model.build_model(network.architecture()).linear is not None  # serving rebuilds the same network


def test_the_linear_path_of_a_classifier_is_the_l2_logistic_regression_optimum(training_modules):
    import torch

    train, model = training_modules("train"), training_modules("model")
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 3)).astype(np.float32)
    logits = x @ np.array([[2.0, -1.0, 0.0], [0.0, 1.5, -1.5], [1.0, 0.0, 1.0]])
    y = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
    network = model.TabularMLP(3, 3, (), 0.0, linear_path=True)  # no hidden layers: the fitted layer is all
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    objective = train.Classification(None)
    train.fit_linear_path(network, objective, ((inputs,), targets))
    layer = network.output_layer
    assert layer.weight.requires_grad  # without hidden layers training goes on from the fit
    loss = objective.train_loss(layer(inputs), targets) + 0.5 * layer.weight.square().sum() / len(y)
    gradients = torch.autograd.grad(loss, [layer.weight, layer.bias])
    assert max(g.abs().max().item() for g in gradients) < 1e-4  # the penalised loss's minimum
    sklearn = pytest.importorskip("sklearn.linear_model")
    reference = sklearn.LogisticRegression(C=1.0, max_iter=10_000, tol=1e-8).fit(x, y)
    probabilities = torch.softmax(layer(inputs), dim=1).detach().numpy()
    assert probabilities == pytest.approx(reference.predict_proba(x), abs=1e-3)


def test_fit_keeps_the_start_when_no_epoch_lowers_validation_loss(training_modules):
    import torch

    train, model = training_modules("train"), training_modules("model")
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.normal(size=(200, 3)).astype(np.float32))
    y = x @ torch.tensor([1.0, -1.0, 0.5]) + 0.1 * torch.from_numpy(rng.normal(size=200).astype(np.float32))
    network = model.TabularMLP(3, 1, (8,), 0.0, linear_path=True)
    objective = train.Regression(1.0)
    train.fit_linear_path(network, objective, ((x[:150],), y[:150]))
    fitted = network.linear(x[150:]).detach()
    # A learning rate this high wrecks the MLP's part in its first steps: every epoch is worse than the start.
    args = fit_arguments(train, "--learning-rate", "50", "--epochs", "3", "--patience", "5")
    with contextlib.redirect_stdout(io.StringIO()):
        result = train.fit(network, objective, ((x[:150],), y[:150]), ((x[150:],), y[150:]), args)
    assert (result.best_epoch, result.epochs_run) == (0, 3)
    # The start is in the history as epoch 0 (the report plots it), validated but not trained.
    assert [row["epoch"] for row in result.history] == [0, 1, 2, 3]
    assert "train_loss" not in result.history[0]
    assert result.history[0]["validation_loss"] == pytest.approx(result.best_validation_loss)
    assert torch.allclose(train.predict(network, (x[150:],)), fitted)


def test_automatic_class_weights_start_at_four_to_one(training_modules):
    train = training_modules("train")
    assert train.class_weights(np.array([0] * 80 + [1] * 20), 2, "auto") is None
    weights = train.class_weights(np.array([0] * 81 + [1] * 19), 2, "auto")
    assert weights == pytest.approx(train.class_weights(np.array([0] * 81 + [1] * 19), 2, "sqrt"))
    assert weights[1] > weights[0]
    assert train.class_weights(np.array([0] * 30 + [1] * 30 + [2] * 5), 3, "auto") is not None
    assert fit_arguments(train).class_weights == "auto"


def test_the_report_says_when_the_linear_model_was_kept_alone(training_modules):
    report = training_modules("report")
    linear = {"iterations": 14, "seconds": 0.01}
    kept = report._training_sentence(
        {"epochs_run": 9, "training_seconds": 1.2, "best_epoch": 0, "linear_path": linear}
    )
    trained = report._training_sentence(
        {"epochs_run": 9, "training_seconds": 1.2, "best_epoch": 4, "linear_path": linear}
    )
    plain = report._training_sentence({"epochs_run": 9, "training_seconds": 1.2, "best_epoch": 4})
    assert "the fitted linear model was kept" in kept and "14 L-BFGS iterations" in kept
    assert trained.endswith("kept epoch 4.") and "linear model was fitted first" in trained
    assert plain == "trained 9 epochs in 1.2 s and kept epoch 4."


# --- text features: a bag of words per text column -------------------------------------------------------

POSITIVE = ["great", "wonderful", "loved", "excellent", "superb", "delightful", "brilliant", "enjoyable"]
NEGATIVE = ["awful", "boring", "terrible", "hated", "dull", "waste", "poor", "disappointing"]
NEUTRAL = [
    "the",
    "movie",
    "film",
    "plot",
    "actors",
    "story",
    "was",
    "and",
    "a",
    "it",
    "of",
    "this",
    "with",
    "scenes",
    "ending",
    "music",
    "très",
    "cast",
]


def review_rows(n, rng):
    """Short reviews whose sentiment words decide the label, in mixed case and punctuation.

    Each review also names a reviewer (``user123``), a token nearly always outside the train vocabulary;
    a few reviews are missing, with a random label; `platform` is irrelevant.
    """
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.55
        majority, minority = (POSITIVE, NEGATIVE) if positive else (NEGATIVE, POSITIVE)
        count = rng.randint(1, 3)
        words = rng.sample(NEUTRAL, rng.randint(3, 8)) + rng.choices(majority, k=count)
        if count >= 2 and rng.random() < 0.4:
            words.append(rng.choice(minority))
        rng.shuffle(words)
        words = [
            w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.1 else w for w in words
        ]
        review = "".join(w + rng.choice([" ", " ", ", ", "! ", "... "]) for w in words)
        review += f"-- user{rng.randint(0, 99_999)}"
        if rng.random() < 0.03:
            review, positive = rng.choice(["", "NA", "null"]), rng.random() < 0.5
        rows.append(
            {
                "review": review,
                "platform": rng.choice(["web", "app"]),
                "sentiment": "positive" if positive else "negative",
            }
        )
    return rows


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    rows = review_rows(600, random.Random(6))
    manifest = manifest_for(
        rows[:480],
        "classification",
        "sentiment",
        {"review": "text", "platform": "categorical"},
        labels=["negative", "positive"],
    )
    return run_training(tmp_path_factory.mktemp("reviews"), rows, manifest, "--recipe", "tabular")


def test_text_classification_clearly_beats_the_majority_class(reviews):
    summary = reviews.evaluation()["conveyor"]
    assert summary["test_rows"] == 60
    assert summary["value"] > summary["baseline"] + 0.3, summary
    config = json.loads((reviews.model_dir / "model_config.json").read_text())
    vocabulary = reviews.manifest["columns"][0]["stats"]["vocabulary"]
    assert config["features"][0] == {"name": "review", "type": "text", "vocabulary": vocabulary}
    assert config["architecture"]["in_features"] == len(vocabulary) + 1 + len(["web", "app"]) + 1


def test_served_text_predictions_match_the_evaluation(reviews):
    test_rows = split_rows(reviews.channels, "test")
    instances = [{k: v for k, v in row.items() if k != "sentiment"} for row in test_rows]
    instances += [
        {"review": "Great, WONDERFUL film!! Loved it.", "platform": "web"},
        {"review": "boring and dull; a waste", "platform": "app", "sentiment": "ignored"},
        {"review": None, "platform": "web"},
        {"review": "", "platform": "web"},
    ]
    with served(reviews) as (inference, model):
        predictions = serve(inference, model, instances)["predictions"]
    labels = [p["label"] for p in predictions]
    assert labels[-4:-2] == ["positive", "negative"]
    accuracy = np.mean([label == r["sentiment"] for label, r in zip(labels, test_rows, strict=False)])
    assert accuracy == pytest.approx(reviews.evaluation()["conveyor"]["value"])


def test_a_text_column_must_be_a_string_in_a_request(reviews):
    with served(reviews) as (inference, _):
        for value, kind in [(5, "5"), (True, "a boolean"), (["good"], "an array"), ({"a": 1}, "an object")]:
            body = {
                "instances": [{"review": "good", "platform": "web"}, {"review": value, "platform": "web"}]
            }
            with pytest.raises(inference.InvalidInput) as raised:
                inference.input_fn(json.dumps(body), "application/json")
            assert raised.value.status_code == 400
            assert (
                str(raised.value) == f"instance 1: column 'review' is text and must be a string, got {kind}"
            )


def test_text_encodes_as_log_counts_of_vocabulary_tokens(training_modules):
    data = training_modules("data")
    encoder = data.Encoder(
        task="classification",
        target="y",
        labels=["negative", "positive"],
        features=[
            {"name": "stars", "type": "numeric", "mean": 3.0, "std": 1.0},
            {"name": "review", "type": "text", "vocabulary": ["good", "movie", "über"]},
        ],
    )
    copy = data.Encoder.from_config(json.loads(json.dumps(encoder.to_config())))
    assert copy.width == 1 + 3 + 1
    columns = {
        "stars": ["4", "", "3", "2", "3"],
        "review": ["Good, GOOD movie!", " NA ", "ÜBER_cool Über", "!!!", "bad bad bad"],
    }
    one, two, three = math.log1p(1), math.log1p(2), math.log1p(3)
    expected = np.array(
        [
            [1, two, one, 0, 0],
            [0, 0, 0, 0, 0],  # missing: all zeros, the "other tokens" slot included
            [0, 0, 0, one, one],  # "über_cool" is one token, outside the vocabulary
            [-1, 0, 0, 0, 0],  # no tokens at all
            [0, 0, 0, 0, three],
        ],
        dtype=np.float32,
    )
    np.testing.assert_allclose(copy.encode(columns, 5), expected, rtol=1e-6)
    # A request encodes as the CSV does; null and "" are missing as well.
    instances = [{"stars": s, "review": r} for s, r in zip(columns["stars"], columns["review"], strict=True)]
    instances += [{"stars": 3, "review": None}, {"stars": 3, "review": ""}]
    np.testing.assert_allclose(copy.encode_instances(instances)[0][:5], expected, rtol=1e-6)
    assert not copy.encode_instances(instances)[0][5:].any()


def test_bag_of_words_equals_counting_tokens_one_by_one(training_modules):
    data = training_modules("data")
    rng = random.Random(11)
    words = [f"w{i}" for i in range(300)] + ["Ünïcode", "naïve", "東京", "x_y", "٣٤", "İstanbul"]
    vocabulary = rng.sample([w.lower() for w in words], 200)
    values = [
        rng.choice(["", "NA"]) if rng.random() < 0.05 else " ".join(rng.choices(words, k=rng.randint(0, 40)))
        for _ in range(3000)
    ]
    encoder = data.Encoder(
        task="regression", target="y", features=[{"name": "t", "type": "text", "vocabulary": vocabulary}]
    )
    matrix = encoder.encode({"t": values}, len(values))
    expected = np.zeros((len(values), len(vocabulary) + 1), dtype=np.float32)
    slot = {token: i for i, token in enumerate(vocabulary)}
    for row, value in enumerate(values):
        if value.strip().lower() in data.MISSING_TOKENS:
            continue
        # Every token outside the vocabulary counts towards the one "other" slot.
        slots = Counter(slot.get(token, len(vocabulary)) for token in re.findall(r"\w+", value.lower()))
        for column, count in slots.items():
            expected[row, column] = math.log1p(count)
    np.testing.assert_allclose(matrix, expected, rtol=1e-6)


def test_a_text_manifest_is_read_and_its_vocabulary_capped(tmp_path, training_modules):
    data, splits = training_modules("data"), training_modules("splits")
    rows = review_rows(200, random.Random(8))
    manifest = manifest_for(
        rows, "classification", "sentiment", {"review": "text"}, labels=["negative", "positive"]
    )
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    encoder = data.Encoder.from_manifest(splits.read_manifest(tmp_path), max_vocabulary=5)
    assert encoder.features == [
        {"name": "review", "type": "text", "vocabulary": manifest["columns"][0]["stats"]["vocabulary"][:5]}
    ]
    assert encoder.width == 6
    del manifest["columns"][0]["stats"]["vocabulary"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(data.DataError, match=r"feature 'review' needs .* text \(stats vocabulary"):
        splits.read_manifest(tmp_path)


def test_a_vocabulary_too_big_for_memory_fails_naming_the_hyperparameter(monkeypatch, training_modules):
    data, train, splits = training_modules("data"), training_modules("train"), training_modules("splits")
    encoder = data.Encoder(
        task="regression",
        target="y",
        features=[
            {"name": "x", "type": "numeric", "mean": 0.0, "std": 1.0},
            {"name": "t", "type": "text", "vocabulary": [f"w{i}" for i in range(1000)]},
        ],
    )
    split_of = {name: splits.Split(name, rows=5000) for name in ("train", "validation", "test")}
    device = train.torch.device("cpu")
    monkeypatch.setattr(train, "available_memory", lambda device: 20 * 2**20)
    # 10 MiB for the splits: 10 * 2**20 / 4 bytes / 15,000 rows = 174 inputs, less 2 for `x` and "other".
    with pytest.raises(
        train.ConfigurationError, match=r"lower the hyperparameter max_vocabulary \(now 1000\) to at most 172"
    ):
        train.check_memory(encoder, split_of, device, SimpleNamespace(max_vocabulary=1000))
    monkeypatch.setattr(train, "available_memory", lambda device: 2**30)
    train.check_memory(encoder, split_of, device, SimpleNamespace(max_vocabulary=1000))
    with pytest.raises(ValueError, match="max_vocabulary=0"):
        train.parse_args(["--max_vocabulary", "0", *(f"--{c}=/d" for c in train.CHANNELS)])


# --- the text recipe: a BiLSTM reads each text value in order ------------------------------------------


@pytest.fixture(scope="module")
def negations(tmp_path_factory):
    rows = negation_rows(1200, random.Random(21))
    manifest = manifest_for(
        rows[:960],
        "classification",
        "label",
        {"review": "text", "stars_shown": "numeric"},
        labels=["negative", "positive"],
    )
    assert manifest["recipe"] == "text"
    root = tmp_path_factory.mktemp("negations")
    return {
        "text": run_training(root / "text", rows, manifest),
        "tabular": run_training(root / "tabular", rows, manifest, "--recipe", "tabular"),
    }


def test_the_text_recipe_reads_word_order_a_bag_of_words_cannot(negations):
    text, tabular = (negations[recipe].evaluation()["conveyor"] for recipe in ("text", "tabular"))
    assert text["value"] >= 0.9, text
    assert tabular["value"] < 0.7, tabular  # the same words in every review: order is all there is
    assert text["hyperparameters"]["recipe"] == "text"
    assert text["hyperparameters"]["max_vocabulary"] == 20_000
    assert tabular["hyperparameters"]["max_vocabulary"] == 2_000
    config = json.loads((negations["text"].model_dir / "model_config.json").read_text())
    longest = max(
        len(re.findall(r"\w+", r["review"].lower())) for r in split_rows(negations["text"].channels, "train")
    )
    assert config["text_encoding"] == "sequence" and config["sequence_length"] == longest
    assert config["architecture"]["name"] == "text_bilstm"
    assert config["architecture"]["in_features"] == 1  # stars_shown beside the text
    assert "text recipe" in negations["text"].completed.stdout


def test_served_text_recipe_predictions_match_the_evaluation(negations):
    case = negations["text"]
    test_rows = split_rows(case.channels, "test")
    instances = [{k: v for k, v in row.items() if k != "label"} for row in test_rows]
    instances += [
        {"review": "It was not good, the plot", "stars_shown": 1},
        {"review": "Not the plot: it was good", "stars_shown": 1},
        {"review": None, "stars_shown": 0},
        {"review": "", "stars_shown": None},
        {
            "review": " ".join(["good"] * 500) + " unheard-of words",
            "stars_shown": 0,
        },  # longer than training's
    ]
    with served(case) as (inference, model):
        predictions = serve(inference, model, instances)["predictions"]
    labels = [p["label"] for p in predictions]
    assert labels[-5:-3] == ["negative", "positive"]
    accuracy = np.mean([label == r["label"] for label, r in zip(labels, test_rows, strict=False)])
    assert accuracy == pytest.approx(case.evaluation()["conveyor"]["value"])


def test_text_encodes_as_token_ids_in_order(training_modules):
    data = training_modules("data")
    encoder = data.Encoder(
        task="classification",
        target="y",
        labels=["a", "b"],
        features=[
            {"name": "title", "type": "text", "vocabulary": ["good", "movie"]},
            {"name": "stars", "type": "numeric", "mean": 3.0, "std": 1.0},
            {"name": "review", "type": "text", "vocabulary": ["über", "not", "good"]},
        ],
        text_encoding="sequence",
        sequence_length=4,
    )
    copy = data.Encoder.from_config(json.loads(json.dumps(encoder.to_config())))
    assert copy.width == 1 and [f["name"] for f in copy.sequences] == ["title", "review"]
    assert copy.row_bytes == 4 * (1 + 2 * 4)
    columns = {
        "title": ["Good movie", "NA", "movie, movie, good movie! good", "x"],
        "stars": ["4", "", "3", "2"],
        "review": ["not GOOD", "Über über", "", "good not, not good; über"],
    }
    matrix, ids = copy.encode_inputs(columns, 4)
    np.testing.assert_array_equal(matrix, [[1], [0], [0], [-1]])
    assert ids.dtype == np.int32 and ids.shape == (4, 2, 4)
    # 0 pads, 1 is any other token, the vocabulary counts from 2; the first four tokens are kept.
    np.testing.assert_array_equal(ids[:, 0], [[2, 3, 0, 0], [0, 0, 0, 0], [3, 3, 2, 3], [1, 0, 0, 0]])
    np.testing.assert_array_equal(ids[:, 1], [[3, 4, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0], [4, 3, 3, 4]])
    instances = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    for encoded, expected in zip(copy.encode_instances(instances), (matrix, ids), strict=True):
        np.testing.assert_array_equal(encoded, expected)


def test_the_text_recipe_needs_a_text_feature(tiers):
    command, env = training_command(
        tiers.root / "again", tier_rows(30, random.Random(1)), tiers.manifest, "--recipe", "text"
    )
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    reason = (tiers.root / "again/opt/ml/output/failure").read_text()
    assert reason == "the text recipe reads text features, and this dataset has none: use recipe tabular"


def test_a_text_network_is_rebuilt_from_its_architecture(training_modules):
    model = training_modules("model")
    torch = model.torch
    torch.manual_seed(3)
    network = model.TextBiLSTM(
        2, 3, [10, 4], embedding_dim=8, sequence_units=5, hidden_units=(7,), dropout=0.2
    )
    copy = model.build_model(json.loads(json.dumps(network.architecture())))
    copy.load_state_dict(network.state_dict())
    network.eval(), copy.eval()
    features = torch.randn(6, 2)
    tokens = torch.randint(0, 12, (6, 2, 5), dtype=torch.int32)
    tokens[:, 1] = tokens[:, 1].clamp(max=5)
    tokens[0] = 0  # both values missing
    tokens[1, 0, 2:] = 0  # padding after two tokens
    outputs = network(features, tokens)
    assert outputs.shape == (6, 3) and torch.isfinite(outputs).all()
    torch.testing.assert_close(copy(features, tokens), outputs)
    # Padding is padding: what lies beyond a value's last token does not change its reading.
    longer = torch.cat([tokens, torch.zeros(6, 2, 3, dtype=torch.int32)], dim=2)
    torch.testing.assert_close(network(features, longer), outputs)


# --- the image recipe: a CNN on class folders of images --------------------------------------------------


def image_channels(root, rng, per_class=(80, 12, 14)):
    """train and test as one zip each (as preprocessing writes them), validation as class folders."""
    import zipfile

    channels = {}
    for split, count in zip(("train", "validation", "test"), per_class, strict=True):
        directory = root / split
        directory.mkdir(parents=True)
        images = [(kind, shape_image(kind, rng)) for kind in SHAPES for _ in range(count)]
        files = {f"{kind}/{split}-{i}{image_suffix(data)}": data for i, (kind, data) in enumerate(images)}
        if split == "validation":
            for name, data in files.items():
                (directory / name).parent.mkdir(exist_ok=True)
                (directory / name).write_bytes(data)
        else:
            with zipfile.ZipFile(directory / "part-00000.zip", "w", zipfile.ZIP_STORED) as archive:
                for name, data in sorted(files.items()):
                    archive.writestr(name, data)
        channels[split] = directory
    manifest = {
        "schema_version": 1,
        "dataset": "shapes",
        "version": "20261130T120000Z-abcdef",
        "format": "zip",
        "task": "classification",
        "recipe": "image",
        "target": "label",
        "labels": list(SHAPES),
        "columns": [
            {"name": "image", "role": "feature", "type": "image", "stats": {"count": 3 * per_class[0]}},
            {"name": "label", "role": "target", "type": "categorical", "stats": {"count": 3 * per_class[0]}},
        ],
    }
    (root / "manifest").mkdir()
    (root / "manifest" / "manifest.json").write_text(json.dumps(manifest))
    channels["manifest"] = root / "manifest"
    return channels, manifest


def run_image_training(root, *extra):
    channels, manifest = image_channels(root / "input", random.Random(31))
    ml = root / "opt/ml"
    env = {
        **os.environ,
        "SM_MODEL_DIR": str(ml / "model"),
        "SM_OUTPUT_DATA_DIR": str(ml / "output/data"),
        "SM_OUTPUT_DIR": str(ml / "output"),
        "SM_CHECKPOINT_DIR": str(root / "checkpoints"),
        **{f"SM_CHANNEL_{name.upper()}": str(path) for name, path in channels.items()},
    }
    command = [sys.executable, str(TRAINING / "train.py"), "--image_size", "16", "--epochs", "12", *extra]
    completed = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    return TrainedCase(root, channels, manifest, completed)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    case = run_image_training(tmp_path_factory.mktemp("shapes"))
    assert case.completed.returncode == 0, case.completed.stdout[-3000:] + case.completed.stderr[-3000:]
    return case


def test_the_image_recipe_learns_shapes_from_class_folders(shapes):
    summary = shapes.evaluation()["conveyor"]
    assert summary["test_rows"] == 3 * 14 and summary["value"] >= 0.9, summary
    config = json.loads((shapes.model_dir / "model_config.json").read_text())
    assert config["features"] == [{"name": "image", "type": "image", "image_size": 16}]
    assert config["architecture"]["name"] == "image_cnn" and config["architecture"]["image_size"] == 16
    assert summary["hyperparameters"]["recipe"] == "image"
    assert (shapes.model_dir / "code/images.py").is_file()
    assert "images of 16 x 16 pixels" in shapes.completed.stdout
    assert (shapes.output_dir / "confusion_matrix.png").is_file()


def test_served_image_predictions_match_the_evaluation(shapes):
    import zipfile

    with zipfile.ZipFile(shapes.channels["test"] / "part-00000.zip") as archive:
        files = [(name.split("/")[0], archive.read(name)) for name in archive.namelist()]
    instances = [{"image": base64.b64encode(data).decode()} for _, data in files]
    with served(shapes) as (inference, model):
        predictions = serve(inference, model, instances)["predictions"]
        with pytest.raises(inference.InvalidInput) as raised:
            inference.input_fn(json.dumps({"instances": [instances[0], {"image": "bm90IGFuIGltYWdl"}]}))
    assert raised.value.status_code == 400 and str(raised.value).startswith(
        'instance 1: "image" is not a decodable image'
    )
    accuracy = np.mean([p["label"] == label for p, (label, _) in zip(predictions, files, strict=True)])
    assert accuracy == pytest.approx(shapes.evaluation()["conveyor"]["value"])
    assert set(predictions[0]["probabilities"]) == set(SHAPES)


def test_only_the_image_recipe_trains_on_images_and_only_on_images(tmp_path, tiers):
    case = run_image_training(tmp_path / "tabular", "--recipe", "tabular")
    assert case.completed.returncode == 1
    reason = (tmp_path / "tabular/opt/ml/output/failure").read_text()
    assert reason.startswith("the tabular recipe cannot train on this dataset: the image recipe is for")
    command, env = training_command(
        tmp_path / "image", tier_rows(30, random.Random(1)), tiers.manifest, "--recipe", "image"
    )
    assert subprocess.run(command, env=env, capture_output=True, timeout=120).returncode == 1
    assert (tmp_path / "image/opt/ml/output/failure").read_text().startswith("the image recipe cannot train")


# --- mixed precision and torch.compile ------------------------------------------------------------------


def test_bf16_mixed_precision_trains_as_well_as_float32(tiers, tmp_path):
    # On a GPU "auto" picks bf16; the CPU has bfloat16 autocast too, so the path runs here.
    rows = tier_rows(1000, random.Random(1))
    mixed = run_training(tmp_path, rows, tiers.manifest, "--precision", "bf16").evaluation()["conveyor"]
    full = tiers.evaluation()["conveyor"]
    assert mixed["hyperparameters"]["precision"] == "bf16" and full["hyperparameters"]["precision"] == "auto"
    assert mixed["value"] == pytest.approx(full["value"], abs=0.05)


def test_precision_and_compile_follow_the_device(monkeypatch, training_modules):
    train = training_modules("train")
    torch = train.torch
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert train.autocast_dtype("auto", cpu) is None  # a CPU trains in float32 unless asked
    assert train.autocast_dtype("bf16", cpu) is torch.bfloat16
    assert train.autocast_dtype("fp32", gpu) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert train.autocast_dtype("auto", gpu) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # a V100 or a T4
    assert train.autocast_dtype("auto", gpu) is None
    with pytest.raises(train.ConfigurationError, match="does not support bfloat16; use fp32 or auto"):
        train.autocast_dtype("bf16", gpu)
    network = torch.nn.Linear(2, 2)
    assert train.compiled(network, "auto", cpu) is network
    assert train.compiled(network, "false", gpu) is network
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or "compiled")
    assert train.compiled(network, "auto", gpu) == "compiled" and compiled == [network]
    assert train.compiled(network, "true", cpu) == "compiled"


def test_the_code_version_names_the_code_that_ran(tmp_path, training_modules):
    code_version = training_modules("train").code_version
    for name in ("train.py", "inference.py"):
        (tmp_path / name).write_text(f"# {name}\n")
    unpublished = code_version(tmp_path)
    assert unpublished.startswith("sha256:") and unpublished.endswith(" unpublished")
    (tmp_path / "CODE_VERSION").write_text("git:0123456789ab\n")
    published = code_version(tmp_path)
    assert published == unpublished.replace("unpublished", "git:0123456789ab")
    (tmp_path / "inference.py").write_text("# changed\n")
    assert code_version(tmp_path).split()[0] != published.split()[0]


def test_published_training_code_carries_the_commit_it_came_from():
    import tarfile

    from conveyor.local.sourcedir import training_sourcedir

    with tarfile.open(fileobj=io.BytesIO(training_sourcedir(ROOT))) as tar:
        stamp = tar.extractfile("CODE_VERSION").read().decode().strip()
        names = set(tar.getnames())
    assert stamp.startswith("git:") and {"train.py", "inference.py"} <= names


def tiny_wheel(directory: Path) -> Path:
    """A pure-Python wheel of a package `tinydep` 0.1 whose ANSWER is 42, as a build backend would write it."""
    import zipfile

    files = {
        "tinydep/__init__.py": "ANSWER = 42\n",
        "tinydep-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinydep\nVersion: 0.1\n",
        "tinydep-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "tinydep-0.1.dist-info/RECORD,,\n"
    path = directory / "tinydep-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in {**files, "tinydep-0.1.dist-info/RECORD": record}.items():
            wheel.writestr(name, text)
    return path


def test_training_requirements_travel_as_wheels_a_network_isolated_job_installs(tmp_path):
    import io
    import tarfile

    from conveyor.local.sourcedir import SourcedirError, training_sourcedir
    from conveyor.local.training import install_requirements

    training = tmp_path / "project/training"
    training.mkdir(parents=True)
    (training / "train.py").write_text("import tinydep\nprint(tinydep.ANSWER)\n")
    (training / "requirements.txt").write_text("# what train.py needs\ntinydep==0.1\n")
    index = tmp_path / "index"
    index.mkdir()
    tiny_wheel(index)
    local_index = ["--no-index", "--find-links", str(index)]
    archive = training_sourcedir(tmp_path / "project", pip_index=local_index)
    code = tmp_path / "code"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert "wheelhouse/tinydep-0.1-py3-none-any.whl" in tar.getnames()
        tar.extractall(code, filter="data")
    assert (code / "requirements.txt").read_text().splitlines()[1:] == [
        "--no-index",
        "--find-links wheelhouse",
        "# what train.py needs",
        "tinydep==0.1",
    ]
    # What the training container does first, from the archive alone: no index, so no network.
    packages = install_requirements(code, tmp_path / "packages", sys.executable)
    env = {**os.environ, "PYTHONPATH": str(packages), "PIP_NO_INDEX": "1"}
    ran = subprocess.run([sys.executable, "train.py"], cwd=code, env=env, capture_output=True, text=True)
    assert ran.stdout.strip() == "42", ran.stderr
    (training / "requirements.txt").write_text("missingdep==1.0\n")
    with pytest.raises(SourcedirError, match="could not be downloaded; every requirement needs such a wheel"):
        training_sourcedir(tmp_path / "project", pip_index=local_index)
    # The project's own training code needs nothing beyond the image: no wheelhouse, nothing to install.
    with tarfile.open(fileobj=io.BytesIO(training_sourcedir(ROOT))) as tar:
        assert not [name for name in tar.getnames() if name.startswith("wheelhouse")]
        tar.extractall(tmp_path / "ours", filter="data")
    assert install_requirements(tmp_path / "ours", tmp_path / "none", sys.executable) is None


def test_base_model_jobs_code_brings_the_hugging_face_wheels_without_their_torch(tmp_path):
    import tarfile

    from conveyor.local.sourcedir import training_sourcedir
    from conveyor.local.training import install_requirements

    training = tmp_path / "project/training"
    training.mkdir(parents=True)
    (training / "train.py").write_text("import tinydep\nprint(tinydep.ANSWER)\n")
    (training / "requirements-hf.txt").write_text("# the pretrained recipes' packages\ntinydep==0.1\n")
    # The lock's packages are downloaded one by one, without dependencies (torch is the image's).
    (training / "requirements-hf.lock").write_text("tinydep==0.1\n")
    index = tmp_path / "index"
    index.mkdir()
    tiny_wheel(index)
    local_index = ["--no-index", "--find-links", str(index)]
    with tarfile.open(
        fileobj=io.BytesIO(training_sourcedir(tmp_path / "project", pip_index=local_index))
    ) as tar:
        assert not [n for n in tar.getnames() if n.startswith("wheelhouse") or n == "requirements.txt"]
    archive = training_sourcedir(tmp_path / "project", pip_index=local_index, hf_wheels=True)
    code = tmp_path / "code"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert "wheelhouse/tinydep-0.1-py3-none-any.whl" in tar.getnames()
        tar.extractall(code, filter="data")
    lines = (code / "requirements.txt").read_text().splitlines()
    assert lines[1:3] == ["--no-index", "--find-links wheelhouse"] and lines[-1] == "tinydep==0.1"
    packages = install_requirements(code, tmp_path / "packages", sys.executable)
    env = {**os.environ, "PYTHONPATH": str(packages), "PIP_NO_INDEX": "1"}
    ran = subprocess.run([sys.executable, "train.py"], cwd=code, env=env, capture_output=True, text=True)
    assert ran.stdout.strip() == "42", ran.stderr


def test_the_hugging_face_lock_pins_what_pyproject_pins_and_everything_they_need():
    import tomllib

    from conveyor.local.jobs import requirement_lines
    from conveyor.local.sourcedir import hf_closure

    pins = dict(
        line.split("==") for line in requirement_lines((TRAINING / "requirements-hf.txt").read_text())
    )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "train"
    ]
    declared = dict(d.split("==") for d in project if "==" in d)
    assert pins == {name: declared[name] for name in pins}, "requirements-hf.txt and pyproject.toml differ"
    locked = dict(
        line.split("==") for line in requirement_lines((TRAINING / "requirements-hf.lock").read_text())
    )
    assert {name: locked[name] for name in pins} == pins
    assert not {"torch", "numpy", "nvidia-cudnn-cu12"} & set(locked), "the image brings torch and numpy"
    # Every package the pinned ones need here (versions of the others may move; `make lock-hf` updates them).
    missing = set(hf_closure(list(pins))) - set(locked)
    assert not missing, f"training/requirements-hf.lock lacks {sorted(missing)}: run `make lock-hf`"


def test_a_fine_tuned_models_code_carries_the_wheels_its_job_brought(tmp_path, monkeypatch):
    with modules_from(TRAINING) as load:
        train = load("train")
        network = SimpleNamespace()  # a network as the function reads it
        code = tmp_path / "code"
        code.mkdir()
        # A small model serves with the image's packages alone.
        assert "transformers" not in train.serving_requirements(network, code)
        network.serving_requirements = "transformers==5.23.0\n"
        assert train.serving_requirements(network, code) == "transformers==5.23.0\n"  # local: no wheels
        here = tmp_path / "opt/ml/code"
        (here / "wheelhouse").mkdir(parents=True)
        tiny_wheel(here / "wheelhouse")
        monkeypatch.setattr(train, "HERE", here)
        text = train.serving_requirements(network, code)
    assert text.splitlines()[1:] == ["--no-index", "--find-links wheelhouse", "transformers==5.23.0"]
    assert (code / "wheelhouse/tinydep-0.1-py3-none-any.whl").is_file()


# --- scale: checkpoints and several processes ------------------------------------------------------------


def tier_case():
    rows = tier_rows(1000, random.Random(1))
    labels = ["bronze", "gold", "silver"]
    features = {"spend": "numeric", "plan": "categorical"}
    return rows, manifest_for(
        rows[:800], "classification", "tier", features, ignored=["customer_id"], labels=labels
    )


def test_a_killed_training_resumes_from_its_checkpoint_and_trains_the_same_model(tmp_path):
    """A spot interruption, as SIGKILL mid-epoch: the job started again resumes from the last checkpoint
    and ends with exactly the weights of a run that was never interrupted."""
    import signal

    import torch

    rows, manifest = tier_case()
    settings = ("--epochs", "40", "--patience", "40", "--checkpoint_steps", "5")
    whole_command, whole_env = training_command(tmp_path / "whole", rows, manifest, *settings)
    whole = subprocess.run(whole_command, env=whole_env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-2000:]

    root = tmp_path / "interrupted"
    command, env = training_command(root, rows, manifest, *settings)
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in job.stdout:  # kill it once it is a few epochs in and has checkpointed mid-epoch
        seen.append(line)
        if line.startswith("epoch=6 "):
            break
    assert job.poll() is None, "the job ended before it could be interrupted"
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    assert list((root / "checkpoints").glob("checkpoint-*.pt")), "no checkpoint was written"
    assert not (root / "opt/ml/model/model.pth").exists()

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resuming from the checkpoint: epoch " in again.stdout + again.stderr
    assert "epoch=1 " not in again.stdout, "it started over"
    weights = torch.load(root / "opt/ml/model/model.pth", weights_only=True)
    expected = torch.load(tmp_path / "whole/opt/ml/model/model.pth", weights_only=True)
    assert all(torch.equal(weights[name], expected[name]) for name in expected)
    evaluation = json.loads((root / "opt/ml/model/evaluation.json").read_text())
    reference = json.loads((tmp_path / "whole/opt/ml/model/evaluation.json").read_text())
    assert evaluation["multiclass_classification_metrics"] == reference["multiclass_classification_metrics"]


def test_two_processes_under_torchrun_train_as_well_as_one(tmp_path):
    """DistributedDataParallel with two CPU processes (gloo), as SageMaker's torch_distributed runs it: the
    same global batch split in two, gradients averaged; the test metric matches one process's."""
    rows, manifest = tier_case()
    settings = ("--epochs", "20", "--patience", "20")
    one_command, one_env = training_command(tmp_path / "one", rows, manifest, *settings)
    one = subprocess.run(one_command, env=one_env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]

    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    command, env = training_command(tmp_path / "two", rows, manifest, *settings, launcher=launcher)
    two = subprocess.run(
        command, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("test_accuracy=") == 1, "only the main process reports and saves"

    def accuracy(root):
        document = json.loads((root / "opt/ml/model/evaluation.json").read_text())
        return document["conveyor"]["value"], document["conveyor"]["baseline"]

    (single, baseline), (double, _) = accuracy(tmp_path / "one"), accuracy(tmp_path / "two")
    assert abs(single - double) <= 0.05, (single, double)
    assert double > baseline + 0.2


# --- the report ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "plots"),
    [
        ("tiers", {"learning_curves.png", "confusion_matrix.png"}),
        ("churn", {"learning_curves.png", "confusion_matrix.png", "roc.png"}),
        ("prices", {"learning_curves.png", "residuals.png"}),
    ],
)
def test_the_output_has_a_readable_report_with_its_plots(request, case, plots):
    from PIL import Image

    trained = request.getfixturevalue(case)
    output = trained.output_dir
    page = (output / "report.html").read_text()
    summary = trained.evaluation()["conveyor"]
    # The first thing a person reads: how good the model is, against the baseline, in words.
    assert "held-out test rows" in page and summary["baseline_name"] in page
    assert f"{summary['value']:.4f}" in page
    for name in plots:
        image = Image.open(output / name)
        assert image.format == "PNG" and image.size[0] >= 400
        assert f'src="{name}"' in page
        # Something was drawn, not a blank canvas.
        assert len(set(image.convert("L").getdata())) > 5, name
    assert {path.name for path in output.glob("*.png")} == plots


def test_the_roc_curve_is_a_staircase_from_the_corner_to_the_corner(training_modules):
    report = training_modules("report")
    fpr, tpr = report.roc_curve(np.array([0.9, 0.8, 0.4, 0.1]), np.array([True, False, True, False]))
    assert list(fpr) == [0, 0, 0.5, 0.5, 1] and list(tpr) == [0, 0.5, 0.5, 1, 1]
