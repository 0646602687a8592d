"""The base-model hub: what a pretrained model under ``s3://<ArtifactsBucket>/base-models/<base>/`` must hold,
and the checks that refuse a bad one before any training job starts (DESIGN.md section 6, docs/base-models.md).

A base model is a folder in Hugging Face layout: ``config.json``, the weights as ``model.safetensors`` (or
shards and ``model.safetensors.index.json``) and the tokenizer's files. ``conveyor base-models push`` runs
these checks on a local folder and records ``conveyor-base.json`` (every file's size and SHA-256, and one
digest over them) beside the files; the preprocess function runs them again on S3 when a dataset's
conveyor.json names the base, reading only the small files and each safetensors header (a range read),
so a multi-GB model costs a few requests.

Pure Python on purpose: it runs in Lambda, where transformers and torch do not fit. The table of model
types that transformers can fine-tune for sequence classification is transformers' own
(``MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES``), copied here; tests/unit/test_base_models.py fails
when an upgrade of transformers changes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from common.instances import (
    ONE_DEVICE_SUGGESTIONS,
    SHARDED_SUGGESTIONS,
    USABLE_SHARE,
    instance_memory,
    shards_fit,
    training_bytes,
    training_devices,
)

BASE_MODELS_PREFIX = "base-models/"
MANIFEST_NAME = "conveyor-base.json"
MANIFEST_FORMAT_VERSION = 1
ADAPTERS = ("full", "lora")
# A base's name: what `conveyor base-models push --name` takes and a spec's "base_model" names.
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# Files read whole (config, index, tokenizer); anything larger is not a config.
SMALL_FILE_BYTES = 64 * 2**20
# A safetensors header is JSON after an 8-byte little-endian length; real ones are well under this.
MAX_HEADER_BYTES = 100 * 2**20
TOKENIZER_FILES = (
    ("tokenizer.json",),
    ("vocab.txt",),  # WordPiece: BERT, DistilBERT, ELECTRA, MPNet
    ("vocab.json", "merges.txt"),  # byte-level BPE: RoBERTa, GPT-2
    ("spiece.model",),  # SentencePiece: ALBERT, T5, XLNet
    ("sentencepiece.bpe.model",),  # XLM-RoBERTa, CamemBERT
    ("spm.model",),  # DeBERTa-v2/v3
)
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
    "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip

# transformers 5.23's MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES: the model types that
# AutoModelForSequenceClassification builds, encoders (bert, roberta, deberta-v2 ...) and decoders alike.
SEQUENCE_CLASSIFICATION_TYPES = frozenset(
    """
    albert arcee axk1 axk2 bart bert big_bird bigbird_pegasus biogpt bloom camembert canine
    cohere_compass_text convbert ctrl data2vec-text deberta deberta-v2 deepseek_v2 deepseek_v3 diffllama
    distilbert doge electra ernie esm esmc eurobert exaone4 falcon flaubert fnet funnel gemma gemma2 gemma3
    gemma3_text glm glm4 gpt-sw3 gpt2 gpt_bigcode gpt_neo gpt_neox gpt_oss gptj gte helium hunyuan_v1_dense
    hunyuan_v1_moe ibert jamba jetmoe jina_embeddings_v3 layoutlm layoutlmv2 layoutlmv3 lilt llama
    longformer luke markuplm mbart megatron-bert minicpm3 minimax ministral ministral3 mistral mistral4
    mixtral mobilebert modernbert modernbert-decoder modernvbert mpnet mpt mra mt5 mvp nemotron nomic_bert
    nystromformer olmo olmo2 olmo3 openai-gpt opt perceiver persimmon phi phi3 phimoe plbart qwen2
    qwen2_moe qwen3 qwen3_5 qwen3_5_text qwen3_moe qwen3_next reformer rembert roberta
    roberta-prelayernorm roc_bert roformer seed_oss smollm3 squeezebert stablelm starcoder2 t5 t5gemma
    t5gemma2 tapas ultrabert ultravbert umt5 xlm xlm-roberta xlm-roberta-xl xlnet xmod yoso zamba zamba2
    """.split()  # noqa: SIM905 (a word list reads better as words)
)
# transformers 5.23's MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES: named in the refusal of an image model
# for a text dataset, so the message says what the model is.
IMAGE_CLASSIFICATION_TYPES = frozenset(
    """
    beit bit clip convnext convnextv2 cvt data2vec-vision deit dinat dinov2 dinov2_with_registers
    donut-swin efficientnet focalnet hgnet_v2 hiera ijepa imagegpt levit metaclip_2 mobilenet_v1
    mobilenet_v2 mobilevit mobilevitv2 perceiver poolformer pp_lcnet pvt pvt_v2 regnet resnet segformer
    shieldgemma2 siglip siglip2 swiftformer swin swinv2 textnet timm_wrapper vit vit_msn
    """.split()  # noqa: SIM905 (a word list reads better as words)
)


# Image classification types conveyor does not fine-tune, and why.
IMAGE_TYPES_REFUSED = {
    "timm_wrapper": "timm checkpoints need timm and torchvision in the training image, which conveyor does "
    "not ship yet; push a transformers-native backbone (ViT, ConvNeXt, ResNet ...) instead",
    "imagegpt": "ImageGPT reads colour-cluster tokens, not pixels; choose a backbone such as ViT or ConvNeXt",
    "perceiver": "Perceiver's image classifiers take preprocessing conveyor does not do; choose a backbone "
    "such as ViT or ConvNeXt",
    "shieldgemma2": "ShieldGemma 2 is a vision-language safety classifier, not a backbone to fine-tune; "
    "choose one such as ViT or ConvNeXt",
}
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"


class BaseModelRefused(Exception):
    """A base model that cannot be fine-tuned as asked; ``reason`` says what is wrong and what to do."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BaseModelFiles(Protocol):
    """Where a base model's files are: a local folder (`FolderFiles`) or an S3 prefix (`S3Files`)."""

    location: str

    def sizes(self) -> dict[str, int]:
        """Every file's size in bytes, by its path relative to the model folder."""

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        """The file's bytes from `start`, `length` of them (None: to the end)."""


