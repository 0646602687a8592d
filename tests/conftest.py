"""Shared test setup: the Lambda code in functions/ imports as Lambda sees it (`common`, `preprocess`, ...)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FUNCTIONS = ROOT / "functions"
if str(FUNCTIONS) not in sys.path:
    sys.path.insert(0, str(FUNCTIONS))


@pytest.fixture
def event_fixture():
    def load(name: str):
        return json.loads((ROOT / "tests" / "events" / name).read_text())

    return load


class LambdaContext:
    """What the Powertools decorators read from Lambda's context object."""

    function_name = "conveyor-test"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:conveyor-test"
    aws_request_id = "req"


@pytest.fixture
def lambda_context():
    return LambdaContext()
