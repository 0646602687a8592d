"""The preprocessing core on bytes: target and task inference, splits, statistics, rejections."""

import csv
import io
import random

import pytest
from split_files import SplitFiles

from common.errors import DatasetRejected
from preprocess.core import DatasetSpec, preprocess, split_of

PROVENANCE = {"dataset": "d", "version": "v", "source": {"bucket": "b", "key": "datasets/d/f.csv"}}


class Splits(SplitFiles):
    def rows(self, split):
        return list(csv.reader(io.StringIO(self.files[split])))


def run(text: str, spec: DatasetSpec | None = None, encoding="utf-8"):
    splits = Splits()
    manifest = preprocess(
        io.BytesIO(text.encode(encoding)),
        spec=spec or DatasetSpec(),
        open_split=splits.open,
        provenance=PROVENANCE,
    )
    return manifest, splits


def table(header, rows, delimiter=","):
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def classification_rows(n=300, seed=1):
    rng = random.Random(seed)
    return [[i, round(rng.gauss(0, 1), 3), rng.choice("abc"), rng.choice(["yes", "no"])] for i in range(n)]


def test_infers_target_task_roles_and_writes_every_row_once():
    rows = classification_rows()
    manifest, splits = run(table(["id", "x", "colour", "outcome"], rows))
    assert manifest["target"] == "outcome"
    assert manifest["task"] == "classification"
    assert manifest["labels"] == ["no", "yes"]
    roles = {c["name"]: (c["role"], c.get("type")) for c in manifest["columns"]}
    assert roles == {
        "id": ("ignored", None),
        "x": ("feature", "numeric"),
        "colour": ("feature", "categorical"),
        "outcome": ("target", "categorical"),
    }
    written = [row for split in ("train", "validation", "test") for row in splits.rows(split)[1:]]
    assert sorted(map(tuple, written)) == sorted(tuple(map(str, r)) for r in rows)
    assert manifest["counts"]["rows_used"] == 300
    assert min(manifest["counts"][s] for s in ("validation", "test")) > 0


def test_named_target_column_wins_and_integer_labels_stay_integers():
    rng = random.Random(2)
    rows = [[rng.randint(0, 1), rng.random(), rng.random()] for _ in range(200)]
    manifest, _ = run(table(["Label", "a", "b"], rows))
    assert manifest["target"] == "Label"
    assert manifest["labels"] == [0, 1]


def test_spec_target_and_regression():
    rng = random.Random(3)
    rows = [[rng.random(), rng.random() * 100] for _ in range(200)]
    manifest, _ = run(table(["f", "price"], rows), DatasetSpec(target="price"))
    assert manifest["task"] == "regression"
    stats = next(c for c in manifest["columns"] if c["name"] == "price")["stats"]
    assert 0 <= stats["min"] <= stats["mean"] <= stats["max"] <= 100


def test_splits_are_deterministic_and_stats_come_from_train():
    text = table(["x", "y"], [[i, i % 2] for i in range(500)])
    first, a = run(text)
    second, b = run(text)
    assert a.files == b.files
    assert first == second
    x = first["columns"][0]["stats"]
    assert x["count"] == first["counts"]["train"]
    assert split_of(["1", "0"]) == split_of(["1", "0"])


def test_semicolon_delimiter_bom_and_crlf():
    text = "\ufeff" + table(["a", "b", "label"], [[i, i * 2, i % 3] for i in range(120)], delimiter=";")
    manifest, splits = run(text)
    assert manifest["delimiter"] == ";"
    assert manifest["columns"][0]["name"] == "a"  # the BOM is not part of the first column's name
    assert splits.rows("train")[0] == ["a", "b", "label"]


