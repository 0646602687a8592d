"""`conveyor`: run the stack locally, upload datasets, follow pipelines, call the prediction API."""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import logging
import signal
import sys
import threading
import time
import warnings
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

from conveyor import client
from conveyor.client import ConveyorError, Target
from conveyor.local.cloud import LocalCloudError
from conveyor.local.sourcedir import SourcedirError

# Image files `predict --file` sends as an image model's instance (the suffixes a zip upload's images take).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# How much base64 the demo puts in one prediction request: the API takes bodies up to 5 MiB.
IMAGE_REQUEST_BYTES = 4 << 20

log = logging.getLogger("conveyor")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        # The emulator's request log and the handlers' JSON logs drown the progress a person wants to see.
        for noisy in (
            "werkzeug",
            "botocore",
            "urllib3",
            "smart_open",
            "localcloud.lambda",
            "localcloud.gateway",
        ):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # moto warns about every optimised integration it forwards and logs each failed state as an
        # error; the demo's own progress lines already say what failed and why.
        logging.getLogger("moto").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", message="No application metrics to publish")


def _quiet_functions(verbose: bool) -> tuple[dict[str, str], dict[str, str]]:
    """Template parameters and function environment that keep the functions' JSON logs and EMF metric
    lines (Powertools) off the terminal unless asked for; the log level is the template's LogLevel."""
    if verbose:
        return {}, {}
    return {"LogLevel": "WARNING"}, {"POWERTOOLS_METRICS_DISABLED": "true"}


def _target(args: argparse.Namespace) -> Target:
    return client.load_target(args.outputs_file, args.stack, args.region)


# ---------------------------------------------------------------------------- local up
def cmd_local_up(args: argparse.Namespace) -> int:
    from conveyor.local.cloud import LocalCloud

    parameters, lambda_environment = _quiet_functions(args.verbose)
    cloud = LocalCloud(
        port=args.port,
        api_port=args.api_port,
        workdir=args.workdir,
        parameters=parameters,
        lambda_environment=lambda_environment,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        outputs = cloud.start()
        args.outputs_file.parent.mkdir(parents=True, exist_ok=True)
        args.outputs_file.write_text(json.dumps(outputs, indent=2) + "\n")
        print(f"conveyor local stack is up; outputs in {args.outputs_file}", flush=True)
        for key in ("RawBucketName", "StateMachineArn", "ApiUrl", "EndpointUrl"):
            print(f"  {key:16} {outputs[key]}", flush=True)
        print("Ctrl-C stops it.", flush=True)
        stop.wait()
    finally:
        print("stopping…", flush=True)
        cloud.stop()
    return 0


# ---------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from conveyor.local.cloud import LocalCloud

    sample = args.file or Path(str(resources.files("conveyor") / "samples" / "churn.csv"))
    started = time.monotonic()
    print("1/4 starting the local stack (moto + adapters, from template.yaml)…", flush=True)
    parameters, lambda_environment = _quiet_functions(args.verbose)
    with LocalCloud(
        workdir=args.workdir, parameters=parameters, lambda_environment=lambda_environment
    ) as cloud:
        outputs = cloud.outputs
        args.outputs_file.parent.mkdir(parents=True, exist_ok=True)
        args.outputs_file.write_text(json.dumps(outputs, indent=2) + "\n")
        target = client.load_target(args.outputs_file)
        print(
            f"2/4 uploading {sample.name} to s3://{outputs['RawBucketName']}/datasets/{args.dataset}/",
            flush=True,
        )
        upload = client.upload(target, sample, args.dataset)
        print("3/4 following the pipeline (preprocess → train → evaluate → register → deploy)", flush=True)
        result = client.follow(target, upload, on_progress=lambda line: print(f"    {line}", flush=True))
        print(
            f"    → {result.get('status')}: {json.dumps({k: v for k, v in result.items() if k != 'status'})}",
            flush=True,
        )
        if result.get("outcome") != "deployed":
            print("the model was not deployed; see the outcome above", file=sys.stderr)
            return 1
        print(
            f"4/4 predicting over HTTPS: POST {outputs['ApiUrl']}/models/{upload.dataset}/predict (SigV4)",
            flush=True,
        )
        _show_predictions(target, upload.dataset, result)
        try:
            reports = args.outputs_file.parent / "reports"
            report = client.fetch_report(target, upload.dataset, result.get("version"), reports)
            print(f"    the model's report, with its plots: {report.resolve().as_uri()}", flush=True)
        except ConveyorError as error:  # the model serves; a missing report is worth a line, no more
            print(f"    (no report: {error})", flush=True)
    print(f"done in {time.monotonic() - started:.0f} s", flush=True)
    return 0


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return list(csv.DictReader(handle))


def _show_predictions(target: Target, dataset: str, result: dict[str, Any]) -> None:
    """Predict the held-out test split over the API: the accuracy printed is the one the gate saw (for an
    image dataset, over the test images one request carries)."""
    s3 = target.client("s3")
    prefix = f"{dataset}/{result['version']}"
    bucket = target.outputs["ProcessedBucketName"]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read())
    column = manifest["target"]
    if manifest.get("format") == "zip":  # the image and pretrained_image recipes
        # The split zip's images, as many as one request carries (the API takes 5 MiB of JSON).
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}/test/part-00000.zip")["Body"].read()
        rows, instances, size = [], [], 0
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            for entry in archive.namelist():
                encoded = base64.b64encode(archive.read(entry)).decode()
                size += len(encoded) + 16
                if size > IMAGE_REQUEST_BYTES:
                    break
                rows.append({column: entry.split("/")[0]})
                instances.append({"image": encoded})
    else:
        text = s3.get_object(Bucket=bucket, Key=f"{prefix}/test/part-00000.csv")["Body"].read().decode()
        rows = list(csv.DictReader(io.StringIO(text)))
        instances = [{k: v for k, v in r.items() if k != column} for r in rows]
    answer = client.predict(target, dataset, instances)
    predictions = answer["predictions"]
    print(f"    model_version {answer['model_version']}; {len(rows)} held-out test rows", flush=True)
    print(f"    {'actual':>12}  {'predicted':>12}  probabilities", flush=True)
    for row, prediction in list(zip(rows, predictions, strict=True))[:5]:
        shown = prediction.get("label", prediction.get("value"))
        probabilities = ", ".join(f"{k}={v:.2f}" for k, v in prediction.get("probabilities", {}).items())
        print(f"    {row[column]:>12}  {shown!s:>12}  {probabilities}", flush=True)
    if manifest["task"] == "classification":
        correct = sum(str(p["label"]) == r[column] for p, r in zip(predictions, rows, strict=True))
        print(
            f"    accuracy over HTTPS: {correct / len(rows):.3f} (majority-class baseline {result['baseline']:.3f})",
            flush=True,
        )


