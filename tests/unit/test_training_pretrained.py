"""The pretrained recipe: fine-tune a base model from the hub's channel, and serve what it learned.

Base models are tiny random-initialised encoders saved in the test (tests/tiny_models.py), so nothing is
downloaded and each fine-tunes in seconds on a CPU.
"""

import itertools
import json
import random
import subprocess

import numpy as np
import pytest
from test_training import (
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    TRAINING,
    TrainedCase,
    manifest_for,
    modules_from,
    review_rows,
    serve,
    served,
    split_rows,
    training_command,
)
from tiny_models import record_base, save_tiny_encoder

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
WORDS = [*POSITIVE, *NEGATIVE, *NEUTRAL, "user", "review", "platform", "web", "app"]


def pretrained_job(root, rows, manifest, family="bert", *extra, base=None):
    """A training job on `rows` with a base channel (a tiny `family` encoder, pushed as the hub records it)."""
    if base is None:
        base = save_tiny_encoder(root / "base", family, words=WORDS)
    digest = record_base(base)
    command, env = training_command(
        root,
        rows,
        manifest,
        *("--base", str(base), "--base_model", f"tiny-{family}", "--base_model_digest", digest),
        *extra,
    )
    return command, env, base


def run_pretrained(root, rows, manifest, family="bert", *extra) -> TrainedCase:
    command, env, _ = pretrained_job(root, rows, manifest, family, *extra)
    completed = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    channels = {name: root / "input" / name for name in ("train", "validation", "test", "manifest")}
    return TrainedCase(root, channels, manifest, completed)


def sentiment(n=400, seed=3):
    rows = review_rows(n, random.Random(seed))
    manifest = manifest_for(
        rows[: int(n * 0.8)],
        "classification",
        "sentiment",
        {"review": "text", "platform": "categorical"},
        labels=["negative", "positive"],
    )
    manifest["recipe"] = "pretrained"
    return rows, manifest


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    rows, manifest = sentiment()
    return run_pretrained(
        tmp_path_factory.mktemp("bert"),
        rows,
        manifest,
        "bert",
        *("--epochs", "20", "--learning_rate", "1e-2", "--patience", "20"),
    )


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    rows, manifest = sentiment()
    return run_pretrained(
        tmp_path_factory.mktemp("lora"),
        rows,
        manifest,
        "distilbert",
        *(
            "--adapter",
            "lora",
            "--epochs",
            "3",
            "--learning_rate",
            "1e-2",
            "--gradient_accumulation_steps",
            "2",
        ),
    )


def test_a_fine_tuned_encoder_clearly_beats_the_majority_class(bert):
    summary = bert.evaluation()["conveyor"]
    assert summary["value"] > summary["baseline"] + 0.3, summary
    hyperparameters = summary["hyperparameters"]
    assert hyperparameters["recipe"] == "pretrained" and hyperparameters["base_model"] == "tiny-bert"
    # The recipe's defaults where the job set none: BERT's fine-tuning schedule.
    assert hyperparameters["lr_schedule"] == "linear" and hyperparameters["warmup_ratio"] == 0.1
    assert hyperparameters["max_grad_norm"] == 1.0 and hyperparameters["compile"] == "false"
    # The tiny base has 64 position embeddings: the default max_length 128 is cut to them.
    assert hyperparameters["max_length"] == 64
    assert "rows read as text of at most 64 tokens" in bert.completed.stdout


