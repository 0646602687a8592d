"""template.yaml, the ASL file and local mode agree; the definition keeps to what runs in both places."""

import ast
import json
import re
from pathlib import Path

from conveyor.client import OUTPUT_KEYS
from conveyor.local.template import Stack

ROOT = Path(__file__).resolve().parents[2]
ASL = json.loads((ROOT / "infra/statemachine/pipeline.asl.json").read_text())
STACK = Stack(ROOT)


def tasks():
    return {name: state for name, state in ASL["States"].items() if state["Type"] == "Task"}


def test_every_substitution_is_defined_by_the_template_and_used():
    text = (ROOT / "infra/statemachine/pipeline.asl.json").read_text()
    used = set(re.findall(r"\$\{([^}]+)\}", text))
    defined = set(STACK.resources["Pipeline"].properties["DefinitionSubstitutions"])
    assert used == defined
    json.loads(STACK.state_machine_definition("Pipeline"))


def test_no_sync_integrations_jsonata_or_variables():
    for name, state in tasks().items():
        assert not state["Resource"].endswith((".sync", ".sync:2", ".waitForTaskToken")), name
    text = json.dumps(ASL)
    assert "JSONata" not in text and '"Assign"' not in text


def asl_problems(definition: dict) -> list[str]:
    """The rules every state machine definition of conveyor keeps, as readable problems (none: it keeps them).

    - Every Task has TimeoutSeconds, Retry and Catch; SageMaker calls retry throttling and
      ResourceLimitExceeded with exponential backoff.
    - Every polling loop (a cycle of states) is bounded: a Pass in it counts polls with States.MathAdd, and a
      Choice in it leaves the loop when that count reaches a limit.
    """
    states = definition["States"]
    problems = []
    for name, state in states.items():
        if state["Type"] != "Task":
            continue
        for key in ("TimeoutSeconds", "Retry", "Catch"):
            if not state.get(key):
                problems.append(f"{name}: no {key}")
        if ":sagemaker:" in state.get("Resource", ""):
            retried = {error for rule in state.get("Retry", []) for error in rule["ErrorEquals"]}
            backoff = all(rule.get("BackoffRate", 1) > 1 for rule in state.get("Retry", []))
            for needed in ("SageMaker.ThrottlingException", "SageMaker.ResourceLimitExceededException"):
                if needed not in retried:
                    problems.append(f"{name}: does not retry {needed}")
            if not backoff:
                problems.append(f"{name}: retries without exponential backoff")
    for loop in _cycles(states):
        counted = {
            state["ResultPath"] + ".count"
            for name in loop
            if (state := states[name])["Type"] == "Pass"
            for value in state.get("Parameters", {}).values()
            if isinstance(value, str)
            and value.startswith("States.MathAdd(")
            and state.get("ResultPath")
            and value == f"States.MathAdd({state['ResultPath']}.count, 1)"
        }
        exits = {
            rule["Variable"]
            for name in loop
            if states[name]["Type"] == "Choice"
            for rule in states[name]["Choices"]
            if rule.get("Next") not in loop and any(k.startswith("NumericGreaterThan") for k in rule)
        }
        if not counted & exits:
            problems.append(
                f"polling loop {sorted(loop)} has no bound (a counted poll and a Choice leaving at a limit)"
            )
    return problems


