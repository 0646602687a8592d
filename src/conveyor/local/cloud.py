"""The embedded local cloud: moto in server mode, conveyor's adapters, and the stack from template.yaml.

`LocalCloud(root).start()` gives the same stack outputs a `sam deploy` would (plus what a client needs to
reach the emulator); `stop()` ends every child process and thread it started.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import requests
from botocore.config import Config
from moto.server import ThreadedMotoServer

from conveyor.local.events import RULE_EVENT_TYPES, EventBridgeBus
from conveyor.local.hosting import HostingAdapter, free_port
from conveyor.local.lambdas import FunctionSpec, LambdaRuntime, SqsEventSource
from conveyor.local.processing import ProcessingAdapter
from conveyor.local.sourcedir import publish_preprocessing_code, publish_training_code
from conveyor.local.stepfunctions import StepFunctionsAdapter
from conveyor.local.template import Stack
from conveyor.local.training import TrainingAdapter

log = logging.getLogger("localcloud")
# Template parameters that make sense on a laptop: no GPU instance is involved, and polling every
# minute would make the demo take an hour.
LOCAL_PARAMETERS = {
    "PollIntervalSeconds": "1",
    "TrainingInstanceType": "ml.m5.xlarge",
    # A model update bakes for seconds, not the ten minutes an account would want.
    "DeploymentWaitSeconds": "4",
    "TerminationWaitSeconds": "2",
}


# The AWS::CloudWatch::Alarm properties that are PutMetricAlarm parameters of the same name.
ALARM_PROPERTIES = (
    "AlarmDescription",
    "Namespace",
    "MetricName",
    "Dimensions",
    "Statistic",
    "Period",
    "EvaluationPeriods",
    "Threshold",
    "ComparisonOperator",
    "TreatMissingData",
    "AlarmActions",
)


class LocalCloudError(RuntimeError):
    """The local stack cannot start; the message says what to change."""


def _require_free(port: int, what: str, option: str) -> None:
    # moto's server reports a taken port from its own thread and start() would wait forever.
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise LocalCloudError(
                f"port {port} ({what}) is in use: stop what holds it, or pass {option} with another port "
                "(0 picks a free one)"
            ) from None


def project_root() -> Path:
    """The checkout holding template.yaml (local mode runs from the source tree)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "template.yaml").exists() and (parent / "functions").is_dir():
            return parent
    raise FileNotFoundError("cannot find template.yaml above " + str(here))


def make_functions_importable(root: Path | None = None) -> None:
    """Let the CLI reuse contracts the Lambda code owns (`common.naming`) instead of restating them."""
    functions = str((root or project_root()) / "functions")
    if functions not in sys.path:
        sys.path.append(functions)


