"""Check, split and profile an image dataset uploaded as a zip of class folders, in one pass.

As `preprocess.core` does for CSV and JSON Lines, and with its spec, limits, split hash and class checks:
no AWS here. The caller hands over the zip as a seekable binary file (a zip's directory is at its end) and a
way to open the split files, and gets back the manifest (docs/contracts.md, section 2). The rules are
written down in docs/preprocessing.md, section 9; this module is their implementation.

Entries are read one at a time, in memory, through the zip's directory: nothing is extracted to disk, so no
entry name can choose where a file lands. Each split is a zip of the images' original bytes under
`<class>/<path below the class folder>`, stored (images are compressed already), sorted by name and with
fixed timestamps, so a replay writes identical bytes.

Pillow is imported when a zip is preprocessed, not with this module: PreprocessFunction's cold start, which
every CSV upload pays, stays without it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import lzma
import re
import struct
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import IO, Any

from common.errors import DatasetRejected
from preprocess.core import (
    MAX_CLASSES,
    MIN_ROWS,
    SAMPLE_LIMIT,
    SPLITS,
    DatasetSpec,
    Limits,
    _sample,
    check_classes,
    split_of_bytes,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# What Pillow may read those files as (its JPEG opener also opens MPO, as cameras write many JPEGs); its
# other plugins are never used.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
# Files operating systems and zip tools add, which are no part of the dataset (besides dot files).
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini"})
MACOS_FOLDER = "__MACOSX"
FEATURE = "image"
TARGET = "label"
SPLIT_FILE = "part-00000.zip"
# Zip bomb guards besides Limits.max_bytes (the images' total uncompressed size). The first two are read
# from the zip's end record, before zipfile reads the directory, which it holds in memory whole.
MAX_ENTRIES = 1_000_000
MAX_DIRECTORY_BYTES = 256 << 20
# One image is held in memory at a time, whole: at most this many bytes once decompressed.
MAX_IMAGE_BYTES = 64 << 20
# Compression methods zipfile reads with the standard library alone.
READABLE_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})
# Every entry of a split zip carries the same time (zip's earliest), so a replay writes identical bytes.
ENTRY_TIME = (1980, 1, 1, 0, 0, 0)

_DRIVE = re.compile(r"^[A-Za-z]:")
_END = struct.Struct("<4s4H2LH")  # end of central directory record
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end of central directory record (without extensible data)
_UNREADABLE_ENTRY = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError)

# (format, mode, width, height) of an image file, or None when Pillow cannot identify, verify and decode it.
Identify = Callable[[bytes], tuple[str, str, int, int] | None]


@dataclass(frozen=True)
class _Image:
    """An entry that should be an image of a class: its name in the upload, in the splits, and its class."""

    name: str
    path: str
    label: str
    info: zipfile.ZipInfo


@dataclass
class _Tally:
    """What the pass kept and dropped, and the train split's image statistics."""

    rows_read: int = 0
    ignored_files: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    dropped_lines: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    class_counts: Counter[str] = field(default_factory=Counter)
    train_class_counts: Counter[str] = field(default_factory=Counter)
    formats: Counter[str] = field(default_factory=Counter)
    modes: Counter[str] = field(default_factory=Counter)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    seen: set[bytes] = field(default_factory=set)
    dedup_complete: bool = True

    def drop(self, reason: str, name: str) -> None:
        self.dropped[reason] += 1
        names = self.dropped_lines.setdefault(reason, [])
        if len(names) < SAMPLE_LIMIT:
            names.append(name)

    def is_duplicate(self, data: bytes, cap: int) -> bool:
        """Whether these bytes were kept before (remembered for the first `cap` distinct images)."""
        fingerprint = hashlib.blake2b(data, digest_size=16).digest()
        if fingerprint in self.seen:
            return True
        if len(self.seen) < cap:
            self.seen.add(fingerprint)
        else:
            self.dedup_complete = False
        return False

    def keep(self, split: str, label: str, described: tuple[str, str, int, int]) -> None:
        self.counts[split] += 1
        self.class_counts[label] += 1
        if split == "train":
            image_format, mode, width, height = described
            self.train_class_counts[label] += 1
            self.formats[image_format] += 1
            self.modes[mode] += 1
            self.widths.append(width)
            self.heights.append(height)