def test_rows_without_target_are_dropped_and_counted():
    rows = [[i, "" if i % 10 == 0 else i % 2] for i in range(200)]
    manifest, _ = run(table(["x", "y"], rows))
    assert manifest["dropped"] == {"missing_target": 20}
    assert manifest["counts"]["rows_used"] == 180


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("a,b\n", "usable rows"),
        ("only\n1\n2\n", "fewer than two columns"),
        (table(["x", "y"], [[i, "same"] for i in range(100)]), "single class"),
        (table(["x", "x"], [[i, i % 2] for i in range(100)]), "unique"),
    ],
)
def test_unusable_files_are_rejected_with_a_reason(text, reason):
    with pytest.raises(DatasetRejected, match=reason):
        run(text)


def test_a_rejected_file_aborts_every_split_writer():
    splits = Splits()
    with pytest.raises(DatasetRejected):
        preprocess(
            io.BytesIO(table(["x", "y"], [[i, "same"] for i in range(100)]).encode()),
            spec=DatasetSpec(),
            open_split=splits.open,
            provenance=PROVENANCE,
        )
    assert sorted(splits.aborted) == ["test", "train", "validation"]
    assert splits.files == {}


def test_non_utf8_is_rejected():
    with pytest.raises(DatasetRejected, match="UTF-8"):
        run(table(["name", "y"], [["café", i % 2] for i in range(100)]), encoding="latin-1")


def test_spec_must_name_an_existing_column():
    with pytest.raises(DatasetRejected, match="not in the header"):
        run(table(["x", "y"], [[i, i % 2] for i in range(100)]), DatasetSpec(target="nope"))


def test_spec_validation():
    assert DatasetSpec.from_json({"target": "y", "threshold": 0.8}).threshold == 0.8
    with pytest.raises(DatasetRejected, match="unknown keys"):
        DatasetSpec.from_json({"tagret": "y"})
    with pytest.raises(DatasetRejected, match="task"):
        DatasetSpec.from_json({"task": "clustering"})
    assert DatasetSpec.from_json({}).approval == "auto"
    assert DatasetSpec.from_json({"approval": "manual"}).approval == "manual"
    with pytest.raises(DatasetRejected, match="approval must be 'auto' or 'manual'"):
        DatasetSpec.from_json({"approval": "yes please"})
    assert DatasetSpec.from_json({"serving": "serverless"}).serving == "serverless"
    with pytest.raises(DatasetRejected, match="serving must be 'instances' or 'serverless'"):
        DatasetSpec.from_json({"serving": "lambda"})
    assert DatasetSpec.from_json({}).recipe is None
    assert DatasetSpec.from_json({"recipe": "image"}).recipe == "image"
    with pytest.raises(DatasetRejected, match="recipe must be 'tabular', 'text', 'image'"):
        DatasetSpec.from_json({"recipe": "cnn"})


def test_the_spec_recipe_overrides_the_inferred_one_within_what_the_data_allows():
    rng = random.Random(4)
    words = ["the", "film", "was", "good", "bad", "long", "short", "plot"]
    reviews = table(["review", "label"], [[" ".join(rng.choices(words, k=5)), i % 2] for i in range(200)])
    numbers = table(["x", "y"], [[i, i % 2] for i in range(200)])

    manifest, _ = run(reviews)
    assert manifest["recipe"] == "text"
    assert "recipe: text (free-text column 'review')" in manifest["inferred"]
    manifest, _ = run(reviews, DatasetSpec(recipe="tabular"))
    assert manifest["recipe"] == "tabular"
    assert "recipe: tabular from conveyor.json" in manifest["inferred"]
    manifest, _ = run(numbers)
    assert manifest["recipe"] == "tabular"
    assert "recipe: tabular (no free-text column)" in manifest["inferred"]
    with pytest.raises(DatasetRejected, match="recipe 'text', but no feature column is free text"):
        run(numbers, DatasetSpec(recipe="text"))
    with pytest.raises(DatasetRejected, match=r"recipe 'image'.*upload a \.zip"):
        run(numbers, DatasetSpec(recipe="image"))
