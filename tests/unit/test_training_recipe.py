"""The contract between stages: splits and a manifest written by the real preprocess core train and serve.

The recipe itself is tested in test_training.py.
"""

import contextlib
import csv
import importlib
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from preprocess.core import DatasetSpec, preprocess

ROOT = Path(__file__).resolve().parents[2]


def processed(tmp_path: Path, header: list[str], rows: list[list], spec: DatasetSpec | None = None) -> Path:
    """Write splits and manifest exactly as the preprocess stage does (the real contract, not a copy)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)

    @contextlib.contextmanager
    def open_split(split):
        (tmp_path / split).mkdir(parents=True, exist_ok=True)
        with (tmp_path / split / "part-00000.csv").open("w", newline="") as handle:
            yield handle

    manifest = preprocess(
        io.BytesIO(text.getvalue().encode()),
        spec=spec or DatasetSpec(),
        open_split=open_split,
        provenance={"dataset": "t", "version": "v", "source": {}},
    )
    (tmp_path / "manifest").mkdir()
    (tmp_path / "manifest" / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def train(data: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    model_dir, output = data / "model", data / "output" / "data"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "training" / "train.py"),
            "--train",
            str(data / "train"),
            "--validation",
            str(data / "validation"),
            "--test",
            str(data / "test"),
            "--manifest",
            str(data / "manifest"),
            "--model-dir",
            str(model_dir),
            "--output-data-dir",
            str(output),
            "--sagemaker_program",
            "train.py",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result, model_dir, output


@contextlib.contextmanager
def serving(model_dir: Path):
    """Import the model's own code/inference.py, as the serving container does, and forget it after."""
    sys.path.insert(0, str(model_dir / "code"))
    try:
        inference = importlib.import_module("inference")
        yield inference, inference.model_fn(str(model_dir))
    finally:
        sys.path.remove(str(model_dir / "code"))
        for name in ("inference", "model", "data"):
            sys.modules.pop(name, None)


def churn_like(n=600, seed=1):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        plan = rng.choice(["basic", "pro", "max"])
        usage = rng.gauss(50, 15)
        score = 0.05 * (usage - 50) + {"basic": 1.0, "pro": 0.0, "max": -1.0}[plan] + rng.gauss(0, 0.5)
        rows.append([round(usage, 2), plan, 1 if score > 0 else 0])
    return rows


