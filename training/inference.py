"""SageMaker PyTorch serving handlers: `model_fn`, `input_fn`, `predict_fn`, `output_fn` (contract section 4).

Loaded from ``<model_dir>/code/`` by the serving container and by conveyor's local model server, next to
``model.py`` and ``data.py``. A request is ``{"instances": [{"<column>": value, ...}, ...]}``; each row gets
exactly the encoding of training, from the encoder saved in ``model_config.json``. A bad request raises
`InvalidInput`, a ValueError whose message names the row and column.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data import Encoder
from model import build_model, outputs_in_batches

MAX_INSTANCES = 10_000
JSON_TYPE = "application/json"
SUPPORTED_FORMAT_VERSION = 1
PREDICT_BATCH_ROWS = 8_192
# A fine-tuned base model's architecture, and the module whose load_classifier loads it from hf/.
PRETRAINED_LOADERS = {"hf_sequence_classifier": "hf_text", "hf_image_classifier": "hf_image"}

try:
    # In the serving container this sets the HTTP status; a plain exception there would answer 500.
    from sagemaker_inference.errors import BaseInferenceToolkitError as _ServingError
except ImportError:

    class _ServingError(Exception):  # type: ignore[no-redef]
        def __init__(self, status_code: int, message: str, phrase: str) -> None:
            self.status_code, self.message, self.phrase = status_code, message, phrase
            super().__init__(status_code, message, phrase)


class InvalidInput(_ServingError, ValueError):
    """A request the model cannot answer: HTTP 400 (415 or 406 for a content type it does not speak)."""

    def __init__(self, message: str, status_code: int = 400, phrase: str = "Bad Request") -> None:
        super().__init__(status_code, message, phrase)

    def __str__(self) -> str:
        return str(self.message)


@dataclass
class LoadedModel:
    """What `model_fn` returns: the network in eval mode, its encoder, and the device it runs on."""

    network: torch.nn.Module
    encoder: Encoder
    device: torch.device
    version: str | None = None  # the data version it was trained on (model_config.json)


# input_fn is given no model by the serving contract, yet checks rows against the model's columns: it uses
# the encoder of the model this process loaded (one per container).
_loaded: LoadedModel | None = None


def model_fn(model_dir: str) -> LoadedModel:
    """Load ``model_config.json`` and ``model.pth`` from the model directory.

    Parameters
    ----------
    model_dir
        The unpacked ``model.tar.gz`` (``/opt/ml/model`` in the container).

    Returns
    -------
    LoadedModel
        The network on CUDA when there is a GPU, else on the CPU.
    """
    global _loaded
    directory = Path(model_dir)
    config = json.loads((directory / "model_config.json").read_text(encoding="utf-8"))
    if config.get("format_version") != SUPPORTED_FORMAT_VERSION:
        raise ValueError(
            f"model_config.json has format_version {config.get('format_version')!r}; "
            f"this inference.py reads version {SUPPORTED_FORMAT_VERSION}"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = Encoder.from_config(config)
    network: torch.nn.Module
    loader = PRETRAINED_LOADERS.get(config["architecture"].get("name"))
    if loader is not None:  # a fine-tuned base model: its weights are in hf/
        network = importlib.import_module(loader).load_classifier(directory, config["architecture"])
        encoder.tokenizer = getattr(network, "tokenizer", None)
    else:
        network = build_model(config["architecture"])
        network.load_state_dict(torch.load(directory / "model.pth", map_location=device, weights_only=True))
    network.to(device).eval()
    _loaded = LoadedModel(network, encoder, device, config.get("version"))
    return _loaded


def input_fn(request_body: bytes | str, request_content_type: str = JSON_TYPE) -> tuple[np.ndarray, ...]:
    """Check a JSON request and encode its instances.

    Parameters
    ----------
    request_body
        ``{"instances": [...]}`` with at most 10,000 JSON objects; each must have every feature column as a
        key (``null`` or ``""`` is missing); other keys are ignored. A text column's value is a string.
    request_content_type
        ``application/json`` (parameters such as ``charset`` are ignored).

    Returns
    -------
    tuple of numpy.ndarray
        The encoded rows: the feature matrix (float32), and the token ids (int32) of a text model.

    Raises
    ------
    InvalidInput
        A ValueError naming what is wrong, e.g. ``instance 3: missing feature column 'age'``.
    """
    media_type = (request_content_type or JSON_TYPE).split(";")[0].strip().lower()
    if media_type != JSON_TYPE:
        raise InvalidInput(
            f"unsupported content type {request_content_type!r}: send {JSON_TYPE}",
            415,
            "Unsupported Media Type",
        )
    try:
        document = json.loads(request_body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    instances = document.get("instances") if isinstance(document, dict) else None
    if not isinstance(instances, list) or not instances:
        raise InvalidInput(
            'expected {"instances": [{"<column>": <value>, ...}, ...]} with at least one instance'
        )
    if len(instances) > MAX_INSTANCES:
        raise InvalidInput(f"{len(instances)} instances: at most {MAX_INSTANCES} per request")
    try:
        return _request_encoder().encode_instances(instances)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def predict_fn(data: tuple[np.ndarray, ...] | np.ndarray, model: LoadedModel) -> list[dict[str, Any]]:
    """Run the network on encoded rows.

    Parameters
    ----------
    data
        From `input_fn` (a single array is the feature matrix).
    model
        From `model_fn`.

    Returns
    -------
    list of dict
        Per row ``{"label": <label>, "probabilities": {"<label>": p, ...}}`` (the label as the manifest's
        JSON value: an integer or a string) or ``{"value": <number>}``.
    """
    inputs = [torch.as_tensor(a) for a in (data if isinstance(data, tuple) else (data,))]
    with torch.inference_mode():
        outputs = outputs_in_batches(model.network, inputs, model.device, PREDICT_BATCH_ROWS).cpu()
    encoder = model.encoder
    if encoder.task == "regression":
        return [{"value": float(v)} for v in encoder.decode_target(outputs.squeeze(1).numpy())]
    probabilities = torch.softmax(outputs, dim=1).numpy().astype(np.float64)
    keys = [str(label) for label in encoder.labels]
    return [
        {
            "label": encoder.labels[int(row.argmax())],
            "probabilities": {key: float(p) for key, p in zip(keys, row, strict=True)},
        }
        for row in probabilities
    ]


def output_fn(prediction: list[dict[str, Any]], accept: str = JSON_TYPE) -> str:
    """Serialise predictions as ``{"predictions": [...], "model_version": "<data version>"}``.

    Parameters
    ----------
    prediction
        From `predict_fn`.
    accept
        ``application/json`` or ``*/*`` (or nothing).

    Returns
    -------
    str
        The JSON response body.
    """
    accepted = [part.split(";")[0].strip().lower() for part in (accept or JSON_TYPE).split(",")]
    if not any(a in (JSON_TYPE, "*/*", "application/*", "") for a in accepted):
        raise InvalidInput(f"cannot answer in {accept!r}: ask for {JSON_TYPE}", 406, "Not Acceptable")
    answer: dict[str, Any] = {"predictions": prediction}
    if _loaded is not None and _loaded.version:
        # The endpoint's variant keeps one name across deployments: the model says which one answered.
        answer["model_version"] = _loaded.version
    return json.dumps(answer)


def _request_encoder() -> Encoder:
    global _loaded
    if _loaded is None:
        # model_fn normally runs first; if not, the model is the one this code/ directory ships inside.
        _loaded = model_fn(str(Path(__file__).resolve().parent.parent))
    return _loaded.encoder
