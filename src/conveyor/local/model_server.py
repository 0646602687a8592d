"""A local SageMaker model server: the inference contract (`GET /ping`, `POST /invocations`) around the
model's own `code/inference.py`, as the SageMaker PyTorch serving container runs it.

Run as `python -m conveyor.local.model_server --model-dir DIR --port N` by the hosting adapter.

Like the serving container (TorchServe: a front end and one Python worker per vCPU), it is one front-end
process and several worker processes:

- The front end speaks HTTP/1.1 (keep-alive, ``Expect: 100-continue``) on an asyncio event loop and never
  imports the model. It hands each request's body to an idle worker and writes back what the worker answers.
- Each worker imports ``code/inference.py``, loads the model with ``model_fn`` and answers requests one at a
  time with ``input_fn``, ``predict_fn`` and ``output_fn``. Workers run in parallel, so the input decoding and
  JSON work, which hold Python's GIL, use every core.

``SAGEMAKER_MODEL_SERVER_WORKERS`` sets the number of workers, as it does on SageMaker; locally it defaults to
the machine's cores, at most `DEFAULT_MAX_WORKERS` (each worker holds its own copy of torch and the model).
A worker that exits is replaced; the request it was answering gets a 500. A model that fails to load
stops the server with the worker's traceback in its log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import importlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger("localcloud.model_server")

WORKERS_ENV = "SAGEMAKER_MODEL_SERVER_WORKERS"
DEFAULT_MAX_WORKERS = 4
# SageMaker real-time endpoints take request bodies up to 6 MB.
MAX_BODY_BYTES = 6 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
JSON = "application/json"

# Front end <-> worker frames over a socket pair. A request: body length, content-type length and accept
# length, then those bytes. An answer: status, content-type length, body length, then those bytes.
REQUEST = struct.Struct("!IHH")
ANSWER = struct.Struct("!HHI")
READY = b"ready\n"


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


# ---------------------------------------------------------------------------------------------- the worker
def load_handlers(model_dir: Path) -> tuple[ModuleType, Any]:
    """Import `code/inference.py` from the model directory and load the model with its `model_fn`."""
    code = model_dir / "code"
    sys.path.insert(0, str(code))
    inference = importlib.import_module("inference")
    return inference, inference.model_fn(str(model_dir))


def answer(inference: Any, model: Any, body: bytes, content_type: str, accept: str) -> tuple[int, str, bytes]:
    """One request through the model's handlers: (status, content type, body).

    ``input_fn`` raising ValueError is the caller's mistake (400, its message); anything else failing is the
    model's (500, logged with its traceback).
    """
    try:
        data = inference.input_fn(body, content_type)
    except ValueError as exc:
        return 400, JSON, error_body("InvalidInput", str(exc))
    try:
        prediction = inference.predict_fn(data, model)
        result = inference.output_fn(prediction, accept)
    except Exception as exc:
        log.exception("prediction failed")
        return 500, JSON, error_body("ModelError", str(exc))
    return 200, accept, result.encode() if isinstance(result, str) else bytes(result)


def _read_exactly(connection: socket.socket, size: int) -> bytes | None:
    """`size` bytes from `connection`; None when the front end has gone (end of stream)."""
    chunks, missing = [], size
    while missing:
        chunk = connection.recv(min(missing, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def worker_main(model_dir: Path, fd: int) -> int:
    """A worker: load the model, say so, then answer the front end's requests until it goes away."""
    connection = socket.socket(fileno=fd)
    # Ctrl-C in a terminal reaches the whole process group: the front end stops, and then so does this.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inference, model = load_handlers(model_dir)  # a failure exits with its traceback in the log
    connection.sendall(READY)
    while True:
        head = _read_exactly(connection, REQUEST.size)
        if head is None:
            return 0
        body_size, type_size, accept_size = REQUEST.unpack(head)
        rest = _read_exactly(connection, type_size + accept_size + body_size)
        if rest is None:
            return 0
        content_type = rest[:type_size].decode("latin-1")
        accept = rest[type_size : type_size + accept_size].decode("latin-1")
        status, answer_type, payload = answer(
            inference, model, rest[type_size + accept_size :], content_type, accept
        )
        encoded_type = answer_type.encode("latin-1")
        connection.sendall(ANSWER.pack(status, len(encoded_type), len(payload)) + encoded_type + payload)


# ----------------------------------------------------------------------------------------- the front end
class WorkerFailed(RuntimeError):
    """A worker exited: while loading the model, or while answering."""


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def exit_code(self) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.process.wait(timeout=2)
        return None


