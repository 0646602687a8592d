"""The image recipe's training side (training/images.py): reading split channels of class folders, decoding
images as training and serving both see them, the request format, and the CNN (docs: image contract,
"Training" and "Serving")."""

import base64
import importlib
import io
import json
import logging
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TRAINING = ROOT / "training"


def _import_images():
    # As in /opt/ml/code: images.py imports `data` top-level, image_cnn.py `images`. All are forgotten
    # afterwards so other tests import their own; this module keeps its references, and DataError is always
    # `images.DataError`.
    names = ("data", "images", "image_cnn")
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    sys.path.insert(0, str(TRAINING))
    try:
        return importlib.import_module("images"), importlib.import_module("image_cnn")
    finally:
        sys.path.remove(str(TRAINING))
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


images, image_cnn = _import_images()
DataError = images.DataError
RED, BLUE, GREEN, WHITE = (220, 20, 20), (20, 20, 220), (20, 200, 20), (255, 255, 255)


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def halves(width: int, height: int, left=RED, right=BLUE, mode: str = "RGB") -> Image.Image:
    """Left half one colour, right half another."""
    image = Image.new(mode, (width, height), left)
    image.paste(right, (width // 2, 0, width, height))
    return image


def colour_at(pixels: np.ndarray, row: int, column: int) -> tuple[int, ...]:
    return tuple(int(v) for v in pixels[:, row, column])


def close(actual, expected, tolerance=12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# --- decoding ------------------------------------------------------------------------------------------


def test_decodes_jpeg_and_png_to_square_uint8_rgb():
    for data in (encoded(Image.new("RGB", (50, 50), RED), "JPEG", quality=95), encoded(halves(50, 50))):
        pixels = images.decode_image(data, 16)
        assert pixels.shape == (3, 16, 16)
        assert pixels.dtype == np.uint8
        assert close(colour_at(pixels, 8, 2), RED)
    png = images.decode_image(encoded(halves(50, 50)), 16)
    assert colour_at(png, 8, 0) == RED
    assert colour_at(png, 8, 15) == BLUE


def test_wide_and_tall_images_are_centre_cropped_and_tiny_ones_upscaled():
    # 3:1 wide: the centre third is kept, so the outer colours vanish and the middle splits left/right.
    wide = Image.new("RGB", (90, 30), GREEN)
    wide.paste(RED, (30, 0, 45, 30))
    wide.paste(BLUE, (45, 0, 60, 30))
    pixels = images.decode_image(encoded(wide), 20)
    assert pixels.shape == (3, 20, 20)
    assert close(colour_at(pixels, 10, 1), RED)
    assert close(colour_at(pixels, 10, 18), BLUE)
    assert GREEN not in {colour_at(pixels, r, c) for r in range(20) for c in range(20)}
    tall = wide.rotate(90, expand=True)  # red now in the lower middle, blue above it
    pixels = images.decode_image(encoded(tall), 20)
    assert close(colour_at(pixels, 1, 10), BLUE)
    assert close(colour_at(pixels, 18, 10), RED)
    tiny = images.decode_image(encoded(Image.new("RGB", (1, 1), GREEN)), 32)
    assert tiny.shape == (3, 32, 32)
    assert (tiny == np.array(GREEN, dtype=np.uint8).reshape(3, 1, 1)).all()


def test_large_jpeg_is_decoded_reduced_with_the_same_result_shape():
    big = halves(2000, 1500)
    pixels = images.decode_image(encoded(big, "JPEG", quality=90), 32)
    assert pixels.shape == (3, 32, 32)
    assert close(colour_at(pixels, 16, 3), RED) and close(colour_at(pixels, 16, 28), BLUE)


def test_exif_orientation_is_applied():
    # Stored left red / right blue; orientation 6 means "rotate 90 degrees clockwise to display": red on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    for fmt in ("JPEG", "PNG"):
        data = encoded(halves(40, 20), fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
        pixels = images.decode_image(data, 16)
        assert close(colour_at(pixels, 2, 8), RED), fmt
        assert close(colour_at(pixels, 13, 8), BLUE), fmt


def test_greyscale_palette_cmyk_and_16_bit_become_rgb():
    grey = images.decode_image(encoded(Image.new("L", (10, 10), 77)), 8)
    assert (grey == 77).all()
    palette = halves(10, 10).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    pixels = images.decode_image(encoded(palette, "GIF"), 8)
    assert colour_at(pixels, 4, 0) == RED and colour_at(pixels, 4, 7) == BLUE
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    assert close(colour_at(images.decode_image(encoded(cmyk, "JPEG", quality=95), 8), 4, 4), (255, 0, 0))
    sixteen = Image.fromarray(np.full((10, 10), 32896, dtype=np.uint16))  # mid grey: 128 * 257
    assert sixteen.mode.startswith("I")
    assert (images.decode_image(encoded(sixteen), 8) == 128).all()
    bilevel = Image.new("1", (10, 10), 1)
    assert (images.decode_image(encoded(bilevel), 8) == 255).all()


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    rgba.paste((*RED, 255), (0, 0, 10, 20))
    pixels = images.decode_image(encoded(rgba), 10)
    assert colour_at(pixels, 5, 1) == RED
    assert colour_at(pixels, 5, 8) == WHITE
    # A palette image with a transparent index (as GIFs have), and greyscale with alpha.
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([*RED, *BLUE] + [0] * 762)
    palette.paste(0, (0, 0, 10, 20))
    pixels = images.decode_image(encoded(palette, transparency=1), 10)
    assert colour_at(pixels, 5, 1) == RED
    assert colour_at(pixels, 5, 8) == WHITE
    assert (images.decode_image(encoded(Image.new("LA", (8, 8), (0, 0))), 4) == 255).all()


def test_undecodable_images_raise_data_error_naming_the_entry():
    jpeg = encoded(Image.new("RGB", (64, 64), RED), "JPEG")
    bad = {
        "garbage": b"not an image at all",
        "empty": b"",
        "truncated": jpeg[: len(jpeg) // 2],
        # A format outside the contract's suffixes is not even tried (PPM here).
        "other format": encoded(Image.new("RGB", (4, 4)), "PPM"),
    }
    for what, data in bad.items():
        with pytest.raises(DataError, match=r"^cannot decode cat/broken\.jpg: \w") as raised:
            images.decode_image(data, 8, "cat/broken.jpg")
        assert isinstance(raised.value, ValueError), what
        assert "BytesIO" not in str(raised.value), what


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_are_refused_clearly(monkeypatch):
    data = encoded(Image.new("RGB", (40, 20)))
    monkeypatch.setattr(images.Image, "MAX_IMAGE_PIXELS", 500)  # Pillow would only warn
    with pytest.raises(
        DataError, match=r"^cannot decode cat/huge\.png: 40x20 pixels is above the decompression"
    ):
        images.decode_image(data, 8, "cat/huge.png")
    monkeypatch.setattr(images.Image, "MAX_IMAGE_PIXELS", 100)  # Pillow raises its own error
    with pytest.raises(DataError, match=r"cat/huge\.png: .*decompression bomb"):
        images.decode_image(data, 8, "cat/huge.png")


def test_decode_images_keeps_order_in_parallel_and_names_the_first_bad_image(caplog):
    count = images.PARALLEL_MIN_IMAGES + 44
    datas = [encoded(Image.new("RGB", (12, 9), (i % 256, (7 * i) % 256, 3))) for i in range(count)]
    names = [f"c/{i}.png" for i in range(count)]
    with caplog.at_level(logging.INFO, logger="train"):
        serial = images.decode_images(datas, 6, names, workers=1)
        parallel = images.decode_images(datas, 6, names, workers=3)
    assert serial.shape == (count, 3, 6, 6) and serial.dtype == np.uint8
    assert np.array_equal(serial, parallel)
    assert [int(v) for v in parallel[:, 0, 0, 0]] == [i % 256 for i in range(count)]
    assert f"decoded {count} images to 6x6" in caplog.text
    broken = list(datas)
    broken[100] = broken[200] = b"junk"
    with pytest.raises(DataError, match=r"c/100\.png"):
        images.decode_images(broken, 6, names, workers=3)
    assert images.decode_images([], 6).shape == (0, 3, 6, 6)


# --- reading split channels ----------------------------------------------------------------------------

PNG = encoded(Image.new("RGB", (4, 4), RED))


def write_zip(path: Path, entries: dict[str, bytes | None]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            if data is None:
                archive.writestr(zipfile.ZipInfo(name), b"")  # a directory entry when the name ends in /
            else:
                archive.writestr(name, data)


def test_reads_every_zip_of_a_channel_skipping_junk(tmp_path, caplog):
    write_zip(
        tmp_path / "part-00000.zip",
        {
            "cat/": None,
            "cat/1.jpg": b"cat one",
            "cat/indoor/2.PNG": b"cat two",
            "cat/.DS_Store": b"x",
            "cat/._1.jpg": b"x",
            "__MACOSX/cat/._1.jpg": b"x",
            "dog/Thumbs.db": b"x",
            "dog/notes.txt": b"not an image",
            "dog/1.webp": b"dog one",
        },
    )
    write_zip(tmp_path / "part-00001.zip", {"bird/1.gif": b"bird one"})
    with caplog.at_level(logging.WARNING, logger="train"):
        split = images.read_image_split(tmp_path, "train")
    assert split.name == "train" and split.rows == 4
    assert split.images == [b"cat one", b"cat two", b"dog one", b"bird one"]
    assert split.labels == ["cat", "cat", "dog", "bird"]
    assert split.entries == [
        "part-00000.zip:cat/1.jpg",
        "part-00000.zip:cat/indoor/2.PNG",
        "part-00000.zip:dog/1.webp",
        "part-00001.zip:bird/1.gif",
    ]
    assert split.skipped == 1
    assert "skipped 1 files that are not images" in caplog.text


def test_reads_a_directory_of_class_folders_when_the_channel_has_no_zip(tmp_path):
    for entry, data in {"dog/b.png": b"dog b", "cat/a.jpeg": b"cat a", "cat/deep/c.tif": b"cat c"}.items():
        (tmp_path / entry).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / entry).write_bytes(data)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.png").write_bytes(b"x")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"x")
    split = images.read_image_split(tmp_path, "validation")
    assert split.entries == ["cat/a.jpeg", "cat/deep/c.tif", "dog/b.png"]
    assert split.labels == ["cat", "cat", "dog"]
    assert split.images == [b"cat a", b"cat c", b"dog b"]


def test_unreadable_channels_raise_data_error(tmp_path):
    with pytest.raises(DataError, match=r"train channel .* does not exist"):
        images.read_image_split(tmp_path / "absent", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"train channel .* holds no images"):
        images.read_image_split(tmp_path / "empty", "train")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "part-00000.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=r"part-00000\.zip is not a readable zip"):
        images.read_image_split(tmp_path / "bad", "train")
    (tmp_path / "junk").mkdir()
    write_zip(tmp_path / "junk" / "part-00000.zip", {"__MACOSX/cat/._1.jpg": b"x", "cat/": None})
    with pytest.raises(DataError, match="holds no images"):
        images.read_image_split(tmp_path / "junk", "test")


def test_an_image_outside_a_class_folder_is_an_error(tmp_path):
    (tmp_path / "zipped").mkdir()
    write_zip(tmp_path / "zipped" / "part-00000.zip", {"cat/1.png": PNG, "stray.png": PNG})
    with pytest.raises(DataError, match=r"part-00000\.zip:stray\.png is outside any class folder"):
        images.read_image_split(tmp_path / "zipped", "train")
    (tmp_path / "folders" / "cat").mkdir(parents=True)
    (tmp_path / "folders" / "cat" / "1.png").write_bytes(PNG)
    (tmp_path / "folders" / "stray.jpg").write_bytes(PNG)
    with pytest.raises(DataError, match=r"stray\.jpg is outside any class folder"):
        images.read_image_split(tmp_path / "folders", "train")
    (tmp_path / "slip").mkdir()
    write_zip(tmp_path / "slip" / "part-00000.zip", {"cat/../../etc/1.png": PNG})
    with pytest.raises(DataError, match="outside its folder"):
        images.read_image_split(tmp_path / "slip", "train")


# --- statistics -------------------------------------------------------------------------------------------


def test_channel_statistics_per_channel_in_unit_range():
    batch = np.zeros((4, 3, 2, 2), dtype=np.uint8)
    batch[:, 0] = 255  # red always full: mean 1, std 0 -> 1
    batch[:2, 1] = 255  # green half the images: mean 0.5, std 0.5
    batch[:, 2, 0, :] = 51  # blue 0.2 on half the pixels
    mean, std = image_cnn.channel_statistics(batch)
    assert mean == pytest.approx([1.0, 0.5, 0.1])
    assert std == pytest.approx([1.0, 0.5, 0.1])
    pixels = np.random.default_rng(0).integers(0, 256, (50, 3, 8, 8), dtype=np.uint8)
    mean, std = image_cnn.channel_statistics(pixels)
    expected = pixels.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1) / 255
    assert mean == pytest.approx(expected.mean(axis=1).tolist())
    assert std == pytest.approx(expected.std(axis=1).tolist())
    json.dumps({"mean": mean, "std": std})
    with pytest.raises(ValueError, match="non-empty uint8"):
        image_cnn.channel_statistics(np.zeros((0, 3, 2, 2), dtype=np.uint8))


# --- serving: the request's instances -------------------------------------------------------------------


def test_encode_image_instances_accepts_base64_variants():
    # Bytes chosen so the base64 has '+' or '/' characters, which URL-safe base64 spells '-' and '_'.
    data = encoded(halves(9, 9), "PNG")
    standard = base64.b64encode(data).decode()
    assert "=" in standard or len(standard) % 4 == 0
    variants = [
        standard,
        standard.rstrip("="),
        base64.urlsafe_b64encode(data).decode(),
        base64.urlsafe_b64encode(data).decode().rstrip("="),
        "data:image/png;base64," + standard,
        "\n".join(standard[i : i + 76] for i in range(0, len(standard), 76)),
    ]
    batch = images.encode_image_instances([{"image": v, "id": 7} for v in variants], 8)
    assert batch.shape == (len(variants), 3, 8, 8) and batch.dtype == np.uint8
    expected = images.decode_image(data, 8)
    assert all(np.array_equal(row, expected) for row in batch)
    assert images.encode_image_instances([], 8).shape == (0, 3, 8, 8)


@pytest.mark.parametrize(
    ("instance", "message"),
    [
        ("aGVsbG8=", 'instance 1: expected a JSON object with an "image" key, got a string'),
        ([1, 2], 'instance 1: expected a JSON object with an "image" key, got an array'),
        ({"picture": "x"}, 'instance 1: missing "image"'),
        ({"image": 12}, 'instance 1: "image" must be a base64 string, got 12'),
        ({"image": None}, 'instance 1: "image" must be a base64 string, got null'),
        ({"image": "not base64 at all!"}, 'instance 1: "image" is not valid base64'),
        ({"image": "abcde"}, 'instance 1: "image" is not valid base64'),
        ({"image": ""}, 'instance 1: "image" is empty'),
        (
            {"image": base64.b64encode(b"hello, not an image").decode()},
            'instance 1: "image" is not a decodable image: not an image file Pillow can open (JPEG, PNG',
        ),
        (
            {"image": base64.b64encode(encoded(Image.new("RGB", (64, 64)), "JPEG")[:300]).decode()},
            'instance 1: "image" is not a decodable image: ',
        ),
    ],
)
def test_encode_image_instances_names_the_bad_instance(instance, message):
    good = {"image": base64.b64encode(PNG).decode()}
    with pytest.raises(ValueError) as raised:
        images.encode_image_instances([good, instance], 8)
    assert str(raised.value).startswith(message)
    assert "BytesIO" not in str(raised.value)
    assert not isinstance(raised.value, DataError)


# --- the network -------------------------------------------------------------------------------------------


def random_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def test_cnn_shapes_and_default_widths():
    assert image_cnn.default_widths(64) == [32, 64, 128, 256]
    assert image_cnn.default_widths(32) == [32, 64, 128]
    assert image_cnn.default_widths(16) == [32, 64]
    torch.manual_seed(0)
    for size in (8, 13, 32):
        model = image_cnn.ImageCNN(out_features=5, image_size=size, widths=(8, 16))
        assert model(random_images(3, size)).shape == (3, 5)
    model = image_cnn.ImageCNN(out_features=3, image_size=32).eval()
    with torch.no_grad():
        assert model(random_images(2, 32)).shape == (2, 3)


def test_eval_is_deterministic_and_training_mode_augments():
    torch.manual_seed(0)
    model = image_cnn.ImageCNN(out_features=4, image_size=16, widths=(8, 16), dropout=0.0)
    batch = random_images(8, 16)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(batch), model(batch))
        # Training mode with the same weights and batch statistics differs only by the augmentation.
        model.train()
        torch.manual_seed(1)
        first = model(batch)
        torch.manual_seed(1)
        repeated = model(batch)
        torch.manual_seed(2)
        other = model(batch)
    assert torch.equal(first, repeated)
    assert not torch.allclose(first, other)


def test_augment_flips_and_shifts_without_inventing_pixels():
    torch.manual_seed(0)
    flat = torch.full((4, 3, 16, 16), 0.7)
    assert torch.equal(image_cnn.augment(flat), flat)  # reflection padding keeps a constant image constant
    ramp = torch.arange(16.0).repeat(64, 3, 16, 1)  # value = column index
    shifted = image_cnn.augment(ramp)
    rows = shifted[:, 0, 0, :]
    steps = rows[:, 1:] - rows[:, :-1]
    # Each row is the ramp, mirrored or not, moved by at most 2 (= 16 / 8) with reflected edges.
    assert set(steps.abs().unique().tolist()) <= {0.0, 1.0}
    assert len({tuple(r.tolist()) for r in rows}) > 4
    assert (rows[:, 0] > rows[:, -1]).any() and (rows[:, 0] < rows[:, -1]).any()


def test_architecture_round_trip_gives_identical_outputs():
    torch.manual_seed(0)
    model = image_cnn.ImageCNN(3, image_size=16, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3], widths=(8, 16))
    model.train()
    model(random_images(16, 16))  # move BatchNorm's running statistics off their defaults
    model.eval()
    architecture = json.loads(json.dumps(model.architecture()))
    assert architecture == {
        "name": "image_cnn",
        "out_features": 3,
        "image_size": 16,
        "mean": [0.4, 0.5, 0.6],
        "std": [0.2, 0.25, 0.3],
        "widths": [8, 16],
        "dropout": 0.2,
    }
    rebuilt = image_cnn.ImageCNN.from_architecture(architecture)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    batch = random_images(5, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(rebuilt(batch), model(batch))
    with pytest.raises(ValueError, match="not an image_cnn"):
        image_cnn.ImageCNN.from_architecture({"name": "tabular_mlp"})


def stripes(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes: horizontal stripes, vertical stripes, a checkerboard; random period, phase, noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, count)
    grid = np.arange(size)
    batch = np.empty((count, 3, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        period = rng.integers(2, 5)
        rows = ((grid[:, None] + rng.integers(0, 8)) // period) % 2
        columns = ((grid[None, :] + rng.integers(0, 8)) // period) % 2
        pattern = [rows + 0 * columns, columns + 0 * rows, rows ^ columns][label]
        low, high = sorted(rng.integers(0, 256, 2))
        high = max(high, low + 60)
        image = low + (high - low) * pattern[None] + rng.normal(0, 25, (3, size, size))
        batch[i] = np.clip(image, 0, 255).astype(np.uint8)
    return torch.from_numpy(batch), torch.from_numpy(labels)


def test_cnn_learns_synthetic_image_classes_quickly():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train_images, train_labels = stripes(384, 16, seed=0)
    test_images, test_labels = stripes(150, 16, seed=1)
    mean, std = image_cnn.channel_statistics(train_images.numpy())
    model = image_cnn.ImageCNN(3, image_size=16, mean=mean, std=std, widths=(16, 32), dropout=0.1)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    started = time.perf_counter()
    for _ in range(6):
        model.train()
        order = torch.randperm(len(train_labels))
        for start in range(0, len(order), 32):
            index = order[start : start + 32]
            loss = torch.nn.functional.cross_entropy(model(train_images[index]), train_labels[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_images).argmax(1) == test_labels).float().mean().item()
    assert accuracy > 0.9, accuracy
    assert time.perf_counter() - started < 15
