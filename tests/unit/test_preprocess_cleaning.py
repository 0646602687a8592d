"""The cleaning contract (docs/preprocessing.md) on bytes: formats, limits, duplicates, coercion, text."""

import csv
import gzip
import io
import json
import random

import pytest
from split_files import SplitFiles

from common.errors import DatasetRejected
from preprocess.core import (
    MIN_ROWS_PER_CLASS,
    DatasetSpec,
    Limits,
    format_of,
    preprocess,
    tokenize,
)

PROVENANCE = {"dataset": "d", "version": "v", "source": {"bucket": "b", "key": "datasets/d/f"}}


class Splits(SplitFiles):
    def rows(self, split):
        return list(csv.reader(io.StringIO(self.files[split])))[1:]

    def all_rows(self):
        return [row for split in ("train", "validation", "test") for row in self.rows(split)]


def run(data: bytes | str, spec=None, fmt="csv", limits=None):
    splits = Splits()
    raw = data.encode() if isinstance(data, str) else data
    manifest = preprocess(
        io.BytesIO(raw),
        spec=spec or DatasetSpec(),
        open_split=splits.open,
        provenance={**PROVENANCE, "source": dict(PROVENANCE["source"])},
        fmt=fmt,
        limits=limits,
    )
    return manifest, splits


def csv_text(header, rows, delimiter=",", newline="\n"):
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator=newline).writerows([header, *rows])
    return out.getvalue()


def rows(n=200, seed=3):
    rng = random.Random(seed)
    return [
        [i, round(rng.gauss(0, 1), 4), rng.choice(["red", "green", "blue"]), rng.choice("xy")]
        for i in range(n)
    ]


def column(manifest, name):
    return next(c for c in manifest["columns"] if c["name"] == name)


def test_counts_add_up_and_every_kept_row_is_written_once():
    data = rows(300) + rows(20)  # 20 exact duplicates
    data[100][3] = ""  # a missing target
    data.append([1, 2])  # a ragged row
    manifest, splits = run(csv_text(["id", "x", "colour", "label"], data))
    counts = manifest["counts"]
    assert counts["rows_read"] == len(data)
    assert counts["rows_read"] == counts["rows_used"] + sum(manifest["dropped"].values())
    assert manifest["dropped"] == {"duplicate_row": 20, "missing_target": 1, "wrong_number_of_fields": 1}
    written = splits.all_rows()
    assert len(written) == counts["rows_used"] == len({tuple(r) for r in written})
    assert manifest["dropped_lines"]["wrong_number_of_fields"] == [len(data) + 1]


def test_duplicates_can_be_kept():
    data = rows(100) * 2
    manifest, _ = run(csv_text(["id", "x", "colour", "label"], data), spec=DatasetSpec(drop_duplicates=False))
    assert manifest["counts"]["rows_used"] == 200 and "duplicate_row" not in manifest["dropped"]
    assert manifest["duplicates_checked"].startswith("off")


def test_quoted_fields_crlf_and_multiline_values_round_trip():
    data = [
        [i, f'say "hi", {i}', "line one\nline two" if i % 7 == 0 else "x", "ab"[i % 2]] for i in range(120)
    ]
    text = csv_text(["id", "quote", "note", "label"], data, newline="\r\n")
    manifest, splits = run(text)
    written = sorted(splits.all_rows(), key=lambda r: int(r[0]))
    assert written == [[str(v) for v in row] for row in data]
    assert manifest["counts"]["rows_used"] == 120


def test_semicolon_files_are_written_as_comma_csv():
    data = [[i, f"{i / 3:.3f}", "ab"[i % 2]] for i in range(100)]
    manifest, splits = run(csv_text(["a", "b", "label"], data, delimiter=";"))
    assert manifest["delimiter"] == ";"
    assert splits.files["train"].splitlines()[0] == "a,b,label"
    assert len(splits.all_rows()) == 100


