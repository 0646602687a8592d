"""The text and image recipes through the whole local stack: an upload becomes a deployed model that answers
over the API, and a dataset's conveyor.json chooses where its training job runs (issue 5)."""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import zipfile

import pytest
from local_stack import aws, signed_post, wait_for_execution
from samples import SHAPES, image_suffix, negation_rows, shape_image

pytestmark = pytest.mark.integration


def upload(outputs: dict, name: str, filename: str, body: bytes, spec: dict | None = None) -> dict:
    """Upload datasets/<name>/<filename> (its conveyor.json first) and return its finished execution."""
    s3 = aws(outputs, "s3")
    if spec is not None:
        s3.put_object(
            Bucket=outputs["RawBucketName"],
            Key=f"datasets/{name}/conveyor.json",
            Body=json.dumps(spec).encode(),
        )
    s3.put_object(Bucket=outputs["RawBucketName"], Key=f"datasets/{name}/{filename}", Body=body)
    return wait_for_execution(
        aws(outputs, "stepfunctions"), outputs["StateMachineArn"], f"{name}-", timeout=600
    )


def test_an_image_zip_trains_a_cnn_on_two_instances_and_serves_base64_images(cloud):
    rng = random.Random(5)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for kind in SHAPES:
            for i in range(40):
                data = shape_image(kind, rng)
                zipped.writestr(f"patterns/{kind}/{i}{image_suffix(data)}", data)
        zipped.writestr("patterns/README.txt", "three kinds of pattern")
    spec = {
        "hyperparameters": {"image_size": 16, "epochs": 10},
        # Two instances: torchrun runs a process for each (SageMaker's torch_distributed), here on one machine.
        "training": {"instance_count": 2, "spot": False},
    }
    execution = upload(cloud.outputs, "patterns", "patterns.zip", archive.getvalue(), spec)
    summary = json.loads(execution["output"])
    assert summary["outcome"] == "deployed", execution.get("cause")

    name = json.loads(execution["input"])["names"]["training_job"]
    job = aws(cloud.outputs, "sagemaker").describe_training_job(TrainingJobName=name)
    assert job["ResourceConfig"]["InstanceCount"] == 2 and job["EnableManagedSpotTraining"] is False
    assert job["HyperParameters"]["sagemaker_torch_distributed_enabled"] == "true"
    log = (cloud.workdir / "training" / name / "training.log").read_text()
    assert "images of 16 x 16 pixels; device cpu, 2 training process(es)" in log

    fresh = random.Random(99)
    kinds = [fresh.choice(SHAPES) for _ in range(30)]
    instances = [{"image": base64.b64encode(shape_image(kind, fresh)).decode()} for kind in kinds]
    response = signed_post(cloud.outputs, "/models/patterns/predict", {"instances": instances})
    assert response.status_code == 200, response.text
    labels = [p["label"] for p in response.json()["predictions"]]
    assert sum(label == kind for label, kind in zip(labels, kinds, strict=True)) >= 24, (labels, kinds)

    bad = signed_post(cloud.outputs, "/models/patterns/predict", {"instances": [{"image": "not base64!"}]})
    assert bad.status_code == 400 and "instance 0" in bad.json()["error"]["message"]


def test_a_text_column_trains_a_bilstm_that_reads_word_order(cloud):
    rows = negation_rows(1200, random.Random(21))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    execution = upload(cloud.outputs, "reviews", "reviews.csv", text.getvalue().encode(), {"target": "label"})
    summary = json.loads(execution["output"])
    assert summary["outcome"] == "deployed", execution.get("cause")
    manifest_uri = json.loads(execution["input"])["data"]["manifest"]
    bucket, _, key = manifest_uri.removeprefix("s3://").partition("/")
    manifest = json.loads(aws(cloud.outputs, "s3").get_object(Bucket=bucket, Key=key)["Body"].read())
    assert manifest["recipe"] == "text"
    assert summary["value"] >= 0.9, summary

    instances = [
        {"review": "It was not good, the plot", "stars_shown": 1},
        {"review": "Not the plot: it was good", "stars_shown": 0},
    ]
    response = signed_post(cloud.outputs, "/models/reviews/predict", {"instances": instances})
    assert response.status_code == 200, response.text
    assert [p["label"] for p in response.json()["predictions"]] == ["negative", "positive"]
