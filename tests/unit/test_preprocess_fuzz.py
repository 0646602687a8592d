"""Generated files through `preprocess.core.preprocess`: a manifest whose counts add up and whose splits
hold exactly the kept rows, or `DatasetRejected` with a reason; never anything else.

A CI-sized run by default (200 examples per test, a few seconds). The long run (10,000 examples each):

    make test-fuzz        # HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/unit/test_preprocess_fuzz.py
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from split_files import SplitFiles

from common.errors import DatasetRejected
from preprocess.core import DatasetSpec, preprocess

settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "long", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

PROVENANCE = {"dataset": "d", "version": "v", "source": {"bucket": "b", "key": "datasets/d/f"}}
MISSING = ["", "NA", "n/a", "NaN", "null", "None", " na "]


def _note(outcome: str) -> None:
    """Tally outcomes (pytest --hypothesis-show-statistics); a no-op outside a Hypothesis test."""
    with contextlib.suppress(InvalidArgument):
        event(outcome)


class Splits(SplitFiles):
    def rows(self) -> list[list[str]]:
        rows = []
        for text in self.files.values():
            parsed = list(csv.reader(io.StringIO(text, newline="")))
            rows.extend(parsed[1:])
        return rows


def run(data: bytes, fmt: str = "csv"):
    """The manifest and the split rows, or the rejection; any other exception fails the test."""
    splits = Splits()
    try:
        manifest = preprocess(
            io.BytesIO(data),
            spec=DatasetSpec(),
            open_split=splits.open,
            provenance={**PROVENANCE, "source": dict(PROVENANCE["source"])},
            fmt=fmt,
        )
    except DatasetRejected as rejected:
        _note("rejected")
        assert isinstance(rejected.reason, str) and rejected.reason.strip()
        json.dumps(rejected.details, default=str)  # the quarantine report can be written
        return None, rejected
    _note("processed")
    counts = manifest["counts"]
    assert counts["rows_read"] == counts["rows_used"] + sum(manifest["dropped"].values())
    assert counts["rows_used"] == counts["train"] + counts["validation"] + counts["test"]
    written = splits.rows()
    assert len(written) == counts["rows_used"]
    width = len(manifest["columns"])
    assert all(len(row) == width for row in written)
    for text in splits.files.values():
        header = next(csv.reader(io.StringIO(text, newline="")))
        assert header == [c["name"] for c in manifest["columns"]]
    json.dumps(manifest)
    return (manifest, written), None


# ------------------------------------------------------------------------------------------- CSV

cell_text = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs",), blacklist_characters="\x00", min_codepoint=1, max_codepoint=0x2FFF
    ),
    max_size=12,
)
cells = st.one_of(
    st.integers(-1000, 1000).map(str),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(lambda f: f"{f:.3g}"),
    st.sampled_from(MISSING),
    st.sampled_from(
        ["red", "green", "blue", "=SUM(A1)", "@x", "+1-2", 'say "hi"', "a,b", "a;b", "tab\there"]
    ),
    cell_text,
)


@st.composite
def csv_files(draw):
    """A header and rows of random cells, written with a random delimiter, quoting, line ending and BOM;
    some rows ragged, some targets missing, some rows repeated."""
    width = draw(st.integers(2, 5))
    header = [f"col{i}" for i in range(width)]
    n = draw(st.one_of(st.integers(0, 60), st.integers(60, 160)))  # often enough rows to be usable
    labels = draw(
        st.lists(st.sampled_from(["yes", "no", "maybe", "1", "0", ""]), min_size=1, max_size=3, unique=True)
    )
    rows = []
    for _ in range(n):
        row = [draw(cells) for _ in range(width - 1)] + [draw(st.sampled_from(labels))]
        if draw(st.integers(0, 30)) == 0:  # ragged
            row = row[:-1] if draw(st.booleans()) else [*row, "extra"]
        rows.append(row)
        if rows and draw(st.integers(0, 20)) == 0:
            rows.append(list(draw(st.sampled_from(rows))))  # a duplicate
    delimiter = draw(st.sampled_from([",", ";", "\t", "|"]))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    out = io.StringIO(newline="")
    writer = csv.writer(out, delimiter=delimiter, quoting=quoting, lineterminator=newline)
    writer.writerow(header)
    for row in rows:
        writer.writerow(row)
    text = out.getvalue()
    if draw(st.booleans()):
        text += draw(st.sampled_from(["", "\n", newline * 3]))  # trailing blank lines
    prefix = "\ufeff" if draw(st.booleans()) else ""
    return (prefix + text).encode("utf-8"), delimiter, header, rows


def expected_rows(data: bytes, delimiter: str) -> list[list[str]]:
    """The cleaning contract, written plainly over the csv module's reading of the file (line breaks read
    as universal newlines): right width, a target, first occurrence only."""
    text = data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    header, *rows = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    kept, seen = [], set()
    for row in rows:
        if len(row) != len(header):
            continue  # a blank line, or a row of the wrong width
        if row[-1].strip().lower() in {"", "na", "n/a", "nan", "null", "none"}:
            continue
        if tuple(row) in seen:
            continue
        seen.add(tuple(row))
        kept.append(row)
    return kept


@given(csv_files())
def test_generated_csv_is_processed_exactly_or_rejected_with_a_reason(generated):
    data, delimiter, header, _ = generated
    result, _ = run(data)
    if result is None:
        return
    manifest, written = result
    if manifest["delimiter"] != delimiter or [c["name"] for c in manifest["columns"]] != header:
        _note("another delimiter sniffed")
        return  # the sniffer read another delimiter from ambiguous cells: counts were still checked
    assert Counter(map(tuple, written)) == Counter(map(tuple, expected_rows(data, delimiter)))


@given(st.binary(max_size=3000))
def test_random_bytes_never_raise_anything_but_a_rejection(data):
    run(data)


@given(st.binary(max_size=3000))
def test_random_bytes_as_json_lines_never_raise_anything_but_a_rejection(data):
    run(data, fmt="jsonl")


# ---------------------------------------------------------------------------------------- JSON Lines

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    cell_text,
    st.sampled_from(MISSING),
)
json_values = st.one_of(
    json_scalars, st.lists(json_scalars, max_size=3), st.dictionaries(cell_text, json_scalars, max_size=2)
)


@st.composite
def jsonl_files(draw):
    keys = draw(
        st.lists(st.sampled_from(["age", "plan", "note", "x", "label"]), min_size=2, max_size=5, unique=True)
    )
    lines = []
    for _ in range(draw(st.integers(0, 120))):
        kind = draw(st.integers(0, 40))
        if kind == 0:
            lines.append(draw(st.sampled_from(["{broken", "[1, 2]", '"text"', "42", ""])))
            continue
        record = {k: draw(json_values) for k in keys if draw(st.integers(0, 10))}
        record[keys[-1]] = draw(st.sampled_from(["a", "b", None, "c"]))
        if kind == 1:
            record["surprise"] = 1
        lines.append(json.dumps(record, ensure_ascii=draw(st.booleans())))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(lines).encode("utf-8", "surrogatepass")


@given(jsonl_files())
def test_generated_json_lines_are_processed_or_rejected_with_a_reason(data):
    run(data, fmt="jsonl")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_valid_file_survives_the_fuzz_harness(fmt):
    """The harness itself accepts good input (so a run of rejections is not vacuous)."""
    if fmt == "csv":
        data = ("x,label\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in range(120))).encode()
    else:
        data = "".join(json.dumps({"x": i, "label": "ab"[i % 2]}) + "\n" for i in range(120)).encode()
    result, rejected = run(data, fmt=fmt)
    assert rejected is None and result is not None and len(result[1]) == 120