def default_workers() -> int:
    configured = os.environ.get(WORKERS_ENV, "").strip()
    if configured:
        try:
            workers = int(configured)
        except ValueError:
            workers = 0
        if workers < 1:
            raise ValueError(f"{WORKERS_ENV} must be a whole number of at least 1, not {configured!r}")
        return workers
    return max(1, min(os.cpu_count() or 1, DEFAULT_MAX_WORKERS))


class Frontend:
    """HTTP on an event loop, the model's handlers in `workers` worker processes."""

    def __init__(self, model_dir: Path, workers: int) -> None:
        self.model_dir = model_dir
        self.workers = workers
        self.idle: asyncio.Queue[Worker] = asyncio.Queue()
        self.replacing: set[asyncio.Task[None]] = set()
        self.current: dict[int, Worker] = {}  # by index: the process serving as that worker now

    def worker_environment(self) -> dict[str, str]:
        """The workers share the cores: unless told otherwise, torch in each uses its share of them."""
        environment = dict(os.environ)
        environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.workers)))
        return environment

    async def spawn(self, index: int) -> Worker:
        """Start worker `index` and wait until it has loaded the model."""
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "conveyor.local.model_server",
                    "--model-dir",
                    str(self.model_dir),
                    "--worker-fd",
                    str(theirs.fileno()),
                ],
                pass_fds=(theirs.fileno(),),
                env=self.worker_environment(),
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        worker = Worker(index, process, reader, writer)
        self.current[index] = worker
        try:
            await reader.readexactly(len(READY))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            writer.close()
            raise WorkerFailed(
                f"worker {index} exited ({worker.exit_code()}) while loading the model; its traceback is above"
            ) from exc
        return worker

    async def start(self) -> None:
        started = await asyncio.gather(*(self.spawn(i) for i in range(self.workers)), return_exceptions=True)
        failed = [r for r in started if isinstance(r, BaseException)]
        for result in started:
            if isinstance(result, Worker):
                self.idle.put_nowait(result)
        if failed:
            await self.stop()
            raise failed[0]

    async def stop(self) -> None:
        """End every worker, busy or idle (their requests are cut off, as the process is ending)."""
        for task in self.replacing:
            task.cancel()
        workers = list(self.current.values())
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.terminate()
        for worker in workers:
            if await asyncio.get_running_loop().run_in_executor(None, worker.exit_code) is None:
                worker.process.kill()
            worker.writer.close()

    def _replace(self, worker: Worker) -> None:
        async def replace() -> None:
            delay = 0.5
            while True:
                try:
                    self.idle.put_nowait(await self.spawn(worker.index))
                    log.info("worker %d replaced", worker.index)
                    return
                except WorkerFailed as exc:
                    log.error("%s; trying again in %.0f s", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)

        task = asyncio.get_running_loop().create_task(replace())
        self.replacing.add(task)
        task.add_done_callback(self.replacing.discard)

    async def invoke(self, body: bytes, content_type: str, accept: str) -> tuple[int, str, bytes]:
        """The answer of the next idle worker to one request."""
        worker = await self.idle.get()
        while worker.process.poll() is not None:  # it died waiting for work: nothing of this request is lost
            log.error(
                "worker %d exited (%s) while idle; starting another", worker.index, worker.process.returncode
            )
            worker.writer.close()
            self._replace(worker)
            worker = await self.idle.get()
        try:
            encoded_type, encoded_accept = content_type.encode("latin-1"), accept.encode("latin-1")
            worker.writer.write(
                REQUEST.pack(len(body), len(encoded_type), len(encoded_accept))
                + encoded_type
                + encoded_accept
            )
            worker.writer.write(body)
            await worker.writer.drain()
            status, type_size, body_size = ANSWER.unpack(await worker.reader.readexactly(ANSWER.size))
            rest = await worker.reader.readexactly(type_size + body_size)
        except (asyncio.IncompleteReadError, ConnectionError):
            worker.writer.close()
            code = await asyncio.get_running_loop().run_in_executor(None, worker.exit_code)
            log.error("worker %d exited (%s) while answering a request; starting another", worker.index, code)
            self._replace(worker)
            return (
                500,
                JSON,
                error_body("ModelError", f"the model's worker process exited ({code}) while answering"),
            )
        self.idle.put_nowait(worker)
        return status, rest[:type_size].decode("latin-1"), rest[type_size:]

    # ------------------------------------------------------------------------------------------- HTTP/1.1
    async def route(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str, bytes]:
        if path == "/ping":
            return (
                (200, JSON, b"{}")
                if method in ("GET", "HEAD")
                else (405, JSON, error_body("MethodNotAllowed", "use GET /ping"))
            )
        if path == "/invocations":
            if method != "POST":
                return 405, JSON, error_body("MethodNotAllowed", "use POST /invocations")
            return await self.invoke(body, headers.get("content-type", JSON), headers.get("accept", JSON))
        return 404, JSON, error_body("NotFound", "no such path")

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests on one connection, answered in order, until the client closes it or asks to."""
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed the connection between requests
                except asyncio.LimitOverrunError:
                    self._write(
                        writer, 431, JSON, error_body("BadRequest", "request headers too large"), False
                    )
                    return
                request = parse_head(head)
                if isinstance(request, tuple):  # (status, message): answer and close
                    self._write(writer, request[0], JSON, error_body("BadRequest", request[1]), False)
                    return
                method, path, version, headers = (
                    request.method,
                    request.path,
                    request.version,
                    request.headers,
                )
                keep_alive = _keep_alive(version, headers)
                problem = _body_problem(headers)
                if problem is not None:
                    self._write(writer, problem[0], JSON, error_body("BadRequest", problem[1]), False)
                    return
                length = int(headers.get("content-length", "0"))
                if length and headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await reader.readexactly(length) if length else b""
                status, content_type, payload = await self.route(method, path, headers, body)
                self._write(writer, status, content_type, b"" if method == "HEAD" else payload, keep_alive)
                await writer.drain()
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return  # the client went away mid-request
        finally:
            writer.close()

    @staticmethod
    def _write(
        writer: asyncio.StreamWriter, status: int, content_type: str, body: bytes, keep_alive: bool
    ) -> None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        closing = "" if keep_alive else "Connection: close\r\n"
        head = (
            f"HTTP/1.1 {status} {phrase}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        )
        writer.write((head + closing + "\r\n").encode("latin-1") + body)


@dataclass
class Request:
    method: str
    path: str
    version: str
    headers: dict[str, str]


def parse_head(head: bytes) -> Request | tuple[int, str]:
    """A request line and headers (ending in a blank line), or (status, why) when they are not HTTP/1.x."""
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return 400, f"not an HTTP/1.x request line: {lines[0][:100]!r}"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return 400, f"malformed header line: {line[:100]!r}"
        headers[name.lower()] = value.strip()
    return Request(parts[0], parts[1].split("?", 1)[0], parts[2], headers)


def _keep_alive(version: str, headers: dict[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    return connection == "keep-alive" if version == "HTTP/1.0" else connection != "close"


def _body_problem(headers: dict[str, str]) -> tuple[int, str] | None:
    if "transfer-encoding" in headers:
        return 411, "send the body with a Content-Length (chunked transfer encoding is not supported)"
    length = headers.get("content-length", "0")
    if not length.isdigit():
        return 400, f"Content-Length is not a number: {length[:40]!r}"
    if int(length) > MAX_BODY_BYTES:
        return 413, f"the body is {int(length):,} bytes; an endpoint takes at most {MAX_BODY_BYTES:,}"
    return None


async def serve(model_dir: Path, host: str, port: int, workers: int) -> int:
    """Start the workers, then answer HTTP on host:port until SIGTERM or SIGINT."""
    frontend = Frontend(model_dir, workers)
    try:
        await frontend.start()
    except WorkerFailed as exc:
        log.error("%s", exc)
        return 1
    server = await asyncio.start_server(frontend.connection, host, port, limit=MAX_HEADER_BYTES, backlog=1024)
    log.info("serving %s on %s:%d with %d worker(s)", model_dir, host, port, workers)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    server.close()
    await frontend.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, help="the port to answer on (the front end)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--workers",
        type=int,
        help=f"worker processes (default: ${WORKERS_ENV}, else the cores, at most {DEFAULT_MAX_WORKERS})",
    )
    parser.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)  # run as a worker on this socket
    args = parser.parse_args(argv)
    if args.worker_fd is not None:
        logging.basicConfig(
            level=logging.INFO, format=f"%(asctime)s model-worker[{os.getpid()}] %(levelname)s %(message)s"
        )
        return worker_main(args.model_dir, args.worker_fd)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s model-server %(levelname)s %(message)s")
    if args.port is None:
        parser.error("--port is required")
    try:
        workers = args.workers if args.workers is not None else default_workers()
    except ValueError as exc:
        parser.error(str(exc))
    if workers < 1:
        parser.error("--workers must be at least 1")
    return asyncio.run(serve(args.model_dir, args.host, args.port, workers))


if __name__ == "__main__":
    sys.exit(main())