def test_the_model_directory_holds_the_fine_tuned_model_in_hugging_face_layout(bert):
    hf = bert.model_dir / "hf"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (hf / name).is_file(), name
    assert not (bert.model_dir / "model.pth").exists() and not (bert.model_dir / "adapter").exists()
    assert (bert.model_dir / "code/hf_text.py").is_file()
    assert "transformers==" in (bert.model_dir / "code/requirements.txt").read_text()
    config = json.loads((bert.model_dir / "model_config.json").read_text())
    architecture = config["architecture"]
    assert architecture["name"] == "hf_sequence_classifier" and architecture["adapter"] == "full"
    assert architecture["base_model_digest"].startswith("sha256:")
    assert architecture["trained_parameters"] == architecture["parameters"]
    assert config["text_encoding"] == "pretrained" and config["sequence_length"] == 64
    # The saved model names its classes, so it reads right outside conveyor too.
    assert json.loads((hf / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}


def test_served_predictions_match_the_evaluation(bert):
    test_rows = split_rows(bert.channels, "test")
    instances = [{k: v for k, v in row.items() if k != "sentiment"} for row in test_rows]
    instances += [
        {"review": "great wonderful loved it", "platform": "web"},
        {"review": "boring dull terrible", "platform": "app"},
        {"review": None, "platform": None},
    ]
    with served(bert) as (inference, model):
        predictions = serve(inference, model, instances)["predictions"]
        with pytest.raises(ValueError, match="column 'review' is text and must be a string"):
            inference.input_fn(json.dumps({"instances": [{"review": 3, "platform": "web"}]}))
    labels = [p["label"] for p in predictions]
    assert labels[-3:-1] == ["positive", "negative"]
    accuracy = np.mean([label == row["sentiment"] for label, row in zip(labels, test_rows, strict=False)])
    assert accuracy == pytest.approx(bert.evaluation()["conveyor"]["value"])


def test_lora_trains_adapters_on_a_frozen_base_and_serves_them_merged(lora):
    architecture = json.loads((lora.model_dir / "model_config.json").read_text())["architecture"]
    assert architecture["adapter"] == "lora" and architecture["model_type"] == "distilbert"
    assert 0 < architecture["trained_parameters"] < architecture["parameters"]
    assert (lora.model_dir / "adapter/adapter_model.safetensors").is_file()
    assert "new, randomly initialised: classifier, pre_classifier" in lora.completed.stdout
    # hf/ holds the adapters merged into the base: serving needs no peft, and answers as training evaluated.
    merged = json.loads((lora.model_dir / "hf/config.json").read_text())
    assert merged["model_type"] == "distilbert"
    test_rows = split_rows(lora.channels, "test")
    with served(lora) as (inference, model):
        assert type(model.network.model).__name__ == "DistilBertForSequenceClassification"
        predictions = serve(inference, model, [{k: r[k] for k in ("review", "platform")} for r in test_rows])
    labels = [p["label"] for p in predictions["predictions"]]
    accuracy = np.mean([label == row["sentiment"] for label, row in zip(labels, test_rows, strict=True)])
    assert accuracy == pytest.approx(lora.evaluation()["conveyor"]["value"])


def test_regression_fine_tunes_a_distilbert_with_gradient_checkpointing(tmp_path):
    rng = random.Random(4)
    rows = []
    for _ in range(300):
        good, bad = rng.randint(0, 3), rng.randint(0, 3)
        words = rng.choices(POSITIVE, k=good) + rng.choices(NEGATIVE, k=bad) + rng.sample(NEUTRAL, 3)
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "score": f"{good - bad + rng.gauss(0, 0.2):.3f}"})
    manifest = manifest_for(rows[:240], "regression", "score", {"review": "text"})
    manifest["recipe"] = "pretrained"
    case = run_pretrained(
        tmp_path,
        rows,
        manifest,
        "distilbert",
        *(
            "--epochs",
            "20",
            "--learning_rate",
            "1e-2",
            "--patience",
            "20",
            "--gradient_checkpointing",
            "true",
        ),
    )
    evaluation = case.evaluation()
    assert evaluation["conveyor"]["metric"] == "r2" and evaluation["conveyor"]["value"] > 0.5, evaluation
    with served(case) as (inference, model):
        values = serve(inference, model, [{"review": "great wonderful loved"}, {"review": "awful dull poor"}])
    assert values["predictions"][0]["value"] > values["predictions"][1]["value"]


def test_a_base_changed_since_its_push_fails_the_job_with_what_to_do(tmp_path):
    rows, manifest = sentiment(100)
    command, env, base = pretrained_job(tmp_path, rows, manifest, "bert", "--epochs", "1")
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    completed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    reason = (tmp_path / "opt/ml/output/failure").read_text()
    assert reason.startswith("base model file model.safetensors is missing or changed since it was pushed")


def test_a_base_other_than_the_one_preprocessing_checked_fails_the_job(tmp_path):
    rows, manifest = sentiment(100)
    command, env, _ = pretrained_job(tmp_path, rows, manifest, "bert", "--epochs", "1")
    command[command.index("--base_model_digest") + 1] = "sha256:" + "0" * 64
    completed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    assert "not the sha256:0000" in (tmp_path / "opt/ml/output/failure").read_text()


