"""The local stack end to end, driven the way a user drives it: plain boto3 and signed HTTPS requests."""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from local_stack import EventInbox, Inbox, aws, signed_post, states_entered, wait_for_execution
from moto.sagemaker import models as sagemaker_models
from moto.sagemaker.exceptions import SagemakerClientError

from conveyor import client

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def outputs_file(cloud, tmp_path_factory):
    path = tmp_path_factory.mktemp("outputs") / "outputs.json"
    path.write_text(json.dumps(cloud.outputs))
    return path


def three_class_rows(n=900, seed=11):
    """Integer labels 1/2/3 in the first column, a categorical habitat, an ID column, some noise."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = rng.choice([1, 2, 3])
        habitat = rng.choice(["reef", "lagoon", "open-sea"]) if kind != 3 else rng.choice(["reef", "trench"])
        rows.append(
            {
                "Kind": kind,
                "specimen": f"S-{i:05d}",
                "length cm": round(10 * kind + rng.gauss(0, 4), 2),
                "weight": round(kind**1.5 + rng.gauss(0, 1.2), 3),
                "habitat": habitat,
                "noise": rng.random(),
            }
        )
    return rows


def to_csv(rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def test_upload_trains_registers_deploys_and_serves_over_https(cloud, outputs_file):
    outputs = json.loads(outputs_file.read_text())
    rows = three_class_rows()
    s3, sfn, sagemaker = (aws(outputs, s) for s in ("s3", "stepfunctions", "sagemaker"))

    # The target is neither named target/label nor last: the dataset spec says which column it is.
    raw = outputs["RawBucketName"]
    s3.put_object(Bucket=raw, Key="datasets/Sea Creatures/conveyor.json", Body=b'{"target": "Kind"}')
    s3.put_object(Bucket=raw, Key="datasets/Sea Creatures/catch 2026.csv", Body=to_csv(rows))
    execution = wait_for_execution(sfn, outputs["StateMachineArn"], "sea-creatures-")
    assert execution["status"] == "SUCCEEDED", execution.get("cause")
    summary = json.loads(execution["output"])
    assert summary["outcome"] == "deployed"
    assert summary["value"] > summary["baseline"]

    # What the real services would hold afterwards.
    version = summary["version"]
    processed = {o["Key"] for o in s3.list_objects_v2(Bucket=outputs["ProcessedBucketName"])["Contents"]}
    for part in ("manifest.json", "train/part-00000.csv", "validation/part-00000.csv", "test/part-00000.csv"):
        assert f"sea-creatures/{version}/{part}" in processed
    manifest = json.loads(
        s3.get_object(Bucket=outputs["ProcessedBucketName"], Key=f"sea-creatures/{version}/manifest.json")[
            "Body"
        ].read()
    )
    assert manifest["target"] == "Kind" and manifest["labels"] == [1, 2, 3]
    artifacts = {o["Key"] for o in s3.list_objects_v2(Bucket=outputs["ArtifactsBucketName"])["Contents"]}
    assert any(k.endswith(f"sea-creatures-{version}/output/model.tar.gz") for k in artifacts)
    packages = sagemaker.list_model_packages(ModelPackageGroupName="conveyor-sea-creatures")[
        "ModelPackageSummaryList"
    ]
    assert len(packages) == 1 and packages[0]["ModelApprovalStatus"] == "Approved"
    package = sagemaker.describe_model_package(ModelPackageName=packages[0]["ModelPackageArn"])
    # The registry says which data and which code made the model.
    metadata = package["CustomerMetadataProperties"]
    assert metadata["training_job"] == f"sea-creatures-{version}" and metadata["version"] == version
    assert metadata["source_key"] == "datasets/Sea Creatures/catch 2026.csv"
    head = s3.head_object(Bucket=raw, Key="datasets/Sea Creatures/catch 2026.csv")
    assert metadata["source_version_id"] == head["VersionId"]
    assert metadata["code_version"].startswith("sha256:") and " git:" in metadata["code_version"]
    metrics_uri = package["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"]
    bucket, key = metrics_uri[len("s3://") :].split("/", 1)
    evaluation = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert evaluation["conveyor"]["metric"] == "accuracy"
    endpoint = sagemaker.describe_endpoint(EndpointName="conveyor-sea-creatures")
    assert endpoint["EndpointStatus"] == "InService"
    assert endpoint["EndpointConfigName"] == f"sea-creatures-{version}"

    # Predictions over HTTPS, signed with SigV4 and verified against the local CA.
    instances = [{k: v for k, v in row.items() if k != "Kind"} for row in rows]
    answer = signed_post(outputs, "/models/sea-creatures/predict", {"instances": instances})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == version
    predictions = body["predictions"]
    assert len(predictions) == len(rows)
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in predictions)
    accuracy = sum(p["label"] == row["Kind"] for p, row in zip(predictions, rows, strict=True)) / len(rows)
    majority = Counter(row["Kind"] for row in rows).most_common(1)[0][1] / len(rows)
    assert accuracy > majority + 0.25, (accuracy, majority)


def test_prediction_errors_are_clear_json(cloud):
    outputs = cloud.outputs
    missing = signed_post(outputs, "/models/no-such-model/predict", {"instances": [{"a": 1}]})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "ModelNotFound"
    bad = signed_post(outputs, "/models/sea-creatures/predict", {"rows": []})
    assert bad.status_code == 400
    assert "instances" in bad.json()["error"]["message"]


def test_unsigned_or_wrongly_signed_requests_never_reach_the_model(cloud):
    outputs = cloud.outputs
    url = outputs["ApiUrl"] + "/models/sea-creatures/predict"
    unsigned = requests.post(url, json={"instances": [{}]}, verify=outputs["CaBundle"], timeout=10)
    assert unsigned.status_code in (401, 403)
    wrong = signed_post(
        outputs, "/models/sea-creatures/predict", {"instances": [{}]}, secret="not-the-secret"
    )
    assert wrong.status_code == 403


def test_a_replayed_event_starts_no_second_training(cloud):
    outputs = cloud.outputs
    s3, sqs, sfn = (aws(outputs, s) for s in ("s3", "sqs", "stepfunctions"))
    rows = three_class_rows(n=300, seed=5)
    key = "datasets/replay/data.csv"
    put = s3.put_object(Bucket=outputs["RawBucketName"], Key=key, Body=to_csv(rows))
    first = wait_for_execution(sfn, outputs["StateMachineArn"], "replay-")
    assert first["status"] == "SUCCEEDED", first.get("cause")
    # Deliver the same notification twice more, as S3's at-least-once delivery may.
    queue_url = cloud.stack.resources["IngestQueue"].attributes["Ref"]
    notification = {
        "Records": [
            {
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "bucket": {"name": outputs["RawBucketName"]},
                    "object": {
                        "key": key,
                        "size": 1,
                        "eTag": put["ETag"].strip('"'),
                        "versionId": put["VersionId"],
                    },
                },
            }
        ]
    }
    for _ in range(2):
        sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(notification))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
        if (
            attributes["ApproximateNumberOfMessages"] == "0"
            and attributes["ApproximateNumberOfMessagesNotVisible"] == "0"
        ):
            break
        time.sleep(0.5)
    executions = [
        e
        for e in sfn.list_executions(stateMachineArn=outputs["StateMachineArn"])["executions"]
        if e["name"].startswith("replay-")
    ]
    assert len(executions) == 1


def test_an_unusable_file_is_quarantined_and_left_untouched(cloud):
    outputs = cloud.outputs
    s3, sfn = aws(outputs, "s3"), aws(outputs, "stepfunctions")
    events = EventInbox(outputs, "one-class-events", "one-class")
    body = to_csv([{"x": i, "label": "same"} for i in range(100)])
    s3.put_object(Bucket=outputs["RawBucketName"], Key="datasets/one-class/data.csv", Body=body)
    deadline = time.monotonic() + 30
    report = None
    while time.monotonic() < deadline and report is None:
        listing = s3.list_objects_v2(Bucket=outputs["ProcessedBucketName"], Prefix="quarantine/one-class/")
        if listing.get("Contents"):
            key = listing["Contents"][0]["Key"]
            report = json.loads(s3.get_object(Bucket=outputs["ProcessedBucketName"], Key=key)["Body"].read())
        time.sleep(0.5)
    assert report is not None
    assert "single class" in report["reason"]
    assert (
        s3.get_object(Bucket=outputs["RawBucketName"], Key="datasets/one-class/data.csv")["Body"].read()
        == body
    )
    executions = sfn.list_executions(stateMachineArn=outputs["StateMachineArn"])["executions"]
    assert not [e for e in executions if e["name"].startswith("one-class-")]
    (event,) = events.events()
    assert event["source"] == "conveyor" and event["detail-type"] == "Dataset Quarantined"
    assert "single class" in event["detail"]["reason"]
    assert event["detail"]["report"] == f"s3://{outputs['ProcessedBucketName']}/{key}"


def test_the_cli_client_follows_an_upload(cloud, outputs_file, tmp_path):
    target = client.load_target(outputs_file)
    path = tmp_path / "prices.csv"
    rng = random.Random(3)
    rows = []
    for _ in range(400):
        size = rng.uniform(20, 200)
        rooms = rng.randint(1, 6)
        rows.append(
            {
                "size_m2": round(size, 1),
                "rooms": rooms,
                "city": rng.choice(["north", "south"]),
                "price": round(1500 * size + 9000 * rooms + rng.gauss(0, 8000), 0),
            }
        )
    path.write_bytes(to_csv(rows))
    upload = client.upload(target, path, "prices")
    lines: list[str] = []
    result = client.follow(target, upload, on_progress=lines.append, timeout=300)
    assert result["status"] == "SUCCEEDED", result
    assert result["outcome"] == "deployed" and result["metric"] == "r2"
    assert any("StartTrainingJob" in line for line in lines)
    answer = client.predict(
        target, "prices", [{k: v for k, v in r.items() if k != "price"} for r in rows[:50]]
    )
    errors = [abs(p["value"] - r["price"]) for p, r in zip(answer["predictions"], rows[:50], strict=True)]
    spread = max(r["price"] for r in rows) - min(r["price"] for r in rows)
    assert sum(errors) / len(errors) < 0.1 * spread


def _shaped_dataset(shape: str) -> tuple[bytes, str]:
    """Datasets unlike the samples: target position and name, delimiter, line ends, compression, labels."""
    rng = random.Random(shape)
    out = io.StringIO()
    if shape == "booleans-in-the-middle":
        writer = csv.writer(out)
        writer.writerow(["x", "Label", "y"])
        for _ in range(600):
            x, y = rng.gauss(0, 1), rng.gauss(0, 1)
            writer.writerow(
                [round(x, 3), "True" if x + 0.5 * y + rng.gauss(0, 0.5) > 0 else "False", round(y, 3)]
            )
        return out.getvalue().encode(), "data.csv"
    if shape == "semicolons-five-classes":
        writer = csv.writer(out, delimiter=";")
        writer.writerow(["feature one", "grp", "kind"])
        for _ in range(1000):
            c = rng.randrange(5)
            writer.writerow([round(c + rng.gauss(0, 0.6), 3), rng.choice(["u", "v"]), f"class_{c}"])
        return out.getvalue().encode(), "five.csv"
    if shape == "tabs-crlf-target-first":
        writer = csv.writer(out, delimiter="\t", lineterminator="\r\n")
        writer.writerow(["target", "m", "n"])
        for _ in range(700):
            t = rng.randrange(3)
            writer.writerow([t, round(t * 2 + rng.gauss(0, 1), 2), rng.choice("pq")])
        return out.getvalue().encode(), "t.csv"
    writer = csv.writer(out)  # gzip, an ID column, a mostly-missing column, a numeric target
    writer.writerow(["id", "a", "sparse", "out"])
    for i in range(800):
        a = rng.uniform(0, 5)
        writer.writerow(
            [
                i,
                round(a, 3),
                "" if rng.random() < 0.3 else round(rng.random(), 2),
                round(2 * a + rng.gauss(0, 0.3), 4),
            ]
        )
    return gzip.compress(out.getvalue().encode()), "x.csv.gz"


@pytest.mark.parametrize(
    "shape",
    ["booleans-in-the-middle", "semicolons-five-classes", "tabs-crlf-target-first", "gzip-regression"],
)
def test_datasets_of_other_shapes_train_and_serve(cloud, outputs_file, tmp_path, shape):
    body, name = _shaped_dataset(shape)
    path = tmp_path / name
    path.write_bytes(body)
    target = client.load_target(outputs_file)
    result = client.follow(
        target, client.upload(target, path, shape), on_progress=lambda _: None, timeout=300
    )
    assert result["status"] == "SUCCEEDED" and result["outcome"] == "deployed", result
    assert result["value"] > result["baseline"] + 0.2
    text = (gzip.decompress(body) if name.endswith(".gz") else body).decode()
    delimiter = csv.Sniffer().sniff(text[:2000], delimiters=",;\t").delimiter
    rows = list(csv.DictReader(io.StringIO(text), delimiter=delimiter))[:300]
    column = {
        "booleans-in-the-middle": "Label",
        "semicolons-five-classes": "kind",
        "tabs-crlf-target-first": "target",
        "gzip-regression": "out",
    }[shape]
    predictions = client.predict(target, shape, [{k: v for k, v in r.items() if k != column} for r in rows])[
        "predictions"
    ]
    if column == "out":
        errors = [abs(p["value"] - float(r[column])) for p, r in zip(predictions, rows, strict=True)]
        assert sum(errors) / len(errors) < 1.0  # the target spans 0..10
    else:
        accuracy = sum(str(p["label"]) == r[column] for p, r in zip(predictions, rows, strict=True)) / len(
            rows
        )
        majority = Counter(r[column] for r in rows).most_common(1)[0][1] / len(rows)
        assert accuracy > majority + 0.2, (accuracy, majority)


class _Throttled(SagemakerClientError):
    code = "ThrottlingException"


@pytest.mark.filterwarnings("ignore:Exception\\(_Throttled\\):UserWarning")  # moto: not in the service model
def test_a_sagemaker_error_the_pipeline_cannot_get_past_fails_it_with_the_cause_and_deploys_nothing(
    cloud, monkeypatch
):
    """The emulator answers CreateModel with ThrottlingException, every time. (CreateModel is an optimised
    integration, whose service errors moto 5.2.5 names States.Runtime: locally its Retry does not apply, so
    this is the failure path; docs/local-mode.md. The aws-sdk calls retry: the next test.)"""
    calls: list[str] = []

    def create_model(backend, *args, **kwargs):
        calls.append(kwargs.get("model_name", ""))
        raise _Throttled("Rate exceeded")

    monkeypatch.setattr(sagemaker_models.SageMakerModelBackend, "create_model", create_model)
    outputs = cloud.outputs
    s3, sfn, sagemaker = aws(outputs, "s3"), aws(outputs, "stepfunctions"), aws(outputs, "sagemaker")
    raw = outputs["RawBucketName"]
    s3.put_object(Bucket=raw, Key="datasets/throttled/conveyor.json", Body=b'{"target": "Kind"}')
    events = EventInbox(outputs, "throttled-events", "throttled")
    s3.put_object(Bucket=raw, Key="datasets/throttled/data.csv", Body=to_csv(three_class_rows(seed=12)))
    execution = wait_for_execution(sfn, outputs["StateMachineArn"], "throttled-")

    assert execution["status"] == "FAILED"
    assert execution["error"] == "PipelineFailed"
    assert execution["cause"].startswith("States.Runtime: ") and "ThrottlingException" in execution["cause"]
    assert calls, "CreateModel was called"
    entered = states_entered(sfn, execution["executionArn"])
    assert "NotifyFailed" in entered and "CreateEndpoint" not in entered and "UpdateEndpoint" not in entered
    endpoints = [e["EndpointName"] for e in sagemaker.list_endpoints()["Endpoints"]]
    assert "conveyor-throttled" not in endpoints
    (event,) = events.events()
    assert event["detail-type"] == "Pipeline Failed"
    assert event["detail"]["error"] == "States.Runtime" and "ThrottlingException" in event["detail"]["cause"]


@pytest.mark.filterwarnings("ignore:Exception\\(_Throttled\\):UserWarning")  # moto: not in the service model
def test_a_throttled_sagemaker_call_is_retried_and_the_pipeline_succeeds(cloud, monkeypatch):
    """RegisterApprovedModel (aws-sdk:sagemaker:createModelPackage) is throttled twice: its Retry (2 s, then
    4 s) absorbs it, and the model deploys."""
    original = sagemaker_models.SageMakerModelBackend.create_model_package
    calls: list[int] = []

    def create_model_package(backend, *args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise _Throttled("Rate exceeded")
        return original(backend, *args, **kwargs)

    monkeypatch.setattr(sagemaker_models.SageMakerModelBackend, "create_model_package", create_model_package)
    outputs = cloud.outputs
    s3, sfn = aws(outputs, "s3"), aws(outputs, "stepfunctions")
    raw = outputs["RawBucketName"]
    s3.put_object(Bucket=raw, Key="datasets/busy/conveyor.json", Body=b'{"target": "Kind"}')
    s3.put_object(Bucket=raw, Key="datasets/busy/data.csv", Body=to_csv(three_class_rows(seed=13)))
    execution = wait_for_execution(sfn, outputs["StateMachineArn"], "busy-")

    assert execution["status"] == "SUCCEEDED", execution.get("cause")
    assert json.loads(execution["output"])["outcome"] == "deployed"
    assert len(calls) == 3
    history = sfn.get_execution_history(executionArn=execution["executionArn"], maxResults=1000)["events"]
    failures = [e["taskFailedEventDetails"] for e in history if e["type"] == "TaskFailed"]
    assert [f["error"] for f in failures] == ["SageMaker.AmazonSageMakerException"] * 2
    assert all("Rate exceeded" in f["cause"] for f in failures)


def test_a_failed_training_job_is_notified_with_its_reason_and_deploys_nothing(cloud):
    outputs = cloud.outputs
    s3, sfn, sagemaker = (aws(outputs, s) for s in ("s3", "stepfunctions", "sagemaker"))
    inbox = Inbox(outputs, "broken-training-notifications")
    raw = outputs["RawBucketName"]
    spec = b'{"target": "Kind", "hyperparameters": {"hidden_units": "lots"}}'
    s3.put_object(Bucket=raw, Key="datasets/broken-training/conveyor.json", Body=spec)
    s3.put_object(Bucket=raw, Key="datasets/broken-training/data.csv", Body=to_csv(three_class_rows(seed=14)))
    execution = wait_for_execution(sfn, outputs["StateMachineArn"], "broken-training-")

    assert execution["status"] == "FAILED"
    assert execution["error"] == "TrainingJobFailed"
    # The training script's own words, which SageMaker reports as the job's FailureReason.
    assert "hidden_units must be comma-separated integers, got 'lots'" in execution["cause"]
    (notice,) = [m for m in inbox.messages() if m["outcome"] == "failed"]
    assert notice["error"] == "TrainingJobFailed" and "hidden_units" in notice["cause"]
    entered = states_entered(sfn, execution["executionArn"])
    assert "GetTrainingFailure" in entered and not [
        s for s in entered if s.startswith(("Register", "Create"))
    ]
    assert "conveyor-broken-training" not in [
        e["EndpointName"] for e in sagemaker.list_endpoints()["Endpoints"]
    ]


def test_a_challenger_deploys_only_if_it_beats_the_champion(cloud):
    outputs = cloud.outputs
    s3, sfn, sagemaker = (aws(outputs, s) for s in ("s3", "stepfunctions", "sagemaker"))
    raw, key = outputs["RawBucketName"], "datasets/gated/data.csv"
    good = to_csv(three_class_rows(seed=21))
    s3.put_object(Bucket=raw, Key="datasets/gated/conveyor.json", Body=b'{"target": "Kind"}')
    events = EventInbox(outputs, "gated-events", "gated")

    def run(body: bytes) -> dict:
        before = {
            e["name"] for e in sfn.list_executions(stateMachineArn=outputs["StateMachineArn"])["executions"]
        }
        s3.put_object(Bucket=raw, Key=key, Body=body)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            new = [
                e
                for e in sfn.list_executions(stateMachineArn=outputs["StateMachineArn"])["executions"]
                if e["name"].startswith("gated-") and e["name"] not in before and e["status"] != "RUNNING"
            ]
            if new:
                return sfn.describe_execution(executionArn=new[0]["executionArn"])
            time.sleep(1)
        raise AssertionError("no execution finished")

    first = run(good)
    assert json.loads(first["output"])["outcome"] == "deployed", first.get("cause")
    champion_config = sagemaker.describe_endpoint(EndpointName="conveyor-gated")["EndpointConfigName"]

    # A worse challenger (labels shuffled) must not replace the champion.
    rows = three_class_rows(seed=21)
    kinds = [row["Kind"] for row in rows]
    random.Random(3).shuffle(kinds)
    worse = run(to_csv([{**row, "Kind": kind} for row, kind in zip(rows, kinds, strict=True)]))
    summary = json.loads(worse["output"])
    assert summary["outcome"] == "rejected"
    assert "champion" in summary["reason"] or "threshold" in summary["reason"], summary["reason"]
    assert sagemaker.describe_endpoint(EndpointName="conveyor-gated")["EndpointConfigName"] == champion_config
    packages = sagemaker.list_model_packages(ModelPackageGroupName="conveyor-gated")[
        "ModelPackageSummaryList"
    ]
    assert sorted(p["ModelApprovalStatus"] for p in packages) == ["Approved", "Rejected"]

    # The same data again trains the same model (seeded): as good as the champion, so it deploys.
    again = run(good)
    summary = json.loads(again["output"])
    assert summary["outcome"] == "deployed", summary
    assert summary["champion"]["version"] == json.loads(first["output"])["version"]
    assert "beats the champion" in summary["reason"]
    serving = sagemaker.describe_endpoint(EndpointName="conveyor-gated")["EndpointConfigName"]
    assert serving != champion_config and serving.endswith(summary["version"])

    # Each outcome was also an EventBridge event, with the summary and a link to the execution.
    heard = [event for _ in range(3) for event in events.events()]
    assert [e["detail-type"] for e in heard] == ["Model Deployed", "Model Rejected", "Model Deployed"]
    assert [e["detail"]["version"] for e in heard] == [
        json.loads(run_["output"])["version"] for run_ in (first, worse, again)
    ]
    assert heard[2]["detail"]["execution"] == again["executionArn"]
    assert again["executionArn"] in heard[2]["resources"]
    assert "/states/home?region=us-east-1#/v2/executions/details/" in heard[2]["detail"]["console_url"]


def test_the_stack_has_its_alarms_and_dashboard(cloud):
    cloudwatch = aws(cloud.outputs, "cloudwatch")
    alarms = {
        a["AlarmName"]: a for a in cloudwatch.describe_alarms(AlarmNamePrefix="conveyor-")["MetricAlarms"]
    }
    for name, metric in (
        ("conveyor-IngestDeadLetterAlarm", "ApproximateNumberOfMessagesVisible"),
        ("conveyor-AsyncFailuresAlarm", "ApproximateNumberOfMessagesVisible"),
        ("conveyor-PipelineFailuresAlarm", "ExecutionsFailed"),
        ("conveyor-ApiServerErrorsAlarm", "5xx"),
    ):
        assert alarms[name]["MetricName"] == metric
        assert alarms[name]["AlarmActions"] == [cloud.outputs["NotificationTopicArn"]]
    dead_letters = {d["Value"] for d in alarms["conveyor-IngestDeadLetterAlarm"]["Dimensions"]}
    assert dead_letters == {"conveyor-IngestDeadLetterQueue"}
    (dashboard,) = cloudwatch.list_dashboards()["DashboardEntries"]
    body = json.loads(cloudwatch.get_dashboard(DashboardName=dashboard["DashboardName"])["DashboardBody"])
    titles = [w["properties"]["title"] for w in body["widgets"]]
    assert "Pipeline executions" in titles and any(t.startswith("Endpoints") for t in titles)
    assert dashboard["DashboardName"] in cloud.outputs["DashboardUrl"]


def test_the_stack_key_encrypts_the_data_and_what_sagemaker_writes(cloud):
    # EncryptionMode SSE-KMS, the default. Runs after the first test of this module deployed sea-creatures.
    outputs = cloud.outputs
    s3, sqs, sns, sagemaker, kms = (aws(outputs, s) for s in ("s3", "sqs", "sns", "sagemaker", "kms"))
    key_arn = kms.describe_key(KeyId="alias/conveyor")["KeyMetadata"]["Arn"]
    assert kms.get_key_rotation_status(KeyId=key_arn)["KeyRotationEnabled"] is True
    for bucket in ("RawBucketName", "ProcessedBucketName", "ArtifactsBucketName"):
        (rule,) = s3.get_bucket_encryption(Bucket=outputs[bucket])["ServerSideEncryptionConfiguration"][
            "Rules"
        ]
        assert rule["ApplyServerSideEncryptionByDefault"] == {
            "SSEAlgorithm": "aws:kms",
            "KMSMasterKeyID": key_arn,
        }
        assert rule["BucketKeyEnabled"] is True
    for url in (queue.attributes["Ref"] for queue in cloud.stack.of_type("AWS::SQS::Queue")):
        assert (
            sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]["KmsMasterKeyId"]
            == key_arn
        )
    topic = sns.get_topic_attributes(TopicArn=outputs["NotificationTopicArn"])["Attributes"]
    assert topic["KmsMasterKeyId"] == key_arn

    # What SageMaker was asked to encrypt (local mode trains on ml.m5.xlarge: EBS, so a volume key too) ...
    endpoint = sagemaker.describe_endpoint(EndpointName="conveyor-sea-creatures")
    version = endpoint["EndpointConfigName"].removeprefix("sea-creatures-")
    job = sagemaker.describe_training_job(TrainingJobName=f"sea-creatures-{version}")
    assert job["OutputDataConfig"]["KmsKeyId"] == key_arn
    assert job["ResourceConfig"]["VolumeKmsKeyId"] == key_arn
    config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    assert config["KmsKeyId"] == key_arn
    # ... and what it wrote with that key.
    bucket, key = job["ModelArtifacts"]["S3ModelArtifacts"].removeprefix("s3://").split("/", 1)
    head = s3.head_object(Bucket=bucket, Key=key)
    assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", key_arn)


def test_a_volume_key_on_an_instance_with_local_storage_is_refused_as_sagemaker_does(cloud):
    sagemaker = aws(cloud.outputs, "sagemaker")
    key_arn = aws(cloud.outputs, "kms").describe_key(KeyId="alias/conveyor")["KeyMetadata"]["Arn"]
    with pytest.raises(sagemaker.exceptions.ClientError, match="hardware module"):
        sagemaker.create_training_job(
            TrainingJobName="nvme-with-a-volume-key",
            AlgorithmSpecification={"TrainingImage": "unused", "TrainingInputMode": "File"},
            RoleArn="arn:aws:iam::123456789012:role/conveyor-SageMakerExecutionRole",
            OutputDataConfig={"S3OutputPath": f"s3://{cloud.outputs['ArtifactsBucketName']}/unused/"},
            ResourceConfig={
                "InstanceType": "ml.g5.xlarge",
                "InstanceCount": 1,
                "VolumeSizeInGB": 30,
                "VolumeKmsKeyId": key_arn,
            },
            StoppingCondition={"MaxRuntimeInSeconds": 60},
        )


def test_conveyor_report_downloads_the_training_report_with_its_plots(cloud, outputs_file, tmp_path, capsys):
    from conveyor import cli

    # sea-creatures trained in the first test of this module: its newest version, as a user would ask.
    assert (
        cli.main(["report", "Sea Creatures", "--outputs-file", str(outputs_file), "--output", str(tmp_path)])
        == 0
    )
    (folder,) = (tmp_path / "sea-creatures").iterdir()
    assert {p.name for p in folder.iterdir()} >= {
        "report.html",
        "learning_curves.png",
        "confusion_matrix.png",
        "evaluation.json",
        "history.json",
    }
    assert (folder / "report.html").as_uri() in capsys.readouterr().out
    assert "held-out test rows" in (folder / "report.html").read_text()
    assert cli.main(["report", "never-uploaded", "--outputs-file", str(outputs_file)]) != 0
