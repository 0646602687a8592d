"""A polling loop that runs out of polls (MaxPollsPerLoop) on the local stack: the pipeline stops the job it
gave up on, fails with PollLimitExceeded and a readable cause, and tells its subscribers."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from local_stack import Inbox, aws, states_entered, wait_for_execution

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


# One poll per loop: training (seconds locally, with 1 s polls) always outlasts it.
CLOUD_PARAMETERS = {"MaxPollsPerLoop": "1"}


def rows(n=300, seed=5) -> bytes:
    rng = random.Random(seed)
    lines = ["x,y,label"] + [f"{rng.random():.4f},{rng.random():.4f},{'ab'[i % 2]}" for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def test_a_training_loop_out_of_polls_stops_the_job_fails_and_notifies(cloud):
    outputs = cloud.outputs
    s3, sfn, sagemaker = (aws(outputs, s) for s in ("s3", "stepfunctions", "sagemaker"))
    inbox = Inbox(outputs, "limit-notifications")

    s3.put_object(Bucket=outputs["RawBucketName"], Key="datasets/slow/data.csv", Body=rows())
    execution = wait_for_execution(sfn, outputs["StateMachineArn"], "slow-", timeout=180)

    assert execution["status"] == "FAILED"
    assert execution["error"] == "PollLimitExceeded"
    job_name = json.loads(execution["input"])["names"]["training_job"]
    assert job_name in execution["cause"] and "InProgress after 1 polls" in execution["cause"]
    entered = states_entered(sfn, execution["executionArn"])
    assert (
        entered.index("TrainingPollLimitReached")
        < entered.index("StopTrainingJob")
        < entered.index("NotifyFailed")
    )
    assert "Evaluate" not in entered

    deadline = time.monotonic() + 30
    while (
        status := sagemaker.describe_training_job(TrainingJobName=job_name)["TrainingJobStatus"]
    ) != "Stopped":
        assert status in ("InProgress", "Stopping") and time.monotonic() < deadline, status
        time.sleep(0.5)
    (notice,) = inbox.messages()
    assert notice["outcome"] == "failed" and notice["error"] == "PollLimitExceeded"
