"""A local SageMaker model server: the inference contract (`GET /ping`, `POST /invocations`) around the
model's own `code/inference.py`, as the SageMaker PyTorch serving container runs it.

Run as `python -m conveyor.local.model_server --model-dir DIR --port N` by the hosting adapter.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger("localcloud.model_server")


def load_handlers(model_dir: Path) -> tuple[ModuleType, Any]:
    """Import `code/inference.py` from the model directory and load the model with its `model_fn`."""
    code = model_dir / "code"
    sys.path.insert(0, str(code))
    inference = importlib.import_module("inference")
    return inference, inference.model_fn(str(model_dir))


class Handler(BaseHTTPRequestHandler):
    server: ModelServer
    protocol_version = "HTTP/1.1"
    # A reply goes out in two writes (headers, then body). On a keep-alive connection Nagle's algorithm
    # holds the body back until the client acknowledges the headers, which it delays by up to 40 ms.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/ping":
            self._reply(200, b"{}")
        else:
            self._reply(404, b'{"error": {"code": "NotFound", "message": "no such path"}}')

    def do_POST(self) -> None:
        if self.path != "/invocations":
            self._reply(404, b'{"error": {"code": "NotFound", "message": "no such path"}}')
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        content_type = self.headers.get("Content-Type", "application/json")
        accept = self.headers.get("Accept", "application/json")
        inference, model = self.server.inference, self.server.model
        try:
            data = inference.input_fn(body, content_type)
        except ValueError as exc:
            self._reply(400, json.dumps({"error": {"code": "InvalidInput", "message": str(exc)}}).encode())
            return
        try:
            prediction = inference.predict_fn(data, model)
            answer = inference.output_fn(prediction, accept)
        except Exception as exc:
            log.exception("prediction failed")
            self._reply(500, json.dumps({"error": {"code": "ModelError", "message": str(exc)}}).encode())
            return
        self._reply(200, answer.encode() if isinstance(answer, str) else answer, accept)


class ModelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], inference: ModuleType, model: Any) -> None:
        super().__init__(address, Handler)
        self.inference = inference
        self.model = model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s model-server %(levelname)s %(message)s")
    inference, model = load_handlers(args.model_dir)
    server = ModelServer((args.host, args.port), inference, model)
    log.info("serving %s on %s:%d", args.model_dir, args.host, args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
