"""The pretrained_image recipe: fine-tune an image backbone from the hub's channel on class folders of
images, and serve what it learned.

Base models are tiny random-initialised ViT and ResNet classifiers saved in the test with their image
processors' configs (tests/tiny_models.py), so nothing is downloaded and each fine-tunes in seconds.
"""

import base64
import json
import os
import random
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from samples import SHAPES
from test_training import TRAINING, TrainedCase, image_channels, modules_from, serve, served
from tiny_models import record_base, save_tiny_image_model

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def run_image_base(root, family, *extra) -> TrainedCase:
    """A training job on the shapes dataset with a tiny `family` backbone as its base channel."""
    base = save_tiny_image_model(root / "base", family)
    digest = record_base(base)
    channels, manifest = image_channels(root / "input", random.Random(31))
    manifest["recipe"] = "pretrained_image"  # as preprocessing writes it when conveyor.json names a base
    (channels["manifest"] / "manifest.json").write_text(json.dumps(manifest))
    ml = root / "opt/ml"
    env = {
        **os.environ,
        "SM_MODEL_DIR": str(ml / "model"),
        "SM_OUTPUT_DATA_DIR": str(ml / "output/data"),
        "SM_OUTPUT_DIR": str(ml / "output"),
        "SM_CHECKPOINT_DIR": str(root / "checkpoints"),
        "SM_CHANNEL_BASE": str(base),
        **{f"SM_CHANNEL_{name.upper()}": str(path) for name, path in channels.items()},
    }
    command = [
        sys.executable,
        str(TRAINING / "train.py"),
        *("--base_model", f"tiny-{family}", "--base_model_digest", digest),
        *extra,
    ]
    completed = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return TrainedCase(root, channels, manifest, completed)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return run_image_base(
        tmp_path_factory.mktemp("vit"),
        "vit",
        *("--epochs", "12", "--learning_rate", "3e-3", "--patience", "12"),
    )


@pytest.fixture(scope="module")
def resnet_lora(tmp_path_factory):
    return run_image_base(
        tmp_path_factory.mktemp("resnet"),
        "resnet",
        *("--adapter", "lora", "--epochs", "3", "--learning_rate", "1e-2"),
    )


def test_a_fine_tuned_vit_learns_the_shapes(vit):
    summary = vit.evaluation()["conveyor"]
    assert summary["value"] > summary["baseline"] + 0.3, summary
    assert summary["hyperparameters"]["recipe"] == "pretrained_image"
    assert summary["hyperparameters"]["base_model"] == "tiny-vit"
    # The base's preprocessing, not the image recipe's 64 pixels: ViT's processor resizes to 16 x 16.
    config = json.loads((vit.model_dir / "model_config.json").read_text())
    assert config["features"] == [{"name": "image", "type": "image", "image_size": 16}]
    architecture = config["architecture"]
    assert architecture["name"] == "hf_image_classifier" and architecture["adapter"] == "full"
    assert architecture["preprocessing"] == {
        "image_size": 16,
        "crop": 1.0,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }
    assert "images cut to their centre 100.0% and resized to 16x16" in vit.completed.stdout


def test_the_model_directory_holds_the_fine_tuned_backbone_in_hugging_face_layout(vit):
    hf = vit.model_dir / "hf"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (hf / name).is_file(), name
    assert not (vit.model_dir / "model.pth").exists()
    assert (vit.model_dir / "code/hf_image.py").is_file() and (vit.model_dir / "code/image_cnn.py").is_file()
    assert "transformers==" in (vit.model_dir / "code/requirements.txt").read_text()
    saved = json.loads((hf / "config.json").read_text())
    assert saved["id2label"] == {str(i): label for i, label in enumerate(SHAPES)}