# ---------------------------------------------------------------------------- upload / status / predict
def cmd_upload(args: argparse.Namespace) -> int:
    target = _target(args)
    upload = client.upload(target, args.file, args.dataset)
    print(f"uploaded s3://{upload.bucket}/{upload.key} (version {upload.version_id or 'n/a'})")
    print(f"execution: {upload.execution_arn}")
    if args.wait:
        result = client.follow(target, upload)
        print(json.dumps(result, indent=2))
        return 0 if result.get("status") == "SUCCEEDED" else 1
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    target = _target(args)
    approval = client.approve(target, args.dataset, args.version, args.note or "")
    print(f"approved {approval.dataset} version {approval.version}: {approval.package_arn}")
    print(f"deployment: {approval.execution_arn}")
    if args.wait:
        result = client.follow_execution(target, approval.execution_arn)
        print(json.dumps(result, indent=2))
        return 0 if result.get("outcome") == "deployed" else 1
    return 0


def cmd_publish_code(args: argparse.Namespace) -> int:
    from conveyor.local.cloud import project_root
    from conveyor.local.sourcedir import publish_preprocessing_code, publish_training_code

    target = _target(args)
    s3, bucket, root = target.client("s3"), target.outputs["ArtifactsBucketName"], project_root()
    print("packaging training/ and the Hugging Face wheels for base-model jobs (about 30 MB)...", flush=True)
    uri = publish_training_code(s3, bucket, root)
    print(f"training code published to {uri} (and sourcedir-hf.tar.gz beside it)")
    uri = publish_preprocessing_code(s3, bucket, root)
    print(f"preprocessing code (for SageMaker Processing jobs) published to {uri}")
    return 0