@dataclass
class FolderFiles:
    """A base model in a local folder (``conveyor base-models push DIR``)."""

    folder: Path
    location: str = ""

    def __post_init__(self) -> None:
        self.location = self.location or str(self.folder)

    def sizes(self) -> dict[str, int]:
        return {
            path.relative_to(self.folder).as_posix(): path.stat().st_size
            for path in sorted(self.folder.rglob("*"))
            if path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(self.folder).parts)
        }

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        with (self.folder / name).open("rb") as file:
            file.seek(start)
            return file.read() if length is None else file.read(length)


@dataclass
class S3Files:
    """A base model under an S3 prefix; reads are ranged GETs, so a header costs one small request."""

    s3: Any
    bucket: str
    prefix: str
    location: str = ""
    _sizes: dict[str, int] | None = None

    def __post_init__(self) -> None:
        self.prefix = self.prefix.rstrip("/") + "/"
        self.location = f"s3://{self.bucket}/{self.prefix}"

    def sizes(self) -> dict[str, int]:
        if self._sizes is None:
            found: dict[str, int] = {}
            for page in self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            ):
                for item in page.get("Contents", []):
                    name = item["Key"][len(self.prefix) :]
                    if name and not name.endswith("/"):
                        found[name] = int(item["Size"])
            self._sizes = found
        return self._sizes

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        end = "" if length is None else str(start + length - 1)
        body = self.s3.get_object(Bucket=self.bucket, Key=self.prefix + name, Range=f"bytes={start}-{end}")
        return bytes(body["Body"].read())


@dataclass
class BaseModelInfo:
    """What the checks found: enough to size the job, pick the recipe and record where a model came from."""

    location: str
    model_type: str
    kind: str  # "text" or "image"
    parameters: int
    weight_bytes: int
    weight_files: list[str]
    tokenizer_files: list[str]  # or, for an image model, its image processor's config
    architectures: list[str] = field(default_factory=list)
    digest: str = ""  # sha256 over every file's name and content (conveyor-base.json), or over names, sizes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_name(name: str) -> str:
    """A base model's name as the hub stores it, or BaseModelRefused saying what a name may be."""
    if not isinstance(name, str) or not NAME.match(name):
        raise BaseModelRefused(
            f"base model name {name!r}: use 1 to 63 lower-case letters, digits, '.', '_' or '-', starting "
            "with a letter or digit (e.g. 'bert-base-uncased')"
        )
    return name


