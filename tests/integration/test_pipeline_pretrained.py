"""A base model through the whole local stack (issue 17): pushed to the hub, named by a dataset's
conveyor.json, fine-tuned by the training job, deployed, answering over the API (a text encoder on a table,
an image backbone on a zip of class folders); and a base that cannot be fine-tuned fails the execution
before any training job starts."""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import zipfile

import boto3
import pytest
from local_stack import aws, signed_post, wait_for_execution
from samples import SHAPES, image_suffix, shape_image
from tiny_models import save_tiny_encoder, save_tiny_image_model

from conveyor import base_models
from conveyor.client import Target

pytestmark = pytest.mark.integration

POSITIVE = ["great", "wonderful", "loved", "excellent", "superb", "brilliant"]
NEGATIVE = ["awful", "boring", "terrible", "dull", "poor", "disappointing"]
NEUTRAL = ["the", "film", "plot", "cast", "music", "ending", "story", "actor", "scene", "score"]


def titles(n: int, rng: random.Random) -> list[dict[str, str]]:
    """Short, mostly unique titles (profiling alone takes such a column for an identifier) whose one
    sentiment word decides the label."""
    rows = []
    for i in range(n):
        positive = rng.random() < 0.5
        words = [*rng.sample(NEUTRAL, rng.randint(1, 3)), rng.choice(POSITIVE if positive else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"sku": f"S{i:05d}", "title": " ".join(words), "label": "up" if positive else "down"})
    return rows


def target(outputs: dict) -> Target:
    session = boto3.session.Session(
        aws_access_key_id=outputs["AccessKeyId"],
        aws_secret_access_key=outputs["SecretAccessKey"],
        region_name=outputs["Region"],
    )
    return Target(outputs, session, outputs["EndpointUrl"], outputs.get("CaBundle"))


def upload(outputs: dict, name: str, rows: list[dict[str, str]], spec: dict) -> dict:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    s3 = aws(outputs, "s3")
    raw = outputs["RawBucketName"]
    s3.put_object(Bucket=raw, Key=f"datasets/{name}/conveyor.json", Body=json.dumps(spec).encode())
    s3.put_object(Bucket=raw, Key=f"datasets/{name}/{name}.csv", Body=text.getvalue().encode())
    return wait_for_execution(
        aws(outputs, "stepfunctions"), outputs["StateMachineArn"], f"{name}-", timeout=600
    )


def test_a_pushed_base_model_fine_tunes_deploys_and_answers(cloud, tmp_path):
    stack = target(cloud.outputs)
    folder = save_tiny_encoder(tmp_path / "tiny", "bert", words=[*POSITIVE, *NEGATIVE, *NEUTRAL])
    pushed = base_models.push(stack, folder, "tiny-bert")
    assert pushed.digest.startswith("sha256:")
    assert [b["name"] for b in base_models.list_bases(stack)] == ["tiny-bert"]

    spec = {
        "target": "label",
        "base_model": "tiny-bert",
        "columns": {"title": "text", "sku": "ignore"},
        "hyperparameters": {"epochs": 20, "learning_rate": 0.01, "patience": 20},
    }
    execution = upload(cloud.outputs, "titles", titles(500, random.Random(8)), spec)
    summary = json.loads(execution["output"])
    assert summary["outcome"] == "deployed", execution.get("cause")

    name = json.loads(execution["input"])["names"]["training_job"]
    job = aws(cloud.outputs, "sagemaker").describe_training_job(TrainingJobName=name)
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in job["InputDataConfig"]}
    assert channels["base"].endswith("/base-models/tiny-bert/")
    assert job["HyperParameters"]["base_model"] == "tiny-bert"
    assert job["HyperParameters"]["base_model_digest"] == pushed.digest
    log = (cloud.workdir / "training" / name / "training.log").read_text()
    assert "pretrained recipe" in log and "new, randomly initialised: classifier" in log

    fresh = titles(40, random.Random(99))
    instances = [{"title": row["title"]} for row in fresh]
    response = signed_post(cloud.outputs, "/models/titles/predict", {"instances": instances})
    assert response.status_code == 200, response.text
    labels = [p["label"] for p in response.json()["predictions"]]
    assert sum(label == row["label"] for label, row in zip(labels, fresh, strict=True)) >= 32, labels
    bad = signed_post(cloud.outputs, "/models/titles/predict", {"instances": [{"title": 7}]})
    assert bad.status_code == 400 and "must be a string" in bad.json()["error"]["message"]


def test_a_base_model_missing_from_the_hub_fails_before_any_training_job(cloud):
    spec = {"target": "label", "base_model": "never-pushed", "columns": {"title": "text"}}
    execution = upload(cloud.outputs, "orphans", titles(120, random.Random(3)), spec)
    assert execution["status"] == "FAILED"
    assert "never-pushed" in (execution.get("cause") or "") + (execution.get("error") or ""), execution
    name = json.loads(execution["input"])["names"]["training_job"]
    jobs = aws(cloud.outputs, "sagemaker").list_training_jobs(NameContains=name)["TrainingJobSummaries"]
    assert jobs == []


def test_an_image_backbone_from_the_hub_fine_tunes_on_a_zip_and_answers_base64_images(cloud, tmp_path):
    stack = target(cloud.outputs)
    base_models.push(stack, save_tiny_image_model(tmp_path / "vit", "vit"), "tiny-vit")
    rng = random.Random(5)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for kind in SHAPES:
            for i in range(40):
                data = shape_image(kind, rng)
                zipped.writestr(f"{kind}/{i}{image_suffix(data)}", data)
    spec = {
        "base_model": "tiny-vit",
        "hyperparameters": {"epochs": 12, "learning_rate": 0.003, "patience": 12},
    }
    s3, raw = aws(cloud.outputs, "s3"), cloud.outputs["RawBucketName"]
    s3.put_object(Bucket=raw, Key="datasets/glyphs/conveyor.json", Body=json.dumps(spec).encode())
    s3.put_object(Bucket=raw, Key="datasets/glyphs/glyphs.zip", Body=archive.getvalue())
    execution = wait_for_execution(
        aws(cloud.outputs, "stepfunctions"), cloud.outputs["StateMachineArn"], "glyphs-", timeout=600
    )
    summary = json.loads(execution["output"])
    assert summary["outcome"] == "deployed", execution.get("cause")
    name = json.loads(execution["input"])["names"]["training_job"]
    job = aws(cloud.outputs, "sagemaker").describe_training_job(TrainingJobName=name)
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in job["InputDataConfig"]}
    assert channels["base"].endswith("/base-models/tiny-vit/")
    log = (cloud.workdir / "training" / name / "training.log").read_text()
    assert "pretrained_image recipe" in log and "resized to 16x16" in log

    fresh = random.Random(99)
    kinds = [fresh.choice(SHAPES) for _ in range(30)]
    instances = [{"image": base64.b64encode(shape_image(kind, fresh)).decode()} for kind in kinds]
    response = signed_post(cloud.outputs, "/models/glyphs/predict", {"instances": instances})
    assert response.status_code == 200, response.text
    labels = [p["label"] for p in response.json()["predictions"]]
    assert sum(label == kind for label, kind in zip(labels, kinds, strict=True)) >= 20, (labels, kinds)