def test_jsonl_rows_missing_keys_extra_keys_and_broken_lines():
    lines = []
    for i in range(150):
        record = {
            "n": i,
            "age": 20 + i % 50,
            "plan": ["basic", "pro"][i % 2],
            "vip": i % 3 == 0,
            "churn": "yn"[i % 2],
        }
        if i == 10:
            del record["plan"]  # a missing key is a missing value
        if i == 11:
            record["surprise"] = 1  # a key the first object does not have
        lines.append(json.dumps(record))
    lines[20] = "{not json"
    lines[21] = "[1, 2, 3]"
    manifest, splits = run("\n".join(lines) + "\n", fmt="jsonl")
    assert manifest["format"] == "jsonl"
    assert manifest["dropped"] == {"invalid_json": 1, "not_a_json_object": 1}
    assert manifest["dropped_lines"] == {"invalid_json": [21], "not_a_json_object": [22]}
    assert any("surprise" in w for w in manifest["warnings"])
    assert column(manifest, "vip")["stats"]["categories"] == ["false", "true"]
    assert column(manifest, "plan")["stats"]["missing"] <= 1
    assert splits.files["train"].splitlines()[0] == "n,age,plan,vip,churn"


def test_jsonl_that_is_not_json_lines_is_rejected_with_samples():
    with pytest.raises(DatasetRejected, match="JSON object") as caught:
        run("a,b,c\n" * 200, fmt="jsonl")
    assert caught.value.details["samples"]


def test_a_lone_surrogate_in_json_drops_the_row():
    lines = [json.dumps({"x": i, "t": "ab"[i % 2]}) for i in range(100)]
    lines[3] = '{"x": "\\ud800", "t": "a"}'
    manifest, _ = run("\n".join(lines), fmt="jsonl")
    assert manifest["dropped"] == {"invalid_unicode": 1}


def test_a_few_unparseable_numbers_are_coerced_to_missing_and_reported():
    data = [[i, str(i * 1.5), "ab"[i % 2]] for i in range(400)]
    data[7][1] = "n.a."
    manifest, _ = run(csv_text(["id", "amount", "label"], data))
    amount = column(manifest, "amount")
    assert amount["type"] == "numeric"
    assert amount["stats"]["invalid"] == 1 and amount["stats"]["invalid_examples"] == ["n.a."]
    assert any("'amount'" in w and "treated as missing" in w for w in manifest["warnings"])


def test_statistics_are_exact_over_chunks():
    rng = random.Random(0)
    values = [rng.uniform(1e6, 1e6 + 1) for _ in range(5000)]
    data = [[f"{v:.6f}", "ab"[i % 2]] for i, v in enumerate(values)]
    manifest, splits = run(csv_text(["v", "label"], data))
    train = [float(r[0]) for r in splits.rows("train")]
    mean = sum(train) / len(train)
    std = (sum((x - mean) ** 2 for x in train) / (len(train) - 1)) ** 0.5
    stats = column(manifest, "v")["stats"]
    assert stats["count"] == len(train)
    assert stats["mean"] == pytest.approx(mean, rel=1e-12)
    assert stats["std"] == pytest.approx(std, rel=1e-6)
    assert stats["min"] == min(train) and stats["max"] == max(train)


def test_a_copy_of_the_target_is_ignored_as_leakage():
    data = [[i, "yes" if i % 3 else "no", "yes" if i % 3 else "no"] for i in range(200)]
    manifest, _ = run(csv_text(["x", "answer_copy", "label"], data))
    assert "leak" in column(manifest, "answer_copy")["reason"]


def test_text_columns_get_a_vocabulary_and_the_text_recipe():
    rng = random.Random(1)
    good, bad = ["great", "lovely", "fun"], ["awful", "boring", "dull"]
    data = []
    for i in range(300):
        label = "pos" if i % 2 else "neg"
        words = rng.choices(good if label == "pos" else bad, k=3) + rng.choices(["the", "movie", "was"], k=3)
        data.append([" ".join(words).capitalize(), label])
    manifest, _ = run(csv_text(["review", "label"], data))
    review = column(manifest, "review")
    assert review["type"] == "text" and manifest["recipe"] == "text"
    assert set(review["stats"]["vocabulary"]) == {*good, *bad, "the", "movie", "was"}
    assert review["stats"]["max_tokens"] == 6
    assert tokenize("Don't STOP-me, naïve") == ["don", "t", "stop", "me", "naïve"]