class _Stream:
    """A split file as a plain stream, write and flush only: zipfile then never seeks, and writes each
    entry's sizes after its data, so a split zip has the same bytes whether it goes to S3 or to a disk."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle

    def write(self, data: bytes) -> int:
        return self._handle.write(data)

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:
        """Nothing: whoever opened the split file closes it (zipfile never closes a file it was given)."""


def preprocess_zip(
    source: IO[bytes],
    *,
    spec: DatasetSpec,
    open_split: Callable[[str], AbstractContextManager[IO[bytes]]],
    provenance: dict[str, Any],
    limits: Limits | None = None,
) -> dict[str, Any]:
    """Read a zip of class folders once: drop what is not a usable image, split, profile, build the manifest.

    Parameters
    ----------
    source
        The uploaded zip, seekable (a local file).
    spec
        The user's dataset spec; empty when there is none. Its target must be absent or "label", its task
        absent or "classification", its recipe absent or "image".
    open_split
        `open_split("train")` returns a context manager yielding a binary file for that split's zip. If this
        function raises, the context managers exit with the exception, so writers can discard the output.
    provenance
        `dataset`, `version`, `source` (bucket, key, version_id, etag, size): copied into the manifest.
    limits
        `max_bytes` bounds the images' total uncompressed size, `max_dedup_rows` the images remembered for
        duplicate detection; defaults to `Limits()`.

    Returns
    -------
    dict
        The manifest (docs/contracts.md, section 2).

    Raises
    ------
    DatasetRejected
        The upload cannot be used for training; the reason says why.
    """
    limits = limits or Limits()
    inferred = _check_spec(spec)
    digest = hashlib.sha256()
    source.seek(0)
    while chunk := source.read(1 << 20):
        digest.update(chunk)
    size = source.tell()
    _check_directory(source, size)
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DatasetRejected(
            "the file is not a valid zip: create it again (zip the folder of class folders) and upload it",
            detail=str(exc),
        ) from None
    with archive:
        entries = archive.infolist()
        tally = _Tally()
        images = _survey(entries, tally, limits)
        identify = _identifier()
        with ExitStack() as stack:
            splits = {
                split: stack.enter_context(
                    zipfile.ZipFile(_Stream(stack.enter_context(open_split(split))), "w")
                )
                for split in SPLITS
            }
            for image in images:
                data = _read(archive, image)
                described = identify(data)
                if described is None:
                    tally.drop("unreadable_image", image.name)
                    continue
                if spec.drop_duplicates and tally.is_duplicate(data, limits.max_dedup_rows):
                    tally.drop("duplicate", image.name)
                    continue
                split = split_of_bytes(data)
                splits[split].writestr(_split_entry(image.path), data)
                tally.keep(split, image.label, described)
            manifest = _manifest(tally, spec, inferred, provenance, limits)
    manifest["content_sha256"] = digest.hexdigest()
    manifest["source"]["bytes_read"] = size
    manifest["source"]["entries"] = len(entries)
    return manifest


def _check_spec(spec: DatasetSpec) -> list[str]:
    """What conveyor.json may say about a zip; the `inferred` entries it starts with."""
    if spec.recipe not in (None, "image") and not (spec.recipe == "pretrained" and spec.base_model):
        raise DatasetRejected(
            f"conveyor.json says recipe {spec.recipe!r}, which trains on CSV or JSON Lines; a zip of class "
            "folders trains with recipe 'image': set recipe to 'image', or remove it"
        )
    if spec.base_model is not None and (spec.max_length is not None or spec.columns):
        raise DatasetRejected(
            "conveyor.json: max_length and columns are about text and tables; a zip of class folders "
            "fine-tunes its base model on the images as the base's preprocessor_config.json prepares them: "
            "remove them"
        )
    if spec.target not in (None, TARGET):
        raise DatasetRejected(
            f"conveyor.json names target {spec.target!r}, but a zip's target is {TARGET!r} (its class "
            f"folders): remove target from conveyor.json, or set it to {TARGET!r}"
        )
    if spec.task not in (None, "classification"):
        raise DatasetRejected(
            f"conveyor.json says task {spec.task!r}, but a zip of class folders is a classification "
            "dataset: remove task from conveyor.json, or set it to 'classification'"
        )
    if spec.base_model is not None:
        return [f"recipe: pretrained_image (base_model {spec.base_model!r} fine-tuned on the images)"]
    if spec.recipe == "image":
        return ["recipe: image from conveyor.json"]
    return ["recipe: image (a zip of class folders)"]


def _check_directory(source: IO[bytes], size: int) -> None:
    """Reject a zip with too many entries or too large a directory, from its end record, found as zipfile
    finds it: before zipfile reads the directory into memory."""
    tail_size = min(size, _END.size + 0xFFFF)  # the record and the longest zip comment
    source.seek(size - tail_size)
    tail = source.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or tail_size - at < _END.size:
        raise DatasetRejected(
            "the file is not a valid zip (it has no end of central directory record): create it again "
            "(zip the folder of class folders) and upload it"
        )
    fields = _END.unpack_from(tail, at)
    entries, directory_bytes = fields[4], fields[5]
    end = size - tail_size + at
    if end >= _END64_LOCATOR.size + _END64.size:
        source.seek(end - _END64_LOCATOR.size - _END64.size)
        record = source.read(_END64.size + _END64_LOCATOR.size)
        if record[_END64.size : _END64.size + 4] == b"PK\x06\x07" and record[:4] == b"PK\x06\x06":
            fields64 = _END64.unpack_from(record)
            entries, directory_bytes = fields64[7], fields64[8]
    source.seek(0)
    if entries > MAX_ENTRIES:
        raise DatasetRejected(
            f"the zip has {entries:,} entries; conveyor takes at most {MAX_ENTRIES:,}",
            limit_entries=MAX_ENTRIES,
        )
    if directory_bytes > MAX_DIRECTORY_BYTES:
        raise DatasetRejected(
            f"the zip's directory is {directory_bytes:,} bytes; conveyor takes at most "
            f"{MAX_DIRECTORY_BYTES:,} (shorter entry names, or fewer entries)",
            limit_bytes=MAX_DIRECTORY_BYTES,
        )


def _parts(name: str) -> list[str]:
    """An entry name's folders and file name. A name that could point outside the folder it is extracted
    to (a zip slip) is rejected: conveyor extracts nothing, but such a zip is not a folder of classes."""
    path = name.replace("\\", "/")  # some Windows tools write backslashes
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if path.startswith("/") or _DRIVE.match(path) or ".." in parts or not parts:
        raise DatasetRejected(
            "an entry of the zip has an absolute name or a '..' folder, which could write outside the "
            "folder it is unzipped to (a zip slip): zip the folder of class folders itself, and upload that",
            entry=_sample(name),
        )
    return parts


def _is_junk(parts: list[str]) -> bool:
    """macOS metadata, dot files and folders, Windows thumbnail and folder settings."""
    return (
        MACOS_FOLDER in parts
        or any(part.startswith(".") for part in parts)
        or parts[-1].lower() in JUNK_NAMES
    )


def _is_image(parts: list[str]) -> bool:
    return parts[-1].lower().endswith(IMAGE_SUFFIXES)


def _survey(entries: list[zipfile.ZipInfo], tally: _Tally, limits: Limits) -> list[_Image]:
    """From the directory alone: reject what makes the whole zip unusable, count the ignored entries, drop
    the files that are no image of a class, and return the images to read, sorted by their split name."""
    files: list[tuple[zipfile.ZipInfo, list[str]]] = []
    for info in entries:
        parts = _parts(info.filename)
        if info.flag_bits & 0x1:
            raise DatasetRejected(
                "the zip has encrypted entries: zip the images again without a password",
                entry=_sample(info.filename),
            )
        if info.is_dir() or _is_junk(parts):
            tally.ignored_files += 1
        else:
            files.append((info, parts))
    # A zip of the dataset's folder holds every file under that folder: its name is not a class. (Unless no
    # image lies in a folder below it: then it is the zip's only class, and the reason says so.)
    if (
        len({parts[0] for _, parts in files}) == 1
        and all(len(parts) > 1 for _, parts in files)
        and any(len(parts) > 2 and _is_image(parts) for _, parts in files)
    ):
        files = [(info, parts[1:]) for info, parts in files]
    files.sort(key=lambda file: "/".join(file[1]))
    images: list[_Image] = []
    for info, parts in files:
        tally.rows_read += 1
        if not _is_image(parts):
            tally.drop("not_an_image", info.filename)
        elif len(parts) == 1:
            tally.drop("no_class_folder", info.filename)
        else:
            images.append(_Image(info.filename, "/".join(parts), parts[0], info))
    _check_images(images, limits)
    return images


def _check_images(images: list[_Image], limits: Limits) -> None:
    paths = [image.path for image in images]
    repeated = sorted({a for a, b in itertools.pairwise(paths) if a == b})
    if repeated:
        raise DatasetRejected(
            f"{len(repeated)} name(s) occur more than once in the zip: give every image a name of its own",
            entries=[_sample(path) for path in repeated[:SAMPLE_LIMIT]],
        )
    _check_class_folders({image.label for image in images}, len(images))
    unreadable = next((image for image in images if image.info.compress_type not in READABLE_METHODS), None)
    if unreadable is not None:
        raise DatasetRejected(
            f"the zip uses compression method {unreadable.info.compress_type}, which conveyor cannot read: "
            "zip the images again with the usual (deflate) compression, or none",
            entry=_sample(unreadable.name),
        )
    largest = max(images, key=lambda image: image.info.file_size)
    if largest.info.file_size > MAX_IMAGE_BYTES:
        raise DatasetRejected(
            f"an image is {largest.info.file_size:,} bytes; conveyor takes images of at most "
            f"{MAX_IMAGE_BYTES:,} bytes: make it smaller, or leave it out",
            entry=_sample(largest.name),
            limit_bytes=MAX_IMAGE_BYTES,
        )
    total = sum(image.info.file_size for image in images)
    if limits.max_bytes is not None and total > limits.max_bytes:
        raise DatasetRejected(
            f"the zip's images are {total:,} bytes once decompressed; conveyor takes at most "
            f"{limits.max_bytes:,} bytes here (a decompression bomb, or too big for this preprocessing step)",
            limit_bytes=limits.max_bytes,
        )


def _check_class_folders(labels: Iterable[str], images: int) -> None:
    classes = sorted(labels)
    if len(classes) < 2:
        raise DatasetRejected(
            f"{len(classes)} class folder(s) hold usable images; conveyor needs at least two: put each "
            "class's images in a folder named after the class (<class>/<image>) and zip those folders",
            class_folders=classes,
            images=images,
        )
    if len(classes) > MAX_CLASSES:
        raise DatasetRejected(
            f"the zip has {len(classes)} class folders; conveyor trains on at most {MAX_CLASSES} classes",
            class_folders=classes[:20],
        )


def _read(archive: zipfile.ZipFile, image: _Image) -> bytes:
    try:
        return archive.read(image.info)
    except _UNREADABLE_ENTRY as exc:
        # The error names the entry: it goes to the report, not into the reason, which is logged.
        raise DatasetRejected(
            "the zip is damaged: an entry cannot be decompressed or fails its checksum; create the zip "
            "again and upload it",
            entry=_sample(image.name),
            detail=str(exc),
        ) from None


def _identifier() -> Identify:
    """Pillow's identify-and-verify, imported now (see the module's docstring)."""
    # The plugins of IMAGE_FORMATS, registered by their import; Image.open takes no format not registered.
    from PIL import (  # noqa: F401
        BmpImagePlugin,
        GifImagePlugin,
        Image,
        JpegImagePlugin,
        MpoImagePlugin,
        PngImagePlugin,
        TiffImagePlugin,
        WebPImagePlugin,
    )

    # The limit below decides, not Pillow's warning (a process-wide filter: catch_warnings is not
    # thread-safe, and local mode runs functions in threads).
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

    def identify(data: bytes) -> tuple[str, str, int, int] | None:
        if not data:
            return None
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                described = (str(image.format), image.mode, image.width, image.height)
                image.verify()
            # Training decodes nothing above Pillow's decompression-bomb limit (training/images.py): such an
            # image is as unreadable here, and is never decoded.
            if Image.MAX_IMAGE_PIXELS and described[2] * described[3] > Image.MAX_IMAGE_PIXELS:
                return None
            # verify() reads the structure, not the pixels: a JPEG cut short passes it and would fail the
            # training job. Decoding finds it; a JPEG decodes at an eighth of its size (draft), which costs
            # a fraction of a full decode.
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                image.draft(None, (1, 1))
                image.load()
        except (
            Exception
        ):  # Pillow's plugins raise many kinds of error on a broken file; each means unreadable
            return None
        return described

    return identify


def _split_entry(path: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(path, date_time=ENTRY_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3  # Unix, wherever this runs
    info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
    return info


def _range(values: list[int]) -> dict[str, int]:
    ordered = sorted(values)
    return {"min": ordered[0], "median": ordered[(len(ordered) - 1) // 2], "max": ordered[-1]}


def _manifest(
    tally: _Tally, spec: DatasetSpec, inferred: list[str], provenance: dict[str, Any], limits: Limits
) -> dict[str, Any]:
    used = sum(tally.counts.values())
    _check_class_folders(tally.class_counts, used)
    if used < MIN_ROWS:
        raise DatasetRejected(
            f"only {used} usable images (need at least {MIN_ROWS})",
            rows_read=tally.rows_read,
            dropped=dict(tally.dropped),
            entries=tally.dropped_lines,
        )
    empty = [split for split, n in tally.counts.items() if n == 0]
    if empty:
        raise DatasetRejected(f"the {', '.join(empty)} split is empty: add more images", counts=tally.counts)
    labels = check_classes(TARGET, tally.train_class_counts, tally.class_counts, unit="images")
    if spec.task:
        inferred.append("task: classification from conveyor.json")
    else:
        inferred.append(f"task: classification ({len(labels)} classes)")
    image_stats = {
        "count": tally.counts["train"],
        "formats": dict(sorted(tally.formats.items())),
        "modes": dict(sorted(tally.modes.items())),
        "width": _range(tally.widths),
        "height": _range(tally.heights),
    }
    label_stats = {
        "count": tally.counts["train"],
        "missing": 0,
        "class_counts": dict(sorted(tally.train_class_counts.items())),
    }
    warnings = []
    if not tally.dedup_complete:
        warnings.append(f"duplicate images were detected among the first {limits.max_dedup_rows:,} only")
    if not spec.drop_duplicates:
        duplicates_checked = "off (conveyor.json drop_duplicates: false)"
    elif tally.dedup_complete:
        duplicates_checked = "all images"
    else:
        duplicates_checked = f"the first {limits.max_dedup_rows:,} distinct images"
    return {
        "schema_version": 1,
        "dataset": provenance["dataset"],
        "version": provenance["version"],
        "source": dict(provenance["source"]),
        "format": "zip",
        "task": "classification",
        "recipe": "pretrained_image" if spec.base_model is not None else "image",
        "target": TARGET,
        "labels": labels,
        "columns": [
            {"name": FEATURE, "role": "feature", "type": "image", "stats": image_stats},
            {"name": TARGET, "role": "target", "type": "categorical", "stats": label_stats},
        ],
        "counts": {"rows_read": tally.rows_read, "rows_used": used, **tally.counts},
        "dropped": dict(tally.dropped),
        "dropped_lines": tally.dropped_lines,
        "ignored_files": tally.ignored_files,
        "duplicates_checked": duplicates_checked,
        "inferred": inferred,
        "warnings": warnings,
    }
