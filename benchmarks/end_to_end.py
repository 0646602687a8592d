"""Local end to end: upload → first successful prediction, ÷ the training alone, in one run.

Each repeat, in a fresh process, starts the local stack as ``conveyor demo`` does (moto and conveyor's
adapters, from template.yaml; not part of the figure), then times what a user waits for:

``end to end``      from the upload of the sample CSV to ``datasets/<name>/`` in RawBucket (``client.upload``)
                    to the first 200 answer of ``POST /models/<name>/predict`` over the local HTTPS API
                    (SigV4-signed, ``client.api_request``) with rows of the sample: S3 event → SQS →
                    PreprocessFunction → Step Functions (training job, evaluate, register, deploy, verify).
                    The benchmark polls DescribeExecution every 0.1 s and asks for a prediction once the
                    execution succeeded (then every 0.1 s until one is answered);
``training alone``  ``train.py`` of the job's own code channel run directly, in a fresh interpreter, on the
                    same channels (downloaded from the job's S3 inputs) with the job's hyperparameters and
                    SageMaker's ``SM_*`` contract: the time from spawning it to its exit (interpreter start,
                    imports, training, evaluation and writing the model included, as in the job).

Figure: end to end ÷ training alone, the median of the repeats' ratios; goal ≤ 1.5. Repeats alternate which
of the two runs first (the direct run reuses the first repeat's channels, checked to be the same bytes).
Also shown: the ratio to the training job's own duration (DescribeTrainingJob: TrainingEndTime -
TrainingStartTime, which adds the adapter's download of the channels and upload of the model), and where
the end-to-end time goes, from the execution's and the job's timestamps. Results go to
``benchmarks/results/end_to_end.{json,md}``; a figure that misses its goal is marked as missing it.

Usage::

    python benchmarks/end_to_end.py                  # 5 repeats (about 2 minutes on a 2-core machine)
    python benchmarks/end_to_end.py --repeats 3
    python benchmarks/end_to_end.py --quick          # one repeat: a smoke test
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import _shared

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_OUTPUT = BENCHMARKS / "results"
# This directory holds a preprocess.py too: it must not shadow the Lambda code's `preprocess` package that
# local mode imports in process.
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != BENCHMARKS]
DEFAULT_SAMPLE = ROOT / "src" / "conveyor" / "samples" / "churn.csv"

GOAL_VS_TRAINING = 1.5
DEFAULT_REPEATS = 5
DATASET = "churn"
POLL_SECONDS = 0.1
PREDICTION_ROWS = 10
REPEAT_TIMEOUT = 600
START_TIMEOUT = 120  # upload → execution started
MEASURED_FILES = ("template.yaml", "functions", "training", "infra/statemachine", "src/conveyor")
PHASES = (
    ("upload", "upload: PutObject + HeadObject"),
    ("to_execution", "S3 event → SQS → PreprocessFunction → execution started"),
    ("to_training", "execution started → training job created"),
    ("training_job", "the training job (TrainingStartTime → TrainingEndTime)"),
    ("to_deployed", "training job ended → execution succeeded (evaluate, register, deploy, verify)"),
    ("to_prediction", "execution succeeded → first prediction answered"),
)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# One repeat, in its own process: a fresh local stack, an upload, the first prediction.


def repeat_main(sample: Path, workdir: Path) -> dict[str, Any]:
    """Start the local stack, time upload → first prediction, then describe what happened; a JSON report."""
    _shared.quiet_local_stack()
    from conveyor import client
    from conveyor.local.cloud import LocalCloud

    started = time.perf_counter()
    # The parameters and function environment `conveyor demo` uses without -v.
    with LocalCloud(
        workdir=workdir / "stack",
        parameters={"LogLevel": "WARNING"},
        lambda_environment={"POWERTOOLS_METRICS_DISABLED": "true"},
    ) as cloud:
        stack_seconds = time.perf_counter() - started
        outputs_file = workdir / "outputs.json"
        outputs_file.write_text(json.dumps(cloud.outputs, indent=2) + "\n")
        target = client.load_target(outputs_file)
        sfn = target.client("stepfunctions")

        wall_start, clock = time.time(), time.perf_counter()
        upload = client.upload(target, sample, DATASET)
        uploaded = time.perf_counter() - clock
        deadline = clock + REPEAT_TIMEOUT
        while True:
            try:
                description = sfn.describe_execution(executionArn=upload.execution_arn)
            except sfn.exceptions.ExecutionDoesNotExist:
                description = None
                if time.perf_counter() > clock + START_TIMEOUT:
                    raise RuntimeError(
                        f"no execution {START_TIMEOUT} s after the upload: did preprocessing fail? "
                        "(python benchmarks/end_to_end.py _repeat SAMPLE DIR shows the stack's log)"
                    ) from None
            if description is not None and description["status"] != "RUNNING":
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"no finished execution {REPEAT_TIMEOUT} s after the upload")
            time.sleep(POLL_SECONDS)
        succeeded = time.perf_counter() - clock
        output = json.loads(description.get("output") or "{}")
        if description["status"] != "SUCCEEDED" or output.get("outcome") != "deployed":
            raise RuntimeError(f"the pipeline did not deploy: {description['status']} {output}")
        instances = _instances(target, output, sample)
        attempts = 0
        while True:
            attempts += 1
            status, answer = client.api_request(
                target, "POST", f"/models/{upload.dataset}/predict", {"instances": instances}
            )
            if status == 200:
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"no prediction answered: the last answer was {status} {answer}")
            time.sleep(POLL_SECONDS)
        end_to_end = time.perf_counter() - clock
        if len(answer["predictions"]) != len(instances):
            raise RuntimeError(f"{len(instances)} rows sent, {len(answer['predictions'])} predictions back")

        # After the clock stopped: what the pipeline did, and the training job's inputs for the direct run.
        sagemaker = target.client("sagemaker")
        (summary,) = sagemaker.list_training_jobs()["TrainingJobSummaries"]
        job = sagemaker.describe_training_job(TrainingJobName=summary["TrainingJobName"])
        s3 = target.client("s3")
        channels_dir = workdir / "channels"
        channels = {}
        for channel in job["InputDataConfig"]:
            uri = channel["DataSource"]["S3DataSource"]["S3Uri"]
            channels[channel["ChannelName"]] = _download(s3, uri, channels_dir / channel["ChannelName"])

    def since_upload(moment: dt.datetime) -> float:
        return moment.timestamp() - wall_start

    marks = {
        "execution_started": since_upload(description["startDate"]),
        "training_started": since_upload(job["TrainingStartTime"]),
        "training_ended": since_upload(job["TrainingEndTime"]),
        "execution_succeeded": since_upload(description["stopDate"]),
    }
    phases = {
        "upload": uploaded,
        "to_execution": marks["execution_started"] - uploaded,
        "to_training": marks["training_started"] - marks["execution_started"],
        "training_job": marks["training_ended"] - marks["training_started"],
        "to_deployed": marks["execution_succeeded"] - marks["training_ended"],
        "to_prediction": end_to_end - marks["execution_succeeded"],
    }
    return {
        "stack_start_seconds": round(stack_seconds, 3),
        "end_to_end_seconds": round(end_to_end, 3),
        "execution_seen_succeeded_seconds": round(succeeded, 3),
        "prediction_attempts": attempts,
        "predictions": len(answer["predictions"]),
        "model_version": answer.get("model_version"),
        "outcome": {k: output.get(k) for k in ("outcome", "metric", "value", "baseline", "version")},
        "phases_seconds": {name: round(value, 3) for name, value in phases.items()},
        "training_job": {
            "name": job["TrainingJobName"],
            "seconds": round(phases["training_job"], 3),
            "training_time_in_seconds": job.get("TrainingTimeInSeconds"),
            "hyperparameters": job.get("HyperParameters", {}),
            "channels": channels,
        },
        "channels_dir": str(channels_dir),
    }


def _instances(target: Any, output: dict[str, Any], sample: Path) -> list[dict[str, str]]:
    """The sample's first rows without the target column the manifest names, as a client sends them."""
    s3 = target.client("s3")
    key = f"{output['dataset']}/{output['version']}/manifest.json"
    manifest = json.loads(s3.get_object(Bucket=target.outputs["ProcessedBucketName"], Key=key)["Body"].read())
    with sample.open(newline="", encoding="utf-8-sig") as handle:
        rows = [row for _, row in zip(range(PREDICTION_ROWS), csv.DictReader(handle), strict=False)]
    return [{k: v for k, v in row.items() if k != manifest["target"]} for row in rows]