def cmd_base_models_push(args: argparse.Namespace) -> int:
    from conveyor import base_models

    pushed = base_models.push(_target(args), args.folder, args.name, progress=sys.stdout)
    what = "already in the hub, unchanged" if pushed.already_there else "pushed"
    print(
        f"{what}: {pushed.uri} ({pushed.parameters / 1e6:,.1f}M parameters, {pushed.files} files, "
        f"{pushed.bytes / 2**20:,.1f} MiB, digest {pushed.digest})"
    )
    print(f'fine-tune it: put {{"base_model": "{args.name}"}} in the dataset\'s conveyor.json')
    return 0


def cmd_base_models_list(args: argparse.Namespace) -> int:
    from conveyor import base_models

    bases = base_models.list_bases(_target(args))
    if args.json:
        print(json.dumps(bases, indent=2))
    else:
        base_models.print_table(bases)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    target = _target(args)
    sfn = target.client("stepfunctions")
    executions = sfn.list_executions(stateMachineArn=target.outputs["StateMachineArn"], maxResults=50)[
        "executions"
    ]
    if args.dataset:
        executions = [e for e in executions if e["name"].startswith(args.dataset + "-")]
    if not executions:
        print("no pipeline executions yet")
    for execution in executions:
        output = ""
        if execution["status"] != "RUNNING":
            described = sfn.describe_execution(executionArn=execution["executionArn"])
            summary = json.loads(described.get("output") or "{}")
            output = " ".join(
                f"{k}={summary[k]}"
                for k in ("outcome", "version", "metric", "value", "reason")
                if k in summary
            )
        print(
            f"{execution['startDate']:%Y-%m-%d %H:%M:%S}  {execution['status']:9}  {execution['name']}  {output}"
        )
    status, models = client.api_request(target, "GET", "/models")
    if status == 200:
        for model in models["models"]:
            print(f"model {model['name']}: {model['status']} (version {model['model_version']})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    target = _target(args)
    if args.json:
        instances = json.loads(args.json)
        instances = instances.get("instances", instances) if isinstance(instances, dict) else instances
    elif args.file and args.file.suffix == ".csv":
        instances = _read_rows(args.file)[: args.limit]
    elif args.file and args.file.suffix.lower() in IMAGE_SUFFIXES:
        instances = [{"image": base64.b64encode(args.file.read_bytes()).decode()}]
    elif args.file:
        document = json.loads(args.file.read_text())
        instances = document.get("instances", document) if isinstance(document, dict) else document
    else:
        raise ConveyorError("give rows with --file rows.csv|rows.json|image.jpg or --json '[{...}]'")
    print(json.dumps(client.predict(target, args.dataset, instances), indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    report = client.fetch_report(_target(args), args.dataset, args.version, args.output)
    print(f"{report.resolve().as_uri()}  (report.html, its plots, evaluation.json and history.json)")
    return 0


# ---------------------------------------------------------------------------- doctor
def cmd_doctor(args: argparse.Namespace) -> int:
    from conveyor import doctor

    if args.stack:
        report = doctor.diagnose_stack(doctor.stack_clients(args.region), args.stack, hours=args.hours)
    else:
        try:
            target = _target(args)
        except ConveyorError as error:
            report = doctor.Report(
                f"local stack ({args.outputs_file})",
                (doctor.CheckResult("local stack", problems=(doctor.Problem(str(error)),)),),
            )
        else:
            report = doctor.diagnose_local(target.client, target.outputs, hours=args.hours)
    for line in report.lines():
        print(line, flush=True)
    return report.exit_code


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="show the emulator's and handlers' logs")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--outputs-file",
        type=Path,
        default=client.DEFAULT_OUTPUTS,
        help="stack outputs written by `conveyor local up` (default: %(default)s)",
    )
    common.add_argument("--stack", help="a deployed CloudFormation stack to talk to instead")
    common.add_argument("--region", help="AWS region of --stack")
    commands = parser.add_subparsers(dest="command", required=True)

    local = commands.add_parser("local", help="the embedded local stack").add_subparsers(
        dest="local", required=True
    )
    up = local.add_parser("up", help="run the stack locally until Ctrl-C")
    up.add_argument(
        "--port", type=int, default=4566, help="AWS endpoint port (default: %(default)s; 0 = any)"
    )
    up.add_argument(
        "--api-port", type=int, default=8443, help="HTTPS API port (default: %(default)s; 0 = any)"
    )
    up.add_argument("--outputs-file", type=Path, default=client.DEFAULT_OUTPUTS)
    up.add_argument("--workdir", type=Path, help="where jobs and endpoints keep files (default: a temp dir)")
    up.set_defaults(func=cmd_local_up)

    demo = commands.add_parser("demo", help="up, upload a sample dataset, follow it, predict, stop")
    demo.add_argument(
        "--file", type=Path, help="a dataset (CSV, JSON Lines or a zip of images) instead of the churn sample"
    )
    demo.add_argument("--dataset", default="churn")
    demo.add_argument("--outputs-file", type=Path, default=client.DEFAULT_OUTPUTS)
    demo.add_argument("--workdir", type=Path)
    demo.set_defaults(func=cmd_demo)

    upload = commands.add_parser("upload", parents=[common], help="upload a dataset file")
    upload.add_argument("file", type=Path)
    upload.add_argument("--dataset", required=True, help="the dataset name (datasets/<name>/ in RawBucket)")
    upload.add_argument("--wait", action="store_true", help="follow the pipeline until it ends")
    upload.set_defaults(func=cmd_upload)

    approve = commands.add_parser(
        "approve",
        parents=[common],
        help="approve a model that waits for approval (conveyor.json approval: manual), which deploys it",
    )
    approve.add_argument("dataset")
    approve.add_argument("--version", help="the data version to approve (default: the newest waiting)")
    approve.add_argument("--note", help="why (kept as the package's ApprovalDescription)")
    approve.add_argument("--wait", action="store_true", help="follow the deployment until it ends")
    approve.set_defaults(func=cmd_approve)

    publish = commands.add_parser(
        "publish-code",
        parents=[common],
        help="upload training/ and the preprocessing code for the pipeline's SageMaker jobs",
    )
    publish.set_defaults(func=cmd_publish_code)

    bases = commands.add_parser(
        "base-models", help="the base-model hub (pretrained models to fine-tune)"
    ).add_subparsers(dest="base_models", required=True)
    push = bases.add_parser(
        "push", parents=[common], help="check a save_pretrained folder and upload it to the hub"
    )
    push.add_argument("folder", type=Path, help="config.json, model.safetensors (or shards), tokenizer files")
    push.add_argument(
        "--name", required=True, help='the base\'s name; a conveyor.json names it as "base_model"'
    )
    push.set_defaults(func=cmd_base_models_push)
    listing = bases.add_parser("list", parents=[common], help="the base models in the hub")
    listing.add_argument("--json", action="store_true", help="as JSON")
    listing.set_defaults(func=cmd_base_models_list)

    status = commands.add_parser("status", parents=[common], help="pipeline executions and served models")
    status.add_argument("--dataset")
    status.set_defaults(func=cmd_status)

    predict = commands.add_parser("predict", parents=[common], help="call POST /models/<name>/predict")
    predict.add_argument("dataset")
    predict.add_argument(
        "--file", type=Path, help="rows as CSV (header row) or JSON, or one image for an image model"
    )
    predict.add_argument("--json", help="rows inline: '[{\"column\": value}]'")
    predict.add_argument("--limit", type=int, default=100, help="at most this many CSV rows")
    predict.set_defaults(func=cmd_predict)

    report = commands.add_parser(
        "report", parents=[common], help="download a model's training report (HTML and plots) to open locally"
    )
    report.add_argument("dataset")
    report.add_argument("--version", help="the data version (default: the newest trained one)")
    report.add_argument(
        "--output", type=Path, default=Path(".conveyor/reports"), help="where (default: %(default)s)"
    )
    report.set_defaults(func=cmd_report)

    doctor = commands.add_parser(
        "doctor",
        parents=[common],
        help="check the stack (resources, queues, endpoints, alarms, recent executions) and say what to fix",
    )
    doctor.add_argument(
        "--hours",
        type=float,
        default=24,
        help="report executions that failed, timed out or were aborted this recently (default: %(default)s)",
    )
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args))
    except (ConveyorError, LocalCloudError, SourcedirError) as error:
        print(f"conveyor: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