def locate(base_model: str, artifacts_bucket: str) -> tuple[str, str]:
    """The bucket and prefix of the base a spec's ``base_model`` names: a hub name, or an ``s3://`` URI.

    Raises
    ------
    BaseModelRefused
        For a URI outside ``s3://<ArtifactsBucket>/base-models/``: training jobs may read only there.
    """
    if isinstance(base_model, str) and base_model.startswith("s3://"):
        bucket, _, prefix = base_model[len("s3://") :].partition("/")
        prefix = prefix.rstrip("/") + "/"
        if (
            bucket != artifacts_bucket
            or not prefix.startswith(BASE_MODELS_PREFIX)
            or prefix == BASE_MODELS_PREFIX
        ):
            raise BaseModelRefused(
                f"base_model {base_model} is outside the hub: training jobs read base models only under "
                f"s3://{artifacts_bucket}/{BASE_MODELS_PREFIX}<base>/. Push it there with `conveyor "
                "base-models push DIR --name BASE` and name it in conveyor.json"
            )
        if ".." in prefix.split("/"):
            raise BaseModelRefused(f"base_model {base_model}: a path with '..' is not allowed")
        return bucket, prefix
    return artifacts_bucket, BASE_MODELS_PREFIX + check_name(base_model) + "/"


def inspect(
    files: BaseModelFiles,
    task_kind: str | None = None,
    instance_type: str | None = None,
    adapter: str = "full",
    memory_gib: float | None = None,
) -> BaseModelInfo:
    """Check a base model for fine-tuning and say what it is.

    Parameters
    ----------
    files
        Where the model is.
    task_kind
        ``"text"`` (sequence classification or regression) or ``"image"`` (image classification); None
        (`conveyor base-models push`, before any dataset names it) takes the kind the model type says.
    instance_type
        The training instance; its memory (`instance_memory`) bounds the model's size.
    adapter
        ``"full"`` (every weight trains) or ``"lora"`` (the base is frozen; peft's adapters train).
    memory_gib
        Memory of one training device, overriding the instance type's (local mode passes the machine's).

    Returns
    -------
    BaseModelInfo

    Raises
    ------
    BaseModelRefused
        For a missing or corrupt ``config.json``, missing or unreadable weights, weights only in pickle
        form, a missing tokenizer (text) or image processor config (images), an architecture that does not
        fit the task, or a model too large for the instance; the reason says what to do.
    """
    where = files.location
    sizes = files.sizes()
    if not sizes:
        raise BaseModelRefused(
            f"no base model at {where}: push one with `conveyor base-models push DIR --name BASE` "
            "(`conveyor base-models list` shows the hub)"
        )
    config = _config(files, sizes)
    model_type = str(config["model_type"])
    kind = task_kind or ("image" if model_type in IMAGE_CLASSIFICATION_TYPES else "text")
    if kind == "image":
        _check_image_type(model_type, where)
    elif model_type not in SEQUENCE_CLASSIFICATION_TYPES:
        what = "an image model" if model_type in IMAGE_CLASSIFICATION_TYPES else "a model"
        raise BaseModelRefused(
            f"base model at {where} is {what} of type {model_type!r}, which transformers cannot fine-tune "
            "for text classification or regression (AutoModelForSequenceClassification): choose a text "
            "encoder such as BERT, DistilBERT, RoBERTa, MiniLM or DeBERTa"
        )
    weights, parameters, weight_bytes = _weights(files, sizes)
    preparation = _tokenizer(files, sizes) if kind == "text" else _image_processor(files, sizes)
    estimate_fit(parameters, instance_type, adapter, where, memory_gib)
    return BaseModelInfo(
        location=where,
        model_type=model_type,
        kind=kind,
        parameters=parameters,
        weight_bytes=weight_bytes,
        weight_files=weights,
        tokenizer_files=preparation,
        architectures=[str(a) for a in config.get("architectures") or []],
        digest=_recorded_digest(files, sizes),
    )


