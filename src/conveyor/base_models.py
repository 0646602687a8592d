"""`conveyor base-models push` and `list`: the base-model hub under ``s3://<ArtifactsBucket>/base-models/``.

Push checks a local folder with the same checks the pipeline runs before training (``common.base_models``),
hashes every file, uploads them, and writes ``conveyor-base.json`` last: a base whose manifest is there was
uploaded whole. A name is never overwritten with other content; a model trained from a base records its
digest, so changing the files under a name would make that record a lie.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from conveyor.client import ConveyorError, Target
from conveyor.local.cloud import make_functions_importable

make_functions_importable()

from common import base_models as hub  # noqa: E402  (functions/ owns the checks the Lambda runs too)

log = logging.getLogger("conveyor.base_models")
CHUNK = 8 * 2**20


@dataclass
class Pushed:
    """What `push` did: where the base is, its digest, and whether it was already there."""

    uri: str
    digest: str
    parameters: int
    files: int
    bytes: int
    already_there: bool = False


def push(target: Target, folder: Path, name: str, progress: Any = None) -> Pushed:
    """Check, hash and upload a base model folder to the hub.

    Parameters
    ----------
    target
        The stack (local or deployed).
    folder
        A folder ``save_pretrained`` wrote (config.json, model.safetensors or shards, tokenizer files).
    name
        The base's name in the hub (``base_model`` in a dataset's conveyor.json).
    progress
        A file to print progress lines to (None: no progress).

    Raises
    ------
    ConveyorError
        When the folder is not a usable base model (the reason says what to do), or the name holds
        another base already.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConveyorError(f"{folder} is not a folder: pass the folder save_pretrained wrote")
    try:
        hub.check_name(name)
        info = hub.inspect(hub.FolderFiles(folder))
    except hub.BaseModelRefused as refused:
        raise ConveyorError(refused.reason) from None
    sizes = hub.FolderFiles(folder).sizes()
    sizes.pop(hub.MANIFEST_NAME, None)  # a manifest copied in with the folder is rewritten
    hashes = {}
    for relative, size in sizes.items():
        hashes[relative] = (size, hub.file_sha256(lambda p=folder / relative: _chunks(p)))
    manifest = hub.build_manifest(name, info, hashes)
    s3, bucket = target.client("s3"), target.outputs["ArtifactsBucketName"]
    prefix = f"{hub.BASE_MODELS_PREFIX}{name}/"
    uri = f"s3://{bucket}/{prefix}"
    total = sum(sizes.values())
    existing = _manifest(s3, bucket, prefix)
    if existing is not None:
        if existing.get("digest") == manifest["digest"]:
            return Pushed(uri, manifest["digest"], info.parameters, len(sizes), total, already_there=True)
        raise ConveyorError(
            f"{uri} holds another base model already (digest {existing.get('digest')}); models trained from "
            "it record that digest, so it is not replaced: push this one under a new --name"
        )
    if s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount"):
        raise ConveyorError(
            f"{uri} has files but no {hub.MANIFEST_NAME} (an interrupted push, or files copied by hand): "
            "delete them or push under a new --name"
        )
    sent, started = 0, time.monotonic()
    for relative, size in sizes.items():
        s3.upload_file(str(folder / relative), bucket, prefix + relative)
        sent += size
        if progress is not None:
            rate = sent / max(time.monotonic() - started, 1e-6) / 2**20
            print(
                f"  {relative} ({size / 2**20:,.1f} MiB) {sent * 100 // max(total, 1)}% {rate:,.1f} MiB/s",
                file=progress,
            )
    # Last: a manifest says the upload is whole.
    s3.put_object(
        Bucket=bucket,
        Key=prefix + hub.MANIFEST_NAME,
        Body=json.dumps(manifest, indent=2).encode(),
        ContentType="application/json",
    )
    return Pushed(uri, manifest["digest"], info.parameters, len(sizes), total)


def list_bases(target: Target) -> list[dict[str, Any]]:
    """Every base in the hub: its name, model type, kind (text or image), parameters, size and digest (from
    its manifest).

    A folder without a manifest is listed with ``"complete": False``: the pipeline checks it file by file.
    """
    s3, bucket = target.client("s3"), target.outputs["ArtifactsBucketName"]
    found = []
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=hub.BASE_MODELS_PREFIX, Delimiter="/"):
        for common_prefix in page.get("CommonPrefixes", []):
            prefix = common_prefix["Prefix"]
            name = prefix[len(hub.BASE_MODELS_PREFIX) :].rstrip("/")
            manifest = _manifest(s3, bucket, prefix)
            if manifest is None:
                found.append({"name": name, "uri": f"s3://{bucket}/{prefix}", "complete": False})
                continue
            found.append(
                {
                    "name": name,
                    "uri": f"s3://{bucket}/{prefix}",
                    "complete": True,
                    "model_type": manifest.get("model_type"),
                    "kind": manifest.get("kind", "text"),
                    "parameters": manifest.get("parameters"),
                    "bytes": sum(int(f.get("bytes", 0)) for f in manifest.get("files", {}).values()),
                    "digest": manifest.get("digest"),
                }
            )
    return found


def _manifest(s3: Any, bucket: str, prefix: str) -> dict[str, Any] | None:
    try:
        body = s3.get_object(Bucket=bucket, Key=prefix + hub.MANIFEST_NAME)["Body"].read()
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    try:
        document = json.loads(body)
    except json.JSONDecodeError:
        return {"digest": "unreadable manifest"}
    return document if isinstance(document, dict) else {"digest": "unreadable manifest"}


def _chunks(path: Path) -> Any:
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            yield chunk


def print_table(bases: list[dict[str, Any]], out: Any = sys.stdout) -> None:
    """The hub as a table a person reads."""
    if not bases:
        print("no base models yet: push one with `conveyor base-models push DIR --name BASE`", file=out)
        return
    print(f"{'NAME':32} {'TYPE':16} {'KIND':6} {'PARAMETERS':>12} {'SIZE':>10}  DIGEST", file=out)
    for base in bases:
        if not base["complete"]:
            print(f"{base['name']:32} {'(incomplete: no manifest)':42}", file=out)
            continue
        params = f"{base['parameters'] / 1e6:,.1f}M" if base.get("parameters") else "?"
        print(
            f"{base['name']:32} {base['model_type']!s:16} {base.get('kind', 'text'):6} {params:>12} "
            f"{base['bytes'] / 2**20:>8,.1f}MB  {base['digest']}",
            file=out,
        )
