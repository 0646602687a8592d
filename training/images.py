"""Image datasets: read a split of class folders, decode images to square uint8 arrays, and decode request
instances the same way (docs/contracts.md, sections 3 and 4).

The networks that train on them (`image_cnn.ImageCNN`, `hf_image.ImageClassifier`) normalise and augment the
uint8 squares themselves, so serving runs exactly the preprocessing of training. Standard library, numpy and
Pillow only: this file also runs in the AWS PyTorch serving image, next to ``inference.py``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import logging
import math
import os
import re
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data import DataError, json_kind

log = logging.getLogger("train")

# The contract's image files (any case); anything else in a class folder is skipped.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Pillow may open only these formats, those of the suffixes above (JPEG's opener also returns cameras' MPO
# files). Requests are untrusted, and some other plugins are large attack surfaces (EPS runs Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
# Names the contract ignores wherever they appear, besides dot files and __MACOSX/.
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})
DEFAULT_IMAGE_SIZE = 64
# A JPEG is decoded at a reduced DCT scale while it stays at least this many times the target size, so the
# filter still has real pixels to average; Pillow's thumbnail() uses the same margin.
DRAFT_GAP = 2
# resize() first box-reduces by an integer factor while the image stays this many times the target size;
# Pillow's documentation: from 3.0 on the result is practically that of a full resampling.
REDUCING_GAP = 3.0
PROGRESS_EVERY = 5_000
# Below this many images a pool costs more than it saves.
PARALLEL_MIN_IMAGES = 256
_BASE64_DATA_URI = re.compile(r"^data:[^,;]*(;[^,;]*)*;base64,", re.IGNORECASE)
_GREY_MODES = frozenset({"1", "L"})
# decode_image refuses images above the limit with a message naming them (Pillow itself only warns up to twice
# the limit). A filter set once: warnings.catch_warnings() is not thread-safe, and decode_images uses threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class UndecodableImage(DataError):
    """An image file Pillow cannot decode; `reason` says why without naming the image."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"cannot decode {name}: {reason}")
        self.reason = reason


@dataclass
class ImageSplit:
    """One split's images, read from every ``*.zip`` of its channel (or from its class folders).

    Attributes
    ----------
    name
        The split's name, for messages.
    images
        Each image file's bytes, unchanged.
    labels
        Each image's class: the first folder of its entry.
    entries
        Each image's name, for messages: ``cat/1.jpg`` in a class-folder channel, ``part-00000.zip:cat/1.jpg``
        in a zip channel.
    skipped
        Files that are not images by their suffix (ignored junk such as ``.DS_Store`` is not counted).
    """

    name: str
    images: list[bytes] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)
    skipped: int = 0

    @property
    def rows(self) -> int:
        """How many images the split holds."""
        return len(self.images)


def read_image_split(channel: str | Path, name: str) -> ImageSplit:
    """Read the images and their classes from a split channel.

    Parameters
    ----------
    channel
        The channel directory. Its ``*.zip`` files (any depth, in name order) hold entries
        ``<class>/<image>``; a channel without zips is read as a tree of class folders instead (local use).
    name
        The split's name, for messages.

    Returns
    -------
    ImageSplit
        The image files' bytes with their classes, in a deterministic order (zips and folders by name,
        entries in zip order). Directory entries, ``__MACOSX/``, dot files, ``Thumbs.db`` and ``desktop.ini``
        are ignored; other files without an image suffix are skipped and counted.

    Raises
    ------
    DataError
        When the channel is missing or holds no images, a zip is not a valid zip (or an entry is encrypted,
        corrupt or escapes its folder), or an image lies outside any class folder.
    """
    directory = Path(channel)
    if not directory.is_dir():
        raise DataError(f"{name} channel {directory} does not exist")
    split = ImageSplit(name)
    archives = sorted(
        p
        for p in directory.rglob("*")
        if p.suffix.lower() == ".zip"
        and p.is_file()
        and not _ignored_entry(p.relative_to(directory).as_posix())
    )
    if archives:
        for archive in archives:
            _read_zip(archive, directory, split)
    else:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            entry = path.relative_to(directory).as_posix()
            if not _ignored_entry(entry):
                _add(split, entry, entry, path.read_bytes)
    if not split.rows:
        what = "zip files" if archives else "class folders"
        raise DataError(
            f"{name} channel {directory} holds no images (read as {what}; image suffixes: "
            f"{', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    if split.skipped:
        log.warning("%s split: skipped %d files that are not images", name, split.skipped)
    return split


def _read_zip(archive: Path, directory: Path, split: ImageSplit) -> None:
    where = archive.relative_to(directory).as_posix()
    try:
        with zipfile.ZipFile(archive) as zipped:
            for info in zipped.infolist():
                entry = info.filename
                if entry.startswith("/") or ".." in entry.split("/"):
                    raise DataError(f"{split.name} split: {where} has an entry outside its folder: {entry!r}")
                if info.is_dir() or _ignored_entry(entry):
                    continue
                if info.flag_bits & 0x1:
                    raise DataError(f"{split.name} split: {where}:{entry} is encrypted")
                _add(split, entry, f"{where}:{entry}", lambda info=info: zipped.read(info))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError) as error:
        # BadZipFile covers a bad CRC too, zlib.error corrupt deflated data, NotImplementedError an
        # unsupported compression method.
        raise DataError(f"{split.name} split: {where} is not a readable zip: {error}") from error


