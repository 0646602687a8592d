"""The base-model hub: push and list, and every check that refuses a bad base model before training
(common.base_models, issue 17). Models are tiny, random and saved in the test: nothing is downloaded."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import boto3
import pytest
from moto import mock_aws
from tiny_models import save_tiny_encoder, save_tiny_image_model

from common import base_models as hub
from common import instances
from common.config import Settings
from preprocess import app
from preprocess.spec import DatasetSpec

BUCKET = "conveyor-artifacts"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("bert"), "bert")


@pytest.fixture
def base(tmp_path, tiny_bert) -> Path:
    """A copy of the tiny BERT to break."""
    folder = tmp_path / "base"
    folder.mkdir()
    for path in tiny_bert.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def refusal(folder: Path, **kwargs) -> str:
    with pytest.raises(hub.BaseModelRefused) as raised:
        hub.inspect(hub.FolderFiles(folder), **kwargs)
    return raised.value.reason


def test_a_saved_encoder_passes_and_its_parameters_are_counted_from_the_safetensors_header(
    tiny_bert, tmp_path
):
    import torch
    from transformers import AutoModel

    info = hub.inspect(hub.FolderFiles(tiny_bert), instance_type="ml.g5.xlarge")
    model = AutoModel.from_pretrained(tiny_bert)
    assert info.model_type == "bert" and info.architectures == ["BertModel"]
    assert info.parameters == sum(t.numel() for t in model.state_dict().values())
    assert info.weight_files == ["model.safetensors"] and "tokenizer.json" in info.tokenizer_files
    assert info.weight_bytes == info.parameters * torch.float32.itemsize
    other = hub.inspect(hub.FolderFiles(save_tiny_encoder(tmp_path / "d", "distilbert")))
    assert other.model_type == "distilbert"


def test_sharded_weights_are_counted_across_their_shards(tiny_bert, tmp_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert)
    model.save_pretrained(tmp_path, max_shard_size="10KB")
    (tmp_path / "vocab.txt").write_bytes((tiny_bert / "vocab.txt").read_bytes())
    info = hub.inspect(hub.FolderFiles(tmp_path))
    assert len(info.weight_files) > 1
    assert info.parameters == hub.inspect(hub.FolderFiles(tiny_bert)).parameters
    (tmp_path / info.weight_files[-1]).unlink()
    assert f"missing weight shard(s) {info.weight_files[-1]}" in refusal(tmp_path)


def test_a_missing_or_corrupt_config_is_refused(base):
    (base / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in refusal(base)
    (base / "config.json").write_text(json.dumps({"hidden_size": 16}))
    assert 'has no "model_type"' in refusal(base)
    (base / "config.json").unlink()
    assert "has no config.json" in refusal(base)


def test_missing_pickle_only_or_truncated_weights_are_refused(base):
    weights = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert "is cut short" in refusal(base)
    (base / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    assert "not a readable safetensors file" in refusal(base)
    (base / "model.safetensors").unlink()
    assert "has no weights" in refusal(base)
    (base / "pytorch_model.bin").write_bytes(b"pickle")
    assert "only as pickle files" in refusal(base)


def test_a_missing_tokenizer_is_refused(base):
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        (base / name).unlink()
    assert "has no tokenizer" in refusal(base)


def test_an_architecture_that_does_not_fit_the_task_is_refused(base):
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    assert "is an image model of type 'vit'" in refusal(base, task_kind="text")
    (base / "config.json").write_text(json.dumps({**config, "model_type": "whisper"}))
    assert "cannot fine-tune for text classification" in refusal(base)


def test_a_text_base_for_an_image_dataset_is_refused(base):
    reason = refusal(base, task_kind="image")
    assert (
        "is a text model of type 'bert'" in reason and "cannot fine-tune for image classification" in reason
    )


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    return save_tiny_image_model(tmp_path_factory.mktemp("vit"), "vit")


@pytest.fixture
def image_base(tmp_path, tiny_vit) -> Path:
    """A copy of the tiny ViT to break."""
    folder = tmp_path / "image-base"
    folder.mkdir()
    for path in tiny_vit.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_an_image_backbone_passes_for_images_and_push_knows_it_is_one(tiny_vit, tmp_path):
    for kind in ("image", None):  # None: `base-models push`, before any dataset names it
        info = hub.inspect(hub.FolderFiles(tiny_vit), task_kind=kind, instance_type="ml.g5.xlarge")
        assert info.kind == "image" and info.model_type == "vit"
        assert info.tokenizer_files == ["preprocessor_config.json"]  # no tokenizer needed
    resnet = hub.inspect(hub.FolderFiles(save_tiny_image_model(tmp_path / "r", "resnet")), task_kind="image")
    assert resnet.model_type == "resnet" and resnet.parameters > 0
    # An image backbone named for a table of text is refused as before.
    assert "is an image model of type 'vit'" in refusal(tiny_vit, task_kind="text")


def test_an_image_backbone_without_a_usable_processor_config_is_refused(image_base):
    config = image_base / "preprocessor_config.json"
    config.write_text("{not json")
    assert "is not an image processor config with a size" in refusal(image_base, task_kind="image")
    config.write_text(json.dumps({"size": {"longest_edge": 7}}))
    assert "is not an image processor config with a size" in refusal(image_base, task_kind="image")
    config.unlink()
    assert "has no preprocessor_config.json" in refusal(image_base, task_kind="image")


def test_image_model_types_conveyor_cannot_fine_tune_are_refused_with_the_reason(image_base):
    config = json.loads((image_base / "config.json").read_text())
    (image_base / "config.json").write_text(json.dumps({**config, "model_type": "timm_wrapper"}))
    assert "timm checkpoints need timm and torchvision" in refusal(image_base, task_kind="image")
    (image_base / "config.json").write_text(json.dumps({**config, "model_type": "whisper"}))
    assert "cannot fine-tune for image classification" in refusal(image_base, task_kind="image")


def test_a_model_too_large_for_the_instance_is_refused_with_what_to_do(base):
    reason = refusal(base, instance_type="ml.g5.xlarge", memory_gib=0.00005)
    assert "more than 80% of the 5e-05 GiB" in reason and '"adapter": "lora"' in reason
    seven_billion, two_billion = 7_000_000_000, 2_000_000_000
    with pytest.raises(hub.BaseModelRefused) as full:
        hub.estimate_fit(two_billion, "ml.g5.xlarge", "full")
    assert (
        '"adapter": "lora"' in full.value.reason
        and '"ml.g6e.xlarge"} has 48 GiB per GPU' in full.value.reason
    )
    with pytest.raises(hub.BaseModelRefused) as lora:
        hub.estimate_fit(seven_billion, "ml.g5.xlarge", "lora")
    assert '"adapter"' not in lora.value.reason and "ml.g6e.xlarge" in lora.value.reason
    assert hub.estimate_fit(seven_billion, "ml.p4de.24xlarge", "lora")["fits"] is True
    assert hub.estimate_fit(110_000_000, "ml.g5.xlarge", "full")["fits"] is True  # bert-base
    assert hub.estimate_fit(seven_billion, "ml.unknown.xlarge", "full")["fits"] is None
    assert instances.instance_memory("ml.m5.xlarge") == (16.0, 0)
    assert instances.instance_memory("ml.p4d.24xlarge") == (40.0, 8)


def test_a_model_no_gpu_holds_fits_the_gpus_of_its_instance_sharded_or_is_refused_saying_which_do():
    three_billion = 3_000_000_000  # 45 GiB to fine-tune in full: more than 80% of 24 GiB, 11 GiB of 4 GPUs
    sharded = hub.estimate_fit(three_billion, "ml.g5.12xlarge", "full")
    assert sharded["fits"] is True and sharded["sharding"] == "fsdp" and sharded["devices"] == 4
    assert hub.estimate_fit(110_000_000, "ml.g5.12xlarge", "full")["sharding"] == "none"  # one GPU holds it
    # Two instances of one GPU each: torchrun's two processes hold it together.
    assert hub.estimate_fit(1_500_000_000, "ml.g5.xlarge", "full", instance_count=2)["sharding"] == "fsdp"
    with pytest.raises(hub.BaseModelRefused, match="or 4 of them sharded"):
        hub.estimate_fit(30_000_000_000, "ml.g5.12xlarge", "full")
    # No single GPU holds 10B parameters in full (149 GiB): four of 48 GiB do, sharded; 70B (1 TiB), none.
    with pytest.raises(hub.BaseModelRefused) as refused:
        hub.estimate_fit(10_000_000_000, "ml.g5.xlarge", "full")
    assert '"ml.g6e.12xlarge"}: 4 GPUs of 48 GiB; conveyor shards the model over them' in refused.value.reason
    with pytest.raises(hub.BaseModelRefused, match="choose a smaller base model: not even 8"):
        hub.estimate_fit(70_000_000_000, "ml.g5.xlarge", "full")


def test_a_path_outside_the_hub_is_refused():
    for uri in (
        "s3://someone-elses-bucket/base-models/bert/",
        f"s3://{BUCKET}/models/bert/",
        f"s3://{BUCKET}/base-models/",
        f"s3://{BUCKET}/base-models/../training/x/",
    ):
        with pytest.raises(hub.BaseModelRefused, match=r"outside the hub|'\.\.'"):
            hub.locate(uri, BUCKET)
    assert hub.locate(f"s3://{BUCKET}/base-models/bert", BUCKET) == (BUCKET, "base-models/bert/")
    assert hub.locate("bert", BUCKET) == (BUCKET, "base-models/bert/")
    with pytest.raises(hub.BaseModelRefused, match="lower-case letters"):
        hub.locate("Bert Base", BUCKET)


def test_the_model_type_tables_are_transformers_own():
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    assert set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES) == hub.SEQUENCE_CLASSIFICATION_TYPES
    assert set(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES) == hub.IMAGE_CLASSIFICATION_TYPES


# ----------------------------------------------------------------------------- the hub on S3


@pytest.fixture
def target(monkeypatch):
    from common import aws
    from conveyor.client import Target

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # The preprocess function's clients are cached: one an earlier test made may point at its own server.
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    aws.reset_clients()
    with mock_aws():
        session = boto3.session.Session(region_name="us-east-1")
        session.client("s3").create_bucket(Bucket=BUCKET)
        yield Target({"ArtifactsBucketName": BUCKET}, session)
    aws.reset_clients()


def test_push_uploads_the_files_and_a_hash_manifest_and_never_overwrites(target, tiny_bert, tmp_path):
    from conveyor import base_models
    from conveyor.client import ConveyorError

    progress = io.StringIO()
    pushed = base_models.push(target, tiny_bert, "tiny-bert", progress=progress)
    assert pushed.uri == f"s3://{BUCKET}/base-models/tiny-bert/" and not pushed.already_there
    assert "model.safetensors" in progress.getvalue()
    s3 = target.client("s3")
    manifest = json.loads(
        s3.get_object(Bucket=BUCKET, Key="base-models/tiny-bert/conveyor-base.json")["Body"].read()
    )
    assert manifest["digest"] == pushed.digest == hub.manifest_digest(manifest["files"])
    assert set(manifest["files"]) == set(hub.FolderFiles(tiny_bert).sizes())
    again = base_models.push(target, tiny_bert, "tiny-bert")
    assert again.already_there and again.digest == pushed.digest
    other = save_tiny_encoder(tmp_path / "other", "distilbert")
    with pytest.raises(ConveyorError, match="holds another base model already"):
        base_models.push(target, other, "tiny-bert")
    listed = base_models.list_bases(target)
    assert [(b["name"], b["model_type"], b["digest"]) for b in listed] == [
        ("tiny-bert", "bert", pushed.digest)
    ]
    table = io.StringIO()
    base_models.print_table(listed, table)
    assert "tiny-bert" in table.getvalue() and "bert" in table.getvalue()
    # The pipeline's checks read the same base on S3, a range read per header.
    info = hub.inspect(hub.S3Files(s3, BUCKET, "base-models/tiny-bert"))
    assert info.digest == pushed.digest and info.parameters == pushed.parameters


def test_push_refuses_a_bad_folder_with_the_reason(target, base):
    from conveyor import base_models
    from conveyor.client import ConveyorError

    (base / "config.json").unlink()
    with pytest.raises(ConveyorError, match=r"has no config\.json"):
        base_models.push(target, base, "broken")
    assert base_models.list_bases(target) == []


def test_a_base_changed_after_its_push_is_refused(target, tiny_bert):
    from conveyor import base_models

    base_models.push(target, tiny_bert, "tiny-bert")
    s3 = target.client("s3")
    s3.put_object(Bucket=BUCKET, Key="base-models/tiny-bert/vocab.txt", Body=b"[PAD]\n")
    with pytest.raises(hub.BaseModelRefused, match=r"changed since it was pushed \(vocab.txt"):
        hub.inspect(hub.S3Files(s3, BUCKET, "base-models/tiny-bert/"))


def test_the_execution_input_carries_the_base_channel_or_the_refusal(target, tiny_bert):
    from conveyor import base_models

    base_models.push(target, tiny_bert, "tiny-bert")
    settings = Settings(artifacts_bucket=BUCKET, processed_bucket="processed", training_use_spot="false")
    manifest = {"dataset": "tickets", "version": "v1", "source": {}, "task": "classification", "target": "y"}
    spec = DatasetSpec(base_model="tiny-bert", adapter="lora", max_length=64)
    given = app._execution_input(manifest, spec, settings)
    base = given["training"]["base"]
    assert base["index"] == 1 and base["uri"] == f"s3://{BUCKET}/base-models/tiny-bert/"
    assert base["digest"].startswith("sha256:") and base["memory"]["fits"] is True
    hps = given["training"]["hyperparameters"]
    assert (hps["base_model"], hps["adapter"], hps["max_length"]) == ("tiny-bert", "lora", "64")
    # The job runs the code that brings transformers' wheels; a small model's job the plain code.
    assert hps["sagemaker_submit_directory"] == "/opt/ml/input/data/code/sourcedir-hf.tar.gz"
    assert "refused" not in given
    missing = app._execution_input(manifest, DatasetSpec(base_model="no-such-base"), settings)
    assert missing["refused"]["Error"] == "BaseModelRefused"
    assert (
        "no base model at s3://" in missing["refused"]["Cause"] and missing["training"]["base"]["index"] == 0
    )
    plain = app._execution_input(manifest, DatasetSpec(), settings)
    assert plain["training"]["base"] == {"index": 0, "uri": ""} and "refused" not in plain
    assert plain["training"]["hyperparameters"]["sagemaker_submit_directory"].endswith("/sourcedir.tar.gz")


def test_the_instance_is_chosen_to_fit_the_base_when_the_spec_names_none(target, tiny_bert, monkeypatch):
    from conveyor import base_models

    choose = instances.instance_for
    assert choose(110_000_000, "full", "ml.g5.xlarge") == "ml.g5.xlarge"  # BERT-base fits 24 GiB
    assert choose(1_300_000_000, "full", "ml.g5.xlarge") == "ml.g6e.xlarge"  # 19 GiB: 48 GiB
    assert choose(1_300_000_000, "lora", "ml.g5.xlarge") == "ml.g5.xlarge"  # LoRA's share fits
    assert choose(10**10, "full", "ml.g5.xlarge") == "ml.g6e.12xlarge"  # 149 GiB: 4 GPUs, sharded
    assert choose(70_000_000_000, "full", "ml.g5.xlarge") == "ml.g5.xlarge"  # none holds it
    assert choose(10**9, "full", "ml.unknown.type") == "ml.unknown.type"

    base_models.push(target, tiny_bert, "tiny-bert")
    # The tiny encoder as if each parameter took 10 MB to fine-tune: tens of GiB.
    monkeypatch.setattr(instances, "FULL_BYTES_PER_PARAMETER", 10_000_000)
    settings = Settings(
        artifacts_bucket=BUCKET,
        processed_bucket="processed",
        training_use_spot="false",
        training_instance_type="ml.g5.xlarge",
    )
    manifest = {"dataset": "tickets", "version": "v1", "source": {}, "task": "classification", "target": "y"}
    chosen = app._execution_input(manifest, DatasetSpec(base_model="tiny-bert"), settings)
    resources, memory = chosen["training"]["resources"], chosen["training"]["base"]["memory"]
    assert resources["instance_type"] in ("ml.g6e.xlarge", "ml.p4de.24xlarge", "ml.p5e.48xlarge")
    assert memory["instance_chosen"] is True and memory["instance_type"] == resources["instance_type"]
    assert "refused" not in chosen
    # An instance the spec names is kept, and a base too big for it is refused saying what fits.
    named = app._execution_input(
        manifest, DatasetSpec(base_model="tiny-bert", training={"instance_type": "ml.g5.xlarge"}), settings
    )
    assert named["training"]["resources"]["instance_type"] == "ml.g5.xlarge"
    assert "choose a training instance with more memory" in named["refused"]["Cause"]
    assert "sharding" not in chosen["training"]["hyperparameters"]
    # A base that one of its GPUs cannot hold, but the four together can: the job trains it sharded.
    parameters = hub.inspect(hub.FolderFiles(tiny_bert)).parameters
    monkeypatch.setattr(instances, "FULL_BYTES_PER_PARAMETER", 40 * 2**30 // parameters)  # 40 GiB
    four = app._execution_input(
        manifest, DatasetSpec(base_model="tiny-bert", training={"instance_type": "ml.g5.12xlarge"}), settings
    )
    assert "refused" not in four and four["training"]["base"]["memory"]["sharding"] == "fsdp"
    assert four["training"]["hyperparameters"]["sharding"] == "fsdp"


def test_an_image_dataset_gets_an_image_backbone_and_is_refused_a_text_encoder(target, tiny_bert, tiny_vit):
    from conveyor import base_models

    base_models.push(target, tiny_vit, "tiny-vit")
    base_models.push(target, tiny_bert, "tiny-bert")
    listed = {b["name"]: b["kind"] for b in base_models.list_bases(target)}
    assert listed == {"tiny-vit": "image", "tiny-bert": "text"}
    table = io.StringIO()
    base_models.print_table(base_models.list_bases(target), table)
    assert "KIND" in table.getvalue() and " image " in table.getvalue()
    settings = Settings(artifacts_bucket=BUCKET, processed_bucket="processed", training_use_spot="false")
    manifest = {
        "dataset": "pets", "version": "v1", "source": {}, "task": "classification", "target": "label",
        "format": "zip", "recipe": "pretrained_image",
    }  # fmt: skip
    given = app._execution_input(manifest, DatasetSpec(base_model="tiny-vit"), settings)
    assert "refused" not in given and given["training"]["base"]["model_type"] == "vit"
    assert given["training"]["hyperparameters"]["base_model"] == "tiny-vit"
    refused = app._execution_input(manifest, DatasetSpec(base_model="tiny-bert"), settings)
    assert "is a text model of type 'bert'" in refused["refused"]["Cause"]