def test_classification_beats_the_baseline_and_the_model_serves_itself(tmp_path):
    data = processed(tmp_path, ["usage", "plan", "label"], churn_like())
    result, model_dir, output = train(data, "--epochs", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "epoch=1 train_loss=" in result.stdout and "validation_accuracy=" in result.stdout
    assert "test_accuracy=" in result.stdout
    evaluation = json.loads((output / "evaluation.json").read_text())
    summary = evaluation["conveyor"]
    assert summary["metric"] == "accuracy" and summary["value"] > summary["baseline"] + 0.2
    metrics = evaluation["binary_classification_metrics"]
    assert {"accuracy", "f1", "auc", "confusion_matrix"} <= set(metrics)

    with serving(model_dir) as (inference, model):
        body = json.dumps(
            {
                "instances": [
                    {"usage": 80, "plan": "basic"},
                    {"usage": "20", "plan": "max"},
                    {"usage": None, "plan": "unseen-plan", "label": 1},
                ]
            }
        )
        answer = json.loads(
            inference.output_fn(
                inference.predict_fn(inference.input_fn(body, "application/json"), model), "application/json"
            )
        )
        labels = [p["label"] for p in answer["predictions"]]
        assert labels[:2] == [1, 0]  # integer labels come back as integers
        for prediction in answer["predictions"]:
            assert set(prediction["probabilities"]) == {"0", "1"}
            assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-4
        with pytest.raises(ValueError, match="instance 0: missing feature column 'plan'"):
            inference.input_fn(json.dumps({"instances": [{"usage": 1}]}), "application/json")
        with pytest.raises(ValueError, match="instance 1: column 'usage' must be a number, got 'lots'"):
            inference.input_fn(
                json.dumps({"instances": [{"usage": 1, "plan": "pro"}, {"usage": "lots", "plan": "pro"}]}),
                "application/json",
            )
        with pytest.raises(ValueError, match="instances"):
            inference.input_fn(b"[1, 2]", "application/json")


def test_regression_reports_r2_against_the_mean(tmp_path):
    rng = random.Random(4)
    rows = [
        [x := rng.uniform(0, 10), rng.choice("ab"), round(3 * x + rng.gauss(0, 1), 3)] for _ in range(400)
    ]
    data = processed(tmp_path, ["x", "group", "y"], rows)
    result, model_dir, output = train(data, "--epochs", "40")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((output / "evaluation.json").read_text())["conveyor"]
    assert summary["metric"] == "r2" and summary["value"] > 0.8 and summary["baseline"] < 0.05
    with serving(model_dir) as (inference, model):
        answer = json.loads(
            inference.output_fn(
                inference.predict_fn(
                    inference.input_fn(json.dumps({"instances": [{"x": 5, "group": "a"}]})), model
                )
            )
        )
        assert abs(answer["predictions"][0]["value"] - 15) < 3


def test_preprocessing_and_training_agree_on_what_a_missing_value_is():
    # Two copies by necessity: the Lambda package and the training image cannot import each other.
    from preprocess.core import MISSING

    sys.path.insert(0, str(ROOT / "training"))
    try:
        data = importlib.import_module("data")
        assert data.MISSING_TOKENS == MISSING
    finally:
        sys.path.remove(str(ROOT / "training"))
        sys.modules.pop("data", None)


def contract_tokenize():
    """preprocess.core.tokenize, or a skip while the preprocess side does not expose it yet."""
    core = importlib.import_module("preprocess.core")
    if not hasattr(core, "tokenize"):
        pytest.skip(
            "preprocess.core.tokenize does not exist yet: text features are being added to preprocess"
        )
    return core.tokenize


def test_preprocessing_and_training_split_text_into_the_same_tokens():
    # Two copies for the same reason as MISSING: the vocabulary is counted with one, encoded with the other.
    preprocess_tokenize = contract_tokenize()
    rng = random.Random(3)
    alphabet = "aZ9_ -,.!'\u2019\t\nÄöß İıŁ東京٣४ é\u0301\u00a0\u200b😀"
    samples = [
        "Great, GREAT movie!!",
        "don't stop-believing: 10/10 snake_case",
        "Straße İstanbul ΣΊΣΥΦΟΣ naïve café",
        "東京タワー ١٢٣ ४२",
        "",
        "   ",
        *("".join(rng.choices(alphabet, k=rng.randint(0, 40))) for _ in range(500)),
    ]
    sys.path.insert(0, str(ROOT / "training"))
    try:
        data = importlib.import_module("data")
        for sample in samples:
            assert data.tokenize(sample) == preprocess_tokenize(sample), repr(sample)
    finally:
        sys.path.remove(str(ROOT / "training"))
        sys.modules.pop("data", None)


def reviews(n=600, seed=5):
    rng = random.Random(seed)
    good, bad = ["great", "loved", "superb", "wonderful"], ["awful", "boring", "dull", "terrible"]
    filler = ["the", "film", "plot", "was", "and", "cast", "music", "ending", "story"]
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(filler, 4) + rng.choices(good if label == "pos" else bad, k=rng.randint(1, 2))
        rng.shuffle(words)
        rows.append([" ".join(words).capitalize() + "!", label])
    return rows


def test_a_text_column_from_preprocessing_trains_and_serves(tmp_path):
    contract_tokenize()
    data = processed(tmp_path, ["review", "label"], reviews())
    manifest = json.loads((data / "manifest" / "manifest.json").read_text())
    review = next(c for c in manifest["columns"] if c["name"] == "review")
    assert review["type"] == "text" and manifest["recipe"] == "text"
    result, model_dir, output = train(data, "--epochs", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((output / "evaluation.json").read_text())["conveyor"]
    assert summary["value"] > summary["baseline"] + 0.3, summary
    with serving(model_dir) as (inference, model):
        body = json.dumps({"instances": [{"review": "Superb, LOVED it"}, {"review": "dull... AWFUL"}]})
        answer = inference.predict_fn(inference.input_fn(body, "application/json"), model)
        assert [p["label"] for p in answer] == ["pos", "neg"]
