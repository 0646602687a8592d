"""Fault injection in local mode (issue 8): AWS APIs that throttle or fail with 5xx, a training process killed,
a model server killed, the emulator restarting between states. Whatever happens, the pipeline either
completes or fails with a clear reason and a notification; no upload is lost, no version trains twice, and
the model that was serving keeps serving.

CI runs each fault once; `make test-faults` (CONVEYOR_FAULTS=full) repeats each one ROUNDS times.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import pytest
import requests
from local_stack import Inbox, aws, signed_post, states_entered
from moto.s3 import models as s3_models
from moto.s3.exceptions import S3ClientError
from moto.sagemaker import models as sagemaker_models
from moto.sagemaker.exceptions import SagemakerClientError

pytestmark = pytest.mark.integration
ROUNDS = 3 if os.environ.get("CONVEYOR_FAULTS") == "full" else 1
INSTANCES = [{"size": 1.0, "weight": 0.5}, {"size": 2.1, "weight": 0.2}]


def dataset(seed: int, n: int = 300) -> bytes:
    rng = random.Random(seed)
    lines = ["size,weight,label"]
    for _ in range(n):
        label = rng.choice("ab")
        lines.append(f"{rng.gauss(1.0 if label == 'a' else 2.0, 0.4):.3f},{rng.random():.3f},{label}")
    return ("\n".join(lines) + "\n").encode()


def upload(outputs: dict, name: str, seed: int, spec: dict | None = None) -> None:
    s3 = aws(outputs, "s3")
    if spec is not None:
        s3.put_object(
            Bucket=outputs["RawBucketName"], Key=f"datasets/{name}/conveyor.json", Body=json.dumps(spec)
        )
    s3.put_object(Bucket=outputs["RawBucketName"], Key=f"datasets/{name}/data.csv", Body=dataset(seed))


def finished(outputs: dict, name: str, count: int, timeout: float = 300) -> list[dict]:
    """The dataset's executions once `count` of them have finished (oldest first)."""
    sfn = aws(outputs, "stepfunctions")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        executions = [
            e
            for e in sfn.list_executions(stateMachineArn=outputs["StateMachineArn"])["executions"]
            if e["name"].startswith(f"{name}-") and not e["name"].endswith("-approved")
        ]
        done = [e for e in executions if e["status"] != "RUNNING"]
        if len(done) >= count:
            return [
                sfn.describe_execution(executionArn=e["executionArn"])
                for e in sorted(done, key=lambda e: e["startDate"])
            ]
        time.sleep(0.5)
    raise AssertionError(f"{count} executions of {name} did not finish in {timeout} s")


def training_jobs(outputs: dict, name: str) -> list[str]:
    jobs = aws(outputs, "sagemaker").list_training_jobs(NameContains=f"{name}-")["TrainingJobSummaries"]
    return sorted(j["TrainingJobName"] for j in jobs)


def serving_version(outputs: dict, name: str) -> str:
    answer = signed_post(outputs, f"/models/{name}/predict", {"instances": INSTANCES})
    assert answer.status_code == 200, answer.text
    return answer.json()["model_version"]


# ---------------------------------------------------------------------------------------------- AWS APIs
class _S3InternalError(S3ClientError):
    code = 500

    def __init__(self) -> None:
        super().__init__("InternalError", "We encountered an internal error. Please try again.")


class _S3SlowDown(S3ClientError):
    code = 503

    def __init__(self) -> None:
        super().__init__("SlowDown", "Please reduce your request rate.")


class _SageMakerInternalFailure(SagemakerClientError):
    code = "InternalFailure"

    def __init__(self) -> None:
        super().__init__("We encountered an internal error. Please try again.")


@pytest.mark.filterwarnings(
    "ignore:Exception\\(_SageMakerInternalFailure\\):UserWarning"
)  # not in moto's model
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_s3_and_sagemaker_5xx_and_throttling_are_retried_and_each_version_trains_once(
    cloud, monkeypatch, round_
):
    """S3 answers PreprocessFunction's reads of the upload with 500 InternalError, then 503 SlowDown;
    SageMaker answers the pipeline's DescribeTrainingJob with 500 twice. Retries absorb both."""
    name = f"flaky-{round_}"
    failures = {"s3": [_S3InternalError, _S3SlowDown], "sagemaker": [_SageMakerInternalFailure] * 2}
    injected: list[str] = []
    lock = threading.Lock()
    get_object, describe_training_job = (
        s3_models.S3Backend.get_object,
        sagemaker_models.SageMakerModelBackend.describe_training_job,
    )

    def failing_get_object(backend, bucket_name, key_name, *args, **kwargs):
        with lock:
            if key_name.startswith(f"datasets/{name}/data") and failures["s3"]:
                injected.append(key_name)
                raise failures["s3"].pop(0)()
        return get_object(backend, bucket_name, key_name, *args, **kwargs)

    def failing_describe(backend, training_job_name, *args, **kwargs):
        with lock:
            if training_job_name.startswith(f"{name}-") and failures["sagemaker"]:
                injected.append(training_job_name)
                raise failures["sagemaker"].pop(0)()
        return describe_training_job(backend, training_job_name, *args, **kwargs)

    monkeypatch.setattr(s3_models.S3Backend, "get_object", failing_get_object)
    monkeypatch.setattr(sagemaker_models.SageMakerModelBackend, "describe_training_job", failing_describe)
    upload(cloud.outputs, name, seed=round_)
    (execution,) = finished(cloud.outputs, name, 1)

    assert execution["status"] == "SUCCEEDED", execution.get("cause")
    assert failures == {"s3": [], "sagemaker": []} and len(injected) == 4
    assert len(training_jobs(cloud.outputs, name)) == 1
    assert serving_version(cloud.outputs, name) == json.loads(execution["output"])["version"]


