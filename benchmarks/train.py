"""Training loop, model server and inference proxy: conveyor against a bare baseline for each, in one run.

Makes a churn table (the preprocessing benchmark's generator), preprocesses it with conveyor's own
``preprocess.core`` into SageMaker channels, trains a model on it with ``training/train.py``, then measures:

``training loop``  samples/s of ``train.fit`` (checkpoints off, one process) ÷ a bare hand-written loop:
                   AdamW, the same TabularMLP, batch size, encoded tensors, loss and number of steps, and no
                   validation, early stopping, checkpoints or reporting. One torch thread for both, as
                   train.py sets on a CPU. Goal ≥ 0.95.
``model server``   requests/s of ``conveyor.local.model_server`` (its front end and default workers: one per
                   core) ÷ a naive Flask server (Flask's own threaded server in one process, one request →
                   input_fn, predict_fn, output_fn), both loading the
                   artefact's ``code/inference.py``, both in their own process; a fixed number of requests
                   of 1 and of 100 rows from a few client threads over keep-alive connections. Goal ≥ 2.
``proxy``          p50 and p99 time of the inference proxy Lambda handler, in process, on an API Gateway
                   HTTP API (payload format 2.0) event, with SageMaker runtime stubbed by a botocore
                   Stubber answering the model's real response at once: the time the proxy adds on top of
                   the endpoint. Goal: p50 ≤ 2 ms.

Each repeat runs conveyor and its baseline back to back (in alternating order); a ratio is the median of
the repeats' ratios, which other work on the machine disturbs least. Results go to
``benchmarks/results/train.{json,md}``; a figure that misses its goal is marked as missing it.

Usage::

    python benchmarks/train.py                # the full run (2 to 3 minutes on a 2-core machine)
    python benchmarks/train.py --repeats 3
    python benchmarks/train.py --quick        # small data, one repeat: a smoke test (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime as dt
import hashlib
import http.client
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _shared

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
TRAINING = ROOT / "training"
FUNCTIONS = ROOT / "functions"
EVENTS = ROOT / "tests" / "events"
DEFAULT_OUTPUT = BENCHMARKS / "results"
# This script is named train.py too: its own directory must not shadow training/train.py. training/ is the
# import root of the training code (as /opt/ml/code), functions/ that of the Lambda code (as /var/task).
sys.path[:] = [
    str(TRAINING),
    str(FUNCTIONS),
    *(p for p in sys.path if p and Path(p).resolve() != BENCHMARKS),
]

GOAL_LOOP = 0.95
GOAL_SERVER = 2.0
GOAL_PROXY_P50_MS = 2.0

DATASET = "bench-churn"
DATA_VERSION = "20261122T000000Z-bench0"
TARGET = "churned"
SEED = 20261122
MEASURED_FILES = (
    "training/train.py",
    "training/model.py",
    "training/data.py",
    "training/inference.py",
    "src/conveyor/local/model_server.py",
    "functions/inference_proxy/app.py",
)
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
READY_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class Config:
    """How much of each measurement one run does."""

    rows: int = 20_000  # generated rows; preprocessing splits them 80/10/10
    model_epochs: int = 3  # train.py's epochs for the served model
    loop_epochs: int = 2  # epochs of each timed training-loop run
    loop_repeats: int = 15
    request_rows: tuple[int, ...] = (1, 100)
    requests: int = 2_000  # per server run; divided among the client threads
    clients: int = 4
    server_repeats: int = 5
    proxy_invocations: int = 3_000  # per request size

    @classmethod
    def quick(cls) -> Config:
        return cls(
            rows=2_000,
            model_epochs=1,
            loop_epochs=1,
            loop_repeats=1,
            requests=100,
            clients=2,
            server_repeats=1,
            proxy_invocations=200,
        )


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# The dataset and the trained model.


def _preprocess_benchmark() -> Any:
    # The preprocessing benchmark's churn generator, loaded by path: its file name is that of the
    # `preprocess` package of functions/.
    spec = importlib.util.spec_from_file_location("bench_preprocess", BENCHMARKS / "preprocess.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_channels(rows: int, root: Path) -> dict[str, Path]:
    """A churn CSV of `rows` rows, preprocessed by conveyor into train/validation/test and a manifest.

    Returns
    -------
    dict
        The SageMaker channel directories by name (``train``, ``validation``, ``test``, ``manifest``).
    """
    generator = _preprocess_benchmark()
    table: list[list[Any]] = []
    chunk = 0
    while len(table) < rows:
        table += generator.generate_rows(chunk, 1 + chunk * generator.ROWS_PER_CHUNK, SEED)
        chunk += 1
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(generator.HEADER)
    writer.writerows(table[:rows])
    source = buffer.getvalue().encode("utf-8")

    from preprocess import core

    channels = {name: root / name for name in (*core.SPLITS, "manifest")}

    @contextlib.contextmanager
    def open_split(split: str) -> Any:
        channels[split].mkdir(parents=True, exist_ok=True)
        with (channels[split] / "part-00000.csv").open("w", encoding="utf-8", newline="") as handle:
            yield handle

    provenance = {
        "dataset": DATASET,
        "version": DATA_VERSION,
        "source": {
            "bucket": "local",
            "key": f"datasets/{DATASET}/churn.csv",
            "version_id": None,
            "etag": None,
            "size": len(source),
        },
    }
    manifest = core.preprocess(
        io.BytesIO(source), spec=core.DatasetSpec(target=TARGET), open_split=open_split, provenance=provenance
    )
    channels["manifest"].mkdir(parents=True, exist_ok=True)
    (channels["manifest"] / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return channels


def train_model(channels: dict[str, Path], root: Path, epochs: int) -> dict[str, Any]:
    """Run training/train.py as SageMaker would; the model directory is ``root/model``."""
    env = {
        **os.environ,
        "SM_MODEL_DIR": str(root / "model"),
        "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
        "SM_OUTPUT_DIR": str(root / "output"),
        "SM_CHECKPOINT_DIR": str(root / "checkpoints"),
        **{f"SM_CHANNEL_{name.upper()}": str(path) for name, path in channels.items()},
    }
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    completed = subprocess.run(
        # The tabular recipe (its text column as a bag of words): the MLP the loop benchmark measures too.
        [sys.executable, str(TRAINING / "train.py"), "--epochs", str(epochs), "--recipe", "tabular"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"training failed:\n{completed.stdout[-3000:]}{completed.stderr[-3000:]}")
    evaluation = json.loads((root / "model" / "evaluation.json").read_text())
    summary = evaluation["conveyor"]
    config = json.loads((root / "model" / "model_config.json").read_text())
    return {
        "model_dir": str(root / "model"),
        "epochs": epochs,
        "seconds": round(time.perf_counter() - started, 1),
        "inputs": config["architecture"]["in_features"],
        "hidden_units": config["architecture"]["hidden_units"],
        "test_metric": summary["metric"],
        "test_value": round(summary["value"], 4),
        "baseline_value": round(summary["baseline"], 4),
    }


def request_instances(channels: dict[str, Path], count: int) -> list[dict[str, Any]]:
    """`count` rows of the test split as a client sends them: numbers as JSON numbers, missing as null."""
    import data

    manifest = json.loads((channels["manifest"] / "manifest.json").read_text())
    features = {c["name"]: c["type"] for c in manifest["columns"] if c.get("role") == "feature"}
    with (channels["test"] / "part-00000.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    instances = []
    for i in range(count):
        row = rows[i % len(rows)]
        instance: dict[str, Any] = {}
        for name, kind in features.items():
            value = row[name]
            instance[name] = None if data.is_missing(value) else float(value) if kind == "numeric" else value
        instances.append(instance)
    return instances


# ---------------------------------------------------------------------------------------------------------
# 1. The training loop.


def loop_throughput(channels: dict[str, Path], config: Config) -> dict[str, Any]:
    """Time `train.fit` and the bare loop on the same tensors, alternating, `loop_repeats` times each."""
    import torch
    from torch.nn import functional

    import train
    from model import TabularMLP

    arguments = [f"--{name}={path}" for name, path in channels.items()]
    epochs = config.loop_epochs
    # Patience beyond the last epoch: fit() runs every epoch, so both loops take the same steps.
    args = train.parse_args(
        [
            *arguments,
            f"--epochs={epochs}",
            f"--patience={epochs + 1}",
            "--checkpoint-steps=0",
            "--recipe=tabular",
        ]
    )
    torch.set_num_threads(1)  # what train.py does on a CPU, for both loops
    train.seed_everything(args.seed)
    _, encoder, splits = train.load_splits(args)
    tensors = {}
    for name, split in splits.items():
        x = torch.from_numpy(encoder.encode(split.columns, split.rows))
        y = torch.from_numpy(encoder.encode_target(split.columns[encoder.target]))
        tensors[name] = (x, y)
    if encoder.task != "classification":
        raise RuntimeError("the benchmark's dataset should be a classification task")
    weights = train.class_weights(tensors["train"][1].numpy(), encoder.output_width, args.class_weights)
    weight = None if weights is None else torch.tensor(weights, dtype=torch.float32)
    objective = train.Classification(weight)
    x_train, y_train = tensors["train"]
    rows, batch_size = len(x_train), args.batch_size
    steps_per_epoch = -(-rows // batch_size)

    def network() -> torch.nn.Module:
        torch.manual_seed(args.seed)
        return TabularMLP(encoder.width, encoder.output_width, args.hidden_units, args.dropout)

    def run_conveyor() -> tuple[float, float, torch.nn.Module, int]:
        model = network()
        with contextlib.redirect_stdout(io.StringIO()):  # fit() prints a line per epoch
            started, cpu = time.perf_counter(), time.process_time()
            result = train.fit(model, objective, tensors["train"], tensors["validation"], args, None)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        return seconds, cpu, model, result.epochs_run * steps_per_epoch

    def run_bare(epochs: int = epochs) -> tuple[float, float, torch.nn.Module, int]:
        model = network()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay
        )
        shuffler = torch.Generator().manual_seed(args.seed)
        steps = 0
        started, cpu = time.perf_counter(), time.process_time()
        model.train()
        for _ in range(epochs):
            order = torch.randperm(rows, generator=shuffler)
            for step in range(steps_per_epoch):
                batch = order[step * batch_size : (step + 1) * batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = functional.cross_entropy(model(x_train[batch]), y_train[batch], weight=weight)
                loss.backward()
                optimizer.step()
                steps += 1
        return time.perf_counter() - started, time.process_time() - cpu, model, steps

    run_bare(1)  # warm-up: the allocator and kernels' first calls, outside the timed runs
    runs: dict[str, list[dict[str, Any]]] = {"conveyor": [], "bare": []}
    for repeat in range(config.loop_repeats):
        order = ("conveyor", "bare") if repeat % 2 == 0 else ("bare", "conveyor")
        for loop in order:
            seconds, cpu, model, steps = run_conveyor() if loop == "conveyor" else run_bare()
            if steps != epochs * steps_per_epoch:
                raise RuntimeError(f"the {loop} loop ran {steps} steps, not {epochs * steps_per_epoch}")
            x_val, y_val = tensors["validation"]
            report = objective.validation_report(train.predict(model, x_val), y_val)
            runs[loop].append(
                {
                    "seconds": round(seconds, 4),
                    "cpu_seconds": round(cpu, 4),
                    "steps": steps,
                    "samples": epochs * rows,
                    "samples_per_s": round(epochs * rows / seconds, 1),
                    "validation_loss": round(report["validation_loss"], 4),
                    "validation_accuracy": round(report["validation_accuracy"], 4),
                }
            )
            progress(
                f"training loop {repeat + 1}/{config.loop_repeats}: {loop}: {seconds:.2f} s, "
                f"{epochs * rows / seconds:,.0f} samples/s"
            )
    median = {
        loop: {
            "seconds": round(statistics.median(r["seconds"] for r in results), 4),
            "samples_per_s": round(statistics.median(r["samples_per_s"] for r in results), 1),
        }
        for loop, results in runs.items()
    }
    # Each repeat runs the two loops back to back: the ratio within a pair is the least disturbed by
    # whatever else the machine does, and the figure is the median of those ratios.
    pairs = [
        round(c["samples_per_s"] / b["samples_per_s"], 4)
        for c, b in zip(runs["conveyor"], runs["bare"], strict=True)
    ]
    cpu_pairs = [
        round(b["cpu_seconds"] / c["cpu_seconds"], 4)
        for c, b in zip(runs["conveyor"], runs["bare"], strict=True)
    ]
    return {
        "train_rows": rows,
        "validation_rows": len(tensors["validation"][0]),
        "inputs": encoder.width,
        "batch_size": batch_size,
        "hidden_units": list(args.hidden_units),
        "epochs": epochs,
        "steps": epochs * steps_per_epoch,
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
        "median": median,
        "pair_ratios": pairs,
        # The same ratio in CPU time of this process: it leaves out time lost to other processes.
        "cpu_time_pair_ratios": cpu_pairs,
        "cpu_time_ratio": round(statistics.median(cpu_pairs), 3),
        "figures": {"conveyor_vs_bare": _goal(round(statistics.median(pairs), 3), GOAL_LOOP)},
    }


# ---------------------------------------------------------------------------------------------------------
# 2. The model server.


def flask_main(model_dir: Path, port: int) -> None:
    """The naive baseline: Flask's threaded development server, one request → one forward."""
    import logging

    from flask import Flask, Response, request

    sys.path.insert(0, str(model_dir / "code"))
    import inference

    model = inference.model_fn(str(model_dir))
    app = Flask("naive-model-server")

    @app.get("/ping")
    def ping() -> Response:
        return Response("{}", mimetype="application/json")

    @app.post("/invocations")
    def invocations() -> Response:
        data = inference.input_fn(request.get_data(), request.content_type or "application/json")
        prediction = inference.predict_fn(data, model)
        answer = inference.output_fn(prediction, request.headers.get("Accept", "application/json"))
        return Response(answer, mimetype="application/json")

    # Neither server logs a line per request (conveyor's logs them at DEBUG).
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app.run("127.0.0.1", port, threaded=True)