def _check_image_type(model_type: str, where: str) -> None:
    if model_type in IMAGE_TYPES_REFUSED:
        raise BaseModelRefused(
            f"base model at {where} is of type {model_type!r}: {IMAGE_TYPES_REFUSED[model_type]}"
        )
    if model_type not in IMAGE_CLASSIFICATION_TYPES:
        what = "a text model" if model_type in SEQUENCE_CLASSIFICATION_TYPES else "a model"
        raise BaseModelRefused(
            f"base model at {where} is {what} of type {model_type!r}, which transformers cannot fine-tune "
            "for image classification (AutoModelForImageClassification): choose an image backbone such as "
            "ViT, DeiT, ConvNeXt, ResNet, RegNet, EfficientNet or Swin"
        )


def _image_processor(files: BaseModelFiles, sizes: Mapping[str, int]) -> list[str]:
    # The training job prepares images as this file says (training/hf_image.py: size, crop, mean, std).
    name = IMAGE_PROCESSOR_FILE
    if name not in sizes:
        raise BaseModelRefused(
            f"base model at {files.location} has no {name}, which says how its images are prepared "
            "(size, crop, mean and std): save its image processor beside the model with "
            "image_processor.save_pretrained(DIR)"
        )
    try:
        if sizes[name] > SMALL_FILE_BYTES:
            raise ValueError("too large")
        config = json.loads(files.read(name))
        size = config["size"]
        side = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        if isinstance(side, bool) or not isinstance(side, (int, float)) or side < 1:
            raise ValueError(f"size {size!r}")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise BaseModelRefused(
            f"{_join(files.location, name)} is not an image processor config with a size (e.g. "
            '{"size": {"shortest_edge": 224}}): save it again with image_processor.save_pretrained'
        ) from None
    return [name]