# ---------------------------------------------------------------------------------------------- processes
def test_a_killed_training_process_fails_with_its_reason_and_the_old_model_keeps_serving(cloud):
    outputs, name = cloud.outputs, "sturdy"
    inbox = Inbox(outputs, "sturdy-notifications")
    upload(outputs, name, seed=1)
    (first,) = finished(outputs, name, 1)
    assert first["status"] == "SUCCEEDED", first.get("cause")
    version = serving_version(outputs, name)

    for round_ in range(ROUNDS):
        # Many epochs and no early stopping: the job is still running when it is killed.
        upload(
            outputs, name, seed=100 + round_, spec={"hyperparameters": {"epochs": "5000", "patience": "5000"}}
        )
        job = wait_for_training_process(cloud, name, known=set(training_jobs(outputs, name)))
        os.killpg(job.pid, signal.SIGKILL)  # the OOM killer's signal, to the job's whole process group
        last = finished(outputs, name, 2 + round_)[-1]

        assert last["status"] == "FAILED" and last["error"] == "TrainingJobFailed"
        assert "killed by SIGKILL (exit code 137)" in last["cause"]
        entered = states_entered(aws(outputs, "stepfunctions"), last["executionArn"])
        assert not [s for s in entered if s.startswith(("Register", "Create", "Update"))]
        assert serving_version(outputs, name) == version
    notices = [m for m in inbox.messages() if m["outcome"] == "failed"]
    assert len(notices) == ROUNDS and all("SIGKILL" in n["cause"] for n in notices)
    # One training job per uploaded version: nothing retrained the killed ones.
    assert len(training_jobs(outputs, name)) == 1 + ROUNDS


def wait_for_training_process(cloud, name: str, known: set[str], timeout: float = 120):
    """The process of the dataset's new training job, once its script runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in set(training_jobs(cloud.outputs, name)) - known:
            process = cloud.training.process(job)
            if process is not None:
                return process
        time.sleep(0.1)
    raise AssertionError(f"no training process of {name} appeared in {timeout} s")


def test_a_killed_model_server_is_replaced_and_answers_again(cloud):
    outputs, name = cloud.outputs, "steady"
    upload(outputs, name, seed=2)
    (deployed,) = finished(outputs, name, 1)
    assert deployed["status"] == "SUCCEEDED", deployed.get("cause")
    version = serving_version(outputs, name)
    server = cloud.hosting.serving(f"conveyor-{name}")
    for round_ in range(ROUNDS):
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
        statuses: list[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            answer = signed_post(outputs, f"/models/{name}/predict", {"instances": INSTANCES})
            statuses.append(answer.status_code)
            if answer.status_code == 200:
                assert answer.json()["model_version"] == version
                break
            # While the instance is replaced: a clear, retryable error, never a hang or a 500.
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "ServiceUnavailable"
            time.sleep(0.3)
        assert statuses[-1] == 200, statuses
        assert server.replacements == round_ + 1


# ---------------------------------------------------------------------------------------------- the emulator
def test_the_emulator_restarting_mid_pipeline_loses_no_upload_and_trains_each_once(cloud):
    outputs, name, other = cloud.outputs, "restarts", "survivor"
    for round_ in range(ROUNDS):
        known = set(training_jobs(outputs, name))
        # Enough epochs that the job is still training while the emulator is down.
        upload(outputs, name, seed=200 + round_, spec={"hyperparameters": {"epochs": "60", "patience": "60"}})
        wait_for_training_process(cloud, name, known)
        time.sleep(1)
        # Down longer than a poll interval (1 s locally): a DescribeTrainingJob finds it gone.
        cloud.restart_emulator(down_seconds=2.5)
        upload(outputs, other, seed=300 + round_)  # the queue poller still delivers
        last = finished(outputs, name, round_ + 1)[-1]
        assert last["status"] == "SUCCEEDED", last.get("cause")
        # The outage reached the pipeline as an unavailable SageMaker (on AWS: a 503), and Retry got past it.
        history = aws(outputs, "stepfunctions").get_execution_history(
            executionArn=last["executionArn"], maxResults=1000
        )["events"]
        failures = [e["taskFailedEventDetails"] for e in history if e["type"] == "TaskFailed"]
        assert failures and all(f["error"] == "SageMaker.AmazonSageMakerException" for f in failures), (
            failures
        )
        assert any("could not be reached" in f["cause"] for f in failures)
        after = finished(outputs, other, round_ + 1)[-1]
        assert after["status"] == "SUCCEEDED", after.get("cause")
    assert len(training_jobs(outputs, name)) == ROUNDS
    assert len(training_jobs(outputs, other)) == ROUNDS
    assert requests.get(f"{outputs['EndpointUrl']}/moto-api/", timeout=10).status_code == 200
