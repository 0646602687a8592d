"""SageMaker PyTorch serving handlers: `model_fn`, `input_fn`, `predict_fn`, `output_fn`.

Loaded from `<model_dir>/code/` by the serving container (and by conveyor's local model server). Requests
are `{"instances": [{"<column>": value, ...}]}`; each row gets exactly the encoding of training, from the
encoder saved in `model_config.json`. A bad request raises ValueError with the row and column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data import Encoder
from model import build_model

MAX_INSTANCES = 10_000
JSON = "application/json"


class LoadedModel:
    """What `model_fn` returns: the network, its encoder and the device it runs on."""

    def __init__(self, network: torch.nn.Module, encoder: Encoder, device: torch.device) -> None:
        self.network = network
        self.encoder = encoder
        self.device = device


# The serving contract gives `input_fn` no model; rows are validated against the schema there, so the
# encoder of the (single) loaded model is kept here.
_current: LoadedModel | None = None


def model_fn(model_dir: str) -> LoadedModel:
    global _current
    config = json.loads((Path(model_dir) / "model_config.json").read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = build_model(config["architecture"])
    network.load_state_dict(torch.load(Path(model_dir) / "model.pth", map_location=device, weights_only=True))
    network.to(device).eval()
    _current = LoadedModel(network, Encoder(config["encoder"]), device)
    return _current


def input_fn(request_body: bytes | str, request_content_type: str = JSON) -> np.ndarray:
    if request_content_type.split(";")[0].strip() != JSON:
        raise ValueError(f"unsupported content type {request_content_type!r}; send {JSON}")
    try:
        document = json.loads(request_body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"request body is not valid JSON: {exc}") from None
    instances = document.get("instances") if isinstance(document, dict) else None
    if not isinstance(instances, list) or not instances:
        raise ValueError('expected {"instances": [{"<column>": <value>, ...}, ...]}')
    if len(instances) > MAX_INSTANCES:
        raise ValueError(f"{len(instances)} instances; at most {MAX_INSTANCES} per request")
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise ValueError(f"instance {i} is not a JSON object of column values")
    if _current is None:
        raise RuntimeError("model_fn has not run")
    return _current.encoder.encode(instances, strict=True)


def predict_fn(data: np.ndarray, model: LoadedModel) -> np.ndarray:
    with torch.inference_mode():
        out = model.network(torch.from_numpy(data).to(model.device)).float()
        if model.encoder.task == "classification":
            return torch.softmax(out, dim=-1).cpu().numpy()
        return model.encoder.decode_regression(out.squeeze(-1).cpu().numpy())


def output_fn(prediction: np.ndarray, accept: str = JSON) -> str:
    if accept not in (JSON, "*/*", ""):
        raise ValueError(f"unsupported accept type {accept!r}; ask for {JSON}")
    assert _current is not None
    encoder = _current.encoder
    if encoder.task == "classification":
        keys = [str(label) for label in encoder.labels]
        predictions: list[dict[str, Any]] = [
            {
                "label": encoder.labels[int(row.argmax())],
                "probabilities": {k: round(float(p), 6) for k, p in zip(keys, row, strict=True)},
            }
            for row in prediction
        ]
    else:
        predictions = [{"value": float(v)} for v in prediction]
    return json.dumps({"predictions": predictions})
