"""Synthetic datasets the unit and integration tests share: images whose class is their pattern, and
reviews whose label only word order tells."""

from __future__ import annotations

import io
import random

SHAPES = ("checks", "horizontal", "vertical")
SENTIMENT = {
    "good": "positive",
    "great": "positive",
    "fine": "positive",
    "bad": "negative",
    "awful": "negative",
}
FILLER = ["the", "movie", "was", "and", "plot", "cast", "really", "quite", "story", "ending", "it", "so"]


def shape_image(kind: str, rng: random.Random, size: int = 24) -> bytes:
    """Stripes or checks (`SHAPES`) in random colours, shifted and noisy, as a PNG or JPEG file's bytes."""
    from PIL import Image

    period, shift = rng.randint(4, 7), rng.randint(0, 6)
    ink = tuple(rng.randint(0, 120) for _ in range(3))
    paper = tuple(rng.randint(150, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), paper)
    pixels = image.load()
    half = period // 2
    for y in range(size):
        for x in range(size):
            if kind == "horizontal":
                on = (y + shift) // half % 2
            elif kind == "vertical":
                on = (x + shift) // half % 2
            else:
                on = ((x + shift) // 3 + y // 3) % 2
            if on and rng.random() > 0.05:
                pixels[x, y] = ink
    buffer = io.BytesIO()
    image.save(buffer, rng.choice(["PNG", "JPEG"]), **({} if rng.random() < 0.5 else {"quality": 90}))
    return buffer.getvalue()


def image_suffix(data: bytes) -> str:
    """The file name ending of `shape_image`'s bytes."""
    return ".png" if data.startswith(b"\x89PNG") else ".jpg"


def negation_rows(n: int, rng: random.Random) -> list[dict[str, str]]:
    """Reviews that all hold one sentiment word and one "not": the label flips when "not" stands right
    before the sentiment word. Every review has the same kinds of words, so only their order tells."""
    rows = []
    for _ in range(n):
        word = rng.choice(sorted(SENTIMENT))
        words = rng.sample(FILLER, rng.randint(3, 9))
        where = rng.randint(0, len(words))
        negated = rng.random() < 0.5
        if negated:
            words[where:where] = ["not", word]
        else:
            words[where:where] = [word]
            # "not" anywhere but right before the sentiment word
            places = [i for i in range(len(words) + 1) if i != where]
            words.insert(rng.choice(places), "not")
        label = SENTIMENT[word]
        if negated:
            label = "negative" if label == "positive" else "positive"
        rows.append(
            {
                "review": " ".join(words).capitalize() + ".",
                "stars_shown": str(rng.randint(0, 1)),
                "label": label,
            }
        )
    return rows
