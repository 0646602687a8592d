"""The local model server: HTTP/1.1 in a front end, the model's handlers in worker processes."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conveyor.local import model_server

# Nagle's algorithm against the client's delayed ACK stalls each keep-alive reply by ~40 ms on Linux.
REQUESTS = 25
STALL_SECONDS = 0.04

# Serving handlers as inference.py defines them: each answer says which worker process gave it.
ECHO_INFERENCE = """
import json, os, time

def model_fn(model_dir):
    if os.environ.get("ECHO_FAIL_TO_LOAD"):
        raise RuntimeError("the weights are missing (ECHO_FAIL_TO_LOAD)")
    return {"loaded_from": model_dir}

def input_fn(body, content_type):
    if content_type != "application/json":
        raise ValueError(f"content type {content_type} is not supported")
    return json.loads(body)

def predict_fn(data, model):
    if data.get("crash"):
        os._exit(9)
    if data.get("fail"):
        raise RuntimeError("the model cannot answer this")
    time.sleep(data.get("sleep", 0))
    return {"worker": os.getpid(), "instances": len(data.get("instances", [])), "threads": os.environ["OMP_NUM_THREADS"]}

def output_fn(prediction, accept):
    return json.dumps(prediction)
"""
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


def echo_model(root: Path) -> Path:
    (root / "code").mkdir(parents=True)
    (root / "code" / "inference.py").write_text(ECHO_INFERENCE)
    return root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_dir: Path, log: Path, workers: int = 2, **env: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [sys.executable, "-m", "conveyor.local.model_server", "--model-dir", str(model_dir)]
    command += ["--port", str(port), "--workers", str(workers)]
    environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | env
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/ping")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(f"the model server did not start: {log.read_text()}")


def workers_of(process: subprocess.Popen) -> set[int]:
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    return {int(pid) for pid in children}


def post(port: int, payload: dict | bytes, headers: dict[str, str] = JSON_HEADERS) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = payload if isinstance(payload, bytes) else json.dumps(payload)
    connection.request("POST", "/invocations", body, headers)
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    return response.status, answer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("echo")
    process, port = start_server(echo_model(root / "model"), root / "server.log")
    yield process, port
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.timeout(30)
def test_keep_alive_requests_are_answered_without_a_delayed_ack_stall(server):
    _, port = server
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = json.dumps({"instances": [{"age": 40}, {"age": 51}]})
    started = time.perf_counter()
    for _ in range(REQUESTS):
        connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["instances"] == 2
        assert not response.will_close  # one connection carries every request
    elapsed = time.perf_counter() - started
    connection.close()
    # With the stall this takes at least REQUESTS x 40 ms = 1 s; without it, a few milliseconds.
    assert elapsed < REQUESTS * STALL_SECONDS / 2, f"{REQUESTS} requests took {elapsed:.3f} s"


@pytest.mark.timeout(60)
def test_concurrent_requests_are_answered_by_different_workers_each_with_its_share_of_the_cores(server):
    process, port = server
    answers: list[dict] = []

    def ask() -> None:
        answers.append(post(port, {"sleep": 0.5})[1])

    # While one worker sleeps on its request, the other takes the next: two processes answer.
    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {a["worker"] for a in answers} == workers_of(process)
    assert len(workers_of(process)) == 2
    assert {a["threads"] for a in answers} == {str(max(1, (os.cpu_count() or 1) // 2))}


@pytest.mark.timeout(60)
def test_a_worker_that_exits_mid_request_gets_a_500_and_is_replaced(server):
    process, port = server
    before = workers_of(process)
    status, answer = post(port, {"crash": True})
    assert status == 500
    assert answer["error"]["code"] == "ModelError"
    assert "exited (9)" in answer["error"]["message"]
    # The replacement loads the model in the background; until then the other worker answers.
    deadline = time.monotonic() + 30
    while len(workers_of(process)) < 2 or workers_of(process) == before:
        assert time.monotonic() < deadline, "the worker was not replaced"
        time.sleep(0.1)
    assert all(post(port, {"instances": [1]})[0] == 200 for _ in range(6))


@pytest.mark.timeout(60)
def test_a_worker_killed_while_idle_is_replaced_without_failing_a_request(server):
    process, port = server
    victim = min(workers_of(process))
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.2)
    statuses = [post(port, {"instances": [1]})[0] for _ in range(6)]
    assert statuses == [200] * 6
    deadline = time.monotonic() + 30
    while victim in workers_of(process) or len(workers_of(process)) < 2:
        assert time.monotonic() < deadline, "the worker was not replaced"
        time.sleep(0.1)


def test_handler_errors_are_clear(server):
    _, port = server
    status, answer = post(port, b"a,b", {"Content-Type": "text/csv"})
    assert (status, answer["error"]["code"]) == (400, "InvalidInput")
    assert "text/csv" in answer["error"]["message"]
    status, answer = post(port, {"fail": True})
    assert (status, answer["error"]["code"]) == (500, "ModelError")
    assert answer["error"]["message"] == "the model cannot answer this"


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/nowhere", {}, 404),
        ("GET", "/invocations", {}, 405),
        ("POST", "/ping", {}, 405),
        ("POST", "/invocations", {"Transfer-Encoding": "chunked"}, 411),
        ("POST", "/invocations", {"Content-Length": str(model_server.MAX_BODY_BYTES + 1)}, 413),
        ("POST", "/invocations", {"Content-Length": "ten"}, 400),
    ],
)
def test_requests_outside_the_contract_get_a_status_and_a_reason(server, method, path, headers, status):
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        connection.sendall((head + "\r\n").encode())
        reply = connection.makefile("rb").read()
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:80]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["message"]


def test_expect_100_continue_and_http_1_0(server):
    _, port = server
    body = json.dumps({"instances": list(range(500))}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(
            b"POST /invocations HTTP/1.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        reader = connection.makefile("rb")
        assert reader.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert reader.readline() == b"\r\n"
        connection.sendall(body)
        assert reader.readline() == b"HTTP/1.1 200 OK\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"GET /ping HTTP/1.0\r\n\r\n")
        reply = connection.makefile("rb").read()  # HTTP/1.0 without keep-alive: the server closes
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in reply


@pytest.mark.timeout(60)
def test_sigterm_stops_the_front_end_and_every_worker(tmp_path):
    process, _ = start_server(echo_model(tmp_path / "model"), tmp_path / "server.log")
    workers = workers_of(process)
    process.terminate()
    assert process.wait(timeout=20) == 0
    for pid in workers:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            assert time.monotonic() < deadline, f"worker {pid} outlived the server"
            time.sleep(0.05)


@pytest.mark.timeout(60)
def test_a_model_that_fails_to_load_stops_the_server_with_the_reason(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "conveyor.local.model_server", "--model-dir", str(echo_model(tmp_path))]
    finished = subprocess.run(
        [*command, "--port", str(port), "--workers", "2"],
        env={**os.environ, "ECHO_FAIL_TO_LOAD": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 1
    assert "the weights are missing (ECHO_FAIL_TO_LOAD)" in finished.stderr
    assert "while loading the model" in finished.stderr


def test_worker_count_comes_from_sagemakers_variable(monkeypatch):
    monkeypatch.setenv(model_server.WORKERS_ENV, "3")
    assert model_server.default_workers() == 3
    monkeypatch.setenv(model_server.WORKERS_ENV, "0")
    with pytest.raises(ValueError, match="at least 1"):
        model_server.default_workers()
    monkeypatch.delenv(model_server.WORKERS_ENV)
    assert 1 <= model_server.default_workers() <= model_server.DEFAULT_MAX_WORKERS
