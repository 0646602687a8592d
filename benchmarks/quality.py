"""Model quality on held-out data: conveyor's tabular recipe against scikit-learn's linear models.

For each dataset, in one run:

``conveyor``  the CSV goes through ``preprocess.core.preprocess`` (imported as Lambda imports it), which writes
              the three splits and the manifest as the pipeline stores them; then ``training/train.py`` runs
              as a subprocess on those files, laid out as SageMaker's channels (``SM_CHANNEL_*``), with its
              default hyperparameters; its ``evaluation.json`` gives the test metrics.
``baseline``  scikit-learn on the same split files and the manifest's feature columns: numeric features
              mean-imputed and standardised, categorical ones one-hot (missing as a category of its own);
              ``LogisticRegression`` (default C=1, lbfgs) for classification, ``Ridge`` (alpha=1) for
              regression; fitted on the **train split only** (conveyor also fits on train and uses
              validation only to stop early), scored on the same test split.

Datasets: scikit-learn's bundled iris, wine, breast_cancer (classification) and diabetes (regression, raw
units), plus a synthetic churn table with categorical columns and missing values (fixed seed). Nothing is
downloaded.

The split of a row is a hash of its bytes, so shuffling rows would not move them between splits. Each
repeat instead adds a ``row_ref`` column whose values depend on the repeat's seed (preprocessing ignores it
as identifier-like, as it would a real export's row ID) and shuffles the rows: every repeat is a different
80/10/10 split of the same data. Small test splits are noisy (iris: about 15 rows), so each figure is a mean
over the repeats, with its standard deviation.

Verdict per dataset and metric: conveyor's mean ≥ the baseline's mean - a tolerance. Classification
(accuracy, macro F1): one test row, i.e. 1 / the mean number of test rows. Regression: R² 0.02 lower, RMSE
1% higher. Results go to ``benchmarks/results/quality.{json,md}``.

Usage::

    python benchmarks/quality.py                      # every dataset, 10 repeats (a few minutes)
    python benchmarks/quality.py --datasets iris,wine --repeats 3
    python benchmarks/quality.py --quick              # iris, one repeat: a smoke test
    python benchmarks/quality.py --extra diabetes:patience=20     # an extra conveyor row (no verdict)
    python benchmarks/quality.py --render-only --note "..."       # rewrite quality.md with notes
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _shared

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
FUNCTIONS = ROOT / "functions"
TRAINING = ROOT / "training"
DEFAULT_OUTPUT = BENCHMARKS / "results"
DEFAULT_REPEATS = 10
SEED = 20261124
TRAIN_TIMEOUT_S = 600

# Tolerances of the verdict (module docstring).
REGRESSION_R2_TOLERANCE = 0.02
REGRESSION_RMSE_TOLERANCE = 0.01  # relative
# The metrics reported per task; the first is the primary one (the gate's).
METRICS = {"classification": ("accuracy", "macro_f1"), "regression": ("r2", "rmse")}
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "r2": True, "rmse": False}
MISSING_MARKERS = frozenset({"", "na", "n/a", "nan", "null", "none"})  # docs/contracts.md, section 2


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Datasets: a header and rows of strings, the target last and named `target`.


@dataclass(frozen=True)
class Table:
    name: str
    source: str
    header: list[str]
    rows: list[list[str]]


def _number(value: Any) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _bundled(name: str) -> Callable[[], Table]:
    def load() -> Table:
        from sklearn import datasets

        if name == "diabetes":
            bunch = datasets.load_diabetes(scaled=False)  # raw units, as an upload would have them
        else:
            bunch = getattr(datasets, f"load_{name}")()
        names = list(bunch.get("target_names", []))
        header = [*(str(f) for f in bunch.feature_names), "target"]
        rows = [
            [*(_number(v) for v in features), str(names[int(y)]) if names else _number(y)]
            for features, y in zip(bunch.data, bunch.target, strict=True)
        ]
        return Table(name, f"sklearn.datasets.load_{name}", header, rows)

    return load


SYNTHETIC_ROWS = 2000
PLANS = {"basic": 0.6, "standard": 0.0, "plus": -0.3, "family": -0.6, "business": -1.0}
CONTRACTS = {"monthly": 0.9, "yearly": -0.4, "two-year": -1.2}
REGIONS = ["north", "south", "east", "west", "centre", "coast", "islands", "mountains"]
PAYMENTS = ["card", "transfer", "cash", "voucher"]


def synthetic_churn(seed: int = SEED) -> Table:
    """Churn driven by categorical and numeric columns, one interaction and some missing values."""
    rng = random.Random(seed)
    region_effect = {region: rng.uniform(-0.5, 0.5) for region in REGIONS}
    header = [
        "tenure_months",
        "monthly_charges",
        "support_calls",
        "plan",
        "contract",
        "region",
        "payment",
        "target",
    ]
    rows = []
    for _ in range(SYNTHETIC_ROWS):
        tenure = rng.randint(0, 72)
        charges = min(max(rng.gauss(65.0, 25.0), 10.0), 200.0)
        calls = min(int(rng.expovariate(0.6)), 12)
        plan = rng.choice(list(PLANS))
        contract = rng.choices(list(CONTRACTS), weights=[5, 3, 2])[0]
        region = rng.choice(REGIONS)
        payment = rng.choice(PAYMENTS)  # no effect: a distractor
        logit = (
            -0.6
            + PLANS[plan]
            + CONTRACTS[contract]
            + region_effect[region]
            - 0.03 * tenure
            + 0.015 * (charges - 65.0)
            + 0.35 * calls
            # New monthly customers leave far more often: a linear model cannot express this one.
            + (1.5 if contract == "monthly" and tenure < 12 else 0.0)
        )
        churned = rng.random() < 1.0 / (1.0 + math.exp(-logit))
        rows.append(
            [
                str(tenure),
                "NA" if rng.random() < 0.03 else f"{charges:.2f}",
                str(calls),
                plan,
                contract,
                "" if rng.random() < 0.02 else region,
                payment,
                "yes" if churned else "no",
            ]
        )
    return Table("synthetic_churn", f"benchmarks/quality.py synthetic_churn(seed={seed})", header, rows)


DATASETS: dict[str, Callable[[], Table]] = {
    "iris": _bundled("iris"),
    "wine": _bundled("wine"),
    "breast_cancer": _bundled("breast_cancer"),
    "diabetes": _bundled("diabetes"),
    "synthetic_churn": synthetic_churn,
}


def repeat_csv(table: Table, repeat: int, path: Path) -> None:
    """The table as an upload of repeat `repeat`: a seed-dependent `row_ref` column moves the rows between
    splits (the split hashes the row's bytes), and the rows are shuffled."""
    rng = random.Random(f"{SEED}-{table.name}-{repeat}")
    order = list(range(len(table.rows)))
    rng.shuffle(order)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["row_ref", *table.header])
        for i in order:
            writer.writerow([f"r{repeat}-{i:05d}", *table.rows[i]])