def test_served_predictions_match_the_evaluation(vit):
    with zipfile.ZipFile(vit.channels["test"] / "part-00000.zip") as archive:
        files = [(name.split("/")[0], archive.read(name)) for name in archive.namelist()]
    instances = [{"image": base64.b64encode(data).decode()} for _, data in files]
    with served(vit) as (inference, model):
        assert model.network.training is False
        predictions = serve(inference, model, instances)["predictions"]
        with pytest.raises(inference.InvalidInput) as raised:
            inference.input_fn(json.dumps({"instances": [{"image": "bm90IGFuIGltYWdl"}]}))
    assert raised.value.status_code == 400
    accuracy = np.mean([p["label"] == label for p, (label, _) in zip(predictions, files, strict=True)])
    assert accuracy == pytest.approx(vit.evaluation()["conveyor"]["value"])
    assert set(predictions[0]["probabilities"]) == set(SHAPES)


def test_lora_adapts_the_convolutions_of_a_resnet_and_serves_it_merged(resnet_lora):
    config = json.loads((resnet_lora.model_dir / "model_config.json").read_text())
    architecture = config["architecture"]
    assert architecture["adapter"] == "lora"
    assert 0 < architecture["trained_parameters"] < architecture["parameters"]
    # The ConvNeXt-style processor: the shorter side's central 87.5%, resized to 16 pixels.
    assert config["features"] == [{"name": "image", "type": "image", "image_size": 16, "crop": 0.875}]
    assert (resnet_lora.model_dir / "adapter/adapter_config.json").is_file()
    adapter = json.loads((resnet_lora.model_dir / "adapter/adapter_config.json").read_text())
    assert any("convolution" in name for name in adapter["target_modules"]), adapter["target_modules"]
    with zipfile.ZipFile(resnet_lora.channels["test"] / "part-00000.zip") as archive:
        data = archive.read(archive.namelist()[0])
    with served(resnet_lora) as (inference, model):
        assert not any("lora" in name for name, _ in model.network.named_parameters())
        answer = serve(inference, model, [{"image": base64.b64encode(data).decode()}])
    assert answer["predictions"][0]["label"] in SHAPES


# --- the base's preprocessing ------------------------------------------------------------------------------


def _hf_image():
    return modules_from(TRAINING)


@pytest.mark.parametrize(
    ("processor", "expected"),
    [
        # ViT: a fixed height and width, no crop.
        (
            {"size": {"height": 224, "width": 224}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
            (224, 1.0),
        ),
        # ConvNeXt and ResNet: the shorter side at 224, crop_pct of it kept.
        ({"size": {"shortest_edge": 224}, "crop_pct": 0.875}, (224, 0.875)),
        # ConvNeXt at 384 and above resizes without cropping.
        ({"size": {"shortest_edge": 384}, "crop_pct": 0.875}, (384, 1.0)),
        # DeiT and BEiT: resize to 256, crop the centre 224.
        (
            {"size": {"height": 256, "width": 256}, "do_center_crop": True, "crop_size": {"height": 224}},
            (224, 0.875),
        ),
        ({"size": 256, "crop_size": 224}, (224, 0.875)),  # older configs: bare numbers
        ({"size": 256, "do_center_crop": False, "crop_size": 224}, (256, 1.0)),
    ],
)
def test_preprocessing_follows_the_base_models_processor_config(tmp_path, processor, expected):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    with _hf_image() as load:
        prepared = load("hf_image").preprocessing(tmp_path)
    assert (prepared.image_size, prepared.crop) == expected
    if "image_mean" not in processor:  # transformers' default: ImageNet's statistics
        assert prepared.mean == (0.485, 0.456, 0.406) and prepared.std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "has no preprocessor_config.json"),
        ("{not json", "does not parse"),
        (json.dumps({"size": {"longest_edge": 3}}), "no usable size"),
        (json.dumps({"size": 224, "image_std": [0.2, 0.0, 0.2]}), "not positive"),
        (json.dumps({"size": 224, "image_mean": [0.5, 0.5]}), "three values"),
        (json.dumps({"size": 200, "crop_size": 224}), "crops 1.120"),
    ],
)
def test_an_unusable_processor_config_is_a_clear_error(tmp_path, content, message):
    if content is not None:
        (tmp_path / "preprocessor_config.json").write_text(content)
    with _hf_image() as load:
        hf_image = load("hf_image")
        with pytest.raises(hf_image.DataError, match=message):
            hf_image.preprocessing(tmp_path)