def _config(files: BaseModelFiles, sizes: Mapping[str, int]) -> dict[str, Any]:
    where = files.location
    if "config.json" not in sizes:
        raise BaseModelRefused(
            f"base model at {where} has no config.json: save it with transformers' save_pretrained, which "
            "writes config.json beside the weights and tokenizer"
        )
    if sizes["config.json"] > SMALL_FILE_BYTES:
        raise BaseModelRefused(
            f"{where}config.json is {sizes['config.json']} bytes: that is not a model config"
        )
    try:
        config = json.loads(files.read("config.json"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaseModelRefused(
            f"{_join(where, 'config.json')} is not valid JSON ({exc}): save the model again"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise BaseModelRefused(
            f'{_join(where, "config.json")} has no "model_type": it is not a transformers model config; '
            "save the model with save_pretrained"
        )
    return config


def _weights(files: BaseModelFiles, sizes: Mapping[str, int]) -> tuple[list[str], int, int]:
    where = files.location
    if "model.safetensors" in sizes:
        names = ["model.safetensors"]
    elif "model.safetensors.index.json" in sizes:
        try:
            index = json.loads(files.read("model.safetensors.index.json"))
            names = sorted(set(index["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise BaseModelRefused(
                f"{_join(where, 'model.safetensors.index.json')} is not a safetensors index (no "
                '"weight_map"): save the model again'
            ) from None
        missing = [n for n in names if n not in sizes]
        if missing:
            raise BaseModelRefused(
                f"base model at {where} is missing weight shard(s) {', '.join(missing)} that "
                "model.safetensors.index.json names: push the whole folder"
            )
    elif any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in sizes):
        raise BaseModelRefused(
            f"base model at {where} has its weights only as pickle files (pytorch_model.bin), which can "
            "run code when loaded: convert them with model.save_pretrained(DIR) (safetensors is the "
            "default) and push DIR"
        )
    else:
        raise BaseModelRefused(
            f"base model at {where} has no weights (model.safetensors, or shards with "
            "model.safetensors.index.json): push the folder save_pretrained wrote"
        )
    parameters = weight_bytes = 0
    for name in names:
        count, nbytes = safetensors_parameters(files, name, sizes[name])
        parameters += count
        weight_bytes += nbytes
    if parameters == 0:
        raise BaseModelRefused(f"base model at {where} has weights files with no tensors in them")
    return names, parameters, weight_bytes


def safetensors_parameters(files: BaseModelFiles, name: str, size: int) -> tuple[int, int]:
    """The number of values and their bytes in one safetensors file, from its header alone.

    Raises
    ------
    BaseModelRefused
        When the file is not safetensors, or is cut short (its tensors end past its size).
    """
    where = _join(files.location, name)
    corrupt = f"{where} is not a readable safetensors file"
    if size < 8:
        raise BaseModelRefused(f"{corrupt} ({size} bytes): upload it again")
    (header_length,) = struct.unpack("<Q", files.read(name, 0, 8))
    if header_length > min(MAX_HEADER_BYTES, size - 8):
        raise BaseModelRefused(f"{corrupt} (its header says {header_length} bytes): upload it again")
    try:
        header = json.loads(files.read(name, 8, header_length))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BaseModelRefused(f"{corrupt} (its header is not JSON): upload it again") from None
    if not isinstance(header, dict):
        raise BaseModelRefused(f"{corrupt}: upload it again")
    values = end = 0
    for tensor, entry in header.items():
        if tensor == "__metadata__":
            continue
        try:
            count = math.prod(int(d) for d in entry["shape"])
            stop = int(entry["data_offsets"][1])
            width = DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError, IndexError):
            raise BaseModelRefused(f"{corrupt} (tensor {tensor!r} is malformed): upload it again") from None
        if stop - int(entry["data_offsets"][0]) != count * width:
            raise BaseModelRefused(f"{corrupt} (tensor {tensor!r} has the wrong size): upload it again")
        values += count
        end = max(end, stop)
    if 8 + header_length + end > size:
        raise BaseModelRefused(
            f"{where} is cut short: its tensors need {8 + header_length + end} bytes, the file has {size}; "
            "upload it again"
        )
    return values, end


def _tokenizer(files: BaseModelFiles, sizes: Mapping[str, int]) -> list[str]:
    for names in TOKENIZER_FILES:
        if all(n in sizes for n in names):
            if names == ("tokenizer.json",):
                try:
                    if sizes["tokenizer.json"] > SMALL_FILE_BYTES:
                        raise ValueError("too large")
                    json.loads(files.read("tokenizer.json"))
                except (UnicodeDecodeError, ValueError):
                    raise BaseModelRefused(
                        f"{_join(files.location, 'tokenizer.json')} is not valid JSON: save the tokenizer "
                        "again with tokenizer.save_pretrained"
                    ) from None
            extra = [n for n in ("tokenizer_config.json", "special_tokens_map.json") if n in sizes]
            return [*names, *extra]
    raise BaseModelRefused(
        f"base model at {files.location} has no tokenizer (tokenizer.json, or vocab.txt, vocab.json + "
        "merges.txt or a SentencePiece model): save it beside the model with tokenizer.save_pretrained(DIR)"
    )


def estimate_fit(
    parameters: int,
    instance_type: str | None,
    adapter: str,
    where: str = "",
    memory_gib: float | None = None,
    instance_count: int = 1,
) -> dict[str, Any]:
    """Whether fine-tuning a model of `parameters` fits one device of the instance, or its devices together
    with the model sharded over them (FSDP: each holds 1/N of the weights, gradients and optimiser state);
    refuses when neither.

    Returns
    -------
    dict
        ``needed_gib``, ``device_gib`` (None when unknown), ``fits`` (True, or None when unchecked) and
        ``sharding`` (``none``, or ``fsdp`` when only the devices together hold it, over ``devices``).
    """
    needed = training_bytes(parameters, adapter) / 2**30
    known = instance_memory(instance_type)
    device = memory_gib if memory_gib is not None else (known[0] if known else None)
    devices = training_devices(instance_type, instance_count)
    fits = {"needed_gib": round(needed, 3), "device_gib": device, "devices": devices, "sharding": "none"}
    if device is None:
        return {**fits, "fits": None}
    if needed > device * USABLE_SHARE and devices > 1 and needed / devices <= device * USABLE_SHARE:
        return {**fits, "fits": True, "sharding": "fsdp"}
    if needed > device * USABLE_SHARE:
        lora_fits = training_bytes(parameters, "lora") / 2**30 <= device * USABLE_SHARE
        if adapter == "full" and lora_fits:
            advice = 'set "adapter": "lora" in conveyor.json (only small adapters train), or '
        else:
            advice = ""
        bigger = next(
            ((name, gib) for name, gib in ONE_DEVICE_SUGGESTIONS if needed <= gib * USABLE_SHARE), None
        )
        if bigger:
            advice += (
                f'choose a training instance with more memory per device ("training": {{"instance_type": '
                f'"{bigger[0]}"}} has {bigger[1]} GiB per GPU)'
            )
        else:
            sharded = next((name for name in SHARDED_SUGGESTIONS if shards_fit(needed, name, 1)), None)
            if sharded:
                gib, gpus = instance_memory(sharded)  # type: ignore[misc]
                advice += (
                    f'choose a training instance whose GPUs hold it sharded ("training": {{"instance_type": '
                    f'"{sharded}"}}: {gpus} GPUs of {gib:g} GiB; conveyor shards the model over them with FSDP)'
                )
            else:
                advice += (
                    "choose a smaller base model: not even 8 of the largest GPUs SageMaker offers hold it"
                )
        of = f"one device of {instance_type or 'this machine'}"
        if devices > 1:
            of = f"one device of {instance_type}, or {devices} of them sharded"
        raise BaseModelRefused(
            f"the base model{' at ' + where if where else ''} has {parameters / 1e6:,.1f}M parameters: "
            f"{adapter} fine-tuning needs about {needed:,.1f} GiB for weights, gradients and optimiser "
            f"state, more than {USABLE_SHARE:.0%} of the {device:g} GiB of {of}: {advice}"
        )
    return {**fits, "fits": True}


# ------------------------------------------------------------------------------------- the hash manifest


def file_sha256(read: Callable[[], Iterable[bytes]]) -> str:
    """The SHA-256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    for chunk in read():
        digest.update(chunk)
    return digest.hexdigest()


def manifest_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One digest for a whole base model: over every file's name and SHA-256, in name order."""
    lines = "".join(f"{name}\0{files[name]['sha256']}\n" for name in sorted(files))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def build_manifest(name: str, info: BaseModelInfo, hashes: Mapping[str, tuple[int, str]]) -> dict[str, Any]:
    """``conveyor-base.json``: what `conveyor base-models push` recorded for the base."""
    files = {n: {"bytes": size, "sha256": sha} for n, (size, sha) in sorted(hashes.items())}
    return {
        "format_version": MANIFEST_FORMAT_VERSION,
        "name": name,
        "model_type": info.model_type,
        "kind": info.kind,
        "architectures": info.architectures,
        "parameters": info.parameters,
        "weight_bytes": info.weight_bytes,
        "weight_files": info.weight_files,
        "tokenizer_files": info.tokenizer_files,
        "files": files,
        "digest": manifest_digest(files),
    }


def _recorded_digest(files: BaseModelFiles, sizes: Mapping[str, int]) -> str:
    """The digest conveyor-base.json records, after checking that every file it lists is there, as big as
    it was; without a manifest (a folder copied in by hand), a digest over the names and sizes."""
    if MANIFEST_NAME not in sizes:
        listing = "".join(f"{n}\0{s}\n" for n, s in sorted(sizes.items()))
        return "sizes-sha256:" + hashlib.sha256(listing.encode()).hexdigest()
    try:
        manifest = json.loads(files.read(MANIFEST_NAME))
        recorded = manifest["files"]
        digest = str(manifest["digest"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise BaseModelRefused(
            f"{_join(files.location, MANIFEST_NAME)} is unreadable: push the base model again"
        ) from None
    changed = [n for n, entry in recorded.items() if sizes.get(n) != entry.get("bytes")]
    if changed:
        raise BaseModelRefused(
            f"base model at {files.location} changed since it was pushed ({', '.join(sorted(changed))} "
            "missing or of another size): push it again under a new name"
        )
    return digest


def _join(location: str, name: str) -> str:
    return location.rstrip("/") + "/" + name