# ---------------------------------------------------------------------------------------------------------
# One repeat: preprocessing, conveyor's training, the baseline.


def _import_core() -> Any:
    if str(FUNCTIONS) not in sys.path:
        sys.path.insert(0, str(FUNCTIONS))
    from preprocess import core

    return core


def preprocess_upload(csv_path: Path, channels: Path, dataset: str) -> dict[str, Any]:
    """Run conveyor's preprocessing on the file, writing what the pipeline stores, as SageMaker channels:
    ``channels/{train,validation,test}/part-00000.csv`` and ``channels/manifest/manifest.json``."""
    core = _import_core()

    @contextlib.contextmanager
    def open_split(split: str) -> Iterator[Any]:
        directory = channels / split
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / "part-00000.csv").open("w", encoding="utf-8", newline="") as handle:
            yield handle

    provenance = {
        "dataset": dataset.replace("_", "-"),
        "version": "20261124T000000Z-bench0",
        "source": {
            "bucket": "local",
            "key": f"datasets/{dataset}/{csv_path.name}",
            "version_id": None,
            "etag": None,
            "size": csv_path.stat().st_size,
        },
    }
    with csv_path.open("rb") as stream:
        manifest: dict[str, Any] = core.preprocess(
            stream, spec=core.DatasetSpec(), open_split=open_split, provenance=provenance, fmt="csv"
        )
    (channels / "manifest").mkdir(parents=True, exist_ok=True)
    (channels / "manifest" / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def train_conveyor(channels: Path, workdir: Path, hyperparameters: dict[str, str]) -> dict[str, Any]:
    """training/train.py as SageMaker runs it; returns its evaluation.json."""
    ml = workdir / "opt" / "ml"
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "SM_MODEL_DIR": str(ml / "model"),
        "SM_OUTPUT_DATA_DIR": str(ml / "output" / "data"),
        "SM_OUTPUT_DIR": str(ml / "output"),
        # Its own: a checkpoint of an earlier repeat with the same fingerprint must never be resumed.
        "SM_CHECKPOINT_DIR": str(ml / "checkpoints"),
        **{f"SM_CHANNEL_{name.upper()}": str(channels / name) for name in ("train", "validation", "test")},
        "SM_CHANNEL_MANIFEST": str(channels / "manifest"),
    }
    command = [sys.executable, str(TRAINING / "train.py")]
    for name, value in hyperparameters.items():
        command += [f"--{name}", value]
    completed = subprocess.run(
        command, env=env, cwd=workdir, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"train.py failed (exit {completed.returncode}):\n{completed.stdout[-2000:]}\n"
            f"{completed.stderr[-3000:]}"
        )
    evaluation: dict[str, Any] = json.loads((ml / "model" / "evaluation.json").read_text())
    return evaluation


