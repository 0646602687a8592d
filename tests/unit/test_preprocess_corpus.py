"""Bad input through the real PreprocessFunction handler (in-process moto): every file ends processed,
quarantined with a reason, or ignored with a logged reason; never an unhandled exception or a retried
message; the upload stays byte-identical. Also: replayed, duplicated and concurrent events start exactly
one execution per object version, in every event shape conveyor accepts (tests/events/)."""

from __future__ import annotations

import copy
import gzip
import io
import json
import random
import re
import threading
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import boto3
import pytest
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from moto import mock_aws
from moto.stepfunctions import models as sfn_models

from common import aws
from preprocess import app, core

REGION = "us-east-1"
RAW, PROCESSED, ARTIFACTS = "conveyor-raw-123456789012-us-east-1", "conveyor-processed", "conveyor-artifacts"
EVENTS = Path(__file__).resolve().parents[1] / "events"
MINIMAL_MACHINE = json.dumps({"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}})


class Context:
    function_name = "preprocess"
    memory_limit_in_mb = 1024
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:preprocess"
    aws_request_id = "req"


@dataclass
class Stack:
    s3: Any
    sfn: Any
    sqs: Any
    machine: str
    notifications: str

    def executions(self) -> list[dict[str, Any]]:
        return self.sfn.list_executions(stateMachineArn=self.machine)["executions"]

    def notified(self) -> list[dict[str, Any]]:
        messages = self.sqs.receive_message(QueueUrl=self.notifications, MaxNumberOfMessages=10).get(
            "Messages", []
        )
        return [json.loads(json.loads(m["Body"])["Message"]) for m in messages]

    def processed_keys(self) -> list[str]:
        return [o["Key"] for o in self.s3.list_objects_v2(Bucket=PROCESSED).get("Contents", [])]


@pytest.fixture
def stack(monkeypatch):
    for name, value in {
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "STACK_NAME": "conveyor",
        "PROCESSED_BUCKET": PROCESSED,
        "ARTIFACTS_BUCKET": ARTIFACTS,
        "POWERTOOLS_METRICS_DISABLED": "true",
        "POWERTOOLS_TRACE_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        aws.reset_clients()
        s3 = boto3.client("s3", region_name=REGION)
        for bucket in (RAW, PROCESSED, ARTIFACTS):
            s3.create_bucket(Bucket=bucket)
        s3.put_bucket_versioning(Bucket=RAW, VersioningConfiguration={"Status": "Enabled"})
        sfn = boto3.client("stepfunctions", region_name=REGION)
        role = "arn:aws:iam::123456789012:role/sfn"
        machine = sfn.create_state_machine(name="pipeline", definition=MINIMAL_MACHINE, roleArn=role)
        sns = boto3.client("sns", region_name=REGION)
        topic = sns.create_topic(Name="notifications")["TopicArn"]
        sqs = boto3.client("sqs", region_name=REGION)
        inbox = sqs.create_queue(QueueName="inbox")["QueueUrl"]
        inbox_arn = sqs.get_queue_attributes(QueueUrl=inbox, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=inbox_arn)
        monkeypatch.setenv("STATE_MACHINE_ARN", machine["stateMachineArn"])
        monkeypatch.setenv("NOTIFICATION_TOPIC_ARN", topic)
        yield Stack(s3, sfn, sqs, machine["stateMachineArn"], inbox)
        aws.reset_clients()


def s3_event(bucket: str, key: str, head: dict[str, Any]) -> dict[str, Any]:
    """An S3 ObjectCreated notification as S3 writes it: the key URL-encoded (space → '+')."""
    record = json.loads(json.loads((EVENTS / "sqs_s3_object_created.json").read_text())["Records"][0]["body"])
    obj = record["Records"][0]["s3"]
    obj["bucket"]["name"] = bucket
    obj["bucket"]["arn"] = f"arn:aws:s3:::{bucket}"
    obj["object"].update(
        key=quote_plus(key, safe="/"),
        size=head["ContentLength"],
        eTag=head["ETag"].strip('"'),
        versionId=head["VersionId"],
    )
    return record


def eventbridge_event(bucket: str, key: str, head: dict[str, Any]) -> dict[str, Any]:
    event = json.loads((EVENTS / "eventbridge_s3_object_created.json").read_text())
    event["detail"]["bucket"]["name"] = bucket
    event["detail"]["object"].update(
        key=key, size=head["ContentLength"], etag=head["ETag"].strip('"'), **{"version-id": head["VersionId"]}
    )
    return event


def sqs_batch(*bodies: dict[str, Any]) -> dict[str, Any]:
    template = json.loads((EVENTS / "sqs_s3_object_created.json").read_text())["Records"][0]
    records = []
    for i, body in enumerate(bodies):
        record = copy.deepcopy(template)
        record.update(messageId=f"message-{i}", body=json.dumps(body))
        records.append(record)
    return {"Records": records}


def upload(stack: Stack, key: str, body: bytes) -> dict[str, Any]:
    stack.s3.put_object(Bucket=RAW, Key=key, Body=body)
    return stack.s3.head_object(Bucket=RAW, Key=key)


def deliver(stack: Stack, key: str, body: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Upload, deliver its notification through the handler; the handler's response and the head."""
    head = upload(stack, key, body)
    response = app.handler(sqs_batch(s3_event(RAW, key, head)), Context())
    return response, head


def good_csv(rows: int = 200, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    lines = ["age,plan,monthly,churned"]
    for i in range(rows):
        lines.append(
            f"{20 + i % 50},{rng.choice(['basic', 'pro'])},{rng.uniform(5, 90):.2f},{'yes' if i % 3 else 'no'}"
        )
    return ("\n".join(lines) + "\n").encode()


def gzip_stream(chunks) -> bytes:
    """gzip of a stream of byte chunks, compressed as they come (the inflated data never exists whole)."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as zipped:
        for chunk in chunks:
            zipped.write(chunk)
    return out.getvalue()


def jsonl(rows: int = 200) -> bytes:
    return "".join(
        json.dumps(
            {
                "age": 20 + i % 50,
                "plan": ["basic", "pro"][i % 2],
                "score": i * 0.37,
                "label": "ab"[i % 3 == 0],
            }
        )
        + "\n"
        for i in range(rows)
    ).encode()


def _corpus() -> list[tuple[str, str, Any, str]]:
    """(case, key, body or a callable making it, expected outcome[:reason regex])."""
    header = ",".join(f"c{i}" for i in range(10_000)) + "\n"
    good = good_csv()
    return [
        ("zero bytes", "datasets/d/empty.csv", b"", "ignored"),
        ("only blank lines", "datasets/d/blank.csv", b"\n\n  \n", "quarantined:empty"),
        (
            "binary garbage",
            "datasets/d/garbage.csv",
            random.Random(3).randbytes(5000),
            "quarantined:binary|UTF-8",
        ),
        ("utf-16 text", "datasets/d/utf16.csv", good.decode().encode("utf-16"), "quarantined:binary"),
        (
            "truncated gzip",
            "datasets/d/cut.csv.gz",
            gzip.compress(good_csv(5000))[:4000],
            "quarantined:truncated or corrupt",
        ),
        ("not gzip at all", "datasets/d/fake.csv.gz", good, "quarantined:truncated or corrupt|gzip"),
        (
            "gzip bomb, no line breaks",
            "datasets/d/bomb.csv.gz",
            lambda: gzip_stream(b"0" * (1 << 20) for _ in range(64)),
            "quarantined:longer than",
        ),
        (
            "gzip bomb, repeated rows",
            "datasets/d/rows.csv.gz",
            lambda: gzip_stream([b"a,b\n", *(b"1,x\n" * (1 << 18) for _ in range(40))]),
            "quarantined:decompress",
        ),
        (
            "ragged rows",
            "datasets/d/ragged.csv",
            b"a,b,label\n" + b"1,2,x\n1,2\n1,2,3,4\n" * 100,
            "quarantined:different number of fields",
        ),
        (
            "semicolons and decimal commas",
            "datasets/d/euro.csv",
            b"a;b;label\n" + b"".join(f"{i},5;{i % 7},25;{'xy'[i % 2]}\n".encode() for i in range(200)),
            "processed|quarantined",
        ),
        (
            "latin-1",
            "datasets/d/latin1.csv",
            ("name,label\n" + "".join(f"caf\xe9 {i},{'ab'[i % 2]}\n" for i in range(200))).encode("latin-1"),
            "quarantined:not UTF-8",
        ),
        (
            "10,000 columns",
            "datasets/d/wide.csv",
            (header + ",".join("1" for _ in range(10_000)) + "\n").encode(),
            "quarantined:10,000 columns",
        ),
        (
            "50 MB single line",
            "datasets/d/oneline.csv",
            lambda: b"a," + b"x" * (50 << 20) + b"\n",
            "quarantined:line 1 is longer than",
        ),
        ("only a header", "datasets/d/header.csv", b"age,plan,label\n", "quarantined:usable rows"),
        (
            "single class",
            "datasets/d/one.csv",
            b"x,label\n" + b"".join(f"{i},same\n".encode() for i in range(200)),
            "quarantined:single class",
        ),
        (
            "all-missing target",
            "datasets/d/nolabel.csv",
            b"x,label\n" + b"".join(f"{i},NA\n".encode() for i in range(200)),
            "quarantined:usable rows",
        ),
        (
            "formula cells",
            "datasets/d/formula.csv",
            good.replace(b"basic", b"=cmd|' /C calc'!A0").replace(b"pro", b"@SUM(A1)"),
            "processed",
        ),
        ("unicode, spaces and + in the key", "datasets/d/Churn 2026 été+q4.csv", good, "processed"),
        ("a '..' segment", "datasets/d/../escape.csv", good, "quarantined:'\\.\\.' path segment"),
        ("a dataset named '..'", "datasets/../escape.csv", good, "ignored"),
        ("outside datasets/", "uploads/d/x.csv", good, "ignored"),
        ("folder marker", "datasets/d/", b"", "ignored"),
        ("spec file", "datasets/d/conveyor.json", b"{}", "ignored"),
        ("unsupported type", "datasets/d/book.xlsx", b"PK\x03\x04", "quarantined:unsupported file type"),
        ("json lines", "datasets/d/rows.jsonl", jsonl(), "processed"),
        ("gzipped json lines", "datasets/d/rows.jsonl.gz", gzip.compress(jsonl()), "processed"),
        ("json lines with broken lines", "datasets/d/some.jsonl", jsonl() + b"{oops\n[1]\n", "processed"),
        ("json lines that are not", "datasets/d/nope.jsonl", good, "quarantined:JSON object"),
        (
            "quoted field never closed",
            "datasets/d/quote.csv",
            b'x,label\n"open,a\n' + b"1,b\n" * 300,
            "quarantined:never closes",
        ),
    ]


CORPUS = _corpus()


@pytest.mark.parametrize(("case", "key", "body", "expected"), CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input_is_processed_quarantined_or_ignored_and_the_upload_is_untouched(
    stack, monkeypatch, case, key, body, expected
):
    # Keep the bomb small enough for a unit test: the rule (100x the compressed size, at least N) is the same.
    monkeypatch.setattr(core, "MIN_INFLATED_BYTES", 8 << 20)
    data = body() if callable(body) else body
    head = upload(stack, key, data)
    event = sqs_batch(s3_event(RAW, key, head))
    tracemalloc.start()
    try:
        response = app.handler(event, Context())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert response == {"batchItemFailures": []}, "bad content must never make SQS retry the message"
    outcome, _, reason = expected.partition(":")
    keys = stack.processed_keys()
    reports = [k for k in keys if k.startswith("quarantine/")]
    manifests = [k for k in keys if k.endswith("manifest.json")]
    if "processed" in outcome.split("|") and manifests:
        assert not reports and len(stack.executions()) == 1
        manifest = json.loads(stack.s3.get_object(Bucket=PROCESSED, Key=manifests[0])["Body"].read())
        assert manifest["source"]["key"] == key  # URL-decoded exactly
        counts = manifest["counts"]
        assert counts["rows_read"] == counts["rows_used"] + sum(manifest["dropped"].values())
        if case == "formula cells":
            assert any("formulas" in w for w in manifest["warnings"])
    elif "quarantined" in outcome.split("|") and reports:
        assert not manifests and stack.executions() == []
        report = json.loads(stack.s3.get_object(Bucket=PROCESSED, Key=reports[0])["Body"].read())
        assert report["reason"]
        if reason:
            assert re.search(reason, report["reason"]), report["reason"]
        (message,) = stack.notified()
        assert message["outcome"] == "quarantined" and message["reason"] == report["reason"]
    else:
        assert outcome == "ignored", f"{case}: expected {expected}, found {keys}"
        assert keys == [] and stack.executions() == []

    # The upload: same bytes, same version, same ETag, nothing added, moved or deleted.
    versions = stack.s3.list_object_versions(Bucket=RAW).get("Versions", [])
    assert [(v["Key"], v["VersionId"]) for v in versions] == [(key, head["VersionId"])]
    stored = stack.s3.get_object(Bucket=RAW, Key=key, VersionId=head["VersionId"])
    assert stored["ETag"] == head["ETag"]
    assert stored["Body"].read() == data
    # Streaming: the 50 MB line is never read whole (moto's in-process GetObject hands over one copy of the
    # stored object: the len(data) here). A block of tiny rows is the largest thing held (~55 MiB).
    assert peak < len(data) + (64 << 20), f"{case}: peak {peak / 2**20:.0f} MiB"


def test_a_spec_that_is_not_json_quarantines_the_upload(stack):
    stack.s3.put_object(Bucket=RAW, Key="datasets/d/conveyor.json", Body=b"{target: churned}")
    response, _ = deliver(stack, "datasets/d/data.csv", good_csv())
    assert response == {"batchItemFailures": []}
    (report,) = [k for k in stack.processed_keys() if k.startswith("quarantine/")]
    assert (
        "conveyor.json is not valid JSON"
        in json.loads(stack.s3.get_object(Bucket=PROCESSED, Key=report)["Body"].read())["reason"]
    )


# ------------------------------------------------------------------------------------------ replays


@pytest.fixture
def atomic_start_execution(monkeypatch):
    """AWS checks an execution name and creates the execution atomically; moto does it in two steps, so
    threads could both pass the check. Serialise moto's call so the test checks conveyor, not moto."""
    lock = threading.Lock()
    original = sfn_models.StateMachine.start_execution

    def start_execution(self, *args, **kwargs):
        with lock:
            return original(self, *args, **kwargs)

    monkeypatch.setattr(sfn_models.StateMachine, "start_execution", start_execution)


SHAPES = ["s3-via-sqs", "eventbridge", "eventbridge-via-sqs"]


def handle(shape: str, head: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """Deliver one object's event in the given shape; the per-object results."""
    body = s3_event(RAW, key, head) if shape == "s3-via-sqs" else eventbridge_event(RAW, key, head)
    if shape == "eventbridge":  # a rule targeting the function directly would pass the event itself
        return [app.process_object(ref, app.Settings.from_env()) for ref in app.objects_in_message(body)]
    response = app.handler(sqs_batch(body), Context())
    assert response == {"batchItemFailures": []}
    return []


@pytest.mark.parametrize("shape", SHAPES)
def test_replayed_and_concurrent_events_start_one_execution_per_object_version(
    stack, atomic_start_execution, shape
):
    key = "datasets/churn/churn.csv"
    head = upload(stack, key, good_csv(300))

    for _ in range(3):  # at-least-once delivery: the same event three times
        handle(shape, head, key)
    record = SQSRecord(sqs_batch(s3_event(RAW, key, head))["Records"][0])
    barrier = threading.Barrier(4)
    results: list[Any] = []

    def duplicate() -> None:
        barrier.wait()
        results.append(app.record_handler(record))

    threads = [threading.Thread(target=duplicate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 4
    executions = stack.executions()
    assert len(executions) == 1
    first_name = executions[0]["name"]

    newer = upload(stack, key, good_csv(300, seed=2))  # a new version of the same key
    assert newer["VersionId"] != head["VersionId"]
    for _ in range(2):
        handle(shape, newer, key)
    names = sorted(e["name"] for e in stack.executions())
    assert len(names) == 2 and first_name in names
    assert all(len(name) <= 80 for name in names)


def test_s3_test_events_and_empty_batches_are_acknowledged(stack):
    test_event = json.loads((EVENTS / "s3_test_event.json").read_text())
    assert app.handler(sqs_batch(test_event), Context()) == {"batchItemFailures": []}
    assert stack.executions() == [] and stack.processed_keys() == []


def test_one_bad_message_in_a_batch_fails_alone(stack):
    head = upload(stack, "datasets/churn/churn.csv", good_csv())
    event = sqs_batch(s3_event(RAW, "datasets/churn/churn.csv", head), {"not": "an event"})
    assert app.handler(event, Context()) == {"batchItemFailures": [{"itemIdentifier": "message-1"}]}
    assert len(stack.executions()) == 1


def test_no_cell_of_an_upload_reaches_the_logs(stack, caplog, capsys):
    """Uploads are customers' data: whether a file trains, is quarantined or breaks a rule, its values never
    appear in PreprocessFunction's logs (the quarantine report in S3 is where a person looks at them)."""
    secret = "CELL-4711-do-not-log"
    good = good_csv().decode().replace("basic", secret, 3).encode()
    ragged = good_csv().decode().replace("\n", f",{secret},extra\n", 5).encode()
    # A target column whose every value is the secret: one class only, so the file cannot train.
    one_class = "\n".join(["age,churned"] + [f"{i},{secret}" for i in range(50)]).encode() + b"\n"
    for key, body in (
        ("datasets/d/good.csv", good),
        ("datasets/d/ragged.csv", ragged),
        ("datasets/d/one-class.csv", one_class),
        (f"datasets/d/{secret}.bin", b"\x00\x01" + secret.encode()),
    ):
        deliver(stack, key, body)
    logged = capsys.readouterr().out + caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    messages = [record.getMessage() for record in caplog.records]
    assert messages.count("quarantined") == 3 and "pipeline started" in messages  # it did log what happened
    # The object key is the user's own name for the file, not its contents: it may be logged.
    assert secret not in logged.replace(f"datasets/d/{secret}.bin", "")