def stages_main(model_dir: Path, bodies_file: Path, calls: int) -> None:
    """Print the median time of input_fn, predict_fn and output_fn per request size, timed in one process
    that loads the model as both servers do: what a server spends on a request besides HTTP."""
    sys.path.insert(0, str(model_dir / "code"))
    import inference

    model = inference.model_fn(str(model_dir))
    stages: dict[str, dict[str, float]] = {}
    for n, body in json.loads(bodies_file.read_text()).items():
        times: dict[str, list[float]] = {"input_fn": [], "predict_fn": [], "output_fn": []}
        for _ in range(calls):
            started = time.perf_counter()
            data = inference.input_fn(body.encode(), "application/json")
            encoded = time.perf_counter()
            prediction = inference.predict_fn(data, model)
            predicted = time.perf_counter()
            inference.output_fn(prediction, "application/json")
            times["input_fn"].append(encoded - started)
            times["predict_fn"].append(predicted - encoded)
            times["output_fn"].append(time.perf_counter() - predicted)
        stages[n] = {stage: round(statistics.median(t) * 1000, 3) for stage, t in times.items()}
    print(json.dumps(stages))


def handler_stages(model_dir: Path, bodies: dict[int, bytes], calls: int, work: Path) -> dict[str, Any]:
    bodies_file = work / "stage-bodies.json"
    bodies_file.write_text(json.dumps({str(n): body.decode() for n, body in bodies.items()}))
    command = [sys.executable, str(Path(__file__).resolve()), "_stages", str(model_dir), str(bodies_file)]
    completed = subprocess.run(
        [*command, str(calls)], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"timing the serving handlers failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def model_servers(model_dir: Path, log_dir: Path) -> Any:
    """Start conveyor's server and the Flask one, each in its own process (both loading at once); yield
    their ports by name once both answer /ping."""
    processes: dict[str, tuple[subprocess.Popen[bytes], int, Path]] = {}
    try:
        for kind in ("conveyor", "flask"):
            port = _free_port()
            if kind == "conveyor":
                command = [sys.executable, "-m", "conveyor.local.model_server", "--model-dir", str(model_dir)]
                command += ["--port", str(port)]
            else:
                command = [sys.executable, str(Path(__file__).resolve()), "_flask", str(model_dir), str(port)]
            log_path = log_dir / f"{kind}-server.log"
            with log_path.open("wb") as log_file:
                process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
            processes[kind] = (process, port, log_path)
        deadline = time.monotonic() + READY_TIMEOUT
        for kind, (process, port, log_path) in processes.items():
            while not _answers_ping(port):
                if process.poll() is not None:
                    raise RuntimeError(
                        f"the {kind} server exited: {log_path.read_text(errors='replace')[-2000:]}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {kind} server did not answer /ping in {READY_TIMEOUT:.0f} s")
                time.sleep(0.1)
        yield {kind: port for kind, (_, port, _) in processes.items()}
    finally:
        for process, _, _ in processes.values():
            process.terminate()
        for process, _, _ in processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _answers_ping(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/ping")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def drive(port: int, body: bytes, requests: int, clients: int) -> dict[str, Any]:
    """`requests` POSTs of `body` from `clients` threads, each over one keep-alive connection."""
    shares = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    start = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []
    reconnects = [0] * clients
    answers: list[bytes] = [b""] * clients

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.connect()
        start.wait()
        own = latencies[index]
        try:
            for _ in range(shares[index]):
                sent = time.perf_counter()
                connection.request("POST", "/invocations", body, JSON_HEADERS)
                response = connection.getresponse()
                answer = response.read()
                own.append(time.perf_counter() - sent)
                if response.status != 200:
                    failures.append(f"{response.status}: {answer[:200]!r}")
                # http.client opens a new connection for the next request when the server closed this one.
                reconnects[index] += response.will_close
                answers[index] = answer
        except Exception as exc:  # reported below; a thread's exception would otherwise be lost
            failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} request(s) failed, e.g. {failures[0]}")
    every = sorted(t for own in latencies for t in own)
    return {
        "seconds": round(seconds, 4),
        "requests": len(every),
        "requests_per_s": round(len(every) / seconds, 1),
        "latency_p50_ms": round(_quantile(every, 0.5) * 1000, 3),
        "latency_p99_ms": round(_quantile(every, 0.99) * 1000, 3),
        "connections_closed_by_server": sum(reconnects),
        "answer": answers[0],
    }


def _same_predictions(a: bytes, b: bytes) -> bool:
    left, right = json.loads(a)["predictions"], json.loads(b)["predictions"]
    if len(left) != len(right):
        return False
    for x, y in zip(left, right, strict=True):
        if x.get("label") != y.get("label"):
            return False
        for key, p in x.get("probabilities", {}).items():
            if abs(p - y["probabilities"][key]) > 1e-5:
                return False
    return True


def server_throughput(model_dir: Path, instances: list[dict[str, Any]], config: Config, logs: Path) -> dict:
    """Both servers up at once; per request size, alternate them over the repeats."""
    bodies = {n: json.dumps({"instances": instances[:n]}).encode() for n in config.request_rows}
    results: dict[int, dict[str, list[dict[str, Any]]]] = {
        n: {"conveyor": [], "flask": []} for n in config.request_rows
    }
    answers: dict[int, dict[str, bytes]] = {n: {} for n in config.request_rows}
    with model_servers(model_dir, logs) as ports:
        for n, body in bodies.items():
            for port in ports.values():  # warm-up: first requests, imports, allocator
                drive(port, body, max(20, config.requests // 20), config.clients)
            for repeat in range(config.server_repeats):
                order = ("conveyor", "flask") if repeat % 2 == 0 else ("flask", "conveyor")
                for kind in order:
                    run = drive(ports[kind], body, config.requests, config.clients)
                    answers[n][kind] = run.pop("answer")
                    results[n][kind].append(run)
                    progress(
                        f"model server, {n} row(s) {repeat + 1}/{config.server_repeats}: {kind}: "
                        f"{run['requests_per_s']:,.0f} requests/s, p50 {run['latency_p50_ms']:.2f} ms"
                    )
    payloads = []
    for n in config.request_rows:
        if not _same_predictions(answers[n]["conveyor"], answers[n]["flask"]):
            raise RuntimeError(f"the two servers answered a {n}-row request differently")
        median = {
            kind: {
                "requests_per_s": round(statistics.median(r["requests_per_s"] for r in runs), 1),
                "latency_p50_ms": round(statistics.median(r["latency_p50_ms"] for r in runs), 3),
                "latency_p99_ms": round(statistics.median(r["latency_p99_ms"] for r in runs), 3),
            }
            for kind, runs in results[n].items()
        }
        pairs = [
            round(c["requests_per_s"] / f["requests_per_s"], 4)
            for c, f in zip(results[n]["conveyor"], results[n]["flask"], strict=True)
        ]
        payloads.append(
            {
                "rows": n,
                "request_bytes": len(bodies[n]),
                "answer_bytes": len(answers[n]["conveyor"]),
                "answer": answers[n]["conveyor"].decode(),
                "runs": results[n],
                "median": median,
                "pair_ratios": pairs,
                "figures": {"conveyor_vs_flask": _goal(round(statistics.median(pairs), 3), GOAL_SERVER)},
            }
        )
    stages = handler_stages(model_dir, bodies, max(20, config.requests // 10), logs)
    for payload in payloads:
        payload["handler_ms"] = stages[str(payload["rows"])]
    from conveyor.local.model_server import default_workers  # what the server process chose

    workers = default_workers()
    return {"requests": config.requests, "clients": config.clients, "workers": workers, "payloads": payloads}


# ---------------------------------------------------------------------------------------------------------
# 3. The inference proxy.


class _LambdaContext:
    function_name = "conveyor-InferenceProxyFunction"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:conveyor-InferenceProxyFunction"
    aws_request_id = "bench"


def proxy_latency(payloads: list[dict[str, Any]], instances: list[dict[str, Any]], config: Config) -> dict:
    """Invoke the proxy's handler in process; SageMaker runtime answers each request's real answer at once.

    Two stubs: a botocore Stubber on a real client (the client's own parameter validation and event
    hooks run, as they do in Lambda; signing and HTTP do not), and a bare object whose invoke_endpoint
    returns the answer (the proxy's own code alone).
    """
    os.environ.update(
        STACK_NAME="conveyor",
        POWERTOOLS_SERVICE_NAME="conveyor",
        POWERTOOLS_LOG_LEVEL="INFO",
        # As the unit tests do: X-Ray needs the Lambda runtime's daemon; its cost is not measured here.
        POWERTOOLS_TRACE_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import boto3
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    from common import aws
    from inference_proxy import app as proxy

    template = json.loads((EVENTS / "http_api_v2_example.json").read_text())
    path = f"/models/{DATASET}/predict"
    template.update(
        rawPath=path,
        rawQueryString="",
        routeKey="POST /models/{name}/predict",
        headers={"content-type": "application/json", "accept": "application/json"},
        queryStringParameters=None,
        cookies=None,
        pathParameters={"name": DATASET},
        isBase64Encoded=False,
    )
    template["requestContext"]["http"].update(method="POST", path=path)
    template["requestContext"]["routeKey"] = "POST /models/{name}/predict"
    endpoint = f"conveyor-{DATASET}"

    def answer(body: bytes) -> dict[str, Any]:
        return {
            "Body": StreamingBody(io.BytesIO(body), len(body)),
            "ContentType": "application/json",
            "InvokedProductionVariant": "AllTraffic",
        }

    class InstantRuntime:
        body = b""

        def invoke_endpoint(self, **_: Any) -> dict[str, Any]:
            return answer(self.body)

    client = boto3.client(
        "sagemaker-runtime", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b"
    )
    cases = []
    try:
        for payload in payloads:
            n, body = payload["rows"], payload["answer"].encode()
            event = copy.deepcopy(template)
            event["body"] = json.dumps({"instances": instances[:n]})
            expected = json.loads(body)["predictions"]
            case: dict[str, Any] = {"rows": n, "request_bytes": len(event["body"]), "answer_bytes": len(body)}
            for stub in ("stubber", "instant"):
                stubber = Stubber(client)
                runtime: Any = client
                if stub == "instant":
                    runtime = InstantRuntime()
                    runtime.body = body
                aws.set_client("sagemaker-runtime", runtime)
                # The first call checks what the proxy sends; the rest are timed without that comparison.
                if stub == "stubber":
                    stubber.add_response(
                        "invoke_endpoint",
                        answer(body),
                        {
                            "EndpointName": endpoint,
                            "ContentType": "application/json",
                            "Accept": "application/json",
                            "Body": json.dumps({"instances": instances[:n]}).encode(),
                        },
                    )
                    stubber.activate()
                timings = []
                first_ms = None
                warmup = max(10, config.proxy_invocations // 20)
                for i in range(warmup + config.proxy_invocations):
                    call = copy.deepcopy(event)
                    if stub == "stubber" and i > 0:
                        stubber.add_response("invoke_endpoint", answer(body))
                    started = time.perf_counter()
                    response = proxy.handler(call, _LambdaContext())
                    elapsed = time.perf_counter() - started
                    if response["statusCode"] != 200:
                        raise RuntimeError(f"the proxy answered {response['statusCode']}: {response['body']}")
                    if i == 0:
                        first_ms = elapsed * 1000
                        if json.loads(response["body"])["predictions"] != expected:
                            raise RuntimeError("the proxy did not pass the endpoint's predictions through")
                    if i >= warmup:
                        timings.append(elapsed)
                if stub == "stubber":
                    stubber.assert_no_pending_responses()
                    stubber.deactivate()
                timings.sort()
                case[stub] = {
                    "invocations": len(timings),
                    "first_invocation_ms": round(first_ms or 0.0, 3),
                    "p50_ms": round(_quantile(timings, 0.5) * 1000, 4),
                    "p99_ms": round(_quantile(timings, 0.99) * 1000, 4),
                    "mean_ms": round(statistics.fmean(timings) * 1000, 4),
                }
                progress(
                    f"proxy, {n} row(s), {stub}: p50 {case[stub]['p50_ms']:.3f} ms, "
                    f"p99 {case[stub]['p99_ms']:.3f} ms"
                )
            case["figures"] = {
                "proxy_p50_ms": _goal(case["stubber"]["p50_ms"], GOAL_PROXY_P50_MS, at_most=True)
            }
            cases.append(case)
    finally:
        aws.reset_clients()
    return {"event": "tests/events/http_api_v2_example.json as POST /models/{name}/predict", "cases": cases}


# ---------------------------------------------------------------------------------------------------------
# Figures and reports.


def _quantile(ordered: list[float], q: float) -> float:
    """The `q` quantile of sorted values (nearest rank)."""
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def _goal(value: float, goal: float, *, at_most: bool = False) -> dict[str, Any]:
    met = value <= goal if at_most else value >= goal
    return {"value": value, "goal": f"{'<=' if at_most else '>='} {goal}", "met": met}


def machine() -> dict[str, Any]:
    return _shared.machine(("torch", "numpy", "flask", "werkzeug", "botocore", "aws-lambda-powertools"))


def code_version() -> dict[str, Any]:
    """Which conveyor was measured: the commit, and a digest of each measured file (it may be uncommitted)."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", *MEASURED_FILES], capture_output=True, text=True
    ).stdout
    files = {name: hashlib.sha256((ROOT / name).read_bytes()).hexdigest() for name in MEASURED_FILES}
    digest = hashlib.sha256("".join(f"{n}\0{h}\0" for n, h in files.items()).encode()).hexdigest()
    return {
        "commit": commit or None,
        "digest": digest,
        "files_sha256": files,
        "uncommitted_changes": sorted(line[3:] for line in dirty.splitlines() if line.strip()),
    }


def _mark(figure: dict[str, Any], text: str) -> str:
    return f"{text} ✅ met" if figure["met"] else f"**{text} ❌ missed**"


def markdown(report: dict[str, Any]) -> str:
    m, code, model = report["machine"], report["code"], report["model"]
    loop, server, proxy = (report["results"][k] for k in ("training_loop", "model_server", "proxy"))
    lines = [
        "# Training, serving and proxy benchmark",
        "",
        f"Generated by `benchmarks/train.py{' --quick' if report['config']['quick'] else ''}` on "
        f"{report['finished_at']} in {report['total_seconds']:.0f} s (medians over the repeats; each ratio is the median of the "
        "ratios of runs made back to back).",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"torch {m['torch']}, Flask {m['flask']}, botocore {m['botocore']}, Powertools "
        f"{m['aws-lambda-powertools']}, {m['platform']}; load average at start {m['load_average_at_start'][0]}, at the end "
        f"{m.get('load_average_at_end', ['?'])[0]}.",
        "",
        _shared.code_sentence(code, "measured files'", changed="a measured file changed during the run"),
        "",
        f"Data: {report['config']['rows']:,} generated churn rows (the preprocessing benchmark's generator), "
        f"split by `preprocess.core`; the served model was trained by `training/train.py` for "
        f"{model['epochs']} epoch(s) ({model['inputs']} inputs, hidden {model['hidden_units']}): test "
        f"{model['test_metric']} {model['test_value']:.3f} against the majority class's {model['baseline_value']:.3f}.",
        "",
        "## 1. Training loop",
        "",
        f"`train.fit` (no checkpoints, one process) against a bare AdamW loop over the same TabularMLP and "
        f"tensors: {loop['train_rows']:,} train rows x {loop['inputs']} inputs, batch {loop['batch_size']}, "
        f"{loop['epochs']} epoch(s) = {loop['steps']:,} steps each, {loop['torch_threads']} torch thread; "
        f"{len(loop['runs']['conveyor'])} run(s) of each. fit() also validates on "
        f"{loop['validation_rows']:,} rows and keeps the best weights after every epoch; the bare loop does not.",
        "",
        "| loop | samples/s | seconds | validation accuracy after |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (("conveyor", "conveyor `train.fit`"), ("bare", "bare torch loop")):
        lines.append(
            f"| {label} | {loop['median'][name]['samples_per_s']:,.0f} | {loop['median'][name]['seconds']:.2f} "
            f"| {loop['runs'][name][-1]['validation_accuracy']:.3f} |"
        )
    figure = loop["figures"]["conveyor_vs_bare"]
    lines += [
        "",
        f"conveyor ÷ bare (goal ≥ {GOAL_LOOP}): {_mark(figure, format(figure['value'], '.3f'))} "
        f"(the repeats' ratios: {', '.join(format(r, '.2f') for r in loop['pair_ratios'])}; in CPU time "
        f"of the process, which leaves out time taken by other processes: {loop['cpu_time_ratio']:.3f}).",
        "",
        "## 2. Model server",
        "",
        f"`conveyor.local.model_server` (an asyncio HTTP/1.1 front end handing requests to {server.get('workers', 1)} "
        "worker process(es), one per core as SageMaker's serving container runs them) against a naive Flask "
        "server (its threaded development server, one process; input_fn, predict_fn, output_fn per request), "
        "both loading the model with the "
        f"artefact's `code/inference.py`: {server['requests']:,} requests per run from {server['clients']} "
        "client threads, each over one keep-alive HTTP/1.1 connection on loopback; client and servers share "
        "the machine's cores.",
        "",
        "| rows per request | conveyor requests/s | Flask requests/s | conveyor p50 / p99 ms "
        f"| Flask p50 / p99 ms | conveyor ÷ Flask (goal ≥ {GOAL_SERVER:g}x) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for payload in server["payloads"]:
        med, fig = payload["median"], payload["figures"]["conveyor_vs_flask"]
        lines.append(
            f"| {payload['rows']} ({payload['request_bytes']:,} bytes) | {med['conveyor']['requests_per_s']:,.0f} "
            f"| {med['flask']['requests_per_s']:,.0f} "
            f"| {med['conveyor']['latency_p50_ms']:.2f} / {med['conveyor']['latency_p99_ms']:.2f} "
            f"| {med['flask']['latency_p50_ms']:.2f} / {med['flask']['latency_p99_ms']:.2f} "
            f"| {_mark(fig, format(fig['value'], '.2f') + 'x')} |"
        )
    lines += [
        "",
        "What both servers spend on a request besides HTTP (median ms of the artefact's handlers in one "
        "process, one request at a time): "
        + "; ".join(
            f"{p['rows']} row(s): input_fn {p['handler_ms']['input_fn']:.2f}, predict_fn "
            f"{p['handler_ms']['predict_fn']:.2f}, output_fn {p['handler_ms']['output_fn']:.2f}"
            for p in server["payloads"]
        )
        + ".",
        "",
        "The repeats' ratios: "
        + "; ".join(
            f"{p['rows']} row(s): " + ", ".join(format(r, ".2f") for r in p["pair_ratios"])
            for p in server["payloads"]
        )
        + ".",
        "",
        "## 3. Inference proxy",
        "",
        "The proxy Lambda's handler invoked in process on an HTTP API (payload format 2.0) event for "
        "`POST /models/{name}/predict`; SageMaker runtime answers the model's real answer at once. "
        "`Stubber`: a botocore Stubber on a real client (its parameter validation and event hooks run; "
        "signing and HTTP do not). `instant`: an object whose invoke_endpoint returns the answer (the "
        "proxy's own code alone). X-Ray tracing is off, as in the unit tests.",
        "",
        f"| rows per request | p50 ms (goal ≤ {GOAL_PROXY_P50_MS:g}) | p99 ms | instant stub p50 / p99 ms "
        "| first invocation ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    for case in proxy["cases"]:
        stubbed, instant, fig = case["stubber"], case["instant"], case["figures"]["proxy_p50_ms"]
        lines.append(
            f"| {case['rows']} ({case['request_bytes']:,} bytes) | {_mark(fig, format(stubbed['p50_ms'], '.3f'))} "
            f"| {stubbed['p99_ms']:.3f} | {instant['p50_ms']:.3f} / {instant['p99_ms']:.3f} "
            f"| {stubbed['first_invocation_ms']:.1f} |"
        )
    missed = report["summary"]["missed"]
    lines += ["", f"Goals missed: {', '.join(missed)}." if missed else "Every goal met.", ""]
    return "\n".join(lines)


def run_benchmark(config: Config, output_dir: Path, quick: bool) -> dict[str, Any]:
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "train",
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "code": code_version(),
        "config": {
            **dataclasses.asdict(config),
            "quick": quick,
            "seed": SEED,
            "goals": {
                "training_loop.conveyor_vs_bare": f">= {GOAL_LOOP}",
                "model_server.conveyor_vs_flask": f">= {GOAL_SERVER}",
                "proxy.proxy_p50_ms": f"<= {GOAL_PROXY_P50_MS}",
            },
        },
    }
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        progress(f"preprocessing {config.rows:,} generated rows ...")
        channels = make_channels(config.rows, work / "input")
        progress(f"training the served model ({config.model_epochs} epoch(s)) ...")
        report["model"] = train_model(channels, work / "job", config.model_epochs)
        model_dir = Path(report["model"].pop("model_dir"))
        instances = request_instances(channels, max(config.request_rows))
        results = {"training_loop": loop_throughput(channels, config)}
        results["model_server"] = server_throughput(model_dir, instances, config, work)
        results["proxy"] = proxy_latency(results["model_server"]["payloads"], instances, config)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for payload in results["model_server"]["payloads"]:
        payload.pop("answer")
    report["results"] = results

    if code_version()["digest"] != report["code"]["digest"]:
        progress("warning: a measured file changed during the run")
        report["code"]["changed_during_run"] = True
    missed = [
        f"training_loop.{name}" for name, f in results["training_loop"]["figures"].items() if not f["met"]
    ]
    missed += [
        f"model_server.conveyor_vs_flask at {p['rows']} row(s)"
        for p in results["model_server"]["payloads"]
        if not p["figures"]["conveyor_vs_flask"]["met"]
    ]
    missed += [
        f"proxy.p50_ms at {c['rows']} row(s)"
        for c in results["proxy"]["cases"]
        if not c["figures"]["proxy_p50_ms"]["met"]
    ]
    report["summary"] = {"missed": missed, "all_goals_met": not missed}
    # Other work on the machine shows in the figures: say how busy it was.
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    report["total_seconds"] = round(time.perf_counter() - started, 1)

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "train.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (output_dir / "train.md").write_text(markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_flask"]:
        flask_main(Path(argv[1]), int(argv[2]))
        return 0
    if argv[:1] == ["_stages"]:
        stages_main(Path(argv[1]), Path(argv[2]), int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data, one repeat: a smoke test")
    parser.add_argument("--repeats", type=int, help="runs of each loop and server (default: 15 and 5)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT, help="where results go")
    args = parser.parse_args(argv)
    missing = [name for name in ("torch", "flask") if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(
            f'{" and ".join(missing)} missing: pip install -e ".[train,bench]" (or make bench-train)'
        )
    config = Config.quick() if args.quick else Config()
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error("--repeats must be at least 1")
        config = dataclasses.replace(config, loop_repeats=args.repeats, server_repeats=args.repeats)
    report = run_benchmark(config, args.output_dir, args.quick)
    progress(f"done in {report['total_seconds']:.0f} s: {args.output_dir / 'train.md'}")
    print((args.output_dir / "train.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
