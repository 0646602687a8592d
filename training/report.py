"""The training job's report: PNG plots and a one-page HTML page a person can read without knowing the code.

Written next to ``evaluation.json`` in the job's output data (``output.tar.gz`` in S3): ``report.html`` with
``learning_curves.png``, and ``confusion_matrix.png`` and ``roc.png`` (binary) for classification, or
``residuals.png`` for regression. The plots need Pillow, which the AWS PyTorch images carry (torchvision
depends on it); without it the page still has every figure as a table, and says the plots are missing.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("conveyor.report")

WIDTH, HEIGHT = 640, 420
MARGIN = {"left": 70, "right": 20, "top": 50, "bottom": 55}
BLUE, ORANGE, GREY, INK = (31, 119, 180), (255, 127, 14), (200, 200, 200), (30, 30, 30)


# ---------------------------------------------------------------------------------------------- plots
class _Chart:
    """An x/y chart on a Pillow canvas: axes with ticks and labels, lines and points in data coordinates."""

    def __init__(
        self,
        title: str,
        x_label: str,
        y_label: str,
        x_range: tuple[float, float],
        y_range: tuple[float, float],
    ):
        from PIL import Image, ImageDraw, ImageFont

        self.image = Image.new("RGB", (WIDTH, HEIGHT), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.font = ImageFont.load_default(size=13)
        self.x_range, self.y_range = _padded(x_range), _padded(y_range)
        self.box = (MARGIN["left"], MARGIN["top"], WIDTH - MARGIN["right"], HEIGHT - MARGIN["bottom"])
        self.draw.text((WIDTH / 2, 12), title, fill=INK, font=ImageFont.load_default(size=16), anchor="mt")
        self.draw.text((WIDTH / 2, HEIGHT - 14), x_label, fill=INK, font=self.font, anchor="mb")
        # Above the y axis (Pillow draws no rotated text without an extra image).
        self.draw.text((MARGIN["left"], MARGIN["top"] - 6), y_label, fill=INK, font=self.font, anchor="lb")
        left, top, right, bottom = self.box
        for index, value in enumerate(np.linspace(*self.x_range, 5)):
            x = self.x(value)
            self.draw.line([(x, top), (x, bottom)], fill=GREY)
            anchor = "rt" if index == 4 else "mt"  # the last label ends at the axis, inside the image
            self.draw.text((x, bottom + 6), _tick(value), fill=INK, font=self.font, anchor=anchor)
        for value in np.linspace(*self.y_range, 5):
            y = self.y(value)
            self.draw.line([(left, y), (right, y)], fill=GREY)
            self.draw.text((left - 6, y), _tick(value), fill=INK, font=self.font, anchor="rm")
        self.draw.rectangle(self.box, outline=INK)

    def x(self, value: float) -> float:
        low, high = self.x_range
        return self.box[0] + (value - low) / (high - low) * (self.box[2] - self.box[0])

    def y(self, value: float) -> float:
        low, high = self.y_range
        return self.box[3] - (value - low) / (high - low) * (self.box[3] - self.box[1])

    def line(
        self, xs: Sequence[float], ys: Sequence[float], colour: tuple[int, int, int], width: int = 2
    ) -> None:
        points = [(self.x(a), self.y(b)) for a, b in zip(xs, ys, strict=True)]
        if len(points) == 1:
            points = points * 2
        self.draw.line(points, fill=colour, width=width)

    def points(self, xs: Sequence[float], ys: Sequence[float], colour: tuple[int, int, int]) -> None:
        for a, b in zip(xs, ys, strict=True):
            x, y = self.x(a), self.y(b)
            self.draw.ellipse([(x - 2, y - 2), (x + 2, y + 2)], fill=colour)

    def legend(self, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
        x, y = self.box[2] - 150, self.box[1] + 10
        for text, colour in entries:
            self.draw.line([(x, y), (x + 20, y)], fill=colour, width=3)
            self.draw.text((x + 26, y), text, fill=INK, font=self.font, anchor="lm")
            y += 18

    def save(self, path: Path) -> None:
        self.image.save(path, format="PNG", optimize=True)


def _padded(bounds: tuple[float, float]) -> tuple[float, float]:
    low, high = float(bounds[0]), float(bounds[1])
    if not np.isfinite(low) or not np.isfinite(high):
        return 0.0, 1.0
    if high - low < 1e-12:
        return low - 0.5, high + 0.5
    return low, high


def _tick(value: float) -> str:
    if abs(value) >= 1000 or (abs(value) < 0.01 and value != 0):
        return f"{value:.2g}"
    return f"{value:.3g}"


def _training_sentence(summary: dict[str, Any]) -> str:
    """How training went, in words: epochs, time, what was kept."""
    epochs, seconds, best = (
        summary.get("epochs_run", "?"),
        summary.get("training_seconds", "?"),
        summary.get("best_epoch", "?"),
    )
    linear = summary.get("linear_path")
    if not linear:
        return f"trained {epochs} epochs in {seconds} s and kept epoch {best}."
    fitted = f"a linear model was fitted first ({linear['iterations']} L-BFGS iterations)"
    if best == 0:
        return (
            f"{fitted}; training ran {epochs} epochs from there in {seconds} s, none of which lowered "
            "validation loss, so the fitted linear model was kept."
        )
    return f"{fitted}, then training ran {epochs} epochs from there in {seconds} s and kept epoch {best}."


def learning_curves(history: Sequence[dict[str, Any]], best_epoch: int, path: Path) -> None:
    """Train and validation loss per epoch; epoch 0 (where training started: validation loss only) when recorded."""
    epochs = [row["epoch"] for row in history]
    trained = [row for row in history if "train_loss" in row]
    train = [row["train_loss"] for row in trained]
    validation = [row["validation_loss"] for row in history]
    finite = [v for v in train + validation if np.isfinite(v)]
    chart = _Chart(
        "Learning curves (loss per epoch)",
        "epoch",
        "loss",
        (min([*epochs, best_epoch]), max(epochs)),
        (min(finite, default=0.0), max(finite, default=1.0)),
    )
    chart.line([row["epoch"] for row in trained], train, BLUE)
    chart.line(epochs, validation, ORANGE)
    chart.line([best_epoch, best_epoch], list(chart.y_range), GREY, width=1)
    kept = f"kept: epoch {best_epoch}" if best_epoch else "kept: epoch 0, start"
    chart.legend([("train", BLUE), ("validation", ORANGE), (kept, GREY)])
    chart.save(path)


def confusion_matrix(matrix: dict[str, dict[str, int]], path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    names = list(matrix)
    counts = np.array([[matrix[actual][guess] for guess in names] for actual in names], dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    cell = max(28, min(90, 420 // max(1, len(names))))
    left, top = 150, 60
    image = Image.new(
        "RGB", (max(WIDTH, left + cell * len(names) + 30), top + cell * len(names) + 60), "white"
    )
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    draw.text(
        (image.width / 2, 12),
        "Confusion matrix (rows: true class, columns: predicted)",
        fill=INK,
        font=ImageFont.load_default(size=15),
        anchor="mt",
    )
    for i, actual in enumerate(names):
        draw.text((left - 8, top + i * cell + cell / 2), _short(actual), fill=INK, font=font, anchor="rm")
        draw.text((left + i * cell + cell / 2, top - 6), _short(actual, 8), fill=INK, font=font, anchor="mb")
        for j in range(len(names)):
            shade = int(255 - 200 * share[i, j])
            colour = (shade, shade, 255) if i == j else (255, shade, shade)
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell, top + (i + 1) * cell)
            draw.rectangle(box, fill=colour, outline=GREY)
            draw.text(
                ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2),
                str(int(counts[i, j])),
                fill="white" if share[i, j] > 0.6 else INK,
                font=font,
                anchor="mm",
            )
    draw.text(
        (image.width / 2, image.height - 12),
        "blue: right answers, red: mistakes (shade: share of the row)",
        fill=INK,
        font=font,
        anchor="mb",
    )
    image.save(path, format="PNG", optimize=True)


def _short(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="mergesort")
    hits = np.asarray(positive, dtype=bool)[order]
    true_positive = np.concatenate([[0], np.cumsum(hits)])
    false_positive = np.concatenate([[0], np.cumsum(~hits)])
    return false_positive / max(1, (~hits).sum()), true_positive / max(1, hits.sum())


def roc(scores: np.ndarray, positive: np.ndarray, auc: float | None, label: str, path: Path) -> None:
    fpr, tpr = roc_curve(scores, positive)
    chart = _Chart(
        f"ROC curve for '{_short(label)}' (AUC {auc:.3f})" if auc is not None else "ROC curve",
        "false positive rate",
        "true positive rate",
        (0, 1),
        (0, 1),
    )
    chart.line([0, 1], [0, 1], GREY, width=1)
    chart.line(list(fpr), list(tpr), BLUE)
    chart.legend([("model", BLUE), ("chance", GREY)])
    chart.save(path)


def residuals(predicted: np.ndarray, actual: np.ndarray, path: Path) -> None:
    low, high = float(min(predicted.min(), actual.min())), float(max(predicted.max(), actual.max()))
    chart = _Chart("Predicted against actual (test rows)", "actual", "predicted", (low, high), (low, high))
    chart.line([low, high], [low, high], GREY, width=1)
    chart.points(list(actual), list(predicted), BLUE)
    chart.legend([("test row", BLUE), ("perfect", GREY)])
    chart.save(path)


# ---------------------------------------------------------------------------------------------- the page
def write_report(
    output_dir: Path,
    evaluation: dict[str, Any],
    history: Sequence[dict[str, Any]],
    *,
    probabilities: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    predicted: np.ndarray | None = None,
    actual: np.ndarray | None = None,
) -> Path:
    """Write the plots and ``report.html`` into ``output_dir``; the page's path."""
    summary = evaluation["conveyor"]
    task = summary["task"]
    plots: list[tuple[str, str]] = []
    missing = ""
    try:
        if history:
            learning_curves(
                history, summary.get("best_epoch", history[-1]["epoch"]), output_dir / "learning_curves.png"
            )
            plots.append(
                (
                    "learning_curves.png",
                    "Loss per epoch on the training and validation splits; the model kept is the one with the lowest validation loss.",
                )
            )
        if task == "classification":
            section = _section(evaluation)
            confusion_matrix(section["confusion_matrix"], output_dir / "confusion_matrix.png")
            plots.append(
                ("confusion_matrix.png", "How the held-out test rows of each true class were predicted.")
            )
            if probabilities is not None and truth is not None and probabilities.shape[1] == 2:
                labels = list(section["confusion_matrix"])
                auc = section.get("auc", {}).get("value")
                roc(probabilities[:, 1], np.asarray(truth) == 1, auc, labels[1], output_dir / "roc.png")
                plots.append(
                    (
                        "roc.png",
                        f"How well the model ranks '{labels[1]}' above the other class, at every threshold.",
                    )
                )
        elif predicted is not None and actual is not None:
            residuals(
                np.asarray(predicted, dtype=float),
                np.asarray(actual, dtype=float),
                output_dir / "residuals.png",
            )
            plots.append(
                (
                    "residuals.png",
                    "Each held-out test row: the closer to the diagonal, the better the prediction.",
                )
            )
    except ImportError:
        missing = "The plots need Pillow, which this training image does not have; the tables below hold every figure."
        log.warning("no plots in the report: Pillow is not installed")
    path = output_dir / "report.html"
    path.write_text(_page(evaluation, plots, missing))
    return path