def _add(split: ImageSplit, entry: str, label_of: str, read: Any) -> None:
    # `entry` is the path below the channel or inside the zip; the class is its first folder.
    if PurePosixPath(entry).suffix.lower() not in IMAGE_SUFFIXES:
        split.skipped += 1
        return
    folders = entry.split("/")
    if len(folders) < 2 or not folders[0].strip():
        raise DataError(
            f"{split.name} split: image {label_of} is outside any class folder (expected <class>/<image>)"
        )
    split.images.append(read())
    split.labels.append(folders[0])
    split.entries.append(label_of)


def _ignored(part: str) -> bool:
    return part.startswith(".") or part.lower() in IGNORED_NAMES


def _ignored_entry(entry: str) -> bool:
    parts = [p for p in entry.split("/") if p]
    return not parts or parts[0] == "__MACOSX" or any(_ignored(p) for p in parts)


def decode_image(data: bytes, size: int, name: str = "", crop: float = 1.0) -> np.ndarray:
    """Decode an image file to a square RGB array, as training and serving both see it.

    EXIF orientation is applied; greyscale, palette, CMYK and 16-bit images become RGB, and transparency is
    composited on white. The central square of the shorter side (times `crop`) is resized to `size`, in one
    resampling: with `crop` 0.875 that is resizing the shorter side to ``size / 0.875`` and cropping the
    centre ``size`` square, as torchvision's and timm's evaluation transforms do. A large JPEG is decoded at a reduced scale first, which is much faster and keeps at least
    twice the target resolution.

    Parameters
    ----------
    data
        The image file's bytes (JPEG, PNG, BMP, GIF, WebP or TIFF; the first frame of an animation).
    size
        Side of the square output, in pixels.
    name
        What to call the image in an error message (an entry name, a request's instance).
    crop
        The share of the shorter side the centre square keeps, in (0, 1].

    Returns
    -------
    numpy.ndarray
        uint8, shape ``(3, size, size)``.

    Raises
    ------
    UndecodableImage
        A `DataError` naming the image when Pillow cannot decode it, or when it has more pixels than
        Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    label = name or "image"
    try:
        with Image.open(io.BytesIO(data), formats=_open_formats()) as image:
            pixels = image.width * image.height
            if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
                raise UndecodableImage(
                    label,
                    f"{image.width}x{image.height} pixels is above the decompression-bomb limit of "
                    f"{Image.MAX_IMAGE_PIXELS} pixels",
                )
            drafted = math.ceil(size * DRAFT_GAP / crop)
            image.draft(None, (drafted, drafted))
            return _square_rgb(ImageOps.exif_transpose(image), size, crop)
    except UndecodableImage:
        raise
    except UnidentifiedImageError as error:
        # Pillow's message shows the repr of an in-memory file object.
        formats = ", ".join(_open_formats())
        raise UndecodableImage(label, f"not an image file Pillow can open ({formats})") from error
    except Image.DecompressionBombError as error:
        raise UndecodableImage(label, str(error)) from error
    except MemoryError:
        raise
    except Exception as error:
        # Pillow raises many types for broken files (OSError, SyntaxError, ValueError, struct.error, ...).
        raise UndecodableImage(label, str(error) or type(error).__name__) from error


@functools.cache
def _open_formats() -> tuple[str, ...]:
    # Pillow fails every open with a KeyError when `formats` names a plugin this build lacks (WebP can be
    # compiled out), so only the available ones are passed.
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def _square_rgb(image: Image.Image, size: int, crop: float = 1.0) -> np.ndarray:
    image = _rgb_or_grey(image)
    width, height = image.size
    side = min(width, height) * crop
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    square = image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=REDUCING_GAP)
    # Greyscale is resampled as one channel, a third of the work, and only then made RGB.
    pixels = np.asarray(square.convert("RGB") if square.mode != "RGB" else square)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _rgb_or_grey(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB" or mode in _GREY_MODES:
        return image.convert("L") if mode == "1" else image
    if mode == "P":
        transparent = "transparency" in image.info
        image = image.convert("RGBA" if transparent else "RGB")
        mode = image.mode
    if mode.startswith(("I", "F")):
        return Image.fromarray(_eight_bit(np.asarray(image), mode))
    if "A" in mode or "a" in mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return image.convert("RGB")


def _eight_bit(pixels: np.ndarray, mode: str) -> np.ndarray:
    # Pillow's own conversion clips 16-bit and float greyscale at 255, which turns most images white.
    values = pixels.astype(np.float64)
    if mode.startswith("F"):
        top = 1.0 if values.size and np.nanmax(values) <= 1.0 else 255.0
    elif mode.startswith("I;16"):
        top = 65535.0
    else:
        peak = float(values.max()) if values.size else 0.0
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    scaled = np.nan_to_num(values * (255.0 / top), nan=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def decode_images(
    datas: Sequence[bytes],
    size: int,
    names: Sequence[str] | None = None,
    workers: int | None = None,
    crop: float = 1.0,
) -> np.ndarray:
    """Decode many image files to one uint8 array, logging progress.

    Parameters
    ----------
    datas
        The image files' bytes.
    size
        Side of the square output, in pixels.
    names
        Each image's name for error messages (`ImageSplit.entries`); defaults to ``image <index>``.
    workers
        Decoding threads (Pillow releases the GIL while it decodes and resamples). Defaults to the CPUs
        this process may use, at most 16; 1 decodes in the calling thread. The result does not depend on it.
    crop
        The share of each image's shorter side its centre square keeps (`decode_image`).

    Returns
    -------
    numpy.ndarray
        uint8, shape ``(len(datas), 3, size, size)``, in the order of `datas`.

    Raises
    ------
    DataError
        For the first image (in order) that cannot be decoded, naming it.
    """
    count = len(datas)
    if names is not None and len(names) != count:
        raise ValueError(f"{len(names)} names for {count} images")
    labels = names if names is not None else [f"image {i}" for i in range(count)]
    output = np.empty((count, 3, size, size), dtype=np.uint8)
    workers = min(available_cpus(), 16) if workers is None else max(1, int(workers))
    if count < PARALLEL_MIN_IMAGES:
        workers = 1
    started = time.perf_counter()

    def decode_into(index: int) -> None:
        output[index] = decode_image(datas[index], size, labels[index], crop)

    done = 0
    for done in _run(decode_into, count, workers):
        if done % PROGRESS_EVERY == 0 and done < count:
            rate = done / max(time.perf_counter() - started, 1e-9)
            log.info("decoded %d of %d images (%.0f images/s)", done, count, rate)
    if count:
        elapsed = time.perf_counter() - started
        log.info(
            "decoded %d images to %dx%d in %.1fs (%.0f images/s, %d threads)",
            count,
            size,
            size,
            elapsed,
            count / max(elapsed, 1e-9),
            workers,
        )
    return output


def _run(work: Any, count: int, workers: int) -> Iterator[int]:
    # Yields how many are done after each image; raises the first failure in index order.
    if workers <= 1:
        for index in range(count):
            work(index)
            yield index + 1
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        # Submitted in windows so a failure stops the work soon and the futures list stays small.
        window = workers * 64
        for start in range(0, count, window):
            futures = [pool.submit(work, i) for i in range(start, min(start + window, count))]
            for offset, future in enumerate(futures):
                try:
                    future.result()
                except BaseException:
                    for pending in futures:
                        pending.cancel()
                    raise
                yield start + offset + 1


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def encode_image_instances(instances: Sequence[Any], size: int, crop: float = 1.0) -> np.ndarray:
    """Check and decode request instances (contract, "Serving") as training decoded its images.

    Parameters
    ----------
    instances
        JSON objects whose ``"image"`` is the base64 of an image file: standard or URL-safe alphabet, with
        or without padding, line breaks allowed, optionally as a ``data:image/...;base64,`` URI. Other keys
        are ignored.
    size
        The model's image size.
    crop
        The model's centre crop (`decode_image`).

    Returns
    -------
    numpy.ndarray
        uint8, shape ``(len(instances), 3, size, size)``.

    Raises
    ------
    ValueError
        Naming the first bad instance: not an object, no ``"image"`` key, not a string, not base64, or not
        a decodable image.
    """
    output = np.empty((len(instances), 3, size, size), dtype=np.uint8)
    for i, instance in enumerate(instances):
        if not isinstance(instance, Mapping):
            raise ValueError(
                f'instance {i}: expected a JSON object with an "image" key, got {json_kind(instance, quote_strings=False)}'
            )
        if "image" not in instance:
            raise ValueError(f'instance {i}: missing "image" (the base64 of an image file)')
        value = instance["image"]
        if not isinstance(value, str):
            raise ValueError(
                f'instance {i}: "image" must be a base64 string, got {json_kind(value, quote_strings=False)}'
            )
        data = _base64_bytes(value)
        if data is None:
            raise ValueError(f'instance {i}: "image" is not valid base64')
        if not data:
            raise ValueError(f'instance {i}: "image" is empty')
        try:
            output[i] = decode_image(data, size, f"instance {i}", crop)
        except UndecodableImage as error:
            raise ValueError(f'instance {i}: "image" is not a decodable image: {error.reason}') from None
    return output


def _base64_bytes(text: str) -> bytes | None:
    text = _BASE64_DATA_URI.sub("", text.strip(), count=1)
    text = "".join(text.split()).rstrip("=")
    if len(text) % 4 == 1:
        return None
    # Either alphabet: '-' and '_' only occur in URL-safe base64, '+' and '/' only in the standard one.
    text = text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