def _cycles(states: dict) -> list[set[str]]:
    """The strongly connected parts of the Next/Default/Choices graph that hold a cycle (Tarjan)."""
    edges = {
        name: [state[k] for k in ("Next", "Default") if k in state]
        + [c["Next"] for c in state.get("Choices", [])]
        for name, state in states.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for target in edges[name]:
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            part = set()
            while True:
                member = stack.pop()
                part.add(member)
                if member == name:
                    break
            if len(part) > 1 or name in edges[name]:
                found.append(part)

    for name in states:
        if name not in index:
            visit(name)
    return found


def test_the_pipeline_keeps_the_asl_rules():
    assert asl_problems(ASL) == []
    assert len(_cycles(ASL["States"])) == 3  # processing, training and endpoint polling


def test_every_state_is_explained_for_operators():
    text = (ROOT / "docs" / "pipeline.md").read_text()
    missing = [name for name in ASL["States"] if f"`{name}`" not in text]
    assert missing == [], f"docs/pipeline.md does not explain {missing}"


def test_the_asl_rules_catch_a_missing_timeout_retry_catch_or_loop_bound():
    broken = json.loads(json.dumps(ASL))
    states = broken["States"]
    del states["StartTrainingJob"]["TimeoutSeconds"]
    states["DescribeEndpoint"]["Retry"] = [{"ErrorEquals": ["States.ALL"], "MaxAttempts": 3}]
    del states["CreateModel"]["Catch"]
    states["TrainingFinished?"]["Default"] = "WaitForTraining"  # the poll counter bypassed
    problems = asl_problems(broken)
    assert "StartTrainingJob: no TimeoutSeconds" in problems
    assert "CreateModel: no Catch" in problems
    assert "DescribeEndpoint: does not retry SageMaker.ThrottlingException" in problems
    assert "DescribeEndpoint: retries without exponential backoff" in problems
    assert any(p.startswith("polling loop") and "WaitForTraining" in p for p in problems)
    assert len(problems) == 6  # ...and DescribeEndpoint's ResourceLimitExceeded


def test_every_state_is_reachable_and_every_next_exists():
    states = ASL["States"]
    edges = {name: set() for name in states}
    for name, state in states.items():
        for key in ("Next", "Default"):
            if key in state:
                edges[name].add(state[key])
        for choice in state.get("Choices", []):
            edges[name].add(choice["Next"])
        for catch in state.get("Catch", []):
            edges[name].add(catch["Next"])
    for targets in edges.values():
        assert targets <= set(states)
    seen, todo = set(), [ASL["StartAt"]]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(edges[name])
    assert seen == set(states)


def test_outputs_are_the_ones_clients_read():
    outputs = STACK.template["Outputs"]
    assert {name for name, spec in outputs.items() if "Condition" not in spec} == set(OUTPUT_KEYS)
    # Outputs of optional parts are not required: AppApiUrl exists with JwtIssuer only.
    assert {name for name, spec in outputs.items() if "Condition" in spec} == {"AppApiUrl"}


def test_function_environment_matches_the_settings_the_code_reads():
    from common.config import Settings

    known = {name.upper() for name in Settings.__dataclass_fields__}
    for function in STACK.of_type("AWS::Serverless::Function"):
        for variable in STACK.function_environment(function.logical_id):
            if variable.startswith("POWERTOOLS_"):
                continue
            assert variable in known, f"{function.logical_id} sets {variable}, which no code reads"


def test_every_handler_and_code_uri_exists():
    for function in STACK.of_type("AWS::Serverless::Function"):
        props = function.properties
        module, _, attribute = props["Handler"].rpartition(".")
        path = ROOT / props["CodeUri"] / (module.replace(".", "/") + ".py")
        assert path.exists(), path
        tree = ast.parse(path.read_text())
        assert attribute in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_lambda_packages_never_carry_torch_or_sagemaker():
    requirements = (ROOT / "functions/requirements.txt").read_text().lower()
    lines = [line.split("#")[0].strip() for line in requirements.splitlines()]
    assert not [line for line in lines if re.match(r"^(torch|sagemaker|numpy|pandas)\b", line)]
    for path in (ROOT / "functions").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            for name in names:
                assert name.split(".")[0] not in {"torch", "sagemaker", "conveyor", "moto"}, (path, name)


def test_the_ingest_queue_outlives_the_function_and_has_a_dlq():
    props = STACK.resources["IngestQueue"].properties
    timeout = STACK.resources["PreprocessFunction"].properties["Timeout"]
    assert props["VisibilityTimeout"] >= 6 * timeout
    assert props["RedrivePolicy"]["maxReceiveCount"] >= 2


def test_the_api_requires_iam_auth():
    auth = STACK.resources["HttpApi"].properties["Auth"]
    assert auth["DefaultAuthorizer"] == "AWS_IAM"


def test_moto_still_has_the_hooks_local_mode_patches():
    """Fails loudly when a moto upgrade moves what the adapters replace (docs/local-mode.md)."""
    from moto.awslambda.models import LambdaFunction
    from moto.sagemaker.models import FakeEndpoint, FakeTrainingJob, SageMakerModelBackend
    from moto.sagemakerruntime.responses import SageMakerRuntimeResponse

    assert hasattr(LambdaFunction, "_invoke_lambda")
    from moto.stepfunctions.parser.backend.execution import BaseExecutionWorkerCommunication

    assert hasattr(BaseExecutionWorkerCommunication, "terminated")
    for name in ("create_model_package", "update_model_package"):
        assert hasattr(SageMakerModelBackend, name), name
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import (
        state_task_service_aws_sdk as aws_sdk,
    )
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service import (
        StateTaskService,
    )

    assert isinstance(StateTaskService._SERVICE_NAME_SFN_TO_BOTO_OVERRIDES, dict)
    assert isinstance(aws_sdk._SERVICE_ERROR_NAMES, dict)
    assert isinstance(aws_sdk.StateTaskServiceAwsSdk.__dict__["_normalise_exception_name"], staticmethod)
    for name in (
        "create_training_job",
        "describe_training_job",
        "create_endpoint",
        "describe_endpoint_config",
        "describe_model",
    ):
        assert hasattr(SageMakerModelBackend, name), name
    assert hasattr(SageMakerRuntimeResponse, "invoke_endpoint")
    assert "training_job_status" in FakeTrainingJob.__init__.__code__.co_names
    assert "endpoint_status" in FakeEndpoint.__init__.__code__.co_names
    assert not hasattr(SageMakerModelBackend, "update_endpoint"), (
        "moto now has UpdateEndpoint: revisit the adapter"
    )


def test_app_clients_get_the_same_routes_behind_a_jwt_authorizer_only_when_an_issuer_is_given():
    assert "AppApi" not in Stack(ROOT).resources and "AppApiUrl" not in Stack(ROOT).outputs()
    issuer = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Example"
    stack = Stack(ROOT, parameters={"JwtIssuer": issuer, "JwtAudience": "client-a,client-b"})
    iam_routes = {
        (event["Properties"]["Method"].lower(), event["Properties"]["Path"])
        for event in stack.resources["InferenceProxyFunction"].properties["Events"].values()
        if event["Type"] == "HttpApi"
    }
    body = stack.resolve(stack.resources["AppApi"].properties["DefinitionBody"])
    jwt_routes = {(method, path) for path, operations in body["paths"].items() for method in operations}
    assert jwt_routes == iam_routes
    for operations in body["paths"].values():
        for operation in operations.values():
            assert operation["security"] == [{"AppClients": []}]
            integration = operation["x-amazon-apigateway-integration"]
            assert integration["type"] == "aws_proxy" and integration["payloadFormatVersion"] == "2.0"
            assert "function:conveyor-InferenceProxyFunction/invocations" in integration["uri"]
    authorizer = body["components"]["securitySchemes"]["AppClients"]["x-amazon-apigateway-authorizer"]
    assert authorizer["jwtConfiguration"] == {"issuer": issuer, "audience": "client-a,client-b"}
    permission = stack.resolve(stack.resources["AppApiInvokesProxy"].properties)
    assert permission["Principal"] == "apigateway.amazonaws.com" and permission["SourceArn"].endswith(
        ":local/*"
    )
    assert stack.outputs()["AppApiUrl"].startswith("https://")


def test_every_handler_logs_traces_and_flushes_metrics_with_powertools():
    for function in STACK.of_type("AWS::Serverless::Function"):
        module, _, name = function.properties["Handler"].rpartition(".")
        path = ROOT / "functions" / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        (handler,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name]
        decorators = {ast.unparse(d).split("(")[0] for d in handler.decorator_list}
        assert {
            "logger.inject_lambda_context",
            "tracer.capture_lambda_handler",
            "metrics.log_metrics",
        } <= decorators, f"{function.logical_id}: {path.name} handler is missing Powertools decorators"


def test_the_deep_learning_container_images_come_from_each_regions_registry():
    # The accounts are the SageMaker SDK's (scripts/image_uris.py --check in make lint-infra); 763104351884
    # is most regions' but not all: an opt-in or China region pulls from its own.
    mapping = STACK.template["Mappings"]["DeepLearningContainers"]
    assert all(re.fullmatch(r"\d{12}", entry["Account"]) for entry in mapping.values())
    assert mapping["us-east-1"]["Account"] == "763104351884"
    assert mapping["ap-east-1"]["Account"] != "763104351884"
    substitutions = STACK.resources["Pipeline"].properties["DefinitionSubstitutions"]
    images = {
        name: STACK.resolve(substitutions[name])
        for name in ("TrainingImage", "ProcessingImage", "InferenceImage")
    }
    assert images == {
        "TrainingImage": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.5.1-gpu-py311",
        "ProcessingImage": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.5.1-cpu-py311",
        "InferenceImage": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.5.1-cpu-py311",
    }


def test_a_gpu_endpoint_instance_type_gets_the_gpu_inference_image():
    """The pretrained recipe's model server uses the GPU when there is one; the image has to bring CUDA."""
    for instance_type, build in (
        ("ml.g5.xlarge", "gpu"),
        ("ml.p4d.24xlarge", "gpu"),
        ("ml.c5.xlarge", "cpu"),
    ):
        stack = Stack(ROOT, parameters={"InferenceInstanceType": instance_type})
        image = stack.resolve(
            stack.resources["Pipeline"].properties["DefinitionSubstitutions"]["InferenceImage"]
        )
        assert image == f"763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.5.1-{build}-py311"