def _download(s3: Any, uri: str, destination: Path) -> dict[str, Any]:
    """Every object under an S3 prefix into `destination`; their count, bytes and a digest of their content."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    digest = hashlib.sha256()
    count = size = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in sorted(page.get("Contents", []), key=lambda o: o["Key"]):
            relative = obj["Key"][len(prefix) :].lstrip("/") or Path(obj["Key"]).name
            path = destination / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(path))
            data = path.read_bytes()
            # The manifest names its own version and source object, which differ between uploads.
            digest.update(relative.encode() + b"\0" + (b"" if relative.endswith("manifest.json") else data))
            count, size = count + 1, size + len(data)
    return {"uri": uri, "objects": count, "bytes": size, "sha256": digest.hexdigest()}


# ---------------------------------------------------------------------------------------------------------
# The baseline: the same training, run directly.


def train_directly(channels_dir: Path, hyperparameters: dict[str, str], work: Path) -> dict[str, Any]:
    """train.py of the job's code channel, run as SageMaker runs it, on the job's channels; its wall time."""
    if work.exists():
        shutil.rmtree(work)
    code, model, output = work / "code", work / "model", work / "output"
    for directory in (code, model, output / "data", work / "checkpoints"):
        directory.mkdir(parents=True)
    submit = hyperparameters.get("sagemaker_submit_directory", "")
    archive = channels_dir / "code" / Path(submit).name
    with tarfile.open(archive) as tar:
        tar.extractall(code, filter="data")
    program = hyperparameters.get("sagemaker_program", "train.py")
    user = {k: v for k, v in hyperparameters.items() if not k.startswith("sagemaker_")}
    arguments = [item for k, v in user.items() for item in (f"--{k}", str(v))]
    channels = sorted(p.name for p in channels_dir.iterdir() if p.is_dir())
    environment = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "SM_MODEL_DIR": str(model),
        "SM_OUTPUT_DIR": str(output),
        "SM_OUTPUT_DATA_DIR": str(output / "data"),
        "SM_CHECKPOINT_DIR": str(work / "checkpoints"),
        "SM_CHANNELS": json.dumps(channels),
        "SM_HPS": json.dumps(user),
        "SM_USER_ARGS": json.dumps(arguments),
        "SM_NUM_GPUS": "0",
        "SM_NUM_CPUS": str(os.cpu_count() or 1),
        **{f"SM_CHANNEL_{c.upper()}": str(channels_dir / c) for c in channels},
        **{f"SM_HP_{k.upper()}": str(v) for k, v in user.items()},
    }
    for key in ("AWS_ENDPOINT_URL", "MOTO_PORT"):
        environment.pop(key, None)
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, program, *arguments],
        cwd=code,
        env=environment,
        capture_output=True,
        text=True,
        timeout=REPEAT_TIMEOUT,
    )
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"training failed:\n{completed.stdout[-3000:]}{completed.stderr[-3000:]}")
    summary = json.loads((model / "evaluation.json").read_text())["conveyor"]
    return {
        "seconds": round(seconds, 3),
        "arguments": arguments,
        "metric": summary["metric"],
        "value": round(summary["value"], 4),
    }


# ---------------------------------------------------------------------------------------------------------
# The runs, figures and reports.


def run_repeat(sample: Path, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "_repeat", str(sample), str(workdir)],
        capture_output=True,
        text=True,
        timeout=REPEAT_TIMEOUT + 60,
        cwd=workdir,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the repeat failed:\n{completed.stderr[-5000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def _goal(value: float, goal: float, *, at_most: bool = False) -> dict[str, Any]:
    met = value <= goal if at_most else value >= goal
    return {"value": value, "goal": f"{'<=' if at_most else '>='} {goal}", "met": met}


def machine() -> dict[str, Any]:
    return _shared.machine(("moto", "boto3", "torch", "aws-lambda-powertools"))


def code_version() -> dict[str, Any]:
    """Which conveyor was measured: the commit, and a digest of everything the pipeline runs."""
    files = []
    for name in MEASURED_FILES:
        path = ROOT / name
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if p.is_file())
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.json") if p.is_file())
    return _shared.code_identity(ROOT, files, MEASURED_FILES)


def markdown(report: dict[str, Any]) -> str:
    m, code, config, results = report["machine"], report["code"], report["config"], report["results"]
    median, figure = results["median"], results["figures"]["end_to_end_vs_training"]
    job_ratio = results["figures"]["end_to_end_vs_training_job"]
    arguments = " ".join(results["repeats"][0]["direct"]["arguments"])
    arguments = f"`{arguments}`" if arguments else "the defaults: the job passes none"
    same = all(r["direct"]["same_metric_as_job"] for r in results["repeats"])
    lines = [
        "# Local end-to-end benchmark",
        "",
        f"Generated by `benchmarks/end_to_end.py{' --quick' if config['quick'] else ''}` on "
        f"{report['finished_at']} in {report['total_seconds']:.0f} s ({config['repeats']} repeat(s); medians; "
        "each ratio is the median of the repeats' ratios).",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"moto {m['moto']}, boto3 {m['boto3']}, torch {m['torch']}, Powertools {m['aws-lambda-powertools']}, "
        f"{m['platform']}; load average at start {m['load_average_at_start'][0]}, at the end "
        f"{m.get('load_average_at_end', ['?'])[0]}.",
        "",
        _shared.code_sentence(code, "pipeline code"),
        "",
        f"Data: `{config['sample']}` ({config['sample_rows']:,} rows, {config['sample_bytes']:,} bytes) "
        f"uploaded to `datasets/{DATASET}/` of a fresh local stack (`LocalCloud`, as `conveyor demo`; local "
        f"mode's template parameters: {', '.join(f'{k}={v}' for k, v in config['local_parameters'].items())}). "
        f"The trained model: {results['outcome']['metric']} {results['outcome']['value']:.3f} on the test "
        f"split (majority class {results['outcome']['baseline']:.3f}); the prediction asked for "
        f"{PREDICTION_ROWS} rows.",
        "",
        "| measured | seconds |",
        "|---|---:|",
        f"| end to end: upload → first successful prediction | {median['end_to_end_seconds']:.2f} |",
        "| training alone: the job's `train.py` run directly, same channels and hyperparameters "
        f"({arguments}) | {median['direct_training_seconds']:.2f} |",
        "| the training job's own duration (DescribeTrainingJob: TrainingEndTime - TrainingStartTime) "
        f"| {median['training_job_seconds']:.2f} |",
        f"| starting the local stack (not part of end to end) | {median['stack_start_seconds']:.2f} |",
        "",
        f"End to end ÷ training alone (goal ≤ {GOAL_VS_TRAINING:g}x): "
        f"{_shared.mark(figure, format(figure['value'], '.2f') + 'x')} (the repeats' ratios: "
        + ", ".join(format(r, ".2f") for r in results["pair_ratios"])
        + f"). End to end ÷ the training job's own duration: {job_ratio['value']:.2f}x. "
        + (
            "Every direct run ended with the job's own test metric: the same training."
            if same
            else "**A direct run's test metric differed from the job's**: see end_to_end.json."
        ),
        "",
        "Where the end-to-end time goes (median seconds of each phase, from the upload's clock, the "
        "execution's start and stop dates and the job's start and end times):",
        "",
        "| phase | seconds | share |",
        "|---|---:|---:|",
    ]
    total = sum(median["phases_seconds"].values()) or 1.0
    for name, label in PHASES:
        seconds = median["phases_seconds"][name]
        lines.append(f"| {label} | {seconds:.2f} | {seconds / total:.0%} |")
    lines += [
        "",
        "Per repeat (end to end / training alone / job, seconds): "
        + "; ".join(
            f"{r['end_to_end_seconds']:.2f} / {r['direct']['seconds']:.2f} / {r['training_job']['seconds']:.2f}"
            + (" (training alone ran first)" if r["direct_first"] else "")
            for r in results["repeats"]
        )
        + ".",
        "",
    ]
    if not results["same_data"]:
        lines += ["**The repeats' training channels differed**: the direct runs used the first repeat's.", ""]
    missed = report["summary"]["missed"]
    lines += [f"Goals missed: {', '.join(missed)}." if missed else "Every goal met.", ""]
    return "\n".join(lines)


def run_benchmark(repeats: int, sample: Path, output_dir: Path, quick: bool) -> dict[str, Any]:
    started = time.perf_counter()
    sys.path.insert(0, str(ROOT / "src"))
    from conveyor.local.cloud import LOCAL_PARAMETERS

    with sample.open(newline="", encoding="utf-8-sig") as handle:
        sample_rows = sum(1 for _ in csv.DictReader(handle))
    report: dict[str, Any] = {
        "benchmark": "end_to_end",
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "code": code_version(),
        "config": {
            "repeats": repeats,
            "quick": quick,
            "sample": str(sample.relative_to(ROOT)) if sample.is_relative_to(ROOT) else str(sample),
            "sample_rows": sample_rows,
            "sample_bytes": sample.stat().st_size,
            "dataset": DATASET,
            "poll_seconds": POLL_SECONDS,
            "prediction_rows": PREDICTION_ROWS,
            "local_parameters": LOCAL_PARAMETERS,
            "goals": {"end_to_end_vs_training": f"<= {GOAL_VS_TRAINING}"},
        },
    }
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    runs: list[dict[str, Any]] = []
    try:
        first: dict[str, Any] | None = None  # the first repeat's channels, for a direct run that goes first
        for repeat in range(repeats):
            direct_first = first is not None and repeat % 2 == 1
            direct = None
            if direct_first:
                assert first is not None
                progress(f"repeat {repeat + 1}/{repeats}: training alone ...")
                direct = train_directly(
                    Path(first["channels_dir"]), first["training_job"]["hyperparameters"], work / "direct"
                )
            progress(f"repeat {repeat + 1}/{repeats}: a fresh local stack, upload → first prediction ...")
            result = run_repeat(sample, work / f"repeat-{repeat}")
            if first is None:
                first = result
            if direct is None:
                progress(f"repeat {repeat + 1}/{repeats}: training alone ...")
                direct = train_directly(
                    Path(result["channels_dir"]), result["training_job"]["hyperparameters"], work / "direct"
                )
            direct["same_metric_as_job"] = direct["value"] == round(result["outcome"]["value"], 4)
            result["direct"] = direct
            result["direct_first"] = direct_first
            result["ratio"] = round(result["end_to_end_seconds"] / direct["seconds"], 3)
            result["ratio_to_job"] = round(
                result["end_to_end_seconds"] / result["training_job"]["seconds"], 3
            )
            runs.append(result)
            progress(
                f"repeat {repeat + 1}/{repeats}: end to end {result['end_to_end_seconds']:.2f} s, training "
                f"alone {direct['seconds']:.2f} s, the job {result['training_job']['seconds']:.2f} s: "
                f"{result['ratio']:.2f}x"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for result in runs:
        result.pop("channels_dir")
    # The data channels (not the code channel: its archive holds a time stamp) of every repeat.
    data = {
        json.dumps({k: v["sha256"] for k, v in r["training_job"]["channels"].items() if k != "code"})
        for r in runs
    }
    ratio = round(statistics.median(r["ratio"] for r in runs), 3)
    results = {
        "repeats": runs,
        "same_data": len(data) == 1,
        "pair_ratios": [r["ratio"] for r in runs],
        "outcome": runs[0]["outcome"],
        "median": {
            "end_to_end_seconds": round(statistics.median(r["end_to_end_seconds"] for r in runs), 3),
            "direct_training_seconds": round(statistics.median(r["direct"]["seconds"] for r in runs), 3),
            "training_job_seconds": round(statistics.median(r["training_job"]["seconds"] for r in runs), 3),
            "stack_start_seconds": round(statistics.median(r["stack_start_seconds"] for r in runs), 3),
            "phases_seconds": {
                name: round(statistics.median(r["phases_seconds"][name] for r in runs), 3)
                for name, _ in PHASES
            },
        },
        "figures": {
            "end_to_end_vs_training": _goal(ratio, GOAL_VS_TRAINING, at_most=True),
            "end_to_end_vs_training_job": {
                "value": round(statistics.median(r["ratio_to_job"] for r in runs), 3),
                "goal": None,
            },
        },
    }
    report["results"] = results
    if code_version()["digest"] != report["code"]["digest"]:
        progress("warning: the pipeline's code changed during the run")
        report["code"]["changed_during_run"] = True
    figure = results["figures"]["end_to_end_vs_training"]
    missed = [] if figure["met"] else ["end_to_end_vs_training"]
    report["summary"] = {"missed": missed, "all_goals_met": not missed}
    _shared.write_results(report, started, output_dir, "end_to_end", markdown)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_repeat"]:
        print(json.dumps(repeat_main(Path(argv[1]), Path(argv[2])), default=str))
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=DEFAULT_REPEATS, help=f"fresh stacks (default: {DEFAULT_REPEATS})"
    )
    parser.add_argument("--quick", action="store_true", help="one repeat: a smoke test")
    parser.add_argument(
        "--file", type=Path, default=DEFAULT_SAMPLE, help="the CSV to upload (default: the demo's)"
    )
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT, help="where results go")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    missing = [name for name in ("moto", "torch") if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f'{" and ".join(missing)} missing: pip install -e ".[local,train]" (or make bench-e2e)')
    repeats = 1 if args.quick else args.repeats
    report = run_benchmark(repeats, args.file.resolve(), args.output_dir, args.quick)
    progress(f"done in {report['total_seconds']:.0f} s: {args.output_dir / 'end_to_end.md'}")
    print((args.output_dir / "end_to_end.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
