"""What a preprocessing run writes through its ``open_split``, kept in memory for the tests to read back."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import IO, Any


class SplitFiles:
    """An ``open_split`` that keeps each split's file: text (CSV splits) or bytes (image zips).

    `files` holds what each split's writer left when it closed; `aborted` names the splits whose writer exited
    with an exception (a rejected upload), which are not in `files`.
    """

    def __init__(self, binary: bool = False) -> None:
        self.binary = binary
        self.files: dict[str, Any] = {}
        self.aborted: list[str] = []

    @contextlib.contextmanager
    def open(self, split: str) -> Iterator[IO[Any]]:
        # newline="": what the writer wrote, byte for byte (csv writes its own line endings).
        buffer: IO[Any] = io.BytesIO() if self.binary else io.StringIO(newline="")
        try:
            yield buffer
        except BaseException:
            self.aborted.append(split)
            raise
        self.files[split] = buffer.getvalue()
