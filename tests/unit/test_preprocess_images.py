"""Image datasets, a zip of class folders (docs/preprocessing.md, section 9): on bytes through
`preprocess.images`, then through the real PreprocessFunction handler (moto) and the Processing job."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import warnings
import zipfile
from typing import Any

import pytest
from PIL import Image
from split_files import SplitFiles
from test_preprocess_corpus import PROCESSED, RAW, Context, s3_event, sqs_batch, stack, upload  # noqa: F401
from test_processing import files_under, job_root, run_job

from common.errors import DatasetRejected
from preprocess import app, images
from preprocess.core import DatasetSpec, Limits, split_of_bytes

PROVENANCE = {"dataset": "pets", "version": "v", "source": {"bucket": "b", "key": "datasets/pets/pets.zip"}}
SPLITS = ("train", "validation", "test")


def picture(
    seed: int, image_format: str = "JPEG", mode: str = "RGB", size: tuple[int, int] = (12, 9)
) -> bytes:
    """A small image of random pixels: every seed gives other bytes."""
    rng = random.Random(seed)
    channels = len(mode)
    image = Image.frombytes(
        mode, size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * channels))
    )
    out = io.BytesIO()
    image.save(out, format=image_format)
    return out.getvalue()


def make_zip(entries: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)  # one case wants a name twice
        for name, data in entries:
            archive.writestr(name, data)
    return out.getvalue()


def two_classes(cats: int = 40, dogs: int = 40, top: str = "", seed: int = 0) -> list[tuple[str, bytes]]:
    return [(f"{top}cat/{i:03d}.jpg", picture(seed + i)) for i in range(cats)] + [
        (f"{top}dog/{i:03d}.png", picture(seed + 1000 + i, "PNG")) for i in range(dogs)
    ]


class Splits(SplitFiles):
    """The split zips in memory; which ones were discarded because the upload was rejected."""

    def __init__(self) -> None:
        super().__init__(binary=True)

    def entries(self, split: str) -> dict[str, bytes]:
        with zipfile.ZipFile(io.BytesIO(self.files[split])) as archive:
            return {info.filename: archive.read(info) for info in archive.infolist()}


def run(data: bytes, spec: DatasetSpec | None = None, limits: Limits | None = None):
    splits = Splits()
    manifest = images.preprocess_zip(
        io.BytesIO(data),
        spec=spec or DatasetSpec(),
        open_split=splits.open,
        provenance=PROVENANCE,
        limits=limits,
    )
    return manifest, splits


def test_a_zip_of_class_folders_becomes_three_split_zips_and_a_manifest():
    cats = [(f"flowers/cat/{i:03d}.JPG", picture(i)) for i in range(30)]
    cats += [(f"flowers/cat/indoor/{i}.jpeg", picture(100 + i, mode="L")) for i in range(5)]
    dogs = [(f"flowers/dog/{i:03d}.png", picture(200 + i, "PNG")) for i in range(35)]
    junk = [
        ("flowers/", b""),
        ("flowers/cat/", b""),
        ("__MACOSX/flowers/cat/._000.JPG", b"\x00\x05\x16\x07resource fork"),
        ("flowers/.DS_Store", b"\x00\x00\x00\x01Bud1"),
        ("flowers/dog/Thumbs.db", b"thumbnails"),
    ]
    dropped = [
        ("flowers/labels.txt", b"cat\ndog\n"),
        ("flowers/cat/broken.jpg", b"\xff\xd8\xff\xe0 this is not a JPEG"),
        # Whole headers, the scan cut short: Pillow's verify() passes it, decoding does not.
        ("flowers/cat/cut-short.jpg", picture(400, size=(64, 48))[:-300]),
        ("flowers/dog/empty.png", b""),
        ("flowers/stray.png", picture(300, "PNG")),
        ("flowers/dog/copy-of-000.png", dogs[0][1]),
    ]
    manifest, splits = run(make_zip(cats + dogs + junk + dropped))

    assert manifest["format"] == "zip"
    assert (manifest["task"], manifest["recipe"], manifest["target"]) == ("classification", "image", "label")
    assert manifest["labels"] == ["cat", "dog"]
    assert manifest["inferred"] == [
        "recipe: image (a zip of class folders)",
        "task: classification (2 classes)",
    ]
    assert manifest["ignored_files"] == len(junk)
    assert manifest["dropped"] == {
        "not_an_image": 1,
        "unreadable_image": 3,
        "no_class_folder": 1,
        "duplicate": 1,
    }
    assert manifest["dropped_lines"]["duplicate"] == ["flowers/dog/copy-of-000.png"]
    assert manifest["dropped_lines"]["not_an_image"] == ["flowers/labels.txt"]
    counts = manifest["counts"]
    assert counts["rows_read"] == len(cats) + len(dogs) + len(dropped)
    assert counts["rows_used"] == len(cats) + len(dogs) == sum(counts[s] for s in SPLITS)
    assert manifest["source"]["entries"] == len(cats + dogs + junk + dropped)

    # Each image once, in the split its bytes choose, under <class>/<path below the class folder>, unchanged.
    expected = {name.removeprefix("flowers/"): data for name, data in cats + dogs}
    written: dict[str, bytes] = {}
    for split in SPLITS:
        entries = splits.entries(split)
        assert list(entries) == sorted(entries)
        assert all(split_of_bytes(data) == split for data in entries.values())
        assert len(entries) == counts[split]
        with zipfile.ZipFile(io.BytesIO(splits.files[split])) as archive:
            assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
        written.update(entries)
    assert written == expected
    assert "cat/indoor/0.jpeg" in written

    image, label = manifest["columns"]
    assert (image["name"], image["role"], image["type"]) == ("image", "feature", "image")
    stats = image["stats"]
    assert stats["count"] == counts["train"]
    assert set(stats["formats"]) == {"JPEG", "PNG"} and set(stats["modes"]) == {"L", "RGB"}
    assert stats["width"] == {"min": 12, "median": 12, "max": 12}
    assert stats["height"] == {"min": 9, "median": 9, "max": 9}
    assert (label["name"], label["role"], label["type"]) == ("label", "target", "categorical")
    assert sum(label["stats"]["class_counts"].values()) == counts["train"] == label["stats"]["count"]


def test_a_replay_writes_identical_bytes_whatever_order_the_zip_holds():
    entries = two_classes()
    first, a = run(make_zip(entries))
    again, b = run(make_zip(entries))
    shuffled, c = run(make_zip(list(reversed(entries)), compression=zipfile.ZIP_STORED))
    assert a.files == b.files == c.files
    assert first == again
    assert {k: v for k, v in first.items() if k not in ("content_sha256", "source")} == {
        k: v for k, v in shuffled.items() if k not in ("content_sha256", "source")
    }


def test_integer_class_folders_give_integer_labels_and_the_spec_may_say_what_a_zip_is():
    entries = [
        (f"{label}/{i}.png", picture(label * 100 + i, "PNG")) for label in (0, 1, 10) for i in range(20)
    ]
    spec = DatasetSpec(target="label", task="classification", recipe="image")
    manifest, _ = run(make_zip(entries), spec)
    assert manifest["labels"] == [0, 1, 10]
    assert manifest["inferred"] == [
        "recipe: image from conveyor.json",
        "task: classification from conveyor.json",
    ]


def test_a_spec_naming_a_base_model_fine_tunes_it_on_the_images():
    for spec in (DatasetSpec(base_model="tiny-vit"), DatasetSpec(base_model="tiny-vit", recipe="pretrained")):
        manifest, _ = run(make_zip(two_classes()), spec)
        assert manifest["recipe"] == "pretrained_image"
        assert (
            manifest["inferred"][0]
            == "recipe: pretrained_image (base_model 'tiny-vit' fine-tuned on the images)"
        )


def test_duplicates_are_kept_when_the_spec_says_so():
    entries = two_classes()
    entries.append(("dog/again.png", entries[-1][1]))
    manifest, _ = run(make_zip(entries), DatasetSpec(drop_duplicates=False))
    assert manifest["dropped"] == {}
    assert manifest["counts"]["rows_used"] == 81
    assert manifest["duplicates_checked"] == "off (conveyor.json drop_duplicates: false)"


def encrypted(data: bytes) -> bytes:
    """The zip with every entry marked encrypted in its directory (Python writes no encrypted zips)."""
    patched = bytearray(data)
    at = patched.find(b"PK\x01\x02")
    while at >= 0:
        patched[at + 8] |= 0x1
        at = patched.find(b"PK\x01\x02", at + 4)
    return bytes(patched)


UNUSABLE = [
    ("not a zip", b"a,b,label\n1,2,x\n" * 100, "not a valid zip"),
    ("empty zip", make_zip([]), "0 class folder"),
    ("one class only", make_zip(two_classes(dogs=0)), "1 class folder"),
    ("one class in a top folder", make_zip(two_classes(dogs=0, top="pets/")), "1 class folder"),
    ("no images", make_zip([("a/labels.txt", b"x"), ("b/notes.csv", b"y")]), "0 class folder"),
    ("a '..' entry", make_zip([*two_classes(), ("../../evil.jpg", picture(1))]), "zip slip"),
    ("an absolute entry", make_zip([*two_classes(), ("/etc/cron.d/x.jpg", picture(1))]), "zip slip"),
    ("a backslash '..' entry", make_zip([*two_classes(), ("cat\\..\\..\\x.jpg", picture(1))]), "zip slip"),
    ("a drive letter", make_zip([*two_classes(), ("C:/x.jpg", picture(1))]), "zip slip"),
    ("encrypted", encrypted(make_zip(two_classes())), "encrypted"),
    ("too few images", make_zip(two_classes(cats=20, dogs=20)), "only 40 usable images"),
    ("a rare class", make_zip([*two_classes(), ("bird/0.jpg", picture(9000))]), "fewer than 5 images"),
    ("the same name twice", make_zip([*two_classes(), ("cat/000.jpg", picture(9000))]), "more than once"),
]


@pytest.mark.parametrize(("case", "data", "reason"), UNUSABLE, ids=[case for case, _, _ in UNUSABLE])
def test_unusable_zips_are_rejected_with_a_reason(case, data, reason):
    with pytest.raises(DatasetRejected, match=reason):
        run(data)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (DatasetSpec(target="species"), "a zip's target is 'label'"),
        (DatasetSpec(task="regression"), "classification dataset"),
        (DatasetSpec(recipe="tabular"), "recipe 'image'"),
        (DatasetSpec(recipe="pretrained"), "recipe 'image'"),  # without a base model to fine-tune
        (DatasetSpec(base_model="tiny-vit", max_length=64), "max_length and columns are about text"),
        (DatasetSpec(base_model="tiny-vit", columns={"label": "text"}), "max_length and columns"),
    ],
)
def test_a_spec_a_zip_cannot_follow_is_rejected(spec, reason):
    with pytest.raises(DatasetRejected, match=reason):
        run(make_zip(two_classes()), spec)


def test_zip_bombs_are_rejected_before_anything_is_read(monkeypatch):
    data = make_zip(two_classes())
    total = sum(len(image) for _, image in two_classes())
    with pytest.raises(DatasetRejected, match="once decompressed") as rejected:
        run(data, limits=Limits(max_bytes=total - 1))
    assert rejected.value.details["limit_bytes"] == total - 1
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(DatasetRejected, match="images of at most 100 bytes"):
        run(data)
    monkeypatch.setattr(images, "MAX_ENTRIES", 79)
    with pytest.raises(DatasetRejected, match="80 entries; conveyor takes at most 79"):
        run(data)


def test_the_entry_limit_reads_a_zip64_directory(monkeypatch):
    """Past 65,535 entries the count is in the zip64 record: the classic one says 0xFFFF."""
    many = make_zip([(f"d/{i}/", b"") for i in range(0x10000)], compression=zipfile.ZIP_STORED)
    monkeypatch.setattr(images, "MAX_ENTRIES", 0xFFFF)
    with pytest.raises(DatasetRejected, match="65,536 entries"):
        run(many)


def test_a_rejected_zip_aborts_every_split_writer():
    splits = Splits()
    with pytest.raises(DatasetRejected, match="only"):
        images.preprocess_zip(
            io.BytesIO(make_zip(two_classes(cats=10, dogs=10))),
            spec=DatasetSpec(),
            open_split=splits.open,
            provenance=PROVENANCE,
        )
    assert sorted(splits.aborted) == sorted(SPLITS)
    assert splits.files == {}


def test_the_handler_module_does_not_import_pillow():
    """Pillow is imported for zip uploads only: the cold start every CSV upload pays stays without it."""
    code = (
        f"import sys; sys.path.insert(0, {str(app.__file__).rsplit('/preprocess/', 1)[0]!r}); "
        "import preprocess.app, preprocess.processing; print('PIL' in sys.modules)"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "False"


# ------------------------------------------------------------------------------- PreprocessFunction


def test_a_zip_upload_becomes_split_zips_and_a_manifest_and_starts_the_pipeline(stack):  # noqa: F811
    key = "datasets/pets/pets.zip"
    data = make_zip(two_classes(top="pets/"))
    head = upload(stack, key, data)
    response = app.handler(sqs_batch(s3_event(RAW, key, head)), Context())

    assert response == {"batchItemFailures": []}
    (execution,) = stack.executions()
    described = stack.sfn.describe_execution(executionArn=execution["executionArn"])
    execution_input: dict[str, Any] = json.loads(described["input"])
    assert (execution_input["task"], execution_input["target"]) == ("classification", "label")
    slug, version = execution_input["dataset"], execution_input["version"]
    prefix = f"{slug}/{version}/"
    assert sorted(stack.processed_keys()) == sorted(
        prefix + name
        for name in (
            "manifest.json",
            "train/part-00000.zip",
            "validation/part-00000.zip",
            "test/part-00000.zip",
        )
    )
    assert execution_input["data"]["train"] == f"s3://{PROCESSED}/{prefix}train/"
    manifest = json.loads(stack.s3.get_object(Bucket=PROCESSED, Key=prefix + "manifest.json")["Body"].read())
    assert manifest["recipe"] == "image" and manifest["labels"] == ["cat", "dog"]
    assert manifest["source"]["key"] == key and manifest["source"]["version_id"] == head["VersionId"]
    entries = 0
    for split in SPLITS:
        body = stack.s3.get_object(Bucket=PROCESSED, Key=f"{prefix}{split}/part-00000.zip")["Body"].read()
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            assert archive.testzip() is None
            entries += len(archive.infolist())
    assert entries == manifest["counts"]["rows_used"] == 80

    # A replayed event reuses the manifest and starts nothing new.
    assert app.handler(sqs_batch(s3_event(RAW, key, head)), Context()) == {"batchItemFailures": []}
    assert len(stack.executions()) == 1


def test_a_zip_that_is_not_one_is_quarantined(stack):  # noqa: F811
    key = "datasets/pets/pets.zip"
    head = upload(stack, key, b"a,b,label\n1,2,x\n" * 100)
    assert app.handler(sqs_batch(s3_event(RAW, key, head)), Context()) == {"batchItemFailures": []}
    (report,) = stack.processed_keys()
    assert report.startswith("quarantine/pets/")
    assert (
        "not a valid zip"
        in json.loads(stack.s3.get_object(Bucket=PROCESSED, Key=report)["Body"].read())["reason"]
    )
    assert stack.executions() == []


def test_a_zip_too_big_for_the_functions_tmp_goes_to_a_processing_job(monkeypatch):
    settings = app.Settings(lambda_preprocess_max_bytes=10_000)
    monkeypatch.setattr(app.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    assert app.too_big_for_lambda(901, settings, "zip")
    assert not app.too_big_for_lambda(900, settings, "zip")
    assert not app.too_big_for_lambda(5000, settings, "csv")
    assert app.processing_volume_gb("datasets/pets/big.zip", 5 * 2**30) > 5 * 100


# ---------------------------------------------------------------------------------- Processing job


def test_the_processing_job_preprocesses_a_zip_as_the_function_does(tmp_path):
    data = make_zip(two_classes())
    opt_ml = job_root(tmp_path, "datasets/pets/big.zip", data)
    returncode, message, output = run_job(opt_ml)
    assert returncode == 0, output
    processed = opt_ml / "processing/output/processed"
    assert files_under(processed) == {
        "manifest.json",
        "train/part-00000.zip",
        "validation/part-00000.zip",
        "test/part-00000.zip",
    }
    manifest, splits = run(data)
    for split in SPLITS:
        assert (processed / split / "part-00000.zip").read_bytes() == splits.files[split]
    written = json.loads((processed / "manifest.json").read_text())
    assert written["counts"] == manifest["counts"] and written["labels"] == manifest["labels"]
    assert message == {
        "outcome": "processed",
        "task": "classification",
        "target": "label",
        "rows_used": 80,
        "manifest": "manifest.json",
    }
