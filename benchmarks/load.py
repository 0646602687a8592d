"""A load test of the local HTTPS API: concurrent signed predictions while a new model takes over.

Starts a local stack (``LocalCloud``, with a canary of 50% and a bake of seconds, as the integration tests
run model updates), trains and deploys a small dataset, then drives ``POST /models/<name>/predict`` over
the local HTTPS API (SigV4-signed with ``conveyor.sigv4``, TLS verified against the stack's CA) from
``--clients`` threads in a client process of their own, each over one keep-alive ``requests.Session``, each
sending its next request as soon as the last is answered (a closed loop, no pause):

``steady``  ``--rounds`` pairs of ``--round-seconds`` each, no update running: the same client loop against
            the API, and against the model server directly (``POST /invocations`` on its loopback port: no
            TLS, signing, gateway, proxy Lambda or SageMaker runtime emulation), back to back in alternating
            order. The ratio of the API's requests/s to the direct server's (the median of the rounds'
            ratios) is the price of the API path on this machine; it has no goal.
``update``  ``--seconds`` of load through the API; after a third of it the same dataset is uploaded again,
            which trains, registers and deploys a second version as a blue/green update with a canary.
            The load goes on until ``--seconds`` have passed and at least ``TAIL_SECONDS`` after the
            update's execution finished (the old model server stops 5 s after it), and at most
            ``UPDATE_TIMEOUT`` after the upload.

Reported: requests/s, p50/p99 latency, every failed request (a status other than 200, a 200 without one
prediction per row, or a connection error), which model version answered over time, and the resident
memory (RSS) of the benchmark's own process, which holds the local stack (moto, the gateway, the proxy
Lambda, the hosting adapter), and of each model server (its front end and worker processes together), sampled
every ``SAMPLE_SECONDS``.

Goals, none of them about speed: no failed request; both versions answered, the old one first and the
new one last; no leak: each process's RSS at the end of its window ≤ ``MEMORY_RULE`` times its RSS at the
start. The windows: the stack's process from the end of the warm-up to the end of the steady rounds, and
to the end of the load (which adds what the update itself keeps: a second model and its data in moto); the
first model server from the end of the warm-up to its last sample before it stopped; the second from the
end of the update's execution to the end of the load. Results go to ``benchmarks/results/load.{json,md}``.

Usage::

    python benchmarks/load.py                           # 4 clients, 60 s (a little over 2 minutes on 2 cores)
    python benchmarks/load.py --clients 8 --seconds 120
    python benchmarks/load.py --quick                   # 2 clients, 15 s, one 3 s round: CI's size
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _shared
from end_to_end import code_version

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_OUTPUT = BENCHMARKS / "results"
# This directory holds a preprocess.py: it must not shadow the Lambda code's `preprocess` package that
# local mode imports in process.
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != BENCHMARKS]

DATASET = "load"
# A canary needs two instances; the bake is seconds long so that the update fits in the load.
STACK_PARAMETERS = {
    "CanaryTrafficPercent": "50",
    "InferenceInstanceCount": "2",
    "DeploymentWaitSeconds": "6",
    "TerminationWaitSeconds": "2",
    "LogLevel": "WARNING",
}
INSTANCES = [{"size": 1.0, "weight": 0.5}, {"size": 2.1, "weight": 0.2}]
DEFAULT_CLIENTS = 4
DEFAULT_SECONDS = 60.0
DEFAULT_ROUNDS = 3
DEFAULT_ROUND_SECONDS = 8.0
QUICK = {"clients": 2, "seconds": 15.0, "rounds": 1, "round_seconds": 3.0}
WARMUP_SECONDS = 2.0
UPLOAD_AT = 1 / 3  # of --seconds into the update phase
TAIL_SECONDS = 7.0  # after the update finished: the old server stops 5 s after it
UPDATE_TIMEOUT = 300.0
DEPLOY_TIMEOUT = 300.0
SAMPLE_SECONDS = 0.5
MEMORY_RULE = 1.2
REQUEST_TIMEOUT = 60
TIMELINE_BUCKETS = 12  # rows of the Markdown report's timeline


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def dataset(n: int = 400, seed: int = 7) -> bytes:
    """Two well separated classes (the model-update integration tests' data): a seeded model of it is as
    good as the last, so every upload of it deploys."""
    rng = random.Random(seed)
    lines = ["size,weight,label"]
    for _ in range(n):
        label = rng.choice("ab")
        size = rng.gauss(1.0 if label == "a" else 2.0, 0.4)
        lines.append(f"{size:.3f},{rng.random():.3f},{label}")
    return ("\n".join(lines) + "\n").encode()


# ---------------------------------------------------------------------------------------------------------
# The clients: a process of their own, so that their work does not take the stack's interpreter lock.


def clients_main(config: dict[str, Any]) -> dict[str, Any]:
    """Run `config["clients"]` threads against one URL until `config["seconds"]` have passed (or, when it is
    None, until stdin closes), each request's (start, latency, status, model version or error)."""
    import requests

    from conveyor.sigv4 import sign_request

    url, api = config["url"], config["mode"] == "api"
    body = json.dumps({"instances": INSTANCES}).encode()
    # The stack's outputs file, as the CLI reads it: credentials, region and the CA of the local API.
    outputs = json.loads(Path(config["outputs_file"]).read_text())
    credentials = (outputs["AccessKeyId"], outputs["SecretAccessKey"], None) if api else None
    stop = threading.Event()
    hard_stop = time.monotonic() + config["max_seconds"]
    records: list[list[list[Any]]] = [[] for _ in range(config["clients"])]

    def headers() -> dict[str, str]:
        plain = {"Content-Type": "application/json"}
        if credentials is None:
            return plain
        return sign_request("POST", url, body, credentials, outputs["Region"], headers=plain)

    def client(mine: list[list[Any]]) -> None:
        session = requests.Session()
        while not stop.is_set() and time.monotonic() < hard_stop:
            signed = headers()
            started_at, clock = time.time(), time.perf_counter()
            try:
                response = session.post(
                    url, data=body, headers=signed, timeout=REQUEST_TIMEOUT, verify=outputs["CaBundle"]
                )
                status, text = response.status_code, response.text
            except requests.RequestException as exc:  # a dropped connection is a failed request too
                mine.append([started_at, time.perf_counter() - clock, 0, repr(exc)[:300]])
                continue
            latency = time.perf_counter() - clock
            try:
                answer = json.loads(text)
            except ValueError:
                answer = None
            if (
                status == 200
                and isinstance(answer, dict)
                and len(answer.get("predictions") or []) == len(INSTANCES)
            ):
                mine.append([started_at, latency, 200, answer.get("model_version") or "?"])
            else:
                # A 200 that is not one prediction per row is a failure as well (status -1).
                mine.append([started_at, latency, status if status != 200 else -1, text[:300]])
        session.close()

    threads = [threading.Thread(target=client, args=(mine,), daemon=True) for mine in records]
    started_at = time.time()
    for thread in threads:
        thread.start()
    print(json.dumps({"started_at": started_at}), flush=True)
    if config["seconds"] is None:
        # Until the benchmark closes our stdin (or the hard stop, should it never do so).
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        stop.wait(max(0.0, hard_stop - time.monotonic()))
    else:
        stop.wait(config["seconds"])
    stop.set()
    stopped_at = time.time()
    for thread in threads:
        thread.join(timeout=REQUEST_TIMEOUT + 5)
    return {
        "started_at": started_at,
        "stopped_at": stopped_at,
        "records": sorted(record for mine in records for record in mine),
    }


class ClientProcess:
    """`clients_main` in a child process: start it, then `finish()` for its records."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_clients", json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise RuntimeError(f"the client process exited ({self.process.returncode}) before starting")
        self.started_at = float(json.loads(line)["started_at"])

    def finish(self) -> dict[str, Any]:
        """Close the clients' stdin (which stops clients told to run until then) and wait for their
        records."""
        output, _ = self.process.communicate(timeout=REQUEST_TIMEOUT + 60)
        if self.process.returncode != 0:
            raise RuntimeError(f"the client process failed ({self.process.returncode})")
        return json.loads(output)  # type: ignore[no-any-return]


def run_clients(config: dict[str, Any], mode: str, url: str, clients: int, seconds: float) -> dict[str, Any]:
    process = ClientProcess({**config, "mode": mode, "url": url, "clients": clients, "seconds": seconds})
    return process.finish()


# ---------------------------------------------------------------------------------------------------------
# Memory: this process (the local stack) and every model server it started.


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process (psutil when installed, else /proc/<pid>/status); None once it is gone."""
    if importlib.util.find_spec("psutil") is not None:
        import psutil

        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def with_workers(pid: int) -> list[int]:
    """A model server's front end and its worker processes (its children)."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                children += [int(c) for c in (task / "children").read_text().split()]
    return [pid, *children]


def tree_rss_bytes(pid: int) -> int | None:
    """The RSS of a model server: its front end's and its workers' together (None once it is gone)."""
    values = [rss_bytes(p) for p in with_workers(pid)]
    return None if values[0] is None else sum(v for v in values if v is not None)


def model_servers() -> dict[int, str]:
    """The model server processes this process started: pid → the endpoint config it serves (the path of
    its model directory is ``endpoints/<endpoint>/<endpoint config>/model``)."""
    found = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent != me:
                continue
            arguments = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if "conveyor.local.model_server" in arguments:
                found[int(entry.name)] = Path(arguments[arguments.index("--model-dir") + 1]).parent.name
    return found


class MemorySampler(threading.Thread):
    """Every `interval` seconds, the RSS of this process and of each model server: (wall time, bytes)."""

    def __init__(self, interval: float = SAMPLE_SECONDS) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.interval = interval
        self.samples: dict[int, list[tuple[float, int]]] = {}
        self.names: dict[int, str] = {os.getpid(): "stack"}
        self._done = threading.Event()
        self._lock = threading.Lock()

    def sample(self) -> None:
        servers = model_servers()
        now = time.time()
        with self._lock:
            self.names.update(servers)
            for pid in (os.getpid(), *servers):
                value = rss_bytes(pid) if pid == os.getpid() else tree_rss_bytes(pid)
                if value is not None:
                    self.samples.setdefault(pid, []).append((now, value))

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)
        self.sample()

    def at(self, pid: int, moment: float) -> tuple[float, int] | None:
        """The first sample of `pid` at or after `moment` (else its last one)."""
        with self._lock:
            samples = self.samples.get(pid, [])
        return next((s for s in samples if s[0] >= moment), samples[-1] if samples else None)

    def last(self, pid: int, until: float | None = None) -> tuple[float, int] | None:
        with self._lock:
            samples = [s for s in self.samples.get(pid, []) if until is None or s[0] <= until]
        return samples[-1] if samples else None


def memory_window(
    name: str, sampler: MemorySampler, pid: int, start: float, end: float | None, requests: int
) -> dict[str, Any]:
    """RSS at the start and the end of a window of a process's life, and the no-leak verdict."""
    before, after = sampler.at(pid, start), sampler.last(pid, end)
    if before is None or after is None:
        return {"process": name, "pid": pid, "measured": False}
    growth = after[1] - before[1]
    return {
        "process": name,
        "pid": pid,
        "measured": True,
        "window_seconds": round(after[0] - before[0], 1),
        "requests_answered_in_window": requests,
        "before_mib": round(before[1] / (1 << 20), 1),
        "after_mib": round(after[1] / (1 << 20), 1),
        "growth_mib": round(growth / (1 << 20), 1),
        "growth_percent": round(100 * growth / before[1], 1),
        "peak_mib": round(
            max(v for t, v in sampler.samples[pid] if before[0] <= t <= after[0]) / (1 << 20), 1
        ),
        "met": after[1] <= MEMORY_RULE * before[1],
    }


# ---------------------------------------------------------------------------------------------------------
# What the clients saw.


def quantile(ordered: list[float], q: float) -> float:
    """The `q` quantile of sorted values (nearest rank)."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    """Requests/s, latency and failures of one client run (``clients_main``'s answer)."""
    records = run["records"]
    seconds = run["stopped_at"] - run["started_at"]
    answered = sorted(r[1] for r in records if r[2] == 200)
    failed = [r for r in records if r[2] != 200]
    return {
        "seconds": round(seconds, 3),
        "requests": len(records),
        "answered": len(answered),
        "failed": len(failed),
        "requests_per_s": round(len(answered) / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": round(quantile(answered, 0.5) * 1000, 2) if answered else None,
        "p99_ms": round(quantile(answered, 0.99) * 1000, 2) if answered else None,
        "max_ms": round(answered[-1] * 1000, 2) if answered else None,
        "failures_by_status": dict(Counter(str(r[2]) for r in failed)),
        "failure_samples": [{"status": r[2], "answer": r[3]} for r in failed[:5]],
        "versions": dict(Counter(r[3] for r in records if r[2] == 200)),
    }


def timeline(records: list[list[Any]], start: float, bucket: float) -> list[dict[str, Any]]:
    """Answers per version and failures per `bucket` seconds of request start, from `start`."""
    rows: dict[int, dict[str, Any]] = {}
    for started_at, _, status, outcome in records:
        index = max(0, int((started_at - start) // bucket))
        row = rows.setdefault(index, {"from_s": round(index * bucket, 1), "versions": Counter(), "failed": 0})
        if status == 200:
            row["versions"][outcome] += 1
        else:
            row["failed"] += 1
    return [
        {**rows[i], "versions": dict(rows[i]["versions"])} if i in rows else {}
        for i in range(max(rows, default=-1) + 1)
    ]


def version_spans(records: list[list[Any]], start: float) -> dict[str, dict[str, Any]]:
    """For each version that answered: how often, and the first and last request it answered (seconds)."""
    spans: dict[str, dict[str, Any]] = {}
    for started_at, _, status, outcome in records:
        if status != 200:
            continue
        span = spans.setdefault(outcome, {"answered": 0, "first_s": started_at - start})
        span["answered"] += 1
        span["last_s"] = started_at - start
    return {
        version: {**span, "first_s": round(span["first_s"], 2), "last_s": round(span["last_s"], 2)}
        for version, span in spans.items()
    }


# ---------------------------------------------------------------------------------------------------------
# The scenario.


def upload(target: Any, body: bytes) -> set[str]:
    """Put a new version of datasets/<DATASET>/data.csv; the executions that existed before it."""
    sfn = target.client("stepfunctions")
    machine = target.outputs["StateMachineArn"]
    before = {e["name"] for e in sfn.list_executions(stateMachineArn=machine)["executions"]}
    target.client("s3").put_object(
        Bucket=target.outputs["RawBucketName"], Key=f"datasets/{DATASET}/data.csv", Body=body
    )
    return before


def wait_for_execution(target: Any, before: set[str], timeout: float) -> dict[str, Any] | None:
    """The execution that the last upload started, once it finished; None after `timeout` seconds."""
    sfn = target.client("stepfunctions")
    machine = target.outputs["StateMachineArn"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for execution in sfn.list_executions(stateMachineArn=machine)["executions"]:
            fresh = execution["name"].startswith(f"{DATASET}-") and execution["name"] not in before
            if fresh and execution["status"] != "RUNNING":
                description: dict[str, Any] = sfn.describe_execution(executionArn=execution["executionArn"])
                events = sfn.get_execution_history(executionArn=execution["executionArn"], maxResults=1000)
                description["states_entered"] = [
                    e["stateEnteredEventDetails"]["name"]
                    for e in events["events"]
                    if e["type"].endswith("StateEntered")
                ]
                return description
        time.sleep(0.5)
    return None


def _execution_summary(description: dict[str, Any] | None, origin: float) -> dict[str, Any]:
    if description is None:
        return {"status": "TIMED_OUT", "outcome": None}
    output = json.loads(description.get("output") or "{}")
    return {
        "status": description["status"],
        "outcome": output.get("outcome"),
        "version": output.get("version"),
        "error": description.get("error"),
        "cause": (description.get("cause") or "")[:500] or None,
        "started_s": round(description["startDate"].timestamp() - origin, 2),
        "finished_s": round(description["stopDate"].timestamp() - origin, 2),
        "canary": "UpdateEndpointCanary" in description.get("states_entered", []),
    }


def run_scenario(
    clients: int, seconds: float, rounds: int, round_seconds: float, work: Path
) -> dict[str, Any]:
    """Start the stack, deploy a first version, measure the steady rounds and the update under load."""
    _shared.quiet_local_stack()
    from conveyor import client
    from conveyor.local.cloud import LocalCloud

    started = time.perf_counter()
    sampler = MemorySampler()
    # The in-process Lambdas print Powertools' metric blobs to stdout; the report goes there.
    with (
        contextlib.redirect_stdout(sys.stderr),
        LocalCloud(
            workdir=work / "stack",
            parameters=STACK_PARAMETERS,
            lambda_environment={"POWERTOOLS_METRICS_DISABLED": "true"},
        ) as cloud,
    ):
        from common.naming import endpoint_name, slugify

        stack_seconds = time.perf_counter() - started
        # The stack as a user's tools see it: from its outputs file.
        outputs_file = work / "outputs.json"
        outputs_file.write_text(json.dumps(cloud.outputs))
        target = client.load_target(outputs_file)
        progress(f"local stack up in {stack_seconds:.1f} s; training and deploying the first version ...")
        clock = time.perf_counter()
        first = _execution_summary(wait_for_execution(target, upload(target, dataset()), DEPLOY_TIMEOUT), 0)
        if first["outcome"] != "deployed":
            raise RuntimeError(f"the first version did not deploy: {first}")
        first_seconds = time.perf_counter() - clock
        server = cloud.hosting.serving(endpoint_name(cloud.stack.stack_name, slugify(DATASET)))
        assert server is not None
        urls = {
            "api": f"{cloud.outputs['ApiUrl']}/models/{DATASET}/predict",
            "direct": f"http://127.0.0.1:{server.port}/invocations",
        }
        config = {"outputs_file": str(outputs_file), "max_seconds": seconds + UPDATE_TIMEOUT + 60}

        sampler.start()
        progress(f"version {first['version']} serves; warming up ({WARMUP_SECONDS:g} s each way) ...")
        for mode, url in urls.items():
            run_clients(config, mode, url, clients, WARMUP_SECONDS)
        load_started_at = time.time()
        sampler.sample()
        steady = steady_rounds(config, urls, clients, rounds, round_seconds, server.process.pid)
        sampler.sample()
        steady_ended_at = time.time()
        progress(f"the update phase: {clients} clients through the API for at least {seconds:g} s ...")
        update_run, upload_at, second = update_under_load(config, urls["api"], clients, seconds, target)
        sampler.stop()

    records = [r for round_ in steady for mode in ("api", "direct") for r in round_[mode].pop("_records")]
    records += update_run["records"]
    update = describe_update(update_run, upload_at, first["version"], second)
    origin = update_run["started_at"]
    finished = origin + second["finished_s"] if "finished_s" in second else update_run["stopped_at"]
    stack = "the benchmark process: the local stack (moto, gateway, proxy Lambda, hosting adapter)"
    memory = [
        memory_window(
            f"{stack}, the steady rounds only",
            sampler,
            os.getpid(),
            load_started_at,
            steady_ended_at,
            sum(round_["api"]["answered"] for round_ in steady),
        ),
        memory_window(
            f"{stack}, the steady rounds and the update",
            sampler,
            os.getpid(),
            load_started_at,
            update_run["stopped_at"],
            # Every request through the API, and none of those to the model server directly.
            update["answered"] + sum(round_["api"]["answered"] for round_ in steady),
        ),
    ]
    servers = [pid for pid in sampler.names if pid != os.getpid() and pid in sampler.samples]
    for pid in sorted(servers, key=lambda pid: sampler.samples[pid][0]):
        version = sampler.names[pid].removeprefix(f"{DATASET}-")
        # The first server from the end of the warm-up; the next from the moment it took all traffic.
        start = load_started_at if version == first["version"] else finished
        answered = sum(1 for r in records if r[2] == 200 and r[3] == version and r[0] >= start)
        memory.append(
            memory_window(
                f"model server of version {version}",
                sampler,
                pid,
                start,
                update_run["stopped_at"],
                answered,
            )
        )
    return {
        "stack_start_seconds": round(stack_seconds, 2),
        "first_deploy_seconds": round(first_seconds, 2),
        "first_version": first["version"],
        "second_version": second.get("version"),
        "steady": steady,
        "update": update,
        "memory": memory,
        "sampler_seconds": SAMPLE_SECONDS,
    }


def cpu_seconds(pid: int, workers: bool = False) -> float | None:
    """User + system CPU time a process (all its threads) has used so far, with its children's (a model
    server's workers) when `workers`; None once it is gone."""
    total = 0.0
    for index, process in enumerate(with_workers(pid) if workers else [pid]):
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            if index == 0:
                return None
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def steady_rounds(
    config: dict[str, Any],
    urls: dict[str, str],
    clients: int,
    rounds: int,
    round_seconds: float,
    server_pid: int,
) -> list[dict[str, Any]]:
    """The same client loop against the API and the model server directly, back to back, alternating;
    with the CPU time the stack's process and the model server spent per answered request."""
    steady = []
    processes = {"stack": os.getpid(), "model_server": server_pid}
    for index in range(rounds):
        order = ("api", "direct") if index % 2 == 0 else ("direct", "api")
        result: dict[str, Any] = {"order": list(order)}
        for mode in order:
            before = {name: cpu_seconds(pid, name == "model_server") for name, pid in processes.items()}
            run = run_clients(config, mode, urls[mode], clients, round_seconds)
            after = {name: cpu_seconds(pid, name == "model_server") for name, pid in processes.items()}
            summary = summarise(run)
            summary["cpu_ms_per_request"] = {
                name: round(1000 * (after[name] - start) / summary["answered"], 3)
                if start is not None and after[name] is not None and summary["answered"]
                else None
                for name, start in before.items()
            }
            result[mode] = {**summary, "_records": run["records"]}
        api, direct = result["api"], result["direct"]
        result["api_vs_direct_requests_per_s"] = round(
            api["requests_per_s"] / max(direct["requests_per_s"], 1e-9), 3
        )
        progress(
            f"round {index + 1}/{rounds}: API {api['requests_per_s']:.0f} req/s, p50 {api['p50_ms']} ms; "
            f"the model server directly {direct['requests_per_s']:.0f} req/s, p50 {direct['p50_ms']} ms"
        )
        steady.append(result)
    return steady


def update_under_load(
    config: dict[str, Any], url: str, clients: int, seconds: float, target: Any
) -> tuple[dict[str, Any], float, dict[str, Any]]:
    """Load through the API; a second upload a third of the way in; the load goes on until `seconds` have
    passed and `TAIL_SECONDS` after the update's execution finished. The clients' run, when the upload
    went out (seconds into the load) and what its execution did."""
    load = ClientProcess({**config, "mode": "api", "url": url, "clients": clients, "seconds": None})
    origin = load.started_at
    time.sleep(max(0.0, origin + seconds * UPLOAD_AT - time.time()))
    upload_at = time.time() - origin
    progress(f"uploading the second version at {upload_at:.1f} s ...")
    described = wait_for_execution(target, upload(target, dataset()), UPDATE_TIMEOUT)
    execution = _execution_summary(described, origin)
    finished = origin + execution["finished_s"] if described is not None else time.time()
    progress(
        f"the update's execution: {execution['status']} ({execution['outcome']}) at {finished - origin:.1f} s"
        + (f": {execution['error']}: {execution['cause']}" if execution.get("error") else "")
    )
    time.sleep(max(0.0, max(origin + seconds, finished + TAIL_SECONDS) - time.time()))
    return load.finish(), upload_at, execution


def describe_update(
    run: dict[str, Any], upload_at: float, old: str, execution: dict[str, Any]
) -> dict[str, Any]:
    """What the clients saw during the update: the figures, which version answered when, the canary."""
    origin, new = run["started_at"], execution.get("version")
    update = summarise(run)
    update["upload_at_s"] = round(upload_at, 2)
    update["execution"] = execution
    spans = update["versions_over_time"] = version_spans(run["records"], origin)
    update["timeline_1s"] = timeline(run["records"], origin, 1.0)
    in_order = [r[3] for r in run["records"] if r[2] == 200]
    update["both_versions"] = bool(
        in_order and new and in_order[0] == old and in_order[-1] == new and {old, new} <= spans.keys()
    )
    if update["both_versions"]:
        # The canary: from the new version's first answer to the old one's last, both answered.
        first_new = min(r[0] for r in run["records"] if r[2] == 200 and r[3] == new)
        last_old = max(r[0] for r in run["records"] if r[2] == 200 and r[3] == old)
        window = [r[3] for r in run["records"] if r[2] == 200 and first_new <= r[0] <= last_old]
        update["canary_window"] = {
            "from_s": spans[new]["first_s"],
            "to_s": spans[old]["last_s"],
            "new_version_share": round(window.count(new) / max(len(window), 1), 3),
        }
    return update


# ---------------------------------------------------------------------------------------------------------
# The report.


def machine() -> dict[str, Any]:
    return _shared.machine(("moto", "boto3", "requests", "torch", "aws-lambda-powertools", "psutil"))


def build_report(results: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    steady, update = results["steady"], results["update"]
    ratio = round(statistics.median(r["api_vs_direct_requests_per_s"] for r in steady), 3)
    # Through the API (the steady rounds and the update); the baseline's own requests apart.
    failed = update["failed"] + sum(r["api"]["failed"] for r in steady)
    requests = update["requests"] + sum(r["api"]["requests"] for r in steady)
    direct = {
        "failed": sum(r["direct"]["failed"] for r in steady),
        "of": sum(r["direct"]["requests"] for r in steady),
    }
    measured = [w for w in results["memory"] if w["measured"]]
    servers = [w for w in results["memory"] if w["process"].startswith("model server")]
    # Both servers (the old and the new model) and the stack's process, measured.
    memory_met = bool(measured) and len(measured) == len(results["memory"]) and len(servers) >= 2
    memory_met = memory_met and all(w["met"] for w in measured)
    figures = {
        "failed_requests": {
            "value": failed,
            "of": requests,
            "model_server_directly": direct,
            "goal": "== 0, and none of the baseline's",
            "met": failed == 0 and direct["failed"] == 0,
        },
        "both_versions_answered": {
            "value": update["both_versions"],
            "goal": "the old version first, the new one last, both during the update",
            "met": update["both_versions"] and update["execution"]["outcome"] == "deployed",
        },
        "memory_growth": {
            "value": max((w["growth_percent"] for w in measured), default=None),
            "goal": f"each process: RSS after <= {MEMORY_RULE} x RSS before",
            "met": memory_met,
        },
        "api_vs_direct_requests_per_s": {"value": ratio, "goal": None},
    }
    missed = [name for name, figure in figures.items() if figure.get("met") is False]
    results["median_steady"] = {
        mode: {
            **{
                key: round(statistics.median(r[mode][key] for r in steady), 2)
                for key in ("requests_per_s", "p50_ms", "p99_ms")
            },
            "cpu_ms_per_request": {
                name: _median([r[mode]["cpu_ms_per_request"][name] for r in steady])
                for name in ("stack", "model_server")
            },
        }
        for mode in ("api", "direct")
    }
    results["figures"] = figures
    return {
        "config": config,
        "results": results,
        "summary": {"missed": missed, "all_goals_met": not missed},
    }


def _cpu(api: dict[str, Any], direct: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "?" if value is None else f"{value:.2f} ms"

    a, d = api["cpu_ms_per_request"], direct["cpu_ms_per_request"]
    return (
        f"the stack's process {ms(a['stack'])} through the API ({ms(d['stack'])} while the clients called "
        "the model server directly: its background work, such as the SQS pollers), the model server "
        f"{ms(a['model_server'])} through the API and {ms(d['model_server'])} directly"
    )


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def _mark(met: bool, text: str) -> str:
    return f"{text} ✅ met" if met else f"**{text} ❌ missed**"


def markdown(report: dict[str, Any]) -> str:
    m, code, config, results = report["machine"], report["code"], report["config"], report["results"]
    figures, update, median = results["figures"], results["update"], results["median_steady"]
    execution = update["execution"]
    old, new = results["first_version"], results["second_version"]
    label = {old: "old", new: "new"}
    parameters = ", ".join(f"{k}={v}" for k, v in config["stack_parameters"].items())
    rss_source = "psutil" if m.get("psutil") else "/proc/<pid>/status (VmRSS)"
    lines = [
        "# Local HTTPS API under load",
        "",
        f"Generated by `benchmarks/load.py{' --quick' if config['quick'] else ''}` on "
        f"{report['finished_at']} in {report['total_seconds']:.0f} s: {config['clients']} client threads, "
        f"at least {config['seconds']:g} s of load with a model update, {config['rounds']} steady "
        f"round(s) of {config['round_seconds']:g} s each way.",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"moto {m['moto']}, boto3 {m['boto3']}, requests {m['requests']}, torch {m['torch']}, "
        f"{m['platform']}; load average at start {m['load_average_at_start'][0]}, at the end "
        f"{m.get('load_average_at_end', ['?'])[0]}. RSS read from {rss_source} every "
        f"{results['sampler_seconds']:g} s.",
        "",
        _shared.code_sentence(code, "pipeline code"),
        "",
        f"Stack: `LocalCloud` with {parameters} (started in {results['stack_start_seconds']:.1f} s). Data: "
        f"{config['dataset_rows']} rows of two classes uploaded to `datasets/{DATASET}/data.csv` (deployed "
        f"in {results['first_deploy_seconds']:.1f} s), and the same bytes again during the load, which "
        "trains the same model and deploys it as a second version. Each request: "
        f"`POST /models/{DATASET}/predict` with {len(INSTANCES)} rows, SigV4-signed, over TLS. Clients: "
        f"{config['client']}.",
        "",
        "## The update under load",
        "",
        "| measured | value |",
        "|---|---:|",
        f"| requests answered ÷ seconds of load | {update['requests_per_s']:,.1f} req/s "
        f"({update['answered']:,} in {update['seconds']:.1f} s) |",
        f"| latency p50 / p99 / max | {update['p50_ms']} / {update['p99_ms']} / {update['max_ms']} ms |",
        f"| failed requests (goal 0) | {_mark(update['failed'] == 0, str(update['failed']))} |",
        f"| second version uploaded at | {update['upload_at_s']:.1f} s |",
    ]
    if "started_s" in execution:
        canary = "canary (UpdateEndpointCanary)" if execution["canary"] else "**no canary**"
        lines.append(
            f"| its execution | {execution['status']}, {execution['outcome']}, "
            f"{execution['started_s']:.1f} s → {execution['finished_s']:.1f} s, {canary} |"
        )
    else:
        lines.append(f"| its execution | **{execution['status']}** |")
    for version, span in update["versions_over_time"].items():
        lines.append(
            f"| {label.get(version, 'unexpected')} version `{version}` answered | {span['answered']:,} "
            f"requests, {span['first_s']:.1f} s → {span['last_s']:.1f} s |"
        )
    window = update.get("canary_window")
    if window:
        lines.append(
            f"| both answered (canary) | {window['from_s']:.1f} s → {window['to_s']:.1f} s, "
            f"{window['new_version_share']:.0%} by the new version |"
        )
    both = figures["both_versions_answered"]["met"]
    lines += [
        "",
        "Both versions answered, the old one first and the new one last: "
        f"{_mark(both, 'yes' if both else 'no')}.",
        "",
        "Which version answered over time (requests by the second they started in):",
        "",
        "| seconds | old | new | failed |",
        "|---|---:|---:|---:|",
    ]
    rows = update["timeline_1s"]
    step = max(1, math.ceil(len(rows) / TIMELINE_BUCKETS))
    for start in range(0, len(rows), step):
        chunk = [r for r in rows[start : start + step] if r]
        counts: Counter[str] = Counter()
        for r in chunk:
            counts.update(r["versions"])
        failed = sum(r["failed"] for r in chunk)
        lines.append(
            f"| {start}-{min(start + step, len(rows))} | {counts.get(old, 0):,} | "
            f"{counts.get(new or '', 0):,} | {failed} |"
        )
    if update["failure_samples"]:
        samples = "; ".join(f"{f['status']} {f['answer'][:120]}" for f in update["failure_samples"])
        lines += ["", f"First failures: {samples}"]
    lines += [
        "",
        "## Steady load: the API against the model server directly",
        "",
        f"Each round runs the same client loop for {config['round_seconds']:g} s against the API and against "
        "the model server's own `POST /invocations` (plain HTTP on loopback, no signing), back to back in "
        "alternating order, with no update running.",
        "",
        "| round | API req/s | p50 / p99 ms | directly req/s | p50 / p99 ms | API ÷ directly, req/s "
        "| failed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(results["steady"], 1):
        a, d = r["api"], r["direct"]
        lines.append(
            f"| {i} ({r['order'][0]} first) | {a['requests_per_s']:,.1f} | {a['p50_ms']} / {a['p99_ms']} "
            f"| {d['requests_per_s']:,.1f} | {d['p50_ms']} / {d['p99_ms']} "
            f"| {r['api_vs_direct_requests_per_s']:.3f} | {a['failed'] + d['failed']} |"
        )
    a, d = median["api"], median["direct"]
    lines += [
        f"| median | {a['requests_per_s']:,.1f} | {a['p50_ms']} / {a['p99_ms']} | {d['requests_per_s']:,.1f} "
        f"| {d['p50_ms']} / {d['p99_ms']} | {figures['api_vs_direct_requests_per_s']['value']:.3f} | |",
        "",
        "The API path adds TLS, SigV4 signing and checking, the gateway, the proxy Lambda (Powertools, "
        "boto3), moto's SageMaker runtime and the hosting adapter's own connection to the model server, all "
        "in the stack's one Python process, on the same cores as the clients and the model server: this "
        "machine's local-mode figure, not AWS's. CPU time per answered request (median of the rounds): "
        f"{_cpu(a, d)}.",
        "",
        "## Memory (RSS)",
        "",
        f"Rule: no leak when each process's RSS at the end of its window is at most {MEMORY_RULE:g}x its RSS "
        "at the start (the stack's process and the first model server: from the end of the warm-up; the "
        "second model server: from the end of the update's execution).",
        "",
        "| process | window | requests answered | before MiB | after MiB | growth | peak MiB | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for w in results["memory"]:
        if not w["measured"]:
            lines.append(f"| {w['process']} | | | | | | | **not measured ❌ missed** |")
            continue
        growth = f"{w['growth_mib']:+.1f} MiB ({w['growth_percent']:+.1f}%)"
        lines.append(
            f"| {w['process']} | {w['window_seconds']:.0f} s | {w['requests_answered_in_window']:,} "
            f"| {w['before_mib']:.1f} | {w['after_mib']:.1f} | {growth} | {w['peak_mib']:.1f} "
            f"| {_mark(w['met'], f'≤ {MEMORY_RULE:g}x')} |"
        )
    missed = report["summary"]["missed"]
    lines += ["", f"Goals missed: {', '.join(missed)}." if missed else "Every goal met.", ""]
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    from conveyor.local.cloud import LOCAL_PARAMETERS

    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    header = {"machine": machine(), "code": code_version()}
    config = {
        "clients": args.clients,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "round_seconds": args.round_seconds,
        "quick": args.quick,
        "warmup_seconds": WARMUP_SECONDS,
        "upload_at": f"{UPLOAD_AT:.3f} of --seconds",
        "tail_seconds": TAIL_SECONDS,
        "dataset_rows": len(dataset().splitlines()) - 1,
        "instances_per_request": len(INSTANCES),
        "stack_parameters": {**LOCAL_PARAMETERS, **STACK_PARAMETERS},
        "client": f"one process of {args.clients} threads, each a keep-alive requests.Session sending its "
        "next request when the last is answered",
        "memory_rule": f"RSS after <= {MEMORY_RULE} x RSS before, for each process",
    }
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        results = run_scenario(args.clients, args.seconds, args.rounds, args.round_seconds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "load", "started_at": started_at, **header, **build_report(results, config)}
    if code_version()["digest"] != report["code"]["digest"]:
        progress("warning: the pipeline's code changed during the run")
        report["code"]["changed_during_run"] = True
    _shared.write_results(report, started, output_dir, "load", markdown)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_clients"]:
        print(json.dumps(clients_main(json.loads(argv[1]))), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--clients", type=int, default=DEFAULT_CLIENTS, help=f"client threads (default: {DEFAULT_CLIENTS})"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help=f"the update phase's load, at least (default: {DEFAULT_SECONDS:g})",
    )
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, help=f"steady rounds (default: {DEFAULT_ROUNDS})"
    )
    parser.add_argument(
        "--round-seconds",
        type=float,
        default=DEFAULT_ROUND_SECONDS,
        help=f"each side of a steady round (default: {DEFAULT_ROUND_SECONDS:g})",
    )
    parser.add_argument("--quick", action="store_true", help="2 clients, 15 s, one 3 s round: CI's size")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT, help="where results go")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.clients < 1 or args.rounds < 1 or args.seconds <= 0 or args.round_seconds <= 0:
        parser.error("--clients and --rounds must be at least 1, --seconds and --round-seconds above 0")
    missing = [name for name in ("moto", "torch") if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f'{" and ".join(missing)} missing: pip install -e ".[local,train]" (or make bench-load)')
    report = run_benchmark(args, args.output_dir)
    progress(f"done in {report['total_seconds']:.0f} s: {args.output_dir / 'load.md'}")
    print((args.output_dir / "load.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