def _section(evaluation: dict[str, Any]) -> dict[str, Any]:
    key = next(k for k in evaluation if k.endswith("_metrics"))
    section: dict[str, Any] = evaluation[key]
    return section


def _verdict(summary: dict[str, Any]) -> str:
    metric, value, baseline = summary["metric"], summary["value"], summary["baseline"]
    rows, name = summary.get("test_rows", "?"), summary.get("baseline_name", "baseline")
    better = value > baseline if metric not in ("rmse", "mae") else value < baseline
    if summary["task"] == "classification":
        said = f"It predicts the right class for {value:.1%} of {rows} held-out test rows"
        against = f"the {name} would get {baseline:.1%}"
    else:
        said = f"On {rows} held-out test rows its {metric} is {value:.4g}"
        against = f"the {name} scores {baseline:.4g}"
    tail = (
        "so the model has learned something the data holds."
        if better
        else "so the model is no better than guessing; look at the data and the columns it was given."
    )
    return f"{said}; {against}, {tail}"


def _page(evaluation: dict[str, Any], plots: list[tuple[str, str]], missing: str) -> str:
    summary = evaluation["conveyor"]
    section = _section(evaluation)
    e = html.escape
    metrics = "".join(
        f"<tr><td>{e(name)}</td><td>{value['value']:.4f}</td></tr>"
        for name, value in section.items()
        if isinstance(value, dict) and "value" in value
    )
    per_class = ""
    if summary.get("per_class"):
        rows = "".join(
            f"<tr><td>{e(str(label))}</td><td>{c['precision']:.3f}</td><td>{c['recall']:.3f}</td><td>{c['f1']:.3f}</td><td>{c['support']}</td></tr>"
            for label, c in summary["per_class"].items()
        )
        per_class = f"<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>test rows</th></tr>{rows}</table>"
    figures = "".join(
        f'<figure><img src="{e(name)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>'
        for name, caption in plots
    )
    hyper = "".join(
        f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>"
        for k, v in (summary.get("hyperparameters") or {}).items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>conveyor: {e(str(summary.get("dataset")))} {e(str(summary.get("version")))}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#1e1e1e}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}
figure{{display:inline-block;margin:0 1em 1em 0;vertical-align:top}}img{{max-width:100%}}.verdict{{font-size:1.15em}}</style></head>
<body><h1>Model for {e(str(summary.get("dataset")))}, data version {e(str(summary.get("version")))}</h1>
<p class="verdict">{e(_verdict(summary))}</p>
<p>{e(summary["task"])}; headline metric <b>{e(summary["metric"])} {summary["value"]:.4f}</b> against {e(summary.get("baseline_name", "baseline"))} {summary["baseline"]:.4f};
{e(_training_sentence(summary))}</p>
{f"<p><i>{e(missing)}</i></p>" if missing else ""}
{figures}
<h2>Test metrics</h2><table><tr><th>metric</th><th>value</th></tr>{metrics}</table>
{per_class}
<h2>How it was trained</h2><table><tr><th>hyperparameter</th><th>value</th></tr>{hyper}</table>
<p>Code version: {e(str(summary.get("code_version", "unknown")))}. The same figures, machine-readable: evaluation.json.</p>
</body></html>
"""