def conveyor_metrics(evaluation: dict[str, Any]) -> dict[str, Any]:
    summary = evaluation["conveyor"]
    section = next(v for k, v in evaluation.items() if k.endswith("_metrics"))
    return {
        **{name: section[name]["value"] for name in METRICS[summary["task"]]},
        "test_rows": summary["test_rows"],
        "naive_baseline": summary["baseline"],
        "naive_baseline_name": summary["baseline_name"],
        "best_epoch": summary.get("best_epoch"),
        "epochs_run": summary.get("epochs_run"),
        "training_seconds": summary.get("training_seconds"),
        "code_version": summary.get("code_version"),
    }


def _read_split(channels: Path, split: str) -> list[dict[str, str]]:
    with (channels / split / "part-00000.csv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _numeric(value: str) -> float:
    if value.strip().lower() in MISSING_MARKERS:
        return math.nan
    try:
        return float(value)
    except ValueError:
        return math.nan


def _category(value: str) -> str:
    return "\x00missing" if value.strip().lower() in MISSING_MARKERS else value


def fit_baseline(channels: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """scikit-learn's linear model on the manifest's features, fitted on train, scored on test."""
    import numpy as np
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import accuracy_score, f1_score, mean_squared_error, r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    features = [c for c in manifest["columns"] if c["role"] == "feature"]
    numeric = [c["name"] for c in features if c["type"] == "numeric"]
    categorical = [c["name"] for c in features if c["type"] == "categorical"]
    others = [c["name"] for c in features if c["type"] not in ("numeric", "categorical")]
    if others:
        raise ValueError(f"the baseline handles numeric and categorical features only, not {others}")
    target, task = manifest["target"], manifest["task"]

    def matrix(rows: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        numbers = np.array([[_numeric(r[n]) for n in numeric] for r in rows], dtype=np.float64)
        categories = np.array([[_category(r[n]) for n in categorical] for r in rows], dtype=object)
        numbers = numbers.reshape(len(rows), len(numeric))
        categories = categories.reshape(len(rows), len(categorical))
        truth = [r[target] for r in rows]
        y = np.array(truth, dtype=object if task == "classification" else np.float64)
        return numbers, categories, y

    train_num, train_cat, train_y = matrix(_read_split(channels, "train"))
    test_num, test_cat, test_y = matrix(_read_split(channels, "test"))
    columns = len(numeric)
    transformers: list[tuple[str, Any, list[int]]] = []
    if numeric:
        transformers.append(
            (
                "numeric",
                make_pipeline(SimpleImputer(strategy="mean"), StandardScaler()),
                list(range(columns)),
            )
        )
    if categorical:
        transformers.append(
            (
                "categorical",
                OneHotEncoder(handle_unknown="ignore"),
                list(range(columns, columns + len(categorical))),
            )
        )
    model = (
        LogisticRegression(max_iter=10_000)
        if task == "classification"
        else Ridge(alpha=1.0)  # the default, named for the report
    )
    pipeline = make_pipeline(ColumnTransformer(transformers), model)
    train_x = np.concatenate([train_num.astype(object), train_cat], axis=1)
    test_x = np.concatenate([test_num.astype(object), test_cat], axis=1)
    pipeline.fit(train_x, train_y)
    predicted = pipeline.predict(test_x)
    if task == "classification":
        metrics = {
            "accuracy": float(accuracy_score(test_y, predicted)),
            "macro_f1": float(f1_score(test_y, predicted, average="macro", zero_division=0)),
        }
    else:
        metrics = {
            "r2": float(r2_score(test_y, predicted)),
            "rmse": float(math.sqrt(mean_squared_error(test_y, predicted))),
        }
    return {**metrics, "test_rows": len(test_y), "train_rows": len(train_y)}


def run_repeat(
    table: Table, repeat: int, work_root: Path, variants: dict[str, dict[str, str]]
) -> dict[str, Any]:
    """One split of one dataset: preprocessing, the baseline, and one conveyor training per variant."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{table.name}-{repeat}-", dir=work_root))
    try:
        upload = workdir / f"{table.name}.csv"
        repeat_csv(table, repeat, upload)
        channels = workdir / "channels"
        manifest = preprocess_upload(upload, channels, table.name)
        result: dict[str, Any] = {
            "repeat": repeat,
            "task": manifest["task"],
            "counts": manifest["counts"],
            "features": {
                kind: sum(1 for c in manifest["columns"] if c["role"] == "feature" and c.get("type") == kind)
                for kind in ("numeric", "categorical", "text")
            },
            "ignored": [c["name"] for c in manifest["columns"] if c["role"] == "ignored"],
            "baseline": fit_baseline(channels, manifest),
            "conveyor": {},
        }
        for name, hyperparameters in variants.items():
            started = time.perf_counter()
            evaluation = train_conveyor(
                channels, workdir / f"train-{len(result['conveyor'])}", hyperparameters
            )
            result["conveyor"][name] = {
                **conveyor_metrics(evaluation),
                "wall_seconds": round(time.perf_counter() - started, 2),
            }
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Figures and reports.


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def tolerance(metric: str, test_rows: float, baseline_mean: float) -> float:
    if metric in ("accuracy", "macro_f1"):
        return 1.0 / test_rows  # one test row
    if metric == "r2":
        return REGRESSION_R2_TOLERANCE
    return REGRESSION_RMSE_TOLERANCE * baseline_mean


def summarise(name: str, table: Table, repeats: list[dict[str, Any]], primary_variant: str) -> dict[str, Any]:
    task = repeats[0]["task"]
    test_rows = statistics.fmean(r["baseline"]["test_rows"] for r in repeats)
    metrics: dict[str, Any] = {}
    for metric in METRICS[task]:
        higher = HIGHER_IS_BETTER[metric]
        baseline = [r["baseline"][metric] for r in repeats]
        entry: dict[str, Any] = {"baseline": _spread(baseline), "conveyor": {}}
        for variant in repeats[0]["conveyor"]:
            ours = [r["conveyor"][variant][metric] for r in repeats]
            # Paired by split: positive when conveyor is better on that split.
            better = [(o - b) if higher else (b - o) for o, b in zip(ours, baseline, strict=True)]
            allowed = tolerance(metric, test_rows, statistics.fmean(baseline))
            margin = statistics.fmean(better)
            entry["conveyor"][variant] = {
                **_spread(ours),
                "better_by": _spread(better),
                "splits_won_tied_lost": [
                    sum(d > 1e-12 for d in better),
                    sum(abs(d) <= 1e-12 for d in better),
                    sum(d < -1e-12 for d in better),
                ],
                "tolerance": round(allowed, 4),
                "met": margin >= -allowed - 1e-12,
            }
        metrics[metric] = entry
    first = repeats[0]
    return {
        "dataset": name,
        "source": table.source,
        "task": task,
        "rows": len(table.rows),
        "features": first["features"],
        "ignored_columns": first["ignored"],
        "mean_rows": {
            split: round(statistics.fmean(r["counts"][split] for r in repeats), 1)
            for split in ("train", "validation", "test")
        },
        "primary_metric": METRICS[task][0],
        "metrics": metrics,
        "naive_baseline": _spread([r["conveyor"][primary_variant]["naive_baseline"] for r in repeats]),
        "naive_baseline_name": first["conveyor"][primary_variant]["naive_baseline_name"],
        "conveyor_epochs_run": _spread([r["conveyor"][primary_variant]["epochs_run"] for r in repeats]),
        "met": all(m["conveyor"][primary_variant]["met"] for m in metrics.values()),
        "repeats": repeats,
    }


def machine() -> dict[str, Any]:
    return _shared.machine(("torch", "numpy", "scikit-learn"))


def code_version() -> dict[str, Any]:
    """Which conveyor was measured: the commit, and digests of the preprocessing core and training code."""
    core = FUNCTIONS / "preprocess" / "core.py"
    training = sorted(TRAINING.glob("*.py")) + sorted(TRAINING.glob("requirements.txt"))
    digest = hashlib.sha256()
    for path in training:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", str(core), str(TRAINING)], capture_output=True, text=True
    )
    return {
        "commit": commit or None,
        "core_py_sha256": hashlib.sha256(core.read_bytes()).hexdigest(),
        # The same digest train.py writes into evaluation.json's code_version.
        "training_sha256": digest.hexdigest()[:16],
        "uncommitted_changes": bool(dirty.stdout.strip()),
    }


def _cell(spread: dict[str, float]) -> str:
    return f"{spread['mean']:.3f} ± {spread['std']:.3f}"


def markdown(report: dict[str, Any]) -> str:
    m, code, config = report["machine"], report["code"], report["config"]
    primary = config["primary_variant"]
    lines = [
        "# Model quality benchmark",
        "",
        f"Generated by `benchmarks/quality.py` on {report['finished_at']} in {report['total_seconds']:.0f} s "
        f"({config['repeats']} split(s) per dataset; mean ± standard deviation over the splits).",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"torch {m['torch']}, scikit-learn {m['scikit-learn']}, numpy {m['numpy']}; "
        f"load average at start {m['load_average_at_start'][0]}.",
        "",
        f"Conveyor at commit {(code['commit'] or 'unknown')[:12]}, core.py sha256 {code['core_py_sha256'][:12]}, "
        f"training sha256:{code['training_sha256']}"
        + (" (uncommitted changes)" if code["uncommitted_changes"] else "")
        + (" — **the code changed during the run**" if code.get("changed_during_run") else "")
        + ".",
        "",
        "**conveyor**: the CSV through `preprocess.core.preprocess` (splits + manifest as the pipeline stores "
        "them), then `training/train.py` as SageMaker runs it, default hyperparameters; metrics from its "
        "`evaluation.json`. **baseline**: scikit-learn on the same split files and the manifest's features "
        "(numeric: mean-imputed, standardised; categorical: one-hot), `LogisticRegression(max_iter=10000)` "
        "(C=1) or `Ridge(alpha=1)`, fitted on the train split only, scored on the same test split. Each split "
        "comes from a seed-dependent row-ID column (ignored by preprocessing) that moves rows between the "
        "hash-decided splits.",
        "",
        "Verdict: conveyor's mean ≥ the baseline's mean - tolerance (accuracy and macro F1: one test row; "
        f"R²: {REGRESSION_R2_TOLERANCE}; RMSE: {REGRESSION_RMSE_TOLERANCE:.0%} of the baseline's, higher "
        "allowed). *won/tied/lost* counts the splits, paired.",
        "",
        "| dataset | task | rows (test/split) | metric | conveyor | baseline | conveyor - baseline "
        "| won/tied/lost | tolerance | verdict |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for result in report["results"]:
        for metric, entry in result["metrics"].items():
            for variant, ours in entry["conveyor"].items():
                extra = variant != primary
                label = result["dataset"] + (f" ({variant})" if extra else "")
                sign = 1 if HIGHER_IS_BETTER[metric] else -1
                difference = sign * ours["better_by"]["mean"]
                verdict = ("met" if ours["met"] else "**missed**") + (" (extra row)" if extra else "")
                won, tied, lost = ours["splits_won_tied_lost"]
                lines.append(
                    f"| {label} | {result['task']} | {result['rows']:,} ({result['mean_rows']['test']:.0f}) "
                    f"| {metric} | {_cell(ours)} | {_cell(entry['baseline'])} | {difference:+.3f} "
                    f"| {won}/{tied}/{lost} | {ours['tolerance']:.3f} | {verdict} |"
                )
    lines.append("")
    missed = report["summary"]["missed"]
    lines.append(
        f"Missed: {', '.join(missed)}."
        if missed
        else "Conveyor met the baseline on every dataset and metric."
    )
    lines += ["", "Naive baselines (from `evaluation.json`, mean over the splits): "]
    lines[-1] += "; ".join(
        f"{r['dataset']} {r['naive_baseline_name']} {r['primary_metric']} {r['naive_baseline']['mean']:.3f}"
        for r in report["results"]
    )
    lines[-1] += ". Conveyor's epochs run (early stopping, mean): " + "; ".join(
        f"{r['dataset']} {r['conveyor_epochs_run']['mean']:.0f}" for r in report["results"]
    )
    lines[-1] += "."
    for note in report.get("notes", []):
        lines += ["", note]
    lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class Variant:
    """Conveyor with some hyperparameters changed, on some datasets (all when `datasets` is empty)."""

    hyperparameters: dict[str, str]
    datasets: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.hyperparameters.items())

    def applies_to(self, dataset: str) -> bool:
        return not self.datasets or dataset in self.datasets


def parse_variant(text: str) -> Variant:
    """`[DATASET[+DATASET...]:]name=value[,name=value...]`."""
    scope, colon, assignments = text.partition(":")
    if not colon:
        scope, assignments = "", text
    datasets = tuple(d.strip() for d in scope.split("+") if d.strip())
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dataset(s) {', '.join(unknown)}")
    parsed = {}
    for pair in (p.strip() for p in assignments.split(",") if p.strip()):
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"not name=value: {pair!r}")
        parsed[name.strip()] = value.strip()
    if not parsed:
        raise argparse.ArgumentTypeError(f"no hyperparameters in {text!r}")
    return Variant(parsed, datasets)


def run_benchmark(
    names: list[str],
    repeats: int,
    output_dir: Path,
    extras: list[Variant],
    jobs: int,
    notes: list[str],
) -> dict[str, Any]:
    started = time.perf_counter()
    primary = "defaults"
    variants: dict[str, Variant] = {primary: Variant({})}
    for extra in extras:
        known = variants.get(extra.name)
        if known is not None and known.datasets and extra.datasets:
            # The same hyperparameters asked for on other datasets too: one row, on all of them.
            extra = Variant(extra.hyperparameters, (*known.datasets, *extra.datasets))
        elif known is not None:
            extra = Variant(extra.hyperparameters)
        variants[extra.name] = extra
    report: dict[str, Any] = {
        "benchmark": "quality",
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "code": code_version(),
        "config": {
            "datasets": names,
            "repeats": repeats,
            "seed": SEED,
            "primary_variant": primary,
            "variants": {
                name: {"hyperparameters": v.hyperparameters, "datasets": list(v.datasets) or "all"}
                for name, v in variants.items()
            },
            "baseline": {
                "classification": "LogisticRegression(max_iter=10000), C=1, lbfgs",
                "regression": "Ridge(alpha=1.0)",
                "fitted_on": "train split",
                "features": "numeric: mean-imputed + StandardScaler; categorical: OneHotEncoder",
            },
            "tolerance": {
                "accuracy": "one test row (1 / mean test rows)",
                "macro_f1": "one test row (1 / mean test rows)",
                "r2": REGRESSION_R2_TOLERANCE,
                "rmse": f"{REGRESSION_RMSE_TOLERANCE:.0%} of the baseline's",
            },
        },
        "results": [],
    }
    tables = {name: DATASETS[name]() for name in names}
    work_root = Path(tempfile.mkdtemp(prefix="conveyor-quality-"))
    try:
        # train.py runs single-threaded on CPUs, so one process per core trains in parallel.
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {
                (name, repeat): pool.submit(
                    run_repeat,
                    tables[name],
                    repeat,
                    work_root,
                    {
                        v: variant.hyperparameters
                        for v, variant in variants.items()
                        if variant.applies_to(name)
                    },
                )
                for name in names
                for repeat in range(repeats)
            }
            for name in names:
                runs = []
                for repeat in range(repeats):
                    run = futures[(name, repeat)].result()
                    runs.append(run)
                    primary_metric = METRICS[run["task"]][0]
                    progress(
                        f"{name} split {repeat + 1}/{repeats}: {primary_metric} conveyor "
                        + ", ".join(f"{v[primary_metric]:.3f}" for v in run["conveyor"].values())
                        + f", baseline {run['baseline'][primary_metric]:.3f} "
                        f"({run['counts']['test']} test rows)"
                    )
                report["results"].append(summarise(name, tables[name], runs, primary))
    finally:
        shutil.rmtree(work_root, ignore_errors=True)

    measured = {
        conveyor["code_version"]
        for r in report["results"]
        for run in r["repeats"]
        for conveyor in run["conveyor"].values()
    }
    report["code"]["training_code_versions_measured"] = sorted(measured)
    final = code_version()
    if len(measured) > 1 or final["core_py_sha256"] != report["code"]["core_py_sha256"]:
        progress("warning: the preprocessing or training code changed during the run")
        report["code"]["changed_during_run"] = True
    missed = [
        f"{r['dataset']} {metric}"
        for r in report["results"]
        for metric, entry in r["metrics"].items()
        if not entry["conveyor"][primary]["met"]
    ]
    report["summary"] = {
        "missed": missed,
        "met": {r["dataset"]: r["met"] for r in report["results"]},
        "all_met": not missed,
    }
    report["notes"] = notes
    report["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "quality.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (output_dir / "quality.md").write_text(markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--datasets",
        type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
        default=list(DATASETS),
        help=f"comma-separated, from {', '.join(DATASETS)} (default: all)",
    )
    parser.add_argument(
        "--repeats", type=int, default=DEFAULT_REPEATS, help=f"splits per dataset ({DEFAULT_REPEATS})"
    )
    parser.add_argument("--quick", action="store_true", help="iris, one split: a smoke test")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT, help="where results go")
    parser.add_argument(
        "--extra",
        type=parse_variant,
        action="append",
        default=[],
        metavar="[DATASET:]NAME=VALUE,...",
        help="an extra conveyor row with these hyperparameters, on every dataset or on those named "
        "(joined by +); shown, not part of the verdict",
    )
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="trainings at once (default: one per core)"
    )
    parser.add_argument(
        "--note", action="append", default=[], help="a sentence for the report (e.g. why a dataset missed)"
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: rewrite quality.md from the quality.json in --output-dir, with the --note(s) "
        "given replacing its notes",
    )
    args = parser.parse_args(argv)
    if args.render_only:
        path = args.output_dir / "quality.json"
        report = json.loads(path.read_text())
        report["notes"] = args.note
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        (args.output_dir / "quality.md").write_text(markdown(report))
        print((args.output_dir / "quality.md").read_text())
        return 0
    unknown = [n for n in args.datasets if n not in DATASETS]
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    if args.repeats < 1 or args.jobs < 1:
        parser.error("--repeats and --jobs must be at least 1")
    for module in ("sklearn", "numpy", "torch"):
        if importlib.util.find_spec(module) is None:
            parser.error(f'{module} is missing: pip install -e ".[train,bench]" (or make bench-quality)')
    names, repeats = (["iris"], 1) if args.quick else (args.datasets, args.repeats)
    report = run_benchmark(names, repeats, args.output_dir, args.extra, args.jobs, args.note)
    progress(f"done in {report['total_seconds']:.0f} s: {args.output_dir / 'quality.md'}")
    print((args.output_dir / "quality.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