def test_rare_classes_are_rejected_with_their_counts():
    data = [[i, "a" if i % 2 else "b"] for i in range(200)] + [[999, "c"], [998, "c"]]
    with pytest.raises(DatasetRejected, match=f"fewer than {MIN_ROWS_PER_CLASS}") as caught:
        run(csv_text(["x", "label"], data))
    assert caught.value.details["rare_classes"] == {"c": 2}


def test_a_line_longer_than_the_limit_is_rejected_without_reading_it_whole():
    text = "a,b\n" + "1," + "x" * 5000 + "\n"
    with pytest.raises(DatasetRejected, match="line 2 is longer than 1,000") as caught:
        run(text, limits=Limits(max_line_chars=1000))
    assert caught.value.details["line"] == 2


def test_too_many_columns_is_rejected():
    header = [f"c{i}" for i in range(30)]
    with pytest.raises(DatasetRejected, match="30 columns; conveyor takes at most 20"):
        run(",".join(header) + "\n", limits=Limits(max_columns=20))


def test_inflating_past_the_byte_limit_is_rejected():
    data = csv_text(["x", "label"], [[i, "ab"[i % 2]] for i in range(5000)])
    with pytest.raises(DatasetRejected, match="larger than 1,000 bytes once decompressed"):
        run(data, limits=Limits(max_bytes=1000))
    assert Limits.for_object("k.csv.gz", 10 << 20).max_bytes == 1000 * (10 << 20) // 10
    assert Limits.for_object("k.csv", 10 << 20).max_bytes is None


def test_a_truncated_gzip_stream_is_rejected():
    payload = gzip.compress(csv_text(["x", "label"], [[i, "ab"[i % 2]] for i in range(5000)]).encode())
    with (
        gzip.open(io.BytesIO(payload[: len(payload) // 2])) as truncated,
        pytest.raises(DatasetRejected, match="truncated or corrupt"),
    ):
        preprocess(truncated, spec=DatasetSpec(), open_split=Splits().open, provenance=PROVENANCE)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x01\x02binary" * 100, "binary"),
        ("a,b\n1,2\n".encode("utf-16"), "binary"),
        ("x,label\n" + "caf\xe9,a\n" * 100, None),  # latin-1 bytes below
        ("only_one_column\n1\n2\n", "fewer than two columns"),
        ("x,label\n", "only 0 usable rows"),
        ('x,label\n"never closed,a\n' + "1,b\n" * 100, "opened on line 2 never closes"),
    ],
)
def test_unusable_files_are_rejected_with_a_reason(data, reason):
    if reason is None:
        data, reason = data.encode("latin-1"), "not UTF-8"
    with pytest.raises(DatasetRejected, match=reason):
        run(data)


def test_formula_like_cells_are_kept_as_text_and_warned_about():
    data = [[f'=HYPERLINK("http://x/{i % 5}")' if i % 2 else "plain", i % 9, "ab"[i % 2]] for i in range(200)]
    manifest, splits = run(csv_text(["cell", "n", "label"], data))
    assert any("formulas" in w for w in manifest["warnings"])
    assert any(r[0].startswith("=HYPERLINK") for r in splits.all_rows())


@pytest.mark.parametrize(
    ("key", "fmt"),
    [
        ("a/b.csv", "csv"),
        ("a/B.CSV.GZ", "csv"),
        ("a/b.jsonl", "jsonl"),
        ("a/b.jsonl.gz", "jsonl"),
        ("a/b.xlsx", None),
    ],
)
def test_format_comes_from_the_key(key, fmt):
    assert format_of(key) == fmt