def test_a_base_model_needs_its_channel_and_the_recipe_needs_a_base_model(tmp_path):
    rows, manifest = sentiment(100)
    command, env = training_command(tmp_path, rows, manifest, "--base_model", "tiny", "--epochs", "1")
    completed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    assert "missing channel(s) base" in (tmp_path / "opt/ml/output/failure").read_text()
    with modules_from(TRAINING) as load:
        train = load("train")
        args = train.parse_args(["--train", "t", "--validation", "v", "--test", "s", "--manifest", "m"])
        with pytest.raises(
            train.ConfigurationError, match=r"none is named: set base_model in conveyor\.json"
        ):
            train.choose_recipe(args, manifest)


def test_a_row_reads_the_same_from_a_csv_cell_and_a_json_request():
    with modules_from(TRAINING) as load:
        data = load("data")
        features = [
            {"name": "title", "type": "text", "vocabulary": []},
            {"name": "price", "type": "numeric", "mean": 0.0, "std": 1.0},
            {"name": "plan", "type": "categorical", "categories": ["3"]},
        ]
        encoder = data.Encoder(
            task="regression",
            target="y",
            features=features,
            text_encoding="pretrained",
            sequence_length=16,
        )
        from_csv = encoder.row_texts(
            {"title": ["Red  shoes ", ""], "price": ["42.50", "NA"], "plan": ["3", "3"]}, 2
        )
        from_json = encoder.row_texts(
            {"title": ["Red shoes", None], "price": [42.5, None], "plan": [3, 3]}, 2
        )
        single = data.Encoder(task="regression", target="y", features=features[:1], text_encoding="pretrained",
                              sequence_length=16)  # fmt: skip
        assert single.row_texts({"title": ["a b", None]}, 2) == ["a b", ""]
    assert from_csv == from_json == ["title: Red shoes | price: 42.5 | plan: 3", "plan: 3"]
    assert encoder.width == 0 and encoder.row_bytes == 2 * 4 * 16
    assert encoder.to_config()["text_encoding"] == "pretrained"


def test_gradient_accumulation_trains_the_model_one_batch_would(training_modules_loop):
    loop, model = training_modules_loop
    import argparse

    import torch

    def trained(micro_batches):
        torch.manual_seed(0)
        network = model.TabularMLP(4, 2, (8,), dropout=0.0)
        x = torch.randn(96, 4)
        y = (x[:, 0] > 0).long()
        args = argparse.Namespace(
            epochs=2, batch_size=32, learning_rate=1e-2, weight_decay=0.0, patience=5, seed=1,
            precision="fp32", compile="false", lr_schedule="linear", warmup_ratio=0.25, max_grad_norm=1.0,
            gradient_accumulation_steps=micro_batches,
        )  # fmt: skip
        loop.fit(network, loop.Classification(None), (x, y), (x, y), args)
        return torch.cat([p.detach().flatten() for p in network.parameters()])

    assert torch.allclose(trained(1), trained(4), atol=1e-5)


@pytest.fixture
def training_modules_loop():
    with modules_from(TRAINING) as load:
        yield load("loop"), load("model")


def test_the_linear_schedule_warms_up_then_decays_to_zero(training_modules_loop):
    loop, _ = training_modules_loop
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = loop.learning_rate_schedule(optimizer, "linear", 10, 0.2, patience=3)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] < rates[1] < rates[2] == 1.0
    assert all(a > b for a, b in itertools.pairwise(rates[2:])) and rates[-1] == pytest.approx(0.125)


def test_rows_are_predicted_longest_first_in_token_budgets_and_answered_in_their_order():
    """Transformers pad each batch to its longest row: batching rows of about one length wastes little."""
    import torch

    with modules_from(TRAINING) as load:
        outputs_in_batches = load("model").outputs_in_batches

    class Echo(torch.nn.Module):
        predict_batch_rows, predict_batch_tokens = 4, 12

        def __init__(self):
            super().__init__()
            self.seen = []

        def row_lengths(self, ids, mask):
            return mask.sum(dim=1)

        def forward(self, ids, mask):
            self.seen.append(mask.sum(dim=1).tolist())
            return ids[:, :1].float()

    lengths = [1, 6, 2, 3, 6, 1, 4, 2, 2]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    ids = torch.arange(len(lengths)).unsqueeze(1).repeat(1, 6)
    network = Echo()
    outputs = outputs_in_batches(network, (ids, mask))
    assert outputs.squeeze(1).tolist() == list(range(len(lengths)))  # each row's own answer, in order
    # 12 padded tokens a batch: two rows of 6; three padded to 4; then four (the row cap) padded to 2.
    assert network.seen == [[6, 6], [4, 3, 2], [2, 2, 1, 1]]