class LocalCloud:
    """conveyor's stack on one machine.

    Parameters
    ----------
    root
        The project checkout (template.yaml, functions/, training/, infra/).
    port
        Port of the AWS endpoint (moto server); 0 picks a free one.
    api_port
        Port of the HTTPS API; 0 picks a free one.
    workdir
        Where jobs, endpoints and certificates keep their files; a temporary directory by default.
    parameters
        Template parameter values, over local mode's own defaults.
    lambda_environment
        Extra environment for every function, beneath what the template sets (e.g. to quiet Powertools).
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        port: int = 0,
        api_port: int = 0,
        workdir: Path | None = None,
        stack_name: str = "conveyor",
        parameters: dict[str, str] | None = None,
        lambda_environment: dict[str, str] | None = None,
    ) -> None:
        self.root = root or project_root()
        self.port = port or free_port()
        self.api_port = api_port
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="conveyor-local-"))
        self.stack = Stack(self.root, stack_name, {**LOCAL_PARAMETERS, **(parameters or {})})
        self._lambda_environment = {
            # X-Ray has no local daemon; Powertools' tracer is a no-op when told so.
            "POWERTOOLS_TRACE_DISABLED": "true",
            **(lambda_environment or {}),
        }
        self.credentials = ("AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30))
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None
        self._saved_env: dict[str, str | None] = {}
        self.runtime: LambdaRuntime | None = None
        self.events: EventBridgeBus | None = None
        self.training = TrainingAdapter(self.client_factory("s3"), self.workdir)
        self.processing = ProcessingAdapter(self.client_factory("s3"), self.workdir)
        self.hosting = HostingAdapter(self.client_factory("s3"), self.workdir)
        self.stepfunctions = StepFunctionsAdapter()
        self._pollers: list[SqsEventSource] = []
        self.gateway: Any = None
        self.app_gateway: Any = None  # AppApi (JwtIssuer set): the same routes behind a JWT authorizer
        self.outputs: dict[str, str] = {}

    # ------------------------------------------------------------------ clients
    def session(self) -> boto3.session.Session:
        return boto3.session.Session(
            aws_access_key_id=self.credentials[0],
            aws_secret_access_key=self.credentials[1],
            region_name=self.stack.region,
        )

    def client(self, service: str) -> Any:
        # Patient, as SageMaker's own agents are with S3: a job's uploads survive an endpoint that is down
        # for a few seconds (up to about 20 s of backoff in all).
        return self.session().client(
            service,
            endpoint_url=self.endpoint_url,
            config=Config(retries={"mode": "standard", "max_attempts": 10}),
        )

    def client_factory(self, service: str) -> Any:
        return lambda: self.client(service)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> dict[str, str]:
        """Start the emulator and the adapters, create the stack's resources; return the outputs."""
        _require_free(self.port, "the AWS endpoint", "--port")
        if self.api_port:
            _require_free(self.api_port, "the HTTPS API", "--api-port")
        self._set_environment()
        # The functions' clients are cached per process (as in a Lambda container); drop any that point at
        # the emulator of an earlier LocalCloud in this process.
        make_functions_importable(self.root)
        from common import aws as function_clients

        function_clients.reset_clients()
        self.runtime = LambdaRuntime(self._lambda_environment, self.stack.region, self.stack.account_id)
        self.runtime.install()
        self.events = EventBridgeBus(self.runtime, self.stack.region, self.stack.account_id)
        self.events.install()
        self.training.install()
        self.processing.install()
        self.hosting.install()
        self.stepfunctions.install()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        requests.post(
            f"{self.endpoint_url}/moto-api/config",
            json={"stepfunctions": {"execute_state_machine": True}},
            timeout=10,
        ).raise_for_status()
        self._create_resources()
        self._start_api()
        self.outputs = self._outputs()
        return self.outputs

    def stop(self) -> None:
        """Stop pollers, the API, training jobs and model servers, then the emulator; idempotent."""
        for poller in self._pollers:
            poller.stop()
        self._pollers.clear()
        if self.events is not None:
            self.events.drain()
        for gateway in (self.gateway, self.app_gateway):
            if gateway is not None:
                gateway.stop()
        self.gateway = self.app_gateway = None
        self.training.stop_all()
        self.processing.stop_all()
        self.hosting.stop_all()
        if self._server is not None:
            # moto keeps its state in this process, not in the server: without a reset, the next LocalCloud
            # in the same process (a second test module) would find this stack's roles and buckets.
            with contextlib.suppress(requests.RequestException):
                requests.post(f"{self.endpoint_url}/moto-api/reset", timeout=10)
            self._server.stop()
            self._server = None
        for adapter in (
            self.stepfunctions,
            self.hosting,
            self.processing,
            self.training,
            self.events,
            self.runtime,
        ):
            if adapter is not None:
                adapter.uninstall()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()
        if self._own_workdir:
            # A temporary directory of ours (jobs, models, certificates): nothing in it outlives the stack.
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart_emulator(self, down_seconds: float = 1.0) -> None:
        """Stop the emulator's HTTP server and start it again on the same port after `down_seconds`: what
        every client (functions, the state machine's tasks, pollers, the CLI) sees when the endpoint drops. The
        services' state lives in this process and survives, as AWS's does. For the fault-injection suite."""
        assert self._server is not None, "the local stack is not running"
        self._server.stop()
        time.sleep(down_seconds)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def __enter__(self) -> LocalCloud:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _set_environment(self) -> None:
        # The in-process Lambda handlers and moto's state-machine runner use the default boto3 chain.
        values = {
            "MOTO_PORT": str(self.port),
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.credentials[0],
            "AWS_SECRET_ACCESS_KEY": self.credentials[1],
            "AWS_DEFAULT_REGION": self.stack.region,
            "AWS_REGION": self.stack.region,
        }
        for key, value in values.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_PROFILE", None)

    # ------------------------------------------------------------------ resources
    def _create_resources(self) -> None:
        stack = self.stack
        s3, sqs, sns, iam = (self.client(s) for s in ("s3", "sqs", "sns", "iam"))
        lam, sfn, kms = self.client("lambda"), self.client("stepfunctions"), self.client("kms")
        # The stack key first (EncryptionMode SSE-KMS): buckets, queues and the topic name it.
        stack.create_keys(kms)
        for bucket in stack.of_type("AWS::S3::Bucket"):
            name = bucket.attributes["Ref"]
            s3.create_bucket(Bucket=name)
            if bucket.properties.get("VersioningConfiguration", {}).get("Status") == "Enabled":
                s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
            encryption = stack.bucket_encryption(bucket)
            if encryption:
                s3.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration=encryption)
        # Dead-letter queues first: a redrive policy names its target.
        queues = sorted(stack.of_type("AWS::SQS::Queue"), key=lambda q: "RedrivePolicy" in q.properties)
        for queue in queues:
            attributes = stack.queue_attributes(queue)
            url = sqs.create_queue(QueueName=queue.attributes["QueueName"], Attributes=attributes)["QueueUrl"]
            queue.attributes["Ref"] = url
        for topic in stack.of_type("AWS::SNS::Topic"):
            sns.create_topic(Name=topic.attributes["TopicName"], Attributes=stack.topic_attributes(topic))
        trust = json.dumps({"Version": "2012-10-17", "Statement": []})
        for role in stack.of_type("AWS::IAM::Role"):
            iam.create_role(RoleName=role.attributes["Ref"], AssumeRolePolicyDocument=trust)
        lambda_role = iam.create_role(
            RoleName=f"{stack.stack_name}-local-lambda", AssumeRolePolicyDocument=trust
        )
        assert self.runtime is not None
        for function in stack.of_type("AWS::Serverless::Function"):
            props = function.properties
            name = function.attributes["Ref"]
            environment = stack.function_environment(function.logical_id)
            lam.create_function(
                FunctionName=name,
                Runtime=props["Runtime"],
                Role=lambda_role["Role"]["Arn"],
                Handler=props["Handler"],
                Code={"ZipFile": _placeholder_zip()},
                Timeout=int(props.get("Timeout", 3)),
                MemorySize=int(props.get("MemorySize", 128)),
                Environment={"Variables": environment},
            )
            self.runtime.register(
                FunctionSpec(
                    name=name,
                    handler=props["Handler"],
                    code_dir=self.root / props["CodeUri"],
                    environment=environment,
                    timeout=int(props.get("Timeout", 3)),
                    memory=int(props.get("MemorySize", 128)),
                )
            )
        for machine in stack.of_type("AWS::Serverless::StateMachine"):
            sfn.create_state_machine(
                name=machine.attributes["Name"],
                definition=stack.state_machine_definition(machine.logical_id),
                roleArn=f"arn:aws:iam::{stack.account_id}:role/{stack.stack_name}-local-states",
                type=machine.properties.get("Type", "STANDARD"),
            )
        self._create_observability()
        for bucket in stack.of_type("AWS::S3::Bucket"):
            notification = bucket.properties.get("NotificationConfiguration", {})
            configurations = [
                {
                    "QueueArn": stack.resolve(c["Queue"]),
                    "Events": [c["Event"]],
                    "Filter": {"Key": {"FilterRules": c["Filter"]["S3Key"]["Rules"]}},
                }
                for c in notification.get("QueueConfigurations", [])
            ]
            if configurations:
                s3.put_bucket_notification_configuration(
                    Bucket=bucket.attributes["Ref"],
                    NotificationConfiguration={"QueueConfigurations": configurations},
                )
        self._start_event_sources(sqs)
        self._add_event_rules()
        self.publish_training_code()
        self.publish_preprocessing_code()

    def _start_event_sources(self, sqs: Any) -> None:
        assert self.runtime is not None
        queues_by_arn = {q.attributes["Arn"]: q for q in self.stack.of_type("AWS::SQS::Queue")}
        for function in self.stack.of_type("AWS::Serverless::Function"):
            for event in function.properties.get("Events", {}).values():
                if event["Type"] != "SQS":
                    continue
                props = event["Properties"]
                queue = queues_by_arn[self.stack.resolve(props["Queue"])]
                poller = SqsEventSource(
                    sqs=sqs,
                    runtime=self.runtime,
                    function=function.attributes["Ref"],
                    queue_url=queue.attributes["Ref"],
                    queue_arn=queue.attributes["Arn"],
                    batch_size=int(props.get("BatchSize", 10)),
                    region=self.stack.region,
                    report_batch_item_failures="ReportBatchItemFailures"
                    in props.get("FunctionResponseTypes", []),
                )
                poller.start()
                self._pollers.append(poller)

    def _add_event_rules(self) -> None:
        """The EventBridge rules the template's functions declare, on the local default bus."""
        assert self.events is not None
        for function in self.stack.of_type("AWS::Serverless::Function"):
            for event_name, event in function.properties.get("Events", {}).items():
                if event["Type"] not in RULE_EVENT_TYPES:
                    continue
                self.events.add_rule(
                    f"{function.logical_id}{event_name}",
                    self.stack.resolve(event["Properties"]["Pattern"]),
                    function.attributes["Ref"],
                    self._dead_letter(function.properties.get("DeadLetterQueue")),
                )

    def _create_observability(self) -> None:
        """The template's alarms and dashboard, in moto's CloudWatch (nothing evaluates them locally)."""
        stack, cloudwatch = self.stack, self.client("cloudwatch")
        for alarm in stack.of_type("AWS::CloudWatch::Alarm"):
            props = stack.resolve(alarm.properties)
            cloudwatch.put_metric_alarm(
                AlarmName=alarm.attributes["Ref"],
                **{key: props[key] for key in ALARM_PROPERTIES if key in props},
            )
        for dashboard in stack.of_type("AWS::CloudWatch::Dashboard"):
            props = stack.resolve(dashboard.properties)
            json.loads(props["DashboardBody"])  # a body CloudWatch would refuse fails here too
            cloudwatch.put_dashboard(
                DashboardName=props["DashboardName"], DashboardBody=props["DashboardBody"]
            )

    def _dead_letter(self, config: dict[str, Any] | None) -> Callable[[dict[str, Any]], None] | None:
        """What Lambda does with an asynchronous event the function failed: its DeadLetterQueue (SQS)."""
        if not config or config.get("Type") != "SQS":
            return None
        name = str(self.stack.resolve(config["TargetArn"])).rsplit(":", 1)[-1]
        sqs = self.client_factory("sqs")

        def send(event: dict[str, Any]) -> None:
            client = sqs()
            client.send_message(
                QueueUrl=client.get_queue_url(QueueName=name)["QueueUrl"], MessageBody=json.dumps(event)
            )

        return send

    def publish_training_code(self) -> str:
        """Upload training/ as the `sagemaker_submit_directory` tarballs the pipeline's jobs run. Without the
        Hugging Face wheels: local jobs run in conveyor's own environment, which has those packages."""
        return publish_training_code(
            self.client("s3"),
            self.stack.resources["ArtifactsBucket"].attributes["Ref"],
            self.root,
            hf_wheels=False,
        )

    def publish_preprocessing_code(self) -> str:
        """Upload the preprocessing code where the pipeline's SageMaker Processing jobs read it."""
        return publish_preprocessing_code(
            self.client("s3"), self.stack.resources["ArtifactsBucket"].attributes["Ref"], self.root
        )

    # ------------------------------------------------------------------ API
    def _start_api(self) -> None:
        from conveyor.local.gateway import HttpApiGateway
        from conveyor.local.tls import make_certificates

        assert self.runtime is not None
        self.ca_bundle, cert, key = make_certificates(self.workdir / "tls")
        routes = []
        proxy = None
        for function in self.stack.of_type("AWS::Serverless::Function"):
            for event in function.properties.get("Events", {}).values():
                if event["Type"] == "HttpApi":
                    props = event["Properties"]
                    routes.append(
                        (props["Method"].upper(), props["Path"], f"{props['Method'].upper()} {props['Path']}")
                    )
                    proxy = function.attributes["Ref"]
        runtime = self.runtime

        def invoke(event: dict[str, Any]) -> dict[str, Any]:
            payload, errored = runtime.invoke(proxy, event)  # type: ignore[arg-type]
            if errored:
                raise RuntimeError(payload.get("errorMessage", "the proxy function failed"))
            return payload  # type: ignore[no-any-return]

        access_key, secret = self.credentials
        self.gateway = HttpApiGateway(
            host="127.0.0.1",
            port=self.api_port,
            certfile=cert,
            keyfile=key,
            region=self.stack.region,
            lookup_secret=lambda key_id: secret if key_id == access_key else None,
            routes=routes,
            invoke=invoke,
        )
        self.gateway.start()
        for api in self.stack.of_type("AWS::Serverless::HttpApi"):
            if "DefinitionBody" in api.properties:
                self.app_gateway = self._start_jwt_api(api.properties["DefinitionBody"], cert, key, invoke)

    def _start_jwt_api(
        self, definition: dict[str, Any], cert: Path, key: Path, invoke: Callable[..., Any]
    ) -> Any:
        """An API written as OpenAPI whose routes share one JWT authorizer (AppApi): its own port."""
        from conveyor.local.gateway import HttpApiGateway
        from conveyor.local.jwt_authorizer import JwtAuthorizer

        body = self.stack.resolve(definition)
        ((scheme,),) = {
            tuple(s)
            for operations in body["paths"].values()
            for o in operations.values()
            for s in o["security"]
        }
        settings = body["components"]["securitySchemes"][scheme]["x-amazon-apigateway-authorizer"]
        if settings["type"] != "jwt" or settings["identitySource"] != "$request.header.Authorization":
            raise LocalCloudError(
                f"local mode runs JWT authorizers on the Authorization header only, not {settings}"
            )
        audiences = settings["jwtConfiguration"]["audience"]
        audiences = [a for a in (audiences.split(",") if isinstance(audiences, str) else audiences) if a]
        if not audiences:  # the template's JwtNeedsAnAudience rule, which local mode does not evaluate
            raise LocalCloudError(
                "JwtIssuer is set but JwtAudience names no audience: AppApi would refuse every token"
            )
        gateway = HttpApiGateway(
            host="127.0.0.1",
            port=0,
            certfile=cert,
            keyfile=key,
            region=self.stack.region,
            lookup_secret=lambda _: None,
            routes=[
                (method.upper(), path, f"{method.upper()} {path}")
                for path, operations in body["paths"].items()
                for method in operations
            ],
            invoke=invoke,
            jwt_authorizer=JwtAuthorizer.of(settings["jwtConfiguration"]["issuer"], audiences),
        )
        return gateway.start()

    def _outputs(self) -> dict[str, str]:
        outputs = self.stack.outputs()
        outputs["ApiUrl"] = self.gateway.url
        if self.app_gateway is not None:
            outputs["AppApiUrl"] = self.app_gateway.url
        outputs.update(
            EndpointUrl=self.endpoint_url,
            Region=self.stack.region,
            StackName=self.stack.stack_name,
            AccessKeyId=self.credentials[0],
            SecretAccessKey=self.credentials[1],
            CaBundle=str(self.ca_bundle),
        )
        return outputs


def _placeholder_zip() -> bytes:
    # moto wants a code package; the adapter runs the real code from functions/ instead.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("README.txt", "conveyor local mode runs this function's code from functions/.")
    return buffer.getvalue()
