"""Uploads too big for Lambda: the SageMaker Processing entry point run as its container runs it, the
execution input that hands a file to it, and the state machine branch that runs it."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from common import aws
from common.config import Settings
from common.errors import DatasetRejected
from common.naming import ResourceNames, processing_job_name
from preprocess import app
from preprocess.core import DatasetSpec
from preprocess.processing import EXIT_MESSAGE_BYTES, exit_message, quarantine_report

ROOT = Path(__file__).resolve().parents[2]
ASL = json.loads((ROOT / "infra/statemachine/pipeline.asl.json").read_text())
SETTINGS = Settings(
    stack_name="conveyor",
    processed_bucket="processed",
    artifacts_bucket="artifacts",
    state_machine_arn="arn:aws:states:us-east-1:123456789012:stateMachine:conveyor-Pipeline",
)


def churn_csv(rows: int = 400, seed: int = 3) -> bytes:
    rng = random.Random(seed)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["age", "plan", "minutes", "churn"])
    for _ in range(rows):
        plan = rng.choice(["basic", "pro"])
        minutes = round(rng.gauss(300 if plan == "pro" else 120, 40), 1)
        writer.writerow([rng.randint(18, 90), plan, minutes, "yes" if minutes < 150 else "no"])
    return out.getvalue().encode()


def processing_request() -> dict[str, Any]:
    """StartProcessingJob's parameters with the output and cluster configurations ProcessingJobEncryption
    builds filled in (the variants without a key; which one is sent does not change a path)."""
    params = dict(ASL["States"]["StartProcessingJob"]["Parameters"])
    variants = ASL["States"]["ProcessingJobEncryption"]["Parameters"]
    del params["ProcessingOutputConfig.$"]
    params["ProcessingOutputConfig"] = variants["processing_output_configs"][0]
    params["ProcessingResources"] = {"ClusterConfig": variants["processing_clusters"][0]}
    return params


def job_root(tmp_path: Path, key: str, data: bytes, spec: dict[str, Any] | None = None, size=None) -> Path:
    """An /opt/ml as SageMaker Processing lays it out for the job the pipeline starts."""
    opt_ml = tmp_path / "opt" / "ml"
    request = json.loads(json.dumps(processing_request()).replace("/opt/ml", str(opt_ml)))
    config = opt_ml / "config"
    config.mkdir(parents=True)
    (config / "processingjobconfig.json").write_text(json.dumps(request))
    inputs = {i["InputName"]: Path(i["S3Input"]["LocalPath"]) for i in request["ProcessingInputs"]}
    inputs["dataset"].mkdir(parents=True)
    (inputs["dataset"] / Path(key).name).write_bytes(data)
    inputs["job"].mkdir(parents=True)
    source = {"bucket": "raw", "key": key, "version_id": "v1", "etag": '"e"', "size": size or len(data)}
    document = {
        "dataset": "churn",
        "version": "20261122T175500Z-1a2b3c",
        "source": source,
        "spec": spec or {},
    }
    (inputs["job"] / "job.json").write_text(json.dumps(document))
    return opt_ml


def run_job(opt_ml: Path) -> tuple[int, dict[str, Any], str]:
    """`python3 -m preprocess.processing` with the environment the pipeline gives the container."""
    start = ASL["States"]["StartProcessingJob"]["Parameters"]
    env = {
        k: v.replace("/opt/ml/processing/input/code", str(ROOT / "functions"))
        for k, v in start["Environment"].items()
    }
    process = subprocess.run(
        [sys.executable, *start["AppSpecification"]["ContainerEntrypoint"][1:]],
        env={**os.environ, **env, "CONVEYOR_OPT_ML": str(opt_ml)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    message = (opt_ml / "output" / "message").read_text()
    assert len(message.encode()) <= EXIT_MESSAGE_BYTES
    return process.returncode, json.loads(message), process.stdout + process.stderr


def files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("key", "encode"),
    [
        ("datasets/churn/big.csv", lambda data: data),
        ("datasets/churn/big.csv.gz", gzip.compress),
    ],
)
def test_a_good_file_becomes_the_processed_layout_and_a_processed_exit_message(tmp_path, key, encode):
    data = encode(churn_csv())
    opt_ml = job_root(tmp_path, key, data, spec={"target": "churn", "threshold": 0.6})
    returncode, message, output = run_job(opt_ml)
    assert returncode == 0, output
    processed = opt_ml / "processing/output/processed"
    assert files_under(processed) == {
        "manifest.json",
        "train/part-00000.csv",
        "validation/part-00000.csv",
        "test/part-00000.csv",
    }
    assert files_under(opt_ml / "processing/output/quarantine") == set()
    manifest = json.loads((processed / "manifest.json").read_text())
    assert manifest["dataset"] == "churn" and manifest["version"] == "20261122T175500Z-1a2b3c"
    assert manifest["source"]["key"] == key and manifest["source"]["version_id"] == "v1"
    assert manifest["target"] == "churn" and manifest["task"] == "classification"
    rows = sum(
        len((processed / split / "part-00000.csv").read_text().splitlines()) - 1
        for split in ("train", "validation", "test")
    )
    assert rows == manifest["counts"]["rows_used"] > 300
    assert message == {
        "outcome": "processed",
        "task": "classification",
        "target": "churn",
        "rows_used": manifest["counts"]["rows_used"],
        "manifest": "manifest.json",
    }


def test_a_rejected_file_leaves_only_a_quarantine_report_and_still_succeeds(tmp_path):
    single_class = b"a,b,label\n" + b"".join(f"{i},{i % 7},same\n".encode() for i in range(300))
    opt_ml = job_root(tmp_path, "datasets/churn/one-class.csv", single_class)
    returncode, message, output = run_job(opt_ml)
    assert returncode == 0, output
    assert files_under(opt_ml / "processing/output/processed") == set()
    report = json.loads((opt_ml / "processing/output/quarantine/report.json").read_text())
    assert message["outcome"] == "quarantined"
    assert message["reason"] == report["reason"] != ""
    assert message["report"] == "report.json"
    assert report["source"]["key"] == "datasets/churn/one-class.csv"
    assert report["dataset"] == "churn" and report["what_to_do"]


def test_an_overwritten_object_fails_the_job_with_the_reason(tmp_path):
    opt_ml = job_root(tmp_path, "datasets/churn/big.csv", churn_csv(), size=10)
    returncode, message, _ = run_job(opt_ml)
    assert returncode == 1
    assert message["outcome"] == "failed" and "overwritten" in message["reason"]
    assert files_under(opt_ml / "processing/output/processed") == set()


def test_exit_messages_stay_json_within_one_kilobyte():
    long = {"outcome": "quarantined", "reason": "é" * 5000, "report": "report.json"}
    text = exit_message(long)
    assert len(text.encode()) <= EXIT_MESSAGE_BYTES
    document = json.loads(text)
    assert document["outcome"] == "quarantined" and document["reason"].endswith("…")


def test_quarantine_reports_have_the_shape_the_lambda_writes():
    class Recorder:
        def __init__(self):
            self.puts = []

        def put_object(self, **params):
            self.puts.append(params)

    recorder = Recorder()
    aws.set_client("s3", recorder)
    provenance = {
        "dataset": "churn",
        "version": "v",
        "source": {"bucket": "raw", "key": "datasets/churn/x.csv"},
    }
    rejected = DatasetRejected("the file is empty", line=1)
    try:
        app._quarantine(rejected, provenance, SETTINGS)
    finally:
        aws.reset_clients()
    (put,) = recorder.puts
    assert put["Key"] == "quarantine/churn/v/report.json"
    assert json.loads(put["Body"]) == json.loads(json.dumps(quarantine_report(rejected, provenance)))


def provenance_of(key: str, size: int) -> dict[str, Any]:
    source = {"bucket": "raw", "key": key, "version_id": "v1", "etag": '"e"', "size": size}
    return {"dataset": "churn", "version": "20261122T175500Z-1a2b3c", "source": source}


def test_the_processing_execution_input_trains_like_the_lambdas_and_leaves_inference_to_the_job():
    spec = DatasetSpec(threshold=0.7, hyperparameters={"epochs": 5})
    provenance = provenance_of("datasets/churn/big.csv.gz", 3 * 2**30)
    given = app.processing_execution_input(spec, provenance, SETTINGS)
    manifest = {**provenance, "task": "classification", "target": "churn"}
    usual = app._execution_input(manifest, spec, SETTINGS)
    for key in ("dataset", "version", "source", "data", "names", "training"):
        assert given[key] == usual[key], key
    assert given["task"] is None and given["target"] is None
    # Evaluate takes the metric from evaluation.json when the spec names none (evaluate/core.py gate()).
    assert given["gate"] == {"metric": None, "threshold": 0.7, "margin": 0.0, "approval": "auto"}
    job = given["preprocessing"]
    assert job["mode"] == "processing"
    assert job["job_name"] == "conveyor-churn-20261122T175500Z-1a2b3c"
    assert job["input"] == "s3://raw/datasets/churn/big.csv.gz"
    assert job["source"]["version_id"] == "v1"
    assert DatasetSpec.from_json(job["spec"]) == spec
    assert job["code"] == "s3://artifacts/code/preprocessing/"
    assert job["job_document"] == "s3://artifacts/preprocessing/churn/20261122T175500Z-1a2b3c/job.json"
    assert job["output"] == {
        "processed": "s3://processed/churn/20261122T175500Z-1a2b3c/",
        "quarantine": "s3://processed/quarantine/churn/20261122T175500Z-1a2b3c/",
    }
    # The volume holds the upload and everything it may inflate to.
    assert job["volume_size_gb"] > 3 * 100


def test_the_execution_input_says_where_training_runs_and_launches_it_with_torchrun():
    settings = Settings(
        artifacts_bucket="artifacts",
        processed_bucket="processed",
        training_instance_type="ml.g5.xlarge",
        stack_key_arn="arn:aws:kms:us-east-1:123456789012:key/k",
    )
    manifest = {**provenance_of("datasets/churn/c.csv", 100), "task": "classification", "target": "churn"}
    default = app._execution_input(manifest, DatasetSpec(), settings)["training"]
    assert default["hyperparameters"]["sagemaker_torch_distributed_enabled"] == "true"
    assert default["resources"] == {
        "instance_type": "ml.g5.xlarge",
        "instance_count": 1,
        "spot": True,
        "max_wait_seconds": 7200,
        "volume_key_index": 0,  # local NVMe: SageMaker refuses a volume key
        "stopping_condition_index": 1,
    }
    spec = DatasetSpec.from_json(
        {"training": {"instance_type": "ml.p3.8xlarge", "instance_count": 2, "spot": False}}
    )
    chosen = app._execution_input(manifest, spec, settings)["training"]["resources"]
    assert chosen == {
        "instance_type": "ml.p3.8xlarge",
        "instance_count": 2,
        "spot": False,
        "max_wait_seconds": 7200,
        "volume_key_index": 1,
        "stopping_condition_index": 0,
    }
    with pytest.raises(DatasetRejected, match=r"conveyor\.json: training has unknown keys: gpus"):
        DatasetSpec.from_json({"training": {"gpus": 8}})


def test_only_uploads_above_the_threshold_leave_lambda():
    settings = Settings(lambda_preprocess_max_bytes=1000)
    assert not app.too_big_for_lambda(1000, settings)
    assert app.too_big_for_lambda(1001, settings)
    assert not app.too_big_for_lambda(None, settings)
    assert Settings.from_env({"LAMBDA_PREPROCESS_MAX_BYTES": "42"}).lambda_preprocess_max_bytes == 42


@pytest.mark.parametrize("stack", ["conveyor", "a-very-long-stack-name-for-a-team-that-likes-names"])
def test_processing_job_names_fit_sagemaker_and_the_iam_scope(stack):
    version = "20261122T175500Z-1a2b3c"
    name = processing_job_name(stack, "x" * 40, version)
    assert len(name) <= 63 and name.endswith("-" + version)
    assert name.startswith(stack[:30])
    assert ResourceNames.for_version(stack, "churn", version).training_job != processing_job_name(
        stack, "churn", version
    )


# ---------------------------------------------------------------- the state machine branch
def states():
    return ASL["States"]


def test_the_pipeline_runs_the_processing_job_only_when_the_input_asks_for_it():
    approved = states()[states()["Configure"]["Next"]]
    # A refused base model fails at once; an execution that deploys an approved package has trained
    # already; every other one goes on.
    assert [c["Variable"] for c in approved["Choices"]] == ["$.refused", "$.approved"]
    assert approved["Default"] == "PreprocessingJob?"
    choice = states()["PreprocessingJob?"]
    assert choice["Type"] == "Choice"
    absent, processing = choice["Choices"]
    # A Lambda-preprocessed input has no preprocessing block: checked first, so no path is missing.
    assert absent == {"Variable": "$.preprocessing.mode", "IsPresent": False, "Next": "TrainingJobEncryption"}
    assert processing["StringEquals"] == "processing" and processing["Next"] == "ProcessingJobEncryption"
    assert choice["Default"] == "TrainingJobEncryption"
    assert states()["ProcessingJobEncryption"]["Next"] == "StartProcessingJob"


def test_the_processing_job_reads_the_upload_sharded_and_writes_the_contract_layout():
    params = processing_request()
    assert (
        states()["StartProcessingJob"]["Resource"] == "arn:aws:states:::aws-sdk:sagemaker:createProcessingJob"
    )
    inputs = {i["InputName"]: i["S3Input"] for i in params["ProcessingInputs"]}
    assert inputs["dataset"]["S3DataDistributionType"] == "ShardedByS3Key"
    assert {i["S3InputMode"] for i in inputs.values()} == {"File"}
    assert inputs["dataset"]["S3Uri.$"] == "$.preprocessing.input"
    assert inputs["code"]["LocalPath"] == params["Environment"]["PYTHONPATH"]
    assert params["AppSpecification"]["ContainerEntrypoint"] == ["python3", "-m", "preprocess.processing"]
    outputs = {o["OutputName"]: o["S3Output"] for o in params["ProcessingOutputConfig"]["Outputs"]}
    assert outputs["processed"]["S3Uri.$"] == "$.preprocessing.output.processed"
    assert outputs["quarantine"]["S3Uri.$"] == "$.preprocessing.output.quarantine"
    for path in (*inputs.values(), *outputs.values()):
        assert path["LocalPath"].startswith("/opt/ml/processing/")


def test_processing_polls_like_training_and_every_outcome_has_a_way_out():
    assert states()["StartProcessingJob"]["Next"] == "WaitForProcessing"
    assert states()["WaitForProcessing"]["Next"] == "DescribeProcessingJob"
    finished = states()[states()["DescribeProcessingJob"]["Next"]]
    routes = {c["StringEquals"]: c["Next"] for c in finished["Choices"] if "StringEquals" in c}
    assert states()[finished["Default"]]["Next"] == "WaitForProcessing"  # through the poll counter
    assert set(routes) == {"Completed", "Failed", "Stopped"}
    outcome = states()[states()[routes["Completed"]]["Next"]]
    by_outcome = {c["StringEquals"]: c["Next"] for c in outcome["Choices"]}
    assert by_outcome["processed"] == "TrainingJobEncryption"
    assert states()["TrainingJobEncryption"]["Next"] == "StartTrainingJob"
    # A quarantined upload: a notification, and nothing trains.
    path, name = [], by_outcome["quarantined"]
    while "Next" in states()[name]:
        path.append(name)
        name = states()[name]["Next"]
    assert "StartTrainingJob" not in path and states()[name]["Type"] == "Succeed"
    assert any(states()[n].get("Resource") == "arn:aws:states:::sns:publish" for n in path)
    for failure in (routes["Failed"], routes["Stopped"], outcome["Default"]):
        assert states()[failure]["Next"] == "SummarizeFailure"


def test_no_state_reads_the_task_or_target_that_only_preprocessing_knows():
    # gate.approval comes from conveyor.json, which the Lambda reads before any Processing job.
    text = json.dumps(ASL).replace('"$.gate.approval"', "")
    assert '"$.task' not in text and '"$.target' not in text and "$.gate" not in text


def test_moto_still_has_what_the_processing_adapter_replaces():
    """Fails loudly when a moto upgrade changes the processing-job emulation (docs/local-mode.md)."""
    import inspect

    from moto.sagemaker.models import FakeProcessingJob, SageMakerModelBackend
    from moto.sagemaker.responses import SageMakerResponse

    assert hasattr(SageMakerResponse, "create_processing_job")
    for name in ("describe_processing_job", "stop_processing_job"):
        assert hasattr(SageMakerModelBackend, name), name
    assert "processing_job_status" in FakeProcessingJob.__init__.__code__.co_names
    handler = inspect.getsource(SageMakerResponse.create_processing_job)
    assert '"Environment"' not in handler and '"ProcessingResources"' not in handler, (
        "moto now keeps Environment/ProcessingResources: the adapter may hook the backend instead"
    )


def test_publish_code_puts_the_preprocessing_packages_where_the_job_reads_them_and_nothing_stale():
    import boto3
    from moto import mock_aws

    from conveyor.local.sourcedir import publish_preprocessing_code

    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="artifacts")
        s3.put_object(Bucket="artifacts", Key="code/preprocessing/preprocess/removed.py", Body=b"")
        uri = publish_preprocessing_code(s3, "artifacts", ROOT)
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="artifacts")["Contents"]}
    assert uri == "s3://artifacts/code/preprocessing/"
    expected = {
        "code/preprocessing/" + p.relative_to(ROOT / "functions").as_posix()
        for package in ("common", "preprocess")
        for p in (ROOT / "functions" / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert keys == expected
    assert {"code/preprocessing/preprocess/processing.py", "code/preprocessing/common/errors.py"} <= keys
